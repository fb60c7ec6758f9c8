"""Tests of the stages, end to end on the CPU: pre-training, the non-parametric test, meta-training
and evaluation, the tables beside the paper, the peers' weight files, and your own images."""

import glob
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluation
import own_images
import worlds
from common import KitError
from conftest import (
    HERE,
    bam_best,
    blocks,
    corrupt_middle,
    make_root,
    meta_args,
    np_args,
    pretrain_args,
    random_bn,
    write_p_png,
)


def test_generic_loss_by_hand():
    """--method generic: the classes present in each crop's mask are its labels (0 and 255 are
    none), BCE of the linear layer on the globally pooled last layer, mean over images x classes."""
    from types import SimpleNamespace

    import pretrain_bcpt

    emb = torch.tensor(
        [[[[1.0, 3.0]], [[0.0, 2.0]]], [[[2.0, 2.0]], [[-1.0, -1.0]]]]
    )  # (2, D=2, 1, 2)
    # pooled: image 0 (2, 1), image 1 (2, -1)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 classes
    b = torch.tensor([0.0, -1.0, 0.5])
    net = SimpleNamespace(linear=lambda e: torch.einsum("cd,bdhw->bchw", W, e) + b[:, None, None])
    y = torch.tensor([[[1, 3]], [[0, 255]]])  # image 0: classes 1 and 3; image 1: none
    seen = []
    loss, out = pretrain_bcpt.generic_step(
        _Wrap(net, emb), torch.zeros(2, 3, 1, 2), y, SimpleNamespace(base=[1, 2, 3]), seen.append
    )
    # logits: image 0 (2, 1) -> [2, 0, 3.5]; image 1 (2, -1) -> [2, -2, 1.5]; labels [1, 0, 1], [0,
    # 0, 0]
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731  BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)
    by_hand = (sp(-2) + sp(0) + sp(-3.5) + sp(2) + sp(-2) + sp(1.5)) / 6
    assert loss.item() == pytest.approx(by_hand) and seen == [loss]
    assert out["top1"] == 0.5  # image 0's best class (3) is present; image 1 has none


class _Wrap(torch.nn.Module):
    """A stand-in network for generic_step: fixed embeddings and a fixed linear layer."""

    def __init__(self, ns, emb):
        super().__init__()
        self.ns, self.emb = ns, emb

    def forward(self, x):
        return self.emb

    def linear(self, e):
        return self.ns.linear(e)


def test_generic_is_undilated_fold_free_and_labelled(tmp_path, capsys):
    """The stand-in trains the backbone undilated (output stride 32, as ImageNet weights are), on
    its own root, with no fold; its last.pt is accepted as --weights / --pretrained and named in
    tables."""
    import nonparametric_eval
    import pretrain_bcpt

    x = torch.zeros(1, 3, 64, 64)
    assert common.build_backbone("resnet18", "none", dilate=False)(x)[4].shape[-1] == 2  # 64 / 32
    assert (
        common.build_backbone("resnet18", "none")(x)[4].shape[-1] == 8
    )  # PSPNet's dilated stride 8
    stand = worlds.make_synthetic(
        str(tmp_path / "stand"), 24, 0, world="synthetic2", kind="standin"
    )
    bench = worlds.make_synthetic(str(tmp_path / "bench"), 60, 120, world="synthetic2")
    with pytest.raises(KitError, match="--fold: --method generic has no folds"):
        pretrain_bcpt.parse_args(["--method", "generic", "--fold", "1"])
    a = pretrain_bcpt.parse_args(["--method", "generic", "--dataset", "synthetic2"])
    assert (a.fold, a.epochs, a.lr, a.data_root) == (
        None,
        30,
        0.03,
        common.STANDIN_ROOTS["synthetic2"],
    )
    pretrain_bcpt.main(
        [
            "--method",
            "generic",
            "--dataset",
            "synthetic2",
            "--data-root",
            stand,
            "--out",
            str(tmp_path / "g"),
            "--workers",
            "0",
            "--batch",
            "4",
            "--max-iters",
            "2",
        ]
    )
    g = str(tmp_path / "g" / "last.pt")
    ckpt = common.load_checkpoint(g)
    assert ckpt["args"]["method"] == "generic" and ckpt["args"]["fold"] is None
    assert (
        ckpt["model"]["W.weight"].shape[0] == 20 and "W.bias" in ckpt["model"]
    )  # every class, with a bias
    assert evaluation.pretrain_label(g) == "imagenet stand-in"
    pretrain_bcpt.main(
        pretrain_args(
            bench, tmp_path / "b", "--dataset", "synthetic2", "--weights", g, "--max-iters", "1"
        )
    )
    assert (
        evaluation.pretrain_label(str(tmp_path / "b" / "last.pt"))
        == "bcpt K=6 Eq4=sum from stand-in"
    )
    r = nonparametric_eval.main(
        [
            "--dataset",
            "synthetic2",
            "--data-root",
            bench,
            "--pretrained",
            g,
            "--episodes",
            "3",
            "--seeds",
            "1",
            "--workers",
            "0",
            "--min-pixels",
            "16",
        ]
    )
    assert "imagenet stand-in" in capsys.readouterr().out and 0 <= r["miou"] <= 100


