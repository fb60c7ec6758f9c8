"""evaluation.py: the few-shot test, from episode to tables beside the paper (PROTOCOL.md 5, 6, 8).

1. One episode's scores: a meta-trained model's (evaluate.py); the prior's: nonparametric_eval.py's
2. Episodes and seeds: fixed episodes drawn from each seed, scored by common.FewShotIoU (class IoU,
   mIoU, FB-IoU), shared over the processes under torchrun, summarised as mean +- std over seeds
3. Results files and the names of their rows (the pre-training a backbone came from)
4. Tables: both tests' results in the paper's layout, beside its numbers (reference_numbers.py)
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
def eval_episodes(args, data, seed, episodes, classes):
    """One seed's `episodes` fixed episodes of `classes` on the val images, in the test geometry."""
    ids, counts = data["val"]
    return EpisodeDataset(
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


def run_episodes(args, data, seed, episodes, predict, decide, classes, shard=(0, 1)):
    """One seed: `episodes` fixed episodes of `classes` on the val images (batch 1, test geometry,
    scored at the original label size, PROTOCOL.md 5). predict(item) -> scores (1, C, s, s) on the
    test canvas; decide: {name: function of the scores (1, C, L, L) -> prediction (L, L) in {0, 1}};
    shard (r, n): only every n-th episode from the r-th (one process's share). -> ({name:
    FewShotIoU}, one JSON line per episode (its ids, class and [background, foreground] intersection
    and union per name), seconds in predict)."""
    ds = eval_episodes(args, data, seed, episodes, classes)
    mine = torch.utils.data.Subset(ds, range(shard[0], len(ds), shard[1]))
    loader = torch.utils.data.DataLoader(mine, batch_size=1, num_workers=args.workers)
    meters = {name: FewShotIoU(classes) for name in decide}
    lines = []
    t_model = 0.0
    cuda = torch.device(args.device).type == "cuda"
    phase = "novel" if list(classes) == list(args.novel) else "base"
    for index, item in zip(mine.indices, loader, strict=True):
        t0 = time.perf_counter()
        scores = predict(item)
        if cuda:  # the GPU's queue finished, so that t_model is the model's time
            torch.cuda.synchronize()
        t_model += time.perf_counter() - t0
        scores, target = logits_at_label_size(scores.float().cpu(), item["raw_label"][0])
        cls = int(item["cls"])
        iou = {}
        for name, rule in decide.items():
            iou[str(name)] = meters[name].update(rule(scores), target, cls)
        record = {
            "phase": phase,
            "seed": seed,
            "index": index,
            "query": item["query_id"][0],
            "class": cls,
            "supports": item["support_ids"][0].split(),
            "iou": {k: [*map(float, i), *map(float, u)] for k, (i, u) in iou.items()},
        }
        lines.append(json.dumps(record))
    return meters, lines, t_model


ALL_BACKGROUND = 0.05  # a model answering foreground in fewer episodes than this has collapsed


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
        for s, m in zip(seeds, meters, strict=True)
    ]
    mious = [r["miou"] for r in per_seed]
    fb_ious = [r["fb_iou"] for r in per_seed]
    classes = per_seed[0]["class_iou"]
    return {
        "miou": float(np.mean(mious)),
        "miou_std": float(np.std(mious, ddof=1)) if len(per_seed) > 1 else 0.0,
        "fb_iou": float(np.mean(fb_ious)),
        "fb_iou_std": float(np.std(fb_ious, ddof=1)) if len(per_seed) > 1 else 0.0,
        "class_iou": {c: float(np.mean([r["class_iou"][c] for r in per_seed])) for c in classes},
        "all_background": all(r["foreground_answers"] < ALL_BACKGROUND for r in per_seed),
        "per_seed": per_seed,
    }


