"""Check this repository on a new machine, GPU first: the device policy, the CUDA tests, short real runs.

    pip install -r requirements-dev.txt && python gpu_check.py --budget=360   # on a GPU: about 6 minutes
    python gpu_check.py --device=cpu                  # the same checks at toy sizes (1-2 minutes; CI runs it)

Each check is a row of OUT/gpu_check.md (default OUT = runs/gpu_check): ok, FAILED, or skipped with its reason.
OUT/gpu_check.log holds everything else: the environment (torch, CUDA, GPU, driver, installed versions), what every
check printed, every failure's full traceback, every subprocess's whole output. Exit code 1 if a row FAILED.

--budget=SECONDS (default 360) is the time for all the checks. A check starts only if the time left is at least
its budget below ("skipped: needs ~N s, M s left" otherwise), so the rows are in order of importance and the
command ends near its budget however slow the machine is. The budgets are allowances for a cold H100 (compilation
included), not measurements: they add up to 480 s, so at 360 the last rows run only if earlier ones finished under
their allowances; each row shows the seconds it took. A subprocess check is killed at twice its budget (at most
the time left) and is then a FAILED row; an in-process check that runs that long has its stacks dumped to the log,
and a training run stops there (max_time_s).

  check        budget  what (paper scale on a GPU; cpu scale on an Apple GPU; toy sizes, eager, on a CPU)
  environment     10   torch, CUDA, the GPU, native bf16?, TF32, the AMP dtype auto picks, the integer product
  int_mm          20   torch._int_mm on BitNeRF's real shapes and layout (x_q @ ternary.t(); every K, the skip
                       layer's width + padded encoding included), eager and compiled, equals the exact product
  exp1            45   60 steps: compile (first step) and steady step time apart, points/s, fraction of the
                       matmul peak, peak memory, graphs, graph breaks (must be 0), the 1200-step schedule's time
  learn           25   the cpu scale's exp1 for 300 steps: held-out PSNR must beat an all-black render by 1 dB
  exp2            30   exp1 + AMP (bf16 on capability >= 8.0), 60 steps
  exp4            40   BitNeRF, 60 steps
  syncs           15   host syncs per training step, 4096-ray batches in >= 3 micro-batches: at most 1
  ddp             20   the compiled field in DDP on a 1-rank group (NCCL; gloo on a CPU), >= 2 micro-batches
                       (no_sync), equals the same steps without DDP
  resume          15   exp1 rerun from its mid-way checkpoint ends where the uninterrupted run ended
  export          10   exp4 exported to .bitnerf and evaluated on the device
  tests           60   pytest -m cuda: the tests that need CUDA
  fp16            20   exp1 with fp16 + GradScaler forced: finite loss, the scaler's scale, skipped steps
  tf32_off        20   exp1 with --tf32=false (full fp32 matmuls)
  skip_off        30   exp1 with --skip=false: the whole render compiled as one graph
  bitnerf_amp     25   exp4 under AMP
  exp3            20   exp3's 8 whole images a step, 5 steps: peak memory
  exp5_1gpu       45   torchrun --nproc_per_node=1 exp5.py on the GPU (a 1-rank NCCL group, DDP), 20 steps
  exp5_2cpu       30   torchrun --nproc_per_node=2 exp5.py --device=cpu (gloo), toy sizes: the multi-rank logic
"""

from __future__ import annotations

import contextlib
import faulthandler
import functools
import gc
import io
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import PeakMemory, linear_macs, matmul_peak, timed
from bitnerf import BitNeRF
from configs import EXP1, EXP2, EXP3, EXP4, Config, apply_device_defaults, apply_scale, points_per_ray
from dataset import synthetic_scene
from hardware import amp_policy, configure_backends, cpu_has_native_bf16, pick_device, torch_at_least
from ternary_kernels import int8_mm, int_mm_available, integer_product, probe_int_mm
from utils import ArgParser, Dist, run_cli

ROOT = os.path.dirname(os.path.abspath(__file__))
PAPER_EXP1_STEPS = 1200  # the paper-scale exp1 schedule: 50 epochs x 24 steps
COMPILED_SIZE_STEP = 512  # renderer.py pads a compiled field's points to a multiple of this


# --- the runner: budgets, rows, the log --------------------------------------------------------------------------
class Check(NamedTuple):
    name: str
    budget_s: float  # what it needs; it is skipped when less time is left
    run: Callable[[float], tuple[bool, dict]]  # run(timeout_s) -> (passed, figures); raises Skip to skip


class Row(NamedTuple):
    name: str
    result: str  # ok | FAILED | skipped
    seconds: float
    budget_s: float
    figures: dict


class Skip(Exception):
    """A check that cannot run here; its message is the row's reason."""


