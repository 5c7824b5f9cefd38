"""Experiment configuration: one frozen dataclass and one preset per experiment.

A preset differs from its base only where the experiment differs, so `dataclasses.replace` builds each from
the one before. Any field can be overridden on the command line as `--key=value`; unknown keys and bad values
raise `ConfigError` with a one-line message.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import textwrap
import tokenize
from dataclasses import dataclass, fields, replace
from typing import Callable


class ConfigError(ValueError):
    """A bad configuration value or command-line override (shown to the user as a one-line error)."""


@dataclass(frozen=True)
class Config:
    # --- run -----------------------------------------------------------------------------------------------
    name: str = "exp1"  # the run's name; the default output folder is runs/<name>
    out_dir: str = ""  # "" -> runs/<name>
    # a tiny-NeRF .npz, a NeRF-synthetic (Blender) scene folder, an instant-ngp / nerfstudio capture (its
    # transforms.json or the folder holding it), or "synthetic" for the built-in procedural scene (dataset.py);
    # the default of expN.py and study.py alike: real data is always named
    data: str = "synthetic"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # paper: the preset as the original configured it; cpu: the same experiment at a size a 2-core CPU trains in
    # minutes (see CPU_SCALE). On the command line the default is auto: paper on CUDA, cpu elsewhere
    scale: str = "paper"
    seed: int = 42  # seed of initialisation, batches and sampling
    # --- schedule (steps wins over epochs when > 0; max_time_s stops early and then finishes normally) ----
    epochs: int = 50  # passes over the training rays, used when steps is 0
    steps: int = 0  # training steps; wins over epochs when > 0
    max_time_s: float = 0.0  # stop training after this many seconds (0 = no limit), then finish normally
    # --- data / batching -----------------------------------------------------------------------------------
    # views held out for validation: the last ones of a .npz; of a scene folder's val split, this many spread
    # evenly (all if it has fewer); of a capture, this many frames spread evenly over the file-name order
    val_views: int = 11
    # shrink every image this many times (area filter; the original's half_res is 2). 0 = auto: a capture's images
    # until their longer side is at most 256 pixels on a CPU, 512 on MPS, 1024 on CUDA; other data as it is
    downscale: int = 0
    # hold out every Nth view (0, N, 2N, ...; LLFF and mip-NeRF 360 hold out every 8th) instead of val_views of
    # them; 0 = val_views. For captures and .npz files (a scene folder has its own val split)
    holdout_every: int = 0
    # what lies behind the scene (dataset.Background): auto | white | black | random | none. With alpha: the
    # colour to composite on (auto = random per ray in training, white in evaluation, the benchmark's protocol);
    # without: the colour the images were composited on (auto: black for .npz files, none for the rest), or
    # none for a real background (nothing carved, no background penalty or metric)
    background: str = "auto"
    batch_unit: str = "image"  # image: a step is `batch_size` whole images; ray: `batch_size` random rays
    batch_size: int = 4  # global (summed over DDP ranks)
    # sample points per forward/backward micro-batch: bounds memory, not the math. 8192 keeps a 256-wide layer's
    # activations (8 MB) in L3 cache and, compiled, keeps the bias-gradient sums from re-reading them per 8 columns;
    # a CUDA device takes at least 2^17 (GPU_MIN_CHUNK_POINTS: fewer, larger kernels)
    # measured: 1.16x (compiled) / 1.3x (eager) faster per point than 65536 on the 2-core EPYC (bench.py)
    chunk_points: int = 8192
    # --- model ---------------------------------------------------------------------------------------------
    model: str = "nerf"  # nerf | bitnerf | grid (a voxel grid, no MLP: the fast preset's field, see grid_field.py)
    n_freqs: int = 16  # positional encoding frequencies L: input dim 3 + 6L
    width: int = 256  # MLP width
    depth: int = 8  # hidden layers
    skip_layer: int = 4  # the encoded input is concatenated back before this hidden layer
    # the original NeRF's direction branch: the colour also depends on the viewing direction, positionally
    # encoded with n_freqs_dirs frequencies; off in the six presets, so they stay the original's experiments
    viewdirs: bool = False
    n_freqs_dirs: int = 4  # viewdirs=true: positional encoding frequencies of the direction (the original's L=4)
    # model=bitnerf: the RMSNorm before each BitLinear, as in BitNet b1.58; false quantizes the layer's raw input
    bitnet_norm: bool = True
    # model=bitnerf: the backward's two matmuls per layer. fp32: torchao's straight-through estimator as it is;
    # bf16: their inputs rounded to bf16 (relative error ~2^-9), float32 sums, as BitNet trains in bf16 mixed
    # precision. auto: bf16 on a CPU with bf16 units (AVX-512 BF16, AMX), which compute it natively, else fp32
    # (CUDA's fp32 matmuls use TF32 already). The forward is exact either way
    # measured: several times faster on bf16 units, the same held-out PSNR at equal steps (lego, cpu scale)
    bitnet_grad: str = "auto"
    # model=bitnerf, the training recipe (bitnerf.Quantization; the defaults train BitNet b1.58 as exp4 does): the
    # scale the latent weights are divided by before rounding to -1, 0, 1: absmean (BitNet b1.58) or median (fewer
    # weights rounded to 0)
    bitnet_scale: str = "absmean"
    # model=bitnerf: one weight scale per tensor (BitNet b1.58) or per output channel
    bitnet_scale_per: str = "tensor"
    # model=bitnerf: int8: per-row int8 activations and an integer product (BitNet b1.58); float: the activations
    # stay float, only the weights are ternary
    bitnet_act: str = "int8"
    # model=bitnerf, late quantization: the share of training (of its steps, or of max_time_s when that ends it first) the
    # hidden layers train in float before quantization-aware training starts, with the same weights and AdamW
    # state; 0 = quantized from the first step (BitNet b1.58)
    bitnet_qat_from: float = 0.0
    grid_resolution: int = 128  # model=grid: vertices per axis
    grid_bound: float = 1.5  # model=grid: the grid spans [-bound, bound]^3 (outside is empty space)
    # --- rendering -----------------------------------------------------------------------------------------
    # stratified samples per ray (skip_with=proposal: where the proposal grid is evaluated; the field at fine_samples)
    n_samples: int = 32
    n_importance: int = 0  # extra samples per ray drawn from the coarse weights (0 = plain stratified)
    # bounded: an object in a box (samples evenly spaced in [near, far], the field sees world points).
    # unbounded: what lies beyond the object (walls, a room, a sky) is modelled too: mip-NeRF 360's contraction
    # (identity inside radius occ_bound / 2, all of space inside occ_bound) with samples evenly spaced to that
    # radius and in disparity beyond (samplers.py). auto: unbounded for a capture with a real background
    # (instant-ngp / nerfstudio, LLFF), bounded for the rest
    scene: str = "auto"
    # ray start (and far: end); 0 = from the data: 2 and 6 for a bounded scene (cameras ~4 from the object), for an
    # unbounded one near 0.05 R and far R (1 + aabb_scale * sqrt(3)), R the cameras' largest distance from the centre
    near: float = 0.0
    far: float = 0.0  # see near
    perturb: bool = True  # stratified jitter of the samples during training
    # + weight * mean opacity of the batch's rays that see through the scene (background): it keeps empty space
    # empty, a larger weight more so at a small cost in held-out PSNR; 0 = off
    # measured: lego, cpu scale, 1500 steps: 0 -> 26.36 dB, background opacity 0.064; 1e-3 -> 26.31, 0.022;
    # 1e-2 -> 26.15, 0.003 (with carving; without it the original's fields reached 0.40-0.50)
    bg_opacity_weight: float = 1e-3
    # empty-space skipping: the field is evaluated only where the scene is, found by skip_with
    skip: bool = True
    # grid (occupancy.py): at the stratified samples inside occupied cells of a binary grid over
    # [-occ_bound, occ_bound]^3, refreshed from the field's own density every occ_update_every steps (EMA);
    # occ_carve empties, before training, the cells that background training pixels see through.
    # proposal (samplers.ProposalSampler, mip-NeRF 360's proposal sampling): a density grid over the same box is
    # evaluated at the n_samples stratified samples, and the field at fine_samples samples drawn from its weights;
    # the grid learns to bound the field's weights. It skips the empty space of a room or sky, which fills few grid
    # cells but many samples' worth of ray. auto: grid for a bounded scene, proposal for an unbounded one
    skip_with: str = "auto"
    fine_samples: int = 24  # skip_with=proposal: samples per ray the field is evaluated at
    proposal_resolution: int = 64  # skip_with=proposal: the density grid's vertices per axis
    occ_resolution: int = 128  # occupancy grid cells per axis
    # the occupancy grid spans [-occ_bound, occ_bound]^3; in an unbounded scene that is the contracted space, the
    # identity inside radius occ_bound / 2. 0 = from the data: 1.5 bounded, 2 R unbounded (see near)
    occ_bound: float = 0.0
    occ_update_every: int = 16  # steps between occupancy grid refreshes
    # a cell stays occupied while one render step there ((far - near) / n_samples) would be more than this opaque
    occ_threshold: float = 0.01
    occ_carve: bool = True  # empty, before training, the cells that background training pixels see through
    # --- optimisation --------------------------------------------------------------------------------------
    lr: float = 1e-3  # AdamW learning rate
    weight_decay: float = 0.01  # AdamW weight decay
    lr_schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0  # linear warm-up steps
    grad_clip: float = 0.0  # 0 = no clipping (the grad norm is still logged)
    amp: bool = False  # automatic mixed precision (autocast to amp_dtype)
    # auto: bf16 where the hardware has bf16 units (CUDA capability >= 8.0, CPUs with avx512_bf16/AMX; an
    # emulating CPU is warned about), else fp16 with a GradScaler (T4, V100, Apple GPUs) | bf16 | fp16
    amp_dtype: str = "auto"
    # CUDA: fp32 matmuls on TF32 tensor cores (inputs rounded to a 10-bit mantissa, fp32 accumulation; several
    # times the plain fp32 rate on A100/H100). No effect on CPU or MPS
    tf32: bool = True
    compile: bool = True  # torch.compile the training step (model=grid needs false)
    # --- logging / outputs ---------------------------------------------------------------------------------
    log_every: int = 10  # steps between metrics records
    eval_every: int = 200  # steps between validations (0 = only at the end)
    ckpt_every: int = 200  # steps between checkpoints (0 = only at the end)
    keep_ckpts: int = 2  # ckpt_stepN.pt files kept besides ckpt.pt
    resume: bool = True  # continue from out_dir/ckpt.pt when it holds a run of the same config
    video: bool = True  # write the orbit videos at the end
    video_frames: int = 120  # frames in the orbit
    video_fps: int = 30  # frames per second
    video_radius: float = 4.0  # camera distance from the origin
    video_elevation: float = -30.0  # degrees; negative looks down
    wandb: str = "offline"  # online | offline | disabled (the WANDB_MODE environment variable wins)
    wandb_project: str = "nerf-experiments"  # W&B project name

    def __post_init__(self) -> None:
        problems = list(_problems(self))
        if problems:
            raise ConfigError("; ".join(problems))

    @property
    def run_dir(self) -> str:
        return self.out_dir or f"runs/{self.name}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# BitNeRF's training recipe: the keys beyond BitNet b1.58 (bitnerf.Quantization and late quantization)
BITNET_RECIPE = ("bitnet_scale", "bitnet_scale_per", "bitnet_act", "bitnet_qat_from")

# Fields that may change between a run and its resumption without changing what is being trained.
RESUME_INDEPENDENT = frozenset(
    {"out_dir", "device", "max_time_s", "resume", "wandb", "wandb_project", "log_every", "eval_every",
     "ckpt_every", "keep_ckpts", "video", "video_frames", "video_fps", "video_radius", "video_elevation",
     "chunk_points", "compile", "tf32"}
)

_CHOICES = {
    "batch_unit": ("image", "ray"),
    "model": ("nerf", "bitnerf", "grid"),
    "lr_schedule": ("constant", "cosine"),
    "amp_dtype": ("auto", "bf16", "fp16"),
    "wandb": ("online", "offline", "disabled"),
    "scale": ("paper", "cpu"),
    "background": ("auto", "white", "black", "random", "none"),
    "bitnet_grad": ("auto", "fp32", "bf16"),
    "bitnet_scale": ("absmean", "median"),
    "bitnet_scale_per": ("tensor", "channel"),
    "bitnet_act": ("int8", "float"),
    "scene": ("auto", "bounded", "unbounded"),
    "skip_with": ("auto", "grid", "proposal"),
}


def _problems(c: Config):
    for key, allowed in _CHOICES.items():
        if getattr(c, key) not in allowed:
            yield f"{key}={getattr(c, key)!r} is not one of {', '.join(allowed)}"
    if not (c.device in ("auto", "cpu", "cuda", "mps") or _is_cuda_index(c.device)):
        yield f"device={c.device!r} is not auto, cpu, cuda, cuda:N or mps"
    positive = ("epochs", "batch_size", "chunk_points", "n_freqs", "width", "depth", "log_every", "video_frames",
                "video_fps", "keep_ckpts", "fine_samples")
    for key in positive:
        if getattr(c, key) < 1:
            yield f"{key} must be >= 1 (got {getattr(c, key)})"
    for key in ("steps", "max_time_s", "warmup_steps", "grad_clip", "weight_decay", "eval_every", "ckpt_every",
                "n_importance", "val_views", "bg_opacity_weight", "n_freqs_dirs", "downscale",
                "holdout_every"):
        if getattr(c, key) < 0:
            yield f"{key} must be >= 0 (got {getattr(c, key)})"
    for f in fields(c):  # nan passes every comparison below and inf trains straight to NaN
        value = getattr(c, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            yield f"{f.name} must be a finite number (got {value})"
    if not c.lr > 0:
        yield f"lr must be > 0 (got {c.lr})"
    if c.n_samples < 2:
        yield f"n_samples must be >= 2 (got {c.n_samples})"
    if c.near < 0 or c.far < 0 or (c.near and c.far and not c.near < c.far):
        yield f"need 0 <= near < far (got near={c.near}, far={c.far}; 0 = from the data)"
    if not 0 <= c.skip_layer < c.depth:
        yield f"skip_layer must be in [0, depth) (got {c.skip_layer} with depth={c.depth})"
    if c.viewdirs and c.width < 2:  # the direction branch's hidden layer is width / 2 wide
        yield f"viewdirs=true needs width >= 2 (got {c.width})"
    if c.viewdirs and c.model == "grid":
        yield "model=grid has no direction branch: set --viewdirs=false"
    if c.model == "grid" and c.grid_resolution < 2:
        yield f"grid_resolution must be >= 2 (got {c.grid_resolution})"
    if c.model == "grid" and not c.grid_bound > 0:
        yield f"grid_bound must be > 0 (got {c.grid_bound})"
    if c.model == "grid" and c.compile:
        # its empty-space skipping picks a data-dependent number of points: no single compiled graph
        yield "model=grid runs eagerly: set --compile=false"
    if c.skip and c.model == "grid":
        yield "model=grid skips empty space by itself: set --skip=false"
    if c.skip and c.n_importance:
        yield "skip=true samples stratified points only: set --n_importance=0 or --skip=false"
    if c.scene == "unbounded" and c.n_importance:
        yield "scene=unbounded samples in disparity, not from coarse weights: set --n_importance=0"
    if c.skip and (c.occ_resolution < 2 or c.occ_bound < 0 or c.occ_update_every < 1
                   or not 0 < c.occ_threshold < 1):
        yield (f"need occ_resolution >= 2, occ_bound >= 0 (0: from the data), occ_update_every >= 1, 0 < occ_threshold < 1 (got "
               f"{c.occ_resolution}, {c.occ_bound}, {c.occ_update_every}, {c.occ_threshold})")
    if c.skip and c.proposal_resolution < 2:
        yield f"proposal_resolution must be >= 2 (got {c.proposal_resolution})"
    if not 0 <= c.bitnet_qat_from < 1:
        yield f"bitnet_qat_from must be in [0, 1): the share of training before quantization (got {c.bitnet_qat_from})"
    recipe = {k: getattr(c, k) for k in BITNET_RECIPE if getattr(c, k) != getattr(Config, k)}
    if recipe and c.model != "bitnerf":
        yield f"{', '.join(recipe)} apply to model=bitnerf only (model={c.model!r})"
    if c.video_radius <= 0:
        yield f"video_radius must be > 0 (got {c.video_radius})"
    if not c.name or "/" in c.name:
        yield f"name must be a non-empty string without '/' (got {c.name!r})"


def _is_cuda_index(device: str) -> bool:
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


# --- presets: each differs from the one it builds on only where its experiment differs -----------------------
EXP1 = Config(name="exp1")  # base NeRF
EXP2 = replace(EXP1, name="exp2", amp=True)  # + automatic mixed precision
EXP3 = replace(EXP2, name="exp3", batch_size=8)  # + twice the images per step
EXP4 = replace(EXP1, name="exp4", model="bitnerf", lr=5e-5)  # BitNet b1.58 quantization-aware training
EXP5 = replace(EXP1, name="exp5")  # exp1 under torchrun / DDP
EXP6 = replace(EXP4, name="exp6")  # exp4 under torchrun / DDP
# BitNeRF with hidden layers twice as wide: the recipe that closes the ternary field's gap to NeRF at equal steps
# (docs/bitnerf_recipes.md); 4x exp4's weights, but at ~1.6 bits each it packs to about a third of NeRF's float32 file
EXP7 = replace(EXP4, name="exp7", width=2 * EXP4.width)
# Not one of the six: the quickest route to good quality on a CPU. A voxel-grid field (grid_field.py: no MLP,
# eager, empty-space skipping) trained on random rays. Its values learn at lr 0.2 (Adam's step is about lr in
# value units; on lego100 after 600 steps: lr 0.1 27.7 dB, 0.2 28.2, 0.4 25.3) with a cosine decay and no weight
# decay (it would pull unseen voxels towards density 0.7). 2048 rays a step: per ray seen, 600 x 2048 beat
# 300 x 4096 (27.7 vs 26.7 dB at lr 0.1); resolution 128 beat 160 at this budget (27.7 vs 27.0).
# Samples cover t in [2.5, 5.5], the ball of radius 1.5 around the origin seen from the cameras at radius ~4,
# one sample per ~voxel (128 over 3 units; the grid's voxels are 3/127 wide).
FAST = replace(
    EXP1, name="fast", model="grid", compile=False, batch_unit="ray", batch_size=2048, chunk_points=1 << 20,
    n_samples=128, n_importance=0, near=2.5, far=5.5, lr=0.2, weight_decay=0.0, lr_schedule="cosine",
    warmup_steps=0, epochs=1, steps=2000, eval_every=200, ckpt_every=500, keep_ckpts=1, skip=False,
    bg_opacity_weight=0.0,  # measured as it stands: its own skipping already leaves the background at ~0.01
)
PRESETS = {c.name: c for c in (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6, EXP7, FAST)}


# --- the scene's extent: near, far and the occupancy box, from the data unless the command line says ----------
BOUNDED_SCENE = {"near": 2.0, "far": 6.0, "occ_bound": 1.5}  # cameras ~4 from an object within +-1.5
SCENE_KEYS = tuple(BOUNDED_SCENE)


def scene_bounds(cfg: Config) -> tuple[float, float, float, float]:
    """(near, far, occ_bound, contraction radius) a renderer of `cfg` uses: a bounded scene's keys left at 0 take
    BOUNDED_SCENE's values and it has no contraction (0); an unbounded scene's are set from its data (dataset.
    resolve_scene) and its contraction is the identity inside occ_bound / 2."""
    if cfg.scene == "unbounded":
        if not all(getattr(cfg, k) for k in SCENE_KEYS):
            raise ConfigError("scene=unbounded needs near, far and occ_bound, which its data sets: load the data "
                              "first (dataset.resolve_scene) or give all three")
        return cfg.near, cfg.far, cfg.occ_bound, cfg.occ_bound / 2
    near, far, bound = (getattr(cfg, k) or BOUNDED_SCENE[k] for k in SCENE_KEYS)
    return near, far, bound, 0.0


def skip_method(cfg: Config) -> str | None:
    """How `cfg` skips empty space: "grid", "proposal", or None (it does not); skip_with auto is the proposal
    for an unbounded scene, the occupancy grid for the rest."""
    if not cfg.skip:
        return None
    if cfg.skip_with != "auto":
        return cfg.skip_with
    return "proposal" if cfg.scene == "unbounded" else "grid"


# Keys the data sets when they are left at these values (dataset.resolve_scene, the automatic downscale): a run's
# saved config holds what was chosen, and a request that left them to the data asks for the same run.
FROM_THE_DATA = {"scene": "auto", "downscale": 0, "near": 0.0, "far": 0.0, "occ_bound": 0.0, "skip_with": "auto"}


def config_changes(saved: Config, requested: Config, ignore=frozenset()) -> list[str]:
    """`key: saved -> requested` for each field in which `requested` asks for another run than `saved` was, but
    for `ignore` and for the keys `requested` leaves to the data (FROM_THE_DATA)."""
    left_to_data = lambda k: k in FROM_THE_DATA and getattr(requested, k) == FROM_THE_DATA[k]  # noqa: E731
    return [f"{k}: {getattr(saved, k)!r} -> {getattr(requested, k)!r}" for k in saved.to_dict()
            if k not in ignore and not left_to_data(k) and getattr(saved, k) != getattr(requested, k)]


# --- scales: the same experiment at another size ------------------------------------------------------------
# `cpu` changes only model size, encoding, sampling, batching and schedule, so every experiment keeps what makes it
# that experiment: exp2's AMP, exp3's batch (twice exp1's here too), exp4's BitNeRF, exp5/exp6's DDP.
# Measured on lego100 (90 views, 10 held out) on a 2-core CPU: see the README's Results.
# 64 samples over [near, far] = one per 0.0625, about the 64^3 occupancy cells' size (3/64); 1000 steps on lego:
# 64^3 and 128^3 cells gave the same held-out PSNR (22.2 dB at step 200), 64^3 refreshes 8x faster.
# Batches of 512 rays: per ray seen, smaller batches learn more (more Adam steps), and at a fixed time a step's cost
# is about its rays, so at the minutes a CPU run lasts they win: lego100, 3 min, 1 thread: 512 rays 27.00 dB,
# 2048 rays 26.53; instant-ngp's fox, 5 min: 256 / 512 / 1024 / 2048 rays 22.97 / 22.75 / 21.79 / 20.86 dB.
# The grid is refreshed every 64 steps, warm-up, validation and checkpoints come every 200 / 2000 / 2000 steps:
# the same rays apart as 16, 50, 500 and 500 steps of 2048 rays (a refresh every 16 steps of 512 rays cost the
# fox 8 % of its steps and 0.2 dB).
CPU_SCALE = dict(width=128, depth=4, skip_layer=2, n_freqs=8, batch_unit="ray", n_samples=64, occ_resolution=64,
                 occ_update_every=64, weight_decay=0.0, lr_schedule="cosine", warmup_steps=200, epochs=1,
                 eval_every=2000, ckpt_every=2000)
CPU_RAYS_PER_IMAGE_OF_BATCH = 128  # paper batch_size counts images: exp1's 4 -> 512 rays, exp3's 8 -> 1024
CPU_STEPS_FOR_EXP1_BATCH = 30000  # 15 M rays; exp3 (twice the batch) gets half: the same rays seen
# lego, 1000 steps, cosine, no weight decay, held-out PSNR: NeRF 5e-3 25.62 dB; BitNeRF 2e-3 25.13, 5e-3 25.87,
# 1e-2 25.75 (the original's 5e-5 reached ~17 dB: ternary QAT wants a far higher lr than it was given)
CPU_LR = {"nerf": 5e-3, "bitnerf": 5e-3}


def apply_scale(cfg: Config, scale: str) -> Config:
    """`cfg` (a paper-scale preset) at `scale`. The grid field has no size to change."""
    if scale == "paper" or cfg.model == "grid":
        return replace(cfg, scale=scale)
    rays = CPU_RAYS_PER_IMAGE_OF_BATCH * cfg.batch_size
    steps = CPU_STEPS_FOR_EXP1_BATCH * EXP1.batch_size // cfg.batch_size
    # a preset wider than exp1 (exp7) stays as many times wider, as exp3's batch stays twice exp1's
    size = dict(CPU_SCALE, width=CPU_SCALE["width"] * cfg.width // EXP1.width)
    return replace(cfg, scale=scale, batch_size=rays, steps=steps, lr=CPU_LR[cfg.model], **size)


def auto_scale(device: str) -> str:
    """paper where the run will use CUDA, cpu elsewhere (a CPU or an Apple GPU)."""
    return "paper" if device_kind(device) == "cuda" else "cpu"


def launched_by_torchrun() -> bool:
    """Whether this process is a torchrun worker: torchrun sets WORLD_SIZE for every worker, one process included
    (a 1-rank process group, DDP and all: the multi-GPU path on one GPU); a plain `python` run has none."""
    return "WORLD_SIZE" in os.environ


def device_kind(requested: str, distributed: bool | None = None) -> str:
    """'cuda', 'mps' or 'cpu': the kind of device a run with --device=`requested` uses (availability is checked
    by hardware.pick_device). auto: CUDA, else MPS, else the CPU; under torchrun never MPS, whose tensors gloo cannot
    send."""
    if requested != "auto":
        return requested.partition(":")[0]
    import torch

    if distributed is None:
        distributed = launched_by_torchrun()
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and not distributed:
        return "mps"
    return "cpu"


# --- device defaults: what a run on each kind of device uses unless the preset or command line says more --------
# cuda: micro-batches of at least 2^17 sample points. 8192 fits a CPU's L3 cache, but would cut exp1's paper-scale
# step (40,000 rays x 32 samples) into ~160 bursts of small kernels with a host sync each: launch-bound on a GPU.
# 2^17 points make each 256-wide layer a 131072 x 256 x 256 matmul (enough to fill an A100) and keep the 8-layer
# field's saved activations near 3 GB (a 16 GB T4 holds them). Chosen by reasoning, not yet measured on a GPU.
# mps: eager (inductor on MPS has failed to lower ops BitNeRF uses).
GPU_MIN_CHUNK_POINTS = 1 << 17


def apply_device_defaults(cfg: Config, kind: str) -> Config:
    """`cfg` with the defaults of a `kind` ('cuda', 'mps', 'cpu') device; the command line's overrides come after."""
    if kind == "cuda":
        return replace(cfg, chunk_points=max(cfg.chunk_points, GPU_MIN_CHUNK_POINTS))
    if kind == "mps":
        return replace(cfg, compile=False)
    return cfg


