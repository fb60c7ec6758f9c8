"""evaluation.py: the few-shot test, from episode to tables beside the paper (PROTOCOL.md 5, 6, 8).

1. One episode's scores: a meta-trained model's (evaluate.py); the prior's: nonparametric_eval.py's
2. Episodes and seeds: fixed episodes drawn from each seed, scored by common.FewShotIoU (class IoU,
   mIoU, FB-IoU), shared over the processes under torchrun, summarised as mean +- std over seeds
3. Results files and the names of their rows (the pre-training a backbone came from)
4. Tables: both tests' results in the paper's layout, beside its numbers (reference_numbers.py)
"""

import functools
import itertools
import json
import operator
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
    backbone_kind,
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
    FewShotIoU}, one record per episode (its ids, class and [background, foreground] intersection
    and union per name: an --episode-log line), seconds in predict)."""
    ds = eval_episodes(args, data, seed, episodes, classes)
    mine = torch.utils.data.Subset(ds, range(shard[0], len(ds), shard[1]))
    loader = torch.utils.data.DataLoader(mine, batch_size=1, num_workers=args.workers)
    meters = {name: FewShotIoU(classes) for name in decide}
    records = []
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
        records.append(record)
    return meters, records, t_model


ALL_BACKGROUND = 0.05  # a model answering foreground in fewer episodes than this has collapsed
# one seed's episodes in a results file ("per_episode"): parallel lists, one entry per episode
EPISODE_COLUMNS = ("query", "class", "fg_inter", "fg_union", "bg_inter", "bg_union")


def episode_columns(records, name):
    """One seed's episodes (run_episodes' records, in episode order) under the rule `name`, compact
    for a results file: {column: a list with an entry per episode} (EPISODE_COLUMNS: the query id,
    the class, and the foreground and background intersection and union in pixels)."""
    columns = {key: [] for key in EPISODE_COLUMNS}
    for record in records:
        bg_inter, fg_inter, bg_union, fg_union = record["iou"][str(name)]
        columns["query"].append(record["query"])
        columns["class"].append(record["class"])
        # pixel counts: whole numbers, written without ".0"
        columns["fg_inter"].append(int(fg_inter))
        columns["fg_union"].append(int(fg_union))
        columns["bg_inter"].append(int(bg_inter))
        columns["bg_union"].append(int(bg_union))
    return columns


def summarize(meters, seeds, episodes=None):
    """Mean +- sample std (ddof 1; 0 for one seed) over seeds of mIoU and FB-IoU; per-class IoU
    averaged; whether the answers were all background (fewer than ALL_BACKGROUND of the episodes
    with any foreground); with `episodes` (episode_columns per seed), each seed's episodes as
    "per_episode"."""
    per_seed = []
    for s, m in zip(seeds, meters, strict=True):
        scores = {
            "seed": s,
            "miou": m.miou(),
            "fb_iou": m.fb_iou(),
            "class_iou": m.class_iou(),
            "foreground_answers": m.foreground_answers(),
        }
        per_seed.append(scores)
    mious = [r["miou"] for r in per_seed]
    fb_ious = [r["fb_iou"] for r in per_seed]
    classes = per_seed[0]["class_iou"]
    out = {
        "miou": float(np.mean(mious)),
        "miou_std": float(np.std(mious, ddof=1)) if len(per_seed) > 1 else 0.0,
        "fb_iou": float(np.mean(fb_ious)),
        "fb_iou_std": float(np.std(fb_ious, ddof=1)) if len(per_seed) > 1 else 0.0,
        "class_iou": {c: float(np.mean([r["class_iou"][c] for r in per_seed])) for c in classes},
        "all_background": all(r["foreground_answers"] < ALL_BACKGROUND for r in per_seed),
        "per_seed": per_seed,
    }
    if episodes is not None:
        out["per_episode"] = list(episodes)
    return out


def evaluate_seeds(
    args, data, predict, decide, episodes=None, seeds=None, classes=None, dtype=None
):
    """run_episodes per seed (default args.seeds x args.episodes, novel classes), shared over
    the processes, predict autocast in `dtype`; prints each seed, the speed, mean +- std; appends
    --episode-log. -> {name: summary}, each with every seed's episodes (summarize)."""
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
    columns = []  # per seed: {name: its episodes (episode_columns)}
    logged = []  # the --episode-log lines of the seeds so far
    t0 = time.perf_counter()
    spent = 0.0  # seconds in the model
    for seed in seeds:
        meters, records, t = run_episodes(
            args, data, seed, episodes, timed, decide, classes, (rank(), world())
        )
        summed = {k: m.reduce(all_reduce_sum) for k, m in meters.items()}
        runs.append(summed)
        # every rank's episodes, in episode order: for the results file and --episode-log
        records = sorted(sum(gathered(records), []), key=operator.itemgetter("index"))
        columns.append({name: episode_columns(records, name) for name in decide})
        if getattr(args, "episode_log", None):
            logged += [json.dumps(x) + "\n" for x in records]
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
    out = {}
    for name in decide:
        meters = [r[name] for r in runs]
        out[name] = summarize(meters, seeds, [c[name] for c in columns])
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
    """The results JSON of both tests (README "Results files"), with the run record and, last, each
    seed's episodes ("per_episode", fields "per_episode_..."), written atomically by rank 0."""
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
    # the long per-episode lists last, after the numbers a reader looks for
    for key in [k for k in out if k.startswith("per_episode")]:
        out[key] = out.pop(key)
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
    """Table row name of a backbone source: imagenet, none, BAM's base learner, a peer's ImageNet
    file ("imagenet (resnet50_v2.pth)"), or pretrain_bcpt.py's method with every choice that
    changes it (head, K, alpha, Eqs. 3-4, guidance, drop-novel, best-val, a stand-in start)."""
    if weights in (None, "none", "imagenet"):
        return weights or "none"
    ckpt = load_checkpoint(weights)
    a = ckpt.get("args", {})
    if "method" not in a:
        return weights_file_label(ckpt, weights)
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


