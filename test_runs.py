"""Tests of how the kit runs (plumbing.py): flags, run folders and locks, exact resume, precision,
several processes under torchrun, and bad input stopped with one line before any work. The sections
follow plumbing.py's."""

import glob
import importlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import common
import plumbing
import prepare_data
import worlds
from common import KitError
from conftest import (
    HERE,
    assert_scores_add_up,
    blocks,
    checkpoints_equal,
    cuda_test,
    flags_to_argv,
    make_root,
    meta_args,
    np_args,
    pretrain_args,
    torchrun,
    tree_bytes,
    write_voc,
)


def log_records(path):
    """The JSON records of a run's log.jsonl, one per line."""
    with open(path) as f:
        return [json.loads(line) for line in f]


# ---------- plumbing.py 1. Flags (defaults per dataset), paths, the data a stage opens ----------
@pytest.mark.parametrize(
    "dataset,expect",
    [
        (
            None,
            [
                "--mu MU momentum mu of Eqs. 1 and 7 (paper Sec. 2.1) (default 0.99 for "
                "--dataset synthetic; pascal 0.999",
                "--crop CROP training crop side (PROTOCOL.md 4.2) (default 64 for --dataset "
                "synthetic",
            ],
        ),
        (
            "pascal",
            [
                "(default 0.999 for --dataset pascal; coco 0.999; synthetic 0.99)",
                "--crop CROP training crop side (PROTOCOL.md 4.2) (default 417 for --dataset "
                "pascal",
                "resnet18 for CPU runs (default resnet50 for --dataset pascal",
                "--train-pool {aug,oslsm}",
                "(default oslsm for --dataset pascal; coco aug; synthetic aug)",
                "--head {psp,linear}",
                "(default psp for --dataset pascal",
            ],
        ),
    ],
)
def test_help_prints_the_defaults_of_the_chosen_dataset(dataset, expect, capsys):
    import pretrain_bcpt

    argv = ["--help"]
    if dataset:
        argv = ["--dataset", dataset, "--help"]
    with pytest.raises(SystemExit) as e:
        pretrain_bcpt.main(argv)
    text = " ".join(capsys.readouterr().out.split())
    assert e.value.code == 0
    assert all(x in text for x in expect)
    assert "None" not in text


@pytest.mark.parametrize("script", ["pretrain_bcpt", "metatrain", "evaluate", "nonparametric_eval"])
def test_every_flag_is_read(script):
    """No dead flags: each parsed flag is read as args.<name> in the script or a module of the
    kit."""
    mod = importlib.import_module(script)
    kit = [
        name
        for name in glob.glob(os.path.join(HERE, "*.py"))
        if "test" not in os.path.basename(name)
    ]
    sources = "".join(Path(name).read_text() for name in kit)
    argv = []
    if script == "evaluate":
        argv = ["--checkpoint", "x.pt"]
    dests = vars(mod.parse_args(argv))
    unread = [d for d in dests if not re.search(rf"args\.{d}\b", sources)]
    assert len(dests) > 10
    assert not unread


def test_real_data_defaults_pool_and_lr(tmp_path):
    import pretrain_bcpt

    a = pretrain_bcpt.parse_args(
        ["--dataset", "pascal", "--data-root", str(tmp_path), "--method", "standard"]
    )
    assert a.train_pool == "oslsm"
    assert a.head == "psp"
    assert a.backbone_lr_mult == 1.0
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
    assert c.train_pool == "aug"
    assert [g["lr"] for g in opt.param_groups] == [2.5e-3, 2.5e-3]  # BAM's COCO base
    root = make_root(tmp_path)
    with pytest.raises(
        KitError,
        match="--train-pool oslsm .*needs .*train.txt.*--train-noval train_noval.txt.*"
        "--train-pool aug",
    ):
        common.image_pools(root, "oslsm")


def work_started(*args, **kwargs):
    pytest.fail("work started before the flags and paths were checked")


@pytest.mark.parametrize(
    "script,flag,value,rule",
    [
        ("pretrain_bcpt", "--mu", "1.5", "in [0.0, 1.0]"),
        ("pretrain_bcpt", "--alpha", "-1", ">= 0.0"),
        ("pretrain_bcpt", "--lr", "0", "> 0.0"),
        ("pretrain_bcpt", "--K", "1", ">= 2"),
        ("pretrain_bcpt", "--batch", "0", ">= 1"),
        ("pretrain_bcpt", "--epochs", "0", ">= 1"),
        ("pretrain_bcpt", "--max-iters", "0", ">= 1"),
        ("pretrain_bcpt", "--workers", "-1", ">= 0"),
        ("pretrain_bcpt", "--crop", "8", ">= 16"),
        ("metatrain", "--shot", "0", ">= 1"),
        ("metatrain", "--lr", "-0.1", "> 0.0"),
        ("evaluate", "--episodes", "0", ">= 1"),
        ("nonparametric_eval", "--episodes", "0", ">= 1"),
        ("nonparametric_eval", "--shot", "0", ">= 1"),
        ("nonparametric_eval", "--threshold", "1.2", "in [0.0, 1.0]"),
        ("nonparametric_eval", "--min-pixels", "0", ">= 1"),
    ],
)
def test_flags_checked_before_any_work(script, flag, value, rule, tmp_path, monkeypatch):
    mod = importlib.import_module(script)
    monkeypatch.setattr(mod, "open_data", work_started)
    with pytest.raises(KitError) as e:
        mod.main([flag, value, "--data-root", str(tmp_path / "never")])
    assert str(e.value) == f"argument {flag}: value {value} is not allowed: it must be {rule}"


