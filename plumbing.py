"""plumbing.py: how the BCPT kit runs: flags, the data a stage opens, processes, precision, files,
run folders and records, the training loop both training stages share, the entry point. The science
is common.py, which never imports it; the evaluation and its results files are evaluation.py's."""

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
from PIL import Image

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
    root_made_by,
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
    if hi is not None:
        want = f"in [{lo}, {hi}]"
    elif open_lo:
        want = f"> {lo}"
    else:
        want = f">= {lo}"

    def check(text):
        v = kind(text)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"value {text} is not a finite number")
        too_low = lo is not None and (v < lo or (open_lo and v == lo))
        if too_low or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"value {text} is not allowed: it must be {want}")
        return v

    check.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return check


POSITIVE = bounded(int, 1)
NON_NEGATIVE = bounded(int, 0)
SIZE = bounded(int, 16)  # image sides
SEED = bounded(int, 0, 2**32 - 1)  # what numpy's and torch's generators take
UNIT = bounded(float, 0.0, 1.0)
POSITIVE_FLOAT = bounded(float, 0.0, open_lo=True)


def dataset_of(argv):
    """The --dataset of a command line (default synthetic), read first so that every default and
    --help is its own."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--dataset", default="synthetic")
    dataset = pre.parse_known_args(argv)[0].dataset
    # a wrong name is refused by the full parser
    return dataset if dataset in N_CLASSES else "synthetic"


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
        key = dataset if dataset in default else "synthetic"  # synthetic worlds share unless told
        others = "; ".join(
            f"{d} {'required' if v is None else v}" for d, v in default.items() if d != key
        )
        default = default[key]
        this = "required" if default is None else "default %(default)s"
        help += f" ({this} for --dataset {dataset}; {others})"
    elif default is not None:
        help += " (default %(default)s)"
    group.add_argument(*flags.split(), default=default, help=help, **kw)


def flag_group(parser, title, dataset):
    """A new argument group -> add(flags, default, help, **kw): add_flag in it for `dataset`."""
    if dataset is None:
        title += "; default: the checkpoint's"
    return functools.partial(add_flag, parser.add_argument_group(title), dataset)


def add_data_args(parser, dataset, stage):
    """The data flags of a stage: pretrain, metatrain, evaluate, nonparametric or verify; dataset
    None: no defaults."""
    add = flag_group(parser, "data (PROTOCOL.md 1-3)", dataset)
    add(
        "--dataset",
        "synthetic",
        "pascal, coco, or a built-in synthetic benchmark world",
        choices=list(N_CLASSES),
    )
    add(
        "--data-root",
        dict(pascal=None, coco=None, **SYNTHETIC_ROOTS),
        "VOC-layout root (python prepare_data.py makes one; the synthetic one is drawn on first "
        "use)",
    )
    if stage != "verify":
        add("--fold", 0, "fold i of PASCAL-5i / COCO-20i", type=int, choices=[0, 1, 2, 3])
    add(
        "--train-pool",
        dict(pascal="oslsm", coco="aug", synthetic="aug"),
        "aug: every mask not in val.txt (10582 on VOC + SBD); oslsm: train.txt + "
        "train_noval.txt, PFENet/BAM's 5953 (PROTOCOL.md 2.2)",
        choices=["aug", "oslsm"],
    )
    add(
        "--coco-split",
        "interleaved",
        "COCO-20i folds: interleaved is PFENet/BAM/HSNet's (PROTOCOL.md 1.2)",
        choices=["interleaved", "contiguous"],
    )
    if stage != "pretrain":  # the pixel rule and the test geometry belong to episodes
        add(
            "--min-pixels",
            dict(pascal=2048, coco=2048, synthetic=128),
            "pixel rule of the support pools (PROTOCOL.md 3.1)",
            type=POSITIVE,
        )
    if stage not in ("pretrain", "verify"):
        add(
            "--test-size",
            dict(pascal=473, coco=641, synthetic=64),
            "test canvas side (PROTOCOL.md 5.1)",
            type=SIZE,
        )
        add(
            "--test-geometry",
            "pfenet",
            "pfenet: keep the aspect, longer side to --test-size, score at the original label "
            "size (PFENet/BAM); hsnet: both sides to --test-size, score there (HSNet/DCAMA, with "
            "--test-size 400) (PROTOCOL.md 5)",
            choices=["pfenet", "hsnet"],
        )
    return parser


def add_common_args(parser, dataset, stage):
    """Data, model and run flags (dataset None: no data/model defaults); --seed but in evaluate."""
    add_data_args(parser, dataset, stage)
    add = flag_group(parser, "model", dataset)
    add(
        "--backbone",
        dict(pascal="resnet50", coco="resnet50", synthetic="resnet18"),
        "resnet50v2 (PFENet/BAM's deep stem), resnet50 (torchvision's) or vgg16 (paper Sec. "
        "3.1); resnet18 for CPU runs",
        choices=BACKBONES,
    )
    add(
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
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
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
            type=SEED,
            default=321,
            help="all randomness of the run: initialisation, "
            "augmentation, training episodes (PFENet/BAM's value) (default %(default)s)",
        )
    return parser


def add_training_args(parser, dataset, source, epochs, batch, lr, crop, scale):
    """Optimisation and run-control flags of both training stages; defaults (lr: (default, help))
    from `source`."""
    add = flag_group(parser, f"optimisation ({source})", dataset)
    add("--epochs", epochs, "passes over the training data (paper Sec. 3.1)", type=POSITIVE)
    add("--batch", batch, "samples per iteration", type=POSITIVE)
    add("--lr", lr[0], lr[1], type=POSITIVE_FLOAT)
    add("--crop", crop, "training crop side (PROTOCOL.md 4.2)", type=SIZE)
    add("--scale", scale, "RandScale range (PROTOCOL.md 4.2)", type=POSITIVE_FLOAT, nargs=2)
    add("--momentum", 0.9, "SGD momentum (PROTOCOL.md 7.1)", type=UNIT)
    add("--wd", 1e-4, "SGD weight decay (PROTOCOL.md 7.1)", type=bounded(float, 0.0))
    add(
        "--power",
        0.9,
        "power of the poly lr schedule, per iteration (PROTOCOL.md 7.1)",
        type=bounded(float, 0.0),
    )
    g = parser.add_argument_group("run control")
    add = functools.partial(add_flag, g, dataset)
    add("--out", None, "run folder: last.pt, log.jsonl (default runs/<stage>-<dataset>-fold<F>...)")
    g.add_argument(
        "--max-iters",
        type=POSITIVE,
        help="stop after this many iterations; the lr schedule is unchanged",
    )
    add("--log-every", 20, "iterations between progress lines", type=POSITIVE)
    add("--save-every", 200, "iterations between checkpoints", type=POSITIVE)
    g.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt (a fresh start if none yet); a folder "
        "holding a checkpoint is never started again without it. A resumed run is the run it "
        "continues: every flag must be the checkpoint's but --max-iters, --log-every, "
        "--save-every, --workers, --device, --data-root (the same data elsewhere), --benchmark "
        "and --vis-clusters",
    )
    add(
        "--select",
        "last",
        "last: the final model (honest); best-val: also keep best.pt, the best "
        "validation on the val images, as BAM and PFENet do (PROTOCOL.md 8.1)",
        choices=["last", "best-val"],
    )
    add("--benchmark", 0, "time N steps (data / network, peak memory) and exit", type=NON_NEGATIVE)


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
        type=SEED,
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
    seeds = getattr(args, "seeds", [])
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise KitError(
            f"--seeds {' '.join(map(str, seeds))}: {repeated[0]} is given twice; each seed is one "
            "evaluation of its own episodes, so pass distinct seeds"
        )
    scale = getattr(args, "scale", None)
    if scale and scale[0] > scale[1]:
        raise KitError(f"--scale {scale[0]} {scale[1]}: give the range low first (--scale MIN MAX)")
    if out_name and args.out is None:
        args.out = os.path.join("runs", out_name)
    check_paths(args, outputs)
    args.flags = dict(vars(args))
    args.device = setup_device(args.device)
    args.amp = precision_of(args.precision, torch.device(args.device))
    args.novel = novel_classes(args.dataset, args.fold, args.coco_split)
    args.base = base_classes(args.dataset, args.fold, args.coco_split)
    return args


FOLDERS = {"run", "own images", "pictures"}  # what the kit writes into a folder


def check_paths(args, outputs=(), inputs=()):
    """outputs: (flag, what the kit writes there) per path the run writes; inputs: flags naming
    files it reads. Before the work: every output can be written, no two share a path, and an
    existing one is replaced only if the kit wrote it in an earlier run of the same kind
    (replaceable); own images never replace a file (they take new names)."""
    taken = {}
    for flag, what in outputs:
        path = getattr(args, flag[2:].replace("-", "_"))
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in taken:
            raise KitError(f"{flag} {path} is {taken[real]}'s path too: give each output its own")
        taken[real] = flag
        check_writable(flag, path, folder=what in FOLDERS)
        if os.path.exists(path):
            replaceable(flag, path, what)
    for flag in inputs:
        for path in getattr(args, flag[2:].replace("-", "_")) or []:
            if not os.path.isfile(path) or not os.access(path, os.R_OK):
                raise KitError(f"{flag} {path}: no such readable file")


def check_writable(flag, path, folder):
    """A path the run can make: the right type if it exists, in a writable folder, not too long."""
    if os.path.exists(path) and os.path.isdir(path) != folder:
        want = "folder" if folder else "file"
        raise KitError(
            f"{flag} {path} is a {'file' if folder else 'folder'}: pass the {want} to write"
        )
    full = os.path.abspath(path)
    near = full
    while not os.path.exists(near):
        near = os.path.dirname(near)
    # the path itself (an existing file) or the folder it would be made in
    writable = os.path.isdir(near) or near == full
    if not writable or not os.access(near, os.W_OK):
        raise KitError(
            f"{flag} {path} cannot be written ({near} is not a writable folder): choose "
            "another path"
        )
    folder_of_near = near if os.path.isdir(near) else os.path.dirname(near)
    longest = max(len(part) for part in full.split(os.sep))
    if longest > os.pathconf(folder_of_near, "PC_NAME_MAX"):
        raise KitError(f"{flag}: a name in {path} is longer than this file system allows")
    if len(full) >= os.pathconf(folder_of_near, "PC_PATH_MAX"):
        raise KitError(f"{flag}: {path} is longer than this file system allows")


RUN_FILES = ("last.pt", "best.pt", "args.json", "log.jsonl", "centres.json", ".lock")  # a run's
PICTURE = re.compile(r"episode\d{3}_class\d+\.png")  # evaluate.py --vis's file names
CURVES_MARK = "BCPT kit: evaluate.py --curves"  # the PNG text of a training-curves picture


def replaceable(flag, path, what):
    """An existing output: stop with one line unless the kit wrote it in an earlier run of the
    same kind (what: 'results:<method>', 'episodes', 'pictures', 'curves'); a run folder is
    check_run_folder's, and own images never replace a file."""
    if what in ("run", "own images"):
        return
    if what == "pictures":
        strangers = [name for name in sorted(os.listdir(path)) if not PICTURE.fullmatch(name)]
        if strangers:
            raise KitError(
                f"{flag} {path} holds {strangers[0]}, which evaluate.py --vis did not write: "
                "choose a new or empty folder"
            )
        return
    move = "choose another path, or move it away"
    folder = os.path.dirname(os.path.abspath(path))
    is_run = any(os.path.exists(os.path.join(folder, f)) for f in ("last.pt", "args.json"))
    if os.path.basename(path) in RUN_FILES and is_run:
        raise KitError(f"{flag} {path} is a file of the run in {folder}: {move}")
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PK\x03\x04":  # torch.save's zip container
        raise KitError(f"{flag} {path} is a checkpoint: {move}")
    if not written_by_kit(path, what):
        kind = what.replace("results:", "results of ")
        raise KitError(f"{flag} {path} exists and is not {kind} written by this kit: {move}")


