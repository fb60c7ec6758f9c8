"""common.py: the science of the BCPT kit, in the paper's order. No flags, processes, locks or run
records here: those are plumbing.py's, and this file imports no other file of the kit (every other
one imports it).

Sections:
  1. BCPT: online clustering of the merged background, Eqs. 1-7 (paper Sec. 2)
  2. The ASPP-PFENet few-shot model and PFENet's prior mask (paper Sec. 3.1; PROTOCOL.md 9)
  3. Metrics: class IoU, mIoU, FB-IoU (PROTOCOL.md 6); evaluation.py runs the episodes they score
  4. Data on disk: folds, the VOC layout, the markers of the roots the kit wrote, pools, the
     cached per-class index (PROTOCOL.md 1-3)
  5. Transforms: training augmentation and test geometry (PROTOCOL.md 4, 5)
  6. Datasets: few-shot episodes
  7. Backbones and weight files (PROTOCOL.md 9)
  8. Checkpoint files: written atomically, loaded safely

Shape legend used in comments: B batch, S shots, C channels or classes, D embedding dim,
K cluster centres, H, W spatial size, N pixels. Embeddings are columns, as in the paper:
I (D, N), P (D, K), W (D, C).
"""

import functools
import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV threads inside them only contend
IGNORE = 255


class KitError(Exception):
    """A user-facing error: one line naming the file or flag and the fix."""


def fp32(fn):
    """Run fn in float32 with autocast off: the numerically sensitive steps (the losses of Eqs. 2-4,
    the centre updates of Eqs. 1 and 7, k-means, the prior mask's cosines) stay in full precision
    under mixed precision."""

    @functools.wraps(fn)
    def in_fp32(*args, **kwargs):
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        floats = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        with torch.autocast(device, enabled=False):
            return fn(*floats, **kwargs)

    return in_fp32


# ============ 1. BCPT: online clustering of the merged background (paper Sec. 2) ============
def split_pixels(emb, y):
    """Sec. 2.2: embeddings (B, D, h, w) and labels (B, h, w) -> I_base (D, N_base) with its
    labels y_base (N_base,) in 1..n_base, and I_bg (D, N_bg) of the merged background; 255 pixels
    are dropped."""
    rows = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float()  # (N, D)
    y = y.reshape(-1)  # (N,)
    is_base = (y > 0) & (y != IGNORE)
    return rows[is_base].t(), y[is_base], rows[y == 0].t()  # (D, N_base), (N_base,), (D, N_bg)


def cluster_assign(P, I_bg):
    """Sec. 2.1: S = P^T I_bg (K, N_bg); each pixel goes to its most similar centre (the one-hot
    columns of the assignment matrix A), returned as centre ids (N_bg,)."""
    return (P.t() @ I_bg).argmax(0)


@fp32
def cluster_sums(I_bg, assign, K):
    """Sec. 2.1: P_hat = I_bg A^T (D, K), the sum of the background embeddings given to each
    centre, and each centre's pixel count (K,). Several processes: the caller sums both over the
    ranks (Eq. 1 sees the batch)."""
    A_t = F.one_hot(assign, K).to(I_bg.dtype)  # (N_bg, K) = A^T
    return I_bg @ A_t, A_t.sum(0)  # (D, K), (K,)


@fp32
def momentum_update(P, P_hat, counts, mu):
    """Eq. (1): p <- mu p/|p| + (1 - mu) p_hat/|p_hat| for each centre; a centre with no pixel in
    the batch (counts 0) keeps its value (Eq. 1 is undefined there). P, P_hat (D, K),
    counts (K,)."""
    moved = mu * F.normalize(P, dim=0) + (1 - mu) * F.normalize(P_hat, dim=0)  # Eq. 1
    return torch.where(counts > 0, moved, P)


@fp32
def bcpt_loss(I_base, y_base, I_bg, assign, W, P, alpha, scale="sum", eq3="centres", counts=None):
    """Eqs. (2)-(4). I_base (D, N_base) labelled y_base in 1..C; I_bg (D, N_bg) assigned to
    centres `assign` (N_bg,); base vectors W (D, C); centres P (D, K) (a buffer: no gradient).
    Two readings the paper leaves open (README, readings): eq3, Eq. 3's softmax over the base
    vectors and the K centres ('centres') or the base vectors only ('base'); scale, Eq. 4's sums
    per pixel: 'sum' divides both by N_base + N_bg, 'mean' each by its own pixels.
    counts: (N_base, N_bg) of the whole batch when it is split over processes (default: these
    pixels'). -> (L_total, {"l_base": Eq. 3 per base pixel, "l_bm": Eq. 2 per background pixel})."""
    # Eq. 3: a base pixel against the base vectors (and the K background centres)
    logits = I_base.t() @ W  # (N_base, C)
    if eq3 == "centres":
        logits = torch.cat([logits, I_base.t() @ P], 1)  # (N_base, C + K)
    l_base = F.cross_entropy(logits, y_base - 1, reduction="sum")
    # Eq. 2: a background pixel against the K centres, its own assigned centre as the target
    l_bm = F.cross_entropy(I_bg.t() @ P, assign, reduction="sum")  # logits (N_bg, K)
    # Eq. 4: sum over base pixels + alpha * sum over background pixels
    if counts is None:
        counts = (I_base.shape[1], I_bg.shape[1])
    n_base, n_bg = counts
    if scale == "sum":  # per pixel: a base pixel weighs 1 / N, a background pixel alpha / N
        loss = (l_base + alpha * l_bm) / max(n_base + n_bg, 1)
    else:  # per pixel: a base pixel weighs 1 / N_base, a background pixel alpha / N_bg
        loss = l_base / max(n_base, 1) + alpha * l_bm / max(n_bg, 1)
    per_pixel = {
        "l_base": l_base.item() / max(I_base.shape[1], 1),
        "l_bm": l_bm.item() / max(I_bg.shape[1], 1),
    }
    return loss, per_pixel


@fp32
def kmeans(x, init, iters=10):
    """Eq. (5): Lloyd's k-means on the columns of x (D, C), from init (D, k); an empty cluster
    keeps its centre. Deterministic: no random restarts."""
    g = init.clone()
    for _ in range(iters):
        assign = torch.cdist(x.t(), g.t()).argmin(1)  # (C,)
        a = F.one_hot(assign, g.shape[1]).to(x.dtype)  # (C, k)
        counts = a.sum(0)
        g = torch.where(counts > 0, (x @ a) / counts.clamp(min=1), g)  # (D, k)
    return g