# backbones whose plain state dict (unsplit keys) is an ImageNet file: the peers' initmodel/
# resnet50_v2.pth and vgg16_bn.pth, torchvision's resnet50 (common.backbone_kind)
IMAGENET_KINDS = ("resnet50v2", "resnet50", "vgg16")


def weights_file_label(ckpt, weights):
    """The row name of a weights file that no kit stage wrote: BAM's base learner, an ImageNet
    backbone (a plain state dict of the unsplit network, known by its key layout whatever the file
    is called: "imagenet (FILE)"), else the file's name."""
    name = os.path.basename(weights)
    if "state_dict" in ckpt:
        return "standard (BAM best.pth)"
    stem = ckpt.get("conv1.weight", ckpt.get("features.0.weight"))  # None: split or other keys
    if isinstance(stem, torch.Tensor) and backbone_kind(ckpt) in IMAGENET_KINDS:
        return f"imagenet ({name})"
    return name


# ============ 4. Tables: both tests' results files in the paper's layout, beside its numbers ====
TABLE_METRICS = {
    "threshold": "miou",
    "base-threshold": "miou_base_threshold",  # a non-parametric file's cell
    "best-sweep": lambda r: max(r["sweep"].values()),
}


# the labels (pretrain_label) of the paper's Standard and BCPT rows, with the choices the paper
# leaves open (Standard's head, Eqs. 3-4, model selection)
STANDARD_LABEL = r"standard (psp|linear|\(BAM best.pth\))( best-val)?"
BCPT_LABEL = r"bcpt( no-guidance)? K=(\d+) Eq4=\w+( Eq3=base)?( best-val)?"


def paper_names(label):
    """{reference table: the paper's name of the row} of a row label: ImageNet ("imagenet", or a
    peer's ImageNet file "imagenet (FILE)"; not the worlds' "imagenet stand-in") and Standard in
    Tables 1-2, Standard also in Table 3; BCPT rows (bcpt_names); {} for any other row."""
    if label == "imagenet" or label.startswith("imagenet ("):
        return {"paper-table1": "ImageNet", "paper-table2": "ImageNet"}
    if re.fullmatch(STANDARD_LABEL, label):
        return {"paper-table1": "Standard", "paper-table2": "Standard", "paper-table3": "Standard"}
    match = re.fullmatch(BCPT_LABEL, label)
    if match is None:
        return {}
    return bcpt_names(guided=match.group(1) is None, k=int(match.group(2)))


