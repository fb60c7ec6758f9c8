"""metatrain.py: episodic meta-training of ASPP PFENet on a frozen pre-trained backbone
(paper Sec. 3.1).

The backbone (imagenet, none, or pretrain_bcpt.py's last.pt of the same dataset and fold) is frozen
with BN in eval; the meta learner (common.AsppPFENet) is trained on base-class episodes as BAM does
(PROTOCOL.md 2.4, 3, 7.4, 9.3-9.5): SGD momentum 0.9, weight decay 1e-4, poly lr (power 0.9) every
iteration, effective lr 0.05, batch 8.

Writes <out>/last.pt (resumable: the whole model, frozen backbone included, optimiser, AMP scaler,
iteration, RNG states, flags), <out>/log.jsonl and, with --select best-val, <out>/best.pt.
evaluate.py takes either.

Full run (one CUDA GPU; PASCAL-5i fold 0, 1-shot, on a BCPT backbone):
    python metatrain.py --dataset pascal --data-root ROOT --fold 0 --shot 1 \
        --pretrained runs/bcpt-f0/last.pt
CPU run on the built-in synthetic benchmark (a few minutes):
    python metatrain.py --shot 1 --pretrained none
"""

import functools

import torch

from common import AsppPFENet, EpisodeDataset, FewShotIoU, KitError, build_backbone
from evaluation import argmax_mask, evaluate_seeds, predict_meta, pretrain_label
from plumbing import (
    POSITIVE,
    KitParser,
    Trainer,
    add_common_args,
    add_flag,
    add_training_args,
    all_reduce_sum,
    dataset_of,
    finish_args,
    global_mean_ce,
    open_data,
    run,
    seed_everything,
    wrap_ddp,
)


def parse_args(argv):
    ds = dataset_of(argv)
    p = add_common_args(KitParser(__doc__), ds, "metatrain")
    g = p.add_argument_group("meta-training (paper Sec. 3.1)")
    add = functools.partial(add_flag, g, ds)
    add("--shot", 1, "supports per episode (1 or 5 in the paper)", type=POSITIVE)
    g.add_argument(
        "--shot-fusion",
        default="mean",
        choices=["mean", "weighted"],
        help="K-shot fusion of the "
        "supports' priors and prototypes: mean (PFENet) or weighted by BAM's layer-2 Gram-matrix "
        "scene differences (PROTOCOL.md 9.7) (default %(default)s)",
    )
    g.add_argument(
        "--novel-images",
        default="drop",
        choices=["drop", "keep"],
        help="training images containing a novel class: drop (BAM) or keep as background (PFENet), "
        "PROTOCOL.md 2.4 (default %(default)s)",
    )
    g.add_argument(
        "--val-every",
        type=POSITIVE,
        help="iterations between validations of --select best-val, on "
        "the val episodes that are later reported, as BAM/PFENet do (default: one epoch, as BAM)",
    )
    add(
        "--val-episodes",
        dict(pascal=1000, coco=1000, synthetic=200),
        "validation episodes, seed --val-seed (BAM: 1000)",
        type=POSITIVE,
    )
    add("--val-seed", 321, "seed of the validation episodes (BAM)", type=int)
    # deviation: the synthetic worlds' 64-px images take crop 57 ((crop - 1) % 8 == 0, as PFENet
    # asserts) and 8 epochs (a few minutes on 2 CPU cores; at 4 random init ended all background
    # on `synthetic`, RESULTS.md)
    add_training_args(
        p,
        ds,
        "BAM's meta-training, PROTOCOL.md 7.4",
        epochs=dict(pascal=200, coco=50, synthetic=8),
        batch=8,
        lr=(0.05, "effective lr of every trainable module (BAM base_lr 0.005 x 10)"),
        crop=dict(pascal=473, coco=641, synthetic=57),
        scale=dict(pascal=[0.9, 1.1], coco=[0.8, 1.25], synthetic=[0.9, 1.1]),
    )
    args = p.parse_args(argv)
    name = f"metatrain-{args.dataset}-fold{args.fold}-{args.shot}shot"
    return finish_args(args, name, outputs=[("--out", "run")])


# ============ the meta learner on a frozen backbone, and its optimiser ============
def build(args, device):
    """-> AsppPFENet on the frozen backbone, on `device`, and SGD over its trainable modules."""
    seed_everything(args.seed)  # a random (--weights none) backbone and the head init use it
    expect = {"dataset": args.dataset, "fold": args.fold}
    backbone = build_backbone(args.backbone, args.weights, expect=expect)
    model = AsppPFENet(backbone, args.shot, args.shot_fusion)
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]  # the backbone is frozen
    return model, torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)


