"""metatrain.py: episodic meta-training of ASPP PFENet on a frozen pre-trained backbone (paper Sec. 3.1).

The backbone (imagenet, none, or pretrain_bcpt.py's last.pt of the same dataset and fold) is frozen with
BN in eval; the meta learner (common.AsppPFENet) is trained on base-class episodes as BAM does
(protocol.md 1.5, 5.4, 6.4): SGD momentum 0.9, wd 1e-4, poly 0.9 per iteration, effective lr 0.05, batch 8.

Writes <out>/last.pt (resumable: whole model incl. the frozen backbone, optimizer, AMP scaler, iteration,
RNG states, args) and, with --select best-val, <out>/best.pt. evaluate.py takes either.

Full run (one CUDA GPU; PASCAL-5i fold 0, 1-shot, on a BCPT backbone):
    python metatrain.py --dataset pascal --data-root ROOT --fold 0 --shot 1 --pretrained runs/bcpt-f0/last.pt
CPU smoke run on the built-in synthetic benchmark (a few minutes):
    python metatrain.py --shot 1 --pretrained none
"""
import argparse
import os

import torch
import torch.nn.functional as F

from common import KitParser, POSITIVE, UNIT, bounded, run_folder
from common import (IGNORE, AsppPFENet, EpisodeDataset, FewShotIoU, KitError, Progress, add_common_args,
                    build_backbone, evaluate_seeds, finish_args, open_data, pretrain_label,
                    resume_from, rng_state, run, save_checkpoint, seed_everything, set_rng_state, stream_loader)

# dataset-dependent defaults (protocol.md 6.4, BAM meta-training). synthetic: 96-px images, crop 81
# ((crop - 1) % 8 == 0 as PFENet asserts), 3 epochs (~450 iterations, about 3 minutes on 2 CPU cores)
STAGE_DEFAULTS = {
    "pascal": dict(epochs=200, crop=473, scale=[0.9, 1.1], val_episodes=1000),
    "coco": dict(epochs=50, crop=641, scale=[0.8, 1.25], val_episodes=1000),
    "synthetic": dict(epochs=3, crop=81, scale=[0.9, 1.1], val_episodes=200),
}
CHECK_ON_RESUME = ("dataset", "fold", "shot", "backbone", "weights", "epochs", "batch", "lr", "crop", "scale",
                   "seed", "novel_images", "select")


def parse_args(argv):
    p = add_common_args(KitParser(description=__doc__.split("\n")[0]))
    p.add_argument("--shot", type=POSITIVE, default=1, help="supports per episode (1 or 5 in the paper); default %(default)s")
    p.add_argument("--epochs", type=POSITIVE, help="passes over the fold's training queries: 200 PASCAL / 50 COCO (Sec. 3.1)")
    p.add_argument("--batch", type=POSITIVE, default=8, help="episodes per iteration (BAM 2 x 4 GPUs); default %(default)s")
    p.add_argument("--lr", type=bounded(float, 0.0, open_lo=True), default=0.05,
                   help="effective lr of every trainable module (BAM base_lr 0.005 x 10, protocol.md 6.4); default %(default)s")
    p.add_argument("--momentum", type=UNIT, default=0.9, help="SGD momentum (protocol.md 6.1); default %(default)s")
    p.add_argument("--wd", type=bounded(float, 0.0), default=1e-4, help="SGD weight decay (protocol.md 6.1); default %(default)s")
    p.add_argument("--power", type=bounded(float, 0.0), default=0.9, help="poly lr power, per iteration (protocol.md 6.1); default %(default)s")
    p.add_argument("--scale", type=bounded(float, 0.0, open_lo=True), nargs=2, help="RandScale range: 0.9 1.1 PASCAL / 0.8 1.25 COCO (protocol.md 3.1)")
    p.add_argument("--novel-images", default="drop", choices=["drop", "keep"],
                   help="training images containing a novel class: drop (BAM) or keep as background (PFENet), "
                        "protocol.md 7.2; default %(default)s")
    p.add_argument("--select", default="last", choices=["last", "best-val"],
                   help="last: the final model (honest); best-val: also keep best.pt, chosen on the val episodes "
                        "that are later reported (BAM/PFENet, protocol.md 7.1); default %(default)s")
    p.add_argument("--val-every", type=POSITIVE, help="iterations between validations for best-val (default: one epoch, as BAM)")
    p.add_argument("--val-episodes", type=POSITIVE, help="validation episodes, seed --val-seed: 1000 (BAM); 200 synthetic")
    p.add_argument("--val-seed", type=int, default=321, help="seed of the validation episodes (BAM); default %(default)s")
    p.add_argument("--max-iters", type=POSITIVE, help="stop after this many iterations; the lr schedule is unchanged (smoke tests)")
    p.add_argument("--save-every", type=POSITIVE, default=200, help="iterations between checkpoints; default %(default)s")
    p.add_argument("--log-every", type=POSITIVE, default=20, help="iterations between progress lines; default %(default)s")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (a fresh start if there is none yet)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA (no-op on CPU)")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = os.path.join("runs", f"metatrain-{args.dataset}-fold{args.fold}-{args.shot}shot")
    return finish_args(args, "metatrain", STAGE_DEFAULTS)