def written_by_kit(path, what):
    """Whether an existing file is the kit's output of this kind."""
    if what == "curves":
        try:
            with Image.open(path) as im:
                return im.info.get("Software") == CURVES_MARK
        except OSError:
            return False
    with open(path, errors="replace") as f:
        first = f.readline()
        rest = first + f.read() if what.startswith("results") else ""
    if what == "episodes":  # an empty log, or one line per episode
        record = parse_json_line(first) if first else {"phase": ""}
        return isinstance(record, dict) and {"phase", "seed", "index"} <= set(record)
    try:
        results = json.loads(rest)
    except ValueError:
        return False
    method = what.split(":", 1)[1]
    return isinstance(results, dict) and "run" in results and results.get("method") == method


def open_data(args, splits=("train", "val"), kind="benchmark"):
    """{split: (ids, per-class pixel counts)} of the splits a stage reads (no other list is opened);
    draws a synthetic world (kind benchmark or standin) on first use, and records its checksum in
    args.world_checksum."""
    made_by = root_made_by(args.data_root)
    if args.dataset not in SYNTHETIC_ROOTS and made_by and made_by != args.dataset:
        raise KitError(
            f"--data-root {args.data_root} holds {made_by} data (its marker says so), not "
            f"{args.dataset}: pass --dataset {made_by}, or the --data-root of {args.dataset} data"
        )
    if args.dataset in SYNTHETIC_ROOTS:
        made = ensure_synthetic(args.data_root, args.dataset, kind) or {}
        args.world_checksum = made.get("checksum")
        print(
            f"world: {args.dataset} {made.get('kind', 'from your images')} at {args.data_root}, "
            f"checksum {args.world_checksum}"
        )
    train, val = image_pools(args.data_root, args.train_pool, "train" in splits, "val" in splits)
    pools = {"train": train, "val": val}
    n = N_CLASSES[args.dataset]
    data = {
        k: (pools[k], class_pixel_counts(args.data_root, pools[k], n, args.workers)) for k in splits
    }
    sizes = ", ".join(f"{k} {len(ids)} images" for k, (ids, _) in data.items())
    print(
        f"data: {args.data_root} {sizes} (train pool {args.train_pool}); fold {args.fold} novel "
        f"{args.novel}"
    )
    return data