class CheckTimeout(Exception):
    """A subprocess ran past its timeout and was killed."""


_LOG: list = [None]  # the open gpu_check.log while run_checks runs


def log_only(text: str) -> None:
    """Into gpu_check.log, not onto the console (a subprocess's whole output)."""
    if _LOG[0] is not None:
        _LOG[0].write(text if text.endswith("\n") else text + "\n")
        _LOG[0].flush()


class Tee(io.TextIOBase):
    """The console and the log at once, so the log holds what every check printed."""

    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()

    def fileno(self) -> int:
        return self.streams[0].fileno()

    @property
    def encoding(self) -> str:  # tqdm draws its bars in ASCII for a stream without one
        return getattr(self.streams[0], "encoding", None) or "utf-8"


def last_line(err: BaseException) -> str:
    """The last line of an exception's message: where a long message (a compiler's, cuBLAS's) says what failed."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_checks(checks: list[Check], out: str, budget_s: float, header: str = "",
               clock: Callable[[], float] = time.monotonic) -> list[Row]:
    """Run `checks` in order within `budget_s` seconds; OUT/gpu_check.md gets a row per check as it goes (a check
    that hangs leaves the rows before it), OUT/gpu_check.log everything printed and every traceback."""
    os.makedirs(out, exist_ok=True)
    report, rows = os.path.join(out, "gpu_check.md"), []
    with open(os.path.join(out, "gpu_check.log"), "w") as log, \
            contextlib.redirect_stdout(Tee(sys.stdout, log)), contextlib.redirect_stderr(Tee(sys.stderr, log)):
        _LOG[0] = log
        try:
            print(header, flush=True)
            start = clock()
            for check in checks:
                left = budget_s - (clock() - start)
                print(f"== {check.name} (budget ~{check.budget_s:.0f} s, {left:.0f} s left)", flush=True)
                began = clock()
                result, figures = _run_one(check, left, log)
                rows.append(Row(check.name, result, clock() - began, check.budget_s, figures))
                print(f"   {result} in {rows[-1].seconds:.0f} s: {figures}", flush=True)
                write_report(rows, report)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the next check's peak memory is its own; subprocesses get the GPU
        finally:
            _LOG[0] = None
    print(f"wrote {report} and {os.path.join(out, 'gpu_check.log')}")
    return rows


def _run_one(check: Check, left: float, log) -> tuple[str, dict]:
    if left < check.budget_s:
        return "skipped", {"reason": f"skipped: needs ~{check.budget_s:.0f} s, {max(0.0, left):.0f} s left"}
    timeout = min(left, 2 * check.budget_s)
    # a hang in C code (a compiler, a collective) cannot be interrupted in-process: the log gets every stack
    faulthandler.dump_traceback_later(timeout, file=log)
    try:
        ok, figures = check.run(timeout)
        return ("ok" if ok else "FAILED"), figures
    except Skip as why:
        return "skipped", {"reason": str(why)}
    except Exception as err:  # a failed check is a row, and the next check still runs
        traceback.print_exc()  # in full, into the log
        return "FAILED", {"error": f"{type(err).__name__}: {last_line(err)} (see gpu_check.log)"}
    finally:
        faulthandler.cancel_dump_traceback_later()


def write_report(rows: list[Row], path: str) -> None:
    lines = ["# gpu_check", "", "| check | result | s (budget) | figures |", "|---|---|---|---|"]
    for row in rows:
        shown = ", ".join(f"{k}={v}" for k, v in row.figures.items()).replace("|", "/").replace("\n", " ")
        lines.append(f"| {row.name} | {row.result} | {row.seconds:.0f} ({row.budget_s:.0f}) | {shown} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def run_logged(cmd: list[str], timeout_s: float, env: dict | None = None) -> tuple[int, str]:
    """(exit code, output) of `cmd` run from the repository root, its whole output (stdout and stderr, in order)
    into the log. Past `timeout_s` its whole process group is killed (torchrun's workers too) and CheckTimeout
    says so."""
    log_only(f"$ {' '.join(cmd)}   (timeout {timeout_s:.0f} s)")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        log_only(output or "")
        raise CheckTimeout(f"{os.path.basename(cmd[0])} {' '.join(cmd[1:4])[:80]} ... ran past its {timeout_s:.0f} s "
                           f"timeout and was killed") from None
    except BaseException:  # Ctrl-C: in a session of its own, it does not get the terminal's signal
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    log_only(output)
    log_only(f"(exit code {proc.returncode})")
    return proc.returncode, output


# --- the environment ---------------------------------------------------------------------------------------------
def check_environment(device: torch.device) -> tuple[bool, dict]:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        facts.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device),
                     capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                     memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                     driver=cuda_driver(), bf16_native=torch.cuda.get_device_capability(device) >= (8, 0),
                     matmul_precision=torch.get_float32_matmul_precision())
    else:
        facts.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                     bf16_native=cpu_has_native_bf16())
    facts["amp_auto"] = amp_policy(True, "auto", device).reason
    facts["int_mm"] = int_mm_available(device)
    facts["integer_product"] = integer_product(device)  # onednn | int_mm | float
    return True, facts


def cuda_driver() -> str:
    """The CUDA driver's version as torch sees it (e.g. 12040 = CUDA 12.4's driver API)."""
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    return str(get()) if get else "unknown"


def environment_text(device: torch.device) -> str:
    """The log's first lines: what a failure report needs to be reproduced."""
    lines = [f"command: {' '.join([sys.executable, *sys.argv])}", f"python {sys.version.split()[0]}, "
             f"{platform.platform()}", f"torch {torch.__version__}, CUDA build {torch.version.cuda}, cuDNN "
             f"{torch.backends.cudnn.version()}, device {device}"]
    if device.type == "cuda":
        lines.append(f"CUDA driver (torch._C._cuda_getDriverVersion): {cuda_driver()}")
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"GPU {i}: {p.name}, capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                         f"{p.multi_processor_count} SMs")
        if shutil.which("nvidia-smi"):
            with contextlib.suppress(Exception):
                lines.append(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    return "\n".join(lines + ["installed: " + ", ".join(installed_versions())]) + "\n"


def installed_versions() -> list[str]:
    """pip freeze's lines for torch, torchao, numpy, triton and NVIDIA's CUDA wheels (importlib.metadata where the
    environment has no pip, as uv's venvs do not)."""
    wanted = lambda line: line.split("==")[0].split(" @ ")[0].lower() in ("torch", "torchao", "numpy", "triton") \
        or line.lower().startswith("nvidia-")  # noqa: E731
    try:
        freeze = subprocess.run([sys.executable, "-m", "pip", "freeze"], capture_output=True, text=True, timeout=60)
        if freeze.returncode == 0:
            return [line for line in freeze.stdout.splitlines() if wanted(line)]
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    return [f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions() if wanted(d.metadata["Name"])]


# --- int_mm: BitNeRF's real products -----------------------------------------------------------------------------
def ternary_shapes(cfg: Config) -> list[tuple[int, int]]:
    """(K, N) of every ternary product a BitNeRF of `cfg`'s size computes, with and without the direction branch:
    K the layer's input width (the skip layer's is width + the encoding padded to 8, e.g. 256 + 104 = 360 at the
    paper scale)."""
    shapes = set()
    for viewdirs in (False, True):
        field = BitNeRF(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, cfg.bitnet_norm, viewdirs,
                        cfg.n_freqs_dirs)
        shapes |= {(linear.in_features, linear.out_features) for linear in field.quantized_linears()}
    return sorted(shapes)


def check_int_mm(cfg: Config, device: torch.device) -> tuple[bool, dict]:
    """torch._int_mm as BitNeRF calls it (ternary_kernels.ternary_matmul: x_q [M, K] @ ternary [N, K].t(), a
    column-major right operand), eager and under torch.compile, on every (K, N) of the model and rows M of a full
    chunk, a padded partial chunk and an odd evaluation size; exact against float64. A shape cuBLASLt refuses is
    named."""
    if device.type == "mps":
        raise Skip("no int8 matmul kernel on MPS: BitNeRF uses the exact float product there")
    if not probe_int_mm(str(device)):
        if device.type == "cuda":  # int8 tensor cores exist on every GPU this repository targets
            return False, {"int_mm": "torch._int_mm failed ternary_kernels.probe_int_mm: BitNeRF falls back to the "
                                     "float product (see gpu_check.log)"}
        raise Skip("torch._int_mm does not run here: BitNeRF uses the exact float product")
    compiled = torch.compile(lambda x, t: int8_mm(x, t.t()), fullgraph=True, dynamic=True)  # as compile_field does
    gen = torch.Generator().manual_seed(0)
    shapes = ternary_shapes(cfg)
    rows = (cfg.chunk_points, 7 * COMPILED_SIZE_STEP, 1001)
    refused, wrong = {}, []
    for k, n in shapes:
        for m in rows:
            a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8).to(device)
            ternary = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8).to(device)
            exact = a.double() @ ternary.double().t()
            products = (("eager", lambda: int8_mm(a, ternary.t())), ("compiled", lambda: compiled(a, ternary)))
            for how, product in products:
                try:
                    got = product()
                except Exception as err:  # cuBLASLt refusing a layout or size: a row, not a crash
                    print(f"int_mm {how} {m}x{k}x{n}:", file=sys.stderr)
                    traceback.print_exc()
                    refused[f"{how} {m}x{k}x{n}"] = f"{type(err).__name__}: {last_line(err)}"
                    continue
                if got.dtype != torch.int32 or not torch.equal(got.double(), exact):
                    wrong.append(f"{how} {m}x{k}x{n}")
    figures = {"shapes_KxN": " ".join(f"{k}x{n}" for k, n in shapes), "rows_M": " ".join(map(str, rows))}
    if refused or wrong:
        return False, {**figures, **({"refused": refused} if refused else {}), **({"inexact": wrong} if wrong else {})}
    a = torch.randint(-128, 128, (rows[0], shapes[-1][0]), generator=gen, dtype=torch.int8).to(device)
    ternary = torch.randint(-1, 2, (shapes[-1][1], shapes[-1][0]), generator=gen, dtype=torch.int8).to(device)
    eager_ms = statistics.median(timed(lambda: int8_mm(a, ternary.t()), device, 10)) * 1e3
    compiled_ms = statistics.median(timed(lambda: compiled(a, ternary), device, 10)) * 1e3
    return True, {**figures, "exact": True, f"eager_ms_{rows[0]}x{shapes[-1][0]}x{shapes[-1][1]}": round(eager_ms, 3),
                  "compiled_ms": round(compiled_ms, 3)}