# --- field evaluations: how many points a ray costs, how many rays a micro-batch holds ---------------------------
def points_per_ray(cfg: Config) -> int:
    """The most field evaluations one ray can cost: its n_samples stratified samples, and with n_importance > 0
    the fine pass again on all n_samples + n_importance samples (render.render_samples evaluates the one field
    at both; with empty-space skipping a ray costs at most n_samples). `cfg` may be anything with a Config's
    n_samples and n_importance (a sampler)."""
    return cfg.n_samples + (cfg.n_samples + cfg.n_importance if cfg.n_importance else 0)


def rays_per_chunk(cfg: Config) -> int:
    """Rays whose field evaluations fit one micro-batch of cfg.chunk_points points (at least one ray). `cfg` may
    be anything with a Config's chunk_points, n_samples and n_importance."""
    return max(1, cfg.chunk_points // points_per_ray(cfg))


# --- command line --------------------------------------------------------------------------------------------
def parse_value(key: str, raw: str, kind: type):
    """Convert the text of `--key=raw` to the field's type, or raise ConfigError."""
    if kind is bool:
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects true/false, got {raw!r}")
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"--{key} expects {kind.__name__}, got {raw!r}") from None


def from_cli(preset: Config, argv: list[str], prog: str = "",
             check_device: Callable[[str], None] | None = None) -> Config:
    """Apply `--key=value` overrides (and `--preset=NAME` as the first one) to a preset.

    A bare `--flag` sets a boolean field to true; `--key value` (space-separated) is accepted too.
    `--scale=paper|cpu|auto` (default auto, see auto_scale) is applied to the preset before the other overrides,
    so an explicit `--width=...` wins over the scale's. `check_device(device)` (e.g. hardware.check_device) may
    refuse the requested device before a scale is chosen for it. `--help` prints `usage` of the config the rest
    of the command line gives (`prog`, default `python <sys.argv[0]>`, heads it) and exits with status 0.
    """
    preset, overrides, scale, wants_help = _parse_cli(preset, argv)
    device = overrides.get("device", preset.device)
    if check_device is not None:
        check_device(device)
    chosen = scale or auto_scale(device)
    if chosen not in _CHOICES["scale"]:
        raise ConfigError(f"scale={chosen!r} is not one of auto, {', '.join(_CHOICES['scale'])}")
    cfg = _at_scale(preset, chosen, device, overrides)
    if wants_help:
        try:  # overrides that only fit the chosen scale leave nothing to compare with
            other = _at_scale(preset, "cpu" if chosen == "paper" else "paper", device, overrides)
        except ConfigError:
            other = None
        # asked for: stdout and exit status 0, like any command's --help; flushed here, so that a reader that
        # left (`| head`) is a BrokenPipeError for utils.run_cli, not one at exit
        print(usage(cfg, other, prog or f"python {os.path.basename(sys.argv[0])}", auto=scale is None),
              flush=True)
        raise SystemExit(0)
    return cfg


