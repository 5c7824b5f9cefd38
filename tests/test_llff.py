"""llff.py: LLFF folders written by hand (poses_bounds.npy in LLFF's [down, right, back] axes, PNGs) read back as
OpenGL camera-to-world poses, pixel intrinsics, bounds and images."""

import os

import numpy as np
import pytest

from llff import is_llff_folder, parse_poses_bounds, read_llff
from utils import DataError

H, W, FOCAL = 8, 12, 10.0


def random_poses(n: int, seed: int) -> np.ndarray:
    """n camera-to-world matrices [n, 4, 4] (OpenGL axes) with random rotations (det +1) and centres."""
    rng = np.random.default_rng(seed)
    poses = np.tile(np.eye(4), (n, 1, 1))
    for pose in poses:
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        pose[:3, :3] = q if np.linalg.det(q) > 0 else -q
        pose[:3, 3] = rng.normal(size=3)
    return poses


def llff_rows(poses: np.ndarray, hwf, bounds: np.ndarray) -> np.ndarray:
    """OpenGL poses [n, 4, 4] -> poses_bounds rows [n, 17]: rotation columns [right, up, back] become LLFF's
    [down, right, back] = [-up, right, back]."""
    rot = poses[:, :3, :3]
    llff = np.stack([-rot[:, :, 1], rot[:, :, 0], rot[:, :, 2]], axis=-1)
    hwf = np.broadcast_to(np.asarray(hwf, np.float64), (len(poses), 3))
    m = np.concatenate([llff, poses[:, :3, 3:], hwf[:, :, None]], axis=-1)  # [n, 3, 5]
    return np.concatenate([m.reshape(len(poses), 15), bounds], axis=1)


def write_images(folder, sub: str, images: np.ndarray, names=None) -> None:
    import imageio.v3 as iio

    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    for k, image in enumerate(images):
        iio.imwrite(os.path.join(folder, sub, names[k] if names else f"img_{k:03d}.png"), image)


def write_scene(folder, n: int = 3, seed: int = 0, hwf=(H, W, FOCAL)) -> dict:
    """An LLFF folder of n random views with H x W RGB PNGs; returns what was written."""
    poses = random_poses(n, seed)
    bounds = np.stack([np.linspace(0.5, 1.0, n), np.linspace(5.0, 9.0, n)], axis=1)
    images = np.random.default_rng(seed).integers(0, 256, (n, H, W, 3), dtype=np.uint8)
    os.makedirs(folder, exist_ok=True)
    np.save(os.path.join(folder, "poses_bounds.npy"), llff_rows(poses, hwf, bounds))
    write_images(folder, "images", images)
    return {"poses": poses, "bounds": bounds, "images": images}


def test_round_trip(tmp_path):
    written = write_scene(tmp_path)
    assert is_llff_folder(str(tmp_path)) and not is_llff_folder(str(tmp_path / "images"))
    scene = read_llff(str(tmp_path), 1)
    assert set(scene) == {"images", "poses", "fx", "fy", "cx", "cy", "distortion", "names", "aabb_scale",
                          "downscale", "bounds"}
    assert scene["poses"].dtype == np.float64 and scene["poses"].shape == (3, 4, 4)
    np.testing.assert_allclose(scene["poses"], written["poses"], atol=1e-9, rtol=0)  # not normalised
    np.testing.assert_array_equal(scene["images"], written["images"])
    assert scene["images"].dtype == np.uint8
    np.testing.assert_array_equal(scene["bounds"], written["bounds"])
    for key, value in (("fx", FOCAL), ("fy", FOCAL), ("cx", W / 2), ("cy", H / 2)):
        assert scene[key].dtype == np.float64 and scene[key].tolist() == [value] * 3, key
    assert scene["distortion"] is None and scene["aabb_scale"] is None and scene["downscale"] == 1
    assert [os.path.basename(p) for p in scene["names"]] == ["img_000.png", "img_001.png", "img_002.png"]


def test_hand_computed_row():
    # LLFF identity rotation: the camera's down = world x, right = world y, backwards = world z.
    # OpenGL columns [right, up, back] = [col1, -col0, col2] = [(0,1,0), (-1,0,0), (0,0,1)].
    row = np.array([[1, 0, 0, 2.0, 480,
                     0, 1, 0, 3.0, 640,
                     0, 0, 1, 4.0, 500,
                     1.5, 20.0]])
    poses, hwf, bounds = parse_poses_bounds(row, "poses_bounds.npy")
    expected = np.array([[0, -1, 0, 2.0],
                         [1, 0, 0, 3.0],
                         [0, 0, 1, 4.0],
                         [0, 0, 0, 1.0]])
    np.testing.assert_array_equal(poses[0], expected)
    np.testing.assert_array_equal(hwf, [[480, 640, 500]])
    np.testing.assert_array_equal(bounds, [[1.5, 20.0]])


def test_images_at_higher_resolution_than_the_file(tmp_path):
    write_scene(tmp_path, hwf=(H / 2, W / 2, FOCAL / 2))  # poses computed for 6x4 images; images/ is 12x8
    scene = read_llff(str(tmp_path), 1)
    assert scene["fx"].tolist() == [FOCAL] * 3 and scene["cx"].tolist() == [W / 2] * 3