@pytest.mark.parametrize(
    "script,flag,value",
    [
        ("pretrain_bcpt", "--lr", "nan"),
        ("pretrain_bcpt", "--alpha", "inf"),
        ("pretrain_bcpt", "--mu", "nan"),
        ("metatrain", "--scale", "nan"),
        ("nonparametric_eval", "--threshold", "nan"),
    ],
)
def test_non_finite_numbers_are_refused(script, flag, value, tmp_path):
    words = [flag, value]
    if flag == "--scale":  # a range: two numbers
        words.append("1")
    with pytest.raises(KitError, match=f"argument {flag}: value {value} is not a finite number"):
        importlib.import_module(script).main([*words, "--data-root", str(tmp_path)])


def test_every_stage_refuses_a_prepared_root_as_synthetic(voc, sbd, metatrained, tmp_path):
    import evaluate
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt

    # exactly what prepare_data.py pascal writes, marker included
    prepared = str(tmp_path / "mydata")
    prepare_data.prepare_pascal(voc, sbd, prepared)
    hand = write_voc(
        tmp_path / "handmade", {"a": blocks([1, 2, 0, 0]), "b": blocks([3, 0, 0, 0])}, val=["b"]
    )
    for root, hint in (
        (prepared, "pascal root made by this kit: did you mean --dataset pascal"),
        (
            hand,
            "looks like a prepared VOC/COCO root: did you mean --dataset pascal or --dataset coco",
        ),
    ):
        before = tree_bytes(root)
        refusal = f"{root} is not empty and was not made by this kit.*{hint}"
        stages = [
            (
                pretrain_bcpt.main,
                ["--data-root", root, "--max-iters", "1", "--out", str(tmp_path / "p")],
            ),
            (
                metatrain.main,
                ["--data-root", root, "--max-iters", "1", "--out", str(tmp_path / "m")],
            ),
            (nonparametric_eval.main, ["--data-root", root, "--episodes", "1", "--seeds", "1"]),
            (
                evaluate.main,
                ["--checkpoint", metatrained[1], "--data-root", root, "--episodes", "1"],
            ),
        ]
        for main, argv in stages:
            with pytest.raises(KitError, match=refusal):
                main(argv)
        with pytest.raises(KitError, match=refusal):
            worlds.make_synthetic(root, 5, 2, 32, flag="--out")
        assert tree_bytes(root) == before  # not one byte changed, nothing added (no cache, no lock)
    cli = subprocess.run(
        [sys.executable, os.path.join(HERE, "prepare_data.py"), "synthetic", "--out", prepared],
        capture_output=True,
        text=True,
    )
    assert cli.returncode == 2
    assert cli.stderr.count("\n") == 1
    assert "--out " + prepared in cli.stderr


def test_output_and_input_paths_checked_before_the_work(
    synthetic_root, pretrained, metatrained, tmp_path, monkeypatch
):
    import evaluate
    import nonparametric_eval

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    monkeypatch.setattr(common, "EpisodeDataset", work_started)
    ev = ["--checkpoint", metatrained[1], "--episodes", "2"]
    for argv, message in (
        (ev + ["--json", str(blocker / "r.json")], f"--json {blocker}/r.json cannot be written"),
        (ev + ["--episode-log", str(blocker / "e")], "--episode-log .* cannot be written"),
        (ev + ["--vis", str(blocker)], f"--vis {blocker} is a file: pass the folder to write"),
        (ev + ["--json", str(tmp_path)], f"--json {tmp_path} is a folder: pass the file to write"),
        (["--table", str(tmp_path / "missing.json")], "--table .*missing.json: cannot read it"),
        (["--table", str(blocker)], f"--table {blocker}: cannot read it as JSON"),
        (["--curves", str(tmp_path / "no.jsonl")], "--curves .*no.jsonl: no such readable file"),
    ):
        with pytest.raises(KitError, match=message):
            evaluate.main(argv)
    with pytest.raises(KitError, match="--json .* cannot be written"):
        nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], blocker / "n.json"))


def _copy_checkpoint(src, folder):
    """A run folder of our own holding a copy of a checkpoint (tests must never touch the
    session's)."""
    os.makedirs(folder, exist_ok=True)
    dst = os.path.join(folder, "last.pt")
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())
    return dst