def bcpt_names(guided, k):
    """paper_names of a BCPT row (alpha 0.1, either reading of Eqs. 3-4): K=6 with guidance is
    BCPT (Tables 1-2), BMC+OCG (Table 3) and K=6 (Table 4); K=6 without guidance (pretrain_bcpt.py
    --no-guidance) is Table 3's BMC; another K with guidance a row of Table 4."""
    if guided and k == 6:
        return {
            "paper-table1": "BCPT",
            "paper-table2": "BCPT",
            "paper-table3": "BMC+OCG",
            "paper-table4": "K=6",
        }
    if k == 6:
        return {"paper-table3": "BMC"}
    if guided:
        return {"paper-table4": f"K={k}"}
    return {}


def paper_pretraining(label):
    """The paper's name (ImageNet, Standard, BCPT) of a row in Tables 1-2, or None."""
    return paper_names(label).get("paper-table1")


def paper_rows(r):
    """The reference_numbers keys of the paper's rows a results file stands beside: its
    pre-training (paper_names) on its backbone (ResNet-50: either stem), in the pfenet test
    geometry only; Table 2 for a non-parametric file, else Tables 1, 3 and 4 (the last two:
    PASCAL, ResNet-50, 5-shot)."""
    if r.get("protocol", {}).get("test_geometry", "pfenet") != "pfenet":
        return []
    tables = ("paper-table1", "paper-table3", "paper-table4")
    if r.get("method") == "non-parametric prior":
        tables = ("paper-table2",)
    backbone = {"resnet50v2": "resnet50"}.get(r["backbone"], r["backbone"])
    keys = []
    for table, name in paper_names(r["pretrained"]).items():
        key = (table, r["dataset"], backbone, name, r["shot"])
        if table in tables and reference(*key):
            keys.append(key)
    return keys


def paper_row(r):
    """The Table 1 or 2 key of a results file (paper_rows), or None."""
    for key in paper_rows(r):
        if key[0] in ("paper-table1", "paper-table2"):
            return key
    return None


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
    paper beside ours (table_vs_paper: Tables 1-4) and whether the gaps between rows are real
    (gap_lines). metric: what a non-parametric file shows (TABLE_METRICS); a metatrain.py model's
    file shows its mIoU."""
    cells = {}  # {(row, shot, fold): [(results, the value shown) per file]}
    files = {}  # {row: [results]}
    for p, r in distinct_results(paths):
        try:
            geometry = r.get("protocol", {}).get("test_geometry", "pfenet")
            pretrained = r["pretrained"]
            if geometry != "pfenet":
                pretrained += f" @{geometry}"
            row = (r["dataset"], r["backbone"], r.get("method", "?"), pretrained)
            value = shown_value(r, metric)
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
    lines += gap_lines(files, metric)
    return "\n".join(lines)


def shown_value(r, metric):
    """The number a results file puts in its table cell: a non-parametric file's at `metric`
    (TABLE_METRICS), a metatrain.py model's mIoU."""
    pick = TABLE_METRICS[metric] if r.get("method") == "non-parametric prior" else "miou"
    return pick(r) if callable(pick) else r[pick]


def distinct_results(paths):
    """[(path, results)], each file once: a file named twice, or two copies of one results file,
    would count as two training seeds (a note says which were dropped)."""
    seen = {}  # {real path or the results' identity: the path kept}
    kept = []
    for path in paths:
        results = read_results(path)
        identity = json.dumps(results, sort_keys=True)  # a copy: the same results exactly
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
    """paper_block for each row of the paper that a table row stands beside (paper_rows); a line
    an earlier block printed already is not repeated (Tables 1, 3 and 4 share numbers)."""
    lines = []
    for key in paper_rows(results[0]):
        # Table 2 at one threshold only
        if key[0] == "paper-table2" and metric != "threshold":
            continue
        header, *block = paper_block(results, key)
        shown = [line for line in block if line not in lines]
        if not shown:
            shown.append("  the paper's numbers and ours as printed above")
        elif len(shown) < len(block):
            shown.append("  (the other lines as printed above)")
        lines += [header, *shown]
    return lines


