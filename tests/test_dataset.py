"""Loaders (Blender scene folders, instant-ngp / nerfstudio captures), the camera model, backgrounds and batches,
on files the tests write themselves."""

import json
import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch

import evaluate
import train
from cameras import Cameras, distort, normalise_capture, undistort
from conftest import sphere_poses, trace_rays, write_blender_scene
from dataset import Background, RayBatcher, Views, load_views, open_data, train_val_views, write_synthetic_capture
from occupancy import OccupancyGrid
from renderer import VolumeRenderer, composite
from samplers import StratifiedSampler
from scene_files import read_image
from utils import DataError

# --- the camera model ---------------------------------------------------------------------------------------------


def test_off_centre_pinhole_ray_hand_computed():
    # 4x2 image, fx 2, fy 4, principal point (1.5, 0.5): pixel (column 3, row 1) has its centre at (3.5, 1.5):
    # x = (3.5 - 1.5) / 2 = 1, y = (1.5 - 0.5) / 4 = 0.25 (down) -> camera direction (1, -0.25, -1).
    # Camera at (1, 2, 3) turned 90 degrees about z (x -> y, y -> -x): world direction (0.25, 1, -1).
    cams = Cameras(torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([1.5]), torch.tensor([0.5]), 2, 4)
    c2w = torch.tensor([[0.0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 3], [0, 0, 0, 1]])
    zero = torch.tensor([0])
    o, d = cams.rays(c2w[None], zero, torch.tensor([3.0]), torch.tensor([1.0]))
    torch.testing.assert_close(d[0], torch.tensor([0.25, 1.0, -1.0]))
    torch.testing.assert_close(o[0], torch.tensor([1.0, 2.0, 3.0]))
    # the pixel at the principal point looks straight down the axis; every image ray agrees with the per-pixel one
    _, d_all = cams.image_rays(torch.eye(4), 0)
    torch.testing.assert_close(d_all[1, 3], torch.tensor([1.0, -0.25, -1.0]))
    torch.testing.assert_close(cams.directions(zero, torch.tensor([1.0]), torch.tensor([0.0])),
                               torch.tensor([[0.0, 0.0, -1.0]]))
    # projection is the inverse: the camera-space direction lands on the pixel's centre
    u, v = cams.project(torch.tensor([[1.0, -0.25, -1.0]]), 0)
    assert (float(u), float(v)) == (3.5, 1.5)


def test_undistortion_inverts_opencv_distortion_and_projection_matches():
    coeffs = torch.tensor([-0.12, 0.03, -0.004, 0.0015, -0.002], dtype=torch.float64)
    x, y = torch.meshgrid(torch.linspace(-0.7, 0.7, 15, dtype=torch.float64),
                          torch.linspace(-0.5, 0.5, 11, dtype=torch.float64), indexing="ij")
    # distort by hand (OpenCV's formula written out), then undistort
    r2 = x * x + y * y
    radial = 1 - 0.12 * r2 + 0.03 * r2**2 - 0.004 * r2**3
    xd = x * radial + 2 * 0.0015 * x * y - 0.002 * (r2 + 2 * x * x)
    yd = y * radial + 0.0015 * (r2 + 2 * y * y) + 2 * -0.002 * x * y
    torch.testing.assert_close(torch.stack(distort(x, y, coeffs)), torch.stack([xd, yd]))
    xu, yu = undistort(xd, yd, coeffs)
    assert float((xu - x).abs().max()) < 1e-12 and float((yu - y).abs().max()) < 1e-12
    # a distorted camera's ray projects back onto its pixel's centre
    cams = Cameras(torch.tensor([30.0]), torch.tensor([32.0]), torch.tensor([21.0]), torch.tensor([13.5]), 30, 40,
                   coeffs.float()[None])
    px, py = torch.tensor([0.0, 39.0, 7.0]), torch.tensor([0.0, 29.0, 20.0])
    dirs = cams.directions(torch.zeros(3, dtype=torch.long), px, py)
    u, v = cams.project(dirs, 0)
    torch.testing.assert_close(u, px + 0.5, atol=1e-4, rtol=0)
    torch.testing.assert_close(v, py + 0.5, atol=1e-4, rtol=0)