def test_outputs_never_replace_a_file_the_kit_did_not_write(synthetic_root, pretrained, tmp_path):
    """--json and --episode-log are checked before the work: a checkpoint, a run folder's file, a
    user's file or a results file of the other test is never replaced, and two outputs never share
    a path; an earlier results file of the same test is replaced."""
    import nonparametric_eval

    run = tmp_path / "run"
    checkpoint = _copy_checkpoint(pretrained["bcpt"], run)
    with open(run / "args.json", "w") as f:
        json.dump({"stage": "pretrain"}, f)
    user = tmp_path / "notes.json"
    user.write_text('{"mine": 1}')
    other_kind = tmp_path / "evaluate.json"
    other_kind.write_text(json.dumps({"method": "ASPP-PFENet", "run": {}, "miou": 1.0}))
    before = tree_bytes(tmp_path)
    cases = [
        (["--json", checkpoint], "is a file of the run in"),
        (["--json", str(tmp_path / "x.json"), "--episode-log", checkpoint], "is a file of the run"),
        (["--json", str(user)], "is not results of non-parametric prior written by this kit"),
        (["--json", str(other_kind)], "is not results of non-parametric prior"),
        (["--json", str(tmp_path / "a.json"), "--episode-log", str(tmp_path / "a.json")], "too"),
    ]
    for extra, message in cases:
        argv = np_args(synthetic_root, pretrained["bcpt"], tmp_path / "unused.json")[:-2] + extra
        with pytest.raises(KitError, match=re.escape(message)):
            nonparametric_eval.main(argv)
    assert tree_bytes(tmp_path) == before  # nothing touched
    results = tmp_path / "np.json"
    nonparametric_eval.main(np_args(synthetic_root, pretrained["bcpt"], results))
    first = json.loads(results.read_text())
    nonparametric_eval.main(
        np_args(synthetic_root, pretrained["bcpt"], results)
    )  # its own: replaced
    assert json.loads(results.read_text())["miou"] == first["miou"]


def test_pictures_and_curves_replace_only_their_own_kind(metatrained, synthetic_root, tmp_path):
    """--vis refuses a folder holding files evaluate.py --vis did not write; --curves replaces only
    a picture it drew before (marked in the PNG), never a user's picture."""
    import evaluate

    user_folder = tmp_path / "photos"
    user_folder.mkdir()
    (user_folder / "holiday.png").write_bytes(b"not ours")
    with pytest.raises(KitError, match="holiday.png, which evaluate.py --vis did not write"):
        evaluate.main(
            ["--checkpoint", metatrained[1], "--vis", str(user_folder), "--episodes", "2"]
        )
    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    picture = tmp_path / "curves.png"
    cv2.imwrite(str(picture), np.zeros((4, 4, 3), np.uint8))  # a user's picture
    before = picture.read_bytes()
    with pytest.raises(KitError, match="is not curves written by this kit"):
        evaluate.main(["--curves", str(log), "--out", str(picture)])
    assert picture.read_bytes() == before
    drawn = tmp_path / "drawn.png"
    evaluate.main(["--curves", str(log), "--out", str(drawn)])
    evaluate.main(["--curves", str(log), "--out", str(drawn)])  # the kit's own: replaced


def test_inputs_that_contradict_each_other_are_refused(
    synthetic_root, pretrained, voc, sbd, tmp_path
):
    """A root whose marker names another dataset, a seed given twice or below 0, a scale range
    given high first, a name longer than the file system allows: one line each, nothing written."""
    import nonparametric_eval
    import pretrain_bcpt

    pascal_root = str(tmp_path / "pascal")
    prepare_data.prepare_pascal(str(voc), str(sbd), pascal_root)
    synthetic_as_pascal = ["--dataset", "pascal", "--data-root", synthetic_root]
    cases = [
        (
            nonparametric_eval,
            [
                *np_args(synthetic_root, "none", tmp_path / "a.json")[2:],
                *synthetic_as_pascal,
                "--backbone",
                "resnet18",
            ],
            "holds synthetic data (its marker says so), not pascal",
        ),
        (
            nonparametric_eval,
            [*np_args(pascal_root, "none", tmp_path / "b.json"), "--dataset", "synthetic"],
            "holds a pascal root",
        ),
        (
            nonparametric_eval,
            [*np_args(synthetic_root, "none", tmp_path / "c.json"), "--seeds", "510", "510"],
            "510 is given twice",
        ),
        (
            nonparametric_eval,
            [*np_args(synthetic_root, "none", tmp_path / "d.json"), "--seeds", "-1"],
            "--seeds: value -1 is not allowed",
        ),
        (
            pretrain_bcpt,
            [*pretrain_args(synthetic_root, tmp_path / "e"), "--scale", "1.5", "0.75"],
            "--scale 1.5 0.75: give the range low first",
        ),
        (
            pretrain_bcpt,
            [*pretrain_args(synthetic_root, tmp_path / ("f" * 300))],
            "longer than this file system allows",
        ),
    ]
    for stage, argv, message in cases:
        with pytest.raises(KitError, match=re.escape(message)):
            stage.main(argv)
    assert sorted(os.listdir(tmp_path)) == ["VOCdevkit", "benchmark_RELEASE", "pascal"]


def test_a_few_settings_are_refused_or_warned_before_training(synthetic_root, tmp_path, capsys):
    """--batch 1 with BAM's PSP head (BatchNorm over one value per channel) is refused before any
    work; a K that asks Eq. 5 for more guidance vectors than there are base classes warns."""
    import pretrain_bcpt

    argv = pretrain_args(synthetic_root, tmp_path / "psp", "--method", "standard", "--head", "psp")
    with pytest.raises(KitError, match="needs at least 2 crops per process"):
        pretrain_bcpt.main(argv + ["--batch", "1"])
    assert not os.path.exists(tmp_path / "psp")
    args = pretrain_bcpt.parse_args(pretrain_args(synthetic_root, tmp_path / "k", "--K", "40"))
    assert args.K == 40
    assert "asks Eq. 5 for 39 guidance vectors from 15 base classes" in capsys.readouterr().out


