"""Data files in the tiny-NeRF format and NeRF-synthetic scene folders: fetch the tiny NeRF data, convert a
NeRF-synthetic (Blender) scene, or write the procedural scene.

    python data_setup.py                              # -> data/tiny_nerf_data.npz (skipped if already valid)
    python data_setup.py --out PATH.npz               # elsewhere
    python data_setup.py --force                      # fetch again even if a valid file is there
    python data_setup.py --synthetic data/synth.npz   # the built-in procedural scene, no network
    python data_setup.py --blender nerf_synthetic/lego --size 100 --leave-out 10:5 --out data/lego100.npz
    python data_setup.py --blender nerf_synthetic/lego --size 400 --resplit --folder data/lego400

`--blender` reads a scene folder of the NeRF-synthetic dataset (transforms_<split>.json and its RGBA PNGs) and
shrinks every view to `--size` pixels wide with an area filter over premultiplied alpha (the mean of each k x k
block of colour x alpha and of alpha, k = source width / size, from exact integer sums; PNG alpha is straight).
Into a .npz the views go composited on black (that premultiplied mean, as float32); poses are the JSON's
transform_matrix as float32; focal = size / 2 / tan(camera_angle_x / 2). `--leave-out STEP:START` drops the
frames START, START + STEP, ... (0-based, in the JSON's order). The first --blender command above rebuilds the
90-view lego file behind the README's lego100 results.

`--folder DIR` writes a NeRF-synthetic scene folder instead: RGBA PNGs (straight alpha, 8 bits) at the source's
relative paths, and transforms JSONs with the source's camera_angle_x and each frame's transform_matrix as they
are. `--resplit` splits the source's 100 training views anew (RESPLIT: r_K with K % 10 == 0 val, K % 10 == 5
left out, the rest train: 80 and 10 views); without it the source's splits are kept. The second command above
rebuilds data/lego400, behind the README's 400x400 and (with --downscale=2) 200x200 lego results.

A conversion or the procedural scene never replaces an existing output unless --force is given; each output is
written to a temporary beside its target and renamed into place once complete (a folder once dataset.py's loader
has read it back), so a failure never leaves half of one. The download streams to a temporary file beside the
target, is checked (exact byte size, then loaded and validated by `dataset.load_npz` with the expected shapes)
and only then renamed over the target, so a failed or interrupted download never leaves half a file and never
replaces a good one. Network failures, timeouts and server errors (5xx, 429) are retried with exponential backoff;
other HTTP errors and a wrong file are not. Every failure ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time

import numpy as np
import requests

import scene_files
from dataset import DataError, Views, load_npz, synthetic_scene, views_from_arrays
from utils import ArgParser, UserError, atomic_folder, atomic_write, run_cli

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


# The area filter, one rule for every output (and the one dataset.py's --downscale applies): the mean of each
# k x k block of premultiplied colour (colour x alpha, PNG alpha being straight) and of alpha, from exact integer
# block sums. Averaging straight colour instead would let the colour of transparent pixels bleed into edges.
def block_sums(rgba: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGBA [H, W, 4] -> the int64 sums over each factor x factor block of colour x alpha [h, w, 3] (in
    units of 1/255^2) and of alpha [h, w, 1] (units of 1/255)."""
    h, w = rgba.shape[0] // factor, rgba.shape[1] // factor
    blocks = lambda a: a.reshape(h, factor, w, factor, a.shape[-1]).sum(axis=(1, 3))  # noqa: E731
    alpha = rgba[..., 3:].astype(np.int64)
    return blocks(rgba[..., :3].astype(np.int64) * alpha), blocks(alpha)


def composite_and_shrink(rgba: np.ndarray, factor: int) -> np.ndarray:
    """uint8 RGBA [H, W, 4] -> float32 RGB [H/factor, W/factor, 3]: the block means of premultiplied colour, which
    is the image composited on black, shrunk. One division of the exact block sums by 255^2 factor^2 in float64,
    then float32."""
    sums, _ = block_sums(rgba, factor)
    return (sums / float(255 * 255 * factor * factor)).astype(np.float32)


