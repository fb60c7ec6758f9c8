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
import colorsys
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import torch
from PIL import Image

from common import (CACHE_DIR, IGNORE, IMAGES, LISTS, MASKS, N_CLASSES, SYNTHETIC_ROOTS, KitError, base_classes,
                    at_query_size, check_image_file, class_pixel_counts, image_pools, novel_classes, read_list,
                    read_mask, test_transform)
from plumbing import POSITIVE, SIZE, KitParser, add_data_args, autocast_call, dataset_of, is_main, run, typed

# ============ 1. The synthetic benchmarks: seeded worlds in the VOC layout, drawn with numpy alone ============
# Every pixel is float64 numpy arithmetic on a seeded numpy Generator (colours through the standard library's
# colorsys), so a world is the same on every machine and library version; OpenCV only encodes the files. Its
# checksum (the decoded pixels and labels of every file) is printed, kept in the world's marker, and recorded in
# args.json and every results file, so a number says which world it was measured on.

# ---- 1a. Drawing primitives ----
@functools.lru_cache(maxsize=8)
def _grid(size):
    """Pixel-centre coordinates (y, x), each (size, size) float64."""
    return tuple(np.mgrid[:size, :size].astype(np.float64))


def _inside(polys, size):
    """Boolean (size, size) mask of the pixel centres inside any of the polygons ((n, 2) arrays of x, y), each
    filled by the even-odd rule (computed in each polygon's bounding box)."""
    mask = np.zeros((size, size), bool)
    for p in polys:
        (x0, y0), (x1, y1) = np.clip(np.floor(p.min(0)), 0, size).astype(int), np.clip(np.ceil(p.max(0)) + 1, 0,
                                                                                      size).astype(int)
        y, x = (g[y0:y1, x0:x1] for g in _grid(size))
        inside = np.zeros(y.shape, bool)
        for (ax, ay), (bx, by) in zip(p, np.roll(p, -1, 0)):
            inside ^= ((ay > y) != (by > y)) & (x < ax + (y - ay) * (bx - ax) / (by - ay + (by == ay)))
        mask[y0:y1, x0:x1] |= inside
    return mask


def _upsample(grid, h, w=None):
    """A small (gh, gw) grid smoothly interpolated (smoothstep between cell centres) to (h, w)."""
    w = w or h

    def axis(n, k):
        c = np.clip((np.arange(n) + .5) * k / n - .5, 0, k - 1)
        i = np.minimum(np.floor(c).astype(int), k - 2) if k > 1 else np.zeros(n, int)
        f = c - i
        return i, np.minimum(i + 1, k - 1), f * f * (3 - 2 * f)
    (i0, i1, fy), (j0, j1, fx) = axis(h, grid.shape[0]), axis(w, grid.shape[1])
    rows = grid[i0] * (1 - fy)[:, None] + grid[i1] * fy[:, None]  # (h, gw)
    return rows[:, j0] * (1 - fx) + rows[:, j1] * fx  # (h, w)


def _blur(img, sigma):
    """Separable Gaussian blur of an (H, W, ...) array, reflected at the borders."""
    r = int(math.ceil(3 * sigma))
    k = np.exp(-np.arange(-r, r + 1) ** 2 / (2 * sigma * sigma))
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(img.ndim)]
        p, n = np.pad(img, pad, mode="reflect"), img.shape[axis]
        img = sum(k[j] * np.take(p, np.arange(j, j + n), axis=axis) for j in range(2 * r + 1))
    return img


def _hsv(h, s, v):
    """RGB (3,) float64 in 0..255 from hue, saturation, value in 0..1 (hue wraps)."""
    return 255 * np.array(colorsys.hsv_to_rgb(h % 1, min(max(s, 0), 1), min(max(v, 0), 1)))


def _jitter(rng, rgb, val=(.75, 1.1)):
    """A colour with per-draw jitter: hue +-0.03, saturation x0.8-1.1, brightness x`val`."""
    h, s, v = colorsys.rgb_to_hsv(*(np.array(rgb) / 255))
    return _hsv(h + rng.uniform(-.03, .03), s * rng.uniform(.8, 1.1), v * rng.uniform(*val))


def _spread(m):
    """3 x 3 dilation of a boolean mask."""
    p = np.pad(m, 1)
    return np.any([p[i:i + m.shape[0], j:j + m.shape[1]] for i in range(3) for j in range(3)], 0)


