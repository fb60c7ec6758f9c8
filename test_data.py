"""Tests of the data: the synthetic worlds (worlds.py) and the data stage (prepare_data.py) on small
inputs in the real VOC, SBD and COCO layouts, written here. The sections follow worlds.py's, then
prepare_data.py's."""

import glob
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import common
import prepare_data
import worlds
from common import KitError
from conftest import (
    HERE,
    SBD_MASKS,
    VOC_MASKS,
    H,
    W,
    assert_scores_add_up,
    box,
    lists,
    mask_with,
    read_png,
    rle_counts,
    snapshot,
    tree_bytes,
    truncate,
    write_p_png,
)

# ---------- worlds.py 2-3. The two worlds: what their images and masks hold ----------
# one small world of each kind, shared by the read-only tests
N_TRAIN = 100
N_VAL = 80
SIZE = 96
WORLDS = ["synthetic", "synthetic2"]


@pytest.fixture(scope="module", params=WORLDS)
def root(request, tmp_path_factory):
    """One small world of each kind, shared by the read-only tests."""
    return worlds.make_synthetic(
        str(tmp_path_factory.mktemp(request.param)),
        N_TRAIN,
        N_VAL,
        SIZE,
        seed=0,
        world=request.param,
    )


def _masks(root, split):
    """Dict id -> mask array for one split, read back from disk."""
    files = sorted(glob.glob(os.path.join(root, "SegmentationClassAug", f"{split}_*.png")))
    return {os.path.basename(f)[:-4]: cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in files}


def _mtimes(root):
    """Modification times of every file below root."""
    return {
        p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
    }


def mask_bytes(root, name):
    """The bytes of one mask file of a world."""
    return Path(root, "SegmentationClassAug", name).read_bytes()


def marker(root):
    """The world's marker: its parameters and checksum."""
    with open(os.path.join(root, ".complete")) as f:
        return json.load(f)


def test_layout_and_counts(root):
    assert len(glob.glob(os.path.join(root, "JPEGImages", "*.jpg"))) == N_TRAIN + N_VAL
    assert len(_masks(root, "train")) == N_TRAIN
    assert len(_masks(root, "val")) == N_VAL
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")) as f:
        ids = f.read().split()
    assert ids == sorted(ids) == [f"val_{i:06d}" for i in range(N_VAL)]
    assert not any(i.startswith("train_") for i in ids)
    params = marker(root)
    world = params["world"]
    assert re.fullmatch("[0-9a-f]{16}", params.pop("checksum"))
    assert params == dict(
        world=world, kind="benchmark", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=0
    )
    names = {
        "synthetic": worlds.SYNTHETIC_CLASS_NAMES,
        "synthetic2": worlds.SYNTHETIC2_CLASS_NAMES,
    }[world]
    assert world in root
    assert len(names) == 20 == len(set(names))


def test_mask_format_and_content(root):
    for split in ("train", "val"):
        for name, m in _masks(root, split).items():
            assert m.dtype == np.uint8, name
            assert m.shape == (SIZE, SIZE), name
            vals = set(np.unique(m).tolist())
            assert vals <= set(range(21)) | {255}, (name, vals)
            assert ((m > 0) & (m < 255)).any(), f"{name} has no object pixel"
            img = cv2.imread(os.path.join(root, "JPEGImages", name + ".jpg"), cv2.IMREAD_UNCHANGED)
            assert img.shape == (SIZE, SIZE, 3)
            assert img.dtype == np.uint8
            assert img.std() > 10  # textured, not blank


def test_void_band_is_thin(root):
    total = interior = 0
    for m in _masks(root, "val").values():
        void = (m == 255).astype(np.uint8)
        assert void.any()
        assert void.mean() < 0.25
        # void pixels with no non-void 8-neighbour exist only where bands of touching objects merge
        interior += cv2.erode(void, np.ones((3, 3), np.uint8), borderValue=0).sum()
        total += void.sum()
    assert interior / total < 0.1


