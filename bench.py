"""Benchmarks: training-step and render throughput against the device's matmul peak, and time to quality.

Throughput mode (default): for each model (NeRF with exp1's architecture, BitNeRF with exp4's), eager and
compiled, fp32 and autocast, one child process per variant (so its peak memory is its own) builds the real
`train.Trainer` and times `Trainer.step` on random rays of a procedural scene.

    python bench.py [--model nerf|bitnerf|all] [--compile both|on|off] [--amp both|on|off] [--batch-rays N]
                    [--chunk-points P] [--repeats K] [--json OUT]

Reported per variant: median step time over K timed steps after warm-up; the share of the samples the field is
evaluated at (below 100% where the occupancy grid skips some); field evaluations/s (as training's points/s counts
them) and rays/s; achieved MLP GFLOP/s and its fraction of the same process's measured matmul peak; no-grad render
samples/s (every sample of the view's rays, skipped or not); peak memory.

FLOP count (stated, not measured): a Linear(in, out) costs 2*in*out per point forward and 4*in*out backward
(grad of input + grad of weight), so a training step costs 6 * sum(in*out over the field's Linears) per
evaluated point and a render 2 * sum(in*out). Points evaluated per ray: n_samples, plus n_samples +
n_importance for the fine pass when n_importance > 0 (the same field serves both passes). The positional
encoding, activations, norms and compositing are not counted, so the fraction is of *useful* matmul work.
Fields that are not MLPs (the grid field) report FLOP-based columns only for their decoder MLP.

Peak memory during the timed steps: CPU: the child process's peak resident set (VmHWM, reset through
/proc/self/clear_refs when the timed steps start; it includes Python, torch and the data, ~0.4 GB); GPU:
torch.cuda.max_memory_allocated.

BitNeRF/NeRF ratio mode (BitNeRF's training-step time per point over NeRF's, at the same size):

    python bench.py --ratio [--ratio-sizes small,cpu,exp4] [--compile both] [--amp off] [--repeats 9] [--threads 1]
                    [--bitnerf-impl fused|torchao]

builds NeRF and quantized BitNeRF fields of the same size in one process and times a field-only training step
(micro-batches of --chunk-points, default 8192, times --ratio-chunks, forward + MSE backward, then AdamW) of each,
alternately; the ratio is the median of the per-pair ratios (also reported: the ratio of process CPU times, steadier
when other work shares the cores). Sizes: small = 4x64, L=6, skip 2; cpu = 4x128, L=8, skip 2 (the cpu scale's field);
exp4 = 8x256, L=16, skip 4 (the paper scale's).

Time-to-quality mode:

    python bench.py --quality --preset fast --data data/lego100.npz --val-views 10 --minutes 3

trains the preset for that much training time (evaluation excluded) with held-out evaluations along the way
and prints held-out PSNR against training time (read back from the run's metrics.jsonl).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import statistics
import sys
import time
from dataclasses import replace
from queue import Empty

import torch

from configs import PRESETS, Config, points_per_ray, rays_per_chunk
from hardware import amp_policy, bitnet_bf16_grads, configure_backends, pick_device
from utils import ArgParser, Dist, UserError, run_cli

DEFAULT_PRESET = {"nerf": "exp1", "bitnerf": "exp4", "grid": "fast"}


# --- measurements --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of `repeats` calls of fn() after `warmup` untimed calls (device-synchronised)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """Measured GFLOP/s of a size x size matmul (2 size^3 FLOP), median of `repeats`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / statistics.median(timed(lambda: a @ b, device, repeats)) / 1e9


def linear_macs(module: torch.nn.Module) -> int:
    """sum(in * out) over the module's Linear layers: multiply-adds per point of one forward pass."""
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, torch.nn.Linear))


def _rss_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.MULTILINE).group(1))