# ============ 2. Several processes (torchrun): one per device; rank 0 prints and writes ===
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
    name = flag
    if flag == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise KitError(f"--device {flag}: not a device; pass auto, cpu, cuda or cuda:N") from None
    count = torch.cuda.device_count()
    if device.type == "cuda" and (device.index or 0) >= count:
        choices = "cpu or cuda:0" if count else "cpu"
        raise KitError(
            f"--device {flag}: this machine has {count} CUDA device(s) that torch can use; pass "
            f"--device {choices}"
        )
    if launched and device.type == "cuda":
        device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}")
        torch.cuda.set_device(device)
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(cpu_threads())
    if launched and world() == 1:
        dist.init_process_group("gloo" if device.type == "cpu" else "nccl")
        # else gloo's threads may abort the process as it exits
        atexit.register(dist.destroy_process_group)
    if rank() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (open for the life of the process)
    return str(device)


def cpu_threads():
    """torch's threads on the CPU unless OMP_NUM_THREADS says: half the cores this process may use
    (the other half feeds the data loaders), at least 1: torch's own default, one thread per core,
    stalls when other work holds some of the cores."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))
    else:
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def all_reduce_sum(t):
    """t summed over the processes (t itself for one), on t's device; NCCL reduces on the GPU."""
    if world() == 1:
        return t
    where = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    x = t.to(where).clone()
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
    ddp = torch.nn.parallel.DistributedDataParallel
    # torch >= 2.14 names the option forward_sync_buffers
    option = "broadcast_buffers"
    if "forward_sync_buffers" in inspect.signature(ddp).parameters:
        option = "forward_sync_buffers"
    device_ids = [device.index] if device.type == "cuda" else None
    return ddp(model, device_ids=device_ids, **{option: False})


