"""Tests of reproduce.py, the one command per paper table: the grid it plans for each table, a tiny
grid run end to end, skipped when done and resumed where a run is missing, and a failure reported
while the rest go on."""

import json
import os
import re
from types import SimpleNamespace

import pytest

import prepare_data
import reproduce
from common import KitError

TINY = [
    "--dataset",
    "synthetic",
    "--rows",
    "standard",
    "bcpt",
    "--weights",
    "none",
    "--pretrain-flags",
    "--max-iters 2 --batch 2 --workers 0",
    "--metatrain-flags",
    "--max-iters 2 --batch 2 --workers 0 --min-pixels 64 --crop 41",
    "--episodes",
    "2",
    "--eval-seeds",
    "510",
]


def started(output):
    """The runs a reproduce.py call started, in order."""
    return re.findall(r"^start (\S+)", output, re.M)


def test_dry_run_plans_table_1_on_a_pascal_root(voc, sbd, tmp_path, capsys):
    """Table 1 on PASCAL, folds 0-3, 1- and 5-shot: Standard and BCPT pre-trained once per fold,
    each of the three rows meta-trained per shot and evaluated; the ImageNet row from --weights;
    the commands printed; nothing run or written."""
    root = str(tmp_path / "pascal")
    prepare_data.prepare_pascal(str(voc), str(sbd), root)
    runs = str(tmp_path / "runs")
    argv = ["--table", "1", "--dataset", "pascal", "--data-root", root, "--folds", "0", "1", "2"]
    argv += ["3", "--shots", "1", "5", "--backbone", "resnet50v2", "--weights", "rn50.pth"]
    plan = reproduce.main([*argv, "--runs", runs, "--dry-run", "--no-estimate"])
    names = list(plan.runs)
    assert len([n for n in names if n.startswith("pretrain/")]) == 2 * 4
    assert len([n for n in names if n.startswith("meta/")]) == 3 * 4 * 2
    assert len([n for n in names if n.startswith("eval/")]) == 3 * 4 * 2
    assert len(names) == 8 + 24 + 24
    assert all(run.state == "to do" for run in plan.runs.values())
    out = capsys.readouterr().out
    assert "to do: 56 of 56 runs" in out
    bcpt_f2 = plan.runs["pretrain/bcpt-f2-s321"]
    assert "--weights rn50.pth" in bcpt_f2.shown()
    assert bcpt_f2.shown() in out
    imagenet_meta = plan.runs["meta/imagenet-f3-5shot-s321"]
    assert "--pretrained rn50.pth" in imagenet_meta.shown()
    assert "--shot 5" in imagenet_meta.shown()
    assert not os.path.exists(runs)


def test_tables_share_their_pretrainings(tmp_path):
    """Tables 1-4 together: BCPT and Standard are pre-trained once per fold and seed and serve
    every table; Table 2 tests the backbones without meta-training; Tables 3 and 4 are 5-shot;
    a synthetic world's ImageNet row is its stand-in, trained once and tested once per fold."""
    argv = ["--table", "1", "2", "3", "4", "--seeds", "0", "1", "--runs", str(tmp_path)]
    argv += ["--data-root", "data/fresh"]
    plan = reproduce.main([*argv, "--dry-run", "--no-estimate"])
    pretrain = sorted(n for n in plan.runs if n.startswith("pretrain/"))
    rows = ["bcpt", "bmc", "k2", "k3", "standard"]
    assert pretrain == [f"pretrain/{r}-f0-s{s}" for r in rows for s in (0, 1)]
    assert [n for n in plan.runs if n == "standin"] == ["standin"]
    assert "--data-root" not in plan.runs["standin"].argv  # its own root, not the benchmark's
    assert "--data-root data/fresh" in plan.runs["pretrain/bcpt-f0-s0"].shown()
    assert sorted(n for n in plan.runs if n.startswith("np/")) == [
        "np/bcpt-f0-s0",
        "np/bcpt-f0-s1",
        "np/imagenet-f0",
        "np/standard-f0-s0",
        "np/standard-f0-s1",
    ]
    five_shot = {n.split("/")[1].split("-")[0] for n in plan.runs if "5shot" in n}
    assert five_shot == {"standard", "bmc", "bcpt", "k2", "k3"}
    assert len(plan.tables[3]) == len(plan.tables[4]) == 3 * 2  # three rows, two seeds
    k2 = plan.runs["pretrain/k2-f0-s1"].argv
    assert k2[k2.index("--K") + 1] == "2"
    assert k2[k2.index("--weights") + 1] == os.path.join(str(tmp_path), "standin", "last.pt")


