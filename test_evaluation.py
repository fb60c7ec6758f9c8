"""evaluation.py's results files and tables: each episode in the results file, the same episodes for
every backbone; is a gap between two rows real (the paired bootstrap, on made-up results whose
answer is known); Tables 3 and 4 beside the paper; the peers' ImageNet files as the ImageNet row."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluation
from conftest import np_args

CLASSES = (1, 2, 3, 4, 5)  # PASCAL fold 0's novel classes


# ---------- made-up results files ----------
def made_up_episodes(seed=0, seeds=2, per_class=20):
    """Per evaluation seed, episode_columns of made-up episodes: each class per_class times in an
    order fixed by the evaluation seed (the same episodes for any backbone and training seed), and
    numbers drawn from `seed`: unions of 500-2000 pixels, foreground IoU 20-70%."""
    rng = np.random.default_rng(seed)
    out = []
    for s in range(seeds):
        cls = np.repeat(CLASSES, per_class)
        np.random.default_rng(100 + s).shuffle(cls)
        union = rng.integers(500, 2000, cls.size)
        inter = (union * rng.uniform(0.2, 0.7, cls.size)).astype(int)
        columns = {
            "query": [f"q{s}-{k}" for k in range(cls.size)],
            "class": cls.tolist(),
            "fg_inter": inter.tolist(),
            "fg_union": union.tolist(),
            "bg_inter": (4 * union).tolist(),
            "bg_union": (5 * union).tolist(),
        }
        out.append(columns)
    return out


def with_foreground(episodes, gain, only_class=None):
    """The episodes with gain(union) pixels more foreground intersection (in one class only, or in
    all)."""
    out = []
    for columns in episodes:
        changed = dict(columns)
        rows = zip(columns["class"], columns["fg_inter"], columns["fg_union"], strict=True)
        changed["fg_inter"] = [i + gain(u) if only_class in (None, c) else i for c, i, u in rows]
        out.append(changed)
    return out


def seed_miou(columns):
    """One seed's mIoU in % by hand: per class summed intersection / summed union, averaged."""
    ious = []
    for c in CLASSES:
        picked = [k for k, x in enumerate(columns["class"]) if x == c]
        inter = sum(columns["fg_inter"][k] for k in picked)
        union = sum(columns["fg_union"][k] for k in picked)
        ious.append(100 * inter / union)
    return float(np.mean(ious))


def results_file(path, label, episodes, fold=0, shot=1, **fields):
    """A made-up evaluate.py results file (PASCAL, ResNet-50 deep stem, pfenet geometry) whose
    numbers come from its episodes."""
    per_seed = []
    for s, columns in enumerate(episodes):
        per_seed.append({"seed": 510 + s, "miou": seed_miou(columns), "fb_iou": 75.0})
    r = made_up_result(path, label, shot, fold)
    r["miou"] = float(np.mean([s["miou"] for s in per_seed]))
    r["fb_iou"] = 75.0
    r["class_iou"] = {str(c): 0.0 for c in CLASSES}
    r["per_seed"] = per_seed
    r["per_episode"] = episodes
    r.update(fields)
    path.write_text(json.dumps(r))
    return str(path)


def made_up_result(path, label, shot, fold):
    """The fields every made-up results file shares (PASCAL, ResNet-50 deep stem, pfenet
    geometry), its own path as the run's file (distinct_results tells files apart by it)."""
    return {
        "dataset": "pascal",
        "backbone": "resnet50v2",
        "method": "ASPP-PFENet",
        "pretrained": label,
        "shot": shot,
        "fold": fold,
        "protocol": {"test_geometry": "pfenet"},
        "run": {"file": str(path)},
    }


def training_seeds(tmp_path, name, label, episodes_of, folds=(0,), shot=1, **fields):
    """A row's files: for each fold, three training seeds, episodes_of(k) for seed k."""
    paths = []
    for fold in folds:
        for k in range(3):
            path = tmp_path / f"{name}-f{fold}-s{k}.json"
            paths.append(results_file(path, label, episodes_of(k), fold, shot, **fields))
    return paths


