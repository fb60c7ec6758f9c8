"""worlds.py: the built-in synthetic benchmarks ("worlds"), drawn with numpy alone and written in
the VOC layout.

  synthetic   many small shape classes (colour x shape x texture), 1-4 an image, on textured "stuff"
  synthetic2  other statistics, for a claim to be checked beyond one world: 1-2 large two-tone
              blob-shaped objects on clouds / gradients / patchwork, with small non-class clutter

A world has 20 classes; its training images hold objects of every class, so novel objects sit in the
merged background of pre-training (paper Sec. 1). Its companion "stand-in" root (kind standin) is
another draw of the same classes with unlabelled distractors and no val images: the ImageNet
stand-in of pretrain_bcpt.py --method generic.

Every pixel is float64 numpy arithmetic on a seeded numpy Generator (colours through the standard
library's colorsys), so a world is the same on every machine and library version; OpenCV only
encodes the files. Its checksum (the decoded pixels and labels of every file) is printed, kept in
the world's marker, and recorded in args.json and every results file, so a number says which world
it was measured on. The stages draw a world on first use (ensure_synthetic); python prepare_data.py
synthetic draws one with other sizes or another --seed.
"""

import colorsys
import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import tempfile
import time

import cv2
import numpy as np

from common import (
    CACHE_DIR,
    IMAGES,
    LISTS,
    MASKS,
    SYNTHETIC_MARKER,
    SYNTHETIC_ROOTS,
    KitError,
    claim_root,
    world_marker,
)


# ============ 1. Drawing primitives ============
@functools.lru_cache(maxsize=8)  # shared by every draw of one size
def _grid(size):
    """Pixel-centre coordinates (y, x), each (size, size) float64."""
    return tuple(np.mgrid[:size, :size].astype(np.float64))


def _inside(polys, size):
    """Boolean (size, size) mask of the pixel centres inside any of the polygons ((n, 2) arrays of
    x, y), each filled by the even-odd rule (computed in each polygon's bounding box)."""
    mask = np.zeros((size, size), bool)
    for p in polys:
        x0, y0 = np.clip(np.floor(p.min(0)), 0, size).astype(int)
        x1, y1 = np.clip(np.ceil(p.max(0)) + 1, 0, size).astype(int)
        y, x = (g[y0:y1, x0:x1] for g in _grid(size))
        inside = np.zeros(y.shape, bool)
        for (ax, ay), (bx, by) in zip(p, np.roll(p, -1, 0), strict=True):
            # a pixel flips for each edge a-b that spans its row to its right (a flat edge: none)
            spans_row = (ay > y) != (by > y)
            edge_x = ax + (y - ay) * (bx - ax) / (by - ay + (by == ay))
            inside ^= spans_row & (x < edge_x)
        mask[y0:y1, x0:x1] |= inside
    return mask


def _upsample(grid, size):
    """A (gh, gw) grid interpolated smoothly (smoothstep between cell centres) to (size, size)."""

    def axis(n, k):
        c = np.clip((np.arange(n) + 0.5) * k / n - 0.5, 0, k - 1)
        i = np.minimum(np.floor(c).astype(int), k - 2) if k > 1 else np.zeros(n, int)
        f = c - i
        return i, np.minimum(i + 1, k - 1), f * f * (3 - 2 * f)

    i0, i1, fy = axis(size, grid.shape[0])
    j0, j1, fx = axis(size, grid.shape[1])
    rows = grid[i0] * (1 - fy)[:, None] + grid[i1] * fy[:, None]  # (size, gw)
    return rows[:, j0] * (1 - fx) + rows[:, j1] * fx  # (size, size)


