"""The one training loop behind every experiment (exp1.py ... exp7.py are presets of it).

setup (torchrun env, device, seed) -> data -> model -> BitNet quantize -> torch.compile -> DDP -> steps
(AMP, GradScaler, micro-batches, logging, validation, checkpoints) -> summary, depth maps, 360-degree videos.
Only rank 0 writes files or talks to W&B. Run directly with `python train.py --preset=NAME [--key=value ...]`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from typing import NamedTuple

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from assembly import build_renderer, field_state_dict
from bitnerf import set_qat
from bitnerf_ddp import assert_replicas_agree
from configs import (EXP1, RESUME_INDEPENDENT, Config, ConfigError, config_changes, config_from_dict, from_cli,
                     scale_line)
from dataset import RayBatcher, Views, train_val_views
from experiments import REGISTRY, launch_command
from cameras import sweep_poses
from orbit import render_orbit, write_orbit
from renderer import VolumeRenderer, render_image
from samplers import Samples, kept_positions
from hardware import (amp_policy, bitnet_grad_line, check_device, compute_cleanup, compute_init, configure_backends,
                      device_line, make_grad_scaler, provenance)
from ternary_kernels import integer_matmul_line, kernels_line
from utils import (Dist, UserError, all_reduce_mean, all_reduce_sum, atomic_json, atomic_torch_save,
                   colourise_depth, gather_to_master, load_checkpoint_or_newest_good, master_decides, mse_to_psnr,
                   print0, run_cli, seed_everything, to_uint8)


# --- schedule ----------------------------------------------------------------------------------------------------
def lr_at(cfg: Config, step: int, total_steps: int, budget_used: float = 0.0) -> float:
    """The learning rate of `step`. A cosine schedule runs to whichever end comes first: the last step, or the
    time budget (`budget_used`: the fraction of max_time_s spent so far), so a time-limited run anneals too."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    if cfg.lr_schedule == "cosine":
        progress = schedule_progress(step, total_steps, budget_used)
        return cfg.lr * warm * (0.05 + 0.95 * 0.5 * (1.0 + math.cos(math.pi * progress)))
    return cfg.lr * warm


def schedule_progress(step: int, total_steps: int, budget_used: float = 0.0) -> float:
    """How far training is, in [0, 1]: the larger of the steps' share and the time budget's."""
    return min(1.0, max(step / max(1, total_steps), budget_used))


def qat_on(cfg: Config, step: int, total_steps: int, budget_used: float = 0.0) -> bool:
    """Whether BitNeRF's layers train quantized at `step` (late quantization: from bitnet_qat_from on)."""
    return schedule_progress(step, total_steps, budget_used) >= cfg.bitnet_qat_from


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    return cfg.steps if cfg.steps > 0 else cfg.epochs * steps_per_epoch


def even_chunks(n: int, max_chunk: int) -> int:
    """The smallest number of equal parts of n that are each <= max_chunk (equal shapes: one compiled graph)."""
    k = max(1, math.ceil(n / max_chunk))
    while n % k:
        k += 1
    return k


def step_generator(seed: int, rank: int, step: int, device: torch.device) -> torch.Generator:
    """Sampling noise for one step: a pure function of (seed, rank, step), so resumption is exact without
    saving generator states, and ranks draw different noise."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)


def make_optimizer(cfg: Config, params: list[torch.nn.Parameter], device: torch.device) -> torch.optim.AdamW:
    """AdamW, as one fused kernel where every parameter is a plain tensor on CPU or CUDA: the same update as the
    default for-each implementation (to float rounding) in ~1/6 of its time on the fast preset's 32 MB grid.
    A tensor subclass (torchao's own BitNet weights, if used) is not taken by the fused kernel: for-each then."""
    fused = device.type in ("cpu", "cuda") and all(type(p) is torch.nn.Parameter for p in params)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)


def _no_buffer_broadcast() -> dict:
    """DDP's option not to broadcast buffers every forward (renamed in newer PyTorch)."""
    import inspect

    names = inspect.signature(DDP.__init__).parameters
    return {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}