def test_novel_images_drop_leaves_no_novel_pixel_in_any_batch(
    synthetic_root, tmp_path, monkeypatch
):
    """--novel-images drop: every image a pre-training batch draws has no novel pixel; keep draws
    some."""
    import pretrain_bcpt

    drawn = []

    class Spy(pretrain_bcpt.BaseClassDataset):
        def __getitem__(self, i):
            drawn.append(self.ids[i % len(self.ids)])
            return super().__getitem__(i)

    monkeypatch.setattr(pretrain_bcpt, "BaseClassDataset", Spy)
    novel = common.novel_classes("synthetic", 0)
    has_novel = lambda i: bool(np.isin(common.read_mask(synthetic_root, i, 20), novel).any())  # noqa: E731
    for mode, out in (("drop", "d"), ("keep", "k")):
        drawn.clear()
        pretrain_bcpt.main(
            pretrain_args(
                synthetic_root,
                tmp_path / out,
                "--novel-images",
                mode,
                "--max-iters",
                "8",
                "--method",
                "standard",
            )
        )
        hits = [
            has_novel(i) for i in drawn if i.startswith("train_")
        ]  # not the final base-class check's val
        assert len(hits) >= 32 and (not any(hits) if mode == "drop" else any(hits))
    assert (
        evaluation.pretrain_label(str(tmp_path / "d" / "last.pt")) == "standard linear drop-novel"
    )


@pytest.mark.parametrize("method", ["standard", "bcpt"])
def test_pretrain_smoke(synthetic_root, tmp_path, method, capsys):
    import pretrain_bcpt

    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root, tmp_path, "--method", method, "--max-iters", "3", "--vis-clusters", "2"
        )
    )
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == 3 and ckpt["args"]["method"] == method and ckpt["args"]["fold"] == 0
    assert ("centers" in ckpt["model"]) == (method == "bcpt")
    out = capsys.readouterr().out
    assert "[3/3] loss" in out and (("clusters [" in out) == (method == "bcpt"))
    if method == "bcpt":
        assert len(os.listdir(tmp_path / "clusters")) == 2
        assert (
            ckpt["model"]["centers"].shape == (512, 6) and ckpt["model"]["W.weight"].shape[0] == 15
        )


def test_vis_clusters_standard_says_why_and_bcpt_draws_a_key(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt

    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root,
            tmp_path / "s",
            "--method",
            "standard",
            "--max-iters",
            "1",
            "--vis-clusters",
            "2",
        )
    )
    assert "standard pre-training has no background clusters" in capsys.readouterr().out
    assert not (tmp_path / "s" / "clusters").exists()
    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root, tmp_path / "b", "--max-iters", "1", "--vis-clusters", "1", "--K", "3"
        )
    )
    pic = cv2.imread(str(tmp_path / "b" / "clusters" / "000.png"))
    assert (
        pic.shape[0] >= 256 + 3 * 22 and pic.shape[1] >= 2 * 256
    )  # upscaled crop pair + a 3-line key


def test_psp_head_shape_loss_and_label(synthetic_root, tmp_path):
    import pretrain_bcpt

    head = pretrain_bcpt.PSPHead(512, 16)
    assert head(torch.randn(2, 512, 7, 9)).shape == (2, 16, 7, 9) and len(head.ppm) == 4
    assert (
        head.cls[0].in_channels == 1024 and head.ppm[0][1].out_channels == 128
    )  # 2D in, D/4 per bin
    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root, tmp_path, "--method", "standard", "--head", "psp", "--max-iters", "2"
        )
    )
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert "psp.cls.4.weight" in ckpt["model"] and "W.weight" not in ckpt["model"]
    assert evaluation.pretrain_label(str(tmp_path / "last.pt")) == "standard psp"
    with pytest.raises(KitError, match="--head psp is for --method standard"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--head", "psp"))


def test_pretrain_select_best_val_keeps_best(synthetic_root, tmp_path):
    import pretrain_bcpt

    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root,
            tmp_path,
            "--batch",
            "25",
            "--select",
            "best-val",
            "--eq3",
            "base",
            "--max-iters",
            "8",
        )
    )  # 200 images: 8 iterations an epoch
    best, last = (common.load_checkpoint(str(tmp_path / f)) for f in ("best.pt", "last.pt"))
    assert (
        best["select"] == "best-val"
        and best["iter"] == 8 == best["best"]["iter"]
        and last["select"] == "last"
    )
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "val_miou" in line]
    assert len(records) == 1 and records[0]["new_best"] and 0 <= records[0]["val_miou"] <= 100
    assert (
        evaluation.pretrain_label(str(tmp_path / "best.pt")) == "bcpt K=6 Eq4=sum Eq3=base best-val"
    )


EVAL_KEYS = {
    "miou",
    "fb_iou",
    "miou_std",
    "fb_iou_std",
    "class_iou",
    "per_seed",
    "episodes",
    "seeds",
    "shot",
    "fold",
    "dataset",
    "backbone",
    "pretrained",
    "select",
    "protocol",
}


@pytest.mark.parametrize("shot", [1, 5])
def test_pipeline_smoke_pretrain_metatrain_evaluate(metatrained, tmp_path, shot):
    import evaluate

    ckpt = common.load_checkpoint(metatrained[shot])
    assert ckpt["stage"] == "metatrain" and ckpt["iter"] == 2 and ckpt["args"]["shot"] == shot
    path = tmp_path / "r.json"
    compare = (
        ["--compare", metatrained[shot]] if shot == 1 else []
    )  # a second model's column in the pictures
    evaluate.main(
        [
            "--checkpoint",
            metatrained[shot],
            "--episodes",
            "5",
            "--seeds",
            "510",
            "7",
            "--workers",
            "0",
            "--json",
            str(path),
            "--vis",
            str(tmp_path / "vis"),
            "--vis-count",
            "2",
            *compare,
        ]
    )
    r = json.loads(path.read_text())
    assert (
        EVAL_KEYS <= set(r) and r["shot"] == shot and r["episodes"] == 5 and r["seeds"] == [510, 7]
    )
    assert r["pretrained"] == "bcpt K=6 Eq4=sum" and r["select"] == "last"
    assert set(r["class_iou"]) == {"1", "2", "3", "4", "5"}
    seeds = [s["miou"] for s in r["per_seed"]]
    assert r["miou"] == pytest.approx(np.mean(seeds)) and r["miou_std"] == pytest.approx(
        np.std(seeds, ddof=1)
    )
    assert 0 <= r["miou"] <= 100 and 0 <= r["fb_iou"] <= 100
    pngs = sorted(os.listdir(tmp_path / "vis"))
    pic = cv2.imread(str(tmp_path / "vis" / pngs[0]))
    assert (
        len(pngs) == 2 and pic.shape[1] == (4 if compare else 3) * 256
    )  # support, query, prediction(s)