def _finish(rng, img, inst, classes, blur):
    """Instance map (H, W) -> VOC label map with a void band (255) along each visible object outline; the image
    gets a mild blur and noise. -> (uint8 RGB image, uint8 label map)."""
    lab = np.concatenate([[0], np.asarray(classes) + 1]).astype(np.uint8)[inst]  # instance id -> class label
    for k in np.unique(inst[inst > 0]):  # a 1-2 px void band along each visible outline, as VOC's
        mk = inst == k
        lab[_spread(mk) & _spread(~mk)] = 255
    img = _blur(img, blur) + 3 * rng.standard_normal(img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), lab


def _place(polys, scale, cx, cy, angle, aspect):
    """Unit-frame polygons stretched by aspect, rotated, scaled and moved to (cx, cy)."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    return [(p * [aspect, 1 / aspect]) @ rot.T * scale + [cx, cy] for p in polys]


def _frame(size, cx, cy, scale, angle):
    """The object's own frame (u, v) at every pixel, in units of its scale."""
    y, x = _grid(size)
    c, s = math.cos(angle) / scale, math.sin(angle) / scale
    return (x - cx) * c + (y - cy) * s, (y - cy) * c - (x - cx) * s


# ---- 1b. The first world, synthetic: many small shape classes on textured stuff ----
# Base RGB colours; each is shared by 2-3 classes, so colour alone never identifies a class.
COLOURS = dict(red=(200, 40, 40), green=(50, 165, 60), blue=(45, 75, 205), yellow=(225, 200, 45),
               purple=(140, 55, 175), orange=(235, 130, 35), cyan=(45, 190, 200), white=(225, 225, 220))
# Class k+1 is "colour_shape_texture": every shape is used twice, colours and textures repeat.
SYNTHETIC_CLASS_NAMES = """red_circle_solid blue_circle_striped green_square_checker yellow_square_dots
blue_triangle_solid orange_triangle_checker purple_ellipse_striped red_ellipse_dots yellow_star_solid
cyan_star_striped white_cross_checker green_cross_solid orange_ring_dots purple_ring_solid
cyan_diamond_checker red_diamond_striped blue_hexagon_dots yellow_hexagon_checker
green_crescent_striped white_crescent_dots""".split()
CLASSES = [tuple(name.split("_")) for name in SYNTHETIC_CLASS_NAMES]  # (colour, shape, texture)
TEXTURES = ("solid", "striped", "checker", "dots")


def _ngon(n, r=1.0, phase=np.pi / 2):
    """Regular n-gon (n x 2 array) of radius r; many sides approximate a circle."""
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), -r * np.sin(a)], 1)


_CIRC = _ngon(48)
_BAR = np.array([(-1, -.33), (1, -.33), (1, .33), (-1, .33)])  # a cross is two crossing bars
# Unit-frame polygons per shape: (filled polygons, holes cut out afterwards).
SHAPES = {"circle": ([_CIRC], []), "ellipse": ([_CIRC * [1, .55]], []),
          "square": ([_ngon(4, 1.2, np.pi / 4)], []), "triangle": ([_ngon(3, 1.25)], []),
          "diamond": ([_ngon(4) * [.65, 1.1]], []), "hexagon": ([_ngon(6)], []),
          "star": ([_ngon(10, 1.15) * np.tile([[1.0], [.42]], (5, 1))], []),
          "cross": ([_BAR, _BAR[:, ::-1]], []),
          "ring": ([_CIRC], [_CIRC * .55]), "crescent": ([_CIRC - [.2, 0]], [_CIRC * .85 + [.25, -.15]])}


def _shape_mask(shape, size, *pose):
    """Boolean mask of a shape at pose (scale, cx, cy, angle, aspect): its polygons less its holes."""
    filled, holes = SHAPES[shape]
    return _inside(_place(filled, *pose), size) & ~_inside(_place(holes, *pose), size)


_UNIT_AREA = {s: float(_shape_mask(s, 200, 50, 100, 100, 0, 1).sum()) / 2500 for s in SHAPES}  # area at scale 1


