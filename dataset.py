"""Data: load and validate tiny-NeRF `.npz` files, the built-in procedural scene, and on-device ray batches.

A tiny-NeRF file holds `images` [N, H, W, 3] (float in [0, 1] or uint8), `poses` [N, 4, 4] camera-to-world and
a scalar `focal`. The procedural scene (`synthetic_scene`) has the same format plus ground-truth `depth` [N, H, W]
(camera-space z, 0 where the ray hits nothing).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from render import pixel_rays, pose_spherical
from utils import DataError  # lives in utils, so that run_cli reports it without importing this module


@dataclass
class Views:
    """A set of posed views, as tensors on one device."""

    images: torch.Tensor  # [N, H, W, 3] float32 in [0, 1]
    poses: torch.Tensor  # [N, 4, 4] float32 camera-to-world
    focal: float
    depth: torch.Tensor | None = None  # [N, H, W] ground-truth camera-space depth (0 = background), if known

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: slice | torch.Tensor) -> "Views":
        return Views(self.images[index], self.poses[index], self.focal,
                     None if self.depth is None else self.depth[index])

    def to(self, device) -> "Views":
        return Views(self.images.to(device), self.poses.to(device), self.focal,
                     None if self.depth is None else self.depth.to(device))


# --- loading and validation ------------------------------------------------------------------------------------
def load_npz(path: str) -> Views:
    """Load and validate a tiny-NeRF .npz. Raises DataError naming the problem."""
    if not os.path.exists(path):
        raise DataError(f"data file not found: {path} (run `python data_setup.py` or use --data=synthetic)")
    try:
        # our own handle: np.load leaks its file when the zip is unreadable
        with open(path, "rb") as f:
            npz = np.load(f, allow_pickle=False)
            if not isinstance(npz, np.lib.npyio.NpzFile):
                raise DataError(f"{path} holds a single array, not a .npz with images, poses and focal")
            with npz:
                arrays = {k: npz[k] for k in npz.files}
    except DataError:
        raise
    except Exception as err:  # whatever a damaged file raises: BadZipFile, zlib.error, EOFError, NotImplementedError..
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise DataError(f"{path} is not a readable .npz file ({type(err).__name__}: {reason})") from None
    return views_from_arrays(arrays, path)


def views_from_arrays(arrays: dict, source: str = "data") -> Views:
    missing = {"images", "poses", "focal"} - set(arrays)
    if missing:
        raise DataError(f"{source} lacks key(s) {', '.join(sorted(missing))} (has: {', '.join(sorted(arrays))})")
    images = _check_images(np.asarray(arrays["images"]), source)
    poses = _check_poses(np.asarray(arrays["poses"]), source)
    focal = _check_focal(np.asarray(arrays["focal"]), source)
    if len(images) != len(poses):
        raise DataError(f"{source}: {len(images)} images but {len(poses)} poses")
    depth = None
    if "depth" in arrays:
        depth = np.asarray(arrays["depth"], dtype=np.float32)
        if depth.shape != images.shape[:3] or not np.isfinite(depth).all():
            raise DataError(f"{source}: depth must be finite with shape {images.shape[:3]}, got {depth.shape}")
        depth = torch.from_numpy(depth)
    return Views(torch.from_numpy(images), torch.from_numpy(poses), focal, depth)


def _check_images(images: np.ndarray, source: str) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3 or min(images.shape) == 0:
        raise DataError(f"{source}: images must have shape [N, H, W, 3], got {list(images.shape)}")
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    if not np.issubdtype(images.dtype, np.floating):
        raise DataError(f"{source}: images must be float in [0, 1] or uint8, got dtype {images.dtype}")
    if not np.isfinite(images).all():
        raise DataError(f"{source}: images contain NaN or inf")
    lo, hi = float(images.min()), float(images.max())
    if lo < 0.0 or hi > 1.0:
        raise DataError(f"{source}: float images must lie in [0, 1], found values in [{lo:.3g}, {hi:.3g}]")
    return images.astype(np.float32)


def _check_poses(poses: np.ndarray, source: str) -> np.ndarray:
    if poses.ndim != 3 or poses.shape[1:] not in ((4, 4), (3, 4)):
        raise DataError(f"{source}: poses must have shape [N, 4, 4] (or [N, 3, 4]), got {list(poses.shape)}")
    if not np.issubdtype(poses.dtype, np.number) or not np.isfinite(poses).all():
        raise DataError(f"{source}: poses must be finite numbers")
    poses = poses.astype(np.float64)
    if poses.shape[1] == 3:
        bottom = np.broadcast_to(np.array([0.0, 0.0, 0.0, 1.0]), (len(poses), 1, 4))
        poses = np.concatenate([poses, bottom], axis=1)
    rot = poses[:, :3, :3]
    ortho_err = np.abs(rot @ rot.transpose(0, 2, 1) - np.eye(3)).max(axis=(1, 2))
    det = np.linalg.det(rot)
    bad = np.flatnonzero((ortho_err > 1e-3) | (np.abs(det - 1.0) > 1e-3)
                         | (np.abs(poses[:, 3] - [0, 0, 0, 1]).max(axis=1) > 1e-6))
    if bad.size:
        raise DataError(f"{source}: pose {bad[0]} is not a rigid camera-to-world matrix "
                        f"(rotation must be orthonormal with det +1, last row 0 0 0 1)")
    return poses.astype(np.float32)


def _check_focal(focal: np.ndarray, source: str) -> float:
    if focal.size != 1 or not np.issubdtype(focal.dtype, np.number):
        raise DataError(f"{source}: focal must be one number, got shape {list(focal.shape)}")
    value = float(focal.reshape(()))
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"{source}: focal must be a finite number > 0, got {value}")
    return value


def load_views(data: str) -> Views:
    """`synthetic` -> the procedural scene; anything else is a path to a tiny-NeRF .npz."""
    if data == "synthetic":
        return views_from_arrays(synthetic_scene(), "synthetic scene")
    return load_npz(data)


def split_views(views: Views, n_val: int) -> tuple[Views, Views]:
    """Hold out the last `n_val` views (the tiny NeRF split: 106 = 95 train + 11 validation)."""
    if not 0 < n_val < len(views):
        raise DataError(f"the data has {len(views)} views: cannot hold out {n_val} for validation and still "
                        f"train (set --val_views between 1 and {len(views) - 1})")
    return views.subset(slice(0, len(views) - n_val)), views.subset(slice(len(views) - n_val, None))


# --- the procedural scene --------------------------------------------------------------------------------------
def synthetic_scene(n_views: int = 106, size: int = 100, seed: int = 0, radius: float = 4.0) -> dict:
    """A few textured, Lambert-shaded primitives on black, seen from random cameras on a sphere.

    Returns a tiny-NeRF dict (`images` float32 [N, S, S, 3], `poses` [N, 4, 4], `focal`) plus `depth` [N, S, S].
    The scene fits in a ball of radius ~1.3 at the origin, so near=2, far=6 frame it from radius 4.
    """
    rng = np.random.default_rng(seed)
    focal = 1.3889 * size  # the tiny NeRF lego's 138.889 at 100 px
    azimuth = rng.uniform(0.0, 360.0, n_views)
    elevation = rng.uniform(-70.0, -10.0, n_views)  # upper hemisphere, as the Blender scenes
    poses = np.stack([pose_spherical(a, e, radius).numpy() for a, e in zip(azimuth, elevation)])
    py, px = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    origins, dirs = pixel_rays(torch.from_numpy(poses).double()[:, None, None], torch.from_numpy(px).double(),
                               torch.from_numpy(py).double(), focal, size, size)
    rgb, depth = _trace(origins.numpy().reshape(-1, 3), dirs.numpy().reshape(-1, 3))
    return {"images": rgb.reshape(n_views, size, size, 3).astype(np.float32), "poses": poses.astype(np.float32),
            "focal": np.float64(focal), "depth": depth.reshape(n_views, size, size).astype(np.float32)}


_LIGHT = np.array([0.4, -0.5, 0.75]) / np.linalg.norm([0.4, -0.5, 0.75])


def _trace(o: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast the primitives. o, d: [R, 3] float64 -> rgb [R, 3], depth t [R] (0 = miss)."""
    hits = [_hit_sphere(o, d, np.array([0.0, 0.0, 0.0]), 0.75, _stripes),
            _hit_sphere(o, d, np.array([0.55, 0.75, -0.35]), 0.4, _dots),
            _hit_box(o, d, np.array([-1.05, -0.35, -0.75]), np.array([-0.35, 0.35, 0.35]), _checker)]
    best_t = np.full(len(o), np.inf)
    rgb = np.zeros((len(o), 3))
    for t, normal, albedo in hits:
        closer = t < best_t
        best_t[closer] = t[closer]
        shade = 0.25 + 0.75 * np.clip((normal * _LIGHT).sum(-1), 0.0, 1.0)
        rgb[closer] = (albedo * shade[:, None])[closer]
    return np.clip(rgb, 0.0, 1.0), np.where(np.isfinite(best_t), best_t, 0.0)