def farthest_point_init(x, k):
    """Deterministic k-means start: column 0, then repeatedly the column farthest from those
    chosen."""
    chosen = [0]
    for _ in range(k - 1):
        distance = torch.cdist(x.t(), x.t()[chosen]).min(1).values  # to the nearest chosen column
        chosen.append(int(distance.argmax()))
    return x[:, chosen].clone()


@fp32
def guide_centers(P, G, mu):
    """Eqs. (6)-(7). Eq. 6: M (K-1, K) maximising Tr(M^T G^T P) with one 1 per row, i.e. each
    guidance vector goes to its most similar centre. Eq. 7: p <- mu p + (1 - mu) g_hat/|g_hat|,
    g_hat the sum of the guidance vectors given to p; centres given none are unchanged.
    P (D, K), G (D, K-1)."""
    M = F.one_hot((G.t() @ P).argmax(1), P.shape[1]).to(P.dtype)  # (K-1, K), Eq. 6
    g_hat = G @ M  # (D, K)
    moved = mu * P + (1 - mu) * F.normalize(g_hat, dim=0)  # Eq. 7
    return torch.where(M.sum(0) > 0, moved, P)


def guidance_step(W, G, P, mu):
    """Sec. 2.3, at the start of every iteration: Eq. 5 k-means over the base vectors W (D, C),
    warm-started from the previous guidance G (D, K-1) (farthest points the first time), then
    Eqs. 6-7. -> (G, P)."""
    if G.abs().sum() == 0:  # the first iteration: the guidance buffer is still all zeros
        G = farthest_point_init(W, G.shape[1])
    G = kmeans(W, G)  # Eq. 5
    return G, guide_centers(P, G, mu)  # Eqs. 6-7


# ============ 2. The ASPP-PFENet few-shot model (paper Sec. 3.1; PROTOCOL.md 9) ============
def masked_average_pooling(feat, mask):
    """Prototype p = sum_hw F*M / (sum_hw M + 0.0005) (PFENet).
    feat (B, C, H, W), mask (B, 1, H, W) -> (B, C)."""
    return (feat * mask).sum((2, 3)) / (mask.sum((2, 3)) + 5e-4)


@fp32
def prior_mask(query_feat, support_feat, support_mask):
    """PFENet's training-free prior for ONE shot (the caller averages shots): for each query
    position the max over support positions of cos(f_q, f_s * M), then min-max over the query's
    positions. query_feat (B, C, H, W), support_feat (B, C, h, w), support_mask (B, 1, h, w)
    -> (B, 1, H, W) in [0, 1]."""
    b, _, h, w = query_feat.shape
    q = query_feat.flatten(2)  # (B, C, Nq)
    s = (support_feat * support_mask).flatten(2)  # (B, C, Ns)
    norms = s.norm(dim=1)[:, :, None] * q.norm(dim=1)[:, None, :]  # (B, Ns, Nq)
    cos = torch.bmm(s.transpose(1, 2), q) / (norms + 1e-7)  # (B, Ns, Nq)
    prior = cos.max(1).values  # (B, Nq)
    lo, hi = prior.min(1, keepdim=True).values, prior.max(1, keepdim=True).values
    return ((prior - lo) / (hi - lo + 1e-7)).view(b, 1, h, w)  # (B, 1, H, W)


def resize(x, size):
    """Bilinear with align_corners, as PFENet and BAM resize features, masks and logits
    (PROTOCOL.md 10.13). x (B, C, H, W) -> (B, C, *size)."""
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def frozen_features(backbone, images, masks=None):
    """One no-grad pass of the frozen backbone. images (N, 3, H, W) -> mid (N, C2+C3, h, w):
    layer3 and layer2 concatenated (VGG's layer2 resized to layer3), high = layer4 (N, C4, h', w').
    With masks (N, 1, H, W) in {0, 1} (a support), layer4 runs on layer3 * M as in PFENet, and the
    masks resized to both sizes are returned too: (mid, high, mask_mid, mask_high)."""
    with torch.no_grad():
        f2 = backbone.layer2(backbone.layer1(backbone.layer0(images)))
        f3 = backbone.layer3(f2)
        if f2.shape[-2:] != f3.shape[-2:]:  # VGG: layer2 is twice layer3's size
            f2 = resize(f2, f3.shape[-2:])
        mid = torch.cat([f3, f2], 1)
        if masks is None:
            return mid, backbone.layer4(f3)
        m3 = resize(masks, f3.shape[-2:])  # soft mask at the feature size (PROTOCOL.md 9.4)
        high = backbone.layer4(f3 * m3)
        return mid, high, m3, resize(masks, high.shape[-2:])


def shot_prior(q_high, s_high, s_mask, shots, weights=None):
    """K-shot prior: the mean over shots of prior_mask, or their weighted sum with weights (B, S).
    q_high (B, C, H, W), s_high (B*S, C, h, w), s_mask (B*S, 1, h, w) -> (B, 1, H, W)."""
    s_high = s_high.unflatten(0, (-1, shots))  # (B, S, C, h, w)
    s_mask = s_mask.unflatten(0, (-1, shots))  # (B, S, 1, h, w)
    priors = [prior_mask(q_high, s_high[:, k], s_mask[:, k]) for k in range(shots)]
    priors = torch.stack(priors)  # (S, B, 1, H, W)
    if weights is None:
        return priors.mean(0)
    return (weights.t()[:, :, None, None, None] * priors).sum(0)


@fp32
def gram(feat):
    """Normalised Gram matrix of the channels: (B, C, h, w) -> (B, C, C), entry (i, j) =
    <F_i, F_j> / (|F_i| |F_j| + 1e-7), F_i channel i flattened over the positions (BAM, PROTOCOL.md
    9.7). In float32: under fp16 a channel of RMS above ~4.3 on a 60 x 60 map overflows |F_i|^2 to
    inf."""
    f = feat.flatten(2)  # (B, C, N)
    n = f.norm(dim=2, keepdim=True)  # (B, C, 1)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(n, n.transpose(1, 2)) + 1e-7)


