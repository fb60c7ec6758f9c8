"""pretrain_bcpt.py: pre-train the backbone on a fold's base classes, "Standard" or BCPT (paper
Sec. 2).

  standard  softmax cross-entropy over background + base classes: the paper's "Standard" row,
            with BAM's base learner head (--head psp, PSPNet) or a linear layer on the last layer
            (--head linear).
  bcpt      the merged background represented by K cluster centres P (a buffer) updated online
            (Eq. 1), trained with the background mining loss (Eq. 2) and the base-class loss
            (Eq. 3) combined as Eq. 4, the centres guided by k-means over the base-class vectors
            (Eqs. 5-7). The equations themselves are section 1 of common.py; bcpt_step below calls
            them in the paper's order.
  generic   the "ImageNet" stand-in: the undilated backbone (output stride 32) trained as a
            multi-label classifier of every class (global average pooling, a linear layer, binary
            cross-entropy, labels from the masks) on a separate root, fold-free; a synthetic
            world's companion root is drawn on first use.

Writes <out>/last.pt (resumable: model, optimiser, iteration, centres, RNG states, flags),
<out>/log.jsonl, with --select best-val <out>/best.pt (BAM's selection) and with --vis-clusters
<out>/clusters/*.png; standard and bcpt end with the base-class mIoU on the val images (beside
BAM's on PASCAL). Later stages take --pretrained last.pt.

Full run (one CUDA GPU, BAM's base pre-training settings, PROTOCOL.md 7.3):
    python pretrain_bcpt.py --method bcpt --dataset pascal --data-root ROOT --fold 0 \
        --backbone resnet50v2 --weights initmodel/resnet50_v2.pth --out runs/bcpt-f0
CPU run on the built-in synthetic benchmark, from the world's ImageNet stand-in
(--max-iters 20: a smoke test):
    python pretrain_bcpt.py --method generic --out runs/standin
    python pretrain_bcpt.py --method bcpt --fold 0 --weights runs/standin/last.pt --vis-clusters 4
"""

import functools
import math
import os

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (
    IGNORE,
    N_CLASSES,
    STANDIN_ROOTS,
    BaseClassDataset,
    KitError,
    PSPHead,
    bcpt_loss,
    build_backbone,
    cluster_assign,
    cluster_sums,
    fp32,
    guidance_step,
    momentum_update,
    resize,
    split_pixels,
    to_bgr_image,
    write_atomic,
)
from evaluation import pretrain_label
from plumbing import (
    NON_NEGATIVE,
    POSITIVE_FLOAT,
    UNIT,
    KitParser,
    Trainer,
    add_common_args,
    add_flag,
    add_training_args,
    all_reduce_sum,
    bounded,
    dataset_of,
    finish_args,
    gathered,
    global_mean,
    global_mean_ce,
    is_main,
    open_data,
    rank,
    run,
    save_text,
    seed_everything,
    typed,
    world,
    wrap_ddp,
)
from reference_numbers import reference


