"""pretrain_bcpt.py: pre-train the backbone on a fold's base classes, "Standard" or BCPT (paper Sec. 2).

  standard  softmax cross-entropy over background + base classes: the paper's "Standard" row.
  bcpt      the merged background represented by K cluster centres P (a buffer) updated online (Eq. 1),
            trained with the background mining loss (Eq. 2) and the base-class loss (Eq. 3) combined as
            Eq. 4, the centres guided by k-means over the base-class vectors (Eqs. 5-7). The equations
            themselves are section 1 of common.py; train_step below calls them in the paper's order.

Reads the training pool of a VOC-layout root; writes <out>/last.pt (resumable: model, optimiser, iteration,
centres, RNG states, flags), <out>/log.jsonl and, with --vis-clusters, <out>/clusters/*.png. Later stages
take the backbone as --pretrained <out>/last.pt.

Full run (one CUDA GPU, BAM's base pre-training settings, PROTOCOL.md 7.3):
    python pretrain_bcpt.py --method bcpt --dataset pascal --data-root ROOT --fold 0 --out runs/bcpt-f0
CPU run on the built-in synthetic benchmark (about 3 minutes on 2 cores; --max-iters 20 for a smoke test):
    python pretrain_bcpt.py --method bcpt --fold 0 --vis-clusters 4
"""
import math
import os
import time

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (IGNORE, N_CLASSES, NON_NEGATIVE, UNIT, KitParser, Progress, Trainer, add_common_args,
                    add_flag, add_training_args, bcpt_loss, bounded, build_backbone, cluster_assign, dataset_of,
                    finish_args, guidance_step, momentum_update, open_data, read_pair, run, run_folder,
                    seed_everything, split_pixels, stream_loader, to_bgr_image, train_transform)

RESUME_KEYS = ("method", "dataset", "fold", "backbone", "K", "mu", "alpha", "loss_scale", "batch", "crop", "epochs",
               "seed", "no_guidance")


def parse_args(argv):
    ds = dataset_of(argv)
    p = add_common_args(KitParser(description=__doc__.split("\n")[0]), ds, "pretrain")
    g = p.add_argument_group("BCPT (paper Sec. 2)")
    g.add_argument("--method", default="bcpt", choices=["standard", "bcpt"], help="standard: cross-entropy over "
                   "background + base classes (the paper's 'Standard'); bcpt: Eqs. 1-7 (default %(default)s)")
    add_flag(g, ds, "--K", 6, "number of background cluster centres K (Sec. 2.1, Table 4)", type=bounded(int, 2))
    # deviation: the synthetic run is ~150x shorter than the paper's (334 vs ~50k iterations), so the
    # centres' time constant 1 / (1 - mu) is 10x shorter there
    add_flag(g, ds, "--mu", dict(pascal=0.999, coco=0.999, synthetic=0.99), "momentum mu of Eqs. 1 and 7 "
             "(paper Sec. 2.1)", type=UNIT)
    add_flag(g, ds, "--alpha", 0.1, "weight alpha of the background mining loss in Eq. 4 (paper Sec. 2.2)",
             type=bounded(float, 0.0))
    g.add_argument("--loss-scale", default="sum", choices=["sum", "mean"], help="Eq. 4's scale, left open by the "
                   "paper: sum = both sums / (N_base + N_bg); mean = each sum / its own pixel count (default "
                   "%(default)s)")
    g.add_argument("--no-guidance", action="store_true", help="skip Eqs. 5-7: Table 3's row 'BMC' only")
    g.add_argument("--vis-clusters", type=NON_NEGATIVE, default=0, help="write N pictures of the background "
                   "clusters at the end (Fig. 1b)")
    g.add_argument("--benchmark", type=NON_NEGATIVE, default=0, help="time N steps (data / network / clustering) "
                   "and exit")
    # deviation: the synthetic benchmark starts from random weights, hence its higher lr, and its 96-px images
    # its smaller crop and scale range
    add_training_args(p, ds, "BAM's base-learner pre-training, PROTOCOL.md 7.3",
                      epochs=dict(pascal=100, coco=20, synthetic=2), batch=12,
                      lr=(dict(pascal=2.5e-4, coco=2.5e-4, synthetic=0.01), "backbone lr; W gets 10x (BAM)"),
                      crop=dict(pascal=417, coco=417, synthetic=64),
                      scale=dict(pascal=[0.5, 2.0], coco=[0.5, 2.0], synthetic=[0.75, 1.5]))
    args = p.parse_args(argv)
    return finish_args(args, f"pretrain-{args.method}-{args.dataset}-fold{args.fold}")


