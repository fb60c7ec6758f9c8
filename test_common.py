"""Tests of the BCPT kit: hand-computed equations and metrics, loaders on real-layout files written
here, checkpoint round trips, bad input, and CPU smoke runs of every stage on the synthetic world.

Run: python -m pytest -q test_common.py
"""
import glob
import json
import math
import os
import re
import subprocess
import sys
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

import common
import plumbing
import prepare_data
from common import KitError

warnings.filterwarnings("ignore", category=pytest.PytestUnknownMarkWarning)  # `cuda`: python -m pytest -m cuda

HERE = os.path.dirname(os.path.abspath(__file__))


# ---------- fixtures: real files in the VOC layout, written by the tests ----------
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
        mask[y * block:(y + 1) * block, x * block:(x + 1) * block] = c
    img = np.stack([mask * 10, 255 - mask * 10, np.full_like(mask, 128)], -1).astype(np.uint8)
    return img, mask


def make_root(tmp_path, n=8):
    """8 train images with classes (quadrant layout, 1024 px per quadrant) + 2 val images."""
    items = {f"t{i}": blocks([i % 4 + 1, 0, (i + 1) % 4 + 1, 6]) for i in range(n)}
    items["v0"], items["v1"] = blocks([1, 2, 0, 0]), blocks([3, 1, 0, 0])
    return write_voc(tmp_path / "voc", items, val=["v0", "v1"])


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    return prepare_data.make_synthetic(str(tmp_path_factory.mktemp("synthetic")), n_train=200, n_val=200, size=64)


# ---------- common.py 1. BCPT, Eqs. 1-7, against hand-computed values ----------
def test_cluster_assign_and_eq1_with_empty_cluster():
    centers = torch.tensor([[1.0, 0.0, 0.6], [0.0, 2.0, 0.8]])  # p1 (1, 0), p2 (0, 2), p3 (0.6, 0.8)
    emb = torch.tensor([[3.0, 0.0, 0.0], [4.0, 1.0, 3.0]])  # pixels (3, 4), (0, 1), (0, 3)
    assign = common.cluster_assign(centers, emb)  # S = P^T I: (3, 4) -> 3, 8, 5.0; (0, 1) -> 0, 2, 0.8
    assert assign.tolist() == [1, 1, 1]
    assign = torch.tensor([0, 1, 1])  # p3 gets no pixel
    P_hat, counts = common.cluster_sums(emb, assign, 3)
    assert torch.equal(P_hat, torch.tensor([[3.0, 0.0, 0.0], [4.0, 4.0, 0.0]])) and counts.tolist() == [1, 2, 0]
    new = common.momentum_update(centers, P_hat, counts, mu=0.5)
    # p1: 0.5 (1, 0) + 0.5 (3, 4)/5 = (0.8, 0.4); p2: 0.5 (0, 1) + 0.5 (0, 4)/4 = (0, 1); p3 unchanged
    assert torch.allclose(new, torch.tensor([[0.8, 0.0, 0.6], [0.4, 1.0, 0.8]]))


def test_eq2_matches_explicit_log_softmax():
    g = torch.Generator().manual_seed(0)
    emb, centers = torch.randn(8, 50, generator=g), torch.randn(8, 4, generator=g)
    assign = common.cluster_assign(centers, emb)
    expected = 0.0
    for n in range(50):
        scores = [float(emb[:, n] @ centers[:, k]) for k in range(4)]
        expected += -(scores[assign[n]] - np.log(np.sum(np.exp(scores))))
    none = torch.zeros(8, 0)  # no base pixel: Eq. 4 is then alpha * Eq. 2 / N_bg
    loss, parts = common.bcpt_loss(none, torch.zeros(0, dtype=torch.long), emb, assign, torch.randn(8, 3), centers, 1.0)
    assert loss.item() == pytest.approx(expected / 50, rel=1e-5)
    assert parts["l_bm"] == pytest.approx(expected / 50, rel=1e-5)


def test_eqs6_7_two_guidance_vectors_on_one_centre():
    centers = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    guidance = torch.tensor([[2.0, 1.0], [1.0, 0.5]])  # g1 (2, 1), g2 (1, 0.5): both most similar to p1
    new = common.guide_centers(centers, guidance, mu=0.9)
    g_hat = np.array([3.0, 1.5]) / np.hypot(3.0, 1.5)
    assert torch.allclose(new[:, 0], torch.tensor(0.9 * np.array([1.0, 0.0]) + 0.1 * g_hat, dtype=torch.float32))
    assert torch.equal(new[:, 1:], centers[:, 1:])  # centres given no guidance vector are unchanged


def test_kmeans_is_deterministic_and_correct():
    x = torch.tensor([[0.0, 0.2, 10.0, 10.4, 0.1], [0.0, 0.0, 5.0, 5.0, 0.3]])  # two groups of columns
    init = common.farthest_point_init(x, 2)
    assert torch.equal(init, common.farthest_point_init(x, 2)) and torch.equal(init[:, 0], x[:, 0])
    g = common.kmeans(x, init)
    assert torch.allclose(g[:, 0], x[:, [0, 1, 4]].mean(1)) and torch.allclose(g[:, 1], x[:, [2, 3]].mean(1))
    assert torch.equal(common.kmeans(x, g), g)  # a warm start from the solution stays there


def test_eqs3_4_hand_computed():
    # base pixel j = (1, 0) of class 1; background pixel i = (0, 1); w1 = (1, 0), w2 = (0, 1); p1 = (0, 2), p2 = (1, 1)
    W, P = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    I_base, I_bg = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    assign = common.cluster_assign(P, I_bg)  # <i, p1> = 2 > <i, p2> = 1
    loss, parts = common.bcpt_loss(I_base, torch.tensor([1]), I_bg, assign, W, P, alpha=0.5)
    l3 = -1 + np.log(2 * np.e + 2)  # Eq. 3: logits <j, w1> 1, <j, w2> 0, <j, p1> 0, <j, p2> 1; target w1
    l2 = np.log(1 + np.exp(-1))  # Eq. 2: logits 2, 1; target p1
    assert assign.tolist() == [0] and parts["l_base"] == pytest.approx(l3) and parts["l_bm"] == pytest.approx(l2)
    assert loss.item() == pytest.approx((l3 + 0.5 * l2) / 2)  # Eq. 4: sums / the 2 labelled pixels


def test_eq4_scales_sum_and_mean_on_known_pixel_counts():
    g = torch.Generator().manual_seed(1)
    W, P = torch.randn(4, 3, generator=g), torch.randn(4, 2, generator=g)
    I_base, y_base, I_bg = torch.randn(4, 2, generator=g), torch.tensor([3, 1]), torch.randn(4, 3, generator=g)
    assign = common.cluster_assign(P, I_bg)

    def ce(logits, target):  # -log softmax, one row per pixel, by hand
        return [float(np.log(np.exp(r).sum()) - r[t]) for r, t in zip(logits.numpy(), target)]
    base = ce(torch.cat([I_base.t() @ W, I_base.t() @ P], 1), (y_base - 1).tolist())  # Eq. 3, 2 pixels
    bg = ce(I_bg.t() @ P, assign.tolist())  # Eq. 2, 3 pixels
    total, _ = common.bcpt_loss(I_base, y_base, I_bg, assign, W, P, 0.1, "sum")
    per_term, parts = common.bcpt_loss(I_base, y_base, I_bg, assign, W, P, 0.1, "mean")
    assert total.item() == pytest.approx((sum(base) + 0.1 * sum(bg)) / 5, rel=1e-5)
    assert per_term.item() == pytest.approx(sum(base) / 2 + 0.1 * sum(bg) / 3, rel=1e-5)
    assert parts == pytest.approx({"l_base": sum(base) / 2, "l_bm": sum(bg) / 3}, rel=1e-5)

# ---------- common.py 2. ASPP-PFENet and the prior mask ----------
def test_masked_average_pooling_hand_computed():
    feat = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    mask = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert common.masked_average_pooling(feat, mask).item() == pytest.approx(4.0 / (2 + 5e-4))


def test_prior_mask_known_max_cosine():
    # query positions (1, 0), (-1, 0), (1, 1); support positions (1, 0) in the mask and (0, 1) outside it.
    q = torch.tensor([[1.0, -1.0, 1.0], [0.0, 0.0, 1.0]]).view(1, 2, 1, 3)
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(1, 2, 1, 2)
    m = torch.tensor([1.0, 0.0]).view(1, 1, 1, 2)
    # cos to the masked support: (1, 0) -> 1, 0 (the zeroed position counts as cos 0, as PFENet);
    # (-1, 0) -> -1, 0; (1, 1) -> 0.7071, 0. Max: 1, 0, 0.7071; min-max over the query keeps them.
    prior = common.prior_mask(q, s, m).flatten()
    assert torch.allclose(prior, torch.tensor([1.0, 0.0, 2 ** -0.5]), atol=1e-5)
    # K shots: the mean of the per-shot priors
    s2 = torch.cat([s, s.flip(-1)]), torch.cat([m, m.flip(-1)])
    two = common.shot_prior(q, *s2, shots=2).flatten()
    assert torch.allclose(two, (prior + common.prior_mask(q, s.flip(-1), m.flip(-1)).flatten()) / 2)


def test_aspp_pfenet_shape_and_frozen_backbone():
    torch.manual_seed(0)
    model = common.AsppPFENet(common.build_backbone("resnet18", "none")).train()
    assert not model.backbone.training and model.down_query.training  # BN of the backbone stays in eval
    bn = model.backbone.layer1[0].bn1
    before = bn.running_mean.clone()
    q, s, m = torch.randn(2, 3, 41, 41), torch.randn(2, 3, 3, 41, 41), (torch.rand(2, 3, 41, 41) > 0.5).long()
    logits = model(q, s, m)
    assert logits.shape == (2, 2, 41, 41)
    logits.sum().backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    assert model.cls[-1].weight.grad is not None and torch.equal(bn.running_mean, before)


# ---------- common.py 3. metrics ----------
def test_fewshot_iou_hand_computed():
    m = common.FewShotIoU([1, 2, 3])
    pred = torch.tensor([[1, 1, 0], [0, 1, 0]])
    target = torch.tensor([[1, 0, 0], [255, 1, 1]])
    # valid pixels: (0,0) p1 t1, (0,1) p1 t0, (0,2) p0 t0, (1,1) p1 t1, (1,2) p0 t1; (1,0) ignored
    m.update(pred, target, cls=1)  # fg: I=2, U=4; bg: I=1, U=3
    m.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[1, 1], [0, 0]]), cls=1)  # fg I=0 U=2; bg I=2 U=4
    m.update(torch.ones(1, 2, dtype=torch.long), torch.tensor([[1, 255]]), cls=2)  # fg I=1 U=1; bg I=0 U=0
    iou = m.class_iou()
    assert iou[1] == pytest.approx(100 * 2 / 6)  # sums over the episodes of the class, then divide
    assert iou[2] == pytest.approx(100.0) and iou[3] == 0.0  # class 3 has no episode: counts 0
    assert m.miou() == pytest.approx((100 * 2 / 6 + 100 + 0) / 3)
    assert m.fb_iou() == pytest.approx(100 * ((3 / 7) + (3 / 7)) / 2)  # bg 3/7, fg (2+0+1)/(4+2+1)
    with pytest.raises(ValueError):
        m.update(torch.tensor([[2]]), torch.tensor([[1]]), cls=1)


# ---------- common.py 4. data on disk: folds, pools, the index, bad files ----------
def test_folds():
    assert common.novel_classes("pascal", 0) == [1, 2, 3, 4, 5]
    assert common.novel_classes("pascal", 3) == [16, 17, 18, 19, 20]
    assert common.base_classes("pascal", 1) == [1, 2, 3, 4, 5] + list(range(11, 21))
    assert common.novel_classes("coco", 1) == list(range(2, 81, 4)) and len(common.novel_classes("coco", 1)) == 20
    assert common.novel_classes("coco", 2, "contiguous") == list(range(41, 61))
    assert sorted(common.novel_classes("coco", 0) + common.base_classes("coco", 0)) == list(range(1, 81))
    assert common.novel_classes("synthetic", 2) == [11, 12, 13, 14, 15]
    with pytest.raises(KitError, match="--fold 4"):
        common.novel_classes("pascal", 4)


def test_pools_index_and_cache(tmp_path, monkeypatch):
    root = make_root(tmp_path)
    train, val = common.image_pools(root)
    assert val == ["v0", "v1"] and train == [f"t{i}" for i in range(8)]
    counts = common.class_pixel_counts(root, train, 20)
    assert counts.shape == (8, 21) and counts[0, 1] == 1024 and counts[0, 6] == 1024 and counts[0, 0] == 1024
    pools = common.class_index(train, counts, [1, 6], min_pixels=1024)
    assert pools[1] == ["t0", "t3", "t4", "t7"] and len(pools[6]) == 8
    assert common.class_index(train, counts, [1], min_pixels=1025)[1] == []
    monkeypatch.setattr(common, "read_mask", lambda *a: pytest.fail("cache miss: masks were read again"))
    assert (common.class_pixel_counts(root, train, 20) == counts).all()  # cache hit
    monkeypatch.undo()
    cv2.imwrite(os.path.join(root, common.MASKS, "t0.png"), blocks([5, 5, 5, 5])[1])  # a changed mask rescans
    assert common.class_pixel_counts(root, train, 20)[0, 5] == 4096


def test_oslsm_pool(tmp_path):
    root = make_root(tmp_path)
    with pytest.raises(KitError, match="train_noval.txt"):
        common.image_pools(root, "oslsm")
    for name, ids in (("train.txt", ["t0", "t1", "v0"]), ("train_noval.txt", ["t1", "t2"])):
        with open(os.path.join(root, common.LISTS, name), "w") as f:
            f.write("\n".join(ids) + "\n")
    assert common.image_pools(root, "oslsm")[0] == ["t0", "t1", "t2"]  # union, deduplicated, minus val


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


def truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def test_truncated_jpeg_stops_the_scan_naming_the_file(tmp_path):
    root = prepare_data.make_synthetic(str(tmp_path / "w"), 12, 6, 48)
    img = os.path.join(root, common.IMAGES, "train_000004.jpg")
    assert cv2.imread(img) is not None
    truncate(img)
    assert cv2.imread(img) is not None  # OpenCV decodes a truncated JPEG, only warning on stderr
    train, _ = common.image_pools(root)
    with pytest.raises(KitError, match=f"cannot read image {img} .*truncated"):
        common.class_pixel_counts(root, train, 20)
    other = os.path.join(root, common.IMAGES, "train_000005.jpg")
    with open(other, "ab") as f:
        f.write(b"trailing bytes after the end marker")  # a valid JPEG with a tail is not called bad
    common.check_image_file(root, "train_000005", (48, 48))
    with pytest.raises(KitError, match="is 48x48 but its mask is 40x48"):
        common.check_image_file(root, "train_000005", (48, 40))


# ---------- common.py 5-6. transforms and datasets ----------
def test_train_transform_keeps_image_and_mask_aligned():
    img, mask = blocks([1, 2, 3, 4], size=96, block=48)
    for seed in range(8):
        x, y = common.train_transform(img.astype(np.float32), mask, np.random.default_rng(seed), 64, [0.8, 1.2])
        raw = x.permute(1, 2, 0).numpy() * common.STD + common.MEAN  # back to 0..255
        valid = (y != 255).numpy()
        agree = np.abs(raw[..., 0] - y.numpy() * 10) < 6
        assert x.shape == (3, 64, 64) and agree[valid].mean() > 0.9  # red channel encodes the class


