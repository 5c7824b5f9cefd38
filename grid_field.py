"""A field that is fast on CPUs: a dense voxel grid of (RGB logits, density), trilinearly interpolated.

In the spirit of Plenoxels / DVGO (without view dependence: its colour depends on the position alone): the raw
output at a point is the trilinear interpolation of the values stored at the 8 grid vertices around it, so one
point costs a few dozen multiply-adds instead of an MLP's ~0.5 MFLOP. Used by the `fast` preset only.

Two things make it fast on a CPU:
- interpolation is `F.embedding_bag` (8 vertex rows per point, weighted sum: one fused, threaded kernel), and its
  backward is a plain scatter-add (`index_add_`) instead of embedding_bag's sorting backward;
- empty-space skipping: a first, gradient-free pass interpolates every point; points whose density is below
  `skip_density` (they would add less than ~1e-3 opacity per sample) or that lie outside the grid get the raw
  value of empty space and no gradient, so only the rest pay for the backward. With `skip_density=0` nothing
  inside the grid is skipped and the output is exactly the plain interpolation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# raw output of empty space: RGB logits 0, density pre-activation with softplus(-30) ~ 1e-13
EMPTY_DENSITY_RAW = -30.0


def corner_offsets(resolution: int) -> torch.Tensor:
    """[8] int64: the flat-index offsets of a cell's 8 vertices from its lowest one, in the order of the weights."""
    r = resolution
    return torch.tensor([(dx * r + dy) * r + dz for dx in (0, 1) for dy in (0, 1) for dz in (0, 1)])


