"""common.py: what the stages of the BCPT kit share, the paper's method first.

Sections, in this order:
  1. BCPT: online clustering of the merged background, Eqs. 1-7 (paper Sec. 2), for pretrain_bcpt.py
  2. The ASPP-PFENet few-shot model and PFENet's prior mask (paper Sec. 3.1; PROTOCOL.md 9)
  3. Metrics: class IoU, mIoU, FB-IoU (PROTOCOL.md 6)
  4. Data on disk: folds, the VOC layout, pools, the cached per-class index (PROTOCOL.md 1-3)
  5. Transforms: training augmentation and test geometry (PROTOCOL.md 4, 5)
  6. Datasets and the resumable batch stream
  7. Backbones (PROTOCOL.md 9)
  8. Episodic evaluation, results files and tables (PROTOCOL.md 5, 6, 8)
  9. Plumbing: flags and their defaults, seeds, checkpoints, run folders, the training loop, progress

Shape legend used in comments: B batch, S shots, C channels or classes, D embedding dim, K cluster centres,
H, W spatial size, N pixels. Embeddings are columns, as in the paper: I (D, N), P (D, K), W (D, C).
"""
import argparse
import contextlib
import functools
import glob
import hashlib
import json
import math
import os
import random
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
import torch.nn as nn
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from PIL import Image

cv2.setNumThreads(0)  # DataLoader workers parallelise; OpenCV threads inside them only contend
IGNORE = 255


class KitError(Exception):
    """A user-facing error: one line naming the file or flag and the fix."""


def fp32(fn):
    """Run fn in float32 with autocast off: the numerically sensitive steps (the losses of Eqs. 2-4, the centre
    updates of Eqs. 1 and 7, k-means, the prior mask's cosines) stay in full precision under mixed precision."""
    @functools.wraps(fn)
    def in_fp32(*args, **kwargs):
        device = next((a.device.type for a in args if torch.is_tensor(a)), "cpu")
        with torch.autocast(device, enabled=False):
            return fn(*[a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args], **kwargs)
    return in_fp32


# ============ 1. BCPT: online clustering of the merged background (paper Sec. 2) ============
def split_pixels(emb, y):
    """Sec. 2.2: embeddings (B, D, h, w) and labels (B, h, w) -> I_base (D, N_base) with its labels y_base
    (N_base,) in 1..n_base, and I_bg (D, N_bg) of the merged background; 255 pixels are dropped."""
    rows, y = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1]).float(), y.reshape(-1)  # (N, D), (N,)
    is_base = (y > 0) & (y != IGNORE)
    return rows[is_base].t(), y[is_base], rows[y == 0].t()  # (D, N_base), (N_base,), (D, N_bg)


def cluster_assign(P, I_bg):
    """Sec. 2.1: S = P^T I_bg (K, N_bg); each pixel goes to its most similar centre (the one-hot columns of
    the assignment matrix A), returned as centre ids (N_bg,)."""
    return (P.t() @ I_bg).argmax(0)


@fp32
def cluster_sums(I_bg, assign, K):
    """Sec. 2.1: P_hat = I_bg A^T (D, K), the sum of the background embeddings given to each centre, and the
    pixel count of each centre (K,). Under several processes both are summed over the ranks (all_reduce_sum),
    so Eq. 1 follows the whole batch."""
    A_t = F.one_hot(assign, K).to(I_bg.dtype)  # (N_bg, K) = A^T
    return I_bg @ A_t, A_t.sum(0)  # (D, K), (K,)


@fp32
def momentum_update(P, P_hat, counts, mu):
    """Eq. (1): p <- mu p/|p| + (1 - mu) p_hat/|p_hat| for each centre; a centre with no pixel in the batch
    (counts 0) keeps its value (Eq. 1 is undefined there). P, P_hat (D, K), counts (K,)."""
    moved = mu * F.normalize(P, dim=0) + (1 - mu) * F.normalize(P_hat, dim=0)  # Eq. 1
    return torch.where(counts > 0, moved, P)


@fp32
def bcpt_loss(I_base, y_base, I_bg, assign, W, P, alpha, scale="sum", eq3="centres", counts=None):
    """Eqs. (2)-(4). I_base (D, N_base) with labels y_base in 1..C, I_bg (D, N_bg) assigned to centres
    `assign` (N_bg,), base vectors W (D, C), centres P (D, K) (a buffer: no gradient). Two readings the paper
    leaves open (README "choices it leaves open"): eq3, the softmax of Eq. 3 over the base vectors and the K
    centres ('centres') or over the base vectors only ('base'); scale, how Eq. 4's sums are brought to a
    per-pixel size: 'sum' divides both sums by N_base + N_bg, 'mean' averages each term over its own pixels.
    counts: (N_base, N_bg) of the whole batch when it is split over processes (default: these pixels').
    -> (L_total, {"l_base": Eq. 3 per base pixel, "l_bm": Eq. 2 per background pixel})."""
    # Eq. 3: a base pixel against the base vectors (and the K background centres)
    logits = I_base.t() @ W if eq3 == "base" else torch.cat([I_base.t() @ W, I_base.t() @ P], 1)  # (N_base, C+K)
    l_base = F.cross_entropy(logits, y_base - 1, reduction="sum")
    # Eq. 2: a background pixel against the K centres, its own assigned centre as the target
    l_bm = F.cross_entropy(I_bg.t() @ P, assign, reduction="sum")  # logits (N_bg, K)
    # Eq. 4: sum over base pixels + alpha * sum over background pixels
    n_base, n_bg = counts if counts is not None else (I_base.shape[1], I_bg.shape[1])
    if scale == "sum":  # per pixel: a base pixel weighs 1 / N, a background pixel alpha / N
        loss = (l_base + alpha * l_bm) / max(n_base + n_bg, 1)
    else:  # per pixel: a base pixel weighs 1 / N_base, a background pixel alpha / N_bg
        loss = l_base / max(n_base, 1) + alpha * l_bm / max(n_bg, 1)
    return loss, {"l_base": l_base.item() / max(I_base.shape[1], 1), "l_bm": l_bm.item() / max(I_bg.shape[1], 1)}


@fp32
def kmeans(x, init, iters=10):
    """Eq. (5): Lloyd's k-means on the columns of x (D, C), from init (D, k); an empty cluster keeps its
    centre. Deterministic: no random restarts."""
    g = init.clone()
    for _ in range(iters):
        assign = torch.cdist(x.t(), g.t()).argmin(1)  # (C,)
        a = F.one_hot(assign, g.shape[1]).to(x.dtype)  # (C, k)
        counts = a.sum(0)
        g = torch.where(counts > 0, (x @ a) / counts.clamp(min=1), g)  # (D, k)
    return g


def farthest_point_init(x, k):
    """Deterministic k-means start: column 0, then repeatedly the column farthest from those chosen."""
    chosen = [0]
    for _ in range(k - 1):
        chosen.append(int(torch.cdist(x.t(), x.t()[chosen]).min(1).values.argmax()))
    return x[:, chosen].clone()


@fp32
def guide_centers(P, G, mu):
    """Eqs. (6)-(7). Eq. 6: M (K-1, K) maximising Tr(M^T G^T P) with one 1 per row, i.e. each guidance
    vector goes to its most similar centre. Eq. 7: p <- mu p + (1 - mu) g_hat/|g_hat|, g_hat the sum of
    the guidance vectors given to p; centres given none are unchanged. P (D, K), G (D, K-1)."""
    M = F.one_hot((G.t() @ P).argmax(1), P.shape[1]).to(P.dtype)  # (K-1, K), Eq. 6
    g_hat = G @ M  # (D, K)
    return torch.where(M.sum(0) > 0, mu * P + (1 - mu) * F.normalize(g_hat, dim=0), P)  # Eq. 7


def guidance_step(W, G, P, mu):
    """Sec. 2.3, at the start of every iteration: Eq. 5 k-means over the base vectors W (D, C), warm-started
    from the previous guidance G (D, K-1) (farthest points the first time), then Eqs. 6-7. -> (G, P)."""
    G = kmeans(W, G if G.abs().sum() > 0 else farthest_point_init(W, G.shape[1]))  # Eq. 5
    return G, guide_centers(P, G, mu)  # Eqs. 6-7


# ============ 2. The ASPP-PFENet few-shot model (paper Sec. 3.1; PROTOCOL.md 9) ============
def masked_average_pooling(feat, mask):
    """Prototype p = sum_hw F*M / (sum_hw M + 0.0005) (PFENet). feat (B, C, H, W), mask (B, 1, H, W) -> (B, C)."""
    return (feat * mask).sum((2, 3)) / (mask.sum((2, 3)) + 5e-4)


@fp32
def prior_mask(query_feat, support_feat, support_mask):
    """PFENet's training-free prior for ONE shot (the caller averages shots): for each query position the
    max over support positions of cos(f_q, f_s * M), then min-max over the query's positions.
    query_feat (B, C, H, W), support_feat (B, C, h, w), support_mask (B, 1, h, w) -> (B, 1, H, W) in [0, 1]."""
    b, _, h, w = query_feat.shape
    q = query_feat.flatten(2)  # (B, C, Nq)
    s = (support_feat * support_mask).flatten(2)  # (B, C, Ns)
    norms = s.norm(dim=1)[:, :, None] * q.norm(dim=1)[:, None, :]  # (B, Ns, Nq)
    cos = torch.bmm(s.transpose(1, 2), q) / (norms + 1e-7)  # (B, Ns, Nq)
    prior = cos.max(1).values  # (B, Nq)
    lo, hi = prior.min(1, keepdim=True).values, prior.max(1, keepdim=True).values
    return ((prior - lo) / (hi - lo + 1e-7)).view(b, 1, h, w)  # (B, 1, H, W)


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # PROTOCOL.md 10.13


