"""evaluate.py: the few-shot test of a metatrain.py checkpoint (paper Sec. 3.2, Table 1; PROTOCOL.md
5, 6, 8).

Episodes: --episodes per seed, drawn up front from the seed (the same for any worker count), walking
the fold's val list in order; test geometry of PROTOCOL.md 5, batch 1. Reports per seed and mean +-
std over the seeds (never a "best seed"): mIoU (per-class IoU over the novel classes) and FB-IoU in
percent, episodes/s and the share of time spent in the model. Dataset, fold, shot, backbone and data
root come from the checkpoint; a typed flag that disagrees is refused.

Outputs: --json FILE (README "Results files"), --vis DIR (Fig. 2-style PNGs; with --compare, the two
predictions side by side). --table FILE... prints Tables 1 and 2 from the JSON files of this script
and of nonparametric_eval.py, the paper's numbers beside their rows (Tables 1-4), and whether the
gaps between rows are real (a paired bootstrap over classes, episodes and training seeds).

Full run (PASCAL-5i, BAM's five seeds x 1000 episodes):
    python evaluate.py --checkpoint runs/meta-f0/last.pt --json results/bcpt-f0-1shot.json
CPU smoke run on the built-in synthetic benchmark:
    python evaluate.py --checkpoint runs/metatrain-synthetic-fold0-1shot/last.pt \\
        --episodes 100 --seeds 510
"""

import functools
import os

import cv2
import numpy as np
import torch

from common import AsppPFENet, KitError, build_backbone, load_checkpoint, to_bgr_image
from evaluation import (
    TABLE_METRICS,
    argmax_mask,
    eval_episodes,
    evaluate_seeds,
    format_table,
    predict_meta,
    pretrain_label,
    write_results,
)
from own_images import add_own_image_args, segment_own_images
from plumbing import (
    AMP_DTYPES,
    CURVES_MARK,
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
    save_text,
)

MUST_MATCH = ("dataset", "fold", "shot", "backbone", "weights")  # refused if typed and different
MAY_DIFFER = ("data_root", "min_pixels", "test_size", "test_geometry", "train_pool", "coco_split")
FROM_CHECKPOINT = MUST_MATCH + MAY_DIFFER  # each taken from the checkpoint unless typed


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
        "nonparametric_eval.py (Tables 1 and 2), with the paper's numbers beside its rows "
        "(Tables 1-4) and a 95%% interval for each of the paper's gaps between rows",
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
    stage = ckpt.get("stage") if isinstance(ckpt, dict) else None
    if stage != "metatrain":
        raise KitError(
            f"{path} is not a metatrain.py checkpoint (stage {stage!r}): pass metatrain's "
            "<out>/last.pt; backbones alone are scored by nonparametric_eval.py"
        )
    return ckpt


def load_model(ckpt, device):
    """AsppPFENet with the checkpoint's weights, backbone included (metatrain.py saves it all)."""
    a = ckpt["args"]
    backbone = build_backbone(a["backbone"], "none")  # the checkpoint holds its weights
    model = AsppPFENet(backbone, a["shot"], a.get("shot_fusion", "mean"))
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device).eval()


