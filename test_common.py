"""Tests of common.py, the science: Eqs. 1-7 and the metrics against hand-computed values, the model
and the prior, data on disk (folds, pools, the index, bad files), transforms, datasets, backbones
and checkpoint files. The sections follow common.py's.

Run every test file: python -m pytest -q
"""

import argparse
import os
import re

import cv2
import numpy as np
import pytest
import torch

import common
import plumbing
import worlds
from common import KitError
from conftest import BAM_STEM, bam_best, blocks, make_root, random_bn, truncate


# ---------- common.py 1. BCPT: online clustering of the merged background, Eqs. 1-7 ----------
def test_cluster_assign_and_eq1_with_empty_cluster():
    # centres as columns: p1 (1, 0), p2 (0, 2), p3 (0.6, 0.8)
    centers = torch.tensor([[1.0, 0.0, 0.6], [0.0, 2.0, 0.8]])
    # pixels as columns: (3, 4), (0, 1), (0, 3)
    emb = torch.tensor([[3.0, 0.0, 0.0], [4.0, 1.0, 3.0]])
    # S = P^T I: (3, 4) -> 3, 8, 5.0; (0, 1) -> 0, 2, 0.8; (0, 3) -> 0, 6, 2.4
    assign = common.cluster_assign(centers, emb)
    assert assign.tolist() == [1, 1, 1]
    assign = torch.tensor([0, 1, 1])  # p3 gets no pixel
    P_hat, counts = common.cluster_sums(emb, assign, 3)
    assert torch.equal(P_hat, torch.tensor([[3.0, 0.0, 0.0], [4.0, 4.0, 0.0]]))
    assert counts.tolist() == [1, 2, 0]
    new = common.momentum_update(centers, P_hat, counts, mu=0.5)
    # p1: 0.5 (1, 0) + 0.5 (3, 4)/5 = (0.8, 0.4); p2: 0.5 (0, 1) + 0.5 (0, 4)/4 = (0, 1);
    # p3 unchanged
    assert torch.allclose(new, torch.tensor([[0.8, 0.0, 0.6], [0.4, 1.0, 0.8]]))


def test_eq2_matches_explicit_log_softmax():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(8, 50, generator=g)
    centers = torch.randn(8, 4, generator=g)
    assign = common.cluster_assign(centers, emb)
    expected = 0.0
    for n in range(50):
        scores = [float(emb[:, n] @ centers[:, k]) for k in range(4)]
        expected += -(scores[assign[n]] - np.log(np.sum(np.exp(scores))))
    none = torch.zeros(8, 0)  # no base pixel: Eq. 4 is then alpha * Eq. 2 / N_bg
    no_label = torch.zeros(0, dtype=torch.long)
    W = torch.randn(8, 3)
    loss, parts = common.bcpt_loss(none, no_label, emb, assign, W, centers, 1.0)
    assert loss.item() == pytest.approx(expected / 50, rel=1e-5)
    assert parts["l_bm"] == pytest.approx(expected / 50, rel=1e-5)


def test_eqs3_4_hand_computed():
    # base pixel j = (1, 0) of class 1; background pixel i = (0, 1); w1 = (1, 0), w2 = (0, 1);
    # p1 = (0, 2), p2 = (1, 1)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    P = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    I_base = torch.tensor([[1.0], [0.0]])
    I_bg = torch.tensor([[0.0], [1.0]])
    assign = common.cluster_assign(P, I_bg)  # <i, p1> = 2 > <i, p2> = 1
    loss, parts = common.bcpt_loss(I_base, torch.tensor([1]), I_bg, assign, W, P, alpha=0.5)
    # Eq. 3: logits <j, w1> 1, <j, w2> 0, <j, p1> 0, <j, p2> 1; target w1
    l3 = -1 + np.log(2 * np.e + 2)
    l2 = np.log(1 + np.exp(-1))  # Eq. 2: logits 2, 1; target p1
    assert assign.tolist() == [0]
    assert parts["l_base"] == pytest.approx(l3)
    assert parts["l_bm"] == pytest.approx(l2)
    assert loss.item() == pytest.approx((l3 + 0.5 * l2) / 2)  # Eq. 4: sums / the 2 labelled pixels


