"""Tests of the stages, end to end on the CPU: pre-training, meta-training, the two tests
(evaluate.py, nonparametric_eval.py), the evaluation and its tables beside the paper
(evaluation.py), your own images (own_images.py), and the peers' weights and RESULTS.md through
every stage. The sections follow the pipeline, then evaluation.py's and own_images.py's own
sections."""

import glob
import itertools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
import evaluation
import own_images
import reproduce
import worlds
from common import KitError
from conftest import (
    HERE,
    assert_scores_add_up,
    bam_best,
    blocks,
    corrupt_middle,
    legend_rows,
    make_root,
    meta_args,
    np_args,
    own_image_argv,
    pretrain_args,
    write_p_png,
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


# ---------- pretrain_bcpt.py: one iteration per method (the ImageNet stand-in, generic) ----------
class StandInNet(torch.nn.Module):
    """A stand-in network for generic_step: fixed embeddings and a fixed linear layer W e + b."""

    def __init__(self, emb, W, b):
        super().__init__()
        self.emb = emb
        self.W = W
        self.b = b

    def forward(self, x):
        return self.emb

    def linear(self, e):
        """(B, D, h, w) -> (B, C, h, w)."""
        return torch.einsum("cd,bdhw->bchw", self.W, e) + self.b[:, None, None]


def softplus(v):
    """BCE(z, 1) = softplus(-z), BCE(z, 0) = softplus(z)."""
    return math.log1p(math.exp(v))


def test_generic_loss_by_hand():
    """--method generic: the classes present in each crop's mask are its labels (0 and 255 are
    none), BCE of the linear layer on the globally pooled last layer, mean over images x classes."""
    from types import SimpleNamespace

    import pretrain_bcpt

    # (2, D=2, 1, 2); pooled: image 0 (2, 1), image 1 (2, -1)
    emb = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]], [[[2.0, 2.0]], [[-1.0, -1.0]]]])
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 classes
    b = torch.tensor([0.0, -1.0, 0.5])
    y = torch.tensor([[[1, 3]], [[0, 255]]])  # image 0: classes 1 and 3; image 1: none
    seen = []
    args = SimpleNamespace(base=[1, 2, 3])
    x = torch.zeros(2, 3, 1, 2)
    loss, out = pretrain_bcpt.generic_step(StandInNet(emb, W, b), x, y, args, seen.append)
    # logits: image 0 (2, 1) -> [2, 0, 3.5]; image 1 (2, -1) -> [2, -2, 1.5];
    # labels [1, 0, 1], [0, 0, 0]
    image0 = softplus(-2) + softplus(0) + softplus(-3.5)
    image1 = softplus(2) + softplus(-2) + softplus(1.5)
    assert loss.item() == pytest.approx((image0 + image1) / 6)
    assert seen == [loss]
    assert out["top1"] == 0.5  # image 0's best class (3) is present; image 1 has none


def test_a_world_fine_tunes_the_stand_in_with_the_chosen_recipe(tmp_path):
    """On a world, pre-training from a weights file defaults to lr 0.001 and Eq. 4 as means; from
    random weights to lr 0.01 and sums; a typed flag wins either way."""
    import pretrain_bcpt

    weights = ["--weights", str(tmp_path / "standin.pt")]
    out = ["--out", str(tmp_path / "run")]
    scratch = pretrain_bcpt.parse_args(out)
    assert (scratch.lr, scratch.loss_scale) == (0.01, "sum")
    finetuned = pretrain_bcpt.parse_args([*out, *weights])
    assert (finetuned.lr, finetuned.loss_scale) == (0.001, "mean")
    assert pretrain_bcpt.parse_args([*out, *weights, "--method", "standard"]).lr == 0.001
    typed = pretrain_bcpt.parse_args([*out, *weights, "--lr", "0.01", "--loss-scale", "sum"])
    assert (typed.lr, typed.loss_scale) == (0.01, "sum")


def test_generic_is_undilated_fold_free_and_labelled(tmp_path, capsys):
    """The stand-in trains the backbone undilated (output stride 32, as ImageNet weights are), on
    its own root, with no fold; its last.pt is accepted as --weights / --pretrained and named in
    tables."""
    import nonparametric_eval
    import pretrain_bcpt

    x = torch.zeros(1, 3, 64, 64)
    assert common.build_backbone("resnet18", "none", dilate=False)(x)[4].shape[-1] == 2  # 64 / 32
    assert common.build_backbone("resnet18", "none")(x)[4].shape[-1] == 8  # PSPNet's stride 8
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
    assert ckpt["args"]["method"] == "generic"
    assert ckpt["args"]["fold"] is None
    assert ckpt["model"]["W.weight"].shape[0] == 20  # every class
    assert "W.bias" in ckpt["model"]  # with a bias
    assert evaluation.pretrain_label(g) == "imagenet stand-in"
    pretrain_bcpt.main(
        pretrain_args(
            bench, tmp_path / "b", "--dataset", "synthetic2", "--weights", g, "--max-iters", "1"
        )
    )
    from_stand_in = evaluation.pretrain_label(str(tmp_path / "b" / "last.pt"))
    assert from_stand_in == "bcpt K=6 Eq4=mean from stand-in"  # the recipe from --weights
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
    assert "imagenet stand-in" in capsys.readouterr().out
    # scored on the benchmark's fold-0 novel classes (the stand-in has no fold), adding up
    assert set(r["class_iou"]) == {1, 2, 3, 4, 5}
    assert_scores_add_up(r)