def trilinear_corners(points: torch.Tensor, resolution: int, bound: float,
                      offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The 8 vertices around each of points [P, 3] on a resolution^3 grid of vertices spanning [-bound, bound]^3
    (flat index (i * R + j) * R + k): indices [P, 8] int64, trilinear weights [P, 8] (summing to 1), and whether
    the point lies inside the grid [P] bool (outside: the nearest cell's vertices, extrapolated weights).
    offsets: corner_offsets(resolution), on the points' device."""
    r = resolution
    x = (points + bound) * ((r - 1) / (2 * bound))  # vertex coordinates
    inside = ((x >= 0) & (x <= r - 1)).all(dim=-1)
    lower = x.floor().clamp_(0, r - 2)
    frac = x - lower  # in [0, 1] inside the grid
    lower = lower.long()
    base = (lower[:, 0] * r + lower[:, 1]) * r + lower[:, 2]
    idx = base[:, None] + offsets  # [P, 8]
    wx = torch.stack([1 - frac, frac], dim=-1)  # [P, 3, 2]
    w = (wx[:, 0, :, None, None] * wx[:, 1, None, :, None] * wx[:, 2, None, None, :]).reshape(-1, 8)
    return idx, w, inside


class _Interpolate(torch.autograd.Function):
    """values [P, C] = sum_k w[:, k] * grid[idx[:, k]]; grid [V, C], idx [P, 8] int64, w [P, 8]."""

    @staticmethod
    def forward(ctx, grid, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.n_vertices = grid.shape[0]
        return F.embedding_bag(idx, grid, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        idx, w = ctx.saved_tensors
        contrib = w[..., None] * grad[:, None, :]  # [P, 8, C]
        grad_grid = grad.new_zeros(ctx.n_vertices, grad.shape[1])
        # index_add_: ~3x faster here than embedding_bag's own (sorting) backward and, unlike index_put_'s
        # accumulation with several threads, the same sums in the same order on every run (bitwise resumption)
        grad_grid.index_add_(0, idx.reshape(-1), contrib.reshape(-1, grad.shape[1]))
        return grad_grid, None, None


class GridField(nn.Module):
    """Vertex values on a `resolution`^3 grid spanning the cube [-bound, bound]^3.

    `grid` [R^3, 4]: RGB logits and density/`density_scale` per vertex, flat index (i * R + j) * R + k for the
    vertex at x, y, z indices i, j, k. The density channel is stored divided by `density_scale` so that Adam's
    steps (about lr per step, whatever the gradient's size) move the density pre-activation `density_scale`
    times faster: surfaces need pre-activations of ~100, colours of ~5.
    """

    def __init__(self, resolution: int = 128, bound: float = 1.5, density_scale: float = 10.0,
                 init_density: float = 0.1, skip_density: float = 0.02):
        super().__init__()
        if resolution < 2 or bound <= 0:
            raise ValueError(f"need resolution >= 2 and bound > 0 (got {resolution}, {bound})")
        self.resolution, self.bound = resolution, bound
        self.density_scale = density_scale
        # density = softplus(raw): start slightly above the skipping threshold so every point learns at first
        self.skip_raw = math.log(math.expm1(skip_density)) if skip_density > 0 else -math.inf
        grid = torch.zeros(resolution**3, 4)
        grid[:, 3] = math.log(math.expm1(init_density)) / density_scale
        self.grid = nn.Parameter(grid)
        self.register_buffer("offsets", corner_offsets(resolution), persistent=False)
        self.register_buffer("scale", torch.tensor([1.0, 1.0, 1.0, density_scale]), persistent=False)
        self.register_buffer("empty", torch.tensor([0.0, 0.0, 0.0, EMPTY_DENSITY_RAW]), persistent=False)

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, bound={self.bound}, density_scale={self.density_scale}"

    def corners(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """points [P, 3] -> vertex indices [P, 8] int64, trilinear weights [P, 8], inside-the-grid mask [P]."""
        return trilinear_corners(points, self.resolution, self.bound, self.offsets)

    def forward(self, points: torch.Tensor, dirs: torch.Tensor | None = None) -> torch.Tensor:
        """points: [..., 3] -> raw [..., 4] (RGB logits, density pre-activation); dirs (viewing directions) are
        ignored: the grid has no direction branch."""
        flat = points.reshape(-1, 3)
        idx, w, inside = self.corners(flat)
        with torch.no_grad():  # which points matter: a cheap forward-only pass over all of them
            density_raw = F.embedding_bag(idx, self.grid, per_sample_weights=w, mode="sum")[:, 3]
            keep = (inside & (density_raw * self.density_scale > self.skip_raw)).nonzero().squeeze(1)
        values = _Interpolate.apply(self.grid, idx[keep], w[keep]) * self.scale
        raw = self.empty.expand(flat.shape[0], 4).index_put((keep,), values)
        return raw.reshape(*points.shape[:-1], 4)

    @torch.no_grad()
    def occupied_fraction(self) -> float:
        """Fraction of grid vertices whose density is above the skipping threshold (a progress diagnostic)."""
        return float((self.grid[:, 3] * self.density_scale > self.skip_raw).float().mean())


class DensityGrid(nn.Module):
    """A density on a `resolution`^3 grid of vertices spanning [-bound, bound]^3, trilinearly interpolated: a
    proposal sampler's field (samplers.ProposalSampler), a few dozen multiply-adds a point. Stored divided by
    `density_scale`, so Adam's steps (about lr a step) move the pre-activation density_scale times faster."""

    def __init__(self, resolution: int, bound: float, density_scale: float = 50.0, init_density: float = 0.1):
        super().__init__()
        self.resolution, self.bound, self.density_scale = resolution, bound, density_scale
        start = math.log(math.expm1(init_density)) / density_scale
        self.grid = nn.Parameter(torch.full((resolution**3, 1), start))
        self.register_buffer("offsets", corner_offsets(resolution), persistent=False)

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, bound={self.bound}, density_scale={self.density_scale}"

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points [P, 3] (inside the grid) -> density pre-activation [P]."""
        idx, w, _ = trilinear_corners(points, self.resolution, self.bound, self.offsets)
        return _Interpolate.apply(self.grid, idx, w)[:, 0] * self.density_scale