def _object_texture(rng, look, size, cx, cy, r, angle):
    """Float RGB image of a look (colour, shape, texture) laid out in the object's own rotated, scaled frame."""
    colour, _, tex = look
    base = _jitter(rng, COLOURS[colour])
    u, v = _frame(size, cx, cy, .45 * r, angle)  # in pattern periods
    on = {"striped": lambda: u % 1 < .5, "checker": lambda: (np.floor(u) + np.floor(v)) % 2 == 0,
          "dots": lambda: (u % 1 - .5) ** 2 + (v % 1 - .5) ** 2 > .09, "solid": lambda: True}[tex]()
    d, grain = rng.uniform(0, 2 * math.pi), (.05 if tex == "solid" else .02) * rng.standard_normal((size, size))
    shade = 1 + .08 * (u * math.cos(d) + v * math.sin(d)) + grain  # directional light, like a 3-D object
    return np.where(on, shade, .35 * shade)[..., None] * base


def _bg_texture(rng, size):
    """One background 'stuff' texture: gradient, low/fine noise, grass streaks or bricks."""
    hue, sat, val = rng.uniform(0, 1), rng.uniform(.06, .6), rng.uniform(.2, .86)  # overlaps the objects' colours
    c1 = _hsv(hue, sat, val)
    c2 = _hsv(hue + rng.uniform(-.08, .08), sat + rng.uniform(-.16, .16), val + rng.uniform(-.35, .35))
    (y, x), kind = _grid(size), rng.integers(5)
    if kind == 0:  # smooth gradient
        a = rng.uniform(0, 2 * math.pi)
        t = (x * math.cos(a) + y * math.sin(a)) / size / 1.5 + .5
    elif kind == 1:  # low-frequency noise
        t = _upsample(rng.random((4, 4)), size)
    elif kind == 2:  # fine noise over a soft ramp
        t = .6 * rng.random((size, size)) + .4 * _upsample(rng.random((3, 3)), size)
    elif kind == 3:  # grass-like vertical streaks
        t = .8 * _upsample(rng.random((max(size // 8, 2), size)), size) + .2 * rng.random((size, size))
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
    region = (y > horizon).astype(int)
    if rng.random() < .5:  # blob: thresholded low-frequency noise
        blob = _upsample(rng.random((3, 3)), size)
        region[blob > np.quantile(blob, rng.uniform(.6, .85))] = 2
    img = np.zeros((size, size, 3))
    for k in np.unique(region):
        img[region == k] = _bg_texture(rng, size)[region == k]
    return img


def _distractor(rng, classes, parts):
    """A look that is no class: the cues of the world, recombined (the stand-in's unlabelled objects)."""
    while True:
        look = tuple(p[rng.integers(len(p))] for p in parts)
        if look not in classes:
            return look


def _render(rng, size, distractors=0):
    """One image with 1-4 objects (and, for the stand-in, `distractors` unlabelled ones); later objects occlude
    earlier ones. -> (uint8 RGB image, uint8 VOC label map)."""
    img, inst = _background(rng, size), np.zeros((size, size), int)
    classes = list(rng.integers(0, 20, rng.choice([1, 2, 3, 4], p=[.3, .3, .25, .15])))
    looks = [CLASSES[c] for c in classes] + [_distractor(rng, CLASSES, (list(COLOURS), list(SHAPES), TEXTURES))
                                             for _ in range(distractors)]
    order = rng.permutation(len(looks))  # distractors may lie over or under the objects
    for k in order:
        shape = looks[k][1]
        area = rng.uniform(.08, .3) if rng.random() < .8 else rng.uniform(.02, .08)
        r = math.sqrt(area * size * size / _UNIT_AREA[shape])
        cx, cy = rng.uniform(.6 * r, size - .6 * r), rng.uniform(.6 * r, size - .6 * r)  # may touch the border
        angle, aspect = rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-.25, .25))
        m = _shape_mask(shape, size, r, cx, cy, angle, aspect)
        img[m] = _object_texture(rng, looks[k], size, cx, cy, r, angle)[m]
        inst[m] = k + 1 if k < len(classes) else 0
    return _finish(rng, img, inst, classes, blur=.6)


# ---- 1c. The second world, synthetic2: other statistics, for a claim to be checked beyond one world ----
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


_UNIT_AREA2 = {s: float(_inside(_place(_parts2(s), 50, 100, 100, 0, 1), 200).sum()) / 2500 for s in SHAPES2}


def _object_texture2(rng, look, size, cx, cy, scale, angle):
    """Float RGB two-tone texture of a look (shape, tone pair, texture) in the object's own frame."""
    _, (name1, name2), tex = look
    u, v = _frame(size, cx, cy, scale, angle)
    rho = np.sqrt(u * u + v * v)
    if tex == "stripes":  # grating along the object's axis, about 3 periods per unit
        t = np.sin(u * rng.uniform(17, 21) + rng.uniform(0, 6.3)) > 0
    elif tex == "rings":  # concentric bands around the object centre
        t = np.sin(rho * rng.uniform(13, 16)) > 0
    elif tex == "spots":  # 8 random discs of the second tone
        p = rng.uniform(-.9, .9, (8, 2, 1, 1))
        t = ((u - p[:, 0]) ** 2 + (v - p[:, 1]) ** 2).min(0) < rng.uniform(.03, .05)
    elif tex == "radial":  # smooth gradient from the first tone at the centre to the second at the rim
        t = np.clip(rho, 0, 1)
    else:  # halves: first tone on one side of the long axis, second on the other, soft border
        t = 1 / (1 + np.exp(-12 * (v - rng.uniform(-.2, .2))))
    a, b = _jitter(rng, PALETTE2[name1], (.7, 1.1)), _jitter(rng, PALETTE2[name2], (.7, 1.1))
    d = rng.uniform(0, 2 * math.pi)
    shade = 1 + .1 * (u * math.cos(d) + v * math.sin(d)) + .03 * rng.standard_normal((size, size))
    return (a + (b - a) * np.asarray(t, float)[..., None]) * shade[..., None]


def _bg_colour(rng):
    """Background colour: half the time a palette tone (so colour never separates objects), else any."""
    if rng.random() < .5:
        return _jitter(rng, list(PALETTE2.values())[rng.integers(len(PALETTE2))], (.7, 1.1))
    return _hsv(rng.uniform(0, 1), rng.uniform(.08, .67), rng.uniform(.24, .88))


def _clouds(rng, size):
    """Multi-octave value noise in [0, 1]: random grids of 3, 6, 12, 24 cells, amplitude halving."""
    t = sum(.5 ** k * _upsample(rng.random((3 << k, 3 << k)), size) for k in range(4))
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
        seeds, cols = rng.uniform(0, size, (n, 2, 1, 1)), [_bg_colour(rng) for _ in range(n)]
        wob = .15 * size * (_clouds(rng, size) - .5)
        img = np.array(cols)[((x + wob - seeds[:, 0]) ** 2 + (y - wob - seeds[:, 1]) ** 2).argmin(0)]
    img = img * (.8 + .4 * _clouds(rng, size))[..., None]  # soft light variation over every kind
    for _ in range(rng.integers(3, 12)):  # clutter: short strokes and dots, labelled background
        p, col = rng.uniform(0, size, 2), _bg_colour(rng)
        if rng.random() < .5:  # a stroke: the pixels within 0.6 px of a 4-12 px segment
            a = rng.uniform(0, 2 * math.pi)
            d = np.array([math.cos(a), math.sin(a)])
            s = np.clip((x - p[0]) * d[0] + (y - p[1]) * d[1], 0, rng.uniform(4, 12))
            img[(x - p[0] - s * d[0]) ** 2 + (y - p[1] - s * d[1]) ** 2 <= .36] = col
        else:  # a dot of radius 1-2 px
            img[(x - p[0]) ** 2 + (y - p[1]) ** 2 <= rng.integers(1, 3) ** 2] = col
    return img


def _render2(rng, size, distractors=0):
    """One image with 1-2 large objects (and, for the stand-in, `distractors` unlabelled ones). -> (uint8 RGB
    image, uint8 VOC label map)."""
    img, inst = _background2(rng, size), np.zeros((size, size), int)
    classes = list(rng.choice(20, 1 if rng.random() < .55 else 2, replace=False))  # 55% one object, 45% two
    pairs = sorted({c[1] for c in CLASSES2})
    looks = [CLASSES2[c] for c in classes] + [_distractor(rng, CLASSES2, (list(SHAPES2), pairs, ("stripes", "rings",
                                              "spots", "radial", "halves"))) for _ in range(distractors)]
    prev = []
    for k in rng.permutation(len(looks)):  # later objects occlude earlier ones
        scale = math.sqrt(rng.uniform(.12, .4) * size * size / _UNIT_AREA2[looks[k][0]])  # 12-40% of the image
        cand = rng.uniform(.2 * size, .8 * size, (8, 2))  # may cross the border; each next object goes to the
        far = np.min([((cand - q) ** 2).sum(1) for q in prev], 0) if prev else np.zeros(8)  # farthest candidate
        (cx, cy), angle, aspect = cand[np.argmax(far)], rng.uniform(0, 2 * math.pi), math.exp(rng.uniform(-.2, .2))
        prev.append((cx, cy))
        m = _inside(_place(_parts2(looks[k][0], rng), scale, cx, cy, angle, aspect), size)
        img[m] = _object_texture2(rng, looks[k], size, cx, cy, scale, angle)[m]
        inst[m] = k + 1 if k < len(classes) else 0
    return _finish(rng, img, inst, classes, blur=.7)


# ---- 1d. Writing a world: the benchmark, or its ImageNet stand-in ----
SYNTHETIC_MARKER = ".complete"  # written into a finished synthetic world: its parameters and checksum (JSON)
PREPARED_MARKER = ".prepared.json"  # written by the pascal / coco commands into their --out
# The worlds, their renderers and default sizes. kind "benchmark": train and val images of the few-shot benchmark;
# kind "standin": the companion root of the ImageNet stand-in (pretrain_bcpt.py --method generic), the world's
# classes on other images (another seed stream), each with 1-2 unlabelled distractors, no val images.
WORLDS = {"synthetic": dict(render=_render, n_train=1200, n_val=400, size=64),
          "synthetic2": dict(render=_render2, n_train=1200, n_val=400, size=64)}
STANDIN = dict(n_train=1200, n_val=0)


def _synthetic_params(root):
    """The marker of a finished world at root (world, kind, n_train, n_val, size, seed, checksum), or None. A
    marker from before the second world names none: it is the first; one from before the stand-in, a benchmark."""
    try:
        with open(os.path.join(root, SYNTHETIC_MARKER)) as f:
            params = json.load(f)
        if isinstance(params, dict) and {"n_train", "n_val", "size", "seed"} <= set(params):
            return {"world": "synthetic", "kind": "benchmark", "checksum": None, **params}
    except (OSError, ValueError):
        pass
    return None


def _same_world(root, params):
    made = _synthetic_params(root)
    return made is not None and {k: made[k] for k in params} == params


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


def ensure_synthetic(root, world="synthetic", kind="benchmark"):
    """What a stage calls on --dataset synthetic / synthetic2: a finished world of that kind at root is used as
    it is (of any size); no world there: the default one is generated (make_synthetic refuses a foreign folder);
    a world of the other kind: refused, naming both. The stand-in may be any VOC-layout root. -> its marker, or
    None for a root the kit did not make."""
    params = _synthetic_params(root)
    if params is None and kind == "standin" and os.path.isdir(os.path.join(root, IMAGES)):
        return None  # the user's own images stand in for ImageNet
    if params is None:
        make_synthetic(root, world=world, kind=kind)
        return _synthetic_params(root)
    if params["world"] != world:
        raise KitError(f"--data-root {root} holds the {params['world']} world, not {world}: pass --dataset "
                       f"{params['world']}, or the --data-root of a {world} world (default {SYNTHETIC_ROOTS[world]})")
    if kind == "benchmark" and params["kind"] != kind:
        raise KitError(f"--data-root {root} holds the ImageNet stand-in of {world}, which has no val images: pass "
                       f"the benchmark's --data-root (default {SYNTHETIC_ROOTS[world]})")
    return params


def make_synthetic(root, n_train=None, n_val=None, size=None, seed=0, flag="--data-root", world="synthetic",
                   kind="benchmark"):
    """Write a synthetic world (WORLDS, STANDIN; sizes default to the world's) to `root` in VOC layout; return root.
    Idempotent: if root holds that world with the same parameters, return at once. Only a missing or empty
    folder, or a world of the same kind this kit made, is (re)written (claim_root). The world is written to a
    private temporary folder and published with one rename, so runs started side by side never read a
    half-written world."""
    spec = {**WORLDS[world], **(STANDIN if kind == "standin" else {})}
    n_train, n_val, size = n_train or spec["n_train"], spec["n_val"] if n_val is None else n_val, size or spec["size"]
    params = dict(world=world, kind=kind, n_train=n_train, n_val=n_val, size=size, seed=seed)
    if _same_world(root, params):
        return root
    claim_root(root, flag, world)
    if os.path.isdir(root):
        _check_only_world_files(root, flag)
    parent, name = os.path.split(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    t0, checksum = time.time(), hashlib.sha256()
    what = f"{world}{' ImageNet stand-in' * (kind == 'standin')}"
    print(f"{what}: drawing {n_train} + {n_val} images of {size} px into {root} ...", flush=True)
    try:
        dirs = [os.path.join(tmp, d) for d in (IMAGES, MASKS, LISTS)]
        for d in dirs:
            os.makedirs(d)
        splits = [("train", 2 if kind == "standin" else 0, n_train), ("val", 1, n_val)]  # disjoint seed streams
        for split, stream, n in splits:
            for i in range(n):
                rng = np.random.default_rng([seed, stream, i])
                img, lab = spec["render"](rng, size, int(rng.integers(1, 3)) if kind == "standin" else 0)
                jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])[1]
                jpg.tofile(os.path.join(dirs[0], f"{split}_{i:06d}.jpg"))
                cv2.imwrite(os.path.join(dirs[1], f"{split}_{i:06d}.png"), lab)
                checksum.update(cv2.imdecode(jpg, cv2.IMREAD_COLOR).tobytes() + lab.tobytes())  # what stages read
        with open(os.path.join(dirs[2], "val.txt"), "w") as f:
            f.writelines(f"val_{i:06d}\n" for i in range(n_val))
        params["checksum"] = checksum.hexdigest()[:16]
        with open(os.path.join(tmp, SYNTHETIC_MARKER), "w") as f:
            json.dump(params, f)
        _publish_world(tmp, root, params, flag)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{what}: done in {time.time() - t0:.0f}s, checksum {params['checksum']}", flush=True)
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
    if _same_world(root, params):
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
        if not _same_world(root, params):
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


# ============ 3. Your own images: any image, every common way of storing a mask ============
_STDERR = threading.Lock()  # one decode at a time may borrow the process's stderr


def read_image(path, fix):
    """An image file decoded in full -> RGB float32 (H, W, 3) in 0..255, refusing what libjpeg only warns about: a
    JPEG damaged in the middle decodes "successfully" into garbage, saying 'Corrupt JPEG data' on stderr."""
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
        raise KitError(f"cannot read image {path}{why}: missing, truncated, corrupt or not an image; {fix}")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB).astype(np.float32)


