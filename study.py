"""Run experiments and named variants of them with several seeds, evaluate them, and write OUT/results.md.

    python study.py [--scale=auto|paper|cpu] [--minutes=3 | --steps=N] [--data=PATH] [--out=runs/study]
                    [--seeds=1] [--only=NAME,...] [--nproc=N]
                    [--variant "NAME = BASE --key=value ..."] [--sweep "BASE key=v1,v2,..."] [--plan FILE]
                    [--key=value ...]

Without variants it runs the registered experiments (experiments.REGISTRY: exp1 ... exp7). A variant is any
experiment, or another variant, with overrides, under a name of its own: `--variant "exp4-lr1e-2 = exp4
--lr=1e-2"`; a sweep is one variant per value of one key: `--sweep "exp4 lr=5e-5,1e-3,1e-2"` makes exp4-lr=5e-5,
exp4-lr=1e-3 and exp4-lr=1e-2. Each variant is launched like the experiment it derives from (torchrun for a
variant of exp5) and compared with that experiment (or variant); the study runs those too. A plan file
(studies/*.study) holds one variant or sweep per line, `#` comments, and `options: --steps=800 ...` lines of
study options that the command line can override, and `compare A B` lines for comparisons beyond each arm's
with its base (a variant against exp1 as well as against exp4).

Runs go seed by seed (seed 42 of every experiment, then 43, ...: a slow spell of the machine falls on all
alike) into OUT/NAME/seedK. Seed k of every experiment shares the data order (a function of the seed and the
step) and, where the models have the same shape, the initial weights: comparisons pair the seeds (stats.py).
Every run gets `--video=false` (`--video=true` makes videos in new runs); any other `--key=value` is passed to
every run. Each run's output goes to OUT/NAME/seedK/train.log; the terminal gets one line per run and an ETA.

Rerunning the same command skips finished runs (summary.json newer than ckpt.pt, config.json the same) and
resumes interrupted ones. Every held-out view is evaluated with evaluate.py's code (RUN/eval.json), BitNeRF runs
are exported (model.bitnerf), and study_page.py writes OUT/results.md.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import configs
import report
import study_page
from configs import RESUME_INDEPENDENT, Config, ConfigError, config_changes, config_from_dict, from_cli
from experiments import FIRST_SEED, METRICS, REGISTRY
from utils import ArgParser, UserError, atomic_json, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_MINUTES = 3.0
# the study sets these per run; the rest of the config can be overridden for every experiment
STUDY_KEYS = ("out_dir", "seed", "name", "preset")
# a finished run is reused when its config matches but for these (they do not change what was trained);
# a different time budget (max_time_s) is a different run: it resumes the checkpoint with the new budget
SKIP_IGNORES = RESUME_INDEPENDENT - {"max_time_s"}


# --- what is run: registered experiments and variants of them --------------------------------------------------------
@dataclass(frozen=True)
class Arm:
    """One configuration the study runs with every seed: a registered experiment, or a variant of another arm."""
    name: str
    script: str  # the registered experiment whose script launches it (expN.py)
    overrides: tuple[str, ...]  # --key=value on top of that experiment's preset (a variant's and its bases')
    base: str = ""  # the arm it is compared with ("" for none)
    question: str = ""  # what the comparison answers
    metrics: tuple[str, ...] = ()  # what the comparison compares

    @property
    def torchrun(self) -> bool:
        return REGISTRY[self.script].torchrun


def registered_arms() -> dict[str, Arm]:
    return {e.name: Arm(e.name, e.name, (), e.baseline, e.question, e.metrics) for e in REGISTRY.values()}


def override_key(arg: str) -> str:
    """The config key of a `--key=value` override ("" for anything else)."""
    return arg[2:].partition("=")[0].replace("-", "_") if arg.startswith("--") else ""


def parse_variant(spec: str, arms: dict[str, Arm]) -> Arm:
    """`NAME = BASE --key=value ...` -> a variant of the arm BASE (a registered experiment or an earlier variant)."""
    name, eq, rest = spec.partition(" = ") if " = " in spec else spec.partition("=")  # a name may hold '='
    name, words = name.strip(), shlex.split(rest)
    if not eq or not name or not words:
        raise UserError(f"variant {spec!r}: write it as 'NAME = BASE --key=value ...'")
    if "/" in name or name in arms:
        raise UserError(f"variant {spec!r}: the name {name!r} " + ("is taken" if name in arms else "has a '/'"))
    base, overrides = words[0], words[1:]
    if base not in arms:
        raise UserError(f"variant {spec!r}: {base!r} is neither an experiment ({', '.join(REGISTRY)}) nor a "
                        f"variant defined before it")
    for arg in overrides:
        key = override_key(arg)
        if not key or key in STUDY_KEYS:
            raise UserError(f"variant {spec!r}: {arg!r} is not a --key=value override the study leaves to you")
    parent = arms[base]
    return Arm(name, parent.script, parent.overrides + tuple(overrides), base,
               " ".join(overrides) or "the same settings", METRICS)


def parse_sweep(spec: str, arms: dict[str, Arm]) -> list[Arm]:
    """`BASE key=v1,v2,...` -> one variant of BASE per value, named BASE-key=value."""
    words = spec.split()
    if len(words) != 2 or "=" not in words[1]:
        raise UserError(f"sweep {spec!r}: write it as 'BASE key=v1,v2,...'")
    base, (key, _, values) = words[0], words[1].partition("=")
    found = [v for v in values.split(",") if v]
    if not found:
        raise UserError(f"sweep {spec!r}: no values")
    return [parse_variant(f"{base}-{key}={v} = {base} --{key}={v}", arms) for v in found]


def read_plan(path: str) -> tuple[list[str], list[tuple[str, str]]]:
    """A plan file: (study options from `options:` lines, [("variant" | "sweep" | "compare", spec), ...] in file
    order)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise UserError(f"cannot read the plan {path}: {err.strerror or err}") from None
    options, entries = [], []
    for number, line in enumerate(lines, 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        head, _, rest = line.partition(" ")
        if head == "options:":
            options += shlex.split(rest)
        elif head in ("sweep", "compare"):
            entries.append((head, rest.strip()))
        elif "=" in line:
            entries.append(("variant", line))
        else:
            raise UserError(f"{path}:{number}: not 'options: ...', 'sweep BASE key=v1,v2', 'compare A B' or "
                            f"'NAME = BASE --k=v'")
    return options, entries


def study_arms(entries: list[tuple[str, str]]) -> tuple[dict[str, Arm], list[str]]:
    """Every arm known (the registry's and the variants') and the variants' names, in the order given."""
    arms, variants = registered_arms(), []
    for kind, spec in entries:
        if kind == "compare":
            continue
        for arm in parse_sweep(spec, arms) if kind == "sweep" else [parse_variant(spec, arms)]:
            arms[arm.name] = arm
            variants.append(arm.name)
    return arms, variants


def compared_pairs(entries: list[tuple[str, str]], arms: dict[str, Arm], names: list[str]) -> list[tuple[str, str]]:
    """The plan's `compare A B` lines (comparisons beyond each arm's with its base) among the arms run."""
    pairs = []
    for kind, spec in entries:
        if kind != "compare":
            continue
        words = spec.split()
        if len(words) != 2 or not all(w in arms for w in words):
            raise UserError(f"compare {spec!r}: write it as 'compare A B' (A's numbers against B's), A and B "
                            f"experiments or variants of the plan")
        pairs += [(words[0], words[1])] if all(w in names for w in words) else []
    return pairs


def selected(arms: dict[str, Arm], variants: list[str], only: str | None) -> list[str]:
    """The arms to run, bases before what is compared with them: --only's, else the variants and every arm
    they derive from, else the registered experiments."""
    if only:
        names = [n.strip() for n in only.split(",") if n.strip()]
        unknown = [n for n in names if n not in arms]
        if unknown or not names:
            raise UserError(f"--only: {', '.join(unknown) or 'nothing'} is not one of {', '.join(arms)}")
        return [n for n in arms if n in names]
    if not variants:
        return list(REGISTRY)
    wanted = set()
    for name in variants:
        while name and name not in wanted:
            wanted.add(name)
            name = arms[name].base
    return [n for n in arms if n in wanted]


# --- the plan -------------------------------------------------------------------------------------------------------
@dataclass
class Trial:
    """One run of one arm with one seed."""
    arm: Arm
    k: int  # seed index: seed = FIRST_SEED + k
    run_dir: str
    argv: list  # the overrides the experiment script is given
    cfg: Config  # what those overrides make of the preset
    nproc: int  # processes under torchrun, else 1

    @property
    def exp(self) -> str:
        return self.arm.name

    @property
    def label(self) -> str:
        return f"{self.exp} seed {FIRST_SEED + self.k}"


def parse_args(argv: list[str]):
    """(study options, pass-through `--key=value` overrides, the plan's variant entries)."""
    p = ArgParser(prog="study.py", allow_abbrev=False,  # `--seed=1` must not mean --seeds
                  description="Run experiments and variants with several seeds; evaluate; write OUT/results.md.")
    p.add_argument("--scale", default="auto", choices=("auto", "paper", "cpu"),
                   help="auto: paper on CUDA, cpu elsewhere")
    p.add_argument("--minutes", type=float, help=f"training minutes per run (default {DEFAULT_MINUTES:g} "
                                                  "unless --steps is given)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the scale's schedule)")
    p.add_argument("--data", help="a .npz, a NeRF-synthetic scene folder or a capture's transforms.json (default "
                                  f"{Config.data}, as for expN.py: the procedural scene)")
    p.add_argument("--out", default=os.path.join("runs", "study"), help="study folder (default runs/study)")
    p.add_argument("--seeds", type=int, default=1, help="runs per experiment, seeds 42, 43, ... (default 1)")
    p.add_argument("--only", help="comma-separated experiments or variants to run, e.g. exp1,exp5")
    p.add_argument("--nproc", type=int, default=0, help="processes for torchrun experiments (default: GPUs, else 2)")
    p.add_argument("--variant", action="append", default=[], help="'NAME = BASE --key=value ...' (repeatable)")
    p.add_argument("--sweep", action="append", default=[], help="'BASE key=v1,v2,...' (repeatable)")
    p.add_argument("--plan", help="a plan file of variants and sweeps (e.g. studies/hypotheses.study)")
    args, _ = p.parse_known_args(argv)
    options, entries = read_plan(args.plan) if args.plan else ([], [])
    args, extras = p.parse_known_args([*options, *argv])  # the command line wins over the plan's options
    entries += [("variant", v) for v in args.variant] + [("sweep", s) for s in args.sweep]
    if args.seeds < 1 or args.nproc < 0 or (args.minutes is not None and not args.minutes > 0) or (
            args.steps is not None and args.steps < 1):
        raise UserError("need --seeds >= 1, --nproc >= 0, --minutes > 0, --steps >= 1")
    return args, extras, entries


def check_overrides(extras: list[str]) -> Config:
    """Refuse overrides the study sets itself, and anything configs refuses; returns exp1 with the overrides."""
    for arg in extras:
        key = override_key(arg)
        if key in STUDY_KEYS:
            raise UserError(f"--{key} is set by the study for each run (use --out and --seeds)")
    return from_cli(configs.EXP1, ["--scale=paper", *extras])  # ConfigError: one line, exit 2


def uses_cuda(device: str) -> bool:
    """Whether runs with this --device train on CUDA."""
    if device != "auto" and not device.startswith("cuda"):
        return False
    import torch

    return torch.cuda.is_available()


def ddp_processes(requested: int, device: str) -> int:
    """A torchrun experiment's process count: as requested, else one per CUDA GPU, else 2."""
    if requested:
        return requested
    if uses_cuda(device):
        import torch

        return torch.cuda.device_count()
    return 2


def child_env(nproc: int, on_cuda: bool) -> dict:
    """The environment of an experiment: on a CPU, N processes get cores // N threads each (unless the user set
    OMP_NUM_THREADS), so that they do not oversubscribe the cores."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if nproc > 1 and not on_cuda and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(max(1, cpu_count() // nproc))
    return env


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def arm_argv(arm: Arm, common: list[str], run_dir: str, k: int, extras: list[str]) -> list[str]:
    """The arm's command-line overrides: the study's, then the run's own, then everyone's, then the variant's."""
    name = [] if arm.name in REGISTRY else [f"--name={arm.name}"]
    return [*common, f"--out_dir={run_dir}", f"--seed={FIRST_SEED + k}", *name, *extras, *arm.overrides]


def plan(args, extras: list[str], entries: list[tuple[str, str]] = ()) -> tuple[list[Trial], dict]:
    """The runs to do, in order, and what they share (scale, data, budget, arms, process count...)."""
    device = check_overrides(extras).device
    scale = configs.auto_scale(device) if args.scale == "auto" else args.scale
    data = args.data or Config.data  # the default of every run, configs.Config's: the same as expN.py's
    minutes = args.minutes if args.minutes is not None else (None if args.steps else DEFAULT_MINUTES)
    arms, variants = study_arms(list(entries))
    names = selected(arms, variants, args.only)
    pairs = compared_pairs(entries, arms, names)
    nproc = ddp_processes(args.nproc, device)
    common = [f"--scale={scale}", f"--data={data}", "--video=false"]
    common += [f"--max_time_s={minutes * 60:g}"] if minutes else []
    common += [f"--steps={args.steps}"] if args.steps else []
    first = {}
    for name in names:  # each arm's config (seed 0), for the page and to catch bad overrides before any run
        try:
            first[name] = from_cli(REGISTRY[arms[name].script].preset,
                                   arm_argv(arms[name], common, os.path.join(args.out, name, "seed0"), 0, extras))
        except ConfigError as err:
            raise UserError(f"{name}: {err}") from None
    same = [n for n in names if arms[n].base in first and arms[n].torchrun == arms[arms[n].base].torchrun
            and equal_runs(first[n], first[arms[n].base])]
    if same:
        raise UserError(f"{', '.join(same)} would train exactly what {arms[same[0]].base} trains: drop it")
    trials = []
    for k in range(args.seeds):  # seed-major: a slow spell of the machine falls on every arm alike
        for name in names:
            arm, run_dir = arms[name], os.path.join(args.out, name, f"seed{k}")
            argv = arm_argv(arm, common, run_dir, k, extras)
            trials.append(Trial(arm, k, run_dir, argv, from_cli(REGISTRY[arm.script].preset, argv),
                                nproc if arm.torchrun else 1))
    shared = dict(scale=scale, scale_auto=args.scale == "auto", data=data, minutes=minutes, steps=args.steps,
                  nproc=nproc, seeds=args.seeds, out=args.out, extras=extras, cuda=uses_cuda(device),
                  arms={n: arms[n] for n in names}, pairs=pairs, configs=first, cores=cpu_count(),
                  threads=child_env(nproc, uses_cuda(device)).get("OMP_NUM_THREADS"),
                  planned={n: planned_steps(cfg) for n, cfg in first.items()})
    return trials, shared


def equal_runs(a: Config, b: Config) -> bool:
    """Whether two configs train the same thing (names and folders aside)."""
    ignore = RESUME_INDEPENDENT | {"name"}
    return all(getattr(a, k) == getattr(b, k) for k in a.to_dict() if k not in ignore)


def planned_steps(cfg: Config) -> int:
    """The steps the schedule asks for before any time budget (train.total_steps over the run's training views)."""
    from dataset import RayBatcher
    from train import total_steps

    if cfg.steps > 0:
        return cfg.steps
    views = run_views(cfg, "train")
    return total_steps(cfg, RayBatcher(views, cfg.batch_unit, cfg.batch_size, cfg.seed).steps_per_epoch)


def command(trial: Trial) -> list[str]:
    """The run's command line: `python expN.py ...`, or under torchrun for a DDP experiment."""
    script = os.path.join(ROOT, f"{trial.arm.script}.py")
    if trial.arm.torchrun:
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={trial.nproc}",
                script, *trial.argv]
    return [sys.executable, script, *trial.argv]


