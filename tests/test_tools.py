"""evaluate.py, render.py (CLI and orbit videos) and report.py, on a model trained for a few steps."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import assembly
import evaluate
import orbit
import render
import report
import train
from dataset import load_npz, views_from_arrays
from renderer import Rendered, VolumeRenderer, get_rays, render_image
from samplers import StratifiedSampler
from utils import colourise_depth, psnr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def _trained_once() -> dict:
    return {}


@pytest.fixture
def ckpt(tiny_cfg, _trained_once) -> str:
    """A checkpoint trained with tiny_cfg; trained once per module (training is the slow part)."""
    if "path" not in _trained_once:
        train.train(tiny_cfg)
        _trained_once["path"] = os.path.join(tiny_cfg.run_dir, "ckpt.pt")
    return _trained_once["path"]


def write_own_renders(ckpt_path: str, source_npz: str, path: str, depth_offset: float) -> list[torch.Tensor]:
    """An .npz with source_npz's first 4 poses and its focal, whose images are the checkpoint's own renders.
    Its depth is the rendered depth + depth_offset on the top half of each view and 0 (unknown) on the bottom half.
    Returns the rendered images [H, W, 3]."""
    renderer, _ = assembly.load_trained(ckpt_path)
    views = load_npz(source_npz)
    images, depths = [], []
    for pose in views.poses[:4]:
        out = render_image(renderer, *get_rays(views.height, views.width, views.focal, pose), chunk_rays=100)
        depth = out.depth + depth_offset
        depth[views.height // 2:] = 0.0
        images.append(out.rgb.clamp(0, 1))
        depths.append(depth)
    np.savez(path, images=torch.stack(images).numpy(), poses=views.poses[:4].numpy(), focal=views.focal,
             depth=torch.stack(depths).numpy())
    return images


def run_evaluate(ckpt_path: str, data: str, json_path: str) -> dict:
    assert evaluate.main(["--ckpt", ckpt_path, "--data", data, "--json", json_path, "--device", "cpu"]) == 0
    with open(json_path) as f:
        return json.load(f)


# --- evaluate ------------------------------------------------------------------------------------------------------
def test_evaluate_own_renders_scores_high_with_exact_depth_error(ckpt, tiny_scene_path, tmp_path):
    data = str(tmp_path / "own.npz")
    images = write_own_renders(ckpt, tiny_scene_path, data, depth_offset=0.25)
    # the views really differ, so a pose or focal mix-up in evaluate would drop PSNR well below 40 dB
    assert psnr(images[0], images[1]) < 40.0
    result = run_evaluate(ckpt, data, str(tmp_path / "eval.json"))
    assert result["psnr"] > 40.0 and result["ssim"] > 0.999
    # only the top halves carry depth (offset by exactly 0.25): the zeros of the bottom halves must be ignored
    assert result["depth_mae"] == pytest.approx(0.25, abs=1e-4)
    assert all(v["depth_mae"] == pytest.approx(0.25, abs=1e-4) for v in result["per_view"])


def test_evaluate_noise_scores_low_and_json_schema(ckpt, tiny_scene_path, tmp_path):
    views = load_npz(tiny_scene_path)
    noise = np.random.default_rng(0).uniform(size=views.images.shape).astype(np.float32)
    data = str(tmp_path / "noise.npz")
    np.savez(data, images=noise, poses=views.poses.numpy(), focal=views.focal)
    result = run_evaluate(ckpt, data, str(tmp_path / "noise.json"))
    assert result["psnr"] < 12.0 and result["ssim"] < 0.2
    assert {"psnr", "ssim", "per_view", "depth_mae", "background_opacity", "ckpt", "data", "model"} <= set(result)
    assert result["depth_mae"] is None and result["model"] == "nerf"
    assert result["background_opacity"] is None  # uniform noise has no exactly black pixel
    assert result["ckpt"] == ckpt and result["data"] == data
    assert result["split"] == "all"  # another data file than the run's: every view is held out
    assert [v["view"] for v in result["per_view"]] == list(range(len(views)))
    for v in result["per_view"]:
        assert set(v) == {"view", "psnr", "ssim", "background_opacity"} and isinstance(v["psnr"], float)
    assert result["psnr"] == pytest.approx(np.mean([v["psnr"] for v in result["per_view"]]))


def test_evaluate_val_split_reproduces_training_val_psnr(ckpt, tmp_path):
    with open(os.path.join(os.path.dirname(ckpt), "summary.json")) as f:
        summary = json.load(f)
    out = str(tmp_path / "val.json")
    assert evaluate.main(["--ckpt", ckpt, "--split", "val", "--json", out, "--device", "cpu"]) == 0
    with open(out) as f:
        result = json.load(f)
    assert [v["view"] for v in result["per_view"]] == [10, 11]  # 12 views, the last 2 held out
    assert result["psnr"] == pytest.approx(summary["val_psnr"], abs=1e-6)


def test_evaluate_defaults_to_the_held_out_views_of_the_training_data(ckpt, tiny_scene_path, tmp_path, capsys):
    results = {}
    for name, extra in (("implied", []), ("named", ["--data", tiny_scene_path]), ("all", ["--split", "all"])):
        out = str(tmp_path / f"{name}.json")
        assert evaluate.main(["--ckpt", ckpt, *extra, "--json", out, "--device", "cpu"]) == 0
        with open(out) as f:
            results[name] = json.load(f)
    for name in ("implied", "named"):  # the run's own data, by default or by name: its held-out views
        assert results[name]["split"] == "val" and [v["view"] for v in results[name]["per_view"]] == [10, 11]
    assert results["all"]["split"] == "all" and len(results["all"]["per_view"]) == 12
    assert "[val: 2 held-out views" in capsys.readouterr().out


def black_to_1_in_255(image: torch.Tensor) -> torch.Tensor:
    """The pixels of an image [H, W, 3] of a tiny-NeRF file (composited on black) that see the background."""
    views = views_from_arrays({"images": image[None].numpy(), "poses": np.eye(4)[None], "focal": 1.0})
    return views.see_through(views.images[0])


def test_background_opacity_hand_computed():
    def rendered(acc):
        acc = torch.tensor(acc, dtype=torch.float32)
        return Rendered(rgb=torch.zeros(*acc.shape, 3), depth=torch.zeros(acc.shape), acc=acc, weights=None)

    image = torch.full((8, 8, 3), 0.5)
    image[0, :2] = 0.0  # two exactly black pixels
    image[1, 0] = torch.tensor([0.0, 0.0, 0.01])  # dark, but not black (0.01 > 1/255): not background
    acc = torch.full((8, 8), 0.7)
    acc[0, 0], acc[0, 1] = 0.2, 0.4
    first = evaluate.view_metrics(rendered(acc.tolist()), image, None, black_to_1_in_255(image))
    assert (first["bg_pixels"], first["bg_acc_sum"]) == (2, pytest.approx(0.6))
    image2 = torch.full((8, 8, 3), 0.5)
    image2[7, 7] = 0.0
    second = evaluate.view_metrics(rendered(torch.full((8, 8), 0.9).tolist()), image2, None,
                                   black_to_1_in_255(image2))
    grey = torch.full((8, 8, 3), 0.5)
    none = evaluate.view_metrics(rendered(torch.ones(8, 8).tolist()), grey, None, black_to_1_in_255(grey))
    result = evaluate.summarise([{"view": i, **m} for i, m in enumerate((first, second, none))])
    assert [v["background_opacity"] for v in result["per_view"]] == [pytest.approx(0.3), pytest.approx(0.9), None]
    assert result["background_opacity"] == pytest.approx((0.2 + 0.4 + 0.9) / 3)  # pooled over pixels
    assert "bg opacity" in evaluate.format_table(result)
    assert evaluate.summarise([{"view": 0, **none}])["background_opacity"] is None
    real = evaluate.view_metrics(rendered(acc.tolist()), image, None, None)  # a real background: no metric at all
    assert "bg_pixels" not in real and evaluate.summarise([{"view": 0, **real}])["background_opacity"] is None


def test_depth_error_and_pooling_hand_computed():
    pred = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    target = torch.tensor([[0.0, 2.5], [1.0, 0.0]])  # known pixels: |2 - 2.5| + |3 - 1| = 2.5 over 2
    assert evaluate.depth_error(pred, target) == (2.5, 2)
    per_view = [{"view": 0, "psnr": 10.0, "ssim": 0.5, "depth_abs_sum": 2.5, "depth_pixels": 2},
                {"view": 1, "psnr": 20.0, "ssim": 0.7, "depth_abs_sum": 1.0, "depth_pixels": 8}]
    result = evaluate.summarise(per_view)
    assert result["psnr"] == 15.0 and result["ssim"] == pytest.approx(0.6)
    assert result["depth_mae"] == pytest.approx(3.5 / 10)  # pooled over pixels, not (1.25 + 0.125) / 2
    assert [v["depth_mae"] for v in result["per_view"]] == [1.25, 0.125]


# --- render --------------------------------------------------------------------------------------------------------
def test_render_writes_requested_frames(ckpt, tmp_path):
    out = tmp_path / "render"
    argv = ["--ckpt", ckpt, "--out", str(out), "--frames", "6", "--fps", "6", "--size", "16", "--gif",
            "--stills", "2", "--device", "cpu"]
    assert render.main(argv) == 0
    for name in ("video_rgb.mp4", "video_depth.mp4"):
        frames = imageio.mimread(str(out / name), format="FFMPEG")
        assert len(frames) == 6 and frames[0].shape == (16, 16, 3)
    assert len(imageio.mimread(str(out / "video_rgb.gif"))) == 6
    stills = sorted(p.name for p in out.glob("still*.png"))
    assert stills == ["still000.png", "still003.png"]
    assert imageio.imread(str(out / "still003.png")).shape == (16, 48, 3)  # rgb | depth | opacity


def test_orbit_depth_shares_one_colour_scale():
    # an opaque slab -0.5 < y < -0.3; the 2-frame orbit sees it from y = -1.7 (near, frame 1) and from y = +1.7
    # through the origin (far, frame 0). One scale for the video: only the near frame reaches the brightest
    # colour; a per-frame scale would give each frame the whole ramp.
    class Slab(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Parameter(torch.zeros(()))  # render_orbit reads the device from a parameter

        def forward(self, points):
            inside = (points[..., 1] > -0.5) & (points[..., 1] < -0.3)
            sigma = torch.where(inside, 50.0, -50.0)
            return torch.stack([torch.zeros_like(sigma)] * 3 + [sigma], dim=-1)

    renderer = VolumeRenderer(Slab(), StratifiedSampler(near=0.5, far=6.0, n_samples=128))
    video = orbit.render_orbit(renderer, 8, 8, 10.0, frames=2, radius=2.0, elevation=-30.0, chunk_rays=64,
                               progress=False)
    assert len(video.rgb) == 2 and video.depth[0].shape == (8, 8, 3)
    assert video.raw_depth[0].min() > video.raw_depth[1].max()  # the setup: frame 0 is farther everywhere
    brightest = colourise_depth(np.zeros((1, 1)), lo=0.0, hi=1.0)[0, 0].astype(int).sum()
    assert video.depth[1].astype(int).sum(-1).max() == brightest
    assert video.depth[0].astype(int).sum(-1).max() < brightest - 50


# --- report --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_report_table_and_plots(ckpt, tiny_cfg, tmp_path, capsys):
    run_a = os.path.dirname(ckpt)
    run_evaluate(ckpt, tiny_cfg.data, os.path.join(run_a, "eval.json"))
    cfg_b = replace(tiny_cfg, out_dir=str(tmp_path / "run_b"), steps=4, eval_every=2, video=True, video_frames=3)
    train.train(cfg_b)
    assert len(imageio.mimread(os.path.join(cfg_b.run_dir, "video_rgb.mp4"), format="FFMPEG")) == 3
    (tmp_path / "not_a_run").mkdir()
    capsys.readouterr()
    md = tmp_path / "out" / "report.md"
    assert report.main([run_a, cfg_b.run_dir, str(tmp_path / "not_a_run"), "--out", str(md)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning: skipping") == 1 and "not_a_run" in captured.err
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 3  # header + two runs
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")] for r in rows[1:]}
    assert set(cells) == {"run", "run_b"}
    with open(os.path.join(cfg_b.run_dir, "summary.json")) as f:
        summary_b = json.load(f)
    assert cells["run_b"][header.index("val PSNR (dB)")] == f"{summary_b['val_psnr']:.2f}"
    assert cells["run_b"][header.index("steps")] == "4"
    assert cells["run_b"][header.index("SSIM")] == "—" and cells["run"][header.index("SSIM")] != "—"
    assert cells["run"][header.index("params")] == "4,004"
    for name in ("report_step.png", "report_time.png"):
        image = imageio.imread(str(md.parent / name))
        assert image.shape[1] == 700 and f"({name})" in text


# --- bad inputs: one line on stderr, exit code 2 -------------------------------------------------------------------
@pytest.fixture
def bad_inputs(ckpt, tmp_path) -> dict:
    not_ckpt = tmp_path / "notes.pt"
    not_ckpt.write_text("not a checkpoint")
    bad_data = tmp_path / "bad.npz"
    np.savez(bad_data, images=np.zeros((3, 8, 8, 3), np.float32), poses=np.tile(np.eye(4), (2, 1, 1)), focal=8.0)
    too_small = tmp_path / "small.npz"
    np.savez(too_small, images=np.zeros((2, 4, 4, 3), np.float32), poses=np.tile(np.eye(4), (2, 1, 1)), focal=4.0)
    mismatched = tmp_path / "mismatched.pt"
    saved = torch.load(ckpt, weights_only=True)
    saved["config"]["width"] = 64  # the weights are 32 wide
    torch.save(saved, mismatched)
    (tmp_path / "empty").mkdir()
    return {"missing": str(tmp_path / "nope.pt"), "not_ckpt": str(not_ckpt), "bad_data": str(bad_data),
            "too_small": str(too_small),
            "mismatched": str(mismatched), "empty": str(tmp_path / "empty"), "out": str(tmp_path / "r")}


def assert_one_error_line(err: str, must_name: str) -> None:
    # what the line must name: the rest of the wording belongs to the modules that raise it
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and must_name in lines[0], err


def test_bad_inputs_in_process(ckpt, bad_inputs, capsys):
    cases = [(evaluate.main, ["--ckpt", bad_inputs["not_ckpt"]], "notes.pt"),
             (evaluate.main, ["--ckpt", ckpt, "--data", bad_inputs["bad_data"]], "bad.npz"),
             (evaluate.main, ["--ckpt", ckpt, "--data", bad_inputs["too_small"]], "4x4"),
             (render.main, ["--ckpt", ckpt, "--frames", "many"], "--frames"),
             (render.main, ["--ckpt", ckpt, "--frames", "0", "--out", bad_inputs["out"]], "--frames")]
    for main, argv, must_name in cases:
        capsys.readouterr()
        assert main(argv) == 2, argv
        assert_one_error_line(capsys.readouterr().err, must_name)


@pytest.mark.slow
def test_bad_inputs_as_commands(ckpt, bad_inputs):
    commands = [(["evaluate.py", "--ckpt", bad_inputs["missing"]], "nope.pt"),
                (["render.py", "--ckpt", bad_inputs["mismatched"], "--out", bad_inputs["out"]], "weights"),
                (["report.py", bad_inputs["empty"]], "run")]
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in commands]
    for proc, (argv, must_name) in zip(procs, commands):
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (argv, err)
        assert "Traceback" not in err
        assert_one_error_line(err, must_name)
