"""reproduce.py: one command per paper table. It works out every run the tables need, prints the
plan (each run's state and an estimated cost from a short timing on this machine), runs what is
not done (a stopped run resumes, a failed one is reported while the rest go on) and ends with the
tables beside the paper, with paired intervals for the gaps between rows.

  Table 1  ImageNet, Standard and BCPT backbones, ASPP-PFENet meta-trained on each (--shots)
  Table 2  the same backbones without meta-training: the non-parametric test, 1-shot
  Table 3  the components: Standard (neither), BMC (--no-guidance), BMC + OCG (BCPT), 5-shot
  Table 4  the number of centres: K = 2, 3, 6 (BCPT), 5-shot
Each pre-training runs once and serves every table that uses it; --rows picks some rows only,
and gives Tables 1 and 2 any backbone (a random-init one, or the ablations'). On PASCAL / COCO
the ImageNet row is --weights (torchvision's ImageNet weights, or PFENet/BAM's
initmodel/resnet50_v2.pth with --backbone resnet50v2); on a synthetic world it is the world's
ImageNet stand-in, trained here once (pretrain_bcpt.py --method generic), and --seeds repeats
the grid per training seed.

Full grid (one CUDA GPU per job):
    python reproduce.py --table 1 --dataset pascal --data-root data/pascal --folds 0 1 2 3 \\
        --shots 1 5 --backbone resnet50v2 --weights initmodel/resnet50_v2.pth
The miniature on a CPU (two single-thread jobs at a time):
    python reproduce.py --table 1 2 --dataset synthetic --seeds 0 1 2 --jobs 2
--dry-run prints the plan and the exact commands and runs nothing; --no-estimate skips the timing.
Runs live under --runs (default runs/reproduce/<dataset>), each with its own log in <runs>/logs.
"""

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

import torch

import plumbing
from common import N_CLASSES, KitError, load_checkpoint
from evaluation import format_table, read_results
from plumbing import POSITIVE, SEED, KitParser, read_json

HERE = os.path.dirname(os.path.abspath(__file__))
ROW_FLAGS = {  # pretrain_bcpt.py's flags for each row's backbone (the ImageNet row has none)
    "standard": ["--method", "standard"],
    "bcpt": ["--method", "bcpt"],
    "bmc": ["--method", "bcpt", "--no-guidance"],
    "k2": ["--method", "bcpt", "--K", "2"],
    "k3": ["--method", "bcpt", "--K", "3"],
}
TABLE_ROWS = {  # the rows of each table, as the paper has them
    1: ["imagenet", "standard", "bcpt"],
    2: ["imagenet", "standard", "bcpt"],
    3: ["standard", "bmc", "bcpt"],
    4: ["k2", "k3", "bcpt"],
}
ROWS = ["imagenet", "standard", "bcpt", "bmc", "k2", "k3", "random"]  # "random": random init