def _hit_sphere(o, d, centre, radius, texture):
    oc = o - centre
    a, b, c = (d * d).sum(-1), 2 * (oc * d).sum(-1), (oc * oc).sum(-1) - radius**2
    disc = b * b - 4 * a * c
    t = np.where(disc >= 0, (-b - np.sqrt(np.maximum(disc, 0))) / (2 * a), np.inf)
    t = np.where(t > 0, t, np.inf)
    p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
    normal = (p - centre) / radius
    return t, normal, texture(normal)


def _hit_box(o, d, lo, hi, texture):
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (lo - o) / d, (hi - o) / d
    t_near = np.nanmax(np.minimum(t1, t2), axis=-1)
    t_far = np.nanmin(np.maximum(t1, t2), axis=-1)
    t = np.where((t_near <= t_far) & (t_near > 0), t_near, np.inf)
    p = o + np.where(np.isfinite(t), t, 0)[:, None] * d
    centre, half = (lo + hi) / 2, (hi - lo) / 2
    local = (p - centre) / half
    axis = np.abs(local).argmax(-1)
    normal = np.zeros_like(p)
    normal[np.arange(len(p)), axis] = np.sign(local[np.arange(len(p)), axis])
    return t, normal, texture(p)


def _stripes(n):
    band = (np.floor((np.arcsin(np.clip(n[:, 2], -1, 1)) + np.pi / 2) / (np.pi / 8)) % 2)[:, None]
    return band * np.array([0.95, 0.55, 0.1]) + (1 - band) * np.array([0.2, 0.45, 0.9])


