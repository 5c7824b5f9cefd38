"""Scene folders on disk: the NeRF-synthetic (Blender) layout and instant-ngp / nerfstudio captures.

Both are a transforms JSON (`frames`, each with a `file_path` and a camera-to-world `transform_matrix` in the
OpenGL convention: camera looking along -z, +y up) beside the images. What differs is what the numbers mean:
- a Blender scene folder holds transforms_{train,val,test}.json with one `camera_angle_x` and RGBA PNGs; its poses
  are already in the frame the presets expect (object at the origin, cameras ~4 away, z up) and are kept as
  they are;
- a capture's transforms.json (instant-ngp's colmap2nerf, nerfstudio's ns-process-data) gives intrinsics in
  pixels (`fl_x`, `fl_y`, `cx`, `cy`, `w`, `h`; per file or per frame), often a lens distortion (`k1`, `k2`,
  `k3`, `p1`, `p2`, OpenCV's model, undistorted per ray: cameras.py), `aabb_scale`, and JPGs with a real
  background; its poses are moved into the presets' frame by cameras.normalise_capture.
Images are PNG or JPG, 8 or 16 bits per channel, RGB or RGBA. They are kept as uint8: RGB as is, RGBA as
premultiplied colour (colour x alpha) plus alpha, so that the area filter of `downscale` averages what the camera
sees (premultiplied colour and coverage) and compositing on any background is one multiply-add. 16-bit images
keep 8 bits: Pillow reads a 16-bit RGB(A) PNG as its high bytes; other 16-bit arrays are rounded (v / 257).
Everything wrong with a file is a DataError naming the file and the problem.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

from cameras import normalise_capture
from utils import DataError, print0

DISTORTION_KEYS = ("k1", "k2", "k3", "p1", "p2")  # the order of cameras.Cameras.distortion
PINHOLE_MODELS = ("OPENCV", "PINHOLE", "SIMPLE_PINHOLE")  # nerfstudio's names; absent means OPENCV
IMAGE_EXTENSIONS = ("", ".png", ".PNG", ".jpg", ".JPG", ".jpeg", ".JPEG")


def is_blender_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, "transforms_train.json"))


def capture_json(path: str) -> str | None:
    """The transforms.json of a capture that `path` names (the file, or a folder holding it), else None."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "transforms.json")):
        return os.path.join(path, "transforms.json")
    if os.path.isfile(path) and path.endswith(".json"):
        return path
    return None


def blender_splits(folder: str) -> list[str]:
    return [s for s in ("train", "val", "test") if os.path.isfile(os.path.join(folder, f"transforms_{s}.json"))]


def read_blender(folder: str, split: str, downscale: int) -> dict:
    """One split of a NeRF-synthetic scene folder: see read_frames for the dict."""
    path = os.path.join(folder, f"transforms_{split}.json")
    if not os.path.isfile(path):
        raise DataError(f"{folder} has no transforms_{split}.json (its splits: {', '.join(blender_splits(folder))})")
    return read_frames(path, downscale, sort=False)


def read_capture(path: str, downscale: int, max_side: int = 256) -> dict:
    """A capture's transforms.json, its poses normalised (cameras.normalise_capture); see read_frames."""
    scene = read_frames(path, downscale, sort=True, max_side=max_side)
    scene["poses"], scene["normalisation"] = normalise_capture(scene["poses"])
    return scene


def first_image_has_alpha(path: str) -> bool:
    """Whether the first frame of the transforms file `path` is an RGBA image (DataError if unreadable)."""
    frames, names = _frames_with_images(path, _read_json(path), sort=False, warn=False)
    return read_image(names[0]).shape[2] == 4


def auto_downscale(width: int, height: int, max_side: int) -> int:
    """The smallest integer factor that brings the longer side of a width x height image to at most max_side."""
    return max(1, math.ceil(max(width, height) / max_side))


