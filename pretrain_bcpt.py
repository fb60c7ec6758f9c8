"""pretrain_bcpt.py: pre-train the backbone on a fold's base classes, "Standard" or BCPT (paper Sec. 2).

  standard  softmax cross-entropy over background + base classes: the paper's "Standard" row.
  bcpt      background represented by K cluster centres P (a buffer), updated online (Eq. 1), trained
            with the background mining loss (Eq. 2) + base cross-entropy (Eq. 3) as Eq. 4, the centres
            guided by k-means over the base-class vectors (Eqs. 5-7).

Reads the training pool of a VOC-layout root (common.py), writes <out>/last.pt (resumable: model,
optimizer, iteration, centres, RNG states, args); later stages take it as --pretrained <out>/last.pt.

Full run (one CUDA GPU, BAM's base pretraining settings, protocol.md 6.3):
    python pretrain_bcpt.py --method bcpt --dataset pascal --data-root ROOT --fold 0 --out runs/bcpt-f0
CPU smoke run on the built-in synthetic benchmark:
    python pretrain_bcpt.py --method bcpt --max-iters 20
"""
import math
import os
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import KitParser, NON_NEGATIVE, POSITIVE, UNIT, bounded, run_folder
from common import (IGNORE, BaseClassDataset, KitError, Progress, add_common_args, background_mining_loss,
                    build_backbone, cluster_assign, farthest_point_init, finish_args, guide_centers, kmeans,
                    momentum_update, open_data, resume_from, rng_state, run, save_checkpoint,
                    seed_everything, set_rng_state, stream_loader, to_bgr_image)

# dataset-dependent defaults (protocol.md 6.3: BAM base pretraining); synthetic: sized for a CPU
STAGE_DEFAULTS = {
    "pascal": dict(epochs=100, crop=417, batch=12, lr=2.5e-4, scale=[0.5, 2.0], mu=0.999),
    "coco": dict(epochs=20, crop=417, batch=12, lr=2.5e-4, scale=[0.5, 2.0], mu=0.999),
    # deviation: a CPU run is ~150x shorter than the paper's (334 vs ~50k iterations) and starts from
    # random weights, so lr is higher and the centres' time constant 1/(1-mu) is 10x shorter
    "synthetic": dict(epochs=2, crop=64, batch=12, lr=0.01, scale=[0.75, 1.5], mu=0.99),
}


def parse_args(argv):
    p = add_common_args(KitParser(description=__doc__.split("\n")[0]))
    p.add_argument("--method", default="bcpt", choices=["standard", "bcpt"], help="default %(default)s")
    p.add_argument("--K", type=bounded(int, 2), default=6, help="number of background cluster centres K (Sec. 2.1, Table 4); default %(default)s")
    p.add_argument("--mu", type=UNIT, help="momentum mu of Eqs. 1 and 7; paper 0.999 (synthetic: 0.99)")
    p.add_argument("--alpha", type=bounded(float, 0.0), default=0.1, help="weight alpha of the background mining loss, Eq. 4; paper %(default)s")
    p.add_argument("--no-guidance", action="store_true", help="skip Eqs. 5-7 (Table 3, row 'BMC' only)")
    p.add_argument("--epochs", type=POSITIVE, help="100 PASCAL / 20 COCO (paper Sec. 3.1)")
    p.add_argument("--batch", type=POSITIVE, help="batch size; 12 (BAM)")
    p.add_argument("--lr", type=bounded(float, 0.0, open_lo=True), help="backbone lr; the head W gets 10x (BAM: 2.5e-4)")
    p.add_argument("--scale", type=bounded(float, 0.0, open_lo=True), nargs=2, help="RandScale range; 0.5 2.0 (BAM)")
    p.add_argument("--momentum", type=UNIT, default=0.9, help="SGD momentum; default %(default)s")
    p.add_argument("--wd", type=bounded(float, 0.0), default=1e-4, help="weight decay; default %(default)s")
    p.add_argument("--max-iters", type=POSITIVE, help="stop after this many iterations (smoke tests)")
    p.add_argument("--log-every", type=POSITIVE, default=20, help="iterations between progress lines")
    p.add_argument("--save-every", type=POSITIVE, default=200, help="iterations between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (a fresh start if there is none yet)")
    p.add_argument("--no-amp", dest="amp", action="store_false", help="disable mixed precision on CUDA")
    p.add_argument("--vis-clusters", type=NON_NEGATIVE, default=0, help="write N PNGs of background clusters (Fig. 1b)")
    p.add_argument("--benchmark", type=NON_NEGATIVE, default=0, help="time N steps (data / network / clustering), then exit")
    args = p.parse_args(argv)
    args = finish_args(args, f"pretrain-{args.method}", STAGE_DEFAULTS)
    if args.method == "bcpt" and not 2 <= args.K <= len(args.base) + 1:
        raise KitError(f"--K {args.K}: needs 2 <= K <= {len(args.base) + 1} (K-1 guidance vectors from {len(args.base)} base classes)")
    return args