# ============ the meta learner on a frozen backbone, its optimizer and checkpoints ============
def build(args, device):
    seed_everything(args.seed)  # a random (--weights none) backbone and the head init depend on the seed
    model = AsppPFENet(build_backbone(args.backbone, args.weights, expect={"dataset": args.dataset, "fold": args.fold}))
    model = model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]  # the backbone is frozen
    opt = torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    return model, opt, torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")


def checkpoint(model, opt, scaler, t, args, best, select="last"):
    """The whole model (backbone included, so evaluate.py needs neither the pretraining file nor a
    download), plus everything --resume needs. `select` says which model this file holds."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "iter": t, "rng": rng_state(), "args": vars(args), "best": best, "select": select, "stage": "metatrain"}


def poly_lr(opt, t, total, args):
    """lr = base_lr (1 - t / total)^power, every iteration (PFENet/BAM poly_learning_rate)."""
    lr = args.lr * (1 - t / total) ** args.power
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


# ============ one episodic training step (protocol.md 3.1: CE ignore 255 on the crop-size output) ============
def train_step(model, opt, scaler, batch, args, device):
    query, target = batch["query"].to(device), batch["query_mask"].to(device)  # (B, 3, H, W), (B, H, W)
    support, s_mask = batch["support"].to(device), batch["support_mask"].to(device)  # (B, S, 3, H, W), (B, S, H, W)
    with torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
        logits = model(query, support, s_mask)  # (B, 2, H, W)
        loss = F.cross_entropy(logits.float(), target, ignore_index=IGNORE)
    if not torch.isfinite(loss):
        return loss, logits
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss, logits


@torch.no_grad()
def validate(model, args, data):
    """mIoU on --val-episodes val episodes with --val-seed: the peers' model selection (protocol.md 6.4)."""
    model.eval()
    device = next(model.parameters()).device
    val_args = argparse.Namespace(**{**vars(args), "episodes": args.val_episodes, "seeds": [args.val_seed]})
    predict = lambda it: model(it["query"].to(device), it["support"].to(device), it["support_mask"].to(device))
    with torch.random.fork_rng(devices=[]):  # loader seeding must not move the training RNG (resume exactness)
        result = evaluate_seeds(val_args, data, predict, lambda s: {"val": s.argmax(1)[0]})["val"]
    model.train()
    return result["miou"]