# --- one optimisation step ---------------------------------------------------------------------------------------
class Trainer:
    """Holds what a step needs; `step()` runs one (micro-batched) forward/backward/update."""

    def __init__(self, cfg: Config, raw: VolumeRenderer, dist_info: Dist, device: torch.device):
        self.cfg, self.raw, self.dist, self.device = cfg, raw, dist_info, device
        model: torch.nn.Module = raw
        if cfg.compile and raw.occupancy is None:
            # fullgraph: a graph break is an error, not a silent fallback to eager
            model = torch.compile(model, fullgraph=True)
        elif cfg.compile:  # skipping: the number of occupied samples varies, the field's chunks do not
            raw.compile_field()
        if dist_info.enabled:
            # DDP wraps the compiled module (nanoGPT's order); the loss's forward goes through it below. Buffers
            # are not broadcast: the occupancy grid is the same on every rank by construction (occupancy.py).
            # configure_backends turned DDPOptimizer off (distributed=True)
            model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                        **_no_buffer_broadcast())
        self.model = model
        self.optimizer = make_optimizer(cfg, list(raw.parameters()), device)
        self.amp = amp_policy(cfg.amp, cfg.amp_dtype, device)
        self.autocast_dtype = self.amp.dtype
        self.scaler = make_grad_scaler(self.amp, device)  # enabled for fp16 only: bf16 has fp32's exponent range
        self.points_per_ray = raw.sampler.points_per_ray  # the most field evaluations a ray can cost

    def step(self, rays_o, rays_d, target, gen: torch.Generator, lr: float, background: torch.Tensor | None = None,
             see_through: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on this rank's rays [R, 3] and their targets [R, 3] (as seen on `background` [R, 3], the
        colour composited behind the render; None: nothing). see_through [R] bool: the rays known to see through
        the scene (the background penalty's; None: none known). `gen` is the sampler's: it jitters the samples
        when cfg.perturb. Returns (loss, grad norm) as tensors (no host sync)."""
        cfg, n = self.cfg, rays_o.shape[0]
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        samples = self.raw.sampler.sample(rays_o, rays_d, gen if cfg.perturb else None)  # once per step
        parts, self.last_points = self.micro_batches(samples)
        loss_sum = torch.zeros((), device=self.device)
        for k, (s, part) in enumerate(parts):
            # DDP: all-reduce gradients only after the last micro-batch
            last = k == len(parts) - 1
            sync = contextlib.nullcontext() if (last or not self.dist.enabled) else self.model.no_sync()
            with sync:
                with torch.autocast(self.device.type, dtype=self.autocast_dtype,
                                    enabled=self.autocast_dtype is not None):
                    out = self.model(rays_o[s], rays_d[s], part, None if background is None else background[s])
                    # the batch's mean squared error, whatever the micro-batches' sizes
                    loss = torch.sum((out.rgb.float() - target[s]) ** 2) / (3 * n)
                    seen = None if see_through is None else see_through[s]
                    total = loss + self.background_penalty(out.acc, seen, n)
                    if out.proposal_loss is not None:
                        total = total + out.proposal_loss.sum() / n
                self.scaler.scale(total).backward()
            loss_sum += loss.detach()  # logged: the photometric loss alone
        self.scaler.unscale_(self.optimizer)  # true gradients before clipping and the logged norm
        params = [p for p in self.raw.parameters() if p.grad is not None]
        if cfg.grad_clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        else:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        self.scaler.step(self.optimizer)  # fp16: skipped when the gradients hold inf/NaN
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, grad_norm

    def background_penalty(self, acc: torch.Tensor, see_through: torch.Tensor | None, n: int) -> torch.Tensor:
        """bg_opacity_weight * (sum of the opacity [R] of the rays that see through the scene [R] bool) / n.

        A pixel that sees the background of data composited on one colour is fitted as well by opaque density
        of that colour as by empty space, and a NeRF happily builds it; which pixels see through is the data's
        call (dataset.Views.see_through). None: no ray is known to (a real background), no penalty."""
        if self.cfg.bg_opacity_weight == 0 or see_through is None:
            return acc.new_zeros(())
        return self.cfg.bg_opacity_weight * torch.sum(acc.float() * see_through.to(acc.dtype)) / n

    def micro_batches(self, samples: Samples) -> tuple[list[tuple[slice, Samples]], int]:
        """Consecutive ray slices with their samples, each slice holding at most chunk_points evaluated samples
        (memory, not maths), and the number of samples the field is evaluated at.

        Without skipping every ray has the same samples: equal slices, one compiled graph. With skipping the
        occupied samples per ray vary: slices are cut where the running count crosses a multiple of chunk_points,
        so each fills about one chunk of the compiled field, and each slice's samples carry the positions of its
        occupied ones (Samples.kept), found once for the whole batch.
        """
        n, chunk = samples.t.shape[0], self.cfg.chunk_points
        counts, per_ray = samples.counts(), self.points_per_ray
        if counts is None:
            parts = even_chunks(n, max(1, chunk // per_ray))
            slices = [slice(k * (n // parts), (k + 1) * (n // parts)) for k in range(parts)]
            return [(s, samples.of_rays(s)) for s in slices], n * per_ray
        cumulative = torch.cumsum(counts, 0)
        part = (cumulative - 1).clamp_min(0) // chunk  # [N], non-decreasing
        # at most one slice per chunk of the whole batch's samples, so the bound needs no sync; one .tolist() of
        # the slices' ends and of the occupied samples before each is the step's only host sync (a GPU idles at
        # each one); the last end is n, so the last count is the total
        most = max(1, n * per_ray // chunk + 1)
        ends = torch.searchsorted(part, torch.arange(most, device=part.device), right=True)
        before = torch.cat([cumulative.new_zeros(1), cumulative]).index_select(0, ends)
        bounds = torch.cat([ends, before]).tolist()
        ends, kept_ends = bounds[:most], bounds[most:]
        kept = kept_positions(samples.keep, kept_ends[-1])
        out, start, kept_start = [], 0, 0
        for end, kept_end in zip(ends, kept_ends):
            if end > start:
                s = slice(start, end)
                # positions within the slice: its first ray's samples start at start * S
                mine = kept[kept_start:kept_end] - start * samples.t.shape[1]
                out.append((s, samples.of_rays(s)._replace(kept=mine)))
            start, kept_start = end, kept_end
        return out, kept_ends[-1]


# --- evaluation --------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_views(renderer: VolumeRenderer, views: Views, dist_info: Dist, chunk_rays: int,
                   autocast_dtype=None, keep: bool = False, progress: bool = False):
    """Held-out PSNR: every view rendered in eval mode (no jitter) on the data's evaluation background and scored
    against the view on that background; views shared out over ranks.

    Returns (mean PSNR over all views, {view index: Rendered} for this rank's views if keep). `progress`: a bar
    with the time left (the end-of-run validation of a large capture takes a while).
    """
    was_training = renderer.training
    renderer.eval()
    total = torch.zeros(2, dtype=torch.float64)
    kept = {}
    from tqdm import tqdm

    mine = range(dist_info.rank, len(views), dist_info.world_size)
    for i in tqdm(mine, desc="validation", leave=False, disable=not (progress and dist_info.is_master)):
        rays_o, rays_d = views.image_rays(i)
        out = render_image(renderer, rays_o, rays_d, chunk_rays, autocast_dtype, views.eval_background())
        mse = torch.mean((out.rgb - views.image(i)) ** 2).item()
        total += torch.tensor([mse_to_psnr(mse), 1.0], dtype=torch.float64)
        if keep:
            kept[i] = out
    renderer.train(was_training)
    total = all_reduce_sum(total)  # float64 stays on the CPU (an Apple GPU has no float64)
    return float(total[0] / total[1]), kept


# --- logging -----------------------------------------------------------------------------------------------------
class RunLogger:
    """metrics.jsonl always; W&B too unless disabled. Rank 0 only: other ranks get a logger that does nothing.

    It also keeps what a resumed session must carry on: the W&B run's id (a resumed run continues the same W&B
    run) and the wall time of the earlier sessions (`wall_time_s`, plus this session's since `started`)."""

    def __init__(self, cfg: Config, run_dir: str, active: bool, resume_step: int | None, run_id: str | None = None,
                 wall_time_s: float = 0.0, started: float | None = None):
        self.active = active
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.wandb = None
        self.run_id = run_id
        self._wall_before = wall_time_s
        self._started = time.perf_counter() if started is None else started
        if not active:
            return
        if resume_step is not None:
            _truncate_metrics(self.path, resume_step)  # drop records past the checkpoint: they are redone
        elif os.path.exists(self.path):
            os.remove(self.path)
        mode = os.environ.get("WANDB_MODE") or cfg.wandb
        if mode != "disabled":
            try:
                import wandb

                same_run = {"id": run_id, "resume": "allow"} if run_id else {}
                self.wandb = wandb.init(project=cfg.wandb_project, name=cfg.name, config=cfg.to_dict(),
                                        dir=run_dir, mode=mode, reinit="finish_previous", **same_run)
                self.run_id = getattr(self.wandb, "id", None) or run_id
            except Exception as err:  # W&B is a convenience: never lose a run over it
                print0(f"warning: W&B unavailable ({type(err).__name__}: {err}); logging to metrics.jsonl only")

    def log(self, record: dict) -> None:
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def log_images(self, key: str, images: dict, caption: str) -> None:
        """{view index: uint8 [H, W, 3]} to W&B as one panel of images (nothing without W&B)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({key: [wandb.Image(im, caption=f"view {i}: {caption}") for i, im in images.items()]})

    def log_videos(self, paths: list[str], fps: int) -> None:
        """The .mp4 files `paths` to W&B, each under its file name (nothing without W&B)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({os.path.splitext(os.path.basename(p))[0]: wandb.Video(p, fps=fps, format="mp4")
                            for p in paths if p.endswith(".mp4")})

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None

    def wall_time(self) -> float:
        """Seconds of every session of this run so far (earlier ones as of their last checkpoint)."""
        return self._wall_before + time.perf_counter() - self._started

    def checkpoint_info(self) -> dict:
        """What a checkpoint keeps for the next session."""
        return {"wandb_run_id": self.run_id, "wall_time_s": self.wall_time()}

    def log_final(self, record: dict) -> None:
        """The run's last record (final validation), to metrics.jsonl only. Rerunning a finished command
        replaces the final record at that step instead of adding a second one (no evaluation during training
        is ever logged at the step a run finishes at)."""
        if not self.active:
            return
        keep = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                keep = [line for line in f if line.strip() and not _is_val_at(json.loads(line), record["step"])]
        keep.append(json.dumps(record) + "\n")
        with open(self.path, "w") as f:
            f.writelines(keep)


def _is_val_at(record: dict, step: int) -> bool:
    return record.get("step") == step and "val_psnr" in record and "loss" not in record


def _truncate_metrics(path: str, last_step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


# --- checkpoints -------------------------------------------------------------------------------------------------
def save_checkpoint(path: str, trainer: Trainer, cfg: Config, step: int, train_time: float, keep: int,
                    extra: dict | None = None) -> None:
    ckpt = {
        "model": field_state_dict(trainer.raw),
        "occupancy": trainer.raw.occupancy.state_dict() if trainer.raw.occupancy is not None else None,
        "proposal": trainer.raw.proposal.state_dict() if trainer.raw.proposal is not None else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scaler": trainer.scaler.state_dict() if trainer.scaler.is_enabled() else None,
        "step": step,
        "train_time_s": train_time,
        "config": cfg.to_dict(),
        "world_size": trainer.dist.world_size,
        "rng": {"torch": torch.get_rng_state()},
        "format": 1,
        **(extra or {}),  # RunLogger.checkpoint_info: the W&B run id and the wall time of every session so far
    }
    atomic_torch_save(ckpt, path)
    history = os.path.join(os.path.dirname(path), f"ckpt_step{step:07d}.pt")
    if keep > 1:
        atomic_torch_save(ckpt, history)
    _prune_history(os.path.dirname(path), keep - 1)


def _prune_history(folder: str, keep: int) -> None:
    old = sorted(f for f in os.listdir(folder) if f.startswith("ckpt_step") and f.endswith(".pt"))
    for name in old[:max(0, len(old) - keep)]:
        os.remove(os.path.join(folder, name))


def resume_state(cfg: Config, run_dir: str) -> dict | None:
    """The checkpoint to continue from, None to start afresh, or a UserError when continuing would be wrong."""
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        return None
    if not cfg.resume:
        raise UserError(f"{run_dir} already holds a checkpoint; pass --resume=true to continue it, or choose "
                        f"another --out_dir (nothing was overwritten)")
    ckpt = load_checkpoint_or_newest_good(path)  # a truncated ckpt.pt: the newest good ckpt_stepN.pt, warned
    try:
        saved = config_from_dict(ckpt["config"])
    except (ConfigError, TypeError) as err:
        raise UserError(f"{path}: saved config is unreadable ({err})") from None
    changes = ", ".join(sorted(config_changes(saved, cfg, RESUME_INDEPENDENT)))
    if changes:
        raise UserError(f"{path} was trained with a different config ({changes}); use another --out_dir "
                        f"or the same settings")
    return ckpt


def amp_name(dtype: torch.dtype | None) -> str:
    """How the run's line and summary name its autocast dtype: bfloat16, float16, or off."""
    return "off" if dtype is None else str(dtype).replace("torch.", "")


# --- signals -----------------------------------------------------------------------------------------------------
class StopFlag:
    """SIGINT/SIGTERM ask the loop to stop at the end of the current step (then it checkpoints and exits)."""

    def __init__(self):
        self.signum = 0
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.signum:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Interrupted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; checkpoint saved — "
                         f"run the same command again to resume")
        self.exit_code = 128 + signum


# --- the run ----------------------------------------------------------------------------------------------------
def data_line(cfg: Config, train_views: Views, val_views: Views, scene: str) -> str:
    """What the run trains on: sizes, cameras, background, and the scene's extent (`scene`: resolve_scene's)."""
    bg = train_views.background
    cams = train_views.cameras
    line = (f"data {cfg.data}: {len(train_views)} train / {len(val_views)} val views of {train_views.width}x"
            f"{train_views.height}{f' (downscale {cfg.downscale})' if cfg.downscale > 1 else ''}, "
            f"{'RGBA' if bg.alpha else 'RGB'} {train_views.images.dtype}, background {bg.train} in training, "
            f"{bg.eval} in evaluation, fx {float(cams.fx.mean()):.1f} px"
            f"{', lens distortion' if cams.distortion is not None else ''}")
    held = f" (every {cfg.holdout_every}th view)" if cfg.holdout_every else ""
    return f"{line}; val{held}; {scene}"


def train(cfg: Config) -> dict:
    """Train `cfg`; returns the summary written to <run_dir>/summary.json. Works alone or under torchrun."""
    dist_info, device = compute_init(cfg.device)
    if cfg.name in REGISTRY and REGISTRY[cfg.name].torchrun and not dist_info.enabled:
        print0(f"{cfg.name} is a DDP experiment but is running as a single process (not under torchrun); launch "
               f"it with: torchrun --standalone --nproc_per_node=2 {cfg.name}.py [--key=value ...]")
    try:
        return _run(cfg, dist_info, device)
    finally:
        compute_cleanup()


def _run(cfg: Config, dist_info: Dist, device: torch.device) -> dict:
    run_dir = cfg.run_dir
    master = dist_info.is_master
    t_start = time.perf_counter()
    # the data decides what the config leaves to it (downscale, the scene's extent) before the config is compared
    # with a checkpoint's or saved
    cfg, train_views, val_views, scene = train_val_views(cfg, device.type)
    train_views, val_views = train_views.to(device), val_views.to(device)
    print0(data_line(cfg, train_views, val_views, scene))
    # rank 0 reads the checkpoint and hands it out: on several nodes only rank 0 need see run_dir
    ckpt = master_decides(lambda: resume_state(cfg, run_dir))
    seed_everything(cfg.seed)  # same seed on every rank: identical initial weights (DDP also broadcasts)
    configure_backends(device, cfg.tf32, dist_info.enabled)

    batcher = RayBatcher(train_views, cfg.batch_unit, cfg.batch_size, cfg.seed, dist_info.rank, dist_info.world_size)
    n_steps = total_steps(cfg, batcher.steps_per_epoch)

    raw = build_renderer(cfg, device, *((ckpt["model"], ckpt.get("occupancy"), ckpt.get("proposal")) if ckpt else ()))
    if raw.occupancy is not None and cfg.occ_carve and not ckpt:
        see_through = train_views.see_through(train_views.images)
        if see_through is None:
            print0("occupancy: not carved (the data has a real background: no pixel is known to see through)")
        elif cfg.scene == "unbounded":  # carving projects world points; an unbounded grid holds contracted ones
            print0("occupancy: not carved (an unbounded scene's grid is over the contracted space)")
        else:
            raw.occupancy.carve(see_through, train_views.poses, train_views.cameras, raw.sampler.near)
            print0(f"occupancy: {raw.occupancy.occupied_fraction():.1%} of {cfg.occ_resolution}^3 cells left after "
                   f"carving the space that background pixels see through")
    trainer = Trainer(cfg, raw, dist_info, device)
    print0(device_line(device, trainer.amp, cfg.tf32))
    if cfg.model == "bitnerf":
        print0(integer_matmul_line(device))
        print0(bitnet_grad_line(cfg.bitnet_grad, device))
        if device.type == "cpu":
            print0(kernels_line())
    start_step, train_time = 0, 0.0
    if ckpt:
        trainer.optimizer.load_state_dict(ckpt["optimizer"])
        if trainer.scaler.is_enabled() and ckpt.get("scaler"):
            trainer.scaler.load_state_dict(ckpt["scaler"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        start_step, train_time = ckpt["step"], ckpt["train_time_s"]
        print0(f"resuming {run_dir} from step {start_step}")
    if master:
        os.makedirs(run_dir, exist_ok=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(cfg.to_json() + "\n")
    earlier = ckpt or {}  # what earlier sessions left (a checkpoint without wall_time_s: its train time)
    logger = RunLogger(cfg, run_dir, master, start_step if ckpt else None, earlier.get("wandb_run_id"),
                       earlier.get("wall_time_s", earlier.get("train_time_s", 0.0)), started=t_start)
    n_params = sum(p.numel() for p in raw.field.parameters())  # the model's; a proposal grid's are the sampler's
    sampler_params = sum(p.numel() for p in raw.sampler.parameters())
    in_sampler = f" (+ {sampler_params:,} in the proposal grid)" if sampler_params else ""
    print0(f"{cfg.name}: {cfg.model}, {n_params:,} parameters{in_sampler}, {len(train_views)} train / "
           f"{len(val_views)} val views, {n_steps} steps of {cfg.batch_size} {cfg.batch_unit}s, device {device}, "
           f"world size {dist_info.world_size}, amp {amp_name(trainer.autocast_dtype)}, compile {cfg.compile}")

    stop = StopFlag()
    try:
        try:
            result = _loop(cfg, trainer, batcher, val_views, logger, stop, start_step, n_steps, train_time, device)
        finally:
            stop.restore()
        step, train_time, train_points, rate_time = result[:4]
        eval_chunk = raw.eval_chunk_rays()
        val_psnr, renders = evaluate_views(raw, val_views, dist_info, eval_chunk, trainer.autocast_dtype, keep=True,
                                           progress=True)
        renders = _gather_renders(renders)  # each rank rendered its share of the views; rank 0 writes them all
        if dist_info.enabled:
            assert_replicas_agree(raw)
        summary = {
            "name": cfg.name, "model": cfg.model, "val_psnr": val_psnr, "steps": step,
            "wall_time_s": logger.wall_time(), "train_time_s": train_time,
            # this session's rate without its first (compiling) step; a resumed run's earlier steps are not counted
            "train_points_per_s": train_points / max(rate_time, 1e-9), "parameters": n_params,
            "first_step_s": result.first_step_s, "steady_step_s": result.steady_step_s,
            "world_size": dist_info.world_size, "amp": amp_name(trainer.autocast_dtype), "device": str(device),
            "data": cfg.data, "val_views": len(val_views), "provenance": provenance(device),
        }
        if master:  # the final checkpoint was saved by _loop; the measurements go next, the pictures last
            atomic_json(summary, os.path.join(run_dir, "summary.json"))
            logger.log_final({"step": step, "val_psnr": val_psnr, "time_s": train_time})
            _write_pictures(cfg, raw, val_views, renders, eval_chunk, trainer.autocast_dtype, logger)
    finally:
        logger.close()
    print0(f"{cfg.name}: val PSNR {val_psnr:.2f} dB after {step} steps, {logger.wall_time():.0f} s "
           f"(outputs in {run_dir})")
    return summary


def _loop(cfg, trainer: Trainer, batcher: RayBatcher, val_views, logger: RunLogger, stop: StopFlag,
          step: int, n_steps: int, train_time: float, device) -> "LoopResult":
    """Steps from `step` to `n_steps` (or the time budget, or a signal), with the log records, validations and
    checkpoints on their schedules. The rate it returns leaves out this session's first step (which includes
    torch.compile's compilation)."""
    from tqdm import tqdm

    dist_info, start_step = trainer.dist, step
    ckpt_path = os.path.join(cfg.run_dir, "ckpt.pt")
    eval_chunk = trainer.raw.eval_chunk_rays()
    window, health = LossWindow(device), Health(trainer.scaler.is_enabled(), device)
    points, session_time, first_step = 0, 0.0, None
    budget_used = train_time / cfg.max_time_s if cfg.max_time_s > 0 else 0.0  # a resumed run's spent share
    # under DDP the ranks agree on stopping (a signal, the time budget) every log_every steps, not every step:
    # an all-reduce read back on the host is a sync that idles a GPU
    agree_every = cfg.log_every if dist_info.enabled else 1
    bar = tqdm(total=n_steps, initial=step, desc=cfg.name, disable=not dist_info.is_master, dynamic_ncols=True)
    quantizing = True  # BitNeRF's layers are built quantized (build_renderer); late quantization turns them off first
    try:  # the bar closes before any error line is printed, or it redraws below it
        while step < n_steps:
            t0 = time.perf_counter()
            # the sampler's own refresh schedule (the occupancy grid's): the same cells and points on every rank
            # (rank 0's generator), each rank evaluating its share
            trainer.raw.update_sampler(step, step_generator(cfg.seed, 0, step, device), dist_info.rank,
                                       dist_info.world_size)
            rays_o, rays_d, target = batcher.batch(step)
            background, see_through = batcher.background(step)
            lr = lr_at(cfg, step, n_steps, budget_used)
            if cfg.bitnet_qat_from and qat_on(cfg, step, n_steps, budget_used) != quantizing:
                quantizing = not quantizing  # a switch of the layers' forward: torch.compile recompiles once
                set_qat(trainer.raw.field, quantizing)
                if quantizing and step > start_step and dist_info.is_master:
                    bar.write(f"step {step}: quantization-aware training starts")
            loss, grad_norm = trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, dist_info.rank, step,
                                                                                device), lr, background, see_through)
            health.add(loss, grad_norm)
            step += 1
            if device.type == "cuda" and step % cfg.log_every == 0:
                torch.cuda.synchronize()  # honest timings at the points where we read them
            dt = time.perf_counter() - t0
            train_time, session_time, points = train_time + dt, session_time + dt, points + trainer.last_points
            window.add(loss, trainer.last_points, dt)  # this rank's points; summed over ranks where reported
            first_step = first_step or (trainer.last_points, dt)
            bar.update(1)

            signalled = out_of_time = False
            if step % agree_every == 0 or step == n_steps:
                signalled, out_of_time, budget_used = agree_to_stop(cfg, stop, train_time, dist_info)
            finishing = step == n_steps or signalled or out_of_time
            saving = bool(cfg.ckpt_every and step % cfg.ckpt_every == 0) or finishing
            # a loss window also ends at each checkpoint, so a resumed run logs the same records as an uninterrupted one
            if step % cfg.log_every == 0 or saving:
                skipped = health.check(step, saving, ckpt_path)  # before every save: NaN weights are never saved
                record = window.record(step, lr, grad_norm, train_time, device)
                if health.scaling:
                    record["skipped_steps"] = health.skipped_total + skipped  # by the GradScaler, so far
                logger.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", psnr=f"{record['psnr']:.2f}")
            if cfg.eval_every and step % cfg.eval_every == 0 and not finishing:
                val_psnr, _ = evaluate_views(trainer.raw, val_views, dist_info, eval_chunk, trainer.autocast_dtype)
                logger.log({"step": step, "val_psnr": val_psnr, "time_s": train_time})
                if dist_info.is_master:  # tqdm.write prints even when the bar is disabled
                    bar.write(f"step {step}: val PSNR {val_psnr:.2f} dB")
            if saving:  # also at the end, before the final evaluation and videos: a signal there loses nothing
                health.saved()
                if dist_info.enabled:  # a few numbers per parameter: never checkpoint replicas that drifted apart
                    assert_replicas_agree(trainer.raw)
                if dist_info.is_master:
                    save_checkpoint(ckpt_path, trainer, cfg, step, train_time, cfg.keep_ckpts,
                                    logger.checkpoint_info())
            if signalled:
                raise Interrupted(int(stop.signum or signal.SIGTERM), step)  # another rank's signal: SIGTERM
            if finishing:
                break
    finally:
        bar.close()
    if health.skipped_total:
        print0(f"the GradScaler skipped {health.skipped_total} of this session's fp16 steps (inf/NaN gradients)")
    warm_points, warm_time = first_step if first_step and points > first_step[0] else (0, 0.0)
    rate_points = all_reduce_sum(torch.tensor(float(points - warm_points), device=device)).item()  # all ranks'
    session_steps = step - start_step
    steady = (session_time - warm_time) / (session_steps - 1) if session_steps > 1 else session_time
    return LoopResult(step, train_time, rate_points, session_time - warm_time,
                      first_step[1] if first_step else 0.0, steady)


def agree_to_stop(cfg: Config, stop: StopFlag, train_time: float, dist_info: Dist) -> tuple[bool, bool, float]:
    """(a signal arrived, the time budget is spent, the share of it spent), agreed by every rank (collective
    under DDP): every rank must stop at the same step and follow the same schedule."""
    flags = torch.tensor([float(stop.signum > 0), float(cfg.max_time_s > 0 and train_time >= cfg.max_time_s),
                          train_time / dist_info.world_size])
    if dist_info.enabled:
        flags = all_reduce_sum(flags)
    budget_used = float(flags[2]) / cfg.max_time_s if cfg.max_time_s > 0 else 0.0
    return bool(flags[0]), bool(flags[1]), budget_used


class LossWindow:
    """This rank's training loss, steps, field evaluations and seconds since the last log record, the loss kept on
    the device so that a step never waits for it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.steps, self.points, self.seconds = 0, 0, 0.0

    def add(self, loss: torch.Tensor, points: int, seconds: float) -> None:
        self.loss += loss
        self.steps, self.points, self.seconds = self.steps + 1, self.points + points, self.seconds + seconds

    def record(self, step: int, lr: float, grad_norm: torch.Tensor, train_time: float, device) -> dict:
        """The log record of the window (collective under DDP: means and sums over ranks); starts a new one."""
        mean_loss = all_reduce_mean(self.loss / self.steps).item()
        points = int(all_reduce_sum(torch.tensor(float(self.points), device=self.device)))
        record = {"step": step, "loss": mean_loss, "psnr": mse_to_psnr(mean_loss), "grad_norm": float(grad_norm),
                  "lr": lr, "time_s": train_time, "points_per_s": points / max(self.seconds, 1e-9),
                  "points_per_step": points / self.steps}  # field evaluations (all ranks)
        self.loss.zero_()
        self.steps, self.points, self.seconds = 0, 0, 0.0
        return record


class Health:
    """Whether training is still training: non-finite losses or gradients, and fp16 steps the GradScaler skipped,
    counted on the device and read at log records and checkpoints only.

    A non-finite loss is a broken forward at any precision. A non-finite gradient is already in the weights
    without a scaler; with one (fp16) the scaler skipped that step, which is counted: a checkpoint interval whose
    every step was skipped trained nothing and is refused."""

    def __init__(self, scaling: bool, device: torch.device):
        self.scaling = scaling
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        self.skipped = torch.zeros((), device=device)  # since the last checkpoint
        self.skipped_total, self.since_save = 0, 0

    def add(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.nonfinite |= ~torch.isfinite(loss)
        if self.scaling:
            self.skipped += ~torch.isfinite(grad_norm)
        else:
            self.nonfinite |= ~torch.isfinite(grad_norm)
        self.since_save += 1

    def check(self, step: int, saving: bool, ckpt_path: str) -> int:
        """Raise UserError if training broke (collective: every rank stops together); the steps skipped since
        the last checkpoint (the same on every rank: DDP's gradients are)."""
        if bool(all_reduce_sum(self.nonfinite.float()) > 0):
            raise UserError(f"loss or gradients became NaN/inf by step {step}; stopped without saving (the last "
                            f"good checkpoint, if any, is {ckpt_path}). Try a lower --lr, --grad_clip or "
                            f"--amp=false")
        skipped = int(self.skipped) if self.scaling else 0
        if saving and skipped == self.since_save:
            raise UserError(f"fp16 overflow: the GradScaler skipped all {skipped} steps up to step {step} "
                            f"(inf/NaN gradients at every loss scale), so nothing was trained; stopped without "
                            f"saving. Try --amp_dtype=bf16 (where native), --amp=false or a lower --lr")
        return skipped

    def saved(self) -> None:
        """A checkpoint was written: its interval's skipped steps join the session's."""
        self.skipped_total += int(self.skipped) if self.scaling else 0
        self.skipped.zero_()
        self.since_save = 0


class LoopResult(NamedTuple):
    step: int  # the step reached
    train_time: float  # training seconds, earlier sessions' included
    rate_points: float  # this session's points (all ranks) without its first step ...
    rate_time: float  # ... and the seconds they took: the steady training rate
    first_step_s: float  # this session's first step: torch.compile's compilation happens there
    steady_step_s: float  # the mean step time after it


def _gather_renders(renders: dict) -> dict:
    """{view index: Rendered} of every rank, on rank 0 (CPU, per-sample weights dropped); {} on other ranks."""
    light = {i: out._replace(rgb=out.rgb.cpu(), depth=out.depth.cpu(), acc=out.acc.cpu(), weights=None)
             for i, out in renders.items()}
    return {i: out for part in gather_to_master(light) for i, out in part.items()}


def _write_pictures(cfg: Config, raw, views: Views, renders: dict, chunk_rays: int, autocast_dtype,
                    logger: RunLogger) -> None:
    """The validation images, then the videos (and both to W&B when it is on). Each failure is one line: what
    the run measured (summary.json, metrics, checkpoints) is already written and stays."""
    jobs = [("validation images", lambda: _write_val_images(cfg.run_dir, views, renders, logger))]
    if cfg.video:
        jobs.append(("videos", lambda: _write_videos(cfg, raw, views, chunk_rays, autocast_dtype, logger)))
    for what, job in jobs:
        try:
            job()
        except Exception as err:  # a codec, a full disk, W&B: the run's results must survive any of them
            print0(f"warning: the {what} were not written ({type(err).__name__}: "
                   f"{(str(err).strip().splitlines() or [''])[0][:200]}); summary.json and the checkpoint are")


def _write_val_images(run_dir: str, views: Views, renders: dict, logger: RunLogger) -> None:
    """One PNG per held-out view this rank rendered: ground truth | prediction | depth (own range)."""
    import imageio.v3 as iio

    folder = os.path.join(run_dir, "val")
    os.makedirs(folder, exist_ok=True)
    rows = {}
    for i, out in renders.items():
        depth = colourise_depth(out.depth.cpu().numpy(), out.acc.cpu().numpy())
        rows[i] = np.concatenate([to_uint8(views.image(i)), to_uint8(out.rgb), depth], axis=1)
        iio.imwrite(os.path.join(folder, f"view{i:03d}.png"), rows[i])
    logger.log_images("val", rows, "ground truth | prediction | depth")


def _write_videos(cfg: Config, raw, views: Views, chunk_rays: int, autocast_dtype, logger: RunLogger) -> None:
    # the same functions as `python render.py`, at the training views' resolution and mean focal length (a
    # centred, undistorted pinhole), on the background the views are scored on. A bounded scene: an orbit around
    # its centre (the origin: loaders put it there). An unbounded one (a capture): along its cameras' own track,
    # there and back, since an orbit would look at the parts of the room no camera did
    focal = float(views.cameras.fx.mean())
    path = sweep_poses(views.poses, cfg.video_frames) if cfg.scene == "unbounded" else None
    orbit = render_orbit(raw, views.height, views.width, focal, cfg.video_frames, cfg.video_radius,
                         cfg.video_elevation, chunk_rays, autocast_dtype=autocast_dtype,
                         background=views.eval_background(), poses=path)
    paths = write_orbit(orbit, cfg.run_dir, cfg.video_fps)
    logger.log_videos(paths, cfg.video_fps)


# --- entry point -------------------------------------------------------------------------------------------------
def main(preset: Config = EXP1, argv: list[str] | None = None) -> int:
    """Parse overrides and train; user errors become one line on stderr and exit code 2 (utils.run_cli)."""

    def body() -> int:
        args = sys.argv[1:] if argv is None else argv
        script = os.path.basename(sys.argv[0]) if argv is None else f"{preset.name}.py"
        # the device is checked before the scale is chosen for it: a missing GPU is one error, not a paper run
        cfg = from_cli(preset, args, prog=launch_command(script), check_device=check_device)
        print0(scale_line(cfg, args))  # first, so nobody is surprised by the sizes auto picked
        try:
            train(cfg)
        except Interrupted as stopped:
            print0(str(stopped))
            return stopped.exit_code
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