class PeakMemory:
    """Peak memory while the block runs, in MiB: `peak` (the process's whole resident set on CPU, the CUDA
    allocator's peak on GPU) and `before` (the same measure when the block started)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = self.before = float("nan")

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device) / 2**20
        elif os.path.exists("/proc/self/clear_refs"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets the peak (VmHWM) to the current resident set (Linux >= 4.0)
            self.before = _rss_kib("VmRSS") / 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif os.path.exists("/proc/self/clear_refs"):
            self.peak = _rss_kib("VmHWM") / 1024


# --- one variant (runs in its own process) -------------------------------------------------------------------
def variant_config(model: str, preset: str | None, compiled: bool, amp: bool, batch_rays: int,
                   chunk_points: int | None, skip: bool = True) -> Config:
    base = PRESETS[preset or DEFAULT_PRESET[model]]
    # skip: the occupancy grid's packed path on a grid that is not carved, so that the two rows of a model compare
    # the skipping machinery's cost more than its savings; the grid's own refreshes may still empty cells, which
    # the row's share of samples evaluated shows
    cfg = replace(base, model=model, compile=compiled, amp=amp, batch_unit="ray", batch_size=batch_rays,
                  wandb="disabled", video=False, skip=skip and model != "grid", occ_carve=False,
                  n_importance=0 if skip and model != "grid" else base.n_importance)
    return replace(cfg, chunk_points=chunk_points) if chunk_points else cfg


def measure(cfg: Config, views, device: torch.device, repeats: int, warmup: int) -> dict:
    """Time `train.Trainer.step` on random rays of `views` and a no-grad render of one view, for one config.

    Each timed step is followed by one timed 2048^2 fp32 matmul, so the peak it is compared with was measured
    under the same load (the median of each is reported).
    """
    from dataset import RayBatcher
    from renderer import get_rays, render_image
    from assembly import build_renderer
    from train import Trainer, step_generator

    torch.manual_seed(cfg.seed)
    batcher = RayBatcher(views, "ray", cfg.batch_size, cfg.seed)
    renderer = build_renderer(cfg, device)
    configure_backends(device, cfg.tf32)
    trainer = Trainer(cfg, renderer, Dist(), device)
    step = [0]

    evaluated = []  # field evaluations of each step: with skipping, the occupied samples only

    def train_step():
        rays_o, rays_d, target = batcher.batch(step[0])
        trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, 0, step[0], device), cfg.lr)
        evaluated.append(int(trainer.last_points))
        step[0] += 1

    start = time.perf_counter()
    train_step()  # compiles when compiling
    first_s = time.perf_counter() - start
    a = torch.randn(2048, 2048, device=device)
    step_times, cpu_times, peaks = [], [], []
    with PeakMemory(device) as mem:
        for _ in range(warmup):
            train_step()
        for _ in range(repeats):
            cpu = time.process_time()
            step_times += timed(train_step, device, 1, warmup=0)
            cpu_times.append(time.process_time() - cpu)
            peaks.append(2 * 2048**3 / timed(lambda: a @ a, device, 1, warmup=0)[0] / 1e9)
    # the render path of evaluation: one whole view, no grad, eval mode, through the same (compiled) module
    rays_o, rays_d = get_rays(views.height, views.width, views.focal, views.poses[0])
    chunk_rays = rays_per_chunk(cfg)
    trainer.model.eval()
    render_times = timed(lambda: render_image(trainer.model, rays_o, rays_d, chunk_rays, trainer.autocast_dtype),
                         device, max(1, repeats // 2), warmup=2)
    trainer.model.train()
    # bf16 matmuls on CPUs without AVX512-BF16/AMX run at a few GFLOP/s: a small size keeps this quick
    peak_bf16 = matmul_peak(device, torch.bfloat16, 2048 if device.type == "cuda" else 512, repeats=3)

    per_ray = points_per_ray(cfg)
    step_s = statistics.median(step_times)
    timed_points = evaluated[-repeats:]  # the timed steps' (warm-up and the first step left out)
    points_per_step = sum(timed_points) / len(timed_points)
    points_per_s = points_per_step / step_s  # evaluated points, as training's points/s counts them
    gflops = 6 * linear_macs(renderer.field) * points_per_s / 1e9
    peak32 = statistics.median(peaks)
    peak = peak_bf16 if trainer.autocast_dtype is not None else peak32
    return {
        "model": cfg.model, "compile": cfg.compile, "skip": cfg.skip,
        "amp": str(trainer.autocast_dtype).replace("torch.", "") if cfg.amp else "off", "device": str(device),
        "batch_rays": cfg.batch_size, "chunk_points": cfg.chunk_points, "points_per_ray": per_ray,
        "evaluated_share": points_per_step / (cfg.batch_size * per_ray),
        "step_s": step_s, "step_s_all": step_times, "cpu_s_per_step": statistics.median(cpu_times),
        "first_step_s": first_s, "points_per_s": points_per_s, "rays_per_s": cfg.batch_size / step_s,
        "mlp_gflops": gflops, "peak_fp32_gflops": peak32, "peak_bf16_gflops": peak_bf16,
        "fraction_of_peak": gflops / peak,
        "render_points_per_s": views.height * views.width * per_ray / statistics.median(render_times),
        "peak_mem_mib": mem.peak, "mem_before_steps_mib": mem.before, "threads": torch.get_num_threads(),
        "optimizer": "fused" if trainer.optimizer.defaults.get("fused") else "for-each",
    }


def bench_variant(spec: dict) -> dict:
    """measure() for one variant of `variant_specs`, on the procedural scene unless spec["data"] names a file."""
    from dataset import load_views, synthetic_scene, views_from_arrays

    device = pick_device(spec["device"])
    cfg = variant_config(spec["model"], spec["preset"], spec["compile"], spec["amp"], spec["batch_rays"],
                         spec["chunk_points"], spec["skip"])
    views = (load_views(spec["data"]) if spec["data"] else
             views_from_arrays(synthetic_scene(n_views=8, size=100), "synthetic")).to(device)
    result = measure(cfg, views, device, spec["repeats"], spec["warmup"])
    return {**result, "preset": spec["preset"] or DEFAULT_PRESET[cfg.model]}


def _child(spec: dict, queue) -> None:
    try:
        queue.put(bench_variant(spec))
    except Exception as err:  # reported as a failed row: one variant failing must not hide the others
        queue.put({"error": f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300]})


def run_isolated(spec: dict) -> dict:
    """bench_variant(spec) in a fresh process, so each variant's peak memory and compile caches are its own."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(spec, queue))
    proc.start()
    while True:  # a child killed outright (out of memory, a signal) never answers: do not wait for it forever
        try:
            result = queue.get(timeout=1.0)
            break
        except Empty:
            if not proc.is_alive():
                result = {"error": f"the benchmark process died (exit code {proc.exitcode})"}
                break
    proc.join()
    return {**{k: spec[k] for k in ("model", "compile", "amp", "skip")}, **result}