class ShotWeights(nn.Module):
    """BAM's K-shot weighting (PROTOCOL.md 9.7): a support's scene difference
    est_k = |G_query - G_k|_F / C from the layer-2 Gram matrices; the est sorted ascending pass 1x1
    convs K -> 2 -> K (ReLU between); back in shot order, a softmax over the shots weighs the
    supports' priors and prototypes."""

    def __init__(self, shots):
        super().__init__()
        self.rw = nn.Sequential(
            nn.Conv2d(shots, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(2, shots, 1)
        )

    def forward(self, q_low, s_low):
        """q_low (B, C, h, w), s_low (B, S, C, h, w) -> weights (B, S), each row summing to 1."""
        g_query = gram(q_low)[:, None]  # (B, 1, C, C)
        g_support = gram(s_low.flatten(0, 1)).unflatten(0, s_low.shape[:2])  # (B, S, C, C)
        est = (g_query - g_support).flatten(2).norm(dim=2) / q_low.shape[1]  # (B, S)
        sorted_est, order = est.sort(1)
        w_sorted = self.rw(sorted_est[:, :, None, None])[:, :, 0, 0]  # (B, S), in sorted order
        w = w_sorted.gather(1, order.argsort(1))  # (B, S), back in shot order
        return w.softmax(1)


class ASPP(nn.Module):
    """BAM's ASPP_meta: global pool + 1x1, 1x1, 3x3 dilated 6/12/18, each conv + ReLU, concatenated.
    (B, C, H, W) -> (B, 5C, H, W). Kaiming-normal init as BAM."""

    def __init__(self, c=256):
        super().__init__()
        self.pool = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.ReLU(inplace=True)
        )
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))]
            + [
                nn.Sequential(nn.Conv2d(c, c, 3, padding=d, dilation=d), nn.ReLU(inplace=True))
                for d in (6, 12, 18)
            ]
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        # (B, C, H, W): the pooled vector broadcast back
        g = self.pool(x).expand(-1, -1, *x.shape[-2:])
        return torch.cat([g] + [b(x) for b in self.branches], 1)  # (B, 5C, H, W)