# --- training runs -----------------------------------------------------------------------------------------------
def schedule_estimate(first_step_s: float, steady_step_s: float, steps: int = PAPER_EXP1_STEPS) -> float:
    """Seconds of a `steps`-step run: the first step (where torch.compile compiles) once, then the steady step.
    train_time / steps would spread a short run's compilation over every step of the long one."""
    return first_step_s + (steps - 1) * steady_step_s


@functools.lru_cache(maxsize=None)
def _peak_gflops(device: torch.device, dtype: torch.dtype) -> float:
    return matmul_peak(device, dtype, 4096 if device.type == "cuda" else 512, repeats=3)


@functools.lru_cache(maxsize=None)
def black_psnr(data: str, val_views: int) -> float:
    """PSNR of an all-black render of the held-out views (what a collapsed or untrained field shows)."""
    from dataset import load_views, split_views
    from utils import mse_to_psnr

    val = split_views(load_views(data), val_views)[1]
    return mse_to_psnr(float(torch.mean(val.images.float() ** 2)))


def train_run(cfg: Config, device: torch.device, timeout_s: float, learn: bool = False,
              extra: Callable[[Config, dict], tuple[bool, dict]] | None = None) -> tuple[bool, dict]:
    """Train `cfg` with train.train, stopped at `timeout_s` (max_time_s); the figures every training row reports.
    Passes when it finished its steps with a finite held-out PSNR and no graph break; `learn`: and beat an
    all-black render by 1 dB; `extra(cfg, summary)`: the row's own gate and figures."""
    from torch._dynamo.utils import counters

    from assembly import build_field
    from train import train

    if os.path.isdir(cfg.run_dir):  # a fresh run each time: never resume an earlier check's
        shutil.rmtree(cfg.run_dir)
    torch._dynamo.reset()
    counters.clear()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # their reasons, in the log
    with PeakMemory(device) as mem:
        summary = train(replace(cfg, max_time_s=timeout_s))
    points_per_s = summary["train_points_per_s"]
    flops = 6 * linear_macs(build_field(cfg)) * points_per_s
    peak = _peak_gflops(device, amp_policy(cfg.amp, cfg.amp_dtype, device).dtype or torch.float32)
    figures = {"steps": f"{summary['steps']}/{cfg.steps}", "val_psnr": round(summary["val_psnr"], 2),
               "black_psnr": round(black_psnr(cfg.data, cfg.val_views), 2),
               "first_step_s": round(summary["first_step_s"], 2),  # torch.compile compiles here
               "steady_step_ms": round(summary["steady_step_s"] * 1e3, 2), "points_per_s": round(points_per_s),
               "mlp_tflops": round(flops / 1e12, 3), "fraction_of_matmul_peak": round(flops / 1e9 / peak, 3),
               "peak_memory_mib": round(mem.peak), "graphs": int(counters["stats"]["unique_graphs"]),
               "graph_breaks": int(sum(counters["graph_break"].values())), "amp": summary["amp"],
               "compile": cfg.compile}
    if summary["steps"] < cfg.steps:
        figures["stopped"] = f"at the check's {timeout_s:.0f} s limit"
    ok = summary["steps"] == cfg.steps and math.isfinite(summary["val_psnr"]) and figures["graph_breaks"] == 0
    if learn:
        ok = ok and summary["val_psnr"] > figures["black_psnr"] + 1.0
    if extra is not None:
        extra_ok, more = extra(cfg, summary)
        ok, figures = ok and extra_ok, {**figures, **more}
    return ok, figures