def test_all_classes_in_both_splits(root):
    for split in ("train", "val"):
        present = set().union(*(set(np.unique(m).tolist()) for m in _masks(root, split).values()))
        assert set(range(1, 21)) <= present, (split, set(range(1, 21)) - present)


def test_multi_class_share(root):
    multi = [
        len(set(np.unique(m).tolist()) - {0, 255}) >= 2 for m in _masks(root, "train").values()
    ]
    assert np.mean(multi) >= 0.3


def test_foreground_fraction_plausible(root):
    fg = np.mean([((m > 0) & (m < 255)).mean() for m in _masks(root, "train").values()])
    assert 0.1 < fg < 0.5


# ---------- worlds.py 4. Writing a world: seeded, pinned, its stand-in, one per folder ----------
@pytest.mark.parametrize("world", WORLDS)
def test_determinism(tmp_path, world):
    a = worlds.make_synthetic(str(tmp_path / "a"), n_train=20, n_val=10, seed=3, world=world)
    b = worlds.make_synthetic(str(tmp_path / "b"), n_train=20, n_val=10, seed=3, world=world)
    c = worlds.make_synthetic(str(tmp_path / "c"), n_train=20, n_val=10, seed=4, world=world)
    names = sorted(os.listdir(os.path.join(a, "SegmentationClassAug")))
    assert names == sorted(os.listdir(os.path.join(b, "SegmentationClassAug")))
    assert all(mask_bytes(a, n) == mask_bytes(b, n) for n in names)
    assert sum(mask_bytes(a, n) != mask_bytes(c, n) for n in names) > len(names) // 2


CHECKSUMS = {
    ("synthetic", "benchmark"): "4ba0beabeed78d76",
    ("synthetic", "standin"): "0c4ef776552d8085",
    ("synthetic2", "benchmark"): "262db54dc1c11b12",
    ("synthetic2", "standin"): "70298948b4628869",
}


@pytest.mark.parametrize("world,kind", sorted(CHECKSUMS))
def test_world_checksums_are_pinned(tmp_path, world, kind):
    """The worlds are drawn with numpy alone: the same pixels and labels on every machine (12 + 6
    images here; the checksum covers the decoded JPEGs and the labels, i.e. what the stages
    read)."""
    r = worlds.make_synthetic(
        str(tmp_path / "w"), 12, 6 if kind == "benchmark" else 0, world=world, kind=kind
    )
    assert marker(r)["checksum"] == CHECKSUMS[world, kind]