# --- skip / resume --------------------------------------------------------------------------------------------------
def saved_config(run_dir: str) -> Config | None:
    """The config a run folder was trained with (config.json), None if absent or unreadable."""
    try:
        with open(os.path.join(run_dir, "config.json")) as f:
            return config_from_dict(json.load(f))
    except (OSError, ValueError, TypeError, ConfigError):
        return None


def trial_state(trial: Trial) -> str:
    """'done' (finished with this config: skip), 'resume' (a checkpoint to continue) or 'new'.
    UserError when the folder holds a checkpoint of another config (training would refuse it)."""
    path = lambda name: os.path.join(trial.run_dir, name)  # noqa: E731
    has_ckpt = os.path.exists(path("ckpt.pt"))
    saved = saved_config(trial.run_dir)
    if saved is None:
        return "resume" if has_ckpt else "new"
    if has_ckpt and config_changes(saved, trial.cfg, RESUME_INDEPENDENT):
        changes = "; ".join(config_changes(saved, trial.cfg, RESUME_INDEPENDENT))
        raise UserError(f"{trial.run_dir} holds a run of another config ({changes}); use another --out, the same "
                        f"settings, or delete that folder")
    finished = os.path.exists(path("summary.json")) and (
        not has_ckpt or os.path.getmtime(path("summary.json")) >= os.path.getmtime(path("ckpt.pt")))
    if finished and not config_changes(saved, trial.cfg, SKIP_IGNORES):
        return "done"
    return "resume" if has_ckpt else "new"