def parse_args(argv):
    p = KitParser(__doc__)
    p.add_argument("--table", type=int, nargs="+", required=True, choices=[1, 2, 3, 4])
    p.add_argument("--dataset", default="synthetic", choices=list(N_CLASSES))
    p.add_argument("--data-root", help="the stages' --data-root (default: theirs)")
    p.add_argument("--folds", type=int, nargs="+", default=[0], choices=[0, 1, 2, 3])
    p.add_argument(
        "--shots", type=POSITIVE, nargs="+", default=[1], help="Table 1's shots (default 1)"
    )
    p.add_argument(
        "--seeds",
        type=SEED,
        nargs="+",
        default=[321],
        help="training seeds: the whole grid once per seed (default %(default)s, the stages')",
    )
    p.add_argument(
        "--rows",
        nargs="+",
        choices=ROWS,
        help="these rows only; Tables 1 and 2 take any row (random: a random-init backbone; "
        "bmc, k2, k3: the ablations' backbones), Tables 3 and 4 their own",
    )
    p.add_argument("--backbone", help="the stages' --backbone (default: theirs)")
    p.add_argument(
        "--weights",
        help="the ImageNet row's backbone and the start of every pre-training (default: imagenet "
        "on PASCAL/COCO, the world's stand-in, trained here, on a synthetic world)",
    )
    p.add_argument("--episodes", type=POSITIVE, help="the tests' --episodes (default: theirs)")
    p.add_argument(
        "--eval-seeds", type=SEED, nargs="+", help="the tests' --seeds (default: theirs)"
    )
    p.add_argument("--pretrain-flags", default="", help="more flags for every pre-training")
    p.add_argument("--metatrain-flags", default="", help="more flags for every meta-training")
    p.add_argument("--runs", help="the folder of every run (default runs/reproduce/<dataset>)")
    p.add_argument("--jobs", type=POSITIVE, default=1, help="runs at once (default %(default)s)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and commands only")
    p.add_argument(
        "--no-estimate", action="store_true", help="skip the timing: the plan shows no cost"
    )
    args = p.parse_args(argv)
    if args.dataset in ("pascal", "coco") and not args.data_root:
        raise KitError(f"--data-root is required for --dataset {args.dataset}")
    if len(set(args.seeds)) < len(args.seeds):
        raise KitError(f"--seeds {' '.join(map(str, args.seeds))}: give each seed once")
    args.runs = args.runs or os.path.join("runs", "reproduce", args.dataset)
    return args


# ============ 1. The plan: every run the tables need, each once ============
@dataclasses.dataclass
class Run:
    """One command of the grid: a training run (its output a run folder) or a test (a JSON)."""

    name: str  # e.g. pretrain/bcpt-f0-s321
    script: str
    argv: list
    output: str
    needs: list  # the names of the runs it starts after
    episodes: int = 0  # a test's episodes, every seed and pass
    probe_argv: list = None  # what a timing probe runs instead (an evaluation: its meta-training)
    state: str = "to do"  # done, stopped at iteration i of n, to do, failed, blocked
    seconds: float = 0.0  # the estimated cost of what is left

    @property
    def training(self):
        return not self.output.endswith(".json")

    def command(self):
        return [sys.executable, os.path.join(HERE, self.script), *self.argv]

    def shown(self):
        """The command as a user types it, from the folder this one runs in."""
        script = os.path.relpath(os.path.join(HERE, self.script))
        return shlex.join(["python", script, *self.argv])


