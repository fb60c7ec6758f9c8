"""Shared fixtures and helpers of the tests: real files in the VOC, SBD and COCO layouts written
here, a small synthetic world, and a pre-trained and a meta-trained model made once per test
session."""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
import worlds

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "cuda: needs a CUDA GPU (python -m pytest -m cuda on a GPU machine)"
    )


# ---------- real files in the VOC layout, written by the tests; the synthetic world ----------
def write_voc(root, items, val=()):
    """items: {id: (rgb uint8 (H, W, 3), mask uint8 (H, W))}; val ids go to val.txt."""
    for sub in (common.IMAGES, common.MASKS, common.LISTS):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for i, (img, mask) in items.items():
        cv2.imwrite(os.path.join(root, common.IMAGES, i + ".jpg"), img[:, :, ::-1])
        cv2.imwrite(os.path.join(root, common.MASKS, i + ".png"), mask)
    with open(os.path.join(root, common.LISTS, "val.txt"), "w") as f:
        f.write("".join(v + "\n" for v in val))
    return str(root)


def blocks(classes, size=64, block=32):
    """An image/mask pair whose 32x32 quadrants hold the given classes (0 = background)."""
    mask = np.zeros((size, size), np.uint8)
    for k, c in enumerate(classes):
        y, x = divmod(k, size // block)
        mask[y * block : (y + 1) * block, x * block : (x + 1) * block] = c
    img = np.stack([mask * 10, 255 - mask * 10, np.full_like(mask, 128)], -1).astype(np.uint8)
    return img, mask


def make_root(tmp_path, n=8):
    """8 train images with classes (quadrant layout, 1024 px per quadrant) + 2 val images."""
    items = {f"t{i}": blocks([i % 4 + 1, 0, (i + 1) % 4 + 1, 6]) for i in range(n)}
    items["v0"] = blocks([1, 2, 0, 0])
    items["v1"] = blocks([3, 1, 0, 0])
    return write_voc(tmp_path / "voc", items, val=["v0", "v1"])


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return worlds.make_synthetic(
        str(tmp_path_factory.mktemp("synthetic")), n_train=200, n_val=200, size=64
    )


# ---------- the stages' command lines; a pre-trained and a meta-trained model ----------
def pretrain_args(root, out, *extra):
    return [
        "--data-root",
        root,
        "--out",
        str(out),
        "--workers",
        "0",
        "--crop",
        "48",
        "--batch",
        "4",
        "--epochs",
        "1",
        "--log-every",
        "1",
        "--seed",
        "3",
        *extra,
    ]


@pytest.fixture(scope="session")
def pretrained(synthetic_root, tmp_path_factory):
    """2-iteration pretraining of both methods: {method: last.pt}."""
    import pretrain_bcpt

    out = {}
    for method in ("standard", "bcpt"):
        d = tmp_path_factory.mktemp(method)
        pretrain_bcpt.main(pretrain_args(synthetic_root, d, "--method", method, "--max-iters", "2"))
        out[method] = str(d / "last.pt")
    return out


def meta_args(root, out, weights, shot, *extra):
    return [
        "--data-root",
        root,
        "--out",
        str(out),
        "--pretrained",
        weights,
        "--shot",
        str(shot),
        "--workers",
        "0",
        "--crop",
        "41",
        "--batch",
        "2",
        "--min-pixels",
        "64",
        "--test-size",
        "64",
        "--log-every",
        "1",
        "--seed",
        "5",
        *extra,
    ]


@pytest.fixture(scope="session")
def metatrained(synthetic_root, pretrained, tmp_path_factory):
    """pretrain (bcpt, 2 iters) -> metatrain 2 iters, 1- and 5-shot: {shot: last.pt}."""
    import metatrain

    out = {}
    for shot in (1, 5):
        d = tmp_path_factory.mktemp(f"meta{shot}")
        metatrain.main(meta_args(synthetic_root, d, pretrained["bcpt"], shot, "--max-iters", "2"))
        out[shot] = str(d / "last.pt")
    return out


def np_args(root, weights, path, *extra):
    return [
        "--data-root",
        root,
        "--pretrained",
        weights,
        "--episodes",
        "5",
        "--seeds",
        "510",
        "--workers",
        "0",
        "--min-pixels",
        "64",
        "--test-size",
        "64",
        "--json",
        str(path),
        *extra,
    ]


def assert_scores_add_up(r):
    """A test's summary (returned by main or read from its JSON): each seed's mIoU is the mean of
    its class IoUs, the mIoU the mean over the seeds and the mean of the class IoUs averaged over
    the seeds, all in percent. A kit that averaged over episodes, or over the seeds' best, breaks
    it."""
    per_seed = r["per_seed"]
    for seed in per_seed:
        assert seed["miou"] == pytest.approx(np.mean(list(seed["class_iou"].values())))
    assert r["miou"] == pytest.approx(np.mean([seed["miou"] for seed in per_seed]))
    assert r["miou"] == pytest.approx(np.mean(list(r["class_iou"].values())))
    assert 0 <= r["miou"] <= 100
    assert 0 <= r["fb_iou"] <= 100


# ---------- prepare_data.py's inputs: PASCAL VOC + SBD and COCO in their own layouts ----------
H, W = 16, 20


def voc_palette():
    """The standard VOC colour map (bit-interleaved), 256 entries."""
    pal = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def mask_with(*vals):
    """HxW mask: background 0, vertical bands of the given class values, a 255 boundary column."""
    m = np.zeros((H, W), np.uint8)
    for k, v in enumerate(vals):
        m[2:14, 2 + 5 * k : 6 + 5 * k] = v
    m[:, 1] = 255
    return m


def write_jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((H, W, 3), 100, np.uint8))