def test_bcpt_step_follows_the_papers_order(synthetic_root, tmp_path):
    """bcpt_step runs Sec. 2's steps in order: the guidance (Eqs. 5-7) moves the centres before the
    forward pass; Eq. 1 moves them after the SGD step, from the batch's assignment to the guided
    centres; a step the NaN check skipped leaves them where the guidance put them."""
    import pretrain_bcpt

    args = pretrain_bcpt.parse_args(pretrain_args(synthetic_root, tmp_path / "run"))
    net, _ = pretrain_bcpt.build(args, torch.device("cpu"))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    y = torch.randint(0, 4, (2, 64, 64))  # background and base classes 1-3
    guidance, centres = net.guidance.clone(), net.centers.clone()
    G, P = common.guidance_step(net.w().detach(), guidance, centres, args.mu)  # Eqs. 5-7
    assert not torch.equal(P, centres)  # the guidance does move them

    seen = []
    forward = net.forward

    def recording_forward(images):
        seen.append((net.guidance.clone(), net.centers.clone()))
        return forward(images)

    net.forward = recording_forward
    pretrain_bcpt.bcpt_step(net, x, y, args, optimise=lambda loss: False)  # the NaN check skipped
    assert torch.equal(seen[0][0], G) and torch.equal(seen[0][1], P)  # guided before the forward
    assert torch.equal(net.centers, P)  # no Eq. 1 without a step

    net.guidance.copy_(guidance)
    net.centers.copy_(centres)
    pretrain_bcpt.bcpt_step(net, x, y, args, optimise=lambda loss: True)  # a step was taken
    emb = forward(x)  # the weights did not change: the same embeddings as in the step
    labels = pretrain_bcpt.downsample_labels(y, emb.shape[-2:])
    _, _, I_bg = common.split_pixels(emb, labels)
    assign = common.cluster_assign(P, I_bg.detach())  # assigned to the guided centres
    P_hat, counts = common.cluster_sums(I_bg.detach(), assign, args.K)
    assert torch.allclose(net.centers, common.momentum_update(P, P_hat, counts, args.mu), atol=0)


def test_what_the_centres_hold_on_a_made_up_case():
    """centre_contents and novel_as_background on pixels whose answer is counted by hand: six
    background pixels on three centres, three of them novel objects."""
    import pretrain_bcpt

    assign = torch.tensor([0, 0, 1, 2, 2, 2])
    is_novel = torch.tensor([True, False, True, False, False, True])
    contents = pretrain_bcpt.centre_contents(assign, is_novel, 4)
    expected = [[1, 1], [1, 0], [1, 2], [0, 0]]  # [novel, real background] per centre
    assert contents.tolist() == expected
    called_background = torch.tensor([True, True, False, True, False, False])
    counted = pretrain_bcpt.novel_as_background(called_background, is_novel)
    assert counted.tolist() == [1, 3]  # one of the three novel pixels called background
    rows = pretrain_bcpt.describe_centres(contents)
    assert rows[2] == pytest.approx([3 / 6, 1 / 3, 2 / 3])
    assert rows[3] == [0.0, 0.0, 0.0]  # a dead centre


def test_dead_centres_and_what_they_hold_are_logged(synthetic_root, tmp_path, capsys):
    """A BCPT run logs, every progress line, how many centres took no pixel in the window and
    over the run, and ends with the novel / real-background share of each centre on the val
    images; both methods end with the share of novel pixels called background."""
    import pretrain_bcpt

    out = tmp_path / "bcpt"
    pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "4", "--log-every", "2"))
    printed = capsys.readouterr().out
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = records
    assert [r["step"] for r in steps] == [2, 4]
    for r in steps:
        window_dead = sum(share == 0 for share in r["clusters"])  # the window's last batch
        assert 0 <= r["dead_centres"] <= window_dead
        assert r["dead_over_run"] <= r["dead_centres"]
    assert all("loss" in r for r in records)  # the log holds progress lines only
    held = json.loads((out / "centres.json").read_text())
    assert len(held["centres"]) == 6
    shares = [row[0] for row in held["centres"]]
    assert sum(shares) == pytest.approx(1.0)
    for share, novel, background in held["centres"]:
        if share:
            assert novel + background == pytest.approx(1.0)
    assert 0 <= held["novel_as_background"] <= 1
    assert "novel-object pixels of the val images called background" in printed
    assert f"dead centres: {held['dead_over_run']} of 6 took no background pixel" in printed
    standard = tmp_path / "standard"
    argv = pretrain_args(synthetic_root, standard, "--method", "standard", "--max-iters", "2")
    pretrain_bcpt.main(argv)
    last = json.loads((standard / "centres.json").read_text())
    assert "centres" not in last
    assert 0 <= last["novel_as_background"] <= 1


# ---------- pretrain_bcpt.py: training (what a batch draws, last.pt, best-val, pictures) ----------
@pytest.mark.parametrize("method", ["standard", "bcpt"])
def test_pretrain_smoke(synthetic_root, tmp_path, method, capsys):
    import pretrain_bcpt

    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root, tmp_path, "--method", method, "--max-iters", "3", "--vis-clusters", "2"
        )
    )
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == 3
    assert ckpt["args"]["method"] == method
    assert ckpt["args"]["fold"] == 0
    assert ("centers" in ckpt["model"]) == (method == "bcpt")
    out = capsys.readouterr().out
    assert "[3/3] loss" in out
    assert ("clusters [" in out) == (method == "bcpt")
    if method == "bcpt":
        assert len(os.listdir(tmp_path / "clusters")) == 2
        assert ckpt["model"]["centers"].shape == (512, 6)
        assert ckpt["model"]["W.weight"].shape[0] == 15


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

    def has_novel(image_id):
        return bool(np.isin(common.read_mask(synthetic_root, image_id, 20), novel).any())

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
        # the training images only, not the final base-class check's val images
        hits = [has_novel(i) for i in drawn if i.startswith("train_")]
        assert len(hits) >= 32
        if mode == "drop":
            assert not any(hits)
        else:
            assert any(hits)
    label = evaluation.pretrain_label(str(tmp_path / "d" / "last.pt"))
    assert label == "standard linear drop-novel"


