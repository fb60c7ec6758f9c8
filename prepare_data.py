"""prepare_data.py: the data stage. Builds and checks the VOC-layout data roots every other stage reads.

  synthetic  a built-in synthetic benchmark: a seeded world in the VOC layout with objects of every class in the
             training images (the merged background of BCPT, paper Sec. 1). --dataset synthetic: many small
             shape classes on textured "stuff"; --dataset synthetic2: a second world with other statistics (1-2
             large blob-shaped two-tone objects on clouds / gradients / patchwork with clutter). Stages generate
             the world on first use of its --dataset.
  pascal     PASCAL VOC2012 + SBD -> JPEGImages, SegmentationClassAug, ImageSets/Segmentation lists
             (PROTOCOL.md 2.1-2.2).
  coco       COCO 2014 instances -> one class-index PNG per image and the lists (PROTOCOL.md 2.3).
  verify     decode every image and mask, list all bad files, and print per-fold pool sizes after the pixel rule.

The kit writes only into a folder that is new, empty, or carries its own marker of the same kind
(claim_root): a user's data is never overwritten.

    python prepare_data.py synthetic --dataset synthetic2 --out data/synthetic2
    python prepare_data.py pascal --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset \
        --train-noval train_noval.txt --out ROOT
    python prepare_data.py coco --coco COCO2014 --out ROOT
    python prepare_data.py verify --dataset pascal --data-root ROOT
"""
import functools
import json
import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image

from common import (CACHE_DIR, IMAGES, LISTS, MASKS, N_CLASSES, SYNTHETIC_ROOTS, KitError, base_classes,
                    check_image_file, class_pixel_counts, image_pools, novel_classes, read_list, read_mask)
from plumbing import POSITIVE, SIZE, KitParser, add_data_args, dataset_of, run, typed

# ============ 1. The synthetic benchmarks: seeded worlds in the VOC layout ============
# ---- 1a. The first world, synthetic: many small shape classes on textured stuff ----
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
    return _finish(rng, img, inst, classes, blur=.6)


def _finish(rng, img, inst, classes, blur):
    """Instance map (H, W) -> VOC label map with a void band (255) along each visible object outline;
    the image gets a mild blur and noise. -> (uint8 RGB image, uint8 label map)."""
    lab = np.concatenate([[0], classes + 1]).astype(np.uint8)[inst]  # instance id -> class label
    kernel = np.ones((3, 3), np.uint8)
    for k in np.unique(inst[inst > 0]):  # VOC-style void band along each visible object outline
        mk = (inst == k).astype(np.uint8)
        lab[cv2.dilate(mk, kernel) > cv2.erode(mk, kernel)] = 255
    img = cv2.GaussianBlur(img, (0, 0), blur) + 3 * rng.standard_normal(img.shape, np.float32)
    return np.clip(img, 0, 255).astype(np.uint8), lab


# ---- 1b. The second world, synthetic2: other statistics, for a claim to be checked beyond one world ----
# 1-2 large objects per image with smooth Fourier-blob or compound outlines, two-tone colour pairs laid out by
# a class texture, on cloud / gradient / patchwork backgrounds with small non-class clutter.
# Five tones; every class has two of them (all 10 pairs, each pair used by 2 classes, each tone by 8).
PALETTE2 = dict(red=(205, 55, 45), gold=(225, 175, 40), green=(60, 155, 75), blue=(50, 95, 205),
                pink=(200, 90, 175))