# --- running one experiment, with its peak memory -------------------------------------------------------------------
class TrainingPeaks(threading.Thread):
    """Polls the peak resident set (VmHWM, Linux /proc) of the training processes every half second: the launched
    process itself, or (torchrun) its direct children, the workers.

    Not wait4's ru_maxrss: on Linux a child's ru_maxrss also takes the high-water mark of the memory it replaced
    at exec, which is the launching process's (this study's own memory, ~1.15 GB after some runs, was once
    reported as exp3-exp6's peak)."""

    def __init__(self, pid: int, workers: bool):
        super().__init__(daemon=True)
        self.pid, self.workers, self.peaks_kb, self.done = pid, workers, {}, threading.Event()

    def run(self):
        while True:
            for pid in children(self.pid) if self.workers else [self.pid]:
                kb = vm_hwm_kb(pid)
                if kb:
                    self.peaks_kb[pid] = max(kb, self.peaks_kb.get(pid, 0))
            if self.done.wait(0.5):
                return

    def max_mb(self) -> float | None:
        return max(self.peaks_kb.values()) / 1024 if self.peaks_kb else None

    def sum_mb(self) -> float | None:
        return sum(self.peaks_kb.values()) / 1024 if self.peaks_kb and self.workers else None


def children(pid: int) -> list[int]:
    """Direct child processes of `pid` (Linux /proc; [] elsewhere)."""
    found = []
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in filter(str.isdigit, names):
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields and int(fields[1]) == pid:
            found.append(int(name))
    return found