def parse_args(argv):
    ds = dataset_of(argv)
    p = add_common_args(KitParser(__doc__), ds, "pretrain")
    g = p.add_argument_group("pre-training method (paper Sec. 2)")
    add = functools.partial(add_flag, g, ds)
    g.add_argument(
        "--method",
        default="bcpt",
        choices=["standard", "bcpt", "generic"],
        help="standard: cross-entropy over background + base classes (the paper's 'Standard'); "
        "bcpt: Eqs. 1-7; generic: the ImageNet stand-in, a multi-label classifier of every "
        "class on another root (default %(default)s)",
    )
    add(
        "--head",
        dict(pascal="psp", coco="psp", synthetic="linear"),
        "head of --method standard: psp = BAM's base learner (PSPNet, PROTOCOL.md 9.6), loss on "
        "logits upsampled to the crop; linear = W on the last layer, loss at its resolution. "
        "BCPT always uses W on the last layer (Sec. 2.2)",
        choices=["psp", "linear"],
    )
    add(
        "--K", 6, "number of background cluster centres K (Sec. 2.1, Table 4)", type=bounded(int, 2)
    )
    # deviation: the synthetic run is ~250x shorter (200 vs ~50k iterations): the centres'
    # memory 1 / (1 - mu) 10x shorter
    add(
        "--mu",
        dict(pascal=0.999, coco=0.999, synthetic=0.99),
        "momentum mu of Eqs. 1 and 7 (paper Sec. 2.1)",
        type=UNIT,
    )
    add(
        "--alpha",
        0.1,
        "weight alpha of the background mining loss in Eq. 4 (paper Sec. 2.2)",
        type=bounded(float, 0.0),
    )
    add(
        "--loss-scale",
        "sum",
        "Eq. 4's scale, left open by the paper: sum = both sums / (N_base + "
        "N_bg); mean = each sum / its own pixel count; a world's default from --weights FILE "
        "is mean",
        choices=["sum", "mean"],
    )
    add(
        "--eq3",
        "centres",
        "Eq. 3's softmax, left open by the paper: over the base vectors and the K "
        "centres, or over the base vectors only",
        choices=["centres", "base"],
    )
    g.add_argument(
        "--no-guidance", action="store_true", help="skip Eqs. 5-7: Table 3's row 'BMC' only"
    )
    g.add_argument(
        "--novel-images",
        default="keep",
        choices=["keep", "drop"],
        help="training images with a novel pixel: keep them, novel objects in the merged "
        "background (BAM's base learner), or drop them all, the ablation of the paper's "
        "premise (default %(default)s)",
    )
    g.add_argument(
        "--vis-clusters",
        type=NON_NEGATIVE,
        default=0,
        help="write N pictures of the background clusters at the end (Fig. 1b)",
    )
    # deviation: the synthetic worlds' 64-px images take a smaller crop and scale range, and a
    # higher lr
    add_training_args(
        p,
        ds,
        "BAM's base-learner pre-training, PROTOCOL.md 7.3",
        epochs=dict(pascal=100, coco=20, synthetic=2),
        batch=12,
        lr=(
            dict(pascal=2.5e-4, coco=2.5e-4, synthetic=0.01),
            "base lr; the head gets 10x (BAM); a world's default from --weights FILE is 0.001",
        ),
        crop=dict(pascal=417, coco=417, synthetic=64),
        scale=dict(pascal=[0.5, 2.0], coco=[0.5, 2.0], synthetic=[0.75, 1.5]),
    )
    add_flag(
        p,
        ds,
        "--backbone-lr-mult",
        dict(pascal=1.0, coco=10.0, synthetic=1.0),
        "the backbone's lr is --lr times this: 1 = BAM's PASCAL base config (index_split 0), 10 "
        "= its COCO one (index_split -1: everything at 10x, PROTOCOL.md 7.3)",
        type=POSITIVE_FLOAT,
    )
    args = p.parse_args(argv)
    if args.method != "standard":
        if args.head == "psp" and typed(argv, "--head"):
            raise KitError(
                f"--head psp is for --method standard: {args.method}'s loss is on the last layer"
            )
        args.head = "linear"
    name = f"pretrain-{args.method}-{args.dataset}"
    if args.method == "generic":
        generic_defaults(args, argv)
    else:
        name += f"-fold{args.fold}"
        finetuning_default(args, argv)
    args = finish_args(args, name, outputs=[("--out", "run")])
    per_process = args.batch // world()
    if args.head == "psp" and per_process < 2:
        raise KitError(
            f"--batch {args.batch}: the PSP head's BatchNorm needs at least 2 crops per process "
            f"(its 1 x 1 pooling bin has one value per crop); pass --batch {2 * world()} or more"
        )
    guidance_vectors = args.K - 1  # Eq. 5's k-means over the base vectors
    if args.method == "bcpt" and guidance_vectors > len(args.base):
        print(
            f"warning: --K {args.K} asks Eq. 5 for {guidance_vectors} guidance vectors from "
            f"{len(args.base)} base classes: at most {len(args.base)} differ, the rest repeat"
        )
    if args.method == "generic":  # fold-free: every class is a label
        args.fold = None
        args.base = list(range(1, N_CLASSES[args.dataset] + 1))
        args.novel = []
    return args


def finetuning_default(args, argv):
    """On a world, fine-tuning the stand-in (--weights a file) follows the recipe chosen on the
    seed-0 worlds (RESULTS.md), unless typed: lr 0.001 (from 0.01, 0.001, 0.0001; the paper
    fine-tunes ImageNet weights gently too, at 2.5e-4) and Eq. 4 as per-term means."""
    from_weights = args.weights not in ("none", "imagenet")
    if args.dataset not in STANDIN_ROOTS or not from_weights:
        return
    if not typed(argv, "--lr"):
        args.lr = 0.001
    if not typed(argv, "--loss-scale"):
        args.loss_scale = "mean"