def test_psp_head_pretraining_and_label(synthetic_root, tmp_path):
    """--head psp (BAM's base learner, common.PSPHead) is saved with the model and named in
    tables; it is for --method standard only."""
    import pretrain_bcpt

    pretrain_bcpt.main(
        pretrain_args(
            synthetic_root, tmp_path, "--method", "standard", "--head", "psp", "--max-iters", "2"
        )
    )
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert "psp.cls.4.weight" in ckpt["model"]
    assert "W.weight" not in ckpt["model"]
    assert evaluation.pretrain_label(str(tmp_path / "last.pt")) == "standard psp"
    with pytest.raises(KitError, match="--head psp is for --method standard"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--head", "psp"))


def test_pretrain_select_best_val_keeps_best(synthetic_root, tmp_path):
    import pretrain_bcpt

    # 200 images: 8 iterations an epoch
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
    )
    best = common.load_checkpoint(str(tmp_path / "best.pt"))
    last = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert best["select"] == "best-val"
    assert best["iter"] == 8 == best["best"]["iter"]
    assert last["select"] == "last"
    with open(tmp_path / "log.jsonl") as f:
        records = [json.loads(line) for line in f if "val_miou" in line]
    assert len(records) == 1
    assert records[0]["new_best"]
    assert 0 <= records[0]["val_miou"] <= 100
    # best.pt records the validation that chose it, and is the model of that iteration: the last
    assert best["best"]["miou"] == records[0]["val_miou"]
    assert best["model"].keys() == last["model"].keys()
    assert all(torch.equal(best["model"][k], last["model"][k]) for k in last["model"])
    label = evaluation.pretrain_label(str(tmp_path / "best.pt"))
    assert label == "bcpt K=6 Eq4=sum Eq3=base best-val"


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
    # an upscaled crop pair + a 3-line key
    assert pic.shape[0] >= 256 + 3 * 22
    assert pic.shape[1] >= 2 * 256


# ---------- metatrain.py: episodic meta-training, mean and weighted shot fusion ----------
def test_shot_fusion_weighted_five_shot(synthetic_root, tmp_path):
    import evaluate
    import metatrain

    metatrain.main(
        meta_args(
            synthetic_root, tmp_path, "none", 5, "--shot-fusion", "weighted", "--max-iters", "2"
        )
    )
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["args"]["shot_fusion"] == "weighted"
    assert "shot_weights.rw.0.weight" in ckpt["model"]
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
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["shot_fusion"] == "weighted"
    assert r["shot"] == 5
    assert_scores_add_up(r)
    # BAM's weights follow their supports, so the fused prediction ignores the supports' order
    model = evaluate.load_model(ckpt, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    query = torch.randn(1, 3, 64, 64, generator=g)
    supports = torch.randn(1, 5, 3, 64, 64, generator=g)
    masks = (torch.rand(1, 5, 64, 64, generator=g) > 0.5).long()
    order = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        logits = model(query, supports, masks)
        shuffled = model(query, supports[:, order], masks[:, order])
    assert torch.allclose(shuffled, logits, atol=1e-5)


# ---------- evaluate.py: the test of a meta-trained model, its pictures and curves ----------
@pytest.mark.parametrize("shot", [1, 5])
def test_pipeline_smoke_pretrain_metatrain_evaluate(metatrained, tmp_path, shot):
    import evaluate

    ckpt = common.load_checkpoint(metatrained[shot])
    assert ckpt["stage"] == "metatrain"
    assert ckpt["iter"] == 2
    assert ckpt["args"]["shot"] == shot
    path = tmp_path / "r.json"
    compare = []
    if shot == 1:  # a second model's column in the pictures
        compare = ["--compare", metatrained[shot]]
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
    assert set(r) >= EVAL_KEYS
    assert r["shot"] == shot
    assert r["episodes"] == 5
    assert r["seeds"] == [510, 7]
    assert r["pretrained"] == "bcpt K=6 Eq4=sum"
    assert r["select"] == "last"
    assert set(r["class_iou"]) == {"1", "2", "3", "4", "5"}
    seeds = [s["miou"] for s in r["per_seed"]]
    assert r["miou"] == pytest.approx(np.mean(seeds))
    assert r["miou_std"] == pytest.approx(np.std(seeds, ddof=1))
    assert 0 <= r["miou"] <= 100
    assert 0 <= r["fb_iou"] <= 100
    assert_scores_add_up(r)
    pngs = sorted(os.listdir(tmp_path / "vis"))
    pic = cv2.imread(str(tmp_path / "vis" / pngs[0]))
    assert len(pngs) == 2
    # support, query, prediction(s)
    assert pic.shape[1] == (4 if compare else 3) * 256


def test_evaluate_refuses_wrong_inputs(metatrained, pretrained):
    import evaluate

    with pytest.raises(KitError, match="--fold 0 but this run has --fold 1"):
        evaluate.main(["--checkpoint", metatrained[1], "--fold", "1", "--episodes", "2"])
    with pytest.raises(KitError, match="not a metatrain.py checkpoint"):
        evaluate.main(["--checkpoint", pretrained["bcpt"], "--episodes", "2"])


def test_test_geometry_changes_the_scored_label(synthetic_root, metatrained, tmp_path, capsys):
    """pfenet (BAM/PFENet): scored on the original-size label; hsnet (HSNet/DCAMA): on the label
    resized to the test size. Recorded in the results and named in the table row."""
    import evaluate

    ids = common.image_pools(synthetic_root, "aug", False)[1]
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
        assert ds[0]["raw_label"].shape == (side, side)
        assert ds[0]["query"].shape[-1] == 48
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
        r = json.loads((tmp_path / f"{geometry}.json").read_text())
        assert r["protocol"]["test_geometry"] == geometry
    capsys.readouterr()
    evaluate.main(["--table", str(tmp_path / "pfenet.json"), str(tmp_path / "hsnet.json")])
    rows = [
        line.split("|")[4].strip()
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("| synth")
    ]
    assert sorted(rows) == ["bcpt K=6 Eq4=sum", "bcpt K=6 Eq4=sum @hsnet"]


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


# ---------- nonparametric_eval.py: the prior of the last layer, thresholded ----------
def test_frozen_features_once_per_image_same_numbers(
    synthetic_root, pretrained, tmp_path, monkeypatch
):
    """The non-parametric test keeps each image's layer 4 (a support's: per class) for reuse: the
    same numbers as running the backbone on every episode, with fewer backbone passes."""
    import nonparametric_eval

    calls = []
    real = nonparametric_eval.frozen_features

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(nonparametric_eval, "frozen_features", counted)
    kept = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "a.json"))
    n_kept = len(calls)
    # nothing kept: one pass per image per episode
    monkeypatch.setattr(nonparametric_eval, "CACHE_BYTES", 0)
    calls.clear()
    fresh = nonparametric_eval.main(
        np_args(synthetic_root, pretrained["bcpt"], tmp_path / "b.json")
    )
    a = json.loads((tmp_path / "a.json").read_text())
    b = json.loads((tmp_path / "b.json").read_text())
    assert kept == fresh
    assert a["sweep"] == b["sweep"]
    assert a["per_seed"] == b["per_seed"]
    assert n_kept < len(calls)


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
        assert set(j) >= EVAL_KEYS
        assert j["threshold"] == 0.5
        assert j["pretrained"].split()[0] == name
        assert j["sweep"]["0.5"] == j["miou"] == r["miou"]  # the headline is the sweep's 0.5 entry
        assert len(j["sweep"]) == 9
        assert all(0 <= v <= 100 for v in j["sweep"].values())
        assert list(j["sweep"]) == [f"{0.1 * k:.1f}" for k in range(1, 10)]  # 0.1 .. 0.9, in order
        assert_scores_add_up(j)
        files.append(str(path))
    # another threshold's run gives the mIoU the sweep scored for it from the same priors
    at_03 = nonparametric_eval.main(
        np_args(synthetic_root, "none", tmp_path / "none-0.3.json", "--threshold", "0.3")
    )
    none_sweep = json.loads(Path(files[0]).read_text())["sweep"]
    assert at_03["miou"] == none_sweep["0.3"]
    fold1 = tmp_path / "none-f1.json"
    nonparametric_eval.main(np_args(synthetic_root, "none", fold1, "--fold", "1"))
    capsys.readouterr()
    evaluate.main(["--table", *files, str(fold1)])
    table = capsys.readouterr().out
    rows = [line for line in table.splitlines() if line.startswith("| synthetic")]
    assert len(rows) == 3
    assert {r.split("|")[4].strip() for r in rows} == {
        "none",
        "standard linear",
        "bcpt K=6 Eq4=sum",
    }
    none_row = next(r for r in rows if r.split("|")[4].strip() == "none").split("|")
    cells = [c.strip() for c in none_row[5:10]]  # folds 0-3 and mean
    want0 = json.loads(Path(files[0]).read_text())["miou"]
    want1 = json.loads(fold1.read_text())["miou"]
    assert cells[0] == f"{want0:.2f}"
    assert cells[1] == f"{want1:.2f}"
    assert cells[2] == cells[3] == "-"
    assert cells[4] == f"{(want0 + want1) / 2:.2f}*"


