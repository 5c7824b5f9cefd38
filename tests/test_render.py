"""Renderer numerics: hand-computed cases and an independent float64 reference."""

import math

import numpy as np
import pytest
import torch

from nerf import positional_encoding
from cameras import pose_spherical
from renderer import composite, get_rays, pixel_rays, render_rays
from samplers import sample_pdf
from samplers import stratified_samples


def inv_softplus(y):
    return math.log(math.expm1(y))


def logit(p):
    return math.log(p / (1 - p))


def test_composite_hand_computed():
    # One ray straight down -z (|d| = 1), three samples with delta = 1 at t = 2, 3, 4.
    # sigma * delta = ln 2, ln 2, ln 4  ->  alpha = 1/2, 1/2, 3/4
    # exclusive T = 1, 1/2, 1/4         ->  w = 1/2, 1/4, 3/16;  acc = 15/16
    # colours (red channel) 0.8, 0.4, 0.2 -> rgb_r = 0.4 + 0.1 + 0.0375 = 0.5375
    # depth = 2 * 1/2 + 3 * 1/4 + 4 * 3/16 = 1 + 0.75 + 0.75 = 2.5
    sig = [math.log(2), math.log(2), math.log(4)]
    red = [0.8, 0.4, 0.2]
    raw = torch.tensor([[[logit(r), logit(0.5), logit(0.5), inv_softplus(s)] for r, s in zip(red, sig)]],
                       dtype=torch.float64)
    t = torch.tensor([[2.0, 3.0, 4.0]], dtype=torch.float64)
    out = composite(raw, torch.ones_like(t), t, torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(out.weights, torch.tensor([[0.5, 0.25, 0.1875]], dtype=torch.float64))
    assert out.acc.item() == pytest.approx(0.9375)
    assert out.rgb[0, 0].item() == pytest.approx(0.5375)
    assert out.rgb[0, 1].item() == pytest.approx(0.5 * 0.9375)
    assert out.depth.item() == pytest.approx(2.5)


def test_composite_scales_by_ray_length():
    # the same optical depth with |d| = 2 and half the delta
    raw = torch.tensor([[[0.0, 0.0, 0.0, inv_softplus(1.0)]]], dtype=torch.float64)
    a = composite(raw, torch.full((1, 1), 0.5, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64),
                  torch.tensor([[0.0, 0.0, -2.0]], dtype=torch.float64))
    assert a.acc.item() == pytest.approx(1 - math.exp(-1.0))


def reference_composite(raw, delta, t, rays_d):
    """Plain loops in float64 numpy: T_i = prod_{j<i} (1 - alpha_j)."""
    raw, delta, t, rays_d = (np.asarray(x, dtype=np.float64) for x in (raw, delta, t, rays_d))
    n, s, _ = raw.shape
    rgb, depth, acc = np.zeros((n, 3)), np.zeros(n), np.zeros(n)
    for r in range(n):
        trans = 1.0
        for i in range(s):
            sigma = np.log1p(np.exp(raw[r, i, 3]))
            alpha = 1.0 - np.exp(-sigma * delta[r, i] * np.linalg.norm(rays_d[r]))
            w = trans * alpha
            rgb[r] += w / (1.0 + np.exp(-raw[r, i, :3]))
            depth[r] += w * t[r, i]
            acc[r] += w
            trans *= 1.0 - alpha
    return rgb, depth, acc


def test_composite_matches_float64_reference():
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(7, 13, 4, generator=gen) * 3
    t = torch.sort(torch.rand(7, 13, generator=gen) * 4 + 2, dim=-1).values
    delta = torch.rand(7, 13, generator=gen) * 0.3
    rays_d = torch.randn(7, 3, generator=gen)
    out = composite(raw, delta, t, rays_d)  # float32, as in training
    rgb, depth, acc = reference_composite(raw, delta, t, rays_d)
    np.testing.assert_allclose(out.rgb.numpy(), rgb, atol=1e-5)
    np.testing.assert_allclose(out.depth.numpy(), depth, atol=1e-4)
    np.testing.assert_allclose(out.acc.numpy(), acc, atol=1e-5)


def test_get_rays_hand_computed():
    # 2x2 image, focal 1, camera at (1, 2, 3) rotated 90 degrees about z (x -> y, y -> -x).
    # pixel (column 0, row 0): centre (0.5, 0.5) -> camera dir ((0.5 - 1) / 1, -(0.5 - 1) / 1, -1) = (-0.5, 0.5, -1)
    # rotated: (-0.5 * 0 - 0.5, -0.5, -1) = (-0.5, -0.5, -1)
    c2w = torch.tensor([[0.0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]])
    rays_o, rays_d = get_rays(2, 2, 1.0, c2w)
    assert rays_o.shape == rays_d.shape == (2, 2, 3)
    torch.testing.assert_close(rays_o[1, 0], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(rays_d[0, 0], torch.tensor([-0.5, -0.5, -1.0]))
    # pixel (column 1, row 1): camera dir (0.5, -0.5, -1) -> (0.5, 0.5, -1)
    torch.testing.assert_close(rays_d[1, 1], torch.tensor([0.5, 0.5, -1.0]))


def test_pixel_rays_match_get_rays_for_batched_poses():
    poses = torch.stack([pose_spherical(a, -30, 4.0) for a in (0.0, 100.0)])
    rays_o, rays_d = get_rays(5, 7, 6.0, poses[1])
    o, d = pixel_rays(poses[torch.tensor([1, 1])], torch.tensor([3.0, 6.0]), torch.tensor([4.0, 0.0]), 6.0, 5, 7)
    torch.testing.assert_close(d, torch.stack([rays_d[4, 3], rays_d[0, 6]]))
    torch.testing.assert_close(o, torch.stack([rays_o[4, 3], rays_o[0, 6]]))


def test_pose_spherical_looks_at_origin():
    for theta, phi in [(0, -30), (123, -70), (250, 10)]:
        c2w = pose_spherical(theta, phi, 4.0).double()
        rot, pos = c2w[:3, :3], c2w[:3, 3]
        torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64), atol=1e-6, rtol=0)
        assert torch.det(rot).item() == pytest.approx(1.0)
        assert pos.norm().item() == pytest.approx(4.0)
        torch.testing.assert_close(rot @ torch.tensor([0, 0, -1.0], dtype=torch.float64), -pos / 4.0)
        assert (pos[2] > 0) == (phi < 0)  # negative elevation = camera above the object (world z up)


