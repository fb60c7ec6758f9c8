"""plumbing.py: how the BCPT kit runs: flags, the data a stage opens, processes, precision, files,
run folders and run records, the training loop both training stages share, the entry point. The
science is common.py, which never imports this file; the evaluation and its results files are
evaluation.py's."""

import argparse
import atexit
import contextlib
import cProfile
import fcntl  # POSIX, as is resource: the kit's runs target Linux workstations
import functools
import inspect
import json
import math
import os
import platform
import pstats
import random
import re
import resource
import shlex
import subprocess
import sys
import time
import timeit

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torchvision

from common import (
    BACKBONES,
    IGNORE,
    LAYOUT_FIX,
    N_CLASSES,
    SYNTHETIC_ROOTS,
    KitError,
    base_classes,
    class_pixel_counts,
    image_pools,
    load_checkpoint,
    novel_classes,
    save_checkpoint,
    write_atomic,
)
from worlds import ensure_synthetic


# ============ 1. Flags: every default written once, per dataset where it differs ============
class KitParser(argparse.ArgumentParser):
    """argparse whose errors are KitErrors: one line naming the flag, no usage block (run() prints
    it). Its description is the first paragraph of the script's docstring, on one line."""

    def __init__(self, doc=None, **kwargs):
        if doc is not None:
            first_paragraph = doc.split("\n\n")[0]
            kwargs["description"] = " ".join(first_paragraph.split())
        super().__init__(**kwargs)

    def error(self, message):
        raise KitError(message)


def bounded(kind, lo=None, hi=None, open_lo=False):
    """An argparse type: a finite `kind` in [lo, hi] (lo excluded if open_lo), so a bad value stops
    the run at once."""

    def check(text):
        v = kind(text)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"value {text} is not a finite number")
        if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
            want = f"in [{lo}, {hi}]" if hi is not None else f"> {lo}" if open_lo else f">= {lo}"
            raise argparse.ArgumentTypeError(f"value {text} is not allowed: it must be {want}")
        return v

    check.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return check


POSITIVE, NON_NEGATIVE, SIZE = (
    bounded(int, 1),
    bounded(int, 0),
    bounded(int, 16),
)  # SIZE: image sides
UNIT, POSITIVE_FLOAT = bounded(float, 0.0, 1.0), bounded(float, 0.0, open_lo=True)


def dataset_of(argv):
    """The --dataset of a command line (default synthetic), read first so that every default and
    --help is its own."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="synthetic")
    dataset = pre.parse_known_args(argv)[0].dataset
    return (
        dataset if dataset in N_CLASSES else "synthetic"
    )  # a wrong name is refused by the full parser


def typed(argv, flag):
    """Whether the command line names this flag (--flag or --flag=value)."""
    return any(a == flag or a.startswith(flag + "=") for a in argv or [])


def add_flag(group, dataset, flags, default, help, **kw):
    """Add a flag whose default may be {dataset: value}, the one place it is written; --help shows
    the others'. dataset None: no default (evaluate.py's data and model flags take the
    checkpoint's)."""
    if dataset is None:
        default = None
    elif isinstance(default, dict):
        key = (
            dataset if dataset in default else "synthetic"
        )  # the synthetic worlds share unless told
        others = "; ".join(
            f"{d} {'required' if v is None else v}" for d, v in default.items() if d != key
        )
        default = default[key]
        help += (
            f" ({'required' if default is None else 'default %(default)s'} for --dataset "
            f"{dataset}; {others})"
        )
    elif default is not None:
        help += " (default %(default)s)"
    group.add_argument(*flags.split(), default=default, help=help, **kw)