class Plan:
    """The runs of the requested tables, keyed by name, in the order they were added."""

    def __init__(self, args):
        self.args = args
        self.runs = {}
        self.tables = {table: [] for table in args.table}  # {table: [the tests' JSON paths]}
        self.common = ["--dataset", args.dataset]
        if args.data_root:
            self.common += ["--data-root", args.data_root]
        if args.backbone:
            self.common += ["--backbone", args.backbone]
        self.test_flags = []
        if args.episodes:
            self.test_flags += ["--episodes", str(args.episodes)]
        if args.eval_seeds:
            self.test_flags += ["--seeds", *map(str, args.eval_seeds)]
        # the tests' episodes: the stages' defaults are BAM's 1000 episodes x 5 seeds
        self.episodes = (args.episodes or 1000) * len(args.eval_seeds or range(5))
        for seed in args.seeds:
            for fold in args.folds:
                for table in args.table:
                    self.add_table(table, fold, seed)

    def add(self, run):
        """A run, once: a second request of the same name is the same run."""
        return self.runs.setdefault(run.name, run)

    def path(self, *parts):
        return os.path.join(self.args.runs, *parts)

    def imagenet(self):
        """(the ImageNet row's weights, the run that makes them or None)."""
        if self.args.weights:
            return self.args.weights, None
        if self.args.dataset not in ("synthetic", "synthetic2"):
            return "imagenet", None
        out = self.path("standin")
        # on the world's stand-in root (its default): never the benchmark's --data-root
        flags = ["--dataset", self.args.dataset, "--method", "generic"]
        if self.args.backbone:
            flags += ["--backbone", self.args.backbone]
        flags += ["--seed", str(self.args.seeds[0]), "--out", out, "--resume"]
        run = self.add(Run("standin", "pretrain_bcpt.py", flags, out, []))
        return os.path.join(out, "last.pt"), run

    def backbone(self, row, fold, seed):
        """(the --pretrained of a row's backbone, the names of the runs it needs)."""
        weights, standin = self.imagenet()
        start = [standin.name] if standin else []
        if row == "imagenet":
            return weights, start
        if row == "random":
            return "none", []
        out = self.path("pretrain", f"{row}-f{fold}-s{seed}")
        flags = [*ROW_FLAGS[row], "--fold", str(fold), "--seed", str(seed), "--weights", weights]
        flags += ["--out", out, "--resume", *shlex.split(self.args.pretrain_flags)]
        run = Run(
            f"pretrain/{row}-f{fold}-s{seed}", "pretrain_bcpt.py", self.common + flags, out, start
        )
        self.add(run)
        return os.path.join(out, "last.pt"), [run.name]

    def add_table(self, table, fold, seed):
        rows = TABLE_ROWS[table]
        if self.args.rows and table in (1, 2):  # any backbone, meta-trained or not
            rows = self.args.rows
        elif self.args.rows:
            rows = [r for r in rows if r in self.args.rows]
        for row in rows:
            weights, needs = self.backbone(row, fold, seed)
            if table == 2:
                self.add_test(table, row, fold, seed, weights, needs)
                continue
            shots = self.args.shots if table == 1 else [5]  # Tables 3 and 4 are 5-shot
            for shot in shots:
                self.add_meta(table, row, fold, seed, shot, weights, needs)

    def add_test(self, table, row, fold, seed, weights, needs):
        """Table 2's non-parametric test of a backbone; the ImageNet row's backbone is the same
        for every training seed, so it is tested once."""
        tag = f"{row}-f{fold}" if row == "imagenet" else f"{row}-f{fold}-s{seed}"
        json_path = self.path("np", f"{tag}.json")
        flags = ["--fold", str(fold), "--seed", str(seed), "--pretrained", weights]
        flags += ["--json", json_path, *self.test_flags]
        name = f"np/{tag}"
        if name in self.runs:
            return
        test = Run(name, "nonparametric_eval.py", self.common + flags, json_path, needs)
        test.episodes = 2 * self.episodes  # the novel classes', then the base classes' pass
        self.add(test)
        self.tables[table].append(json_path)

    def add_meta(self, table, row, fold, seed, shot, weights, needs):
        """Meta-training on a backbone, then its evaluation (Tables 1, 3, 4)."""
        tag = f"{row}-f{fold}-{shot}shot-s{seed}"
        out = self.path("meta", tag)
        flags = ["--fold", str(fold), "--shot", str(shot), "--seed", str(seed)]
        flags += ["--pretrained", weights, "--out", out, "--resume"]
        flags += shlex.split(self.args.metatrain_flags)
        meta = self.add(Run(f"meta/{tag}", "metatrain.py", self.common + flags, out, needs))
        json_path = self.path("eval", f"{tag}.json")
        flags = [
            "--checkpoint",
            os.path.join(out, "last.pt"),
            "--json",
            json_path,
            *self.test_flags,
        ]
        test = Run(f"eval/{tag}", "evaluate.py", flags, json_path, [meta.name], self.episodes)
        test.probe_argv = meta.argv
        self.add(test)
        self.tables[table].append(json_path)


# ============ 2. Where each run stands: done, stopped at iteration i, to do ============
def flag_value(argv, flag):
    """The value a command line gives a flag (its last occurrence), or None."""
    values = [argv[k + 1] for k, a in enumerate(argv[:-1]) if a == flag]
    return values[-1] if values else None


