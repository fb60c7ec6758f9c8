"""evaluate.py: the few-shot test of a metatrain.py checkpoint (paper Sec. 3.2, Table 1; PROTOCOL.md 5, 6, 8).

Episodes: --episodes per seed, drawn up front from the seed (the same for any worker count), walking the
fold's val list in order; test geometry of PROTOCOL.md 5 (keep-aspect resize to --test-size, logits
resized to the original label size, 255 ignored), batch 1. Reports per seed and mean +- std over the seeds
(never a "best seed"): mIoU (per-class IoU over the novel classes) and FB-IoU in percent, episodes/s and
the share of time spent in the model. Dataset, fold, shot, backbone and data root come from the checkpoint;
a flag passed explicitly that disagrees with it is refused.

Outputs: --json FILE (README "Results files"), --vis DIR (Fig. 2-style PNGs; with --compare, the two
predictions side by side), --table FILE... (a Table 1-style table from several JSON files).

Full run (PASCAL-5i, BAM's five seeds x 1000 episodes):
    python evaluate.py --checkpoint runs/meta-f0/last.pt --json results/bcpt-f0-1shot.json
CPU smoke run on the built-in synthetic benchmark:
    python evaluate.py --checkpoint runs/metatrain-synthetic-fold0-1shot/last.pt --episodes 100 --seeds 510
"""
import functools
import os

import cv2
import numpy as np
import torch

from common import (AsppPFENet, EpisodeDataset, KitError, argmax_mask, at_query_size, build_backbone, load_checkpoint,
                    open_data, predict_meta, to_bgr_image)
from plumbing import (POSITIVE, KitParser, add_common_args, add_eval_args, amp_dtype, autocast_call, check_paths,
                      dataset_of, evaluate_seeds, finish_args, format_table, is_main, parse_json_line, pretrain_label,
                      run, write_results)
from prepare_data import own_episodes, write_user_prediction

FROM_CHECKPOINT = ("dataset", "fold", "shot", "backbone", "weights", "data_root", "min_pixels", "test_size",
                   "test_geometry", "train_pool", "coco_split")  # each taken from the checkpoint unless typed
MUST_MATCH = ("dataset", "fold", "shot", "backbone", "weights")  # refused if typed and different


def parse_args(argv):
    p = add_eval_args(add_common_args(KitParser(description=__doc__.split("\n")[0]), dataset_of(argv), "evaluate"))
    p.add_argument("--checkpoint", help="metatrain.py's <out>/last.pt (or best.pt)")
    p.add_argument("--shot", type=POSITIVE, help="supports per episode; must match the checkpoint (default: the "
                   "checkpoint's)")
    p.add_argument("--compare", help="a second metatrain.py checkpoint (same dataset, fold, shot) drawn next to "
                                     "--checkpoint's predictions in --vis (e.g. Standard vs BCPT, Fig. 2)")
    p.add_argument("--vis", help="write Fig. 2-style PNGs of the first --vis-count episodes of the first seed here")
    p.add_argument("--vis-count", type=POSITIVE, default=8, help="episodes drawn by --vis (default %(default)s)")
    p.add_argument("--curves", nargs="+", metavar="LOG", help="only draw training curves from these log.jsonl files "
                   "into --out (a PNG; default curves.png): loss, lr, training mIoU, cluster shares, validation mIoU")
    return p.parse_args(argv)


def metatrain_checkpoint(path, expect):
    """load_checkpoint, refusing anything but metatrain.py's output."""
    ckpt = load_checkpoint(path, expect)
    if not isinstance(ckpt, dict) or ckpt.get("stage") != "metatrain":
        stage = ckpt.get("stage") if isinstance(ckpt, dict) else None
        raise KitError(f"{path} is not a metatrain.py checkpoint (stage {stage!r}): pass metatrain's "
                       "<out>/last.pt; backbones alone are scored by nonparametric_eval.py")
    return ckpt