def add_data_args(parser, dataset, stage):
    """The data flags of a stage: pretrain, metatrain, evaluate, nonparametric or verify; dataset
    None: no defaults."""
    g = parser.add_argument_group(
        "data (PROTOCOL.md 1-3)" + "; default: the checkpoint's" * (dataset is None)
    )
    add_flag(
        g,
        dataset,
        "--dataset",
        "synthetic",
        "pascal, coco, or a built-in synthetic benchmark world",
        choices=list(N_CLASSES),
    )
    add_flag(
        g,
        dataset,
        "--data-root",
        dict(pascal=None, coco=None, **SYNTHETIC_ROOTS),
        "VOC-layout root (python prepare_data.py makes one; the synthetic one is drawn on first "
        "use)",
    )
    if stage != "verify":
        add_flag(
            g,
            dataset,
            "--fold",
            0,
            "fold i of PASCAL-5i / COCO-20i",
            type=int,
            choices=[0, 1, 2, 3],
        )
    add_flag(
        g,
        dataset,
        "--train-pool",
        dict(pascal="oslsm", coco="aug", synthetic="aug"),
        "aug: every mask not in val.txt (10582 on VOC + SBD); oslsm: train.txt + "
        "train_noval.txt, PFENet/BAM's 5953 (PROTOCOL.md 2.2)",
        choices=["aug", "oslsm"],
    )
    add_flag(
        g,
        dataset,
        "--coco-split",
        "interleaved",
        "COCO-20i folds: interleaved is PFENet/BAM/HSNet's (PROTOCOL.md 1.2)",
        choices=["interleaved", "contiguous"],
    )
    if stage != "pretrain":  # the pixel rule and the test geometry belong to episodes
        add_flag(
            g,
            dataset,
            "--min-pixels",
            dict(pascal=2048, coco=2048, synthetic=128),
            "pixel rule of the support pools (PROTOCOL.md 3.1)",
            type=POSITIVE,
        )
    if stage not in ("pretrain", "verify"):
        add_flag(
            g,
            dataset,
            "--test-size",
            dict(pascal=473, coco=641, synthetic=64),
            "test canvas side (PROTOCOL.md 5.1)",
            type=SIZE,
        )
        add_flag(
            g,
            dataset,
            "--test-geometry",
            "pfenet",
            "pfenet: keep the aspect, longer side to --test-size, score at the original label "
            "size (PFENet/BAM); hsnet: both sides to --test-size, score there (HSNet/DCAMA, with "
            "--test-size 400) (PROTOCOL.md 5)",
            choices=["pfenet", "hsnet"],
        )
    return parser


def add_common_args(parser, dataset, stage):
    """Data, model and run flags (dataset None: no data or model defaults); --seed but for
    evaluate."""
    add_data_args(parser, dataset, stage)
    g = parser.add_argument_group("model" + "; default: the checkpoint's" * (dataset is None))
    add_flag(
        g,
        dataset,
        "--backbone",
        dict(pascal="resnet50", coco="resnet50", synthetic="resnet18"),
        "resnet50v2 (PFENet/BAM's deep stem), resnet50 (torchvision's) or vgg16 (paper Sec. "
        "3.1); resnet18 for CPU runs",
        choices=BACKBONES,
    )
    add_flag(
        g,
        dataset,
        "--weights --pretrained",
        dict(pascal="imagenet", coco="imagenet", synthetic="none"),
        "backbone init: imagenet, none, a state-dict file or pretrain_bcpt.py's last.pt",
        dest="weights",
    )
    g = parser.add_argument_group("run")
    g.add_argument(
        "--device",
        default="auto",
        help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...",
    )
    cores = (
        len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )
    g.add_argument(
        "--workers",
        type=NON_NEGATIVE,
        default=min(8, cores),
        help="DataLoader workers; results do not "
        "depend on it (default min(8, the cores this process may use): %(default)s here)",
    )
    g.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="auto: bf16 autocast on a GPU that has bfloat16, fp32 elsewhere; bf16: bfloat16 "
        "autocast (CPU or CUDA); fp16: float16 autocast with a gradient scaler, CUDA only "
        "(default %(default)s)",
    )
    if stage != "evaluate":
        g.add_argument(
            "--seed",
            type=int,
            default=321,
            help="all randomness of the run: initialisation, "
            "augmentation, training episodes (PFENet/BAM's value) (default %(default)s)",
        )
    return parser