def test_test_transform_geometry():
    img, mask = np.full((60, 100, 3), 200, np.float32), np.ones((60, 100), np.uint8)
    x, y = common.test_transform(img, mask, 64)
    # longer side 100 -> 64, shorter 60 * 0.64 = 38.4 -> 38 -> floored to 32; top-left on a 64 canvas
    assert (y[:32] == 1).all() and (y[32:] == 255).all()
    raw = x.permute(1, 2, 0).numpy() * common.STD + common.MEAN
    assert np.allclose(raw[40:], 0, atol=1e-3) and np.allclose(raw[:32], 200, atol=1e-3)
    logits, target = common.logits_at_label_size(torch.zeros(1, 2, 64, 64), torch.ones(60, 100, dtype=torch.long))
    assert logits.shape == (1, 2, 100, 100) and (target[:60] == 1).all() and (target[60:] == 255).all()


def test_to_bgr_image_inverts_to_tensor():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3)).astype(np.float64)
    x, _ = common.to_tensor(rgb, np.zeros((5, 7), np.uint8))
    back = common.to_bgr_image(x)  # (5, 7, 3) uint8 BGR
    assert back.dtype == np.uint8 and np.abs(back[:, :, ::-1].astype(int) - rgb).max() <= 1


def test_episodes_deterministic_and_worker_independent(tmp_path):
    root = make_root(tmp_path)
    train, _ = common.image_pools(root)
    counts = common.class_pixel_counts(root, train, 20)
    kw = dict(dataset="pascal", classes=[1, 2, 3, 4], shot=2, min_pixels=1024, seed=5, test_size=64)
    a = common.EpisodeDataset(root, train, counts, episodes=12, **kw)
    b = common.EpisodeDataset(root, train, counts, episodes=12, **kw)
    assert a.episodes == b.episodes
    for query, cls, supports in a.episodes:
        assert query not in supports and len(set(supports)) == 2 and counts[train.index(query), cls] > 0
    assert [e[0] for e in a.episodes[:8]] == a.data_list  # the query list is walked in order
    train_ds = common.EpisodeDataset(root, train, counts, crop=48, scale=[0.9, 1.1], **kw)
    dev = torch.device("cpu")
    runs = [[batch for batch in plumbing.stream_loader(train_ds, 3, 5, 0, 4, w, dev)] for w in (0, 2)]
    for b0, b2 in zip(*runs):
        assert torch.equal(b0["query"], b2["query"]) and torch.equal(b0["support_mask"], b2["support_mask"])
    resumed = list(plumbing.stream_loader(train_ds, 3, 5, 2, 4, 0, dev))  # iteration 2 onwards
    assert torch.equal(resumed[0]["query"], runs[0][2]["query"])
    with pytest.raises(KitError, match="needs 3"):  # class 6 is in every image: dropping it leaves none
        common.EpisodeDataset(root, train, counts, drop_classes=[6], **kw)


def test_episode_too_few_images(tmp_path):
    root = make_root(tmp_path)
    train, _ = common.image_pools(root)
    counts = common.class_pixel_counts(root, train, 20)
    with pytest.raises(KitError, match="class 1 has 4 images.*5-shot"):
        common.EpisodeDataset(root, train, counts, "pascal", [1], shot=5, min_pixels=1024, seed=0, episodes=3)


# ---------- common.py 7. backbones ----------
@pytest.mark.parametrize("name,channels,side", [("resnet18", [64, 64, 128, 256, 512], 8),
                                                 ("resnet50", [64, 256, 512, 1024, 2048], 8),
                                                 ("vgg16", [64, 128, 256, 512, 512], 4)])
