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
- `ProposalSampler`: a learned density grid (the proposal) evaluated at the stratified samples says where the
  scene is, and the field is evaluated at fewer samples drawn from its weights (mip-NeRF 360's proposal sampling).

Bounded scenes (an object in a box: the Blender scenes, tiny-NeRF) are sampled evenly in t over [near, far] and the
field sees world points. Unbounded scenes (a capture whose walls, room or sky lie far beyond the object) use
mip-NeRF 360's answer: the field sees points through the scene contraction (`contract`: the identity inside a ball
of radius R, everything beyond squeezed into the shell between R and 2R), and samples are spaced evenly in t up to
t = R and evenly in disparity (1 / t) from R to far (`lindisp_t`), so the far, contracted space costs as many
samples as the near one. The occupancy grid then covers the contracted space, [-2R, 2R]^3, as nerfacc's
OccGridEstimator does for unbounded scenes. A sampler's `positions` gives the points the field is evaluated at.
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
    pass (None: evenly spaced); a proposal sampler's edges [N, S + 1] of the samples' bins in s (the sampler's
    parameter of the ray, in [0, 1]) and proposal_s [N, P], where its proposal was evaluated; kept [P] int64, the
    flat positions (ray * S + sample, ascending) of keep's true entries when they are known without a host sync
    (see kept_positions; None: the renderer finds them itself)."""

    t: torch.Tensor
    delta: torch.Tensor
    keep: torch.Tensor | None = None
    importance_u: torch.Tensor | None = None
    edges: torch.Tensor | None = None
    proposal_s: torch.Tensor | None = None
    kept: torch.Tensor | None = None

    def of_rays(self, index: slice) -> "Samples":
        """The samples of rays `index` (kept, the whole batch's positions, is left out)."""
        return Samples(*(None if x is None else x[index] for x in self[:-1]))

    def counts(self) -> torch.Tensor | None:
        """[N] int64: how many of each ray's samples the field is evaluated at (None: all of them)."""
        return None if self.keep is None else self.keep.sum(dim=1)


def kept_positions(keep: torch.Tensor, total: int) -> torch.Tensor:
    """The flat positions [total] (ascending) of the true entries of keep [N, S], given their number `total`.

    A boolean mask used as an index (or nonzero) makes the host wait for the device to count its entries: a
    sync per use on a GPU. With the count known, a stable sort puts the true entries first, in order, at a size
    fixed in advance: no sync, on every device."""
    flat = keep.reshape(-1).to(torch.uint8)
    return torch.sort(flat, descending=True, stable=True).indices[:total]



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


def compositing_weights(sigma: torch.Tensor, delta: torch.Tensor, rays_d: torch.Tensor) -> torch.Tensor:
    """Volume rendering weights w_i = T_i alpha_i [N, S] of densities sigma [N, S] over intervals delta [N, S] of
    rays rays_d [N, 3] (any length): alpha_i = 1 - exp(-sigma_i delta_i |d|), T_i = prod_{j<i} (1 - alpha_j)."""
    optical = sigma * delta * rays_d.norm(dim=-1, keepdim=True)  # [N, S]
    alpha = 1.0 - torch.exp(-optical)
    # exclusive cumulative product in log space: T_i = exp(-sum_{j<i} sigma_j delta_j)
    return alpha * torch.exp(-(torch.cumsum(optical, dim=-1) - optical))


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


def contract(x: torch.Tensor, radius: float) -> torch.Tensor:
    """mip-NeRF 360's scene contraction at scale `radius`: x [..., 3] -> [..., 3], the identity for |x| <= R and
    (2 - R / |x|) R x / |x| beyond, so all of space lands inside the ball of radius 2R, continuously."""
    norm = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.where(norm <= radius, x, (2 - radius / norm) * (radius / norm) * x)


def lindisp_t(s: torch.Tensor, near: float, mid: float, far: float) -> torch.Tensor:
    """Ray parameter t of s in [0, 1]: evenly spaced in t from near (s = 0) to mid (s = 1/2), evenly spaced in
    disparity 1 / t from mid to far (s = 1). Continuous and increasing."""
    linear = near + (mid - near) * (2 * s)
    disparity = 1 / mid + (1 / far - 1 / mid) * (2 * s - 1)
    return torch.where(s < 0.5, linear, 1 / disparity.clamp_min(1e-12))


def lindisp_samples(n_rays: int, n_samples: int, near: float, mid: float, far: float,
                    jitter: torch.Tensor | None = None, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Like stratified_samples, with S equal bins of s (see lindisp_t) instead of t: t [N, S] of the jittered
    (or centred) positions in each bin and delta [N, S] the length in t of the sample's bin."""
    edges = lindisp_t(torch.linspace(0.0, 1.0, n_samples + 1, device=device), near, mid, far)  # [S + 1]
    u = jitter if jitter is not None else torch.full((1, n_samples), 0.5, device=device)
    s = (torch.arange(n_samples, device=device, dtype=torch.float32) + u) / n_samples
    t = lindisp_t(s, near, mid, far).expand(n_rays, n_samples)
    return t, torch.diff(edges).expand(n_rays, n_samples)


class StratifiedSampler(nn.Module):
    """n_samples stratified samples per ray in [near, far] (+ the uniforms of n_importance importance samples).

    contraction: 0 for a bounded scene (samples evenly spaced in t, world points); R > 0 for an unbounded one
    (samples evenly spaced in t to t = max(R, near) and in disparity beyond, points contracted at scale R)."""

    def __init__(self, near: float, far: float, n_samples: int, n_importance: int = 0, contraction: float = 0.0):
        super().__init__()
        if contraction and n_importance:
            raise ValueError("an unbounded scene's samples are spaced in disparity: n_importance must be 0")
        self.near, self.far, self.n_samples, self.n_importance = near, far, n_samples, n_importance
        self.contraction = contraction

    def extra_repr(self) -> str:
        return (f"near={self.near}, far={self.far}, n_samples={self.n_samples}, n_importance={self.n_importance}"
                + (f", contraction={self.contraction}" if self.contraction else ""))

    @property
    def linear_end(self) -> float:
        """Where an unbounded scene's samples turn from even in t to even in disparity."""
        return min(max(self.contraction, self.near), self.far)

    def positions(self, rays_o: torch.Tensor, rays_d: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The points [N, S, 3] the field is evaluated at for rays [N, 3] at t [N, S]: o + t d, contracted in
        an unbounded scene."""
        points = rays_o[:, None, :] + t[..., None] * rays_d[:, None, :]
        return contract(points, self.contraction) if self.contraction else points

    @property
    def points_per_ray(self) -> int:
        """The most field evaluations a ray can cost (configs.points_per_ray)."""
        return points_per_ray(self)

    @property
    def step_size(self) -> float:
        """The length in t of the smallest bin (the occupancy threshold's render step)."""
        if self.contraction:
            return (self.linear_end - self.near) / (self.n_samples / 2) or (self.far - self.near) / self.n_samples
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
        if self.contraction:
            t, delta = lindisp_samples(n, self.n_samples, self.near, self.linear_end, self.far, jitter, device)
        else:
            t, delta = stratified_samples(n, self.n_samples, self.near, self.far, jitter, device)
        return Samples(t, delta, None, importance_u)

    def update_every_n_steps(self, step: int, density_fn: Callable[[torch.Tensor], torch.Tensor],
                             generator: torch.Generator, rank: int = 0, world_size: int = 1) -> None:
        """Nothing to refresh."""


class OccupancyGridSampler(StratifiedSampler):
    """Stratified samples, evaluated only inside occupied cells of `grid`, which is refreshed from the field's
    density every `update_every` steps (at steps 0, update_every, ...)."""

    def __init__(self, near: float, far: float, n_samples: int, grid: OccupancyGrid, update_every: int = 16,
                 contraction: float = 0.0):
        super().__init__(near, far, n_samples, contraction=contraction)
        self.grid = grid
        self.update_every = update_every

    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
               generator: torch.Generator | None = None) -> Samples:
        samples = super().sample(rays_o, rays_d, generator)
        with torch.no_grad():
            return samples._replace(keep=self.grid.is_occupied(self.positions(rays_o, rays_d, samples.t)))

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
        if self.contraction:
            field_density = density_fn
            density_fn = lambda points: field_density(points) * self.stretch(points)  # noqa: E731
        self.grid.update(density_fn, self.step_size, generator, rank, world_size)

    def stretch(self, points: torch.Tensor) -> torch.Tensor:
        """[P]: how many world units of a ray one unit of contracted space at `points` [P, 3] holds, along the
        radius: 1 inside radius R, (r / R)^2 beyond (r = R^2 / (2R - |x|), the world radius; capped at (far / R)^2).
        An unbounded grid's samples are spread about evenly in contracted space, so a far cell's render step is
        this much longer in the world and a density that much smaller is as opaque: the grid compares
        density x stretch with the threshold of the near, even steps."""
        radius = self.contraction
        norm = points.norm(dim=-1).clamp(max=2 * radius * (1 - 1e-6))
        world = torch.where(norm <= radius, torch.full_like(norm, radius), radius * radius / (2 * radius - norm))
        return (world / radius).clamp(max=self.far / radius) ** 2


class ProposalSampler(StratifiedSampler):
    """The field's samples drawn where a proposal expects the scene: mip-NeRF 360's proposal sampling (nerfacc's
    PropNetEstimator), with a density grid (grid_field.DensityGrid) for the proposal network.

    The proposal, `points [P, 3] -> density pre-activation [P]`, is evaluated at the n_samples stratified samples
    (evenly spaced in s: in t, and in disparity beyond an unbounded scene's contraction radius); its compositing
    weights are a pdf over their bins, from which the fine_samples + 1 bin edges of the field's samples are drawn
    (stratified in training; evenly spaced in the cdf without a generator, from the ray's start to its end). Each
    field sample sits at the middle (in s) of its bin and stands for the whole bin. The proposal learns from the
    field's weights (`loss`, added to the training loss), so it needs no refresh of its own."""

    def __init__(self, near: float, far: float, n_samples: int, fine_samples: int, proposal: nn.Module,
                 contraction: float = 0.0):
        super().__init__(near, far, n_samples, contraction=contraction)
        self.proposal, self.fine_samples = proposal, fine_samples
        self.register_buffer("proposal_edges", torch.linspace(0.0, 1.0, n_samples + 1), persistent=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fine_samples={self.fine_samples}"

    @property
    def points_per_ray(self) -> int:
        return self.fine_samples

    def t_of(self, s: torch.Tensor) -> torch.Tensor:
        """Ray parameter t of s in [0, 1] (see lindisp_t; evenly spaced in t from near to far when bounded)."""
        if self.contraction:
            return lindisp_t(s, self.near, self.linear_end, self.far)
        return self.near + (self.far - self.near) * s

    def proposal_weights(self, rays_o: torch.Tensor, rays_d: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """[N, S] the proposal's compositing weights over its S bins of rays [N, 3], sampled at s [N, S] (one
        point inside each bin), in float32 whatever the autocast around it."""
        with torch.autocast(rays_o.device.type, enabled=False):
            points = self.positions(rays_o.float(), rays_d.float(), self.t_of(s))
            sigma = nn.functional.softplus(self.proposal(points.reshape(-1, 3))).reshape(s.shape)
            return compositing_weights(sigma, torch.diff(self.t_of(self.proposal_edges)), rays_d.float())

    def sample(self, rays_o: torch.Tensor, rays_d: torch.Tensor,
               generator: torch.Generator | None = None) -> Samples:
        """Samples of rays [N, 3]: t, delta [N, fine_samples], their bin edges in s [N, fine_samples + 1] and
        where the proposal was evaluated (proposal_s [N, n_samples], what `loss` evaluates it at again)."""
        n, device, k = rays_o.shape[0], rays_o.device, self.fine_samples + 1
        if generator is not None:
            jitter = torch.rand(n, self.n_samples, generator=generator, device=device)
            u = (torch.arange(k, device=device) + torch.rand(n, k, generator=generator, device=device)) / k
        else:
            jitter = torch.full((n, self.n_samples), 0.5, device=device)
            u = torch.linspace(0.0, 1.0, k, device=device).expand(n, -1)  # s = 0 to 1: the whole ray
        s_proposal = (torch.arange(self.n_samples, device=device) + jitter) / self.n_samples  # [N, S]
        with torch.no_grad():
            weights = self.proposal_weights(rays_o, rays_d, s_proposal)
        edges = sample_pdf(self.proposal_edges.expand(n, -1), weights, k, u)  # [N, fine_samples + 1]
        t = self.t_of((edges[:, 1:] + edges[:, :-1]) / 2)
        return Samples(t, torch.diff(self.t_of(edges), dim=-1), edges=edges, proposal_s=s_proposal)

    def loss(self, rays_o: torch.Tensor, rays_d: torch.Tensor, samples: Samples,
             weights: torch.Tensor) -> torch.Tensor:
        """[N]: mip-NeRF 360's interlevel loss of rays [N, 3] rendered at `samples` with field weights [N, F]:
        sum over the field's bins of max(0, w - bound)^2 / w, bound the proposal's weight of the bins that overlap
        the field's bin. The field's weights are a constant here: the loss trains the proposal alone."""
        bound = overlapping_weight(self.proposal_edges, self.proposal_weights(rays_o, rays_d, samples.proposal_s),
                                   samples.edges)
        w = weights.detach().float()
        return (torch.relu(w - bound) ** 2 / (w + 1e-7)).sum(dim=-1)


def overlapping_weight(edges: torch.Tensor, weights: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[N, Q]: for each interval [query_j, query_j+1] of query [N, Q + 1] (sorted), the total of the weights
    [N, S] of the intervals of `edges` [S + 1] (sorted, shared by all rays) that overlap it."""
    cumulative = torch.cat([torch.zeros_like(weights[:, :1]), torch.cumsum(weights, dim=-1)], dim=-1)  # [N, S + 1]
    n_bins = weights.shape[1]
    # the first bin whose end lies beyond the query's start, and one past the last whose start lies before its end
    first = (torch.searchsorted(edges, query[:, :-1].contiguous(), right=True) - 1).clamp(0, n_bins)
    last = torch.searchsorted(edges, query[:, 1:].contiguous(), right=False).clamp(0, n_bins)
    return cumulative.gather(-1, last) - cumulative.gather(-1, first)