def add_training_args(parser, dataset, source, epochs, batch, lr, crop, scale):
    """Optimisation and run-control flags of both training stages; defaults (lr: (default, help))
    from `source`."""
    g = parser.add_argument_group(f"optimisation ({source})")
    add_flag(
        g,
        dataset,
        "--epochs",
        epochs,
        "passes over the training data (paper Sec. 3.1)",
        type=POSITIVE,
    )
    add_flag(g, dataset, "--batch", batch, "samples per iteration", type=POSITIVE)
    add_flag(g, dataset, "--lr", lr[0], lr[1], type=POSITIVE_FLOAT)
    add_flag(g, dataset, "--crop", crop, "training crop side (PROTOCOL.md 4.2)", type=SIZE)
    add_flag(
        g,
        dataset,
        "--scale",
        scale,
        "RandScale range (PROTOCOL.md 4.2)",
        type=POSITIVE_FLOAT,
        nargs=2,
    )
    add_flag(g, dataset, "--momentum", 0.9, "SGD momentum (PROTOCOL.md 7.1)", type=UNIT)
    add_flag(
        g, dataset, "--wd", 1e-4, "SGD weight decay (PROTOCOL.md 7.1)", type=bounded(float, 0.0)
    )
    add_flag(
        g,
        dataset,
        "--power",
        0.9,
        "power of the poly lr schedule, per iteration (PROTOCOL.md 7.1)",
        type=bounded(float, 0.0),
    )
    g = parser.add_argument_group("run control")
    g.add_argument(
        "--out", help="run folder: last.pt, log.jsonl (default runs/<stage>-<dataset>-fold<F>...)"
    )
    g.add_argument(
        "--max-iters",
        type=POSITIVE,
        help="stop after this many iterations; the lr schedule is unchanged",
    )
    add_flag(g, dataset, "--log-every", 20, "iterations between progress lines", type=POSITIVE)
    add_flag(g, dataset, "--save-every", 200, "iterations between checkpoints", type=POSITIVE)
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (a fresh start "
        "if none yet); a folder holding a checkpoint is never started again without it",
    )
    add_flag(
        g,
        dataset,
        "--select",
        "last",
        "last: the final model (honest); best-val: also keep best.pt, the best "
        "validation on the val images, as BAM and PFENet do (PROTOCOL.md 8.1)",
        choices=["last", "best-val"],
    )
    add_flag(
        g,
        dataset,
        "--benchmark",
        0,
        "time N steps (data / network, peak memory) and exit",
        type=NON_NEGATIVE,
    )


def add_eval_args(parser):
    """The flags of both tests (evaluate.py, nonparametric_eval.py): episodes, seeds, outputs."""
    g = parser.add_argument_group("episodic evaluation (PROTOCOL.md 5, 8)")
    g.add_argument(
        "--episodes",
        type=POSITIVE,
        default=1000,
        help="episodes per seed, as BAM and HSNet; use >= "
        "10000 on COCO (PROTOCOL.md 8.2-8.4) (default %(default)s)",
    )
    g.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[510, 365, 382, 322, 988],
        help="one evaluation per seed, "
        "reported as mean +- std (BAM test.py's seeds) (default %(default)s)",
    )
    g.add_argument("--json", help="write the results to this file")
    g.add_argument(
        "--label",
        help="row name in --table (default: the pre-training's, e.g. none or bcpt K=6 Eq4=sum)",
    )
    g.add_argument(
        "--episode-log",
        metavar="FILE",
        help="one JSON line per episode (seed, index, query and support "
        "ids, class, intersection and union), from which every reported number can be recomputed",
    )
    return parser


def finish_args(args, out_name=None, needs_data=True, outputs=()):
    """Cross-flag checks, derived values, device and precision; out_name: the default run folder;
    outputs: as check_paths, checked before the work. The flags as parsed are kept in args.flags
    (args.json)."""
    if args.data_root is None and needs_data:
        raise KitError(f"--data-root is required for --dataset {args.dataset} ({LAYOUT_FIX})")
    if out_name and args.out is None:
        args.out = os.path.join("runs", out_name)
    check_paths(args, outputs)
    args.flags = dict(vars(args))
    args.device = setup_device(args.device)
    args.amp = precision_of(args.precision, torch.device(args.device))
    args.novel = novel_classes(args.dataset, args.fold, args.coco_split)
    args.base = base_classes(args.dataset, args.fold, args.coco_split)
    return args


def check_paths(args, outputs=(), inputs=()):
    """outputs: (flag, is a folder) of every path the run will write; inputs: the flags naming files
    it reads."""
    for flag, folder in outputs:
        if (path := getattr(args, flag[2:].replace("-", "_"))) is None:
            continue
        if os.path.exists(path) and os.path.isdir(path) != folder:
            raise KitError(
                f"{flag} {path} is a {'file' if folder else 'folder'}: pass the "
                f"{'folder' if folder else 'file'} to write"
            )
        near = os.path.abspath(path)
        while not os.path.exists(near):
            near = os.path.dirname(near)
        if not (os.path.isdir(near) or near == os.path.abspath(path)) or not os.access(
            near, os.W_OK
        ):
            raise KitError(
                f"{flag} {path} cannot be written ({near} is not a writable folder): choose "
                "another path"
            )
    for flag in inputs:
        for path in getattr(args, flag[2:].replace("-", "_")) or []:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise KitError(f"{flag} {path}: no such readable file")


