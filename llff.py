"""LLFF scene folders: the forward-facing captures of Local Light Field Fusion, as nerf-pytorch reads them.

A folder holds `poses_bounds.npy` and `images/` (optionally downsampled copies `images_4/`, `images_8/`, ... made
by LLFF's imgs2poses). poses_bounds.npy is a float array [N, 17], one row per image of `images/` in file-name
order. The first 15 numbers of a row are a 3x5 matrix (row-major):
- columns 0..2: the camera-to-world rotation, whose columns are the camera's axes in LLFF's order
  [down, right, backwards] (the camera looks along -z, as in OpenGL, but x points down and y right);
- column 3: the camera centre in world coordinates;
- column 4: [H, W, focal] of the images the poses were computed for, in pixels.
The last 2 numbers are the near and far depth bounds of the scene seen from that view (in world units).

This module returns poses in the convention of the rest of the code (cameras.py): camera-to-world, OpenGL axes
[right, up, backwards]. The rotation's columns are reordered as nerf-pytorch does: new = [col1, -col0, col2]
(right = old y; up = -down = -old x; backwards unchanged), which keeps det +1. The poses are not moved or
scaled: the bounds stay in the same world units as the camera centres, and the caller normalises both.

Intrinsics: one focal for x and y (square pixels), principal point at the image centre. The focal in the file is
for images W pixels wide; images of another width (a full-resolution `images/`, or `images_k/`) scale it by their
width / W. Every problem is a DataError naming the file.
"""

from __future__ import annotations

import os

import numpy as np

from scene_files import MIN_FRAMES, area_downscale, auto_downscale, read_image
from utils import DataError, print0

POSES_FILE = "poses_bounds.npy"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")  # compared in lower case
RIGID_TOLERANCE = 1e-3  # largest |R^T R - I| entry and |det R - 1| accepted for a rotation
ASPECT_TOLERANCE = 0.01  # relative mismatch of an image's height and H * width / W (plus one pixel of rounding)


def is_llff_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, POSES_FILE))


def read_llff(folder: str, downscale: int, max_side: int = 256) -> dict:
    """An LLFF folder -> the dict of scene_files.read_frames ("images" uint8 [N, h, w, 3 or 4], "poses" float64
    [N, 4, 4] OpenGL camera-to-world, unnormalised, "fx", "fy", "cx", "cy" float64 [N] in pixels of the returned
    images, "distortion" None, "names" [N] image paths, "aabb_scale" None, "downscale" the factor used) plus
    "bounds" float64 [N, 2] (near, far per view, world units of the poses). `images_{downscale}/` is read when
    it holds N images, else `images/` shrunk by area_downscale. downscale 0: the factor that brings the longer
    side to at most `max_side`, the full images cropped at their right and bottom edges to a multiple of it."""
    path = os.path.join(folder, POSES_FILE)
    poses, hwf, bounds = parse_poses_bounds(_load_array(path), path)
    n = len(poses)
    if n < MIN_FRAMES:
        raise DataError(f"{path} has {n} pose(s); training needs at least {MIN_FRAMES}")
    crop = downscale == 0
    factor = auto_downscale(*_full_size(folder, hwf), max_side) if crop else downscale
    names, reduce = _pick_images(folder, path, n, factor)
    images, (width, height) = _read_images(names, reduce, crop)
    _check_aspect(names[0], width, height, hwf, path)
    focal = hwf[:, 2] * (width / hwf[:, 1]) / reduce
    full = lambda value: np.full(n, float(value))
    return {"images": images, "poses": poses, "fx": focal.copy(), "fy": focal.copy(),
            "cx": full(width / 2 / reduce), "cy": full(height / 2 / reduce), "distortion": None, "names": names,
            "aabb_scale": None, "downscale": factor, "bounds": bounds}