def paper_block(results, key):
    """One row of the paper beside ours: per fold (where the paper gives folds) fold_line; the mean
    over folds 0-3, and FB-IoU where the paper gives it (Tables 3-4), once all four folds are
    here."""
    paper = reference(*key)
    lines = [f"Beside the paper (Table {key[0][-1]}, {key[1]} {key[2]} {key[3]} {key[4]}-shot):"]
    folds = {}  # {fold: its files}
    for f in range(4):
        rs = [r for r in results if r["fold"] == f]
        if rs:
            folds[f] = rs
    for f, rs in folds.items():
        if paper["folds"][f] is not None:
            lines.append(fold_line(f, rs, paper["folds"][f]))
    return lines + mean_lines(folds, paper)


def fold_line(f, rs, theirs):
    """Ours on fold f (the mean of its files), the paper's, the difference, our seeds' spread
    (training seeds if several files, else evaluation seeds) with the paper inside or not, and BAM
    test.py's best seed."""
    several = len(rs) > 1
    seeds = [r["miou"] for r in rs] if several else [s["miou"] for s in rs[0]["per_seed"]]
    best = max(s["miou"] for r in rs for s in r["per_seed"])
    mean = float(np.mean([r["miou"] for r in rs]))
    inside = min(seeds) <= theirs <= max(seeds)
    return (
        f"  fold {f}: ours {mean:.2f} ({'training' if several else 'evaluation'} seeds "
        f"{min(seeds):.2f}-{max(seeds):.2f}), paper {theirs:.2f}, difference "
        f"{mean - theirs:+.2f}: {'inside' if inside else 'outside'} the spread of our seeds; "
        f"best of the evaluation seeds (BAM test.py's Best_mIoU) {best:.2f}"
    )


def mean_lines(folds, paper):
    """Our mean over folds 0-3 beside the paper's, and FB-IoU (each fold's the mean of its files')
    where the paper gives it; with folds missing, only the paper's numbers of a row without folds
    (Table 3)."""
    if len(folds) < 4:
        if paper["folds"][0] is not None:
            return []
        present = ", ".join(str(f) for f in folds)
        return [
            f"  mean: paper {paper['all']:.2f}, FB-IoU {paper['fb_iou']:.2f}, over folds 0-3; "
            f"ours has fold {present} only"
        ]
    mean = float(np.mean([np.mean([r["miou"] for r in rs]) for rs in folds.values()]))
    difference = mean - paper["all"]
    lines = [f"  mean: ours {mean:.2f}, paper {paper['all']:.2f}, difference {difference:+.2f}"]
    fb_ious = [[r.get("fb_iou") for r in rs] for rs in folds.values()]
    if paper["fb_iou"] is not None and None not in sum(fb_ious, []):
        fb_iou = float(np.mean([np.mean(values) for values in fb_ious]))
        lines.append(
            f"  FB-IoU: ours {fb_iou:.2f}, paper {paper['fb_iou']:.2f}, difference "
            f"{fb_iou - paper['fb_iou']:+.2f}"
        )
    return lines


# ============ 5. Is a gap real? Paired differences between two rows of a table ============
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 2000  # fixed: the same files always print the same intervals
# the paper's comparisons, row A - row B: Tables 1-2, Table 3's components, Table 4's K
COMPARISONS = (
    ("BCPT", "Standard"),
    ("BCPT", "ImageNet"),
    ("Standard", "ImageNet"),
    ("BMC", "Standard"),
    ("BMC+OCG", "BMC"),
    ("K=6", "K=2"),
    ("K=6", "K=3"),
)


class NoInterval(Exception):
    """Why two cells of a table cannot be compared episode by episode."""


def seed_episodes(r, metric):
    """A results file's episodes per evaluation seed (episode_columns) behind the number its cell
    shows: a non-parametric file's at --threshold or at the base-chosen threshold."""
    key = "per_episode"
    if r.get("method") == "non-parametric prior" and metric == "base-threshold":
        key = "per_episode_base_threshold"
    elif r.get("method") == "non-parametric prior" and metric != "threshold":
        raise NoInterval(f"--table-metric {metric} takes each file's own threshold: no episodes")
    if r.get(key) is None:
        raise NoInterval("a file holds no per-episode numbers (written before the kit kept them)")
    return r[key]