def state_of(run):
    """done / stopped at iteration i of n / to do, from the run's own output."""
    if not run.training:
        try:
            read_results(run.output)
        except KitError:  # missing, or not (yet) a whole results file
            return "to do"
        return "done"
    path = os.path.join(run.output, "last.pt")
    if not os.path.isfile(path):
        return "to do"
    ckpt = load_checkpoint(path, mmap=True)
    stop = ckpt["args"]["total_iters"]
    asked = flag_value(run.argv, "--max-iters")
    if asked:
        stop = min(stop, int(asked))
    if ckpt["iter"] >= stop:
        return "done"
    return f"stopped at iteration {ckpt['iter']} of {stop}"


# ============ 3. The cost: a few timed steps of each kind of run on this machine ============
def timed(command, env):
    """Run a short command to its end in a job's environment (its threads, its GPU); -> (its
    stdout, wall seconds)."""
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        last = (done.stderr.strip().splitlines() or ["(no message)"])[-1]
        raise KitError(f"timing {command[1]} failed: {last}")
    return done.stdout, time.perf_counter() - t0


def found(pattern, text):
    """The first number `pattern` catches in a timed run's output."""
    match = re.search(pattern, text)
    if match is None:
        raise KitError(f"timing: no {pattern!r} in a timed run's output: please report this")
    return float(match.group(1))


def for_timing(argv):
    """A run's flags without its outputs, its --resume and its weights (a probe uses none)."""
    probe = []
    k = 0
    while k < len(argv):
        if argv[k] in ("--out", "--json", "--checkpoint", "--weights", "--pretrained"):
            k += 2
            continue
        if argv[k] != "--resume":
            probe.append(argv[k])
        k += 1
    return probe


def estimate(plan, jobs):
    """Each unfinished run's seconds: a training run's steps left times its seconds per step from
    --benchmark 2, a test's episodes over the speed of a 10-episode test of its kind, each plus
    the start-up those probes took. One probe per kind of run (its flags but outputs, weights
    and the training seed, which change no cost)."""
    probes = {}
    with tempfile.TemporaryDirectory() as scratch:
        for run in plan.runs.values():
            if run.state == "done":
                continue
            kind = (run.script, *without_seed(for_timing(run.probe_argv or run.argv)))
            if kind not in probes:
                print(f"timing {run.script} {shlex.join(kind[1:])} ...", flush=True)
                try:
                    probes[kind] = probe(run, scratch, environments(jobs)[0])
                except KitError as e:  # the run itself will fail and be reported
                    print(f"note: no estimate for such runs: {e}")
                    probes[kind] = None
            if probes[kind] is None:
                continue
            per_unit, startup, units = probes[kind]
            run.seconds = startup + per_unit * max(units - iterations_done(run), 0)


def without_seed(flags):
    """Flags less the training seed: runs that differ by it cost the same."""
    if "--seed" not in flags:
        return flags
    k = flags.index("--seed")
    return flags[:k] + flags[k + 2 :]


def iterations_done(run):
    match = re.match(r"stopped at iteration (\d+)", run.state)
    return int(match.group(1)) if match else 0


def probe(run, scratch, env):
    """(seconds per step or per episode, start-up seconds, steps or episodes of a whole run)."""
    python = [sys.executable]
    script = os.path.join(HERE, run.script)
    flags = for_timing(run.probe_argv or run.argv)
    if run.script in ("pretrain_bcpt.py", "metatrain.py"):
        benchmark = ["--weights", "none", "--benchmark", "2"]
        out, wall = timed(python + [script, *flags, *benchmark], env)
        per_step = found(r"([\d.]+) ms/step", out) / 1000
        steps = found(r"running to (\d+)", out)
        return per_step, max(wall - 3 * per_step, 0.0), steps
    if run.script == "nonparametric_eval.py":
        json_path = os.path.join(scratch, "np.json")
        short = ["--pretrained", "none", "--episodes", "10", "--seeds", "0", "--json", json_path]
        out, wall = timed(python + [script, *flags, *short], env)
    else:  # evaluate.py: a one-step meta-training to test
        meta = os.path.join(scratch, "meta")
        one_step = ["--pretrained", "none", "--max-iters", "1", "--out", meta]
        timed(python + [os.path.join(HERE, "metatrain.py"), *flags, *one_step], env)
        test = ["--checkpoint", os.path.join(meta, "last.pt"), "--episodes", "10", "--seeds", "0"]
        out, wall = timed(python + [script, *test], env)
    speeds = [float(s) for s in re.findall(r"([\d.]+) episodes/s", out)]  # one per pass
    per_episode = sum(1 / s for s in speeds) / len(speeds)
    return per_episode, max(wall - 10 * len(speeds) * per_episode, 0.0), run.episodes