def test_standin_root_is_another_draw_with_distractors(tmp_path):
    bench = worlds.make_synthetic(str(tmp_path / "b"), 30, 0, world="synthetic2")
    stand = worlds.make_synthetic(str(tmp_path / "s"), 30, 0, world="synthetic2", kind="standin")
    a = _masks(bench, "train")
    b = _masks(stand, "train")
    # other images, same names
    assert a.keys() == b.keys()
    assert all(not np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(KitError, match="ImageNet stand-in of synthetic2, which has no val images"):
        worlds.ensure_synthetic(stand, "synthetic2")


def test_the_two_worlds_differ_and_each_stays_in_its_folder(tmp_path, capsys):
    one = worlds.make_synthetic(str(tmp_path / "one"), 40, 10, 48)
    two = worlds.make_synthetic(str(tmp_path / "two"), 40, 150, 48, world="synthetic2")
    masks = [np.stack(list(_masks(r, "train").values())) for r in (one, two)]
    objects = [[len(set(np.unique(m).tolist()) - {0, 255}) for m in ms] for ms in masks]
    assert max(objects[1]) <= 2 < max(objects[0])  # synthetic2: 1-2 objects; synthetic: up to 4
    with pytest.raises(
        KitError, match="holds the synthetic world, not synthetic2: pass --dataset synthetic"
    ):
        worlds.ensure_synthetic(one, "synthetic2")
    # world 1 is never written over world 2
    with pytest.raises(
        KitError,
        match="holds a synthetic2 root made by this kit: did you mean --dataset synthetic2",
    ):
        worlds.make_synthetic(two, 40, 10, 48, flag="--out")
    import nonparametric_eval

    r = nonparametric_eval.main(
        [
            "--dataset",
            "synthetic2",
            "--data-root",
            two,
            "--episodes",
            "2",
            "--seeds",
            "1",
            "--workers",
            "0",
            "--min-pixels",
            "16",
            "--test-size",
            "48",
        ]
    )
    assert "synthetic2 fold 0" in capsys.readouterr().out
    # scored on synthetic2's fold-0 novel classes, its numbers adding up
    assert set(r["class_iou"]) == set(common.novel_classes("synthetic2", 0)) == {1, 2, 3, 4, 5}
    assert_scores_add_up(r)


def test_idempotent_no_rewrite(tmp_path):
    r = worlds.make_synthetic(str(tmp_path / "d"), n_train=10, n_val=5)
    for p in _mtimes(r):  # backdate every file so that any rewrite is detectable
        os.utime(p, ns=(10**18, 10**18))
    assert worlds.make_synthetic(r, n_train=10, n_val=5) == r
    assert set(_mtimes(r).values()) == {10**18}


def test_changed_parameters_regenerate(tmp_path):
    r = worlds.make_synthetic(str(tmp_path / "f"), n_train=10, n_val=5)
    worlds.make_synthetic(r, n_train=6, n_val=5)
    assert len(_masks(r, "train")) == 6
    assert marker(r)["n_train"] == 6
    # the rebuilt world is the one a new folder gets with these parameters, file for file
    fresh = worlds.make_synthetic(str(tmp_path / "fresh"), n_train=6, n_val=5)
    assert marker(r) == marker(fresh)
    names = sorted(os.listdir(os.path.join(fresh, "SegmentationClassAug")))
    assert sorted(os.listdir(os.path.join(r, "SegmentationClassAug"))) == names
    assert all(mask_bytes(r, n) == mask_bytes(fresh, n) for n in names)


def test_two_processes_generate_one_world(tmp_path):
    """Stage scripts started side by side both generate on first use; each must see a complete
    world."""
    root = str(tmp_path / "w")
    cmd = [
        sys.executable,
        "-c",
        "import worlds, sys; worlds.make_synthetic(sys.argv[1], 40, 10, 48); "
        "import os; print(len(os.listdir(os.path.join(sys.argv[1], 'SegmentationClassAug'))))",
        root,
    ]
    procs = [subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate()[0].split()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["50", "50"]
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary folder left behind
    ref = worlds.make_synthetic(str(tmp_path / "ref"), 40, 10, 48)
    names = os.listdir(os.path.join(ref, "SegmentationClassAug"))
    assert all(mask_bytes(root, n) == mask_bytes(ref, n) for n in names)


def test_world_appears_whole_even_if_another_run_publishes_first(tmp_path, monkeypatch):
    """Deterministic version of the race: mid-generation, root is untouched; then another run
    publishes the same world first; this run keeps it and leaves no temporary folder."""
    root = str(tmp_path / "w")
    render = worlds._render
    calls = []
    seen = {}
    spec = worlds.WORLDS["synthetic"]

    def spy(rng, size, *more):
        calls.append(1)
        if len(calls) == 5:  # a quarter of the way through this run's 20 images
            seen["root mid-generation"] = os.path.exists(root)
            monkeypatch.setitem(spec, "render", render)
            worlds.make_synthetic(root, 16, 4, 32)  # the other run, start to finish
        return render(rng, size, *more)

    monkeypatch.setitem(spec, "render", spy)
    assert worlds.make_synthetic(root, 16, 4, 32) == root
    assert seen == {"root mid-generation": False}
    assert len(os.listdir(os.path.join(root, "SegmentationClassAug"))) == 20
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        KitError, match="is not empty and was not made by this kit.*new or empty folder"
    ):
        worlds.make_synthetic(str(tmp_path), n_train=5, n_val=2)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_synthetic_world_without_marker_is_refused(tmp_path):
    r = worlds.make_synthetic(str(tmp_path / "e"), n_train=10, n_val=5)
    os.remove(os.path.join(r, common.SYNTHETIC_MARKER))  # no longer recognisably the kit's own
    before = tree_bytes(r)
    with pytest.raises(KitError, match="looks like a prepared VOC/COCO root"):
        worlds.make_synthetic(r, n_train=10, n_val=5)
    assert tree_bytes(r) == before
    # an empty folder is fine
    empty = tmp_path / "empty"
    empty.mkdir()
    assert worlds.make_synthetic(str(empty), n_train=4, n_val=2) == str(empty)


def test_rebuilding_a_world_never_deletes_the_users_files(tmp_path):
    root = tmp_path / "world"
    worlds.make_synthetic(str(root), 6, 3, 32)
    (root / "my_notes.txt").write_text("mine")
    with pytest.raises(KitError, match=f"{root} holds my_notes.txt, which this kit did not write"):
        worlds.make_synthetic(str(root), 8, 3, 32)
    assert (root / "my_notes.txt").read_text() == "mine"
    assert len(os.listdir(root / common.IMAGES)) == 9
    (root / "my_notes.txt").unlink()
    worlds.make_synthetic(str(root), 8, 3, 32)  # only the kit's own files there: it is rebuilt
    assert len(os.listdir(root / common.IMAGES)) == 11


# ---------- prepare_data.py 1. PASCAL-5i / COCO-20i from the official downloads ----------
def test_pascal_from_sbd_mat(voc, sbd, tmp_path, capsys):
    out = str(tmp_path / "out")
    counts = prepare_data.prepare_pascal(voc, sbd, out)
    assert counts == {"val": 2, "train": 2, "train_noval": 3, "trainaug": 4, "oslsm": 4, "masks": 6}
    text = capsys.readouterr().out
    assert "WARNING" in text
    assert "1449" in text
    assert "5953" in text
    assert "10582" in text
    L = lists(out)
    assert L["val"] == ["2007_000003", "2007_000004"]
    assert L["train"] == ["2007_000001", "2007_000002"]
    assert L["train_noval"] == ["2007_000002", "2008_000010", "2008_000011"]
    assert L["trainaug"] == ["2007_000001", "2007_000002", "2008_000010", "2008_000011"]
    seg = os.path.join(out, "SegmentationClassAug")
    assert sorted(f[:-4] for f in os.listdir(seg)) == sorted(set(VOC_MASKS) | set(SBD_MASKS))
    for i, m in VOC_MASKS.items():  # palette indices (incl. 255), VOC wins over SBD
        np.testing.assert_array_equal(read_png(os.path.join(seg, i + ".png")), m)
    for i in ("2008_000010", "2008_000011"):
        np.testing.assert_array_equal(read_png(os.path.join(seg, i + ".png")), SBD_MASKS[i])
    link = os.path.join(out, "JPEGImages", "2008_000010.jpg")
    assert os.path.islink(link)
    assert os.readlink(link) == os.path.abspath(os.path.join(voc, "JPEGImages", "2008_000010.jpg"))
    assert not os.path.exists(os.path.join(out, "JPEGImages", "2009_000099.jpg"))
    before = snapshot(out)
    assert prepare_data.prepare_pascal(voc, sbd, out) == counts  # idempotent
    assert snapshot(out) == before
    assert not [f for f in os.listdir(seg) if "tmp" in f]


def test_pascal_train_noval_file(voc, sbd, tmp_path):
    with open(os.path.join(sbd, "train_noval.txt"), "w") as f:
        f.write("2008_000010\n2007_000003\n")  # a VOC val id is still dropped
    out = str(tmp_path / "out")
    counts = prepare_data.prepare_pascal(voc, sbd, out)
    assert lists(out)["train_noval"] == ["2008_000010"]
    assert counts["train_noval"] == 1
    assert counts["oslsm"] == 3
    assert counts["trainaug"] == 4


def test_pascal_from_aug(voc, tmp_path):
    aug = tmp_path / "SegmentationClassAug"
    aug.mkdir()
    cv2.imwrite(str(aug / "2007_000002.png"), np.full((H, W), 4, np.uint8))  # VOC must win
    cv2.imwrite(str(aug / "2008_000010.png"), mask_with(11, 6))
    out = str(tmp_path / "out")
    counts = prepare_data.prepare_pascal(voc, None, out, aug=str(aug))
    assert counts == {"val": 2, "train": 2, "train_noval": 2, "trainaug": 3, "oslsm": 3, "masks": 5}
    L = lists(out)
    assert L["trainaug"] == ["2007_000001", "2007_000002", "2008_000010"]
    assert L["train_noval"] == ["2007_000002", "2008_000010"]
    seg = os.path.join(out, "SegmentationClassAug")
    np.testing.assert_array_equal(
        read_png(os.path.join(seg, "2007_000002.png")), VOC_MASKS["2007_000002"]
    )
    np.testing.assert_array_equal(read_png(os.path.join(seg, "2008_000010.png")), mask_with(11, 6))


def test_pascal_missing_folder(voc, tmp_path):
    seg = os.path.join(voc, "SegmentationClass")
    os.rename(seg, seg + "_gone")
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, None, str(tmp_path / "out"), aug=str(tmp_path))
    assert seg in str(e.value)
    assert "SegmentationClass/" in str(e.value)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(
            os.path.join(voc, "nope"), None, str(tmp_path / "out"), aug=str(tmp_path)
        )
    assert os.path.join(voc, "nope") in str(e.value)


