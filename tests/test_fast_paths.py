"""Fast paths agree with the plain ones: compiled vs eager rendering, the voxel-grid field vs F.grid_sample, its
empty-space skipping vs no skipping, the fused optimizer vs the default one; and bench.py's arithmetic."""

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

import assembly
import bench
import train
from configs import FAST, ConfigError, from_cli, points_per_ray
from dataset import RayBatcher, load_views, split_views
from grid_field import EMPTY_DENSITY_RAW, GridField
from renderer import render_rays
from utils import Dist


def rays(n: int, seed: int = 0, dtype=torch.float32):
    """n rays from points on a sphere of radius 4 towards random points near the origin (unit directions, so
    t in [2, 6] crosses the middle of the scene)."""
    gen = torch.Generator().manual_seed(seed)
    origin = F.normalize(torch.randn(n, 3, generator=gen, dtype=dtype), dim=-1) * 4.0
    target = torch.rand(n, 3, generator=gen, dtype=dtype) - 0.5
    return origin, F.normalize(target - origin, dim=-1)


# --- compiled vs eager -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_compiled_render_and_gradients_match_eager(tiny_cfg):
    n_importance = 8  # both passes: stratified and importance samples
    cfg = replace(tiny_cfg, n_importance=n_importance, skip=False)  # the whole render compiled as one graph
    eager = assembly.build_renderer(cfg, torch.device("cpu"))
    twin = assembly.build_renderer(cfg, torch.device("cpu"))
    twin.load_state_dict(eager.state_dict())
    compiled = torch.compile(twin, fullgraph=True)
    o, d = rays(64)
    samples = eager.sampler.sample(o, d, torch.Generator().manual_seed(1))  # jittered, with importance uniforms
    outs = [m(o, d, samples) for m in (eager, compiled)]
    for name in ("rgb", "depth", "acc", "weights"):
        torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name), rtol=1e-4, atol=1e-5)
    # the backward ran through the compiled graph too, and gives the same gradients
    assert "CompiledFunction" in type(outs[1].rgb.grad_fn).__name__ or _has_compiled_node(outs[1].rgb.grad_fn)
    for out in outs:
        (out.rgb.square().sum() + out.depth.sum()).backward()
    for p_eager, p_compiled in zip(eager.parameters(), twin.parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-3, atol=1e-5)


def _has_compiled_node(fn, depth: int = 0) -> bool:
    if fn is None or depth > 50:
        return False
    if "CompiledFunction" in type(fn).__name__:
        return True
    return any(_has_compiled_node(nxt, depth + 1) for nxt, _ in fn.next_functions)


def test_skip_linear_equals_the_layer_on_the_concatenation():
    from bitnerf import RMSNormLinear
    from nerf import skip_linear

    gen = torch.Generator().manual_seed(0)
    h = torch.randn(50, 16, generator=gen, dtype=torch.float64, requires_grad=True)
    enc = torch.randn(50, 9, generator=gen, dtype=torch.float64)
    for layer in (torch.nn.Linear(25, 16).double(), RMSNormLinear(25, 16).double()):
        ours, ref = skip_linear(layer, h, enc), layer(torch.cat([h, enc], dim=-1))
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
        upstream = torch.randn(ours.shape, generator=gen, dtype=torch.float64)
        for a, b in zip(torch.autograd.grad(ours, [h, *layer.parameters()], upstream),
                        torch.autograd.grad(ref, [h, *layer.parameters()], upstream)):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


# --- the voxel-grid field --------------------------------------------------------------------------------------
def reference_interpolation(field: GridField, points: torch.Tensor) -> torch.Tensor:
    """The same trilinear interpolation by F.grid_sample (input [1, C, z, y, x], align_corners: -1/+1 = the end
    vertices), scaled as the field scales its density channel."""
    r = field.resolution
    volume = (field.grid * field.scale).view(r, r, r, 4).permute(3, 2, 1, 0)[None]
    out = F.grid_sample(volume, (points / field.bound).view(1, 1, 1, -1, 3), align_corners=True)
    return out.view(4, -1).T


def random_grid(resolution: int = 6, seed: int = 0, skip_density: float = 0.0) -> GridField:
    field = GridField(resolution, bound=1.5, skip_density=skip_density).double()
    with torch.no_grad():
        field.grid.copy_(torch.randn(field.grid.shape, generator=torch.Generator().manual_seed(seed)))
    return field


