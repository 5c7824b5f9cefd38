"""Real captures: frames without images, unbounded scenes (contraction, disparity sampling, the grid over the
contracted space), sizes chosen for the machine, the hold-out protocols, and a run's outputs surviving a failure
while writing its pictures."""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

import train
from assembly import build_renderer, load_trained
from cameras import sweep_poses
from configs import Config, ConfigError, scene_bounds
from dataset import load_views, open_data, resolve_scene, train_val_views, write_synthetic_capture
from renderer import VolumeRenderer, render_image, render_rays
from occupancy import OccupancyGrid
from samplers import OccupancyGridSampler, StratifiedSampler, contract, lindisp_samples, lindisp_t
from utils import DataError, even_sized, load_checkpoint


# --- the contraction ---------------------------------------------------------------------------------------------
def reference_contract(x: np.ndarray, radius: float) -> np.ndarray:
    """mip-NeRF 360's contraction in float64, one point at a time."""
    out = []
    for p in x.reshape(-1, 3):
        n = np.linalg.norm(p)
        out.append(p if n <= radius else (2 - radius / n) * radius * p / n)
    return np.array(out).reshape(x.shape)


def test_contraction_is_the_identity_inside_and_squeezes_the_rest_into_twice_the_radius():
    # hand-computed: R = 2, x = (0, 0, 8): |x| = 8, (2 - 2/8) * 2 * (0, 0, 1) = (0, 0, 3.5)
    assert contract(torch.tensor([[0.0, 0.0, 8.0]], dtype=torch.float64), 2.0).tolist() == [[0.0, 0.0, 3.5]]
    # R = 1, x = (2, 0, 0): (2 - 1/2) * (1, 0, 0) = (1.5, 0, 0); x = (0.3, -0.4, 0) inside: unchanged
    assert contract(torch.tensor([[2.0, 0.0, 0.0], [0.3, -0.4, 0.0]], dtype=torch.float64), 1.0).tolist() == [
        [1.5, 0.0, 0.0], [0.3, -0.4, 0.0]]
    x = torch.randn(2000, 3, dtype=torch.float64) * torch.logspace(-1, 4, 2000, dtype=torch.float64)[:, None]
    y = contract(x, 1.7)
    np.testing.assert_allclose(y.numpy(), reference_contract(x.numpy(), 1.7), rtol=1e-12, atol=1e-12)
    assert float(y.norm(dim=-1).max()) < 2 * 1.7
    # continuous across the sphere |x| = R, and monotone in |x| along a ray from the centre
    u = torch.nn.functional.normalize(torch.randn(50, 3, dtype=torch.float64), dim=-1)
    inside, outside = contract(u * (1.7 - 1e-9), 1.7), contract(u * (1.7 + 1e-9), 1.7)
    assert float((inside - outside).norm(dim=-1).max()) < 1e-8
    radii = contract(u[:1] * torch.linspace(0.1, 1e3, 500, dtype=torch.float64)[:, None], 1.7).norm(dim=-1)
    assert bool((radii.diff() > 0).all())


def test_lindisp_samples_are_even_in_depth_then_even_in_disparity():
    near, mid, far = 0.25, 4.0, 40.0
    assert lindisp_t(torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64), near, mid, far).tolist() == \
        pytest.approx([near, (near + mid) / 2, mid, 2 / (1 / mid + 1 / far), far], rel=1e-12)
    t, delta = lindisp_samples(3, 8, near, mid, far)
    assert t.shape == delta.shape == (3, 8)
    # bins: 4 of (4 - 0.25) / 4 = 0.9375 in depth, then 4 equal steps of disparity from 1/4 to 1/40
    assert delta[0, :4].tolist() == pytest.approx([0.9375] * 4)
    disparity_edges = 1 / mid + (1 / far - 1 / mid) * torch.arange(5) / 4
    assert delta[0, 4:].tolist() == pytest.approx(torch.diff(1 / disparity_edges).tolist(), rel=1e-5)
    assert float(delta[0].sum()) == pytest.approx(far - near, rel=1e-6)
    jitter = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    t_j, _ = lindisp_samples(3, 8, near, mid, far, jitter)
    edges = lindisp_t(torch.linspace(0, 1, 9), near, mid, far)
    assert bool(((t_j >= edges[:-1] - 1e-6) & (t_j <= edges[1:] + 1e-6)).all())  # each sample in its own bin