def _parse_cli(preset: Config, argv: list[str]) -> tuple[Config, dict, str | None, bool]:
    """(preset, {key: typed value}, scale or None for auto, whether --help was asked for) of `argv`."""
    types = {f.name: _field_type(f) for f in fields(Config)}
    overrides: dict = {}
    scale, wants_help = None, False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            wants_help = True
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --key=value")
        key, eq, raw = arg[2:].partition("=")
        key = key.replace("-", "_")
        if key == "preset":
            if raw not in PRESETS:
                raise ConfigError(f"unknown preset {raw!r}; known: {', '.join(PRESETS)}")
            preset = PRESETS[raw]
            continue
        if key not in types:
            raise ConfigError(f"unknown config key --{key} (see --help for the list)")
        if not eq:
            if types[key] is bool:
                raw = "true"
            elif args and not args[0].startswith("--"):
                raw = args.pop(0)
            else:
                raise ConfigError(f"--{key} needs a value: --{key}=VALUE")
        if key == "scale":
            scale = None if raw == "auto" else raw
            continue
        overrides[key] = parse_value(key, raw, types[key])
    return preset, overrides, scale, wants_help


def _at_scale(preset: Config, scale: str, device: str, overrides: dict) -> Config:
    """`preset` at `scale` with the defaults of `device`'s kind, then the command line's `overrides`."""
    return replace(apply_device_defaults(apply_scale(preset, scale), device_kind(device)), **overrides)