def open_data(args, splits=("train", "val"), kind="benchmark"):
    """{split: (ids, per-class pixel counts)} of the splits a stage reads (no other list is opened);
    draws a synthetic world (kind benchmark or standin) on first use, and records its checksum in
    args.world_checksum."""
    if args.dataset in SYNTHETIC_ROOTS:
        made = ensure_synthetic(args.data_root, args.dataset, kind) or {}
        args.world_checksum = made.get("checksum")
        print(
            f"world: {args.dataset} {made.get('kind', 'from your images')} at {args.data_root}, "
            f"checksum {args.world_checksum}"
        )
    pools = dict(
        zip(("train", "val"), image_pools(args.data_root, args.train_pool, "train" in splits))
    )
    n = N_CLASSES[args.dataset]
    data = {
        k: (pools[k], class_pixel_counts(args.data_root, pools[k], n, args.workers)) for k in splits
    }
    print(
        f"data: {args.data_root} "
        + ", ".join(f"{k} {len(ids)} images" for k, (ids, _) in data.items())
        + f" (train pool {args.train_pool}); fold {args.fold} novel {args.novel}"
    )
    return data


# ============ 2. Several processes (torchrun): one process per device, rank 0 prints and writes
# ============
def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main():
    return rank() == 0


def setup_device(flag):
    """--device resolved. Under torchrun (RANK and WORLD_SIZE set) join the process group (NCCL on
    CUDA, gloo on the CPU) on cuda:LOCAL_RANK; ranks other than 0 print nothing."""
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if launched and flag not in ("auto", "cuda", "cpu"):
        raise KitError(
            f"--device {flag}: under torchrun each process takes cuda:LOCAL_RANK; pass --device "
            "cuda, cpu or auto (and choose the GPUs with CUDA_VISIBLE_DEVICES)"
        )
    try:
        device = torch.device(
            ("cuda" if torch.cuda.is_available() else "cpu") if flag == "auto" else flag
        )
    except RuntimeError:
        raise KitError(f"--device {flag}: not a device; pass auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise KitError(
            f"--device {flag}: this machine has {torch.cuda.device_count()} CUDA device(s) that "
            "torch can use; pass --device cpu" + " or cuda:0" * (torch.cuda.device_count() > 0)
        )
    if launched and device.type == "cuda":
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(device)
    if launched and world() == 1:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
        atexit.register(
            dist.destroy_process_group
        )  # else gloo's threads may abort the process as it exits
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")
    return str(device)


def all_reduce_sum(t):
    """t summed over the processes (t itself for one process), on t's device; NCCL reduces on the
    GPU."""
    if world() == 1:
        return t
    x = t.to(
        f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    ).clone()
    dist.all_reduce(x)
    return x.to(t.device)


def gathered(obj):
    """[obj of every process], in rank order."""
    objs = [obj] * world()
    if world() > 1:
        dist.all_gather_object(objs, obj)
    return objs


def wrap_ddp(model, device, sync_bn=False):
    """DistributedDataParallel for several processes (SyncBatchNorm first if sync_bn, on CUDA;
    buffers not broadcast: the BCPT centres stay in step by all_reduce_sum); the model itself for
    one."""
    if world() == 1:
        return model
    if sync_bn and device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ddp = (
        torch.nn.parallel.DistributedDataParallel
    )  # torch >= 2.14 names the option forward_sync_buffers
    option = next(
        o
        for o in ("forward_sync_buffers", "broadcast_buffers")
        if o in inspect.signature(ddp).parameters
    )
    return ddp(
        model, device_ids=[device.index] if device.type == "cuda" else None, **{option: False}
    )


def global_mean(loss, logits, target, n=None):
    """loss(logits, target) as this process's share of its mean over the n labelled entries of the
    global batch (n: the target's entries but 255), the shares adding up to the one-process loss
    (Trainer.optimise scales to match)."""
    if world() == 1:
        return loss(logits, target)
    n = (target != IGNORE).sum() if n is None else n
    return loss(logits, target, reduction="sum") / all_reduce_sum(n.float()).clamp(min=1)


global_mean_ce = functools.partial(
    global_mean, functools.partial(torch.nn.functional.cross_entropy, ignore_index=IGNORE)
)  # cross-entropy ignoring 255