def global_mean(loss, logits, target, n=None):
    """loss(logits, target) as this process's share of its mean over the n labelled entries of the
    global batch (n: the target's entries but 255), the shares adding up to the one-process loss
    (Trainer.optimise scales to match)."""
    if world() == 1:
        return loss(logits, target)
    n = (target != IGNORE).sum() if n is None else n
    return loss(logits, target, reduction="sum") / all_reduce_sum(n.float()).clamp(min=1)


ce_ignoring_255 = functools.partial(torch.nn.functional.cross_entropy, ignore_index=IGNORE)
global_mean_ce = functools.partial(global_mean, ce_ignoring_255)  # cross-entropy ignoring 255


def stream_batches(n, batch, seed, start_iter, total_iters, rank=0, world=1):
    """The index lists of iterations start_iter .. total_iters - 1: iteration t takes items t*B ..
    (t+1)*B - 1 of an endless stream of per-epoch permutations seeded by (seed, epoch), so a resumed
    run sees the batches a straight one would; rank r of W takes its B / W of each global batch."""

    @functools.lru_cache(2)  # a batch spans at most two epochs when it is no larger than one
    def permutation(epoch):
        return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch))

    local = batch // world
    for first in range(start_iter * batch + rank * local, total_iters * batch, batch):
        positions = range(first, first + local)  # this rank's share of batch t in the stream
        # position pos is item pos % n of epoch pos // n (the dataset takes the index % n)
        yield [pos // n * n + int(permutation(pos // n)[pos % n]) for pos in positions]


def stream_loader(dataset, batch, seed, start_iter, total_iters, workers, device):
    """Batches of iterations start_iter .. total_iters - 1 (under torchrun, this rank's share)."""
    if batch % world():
        raise KitError(
            f"--batch {batch} is the global batch: it must split evenly over the {world()} "
            "processes"
        )
    batches = stream_batches(len(dataset), batch, seed, start_iter, total_iters, rank(), world())
    cuda = device.type == "cuda"
    own = torch.Generator().manual_seed(seed)  # the workers' base seed: not the global RNG
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=cuda and workers > 0,
        generator=own,
    )