def read_frames(path: str, downscale: int, sort: bool, max_side: int = 256) -> dict:
    """A transforms JSON and its images -> {"images": uint8 [N, h, w, 3 or 4] (RGBA premultiplied), "poses":
    float64 [N, 4, 4], "fx", "fy", "cx", "cy": float64 [N] (pixels of the downscaled images), "distortion": float64
    [N, 5] or None, "names": [N] file paths, "aabb_scale": float or None, "downscale": the factor used}.
    `sort`: frames in file-name order. Frames whose image file is absent are skipped with one warning line (as
    instant-ngp and nerfstudio load a capture whose blurry frames were deleted). downscale 0: auto_downscale to
    `max_side`, the images cropped at their right and bottom edges to a multiple of the factor (which keeps the
    intrinsics: pixel coordinates start at the top-left corner)."""
    meta = _read_json(path)
    frames, names = _frames_with_images(path, meta, sort, warn=True)
    n = len(frames)
    poses = np.stack([_matrix(f, k, path) for k, f in enumerate(frames)])
    images, fx, fy, cx, cy, dist = None, np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros((n, 5))
    crop = downscale == 0
    for k, (frame, name) in enumerate(zip(frames, names)):
        image = read_image(name)
        height, width = image.shape[:2]
        intr = _intrinsics({**meta, **frame}, width, height, name, path)
        if images is None:
            if crop:
                downscale = auto_downscale(width, height, max_side)
            elif height % downscale or width % downscale:
                raise DataError(f"{name}: {width}x{height} pixels is not divisible by --downscale={downscale}")
            images = np.empty((n, height // downscale, width // downscale, image.shape[2]), np.uint8)
            first = (name, width, height, image.shape[2])
        elif (width, height) != first[1:3]:
            raise DataError(f"{name} is {width}x{height} pixels but {first[0]} is {first[1]}x{first[2]}: every "
                            f"image of a scene must have one size")
        elif image.shape[2] != first[3]:
            raise DataError(f"{name} has {image.shape[2]} channels but {first[0]} has {first[3]}: mix of RGB and "
                            f"RGBA images")
        if crop:
            image = image[:height - height % downscale, :width - width % downscale]
        images[k] = area_downscale(image, downscale)
        fx[k], fy[k], cx[k], cy[k] = (v / downscale for v in intr[:4])
        dist[k] = intr[4]
    aabb = meta.get("aabb_scale")
    if aabb is not None and not (isinstance(aabb, (int, float)) and math.isfinite(aabb) and aabb > 0):
        raise DataError(f"{path}: aabb_scale must be a number > 0 (got {aabb!r})")
    return {"images": images, "poses": poses, "fx": fx, "fy": fy, "cx": cx, "cy": cy,
            "distortion": dist if np.any(dist) else None, "names": names, "aabb_scale": aabb,
            "downscale": downscale}


MIN_FRAMES = 2  # fewer cannot be split into training and held-out views


def _frames_with_images(path: str, meta: dict, sort: bool, warn: bool) -> tuple[list[dict], list[str]]:
    """The frames of a transforms file whose image exists, and those images' paths. A file without frames, or
    with fewer than MIN_FRAMES images, is a DataError; skipped frames are one warning line (if `warn`)."""
    frames = meta.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DataError(f"{path} has no frames (a transforms file needs a non-empty 'frames' list)")
    if not all(isinstance(f, dict) for f in frames):
        raise DataError(f"{path}: every entry of 'frames' must be an object with file_path and transform_matrix")
    if sort:
        frames = sorted(frames, key=lambda f: str(f.get("file_path", "")))
    folder = os.path.dirname(os.path.abspath(path))
    found = [(f, _image_path(folder, f, k, path)) for k, f in enumerate(frames)]
    kept = [(f, name) for f, name in found if name is not None]
    missing = [str(f["file_path"]) for f, name in found if name is None]
    if len(kept) < MIN_FRAMES:
        raise DataError(f"{path}: {len(kept)} of its {len(frames)} frames have an image file (missing: "
                        f"{_first_names(missing)}); training needs at least {MIN_FRAMES}")
    if missing and warn:
        print0(f"warning: {path}: skipped {len(missing)} of {len(frames)} frames whose image file is absent "
               f"({_first_names(missing)})")
    return [f for f, _ in kept], [name for _, name in kept]


def _first_names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            meta = json.load(f)
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or type(err).__name__})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path} is not valid JSON ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(meta, dict):
        raise DataError(f"{path} must hold a JSON object with 'frames'")
    return meta


def _matrix(frame: dict, k: int, path: str) -> np.ndarray:
    where = f"{path}: frame {k} ({frame.get('file_path', '?')})"
    try:
        m = np.asarray(frame["transform_matrix"], dtype=np.float64)
    except KeyError:
        raise DataError(f"{where} has no transform_matrix") from None
    except (TypeError, ValueError):
        raise DataError(f"{where}: transform_matrix must be a 4x4 matrix of numbers") from None
    if m.shape == (3, 4):
        m = np.concatenate([m, [[0.0, 0.0, 0.0, 1.0]]])
    if m.shape != (4, 4):
        raise DataError(f"{where}: transform_matrix must be 4x4 (or 3x4), got shape {list(m.shape)}")
    if not np.isfinite(m).all():
        raise DataError(f"{where}: transform_matrix holds NaN or inf")
    rot = m[:3, :3]
    if (np.abs(rot @ rot.T - np.eye(3)).max() > 1e-3 or abs(np.linalg.det(rot) - 1) > 1e-3
            or np.abs(m[3] - [0, 0, 0, 1]).max() > 1e-6):
        raise DataError(f"{where}: transform_matrix is not a rigid camera-to-world matrix (rotation must be "
                        f"orthonormal with det +1, last row 0 0 0 1)")
    return m