def test_evaluation_same_seed_same_numbers_any_workers(metatrained):
    import evaluate

    base = ["--checkpoint", metatrained[1], "--episodes", "6", "--seeds", "42"]
    a = evaluate.main(base + ["--workers", "0"])
    b = evaluate.main(base + ["--workers", "0"])
    c = evaluate.main(base + ["--workers", "2"])
    assert a == b == c


def test_evaluate_refuses_wrong_inputs(metatrained, pretrained):
    import evaluate

    with pytest.raises(KitError, match="--fold 0 but this run has --fold 1"):
        evaluate.main(["--checkpoint", metatrained[1], "--fold", "1", "--episodes", "2"])
    with pytest.raises(KitError, match="not a metatrain.py checkpoint"):
        evaluate.main(["--checkpoint", pretrained["bcpt"], "--episodes", "2"])


def test_pretrain_label_names_each_variant(tmp_path):
    def label(select="last", **args):
        path = str(tmp_path / "c.pt")
        torch.save({"args": args, "model": {}, "select": select}, path)
        return evaluation.pretrain_label(path)

    assert (
        evaluation.pretrain_label("none") == "none"
        and evaluation.pretrain_label("imagenet") == "imagenet"
    )
    assert label(method="standard", K=6, alpha=0.1) == "standard linear"  # before --head
    assert label(method="standard", head="psp", select="best-val") == "standard psp best-val"
    assert label(method="bcpt", K=6, eq3="base", loss_scale="mean") == "bcpt K=6 Eq4=mean Eq3=base"
    torch.save({"state_dict": {}}, str(tmp_path / "best.pth"))
    assert evaluation.pretrain_label(str(tmp_path / "best.pth")) == "standard (BAM best.pth)"
    assert (
        label(method="bcpt", K=6, alpha=0.1, no_guidance=False) == "bcpt K=6 Eq4=sum"
    )  # before --loss-scale
    assert (
        label(method="bcpt", K=6, alpha=0.1, no_guidance=False, loss_scale="sum")
        == "bcpt K=6 Eq4=sum"
    )
    assert (
        label(method="bcpt", K=6, alpha=0.1, no_guidance=False, loss_scale="mean")
        == "bcpt K=6 Eq4=mean"
    )
    assert (
        label(method="bcpt", K=2, alpha=0.1, no_guidance=True, loss_scale="sum")
        == "bcpt no-guidance K=2 Eq4=sum"
    )
    assert (
        label(method="bcpt", K=6, alpha=0.0, no_guidance=False, loss_scale="mean")
        == "bcpt K=6 alpha=0 Eq4=mean"
    )
    variants = [
        dict(method="bcpt", K=k, alpha=a, no_guidance=g, loss_scale=s, eq3=e, select=b)
        for k in (2, 6)
        for a in (0.0, 0.1)
        for g in (False, True)
        for s in ("sum", "mean")
        for e in ("centres", "base")
        for b in ("last", "best-val")
    ]
    variants += [
        dict(method="standard", head=h, select=b)
        for h in ("psp", "linear")
        for b in ("last", "best-val")
    ]
    assert (
        len({label(**v) for v in variants}) == len(variants) == 2**6 + 4
    )  # each variant its own table row


def test_frozen_features_once_per_image_same_numbers(
    synthetic_root, pretrained, tmp_path, monkeypatch
):
    """The non-parametric test keeps each image's layer 4 (a support's: per class) for reuse: the
    same numbers as running the backbone on every episode, with fewer backbone passes."""
    import nonparametric_eval

    calls = []
    real = nonparametric_eval.frozen_features
    monkeypatch.setattr(
        nonparametric_eval, "frozen_features", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    kept = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "a.json"))
    n_kept = len(calls)
    monkeypatch.setattr(
        nonparametric_eval, "CACHE_BYTES", 0
    )  # nothing kept: one pass per image per episode
    calls.clear()
    fresh = nonparametric_eval.main(
        np_args(synthetic_root, pretrained["bcpt"], tmp_path / "b.json")
    )
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert kept == fresh and a["sweep"] == b["sweep"] and a["per_seed"] == b["per_seed"]
    assert n_kept < len(calls)


def test_test_geometry_changes_the_scored_label(synthetic_root, metatrained, tmp_path, capsys):
    """pfenet (BAM/PFENet): scored on the original-size label; hsnet (HSNet/DCAMA): on the label
    resized to the test size. Recorded in the results and named in the table row."""
    import evaluate

    ids, counts = common.image_pools(synthetic_root, "aug", False)[1], None
    counts = common.class_pixel_counts(synthetic_root, ids, 20)
    for geometry, side in (("pfenet", 64), ("hsnet", 48)):
        ds = common.EpisodeDataset(
            synthetic_root,
            ids,
            counts,
            "synthetic",
            [1, 2, 3, 4, 5],
            1,
            64,
            7,
            test_size=48,
            episodes=2,
            geometry=geometry,
        )
        assert ds[0]["raw_label"].shape == (side, side) and ds[0]["query"].shape[-1] == 48
    for geometry in ("pfenet", "hsnet"):
        evaluate.main(
            [
                "--checkpoint",
                metatrained[1],
                "--episodes",
                "3",
                "--seeds",
                "1",
                "--workers",
                "0",
                "--test-geometry",
                geometry,
                "--test-size",
                "48",
                "--json",
                str(tmp_path / f"{geometry}.json"),
            ]
        )
        assert (
            json.loads((tmp_path / f"{geometry}.json").read_text())["protocol"]["test_geometry"]
            == geometry
        )
    capsys.readouterr()
    evaluate.main(["--table", str(tmp_path / "pfenet.json"), str(tmp_path / "hsnet.json")])
    rows = [
        line.split("|")[4].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| synth")
    ]
    assert sorted(rows) == ["bcpt K=6 Eq4=sum", "bcpt K=6 Eq4=sum @hsnet"]


