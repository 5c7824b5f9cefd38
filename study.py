"""The six experiments at one scale and one budget, evaluated and compared in OUT/results.md.

    python study.py [--scale=auto|paper|cpu] [--minutes=3 | --steps=N] [--data=PATH] [--out=runs/study]
                    [--seeds=1] [--only=exp1,exp5] [--nproc=N] [--key=value ...]

Runs exp1 ... exp6 one after another (exp5/exp6 under torchrun: one process per CUDA GPU, else 2 processes with
OMP_NUM_THREADS = cores // 2 each), `--seeds=N` times each (seed 42+k, in OUT/expN/seedK). Every run gets
`--video=false` (videos cost minutes and the study does not use them; `--video=true` makes them in new runs), and
any other `--key=value` is passed to every experiment (e.g. `--val_views=10`, `--wandb=disabled`).
Each run's output goes to OUT/expN/seedK/train.log; the terminal gets one line per experiment and an ETA.

Rerunning the same command skips finished runs (summary.json newer than ckpt.pt, config.json the same) and
resumes interrupted ones (training continues from ckpt.pt). Then every held-out view is evaluated with
evaluate.py's code (OUT/expN/seedK/eval.json), BitNeRF runs are exported (model.bitnerf), and OUT/results.md is
written: one row per experiment (mean ± std over seeds), figures, and each claim of the original experiments
checked against the numbers. report.py remains the tool for arbitrary run folders; both share its code.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import configs
import report
from configs import RESUME_INDEPENDENT, Config, ConfigError, config_from_dict, from_cli
from utils import ArgParser, UserError, atomic_json, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))
EXPERIMENTS = ("exp1", "exp2", "exp3", "exp4", "exp5", "exp6")
UNDER_TORCHRUN = ("exp5", "exp6")
WHAT = {"exp1": "base NeRF", "exp2": "+ AMP", "exp3": "+ AMP, larger batch", "exp4": "BitNeRF",
        "exp5": "exp1 under DDP", "exp6": "exp4 under DDP"}
FIRST_SEED = 42
DEFAULT_MINUTES = 3.0
# the study sets these per run; the rest of the config can be overridden for every experiment
STUDY_KEYS = ("out_dir", "seed", "name", "preset")
# a finished run is reused when its config matches but for these (they do not change what was trained);
# a different time budget (max_time_s) is a different run: it resumes the checkpoint with the new budget
SKIP_IGNORES = RESUME_INDEPENDENT - {"max_time_s"}


@dataclass
class Trial:
    """One run of one experiment with one seed."""
    exp: str
    k: int  # seed index: seed = FIRST_SEED + k
    run_dir: str
    argv: list  # the overrides the experiment script is given
    cfg: Config  # what those overrides make of the preset
    nproc: int  # processes under torchrun (exp5/exp6), else 1

    @property
    def label(self) -> str:
        return f"{self.exp} seed {FIRST_SEED + self.k}"


# --- the plan -------------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]):
    """(study options, pass-through `--key=value` overrides)."""
    p = ArgParser(prog="study.py", allow_abbrev=False,  # `--seed=1` must not mean --seeds
                  description="Run exp1-exp6 at one scale and budget; evaluate; write OUT/results.md.")
    p.add_argument("--scale", default="auto", choices=("auto", "paper", "cpu"),
                   help="auto: paper on CUDA, cpu elsewhere")
    p.add_argument("--minutes", type=float, help=f"training minutes per run (default {DEFAULT_MINUTES:g} "
                                                  "unless --steps is given)")
    p.add_argument("--steps", type=int, help="training steps per run (default: the scale's schedule)")
    p.add_argument("--data", help="a .npz, a NeRF-synthetic scene folder or a capture's transforms.json (default "
                                  "data/tiny_nerf_data.npz if present, else synthetic)")
    p.add_argument("--out", default=os.path.join("runs", "study"), help="study folder (default runs/study)")
    p.add_argument("--seeds", type=int, default=1, help="runs per experiment, seeds 42, 43, ... (default 1)")
    p.add_argument("--only", help="comma-separated subset of the experiments, e.g. exp1,exp5")
    p.add_argument("--nproc", type=int, default=0, help="processes for exp5/exp6 (default: GPUs, else 2)")
    args, extras = p.parse_known_args(argv)
    if args.seeds < 1 or args.nproc < 0 or (args.minutes is not None and not args.minutes > 0) or (
            args.steps is not None and args.steps < 1):
        raise UserError("need --seeds >= 1, --nproc >= 0, --minutes > 0, --steps >= 1")
    return args, extras


def check_overrides(extras: list[str]) -> Config:
    """Refuse overrides the study sets itself, and anything configs refuses; returns exp1 with the overrides."""
    for arg in extras:
        key = arg[2:].partition("=")[0].replace("-", "_") if arg.startswith("--") else ""
        if key in STUDY_KEYS:
            raise UserError(f"--{key} is set by the study for each run (use --out and --seeds)")
    return from_cli(configs.EXP1, ["--scale=paper", *extras])  # ConfigError: one line, exit 2


def default_data() -> str:
    """data/tiny_nerf_data.npz when `python data_setup.py` has fetched it, else the procedural scene."""
    from data_setup import DEFAULT_OUT

    return DEFAULT_OUT if os.path.exists(DEFAULT_OUT) else "synthetic"


def uses_cuda(device: str) -> bool:
    """Whether runs with this --device train on CUDA."""
    if device != "auto" and not device.startswith("cuda"):
        return False
    import torch

    return torch.cuda.is_available()


def ddp_processes(requested: int, device: str) -> int:
    """exp5/exp6's process count: as requested, else one per CUDA GPU, else 2."""
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


