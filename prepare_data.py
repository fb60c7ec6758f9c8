"""prepare_data.py: the data stage. Builds and checks the VOC-layout data roots every other stage
reads.

  synthetic  a built-in synthetic benchmark (worlds.py): a seeded world in the VOC layout with
             objects of every class in the training images (the merged background of BCPT, paper
             Sec. 1); the stages draw the default one on first use of its --dataset, this command
             one of other sizes or another --seed.
  pascal     PASCAL VOC2012 + SBD -> JPEGImages, SegmentationClassAug, ImageSets/Segmentation lists
             (PROTOCOL.md 2.1-2.2).
  coco       COCO 2014 instances -> one class-index PNG per image and the lists (PROTOCOL.md 2.3).
  verify     decode every image and mask, list all bad ones, print per-fold pool sizes (pixel rule).

The kit writes only into a folder that is new, empty, or carries its own marker of the same kind
(claim_root): a user's data is never overwritten.

    python prepare_data.py synthetic --dataset synthetic2 --out data/synthetic2
    python prepare_data.py pascal --voc VOCdevkit/VOC2012 --sbd benchmark_RELEASE/dataset \
        --train-noval train_noval.txt --out ROOT
    python prepare_data.py coco --coco COCO2014 --out ROOT
    python prepare_data.py verify --dataset pascal --data-root ROOT
"""

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
from PIL import Image

from common import (
    IMAGES,
    LISTS,
    MASKS,
    N_CLASSES,
    PREPARED_MARKER,
    SYNTHETIC_ROOTS,
    KitError,
    base_classes,
    check_image_file,
    claim_root,
    class_pixel_counts,
    image_pools,
    novel_classes,
    read_list,
    read_mask,
    root_made_by,
)
from own_images import read_image
from plumbing import POSITIVE, SIZE, KitParser, add_data_args, dataset_of, run, typed
from reference_numbers import reference
from worlds import WORLDS, make_synthetic


# ============ 1. PASCAL-5i / COCO-20i from the official downloads (PROTOCOL.md 2) ============
def _need(path, what):
    """The path, or a KitError naming it and what it should contain if it is missing."""
    if not os.path.exists(path):
        raise KitError(f"{what} at {path}")
    return path


def _png_ids(folder):
    """The ids (file names less .png) of the PNG files in a folder."""
    return {f[:-4] for f in os.listdir(folder) if f.endswith(".png")}


def _dirs(out, kind):
    """Claim `out` for prepared `kind` data (claim_root: new, empty or made by this command before),
    mark it as such, then create the three output folders."""
    claim_root(out, "--out", kind)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, PREPARED_MARKER), "w") as f:
        json.dump({"dataset": kind, "made_by": f"prepare_data.py {kind}"}, f)
    for d in (IMAGES, MASKS, LISTS):
        os.makedirs(os.path.join(out, d), exist_ok=True)