def frozen_features(backbone, images, masks=None):
    """One no-grad pass of the frozen backbone. images (N, 3, H, W) -> mid (N, C2+C3, h, w): layer3 and
    layer2 concatenated (VGG's layer2 resized to layer3), high = layer4 (N, C4, h', w'). With masks
    (N, 1, H, W) in {0, 1} (a support), layer4 runs on layer3 * M as in PFENet, and the masks resized
    to both sizes are returned too: (mid, high, mask_mid, mask_high)."""
    with torch.no_grad():
        f2 = backbone.layer2(backbone.layer1(backbone.layer0(images)))
        f3 = backbone.layer3(f2)
        mid = torch.cat([f3, resize(f2, f3.shape[-2:]) if f2.shape[-2:] != f3.shape[-2:] else f2], 1)
        if masks is None:
            return mid, backbone.layer4(f3)
        m3 = resize(masks, f3.shape[-2:])  # soft mask at the feature size (PROTOCOL.md 9.4)
        high = backbone.layer4(f3 * m3)
        return mid, high, m3, resize(masks, high.shape[-2:])


def shot_prior(q_high, s_high, s_mask, shots, weights=None):
    """K-shot prior: the mean over shots of prior_mask, or their weighted sum with weights (B, S).
    q_high (B, C, H, W), s_high (B*S, C, h, w), s_mask (B*S, 1, h, w) -> (B, 1, H, W)."""
    s_high, s_mask = s_high.unflatten(0, (-1, shots)), s_mask.unflatten(0, (-1, shots))  # (B, S, ...)
    priors = torch.stack([prior_mask(q_high, s_high[:, k], s_mask[:, k]) for k in range(shots)])  # (S, B, 1, H, W)
    return priors.mean(0) if weights is None else (weights.t()[:, :, None, None, None] * priors).sum(0)


def gram(feat):
    """Normalised Gram matrix of the channels: (B, C, h, w) -> (B, C, C), entry (i, j) = <F_i, F_j> /
    (|F_i| |F_j| + 1e-7), F_i channel i flattened over the positions (BAM, PROTOCOL.md 9.7)."""
    f = feat.flatten(2)  # (B, C, N)
    n = f.norm(dim=2, keepdim=True)  # (B, C, 1)
    return torch.bmm(f, f.transpose(1, 2)) / (torch.bmm(n, n.transpose(1, 2)) + 1e-7)


class ShotWeights(nn.Module):
    """BAM's K-shot weighting (PROTOCOL.md 9.7): a support's scene difference est_k = |G_query - G_k|_F / C from
    the layer-2 Gram matrices; the est sorted ascending pass 1x1 convs K -> 2 -> K (ReLU between); back in shot
    order, a softmax over the shots weighs the supports' priors and prototypes."""

    def __init__(self, shots):
        super().__init__()
        self.rw = nn.Sequential(nn.Conv2d(shots, 2, 1), nn.ReLU(inplace=True), nn.Conv2d(2, shots, 1))

    def forward(self, q_low, s_low):
        """q_low (B, C, h, w), s_low (B, S, C, h, w) -> weights (B, S), each row summing to 1."""
        diff = gram(q_low)[:, None] - gram(s_low.flatten(0, 1)).unflatten(0, s_low.shape[:2])  # (B, S, C, C)
        est = diff.flatten(2).norm(dim=2) / q_low.shape[1]  # (B, S)
        sorted_est, order = est.sort(1)
        w = self.rw(sorted_est[:, :, None, None])[:, :, 0, 0].gather(1, order.argsort(1))  # (B, S), shot order
        return w.softmax(1)


class ASPP(nn.Module):
    """BAM's ASPP_meta: global pool + 1x1, 1x1, 3x3 dilated 6/12/18, each conv + ReLU, concatenated.
    (B, C, H, W) -> (B, 5C, H, W). Kaiming-normal init as BAM."""

    def __init__(self, c=256):
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList([nn.Sequential(nn.Conv2d(c, c, 1), nn.ReLU(inplace=True))] + [
            nn.Sequential(nn.Conv2d(c, c, 3, padding=d, dilation=d), nn.ReLU(inplace=True)) for d in (6, 12, 18)])
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        g = self.pool(x).expand(-1, -1, *x.shape[-2:])  # (B, C, H, W): the pooled vector broadcast back
        return torch.cat([g] + [b(x) for b in self.branches], 1)  # (B, 5C, H, W)


def _conv_relu(c_in, c_out, k):
    return [nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=False), nn.ReLU(inplace=True)]


class AsppPFENet(nn.Module):
    """ASPP PFENet (paper Sec. 3.1): BAM's meta learner without the base-learner ensemble. The backbone is frozen
    (no gradient, BN always in eval); everything else trains. fusion of the K supports' priors and prototypes:
    'mean' (PFENet) or 'weighted' (BAM's ShotWeights, for a fixed shot count)."""

    def __init__(self, backbone, shots=1, fusion="mean"):
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        mid = backbone.channels[2] + backbone.channels[3]
        self.down_query = nn.Sequential(*_conv_relu(mid, 256, 1), nn.Dropout2d(0.5))
        self.down_supp = nn.Sequential(*_conv_relu(mid, 256, 1), nn.Dropout2d(0.5))
        self.init_merge = nn.Sequential(*_conv_relu(256 * 2 + 1, 256, 1))  # [query, prototype, prior]
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
        protos = masked_average_pooling(self.down_supp(s_mid), m_mid).unflatten(0, (-1, shots))  # (B, S, 256)
        proto = protos.mean(1) if w is None else (w[:, :, None] * protos).sum(1)  # (B, 256)
        prior = resize(shot_prior(q_high, s_high, m_high, shots, w), q.shape[-2:])  # (B, 1, h, w)
        x = self.init_merge(torch.cat([q, proto[:, :, None, None].expand_as(q), prior], 1))  # (B, 513, h, w) in
        x = self.res1(self.aspp(x))  # (B, 1280, h, w) -> (B, 256, h, w)
        x = self.res2(x) + x
        return resize(self.cls(x), query.shape[-2:])  # (B, 2, H, W)


# ============ 3. Metrics (PROTOCOL.md 6) ============
class FewShotIoU:
    """Per-class IoU summed over all episodes of a class, mIoU over the classes, FB-IoU; in percent."""

    def __init__(self, classes):
        self.classes = list(classes)
        self.inter = torch.zeros(len(self.classes), dtype=torch.float64)  # foreground I per class
        self.union = torch.zeros(len(self.classes), dtype=torch.float64)
        self.fb_inter = torch.zeros(2, dtype=torch.float64)  # [background, foreground] over all episodes
        self.fb_union = torch.zeros(2, dtype=torch.float64)

    def update(self, pred, target, cls):
        """pred (H, W) in {0, 1}; target (H, W) in {0, 1, 255}; 255 pixels count nowhere."""
        valid = target != IGNORE
        p, t = pred[valid].long().cpu(), target[valid].long().cpu()
        if p.numel() and (p.max() > 1 or t.max() > 1):
            raise ValueError("FewShotIoU.update expects pred in {0, 1} and target in {0, 1, 255}")
        inter = torch.bincount(t[p == t], minlength=2).double()
        union = torch.bincount(p, minlength=2).double() + torch.bincount(t, minlength=2).double() - inter
        self.fb_inter += inter
        self.fb_union += union
        k = self.classes.index(cls)
        self.inter[k] += inter[1]
        self.union[k] += union[1]
        return inter, union  # [background, foreground] of this episode

    def all_reduce(self):
        """Sum the counts over the processes (exact: they are integers held in float64)."""
        self.inter, self.union = all_reduce_sum(self.inter), all_reduce_sum(self.union)
        self.fb_inter, self.fb_union = all_reduce_sum(self.fb_inter), all_reduce_sum(self.fb_union)
        return self

    def class_iou(self):
        return {c: float(100 * i / (u + 1e-10)) for c, i, u in zip(self.classes, self.inter, self.union)}

    def miou(self):
        return sum(self.class_iou().values()) / len(self.classes)  # a class with no episode counts 0

    def fb_iou(self):
        return float(100 * (self.fb_inter / (self.fb_union + 1e-10)).mean())


# ============ 4. Data on disk: folds, the VOC layout, pools, per-class index (PROTOCOL.md 1-3) ============
N_CLASSES = {"pascal": 20, "coco": 80, "synthetic": 20, "synthetic2": 20}


def novel_classes(dataset, fold, coco_split="interleaved"):
    """Novel (test) class ids of a fold. PASCAL/synthetic: 5i+1..5i+5. COCO interleaved: (c-1) % 4 == i."""
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


IMAGES, MASKS, LISTS = "JPEGImages", "SegmentationClassAug", os.path.join("ImageSets", "Segmentation")
CACHE_DIR = ".fss_cache"  # the per-class index cache inside a data root
LAYOUT_FIX = ("a data root holds JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png and "
              "ImageSets/Segmentation/val.txt; build one with python prepare_data.py pascal|coco")


def read_list(path):
    with open(path) as f:
        return [line.split()[0] for line in f if line.strip()]


def image_pools(root, train_pool="aug"):
    """(train ids, val ids). 'aug': every mask not in val.txt; 'oslsm': train.txt + train_noval.txt (5953 on VOC)."""
    for sub in (root, os.path.join(root, IMAGES), os.path.join(root, MASKS), os.path.join(root, LISTS, "val.txt")):
        if not os.path.exists(sub):
            raise KitError(f"--data-root: {sub} does not exist ({LAYOUT_FIX})")
    val = sorted(set(read_list(os.path.join(root, LISTS, "val.txt"))))
    val_set = set(val)
    if train_pool == "aug":
        train = {f[:-4] for f in os.listdir(os.path.join(root, MASKS)) if f.endswith(".png")}
    else:
        lists = [os.path.join(root, LISTS, name) for name in ("train.txt", "train_noval.txt")]
        missing = [p for p in lists if not os.path.exists(p)]
        if missing:
            raise KitError(f"--train-pool oslsm (the PASCAL default) needs {' and '.join(missing)}: make them "
                           "with python prepare_data.py pascal --train-noval train_noval.txt, or pass --train-pool aug")
        train = set(read_list(lists[0])) | set(read_list(lists[1]))
    return sorted(train - val_set), val