def test_collapsed_model_is_flagged_not_averaged_in_silently(tmp_path, capsys):
    meter = common.FewShotIoU([1, 2])
    for cls in (1, 2):
        meter.update(torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long), cls)
    r = evaluation.summarize([meter], [510])
    assert r["all_background"] and r["per_seed"][0]["foreground_answers"] == 0
    row = dict(
        dataset="synthetic",
        backbone="resnet18",
        method="ASPP-PFENet",
        pretrained="none",
        shot=1,
        fold=0,
        per_seed=[{"miou": 1.0}],
        protocol={},
    )
    for name, (miou, flat) in {"a": (1.0, True), "b": (30.0, False)}.items():
        (tmp_path / f"{name}.json").write_text(
            json.dumps({**row, "miou": miou, "all_background": flat})
        )

    assert "1.00 (all background)" in evaluation.format_table([str(tmp_path / "a.json")])
    assert "1.00 (all background)" in evaluation.format_table(
        [str(tmp_path / "a.json")], "base-threshold"
    )  # its mIoU
    assert "15.50+-20.51 (1 of 2 all background)" in evaluation.format_table(
        [str(tmp_path / f"{n}.json") for n in "ab"]
    )


def _markdown_rows(section):
    """The table rows of a PROTOCOL.md section, as lists of cells ("-" for none)."""
    text = (
        open(os.path.join(HERE, "PROTOCOL.md"))
        .read()
        .split(f"### {section} ")[1]
        .split("\n### ")[0]
    )
    lines = [line for line in text.splitlines() if line.startswith("| ") and "Fold-0" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_reference_numbers_are_protocols_and_agree_with_the_papers_text():
    """reference_numbers.py holds PROTOCOL.md 11.1 (the paper's Tables 1-4) and 11.2 (BAM's base
    learners) cell for cell; three printed means are not their folds' mean; the differences are the
    ones the paper's text states (Sec. 3.2: "BCPT surpasses Standard by 1.51% and 2.61%" on PASCAL
    ResNet-50, "0.69% and 0.73%" on COCO; Table 2: "outperforms Standard and ImageNet by 5.25% and
    8.67%"; Sec. 3.3: BMC "brings 1.55%", OCG "extra 1.06%")."""
    from reference_numbers import REFERENCE

    names = {"PASCAL-5i": "pascal", "COCO-20i": "coco", "VGG16": "vgg16", "ResNet50": "resnet50"}
    number = lambda text: None if text == "-" else float(text)  # noqa: E731
    protocol = {}
    for table, dataset, backbone, row, shot, *values in _markdown_rows("11.1")[:21]:
        key = (f"paper-table{table}", names[dataset], names[backbone], row, int(shot))
        protocol[key] = [number(v) for v in values] + [None]
    rows34 = {"Standard (neither)": "Standard", "BMC": "BMC", "BMC + OCG": "BMC+OCG"}
    for table, row, *values in _markdown_rows("11.1")[21:]:
        name = rows34.get(row, row.replace(" ", ""))
        protocol[(f"paper-table{table}", "pascal", "resnet50", name, 5)] = [
            number(v) for v in values
        ]
    for dataset, backbone, *folds in _markdown_rows("11.2"):
        key = ("bam-base-learner", names[dataset], names[backbone], "standard", None)
        protocol[key] = [float(v) for v in folds] + [None, None]
    ours = {k: v["folds"] + [v["all"], v["fb_iou"]] for k, v in REFERENCE.items() if k in protocol}
    assert ours == protocol and len(protocol) == 31

    paper = {k[:5]: v for k, v in ours.items()}
    off = {
        k: sum(v[:4]) / 4
        for k, v in paper.items()
        if None not in v[:5] and abs(sum(v[:4]) / 4 - v[4]) > 0.006
    }
    assert off == pytest.approx(
        {
            ("paper-table1", "pascal", "resnet50", "Standard", 1): 65.425,
            ("paper-table1", "pascal", "resnet50", "BCPT", 1): 66.8025,
            ("paper-table1", "pascal", "resnet50", "BCPT", 5): 71.0825,
            ("paper-table4", "pascal", "resnet50", "K=6", 5): 71.0825,
        }
    )  # the paper's Mean as printed

    def gap(table, dataset, row, shot, other="BCPT"):
        ours_ = paper[f"paper-table{table}", dataset, "resnet50", other, shot][4]
        theirs = paper[f"paper-table{table}", dataset, "resnet50", row, shot][4]
        return round(ours_ - theirs, 2)

    assert (gap(1, "pascal", "Standard", 1), gap(1, "pascal", "Standard", 5)) == (1.51, 2.61)
    assert (gap(1, "coco", "Standard", 1), gap(1, "coco", "Standard", 5)) == (0.69, 0.73)
    assert (gap(2, "pascal", "Standard", 1), gap(2, "pascal", "ImageNet", 1)) == (5.25, 8.67)
    assert gap(3, "pascal", "Standard", 5, other="BMC") == 1.55
    assert gap(3, "pascal", "BMC", 5, other="BMC+OCG") == 1.06
    same = paper["paper-table1", "pascal", "resnet50", "BCPT", 5][4]
    assert paper["paper-table3", "pascal", "resnet50", "BMC+OCG", 5][4] == same


def test_table_prints_the_papers_number_beside_ours(tmp_path, capsys):
    """Three training seeds of the non-parametric BCPT row on PASCAL fold 0 (made-up numbers): the
    paper's 38.52, the difference, the spread of the seeds and BAM test.py's
    best-of-evaluation-seeds figure."""
    import evaluate

    files = []
    for k, miou in enumerate([37.0, 38.0, 40.0]):
        r = dict(
            dataset="pascal",
            backbone="resnet50v2",
            method="non-parametric prior",
            pretrained="bcpt K=6 Eq4=sum",
            shot=1,
            fold=0,
            miou=miou,
            per_seed=[{"miou": miou - 1}, {"miou": miou + 1}],
            protocol={},
        )
        files.append(str(tmp_path / f"s{k}.json"))
        open(files[-1], "w").write(json.dumps(r))
    evaluate.main(["--table", *files])
    out = capsys.readouterr().out
    assert "Beside the paper (Table 2, pascal resnet50 BCPT 1-shot):" in out
    assert (
        "fold 0: ours 38.33 (training seeds 37.00-40.00), paper 38.52, difference -0.19: inside "
        "the spread of our seeds; best of the evaluation seeds (BAM test.py's Best_mIoU) 41.00"
    ) in out
    assert "| pascal | resnet50v2 | non-parametric prior | bcpt K=6 Eq4=sum | 38.33+-1.53 |" in out


def test_results_md_miniature_runs_end_to_end(tmp_path):
    """RESULTS.md's commands, verbatim, on the default world with every run cut to 2 iterations and
    2 episodes: the paper's rows (stand-in, Standard, BCPT either reading of Eq. 4), random init and
    the ablation, both tables."""
    script = open(os.path.join(HERE, "RESULTS.md")).read().split("```bash\n")[1].split("```")[0]
    for name in glob.glob(os.path.join(HERE, "*.py")):
        os.symlink(name, tmp_path / os.path.basename(name))
    env = {
        **os.environ,
        "W": "synthetic2",
        "S": "0",
        "E": "2",
        "X": "--max-iters 2 --batch 2 --save-every 1",
        "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
    }
    out = subprocess.run(
        ["bash", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {
        line.split("|")[4].strip()
        for line in out.stdout.splitlines()
        if line.startswith("| synthetic2")
    }
    assert {
        "none",
        "imagenet stand-in",
        "standard linear from stand-in",
        "bcpt K=6 Eq4=sum from stand-in",
        "bcpt K=6 Eq4=mean from stand-in",
        "standard linear drop-novel from stand-in",
        "bcpt K=6 Eq4=sum drop-novel from stand-in",
    } <= rows
    assert len(glob.glob(str(tmp_path / "runs/mini/synthetic2/np/*.json"))) == 7
    assert len(glob.glob(str(tmp_path / "runs/mini/synthetic2/meta/*.json"))) == 5
    for root, checksum in (
        ("synthetic2", "f95f45a9e6d48547"),
        ("synthetic2-standin", "c8fe55f547bc55d6"),
    ):
        with open(
            tmp_path / "data" / root / ".complete"
        ) as f:  # the worlds RESULTS.md's numbers were measured on
            assert json.load(f)["checksum"] == checksum


def test_nonparametric_json_each_method_sweep_and_table(
    synthetic_root, pretrained, tmp_path, capsys
):
    import evaluate
    import nonparametric_eval

    files = []
    for name, weights in [("none", "none"), *pretrained.items()]:
        path = tmp_path / f"{name}.json"
        r = nonparametric_eval.main(np_args(synthetic_root, weights, path))
        j = json.loads(path.read_text())
        assert EVAL_KEYS <= set(j) and j["threshold"] == 0.5 and j["pretrained"].split()[0] == name
        assert j["sweep"]["0.5"] == j["miou"] == r["miou"]  # the headline is the sweep's 0.5 entry
        assert len(j["sweep"]) == 9 and all(0 <= v <= 100 for v in j["sweep"].values())
        files.append(str(path))
    fold1 = tmp_path / "none-f1.json"
    nonparametric_eval.main(np_args(synthetic_root, "none", fold1, "--fold", "1"))
    capsys.readouterr()
    evaluate.main(["--table", *files, str(fold1)])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| synthetic")]
    assert len(rows) == 3 and {r.split("|")[4].strip() for r in rows} == {
        "none",
        "standard linear",
        "bcpt K=6 Eq4=sum",
    }
    none_row = next(r for r in rows if r.split("|")[4].strip() == "none").split("|")
    cells = [c.strip() for c in none_row[5:10]]  # folds 0-3 and mean
    want0, want1 = (json.loads(open(f).read())["miou"] for f in (files[0], fold1))
    assert cells[0] == f"{want0:.2f}" and cells[1] == f"{want1:.2f}" and cells[2] == cells[3] == "-"
    assert cells[4] == f"{(want0 + want1) / 2:.2f}*"


def test_base_threshold_reads_no_novel_episode(synthetic_root, pretrained, tmp_path, monkeypatch):
    import nonparametric_eval

    seen, get = [], common.EpisodeDataset.__getitem__

    def spy(self, idx):
        item = get(self, idx)
        seen.append((frozenset(self.classes), item["cls"]))
        return item

    monkeypatch.setattr(common.EpisodeDataset, "__getitem__", spy)
    path = tmp_path / "r.json"
    nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], path))
    j = json.loads(path.read_text())
    novel, base = frozenset(range(1, 6)), frozenset(range(6, 21))
    assert {classes for classes, _ in seen} == {
        novel,
        base,
    }  # two phases: novel episodes, base episodes
    assert all(c in classes for classes, c in seen)  # every base-phase episode is of a base class
    assert j["base_threshold"] == float(
        max(j["base_sweep"], key=j["base_sweep"].get)
    )  # chosen on base only
    assert (
        j["miou_base_threshold"] == j["sweep"][f"{j['base_threshold']:g}"]
        and "miou_base_threshold_std" in j
    )
    for metric, want in (
        ("base-threshold", j["miou_base_threshold"]),
        ("best-sweep", max(j["sweep"].values())),
    ):
        assert f"| {want:.2f} |" in evaluation.format_table([str(path)], metric)