def _blur(img, sigma):
    """Separable Gaussian blur of an (H, W, ...) array, reflected at the borders."""
    r = int(math.ceil(3 * sigma))
    k = np.exp(-(np.arange(-r, r + 1) ** 2) / (2 * sigma * sigma))
    k /= k.sum()
    for axis in (0, 1):
        pad = [(r, r) if a == axis else (0, 0) for a in range(img.ndim)]
        padded = np.pad(img, pad, mode="reflect")
        n = img.shape[axis]
        img = sum(k[j] * np.take(padded, np.arange(j, j + n), axis=axis) for j in range(2 * r + 1))
    return img


def _hsv(h, s, v):
    """RGB (3,) float64 in 0..255 from hue, saturation, value in 0..1 (hue wraps)."""
    return 255 * np.array(colorsys.hsv_to_rgb(h % 1, min(max(s, 0), 1), min(max(v, 0), 1)))


def _jitter(rng, rgb, val=(0.75, 1.1)):
    """A colour with per-draw jitter: hue +-0.03, saturation x0.8-1.1, brightness x`val`."""
    h, s, v = colorsys.rgb_to_hsv(*(np.array(rgb) / 255))
    return _hsv(h + rng.uniform(-0.03, 0.03), s * rng.uniform(0.8, 1.1), v * rng.uniform(*val))


def _shade(rng, u, v, slope, grain):
    """Brightness over an object's own frame (u, v): light from a random direction, so the object
    looks 3-D, plus per-pixel grain of std `grain`."""
    d = rng.uniform(0, 2 * math.pi)
    return 1 + slope * (u * math.cos(d) + v * math.sin(d)) + grain * rng.standard_normal(u.shape)


def _spread(m):
    """3 x 3 dilation of a boolean mask."""
    h, w = m.shape
    p = np.pad(m, 1)  # False beyond the border
    return np.any([p[i : i + h, j : j + w] for i in range(3) for j in range(3)], 0)


def _finish(rng, img, inst, classes, blur):
    """Instance map (H, W) -> VOC label map with a void band (255) along each visible object
    outline; the image gets a mild blur and noise. -> (uint8 RGB image, uint8 label map)."""
    label_of = np.concatenate([[0], np.asarray(classes) + 1]).astype(np.uint8)  # per instance id
    lab = label_of[inst]
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


def _distractor(rng, classes, cues):
    """A look that is no class: the world's cues recombined (the stand-in's unlabelled objects)."""
    while True:
        look = tuple(p[rng.integers(len(p))] for p in cues)
        if look not in classes:
            return look


# ============ 2. The first world, synthetic: small shape classes on textured stuff ============
# Base RGB colours; each is shared by 2-3 classes, so colour alone never identifies a class.
COLOURS = dict(
    red=(200, 40, 40),
    green=(50, 165, 60),
    blue=(45, 75, 205),
    yellow=(225, 200, 45),
    purple=(140, 55, 175),
    orange=(235, 130, 35),
    cyan=(45, 190, 200),
    white=(225, 225, 220),
)
# Classes 1-20, four a row, "colour_shape_texture": shapes used twice, colours and textures repeat.
CLASS_TABLE = """
    red_circle_solid       blue_circle_striped      green_square_checker     yellow_square_dots
    blue_triangle_solid    orange_triangle_checker  purple_ellipse_striped   red_ellipse_dots
    yellow_star_solid      cyan_star_striped        white_cross_checker      green_cross_solid
    orange_ring_dots       purple_ring_solid        cyan_diamond_checker     red_diamond_striped
    blue_hexagon_dots      yellow_hexagon_checker   green_crescent_striped   white_crescent_dots
"""
SYNTHETIC_CLASS_NAMES = CLASS_TABLE.split()
CLASSES = [tuple(name.split("_")) for name in SYNTHETIC_CLASS_NAMES]  # (colour, shape, texture)
TEXTURES = ("solid", "striped", "checker", "dots")


def _ngon(n, r=1.0, phase=np.pi / 2):
    """Regular n-gon (n x 2 array) of radius r; many sides approximate a circle."""
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(a), -r * np.sin(a)], 1)