class PSPHead(nn.Module):
    """BAM's base-learner head (PROTOCOL.md 9.6): pyramid pooling (bins 1, 2, 3, 6; each a 1x1
    conv D -> D/4 + BN + ReLU, upsampled and concatenated with the input), a 3x3 conv 2D -> 512 +
    BN + ReLU + Dropout2d(0.1), then a 1x1 conv to the classes. (B, D, h, w) -> (B, classes, h, w).
    """

    def __init__(self, d, classes, bins=(1, 2, 3, 6)):
        super().__init__()
        self.ppm = nn.ModuleList(
            [
                nn.Sequential(
                    nn.AdaptiveAvgPool2d(b),
                    nn.Conv2d(d, d // 4, 1, bias=False),
                    nn.BatchNorm2d(d // 4),
                    nn.ReLU(inplace=True),
                )
                for b in bins
            ]
        )
        self.cls = nn.Sequential(
            nn.Conv2d(2 * d, 512, 3, padding=1, bias=False),
            nn.BatchNorm2d(512),
            nn.ReLU(inplace=True),
            nn.Dropout2d(0.1),
            nn.Conv2d(512, classes, 1),
        )

    def forward(self, x):
        pooled = [resize(f(x), x.shape[-2:]) for f in self.ppm]  # 4 x (B, D/4, h, w)
        return self.cls(torch.cat([x] + pooled, 1))  # (B, 2D, h, w) in


def _conv_relu(c_in, c_out, k):
    """A k x k convolution without bias (padding k // 2) and a ReLU, as BAM's meta learner's."""
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]


class AsppPFENet(nn.Module):
    """ASPP PFENet (paper Sec. 3.1): BAM's meta learner without the base-learner ensemble. The
    backbone is frozen (no gradient, BN always in eval); everything else trains. fusion of the K
    supports' priors and prototypes: 'mean' (PFENet) or 'weighted' (BAM's ShotWeights, for a fixed
    shot count)."""

    def __init__(self, backbone, shots=1, fusion="mean"):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        mid = backbone.channels[2] + backbone.channels[3]
        self.down_query = nn.Sequential(*_conv_relu(mid, 256, 1), nn.Dropout2d(0.5))
        self.down_supp = nn.Sequential(*_conv_relu(mid, 256, 1), nn.Dropout2d(0.5))
        # [query, prototype, prior] -> 256
        self.init_merge = nn.Sequential(*_conv_relu(256 * 2 + 1, 256, 1))
        self.aspp = ASPP(256)
        self.res1 = nn.Sequential(*_conv_relu(256 * 5, 256, 1))
        self.res2 = nn.Sequential(*_conv_relu(256, 256, 3), *_conv_relu(256, 256, 3))
        self.cls = nn.Sequential(*_conv_relu(256, 256, 3), nn.Dropout2d(0.1), nn.Conv2d(256, 2, 1))
        if fusion == "weighted" and shots > 1:
            self.shot_weights = ShotWeights(shots)

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # BN statistics frozen (BAM fix_bn, PROTOCOL.md 9.3)
        return self

    def forward(self, query, support, support_mask):
        """query (B, 3, H, W), support (B, S, 3, H, W), support_mask (B, S, H, W) in {0, 1, 255}
        -> logits (B, 2, H, W), upsampled bilinearly (align_corners) to the input size."""
        shots = support.shape[1]
        q_mid, q_high = frozen_features(self.backbone, query)
        m = (support_mask == 1).float().flatten(0, 1).unsqueeze(1)  # (B*S, 1, H, W); 255 -> 0
        s_mid, s_high, m_mid, m_high = frozen_features(self.backbone, support.flatten(0, 1), m)
        w = None  # (B, S) shot weights, or None for the mean
        if hasattr(self, "shot_weights"):  # layer-2 features: the channels after layer3's in `mid`
            c3 = self.backbone.channels[3]
            w = self.shot_weights(q_mid[:, c3:], s_mid[:, c3:].unflatten(0, (-1, shots)))
        q = self.down_query(q_mid)  # (B, 256, h, w)
        protos = masked_average_pooling(self.down_supp(s_mid), m_mid)  # (B*S, 256)
        protos = protos.unflatten(0, (-1, shots))  # (B, S, 256)
        proto = protos.mean(1) if w is None else (w[:, :, None] * protos).sum(1)  # (B, 256)
        prior = resize(shot_prior(q_high, s_high, m_high, shots, w), q.shape[-2:])  # (B, 1, h, w)
        merged = torch.cat([q, proto[:, :, None, None].expand_as(q), prior], 1)  # (B, 513, h, w)
        x = self.init_merge(merged)
        x = self.res1(self.aspp(x))  # (B, 1280, h, w) -> (B, 256, h, w)
        x = self.res2(x) + x
        return resize(self.cls(x), query.shape[-2:])  # (B, 2, H, W)


# ============ 3. Metrics (PROTOCOL.md 6) ============
class FewShotIoU:
    """Per-class foreground IoU summed over all episodes of a class, mIoU over the classes, FB-IoU;
    in percent; and the share of episodes answered with some foreground (near 0: the all-background
    answer, a collapsed model)."""

    def __init__(self, classes):
        self.classes = list(classes)
        # foreground [I, U] per class
        self.per_class = torch.zeros(len(self.classes), 2, dtype=torch.float64)
        # [I, U, episodes] x [background, foreground answered]
        self.fb = torch.zeros(3, 2, dtype=torch.float64)

    def update(self, pred, target, cls):
        """pred (H, W) in {0, 1}; target (H, W) in {0, 1, 255}; 255 pixels count nowhere."""
        valid = target != IGNORE
        p = pred[valid].long().cpu()
        t = target[valid].long().cpu()
        if p.numel() and (p.max() > 1 or t.max() > 1):
            raise ValueError("FewShotIoU.update expects pred in {0, 1} and target in {0, 1, 255}")
        inter = torch.bincount(t[p == t], minlength=2).double()
        predicted = torch.bincount(p, minlength=2).double()
        union = predicted + torch.bincount(t, minlength=2).double() - inter
        answered = torch.tensor([1.0, float(p.any())])  # one episode, with foreground or not
        self.fb += torch.stack([inter, union, answered])
        self.per_class[self.classes.index(cls)] += torch.stack([inter[1], union[1]])
        return inter, union  # [background, foreground] of this episode

    def reduce(self, total):
        """Each count replaced by total(count): plumbing.all_reduce_sum sums them over the
        processes (exactly: they are integers held in float64)."""
        self.per_class = total(self.per_class)
        self.fb = total(self.fb)
        return self

    def class_iou(self):
        pairs = zip(self.classes, self.per_class, strict=True)
        return {c: float(100 * i / (u + 1e-10)) for c, (i, u) in pairs}

    def miou(self):
        # a class with no episode counts 0
        return sum(self.class_iou().values()) / len(self.classes)

    def fb_iou(self):
        return float(100 * (self.fb[0] / (self.fb[1] + 1e-10)).mean())

    def foreground_answers(self):
        return float(self.fb[2, 1] / max(self.fb[2, 0], 1))


# ============ 4. Data on disk: folds, VOC layout, pools, the index (PROTOCOL.md 1-3) ============
N_CLASSES = {"pascal": 20, "coco": 80, "synthetic": 20, "synthetic2": 20}
# the two built-in worlds, and their ImageNet stand-ins
SYNTHETIC_ROOTS = {"synthetic": "data/synthetic", "synthetic2": "data/synthetic2"}
STANDIN_ROOTS = {w: root + "-standin" for w, root in SYNTHETIC_ROOTS.items()}


def novel_classes(dataset, fold, coco_split="interleaved"):
    """Novel (test) class ids of a fold. PASCAL/synthetic: 5i+1..5i+5.
    COCO interleaved: (c-1) % 4 == i."""
    if dataset not in N_CLASSES:
        raise KitError(f"--dataset {dataset!r}: choose one of {', '.join(N_CLASSES)}")
    if fold not in (0, 1, 2, 3):
        raise KitError(f"--fold {fold}: the folds are 0, 1, 2 and 3")
    n = N_CLASSES[dataset]
    if dataset == "coco" and coco_split == "interleaved":
        return [c for c in range(1, n + 1) if (c - 1) % 4 == fold]
    return list(range(fold * n // 4 + 1, (fold + 1) * n // 4 + 1))


def base_classes(dataset, fold, coco_split="interleaved"):
    """The other classes, in increasing id order (the order of the pretraining label remap)."""
    novel = set(novel_classes(dataset, fold, coco_split))
    return [c for c in range(1, N_CLASSES[dataset] + 1) if c not in novel]


IMAGES = "JPEGImages"
MASKS = "SegmentationClassAug"
LISTS = os.path.join("ImageSets", "Segmentation")
CACHE_DIR = ".fss_cache"  # the per-class index cache inside a data root
LAYOUT_FIX = (
    "a data root holds JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png and "
    "ImageSets/Segmentation/val.txt; build one with python prepare_data.py pascal|coco"
)
# written into a finished synthetic world: its parameters and checksum (JSON)
SYNTHETIC_MARKER = ".complete"
# written by the pascal / coco commands into their --out
PREPARED_MARKER = ".prepared.json"


def world_marker(root):
    """The marker of a finished world at root (world, kind, n_train, n_val, size, seed, checksum),
    or None. A marker from before the second world names none: it is the first; one from before the
    stand-in, a benchmark."""
    try:
        with open(os.path.join(root, SYNTHETIC_MARKER)) as f:
            params = json.load(f)
        if isinstance(params, dict) and {"n_train", "n_val", "size", "seed"} <= set(params):
            return {"world": "synthetic", "kind": "benchmark", "checksum": None, **params}
    except (OSError, ValueError):
        pass
    return None


def root_made_by(root):
    """The data a kit command wrote into root, from its marker: 'pascal', 'coco', 'synthetic' or
    'synthetic2'; None for a root without one."""
    try:
        with open(os.path.join(root, PREPARED_MARKER)) as f:
            return json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError):
        return (world_marker(root) or {}).get("world")


def claim_root(root, flag, kind):
    """The kit writes a data root only if it does not exist, is empty, or carries the kit's own
    marker of the same kind ('synthetic', 'synthetic2', 'pascal' or 'coco'); anything else is
    refused untouched."""
    if not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root)):
        return
    made = root_made_by(root)
    if made == kind:
        return
    names = set(os.listdir(root)) if os.path.isdir(root) else set()
    if made:
        hint = f"it holds a {made} root made by this kit: did you mean --dataset {made}?"
    elif {IMAGES, MASKS} & names:
        hint = (
            "it looks like a prepared VOC/COCO root: did you mean --dataset pascal or --dataset "
            "coco?"
        )
    else:
        hint = "point it at a new or empty folder"
    raise KitError(
        f"{flag} {root} is not empty and was not made by this kit for {kind} data, so nothing "
        f"is written there: {hint}"
    )


def read_list(path):
    """The ids of a list file, one per line, each the whole line (an id may hold a space)."""
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def image_pools(root, train_pool="aug", need_train=True, need_val=True):
    """(train ids, val ids). 'aug': every mask not in val.txt; 'oslsm': train.txt +
    train_noval.txt (5953 on VOC). Without need_train, no training list is read (train ids None);
    without need_val, an empty val.txt is allowed (an ImageNet stand-in's root has no val image)."""
    needed = [IMAGES, MASKS, os.path.join(LISTS, "val.txt")]
    for sub in [root] + [os.path.join(root, name) for name in needed]:
        if not os.path.exists(sub):
            raise KitError(f"--data-root: {sub} does not exist ({LAYOUT_FIX})")
    val_list = os.path.join(root, LISTS, "val.txt")
    val = sorted(set(read_list(val_list)))
    if not val and need_val:
        raise KitError(f"--data-root {root}: {val_list} lists no image; {LAYOUT_FIX}")
    val_set = set(val)
    if not need_train:
        return None, val
    if train_pool == "aug":
        train = {f[:-4] for f in os.listdir(os.path.join(root, MASKS)) if f.endswith(".png")}
    else:
        lists = [os.path.join(root, LISTS, name) for name in ("train.txt", "train_noval.txt")]
        missing = [p for p in lists if not os.path.exists(p)]
        if missing:
            raise KitError(
                f"--train-pool oslsm (the PASCAL default) needs {' and '.join(missing)}: make them "
                "with python prepare_data.py pascal --train-noval train_noval.txt, or pass "
                "--train-pool aug"
            )
        train = set(read_list(lists[0])) | set(read_list(lists[1]))
    return sorted(train - val_set), val