def exp1_schedule(cfg: Config, summary: dict) -> tuple[bool, dict]:
    return True, {"exp1_1200_step_schedule_s_est": round(schedule_estimate(summary["first_step_s"],
                                                                           summary["steady_step_s"]), 1)}


def scaler_figures(cfg: Config, summary: dict) -> tuple[bool, dict]:
    """fp16: the GradScaler's scale (in the final checkpoint) and the steps it skipped (metrics.jsonl)."""
    ckpt = torch.load(os.path.join(cfg.run_dir, "ckpt.pt"), map_location="cpu", weights_only=False)
    scale = float(ckpt["scaler"]["scale"]) if ckpt.get("scaler") else float("nan")
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        last = [r for r in map(json.loads, f) if "loss" in r][-1]
    ok = math.isfinite(scale) and scale > 0 and math.isfinite(last["loss"]) and last["skipped_steps"] < cfg.steps
    return ok, {"scaler_scale": scale, "skipped_steps": last["skipped_steps"], "loss": round(last["loss"], 5)}


def check_tf32_off(cfg: Config, device: torch.device, timeout_s: float) -> tuple[bool, dict]:
    if device.type != "cuda":
        raise Skip("TF32 is CUDA's: fp32 matmuls are full fp32 here anyway")
    try:
        return train_run(cfg, device, timeout_s, extra=lambda c, s: (
            torch.get_float32_matmul_precision() == "highest",
            {"matmul_precision": torch.get_float32_matmul_precision()}))
    finally:
        configure_backends(device, tf32=True)  # the other checks run with the default