def generic_defaults(args, argv):
    """--method generic: fold-free, on the stand-in root; its flags' defaults, unless typed."""
    for flag in ("--fold", "--select", "--novel-images"):
        if typed(argv, flag):
            raise KitError(
                f"{flag}: --method generic has no folds, no val images and no novel classes"
            )
    if not typed(argv, "--train-pool"):
        args.train_pool = "aug"
    if args.dataset not in STANDIN_ROOTS:
        return
    # a world: its companion root, and from random weights 2 epochs teach it nothing (RESULTS.md)
    if not typed(argv, "--data-root"):
        args.data_root = STANDIN_ROOTS[args.dataset]
    if not typed(argv, "--epochs"):
        args.epochs = 30
    if not typed(argv, "--lr"):
        args.lr = 0.03


# ============ The network: backbone -> pixel embeddings I (B, D, h, w) -> W or PSPNet ============
class PretrainNet(nn.Module):
    """Backbone + W (1x1 conv, no bias, Sec. 2.2) or the PSPNet head. standard: background + base
    columns; bcpt: base columns only, the background the buffer `centers` P (D, K), `guidance`
    G (D, K-1) warm-starts the next k-means; generic: a linear layer (with bias) from the pooled
    last layer to every class."""

    def __init__(self, backbone, n_base, method, K, head):
        super().__init__()
        self.backbone = backbone
        self.method = method
        d = backbone.channels[4]
        if head == "psp":
            self.psp = PSPHead(d, n_base + 1)
        else:
            # standard scores background too; BCPT's background is the centres
            columns = n_base + 1 if method == "standard" else n_base
            self.W = nn.Conv2d(d, columns, 1, bias=method == "generic")
        if method == "bcpt":
            centers = F.normalize(torch.randn(d, K), dim=0)  # random unit vectors (Sec. 2.3)
            self.register_buffer("centers", centers)
            self.register_buffer("guidance", torch.zeros(d, K - 1))
            # the background pixels each centre took over the whole run (0: a dead centre)
            self.register_buffer("centre_pixels", torch.zeros(K, dtype=torch.long))

    def w(self):
        """W as the paper writes it, (D, C): column c is the projection vector w_c."""
        return self.W.weight[:, :, 0, 0].t().float()

    def forward(self, x):
        return self.backbone(x)[4]  # (B, D, h, w): the last layer's pixel embeddings (Sec. 2.2)

    @fp32
    def linear(self, emb):
        """W applied to every pixel embedding: (B, D, h, w) -> (B, C, h, w)."""
        return self.W(emb)

    def logits(self, emb):
        """Scores of background + base classes (B, 1 + n_base, h, w); BCPT's background is its
        best centre."""
        if hasattr(self, "psp"):
            return self.psp(emb)
        if self.method == "standard":
            return self.W(emb)
        centre_scores = torch.einsum("dk,bdhw->bkhw", self.centers, emb)  # (B, K, h, w)
        background = centre_scores.amax(1, keepdim=True)  # (B, 1, h, w)
        return torch.cat([background, self.W(emb)], 1)


def downsample_labels(y, size):
    """Labels (B, H, W) to the embedding grid (B, h, w), nearest."""
    return F.interpolate(y[:, None].float(), size=size, mode="nearest")[:, 0].long()


# ============ One iteration, in the paper's order (Sec. 2) ============
def cluster_shares(assign, K):
    """Each centre's share of this batch's background pixels, rounded for the log: K numbers
    summing to 1 (a collapse shows as [1, 0, ...])."""
    shares = torch.bincount(assign, minlength=K).float() / max(len(assign), 1)
    return [round(s, 3) for s in shares.tolist()]


