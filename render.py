"""Volume rendering as pure functions; the field is any callable `points [..., 3] -> raw [..., 4]`.

Conventions (those of the tiny NeRF data): camera-to-world poses [4, 4], camera looks along -z with +y up,
pixel (i, j) is sampled at its centre, ray directions have camera-space z = -1 so the ray parameter t is the
camera-space depth. Each sample stands for an interval of length `delta` along the ray.

Usage as a tool: `python render.py --ckpt RUN/ckpt.pt` writes 360-degree videos (assembly.render_main).
"""

from __future__ import annotations

import math
import os
import sys
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nerf import colour, density
from occupancy import OccupancyGrid
from utils import colourise_depth, to_uint8, write_video

Field = Callable[[torch.Tensor], torch.Tensor]


class Rendered(NamedTuple):
    rgb: torch.Tensor  # [N, 3]
    depth: torch.Tensor  # [N]   expected t: sum_i w_i t_i
    acc: torch.Tensor  # [N]   accumulated opacity: sum_i w_i
    weights: torch.Tensor  # [N, S]


def pixel_rays(c2w: torch.Tensor, px: torch.Tensor, py: torch.Tensor, focal: float,
               height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres (px, py) = (column, row) of cameras c2w.

    c2w: [..., 4, 4]; px, py: [...] (broadcast against c2w's leading dims) -> rays_o, rays_d: [..., 3].
    rays_d is not normalised: its camera-space z is -1.
    """
    dirs = torch.stack([(px + 0.5 - width / 2) / focal, -(py + 0.5 - height / 2) / focal,
                        -torch.ones_like(px)], dim=-1)  # [..., 3]
    rays_d = (c2w[..., :3, :3] @ dirs[..., None]).squeeze(-1)
    rays_o = c2w[..., :3, 3].expand_as(rays_d)
    return rays_o, rays_d


def get_rays(height: int, width: int, focal: float, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through every pixel centre of one camera. c2w: [4, 4] -> rays_o, rays_d: [H, W, 3]."""
    py, px = torch.meshgrid(torch.arange(height, device=c2w.device, dtype=c2w.dtype),
                            torch.arange(width, device=c2w.device, dtype=c2w.dtype), indexing="ij")
    return pixel_rays(c2w[None, None], px, py, focal, height, width)


def stratified_samples(n_rays: int, n_samples: int, near: float, far: float,
                       jitter: torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample positions t [N, S] and interval lengths delta [N, S] (in units of t).

    [near, far] is cut into S equal bins; sample i lies at bin start + u_i * bin width, u_i = jitter[..., i]
    (uniform in [0, 1), training) or 0.5 (the bin centres, evaluation). Each sample stands for its whole bin.
    """
    bin_width = (far - near) / n_samples
    starts = near + bin_width * torch.arange(n_samples, device=device, dtype=torch.float32)  # [S]
    u = jitter if jitter is not None else torch.full((1, n_samples), 0.5, device=device)
    t = starts + u * bin_width  # [N, S]
    t = t.expand(n_rays, n_samples)
    return t, torch.full_like(t, bin_width)


def composite(raw: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, rays_d: torch.Tensor) -> Rendered:
    """Alpha-composite raw field outputs along rays.

    raw: [N, S, 4]; delta, t: [N, S]; rays_d: [N, 3].
    alpha_i = 1 - exp(-sigma_i * delta_i * |d|); T_i = prod_{j<i} (1 - alpha_j) (exclusive: T_0 = 1);
    w_i = T_i alpha_i; rgb = sum w_i c_i; depth = sum w_i t_i; acc = sum w_i. Background is black.
    """
    sigma = density(raw[..., 3])
    optical = sigma * delta * rays_d.norm(dim=-1, keepdim=True)  # [N, S]
    alpha = 1.0 - torch.exp(-optical)
    # exclusive cumulative product in log space: T_i = exp(-sum_{j<i} sigma_j delta_j)
    acc_optical = torch.cumsum(optical, dim=-1) - optical
    weights = alpha * torch.exp(-acc_optical)
    return Rendered(
        # one reduction per channel: summing [N, S, 3] over S makes torch.compile's CPU code open a thread team
        # per ray (its loop heuristic sees the 3 channels as zero vector steps); per channel it loops over rays
        rgb=torch.stack([(weights * colour(raw[..., c])).sum(dim=-1) for c in range(3)], dim=-1),
        depth=(weights * t).sum(dim=-1),
        acc=weights.sum(dim=-1),
        weights=weights,
    )


def sample_pdf(bins_t: torch.Tensor, weights: torch.Tensor, n_samples: int,
               u: torch.Tensor | None = None) -> torch.Tensor:
    """Inverse-transform samples from the piecewise-constant pdf given by `weights` over bin edges.

    bins_t: [N, S + 1] bin edges; weights: [N, S]; u: [N, n] uniform in [0, 1) or None (evenly spaced, eval).
    Returns t: [N, n], sorted.
    """
    weights = weights.detach() + 1e-5  # no gradient through the sampling; no empty pdf
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # [N, S + 1]
    if u is None:
        u = torch.linspace(0.0, 1.0, n_samples + 2, device=weights.device)[1:-1].expand(weights.shape[0], -1)
    u = u.contiguous()
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, cdf.shape[-1] - 1)  # [N, n]
    cdf_lo, cdf_hi = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    bin_lo, bin_hi = bins_t.gather(-1, idx - 1), bins_t.gather(-1, idx)
    frac = ((u - cdf_lo) / (cdf_hi - cdf_lo).clamp_min(1e-8)).clamp(0.0, 1.0)
    return torch.sort(bin_lo + frac * (bin_hi - bin_lo), dim=-1).values


def intervals(t: torch.Tensor, far: float) -> torch.Tensor:
    """Interval lengths for sorted samples t [N, S]: the gap to the next sample, and to `far` for the last."""
    return torch.diff(t, dim=-1, append=torch.full_like(t[..., :1], far)).clamp_min(0.0)


def render_rays(field: Field, rays_o: torch.Tensor, rays_d: torch.Tensor, near: float, far: float,
                n_samples: int, n_importance: int = 0, jitter: torch.Tensor | None = None,
                importance_u: torch.Tensor | None = None) -> Rendered:
    """Render rays_o, rays_d: [N, 3] through `field`.

    jitter: [N, n_samples] uniforms for stratified sampling (None: bin centres). With n_importance > 0, the
    coarse weights give a pdf from which n_importance more samples are drawn (importance_u: [N, n_importance]
    uniforms, None: evenly spaced); the field is then evaluated on all samples together and the result uses
    them all (the same field serves both passes).
    """
    n_rays = rays_o.shape[0]
    t, delta = stratified_samples(n_rays, n_samples, near, far, jitter, device=rays_o.device)
    out = _render_at(field, rays_o, rays_d, t, delta)
    if n_importance == 0:
        return out
    edges = near + (far - near) / n_samples * torch.arange(n_samples + 1, device=rays_o.device)
    t_fine = sample_pdf(edges.expand(n_rays, -1), out.weights, n_importance, importance_u)
    t_all = torch.sort(torch.cat([t.detach(), t_fine], dim=-1), dim=-1).values
    return _render_at(field, rays_o, rays_d, t_all, intervals(t_all, far))


def _render_at(field: Field, rays_o, rays_d, t, delta) -> Rendered:
    points = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]  # [N, S, 3]
    raw = field(points.reshape(-1, 3)).reshape(*t.shape, 4).float()
    return composite(raw, delta, t, rays_d)


COMPILED_SIZE_STEP = 512  # see VolumeRenderer.evaluate; chunk_points should be a multiple of it


class VolumeRenderer(nn.Module):
    """The field plus the renderer's settings (and its occupancy grid when skipping empty space), as one module.

    Training calls *this* module's forward, so under DDP the call goes through the DDP wrapper (whose hooks
    synchronise gradients). Without a grid, torch.compile compiles the whole render as one graph; with one, the
    number of occupied samples changes from batch to batch, so the field alone is compiled (`compile_field`),
    with a dynamic number of points: one graph for every chunk size, padded only to a multiple of
    COMPILED_SIZE_STEP.
    """

    def __init__(self, field: nn.Module, near: float, far: float, n_samples: int, n_importance: int = 0,
                 occupancy: OccupancyGrid | None = None, chunk_points: int = 8192):
        super().__init__()
        if occupancy is not None and n_importance:
            raise ValueError("empty-space skipping samples stratified points only (n_importance must be 0)")
        self.field = field
        self.occupancy = occupancy
        self.near, self.far = near, far
        self.n_samples, self.n_importance = n_samples, n_importance
        self.chunk_points = chunk_points
        self.compiled_field = None  # a function (not a submodule) once compile_field has run

    def compile_field(self) -> None:
        """torch.compile the field (fullgraph: a graph break is an error). A plain function, not a submodule,
        so the state dict keeps its keys."""
        field = self.field
        # dynamic: the chunks' sizes vary with the occupied samples. Padding them to one static size (8192) would
        # waste about 1/3 of a cpu-scale step's field evaluations (~11 k occupied samples fill two 8192-point
        # chunks), and the dynamic graph runs as fast per point as a static one
        self.compiled_field = torch.compile(lambda points: field(points), fullgraph=True, dynamic=True)

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor, jitter: torch.Tensor | None = None,
                importance_u: torch.Tensor | None = None) -> Rendered:
        if self.occupancy is None:
            return render_rays(self.field, rays_o, rays_d, self.near, self.far, self.n_samples, self.n_importance,
                               jitter, importance_u)
        t, delta, points, keep = self._samples(rays_o, rays_d, jitter)
        raw_kept = self.evaluate(points[keep])  # [P, 4]
        raw = empty_raw(keep.shape, raw_kept.device).index_put((keep,), raw_kept.float())
        return composite(raw, delta, t, rays_d)

    def evaluate(self, points: torch.Tensor) -> torch.Tensor:
        """raw [P, 4] of the field at points [P, 3], in chunks of at most `chunk_points` (memory). At least one
        point is evaluated, so that every parameter takes part in every step, as DDP requires. Compiled, the
        points are padded to a multiple of COMPILED_SIZE_STEP: few distinct sizes, because oneDNN (CPU bf16
        matmuls under AMP) keeps a primitive per shape: with every size distinct an exp2 run grows to 1.4 GB (0.5 GB
        this way)."""
        n, chunk = points.shape[0], self.chunk_points
        step = COMPILED_SIZE_STEP if self.compiled_field is not None else 1
        size = max(-(-n // step) * step, step)
        padded = F.pad(points, (0, 0, 0, size - n))
        field = self.compiled_field or self.field
        return torch.cat([field(part) for part in padded.split(chunk)])[:n]

    def eval_chunk_rays(self) -> int:
        """Rays per no-grad forward when rendering images. With skipping most samples are never evaluated and
        the field runs in chunks anyway, so the chunk of rays can be much larger."""
        per_ray = self.n_samples + self.n_importance
        return max(1, self.chunk_points // per_ray) * (16 if self.occupancy is not None else 1)

    def occupied_counts(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
                        jitter: torch.Tensor | None = None) -> torch.Tensor:
        """[N] int64: how many of each ray's samples the field is evaluated at (n_samples without a grid)."""
        if self.occupancy is None:
            return torch.full((rays_o.shape[0],), self.n_samples + self.n_importance, device=rays_o.device)
        with torch.no_grad():
            return self._samples(rays_o, rays_d, jitter)[3].sum(dim=1)

    def _samples(self, rays_o, rays_d, jitter):
        """Stratified t, delta [N, S], points [N, S, 3], and which of them lie in occupied cells [N, S]."""
        t, delta = stratified_samples(rays_o.shape[0], self.n_samples, self.near, self.far, jitter, rays_o.device)
        points = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]
        return t, delta, points, self.occupancy.is_occupied(points)

    @torch.no_grad()
    def update_occupancy(self, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        """Refresh the occupancy grid from the field's density (collective under DDP: every rank calls it)."""
        step_size = (self.far - self.near) / self.n_samples
        self.occupancy.update(lambda p: density(self.evaluate(p)[:, 3].float()), step_size, generator, rank,
                              world_size)


def empty_raw(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """[*shape, 4] raw output of empty space: RGB logits 0, density pre-activation -30 (softplus(-30) ~ 1e-13).
    Filled on the device (no host-to-device copy in the step)."""
    raw = torch.zeros(*shape, 4, device=device)
    raw[..., 3] = -30.0
    return raw


@torch.no_grad()
def render_image(renderer: nn.Module, rays_o: torch.Tensor, rays_d: torch.Tensor, chunk_rays: int = 4096,
                 autocast_dtype: torch.dtype | None = None) -> Rendered:
    """Render rays [..., 3] in chunks of rays (no jitter), returning maps shaped like the input's leading dims."""
    shape = rays_o.shape[:-1]
    flat_o, flat_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    parts = []
    for start in range(0, flat_o.shape[0], chunk_rays):
        with torch.autocast(flat_o.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            parts.append(renderer(flat_o[start:start + chunk_rays], flat_d[start:start + chunk_rays]))
    return Rendered(
        rgb=torch.cat([p.rgb for p in parts]).reshape(*shape, 3).float(),
        depth=torch.cat([p.depth for p in parts]).reshape(shape).float(),
        acc=torch.cat([p.acc for p in parts]).reshape(shape).float(),
        weights=torch.cat([p.weights for p in parts]).reshape(*shape, -1).float(),
    )


def pose_spherical(theta_deg: float, phi_deg: float, radius: float) -> torch.Tensor:
    """Camera-to-world [4, 4] on a sphere around the origin, looking at it (world z up, the Blender scenes'
    convention): azimuth theta, elevation phi (negative = above the object, as in the original's -30)."""
    theta, phi = math.radians(theta_deg), math.radians(phi_deg)
    translate = torch.eye(4, dtype=torch.float64)
    translate[2, 3] = radius
    rot_phi = torch.tensor([[1, 0, 0, 0], [0, math.cos(phi), -math.sin(phi), 0],
                            [0, math.sin(phi), math.cos(phi), 0], [0, 0, 0, 1]], dtype=torch.float64)
    rot_theta = torch.tensor([[math.cos(theta), 0, -math.sin(theta), 0], [0, 1, 0, 0],
                              [math.sin(theta), 0, math.cos(theta), 0], [0, 0, 0, 1]], dtype=torch.float64)
    swap = torch.tensor([[-1, 0, 0, 0], [0, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float64)
    return (swap @ rot_theta @ rot_phi @ translate).float()


def orbit_poses(n_frames: int, radius: float, elevation: float) -> torch.Tensor:
    """[n_frames, 4, 4]: a full turn of azimuth at a fixed elevation."""
    return torch.stack([pose_spherical(360.0 * k / n_frames, elevation, radius) for k in range(n_frames)])


# --- 360-degree orbits: the one code path behind the training run's videos and `python render.py` -------------
TINY_NERF_FOCAL_PER_PIXEL = 1.38889  # the tiny NeRF camera: focal 138.889 px at 100 px (~39.6 degree view)


class Orbit(NamedTuple):
    rgb: list[np.ndarray]  # per frame: uint8 [H, W, 3]
    depth: list[np.ndarray]  # per frame: uint8 [H, W, 3], coloured on one range shared by all frames
    raw_depth: list[np.ndarray]  # per frame: float32 [H, W] expected depth
    acc: list[np.ndarray]  # per frame: float32 [H, W] opacity


def render_orbit(renderer: nn.Module, height: int, width: int, focal: float, frames: int, radius: float,
                 elevation: float, chunk_rays: int, progress: bool = True, autocast_dtype=None) -> Orbit:
    """Render `frames` views on a full turn of azimuth at `elevation` degrees, `radius` from the origin."""
    from tqdm import tqdm

    device = next(renderer.parameters()).device
    was_training = renderer.training
    renderer.eval()
    rgbs, depths, accs = [], [], []
    for c2w in tqdm(orbit_poses(frames, radius, elevation), desc="render", disable=not progress, leave=False):
        rays_o, rays_d = get_rays(height, width, focal, c2w.to(device))
        out = render_image(renderer, rays_o, rays_d, chunk_rays, autocast_dtype)
        rgbs.append(to_uint8(out.rgb))
        depths.append(out.depth.cpu().numpy())
        accs.append(out.acc.cpu().numpy())
    renderer.train(was_training)
    # one depth range for the whole video, so colours mean the same distance in every frame
    fg = np.concatenate([d[a > 0.5] for d, a in zip(depths, accs)])
    lo, hi = (float(fg.min()), float(fg.max())) if fg.size else (0.0, 1.0)
    return Orbit(rgbs, [colourise_depth(d, a, lo, hi) for d, a in zip(depths, accs)], depths, accs)


def still_frames(n_frames: int, n_stills: int) -> list[int]:
    """Up to n_stills frame indices spread evenly over the orbit, starting at frame 0."""
    return sorted({k * n_frames // n_stills for k in range(min(n_stills, n_frames))})


def write_orbit(orbit: Orbit, out_dir: str, fps: int, gif: bool = False, stills: int = 0) -> list[str]:
    """video_rgb.mp4 and video_depth.mp4 (+ .gif if asked) and `stills` PNGs (rgb | depth | opacity) of
    evenly spaced frames into out_dir. Returns the paths written."""
    import imageio.v3 as iio

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind, frames in (("rgb", orbit.rgb), ("depth", orbit.depth)):
        for ext in ("mp4", "gif") if gif else ("mp4",):
            paths.append(os.path.join(out_dir, f"video_{kind}.{ext}"))
            write_video(frames, paths[-1], fps)
    for k in still_frames(len(orbit.rgb), stills):
        opacity = to_uint8(np.repeat(orbit.acc[k][..., None], 3, axis=-1))
        paths.append(os.path.join(out_dir, f"still{k:03d}.png"))
        iio.imwrite(paths[-1], np.concatenate([orbit.rgb[k], orbit.depth[k], opacity], axis=1))
    return paths


# --- command line: python render.py --ckpt RUN/ckpt.pt ---------------------------------------------------------
if __name__ == "__main__":
    # Run as a program this file is an entry point, above the assembly layer that loads a model: the command
    # line lives there (assembly.render_main). Imported as `render`, this file imports nothing above it.
    from assembly import render_main

    sys.exit(render_main())
