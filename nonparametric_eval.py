"""nonparametric_eval.py: score a pre-trained backbone with no meta-training at all (paper
Sec. 3.2, Table 2).

Following PFENet, the prior mask of the backbone's last layer (common.prior_mask: max cosine
similarity to the support foreground, min-max normalised; K shots averaged) is thresholded at
--threshold into a segmentation mask, on the same deterministic episodes and test geometry as
evaluate.py (evaluation.py). The paper uses "the same threshold" for every pre-training
without giving its value: 0.5 is our choice, so a sweep over thresholds is scored from the same
priors and saved too, and so is the threshold that is best on base-class episodes of the val images:
a choice made without looking at any novel class.

Inputs: --pretrained imagenet | none | pretrain_bcpt.py's <out>/last.pt (same dataset and fold).
Outputs: per seed and mean +- std mIoU / FB-IoU; --json FILE (evaluate.py's fields plus "threshold",
"sweep": {threshold: mIoU}, "base_threshold", "miou_base_threshold" (+ "_std"), "base_sweep" and
"per_episode_base_threshold": each episode at the base-chosen threshold),
which `python evaluate.py --table FILE...` prints as Table 2 (--table-metric: at which threshold).

Full run (PASCAL-5i fold 0, ResNet-50 pre-trained by BCPT):
    python nonparametric_eval.py --dataset pascal --data-root ROOT --fold 0 \
        --pretrained runs/bcpt-f0/last.pt
CPU smoke run on the built-in synthetic benchmark:
    python nonparametric_eval.py --pretrained none --episodes 100 --seeds 510
"""

import functools
import sys

import numpy as np
import torch

from common import KitError, build_backbone, frozen_features, resize, shot_prior
from evaluation import evaluate_seeds, pretrain_label, write_results
from own_images import add_own_image_args, segment_own_images, weights_made_for
from plumbing import (
    AMP_DTYPES,
    POSITIVE,
    UNIT,
    KitParser,
    add_common_args,
    add_eval_args,
    add_flag,
    dataset_of,
    finish_args,
    open_data,
    run,
    seed_everything,
    typed,
)


def parse_args(argv):
    """The flags; for your own images, dataset and backbone (and so the test geometry) are the
    --pretrained checkpoint's unless typed, and a typed flag that contradicts the checkpoint is
    refused."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser(dataset_of(argv)).parse_args(argv)
    if (args.support or args.query) and args.weights not in ("none", "imagenet"):
        dataset, backbone = weights_made_for(args.weights)
        made = {"dataset": dataset, "backbone": backbone}
        for key, value in made.items():
            if value and typed(argv, "--" + key) and getattr(args, key) != value:
                raise KitError(
                    f"--{key} {getattr(args, key)}: {args.weights} was made for --{key} {value}; "
                    f"leave --{key} out"
                )
        if made["dataset"] and not typed(argv, "--dataset"):
            args = parser(made["dataset"]).parse_args(argv + ["--dataset", made["dataset"]])
        args.backbone = made["backbone"] or args.backbone
    outputs = [
        ("--json", "results:non-parametric prior"),
        ("--episode-log", "episodes"),
        ("--out", "own images"),
    ]
    return finish_args(args, needs_data=not (args.support or args.query), outputs=outputs)


def parser(ds):
    """The flags, with the defaults of dataset `ds`."""
    p = add_common_args(KitParser(__doc__), ds, "nonparametric")
    p = add_own_image_args(add_eval_args(p))
    g = p.add_argument_group("non-parametric test (paper Sec. 3.2, Table 2)")
    add = functools.partial(add_flag, g, ds)
    add("--shot", 1, "supports per episode (Table 2 is 1-shot)", type=POSITIVE)
    add(
        "--threshold",
        0.5,
        "prior > threshold is foreground, the same for every backbone (paper Sec. "
        "3.2 gives no value: our choice)",
        type=UNIT,
    )
    add(
        "--sweep",
        [round(0.1 * i, 1) for i in range(1, 10)],
        "thresholds also scored from the same "
        "priors; the one best on base-class episodes is reported too",
        type=UNIT,
        nargs="+",
    )
    return p


# ============ the prior of the last layer (PFENet), one backbone pass per image ============
# layer-4 features kept for reuse: ~130 kB an image on a 64-px synthetic canvas
CACHE_BYTES = 2 << 30


@torch.no_grad()
def predict_prior(backbone, item, cache=None):
    """PFENet's prior mask from the last layer, K shots averaged: (1, 1, s, s) in [0, 1] on the
    test canvas (the cosines of the prior in float32 under mixed precision, common.fp32). The
    frozen backbone runs on one image at a time; with `cache` (a dict) each image's layer 4 (a
    support's under its class mask) is computed once per run and reused by every later episode,
    seed and the base-class pass: the same numbers, fewer passes."""
    device = next(backbone.parameters()).device
    n_shots = item["support"].shape[1]
    query_id = item.get("query_id", [None])[0]  # your own images carry no ids: nothing is kept
    support_ids = item.get("support_ids", [""])[0].split() or [None] * n_shots
    cls = int(item.get("cls", -1))
    query = item["query"].to(device)  # (1, 3, s, s)
    q_high = remember(cache, (query_id, None), functools.partial(query_layer4, backbone, query))
    shots = []  # (layer 4 (1, C, h, w), its mask (1, 1, h, w)) per shot
    for k, support_id in enumerate(support_ids):
        image = item["support"][:, k].to(device)  # (1, 3, s, s)
        mask = (item["support_mask"][:, k, None].to(device) == 1).float()  # 255 -> 0
        compute = functools.partial(support_layer4, backbone, image, mask)
        shots.append(remember(cache, (support_id, cls), compute))
    s_high = torch.cat([high for high, _ in shots])
    m_high = torch.cat([mask for _, mask in shots])
    prior = shot_prior(q_high, s_high, m_high, n_shots)  # (1, 1, h, w)
    return resize(prior, item["query"].shape[-2:])  # (1, 1, s, s)


def query_layer4(backbone, query):
    """The query's layer 4 (1, C, h, w)."""
    return frozen_features(backbone, query)[1]