def read_mask(root, img_id, n_classes):
    """Single-channel class-index mask (H, W) uint8, checked for range."""
    path = os.path.join(root, MASKS, img_id + ".png")
    label = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if label is None:
        raise KitError(f"cannot read mask {path}: missing or corrupt; restore it or drop {img_id} from the lists")
    if label.ndim != 2 or label.dtype != np.uint8:
        raise KitError(f"mask {path} is not a single-channel 8-bit index PNG (palette or RGB?); "
                       "convert it with python prepare_data.py pascal")
    bad = (label > n_classes) & (label != IGNORE)
    if bad.any():
        raise KitError(f"mask {path} has value {int(label[bad][0])} outside 0..{n_classes} and 255: "
                       f"wrong --dataset, or a corrupt mask")
    return label


def read_pair(root, img_id, n_classes):
    """RGB float32 image (H, W, 3) in 0..255 and its mask (H, W)."""
    path = os.path.join(root, IMAGES, img_id + ".jpg")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise KitError(f"cannot read image {path}: missing or corrupt; re-extract it or drop {img_id} from the lists")
    label = read_mask(root, img_id, n_classes)
    if label.shape != img.shape[:2]:
        raise KitError(f"image {path} is {img.shape[1]}x{img.shape[0]} but its mask is "
                       f"{label.shape[1]}x{label.shape[0]}: regenerate the mask")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32), label


def check_image_file(root, img_id, shape, full=False):
    """Check one image against its mask's `shape` (H, W) without decoding it (at every index scan): the header's
    size, and for a JPEG the end-of-image marker that a truncated download lacks. A file without the marker, or
    every file with `full` (prepare_data.py verify), is decoded in full: PIL raises where OpenCV only warns."""
    path = os.path.join(root, IMAGES, img_id + ".jpg")
    fix = f"re-extract or re-download it, or drop {img_id} from the lists"
    try:
        with Image.open(path) as im:
            (w, h), fmt = im.size, im.format
            if (h, w) != tuple(shape):
                raise KitError(f"image {path} is {w}x{h} but its mask is {shape[1]}x{shape[0]}: regenerate the mask")
            with open(path, "rb") as f:
                f.seek(max(os.path.getsize(path) - 64, 0))
                if full or (fmt == "JPEG" and not f.read().rstrip(b"\0").endswith(b"\xff\xd9")):
                    im.load()
    except KitError:
        raise
    except Exception as e:
        raise KitError(f"cannot read image {path} ({type(e).__name__}: {e}): missing, truncated or corrupt; {fix}") \
            from None


def _cache_path(root, key):
    for folder in (os.path.join(root, CACHE_DIR), os.path.join(os.path.expanduser("~"), ".cache", "bcpt")):
        try:
            os.makedirs(folder, exist_ok=True)
            if os.access(folder, os.W_OK):
                return os.path.join(folder, f"counts-{key}.npy")
        except OSError:
            continue
    raise KitError(f"no writable cache folder under {root} or ~/.cache")


def _scan(root, img_id, n_classes):
    """Index scan of one image: its mask's class pixel counts (n_classes + 1,), after check_image_file."""
    label = read_mask(root, img_id, n_classes)
    check_image_file(root, img_id, label.shape)
    return np.bincount(label.ravel(), minlength=256)[: n_classes + 1]


def class_pixel_counts(root, ids, n_classes, workers=2):
    """(N images, n_classes + 1) int64 pixel counts per class, scanned once then cached; the scan also
    checks every image cheaply (check_image_file), so a truncated file stops the run before training.

    The cache is keyed by the id list and each image's and mask's size and mtime, so a changed file
    rescans; the pixel rule is applied afterwards, so changing --min-pixels needs no rescan.
    """
    h = hashlib.sha1(f"{n_classes} images".encode())
    for i in ids:
        for p in (os.path.join(root, MASKS, i + ".png"), os.path.join(root, IMAGES, i + ".jpg")):
            st = os.stat(p) if os.path.exists(p) else None
            h.update(f"{i}:{st.st_size if st else -1}:{st.st_mtime_ns if st else -1};".encode())
    path = _cache_path(root, h.hexdigest()[:16])
    if os.path.exists(path):
        return np.load(path)
    t0 = time.time()
    with ThreadPoolExecutor(max(1, workers)) as pool:  # cv2.imread releases the GIL
        counts = (np.stack(list(pool.map(lambda i: _scan(root, i, n_classes), ids))) if ids
                  else np.zeros((0, n_classes + 1), np.int64))
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, counts)
    os.replace(tmp, path)
    print(f"index: scanned {len(ids)} images and masks in {time.time() - t0:.1f}s, cached at {path}")
    return counts


def class_index(ids, counts, classes, min_pixels):
    """{c: [ids whose mask has >= min_pixels pixels of c]}: the support pools (PROTOCOL.md 3.1)."""
    return {c: [ids[j] for j in np.flatnonzero(counts[:, c] >= min_pixels)] for c in classes}


def open_data(args):
    """Pools and per-class pixel counts of both splits; generates the synthetic benchmark on first use."""
    if args.dataset in SYNTHETIC_ROOTS:
        from prepare_data import ensure_synthetic  # data-stage tooling, imported only when needed
        ensure_synthetic(args.data_root, args.dataset)
    train_ids, val_ids = image_pools(args.data_root, args.train_pool)
    n = N_CLASSES[args.dataset]
    data = {"train": (train_ids, class_pixel_counts(args.data_root, train_ids, n, args.workers)),
            "val": (val_ids, class_pixel_counts(args.data_root, val_ids, n, args.workers))}
    print(f"data: {args.data_root} train pool {len(train_ids)} images ({args.train_pool}), val {len(val_ids)}; "
          f"fold {args.fold} novel {args.novel}")
    return data


# ============ 5. Transforms: training augmentation (PROTOCOL.md 4) and test geometry (PROTOCOL.md 5) ============
MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255


def to_tensor(img, label):
    """(H, W, 3) float RGB 0..255, (H, W) uint8 -> normalised (3, H, W) float32, (H, W) int64."""
    x = torch.from_numpy(np.ascontiguousarray(((img - MEAN) / STD).transpose(2, 0, 1), dtype=np.float32))
    return x, torch.from_numpy(np.ascontiguousarray(label)).long()


def to_bgr_image(x):
    """Inverse of to_tensor for pictures: normalised (3, H, W) -> (H, W, 3) uint8 BGR for cv2.imwrite."""
    return np.clip(x.permute(1, 2, 0).numpy() * STD + MEAN, 0, 255).astype(np.uint8)[:, :, ::-1]


def train_transform(img, label, rng, crop, scale, rotate=10.0, keep_fg=False):
    """Scale, rotate (mean / 255 borders), blur, flip, crop with padding; image and mask together.

    keep_fg: redraw the crop (up to 31 times) while it keeps < 85% of the label==1 pixels, as PFENet
    does for binary episode masks.
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
    ph, pw = max(crop - h, 0), max(crop - w, 0)  # 5. pad to the crop, then a random crop
    if ph or pw:
        pad = (ph // 2, ph - ph // 2, pw // 2, pw - pw // 2)
        img = cv2.copyMakeBorder(np.ascontiguousarray(img), *pad, cv2.BORDER_CONSTANT, value=MEAN.tolist())
        label = cv2.copyMakeBorder(np.ascontiguousarray(label), *pad, cv2.BORDER_CONSTANT, value=IGNORE)
    h, w = label.shape
    fg = (label == 1).sum()
    for _ in range(32):
        y, x = rng.integers(0, h - crop + 1), rng.integers(0, w - crop + 1)
        if not keep_fg or (label[y:y + crop, x:x + crop] == 1).sum() >= 0.85 * fg:
            break
    return to_tensor(img[y:y + crop, x:x + crop], label[y:y + crop, x:x + crop])


def test_transform(img, label, size):
    """Keep aspect, longer side to `size`, both sides floored to a multiple of 8, top-left on a
    size x size canvas (image 0 in raw pixel space, label 255)."""
    h, w = label.shape
    r = size / max(h, w)
    nh, nw = max(8, int(h * r) // 8 * 8), max(8, int(w * r) // 8 * 8)
    canvas = np.zeros((size, size, 3), np.float32)
    canvas[:nh, :nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    lab = np.full((size, size), IGNORE, np.uint8)
    lab[:nh, :nw] = cv2.resize(label, (nw, nh), interpolation=cv2.INTER_NEAREST)
    return to_tensor(canvas, lab)


def logits_at_label_size(logits, raw_label):
    """PROTOCOL.md 5.2 ori_resize: logits (B, 2, s, s) -> (B, 2, L, L) with L = max(H, W) of the raw
    label, and the raw label (H, W) pasted top-left into an L x L canvas of 255."""
    h, w = raw_label.shape[-2:]
    side = max(h, w)
    target = torch.full((side, side), IGNORE, dtype=torch.long, device=raw_label.device)
    target[:h, :w] = raw_label
    return F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=True), target


# ============ 6. Datasets: few-shot episodes and the resumable batch stream (PROTOCOL.md 3) ============
def binarize(label, cls):
    """Episode mask: cls -> 1, 255 kept, everything else (background, other classes) -> 0."""
    return np.where(label == cls, 1, np.where(label == IGNORE, IGNORE, 0)).astype(np.uint8)


class EpisodeDataset(torch.utils.data.Dataset):
    """Few-shot episodes: a query and `shot` supports of one class (PROTOCOL.md 3.2-3.3).

    Training (`episodes=None`): query = data_list[idx % n], random class and supports from
    default_rng([seed, idx]), PFENet augmentation. Evaluation: `episodes` drawn up front from
    default_rng(seed), walking data_list in order, test geometry; fixed whatever the worker count.
    """

    def __init__(self, root, ids, counts, dataset, classes, shot, min_pixels, seed,
                 crop=None, scale=None, test_size=None, episodes=None, drop_classes=()):
        self.root, self.shot, self.seed = root, shot, seed
        self.crop, self.scale, self.test_size = crop, scale, test_size
        self.n_classes, self.classes = N_CLASSES[dataset], list(classes)
        if drop_classes:  # BAM: drop every image containing any pixel of these (the novel) classes
            keep = counts[:, list(drop_classes)].sum(1) == 0
            ids, counts = [i for i, k in zip(ids, keep) if k], counts[keep]
        self.pools = class_index(ids, counts, self.classes, min_pixels)
        for c, pool in self.pools.items():
            if len(pool) < shot + 1:
                raise KitError(f"class {c} has {len(pool)} images with >= {min_pixels} pixels; "
                               f"a {shot}-shot episode needs {shot + 1}: lower --shot or --min-pixels")
        kept = (counts[:, self.classes] >= min_pixels).any(1)
        self.data_list = [i for i, k in zip(ids, kept) if k]
        self.present = {i: [c for c in self.classes if counts[j, c] > 0] for j, i in enumerate(ids) if kept[j]}
        rng = np.random.default_rng(seed)
        self.episodes = [self.draw(k, rng) for k in range(episodes)] if episodes else None

    def draw(self, k, rng):
        """(query id, class, support ids): class uniform among the query's classes of the set."""
        query = self.data_list[k % len(self.data_list)]
        cls = int(rng.choice(self.present[query]))
        pool = [i for i in self.pools[cls] if i != query]
        return query, cls, [pool[j] for j in rng.choice(len(pool), self.shot, replace=False)]

    def __len__(self):
        return len(self.episodes) if self.episodes else len(self.data_list)

    def __getitem__(self, idx):
        rng = np.random.default_rng([self.seed, idx])
        query, cls, supports = self.episodes[idx] if self.episodes else self.draw(idx, rng)
        pairs = [read_pair(self.root, i, self.n_classes) for i in [query] + supports]
        pairs = [(img, binarize(label, cls)) for img, label in pairs]
        if self.episodes:
            xs = [test_transform(img, label, self.test_size) for img, label in pairs]
        else:
            xs = [train_transform(img, label, rng, self.crop, self.scale, keep_fg=True) for img, label in pairs]
        item = {"query": xs[0][0], "query_mask": xs[0][1],                   # (3, H, W), (H, W)
                "support": torch.stack([x[0] for x in xs[1:]]),               # (S, 3, H, W)
                "support_mask": torch.stack([x[1] for x in xs[1:]]), "cls": cls}  # (S, H, W)
        if self.episodes:  # scores are computed against the original-size label (PROTOCOL.md 5.2)
            item["raw_label"] = torch.from_numpy(pairs[0][1]).long()         # (H0, W0)
            item.update(query_id=query, support_ids=" ".join(supports))
        return item