# ============ Fig. 2-style pictures: support + mask, query + ground truth, predictions ============
def panel(x, mask, colour, title):
    """x (3, s, s) normalised canvas, mask (s, s) -> BGR uint8 panel, mask==1 tinted, titled."""
    img = to_bgr_image(x).astype(np.float64)  # (s, s, 3)
    tinted = 0.45 * img + 0.55 * np.array(colour)
    img = np.where((mask.numpy() == 1)[..., None], tinted, img).astype(np.uint8)
    zoom = max(1, 256 // img.shape[0])  # small synthetic canvases drawn larger
    img = cv2.resize(img, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
    bar = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


@torch.no_grad()
def write_vis(args, data, models):
    """One picture per episode: the first --vis-count of the first seed, the ones the scores use."""
    ds = eval_episodes(args, data, args.seeds[0], args.vis_count, args.novel)
    os.makedirs(args.vis, exist_ok=True)
    for k in range(len(ds)):
        it = ds[k]
        support_title = f"support (class {it['cls']})"
        row = [
            panel(it["support"][0], it["support_mask"][0], (0, 200, 255), support_title),
            panel(it["query"], it["query_mask"], (0, 220, 0), "query + ground truth"),
        ]
        batch = torch.utils.data.default_collate([it])  # an episode of batch 1
        for name, model in models.items():
            scores = predict_meta(model, batch)  # (1, 2, s, s)
            row.append(panel(it["query"], argmax_mask(scores).cpu(), (255, 80, 0), name))
        path = os.path.join(args.vis, f"episode{k:03d}_class{it['cls']}.png")
        cv2.imwrite(path, np.concatenate(row, 1))
    print(f"wrote {len(ds)} pictures to {args.vis}")


# ============ your own images, and training curves ============
@torch.no_grad()
def own_images(args, ckpt, model, dtype):
    """Each --query segmented with the --support pairs, in the test geometry and normalisation."""
    shots = len(args.support or [])
    trained = ckpt["args"]["shot"]
    if shots and shots != trained:
        if ckpt["args"].get("shot_fusion") == "weighted":
            raise KitError(
                f"{args.checkpoint} weighs exactly {trained} supports (--shot-fusion weighted): "
                f"pass {trained} --support pairs"
            )
        print(
            f"note: this model was meta-trained {trained}-shot; it runs {shots}-shot here (mean "
            "over the supports)"
        )
    segment_own_images(args, functools.partial(predict_meta, model), dtype, above_zero)


def above_zero(score):
    """The foreground-minus-background logit (H, W) -> (the mask: the argmax, no heat map)."""
    return (score > 0).numpy().astype(np.uint8), None


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
        import matplotlib.pyplot as plt
    except ImportError:
        raise KitError(
            "--curves draws with matplotlib, an optional extra: pip install matplotlib"
        ) from None
    plt.switch_backend("Agg")  # files only, no window
    runs = {}
    for path in paths:
        with open(path) as f:
            records = [parse_json_line(line) for line in f]
        if None in records[:-1]:  # a last line may have been cut off by a kill
            raise KitError(
                f"--curves {path}: line {records.index(None) + 1} is not JSON: pass a log.jsonl "
                "of this kit"
            )
        name = os.path.basename(os.path.dirname(os.path.abspath(path)))  # the run's folder
        runs[name] = [r for r in records if r]
    found = {key for records in runs.values() for r in records for key in r}
    panels = [(key, title) for key, title in CURVES if key in found]
    if not panels:
        raise KitError(f"--curves: no loss, lr, mIoU or cluster records in {', '.join(paths)}")
    n = len(panels)
    fig, axes = plt.subplots(n, 1, figsize=(8, 2.4 * n), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels, strict=True):
        for k, (name, records) in enumerate(runs.items()):
            shown = [r for r in records if key in r]
            if not shown:
                continue
            steps = [r["step"] for r in shown]
            # cluster shares are a list per record: one thin line per centre, in the run's colour
            ys = np.array([r[key] for r in shown], dtype=float).reshape(len(shown), -1)
            lw = 1 if ys.shape[1] > 1 else 1.5
            marker = "o" if key == "val_miou" else None
            for j in range(ys.shape[1]):
                label = name if j == 0 else None  # one legend entry per run
                ax.plot(steps, ys[:, j], color=f"C{k}", lw=lw, marker=marker, label=label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("iteration")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90, metadata={"Software": CURVES_MARK})  # marks the file as the kit's
    plt.close(fig)
    titles = [title for _, title in panels]
    print(f"wrote {out}: " + ", ".join(titles))
    return titles


# ============ the evaluation ============
def checkpoint_of(args):
    """The --checkpoint; its flags go into args unless typed (refused if typed and different)."""
    if not args.checkpoint:
        raise KitError(
            "--checkpoint is required (metatrain.py's <out>/last.pt), or --table FILE... to "
            "print a table"
        )
    if args.compare and not args.vis:
        raise KitError("--compare only adds a column to the pictures: add --vis DIR")
    typed = {k for k in FROM_CHECKPOINT if getattr(args, k) is not None}
    expect = {k: getattr(args, k) for k in MUST_MATCH if k in typed}
    ckpt = metatrain_checkpoint(args.checkpoint, expect)
    for k in set(FROM_CHECKPOINT) - typed:
        # checkpoints from before --test-geometry: pfenet
        setattr(args, k, ckpt["args"].get(k, "pfenet"))
    return ckpt


@torch.no_grad()
def few_shot_test(args, ckpt, model, dtype):
    """The episodes of every seed, --json and --vis. -> the summary (evaluation.summarize)."""
    other = None  # the --compare checkpoint
    if args.compare:
        other = metatrain_checkpoint(args.compare, {k: getattr(args, k) for k in MUST_MATCH[:3]})
    label = args.label or ckpt["args"].get("pretrain_label") or pretrain_label(args.weights)
    print(
        f"evaluate {args.checkpoint} ({ckpt['select']} model, iteration {ckpt['iter']}): "
        f"{args.dataset} fold {args.fold} {args.shot}-shot, {args.backbone} pre-trained {label}, "
        f"{args.episodes} episodes x seeds {args.seeds}"
    )
    data = open_data(args, ("val",))
    if args.episode_log:
        save_text("", args.episode_log)  # empty: evaluate_seeds appends each seed's episodes
    predict = functools.partial(predict_meta, model)
    results = evaluate_seeds(args, data, predict, {"ASPP-PFENet": argmax_mask}, dtype=dtype)
    result = results["ASPP-PFENet"]
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
            compared = f"prediction: {other['args']['pretrain_label']} (compare)"
            models[compared] = load_model(other, torch.device(args.device))
        write_vis(args, data, models)
    return result


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(format_table(args.table, args.table_metric))
        return None
    if args.curves:
        args.out = args.out or "curves.png"
        check_paths(args, outputs=[("--out", "curves")], inputs=["--curves"])
        return draw_curves(args.curves, args.out)
    ckpt = checkpoint_of(args)
    outputs = [
        ("--json", "results:ASPP-PFENet"),
        ("--episode-log", "episodes"),
        ("--vis", "pictures"),
        ("--out", "own images"),
    ]
    args = finish_args(args, needs_data=False, outputs=outputs)
    model = load_model(ckpt, torch.device(args.device))
    dtype = AMP_DTYPES[args.amp]
    if args.support or args.query:
        return own_images(args, ckpt, model, dtype)
    return few_shot_test(args, ckpt, model, dtype)


if __name__ == "__main__":
    run(main)