def read_user_mask(path, image_path, shape):
    """A support mask read as its user means it -> (H, W) uint8: 1 foreground, 0 background, 255 ignored. A palette
    (VOC) PNG: index 0 background, any other index foreground. A transparent PNG: the opaque part. Otherwise 0/1,
    0/255, class indices, grey, RGB: a label image (lossless, a few values) is foreground wherever non-zero; a JPEG or
    one with many values (anti-aliased edges) above half its maximum. 255 beside other non-zero values is void."""
    try:
        with Image.open(path) as im:
            mode, lossy, m = im.mode, im.format == "JPEG", np.array(im)
    except Exception as e:
        raise KitError(f"cannot read mask {path} ({type(e).__name__}): missing, corrupt or not an image") from None
    if m.ndim == 3 and mode in ("RGBA", "LA", "PA") and m[..., -1].min() < m[..., -1].max():
        m = m[..., -1]  # the alpha channel marks the object
    m = m.reshape(m.shape[0], m.shape[1], -1)[..., :3].max(-1)  # (H, W): a colour mask's brightest channel
    labels = mode == "P" or (not lossy and len(np.unique(m)) <= 8)
    mask = ((m > 0) if labels else (m > m.max() / 2)).astype(np.uint8)
    if labels and m.max() == 255 and ((m > 0) & (m < 255)).any():
        mask[m == 255] = IGNORE
    if mask.shape != tuple(shape):
        raise KitError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image {image_path} is "
                       f"{shape[1]}x{shape[0]}: pass the mask made for that image")
    if not (mask == 1).any():
        raise KitError(f"mask {path} has no foreground pixel: mark the object with non-zero values")
    return mask