def test_capture_normalisation_centres_uprights_and_scales():
    # cameras on a sphere of radius 4 around the origin (z up), then moved: rotated, scaled by 2.5, shifted
    poses = sphere_poses(12, seed=5)
    rot = _rotation(0.7, 0.2, -1.1)
    moved = poses.copy()
    moved[:, :3, :3] = rot @ poses[:, :3, :3]
    moved[:, :3, 3] = 2.5 * poses[:, :3, 3] @ rot.T + [3.0, -1.0, 7.0]
    back, info = normalise_capture(moved)
    assert np.linalg.norm(back[:, :3, 3], axis=1).mean() == pytest.approx(4.0)
    up = back[:, :3, 1].mean(axis=0)
    np.testing.assert_allclose(up / np.linalg.norm(up), [0, 0, 1], atol=1e-9)
    # every camera still looks at the scene's centre, now the origin
    forward = -back[:, :3, 2]
    to_centre = -back[:, :3, 3] / np.linalg.norm(back[:, :3, 3], axis=1, keepdims=True)
    np.testing.assert_allclose(forward, to_centre, atol=1e-9)
    assert info["scale"] == pytest.approx(4.0 / (2.5 * 4.0))
    # rigid poses stay rigid
    rots = back[:, :3, :3]
    np.testing.assert_allclose(rots @ rots.transpose(0, 2, 1), np.broadcast_to(np.eye(3), rots.shape), atol=1e-6)


def _rotation(a: float, b: float, c: float) -> np.ndarray:
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


# --- Blender scene folders ----------------------------------------------------------------------------------------
def test_blender_folder_splits_cameras_and_downscale(blender_scene_path, tmp_path):
    full = load_views(blender_scene_path, "train")
    assert full.images.dtype == torch.uint8 and tuple(full.images.shape) == (8, 32, 32, 4)
    assert full.cameras.simple_focal() == pytest.approx(1.3889 * 32, rel=1e-5)
    assert full.background == Background("random", "white", True)
    assert len(load_views(blender_scene_path, "test")) == 2 and len(load_views(blender_scene_path, "all")) == 13
    val = load_views(blender_scene_path, "val", val_views=2)  # 2 of the 3 val views, spread evenly
    assert val.numbers.tolist() == [0, 1] or val.numbers.tolist() == [0, 2]
    half = load_views(blender_scene_path, "train", downscale=2)
    assert tuple(half.images.shape) == (8, 16, 16, 4)
    assert half.cameras.simple_focal() == pytest.approx(full.cameras.simple_focal() / 2)
    # the area filter: each pixel the rounded mean of its 2x2 block (premultiplied colour and alpha)
    blocks = full.images.double().reshape(8, 16, 2, 16, 2, 4).mean(dim=(2, 4))
    assert float((half.images.double() - blocks).abs().max()) <= 0.5
    # the rays of a downscaled view are those of the block's centre
    o_full, d_full = full.image_rays(3)
    o_half, d_half = half.image_rays(3)
    torch.testing.assert_close(d_half[5, 7], d_full[10:12, 14:16].reshape(-1, 3).mean(0), atol=1e-6, rtol=0)
    # the targets on white: exactly white where alpha is 0, the stored colour where alpha is 255
    image = full.image(0)
    alpha = full.images[0, ..., 3]
    assert torch.equal(image[alpha == 0], torch.ones_like(image[alpha == 0]))
    torch.testing.assert_close(image[alpha == 255], full.images[0][alpha == 255][:, :3].float() / 255)
    with pytest.raises(DataError, match="not divisible by --downscale=3"):
        load_views(blender_scene_path, "train", downscale=3)