def stream_batches(n, batch, seed, start_iter, total_iters, rank=0, world=1):
    """The index lists of iterations start_iter .. total_iters - 1: iteration t takes items t*B ..
    (t+1)*B - 1 of an endless stream of per-epoch permutations seeded by (seed, epoch), so a resumed
    run sees the batches a straight one would; rank r of W takes its B / W of each global batch."""
    perm = functools.lru_cache(2)(
        lambda epoch: torch.randperm(
            n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)
        )
    )
    local = batch // world
    for first in range(
        start_iter * batch + rank * local, total_iters * batch, batch
    ):  # its share of batch t
        yield [
            pos // n * n + int(perm(pos // n)[pos % n]) for pos in range(first, first + local)
        ]  # (dataset: idx % n)


def stream_loader(dataset, batch, seed, start_iter, total_iters, workers, device):
    """The batches of iterations start_iter .. total_iters - 1 (this rank's share of each, under
    torchrun)."""
    if batch % world():
        raise KitError(
            f"--batch {batch} is the global batch: it must split evenly over the {world()} "
            "processes"
        )
    batches = stream_batches(len(dataset), batch, seed, start_iter, total_iters, rank(), world())
    cuda, own = (
        device.type == "cuda",
        torch.Generator().manual_seed(seed),
    )  # the workers' base seed: not the global RNG
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=cuda and workers > 0,
        generator=own,
    )


# ============ 3. Precision: autocast in a dtype; the sensitive steps stay float32 (common.fp32)
# ============
def precision_of(precision, device):
    """--precision resolved: auto is bf16 (float32's range, fp16's is 6.5e4) on a GPU that has it,
    else fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise KitError(
            "--precision fp16 needs a CUDA device: use --precision bf16 (or fp32) on the CPU"
        )
    return precision


AMP_DTYPES = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}  # autocast dtype of a resolved --precision


def autocast_call(device, dtype, fn, *a):
    """fn(*a) under autocast in `dtype` (nothing for None) on `device`."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)(fn)(*a)


# ============ 4. Files: JSON, RNG state ============
def save_text(text, path):
    with open(path, "w") as f:
        f.write(text if isinstance(text, str) else json.dumps(text, indent=1))


