"""prepare_data.py: the data stage. Builds and checks the VOC-layout data roots every other stage reads.

  synthetic  the built-in synthetic benchmark: a seeded world of shape classes on textured "stuff" backgrounds,
             in the VOC layout, with objects of every class in the training images (the merged background of
             BCPT, paper Sec. 1). Stages generate it on first use of --dataset synthetic.
  pascal     PASCAL VOC2012 + SBD -> JPEGImages, SegmentationClassAug, ImageSets/Segmentation lists
             (PROTOCOL.md 2.1-2.2).
  coco       COCO 2014 instances -> one class-index PNG per image and the lists (PROTOCOL.md 2.3).
  verify     decode every image and mask, list all bad files, and print per-fold pool sizes after the pixel rule.

The kit writes only into a folder that is new, empty, or carries its own marker of the same kind
(claim_root): a user's data is never overwritten.

    python prepare_data.py synthetic --out data/synthetic
    python prepare_data.py pascal --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset \
        --train-noval train_noval.txt --out ROOT
    python prepare_data.py coco --coco COCO2014 --out ROOT
    python prepare_data.py verify --dataset pascal --data-root ROOT --train-pool oslsm
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

from common import (IMAGES, LISTS, MASKS, N_CLASSES, POSITIVE, SIZE, SYNTHETIC_ROOT, KitError, KitParser,
                    add_data_args, base_classes, check_image_file, class_pixel_counts, dataset_of,
                    image_pools, novel_classes, read_list, read_mask, run)

# ============ 1. The synthetic benchmark: a seeded world in the VOC layout ============
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
PREPARED_MARKER = ".prepared.json"  # written by the pascal / coco commands into their --out


def _synthetic_params(root):
    """The generation parameters recorded in the world's marker, or None if root is not a finished world."""
    try:
        with open(os.path.join(root, SYNTHETIC_MARKER)) as f:
            params = json.load(f)
        return params if isinstance(params, dict) and {"n_train", "n_val", "size", "seed"} <= set(params) else None
    except (OSError, ValueError):
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


def ensure_synthetic(root):
    """What a stage calls on --dataset synthetic: a finished world at root is used as it is (of any size);
    otherwise the default world is generated there (make_synthetic, which refuses a foreign folder)."""
    if _synthetic_params(root) is None:
        make_synthetic(root)
    return root


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


def main(argv=None):
    p = KitParser(description="the BCPT kit's data stage: build and check the data roots")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", help="write the synthetic benchmark (VOC layout)")
    s.add_argument("--out", default=SYNTHETIC_ROOT, help="(default %(default)s)")
    s.add_argument("--n-train", type=POSITIVE, default=2000, help="training images (default %(default)s)")
    s.add_argument("--n-val", type=POSITIVE, default=500, help="val images (default %(default)s)")
    s.add_argument("--size", type=SIZE, default=96, help="image side in pixels (default %(default)s)")
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
                      dataset_of(argv or []), "verify")
    s.add_argument("--workers", type=POSITIVE, default=4, help="threads (default %(default)s)")
    a = p.parse_args(argv)
    if a.command == "synthetic":
        make_synthetic(a.out, a.n_train, a.n_val, a.size, a.seed, flag="--out")
        print(f"synthetic benchmark at {a.out}")
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