# Classes 1-20, two a row: shape family, colour pair (first tone / second tone), texture. Each shape is
# used by 2 classes, each pair by 2, each texture by 4; any two classes share at most one of the three cues.
CLASS_TABLE2 = """
    egg        red/gold   stripes     egg        green/blue rings         #  1,  2
    clover     gold/green spots       clover     red/green  radial        #  3,  4
    quatrefoil green/pink halves      quatrefoil gold/blue  stripes       #  5,  6
    bean       red/blue   rings       bean       blue/pink  spots         #  7,  8
    flower     gold/pink  radial      flower     red/pink   halves        #  9, 10
    peanut     red/gold   rings       peanut     green/blue spots         # 11, 12
    pan        gold/green radial      pan        red/green  halves        # 13, 14
    mushroom   green/pink stripes     mushroom   gold/blue  rings         # 15, 16
    dumbbell   red/blue   spots       dumbbell   blue/pink  radial        # 17, 18
    boot       gold/pink  halves      boot       red/pink   stripes       # 19, 20
"""
_W2 = [w for line in CLASS_TABLE2.splitlines() for w in line.split("#")[0].split()]
CLASSES2 = [(_W2[i], tuple(_W2[i + 1].split("/")), _W2[i + 2]) for i in range(0, 60, 3)]  # (shape, pair, tex)
SYNTHETIC2_CLASS_NAMES = [f"{s}_{a}-{b}_{t}" for s, (a, b), t in CLASSES2]
# Shapes as unions of parts (dx, dy, sx, sy, {harmonic k: amplitude}) in a unit frame: part outline
# r(theta) = 1 + sum a_k cos(k theta), scaled by (sx, sy) and moved to (dx, dy).
SHAPES2 = {"egg": [(0, 0, 1, .75, {1: .15, 2: .05})], "clover": [(0, 0, 1, 1, {3: .3})],
           "quatrefoil": [(0, 0, 1, 1, {4: .22})], "bean": [(0, 0, 1, .6, {1: .1, 2: .25, 3: .15})],
           "flower": [(0, 0, 1, 1, {6: .13, 2: .1})],
           "peanut": [(-.45, 0, .6, .6, {}), (.45, 0, .55, .55, {})],
           "pan": [(-.3, 0, .7, .7, {}), (.7, 0, .55, .13, {})],  # round body with a long handle
           "mushroom": [(0, -.2, 1, .5, {}), (0, .55, .22, .5, {})],  # wide cap on a stem
           "dumbbell": [(-.7, 0, .4, .4, {}), (.7, 0, .4, .4, {}), (0, 0, .75, .15, {})],
           "boot": [(-.35, -.2, .3, .8, {}), (.15, .5, .6, .25, {})]}  # leg and foot: an L
_THETA2 = np.linspace(0, 2 * np.pi, 64, endpoint=False)


def _parts2(shape, rng=None):
    """Unit-frame polygons of a shape; with rng, each part gets per-instance outline and offset jitter."""
    polys = []
    for dx, dy, sx, sy, coef in SHAPES2[shape]:
        r = np.ones_like(_THETA2) + sum(a * np.cos(k * _THETA2) for k, a in coef.items())
        if rng is not None:  # random low harmonics of about 4% amplitude, part offsets of about 5%
            r = r + sum(rng.normal(0, .04) * np.cos(k * _THETA2 + rng.uniform(0, 6.3)) for k in (2, 3, 4))
            dx, dy = dx + rng.normal(0, .05), dy + rng.normal(0, .05)
        polys.append(np.stack([dx + sx * r * np.cos(_THETA2), dy + sy * r * np.sin(_THETA2)], 1))
    return polys