def stacked_episodes(results, metric):
    """The episodes of several results files (both rows' training seeds), which must be the same
    episodes (evaluation seed, query and class, in order). -> (the test's classes, per evaluation
    seed (class (E,), foreground intersection (F, E), foreground union (F, E)))."""
    tables = [seed_episodes(r, metric) for r in results]
    try:
        identities = [episode_identity(r, t) for r, t in zip(results, tables, strict=True)]
        if any(identity != identities[0] for identity in identities):
            raise NoInterval("the files' episodes differ (evaluation seeds, queries or classes)")
        per_seed = []
        for columns in zip(*tables, strict=True):
            cls = np.array(columns[0]["class"])
            inter = np.array([c["fg_inter"] for c in columns], dtype=np.float64)
            union = np.array([c["fg_union"] for c in columns], dtype=np.float64)
            per_seed.append((cls, inter, union))
    except (KeyError, TypeError, ValueError) as e:
        raise NoInterval(f"unreadable per-episode numbers ({type(e).__name__}: {e})") from None
    if not per_seed:
        raise NoInterval("the files hold no evaluation seed")
    # the test's classes, those without an episode too (they count 0, as in common.FewShotIoU)
    classes = sorted({int(c) for c in results[0].get("class_iou", {})})
    if not classes:  # a file without class IoUs: the classes of its episodes
        classes = sorted({int(c) for cls, _, _ in per_seed for c in cls})
    return classes, per_seed


def episode_identity(r, table):
    """What makes two files' episodes the same: per evaluation seed, the seed and the (query,
    class) of each episode."""
    seeds = [s["seed"] for s in r["per_seed"]]
    episodes = [list(zip(c["query"], c["class"], strict=True)) for c in table]
    return list(zip(seeds, episodes, strict=True))


def class_mean_iou(inter, union):
    """mIoU in % as common.FewShotIoU: class IoU = summed intersection / summed union, averaged
    over the last axis (the classes)."""
    return (100 * inter / (union + 1e-10)).mean(-1)


def observed_mious(classes, per_seed):
    """Each file's mIoU from its episodes, (F,): every episode once, averaged over the evaluation
    seeds (the file's "miou")."""
    total = 0.0
    for cls, inter, union in per_seed:
        sums_i = np.stack([inter[:, cls == c].sum(1) for c in classes], 1)  # (F, C)
        sums_u = np.stack([union[:, cls == c].sum(1) for c in classes], 1)
        total = total + class_mean_iou(sums_i, sums_u)
    return total / len(per_seed)


def resampled_mious(classes, per_seed, draws, rng):
    """Each file's mIoU in each resample, (F, B): draws (B, C) are the resampled classes (indices
    into classes); per evaluation seed each drawn class gets its own resample of that class's
    episodes in the seed, the same indices for every file (paired)."""
    n_files = per_seed[0][1].shape[0]
    total = np.zeros((n_files, draws.shape[0]))
    for cls, inter, union in per_seed:
        sums_i = np.zeros((n_files, *draws.shape))
        sums_u = np.zeros((n_files, *draws.shape))
        for k, c in enumerate(classes):
            slots = draws == k  # (B, C): where class c was drawn
            members = np.flatnonzero(cls == c)
            if members.size == 0:  # no episode of the class: IoU 0
                continue
            counts = resample_counts(rng, slots.sum(), members.size)  # (drawn, episodes)
            sums_i[:, slots] = inter[:, members] @ counts.T
            sums_u[:, slots] = union[:, members] @ counts.T
        total += class_mean_iou(sums_i, sums_u)
    return total / len(per_seed)


def resample_counts(rng, rows, n):
    """How often each of n items is drawn in each of `rows` resamples of n with replacement,
    (rows, n) in float64 (a product with the items' numbers sums the resample)."""
    draws = rng.integers(0, n, size=(rows, n))
    flat = draws + n * np.arange(rows)[:, None]  # each resample its own n bins
    return np.bincount(flat.ravel(), minlength=rows * n).reshape(rows, n).astype(np.float64)


def training_means(mious_a, mious_b, rng):
    """Each row's mean over its resampled training seeds (files), (B,) each: the same indices for
    both rows when they have as many files, else drawn for each row."""
    n_a, resamples = mious_a.shape
    n_b = mious_b.shape[0]
    pick_a = rng.integers(0, n_a, size=(resamples, n_a))
    pick_b = pick_a
    if n_b != n_a:
        pick_b = rng.integers(0, n_b, size=(resamples, n_b))
    column = np.arange(resamples)[:, None]
    return mious_a[pick_a, column].mean(1), mious_b[pick_b, column].mean(1)