def test_pascal_missing_sbd_cls(voc, sbd, tmp_path):
    os.rename(os.path.join(sbd, "cls"), os.path.join(sbd, "cls_gone"))
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / "out"))
    assert os.path.join(sbd, "cls") in str(e.value)


def test_pascal_bad_value_rejected(voc, sbd, tmp_path):
    bad = os.path.join(voc, "SegmentationClass", "2007_000004.png")
    write_p_png(bad, mask_with(37))
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / "out"))
    assert bad in str(e.value)
    assert "37" in str(e.value)


def test_pascal_bad_value_in_mat_rejected(voc, sbd, tmp_path):
    import scipy.io

    bad = os.path.join(sbd, "cls", "2008_000011.mat")
    scipy.io.savemat(bad, {"GTcls": {"Segmentation": mask_with(37)}})
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / "out"))
    assert bad in str(e.value)
    assert "37" in str(e.value)


def test_pascal_rgb_mask_rejected(voc, tmp_path):
    bad = os.path.join(voc, "SegmentationClass", "2007_000001.png")
    Image.fromarray(np.zeros((H, W, 3), np.uint8), "RGB").save(bad)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, None, str(tmp_path / "out"), aug=str(tmp_path))
    assert bad in str(e.value)


def test_pascal_no_scipy_message(voc, sbd, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    monkeypatch.setitem(sys.modules, "scipy", None)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / "out"))
    assert "pip install scipy" in str(e.value)
    assert "--aug" in str(e.value)


