"""evaluate.py: the few-shot test of a metatrain.py checkpoint (paper Sec. 3.2, Table 1; PROTOCOL.md
5, 6, 8).

Episodes: --episodes per seed, drawn up front from the seed (the same for any worker count), walking
the fold's val list in order; test geometry of PROTOCOL.md 5, batch 1. Reports per seed and mean +-
std over the seeds (never a "best seed"): mIoU (per-class IoU over the novel classes) and FB-IoU in
percent, episodes/s and the share of time spent in the model. Dataset, fold, shot, backbone and data
root come from the checkpoint; a typed flag that disagrees is refused.

Outputs: --json FILE (README "Results files"), --vis DIR (Fig. 2-style PNGs; with --compare, the two
predictions side by side). --table FILE... prints Tables 1 and 2 from the JSON files of this script
and of nonparametric_eval.py.

Full run (PASCAL-5i, BAM's five seeds x 1000 episodes):
    python evaluate.py --checkpoint runs/meta-f0/last.pt --json results/bcpt-f0-1shot.json
CPU smoke run on the built-in synthetic benchmark:
    python evaluate.py --checkpoint runs/metatrain-synthetic-fold0-1shot/last.pt --episodes 100 --seeds 510
"""

import functools
import os
import re

import cv2
import numpy as np
import torch

from common import (
    AsppPFENet,
    EpisodeDataset,
    KitError,
    build_backbone,
    load_checkpoint,
    to_bgr_image,
)
from evaluation import (
    TABLE_METRICS,
    argmax_mask,
    evaluate_seeds,
    format_table,
    predict_meta,
    pretrain_label,
    write_results,
)
from own_images import add_own_image_args, segment_own_images
from plumbing import (
    AMP_DTYPES,
    POSITIVE,
    KitParser,
    add_common_args,
    add_eval_args,
    check_paths,
    finish_args,
    is_main,
    open_data,
    parse_json_line,
    run,
)

FROM_CHECKPOINT = (
    "dataset",
    "fold",
    "shot",
    "backbone",
    "weights",
    "data_root",
    "min_pixels",
    "test_size",
    "test_geometry",
    "train_pool",
    "coco_split",
)  # each taken from the checkpoint unless typed
MUST_MATCH = ("dataset", "fold", "shot", "backbone", "weights")  # refused if typed and different


def parse_args(argv):
    p = add_common_args(KitParser(__doc__), None, "evaluate")  # no data or model defaults
    p = add_own_image_args(add_eval_args(p))
    p.add_argument("--checkpoint", help="metatrain.py's <out>/last.pt (or best.pt)")
    p.add_argument(
        "--shot",
        type=POSITIVE,
        help="supports per episode (default: the checkpoint's; another is refused)",
    )
    p.add_argument(
        "--compare",
        help="a second metatrain.py checkpoint (same dataset, fold, shot) drawn next to "
        "--checkpoint's predictions in --vis (e.g. Standard vs BCPT, Fig. 2)",
    )
    p.add_argument(
        "--vis",
        help="write Fig. 2-style PNGs of the first --vis-count episodes of the first seed here",
    )
    p.add_argument(
        "--vis-count",
        type=POSITIVE,
        default=8,
        help="episodes drawn by --vis (default %(default)s)",
    )
    p.add_argument(
        "--table",
        nargs="+",
        metavar="JSON",
        help="only print a paper-style table from results files of this script and "
        "nonparametric_eval.py (Tables 1 and 2), with the paper's numbers beside its rows",
    )
    p.add_argument(
        "--table-metric",
        default="threshold",
        choices=list(TABLE_METRICS),
        help="a non-parametric file's cell: mIoU at its --threshold, the base-chosen one or the "
        "best of its sweep (default %(default)s)",
    )
    p.add_argument(
        "--curves",
        nargs="+",
        metavar="LOG",
        help="only draw training curves from these log.jsonl files into --out (a PNG; default "
        "curves.png): loss, lr, training mIoU, cluster shares, validation mIoU",
    )
    return p.parse_args(argv)