def own_episodes(supports, queries, test_size, geometry="pfenet"):
    """The user's episodes, every file read before any is predicted: the supports [(image path, mask path)] once,
    then per query (its output name, unique in the run; the item as an evaluation batch of EpisodeDataset, in the
    benchmark's test geometry, PROTOCOL.md 5.1; the query (H, W, 3); the supports [(image, mask)])."""
    fix = "pass an image file"
    pairs = [(img, read_user_mask(m, i, img.shape[:2])) for i, m in supports for img in [read_image(i, fix)]]
    xs = [test_transform(img, m, test_size, geometry) for img, m in pairs]
    support = {"support": torch.stack([x for x, _ in xs])[None], "support_mask": torch.stack([y for _, y in xs])[None]}
    names, episodes = set(), []  # (1, S, 3, s, s), (1, S, s, s)
    for path in queries:
        q, stem = read_image(path, fix), os.path.splitext(os.path.basename(path))[0]
        name = next(n for n in [stem] + [f"{stem}-{k}" for k in range(2, len(queries) + 2)] if n not in names)
        names.add(name)
        xq, _ = test_transform(q, np.zeros(q.shape[:2], np.uint8), test_size, geometry)  # (3, s, s)
        episodes.append((name, {"query": xq[None], **support}, q, pairs))
    return episodes


