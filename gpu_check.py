"""Check this repository on a new machine, GPU first: the device policy, the CUDA tests, short real runs.

    python gpu_check.py                      # on a GPU: about 5-10 minutes
    python gpu_check.py --device=cpu         # the same checks at toy sizes (about a minute; CI runs it)

Checks, in order (each one a row of OUT/gpu_check.md, default OUT = runs/gpu_check):
  environment   torch, CUDA, the GPU and its capability, native bf16?, TF32, the AMP dtype auto picks, _int_mm
  tests         the test files with CUDA tests (GPU only: CI runs the whole suite on CPU)
  int_mm        BitNeRF's int8 product (torch._int_mm as a custom op) under torch.compile equals the exact
                float product (and its time against eager torch._int_mm)
  exp1/exp2/exp4  short training runs (paper scale on a GPU, toy on a CPU; compiled on a GPU) on the procedural
                scene: held-out PSNR, points/s, fraction of the measured matmul peak, peak memory, graphs
                compiled and graph breaks (a graph break or recompile storm shows here first)
  resume        the exp1 run rerun from its mid-way checkpoint ends where the uninterrupted run ended
  syncs         host syncs per training step with empty-space skipping (torch.cuda.set_sync_debug_mode on CUDA)
  export        the exp4 run exported to .bitnerf and evaluated on the device
  ddp           one step of the compiled field inside DistributedDataParallel on a 1-rank group (NCCL on CUDA,
                gloo on CPU) equals the same step without DDP
Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import torch

from bench import PeakMemory, linear_macs, matmul_peak, timed
from bitnerf import int8_mm
from configs import EXP1, EXP2, EXP4, apply_device_defaults, apply_scale
from dataset import synthetic_scene
from hardware import (amp_policy, configure_backends, cpu_has_native_bf16, int_mm_available, integer_product,
                      pick_device, probe_int_mm)
from utils import ArgParser, Dist, run_cli

GPU_STEPS, CPU_STEPS = 300, 150  # per training run; the paper-scale exp1 schedule is 1200 steps (50 epochs x 24)
PAPER_EXP1_STEPS = 1200


# --- the checks: each returns (passed, {figure: value}) ----------------------------------------------------------
def check_environment(device: torch.device) -> tuple[bool, dict]:
    facts = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device)}
    if device.type == "cuda":
        facts.update(cuda=torch.version.cuda, gpu=torch.cuda.get_device_name(device),
                     capability=".".join(map(str, torch.cuda.get_device_capability(device))),
                     memory_gib=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1),
                     bf16_native=torch.cuda.get_device_capability(device) >= (8, 0),
                     matmul_precision=torch.get_float32_matmul_precision())
    else:
        facts.update(cpu=platform.processor() or platform.machine(), threads=torch.get_num_threads(),
                     bf16_native=cpu_has_native_bf16())
    facts["amp_auto"] = amp_policy(True, "auto", device).reason
    facts["int_mm"] = int_mm_available(device)
    facts["integer_product"] = integer_product(device)  # onednn | int_mm | float
    return True, facts


def check_tests(device: torch.device) -> tuple[bool, dict]:
    if device.type != "cuda":
        return True, {"skipped": "no GPU here; CI runs the whole suite on CPU"}
    files = ["tests/test_models.py", "tests/test_export.py", "tests/test_hardware.py"]
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    return proc.returncode == 0, {"pytest": last}


def check_int_mm_compiled(device: torch.device) -> tuple[bool, dict]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (8192, 256), generator=gen, dtype=torch.int8).to(device)
    b = torch.randint(-1, 2, (256, 256), generator=gen, dtype=torch.int8).to(device)
    if not probe_int_mm(str(device)):
        return device.type != "cuda", {"int_mm": "not available here: the exact float product is used"}
    exact = a.cpu().double() @ b.cpu().double()  # on the CPU: an Apple GPU has no float64
    compiled = torch.compile(lambda x, y: int8_mm(x, y), fullgraph=True, dynamic=True)  # as BitNeRF calls it
    got = compiled(a, b)
    eager_ms = statistics.median(timed(lambda: torch._int_mm(a, b), device, 10)) * 1e3
    compiled_ms = statistics.median(timed(lambda: compiled(a, b), device, 10)) * 1e3
    ok = got.dtype == torch.int32 and torch.equal(got.cpu().double(), exact)
    return ok, {"exact": ok, "eager_ms": round(eager_ms, 3), "compiled_ms": round(compiled_ms, 3)}


def train_run(name: str, cfg, device: torch.device) -> tuple[bool, dict]:
    """Train `cfg`; held-out PSNR, speed, memory, and what torch.compile did."""
    from torch._dynamo.utils import counters

    from train import train

    torch._dynamo.reset()
    counters.clear()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)  # their reasons, in the log
    with PeakMemory(device) as mem:
        start = time.perf_counter()
        summary = train(cfg)
        wall = time.perf_counter() - start
    points_per_s = summary["train_points_per_s"]
    from assembly import build_field

    macs = linear_macs(build_field(cfg))
    amp = amp_policy(cfg.amp, cfg.amp_dtype, device).dtype
    peak = matmul_peak(device, amp or torch.float32, 4096 if device.type == "cuda" else 512, repeats=3)
    step_s = summary["train_time_s"] / max(1, summary["steps"])
    figures = {"steps": summary["steps"], "val_psnr": round(summary["val_psnr"], 2), "wall_s": round(wall, 1),
               "step_ms": round(step_s * 1e3, 2), "points_per_s": round(points_per_s),
               "mlp_tflops": round(6 * macs * points_per_s / 1e12, 3),
               "fraction_of_matmul_peak": round(6 * macs * points_per_s / 1e9 / peak, 3),
               "peak_memory_mib": round(mem.peak), "graphs": int(counters["stats"]["unique_graphs"]),
               "graph_breaks": int(sum(counters["graph_break"].values())), "amp": summary["amp"]}
    if name == "exp1":
        figures["exp1_1200_step_schedule_s_est"] = round(PAPER_EXP1_STEPS * step_s, 1)
    # learning, not just running: clearly better than rendering nothing (black) on the held-out views
    figures["black_psnr"] = round(black_psnr(cfg), 2)
    ok = summary["val_psnr"] > figures["black_psnr"] + 1.0 and figures["graph_breaks"] == 0
    return ok, figures


def black_psnr(cfg) -> float:
    """PSNR of an all-black render of the held-out views (what an untrained field shows)."""
    from dataset import load_views, split_views
    from utils import mse_to_psnr

    val = split_views(load_views(cfg.data), cfg.val_views)[1]
    return mse_to_psnr(float(torch.mean(val.images.float() ** 2)))


def check_resume(cfg, device: torch.device, finished: dict) -> tuple[bool, dict]:
    """Rerun the exp1 run from its mid-way checkpoint: resumption is exact, so it must end where it ended."""
    from train import train

    half = os.path.join(cfg.run_dir, f"ckpt_step{cfg.ckpt_every:07d}.pt")
    os.replace(half, os.path.join(cfg.run_dir, "ckpt.pt"))
    summary = train(cfg)
    gap = abs(summary["val_psnr"] - finished["val_psnr"])
    return summary["steps"] == cfg.steps and gap < 0.05, {
        "from_step": cfg.ckpt_every, "to_step": summary["steps"], "val_psnr": round(summary["val_psnr"], 2),
        "uninterrupted_val_psnr": finished["val_psnr"]}


def check_export(cfg, device: torch.device) -> tuple[bool, dict]:
    import evaluate
    import export

    ckpt = os.path.join(cfg.run_dir, "ckpt.pt")
    packed = os.path.join(cfg.run_dir, "model.bitnerf")
    result = os.path.join(cfg.run_dir, "bitnerf_eval.json")
    if export.main(["--ckpt", ckpt, "--out", packed]) != 0:
        return False, {"export": "failed"}
    code = evaluate.main(["--ckpt", packed, "--device", str(device), "--json", result])
    if code != 0:
        return False, {"evaluate": f"exit code {code}"}
    with open(result) as f:
        psnr = json.load(f)["psnr"]
    return bool(np.isfinite(psnr)), {"bytes": os.path.getsize(packed), "val_psnr": round(psnr, 2)}


def check_host_syncs(cfg, device: torch.device) -> tuple[bool, dict]:
    """Host syncs per training step with empty-space skipping (each one idles a GPU): on CUDA as
    torch.cuda.set_sync_debug_mode reports them, on a CPU the .item()/.tolist()/int()/float()/bool() calls."""
    import warnings

    from assembly import build_renderer
    from dataset import RayBatcher, load_views, split_views
    from train import Trainer, step_generator

    views = split_views(load_views(cfg.data), cfg.val_views)[0].to(device)
    batcher = RayBatcher(views, "ray", cfg.batch_size, cfg.seed)
    trainer = Trainer(cfg, build_renderer(cfg, device), Dist(), device)

    def step(k: int) -> None:
        rays_o, rays_d, target = batcher.batch(k)
        trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, 0, k, device), cfg.lr)

    step(0)  # compiles
    steps = 5
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
        syncs = sum("synchroniz" in str(w.message) for w in caught)
    else:
        calls = []
        names = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")
        originals = {name: getattr(torch.Tensor, name) for name in names}
        for name, original in originals.items():
            setattr(torch.Tensor, name, lambda t, *a, _o=original, _n=name, **k: (calls.append(_n), _o(t, *a, **k))[1])
        try:
            for k in range(1, steps + 1):
                step(k)
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)
        syncs = len(calls)
    micro_batches = len(trainer.micro_batches(trainer.raw.sampler.sample(*batcher.batch(0)[:2], None))[0])
    # per step: the micro-batch plan's one .tolist(), and one per micro-batch (its occupied points' count)
    return syncs / steps <= 1 + micro_batches, {"syncs_per_step": syncs / steps, "micro_batches": micro_batches}


def check_ddp_compiled(cfg, device: torch.device) -> tuple[bool, dict]:
    """The Trainer's DDP path (compiled field, no DDPOptimizer, no_sync micro-batches) on a 1-rank group."""
    import torch.distributed as dist

    from assembly import build_renderer
    from dataset import RayBatcher, load_views, split_views
    from train import Trainer, step_generator

    cfg = replace(cfg, compile=True, chunk_points=2048 if device.type == "cpu" else cfg.chunk_points)
    views = split_views(load_views(cfg.data), cfg.val_views)[0].to(device)
    rays_o, rays_d, target = RayBatcher(views, "ray", cfg.batch_size, cfg.seed).batch(0)
    params = {}
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
    return diff < 1e-5, {"max_param_diff": diff, "micro_batches": micro_batches}


