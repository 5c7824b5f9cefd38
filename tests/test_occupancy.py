"""Empty-space skipping: the occupancy grid's update, lookup and carving, and renders with and without it."""

import math
import os
from dataclasses import replace

import pytest
import torch

import assembly
import train
from dataset import load_views, split_views, synthetic_scene, views_from_arrays
from occupancy import OccupancyGrid
from renderer import VolumeRenderer, get_rays, render_image
from samplers import OccupancyGridSampler, StratifiedSampler
from utils import Dist, load_checkpoint


def cell_of(grid: OccupancyGrid, i: int, j: int, k: int) -> int:
    return (i * grid.resolution + j) * grid.resolution + k


def test_update_marks_exactly_the_cells_a_hand_made_density_fills():
    # 4^3 cells over [-1, 1]^3: each 0.5 wide. Density 100 in cells (1, 2, 3) and (0, 0, 0), 0 elsewhere.
    grid = OccupancyGrid(resolution=4, bound=1.0, threshold=0.01)
    dense = {cell_of(grid, 1, 2, 3), cell_of(grid, 0, 0, 0)}

    def density_fn(points):
        index, _ = grid.cell_index(points)
        return torch.tensor([100.0 if int(c) in dense else 0.0 for c in index])

    # step 0.1: one step of density sigma is 1 - exp(-0.1 sigma) opaque; > 0.01 <=> sigma > -ln(0.99)/0.1 = 0.1005
    assert grid.density_threshold(0.1) == pytest.approx(0.10050, abs=1e-5)
    grid.update(density_fn, 0.1, torch.Generator().manual_seed(0))
    assert set(grid.occupied.nonzero().squeeze(1).tolist()) == dense
    # the EMA keeps max(0.95 * old, new): one refresh of an emptied field leaves 95, still occupied
    grid.update(lambda p: torch.zeros(p.shape[0]), 0.1, torch.Generator().manual_seed(1))
    assert grid.density[cell_of(grid, 1, 2, 3)] == pytest.approx(95.0)
    assert set(grid.occupied.nonzero().squeeze(1).tolist()) == dense
    # points: the centre of cell (1, 2, 3) is (-0.25, 0.25, 0.75); just outside the box is never occupied
    points = torch.tensor([[-0.25, 0.25, 0.75], [-0.26, 0.3, 0.9], [0.25, 0.25, 0.75], [-0.9, -0.9, -0.9],
                           [-1.01, -0.9, -0.9], [0.0, 0.0, 3.0]])
    assert grid.is_occupied(points).tolist() == [True, True, False, True, False, False]


def test_cell_centres_invert_cell_index():
    grid = OccupancyGrid(resolution=5, bound=1.5)
    index = torch.arange(125)
    assert torch.equal(grid.cell_index(grid.cell_centres(index))[0], index)


class BoxField(torch.nn.Module):
    """Density 5 inside the box [-0.5, 0.5]^3 (raw -30, density ~1e-13, outside), colour varying with position."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, points):
        inside = (points.abs() <= 0.5).all(dim=-1, keepdim=True)
        sigma_raw = torch.where(inside, torch.tensor(math.log(math.expm1(5.0))), torch.tensor(-30.0))
        return torch.cat([torch.sin(3 * points) * 2, sigma_raw], dim=-1) + self.dummy


def random_rays(n: int, gen: torch.Generator):
    """Unit-direction rays from a sphere of radius 4 towards points near the origin: [n, 3] each."""
    origin = torch.nn.functional.normalize(torch.randn(n, 3, generator=gen), dim=-1) * 4
    target = (torch.rand(n, 3, generator=gen) - 0.5) * 1.6
    return origin, torch.nn.functional.normalize(target - origin, dim=-1)


def test_skipping_renders_the_known_scene_as_plain_sampling_does():
    field = BoxField()
    plain = VolumeRenderer(field, StratifiedSampler(2.0, 6.0, 64))
    # 8 cells over [-1, 1]: the box's faces at +-0.5 lie on cell faces, so occupancy is exactly the box
    skipping = VolumeRenderer(field, OccupancyGridSampler(2.0, 6.0, 64, OccupancyGrid(8, 1.0)), chunk_points=512)
    skipping.update_sampler(0, torch.Generator().manual_seed(0))
    expected = torch.zeros(8, 8, 8, dtype=torch.bool)
    expected[2:6, 2:6, 2:6] = True
    assert torch.equal(skipping.occupancy.occupied.view(8, 8, 8), expected)

    gen = torch.Generator().manual_seed(1)
    rays_o, rays_d = random_rays(300, gen)
    samples = [sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(2))
               for sampler in (plain.sampler, skipping.sampler)]
    torch.testing.assert_close(samples[0].t, samples[1].t, rtol=0, atol=0)  # the same jitter, from the same seed
    a, b = plain(rays_o, rays_d, samples[0]), skipping(rays_o, rays_d, samples[1])
    assert float(a.acc.detach().max()) > 0.9 and float(a.acc.detach().min()) < 1e-6  # some rays hit the box, some miss it
    for x, y in ((a.rgb, b.rgb), (a.depth, b.depth), (a.acc, b.acc)):
        assert torch.allclose(x, y, atol=1e-6), float((x - y).abs().max())
    counts = samples[1].counts()
    assert counts.sum() < 0.25 * 300 * 64  # and far fewer field evaluations
    # gradients flow to the field's parameters through the packed evaluation
    b.rgb.sum().backward()
    assert field.dummy.grad is not None and torch.isfinite(field.dummy.grad)


class DirectionBoxField(BoxField):
    """BoxField's density; colour (d + 1) / 2 of the viewing direction d it is given, wherever the point is."""

    viewdirs = True  # the renderer calls it as field(points, dirs)

    def forward(self, points, dirs):
        raw = super().forward(points)
        return torch.cat([torch.logit((dirs + 1) / 2), raw[..., 3:]], dim=-1)


