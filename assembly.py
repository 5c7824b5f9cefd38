"""Assembly: a renderer built from a Config, and a trained one loaded from a checkpoint or a `.bitnerf` file.

The one place that picks a field's kind and puts a model together: below train.py and every tool that loads a
model (evaluate, render's command line, export, bench), above the parts it assembles (nerf, bitnerf,
bitnerf_packed, grid_field, render, bitnerf_format). `python render.py` runs `render_main` from here, so that
render.py's own functions import nothing above them.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from bitnerf import BitNeRF, plain_state_dict, quantize_bitnet
from bitnerf_format import OCCUPIED_KEY, is_bitnerf_file, read_bitnerf
from bitnerf_packed import ternary_field
from configs import Config, ConfigError, config_from_dict
from dataset import evaluation_background
from grid_field import GridField
from nerf import NeRF
from occupancy import OccupancyGrid
from render import TINY_NERF_FOCAL_PER_PIXEL, VolumeRenderer, render_orbit, write_orbit
from samplers import OccupancyGridSampler, StratifiedSampler
from hardware import amp_policy, int_mm_available, pick_device
from utils import ArgParser, UserError, load_checkpoint, run_cli


# --- building --------------------------------------------------------------------------------------------------
def build_field(cfg: Config) -> nn.Module:
    """The float field of `cfg.model` (BitNeRF's quantization is applied separately, see build_renderer); the MLP
    sizes are ignored by the grid field, the grid sizes by the MLPs, and bitnet_norm by all but BitNeRF."""
    if cfg.model == "nerf":
        return NeRF(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer)
    if cfg.model == "bitnerf":
        return BitNeRF(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, cfg.bitnet_norm)
    if cfg.model == "grid":
        return GridField(cfg.grid_resolution, cfg.grid_bound)
    raise ValueError(f"unknown model kind {cfg.model!r}")


def build_renderer(cfg: Config, device: torch.device, field_state: dict | None = None,
                   occupancy_state: dict | None = None) -> VolumeRenderer:
    """Float field (weights from `field_state` if given) -> BitNet quantization (bitnerf) -> renderer, with an
    occupancy grid (its state from `occupancy_state` if given) when `cfg.skip`.

    Quantization comes after loading because checkpoints hold plain float latent weights.
    """
    field = build_field(cfg)
    if field_state is not None:
        try:
            field.load_state_dict(field_state)
        except RuntimeError as err:
            raise UserError(f"checkpoint weights do not fit a {cfg.model} model of this config: "
                            f"{str(err).splitlines()[0]}") from None
    field.to(device)
    if cfg.model == "bitnerf":
        int_mm_available(device)  # decided now, eagerly: under torch.compile it is a constant
        quantize_bitnet(field)
    return VolumeRenderer(field, build_sampler(cfg, build_occupancy(cfg, device, occupancy_state)), cfg.chunk_points)


def build_sampler(cfg: Config, grid: OccupancyGrid | None) -> StratifiedSampler:
    """The sampler of a config: stratified (+ importance), or through an occupancy grid when skipping."""
    if grid is None:
        return StratifiedSampler(cfg.near, cfg.far, cfg.n_samples, cfg.n_importance)
    return OccupancyGridSampler(cfg.near, cfg.far, cfg.n_samples, grid, cfg.occ_update_every)


def build_occupancy(cfg: Config, device: torch.device, state: dict | None = None) -> OccupancyGrid | None:
    """The occupancy grid of a skipping config (None without skipping), from a saved state if given."""
    if not cfg.skip:
        return None
    grid = OccupancyGrid(cfg.occ_resolution, cfg.occ_bound, cfg.occ_threshold)
    if state is not None:
        try:
            grid.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"saved occupancy grid does not fit this config: {str(err).splitlines()[0]}") from None
    return grid.to(device)


def field_state_dict(renderer: VolumeRenderer) -> dict:
    """The field's weights as a plain float state dict (BitNeRF: its latent weights), as checkpoints hold them."""
    return plain_state_dict(renderer.field)


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype a run of `cfg` uses on `device` (None: AMP off); the rule is hardware.amp_policy."""
    return amp_policy(cfg.amp, cfg.amp_dtype, device).dtype


# --- loading -----------------------------------------------------------------------------------------------------
def load_trained(path: str, device: torch.device | str = "cpu") -> tuple[VolumeRenderer, Config]:
    """A trained renderer (eval mode) and its config from a checkpoint written by training, or from an exported
    packed-ternary BitNeRF (.bitnerf, export.py)."""
    if is_bitnerf_file(path):
        return load_exported(path, device)
    ckpt = load_checkpoint(path, map_location="cpu")
    try:
        cfg = config_from_dict(ckpt["config"])
    except (ConfigError, TypeError) as err:
        raise UserError(f"{path}: saved config is unreadable ({err})") from None
    renderer = build_renderer(cfg, torch.device(device), ckpt["model"], ckpt.get("occupancy"))
    return renderer.eval(), cfg


def load_exported(path: str, device: torch.device | str = "cpu", mode: str = "int8"):
    """A .bitnerf file -> (VolumeRenderer around bitnerf_packed.ternary_field in eval mode, Config)."""
    cfg, state, _ = read_bitnerf(path)
    occupied = state.pop(OCCUPIED_KEY, None)
    occupancy = build_occupancy(cfg, torch.device("cpu")) if occupied is not None else None
    if occupancy is not None:
        if occupied.shape != occupancy.occupied.shape:
            raise UserError(f"{path}: its occupancy grid does not fit its config")
        occupancy.occupied.copy_(occupied)
    field = ternary_field(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, mode, cfg.bitnet_norm)
    try:
        field.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: tensors do not fit its config: {str(err).splitlines()[0]}") from None
    renderer = VolumeRenderer(field, build_sampler(cfg, occupancy), cfg.chunk_points)
    int_mm_available(torch.device(device))  # decided now, eagerly (see build_renderer)
    return renderer.to(torch.device(device)).eval(), cfg


# --- command line of render.py: python render.py --ckpt RUN/ckpt.pt -----------------------------------------------
def _render_args(argv: list[str] | None):
    p = ArgParser(prog="render.py", description="360-degree RGB and depth videos (and stills) of a trained model.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by training (RUN/ckpt.pt), or a .bitnerf")
    p.add_argument("--out", help="output folder (default: a 'render' folder beside the checkpoint)")
    p.add_argument("--frames", type=int, help="frames in the turn (default: the run's video_frames)")
    p.add_argument("--fps", type=int, help="frames per second (default: the run's video_fps)")
    p.add_argument("--radius", type=float, help="camera distance from the scene's centre (default: the run's)")
    p.add_argument("--elevation", type=float, help="degrees; negative looks down (default: the run's)")
    p.add_argument("--size", type=int, default=100, help="square image side in pixels (default 100)")
    p.add_argument("--focal", type=float, help="focal length in pixels of the output image "
                   f"(default {TINY_NERF_FOCAL_PER_PIXEL} x size: the tiny NeRF camera's field of view)")
    p.add_argument("--background", choices=("white", "black"),
                   help="colour behind the scene (default: what the run's data is scored on)")
    p.add_argument("--stills", type=int, default=4, help="PNG stills (rgb | depth | opacity) to write")
    p.add_argument("--gif", action="store_true", help="also write GIFs")
    p.add_argument("--chunk", type=int, help="rays per forward pass (default: from the run's chunk_points)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    return p.parse_args(argv)


def _render_cli(argv: list[str] | None) -> int:
    args = _render_args(argv)
    device = pick_device(args.device)
    renderer, cfg = load_trained(args.ckpt, device)
    frames = args.frames if args.frames is not None else cfg.video_frames
    fps = args.fps if args.fps is not None else cfg.video_fps
    radius = args.radius if args.radius is not None else cfg.video_radius
    elevation = args.elevation if args.elevation is not None else cfg.video_elevation
    focal = args.focal if args.focal is not None else TINY_NERF_FOCAL_PER_PIXEL * args.size
    chunk = args.chunk if args.chunk is not None else renderer.eval_chunk_rays()
    for name, value in (("frames", frames), ("fps", fps), ("size", args.size), ("chunk", chunk)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1 (got {value})")
    if not (radius > 0 and focal > 0 and args.stills >= 0):
        raise UserError(f"need --radius > 0, --focal > 0, --stills >= 0 (got {radius}, {focal}, {args.stills})")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "render")
    background = (evaluation_background(cfg.data, cfg.background) if args.background is None
                  else torch.ones(3) if args.background == "white" else None)
    orbit = render_orbit(renderer, args.size, args.size, focal, frames, radius, elevation, chunk,
                         autocast_dtype=amp_dtype(cfg, device),
                         background=None if background is None else background.to(device))
    for path in write_orbit(orbit, out_dir, fps, args.gif, args.stills):
        print(path)
    return 0


def render_main(argv: list[str] | None = None) -> int:
    """`python render.py ...`: orbit videos and stills of a trained model; returns the exit code."""
    return run_cli(lambda: _render_cli(argv))