def vm_hwm_kb(pid: int) -> int | None:
    """A process's peak resident set so far (kB), from /proc/PID/status."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def launch(cmd: list[str], env: dict, log_path: str, torchrun: bool) -> dict:
    """Run `cmd` with its output appended to `log_path`; returns {"returncode", "peak_rss_mb" (the largest peak
    resident set of a training process: see TrainingPeaks), "workers_rss_sum_mb" (torchrun: over its workers)}.
    Ctrl-C: the child gets it too (it checkpoints and exits); we wait for it, then stop."""
    with open(log_path, "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    peaks = TrainingPeaks(proc.pid, workers=torchrun)
    peaks.start()
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        print("stopping: waiting for the experiment to save its checkpoint (rerun the study to resume)",
              file=sys.stderr, flush=True)
        proc.wait()
        raise
    finally:
        peaks.done.set()
        peaks.join()
    return {"returncode": code, "peak_rss_mb": peaks.max_mb(), "workers_rss_sum_mb": peaks.sum_mb()}


def run_trial(trial: Trial) -> dict:
    """Train (or resume) one run; its peak memory is merged into RUN/study.json. Returns the launch record."""
    os.makedirs(trial.run_dir, exist_ok=True)
    env = child_env(trial.nproc, uses_cuda(trial.cfg.device))
    record = launch(command(trial), env, os.path.join(trial.run_dir, "train.log"), trial.nproc > 1)
    memory_path = os.path.join(trial.run_dir, "study.json")
    old = (report.read_json(memory_path) if os.path.exists(memory_path) else None) or {}
    merged = {k: max_or_none(old.get(k), record[k]) for k in ("peak_rss_mb", "workers_rss_sum_mb")}
    merged.update(nproc=trial.nproc, omp_num_threads=env.get("OMP_NUM_THREADS"),
                  launches=old.get("launches", 0) + 1, command=shlex.join(command(trial)))
    atomic_json(merged, memory_path)
    return record


def max_or_none(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


def log_tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# --- evaluation and export ------------------------------------------------------------------------------------------
_VIEWS: dict = {}


def run_views(cfg: Config, split: str = "val"):
    """The run's training ("train") or held-out ("val") views (loaded once per data, size, background, split)."""
    from dataset import open_data

    key = (cfg.data, cfg.downscale, cfg.background, cfg.val_views, split)
    if key not in _VIEWS:
        _VIEWS[key] = open_data(cfg.data, cfg.downscale, cfg.background).views(split, cfg.val_views)
    return _VIEWS[key]


