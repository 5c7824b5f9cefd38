"""Shared fixtures: a tiny procedural scene written to disk and a tiny config that trains in seconds."""

import json
import math
import os
import sys
from dataclasses import replace

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("WANDB_SILENT", "true")

from configs import EXP1, Config  # noqa: E402
from dataset import synthetic_scene  # noqa: E402


@pytest.fixture(scope="session")
def tiny_scene_path(tmp_path_factory) -> str:
    """12 views of the procedural scene at 24x24 (with ground-truth depth), as a tiny-NeRF .npz."""
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(path, **synthetic_scene(n_views=12, size=24, seed=1))
    return str(path)


@pytest.fixture
def tiny_cfg(tiny_scene_path, tmp_path) -> Config:
    """A config small enough to train a few steps in about a second on one CPU core."""
    return replace(EXP1, name="tiny", data=tiny_scene_path, out_dir=str(tmp_path / "run"), width=32, depth=2,
                   skip_layer=1, n_freqs=4, n_samples=16, steps=5, batch_unit="ray", batch_size=256,
                   val_views=2, compile=False, video=False, wandb="disabled", log_every=1, eval_every=0,
                   ckpt_every=0, chunk_points=8192, occ_resolution=32)


# --- scene folders written the way NeRF-synthetic and instant-ngp / nerfstudio write them --------------------------
def trace_rays(origins: np.ndarray, dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The procedural scene along rays [..., 3] (float64): colour [..., 3], depth t [...] (0 = miss)."""
    from dataset import _trace

    rgb, t = _trace(origins.reshape(-1, 3), dirs.reshape(-1, 3))
    return rgb.reshape(dirs.shape), t.reshape(dirs.shape[:-1])


def sphere_poses(n: int, seed: int, radius: float = 4.0) -> np.ndarray:
    from cameras import pose_spherical

    rng = np.random.default_rng(seed)
    return np.stack([pose_spherical(a, e, radius).double().numpy()
                     for a, e in zip(rng.uniform(0, 360, n), rng.uniform(-70, -10, n))])


def write_blender_scene(folder, size: int = 32, views=(("train", 8), ("val", 3), ("test", 2)), seed: int = 0,
                        focal_per_pixel: float = 1.3889) -> dict:
    """A NeRF-synthetic scene folder of the procedural scene: transforms_{split}.json (camera_angle_x, frames
    without a file extension) and straight-alpha RGBA PNGs (alpha 255 where a ray hits, else 0 over a
    colour that must not matter). Returns {split: (poses [n, 4, 4], rgb [n, S, S, 3], depth [n, S, S])}."""
    import imageio.v3 as iio

    os.makedirs(folder, exist_ok=True)
    focal = focal_per_pixel * size
    grid = np.stack(np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="xy"), -1)  # (u, v)
    cam_dirs = np.concatenate([(grid - size / 2) / focal * [1, -1], -np.ones((size, size, 1))], -1)
    out = {}
    for k, (split, n) in enumerate(views):
        poses = sphere_poses(n, seed + k)
        os.makedirs(os.path.join(folder, split), exist_ok=True)
        frames, rgbs, depths = [], [], []
        for i, c2w in enumerate(poses):
            dirs = cam_dirs @ c2w[:3, :3].T
            rgb, depth = trace_rays(np.broadcast_to(c2w[:3, 3], dirs.shape), dirs)
            alpha = np.where(depth > 0, 255, 0).astype(np.uint8)
            junk = np.full_like(rgb, 0.3)  # what an alpha-0 pixel stores is no colour anyone sees
            colour = np.where(depth[..., None] > 0, rgb, junk)
            iio.imwrite(os.path.join(folder, split, f"r_{i}.png"),
                        np.concatenate([np.round(colour * 255).astype(np.uint8), alpha[..., None]], -1))
            frames.append({"file_path": f"./{split}/r_{i}", "rotation": 0.0, "transform_matrix": c2w.tolist()})
            rgbs.append(rgb)
            depths.append(depth)
        with open(os.path.join(folder, f"transforms_{split}.json"), "w") as f:
            json.dump({"camera_angle_x": 2 * math.atan(size / 2 / focal), "frames": frames}, f)
        out[split] = (poses, np.stack(rgbs), np.stack(depths))
    return out


@pytest.fixture(scope="session")
def blender_scene_path(tmp_path_factory) -> str:
    """A NeRF-synthetic scene folder (32x32 RGBA: 8 train, 3 val, 2 test views) of the procedural scene."""
    folder = tmp_path_factory.mktemp("data") / "blender"
    write_blender_scene(str(folder))
    return str(folder)
