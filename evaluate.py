"""Evaluate a trained checkpoint on held-out views: PSNR, SSIM, background opacity and (where known) depth error.

    python evaluate.py --ckpt runs/exp1/ckpt.pt [--data PATH] [--split val|all|train|test] [--json OUT.json]

The headline number is over held-out views: on the data the run trained on (the default) its validation views
are scored (`--split val`: the last val_views of a .npz, the val split of a scene folder); on any other data every
view is held out (`--split all`); `--split test` scores a scene folder's test split. Views are composited and
rendered on the data's evaluation background (white for RGBA scenes unless the run said otherwise: dataset.py),
at the run's --downscale.
Any checkpoint that assembly.load_trained reads works (NeRF or BitNeRF, trained alone or under DDP). The views
are rendered in eval mode (bin-centre samples, no jitter) with the run's own AMP setting, as training's
validation does, so `--split val` on the training data reproduces summary.json's val_psnr.
"""

from __future__ import annotations

import os
import sys
import time

import torch

from assembly import amp_dtype, load_trained
from dataset import Views, open_data
from renderer import Rendered, render_image
from hardware import pick_device
from utils import ArgParser, UserError, atomic_json, psnr, run_cli


SSIM_MIN_SIDE = 6  # torchmetrics pads by the half window (5 px) in reflect mode, which needs a side > 5