def _mask2(polys, size, cx, cy, scale, angle, aspect):
    """Boolean size x size mask: union of unit-frame polygons, stretched, rotated, scaled, moved."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    m = np.zeros((size, size), np.uint8)
    for p in polys:  # one fillPoly per part: overlapping parts must not cancel (even-odd rule)
        q = (p * [aspect, 1 / aspect]) @ rot.T * scale + [cx, cy]
        cv2.fillPoly(m, [np.round(q * 16).astype(np.int32)], 1, cv2.LINE_8, 4)
    return m.astype(bool)


# Area of each mean shape at unit scale, used to draw objects with a target pixel area.
_UNIT_AREA2 = {s: float(_mask2(_parts2(s), 400, 200, 200, 100, 0, 1).sum()) / 1e4 for s in SHAPES2}


def _tone(rng, rgb):
    """A colour with per-draw jitter: hue shift, saturation and brightness scale."""
    h, s, v = cv2.cvtColor(np.uint8([[rgb]]), cv2.COLOR_RGB2HSV)[0, 0].astype(float)
    return _hsv2rgb((h + rng.uniform(-6, 6)) % 180, s * rng.uniform(.75, 1.1), v * rng.uniform(.7, 1.1))


def _object_texture2(rng, cls, size, cx, cy, scale, angle):
    """Float RGB two-tone texture of a class in the object's own frame (u, v in units of its scale)."""
    _, (name1, name2), tex = CLASSES2[cls]
    y, x = _grid(size)
    c, s = math.cos(angle) / scale, math.sin(angle) / scale  # python floats keep float32
    u, v = (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s
    rho = np.sqrt(u * u + v * v)
    if tex == "stripes":  # grating along the object's axis, about 3 periods per unit
        t = np.sin(u * rng.uniform(17, 21) + rng.uniform(0, 6.3)) > 0
    elif tex == "rings":  # concentric bands around the object centre
        t = np.sin(rho * rng.uniform(13, 16)) > 0
    elif tex == "spots":  # 8 random discs of the second tone
        p = rng.uniform(-.9, .9, (8, 2, 1, 1)).astype(np.float32)
        t = ((u - p[:, 0]) ** 2 + (v - p[:, 1]) ** 2).min(0) < rng.uniform(.03, .05)
    elif tex == "radial":  # smooth gradient from the first tone at the centre to the second at the rim
        t = np.clip(rho, 0, 1)
    else:  # halves: first tone on one side of the long axis, second on the other, soft border
        t = 1 / (1 + np.exp(-12 * (v - rng.uniform(-.2, .2))))
    a, b = _tone(rng, PALETTE2[name1]), _tone(rng, PALETTE2[name2])
    d = rng.uniform(0, 2 * math.pi)
    shade = 1 + .1 * (u * math.cos(d) + v * math.sin(d)) + .03 * rng.standard_normal((size, size), np.float32)
    return (a + (b - a) * t.astype(np.float32)[..., None]) * shade[..., None]


def _bg_colour(rng):
    """Background colour: half the time a palette tone (so colour never separates objects), else any."""
    if rng.random() < .5:
        return _tone(rng, list(PALETTE2.values())[rng.integers(len(PALETTE2))])
    return _hsv2rgb(rng.uniform(0, 180), rng.uniform(20, 170), rng.uniform(60, 225))


def _clouds(rng, size):
    """Multi-octave value noise in [0, 1]: random grids of 3, 6, 12, 24 cells, amplitude halving."""
    t = sum(.5 ** k * cv2.resize(rng.random((3 << k, 3 << k), np.float32), (size, size),
                                 interpolation=cv2.INTER_CUBIC) for k in range(4))
    return (t - t.min()) / (t.max() - t.min() + 1e-6)


def _background2(rng, size):
    """Background 'stuff': clouds, a soft four-corner gradient or a patchwork, cloud-shaded, with clutter."""
    (y, x), kind = _grid(size), rng.integers(3)
    if kind == 0:  # clouds between two colours
        a, b = _bg_colour(rng), _bg_colour(rng)
        img = a + (b - a) * _clouds(rng, size)[..., None]
    elif kind == 1:  # bilinear blend of four corner colours
        wy, wx = (y / size)[..., None], (x / size)[..., None]
        c = [_bg_colour(rng) for _ in range(4)]
        img = (1 - wy) * ((1 - wx) * c[0] + wx * c[1]) + wy * ((1 - wx) * c[2] + wx * c[3])
    else:  # patchwork: Voronoi cells of 3-7 seeds, borders wobbled by noise, one colour per cell
        n = int(rng.integers(3, 8))
        seeds, cols = rng.uniform(0, size, (n, 2, 1, 1)).astype(np.float32), [_bg_colour(rng) for _ in range(n)]
        wob = .15 * size * (_clouds(rng, size) - .5)
        cell = ((x + wob - seeds[:, 0]) ** 2 + (y - wob - seeds[:, 1]) ** 2).argmin(0)
        img = np.float32(cols)[cell]
    img = img * (.8 + .4 * _clouds(rng, size))[..., None]  # soft light variation over every kind
    for _ in range(rng.integers(3, 12)):  # clutter: short strokes and dots, labelled background
        p, col = rng.uniform(0, size, 2), tuple(float(v) for v in _bg_colour(rng))
        if rng.random() < .5:
            length, a = rng.uniform(4, 12), rng.uniform(0, 2 * math.pi)
            q = p + length * np.array([math.cos(a), math.sin(a)])
            cv2.line(img, tuple(int(t) for t in p), tuple(int(t) for t in q), col, 1, cv2.LINE_AA)
        else:
            cv2.circle(img, tuple(int(t) for t in p), int(rng.integers(1, 3)), col, -1, cv2.LINE_AA)
    return img


def _render2(rng, size):
    """Render one image with 1-2 large objects; returns (uint8 RGB image, uint8 VOC label map)."""
    img, inst = _background2(rng, size), np.zeros((size, size), np.int32)
    classes = rng.choice(20, 1 if rng.random() < .55 else 2, replace=False)  # 55% one object, 45% two
    prev = None
    for k, c in enumerate(classes, 1):  # the second object occludes the first
        shape = CLASSES2[c][0]
        scale = math.sqrt(rng.uniform(.12, .4) * size * size / _UNIT_AREA2[shape])  # 12-40% of the image
        cand = rng.uniform(.2 * size, .8 * size, (8, 2))  # may cross the border; a second object takes
        cx, cy = cand[0] if prev is None else cand[np.argmax(((cand - prev) ** 2).sum(1))]  # the farthest
        prev, angle, aspect = (cx, cy), rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-.2, .2))
        m = _mask2(_parts2(shape, rng), size, cx, cy, scale, angle, aspect)
        img[m], inst[m] = _object_texture2(rng, c, size, cx, cy, scale, angle)[m], k
    return _finish(rng, img, inst, classes, blur=.7)