def test_coco(coco, tmp_path, capsys):
    out = str(tmp_path / "out")
    counts = prepare_data.prepare_coco(coco, out)
    assert counts == {"train": 1, "val": 1}
    assert "WARNING" in capsys.readouterr().out
    L = lists(out)
    assert L == {"train": ["COCO_train2014_000000000009"], "val": ["COCO_val2014_000000000042"]}
    seg = os.path.join(out, "SegmentationClassAug")
    assert sorted(os.listdir(seg)) == [
        "COCO_train2014_000000000009.png",
        "COCO_val2014_000000000042.png",
    ]
    exp = np.zeros((H, W), np.uint8)
    exp[0:H, 12:18] = 255  # crowd over background only
    exp[2:12, 2:14] = 1  # polygon rectangle, category id 1 -> class 1
    exp[5:9, 6:10] = 3  # small instance (category 90 -> class 3) painted last, on top
    got = read_png(os.path.join(seg, "COCO_train2014_000000000009.png"))
    np.testing.assert_array_equal(got, exp)
    exp_val = np.zeros((H, W), np.uint8)
    exp_val[10:14, 1:5] = 2  # compressed RLE, category id 3 -> class 2
    np.testing.assert_array_equal(
        read_png(os.path.join(seg, "COCO_val2014_000000000042.png")), exp_val
    )
    link = os.path.join(out, "JPEGImages", "COCO_train2014_000000000009.jpg")
    assert os.readlink(link) == os.path.abspath(
        os.path.join(coco, "train2014", "COCO_train2014_000000000009.jpg")
    )
    assert sorted(os.listdir(os.path.join(out, "JPEGImages"))) == [
        "COCO_train2014_000000000009.jpg",
        "COCO_val2014_000000000042.jpg",
    ]
    before = snapshot(out)
    assert prepare_data.prepare_coco(coco, out) == counts
    assert snapshot(out) == before