def bcpt_step(net, x, y, args, optimise):
    """Guidance (Eqs. 5-7), embeddings, assignment, losses (Eqs. 2-4), SGD step, centre update
    (Eq. 1). x (B, 3, H, W), y (B, H, W): this process's share of the batch (net may be wrapped in
    DistributedDataParallel; the counts and sums below are then the whole batch's). optimise(loss)
    takes the SGD step (plumbing.Trainer: mixed precision, the NaN check, several processes) and
    says whether it did."""
    m = getattr(net, "module", net)  # the network itself: W, the centres P, the guidance G
    # 1. Eqs. 5-7, the guidance (W is the same on every process: so are G and P)
    if not args.no_guidance:
        G, P = guidance_step(m.w().detach(), m.guidance, m.centers, args.mu)
        m.guidance.copy_(G)
        m.centers.copy_(P)
    # 2. the pixel embeddings of the last layer: base pixels and the merged background
    emb = net(x)  # (B, D, h, w)
    labels = downsample_labels(y, emb.shape[-2:])  # (B, h, w)
    I_base, y_base, I_bg = split_pixels(emb, labels)  # (D, N_base), (N_base,), (D, N_bg)
    # 3. S = P^T I_bg and the hard assignment A
    assign = cluster_assign(m.centers, I_bg.detach())  # (N_bg,)
    taken = all_reduce_sum(torch.bincount(assign, minlength=args.K))  # (K,) the whole batch's
    m.centre_pixels += taken
    # 4. Eqs. 2-4, scaled by the pixel counts of the whole batch
    counts = all_reduce_sum(torch.tensor([float(I_base.shape[1]), float(I_bg.shape[1])]))
    W = m.w()  # (D, C)
    loss, metrics = bcpt_loss(
        I_base, y_base, I_bg, assign, W, m.centers, args.alpha, args.loss_scale, args.eq3, counts
    )
    metrics["clusters"] = cluster_shares(assign, args.K)
    metrics["centre_pixels"] = taken  # counted over each log window by main (dead centres)
    # 5. backward and SGD step; 6. Eq. 1, only when the step was taken
    if optimise(loss):
        P_hat, n = cluster_sums(I_bg.detach(), assign, args.K)  # (D, K), (K,): these pixels
        P_hat = all_reduce_sum(P_hat)  # the whole batch's
        n = all_reduce_sum(n)
        m.centers.copy_(momentum_update(m.centers, P_hat, n, args.mu))
    return loss, metrics


def standard_step(net, x, y, args, optimise):
    """The paper's "Standard": cross-entropy over background + base classes, on BAM's PSPNet head
    (logits upsampled to the crop) or on W at the last layer's resolution; then the SGD step."""
    m = getattr(net, "module", net)
    emb = net(x)  # (B, D, h, w)
    if args.head == "psp":
        logits = resize(m.psp(emb).float(), y.shape[-2:])  # (B, 1 + n_base, H, W)
        loss = global_mean_ce(logits, y)
    else:
        loss = global_mean_ce(m.linear(emb), downsample_labels(y, emb.shape[-2:]))
    optimise(loss)
    return loss, {}


def generic_step(net, x, y, args, optimise):
    """The ImageNet stand-in: every class present in the crop's mask is a positive label of the
    image; binary cross-entropy of the linear layer on the globally pooled last layer; then the
    SGD step."""
    m = getattr(net, "module", net)
    emb = net(x)  # (B, D, h, w), h = H / 32 (undilated)
    n = len(args.base)  # every class; 0 background and 255 void are no label
    # column v of `seen` is 1 where value v occurs in the crop (void 255 clamped to n + 1)
    seen = torch.zeros(len(y), n + 2, device=y.device)
    seen.scatter_(1, y.flatten(1).clamp(max=n + 1), 1)
    present = seen[:, 1:-1]  # (B, C) in {0, 1}: classes 1..n
    logits = m.linear(emb.mean((2, 3), keepdim=True))[:, :, 0, 0]  # (B, C)
    bce = F.binary_cross_entropy_with_logits
    loss = global_mean(bce, logits, present, torch.tensor(present.numel()))
    optimise(loss)
    top1 = present.gather(1, logits.argmax(1, keepdim=True)).mean()  # best class is present
    return loss, {"top1": top1.item()}


# ============ Training ============
def build(args, device):
    """-> the network on `device` and SGD: the head at 10x --lr, the backbone at
    --backbone-lr-mult x --lr (BAM)."""
    dilate = args.method != "generic"  # the stand-in is trained as ImageNet weights are
    backbone = build_backbone(args.backbone, args.weights, {"dataset": args.dataset}, dilate)
    net = PretrainNet(backbone, len(args.base), args.method, args.K, args.head)
    net = net.to(device).to(memory_format=memory_format(device))
    head = [p for n, p in net.named_parameters() if not n.startswith("backbone.")]
    groups = [
        {"params": net.backbone.parameters(), "lr": args.lr * args.backbone_lr_mult},
        {"params": head, "lr": 10 * args.lr},
    ]
    return net, torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, weight_decay=args.wd)