def plan(args, extras: list[str]) -> tuple[list[Trial], dict]:
    """The runs to do, in order, and what they share (scale, data, budget, process count...)."""
    device = check_overrides(extras).device
    scale = configs.auto_scale(device) if args.scale == "auto" else args.scale
    data = args.data or default_data()
    minutes = args.minutes if args.minutes is not None else (None if args.steps else DEFAULT_MINUTES)
    exps = EXPERIMENTS if not args.only else tuple(e.strip() for e in args.only.split(",") if e.strip())
    unknown = [e for e in exps if e not in EXPERIMENTS]
    if unknown or not exps:
        raise UserError(f"--only: {', '.join(unknown) or 'nothing'} is not one of {', '.join(EXPERIMENTS)}")
    nproc = ddp_processes(args.nproc, device)
    common = [f"--scale={scale}", f"--data={data}", "--video=false"]
    common += [f"--max_time_s={minutes * 60:g}"] if minutes else []
    common += [f"--steps={args.steps}"] if args.steps else []
    trials = []
    for k in range(args.seeds):  # seed-major: a slow spell of the machine falls on every experiment alike
        for exp in (e for e in EXPERIMENTS if e in exps):
            run_dir = os.path.join(args.out, exp, f"seed{k}")
            argv = [*common, f"--out_dir={run_dir}", f"--seed={FIRST_SEED + k}", *extras]  # extras win
            n = nproc if exp in UNDER_TORCHRUN else 1
            trials.append(Trial(exp, k, run_dir, argv, from_cli(configs.PRESETS[exp], argv), n))
    every = {e: from_cli(configs.PRESETS[e], [*common, f"--out_dir={os.path.join(args.out, e, 'seed0')}", *extras])
             for e in EXPERIMENTS}  # all six, for the comparisons even where --only leaves some out
    shared = dict(scale=scale, scale_auto=args.scale == "auto", data=data, minutes=minutes, steps=args.steps,
                  nproc=nproc, seeds=args.seeds, out=args.out, extras=extras, cuda=uses_cuda(device),
                  configs=every)
    return trials, shared