def paired_bootstrap(cell_a, cell_b, metric="threshold", seed=BOOTSTRAP_SEED, resamples=None):
    """The difference in mIoU, row A - row B, of two table cells of the same test (dataset, fold,
    shot; each a list of results files, one per training seed) and its bootstrap distribution.

    Method (a paired, hierarchical percentile bootstrap): every file of both cells must hold the
    same episodes (evaluation seed, query, class: the episodes are drawn from the seed and the val
    list only, so every backbone meets the same ones). One resample draws the test's classes with
    replacement; per evaluation seed, each drawn class its episodes of that seed with replacement;
    and the training seeds (files) of each cell with replacement (the same indices for both rows
    when they have as many files, else drawn for each). Both rows use the same class and episode
    indices (paired), so what the rows share (hard classes, hard queries) cancels. A file's mIoU is
    recomputed from the resampled episodes exactly as common.FewShotIoU does (class IoU = summed
    intersection / summed union over the class's episodes, mIoU = the mean over the drawn classes),
    averaged over the evaluation seeds; a cell's is the mean over its drawn files. The 95% interval
    holds the 2.5th to 97.5th percentiles of the resampled differences (BOOTSTRAP_RESAMPLES,
    default-seeded by BOOTSTRAP_SEED: the same files give the same interval). A gap whose interval
    excludes 0 is unlikely to be an accident of these classes, episodes and training seeds; the
    interval says nothing about folds, datasets or settings not run. -> {"difference", "low",
    "high", "replicates" (B,), "classes", "episodes" (per seed), "seeds", "training": (files of A,
    files of B)}."""
    resamples = resamples or BOOTSTRAP_RESAMPLES
    classes, per_seed = stacked_episodes([*cell_a, *cell_b], metric)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(classes), size=(resamples, len(classes)))
    mious = resampled_mious(classes, per_seed, draws, rng)
    n_a = len(cell_a)
    mean_a, mean_b = training_means(mious[:n_a], mious[n_a:], rng)
    observed = observed_mious(classes, per_seed)
    replicates = mean_a - mean_b
    low, high = np.percentile(replicates, [2.5, 97.5])
    return {
        "difference": float(observed[:n_a].mean() - observed[n_a:].mean()),
        "low": float(low),
        "high": float(high),
        "replicates": replicates,
        "classes": len(classes),
        "episodes": [len(cls) for cls, _, _ in per_seed],
        "seeds": len(per_seed),
        "training": (n_a, len(cell_b)),
    }


def gap_text(difference, low, high, how):
    """'+2.31 mIoU, 95% interval [+0.84, +3.77] (how): excludes 0'."""
    verdict = "includes 0"
    # as printed: an interval shown as [+0.00, ...] includes 0
    if round(low, 2) > 0 or round(high, 2) < 0:
        verdict = "excludes 0"
    return f"{difference:+.2f} mIoU, 95% interval [{low:+.2f}, {high:+.2f}] ({how}): {verdict}"


def bootstrap_sizes(gap):
    """What a fold's resamples were drawn from, in words."""
    counts = sorted(set(gap["episodes"]))
    episodes = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    n_a, n_b = gap["training"]
    training = f"{n_a}" if n_a == n_b else f"{n_a} and {n_b}"
    seeds = "training seed" if n_a == n_b == 1 else "training seeds"
    evaluation_seeds = "evaluation seed" if gap["seeds"] == 1 else "evaluation seeds"
    return (
        f"paired bootstrap over {gap['classes']} classes, {episodes} episodes x {gap['seeds']} "
        f"{evaluation_seeds}, {training} {seeds}"
    )


def fold_gap(cell_a, cell_b, metric, seed):
    """One fold's comparison in words, and its paired_bootstrap (None where the cells cannot be
    paired: then the difference of the cells as the table shows them)."""
    try:
        gap = paired_bootstrap(cell_a, cell_b, metric, seed)
    except NoInterval as e:
        shown_a = np.mean([shown_value(r, metric) for r in cell_a])
        shown_b = np.mean([shown_value(r, metric) for r in cell_b])
        return f"{shown_a - shown_b:+.2f} mIoU; no interval: {e}", None
    how = bootstrap_sizes(gap)
    return gap_text(gap["difference"], gap["low"], gap["high"], how), gap