def read(path):
    """A results file's contents."""
    return json.loads(Path(path).read_text())


def load(paths):
    """The contents of results files."""
    return [read(p) for p in paths]


def shift(k):
    """Training seed k of a row that beats made_up_episodes(k) by exactly 10 IoU points in every
    episode's class (10% of each union more foreground), give or take a pixel or two."""
    return with_foreground(made_up_episodes(k), lambda u: round(0.1 * u) + int(u) % 3 - 1)


# ---------- 1. each episode in the results file ----------
def test_two_backbones_files_hold_the_same_episodes(synthetic_root, pretrained, tmp_path):
    """Every backbone meets the same episodes for a seed: two backbones' files list the same
    (seed, query, class) sequence, and each file's episodes give back its mIoU, at --threshold and
    at the base-chosen threshold."""
    import nonparametric_eval

    paths = {}
    for method in ("standard", "bcpt"):
        paths[method] = tmp_path / f"{method}.json"
        argv = np_args(synthetic_root, pretrained[method], paths[method], "--seeds", "510", "511")
        nonparametric_eval.main(argv)
    files = {method: json.loads(path.read_text()) for method, path in paths.items()}

    def sequence(r):
        seeds = [s["seed"] for s in r["per_seed"]]
        episodes = [list(zip(c["query"], c["class"], strict=True)) for c in r["per_episode"]]
        return list(zip(seeds, episodes, strict=True))

    assert sequence(files["standard"]) == sequence(files["bcpt"])
    assert [len(e) for _, e in sequence(files["bcpt"])] == [5, 5]
    for r in files.values():
        assert list(r)[-1] == "per_episode_base_threshold"  # the long lists last
        # lists of numbers, not dicts
        assert set(r["per_episode"][0]) == set(evaluation.EPISODE_COLUMNS)
        assert all(type(x) is int for x in r["per_episode"][0]["fg_union"])
        for key, miou in (
            ("per_episode", "miou"),
            ("per_episode_base_threshold", "miou_base_threshold"),
        ):
            r_at = {**r, "per_episode": r[key]}
            classes, per_seed = evaluation.stacked_episodes([r_at], "threshold")
            assert classes == list(range(1, 6))
            assert evaluation.observed_mious(classes, per_seed)[0] == pytest.approx(r[miou])
    table = evaluation.format_table([str(p) for p in paths.values()])
    assert "synthetic resnet18 non-parametric prior: BCPT = bcpt K=6 Eq4=sum, Standard = " in table
    assert "  BCPT - Standard, fold 0, 1-shot: " in table
    assert (
        "(paired bootstrap over 5 classes, 5 episodes x 2 evaluation seeds, 1 training seed)"
        in table
    )


def test_evaluate_json_holds_the_episode_log(metatrained, tmp_path):
    """evaluate.py's --json holds, per seed, the numbers of each --episode-log line."""
    import evaluate

    log = tmp_path / "episodes.jsonl"
    path = tmp_path / "r.json"
    argv = ["--checkpoint", metatrained[1], "--episodes", "4", "--seeds", "1", "2"]
    evaluate.main(argv + ["--workers", "0", "--episode-log", str(log), "--json", str(path)])
    r = json.loads(path.read_text())
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    for seed, columns in zip((1, 2), r["per_episode"], strict=True):
        mine = [e for e in lines if e["seed"] == seed]
        assert columns["query"] == [e["query"] for e in mine]
        assert columns["class"] == [e["class"] for e in mine]
        bg_i, fg_i, bg_u, fg_u = zip(*[e["iou"]["ASPP-PFENet"] for e in mine], strict=True)
        assert columns["fg_inter"] == list(fg_i)
        assert columns["fg_union"] == list(fg_u)
        assert columns["bg_inter"] == list(bg_i)
        assert columns["bg_union"] == list(bg_u)