# ---------- plumbing.py 2. Several processes (torchrun): one per device, rank 0 writes ----------
@pytest.mark.parametrize("script", ["pretrain_bcpt", "metatrain", "evaluate", "nonparametric_eval"])
def test_device_cuda_without_a_gpu_is_refused_before_any_write(
    script, metatrained, tmp_path, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    argv = ["--out", str(tmp_path / "o")]
    if script == "evaluate":
        argv = ["--checkpoint", metatrained[1]]
    with pytest.raises(
        KitError, match="--device cuda: this machine has 0 CUDA device.*pass --device cpu"
    ):
        importlib.import_module(script).main(argv + ["--device", "cuda"])
    assert not (tmp_path / "o").exists()


def test_device_flag_contradicting_torchrun_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(
        KitError, match="--device cuda:1: under torchrun each process takes cuda:LOCAL_RANK"
    ):
        plumbing.setup_device("cuda:1")


def test_stream_batches_shard_each_global_batch():
    one = sum(plumbing.stream_batches(10, 4, 3, 1, 6), [])
    ranks = [sum(plumbing.stream_batches(10, 4, 3, 1, 6, r, 2), []) for r in (0, 1)]
    for t in range(5):  # global batch t: rank 0 has its first half, rank 1 its second
        assert one[4 * t : 4 * t + 4] == ranks[0][2 * t : 2 * t + 2] + ranks[1][2 * t : 2 * t + 2]


def test_eq1_synchronised_over_two_ranks_equals_the_union(tmp_path):
    script = tmp_path / "eq1.py"
    script.write_text(f"""import sys

import torch
import torch.distributed as dist

sys.path.insert(0, {HERE!r})
import common
import plumbing

dist.init_process_group("gloo")
r = dist.get_rank()
g = torch.Generator().manual_seed(0)
P = torch.nn.functional.normalize(torch.randn(8, 3, generator=g), dim=0)
pixels = torch.randn(8, 50, generator=g)
# different pixels, and different counts, per rank
mine = pixels[:, :20] if r == 0 else pixels[:, 20:]
P_hat, counts = common.cluster_sums(mine, common.cluster_assign(P, mine), 3)
P_hat = plumbing.all_reduce_sum(P_hat)
counts = plumbing.all_reduce_sum(counts)
synced = common.momentum_update(P, P_hat, counts, 0.9)
every_pixel = common.cluster_sums(pixels, common.cluster_assign(P, pixels), 3)
union = common.momentum_update(P, *every_pixel, 0.9)
if r == 0:
    same = torch.allclose(synced, union, atol=1e-6) and not torch.equal(synced, P)
    print("EQUAL" if same else "DIFFERENT")
dist.destroy_process_group()
""")
    r = torchrun(str(script))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "EQUAL" in r.stdout, r.stderr[-2000:]


def test_torchrun_evaluation_gives_the_one_process_json(
    metatrained, synthetic_root, pretrained, tmp_path
):
    import evaluate
    import nonparametric_eval

    ev = ["--checkpoint", metatrained[1], "--episodes", "7", "--seeds", "1", "2", "--workers", "0"]
    npa = np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n1.json")
    evaluate.main(ev + ["--json", str(tmp_path / "e1.json")])
    nonparametric_eval.main(npa)
    for script, argv, name in (
        ("evaluate.py", ev + ["--json", str(tmp_path / "e2.json")], "e"),
        ("nonparametric_eval.py", npa[:-1] + [str(tmp_path / "n2.json")], "n"),
    ):
        r = torchrun(script, *argv)
        assert r.returncode == 0, r.stderr[-2000:]
        one = json.loads((tmp_path / f"{name}1.json").read_text())
        two = json.loads((tmp_path / f"{name}2.json").read_text())
        assert two.pop("run")["world_size"] == 2
        assert one.pop("run")["world_size"] == 1
        assert one == two  # the same episodes, sharded over the ranks, counts summed exactly


def test_torchrun_training_both_methods_resume_and_one_checkpoint(synthetic_root, tmp_path):
    for method in ("standard", "bcpt"):
        out = tmp_path / method
        for iters in ("2", "3"):
            r = torchrun(
                "pretrain_bcpt.py",
                *pretrain_args(
                    synthetic_root, out, "--method", method, "--max-iters", iters, "--resume"
                ),
            )
            assert r.returncode == 0, r.stderr[-2000:]
        assert ("centres bit-identical on the 2 processes" in r.stdout) == (method == "bcpt")
        assert "resumed from" in r.stdout
        files = [".lock", "args.json", "centres.json", "last.pt", "log.jsonl"]
        assert sorted(os.listdir(out)) == files
        ckpt = common.load_checkpoint(str(out / "last.pt"))
        assert ckpt["iter"] == 3
        assert len(ckpt["rng_ranks"]) == 2
        assert json.loads((out / "args.json").read_text())["run"]["world_size"] == 2
        assert [record["step"] for record in log_records(out / "log.jsonl")] == [1, 2, 3]
    r = torchrun(
        "metatrain.py",
        *meta_args(
            synthetic_root,
            tmp_path / "m",
            str(tmp_path / "bcpt" / "last.pt"),
            1,
            "--max-iters",
            "2",
            "--batch",
            "4",
        ),
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert common.load_checkpoint(str(tmp_path / "m" / "last.pt"))["iter"] == 2, r.stderr[-2000:]
    r = torchrun(
        "metatrain.py", *meta_args(synthetic_root, tmp_path / "m3", "none", 1, "--batch", "3")
    )
    assert r.returncode != 0
    assert "--batch 3 is the global batch: it must split evenly over the 2 processes" in r.stderr


# ---------- plumbing.py 3. Precision: autocast in a dtype, sensitive steps in float32 ----------
# (the CUDA tests run with python -m pytest -m cuda on a GPU machine)
def test_precision_auto_is_bf16_where_the_gpu_has_it_else_fp32(monkeypatch):
    cuda = torch.device("cuda")
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert plumbing.precision_of("auto", cuda) == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert plumbing.precision_of("auto", cuda) == "fp32"
    assert plumbing.precision_of("auto", cpu) == "fp32"
    assert plumbing.precision_of("fp16", cuda) == "fp16"
    with pytest.raises(KitError, match="--precision fp16 needs a CUDA device"):
        plumbing.precision_of("fp16", cpu)


def test_fp16_needs_cuda(synthetic_root, tmp_path):
    import pretrain_bcpt

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device: fp16 is allowed")
    with pytest.raises(
        KitError, match="--precision fp16 needs a CUDA device: use --precision bf16"
    ):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "f", "--precision", "fp16"))


