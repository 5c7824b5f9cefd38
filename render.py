"""360-degree RGB and depth videos (and stills) of a trained model: a checkpoint or a `.bitnerf` file.

    python render.py --ckpt runs/exp1/ckpt.pt [--frames 120] [--size 200] [--gif] [--out DIR]

The camera circles the scene's centre at the run's video radius and elevation unless given; a capture's (an
unbounded scene's) goes along its cameras' track instead, at their resolution, as the run's own video does (its
data is read for the poses). Frames are composited on the background the run's data is scored on. Output goes to
a `render` folder beside the checkpoint.
"""

from __future__ import annotations

import os
import sys

import torch

from assembly import amp_dtype, load_trained
from cameras import sweep_poses
from dataset import evaluation_background, train_val_views
from hardware import pick_device
from orbit import TINY_NERF_FOCAL_PER_PIXEL, render_orbit, write_orbit
from utils import ArgParser, UserError, run_cli


def parse_args(argv: list[str] | None):
    p = ArgParser(prog="render.py", description="360-degree RGB and depth videos (and stills) of a trained model.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by training (RUN/ckpt.pt), or a .bitnerf")
    p.add_argument("--out", help="output folder (default: a 'render' folder beside the checkpoint)")
    p.add_argument("--frames", type=int, help="frames in the turn (default: the run's video_frames)")
    p.add_argument("--fps", type=int, help="frames per second (default: the run's video_fps)")
    p.add_argument("--radius", type=float, help="camera distance from the scene's centre (default: the run's)")
    p.add_argument("--elevation", type=float, help="degrees; negative looks down (default: the run's)")
    p.add_argument("--size", type=int, default=100, help="square image side in pixels (default 100)")
    p.add_argument("--focal", type=float, help="focal length in pixels of the output image "
                   f"(default {TINY_NERF_FOCAL_PER_PIXEL} x size: the tiny NeRF camera's field of view)")
    p.add_argument("--background", choices=("white", "black"),
                   help="colour behind the scene (default: what the run's data is scored on)")
    p.add_argument("--stills", type=int, default=4, help="PNG stills (rgb | depth | opacity) to write")
    p.add_argument("--gif", action="store_true", help="also write GIFs")
    p.add_argument("--chunk", type=int, help="rays per forward pass (default: from the run's chunk_points)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    return p.parse_args(argv)


def _render(argv: list[str] | None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    renderer, cfg = load_trained(args.ckpt, device)
    frames = args.frames if args.frames is not None else cfg.video_frames
    fps = args.fps if args.fps is not None else cfg.video_fps
    radius = args.radius if args.radius is not None else cfg.video_radius
    elevation = args.elevation if args.elevation is not None else cfg.video_elevation
    focal = args.focal if args.focal is not None else TINY_NERF_FOCAL_PER_PIXEL * args.size
    chunk = args.chunk if args.chunk is not None else renderer.eval_chunk_rays()
    for name, value in (("frames", frames), ("fps", fps), ("size", args.size), ("chunk", chunk)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1 (got {value})")
    if not (radius > 0 and focal > 0 and args.stills >= 0):
        raise UserError(f"need --radius > 0, --focal > 0, --stills >= 0 (got {radius}, {focal}, {args.stills})")
    out_dir = args.out or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "render")
    background = (evaluation_background(cfg.data, cfg.background) if args.background is None
                  else torch.ones(3) if args.background == "white" else None)
    height = width = args.size
    path = None
    if cfg.scene == "unbounded" and args.radius is None and args.elevation is None:
        # a capture: along its cameras' track at their resolution and focal length, as training's videos are
        # (an orbit would look at what no camera saw); that needs the run's data
        _, views, _, _ = train_val_views(cfg, device.type)
        height, width = views.height, views.width
        focal = args.focal if args.focal is not None else float(views.cameras.fx.mean())
        path = sweep_poses(views.poses, frames)
    orbit = render_orbit(renderer, height, width, focal, frames, radius, elevation, chunk,
                         autocast_dtype=amp_dtype(cfg, device),
                         background=None if background is None else background.to(device), poses=path)
    for path in write_orbit(orbit, out_dir, fps, args.gif, args.stills):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python render.py ...`: orbit videos and stills of a trained model; returns the exit code."""
    return run_cli(lambda: _render(argv))


if __name__ == "__main__":
    sys.exit(main())
