"""evaluation.py: the few-shot test, from one episode to the tables beside the paper (PROTOCOL.md 5,
6, 8).

1. One episode's scores: a meta-trained model's (evaluate.py); the prior's are nonparametric_eval.py's
2. Episodes and seeds: fixed episodes drawn from each seed, scored with common.FewShotIoU (class IoU, mIoU,
   FB-IoU), shared over the processes under torchrun, summarised as mean +- std over the seeds
3. Results files and the names of their rows (the pre-training a backbone came from)
4. Tables: results files of both tests in the paper's layout, beside the paper's numbers (reference_numbers.py)
"""

import functools
import json
import os
import re
import time

import numpy as np
import torch

from common import (
    IGNORE,
    EpisodeDataset,
    FewShotIoU,
    KitError,
    load_checkpoint,
    logits_at_label_size,
    write_atomic,
)
from plumbing import (
    all_reduce_sum,
    autocast_call,
    gathered,
    is_main,
    rank,
    read_json,
    run_record,
    save_text,
    world,
)
from reference_numbers import reference


# ============ 1. One episode's scores ============
def predict_meta(model, item):
    """Scores (1, 2, s, s) of a meta-trained model on one evaluation episode."""
    device = next(model.parameters()).device
    return model(
        item["query"].to(device), item["support"].to(device), item["support_mask"].to(device)
    )


def argmax_mask(scores):
    """Prediction (L, L) in {0, 1} from scores (1, 2, L, L)."""
    return scores.argmax(1)[0]


# ============ 2. Episodes and seeds ============
def run_episodes(args, data, seed, episodes, predict, decide, classes, shard=(0, 1)):
    """One seed: `episodes` fixed episodes of `classes` on the val images (batch 1, test geometry,
    scored at the original label size, PROTOCOL.md 5). predict(item) -> scores (1, C, s, s) on the
    test canvas; decide: {name: function of the scores (1, C, L, L) -> prediction (L, L) in {0, 1}};
    shard (r, n): only every n-th episode from the r-th (one process's share). -> ({name:
    FewShotIoU}, one JSON line per episode (its ids, class and [background, foreground] intersection
    and union per name), seconds in predict)."""
    ids, counts = data["val"]
    ds = EpisodeDataset(
        args.data_root,
        ids,
        counts,
        args.dataset,
        classes,
        args.shot,
        args.min_pixels,
        seed,
        test_size=args.test_size,
        episodes=episodes,
        geometry=args.test_geometry,
    )
    mine = torch.utils.data.Subset(ds, range(shard[0], len(ds), shard[1]))
    loader = torch.utils.data.DataLoader(
        mine, batch_size=1, shuffle=False, num_workers=args.workers
    )
    meters, lines, t_model = {name: FewShotIoU(classes) for name in decide}, [], 0.0
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    for index, item in zip(mine.indices, loader):
        t0 = time.perf_counter()
        scores = predict(item)
        sync()
        t_model += time.perf_counter() - t0
        scores, target = logits_at_label_size(scores.float().cpu(), item["raw_label"][0])
        iou = {
            str(name): meters[name].update(rule(scores), target, int(item["cls"]))
            for name, rule in decide.items()
        }
        lines.append(
            json.dumps(
                {
                    "phase": "novel" if list(classes) == list(args.novel) else "base",
                    "seed": seed,
                    "index": index,
                    "query": item["query_id"][0],
                    "class": int(item["cls"]),
                    "supports": item["support_ids"][0].split(),
                    "iou": {k: [*map(float, i), *map(float, u)] for k, (i, u) in iou.items()},
                }
            )
        )
    return meters, lines, t_model


ALL_BACKGROUND = (
    0.05  # a model that answers some foreground in fewer episodes than this has collapsed
)