def test_resnet50v2_loads_the_peers_file_and_bam_best(resnet50_v2_file, tmp_path, capsys):
    path, state = resnet50_v2_file
    net = common.build_backbone("resnet50v2", path)
    assert (
        net.channels == [128, 256, 512, 1024, 2048] and net.layer1[0].conv1.weight.shape[1] == 128
    )
    assert torch.equal(net.layer0[3].weight, state["conv2.weight"])  # stem conv2
    assert torch.equal(net.layer0[7].running_mean, state["bn3.running_mean"])  # stem bn3 statistics
    assert torch.equal(net.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    with torch.no_grad():
        feats = net.eval()(torch.zeros(1, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == [17, 17, 9, 9, 9]  # output stride 8, as PSPNet
    best = bam_best(
        state,
        tmp_path / "best.pth",
        {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7},
    )
    capsys.readouterr()
    net2 = common.build_backbone("resnet50v2", best)
    assert "took layer0-layer4 (" in capsys.readouterr().out
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values())
    )
    with pytest.raises(
        KitError, match="best.pth holds a resnet50v2 backbone but this run has --backbone vgg16"
    ):
        common.build_backbone("vgg16", best)
    with pytest.raises(
        KitError, match="_v2.pth holds a resnet50v2 backbone but this run has --backbone resnet50"
    ):
        common.build_backbone("resnet50", path)
    broken = {k: v for k, v in state.items() if k != "layer3.1.conv2.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(
        KitError, match="does not match the backbone: Missing key.*layer3.1.conv2.weight"
    ):
        common.build_backbone("resnet50v2", str(tmp_path / "broken.pth"))


def test_vgg16_bn_file_and_bam_vgg_best(tmp_path):
    import torchvision

    ref = torchvision.models.vgg16_bn(weights=None)
    g = torch.Generator().manual_seed(1)
    state = ref.state_dict()
    random_bn(state, "features.41", 512, g)  # the last BN of layer4
    torch.save(state, tmp_path / "vgg16_bn.pth")
    net = common.build_backbone("vgg16", str(tmp_path / "vgg16_bn.pth"))
    assert torch.equal(
        net.layer4[7].running_mean, state["features.41.running_mean"]
    )  # features 34.. -> layer4 0..
    bam = {
        f"layer{i}.{k - a}.{p}": v
        for i, (a, b) in enumerate([(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)])
        for key, v in state.items()
        if key.startswith("features.")
        for k, p in [(int(key.split(".")[1]), key.split(".", 2)[2])]
        if a <= k < b
    }
    torch.save({"state_dict": {"module." + k: v for k, v in bam.items()}}, tmp_path / "best.pth")
    net2 = common.build_backbone("vgg16", str(tmp_path / "best.pth"))
    assert torch.equal(net2.layer4[7].running_mean, state["features.41.running_mean"])
    with pytest.raises(
        KitError, match="holds a vgg16 backbone but this run has --backbone resnet18"
    ):
        common.build_backbone("resnet18", str(tmp_path / "best.pth"))


def test_bam_best_through_every_stage(resnet50_v2_file, synthetic_root, tmp_path, capsys):
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt

    path, state = resnet50_v2_file
    best = bam_best(
        state,
        tmp_path / "best.pth",
        {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7},
    )
    small = ["--backbone", "resnet50v2", "--max-iters", "1", "--batch", "2"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "p", "--weights", best, *small))
    metatrain.main(meta_args(synthetic_root, tmp_path / "m", best, 1, *small))
    r = nonparametric_eval.main(
        np_args(synthetic_root, best, tmp_path / "np.json", "--backbone", "resnet50v2")
    )
    assert "took layer0-layer4" in capsys.readouterr().out and 0 <= r["miou"] <= 100
    assert json.loads((tmp_path / "np.json").read_text())["pretrained"] == "standard (BAM best.pth)"
    m = common.load_checkpoint(str(tmp_path / "m" / "last.pt"))
    assert torch.equal(
        m["model"]["backbone.layer0.3.weight"], state["conv2.weight"]
    )  # frozen, as loaded