def test_bf16_every_stage_finite_and_recorded(synthetic_root, tmp_path):
    import evaluate
    import metatrain
    import nonparametric_eval
    import pretrain_bcpt

    bf16 = ["--precision", "bf16", "--max-iters", "2", "--batch", "2", "--crop", "33"]
    for method in ("standard", "bcpt"):
        pretrain_bcpt.main(
            pretrain_args(synthetic_root, tmp_path / method, "--method", method, *bf16)
        )
        ckpt = common.load_checkpoint(str(tmp_path / method / "last.pt"))
        assert ckpt["args"]["precision"] == "bf16"
        assert ckpt["iter"] == 2
        floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
        assert all(v.dtype == torch.float32 for v in floats)
        losses = [record["loss"] for record in log_records(tmp_path / method / "log.jsonl")]
        assert len(losses) == 2
        assert all(np.isfinite(losses))
    metatrain.main(
        meta_args(synthetic_root, tmp_path / "m", str(tmp_path / "bcpt" / "last.pt"), 1, *bf16)
    )
    evaluate.main(
        [
            "--checkpoint",
            str(tmp_path / "m" / "last.pt"),
            "--episodes",
            "2",
            "--seeds",
            "1",
            "--workers",
            "0",
            "--precision",
            "bf16",
            "--json",
            str(tmp_path / "e.json"),
        ]
    )
    nonparametric_eval.main(
        np_args(
            synthetic_root,
            str(tmp_path / "bcpt" / "last.pt"),
            tmp_path / "n.json",
            "--precision",
            "bf16",
            "--episodes",
            "2",
        )
    )
    for name in ("e.json", "n.json"):
        r = json.loads((tmp_path / name).read_text())
        assert r["precision"] == "bf16"
        assert 0 <= r["miou"] <= 100
        assert_scores_add_up(r)


def test_bf16_resume_is_exact(synthetic_root, tmp_path):
    import pretrain_bcpt

    bf16 = ["--precision", "bf16", "--batch", "2", "--crop", "33"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "a", "--max-iters", "4", *bf16))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "2", *bf16))
    pretrain_bcpt.main(
        pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "4", "--resume", *bf16)
    )
    a = common.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = common.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    checkpoints_equal(a, b)


@cuda_test
def test_cuda_fp16_steps_finite(synthetic_root, tmp_path):
    import metatrain
    import pretrain_bcpt

    for method in ("standard", "bcpt"):
        pretrain_bcpt.main(
            pretrain_args(
                synthetic_root,
                tmp_path / method,
                "--method",
                method,
                "--device",
                "cuda",
                "--precision",
                "fp16",
                "--max-iters",
                "3",
            )
        )
        records = log_records(tmp_path / method / "log.jsonl")
        assert all(np.isfinite(record["loss"]) for record in records)
    metatrain.main(
        meta_args(
            synthetic_root,
            tmp_path / "m",
            str(tmp_path / "bcpt" / "last.pt"),
            1,
            "--device",
            "cuda",
            "--precision",
            "fp16",
            "--max-iters",
            "3",
        )
    )
    assert all(np.isfinite(record["loss"]) for record in log_records(tmp_path / "m" / "log.jsonl"))
    ckpt = common.load_checkpoint(str(tmp_path / "m" / "last.pt"))  # made on CUDA, loads on the CPU
    assert all(v.device.type == "cpu" for v in ckpt["model"].values())
    assert ckpt["rng"]["cuda"]


@cuda_test
def test_cuda_channels_last_matches_contiguous():
    torch.manual_seed(0)
    net = common.build_backbone("resnet18", "none").cuda().eval()
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        a = net(x)[4]
        channels_last = net.to(memory_format=torch.channels_last)
        b = channels_last(x.contiguous(memory_format=torch.channels_last))[4]
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-3)