def write_user_prediction(out, name, query, pred, pairs, heat=None):
    """NAME_mask.png (0/255, the query's size) and NAME_overlay.png (the query with the prediction tinted, the
    supports with their masks beside it, Fig. 2 style); NAME_prior.png from `heat` (H, W) in [0, 1] if given."""
    os.makedirs(out, exist_ok=True)
    h = query.shape[0]
    tint = lambda img, m, colour: np.where(m[..., None] == 1, 0.45 * img + 0.55 * np.array(colour), img)
    panels = [tint(query[:, :, ::-1], pred, (255, 80, 0))] + [  # BGR
        cv2.resize(tint(img[:, :, ::-1], m, (0, 200, 255)), (max(1, round(img.shape[1] * h / img.shape[0])), h),
                   interpolation=cv2.INTER_AREA) for img, m in pairs]
    cv2.imwrite(os.path.join(out, f"{name}_mask.png"), (255 * pred).astype(np.uint8))
    cv2.imwrite(os.path.join(out, f"{name}_overlay.png"), np.clip(np.concatenate(panels, 1), 0, 255).astype(np.uint8))
    if heat is not None:
        cv2.imwrite(os.path.join(out, f"{name}_prior.png"), cv2.applyColorMap((255 * heat).astype(np.uint8),
                                                                             cv2.COLORMAP_JET))
    print(f"wrote {os.path.join(out, name)}_mask.png and _overlay.png" + " and _prior.png" * (heat is not None))