# ---------- 2. is a gap real? ----------
def test_a_known_shift_on_every_episode_gives_an_interval_around_it(tmp_path):
    a = load(training_seeds(tmp_path, "a", "bcpt K=6 Eq4=sum", shift))
    b = load(training_seeds(tmp_path, "b", "standard psp", made_up_episodes))
    gap = evaluation.paired_bootstrap(a, b)
    assert gap["difference"] == pytest.approx(10, abs=0.2)
    assert gap["difference"] == pytest.approx(
        np.mean([r["miou"] for r in a]) - np.mean([r["miou"] for r in b])
    )
    assert 9.5 < gap["low"] <= gap["difference"] <= gap["high"] < 10.5
    assert gap["replicates"].shape == (evaluation.BOOTSTRAP_RESAMPLES,)


def test_identical_rows_give_an_interval_around_zero(tmp_path):
    """Training seeds that differ from each other, the same in both rows: paired, every resample's
    difference is 0."""
    a = load(training_seeds(tmp_path, "a", "bcpt K=6 Eq4=sum", made_up_episodes))
    b = load(training_seeds(tmp_path, "b", "standard psp", made_up_episodes))
    gap = evaluation.paired_bootstrap(a, b)
    assert gap["low"] <= 0 <= gap["high"]
    assert gap["high"] - gap["low"] < 0.1
    assert abs(gap["difference"]) < 1e-9