def evaluate_seeds(
    args, data, predict, decide, episodes=None, seeds=None, classes=None, dtype=None
):
    """run_episodes per seed (default args.seeds x args.episodes, novel classes), shared over
    the processes, predict autocast in `dtype`; prints each seed, the speed, mean +- std; appends
    --episode-log. -> {name: summary}"""
    episodes = episodes or args.episodes
    seeds = seeds or args.seeds
    classes = classes or args.novel
    if args.dataset == "coco" and episodes < 10000:
        print(
            f"warning: {episodes} COCO episodes see few of a fold's 12640-26052 val images, so "
            "mIoU is noisy between seeds; use --episodes 10000 to compare methods (PROTOCOL.md "
            "8.2, 8.4)"
        )
    timed = functools.partial(autocast_call, torch.device(args.device), dtype, predict)
    runs = []  # per seed: {name: FewShotIoU summed over the processes}
    logged = []  # the --episode-log lines of the seeds so far
    t0 = time.perf_counter()
    spent = 0.0  # seconds in the model
    for seed in seeds:
        meters, lines, t = run_episodes(
            args, data, seed, episodes, timed, decide, classes, (rank(), world())
        )
        summed = {k: m.reduce(all_reduce_sum) for k, m in meters.items()}
        runs.append(summed)
        if getattr(args, "episode_log", None):  # every rank's episodes, in episode order
            lines = sorted(sum(gathered(lines), []), key=lambda x: json.loads(x)["index"])
            logged += [f"{x}\n" for x in lines]
            if is_main():  # the whole log so far, again: nothing is lost if its folder vanished
                write_output(args.episode_log, save_text, "".join(logged))
        spent += t
        scores = [f"{k} mIoU {m.miou():.2f} FB-IoU {m.fb_iou():.2f}" for k, m in summed.items()]
        print(f"seed {seed}: " + "; ".join(scores))
    total = time.perf_counter() - t0
    print(
        f"speed: {len(seeds) * episodes / total:.1f} episodes/s, {100 * spent / total:.0f}% of "
        "the time in the model"
    )
    out = {name: summarize([r[name] for r in runs], seeds) for name in decide}
    for name, r in out.items():
        collapsed = ", ALL BACKGROUND (a collapsed model)" if r["all_background"] else ""
        class_iou = " ".join(f"{c}:{v:.1f}" for c, v in r["class_iou"].items())
        print(
            f"{name}: mIoU {r['miou']:.2f} +- {r['miou_std']:.2f}, FB-IoU {r['fb_iou']:.2f} +- "
            f"{r['fb_iou_std']:.2f} over {len(seeds)} seeds{collapsed}; class IoU {class_iou}"
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
        write_output(path, save_text, out)
        print(f"wrote {path}")


def write_output(path, save, obj):
    """write_atomic, saying so when the output's folder vanished during the run and is made again
    (the results of a long evaluation are never thrown away for it)."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        print(f"note: {folder} is gone (removed during the run?): making it again for {path}")
    write_atomic(path, save, obj)


def bcpt_words(a):
    """The start of a BCPT row name: K, the reading of Eq. 4, and each choice off the paper's."""
    alpha = a.get("alpha", 0.1)
    words = ["bcpt"]
    if a.get("no_guidance"):
        words.append("no-guidance")
    words.append(f"K={a['K']}")
    if alpha != 0.1:  # the paper's alpha goes unnamed
        words.append(f"alpha={alpha:g}")
    words.append(f"Eq4={a.get('loss_scale', 'sum')}")  # files from before --loss-scale: sum
    if a.get("eq3") == "base":
        words.append("Eq3=base")
    return words


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
    # files from before --head: linear
    words = bcpt_words(a) if a["method"] == "bcpt" else ["standard", a.get("head", "linear")]
    if a.get("novel_images") == "drop":
        words.append("drop-novel")
    if ckpt.get("select") == "best-val":
        words.append("best-val")
    if a.get("init_label") == "imagenet stand-in":
        words.append("from stand-in")
    return " ".join(words)


# ============ 4. Tables: both tests' results files in the paper's layout, beside its numbers ====
TABLE_METRICS = {
    "threshold": "miou",
    "base-threshold": "miou_base_threshold",  # a non-parametric file's cell
    "best-sweep": lambda r: max(r["sweep"].values()),
}


def paper_pretraining(label):
    """The paper's name (ImageNet, Standard, BCPT) of a row's pre-training, or None."""
    if label == "imagenet":
        return "ImageNet"
    if re.fullmatch(r"standard (psp|linear|\(BAM best.pth\))( best-val)?", label):
        return "Standard"
    if re.fullmatch(r"bcpt K=6 Eq4=\w+( Eq3=base)?( best-val)?", label):
        return "BCPT"
    return None


def paper_row(r):
    """The reference_numbers key of a results file of either test, or None: the paper's pre-training
    (ImageNet, Standard, BCPT K=6 alpha 0.1 with guidance, either reading of Eqs. 3-4) on its
    backbone (ResNet-50: either stem) and test geometry."""
    table = "paper-table2" if r.get("method") == "non-parametric prior" else "paper-table1"
    backbone = {"resnet50v2": "resnet50"}.get(r["backbone"], r["backbone"])
    key = (table, r["dataset"], backbone, paper_pretraining(r["pretrained"]), r["shot"])
    pfenet = r.get("protocol", {}).get("test_geometry", "pfenet") == "pfenet"
    return key if reference(*key) and pfenet else None


def cell(files):
    """A table cell: mean (+-std over several files), how many were all background; - for none."""
    if not files:
        return "-"
    values = [v for _, v in files]
    collapsed = sum(bool(r.get("all_background")) for r, _ in files)
    text = f"{np.mean(values):.2f}"
    if len(files) > 1:
        text += f"+-{np.std(values, ddof=1):.2f}"
    if collapsed and len(files) == 1:
        text += " (all background)"
    elif collapsed:
        text += f" ({collapsed} of {len(files)} all background)"
    return text


def format_table(paths, metric="threshold"):
    """Paper Table 1 / 2 layout: a row per (dataset, backbone, method, pre-training, test geometry),
    folds 0-3 and mean per shot, a cell of several files (training seeds) as mean+-std; then the
    paper beside ours (table_vs_paper). metric: what a non-parametric file shows (TABLE_METRICS); a
    metatrain.py model's file shows its mIoU."""
    cells = {}  # {(row, shot, fold): [(results, the value shown) per file]}
    files = {}  # {row: [results]}
    for p, r in distinct_results(paths):
        try:
            geometry = r.get("protocol", {}).get("test_geometry", "pfenet")
            pretrained = r["pretrained"]
            if geometry != "pfenet":
                pretrained += f" @{geometry}"
            row = (r["dataset"], r["backbone"], r.get("method", "?"), pretrained)
            pick = TABLE_METRICS[metric] if r.get("method") == "non-parametric prior" else "miou"
            value = pick(r) if callable(pick) else r[pick]
        except (KeyError, TypeError, AttributeError) as e:
            raise KitError(f"--table {p}: not a results file of this kit (no {e})") from None
        cells.setdefault((row, r["shot"], r["fold"]), []).append((r, value))
        files.setdefault(row, []).append(r)
    shots = sorted({shot for _, shot, _ in cells})
    head = ["Dataset", "Backbone", "Method", "Pre-train"]
    head += [
        f"{s}-shot {c}" for s in shots for c in ("Fold-0", "Fold-1", "Fold-2", "Fold-3", "Mean")
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in sorted(files):
        texts = list(row)
        for s in shots:
            folds = [cells.get((row, s, f), []) for f in range(4)]
            texts += [cell(fold) for fold in folds]
            means = [np.mean([v for _, v in fold]) for fold in folds if fold]
            mean = f"{np.mean(means):.2f}" if means else "-"
            if 0 < len(means) < 4:
                mean += "*"
            texts.append(mean)
        lines.append("| " + " | ".join(texts) + " |")
    lines.append("mIoU in %; * = mean over the folds present only.")
    for results in files.values():
        lines += table_vs_paper(results, metric)
    return "\n".join(lines)


def distinct_results(paths):
    """[(path, results)], each file once: a file named twice, or two copies of one results file,
    would count as two training seeds (a note says which were dropped)."""
    seen = {}  # {real path or the results' identity: the path kept}
    kept = []
    for path in paths:
        results = read_results(path)
        identity = json.dumps([results.get("run"), results["per_seed"]], sort_keys=True)
        earlier = seen.get(os.path.realpath(path)) or seen.get(identity)
        if earlier:
            print(f"note: --table {path} is {earlier} again: counted once")
            continue
        seen[os.path.realpath(path)] = path
        seen[identity] = path
        kept.append((path, results))
    return kept


def read_results(path):
    """A results file of either test (--json), its fields checked: one line naming the file and
    the field otherwise."""
    r = read_json(path, "--table")
    fix = "pass a --json file of evaluate.py or nonparametric_eval.py"
    if not isinstance(r, dict):
        raise KitError(f"--table {path}: not a results file of this kit; {fix}")
    fields = {"dataset": str, "backbone": str, "pretrained": str, "shot": int, "fold": int}
    fields.update(miou=float, per_seed=list)
    for key, kind in fields.items():
        value = r.get(key)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise KitError(f"--table {path}: {key} is {value!r}, not a {kind.__name__}; {fix}")
    for s in r["per_seed"]:
        if not isinstance(s, dict) or type(s.get("miou")) not in (int, float):
            raise KitError(f"--table {path}: per_seed holds {s!r}, not a seed's numbers; {fix}")
    return r


def table_vs_paper(results, metric):
    """For a row the paper reports, per fold and mean: ours, the paper's, the difference, our seeds'
    spread (training seeds if several files, else evaluation seeds) with the paper inside or not,
    and BAM test.py's best seed."""
    key = paper_row(results[0])
    # Table 2 at one threshold only
    if key is None or (key[0] == "paper-table2" and metric != "threshold"):
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