def test_base_threshold_reads_no_novel_episode(synthetic_root, pretrained, tmp_path, monkeypatch):
    import nonparametric_eval

    seen = []
    get = common.EpisodeDataset.__getitem__

    def spy(self, idx):
        item = get(self, idx)
        seen.append((frozenset(self.classes), item["cls"]))
        return item

    monkeypatch.setattr(common.EpisodeDataset, "__getitem__", spy)
    path = tmp_path / "r.json"
    nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], path))
    j = json.loads(path.read_text())
    novel = frozenset(range(1, 6))
    base = frozenset(range(6, 21))
    # two phases: novel episodes, base episodes
    assert {classes for classes, _ in seen} == {novel, base}
    assert all(c in classes for classes, c in seen)  # every base-phase episode is of a base class
    # chosen on base only
    assert j["base_threshold"] == float(max(j["base_sweep"], key=j["base_sweep"].get))
    assert j["miou_base_threshold"] == j["sweep"][f"{j['base_threshold']:g}"]
    assert "miou_base_threshold_std" in j
    for metric, want in (
        ("base-threshold", j["miou_base_threshold"]),
        ("best-sweep", max(j["sweep"].values())),
    ):
        assert f"| {want:.2f} |" in evaluation.format_table([str(path)], metric)


def test_a_test_reads_only_the_val_list(synthetic_root, pretrained, tmp_path):
    import nonparametric_eval

    # the root has no train.txt / train_noval.txt
    r = nonparametric_eval.main(
        np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n.json", "--train-pool", "oslsm")
    )
    assert 0 <= r["miou"] <= 100
    # the training pool is never read: the numbers are those of the default pool, to the bit
    aug = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "a.json"))
    assert r == aug


# ---------- evaluation.py 2. Episodes and seeds: fixed episodes, scored, summarised ----------
def test_evaluation_same_seed_same_numbers_any_workers(metatrained):
    import evaluate

    base = ["--checkpoint", metatrained[1], "--episodes", "6", "--seeds", "42"]
    a = evaluate.main(base + ["--workers", "0"])
    b = evaluate.main(base + ["--workers", "0"])
    c = evaluate.main(base + ["--workers", "2"])
    assert a == b == c


def test_episode_log_reproduces_the_reported_miou(metatrained, tmp_path):
    import evaluate

    log = tmp_path / "episodes.jsonl"
    path = tmp_path / "r.json"
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
    r = json.loads(path.read_text())
    with open(log) as f:
        lines = [json.loads(line) for line in f]
    assert len(lines) == 12
    assert r["run"]["torch"] == torch.__version__
    per_seed = []
    for seed in (1, 2):
        inter = {c: 0.0 for c in range(1, 6)}
        union = {c: 0.0 for c in range(1, 6)}
        for e in lines:
            if e["seed"] != seed:
                continue
            inter[e["class"]] += e["iou"]["ASPP-PFENet"][1]
            union[e["class"]] += e["iou"]["ASPP-PFENet"][3]
        per_seed.append(np.mean([100 * inter[c] / (union[c] + 1e-10) for c in inter]))
    assert r["miou"] == pytest.approx(np.mean(per_seed), abs=1e-9)
    assert lines[0]["query"]
    assert lines[0]["supports"]
    assert lines[0]["phase"] == "novel"


def test_collapsed_model_is_flagged_not_averaged_in_silently(tmp_path, capsys):
    meter = common.FewShotIoU([1, 2])
    for cls in (1, 2):
        meter.update(torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long), cls)
    r = evaluation.summarize([meter], [510])
    assert r["all_background"]
    assert r["per_seed"][0]["foreground_answers"] == 0
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
    # its mIoU
    by_base = evaluation.format_table([str(tmp_path / "a.json")], "base-threshold")
    assert "1.00 (all background)" in by_base
    assert "15.50+-20.51 (1 of 2 all background)" in evaluation.format_table(
        [str(tmp_path / f"{n}.json") for n in "ab"]
    )


