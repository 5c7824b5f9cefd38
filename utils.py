"""Small shared helpers: distributed setup, printing, metrics, safe checkpoint I/O, images and videos."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from configs import ConfigError


class UserError(Exception):
    """A problem the user can fix (bad flag, file, checkpoint): reported as one line, non-zero exit."""


class DataError(ValueError):
    """The data file is missing or malformed (shown to the user as a one-line error). Raised by dataset.py;
    defined here so that run_cli reports it without importing dataset (which sits above utils)."""


def run_cli(body: Callable[[], int | None]) -> int:
    """Run a command-line tool's `body`; a user error (UserError, ConfigError, DataError) becomes one line
    `error: ...` on stderr and exit code 2 instead of a traceback; Ctrl-C exits 130; a reader of stdout that left
    (`| head`) ends it quietly with 141, as SIGPIPE ends other commands. Returns the exit code."""
    try:
        return body() or 0
    except (ConfigError, DataError, UserError) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at devnull so that flush does not fail too
        # (https://docs.python.org/3/library/signal.html#note-on-sigpipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13  # 128 + SIGPIPE, the status of a command the signal ended


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors are UserErrors (one line, exit 2 through run_cli), not usage + exit."""

    def error(self, message: str):
        raise UserError(f"{message} (see {self.prog} --help)")


# --- distributed / device --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    launched: bool = False  # by torchrun: a process group even with one rank

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        """Distributed: a process group, DDP, collectives (under torchrun, or several ranks)."""
        return self.launched or self.world_size > 1