def test_backbone_strides_and_channels(name, channels, side):
    net = common.build_backbone(name, "none").eval()
    with torch.no_grad():
        feats = net(torch.zeros(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == channels == net.channels
    assert feats[4].shape[-1] == side and feats[2].shape[-1] == 8  # ResNet output stride 8; VGG layer2 /8


def test_backbone_state_dict_file_strict(tmp_path):
    import torchvision
    path = str(tmp_path / "r18.pth")
    ref = torchvision.models.resnet18(weights=None)
    torch.save(ref.state_dict(), path)
    net = common.build_backbone("resnet18", path)
    assert torch.equal(net.layer4[1].conv2.weight, ref.layer4[1].conv2.weight)
    with pytest.raises(KitError, match="r18.pth holds a resnet18 backbone but this run has --backbone resnet50"):
        common.build_backbone("resnet50", path)
    state = ref.state_dict()
    del state["layer2.0.bn1.running_var"]
    torch.save(state, path)
    with pytest.raises(KitError, match="does not match the backbone: .*layer2.0.bn1.running_var"):
        common.build_backbone("resnet18", path)


# ---------- common.py 9. plumbing: checkpoints, RNG, run folders ----------
def test_checkpoint_round_trip_and_refusal(tmp_path):
    net = common.build_backbone("resnet18", "none")
    path = str(tmp_path / "run" / "last.pt")
    state = {"model": {"backbone." + k: v for k, v in net.state_dict().items()},
             "args": {"dataset": "synthetic", "fold": 1, "backbone": "resnet18"}, "iter": 7}
    plumbing.write_atomic(path, torch.save, state)
    assert not os.path.exists(path + ".tmp")
    back = common.load_checkpoint(path, {"fold": 1})
    assert back["iter"] == 7 and all(torch.equal(back["model"][k], v) for k, v in state["model"].items())
    loaded = common.build_backbone("resnet18", path, expect={"dataset": "synthetic", "fold": 1})
    assert torch.equal(loaded.layer3[0].conv1.weight, net.layer3[0].conv1.weight)
    with pytest.raises(KitError, match="--fold 1 but this run has --fold 2"):
        common.build_backbone("resnet18", path, expect={"dataset": "synthetic", "fold": 2})
    with pytest.raises(KitError, match="--backbone resnet18 but this run has --backbone resnet50"):
        common.build_backbone("resnet50", path)
    with open(path, "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.raises(KitError, match="cannot be loaded safely"):
        common.load_checkpoint(path)


def test_rng_state_round_trip(tmp_path):
    plumbing.seed_everything(3)
    plumbing.write_atomic(str(tmp_path / "r.pt"), torch.save, {"rng": plumbing.rng_state()})
    a = (np.random.rand(), torch.rand(1).item(), __import__("random").random())
    plumbing.set_rng_state(common.load_checkpoint(str(tmp_path / "r.pt"))["rng"])
    assert a == (np.random.rand(), torch.rand(1).item(), __import__("random").random())


def test_one_run_per_folder(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt
    out = tmp_path / "run"
    args = pretrain_args(synthetic_root, out, "--max-iters", "1")
    with plumbing.run_folder(str(out)):  # a run holding the folder
        with pytest.raises(KitError, match=rf"--out {out} is in use by process {os.getpid()} on "):
            pretrain_bcpt.main(args)
    assert not (out / "last.pt").exists()
    # a killed run: its lock content and a half-written temp checkpoint are left behind
    (out / ".lock").write_text("process 999999 on somehost")
    (out / "last.pt.tmp999999").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    pretrain_bcpt.main(args)
    note = "was left by process 999999 on somehost, which is no longer running; taking it over"
    assert note in capsys.readouterr().out
    assert sorted(os.listdir(out)) == [".lock", "args.json", "last.pt", "log.jsonl"]  # the temp files are gone
    assert (out / ".lock").read_text() == ""  # released at the end


def test_second_process_on_the_same_folder_stops_with_one_line(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import plumbing, sys, time\n"
                               "with plumbing.run_folder(sys.argv[1]):\n"
                               "    print('locked', flush=True); time.sleep(60)", out],
                              cwd=HERE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run([sys.executable, os.path.join(HERE, "pretrain_bcpt.py"),
                            *pretrain_args(synthetic_root, out, "--max-iters", "1")], capture_output=True, text=True)
        assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
        assert f"is in use by process {holder.pid}" in r.stderr and "choose another --out" in r.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("dataset,expect", [
    (None, ["--mu MU momentum mu of Eqs. 1 and 7 (paper Sec. 2.1) (default 0.99 for --dataset synthetic; pascal 0.999",
            "--crop CROP training crop side (PROTOCOL.md 4.2) (default 64 for --dataset synthetic"]),
    ("pascal", ["(default 0.999 for --dataset pascal; coco 0.999; synthetic 0.99)",
                "--crop CROP training crop side (PROTOCOL.md 4.2) (default 417 for --dataset pascal",
                "resnet18 for CPU runs (default resnet50 for --dataset pascal",
                "--train-pool {aug,oslsm}", "(default oslsm for --dataset pascal; coco aug; synthetic aug)",
                "--head {psp,linear}", "(default psp for --dataset pascal"])])
def test_help_prints_the_defaults_of_the_chosen_dataset(dataset, expect, capsys):
    import pretrain_bcpt
    with pytest.raises(SystemExit) as e:
        pretrain_bcpt.main((["--dataset", dataset] if dataset else []) + ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0 and all(x in text for x in expect) and "None" not in text


@pytest.mark.parametrize("script", ["pretrain_bcpt", "metatrain", "evaluate", "nonparametric_eval"])
def test_every_flag_is_read(script):
    """No dead flags: each parsed flag is read as args.<name> in the script, common.py or plumbing.py."""
    import re
    mod = __import__(script)
    sources = "".join(open(m.__file__).read() for m in (mod, common, plumbing))
    argv = ["--checkpoint", "x.pt"] if script == "evaluate" else []
    dests = vars(mod.parse_args(argv))
    unread = [d for d in dests if not re.search(rf"args\.{d}\b", sources)]
    assert len(dests) > 10 and not unread


def test_no_line_over_120_characters():
    for name in sorted(glob.glob("*.py", root_dir=HERE)):
        long = [k for k, line in enumerate(open(os.path.join(HERE, name)), 1) if len(line.rstrip("\n")) > 120]
        assert not long, (name, long)


# ---------- prepare_data.py: the synthetic benchmark ----------
N_TRAIN, N_VAL, SIZE = 100, 80, 96
WORLDS = ["synthetic", "synthetic2"]


@pytest.fixture(scope="module", params=WORLDS)
def root(request, tmp_path_factory):
    """One small world of each kind, shared by the read-only tests."""
    return prepare_data.make_synthetic(str(tmp_path_factory.mktemp(request.param)), N_TRAIN, N_VAL, SIZE, seed=0,
                                       world=request.param)


def _masks(root, split):
    """Dict id -> mask array for one split, read back from disk."""
    files = sorted(glob.glob(os.path.join(root, "SegmentationClassAug", f"{split}_*.png")))
    return {os.path.basename(f)[:-4]: cv2.imread(f, cv2.IMREAD_UNCHANGED) for f in files}


def _mtimes(root):
    """Modification times of every file below root."""
    return {p: os.stat(p).st_mtime_ns for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)}


def test_layout_and_counts(root):
    assert len(glob.glob(os.path.join(root, "JPEGImages", "*.jpg"))) == N_TRAIN + N_VAL
    assert len(_masks(root, "train")) == N_TRAIN and len(_masks(root, "val")) == N_VAL
    with open(os.path.join(root, "ImageSets", "Segmentation", "val.txt")) as f:
        ids = f.read().split()
    assert ids == sorted(ids) == [f"val_{i:06d}" for i in range(N_VAL)]
    assert not any(i.startswith("train_") for i in ids)
    with open(os.path.join(root, ".complete")) as f:
        world = json.load(f)["world"]
    with open(os.path.join(root, ".complete")) as f:
        marker = json.load(f)
    assert re.fullmatch("[0-9a-f]{16}", marker.pop("checksum"))
    assert marker == dict(world=world, kind="benchmark", n_train=N_TRAIN, n_val=N_VAL, size=SIZE, seed=0)
    names = {"synthetic": prepare_data.SYNTHETIC_CLASS_NAMES, "synthetic2": prepare_data.SYNTHETIC2_CLASS_NAMES}[world]
    assert world in root and len(names) == 20 == len(set(names))


def test_mask_format_and_content(root):
    for split in ("train", "val"):
        for name, m in _masks(root, split).items():
            assert m.dtype == np.uint8 and m.shape == (SIZE, SIZE), name
            vals = set(np.unique(m).tolist())
            assert vals <= set(range(21)) | {255}, (name, vals)
            assert ((m > 0) & (m < 255)).any(), f"{name} has no object pixel"
            img = cv2.imread(os.path.join(root, "JPEGImages", name + ".jpg"), cv2.IMREAD_UNCHANGED)
            assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
            assert img.std() > 10  # textured, not blank


def test_void_band_is_thin(root):
    total = interior = 0
    for m in _masks(root, "val").values():
        void = (m == 255).astype(np.uint8)
        assert void.any() and void.mean() < 0.25
        # void pixels with no non-void 8-neighbour exist only where bands of touching objects merge
        interior += cv2.erode(void, np.ones((3, 3), np.uint8), borderValue=0).sum()
        total += void.sum()
    assert interior / total < 0.1


def test_all_classes_in_both_splits(root):
    for split in ("train", "val"):
        present = set().union(*(set(np.unique(m).tolist()) for m in _masks(root, split).values()))
        assert set(range(1, 21)) <= present, (split, set(range(1, 21)) - present)


def test_multi_class_share(root):
    multi = [len(set(np.unique(m).tolist()) - {0, 255}) >= 2 for m in _masks(root, "train").values()]
    assert np.mean(multi) >= 0.3


def test_foreground_fraction_plausible(root):
    fg = np.mean([((m > 0) & (m < 255)).mean() for m in _masks(root, "train").values()])
    assert 0.1 < fg < 0.5


@pytest.mark.parametrize("world", WORLDS)
def test_determinism(tmp_path, world):
    a = prepare_data.make_synthetic(str(tmp_path / "a"), n_train=20, n_val=10, seed=3, world=world)
    b = prepare_data.make_synthetic(str(tmp_path / "b"), n_train=20, n_val=10, seed=3, world=world)
    c = prepare_data.make_synthetic(str(tmp_path / "c"), n_train=20, n_val=10, seed=4, world=world)
    read = lambda r, n: open(os.path.join(r, "SegmentationClassAug", n), "rb").read()  # noqa: E731
    names = sorted(os.listdir(os.path.join(a, "SegmentationClassAug")))
    assert names == sorted(os.listdir(os.path.join(b, "SegmentationClassAug")))
    assert all(read(a, n) == read(b, n) for n in names)
    assert sum(read(a, n) != read(c, n) for n in names) > len(names) // 2


CHECKSUMS = {("synthetic", "benchmark"): "4ba0beabeed78d76", ("synthetic", "standin"): "0c4ef776552d8085",
             ("synthetic2", "benchmark"): "262db54dc1c11b12", ("synthetic2", "standin"): "70298948b4628869"}


@pytest.mark.parametrize("world,kind", sorted(CHECKSUMS))
def test_world_checksums_are_pinned(tmp_path, world, kind):
    """The worlds are drawn with numpy alone: the same pixels and labels on every machine (12 + 6 images here; the
    checksum covers the decoded JPEGs and the labels, i.e. what the stages read)."""
    r = prepare_data.make_synthetic(str(tmp_path / "w"), 12, 6 if kind == "benchmark" else 0, world=world, kind=kind)
    with open(os.path.join(r, ".complete")) as f:
        assert json.load(f)["checksum"] == CHECKSUMS[world, kind]


def test_standin_root_is_another_draw_with_distractors(tmp_path):
    bench = prepare_data.make_synthetic(str(tmp_path / "b"), 30, 0, world="synthetic2")
    stand = prepare_data.make_synthetic(str(tmp_path / "s"), 30, 0, world="synthetic2", kind="standin")
    a, b = _masks(bench, "train"), _masks(stand, "train")
    assert a.keys() == b.keys() and all(not np.array_equal(a[k], b[k]) for k in a)  # other images, same names
    with pytest.raises(KitError, match="ImageNet stand-in of synthetic2, which has no val images"):
        prepare_data.ensure_synthetic(stand, "synthetic2")


def test_the_two_worlds_differ_and_each_stays_in_its_folder(tmp_path, capsys):
    one = prepare_data.make_synthetic(str(tmp_path / "one"), 40, 10, 48)
    two = prepare_data.make_synthetic(str(tmp_path / "two"), 40, 150, 48, world="synthetic2")
    masks = [np.stack(list(_masks(r, "train").values())) for r in (one, two)]
    objects = [[len(set(np.unique(m).tolist()) - {0, 255}) for m in ms] for ms in masks]
    assert max(objects[1]) <= 2 < max(objects[0])  # synthetic2: 1-2 objects; synthetic: up to 4
    with pytest.raises(KitError, match="holds the synthetic world, not synthetic2: pass --dataset synthetic"):
        prepare_data.ensure_synthetic(one, "synthetic2")
    with pytest.raises(KitError, match="holds a synthetic2 root made by this kit: did you mean --dataset synthetic2"):
        prepare_data.make_synthetic(two, 40, 10, 48, flag="--out")  # world 1 is never written over world 2
    import nonparametric_eval
    nonparametric_eval.main(["--dataset", "synthetic2", "--data-root", two, "--episodes", "2", "--seeds", "1",
                             "--workers", "0", "--min-pixels", "16", "--test-size", "48"])
    assert "synthetic2 fold 0" in capsys.readouterr().out


def test_idempotent_no_rewrite(tmp_path):
    r = prepare_data.make_synthetic(str(tmp_path / "d"), n_train=10, n_val=5)
    for p in _mtimes(r):  # backdate every file so that any rewrite is detectable
        os.utime(p, ns=(10**18, 10**18))
    assert prepare_data.make_synthetic(r, n_train=10, n_val=5) == r
    assert set(_mtimes(r).values()) == {10**18}


def test_changed_parameters_regenerate(tmp_path):
    r = prepare_data.make_synthetic(str(tmp_path / "f"), n_train=10, n_val=5)
    prepare_data.make_synthetic(r, n_train=6, n_val=5)
    assert len(_masks(r, "train")) == 6
    with open(os.path.join(r, ".complete")) as f:
        assert json.load(f)["n_train"] == 6


def test_two_processes_generate_one_world(tmp_path):
    """Stage scripts started side by side both generate on first use; each must see a complete world."""
    root = str(tmp_path / "w")
    cmd = [sys.executable, "-c", "import prepare_data, sys; prepare_data.make_synthetic(sys.argv[1], 40, 10, 48); "
           "import os; print(len(os.listdir(os.path.join(sys.argv[1], 'SegmentationClassAug'))))", root]
    procs = [subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate()[0].split()[-1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs == ["50", "50"]
    assert sorted(os.listdir(tmp_path)) == ["w"]  # no temporary folder left behind
    ref = prepare_data.make_synthetic(str(tmp_path / "ref"), 40, 10, 48)
    read = lambda r, n: open(os.path.join(r, "SegmentationClassAug", n), "rb").read()  # noqa: E731
    assert all(read(root, n) == read(ref, n) for n in os.listdir(os.path.join(ref, "SegmentationClassAug")))


def test_world_appears_whole_even_if_another_run_publishes_first(tmp_path, monkeypatch):
    """Deterministic version of the race: mid-generation, root is untouched; then another run publishes
    the same world first; this run keeps it and leaves no temporary folder."""
    root, render, calls, seen = str(tmp_path / "w"), prepare_data._render, [], {}
    spec = prepare_data.WORLDS["synthetic"]

    def spy(rng, size, *more):
        calls.append(1)
        if len(calls) == 5:  # a quarter of the way through this run's 20 images
            seen["root mid-generation"] = os.path.exists(root)
            monkeypatch.setitem(spec, "render", render)
            prepare_data.make_synthetic(root, 16, 4, 32)  # the other run, start to finish
        return render(rng, size, *more)
    monkeypatch.setitem(spec, "render", spy)
    assert prepare_data.make_synthetic(root, 16, 4, 32) == root
    assert seen == {"root mid-generation": False}
    assert len(os.listdir(os.path.join(root, "SegmentationClassAug"))) == 20
    assert sorted(os.listdir(tmp_path)) == ["w"]


def test_synthetic_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(KitError, match="is not empty and was not made by this kit.*new or empty folder"):
        prepare_data.make_synthetic(str(tmp_path), n_train=5, n_val=2)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_synthetic_world_without_marker_is_refused(tmp_path):
    r = prepare_data.make_synthetic(str(tmp_path / "e"), n_train=10, n_val=5)
    os.remove(os.path.join(r, prepare_data.SYNTHETIC_MARKER))  # no longer recognisably the kit's own
    before = tree_bytes(r)
    with pytest.raises(KitError, match="looks like a prepared VOC/COCO root"):
        prepare_data.make_synthetic(r, n_train=10, n_val=5)
    assert tree_bytes(r) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    assert prepare_data.make_synthetic(str(empty), n_train=4, n_val=2) == str(empty)  # an empty folder is fine


# ---------- prepare_data.py: PASCAL VOC + SBD and COCO ----------
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
        m[2:14, 2 + 5 * k:6 + 5 * k] = v
    m[:, 1] = 255
    return m


def write_jpg(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cv2.imwrite(path, np.full((H, W, 3), 100, np.uint8))


def write_p_png(path, arr):
    img = Image.fromarray(arr, mode='P')
    img.putpalette(voc_palette())
    img.save(path)


def read_png(path):
    m = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert m is not None and m.ndim == 2 and m.dtype == np.uint8
    return m


VOC_MASKS = {'2007_000001': mask_with(1, 15), '2007_000002': mask_with(20, 7),
             '2007_000003': mask_with(3), '2007_000004': mask_with(12, 2, 9)}

SBD_MASKS = {'2007_000002': np.full((H, W), 4, np.uint8),   # VOC must win
             '2007_000003': np.full((H, W), 5, np.uint8),   # in VOC val: not in train_noval
             '2008_000010': mask_with(11, 6), '2008_000011': mask_with(19)}

@pytest.fixture
def voc(tmp_path):
    root = tmp_path / 'VOCdevkit' / 'VOC2012'
    (root / 'SegmentationClass').mkdir(parents=True)
    (root / 'ImageSets' / 'Segmentation').mkdir(parents=True)
    for i in list(VOC_MASKS) + ['2008_000010', '2008_000011', '2009_000099']:
        write_jpg(str(root / 'JPEGImages' / (i + '.jpg')))
    for i, m in VOC_MASKS.items():
        write_p_png(str(root / 'SegmentationClass' / (i + '.png')), m)
    (root / 'ImageSets' / 'Segmentation' / 'train.txt').write_text('2007_000002\n2007_000001\n')
    (root / 'ImageSets' / 'Segmentation' / 'val.txt').write_text('2007_000003\n2007_000004\n')
    return str(root)


@pytest.fixture
def sbd(tmp_path):
    sio = pytest.importorskip('scipy.io', reason='SBD .mat fixtures need scipy')
    import scipy.sparse
    root = tmp_path / 'benchmark_RELEASE' / 'dataset'
    (root / 'cls').mkdir(parents=True)
    for i, m in SBD_MASKS.items():
        bnd = np.empty((20, 1), object)   # like the real files: a 20x1 cell of sparse boundary maps
        for k in range(20):
            bnd[k, 0] = scipy.sparse.csc_matrix((H, W), dtype=bool)
        sio.savemat(str(root / 'cls' / (i + '.mat')), {'GTcls': {
            'Segmentation': m, 'Boundaries': bnd, 'CategoriesPresent': np.unique(m[m > 0]).reshape(-1, 1)}})
    (root / 'train.txt').write_text('2007_000002\n2008_000010\n')
    (root / 'val.txt').write_text('2007_000003\n2008_000011\n')
    return str(root)


def lists(out):
    d = os.path.join(out, 'ImageSets', 'Segmentation')
    return {f[:-4]: open(os.path.join(d, f)).read().split('\n')[:-1] for f in os.listdir(d)}


def snapshot(out):
    res = {}
    for sub in ('SegmentationClassAug', 'ImageSets/Segmentation'):
        for f in sorted(os.listdir(os.path.join(out, sub))):
            res[sub + '/' + f] = open(os.path.join(out, sub, f), 'rb').read()
    for f in sorted(os.listdir(os.path.join(out, 'JPEGImages'))):
        res['JPEGImages/' + f] = os.readlink(os.path.join(out, 'JPEGImages', f))
    return res


def test_pascal_from_sbd_mat(voc, sbd, tmp_path, capsys):
    out = str(tmp_path / 'out')
    counts = prepare_data.prepare_pascal(voc, sbd, out)
    assert counts == {'val': 2, 'train': 2, 'train_noval': 3, 'trainaug': 4, 'oslsm': 4, 'masks': 6}
    text = capsys.readouterr().out
    assert 'WARNING' in text and '1449' in text and '5953' in text and '10582' in text
    L = lists(out)
    assert L['val'] == ['2007_000003', '2007_000004']
    assert L['train'] == ['2007_000001', '2007_000002']
    assert L['train_noval'] == ['2007_000002', '2008_000010', '2008_000011']
    assert L['trainaug'] == ['2007_000001', '2007_000002', '2008_000010', '2008_000011']
    seg = os.path.join(out, 'SegmentationClassAug')
    assert sorted(f[:-4] for f in os.listdir(seg)) == sorted(set(VOC_MASKS) | set(SBD_MASKS))
    for i, m in VOC_MASKS.items():               # palette indices (incl. 255), VOC wins over SBD
        np.testing.assert_array_equal(read_png(os.path.join(seg, i + '.png')), m)
    for i in ('2008_000010', '2008_000011'):
        np.testing.assert_array_equal(read_png(os.path.join(seg, i + '.png')), SBD_MASKS[i])
    link = os.path.join(out, 'JPEGImages', '2008_000010.jpg')
    assert os.path.islink(link)
    assert os.readlink(link) == os.path.abspath(os.path.join(voc, 'JPEGImages', '2008_000010.jpg'))
    assert not os.path.exists(os.path.join(out, 'JPEGImages', '2009_000099.jpg'))
    before = snapshot(out)
    assert prepare_data.prepare_pascal(voc, sbd, out) == counts        # idempotent
    assert snapshot(out) == before
    assert not [f for f in os.listdir(seg) if 'tmp' in f]


def test_pascal_train_noval_file(voc, sbd, tmp_path):
    with open(os.path.join(sbd, 'train_noval.txt'), 'w') as f:
        f.write('2008_000010\n2007_000003\n')   # a VOC val id is still dropped
    out = str(tmp_path / 'out')
    counts = prepare_data.prepare_pascal(voc, sbd, out)
    assert lists(out)['train_noval'] == ['2008_000010']
    assert counts['train_noval'] == 1 and counts['oslsm'] == 3 and counts['trainaug'] == 4


def test_pascal_from_aug(voc, tmp_path):
    aug = tmp_path / 'SegmentationClassAug'
    aug.mkdir()
    cv2.imwrite(str(aug / '2007_000002.png'), np.full((H, W), 4, np.uint8))   # VOC must win
    cv2.imwrite(str(aug / '2008_000010.png'), mask_with(11, 6))
    out = str(tmp_path / 'out')
    counts = prepare_data.prepare_pascal(voc, None, out, aug=str(aug))
    assert counts == {'val': 2, 'train': 2, 'train_noval': 2, 'trainaug': 3, 'oslsm': 3, 'masks': 5}
    L = lists(out)
    assert L['trainaug'] == ['2007_000001', '2007_000002', '2008_000010']
    assert L['train_noval'] == ['2007_000002', '2008_000010']
    seg = os.path.join(out, 'SegmentationClassAug')
    np.testing.assert_array_equal(read_png(os.path.join(seg, '2007_000002.png')), VOC_MASKS['2007_000002'])
    np.testing.assert_array_equal(read_png(os.path.join(seg, '2008_000010.png')), mask_with(11, 6))


def test_pascal_missing_folder(voc, tmp_path):
    seg = os.path.join(voc, 'SegmentationClass')
    os.rename(seg, seg + '_gone')
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, None, str(tmp_path / 'out'), aug=str(tmp_path))
    assert seg in str(e.value) and 'SegmentationClass/' in str(e.value)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(os.path.join(voc, 'nope'), None, str(tmp_path / 'out'), aug=str(tmp_path))
    assert os.path.join(voc, 'nope') in str(e.value)


def test_pascal_missing_sbd_cls(voc, sbd, tmp_path):
    os.rename(os.path.join(sbd, 'cls'), os.path.join(sbd, 'cls_gone'))
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / 'out'))
    assert os.path.join(sbd, 'cls') in str(e.value)


def test_pascal_bad_value_rejected(voc, sbd, tmp_path):
    bad = os.path.join(voc, 'SegmentationClass', '2007_000004.png')
    write_p_png(bad, mask_with(37))
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / 'out'))
    assert bad in str(e.value) and '37' in str(e.value)


def test_pascal_bad_value_in_mat_rejected(voc, sbd, tmp_path):
    import scipy.io
    bad = os.path.join(sbd, 'cls', '2008_000011.mat')
    scipy.io.savemat(bad, {'GTcls': {'Segmentation': mask_with(37)}})
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / 'out'))
    assert bad in str(e.value) and '37' in str(e.value)


def test_pascal_rgb_mask_rejected(voc, tmp_path):
    bad = os.path.join(voc, 'SegmentationClass', '2007_000001.png')
    Image.fromarray(np.zeros((H, W, 3), np.uint8), 'RGB').save(bad)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, None, str(tmp_path / 'out'), aug=str(tmp_path))
    assert bad in str(e.value)


def test_pascal_no_scipy_message(voc, sbd, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, 'scipy.io', None)
    monkeypatch.setitem(sys.modules, 'scipy', None)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_pascal(voc, sbd, str(tmp_path / 'out'))
    assert 'pip install scipy' in str(e.value) and '--aug' in str(e.value)


def rle_counts(mask):
    """Uncompressed COCO RLE counts: column-major runs, starting with a (possibly empty) run of 0."""
    flat = mask.flatten(order='F')
    counts, cur, n = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(n)
            cur, n = v, 0
        n += 1
    counts.append(n)
    return counts


def box(r0, r1, c0, c1):
    m = np.zeros((H, W), np.uint8)
    m[r0:r1, c0:c1] = 1
    return m