def read_mask(root, img_id, n_classes):
    """Single-channel class-index mask (H, W) uint8, checked for range."""
    path = os.path.join(root, MASKS, img_id + ".png")
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        fix = f"restore it or drop {img_id} from the lists"
        raise KitError(f"cannot read mask {path}: missing or corrupt; {fix}")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise KitError(
            f"mask {path} is not a single-channel 8-bit index PNG (palette or RGB?); "
            "convert it with python prepare_data.py pascal"
        )
    bad = (label > n_classes) & (label != IGNORE)
    if bad.any():
        raise KitError(
            f"mask {path} has value {int(label[bad][0])} outside 0..{n_classes} and 255: "
            f"wrong --dataset, or a corrupt mask"
        )
    return label


def read_pair(root, img_id, n_classes):
    """RGB float32 image (H, W, 3) in 0..255 and its mask (H, W)."""
    path = os.path.join(root, IMAGES, img_id + ".jpg")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        fix = f"re-extract it or drop {img_id} from the lists"
        raise KitError(f"cannot read image {path}: missing or corrupt; {fix}")
    label = read_mask(root, img_id, n_classes)
    if label.shape != img.shape[:2]:
        raise KitError(
            f"image {path} is {img.shape[1]}x{img.shape[0]} but its mask is "
            f"{label.shape[1]}x{label.shape[0]}: regenerate the mask"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32), label


def check_image_file(root, img_id, shape):
    """Check one image against its mask's `shape` (H, W) without decoding it (at every index
    scan): the header's size, and for a JPEG the end-of-image marker that a truncated download
    lacks (a file without it is decoded; prepare_data.py verify decodes every file)."""
    path = os.path.join(root, IMAGES, img_id + ".jpg")
    fix = f"re-extract or re-download it, or drop {img_id} from the lists"
    try:
        with Image.open(path) as im:
            w, h = im.size
            if (h, w) != tuple(shape):
                mask_size = f"{shape[1]}x{shape[0]}"
                raise KitError(
                    f"image {path} is {w}x{h} but its mask is {mask_size}: regenerate it"
                )
            with open(path, "rb") as f:
                f.seek(max(os.path.getsize(path) - 64, 0))
                tail = f.read().rstrip(b"\0")
            if im.format == "JPEG" and not tail.endswith(b"\xff\xd9"):  # no end-of-image marker
                im.load()
    except KitError:
        raise
    except Exception as e:
        raise KitError(
            f"cannot read image {path} ({type(e).__name__}: {e}): missing, truncated or corrupt; "
            f"{fix}"
        ) from None


def _cache_path(root, key):
    """Where the index of `key` is cached: in the data root, or under ~/.cache where the root is
    read-only."""
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "bcpt")
    for folder in (os.path.join(root, CACHE_DIR), home_cache):
        try:
            os.makedirs(folder, exist_ok=True)
            if os.access(folder, os.W_OK):
                return os.path.join(folder, f"counts-{key}.npy")
        except OSError:
            continue
    raise KitError(f"no writable cache folder under {root} or ~/.cache")


def _scan(root, img_id, n_classes):
    """Index scan of one image: its mask's class pixel counts (n_classes + 1,), after
    check_image_file."""
    label = read_mask(root, img_id, n_classes)
    check_image_file(root, img_id, label.shape)
    return np.bincount(label.ravel(), minlength=256)[: n_classes + 1]


def class_pixel_counts(root, ids, n_classes, workers=2):
    """(N images, n_classes + 1) int64 pixel counts per class, scanned once then cached; the scan
    also checks every image cheaply (check_image_file), so a truncated file stops the run before
    training.

    The cache is keyed by the id list and each image's and mask's size and mtime, so a changed
    file rescans; the pixel rule is applied afterwards, so changing --min-pixels needs no rescan.
    """
    h = hashlib.sha1(f"{n_classes} images".encode())
    for i in ids:
        for p in (os.path.join(root, MASKS, i + ".png"), os.path.join(root, IMAGES, i + ".jpg")):
            size, mtime = -1, -1
            if os.path.exists(p):
                st = os.stat(p)
                size, mtime = st.st_size, st.st_mtime_ns
            h.update(f"{i}:{size}:{mtime};".encode())
    path = _cache_path(root, h.hexdigest()[:16])
    if os.path.exists(path):
        return np.load(path)
    t0 = time.time()
    counts = np.zeros((0, n_classes + 1), np.int64)
    if ids:
        with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2.imread releases the GIL
            counts = np.stack(list(pool.map(lambda i: _scan(root, i, n_classes), ids)))
    tmp = f"{path}.tmp{os.getpid()}.npy"  # np.save adds .npy to a name without it
    np.save(tmp, counts)
    os.replace(tmp, path)
    seconds = time.time() - t0
    print(f"index: scanned {len(ids)} images and masks in {seconds:.1f}s, cached at {path}")
    return counts


def class_index(ids, counts, classes, min_pixels):
    """{c: [ids whose mask has >= min_pixels pixels of c]}: the support pools (PROTOCOL.md 3.1)."""
    return {c: [ids[j] for j in np.flatnonzero(counts[:, c] >= min_pixels)] for c in classes}


# ============ 5. Transforms: training augmentation, test geometry (PROTOCOL.md 4, 5) ============
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def to_tensor(img, label):
    """(H, W, 3) float RGB 0..255, (H, W) uint8 -> normalised (3, H, W) float32, (H, W) int64."""
    chw = ((img - MEAN) / STD).transpose(2, 0, 1)  # (3, H, W)
    x = torch.from_numpy(np.ascontiguousarray(chw, dtype=np.float32))
    return x, torch.from_numpy(np.ascontiguousarray(label)).long()