# ---------- evaluation.py 3. Results files and the names of their rows ----------
def test_pretrain_label_names_each_variant(tmp_path):
    def label(select="last", **args):
        path = str(tmp_path / "c.pt")
        torch.save({"args": args, "model": {}, "select": select}, path)
        return evaluation.pretrain_label(path)

    assert evaluation.pretrain_label("none") == "none"
    assert evaluation.pretrain_label("imagenet") == "imagenet"
    assert label(method="standard", K=6, alpha=0.1) == "standard linear"  # before --head
    assert label(method="standard", head="psp", select="best-val") == "standard psp best-val"
    assert label(method="bcpt", K=6, eq3="base", loss_scale="mean") == "bcpt K=6 Eq4=mean Eq3=base"
    torch.save({"state_dict": {}}, str(tmp_path / "best.pth"))
    assert evaluation.pretrain_label(str(tmp_path / "best.pth")) == "standard (BAM best.pth)"
    # before --loss-scale
    assert label(method="bcpt", K=6, alpha=0.1, no_guidance=False) == "bcpt K=6 Eq4=sum"
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
    variants = []
    bcpt_choices = itertools.product(
        (2, 6),
        (0.0, 0.1),
        (False, True),
        ("sum", "mean"),
        ("centres", "base"),
        ("last", "best-val"),
    )
    for k, a, g, s, e, b in bcpt_choices:
        variants.append(
            dict(method="bcpt", K=k, alpha=a, no_guidance=g, loss_scale=s, eq3=e, select=b)
        )
    for h, b in itertools.product(("psp", "linear"), ("last", "best-val")):
        variants.append(dict(method="standard", head=h, select=b))
    # each variant its own table row
    assert len({label(**v) for v in variants}) == len(variants) == 2**6 + 4


# ---------- evaluation.py 4. Tables beside the paper's numbers (reference_numbers.py) ----------
def _markdown_rows(section):
    """The table rows of a PROTOCOL.md section, as lists of cells ("-" for none)."""
    protocol = Path(HERE, "PROTOCOL.md").read_text()
    text = protocol.split(f"### {section} ")[1].split("\n### ")[0]
    lines = [line for line in text.splitlines() if line.startswith("| ") and "Fold-0" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def number(text):
    """A table cell as a number; None for "-"."""
    if text == "-":
        return None
    return float(text)


def test_reference_numbers_are_protocols_and_agree_with_the_papers_text():
    """reference_numbers.py holds PROTOCOL.md 11.1 (the paper's Tables 1-4) and 11.2 (BAM's base
    learners) cell for cell; three printed means are not their folds' mean; the differences are the
    ones the paper's text states (Sec. 3.2: "BCPT surpasses Standard by 1.51% and 2.61%" on PASCAL
    ResNet-50, "0.69% and 0.73%" on COCO; Table 2: "outperforms Standard and ImageNet by 5.25% and
    8.67%"; Sec. 3.3: BMC "brings 1.55%", OCG "extra 1.06%")."""
    from reference_numbers import REFERENCE

    names = {"PASCAL-5i": "pascal", "COCO-20i": "coco", "VGG16": "vgg16", "ResNet50": "resnet50"}
    protocol = {}
    for table, dataset, backbone, row, shot, *values in _markdown_rows("11.1")[:21]:
        key = (f"paper-table{table}", names[dataset], names[backbone], row, int(shot))
        protocol[key] = [number(v) for v in values] + [None]
    rows34 = {"Standard (neither)": "Standard", "BMC": "BMC", "BMC + OCG": "BMC+OCG"}
    for table, row, *values in _markdown_rows("11.1")[21:]:
        name = rows34.get(row, row.replace(" ", ""))
        key = (f"paper-table{table}", "pascal", "resnet50", name, 5)
        protocol[key] = [number(v) for v in values]
    for dataset, backbone, *folds in _markdown_rows("11.2"):
        key = ("bam-base-learner", names[dataset], names[backbone], "standard", None)
        protocol[key] = [float(v) for v in folds] + [None, None]
    ours = {k: v["folds"] + [v["all"], v["fb_iou"]] for k, v in REFERENCE.items() if k in protocol}
    assert ours == protocol
    assert len(protocol) == 31

    paper = {k[:5]: v for k, v in ours.items()}
    off = {
        k: sum(v[:4]) / 4
        for k, v in paper.items()
        if None not in v[:5] and abs(sum(v[:4]) / 4 - v[4]) > 0.006
    }
    # the paper's Mean as printed
    assert off == pytest.approx(
        {
            ("paper-table1", "pascal", "resnet50", "Standard", 1): 65.425,
            ("paper-table1", "pascal", "resnet50", "BCPT", 1): 66.8025,
            ("paper-table1", "pascal", "resnet50", "BCPT", 5): 71.0825,
            ("paper-table4", "pascal", "resnet50", "K=6", 5): 71.0825,
        }
    )

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
        path = tmp_path / f"s{k}.json"
        path.write_text(json.dumps(r))
        files.append(str(path))
    evaluate.main(["--table", *files])
    out = capsys.readouterr().out
    assert "Beside the paper (Table 2, pascal resnet50 BCPT 1-shot):" in out
    assert (
        "fold 0: ours 38.33 (training seeds 37.00-40.00), paper 38.52, difference -0.19: inside "
        "the spread of our seeds; best of the evaluation seeds (BAM test.py's Best_mIoU) 41.00"
    ) in out
    assert "| pascal | resnet50v2 | non-parametric prior | bcpt K=6 Eq4=sum | 38.33+-1.53 |" in out


def test_results_of_a_test_survive_its_folder_vanishing(metatrained, tmp_path, monkeypatch, capsys):
    """The output folder removed while the episodes run: it is made again, with a note, and the
    results file and the whole episode log are written (no traceback, nothing lost)."""
    import evaluate

    out = tmp_path / "results"
    out.mkdir()
    run_episodes = evaluation.run_episodes

    def remove_the_folder_first(*a, **k):
        if out.exists():
            for name in os.listdir(out):
                os.remove(out / name)
            out.rmdir()
        return run_episodes(*a, **k)

    monkeypatch.setattr(evaluation, "run_episodes", remove_the_folder_first)
    argv = ["--checkpoint", metatrained[1], "--episodes", "3", "--seeds", "510", "365"]
    argv += ["--json", str(out / "r.json"), "--episode-log", str(out / "e.jsonl"), "--workers", "0"]
    evaluate.main(argv)
    assert "is gone (removed during the run?): making it again" in capsys.readouterr().out
    results = json.loads((out / "r.json").read_text())
    assert [s["seed"] for s in results["per_seed"]] == [510, 365]
    assert len((out / "e.jsonl").read_text().splitlines()) == 6  # both seeds' episodes


def test_table_inputs_are_checked_and_counted_once(tmp_path, capsys):
    """--table: a file named twice, or a copy of a file, counts once (a note says so); a file whose
    numbers are strings, or without per_seed, stops with one line naming the file and the field."""
    import evaluate

    row = dict(dataset="pascal", backbone="resnet50v2", method="non-parametric prior", shot=1)
    row.update(pretrained="bcpt K=6 Eq4=sum", fold=0, protocol={}, run={"utc": "1"})
    a = tmp_path / "a.json"
    a.write_text(json.dumps({**row, "miou": 40.0, "per_seed": [{"miou": 40.0}]}))
    b = tmp_path / "b.json"
    b.write_text(json.dumps({**row, "miou": 30.0, "per_seed": [{"miou": 30.0}]}))
    copy = tmp_path / "copy.json"
    copy.write_text(a.read_text())
    evaluate.main(["--table", str(a), str(a), str(copy), str(b)])
    out = capsys.readouterr().out
    assert f"note: --table {a} is {a} again: counted once" in out
    assert f"note: --table {copy} is {a} again: counted once" in out
    assert "| 35.00+-7.07 |" in out  # a and b: two training seeds, not four
    strings = tmp_path / "strings.json"
    strings.write_text(json.dumps({**row, "miou": "40.0", "per_seed": [{"miou": 40.0}]}))
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({**row, "miou": 40.0}))
    for bad, message in ((strings, "miou is '40.0', not a float"), (missing, "per_seed is None")):
        with pytest.raises(KitError, match=f"--table {re.escape(str(bad))}: {message}"):
            evaluate.main(["--table", str(bad)])