def check_resume(cfg: Config, done: dict) -> tuple[bool, dict]:
    """Rerun the exp1 run from its mid-way checkpoint: resumption is exact, so it must end where it ended."""
    from train import train

    if done.get("result") != "ok":
        raise Skip("needs the exp1 row's run, which did not pass")
    half = os.path.join(cfg.run_dir, f"ckpt_step{cfg.ckpt_every:07d}.pt")
    os.replace(half, os.path.join(cfg.run_dir, "ckpt.pt"))
    summary = train(cfg)
    gap = abs(summary["val_psnr"] - done["val_psnr"])
    return summary["steps"] == cfg.steps and gap < 0.05, {
        "from_step": cfg.ckpt_every, "to_step": summary["steps"], "val_psnr": round(summary["val_psnr"], 2),
        "uninterrupted_val_psnr": done["val_psnr"]}


def check_export(cfg: Config, device: torch.device, done: dict) -> tuple[bool, dict]:
    import evaluate
    import export

    if done.get("result") != "ok":
        raise Skip("needs the exp4 row's run, which did not pass")
    ckpt, packed = os.path.join(cfg.run_dir, "ckpt.pt"), os.path.join(cfg.run_dir, "model.bitnerf")
    result = os.path.join(cfg.run_dir, "bitnerf_eval.json")
    if export.main(["--ckpt", ckpt, "--out", packed]) != 0:
        return False, {"export": "failed (see gpu_check.log)"}
    code = evaluate.main(["--ckpt", packed, "--device", str(device), "--json", result])
    if code != 0:
        return False, {"evaluate": f"exit code {code} (see gpu_check.log)"}
    with open(result) as f:
        psnr = json.load(f)["psnr"]
    return bool(np.isfinite(psnr)), {"bytes": os.path.getsize(packed), "val_psnr": round(psnr, 2)}