# ============ 3. Precision: autocast in a dtype, the sensitive steps in float32 (common.fp32) ===
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


# autocast dtype of a resolved --precision
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    # lists, not arrays: weights_only loads them
    name, keys, pos, has_gauss, cached = np.random.get_state()
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
# The flags a resumed run may change: where and how fast it runs, never what is trained or how.
MAY_CHANGE_ON_RESUME = {"out", "resume", "max_iters", "log_every", "save_every", "workers"}
MAY_CHANGE_ON_RESUME |= {"device", "data_root", "benchmark", "vis_clusters"}


def check_run_folder(args, stage):
    """Before anything is written: a folder holding a checkpoint is continued only by the same
    stage, with --resume and the same flags but those MAY_CHANGE_ON_RESUME; another stage's folder
    is refused. -> the checkpoint to resume from, or None."""
    path = os.path.join(args.out, "last.pt")
    record = os.path.join(args.out, "args.json")
    fresh = "choose a new --out"
    other = stage
    if os.path.isfile(record) and os.path.getsize(record):
        other = read_json(record, "--out").get("stage", stage)
    if other != stage:
        raise KitError(f"--out {args.out} holds a {other} run, not a {stage} run: {fresh}")
    if not os.path.isfile(path):
        return None
    ckpt = load_checkpoint(path)
    if "stage" not in ckpt or "args" not in ckpt:
        raise KitError(
            f"--out {args.out} holds {path}, which is not a checkpoint of a run of this kit (a "
            f"state dict?): move it away, or {fresh}"
        )
    other = ckpt.get("stage")
    total = ckpt.get("args", {}).get("total_iters")
    when = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(path)))
    what = f"a {other} run at iteration {ckpt.get('iter')} of {total} ({path}, {when})"
    if other != stage:
        raise KitError(f"--out {args.out} holds {what}, not a {stage} run: {fresh}")
    if not args.resume:
        raise KitError(f"--out {args.out} holds {what}: add --resume to continue it, or {fresh}")
    saved = ckpt["args"].get("flags", ckpt["args"])  # the flags as parsed, before derived values
    for key, value in args.flags.items():
        if key in MAY_CHANGE_ON_RESUME or saved.get(key, value) == value:
            continue
        flag = "--" + key.replace("_", "-")
        raise KitError(
            f"--resume: {path} was made with {flag} {saved[key]} but this run has {flag} {value}: "
            f"a resumed run is the run it continues; pass {flag} {saved[key]}, or {fresh}"
        )
    if total is not None and total != args.total_iters:  # the same flags, other data
        raise KitError(
            f"--resume: {path} is a run of {total} iterations but the data at --data-root "
            f"{args.data_root} give {args.total_iters}: pass the run's data, or {fresh}"
        )
    return ckpt