def test_eq3_base_reading_hand_computed():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    P = torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    I_base = torch.tensor([[1.0], [0.0]])
    I_bg = torch.tensor([[0.0], [1.0]])
    assign = torch.tensor([0])
    _, parts = common.bcpt_loss(I_base, torch.tensor([1]), I_bg, assign, W, P, 0.5, "sum", "base")
    # logits <j, w1> 1, <j, w2> 0 only
    assert parts["l_base"] == pytest.approx(np.log(1 + np.exp(-1)))


def cross_entropy_by_hand(logits, target):
    """-log softmax of the target, one row of logits per pixel."""
    rows = logits.numpy()
    return [float(np.log(np.exp(r).sum()) - r[t]) for r, t in zip(rows, target, strict=True)]


def test_eq4_scales_sum_and_mean_on_known_pixel_counts():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 3, generator=g)
    P = torch.randn(4, 2, generator=g)
    I_base = torch.randn(4, 2, generator=g)
    y_base = torch.tensor([3, 1])
    I_bg = torch.randn(4, 3, generator=g)
    assign = common.cluster_assign(P, I_bg)
    base_logits = torch.cat([I_base.t() @ W, I_base.t() @ P], 1)
    base = cross_entropy_by_hand(base_logits, (y_base - 1).tolist())  # Eq. 3, 2 pixels
    bg = cross_entropy_by_hand(I_bg.t() @ P, assign.tolist())  # Eq. 2, 3 pixels
    total, _ = common.bcpt_loss(I_base, y_base, I_bg, assign, W, P, 0.1, "sum")
    per_term, parts = common.bcpt_loss(I_base, y_base, I_bg, assign, W, P, 0.1, "mean")
    assert total.item() == pytest.approx((sum(base) + 0.1 * sum(bg)) / 5, rel=1e-5)
    assert per_term.item() == pytest.approx(sum(base) / 2 + 0.1 * sum(bg) / 3, rel=1e-5)
    assert parts == pytest.approx({"l_base": sum(base) / 2, "l_bm": sum(bg) / 3}, rel=1e-5)


def test_kmeans_is_deterministic_and_correct():
    # two groups of columns: 0, 1, 4 near the origin; 2, 3 near (10, 5)
    x = torch.tensor([[0.0, 0.2, 10.0, 10.4, 0.1], [0.0, 0.0, 5.0, 5.0, 0.3]])
    init = common.farthest_point_init(x, 2)
    assert torch.equal(init, common.farthest_point_init(x, 2))
    assert torch.equal(init[:, 0], x[:, 0])
    g = common.kmeans(x, init)
    assert torch.allclose(g[:, 0], x[:, [0, 1, 4]].mean(1))
    assert torch.allclose(g[:, 1], x[:, [2, 3]].mean(1))
    assert torch.equal(common.kmeans(x, g), g)  # a warm start from the solution stays there


def test_eqs6_7_two_guidance_vectors_on_one_centre():
    centers = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    # g1 (2, 1), g2 (1, 0.5): both most similar to p1
    guidance = torch.tensor([[2.0, 1.0], [1.0, 0.5]])
    new = common.guide_centers(centers, guidance, mu=0.9)
    g_hat = np.array([3.0, 1.5]) / np.hypot(3.0, 1.5)
    p1 = 0.9 * np.array([1.0, 0.0]) + 0.1 * g_hat
    assert torch.allclose(new[:, 0], torch.tensor(p1, dtype=torch.float32))
    assert torch.equal(new[:, 1:], centers[:, 1:])  # centres given no guidance vector are unchanged


# ---------- common.py 2. The ASPP-PFENet few-shot model and PFENet's prior mask ----------
def test_masked_average_pooling_hand_computed():
    feat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert common.masked_average_pooling(feat, mask).item() == pytest.approx(4.0 / (2 + 5e-4))