def _dots(n):
    spot = (np.sin(9 * n[:, 0]) * np.sin(9 * n[:, 1]) * np.sin(9 * n[:, 2]) > 0)[:, None]
    return spot * np.array([0.9, 0.9, 0.85]) + (1 - spot) * np.array([0.8, 0.15, 0.25])


def _checker(p):
    cell = (np.floor(p[:, 0] * 5) + np.floor(p[:, 1] * 5) + np.floor(p[:, 2] * 5)) % 2
    return cell[:, None] * np.array([0.2, 0.8, 0.35]) + (1 - cell[:, None]) * np.array([0.95, 0.95, 0.95])


# --- batches ---------------------------------------------------------------------------------------------------
class RayBatcher:
    """Yields training rays on the device, one global batch per step, each rank taking its own share.

    Units are whole images (`batch_unit="image"`) or single pixels (`"ray"`). Each epoch is a fresh permutation
    of all units drawn from (seed, epoch), so the batch of any step is a pure function of (seed, step): a resumed
    run sees exactly the batches an uninterrupted one would. The last partial batch of an epoch is dropped.
    Rays are built on the device from the poses, so nothing per-pixel is stored besides the images.
    """

    def __init__(self, views: Views, unit: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        n_units = len(views) if unit == "image" else len(views) * views.height * views.width
        if batch_size > n_units:
            raise DataError(f"batch_size={batch_size} is larger than the {n_units} training "
                            f"{unit}s available")
        if batch_size % world_size:
            raise DataError(f"batch_size={batch_size} must be divisible by the {world_size} processes")
        self.views, self.unit, self.seed = views, unit, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.steps_per_epoch = n_units // batch_size
        self.n_units = n_units
        self._perm_epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.n_units, generator=gen).to(self.views.images.device)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rays for global step `step`: rays_o, rays_d, target rgb, each [R, 3]."""
        epoch, index = divmod(step, self.steps_per_epoch)
        per_rank = self.batch_size // self.world_size
        start = index * self.batch_size + self.rank * per_rank
        units = self._permutation(epoch)[start:start + per_rank]
        v = self.views
        if self.unit == "image":
            view = units[:, None, None].expand(-1, v.height, v.width)
            py, px = torch.meshgrid(torch.arange(v.height, device=units.device),
                                    torch.arange(v.width, device=units.device), indexing="ij")
            view, py, px = view.reshape(-1), py.expand(len(units), -1, -1).reshape(-1), px.expand(
                len(units), -1, -1).reshape(-1)
        else:
            view, pixel = units // (v.height * v.width), units % (v.height * v.width)
            py, px = pixel // v.width, pixel % v.width
        rays_o, rays_d = pixel_rays(v.poses[view], px.float(), py.float(), v.focal, v.height, v.width)
        return rays_o, rays_d, v.images[view, py, px]