@cuda_test
def test_cuda_resume_is_exact(synthetic_root, tmp_path):
    import pretrain_bcpt

    cuda = ["--device", "cuda", "--precision", "fp32"]
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "a", "--max-iters", "4", *cuda))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "2", *cuda))
    pretrain_bcpt.main(
        pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "4", "--resume", *cuda)
    )
    a = common.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = common.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    pairs = zip(a["rng"]["cuda"], b["rng"]["cuda"], strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    losses_a = [record["loss"] for record in log_records(tmp_path / "a" / "log.jsonl")]
    losses_b = [record["loss"] for record in log_records(tmp_path / "b" / "log.jsonl")]
    # bilinear backward is not bit-exact on GPU
    assert losses_a[2:] == pytest.approx(losses_b[2:], rel=1e-4)


@cuda_test
def test_cuda_evaluation_any_workers_and_nonparametric(
    metatrained, synthetic_root, pretrained, tmp_path
):
    import evaluate
    import nonparametric_eval

    base = ["--checkpoint", metatrained[1], "--episodes", "6", "--seeds", "42", "--device", "cuda"]
    assert evaluate.main(base + ["--workers", "0"]) == evaluate.main(base + ["--workers", "2"])
    r = nonparametric_eval.main(
        np_args(synthetic_root, pretrained["bcpt"], tmp_path / "n.json", "--device", "cuda")
    )
    assert 0 <= r["miou"] <= 100
    assert_scores_add_up(r)


# ---------- plumbing.py 4. Files: JSON, RNG state ----------
def test_rng_state_round_trip(tmp_path):
    plumbing.seed_everything(3)
    common.write_atomic(str(tmp_path / "r.pt"), torch.save, {"rng": plumbing.rng_state()})
    drawn = (np.random.rand(), torch.rand(1).item(), random.random())
    plumbing.set_rng_state(common.load_checkpoint(str(tmp_path / "r.pt"))["rng"])
    assert drawn == (np.random.rand(), torch.rand(1).item(), random.random())


# ---------- plumbing.py 5. Run folders, locks and run records ----------
def test_one_run_per_folder(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt

    out = tmp_path / "run"
    args = pretrain_args(synthetic_root, out, "--max-iters", "1")
    in_use = rf"--out {out} is in use by process {os.getpid()} on "
    # a run holding the folder
    with plumbing.run_folder(str(out)), pytest.raises(KitError, match=in_use):
        pretrain_bcpt.main(args)
    assert not (out / "last.pt").exists()
    # a killed run: its lock content and a half-written temp checkpoint are left behind
    (out / ".lock").write_text("process 999999 on somehost")
    (out / "last.pt.tmp999999").write_bytes(b"half a checkpoint")
    capsys.readouterr()
    pretrain_bcpt.main(args)
    note = "was left by process 999999 on somehost, which is no longer running; taking it over"
    assert note in capsys.readouterr().out
    # the temp files are gone
    assert sorted(os.listdir(out)) == [".lock", "args.json", "centres.json", "last.pt", "log.jsonl"]
    assert (out / ".lock").read_text() == ""  # released at the end


def test_second_process_on_the_same_folder_stops_with_one_line(synthetic_root, tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import plumbing, sys, time\n"
            "with plumbing.run_folder(sys.argv[1]):\n"
            "    print('locked', flush=True); time.sleep(60)",
            out,
        ],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        r = subprocess.run(
            [
                sys.executable,
                os.path.join(HERE, "pretrain_bcpt.py"),
                *pretrain_args(synthetic_root, out, "--max-iters", "1"),
            ],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1, r.stderr
        assert f"is in use by process {holder.pid}" in r.stderr
        assert "choose another --out" in r.stderr
    finally:
        holder.kill()
        holder.wait()


def test_a_finished_run_is_never_restarted_without_resume(synthetic_root, tmp_path):
    import pretrain_bcpt

    out = tmp_path / "run"
    pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "3"))
    before = tree_bytes(out)
    # the same command, no --resume
    with pytest.raises(
        KitError,
        match=rf"--out {out} holds a pretrain run at iteration 3 of 50 \(.*last.pt, \d{{4}}-"
        r"\d\d-\d\d \d\d:\d\d\): add --resume to continue it, or choose a new --out",
    ):
        pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "2"))
    with pytest.raises(KitError, match="--mu 0.99 but this run has --mu 0.5"):
        pretrain_bcpt.main(
            pretrain_args(synthetic_root, out, "--max-iters", "4", "--resume", "--mu", "0.5")
        )
    assert tree_bytes(out) == before  # last.pt, log.jsonl and args.json (mu 0.99) untouched


def test_another_stage_never_writes_into_a_run_folder(synthetic_root, pretrained, tmp_path):
    import metatrain

    out = os.path.dirname(pretrained["bcpt"])
    before = tree_bytes(out)
    for extra in ([], ["--resume"]):
        with pytest.raises(
            KitError, match=f"--out {out} holds a pretrain run, not a metatrain run: choose a new"
        ):
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


def test_args_json_round_trip_and_log_without_duplicates(synthetic_root, tmp_path):
    import pretrain_bcpt

    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--max-iters", "2"))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--max-iters", "4", "--resume"))
    steps = [record["step"] for record in log_records(tmp_path / "log.jsonl")]
    assert steps == [1, 2, 3, 4]  # the resumed run logged no step twice
    j = json.loads((tmp_path / "args.json").read_text())
    again = pretrain_bcpt.parse_args(flags_to_argv(j["flags"]))
    assert again.flags == j["flags"]
    assert j["flags"]["resume"]
    assert j["derived"]["total_iters"] == 50
    assert {
        "utc",
        "host",
        "torch",
        "torchvision",
        "cuda",
        "cudnn",
        "device",
        "world_size",
        "git_commit",
        "git_dirty",
        "data_root",
        "pools",
    } <= set(j["run"])
    assert j["run"]["pools"] == {"train": 200, "val": 200}
    assert j["stage"] == "pretrain"
    assert j["derived"]["amp"] == "fp32"