# ---- 1c. Writing a world ----
SYNTHETIC_MARKER = ".complete"  # written into a finished synthetic world: its generation parameters (JSON)
PREPARED_MARKER = ".prepared.json"  # written by the pascal / coco commands into their --out


def _synthetic_params(root):
    """The generation parameters recorded in a world's marker (world, n_train, n_val, size, seed), or None if
    root is not a finished world. A marker from before the second world names none: it is the first."""
    try:
        with open(os.path.join(root, SYNTHETIC_MARKER)) as f:
            params = json.load(f)
        if isinstance(params, dict) and {"n_train", "n_val", "size", "seed"} <= set(params):
            return {"world": "synthetic", **params}
    except (OSError, ValueError):
        pass
    return None


def _prepared_kind(root):
    """'pascal' / 'coco' if root carries the marker of the pascal / coco command, else None."""
    try:
        with open(os.path.join(root, PREPARED_MARKER)) as f:
            return json.load(f).get("dataset")
    except (OSError, ValueError, AttributeError):
        return None


def claim_root(root, flag, kind):
    """The kit writes a data root only if it does not exist, is empty, or carries the kit's own marker of
    the same kind ('synthetic', 'synthetic2', 'pascal' or 'coco'); anything else is refused untouched."""
    if not os.path.exists(root) or (os.path.isdir(root) and not os.listdir(root)):
        return
    made = _prepared_kind(root) or (_synthetic_params(root) or {}).get("world")
    if made == kind:
        return
    names = set(os.listdir(root)) if os.path.isdir(root) else set()
    if made:
        hint = f"it holds a {made} root made by this kit: did you mean --dataset {made}?"
    elif {IMAGES, MASKS} & names:
        hint = "it looks like a prepared VOC/COCO root: did you mean --dataset pascal or --dataset coco?"
    else:
        hint = "point it at a new or empty folder"
    raise KitError(f"{flag} {root} is not empty and was not made by this kit for {kind} data, so nothing "
                   f"is written there: {hint}")


# The worlds and their default sizes: a different image count and different statistics in each.
WORLDS = {"synthetic": dict(n_train=2000, n_val=500, size=96), "synthetic2": dict(n_train=1200, n_val=400, size=96)}


def ensure_synthetic(root, world="synthetic"):
    """What a stage calls on --dataset synthetic / synthetic2: a finished world of that kind at root is used
    as it is (of any size); no world there: the default one is generated (make_synthetic refuses a foreign
    folder); a world of the other kind: refused, naming both."""
    params = _synthetic_params(root)
    if params is None:
        make_synthetic(root, world=world)
    elif params["world"] != world:
        raise KitError(f"--data-root {root} holds the {params['world']} world, not {world}: pass --dataset "
                       f"{params['world']}, or the --data-root of a {world} world (default {SYNTHETIC_ROOTS[world]})")
    return root