# ============ Network: backbone -> pixel embeddings I (B, D, h, w) -> linear layer W ============
class PretrainNet(nn.Module):
    """Backbone + W (1x1 conv, no bias, Sec. 2.2). standard: W has background + base columns; bcpt: base
    columns only, background is the buffer of K centres P (D, K), and the k-means guidance G (D, K-1)
    is kept as a buffer to warm-start the next iteration's k-means."""

    def __init__(self, backbone, n_base, method, K):
        super().__init__()
        self.backbone, self.method = backbone, method
        d = backbone.channels[4]
        self.W = nn.Conv2d(d, n_base + (method == "standard"), 1, bias=False)
        if method == "bcpt":
            self.register_buffer("centers", F.normalize(torch.randn(d, K), dim=0))  # random init (Sec. 2.3)
            self.register_buffer("guidance", torch.zeros(d, K - 1))

    def forward(self, x):
        return self.backbone(x)[4]  # (B, D, h, w): the last layer's pixel embeddings


def downsample_labels(y, size):
    """Labels (B, H, W) to the embedding grid (B, h, w), nearest."""
    return F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long()


# ============ The BCPT steps, in the paper's order: Eqs. 2-4 (losses), then Eqs. 5-7 (guidance) ============
def standard_loss(net, emb, y):
    """Softmax cross-entropy over background + base classes, ignore 255 (the 'Standard' row)."""
    return F.cross_entropy(net.W(emb), y, ignore_index=IGNORE), {}


def split_pixels(emb, y):
    """Embeddings (B, D, h, w) and labels (B, h, w) -> base embeddings (N_base, D) with their labels
    (N_base,) in 1..n_base, and background embeddings I_bg (N_bg, D); 255 pixels are dropped."""
    flat, y = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float(), y.reshape(-1)  # (N, D), (N,)
    is_base = (y > 0) & (y != IGNORE)
    return flat[is_base], y[is_base], flat[y == 0]


def bcpt_loss(net, base, y_base, bg, assign, alpha):
    """Eqs. 2-4 on the labelled embeddings, given the assignment of the background ones to the centres."""
    centers = net.centers  # (D, K), no gradient
    # Eq. 3: base pixels, softmax over the base vectors and the K background centres (our reading)
    logits = torch.cat([base @ net.W.weight[:, :, 0, 0].t().float(), base @ centers], 1)  # (N_base, n_base + K)
    l_base = F.cross_entropy(logits, y_base - 1, reduction="sum")
    # Eq. 2: background pixels, softmax over the K centres, target = their assigned centre
    l_bm = background_mining_loss(bg.t(), centers, assign) * len(bg) if len(bg) else bg.sum() * 0
    # Eq. 4: sum over base pixels + alpha * sum over background pixels, divided by the labelled count
    loss = (l_base + alpha * l_bm) / max(len(base) + len(bg), 1)
    return loss, {"l_base": l_base.item() / max(len(base), 1), "l_bm": l_bm.item() / max(len(bg), 1)}


def cluster_shares(assign, K):
    """Share of background pixels in each cluster: a collapse to one cluster shows as [1, 0, ...]."""
    return (torch.bincount(assign, minlength=K).float() / max(len(assign), 1)).tolist()


def guidance_step(net, mu):
    """Eqs. 5-7: k-means over the base vectors {w_c} (warm-started), then guide the centres."""
    w = net.W.weight.detach()[:, :, 0, 0].t().float()  # (D, n_base): one column per base class
    init = net.guidance if net.guidance.abs().sum() > 0 else farthest_point_init(w, net.guidance.shape[1])
    net.guidance.copy_(kmeans(w, init))  # Eq. 5
    net.centers.copy_(guide_centers(net.centers, net.guidance, mu))  # Eqs. 6-7


# ============ Training ============
def poly_lr(opt, base_lrs, t, total, power=0.9):
    for group, lr in zip(opt.param_groups, base_lrs):
        group["lr"] = lr * (1 - t / total) ** power
    return opt.param_groups[0]["lr"]