@pytest.fixture
def coco(tmp_path):
    mu = pytest.importorskip('pycocotools.mask', reason='COCO tests need pycocotools')
    root = tmp_path / 'coco'
    (root / 'annotations').mkdir(parents=True)
    cats = [{'id': 90, 'name': 'toothbrush'}, {'id': 1, 'name': 'person'}, {'id': 3, 'name': 'car'}]
    small, crowd, comp = box(5, 9, 6, 10), box(0, H, 12, 18), box(10, 14, 1, 5)
    train = {'images': [{'id': 9, 'file_name': 'COCO_train2014_000000000009.jpg', 'height': H, 'width': W},
                        {'id': 25, 'file_name': 'COCO_train2014_000000000025.jpg', 'height': H, 'width': W}],
             'categories': cats,
             'annotations': [
                 # small instance listed first with the lower id: area must decide the order
                 {'id': 1, 'image_id': 9, 'category_id': 90, 'iscrowd': 0, 'area': 16.0, 'bbox': [6, 5, 4, 4],
                  'segmentation': {'size': [H, W], 'counts': rle_counts(small)}},
                 {'id': 3, 'image_id': 9, 'category_id': 3, 'iscrowd': 1, 'area': 96.0, 'bbox': [12, 0, 6, 16],
                  'segmentation': {'size': [H, W], 'counts': rle_counts(crowd)}},
                 {'id': 2, 'image_id': 9, 'category_id': 1, 'iscrowd': 0, 'area': 120.0, 'bbox': [2, 2, 12, 10],
                  'segmentation': [[2, 2, 14, 2, 14, 12, 2, 12]]}]}
    val = {'images': [{'id': 42, 'file_name': 'COCO_val2014_000000000042.jpg', 'height': H, 'width': W}],
           'categories': cats,
           'annotations': [{'id': 7, 'image_id': 42, 'category_id': 3, 'iscrowd': 0, 'area': 16.0,
                            'bbox': [1, 10, 4, 4], 'segmentation': {
                                'size': [H, W],
                                'counts': mu.encode(np.asfortranarray(comp))['counts'].decode('ascii')}}]}
    for split, js in (('train', train), ('val', val)):
        (root / 'annotations' / ('instances_%s2014.json' % split)).write_text(json.dumps(js))
        for im in js['images']:
            write_jpg(str(root / ('%s2014' % split) / im['file_name']))
    return str(root)


def test_coco(coco, tmp_path, capsys):
    out = str(tmp_path / 'out')
    counts = prepare_data.prepare_coco(coco, out)
    assert counts == {'train': 1, 'val': 1}
    assert 'WARNING' in capsys.readouterr().out
    L = lists(out)
    assert L == {'train': ['COCO_train2014_000000000009'], 'val': ['COCO_val2014_000000000042']}
    seg = os.path.join(out, 'SegmentationClassAug')
    assert sorted(os.listdir(seg)) == ['COCO_train2014_000000000009.png', 'COCO_val2014_000000000042.png']
    exp = np.zeros((H, W), np.uint8)
    exp[0:H, 12:18] = 255          # crowd over background only
    exp[2:12, 2:14] = 1            # polygon rectangle, category id 1 -> class 1
    exp[5:9, 6:10] = 3             # small instance (category 90 -> class 3) painted last, on top
    got = read_png(os.path.join(seg, 'COCO_train2014_000000000009.png'))
    np.testing.assert_array_equal(got, exp)
    exp_val = np.zeros((H, W), np.uint8)
    exp_val[10:14, 1:5] = 2        # compressed RLE, category id 3 -> class 2
    np.testing.assert_array_equal(read_png(os.path.join(seg, 'COCO_val2014_000000000042.png')), exp_val)
    link = os.path.join(out, 'JPEGImages', 'COCO_train2014_000000000009.jpg')
    assert os.readlink(link) == os.path.abspath(os.path.join(coco, 'train2014', 'COCO_train2014_000000000009.jpg'))
    assert sorted(os.listdir(os.path.join(out, 'JPEGImages'))) == [
        'COCO_train2014_000000000009.jpg', 'COCO_val2014_000000000042.jpg']
    before = snapshot(out)
    assert prepare_data.prepare_coco(coco, out) == counts
    assert snapshot(out) == before


def test_coco_rle_helper_matches_pycocotools(coco):
    from pycocotools import mask as mu
    m = box(5, 9, 6, 10)
    np.testing.assert_array_equal(mu.decode(mu.frPyObjects({'size': [H, W], 'counts': rle_counts(m)}, H, W)), m)
    poly = mu.decode(mu.merge(mu.frPyObjects([[2, 2, 14, 2, 14, 12, 2, 12]], H, W)))
    np.testing.assert_array_equal(poly, box(2, 12, 2, 14))


def test_coco_missing_annotation(coco, tmp_path):
    ann = os.path.join(coco, 'annotations', 'instances_val2014.json')
    os.remove(ann)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_coco(coco, str(tmp_path / 'out'))
    assert ann in str(e.value)
    with pytest.raises(KitError) as e:
        prepare_data.prepare_coco(str(tmp_path / 'nowhere'), str(tmp_path / 'out'))
    assert os.path.join(str(tmp_path / 'nowhere'), 'annotations') in str(e.value)


def test_prepare_refuses_a_foreign_out_and_reruns_into_its_own(voc, sbd, tmp_path):
    out = tmp_path / "somewhere"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(KitError, match="--out .*somewhere is not empty and was not made by this kit for pascal"):
        prepare_data.prepare_pascal(voc, sbd, str(out))
    assert os.listdir(out) == ["thesis.tex"] and (out / "thesis.tex").read_text() == "years of work"
    syn = prepare_data.make_synthetic(str(tmp_path / "syn"), 4, 2, 32)
    with pytest.raises(KitError, match="synthetic root made by this kit: did you mean --dataset synthetic"):
        prepare_data.prepare_pascal(voc, sbd, syn)
    own = str(tmp_path / "own")
    prepare_data.prepare_pascal(voc, sbd, own)
    with open(os.path.join(own, prepare_data.PREPARED_MARKER)) as f:
        assert json.load(f)["dataset"] == "pascal"
    prepare_data.prepare_pascal(voc, sbd, own)  # re-running into its own output is allowed


# ---------- prepare_data.py: verify and the command line ----------
def test_cli_make_synthetic_and_verify(tmp_path):
    root = str(tmp_path / "w")
    cmd = [sys.executable, os.path.join(HERE, "prepare_data.py")]
    subprocess.run(cmd + ["synthetic", "--out", root, "--n-train", "30", "--n-val", "20", "--size", "48"],
                   check=True, capture_output=True)
    out = subprocess.run(cmd + ["verify", "--dataset", "synthetic", "--data-root", root, "--min-pixels", "64"],
                         check=True, capture_output=True, text=True).stdout
    val_ids = common.read_list(os.path.join(root, common.LISTS, "val.txt"))
    masks = {i: cv2.imread(os.path.join(root, common.MASKS, i + ".png"), cv2.IMREAD_UNCHANGED) for i in val_ids}
    for fold in range(4):  # val images with >= 64 pixels of a novel class, counted here independently
        novel = range(5 * fold + 1, 5 * fold + 6)
        n = sum(any((m == c).sum() >= 64 for c in novel) for m in masks.values())
        assert f"fold {fold}: train " in out and f"val {n}" in out.split(f"fold {fold}:")[1].splitlines()[0]
    bad = subprocess.run(cmd + ["verify", "--dataset", "pascal", "--data-root", str(tmp_path / "none")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--data-root" in bad.stderr and "Traceback" not in bad.stderr


def test_verify_lists_every_bad_file(tmp_path):
    root = prepare_data.make_synthetic(str(tmp_path / "w"), 12, 6, 48)
    bad = [os.path.join(root, common.IMAGES, f"train_00000{i}.jpg") for i in (1, 7)]
    for p in bad:
        truncate(p, 0.8)
    cv2.imwrite(os.path.join(root, common.MASKS, "val_000002.png"), np.full((48, 48), 77, np.uint8))
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "verify", "--dataset", "synthetic",
                        "--data-root", root], capture_output=True, text=True)
    assert r.returncode == 2 and "verify: 3 of the 18 images or masks" in r.stderr
    assert all(p in r.stdout for p in bad) and "val_000002.png has value 77" in r.stdout


# ---------- pretrain_bcpt.py ----------
def pretrain_args(root, out, *extra):
    return ["--data-root", root, "--out", str(out), "--workers", "0", "--crop", "48", "--batch", "4",
            "--epochs", "1", "--log-every", "1", "--seed", "3", *extra]


def test_generic_loss_by_hand():
    """--method generic: the classes present in each crop's mask are its labels (0 and 255 are none), BCE of the
    linear layer on the globally pooled last layer, mean over images x classes."""
    from types import SimpleNamespace
    import pretrain_bcpt
    emb = torch.tensor([[[[1.0, 3.0]], [[0.0, 2.0]]], [[[2.0, 2.0]], [[-1.0, -1.0]]]])  # (2, D=2, 1, 2)
    # pooled: image 0 (2, 1), image 1 (2, -1)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # 3 classes
    b = torch.tensor([0.0, -1.0, 0.5])
    net = SimpleNamespace(linear=lambda e: torch.einsum("cd,bdhw->bchw", W, e) + b[:, None, None])
    y = torch.tensor([[[1, 3]], [[0, 255]]])  # image 0: classes 1 and 3; image 1: none
    seen = []
    loss, out = pretrain_bcpt.generic_step(_Wrap(net, emb), torch.zeros(2, 3, 1, 2), y, SimpleNamespace(base=[1, 2, 3]),
                                           seen.append)
    # logits: image 0 (2, 1) -> [2, 0, 3.5]; image 1 (2, -1) -> [2, -2, 1.5]; labels [1, 0, 1], [0, 0, 0]
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
    """The stand-in trains the backbone undilated (output stride 32, as ImageNet weights are), on its own root,
    with no fold; its last.pt is accepted as --weights / --pretrained and named in tables."""
    import nonparametric_eval
    import pretrain_bcpt
    x = torch.zeros(1, 3, 64, 64)
    assert common.build_backbone("resnet18", "none", dilate=False)(x)[4].shape[-1] == 2  # 64 / 32
    assert common.build_backbone("resnet18", "none")(x)[4].shape[-1] == 8  # PSPNet's dilated stride 8
    stand = prepare_data.make_synthetic(str(tmp_path / "stand"), 24, 0, world="synthetic2", kind="standin")
    bench = prepare_data.make_synthetic(str(tmp_path / "bench"), 60, 120, world="synthetic2")
    with pytest.raises(KitError, match="--fold: --method generic has no folds"):
        pretrain_bcpt.parse_args(["--method", "generic", "--fold", "1"])
    a = pretrain_bcpt.parse_args(["--method", "generic", "--dataset", "synthetic2"])
    assert (a.fold, a.epochs, a.lr, a.data_root) == (None, 30, 0.03, common.STANDIN_ROOTS["synthetic2"])
    pretrain_bcpt.main(["--method", "generic", "--dataset", "synthetic2", "--data-root", stand, "--out",
                        str(tmp_path / "g"), "--workers", "0", "--batch", "4", "--max-iters", "2"])
    g = str(tmp_path / "g" / "last.pt")
    ckpt = common.load_checkpoint(g)
    assert ckpt["args"]["method"] == "generic" and ckpt["args"]["fold"] is None
    assert ckpt["model"]["W.weight"].shape[0] == 20 and "W.bias" in ckpt["model"]  # every class, with a bias
    assert plumbing.pretrain_label(g) == "imagenet stand-in"
    pretrain_bcpt.main(pretrain_args(bench, tmp_path / "b", "--dataset", "synthetic2", "--weights", g,
                                     "--max-iters", "1"))
    assert plumbing.pretrain_label(str(tmp_path / "b" / "last.pt")) == "bcpt K=6 Eq4=sum from stand-in"
    r = nonparametric_eval.main(["--dataset", "synthetic2", "--data-root", bench, "--pretrained", g, "--episodes",
                                 "3", "--seeds", "1", "--workers", "0", "--min-pixels", "16"])
    assert "imagenet stand-in" in capsys.readouterr().out and 0 <= r["miou"] <= 100


def test_novel_images_drop_leaves_no_novel_pixel_in_any_batch(synthetic_root, tmp_path, monkeypatch):
    """--novel-images drop: every image a pre-training batch draws has no novel pixel; keep draws some."""
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
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / out, "--novel-images", mode, "--max-iters", "8",
                                         "--method", "standard"))
        hits = [has_novel(i) for i in drawn if i.startswith("train_")]  # not the final base-class check's val
        assert len(hits) >= 32 and (not any(hits) if mode == "drop" else any(hits))
    assert plumbing.pretrain_label(str(tmp_path / "d" / "last.pt")) == "standard linear drop-novel"


def test_base_dataset_remap(tmp_path):
    from pretrain_bcpt import BaseClassDataset
    root = make_root(tmp_path)
    ds = BaseClassDataset(root, ["t0"], "pascal", common.base_classes("pascal", 0), 64, [1, 1], seed=0)
    mask = common.read_mask(root, "t0", 20)  # classes 1 (novel), 2 (novel), 6 (base) and background
    remapped = ds.lut[mask]
    assert set(np.unique(remapped)) == {0, 1}  # novel -> 0 (merged background), 6 -> 1 (first base class)
    assert (remapped[mask == 6] == 1).all() and (remapped[mask == 1] == 0).all()
    ds16 = BaseClassDataset(root, ["t0"], "pascal", common.base_classes("pascal", 3), 64, [1, 1], seed=0)
    assert ds16.lut[255] == 255 and ds16.lut[6] == 6 and ds16.lut[16] == 0
    x, y = ds[0]
    assert x.shape == (3, 64, 64) and set(y.unique().tolist()) <= {0, 1, 255}


@pytest.mark.parametrize("method", ["standard", "bcpt"])
def test_pretrain_smoke(synthetic_root, tmp_path, method, capsys):
    import pretrain_bcpt
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--method", method, "--max-iters", "3",
                                     "--vis-clusters", "2"))
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == 3 and ckpt["args"]["method"] == method and ckpt["args"]["fold"] == 0
    assert ("centers" in ckpt["model"]) == (method == "bcpt")
    out = capsys.readouterr().out
    assert "[3/3] loss" in out and (("clusters [" in out) == (method == "bcpt"))
    if method == "bcpt":
        assert len(os.listdir(tmp_path / "clusters")) == 2
        assert ckpt["model"]["centers"].shape == (512, 6) and ckpt["model"]["W.weight"].shape[0] == 15


def test_pretrain_resume_is_exact(synthetic_root, tmp_path):
    import pretrain_bcpt
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "a", "--max-iters", "4"))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "2"))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "4", "--resume"))
    a, b = (common.load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab")
    assert a["iter"] == b["iter"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k  # weights, BN statistics, centres, guidance
    with pytest.raises(KitError, match="--K 6 but this run has --K 3"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--K", "3", "--resume"))


def test_pretrain_nan_loss_stops_and_keeps_last_good(synthetic_root, tmp_path):
    import pretrain_bcpt
    with pytest.raises(KitError, match=r"loss is (nan|inf) at iteration (\d+).*--lr") as e:
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--lr", "1e12", "--max-iters", "20"))
    stopped = int(__import__("re").search(r"iteration (\d+)", str(e.value)).group(1))
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == stopped
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_vis_clusters_standard_says_why_and_bcpt_draws_a_key(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "s", "--method", "standard", "--max-iters", "1",
                                     "--vis-clusters", "2"))
    assert "standard pre-training has no background clusters" in capsys.readouterr().out
    assert not (tmp_path / "s" / "clusters").exists()
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "1", "--vis-clusters", "1",
                                     "--K", "3"))
    pic = cv2.imread(str(tmp_path / "b" / "clusters" / "000.png"))
    assert pic.shape[0] >= 256 + 3 * 22 and pic.shape[1] >= 2 * 256  # upscaled crop pair + a 3-line key


# ---------- metatrain.py, evaluate.py, nonparametric_eval.py ----------
@pytest.fixture(scope="module")
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
    return ["--data-root", root, "--out", str(out), "--pretrained", weights, "--shot", str(shot), "--workers", "0",
            "--crop", "41", "--batch", "2", "--min-pixels", "64", "--test-size", "64", "--log-every", "1",
            "--seed", "5", *extra]