def command(trial: Trial) -> list[str]:
    """The experiment's command line: `python expN.py ...`, or under torchrun for exp5/exp6."""
    script = os.path.join(ROOT, f"{trial.exp}.py")
    if trial.exp in UNDER_TORCHRUN:
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


def differences(a: Config, b: Config, ignore=frozenset()) -> list[str]:
    """`key: a -> b` for the fields that differ, but for `ignore`."""
    return [f"{k}: {getattr(a, k)!r} -> {getattr(b, k)!r}" for k in a.to_dict()
            if k not in ignore and getattr(a, k) != getattr(b, k)]


def trial_state(trial: Trial) -> str:
    """'done' (finished with this config: skip), 'resume' (a checkpoint to continue) or 'new'.
    UserError when the folder holds a checkpoint of another config (training would refuse it)."""
    path = lambda name: os.path.join(trial.run_dir, name)  # noqa: E731
    has_ckpt = os.path.exists(path("ckpt.pt"))
    saved = saved_config(trial.run_dir)
    if saved is None:
        return "resume" if has_ckpt else "new"
    if has_ckpt and differences(saved, trial.cfg, RESUME_INDEPENDENT):
        changes = "; ".join(differences(saved, trial.cfg, RESUME_INDEPENDENT))
        raise UserError(f"{trial.run_dir} holds a run of another config ({changes}); use another --out, the same "
                        f"settings, or delete that folder")
    finished = os.path.exists(path("summary.json")) and (
        not has_ckpt or os.path.getmtime(path("summary.json")) >= os.path.getmtime(path("ckpt.pt")))
    if finished and not differences(saved, trial.cfg, SKIP_IGNORES):
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
    chunk = max(1, cfg.chunk_points // (cfg.n_samples + cfg.n_importance))
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
                      (f" ({trial.nproc} processes)" if trial.exp in UNDER_TORCHRUN else "") + f", log {log}")
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
            f"{report._si(summary.get('train_points_per_s'))} points/s, held-out PSNR {result.get('psnr', 0):.2f} "
            f"dB, SSIM {result.get('ssim', 0):.3f}" + (f", packed {packed / 1e3:.1f} KB" if packed else ""))
    progress.finish(trial, ("done: " if state != "done" else "") + text,
                    None if state == "done" else time.perf_counter() - t0)
    return True


# --- reading the runs back ------------------------------------------------------------------------------------------
@dataclass
class Finished:
    """A finished run as its folder holds it."""
    trial: Trial
    run: report.Run
    memory: dict  # RUN/study.json: peak memory of its launches


def collect(trials: list[Trial]) -> dict[str, list[Finished]]:
    """{experiment: its finished runs (one per seed)}, in experiment order; unfinished runs are left out."""
    groups: dict[str, list[Finished]] = {}
    for t in trials:
        if not os.path.exists(os.path.join(t.run_dir, "summary.json")):
            continue
        run = report.load_run(t.run_dir)
        memory_path = os.path.join(t.run_dir, "study.json")
        memory = (report.read_json(memory_path) if os.path.exists(memory_path) else None) or {}
        if run and run.summary:
            groups.setdefault(t.exp, []).append(Finished(t, run, memory))
    return groups


def value(f: Finished, key: str) -> float | None:
    """One number of a finished run: held-out metrics from eval.json, the rest from summary.json, study.json
    and the file sizes."""
    s, ev, run = f.run.summary, f.run.evaluation or {}, f.run
    found = {
        "psnr": ev.get("psnr", s.get("val_psnr")), "ssim": ev.get("ssim"), "depth_mae": ev.get("depth_mae"),
        "background_opacity": ev.get("background_opacity"), "train_s": s.get("train_time_s"),
        "points": s.get("train_points_per_s"), "steps": s.get("steps"), "peak_mb": f.memory.get("peak_rss_mb"),
        "sum_mb": f.memory.get("workers_rss_sum_mb"),
        "ckpt_mb": None if run.ckpt_bytes is None else run.ckpt_bytes / 1e6,
        "packed_kb": None if run.packed_bytes is None else run.packed_bytes / 1e3,
    }[key]
    return None if found is None else float(found)