def variant_specs(args) -> list[dict]:
    models = ("nerf", "bitnerf", "grid") if args.model == "all" else (args.model,)
    switch = {"both": (False, True), "on": (True,), "off": (False,)}
    return [dict(model=m, preset=args.preset, compile=c, amp=a, skip=k, batch_rays=args.batch_rays,
                 chunk_points=args.chunk_points, repeats=args.repeats, warmup=args.warmup, device=args.device,
                 data=args.data)
            for m in models for a in switch[args.amp] for c in switch[args.compile] for k in switch[args.skip]
            if not (m == "grid" and (c or not k))]  # the grid field runs eagerly (configs refuses compile=true for it)


# --- output --------------------------------------------------------------------------------------------------
COLUMNS = [("model", "model", "{}"), ("compile", "compile", "{}"), ("amp", "amp", "{}"), ("skip", "skip", "{}"),
           ("step_s", "step s", "{:.3f}"), ("evaluated_share", "evaluated", "{:.0%}"),
           ("points_per_s", "train pts/s", "{:,.0f}"),
           ("rays_per_s", "rays/s", "{:,.0f}"), ("mlp_gflops", "GFLOP/s", "{:.1f}"),
           ("fraction_of_peak", "of peak", "{:.0%}"), ("render_points_per_s", "render pts/s", "{:,.0f}"),
           ("peak_mem_mib", "peak MiB", "{:,.0f}"), ("peak_fp32_gflops", "fp32 peak", "{:.0f}"),
           ("peak_bf16_gflops", "bf16 peak", "{:.1f}")]


FLOP_KEYS = ("mlp_gflops", "fraction_of_peak")  # meaningless for a field without Linear layers


def table(rows: list[dict]) -> str:
    head = [title for _, title, _ in COLUMNS]
    body = []
    for row in rows:
        if "error" in row:
            body.append([str(row.get(k, "")) for k, _, _ in COLUMNS[:4]] + [row["error"]])
            continue
        body.append([fmt.format(row[k]) if row["mlp_gflops"] or k not in FLOP_KEYS else "-"
                     for k, _, fmt in COLUMNS])
    widths = [max(len(r[i]) for r in [head] + [b for b in body if len(b) == len(head)]) for i in range(len(head))]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    for cells in body:
        lines.append("  ".join(c.rjust(w) for c, w in zip(cells, widths)) if len(cells) == len(head)
                     else "  ".join(cells))
    return "\n".join(lines)