def ssim(pred: torch.Tensor, target: torch.Tensor) -> float:
    """SSIM of two images [H, W, 3] in [0, 1] (torchmetrics: 11-px Gaussian window, sigma 1.5)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    as_batch = [x.float().permute(2, 0, 1)[None] for x in (pred.clamp(0.0, 1.0), target)]  # [1, 3, H, W]
    return float(structural_similarity_index_measure(*as_batch, data_range=1.0))


def depth_error(pred: torch.Tensor, target: torch.Tensor) -> tuple[float, int]:
    """(sum of |pred - target|, pixel count) over pixels with ground truth (target > 0). pred, target: [H, W]."""
    known = target > 0
    return float((pred[known] - target[known]).abs().sum()), int(known.sum())


def background_opacity(acc: torch.Tensor, see_through: torch.Tensor) -> tuple[float, int]:
    """(sum of the rendered opacity, pixel count) over the pixels through which the camera sees the background
    (see_through [H, W] bool: dataset.Views.see_through): what a field puts where the scene is empty. acc [H, W]."""
    return float(acc.float()[see_through].sum()), int(see_through.sum())


def view_metrics(out: Rendered, image: torch.Tensor, depth: torch.Tensor | None,
                 see_through: torch.Tensor | None) -> dict:
    """Metrics of one rendered view against its image [H, W, 3], optional depth [H, W] and the pixels known to
    see through the scene [H, W] (None: a real background, no background opacity)."""
    metrics = {"psnr": psnr(out.rgb, image), "ssim": ssim(out.rgb, image)}
    if see_through is not None:
        metrics["bg_acc_sum"], metrics["bg_pixels"] = background_opacity(out.acc, see_through)
    if depth is not None:
        total, count = depth_error(out.depth, depth)
        metrics.update(depth_abs_sum=total, depth_pixels=count)
    return metrics


@torch.no_grad()
def evaluate(renderer: torch.nn.Module, views: Views, chunk_rays: int, autocast_dtype=None,
             progress: bool = True) -> dict:
    """Render every view and score it. Returns {"psnr", "ssim" (means over views), "depth_mae" (mean absolute
    error over all pixels with ground-truth depth > 0, None without depth), "background_opacity" (mean opacity
    over all pixels that see the background, None without any), "per_view": [...]}."""
    from tqdm import tqdm

    device = next(renderer.parameters()).device
    renderer.eval()
    per_view = []
    for i in tqdm(range(len(views)), desc="evaluate", disable=not progress, leave=False):
        view = views.subset(slice(i, i + 1)).to(device)
        rays_o, rays_d = view.image_rays(0)
        out = render_image(renderer, rays_o, rays_d, chunk_rays, autocast_dtype, view.eval_background())
        depth = None if view.depth is None else view.depth[0]
        metrics = view_metrics(out, view.image(0), depth, view.see_through(view.images[0]))
        per_view.append({"view": int(views.numbers[i]), **metrics})
    return summarise(per_view)


def summarise(per_view: list[dict]) -> dict:
    """Means over views; depth error and background opacity pooled over pixels (views with more such pixels
    weigh more)."""
    n = len(per_view)
    result = {"psnr": sum(v["psnr"] for v in per_view) / n, "ssim": sum(v["ssim"] for v in per_view) / n,
              "depth_mae": None, "background_opacity": None, "per_view": []}
    pixels = sum(v.get("depth_pixels", 0) for v in per_view)
    if pixels:
        result["depth_mae"] = sum(v["depth_abs_sum"] for v in per_view) / pixels
    black = sum(v.get("bg_pixels", 0) for v in per_view)
    if black:
        result["background_opacity"] = sum(v["bg_acc_sum"] for v in per_view) / black
    for v in per_view:
        row = {"view": v["view"], "psnr": v["psnr"], "ssim": v["ssim"]}
        if "bg_pixels" in v:
            row["background_opacity"] = v["bg_acc_sum"] / v["bg_pixels"] if v["bg_pixels"] else None
        if "depth_pixels" in v:
            row["depth_mae"] = v["depth_abs_sum"] / v["depth_pixels"] if v["depth_pixels"] else None
        result["per_view"].append(row)
    return result


def format_table(result: dict) -> str:
    """A short fixed-width table: one row per view, then the means (background opacity: over background pixels)."""
    has_depth = result["depth_mae"] is not None

    def number(value) -> str:
        return f" {value:>10.4f}" if value is not None else f" {'-':>10}"

    head = f"{'view':>5} {'PSNR':>7} {'SSIM':>6} {'bg opacity':>10}" + (f" {'depth MAE':>10}" if has_depth else "")
    lines = [head]
    for v in result["per_view"]:
        line = f"{v['view']:>5} {v['psnr']:>7.2f} {v['ssim']:>6.4f}" + number(v.get("background_opacity"))
        lines.append(line + (number(v.get("depth_mae")) if has_depth else ""))
    mean = f"{'mean':>5} {result['psnr']:>7.2f} {result['ssim']:>6.4f}" + number(result["background_opacity"])
    lines.append(mean + (number(result["depth_mae"]) if has_depth else ""))
    return "\n".join(lines)


def same_data(a: str, b: str) -> bool:
    """Whether two --data values name the same views: the same file (by path), or the same built-in scene."""
    return a == b or (os.path.isfile(a) and os.path.isfile(b) and os.path.samefile(a, b))


def _parse(argv: list[str] | None):
    p = ArgParser(prog="evaluate.py", description="PSNR / SSIM / depth error of a checkpoint on held-out views.")
    p.add_argument("--ckpt", required=True, help="checkpoint written by training (RUN/ckpt.pt)")
    p.add_argument("--data", help="a .npz, a scene folder, a capture's transforms.json, or 'synthetic' "
                                  "(default: the data the run trained on)")
    p.add_argument("--split", choices=("all", "val", "train", "test"),
                   help="val: the run's held-out views (val_views of its config); all: every view; train: the "
                        "training views; test: a scene folder's test split (default: val on the data the run "
                        "trained on, all on any other data)")
    p.add_argument("--json", help="also write the results here as JSON")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--chunk", type=int, help="rays per forward pass (default: from the run's chunk_points)")
    return p.parse_args(argv)


def _evaluate_cli(argv: list[str] | None) -> int:
    args = _parse(argv)
    if args.chunk is not None and args.chunk < 1:
        raise UserError(f"--chunk must be >= 1 (got {args.chunk})")
    device = pick_device(args.device)
    renderer, cfg = load_trained(args.ckpt, device)
    data = args.data or cfg.data
    split = args.split or ("val" if same_data(data, cfg.data) else "all")
    views = open_data(data, cfg.downscale, cfg.background).views(split, cfg.val_views)
    if min(views.height, views.width) < SSIM_MIN_SIDE:
        raise UserError(f"{data}: views are {views.height}x{views.width} pixels; SSIM's 11-pixel window needs "
                        f"at least {SSIM_MIN_SIDE}x{SSIM_MIN_SIDE}")
    chunk = args.chunk or renderer.eval_chunk_rays()
    autocast_dtype = amp_dtype(cfg, device)
    t0 = time.perf_counter()
    result = evaluate(renderer, views, chunk, autocast_dtype)
    result.update(ckpt=args.ckpt, data=data, split=split, model=cfg.model, name=cfg.name,
                  views=len(views), height=views.height, width=views.width, device=str(device),
                  amp=str(autocast_dtype).replace("torch.", "") if autocast_dtype else "off",
                  render_s=time.perf_counter() - t0)
    held_out = ("held-out views" if split in ("val", "test") or not same_data(data, cfg.data)
                else "views, training ones too")
    print(f"{cfg.name} ({cfg.model}) on {data} [{split}: {len(views)} {held_out}, {views.height}x{views.width}]")
    print(format_table(result))
    if args.json:
        atomic_json(result, args.json)
        print(f"wrote {args.json}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _evaluate_cli(argv))


if __name__ == "__main__":
    sys.exit(main())