def test_shot_fusion_weighted_five_shot(synthetic_root, tmp_path):
    import evaluate
    import metatrain

    metatrain.main(
        meta_args(
            synthetic_root, tmp_path, "none", 5, "--shot-fusion", "weighted", "--max-iters", "2"
        )
    )
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["args"]["shot_fusion"] == "weighted" and "shot_weights.rw.0.weight" in ckpt["model"]
    evaluate.main(
        [
            "--checkpoint",
            str(tmp_path / "last.pt"),
            "--episodes",
            "2",
            "--seeds",
            "1",
            "--workers",
            "0",
            "--json",
            str(tmp_path / "r.json"),
        ]
    )
    assert json.loads((tmp_path / "r.json").read_text())["shot_fusion"] == "weighted"


def test_real_data_defaults_pool_and_lr(tmp_path):
    import pretrain_bcpt

    a = pretrain_bcpt.parse_args(
        ["--dataset", "pascal", "--data-root", str(tmp_path), "--method", "standard"]
    )
    assert a.train_pool == "oslsm" and a.head == "psp" and a.backbone_lr_mult == 1.0
    c = pretrain_bcpt.parse_args(
        [
            "--dataset",
            "coco",
            "--data-root",
            str(tmp_path),
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--method",
            "standard",
        ]
    )
    _, opt = pretrain_bcpt.build(c, torch.device("cpu"))
    assert c.train_pool == "aug" and [g["lr"] for g in opt.param_groups] == [
        2.5e-3,
        2.5e-3,
    ]  # BAM's COCO base
    root = make_root(tmp_path)
    with pytest.raises(
        KitError,
        match="--train-pool oslsm .*needs .*train.txt.*--train-noval train_noval.txt.*"
        "--train-pool aug",
    ):
        common.image_pools(root, "oslsm")