def test_a_resumed_run_is_the_run_it_claims(synthetic_root, pretrained, tmp_path):
    """--resume refuses every flag that changes what is trained or how (the initial weights, lr,
    wd, momentum, scale, ... in both training stages) when it differs from the checkpoint's, and
    accepts those that may change (--max-iters, --workers, --log-every)."""
    import metatrain
    import pretrain_bcpt

    out = tmp_path / "pre"
    pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "1", "--save-every", "1"))
    changed = [
        ["--lr", "0.5"],
        ["--wd", "0.5"],
        ["--scale", "0.5", "2.0"],
        ["--weights", pretrained["standard"]],
    ]
    for extra in changed:
        argv = pretrain_args(synthetic_root, out, "--max-iters", "2", "--resume", *extra)
        with pytest.raises(KitError, match=f"was made with {extra[0]} .* but this run has"):
            pretrain_bcpt.main(argv)
    pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--max-iters", "2", "--resume"))
    meta = tmp_path / "meta"
    meta_argv = meta_args(synthetic_root, meta, pretrained["bcpt"], 1, "--max-iters", "1")
    metatrain.main(meta_argv + ["--save-every", "1"])
    for extra in (["--wd", "0.5"], ["--momentum", "0"]):
        with pytest.raises(KitError, match=f"was made with {extra[0]}"):
            metatrain.main(meta_argv + ["--resume", *extra])
    ok = ["--resume", "--max-iters", "2", "--workers", "1", "--log-every", "2"]
    metatrain.main(meta_argv[:-2] + ok)
    assert torch.load(meta / "last.pt", weights_only=True)["iter"] == 2


def test_a_state_dict_in_the_run_folder_is_named_as_such(synthetic_root, tmp_path):
    import pretrain_bcpt

    out = tmp_path / "run"
    out.mkdir()
    torch.save({"w": torch.zeros(1)}, out / "last.pt")
    with pytest.raises(KitError, match="which is not a checkpoint of a run of this kit"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, out, "--resume"))


def test_a_full_disk_keeps_the_last_good_checkpoint(synthetic_root, tmp_path, monkeypatch):
    """A checkpoint write that fails (the disk is full) stops with one line, leaves the previous
    last.pt as it was, and the run continues from it with --resume."""
    import errno

    import pretrain_bcpt

    out = tmp_path / "run"
    argv = pretrain_args(synthetic_root, out, "--max-iters", "2", "--save-every", "1")
    saves = []
    real_save = torch.save

    def save(obj, path):
        saves.append(path)
        if len(saves) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(KitError, match="No space left on device.*the previous file there is kept"):
        pretrain_bcpt.main(argv)
    assert torch.load(out / "last.pt", weights_only=True)["iter"] == 1
    assert [name for name in os.listdir(out) if ".tmp" in name] == []
    monkeypatch.setattr(torch, "save", real_save)
    pretrain_bcpt.main(argv + ["--resume"])
    assert torch.load(out / "last.pt", weights_only=True)["iter"] == 2


# ---------- plumbing.py 6. The training loop both training stages share ----------
def test_pretrain_resume_is_exact(synthetic_root, tmp_path):
    import pretrain_bcpt

    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "a", "--max-iters", "4"))
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "2"))
    pretrain_bcpt.main(
        pretrain_args(synthetic_root, tmp_path / "b", "--max-iters", "4", "--resume")
    )
    a = common.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = common.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert a["iter"] == b["iter"] == 4
    for k in a["model"]:  # weights, BN statistics, centres, guidance
        assert torch.equal(a["model"][k], b["model"][k]), k
    with pytest.raises(KitError, match="--K 6 but this run has --K 3"):
        pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path / "b", "--K", "3", "--resume"))


def test_metatrain_resume_is_exact_and_best_val(synthetic_root, tmp_path):
    import evaluate
    import metatrain

    def metatrain_into(folder, *extra):
        metatrain.main(meta_args(synthetic_root, tmp_path / folder, "none", 1, *extra))

    metatrain_into("a", "--max-iters", "3")
    metatrain_into("b", "--max-iters", "1")
    metatrain_into("b", "--max-iters", "3", "--resume")
    a = common.load_checkpoint(str(tmp_path / "a" / "last.pt"))
    b = common.load_checkpoint(str(tmp_path / "b" / "last.pt"))
    assert a["iter"] == b["iter"] == 3
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    metatrain_into(
        "c", "--max-iters", "2", "--select", "best-val", "--val-every", "1", "--val-episodes", "3"
    )
    best = common.load_checkpoint(str(tmp_path / "c" / "best.pt"))
    assert best["select"] == "best-val"
    assert best["iter"] in (1, 2)
    assert best["best"]["iter"] == best["iter"]
    r = evaluate.main(
        [
            "--checkpoint",
            str(tmp_path / "c" / "best.pt"),
            "--episodes",
            "3",
            "--seeds",
            "321",
            "--workers",
            "0",
            "--json",
            str(tmp_path / "best.json"),
        ]
    )
    assert json.loads((tmp_path / "best.json").read_text())["select"] == "best-val"
    # the same episodes as the validation that chose it
    assert r["miou"] == pytest.approx(best["best"]["miou"])


