"""own_images.py: few-shot segmentation of your own images, with nothing but a checkpoint.

Both tests take --support IMAGE MASK (once per shot) and --query IMAGE...: evaluate.py with a
meta-trained model, nonparametric_eval.py with a pre-trained backbone's prior. The images are read
as they come (JPEG, PNG, any size), a support mask in every common way of storing one
(read_user_mask), each query put in the benchmark's test geometry and normalisation, and its
prediction written at its original size with a picture beside it.
"""

import os
import sys
import tempfile
import threading

import cv2
import numpy as np
import torch
from PIL import Image

from common import (
    IGNORE,
    KitError,
    backbone_kind,
    load_checkpoint,
    logits_at_label_size,
    resize,
    split_state,
    test_transform,
)
from plumbing import autocast_call, is_main

# ============ 1. Reading your images and masks ============
_STDERR = threading.Lock()  # one decode at a time may borrow the process's stderr


def read_image(path, fix):
    """An image file decoded in full -> RGB float32 (H, W, 3) in 0..255, refusing what libjpeg only
    warns about: a JPEG damaged in the middle decodes "successfully" into garbage, saying 'Corrupt
    JPEG data' on stderr."""
    with _STDERR, tempfile.TemporaryFile() as said:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            img = cv2.imread(path, cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        said.seek(0)
        warning = said.read().decode(errors="replace").strip()
    if img is None or "JPEG" in warning:
        why = f" ({warning.splitlines()[-1]})" if "JPEG" in warning else ""
        raise KitError(
            f"cannot read image {path}{why}: missing, truncated, corrupt or not an image; {fix}"
        )
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)


def read_user_mask(path, image_path, shape):
    """A support mask read as its user means it -> (H, W) uint8: 1 foreground, 0 background, 255
    ignored. A palette (VOC) PNG: index 0 background, any other index foreground. A transparent PNG:
    the opaque part. Otherwise 0/1, 0/255, class indices, grey, RGB: a label image (lossless, a few
    values) is foreground wherever non-zero; a JPEG or one with many values (anti-aliased edges)
    above half its maximum. 255 beside other non-zero values is void."""
    try:
        with Image.open(path) as im:
            mode = im.mode
            lossy = im.format == "JPEG"
            m = np.array(im)
    except Exception as e:
        raise KitError(
            f"cannot read mask {path} ({type(e).__name__}): missing, corrupt or not an image"
        ) from None
    if m.ndim == 3 and mode in ("RGBA", "LA", "PA") and m[..., -1].min() < m[..., -1].max():
        m = m[..., -1]  # the alpha channel marks the object
    # (H, W): a colour mask's brightest channel
    m = m.reshape(m.shape[0], m.shape[1], -1)[..., :3].max(-1)
    labels = mode == "P" or (not lossy and len(np.unique(m)) <= 8)
    mask = ((m > 0) if labels else (m > m.max() / 2)).astype(np.uint8)
    if labels and m.max() == 255 and ((m > 0) & (m < 255)).any():
        mask[m == 255] = IGNORE
    if mask.shape != tuple(shape):
        raise KitError(
            f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
            f"{shape[1]}x{shape[0]}: pass the mask made for that image"
        )
    if not (mask == 1).any():
        raise KitError(f"mask {path} has no foreground pixel: mark the object with non-zero values")
    return mask


def weights_made_for(path):
    """(dataset, backbone) of weights: a kit checkpoint's flags, else (None, its keys' backbone)."""
    ckpt = load_checkpoint(path)
    flags = ckpt.get("args", {})
    if "backbone" in flags:
        return flags.get("dataset"), flags["backbone"]
    return None, backbone_kind(split_state(ckpt, path) or ckpt)


# ============ 2. Your episodes, in the benchmark's test geometry ============
def own_episodes(supports, queries, test_size, geometry="pfenet"):
    """The user's episodes, every file read before any is predicted: the supports [(image path, mask
    path)] once, then per query (its output name, unique in the run; the item as an evaluation batch
    of EpisodeDataset, in the benchmark's test geometry, PROTOCOL.md 5.1; the query (H, W, 3); the
    supports [(image, mask)])."""
    fix = "pass an image file"
    pairs = []
    for image_path, mask_path in supports:
        img = read_image(image_path, fix)
        pairs.append((img, read_user_mask(mask_path, image_path, img.shape[:2])))
    xs = [test_transform(img, m, test_size, geometry) for img, m in pairs]
    support = {
        "support": torch.stack([x for x, _ in xs])[None],  # (1, S, 3, s, s)
        "support_mask": torch.stack([y for _, y in xs])[None],  # (1, S, s, s)
    }
    names = set()
    episodes = []
    for path in queries:
        q = read_image(path, fix)
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem
        k = 1
        while name in names:  # a second a.jpg (from another folder) is a-2, a third a-3
            k += 1
            name = f"{stem}-{k}"
        names.add(name)
        xq, _ = test_transform(q, np.zeros(q.shape[:2], np.uint8), test_size, geometry)  # (3, s, s)
        episodes.append((name, {"query": xq[None], **support}, q, pairs))
    return episodes


