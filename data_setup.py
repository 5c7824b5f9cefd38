"""Data files in the tiny-NeRF format: fetch the tiny NeRF data, convert a NeRF-synthetic (Blender) scene, or
write the procedural scene.

    python data_setup.py                              # -> data/tiny_nerf_data.npz (skipped if already valid)
    python data_setup.py --out PATH.npz               # elsewhere
    python data_setup.py --force                      # fetch again even if a valid file is there
    python data_setup.py --synthetic data/synth.npz   # the built-in procedural scene, no network
    python data_setup.py --blender nerf_synthetic/lego --size 100 --leave-out 10:5 --out data/lego100.npz

`--blender` reads a scene folder of the NeRF-synthetic dataset (transforms_<split>.json and its RGBA PNGs),
composites every view on black (colour x alpha, PNG alpha being straight) and shrinks it to `--size` pixels wide
with an area filter (the mean of each k x k block, k = source width / size; computed exactly from the 8-bit
values, then stored as float32). Poses are the JSON's transform_matrix as float32; focal = size / 2 /
tan(camera_angle_x / 2). `--leave-out STEP:START` drops the frames START, START + STEP, ... (0-based, in the
JSON's order). The command above rebuilds the 90-view lego file behind the README's lego results.

The download streams to a temporary file beside the target, is checked (exact byte size, then loaded and
validated by `dataset.load_npz` with the expected shapes) and only then renamed over the target, so a failed or
interrupted download never leaves half a file and never replaces a good one. Network failures, timeouts and
server errors (5xx, 429) are retried with exponential backoff; other HTTP errors and a wrong file are not.
Every failure ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import requests

from dataset import DataError, Views, load_npz, synthetic_scene, views_from_arrays
from utils import ArgParser, UserError, atomic_write, run_cli

URL = "http://cseweb.ucsd.edu/~viscomp/projects/LF/papers/ECCV20/nerf/tiny_nerf_data.npz"
EXPECTED_BYTES = 12_727_482
EXPECTED_SHAPES = {"images": (106, 100, 100, 3), "poses": (106, 4, 4)}
DEFAULT_OUT = os.path.join("data", "tiny_nerf_data.npz")
CHUNK_BYTES = 1 << 16


class DownloadError(UserError):
    """A download that cannot succeed now. `retry` says whether trying again later might help."""

    def __init__(self, message: str, retry: bool):
        super().__init__(message)
        self.retry = retry


# --- checking ---------------------------------------------------------------------------------------------------
def check_tiny_nerf(path: str) -> Views:
    """The views in `path` if it is exactly the tiny NeRF file (size, keys, shapes, values); else DataError."""
    size = os.path.getsize(path)
    if size != EXPECTED_BYTES:
        raise DataError(f"has {size:,} bytes, expected {EXPECTED_BYTES:,}")
    views = load_npz(path)
    got = {"images": tuple(views.images.shape), "poses": tuple(views.poses.shape)}
    for key, shape in EXPECTED_SHAPES.items():
        if got[key] != shape:
            raise DataError(f"{key} has shape {list(got[key])}, expected {list(shape)}")
    return views


def is_valid(path: str) -> bool:
    try:
        check_tiny_nerf(path)
        return True
    except (DataError, OSError):
        return False


# --- downloading ------------------------------------------------------------------------------------------------
def fetch(url: str, path: str, timeout_s: float) -> None:
    """One attempt: stream `url` into `path` (a fresh temporary) with a progress bar. Raises DownloadError."""
    from tqdm import tqdm

    try:
        with requests.get(url, stream=True, timeout=timeout_s) as response:
            if response.status_code != 200:
                reason = f"HTTP {response.status_code} {response.reason or ''}".strip()
                # 5xx and 429 are the server's passing trouble; 404 and friends will not change on a retry
                raise DownloadError(reason, retry=response.status_code >= 500 or response.status_code == 429)
            announced = int(response.headers.get("Content-Length") or 0) or None
            received = 0
            # disable=None: a bar on a terminal, nothing in logs and pipes
            with open(path, "wb") as f, tqdm(total=announced, unit="B", unit_scale=True, unit_divisor=1024,
                                              desc=os.path.basename(url), disable=None, leave=False) as bar:
                for chunk in response.iter_content(CHUNK_BYTES):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except requests.exceptions.Timeout:
        raise DownloadError(f"timed out (no data for {timeout_s:g} s)", retry=True) from None
    except requests.exceptions.RequestException as err:  # no connection, DNS, reset, broken chunked transfer
        raise DownloadError(f"network error ({type(err).__name__})", retry=True) from None
    if announced is not None and received != announced:
        raise DownloadError(f"transfer cut short ({received:,} of {announced:,} bytes)", retry=True)


def fetch_checked(url: str, path: str, timeout_s: float) -> None:
    """fetch, then check: a wrong size may be a cut transfer (retry); right size, wrong content will not mend."""
    fetch(url, path, timeout_s)
    size = os.path.getsize(path)
    if size != EXPECTED_BYTES:
        raise DownloadError(f"wrong size: got {size:,} bytes, expected {EXPECTED_BYTES:,}", retry=True)
    try:
        check_tiny_nerf(path)
    except DataError as err:
        raise DownloadError(f"wrong content: {str(err).replace(path, 'the download')}", retry=False) from None


def download(url: str, out: str, retries: int = 4, timeout_s: float = 30.0, backoff_s: float = 1.0) -> int:
    """Download `url` to `out` atomically, trying up to 1 + `retries` times with waits of backoff_s * 2^k.

    Returns the number of attempts made. Raises DownloadError (after the last attempt) with a one-line reason;
    `out` is then exactly as it was before.
    """
    for attempt in range(retries + 1):
        try:
            atomic_write(out, lambda tmp: fetch_checked(url, tmp, timeout_s))
            return attempt + 1
        except DownloadError as err:
            if not err.retry or attempt == retries:
                tries = f"{attempt + 1} attempt{'s' if attempt else ''}"
                raise DownloadError(f"cannot download {url}: {err} ({tries})", retry=False) from None
            wait = backoff_s * 2**attempt
            print(f"attempt {attempt + 1} failed: {err}; retrying in {wait:g} s", file=sys.stderr, flush=True)
            time.sleep(wait)
    raise AssertionError("unreachable")


# --- the procedural scene ---------------------------------------------------------------------------------------
def write_synthetic(out: str, n_views: int = 106, size: int = 100, seed: int = 0) -> None:
    """The procedural scene in the tiny NeRF format (plus ground-truth depth), written atomically."""
    write_npz(out, synthetic_scene(n_views=n_views, size=size, seed=seed))


# --- NeRF-synthetic (Blender) scenes ----------------------------------------------------------------------------
def parse_leave_out(text: str) -> tuple[int, int]:
    """`STEP:START` -> (step, start); raises UserError."""
    step, colon, start = text.partition(":")
    try:
        step_i, start_i = int(step), int(start or 0)
    except ValueError:
        step_i = start_i = -1
    if step_i < 1 or start_i < 0 or (colon and not start):
        raise UserError(f"--leave-out expects STEP:START with STEP >= 1 and START >= 0, got {text!r}")
    return step_i, start_i


def read_png(path: str) -> np.ndarray:
    """An 8-bit image as uint8 [H, W, 4] RGBA (opaque when the file has no alpha)."""
    from PIL import Image  # a dependency of imageio and matplotlib

    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGBA"))
    except OSError as err:  # missing, unreadable or not an image
        raise DataError(f"cannot read {path} ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


def composite_and_shrink(rgba: np.ndarray, factor: int) -> np.ndarray:
    """uint8 RGBA [H, W, 4] -> float32 RGB [H/factor, W/factor, 3]: composited on black, then the mean of each
    factor x factor block. The block sums of colour x alpha are exact integers; one division by
    255^2 factor^2 in float64, then float32."""
    h, w = rgba.shape[0] // factor, rgba.shape[1] // factor
    premultiplied = rgba[..., :3].astype(np.int64) * rgba[..., 3:].astype(np.int64)
    sums = premultiplied.reshape(h, factor, w, factor, 3).sum(axis=(1, 3))
    return (sums / float(255 * 255 * factor * factor)).astype(np.float32)


def read_blender(folder: str, split: str = "train", size: int = 100,
                 leave_out: tuple[int, int] | None = None) -> tuple[dict, list[str]]:
    """A NeRF-synthetic scene folder as tiny-NeRF arrays (images, poses, focal), and the frames' file paths.
    Raises DataError naming the problem."""
    meta_path = os.path.join(folder, f"transforms_{split}.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        angle = float(meta["camera_angle_x"])
        frames = list(meta["frames"])
    except FileNotFoundError:
        raise DataError(f"{meta_path} not found: --blender takes a NeRF-synthetic scene folder "
                        f"(e.g. nerf_synthetic/lego) holding transforms_{split}.json") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is not a NeRF-synthetic transforms file ({type(err).__name__}: {err})") \
            from None
    if leave_out:
        step, start = leave_out
        frames = [f for i, f in enumerate(frames) if i < start or (i - start) % step]
    if not frames:
        raise DataError(f"{meta_path}: no frames left to convert")
    images, poses, names, shape = [], [], [], None
    for i, frame in enumerate(frames):
        try:
            name = os.path.normpath(os.path.join(folder, frame["file_path"]))
            pose = np.asarray(frame["transform_matrix"], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as err:
            raise DataError(f"{meta_path}: frame {i} lacks a usable file_path or transform_matrix "
                            f"({type(err).__name__}: {err})") from None
        if pose.shape != (4, 4):
            raise DataError(f"{meta_path}: frame {i}'s transform_matrix is {list(pose.shape)}, not 4x4")
        if not os.path.splitext(name)[1]:
            name += ".png"  # the dataset's file_path values have no extension
        rgba = read_png(name)
        if shape is not None and rgba.shape[:2] != shape:
            raise DataError(f"{name} is {rgba.shape[1]}x{rgba.shape[0]}, the frames before it {shape[1]}x{shape[0]}")
        shape = rgba.shape[:2]
        factor = shape[1] // size
        if factor < 1 or shape[1] % size or shape[0] % factor:
            raise DataError(f"{name} is {shape[1]}x{shape[0]}: --size {size} must divide its width, and the "
                            f"factor (width / size) its height")
        images.append(composite_and_shrink(rgba, factor))
        poses.append(pose)
        names.append(name)
    focal = np.float32(0.5 * size / math.tan(0.5 * angle))
    arrays = {"images": np.stack(images), "poses": np.stack(poses), "focal": focal}
    views_from_arrays(arrays, meta_path)  # the loader's checks (rigid poses, values in [0, 1]) before writing
    return arrays, names


def write_npz(out: str, arrays: dict, compressed: bool = False) -> None:
    """`arrays` as an .npz at exactly `out`, written atomically."""
    save = np.savez_compressed if compressed else np.savez

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            save(f, **arrays)

    atomic_write(out, write)


# --- command line -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgParser(prog="data_setup.py",
                       description="Download tiny_nerf_data.npz, convert a NeRF-synthetic scene, or write the "
                                   "procedural scene.")
    parser.add_argument("--out", help=f"the file to write (default: {DEFAULT_OUT} for the download, "
                                      f"data/<scene><size>.npz for --blender)")
    parser.add_argument("--synthetic", metavar="OUT.npz", help="write the procedural scene here instead")
    parser.add_argument("--blender", metavar="DIR",
                        help="convert this NeRF-synthetic scene folder (e.g. nerf_synthetic/lego) instead")
    parser.add_argument("--split", default="train", help="--blender: which transforms_<split>.json (default train)")
    parser.add_argument("--size", type=int, default=100,
                        help="--blender: output width in pixels; must divide the images' width (default 100)")
    parser.add_argument("--leave-out", metavar="STEP:START",
                        help="--blender: drop frames START, START+STEP, ... (0-based, in the JSON's order)")
    parser.add_argument("--force", action="store_true",
                        help="download again even if a valid file is there (it is replaced only by a good one)")
    parser.add_argument("--url", default=URL, help="download from this address instead (a mirror)")
    parser.add_argument("--retries", type=int, default=4, help="extra attempts after a failure (default 4)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before giving up")
    args = parser.parse_args(argv)
    if args.retries < 0 or not args.timeout > 0:
        parser.error("--retries must be >= 0 and --timeout > 0")
    if args.synthetic and args.blender:
        parser.error("--synthetic and --blender each write a file: give one of them")
    if args.size < 1:
        parser.error(f"--size must be >= 1 (got {args.size})")
    args.leave_out = parse_leave_out(args.leave_out) if args.leave_out else None
    if args.out is None:
        scene = os.path.basename(os.path.normpath(args.blender)) if args.blender else ""
        args.out = os.path.join("data", f"{scene}{args.size}.npz") if args.blender else DEFAULT_OUT
    return args


def run(args: argparse.Namespace) -> str:
    """Do what the arguments ask; returns the line to print. Raises UserError / DataError."""
    if args.synthetic:
        write_synthetic(args.synthetic)
        views = load_npz(args.synthetic)
        return f"wrote the procedural scene to {args.synthetic} ({len(views)} views, {views.height}x{views.width})"
    if args.blender:
        arrays, names = read_blender(args.blender, args.split, args.size, args.leave_out)
        write_npz(args.out, arrays, compressed=True)
        n, height, width = arrays["images"].shape[:3]
        return (f"wrote {args.out}: {n} views of {args.blender} ({args.split}, from {os.path.basename(names[0])} "
                f"to {os.path.basename(names[-1])}) at {width}x{height} on black, focal {float(arrays['focal']):.3f}")
    if os.path.exists(args.out) and not args.force:
        if is_valid(args.out):
            return f"{args.out} is already present and valid; nothing to do"
        print(f"{args.out} exists but is not the tiny NeRF file; downloading a fresh copy", file=sys.stderr)
    try:
        attempts = download(args.url, args.out, args.retries, args.timeout)
    except DownloadError as err:
        hint = "; use --data=synthetic or `python data_setup.py --synthetic OUT.npz` to work offline"
        kept = f"; {args.out} was left as it was" if os.path.exists(args.out) else ""
        raise UserError(f"{err}{kept}{hint}") from None
    return f"downloaded {args.out} ({EXPECTED_BYTES:,} bytes, {attempts} attempt{'s' if attempts > 1 else ''})"


def main(argv: list[str] | None = None) -> int:
    """The command line: one `error: ...` line and exit 2 on any failure, 130 on Ctrl-C (utils.run_cli)."""

    def body() -> None:
        args = parse_args(sys.argv[1:] if argv is None else argv)
        try:
            print(run(args), flush=True)
        except OSError as err:  # e.g. the target folder is not writable
            raise UserError(f"cannot write the data file: {err}") from None

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