# ============ Data: base classes remapped, the merged background (PROTOCOL.md 2.5) ============
class BaseClassDataset(torch.utils.data.Dataset):
    """Base classes -> 1..n_base in id order, novel classes and background -> 0 (the merged background),
    255 kept. Item idx draws its augmentation from default_rng([seed, idx]), so a stream of indices gives
    the same batches for any worker count."""

    def __init__(self, root, ids, dataset, base, crop, scale, seed):
        self.root, self.ids, self.crop, self.scale, self.seed = root, ids, crop, scale, seed
        self.n_classes = N_CLASSES[dataset]
        self.lut = np.zeros(256, np.uint8)
        self.lut[IGNORE] = IGNORE
        self.lut[base] = np.arange(1, len(base) + 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        img, label = read_pair(self.root, self.ids[idx % len(self.ids)], self.n_classes)
        rng = np.random.default_rng([self.seed, idx])
        return train_transform(img, self.lut[label], rng, self.crop, self.scale)


# ============ The network: backbone -> pixel embeddings I (B, D, h, w) -> linear layer W ============
class PretrainNet(nn.Module):
    """Backbone + W (1x1 conv, no bias, Sec. 2.2). standard: W has background + base columns; bcpt: base
    columns only, and the background is the buffer `centers` P (D, K); `guidance` G (D, K-1) is kept to
    warm-start the next iteration's k-means."""

    def __init__(self, backbone, n_base, method, K):
        super().__init__()
        self.backbone, self.method = backbone, method
        d = backbone.channels[4]
        self.W = nn.Conv2d(d, n_base + (method == "standard"), 1, bias=False)
        if method == "bcpt":
            self.register_buffer("centers", F.normalize(torch.randn(d, K), dim=0))  # random init (Sec. 2.3)
            self.register_buffer("guidance", torch.zeros(d, K - 1))

    def w(self):
        """W as the paper writes it, (D, C): column c is the projection vector w_c."""
        return self.W.weight[:, :, 0, 0].t().float()

    def forward(self, x):
        return self.backbone(x)[4]  # (B, D, h, w): the last layer's pixel embeddings (Sec. 2.2)


def downsample_labels(y, size):
    """Labels (B, H, W) to the embedding grid (B, h, w), nearest."""
    return F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long()


def cluster_shares(assign, K):
    """Share of the batch's background pixels in each cluster: a collapse to one cluster shows as [1, 0, ...]."""
    return (torch.bincount(assign, minlength=K).float() / max(len(assign), 1)).tolist()


# ============ One iteration, in the paper's order (Sec. 2) ============
def train_step(net, opt, scaler, x, y, args):
    """Guidance (Eqs. 5-7), embeddings, assignment, losses (Eqs. 2-4), SGD step, centre update (Eq. 1).
    x (B, 3, H, W), y (B, H, W). Nothing is updated when the loss is not finite (returned as it is)."""
    if args.method == "bcpt" and not args.no_guidance:
        G, P = guidance_step(net.w().detach(), net.guidance, net.centers, args.mu)  # 1. Eqs. 5-7
        net.guidance.copy_(G)
        net.centers.copy_(P)
    with torch.autocast(x.device.type, enabled=args.amp and x.device.type == "cuda"):
        emb = net(x)  # 2. pixel embeddings (B, D, h, w)
    y = downsample_labels(y, emb.shape[-2:])  # (B, h, w)
    if args.method == "standard":  # softmax over background + base classes, ignore 255
        loss, out = F.cross_entropy(net.W(emb.float()), y, ignore_index=IGNORE), {}
    else:
        I_base, y_base, I_bg = split_pixels(emb, y)  # (D, N_base), (N_base,), (D, N_bg)
        assign = cluster_assign(net.centers, I_bg.detach())  # 3. S = P^T I_bg, hard assignment A (N_bg,)
        loss, out = bcpt_loss(I_base, y_base, I_bg, assign, net.w(), net.centers, args.alpha,
                              args.loss_scale)  # 4. Eqs. 2-4
        out["clusters"] = [round(s, 3) for s in cluster_shares(assign, args.K)]
    if not torch.isfinite(loss):
        return loss, out
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()  # 5. backward and SGD step
    scaler.step(opt)
    scaler.update()
    if args.method == "bcpt":
        net.centers.copy_(momentum_update(net.centers, I_bg.detach(), assign, args.mu))  # 6. Eq. 1
    return loss, out


# ============ Training ============
def build(args, device):
    """-> the network on `device`, SGD with W at 10x the backbone's lr (BAM), the AMP scaler, the memory format."""
    net = PretrainNet(build_backbone(args.backbone, args.weights), len(args.base), args.method, args.K)
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    net = net.to(device).to(memory_format=memory_format)
    groups = [{"params": net.backbone.parameters(), "lr": args.lr}, {"params": net.W.parameters(), "lr": 10 * args.lr}]
    opt = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)
    return net, opt, torch.amp.GradScaler(device.type, enabled=args.amp and device.type == "cuda"), memory_format


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    ids, _ = open_data(args)["train"]
    dataset = BaseClassDataset(args.data_root, ids, args.dataset, args.base, args.crop, args.scale, args.seed)
    args.iters_per_epoch = math.ceil(len(dataset) / args.batch)
    args.total_iters = args.epochs * args.iters_per_epoch
    stop = min(args.total_iters, args.max_iters or args.total_iters)
    print(f"pretrain {args.method}: {len(args.base)} base classes {args.base}, {len(dataset)} images, "
          f"{args.iters_per_epoch} it/epoch x {args.epochs} epochs = {args.total_iters} iterations (running to "
          f"{stop}), backbone {args.backbone} init {args.weights}, device {device}, out {args.out}")
    if args.vis_clusters and args.method != "bcpt":
        print("--vis-clusters: standard pre-training has no background clusters; no pictures will be written")
    with run_folder(args.out):
        net, opt, scaler, memory_format = build(args, device)
        trainer = Trainer(args, "pretrain", net, opt, scaler, [args.lr, 10 * args.lr], args.total_iters, args.power)
        ckpt = trainer.resume(RESUME_KEYS)
        if args.benchmark:
            return benchmark(net, opt, scaler, dataset, args, device, memory_format)
        net.train()
        progress = Progress(stop, ckpt["iter"] if ckpt else 0, args.log_every, args.out)

        def step(batch):
            good = {k: v.clone() for k, v in net.named_buffers()}  # BN stats and centres move before the loss
            x, y = batch[0].to(device, memory_format=memory_format), batch[1].to(device)
            loss, out = train_step(net, opt, scaler, x, y, args)
            if not torch.isfinite(loss):  # nothing was stepped: only the buffers need restoring
                net.load_state_dict(good, strict=False)
            return loss, out

        def report(t, loss, lr, out):
            progress.step(t, loss=loss, lr=lr, **{k: round(v, 4) if k != "clusters" else v for k, v in out.items()})

        trainer.run(dataset, device, ckpt, stop, step, report)
        if args.vis_clusters and args.method == "bcpt":
            visualise_clusters(net, dataset, args, device)