@pytest.fixture(scope="module")
def metatrained(synthetic_root, pretrained, tmp_path_factory):
    """pretrain (bcpt, 2 iters) -> metatrain 2 iters, 1- and 5-shot: {shot: last.pt}."""
    import metatrain
    out = {}
    for shot in (1, 5):
        d = tmp_path_factory.mktemp(f"meta{shot}")
        metatrain.main(meta_args(synthetic_root, d, pretrained["bcpt"], shot, "--max-iters", "2"))
        out[shot] = str(d / "last.pt")
    return out


EVAL_KEYS = {"miou", "fb_iou", "miou_std", "fb_iou_std", "class_iou", "per_seed", "episodes", "seeds", "shot",
             "fold", "dataset", "backbone", "pretrained", "select", "protocol"}

@pytest.mark.parametrize("shot", [1, 5])
def test_pipeline_smoke_pretrain_metatrain_evaluate(metatrained, tmp_path, shot):
    import evaluate
    ckpt = common.load_checkpoint(metatrained[shot])
    assert ckpt["stage"] == "metatrain" and ckpt["iter"] == 2 and ckpt["args"]["shot"] == shot
    path = tmp_path / "r.json"
    compare = ["--compare", metatrained[shot]] if shot == 1 else []  # a second model's column in the pictures
    evaluate.main(["--checkpoint", metatrained[shot], "--episodes", "5", "--seeds", "510", "7", "--workers", "0",
                   "--json", str(path), "--vis", str(tmp_path / "vis"), "--vis-count", "2", *compare])
    r = json.loads(path.read_text())
    assert EVAL_KEYS <= set(r) and r["shot"] == shot and r["episodes"] == 5 and r["seeds"] == [510, 7]
    assert r["pretrained"] == "bcpt K=6 Eq4=sum" and r["select"] == "last"
    assert set(r["class_iou"]) == {"1", "2", "3", "4", "5"}
    seeds = [s["miou"] for s in r["per_seed"]]
    assert r["miou"] == pytest.approx(np.mean(seeds)) and r["miou_std"] == pytest.approx(np.std(seeds, ddof=1))
    assert 0 <= r["miou"] <= 100 and 0 <= r["fb_iou"] <= 100
    pngs = sorted(os.listdir(tmp_path / "vis"))
    pic = cv2.imread(str(tmp_path / "vis" / pngs[0]))
    assert len(pngs) == 2 and pic.shape[1] == (4 if compare else 3) * 256  # support, query, prediction(s)


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


def test_metatrain_resume_is_exact_and_best_val(synthetic_root, tmp_path):
    import evaluate
    import metatrain
    run_ = lambda d, *x: metatrain.main(meta_args(synthetic_root, tmp_path / d, "none", 1, *x))
    run_("a", "--max-iters", "3")
    run_("b", "--max-iters", "1")
    run_("b", "--max-iters", "3", "--resume")
    a, b = (common.load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab")
    assert a["iter"] == b["iter"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    run_("c", "--max-iters", "2", "--select", "best-val", "--val-every", "1", "--val-episodes", "3")
    best = common.load_checkpoint(str(tmp_path / "c" / "best.pt"))
    assert best["select"] == "best-val" and best["iter"] in (1, 2) and best["best"]["iter"] == best["iter"]
    r = evaluate.main(["--checkpoint", str(tmp_path / "c" / "best.pt"), "--episodes", "3", "--seeds", "321",
                       "--workers", "0", "--json", str(tmp_path / "best.json")])
    assert json.loads((tmp_path / "best.json").read_text())["select"] == "best-val"
    assert r["miou"] == pytest.approx(best["best"]["miou"])  # the same episodes as the validation that chose it


def np_args(root, weights, path, *extra):
    return ["--data-root", root, "--pretrained", weights, "--episodes", "5", "--seeds", "510", "--workers", "0",
            "--min-pixels", "64", "--test-size", "64", "--json", str(path), *extra]


def test_pretrain_label_names_each_variant(tmp_path):
    def label(select="last", **args):
        path = str(tmp_path / "c.pt")
        torch.save({"args": args, "model": {}, "select": select}, path)
        return plumbing.pretrain_label(path)
    assert plumbing.pretrain_label("none") == "none" and plumbing.pretrain_label("imagenet") == "imagenet"
    assert label(method="standard", K=6, alpha=0.1) == "standard linear"  # before --head
    assert label(method="standard", head="psp", select="best-val") == "standard psp best-val"
    assert label(method="bcpt", K=6, eq3="base", loss_scale="mean") == "bcpt K=6 Eq4=mean Eq3=base"
    torch.save({"state_dict": {}}, str(tmp_path / "best.pth"))
    assert plumbing.pretrain_label(str(tmp_path / "best.pth")) == "standard (BAM best.pth)"
    assert label(method="bcpt", K=6, alpha=0.1, no_guidance=False) == "bcpt K=6 Eq4=sum"  # before --loss-scale
    assert label(method="bcpt", K=6, alpha=0.1, no_guidance=False, loss_scale="sum") == "bcpt K=6 Eq4=sum"
    assert label(method="bcpt", K=6, alpha=0.1, no_guidance=False, loss_scale="mean") == "bcpt K=6 Eq4=mean"
    assert label(method="bcpt", K=2, alpha=0.1, no_guidance=True, loss_scale="sum") == "bcpt no-guidance K=2 Eq4=sum"
    assert label(method="bcpt", K=6, alpha=0.0, no_guidance=False, loss_scale="mean") == "bcpt K=6 alpha=0 Eq4=mean"
    variants = [dict(method="bcpt", K=k, alpha=a, no_guidance=g, loss_scale=s, eq3=e, select=b) for k in (2, 6)
                for a in (0.0, 0.1) for g in (False, True) for s in ("sum", "mean") for e in ("centres", "base")
                for b in ("last", "best-val")]
    variants += [dict(method="standard", head=h, select=b) for h in ("psp", "linear") for b in ("last", "best-val")]
    assert len({label(**v) for v in variants}) == len(variants) == 2 ** 6 + 4  # each variant its own table row


def test_frozen_features_once_per_image_same_numbers(synthetic_root, pretrained, tmp_path, monkeypatch):
    """The non-parametric test keeps each image's layer 4 (a support's: per class) for reuse: the same numbers as
    running the backbone on every episode, with fewer backbone passes."""
    import nonparametric_eval
    calls = []
    real = nonparametric_eval.frozen_features
    monkeypatch.setattr(nonparametric_eval, "frozen_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    kept = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "a.json"))
    n_kept = len(calls)
    monkeypatch.setattr(nonparametric_eval, "CACHE_BYTES", 0)  # nothing kept: one pass per image per episode
    calls.clear()
    fresh = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "b.json"))
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert kept == fresh and a["sweep"] == b["sweep"] and a["per_seed"] == b["per_seed"]
    assert n_kept < len(calls)


def test_test_geometry_changes_the_scored_label(synthetic_root, metatrained, tmp_path, capsys):
    """pfenet (BAM/PFENet): scored on the original-size label; hsnet (HSNet/DCAMA): on the label resized to the
    test size. Recorded in the results and named in the table row."""
    import evaluate
    ids, counts = common.image_pools(synthetic_root, "aug", False)[1], None
    counts = common.class_pixel_counts(synthetic_root, ids, 20)
    for geometry, side in (("pfenet", 64), ("hsnet", 48)):
        ds = common.EpisodeDataset(synthetic_root, ids, counts, "synthetic", [1, 2, 3, 4, 5], 1, 64, 7, test_size=48,
                                   episodes=2, geometry=geometry)
        assert ds[0]["raw_label"].shape == (side, side) and ds[0]["query"].shape[-1] == 48
    for geometry in ("pfenet", "hsnet"):
        evaluate.main(["--checkpoint", metatrained[1], "--episodes", "3", "--seeds", "1", "--workers", "0",
                       "--test-geometry", geometry, "--test-size", "48", "--json", str(tmp_path / f"{geometry}.json")])
        assert json.loads((tmp_path / f"{geometry}.json").read_text())["protocol"]["test_geometry"] == geometry
    capsys.readouterr()
    evaluate.main(["--table", str(tmp_path / "pfenet.json"), str(tmp_path / "hsnet.json")])
    rows = [line.split("|")[4].strip() for line in capsys.readouterr().out.splitlines() if line.startswith("| synth")]
    assert sorted(rows) == ["bcpt K=6 Eq4=sum", "bcpt K=6 Eq4=sum @hsnet"]


def test_collapsed_model_is_flagged_not_averaged_in_silently(tmp_path, capsys):
    meter = common.FewShotIoU([1, 2])
    for cls in (1, 2):
        meter.update(torch.zeros(4, 4, dtype=torch.long), torch.ones(4, 4, dtype=torch.long), cls)
    r = common.summarize([meter], [510])
    assert r["all_background"] and r["per_seed"][0]["foreground_answers"] == 0
    row = dict(dataset="synthetic", backbone="resnet18", method="ASPP-PFENet", pretrained="none", shot=1, fold=0,
               per_seed=[{"miou": 1.0}], protocol={})
    for name, (miou, flat) in {"a": (1.0, True), "b": (30.0, False)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({**row, "miou": miou, "all_background": flat}))
    import evaluate
    assert "1.00 (all background)" in evaluate.format_table([str(tmp_path / "a.json")])
    assert "1.00 (all background)" in evaluate.format_table([str(tmp_path / "a.json")], "base-threshold")  # its mIoU
    assert "15.50+-20.51 (1 of 2 all background)" in evaluate.format_table([str(tmp_path / f"{n}.json") for n in "ab"])


def _paper_rows_of_protocol():
    """PROTOCOL.md 11.1 read back: {(table, dataset, backbone, pre-training, shot): [folds 0-3, mean]}."""
    names = {"PASCAL-5i": "pascal", "COCO-20i": "coco", "VGG16": "vgg16", "ResNet50": "resnet50"}
    text = open(os.path.join(HERE, "PROTOCOL.md")).read().split("### 11.1")[1].split("### 11.2")[0]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if line.startswith("| 1")
            or line.startswith("| 2")]
    return {(int(t), names[d], names[b], p, int(s)): [float(v) for v in vals] for t, d, b, p, s, *vals in rows}


def test_paper_numbers_match_protocol_and_the_papers_text():
    """evaluate.PAPER is PROTOCOL.md 11.1, whose means are the means of its folds, and whose differences are the
    ones the paper's text states (Sec. 3.2: "BCPT surpasses Standard by 1.51% and 2.61%" on PASCAL ResNet-50,
    "0.69% and 0.73%" on COCO; Table 2: "outperforms Standard and ImageNet by 5.25% and 8.67%")."""
    paper = _paper_rows_of_protocol()
    import evaluate
    assert paper == evaluate.PAPER and len(paper) == 21
    off = {k: sum(v[:4]) / 4 for k, v in paper.items() if abs(sum(v[:4]) / 4 - v[4]) > 0.006}
    assert off == pytest.approx({(1, "pascal", "resnet50", "Standard", 1): 65.425, (1, "pascal", "resnet50", "BCPT", 1):
                                 66.8025, (1, "pascal", "resnet50", "BCPT", 5): 71.0825})  # the paper's Mean as printed
    def gap(t, d, row, s):
        return round(paper[t, d, "resnet50", "BCPT", s][4] - paper[t, d, "resnet50", row, s][4], 2)
    assert (gap(1, "pascal", "Standard", 1), gap(1, "pascal", "Standard", 5)) == (1.51, 2.61)
    assert (gap(1, "coco", "Standard", 1), gap(1, "coco", "Standard", 5)) == (0.69, 0.73)
    assert (gap(2, "pascal", "Standard", 1), gap(2, "pascal", "ImageNet", 1)) == (5.25, 8.67)


def test_table_prints_the_papers_number_beside_ours(tmp_path, capsys):
    """Three training seeds of the non-parametric BCPT row on PASCAL fold 0 (made-up numbers): the paper's 38.52,
    the difference, the spread of the seeds and BAM test.py's best-of-evaluation-seeds figure."""
    import evaluate
    files = []
    for k, miou in enumerate([37.0, 38.0, 40.0]):
        r = dict(dataset="pascal", backbone="resnet50v2", method="non-parametric prior", pretrained="bcpt K=6 Eq4=sum",
                 shot=1, fold=0, miou=miou, per_seed=[{"miou": miou - 1}, {"miou": miou + 1}], protocol={})
        files.append(str(tmp_path / f"s{k}.json"))
        open(files[-1], "w").write(json.dumps(r))
    evaluate.main(["--table", *files])
    out = capsys.readouterr().out
    assert "Beside the paper (Table 2, pascal resnet50 BCPT 1-shot):" in out
    assert ("fold 0: ours 38.33 (training seeds 37.00-40.00), paper 38.52, difference -0.19: inside the spread of "
            "our seeds; best of the evaluation seeds (BAM test.py's Best_mIoU) 41.00") in out
    assert "| pascal | resnet50v2 | non-parametric prior | bcpt K=6 Eq4=sum | 38.33+-1.53 |" in out


def test_results_md_miniature_runs_end_to_end(tmp_path):
    """RESULTS.md's commands, verbatim, on the default world with every run cut to 2 iterations and 2 episodes: the
    paper's rows (stand-in, Standard, BCPT either reading of Eq. 4), random init and the ablation, both tables."""
    script = open(os.path.join(HERE, "RESULTS.md")).read().split("```bash\n")[1].split("```")[0]
    for name in glob.glob(os.path.join(HERE, "*.py")):
        os.symlink(name, tmp_path / os.path.basename(name))
    env = {**os.environ, "W": "synthetic2", "S": "0", "E": "2", "X": "--max-iters 2 --batch 2 --save-every 1",
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    out = subprocess.run(["bash", "-ec", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {line.split("|")[4].strip() for line in out.stdout.splitlines() if line.startswith("| synthetic2")}
    assert {"none", "imagenet stand-in", "standard linear from stand-in", "bcpt K=6 Eq4=sum from stand-in",
            "bcpt K=6 Eq4=mean from stand-in", "standard linear drop-novel from stand-in",
            "bcpt K=6 Eq4=sum drop-novel from stand-in"} <= rows
    assert len(glob.glob(str(tmp_path / "runs/mini/synthetic2/np/*.json"))) == 7
    assert len(glob.glob(str(tmp_path / "runs/mini/synthetic2/meta/*.json"))) == 5
    for root, checksum in (("synthetic2", "f95f45a9e6d48547"), ("synthetic2-standin", "c8fe55f547bc55d6")):
        with open(tmp_path / "data" / root / ".complete") as f:  # the worlds RESULTS.md's numbers were measured on
            assert json.load(f)["checksum"] == checksum


def test_nonparametric_json_each_method_sweep_and_table(synthetic_root, pretrained, tmp_path, capsys):
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
    assert len(rows) == 3 and {r.split("|")[4].strip() for r in rows} == {"none", "standard linear", "bcpt K=6 Eq4=sum"}
    none_row = next(r for r in rows if r.split("|")[4].strip() == "none").split("|")
    cells = [c.strip() for c in none_row[5:10]]  # folds 0-3 and mean
    want0, want1 = (json.loads(open(f).read())["miou"] for f in (files[0], fold1))
    assert cells[0] == f"{want0:.2f}" and cells[1] == f"{want1:.2f}" and cells[2] == cells[3] == "-"
    assert cells[4] == f"{(want0 + want1) / 2:.2f}*"


def test_base_threshold_reads_no_novel_episode(synthetic_root, pretrained, tmp_path, monkeypatch):
    import evaluate
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
    assert {classes for classes, _ in seen} == {novel, base}  # two phases: novel episodes, base episodes
    assert all(c in classes for classes, c in seen)  # every base-phase episode is of a base class
    assert j["base_threshold"] == float(max(j["base_sweep"], key=j["base_sweep"].get))  # chosen on base only
    assert j["miou_base_threshold"] == j["sweep"][f"{j['base_threshold']:g}"] and "miou_base_threshold_std" in j
    for metric, want in (("base-threshold", j["miou_base_threshold"]), ("best-sweep", max(j["sweep"].values()))):
        assert f"| {want:.2f} |" in evaluate.format_table([str(path)], metric)

# ---------- every stage: bad input, a user's data, exact resume ----------
def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "pretrain_bcpt.py"), "--dataset", "pascal",
                        "--data-root", str(tmp_path / "missing"), "--out", str(tmp_path / "o")],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0
    assert "missing does not exist" in r.stderr and "prepare_data.py pascal" in r.stderr


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
                out[rel] = open(p, "rb").read()
            else:
                out[rel] = "dir"
    return out


def test_every_stage_refuses_a_prepared_root_as_synthetic(voc, sbd, metatrained, tmp_path):
    import evaluate
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt
    prepared = str(tmp_path / "mydata")
    prepare_data.prepare_pascal(voc, sbd, prepared)  # exactly what prepare_data.py pascal writes, marker included
    hand = write_voc(tmp_path / "handmade", {"a": blocks([1, 2, 0, 0]), "b": blocks([3, 0, 0, 0])}, val=["b"])
    for root, hint in ((prepared, "pascal root made by this kit: did you mean --dataset pascal"),
                       (hand, "looks like a prepared VOC/COCO root: did you mean --dataset pascal or --dataset coco")):
        before = tree_bytes(root)
        runs = [lambda: pretrain_bcpt.main(["--data-root", root, "--max-iters", "1", "--out", str(tmp_path / "p")]),
                lambda: metatrain.main(["--data-root", root, "--max-iters", "1", "--out", str(tmp_path / "m")]),
                lambda: nonparametric_eval.main(["--data-root", root, "--episodes", "1", "--seeds", "1"]),
                lambda: evaluate.main(["--checkpoint", metatrained[1], "--data-root", root, "--episodes", "1"]),
                lambda: prepare_data.make_synthetic(root, 5, 2, 32, flag="--out")]
        for stage in runs:
            with pytest.raises(KitError, match=f"{root} is not empty and was not made by this kit.*{hint}"):
                stage()
        assert tree_bytes(root) == before  # not one byte changed, nothing added (no cache, no lock)
    cli = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "synthetic", "--out", prepared],
                         capture_output=True, text=True)
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "--out " + prepared in cli.stderr