def make_synthetic(root, n_train=None, n_val=None, size=None, seed=0, flag="--data-root", world="synthetic"):
    """Write a synthetic world (WORLDS; sizes default to the world's) to `root` in VOC layout; return root.
    Idempotent: if root holds that world with the same parameters, return at once. Only a missing or empty
    folder, or a world of the same kind this kit made, is (re)written (claim_root). The world is written to a
    private temporary folder and published with one rename, so runs started side by side never read a
    half-written world."""
    spec, render = WORLDS[world], _render if world == "synthetic" else _render2
    n_train, n_val, size = n_train or spec["n_train"], n_val or spec["n_val"], size or spec["size"]
    params = dict(world=world, n_train=n_train, n_val=n_val, size=size, seed=seed)
    if _synthetic_params(root) == params:
        return root
    claim_root(root, flag, world)
    if os.path.isdir(root):
        _check_only_world_files(root, flag)
    parent, name = os.path.split(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    t0 = time.time()
    print(f"{world}: writing {n_train} + {n_val} images of {size} px to {root} ...", flush=True)
    try:
        dirs = [os.path.join(tmp, d) for d in (IMAGES, MASKS, LISTS)]
        for d in dirs:
            os.makedirs(d)
        for split_idx, (split, n) in enumerate((("train", n_train), ("val", n_val))):
            for i in range(n):
                img, lab = render(np.random.default_rng([seed, split_idx, i]), size)
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
    print(f"{world}: done in {time.time() - t0:.0f}s", flush=True)
    return root


def _world_files(params):
    """Every path (relative to the root) that make_synthetic writes for these parameters."""
    ids = [f"train_{i:06d}" for i in range(params["n_train"])] + [f"val_{i:06d}" for i in range(params["n_val"])]
    return ({SYNTHETIC_MARKER, os.path.join(LISTS, "val.txt")} | {os.path.join(IMAGES, i + ".jpg") for i in ids}
            | {os.path.join(MASKS, i + ".png") for i in ids})


def _check_only_world_files(root, flag):
    """Before a world the kit made is replaced: refuse if the folder holds anything the kit did not write there
    (its world files and its index cache), so that no file of the user's is ever deleted."""
    params, ours = _synthetic_params(root), set()
    ours = _world_files(params) if params else ours
    for folder, _, files in os.walk(root):
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel not in ours and os.path.dirname(rel) != CACHE_DIR:
                raise KitError(f"{flag} {root} holds {rel}, which this kit did not write: the world there would be "
                               "replaced, so move that file out, or choose another folder")


def _publish_world(tmp, root, params, flag):
    """Move the finished world `tmp` to `root`, replacing an empty folder or a differently-made world of the
    same kind there (checked again now: the folder may have changed during generation, and holds only the kit's
    files). If another process published the same world first, keep theirs."""
    if _synthetic_params(root) == params:
        return
    claim_root(root, flag, params["world"])
    if os.path.isdir(root):
        _check_only_world_files(root, flag)
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


# ============ 2. PASCAL-5i / COCO-20i from the official downloads (PROTOCOL.md 2) ============
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
        json.dump({"dataset": kind, "made_by": f"prepare_data.py {kind}"}, f)
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
        raise KitError('pascal reads SBD .mat files with scipy: pip install scipy, '
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
        raise KitError('pascal needs --sbd benchmark_RELEASE/dataset or --aug DIR')
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
        raise KitError('coco needs pycocotools: pip install pycocotools')
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


# ============ 3. verify, and the command line ============
EXPECTED_FOLDS = {  # BAM's released fss lists (PROTOCOL.md 2.4), PASCAL-5i, 5953-image pool, 2048-pixel rule
    ("pascal", "oslsm"): {"train": [4208, 3726, 2752, 4510], "val": [364, 445, 592, 336]}}


def bad_files(root, ids, n_classes, workers=4):
    """Decode every image in full and read every mask; one line per bad file (all of them, not the first)."""
    def problems(i):
        try:
            check_image_file(root, i, read_mask(root, i, n_classes).shape, full=True)
        except KitError as e:
            return str(e)
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [p for p in pool.map(problems, ids) if p]


def verify(dataset, root, min_pixels, train_pool="aug", coco_split="interleaved", workers=2):
    """Per fold: images of the training list (BAM: novel-containing dropped; PFENet: kept) and of the val list,
    and per class the support pool sizes after the pixel rule (PROTOCOL.md 3.1). Returns the numbers."""
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


def parser(dataset):
    """The command line; verify's defaults (pixel rule, pool) are those of `dataset`."""
    p = KitParser(description="the BCPT kit's data stage: build and check the data roots")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", help="write a synthetic benchmark world (VOC layout)")
    s.add_argument("--dataset", default="synthetic", choices=list(WORLDS), help="which world (default %(default)s)")
    s.add_argument("--out", help="(default: " + ", ".join(f"{w} {r}" for w, r in SYNTHETIC_ROOTS.items()) + ")")
    for flag, kind, what in (("--n-train", POSITIVE, "training images"), ("--n-val", POSITIVE, "val images"),
                             ("--size", SIZE, "image side in pixels")):
        key = flag[2:].replace("-", "_")
        s.add_argument(flag, type=kind, help=f"{what} (default: " + ", ".join(
            f"{w} {spec[key]}" for w, spec in WORLDS.items()) + ")")
    s.add_argument("--seed", type=int, default=0, help="world seed (default %(default)s)")
    s = sub.add_parser("pascal", help="PASCAL VOC2012 + SBD -> SegmentationClassAug and lists")
    s.add_argument("--voc", required=True, help="VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets)")
    s.add_argument("--sbd", help="SBD benchmark_RELEASE/dataset (cls/*.mat, img/, train.txt, val.txt); needs scipy")
    s.add_argument("--aug", help="an existing SegmentationClassAug folder, instead of --sbd")
    s.add_argument("--train-noval", help="SBD's published train_noval.txt (5623 ids), for the 5953-image pool")
    s.add_argument("--out", required=True, help="a new or empty folder (or this command's earlier output)")
    s = sub.add_parser("coco", help="COCO2014 instances -> one class-index PNG per image and lists")
    s.add_argument("--coco", required=True, help="folder with annotations/, train2014/, val2014/; needs pycocotools")
    s.add_argument("--out", required=True, help="a new or empty folder (or this command's earlier output)")
    s = add_data_args(sub.add_parser("verify", help="decode everything, list bad files, print per-fold pool sizes"),
                      dataset, "verify")
    s.add_argument("--workers", type=POSITIVE, default=4, help="threads (default %(default)s)")
    return p


def main(argv=None):
    argv = list(argv or [])
    a = parser(dataset_of(argv)).parse_args(argv)
    made = a.command == "verify" and a.data_root and (_prepared_kind(a.data_root) or
                                                      (_synthetic_params(a.data_root) or {}).get("world"))
    if made and made != a.dataset:  # verify a root with the settings of the data it holds
        if typed(argv, "--dataset"):
            raise KitError(f"--dataset {a.dataset}: {a.data_root} holds {made} data (its marker says so); pass "
                           f"--dataset {made} or leave it out")
        a = parser(made).parse_args(argv + ["--dataset", made])
    if a.command == "synthetic":
        out = a.out or SYNTHETIC_ROOTS[a.dataset]
        make_synthetic(out, a.n_train, a.n_val, a.size, a.seed, flag="--out", world=a.dataset)
        print(f"{a.dataset} benchmark at {out}")
    elif a.command == "pascal":
        if not (a.sbd or a.aug):
            raise KitError("pascal needs --sbd benchmark_RELEASE/dataset or --aug SegmentationClassAug")
        prepare_pascal(a.voc, a.sbd, a.out, a.aug, a.train_noval)
    elif a.command == "coco":
        prepare_coco(a.coco, a.out)
    else:
        if a.data_root is None:
            raise KitError(f"verify --dataset {a.dataset} needs --data-root ROOT")
        verify(a.dataset, a.data_root, a.min_pixels, a.train_pool, a.coco_split, a.workers)


if __name__ == "__main__":
    run(main)