def mean_gap(gaps):
    """The comparison over the folds in `gaps` ({fold: paired_bootstrap}), in words: the mean of
    the folds' differences, each resample the mean of the folds' resamples (the folds' classes
    are resampled separately)."""
    difference = float(np.mean([g["difference"] for g in gaps.values()]))
    replicates = np.mean([g["replicates"] for g in gaps.values()], 0)
    low, high = np.percentile(replicates, [2.5, 97.5])
    how = "paired bootstrap within each fold"
    return gap_text(difference, float(low), float(high), how)


def fold_names(folds):
    """'folds 0-3' or 'folds 0, 2'."""
    if list(folds) == [0, 1, 2, 3]:
        return "folds 0-3"
    return "folds " + ", ".join(str(f) for f in folds)


def pair_lines(results_a, results_b, name, metric):
    """The comparison `name` ('BCPT - Standard') of two rows' files: per shot both rows have, a
    line per fold both have and one for the mean over those folds (two or more)."""
    lines = []
    shots = sorted({r["shot"] for r in results_a} & {r["shot"] for r in results_b})
    for shot in shots:
        gaps = {}  # {fold: paired_bootstrap}
        for f in range(4):
            cell_a = [r for r in results_a if (r["shot"], r["fold"]) == (shot, f)]
            cell_b = [r for r in results_b if (r["shot"], r["fold"]) == (shot, f)]
            if not (cell_a and cell_b):
                continue
            text, gap = fold_gap(cell_a, cell_b, metric, (BOOTSTRAP_SEED, shot, f))
            lines.append(f"  {name}, fold {f}, {shot}-shot: {text}")
            if gap is not None:
                gaps[f] = gap
        if len(gaps) > 1:
            lines.append(f"  {name}, mean of {fold_names(gaps)}, {shot}-shot: {mean_gap(gaps)}")
    return lines


def comparison_start(label):
    """Where a row's training started: the worlds' ImageNet stand-in or not. Two rows are compared
    only from the same start (and the same model selection)."""
    stand_in = label == "imagenet stand-in" or label.endswith(" from stand-in")
    return "stand-in" if stand_in else "imagenet"


def comparison_names(label):
    """The paper's names of a row for the comparisons: paper_names over all tables, where on the
    worlds the ImageNet stand-in is the ImageNet row and the rows started from it are the paper's
    Standard and BCPT."""
    if label == "imagenet stand-in":
        label = "imagenet"
    label = label.removesuffix(" from stand-in")
    return set(paper_names(label).values())


def compared_rows(files):
    """[(name A, row A, name B, row B)] for each of COMPARISONS between two rows of one table
    (dataset, backbone, method and test geometry alike) from the same start and model selection
    (an ImageNet row has none)."""
    named = {}  # {(table, start): {name: [rows]}}
    for row in sorted(files):
        label = files[row][0]["pretrained"]
        # the row's last word is its test geometry where not pfenet (format_table)
        geometry = row[3][len(label) :]
        table = (*row[:3], geometry, comparison_start(label))
        for name in comparison_names(label):
            named.setdefault(table, {}).setdefault(name, []).append(row)
    pairs = []
    for rows in named.values():
        for a, b in COMPARISONS:
            for row_a, row_b in itertools.product(rows.get(a, []), rows.get(b, [])):
                if same_selection(row_a[3], row_b[3], b):
                    pairs.append((a, row_a, b, row_b))
    return pairs


def same_selection(label_a, label_b, name_b):
    """Whether two rows' models were selected alike (best-val or not); an ImageNet row B has no
    selection."""
    best_a = "best-val" in label_a.split()
    best_b = "best-val" in label_b.split()
    return name_b == "ImageNet" or best_a == best_b


def gap_lines(files, metric):
    """After the tables: is a gap between two rows real? For each of the paper's comparisons whose
    both rows are here, a line per fold and shot and one for the mean over the folds
    (paired_bootstrap), under a line naming the rows."""
    lines = []
    for name_a, row_a, name_b, row_b in compared_rows(files):
        table = " ".join(row_a[:3])
        lines.append(f"{table}: {name_a} = {row_a[3]}, {name_b} = {row_b[3]}")
        lines += pair_lines(files[row_a], files[row_b], f"{name_a} - {name_b}", metric)
    if lines:
        lines.insert(0, "Is a gap real? Row A - row B in mIoU, 95% paired bootstrap interval:")
    return lines