# ============ 4. Running the grid: what is ready, up to --jobs at once ============
def environments(jobs):
    """One environment per job slot: a GPU each where there are enough, else CPU jobs sharing the
    threads one CPU run would take (plumbing.cpu_threads), at least one each."""
    gpus = torch.cuda.device_count()
    if gpus and jobs <= gpus:
        return [{"CUDA_VISIBLE_DEVICES": str(k)} for k in range(jobs)]
    threads = max(1, plumbing.cpu_threads() // jobs)
    return [{"OMP_NUM_THREADS": str(threads)} for _ in range(jobs)]


def cpu_workers(run, jobs):
    """With several CPU jobs at once, fewer loader processes each (results do not depend on it)."""
    if jobs == 1 or torch.cuda.is_available():
        return []
    return ["--workers", "1" if run.training else "0"]


def execute(plan, jobs):
    """Run every run not done, each after the runs it needs; a failure is reported, the runs
    after it are blocked, the rest go on. Each run's output goes to <runs>/logs/<name>.log."""
    waiting = [run for run in plan.runs.values() if run.state != "done"]
    free = environments(jobs)
    running = {}  # {process: (run, its environment, its log file, start time)}
    finished = 0
    while waiting or running:
        for run in ready(waiting, plan):
            if not free:
                break
            waiting.remove(run)
            running[start(run, plan, free.pop(), jobs)] = run
        time.sleep(0.5)
        for process in [p for p in running if p.poll() is not None]:
            run = running.pop(process)
            free.append(process.kit_env)
            process.kit_log.close()
            finished += 1
            report(run, process, finished, len(plan.runs))
        for run in blocked(waiting, plan):
            waiting.remove(run)
            print(f"blocked {run.name}: it needs {', '.join(run.needs)}, which did not finish")


def ready(waiting, plan):
    """The waiting runs whose needs are done, in plan order."""
    return [r for r in waiting if all(plan.runs[n].state == "done" for n in r.needs)]


def blocked(waiting, plan):
    """The waiting runs that can never start: a run they need failed or is blocked."""
    stuck = ("failed", "blocked")
    found = [r for r in waiting if any(plan.runs[n].state.startswith(stuck) for n in r.needs)]
    for run in found:
        run.state = "blocked"
    return found


def start(run, plan, env, jobs):
    log_path = os.path.join(plan.args.runs, "logs", run.name.replace("/", "_") + ".log")
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    log = open(log_path, "a")  # noqa: SIM115 (closed when the process ends, in execute)
    command = run.command() + cpu_workers(run, jobs)
    print(f"start {run.name}", flush=True)
    process = subprocess.Popen(
        command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **env}
    )
    process.kit_env = env
    process.kit_log = log
    process.kit_started = time.perf_counter()
    return process


def report(run, process, finished, total):
    minutes = (time.perf_counter() - process.kit_started) / 60
    if process.returncode == 0:
        run.state = "done"
        print(f"[{finished}/{total}] done {run.name} ({minutes:.1f} min)", flush=True)
        return
    with open(process.kit_log.name) as f:
        lines = f.read().strip().splitlines() or ["(no output)"]
    run.state = f"failed (exit {process.returncode}: {lines[-1][:160]})"
    print(f"[{finished}/{total}] FAILED {run.name}: {lines[-1]}", flush=True)