def test_blender_poses_and_rays_reproduce_the_scene(tmp_path):
    written = write_blender_scene(str(tmp_path / "scene"), size=16, views=(("train", 2),), seed=4)
    views = load_views(str(tmp_path / "scene"), "train", background="black")
    poses, rgb, depth = written["train"]
    np.testing.assert_allclose(views.poses.numpy(), poses, atol=1e-6)
    o, d = views.image_rays(1)
    traced, _ = trace_rays(o.double().numpy(), d.double().numpy())
    hit = depth[1] > 0
    np.testing.assert_allclose(views.image(1).numpy()[hit], traced[hit], atol=0.5 / 255 + 1e-6)
    assert float(views.image(1)[~torch.from_numpy(hit)].abs().max()) == 0.0  # black background, no junk colour


def write_png16(path, pixels: np.ndarray) -> None:
    """A 16-bit RGB or RGBA PNG, written by hand (Pillow writes none)."""
    import struct
    import zlib

    h, w, c = pixels.shape
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", w, h, 16, {3: 2, 4: 6}[c], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                + chunk(b"IEND", b""))


def test_rgba_png_is_premultiplied_and_16_bit_read_as_8(tmp_path):
    import imageio.v3 as iio

    pixels = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [200, 100, 50, 0]]], np.uint8)
    iio.imwrite(tmp_path / "a.png", pixels)
    got = read_image(str(tmp_path / "a.png"))
    # colour x alpha / 255, rounded: 128/255 of (200, 100, 50) = (100.39, 50.2, 25.1)
    assert got.tolist() == [[[200, 100, 50, 255], [100, 50, 25, 128], [0, 0, 0, 0]]]
    wide = pixels.astype(np.uint16) * 257  # the same values in 16 bits
    wide[0, 0, 0] += 50  # 200.19 in 8-bit units (0xC8FA): Pillow keeps the high byte, 200
    write_png16(tmp_path / "b.png", wide)
    assert read_image(str(tmp_path / "b.png")).tolist() == got.tolist()
    write_png16(tmp_path / "c.png", wide[..., :3].copy())
    assert read_image(str(tmp_path / "c.png")).tolist() == pixels[..., :3].tolist()


def test_alpha_carving_keeps_every_surface_point(tmp_path):
    written = write_blender_scene(str(tmp_path / "scene"), size=32, views=(("train", 12),), seed=3)
    views = load_views(str(tmp_path / "scene"), "train")
    grid = OccupancyGrid(32, 1.5)
    grid.carve(views.see_through(views.images), views.poses, views.cameras, near=2.0)
    assert 0.02 < grid.occupied_fraction() < 0.5
    poses, _, depth = written["train"]
    for i in range(len(views)):  # the ground-truth surface points behind every pixel alpha says is covered
        o, d = views.image_rays(i)
        hit = torch.from_numpy(depth[i] > 0)
        surface = o[hit] + torch.from_numpy(depth[i]).float()[hit][:, None] * d[hit]
        assert grid.is_occupied(surface).all()


# --- backgrounds ----------------------------------------------------------------------------------------------------
def test_composite_adds_the_background_behind_what_is_left():
    # one ray, one sample: alpha 1/4 of red (1, 0, 0); behind it (0.2, 0.4, 0.6): rgb = 1/4 red + 3/4 background
    raw = torch.tensor([[[20.0, -20.0, -20.0, math.log(math.expm1(math.log(4 / 3)))]]], dtype=torch.float64)
    one = torch.ones(1, 1, dtype=torch.float64)
    d = torch.tensor([[0.0, 0.0, -1.0]], dtype=torch.float64)
    bg = torch.tensor([[0.2, 0.4, 0.6]], dtype=torch.float64)
    out = composite(raw, one, one, d, bg)
    assert out.acc.item() == pytest.approx(0.25)
    torch.testing.assert_close(out.rgb[0], torch.tensor([0.25 + 0.75 * 0.2, 0.75 * 0.4, 0.75 * 0.6],
                                                        dtype=torch.float64), atol=1e-8, rtol=0)
    torch.testing.assert_close(composite(raw, one, one, d).rgb, out.rgb - 0.75 * bg)  # None: black