def base_learner_check(args, miou):
    """The final base-class mIoU on the val images, beside BAM's base learner's for that fold
    where it exists."""
    backbone = args.backbone.replace("50v2", "50")  # either ResNet-50 stem
    bam = reference("bam-base-learner", args.dataset, backbone, "standard")  # PROTOCOL.md 11.2
    line = f"base-class mIoU on the val images: {miou:.2f}"
    if bam:
        theirs = bam["folds"][args.fold]
        line += (
            f" (BAM's base learner, {args.dataset} fold {args.fold}, {args.backbone}: {theirs}, "
            "PROTOCOL.md 11.2)"
        )
    return line


@torch.no_grad()
def validate_base(net, val_set, args, device):
    """BAM train_base's selection score (PROTOCOL.md 2.5): the val images resized to the crop,
    scored on the padded label; IoU of each class summed over the images. -> (mIoU of the base
    classes, with background)."""
    net.eval()
    n = len(args.base) + 1  # background and the base classes
    conf = torch.zeros(n * n, dtype=torch.long)
    shard = torch.utils.data.Subset(val_set, range(rank(), len(val_set), world()))  # every world-th
    loader = torch.utils.data.DataLoader(shard, batch_size=args.batch, num_workers=args.workers)
    with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not move the training RNG
        for x, y in loader:
            logits = net.logits(net(x.to(device)).float())
            pred = resize(logits, x.shape[-2:]).argmax(1).cpu()  # (B, s, s)
            valid = y != IGNORE
            conf += torch.bincount(y[valid] * n + pred[valid], minlength=n * n)
    conf = all_reduce_sum(conf).view(n, n).double()  # rows: truth, columns: prediction
    iou = conf.diag() / (conf.sum(0) + conf.sum(1) - conf.diag() + 1e-10)
    net.train()
    return 100 * iou[1:].mean().item(), {"val_miou_with_background": 100 * iou.mean().item()}


def training_images(args):
    """The data a pre-training reads, and its training images as a BaseClassDataset."""
    if args.method == "generic":
        data = open_data(args, ("train",), "standin")
    else:
        data = open_data(args, ("train", "val"), "benchmark")
    ids, counts = data["train"]
    if args.novel_images == "drop":  # the ablation: no novel object left in the merged background
        novel_pixels = counts[:, args.novel].sum(1)
        ids = [i for i, c in zip(ids, novel_pixels, strict=True) if c == 0]
    dataset = BaseClassDataset(
        args.data_root, ids, args.dataset, args.base, args.crop, args.scale, args.seed
    )
    return data, dataset


def main(argv=None):
    args = parse_args(argv)
    seed_everything(args.seed)
    device = torch.device(args.device)
    data, dataset = training_images(args)
    args.init_label = pretrain_label(args.weights)
    args.iters_per_epoch = math.ceil(len(dataset) / args.batch)
    args.total_iters = args.epochs * args.iters_per_epoch
    stop = min(args.total_iters, args.max_iters or args.total_iters)
    print(
        f"pretrain {args.method} ({args.head} head): classes {args.base}, {len(dataset)} images "
        f"({args.novel_images} novel-containing), {args.iters_per_epoch} it/epoch x "
        f"{args.epochs} epochs = {args.total_iters} iterations (running to {stop}), "
        f"{args.backbone} from {args.init_label}, device {device}, out {args.out}"
    )
    if args.vis_clusters and args.method != "bcpt":
        print(
            "--vis-clusters: standard pre-training has no background clusters; no pictures will "
            "be written"
        )
    net, opt = build(args, device)
    base_lrs = [args.lr * args.backbone_lr_mult, 10 * args.lr]  # backbone, head
    trainer = Trainer(args, "pretrain", net, opt, base_lrs)
    # several processes: BN trains, so SyncBatchNorm on CUDA
    model = wrap_ddp(net, device, sync_bn=True)
    steps = {"bcpt": bcpt_step, "standard": standard_step, "generic": generic_step}
    train_step = steps[args.method]

    dead_centres = DeadCentres(net, args)

    def step(batch):
        x = batch[0].to(device, memory_format=memory_format(device))
        y = batch[1].to(device)
        loss, metrics = train_step(model, x, y, args, trainer.optimise)
        dead_centres.count(metrics)
        return loss, metrics

    if args.benchmark:
        what = f"pretrain {args.method} {args.backbone} crop {args.crop} batch {args.batch}"
        inner = ("guidance_step", "cluster_assign", "momentum_update")
        return trainer.benchmark(dataset, step, f"{what} {args.precision}", inner)
    validate = None
    if args.method != "generic":
        val_ids = data["val"][0]
        val_set = BaseClassDataset(
            args.data_root, val_ids, args.dataset, args.base, None, None, args.seed, args.crop
        )
        validate = functools.partial(validate_base, net, val_set, args, device)
    trainer.fit(dataset, step, stop, argv, data, validate, args.iters_per_epoch, dead_centres)
    if validate:
        report_on_val_images(net, args, data, device, validate, trainer)
    if args.method == "bcpt" and world() > 1:
        check_centres_agree(net)
    if args.vis_clusters and args.method == "bcpt" and is_main():
        visualise_clusters(net, dataset, args, device)