_CIRC = _ngon(48)
_BAR = np.array([(-1, -0.33), (1, -0.33), (1, 0.33), (-1, 0.33)])  # a cross is two crossing bars
# Unit-frame polygons per shape: (filled polygons, holes cut out afterwards).
SHAPES = {
    "circle": ([_CIRC], []),
    "ellipse": ([_CIRC * [1, 0.55]], []),
    "square": ([_ngon(4, 1.2, np.pi / 4)], []),
    "triangle": ([_ngon(3, 1.25)], []),
    "diamond": ([_ngon(4) * [0.65, 1.1]], []),
    "hexagon": ([_ngon(6)], []),
    "star": ([_ngon(10, 1.15) * np.tile([[1.0], [0.42]], (5, 1))], []),
    "cross": ([_BAR, _BAR[:, ::-1]], []),
    "ring": ([_CIRC], [_CIRC * 0.55]),
    "crescent": ([_CIRC - [0.2, 0]], [_CIRC * 0.85 + [0.25, -0.15]]),
}


def _shape_mask(shape, size, *pose):
    """Boolean mask of a shape at pose (scale, cx, cy, angle, aspect): its polygons less holes."""
    filled, holes = SHAPES[shape]
    return _inside(_place(filled, *pose), size) & ~_inside(_place(holes, *pose), size)


# area at scale 1, measured at scale 50 on a 200 px canvas
_UNIT_AREA = {s: float(_shape_mask(s, 200, 50, 100, 100, 0, 1).sum()) / 2500 for s in SHAPES}


def _object_texture(rng, look, size, cx, cy, r, angle):
    """Float RGB image of a look (colour, shape, texture) in the object's rotated, scaled frame."""
    colour, _, tex = look
    base = _jitter(rng, COLOURS[colour])
    u, v = _frame(size, cx, cy, 0.45 * r, angle)  # in pattern periods
    on = {  # where the pattern shows the base colour; elsewhere it is darker
        "striped": u % 1 < 0.5,
        "checker": (np.floor(u) + np.floor(v)) % 2 == 0,
        "dots": (u % 1 - 0.5) ** 2 + (v % 1 - 0.5) ** 2 > 0.09,
        "solid": True,
    }[tex]
    shade = _shade(rng, u, v, 0.08, 0.05 if tex == "solid" else 0.02)
    return np.where(on, shade, 0.35 * shade)[..., None] * base