def test_backgrounds_of_rgba_batches_and_their_targets(blender_scene_path):
    kinds = {}
    for kind in ("white", "black", "random"):
        views = load_views(blender_scene_path, "train", background=kind)
        batcher = RayBatcher(views, "ray", 512, seed=1)
        _, _, target = batcher.batch(0)
        background, see_through = batcher.background(0)
        kinds[kind] = (target, background, see_through)
    alpha_zero = kinds["white"][2]
    assert 0.1 < alpha_zero.float().mean() < 0.9
    assert torch.equal(kinds["white"][0][alpha_zero], torch.ones(int(alpha_zero.sum()), 3))
    assert kinds["black"][1] is None and torch.equal(kinds["black"][0][alpha_zero],
                                                     torch.zeros(int(alpha_zero.sum()), 3))
    target, background, _ = kinds["random"]  # a colour per ray, the target on it
    assert background.shape == (512, 3) and background.std() > 0.2
    torch.testing.assert_close(target[alpha_zero], background[alpha_zero])
    torch.testing.assert_close(target[~alpha_zero], kinds["white"][0][~alpha_zero])  # opaque pixels: unchanged
    # random in training is scored on white; data without alpha cannot be given a random background
    assert load_views(blender_scene_path, "val", background="random").background.eval == "white"
    with pytest.raises(DataError, match="has alpha, so its background is chosen"):
        load_views(blender_scene_path, "val", background="none")


def test_evaluation_is_on_the_data_background(blender_scene_path, tmp_path):
    class Empty(torch.nn.Module):  # a field with nothing in it: density ~0 everywhere
        def __init__(self):
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(()))

        def forward(self, points):
            return torch.cat([torch.zeros(points.shape[0], 3), torch.full((points.shape[0], 1), -30.0)], -1) + self.p

    renderer = VolumeRenderer(Empty(), StratifiedSampler(2.0, 6.0, 8))
    for kind, colour in (("white", 1.0), ("black", 0.0)):
        views = load_views(blender_scene_path, "val", background=kind)
        result = evaluate.evaluate(renderer, views, 4096, progress=False)
        assert result["background_opacity"] == pytest.approx(0.0, abs=1e-6)
        # the empty field renders the background colour: exact on every see-through pixel
        view = views.image(0)
        see_through = views.see_through(views.images[0])
        assert torch.equal(view[see_through], torch.full_like(view[see_through], colour))
        assert result["psnr"] < 30  # the object's pixels are missing


# --- captures ---------------------------------------------------------------------------------------------------
CAPTURE = {"w": 40, "h": 32, "fl_x": 44.0, "fl_y": 46.0, "cx": 23.5, "cy": 13.0,
           "k1": -0.08, "k2": 0.01, "p1": 0.002, "p2": -0.001}
CAPTURE_BG = np.array([0.25, 0.55, 0.75])  # a real, coloured background (no alpha)


def reference_undistort(xd: np.ndarray, yd: np.ndarray, k1, k2, p1, p2) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's undistortion by plain fixed-point iteration in float64 (independent of cameras.undistort)."""
    x, y = xd.copy(), yd.copy()
    for _ in range(200):
        r2 = x * x + y * y
        radial = 1 + k1 * r2 + k2 * r2 * r2
        x = (xd - 2 * p1 * x * y - p2 * (r2 + 2 * x * x)) / radial
        y = (yd - p1 * (r2 + 2 * y * y) - 2 * p2 * x * y) / radial
    return x, y


