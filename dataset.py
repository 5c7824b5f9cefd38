"""Data: what --data points at, loaded as views (images, cameras, poses) with the data's background, and
on-device ray batches.

--data is one of
- `synthetic`: the built-in procedural scene (three textured primitives on black, with ground-truth depth);
- a tiny-NeRF `.npz`: `images` [N, H, W, 3] (float in [0, 1] or uint8), `poses` [N, 4, 4] camera-to-world, a
  scalar `focal` (square pixels, principal point at the centre), optionally `depth` [N, H, W] (camera-space z,
  0 where the ray hits nothing); composited on black; the last `val_views` views are held out;
- a NeRF-synthetic (Blender) scene folder (transforms_{train,val,test}.json + RGBA PNGs): trained on its train
  split, validated on `val_views` views of its val split spread evenly (all of them if it has fewer);
- an instant-ngp / nerfstudio capture: its transforms.json or the folder holding it; `val_views` frames spread
  evenly over the file-name order are held out. Its poses are normalised (cameras.normalise_capture);
- an LLFF folder (poses_bounds.npy + images/, forward-facing): read as a capture (llff.py).
`holdout_every` holds out every Nth view instead (the LLFF / mip-NeRF 360 protocol). scene_files.py reads the
folders. `downscale` shrinks every image by an integer factor with an area filter.

The background is a property of the data (`Background`), and every consumer asks it: the colour the renderer
composites on in training and in evaluation, which pixels see through the scene (carving, the background penalty,
the background-opacity metric). Data with alpha knows exactly: alpha 0 sees through. Data without alpha either
declares the colour its images were composited on (the tiny-NeRF files: black) and then a pixel within 1/255 of it
counts as background, or has a real background (captures) and no pixel is known to see through.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

import numpy as np
import torch

from cameras import CAPTURE_RADIUS, Cameras, normalise_capture, pose_spherical
from llff import is_llff_folder, read_llff
from renderer import pixel_rays
from scene_files import (blender_splits, capture_json, first_image_has_alpha, is_blender_folder, read_blender,
                         read_capture)
from utils import DataError  # lives in utils, so that run_cli reports it without importing this module

BACKGROUNDS = ("auto", "white", "black", "random", "none")
COLOURS = {"white": (1.0, 1.0, 1.0), "black": (0.0, 0.0, 0.0)}
SEE_THROUGH_TOLERANCE = 1.0 / 255.0  # data without alpha: a pixel this close to the background colour is background


# --- the background ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Background:
    """What lies behind the scene, for the data's images and for the renderer.

    train: "white", "black", "random" (a uniform colour per ray and step: empty space must be learnt empty, as
    instant-ngp and nerfacc train on RGBA data) or "none" (a real background the field itself must explain).
    eval: "white", "black" or "none": what held-out views are composited and rendered on.
    alpha: whether the images carry alpha (then targets are composited on the background per ray).
    """

    train: str
    eval: str
    alpha: bool

    @staticmethod
    def resolve(requested: str, alpha: bool, baked: str, source: str) -> "Background":
        """The background of data with (`alpha`) or without alpha, whose RGB images (without alpha) were composited
        on `baked` ("black", "white" or "none"), given --background=`requested`."""
        if requested not in BACKGROUNDS:
            raise DataError(f"background={requested!r} is not one of {', '.join(BACKGROUNDS)}")
        if alpha:
            if requested == "none":
                raise DataError(f"{source} has alpha, so its background is chosen: --background=white, black or "
                                f"random (auto: random in training, white in evaluation)")
            train = "random" if requested == "auto" else requested
            return Background(train, "white" if train == "random" else train, True)
        if requested == "random":
            raise DataError(f"{source} has no alpha: its background is in its images, so --background=random is "
                            f"impossible (use auto, or white/black/none to say what the images show)")
        colour = baked if requested == "auto" else requested
        return Background(colour, colour, False)

    def colour(self, kind: str, device=None) -> torch.Tensor | None:
        """[3] colour of a fixed background ("white", "black"), None for black or none (nothing is added)."""
        if kind == "white":
            return torch.ones(3, device=device)
        return None

    @property
    def known(self) -> bool:
        """Whether some pixels are known to see through the scene (alpha, or a declared background colour)."""
        return self.alpha or self.eval != "none"


# --- views -------------------------------------------------------------------------------------------------------
@dataclass
class Views:
    """A set of posed views, as tensors on one device.

    images: [N, H, W, 3] float32 in [0, 1] (tiny-NeRF files) or uint8; or [N, H, W, 4] uint8, premultiplied
    colour and alpha. Targets are made per ray (`pixels`), so nothing per pixel is stored besides the images.
    """

    images: torch.Tensor
    poses: torch.Tensor  # [N, 4, 4] float32 camera-to-world
    cameras: Cameras
    background: Background = Background("black", "black", False)
    depth: torch.Tensor | None = None  # [N, H, W] ground-truth camera-space depth (0 = background), if known
    aabb_scale: float | None = None  # a capture's scene extent, in units of the occupancy box
    numbers: torch.Tensor | None = None  # [N] each view's index in its file (None: 0 .. N-1)

    def __post_init__(self):
        if self.numbers is None:
            self.numbers = torch.arange(self.images.shape[0])

    @property
    def height(self) -> int:
        return self.images.shape[1]

    @property
    def width(self) -> int:
        return self.images.shape[2]

    @property
    def focal(self) -> float:
        """The focal length of data taken with one centred pinhole camera (the tiny-NeRF files); other data has
        per-view intrinsics in `cameras`."""
        focal = self.cameras.simple_focal()
        if focal is None:
            raise DataError("these views have per-view intrinsics (fx, fy, cx, cy, distortion), not one focal")
        return focal

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, index: slice | torch.Tensor) -> "Views":
        return replace(self, images=self.images[index], poses=self.poses[index], cameras=self.cameras.subset(index),
                       depth=None if self.depth is None else self.depth[index], numbers=self.numbers[index])

    def to(self, device) -> "Views":
        return replace(self, images=self.images.to(device), poses=self.poses.to(device),
                       cameras=self.cameras.to(device), depth=None if self.depth is None else self.depth.to(device))

    def rays(self, view: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through the centres of pixels (row py, column px) of views `view` (all [R]) -> rays_o, rays_d [R, 3]."""
        return self.cameras.rays(self.poses.index_select(0, view), view, px.float(), py.float())

    def values(self, view: torch.Tensor, py: torch.Tensor, px: torch.Tensor) -> torch.Tensor:
        """The stored values [R, C] of pixels (row py, column px) of views `view` (all [R], int64). index_select on
        the flat pixels: advanced indexing goes through a parallel kernel that, on a CPU shared with other work,
        waited ~8 ms for a descheduled thread per call where this takes 0.05 ms."""
        flat = (view * self.height + py) * self.width + px
        return self.images.reshape(-1, self.images.shape[-1]).index_select(0, flat)

    def image_rays(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rays through every pixel of view i -> rays_o, rays_d [H, W, 3]."""
        return self.cameras.image_rays(self.poses[i], i)

    def pixels(self, values: torch.Tensor, background: torch.Tensor | None) -> torch.Tensor:
        """Stored pixel values [..., C] -> float RGB [..., 3] in [0, 1] as seen on `background` ([..., 3] or [3];
        None: black or nothing). Only images with alpha are composited; RGB images already show their background."""
        rgb = values[..., :3].float() / 255.0 if values.dtype == torch.uint8 else values[..., :3].float()
        if values.shape[-1] == 4 and background is not None:
            rgb = rgb + (1.0 - values[..., 3:].float() / 255.0) * background
        return rgb

    def see_through(self, values: torch.Tensor) -> torch.Tensor | None:
        """Stored pixel values [..., C] -> bool [...]: the camera sees through the scene there (alpha 0, or the
        declared background colour to within 1/255); None when the data has a real background."""
        if values.shape[-1] == 4:
            return values[..., 3] == 0
        if not self.background.known:
            return None
        rgb = values[..., :3].float() / 255.0 if values.dtype == torch.uint8 else values[..., :3]
        # filled on the device: a tensor from a Python list is a host-to-device copy, which a GPU step waits for
        colour = torch.stack([values.new_full((), c, dtype=rgb.dtype) for c in COLOURS[self.background.eval]])
        return ((rgb - colour).abs() <= SEE_THROUGH_TOLERANCE).all(dim=-1)

    def eval_background(self) -> torch.Tensor | None:
        """[3] colour held-out views are rendered and scored on (None: black, or a real background)."""
        return self.background.colour(self.background.eval, self.images.device)

    def image(self, i: int) -> torch.Tensor:
        """View i as scored: float RGB [H, W, 3] on the evaluation background."""
        return self.pixels(self.images[i], self.eval_background())


# --- loading ----------------------------------------------------------------------------------------------------
def load_views(data: str, split: str = "all", val_views: int = 0, downscale: int = 1,
               background: str = "auto", holdout_every: int = 0) -> Views:
    """The views of `data` (see the module's docstring) in one split: "all", "train", "val" (held out:
    `val_views` of them, or every `holdout_every`-th) or "test" (a scene folder's test file)."""
    return open_data(data, downscale, background).views(split, val_views, holdout_every)


# downscale=0 (auto): a capture's images are shrunk until their longer side is at most this many pixels, so that
# the end-of-run validation and video take minutes on the device (fox, 1080x1920: 135x240 on a CPU, 540x960 on CUDA)
AUTO_MAX_SIDE = {"cpu": 256, "mps": 512, "cuda": 1024}


def train_val_views(cfg, device_type: str = "cpu"):
    """A run's data: (its config with the data's choices filled in: downscale, scene, near, far, occ_bound;
    training views; held-out views; the phrase saying what resolve_scene chose). downscale 0 is resolved for a
    `device_type` device (AUTO_MAX_SIDE)."""
    source = open_data(cfg.data, cfg.downscale, cfg.background, AUTO_MAX_SIDE.get(device_type, 256))
    train = source.views("train", cfg.val_views, cfg.holdout_every)
    cfg, phrase = resolve_scene(replace(cfg, downscale=source.downscale), train)
    return cfg, train, source.views("val", cfg.val_views, cfg.holdout_every), phrase


# --- the scene's extent ------------------------------------------------------------------------------------------
NEAR_PER_RADIUS = 0.05  # an unbounded scene's near plane, in units of the cameras' distance from the centre
DEFAULT_AABB_SCALE = 16.0  # a capture that gives no aabb_scale: content up to 16 times the cameras' distance


def resolve_scene(cfg, views: Views):
    """`cfg` with its scene kind, near, far and occupancy box set for the training `views` where they are auto
    (scene auto, near / far / occ_bound 0), and a phrase saying what was chosen.

    Bounded (the default for data whose background is known: alpha, or a declared colour): 2, 6, 1.5, the frame
    every loader puts an object in. Unbounded (auto for a real background): R = the cameras' largest distance from
    the scene's centre (the origin), the contraction the identity inside R (occ_bound = 2 R), near = 0.05 R, and
    far = R (1 + k sqrt(3)) with k the capture's aabb_scale (instant-ngp's scene extent in units of the cameras'
    region; DEFAULT_AABB_SCALE if absent): from a camera, across the farthest corner of that box. skip_with auto
    becomes what the scene skips empty space with (configs.skip_method)."""
    from configs import BOUNDED_SCENE, ConfigError, skip_method

    kind = cfg.scene if cfg.scene != "auto" else ("bounded" if views.background.known else "unbounded")
    cfg = replace(cfg, scene=kind)
    cfg = replace(cfg, skip_with=skip_method(cfg) or cfg.skip_with)
    skipping = {"grid": "occupancy grid",
                "proposal": f"the field at {cfg.fine_samples} samples per ray drawn from a {cfg.proposal_resolution}^3 "
                            f"proposal grid"}.get(skip_method(cfg), "no skipping")
    if kind == "bounded":
        chosen = {k: getattr(cfg, k) or v for k, v in BOUNDED_SCENE.items()}
        return replace(cfg, **chosen), (f"scene bounded: near {chosen['near']:g}, far {chosen['far']:g}, "
                                        f"{skipping} over +-{chosen['occ_bound']:g}")
    if cfg.model == "grid":  # a dense grid fine enough for the object cannot also span the contracted room
        raise ConfigError(f"model=grid (the fast preset's voxel grid) spans +-{cfg.grid_bound:g} and cannot model an "
                          f"unbounded scene: train exp1 on it, or pass --scene=bounded to model that box alone")
    radius = float(views.poses[:, :3, 3].norm(dim=-1).max())
    extent = views.aabb_scale or DEFAULT_AABB_SCALE
    derived = {"near": NEAR_PER_RADIUS * radius, "far": radius * (1 + extent * math.sqrt(3)), "occ_bound": 2 * radius}
    chosen = {k: float(f"{getattr(cfg, k) or v:.4g}") for k, v in derived.items()}
    source = "aabb_scale" if views.aabb_scale else "default extent"
    return replace(cfg, **chosen), (
        f"scene unbounded (a real background): contracted beyond radius {chosen['occ_bound'] / 2:g} (the cameras' "
        f"distance), near {chosen['near']:g}, far {chosen['far']:g} ({source} {extent:g}), samples even in depth "
        f"to the radius and in disparity beyond, {skipping} over the contracted +-{chosen['occ_bound']:g}")


def evaluation_background(data: str, background: str) -> torch.Tensor | None:
    """The colour [3] (None: black or none) views of `data` are scored on under --background=`background`,
    found without loading the data (one image is read to see whether it has alpha). Data that cannot be read any
    more: the colour asked for, else black."""
    if background == "auto":
        json_path = os.path.join(data, "transforms_train.json") if is_blender_folder(data) else capture_json(data)
        try:
            alpha = json_path is not None and first_image_has_alpha(json_path)
        except DataError:
            alpha = False
        background = "white" if alpha else "black"  # RGBA: random in training, white in evaluation
    return torch.ones(3) if background in ("white", "random") else None


def open_data(data: str, downscale: int = 1, background: str = "auto", max_side: int = 256) -> "DataSource":
    """The views `data` names, shrunk `downscale` times (0: a capture to at most `max_side` pixels, other data as
    it is). The factor used is the source's `downscale`."""
    if not (isinstance(downscale, int) and downscale >= 0):
        raise DataError(f"downscale must be an integer >= 1, or 0 for auto (got {downscale})")
    if data == "synthetic":
        return DataSource(data, "synthetic", _downscaled(views_from_arrays(synthetic_scene(), "synthetic scene",
                                                                           background), downscale or 1),
                          downscale or 1)
    if is_blender_folder(data):
        return DataSource(data, "blender", None, downscale or 1, background)
    if is_llff_folder(data):
        return DataSource(data, "capture", *_llff(data, downscale, background, max_side))
    if os.path.isdir(data) and capture_json(data) is None:
        raise DataError(f"{data} is a folder without transforms_train.json (a NeRF-synthetic scene), "
                        f"transforms.json (an instant-ngp / nerfstudio capture) or poses_bounds.npy (LLFF)")
    json_path = capture_json(data)
    if json_path is not None:
        scene = read_capture(json_path, downscale, max_side)
        return DataSource(data, "capture", _from_scene(scene, background, json_path), scene["downscale"])
    return DataSource(data, "npz", _downscaled(load_npz(data, background), downscale or 1), downscale or 1)


class DataSource:
    """Where views come from: a loaded set (npz, synthetic, capture) split by index, or a scene folder read one
    split file at a time."""

    def __init__(self, data: str, kind: str, views: Views | None, downscale: int = 1, background: str = "auto"):
        self.data, self.kind, self.all, self.downscale, self.background = data, kind, views, downscale, background

    @property
    def splits(self) -> tuple[str, ...]:
        return ("all", *blender_splits(self.data)) if self.kind == "blender" else ("all", "train", "val")

    def views(self, split: str, val_views: int, holdout_every: int = 0) -> Views:
        """The views of `split` ("all", "train", "val": `val_views` held out, or every `holdout_every`-th view
        when > 0; "test": a scene folder's)."""
        if split not in self.splits:
            raise DataError(f"{self.data} has no {split} split (its splits: {', '.join(self.splits)})")
        if self.kind == "blender" and holdout_every and split != "all":
            raise DataError(f"{self.data} is a NeRF-synthetic scene with its own val split: --holdout_every "
                            f"applies to captures and .npz files (use --val_views)")
        if self.kind == "blender":
            if split == "all":
                return concat_views([self._blender(s) for s in blender_splits(self.data)])
            views = self._blender(split)
            return views.subset(spread(len(views), val_views)) if split == "val" and 0 < val_views < len(
                views) else views
        return self.all if split == "all" else self.all.subset(self.numbers(split, val_views, holdout_every))

    def numbers(self, split: str, val_views: int, holdout_every: int = 0) -> torch.Tensor:
        """[n] indices into the loaded views of a held-out split ("val", or "train": the rest). holdout_every
        k > 0: views 0, k, 2k, ... (LLFF's and mip-NeRF 360's protocol, k = 8); else `val_views` of them, the
        last ones of a .npz, spread evenly over a capture."""
        n = len(self.all)
        if holdout_every:
            if not 1 < holdout_every <= n:
                raise DataError(f"the data has {n} views: --holdout_every={holdout_every} must be between 2 and {n}")
            held = torch.arange(0, n, holdout_every)
        elif self.kind == "capture":
            held = spread(n, _check_val_views(n, val_views))
        else:
            held = torch.arange(n - _check_val_views(n, val_views), n)
        if split == "val":
            return held
        keep = torch.ones(n, dtype=torch.bool)
        keep[held] = False
        return keep.nonzero().squeeze(1)

    def _blender(self, split: str) -> Views:
        path = os.path.join(self.data, f"transforms_{split}.json")
        return _from_scene(read_blender(self.data, split, self.downscale), self.background, path)


def spread(n: int, k: int) -> torch.Tensor:
    """k indices spread evenly over range(n): the middle of each of k equal parts."""
    return torch.tensor([int((j + 0.5) * n / k) for j in range(k)], dtype=torch.long)


def _check_val_views(n: int, n_val: int) -> int:
    if not 0 < n_val < n:
        raise DataError(f"the data has {n} views: cannot hold out {n_val} for validation and still train (set "
                        f"--val_views between 1 and {n - 1})")
    return n_val


def concat_views(parts: list[Views]) -> Views:
    first = parts[0]
    cat = lambda get: torch.cat([get(p) for p in parts])
    cameras = Cameras(cat(lambda p: p.cameras.fx), cat(lambda p: p.cameras.fy), cat(lambda p: p.cameras.cx),
                      cat(lambda p: p.cameras.cy), first.height, first.width,
                      None if first.cameras.distortion is None else cat(lambda p: p.cameras.distortion))
    return replace(first, images=cat(lambda p: p.images), poses=cat(lambda p: p.poses), cameras=cameras, depth=None,
                   numbers=torch.arange(sum(len(p) for p in parts)))


def _llff(folder: str, downscale: int, background: str, max_side: int) -> tuple[Views, int]:
    """An LLFF folder's views, normalised as a capture is: forward-facing cameras look at a point the geometric
    mean of the median near and far bounds ahead, which lands CAPTURE_RADIUS in front of them; the far bound sets
    the scene's extent (its aabb_scale, in units of that distance). No NDC warp: the unbounded scene's
    contraction and disparity-spaced samples model forward-facing scenes as well (mip-NeRF 360's answer)."""
    scene = read_llff(folder, downscale, max_side)
    near, far = np.median(scene["bounds"], axis=0)
    scene["poses"], info = normalise_capture(scene["poses"], depth=math.sqrt(near * far))
    scene["aabb_scale"] = float(scene["bounds"][:, 1].max() * info["scale"] / CAPTURE_RADIUS)
    return _from_scene(scene, background, os.path.join(folder, "poses_bounds.npy")), scene["downscale"]


def _from_scene(scene: dict, background: str, source: str) -> Views:
    images = torch.from_numpy(scene["images"])
    alpha = images.shape[-1] == 4
    as_tensor = lambda key: torch.from_numpy(np.asarray(scene[key], dtype=np.float32))
    distortion = None if scene["distortion"] is None else as_tensor("distortion")
    cameras = Cameras(as_tensor("fx"), as_tensor("fy"), as_tensor("cx"), as_tensor("cy"), images.shape[1],
                      images.shape[2], distortion)
    return Views(images, as_tensor("poses"), cameras, Background.resolve(background, alpha, "none", source),
                 aabb_scale=scene.get("aabb_scale"))


def _downscaled(views: Views, factor: int) -> Views:
    """Views of a tiny-NeRF file or the procedural scene shrunk `factor` times (block means; depth: the mean over
    the block's pixels that have depth)."""
    if factor == 1:
        return views
    n, h, w, c = views.images.shape
    if h % factor or w % factor:
        raise DataError(f"views of {w}x{h} pixels are not divisible by --downscale={factor}")
    blocks = lambda t: t.reshape(n, h // factor, factor, w // factor, factor, *t.shape[3:])
    images = blocks(views.images.double()).mean(dim=(2, 4))
    images = images.round().to(torch.uint8) if views.images.dtype == torch.uint8 else images.float()
    depth = None
    if views.depth is not None:
        d = blocks(views.depth.double())
        known = (d > 0).double().sum(dim=(2, 4))
        depth = (d.sum(dim=(2, 4)) / known.clamp_min(1)).float()
    return replace(views, images=images, cameras=views.cameras.scaled(factor), depth=depth)


def load_npz(path: str, background: str = "auto") -> Views:
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
    return views_from_arrays(arrays, path, background)


def views_from_arrays(arrays: dict, source: str = "data", background: str = "auto") -> Views:
    """Views of tiny-NeRF arrays (images composited on black unless --background says otherwise)."""
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
    cameras = Cameras.pinhole(len(images), focal, images.shape[1], images.shape[2])
    return Views(torch.from_numpy(images), torch.from_numpy(poses), cameras,
                 Background.resolve(background, False, "black", source), depth)


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


def split_views(views: Views, n_val: int) -> tuple[Views, Views]:
    """Hold out the last `n_val` views (the tiny NeRF split: 106 = 95 train + 11 validation)."""
    _check_val_views(len(views), n_val)
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


def write_synthetic_capture(folder: str, n_views: int = 60, width: int = 120, height: int = 96, seed: int = 7) -> None:
    """The procedural scene as an instant-ngp / nerfstudio capture in `folder`: transforms.json (OPENCV camera
    with its principal point off the centre and a radial-tangential distortion) and JPG frames in images/, seen
    in front of a uniform blue-grey background, the poses in a frame of their own (rotated, scaled by 0.4 and
    shifted), so that loading it exercises every step a real capture needs."""
    import json

    import imageio.v3 as iio

    from cameras import pinhole_directions

    intrinsics = {"w": width, "h": height, "fl_x": 1.1 * width, "fl_y": 1.15 * width, "cx": 0.5875 * width,
                  "cy": 0.40625 * height, "k1": -0.08, "k2": 0.01, "p1": 0.002, "p2": -0.001}
    distortion = torch.tensor([-0.08, 0.01, 0.0, 0.002, -0.001], dtype=torch.float64)
    py, px = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    cam_dirs = pinhole_directions(px, py, intrinsics["fl_x"], intrinsics["fl_y"], intrinsics["cx"],
                                  intrinsics["cy"], distortion).numpy()
    rng = np.random.default_rng(seed)
    angle = 0.9
    turn = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    turn = turn @ np.array([[1, 0, 0], [0, math.cos(0.4), -math.sin(0.4)], [0, math.sin(0.4), math.cos(0.4)]])
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    frames = []
    for i in range(n_views):
        c2w = pose_spherical(rng.uniform(0, 360), rng.uniform(-70, -10), 4.0).double().numpy()
        dirs = cam_dirs @ c2w[:3, :3].T
        rgb, depth = _trace(np.broadcast_to(c2w[:3, 3], dirs.shape).reshape(-1, 3), dirs.reshape(-1, 3))
        rgb = np.where(depth[:, None] > 0, rgb, [0.25, 0.55, 0.75]).reshape(height, width, 3)
        name = f"images/frame_{i:05d}.jpg"
        iio.imwrite(os.path.join(folder, name), np.round(rgb * 255).astype(np.uint8), quality=95)
        moved = np.eye(4)
        moved[:3, :3] = turn @ c2w[:3, :3]
        moved[:3, 3] = 0.4 * turn @ c2w[:3, 3] + [1.0, 2.0, -0.5]
        frames.append({"file_path": name, "transform_matrix": moved.tolist()})
    with open(os.path.join(folder, "transforms.json"), "w") as f:
        json.dump({"camera_model": "OPENCV", **intrinsics, "aabb_scale": 1, "frames": frames}, f, indent=1)


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

    Units are whole images (`batch_unit="image"`: each epoch a fresh permutation of the views) or single pixels
    (`"ray"`: each step draws its rays uniformly with replacement over every training pixel, as instant-ngp and
    nerfacc do, so no per-pixel permutation is ever held: 100 views at 800x800 are 64 M rays). Every draw comes
    from (seed, step) on the images' device and is made for the whole global batch before each rank takes its
    slice, so the batch of any step is a pure function of (seed, step), whatever the number of ranks: a resumed
    run sees exactly the batches an uninterrupted one would, and N ranks see the one-process batch.
    An epoch is as many rays (or images) as the training set holds; its last partial batch is dropped.
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
        self._drawn: tuple | None = None  # (step, view, py, px, background) of the last batch

    def _generator(self, step: int) -> torch.Generator:
        device = self.views.images.device
        return torch.Generator(device=device).manual_seed(self.seed * 100003 + step)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)
            self._perm = torch.randperm(self.n_units, generator=gen).to(self.views.images.device)
            self._perm_epoch = epoch
        return self._perm

    def _draw(self, step: int):
        """This rank's pixels (view, row, column) [R] and background colours [R, 3] (or None) for `step`."""
        if self._drawn is not None and self._drawn[0] == step:
            return self._drawn[1:]
        v, device = self.views, self.views.images.device
        per_rank = self.batch_size // self.world_size
        mine = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        gen = self._generator(step)
        if self.unit == "image":
            epoch, index = divmod(step, self.steps_per_epoch)
            units = self._permutation(epoch)[index * self.batch_size:(index + 1) * self.batch_size][mine]
            view = units[:, None, None].expand(-1, v.height, v.width)
            py, px = torch.meshgrid(torch.arange(v.height, device=device), torch.arange(v.width, device=device),
                                    indexing="ij")
            view, py, px = (t.expand(len(units), -1, -1).reshape(-1) for t in (view, py, px))
        else:
            units = torch.randint(self.n_units, (self.batch_size,), generator=gen, device=device)[mine]
            view, pixel = units // (v.height * v.width), units % (v.height * v.width)
            py, px = pixel // v.width, pixel % v.width
        background = self._background(gen, len(view), device)
        self._drawn = (step, view, py, px, background)
        return view, py, px, background

    def _background(self, gen: torch.Generator, n_rays: int, device) -> torch.Tensor | None:
        kind = self.views.background.train
        if kind == "random":  # one colour per ray, drawn for the whole global batch
            colours = torch.rand(n_rays * self.world_size, 3, generator=gen, device=device)
            return colours[self.rank * n_rays:(self.rank + 1) * n_rays]
        colour = self.views.background.colour(kind, device)
        return None if colour is None else colour.expand(n_rays, 3)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This rank's rays for global step `step`: rays_o, rays_d, target rgb (on the step's background), [R, 3]."""
        view, py, px, background = self._draw(step)
        rays_o, rays_d = self.views.rays(view, py, px)
        return rays_o, rays_d, self.views.pixels(self.views.values(view, py, px), background)

    def background(self, step: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """What lies behind this rank's rays of step `step`: the colour the renderer composites on [R, 3] (None:
        nothing), and which rays see through the scene [R] bool (None: not known, a real background)."""
        view, py, px, background = self._draw(step)
        return background, self.views.see_through(self.views.values(view, py, px))