def test_an_advantage_in_one_class_only_gives_a_wide_interval(tmp_path):
    """50 IoU points more in class 1 only: +10 mIoU over 5 classes, but a resample draws class 1
    0-5 times, so the interval runs from 0 (a third of the resamples miss it) to about +30."""

    def one_class(k):
        return with_foreground(made_up_episodes(k), lambda u: u // 2, only_class=1)

    def everywhere(k):
        return with_foreground(made_up_episodes(k), lambda u: u // 10)

    a = load(training_seeds(tmp_path, "a", "bcpt K=6 Eq4=sum", one_class))
    b = load(training_seeds(tmp_path, "b", "standard psp", made_up_episodes))
    c = load(training_seeds(tmp_path, "c", "bcpt K=6 Eq4=mean", everywhere))
    gap = evaluation.paired_bootstrap(a, b)
    assert gap["difference"] == pytest.approx(10, abs=0.5)
    assert gap["low"] <= 1e-9
    assert gap["high"] > 20
    spread = evaluation.paired_bootstrap(c, b)
    assert spread["difference"] == pytest.approx(10, abs=0.5)
    assert spread["high"] - spread["low"] < (gap["high"] - gap["low"]) / 10


def test_table_prints_each_comparison_with_its_interval(tmp_path):
    """Two folds of three rows: BCPT beats Standard by 10 everywhere, Standard equals ImageNet; a
    line per fold and for the mean over the folds, the same on every call."""
    bcpt = training_seeds(tmp_path, "a", "bcpt K=6 Eq4=sum", shift, folds=(0, 1))
    standard = training_seeds(tmp_path, "b", "standard psp", made_up_episodes, folds=(0, 1))
    imagenet = training_seeds(tmp_path, "i", "imagenet", made_up_episodes)
    peers = results_file(tmp_path / "p.json", "imagenet (resnet50_v2.pth)", made_up_episodes(0))
    paths = [*bcpt, *standard, *imagenet, peers]
    table = evaluation.format_table(paths)
    lines = table.splitlines()
    start = lines.index("Is a gap real? Row A - row B in mIoU, 95% paired bootstrap interval:")
    gaps = lines[start + 1 :]
    assert gaps[0] == (
        "pascal resnet50v2 ASPP-PFENet: BCPT = bcpt K=6 Eq4=sum, Standard = standard psp"
    )
    assert gaps[1].startswith("  BCPT - Standard, fold 0, 1-shot: +10.0")
    interval_note = (
        "(paired bootstrap over 5 classes, 100 episodes x 2 evaluation seeds, 3 training seeds)"
    )
    assert gaps[1].endswith(interval_note + ": excludes 0")
    assert gaps[2].startswith("  BCPT - Standard, fold 1, 1-shot: +10.0")
    assert gaps[3].startswith("  BCPT - Standard, mean of folds 0, 1, 1-shot: +10.0")
    assert gaps[3].endswith("(paired bootstrap within each fold): excludes 0")
    assert "pascal resnet50v2 ASPP-PFENet: BCPT = bcpt K=6 Eq4=sum, ImageNet = imagenet" in gaps
    # one file of the peers' ImageNet, three BCPT training seeds: the seeds drawn for each row
    peers_row = "ImageNet = imagenet (resnet50_v2.pth)"
    at = gaps.index(f"pascal resnet50v2 ASPP-PFENet: BCPT = bcpt K=6 Eq4=sum, {peers_row}")
    assert "3 and 1 training seeds" in gaps[at + 1]
    standard_line = next(g for g in gaps if g.startswith("  Standard - ImageNet, fold 0"))
    assert standard_line.startswith("  Standard - ImageNet, fold 0, 1-shot: +0.00 mIoU")
    assert standard_line.endswith(": includes 0")
    assert not any("fold 1" in g for g in gaps if "ImageNet" in g)  # no fold 1 of ImageNet
    assert evaluation.format_table(paths) == table  # a fixed seed


def test_rows_that_cannot_be_paired_say_why(tmp_path):
    """Other episodes (another data root, seeds or --episodes), a file from before the episodes
    were kept, a non-parametric file at each file's best threshold: the difference, no interval."""
    a = results_file(tmp_path / "a.json", "bcpt K=6 Eq4=sum", made_up_episodes(0))
    other = results_file(tmp_path / "b.json", "standard psp", made_up_episodes(0, per_class=10))
    table = evaluation.format_table([a, other])
    assert "no interval: the files' episodes differ (evaluation seeds, queries or classes)" in table
    old = read(other)
    del old["per_episode"]
    (tmp_path / "b.json").write_text(json.dumps(old))
    table = evaluation.format_table([a, other])
    miou_a = read(a)["miou"]
    assert (
        f"BCPT - Standard, fold 0, 1-shot: {miou_a - old['miou']:+.2f} mIoU; no interval: a "
        in table
    )
    prior = {"method": "non-parametric prior", "sweep": {"0.5": 1.0}, "miou_base_threshold": 1.0}
    npa = results_file(tmp_path / "na.json", "bcpt K=6 Eq4=sum", made_up_episodes(0), **prior)
    npb = results_file(tmp_path / "nb.json", "standard psp", made_up_episodes(1), **prior)
    table = evaluation.format_table([npa, npb], "best-sweep")
    assert "+0.00 mIoU; no interval: --table-metric best-sweep takes each file's own" in table


def test_ablation_and_stand_in_rows_are_compared(tmp_path):
    """Table 3's BMC+OCG - BMC and BMC - Standard, Table 4's K=6 - K=2; on the worlds the stand-in
    and the rows started from it, never a row from the stand-in against one from random weights."""
    files = []
    for label in (
        "bcpt K=6 Eq4=sum",
        "bcpt no-guidance K=6 Eq4=sum",
        "bcpt K=2 Eq4=sum",
        "standard psp",
    ):
        path = tmp_path / f"{label.replace(' ', '_')}.json"
        files.append(results_file(path, label, made_up_episodes(0), shot=5))
    table = evaluation.format_table(files)
    for name in ("BMC+OCG - BMC", "BMC - Standard", "K=6 - K=2", "BCPT - Standard"):
        assert f"  {name}, fold 0, 5-shot: +0.00 mIoU" in table
    assert "K=6 - K=3" not in table
    worlds = []
    for label in (
        "imagenet stand-in",
        "standard linear from stand-in",
        "bcpt K=6 Eq4=sum from stand-in",
        "standard linear",
    ):
        path = tmp_path / f"w-{label.replace(' ', '_')}.json"
        r = read(results_file(path, label, made_up_episodes(0)))
        r.update(dataset="synthetic", backbone="resnet18")
        path.write_text(json.dumps(r))
        worlds.append(str(path))
    table = evaluation.format_table(worlds)
    assert (
        "BCPT = bcpt K=6 Eq4=sum from stand-in, Standard = standard linear from stand-in" in table
    )
    assert "BCPT = bcpt K=6 Eq4=sum from stand-in, ImageNet = imagenet stand-in" in table
    assert "Standard = standard linear from stand-in, ImageNet = imagenet stand-in" in table
    assert "Standard = standard linear," not in table  # random init: no row to compare it with
    assert "Beside the paper" not in table


# ---------- 3. Tables 3 and 4 beside the paper ----------
def four_folds(tmp_path, label, miou, fb_iou, shot=5):
    """A row with one made-up file per fold: mIoU miou + fold, FB-IoU fb_iou + fold."""
    paths = []
    for fold in range(4):
        path = tmp_path / f"{label.replace(' ', '_')}-{shot}-{fold}.json"
        r = made_up_result(path, label, shot, fold)
        r["miou"] = miou + fold
        r["fb_iou"] = fb_iou + fold
        r["per_seed"] = [{"miou": miou + fold - 1}, {"miou": miou + fold + 1}]
        path.write_text(json.dumps(r))
        paths.append(str(path))
    return paths


def test_tables_3_and_4_rows_print_the_papers_5_shot_mean_and_fb_iou(tmp_path):
    bmc = four_folds(tmp_path, "bcpt no-guidance K=6 Eq4=sum", 69.0, 79.0)
    k2 = four_folds(tmp_path, "bcpt K=2 Eq4=sum best-val", 70.0, 80.0)
    k3_one_shot = four_folds(tmp_path, "bcpt K=3 Eq4=sum", 60.0, 70.0, shot=1)  # 5-shot only
    out = evaluation.format_table([*bmc, *k2, *k3_one_shot])
    lines = out.splitlines()
    at = lines.index("Beside the paper (Table 3, pascal resnet50 BMC 5-shot):")
    assert lines[at + 1 : at + 3] == [
        "  mean: ours 70.50, paper 70.15, difference +0.35",
        "  FB-IoU: ours 80.50, paper 80.44, difference +0.06",
    ]
    at = lines.index("Beside the paper (Table 4, pascal resnet50 K=2 5-shot):")
    assert lines[at + 1].startswith(
        "  fold 0: ours 70.00 (evaluation seeds 69.00-71.00), paper 72.89"
    )
    assert lines[at + 5 : at + 7] == [
        "  mean: ours 71.50, paper 70.97, difference +0.53",
        "  FB-IoU: ours 81.50, paper 81.09, difference +0.41",
    ]
    assert "K=3" not in out.split("mIoU in %")[1]


def test_the_bcpt_and_standard_rows_add_tables_3_and_4_without_repeating_table_1(tmp_path):
    bcpt = four_folds(tmp_path, "bcpt K=6 Eq4=sum", 71.0, 80.0)
    standard = four_folds(tmp_path, "standard psp", 68.0, 79.0)
    out = evaluation.format_table([*bcpt, *standard])
    lines = out.splitlines()
    at = lines.index("Beside the paper (Table 1, pascal resnet50 BCPT 5-shot):")
    assert lines[at + 1].startswith(
        "  fold 0: ours 71.00 (evaluation seeds 70.00-72.00), paper 73.20"
    )
    assert lines[at + 5] == "  mean: ours 72.50, paper 71.21, difference +1.29"
    assert lines[at + 6 : at + 9] == [
        "Beside the paper (Table 3, pascal resnet50 BMC+OCG 5-shot):",
        "  FB-IoU: ours 81.50, paper 81.16, difference +0.34",
        "  (the other lines as printed above)",
    ]
    assert lines[at + 9 : at + 11] == [
        "Beside the paper (Table 4, pascal resnet50 K=6 5-shot):",
        "  the paper's numbers and ours as printed above",
    ]
    at = lines.index("Beside the paper (Table 3, pascal resnet50 Standard 5-shot):")
    assert lines[at + 1] == "  FB-IoU: ours 80.50, paper 79.55, difference +0.95"


def test_table_3_with_folds_missing_prints_the_papers_numbers(tmp_path):
    bmc = four_folds(tmp_path, "bcpt no-guidance K=6 Eq4=sum", 69.0, 79.0)
    out = evaluation.format_table(bmc[:2])
    assert (
        "Beside the paper (Table 3, pascal resnet50 BMC 5-shot):\n"
        "  mean: paper 70.15, FB-IoU 80.44, over folds 0-3; ours has fold 0, 1 only"
    ) in out


def test_paper_names_of_each_label():
    names = evaluation.paper_names
    assert names("bcpt no-guidance K=6 Eq4=sum Eq3=base best-val") == {"paper-table3": "BMC"}
    assert names("bcpt K=3 Eq4=mean") == {"paper-table4": "K=3"}
    assert names("bcpt K=6 Eq4=sum")["paper-table4"] == "K=6"
    assert names("bcpt no-guidance K=2 Eq4=sum") == {}
    assert names("bcpt K=6 alpha=0.2 Eq4=sum") == {}
    assert names("bcpt K=6 Eq4=sum drop-novel") == {}
    assert names("bcpt K=6 Eq4=sum from stand-in") == {}
    assert names("imagenet stand-in") == {}
    assert names("imagenet (vgg16_bn.pth)")["paper-table1"] == "ImageNet"
    assert names("standard psp")["paper-table3"] == "Standard"


# ---------- 4. the peers' ImageNet files are the ImageNet row ----------
def test_a_peers_imagenet_file_is_labelled_by_its_keys(resnet50_v2_file, tmp_path):
    path, _ = resnet50_v2_file
    assert evaluation.pretrain_label(path) == "imagenet (resnet50_v2.pth)"
    renamed = tmp_path / "mine.pth"
    shutil.copy(path, renamed)
    assert evaluation.pretrain_label(str(renamed)) == "imagenet (mine.pth)"
    layouts = {
        "vgg16_bn.pth": (
            {"features.0.weight": torch.zeros(64, 3, 3, 3)},
            "imagenet (vgg16_bn.pth)",
        ),
        "tv.pth": (
            {"conv1.weight": torch.zeros(64, 3, 7, 7), "layer1.0.conv3.weight": torch.zeros(1)},
            "imagenet (tv.pth)",
        ),
        "r18.pth": (
            {"conv1.weight": torch.zeros(64, 3, 7, 7)},
            "r18.pth",
        ),  # not a kit ImageNet file
        "split.pth": ({"layer0.0.weight": torch.zeros(64, 3, 3, 3)}, "split.pth"),
        "other.pth": ({"w": torch.zeros(1)}, "other.pth"),
    }
    for name, (state, want) in layouts.items():
        torch.save(state, tmp_path / name)
        assert evaluation.pretrain_label(str(tmp_path / name)) == want


def test_a_resnet50_v2_row_stands_beside_the_papers_imagenet_row(resnet50_v2_file, tmp_path):
    label = evaluation.pretrain_label(resnet50_v2_file[0])
    path = results_file(tmp_path / "r.json", label, made_up_episodes(0))
    out = evaluation.format_table([path])
    assert "Beside the paper (Table 1, pascal resnet50 ImageNet 1-shot):" in out
    assert ", paper 64.42, difference " in out
    stand_in = results_file(tmp_path / "s.json", "imagenet stand-in", made_up_episodes(0))
    assert "Beside the paper" not in evaluation.format_table([stand_in])