def test_stratified_samples_cover_bins():
    gen = torch.Generator().manual_seed(0)
    jitter = torch.rand(5, 8, generator=gen)
    t, delta = stratified_samples(5, 8, 2.0, 6.0, jitter)
    edges = torch.linspace(2.0, 6.0, 9)
    assert ((t >= edges[:-1]) & (t <= edges[1:])).all()
    torch.testing.assert_close(delta.sum(-1), torch.full((5,), 4.0))
    t_eval, _ = stratified_samples(3, 8, 2.0, 6.0)
    torch.testing.assert_close(t_eval[0], (edges[:-1] + edges[1:]) / 2)


def test_sample_pdf_follows_weights():
    edges = torch.linspace(2.0, 6.0, 5).expand(2, -1)  # bins [2,3] [3,4] [4,5] [5,6]
    weights = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.5]])
    t = sample_pdf(edges, weights, 64, torch.rand(2, 64, generator=torch.Generator().manual_seed(1)))
    assert (t[1:] >= 0).all() and (t.diff(dim=-1) >= 0).all()
    assert ((t[0] >= 4.0) & (t[0] <= 5.0)).float().mean() > 0.99
    in_ends = ((t[1] <= 3.0) | (t[1] >= 5.0)).float().mean()
    assert in_ends > 0.99


def test_render_rays_uniform_medium_matches_closed_form():
    # constant density sigma along a ray of |d| = 1 from near 2 to far 6: acc = 1 - exp(-sigma * 4)
    sigma = 0.3
    field = lambda pts: torch.cat([torch.zeros(pts.shape[0], 3), torch.full((pts.shape[0], 1),
                                                                            inv_softplus(sigma))], dim=-1)
    out = render_rays(field, torch.zeros(2, 3), torch.tensor([[0.0, 0, -1], [0, 0, -1]]), 2.0, 6.0, 64)
    assert out.acc[0].item() == pytest.approx(1 - math.exp(-sigma * 4), rel=1e-5)
    # expected depth of an exponential truncated to [2, 6], up to the sampling's discretisation
    ts = np.linspace(2, 6, 200001)
    pdf = sigma * np.exp(-sigma * (ts - 2))
    assert out.depth[0].item() == pytest.approx(np.trapezoid(pdf * ts, ts), rel=2e-3)


def test_positional_encoding_matches_float64():
    x = torch.tensor([[0.3, -1.2, 2.5], [4.0, 0.0, -3.9]])
    enc = positional_encoding(x, 16)
    assert enc.shape == (2, 99)
    xd = x.double().numpy()
    expected = [xd]
    for i in range(16):
        expected += [np.sin(2.0**i * xd), np.cos(2.0**i * xd)]
    # float32 phase error grows with 2^15 * |x| ~ 1.3e5 (ulp ~ 0.008): compare low and high bands separately
    np.testing.assert_allclose(enc[:, :3 + 6 * 10].numpy(), np.concatenate(expected, -1)[:, :63], atol=2e-4)
    np.testing.assert_allclose(enc.numpy(), np.concatenate(expected, -1), atol=2e-2)


def test_the_renderer_with_a_stratified_sampler_renders_as_render_rays_does():
    # the sampler draws the jitter, then the importance uniforms, from the generator it is handed: the renderer
    # with those samples is render_rays with the same uniforms, bit for bit, coarse and fine
    from renderer import VolumeRenderer
    from samplers import StratifiedSampler

    field = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    torch.manual_seed(0)
    rays_o = torch.randn(50, 3) + torch.tensor([0.0, 0.0, 4.0])
    rays_d = torch.randn(50, 3) * 0.2 + torch.tensor([0.0, 0.0, -1.0])
    for n_importance in (0, 8):
        renderer = VolumeRenderer(field, StratifiedSampler(2.0, 6.0, 16, n_importance))
        samples = renderer.sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(3))
        gen = torch.Generator().manual_seed(3)
        jitter = torch.rand(50, 16, generator=gen)
        u = torch.rand(50, 8, generator=gen) if n_importance else None
        expected = render_rays(field, rays_o, rays_d, 2.0, 6.0, 16, n_importance, jitter, u)
        got = renderer(rays_o, rays_d, samples)
        assert torch.equal(got.rgb, expected.rgb) and torch.equal(got.depth, expected.depth)
        # without samples (evaluation): the bin centres and evenly spaced importance samples
        assert torch.equal(renderer(rays_o, rays_d).rgb, render_rays(field, rays_o, rays_d, 2.0, 6.0, 16,
                                                                     n_importance).rgb)