def _write_item(out, stem, image, mask):
    """One image of the kit layout: JPEGImages/STEM.jpg a symlink to abspath(image) (a copy where
    symlinks fail; a correct existing link or copy is left), and SegmentationClassAug/STEM.png the
    2-D uint8 mask as a single-channel PNG, written via a temp file and os.replace."""
    src = os.path.abspath(image)
    dst = os.path.join(out, IMAGES, stem + ".jpg")
    if os.path.islink(dst) and os.readlink(dst) != src:  # a link to another file is replaced
        os.remove(dst)
    if not os.path.lexists(dst):
        try:
            os.symlink(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    path = os.path.join(out, MASKS, stem + ".png")
    tmp = f"{path}.tmp{os.getpid()}.png"  # cv2 picks the format by the extension
    if not cv2.imwrite(tmp, np.ascontiguousarray(mask, dtype=np.uint8)):
        raise KitError(f"could not write {tmp}")
    os.replace(tmp, path)


def _write_list(out, name, ids):
    """Write sorted unique ids, one per line, to the list ImageSets/Segmentation/NAME.txt."""
    with open(os.path.join(out, LISTS, name + ".txt"), "w") as f:
        f.writelines(i + "\n" for i in sorted(set(ids)))


def _report(name, counts):
    """Print counts; warn of each that differs from the real-data count (reference_numbers.py)."""
    print(f"{name}: " + " ".join(f"{k}={v}" for k, v in counts.items()))
    for k, v in counts.items():
        expected = reference("list-size", name, row=k)
        if expected and v != expected["all"]:
            real = f"{expected['all']:.0f}"
            print(f"WARNING: {name} {k} count {v} differs from the real-data count {real}")


def _read_index_png(path):
    """Class indices of a palette (P) or single-channel (L) PNG: palette indices, not luminance."""
    img = Image.open(path)
    if img.mode not in ("P", "L"):
        raise KitError(f"{path}: mode {img.mode}, expected a palette (P) or index (L) PNG")
    return np.array(img)


def _read_sbd_mat(path):
    """GTcls.Segmentation (HxW uint8) of an SBD cls/<id>.mat file."""
    try:
        import scipy.io
    except ImportError:
        raise KitError(
            "pascal reads SBD .mat files with scipy: pip install scipy, "
            "or pass --aug DIR with ready PNG masks"
        ) from None
    gt = scipy.io.loadmat(path, struct_as_record=False)["GTcls"].flat[0]
    return np.asarray(gt.Segmentation)


def _pascal_inputs(voc, sbd, aug):
    """Check the inputs; return (VOC train ids, VOC val ids, VOC mask ids, SBD train+val ids)."""
    if sbd is None and aug is None:
        raise KitError("pascal needs --sbd benchmark_RELEASE/dataset or --aug SegmentationClassAug")
    no_voc = "--voc VOCdevkit/VOC2012: no "
    no_sbd = "--sbd benchmark_RELEASE/dataset: no "
    for sub in ("JPEGImages", "SegmentationClass"):
        _need(os.path.join(voc, sub), no_voc + sub + "/ folder")
    sets = os.path.join(voc, "ImageSets", "Segmentation")
    train = read_list(_need(os.path.join(sets, "train.txt"), no_voc + "segmentation id list"))
    val = read_list(_need(os.path.join(sets, "val.txt"), no_voc + "segmentation id list"))
    voc_ids = _png_ids(os.path.join(voc, "SegmentationClass"))
    missing = sorted((set(train) | set(val)) - voc_ids)
    if missing:
        raise KitError(
            f"--voc VOCdevkit/VOC2012: no SegmentationClass/{missing[0]}.png ({len(missing)} "
            "listed ids lack a mask)"
        )
    sbd_ids = []
    if sbd is not None:
        for s in ("train.txt", "val.txt"):
            sbd_ids += read_list(_need(os.path.join(sbd, s), no_sbd + "id list"))
        if aug is None:
            _need(os.path.join(sbd, "cls"), no_sbd + "cls/ folder of <id>.mat masks")
    if aug is not None:
        _need(aug, "--aug: no folder of single-channel index PNG masks")
    return train, set(val), voc_ids, sbd_ids


def _pascal_mask(i, voc, sbd, aug, voc_ids):
    """The mask of one id: VOC's own PNG wins, else the aug PNG, else SBD cls/<id>.mat; a
    KitError naming the file unless it is 2-D with values in 0..20 or 255."""
    if i in voc_ids:
        path = os.path.join(voc, "SegmentationClass", i + ".png")
        m = _read_index_png(path)
    elif aug is not None:
        path = _need(os.path.join(aug, i + ".png"), "--aug: no mask PNG")
        m = _read_index_png(path)
    else:
        path = _need(os.path.join(sbd, "cls", i + ".mat"), "--sbd: no cls/<id>.mat mask")
        m = _read_sbd_mat(path)
    bad = np.setdiff1d(np.unique(m), np.r_[0:21, 255])
    if m.ndim != 2 or bad.size:
        raise KitError(f"{path}: invalid mask values {bad.tolist()} (allowed 0..20, 255)")
    return m


def prepare_pascal(voc, sbd, out, aug=None, train_noval=None):
    """PASCAL VOC2012 + SBD -> kit layout. Returns counts
    val/train/train_noval/oslsm/trainaug/masks.

    train_noval: optional path of SBD's separately published train_noval.txt (5623 ids); default
    sbd/train_noval.txt if present, else computed as SBD train+val (or aug ids) minus VOC val, which
    is much larger than the published list (a warning is printed)."""
    voc_train, voc_val, voc_ids, sbd_ids = _pascal_inputs(voc, sbd, aug)
    extra = _png_ids(aug) if aug is not None else set(sbd_ids)
    noval_file = train_noval or (sbd and os.path.join(sbd, "train_noval.txt"))
    if noval_file and os.path.exists(noval_file):
        noval = set(read_list(noval_file)) - voc_val
    else:
        noval = set(sbd_ids or extra) - voc_val
        print(
            f"WARNING: no SBD train_noval.txt; using SBD ids minus VOC val ({len(noval)} ids; the "
            "published list has 5623)"
        )
    _dirs(out, "pascal")
    all_ids = sorted(voc_ids | extra)
    t0 = time.time()
    for k, i in enumerate(all_ids):
        if k and k % 2000 == 0:
            rate = k / (time.time() - t0)
            print(f"pascal: {k} / {len(all_ids)} masks ({rate:.0f}/s)", flush=True)
        m = _pascal_mask(i, voc, sbd, aug, voc_ids)
        src = os.path.join(voc, "JPEGImages", i + ".jpg")
        if not os.path.exists(src) and sbd is not None:
            src = os.path.join(sbd, "img", i + ".jpg")
        _write_item(out, i, _need(src, f"no JPEG for {i} (VOC JPEGImages/ or SBD img/)"), m)
    trainaug = set(all_ids) - voc_val
    lists = {"val": voc_val, "train": voc_train, "train_noval": noval, "trainaug": trainaug}
    for name, ids in lists.items():
        _write_list(out, name, ids)
    counts = {name: len(set(ids)) for name, ids in lists.items()}
    counts.update(oslsm=len(set(voc_train) | noval), masks=len(all_ids))
    _report("pascal", counts)
    return counts


def _coco_mask(coco, img, anns, cat_rank):
    """Class map: instances largest-area first, then crowd as 255 over background only."""
    m = np.zeros((img["height"], img["width"]), np.uint8)
    normal = [a for a in anns if not a.get("iscrowd", 0)]
    crowd = [a for a in anns if a.get("iscrowd", 0)]
    for a in sorted(normal, key=lambda a: (-a["area"], a["id"])):
        m[coco.annToMask(a) > 0] = cat_rank[a["category_id"]]
    for a in crowd:
        m[(coco.annToMask(a) > 0) & (m == 0)] = 255
    return m


def prepare_coco(coco, out):
    """COCO2014 instances -> kit layout (one PNG per annotated image). Returns counts train/val."""
    try:
        from pycocotools.coco import COCO
    except ImportError:
        raise KitError("coco needs pycocotools: pip install pycocotools") from None
    ann_files = {}
    img_dirs = {}
    for s in ("train", "val"):  # every input checked before anything is written
        ann = os.path.join(coco, "annotations", f"instances_{s}2014.json")
        ann_files[s] = _need(ann, "--coco: no COCO2014 instance annotation file")
        img_dirs[s] = _need(os.path.join(coco, f"{s}2014"), f"--coco: no {s}2014/ image folder")
    _dirs(out, "coco")
    counts = {}
    for split, ann_file in ann_files.items():
        api = COCO(ann_file)
        cat_rank = {c: r + 1 for r, c in enumerate(sorted(api.getCatIds()))}  # class 1..80
        ids = []
        t0 = time.time()
        for img_id in sorted(api.getImgIds()):
            anns = api.imgToAnns.get(img_id, [])
            if not anns:
                continue
            img = api.imgs[img_id]
            stem = os.path.splitext(img["file_name"])[0]
            src = _need(os.path.join(img_dirs[split], img["file_name"]), "--coco: no image file")
            _write_item(out, stem, src, _coco_mask(api, img, anns, cat_rank))
            ids.append(stem)
            if len(ids) % 5000 == 0:
                rate = len(ids) / (time.time() - t0)
                print(f"coco {split}: {len(ids)} images ({rate:.1f}/s)", flush=True)
        _write_list(out, split, ids)
        counts[split] = len(ids)
    _report("coco", counts)
    return counts


# ============ 2. verify, and the command line ============
def bad_files(root, ids, n_classes, workers=4):
    """Decode every image in full and read every mask; one line per bad file, all of them."""

    def problems(i):
        try:
            check_image_file(root, i, read_mask(root, i, n_classes).shape)
            fix = f"re-extract or re-download it, or drop {i} from the lists"
            read_image(os.path.join(root, IMAGES, i + ".jpg"), fix)
        except KitError as e:
            return str(e)

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return [p for p in pool.map(problems, ids) if p]


def _bam_says(expected, fold):
    """' (BAM's lists: N)', the image count of BAM's lists for a fold, or '' where it has none."""
    if not expected:
        return ""
    return f" (BAM's lists: {expected['folds'][fold]:.0f})"


def _pools(pools):
    """{class: images} as 'class:images ...'."""
    return " ".join(f"{c}:{k}" for c, k in pools.items())


def verify(dataset, root, min_pixels, train_pool="aug", coco_split="interleaved", workers=2):
    """Per fold: images of the training list (BAM: novel-containing dropped; PFENet: kept) and of
    the val list, and per class the support pool sizes after the pixel rule (PROTOCOL.md 3.1).
    Returns the numbers."""
    train_ids, val_ids = image_pools(root, train_pool)
    n = N_CLASSES[dataset]
    bad = bad_files(root, train_ids + val_ids, n, workers)
    if bad:
        print(f"{len(bad)} bad files:\n" + "\n".join("  " + b for b in bad))
        raise KitError(
            f"verify: {len(bad)} of the {len(train_ids) + len(val_ids)} images or masks under "
            f"{root} are bad (listed above): restore them or drop their ids from the lists"
        )
    ct = class_pixel_counts(root, train_ids, n, workers)  # (images, classes) pixel counts
    cv = class_pixel_counts(root, val_ids, n, workers)
    bam_train = reference("bam-train-list", dataset, row=train_pool)
    bam_val = reference("bam-val-list", dataset, row=train_pool)
    print(
        f"{dataset} at {root}: train pool {len(train_ids)} images ({train_pool}), val "
        f"{len(val_ids)}; pixel rule >= {min_pixels}"
    )
    out = []
    for fold in range(4):
        novel = novel_classes(dataset, fold, coco_split)
        base = base_classes(dataset, fold, coco_split)
        no_novel = ct[:, novel].sum(1) == 0  # BAM drops an image with any pixel of a novel class
        has_base = (ct[:, base] >= min_pixels).any(1)
        has_novel = (cv[:, novel] >= min_pixels).any(1)
        r = {
            "fold": fold,
            "train_bam": int((has_base & no_novel).sum()),
            "train_pfenet": int(has_base.sum()),
            "val": int(has_novel.sum()),
            "train_pools": {c: int(((ct[:, c] >= min_pixels) & no_novel).sum()) for c in base},
            "val_pools": {c: int((cv[:, c] >= min_pixels).sum()) for c in novel},
        }
        print(
            f"fold {fold}: train {r['train_bam']} images without novel classes"
            f"{_bam_says(bam_train, fold)}, {r['train_pfenet']} keeping them; val {r['val']}"
            f"{_bam_says(bam_val, fold)}"
        )
        print("  val pools (novel):", _pools(r["val_pools"]))
        print("  train pools (base, BAM):", _pools(r["train_pools"]))
        out.append(r)
    return out


def parser(dataset):
    """The command line; verify's defaults (pixel rule, pool) are those of `dataset`."""
    p = KitParser("the BCPT kit's data stage: build and check the data roots")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synthetic", help="write a synthetic benchmark world (VOC layout)")
    s.add_argument(
        "--dataset",
        default="synthetic",
        choices=list(WORLDS),
        help="which world (default %(default)s)",
    )
    roots = ", ".join(f"{w} {r}" for w, r in SYNTHETIC_ROOTS.items())
    s.add_argument("--out", help=f"(default: {roots})")
    for flag, kind, what in (
        ("--n-train", POSITIVE, "training images"),
        ("--n-val", POSITIVE, "val images"),
        ("--size", SIZE, "image side in pixels"),
    ):
        key = flag[2:].replace("-", "_")
        defaults = ", ".join(f"{w} {spec[key]}" for w, spec in WORLDS.items())
        s.add_argument(flag, type=kind, help=f"{what} (default: {defaults})")
    s.add_argument("--seed", type=int, default=0, help="world seed (default %(default)s)")
    out_help = "a new or empty folder (or this command's earlier output)"
    s = sub.add_parser("pascal", help="PASCAL VOC2012 + SBD -> SegmentationClassAug and lists")
    s.add_argument(
        "--voc", required=True, help="VOCdevkit/VOC2012 (JPEGImages, SegmentationClass, ImageSets)"
    )
    s.add_argument(
        "--sbd",
        help="SBD benchmark_RELEASE/dataset (cls/*.mat, img/, train.txt, val.txt); needs scipy",
    )
    s.add_argument("--aug", help="an existing SegmentationClassAug folder, instead of --sbd")
    s.add_argument(
        "--train-noval", help="SBD's published train_noval.txt (5623 ids), for the 5953-image pool"
    )
    s.add_argument("--out", required=True, help=out_help)
    s = sub.add_parser("coco", help="COCO2014 instances -> one class-index PNG per image and lists")
    s.add_argument(
        "--coco",
        required=True,
        help="folder with annotations/, train2014/, val2014/; needs pycocotools",
    )
    s.add_argument("--out", required=True, help=out_help)
    s = sub.add_parser(
        "verify", help="decode everything, list bad files, print per-fold pool sizes"
    )
    add_data_args(s, dataset, "verify")
    s.add_argument("--workers", type=POSITIVE, default=4, help="threads (default %(default)s)")
    return p


def main(argv=None):
    argv = list(argv or [])
    a = parser(dataset_of(argv)).parse_args(argv)
    made = a.command == "verify" and a.data_root and root_made_by(a.data_root)
    if made and made != a.dataset:  # verify a root with the settings of the data it holds
        if typed(argv, "--dataset"):
            raise KitError(
                f"--dataset {a.dataset}: {a.data_root} holds {made} data (its marker says so); "
                f"pass --dataset {made} or leave it out"
            )
        a = parser(made).parse_args(argv + ["--dataset", made])
    if a.command == "synthetic":
        out = a.out or SYNTHETIC_ROOTS[a.dataset]
        make_synthetic(out, a.n_train, a.n_val, a.size, a.seed, flag="--out", world=a.dataset)
        print(f"{a.dataset} benchmark at {out}")
    elif a.command == "pascal":  # _pascal_inputs refuses a run with neither --sbd nor --aug
        prepare_pascal(a.voc, a.sbd, a.out, a.aug, a.train_noval)
    elif a.command == "coco":
        prepare_coco(a.coco, a.out)
    else:
        if a.data_root is None:
            raise KitError(f"verify --dataset {a.dataset} needs --data-root ROOT")
        verify(a.dataset, a.data_root, a.min_pixels, a.train_pool, a.coco_split, a.workers)


if __name__ == "__main__":
    run(main)