# ---------- own_images.py 1. Reading your images and masks ----------
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
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., [2, 1, 0, 3]]  # RGBA -> cv2's BGRA
        cv2.imwrite(str(tmp_path / name), arr)
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
    image = root / common.IMAGES / "train_000002.jpg"
    corrupt_middle(image, image)
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "prepare_data.py"), "verify", "--data-root", str(root)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    assert "train_000002.jpg (Corrupt JPEG data" in r.stdout


def test_own_images_bad_input_names_the_file(own_episode, metatrained, tmp_path):
    import evaluate

    ds, d, query, support = own_episode
    (d / "notes.jpg").write_text("not an image")
    cv2.imwrite(str(d / "small.png"), np.ones((5, 5), np.uint8))
    shape = cv2.imread(str(d / "support_mask.png")).shape[:2]
    cv2.imwrite(str(d / "empty.png"), np.zeros(shape, np.uint8))
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


def test_a_photo_passed_as_the_mask_is_refused_and_a_reversed_pair_named(own_episode, metatrained):
    import evaluate

    ds, d, query, support = own_episode
    image = str(d / f"{support}.jpg")
    mask = str(d / "support_mask.png")
    photo_jpg = str(d / f"{query}.jpg")
    photo_png = str(d / "photo.png")
    cv2.imwrite(photo_png, cv2.imread(photo_jpg))  # lossless: many values, not a label image
    shape = cv2.imread(image).shape[:2]
    for photo in (photo_jpg, photo_png):
        refused = (
            rf"mask {re.escape(photo)} looks like a photo \(only \d+% of its pixels are at its "
            r"two extreme levels.*\): pass the mask image \(0/1, 0/255, palette, RGB or "
            r"transparent PNG\)"
        )
        with pytest.raises(KitError, match=refused):
            own_images.read_user_mask(photo, image, shape)
    reversed_pair = (
        rf"--support {re.escape(mask)} {re.escape(image)}: {re.escape(mask)} looks like a mask and "
        rf"{re.escape(image)} like a photo: pass the image first"
    )
    with pytest.raises(KitError, match=reversed_pair):
        evaluate.main(
            [
                "--checkpoint",
                metatrained[1],
                "--support",
                mask,
                image,
                "--query",
                photo_jpg,
                "--out",
                str(d / "p"),
            ]
        )


