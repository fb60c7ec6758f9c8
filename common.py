"""common.py: what the stages of the BCPT kit share.

Sections, in the order the stages meet them: 1 folds, 2 data on disk (pools, per-class index),
3 transforms, 4 datasets, 5 backbones, 6 BCPT clustering (paper Sec. 2), 7 the ASPP-PFENet few-shot
model, 8 metrics, 9 plumbing (flags, seeds, checkpoints, progress), 10 data preparation commands.

Shape legend used in comments: B batch, S shots, C channels, D embedding dim, K cluster centres,
H, W spatial size, N pixels.

Command line (one-off data preparation and checks):
    python common.py make-synthetic --out data/synthetic
    python common.py prepare-pascal --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset --out ROOT
    python common.py prepare-coco --coco COCO2014 --out ROOT
    python common.py verify --dataset pascal --data-root ROOT
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
import shutil
import socket
import sys
import tempfile
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


# ============ 1. Class folds (protocol.md 1.1, 2.1) ============
N_CLASSES = {"pascal": 20, "coco": 80, "synthetic": 20}


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


# ============ 2. Data on disk: VOC layout, pools, per-class index (protocol.md 1.2-1.4) ============
IMAGES, MASKS, LISTS = "JPEGImages", "SegmentationClassAug", os.path.join("ImageSets", "Segmentation")
CACHE_DIR = ".fss_cache"  # the per-class index cache inside a data root
LAYOUT_FIX = ("a data root holds JPEGImages/<id>.jpg, SegmentationClassAug/<id>.png and "
              "ImageSets/Segmentation/val.txt; build one with python common.py prepare-pascal|prepare-coco")


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
            raise KitError(f"--train-pool oslsm needs {' and '.join(missing)} (prepare-pascal writes them); "
                           "or use --train-pool aug")
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
                       "convert it with python common.py prepare-pascal")
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


def decodes_fully(path):
    """True if the whole image decodes (PIL raises on a truncated file, where OpenCV only warns)."""
    try:
        with Image.open(path) as im:
            im.load()
        return True
    except Exception:
        return False


def check_image_file(root, img_id, shape):
    """Cheap check of one image at the index scan, without decoding it: the header's size equals the
    mask's `shape` (H, W), and a JPEG ends with its end-of-image marker, as a truncated download does not.
    A file without the marker is decoded in full before it is called bad (valid files may carry trailing bytes)."""
    path = os.path.join(root, IMAGES, img_id + ".jpg")
    fix = f"re-extract or re-download it, or drop {img_id} from the lists"
    try:
        with Image.open(path) as im:
            (w, h), fmt = im.size, im.format
    except Exception as e:
        raise KitError(f"cannot read image {path} ({type(e).__name__}): missing or corrupt; {fix}") from None
    if (h, w) != tuple(shape):
        raise KitError(f"image {path} is {w}x{h} but its mask is {shape[1]}x{shape[0]}: regenerate the mask")
    if fmt == "JPEG":
        with open(path, "rb") as f:
            f.seek(max(os.path.getsize(path) - 64, 0))
            tail = f.read()
        if not tail.rstrip(b"\0").endswith(b"\xff\xd9") and not decodes_fully(path):
            raise KitError(f"image {path} is truncated (no JPEG end marker, and it does not decode fully): {fix}")


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
    """{c: [ids whose mask has >= min_pixels pixels of c]}: the support pools (protocol.md 1.4)."""
    return {c: [ids[j] for j in np.flatnonzero(counts[:, c] >= min_pixels)] for c in classes}


# ============ 3. Transforms (protocol.md 3.1 training, 3.2 test) ============
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
    """protocol.md 3.2 ori_resize: logits (B, 2, s, s) -> (B, 2, L, L) with L = max(H, W) of the raw
    label, and the raw label (H, W) pasted top-left into an L x L canvas of 255."""
    h, w = raw_label.shape[-2:]
    side = max(h, w)
    target = torch.full((side, side), IGNORE, dtype=torch.long, device=raw_label.device)
    target[:h, :w] = raw_label
    return F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=True), target


# ============ 4. Datasets: base-class pretraining and episodes (protocol.md 1.5, 1.6) ============
def binarize(label, cls):
    """Episode mask: cls -> 1, 255 kept, everything else (background, other classes) -> 0."""
    return np.where(label == cls, 1, np.where(label == IGNORE, IGNORE, 0)).astype(np.uint8)


class BaseClassDataset(torch.utils.data.Dataset):
    """Pretraining samples (protocol.md 1.6): base classes -> 1..n_base in id order, novel classes and
    background -> 0 (the merged background), 255 kept. Item idx draws its augmentation from
    default_rng([seed, idx]), so a stream of indices gives the same batches for any worker count."""

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


class EpisodeDataset(torch.utils.data.Dataset):
    """Few-shot episodes: a query and `shot` supports of one class (protocol.md 1.4-1.5).

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
        if self.episodes:  # scores are computed against the original-size label (protocol.md 3.2)
            item["raw_label"] = torch.from_numpy(pairs[0][1]).long()         # (H0, W0)
        return item


class StreamSampler(torch.utils.data.Sampler):
    """Iteration t takes items t*B .. (t+1)*B - 1 of an endless stream of per-epoch permutations
    seeded by (seed, epoch), so a run resumed at iteration t sees exactly the batches it would have."""

    def __init__(self, n, batch, seed, start_iter, total_iters):
        self.n, self.batch, self.seed, self.start, self.total = n, batch, seed, start_iter, total_iters

    def __len__(self):
        return (self.total - self.start) * self.batch

    def __iter__(self):
        epoch, perm = -1, None
        for pos in range(self.start * self.batch, self.total * self.batch):
            if pos // self.n != epoch:
                epoch = pos // self.n
                perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            yield epoch * self.n + int(perm[pos % self.n])  # the dataset uses idx % n and seeds by idx


def stream_loader(dataset, batch, seed, start_iter, total_iters, workers, device):
    sampler = StreamSampler(len(dataset), batch, seed, start_iter, total_iters)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=False)


# ============ 5. Backbones (protocol.md 5.1) ============
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
    return {"resnet50": torchvision.models.resnet50, "resnet18": torchvision.models.resnet18,
            "vgg16": torchvision.models.vgg16_bn}[name](weights=None)


def _imagenet_state(name):
    weights = {"resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V1,
               "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
               "vgg16": torchvision.models.VGG16_BN_Weights.IMAGENET1K_V1}[name]
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # no network, proxy, ...
        raise KitError(f"--weights imagenet: could not download torchvision's {weights} ({type(e).__name__}); "
                       f"download {weights.url} elsewhere and pass --weights PATH, or use --weights none") from None


def _load_strict(module, state, source):
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).split("\n\t")[1:3]
        raise KitError(f"{source} does not match the backbone: {' '.join(first)[:300]}") from None