# --- the run -----------------------------------------------------------------------------------------------------
def configs_for(device: torch.device, out: str, data: str) -> dict:
    """exp1/exp2/exp4 for this check: paper scale on a GPU, toy on a CPU (eager, so CI stays quick)."""
    common = dict(data=data, val_views=4, video=False, wandb="disabled", eval_every=0, log_every=10, seed=0)
    if device.type == "cuda":
        sized = {n: apply_device_defaults(apply_scale(c, "paper"), "cuda") for n, c in
                 (("exp1", EXP1), ("exp2", EXP2), ("exp4", EXP4))}
        steps = GPU_STEPS
    else:
        toy = dict(width=64, depth=4, skip_layer=2, n_freqs=6, n_samples=32, batch_unit="ray", batch_size=1024,
                   occ_resolution=32, compile=False, lr=5e-3)
        sized = {"exp1": replace(EXP1, **toy), "exp2": replace(EXP2, **toy), "exp4": replace(EXP4, **toy)}
        steps = CPU_STEPS
    return {n: replace(c, **common, steps=steps, ckpt_every=steps // 2, keep_ckpts=3, device=str(device),
                       out_dir=os.path.join(out, n)) for n, c in sized.items()}


def write_report(rows: list[tuple[str, bool, dict]], path: str) -> None:
    lines = ["# gpu_check", "", "| check | result | figures |", "|---|---|---|"]
    for name, ok, figures in rows:
        shown = ", ".join(f"{k}={v}" for k, v in figures.items()).replace("|", "/")
        lines.append(f"| {name} | {'ok' if ok else 'FAILED'} | {shown} |")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def _parse(argv):
    p = ArgParser(prog="gpu_check.py", description="Check the device policy, CUDA tests and short runs here.")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--out", default="runs/gpu_check", help="folder for the runs and gpu_check.md")
    p.add_argument("--data", help="views to train on (default: a procedural scene written to OUT; on a GPU "
                                  "real data such as data/tiny_nerf_data.npz is the better test, see README)")
    return p.parse_args(argv)