def write_capture(folder, n: int = 10, seed: int = 7, extra: dict | None = None, frame_extra=None) -> dict:
    """An instant-ngp / nerfstudio capture of the procedural scene: off-centre principal point, OpenCV distortion,
    a coloured background, JPG files, and poses in a frame of their own (rotated, scaled 0.4, shifted)."""
    import imageio.v3 as iio

    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    c = CAPTURE
    u, v = np.meshgrid(np.arange(c["w"]) + 0.5, np.arange(c["h"]) + 0.5, indexing="xy")
    x, y = reference_undistort((u - c["cx"]) / c["fl_x"], (v - c["cy"]) / c["fl_y"], c["k1"], c["k2"], c["p1"],
                               c["p2"])
    cam_dirs = np.stack([x, -y, -np.ones_like(x)], -1)
    rot, scale, shift = _rotation(0.3, -0.4, 2.0), 0.4, np.array([1.0, 2.0, -0.5])
    poses = sphere_poses(n, seed)
    frames, images = [], []
    for i, c2w in enumerate(poses):
        dirs = cam_dirs @ c2w[:3, :3].T
        rgb, depth = trace_rays(np.broadcast_to(c2w[:3, 3], dirs.shape), dirs)
        rgb = np.where(depth[..., None] > 0, rgb, CAPTURE_BG)
        name = f"images/frame_{i:05d}.jpg"
        iio.imwrite(os.path.join(folder, name), np.round(rgb * 255).astype(np.uint8), quality=95)
        moved = np.eye(4)
        moved[:3, :3] = rot @ c2w[:3, :3]
        moved[:3, 3] = scale * rot @ c2w[:3, 3] + shift
        frames.append({"file_path": name, "transform_matrix": moved.tolist(), **(frame_extra or {})})
        images.append(rgb)
    with open(os.path.join(folder, "transforms.json"), "w") as f:
        json.dump({"camera_model": "OPENCV", **c, "aabb_scale": 1, **(extra or {}), "frames": frames[::-1]}, f)
    return {"poses": poses, "images": np.stack(images), "rot": rot, "scale": scale, "shift": shift}


