"""Fetch the tiny NeRF data (106 lego views at 100x100), or write the procedural scene instead.

    python data_setup.py                              # -> data/tiny_nerf_data.npz (skipped if already valid)
    python data_setup.py --out PATH.npz               # elsewhere
    python data_setup.py --synthetic data/synth.npz   # the built-in procedural scene, no network
    python data_setup.py --force                      # fetch again even if a valid file is there

The download streams to a temporary file beside the target, is checked (exact byte size, then loaded and
validated by `dataset.load_npz` with the expected shapes) and only then renamed over the target, so a failed or
interrupted download never leaves half a file and never replaces a good one. Network failures, timeouts and
server errors (5xx, 429) are retried with exponential backoff; other HTTP errors and a wrong file are not.
Every failure ends with one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import requests

from dataset import DataError, Views, load_npz, synthetic_scene
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
    arrays = synthetic_scene(n_views=n_views, size=size, seed=seed)

    def write(tmp):
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a bare path
            np.savez(f, **arrays)

    atomic_write(out, write)


# --- command line -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgParser(description="Download tiny_nerf_data.npz, or write the procedural scene.")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"where to put the download (default {DEFAULT_OUT})")
    parser.add_argument("--synthetic", metavar="OUT.npz", help="write the procedural scene here instead")
    parser.add_argument("--force", action="store_true",
                        help="download again even if a valid file is there (it is replaced only by a good one)")
    parser.add_argument("--url", default=URL, help="download from this address instead (a mirror)")
    parser.add_argument("--retries", type=int, default=4, help="extra attempts after a failure (default 4)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds without data before giving up")
    args = parser.parse_args(argv)
    if args.retries < 0 or not args.timeout > 0:
        parser.error("--retries must be >= 0 and --timeout > 0")
    return args


def run(args: argparse.Namespace) -> str:
    """Do what the arguments ask; returns the line to print. Raises UserError / DataError."""
    if args.synthetic:
        write_synthetic(args.synthetic)
        views = load_npz(args.synthetic)
        return f"wrote the procedural scene to {args.synthetic} ({len(views)} views, {views.height}x{views.width})"
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