@pytest.mark.parametrize("script,flag,value,rule", [
    ("pretrain_bcpt", "--mu", "1.5", "in [0.0, 1.0]"), ("pretrain_bcpt", "--alpha", "-1", ">= 0.0"),
    ("pretrain_bcpt", "--lr", "0", "> 0.0"), ("pretrain_bcpt", "--K", "1", ">= 2"),
    ("pretrain_bcpt", "--batch", "0", ">= 1"), ("pretrain_bcpt", "--epochs", "0", ">= 1"),
    ("pretrain_bcpt", "--max-iters", "0", ">= 1"), ("pretrain_bcpt", "--workers", "-1", ">= 0"),
    ("pretrain_bcpt", "--crop", "8", ">= 16"), ("metatrain", "--shot", "0", ">= 1"),
    ("metatrain", "--lr", "-0.1", "> 0.0"), ("evaluate", "--episodes", "0", ">= 1"),
    ("nonparametric_eval", "--episodes", "0", ">= 1"), ("nonparametric_eval", "--shot", "0", ">= 1"),
    ("nonparametric_eval", "--threshold", "1.2", "in [0.0, 1.0]"), ("nonparametric_eval", "--min-pixels", "0", ">= 1")])
def test_flags_checked_before_any_work(script, flag, value, rule, tmp_path, monkeypatch):
    mod = __import__(script)
    monkeypatch.setattr(mod, "open_data", lambda *a: pytest.fail("work started before the flags were checked"))
    with pytest.raises(KitError) as e:
        mod.main([flag, value, "--data-root", str(tmp_path / "never")])
    assert str(e.value) == f"argument {flag}: value {value} is not allowed: it must be {rule}"


def test_flag_error_is_one_line_on_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(HERE, "metatrain.py"), "--shot", "0"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr == "error: argument --shot: value 0 is not allowed: it must be >= 1\n"
    assert not os.listdir(tmp_path)  # nothing generated, no run folder


def checkpoints_equal(a, b):
    for part in ("model", "optimizer"):
        fa, fb = (torch.utils._pytree.tree_flatten(x[part])[0] for x in (a, b))
        assert len(fa) == len(fb)
        for x, y in zip(fa, fb):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y, part
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert a["rng"]["numpy"] == b["rng"]["numpy"] and a["rng"]["python"] == b["rng"]["python"]


def test_resume_leaves_every_rng_where_a_straight_run_has_it(synthetic_root, tmp_path):
    import metatrain
    import pretrain_bcpt
    for name, main, args in (
            ("pre", pretrain_bcpt.main, lambda d, *x: pretrain_args(synthetic_root, tmp_path / d, *x)),
            ("meta", metatrain.main, lambda d, *x: meta_args(synthetic_root, tmp_path / d, "none", 1, *x))):
        main(args(name + "a", "--max-iters", "10"))
        main(args(name + "b", "--max-iters", "5"))
        main(args(name + "b", "--max-iters", "10", "--resume"))
        a, b = (common.load_checkpoint(str(tmp_path / (name + d) / "last.pt")) for d in "ab")
        assert a["iter"] == b["iter"] == 10
        checkpoints_equal(a, b)


# ---------- the peers' own weights and baselines (PFENet / BAM files, PSPNet head, selection, fusion) ----------
def random_bn(state, prefix, c, g):
    """BN entries with statistics that are not the defaults, as in a trained file."""
    state.update({f"{prefix}.weight": torch.rand(c, generator=g) + 0.5, f"{prefix}.bias": torch.randn(c, generator=g),
                  f"{prefix}.running_mean": torch.randn(c, generator=g),
                  f"{prefix}.running_var": torch.rand(c, generator=g) + 0.5,
                  f"{prefix}.num_batches_tracked": torch.tensor(7)})


@pytest.fixture(scope="module")
def resnet50_v2_file(tmp_path_factory):
    """PFENet/BAM's initmodel/resnet50_v2.pth layout, written from the key list (not from the kit's builder):
    deep stem conv1/bn1 3->64 s2, conv2/bn2 64->64, conv3/bn3 64->128; bottlenecks from 128 channels; fc."""
    import torchvision
    g = torch.Generator().manual_seed(0)
    state = {k: v for k, v in torchvision.models.resnet50(weights=None).state_dict().items()
             if not k.startswith(("conv1.", "bn1."))}
    state["layer1.0.conv1.weight"] = torch.randn(64, 128, 1, 1, generator=g)
    state["layer1.0.downsample.0.weight"] = torch.randn(256, 128, 1, 1, generator=g)
    for k, (c_in, c_out) in enumerate([(3, 64), (64, 64), (64, 128)], 1):
        state[f"conv{k}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g)
        random_bn(state, f"bn{k}", c_out, g)
    random_bn(state, "layer4.2.bn3", 2048, g)
    path = tmp_path_factory.mktemp("initmodel") / "resnet50_v2.pth"
    torch.save(state, path)
    return str(path), state


def bam_best(state, path, stem):
    """BAM's base-learner best.pth: {'state_dict': module.layer0..4 (stem renamed into layer0's Sequential), the
    same tensors again under module.encoder.*, module.ppm.*, module.cls.*} (BAM model/PSPNet.py)."""
    out = {}
    for k, v in state.items():
        head = k.split(".")[0]
        if head in stem:
            out[f"layer0.{stem[head]}.{k.split('.', 1)[1]}"] = v
        elif head.startswith("layer"):
            out[k] = v
    for k, v in list(out.items()):
        out[f"encoder.{k[5]}.{k.split('.', 1)[1]}"] = v
    out.update({"ppm.features.0.1.weight": torch.zeros(512, 2048, 1, 1), "cls.0.weight": torch.zeros(512, 4096, 3, 3),
                "cls.4.weight": torch.zeros(16, 512, 1, 1), "cls.4.bias": torch.zeros(16)})
    torch.save({"epoch": 41, "state_dict": {"module." + k: v for k, v in out.items()}, "optimizer": {}}, path)
    return str(path)


def test_resnet50v2_loads_the_peers_file_and_bam_best(resnet50_v2_file, tmp_path, capsys):
    path, state = resnet50_v2_file
    net = common.build_backbone("resnet50v2", path)
    assert net.channels == [128, 256, 512, 1024, 2048] and net.layer1[0].conv1.weight.shape[1] == 128
    assert torch.equal(net.layer0[3].weight, state["conv2.weight"])  # stem conv2
    assert torch.equal(net.layer0[7].running_mean, state["bn3.running_mean"])  # stem bn3 statistics
    assert torch.equal(net.layer4[2].bn3.running_var, state["layer4.2.bn3.running_var"])
    with torch.no_grad():
        feats = net.eval()(torch.zeros(1, 3, 65, 65))
    assert [f.shape[-1] for f in feats] == [17, 17, 9, 9, 9]  # output stride 8, as PSPNet
    best = bam_best(state, tmp_path / "best.pth", {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7})
    capsys.readouterr()
    net2 = common.build_backbone("resnet50v2", best)
    assert "took layer0-layer4 (" in capsys.readouterr().out
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values()))
    with pytest.raises(KitError, match="best.pth holds a resnet50v2 backbone but this run has --backbone vgg16"):
        common.build_backbone("vgg16", best)
    with pytest.raises(KitError, match="_v2.pth holds a resnet50v2 backbone but this run has --backbone resnet50"):
        common.build_backbone("resnet50", path)
    broken = {k: v for k, v in state.items() if k != "layer3.1.conv2.weight"}
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(KitError, match="does not match the backbone: Missing key.*layer3.1.conv2.weight"):
        common.build_backbone("resnet50v2", str(tmp_path / "broken.pth"))


def test_vgg16_bn_file_and_bam_vgg_best(tmp_path):
    import torchvision
    ref = torchvision.models.vgg16_bn(weights=None)
    g = torch.Generator().manual_seed(1)
    state = ref.state_dict()
    random_bn(state, "features.41", 512, g)  # the last BN of layer4
    torch.save(state, tmp_path / "vgg16_bn.pth")
    net = common.build_backbone("vgg16", str(tmp_path / "vgg16_bn.pth"))
    assert torch.equal(net.layer4[7].running_mean, state["features.41.running_mean"])  # features 34.. -> layer4 0..
    bam = {f"layer{i}.{k - a}.{p}": v for i, (a, b) in enumerate([(0, 7), (7, 14), (14, 24), (24, 34), (34, 43)])
           for key, v in state.items() if key.startswith("features.")
           for k, p in [(int(key.split(".")[1]), key.split(".", 2)[2])] if a <= k < b}
    torch.save({"state_dict": {"module." + k: v for k, v in bam.items()}}, tmp_path / "best.pth")
    net2 = common.build_backbone("vgg16", str(tmp_path / "best.pth"))
    assert torch.equal(net2.layer4[7].running_mean, state["features.41.running_mean"])
    with pytest.raises(KitError, match="holds a vgg16 backbone but this run has --backbone resnet18"):
        common.build_backbone("resnet18", str(tmp_path / "best.pth"))


def test_bam_best_through_every_stage(resnet50_v2_file, synthetic_root, tmp_path, capsys):
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt
    path, state = resnet50_v2_file
    best = bam_best(state, tmp_path / "best.pth", {"conv1": 0, "bn1": 1, "conv2": 3, "bn2": 4, "conv3": 6, "bn3": 7})
    small = ["--backbone", "resnet50v2", "--max-iters", "1", "--batch", "2"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "p", "--weights", best, *small))
    metatrain.main(meta_args(synthetic_root, tmp_path / "m", best, 1, *small))
    r = nonparametric_eval.main(np_args(synthetic_root, best, tmp_path / "np.json", "--backbone", "resnet50v2"))
    assert "took layer0-layer4" in capsys.readouterr().out and 0 <= r["miou"] <= 100
    assert json.loads((tmp_path / "np.json").read_text())["pretrained"] == "standard (BAM best.pth)"
    m = common.load_checkpoint(str(tmp_path / "m" / "last.pt"))
    assert torch.equal(m["model"]["backbone.layer0.3.weight"], state["conv2.weight"])  # frozen, as loaded


def test_psp_head_shape_loss_and_label(synthetic_root, tmp_path):
    import pretrain_bcpt
    head = pretrain_bcpt.PSPHead(512, 16)
    assert head(torch.randn(2, 512, 7, 9)).shape == (2, 16, 7, 9) and len(head.ppm) == 4
    assert head.cls[0].in_channels == 1024 and head.ppm[0][1].out_channels == 128  # 2D in, D/4 per bin
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--method", "standard", "--head", "psp",
                                     "--max-iters", "2"))
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert "psp.cls.4.weight" in ckpt["model"] and "W.weight" not in ckpt["model"]
    assert plumbing.pretrain_label(str(tmp_path / "last.pt")) == "standard psp"
    with pytest.raises(KitError, match="--head psp is for --method standard"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--head", "psp"))


def test_pretrain_select_best_val_keeps_best(synthetic_root, tmp_path):
    import pretrain_bcpt
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--batch", "25", "--select", "best-val",
                                     "--eq3", "base", "--max-iters", "8"))  # 200 images: 8 iterations an epoch
    best, last = (common.load_checkpoint(str(tmp_path / f)) for f in ("best.pt", "last.pt"))
    assert best["select"] == "best-val" and best["iter"] == 8 == best["best"]["iter"] and last["select"] == "last"
    records = [json.loads(line) for line in open(tmp_path / "log.jsonl") if "val_miou" in line]
    assert len(records) == 1 and records[0]["new_best"] and 0 <= records[0]["val_miou"] <= 100
    assert plumbing.pretrain_label(str(tmp_path / "best.pt")) == "bcpt K=6 Eq4=sum Eq3=base best-val"


def test_eq3_base_reading_hand_computed():
    W, P = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 1.0]])
    I_base, I_bg = torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [1.0]])
    _, parts = common.bcpt_loss(I_base, torch.tensor([1]), I_bg, torch.tensor([0]), W, P, 0.5, "sum", "base")
    assert parts["l_base"] == pytest.approx(np.log(1 + np.exp(-1)))  # logits <j, w1> 1, <j, w2> 0 only


def test_shot_weights_gram_and_permutation():
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0]]).view(1, 2, 1, 2)  # channel 0 (1, 0), channel 1 (1, 1)
    assert torch.allclose(common.gram(f)[0], torch.tensor([[1.0, 2 ** -0.5], [2 ** -0.5, 1.0]]), atol=1e-6)
    torch.manual_seed(0)
    sw = common.ShotWeights(3)
    q, s = torch.rand(2, 4, 3, 3), torch.rand(2, 3, 4, 3, 3)
    w = sw(q, s)
    perm = torch.tensor([2, 0, 1])
    assert w.shape == (2, 3) and torch.allclose(w.sum(1), torch.ones(2))
    assert torch.allclose(sw(q, s[:, perm]), w[:, perm], atol=1e-6)  # a support's weight follows the support