def test_downscale_from_full_images(tmp_path):
    written = write_scene(tmp_path)
    scene = read_llff(str(tmp_path), 2)
    blocks = written["images"].reshape(3, H // 2, 2, W // 2, 2, 3).astype(np.uint32).sum(axis=(2, 4))
    np.testing.assert_array_equal(scene["images"], (blocks + 2) // 4)
    assert scene["fx"].tolist() == [FOCAL / 2] * 3 and scene["fy"].tolist() == [FOCAL / 2] * 3
    assert scene["cx"].tolist() == [W / 4] * 3 and scene["cy"].tolist() == [H / 4] * 3
    assert scene["downscale"] == 2
    with pytest.raises(DataError, match="not divisible by --downscale=3"):
        read_llff(str(tmp_path), 3)


def test_auto_downscale_crops(tmp_path):
    write_scene(tmp_path)
    scene = read_llff(str(tmp_path), 0, max_side=4)  # factor ceil(12 / 4) = 3; 8 rows cropped to 6
    assert scene["downscale"] == 3 and scene["images"].shape == (3, 2, 4, 3)
    np.testing.assert_allclose(scene["fx"], FOCAL / 3)
    np.testing.assert_allclose(scene["cx"], W / 2 / 3)
    np.testing.assert_allclose(scene["cy"], H / 2 / 3)  # the uncropped centre: pixels start at the top left


def test_images_k_folder(tmp_path, capsys):
    write_scene(tmp_path)
    small = np.random.default_rng(5).integers(0, 256, (3, H // 2, W // 2, 3), dtype=np.uint8)
    write_images(tmp_path, "images_2", small, names=["a.PNG", "b.png", "c.png"])
    scene = read_llff(str(tmp_path), 2)
    np.testing.assert_array_equal(scene["images"], small)  # read, not computed from images/
    assert scene["fx"].tolist() == [FOCAL / 2] * 3 and scene["cx"].tolist() == [W / 4] * 3
    assert all("images_2" in name for name in scene["names"])
    os.remove(tmp_path / "images_2" / "c.png")  # a wrong count: images/ is downscaled instead, with a warning
    scene = read_llff(str(tmp_path), 2)
    assert all(os.sep + "images" + os.sep in name for name in scene["names"])
    assert "images_2 holds 2 images" in capsys.readouterr().out


def _rewrite(folder, rows: np.ndarray) -> str:
    np.save(os.path.join(folder, "poses_bounds.npy"), rows)
    return str(folder)


def _error(folder, downscale: int = 1) -> str:
    with pytest.raises(DataError) as err:
        read_llff(str(folder), downscale)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_errors(tmp_path):
    written = write_scene(tmp_path)
    rows = llff_rows(written["poses"], (H, W, FOCAL), written["bounds"])
    assert "shape [N, 17]" in _error(_rewrite(tmp_path, rows[:, :15]))
    bad = rows.copy()
    bad[1, 0] = np.nan
    assert "NaN" in _error(_rewrite(tmp_path, bad))
    bad = rows.copy()
    bad[2, [0, 5, 10]] *= 1.1  # column 0 (down) stretched: not orthonormal
    assert "row 2 is not a rigid pose" in _error(_rewrite(tmp_path, bad))
    bad = rows.copy()
    bad[0, [2, 7, 12]] *= -1  # column 2 (back) flipped: a reflection, det -1
    assert "row 0 is not a rigid pose" in _error(_rewrite(tmp_path, bad))
    for near, far in ((0.0, 5.0), (6.0, 5.0), (-1.0, 5.0)):
        bad = rows.copy()
        bad[1, 15:] = near, far
        assert "row 1: depth bounds must have 0 < near < far" in _error(_rewrite(tmp_path, bad))
    bad = rows.copy()
    bad[0, 4] = 0  # H
    assert "H, W and focal must be > 0" in _error(_rewrite(tmp_path, bad))
    assert "poses_bounds.npy" in _error(_rewrite(tmp_path, rows[:1]))  # one view: too few to train
    _rewrite(tmp_path, rows)
    os.remove(tmp_path / "images" / "img_001.png")
    message = _error(tmp_path)
    assert "holds 2 images" in message and "has 3 poses" in message and "poses_bounds.npy" in message


def test_file_and_folder_errors(tmp_path):
    written = write_scene(tmp_path)
    rows = llff_rows(written["poses"], (H, W, FOCAL), written["bounds"])
    _rewrite(tmp_path, llff_rows(written["poses"], (H, W * 2, FOCAL), written["bounds"]))
    assert "aspect ratio" in _error(tmp_path)  # 12x8 images for poses of 24x8 ones
    (tmp_path / "poses_bounds.npy").write_bytes(b"not an array")
    assert "poses_bounds.npy is not a .npy array" in _error(tmp_path)
    np.save(tmp_path / "poses_bounds.npy", np.array([["a"] * 17] * 3))
    assert "expected numbers" in _error(tmp_path)
    _rewrite(tmp_path, rows)
    os.rename(tmp_path / "images", tmp_path / "elsewhere")
    assert "no images/ folder" in _error(tmp_path)