@contextlib.contextmanager
def run_folder(out):
    """One run per folder: rank 0 holds an exclusive lock on OUT/.lock (naming its process) while
    the run lasts; a second run stops at once; a killed run's lock (freed by the kernel) is taken
    over, its temp files removed."""
    f = None
    err = None
    if is_main():
        os.makedirs(out, exist_ok=True)
        f = open(os.path.join(out, ".lock"), "a+")  # noqa: SIM115 (locked while it is open)
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
        # a killed run's half-written files (write_atomic's names); nothing else
        for name in os.listdir(out):
            if re.fullmatch(
                r"(last\.pt|best\.pt|args\.json|log\.jsonl|centres\.json)\.tmp\d+", name
            ):
                os.remove(os.path.join(out, name))
        f.truncate(0)  # (appends go to the end of the file)
        print(f"process {os.getpid()} on {platform.node()}", file=f, end="", flush=True)
    try:
        yield out
    finally:
        if f:
            # an empty lock file means a clean end; the file stays so lockers share one inode
            f.truncate(0)
            f.close()


def git(*args):
    """The output of a git command run on the kit's own folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True)
    return done.stdout.strip()


def run_record(args, data=None):
    """What ran where: UTC time, host, versions, device, world size, the kit's git commit and
    whether its tree was dirty, the data root, its pool sizes and world checksum (args.json, and
    "run" in results files)."""
    try:
        commit = git("rev-parse", "HEAD") or None
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
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
        "threads": torch.get_num_threads(),
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

    def __init__(self, args, stage, model, opt, base_lrs):
        self.args = args
        self.stage = stage
        self.model = model
        self.opt = opt
        self.base_lrs = base_lrs  # one per parameter group
        self.device = torch.device(args.device)
        self.dtype = AMP_DTYPES[args.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.path = os.path.join(args.out, "last.pt")
        self.log = os.path.join(args.out, "log.jsonl")
        self.best = {"miou": -1.0, "iter": 0}
        self.skipped = False  # whether the last optimise() met a non-finite loss
        self.saved = 0  # the iteration of the last checkpoint

    def optimise(self, loss):
        """The optimiser step (fp16: scaled; the gradient summed over the processes) if the loss is
        finite on every process, as all agree so none hangs. -> whether a step was taken."""
        self.skipped = all_reduce_sum(torch.tensor([float(not torch.isfinite(loss))])).item() > 0
        if not self.skipped:
            self.opt.zero_grad(set_to_none=True)
            with torch.autocast(self.device.type, enabled=False):
                # DDP averages the ranks' gradients: this makes it a sum
                self.scaler.scale(loss * world()).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        return not self.skipped

    def save(self, t, path=None, **extra):
        """Called by every process: RNG states gathered, rank 0 writes the file, all wait for it."""
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
        args = self.args
        argv = sys.argv[1:] if argv is None else list(argv)
        # nothing is written before every check has passed
        ckpt = check_run_folder(args, self.stage)
        with run_folder(args.out):
            if ckpt is None and os.path.isfile(self.path):  # another run wrote it since the check
                ckpt = check_run_folder(args, self.stage)
            if is_main():
                derived = {
                    k: v for k, v in vars(args).items() if k not in args.flags and k != "flags"
                }
                record = {
                    "stage": self.stage,
                    "argv": argv,
                    "flags": args.flags,
                    "derived": derived,
                    "run": run_record(args, data),
                }
                write_atomic(os.path.join(args.out, "args.json"), save_text, record)
            if ckpt:
                self.resume(ckpt)
            elif args.resume:
                print(f"--resume: no {self.path} yet, starting from iteration 0")
            loader = stream_loader(
                dataset, args.batch, args.seed, self.saved, stop, args.workers, self.device
            )
            batches = iter(loader)
            self.start_log()
            self.model.train()
            try:
                self.loop(batches, stop, step, validate, val_every, log_extra)
            except KeyboardInterrupt:
                script = {"pretrain": "pretrain_bcpt.py", "metatrain": "metatrain.py"}[self.stage]
                if self.saved:
                    last = f"the last checkpoint is {self.path} (iteration {self.saved})"
                else:
                    last = "no checkpoint was written yet (the first comes at iteration "
                    last += f"{args.save_every})"
                command = argv if args.resume else argv + ["--resume"]
                raise KeyboardInterrupt(
                    f"interrupted: {last}; continue with: python {script} {shlex.join(command)}"
                ) from None
            print(f"saved {self.path}")

    def resume(self, ckpt):
        """Model, optimiser, scaler, best validation and every RNG where a straight run has it, each
        rank's own."""
        self.model.load_state_dict(ckpt["model"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.best = ckpt.get("best", self.best)
        self.saved = ckpt["iter"]
        print(f"resumed from {self.path} at iteration {ckpt['iter']}")
        ranks = ckpt.get("rng_ranks", [ckpt["rng"]])
        if len(ranks) == world():
            set_rng_state(ranks[rank()])
            return
        print(
            f"note: {self.path} was written by {len(ranks)} processes, this run has {world()}: "
            "every rank continues from rank 0's RNG state, so the run is not an exact continuation"
        )
        set_rng_state(ranks[0])

    def loop(self, batches, stop, step, validate, val_every, log_extra):
        """The iterations: poly lr, step, NaN stop, progress lines, validation, checkpoints."""
        args = self.args
        for t, batch in enumerate(batches, self.saved):
            # poly, every iteration (PROTOCOL.md 7.1)
            for group, base_lr in zip(self.opt.param_groups, self.base_lrs, strict=True):
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
            done = t + 1
            if done % args.log_every == 0 or done == stop:
                lr = self.opt.param_groups[0]["lr"]
                self.progress(done, stop, loss=loss, lr=lr, **metrics, **log_extra())
            best_val = validate and args.select == "best-val"
            if best_val and (done % val_every == 0 or done == args.total_iters):
                self.keep_best(done, *validate())
            if done % args.save_every == 0 or done == stop:
                self.save(done)
                self.saved = done

    def start_log(self):
        """Cut log.jsonl back to steps <= the start (lines a kill cut off dropped with a note): a
        resumed run logs no step twice, a fresh one starts empty; start the progress clock."""
        self.t0 = time.time()
        self.start = self.saved
        if is_main() and os.path.exists(self.log):
            with open(self.log) as f:
                records = [(line, parse_json_line(line)) for line in f]
            cut = sum(r is None for _, r in records)
            if cut:
                print(f"note: {self.log}: dropped {cut} line(s) cut off by a kill")
            kept = [line for line, r in records if r and r.get("step", 0) <= self.start]
            write_atomic(self.log, save_text, "".join(kept))

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
        """--select best-val, after validating at iteration t: log it; best.pt if it is the best."""
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
        n = self.args.benchmark
        batch = self.args.batch
        cuda = self.device.type == "cuda"
        sample_ms = 1000 * timeit.timeit(lambda: [dataset[i] for i in range(8)], number=1) / 8
        loader = stream_loader(
            dataset, batch, self.args.seed, 0, n + 1, self.args.workers, self.device
        )
        batches = iter(loader)
        self.model.train()
        call = functools.partial(autocast_call, self.device, self.dtype, step)
        call(next(batches))  # a warm-up step, not counted
        if cuda:
            torch.cuda.synchronize()
        spent = np.zeros(2)  # seconds waiting for batches, seconds in the step
        prof = cProfile.Profile()
        for _ in range(n):
            t0 = time.perf_counter()
            item = next(batches)
            t1 = time.perf_counter()
            prof.runcall(call, item)
            if cuda:
                torch.cuda.synchronize()
            spent += [t1 - t0, time.perf_counter() - t1]
        data, net = 1000 * spent / n
        inside = 1000 * sum(s[3] for f, s in pstats.Stats(prof).stats.items() if f[2] in inner) / n
        mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux counts KiB)
        if cuda:
            mem = torch.cuda.max_memory_allocated() / 2**20
        share = ""
        if inner:
            share = f", of which {'/'.join(inner)} {inside:.2f} ms = {100 * inside / net:.2f}%"
        print(
            f"benchmark {what} on {self.device}: {data + net:.1f} ms/step = data {data:.1f} + "
            f"network {net:.1f}{share}; peak memory {mem:.0f} MiB",
            flush=True,
        )
        workers = math.ceil(batch * sample_ms / net)
        print(
            f"one sample takes {sample_ms:.1f} ms to load and augment on one core: {batch} per "
            f"step need {workers} workers to keep up with this {net:.0f} ms step"
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
        # a worker's KitError arrives as a traceback whose last line is its message
        message = str(e).strip().splitlines()[-1].replace("common.KitError: ", "")
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        print(f"stopped: {str(e) or 'interrupted; nothing of this run was saved'}", file=sys.stderr)
        sys.exit(130)