def test_resume_leaves_every_rng_where_a_straight_run_has_it(synthetic_root, tmp_path):
    import metatrain
    import pretrain_bcpt

    def pretraining(folder, *extra):
        return pretrain_args(synthetic_root, tmp_path / folder, *extra)

    def metatraining(folder, *extra):
        return meta_args(synthetic_root, tmp_path / folder, "none", 1, *extra)

    for name, main, args in (
        ("pre", pretrain_bcpt.main, pretraining),
        ("meta", metatrain.main, metatraining),
    ):
        main(args(name + "a", "--max-iters", "10"))
        main(args(name + "b", "--max-iters", "5"))
        main(args(name + "b", "--max-iters", "10", "--resume"))
        a = common.load_checkpoint(str(tmp_path / (name + "a") / "last.pt"))
        b = common.load_checkpoint(str(tmp_path / (name + "b") / "last.pt"))
        assert a["iter"] == b["iter"] == 10
        checkpoints_equal(a, b)


def test_a_log_line_cut_off_by_a_kill_does_not_block_resume(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt

    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--max-iters", "2"))
    with open(tmp_path / "log.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')  # the kill came mid-write
    pretrain_bcpt.main(pretrain_args(synthetic_root, tmp_path, "--max-iters", "3", "--resume"))
    assert "dropped 1 line(s) cut off by a kill" in capsys.readouterr().out
    assert [record["step"] for record in log_records(tmp_path / "log.jsonl")] == [1, 2, 3]


def test_pretrain_nan_loss_stops_and_keeps_last_good(synthetic_root, tmp_path):
    import pretrain_bcpt

    with pytest.raises(KitError, match=r"loss is (nan|inf) at iteration (\d+).*--lr") as e:
        pretrain_bcpt.main(
            pretrain_args(synthetic_root, tmp_path, "--lr", "1e12", "--max-iters", "20")
        )
    stopped = int(re.search(r"iteration (\d+)", str(e.value)).group(1))
    ckpt = common.load_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt["iter"] == stopped
    floats = [v for v in ckpt["model"].values() if v.is_floating_point()]
    assert all(torch.isfinite(v).all() for v in floats)


def test_benchmark_times_steps_and_writes_nothing(synthetic_root, tmp_path, capsys):
    import pretrain_bcpt

    pretrain_bcpt.main(
        pretrain_args(synthetic_root, tmp_path / "b", "--benchmark", "2", "--workers", "1")
    )
    out = capsys.readouterr().out
    assert "ms/step = data" in out
    assert "of which guidance_step/cluster_assign/momentum_update" in out
    assert "workers to keep up" in out
    assert not (tmp_path / "b" / "last.pt").exists()


# ---------- plumbing.py 7. The entry point: one line per error, Ctrl-C ----------
def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "pretrain_bcpt.py"),
            "--dataset",
            "pascal",
            "--data-root",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0
    assert "missing does not exist" in r.stderr
    assert "prepare_data.py pascal" in r.stderr


def test_flag_error_is_one_line_on_the_command_line(tmp_path):
    r = subprocess.run(
        [sys.executable, os.path.join(HERE, "metatrain.py"), "--shot", "0"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2
    assert r.stderr == "error: argument --shot: value 0 is not allowed: it must be >= 1\n"
    assert not os.listdir(tmp_path)  # nothing generated, no run folder


def default_sigint():
    """A shell's background job (`cmd &`) inherits SIGINT ignored, and Python then keeps ignoring
    it: give the run the default disposition a terminal's Ctrl-C meets."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def logged_steps(out):
    """How many steps a run has logged so far."""
    log = out / "log.jsonl"
    if not log.exists():
        return 0
    return len(log.read_text().splitlines())


def test_ctrl_c_names_the_checkpoint_and_the_command_that_resumes(synthetic_root, tmp_path):
    out = tmp_path / "run"
    argv = pretrain_args(synthetic_root, out, "--save-every", "1", "--max-iters", "40")
    script = os.path.join(HERE, "pretrain_bcpt.py")
    p = subprocess.Popen(
        [sys.executable, script, *argv],
        cwd=HERE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
    )
    while logged_steps(out) < 2:
        assert p.poll() is None  # still running
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=120)[1]
    saved = common.load_checkpoint(str(out / "last.pt"))["iter"]
    assert p.returncode == 130, err
    assert err.count("\n") == 1, err
    assert (
        f"stopped: interrupted: the last checkpoint is {out}/last.pt (iteration {saved}); "
        f"continue with: python pretrain_bcpt.py {' '.join(argv)} --resume" in err
    )
    resumed = subprocess.run(
        [sys.executable, script, *argv, "--resume"], cwd=HERE, capture_output=True
    )
    assert resumed.returncode == 0
    # the command it named runs the rest: every step logged once, up to the last
    assert common.load_checkpoint(str(out / "last.pt"))["iter"] == 40
    assert [record["step"] for record in log_records(out / "log.jsonl")] == list(range(1, 41))