def support_layer4(backbone, image, mask):
    """A support's layer 4 under its class mask, and the mask at that size (PFENet)."""
    _, high, _, mask_high = frozen_features(backbone, image, mask)
    return high, mask_high


def remember(cache, key, compute):
    """compute(), kept in cache[key] while the cache holds less than CACHE_BYTES (none for your
    own images)."""
    if cache is None or key[0] is None:
        return compute()
    if key not in cache:
        value = compute()
        tensors = value if isinstance(value, tuple) else (value,)
        size = sum(t.numel() * t.element_size() for t in tensors)
        if cache.setdefault("bytes", 0) + size > CACHE_BYTES:
            return value
        cache[key] = value
        cache["bytes"] += size
    return cache[key]


def above(scores, threshold):
    """Prediction (L, L) in {0, 1}: the prior (1, 1, L, L) above the threshold."""
    return (scores[0, 0] > threshold).long()


def choose_threshold_on_base_classes(args, data, predict, rules, dtype):
    """The threshold a user could pick without the novel classes: the best mIoU on base-class
    episodes of the val images (classes seen in pre-training; novel objects there are background).
    -> (threshold, sweep)."""
    base = evaluate_seeds(args, data, predict, rules, classes=args.base, dtype=dtype)
    sweep = {t: base[t]["miou"] for t in rules}
    return max(sweep, key=sweep.get), sweep


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)  # a random (--pretrained none) backbone depends on the seed
    device = torch.device(args.device)
    own = bool(args.support or args.query)  # the user's images: the fold does not matter
    expect = {"dataset": args.dataset}
    if not own:
        expect["fold"] = args.fold
    backbone = build_backbone(args.backbone, args.weights, expect=expect)
    backbone = backbone.to(device).eval()
    if own:

        def decide(prior):
            """The prior (H, W) at the query's size -> (mask, heat map), each (H, W)."""
            mask = (prior > args.threshold).numpy().astype(np.uint8)
            return mask, prior.numpy()

        predict = functools.partial(predict_prior, backbone)
        return segment_own_images(args, predict, AMP_DTYPES[args.amp], decide)
    label = args.label or pretrain_label(args.weights)
    thresholds = sorted(set(args.sweep) | {args.threshold})
    print(
        f"non-parametric {args.shot}-shot: {args.dataset} fold {args.fold}, {args.backbone} "
        f"pre-trained {label}, threshold {args.threshold}, sweep {thresholds}, {args.episodes} "
        f"episodes x seeds {args.seeds}"
    )
    data = open_data(args, ("val",))
    if args.episode_log:
        open(args.episode_log, "w").close()

    # ============ every threshold scored from the same prior, on novel-class episodes ============
    rules = {t: functools.partial(above, threshold=t) for t in thresholds}
    predict = functools.partial(predict_prior, backbone, cache={})
    dtype = AMP_DTYPES[args.amp]
    print("== the test: novel-class episodes, every threshold (the rows named by threshold) ==")
    results = evaluate_seeds(args, data, predict, rules, dtype=dtype)
    sweep = {f"{t:g}": results[t]["miou"] for t in thresholds}
    print("threshold sweep, mIoU: " + "  ".join(f"{t}: {v:.2f}" for t, v in sweep.items()))
    print("== choosing the threshold: base-class episodes of the val images, no novel class ==")
    # ============ the threshold chosen on base-class episodes only ============
    chosen, base_sweep = choose_threshold_on_base_classes(args, data, predict, rules, dtype)
    at_chosen = results[chosen]
    print(
        f"threshold chosen on base-class episodes: {chosen:g} (base mIoU "
        f"{base_sweep[chosen]:.2f}); novel mIoU there {at_chosen['miou']:.2f} +- "
        f"{at_chosen['miou_std']:.2f}"
    )
    result = results[args.threshold]
    if args.json:
        write_results(
            args.json,
            result,
            args,
            data,
            method="non-parametric prior",
            pretrained=label,
            weights=args.weights,
            select="none (no meta-training)",
            threshold=args.threshold,
            sweep=sweep,
            base_threshold=chosen,
            miou_base_threshold=at_chosen["miou"],
            miou_base_threshold_std=at_chosen["miou_std"],
            base_sweep={f"{t:g}": v for t, v in base_sweep.items()},
            # the episodes at the base-chosen threshold (those at --threshold: "per_episode")
            per_episode_base_threshold=at_chosen["per_episode"],
        )
    return result


if __name__ == "__main__":
    run(main)