def build_backbone(name, weights="none", expect=None):
    """torchvision backbone split into layer0..layer4 (protocol.md 5.1).

    name: resnet50 / resnet18 (layer3, layer4 dilated 2 and 4: output stride 8) or vgg16 (vgg16_bn,
    PFENet split, ceil-mode pools). weights: 'imagenet', 'none', a torchvision state-dict file, or a
    kit checkpoint (pretrain_bcpt.py's last.pt), which must match `expect` (e.g. dataset and fold).
    """
    if name not in ("resnet50", "resnet18", "vgg16"):
        raise KitError(f"--backbone {name!r}: choose resnet50, resnet18 or vgg16")
    net, ckpt = _torchvision_net(name), None
    if weights == "imagenet":
        net.load_state_dict(_imagenet_state(name))
    elif weights not in (None, "none"):
        ckpt = load_checkpoint(weights, {**(expect or {}), "backbone": name})
        if "model" not in ckpt:
            _load_strict(net, ckpt, weights)  # a plain torchvision state dict
    if name == "vgg16":
        f = net.features
        for m in f:
            if isinstance(m, nn.MaxPool2d):
                m.ceil_mode = True
        layers, channels = [f[0:7], f[7:14], f[14:24], f[24:34], f[34:43]], [64, 128, 256, 512, 512]
    else:
        layers = [nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool), net.layer1, net.layer2,
                  _dilate(net.layer3, 2), _dilate(net.layer4, 4)]
        channels = [64, 64, 128, 256, 512] if name == "resnet18" else [64, 256, 512, 1024, 2048]
    backbone = Backbone(name, layers, channels)
    if ckpt is not None and "model" in ckpt:  # the backbone part of a pretraining checkpoint
        state = {k[len("backbone."):]: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
        _load_strict(backbone, state, weights)
    return backbone


# ============ 6. BCPT: online clustering of the merged background (paper Sec. 2) ============
def cluster_assign(centers, emb):
    """Sec. 2.1: S = P^T I_bg (K, N), each pixel to its most similar centre (the one-hot columns of A).
    centers (D, K), emb (D, N) -> (N,) cluster ids."""
    return (centers.t() @ emb).argmax(0)


def momentum_update(centers, emb, assign, mu):
    """Eq. (1): P_hat = I_bg A^T, then p <- mu p/|p| + (1 - mu) p_hat/|p_hat| per centre.
    A centre with no pixels in the batch keeps its value. centers (D, K), emb (D, N), assign (N,)."""
    a = F.one_hot(assign, centers.shape[1]).to(emb.dtype)  # (N, K) = A^T
    p_hat = emb @ a  # (D, K)
    moved = mu * F.normalize(centers, dim=0) + (1 - mu) * F.normalize(p_hat, dim=0)
    return torch.where(a.sum(0) > 0, moved, centers)


def background_mining_loss(emb, centers, assign):
    """Eq. (2), mean over background pixels: -log softmax over the K centres of <i, p_k>, at the
    assigned centre. emb (D, N), centers (D, K) (a buffer: no gradient), assign (N,)."""
    return F.cross_entropy(emb.t() @ centers, assign)  # logits (N, K)


def kmeans(x, init, iters=10):
    """Eq. (5): Lloyd's k-means on the columns of x (D, C), from init (D, k); an empty cluster keeps
    its centre. Deterministic: no random restarts."""
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


def guide_centers(centers, guidance, mu):
    """Eqs. (6)-(7). Eq. 6: M (K-1, K) maximising Tr(M^T G^T P) with one 1 per row, i.e. each guidance
    vector goes to its most similar centre. Eq. 7: p <- mu p + (1 - mu) g_hat/|g_hat|, g_hat the sum of
    the guidance vectors given to p; centres given none are unchanged. centers (D, K), guidance (D, K-1)."""
    m = F.one_hot((guidance.t() @ centers).argmax(1), centers.shape[1]).to(centers.dtype)  # (K-1, K), Eq. 6
    g_hat = guidance @ m  # (D, K)
    return torch.where(m.sum(0) > 0, mu * centers + (1 - mu) * F.normalize(g_hat, dim=0), centers)  # Eq. 7


# ============ 7. The ASPP-PFENet few-shot model (paper Sec. 3.1; protocol.md 5.3-5.4) ============
def masked_average_pooling(feat, mask):
    """Prototype p = sum_hw F*M / (sum_hw M + 0.0005) (PFENet). feat (B, C, H, W), mask (B, 1, H, W) -> (B, C)."""
    return (feat * mask).sum((2, 3)) / (mask.sum((2, 3)) + 5e-4)


def prior_mask(query_feat, support_feat, support_mask):
    """PFENet's training-free prior for ONE shot (the caller averages shots): for each query position the
    max over support positions of cos(f_q, f_s * M), then min-max over the query's positions.
    query_feat (B, C, H, W), support_feat (B, C, h, w), support_mask (B, 1, h, w) -> (B, 1, H, W) in [0, 1]."""
    b, _, h, w = query_feat.shape
    q = query_feat.flatten(2)  # (B, C, Nq)
    s = (support_feat * support_mask).flatten(2)  # (B, C, Ns)
    cos = torch.bmm(s.transpose(1, 2), q) / (s.norm(dim=1)[:, :, None] * q.norm(dim=1)[:, None, :] + 1e-7)  # (B, Ns, Nq)
    prior = cos.max(1).values  # (B, Nq)
    lo, hi = prior.min(1, keepdim=True).values, prior.max(1, keepdim=True).values
    return ((prior - lo) / (hi - lo + 1e-7)).view(b, 1, h, w)  # (B, 1, H, W)


def resize(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)  # protocol.md 7.12


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
        m3 = resize(masks, f3.shape[-2:])  # soft mask at the feature size (protocol.md 5.3)
        high = backbone.layer4(f3 * m3)
        return mid, high, m3, resize(masks, high.shape[-2:])


def shot_prior(q_high, s_high, s_mask, shots):
    """K-shot prior = mean over shots of prior_mask. q_high (B, C, H, W), s_high (B*S, C, h, w)."""
    s_high, s_mask = s_high.unflatten(0, (-1, shots)), s_mask.unflatten(0, (-1, shots))  # (B, S, ...)
    return torch.stack([prior_mask(q_high, s_high[:, k], s_mask[:, k]) for k in range(shots)]).mean(0)


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
    """ASPP PFENet (paper Sec. 3.1): BAM's meta learner without the base-learner ensemble. The backbone
    is frozen (no gradient, BN always in eval); everything else trains."""

    def __init__(self, backbone):
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

    def train(self, mode=True):
        super().train(mode)
        self.backbone.eval()  # BN statistics frozen (BAM fix_bn, protocol.md 5.2)
        return self

    def forward(self, query, support, support_mask):
        """query (B, 3, H, W), support (B, S, 3, H, W), support_mask (B, S, H, W) in {0, 1, 255}
        -> logits (B, 2, H, W), upsampled bilinearly (align_corners) to the input size."""
        shots = support.shape[1]
        q_mid, q_high = frozen_features(self.backbone, query)
        m = (support_mask == 1).float().flatten(0, 1).unsqueeze(1)  # (B*S, 1, H, W); 255 -> 0
        s_mid, s_high, m_mid, m_high = frozen_features(self.backbone, support.flatten(0, 1), m)
        q = self.down_query(q_mid)  # (B, 256, h, w)
        proto = masked_average_pooling(self.down_supp(s_mid), m_mid).unflatten(0, (-1, shots)).mean(1)  # (B, 256)
        prior = resize(shot_prior(q_high, s_high, m_high, shots), q.shape[-2:])  # (B, 1, h, w)
        x = self.init_merge(torch.cat([q, proto[:, :, None, None].expand_as(q), prior], 1))  # (B, 513, h, w) in
        x = self.res1(self.aspp(x))  # (B, 1280, h, w) -> (B, 256, h, w)
        x = self.res2(x) + x
        return resize(self.cls(x), query.shape[-2:])  # (B, 2, H, W)


# ============ 8. Metrics (protocol.md 4.3) ============
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

    def class_iou(self):
        return {c: float(100 * i / (u + 1e-10)) for c, i, u in zip(self.classes, self.inter, self.union)}

    def miou(self):
        return sum(self.class_iou().values()) / len(self.classes)  # a class with no episode counts 0

    def fb_iou(self):
        return float(100 * (self.fb_inter / (self.fb_union + 1e-10)).mean())


# ============ 8b. Episodic evaluation shared by evaluate.py and nonparametric_eval.py ============
def add_eval_args(parser):
    g = parser.add_argument_group("episodic evaluation (protocol.md 3.2, 4)")
    g.add_argument("--episodes", type=POSITIVE, default=1000, help="episodes per seed (BAM/HSNet, protocol.md 4.1); "
                   "default %(default)s; use >= 10000 on COCO (protocol.md 7.8)")
    g.add_argument("--seeds", type=int, nargs="+", default=[510, 365, 382, 322, 988],
                   help="one evaluation per seed, reported as mean +- std (BAM test.py's seeds); default %(default)s")
    g.add_argument("--json", help="write the results to this file")
    g.add_argument("--label", help="row name in --table (default: the pre-training: imagenet, none, standard, bcpt K=6...)")
    g.add_argument("--table", nargs="+", metavar="JSON", help="only print a paper-style table from these result files")
    return parser


def pretrain_label(weights):
    """Table row name of a backbone source: imagenet, none, or pretrain_bcpt.py's method and variant."""
    if weights in (None, "none", "imagenet"):
        return weights or "none"
    a = load_checkpoint(weights).get("args", {})
    if "method" not in a:
        return os.path.basename(weights)
    if a["method"] != "bcpt":
        return a["method"]
    alpha = a.get("alpha", 0.1)
    return ("bcpt" + (" no-guidance" if a.get("no_guidance") else "") + f" K={a['K']}"
            + (f" alpha={alpha:g}" if alpha != 0.1 else ""))  # the paper's alpha 0.1 goes unnamed


def run_episodes(args, data, seed, predict, decide):
    """One seed: args.episodes fixed val episodes of the novel classes (batch 1, test geometry, scored at
    the original label size, protocol.md 3.2). predict(item) -> scores (1, C, s, s) on the test canvas;
    decide(scores (1, C, L, L)) -> {name: prediction (L, L) in {0, 1}}. -> ({name: FewShotIoU}, seconds)."""
    ids, counts = data["val"]
    ds = EpisodeDataset(args.data_root, ids, counts, args.dataset, args.novel, args.shot, args.min_pixels, seed,
                        test_size=args.test_size, episodes=args.episodes)
    loader = torch.utils.data.DataLoader(ds, batch_size=1, shuffle=False, num_workers=args.workers)
    meters, t_model, t0 = {}, 0.0, time.perf_counter()
    sync = torch.cuda.synchronize if torch.device(args.device).type == "cuda" else (lambda: None)
    for item in loader:
        t1 = time.perf_counter()
        scores = predict(item)
        sync()
        t_model += time.perf_counter() - t1
        scores, target = logits_at_label_size(scores.float().cpu(), item["raw_label"][0])
        for name, pred in decide(scores).items():
            meters.setdefault(name, FewShotIoU(args.novel)).update(pred, target, int(item["cls"]))
    return meters, {"total": time.perf_counter() - t0, "model": t_model}


def summarize(meters, seeds):
    """Mean +- sample std (ddof 1; 0 for one seed) over seeds of mIoU and FB-IoU; per-class IoU averaged."""
    per_seed = [{"seed": s, "miou": m.miou(), "fb_iou": m.fb_iou(), "class_iou": m.class_iou()} for s, m in zip(seeds, meters)]
    std = lambda key: float(np.std([r[key] for r in per_seed], ddof=1)) if len(per_seed) > 1 else 0.0
    classes = per_seed[0]["class_iou"]
    return {"miou": float(np.mean([r["miou"] for r in per_seed])), "miou_std": std("miou"),
            "fb_iou": float(np.mean([r["fb_iou"] for r in per_seed])), "fb_iou_std": std("fb_iou"),
            "class_iou": {c: float(np.mean([r["class_iou"][c] for r in per_seed])) for c in classes},
            "per_seed": per_seed}


def evaluate_seeds(args, data, predict, decide):
    """run_episodes for every seed in args.seeds; prints each seed, the speed and the mean +- std.
    -> {name: summary} (see summarize)."""
    if args.dataset == "coco" and args.episodes < 10000:
        print(f"warning: {args.episodes} COCO episodes move mIoU by 2-3 points between seeds; "
              "use --episodes 10000 to compare methods (protocol.md 7.8)")
    runs, total, model = [], 0.0, 0.0
    for seed in args.seeds:
        meters, t = run_episodes(args, data, seed, predict, decide)
        runs.append(meters)
        total, model = total + t["total"], model + t["model"]
        print(f"seed {seed}: " + "; ".join(f"{k} mIoU {m.miou():.2f} FB-IoU {m.fb_iou():.2f}" for k, m in meters.items()))
    print(f"speed: {len(args.seeds) * args.episodes / total:.1f} episodes/s, {100 * model / total:.0f}% of the time in the model")
    out = {name: summarize([r[name] for r in runs], args.seeds) for name in runs[0]}
    for name, r in out.items():
        print(f"{name}: mIoU {r['miou']:.2f} +- {r['miou_std']:.2f}, FB-IoU {r['fb_iou']:.2f} +- {r['fb_iou_std']:.2f} "
              f"over {len(args.seeds)} seeds; class IoU " + " ".join(f"{c}:{v:.1f}" for c, v in r["class_iou"].items()))
    return out


def write_results(path, summary, args, **fields):
    """The results JSON of evaluate.py / nonparametric_eval.py (schema: issue 4, plus `fields`)."""
    protocol = {"split": "val, novel classes", "query_order": "val list in order, wrapping", "batch": 1,
                "test_size": args.test_size, "scoring": "logits resized to max(H, W) of the original label (ori_resize)",
                "ignore": IGNORE, "min_pixels": args.min_pixels, "train_pool": args.train_pool,
                "coco_split": args.coco_split, "std": "sample std over seeds"}
    out = {**summary, "episodes": args.episodes, "seeds": args.seeds, "shot": args.shot, "fold": args.fold,
           "dataset": args.dataset, "backbone": args.backbone, "protocol": protocol, **fields}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {path}")


def format_table(paths):
    """Paper Table 1 / 2 layout: one row per (dataset, backbone, method, pre-training) over the files,
    folds 0-3 and mean per shot; several files in one cell (e.g. training seeds) print as mean+-std."""
    cells, shots = {}, set()
    for p in paths:
        with open(p) as f:
            r = json.load(f)
        row = (r["dataset"], r["backbone"], r.get("method", "?"), r["pretrained"])
        cells.setdefault(row, {}).setdefault((r["shot"], r["fold"]), []).append(r["miou"])
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
            vals += [cell(v) for v in folds] + [(f"{np.mean(means):.2f}" + ("*" if len(means) < 4 else "")) if means else "-"]
        lines.append("| " + " | ".join(list(row) + vals) + " |")
    return "\n".join(lines + ["mIoU in %; * = mean over the folds present only."])


# ============ 9. Plumbing: flags, seeds, checkpoints, progress ============
DATASET_DEFAULTS = {  # shared defaults per dataset; stages add their own (crop, epochs, lr, ...)
    "pascal": dict(backbone="resnet50", weights="imagenet", test_size=473, min_pixels=2048),
    "coco": dict(backbone="resnet50", weights="imagenet", test_size=641, min_pixels=2048),
    "synthetic": dict(backbone="resnet18", weights="none", test_size=96, min_pixels=128, data_root="data/synthetic"),
}


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
            want = (f"in [{lo}, {hi}]" if hi is not None else f"> {lo}" if open_lo else f">= {lo}")
            raise argparse.ArgumentTypeError(f"value {text} is not allowed: it must be {want}")
        return v
    check.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return check


POSITIVE, NON_NEGATIVE, SIZE = bounded(int, 1), bounded(int, 0), bounded(int, 16)  # SIZE: image sides
UNIT = bounded(float, 0.0, 1.0)


def add_common_args(parser):
    """The flags every stage shares. A default of None is filled per dataset by finish_args."""
    g = parser.add_argument_group("shared by every stage")
    g.add_argument("--dataset", default="synthetic", choices=list(N_CLASSES), help="default %(default)s")
    g.add_argument("--data-root", help="VOC-layout root (synthetic: data/synthetic, generated on first use)")
    g.add_argument("--fold", type=int, default=0, choices=[0, 1, 2, 3], help="i of PASCAL-5i / COCO-20i")
    g.add_argument("--backbone", choices=["resnet50", "vgg16", "resnet18"],
                   help="paper: resnet50, vgg16; resnet18 for CPU runs (synthetic default)")
    g.add_argument("--weights", "--pretrained", dest="weights",
                   help="backbone init: imagenet, none, a state-dict file or pretrain_bcpt.py's last.pt "
                        "(default imagenet on real data, none on synthetic)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=321, help="PFENet/BAM seed; default %(default)s")
    g.add_argument("--workers", type=NON_NEGATIVE, default=2, help="DataLoader workers; results do not depend on it")
    g.add_argument("--out", help="run folder (default runs/<stage>-<dataset>-fold<F>)")
    g.add_argument("--crop", type=SIZE, help="training crop side (protocol.md 3.1)")
    g.add_argument("--test-size", type=SIZE, help="test canvas side (protocol.md 3.2): 473 PASCAL, 641 COCO")
    g.add_argument("--min-pixels", type=POSITIVE, help="pixel rule for support pools (protocol.md 1.4): 2048; 128 synthetic")
    g.add_argument("--train-pool", default="aug", choices=["aug", "oslsm"],
                   help="aug: every mask not in val.txt; oslsm: train.txt + train_noval.txt (PFENet/BAM's 5953)")
    g.add_argument("--coco-split", default="interleaved", choices=["interleaved", "contiguous"],
                   help="COCO-20i fold split; interleaved is PFENet/BAM/HSNet's")
    return parser


def finish_args(args, stage, stage_defaults):
    """Fill None flags from stage_defaults[dataset] then DATASET_DEFAULTS[dataset]; resolve device."""
    for table in (stage_defaults.get(args.dataset, {}), DATASET_DEFAULTS[args.dataset]):
        for k, v in table.items():
            if getattr(args, k, None) is None:
                setattr(args, k, v)
    if args.data_root is None:
        raise KitError(f"--data-root is required for --dataset {args.dataset} ({LAYOUT_FIX})")
    if args.out is None:
        args.out = os.path.join("runs", f"{stage}-{args.dataset}-fold{args.fold}")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.novel, args.base = (novel_classes(args.dataset, args.fold, args.coco_split),
                             base_classes(args.dataset, args.fold, args.coco_split))
    return args


def open_data(args):
    """Pools and per-class pixel counts of both splits; generates the synthetic world on first use."""
    if args.dataset == "synthetic" and _synthetic_params(args.data_root) is None:
        make_synthetic(args.data_root)  # an existing world (of any size) is used as it is
    train_ids, val_ids = image_pools(args.data_root, args.train_pool)
    n = N_CLASSES[args.dataset]
    data = {"train": (train_ids, class_pixel_counts(args.data_root, train_ids, n, args.workers)),
            "val": (val_ids, class_pixel_counts(args.data_root, val_ids, n, args.workers))}
    print(f"data: {args.data_root} train pool {len(train_ids)} images ({args.train_pool}), val {len(val_ids)}; "
          f"fold {args.fold} novel {args.novel}")
    return data


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


@contextlib.contextmanager
def run_folder(out):
    """One run per folder: hold an exclusive lock on OUT/.lock (holding our process id) while the run lasts.
    A second run on the same folder stops at once; a lock left by a killed run is taken over with a note
    (the kernel releases a dead process's lock), and that run's leftover temp files are removed."""
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
            raise KitError(f"checkpoint {path} was made with --{key.replace('_', '-')} {saved[key]} "
                           f"but this run has --{key.replace('_', '-')} {want}: pass the matching checkpoint or flag")
    return ckpt


def resume_from(path, expect):
    """--resume: the checkpoint at `path` checked against `expect`, or None (a fresh start, said so) if
    there is none yet, so one command both starts and continues a run."""
    if not os.path.isfile(path):
        print(f"--resume: no {path} yet, starting from iteration 0")
        return None
    return load_checkpoint(path, expect)


class Progress:
    """One line per interval with rate and ETA; every line also appended to <out>/log.jsonl."""

    def __init__(self, total, start=0, every=10, out=None, unit="it"):
        self.total, self.start, self.every, self.unit = total, start, every, unit
        self.t0, self.log = time.time(), (os.path.join(out, "log.jsonl") if out else None)

    def step(self, t, force=False, **metrics):
        """Call after finishing step t (1-based count of done steps)."""
        if not (force or t % self.every == 0 or t == self.total):
            return
        rate = (t - self.start) / max(time.time() - self.t0, 1e-9)
        eta = (self.total - t) / max(rate, 1e-9)
        text = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        print(f"[{t}/{self.total}] {text} | {rate:.2f} {self.unit}/s ETA {time.strftime('%H:%M:%S', time.gmtime(eta))}",
              flush=True)
        if self.log:
            with open(self.log, "a") as f:
                f.write(json.dumps({"step": t, **{k: v for k, v in metrics.items()}, "rate": rate}) + "\n")


def run(main):
    """Entry point of every script: a KitError (also one raised in a DataLoader worker) becomes one
    line on stderr and exit code 2, not a traceback wall."""
    try:
        main(sys.argv[1:])
    except KitError as e:
        msg = str(e).strip().splitlines()[-1].replace("common.KitError: ", "")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


# ============ 10. The synthetic benchmark: a seeded world in the VOC layout ============
# Base RGB colours; each is shared by 2-3 classes, so colour alone never identifies a class.
COLOURS = dict(red=(200, 40, 40), green=(50, 165, 60), blue=(45, 75, 205), yellow=(225, 200, 45),
               purple=(140, 55, 175), orange=(235, 130, 35), cyan=(45, 190, 200), white=(225, 225, 220))
# Class k+1 is "colour_shape_texture": every shape is used twice, colours and textures repeat.
SYNTHETIC_CLASS_NAMES = """red_circle_solid blue_circle_striped green_square_checker yellow_square_dots
blue_triangle_solid orange_triangle_checker purple_ellipse_striped red_ellipse_dots yellow_star_solid
cyan_star_striped white_cross_checker green_cross_solid orange_ring_dots purple_ring_solid
cyan_diamond_checker red_diamond_striped blue_hexagon_dots yellow_hexagon_checker
green_crescent_striped white_crescent_dots""".split()
CLASSES = [name.split("_") for name in SYNTHETIC_CLASS_NAMES]  # (colour, shape, texture)


def _ngon(n, r=1.0, phase=np.pi / 2):
    """Regular n-gon (n x 2 array) of radius r; many sides approximate a circle."""
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), -r * np.sin(a)], 1)


