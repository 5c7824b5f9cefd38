"""360-degree orbits of a renderer: the one code path behind a training run's videos and `python render.py`.

The camera circles the origin, which every loader makes the scene's centre (cameras.py), at a given radius and
elevation; depth frames are coloured on one range shared by the whole orbit.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from cameras import orbit_poses
from renderer import get_rays, render_image
from utils import colourise_depth, to_uint8, write_video

TINY_NERF_FOCAL_PER_PIXEL = 1.38889  # the tiny NeRF camera: focal 138.889 px at 100 px (~39.6 degree view)


class Orbit(NamedTuple):
    rgb: list[np.ndarray]  # per frame: uint8 [H, W, 3]
    depth: list[np.ndarray]  # per frame: uint8 [H, W, 3], coloured on one range shared by all frames
    raw_depth: list[np.ndarray]  # per frame: float32 [H, W] expected depth
    acc: list[np.ndarray]  # per frame: float32 [H, W] opacity


def render_orbit(renderer: nn.Module, height: int, width: int, focal: float, frames: int, radius: float,
                 elevation: float, chunk_rays: int, progress: bool = True, autocast_dtype=None,
                 background: torch.Tensor | None = None, poses: torch.Tensor | None = None) -> Orbit:
    """Render `frames` views on a full turn of azimuth at `elevation` degrees, `radius` from the origin (the
    scene's centre: loaders put it there), composited on `background` [3] (None: black); or along the camera
    path `poses` [frames, 4, 4] if given. The progress bar shows the time left."""
    from tqdm import tqdm

    device = next(renderer.parameters()).device
    was_training = renderer.training
    renderer.eval()
    rgbs, depths, accs = [], [], []
    path = orbit_poses(frames, radius, elevation) if poses is None else poses
    for c2w in tqdm(path, desc="video", disable=not progress, leave=False):
        rays_o, rays_d = get_rays(height, width, focal, c2w.to(device))
        out = render_image(renderer, rays_o, rays_d, chunk_rays, autocast_dtype, background)
        rgbs.append(to_uint8(out.rgb))
        depths.append(out.depth.cpu().numpy())
        accs.append(out.acc.cpu().numpy())
    renderer.train(was_training)
    # one depth range for the whole video, so colours mean the same distance in every frame
    fg = np.concatenate([d[a > 0.5] for d, a in zip(depths, accs)])
    lo, hi = (float(fg.min()), float(fg.max())) if fg.size else (0.0, 1.0)
    return Orbit(rgbs, [colourise_depth(d, a, lo, hi) for d, a in zip(depths, accs)], depths, accs)


def still_frames(n_frames: int, n_stills: int) -> list[int]:
    """Up to n_stills frame indices spread evenly over the orbit, starting at frame 0."""
    return sorted({k * n_frames // n_stills for k in range(min(n_stills, n_frames))})


def write_orbit(orbit: Orbit, out_dir: str, fps: int, gif: bool = False, stills: int = 0) -> list[str]:
    """video_rgb.mp4 and video_depth.mp4 (+ .gif if asked) and `stills` PNGs (rgb | depth | opacity) of
    evenly spaced frames into out_dir. Returns the paths written."""
    import imageio.v3 as iio

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for kind, frames in (("rgb", orbit.rgb), ("depth", orbit.depth)):
        for ext in ("mp4", "gif") if gif else ("mp4",):
            paths.append(os.path.join(out_dir, f"video_{kind}.{ext}"))
            write_video(frames, paths[-1], fps)
    for k in still_frames(len(orbit.rgb), stills):
        opacity = to_uint8(np.repeat(orbit.acc[k][..., None], 3, axis=-1))
        paths.append(os.path.join(out_dir, f"still{k:03d}.png"))
        iio.imwrite(paths[-1], np.concatenate([orbit.rgb[k], orbit.depth[k], opacity], axis=1))
    return paths