def shrink_rgba(rgba: np.ndarray, factor: int) -> np.ndarray:
    """uint8 RGBA [H, W, 4] -> uint8 RGBA [H/factor, W/factor, 4] with straight alpha, as a PNG holds it: alpha is
    the block's mean alpha rounded; colour is the block's premultiplied mean divided by that stored alpha, rounded
    (at most 255), so that colour x alpha, which a loader computes, is within half an 8-bit step of the block's
    premultiplied mean, i.e. of what composite_and_shrink gives; black where the stored alpha is 0."""
    colour_sums, alpha_sums = block_sums(rgba, factor)
    area = factor * factor
    alpha = (2 * alpha_sums + area) // (2 * area)
    over = 2 * area * np.maximum(alpha, 1)
    colour = np.where(alpha > 0, np.minimum((2 * colour_sums + over // 2) // over, 255), 0)
    return np.concatenate([colour, alpha], axis=-1).astype(np.uint8)


def read_transforms(folder: str, split: str) -> tuple[str, dict, list]:
    """(path, content, frames) of a scene folder's transforms_<split>.json; DataError naming the problem."""
    meta_path = os.path.join(folder, f"transforms_{split}.json")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        float(meta["camera_angle_x"])
        frames = list(meta["frames"])
    except FileNotFoundError:
        raise DataError(f"{meta_path} not found: --blender takes a NeRF-synthetic scene folder "
                        f"(e.g. nerf_synthetic/lego) holding transforms_{split}.json") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{meta_path} is not a NeRF-synthetic transforms file ({type(err).__name__}: {err})") \
            from None
    return meta_path, meta, frames


def shrunk_frames(folder: str, meta_path: str, frames: list, size: int, shrink):
    """For each frame: (frame, its image's path, its pose as float32 [4, 4], `shrink`(RGBA, factor)), factor =
    image width / `size`. DataError for a frame without a usable file_path or transform_matrix, an unreadable
    image, images of different sizes, or a size that does not divide them."""
    shape = None
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
        yield frame, name, pose, shrink(rgba, factor)


def read_blender(folder: str, split: str = "train", size: int = 100,
                 leave_out: tuple[int, int] | None = None) -> tuple[dict, list[str]]:
    """A NeRF-synthetic scene folder as tiny-NeRF arrays (images, poses, focal), and the frames' file paths.
    Raises DataError naming the problem."""
    meta_path, meta, frames = read_transforms(folder, split)
    if leave_out:
        step, start = leave_out
        frames = [f for i, f in enumerate(frames) if i < start or (i - start) % step]
    if not frames:
        raise DataError(f"{meta_path}: no frames left to convert")
    converted = list(shrunk_frames(folder, meta_path, frames, size, composite_and_shrink))
    focal = np.float32(0.5 * size / math.tan(0.5 * float(meta["camera_angle_x"])))
    arrays = {"images": np.stack([c[3] for c in converted]), "poses": np.stack([c[2] for c in converted]),
              "focal": focal}
    views_from_arrays(arrays, meta_path)  # the loader's checks (rigid poses, values in [0, 1]) before writing
    return arrays, [c[1] for c in converted]


# --resplit: the official scenes' 100 training views r_0 ... r_99 become 80 for training and 10 for validation,
# every tenth view from r_0 (r_0, r_10, ..., r_90); r_5, r_15, ..., r_95 are held back, in neither split. The 90
# views kept are those of data/lego100.npz (`--leave-out 10:5`).
RESPLIT = {0: "val", 5: None}  # r_K with K % 10 in here goes there (None: left out); every other r_K: train
FRAME_NAME = re.compile(r"r_(\d+)")


def folder_splits(folder: str, resplit: bool) -> dict[str, tuple[str, dict, list]]:
    """The splits a scene folder written from `folder` holds, {split: (source transforms path, its content, the
    split's frames)}: the re-split of its train split (RESPLIT) or, without `resplit`, each of its splits."""
    if not resplit:
        present = [s for s in ("train", "val", "test")
                   if s == "train" or os.path.isfile(os.path.join(folder, f"transforms_{s}.json"))]
        return {s: read_transforms(folder, s) for s in present}
    meta_path, meta, frames = read_transforms(folder, "train")
    splits: dict[str, list] = {"train": [], "val": []}
    for i, frame in enumerate(frames):
        stem = os.path.basename(str(frame.get("file_path", "") if isinstance(frame, dict) else ""))
        match = FRAME_NAME.fullmatch(os.path.splitext(stem)[0])
        if not match:
            raise DataError(f"{meta_path}: frame {i}'s file_path {stem!r} is not named r_K: --resplit splits "
                            f"the views by their number K")
        split = RESPLIT.get(int(match.group(1)) % 10, "train")
        if split:
            splits[split].append(frame)
    for split, chosen in splits.items():
        if not chosen:
            raise DataError(f"{meta_path}: no frame of its {len(frames)} falls in the {split} split of --resplit")
    return {s: (meta_path, meta, chosen) for s, chosen in splits.items()}


def image_stem(frame: dict, meta_path: str) -> str:
    """A frame's file_path without its extension ("./train/r_3", as NeRF-synthetic writes it); DataError for a
    path that leaves the scene's folder."""
    path = str(frame["file_path"])
    stem, ext = os.path.splitext(path)
    stem = stem if ext.lower() in (".png", ".jpg", ".jpeg") else path
    if os.path.isabs(stem) or os.path.normpath(stem).split(os.sep)[0] == os.pardir:
        raise DataError(f"{meta_path}: file_path {path!r} leaves the scene folder")
    return stem


def write_blender_folder(folder: str, out: str, size: int,
                         resplit: bool) -> tuple[dict[str, int], tuple[int, int]]:
    """A NeRF-synthetic scene folder at `out`, written atomically: the splits folder_splits chooses, each frame's
    image shrunk to `size` pixels wide (shrink_rgba) as an RGBA PNG at its source's path, each split's
    transforms JSON the source's with its frames' file_paths (without extension) and transform_matrix as they were.
    The written folder is read back with dataset.py's loader before it takes `out`'s place. Returns
    ({split: views}, (width, height))."""
    from PIL import Image

    splits, shape = folder_splits(folder, resplit), []

    def write(tmp):
        for split, (meta_path, meta, frames) in splits.items():
            written = []
            for frame, _, _, image in shrunk_frames(folder, meta_path, frames, size, shrink_rgba):
                stem = image_stem(frame, meta_path)
                target = os.path.join(tmp, stem + ".png")
                os.makedirs(os.path.dirname(target), exist_ok=True)
                Image.fromarray(image, "RGBA").save(target)
                shape[:] = image.shape[1::-1]
                written.append({**frame, "file_path": stem})
            with open(os.path.join(tmp, f"transforms_{split}.json"), "w") as f:
                json.dump({**meta, "frames": written}, f, indent=4)
        for split in splits:  # the loader's checks (rigid poses, readable images) before the rename
            try:
                scene_files.read_blender(tmp, split, 1)
            except DataError as err:
                raise DataError(str(err).replace(tmp, out)) from None

    atomic_folder(out, write)
    return {split: len(frames) for split, (_, _, frames) in splits.items()}, tuple(shape)


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
    parser.add_argument("--folder", metavar="OUT_DIR",
                        help="--blender: write a NeRF-synthetic scene folder here instead of a .npz: the "
                             "source's splits (or --resplit's), RGBA PNGs --size wide")
    parser.add_argument("--resplit", action="store_true",
                        help="--folder: split the train split's r_K anew: K %% 10 == 0 val, K %% 10 == 5 left "
                             "out, the rest train")
    parser.add_argument("--split", help="--blender: which transforms_<split>.json (default train)")
    parser.add_argument("--size", type=int, default=100,
                        help="--blender: output width in pixels; must divide the images' width (default 100)")
    parser.add_argument("--leave-out", metavar="STEP:START",
                        help="--blender: drop frames START, START+STEP, ... (0-based, in the JSON's order)")
    parser.add_argument("--force", action="store_true",
                        help="replace an existing output; for the download: download again even if a valid file "
                             "is there (it is replaced only by a good one)")
    parser.add_argument("--url", default=URL, help="download from this address instead (a mirror)")
    parser.add_argument("--retries", type=int, default=4, help="extra attempts after a failure (default 4)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before giving up")
    args = parser.parse_args(argv)
    if args.retries < 0 or not args.timeout > 0:
        parser.error("--retries must be >= 0 and --timeout > 0")
    if args.synthetic and args.blender:
        parser.error("--synthetic and --blender each write a file: give one of them")
    if args.folder and not args.blender:
        parser.error("--folder writes a converted --blender scene: give --blender DIR too")
    if args.resplit and not args.folder:
        parser.error("--resplit applies to --folder")
    if args.folder and (args.out or args.split or args.leave_out):
        parser.error("--folder writes every split of the scene: --out, --split and --leave-out apply to a .npz")
    if args.size < 1:
        parser.error(f"--size must be >= 1 (got {args.size})")
    args.split = args.split or "train"
    args.leave_out = parse_leave_out(args.leave_out) if args.leave_out else None
    if args.out is None:
        scene = os.path.basename(os.path.normpath(args.blender)) if args.blender else ""
        args.out = os.path.join("data", f"{scene}{args.size}.npz") if args.blender else DEFAULT_OUT
    return args


def refuse_existing(path: str, force: bool) -> None:
    """A conversion never replaces what is at its output unless --force asks it to (UserError)."""
    if os.path.lexists(path) and not force:
        raise UserError(f"{path} already exists: give --force to replace it")


def run(args: argparse.Namespace) -> str:
    """Do what the arguments ask; returns the line to print. Raises UserError / DataError."""
    if args.synthetic:
        refuse_existing(args.synthetic, args.force)
        write_synthetic(args.synthetic)
        views = load_npz(args.synthetic)
        return f"wrote the procedural scene to {args.synthetic} ({len(views)} views, {views.height}x{views.width})"
    if args.folder:
        refuse_existing(args.folder, args.force)
        counts, (width, height) = write_blender_folder(args.blender, args.folder, args.size, args.resplit)
        how = " (its train split re-split: r_K with K % 10 == 0 val, K % 10 == 5 left out)" if args.resplit else ""
        return (f"wrote {args.folder}: {args.blender}{how} at {width}x{height}, "
                + ", ".join(f"{split} {n} views" for split, n in counts.items()))
    if args.blender:
        refuse_existing(args.out, args.force)
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