def to_bgr_image(x):
    """Inverse of to_tensor for pictures: normalised (3, H, W) -> (H, W, 3) uint8 BGR for
    cv2.imwrite."""
    rgb = np.clip(x.permute(1, 2, 0).numpy() * STD + MEAN, 0, 255).astype(np.uint8)
    return rgb[:, :, ::-1]


def train_transform(img, label, rng, crop, scale, rotate=10.0, keep_fg=False):
    """Scale, rotate (mean / 255 borders), blur, flip, crop with padding; image and mask
    together.

    keep_fg: redraw the crop (up to 31 times) while it keeps < 85% of the label==1 pixels, as
    PFENet does for binary episode masks.
    """
    s = rng.uniform(*scale)  # 1. RandScale
    img = cv2.resize(img, None, fx=s, fy=s, interpolation=cv2.INTER_LINEAR)
    label = cv2.resize(label, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST)
    h, w = label.shape
    if rng.random() < 0.5:  # 2. RandRotate
        rot = cv2.getRotationMatrix2D((w / 2, h / 2), rng.uniform(-rotate, rotate), 1.0)
        img = cv2.warpAffine(img, rot, (w, h), flags=cv2.INTER_LINEAR, borderValue=MEAN.tolist())
        label = cv2.warpAffine(label, rot, (w, h), flags=cv2.INTER_NEAREST, borderValue=IGNORE)
    if rng.random() < 0.5:  # 3. Gaussian blur, 5x5, sigma from the kernel size (1.1)
        img = cv2.GaussianBlur(img, (5, 5), 0)
    if rng.random() < 0.5:  # 4. horizontal flip
        img, label = img[:, ::-1], label[:, ::-1]
    # 5. pad to the crop (half before, the rest after), then a random crop
    ph, pw = max(crop - h, 0), max(crop - w, 0)
    if ph or pw:
        pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)  # top, bottom, left, right
        img = np.ascontiguousarray(img)
        label = np.ascontiguousarray(label)
        img = cv2.copyMakeBorder(img, *pad, cv2.BORDER_CONSTANT, value=MEAN.tolist())
        label = cv2.copyMakeBorder(label, *pad, cv2.BORDER_CONSTANT, value=IGNORE)
    h, w = label.shape
    fg = (label == 1).sum()
    for _ in range(32):
        y = rng.integers(0, h - crop + 1)
        x = rng.integers(0, w - crop + 1)
        kept = (label[y : y + crop, x : x + crop] == 1).sum()
        if not keep_fg or kept >= 0.85 * fg:
            break
    return to_tensor(img[y : y + crop, x : x + crop], label[y : y + crop, x : x + crop])


def test_transform(img, label, size, geometry="pfenet"):
    """pfenet (PROTOCOL.md 5.1): keep aspect, longer side to `size`, both sides floored to a
    multiple of 8, top-left on a size x size canvas (image 0 in raw pixel space, label 255).
    hsnet (PROTOCOL.md 5.3): both sides to size."""
    if geometry == "hsnet":
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_LINEAR)
        label = cv2.resize(label, (size, size), interpolation=cv2.INTER_NEAREST)
        return to_tensor(img, label)
    h, w = label.shape
    r = size / max(h, w)
    nh = max(8, int(h * r) // 8 * 8)
    nw = max(8, int(w * r) // 8 * 8)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    lab = np.full((size, size), IGNORE, np.uint8)
    lab[:nh, :nw] = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return to_tensor(canvas, lab)


def logits_at_label_size(logits, raw_label):
    """PROTOCOL.md 5.2 ori_resize: logits (B, 2, s, s) -> (B, 2, L, L) with L = max(H, W) of the
    raw label, and the raw label (H, W) pasted top-left into an L x L canvas of 255."""
    h, w = raw_label.shape[-2:]
    side = max(h, w)
    target = torch.full((side, side), IGNORE, dtype=torch.long, device=raw_label.device)
    target[:h, :w] = raw_label
    return resize(logits, (side, side)), target


# ============ 6. Datasets: few-shot episodes (PROTOCOL.md 3) ============
def binarize(label, cls):
    """Episode mask: cls -> 1, 255 kept, everything else (background, other classes) -> 0."""
    return np.where(label == cls, 1, np.where(label == IGNORE, IGNORE, 0)).astype(np.uint8)


class BaseClassDataset(torch.utils.data.Dataset):
    """Pre-training images: base classes -> 1..n_base in id order, novel classes and background
    -> 0 (the merged background, PROTOCOL.md 2.5), 255 kept. Item idx draws its augmentation from
    default_rng([seed, idx]), so a stream of indices gives the same batches for any worker count.
    With test_size: the test geometry instead."""

    def __init__(self, root, ids, dataset, base, crop, scale, seed, test_size=None):
        self.root = root
        self.ids = ids
        self.crop = crop
        self.scale = scale
        self.seed = seed
        self.n_classes = N_CLASSES[dataset]
        self.test_size = test_size
        self.lut = np.zeros(256, np.uint8)  # label remap: base class -> 1..n_base, 255 kept
        self.lut[IGNORE] = IGNORE
        self.lut[base] = np.arange(1, len(base) + 1)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, idx):
        img, label = read_pair(self.root, self.ids[idx % len(self.ids)], self.n_classes)
        label = self.lut[label]
        if self.test_size:
            return test_transform(img, label, self.test_size)
        rng = np.random.default_rng([self.seed, idx])
        return train_transform(img, label, rng, self.crop, self.scale)


class EpisodeDataset(torch.utils.data.Dataset):
    """Few-shot episodes: a query and `shot` supports of one class (PROTOCOL.md 3.2-3.3).
    Training (episodes None): query = data_list[idx % n], class and supports from
    default_rng([seed, idx]), PFENet augmentation. Evaluation: `episodes` drawn up front from
    default_rng(seed) walking data_list in order, test geometry; any worker count."""

    def __init__(
        self,
        root,
        ids,
        counts,
        dataset,
        classes,
        shot,
        min_pixels,
        seed,
        crop=None,
        scale=None,
        test_size=None,
        episodes=None,
        drop_classes=(),
        geometry="pfenet",
    ):
        self.root = root
        self.shot = shot
        self.seed = seed
        self.geometry = geometry
        self.crop = crop
        self.scale = scale
        self.test_size = test_size
        self.n_classes = N_CLASSES[dataset]
        self.classes = list(classes)
        if drop_classes:  # BAM: drop every image containing any pixel of these (the novel) classes
            keep = counts[:, list(drop_classes)].sum(1) == 0
            ids = [i for i, k in zip(ids, keep, strict=True) if k]
            counts = counts[keep]
        self.pools = class_index(ids, counts, self.classes, min_pixels)
        # evaluation draws from the val list, training from the training pool
        images = f"val images ({os.path.join(root, LISTS, 'val.txt')})"
        if episodes is None:
            images = f"training images of {root}"
        for c, pool in self.pools.items():
            if len(pool) < shot + 1:
                raise KitError(
                    f"class {c} has {len(pool)} {images} with >= {min_pixels} pixels; a "
                    f"{shot}-shot episode needs {shot + 1}: check the list and --data-root, or "
                    "lower --shot or --min-pixels"
                )
        kept = (counts[:, self.classes] >= min_pixels).any(1)
        self.data_list = [i for i, k in zip(ids, kept, strict=True) if k]
        # the classes of the set in each query (any pixel count: PROTOCOL.md 3.2)
        self.present = {}
        for j, i in enumerate(ids):
            if kept[j]:
                self.present[i] = [c for c in self.classes if counts[j, c] > 0]
        self.episodes = None
        if episodes:
            rng = np.random.default_rng(seed)
            self.episodes = [self.draw(k, rng) for k in range(episodes)]

    def draw(self, k, rng):
        """(query id, class, support ids): class uniform among the query's classes of the set."""
        query = self.data_list[k % len(self.data_list)]
        cls = int(rng.choice(self.present[query]))
        pool = [i for i in self.pools[cls] if i != query]
        picks = rng.choice(len(pool), self.shot, replace=False)
        return query, cls, [pool[j] for j in picks]

    def __len__(self):
        return len(self.episodes) if self.episodes else len(self.data_list)

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, idx])
        if self.episodes:
            query, cls, supports = self.episodes[idx]
        else:
            query, cls, supports = self.draw(idx, rng)
        pairs = []
        for image_id in [query] + supports:
            img, label = read_pair(self.root, image_id, self.n_classes)
            pairs.append((img, binarize(label, cls)))
        if self.episodes:
            xs = [test_transform(img, label, self.test_size, self.geometry) for img, label in pairs]
        else:
            xs = [
                train_transform(img, label, rng, self.crop, self.scale, keep_fg=True)
                for img, label in pairs
            ]
        item = {
            "query": xs[0][0],  # (3, H, W)
            "query_mask": xs[0][1],  # (H, W)
            "support": torch.stack([x[0] for x in xs[1:]]),  # (S, 3, H, W)
            "support_mask": torch.stack([x[1] for x in xs[1:]]),  # (S, H, W)
            "cls": cls,
        }
        if self.episodes:
            # scored against the original-size label (PROTOCOL.md 5.2), or HSNet's resized one
            if self.geometry == "hsnet":
                item["raw_label"] = xs[0][1]
            else:
                item["raw_label"] = torch.from_numpy(pairs[0][1]).long()
            item["query_id"] = query
            item["support_ids"] = " ".join(supports)
        return item