# ============ 5. The plan and the tables, printed ============
def hours(seconds):
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def print_plan(plan, jobs, commands):
    """A line per run: its name, state and estimated cost; the totals; with commands, each run's
    exact command line (copyable, in an order that respects what each run needs)."""
    print(
        f"plan: tables {' '.join(map(str, plan.args.table))} on {plan.args.dataset}, "
        f"{len(plan.runs)} runs under {plan.args.runs}"
    )
    for run in plan.runs.values():
        cost = f"  ~{run.seconds / 60:.1f} min" if run.seconds else ""
        print(f"  {run.name:40s} {run.state}{cost}")
    left = [run for run in plan.runs.values() if run.state != "done"]
    total = sum(run.seconds for run in left)
    line = f"to do: {len(left)} of {len(plan.runs)} runs"
    if total:
        line += f", about {hours(total / jobs)} on this machine with --jobs {jobs} (estimated)"
    print(line)
    if commands:
        print("commands:")
        for run in plan.runs.values():
            print("  " + run.shown())


def print_tables(plan):
    """Each requested table, from the tests that finished, beside the paper (evaluate.py --table),
    with the paired intervals of the gaps between its rows."""
    for table, paths in plan.tables.items():
        done = [p for p in paths if os.path.isfile(p)]
        print(f"\n== Table {table} ({len(done)} of {len(paths)} results) ==")
        if not done:
            continue
        print(format_table(done))
        if table == 2:
            print(f"\n== Table 2 at the threshold chosen on base classes ({len(done)} results) ==")
            print(format_table(done, "base-threshold"))


def print_centres(plan):
    """What the pre-trainings' centres hold (pretrain_bcpt.py's centres.json and log.jsonl): the
    share of the val images' novel-object pixels each backbone calls background, and for BCPT the
    centres that hold at least 1% of the merged background there, their share of novel objects
    beside the merged background's (a centre of novel objects holds more than that), and the dead
    centres (no pixel in the last log window, in the whole run)."""
    found = []
    for run in plan.runs.values():
        path = os.path.join(run.output, "centres.json")
        if run.name.startswith("pretrain/") and os.path.isfile(path):
            found.append((run, read_json(path, "centres.json")))
    if not found:
        return
    print("\n== What the centres hold: the val images after pre-training ==")
    for run, held in found:
        called = 100 * held["novel_as_background"]
        line = f"{run.name:28s} novel pixels called background {called:5.1f}%"
        if "centres" in held:
            live = [c for c in held["centres"] if c[0] >= 0.01]
            novel = " ".join(f"{100 * c[1]:.0f}%" for c in live)
            merged = sum(share * novel_share for share, novel_share, _ in held["centres"])
            last = read_log_tail(os.path.join(run.output, "log.jsonl"))
            line += f"; {len(live)} of {len(held['centres'])} centres hold >= 1% (novel: {novel}"
            line += f"; merged background {100 * merged:.0f}%)"
            line += f"; dead: {last.get('dead_centres')} in the last window, "
            line += f"{held['dead_over_run']} over the run"
        print(line)


def read_log_tail(path):
    """The last progress record of a run's log.jsonl ({} if none)."""
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else {}


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    plan = Plan(args)
    for run in plan.runs.values():  # in plan order: every run after the runs it needs
        run.state = state_of(run)
        made_again = [n for n in run.needs if plan.runs[n].state != "done"]
        if made_again and run.state != "to do":
            if run.training:  # its folder resumes the run from the earlier version of its input
                print(
                    f"note: {run.name} was made from the earlier {made_again[0]}, which is made "
                    f"again: delete {run.output} to redo it from the new one"
                )
            else:  # a test follows its model
                run.state = "to do"
    if not args.no_estimate:
        estimate(plan, args.jobs)
    print_plan(plan, args.jobs, commands=args.dry_run)
    if args.dry_run:
        return plan
    execute(plan, args.jobs)
    print_tables(plan)
    print_centres(plan)
    failed = [run.name for run in plan.runs.values() if run.state != "done"]
    if failed:
        raise KitError(
            f"{len(failed)} runs did not finish ({', '.join(failed[:4])}...): see "
            f"{os.path.join(args.runs, 'logs')}; rerun this command to resume them"
        )
    return plan


if __name__ == "__main__":
    plumbing.run(main)