def test_grid_field_matches_grid_sample_values_and_gradients():
    field = random_grid()
    points = (torch.rand(500, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * 1.5
    ours, ref = field(points), reference_interpolation(field, points)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-12)
    upstream = torch.randn(ours.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad_ours, = torch.autograd.grad(ours, field.grid, upstream)
    grad_ref, = torch.autograd.grad(ref, field.grid, upstream)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=0, atol=1e-12)


def test_grid_field_hand_computed_point():
    # 2 vertices per axis spanning [-1, 1]: the point (0.5, 0, -0.5) has fractions (3/4, 1/2, 1/4), so it takes
    # 3/4 * 1/2 * 1/4 = 3/32 of vertex (1, 0, 0), 3/4 * 1/2 * 3/4 = 9/32 of vertex (1, 0, 1)...; with the RGB
    # channel 0 holding the x index, channel 1 the y index and channel 2 the z index, the result is the fractions.
    field = GridField(2, bound=1.0, skip_density=0.0).double()
    with torch.no_grad():
        for i in range(2):
            for j in range(2):
                for k in range(2):
                    field.grid[(i * 2 + j) * 2 + k, :3] = torch.tensor([i, j, k], dtype=torch.float64)
    out = field(torch.tensor([[0.5, 0.0, -0.5]], dtype=torch.float64))
    torch.testing.assert_close(out[0, :3], torch.tensor([0.75, 0.5, 0.25], dtype=torch.float64))


def test_points_outside_the_grid_are_empty_and_get_no_gradient():
    field = random_grid()
    points = torch.tensor([[1.6, 0.0, 0.0], [0.0, -2.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = field(points)
    assert out[0].tolist() == out[1].tolist() == [0.0, 0.0, 0.0, EMPTY_DENSITY_RAW]
    out.sum().backward()
    touched = field.grid.grad.abs().sum(dim=-1) > 0
    assert touched.sum() == 8  # the 8 vertices around the origin, nothing for the outside points


def test_skipping_leaves_dense_points_exact_and_empties_the_rest():
    field = random_grid(skip_density=0.3)
    plain = random_grid(skip_density=0.0)
    points = (torch.rand(2000, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1) * 1.4
    out, ref = field(points), plain(points)
    kept = F.softplus(ref[:, 3]) > 0.3
    assert 0 < kept.sum() < len(points)  # the case really mixes both kinds of point
    torch.testing.assert_close(out[kept], ref[kept], rtol=0, atol=0)
    assert (out[~kept] == torch.tensor([0.0, 0.0, 0.0, EMPTY_DENSITY_RAW], dtype=torch.float64)).all()


def test_skipping_renderer_agrees_with_plain_when_the_grid_is_full():
    # every vertex dense enough that nothing is skipped: the skipping renderer is the plain one, bit for bit
    full = random_grid(skip_density=0.02)
    plain = random_grid(skip_density=0.0)
    for f in (full, plain):
        with torch.no_grad():
            f.grid[:, 3] = f.grid[:, 3].abs() + 0.1
    o, d = rays(32, dtype=torch.float64)
    jitter = torch.rand(32, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    a = render_rays(full, o, d, 2.0, 6.0, 48, jitter=jitter)
    b = render_rays(plain, o, d, 2.0, 6.0, 48, jitter=jitter)
    for name in ("rgb", "depth", "acc", "weights"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_skipping_changes_a_render_by_no_more_than_the_skipped_opacity():
    # a skipped sample has density below the threshold, so each changes transmittance by < 1 - exp(-thr * step)
    threshold, n_samples = 0.05, 48
    skipping, plain = random_grid(skip_density=threshold), random_grid(skip_density=0.0)
    o, d = rays(64, seed=5, dtype=torch.float64)
    a = render_rays(skipping, o, d, 2.0, 6.0, n_samples)
    b = render_rays(plain, o, d, 2.0, 6.0, n_samples)
    step = (6.0 - 2.0) / n_samples * d.norm(dim=-1)
    bound = n_samples * (1 - torch.exp(-threshold * step))
    assert ((a.acc - b.acc).abs() <= bound + 1e-12).all()
    assert ((a.rgb - b.rgb).abs().amax(dim=-1) <= bound + 1e-12).all()
    assert (a.acc != b.acc).any()  # something was skipped


def test_grid_preset_trains_and_refuses_compile(tiny_cfg):
    with pytest.raises(ConfigError, match="compile=false"):
        from_cli(FAST, ["--compile=true"])
    cfg = replace(tiny_cfg, model="grid", skip=False, compile=False, grid_resolution=24, lr=0.1, weight_decay=0.0,
                  steps=25, n_samples=32, batch_size=512)
    raw = assembly.build_renderer(cfg, torch.device("cpu"))
    views = split_views(load_views(cfg.data), cfg.val_views)[1]
    before, _ = train.evaluate_views(raw, views, Dist(), 256)
    trainer = train.Trainer(cfg, raw, Dist(), torch.device("cpu"))
    batcher = RayBatcher(split_views(load_views(cfg.data), cfg.val_views)[0], "ray", 512, 0)
    for step in range(cfg.steps):
        trainer.step(*batcher.batch(step), torch.Generator().manual_seed(step), cfg.lr)
    after, _ = train.evaluate_views(raw, views, Dist(), 256)
    assert after > before + 3.0, (before, after)


# --- the optimizer ---------------------------------------------------------------------------------------------
def test_fused_optimizer_for_plain_parameters_matches_for_each(tiny_cfg):
    cfg = replace(tiny_cfg, weight_decay=0.01)
    fused_model = assembly.build_renderer(cfg, torch.device("cpu"))
    plain_model = assembly.build_renderer(cfg, torch.device("cpu"))
    plain_model.load_state_dict(fused_model.state_dict())
    fused = train.make_optimizer(cfg, list(fused_model.parameters()), torch.device("cpu"))
    plain = torch.optim.AdamW(plain_model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=True)
    assert fused.defaults["fused"]
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(fused_model.parameters(), plain_model.parameters()):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        plain.step()
    for p, q in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_bitnerf_latent_weights_are_plain_parameters_for_the_fused_optimizer(tiny_cfg):
    cfg = replace(tiny_cfg, model="bitnerf")
    raw = assembly.build_renderer(cfg, torch.device("cpu"))
    assert train.make_optimizer(cfg, list(raw.parameters()), torch.device("cpu")).defaults["fused"]


# --- bench.py ----------------------------------------------------------------------------------------------------
def test_linear_macs_and_points_per_ray_hand_computed():
    from nerf import NeRF

    # encoding 3 * (1 + 2 * 2) = 15; input 15x8, hidden 8x8 then (8 + 15)x8 at the skip, output 8x4
    assert bench.linear_macs(NeRF(n_freqs=2, width=8, depth=2, skip_layer=1)) == 15 * 8 + 8 * 8 + 23 * 8 + 8 * 4
    assert bench.linear_macs(GridField(4)) == 0
    assert points_per_ray(replace(FAST, n_samples=32, n_importance=0)) == 32
    assert points_per_ray(replace(FAST, n_samples=32, n_importance=16)) == 32 + 48


def test_measure_reports_a_consistent_row(tiny_cfg):
    from dataset import load_views

    cfg = replace(tiny_cfg, batch_size=128)
    row = bench.measure(cfg, load_views(cfg.data), torch.device("cpu"), repeats=2, warmup=0)
    # the carved grid skips the background's samples: points/s counts the evaluated ones over the median step
    assert cfg.skip and 0 < row["evaluated_share"] < 1
    assert row["points_per_s"] == pytest.approx(row["evaluated_share"] * 128 * cfg.n_samples / row["step_s"])
    assert row["rays_per_s"] == pytest.approx(128 / row["step_s"])
    flops = 6 * bench.linear_macs(assembly.build_renderer(cfg, torch.device("cpu")).field) * row["points_per_s"]
    assert row["mlp_gflops"] == pytest.approx(flops / 1e9)
    assert row["fraction_of_peak"] == pytest.approx(row["mlp_gflops"] / row["peak_fp32_gflops"])
    assert row["peak_mem_mib"] >= row["mem_before_steps_mib"] or math.isnan(row["peak_mem_mib"])
    assert row["render_points_per_s"] > 0 and row["optimizer"] == "fused"
    assert "nerf" in bench.table([row, {"model": "grid", "compile": True, "amp": "off", "error": "boom"}])
    plain = bench.measure(replace(cfg, skip=False), load_views(cfg.data), torch.device("cpu"), repeats=2, warmup=0)
    assert plain["evaluated_share"] == 1  # without the grid every sample is evaluated
    assert plain["points_per_s"] == pytest.approx(128 * cfg.n_samples / plain["step_s"])


def test_bench_cli_errors_are_one_line(capsys):
    assert bench.run_cli(lambda: bench.main(["--batch-rays=0"])) == 2
    assert bench.run_cli(lambda: bench.main(["--model=mlp"])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_bench_skip_rows_price_the_machinery_with_every_cell_occupied():
    """The skip row prices the machinery, not carving's savings: carving empties, before the first step, the cells
    the procedural scene's black background sees through, so the bench's grid is not carved."""
    on = bench.variant_config("nerf", None, compiled=False, amp=False, batch_rays=64, chunk_points=None, skip=True)
    off = bench.variant_config("nerf", None, compiled=False, amp=False, batch_rays=64, chunk_points=None, skip=False)
    assert on.skip and not off.skip and not on.occ_carve
    assert (on.n_importance, on.n_samples) == (off.n_importance, off.n_samples)  # the same points either way