def read_json(path, flag):
    """A JSON file named on the command line, or one line saying what is wrong with it."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise KitError(f"{flag} {path}: cannot read it as JSON ({type(e).__name__}: {e})") from None


def parse_json_line(line):
    """One record of a log.jsonl, or None for a line a kill cut off (no newline) or garbled."""
    try:
        return json.loads(line) if line.endswith("\n") else None
    except ValueError:
        return None


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state():
    name, keys, pos, has_gauss, cached = (
        np.random.get_state()
    )  # lists, not arrays: weights_only loads them
    return {
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state):
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    np.random.set_state(state["numpy"])  # numpy takes the key as the list it was saved as
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============ 5. Run folders, locks and run records ============
def check_run_folder(args, stage, keys):
    """Before anything is written: a folder holding a checkpoint is continued only by the same
    stage, with --resume and the same `keys` flags; another stage's folder is refused. -> the
    checkpoint to resume from, or None."""
    path, record, fresh = (
        os.path.join(args.out, "last.pt"),
        os.path.join(args.out, "args.json"),
        "choose a new --out",
    )
    other = (
        read_json(record, "--out").get("stage", stage)
        if os.path.isfile(record) and os.path.getsize(record)
        else stage
    )
    if other != stage:
        raise KitError(f"--out {args.out} holds a {other} run, not a {stage} run: {fresh}")
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path)
    what = (
        f"a {ckpt.get('stage')} run at iteration {ckpt.get('iter')} of "
        f"{ckpt.get('args', {}).get('total_iters')} ({path}, "
        f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(os.path.getmtime(path)))})"
    )
    if ckpt.get("stage") != stage:
        raise KitError(f"--out {args.out} holds {what}, not a {stage} run: {fresh}")
    if not args.resume:
        raise KitError(f"--out {args.out} holds {what}: add --resume to continue it, or {fresh}")
    return load_checkpoint(path, {k: getattr(args, k) for k in keys})


@contextlib.contextmanager
def run_folder(out):
    """One run per folder: rank 0 holds an exclusive lock on OUT/.lock (naming its process) while
    the run lasts; a second run stops at once; a killed run's lock (freed by the kernel) is taken
    over, its temp files removed."""
    f, err = None, None
    if is_main():
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            err = (
                f"--out {out} is in use by {f.read().strip() or 'another process'} ({f.name}): "
                "wait for that run to end, or choose another --out"
            )
            f.close()
    if all_reduce_sum(torch.tensor([float(err is not None)])).item():
        raise KitError(
            err or f"--out {out}: rank 0 could not take the run folder (its message says why)"
        )
    if f:
        f.seek(0)
        if previous := f.read().strip():
            print(
                f"note: {f.name} was left by {previous}, which is no longer running; taking it over"
            )
        for name in os.listdir(
            out
        ):  # a killed run's half-written files (write_atomic's names); nothing else
            if re.fullmatch(r"(last\.pt|best\.pt|args\.json|log\.jsonl)\.tmp\d+", name):
                os.remove(os.path.join(out, name))
        f.truncate(0)  # (appends go to the end of the file)
        print(f"process {os.getpid()} on {platform.node()}", file=f, end="", flush=True)
    try:
        yield out
    finally:
        if f:
            f.truncate(
                0
            )  # an empty lock file means a clean end; the file stays so lockers share one inode
            f.close()


def run_record(args, data=None):
    """What ran where: UTC time, host, versions, device, world size, the kit's git commit and
    whether its tree was dirty, the data root, its pool sizes and world checksum (args.json, and
    "run" in results files)."""
    here = os.path.dirname(os.path.abspath(__file__))
    git = lambda *a: subprocess.run(
        ["git", "-C", here, *a], capture_output=True, text=True
    ).stdout.strip()
    try:
        commit, dirty = (
            git("rev-parse", "HEAD") or None,
            bool(git("status", "--porcelain", "--untracked-files=no")),
        )
    except OSError:  # no git on this machine
        commit, dirty = None, None
    device = torch.device(args.device)
    return {
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "world_size": world(),
        "git_commit": commit,
        "git_dirty": dirty,
        "data_root": os.path.abspath(args.data_root) if args.data_root else None,
        "world_checksum": getattr(args, "world_checksum", None),
        "pools": {split: len(ids) for split, (ids, _) in data.items()} if data else None,
    }


# ============ 6. The training loop both training stages share ============
class Trainer:
    """All around a stage's step(batch) -> (loss, metrics), which calls optimise(loss) with its
    process's share of the global batch's loss: run folder, --resume, batch stream, poly lr,
    autocast, gradient scaling, the NaN stop every process agrees on, best.pt, progress lines and
    log.jsonl, checkpoints, Ctrl-C and --benchmark."""

    def __init__(self, args, stage, model, opt, base_lrs, keys):
        self.args, self.stage, self.model, self.opt, self.base_lrs, self.keys = (
            args,
            stage,
            model,
            opt,
            base_lrs,
            keys,
        )
        self.device, self.dtype = torch.device(args.device), AMP_DTYPES[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.path, self.best = os.path.join(args.out, "last.pt"), {"miou": -1.0, "iter": 0}
        self.log, self.skipped, self.saved = os.path.join(args.out, "log.jsonl"), False, 0

    def optimise(self, loss):
        """The optimiser step (fp16: scaled; the gradient summed over the processes) when the loss
        is finite on every process, which all agree on so none hangs. -> whether a step was
        taken."""
        self.skipped = all_reduce_sum(torch.tensor([float(not torch.isfinite(loss))])).item() > 0
        if not self.skipped:
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=False):
                self.scaler.scale(
                    loss * world()
                ).backward()  # DDP averages the ranks' gradients: this makes it a sum
            self.scaler.step(self.opt)
            self.scaler.update()
        return not self.skipped

    def save(self, t, path=None, **extra):
        """Every process calls it: their RNG states are gathered, rank 0 writes the file, all wait
        for it."""
        states = gathered(rng_state())
        if is_main():
            save_checkpoint(
                path or self.path,
                {
                    "model": self.model.state_dict(),
                    "optimizer": self.opt.state_dict(),
                    "iter": t,
                    "scaler": self.scaler.state_dict(),
                    "rng": states[0],
                    "args": dict(vars(self.args)),
                    "stage": self.stage,
                    "best": self.best,
                    "select": "last",
                    **({"rng_ranks": states} if world() > 1 else {}),
                    **extra,
                },
            )
        if world() > 1:
            dist.barrier()
        return path or self.path

    def fit(self, dataset, step, stop, argv, data, validate=None, val_every=None, log_extra=dict):
        """Iterations 0 (or the checkpoint's) .. stop - 1 of step(batch); every log line adds
        log_extra()'s fields; validate() -> (mIoU, {other scores}) every val_every iterations and at
        the end under --select best-val."""
        args, argv = self.args, sys.argv[1:] if argv is None else list(argv)
        ckpt = check_run_folder(
            args, self.stage, self.keys
        )  # nothing is written before every check has passed
        with run_folder(args.out):
            if ckpt is None and os.path.isfile(self.path):  # another run wrote it since the check
                ckpt = check_run_folder(args, self.stage, self.keys)
            if is_main():
                derived = {
                    k: v for k, v in vars(args).items() if k not in args.flags and k != "flags"
                }
                write_atomic(
                    os.path.join(args.out, "args.json"),
                    save_text,
                    {
                        "stage": self.stage,
                        "argv": argv,
                        "flags": args.flags,
                        "derived": derived,
                        "run": run_record(args, data),
                    },
                )
            if ckpt:
                for part, obj in (
                    ("model", self.model),
                    ("optimizer", self.opt),
                    ("scaler", self.scaler),
                ):
                    obj.load_state_dict(ckpt[part])
                self.best, self.saved = ckpt.get("best", self.best), ckpt["iter"]
                print(f"resumed from {self.path} at iteration {ckpt['iter']}")
                ranks = ckpt.get(
                    "rng_ranks", [ckpt["rng"]]
                )  # every RNG where a straight run has it, each rank's own
                if len(ranks) != world():
                    print(
                        f"note: {self.path} was written by {len(ranks)} processes, this run has "
                        f"{world()}: every rank continues from rank 0's RNG state, so the run is "
                        "not an exact continuation"
                    )
                set_rng_state(ranks[rank()] if len(ranks) == world() else ranks[0])
            elif args.resume:
                print(f"--resume: no {self.path} yet, starting from iteration 0")
            batches = iter(
                stream_loader(
                    dataset, args.batch, args.seed, self.saved, stop, args.workers, self.device
                )
            )
            self.start_log()
            self.model.train()
            try:
                self.loop(batches, stop, step, validate, val_every, log_extra)
            except KeyboardInterrupt:
                script = {"pretrain": "pretrain_bcpt.py", "metatrain": "metatrain.py"}[self.stage]
                last = (
                    f"the last checkpoint is {self.path} (iteration {self.saved})"
                    if self.saved
                    else "no checkpoint was written yet (the first comes at iteration "
                    f"{args.save_every})"
                )
                raise KeyboardInterrupt(
                    f"interrupted: {last}; continue with: python {script} "
                    + shlex.join(argv + ["--resume"] * (not args.resume))
                ) from None
            print(f"saved {self.path}")

    def loop(self, batches, stop, step, validate, val_every, log_extra):
        """The iterations: poly lr, the step, the NaN stop, progress lines, validation and
        checkpoints."""
        args = self.args
        for t, batch in enumerate(batches, self.saved):
            for group, base_lr in zip(
                self.opt.param_groups, self.base_lrs
            ):  # poly, every iteration (PROTOCOL.md 7.1)
                group["lr"] = base_lr * (1 - t / args.total_iters) ** args.power
            good = {k: v.clone() for k, v in self.model.named_buffers()}  # BN statistics, centres
            loss, metrics = autocast_call(self.device, self.dtype, step, batch)
            if self.skipped:  # nothing was stepped: only the buffers need restoring
                self.model.load_state_dict(good, strict=False)
                raise KitError(
                    f"loss is {loss.item()} at iteration {t}: the last good state is saved in "
                    f"{self.save(t)}; lower --lr (now {args.lr}) and rerun with --resume"
                )
            loss = all_reduce_sum(loss.detach().float().reshape(1)).item()
            if (t + 1) % args.log_every == 0 or t + 1 == stop:
                self.progress(
                    t + 1,
                    stop,
                    loss=loss,
                    lr=self.opt.param_groups[0]["lr"],
                    **metrics,
                    **log_extra(),
                )
            if (
                validate
                and args.select == "best-val"
                and ((t + 1) % val_every == 0 or t + 1 == args.total_iters)
            ):
                self.keep_best(t + 1, *validate())
            if (t + 1) % args.save_every == 0 or t + 1 == stop:
                self.save(t + 1)
                self.saved = t + 1

    def start_log(self):
        """Cut log.jsonl back to the steps <= the start (a line a kill cut off dropped with a note),
        so a resumed run logs no step twice and a fresh one starts empty; start the clock of the
        progress lines."""
        self.t0, self.start = time.time(), self.saved
        if is_main() and os.path.exists(self.log):
            with open(self.log) as f:
                records = [(line, parse_json_line(line)) for line in f]
            if any(r is None for _, r in records):
                print(
                    f"note: {self.log}: dropped {sum(r is None for _, r in records)} line(s) cut "
                    "off by a kill"
                )
            write_atomic(
                self.log,
                save_text,
                "".join(l for l, r in records if r and r.get("step", 0) <= self.start),
            )

    def progress(self, t, total, **metrics):
        """The line after step t of total, with rate and ETA, also appended to log.jsonl."""
        rate = (t - self.start) / max(time.time() - self.t0, 1e-9)
        eta = time.strftime("%H:%M:%S", time.gmtime((total - t) / max(rate, 1e-9)))
        text = " ".join(
            f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
        )
        print(f"[{t}/{total}] {text} | {rate:.2f} it/s ETA {eta}", flush=True)
        self.record(step=t, **metrics, rate=rate, time=round(time.time(), 3))

    def record(self, **fields):
        """Append one JSON line to log.jsonl (rank 0)."""
        if is_main():
            with open(self.log, "a") as f:
                f.write(json.dumps(fields) + "\n")

    def keep_best(self, t, miou, scores):
        """--select best-val, after a validation at iteration t: log it, and save best.pt if it is
        the best."""
        print(
            f"validation at iteration {t}: mIoU {miou:.2f} (best "
            f"{max(self.best['miou'], miou):.2f})"
        )
        self.record(step=t, val_miou=miou, **scores, new_best=miou > self.best["miou"])
        if miou > self.best["miou"]:
            self.best = {"miou": miou, "iter": t}
            self.save(t, os.path.join(self.args.out, "best.pt"), select="best-val")

    def benchmark(self, dataset, step, what, inner=()):
        """Time --benchmark steps after a warm-up: batch wait (data) against step (network), peak
        memory, host time in the functions `inner` (cProfile), one sample's load time and so the
        workers needed. Prints two lines; -> ms."""
        n, batch, cuda = self.args.benchmark, self.args.batch, self.device.type == "cuda"
        sample_ms = 1000 * timeit.timeit(lambda: [dataset[i] for i in range(8)], number=1) / 8
        batches = iter(
            stream_loader(dataset, batch, self.args.seed, 0, n + 1, self.args.workers, self.device)
        )
        self.model.train()
        call = functools.partial(autocast_call, self.device, self.dtype, step)
        spent, prof = np.zeros(2), cProfile.Profile()
        for k in range(n + 1):  # step 0 warms up and is not counted
            t0 = time.perf_counter()
            item = next(batches)
            t1 = time.perf_counter()
            prof.runcall(call, item) if k else call(item)
            torch.cuda.synchronize() if cuda else None
            spent += np.array([t1 - t0, time.perf_counter() - t1]) * (k > 0)
        data, net = 1000 * spent / n
        inside = 1000 * sum(s[3] for f, s in pstats.Stats(prof).stats.items() if f[2] in inner) / n
        mem = (
            torch.cuda.max_memory_allocated() / 2**20
            if cuda
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        )
        share = f", of which {'/'.join(inner)} {inside:.2f} ms = {100 * inside / net:.2f}%" * bool(
            inner
        )
        print(
            f"benchmark {what} on {self.device}: {data + net:.1f} ms/step = data {data:.1f} + "
            f"network {net:.1f}{share}; peak memory {mem:.0f} MiB",
            flush=True,
        )
        print(
            f"one sample takes {sample_ms:.1f} ms to load and augment on one core: {batch} per "
            f"step need {math.ceil(batch * sample_ms / net)} workers to keep up with this "
            f"{net:.0f} ms step"
        )
        return {"data": data, "network": net, "inner": inside, "sample": sample_ms}


# ============ 7. The entry point ============
def run(main):
    """Entry point of every script: a KitError (also one raised in a DataLoader worker) becomes one
    line on stderr and exit code 2; Ctrl-C one line (Trainer.fit's names the last checkpoint and the
    command that resumes) and 130."""
    try:
        main(sys.argv[1:])
    except KitError as e:
        print(
            "error: " + str(e).strip().splitlines()[-1].replace("common.KitError: ", ""),
            file=sys.stderr,
        )
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"stopped: {str(e) or 'interrupted; nothing of this run was saved'}", file=sys.stderr)
        sys.exit(130)