def test_unbounded_sampler_evaluates_the_field_at_contracted_points():
    seen = []

    def field(points):
        seen.append(points)
        return torch.zeros(*points.shape[:-1], 4)

    sampler = StratifiedSampler(0.2, 40.0, 16, contraction=4.0)
    renderer = VolumeRenderer(field, sampler)
    rays_o = torch.tensor([[0.0, 0.0, 3.0]])
    rays_d = torch.tensor([[0.0, 0.0, -1.0]])
    renderer(rays_o, rays_d)
    t = sampler.sample(rays_o, rays_d).t
    world = rays_o[:, None] + t[..., None] * rays_d[:, None]
    assert torch.equal(seen[0], contract(world, 4.0).reshape(-1, 3))
    assert float(seen[0].norm(dim=-1).max()) < 8.0 and float(world.norm(dim=-1).max()) > 20


# --- bounded data: exactly today's renders ----------------------------------------------------------------------
def test_bounded_renders_are_bit_identical_to_plain_stratified_rendering():
    torch.manual_seed(0)
    cfg = Config(width=16, depth=2, skip_layer=1, n_freqs=4, n_samples=24, skip=False)
    renderer = build_renderer(cfg, torch.device("cpu"))
    assert scene_bounds(cfg) == (2.0, 6.0, 1.5, 0.0)
    explicit = build_renderer(replace(cfg, near=2.0, far=6.0, occ_bound=1.5, scene="bounded"), torch.device("cpu"),
                              renderer.field.state_dict())
    rays_o = torch.randn(64, 3) * 0.1 + torch.tensor([0.0, 0.0, 4.0])
    rays_d = torch.nn.functional.normalize(torch.randn(64, 3) * 0.2 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    jitter = torch.rand(64, 24, generator=torch.Generator().manual_seed(1))
    reference = render_rays(renderer.field, rays_o, rays_d, 2.0, 6.0, 24, jitter=jitter)  # the pure function
    ours = renderer(rays_o, rays_d, renderer.sampler.sample(rays_o, rays_d, torch.Generator().manual_seed(1)))
    assert torch.equal(ours.rgb, reference.rgb) and torch.equal(ours.depth, reference.depth)
    assert torch.equal(explicit(rays_o, rays_d).rgb, renderer(rays_o, rays_d).rgb)


# --- captures: loading, the scene's extent, sizes -----------------------------------------------------------------
@pytest.fixture(scope="module")
def capture(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("data") / "capture")
    write_synthetic_capture(folder, n_views=12, width=45, height=33)  # odd sizes on purpose
    return folder


def _without_images(folder: str, names: list[str], tmp_path) -> str:
    import shutil

    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy)
    for name in names:
        os.remove(os.path.join(copy, name))
    return copy


def test_frames_without_an_image_are_skipped_with_one_warning(capture, tmp_path, capsys):
    copy = _without_images(capture, [f"images/frame_{i:05d}.jpg" for i in (1, 4, 5, 9)], tmp_path)
    capsys.readouterr()
    views = load_views(copy)
    out = capsys.readouterr().out.splitlines()
    assert len(views) == 8
    assert out == [f"warning: {copy}/transforms.json: skipped 4 of 12 frames whose image file is absent "
                   "(images/frame_00001.jpg, images/frame_00004.jpg, images/frame_00005.jpg and 1 more)"]
    full = load_views(capture)
    kept = [i for i in range(12) if i not in (1, 4, 5, 9)]
    assert torch.equal(views.images, full.images[kept])