# ============ one episodic training step (PROTOCOL.md 4.2: CE ignoring 255, crop size) ============
def train_step(model, batch, device, optimise):
    """The meta learner's loss on a batch of episodes, then the SGD step (optimise:
    plumbing.Trainer's). model may be wrapped in DistributedDataParallel: the batch is then this
    process's share. -> (loss, logits (B, 2, H, W))."""
    query = batch["query"].to(device)  # (B, 3, H, W)
    target = batch["query_mask"].to(device)  # (B, H, W)
    support = batch["support"].to(device)  # (B, S, 3, H, W)
    s_mask = batch["support_mask"].to(device)  # (B, S, H, W)
    logits = model(query, support, s_mask)  # (B, 2, H, W)
    loss = global_mean_ce(logits.float(), target)
    optimise(loss)
    return loss, logits


@torch.no_grad()
def validate(model, args, data, dtype):
    """mIoU and FB-IoU on --val-episodes val episodes of seed --val-seed: the peers' model
    selection (PROTOCOL.md 8.1)."""
    model.eval()
    predict = functools.partial(predict_meta, model)
    # loader seeding must not move the training RNG (resume exactness)
    with torch.random.fork_rng(devices=[]):
        results = evaluate_seeds(
            args,
            data,
            predict,
            {"val": argmax_mask},
            episodes=args.val_episodes,
            seeds=[args.val_seed],
            dtype=dtype,
        )
    result = results["val"]
    model.train()
    return result["miou"], {"val_fb_iou": result["fb_iou"]}


# ============ the episodic training loop ============
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    splits = ("train", "val") if args.select == "best-val" else ("train",)
    data = open_data(args, splits)
    ids, counts = data["train"]
    drop = args.novel if args.novel_images == "drop" else ()
    dataset = EpisodeDataset(
        args.data_root,
        ids,
        counts,
        args.dataset,
        args.base,
        args.shot,
        args.min_pixels,
        args.seed,
        crop=args.crop,
        scale=args.scale,
        drop_classes=drop,
    )
    args.iters_per_epoch = len(dataset) // args.batch  # drop_last (PROTOCOL.md 7.2)
    if args.iters_per_epoch == 0:
        queries = len(dataset)
        raise KitError(
            f"--batch {args.batch} is larger than the {queries} training queries: lower --batch"
        )
    args.total_iters = args.epochs * args.iters_per_epoch
    args.val_every = args.val_every or args.iters_per_epoch
    stop = min(args.total_iters, args.max_iters or args.total_iters)
    args.pretrain_label = pretrain_label(args.weights)
    print(
        f"metatrain {args.shot}-shot fold {args.fold}: {len(dataset)} training queries "
        f"({args.novel_images} novel-containing images), {args.iters_per_epoch} it/epoch x "
        f"{args.epochs} epochs = {args.total_iters} iterations (running to {stop}), batch "
        f"{args.batch}, lr {args.lr}, backbone {args.backbone} ({args.pretrain_label}), "
        f"{args.shot_fusion} shot fusion, select {args.select}, device {device}, out {args.out}"
    )
    model, opt = build(args, device)
    trainer = Trainer(args, "metatrain", model, opt, [args.lr])
    # several processes; the backbone is frozen in eval, the head has no BN
    wrapped = wrap_ddp(model, device)
    meter = FewShotIoU(args.base)  # the running training mIoU over base classes

    def step(batch):
        loss, logits = train_step(wrapped, batch, device, trainer.optimise)
        preds = logits.detach().argmax(1).cpu()  # (B, H, W)
        episodes = zip(preds, batch["query_mask"], batch["cls"].tolist(), strict=True)
        for pred, target, cls in episodes:
            meter.update(pred, target, cls)
        return loss, {}

    def train_miou():
        """The running training mIoU since the last progress line; the meter starts again."""
        nonlocal meter
        miou = meter.reduce(all_reduce_sum).miou()
        meter = FewShotIoU(args.base)
        return {"train_miou": miou}

    if args.benchmark:
        what = f"metatrain {args.shot}-shot {args.backbone} crop {args.crop} batch {args.batch}"
        return trainer.benchmark(dataset, step, f"{what} {args.precision}")
    validation = functools.partial(validate, model, args, data, trainer.dtype)
    trainer.fit(dataset, step, stop, argv, data, validation, args.val_every, train_miou)
    if args.select == "best-val":
        best = trainer.best
        print(f"best.pt from iteration {best['iter']} (val mIoU {best['miou']:.2f})")


if __name__ == "__main__":
    run(main)