_CIRC = _ngon(48)
_BAR = np.array([(-1, -.33), (1, -.33), (1, .33), (-1, .33)])  # a cross is two crossing bars
# Unit-frame polygons per shape: (filled polygons, holes cut out afterwards).
_SHAPES = {"circle": ([_CIRC], []), "ellipse": ([_CIRC * [1, .55]], []),
           "square": ([_ngon(4, 1.2, np.pi / 4)], []), "triangle": ([_ngon(3, 1.25)], []),
           "diamond": ([_ngon(4) * [.65, 1.1]], []), "hexagon": ([_ngon(6)], []),
           "star": ([_ngon(10, 1.15) * np.tile([[1.0], [.42]], (5, 1))], []),
           "cross": ([_BAR, _BAR[:, ::-1]], []),
           "ring": ([_CIRC], [_CIRC * .55]), "crescent": ([_CIRC - [.2, 0]], [_CIRC * .85 + [.25, -.15]])}


def _shape_mask(shape, size, cx, cy, r, angle, aspect):
    """Boolean size x size mask of a shape with given centre, radius, rotation and aspect jitter."""
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    m = np.zeros((size, size), np.uint8)
    for polys, val in zip(_SHAPES[shape], (1, 0)):
        for p in polys:  # aspect scaling keeps the area; fixed-point coords give sub-pixel accuracy
            q = (p * [aspect, 1 / aspect]) @ rot.T * r + [cx, cy]
            cv2.fillPoly(m, [np.round(q * 16).astype(np.int32)], val, cv2.LINE_8, 4)
    return m.astype(bool)