# ============ 7. Backbones and weight files (PROTOCOL.md 9.1-9.2) ============
BACKBONES = ("resnet50v2", "resnet50", "vgg16", "resnet18")


class Backbone(nn.Module):
    """layer0 .. layer4; forward returns the five feature maps. `channels[i]` = channels of
    layer i."""

    def __init__(self, name, layers, channels):
        super().__init__()
        self.name = name
        self.channels = channels
        self.layer0, self.layer1, self.layer2, self.layer3, self.layer4 = layers

    def forward(self, x):
        feats = []
        for layer in (self.layer0, self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            feats.append(x)
        return feats


def _dilate(layer, dilation):
    """Stride 1 and dilated 3x3 convs in a ResNet stage (PSPNet-style output stride 8)."""
    for m in layer.modules():
        if isinstance(m, nn.Conv2d):
            m.stride = (1, 1)
            if m.kernel_size == (3, 3):
                m.dilation = (dilation, dilation)
                m.padding = (dilation, dilation)
    return layer


def _torchvision_net(name):
    """The unsplit network whose state-dict keys are those of the weight files: torchvision's, or
    for resnet50v2 PSPNet/PFENet/BAM's deep stem (three 3x3 convs 3->64 s2, 64->64, 64->128, each
    BN + ReLU; layer1 then starts from 128 channels; the bottlenecks are torchvision's, with the
    same keys)."""
    models = torchvision.models
    if name != "resnet50v2":
        make = {"resnet50": models.resnet50, "resnet18": models.resnet18, "vgg16": models.vgg16_bn}
        return make[name](weights=None)
    net = models.resnet50(weights=None)
    for k, (c_in, c_out, stride) in enumerate([(3, 64, 2), (64, 64, 1), (64, 128, 1)], 1):
        setattr(net, f"conv{k}", nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False))
        setattr(net, f"bn{k}", nn.BatchNorm2d(c_out))
    net.inplanes = 128
    net.fc = nn.Identity()  # the file's fc (ImageNet classifier) is not used
    net.layer1 = net._make_layer(torchvision.models.resnet.Bottleneck, 64, 3)
    for m in net.modules():  # torchvision's init for the rebuilt parts too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def _imagenet_state(name):
    """torchvision's ImageNet state dict of a backbone, downloaded on first use."""
    if name == "resnet50v2":
        raise KitError(
            "--backbone resnet50v2 has no torchvision ImageNet weights: pass --weights "
            "initmodel/resnet50_v2.pth (PFENet/BAM's file, PROTOCOL.md 9.1)"
        )
    models = torchvision.models
    weights = {
        "resnet50": models.ResNet50_Weights.IMAGENET1K_V1,
        "resnet18": models.ResNet18_Weights.IMAGENET1K_V1,
        "vgg16": models.VGG16_BN_Weights.IMAGENET1K_V1,
    }[name]
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # no network, proxy, ...
        raise KitError(
            f"--weights imagenet: could not download torchvision's {weights} ({type(e).__name__}); "
            f"download {weights.url} elsewhere and pass --weights PATH, or use --weights none"
        ) from None


def backbone_kind(state):
    """Which backbone a state dict holds, from its keys and stem shape: resnet50v2 (3x3 deep
    stem), resnet50, resnet18 (7x7 stem; bottleneck or basic blocks) or vgg16; for unsplit
    (torchvision-style) or split (layer0..layer4) keys alike. None if unknown."""
    stem = state.get("conv1.weight", state.get("layer0.0.weight"))
    split_vgg = "layer0.0.weight" in state and "layer1.0.conv1.weight" not in state
    if "features.0.weight" in state or split_vgg:
        return "vgg16"
    if stem is None:
        return None
    if stem.shape[-1] == 3:
        return "resnet50v2"
    return "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"