def add_own_image_args(parser):
    """The flags of segment_own_images, in both tests."""
    g = parser.add_argument_group("your own images (no data root, fold or class needed)")
    g.add_argument("--support", nargs=2, action="append", metavar=("IMAGE", "MASK"), help="a support image and its "
                   "mask (0/1, 0/255, palette, RGB or transparent PNG; README 'Your own images'); repeat for shots")
    g.add_argument("--query", nargs="+", metavar="IMAGE", help="images to segment with the --support examples")
    g.add_argument("--out", help="folder for NAME_mask.png and NAME_overlay.png of each --query (with "
                   "evaluate.py --curves: the PNG to write)")
    return parser


def segment_own_images(args, predict, dtype, decide):
    """Each --query segmented with the --support examples (evaluate.py, nonparametric_eval.py), by rank 0:
    predict(item) -> scores on the test canvas, autocast in `dtype`; decide(scores at the query's size) -> (mask, heat
    map or None)."""
    if not (args.support and args.query and args.out):
        raise KitError("your own images need --support IMAGE MASK (once per shot), --query IMAGE... and --out DIR")
    if not is_main():  # under torchrun, rank 0 does it all
        return
    for name, item, query, pairs in own_episodes(args.support, args.query, args.test_size, args.test_geometry):
        scores = autocast_call(torch.device(args.device), dtype, predict, item)  # (1, C, s, s)
        mask, heat = decide(at_query_size(scores, query, args.test_geometry))  # (H, W) each
        write_user_prediction(args.out, name, query, mask, pairs, heat)


# ============ 4. verify, and the command line ============
EXPECTED_FOLDS = {  # BAM's released fss lists (PROTOCOL.md 2.4), PASCAL-5i, 5953-image pool, 2048-pixel rule
    ("pascal", "oslsm"): {"train": [4208, 3726, 2752, 4510], "val": [364, 445, 592, 336]}}


def bad_files(root, ids, n_classes, workers=4):
    """Decode every image in full and read every mask; one line per bad file (all of them, not the first)."""
    def problems(i):
        try:
            check_image_file(root, i, read_mask(root, i, n_classes).shape)
            fix = f"re-extract or re-download it, or drop {i} from the lists"
            read_image(os.path.join(root, IMAGES, i + ".jpg"), fix)
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