# --- host syncs and DDP, on batches that make several micro-batches ---------------------------------------------
def ray_batches(cfg: Config, device: torch.device, rays: int = 4096, parts: int = 8):
    """(cfg, RayBatcher) for batches of `rays` random rays with chunk_points a `parts`-th of their samples. The
    paper scale's batch_size counts images and the GPU's chunks hold a whole step, so its own batches would be
    one micro-batch and never exercise the micro-batch plan or DDP's no_sync. The occupancy grid keeps only the
    samples inside its box, so fewer micro-batches than parts come out (8 parts made 6 and 4 parts 3 on the CPU
    run's scene); the rows check the number."""
    from dataset import RayBatcher, load_views, split_views

    views = split_views(load_views(cfg.data), cfg.val_views)[0].to(device)
    chunk = max(COMPILED_SIZE_STEP, rays * points_per_ray(cfg) // parts // COMPILED_SIZE_STEP * COMPILED_SIZE_STEP)
    cfg = replace(cfg, batch_unit="ray", batch_size=rays, chunk_points=chunk)
    return cfg, RayBatcher(views, "ray", rays, cfg.seed)


class SyncingOps(TorchDispatchMode):
    """The aten ops that make a GPU wait for the host: an output whose size depends on the data (nonzero,
    masked_select, unique, a boolean mask as an index) or a value read back (_local_scalar_dense: .item(), bool())."""

    SIZED = ("aten.nonzero", "aten.masked_select", "aten.unique", "aten._unique")
    INDEXING = ("aten.index.Tensor", "aten.index_put", "aten._index_put_impl", "aten.masked_scatter")
    READ = "aten._local_scalar_dense"

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        masks = [i for a in args if isinstance(a, (list, tuple)) for i in a
                 if isinstance(i, torch.Tensor) and i.dtype == torch.bool]
        if name.startswith(self.SIZED + (self.READ,)) or (name.startswith(self.INDEXING) and masks):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def python_reads():
    """The calls that read a tensor's value into Python (a sync on a GPU each): item, tolist, int(), float(),
    bool(), index()."""
    calls, names = [], ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}
    for name, original in originals.items():
        setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name, **k: (calls.append(_n), _o(t, *a, **k))[1])
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def check_host_syncs(cfg: Config, device: torch.device) -> tuple[bool, dict]:
    """Host syncs per Trainer.step with empty-space skipping: at most one (the micro-batch plan's .tolist()). On
    CUDA as torch.cuda.set_sync_debug_mode reports them; elsewhere the Python reads (python_reads) plus the aten
    ops that would sync (SyncingOps; its .item()/bool() reads are already among the Python reads)."""
    import warnings

    from assembly import build_renderer
    from train import Trainer, step_generator

    cfg, batcher = ray_batches(cfg, device)
    trainer = Trainer(cfg, build_renderer(cfg, device), Dist(), device)
    steps = 5
    batches = [batcher.batch(k) for k in range(steps + 1)]  # made before counting: the step is what is counted

    def step(k: int) -> None:
        trainer.step(*batches[k], step_generator(cfg.seed, 0, k, device), cfg.lr)

    step(0)  # compiles
    micro_batches = len(trainer.micro_batches(trainer.raw.sampler.sample(*batches[0][:2], None))[0])
    figures = {"rays": cfg.batch_size, "chunk_points": cfg.chunk_points, "micro_batches": micro_batches}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for k in range(1, steps + 1):
                    step(k)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = sum("synchroniz" in str(w.message) for w in caught) / steps
        for w in caught:
            print(f"sync: {w.message}", file=sys.stderr)  # where each one is, in the log
    else:
        with python_reads() as calls, SyncingOps() as mode:
            for k in range(1, steps + 1):
                step(k)
        sized = [op for op in mode.ops if not op.startswith(SyncingOps.READ)]
        syncs = (len(calls) + len(sized)) / steps
        figures.update(python_reads_per_step=len(calls) / steps, aten_syncing_ops_per_step=len(mode.ops) / steps,
                       aten_ops=" ".join(sorted(set(mode.ops))) or "none")
    ok = micro_batches >= 3 and syncs <= 1
    return ok, {"syncs_per_step": syncs, **figures}


def check_ddp_compiled(cfg: Config, device: torch.device) -> tuple[bool, dict]:
    """The Trainer's DDP path (compiled field, no DDPOptimizer, no_sync on all but the last micro-batch) on a 1-rank
    group equals the same two steps without DDP."""
    import torch.distributed as dist

    from assembly import build_renderer
    from train import Trainer, step_generator

    if device.type == "mps":
        raise Skip("no DDP on MPS: gloo has no MPS tensors and NCCL needs CUDA (torchrun runs such jobs on the CPU)")
    cfg, batcher = ray_batches(replace(cfg, compile=True), device, parts=4)
    rays_o, rays_d, target = batcher.batch(0)
    params = {}
    configure_backends(device, tf32=True, distributed=True)  # as train() sets up a DDP run: no DDPOptimizer
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                            world_size=1)
    try:
        for label, dist_info in (("ddp", SimpleNamespace(enabled=True, rank=0, world_size=1, is_master=True)),
                                 ("plain", Dist())):
            torch.manual_seed(cfg.seed)
            raw = build_renderer(cfg, device)
            trainer = Trainer(cfg, raw, dist_info, device)
            for step in range(2):
                trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, 0, step, device), cfg.lr)
            params[label] = {k: v.detach().clone() for k, v in raw.state_dict().items()}
            micro_batches = len(trainer.micro_batches(raw.sampler.sample(rays_o, rays_d, None))[0])
    finally:
        dist.destroy_process_group()
    diff = max(float((params["ddp"][k].float() - params["plain"][k].float()).abs().max()) for k in params["ddp"])
    return diff < 1e-5 and micro_batches >= 2, {"max_param_diff": diff, "micro_batches": micro_batches,
                                                 "backend": "nccl" if device.type == "cuda" else "gloo"}