def _load_strict(module, state, source, name):
    """load_state_dict(strict=True); a file of another backbone, or with a missing or unexpected
    key, is refused."""
    kind = backbone_kind(state)
    if kind not in (None, name):
        raise KitError(
            f"{source} holds a {kind} backbone but this run has --backbone {name}: pass --backbone "
            f"{kind}, or weights of a {name}"
        )
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1:3]
        raise KitError(f"{source} does not match the backbone: {' '.join(first)[:300]}") from None


def split_state(ckpt, source):
    """The layer0..layer4 part of a kit pre-training checkpoint (backbone.*) or of BAM's base
    learner best.pth ({'state_dict': {'module.layer0...', 'module.encoder...', 'module.ppm...',
    'module.cls...'}}), else None."""
    if "model" in ckpt and "args" in ckpt:  # pretrain_bcpt.py's last.pt / best.pt
        model = ckpt["model"]
        return {
            k.removeprefix("backbone."): v for k, v in model.items() if k.startswith("backbone.")
        }
    flat = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", {}).items()}
    if not any(k.startswith("layer0.") for k in flat):
        return None
    layers = ("layer0", "layer1", "layer2", "layer3", "layer4")
    state = {k: v for k, v in flat.items() if k.split(".")[0] in layers}
    print(
        f"{source}: took layer0-layer4 ({len(state)} tensors) of BAM's base learner; left out "
        f"{len(flat) - len(state)} (its encoder.* copies, ppm.*, cls.*)"
    )
    return state


def build_backbone(name, weights="none", expect=None, dilate=True):
    """The backbone split into layer0..layer4 (PROTOCOL.md 9.1-9.2). name: resnet50v2
    (PSPNet/PFENet/BAM's deep stem), resnet50, resnet18 (torchvision; layer3 and layer4 dilated
    2 and 4: output stride 8, or undilated, stride 32, as ImageNet weights are trained), or vgg16
    (vgg16_bn, PFENet/BAM's split, ceil-mode pools). weights: 'imagenet', 'none', a state-dict
    file of the unsplit network (torchvision's, PFENet/BAM's resnet50_v2.pth or vgg16_bn.pth),
    BAM's base learner best.pth, or a kit pre-training checkpoint matching `expect` (dataset,
    fold)."""
    if name not in BACKBONES:
        raise KitError(f"--backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    net = _torchvision_net(name)
    split = None
    if weights == "imagenet":
        net.load_state_dict(_imagenet_state(name))
    elif weights not in (None, "none"):
        ckpt = load_checkpoint(weights, {**(expect or {}), "backbone": name})
        split = split_state(ckpt, weights)
        if split is None:  # a plain state dict of the unsplit network
            if name == "resnet50v2":  # PFENet/BAM's ImageNet file: its fc classifier is dropped
                ckpt = {k: v for k, v in ckpt.items() if not k.startswith("fc.")}
            _load_strict(net, ckpt, weights, name)
    backbone = Backbone(name, *_split_layers(net, name, dilate))
    if split is not None:
        _load_strict(backbone, split, weights, name)
    return backbone


def _split_layers(net, name, dilate):
    """The unsplit network cut into layer0..layer4 as PFENet and BAM cut it: (layers, channels)."""
    if name == "vgg16":
        for m in net.features:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        cuts = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)]  # each re-indexed from 0, as BAM's
        layers = [nn.Sequential(*net.features[a:b]) for a, b in cuts]
        return layers, [64, 128, 256, 512, 512]
    stem = [net.conv1, net.bn1, nn.ReLU(inplace=True)]
    if name == "resnet50v2":
        # BAM's layer0 order: conv1 bn1 relu1 conv2 bn2 relu2 conv3 bn3 relu3 maxpool
        stem += [net.conv2, net.bn2, nn.ReLU(inplace=True)]
        stem += [net.conv3, net.bn3, nn.ReLU(inplace=True)]
    layer3, layer4 = net.layer3, net.layer4
    if dilate:
        layer3 = _dilate(layer3, 2)
        layer4 = _dilate(layer4, 4)
    layers = [nn.Sequential(*stem, net.maxpool), net.layer1, net.layer2, layer3, layer4]
    channels = {
        "resnet18": [64, 64, 128, 256, 512],
        "resnet50": [64, 256, 512, 1024, 2048],
        "resnet50v2": [128, 256, 512, 1024, 2048],
    }
    return layers, channels[name]


# ============ 8. Checkpoint files: written atomically, loaded safely ============
def write_atomic(path, save, obj):
    """save(obj, PATH.tmpPID), then one rename: no reader sees a half-written file; the only kind
    the kit deletes. A write that fails (a full disk, a folder that vanished and cannot be made
    again) leaves the previous file at `path` as it was and stops with one line."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        save(obj, tmp)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        kept = "the previous file there is kept" if os.path.exists(path) else "nothing was written"
        raise KitError(
            f"could not write {path} ({e.strerror or e}): {kept}; free space or choose "
            "another path, then run the command again"
        ) from None


def save_checkpoint(path, checkpoint):
    """A checkpoint (a dict of tensors, numbers, strings and lists) written atomically with
    torch.save."""
    write_atomic(path, torch.save, checkpoint)


def load_checkpoint(path, expect=None, mmap=False):
    """torch.load(weights_only=True) of a dict (a kit checkpoint or a state dict); refuse a kit
    checkpoint whose args disagree with `expect`. mmap: map the tensors, read none (to look at
    the iteration and args only)."""
    if os.path.isdir(path):
        raise KitError(f"checkpoint {path} is a folder: pass the file in it (e.g. {path}/last.pt)")
    if not os.path.isfile(path):
        raise KitError(f"checkpoint {path} does not exist: check the path (or use imagenet / none)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        if "Unsupported global" in str(e):  # a pickle of Python objects, not only tensors
            raise KitError(
                f"checkpoint {path} cannot be loaded safely: it holds Python objects beyond "
                "tensors, numbers and strings; load it where you trust it and save its state_dict"
            ) from None
        raise KitError(
            f"checkpoint {path} is truncated or not a checkpoint ({type(e).__name__}): copy it "
            "again, or pass a file written by torch.save"
        ) from None
    if not isinstance(ckpt, dict):
        kind = type(ckpt).__name__
        raise KitError(f"checkpoint {path} holds a {kind}, not a checkpoint or a state dict")
    saved = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    for key, want in (expect or {}).items():
        # a key the checkpoint leaves None matches anything (fold: the fold-free ImageNet stand-in)
        if saved.get(key) is not None and saved[key] != want:
            flag = "--" + key.replace("_", "-")
            raise KitError(
                f"checkpoint {path} was made with {flag} {saved[key]} but this run has {flag} "
                f"{want}: pass the matching checkpoint or flag"
            )
    return ckpt