def values(group: list[Finished], key: str) -> list[float]:
    return [v for v in (value(f, key) for f in group) if v is not None]


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


def stat_cell(xs: list[float], fmt) -> str:
    """'x' for one value, 'mean ± std' over seeds, '—' for none. fmt: a format spec or a function."""
    show = fmt if callable(fmt) else (lambda v: f"{v:{fmt}}")
    if not xs:
        return "—"
    mean, std = mean_std(xs)
    return show(mean) if len(xs) == 1 else f"{show(mean)} ± {show(std)}"


# --- the table ------------------------------------------------------------------------------------------------------
COLUMNS = ("experiment", "differs from exp1", "model", "lr", "batch", "steps", "AMP", "world", "train (s)",
           "points/s", "peak RSS (MB)", "PSNR (dB)", "SSIM", "depth MAE", "bg opacity", "ckpt (MB)",
           ".bitnerf (KB)", "note")
TEXT_COLUMNS = ("experiment", "differs from exp1", "model", "batch", "AMP", "note")


def differs(exp: str, cfg: Config, base: Config, world: int) -> str:
    """What this experiment changes relative to exp1, from the two configs (and the process count)."""
    if exp == "exp1":
        return WHAT[exp]
    skip = {"name", "out_dir", "seed"}
    keys = [k for k in cfg.to_dict() if k not in skip and getattr(cfg, k) != getattr(base, k)]
    parts = [k if getattr(cfg, k) is True else f"{k}={getattr(cfg, k)}" for k in keys]
    parts += [f"world size {world}"] if world > 1 else []
    return f"{WHAT[exp]}: {', '.join(parts) or 'nothing but the launcher'}"


