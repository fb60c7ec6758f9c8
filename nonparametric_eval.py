"""nonparametric_eval.py: score a pre-trained backbone with no meta-training at all (paper Sec. 3.2, Table 2).

Following PFENet, the prior mask of the backbone's last layer (common.prior_mask: max cosine similarity to
the support foreground, min-max normalised; K shots averaged) is thresholded at --threshold into a
segmentation mask, on the same deterministic episodes and test geometry as evaluate.py (common.py section
8). The paper uses "the same threshold" for every pre-training without giving its value: 0.5 is our
choice, so a sweep over thresholds is scored from the same priors and saved too.

Inputs: --pretrained imagenet | none | pretrain_bcpt.py's <out>/last.pt (same dataset and fold).
Outputs: per seed and mean +- std mIoU / FB-IoU; --json FILE (evaluate.py's fields plus "threshold" and
"sweep": {threshold: mIoU}); --table FILE... prints a Table 2-style table.

Full run (PASCAL-5i fold 0, ResNet-50 pre-trained by BCPT):
    python nonparametric_eval.py --dataset pascal --data-root ROOT --fold 0 --pretrained runs/bcpt-f0/last.pt
CPU smoke run on the built-in synthetic benchmark:
    python nonparametric_eval.py --pretrained none --episodes 100 --seeds 510
"""

import functools

import torch

from common import (UNIT, POSITIVE, KitParser, add_common_args, add_eval_args, add_flag, build_backbone, dataset_of,
                    evaluate_seeds, finish_args, format_table, frozen_features, open_data, pretrain_label, resize,
                    run, seed_everything, shot_prior, write_results)


def parse_args(argv):
    ds = dataset_of(argv)
    p = add_eval_args(add_common_args(KitParser(description=__doc__.split("\n")[0]), ds, "nonparametric"))
    g = p.add_argument_group("non-parametric test (paper Sec. 3.2, Table 2)")
    add_flag(g, ds, "--shot", 1, "supports per episode (Table 2 is 1-shot)", type=POSITIVE)
    add_flag(g, ds, "--threshold", 0.5, "prior > threshold is foreground, the same for every backbone (paper Sec. "
             "3.2 gives no value: our choice)", type=UNIT)
    add_flag(g, ds, "--sweep", [round(0.1 * i, 1) for i in range(1, 10)], "thresholds also scored from the same "
             "priors", type=UNIT, nargs="+")
    return finish_args(p.parse_args(argv))


# ============ the prior of the last layer (PFENet), one backbone pass per image ============
@torch.no_grad()
def predict_prior(backbone, item):
    """PFENet's prior mask from the last layer, K shots averaged: (1, 1, s, s) in [0, 1] on the test canvas."""
    device = next(backbone.parameters()).device
    shots = item["support"].shape[1]
    m = (item["support_mask"].to(device) == 1).float().flatten(0, 1).unsqueeze(1)  # (S, 1, s, s); 255 -> 0
    _, q_high = frozen_features(backbone, item["query"].to(device))
    _, s_high, _, m_high = frozen_features(backbone, item["support"].to(device).flatten(0, 1), m)
    return resize(shot_prior(q_high, s_high, m_high, shots), item["query"].shape[-2:])  # (1, 1, s, s)


def above(scores, threshold):
    """Prediction (L, L) in {0, 1}: the prior (1, 1, L, L) above the threshold."""
    return (scores[0, 0] > threshold).long()


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(format_table(args.table))
        return
    seed_everything(args.seed)  # a random (--pretrained none) backbone depends on the seed
    device = torch.device(args.device)
    backbone = build_backbone(args.backbone, args.weights, expect={"dataset": args.dataset, "fold": args.fold})
    backbone = backbone.to(device).eval()
    label = args.label or pretrain_label(args.weights)
    thresholds = sorted(set(args.sweep) | {args.threshold})
    print(f"non-parametric {args.shot}-shot: {args.dataset} fold {args.fold}, {args.backbone} pre-trained {label}, "
          f"threshold {args.threshold}, sweep {thresholds}, {args.episodes} episodes x seeds {args.seeds}")
    data = open_data(args)

    # ============ every threshold scored from the same prior ============
    rules = {t: functools.partial(above, threshold=t) for t in thresholds}
    results = evaluate_seeds(args, data, functools.partial(predict_prior, backbone), rules)
    sweep = {f"{t:g}": results[t]["miou"] for t in thresholds}
    print("threshold sweep, mIoU: " + "  ".join(f"{t}: {v:.2f}" for t, v in sweep.items()))
    result = results[args.threshold]
    if args.json:
        write_results(args.json, result, args, method="non-parametric prior", pretrained=label, weights=args.weights,
                      select="none (no meta-training)", threshold=args.threshold, sweep=sweep)
    return result


if __name__ == "__main__":
    run(main)