# ---------- own_images.py 2-4. Your episodes in the test geometry, the predictions ----------
def test_own_images_give_the_benchmark_prediction(own_episode, metatrained):
    import evaluate

    ds, d, query, support = own_episode
    evaluate.main(["--checkpoint", metatrained[1], *own_image_argv(d, query, support, d / "preds")])
    mask = cv2.imread(str(d / "preds" / f"{query}_mask.png"), cv2.IMREAD_UNCHANGED)
    h, w = common.read_mask(ds.root, query, 20).shape
    assert mask.shape == (h, w)
    assert set(np.unique(mask)) <= {0, 255}
    overlay = cv2.imread(str(d / "preds" / f"{query}_overlay.png"))
    # the query, then the support beside it, both drawn 256 px high, under the legend
    pictures = overlay[legend_rows(overlay) :]
    assert pictures.shape[0] == 256
    assert pictures.shape[1] == 2 * 256 * w // h
    model = evaluate.load_model(common.load_checkpoint(metatrained[1]), torch.device("cpu"))
    item = torch.utils.data.default_collate([ds[0]])
    with torch.no_grad():
        scores, _ = common.logits_at_label_size(
            evaluation.predict_meta(model, item), item["raw_label"][0]
        )
    # what the benchmark predicts
    assert np.array_equal(mask // 255, scores.argmax(1)[0, :h, :w].numpy())


def test_own_images_nonparametric_and_mask_formats(own_episode, pretrained, capsys):
    import nonparametric_eval

    ds, d, query, support = own_episode
    m = cv2.imread(str(d / "support_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    palette = Image.fromarray(m.astype(np.uint8) * 7, mode="P")  # palette indices, as VOC's masks
    palette.putpalette([0, 0, 0] + [200, 0, 0] * 255)
    palette.save(d / "palette.png")
    green = np.stack([np.zeros_like(m), m * 128, m * 0], -1).astype(np.uint8)
    cv2.imwrite(str(d / "rgb.png"), green)
    for mask in ("palette.png", "rgb.png"):
        got = own_images.read_user_mask(str(d / mask), "img", m.shape)
        assert np.array_equal(got, m.astype(np.uint8))
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
    # the mask is the benchmark's prior of this episode above the threshold 0.5, at the query's size
    mask = cv2.imread(str(d / "np" / f"{query}_mask.png"), cv2.IMREAD_UNCHANGED)
    h, w = common.read_mask(ds.root, query, 20).shape
    assert mask.shape == (h, w)
    assert set(np.unique(mask)) <= {0, 255}
    backbone_name = common.load_checkpoint(pretrained["bcpt"])["args"]["backbone"]
    backbone = common.build_backbone(backbone_name, pretrained["bcpt"]).eval()
    item = torch.utils.data.default_collate([ds[0]])
    prior = nonparametric_eval.predict_prior(backbone, item)
    scores, _ = common.logits_at_label_size(prior, item["raw_label"][0])
    assert np.array_equal(mask // 255, (scores[0, 0, :h, :w] > 0.5).numpy())


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
    # the checkpoint's
    assert (args.dataset, args.backbone, args.test_size) == ("pascal", "resnet18", 473)
    nonparametric_eval.main(own + ["--out", str(tmp_path / "o")])
    # two queries named x.jpg
    assert {"x_mask.png", "x-2_mask.png"} <= set(os.listdir(tmp_path / "o"))
    # the same image twice: the same mask twice, at the query's size
    first = cv2.imread(str(tmp_path / "o" / "x_mask.png"), cv2.IMREAD_UNCHANGED)
    second = cv2.imread(str(tmp_path / "o" / "x-2_mask.png"), cv2.IMREAD_UNCHANGED)
    assert first.shape == (64, 64)
    assert set(np.unique(first)) <= {0, 255}
    assert np.array_equal(first, second)
    with pytest.raises(
        KitError, match=r"--backbone resnet50: .*last.pt was made for --backbone resnet18"
    ):
        nonparametric_eval.parse_args(
            own + ["--out", str(tmp_path / "o"), "--backbone", "resnet50"]
        )


def test_own_images_never_replace_a_file_in_out(own_episode, metatrained, capsys):
    """--query sup.jpg into the folder holding the user's sup_mask.png: the user's mask survives
    byte for byte, the prediction goes to sup-2_*.png, and the line that reports it says why."""
    import evaluate

    ds, d, query, support = own_episode
    os.replace(d / f"{support}.jpg", d / "sup.jpg")
    os.replace(d / "support_mask.png", d / "sup_mask.png")
    users_mask = (d / "sup_mask.png").read_bytes()
    sup = str(d / "sup.jpg")
    own = ["--checkpoint", metatrained[1], "--support", sup, str(d / "sup_mask.png")]
    evaluate.main(own + ["--query", sup, "--out", str(d)])
    assert (d / "sup_mask.png").read_bytes() == users_mask
    assert {"sup-2_mask.png", "sup-2_overlay.png"} <= set(os.listdir(d))
    said = capsys.readouterr().out
    assert f"sup_mask.png exists: wrote {d / 'sup-2'}_mask.png and _overlay.png" in said


def test_own_images_of_both_readme_examples_in_one_folder_keep_the_first(
    own_episode, metatrained, pretrained, capsys
):
    """README 'Your own images': evaluate.py (two shots, two queries), then nonparametric_eval.py
    on one of the same queries, both into preds/: the first run's files stay byte for byte, the
    second's take the next free name."""
    import shutil

    import evaluate
    import nonparametric_eval

    ds, d, query, support = own_episode
    for name, source in (("a", support), ("b", support), ("street", query), ("park", support)):
        shutil.copy(d / f"{source}.jpg", d / f"{name}.jpg")
    for name in ("a", "b"):
        shutil.copy(d / "support_mask.png", d / f"{name}_mask.png")
    preds = d / "preds"
    evaluate.main(
        [
            "--checkpoint",
            metatrained[1],
            "--support",
            str(d / "a.jpg"),
            str(d / "a_mask.png"),
            "--support",
            str(d / "b.jpg"),
            str(d / "b_mask.png"),
            "--query",
            str(d / "street.jpg"),
            str(d / "park.jpg"),
            "--out",
            str(preds),
        ]
    )
    first = {p.name: p.read_bytes() for p in preds.iterdir()}
    assert set(first) == {f"{q}_{k}.png" for q in ("street", "park") for k in ("mask", "overlay")}
    nonparametric_eval.main(
        [
            "--pretrained",
            pretrained["bcpt"],
            "--support",
            str(d / "a.jpg"),
            str(d / "a_mask.png"),
            "--query",
            str(d / "street.jpg"),
            "--out",
            str(preds),
            "--test-size",
            "64",
        ]
    )
    after = {p.name: p.read_bytes() for p in preds.iterdir()}
    assert {name: after[name] for name in first} == first
    assert set(after) - set(first) == {f"street-2_{k}.png" for k in ("mask", "overlay", "prior")}
    said = capsys.readouterr().out
    wrote = f"wrote {preds / 'street-2'}_mask.png and _overlay.png and _prior.png"
    assert f"street_mask.png exists: {wrote}" in said


def test_own_images_overlay_has_a_legend_and_is_drawn_large_enough(own_episode, metatrained):
    """A 64-px query: NAME_overlay.png is drawn at least 256 px high under a white bar whose dark
    text sits above the query and above the support."""
    import evaluate

    ds, d, query, support = own_episode
    evaluate.main(["--checkpoint", metatrained[1], *own_image_argv(d, query, support, d / "preds")])
    overlay = cv2.imread(str(d / "preds" / f"{query}_overlay.png"))
    height, width = overlay.shape[:2]
    bar = legend_rows(overlay)
    assert bar > 0
    assert height - bar >= 256
    text = overlay[:bar].max(-1) < 100  # dark pixels in the bar
    assert text[:, : width // 2].sum() > 50  # above the query
    assert text[:, width // 2 :].sum() > 50  # above the support


def test_own_images_large_query_costs_little_memory(own_episode, metatrained, tmp_path):
    """A 2500 x 2500 query: the peak resident memory of evaluate.py stays within 300 MB of a 64-px
    query's (it was ~1.5 GB more: full-size float copies, two-channel logits, a float64 overlay);
    the mask is at the original size, the overlay drawn at most ~1024 px high."""
    ds, d, query, support = own_episode
    small = str(d / f"{query}.jpg")
    big = str(d / "big.jpg")
    cv2.imwrite(big, cv2.resize(cv2.imread(small), (2500, 2500), interpolation=cv2.INTER_CUBIC))
    measure = (
        "import resource, sys, evaluate; evaluate.main(sys.argv[1:]); "
        "print('peak', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )

    def peak_mb(q):
        argv = ["--checkpoint", metatrained[1], "--support", str(d / f"{support}.jpg")]
        argv += [str(d / "support_mask.png"), "--query", q, "--out", str(tmp_path / "o")]
        r = subprocess.run(
            [sys.executable, "-c", measure, *argv], capture_output=True, text=True, cwd=HERE
        )
        assert r.returncode == 0, r.stderr
        return int(re.search(r"peak (\d+)", r.stdout).group(1)) / 1024  # ru_maxrss: kB

    extra = peak_mb(big) - peak_mb(small)
    assert extra < 300, f"a 2500 x 2500 query costs {extra:.0f} MB more than a 64-px one"
    mask = cv2.imread(str(tmp_path / "o" / "big_mask.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (2500, 2500)
    overlay = cv2.imread(str(tmp_path / "o" / "big_overlay.png"))
    assert overlay.shape[0] - legend_rows(overlay) == 1024


# ---------- every stage: the peers' weight files, and RESULTS.md's commands ----------
def test_bam_best_through_every_stage(resnet50_v2_file, synthetic_root, tmp_path, capsys):
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt

    path, state = resnet50_v2_file
    best = bam_best(state, tmp_path / "best.pth")
    small = ["--backbone", "resnet50v2", "--max-iters", "1", "--batch", "2"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "p", "--weights", best, *small))
    metatrain.main(meta_args(synthetic_root, tmp_path / "m", best, 1, *small))
    r = nonparametric_eval.main(
        np_args(synthetic_root, best, tmp_path / "np.json", "--backbone", "resnet50v2")
    )
    assert "took layer0-layer4" in capsys.readouterr().out
    assert 0 <= r["miou"] <= 100
    assert_scores_add_up(r)
    assert json.loads((tmp_path / "np.json").read_text())["pretrained"] == "standard (BAM best.pth)"
    m = common.load_checkpoint(str(tmp_path / "m" / "last.pt"))
    # frozen, as loaded
    assert torch.equal(m["model"]["backbone.layer0.3.weight"], state["conv2.weight"])


def test_results_md_commands_draw_its_worlds_and_plan_its_grids(tmp_path, monkeypatch):
    """RESULTS.md's commands, verbatim, with `python` standing for a check of each command: the
    worlds it chooses on and reports on are drawn again and give the checksums it states; every
    stage command parses; every reproduce.py command plans its grid (a dry run)."""
    results_md = Path(HERE, "RESULTS.md").read_text()
    script = results_md.split("```bash\n")[1].split("```")[0]
    for name in glob.glob(os.path.join(HERE, "*.py")):
        os.symlink(name, tmp_path / os.path.basename(name))
    # each command line is written to commands.txt, one argument per line, a blank line after
    shim = 'python() { printf "%s\\n" "$@" "" >> commands.txt; }\n'
    out = subprocess.run(["bash", "-ec", shim + script], cwd=tmp_path, capture_output=True)
    assert out.returncode == 0, out.stderr[-3000:]
    text = (tmp_path / "commands.txt").read_text()
    commands = [block.split("\n") for block in text.split("\n\n") if block]
    scripts = [argv[0] for argv in commands]
    assert scripts.count("reproduce.py") >= 4
    monkeypatch.chdir(tmp_path)  # as a fresh clone: no world drawn, no run made
    drawing = []  # the worlds are drawn side by side, each by its own process
    for i, (script_name, *argv) in enumerate(commands):
        if script_name == "prepare_data.py":
            out = tmp_path / f"world{i}"
            argv = [sys.executable, script_name, *argv, "--out", str(out)]  # the last --out wins
            drawing.append((out, subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.DEVNULL)))
        elif script_name == "pretrain_bcpt.py":
            import pretrain_bcpt

            runs = str(tmp_path / "parsed")
            assert pretrain_bcpt.parse_args([*argv, "--out", runs]).method == "generic"
        elif script_name == "reproduce.py":
            runs = str(tmp_path / f"plan{i}")
            plan = reproduce.main([*argv, "--dry-run", "--no-estimate", "--runs", runs])
            assert plan.runs
        else:
            raise AssertionError(f"RESULTS.md runs {script_name}: add its check here")
    assert len(drawing) == 4  # both worlds: the choosing draws and the fresh ones
    for out, process in drawing:
        assert process.wait() == 0
        with open(out / ".complete") as f:
            checksum = json.load(f)["checksum"]
        assert checksum in results_md


def test_every_function_the_readme_cites_exists():
    """README.md cites functions, not line numbers: every `module.name` it names exists."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    modules = [os.path.basename(p)[:-3] for p in glob.glob(os.path.join(HERE, "*.py"))]
    pattern = r"`(" + "|".join(modules) + r")\.([A-Za-z_]\w*)`"
    cited = {(m, name) for m, name in re.findall(pattern, readme) if name != "py"}
    missing = [f"{m}.{name}" for m, name in cited if not hasattr(__import__(m), name)]
    assert len(cited) >= 10
    assert not missing


def test_the_docs_speak_of_the_kit_not_of_how_it_was_made():
    """README, RESULTS, DETAILS: no wording about how the kit was developed; the README reads in
    about ten minutes (at most about 2,000 words) and explains its few-shot words."""
    made = r"\b(sessions?|developers?|busy with|kept as the evidence|an earlier stand-in)\b"
    for name in ("README.md", "RESULTS.md", "DETAILS.md"):
        with open(os.path.join(HERE, name)) as f:
            text = f.read()
        assert not re.findall(made, text, re.I), name
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    assert len(readme.split()) <= 2100
    glossary = readme.split("## Words used here")[1].split("\n## ")[0]
    for word in ("support", "query", "shot", "episode", "FB-IoU", "PFENet", "BAM", "HSNet", "ASPP"):
        assert word in glossary