class StreamSampler(torch.utils.data.Sampler):
    """Iteration t takes items t*B .. (t+1)*B - 1 of an endless stream of per-epoch permutations seeded by
    (seed, epoch), so a run resumed at iteration t sees exactly the batches it would have. With several
    processes, rank r takes its B / world items of each global batch: the same batches as one process."""

    def __init__(self, n, batch, seed, start_iter, total_iters, rank=0, world=1):
        self.n, self.batch, self.seed, self.start, self.total = n, batch, seed, start_iter, total_iters
        self.local = batch // world
        self.first = rank * self.local  # this rank's offset in each global batch

    def __len__(self):
        return (self.total - self.start) * self.local

    def __iter__(self):
        epoch, perm = -1, None
        for pos in range(self.start * self.batch, self.total * self.batch):
            if not self.first <= pos % self.batch < self.first + self.local:
                continue  # another rank's share of this global batch
            if pos // self.n != epoch:
                epoch = pos // self.n
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            yield epoch * self.n + int(perm[pos % self.n])  # the dataset uses idx % n and seeds by idx


def stream_loader(dataset, batch, seed, start_iter, total_iters, workers, device):
    """The batches of iterations start_iter .. total_iters - 1 (this rank's share of each, under torchrun)."""
    if batch % world():
        raise KitError(f"--batch {batch} is the global batch: it must split evenly over the {world()} processes")
    sampler = StreamSampler(len(dataset), batch, seed, start_iter, total_iters, rank(), world())
    cuda = device.type == "cuda"
    return torch.utils.data.DataLoader(dataset, batch_size=batch // world(), sampler=sampler, num_workers=workers,
                                       pin_memory=cuda, persistent_workers=cuda and workers > 0)


# ============ 7. Backbones and the weight files of the kit and of PFENet / BAM (PROTOCOL.md 9.1-9.2) ============
BACKBONES = ("resnet50v2", "resnet50", "vgg16", "resnet18")


class Backbone(nn.Module):
    """layer0 .. layer4; forward returns the five feature maps. `channels[i]` = channels of layer i."""

    def __init__(self, name, layers, channels):
        super().__init__()
        self.name, self.channels = name, channels
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
                m.dilation, m.padding = (dilation, dilation), (dilation, dilation)
    return layer


def _torchvision_net(name):
    """The unsplit network whose state-dict keys are those of the weight files: torchvision's, or for
    resnet50v2 PSPNet/PFENet/BAM's deep stem (three 3x3 convs 3->64 s2, 64->64, 64->128, each BN + ReLU;
    layer1 then starts from 128 channels; the bottlenecks are torchvision's, with the same keys)."""
    if name != "resnet50v2":
        return {"resnet50": torchvision.models.resnet50, "resnet18": torchvision.models.resnet18,
                "vgg16": torchvision.models.vgg16_bn}[name](weights=None)
    net = torchvision.models.resnet50(weights=None)
    for k, (c_in, c_out, stride) in enumerate([(3, 64, 2), (64, 64, 1), (64, 128, 1)], 1):
        setattr(net, f"conv{k}", nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False))
        setattr(net, f"bn{k}", nn.BatchNorm2d(c_out))
    net.inplanes, net.fc = 128, nn.Identity()  # the file's fc (ImageNet classifier) is not used
    net.layer1 = net._make_layer(torchvision.models.resnet.Bottleneck, 64, 3)
    for m in net.modules():  # torchvision's init for the rebuilt parts too
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


def _imagenet_state(name):
    if name == "resnet50v2":
        raise KitError("--backbone resnet50v2 has no torchvision ImageNet weights: pass --weights "
                       "initmodel/resnet50_v2.pth (PFENet/BAM's file, PROTOCOL.md 9.1)")
    weights = {"resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
               "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
               "vgg16": torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1}[name]
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # no network, proxy, ...
        raise KitError(f"--weights imagenet: could not download torchvision's {weights} ({type(e).__name__}); "
                       f"download {weights.url} elsewhere and pass --weights PATH, or use --weights none") from None


def backbone_kind(state):
    """Which backbone a state dict holds, from its keys and stem shape: resnet50v2 (3x3 deep stem), resnet50,
    resnet18 (7x7 stem; bottleneck or basic blocks) or vgg16; for unsplit (torchvision-style) or split
    (layer0..layer4) keys alike. None if unknown."""
    stem = state.get("conv1.weight", state.get("layer0.0.weight"))
    if "features.0.weight" in state or ("layer0.0.weight" in state and "layer1.0.conv1.weight" not in state):
        return "vgg16"
    if stem is None:
        return None
    if stem.shape[-1] == 3:
        return "resnet50v2"
    return "resnet50" if "layer1.0.conv3.weight" in state else "resnet18"


def _load_strict(module, state, source, name):
    """load_state_dict(strict=True); a file of another backbone, or with a missing or unexpected key, is refused."""
    kind = backbone_kind(state)
    if kind not in (None, name):
        raise KitError(f"{source} holds a {kind} backbone but this run has --backbone {name}: pass --backbone "
                       f"{kind}, or weights of a {name}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1:3]
        raise KitError(f"{source} does not match the backbone: {' '.join(first)[:300]}") from None


def _split_state(ckpt, source):
    """The layer0..layer4 part of a kit pre-training checkpoint (backbone.*) or of BAM's base learner best.pth
    ({'state_dict': {'module.layer0...', 'module.encoder...', 'module.ppm...', 'module.cls...'}}), else None."""
    if "model" in ckpt and "args" in ckpt:  # pretrain_bcpt.py's last.pt / best.pt
        return {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    flat = {k.removeprefix("module."): v for k, v in ckpt.get("state_dict", {}).items()}
    if not any(k.startswith("layer0.") for k in flat):
        return None
    state = {k: v for k, v in flat.items() if k.split(".")[0] in ("layer0", "layer1", "layer2", "layer3", "layer4")}
    print(f"{source}: took layer0-layer4 ({len(state)} tensors) of BAM's base learner; left out "
          f"{len(flat) - len(state)} (its encoder.* copies, ppm.*, cls.*)")
    return state


def build_backbone(name, weights="none", expect=None):
    """The backbone split into layer0..layer4 (PROTOCOL.md 9.1-9.2).

    name: resnet50v2 (PSPNet/PFENet/BAM's deep stem), resnet50, resnet18 (torchvision; layer3 and layer4 dilated
    2 and 4: output stride 8), or vgg16 (vgg16_bn, PFENet/BAM's split, ceil-mode pools). weights: 'imagenet',
    'none', a state-dict file of the unsplit network (torchvision's, PFENet/BAM's resnet50_v2.pth or vgg16_bn.pth),
    BAM's base learner best.pth, or a kit pre-training checkpoint, which must match `expect` (dataset, fold).
    """
    if name not in BACKBONES:
        raise KitError(f"--backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    net, split = _torchvision_net(name), None
    if weights == "imagenet":
        net.load_state_dict(_imagenet_state(name))
    elif weights not in (None, "none"):
        ckpt = load_checkpoint(weights, {**(expect or {}), "backbone": name})
        split = _split_state(ckpt, weights)
        if split is None:  # a plain state dict of the unsplit network; PFENet/BAM's ImageNet fc is dropped
            _load_strict(net, {k: v for k, v in ckpt.items() if not k.startswith("fc.") or name != "resnet50v2"},
                         weights, name)
    if name == "vgg16":
        f = net.features
        for m in f:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        cuts = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)]  # each layer re-indexed from 0, as BAM's
        layers, channels = [nn.Sequential(*f[a:b]) for a, b in cuts], [64, 128, 256, 512, 512]
    else:
        stem = [net.conv1, net.bn1, nn.ReLU(inplace=True)]
        if name == "resnet50v2":  # BAM's layer0 order: conv1 bn1 relu1 conv2 bn2 relu2 conv3 bn3 relu3 maxpool
            stem += [net.conv2, net.bn2, nn.ReLU(inplace=True), net.conv3, net.bn3, nn.ReLU(inplace=True)]
        layers = [nn.Sequential(*stem, net.maxpool), net.layer1, net.layer2, _dilate(net.layer3, 2),
                  _dilate(net.layer4, 4)]
        channels = {"resnet18": [64, 64, 128, 256, 512], "resnet50": [64, 256, 512, 1024, 2048],
                    "resnet50v2": [128, 256, 512, 1024, 2048]}[name]
    backbone = Backbone(name, layers, channels)
    if split is not None:
        _load_strict(backbone, split, weights, name)
    return backbone


# ============ 8. Episodic evaluation, results files and tables (PROTOCOL.md 5, 6, 8) ============
def add_eval_args(parser):
    g = parser.add_argument_group("episodic evaluation (PROTOCOL.md 5, 8)")
    g.add_argument("--episodes", type=POSITIVE, default=1000,
                   help="episodes per seed, as BAM and HSNet; use >= 10000 on COCO (PROTOCOL.md 8.2-8.4) "
                   "(default %(default)s)")
    g.add_argument("--seeds", type=int, nargs="+", default=[510, 365, 382, 322, 988],
                   help="one evaluation per seed, reported as mean +- std (BAM test.py's seeds) (default %(default)s)")
    g.add_argument("--json", help="write the results to this file")
    g.add_argument("--label", help="row name in --table (default: the pre-training: imagenet, none, standard, "
                   "bcpt K=6...)")
    g.add_argument("--table", nargs="+", metavar="JSON", help="only print a paper-style table from these result files")
    g.add_argument("--episode-log", metavar="FILE", help="one JSON line per episode (seed, index, query and support "
                   "ids, class, intersection and union), from which every reported number can be recomputed")
    add_precision_arg(g)
    g = parser.add_argument_group("your own images (no data root, fold or class needed)")
    g.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "MASK"), help="a support image and its "
                   "mask (foreground wherever non-zero); repeat for more shots")
    g.add_argument("--query", nargs="+", metavar="IMAGE", help="images to segment with the --support examples")
    g.add_argument("--out", help="folder for NAME_mask.png and NAME_overlay.png of each --query (with "
                   "evaluate.py --curves: the PNG to write)")
    return parser