def newer(path: str, than: str) -> bool:
    return os.path.exists(path) and os.path.getmtime(path) >= os.path.getmtime(than)


def evaluate_run(run_dir: str) -> dict:
    """Every held-out view of a finished run scored by evaluate.py's code, cached in RUN/eval.json (redone when
    the checkpoint is newer). Views are numbered among the held-out ones, as in RUN/val/viewNNN.png."""
    from assembly import amp_dtype, load_trained
    from evaluate import evaluate
    from hardware import pick_device

    ckpt, path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "eval.json")
    if newer(path, ckpt):
        return report.read_json(path) or {}
    device = pick_device((saved_config(run_dir) or configs.EXP1).device)
    renderer, cfg = load_trained(ckpt, device)
    views = run_views(cfg)
    chunk = configs.rays_per_chunk(cfg)
    t0 = time.perf_counter()
    result = evaluate(renderer, views.to(device), chunk, amp_dtype(cfg, device), progress=False)
    result.update(ckpt=ckpt, data=cfg.data, split="val", views=len(views), device=str(device),
                  render_s=time.perf_counter() - t0)
    atomic_json(result, path)
    return result


def export_run(run_dir: str) -> int | None:
    """A BitNeRF run's packed ternary export RUN/model.bitnerf (redone when the checkpoint is newer): its size."""
    from export import export_checkpoint

    ckpt, path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "model.bitnerf")
    if not newer(path, ckpt):
        export_checkpoint(ckpt, path)
    return os.path.getsize(path)


