"""Empty-space skipping: a binary occupancy grid over the scene box, in the way of nerfacc's OccGridEstimator.

The renderer asks the grid which of a ray's stratified samples lie in occupied cells and evaluates the field only
there; the others are empty space (density 0). The grid learns which cells are occupied from the field itself:
every few steps it evaluates the density at a random point of (a subset of) the cells and keeps, per cell, an EMA
`max(decay * old, new)`. A cell is occupied while that density would make one render step of the ray more than
`threshold` opaque. So a field whose density is 0 outside the occupied cells renders exactly as without skipping.

Carving (optional, before training): a training pixel through which the camera sees the background (alpha 0 in
data with alpha, the background colour in data composited on one: dataset.Views.see_through) sees through empty
space, so every cell its ray crosses — precisely, every cell whose centre projects into a see-through
neighbourhood of that view — is marked empty for good (the visual hull). This both skips the background from
step 0 and keeps the field from filling it with opaque density of the background's colour. Data with a real
background (a capture without alpha) is not carved.

Shapes: the grid has R^3 cells over [-bound, bound]^3, flat index (i * R + j) * R + k for the cell at x, y, z
indices i, j, k. Every rank of a DDP run holds the same grid: updates are split over ranks and summed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cameras import Cameras

from utils import all_reduce_sum



class OccupancyGrid(nn.Module):
    """Buffers: `density` [R^3] float EMA of the field's density, `occupied` [R^3] bool, `carved` [R^3] bool
    (cells known empty from black pixels), `updates` [] int64 (how many refreshes so far)."""

    def __init__(self, resolution: int = 128, bound: float = 1.5, threshold: float = 0.01, decay: float = 0.95,
                 warmup_updates: int = 16):
        super().__init__()
        self.resolution, self.bound = resolution, bound
        self.threshold, self.decay, self.warmup_updates = threshold, decay, warmup_updates
        n = resolution**3
        self.register_buffer("density", torch.zeros(n))
        self.register_buffer("occupied", torch.ones(n, dtype=torch.bool))  # everything, until the first update
        self.register_buffer("carved", torch.zeros(n, dtype=torch.bool))
        self.register_buffer("updates", torch.zeros((), dtype=torch.int64))

    def extra_repr(self) -> str:
        return f"resolution={self.resolution}, bound={self.bound}, threshold={self.threshold}"

    @property
    def cell_size(self) -> float:
        return 2 * self.bound / self.resolution

    def cell_index(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """points [..., 3] -> (flat cell index [...] int64, clamped into the grid; inside-the-box mask [...])."""
        r = self.resolution
        ijk = torch.floor((points + self.bound) * (r / (2 * self.bound))).long()
        inside = ((ijk >= 0) & (ijk < r)).all(dim=-1)
        ijk = ijk.clamp(0, r - 1)
        return (ijk[..., 0] * r + ijk[..., 1]) * r + ijk[..., 2], inside

    def is_occupied(self, points: torch.Tensor) -> torch.Tensor:
        """points [..., 3] -> bool [...]: inside the box and in an occupied cell."""
        index, inside = self.cell_index(points)
        return inside & self.occupied[index]

    def cell_centres(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """Centres [n, 3] of the cells with flat indices `index` [n] (all cells if None)."""
        r = self.resolution
        if index is None:
            index = torch.arange(r**3, device=self.density.device)
        ijk = torch.stack([index // (r * r), (index // r) % r, index % r], dim=-1)
        return (ijk.float() + 0.5) * self.cell_size - self.bound

    def density_threshold(self, step_size: float) -> float:
        """The density above which one render step of length `step_size` is more than `threshold` opaque."""
        return -math.log1p(-self.threshold) / step_size

    @torch.no_grad()
    def update(self, density_fn, step_size: float, generator: torch.Generator, rank: int = 0,
               world_size: int = 1) -> None:
        """Refresh the EMA from `density_fn(points [n, 3]) -> density [n]` at one random point per cell.

        The first `warmup_updates` refreshes visit every cell that is not carved; later ones visit the occupied
        cells and a random quarter of the others (so emptied cells can come back). The visited cells are split
        over ranks and the results summed, so every rank ends with the same grid. Collective under DDP.
        """
        candidates = (~self.carved).nonzero().squeeze(1)
        if int(self.updates) >= self.warmup_updates:
            keep = self.occupied[candidates] | (torch.rand(candidates.shape[0], generator=generator,
                                                           device=candidates.device) < 0.25)
            candidates = candidates[keep]
        jitter = torch.rand(candidates.shape[0], 3, generator=generator, device=candidates.device) - 0.5
        points = self.cell_centres(candidates) + jitter * self.cell_size
        fresh = torch.zeros(candidates.shape[0], device=self.density.device)
        mine = slice(rank * len(fresh) // world_size, (rank + 1) * len(fresh) // world_size)
        fresh[mine] = density_fn(points[mine]).float()
        if world_size > 1:
            fresh = all_reduce_sum(fresh)
        self.density[candidates] = torch.maximum(self.density[candidates] * self.decay, fresh)
        self.occupied.copy_((self.density > self.density_threshold(step_size)) & ~self.carved)
        self.updates += 1

    @torch.no_grad()
    def carve(self, see_through: torch.Tensor, poses: torch.Tensor, cameras: Cameras, near: float) -> None:
        """Mark empty every cell whose centre projects, in some view, into a neighbourhood of see-through pixels.

        see_through: [V, H, W] bool, where each view sees through the scene (dataset.Views.see_through: alpha 0,
        or the background colour of data without alpha); poses: [V, 4, 4] camera-to-world (camera looks along -z);
        cameras: their intrinsics. Cells nearer than `near` to a camera are never sampled from it and are left
        alone. The neighbourhood is the cell's projected half-diagonal (at depth `near`, the nearest a sample can
        be; half as wide again under a lens distortion, which magnifies locally) plus one pixel, so a cell that
        touches a pixel the camera does not see through is kept.
        """
        height, width = see_through.shape[1:3]
        centres = self.cell_centres()
        half_diagonal = self.cell_size * math.sqrt(3) / 2
        for v, (empty, c2w) in enumerate(zip(see_through, poses)):
            focal = max(float(cameras.fx[v]), float(cameras.fy[v]))
            margin = 1.0 if cameras.distortion is None else 1.5
            radius = math.ceil(margin * focal * half_diagonal / near) + 1
            foreground = (~empty).float()[None, None]  # [1, 1, H, W]
            near_foreground = F.max_pool2d(foreground, 2 * radius + 1, stride=1, padding=radius)[0, 0] > 0
            cam = (centres - c2w[:3, 3]) @ c2w[:3, :3]  # world -> camera coordinates [n, 3]
            depth = -cam[:, 2]
            in_front = depth >= near
            u, v_ = cameras.project(torch.where(in_front[:, None], cam, -torch.ones_like(cam)), v)
            px, py = torch.floor(u), torch.floor(v_)
            seen = in_front & (px >= 0) & (px < width) & (py >= 0) & (py < height)
            index = (py.clamp(0, height - 1) * width + px.clamp(0, width - 1)).long()
            self.carved |= seen & ~near_foreground.reshape(-1)[index]
        self.occupied &= ~self.carved

    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())