def read_user_image(path):
    """An image of the user's, any format OpenCV reads -> RGB float32 (H, W, 3) in 0..255."""
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise KitError(f"cannot read image {path}: missing, corrupt or a format OpenCV does not read")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)


def read_user_mask(path, image_path, shape):
    """A support mask of the user's: foreground wherever non-zero, so 0/1, 0/255, palette (indices) and RGB
    masks all work; it must have its image's size (H, W) and some foreground. -> (H, W) uint8 in {0, 1}."""
    try:
        with Image.open(path) as im:
            m = np.array(im if im.mode in ("P", "L", "1", "I", "I;16", "RGB") else im.convert("RGB"))  # no alpha
    except Exception as e:
        raise KitError(f"cannot read mask {path} ({type(e).__name__}): missing, corrupt or not an image") from None
    m = (m.reshape(m.shape[0], m.shape[1], -1) != 0).any(-1).astype(np.uint8)
    if m.shape != tuple(shape):
        raise KitError(f"mask {path} is {m.shape[1]}x{m.shape[0]} but its image {image_path} is "
                       f"{shape[1]}x{shape[0]}: pass the mask made for that image")
    if not m.any():
        raise KitError(f"mask {path} has no foreground pixel (all zero): mark the object with non-zero values")
    return m


def user_episode(supports, query, test_size):
    """An episode from the user's files in the benchmark's test geometry (PROTOCOL.md 5.1): -> (item as an
    evaluation batch of EpisodeDataset, the query (H, W, 3), the supports [(image, mask)])."""
    pairs = []
    for image_path, mask_path in supports:
        img = read_user_image(image_path)
        pairs.append((img, read_user_mask(mask_path, image_path, img.shape[:2])))
    q = read_user_image(query)
    xq, _ = test_transform(q, np.zeros(q.shape[:2], np.uint8), test_size)
    xs = [test_transform(img, m, test_size) for img, m in pairs]
    item = {"query": xq[None], "support": torch.stack([x for x, _ in xs])[None],  # (1, 3, s, s), (1, S, 3, s, s)
            "support_mask": torch.stack([y for _, y in xs])[None]}  # (1, S, s, s)
    return item, q, pairs


def at_query_size(scores, query):
    """Scores (1, C, s, s) on the test canvas -> (C, H, W) at the query's size, as the benchmark scores them
    (logits_at_label_size to max(H, W), then the query's top-left part)."""
    h, w = query.shape[:2]
    return logits_at_label_size(scores.float().cpu(), torch.zeros(h, w, dtype=torch.long))[0][0, :, :h, :w]


def write_user_prediction(out, query_path, query, pred, pairs, heat=None):
    """NAME_mask.png (0/255, the query's size) and NAME_overlay.png (the query with the prediction tinted, the
    supports with their masks beside it, Fig. 2 style); NAME_prior.png from `heat` (H, W) in [0, 1] if given."""
    os.makedirs(out, exist_ok=True)
    name, h = os.path.splitext(os.path.basename(query_path))[0], query.shape[0]
    tint = lambda img, m, colour: np.where(m[..., None] > 0, 0.45 * img + 0.55 * np.array(colour), img)
    panels = [tint(query[:, :, ::-1], pred, (255, 80, 0))] + [  # BGR
        cv2.resize(tint(img[:, :, ::-1], m, (0, 200, 255)), (max(1, round(img.shape[1] * h / img.shape[0])), h),
                   interpolation=cv2.INTER_AREA) for img, m in pairs]
    cv2.imwrite(os.path.join(out, f"{name}_mask.png"), (255 * pred).astype(np.uint8))
    cv2.imwrite(os.path.join(out, f"{name}_overlay.png"), np.clip(np.concatenate(panels, 1), 0, 255).astype(np.uint8))
    if heat is not None:
        cv2.imwrite(os.path.join(out, f"{name}_prior.png"), cv2.applyColorMap((255 * heat).astype(np.uint8),
                                                                             cv2.COLORMAP_JET))
    print(f"wrote {os.path.join(out, name)}_mask.png and _overlay.png" + " and _prior.png" * (heat is not None))


def pretrain_label(weights):
    """Table row name of a backbone source: imagenet, none, BAM's base learner, or pretrain_bcpt.py's method with
    every choice that changes it (head, K, alpha, Eq. 3 and Eq. 4 readings, guidance, best-val selection)."""
    if weights in (None, "none", "imagenet"):
        return weights or "none"
    ckpt = load_checkpoint(weights)
    a = ckpt.get("args", {})
    if "method" not in a:
        return "standard (BAM best.pth)" if "state_dict" in ckpt else os.path.basename(weights)
    best = " best-val" if ckpt.get("select") == "best-val" else ""
    if a["method"] != "bcpt":
        return f"standard {a.get('head', 'linear')}{best}"  # files from before --head: linear
    alpha, scale = a.get("alpha", 0.1), a.get("loss_scale", "sum")  # files from before --loss-scale: sum
    return ("bcpt" + (" no-guidance" if a.get("no_guidance") else "") + f" K={a['K']}"
            + (f" alpha={alpha:g}" if alpha != 0.1 else "") + f" Eq4={scale}"  # the paper's alpha goes unnamed
            + (" Eq3=base" if a.get("eq3") == "base" else "") + best)


def predict_meta(model, item, dtype=None):
    """Scores (1, 2, s, s) of a meta-trained model on one evaluation episode, under autocast in `dtype`."""
    device = next(model.parameters()).device
    with autocast(device, dtype):
        return model(item["query"].to(device), item["support"].to(device), item["support_mask"].to(device))


def argmax_mask(scores):
    """Prediction (L, L) in {0, 1} from scores (1, 2, L, L)."""
    return scores.argmax(1)[0]


def run_episodes(args, data, seed, episodes, predict, decide, classes, log=None):
    """One seed: `episodes` fixed episodes of `classes` on the val images (batch 1, test geometry, scored at the
    original label size, PROTOCOL.md 5). predict(item) -> scores (1, C, s, s) on the test canvas; decide:
    {name: function of the scores (1, C, L, L) -> prediction (L, L) in {0, 1}}. log: a file that gets one JSON line
    per episode (its ids, class and [background, foreground] intersection and union per name).
    -> ({name: FewShotIoU}, seconds)."""
    ids, counts = data["val"]
    ds = EpisodeDataset(args.data_root, ids, counts, args.dataset, classes, args.shot, args.min_pixels, seed,
                        test_size=args.test_size, episodes=episodes)
    shard = torch.utils.data.Subset(ds, range(rank(), len(ds), world()))  # under torchrun: every world-th episode
    loader = torch.utils.data.DataLoader(shard, batch_size=1, shuffle=False, num_workers=args.workers)
    meters, t_model, t0, lines = {name: FewShotIoU(classes) for name in decide}, 0.0, time.perf_counter(), []
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    for index, item in zip(shard.indices, loader):
        t1 = time.perf_counter()
        scores = predict(item)
        sync()
        t_model += time.perf_counter() - t1
        scores, target = logits_at_label_size(scores.float().cpu(), item["raw_label"][0])
        iou = {str(name): meters[name].update(rule(scores), target, int(item["cls"])) for name, rule in decide.items()}
        if log:
            phase = "novel" if list(classes) == list(args.novel) else "base"
            lines.append(json.dumps({"phase": phase, "seed": seed, "index": index, "query": item["query_id"][0],
                                  "supports": item["support_ids"][0].split(), "class": int(item["cls"]),
                                  "iou": {k: [*map(float, i), *map(float, u)] for k, (i, u) in iou.items()}}))
    if world() > 1:
        for m in meters.values():
            m.all_reduce()
        if log:
            shards = [None] * world()
            dist.all_gather_object(shards, lines)
            lines = sorted((line for s in shards for line in s), key=lambda line: json.loads(line)["index"])
    if log and is_main():
        log.writelines(line + "\n" for line in lines)
    return meters, {"total": time.perf_counter() - t0, "model": t_model}