def test_prior_mask_known_max_cosine():
    # query positions (1, 0), (-1, 0), (1, 1); support positions (1, 0) in the mask and (0, 1)
    # outside it.
    q = torch.tensor([[1.0, -1.0, 1.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    m = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # cos to the masked support: (1, 0) -> 1, 0 (the zeroed position counts as cos 0, as PFENet);
    # (-1, 0) -> -1, 0; (1, 1) -> 0.7071, 0. Max: 1, 0, 0.7071; min-max over the query keeps them.
    prior = common.prior_mask(q, s, m).flatten()
    assert torch.allclose(prior, torch.tensor([1.0, 0.0, 2**-0.5]), atol=1e-5)
    # K shots: the mean of the per-shot priors
    two_supports = torch.cat([s, s.flip(-1)])
    two_masks = torch.cat([m, m.flip(-1)])
    two = common.shot_prior(q, two_supports, two_masks, shots=2).flatten()
    flipped = common.prior_mask(q, s.flip(-1), m.flip(-1)).flatten()
    assert torch.allclose(two, (prior + flipped) / 2)


def test_prior_mask_stays_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    q = 300 * torch.randn(1, 64, 4, 4, generator=g)
    s = 300 * torch.randn(1, 64, 4, 4, generator=g)
    m = torch.ones(1, 1, 4, 4)
    exact = common.prior_mask(q, s, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = common.prior_mask(q, s, m)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, exact)


def test_shot_weights_gram_and_permutation():
    # channel 0 (1, 0), channel 1 (1, 1)
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)
    expected = torch.tensor([[1.0, 2**-0.5], [2**-0.5, 1.0]])
    assert torch.allclose(common.gram(f)[0], expected, atol=1e-6)
    torch.manual_seed(0)
    sw = common.ShotWeights(3)
    q = torch.rand(2, 4, 3, 3)
    s = torch.rand(2, 3, 4, 3, 3)
    w = sw(q, s)
    perm = torch.tensor([2, 0, 1])
    assert w.shape == (2, 3)
    assert torch.allclose(w.sum(1), torch.ones(2))
    # a support's weight follows the support
    assert torch.allclose(sw(q, s[:, perm]), w[:, perm], atol=1e-6)


def test_gram_matrices_never_overflow_in_fp16():
    x = torch.full((1, 3, 60, 60), 5.0)  # RMS 5: |F_i|^2 = 90000 > 65504, the largest fp16 number
    with torch.autocast("cpu", dtype=torch.float16):
        g = common.gram(x.half())
    assert g.dtype == torch.float32
    assert torch.isfinite(g).all()
    assert torch.allclose(g, torch.ones(1, 3, 3), atol=1e-5)


def test_psp_head_shapes():
    """BAM's base-learner head: 4 pyramid bins of D/4 channels each, concatenated with the input
    (2D channels) before the classifier."""
    head = common.PSPHead(512, 16)
    assert head(torch.randn(2, 512, 7, 9)).shape == (2, 16, 7, 9)
    assert len(head.ppm) == 4
    assert head.cls[0].in_channels == 1024  # 2D in
    assert head.ppm[0][1].out_channels == 128  # D/4 per bin


def test_aspp_pfenet_shape_and_frozen_backbone():
    torch.manual_seed(0)
    model = common.AsppPFENet(common.build_backbone("resnet18", "none")).train()
    assert not model.backbone.training  # BN of the backbone stays in eval
    assert model.down_query.training
    bn = model.backbone.layer1[0].bn1
    before = bn.running_mean.clone()
    q = torch.randn(2, 3, 41, 41)
    s = torch.randn(2, 3, 3, 41, 41)
    m = (torch.rand(2, 3, 41, 41) > 0.5).long()
    logits = model(q, s, m)
    assert logits.shape == (2, 2, 41, 41)
    logits.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.cls[-1].weight.grad is not None
    assert torch.equal(bn.running_mean, before)
    # in eval: the same episode gives the same logits, and the order of the supports (their priors
    # and prototypes averaged, PFENet) does not matter
    model.eval()
    perm = torch.tensor([2, 0, 1])
    with torch.no_grad():
        first = model(q, s, m)
        again = model(q, s, m)
        shuffled = model(q, s[:, perm], m[:, perm])
    assert torch.equal(first, again)
    assert torch.allclose(shuffled, first, atol=1e-5)


# ---------- common.py 3. Metrics: class IoU, mIoU, FB-IoU ----------
def test_fewshot_iou_hand_computed():
    m = common.FewShotIoU([1, 2, 3])
    pred = torch.tensor([[1, 1, 0], [0, 1, 0]])
    target = torch.tensor([[1, 0, 0], [255, 1, 1]])
    # valid pixels: (0,0) p1 t1, (0,1) p1 t0, (0,2) p0 t0, (1,1) p1 t1, (1,2) p0 t1; (1,0) ignored
    m.update(pred, target, cls=1)  # fg: I=2, U=4; bg: I=1, U=3
    all_background = torch.zeros(2, 2, dtype=torch.long)
    m.update(all_background, torch.tensor([[1, 1], [0, 0]]), cls=1)  # fg I=0 U=2; bg I=2 U=4
    all_foreground = torch.ones(1, 2, dtype=torch.long)
    m.update(all_foreground, torch.tensor([[1, 255]]), cls=2)  # fg I=1 U=1; bg I=0 U=0
    iou = m.class_iou()
    assert iou[1] == pytest.approx(100 * 2 / 6)  # sums over the episodes of the class, then divide
    assert iou[2] == pytest.approx(100.0)
    assert iou[3] == 0.0  # class 3 has no episode: counts 0
    assert m.miou() == pytest.approx((100 * 2 / 6 + 100 + 0) / 3)
    assert m.fb_iou() == pytest.approx(100 * ((3 / 7) + (3 / 7)) / 2)  # bg 3/7, fg (2+0+1)/(4+2+1)
    with pytest.raises(ValueError):
        m.update(torch.tensor([[2]]), torch.tensor([[1]]), cls=1)


# ---------- common.py 4. Data on disk: folds, the VOC layout, pools, the per-class index ----------
def test_folds():
    assert common.novel_classes("pascal", 0) == [1, 2, 3, 4, 5]
    assert common.novel_classes("pascal", 3) == [16, 17, 18, 19, 20]
    assert common.base_classes("pascal", 1) == [1, 2, 3, 4, 5] + list(range(11, 21))
    assert common.novel_classes("coco", 1) == list(range(2, 81, 4))
    assert len(common.novel_classes("coco", 1)) == 20
    assert common.novel_classes("coco", 2, "contiguous") == list(range(41, 61))
    every_coco_class = common.novel_classes("coco", 0) + common.base_classes("coco", 0)
    assert sorted(every_coco_class) == list(range(1, 81))
    assert common.novel_classes("synthetic", 2) == [11, 12, 13, 14, 15]
    with pytest.raises(KitError, match="--fold 4"):
        common.novel_classes("pascal", 4)


def fail_on_read(*args):
    pytest.fail("cache miss: masks were read again")


def test_pools_index_and_cache(tmp_path, monkeypatch):
    root = make_root(tmp_path)
    train, val = common.image_pools(root)
    assert val == ["v0", "v1"]
    assert train == [f"t{i}" for i in range(8)]
    counts = common.class_pixel_counts(root, train, 20)
    assert counts.shape == (8, 21)
    assert counts[0, 1] == 1024
    assert counts[0, 6] == 1024
    assert counts[0, 0] == 1024
    pools = common.class_index(train, counts, [1, 6], min_pixels=1024)
    assert pools[1] == ["t0", "t3", "t4", "t7"]
    assert len(pools[6]) == 8
    assert common.class_index(train, counts, [1], min_pixels=1025)[1] == []
    monkeypatch.setattr(common, "read_mask", fail_on_read)
    assert (common.class_pixel_counts(root, train, 20) == counts).all()  # cache hit
    monkeypatch.undo()
    # a changed mask rescans
    cv2.imwrite(os.path.join(root, common.MASKS, "t0.png"), blocks([5, 5, 5, 5])[1])
    assert common.class_pixel_counts(root, train, 20)[0, 5] == 4096


def test_oslsm_pool(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(KitError, match="train_noval.txt"):
        common.image_pools(root, "oslsm")
    for name, ids in (("train.txt", ["t0", "t1", "v0"]), ("train_noval.txt", ["t1", "t2"])):
        with open(os.path.join(root, common.LISTS, name), "w") as f:
            f.write("\n".join(ids) + "\n")
    # the union, deduplicated, minus val
    assert common.image_pools(root, "oslsm")[0] == ["t0", "t1", "t2"]


def test_bad_inputs(tmp_path):
    with pytest.raises(KitError, match="does not exist"):
        common.image_pools(str(tmp_path / "nowhere"))
    root = make_root(tmp_path)
    os.remove(os.path.join(root, common.LISTS, "val.txt"))
    with pytest.raises(KitError, match="val.txt does not exist"):
        common.image_pools(root)
    with open(os.path.join(root, common.IMAGES, "t1.jpg"), "wb") as f:
        f.write(b"\xff\xd8 truncated")
    with pytest.raises(KitError, match="t1.jpg: missing or corrupt"):
        common.read_pair(root, "t1", 20)
    cv2.imwrite(os.path.join(root, common.MASKS, "t2.png"), blocks([1, 37, 0, 0])[1])
    with pytest.raises(KitError, match="t2.png has value 37 outside 0..20"):
        common.class_pixel_counts(root, ["t2"], 20)
    cv2.imwrite(os.path.join(root, common.MASKS, "t3.png"), np.zeros((32, 64), np.uint8))
    with pytest.raises(KitError, match="is 64x64 but its mask is 64x32"):
        common.read_pair(root, "t3", 20)
    cv2.imwrite(os.path.join(root, common.MASKS, "t4.png"), np.zeros((64, 64, 3), np.uint8))
    with pytest.raises(KitError, match="not a single-channel"):
        common.read_mask(root, "t4", 20)


def test_list_hints_name_the_list_the_root_and_the_whole_id(tmp_path):
    """An id holding a space is read whole and named whole; an empty val.txt is named with its
    root; a class without enough val images names the val list, not only the flags."""
    root = make_root(tmp_path)
    val_list = os.path.join(root, common.LISTS, "val.txt")
    with open(val_list, "w") as f:
        f.write("v0\nmy photo 1\n")
    assert common.read_list(val_list) == ["v0", "my photo 1"]
    with pytest.raises(KitError, match="my photo 1.png: missing or corrupt"):
        common.read_mask(root, common.read_list(val_list)[1], 20)
    with open(val_list, "w") as f:
        f.write("\n")
    with pytest.raises(KitError, match=f"{re.escape(val_list)} lists no image"):
        common.image_pools(root)
    with open(val_list, "w") as f:
        f.write("v0\n")
    ids, val = common.image_pools(root)
    counts = common.class_pixel_counts(root, val, 20)
    with pytest.raises(KitError, match=r"class 1 has 1 val images \(.*val.txt\) with >= 100"):
        common.EpisodeDataset(root, val, counts, "synthetic", [1, 2], 1, 100, 0, episodes=2)


def test_truncated_jpeg_stops_the_scan_naming_the_file(tmp_path):
    root = worlds.make_synthetic(str(tmp_path / "w"), 12, 6, 48)
    img = os.path.join(root, common.IMAGES, "train_000004.jpg")
    assert cv2.imread(img) is not None
    truncate(img)
    assert cv2.imread(img) is not None  # OpenCV decodes a truncated JPEG, only warning on stderr
    train, _ = common.image_pools(root)
    with pytest.raises(KitError, match=f"cannot read image {img} .*truncated"):
        common.class_pixel_counts(root, train, 20)
    other = os.path.join(root, common.IMAGES, "train_000005.jpg")
    with open(other, "ab") as f:
        f.write(b"trailing bytes after the end marker")
    common.check_image_file(root, "train_000005", (48, 48))  # a valid JPEG with a tail is not bad
    with pytest.raises(KitError, match="is 48x48 but its mask is 40x48"):
        common.check_image_file(root, "train_000005", (48, 40))


# ---------- common.py 5. Transforms: training augmentation and test geometry ----------
def test_train_transform_keeps_image_and_mask_aligned():
    img, mask = blocks([1, 2, 3, 4], size=96, block=48)
    img = img.astype(np.float32)
    crops = []
    for seed in range(8):
        x, y = common.train_transform(img, mask, np.random.default_rng(seed), 64, [0.8, 1.2])
        raw = x.permute(1, 2, 0).numpy() * common.STD + common.MEAN  # back to 0..255
        valid = (y != 255).numpy()
        agree = np.abs(raw[..., 0] - y.numpy() * 10) < 6  # the red channel encodes the class
        assert x.shape == (3, 64, 64)
        assert agree[valid].mean() > 0.9
        # the augmentation is the seed's: the same seed gives the same crop, bit for bit
        x_again, y_again = common.train_transform(
            img, mask, np.random.default_rng(seed), 64, [0.8, 1.2]
        )
        assert torch.equal(x, x_again)
        assert torch.equal(y, y_again)
        crops.append(y)
    assert any(not torch.equal(crops[0], y) for y in crops[1:])  # and other seeds other crops


def test_test_transform_geometry():
    img = np.full((60, 100, 3), 200, np.float32)
    mask = np.ones((60, 100), np.uint8)
    x, y = common.test_transform(img, mask, 64)
    # longer side 100 -> 64, shorter 60 * 0.64 = 38.4 -> 38 -> floored to 32; top-left on a 64
    # canvas
    assert (y[:32] == 1).all()
    assert (y[32:] == 255).all()
    raw = x.permute(1, 2, 0).numpy() * common.STD + common.MEAN
    assert np.allclose(raw[40:], 0, atol=1e-3)
    assert np.allclose(raw[:32], 200, atol=1e-3)
    logits, target = common.logits_at_label_size(
        torch.zeros(1, 2, 64, 64), torch.ones(60, 100, dtype=torch.long)
    )
    assert logits.shape == (1, 2, 100, 100)
    assert (target[:60] == 1).all()
    assert (target[60:] == 255).all()


def test_to_bgr_image_inverts_to_tensor():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.float64)
    x, _ = common.to_tensor(rgb, np.zeros((5, 7), np.uint8))
    back = common.to_bgr_image(x)  # (5, 7, 3) uint8 BGR
    assert back.dtype == np.uint8
    assert np.abs(back[:, :, ::-1].astype(int) - rgb).max() <= 1


# ---------- common.py 6. Datasets: few-shot episodes ----------
def test_base_dataset_remap(tmp_path):
    root = make_root(tmp_path)
    base = common.base_classes("pascal", 0)
    ds = common.BaseClassDataset(root, ["t0"], "pascal", base, 64, [1, 1], seed=0)
    mask = common.read_mask(root, "t0", 20)  # classes 1 (novel), 2 (novel), 6 (base) and background
    remapped = ds.lut[mask]
    # novel -> 0 (merged background), 6 -> 1 (first base class)
    assert set(np.unique(remapped)) == {0, 1}
    assert (remapped[mask == 6] == 1).all()
    assert (remapped[mask == 1] == 0).all()
    ds16 = common.BaseClassDataset(
        root, ["t0"], "pascal", common.base_classes("pascal", 3), 64, [1, 1], seed=0
    )
    assert ds16.lut[255] == 255
    assert ds16.lut[6] == 6
    assert ds16.lut[16] == 0
    x, y = ds[0]
    assert x.shape == (3, 64, 64)
    assert set(y.unique().tolist()) <= {0, 1, 255}
    # item 0 draws its augmentation from (seed, 0): the same tensors every time
    x_again, y_again = ds[0]
    assert torch.equal(x, x_again)
    assert torch.equal(y, y_again)
    # in the test geometry a 64 x 64 image on a 64 canvas is not resized: the label is the remap
    at_test = common.BaseClassDataset(root, ["t0"], "pascal", base, 64, [1, 1], 0, test_size=64)
    assert np.array_equal(at_test[0][1].numpy(), remapped)


def test_episodes_deterministic_and_worker_independent(tmp_path):
    root = make_root(tmp_path)
    train, _ = common.image_pools(root)
    counts = common.class_pixel_counts(root, train, 20)
    kw = dict(dataset="pascal", classes=[1, 2, 3, 4], shot=2, min_pixels=1024, seed=5, test_size=64)
    a = common.EpisodeDataset(root, train, counts, episodes=12, **kw)
    b = common.EpisodeDataset(root, train, counts, episodes=12, **kw)
    assert a.episodes == b.episodes
    for query, cls, supports in a.episodes:
        assert query not in supports
        assert len(set(supports)) == 2
        assert counts[train.index(query), cls] > 0
    assert [e[0] for e in a.episodes[:8]] == a.data_list  # the query list is walked in order
    train_ds = common.EpisodeDataset(root, train, counts, crop=48, scale=[0.9, 1.1], **kw)
    dev = torch.device("cpu")
    no_workers = list(plumbing.stream_loader(train_ds, 3, 5, 0, 4, 0, dev))
    two_workers = list(plumbing.stream_loader(train_ds, 3, 5, 0, 4, 2, dev))
    for b0, b2 in zip(no_workers, two_workers, strict=True):
        assert torch.equal(b0["query"], b2["query"])
        assert torch.equal(b0["support_mask"], b2["support_mask"])
    resumed = list(plumbing.stream_loader(train_ds, 3, 5, 2, 4, 0, dev))  # iteration 2 onwards
    assert torch.equal(resumed[0]["query"], no_workers[2]["query"])
    # class 6 is in every image: dropping it leaves none
    with pytest.raises(KitError, match="needs 3"):
        common.EpisodeDataset(root, train, counts, drop_classes=[6], **kw)


def test_episode_too_few_images(tmp_path):
    root = make_root(tmp_path)
    train, _ = common.image_pools(root)
    counts = common.class_pixel_counts(root, train, 20)
    with pytest.raises(KitError, match="class 1 has 4 val images .*val.txt.*5-shot"):
        common.EpisodeDataset(
            root, train, counts, "pascal", [1], shot=5, min_pixels=1024, seed=0, episodes=3
        )


# ---------- common.py 7. Backbones and the weight files of the kit and of PFENet / BAM ----------
@pytest.mark.parametrize(
    "name,channels,side",
    [
        ("resnet18", [64, 64, 128, 256, 512], 8),
        ("resnet50", [64, 256, 512, 1024, 2048], 8),
        ("vgg16", [64, 128, 256, 512, 512], 4),
    ],
)
def test_backbone_strides_and_channels(name, channels, side):
    net = common.build_backbone(name, "none").eval()
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels == net.channels
    assert feats[4].shape[-1] == side  # ResNet output stride 8, VGG 16
    assert feats[2].shape[-1] == 8  # layer2: stride 8 in both


def test_backbone_state_dict_file_strict(tmp_path):
    import torchvision

    path = str(tmp_path / "r18.pth")
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), path)
    net = common.build_backbone("resnet18", path)
    assert torch.equal(net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(
        KitError, match="r18.pth holds a resnet18 backbone but this run has --backbone resnet50"
    ):
        common.build_backbone("resnet50", path)
    state = ref.state_dict()
    del state["layer2.0.bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(KitError, match="does not match the backbone: .*layer2.0.bn1.running_var"):
        common.build_backbone("resnet18", path)


def test_resnet50v2_loads_the_peers_file_and_bam_best(resnet50_v2_file, tmp_path, capsys):
    path, state = resnet50_v2_file
    net = common.build_backbone("resnet50v2", path)
    assert net.channels == [128, 256, 512, 1024, 2048]
    assert net.layer1[0].conv1.weight.shape[1] == 128
    assert torch.equal(net.layer0[3].weight, state["conv2.weight"])  # stem conv2
    assert torch.equal(net.layer0[7].running_mean, state["bn3.running_mean"])  # stem bn3 statistics
    assert torch.equal(net.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    with torch.no_grad():
        feats = net.eval()(torch.zeros(1, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == [17, 17, 9, 9, 9]  # output stride 8, as PSPNet
    best = bam_best(state, tmp_path / "best.pth", BAM_STEM)
    capsys.readouterr()
    net2 = common.build_backbone("resnet50v2", best)
    assert "took layer0-layer4 (" in capsys.readouterr().out
    pairs = zip(net.state_dict().values(), net2.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
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


# torchvision's vgg16_bn `features` indices of each of BAM's layer0..layer4: [start, end)
VGG_LAYERS = [(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)]


def bam_vgg_state(state):
    """torchvision's vgg16_bn state renamed as BAM's VGG layers: features.k.p -> layer{i}.{k -
    start}.p."""
    bam = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        _, index, param = key.split(".", 2)
        k = int(index)
        for i, (start, end) in enumerate(VGG_LAYERS):
            if start <= k < end:
                bam[f"layer{i}.{k - start}.{param}"] = value
    return bam


def test_vgg16_bn_file_and_bam_vgg_best(tmp_path):
    import torchvision

    ref = torchvision.models.vgg16_bn(weights=None)
    g = torch.Generator().manual_seed(1)
    state = ref.state_dict()
    random_bn(state, "features.41", 512, g)  # the last BN of layer4
    torch.save(state, tmp_path / "vgg16_bn.pth")
    net = common.build_backbone("vgg16", str(tmp_path / "vgg16_bn.pth"))
    # features 34.. -> layer4 0..
    assert torch.equal(net.layer4[7].running_mean, state["features.41.running_mean"])
    bam = bam_vgg_state(state)
    torch.save({"state_dict": {"module." + k: v for k, v in bam.items()}}, tmp_path / "best.pth")
    net2 = common.build_backbone("vgg16", str(tmp_path / "best.pth"))
    assert torch.equal(net2.layer4[7].running_mean, state["features.41.running_mean"])
    with pytest.raises(
        KitError, match="holds a vgg16 backbone but this run has --backbone resnet18"
    ):
        common.build_backbone("resnet18", str(tmp_path / "best.pth"))


# ---------- common.py 8. Checkpoint files: written atomically, loaded safely ----------
def test_checkpoint_round_trip_and_refusal(tmp_path):
    net = common.build_backbone("resnet18", "none")
    path = str(tmp_path / "run" / "last.pt")
    state = {
        "model": {"backbone." + k: v for k, v in net.state_dict().items()},
        "args": {"dataset": "synthetic", "fold": 1, "backbone": "resnet18"},
        "iter": 7,
    }
    common.write_atomic(path, torch.save, state)
    assert not os.path.exists(path + ".tmp")
    back = common.load_checkpoint(path, {"fold": 1})
    assert back["iter"] == 7
    assert all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    loaded = common.build_backbone("resnet18", path, expect={"dataset": "synthetic", "fold": 1})
    assert torch.equal(loaded.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    with pytest.raises(KitError, match="--fold 1 but this run has --fold 2"):
        common.build_backbone("resnet18", path, expect={"dataset": "synthetic", "fold": 2})
    with pytest.raises(KitError, match="--backbone resnet18 but this run has --backbone resnet50"):
        common.build_backbone("resnet50", path)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(KitError, match="is truncated or not a checkpoint"):
        common.load_checkpoint(path)


def test_checkpoint_hints_name_the_cause(tmp_path):
    """A folder, a truncated file, a list, a pickle of Python objects: each named as such."""
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    truncated = tmp_path / "cut.pt"
    truncated.write_bytes(good.read_bytes()[:60])
    a_list = tmp_path / "list.pt"
    torch.save([torch.zeros(1)], a_list)
    objects = tmp_path / "objects.pt"
    torch.save({"args": argparse.Namespace(lr=1)}, objects)
    cases = [
        (tmp_path, "is a folder: pass the file in it"),
        (truncated, "is truncated or not a checkpoint"),
        (a_list, "holds a list, not a checkpoint or a state dict"),
        (objects, "cannot be loaded safely: it holds Python objects"),
    ]
    for path, message in cases:
        with pytest.raises(KitError, match=message):
            common.load_checkpoint(str(path))
    assert torch.equal(common.load_checkpoint(str(good))["w"], torch.zeros(3))


def test_a_failed_write_keeps_the_previous_file(tmp_path):
    """write_atomic: a save that fails (a full disk) leaves the file there as it was, no temp file,
    and one line saying so."""
    path = str(tmp_path / "out.json")
    common.write_atomic(path, plumbing.save_text, "first")

    def full_disk(obj, tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(KitError, match="No space left on device.*the previous file there is kept"):
        common.write_atomic(path, full_disk, "second")
    with open(path) as f:
        assert f.read() == "first"
    assert os.listdir(tmp_path) == ["out.json"]
