"""Shared fixtures: a tiny procedural scene written to disk and a tiny config that trains in seconds."""

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