def metatrain_checkpoint(path, expect):
    """load_checkpoint, refusing anything but metatrain.py's output."""
    ckpt = load_checkpoint(path, expect)
    if not isinstance(ckpt, dict) or ckpt.get("stage") != "metatrain":
        stage = ckpt.get("stage") if isinstance(ckpt, dict) else None
        raise KitError(
            f"{path} is not a metatrain.py checkpoint (stage {stage!r}): pass metatrain's "
            "<out>/last.pt; backbones alone are scored by nonparametric_eval.py"
        )
    return ckpt


def load_model(ckpt, device):
    """AsppPFENet with the checkpoint's weights, backbone included (metatrain.py saves the whole
    model)."""
    a = ckpt["args"]
    model = AsppPFENet(
        build_backbone(a["backbone"], "none"), a["shot"], a.get("shot_fusion", "mean")
    )
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device).eval()


# ============ Fig. 2-style pictures: support + mask, query + ground truth, prediction(s)
# ============
def panel(x, mask, colour, title):
    """x (3, s, s) normalised canvas, mask (s, s) -> BGR uint8 panel, mask==1 tinted, with a title
    bar."""
    img = to_bgr_image(x).astype(np.float64)  # (s, s, 3)
    img = np.where(
        (mask.numpy() == 1)[..., None], 0.45 * img + 0.55 * np.array(colour), img
    ).astype(np.uint8)
    img = cv2.resize(
        img,
        None,
        fx=max(1, 256 // img.shape[0]),
        fy=max(1, 256 // img.shape[0]),
        interpolation=cv2.INTER_NEAREST,
    )  # small synthetic canvases drawn larger
    bar = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


@torch.no_grad()
def write_vis(args, data, models, device):
    ids, counts = data["val"]  # the first episodes of the first seed: the same ones the scores use
    ds = EpisodeDataset(
        args.data_root,
        ids,
        counts,
        args.dataset,
        args.novel,
        args.shot,
        args.min_pixels,
        args.seeds[0],
        test_size=args.test_size,
        episodes=args.vis_count,
        geometry=args.test_geometry,
    )
    os.makedirs(args.vis, exist_ok=True)
    for k in range(len(ds)):
        it = ds[k]
        row = [
            panel(
                it["support"][0],
                it["support_mask"][0],
                (0, 200, 255),
                f"support (class {it['cls']})",
            ),
            panel(it["query"], it["query_mask"], (0, 220, 0), "query + ground truth"),
        ]
        for name, model in models.items():
            logits = model(
                it["query"][None].to(device),
                it["support"][None].to(device),
                it["support_mask"][None].to(device),
            )  # (1, 2, s, s)
            row.append(panel(it["query"], logits.argmax(1)[0].cpu(), (255, 80, 0), name))
        cv2.imwrite(
            os.path.join(args.vis, f"episode{k:03d}_class{it['cls']}.png"), np.concatenate(row, 1)
        )
    print(f"wrote {len(ds)} pictures to {args.vis}")


# ============ your own images, and training curves ============
@torch.no_grad()
def own_images(args, ckpt, model, dtype):
    """Each --query segmented with the --support examples, in the benchmark's test geometry and
    normalisation."""
    shots, trained = len(args.support or []), ckpt["args"]["shot"]
    if shots and shots != trained and ckpt["args"].get("shot_fusion") == "weighted":
        raise KitError(
            f"{args.checkpoint} weighs exactly {trained} supports (--shot-fusion weighted): pass "
            f"{trained} --support pairs"
        )
    if shots and shots != trained:
        print(
            f"note: this model was meta-trained {trained}-shot; it runs {shots}-shot here (mean "
            "over the supports)"
        )
    segment_own_images(
        args, functools.partial(predict_meta, model), dtype, lambda s: (s.argmax(0).numpy(), None)
    )


CURVES = [
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("train_miou", "training mIoU (base-class episodes)"),
    ("clusters", "share of the background pixels per cluster centre (BCPT)"),
    ("val_miou", "validation mIoU"),
]


def draw_curves(paths, out):
    """One panel per quantity found in the logs, one line per run (its folder name), against the
    iteration. matplotlib is an optional extra, imported only here. -> the panel titles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KitError(
            "--curves draws with matplotlib, an optional extra: pip install matplotlib"
        ) from None
    runs = {}
    for path in paths:
        with open(path) as f:
            records = [parse_json_line(line) for line in f]
        if None in records[:-1]:  # a last line may have been cut off by a kill
            raise KitError(
                f"--curves {path}: line {records.index(None) + 1} is not JSON: pass a log.jsonl "
                "of this kit"
            )
        runs[os.path.basename(os.path.dirname(os.path.abspath(path)))] = [r for r in records if r]
    panels = [
        (key, title)
        for key, title in CURVES
        if any(key in r for recs in runs.values() for r in recs)
    ]
    if not panels:
        raise KitError(f"--curves: no loss, lr, mIoU or cluster records in {', '.join(paths)}")
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False
    )
    for ax, (key, title) in zip(axes[:, 0], panels):
        for k, (name, recs) in enumerate(runs.items()):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            # cluster shares are a list per record: one thin line per centre, in the run's colour
            if pts:
                ys = np.array([y for _, y in pts], dtype=float).reshape(len(pts), -1)
                for j in range(ys.shape[1]):
                    ax.plot(
                        [x for x, _ in pts],
                        ys[:, j],
                        color=f"C{k}",
                        lw=1 if ys.shape[1] > 1 else 1.5,
                        marker="o" if key == "val_miou" else None,
                        label=name if j == 0 else None,
                    )
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    print(f"wrote {out}: " + ", ".join(title for _, title in panels))
    return [title for _, title in panels]


# ============ the evaluation ============
def main(argv=None):
    args = parse_args(argv)
    if args.table:
        return print(format_table(args.table, args.table_metric))
    if args.curves:
        args.out = args.out or "curves.png"
        check_paths(args, outputs=[("--out", False)], inputs=["--curves"])
        return draw_curves(args.curves, args.out)
    if not args.checkpoint:
        raise KitError(
            "--checkpoint is required (metatrain.py's <out>/last.pt), or --table FILE... to "
            "print a table"
        )
    if args.compare and not args.vis:
        raise KitError("--compare only adds a column to the pictures: add --vis DIR")
    typed = {k for k in FROM_CHECKPOINT if getattr(args, k) is not None}
    ckpt = metatrain_checkpoint(
        args.checkpoint, {k: getattr(args, k) for k in MUST_MATCH if k in typed}
    )
    for k in set(FROM_CHECKPOINT) - typed:
        setattr(
            args, k, ckpt["args"].get(k, "pfenet")
        )  # checkpoints from before --test-geometry: pfenet
    args = finish_args(
        args,
        needs_data=False,
        outputs=[("--json", False), ("--episode-log", False), ("--vis", True), ("--out", True)],
    )
    device = torch.device(args.device)
    model, dtype = load_model(ckpt, device), AMP_DTYPES[args.amp]
    if args.support or args.query:
        return own_images(args, ckpt, model, dtype)
    other = args.compare and metatrain_checkpoint(
        args.compare, {k: getattr(args, k) for k in MUST_MATCH[:3]}
    )
    label = args.label or ckpt["args"].get("pretrain_label") or pretrain_label(args.weights)
    print(
        f"evaluate {args.checkpoint} ({ckpt['select']} model, iteration {ckpt['iter']}): "
        f"{args.dataset} fold {args.fold} {args.shot}-shot, {args.backbone} pre-trained {label}, "
        f"{args.episodes} episodes x seeds {args.seeds}"
    )
    data = open_data(args, ("val",))
    if args.episode_log:
        open(args.episode_log, "w").close()
    with torch.no_grad():
        predict = functools.partial(predict_meta, model)
        result = evaluate_seeds(args, data, predict, {"ASPP-PFENet": argmax_mask}, dtype=dtype)[
            "ASPP-PFENet"
        ]
    if args.json:
        write_results(
            args.json,
            result,
            args,
            data,
            method="ASPP-PFENet",
            pretrained=label,
            weights=args.weights,
            select=ckpt["select"],
            checkpoint=args.checkpoint,
            iteration=ckpt["iter"],
            best_val=ckpt["best"],
            shot_fusion=ckpt["args"].get("shot_fusion", "mean"),
        )
    if args.vis and is_main():
        models = {f"prediction: {label}": model}
        if other:
            models[f"prediction: {other['args']['pretrain_label']} (compare)"] = load_model(
                other, device
            )
        write_vis(args, data, models, device)
    return result


if __name__ == "__main__":
    run(main)