# --- BitNeRF / NeRF ratio (both in one process, interleaved) -----------------------------------------------------
RATIO_SIZES = {"small": dict(width=64, depth=4, skip_layer=2, n_freqs=6),   # a narrower MLP
               "cpu": dict(width=128, depth=4, skip_layer=2, n_freqs=8),   # configs.CPU_SCALE's field
               "exp4": dict(width=256, depth=8, skip_layer=4, n_freqs=16)}  # exp1/exp4's field


def field_train_step(field: torch.nn.Module, optimizer, points: torch.Tensor, target: torch.Tensor, chunk: int,
                     autocast_dtype: torch.dtype | None):
    """One training step of a field alone: micro-batches of `chunk` points forward + backward (MSE on the raw
    output), then the AdamW step. Returns a closure for timing."""
    def step():
        for start in range(0, points.shape[0], chunk):
            with torch.autocast(points.device.type, autocast_dtype, enabled=autocast_dtype is not None):
                raw = field(points[start:start + chunk])
            (raw.float() - target[start:start + chunk]).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def bitnerf_ratio(size: str, compiled: bool, chunk: int, chunks: int, repeats: int, device: torch.device,
                  amp: bool = False, impl: str = "fused", bitnet_grad: str = "auto") -> dict:
    """Seconds per training step of NeRF and of (quantized) BitNeRF of the same size on the same random points,
    timed alternately (NeRF, BitNeRF, NeRF, ...) so both see the same machine load; the ratio is the median of
    the per-pair ratios. AdamW as train.make_optimizer builds it (fused where every parameter is plain).
    impl "torchao": BitNeRF on torchao's BitNet weight subclass and nn.RMSNorm (the reference the fused layer
    is tested against). bitnet_grad: the fused layer's backward matmuls, as the config key of that name."""
    from bitnerf import BitNeRF, quantize_bitnet
    from nerf import NeRF

    def quantize(field):
        return quantize_bitnet(field, bf16_grads=bitnet_bf16_grads(bitnet_grad, device))
    if impl == "torchao":  # the reference lives with the tests that check the fused layer against it
        from tests.torchao_reference import quantize_bitnet_torchao as quantize

    arch = RATIO_SIZES[size]
    torch.manual_seed(0)
    n = chunk * chunks
    points = (torch.rand(n, 3, device=device) * 3 - 1.5)
    target = torch.randn(n, 4, device=device)
    dtype = amp_policy(amp, "auto", device).dtype
    steps, first = {}, {}
    for name, field in (("nerf", NeRF(**arch)), ("bitnerf", quantize(BitNeRF(**arch)))):
        field.to(device)
        params = list(field.parameters())
        fused = device.type in ("cpu", "cuda") and all(type(p) is torch.nn.Parameter for p in params)
        optimizer = torch.optim.AdamW(params, lr=1e-4, fused=fused or None)
        module = torch.compile(field, fullgraph=True) if compiled else field
        steps[name] = field_train_step(module, optimizer, points, target, chunk, dtype)
        first[name] = timed(steps[name], device, 1, warmup=0)[0]  # compiles when compiling
        timed(steps[name], device, 1, warmup=0)
    times = {"nerf": [], "bitnerf": []}
    cpu = {"nerf": [], "bitnerf": []}  # process CPU time: steadier than wall time on a shared, loaded machine
    for _ in range(repeats):
        for name in ("nerf", "bitnerf"):
            start = time.process_time()
            times[name] += timed(steps[name], device, 1, warmup=0)
            cpu[name].append(time.process_time() - start)
    ratios = [b / a for a, b in zip(times["nerf"], times["bitnerf"])]
    cpu_ratios = [b / a for a, b in zip(cpu["nerf"], cpu["bitnerf"])]
    return {"size": size, **arch, "impl": impl, "bitnet_grad": bitnet_grad,
            "bf16_grads": bitnet_bf16_grads(bitnet_grad, device), "compile": compiled,
            "amp": str(dtype).replace("torch.", "") if amp else "off",
            "points_per_step": n, "chunk_points": chunk, "nerf_step_s": statistics.median(times["nerf"]),
            "bitnerf_step_s": statistics.median(times["bitnerf"]), "ratio": statistics.median(ratios),
            "ratio_all": ratios, "cpu_ratio": statistics.median(cpu_ratios), "first_step_s": first,
            "threads": torch.get_num_threads()}