def test_coco_rle_helper_matches_pycocotools(coco):
    from pycocotools import mask as mu

    m = box(5, 9, 6, 10)
    np.testing.assert_array_equal(
        mu.decode(mu.frPyObjects({"size": [H, W], "counts": rle_counts(m)}, H, W)), m
    )
    poly = mu.decode(mu.merge(mu.frPyObjects([[2, 2, 14, 2, 14, 12, 2, 12]], H, W)))
    np.testing.assert_array_equal(poly, box(2, 12, 2, 14))


def test_coco_missing_annotation(coco, tmp_path):
    ann = os.path.join(coco, "annotations", "instances_val2014.json")
    os.remove(ann)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_coco(coco, str(tmp_path / "out"))
    assert ann in str(e.value)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_coco(str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert os.path.join(str(tmp_path / "nowhere"), "annotations") in str(e.value)


def test_prepare_refuses_a_foreign_out_and_reruns_into_its_own(voc, sbd, tmp_path):
    out = tmp_path / "somewhere"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(
        KitError, match="--out .*somewhere is not empty and was not made by this kit for pascal"
    ):
        prepare_data.prepare_pascal(voc, sbd, str(out))
    assert os.listdir(out) == ["thesis.tex"]
    assert (out / "thesis.tex").read_text() == "years of work"
    syn = worlds.make_synthetic(str(tmp_path / "syn"), 4, 2, 32)
    with pytest.raises(
        KitError, match="synthetic root made by this kit: did you mean --dataset synthetic"
    ):
        prepare_data.prepare_pascal(voc, sbd, syn)
    own = str(tmp_path / "own")
    counts = prepare_data.prepare_pascal(voc, sbd, own)
    with open(os.path.join(own, common.PREPARED_MARKER)) as f:
        assert json.load(f)["dataset"] == "pascal"
    before = snapshot(own)
    # re-running into its own output is allowed, and writes the same root
    assert prepare_data.prepare_pascal(voc, sbd, own) == counts
    assert snapshot(own) == before


# ---------- prepare_data.py 2. verify, and the command line ----------
def test_cli_make_synthetic_and_verify(tmp_path):
    root = str(tmp_path / "w")
    cmd = [sys.executable, os.path.join(HERE, "prepare_data.py")]
    subprocess.run(
        cmd + ["synthetic", "--out", root, "--n-train", "30", "--n-val", "20", "--size", "48"],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        cmd + ["verify", "--dataset", "synthetic", "--data-root", root, "--min-pixels", "64"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    val_ids = common.read_list(os.path.join(root, common.LISTS, "val.txt"))
    masks = {
        i: cv2.imread(os.path.join(root, common.MASKS, i + ".png"), cv2.IMREAD_UNCHANGED)
        for i in val_ids
    }
    # val images with >= 64 pixels of a novel class, counted here independently
    for fold in range(4):
        novel = range(5 * fold + 1, 5 * fold + 6)
        n = sum(any((m == c).sum() >= 64 for c in novel) for m in masks.values())
        assert f"fold {fold}: train " in out
        assert f"val {n}" in out.split(f"fold {fold}:")[1].splitlines()[0]
    bad = subprocess.run(
        cmd + ["verify", "--dataset", "pascal", "--data-root", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert "--data-root" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_verify_lists_every_bad_file(tmp_path):
    root = worlds.make_synthetic(str(tmp_path / "w"), 12, 6, 48)
    bad = [os.path.join(root, common.IMAGES, f"train_00000{i}.jpg") for i in (1, 7)]
    for p in bad:
        truncate(p, 0.8)
    cv2.imwrite(os.path.join(root, common.MASKS, "val_000002.png"), np.full((48, 48), 77, np.uint8))
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "prepare_data.py"),
            "verify",
            "--dataset",
            "synthetic",
            "--data-root",
            root,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "verify: 3 of the 18 images or masks" in r.stderr
    assert all(p in r.stdout for p in bad)
    assert "val_000002.png has value 77" in r.stdout


def test_verify_reads_the_roots_own_marker(voc, sbd, tmp_path, capsys):
    out = str(tmp_path / "pascal")
    counts = prepare_data.prepare_pascal(voc, sbd, out)
    capsys.readouterr()
    prepare_data.main(["verify", "--data-root", out])  # the PASCAL settings, not the synthetic ones
    said = capsys.readouterr().out
    assert re.search(
        rf"pascal at {out}: train pool \d+ images \(oslsm\), val \d+; pixel rule >= 2048", said
    )
    # the pools are those prepare_data.py wrote: 4 images in the oslsm pool, 2 in val
    pools = f"train pool {counts['oslsm']} images (oslsm), val {counts['val']}; pixel rule >= 2048"
    assert f"pascal at {out}: {pools}" in said
    assert (counts["oslsm"], counts["val"]) == (4, 2)
    with pytest.raises(KitError, match="--dataset synthetic2: .* holds pascal data"):
        prepare_data.main(["verify", "--dataset", "synthetic2", "--data-root", out])


def test_verify_fails_on_an_empty_val_list(tmp_path, capsys):
    """A root whose val.txt lists nothing has no test: verify stops with one line naming the list
    and exits non-zero (it used to print empty pools and exit 0)."""
    root = worlds.make_synthetic(str(tmp_path / "w"), 12, 6, 48)
    val_list = os.path.join(root, common.LISTS, "val.txt")
    with open(val_list, "w") as f:
        f.write("")
    with pytest.raises(KitError, match="val.txt lists no image"):
        prepare_data.main(["verify", "--dataset", "synthetic", "--data-root", root])


def test_the_stand_in_never_trains_on_a_benchmark_root(tmp_path):
    """pretrain_bcpt.py --method generic with a benchmark's --data-root would learn the novel
    classes' labels as ImageNet never could: refused before any work."""
    import pretrain_bcpt

    root = worlds.make_synthetic(str(tmp_path / "w"), 12, 6, 48)
    argv = ["--method", "generic", "--data-root", root, "--out", str(tmp_path / "run")]
    with pytest.raises(KitError, match="the ImageNet stand-in must not see its novel classes"):
        pretrain_bcpt.main(argv)
    assert not os.path.exists(tmp_path / "run")
