"""Assembly: a renderer built from a Config, and a trained one loaded from a checkpoint or a `.bitnerf` file.

The one place that picks a field's kind and puts a model together: below train.py and every tool that loads a
model (evaluate, render, export, bench), above the parts it assembles (nerf, bitnerf, bitnerf_packed, grid_field,
renderer, samplers, occupancy, bitnerf_format).
"""

from __future__ import annotations


import torch
from torch import nn

from bitnerf import BitNeRF, Quantization, plain_state_dict, quantize_bitnet
from bitnerf_format import OCCUPIED_KEY, PROPOSAL_KEY, is_bitnerf_file, read_bitnerf
from bitnerf_packed import ternary_field
from configs import Config, ConfigError, config_from_dict, scene_bounds, skip_method
from grid_field import DensityGrid, GridField
from nerf import NeRF
from occupancy import OccupancyGrid
from renderer import VolumeRenderer
from samplers import OccupancyGridSampler, ProposalSampler, StratifiedSampler
from hardware import amp_policy, bitnet_bf16_grads, configure_backends
from ternary_kernels import int_mm_available
from utils import UserError, load_checkpoint


# --- building --------------------------------------------------------------------------------------------------
def build_field(cfg: Config) -> nn.Module:
    """The float field of `cfg.model` (BitNeRF's quantization is applied separately, see build_renderer); the MLP
    sizes and viewdirs are ignored by the grid field (configs refuses viewdirs with it), the grid sizes by the
    MLPs, and bitnet_norm by all but BitNeRF."""
    if cfg.model == "nerf":
        return NeRF(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, viewdirs=cfg.viewdirs,
                    n_freqs_dirs=cfg.n_freqs_dirs)
    if cfg.model == "bitnerf":
        return BitNeRF(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, cfg.bitnet_norm, cfg.viewdirs,
                       cfg.n_freqs_dirs)
    if cfg.model == "grid":
        return GridField(cfg.grid_resolution, cfg.grid_bound)
    raise ValueError(f"unknown model kind {cfg.model!r}")


def build_renderer(cfg: Config, device: torch.device, field_state: dict | None = None,
                   occupancy_state: dict | None = None, proposal_state: dict | None = None) -> VolumeRenderer:
    """Float field (weights from `field_state` if given) -> BitNet quantization (bitnerf) -> renderer, with the
    occupancy grid or proposal grid of a skipping config (their states from `occupancy_state` / `proposal_state`
    if given).

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
        quantize_bitnet(field, bitnet_bf16_grads(cfg.bitnet_grad, device), Quantization.of(cfg))
    sampler = build_sampler(cfg, build_occupancy(cfg, device, occupancy_state), proposal_state)
    return VolumeRenderer(field, sampler.to(device), cfg.chunk_points)


def build_sampler(cfg: Config, grid: OccupancyGrid | None, proposal_state: dict | None = None) -> StratifiedSampler:
    """The sampler of a config: stratified (+ importance), or, skipping empty space, through the occupancy grid
    `grid` or a proposal grid (its weights from `proposal_state` if given)."""
    near, far, bound, contraction = scene_bounds(cfg)
    if skip_method(cfg) == "proposal":
        proposal = DensityGrid(cfg.proposal_resolution, bound)
        if proposal_state is not None:
            load_part(proposal, proposal_state, "saved proposal grid")
        return ProposalSampler(near, far, cfg.n_samples, cfg.fine_samples, proposal, contraction)
    if grid is None:
        return StratifiedSampler(near, far, cfg.n_samples, cfg.n_importance, contraction)
    return OccupancyGridSampler(near, far, cfg.n_samples, grid, cfg.occ_update_every, contraction)


def build_occupancy(cfg: Config, device: torch.device, state: dict | None = None) -> OccupancyGrid | None:
    """The occupancy grid of a skipping config (None without skipping), from a saved state if given."""
    if skip_method(cfg) != "grid":
        return None
    grid = OccupancyGrid(cfg.occ_resolution, scene_bounds(cfg)[2], cfg.occ_threshold)
    if state is not None:
        load_part(grid, state, "saved occupancy grid")
    return grid.to(device)


def load_part(module: nn.Module, state: dict, what: str) -> None:
    """module.load_state_dict(state), a mismatch a one-line UserError naming `what`."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{what} does not fit this config: {str(err).splitlines()[0]}") from None


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
    configure_backends(torch.device(device), cfg.tf32)  # the precision and memory settings training ran with
    renderer = build_renderer(cfg, torch.device(device), ckpt["model"], ckpt.get("occupancy"), ckpt.get("proposal"))
    return renderer.eval(), cfg


def load_exported(path: str, device: torch.device | str = "cpu"):
    """A .bitnerf file -> (VolumeRenderer around bitnerf_packed.ternary_field in eval mode, Config)."""
    cfg, state, _ = read_bitnerf(path)
    occupied, proposal = state.pop(OCCUPIED_KEY, None), state.pop(PROPOSAL_KEY, None)
    if skip_method(cfg) == "proposal" and proposal is None:
        raise UserError(f"{path}: its config samples through a proposal grid, which the file does not hold")
    occupancy = build_occupancy(cfg, torch.device("cpu")) if occupied is not None else None
    if occupancy is not None:
        if occupied.shape != occupancy.occupied.shape:
            raise UserError(f"{path}: its occupancy grid does not fit its config")
        occupancy.occupied.copy_(occupied)
    field = ternary_field(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, cfg.bitnet_norm, cfg.viewdirs,
                          cfg.n_freqs_dirs, Quantization.of(cfg))
    try:
        field.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: tensors do not fit its config: {str(err).splitlines()[0]}") from None
    sampler = build_sampler(cfg, occupancy, None if proposal is None else {"grid": proposal.float()})
    renderer = VolumeRenderer(field, sampler, cfg.chunk_points)
    int_mm_available(torch.device(device))  # decided now, eagerly (see build_renderer)
    configure_backends(torch.device(device), cfg.tf32)
    return renderer.to(torch.device(device)).eval(), cfg