def parse_poses_bounds(array: np.ndarray, path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """poses_bounds [N, 17] -> poses float64 [N, 4, 4] (OpenGL camera-to-world), hwf float64 [N, 3] (H, W, focal
    of the file) and bounds float64 [N, 2] (near, far). DataError naming `path` if anything is invalid."""
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] != 17:
        raise DataError(f"{path}: expected an array of shape [N, 17] (N > 0), got {list(array.shape)}")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise DataError(f"{path}: expected numbers, got an array of {array.dtype}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise DataError(f"{path} holds NaN or inf (row {int(np.flatnonzero(~np.isfinite(array).all(1))[0])})")
    m = array[:, :15].reshape(-1, 3, 5)
    rot = np.stack([m[:, :, 1], -m[:, :, 0], m[:, :, 2]], axis=-1)  # [down, right, back] -> [right, up, back]
    _check_rotations(rot, path)
    hwf, bounds = m[:, :, 4], array[:, 15:]
    _check_positive(hwf, bounds, path)
    poses = np.tile(np.eye(4), (len(m), 1, 1))
    poses[:, :3, :3], poses[:, :3, 3] = rot, m[:, :, 3]
    return poses, hwf, bounds


def _load_array(path: str) -> np.ndarray:
    """The array in the .npy file `path` (no pickles)."""
    try:
        return np.asarray(np.load(path, allow_pickle=False))
    except OSError as err:
        raise DataError(f"{path} cannot be read ({err.strerror or type(err).__name__})") from None
    except (ValueError, EOFError) as err:
        raise DataError(f"{path} is not a .npy array ({(str(err).splitlines() or [''])[0][:120]})") from None


def _check_rotations(rot: np.ndarray, path: str) -> None:
    """DataError unless every rotation [N, 3, 3] (OpenGL columns) is orthonormal with det +1."""
    error = np.abs(rot.transpose(0, 2, 1) @ rot - np.eye(3)).max(axis=(1, 2))
    bad = np.flatnonzero((error > RIGID_TOLERANCE) | (np.abs(np.linalg.det(rot) - 1) > RIGID_TOLERANCE))
    if len(bad):
        raise DataError(f"{path}: row {bad[0]} is not a rigid pose (the rotation, columns [down, right, back], "
                        f"must be orthonormal with det +1 once reordered to [right, up, back])")


def _check_positive(hwf: np.ndarray, bounds: np.ndarray, path: str) -> None:
    """DataError unless H, W, focal [N, 3] are > 0 and bounds [N, 2] have 0 < near < far."""
    bad = np.flatnonzero((hwf <= 0).any(axis=1))
    if len(bad):
        raise DataError(f"{path}: row {bad[0]}: H, W and focal must be > 0 (got {hwf[bad[0]].tolist()})")
    bad = np.flatnonzero(~((bounds[:, 0] > 0) & (bounds[:, 0] < bounds[:, 1])))
    if len(bad):
        raise DataError(f"{path}: row {bad[0]}: depth bounds must have 0 < near < far (got "
                        f"{bounds[bad[0]].tolist()})")


def _image_files(directory: str) -> list[str]:
    """The PNG and JPG files of `directory` (any case of extension, hidden files skipped), sorted by name."""
    return [os.path.join(directory, f) for f in sorted(os.listdir(directory))
            if not f.startswith(".") and f.lower().endswith(IMAGE_SUFFIXES)
            and os.path.isfile(os.path.join(directory, f))]


def _full_size(folder: str, hwf: np.ndarray) -> tuple[int, int]:
    """(width, height) of the full-resolution images: the first of images/ if there, else the file's W, H."""
    directory = os.path.join(folder, "images")
    files = _image_files(directory) if os.path.isdir(directory) else []
    if not files:
        return int(hwf[0, 1]), int(hwf[0, 0])
    import imageio.v3 as iio

    try:
        shape = iio.improps(files[0]).shape
    except Exception as err:  # whatever a damaged or foreign file raises
        raise DataError(f"{files[0]} is not a readable image ({type(err).__name__})") from None
    return int(shape[1]), int(shape[0])


def _pick_images(folder: str, path: str, n: int, factor: int) -> tuple[list[str], int]:
    """The n image files to read and the factor still to shrink them by: images_{factor}/ (factor 1) when it
    holds n images, else images/ (factor `factor`). DataError if images/ is absent or its count is not n."""
    small = os.path.join(folder, f"images_{factor}")
    if factor > 1 and os.path.isdir(small):
        files = _image_files(small)
        if len(files) == n:
            return files, 1
        print0(f"warning: {small} holds {len(files)} images but {path} has {n} poses: downscaling images/ "
               f"instead")
    directory = os.path.join(folder, "images")
    if not os.path.isdir(directory):
        raise DataError(f"{folder} has {POSES_FILE} but no images/ folder")
    files = _image_files(directory)
    if len(files) != n:
        raise DataError(f"{directory} holds {len(files)} images (PNG/JPG) but {path} has {n} poses: they must "
                        f"match one to one, in file-name order")
    return files, factor


def _read_images(names: list[str], factor: int, crop: bool) -> tuple[np.ndarray, tuple[int, int]]:
    """uint8 [N, h / factor, w / factor, C] of the images `names` and their (w, h) before shrinking. All must
    have one size and channel count; w, h must be divisible by factor unless `crop` (then cropped to it)."""
    images, first = None, None
    for k, name in enumerate(names):
        image = read_image(name)
        height, width, channels = image.shape
        if first is None:
            if not crop and (height % factor or width % factor):
                raise DataError(f"{name}: {width}x{height} pixels is not divisible by --downscale={factor}")
            first = (name, width, height, channels)
            images = np.empty((len(names), height // factor, width // factor, channels), np.uint8)
        elif (width, height) != first[1:3]:
            raise DataError(f"{name} is {width}x{height} pixels but {first[0]} is {first[1]}x{first[2]}: every "
                            f"image of a scene must have one size")
        elif channels != first[3]:
            raise DataError(f"{name} has {channels} channels but {first[0]} has {first[3]}: mix of RGB and RGBA "
                            f"images")
        images[k] = area_downscale(image[:height - height % factor, :width - width % factor], factor)
    return images, first[1:3]


def _check_aspect(name: str, width: int, height: int, hwf: np.ndarray, path: str) -> None:
    """DataError unless a width x height image has the aspect ratio of every row's W x H (one focal scales
    both axes)."""
    expected = hwf[:, 0] * width / hwf[:, 1]
    bad = np.flatnonzero(np.abs(height - expected) > 1 + ASPECT_TOLERANCE * expected)
    if len(bad):
        h, w = hwf[bad[0], :2]
        raise DataError(f"{name} is {width}x{height} pixels, not the aspect ratio of the {w:g}x{h:g} that row "
                        f"{bad[0]} of {path} gives")