def test_a_capture_without_images_is_one_line_and_exit_2(capture, tmp_path, capsys):
    copy = _without_images(capture, [f"images/frame_{i:05d}.jpg" for i in range(12)], tmp_path)
    assert train.main(argv=[f"--data={copy}", "--wandb=disabled", f"--out_dir={tmp_path / 'run'}"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "0 of its 12 frames have an image file" in err[0], err
    assert not os.path.exists(tmp_path / "run")


def test_a_capture_is_unbounded_with_its_extent_from_the_cameras_and_aabb_scale(capture, tmp_path):
    cfg, views, _, phrase = train_val_views(replace(Config(), data=capture, val_views=2))
    radius = float(views.poses[:, :3, 3].norm(dim=-1).max())
    assert cfg.scene == "unbounded" and cfg.downscale == 1  # 45 x 33 is small enough already
    # aabb_scale 1: far = R (1 + sqrt(3)), from a camera across the farthest corner of the box
    assert (cfg.near, cfg.far, cfg.occ_bound) == pytest.approx(
        (0.05 * radius, radius * (1 + math.sqrt(3)), 2 * radius), rel=1e-3)
    assert scene_bounds(cfg)[3] == pytest.approx(radius, rel=1e-3)
    assert "scene unbounded" in phrase and "(aabb_scale 1)" in phrase
    # an unbounded scene skips empty space with the proposal grid, a bounded one with the occupancy grid
    assert cfg.skip_with == "proposal" and "drawn from a 64^3 proposal grid" in phrase
    assert resolve_scene(replace(Config(), scene="bounded"), views)[0].skip_with == "grid"
    assert resolve_scene(replace(Config(), skip_with="grid"), views)[0].skip_with == "grid"  # a flag wins
    # resolving a resolved config changes nothing (a hint never compounds); flags win over the data
    assert resolve_scene(cfg, views)[0] == cfg
    mine = resolve_scene(replace(cfg, far=0.0, near=0.5, scene="auto"), views)[0]
    assert (mine.near, mine.far) == (0.5, cfg.far)
    assert resolve_scene(replace(Config(), scene="bounded"), views)[0].far == 6.0
    with pytest.raises(ConfigError, match="scene=unbounded needs near, far and occ_bound"):
        scene_bounds(replace(Config(), scene="unbounded"))
    # the fast preset's voxel grid cannot hold a room: one line saying what to do instead
    with pytest.raises(ConfigError, match="cannot model an unbounded scene: train exp1 on it, or pass --scene=bounded"):
        resolve_scene(replace(Config(), model="grid", skip=False, compile=False), views)


def test_auto_downscale_bounds_the_longer_side_and_keeps_the_intrinsics(capture):
    source = open_data(capture, 0, max_side=16)  # 45 x 33 -> factor 3, cropped to 45 x 33 -> 15 x 11
    full = open_data(capture, 1)
    views = source.all
    assert source.downscale == 3 and (views.width, views.height) == (15, 11)
    assert torch.allclose(views.cameras.fx, full.all.cameras.fx / 3)
    assert torch.allclose(views.cameras.cx, full.all.cameras.cx / 3)
    block = full.all.images[0, :3, :3].double().mean(dim=(0, 1)).round().to(torch.uint8)
    assert torch.equal(views.images[0, 0, 0], block)
    with pytest.raises(DataError, match="not divisible by --downscale=2"):
        open_data(capture, 2)  # asked for: refused rather than cropped


def test_holdout_every_is_the_llff_protocol(capture):
    source = open_data(capture)
    assert source.numbers("val", 2, holdout_every=8).tolist() == [0, 8]
    assert source.numbers("train", 2, holdout_every=8).tolist() == [1, 2, 3, 4, 5, 6, 7, 9, 10, 11]
    with pytest.raises(DataError, match="holdout_every=20 must be between 2 and 12"):
        source.numbers("val", 2, holdout_every=20)


def test_the_video_follows_the_cameras_trajectory():
    # a hand-held capture in file order: a spiral from distance 5 at azimuth 0 to 3 at 90 degrees, climbing from
    # z = 0 to 1. The path goes from the first camera's end of the track to the last's and back, stays within
    # the track's reach (never closer than 3 or farther than 5), and every frame looks at the centre, upright
    from cameras import look_at

    angles, radii = np.radians(np.linspace(0, 90, 10)), np.linspace(5.0, 3.0, 10)
    arc = [look_at(np.array([r * math.cos(a), r * math.sin(a), z]))
           for a, r, z in zip(angles, radii, np.linspace(0.0, 1.0, 10))]
    path = sweep_poses(torch.tensor(np.stack(arc)), 40)
    p = path[:, :3, 3].double()
    start, turn = p[0].numpy(), p[20].numpy()  # frame 20: the far end
    spacing = np.linalg.norm(arc[1][:3, 3] - arc[0][:3, 3])  # ~0.8; the smoothing pulls each end in by ~1
    assert np.linalg.norm(start - arc[0][:3, 3]) < 1.5 * spacing > np.linalg.norm(turn - arc[-1][:3, 3])
    assert torch.allclose(p[1:20], p[21:].flip(0), atol=1e-5)  # there and back along the same track
    assert 2.9 <= float(p.norm(dim=-1).min()) and float(p.norm(dim=-1).max()) <= 5.1
    forward = -path[:, :3, 2].double()
    assert torch.allclose(forward, -p / p.norm(dim=-1, keepdim=True), atol=1e-5)  # looking at the centre
    assert bool((path[:, 2, 1] > 0).all())  # camera up has a +z component: upright


def test_odd_frames_are_padded_to_even_for_h264():
    frame = np.arange(3 * 5 * 3, dtype=np.uint8).reshape(3, 5, 3)
    padded = even_sized(frame)
    assert padded.shape == (4, 6, 3) and np.array_equal(padded[:3, :5], frame)
    assert np.array_equal(padded[3, :5], frame[2]) and np.array_equal(padded[:3, 5], frame[:, 4])
    assert even_sized(padded) is padded


# --- whole runs -------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_an_odd_sized_capture_trains_learns_and_writes_its_videos(capture, tiny_cfg):
    """The unbounded capture (45 x 33, distorted, a real background) learns: the held-out PSNR climbs well above
    the first step's, and the videos of an odd size are written."""
    cfg = replace(tiny_cfg, data=capture, val_views=2, steps=150, lr=5e-3, occ_update_every=8, n_samples=32,
                  video=True, video_frames=3)
    first = train.train(replace(cfg, steps=1, video=False, out_dir=cfg.out_dir + "-1"))["val_psnr"]
    summary = train.train(cfg)
    assert summary["val_psnr"] > first + 3.0, (first, summary["val_psnr"])
    saved = json.load(open(os.path.join(cfg.out_dir, "config.json")))
    assert saved["scene"] == "unbounded" and saved["far"] > 6 and saved["skip_with"] == "proposal"
    for name in ("video_rgb.mp4", "video_depth.mp4", "summary.json", "val/view000.png"):
        assert os.path.getsize(os.path.join(cfg.out_dir, name)) > 0, name
    # render.py follows the cameras' track too, at the views' own (odd) size
    import imageio.v3 as iio

    import render

    assert render.main(["--ckpt", os.path.join(cfg.out_dir, "ckpt.pt"), "--frames", "2", "--stills", "1"]) == 0
    video = iio.imread(os.path.join(cfg.out_dir, "render", "video_rgb.mp4"))
    assert video.shape[1:3] == (34, 46)  # 33 x 45, padded to even sides


def test_a_failing_video_writer_loses_nothing(capture, tiny_cfg, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("libx264 refused the frames\nsecond line")

    monkeypatch.setattr(train, "write_orbit", broken)
    cfg = replace(tiny_cfg, data=capture, val_views=2, steps=2, video=True, video_frames=2)
    summary = train.train(cfg)
    out = capsys.readouterr().out
    assert "warning: the videos were not written (RuntimeError: libx264 refused the frames); summary.json" in out
    assert ", amp off, compile" in out  # the run line names AMP as the summary does
    assert json.load(open(os.path.join(cfg.out_dir, "summary.json")))["steps"] == summary["steps"] == 2
    assert os.path.exists(os.path.join(cfg.out_dir, "ckpt.pt"))
    assert os.path.exists(os.path.join(cfg.out_dir, "val", "view000.png"))


# --- LLFF --------------------------------------------------------------------------------------------------------
def write_llff(folder: str, n_side: int = 3, width: int = 32, height: int = 24) -> np.ndarray:
    """A forward-facing LLFF folder of the procedural scene in front of a far, uniform backdrop: n_side^2 cameras
    on a small grid at z = 4 looking along -z (OpenGL c2w poses, returned), written in LLFF's [down, right,
    back] columns with bounds 2 .. 8."""
    import imageio.v3 as iio

    from cameras import pinhole_directions
    from dataset import _trace

    focal = 1.2 * width
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    py, px = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    dirs = pinhole_directions(px, py, focal, focal, width / 2, height / 2).numpy().reshape(-1, 3)
    rows, poses = [], []
    for k, (x, y) in enumerate((x, y) for y in np.linspace(-0.4, 0.4, n_side) for x in np.linspace(-0.5, 0.5, n_side)):
        c2w = np.eye(4)
        c2w[:3, 3] = [x, y, 4.0]
        rgb, depth = _trace(np.broadcast_to(c2w[:3, 3], dirs.shape), dirs)
        rgb = np.where(depth[:, None] > 0, rgb, [0.6, 0.5, 0.3]).reshape(height, width, 3)
        iio.imwrite(os.path.join(folder, "images", f"img{k:03d}.png"), np.round(rgb * 255).astype(np.uint8))
        right, up, back = c2w[:3, 0], c2w[:3, 1], c2w[:3, 2]
        matrix = np.stack([-up, right, back, c2w[:3, 3], [height, width, focal]], axis=1)  # [3, 5]
        rows.append(np.concatenate([matrix.reshape(-1), [2.0, 8.0]]))
        poses.append(c2w)
    np.save(os.path.join(folder, "poses_bounds.npy"), np.stack(rows))
    return np.stack(poses)


def test_an_llff_folder_loads_as_an_unbounded_forward_facing_capture(tmp_path):
    written = write_llff(str(tmp_path / "llff"))
    cfg, views, val, phrase = train_val_views(replace(Config(), data=str(tmp_path / "llff"), val_views=1))
    assert len(views) == 8 and len(val) == 1 and cfg.scene == "unbounded" and cfg.downscale == 1
    # normalised: the cameras look at the point sqrt(2 * 8) = 4 ahead of them (the origin here), 4 away on average
    p = torch.cat([views.poses, val.poses])[:, :3, 3].double()
    assert float(p.norm(dim=-1).mean()) == pytest.approx(4.0, rel=1e-4)
    forward = -views.poses[:, :3, 2]
    assert torch.allclose(forward, forward[:1].expand_as(forward), atol=1e-5)  # still parallel
    assert float((forward[0] @ -p.mean(dim=0).float()) / p.mean(dim=0).norm()) == pytest.approx(1.0, abs=1e-4)
    # one scale for all: camera spacing (0.5 in the file) times 4 / mean distance (about 4) in the file
    spacing = float((p[1] - p[0]).norm())
    assert spacing == pytest.approx(0.5 * 4.0 / np.linalg.norm(written[:, :3, 3] - [0, 0, 0], axis=1).mean(),
                                    rel=1e-3)
    # far bound 8 in file units -> aabb_scale 8 * scale / 4
    assert "scene unbounded" in phrase and cfg.far > 8 * spacing / 0.5


@pytest.mark.slow
def test_an_llff_scene_trains(tmp_path, tiny_cfg):
    write_llff(str(tmp_path / "llff"))
    cfg = replace(tiny_cfg, data=str(tmp_path / "llff"), val_views=1, steps=200, lr=5e-3, n_samples=32,
                  occ_update_every=8)
    first = train.train(replace(cfg, steps=1, out_dir=cfg.out_dir + "-1"))["val_psnr"]
    assert train.train(cfg)["val_psnr"] > first + 3.0


def test_an_unbounded_grid_weighs_far_density_by_the_world_length_of_its_cells():
    # R = 2: a contracted point at |x| = 3 is at world radius R^2 / (2R - 3) = 4, where one contracted unit holds
    # (4 / 2)^2 = 4 world units; inside R, 1; at |x| = 3.9 the world radius 40 is past far = 10: capped, (10 / 2)^2
    sampler = OccupancyGridSampler(0.1, 10.0, 16, OccupancyGrid(8, 4.0), contraction=2.0)
    points = torch.tensor([[0.0, 0.0, 1.0], [3.0, 0.0, 0.0], [0.0, 3.9, 0.0]])
    torch.testing.assert_close(sampler.stretch(points), torch.tensor([1.0, 4.0, 25.0]))
    # a haze half as dense as the grid's threshold: empty near the cameras, as opaque as a wall far out (cells of
    # size 1: the one at 3.5 is sampled in [3, 4), stretched at least 4 times)
    haze = sampler.grid.density_threshold(sampler.step_size) / 2
    sampler.refresh(lambda p: torch.full(p.shape[:1], haze), torch.Generator().manual_seed(0))
    assert sampler.grid.is_occupied(torch.tensor([[0.5, 0.5, 0.5], [3.5, 0.5, 0.5], [0.5, -3.5, 0.5]])).tolist() == [
        False, True, True]


def test_wandb_gets_the_validation_images_and_the_videos(tiny_cfg, monkeypatch):
    """With W&B on, the run logs its scalars, then one panel of validation images and each orbit video (a fake
    wandb module records what it is given: no network, no files of W&B's)."""
    import sys
    import types

    logged = []
    fake = types.SimpleNamespace(
        init=lambda **kw: types.SimpleNamespace(id="run1", log=lambda d, step=None: logged.append(d),
                                                finish=lambda: logged.append("finish")),
        Image=lambda im, caption: ("image", im.shape, caption), Video=lambda path, fps, format: ("video", path))
    module = types.ModuleType("wandb")
    module.__dict__.update(vars(fake))
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    cfg = replace(tiny_cfg, wandb="offline", steps=2, video=True, video_frames=2)
    train.train(cfg)
    panels = [d["val"] for d in logged if isinstance(d, dict) and "val" in d]
    assert len(panels) == 1 and len(panels[0]) == cfg.val_views and panels[0][0][0] == "image"
    videos = [d for d in logged if isinstance(d, dict) and "video_rgb" in d]
    assert len(videos) == 1 and videos[0]["video_rgb"] == ("video", os.path.join(cfg.run_dir, "video_rgb.mp4"))
    assert any(isinstance(d, dict) and "loss" in d for d in logged) and logged[-1] == "finish"


# --- the proposal sampler on a capture: resumption and export --------------------------------------------------------
@pytest.mark.slow
def test_a_proposal_run_resumes_exactly(capture, tiny_cfg, tmp_path):
    """2 steps + resume + 2 steps == 4 steps, bitwise: the proposal grid and its optimizer state are saved."""
    cfg = replace(tiny_cfg, data=capture, val_views=2, steps=4, ckpt_every=2, keep_ckpts=3)
    train.train(cfg)
    resumed = replace(cfg, out_dir=str(tmp_path / "resumed"))
    os.makedirs(resumed.run_dir)
    shutil.copy(os.path.join(cfg.run_dir, "ckpt_step0000002.pt"), os.path.join(resumed.run_dir, "ckpt.pt"))
    train.train(resumed)
    a, b = (load_checkpoint(os.path.join(c.run_dir, "ckpt.pt")) for c in (cfg, resumed))
    assert a["config"]["skip_with"] == "proposal" and a["occupancy"] is None
    assert not torch.equal(a["proposal"]["grid"], load_checkpoint(
        os.path.join(cfg.run_dir, "ckpt_step0000002.pt"))["proposal"]["grid"])  # it learns
    assert torch.equal(a["proposal"]["grid"], b["proposal"]["grid"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert len(a["optimizer"]["state"]) == len(list(load_trained(os.path.join(cfg.run_dir, "ckpt.pt"))[0].parameters()))


@pytest.mark.slow
def test_an_exported_proposal_bitnerf_renders_like_the_qat_model(capture, tiny_cfg, tmp_path):
    import export

    cfg = replace(tiny_cfg, data=capture, val_views=2, model="bitnerf", steps=3)
    train.train(cfg)
    ckpt = os.path.join(cfg.run_dir, "ckpt.pt")
    qat, _ = load_trained(ckpt)
    out = str(tmp_path / "f32.bitnerf")
    assert export.main(["--ckpt", ckpt, "--out", out, "--floats", "float32"]) == 0
    exported, saved = load_trained(out)
    assert saved.skip_with == "proposal"
    assert torch.equal(exported.proposal.grid, qat.proposal.grid)
    rays_o = torch.randn(300, 3) + torch.tensor([0.0, 0.0, 3.0])
    rays_d = torch.nn.functional.normalize(torch.randn(300, 3) * 0.3 + torch.tensor([0.0, 0.0, -1.0]), dim=-1)
    assert torch.equal(render_image(qat, rays_o, rays_d, 128).rgb, render_image(exported, rays_o, rays_d, 128).rgb)
