"""Volume rendering as pure functions; the field is any callable `points [..., 3] -> raw [..., 4]`, or, where
its `viewdirs` attribute is true (a NeRF with the direction branch), `(points [P, 3], dirs [P, 3]) -> raw [P, 4]`
with dirs the unit direction of each point's ray (uses_dirs).

Conventions (cameras.py states them in full): camera-to-world poses [4, 4], camera looks along -z with +y up,
pixel (i, j) is sampled at its centre, ray directions have camera-space z = -1 so the ray parameter t is the
camera-space depth. Each sample stands for an interval of length `delta` along the ray.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cameras import pinhole_directions, rays_from_directions
from nerf import colour, density
from samplers import (OccupancyGridSampler, ProposalSampler, Samples, StratifiedSampler, compositing_weights,
                      sample_pdf, stratified_samples)

Field = Callable[..., torch.Tensor]
Positions = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def uses_dirs(field) -> bool:
    """Whether `field`'s colour depends on the viewing direction: it is then called as field(points, dirs)."""
    return bool(getattr(field, "viewdirs", False))


def sample_dirs(rays_d: torch.Tensor, n_samples: int) -> torch.Tensor:
    """The unit viewing direction of every sample: rays_d [N, 3] (any length) -> [N, S, 3], each ray's
    normalised direction repeated over its S samples (a view, not a copy)."""
    return F.normalize(rays_d, dim=-1)[:, None, :].expand(-1, n_samples, -1)


class Rendered(NamedTuple):
    rgb: torch.Tensor  # [N, 3]
    depth: torch.Tensor  # [N]   expected t: sum_i w_i t_i
    acc: torch.Tensor  # [N]   accumulated opacity: sum_i w_i
    weights: torch.Tensor  # [N, S]
    proposal_loss: torch.Tensor | None = None  # [N] a proposal sampler's loss per ray, in training (its `loss`)