def _check(argv) -> int:
    args = _parse(argv)
    device = pick_device(args.device)
    configure_backends(device, tf32=True)
    os.makedirs(args.out, exist_ok=True)
    data = args.data
    if data is None:
        data = os.path.join(args.out, "scene.npz")
        size = 100 if device.type == "cuda" else 32
        np.savez(data, **synthetic_scene(n_views=40 if device.type == "cuda" else 16, size=size, seed=3))
    cfgs = configs_for(device, args.out, data)
    for cfg in cfgs.values():  # a fresh check each time: never resume an earlier check's runs
        if os.path.isdir(cfg.run_dir):
            shutil.rmtree(cfg.run_dir)
    checks = [("environment", lambda: check_environment(device)), ("tests", lambda: check_tests(device)),
              ("int_mm", lambda: check_int_mm_compiled(device))]
    checks += [(name, lambda cfg=cfg, name=name: train_run(name, cfg, device)) for name, cfg in cfgs.items()]
    checks += [("resume", lambda: check_resume(cfgs["exp1"], device, results["exp1"])),
               ("export", lambda: check_export(cfgs["exp4"], device)),
               ("syncs", lambda: check_host_syncs(cfgs["exp1"], device)),
               ("ddp", lambda: check_ddp_compiled(cfgs["exp1"], device))]
    rows, results = [], {}
    report = os.path.join(args.out, "gpu_check.md")
    for name, run in checks:
        print(f"== {name}", flush=True)
        try:
            ok, figures = run()
        except Exception as err:  # a failed check is a row of the report, and the next check still runs
            traceback.print_exc()
            ok, figures = False, {"error": f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"}
        rows.append((name, ok, figures))
        results[name] = figures
        print(f"   {'ok' if ok else 'FAILED'}: {figures}", flush=True)
        write_report(rows, report)  # as it goes: a check that hangs leaves the rows before it
    print(f"wrote {report}")
    return 0 if all(ok for _, ok, _ in rows) else 1


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _check(argv))


if __name__ == "__main__":
    sys.exit(main())