def render_ratio(size: str, compiled: bool, chunk: int, chunks: int, repeats: int, device: torch.device) -> dict:
    """Points/s of a no-grad forward (what evaluation and videos run) of the packed ternary BitNeRF
    (bitnerf_packed.ternary_field, as loaded from a .bitnerf file) over the float NeRF of the same size, timed
    alternately on the same random points; the ratio (> 1: the packed model is faster) is the median of the
    per-pair ratios."""
    from bitnerf import BitNeRF, plain_state_dict, quantize_bitnet
    from bitnerf_packed import ternary_field, ternary_state_dict
    from nerf import NeRF
    from ternary_kernels import int_mm_available

    arch = RATIO_SIZES[size]
    torch.manual_seed(0)
    int_mm_available(device)
    points = torch.rand(chunk * chunks, 3, device=device) * 3 - 1.5
    packed = ternary_field(**arch)
    packed.load_state_dict(ternary_state_dict(plain_state_dict(quantize_bitnet(BitNeRF(**arch))), arch["depth"]))
    forwards = {}
    for name, field in (("nerf", NeRF(**arch).requires_grad_(False)), ("bitnerf", packed)):
        field = field.to(device).eval()
        module = torch.compile(field, fullgraph=True, dynamic=True) if compiled else field

        def forward(module=module):
            with torch.no_grad():
                for part in points.split(chunk):
                    module(part)

        forwards[name] = forward
        timed(forward, device, 1, warmup=1)  # compiles when compiling
    times = {"nerf": [], "bitnerf": []}
    for _ in range(repeats):
        for name in ("nerf", "bitnerf"):
            times[name] += timed(forwards[name], device, 1, warmup=0)
    ratios = [a / b for a, b in zip(times["nerf"], times["bitnerf"])]
    n = points.shape[0]
    return {"size": size, **arch, "compile": compiled, "points": n, "chunk_points": chunk,
            "nerf_points_per_s": n / statistics.median(times["nerf"]),
            "bitnerf_points_per_s": n / statistics.median(times["bitnerf"]),
            "speedup": statistics.median(ratios), "speedup_all": ratios, "int_mm": int_mm_available(device),
            "threads": torch.get_num_threads()}


def ratio_main(args) -> list[dict]:
    device = pick_device(args.device)
    configure_backends(device, tf32=True)  # as training sets up the device
    if args.threads:
        torch.set_num_threads(args.threads)
    switch = {"both": (False, True), "on": (True,), "off": (False,)}
    rows = []
    for size in args.ratio_sizes.split(","):
        if size not in RATIO_SIZES:
            raise UserError(f"--ratio-sizes: unknown size {size!r} (choose from {', '.join(RATIO_SIZES)})")
        if args.render:
            for compiled in switch[args.compile]:
                row = render_ratio(size, compiled, args.chunk_points or 8192, args.ratio_chunks, args.repeats, device)
                rows.append(row)
                print(f"{size:6s} {'compiled' if compiled else 'eager':8s} render  nerf "
                      f"{row['nerf_points_per_s'] / 1e6:6.2f} M points/s  packed bitnerf "
                      f"{row['bitnerf_points_per_s'] / 1e6:6.2f} M points/s  speed-up {row['speedup']:.2f} "
                      f"(pairs: {' '.join(f'{r:.2f}' for r in row['speedup_all'])})", flush=True)
            continue
        for compiled in switch[args.compile]:
            for amp in switch[args.amp]:
                row = bitnerf_ratio(size, compiled, args.chunk_points or 8192, args.ratio_chunks, args.repeats,
                                    device, amp, args.bitnerf_impl, args.bitnet_grad)
                rows.append(row)
                print(f"{size:6s} {'compiled' if compiled else 'eager':8s} amp={row['amp']:8s} "
                      f"nerf {row['nerf_step_s'] * 1e3:8.1f} ms  bitnerf {row['bitnerf_step_s'] * 1e3:8.1f} ms  "
                      f"ratio {row['ratio']:.2f} (CPU time {row['cpu_ratio']:.2f}; pairs: "
                      f"{' '.join(f'{r:.2f}' for r in row['ratio_all'])})",
                      flush=True)
    return rows