def scale_line(cfg: Config, argv: list[str]) -> str:
    """The run's first line: which scale, and why when it was chosen automatically."""
    chosen = "" if any(a.startswith("--scale") for a in argv) else " (auto: " + (
        "CUDA available)" if cfg.scale == "paper" else "no CUDA device; --scale=paper for the original sizes)")
    return (f"scale {cfg.scale}{chosen}: {cfg.model} {cfg.depth}x{cfg.width}, L={cfg.n_freqs}, "
            f"{cfg.n_samples} samples/ray, {cfg.batch_size} {cfg.batch_unit}s/step, lr {cfg.lr:g}, "
            f"skip {'on' if cfg.skip else 'off'}, {cfg.chunk_points} points per micro-batch, "
            f"amp {'on' if cfg.amp else 'off'}, compile {'on' if cfg.compile else 'off'}")


def _field_type(f: dataclasses.Field) -> type:
    # `from __future__ import annotations` makes f.type a string
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def usage(cfg: Config, other: Config | None = None, prog: str = "python train.py", auto: bool = True) -> str:
    """--help: every key under its section, with its type, its value in `cfg` (what the command runs with), the
    value in `other` (the same command at the other scale) where that differs, and its description (the comments
    of Config's fields). `prog` is the command that runs the script; `auto`: the scale was picked by auto_scale."""
    described = field_descriptions()
    picked = "picked by --scale=auto: paper on CUDA, cpu elsewhere" if auto else "as --scale says"
    compared = f"; beside a value, the {other.scale} scale's where that differs" if other else ""
    lines = [f"usage: {prog} [--key=value ...]   (preset: {cfg.name})", ""]
    lines += textwrap.wrap(f"config keys, with the values this command runs with (the {cfg.scale} scale, {picked})"
                           f"{compared}:", width=112)
    section = None
    for f in fields(Config):
        heading, text = described.get(f.name, ("", ""))
        if heading != section:
            section = heading
            lines += ["", heading]
        kind, value = _field_type(f).__name__, _cli_value(getattr(cfg, f.name))
        if f.name == "scale":
            kind += f": auto | paper | cpu; the default, auto, is paper on CUDA, cpu elsewhere: " \
                    f"{auto_scale(cfg.device)} here"
        elif other is not None and getattr(other, f.name) != getattr(cfg, f.name):
            value += f"  ({other.scale} scale: {_cli_value(getattr(other, f.name))})"
        lines.append(f"  --{f.name}={value}  ({kind})")
        lines += textwrap.wrap(text, width=112, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _cli_value(value) -> str:
    """A value as it is written on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    return '""' if value == "" else str(value)


def field_descriptions() -> dict[str, tuple[str, str]]:
    """{key: (its section, its description)}, read from the comments of Config's source (configs.py holds the
    text once): a key's description is the comment lines directly above it and the comment at the end of its
    line, up to a line that starts `# measured:` (the evidence for a default, not help); a `# --- section ---`
    line heads the keys below it. {} where the source cannot be read."""
    try:
        source = textwrap.dedent(inspect.getsource(Config))
    except (OSError, TypeError):
        return {}
    comments = {}  # line number -> (text, whether the comment is the whole line)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.string.lstrip("#").strip(), token.line.lstrip().startswith("#"))
    headings = {n: text.strip("- ") for n, (text, whole) in comments.items() if whole and text.startswith("---")}
    described = {}
    for node in ast.parse(source).body[0].body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        above, n = [], node.lineno - 1
        while n in comments and comments[n][1] and n not in headings:
            above.insert(0, comments[n][0])
            n -= 1
        trailing = [comments[k][0] for k in range(node.lineno, node.end_lineno + 1)
                    if k in comments and not comments[k][1]]
        text = above + trailing
        measured = next((i for i, line in enumerate(text) if line.startswith("measured:")), len(text))
        section = max((k for k in headings if k < node.lineno), default=None)
        described[node.target.id] = (headings.get(section, ""), " ".join(text[:measured]))
    return described


def config_from_dict(d: dict) -> Config:
    """Rebuild a Config saved by `to_dict` (unknown keys from a newer version are an error, not ignored)."""
    known = {f.name for f in fields(Config)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"saved config has unknown keys: {', '.join(sorted(unknown))}")
    # a saved config without `skip` / `bg_opacity_weight` was trained (and must be rendered) without them; one
    # without `bitnet_norm` had the RMSNorm, the default
    # one without `scene` was bounded (unbounded scenes came with the key)
    return Config(**{"skip": False, "bg_opacity_weight": 0.0, "scene": "bounded", **d})