# --- pytest and torchrun, in subprocesses with timeouts ------------------------------------------------------------
def check_tests(device: torch.device, timeout_s: float) -> tuple[bool, dict]:
    """The tests marked `cuda` (pytest.ini): the ones that skip themselves without CUDA, so CI never runs them."""
    if device.type != "cuda":
        raise Skip("the tests marked cuda need CUDA; CI runs the rest of the suite on CPU")
    code, output = run_logged([sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfE", "-p", "no:cacheprovider"],
                              timeout_s)
    failed = [line.split(" - ")[0].split(" ", 1)[1] for line in output.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    summary = (output.strip().splitlines() or ["no output"])[-1]
    if code == 5:
        return False, {"pytest": "no test selected by -m cuda (see gpu_check.log)"}
    return code == 0, {"pytest": summary, **({"failed": " ".join(failed)} if failed else {})}


TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # torchrun sets its workers'
TOY_ARGS = ["--width=32", "--depth=2", "--skip_layer=1", "--n_freqs=4", "--n_samples=16", "--batch_unit=ray",
            "--batch_size=256", "--chunk_points=8192", "--occ_resolution=32", "--compile=false"]


def torchrun_exp5(run_dir: str, data: str, nproc: int, args: list[str], timeout_s: float,
                  env_extra: dict | None = None) -> tuple[bool, dict]:
    """`torchrun --standalone --nproc_per_node=nproc exp5.py` as the README launches it: train.train end to end,
    summary.json read back."""
    shutil.rmtree(run_dir, ignore_errors=True)
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
    env.update(WANDB_MODE="disabled", **(env_extra or {}))
    code, output = run_logged([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               f"--nproc_per_node={nproc}", "exp5.py", f"--data={data}", f"--out_dir={run_dir}",
                               "--val_views=4", "--video=false", "--wandb=disabled", "--eval_every=0",
                               "--log_every=5", *args], timeout_s, env)
    if code != 0:
        tail = (output.strip().splitlines() or ["no output"])[-1]
        return False, {"exit_code": code, "last_line": f"{tail} (see gpu_check.log)"}
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    ok = summary["world_size"] == nproc and math.isfinite(summary["val_psnr"])
    return ok, {"world_size": summary["world_size"], "steps": summary["steps"], "device": summary["device"],
                "val_psnr": round(summary["val_psnr"], 2), "first_step_s": round(summary["first_step_s"], 2),
                "steady_step_ms": round(summary["steady_step_s"] * 1e3, 2)}


def check_exp5_gpu(device: torch.device, out: str, data: str, timeout_s: float) -> tuple[bool, dict]:
    if device.type != "cuda":
        raise Skip("needs CUDA: this is the torchrun job on the GPU (exp5_2cpu is the CPU one)")
    # one process under torchrun is still a process group (hardware.compute_init): NCCL, DDP, the flag
    # all-reduces and the replica check through the real train(), on one GPU
    return torchrun_exp5(os.path.join(out, "exp5_1gpu"), data, 1, ["--device=cuda", "--steps=20"], timeout_s)


def check_exp5_cpu(out: str, data: str, timeout_s: float) -> tuple[bool, dict]:
    # one thread per rank unless told otherwise: two ranks' thread pools on the same cores only slow both
    return torchrun_exp5(os.path.join(out, "exp5_2cpu"), data, 2, ["--device=cpu", "--steps=6", *TOY_ARGS],
                         timeout_s, {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})


# --- the run -----------------------------------------------------------------------------------------------------
def configs_for(device: torch.device, out: str, data: str) -> dict[str, Config]:
    """Every training row's config: the paper scale on a GPU (its speed), the cpu scale on an Apple GPU (what
    --scale=auto gives it), toy sizes run eagerly on a CPU (CI). The learning gate runs the cpu scale on a GPU: the
    paper-scale exp1 has collapsed to a black render on the procedural scene (docs/results.md, Known limits) and
    no GPU has run its learning curve, while the cpu scale's exp1 reached 22.2 dB against the black render's 12.25
    in 300 steps of this scene at 100x100 (measured on a CPU, eagerly): a 10 dB margin over the 1 dB gate."""
    kind = device.type
    if kind == "cpu":
        toy = dict(width=64, depth=4, skip_layer=2, n_freqs=6, n_samples=32, batch_unit="ray", batch_size=1024,
                   occ_resolution=32, compile=False, lr=5e-3)
        sized = lambda preset: replace(preset, **toy)  # noqa: E731
        learn = replace(sized(EXP1), steps=150)  # toy: 19.6 dB against black's 12.2 on the 32x32 scene
    else:
        scale = "paper" if kind == "cuda" else "cpu"
        sized = lambda preset: apply_device_defaults(apply_scale(preset, scale), kind)  # noqa: E731
        learn = replace(apply_device_defaults(apply_scale(EXP1, "cpu"), kind), steps=300, warmup_steps=50)
    cfgs = {"exp1": replace(sized(EXP1), steps=60), "learn": learn, "exp2": replace(sized(EXP2), steps=60),
            "exp4": replace(sized(EXP4), steps=60), "fp16": replace(sized(EXP1), amp=True, amp_dtype="fp16", steps=20),
            "tf32_off": replace(sized(EXP1), tf32=False, steps=20),
            "skip_off": replace(sized(EXP1), skip=False, steps=20),
            "bitnerf_amp": replace(sized(EXP4), amp=True, steps=20), "exp3": replace(sized(EXP3), steps=5)}
    if kind == "cpu":  # the toy batches are rays: exp3's are 8 whole images, as at the paper scale
        cfgs["exp3"] = replace(cfgs["exp3"], batch_unit="image", batch_size=8)
    common = dict(data=data, val_views=4, video=False, wandb="disabled", eval_every=0, log_every=10, seed=0,
                  keep_ckpts=3, device=str(device))
    return {n: replace(c, **common, ckpt_every=c.steps // 2, out_dir=os.path.join(out, n)) for n, c in cfgs.items()}


def build_checks(device: torch.device, out: str, data: str) -> list[Check]:
    """The rows, in order of importance (budget skips drop the last ones); budgets: the module docstring's table."""
    cfgs = configs_for(device, out, data)
    done: dict[str, dict] = {}  # a training row's figures and result, for the rows that reuse its run

    def training(name: str, budget: float, **kwargs) -> Check:
        def run(timeout: float) -> tuple[bool, dict]:
            ok, figures = train_run(cfgs[name], device, timeout, **kwargs)
            done[name] = {**figures, "result": "ok" if ok else "FAILED"}
            return ok, figures
        return Check(name, budget, run)

    def fp16(timeout: float) -> tuple[bool, dict]:
        if device.type == "mps" and not torch_at_least(2, 8):
            raise Skip(f"fp16's GradScaler on MPS needs torch >= 2.8 (this is {torch.__version__})")
        return train_run(cfgs["fp16"], device, timeout, extra=scaler_figures)

    def skip_off(timeout: float) -> tuple[bool, dict]:
        if device.type == "mps":
            raise Skip("MPS runs eagerly (configs.apply_device_defaults): there is no compiled graph to check")
        return train_run(cfgs["skip_off"], device, timeout)

    return [
        Check("environment", 10, lambda t: check_environment(device)),
        Check("int_mm", 20, lambda t: check_int_mm(cfgs["exp4"], device)),
        training("exp1", 45, extra=exp1_schedule),
        training("learn", 25, learn=True),
        training("exp2", 30),
        training("exp4", 40),
        Check("syncs", 15, lambda t: check_host_syncs(cfgs["exp1"], device)),
        Check("ddp", 20, lambda t: check_ddp_compiled(cfgs["exp1"], device)),
        Check("resume", 15, lambda t: check_resume(cfgs["exp1"], done.get("exp1", {}))),
        Check("export", 10, lambda t: check_export(cfgs["exp4"], device, done.get("exp4", {}))),
        Check("tests", 60, lambda t: check_tests(device, t)),
        Check("fp16", 20, fp16),
        Check("tf32_off", 20, lambda t: check_tf32_off(cfgs["tf32_off"], device, t)),
        Check("skip_off", 30, skip_off),
        training("bitnerf_amp", 25),
        training("exp3", 20),
        Check("exp5_1gpu", 45, lambda t: check_exp5_gpu(device, out, data, t)),
        Check("exp5_2cpu", 30, lambda t: check_exp5_cpu(out, data, t)),
    ]


def _parse(argv):
    p = ArgParser(prog="gpu_check.py", description="Check the device policy, CUDA tests and short runs here.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs, gpu_check.md and gpu_check.log")
    p.add_argument("--data", help="views to train on (default: a procedural scene written to OUT; on a GPU "
                                  "real data such as data/tiny_nerf_data.npz is the better test, see README)")
    p.add_argument("--budget", type=float, default=360.0,
                   help="seconds for all the checks: a check whose budget no longer fits is skipped, with a row "
                        "saying so (default 360)")
    return p.parse_args(argv)


def _check(argv) -> int:
    args = _parse(argv)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # --device=cuda:N: NCCL and DDP (the ddp row) take the current device
    configure_backends(device, tf32=True)
    os.makedirs(args.out, exist_ok=True)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "scene.npz")
        gpu = device.type != "cpu"
        np.savez(data, **synthetic_scene(n_views=40 if gpu else 16, size=100 if gpu else 32, seed=3))
    rows = run_checks(build_checks(device, args.out, data), args.out, args.budget, environment_text(device))
    return 0 if all(row.result != "FAILED" for row in rows) else 1


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _check(argv))


if __name__ == "__main__":
    sys.exit(main())