# --- time to quality -------------------------------------------------------------------------------------------
def quality(args) -> dict:
    """Train a preset for a training-time budget; held-out PSNR against training time from metrics.jsonl."""
    from train import train

    base = PRESETS[args.preset or "fast"]
    cfg = replace(base, name=f"{base.name}-quality", data=args.data or base.data, device=args.device,
                  max_time_s=args.minutes * 60.0, out_dir=args.out_dir or f"runs/bench-{base.name}-quality",
                  resume=False, video=False, wandb="disabled",
                  eval_every=args.eval_every or base.eval_every, val_views=args.val_views or base.val_views,
                  steps=args.steps or base.steps)
    if os.path.exists(os.path.join(cfg.run_dir, "ckpt.pt")):
        raise UserError(f"{cfg.run_dir} holds an earlier run: remove it or pass --out-dir")
    summary = train(cfg)
    curve = []
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        for line in f:
            record = json.loads(line)
            if "val_psnr" in record:
                curve.append({"step": record["step"], "time_s": record["time_s"], "val_psnr": record["val_psnr"]})
    print(f"\n{cfg.name}: held-out PSNR over training time ({summary['val_views']} views, {cfg.data})")
    for point in curve:
        print(f"  {point['time_s']:7.1f} s  step {point['step']:6d}  {point['val_psnr']:6.2f} dB")
    return {"config": cfg.to_dict(), "curve": curve, "summary": summary}


# --- command line ----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None):
    p = ArgParser(prog="bench.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("nerf", "bitnerf", "grid", "all"), default="all")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="architecture/sampling preset (default: exp1 for nerf, exp4 for bitnerf, fast for grid "
                        "and for --quality)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-rays", type=int, default=2048, help="rays per training step (default 2048)")
    p.add_argument("--chunk-points", type=int, default=None, help="micro-batch size (default: the preset's)")
    p.add_argument("--compile", choices=("both", "on", "off"), default="both")
    p.add_argument("--amp", choices=("both", "on", "off"), default="both")
    p.add_argument("--skip", choices=("both", "on", "off"), default="on",
                   help="the occupancy grid's packed path (on: as training runs; both: its cost against plain)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps after the first (compiling) one")
    p.add_argument("--data", default=None, help="a tiny-NeRF .npz (default: a procedural scene)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--quality", action="store_true", help="time-to-quality mode (trains a preset)")
    p.add_argument("--minutes", type=float, default=3.0)
    p.add_argument("--eval-every", type=int, default=0, help="steps between held-out evaluations (--quality)")
    p.add_argument("--steps", type=int, default=0, help="training steps, the length of the lr schedule "
                                                         "(--quality; default: the preset's)")
    p.add_argument("--val-views", type=int, default=0, help="held-out views (--quality; default: preset's)")
    p.add_argument("--out-dir", default=None, help="run folder (--quality)")
    p.add_argument("--ratio", action="store_true",
                   help="BitNeRF/NeRF training-step time ratio per point, both in this process, interleaved")
    p.add_argument("--ratio-sizes", default="small,cpu,exp4",
                   help="--ratio: small (4x64, L=6), cpu (4x128, L=8: the cpu scale), exp4 (8x256, L=16)")
    p.add_argument("--ratio-chunks", type=int, default=2, help="--ratio: micro-batches per step")
    p.add_argument("--render", action="store_true",
                   help="with --ratio: the packed BitNeRF's no-grad forward (rendering) against the float NeRF's")
    p.add_argument("--threads", type=int, default=0, help="--ratio: torch threads (default: torch's)")
    p.add_argument("--bitnerf-impl", choices=("fused", "torchao"), default="fused",
                   help="--ratio: BitNeRF's layers: bitnerf's fused RMSNorm+BitLinear, or torchao's BitNet weights")
    p.add_argument("--bitnet-grad", choices=("auto", "fp32", "bf16"), default="auto",
                   help="--ratio: the fused layer's backward matmuls (config bitnet_grad)")
    args = p.parse_args(argv)
    if args.batch_rays < 1 or args.repeats < 1 or args.warmup < 0 or (args.chunk_points or 1) < 1:
        raise UserError("--batch-rays, --repeats and --chunk-points must be >= 1, --warmup >= 0")
    if args.minutes <= 0:
        raise UserError("--minutes must be > 0")
    pick_device(args.device)  # an unavailable device is an error here, not in every child
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.quality:
        result = quality(args)
    elif args.ratio:
        result = {"ratio_rows": ratio_main(args), "argv": sys.argv[1:] if argv is None else argv}
    else:
        rows = []
        for spec in variant_specs(args):
            rows.append(run_isolated(spec))
            print(table(rows[-1:]).splitlines()[-1], flush=True)  # progress: one line per variant
        print("\n" + table(rows))
        result = {"rows": rows, "flop_formula": "6 * sum(in*out of field Linears) per evaluated point",
                  "argv": sys.argv[1:] if argv is None else argv}
    if args.json:
        from utils import atomic_json

        atomic_json(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(lambda: main()))