def test_shot_fusion_weighted_five_shot(synthetic_root, tmp_path):
    import evaluate
    import metatrain
    metatrain.main(meta_args(synthetic_root, tmp_path, "none", 5, "--shot-fusion", "weighted", "--max-iters", "2"))
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["args"]["shot_fusion"] == "weighted" and "shot_weights.rw.0.weight" in ckpt["model"]
    evaluate.main(["--checkpoint", str(tmp_path / "last.pt"), "--episodes", "2", "--seeds", "1", "--workers", "0",
                   "--json", str(tmp_path / "r.json")])
    assert json.loads((tmp_path / "r.json").read_text())["shot_fusion"] == "weighted"


def test_prior_mask_stays_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    q, s = 300 * torch.randn(1, 64, 4, 4, generator=g), 300 * torch.randn(1, 64, 4, 4, generator=g)
    m = torch.ones(1, 1, 4, 4)
    exact = common.prior_mask(q, s, m)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = common.prior_mask(q, s, m)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, exact)


def test_real_data_defaults_pool_and_lr(tmp_path):
    import pretrain_bcpt
    a = pretrain_bcpt.parse_args(["--dataset", "pascal", "--data-root", str(tmp_path), "--method", "standard"])
    assert a.train_pool == "oslsm" and a.head == "psp" and a.backbone_lr_mult == 1.0
    c = pretrain_bcpt.parse_args(["--dataset", "coco", "--data-root", str(tmp_path), "--backbone", "resnet18",
                                  "--weights", "none", "--method", "standard"])
    _, opt = pretrain_bcpt.build(c, torch.device("cpu"))
    assert c.train_pool == "aug" and [g["lr"] for g in opt.param_groups] == [2.5e-3, 2.5e-3]  # BAM's COCO base
    root = make_root(tmp_path)
    with pytest.raises(KitError, match="--train-pool oslsm .*needs .*train.txt.*--train-noval train_noval.txt.*"
                                       "--train-pool aug"):
        common.image_pools(root, "oslsm")


# ---------- precision modes on the CPU, and the CUDA path (run with -m cuda on a GPU machine) ----------
def test_bf16_every_stage_finite_and_recorded(synthetic_root, tmp_path):
    import evaluate
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt
    bf16 = ["--precision", "bf16", "--max-iters", "2", "--batch", "2", "--crop", "33"]
    for method in ("standard", "bcpt"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / method, "--method", method, *bf16))
        ckpt = common.load_checkpoint(str(tmp_path / method / "last.pt"))
        assert ckpt["args"]["precision"] == "bf16" and ckpt["iter"] == 2
        assert all(v.dtype == torch.float32 for v in ckpt["model"].values() if v.is_floating_point())
        losses = [json.loads(line)["loss"] for line in open(tmp_path / method / "log.jsonl")]
        assert len(losses) == 2 and all(np.isfinite(losses))
    metatrain.main(meta_args(synthetic_root, tmp_path / "m", str(tmp_path / "bcpt" / "last.pt"), 1, *bf16))
    evaluate.main(["--checkpoint", str(tmp_path / "m" / "last.pt"), "--episodes", "2", "--seeds", "1", "--workers",
                   "0", "--precision", "bf16", "--json", str(tmp_path / "e.json")])
    nonparametric_eval.main(np_args(synthetic_root, str(tmp_path / "bcpt" / "last.pt"), tmp_path / "n.json",
                                    "--precision", "bf16", "--episodes", "2"))
    for name in ("e.json", "n.json"):
        r = json.loads((tmp_path / name).read_text())
        assert r["precision"] == "bf16" and 0 <= r["miou"] <= 100


def test_bf16_resume_is_exact(synthetic_root, tmp_path):
    import pretrain_bcpt
    bf16 = ["--precision", "bf16", "--batch", "2", "--crop", "33"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "a", "--max-iters", "4", *bf16))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "2", *bf16))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "4", "--resume", *bf16))
    checkpoints_equal(*(common.load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab"))


def test_fp16_needs_cuda_and_benchmark_writes_nothing(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt
    if not torch.cuda.is_available():
        with pytest.raises(KitError, match="--precision fp16 needs a CUDA device: use --precision bf16"):
            pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "f", "--precision", "fp16"))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--benchmark", "2", "--workers", "1"))
    out = capsys.readouterr().out
    assert "ms/step = data" in out and "of which guidance_step/cluster_assign/momentum_update" in out
    assert "workers to keep up" in out
    assert not (tmp_path / "b" / "last.pt").exists()


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def cuda_test(fn):
    for mark in CUDA:
        fn = mark(fn)
    return fn


@cuda_test
def test_cuda_fp16_steps_finite(synthetic_root, tmp_path):
    import metatrain
    import pretrain_bcpt
    for method in ("standard", "bcpt"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / method, "--method", method, "--device", "cuda",
                                         "--precision", "fp16", "--max-iters", "3"))
        assert all(np.isfinite(json.loads(line)["loss"]) for line in open(tmp_path / method / "log.jsonl"))
    metatrain.main(meta_args(synthetic_root, tmp_path / "m", str(tmp_path / "bcpt" / "last.pt"), 1, "--device",
                             "cuda", "--precision", "fp16", "--max-iters", "3"))
    assert all(np.isfinite(json.loads(line)["loss"]) for line in open(tmp_path / "m" / "log.jsonl"))
    ckpt = common.load_checkpoint(str(tmp_path / "m" / "last.pt"))  # made on CUDA, loads on the CPU
    assert all(v.device.type == "cpu" for v in ckpt["model"].values()) and ckpt["rng"]["cuda"]


@cuda_test
def test_cuda_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = common.build_backbone("resnet18", "none").cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        a = net(x)[4]
        b = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))[4]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


