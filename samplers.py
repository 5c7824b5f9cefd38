"""Where rays are sampled: one object the renderer asks, in the way of nerfacc's estimators.

A sampler turns rays (and, in training, a generator) into `Samples`: positions t along each ray with the interval
each stands for, which of them the field must be evaluated at, and the uniforms of an importance pass. It also
owns its refresh schedule (`update_every_n_steps`): the occupancy-grid sampler re-estimates its grid from the
field's density every few steps; the stratified one has nothing to refresh. The trainer hands it a generator and
never draws sampling noise itself; each step samples once, and the same samples serve the micro-batching (how many
points each ray costs) and the render.

- `StratifiedSampler`: S samples per ray in [near, far], one per equal bin, jittered uniformly in training and at
  the bin centres without a generator; with n_importance > 0 it also draws the importance pass's uniforms (the
  renderer places those samples from the coarse weights: they depend on the field).
- `OccupancyGridSampler`: the stratified samples, of which only those inside occupied cells of an
  `occupancy.OccupancyGrid` are evaluated (the others are empty space).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn

from configs import points_per_ray
from occupancy import OccupancyGrid


class Samples(NamedTuple):
    """Samples of N rays: t, delta [N, S] (position and interval length, in units of the ray parameter); keep
    [N, S] bool, the samples the field is evaluated at (None: all); importance_u [N, n] uniforms of the importance
    pass (None: evenly spaced)."""

    t: torch.Tensor
    delta: torch.Tensor
    keep: torch.Tensor | None = None
    importance_u: torch.Tensor | None = None

    def of_rays(self, index: slice) -> "Samples":
        """The samples of rays `index`."""
        return Samples(*(None if x is None else x[index] for x in self))

    def counts(self) -> torch.Tensor | None:
        """[N] int64: how many of each ray's samples the field is evaluated at (None: all of them)."""
        return None if self.keep is None else self.keep.sum(dim=1)


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


class StratifiedSampler(nn.Module):
    """n_samples stratified samples per ray in [near, far] (+ the uniforms of n_importance importance samples)."""

    def __init__(self, near: float, far: float, n_samples: int, n_importance: int = 0):
        super().__init__()
        self.near, self.far, self.n_samples, self.n_importance = near, far, n_samples, n_importance

    def extra_repr(self) -> str:
        return f"near={self.near}, far={self.far}, n_samples={self.n_samples}, n_importance={self.n_importance}"

    @property
    def points_per_ray(self) -> int:
        """The most field evaluations a ray can cost (configs.points_per_ray)."""
        return points_per_ray(self)

    @property
    def step_size(self) -> float:
        return (self.far - self.near) / self.n_samples

    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
               generator: torch.Generator | None = None) -> Samples:
        """Samples of rays [N, 3]: jittered from `generator` (training), at the bin centres without one."""
        n, device = rays_o.shape[0], rays_o.device
        jitter = importance_u = None
        if generator is not None:
            jitter = torch.rand(n, self.n_samples, generator=generator, device=device)
            if self.n_importance:
                importance_u = torch.rand(n, self.n_importance, generator=generator, device=device)
        t, delta = stratified_samples(n, self.n_samples, self.near, self.far, jitter, device)
        return Samples(t, delta, None, importance_u)

    def update_every_n_steps(self, step: int, density_fn: Callable[[torch.Tensor], torch.Tensor],
                             generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        """Nothing to refresh."""


class OccupancyGridSampler(StratifiedSampler):
    """Stratified samples, evaluated only inside occupied cells of `grid`, which is refreshed from the field's
    density every `update_every` steps (at steps 0, update_every, ...)."""

    def __init__(self, near: float, far: float, n_samples: int, grid: OccupancyGrid, update_every: int = 16):
        super().__init__(near, far, n_samples)
        self.grid = grid
        self.update_every = update_every

    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
               generator: torch.Generator | None = None) -> Samples:
        samples = super().sample(rays_o, rays_d, generator)
        with torch.no_grad():
            points = rays_o[:, None, :] + samples.t[..., None] * rays_d[:, None, :]
            return samples._replace(keep=self.grid.is_occupied(points))

    @torch.no_grad()
    def update_every_n_steps(self, step: int, density_fn: Callable[[torch.Tensor], torch.Tensor],
                             generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        """Refresh the grid from `density_fn(points [n, 3]) -> density [n]` when `step` is due (collective under
        DDP: every rank calls it, each evaluating its share of the cells)."""
        if step % self.update_every == 0:
            self.refresh(density_fn, generator, rank, world_size)

    @torch.no_grad()
    def refresh(self, density_fn: Callable[[torch.Tensor], torch.Tensor], generator: torch.Generator,
                rank: int = 0, world_size: int = 1) -> None:
        """Refresh the grid now (see OccupancyGrid.update)."""
        self.grid.update(density_fn, self.step_size, generator, rank, world_size)