def train_step(net, opt, scaler, batch, args, device):
    """One iteration in the paper's order: guidance, forward, assignment, losses, step, Eq. 1."""
    x, y = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
    sync = torch.cuda.synchronize if args.benchmark and device.type == "cuda" else (lambda: None)
    clock = lambda: sync() or time.perf_counter()  # exact clustering times only when benchmarking on CUDA
    t0 = clock()
    if args.method == "bcpt" and not args.no_guidance:
        guidance_step(net, args.mu)  # 1. Eqs. 5-7
    t_cluster = clock() - t0
    with torch.autocast(device.type, enabled=args.amp and device.type == "cuda"):
        emb = net(x.contiguous(memory_format=args.memory_format))  # 2. (B, D, h, w)
    y = downsample_labels(y, emb.shape[-2:])  # (B, h, w)
    if args.method == "standard":
        loss, out = standard_loss(net, emb.float(), y)
    else:
        base, y_base, bg = split_pixels(emb, y)  # (N_base, D), (N_base,), (N_bg, D)
        t0 = clock()
        assign = cluster_assign(net.centers, bg.detach().t())  # 3. S = P^T I_bg, hard assignment (N_bg,)
        t_cluster += clock() - t0
        loss, out = bcpt_loss(net, base, y_base, bg, assign, args.alpha)  # 4. Eqs. 2-4
        out["assign"] = assign
    if not torch.isfinite(loss):
        return loss, out, {"cluster": t_cluster}
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # 5. backward and step
    scaler.step(opt)
    scaler.update()
    if args.method == "bcpt":
        t0 = clock()
        net.centers.copy_(momentum_update(net.centers, bg.detach().t(), assign, args.mu))  # 6. Eq. 1
        t_cluster += clock() - t0
    return loss, out, {"cluster": t_cluster}


def build(args, device):
    net = PretrainNet(build_backbone(args.backbone, args.weights), len(args.base), args.method, args.K)
    args.memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(device).to(memory_format=args.memory_format)
    groups = [{"params": net.backbone.parameters(), "lr": args.lr}, {"params": net.W.parameters(), "lr": 10 * args.lr}]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    return net, opt, torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda")


def checkpoint(net, opt, scaler, t, args):
    return {"model": net.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
            "iter": t, "rng": rng_state(), "args": {k: v for k, v in vars(args).items() if k != "memory_format"},
            "stage": "pretrain"}


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    ids, _ = open_data(args)["train"]
    dataset = BaseClassDataset(args.data_root, ids, args.dataset, args.base, args.crop, args.scale, args.seed)
    iters_per_epoch = math.ceil(len(dataset) / args.batch)
    total = args.epochs * iters_per_epoch
    stop = min(total, args.max_iters or total)
    print(f"pretrain {args.method}: {len(args.base)} base classes {args.base}, {len(dataset)} images, "
          f"{iters_per_epoch} it/epoch x {args.epochs} epochs = {total} iterations (running to {stop}), "
          f"backbone {args.backbone} init {args.weights}, device {device}, out {args.out}")
    if args.vis_clusters and args.method != "bcpt":
        print("--vis-clusters: standard pre-training has no background clusters; no pictures will be written")
    with run_folder(args.out):
        net, opt, scaler = build(args, device)
        path, start = os.path.join(args.out, "last.pt"), 0
        keys = ("method", "dataset", "fold", "backbone", "K", "mu", "alpha", "batch", "crop", "epochs", "seed",
                "no_guidance")
        ckpt = resume_from(path, {k: getattr(args, k) for k in keys}) if args.resume else None
        if ckpt:
            net.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["optimizer"])
            scaler.load_state_dict(ckpt["scaler"])
            start = ckpt["iter"]
            print(f"resumed from {path} at iteration {start}")
        if args.benchmark:
            return benchmark(net, opt, scaler, dataset, args, device)
        with torch.random.fork_rng(devices=[]):  # the loader's base-seed draw must not move the global RNG,
            loader = iter(stream_loader(dataset, args.batch, args.seed, start, stop, args.workers, device))
        if ckpt:  # ... so that after a resume every RNG is where a straight run has it
            set_rng_state(ckpt["rng"])
        train_loop(net, opt, scaler, loader, args, device, start, stop, total, path)
        if args.vis_clusters and args.method == "bcpt":
            visualise_clusters(net, dataset, args, device)