@cuda_test
def test_cuda_resume_is_exact(synthetic_root, tmp_path):
    import pretrain_bcpt
    cuda = ["--device", "cuda", "--precision", "fp32"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "a", "--max-iters", "4", *cuda))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "2", *cuda))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "4", "--resume", *cuda))
    a, b = (common.load_checkpoint(str(tmp_path / d / "last.pt")) for d in "ab")
    assert all(torch.equal(x, y) for x, y in zip(a["rng"]["cuda"], b["rng"]["cuda"]))
    losses = [[json.loads(line)["loss"] for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert losses[0][2:] == pytest.approx(losses[1][2:], rel=1e-4)  # bilinear backward is not bit-exact on GPU


@cuda_test
def test_cuda_evaluation_any_workers_and_nonparametric(metatrained, synthetic_root, pretrained, tmp_path):
    import evaluate
    import nonparametric_eval
    base = ["--checkpoint", metatrained[1], "--episodes", "6", "--seeds", "42", "--device", "cuda"]
    assert evaluate.main(base + ["--workers", "0"]) == evaluate.main(base + ["--workers", "2"])
    r = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n.json", "--device", "cuda"))
    assert 0 <= r["miou"] <= 100


# ---------- your own images, and runs that explain themselves ----------
@pytest.fixture
def own_episode(synthetic_root, metatrained, tmp_path):
    """The first evaluation episode of the benchmark, its files written as a user's would be: the query and
    support JPEGs (the world's own bytes) and a 0/255 support mask PNG."""
    import shutil
    ckpt = common.load_checkpoint(metatrained[1])
    a = ckpt["args"]
    ids, counts = common.image_pools(synthetic_root)[1], None
    counts = common.class_pixel_counts(synthetic_root, ids, 20)
    ds = common.EpisodeDataset(synthetic_root, ids, counts, "synthetic", a["novel"], 1, a["min_pixels"], 7,
                               test_size=a["test_size"], episodes=1)
    query, cls, (support,) = ds.episodes[0]
    for i in (query, support):
        shutil.copy(os.path.join(synthetic_root, common.IMAGES, i + ".jpg"), tmp_path / f"{i}.jpg")
    mask = (common.read_mask(synthetic_root, support, 20) == cls).astype(np.uint8) * 255
    cv2.imwrite(str(tmp_path / "support_mask.png"), mask)
    return ds, tmp_path, query, support


def test_own_images_give_the_benchmark_prediction(own_episode, metatrained):
    import evaluate
    ds, d, query, support = own_episode
    evaluate.main(["--checkpoint", metatrained[1], "--support", str(d / f"{support}.jpg"), str(d / "support_mask.png"),
                   "--query", str(d / f"{query}.jpg"), "--out", str(d / "preds")])
    mask = cv2.imread(str(d / "preds" / f"{query}_mask.png"), cv2.IMREAD_UNCHANGED)
    h, w = common.read_mask(ds.root, query, 20).shape
    assert mask.shape == (h, w) and set(np.unique(mask)) <= {0, 255}
    overlay = cv2.imread(str(d / "preds" / f"{query}_overlay.png"))
    assert overlay.shape[0] == h and overlay.shape[1] > w  # the query, then the support beside it
    model = evaluate.load_model(common.load_checkpoint(metatrained[1]), torch.device("cpu"))
    item = torch.utils.data.default_collate([ds[0]])
    with torch.no_grad():
        scores, _ = common.logits_at_label_size(common.predict_meta(model, item), item["raw_label"][0])
    assert np.array_equal(mask // 255, scores.argmax(1)[0, :h, :w].numpy())  # what the benchmark predicts


def test_own_images_nonparametric_and_mask_formats(own_episode, pretrained, capsys):
    import nonparametric_eval
    ds, d, query, support = own_episode
    m = cv2.imread(str(d / "support_mask.png"), cv2.IMREAD_UNCHANGED) > 0
    palette = Image.fromarray(m.astype(np.uint8) * 7, mode="P")  # palette indices, as VOC's masks
    palette.putpalette([0, 0, 0] + [200, 0, 0] * 255)
    palette.save(d / "palette.png")
    cv2.imwrite(str(d / "rgb.png"), np.stack([np.zeros_like(m), m * 128, m * 0], -1).astype(np.uint8))
    for mask in ("palette.png", "rgb.png"):
        assert np.array_equal(prepare_data.read_user_mask(str(d / mask), "img", m.shape), m.astype(np.uint8))
    nonparametric_eval.main(["--pretrained", pretrained["bcpt"], "--support", str(d / f"{support}.jpg"),
                             str(d / "palette.png"), "--query", str(d / f"{query}.jpg"), "--out", str(d / "np"),
                             "--test-size", "64"])
    assert {f"{query}_{k}.png" for k in ("mask", "overlay", "prior")} <= set(os.listdir(d / "np"))


def test_own_images_bad_input_names_the_file(own_episode, metatrained, tmp_path):
    import evaluate
    ds, d, query, support = own_episode
    (d / "notes.jpg").write_text("not an image")
    cv2.imwrite(str(d / "small.png"), np.ones((5, 5), np.uint8))
    cv2.imwrite(str(d / "empty.png"), np.zeros(cv2.imread(str(d / "support_mask.png")).shape[:2], np.uint8))
    base = ["--checkpoint", metatrained[1], "--query", str(d / f"{query}.jpg"), "--out", str(d / "p")]
    sup = str(d / f"{support}.jpg")
    for support_args, message in ((["notes.jpg", "support_mask.png"], "cannot read image .*notes.jpg"),
                                  ([sup, "small.png"], "mask .*small.png is 5x5 but its image .* is"),
                                  ([sup, "empty.png"], "mask .*empty.png has no foreground pixel")):
        with pytest.raises(KitError, match=message):
            evaluate.main(base + ["--support", *[str(d / a) for a in support_args]])
    with pytest.raises(KitError, match="argument --support: expected 2 arguments"):
        evaluate.main(base + ["--support", sup])


def flags_to_argv(flags):
    """The command line that gives back these flags (args.json "flags"): every flag spelled out."""
    argv = []
    for dest, value in flags.items():
        if value is not None and value is not False:  # (0 == False: compare by identity)
            values = [] if value is True else value if isinstance(value, list) else [value]
            argv += ["--" + dest.replace("_", "-"), *map(str, values)]
    return argv


def test_args_json_round_trip_and_log_without_duplicates(synthetic_root, tmp_path):
    import pretrain_bcpt
    run_ = lambda *x: pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, *x))
    run_("--max-iters", "2")
    run_("--max-iters", "4", "--resume")
    steps = [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 3, 4]  # the resumed run logged no step twice
    j = json.loads((tmp_path / "args.json").read_text())
    again = pretrain_bcpt.parse_args(flags_to_argv(j["flags"]))
    assert again.flags == j["flags"] and j["flags"]["resume"] and j["derived"]["total_iters"] == 50
    assert {"utc", "host", "torch", "torchvision", "cuda", "cudnn", "device", "world_size", "git_commit",
            "git_dirty", "data_root", "pools"} <= set(j["run"]) and j["run"]["pools"] == {"train": 200, "val": 200}
    assert j["stage"] == "pretrain" and j["derived"]["amp"] == "fp32"


def test_episode_log_reproduces_the_reported_miou(metatrained, tmp_path):
    import evaluate
    log, path = tmp_path / "episodes.jsonl", tmp_path / "r.json"
    evaluate.main(["--checkpoint", metatrained[1], "--episodes", "6", "--seeds", "1", "2", "--workers", "0",
                   "--episode-log", str(log), "--json", str(path)])
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
    metatrain.main(meta_args(synthetic_root, tmp_path / "meta", "none", 1, "--max-iters", "2", "--select", "best-val",
                             "--val-every", "1", "--val-episodes", "2"))
    out = tmp_path / "curves.png"
    titles = evaluate.main(["--curves", str(tmp_path / "bcpt" / "log.jsonl"), str(tmp_path / "meta" / "log.jsonl"),
                            "--out", str(out)])
    assert [t.split()[0] for t in titles] == ["training", "learning", "training", "share", "validation"]
    assert cv2.imread(str(out)).shape[0] > 5 * 150


# ---------- several processes: torchrun on the CPU (gloo), two ranks ----------
def torchrun(*argv, cwd=HERE):
    """Run a script under torchrun with 2 processes on the CPU; -> the completed process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *argv], capture_output=True, text=True, cwd=cwd, env=env, timeout=600)


def test_stream_batches_shard_each_global_batch():
    one = sum(plumbing.stream_batches(10, 4, 3, 1, 6), [])
    ranks = [sum(plumbing.stream_batches(10, 4, 3, 1, 6, r, 2), []) for r in (0, 1)]
    for t in range(5):  # global batch t: rank 0 has its first half, rank 1 its second
        assert one[4 * t:4 * t + 4] == ranks[0][2 * t:2 * t + 2] + ranks[1][2 * t:2 * t + 2]


def test_eq1_synchronised_over_two_ranks_equals_the_union(tmp_path):
    script = tmp_path / "eq1.py"
    script.write_text(f"""import sys, torch, torch.distributed as dist
sys.path.insert(0, {HERE!r})
import common, plumbing
dist.init_process_group("gloo")
r = dist.get_rank()
g = torch.Generator().manual_seed(0)
P, pixels = torch.nn.functional.normalize(torch.randn(8, 3, generator=g), dim=0), torch.randn(8, 50, generator=g)
mine = pixels[:, :20] if r == 0 else pixels[:, 20:]  # different pixels, and different counts, per rank
P_hat, counts = common.cluster_sums(mine, common.cluster_assign(P, mine), 3)
synced = common.momentum_update(P, plumbing.all_reduce_sum(P_hat), plumbing.all_reduce_sum(counts), 0.9)
union = common.momentum_update(P, *common.cluster_sums(pixels, common.cluster_assign(P, pixels), 3), 0.9)
if r == 0:
    print("EQUAL" if torch.allclose(synced, union, atol=1e-6) and not torch.equal(synced, P) else "DIFFERENT")
dist.destroy_process_group()
""")
    r = torchrun(str(script))
    assert r.returncode == 0 and "EQUAL" in r.stdout, r.stderr[-2000:]


def test_torchrun_evaluation_gives_the_one_process_json(metatrained, synthetic_root, pretrained, tmp_path):
    import evaluate
    import nonparametric_eval
    ev = ["--checkpoint", metatrained[1], "--episodes", "7", "--seeds", "1", "2", "--workers", "0"]
    npa = np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n1.json")
    evaluate.main(ev + ["--json", str(tmp_path / "e1.json")])
    nonparametric_eval.main(npa)
    for script, argv, name in (("evaluate.py", ev + ["--json", str(tmp_path / "e2.json")], "e"),
                               ("nonparametric_eval.py", npa[:-1] + [str(tmp_path / "n2.json")], "n")):
        r = torchrun(script, *argv)
        assert r.returncode == 0, r.stderr[-2000:]
        one, two = (json.loads((tmp_path / f"{name}{k}.json").read_text()) for k in (1, 2))
        assert two.pop("run")["world_size"] == 2 and one.pop("run")["world_size"] == 1
        assert one == two  # the same episodes, sharded over the ranks, counts summed exactly


def test_torchrun_training_both_methods_resume_and_one_checkpoint(synthetic_root, tmp_path):
    for method in ("standard", "bcpt"):
        out = tmp_path / method
        for iters in ("2", "3"):
            r = torchrun("pretrain_bcpt.py", *pretrain_args(synthetic_root, out, "--method", method,
                                                              "--max-iters", iters, "--resume"))
            assert r.returncode == 0, r.stderr[-2000:]
        assert ("centres bit-identical on the 2 processes" in r.stdout) == (method == "bcpt")
        assert "resumed from" in r.stdout and sorted(os.listdir(out)) == [".lock", "args.json", "last.pt", "log.jsonl"]
        ckpt = common.load_checkpoint(str(out / "last.pt"))
        assert ckpt["iter"] == 3 and len(ckpt["rng_ranks"]) == 2 and json.loads((out / "args.json").read_text())[
            "run"]["world_size"] == 2
        assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2, 3]
    r = torchrun("metatrain.py", *meta_args(synthetic_root, tmp_path / "m", str(tmp_path / "bcpt" / "last.pt"), 1,
                                            "--max-iters", "2", "--batch", "4"))
    assert r.returncode == 0 and common.load_checkpoint(str(tmp_path / "m" / "last.pt"))["iter"] == 2, r.stderr[-2000:]
    r = torchrun("metatrain.py", *meta_args(synthetic_root, tmp_path / "m3", "none", 1, "--batch", "3"))
    assert r.returncode != 0 and "--batch 3 is the global batch: it must split evenly over the 2 processes" in r.stderr


def test_device_flag_contradicting_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KitError, match="--device cuda:1: under torchrun each process takes cuda:LOCAL_RANK"):
        plumbing.setup_device("cuda:1")


# ---------- never lose a run: a run folder belongs to one run, checks before writes (README "Status") ----------
def test_a_finished_run_is_never_restarted_without_resume(synthetic_root, tmp_path):
    import pretrain_bcpt
    out = tmp_path / "run"
    pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "3"))
    before = tree_bytes(out)
    with pytest.raises(KitError, match=rf"--out {out} holds a pretrain run at iteration 3 of 50 \(.*last.pt, \d{{4}}-"
                                       r"\d\d-\d\d \d\d:\d\d\): add --resume to continue it, or choose a new --out"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "2"))  # the same command, no --resume
    with pytest.raises(KitError, match="--mu 0.99 but this run has --mu 0.5"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "4", "--resume", "--mu", "0.5"))
    assert tree_bytes(out) == before  # last.pt, log.jsonl and args.json (mu 0.99) untouched


def test_another_stage_never_writes_into_a_run_folder(synthetic_root, pretrained, tmp_path):
    import metatrain
    out = os.path.dirname(pretrained["bcpt"])
    before = tree_bytes(out)
    for extra in ([], ["--resume"]):
        with pytest.raises(KitError, match=f"--out {out} holds a pretrain run, not a metatrain run: choose a new"):
            metatrain.main(meta_args(synthetic_root, out, "none", 1, "--max-iters", "1", *extra))
    assert tree_bytes(out) == before


def test_only_the_kits_own_temp_files_are_deleted(synthetic_root, tmp_path):
    import pretrain_bcpt
    out = tmp_path / "run"
    out.mkdir()
    for name in ("last.pt.tmp4242", "args.json.tmp77", "notes.tmp1", "data.tmp", "my.pt.tmp5"):
        (out / name).write_text("x")
    pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "1"))
    assert {"notes.tmp1", "data.tmp", "my.pt.tmp5"} <= set(os.listdir(out))
    assert not {"last.pt.tmp4242", "args.json.tmp77"} & set(os.listdir(out))


def test_rebuilding_a_world_never_deletes_the_users_files(tmp_path):
    root = tmp_path / "world"
    prepare_data.make_synthetic(str(root), 6, 3, 32)
    (root / "my_notes.txt").write_text("mine")
    with pytest.raises(KitError, match=f"{root} holds my_notes.txt, which this kit did not write"):
        prepare_data.make_synthetic(str(root), 8, 3, 32)
    assert (root / "my_notes.txt").read_text() == "mine" and len(os.listdir(root / common.IMAGES)) == 9
    (root / "my_notes.txt").unlink()
    prepare_data.make_synthetic(str(root), 8, 3, 32)  # only the kit's own files there: the world is rebuilt
    assert len(os.listdir(root / common.IMAGES)) == 11


@pytest.mark.parametrize("script,flag,value", [("pretrain_bcpt", "--lr", "nan"), ("pretrain_bcpt", "--alpha", "inf"),
                                               ("pretrain_bcpt", "--mu", "nan"), ("metatrain", "--scale", "nan"),
                                               ("nonparametric_eval", "--threshold", "nan")])
def test_non_finite_numbers_are_refused(script, flag, value, tmp_path):
    with pytest.raises(KitError, match=f"argument {flag}: value {value} is not a finite number"):
        __import__(script).main([flag, value, *(["1"] * (flag == "--scale")), "--data-root", str(tmp_path)])


@pytest.mark.parametrize("script", ["pretrain_bcpt", "metatrain", "evaluate", "nonparametric_eval"])
def test_device_cuda_without_a_gpu_is_refused_before_any_write(script, metatrained, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = ["--checkpoint", metatrained[1]] if script == "evaluate" else ["--out", str(tmp_path / "o")]
    with pytest.raises(KitError, match="--device cuda: this machine has 0 CUDA device.*pass --device cpu"):
        __import__(script).main(argv + ["--device", "cuda"])
    assert not (tmp_path / "o").exists()


def test_output_and_input_paths_checked_before_the_work(synthetic_root, pretrained, metatrained, tmp_path,
                                                        monkeypatch):
    import evaluate
    import nonparametric_eval
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(common, "EpisodeDataset", lambda *a, **k: pytest.fail("the work started"))
    ev = ["--checkpoint", metatrained[1], "--episodes", "2"]
    for argv, message in ((ev + ["--json", str(blocker / "r.json")], f"--json {blocker}/r.json cannot be written"),
                          (ev + ["--episode-log", str(blocker / "e")], "--episode-log .* cannot be written"),
                          (ev + ["--vis", str(blocker)], f"--vis {blocker} is a file: pass the folder to write"),
                          (ev + ["--json", str(tmp_path)], f"--json {tmp_path} is a folder: pass the file to write"),
                          (["--table", str(tmp_path / "missing.json")], "--table .*missing.json: cannot read it"),
                          (["--table", str(blocker)], f"--table {blocker}: cannot read it as JSON"),
                          (["--curves", str(tmp_path / "no.jsonl")], "--curves .*no.jsonl: no such readable file")):
        with pytest.raises(KitError, match=message):
            evaluate.main(argv)
    with pytest.raises(KitError, match="--json .* cannot be written"):
        nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], blocker / "n.json"))


def test_verify_reads_the_roots_own_marker(voc, sbd, tmp_path, capsys):
    out = str(tmp_path / "pascal")
    prepare_data.prepare_pascal(voc, sbd, out)
    capsys.readouterr()
    prepare_data.main(["verify", "--data-root", out])  # the PASCAL settings, not the synthetic defaults
    said = capsys.readouterr().out
    assert __import__("re").search(rf"pascal at {out}: train pool \d+ images \(oslsm\), val \d+; pixel rule >= 2048",
                                   said)
    with pytest.raises(KitError, match="--dataset synthetic2: .* holds pascal data"):
        prepare_data.main(["verify", "--dataset", "synthetic2", "--data-root", out])


def test_a_test_reads_only_the_val_list(synthetic_root, pretrained, tmp_path):
    import nonparametric_eval
    r = nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n.json",
                                        "--train-pool", "oslsm"))  # the root has no train.txt / train_noval.txt
    assert 0 <= r["miou"] <= 100


def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes(synthetic_root, tmp_path):
    import signal
    import time
    out = tmp_path / "run"
    argv = pretrain_args(synthetic_root, out, "--save-every", "1", "--max-iters", "40")
    # a shell's background job (`cmd &`) inherits SIGINT ignored, and Python then keeps ignoring it: give the run
    # the default disposition a terminal's Ctrl-C meets
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "pretrain_bcpt.py"), *argv], cwd=HERE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    while not (out / "log.jsonl").exists() or len((out / "log.jsonl").read_text().splitlines()) < 2:
        assert p.poll() is None and time.sleep(0.05) is None
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    saved = common.load_checkpoint(str(out / "last.pt"))["iter"]
    assert p.returncode == 130 and err.count("\n") == 1, err
    assert f"stopped: interrupted: the last checkpoint is {out}/last.pt (iteration {saved}); continue with: " \
           f"python pretrain_bcpt.py {' '.join(argv)} --resume" in err
    assert subprocess.run([sys.executable, os.path.join(HERE, "pretrain_bcpt.py"), *argv, "--resume"],
                          cwd=HERE, capture_output=True).returncode == 0


def test_a_log_line_cut_off_by_a_kill_does_not_block_resume(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--max-iters", "2"))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # the kill came mid-write
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--max-iters", "3", "--resume"))
    assert "dropped 1 line(s) cut off by a kill" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in open(tmp_path / "log.jsonl")] == [1, 2, 3]


def corrupt_middle(src, dst):
    """A JPEG with 100 bytes of its entropy-coded data overwritten: it decodes "successfully" into garbage."""
    data = bytearray(open(src, "rb").read())
    pos = int(len(data) * 0.45)
    data[pos:pos + 100] = bytes((k * 37 + 11) % 255 for k in range(100))  # no 0xff: no marker appears
    open(dst, "wb").write(data)


def test_a_jpeg_damaged_in_the_middle_is_caught_by_verify_and_own_images(own_episode, metatrained, tmp_path):
    import evaluate
    ds, d, query, support = own_episode
    corrupt_middle(d / f"{query}.jpg", d / "damaged.jpg")
    assert cv2.imread(str(d / "damaged.jpg")) is not None  # OpenCV alone returns an image
    with pytest.raises(KitError, match=r"cannot read image .*damaged.jpg \(Corrupt JPEG data"):
        evaluate.main(["--checkpoint", metatrained[1], "--support", str(d / f"{support}.jpg"),
                       str(d / "support_mask.png"), "--query", str(d / "damaged.jpg"), "--out", str(d / "p")])
    root = tmp_path / "world"
    prepare_data.make_synthetic(str(root), 6, 3, 64)
    corrupt_middle(root / common.IMAGES / "train_000002.jpg", root / common.IMAGES / "train_000002.jpg")
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare_data.py"), "verify", "--data-root", str(root)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "train_000002.jpg (Corrupt JPEG data" in r.stdout


def test_own_images_need_only_the_checkpoint(tmp_path, capsys):
    import nonparametric_eval
    import pretrain_bcpt
    root = make_root(tmp_path)
    pretrain_bcpt.main(["--dataset", "pascal", "--data-root", root, "--train-pool", "aug", "--backbone", "resnet18",
                        "--weights", "none", "--out", str(tmp_path / "p"), "--max-iters", "1", "--workers", "0",
                        "--crop", "48", "--batch", "2"])
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        cv2.imwrite(str(tmp_path / name / "x.jpg"), blocks([1, 0, 0, 2])[0])
    img, mask = blocks([1, 0, 0, 0])
    cv2.imwrite(str(tmp_path / "s.png"), img)
    cv2.imwrite(str(tmp_path / "m.png"), mask * 255)
    own = ["--pretrained", str(tmp_path / "p" / "last.pt"), "--support", str(tmp_path / "s.png"),
           str(tmp_path / "m.png"), "--query", str(tmp_path / "a" / "x.jpg"), str(tmp_path / "b" / "x.jpg")]
    args = nonparametric_eval.parse_args(own + ["--out", str(tmp_path / "o")])
    assert (args.dataset, args.backbone, args.test_size) == ("pascal", "resnet18", 473)  # the checkpoint's
    nonparametric_eval.main(own + ["--out", str(tmp_path / "o")])
    assert {"x_mask.png", "x-2_mask.png"} <= set(os.listdir(tmp_path / "o"))  # two queries named x.jpg
    with pytest.raises(KitError, match=r"--backbone resnet50: .*last.pt was made for --backbone resnet18"):
        nonparametric_eval.parse_args(own + ["--out", str(tmp_path / "o"), "--backbone", "resnet50"])


def test_every_common_way_of_storing_a_mask(tmp_path):
    m = np.zeros((40, 50), np.uint8)
    m[10:30, 5:25] = 1
    blurred = cv2.GaussianBlur(m * 255, (7, 7), 2)  # anti-aliased edges: many grey values
    voc = m * 15
    voc[9, 5:25] = 255  # a VOC void border beside class 15
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = 255  # white everywhere; the object is the opaque part
    rgba[..., 3] = m * 255
    files = {"01.png": m, "0255.png": m * 255, "rgb.png": np.stack([m * 0, m * 200, m * 0], -1),
             "gray.jpg": m * 255, "aa.png": blurred, "voc.png": voc, "rgba.png": rgba}
    for name, arr in files.items():
        cv2.imwrite(str(tmp_path / name), arr if arr.ndim == 2 or arr.shape[2] == 3 else arr[..., [2, 1, 0, 3]])
    write_p_png(tmp_path / "palette.png", voc)
    for name in [*files, "palette.png"]:
        got = prepare_data.read_user_mask(str(tmp_path / name), "img", m.shape)
        expect = m.copy()
        if name in ("voc.png", "palette.png"):
            expect[9, 5:25] = 255  # void, ignored
        if name == "aa.png":
            expect = (blurred > 127).astype(np.uint8)
        assert np.array_equal(got, expect), name


def test_gram_matrices_never_overflow_in_fp16():
    x = torch.full((1, 3, 60, 60), 5.0)  # RMS 5: |F_i|^2 = 90000 > 65504, the largest fp16 number
    with torch.autocast("cpu", dtype=torch.float16):
        g = common.gram(x.half())
    assert g.dtype == torch.float32 and torch.isfinite(g).all() and torch.allclose(g, torch.ones(1, 3, 3), atol=1e-5)


def test_precision_auto_is_bf16_where_the_gpu_has_it_else_fp32(monkeypatch):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    for has_bf16, expect in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: has_bf16)
        assert plumbing.precision_of("auto", cuda) == expect
    assert plumbing.precision_of("auto", cpu) == "fp32" and plumbing.precision_of("fp16", cuda) == "fp16"
    with pytest.raises(KitError, match="--precision fp16 needs a CUDA device"):
        plumbing.precision_of("fp16", cpu)