@pytest.fixture(scope="module")
def capture_path(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("data") / "capture"
    write_capture(str(folder))
    return str(folder)


def test_capture_loads_with_its_intrinsics_distortion_and_normalised_poses(capture_path):
    views = load_views(capture_path)  # the folder, or the file itself
    assert len(load_views(os.path.join(capture_path, "transforms.json"))) == 10
    assert views.images.dtype == torch.uint8 and tuple(views.images.shape) == (10, 32, 40, 3)
    assert views.background == Background("none", "none", False) and views.see_through(views.images) is None
    c = CAPTURE
    assert views.cameras.fx[0] == c["fl_x"] and views.cameras.fy[0] == c["fl_y"]
    assert (views.cameras.cx[0], views.cameras.cy[0]) == (c["cx"], c["cy"])
    torch.testing.assert_close(views.cameras.distortion[0], torch.tensor([c["k1"], c["k2"], 0, c["p1"], c["p2"]]))
    # frames are read in file-name order, whatever the JSON's order; cameras ~4 from the centre
    assert np.linalg.norm(views.poses[:, :3, 3].numpy(), axis=1).mean() == pytest.approx(4.0, rel=1e-5)
    train_views, val = open_data(capture_path).views("train", 2), open_data(capture_path).views("val", 2)
    assert val.numbers.tolist() == [2, 7] and len(train_views) == 8


def test_capture_rays_see_what_the_images_show(capture_path, tmp_path):
    written = write_capture(str(tmp_path / "again"))  # the same capture: its generating frame is known
    views = load_views(str(tmp_path / "again"))
    _, info = normalise_capture(_moved_poses(written))
    # a loaded ray, mapped back to the scene's own frame, traced through the scene: the image's colour (JPG error)
    o, d = views.image_rays(4)
    to_file = lambda p: (p / info["scale"] + info["centre"]) @ info["rotation"]  # undo normalise_capture
    o_file, d_file = to_file(o.double().numpy()), (d.double().numpy() / info["scale"]) @ info["rotation"]
    rot, scale, shift = written["rot"], written["scale"], written["shift"]
    o_scene = (o_file - shift) @ rot / scale
    d_scene = d_file @ rot / scale
    rgb, depth = trace_rays(o_scene, d_scene)
    rgb = np.where(depth[..., None] > 0, rgb, CAPTURE_BG)
    np.testing.assert_allclose(rgb, written["images"][4], atol=1e-6)  # exactly the rays the images were made with
    error = float(np.abs(views.image(4).numpy() - rgb).mean())  # and the JPG shows them, up to its compression
    assert error < 0.05 and error < float(np.abs(views.image(5).numpy() - rgb).mean()) / 2


def _moved_poses(written: dict) -> np.ndarray:
    moved = written["poses"].copy()
    moved[:, :3, :3] = written["rot"] @ written["poses"][:, :3, :3]
    moved[:, :3, 3] = written["scale"] * written["poses"][:, :3, 3] @ written["rot"].T + written["shift"]
    return moved


def test_the_library_capture_loads_and_its_rays_see_its_images(tmp_path):
    write_synthetic_capture(str(tmp_path / "c"), n_views=4, width=24, height=20)
    views = load_views(str(tmp_path / "c"))
    assert tuple(views.images.shape) == (4, 20, 24, 3) and views.cameras.distortion is not None
    assert float(views.cameras.cx[0]) == pytest.approx(0.5875 * 24)
    assert np.linalg.norm(views.poses[:, :3, 3].numpy(), axis=1).mean() == pytest.approx(4.0, rel=1e-5)


def test_per_frame_intrinsics_win_over_the_files(tmp_path):
    write_capture(str(tmp_path / "c"), n=3, frame_extra={"fl_x": 50.0, "cx": 20.0})
    views = load_views(str(tmp_path / "c"))
    assert views.cameras.fx.tolist() == [50.0] * 3 and views.cameras.cx.tolist() == [20.0] * 3
    assert views.cameras.fy.tolist() == [CAPTURE["fl_y"]] * 3


# --- bad files: one line, exit code 2 ---------------------------------------------------------------------------------
def _edit_json(path, change) -> None:
    with open(path) as f:
        meta = json.load(f)
    change(meta)
    with open(path, "w") as f:
        json.dump(meta, f)


def _set_matrix(meta, value):
    meta["frames"][1]["transform_matrix"][0][0] = value


BAD_CAPTURES = {
    "no frames": (lambda m: m.update(frames=[]), "has no frames"),
    "no frames key": (lambda m: m.pop("frames"), "has no frames"),
    "nan matrix": (lambda m: _set_matrix(m, float("nan")), "transform_matrix holds NaN or inf"),
    "scaled matrix": (lambda m: _set_matrix(m, 3.0), "is not a rigid camera-to-world matrix"),
    "fisheye": (lambda m: m.update(camera_model="OPENCV_FISHEYE"), "camera model OPENCV_FISHEYE is not supported"),
    "no image at all": (lambda m: [f.update(file_path=f"images/nope{i}.jpg") for i, f in enumerate(m["frames"])],
                        "0 of its 3 frames have an image file (missing: images/nope0.jpg, images/nope1.jpg, "
                        "images/nope2.jpg); training needs at least 2"),
    "one image": (lambda m: [f.update(file_path="images/nope.jpg") for f in m["frames"][1:]],
                  "1 of its 3 frames have an image file"),
    "wrong w": (lambda m: m.update(w=64), "is 40x32 pixels but transforms.json says 64x32"),
    "no focal": (lambda m: m.pop("fl_x"), "gives no focal length"),
    "text focal": (lambda m: m.update(fl_x="44"), "fl_x must be a finite number"),
}


@pytest.mark.parametrize("case", sorted(BAD_CAPTURES))
def test_bad_captures_are_one_line_errors(tmp_path, case):
    folder = tmp_path / "c"
    write_capture(str(folder), n=3)
    change, expected = BAD_CAPTURES[case]
    _edit_json(folder / "transforms.json", change)
    with pytest.raises(DataError) as exc:
        load_views(str(folder))
    assert expected in str(exc.value) and "\n" not in str(exc.value), str(exc.value)


def test_bad_scene_folders_exit_2_with_one_line(tmp_path, capsys):
    import imageio.v3 as iio

    folder = tmp_path / "scene"
    write_blender_scene(str(folder), size=16, views=(("train", 3), ("val", 2)))
    iio.imwrite(folder / "train" / "r_1.png", np.zeros((8, 8, 4), np.uint8))  # wrong size
    (tmp_path / "not_a_scene").mkdir()
    cases = [(str(folder), "r_1.png is 8x8 pixels but"), (str(tmp_path / "not_a_scene"), "without transforms")]
    for data, expected in cases:
        capsys.readouterr()
        assert train.main(argv=[f"--data={data}", "--wandb=disabled", f"--out_dir={tmp_path / 'run'}"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    with pytest.raises(DataError, match="has no test split"):
        load_views(str(folder), "test")


# --- batches -----------------------------------------------------------------------------------------------------
def test_ray_batches_hold_nothing_per_pixel():
    # 100 views of 800x800 RGBA (64 M rays) as one broadcast uint8 value: the batcher must not allocate per ray
    huge = torch.zeros(1, 1, 1, 4, dtype=torch.uint8).expand(100, 800, 800, 4)
    views = Views(huge, torch.eye(4).expand(100, 4, 4), Cameras.pinhole(100, 1111.0, 800, 800),
                  Background("random", "white", True))
    batcher = RayBatcher(views, "ray", 4096, seed=0)
    rays_o, rays_d, target = batcher.batch(123)
    assert rays_o.shape == target.shape == (4096, 3)
    biggest = max(t.numel() for t in _tensors(vars(batcher)) if t.data_ptr() != huge.data_ptr())
    assert biggest <= 4096 * 4


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def test_train_val_views_follow_the_config(blender_scene_path, tiny_cfg):
    cfg = replace(tiny_cfg, data=blender_scene_path, val_views=2, downscale=2)
    resolved, train_views, val, scene = train_val_views(cfg)
    assert len(train_views) == 8 and len(val) == 2 and train_views.width == 16
    assert (resolved.scene, resolved.near, resolved.far, resolved.occ_bound, resolved.downscale) == (
        "bounded", 2.0, 6.0, 1.5, 2) and scene == "scene bounded: near 2, far 6, occupancy grid over +-1.5"
    assert train_views.background.train == "random" and val.background.eval == "white"


@pytest.mark.slow
def test_training_on_a_capture(capture_path, tiny_cfg):
    """The capture (distorted, off-centre, real background, JPG) trains end to end: the held-out PSNR climbs well
    above the first step's, and the orbit video is written. (A 2-rank run on a Blender folder: test_ddp.py.)"""
    cfg = replace(tiny_cfg, data=capture_path, val_views=2, steps=40, lr=5e-3, occ_update_every=8, video=True,
                  video_frames=2)
    first = train.train(replace(cfg, steps=1, video=False, out_dir=cfg.out_dir + "-1"))["val_psnr"]
    summary = train.train(cfg)
    assert summary["val_psnr"] > first + 2.0, (first, summary["val_psnr"])
    assert os.path.exists(os.path.join(cfg.out_dir, "video_rgb.mp4"))


def test_the_data_line_names_the_data_and_what_the_capture_decided(tmp_path, tiny_cfg):
    write_capture(str(tmp_path / "c"), n=3, extra={"aabb_scale": 4})
    cfg, views, val, scene = train_val_views(replace(tiny_cfg, data=str(tmp_path / "c"), val_views=1))
    line = train.data_line(cfg, views, val, scene)
    assert "2 train / 1 val views of 40x32, RGB torch.uint8, background none in training, none in evaluation" in line
    assert "lens distortion" in line and "scene unbounded" in line and "(aabb_scale 4)" in line
    assert "--occ_bound" not in line  # what was chosen, not a hint to follow