def write_p_png(path, arr):
    img = Image.fromarray(arr, mode="P")
    img.putpalette(voc_palette())
    img.save(path)


def read_png(path):
    m = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert m is not None
    assert m.ndim == 2
    assert m.dtype == np.uint8
    return m


VOC_MASKS = {
    "2007_000001": mask_with(1, 15),
    "2007_000002": mask_with(20, 7),
    "2007_000003": mask_with(3),
    "2007_000004": mask_with(12, 2, 9),
}


SBD_MASKS = {
    "2007_000002": np.full((H, W), 4, np.uint8),  # VOC must win
    "2007_000003": np.full((H, W), 5, np.uint8),  # in VOC val: not in train_noval
    "2008_000010": mask_with(11, 6),
    "2008_000011": mask_with(19),
}


@pytest.fixture
def voc(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    (root / "SegmentationClass").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    for i in list(VOC_MASKS) + ["2008_000010", "2008_000011", "2009_000099"]:
        write_jpg(str(root / "JPEGImages" / (i + ".jpg")))
    for i, m in VOC_MASKS.items():
        write_p_png(str(root / "SegmentationClass" / (i + ".png")), m)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000002\n2007_000001\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("2007_000003\n2007_000004\n")
    return str(root)


@pytest.fixture
def sbd(tmp_path):
    sio = pytest.importorskip("scipy.io", reason="SBD .mat fixtures need scipy")
    import scipy.sparse

    root = tmp_path / "benchmark_RELEASE" / "dataset"
    (root / "cls").mkdir(parents=True)
    for i, m in SBD_MASKS.items():
        bnd = np.empty((20, 1), object)  # like the real files: a 20x1 cell of sparse boundary maps
        for k in range(20):
            bnd[k, 0] = scipy.sparse.csc_matrix((H, W), dtype=bool)
        sio.savemat(
            str(root / "cls" / (i + ".mat")),
            {
                "GTcls": {
                    "Segmentation": m,
                    "Boundaries": bnd,
                    "CategoriesPresent": np.unique(m[m > 0]).reshape(-1, 1),
                }
            },
        )
    (root / "train.txt").write_text("2007_000002\n2008_000010\n")
    (root / "val.txt").write_text("2007_000003\n2008_000011\n")
    return str(root)


def rle_counts(mask):
    """Uncompressed COCO RLE counts: column-major runs, starting with a (possibly empty) run of
    zeros."""
    flat = mask.flatten(order="F")
    counts = []
    cur = 0  # the value of the current run
    n = 0  # its length so far
    for v in flat:
        if v != cur:
            counts.append(n)
            cur = v
            n = 0
        n += 1
    counts.append(n)
    return counts


def box(r0, r1, c0, c1):
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


@pytest.fixture
def coco(tmp_path):
    mu = pytest.importorskip("pycocotools.mask", reason="COCO tests need pycocotools")
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    cats = [{"id": 90, "name": "toothbrush"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    small = box(5, 9, 6, 10)
    crowd = box(0, H, 12, 18)
    comp = box(10, 14, 1, 5)
    train = {
        "images": [
            {"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "height": H, "width": W},
            {"id": 25, "file_name": "COCO_train2014_000000000025.jpg", "height": H, "width": W},
        ],
        "categories": cats,
        "annotations": [
            # small instance listed first with the lower id: area must decide the order
            {
                "id": 1,
                "image_id": 9,
                "category_id": 90,
                "iscrowd": 0,
                "area": 16.0,
                "bbox": [6, 5, 4, 4],
                "segmentation": {"size": [H, W], "counts": rle_counts(small)},
            },
            {
                "id": 3,
                "image_id": 9,
                "category_id": 3,
                "iscrowd": 1,
                "area": 96.0,
                "bbox": [12, 0, 6, 16],
                "segmentation": {"size": [H, W], "counts": rle_counts(crowd)},
            },
            {
                "id": 2,
                "image_id": 9,
                "category_id": 1,
                "iscrowd": 0,
                "area": 120.0,
                "bbox": [2, 2, 12, 10],
                "segmentation": [[2, 2, 14, 2, 14, 12, 2, 12]],
            },
        ],
    }
    val = {
        "images": [
            {"id": 42, "file_name": "COCO_val2014_000000000042.jpg", "height": H, "width": W}
        ],
        "categories": cats,
        "annotations": [
            {
                "id": 7,
                "image_id": 42,
                "category_id": 3,
                "iscrowd": 0,
                "area": 16.0,
                "bbox": [1, 10, 4, 4],
                "segmentation": {
                    "size": [H, W],
                    "counts": mu.encode(np.asfortranarray(comp))["counts"].decode("ascii"),
                },
            }
        ],
    }
    for split, js in (("train", train), ("val", val)):
        (root / "annotations" / ("instances_%s2014.json" % split)).write_text(json.dumps(js))
        for im in js["images"]:
            write_jpg(str(root / ("%s2014" % split) / im["file_name"]))
    return str(root)


def lists(out):
    """{list name: ids} of a prepared root's ImageSets/Segmentation."""
    d = os.path.join(out, "ImageSets", "Segmentation")
    return {f[:-4]: Path(d, f).read_text().split("\n")[:-1] for f in os.listdir(d)}


def snapshot(out):
    """The bytes of a prepared root's masks and lists, and its image links' targets."""
    res = {}
    for sub in ("SegmentationClassAug", "ImageSets/Segmentation"):
        for f in sorted(os.listdir(os.path.join(out, sub))):
            res[sub + "/" + f] = Path(out, sub, f).read_bytes()
    for f in sorted(os.listdir(os.path.join(out, "JPEGImages"))):
        res["JPEGImages/" + f] = os.readlink(os.path.join(out, "JPEGImages", f))
    return res


# ---------- folders and checkpoints read back, flags spelled out again ----------
def tree_bytes(root):
    """{relative path: bytes (or link target)} of everything below root, hidden files included."""
    out = {}
    for d, dirs, files in os.walk(root):
        for name in dirs + files:
            p = os.path.join(d, name)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "link -> " + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = Path(p).read_bytes()
            else:
                out[rel] = "dir"
    return out


def checkpoints_equal(a, b):
    """Two checkpoints hold the same model, optimiser and RNG states, bit for bit."""
    for part in ("model", "optimizer"):
        leaves_a = torch.utils._pytree.tree_flatten(a[part])[0]
        leaves_b = torch.utils._pytree.tree_flatten(b[part])[0]
        assert len(leaves_a) == len(leaves_b)
        for x, y in zip(leaves_a, leaves_b, strict=True):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), part
            else:
                assert x == y, part
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["numpy"] == b["rng"]["numpy"]
    assert a["rng"]["python"] == b["rng"]["python"]


def flag_values(value):
    """The words after a flag for its parsed value: none for a switch, each item of a list."""
    if value is True:
        return []
    if isinstance(value, list):
        return [str(v) for v in value]
    return [str(value)]


def flags_to_argv(flags):
    """The command line that gives back these flags (args.json "flags"): every flag spelled out."""
    argv = []
    for dest, value in flags.items():
        if value is None or value is False:  # (0 == False: compare by identity) not given
            continue
        argv += ["--" + dest.replace("_", "-"), *flag_values(value)]
    return argv


# ---------- several processes: torchrun on the CPU (gloo), two ranks; CUDA-only tests ----------
def torchrun(*argv, cwd=HERE):
    """Run a script under torchrun with 2 processes on the CPU; -> the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            *argv,
        ],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=600,
    )


CUDA = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def cuda_test(fn):
    for mark in CUDA:
        fn = mark(fn)
    return fn


# ---------- the peers' own weight files: PFENet / BAM's resnet50_v2.pth and best.pth ----------
def random_bn(state, prefix, c, g):
    """BN entries with statistics that are not the defaults, as in a trained file."""
    state.update(
        {
            f"{prefix}.weight": torch.rand(c, generator=g) + 0.5,
            f"{prefix}.bias": torch.randn(c, generator=g),
            f"{prefix}.running_mean": torch.randn(c, generator=g),
            f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
            f"{prefix}.num_batches_tracked": torch.tensor(7),
        }
    )


@pytest.fixture(scope="session")
def resnet50_v2_file(tmp_path_factory):
    """PFENet/BAM's initmodel/resnet50_v2.pth layout, written from the key list (not from the kit's
    builder): deep stem conv1/bn1 3->64 s2, conv2/bn2 64->64, conv3/bn3 64->128; bottlenecks from
    128 channels; fc."""
    import torchvision

    g = torch.Generator().manual_seed(0)
    state = {
        k: v
        for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
        if not k.startswith(("conv1.", "bn1."))
    }
    state["layer1.0.conv1.weight"] = torch.randn(64, 128, 1, 1, generator=g)
    state["layer1.0.downsample.0.weight"] = torch.randn(256, 128, 1, 1, generator=g)
    for k, (c_in, c_out) in enumerate([(3, 64), (64, 64), (64, 128)], 1):
        state[f"conv{k}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g)
        random_bn(state, f"bn{k}", c_out, g)
    random_bn(state, "layer4.2.bn3", 2048, g)
    path = tmp_path_factory.mktemp("initmodel") / "resnet50_v2.pth"
    torch.save(state, path)
    return str(path), state


# BAM's best.pth keeps the deep stem inside layer0's Sequential: conv1 bn1 relu conv2 bn2 relu ...
BAM_STEM = {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7}


def bam_best(state, path, stem=BAM_STEM):
    """BAM's base-learner best.pth: {'state_dict': module.layer0..4 (stem renamed into layer0's
    Sequential), the same tensors again under module.encoder.*, module.ppm.*, module.cls.*} (BAM
    model/PSPNet.py)."""
    out = {}
    for k, v in state.items():
        head = k.split(".")[0]
        if head in stem:
            out[f"layer0.{stem[head]}.{k.split('.', 1)[1]}"] = v
        elif head.startswith("layer"):
            out[k] = v
    for k, v in list(out.items()):
        out[f"encoder.{k[5]}.{k.split('.', 1)[1]}"] = v
    out.update(
        {
            "ppm.features.0.1.weight": torch.zeros(512, 2048, 1, 1),
            "cls.0.weight": torch.zeros(512, 4096, 3, 3),
            "cls.4.weight": torch.zeros(16, 512, 1, 1),
            "cls.4.bias": torch.zeros(16),
        }
    )
    torch.save(
        {"epoch": 41, "state_dict": {"module." + k: v for k, v in out.items()}, "optimizer": {}},
        path,
    )
    return str(path)


# ---------- your own images, and damaged files ----------
@pytest.fixture
def own_episode(synthetic_root, metatrained, tmp_path):
    """The first evaluation episode of the benchmark, its files written as a user's would be: the
    query and support JPEGs (the world's own bytes) and a 0/255 support mask PNG."""
    import shutil

    ckpt = common.load_checkpoint(metatrained[1])
    a = ckpt["args"]
    ids = common.image_pools(synthetic_root)[1]
    counts = common.class_pixel_counts(synthetic_root, ids, 20)
    ds = common.EpisodeDataset(
        synthetic_root,
        ids,
        counts,
        "synthetic",
        a["novel"],
        1,
        a["min_pixels"],
        7,
        test_size=a["test_size"],
        episodes=1,
    )
    query, cls, (support,) = ds.episodes[0]
    for i in (query, support):
        shutil.copy(os.path.join(synthetic_root, common.IMAGES, i + ".jpg"), tmp_path / f"{i}.jpg")
    mask = (common.read_mask(synthetic_root, support, 20) == cls).astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "support_mask.png"), mask)
    return ds, tmp_path, query, support


def own_image_argv(folder, query, support, out):
    """--support IMAGE MASK --query IMAGE --out DIR of the own_episode fixture's files."""
    support_pair = [str(folder / f"{support}.jpg"), str(folder / "support_mask.png")]
    return ["--support", *support_pair, "--query", str(folder / f"{query}.jpg"), "--out", str(out)]


def legend_rows(overlay):
    """The height of the white legend bar on top of a NAME_overlay.png (BGR): the rows white but
    for their text."""
    white_rows = (overlay == 255).all(-1).mean(1) > 0.5
    return int(np.argmin(white_rows))  # the first row of the pictures


def corrupt_middle(src, dst):
    """A JPEG with 100 bytes of its entropy-coded data overwritten: it decodes "successfully" into
    garbage."""
    data = bytearray(Path(src).read_bytes())
    pos = int(len(data) * 0.45)
    # no 0xff among the new bytes: no marker appears
    data[pos : pos + 100] = bytes((k * 37 + 11) % 255 for k in range(100))
    Path(dst).write_bytes(data)


def truncate(path, keep=0.5):
    """The file cut to its first `keep` share of bytes, as a copy that was interrupted."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * keep)])
