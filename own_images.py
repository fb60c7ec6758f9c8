"""own_images.py: few-shot segmentation of your own images, with nothing but a checkpoint.

Both tests take --support IMAGE MASK (once per shot) and --query IMAGE...: evaluate.py with a
meta-trained model, nonparametric_eval.py with a pre-trained backbone's prior. The images are read
as they come (JPEG, PNG, any size), a support mask in every common way of storing one
(read_user_mask; a photo passed as the mask is refused), each query put in the benchmark's test
geometry and normalisation, and its prediction written at its original size with a picture beside
it, under a name that replaces no file (output_names). A large photo costs little memory: only the
test-size input, a one-channel score map at the query's size and a picture at most OVERLAY_SIDE
long are made from it.
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
    resize,
    split_state,
    test_transform,
)
from plumbing import autocast_call, is_main

# ============ 1. Reading your images and masks ============
_STDERR = threading.Lock()  # one decode at a time may borrow the process's stderr

# A mask is a label image: a few values, or nearly all its pixels at its lowest or its highest
# level (JPEG noise within LEVEL_TOLERANCE of their range; an anti-aliased edge's grey pixels
# within EDGE_PX of both levels). A photo's mid-tones fill most of it.
LABEL_LEVELS = 8  # a lossless image with at most this many values is a label image
MASK_SHARE = 0.9  # the least share of a mask's pixels at its two levels or on an edge between them
LEVEL_TOLERANCE = 0.1
EDGE_PX = 3


def read_image(path, fix):
    """An image file decoded in full -> RGB uint8 (H, W, 3), refusing what libjpeg only warns
    about: a JPEG damaged in the middle decodes "successfully" into garbage, saying 'Corrupt JPEG
    data' on stderr. Kept in uint8 (a 5000 x 5000 photo is 75 MB; float32 only for the test
    transform, briefly)."""
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
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB, dst=img)  # in place


def share_at_two_levels(levels):
    """The share of the pixels of a one-channel image (H, W) at its lowest or its highest level
    (within LEVEL_TOLERANCE of the range between them) or on an edge between the two (within
    EDGE_PX of both): ~1 for a mask, a JPEG one or one with anti-aliased edges too; far less for a
    photo."""
    lowest = float(levels.min())
    highest = float(levels.max())
    tolerance = LEVEL_TOLERANCE * (highest - lowest)
    low = (levels <= lowest + tolerance).astype(np.uint8)
    high = (levels >= highest - tolerance).astype(np.uint8)
    near = np.ones((2 * EDGE_PX + 1, 2 * EDGE_PX + 1), np.uint8)
    edge = cv2.dilate(low, near) & cv2.dilate(high, near)
    return float(np.mean(low | high | edge))


def looks_like_a_mask(levels):
    """A label image (H, W): a few values, or nearly all its pixels at two levels."""
    few_values = len(np.unique(levels)) <= LABEL_LEVELS
    return few_values or share_at_two_levels(levels) >= MASK_SHARE


def refuse_a_photo(levels, path, image_path, image=None):
    """Stop if a support mask's levels (H, W) look like a photo, naming the file; if its support
    image (H, W, 3) looks like a mask, the pair was passed the wrong way round."""
    share = share_at_two_levels(levels)
    if share >= MASK_SHARE:
        return
    if image is not None and looks_like_a_mask(image.max(-1)):
        raise KitError(
            f"--support {image_path} {path}: {image_path} looks like a mask and {path} like a "
            "photo: pass the image first"
        )
    raise KitError(
        f"mask {path} looks like a photo (only {share:.0%} of its pixels are at its two extreme "
        "levels or on an edge between them): pass the mask image (0/1, 0/255, palette, RGB or "
        "transparent PNG)"
    )


def mask_levels(path):
    """A mask file -> (its levels (H, W), whether it is a label image). The levels: a transparent
    PNG's alpha channel, else the brightest channel. A label image: a palette PNG, or a lossless
    one with at most LABEL_LEVELS values."""
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
    labels = mode == "P" or (not lossy and len(np.unique(m)) <= LABEL_LEVELS)
    return m, labels


def read_user_mask(path, image_path, shape, image=None):
    """A support mask read as its user means it -> (H, W) uint8: 1 foreground, 0 background, 255
    ignored. A palette (VOC) PNG: index 0 background, any other index foreground. A transparent PNG:
    the opaque part. Otherwise 0/1, 0/255, class indices, grey, RGB: a label image (lossless, a few
    values) is foreground wherever non-zero; a JPEG or one with many values (anti-aliased edges)
    above half its maximum, unless it looks like a photo (refuse_a_photo, told of the support
    `image` (H, W, 3) if given). 255 beside other non-zero values is void."""
    m, labels = mask_levels(path)
    if not labels:
        refuse_a_photo(m, path, image_path, image)
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
OUTPUTS = ("mask", "overlay", "prior")  # NAME_mask.png, NAME_overlay.png, NAME_prior.png
OVERLAY_SIDE = 1024  # the pictures are drawn from copies at most this long: a photo's memory


def existing_output(out, name):
    """The first of NAME_mask.png, NAME_overlay.png, NAME_prior.png already in `out`, or None."""
    for kind in OUTPUTS:
        file_name = f"{name}_{kind}.png"
        if os.path.lexists(os.path.join(out, file_name)):
            return file_name
    return None


def output_names(queries, out):
    """Each --query's name, replacing no file: the first of NAME, NAME-2, NAME-3, ... (NAME its file
    name without the extension) with none of NAME_mask.png, NAME_overlay.png, NAME_prior.png in
    `out` and not taken by another query of this run -> [(name, why it is not NAME: '' or the
    start of the line that reports it)]."""
    taken = set()
    named = []
    for path in queries:
        stem = os.path.splitext(os.path.basename(path))[0]
        name = stem
        k = 1
        while name in taken or existing_output(out, name):
            k += 1
            name = f"{stem}-{k}"
        taken.add(name)
        why = ""
        if name != stem:
            existing = existing_output(out, stem)
            why = f"{existing} exists: " if existing else f"another --query is also {stem}: "
        named.append((name, why))
    return named


def shrunk(img, mask=None):
    """A copy for the pictures: img (H, W, 3) uint8, and its mask (H, W), with the longer side
    reduced to OVERLAY_SIDE (the image by area, the mask by nearest pixel); smaller ones as they
    are."""
    h, w = img.shape[:2]
    scale = OVERLAY_SIDE / max(h, w)
    if scale >= 1:
        return img, mask
    size = (max(1, round(w * scale)), max(1, round(h * scale)))  # (w', h'), as cv2 takes it
    img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    if mask is not None:
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    return img, mask


def own_episodes(supports, queries, test_size, geometry="pfenet"):
    """The user's episodes, every file read before any is predicted: the supports [(image path, mask
    path)] once, then per query (the item as an evaluation batch of EpisodeDataset, in the
    benchmark's test geometry, PROTOCOL.md 5.1; the query's size (H, W); its picture (shrunk)), and
    the supports' pictures [(image, mask)] (shrunk). Nothing at a photo's full size is kept."""
    fix = "pass an image file"
    xs = []
    shown = []
    for image_path, mask_path in supports:
        img = read_image(image_path, fix)
        mask = read_user_mask(mask_path, image_path, img.shape[:2], image=img)
        xs.append(test_transform(img.astype(np.float32), mask, test_size, geometry))
        shown.append(shrunk(img, mask))
    support = {
        "support": torch.stack([x for x, _ in xs])[None],  # (1, S, 3, s, s)
        "support_mask": torch.stack([y for _, y in xs])[None],  # (1, S, s, s)
    }
    episodes = []
    for path in queries:
        q = read_image(path, fix)
        h, w = q.shape[:2]
        no_label = np.zeros((h, w), np.uint8)
        xq, _ = test_transform(q.astype(np.float32), no_label, test_size, geometry)  # (3, s, s)
        picture, _ = shrunk(q)
        episodes.append(({"query": xq[None], **support}, (h, w), picture))
    return episodes, shown


def foreground_score(scores):
    """Scores (1, C, s, s) -> one map (1, 1, s, s): for a model's two classes the foreground logit
    minus the background one (> 0 where their argmax is foreground; a tie is background, argmax's
    first index), else the one channel (the prior)."""
    scores = scores.float().cpu()
    if scores.shape[1] == 2:
        return scores[:, 1:] - scores[:, :1]
    return scores


def at_query_size(score, shape, geometry="pfenet"):
    """A one-channel map (1, 1, s, s) on the test canvas -> (H, W) at the query's size `shape`, as
    the benchmark scores them (resized to L = max(H, W) as logits_at_label_size does, then the
    query's top-left part; hsnet: resized to (H, W)). One channel: a 5000 x 5000 query's is 100
    MB."""
    h, w = shape
    if geometry == "hsnet":
        return resize(score, (h, w))[0, 0]
    side = max(h, w)
    canvas = resize(score, (side, side))  # (1, 1, L, L); the query is its top-left part
    return canvas[0, 0, :h, :w]


# ============ 3. The predictions: masks at the original size, pictures ============
OVERLAY_HEIGHT = 256  # a small image's picture drawn this high at least: its legend stays legible
PREDICTION = ("blue", (255, 80, 0))  # the colour's name and BGR, as evaluate.py's pictures
SUPPORT_MASK = ("yellow", (0, 200, 255))
FONT = cv2.FONT_HERSHEY_SIMPLEX


def _tint(img, m, colour):
    """The BGR uint8 image with its mask's foreground (m == 1) blended towards `colour`."""
    blended = 0.45 * img.astype(np.float32) + 0.55 * np.array(colour, np.float32)
    return np.where(m[..., None] == 1, blended, img).astype(np.uint8)


def _panel(rgb, m, colour, height):
    """An RGB picture and its mask (any size, the same aspect) -> a BGR panel `height` px high with
    m == 1 tinted: enlarged by nearest pixel (as evaluate.py's panels), reduced by area."""
    h, w = rgb.shape[:2]
    size = (max(1, round(w * height / h)), height)  # (w', h'), as cv2 takes it
    interpolation = cv2.INTER_NEAREST if height > h else cv2.INTER_AREA
    bgr = cv2.resize(np.ascontiguousarray(rgb[:, :, ::-1]), size, interpolation=interpolation)
    m = cv2.resize(m, size, interpolation=cv2.INTER_NEAREST)
    return _tint(bgr, m, colour)


def legend_bar(titles, widths, height):
    """A white bar naming each panel and its colour: titles [(name, meaning, (colour name, BGR))]
    above panels `widths` px wide, the pictures `height` px high. Two lines a panel: the name, then
    a swatch and "meaning (colour name)". The text grows with the pictures, less than they do (0.45
    at 256 px, as evaluate.py's titles; 1.27 at 1024), and shrinks to fit the narrowest panel."""
    lines = [(name, f"{meaning} ({colour})") for name, meaning, (colour, _) in titles]
    scale = 0.45 * max(1.0, height / OVERLAY_HEIGHT) ** 0.75
    thick = max(1, round(scale * 1.2))
    for (name, meaning), width in zip(lines, widths, strict=True):
        swatch = cv2.getTextSize("A", FONT, scale, thick)[0][1]  # a square as high as the text
        margins = 4 * max(4, swatch // 3)
        text_w = cv2.getTextSize(meaning, FONT, scale, thick)[0][0] + swatch + margins
        name_w = cv2.getTextSize(name, FONT, scale, thick)[0][0] + margins
        scale = min(scale, scale * width / max(text_w, name_w))
    (_, text_h), base = cv2.getTextSize("Ag", FONT, scale, thick)
    line = text_h + base + max(2, text_h // 3)  # one line of text, with its gap
    bar = np.full((2 * line + base + 4, sum(widths), 3), 255, np.uint8)
    gap = max(4, text_h // 3)  # the margin, and between the swatch and its text
    x = 0
    for (name, meaning), (_, _, (_, bgr)), width in zip(lines, titles, widths, strict=True):
        cv2.putText(bar, name, (x + gap, line - base), FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
        top = line + 2
        cv2.rectangle(bar, (x + gap, top), (x + gap + text_h, top + text_h), bgr, cv2.FILLED)
        origin = (x + 2 * gap + text_h, top + text_h)
        cv2.putText(bar, meaning, origin, FONT, scale, (0, 0, 0), thick, cv2.LINE_AA)
        x += width
    return bar


def overlay_picture(query, pred, supports):
    """NAME_overlay.png: the query's picture (H', W', 3) RGB with the prediction `pred` (H, W)
    tinted, each support's picture with its mask beside it at the same height (Fig. 2 style), under
    a legend bar -> BGR uint8. At most OVERLAY_SIDE high (the shrunk pictures), at least
    OVERLAY_HEIGHT."""
    height = max(query.shape[0], OVERLAY_HEIGHT)
    panels = [_panel(query, pred, PREDICTION[1], height)]
    titles = [("query", "predicted foreground", PREDICTION)]
    for k, (img, m) in enumerate(supports, 1):
        panels.append(_panel(img, m, SUPPORT_MASK[1], height))
        titles.append((f"support {k}", "its mask", SUPPORT_MASK))
    bar = legend_bar(titles, [p.shape[1] for p in panels], height)
    return np.concatenate([bar, np.concatenate(panels, 1)], 0)


def write_new_png(path, picture):
    """picture -> the PNG `path`, never replacing a file: created exclusively, so one that appeared
    after output_names chose the name is kept and the run stops."""
    ok, png = cv2.imencode(".png", picture)
    if not ok:
        raise KitError(f"cannot encode {path} as PNG")
    try:
        with open(path, "xb") as f:
            f.write(png.tobytes())
    except FileExistsError:
        raise KitError(
            f"{path} appeared while this run wrote its predictions (another run into the same "
            "--out?): it is kept; run again to write under the next free name"
        ) from None


def write_user_prediction(out, name, why, pred, picture, heat=None):
    """NAME_mask.png (0/255, `pred` (H, W) at the query's size) and NAME_overlay.png (`picture`);
    NAME_prior.png from `heat` (H, W) in [0, 1] if given. One line says what was written and, in
    `why`, why NAME is not the query's own name."""
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    write_new_png(f"{path}_mask.png", pred.astype(np.uint8) * np.uint8(255))
    write_new_png(f"{path}_overlay.png", picture)
    wrote = f"{why}wrote {path}_mask.png and _overlay.png"
    if heat is not None:
        heat_map = cv2.applyColorMap((255 * heat).astype(np.uint8), cv2.COLORMAP_JET)
        write_new_png(f"{path}_prior.png", heat_map)
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
        help="folder for NAME_mask.png and NAME_overlay.png of each --query, replacing no file "
        "(NAME-2, NAME-3, ... if taken) (with evaluate.py --curves: the PNG to write)",
    )
    return parser


def segment_own_images(args, predict, dtype, decide):
    """Each --query segmented with the --support examples (evaluate.py, nonparametric_eval.py), by
    rank 0: predict(item) -> scores (1, C, s, s) on the test canvas, autocast in `dtype`;
    decide(score (H, W) at the query's size: the foreground-minus-background logit, or the prior)
    -> (mask (H, W) in {0, 1}, heat map (H, W) in [0, 1] or None)."""
    if not (args.support and args.query and args.out):
        raise KitError(
            "your own images need --support IMAGE MASK (once per shot), --query IMAGE... and "
            "--out DIR"
        )
    if not is_main():  # under torchrun, rank 0 does it all
        return
    named = output_names(args.query, args.out)
    episodes, shown = own_episodes(args.support, args.query, args.test_size, args.test_geometry)
    for (name, why), (item, shape, picture) in zip(named, episodes, strict=True):
        scores = autocast_call(torch.device(args.device), dtype, predict, item)  # (1, C, s, s)
        score = at_query_size(foreground_score(scores), shape, args.test_geometry)  # (H, W)
        mask, heat = decide(score)  # (H, W) each
        overlay = overlay_picture(picture, mask, shown)
        write_user_prediction(args.out, name, why, mask, overlay, heat)