# --- progress -------------------------------------------------------------------------------------------------------
class Progress:
    """One line per run, with an ETA for the whole study from the runs timed so far (or the time budget)."""

    def __init__(self, total: int, minutes: float | None):
        self.total, self.minutes, self.done, self.timed = total, minutes, 0, []

    def line(self, trial: Trial, text: str) -> None:
        print(f"[{self.done + 1}/{self.total}] {trial.label}: {text}", flush=True)

    def finish(self, trial: Trial, text: str, seconds: float | None = None) -> None:
        if seconds is not None:
            self.timed.append(seconds)
        self.line(trial, f"{text}; {self.eta()}")
        self.done += 1

    def eta(self) -> str:
        left = self.total - self.done - 1
        if left <= 0:
            return "study done"
        per_run = (sum(self.timed) / len(self.timed) if self.timed else
                   self.minutes * 60 + 30 if self.minutes else None)  # + start, evaluation, checkpoint
        if per_run is None:
            return f"{left} run(s) left"
        end = time.strftime("%H:%M", time.localtime(time.time() + left * per_run))
        return f"{left} run(s) left, ~{duration(left * per_run)} (ETA {end})"


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def do_trial(trial: Trial, progress: Progress) -> bool:
    """Skip, resume or train one run, then evaluate (and export) it. False when it failed."""
    state = trial_state(trial)
    log = os.path.join(trial.run_dir, "train.log")
    if state == "done":
        progress.line(trial, f"finished before, skipped ({trial.run_dir})")
    else:
        progress.line(trial, ("resuming from its checkpoint" if state == "resume" else "training") +
                      (f" ({trial.nproc} processes)" if trial.arm.torchrun else "") + f", log {log}")
    t0 = time.perf_counter()
    if state != "done":
        code = run_trial(trial)["returncode"]
        if code != 0:
            print(f"{trial.label} failed (exit {code}); the end of {log}:\n{log_tail(log)}", file=sys.stderr)
            progress.finish(trial, "FAILED", time.perf_counter() - t0)
            return False
    result = evaluate_run(trial.run_dir)
    packed = export_run(trial.run_dir) if trial.cfg.model == "bitnerf" else None
    summary = report.read_json(os.path.join(trial.run_dir, "summary.json")) or {}
    text = (f"{summary.get('steps')} steps, {summary.get('train_time_s', 0):.0f} s training, "
            f"{report.si(summary.get('train_points_per_s'))} points/s, held-out PSNR {result.get('psnr', 0):.2f} "
            f"dB, SSIM {result.get('ssim', 0):.3f}" + (f", packed {packed / 1e3:.1f} KB" if packed else ""))
    progress.finish(trial, ("done: " if state != "done" else "") + text,
                    None if state == "done" else time.perf_counter() - t0)
    return True