# Area of each shape at unit radius, used to draw objects with a target pixel area.
_UNIT_AREA = {s: float(_shape_mask(s, 400, 200, 200, 100, 0, 1).sum()) / 1e4 for s in _SHAPES}


@functools.lru_cache(maxsize=4)
def _grid(size):
    """Float32 pixel coordinate grids (y, x)."""
    return np.mgrid[:size, :size].astype(np.float32)


def _hsv2rgb(h, s, v):
    """OpenCV-range HSV (h in 0..180) to a float32 RGB triple."""
    return cv2.cvtColor(np.uint8([[np.clip([h, s, v], 0, 255)]]), cv2.COLOR_HSV2RGB)[0, 0].astype(np.float32)


def _object_texture(rng, cls, size, cx, cy, r, angle):
    """Float RGB image of a class texture laid out in the object's own rotated, scaled frame."""
    colour, _, tex = CLASSES[cls]
    # per-instance colour jitter: hue shift, saturation and brightness scale
    hue, sat, val = cv2.cvtColor(np.uint8([[COLOURS[colour]]]), cv2.COLOR_RGB2HSV)[0, 0].astype(float)
    base = _hsv2rgb((hue + rng.uniform(-6, 6)) % 180, sat * rng.uniform(.8, 1.1), val * rng.uniform(.75, 1.1))
    y, x = _grid(size)
    c, s = math.cos(angle) / r / .45, math.sin(angle) / r / .45  # python floats keep float32
    u, v = (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s  # object frame, in pattern periods
    on = {"striped": lambda: u % 1 < .5, "checker": lambda: (np.floor(u) + np.floor(v)) % 2 == 0,
          "dots": lambda: (u % 1 - .5) ** 2 + (v % 1 - .5) ** 2 > .09, "solid": lambda: True}[tex]()
    d, grain = rng.uniform(0, 2 * math.pi), .05 if tex == "solid" else .02
    grain = grain * rng.standard_normal((size, size), np.float32)
    shade = 1 + .08 * (u * math.cos(d) + v * math.sin(d)) + grain  # directional light, like a 3-D object
    return np.where(on, shade, .35 * shade)[..., None] * base


def _bg_texture(rng, size):
    """One background 'stuff' texture: gradient, low/fine noise, grass streaks or bricks."""
    hue, sat, val = rng.uniform(0, 180), rng.uniform(15, 150), rng.uniform(50, 220)  # overlaps objects
    c1 = _hsv2rgb(hue, sat, val)
    c2 = _hsv2rgb((hue + rng.uniform(-15, 15)) % 180, sat + rng.uniform(-40, 40), val + rng.uniform(-90, 90))
    (y, x), kind, low = _grid(size), rng.integers(5), lambda k: rng.random(k, np.float32)
    if kind == 0:  # smooth gradient
        a = rng.uniform(0, 2 * math.pi)
        t = (x * math.cos(a) + y * math.sin(a)) / size / 1.5 + .5
    elif kind == 1:  # low-frequency noise
        t = cv2.resize(low((4, 4)), (size, size), interpolation=cv2.INTER_CUBIC)
    elif kind == 2:  # fine noise over a soft ramp
        t = .6 * low((size, size)) + .4 * cv2.resize(low((3, 3)), (size, size))
    elif kind == 3:  # grass-like vertical streaks
        t = cv2.resize(low((size // 8, size)), (size, size)) * .8 + .2 * low((size, size))
    else:  # bricks: staggered rows with dark mortar lines
        bh = int(rng.integers(6, 12))  # brick height; bricks are 2 * bh wide
        row, xs = y // bh, x + (y // bh % 2) * bh
        shade = .6 + .4 * np.sin(row * 7.3 + xs // (2 * bh) * 3.1) ** 2  # pseudo-random per brick
        t = np.where((y % bh < 1.5) | (xs % (2 * bh) < 1.5), 0, shade)
    return c1 + (c2 - c1) * np.clip(t, 0, 1)[..., None]


def _background(rng, size):
    """Background of 2-3 regions (wavy tilted horizon plus optional blob), each its own texture."""
    y, x = _grid(size)
    horizon = (size * rng.uniform(.25, .75) + (x - size / 2) * rng.uniform(-.5, .5)
               + rng.uniform(1, 5) * np.sin(x / rng.uniform(4, 12) + rng.uniform(0, 6)))
    region = (y > horizon).astype(np.int32)
    if rng.random() < .5:  # blob: thresholded low-frequency noise
        blob = cv2.resize(rng.random((3, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
        region[blob > np.quantile(blob, rng.uniform(.6, .85))] = 2
    img = np.zeros((size, size, 3), np.float32)
    for k in np.unique(region):
        img[region == k] = _bg_texture(rng, size)[region == k]
    return img


def _render(rng, size):
    """Render one image with 1-4 objects; returns (uint8 RGB image, uint8 VOC label map)."""
    img, inst = _background(rng, size), np.zeros((size, size), np.int32)
    classes = rng.integers(0, 20, rng.choice([1, 2, 3, 4], p=[.3, .3, .25, .15]))
    for k, c in enumerate(classes, 1):  # later objects occlude earlier ones
        shape = CLASSES[c][1]
        area = rng.uniform(.08, .3) if rng.random() < .8 else rng.uniform(.02, .08)
        r = math.sqrt(area * size * size / _UNIT_AREA[shape])
        cx, cy = rng.uniform(.6 * r, size - .6 * r), rng.uniform(.6 * r, size - .6 * r)  # may touch border
        angle, aspect = rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-.25, .25))
        m = _shape_mask(shape, size, cx, cy, r, angle, aspect)
        img[m], inst[m] = _object_texture(rng, c, size, cx, cy, r, angle)[m], k
    lab = np.concatenate([[0], classes + 1]).astype(np.uint8)[inst]  # instance id -> class label
    kernel = np.ones((3, 3), np.uint8)
    for k in np.unique(inst[inst > 0]):  # VOC-style void band along each visible object outline
        mk = (inst == k).astype(np.uint8)
        lab[cv2.dilate(mk, kernel) > cv2.erode(mk, kernel)] = 255
    img = cv2.GaussianBlur(img, (0, 0), .6) + 3 * rng.standard_normal(img.shape, np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), lab


SYNTHETIC_MARKER = ".complete"  # written into a finished synthetic world: its generation parameters (JSON)
PREPARED_MARKER = ".prepared.json"  # written by prepare-pascal / prepare-coco into their --out


def _synthetic_params(root):
    """The generation parameters recorded in the world's marker, or None if root is not a finished world."""
    try:
        with open(os.path.join(root, SYNTHETIC_MARKER)) as f:
            params = json.load(f)
        return params if isinstance(params, dict) and {"n_train", "n_val", "size", "seed"} <= set(params) else None
    except (OSError, ValueError):
        return None


def _prepared_kind(root):
    """'pascal' / 'coco' if root carries prepare-pascal's / prepare-coco's marker, else None."""
    try:
        with open(os.path.join(root, PREPARED_MARKER)) as f:
            return json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None


def claim_root(root, flag, kind):
    """The kit writes a data root only if it does not exist, is empty, or carries the kit's own marker of
    the same kind ('synthetic', 'pascal' or 'coco'); anything else is refused and left untouched."""
    if not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root)):
        return
    if kind == "synthetic" and _synthetic_params(root) is not None:
        return
    if kind != "synthetic" and _prepared_kind(root) == kind:
        return
    names = set(os.listdir(root)) if os.path.isdir(root) else set()
    made = _prepared_kind(root) or ("synthetic" if _synthetic_params(root) else None)
    if made:
        hint = f"it holds a {made} root made by this kit: did you mean --dataset {made}?"
    elif {IMAGES, MASKS} & names:
        hint = "it looks like a prepared VOC/COCO root: did you mean --dataset pascal or --dataset coco?"
    else:
        hint = "point it at a new or empty folder"
    raise KitError(f"{flag} {root} is not empty and was not made by this kit for {kind} data, so nothing "
                   f"is written there: {hint}")


def make_synthetic(root, n_train=2000, n_val=500, size=96, seed=0, flag="--data-root"):
    """Write the synthetic benchmark to `root` in VOC layout; return root. Idempotent: if root holds a
    world with the same parameters, return at once. Only a missing or empty folder, or a synthetic world
    this kit made, is (re)written (claim_root). The world is written to a private temporary folder and
    published with one rename, so runs started side by side never read a half-written world."""
    params = dict(n_train=n_train, n_val=n_val, size=size, seed=seed)
    if _synthetic_params(root) == params:
        return root
    claim_root(root, flag, "synthetic")
    parent, name = os.path.split(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    t0 = time.time()
    print(f"synthetic: writing {n_train} + {n_val} images of {size} px to {root} ...", flush=True)
    try:
        dirs = [os.path.join(tmp, d) for d in (IMAGES, MASKS, LISTS)]
        for d in dirs:
            os.makedirs(d)
        for split_idx, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            for i in range(n):
                img, lab = _render(np.random.default_rng([seed, split_idx, i]), size)
                stem = f"{split}_{i:06d}"
                cv2.imwrite(os.path.join(dirs[0], stem + ".jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                            [cv2.IMWRITE_JPEG_QUALITY, 95])
                cv2.imwrite(os.path.join(dirs[1], stem + ".png"), lab)
        with open(os.path.join(dirs[2], "val.txt"), "w") as f:
            f.writelines(f"val_{i:06d}\n" for i in range(n_val))
        with open(os.path.join(tmp, SYNTHETIC_MARKER), "w") as f:
            json.dump(params, f)
        _publish_world(tmp, root, params, flag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"synthetic: done in {time.time() - t0:.0f}s", flush=True)
    return root


def _publish_world(tmp, root, params, flag):
    """Move the finished world `tmp` to `root`, replacing an empty folder or a differently-made world of
    this kit there (checked again now: the folder may have changed during generation). If another process
    published the same world first, keep theirs."""
    if _synthetic_params(root) == params:
        return
    claim_root(root, flag, "synthetic")
    try:  # move the old (empty or differently-made) world out of the way, then delete it
        old = tmp + "-old"
        os.rename(root, old)
        shutil.rmtree(old, ignore_errors=True)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if _synthetic_params(root) != params:
            raise


# ============ 11. Data preparation from the official downloads (python common.py prepare-...) ============
EXPECTED_PASCAL = {'val': 1449, 'oslsm': 5953, 'trainaug': 10582}
EXPECTED_COCO = {'train': 82081, 'val': 40137}


def _write_png_atomic(path, array):
    """Write a 2-D uint8 array as a single-channel PNG via a temp file and os.replace."""
    tmp = '%s.tmp%d.png' % (path, os.getpid())
    if not cv2.imwrite(tmp, np.ascontiguousarray(array, dtype=np.uint8)):
        raise KitError('could not write %s' % tmp)
    os.replace(tmp, path)


def _link_or_copy(src, dst):
    """Symlink dst -> abspath(src); copy when symlinks fail. Leaves a correct existing link/copy."""
    src = os.path.abspath(src)
    if os.path.islink(dst):
        if os.readlink(dst) == src:
            return
        os.remove(dst)
    elif os.path.exists(dst):
        return
    try:
        os.symlink(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _write_list(path, ids):
    """Write sorted unique ids, one per line."""
    with open(path, 'w') as f:
        f.writelines(i + '\n' for i in sorted(set(ids)))



def _need(path, what):
    """KitError naming a missing input path and what it should contain."""
    if not os.path.exists(path):
        raise KitError('%s at %s' % (what, path))
    return path


def _dirs(out, kind):
    """Claim `out` for prepared `kind` data (claim_root: new, empty or made by this command before), mark
    it as such, then create and return the three output folders."""
    claim_root(out, "--out", kind)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, PREPARED_MARKER), "w") as f:
        json.dump({"dataset": kind, "made_by": f"prepare-{kind}"}, f)
    d = {k: os.path.join(out, k) for k in ('JPEGImages', 'SegmentationClassAug', 'ImageSets/Segmentation')}
    for p in d.values():
        os.makedirs(p, exist_ok=True)
    return d


def _report(name, counts, expected):
    """Print counts and a warning for each that differs from the real-data count."""
    print('%s: %s' % (name, ' '.join('%s=%d' % kv for kv in counts.items())))
    for k, v in expected.items():
        if counts[k] != v:
            print('WARNING: %s %s count %d differs from the real-data count %d' % (name, k, counts[k], v))


def _read_index_png(path):
    """Class indices of a palette (P) or single-channel (L) PNG: palette indices, never luminance."""
    img = Image.open(path)
    if img.mode not in ('P', 'L'):
        raise KitError('%s: mode %s, expected a palette (P) or index (L) PNG' % (path, img.mode))
    return np.array(img)


def _read_sbd_mat(path):
    """GTcls.Segmentation (HxW uint8) of an SBD cls/<id>.mat file."""
    try:
        import scipy.io
    except ImportError:
        raise KitError('prepare-pascal reads SBD .mat files with scipy: pip install scipy, '
                         'or pass --aug DIR with ready PNG masks')
    gt = scipy.io.loadmat(path, struct_as_record=False)['GTcls'].flat[0]
    return np.asarray(gt.Segmentation)


def _check_mask(m, path):
    """KitError naming the file unless m is 2-D with values in 0..20 or 255."""
    bad = np.setdiff1d(np.unique(m), np.r_[0:21, 255])
    if m.ndim != 2 or bad.size:
        raise KitError('%s: invalid mask values %s (allowed 0..20, 255)' % (path, bad.tolist()))


def _pascal_inputs(voc, sbd, aug):
    """Check the inputs; return (VOC train ids, VOC val ids, VOC mask ids, SBD train+val ids)."""
    V, S = '--voc VOCdevkit/VOC2012: no ', '--sbd benchmark_RELEASE/dataset: no '
    for sub in ('JPEGImages', 'SegmentationClass'):
        _need(os.path.join(voc, sub), V + sub + '/ folder')
    sets = os.path.join(voc, 'ImageSets', 'Segmentation')
    train, val = (read_list(_need(os.path.join(sets, s), V + 'segmentation id list'))
                  for s in ('train.txt', 'val.txt'))
    voc_ids = {f[:-4] for f in os.listdir(os.path.join(voc, 'SegmentationClass')) if f.endswith('.png')}
    missing = sorted((set(train) | set(val)) - voc_ids)
    if missing:
        raise KitError('--voc VOCdevkit/VOC2012: no SegmentationClass/%s.png (%d listed ids lack a mask)'
                         % (missing[0], len(missing)))
    if sbd is None and aug is None:
        raise KitError('prepare-pascal needs --sbd benchmark_RELEASE/dataset or --aug DIR')
    sbd_ids = []
    if sbd is not None:
        sbd_ids = [i for s in ('train.txt', 'val.txt')
                   for i in read_list(_need(os.path.join(sbd, s), S + 'id list'))]
        if aug is None:
            _need(os.path.join(sbd, 'cls'), S + 'cls/ folder of <id>.mat masks')
    if aug is not None:
        _need(aug, '--aug: no folder of single-channel index PNG masks')
    return train, set(val), voc_ids, sbd_ids


def _pascal_mask(i, voc, sbd, aug, voc_ids):
    """(mask, source path) for one id: VOC's own PNG wins, else the aug PNG, else SBD cls/<id>.mat."""
    if i in voc_ids:
        p = os.path.join(voc, 'SegmentationClass', i + '.png')
        return _read_index_png(p), p
    if aug is not None:
        p = os.path.join(aug, i + '.png')
        return _read_index_png(_need(p, '--aug: no mask PNG')), p
    p = _need(os.path.join(sbd, 'cls', i + '.mat'), '--sbd: no cls/<id>.mat mask')
    return _read_sbd_mat(p), p


def prepare_pascal(voc, sbd, out, aug=None, train_noval=None):
    """PASCAL VOC2012 + SBD -> kit layout. Returns counts val/train/train_noval/oslsm/trainaug/masks.

    train_noval: optional path of SBD's separately published train_noval.txt (5623 ids); default
    sbd/train_noval.txt if present, else computed as SBD train+val (or aug ids) minus VOC val, which is
    much larger than the published list (a warning is printed)."""
    voc_train, voc_val, voc_ids, sbd_ids = _pascal_inputs(voc, sbd, aug)
    extra = [f[:-4] for f in os.listdir(aug) if f.endswith('.png')] if aug is not None else sbd_ids
    noval_file = train_noval or (sbd and os.path.join(sbd, 'train_noval.txt'))
    if noval_file and os.path.exists(noval_file):
        noval = set(read_list(noval_file)) - voc_val
    else:
        noval = set(sbd_ids or extra) - voc_val
        print('WARNING: no SBD train_noval.txt; using SBD ids minus VOC val (%d ids; the published list has 5623)'
              % len(noval))
    d = _dirs(out, 'pascal')
    all_ids, t0 = sorted(voc_ids | set(extra)), time.time()
    for k, i in enumerate(all_ids):
        if k and k % 2000 == 0:
            print('pascal: %d / %d masks (%.0f/s)' % (k, len(all_ids), k / (time.time() - t0)), flush=True)
        m, p = _pascal_mask(i, voc, sbd, aug, voc_ids)
        _check_mask(m, p)
        src = os.path.join(voc, 'JPEGImages', i + '.jpg')
        if not os.path.exists(src) and sbd is not None:
            src = os.path.join(sbd, 'img', i + '.jpg')
        _link_or_copy(_need(src, 'no JPEG for %s (VOC JPEGImages/ or SBD img/)' % i),
                      os.path.join(d['JPEGImages'], i + '.jpg'))
        _write_png_atomic(os.path.join(d['SegmentationClassAug'], i + '.png'), m)
    lists = {'val': voc_val, 'train': voc_train, 'train_noval': noval, 'trainaug': set(all_ids) - voc_val}
    for k, v in lists.items():
        _write_list(os.path.join(d['ImageSets/Segmentation'], k + '.txt'), v)
    counts = {k: len(set(v)) for k, v in lists.items()}
    counts.update(oslsm=len(set(voc_train) | noval), masks=len(all_ids))
    _report('pascal', counts, EXPECTED_PASCAL)
    return counts


def _coco_mask(coco, img, ann_list, cat_rank):
    """Class map: instances largest-area first, then crowd as 255 over background only."""
    m = np.zeros((img['height'], img['width']), np.uint8)
    normal = sorted((a for a in ann_list if not a.get('iscrowd', 0)), key=lambda a: (-a['area'], a['id']))
    for a in normal:
        m[coco.annToMask(a) > 0] = cat_rank[a['category_id']]
    for a in (a for a in ann_list if a.get('iscrowd', 0)):
        m[(coco.annToMask(a) > 0) & (m == 0)] = 255
    return m


def prepare_coco(coco, out):
    """COCO2014 instances -> kit layout (one PNG per annotated image). Returns counts train/val."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise KitError('prepare-coco needs pycocotools: pip install pycocotools')
    splits = {s: (_need(os.path.join(coco, 'annotations', 'instances_%s2014.json' % s),
                        '--coco: no COCO2014 instance annotation file'),
                  _need(os.path.join(coco, '%s2014' % s), '--coco: no %s2014/ image folder' % s))
              for s in ('train', 'val')}
    d, counts = _dirs(out, 'coco'), {}
    for split, (ann_file, img_dir) in splits.items():
        api = COCO(ann_file)
        cat_rank = {c: r + 1 for r, c in enumerate(sorted(api.getCatIds()))}
        ids, t0 = [], time.time()
        for img_id in sorted(api.getImgIds()):
            anns = api.imgToAnns.get(img_id, [])
            if not anns:
                continue
            img = api.imgs[img_id]
            stem = os.path.splitext(img['file_name'])[0]
            _link_or_copy(_need(os.path.join(img_dir, img['file_name']), '--coco: no image file'),
                          os.path.join(d['JPEGImages'], stem + '.jpg'))
            _write_png_atomic(os.path.join(d['SegmentationClassAug'], stem + '.png'),
                              _coco_mask(api, img, anns, cat_rank))
            ids.append(stem)
            if len(ids) % 5000 == 0:
                rate = len(ids) / (time.time() - t0)
                print('coco %s: %d images (%.1f/s)' % (split, len(ids), rate), flush=True)
        _write_list(os.path.join(d['ImageSets/Segmentation'], split + '.txt'), ids)
        counts[split] = len(ids)
    _report('coco', counts, EXPECTED_COCO)
    return counts


# ============ 12. Checks and the command line (python common.py ...) ============
EXPECTED_FOLDS = {  # BAM's released fss lists (protocol.md 1.4), PASCAL-5i, 5953-image pool, 2048-pixel rule
    ("pascal", "oslsm"): {"train": [4208, 3726, 2752, 4510], "val": [364, 445, 592, 336]}}


def bad_files(root, ids, n_classes, workers=4):
    """Decode every image in full and read every mask; one line per bad file (all of them, not the first)."""
    def problems(i):
        try:
            label = read_mask(root, i, n_classes)
            check_image_file(root, i, label.shape)
        except KitError as e:
            return str(e)
        path = os.path.join(root, IMAGES, i + ".jpg")
        return None if decodes_fully(path) else f"image {path} does not decode fully (truncated or corrupt)"
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [p for p in pool.map(problems, ids) if p]


def verify(dataset, root, min_pixels, train_pool="aug", coco_split="interleaved", workers=2):
    """Per fold: images of the training list (BAM: novel-containing dropped; PFENet: kept) and of the val list,
    and per class the support pool sizes after the pixel rule (protocol.md 1.4 / 2.3). Returns the numbers."""
    train_ids, val_ids = image_pools(root, train_pool)
    n = N_CLASSES[dataset]
    bad = bad_files(root, train_ids + val_ids, n, workers)
    if bad:
        print(f"{len(bad)} bad files:\n" + "\n".join("  " + b for b in bad))
        raise KitError(f"verify: {len(bad)} of the {len(train_ids) + len(val_ids)} images or masks under {root} "
                       "are bad (listed above): restore them or drop their ids from the lists")
    ct, cv = class_pixel_counts(root, train_ids, n, workers), class_pixel_counts(root, val_ids, n, workers)
    expected = EXPECTED_FOLDS.get((dataset, train_pool), {})
    print(f"{dataset} at {root}: train pool {len(train_ids)} images ({train_pool}), val {len(val_ids)}; "
          f"pixel rule >= {min_pixels}")
    out = []
    for fold in range(4):
        novel, base = novel_classes(dataset, fold, coco_split), base_classes(dataset, fold, coco_split)
        no_novel = ct[:, novel].sum(1) == 0  # BAM drops an image with any pixel of a novel class
        has_base, has_novel = (ct[:, base] >= min_pixels).any(1), (cv[:, novel] >= min_pixels).any(1)
        r = {"fold": fold, "train_bam": int((has_base & no_novel).sum()), "train_pfenet": int(has_base.sum()),
             "val": int(has_novel.sum()),
             "train_pools": {c: int(((ct[:, c] >= min_pixels) & no_novel).sum()) for c in base},
             "val_pools": {c: int((cv[:, c] >= min_pixels).sum()) for c in novel}}
        want = lambda key: f" (BAM's lists: {expected[key][fold]})" if expected else ""
        print(f"fold {fold}: train {r['train_bam']} images without novel classes{want('train')}, "
              f"{r['train_pfenet']} keeping them; val {r['val']}{want('val')}")
        print("  val pools (novel): " + " ".join(f"{c}:{k}" for c, k in r["val_pools"].items()))
        print("  train pools (base, BAM): " + " ".join(f"{c}:{k}" for c, k in r["train_pools"].items()))
        out.append(r)
    return out


def main(argv=None):
    p = KitParser(description="BCPT kit data commands: build and check the data roots")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("make-synthetic", help="write the synthetic benchmark (VOC layout)")
    s.add_argument("--out", default=DATASET_DEFAULTS["synthetic"]["data_root"], help="default %(default)s")
    s.add_argument("--n-train", type=POSITIVE, default=2000)
    s.add_argument("--n-val", type=POSITIVE, default=500)
    s.add_argument("--size", type=SIZE, default=96, help="image side in pixels; default %(default)s")
    s.add_argument("--seed", type=int, default=0)
    s = sub.add_parser("prepare-pascal", help="PASCAL VOC2012 + SBD -> SegmentationClassAug and lists")
    s.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets)")
    s.add_argument("--sbd", help="SBD benchmark_RELEASE/dataset (cls/*.mat, img/, train.txt, val.txt); needs scipy")
    s.add_argument("--aug", help="an existing SegmentationClassAug folder, instead of --sbd")
    s.add_argument("--train-noval", help="SBD's published train_noval.txt (5623 ids), for the 5953-image pool")
    s.add_argument("--out", required=True)
    s = sub.add_parser("prepare-coco", help="COCO2014 instances -> one class-index PNG per image and lists")
    s.add_argument("--coco", required=True, help="folder with annotations/, train2014/, val2014/; needs pycocotools")
    s.add_argument("--out", required=True)
    s = sub.add_parser("verify", help="print per-fold, per-class image counts after the pixel rule")
    s.add_argument("--dataset", required=True, choices=sorted(N_CLASSES))
    s.add_argument("--data-root", required=True)
    s.add_argument("--min-pixels", type=POSITIVE, help="default: 2048 (128 synthetic)")
    s.add_argument("--train-pool", default="aug", choices=["aug", "oslsm"])
    s.add_argument("--coco-split", default="interleaved", choices=["interleaved", "contiguous"])
    s.add_argument("--workers", type=POSITIVE, default=4)
    a = p.parse_args(argv)
    if a.command == "make-synthetic":
        make_synthetic(a.out, a.n_train, a.n_val, a.size, a.seed, flag="--out")
        print(f"synthetic benchmark at {a.out}")
    elif a.command == "prepare-pascal":
        if not (a.sbd or a.aug):
            raise KitError("prepare-pascal needs --sbd benchmark_RELEASE/dataset or --aug SegmentationClassAug")
        prepare_pascal(a.voc, a.sbd, a.out, a.aug, a.train_noval)
    elif a.command == "prepare-coco":
        prepare_coco(a.coco, a.out)
    else:
        verify(a.dataset, a.data_root, a.min_pixels or DATASET_DEFAULTS[a.dataset]["min_pixels"], a.train_pool,
               a.coco_split, a.workers)


if __name__ == "__main__":
    run(main)