def load_model(ckpt, device):
    """AsppPFENet with the checkpoint's weights, backbone included (metatrain.py saves the whole model)."""
    a = ckpt["args"]
    model = AsppPFENet(build_backbone(a["backbone"], "none"), a["shot"], a.get("shot_fusion", "mean"))
    model.load_state_dict(ckpt["model"], strict=True)
    return model.to(device).eval()


# ============ Fig. 2-style pictures: support + mask, query + ground truth, prediction(s) ============
def panel(x, mask, colour, title):
    """x (3, s, s) normalised canvas, mask (s, s) -> BGR uint8 panel, mask==1 tinted, with a title bar."""
    img = to_bgr_image(x).astype(np.float64)  # (s, s, 3)
    img = np.where((mask.numpy() == 1)[..., None], 0.45 * img + 0.55 * np.array(colour), img).astype(np.uint8)
    img = cv2.resize(img, None, fx=max(1, 256 // img.shape[0]), fy=max(1, 256 // img.shape[0]),
                     interpolation=cv2.INTER_NEAREST)  # small synthetic canvases drawn larger
    bar = np.full((22, img.shape[1], 3), 255, np.uint8)
    cv2.putText(bar, title, (4, 16), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([bar, img], 0)


@torch.no_grad()
def write_vis(args, data, models, device):
    ids, counts = data["val"]  # the first episodes of the first seed: the same ones the scores use
    ds = EpisodeDataset(args.data_root, ids, counts, args.dataset, args.novel, args.shot, args.min_pixels,
                        args.seeds[0], test_size=args.test_size, episodes=args.vis_count, geometry=args.test_geometry)
    os.makedirs(args.vis, exist_ok=True)
    for k in range(len(ds)):
        it = ds[k]
        row = [panel(it["support"][0], it["support_mask"][0], (0, 200, 255), f"support (class {it['cls']})"),
               panel(it["query"], it["query_mask"], (0, 220, 0), "query + ground truth")]
        for name, model in models.items():
            logits = model(it["query"][None].to(device), it["support"][None].to(device),
                           it["support_mask"][None].to(device))  # (1, 2, s, s)
            row.append(panel(it["query"], logits.argmax(1)[0].cpu(), (255, 80, 0), name))
        cv2.imwrite(os.path.join(args.vis, f"episode{k:03d}_class{it['cls']}.png"), np.concatenate(row, 1))
    print(f"wrote {len(ds)} pictures to {args.vis}")


# ============ your own images, and training curves ============
@torch.no_grad()
def segment_own_images(args, ckpt, model, dtype):
    """Each --query segmented with the --support examples, in the benchmark's test geometry and normalisation."""
    if not (args.support and args.query and args.out):
        raise KitError("your own images need --support IMAGE MASK (once per shot), --query IMAGE... and --out DIR")
    if not is_main():  # under torchrun, rank 0 does it all
        return
    shots, trained = len(args.support), ckpt["args"]["shot"]
    if shots != trained and ckpt["args"].get("shot_fusion") == "weighted":
        raise KitError(f"{args.checkpoint} weighs exactly {trained} supports (--shot-fusion weighted): pass "
                       f"{trained} --support pairs")
    if shots != trained:
        print(f"note: this model was meta-trained {trained}-shot; it runs {shots}-shot here (mean over the supports)")
    for name, item, query, pairs in own_episodes(args.support, args.query, args.test_size, args.test_geometry):
        scores = autocast_call(torch.device(args.device), dtype, predict_meta, model, item)  # (1, 2, s, s)
        pred = at_query_size(scores, query, args.test_geometry).argmax(0).numpy()  # (H, W) in {0, 1}
        write_user_prediction(args.out, name, query, pred, pairs)


CURVES = [("loss", "training loss"), ("lr", "learning rate"), ("train_miou", "training mIoU (base-class episodes)"),
          ("clusters", "share of the background pixels per cluster centre (BCPT)"), ("val_miou", "validation mIoU")]


def draw_curves(paths, out):
    """One panel per quantity found in the logs, one line per run (its folder name), against the iteration.
    matplotlib is an optional extra, imported only here. -> the panel titles."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KitError("--curves draws with matplotlib, an optional extra: pip install matplotlib") from None
    runs = {}
    for path in paths:
        with open(path) as f:
            records = [parse_json_line(line) for line in f]
        if None in records[:-1]:  # a last line may have been cut off by a kill
            raise KitError(f"--curves {path}: line {records.index(None) + 1} is not JSON: pass a log.jsonl of this kit")
        runs[os.path.basename(os.path.dirname(os.path.abspath(path)))] = [r for r in records if r]
    panels = [(key, title) for key, title in CURVES if any(key in r for recs in runs.values() for r in recs)]
    if not panels:
        raise KitError(f"--curves: no loss, lr, mIoU or cluster records in {', '.join(paths)}")
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.4 * len(panels)), sharex=True, squeeze=False)
    for ax, (key, title) in zip(axes[:, 0], panels):
        for k, (name, recs) in enumerate(runs.items()):
            pts = [(r["step"], r[key]) for r in recs if key in r]
            if pts:  # cluster shares are a list per record: one thin line per centre, in the run's colour
                ys = np.array([y for _, y in pts], dtype=float).reshape(len(pts), -1)
                for j in range(ys.shape[1]):
                    ax.plot([x for x, _ in pts], ys[:, j], color=f"C{k}", lw=1 if ys.shape[1] > 1 else 1.5,
                            marker="o" if key == "val_miou" else None, label=name if j == 0 else None)
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
        print(format_table(args.table))
        return
    if args.curves:
        args.out = args.out or "curves.png"
        check_paths(args, outputs=[("--out", False)], inputs=["--curves"])
        return draw_curves(args.curves, args.out)
    if not args.checkpoint:
        raise KitError("--checkpoint is required (metatrain.py's <out>/last.pt), or --table FILE... to print a table")
    if args.compare and not args.vis:
        raise KitError("--compare only adds a column to the pictures: add --vis DIR")
    typed = {k for k in FROM_CHECKPOINT if getattr(args, k) is not None}
    ckpt = metatrain_checkpoint(args.checkpoint, {k: getattr(args, k) for k in MUST_MATCH if k in typed})
    for k in set(FROM_CHECKPOINT) - typed:
        setattr(args, k, ckpt["args"].get(k, "pfenet"))  # checkpoints from before --test-geometry: pfenet
    args = finish_args(args, needs_data=False, outputs=[("--json", False), ("--episode-log", False), ("--vis", True),
                                                        ("--out", True)])
    device = torch.device(args.device)
    model, dtype = load_model(ckpt, device), amp_dtype(args)
    if args.support or args.query:
        return segment_own_images(args, ckpt, model, dtype)
    other = args.compare and metatrain_checkpoint(args.compare, {k: getattr(args, k) for k in MUST_MATCH[:3]})
    label = args.label or ckpt["args"].get("pretrain_label") or pretrain_label(args.weights)
    print(f"evaluate {args.checkpoint} ({ckpt['select']} model, iteration {ckpt['iter']}): {args.dataset} fold "
          f"{args.fold} {args.shot}-shot, {args.backbone} pre-trained {label}, {args.episodes} episodes x seeds "
          f"{args.seeds}")
    data = open_data(args, ("val",))
    if args.episode_log:
        open(args.episode_log, "w").close()
    with torch.no_grad():
        predict = functools.partial(predict_meta, model)
        result = evaluate_seeds(args, data, predict, {"ASPP-PFENet": argmax_mask}, dtype=dtype)["ASPP-PFENet"]
    if args.json:
        write_results(args.json, result, args, data, method="ASPP-PFENet", pretrained=label, weights=args.weights,
                      select=ckpt["select"], checkpoint=args.checkpoint, iteration=ckpt["iter"], best_val=ckpt["best"],
                      shot_fusion=ckpt["args"].get("shot_fusion", "mean"))
    if args.vis and is_main():
        models = {f"prediction: {label}": model}
        if other:
            name = f"prediction: {other['args'].get('pretrain_label', 'compare')} (compare)"
            models[name] = load_model(other, device)
        write_vis(args, data, models, device)
    return result


if __name__ == "__main__":
    run(main)