def test_own_images_give_the_benchmark_prediction(own_episode, metatrained):
    import evaluate

    ds, d, query, support = own_episode
    evaluate.main(
        [
            "--checkpoint",
            metatrained[1],
            "--support",
            str(d / f"{support}.jpg"),
            str(d / "support_mask.png"),
            "--query",
            str(d / f"{query}.jpg"),
            "--out",
            str(d / "preds"),
        ]
    )
    mask = cv2.imread(str(d / "preds" / f"{query}_mask.png"), cv2.IMREAD_UNCHANGED)
    h, w = common.read_mask(ds.root, query, 20).shape
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    overlay = cv2.imread(str(d / "preds" / f"{query}_overlay.png"))
    assert overlay.shape[0] == h and overlay.shape[1] > w  # the query, then the support beside it
    model = evaluate.load_model(common.load_checkpoint(metatrained[1]), torch.device("cpu"))
    item = torch.utils.data.default_collate([ds[0]])
    with torch.no_grad():
        scores, _ = common.logits_at_label_size(
            evaluation.predict_meta(model, item), item["raw_label"][0]
        )
    assert np.array_equal(
        mask // 255, scores.argmax(1)[0, :h, :w].numpy()
    )  # what the benchmark predicts


def test_own_images_nonparametric_and_mask_formats(own_episode, pretrained, capsys):
    import nonparametric_eval

    ds, d, query, support = own_episode
    m = cv2.imread(str(d / "support_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    palette = Image.fromarray(m.astype(np.uint8) * 7, mode="P")  # palette indices, as VOC's masks
    palette.putpalette([0, 0, 0] + [200, 0, 0] * 255)
    palette.save(d / "palette.png")
    cv2.imwrite(
        str(d / "rgb.png"), np.stack([np.zeros_like(m), m * 128, m * 0], -1).astype(np.uint8)
    )
    for mask in ("palette.png", "rgb.png"):
        assert np.array_equal(
            own_images.read_user_mask(str(d / mask), "img", m.shape), m.astype(np.uint8)
        )
    nonparametric_eval.main(
        [
            "--pretrained",
            pretrained["bcpt"],
            "--support",
            str(d / f"{support}.jpg"),
            str(d / "palette.png"),
            "--query",
            str(d / f"{query}.jpg"),
            "--out",
            str(d / "np"),
            "--test-size",
            "64",
        ]
    )
    assert {f"{query}_{k}.png" for k in ("mask", "overlay", "prior")} <= set(os.listdir(d / "np"))


def test_own_images_bad_input_names_the_file(own_episode, metatrained, tmp_path):
    import evaluate

    ds, d, query, support = own_episode
    (d / "notes.jpg").write_text("not an image")
    cv2.imwrite(str(d / "small.png"), np.ones((5, 5), np.uint8))
    cv2.imwrite(
        str(d / "empty.png"), np.zeros(cv2.imread(str(d / "support_mask.png")).shape[:2], np.uint8)
    )
    base = [
        "--checkpoint",
        metatrained[1],
        "--query",
        str(d / f"{query}.jpg"),
        "--out",
        str(d / "p"),
    ]
    sup = str(d / f"{support}.jpg")
    for support_args, message in (
        (["notes.jpg", "support_mask.png"], "cannot read image .*notes.jpg"),
        ([sup, "small.png"], "mask .*small.png is 5x5 but its image .* is"),
        ([sup, "empty.png"], "mask .*empty.png has no foreground pixel"),
    ):
        with pytest.raises(KitError, match=message):
            evaluate.main(base + ["--support", *[str(d / a) for a in support_args]])
    with pytest.raises(KitError, match="argument --support: expected 2 arguments"):
        evaluate.main(base + ["--support", sup])


def test_own_images_need_only_the_checkpoint(tmp_path, capsys):
    import nonparametric_eval
    import pretrain_bcpt

    root = make_root(tmp_path)
    pretrain_bcpt.main(
        [
            "--dataset",
            "pascal",
            "--data-root",
            root,
            "--train-pool",
            "aug",
            "--backbone",
            "resnet18",
            "--weights",
            "none",
            "--out",
            str(tmp_path / "p"),
            "--max-iters",
            "1",
            "--workers",
            "0",
            "--crop",
            "48",
            "--batch",
            "2",
        ]
    )
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "x.jpg"), blocks([1, 0, 0, 2])[0])
    img, mask = blocks([1, 0, 0, 0])
    cv2.imwrite(str(tmp_path / "s.png"), img)
    cv2.imwrite(str(tmp_path / "m.png"), mask * 255)
    own = [
        "--pretrained",
        str(tmp_path / "p" / "last.pt"),
        "--support",
        str(tmp_path / "s.png"),
        str(tmp_path / "m.png"),
        "--query",
        str(tmp_path / "a" / "x.jpg"),
        str(tmp_path / "b" / "x.jpg"),
    ]
    args = nonparametric_eval.parse_args(own + ["--out", str(tmp_path / "o")])
    assert (args.dataset, args.backbone, args.test_size) == (
        "pascal",
        "resnet18",
        473,
    )  # the checkpoint's
    nonparametric_eval.main(own + ["--out", str(tmp_path / "o")])
    assert {"x_mask.png", "x-2_mask.png"} <= set(
        os.listdir(tmp_path / "o")
    )  # two queries named x.jpg
    with pytest.raises(
        KitError, match=r"--backbone resnet50: .*last.pt was made for --backbone resnet18"
    ):
        nonparametric_eval.parse_args(
            own + ["--out", str(tmp_path / "o"), "--backbone", "resnet50"]
        )