def test_the_renderer_gives_the_field_the_direction_of_each_sample_it_evaluates():
    """A field whose colour is (d + 1) / 2 of the direction d it is given renders every ray in the colour
    acc * (d + 1) / 2 of that ray's normalised direction: with skipping (the occupied samples of many rays
    packed together, in several chunks), without it, and with importance samples."""
    field = DirectionBoxField()
    gen = torch.Generator().manual_seed(1)
    rays_o, rays_d = random_rays(300, gen)
    rays_d = rays_d * (0.5 + torch.rand(300, 1, generator=gen))  # any length: the field sees unit directions
    # a hand-made ray through the box's centre along (0.6, 0, -0.8): colour (0.8, 0.5, 0.1)
    rays_o[0], rays_d[0] = torch.tensor([-2.4, 0.0, 3.2]), torch.tensor([0.6, 0.0, -0.8])
    skipping = VolumeRenderer(field, OccupancyGridSampler(2.0, 6.0, 64, OccupancyGrid(8, 1.0)), chunk_points=512)
    skipping.update_sampler(0, torch.Generator().manual_seed(0))  # the density refresh, through the same field
    assert skipping.occupancy.occupied.sum() == 4**3  # the box, as for BoxField
    expected = (torch.nn.functional.normalize(rays_d, dim=-1) + 1) / 2
    assert skipping.sampler.sample(rays_o, rays_d).counts().sum() < 0.25 * 300 * 64  # few samples evaluated
    for renderer in (skipping, VolumeRenderer(field, StratifiedSampler(2.0, 6.0, 64)),
                     VolumeRenderer(field, StratifiedSampler(2.0, 6.0, 32, 16))):
        with torch.no_grad():
            out = renderer(rays_o, rays_d, renderer.sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(2)))
        assert float(out.acc.max()) > 0.9 and float(out.acc.min()) < 1e-6  # rays that hit the box, rays that miss
        torch.testing.assert_close(out.rgb, out.acc[:, None] * expected, atol=1e-5, rtol=0)
        assert float(out.acc[0]) > 0.99
        torch.testing.assert_close(out.rgb[0] / out.acc[0], torch.tensor([0.8, 0.5, 0.1]), atol=1e-5, rtol=0)


def test_carving_keeps_every_surface_point_and_empties_most_of_the_box():
    views = views_from_arrays(synthetic_scene(n_views=12, size=32, seed=3))
    grid = OccupancyGrid(32, 1.5)
    grid.carve(views.see_through(views.images), views.poses, views.cameras, near=2.0)
    assert 0.02 < grid.occupied_fraction() < 0.5
    for i in range(len(views)):  # ground-truth surface points, from the scene's own depth maps
        rays_o, rays_d = get_rays(views.height, views.width, views.focal, views.poses[i])
        hit = views.depth[i] > 0
        surface = rays_o[hit] + views.depth[i][hit][:, None] * rays_d[hit]
        assert grid.is_occupied(surface).all()


def test_carving_a_view_that_is_all_foreground_carves_nothing():
    views = views_from_arrays(synthetic_scene(n_views=4, size=16, seed=0))
    grid = OccupancyGrid(16, 1.5)
    grid.carve(torch.zeros(views.images.shape[:3], dtype=torch.bool), views.poses, views.cameras, near=2.0)
    assert grid.occupied_fraction() == 1.0


@pytest.mark.slow
def test_training_with_skipping_learns_and_checkpoints_its_grid(tiny_cfg):
    cfg = replace(tiny_cfg, steps=80, lr=5e-3, occ_update_every=8, ckpt_every=40)
    before = train.train(replace(cfg, steps=1, out_dir=cfg.out_dir + "-1"))["val_psnr"]
    summary = train.train(cfg)
    assert summary["val_psnr"] > before + 2.0
    ckpt = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))
    assert ckpt["occupancy"]["updates"] == 10  # steps 0, 8, ..., 72
    renderer, _ = assembly.load_trained(os.path.join(cfg.run_dir, "ckpt.pt"))
    assert torch.equal(renderer.occupancy.occupied, ckpt["occupancy"]["occupied"])
    # skipping evaluates fewer points than the plain sampling of every ray (train_points_per_s counts them)
    assert summary["train_points_per_s"] > 0