class DeadCentres:
    """The progress line's count of dead centres: how many of the K took no pixel over the last
    log window (from each step's centre_pixels) and over the whole run (the net's buffer)."""

    def __init__(self, net, args):
        self.net = net
        self.bcpt = args.method == "bcpt"
        self.window = torch.zeros(args.K, dtype=torch.long)

    def count(self, metrics):
        """Add a step's pixels per centre (popped: the log shows the counts, not the pixels)."""
        if "centre_pixels" in metrics:
            self.window += metrics.pop("centre_pixels").cpu()

    def __call__(self):
        if not self.bcpt:
            return {}
        dead = {"dead_centres": int((self.window == 0).sum())}
        dead["dead_over_run"] = int((self.net.centre_pixels == 0).sum())
        self.window.zero_()
        return dead


def report_on_val_images(net, args, data, device, validate, trainer):
    """After pre-training: the base-class mIoU (BAM's criterion, PROTOCOL.md 2.5: is the base
    learner trained right?), and what the centres hold, also written to <out>/centres.json."""
    print(base_learner_check(args, validate()[0]))
    held = what_the_centres_hold(net, args, data["val"][0], device)
    if args.method == "bcpt":
        dead = int((net.centre_pixels == 0).sum())
        print(f"dead centres: {dead} of {args.K} took no background pixel in the whole run")
        held["dead_over_run"] = dead
    if is_main():  # beside log.jsonl, which holds the dead centres of every progress line
        write_atomic(os.path.join(args.out, "centres.json"), save_text, held)


def check_centres_agree(net):
    """Eq. 1 all-reduced and Eqs. 5-7 from the same W give one set of centres on every process."""
    mine = net.centers.detach().cpu()
    if any(not torch.equal(theirs, mine) for theirs in gathered(mine)):
        raise KitError("the cluster centres differ between the processes: please report this")
    print(f"centres bit-identical on the {world()} processes")


def memory_format(device):
    """channels_last on CUDA (faster convolutions), the default layout on the CPU."""
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


# ============ What the centres hold: the paper's mechanism, measured ============
def centre_contents(assign, is_novel, K):
    """Pixels of the merged background by centre and kind: assign (N,) the centre of each pixel,
    is_novel (N,) whether it belongs to a novel object (else real background) -> (K, 2) counts,
    [novel objects, real background] per centre."""
    novel = torch.bincount(assign[is_novel], minlength=K)
    background = torch.bincount(assign[~is_novel], minlength=K)
    return torch.stack([novel, background], 1).double()


def novel_as_background(called_background, is_novel):
    """(novel-object pixels the network calls background, novel-object pixels): the merged
    background problem (paper Fig. 1a), counted."""
    novel_pixels = is_novel.sum()
    return torch.stack([(called_background & is_novel).sum(), novel_pixels]).double()