def _bg_texture(rng, size):
    """One background 'stuff' texture: gradient, low/fine noise, grass streaks or bricks."""
    # two tones near each other, anywhere in hue and brightness: they overlap the objects' colours
    hue, sat, val = rng.uniform(0, 1), rng.uniform(0.06, 0.6), rng.uniform(0.2, 0.86)
    c1 = _hsv(hue, sat, val)
    dh, ds, dv = rng.uniform(-0.08, 0.08), rng.uniform(-0.16, 0.16), rng.uniform(-0.35, 0.35)
    c2 = _hsv(hue + dh, sat + ds, val + dv)
    y, x = _grid(size)
    kind = rng.integers(5)
    if kind == 0:  # smooth gradient
        a = rng.uniform(0, 2 * math.pi)
        t = (x * math.cos(a) + y * math.sin(a)) / size / 1.5 + 0.5
    elif kind == 1:  # low-frequency noise
        t = _upsample(rng.random((4, 4)), size)
    elif kind == 2:  # fine noise over a soft ramp
        t = 0.6 * rng.random((size, size)) + 0.4 * _upsample(rng.random((3, 3)), size)
    elif kind == 3:  # grass-like vertical streaks
        streaks = _upsample(rng.random((max(size // 8, 2), size)), size)
        t = 0.8 * streaks + 0.2 * rng.random((size, size))
    else:  # bricks: staggered rows with dark mortar lines
        bh = int(rng.integers(6, 12))  # brick height; bricks are 2 * bh wide
        row = y // bh
        xs = x + (y // bh % 2) * bh  # every other row shifted by half a brick
        shade = 0.6 + 0.4 * np.sin(row * 7.3 + xs // (2 * bh) * 3.1) ** 2  # pseudo-random per brick
        t = np.where((y % bh < 1.5) | (xs % (2 * bh) < 1.5), 0, shade)
    return c1 + (c2 - c1) * np.clip(t, 0, 1)[..., None]


def _background(rng, size):
    """Background of 2-3 regions (wavy tilted horizon plus optional blob), each its own texture."""
    y, x = _grid(size)
    horizon = (
        size * rng.uniform(0.25, 0.75)
        + (x - size / 2) * rng.uniform(-0.5, 0.5)
        + rng.uniform(1, 5) * np.sin(x / rng.uniform(4, 12) + rng.uniform(0, 6))
    )
    region = (y > horizon).astype(int)
    if rng.random() < 0.5:  # blob: thresholded low-frequency noise
        blob = _upsample(rng.random((3, 3)), size)
        region[blob > np.quantile(blob, rng.uniform(0.6, 0.85))] = 2
    img = np.zeros((size, size, 3))
    for k in np.unique(region):
        img[region == k] = _bg_texture(rng, size)[region == k]
    return img


def _render(rng, size, distractors=0):
    """One image with 1-4 objects (and, for the stand-in, `distractors` unlabelled ones); later
    objects occlude earlier ones. -> (uint8 RGB image, uint8 VOC label map)."""
    img = _background(rng, size)
    inst = np.zeros((size, size), int)
    n_objects = rng.choice([1, 2, 3, 4], p=[0.3, 0.3, 0.25, 0.15])
    classes = list(rng.integers(0, 20, n_objects))
    looks = [CLASSES[c] for c in classes]
    cues = (list(COLOURS), list(SHAPES), TEXTURES)
    looks += [_distractor(rng, CLASSES, cues) for _ in range(distractors)]
    for k in rng.permutation(len(looks)):  # distractors may lie over or under the objects
        shape = looks[k][1]
        area = rng.uniform(0.08, 0.3) if rng.random() < 0.8 else rng.uniform(0.02, 0.08)
        r = math.sqrt(area * size * size / _UNIT_AREA[shape])
        cx, cy = rng.uniform(0.6 * r, size - 0.6 * r, 2)  # may touch the border
        angle = rng.uniform(0, 2 * math.pi)
        aspect = math.exp(rng.uniform(-0.25, 0.25))
        m = _shape_mask(shape, size, r, cx, cy, angle, aspect)
        img[m] = _object_texture(rng, looks[k], size, cx, cy, r, angle)[m]
        inst[m] = k + 1 if k < len(classes) else 0
    return _finish(rng, img, inst, classes, blur=0.6)


# ============ 3. The second world, synthetic2: other statistics ============
# For a claim to be checked beyond one world: 1-2 large objects per image with smooth Fourier-blob
# or compound outlines, two-tone colour pairs laid out by a class texture, on cloud / gradient /
# patchwork backgrounds with small non-class clutter.
# Five tones; every class has two (all 10 pairs, each pair used by 2 classes, each tone by 8).
PALETTE2 = dict(
    red=(205, 55, 45),
    gold=(225, 175, 40),
    green=(60, 155, 75),
    blue=(50, 95, 205),
    pink=(200, 90, 175),
)
# Classes 1-20, two a row: shape family, colour pair (first tone / second tone), texture. Each shape
# is used by 2 classes, each pair by 2, each texture by 4; any two classes share at most one of the
# three cues.
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
# (shape, (tone, tone), texture)
CLASSES2 = [(_W2[i], tuple(_W2[i + 1].split("/")), _W2[i + 2]) for i in range(0, 60, 3)]
SYNTHETIC2_CLASS_NAMES = [f"{s}_{a}-{b}_{t}" for s, (a, b), t in CLASSES2]
TEXTURES2 = ("stripes", "rings", "spots", "radial", "halves")
# Shapes as unions of parts (dx, dy, sx, sy, {harmonic k: amplitude}) in a unit frame: part outline
# r(theta) = 1 + sum a_k cos(k theta), scaled by (sx, sy) and moved to (dx, dy).
SHAPES2 = {
    "egg": [(0, 0, 1, 0.75, {1: 0.15, 2: 0.05})],
    "clover": [(0, 0, 1, 1, {3: 0.3})],
    "quatrefoil": [(0, 0, 1, 1, {4: 0.22})],
    "bean": [(0, 0, 1, 0.6, {1: 0.1, 2: 0.25, 3: 0.15})],
    "flower": [(0, 0, 1, 1, {6: 0.13, 2: 0.1})],
    "peanut": [(-0.45, 0, 0.6, 0.6, {}), (0.45, 0, 0.55, 0.55, {})],
    "pan": [(-0.3, 0, 0.7, 0.7, {}), (0.7, 0, 0.55, 0.13, {})],  # round body with a long handle
    "mushroom": [(0, -0.2, 1, 0.5, {}), (0, 0.55, 0.22, 0.5, {})],  # wide cap on a stem
    "dumbbell": [(-0.7, 0, 0.4, 0.4, {}), (0.7, 0, 0.4, 0.4, {}), (0, 0, 0.75, 0.15, {})],
    "boot": [(-0.35, -0.2, 0.3, 0.8, {}), (0.15, 0.5, 0.6, 0.25, {})],  # leg and foot: an L
}
_THETA2 = np.linspace(0, 2 * np.pi, 64, endpoint=False)


def _parts2(shape, rng=None):
    """Unit-frame polygons of a shape; with rng, each part's outline and offset jittered."""
    polys = []
    for dx, dy, sx, sy, coef in SHAPES2[shape]:
        r = np.ones_like(_THETA2) + sum(a * np.cos(k * _THETA2) for k, a in coef.items())
        if rng is not None:  # random low harmonics of about 4% amplitude, part offsets of about 5%
            r = r + sum(
                rng.normal(0, 0.04) * np.cos(k * _THETA2 + rng.uniform(0, 6.3)) for k in (2, 3, 4)
            )
            dx, dy = dx + rng.normal(0, 0.05), dy + rng.normal(0, 0.05)
        polys.append(np.stack([dx + sx * r * np.cos(_THETA2), dy + sy * r * np.sin(_THETA2)], 1))
    return polys


# area at scale 1, measured at scale 50 on a 200 px canvas
_UNIT_AREA2 = {
    s: float(_inside(_place(_parts2(s), 50, 100, 100, 0, 1), 200).sum()) / 2500 for s in SHAPES2
}


def _object_texture2(rng, look, size, cx, cy, scale, angle):
    """Float RGB two-tone texture of a look (shape, tone pair, texture) in the object's frame."""
    _, (name1, name2), tex = look
    u, v = _frame(size, cx, cy, scale, angle)
    rho = np.sqrt(u * u + v * v)
    if tex == "stripes":  # grating along the object's axis, about 3 periods per unit
        t = np.sin(u * rng.uniform(17, 21) + rng.uniform(0, 6.3)) > 0
    elif tex == "rings":  # concentric bands around the object centre
        t = np.sin(rho * rng.uniform(13, 16)) > 0
    elif tex == "spots":  # 8 random discs of the second tone
        p = rng.uniform(-0.9, 0.9, (8, 2, 1, 1))
        t = ((u - p[:, 0]) ** 2 + (v - p[:, 1]) ** 2).min(0) < rng.uniform(0.03, 0.05)
    elif tex == "radial":  # smooth gradient: the first tone at the centre, the second at the rim
        t = np.clip(rho, 0, 1)
    else:  # halves: first tone on one side of the long axis, second on the other, soft border
        t = 1 / (1 + np.exp(-12 * (v - rng.uniform(-0.2, 0.2))))
    a, b = _jitter(rng, PALETTE2[name1], (0.7, 1.1)), _jitter(rng, PALETTE2[name2], (0.7, 1.1))
    shade = _shade(rng, u, v, 0.1, 0.03)
    return (a + (b - a) * np.asarray(t, float)[..., None]) * shade[..., None]


def _bg_colour(rng):
    """Background colour: a palette tone half the time (colour never separates objects), or any."""
    if rng.random() < 0.5:
        return _jitter(rng, list(PALETTE2.values())[rng.integers(len(PALETTE2))], (0.7, 1.1))
    return _hsv(rng.uniform(0, 1), rng.uniform(0.08, 0.67), rng.uniform(0.24, 0.88))


def _clouds(rng, size):
    """Multi-octave value noise in [0, 1]: random grids of 3, 6, 12, 24 cells, amplitude halving."""
    t = sum(0.5**k * _upsample(rng.random((3 << k, 3 << k)), size) for k in range(4))
    return (t - t.min()) / (t.max() - t.min() + 1e-6)


def _background2(rng, size):
    """Background 'stuff': clouds, a soft four-corner gradient or a patchwork; shaded, cluttered."""
    y, x = _grid(size)
    kind = rng.integers(3)
    if kind == 0:  # clouds between two colours
        a, b = _bg_colour(rng), _bg_colour(rng)
        img = a + (b - a) * _clouds(rng, size)[..., None]
    elif kind == 1:  # bilinear blend of four corner colours
        wy, wx = (y / size)[..., None], (x / size)[..., None]
        c = [_bg_colour(rng) for _ in range(4)]
        img = (1 - wy) * ((1 - wx) * c[0] + wx * c[1]) + wy * ((1 - wx) * c[2] + wx * c[3])
    else:  # patchwork: Voronoi cells of 3-7 seeds, borders wobbled by noise, one colour per cell
        n = int(rng.integers(3, 8))
        seeds = rng.uniform(0, size, (n, 2, 1, 1))
        cols = [_bg_colour(rng) for _ in range(n)]
        wob = 0.15 * size * (_clouds(rng, size) - 0.5)
        nearest = ((x + wob - seeds[:, 0]) ** 2 + (y - wob - seeds[:, 1]) ** 2).argmin(0)
        img = np.array(cols)[nearest]
    img = img * (0.8 + 0.4 * _clouds(rng, size))[..., None]  # soft light variation over every kind
    for _ in range(rng.integers(3, 12)):  # clutter: short strokes and dots, labelled background
        p = rng.uniform(0, size, 2)
        col = _bg_colour(rng)
        if rng.random() < 0.5:  # a stroke: the pixels within 0.6 px of a 4-12 px segment
            a = rng.uniform(0, 2 * math.pi)
            d = np.array([math.cos(a), math.sin(a)])
            s = np.clip((x - p[0]) * d[0] + (y - p[1]) * d[1], 0, rng.uniform(4, 12))
            img[(x - p[0] - s * d[0]) ** 2 + (y - p[1] - s * d[1]) ** 2 <= 0.36] = col
        else:  # a dot of radius 1-2 px
            img[(x - p[0]) ** 2 + (y - p[1]) ** 2 <= rng.integers(1, 3) ** 2] = col
    return img


def _render2(rng, size, distractors=0):
    """One image with 1-2 large objects (and, for the stand-in, `distractors` unlabelled ones). ->
    (uint8 RGB image, uint8 VOC label map)."""
    img = _background2(rng, size)
    inst = np.zeros((size, size), int)
    n_objects = 1 if rng.random() < 0.55 else 2  # 55% one object, 45% two
    classes = list(rng.choice(20, n_objects, replace=False))
    looks = [CLASSES2[c] for c in classes]
    cues = (list(SHAPES2), sorted({c[1] for c in CLASSES2}), TEXTURES2)
    looks += [_distractor(rng, CLASSES2, cues) for _ in range(distractors)]
    centres = []
    for k in rng.permutation(len(looks)):  # later objects occlude earlier ones
        shape = looks[k][0]
        area = rng.uniform(0.12, 0.4) * size * size  # 12-40% of the image
        scale = math.sqrt(area / _UNIT_AREA2[shape])
        # each next object goes to the farthest of 8 candidate centres (it may cross the border)
        cand = rng.uniform(0.2 * size, 0.8 * size, (8, 2))
        far = np.min([((cand - q) ** 2).sum(1) for q in centres], 0) if centres else np.zeros(8)
        cx, cy = cand[np.argmax(far)]
        angle = rng.uniform(0, 2 * math.pi)
        aspect = math.exp(rng.uniform(-0.2, 0.2))
        centres.append((cx, cy))
        m = _inside(_place(_parts2(shape, rng), scale, cx, cy, angle, aspect), size)
        img[m] = _object_texture2(rng, looks[k], size, cx, cy, scale, angle)[m]
        inst[m] = k + 1 if k < len(classes) else 0
    return _finish(rng, img, inst, classes, blur=0.7)


# ============ 4. Writing a world: the benchmark, or its ImageNet stand-in ============
# The worlds, their renderers and default sizes. Kind "benchmark": train and val images of the
# few-shot benchmark; kind "standin": the companion root of the ImageNet stand-in
# (pretrain_bcpt.py --method generic), the world's classes on other images (another seed stream),
# each with 1-2 unlabelled distractors, no val images.
WORLDS = {
    "synthetic": dict(render=_render, n_train=1200, n_val=400, size=64),
    "synthetic2": dict(render=_render2, n_train=1200, n_val=400, size=64),
}
STANDIN = dict(n_train=1200, n_val=0)


def _same_world(root, params):
    """Whether root holds a finished world made with these parameters."""
    made = world_marker(root)
    return made is not None and {k: made[k] for k in params} == params


def ensure_synthetic(root, world="synthetic", kind="benchmark"):
    """What a stage calls on --dataset synthetic / synthetic2: a finished world of that kind at root
    is used as it is (of any size); no world there: the default one is generated (make_synthetic
    refuses a foreign folder); a world of the other kind: refused, naming both. The stand-in may be
    any VOC-layout root. -> its marker, or None for a root the kit did not make."""
    params = world_marker(root)
    if params is None:
        if kind == "standin" and os.path.isdir(os.path.join(root, IMAGES)):
            return None  # the user's own images stand in for ImageNet
        make_synthetic(root, world=world, kind=kind)
        return world_marker(root)
    if params["world"] != world:
        raise KitError(
            f"--data-root {root} holds the {params['world']} world, not {world}: pass --dataset "
            f"{params['world']}, or the --data-root of a {world} world (default "
            f"{SYNTHETIC_ROOTS[world]})"
        )
    if kind == "benchmark" and params["kind"] != kind:
        raise KitError(
            f"--data-root {root} holds the ImageNet stand-in of {world}, which has no val "
            f"images: pass the benchmark's --data-root (default {SYNTHETIC_ROOTS[world]})"
        )
    if kind == "standin" and params["kind"] != kind:  # it would learn the novel classes' labels
        raise KitError(
            f"--data-root {root} holds the {world} benchmark: the ImageNet stand-in must not see "
            f"its novel classes' labels; leave --data-root out (the stand-in's root, "
            f"{SYNTHETIC_ROOTS[world]}-standin) or pass another root"
        )
    return params


def make_synthetic(
    root,
    n_train=None,
    n_val=None,
    size=None,
    seed=0,
    flag="--data-root",
    world="synthetic",
    kind="benchmark",
):
    """Write a synthetic world (WORLDS, STANDIN; sizes default to the world's) to `root` in VOC
    layout; return root. Idempotent: if root holds that world with the same parameters, return at
    once. Only a missing or empty folder, or a world of the same kind this kit made, is (re)written
    (claim_root). The world is written to a private temporary folder and published with one rename,
    so runs started side by side never read a half-written world."""
    spec = {**WORLDS[world], **(STANDIN if kind == "standin" else {})}
    n_train = n_train or spec["n_train"]
    n_val = spec["n_val"] if n_val is None else n_val
    size = size or spec["size"]
    params = dict(world=world, kind=kind, n_train=n_train, n_val=n_val, size=size, seed=seed)
    if _same_world(root, params):
        return root
    _claim_world(root, flag, world)
    parent, name = os.path.split(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=name + ".tmp-", dir=parent)
    t0 = time.time()
    what = f"{world} ImageNet stand-in" if kind == "standin" else world
    print(f"{what}: drawing {n_train} + {n_val} images of {size} px into {root} ...", flush=True)
    # disjoint seed streams: 0 the benchmark's train images, 1 the val images, 2 the stand-in's
    splits = [("train", 2 if kind == "standin" else 0, n_train), ("val", 1, n_val)]
    checksum = hashlib.sha256()
    try:
        for d in (IMAGES, MASKS, LISTS):
            os.makedirs(os.path.join(tmp, d))
        for split, stream, n in splits:
            for i in range(n):
                rng = np.random.default_rng([seed, stream, i])
                distractors = int(rng.integers(1, 3)) if kind == "standin" else 0
                img, lab = spec["render"](rng, size, distractors)
                _, jpg = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 95])
                jpg.tofile(os.path.join(tmp, IMAGES, f"{split}_{i:06d}.jpg"))
                cv2.imwrite(os.path.join(tmp, MASKS, f"{split}_{i:06d}.png"), lab)
                # the checksum covers what the stages read: the decoded JPEG and the labels
                checksum.update(cv2.imdecode(jpg, cv2.IMREAD_COLOR).tobytes() + lab.tobytes())
        with open(os.path.join(tmp, LISTS, "val.txt"), "w") as f:
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
    files = {SYNTHETIC_MARKER, os.path.join(LISTS, "val.txt")}
    for split in ("train", "val"):
        for i in range(params[f"n_{split}"]):
            files.add(os.path.join(IMAGES, f"{split}_{i:06d}.jpg"))
            files.add(os.path.join(MASKS, f"{split}_{i:06d}.png"))
    return files


def _claim_world(root, flag, world):
    """claim_root, and before a world the kit made is replaced: refuse if the folder holds anything
    the kit did not write there (its world files and its index cache), so that no file of the
    user's is ever deleted."""
    claim_root(root, flag, world)
    made = world_marker(root)
    ours = _world_files(made) if made else set()  # the files the kit may replace
    for folder, _, files in os.walk(root):  # nothing for a missing root
        for name in files:
            rel = os.path.relpath(os.path.join(folder, name), root)
            if rel not in ours and os.path.dirname(rel) != CACHE_DIR:
                raise KitError(
                    f"{flag} {root} holds {rel}, which this kit did not write: the world there "
                    "would be replaced, so move that file out, or choose another folder"
                )


def _publish_world(tmp, root, params, flag):
    """Move the finished world `tmp` to `root`, replacing an empty folder or a differently-made
    world of the same kind there (checked again now: the folder may have changed during generation,
    and holds only the kit's files). If another process published the same world first, keep
    theirs."""
    if _same_world(root, params):
        return
    _claim_world(root, flag, params["world"])
    # move the old (empty or differently-made) world out of the way, then delete it
    with contextlib.suppress(FileNotFoundError):
        os.rename(root, tmp + "-old")
        shutil.rmtree(tmp + "-old", ignore_errors=True)
    try:
        os.rename(tmp, root)
    except OSError:
        if not _same_world(root, params):
            raise