def print0(*args, **kwargs) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(*args, **kwargs, flush=True)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (identity when not distributed), on `values`' device."""
    if dist.is_initialized():
        return all_reduce_sum(values) / dist.get_world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (identity when not distributed), on `values`' device: a CPU tensor is reduced on the GPU
    under NCCL (which reduces CUDA tensors only), so callers keep float64 and counters on the CPU."""
    if not dist.is_initialized():
        return values
    on_nccl = dist.get_backend() == "nccl" and not values.is_cuda
    reduced = values.to(torch.device("cuda", torch.cuda.current_device())) if on_nccl else values.clone()
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.to(values.device) if on_nccl else reduced


def master_decides(fn: Callable[[], object]):
    """fn() run on rank 0 only; its result, or its UserError, reaches every rank (so every rank raises it).
    Collective: every rank must call it. For files only rank 0 is sure to see (no shared filesystem needed)."""
    if not dist.is_initialized():
        return fn()
    box = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except UserError as err:
            box[0] = ("error", str(err))
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


def gather_to_master(obj) -> list:
    """Every rank's picklable `obj`, in rank order, on rank 0; [] on the other ranks; [obj] when not distributed.
    Collective: every rank must call it. Send CPU tensors (small things: it pickles)."""
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- metrics -------------------------------------------------------------------------------------------------
def mse_to_psnr(mse: float) -> float:
    return -10.0 * math.log10(max(mse, 1e-12))


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    return mse_to_psnr(torch.mean((a.float() - b.float()) ** 2).item())


# --- files ---------------------------------------------------------------------------------------------------
def atomic_write(path: str, write) -> None:
    """Write a file via `write(tmp_path)` to a temporary beside it, then rename: readers never see half a file,
    and a failure leaves the old file untouched."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_folder(path: str, write) -> None:
    """Write a folder via `write(tmp_dir)` into a temporary folder beside it, then rename it into place: readers
    never see half a folder, and a failure leaves whatever was at `path` untouched. Whatever was there is
    replaced: moved aside first, removed once the new folder is in place."""
    path = os.path.normpath(path)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-", suffix=os.path.basename(path))
    aside = None
    try:
        write(tmp)
        if os.path.lexists(path):
            aside = tempfile.mkdtemp(dir=parent, prefix=".old-", suffix=os.path.basename(path))
            os.rename(path, os.path.join(aside, "old"))
        try:
            os.rename(tmp, path)
        except BaseException:
            if aside:
                os.rename(os.path.join(aside, "old"), path)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside:
            shutil.rmtree(aside, ignore_errors=True)


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_json(obj, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    atomic_write(path, write)


class CheckpointUnreadable(UserError):
    """torch.load could not read the file at all (truncated or corrupt), as opposed to refusing its contents."""


def load_checkpoint(path: str, map_location="cpu") -> dict:
    """torch.load with weights_only=True (no code from the file runs). Raises UserError with a one-line reason
    (CheckpointUnreadable for a truncated or corrupt file)."""
    if not os.path.exists(path):
        raise UserError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt zip, pickle refusing a global, truncated file ...
        message = _load_failure(path, err)
        refused = "Weights only load failed" in str(err)
        raise (UserError if refused else CheckpointUnreadable)(message) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "config" not in ckpt:
        raise UserError(f"{path} is not a checkpoint of this project (expected keys 'model' and 'config')")
    return ckpt


def load_checkpoint_or_newest_good(path: str, map_location="cpu") -> dict:
    """load_checkpoint(path); if that file is truncated or corrupt (a crash mid-write on a filesystem without
    atomic rename, a bad disk), the newest readable ckpt_stepN.pt beside it, with a one-line warning. Without
    one, load_checkpoint's error about `path`. A file that is readable but refused (code in it, not a
    checkpoint of this project) is never passed over."""
    try:
        return load_checkpoint(path, map_location)
    except CheckpointUnreadable as err:
        folder = os.path.dirname(path) or "."
        history = [(int(m.group(1)), name) for name in os.listdir(folder)
                   if (m := re.fullmatch(r"ckpt_step(\d+)\.pt", name))]
        for _, name in sorted(history, reverse=True):
            try:
                ckpt = load_checkpoint(os.path.join(folder, name), map_location)
            except UserError:
                continue
            print(f"warning: {err}; using the newest good one, {os.path.join(folder, name)} (step "
                  f"{ckpt.get('step')})", file=sys.stderr, flush=True)
            return ckpt
        raise


def _load_failure(path: str, err: Exception) -> str:
    """Why torch.load(weights_only=True) refused `path`, in one line."""
    text = str(err)
    if "Weights only load failed" in text:
        # torch's own text advises weights_only=False: exactly wrong for a file that may run code
        refused = re.search(r"GLOBAL (\S+)|(Unsupported [^\n]*)", text)
        if refused and refused.group(1):
            return (f"refusing checkpoint {path}: it asks to load {refused.group(1)}, which no checkpoint of this "
                    f"project contains; nothing in it was run")
        why = refused.group(2) if refused else "unsupported content"
        return f"cannot load checkpoint {path}: not a file of plain tensors ({why}); nothing in it was run"
    first_line = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return f"cannot load checkpoint {path}: {first_line[:300]}"


# --- images and videos ---------------------------------------------------------------------------------------
_COLOURMAP = np.array([  # a perceptually ordered ramp (dark purple -> orange -> pale yellow)
    [0.00, 0.00, 0.02], [0.23, 0.04, 0.40], [0.55, 0.11, 0.43], [0.85, 0.30, 0.26], [0.98, 0.62, 0.12],
    [0.99, 0.99, 0.75]])


def colourise_depth(depth: np.ndarray, acc: np.ndarray | None = None, lo: float | None = None,
                    hi: float | None = None) -> np.ndarray:
    """Depth [H, W] -> uint8 RGB [H, W, 3], near = bright. The range is the depth's own range over the pixels
    that hold something (acc > 0.5), or [lo, hi] when given (so the frames of one video share a scale)."""
    depth = np.asarray(depth, dtype=np.float64)
    mask = np.ones_like(depth, dtype=bool) if acc is None else np.asarray(acc) > 0.5
    if lo is None or hi is None:
        vals = depth[mask] if mask.any() else depth.ravel()
        lo, hi = float(vals.min()), float(vals.max())
    x = 1.0 - np.clip((depth - lo) / max(hi - lo, 1e-8), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_COLOURMAP))
    rgb = np.stack([np.interp(x, stops, _COLOURMAP[:, c]) for c in range(3)], axis=-1)
    rgb[~mask] = 0.0
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def to_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy()
    return (np.clip(image, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def even_sized(frame: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] padded by one repeated row / column where H / W is odd: H.264 in yuv420p stores colour
    at half resolution and refuses odd sizes."""
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else frame


def write_video(frames: list[np.ndarray], path: str, fps: int) -> None:
    """Write uint8 [H, W, 3] frames as .mp4 (H.264 through imageio-ffmpeg) or .gif, atomically."""
    import imageio.v2 as imageio

    if not path.endswith(".gif"):
        frames = [even_sized(f) for f in frames]

    def write(tmp):
        if path.endswith(".gif"):
            imageio.mimwrite(tmp, frames, format="GIF", duration=1000.0 / fps, loop=0)
        else:
            # macro_block_size=1: keep 100x100 frames as they are instead of resizing to multiples of 16
            imageio.mimwrite(tmp, frames, format="FFMPEG", fps=fps, codec="libx264", quality=8,
                             macro_block_size=1, pixelformat="yuv420p")

    atomic_write(path, write)