def summarize(meters, seeds):
    """Mean +- sample std (ddof 1; 0 for one seed) over seeds of mIoU and FB-IoU; per-class IoU
    averaged; whether the answers were all background (fewer than ALL_BACKGROUND of the episodes
    with any foreground)."""
    per_seed = [
        {
            "seed": s,
            "miou": m.miou(),
            "fb_iou": m.fb_iou(),
            "class_iou": m.class_iou(),
            "foreground_answers": m.foreground_answers(),
        }
        for s, m in zip(seeds, meters)
    ]
    std = lambda key: (
        float(np.std([r[key] for r in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
    )
    classes = per_seed[0]["class_iou"]
    return {
        "miou": float(np.mean([r["miou"] for r in per_seed])),
        "miou_std": std("miou"),
        "fb_iou": float(np.mean([r["fb_iou"] for r in per_seed])),
        "fb_iou_std": std("fb_iou"),
        "class_iou": {c: float(np.mean([r["class_iou"][c] for r in per_seed])) for c in classes},
        "all_background": all(r["foreground_answers"] < ALL_BACKGROUND for r in per_seed),
        "per_seed": per_seed,
    }


def evaluate_seeds(
    args, data, predict, decide, episodes=None, seeds=None, classes=None, dtype=None
):
    """common.run_episodes per seed (default args.seeds x args.episodes, novel classes), shared over
    the processes, predict autocast in `dtype`; prints each seed, the speed, mean +- std; appends
    --episode-log. -> {name: summary}"""
    episodes, seeds, classes = episodes or args.episodes, seeds or args.seeds, classes or args.novel
    if args.dataset == "coco" and episodes < 10000:
        print(
            f"warning: {episodes} COCO episodes see few of a fold's 12640-26052 val images, so "
            "mIoU is noisy between seeds; use --episodes 10000 to compare methods (PROTOCOL.md "
            "8.2, 8.4)"
        )
    timed = functools.partial(autocast_call, torch.device(args.device), dtype, predict)
    runs, t0, spent = [], time.perf_counter(), 0.0
    for seed in seeds:
        meters, lines, t = run_episodes(
            args, data, seed, episodes, timed, decide, classes, (rank(), world())
        )
        runs.append({k: m.reduce(all_reduce_sum) for k, m in meters.items()})
        if getattr(args, "episode_log", None):  # every rank's episodes, in episode order
            lines = sorted(sum(gathered(lines), []), key=lambda x: json.loads(x)["index"])
            if is_main():
                with open(args.episode_log, "a") as f:
                    f.writelines(f"{x}\n" for x in lines)
        spent += t
        print(
            f"seed {seed}: "
            + "; ".join(
                f"{k} mIoU {m.miou():.2f} FB-IoU {m.fb_iou():.2f}" for k, m in runs[-1].items()
            )
        )
    total = time.perf_counter() - t0
    print(
        f"speed: {len(seeds) * episodes / total:.1f} episodes/s, {100 * spent / total:.0f}% of "
        "the time in the model"
    )
    out = {name: summarize([r[name] for r in runs], seeds) for name in decide}
    for name, r in out.items():
        print(
            f"{name}: mIoU {r['miou']:.2f} +- {r['miou_std']:.2f}, FB-IoU {r['fb_iou']:.2f} +- "
            f"{r['fb_iou_std']:.2f} over {len(seeds)} seeds"
            + ", ALL BACKGROUND (a collapsed model)" * r["all_background"]
            + "; class IoU "
            + " ".join(f"{c}:{v:.1f}" for c, v in r["class_iou"].items())
        )
    return out


# ============ 3. Results files and row names ============
def write_results(path, summary, args, data=None, **fields):
    """The results JSON of both tests (README "Results files"), with the run record, written
    atomically by rank 0."""
    protocol = {
        "split": "val, novel classes",
        "query_order": "val list in order, wrapping",
        "batch": 1,
        "test_size": args.test_size,
        "test_geometry": args.test_geometry,
        "ignore": IGNORE,
        "scoring": {
            "pfenet": "logits resized to max(H, W) of the original label (ori_resize)",
            "hsnet": "image and label resized to test_size x test_size",
        }[args.test_geometry],
        "min_pixels": args.min_pixels,
        "train_pool": args.train_pool,
        "coco_split": args.coco_split,
        "std": "sample std over seeds",
    }
    out = {
        **summary,
        "episodes": args.episodes,
        "seeds": args.seeds,
        "shot": args.shot,
        "fold": args.fold,
        "dataset": args.dataset,
        "backbone": args.backbone,
        "precision": args.amp,
        "protocol": protocol,
        "world_checksum": getattr(args, "world_checksum", None),
        **fields,
        "run": run_record(args, data),
    }
    if is_main():
        write_atomic(path, save_text, out)
        print(f"wrote {path}")


def pretrain_label(weights):
    """Table row name of a backbone source: imagenet, none, BAM's base learner, or
    pretrain_bcpt.py's method with every choice that changes it (head, K, alpha, Eqs. 3-4, guidance,
    drop-novel, best-val, a stand-in start)."""
    if weights in (None, "none", "imagenet"):
        return weights or "none"
    ckpt = load_checkpoint(weights)
    a = ckpt.get("args", {})
    if "method" not in a:
        return "standard (BAM best.pth)" if "state_dict" in ckpt else os.path.basename(weights)
    if a["method"] == "generic":
        return "imagenet stand-in"
    tail = (
        " drop-novel" * (a.get("novel_images") == "drop")
        + " best-val" * (ckpt.get("select") == "best-val")
        + " from stand-in" * (a.get("init_label") == "imagenet stand-in")
    )
    if a["method"] != "bcpt":
        return f"standard {a.get('head', 'linear')}{tail}"  # files from before --head: linear
    alpha, scale = (
        a.get("alpha", 0.1),
        a.get("loss_scale", "sum"),
    )  # files from before --loss-scale: sum
    return (
        "bcpt"
        + (" no-guidance" if a.get("no_guidance") else "")
        + f" K={a['K']}"
        + (f" alpha={alpha:g}" if alpha != 0.1 else "")
        + f" Eq4={scale}"  # the paper's alpha goes unnamed
        + (" Eq3=base" if a.get("eq3") == "base" else "")
        + tail
    )


# ============ 4. Tables: results files of both tests in the paper's layout, beside the paper's
# numbers ============
TABLE_METRICS = {
    "threshold": "miou",
    "base-threshold": "miou_base_threshold",  # a non-parametric file's cell
    "best-sweep": lambda r: max(r["sweep"].values()),
}


def paper_row(r):
    """The reference_numbers key of a results file of either test, or None: the paper's pre-training
    (ImageNet, Standard, BCPT K=6 alpha 0.1 with guidance, either reading of Eqs. 3-4) on its
    backbone (ResNet-50: either stem) and test geometry."""
    label = r["pretrained"]
    table = "paper-table2" if r.get("method") == "non-parametric prior" else "paper-table1"
    kind = (
        "ImageNet"
        if label == "imagenet"
        else "Standard"
        if re.fullmatch(r"standard (psp|linear|\(BAM best.pth\))( best-val)?", label)
        else "BCPT"
        if re.fullmatch(r"bcpt K=6 Eq4=\w+( Eq3=base)?( best-val)?", label)
        else None
    )
    key = (
        table,
        r["dataset"],
        {"resnet50v2": "resnet50"}.get(r["backbone"], r["backbone"]),
        kind,
        r["shot"],
    )
    pfenet = r.get("protocol", {}).get("test_geometry", "pfenet") == "pfenet"
    return key if reference(*key) and pfenet else None


def format_table(paths, metric="threshold"):
    """Paper Table 1 / 2 layout: a row per (dataset, backbone, method, pre-training, test geometry),
    folds 0-3 and mean per shot, a cell of several files (training seeds) as mean+-std; then the
    paper beside ours (table_vs_paper). metric: what a non-parametric file shows (TABLE_METRICS); a
    metatrain.py model's file shows its mIoU."""
    cells, shots, files = {}, set(), {}
    for p in paths:
        r = read_json(p, "--table")
        try:
            geometry = r.get("protocol", {}).get("test_geometry", "pfenet")
            row = (
                r["dataset"],
                r["backbone"],
                r.get("method", "?"),
                r["pretrained"] + f" @{geometry}" * (geometry != "pfenet"),
            )
            pick = TABLE_METRICS[metric] if r.get("method") == "non-parametric prior" else "miou"
            value = pick(r) if callable(pick) else r[pick]
        except (KeyError, TypeError, AttributeError) as e:
            raise KitError(f"--table {p}: not a results file of this kit (no {e})") from None
        cells.setdefault(row, {}).setdefault((r["shot"], r["fold"]), []).append(
            (value, r.get("all_background"))
        )
        files.setdefault(row, []).append(r)
        shots.add(r["shot"])

    def cell(v):
        flat = (
            " (all background)"
            if any(c for _, c in v) and len(v) == 1
            else f" ({sum(bool(c) for _, c in v)} of "
            f"{len(v)} all background)" * any(c for _, c in v)
        )
        return (
            "-"
            if not v
            else f"{np.mean([x for x, _ in v]):.2f}"
            + (f"+-{np.std([x for x, _ in v], ddof=1):.2f}" if len(v) > 1 else "")
            + flat
        )

    head = ["Dataset", "Backbone", "Method", "Pre-train"] + [
        f"{s}-shot {c}"
        for s in sorted(shots)
        for c in ("Fold-0", "Fold-1", "Fold-2", "Fold-3", "Mean")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, got in sorted(cells.items()):
        vals = []
        for s in sorted(shots):
            folds = [got.get((s, f), []) for f in range(4)]
            means = [np.mean([x for x, _ in v]) for v in folds if v]
            vals += [cell(v) for v in folds] + [
                f"{np.mean(means):.2f}" + "*" * (len(means) < 4) if means else "-"
            ]
        lines.append("| " + " | ".join(list(row) + vals) + " |")
    lines.append("mIoU in %; * = mean over the folds present only.")
    return "\n".join(lines + [line for rs in files.values() for line in table_vs_paper(rs, metric)])


def table_vs_paper(results, metric):
    """For a row the paper reports, per fold and mean: ours, the paper's, the difference, our seeds'
    spread (training seeds if several files, else evaluation seeds) with the paper inside or not,
    and BAM test.py's best seed."""
    key = paper_row(results[0])
    if key is None or (
        key[0] == "paper-table2" and metric != "threshold"
    ):  # Table 2 at one threshold only
        return []
    paper = reference(*key)
    lines = [f"Beside the paper (Table {key[0][-1]}, {key[1]} {key[2]} {key[3]} {key[4]}-shot):"]
    ours = {}
    for f in range(4):
        rs = [r for r in results if r["fold"] == f]
        if not rs:
            continue
        seeds = [r["miou"] for r in rs] if len(rs) > 1 else [s["miou"] for s in rs[0]["per_seed"]]
        best = max(s["miou"] for r in rs for s in r["per_seed"])
        ours[f] = mean = float(np.mean([r["miou"] for r in rs]))
        theirs = paper["folds"][f]
        inside = min(seeds) <= theirs <= max(seeds)
        lines.append(
            f"  fold {f}: ours {mean:.2f} ({'training' if len(rs) > 1 else 'evaluation'} seeds "
            f"{min(seeds):.2f}-{max(seeds):.2f}), paper {theirs:.2f}, difference "
            f"{mean - theirs:+.2f}: {'inside' if inside else 'outside'} the spread of our seeds; "
            f"best of the evaluation seeds (BAM test.py's Best_mIoU) {best:.2f}"
        )
    if len(ours) == 4:
        mean = float(np.mean(list(ours.values())))
        lines.append(
            f"  mean: ours {mean:.2f}, paper {paper['all']:.2f}, difference "
            f"{mean - paper['all']:+.2f}"
        )
    return lines
