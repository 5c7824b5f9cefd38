"""The proposal sampler (samplers.ProposalSampler, mip-NeRF 360's proposal sampling with a density grid): the
overlap bound and the interlevel loss on hand-computed cases, samples that go where the proposal's weight is, and
the density grid's interpolation against a float64 reference."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from grid_field import DensityGrid
from renderer import VolumeRenderer
from samplers import ProposalSampler, overlapping_weight


def test_overlapping_weight_sums_the_bins_each_interval_touches():
    edges = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    query = torch.tensor([[0.0, 0.3, 0.5, 1.0]])
    # [0, .3] touches bins 0 and 1: .1 + .2; [.3, .5] bin 1 alone (it ends where bin 2 starts): .2;
    # [.5, 1] bins 2 and 3: .3 + .4
    assert torch.allclose(overlapping_weight(edges, weights, query), torch.tensor([[0.3, 0.2, 0.7]]))


class Slab(nn.Module):
    """A proposal that is opaque in the slab |z| < 0.25 (softplus(20) ~ 20) and empty elsewhere."""

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return torch.where(points[:, 2].abs() < 0.25, 20.0, -20.0)


def _ray():
    return torch.tensor([[0.0, 0.0, 4.0]]), torch.tensor([[0.0, 0.0, -1.0]])  # meets the slab at t = 3.75


def test_samples_go_where_the_proposal_weighs():
    sampler = ProposalSampler(2.0, 6.0, 64, 16, Slab())
    rays_o, rays_d = _ray()
    # 64 bins of 0.0625 over [2, 6]: optical depth 1.25 a bin inside the slab, so ~97 % of the weight lies in the
    # three bins after t = 3.75, and so do nearly all of the 16 samples
    evaluation = sampler.sample(rays_o, rays_d)
    assert evaluation.edges[0, 0] == 0 and evaluation.edges[0, -1] == 1  # the whole ray, start to end
    assert bool((evaluation.edges.diff(dim=-1) >= 0).all())
    assert int(((evaluation.t > 3.74) & (evaluation.t < 3.95)).sum()) >= 14
    assert torch.allclose(evaluation.delta.sum(), torch.tensor(4.0))  # the bins tile [near, far]
    training = sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(0))
    assert int(((training.t > 3.74) & (training.t < 3.95)).sum()) >= 15


def test_interlevel_loss_is_zero_under_the_bound_and_trains_the_proposal_alone():
    grid = DensityGrid(8, 2.0)
    sampler = ProposalSampler(2.0, 6.0, 8, 4, grid)
    rays_o, rays_d = _ray()
    samples = sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(1))
    proposal = sampler.proposal_weights(rays_o, rays_d, samples.proposal_s).detach()
    bound = overlapping_weight(sampler.proposal_edges, proposal, samples.edges)
    assert float(sampler.loss(rays_o, rays_d, samples, 0.5 * bound).detach()) == 0.0  # under the bound: no loss
    field = (bound + 0.1).requires_grad_()
    loss = sampler.loss(rays_o, rays_d, samples, field)
    # sum of (w - bound)^2 / w over the 4 bins, w = bound + 0.1
    expected = float((0.1**2 / (bound + 0.1)).sum())
    assert abs(float(loss.detach()) - expected) < 1e-6
    loss.sum().backward()
    assert field.grad is None and grid.grid.grad is not None and bool(grid.grid.grad.abs().sum() > 0)


def test_a_proposal_renderer_adds_its_loss_in_training_only():
    def field(points):
        return torch.zeros(*points.shape[:-1], 4)

    renderer = VolumeRenderer(field, ProposalSampler(2.0, 6.0, 8, 4, DensityGrid(8, 2.0)))
    rays_o, rays_d = _ray()
    out = renderer(rays_o, rays_d, renderer.sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(0)))
    assert out.weights.shape == (1, 4) and out.proposal_loss.shape == (1,)
    with torch.no_grad():
        assert renderer(rays_o, rays_d).proposal_loss is None


def test_density_grid_interpolates_a_linear_function_exactly():
    # trilinear interpolation reproduces any affine function of the vertices' positions: 2x - y + 0.5z + 1
    grid = DensityGrid(5, 2.0, density_scale=4.0)
    axis = np.linspace(-2.0, 2.0, 5)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")  # flat index (i * R + j) * R + k
    values = (2 * x - y + 0.5 * z + 1).reshape(-1, 1)
    with torch.no_grad():
        grid.grid.copy_(torch.from_numpy(values / 4.0))
    points = np.random.default_rng(0).uniform(-2.0, 2.0, (100, 3))
    expected = 2 * points[:, 0] - points[:, 1] + 0.5 * points[:, 2] + 1
    got = grid(torch.from_numpy(points).float()).detach().double().numpy()
    assert np.abs(got - expected).max() < 1e-5