def test_a_checkpoint_from_before_skipping_loads_without_a_grid(tiny_cfg, tmp_path):
    cfg = replace(tiny_cfg, steps=2)
    train.train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))
    old_keys = ("skip", "scale", "occ_resolution", "occ_bound", "occ_update_every", "occ_threshold", "occ_carve")
    ckpt["config"] = {k: v for k, v in ckpt["config"].items() if k not in old_keys}
    del ckpt["occupancy"]
    torch.save(ckpt, tmp_path / "old.pt")
    renderer, old_cfg = assembly.load_trained(str(tmp_path / "old.pt"))
    assert renderer.occupancy is None and old_cfg.skip is False
    views = split_views(load_views(cfg.data), cfg.val_views)[1]
    rays_o, rays_d = get_rays(views.height, views.width, views.focal, views.poses[0])
    assert render_image(renderer, rays_o, rays_d).rgb.shape == (views.height, views.width, 3)


@pytest.mark.slow
@pytest.mark.parametrize("model,viewdirs", [pytest.param("nerf", False, id="nerf"),
                                            pytest.param("bitnerf", False, id="bitnerf"),
                                            pytest.param("nerf", True, id="nerf-viewdirs"),
                                            pytest.param("bitnerf", True, id="bitnerf-viewdirs")])
def test_compiled_field_with_skipping_has_no_graph_breaks(tiny_cfg, model, viewdirs):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = replace(tiny_cfg, model=model, compile=True, chunk_points=1024, viewdirs=viewdirs)
    trainer = train.Trainer(cfg, assembly.build_renderer(cfg, torch.device("cpu")), Dist(), torch.device("cpu"))
    views = split_views(load_views(cfg.data), 2)[0]
    trainer.raw.occupancy.carve(views.see_through(views.images), views.poses, views.cameras, trainer.raw.sampler.near)
    trainer.raw.update_sampler(0, torch.Generator().manual_seed(0))  # the no-grad graph
    from dataset import RayBatcher

    batch = RayBatcher(views, "ray", 256, 0).batch(0)
    loss, _ = trainer.step(*batch, torch.Generator().manual_seed(0), 1e-3)  # the training graph
    assert torch.isfinite(loss)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 2  # the field went through dynamo, not around it


@pytest.mark.slow
def test_exported_bitnerf_keeps_the_grid_and_renders_as_the_checkpoint(tiny_cfg, tmp_path):
    from export import export_checkpoint

    cfg = replace(tiny_cfg, model="bitnerf", steps=20, lr=5e-3, occ_update_every=5)
    train.train(cfg)
    ckpt_path = os.path.join(cfg.run_dir, "ckpt.pt")
    export_checkpoint(ckpt_path, str(tmp_path / "m.bitnerf"), floats="float32")
    trained, _ = assembly.load_trained(ckpt_path)
    exported, _ = assembly.load_trained(str(tmp_path / "m.bitnerf"))
    assert torch.equal(exported.occupancy.occupied, trained.occupancy.occupied)
    assert 0 < exported.occupancy.occupied_fraction() < 1
    views = split_views(load_views(cfg.data), cfg.val_views)[1]
    rays_o, rays_d = get_rays(views.height, views.width, views.focal, views.poses[0])
    a, b = render_image(trained, rays_o, rays_d), render_image(exported, rays_o, rays_d)
    assert torch.allclose(a.rgb, b.rgb, atol=1e-4) and torch.equal(a.acc == 0, b.acc == 0)


def test_the_grid_sampler_owns_its_refresh_schedule():
    sampler = OccupancyGridSampler(2.0, 6.0, 64, OccupancyGrid(8, 1.0), update_every=4)
    calls = []
    for step in range(10):
        sampler.update_every_n_steps(step, lambda p: calls.append(step) or torch.zeros(p.shape[0]),
                                     torch.Generator().manual_seed(step))
    assert calls == [0, 4, 8] and int(sampler.grid.updates) == 3
    plain = StratifiedSampler(2.0, 6.0, 64)  # nothing to refresh
    plain.update_every_n_steps(0, lambda p: pytest.fail("a stratified sampler asked for density"), None)


def test_a_training_step_samples_once(tiny_cfg, monkeypatch):
    trainer = train.Trainer(tiny_cfg, assembly.build_renderer(tiny_cfg, torch.device("cpu")), Dist(),
                            torch.device("cpu"))
    calls = []
    real = type(trainer.raw.sampler).sample
    counted = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    monkeypatch.setattr(type(trainer.raw.sampler), "sample", counted)
    views = split_views(load_views(tiny_cfg.data), 2)[0]
    from dataset import RayBatcher

    trainer.step(*RayBatcher(views, "ray", 256, 0).batch(0), torch.Generator().manual_seed(0), 1e-3)
    assert len(calls) == 1 and trainer.last_points < 256 * tiny_cfg.n_samples  # one draw, cut by the grid