def planned_steps(cfg: Config) -> int:
    """The steps the schedule asks for (steps, else epochs x steps per epoch), before any time budget."""
    if cfg.steps > 0:
        return cfg.steps
    views = run_views(cfg, "train")
    units = len(views) if cfg.batch_unit == "image" else len(views) * views.height * views.width
    return cfg.epochs * max(1, units // cfg.batch_size)


def steps_cell(group: list[Finished]) -> str:
    """Steps done (mean ± std); 'of P' when the time budget stopped it before its schedule's P."""
    done, planned = values(group, "steps"), planned_steps(group[0].trial.cfg)
    cell = stat_cell(done, ".0f")
    return cell + (f" of {planned}" if done and max(done) < planned else "")


def memory_cell(group: list[Finished]) -> str:
    """Peak RSS of the largest process; for torchrun, the sum over its workers follows."""
    cell = stat_cell(values(group, "peak_mb"), ".0f")
    total = values(group, "sum_mb")
    return cell + (f" per process (workers' sum {stat_cell(total, '.0f')})" if total else "")


def note(exp: str, shared: dict) -> str:
    """Where the experiment's design confounds its comparison, from the configs."""
    c = shared["configs"]
    if exp == "exp3":
        p3, p2 = planned_steps(c["exp3"]), planned_steps(c["exp2"])
        if p3 < p2:
            lr = "the same lr" if c["exp3"].lr == c["exp2"].lr else f"lr {c['exp3'].lr:g} vs {c['exp2'].lr:g}"
            return (f"equal epochs: {p3} planned steps vs exp2's {p2} at {lr}; its comparison with exp2 mixes the "
                    f"batch size with the number of steps")
    if exp == "exp4":
        other = [k for k in ("lr", "weight_decay", "lr_schedule", "batch_size", "n_freqs", "width", "depth")
                 if getattr(c["exp4"], k) != getattr(c["exp1"], k)]
        if other:
            changes = ", ".join(f"{k} {getattr(c['exp4'], k)} vs {getattr(c['exp1'], k)}" for k in other)
            return f"also {changes}: the gap to exp1 mixes quantization with that"
    if exp in UNDER_TORCHRUN:
        if shared["nproc"] == 1:
            return "world size 1 (one GPU): the same computation as without DDP"
        if not shared["cuda"]:
            threads = child_env(shared["nproc"], False).get("OMP_NUM_THREADS", "default")
            return (f"{shared['nproc']} processes share {cpu_count()} CPU cores ({threads} thread(s) each); "
                    f"the single-process runs use the same cores")
    return ""


def table_row(exp: str, group: list[Finished], shared: dict) -> dict[str, str]:
    """One experiment's cells: its first seed's settings, every seed's numbers (mean ± std)."""
    first = group[0]
    cfg, s = first.trial.cfg, first.run.summary
    world = int(s.get("world_size", 1))
    cells = {
        "experiment": exp, "differs from exp1": differs(exp, cfg, shared["configs"]["exp1"], world),
        "model": f"{cfg.model} {cfg.depth}×{cfg.width}, L={cfg.n_freqs}", "lr": f"{cfg.lr:g}",
        "batch": f"{cfg.batch_size} {cfg.batch_unit}s", "steps": steps_cell(group), "AMP": str(s.get("amp", "—")),
        "world": str(world), "peak RSS (MB)": memory_cell(group), "note": note(exp, shared),
    }
    for column, key, fmt in (("train (s)", "train_s", ".0f"), ("points/s", "points", report._si),
                             ("PSNR (dB)", "psnr", ".2f"), ("SSIM", "ssim", ".4f"), ("depth MAE", "depth_mae", ".4f"),
                             ("bg opacity", "background_opacity", ".4f"), ("ckpt (MB)", "ckpt_mb", ".2f"),
                             (".bitnerf (KB)", "packed_kb", ".1f")):
        cells[column] = stat_cell(values(group, key), fmt)
    return cells


def results_table(groups: dict[str, list[Finished]], shared: dict) -> str:
    """The markdown table, without the columns no experiment has a value for."""
    rows = [table_row(exp, group, shared) for exp, group in groups.items()]
    columns = [c for c in COLUMNS if any(row[c] not in ("—", "") for row in rows)]
    return report.markdown(columns, rows, left=TEXT_COLUMNS)


# --- the claims -----------------------------------------------------------------------------------------------------
COMPARISONS = (  # (claim, the experiment, what it is compared with, the numbers compared)
    ("AMP's speed-up or cost", "exp2", "exp1", ("points", "psnr")),
    ("the larger batch's trade-off", "exp3", "exp2", ("points", "psnr")),
    ("BitNeRF's gap to NeRF", "exp4", "exp1", ("psnr", "ssim", "points")),
    ("BitNeRF-DDP vs BitNeRF", "exp6", "exp4", ("points", "psnr")),
    ("DDP vs a single process", "exp5", "exp1", ("points", "psnr")),
)
RULE = ("A difference is called real only when it exceeds the seeds' spread (the sum of the two experiments' "
        "standard deviations over seeds); with one seed no difference is claimed.")


def per_view(f: Finished, key: str) -> list[float]:
    return [v[key] for v in (f.run.evaluation or {}).get("per_view", []) if v.get(key) is not None]


def window_rates(f: Finished) -> list[float]:
    """Logged points/s of each logging window, without the first (it holds compilation)."""
    return [r["points_per_s"] for r in f.run.metrics if "points_per_s" in r][1:]


def one_seed_floor(key: str, new: Finished, base: Finished) -> str | None:
    """The smallest difference one run of each could resolve, by its own measurement noise: 2 standard errors of
    the paired per-view differences (PSNR, SSIM) or of the logged throughput windows (points/s)."""
    if key in ("psnr", "ssim"):
        a, b = per_view(new, key), per_view(base, key)
        if len(a) != len(b) or len(a) < 2:
            return None
        _, std = mean_std([x - y for x, y in zip(a, b)])
        unit = " dB" if key == "psnr" else ""
        return f"{2 * std / math.sqrt(len(a)):.{2 if key == 'psnr' else 4}f}{unit} (2 s.e. over {len(a)} views)"
    a, b = window_rates(new), window_rates(base)
    if len(a) < 2 or len(b) < 2:
        return None
    rel = [mean_std(x)[1] / mean_std(x)[0] / math.sqrt(len(x)) for x in (a, b)]
    return f"{200 * math.hypot(*rel):.0f}% (2 s.e. of the logged throughput)"


def verdict(key: str, new: list[Finished], base: list[Finished]) -> str:
    """Real, not real, or (one seed) not claimed, with the numbers that decide it."""
    a, b = values(new, key), values(base, key)
    if min(len(a), len(b)) < 2:
        floor = one_seed_floor(key, new[0], base[0])
        return ("one seed cannot tell differences of less than ~" + floor + " apart" if floor else
                "one seed cannot tell the seed-to-seed spread") + ": not claimed"
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if key == "points":
        diff, spread, shown = ma / mb - 1, sa / ma + sb / mb, lambda x: f"{100 * x:.0f}%"
    else:
        diff, spread, shown = ma - mb, sa + sb, lambda x: f"{x:.2f} dB" if key == "psnr" else f"{x:.4f}"
    real = abs(diff) > spread
    return (f"{'real' if real else 'not a real difference'}: {shown(abs(diff))} "
            f"{'exceeds' if real else 'is within'} the seeds' spread of {shown(spread)}")


def signed(x: float, digits: int) -> str:
    """+0.00 rather than -0.00 for a difference that rounds to nothing."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def compare(key: str, exp: str, base: str, groups: dict) -> str:
    """One number of one comparison, then its verdict."""
    a, b = values(groups[exp], key), values(groups[base], key)
    if not a or not b:
        return f"{key}: not measured"
    ma, mb = mean_std(a)[0], mean_std(b)[0]
    if key == "points":
        text = (f"points/s {ma / mb:.2f}× {base}'s ({report._si(ma)} vs {report._si(mb)}: "
                f"{'faster' if ma > mb else 'slower'})")
    elif key == "psnr":
        text = f"held-out PSNR {signed(ma - mb, 2)} dB ({ma:.2f} vs {mb:.2f})"
    else:
        text = f"SSIM {signed(ma - mb, 4)} ({ma:.4f} vs {mb:.4f})"
    return f"{text} — {verdict(key, groups[exp], groups[base])}"


def extra_facts(exp: str, groups: dict, shared: dict) -> list[str]:
    """Sentences a comparison needs beyond its numbers: confounds, sizes, AMP dtype."""
    facts = [note(exp, shared)] if note(exp, shared) else []
    if exp == "exp2":
        facts.insert(0, f"AMP dtype {groups[exp][0].run.summary.get('amp')}")
    if exp == "exp3":
        steps = [stat_cell(values(groups[e], "steps"), ".0f") for e in ("exp3", "exp2")]
        facts.append(f"steps done {steps[0]} vs {steps[1]}")
    if exp == "exp4":
        packed, params = values(groups["exp4"], "packed_kb"), groups["exp1"][0].run.summary.get("parameters")
        if packed and params:
            facts.append(f"packed .bitnerf {mean_std(packed)[0]:.1f} KB vs exp1's {params * 4 / 1e3:.1f} KB of "
                         f"fp32 weights ({params:,} parameters; ckpt.pt also holds the optimizer state)")
    return facts


def claims(groups: dict[str, list[Finished]], shared: dict) -> list[str]:
    """One markdown bullet per original claim, generated from the numbers."""
    lines = [RULE, ""]
    for title, exp, base, keys in COMPARISONS:
        if exp not in groups or base not in groups:
            lines.append(f"- **{title}** ({exp} vs {base}): not measured in this study.")
            continue
        parts = [compare(k, exp, base, groups) for k in keys] + extra_facts(exp, groups, shared)
        lines.append(f"- **{title}** ({exp} vs {base}): " + "; ".join(parts) + ".")
    return lines


# --- the figures ----------------------------------------------------------------------------------------------------
def plot_psnr_time(groups: dict[str, list[Finished]], path: str) -> None:
    """Held-out PSNR against training time: validation records of metrics.jsonl, a star for eval.json."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (exp, group) in enumerate(groups.items()):
        for j, f in enumerate(group):
            ax.plot(*report.series(f.run.metrics, "time_s", "val_psnr"), "o-", color=f"C{i}", markersize=4,
                    alpha=1.0 if j == 0 else 0.5, label=exp if j == 0 else None)
            final, t = value(f, "psnr"), value(f, "train_s")
            if final is not None and t is not None:
                ax.plot([t], [final], "*", color=f"C{i}", markersize=12)
    ax.plot([], [], "*", color="grey", markersize=12, label="final evaluation")
    ax.set_xlabel("training time (s; validation excluded)")
    ax.set_ylabel("held-out PSNR (dB)")
    ax.legend(fontsize="small")
    report.save_figure(fig, [ax], path)


def plot_loss_step(groups: dict[str, list[Finished]], path: str) -> None:
    """Training loss (log scale) against step, one colour per experiment (every seed)."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (exp, group) in enumerate(groups.items()):
        for j, f in enumerate(group):
            ax.plot(*report.series(f.run.metrics, "step", "loss"), color=f"C{i}", alpha=1.0 if j == 0 else 0.5,
                    label=exp if j == 0 else None)
    report.loss_axis(ax)
    ax.set_xlabel("step")
    ax.legend(fontsize="small")
    report.save_figure(fig, [ax], path)


def plot_views(groups: dict[str, list[Finished]], path: str, view: int = 0) -> bool:
    """Held-out view `view`: ground truth, then each experiment's prediction (first seed), from RUN/val PNGs
    (ground truth | prediction | depth). False when no run has the image."""
    import imageio.v3 as iio

    panels = []
    for exp, group in groups.items():
        png = os.path.join(group[0].run.path, "val", f"view{view:03d}.png")
        if os.path.exists(png):
            image = iio.imread(png)
            third = image.shape[1] // 3
            psnr = next((v["psnr"] for v in (group[0].run.evaluation or {}).get("per_view", [])
                         if v["view"] == view), None)
            panels.append((exp, image[:, :third], image[:, third:2 * third], psnr))
    if not panels:
        return False
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(1.8 * (len(panels) + 1), 2.3), dpi=100)
    shown = [("ground truth", panels[0][1])] + [
        (f"{exp}" + ("" if psnr is None else f"\n{psnr:.2f} dB"), pred) for exp, _, pred, psnr in panels]
    for ax, (title, image) in zip(axes, shown):
        ax.imshow(image)
        ax.set_title(title, fontsize="small")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- results.md -----------------------------------------------------------------------------------------------------
def setup_lines(groups: dict, shared: dict) -> list[str]:
    """How the study was run, and how to reproduce it."""
    budget = ", ".join(x for x in (f"{shared['minutes']:g} min of training" if shared["minutes"] else "",
                                   f"--steps={shared['steps']}" if shared["steps"] else "") if x)
    any_run = next(iter(groups.values()))[0]
    return [f"- scale **{shared['scale']}**{' (auto)' if shared['scale_auto'] else ''}, data `{shared['data']}`, "
            f"budget {budget or 'the schedule of the scale'} per run, {shared['seeds']} seed(s) (42, 43, ...), "
            f"device {any_run.run.summary.get('device', '?')}, {cpu_count()} CPU cores",
            f"- exp5/exp6 under torchrun with {shared['nproc']} process(es); every run `--video=false` unless "
            f"overridden; overrides for all: `{' '.join(shared['extras']) or 'none'}`",
            f"- reproduce (skips what is done): `python study.py {shlex.join(shared['argv'])}`"]


def column_notes(groups: dict) -> list[str]:
    views = next(iter(groups.values()))[0].run.evaluation or {}
    return [
        f"- PSNR, SSIM{', depth MAE' if views.get('depth_mae') is not None else ''}: evaluate.py's code over "
        f"every held-out view ({views.get('views', '?')} views; RUN/eval.json); numbers with ± are mean ± "
        f"standard deviation over seeds.",
        "- train (s): training time without validation; points/s: sample points per second of training, over all "
        "processes, from summary.json; steps: done, 'of N' where the time budget stopped the schedule.",
        "- peak RSS: the largest peak resident set (VmHWM, polled from /proc) of the training process; for "
        "torchrun rows the largest of its workers, then their sum. Not wait4's ru_maxrss, which on Linux also "
        "counts the launching process's memory.",
        "- ckpt: ckpt.pt (float weights + optimizer state); .bitnerf: export.py's packed ternary file.",
    ]


def write_results(trials: list[Trial], shared: dict) -> str:
    """OUT/results.md and its figures from the finished runs; returns its path."""
    out = shared["out"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.md")
    groups = collect(trials)
    if not groups:
        with open(path, "w") as f:
            f.write("# Study\n\nNo run has finished yet.\n")
        return path
    figures = [("held-out PSNR against training time", "psnr_time.png", plot_psnr_time),
               ("training loss against step", "loss_step.png", plot_loss_step),
               ("held-out view 0: ground truth, then each experiment", "views.png", plot_views)]
    parts = ["# Study: exp1–exp6 at one scale and one budget", "", *setup_lines(groups, shared), "",
             results_table(groups, shared), "", *column_notes(groups), "", "## What the numbers say", "",
             *claims(groups, shared), "", "## Figures", ""]
    for title, name, plot in figures:
        if plot(groups, os.path.join(out, name)) is not False:
            parts += [f"![{title}]({name})", ""]
    missing = [t.label for t in trials if t.exp not in groups or t not in [f.trial for f in groups[t.exp]]]
    if missing:
        parts += [f"Not finished (left out above): {', '.join(missing)}.", ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path


# --- the command ----------------------------------------------------------------------------------------------------
def header(trials: list[Trial], shared: dict) -> str:
    budget = " and ".join(x for x in (
        f"{shared['minutes']:g} min" if shared["minutes"] else "",
        f"{shared['steps']} steps" if shared["steps"] else "the scale's steps") if x)
    exps = sorted({t.exp for t in trials})
    why = " (auto)" if shared["scale_auto"] else ""
    ddp = ""
    if any(e in UNDER_TORCHRUN for e in exps):
        threads = child_env(shared["nproc"], shared["cuda"])
        ddp = f"; exp5/exp6 under torchrun with {shared['nproc']} processes" + (
            f", OMP_NUM_THREADS={threads['OMP_NUM_THREADS']}" if "OMP_NUM_THREADS" in threads else "")
    return (f"study: {', '.join(exps)} x {shared['seeds']} seed(s), scale {shared['scale']}{why}, budget "
            f"{budget} per run, data {shared['data']}, out {shared['out']}; --video=false unless overridden{ddp}")


def _study_cli(argv: list[str] | None) -> int:
    args, extras = parse_args(sys.argv[1:] if argv is None else argv)
    trials, shared = plan(args, extras)
    for trial in trials:
        trial_state(trial)  # a conflicting folder stops the study before anything runs
    shared["argv"] = sys.argv[1:] if argv is None else list(argv)
    print(header(trials, shared), flush=True)
    progress = Progress(len(trials), shared["minutes"])
    failed = [t.label for t in trials if not do_trial(t, progress)]
    path = write_results(trials, shared)
    print(f"wrote {path}" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _study_cli(argv))


if __name__ == "__main__":
    sys.exit(main())