# ============ the episodic training loop ============
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    data = open_data(args)
    ids, counts = data["train"]
    drop = args.novel if args.novel_images == "drop" else ()
    dataset = EpisodeDataset(args.data_root, ids, counts, args.dataset, args.base, args.shot, args.min_pixels,
                             args.seed, crop=args.crop, scale=args.scale, drop_classes=drop)
    args.iters_per_epoch = len(dataset) // args.batch  # drop_last (protocol.md 6.2)
    if args.iters_per_epoch == 0:
        raise KitError(f"--batch {args.batch} is larger than the {len(dataset)} training queries: lower --batch")
    args.total_iters = args.epochs * args.iters_per_epoch
    args.val_every = args.val_every or args.iters_per_epoch
    stop = min(args.total_iters, args.max_iters or args.total_iters)
    args.pretrain_label = pretrain_label(args.weights)
    print(f"metatrain {args.shot}-shot fold {args.fold}: {len(dataset)} training queries ({args.novel_images} "
          f"novel-containing images), {args.iters_per_epoch} it/epoch x {args.epochs} epochs = {args.total_iters} "
          f"iterations (running to {stop}), batch {args.batch}, lr {args.lr}, backbone {args.backbone} "
          f"({args.pretrain_label}), select {args.select}, device {device}, out {args.out}")
    with run_folder(args.out):
        model, opt, scaler = build(args, device)
        path, start, best = os.path.join(args.out, "last.pt"), 0, {"miou": -1.0, "iter": 0}
        ckpt = resume_from(path, {k: getattr(args, k) for k in CHECK_ON_RESUME}) if args.resume else None
        if ckpt:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            start, best = ckpt["iter"], ckpt["best"]
            print(f"resumed from {path} at iteration {start}")
        model.train()
        with torch.random.fork_rng(devices=[]):  # the loader's base seed draw must not move the dropout RNG
            loader = iter(stream_loader(dataset, args.batch, args.seed, start, stop, args.workers, device))
        if ckpt:
            set_rng_state(ckpt["rng"])
        train_loop(model, opt, scaler, loader, args, data, start, stop, best, path)


def train_loop(model, opt, scaler, loader, args, data, start, stop, best, path):
    device, meter = next(model.parameters()).device, FewShotIoU(args.base)
    progress = Progress(stop, start, args.log_every, args.out)
    for t, batch in enumerate(loader, start):
        lr = poly_lr(opt, t, args.total_iters, args)
        loss, logits = train_step(model, opt, scaler, batch, args, device)
        if not torch.isfinite(loss):  # nothing was stepped: the model is still the good one of iteration t
            save_checkpoint(path, checkpoint(model, opt, scaler, t, args, best))
            raise KitError(f"loss is {loss.item()} at iteration {t}: the last good state is saved in {path}; "
                           f"lower --lr (now {args.lr}) and rerun with --resume")
        for pred, target, cls in zip(logits.detach().argmax(1).cpu(), batch["query_mask"], batch["cls"].tolist()):
            meter.update(pred, target, cls)  # running training mIoU over base classes, reset at each log line
        if (t + 1) % args.log_every == 0 or t + 1 == stop:
            progress.step(t + 1, force=True, loss=loss.item(), lr=lr, train_miou=meter.miou())
            meter = FewShotIoU(args.base)
        if args.select == "best-val" and ((t + 1) % args.val_every == 0 or t + 1 == args.total_iters):
            miou = validate(model, args, data)
            print(f"validation at iteration {t + 1}: mIoU {miou:.2f} (best {max(best['miou'], miou):.2f})")
            if miou > best["miou"]:
                best = {"miou": miou, "iter": t + 1}
                save_checkpoint(os.path.join(args.out, "best.pt"), checkpoint(model, opt, scaler, t + 1, args, best, "best-val"))
        if (t + 1) % args.save_every == 0 or t + 1 == stop:
            save_checkpoint(path, checkpoint(model, opt, scaler, t + 1, args, best))
    print(f"saved {path}" + (f"; best.pt from iteration {best['iter']} (val mIoU {best['miou']:.2f})"
                             if args.select == "best-val" else ""))


if __name__ == "__main__":
    run(main)