@torch.no_grad()
def what_the_centres_hold(net, args, val_ids, device):
    """On the val images, at the embedding resolution of training: the share of novel-object
    pixels the network calls background (its best score is the background's; BCPT's background is
    its best centre), and for BCPT per centre the share of its pixels that are novel objects and
    that are real background. Prints them and returns them for log.jsonl."""
    net.eval()
    every_class = list(range(1, N_CLASSES[args.dataset] + 1))  # no remap: the labels as they are
    raw = BaseClassDataset(
        args.data_root, val_ids, args.dataset, every_class, None, None, args.seed, args.crop
    )
    shard = torch.utils.data.Subset(raw, range(rank(), len(raw), world()))
    novel_classes = torch.tensor(args.novel, device=device)
    contents = torch.zeros(args.K, 2, dtype=torch.float64, device=device)
    called = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.random.fork_rng(devices=[]):  # the loader's seed draw must not move the RNG
        for x, y in torch.utils.data.DataLoader(shard, batch_size=args.batch):
            emb = net(x.to(device)).float()  # (B, D, h, w)
            labels = downsample_labels(y.to(device), emb.shape[-2:])  # (B, h, w)
            is_novel = torch.isin(labels, novel_classes)
            called_background = net.logits(emb).argmax(1) == 0
            called += novel_as_background(called_background, is_novel)
            if args.method == "bcpt":
                merged = (labels == 0) | is_novel  # the merged background
                pixels = emb.permute(0, 2, 3, 1)[merged].t()  # (D, N)
                assign = cluster_assign(net.centers, pixels)
                contents += centre_contents(assign, is_novel[merged], args.K)
    called = all_reduce_sum(called).tolist()
    contents = all_reduce_sum(contents)
    net.train()
    share = called[0] / max(called[1], 1)
    print(f"novel-object pixels of the val images called background: {100 * share:.1f}%")
    held = {"novel_as_background": share}
    if args.method == "bcpt":
        held["centres"] = describe_centres(contents)
    return held


def describe_centres(contents):
    """Print each centre's share of the val images' merged background and what it holds ->
    [[its share, novel share, real-background share] per centre]."""
    total = contents.sum().clamp(min=1)
    rows = []
    for k, (novel, background) in enumerate(contents.tolist()):
        pixels = max(novel + background, 1)
        rows.append([(novel + background) / total.item(), novel / pixels, background / pixels])
        print(
            f"  centre {k}: {100 * rows[-1][0]:.1f}% of the merged background; of its pixels "
            f"{100 * rows[-1][1]:.1f}% novel objects, {100 * rows[-1][2]:.1f}% real background"
        )
    return rows


@torch.no_grad()
def visualise_clusters(net, dataset, args, device):
    """Fig. 1b: training crops with each background pixel coloured by its cluster centre, drawn
    at least 256 px high, with a key naming each colour's centre and its share of the picture's
    background."""
    net.eval()
    grey_levels = np.linspace(0, 255, args.K).astype(np.uint8)[:, None]
    colours = cv2.applyColorMap(grey_levels, cv2.COLORMAP_JET)[:, 0]  # (K, 3) BGR
    folder = os.path.join(args.out, "clusters")
    os.makedirs(folder, exist_ok=True)
    for i in range(args.vis_clusters):
        x, y = dataset[i]
        emb = net(x[None].to(device))[0].float()  # (D, h, w)
        assign = cluster_assign(net.centers, emb.flatten(1)).reshape(emb.shape[1:])  # (h, w)
        assign = assign.cpu().numpy().astype(np.uint8)
        assign = cv2.resize(assign, x.shape[-1:] * 2, interpolation=cv2.INTER_NEAREST)  # (s, s)
        img = to_bgr_image(x)  # (s, s, 3)
        bg = y.numpy() == 0  # (s, s)
        over = np.where(bg[..., None], 0.4 * img + 0.6 * colours[assign], img).astype(np.uint8)
        zoom = -(-256 // img.shape[0])  # ceil: at least 256 px high
        side_by_side = np.concatenate([img, over], 1)
        pic = cv2.resize(side_by_side, None, fx=zoom, fy=zoom, interpolation=cv2.INTER_NEAREST)
        shares = np.bincount(assign[bg], minlength=args.K) / max(bg.sum(), 1)
        key = np.full((22 * args.K + 6, pic.shape[1], 3), 255, np.uint8)
        for k in range(args.K):
            cv2.rectangle(key, (6, 22 * k + 6), (24, 22 * k + 22), colours[k].tolist(), -1)
            text = f"centre {k}: {100 * shares[k]:.0f}% of the background"
            font = cv2.FONT_HERSHEY_SIMPLEX
            cv2.putText(key, text, (32, 22 * k + 20), font, 0.45, (0, 0, 0), 1, cv2.LINE_AA)
        cv2.imwrite(os.path.join(folder, f"{i:03d}.png"), np.concatenate([pic, key], 0))
    print(
        f"wrote {args.vis_clusters} cluster maps to {folder} (left: crop; right: background by "
        "centre)"
    )


if __name__ == "__main__":
    run(main)