def at_query_size(scores, query, geometry="pfenet"):
    """Scores (1, C, s, s) on the test canvas -> (C, H, W) at the query's size, as the benchmark
    scores them (logits_at_label_size to max(H, W), then the query's top-left part; hsnet: resized
    to (H, W))."""
    h, w = query.shape[:2]
    scores = scores.float().cpu()
    if geometry == "hsnet":
        return resize(scores, (h, w))[0]
    # pfenet: to the L x L canvas of the label, L = max(H, W), where the query is the top-left part
    canvas, _ = logits_at_label_size(scores, torch.zeros(h, w, dtype=torch.long))  # (1, C, L, L)
    return canvas[0, :, :h, :w]


# ============ 3. The predictions: masks at the original size, pictures ============
def _tint(img, m, colour):
    """The image with its mask's foreground (m == 1) blended towards `colour`."""
    return np.where(m[..., None] == 1, 0.45 * img + 0.55 * np.array(colour), img)


def write_user_prediction(out, name, query, pred, pairs, heat=None):
    """NAME_mask.png (0/255, the query's size) and NAME_overlay.png (the query with the prediction
    tinted, the supports with their masks beside it, Fig. 2 style); NAME_prior.png from `heat` (H,
    W) in [0, 1] if given."""
    os.makedirs(out, exist_ok=True)
    h = query.shape[0]
    panels = [_tint(query[:, :, ::-1], pred, (255, 80, 0))]  # BGR, as cv2 writes
    for img, m in pairs:  # each support at the query's height
        w = max(1, round(img.shape[1] * h / img.shape[0]))
        tinted = _tint(img[:, :, ::-1], m, (0, 200, 255))
        panels.append(cv2.resize(tinted, (w, h), interpolation=cv2.INTER_AREA))
    cv2.imwrite(os.path.join(out, f"{name}_mask.png"), (255 * pred).astype(np.uint8))
    overlay = np.clip(np.concatenate(panels, 1), 0, 255).astype(np.uint8)
    cv2.imwrite(os.path.join(out, f"{name}_overlay.png"), overlay)
    wrote = f"wrote {os.path.join(out, name)}_mask.png and _overlay.png"
    if heat is not None:
        heat_map = cv2.applyColorMap((255 * heat).astype(np.uint8), cv2.COLORMAP_JET)
        cv2.imwrite(os.path.join(out, f"{name}_prior.png"), heat_map)
        wrote += " and _prior.png"
    print(wrote)


# ============ 4. The flags and the loop both tests share ============
def add_own_image_args(parser):
    """The flags of segment_own_images, in both tests."""
    g = parser.add_argument_group("your own images (no data root, fold or class needed)")
    g.add_argument(
        "--support",
        nargs=2,
        action="append",
        metavar=("IMAGE", "MASK"),
        help="a support image and its mask (0/1, 0/255, palette, RGB or transparent PNG; README "
        "'Your own images'); repeat for shots",
    )
    g.add_argument(
        "--query", nargs="+", metavar="IMAGE", help="images to segment with the --support examples"
    )
    g.add_argument(
        "--out",
        help="folder for NAME_mask.png and NAME_overlay.png of each --query (with "
        "evaluate.py --curves: the PNG to write)",
    )
    return parser


def segment_own_images(args, predict, dtype, decide):
    """Each --query segmented with the --support examples (evaluate.py, nonparametric_eval.py), by
    rank 0: predict(item) -> scores on the test canvas, autocast in `dtype`; decide(scores at the
    query's size) -> (mask, heat map or None)."""
    if not (args.support and args.query and args.out):
        raise KitError(
            "your own images need --support IMAGE MASK (once per shot), --query IMAGE... and "
            "--out DIR"
        )
    if not is_main():  # under torchrun, rank 0 does it all
        return
    episodes = own_episodes(args.support, args.query, args.test_size, args.test_geometry)
    for name, item, query, pairs in episodes:
        scores = autocast_call(torch.device(args.device), dtype, predict, item)  # (1, C, s, s)
        mask, heat = decide(at_query_size(scores, query, args.test_geometry))  # (H, W) each
        write_user_prediction(args.out, name, query, mask, pairs, heat)