def summarize(meters, seeds):
    """Mean +- sample std (ddof 1; 0 for one seed) over seeds of mIoU and FB-IoU; per-class IoU averaged."""
    per_seed = [{"seed": s, "miou": m.miou(), "fb_iou": m.fb_iou(), "class_iou": m.class_iou()}
                for s, m in zip(seeds, meters)]
    std = lambda key: float(np.std([r[key] for r in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
    classes = per_seed[0]["class_iou"]
    return {"miou": float(np.mean([r["miou"] for r in per_seed])), "miou_std": std("miou"),
            "fb_iou": float(np.mean([r["fb_iou"] for r in per_seed])), "fb_iou_std": std("fb_iou"),
            "class_iou": {c: float(np.mean([r["class_iou"][c] for r in per_seed])) for c in classes},
            "per_seed": per_seed}


def evaluate_seeds(args, data, predict, decide, episodes=None, seeds=None, classes=None):
    """run_episodes for every seed (default args.seeds, args.episodes episodes each, of the novel classes);
    prints each seed, the speed and the mean +- std. -> {name: summary} (see summarize)."""
    episodes, seeds, classes = episodes or args.episodes, seeds or args.seeds, classes or args.novel
    if args.dataset == "coco" and episodes < 10000:
        print(f"warning: {episodes} COCO episodes see few of a fold's 12640-26052 val images, so mIoU is noisy "
              "between seeds; use --episodes 10000 to compare methods (PROTOCOL.md 8.2, 8.4)")
    runs, total, model = [], 0.0, 0.0
    log = open(args.episode_log, "a") if getattr(args, "episode_log", None) else None
    for seed in seeds:
        meters, t = run_episodes(args, data, seed, episodes, predict, decide, classes, log)
        runs.append(meters)
        total, model = total + t["total"], model + t["model"]
        print(f"seed {seed}: " + "; ".join(f"{k} mIoU {m.miou():.2f} FB-IoU {m.fb_iou():.2f}"
                                           for k, m in meters.items()))
    if log:
        log.close()
    print(f"speed: {len(seeds) * episodes / total:.1f} episodes/s, {100 * model / total:.0f}% of the time in the model")
    out = {name: summarize([r[name] for r in runs], seeds) for name in decide}
    for name, r in out.items():
        print(f"{name}: mIoU {r['miou']:.2f} +- {r['miou_std']:.2f}, FB-IoU {r['fb_iou']:.2f} +- {r['fb_iou_std']:.2f} "
              f"over {len(seeds)} seeds; class IoU " + " ".join(f"{c}:{v:.1f}" for c, v in r["class_iou"].items()))
    return out


def write_results(path, summary, args, data=None, **fields):
    """The results JSON of evaluate.py / nonparametric_eval.py (README "Results files"), with the run record,
    written atomically."""
    protocol = {"split": "val, novel classes", "query_order": "val list in order, wrapping", "batch": 1,
                "test_size": args.test_size,
                "scoring": "logits resized to max(H, W) of the original label (ori_resize)",
                "ignore": IGNORE, "min_pixels": args.min_pixels, "train_pool": args.train_pool,
                "coco_split": args.coco_split, "std": "sample std over seeds"}
    out = {**summary, "episodes": args.episodes, "seeds": args.seeds, "shot": args.shot, "fold": args.fold,
           "dataset": args.dataset, "backbone": args.backbone, "precision": args.precision, "protocol": protocol,
           **fields, "run": run_record(args, data)}
    if not is_main():
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp{os.getpid()}", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(f"{path}.tmp{os.getpid()}", path)
    print(f"wrote {path}")


def format_table(paths, metric="miou"):
    """Paper Table 1 / 2 layout: one row per (dataset, backbone, method, pre-training) over the files,
    folds 0-3 and mean per shot; several files in one cell (e.g. training seeds) print as mean+-std.
    metric: the results field shown (or a function of the results)."""
    cells, shots = {}, set()
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        row = (r["dataset"], r["backbone"], r.get("method", "?"), r["pretrained"])
        value = metric(r) if callable(metric) else r[metric]
        cells.setdefault(row, {}).setdefault((r["shot"], r["fold"]), []).append(value)
        shots.add(r["shot"])
    cell = lambda v: "-" if not v else f"{np.mean(v):.2f}" + (f"+-{np.std(v, ddof=1):.2f}" if len(v) > 1 else "")
    head = ["Dataset", "Backbone", "Method", "Pre-train"] + [f"{s}-shot {c}" for s in sorted(shots)
                                                             for c in ("Fold-0", "Fold-1", "Fold-2", "Fold-3", "Mean")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, got in sorted(cells.items()):
        vals = []
        for s in sorted(shots):
            folds = [got.get((s, f), []) for f in range(4)]
            means = [np.mean(v) for v in folds if v]
            mean = f"{np.mean(means):.2f}" + ("*" if len(means) < 4 else "") if means else "-"
            vals += [cell(v) for v in folds] + [mean]
        lines.append("| " + " | ".join(list(row) + vals) + " |")
    return "\n".join(lines + ["mIoU in %; * = mean over the folds present only."])


# ============ 9. Plumbing: flags and defaults, seeds, checkpoints, run folders, training loop, progress ============
class KitParser(argparse.ArgumentParser):
    """argparse whose errors are KitErrors: one line naming the flag, no usage block (run() prints it)."""

    def error(self, message):
        raise KitError(message)


def bounded(kind, lo=None, hi=None, open_lo=False):
    """An argparse type: `kind` (int or float) within [lo, hi] (lo excluded if open_lo), checked at parse
    time, so a bad value stops the run before any work with 'argument --flag: value V is ...'."""
    def check(text):
        v = kind(text)
        if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
            want = f"in [{lo}, {hi}]" if hi is not None else f"> {lo}" if open_lo else f">= {lo}"
            raise argparse.ArgumentTypeError(f"value {text} is not allowed: it must be {want}")
        return v
    check.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return check


POSITIVE, NON_NEGATIVE, SIZE = bounded(int, 1), bounded(int, 0), bounded(int, 16)  # SIZE: image sides
UNIT, POSITIVE_FLOAT = bounded(float, 0.0, 1.0), bounded(float, 0.0, open_lo=True)


def dataset_of(argv):
    """The --dataset of a command line (default synthetic), read before the parser is built so that every
    default, and --help, is the one of that dataset."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="synthetic")
    dataset = pre.parse_known_args(argv)[0].dataset
    return dataset if dataset in N_CLASSES else "synthetic"  # a wrong name is refused by the full parser


def add_flag(group, dataset, flags, default, help, **kw):
    """Add a flag (`flags`: its names, space-separated) whose default may depend on the dataset ({dataset: value},
    the one place it is written):
    the parser gets the value for `dataset`, and --help prints it beside the other datasets' values."""
    if isinstance(default, dict):
        key = dataset if dataset in default else "synthetic"  # the synthetic worlds share unless told
        others = "; ".join(f"{d} {'required' if v is None else v}" for d, v in default.items() if d != key)
        if default[key] is None:
            help += f" (required for --dataset {dataset}; {others})"
        else:
            help += f" (default %(default)s for --dataset {dataset}; {others})"
        default = default[key]
    elif default is not None:
        help += " (default %(default)s)"
    group.add_argument(*flags.split(), default=default, help=help, **kw)


SYNTHETIC_ROOTS = {"synthetic": "data/synthetic", "synthetic2": "data/synthetic2"}  # the two worlds


def add_data_args(parser, dataset, stage):
    """The data flags of a stage ('pretrain', 'metatrain', 'evaluate', 'nonparametric' or 'verify'); evaluate's
    have no defaults (the checkpoint's fill them)."""
    d = (lambda table: None) if stage == "evaluate" else (lambda table: table)
    g = parser.add_argument_group("data (PROTOCOL.md 1-3)" + ("; default: the checkpoint's" * (stage == "evaluate")))
    add_flag(g, dataset, "--dataset", d("synthetic"), "pascal, coco, or a built-in synthetic benchmark world",
             choices=list(N_CLASSES))
    add_flag(g, dataset, "--data-root", d(dict(pascal=None, coco=None, **SYNTHETIC_ROOTS)),
             "VOC-layout root (python prepare_data.py makes one; the synthetic one is generated on first use)")
    if stage != "verify":
        add_flag(g, dataset, "--fold", d(0), "fold i of PASCAL-5i / COCO-20i", type=int, choices=[0, 1, 2, 3])
    add_flag(g, dataset, "--train-pool", d(dict(pascal="oslsm", coco="aug", synthetic="aug")), "aug: every mask "
             "not in val.txt (10582 on VOC + SBD); oslsm: train.txt + train_noval.txt, PFENet/BAM's 5953 "
             "(PROTOCOL.md 2.2)", choices=["aug", "oslsm"])
    add_flag(g, dataset, "--coco-split", d("interleaved"), "COCO-20i folds: interleaved is PFENet/BAM/HSNet's "
             "(PROTOCOL.md 1.2)", choices=["interleaved", "contiguous"])
    if stage != "pretrain":  # the pixel rule and the test canvas belong to episodes
        add_flag(g, dataset, "--min-pixels", d(dict(pascal=2048, coco=2048, synthetic=128)),
                 "pixel rule of the support pools (PROTOCOL.md 3.1)", type=POSITIVE)
    if stage not in ("pretrain", "verify"):
        add_flag(g, dataset, "--test-size", d(dict(pascal=473, coco=641, synthetic=96)),
                 "test canvas side (PROTOCOL.md 5.1)", type=SIZE)
    return parser


def cpu_cores():
    """The cores this process may use (the affinity mask, not the machine's count, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def add_common_args(parser, dataset, stage):
    """The flags the stages share: data, model and run flags. stage: 'pretrain', 'metatrain' (with --seed and
    --out), 'nonparametric' (with --seed) or 'evaluate' (data and model default to the checkpoint's)."""
    d = (lambda table: None) if stage == "evaluate" else (lambda table: table)  # evaluate: the checkpoint's
    add_data_args(parser, dataset, stage)
    g = parser.add_argument_group("model" + ("; default: the checkpoint's" if stage == "evaluate" else ""))
    add_flag(g, dataset, "--backbone", d(dict(pascal="resnet50", coco="resnet50", synthetic="resnet18")),
             "resnet50v2 (PFENet/BAM's deep stem), resnet50 (torchvision's) or vgg16 (paper Sec. 3.1); resnet18 "
             "for CPU runs", choices=BACKBONES)
    add_flag(g, dataset, "--weights --pretrained", d(dict(pascal="imagenet", coco="imagenet", synthetic="none")),
             "backbone init: imagenet, none, a state-dict file or pretrain_bcpt.py's last.pt", dest="weights")
    g = parser.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    g.add_argument("--workers", type=NON_NEGATIVE, default=min(8, cpu_cores()), help="DataLoader workers; results "
                   "do not depend on it (default min(8, cores): %(default)s here)")
    if stage != "evaluate":
        g.add_argument("--seed", type=int, default=321, help="all randomness of the run: initialisation, "
                       "augmentation, training episodes (PFENet/BAM's value) (default %(default)s)")
    if stage in ("pretrain", "metatrain"):
        g.add_argument("--out", help="run folder: last.pt, log.jsonl (default runs/<stage>-<dataset>-fold<F>...)")
    return parser


def add_training_args(parser, dataset, source, epochs, batch, lr, crop, scale):
    """The optimisation and run-control flags of both training stages; defaults ({dataset: value} or one
    value) come from the stage, lr as (default, help), `source` names where the values come from."""
    g = parser.add_argument_group(f"optimisation ({source})")
    add_flag(g, dataset, "--epochs", epochs, "passes over the training data (paper Sec. 3.1)", type=POSITIVE)
    add_flag(g, dataset, "--batch", batch, "samples per iteration", type=POSITIVE)
    add_flag(g, dataset, "--lr", lr[0], lr[1], type=POSITIVE_FLOAT)
    add_flag(g, dataset, "--crop", crop, "training crop side (PROTOCOL.md 4.2)", type=SIZE)
    add_flag(g, dataset, "--scale", scale, "RandScale range (PROTOCOL.md 4.2)", type=POSITIVE_FLOAT, nargs=2)
    add_flag(g, dataset, "--momentum", 0.9, "SGD momentum (PROTOCOL.md 7.1)", type=UNIT)
    add_flag(g, dataset, "--wd", 1e-4, "SGD weight decay (PROTOCOL.md 7.1)", type=bounded(float, 0.0))
    add_flag(g, dataset, "--power", 0.9, "power of the poly lr schedule, per iteration (PROTOCOL.md 7.1)",
             type=bounded(float, 0.0))
    g = parser.add_argument_group("run control")
    add_precision_arg(g)
    g.add_argument("--max-iters", type=POSITIVE, help="stop after this many iterations; the lr schedule is unchanged")
    add_flag(g, dataset, "--log-every", 20, "iterations between progress lines", type=POSITIVE)
    add_flag(g, dataset, "--save-every", 200, "iterations between checkpoints", type=POSITIVE)
    g.add_argument("--resume", action="store_true", help="continue from <out>/last.pt (a fresh start if none yet)")
    g.add_argument("--select", default="last", choices=["last", "best-val"], help="last: the final model (honest); "
                   "best-val: also keep best.pt, the best validation on the val images, as BAM and PFENet do "
                   "(PROTOCOL.md 8.1) (default %(default)s)")
    g.add_argument("--benchmark", type=NON_NEGATIVE, default=0, help="time N steps (data / network, peak memory) "
                   "and exit")
    return parser


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def add_precision_arg(group):
    group.add_argument("--precision", default="auto", choices=PRECISIONS, help="auto: fp16 autocast with a gradient "
                       "scaler on CUDA, fp32 on the CPU; bf16: bfloat16 autocast on either, no scaler; fp16: CUDA "
                       "only (default %(default)s)")


def amp_dtype(precision, device):
    """The autocast dtype of --precision on `device`, or None (float32, no autocast)."""
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise KitError("--precision fp16 needs a CUDA device: use --precision bf16 (or fp32) on the CPU")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def autocast(device, dtype):
    """Mixed precision in `dtype` on `device`, or nothing for dtype None (see fp32 for what stays float32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def grad_scaler(device, dtype):
    """The gradient scaler fp16 needs (bf16 and fp32 do not: it is then a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def finish_args(args, out_name=None, needs_data=True):
    """Checks that need several flags, derived values, the device; out_name: the default run folder name.
    The flags as parsed and resolved are kept in args.flags (args.json; flags_to_argv turns them back)."""
    if args.data_root is None and needs_data:
        raise KitError(f"--data-root is required for --dataset {args.dataset} ({LAYOUT_FIX})")
    if out_name and args.out is None:
        args.out = os.path.join("runs", out_name)
    args.device = setup_device(args.device)
    args.flags = dict(vars(args))
    args.novel, args.base = (novel_classes(args.dataset, args.fold, args.coco_split),
                             base_classes(args.dataset, args.fold, args.coco_split))
    return args


def flags_to_argv(flags):
    """The command line that gives back these flags (args.json "flags"): every flag spelled out."""
    argv = []
    for dest, value in flags.items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None and value is not False:  # (0 == False: compare by identity)
            argv += [flag, str(value)]
    return argv


def run_record(args, data=None):
    """What ran where: UTC time, host, library versions, device, world size, the kit's git commit and whether
    its tree was dirty, the data root and its pool sizes (args.json, and "run" in the results files)."""
    import platform
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(["git", "-C", here, *a], capture_output=True, text=True).stdout.strip()
    try:
        commit, dirty = git("rev-parse", "HEAD") or None, bool(git("status", "--porcelain", "--untracked-files=no"))
    except OSError:  # no git on this machine
        commit, dirty = None, None
    device = torch.device(args.device)
    return {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "host": socket.gethostname(),
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "numpy": np.__version__, "opencv": cv2.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "world_size": world(), "git_commit": commit, "git_dirty": dirty,
            "data_root": os.path.abspath(args.data_root) if args.data_root else None,
            "pools": {split: len(ids) for split, (ids, _) in data.items()} if data else None}


def write_args_json(args, argv, data):
    """<out>/args.json at the start of a run: the command line, every flag with its default filled in, the
    values derived from them, and the run record."""
    if not is_main():
        return
    derived = {k: v for k, v in vars(args).items() if k not in args.flags and k != "flags"}
    with open(os.path.join(args.out, "args.json"), "w") as f:
        json.dump({"argv": list(argv or []), "flags": args.flags, "derived": derived, "run": run_record(args, data)},
                  f, indent=1)


# ---- several processes (torchrun): one process per device, rank 0 prints and writes ----
def distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if distributed() else 0


def world():
    return dist.get_world_size() if distributed() else 1


def is_main():
    return rank() == 0


def setup_device(flag):
    """--device resolved. Under torchrun (RANK and WORLD_SIZE set): join the process group (NCCL on CUDA, gloo on
    the CPU) with one device per local rank, cuda:LOCAL_RANK; ranks other than 0 print nothing."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return "cuda" if flag == "auto" and torch.cuda.is_available() else "cpu" if flag == "auto" else flag
    if flag not in ("auto", "cuda", "cpu"):
        raise KitError(f"--device {flag}: under torchrun each process takes cuda:LOCAL_RANK; pass --device cuda, "
                       "cpu or auto (and choose the GPUs with CUDA_VISIBLE_DEVICES)")
    if flag == "cuda" and not torch.cuda.is_available():
        raise KitError("--device cuda: this machine has no CUDA device; pass --device cpu")
    cuda = flag != "cpu" and torch.cuda.is_available()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    if not distributed():
        dist.init_process_group("nccl" if cuda else "gloo")
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return device


def all_reduce_sum(t):
    """t summed over the processes (t itself for one process), on t's device; NCCL reduces on the GPU."""
    if world() == 1:
        return t
    x = t.to(f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu").clone()
    dist.all_reduce(x)
    return x.to(t.device)


def finite_everywhere(loss):
    """Whether the loss is finite on every process: all agree before a step is taken or skipped, so none hangs."""
    bad = torch.tensor([float(not torch.isfinite(loss))])
    return all_reduce_sum(bad).item() == 0


def same_on_all_ranks(t):
    """Whether the tensor is bit-identical on every process (the BCPT centres after a run)."""
    if world() == 1:
        return True
    copies = [None] * world()
    dist.all_gather_object(copies, t.detach().cpu())
    return all(torch.equal(copies[0], c) for c in copies)


def wrap_ddp(model, device, sync_bn=False):
    """Several processes: DistributedDataParallel (gradients averaged over the ranks; SyncBatchNorm first where BN
    trains on CUDA; buffers are not broadcast, the BCPT centres stay in step by all_reduce_sum). One: the model."""
    if world() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    if sync_bn and device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    import inspect  # torch >= 2.14 names the option forward_sync_buffers; earlier ones broadcast_buffers
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {("forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"): False}
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)


def global_mean_ce(logits, target):
    """Cross-entropy (ignoring 255) averaged over the labelled pixels of the whole global batch. One process:
    F.cross_entropy's mean. Several: each rank's sum over the all-reduced count, times the world size, so that
    DDP's average of the ranks' gradients is the gradient of the one-process loss of the same batch."""
    if world() == 1:
        return F.cross_entropy(logits, target, ignore_index=IGNORE)
    n = all_reduce_sum((target != IGNORE).sum().float())
    return F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum") * world() / n.clamp(min=1)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    name, keys, pos, has_gauss, cached = np.random.get_state()  # lists, not arrays: weights_only loads them
    return {"python": random.getstate(), "numpy": [name, keys.tolist(), pos, has_gauss, cached],
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, state):
    """Write atomically through a temp file unique to this process: a crash mid-write leaves the previous
    checkpoint intact, and a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expect=None):
    """torch.load(weights_only=True); refuse a kit checkpoint whose args disagree with `expect`."""
    if not os.path.isfile(path):
        raise KitError(f"checkpoint {path} does not exist: check the path (or use imagenet / none)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise KitError(f"checkpoint {path} cannot be loaded safely ({type(e).__name__}): "
                       "is it a state dict or a file written by this kit?") from None
    saved = ckpt.get("args", {}) if isinstance(ckpt, dict) else {}
    for key, want in (expect or {}).items():
        if key in saved and saved[key] != want:
            flag = "--" + key.replace("_", "-")
            raise KitError(f"checkpoint {path} was made with {flag} {saved[key]} but this run has {flag} {want}: "
                           "pass the matching checkpoint or flag")
    return ckpt


@contextlib.contextmanager
def run_folder(out):
    """One run per folder: hold an exclusive lock on OUT/.lock (holding our process id) while the run lasts.
    A second run on the same folder stops at once; a lock left by a killed run is taken over with a note
    (the kernel releases a dead process's lock), and that run's leftover temp files are removed. Under torchrun
    rank 0 holds it and tells the others whether it could."""
    with contextlib.ExitStack() as stack:
        taken = torch.zeros(1)
        try:
            if is_main():
                stack.enter_context(_locked(out))
                taken += 1
        finally:  # every rank learns whether rank 0 took the folder, also when it could not
            taken = all_reduce_sum(taken)
        if not taken.item():
            raise KitError(f"--out {out}: rank 0 could not take the run folder (its message says why)")
        yield out


@contextlib.contextmanager
def _locked(out):
    """The lock of run_folder, in this process."""
    import fcntl  # POSIX; the kit's runs target Linux workstations
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, ".lock")
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        owner = f.read().strip() or "another process"
        f.close()
        raise KitError(f"--out {out} is in use by {owner} (lock {path}): wait for that run to end, "
                       "or choose another --out") from None
    f.seek(0)
    previous = f.read().strip()
    if previous:
        print(f"note: {path} was left by {previous}, which is no longer running; taking it over")
    for stale in glob.glob(os.path.join(glob.escape(out), "*.tmp*")):
        if os.path.isfile(stale):
            os.remove(stale)  # a killed run's half-written checkpoint; the finished ones are intact
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {socket.gethostname()}")
    f.flush()
    try:
        yield out
    finally:
        f.seek(0)
        f.truncate()  # an empty lock file means a clean end; the file stays so lockers share one inode
        f.close()


def poly_lr(opt, base_lrs, t, total, power=0.9):
    """lr = base_lr (1 - t / total)^power for each parameter group, every iteration (PROTOCOL.md 7.1)."""
    for group, lr in zip(opt.param_groups, base_lrs):
        group["lr"] = lr * (1 - t / total) ** power
    return opt.param_groups[0]["lr"]


class Trainer:
    """What both training stages share around their own step: resume (refusing a checkpoint made with other
    flags), the resumable batch stream, the poly lr, the NaN stop that keeps the last good state, and atomic
    checkpoints holding everything --resume needs (model, optimiser, scaler, iteration, RNG states, flags)."""

    def __init__(self, args, stage, model, opt, scaler, base_lrs, total, power=0.9):
        self.args, self.stage, self.model, self.opt, self.scaler = args, stage, model, opt, scaler
        self.base_lrs, self.total, self.power = base_lrs, total, power
        self.path, self.extra = os.path.join(args.out, "last.pt"), {}  # extra: stage fields of the checkpoint

    def save(self, t, path=None, **extra):
        """Every process calls it: their RNG states are gathered, rank 0 writes the file, all wait for it."""
        states = [rng_state()] * world()
        if world() > 1:
            dist.all_gather_object(states, rng_state())
        if is_main():
            save_checkpoint(path or self.path, {
                "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "iter": t,
                "scaler": self.scaler.state_dict(), "rng": states[0], "args": dict(vars(self.args)),
                "stage": self.stage, **({"rng_ranks": states} if world() > 1 else {}), **self.extra, **extra})
        if world() > 1:
            dist.barrier()
        return path or self.path

    def resume(self, keys):
        """--resume: load <out>/last.pt into model, optimiser and scaler, refusing one whose `keys` flags
        differ from this run's. -> the checkpoint, or None (a fresh start, said so)."""
        if not self.args.resume:
            return None
        if not os.path.isfile(self.path):
            print(f"--resume: no {self.path} yet, starting from iteration 0")
            return None
        ckpt = load_checkpoint(self.path, {k: getattr(self.args, k) for k in keys})
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        print(f"resumed from {self.path} at iteration {ckpt['iter']}")
        return ckpt

    def run(self, dataset, device, ckpt, stop, step, report):
        """Iterations ckpt's (or 0) .. stop-1. step(batch) -> (loss, metrics) must change nothing when the loss
        is not finite; report(t, loss, lr, metrics) after each iteration t (1-based)."""
        start, args = ckpt["iter"] if ckpt else 0, self.args
        with torch.random.fork_rng(devices=[]):  # the loader's base-seed draw must not move the global RNG,
            batches = iter(stream_loader(dataset, args.batch, args.seed, start, stop, args.workers, device))
        if ckpt:  # ... so that after a resume every RNG is where a straight run has it (each rank's own)
            ranks = ckpt.get("rng_ranks", [ckpt["rng"]])
            if len(ranks) != world():
                print(f"note: {self.path} was written by {len(ranks)} processes, this run has {world()}: every "
                      "rank continues from rank 0's RNG state, so the run is not an exact continuation")
            set_rng_state(ranks[rank()] if len(ranks) == world() else ranks[0])
        for t, batch in enumerate(batches, start):
            lr = poly_lr(self.opt, self.base_lrs, t, self.total, self.power)
            loss, metrics = step(batch)  # the step checked the loss on every rank (finite_everywhere)
            if not torch.isfinite(loss):
                path = self.save(t)
                raise KitError(f"loss is {loss.item()} at iteration {t}: the last good state is saved in {path}; "
                               f"lower --lr (now {args.lr}) and rerun with --resume")
            report(t + 1, all_reduce_sum(loss.detach().float().reshape(1)).item() / world(), lr, metrics)
            if (t + 1) % args.save_every == 0 or t + 1 == stop:
                self.save(t + 1)
        print(f"saved {self.path}")

    def keep_best(self, t, miou, **scores):
        """--select best-val, after a validation at iteration t: log it, and save best.pt if it is the best."""
        best = self.extra["best"]
        print(f"validation at iteration {t}: mIoU {miou:.2f} (best {max(best['miou'], miou):.2f})")
        if is_main():
            Progress.record(self.args.out, step=t, val_miou=miou, **scores, new_best=miou > best["miou"])
        if miou > best["miou"]:
            self.extra["best"] = {"miou": miou, "iter": t}
            self.save(t, os.path.join(self.args.out, "best.pt"), select="best-val")


def benchmark(step, batches, n, device, what, dataset, batch, timed=None):
    """Time n steps after one warm-up: waiting for the batch (data) against step(batch) (network), with peak
    memory; and one sample of `dataset` (read, decode, augment) on one core, hence the workers that keep such a
    step fed. timed: (module, names) of functions inside the step to time as well, by wrapping them here so
    the step itself carries no clock. Prints two lines (figures, not a test) and returns the ms per step."""
    t0 = time.perf_counter()
    for i in range(8):
        dataset[i]
    sample_ms = 1000 * (time.perf_counter() - t0) / 8
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    spent = {"data": 0.0, "network": 0.0, "inner": 0.0}
    module, names = timed or (None, ())
    originals = {name: getattr(module, name) for name in names}

    def clocked(fn):
        def wrapper(*a, **kw):
            sync()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            sync()
            spent["inner"] += time.perf_counter() - t0
            return out
        return wrapper
    for name, fn in originals.items():
        setattr(module, name, clocked(fn))
    try:
        for k in range(n + 1):  # step 0 warms up and is not counted
            t0 = time.perf_counter()
            item = next(batches)
            t1 = time.perf_counter()
            spent["inner"] *= k > 0
            step(item)
            sync()
            spent["data"] += (t1 - t0) * (k > 0)
            spent["network"] += (time.perf_counter() - t1) * (k > 0)
    finally:
        for name, fn in originals.items():
            setattr(module, name, fn)
    ms = {k: 1000 * v / n for k, v in spent.items()}
    if device.type == "cuda":
        mem = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource  # Unix only; the CPU figure is the process's peak resident memory
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    share = 100 * ms["inner"] / ms["network"]
    inner = f", of which {'/'.join(names)} {ms['inner']:.2f} ms = {share:.2f}%" * bool(names)
    print(f"benchmark {what} on {device}: {ms['data'] + ms['network']:.1f} ms/step = data {ms['data']:.1f} + "
          f"network {ms['network']:.1f}{inner}; peak memory {mem:.0f} MiB", flush=True)
    print(f"one sample takes {sample_ms:.1f} ms to load and augment on one core: {batch} per step need "
          f"{math.ceil(batch * sample_ms / ms['network'])} workers to keep up with this {ms['network']:.0f} ms step")
    return {**ms, "sample": sample_ms}


class Progress:
    """One line per interval with rate and ETA; every line also appended to <out>/log.jsonl."""

    def __init__(self, total, start=0, every=10, out=None, unit="it"):
        """A run from step `start`: <out>/log.jsonl is cut back to the records of steps <= start, so a resumed
        run logs no step twice and a fresh one starts an empty log."""
        self.total, self.start, self.every, self.unit = total, start, every, unit
        self.t0, self.log = time.time(), (os.path.join(out, "log.jsonl") if out and is_main() else None)
        if self.log and os.path.exists(self.log):
            with open(self.log) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= start]
            with open(self.log, "w") as f:
                f.writelines(kept)

    def step(self, t, force=False, **metrics):
        """Call after finishing step t (1-based count of done steps)."""
        if not (force or t % self.every == 0 or t == self.total):
            return
        rate = (t - self.start) / max(time.time() - self.t0, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((self.total - t) / max(rate, 1e-9)))
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"[{t}/{self.total}] {text} | {rate:.2f} {self.unit}/s ETA {eta}", flush=True)
        if self.log:
            Progress.record(os.path.dirname(self.log), step=t, **metrics, rate=rate, time=round(time.time(), 3))

    @staticmethod
    def record(out, **fields):
        """Append one JSON line to <out>/log.jsonl."""
        with open(os.path.join(out, "log.jsonl"), "a") as f:
            f.write(json.dumps(fields) + "\n")


def run(main):
    """Entry point of every script: a KitError (also one raised in a DataLoader worker) becomes one
    line on stderr and exit code 2, not a traceback wall."""
    try:
        main(sys.argv[1:])
    except KitError as e:
        msg = str(e).strip().splitlines()[-1].replace("common.KitError: ", "")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)