def test_a_tiny_grid_runs_then_skips_then_redoes_only_what_is_missing(
    synthetic_root, tmp_path, capsys
):
    """Two rows, one fold, a few iterations: every run, then again with every run skipped, then
    after one meta-training's checkpoint is deleted only that run and the evaluation of its
    model; the tables end beside each other."""
    argv = ["--table", "1", *TINY, "--data-root", synthetic_root, "--runs", str(tmp_path / "r")]
    reproduce.main(argv + ["--jobs", "2"])
    out = capsys.readouterr().out
    assert sorted(started(out)) == sorted(
        f"{stage}/{row}-f0{shot}-s321"
        for row in ("standard", "bcpt")
        for stage, shot in (("pretrain", ""), ("meta", "-1shot"), ("eval", "-1shot"))
    )
    assert re.search(r"to do: 6 of 6 runs, about 0 h \d\d min on this machine with --jobs 2", out)
    assert "== Table 1 (2 of 2 results) ==" in out
    assert "| synthetic | resnet18 | ASPP-PFENet | bcpt K=6 Eq4=sum |" in out
    plan = reproduce.main(argv + ["--no-estimate"])
    out = capsys.readouterr().out
    assert started(out) == []
    assert all(run.state == "done" for run in plan.runs.values())
    assert "to do: 0 of 6 runs" in out
    os.remove(tmp_path / "r" / "meta" / "bcpt-f0-1shot-s321" / "last.pt")
    reproduce.main(argv + ["--no-estimate"])
    assert started(capsys.readouterr().out) == [
        "meta/bcpt-f0-1shot-s321",
        "eval/bcpt-f0-1shot-s321",
    ]


def test_a_failed_run_is_reported_and_the_rest_go_on(synthetic_root, tmp_path, capsys):
    """A meta-training that fails (a batch larger than its queries) is reported with its last
    line; its evaluation is blocked; the pre-trainings finish; the command ends with one line."""
    argv = ["--table", "1", *TINY, "--data-root", synthetic_root, "--runs", str(tmp_path / "r")]
    argv += ["--rows", "bcpt", "--metatrain-flags", "--batch 100000 --workers 0", "--no-estimate"]
    with pytest.raises(KitError, match="2 runs did not finish"):
        reproduce.main(argv)
    out = capsys.readouterr().out
    assert "done pretrain/bcpt-f0-s321" in out
    assert "FAILED meta/bcpt-f0-1shot-s321: error: --batch 100000 is larger than" in out
    assert "blocked eval/bcpt-f0-1shot-s321" in out


def test_the_centres_line_on_a_made_up_run(tmp_path, capsys):
    """print_centres on a run folder written by hand: two live centres holding 60% and 40% of the
    merged background, 50% and 0% of them novel objects: 30% of the merged background is novel."""
    out = tmp_path / "pretrain" / "bcpt-f0-s0"
    out.mkdir(parents=True)
    centres = [[0.6, 0.5, 0.5], [0.4, 0.0, 1.0], [0.0, 0.0, 0.0]]
    held = {"novel_as_background": 0.25, "centres": centres, "dead_over_run": 1}
    (out / "centres.json").write_text(json.dumps(held))
    (out / "log.jsonl").write_text(json.dumps({"step": 10, "dead_centres": 2}) + "\n")
    run = reproduce.Run("pretrain/bcpt-f0-s0", "pretrain_bcpt.py", [], str(out), [])
    reproduce.print_centres(SimpleNamespace(runs={run.name: run}))
    line = capsys.readouterr().out.splitlines()[-1]
    assert line == (
        "pretrain/bcpt-f0-s0          novel pixels called background  25.0%; 2 of 3 centres "
        "hold >= 1% (novel: 50% 0%; merged background 30%); dead: 2 in the last window, 1 over "
        "the run"
    )


def test_a_damaged_checkpoint_in_a_run_folder_is_named(tmp_path):
    """A run folder whose last.pt is not a checkpoint: the plan stops with one line naming it."""
    out = tmp_path / "pretrain" / "bcpt-f0-s0"
    out.mkdir(parents=True)
    (out / "last.pt").write_bytes(b"half a checkpoint")
    run = reproduce.Run("pretrain/bcpt-f0-s0", "pretrain_bcpt.py", [], str(out), [])
    with pytest.raises(KitError, match=r"last.pt is truncated or not a checkpoint"):
        reproduce.state_of(run)