def train_loop(net, opt, scaler, loader, args, device, start, stop, total, path):
    net.train()
    base_lrs, progress = [args.lr, 10 * args.lr], Progress(stop, start, args.log_every, args.out)
    for t, batch in enumerate(loader, start):
        lr = poly_lr(opt, base_lrs, t, total)
        good = {k: v.clone() for k, v in net.named_buffers()}  # BN stats and centres move before the loss
        loss, out, _ = train_step(net, opt, scaler, batch, args, device)
        if not torch.isfinite(loss):  # train_step did not step: only the buffers need restoring
            net.load_state_dict(good, strict=False)
            save_checkpoint(path, checkpoint(net, opt, scaler, t, args))
            raise KitError(f"loss is {loss.item()} at iteration {t}: the last good state is saved in {path}; "
                           f"lower --lr (now {args.lr}) and rerun with --resume")
        extra = {k: round(v, 4) for k, v in out.items() if k.startswith("l_")}
        if args.method == "bcpt":
            extra["clusters"] = [round(s, 3) for s in cluster_shares(out["assign"], args.K)]
        progress.step(t + 1, loss=loss.item(), lr=lr, **extra)
        if (t + 1) % args.save_every == 0 or t + 1 == stop:
            save_checkpoint(path, checkpoint(net, opt, scaler, t + 1, args))
    print(f"saved {path}")


def benchmark(net, opt, scaler, dataset, args, device):
    """Per-step time split into data, network and clustering, and peak memory (not a test)."""
    net.train()
    sums, n = {"data": 0.0, "step": 0.0, "cluster": 0.0}, args.benchmark
    loader = iter(stream_loader(dataset, args.batch, args.seed, 0, n + 1, args.workers, device))
    train_step(net, opt, scaler, next(loader), args, device)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(n):
        t0 = time.perf_counter()
        batch = next(loader)
        t1 = time.perf_counter()
        _, _, timing = train_step(net, opt, scaler, batch, args, device)
        sync()
        sums["data"] += t1 - t0
        sums["step"] += time.perf_counter() - t1
        sums["cluster"] += timing["cluster"]
    step = (sums["data"] + sums["step"]) / n
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource  # Unix only; the CPU figure is the process's peak resident memory
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"benchmark {args.method} {args.backbone} crop {args.crop} batch {args.batch} on {device}: "
          f"{1000 * step:.1f} ms/step = data {1000 * sums['data'] / n:.1f} + network "
          f"{1000 * (sums['step'] - sums['cluster']) / n:.1f} + clustering {1000 * sums['cluster'] / n:.2f} ms "
          f"(clustering {100 * sums['cluster'] / n / step:.2f}% of a step); peak memory {mem:.0f} MiB")


@torch.no_grad()
def visualise_clusters(net, dataset, args, device):
    """Fig. 1b: training crops with each background pixel coloured by its cluster centre, drawn at least
    256 px high, with a key naming each colour's centre and its share of the picture's background."""
    net.eval()
    colours = cv2.applyColorMap(np.linspace(0, 255, args.K).astype(np.uint8)[:, None], cv2.COLORMAP_JET)[:, 0]
    folder = os.path.join(args.out, "clusters")
    os.makedirs(folder, exist_ok=True)
    for i in range(args.vis_clusters):
        x, y = dataset[i]
        emb = net(x[None].to(device))[0].float()  # (D, h, w)
        assign = cluster_assign(net.centers, emb.flatten(1)).reshape(emb.shape[1:]).cpu().numpy()  # (h, w)
        assign = cv2.resize(assign.astype(np.uint8), x.shape[-1:] * 2, interpolation=cv2.INTER_NEAREST)  # (s, s)
        img, bg = to_bgr_image(x), y.numpy() == 0  # (s, s, 3), (s, s)
        over = np.where(bg[..., None], 0.4 * img + 0.6 * colours[assign], img).astype(np.uint8)
        zoom = -(-256 // img.shape[0])  # ceil: at least 256 px high
        pic = cv2.resize(np.concatenate([img, over], 1), None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
        shares = np.bincount(assign[bg], minlength=args.K) / max(bg.sum(), 1)
        key = np.full((22 * args.K + 6, pic.shape[1], 3), 255, np.uint8)
        for k in range(args.K):
            cv2.rectangle(key, (6, 22 * k + 6), (24, 22 * k + 22), colours[k].tolist(), -1)
            cv2.putText(key, f"centre {k}: {100 * shares[k]:.0f}% of the background", (32, 22 * k + 20),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.imwrite(os.path.join(folder, f"{i:03d}.png"), np.concatenate([pic, key], 0))
    print(f"wrote {args.vis_clusters} cluster maps to {folder} (left: crop; right: background by centre)")


if __name__ == "__main__":
    run(main)