def pixel_rays(c2w: torch.Tensor, px: torch.Tensor, py: torch.Tensor, focal: float,
               height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through pixel centres (px, py) = (column, row) of centred pinhole cameras c2w with one focal length
    (cameras.py has the general model and its conventions).

    c2w: [..., 4, 4]; px, py: [...] (broadcast against c2w's leading dims) -> rays_o, rays_d: [..., 3].
    rays_d is not normalised: its camera-space z is -1.
    """
    return rays_from_directions(c2w, pinhole_directions(px, py, focal, focal, width / 2, height / 2))


def get_rays(height: int, width: int, focal: float, c2w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays through every pixel centre of one centred pinhole camera. c2w: [4, 4] -> rays_o, rays_d: [H, W, 3]."""
    py, px = torch.meshgrid(torch.arange(height, device=c2w.device, dtype=c2w.dtype),
                            torch.arange(width, device=c2w.device, dtype=c2w.dtype), indexing="ij")
    return pixel_rays(c2w[None, None], px, py, focal, height, width)


def composite(raw: torch.Tensor, delta: torch.Tensor, t: torch.Tensor, rays_d: torch.Tensor,
              background: torch.Tensor | None = None) -> Rendered:
    """Alpha-composite raw field outputs along rays.

    raw: [N, S, 4]; delta, t: [N, S]; rays_d: [N, 3]; background: [N, 3] or [3] colour behind the rays, None for
    black (or for data whose background the field itself must explain: a real capture's).
    alpha_i = 1 - exp(-sigma_i * delta_i * |d|); T_i = prod_{j<i} (1 - alpha_j) (exclusive: T_0 = 1);
    w_i = T_i alpha_i; rgb = sum w_i c_i + (1 - acc) * background; depth = sum w_i t_i; acc = sum w_i.
    """
    weights = compositing_weights(density(raw[..., 3]), delta, rays_d)
    # one reduction per channel: summing [N, S, 3] over S makes torch.compile's CPU code open a thread team
    # per ray (its loop heuristic sees the 3 channels as zero vector steps); per channel it loops over rays
    rgb = torch.stack([(weights * colour(raw[..., c])).sum(dim=-1) for c in range(3)], dim=-1)
    acc = weights.sum(dim=-1)
    if background is not None:
        rgb = rgb + (1.0 - acc)[:, None] * background
    return Rendered(rgb=rgb, depth=(weights * t).sum(dim=-1), acc=acc, weights=weights)


def intervals(t: torch.Tensor, far: float) -> torch.Tensor:
    """Interval lengths for sorted samples t [N, S]: the gap to the next sample, and to `far` for the last."""
    return torch.diff(t, dim=-1, append=torch.full_like(t[..., :1], far)).clamp_min(0.0)


def render_rays(field: Field, rays_o: torch.Tensor, rays_d: torch.Tensor, near: float, far: float,
                n_samples: int, n_importance: int = 0, jitter: torch.Tensor | None = None,
                importance_u: torch.Tensor | None = None, background: torch.Tensor | None = None) -> Rendered:
    """Render rays_o, rays_d: [N, 3] through `field`.

    jitter: [N, n_samples] uniforms for stratified sampling (None: bin centres). With n_importance > 0, the
    coarse weights give a pdf from which n_importance more samples are drawn (importance_u: [N, n_importance]
    uniforms, None: evenly spaced); the field is then evaluated on all samples together and the result uses
    them all (the same field serves both passes). background: see composite.
    """
    t, delta = stratified_samples(rays_o.shape[0], n_samples, near, far, jitter, device=rays_o.device)
    return render_samples(field, rays_o, rays_d, t, delta, near, far, n_importance, importance_u, background)


def render_samples(field: Field, rays_o: torch.Tensor, rays_d: torch.Tensor, t: torch.Tensor, delta: torch.Tensor,
                   near: float, far: float, n_importance: int = 0, importance_u: torch.Tensor | None = None,
                   background: torch.Tensor | None = None, positions: Positions | None = None) -> Rendered:
    """Render rays at stratified samples t, delta [N, S] over [near, far] (+ n_importance importance samples:
    see render_rays). positions(rays_o, rays_d, t) -> [N, S, 3]: where the field is evaluated (None: o + t d)."""
    out = _render_at(field, rays_o, rays_d, t, delta, background, positions)
    if n_importance == 0:
        return out
    n_rays, n_samples = t.shape
    edges = near + (far - near) / n_samples * torch.arange(n_samples + 1, device=rays_o.device)
    t_fine = sample_pdf(edges.expand(n_rays, -1), out.weights, n_importance, importance_u)
    t_all = torch.sort(torch.cat([t.detach(), t_fine], dim=-1), dim=-1).values
    return _render_at(field, rays_o, rays_d, t_all, intervals(t_all, far), background, positions)


def _render_at(field: Field, rays_o, rays_d, t, delta, background, positions: Positions | None = None) -> Rendered:
    if positions is None:
        points = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]  # [N, S, 3]
    else:
        points = positions(rays_o, rays_d, t)
    flat = points.reshape(-1, 3)
    raw = field(flat, sample_dirs(rays_d, t.shape[1]).reshape(-1, 3)) if uses_dirs(field) else field(flat)
    raw = raw.reshape(*t.shape, 4).float()
    return composite(raw, delta, t, rays_d, background)


COMPILED_SIZE_STEP = 512  # see VolumeRenderer.evaluate; chunk_points should be a multiple of it


class VolumeRenderer(nn.Module):
    """The field and its sampler (samplers.py), as one module: the renderer asks the sampler where to evaluate the
    field and composites the result.

    Training calls *this* module's forward, so under DDP the call goes through the DDP wrapper (whose hooks
    synchronise gradients). When the sampler evaluates every sample, torch.compile compiles the whole render as
    one graph; when it skips empty space, the number of evaluated samples changes from batch to batch, so the field
    alone is compiled (`compile_field`), with a dynamic number of points: one graph for every chunk size, padded
    only to a multiple of COMPILED_SIZE_STEP.
    """

    def __init__(self, field: nn.Module, sampler: StratifiedSampler, chunk_points: int = 8192):
        super().__init__()
        if isinstance(sampler, OccupancyGridSampler) and sampler.n_importance:
            raise ValueError("empty-space skipping samples stratified points only (n_importance must be 0)")
        self.field = field
        self.sampler = sampler
        self.chunk_points = chunk_points
        self.compiled_field = None  # a function (not a submodule) once compile_field has run

    @property
    def occupancy(self):
        """The occupancy grid of a skipping sampler (occupancy.OccupancyGrid), else None."""
        return self.sampler.grid if isinstance(self.sampler, OccupancyGridSampler) else None

    @property
    def proposal(self):
        """The proposal grid of a proposal sampler (grid_field.DensityGrid), else None."""
        return self.sampler.proposal if isinstance(self.sampler, ProposalSampler) else None

    def compile_field(self) -> None:
        """torch.compile the field (fullgraph: a graph break is an error). A plain function, not a submodule,
        so the state dict keeps its keys."""
        field = self.field
        # dynamic: the chunks' sizes vary with the occupied samples. Padding them to one static size (8192) would
        # waste about 1/3 of a cpu-scale step's field evaluations (~11 k occupied samples fill two 8192-point
        # chunks), and the dynamic graph runs as fast per point as a static one. Called as the field is:
        # (points) or (points, dirs)
        self.compiled_field = torch.compile(lambda *inputs: field(*inputs), fullgraph=True, dynamic=True)

    def forward(self, rays_o: torch.Tensor, rays_d: torch.Tensor, samples: Samples | None = None,
                background: torch.Tensor | None = None) -> Rendered:
        """Render rays [N, 3] at `samples` (the sampler's, None: its evaluation samples, at the bin centres);
        background [N, 3] or [3]: the colour behind them (None: none, i.e. black)."""
        if samples is None:
            samples = self.sampler.sample(rays_o, rays_d)
        if samples.keep is None:
            out = render_samples(self.field, rays_o, rays_d, samples.t, samples.delta, self.sampler.near,
                                 self.sampler.far, self.sampler.n_importance, samples.importance_u, background,
                                 self.sampler.positions if self.sampler.contraction else None)
            if samples.edges is not None and torch.is_grad_enabled():  # a proposal sampler learns in training
                out = out._replace(proposal_loss=self.sampler.loss(rays_o, rays_d, samples, out.weights))
            return out
        n_rays, n_samples = samples.t.shape
        # gathered and scattered by position (index_select / index_copy, whose backwards are the same two ops):
        # a boolean mask as an index costs a host sync per use, forward and backward
        kept = samples.kept if samples.kept is not None else samples.keep.reshape(-1).nonzero().squeeze(1)
        points = self.sampler.positions(rays_o, rays_d, samples.t).reshape(-1, 3).index_select(0, kept)
        # the directions of exactly the evaluated samples: their rays' (position // samples per ray)
        dirs = F.normalize(rays_d, dim=-1).index_select(0, kept // n_samples) if uses_dirs(self.field) else None
        raw_kept = self.evaluate(points, dirs)  # [P, 4]
        raw = empty_raw((n_rays * n_samples,), raw_kept.device).index_copy(0, kept, raw_kept.float())
        return composite(raw.view(n_rays, n_samples, 4), samples.delta, samples.t, rays_d, background)

    def evaluate(self, points: torch.Tensor, dirs: torch.Tensor | None = None) -> torch.Tensor:
        """raw [P, 4] of the field at points [P, 3], seen along dirs [P, 3] (unit; needed by, and only passed to,
        a field that uses directions), in chunks of at most `chunk_points` (memory). At least one point is
        evaluated, so that every parameter takes part in every step, as DDP requires. Compiled, the points are
        padded to a multiple of COMPILED_SIZE_STEP: few distinct sizes, because oneDNN (CPU bf16 matmuls under
        AMP) keeps a primitive per shape: with every size distinct an exp2 run grows to 1.4 GB (0.5 GB this way)."""
        n, chunk = points.shape[0], self.chunk_points
        step = COMPILED_SIZE_STEP if self.compiled_field is not None else 1
        size = max(-(-n // step) * step, step)
        field = self.compiled_field or self.field
        parts = F.pad(points, (0, 0, 0, size - n)).split(chunk)
        if not uses_dirs(self.field):
            return torch.cat([field(part) for part in parts])[:n]
        dir_parts = F.pad(dirs, (0, 0, 0, size - n)).split(chunk)
        return torch.cat([field(part, d) for part, d in zip(parts, dir_parts)])[:n]

    def density(self, points: torch.Tensor) -> torch.Tensor:
        """The field's density [P] at points [P, 3] of the field's space (contracted in an unbounded scene: where
        the occupancy grid lives), what a sampler's refresh asks for. Density does not depend
        on the viewing direction, so a field that takes one is given any (+z)."""
        dirs = points.new_tensor([0.0, 0.0, 1.0]).expand_as(points) if uses_dirs(self.field) else None
        return density(self.evaluate(points, dirs)[:, 3].float())

    def eval_chunk_rays(self) -> int:
        """Rays per no-grad forward when rendering images: those whose field evaluations fill one chunk_points
        micro-batch, times 16 with an occupancy grid (most samples are never evaluated and the field runs in chunks
        anyway) and 4 with a proposal grid (no activations are kept for a backward: four chunks' worth is a few
        tens of MB, in fewer, larger matmuls)."""
        rays = max(1, self.chunk_points // self.sampler.points_per_ray)
        return rays * (16 if self.occupancy is not None else 4 if self.proposal is not None else 1)

    @torch.no_grad()
    def update_sampler(self, step: int, generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        """The sampler's refresh for training step `step`, from this field's density (collective under DDP)."""
        self.sampler.update_every_n_steps(step, self.density, generator, rank, world_size)


def empty_raw(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """[*shape, 4] raw output of empty space: RGB logits 0, density pre-activation -30 (softplus(-30) ~ 1e-13).
    Filled on the device (no host-to-device copy in the step)."""
    raw = torch.zeros(*shape, 4, device=device)
    raw[..., 3] = -30.0
    return raw


@torch.no_grad()
def render_image(renderer: nn.Module, rays_o: torch.Tensor, rays_d: torch.Tensor, chunk_rays: int = 4096,
                 autocast_dtype: torch.dtype | None = None, background: torch.Tensor | None = None) -> Rendered:
    """Render rays [..., 3] in chunks of rays (no jitter), returning maps shaped like the input's leading dims.
    background: one colour [3] behind every ray, or None (black)."""
    shape = rays_o.shape[:-1]
    flat_o, flat_d = rays_o.reshape(-1, 3), rays_d.reshape(-1, 3)
    parts = []
    for start in range(0, flat_o.shape[0], chunk_rays):
        with torch.autocast(flat_o.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            extra = {} if background is None else {"background": background}
            parts.append(renderer(flat_o[start:start + chunk_rays], flat_d[start:start + chunk_rays], **extra))
    return Rendered(
        rgb=torch.cat([p.rgb for p in parts]).reshape(*shape, 3).float(),
        depth=torch.cat([p.depth for p in parts]).reshape(shape).float(),
        acc=torch.cat([p.acc for p in parts]).reshape(shape).float(),
        weights=torch.cat([p.weights for p in parts]).reshape(*shape, -1).float(),
    )