def _image_path(folder: str, frame: dict, k: int, path: str) -> str | None:
    """The image file of frame k (the file_path as given, or with an image extension), None if absent."""
    name = frame.get("file_path")
    if not isinstance(name, str) or not name:
        raise DataError(f"{path}: frame {k} has no file_path")
    base = os.path.normpath(os.path.join(folder, name))
    for ext in IMAGE_EXTENSIONS:  # the NeRF-synthetic files name their PNGs without the extension
        if os.path.isfile(base + ext):
            return base + ext
    return None


def read_image(path: str) -> np.ndarray:
    """[H, W, 3 or 4] uint8 of a PNG or JPG (16-bit values to 8 bits; RGBA premultiplied)."""
    import imageio.v3 as iio

    try:
        image = np.asarray(iio.imread(path))
    except Exception as err:  # whatever a damaged or foreign file raises
        raise DataError(f"{path} is not a readable image ({type(err).__name__}: "
                        f"{(str(err).strip().splitlines() or [''])[0][:120]})") from None
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or min(image.shape[:2]) == 0:
        raise DataError(f"{path}: expected an RGB or RGBA image, got an array of shape {list(image.shape)}")
    if image.dtype == np.uint16:
        image = ((image.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise DataError(f"{path}: expected 8- or 16-bit channels, got {image.dtype}")
    if image.shape[2] == 4:
        alpha = image[..., 3:].astype(np.uint32)
        rgb = (image[..., :3].astype(np.uint32) * alpha + 127) // 255
        image = np.concatenate([rgb, alpha], axis=-1).astype(np.uint8)
    return image


def area_downscale(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, C] -> uint8 [H / factor, W / factor, C]: the mean of each factor x factor block, rounded."""
    if factor == 1:
        return image
    h, w, c = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.uint32).sum(axis=(1, 3))
    area = factor * factor
    return ((blocks + area // 2) // area).astype(np.uint8)


def _intrinsics(meta: dict, width: int, height: int, name: str, path: str):
    """(fx, fy, cx, cy, distortion [5]) of one frame at full resolution, from the frame's keys over the file's."""
    model = meta.get("camera_model", "OPENCV")
    if model not in PINHOLE_MODELS or meta.get("is_fisheye") or any(
            meta.get(k, 0) for k in ("k4", "k5", "k6")):
        raise DataError(f"{path}: camera model {model}{' (fisheye)' if meta.get('is_fisheye') else ''} is not "
                        f"supported: only pinhole cameras with OpenCV's radial-tangential distortion "
                        f"(k1, k2, k3, p1, p2)")
    for key, size in (("w", width), ("h", height)):
        if key in meta and _number(meta[key], key, path) != size:
            raise DataError(f"{name} is {width}x{height} pixels but {os.path.basename(path)} says "
                            f"{meta.get('w')}x{meta.get('h')}")
    if "fl_x" in meta:
        fx = _number(meta["fl_x"], "fl_x", path)
    elif "camera_angle_x" in meta:
        fx = 0.5 * width / math.tan(0.5 * _number(meta["camera_angle_x"], "camera_angle_x", path))
    else:
        raise DataError(f"{path} gives no focal length (fl_x or camera_angle_x)")
    if "fl_y" in meta:
        fy = _number(meta["fl_y"], "fl_y", path)
    elif "camera_angle_y" in meta:
        fy = 0.5 * height / math.tan(0.5 * _number(meta["camera_angle_y"], "camera_angle_y", path))
    else:
        fy = fx
    cx = _number(meta.get("cx", width / 2), "cx", path)
    cy = _number(meta.get("cy", height / 2), "cy", path)
    if not (fx > 0 and fy > 0):
        raise DataError(f"{path}: focal lengths must be > 0 (got fl_x {fx}, fl_y {fy})")
    return fx, fy, cx, cy, [_number(meta.get(k, 0.0), k, path) for k in DISTORTION_KEYS]


def _number(value, key: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{path}: {key} must be a finite number (got {value!r})")
    return float(value)