def test_every_common_way_of_storing_a_mask(tmp_path):
    m = np.zeros((40, 50), np.uint8)
    m[10:30, 5:25] = 1
    blurred = cv2.GaussianBlur(m * 255, (7, 7), 2)  # anti-aliased edges: many grey values
    voc = m * 15
    voc[9, 5:25] = 255  # a VOC void border beside class 15
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere; the object is the opaque part
    rgba[..., 3] = m * 255
    files = {
        "01.png": m,
        "0255.png": m * 255,
        "rgb.png": np.stack([m * 0, m * 200, m * 0], -1),
        "gray.jpg": m * 255,
        "aa.png": blurred,
        "voc.png": voc,
        "rgba.png": rgba,
    }
    for name, arr in files.items():
        cv2.imwrite(
            str(tmp_path / name),
            arr if arr.ndim == 2 or arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]],
        )
    write_p_png(tmp_path / "palette.png", voc)
    for name in [*files, "palette.png"]:
        got = own_images.read_user_mask(str(tmp_path / name), "img", m.shape)
        expect = m.copy()
        if name in ("voc.png", "palette.png"):
            expect[9, 5:25] = 255  # void, ignored
        if name == "aa.png":
            expect = (blurred > 127).astype(np.uint8)
        assert np.array_equal(got, expect), name


def test_a_jpeg_damaged_in_the_middle_is_caught_by_verify_and_own_images(
    own_episode, metatrained, tmp_path
):
    import evaluate

    ds, d, query, support = own_episode
    corrupt_middle(d / f"{query}.jpg", d / "damaged.jpg")
    assert cv2.imread(str(d / "damaged.jpg")) is not None  # OpenCV alone returns an image
    with pytest.raises(KitError, match=r"cannot read image .*damaged.jpg \(Corrupt JPEG data"):
        evaluate.main(
            [
                "--checkpoint",
                metatrained[1],
                "--support",
                str(d / f"{support}.jpg"),
                str(d / "support_mask.png"),
                "--query",
                str(d / "damaged.jpg"),
                "--out",
                str(d / "p"),
            ]
        )
    root = tmp_path / "world"
    worlds.make_synthetic(str(root), 6, 3, 64)
    corrupt_middle(
        root / common.IMAGES / "train_000002.jpg", root / common.IMAGES / "train_000002.jpg"
    )
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "prepare_data.py"), "verify", "--data-root", str(root)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "train_000002.jpg (Corrupt JPEG data" in r.stdout


def test_episode_log_reproduces_the_reported_miou(metatrained, tmp_path):
    import evaluate

    log, path = tmp_path / "episodes.jsonl", tmp_path / "r.json"
    evaluate.main(
        [
            "--checkpoint",
            metatrained[1],
            "--episodes",
            "6",
            "--seeds",
            "1",
            "2",
            "--workers",
            "0",
            "--episode-log",
            str(log),
            "--json",
            str(path),
        ]
    )
    r, lines = json.loads(path.read_text()), [json.loads(line) for line in open(log)]
    assert len(lines) == 12 and r["run"]["torch"] == torch.__version__
    per_seed = []
    for seed in (1, 2):
        inter, union = {c: 0.0 for c in range(1, 6)}, {c: 0.0 for c in range(1, 6)}
        for e in (e for e in lines if e["seed"] == seed):
            inter[e["class"]] += e["iou"]["ASPP-PFENet"][1]
            union[e["class"]] += e["iou"]["ASPP-PFENet"][3]
        per_seed.append(np.mean([100 * inter[c] / (union[c] + 1e-10) for c in inter]))
    assert r["miou"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert lines[0]["query"] and lines[0]["supports"] and lines[0]["phase"] == "novel"


def test_training_curves_png(synthetic_root, tmp_path):
    import evaluate
    import metatrain
    import pretrain_bcpt

    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "bcpt", "--max-iters", "3"))
    metatrain.main(
        meta_args(
            synthetic_root,
            tmp_path / "meta",
            "none",
            1,
            "--max-iters",
            "2",
            "--select",
            "best-val",
            "--val-every",
            "1",
            "--val-episodes",
            "2",
        )
    )
    out = tmp_path / "curves.png"
    titles = evaluate.main(
        [
            "--curves",
            str(tmp_path / "bcpt" / "log.jsonl"),
            str(tmp_path / "meta" / "log.jsonl"),
            "--out",
            str(out),
        ]
    )
    assert [t.split()[0] for t in titles] == [
        "training",
        "learning",
        "training",
        "share",
        "validation",
    ]
    assert cv2.imread(str(out)).shape[0] > 5 * 150


def test_a_test_reads_only_the_val_list(synthetic_root, pretrained, tmp_path):
    import nonparametric_eval

    r = nonparametric_eval.main(
        np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n.json", "--train-pool", "oslsm")
    )  # the root has no train.txt / train_noval.txt
    assert 0 <= r["miou"] <= 100