# --- the command ----------------------------------------------------------------------------------------------------
def header(trials: list[Trial], shared: dict) -> str:
    budget = " and ".join(x for x in (
        f"{shared['minutes']:g} min" if shared["minutes"] else "",
        f"{shared['steps']} steps" if shared["steps"] else "the scale's steps") if x)
    why = " (auto)" if shared["scale_auto"] else ""
    ddp = [n for n, a in shared["arms"].items() if a.torchrun]
    threads = f", OMP_NUM_THREADS={shared['threads']}" if shared["threads"] else ""
    under = f"; {', '.join(ddp)} under torchrun with {shared['nproc']} processes{threads}" if ddp else ""
    return (f"study: {', '.join(shared['arms'])} x {shared['seeds']} seed(s), scale {shared['scale']}{why}, "
            f"budget {budget} per run, data {shared['data']}, out {shared['out']}; --video=false unless "
            f"overridden{under}")


def _study_cli(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    trials, shared = plan(*parse_args(argv))
    for trial in trials:
        trial_state(trial)  # a conflicting folder stops the study before anything runs
    shared["argv"] = argv
    print(header(trials, shared), flush=True)
    progress = Progress(len(trials), shared["minutes"])
    failed = [t.label for t in trials if not do_trial(t, progress)]
    path = study_page.write_results(trials, shared)
    print(f"wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _study_cli(argv))


if __name__ == "__main__":
    sys.exit(main())