def benchmark(net, opt, scaler, dataset, args, device, memory_format):
    """Per-step time split into data, network and clustering, and peak memory (a figure, not a test). The
    clustering steps are timed by wrapping their functions here, so train_step carries no clock."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent = {"data": 0.0, "step": 0.0, "cluster": 0.0}

    def timed(fn):
        def wrapper(*a):
            sync()
            t0 = time.perf_counter()
            out = fn(*a)
            sync()
            spent["cluster"] += time.perf_counter() - t0
            return out
        return wrapper
    originals = {name: globals()[name] for name in ("guidance_step", "cluster_assign", "momentum_update")}
    globals().update({name: timed(fn) for name, fn in originals.items()})
    try:
        net.train()
        loader = iter(stream_loader(dataset, args.batch, args.seed, 0, args.benchmark + 1, args.workers, device))

        def one_step():  # -> (data seconds, step seconds)
            t0 = time.perf_counter()
            x, y = next(loader)
            x, y = x.to(device, memory_format=memory_format), y.to(device)
            t1 = time.perf_counter()
            train_step(net, opt, scaler, x, y, args)
            sync()
            return t1 - t0, time.perf_counter() - t1
        one_step()  # warm-up, not counted
        spent["cluster"] = 0.0
        for _ in range(args.benchmark):
            data, step = one_step()
            spent["data"] += data
            spent["step"] += step
    finally:
        globals().update(originals)
    ms = {k: 1000 * v / args.benchmark for k, v in spent.items()}
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource  # Unix only; the CPU figure is the process's peak resident memory
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"benchmark {args.method} {args.backbone} crop {args.crop} batch {args.batch} on {device}: "
          f"{ms['data'] + ms['step']:.1f} ms/step = data {ms['data']:.1f} + network {ms['step'] - ms['cluster']:.1f} "
          f"+ clustering {ms['cluster']:.2f} ms (clustering {100 * ms['cluster'] / (ms['data'] + ms['step']):.2f}% "
          f"of a step); peak memory {mem:.0f} MiB")


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
