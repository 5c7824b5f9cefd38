"""Reliability and safety: bad input, checkpoints, resumption, signals, NaN.

Every bad input must give one `error: ...` line naming the problem, a non-zero exit, no traceback and no file
overwritten. The real command line (`python exp1.py ...`) is run for a representative handful; the rest call the
functions directly. The resumption test kills a real run with SIGKILL and demands bitwise-equal weights.
"""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import types
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import assembly
import train
from configs import EXP1, ConfigError, from_cli
from dataset import DataError, RayBatcher, load_npz, split_views, synthetic_scene, views_from_arrays
from tests.conftest import ROOT
from utils import Dist, UserError, load_checkpoint

CPU = torch.device("cpu")


# --- helpers ----------------------------------------------------------------------------------------------------
def cli_args(cfg) -> list[str]:
    """`--key=value` for every field where cfg differs from exp1's preset (at the preset's own, paper, scale)."""
    return ["--scale=paper"] + [f"--{k}={v}" for k, v in cfg.to_dict().items() if v != getattr(EXP1, k)]


def start(args, **kwargs) -> subprocess.Popen:
    env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "exp1.py", *args], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def run_exp1(args, timeout=240):
    return finish(start(args), timeout)


def error_line(code, err) -> str:
    """The single `error:` line of a failed run (library warnings may precede it; a traceback may not)."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    return lines[0]


def snapshot(folder) -> dict:
    """{file: (bytes, mtime)} of a run folder, to prove a refused command wrote nothing."""
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def all_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from all_tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from all_tensors(v)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def without_timings(records):
    return [{k: v for k, v in r.items() if k not in ("time_s", "points_per_s")} for r in records]


# --- data: each malformed file is one DataError naming the problem ------------------------------------------------
@pytest.fixture(scope="module")
def scene():
    return synthetic_scene(n_views=4, size=8, seed=3)


def changed(scene, key, fn):
    arrays = dict(scene)
    arrays[key] = fn(np.array(scene[key]))
    return arrays


def _set(index, value):
    def fn(a):
        a = a.astype(np.float64) if isinstance(value, float) and a.dtype.kind != "f" else a
        a[index] = value
        return a
    return fn


def _reflect(poses):
    poses[:, :3, 0] *= -1  # det -1: a mirror, not a rotation
    return poses


BAD_ARRAYS = {
    "missing-key": (lambda s: {k: v for k, v in s.items() if k != "focal"}, "lacks key(s) focal (has: depth, images, poses)"),
    "images-rank": (lambda s: changed(s, "images", lambda a: a[0]), "images must have shape [N, H, W, 3], got [8, 8, 3]"),
    "images-rgba": (lambda s: changed(s, "images", lambda a: np.concatenate([a, a[..., :1]], -1)),
                    "images must have shape [N, H, W, 3], got [4, 8, 8, 4]"),
    "images-range": (lambda s: changed(s, "images", lambda a: a * 2 - 0.5), "float images must lie in [0, 1]"),
    "images-nan": (lambda s: changed(s, "images", _set((1, 2, 3, 0), np.nan)), "images contain NaN or inf"),
    "images-inf": (lambda s: changed(s, "images", _set((0, 0, 0, 2), np.inf)), "images contain NaN or inf"),
    "images-int32": (lambda s: changed(s, "images", lambda a: (a * 255).astype(np.int32)),
                     "images must be float in [0, 1] or uint8, got dtype int32"),
    "poses-rank": (lambda s: changed(s, "poses", lambda a: a[:, :3, :3]),
                   "poses must have shape [N, 4, 4] (or [N, 3, 4]), got [4, 3, 3]"),
    "poses-nan": (lambda s: changed(s, "poses", _set((2, 0, 3), np.nan)), "poses must be finite numbers"),
    "poses-inf": (lambda s: changed(s, "poses", _set((2, 1, 1), -np.inf)), "poses must be finite numbers"),
    "poses-scaled": (lambda s: changed(s, "poses", lambda a: a * np.array([2.0, 2.0, 2.0, 1.0])[:, None]),
                     "pose 0 is not a rigid camera-to-world matrix"),
    "poses-mirrored": (lambda s: changed(s, "poses", _reflect), "pose 0 is not a rigid camera-to-world matrix"),
    "poses-last-row": (lambda s: changed(s, "poses", _set((3, 3, 0), 0.5)), "pose 3 is not a rigid"),
    "focal-zero": (lambda s: {**s, "focal": np.float64(0.0)}, "focal must be a finite number > 0, got 0.0"),
    "focal-negative": (lambda s: {**s, "focal": np.float64(-11.0)}, "focal must be a finite number > 0, got -11.0"),
    "focal-nan": (lambda s: {**s, "focal": np.float64(np.nan)}, "focal must be a finite number > 0, got nan"),
    "focal-vector": (lambda s: {**s, "focal": np.array([10.0, 11.0])}, "focal must be one number, got shape [2]"),
    "focal-text": (lambda s: {**s, "focal": np.array("138.9")}, "focal must be one number"),
    "count-mismatch": (lambda s: changed(s, "poses", lambda a: a[:3]), "4 images but 3 poses"),
    "depth-shape": (lambda s: changed(s, "depth", lambda a: a[:, :4]), "depth must be finite with shape"),
}


@pytest.mark.parametrize("case", list(BAD_ARRAYS))
def test_malformed_arrays_are_one_data_error(scene, tmp_path, case):
    make, expected = BAD_ARRAYS[case]
    path = tmp_path / "bad.npz"
    np.savez(path, **make(scene))
    with pytest.raises(DataError) as exc:
        load_npz(str(path))
    message = str(exc.value)
    assert str(path) in message and expected in message and "\n" not in message, message


def test_uint8_images_are_accepted_and_scaled(scene):
    images = np.array([0, 1, 128, 255], np.uint8)[:, None, None, None] * np.ones((1, 8, 8, 3), np.uint8)
    views = views_from_arrays({**scene, "images": images})
    assert views.images.dtype == torch.float32
    expected = np.array([0, 1, 128, 255], np.float32) / np.float32(255)
    assert views.images[:, 0, 0, 0].tolist() == expected.tolist() and expected[-1] == 1.0


def test_rigid_poses_pass_including_3x4(scene):
    views = views_from_arrays({**scene, "poses": np.asarray(scene["poses"])[:, :3]})
    assert torch.allclose(views.poses, torch.from_numpy(np.asarray(scene["poses"])))


def test_unreadable_files_are_one_data_error(scene, tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, **scene)
    blob = good.read_bytes()
    (tmp_path / "text.npz").write_text("images,poses,focal\n1,2,3\n")
    (tmp_path / "truncated.npz").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "single.npy", np.asarray(scene["images"]))
    np.savez(tmp_path / "objects.npz", images=np.array([{"evil": 1}], dtype=object), poses=scene["poses"],
             focal=scene["focal"])
    (tmp_path / "folder.npz").mkdir()
    cases = {"missing.npz": "data file not found", "text.npz": "is not a readable .npz file",
             "truncated.npz": "is not a readable .npz file", "empty.npz": "is not a readable .npz file",
             "single.npy": "holds a single array, not a .npz", "objects.npz": "is not a readable .npz file",
             "folder.npz": "is not a readable .npz file (IsADirectoryError"}
    for name, expected in cases.items():
        with pytest.raises(DataError) as exc:
            load_npz(str(tmp_path / name))
        assert expected in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))


def test_too_few_views_or_rays_for_the_split_and_batch(scene):
    views = views_from_arrays(scene)
    for n_val in (0, 4, 9):
        with pytest.raises(DataError, match=f"the data has 4 views: cannot hold out {n_val} for validation"):
            split_views(views, n_val)
    train_views, _ = split_views(views, 1)
    with pytest.raises(DataError, match=r"batch_size=4 is larger than the 3 training images available"):
        RayBatcher(train_views, "image", 4, seed=0)
    with pytest.raises(DataError, match=r"batch_size=193 is larger than the 192 training rays available"):
        RayBatcher(train_views, "ray", 193, seed=0)


@pytest.fixture(scope="module")
def npz_blobs(tmp_path_factory):
    """A small valid .npz, stored and compressed, as bytes; and a folder to write variants into."""
    folder = tmp_path_factory.mktemp("fuzz")
    blobs = []
    for save in (np.savez, np.savez_compressed):
        path = folder / f"{save.__name__}.npz"
        save(path, **synthetic_scene(n_views=3, size=6, seed=2))
        blobs.append(path.read_bytes())
    return folder, blobs


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(data=st.data())
def test_any_truncation_is_a_data_error(npz_blobs, data):
    folder, blobs = npz_blobs
    blob = blobs[data.draw(st.integers(0, 1), label="compressed")]
    cut = data.draw(st.integers(0, len(blob) - 1), label="cut")
    path = folder / "cut.npz"
    path.write_bytes(blob[:cut])
    with pytest.raises(DataError):
        load_npz(str(path))


@FUZZ
@given(data=st.data())
def test_any_byte_corruption_is_a_data_error_or_valid_views(npz_blobs, data):
    folder, blobs = npz_blobs
    blob = bytearray(blobs[data.draw(st.integers(0, 1), label="compressed")])
    for _ in range(data.draw(st.integers(1, 4), label="n")):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    path = folder / "flipped.npz"
    path.write_bytes(bytes(blob))
    try:
        views = load_npz(str(path))
    except DataError:
        return
    # a flip inside the pixel data may leave a valid file: then the validation's guarantees must still hold
    assert torch.isfinite(views.images).all() and 0 <= views.images.min() and views.images.max() <= 1
    assert torch.isfinite(views.poses).all() and views.focal > 0


def _is_rigid(poses: torch.Tensor) -> bool:
    p = poses.double()
    rot = p[:, :3, :3]
    eye = torch.eye(3, dtype=torch.float64)
    return bool(((rot @ rot.transpose(1, 2) - eye).abs().max() <= 2e-3) and
                ((torch.linalg.det(rot) - 1).abs().max() <= 2e-3) and
                ((p[:, 3] - torch.tensor([0.0, 0, 0, 1], dtype=torch.float64)).abs().max() <= 1e-6))


@settings(max_examples=150, deadline=None)
@given(entries=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(0, 3),
                                  st.floats(allow_nan=True, allow_infinity=True, width=32)), min_size=1,
                        max_size=3),
       scale=st.sampled_from([1.0, 1.0, 1.0005, 1.01, -1.0, 0.0]))
def test_corrupted_poses_are_refused_or_rigid(entries, scale):
    scene = synthetic_scene(n_views=4, size=2, seed=5)
    poses = np.array(scene["poses"])
    poses[:, :3, :3] *= scale
    for view, row, col, value in entries:
        poses[view, row, col] = value
    try:
        views = views_from_arrays({**scene, "poses": poses})
    except DataError as err:
        assert "\n" not in str(err)
        return
    assert _is_rigid(views.poses) and torch.isfinite(views.poses).all()


# --- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, expected", [
    (["--bogus=1"], "unknown config key --bogus (see --help for the list)"),
    (["--lr=fast"], "--lr expects float, got 'fast'"),
    (["--steps=1.5"], "--steps expects int, got '1.5'"),
    (["--compile=maybe"], "--compile expects true/false, got 'maybe'"),
    (["--lr=0"], "lr must be > 0 (got 0.0)"),
    (["--lr=-1e-3"], "lr must be > 0 (got -0.001)"),
    (["--lr=inf"], "lr must be a finite number (got inf)"),
    (["--weight_decay=nan"], "weight_decay must be a finite number (got nan)"),
    (["--steps=-1"], "steps must be >= 0 (got -1)"),
    (["--n_samples=1"], "n_samples must be >= 2 (got 1)"),
    (["--near=6", "--far=2"], "need 0 <= near < far (got near=6.0, far=2.0; 0 = from the data)"),
    (["--near=2", "--far=2"], "need 0 <= near < far (got near=2.0, far=2.0; 0 = from the data)"),
    (["--device=tpu"], "device='tpu' is not auto, cpu, cuda, cuda:N or mps"),
    (["--wandb=cloud"], "wandb='cloud' is not one of online, offline, disabled"),
    (["--model=transformer"], "model='transformer' is not one of nerf, bitnerf"),
    (["--batch_size=0"], "batch_size must be >= 1 (got 0)"),
    (["stray"], "unexpected argument 'stray'"),
])
def test_bad_config_is_one_config_error(argv, expected):
    with pytest.raises(ConfigError) as exc:
        from_cli(EXP1, argv)
    assert expected in str(exc.value) and "\n" not in str(exc.value)


def test_batch_larger_than_the_data_is_refused_before_training(tiny_cfg):
    with pytest.raises(DataError, match="batch_size=10000 is larger than the 5760 training rays available"):
        train.train(replace(tiny_cfg, batch_size=10000))
    assert not os.path.exists(tiny_cfg.run_dir)


# --- the command line: a representative handful through the real script --------------------------------------------
@pytest.mark.slow
def test_cli_bad_inputs_are_one_line_errors(tiny_cfg, tmp_path):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(open(tiny_cfg.data, "rb").read()[:5000])
    base = cli_args(tiny_cfg)
    cases = {
        "missing data": (base + [f"--data={tmp_path / 'nope.npz'}"],
                         f"error: data file not found: {tmp_path / 'nope.npz'} (run `python data_setup.py` or use "
                         f"--data=synthetic)"),
        "truncated data": (base + [f"--data={truncated}"], f"error: {truncated} is not a readable .npz file"),
        "bad value": (base + ["--lr=0"], "error: lr must be > 0 (got 0.0)"),
        "unknown key": (base + ["--learning_rate=0.1"], "error: unknown config key --learning_rate"),
        "too few views": (base + ["--val_views=12"], "error: the data has 12 views: cannot hold out 12"),
    }
    procs = {name: start(args) for name, (args, _) in cases.items()}  # side by side: mostly interpreter start-up
    for name, proc in procs.items():
        line = error_line(*finish(proc)[::2])
        assert line.startswith(cases[name][1]), (name, line)
    assert not os.path.exists(tiny_cfg.run_dir)  # nothing created by any of them


# --- checkpoints ------------------------------------------------------------------------------------------------
class RunsCode:
    """Unpickling this calls `fn(*args)`: what a malicious checkpoint does."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(scope="module")
def trained(tiny_scene_path, tmp_path_factory):
    """A finished tiny NeRF run (3 steps, a checkpoint at each). Tests must leave its folder as they found it."""
    cfg = replace(EXP1, name="tiny", data=tiny_scene_path, out_dir=str(tmp_path_factory.mktemp("trained") / "run"),
                  width=32, depth=2, skip_layer=1, n_freqs=4, n_samples=16, steps=3, batch_unit="ray",
                  batch_size=256, val_views=2, compile=False, video=False, wandb="disabled", log_every=1,
                  eval_every=0, ckpt_every=1, keep_ckpts=5, chunk_points=8192)
    train.train(cfg)
    return cfg


def test_checkpoint_missing_corrupt_or_foreign(tmp_path, trained):
    ckpt = os.path.join(trained.run_dir, "ckpt.pt")
    blob = open(ckpt, "rb").read()
    (tmp_path / "half.pt").write_bytes(blob[: len(blob) // 2])
    (tmp_path / "noise.pt").write_bytes(os.urandom(4096))
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    cases = {"absent.pt": "checkpoint not found:", "half.pt": "cannot load checkpoint",
             "noise.pt": "cannot load checkpoint",  "foreign.pt": "is not a checkpoint of this project",
             "list.pt": "is not a checkpoint of this project"}
    for name, expected in cases.items():
        with pytest.raises(UserError) as exc:
            load_checkpoint(str(tmp_path / name))
        assert expected in str(exc.value) and "\n" not in str(exc.value), (name, str(exc.value))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", ["torch.save", "pickle-2", "pickle-5"])
def test_checkpoint_that_runs_code_is_refused_unrun(tmp_path, capfd, protocol):
    marker = tmp_path / "pwned"
    payload = {"model": RunsCode(os.system, f"touch {marker}"), "config": RunsCode(print, "PWNED"), "step": 1}
    path = tmp_path / "evil.pt"
    if protocol == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=int(protocol[-1]))
    with pytest.raises(UserError) as exc:
        load_checkpoint(str(path))
    message = str(exc.value)
    if protocol == "pickle-5":  # torch's unpickler stops at an opcode it does not take, before any global
        assert message.startswith(f"cannot load checkpoint {path}: not a file of plain tensors (Unsupported")
    else:
        assert message.startswith(f"refusing checkpoint {path}: it asks to load posix.system, which no checkpoint")
    assert message.endswith("nothing in it was run") and "\n" not in message
    assert not marker.exists() and "PWNED" not in capfd.readouterr().out


def test_nerf_checkpoint_into_a_bitnerf_model_is_refused(trained, tmp_path):
    ckpt = load_checkpoint(os.path.join(trained.run_dir, "ckpt.pt"))
    with pytest.raises(UserError, match="checkpoint weights do not fit a bitnerf model of this config"):
        assembly.build_renderer(replace(trained, model="bitnerf"), CPU, ckpt["model"])
    # a checkpoint whose saved config was edited to claim another model kind
    forged = dict(ckpt, config=dict(ckpt["config"], model="bitnerf"))
    path = str(tmp_path / "forged.pt")
    torch.save(forged, path)
    with pytest.raises(UserError, match="do not fit a bitnerf model"):
        assembly.load_trained(path)
    torch.save(dict(ckpt, config=dict(ckpt["config"], colour="red")), path)
    with pytest.raises(UserError, match="saved config is unreadable .*unknown keys: colour"):
        assembly.load_trained(path)


def test_resume_with_another_config_or_model_kind_is_refused(trained):
    before = snapshot(trained.run_dir)
    with pytest.raises(UserError) as exc:
        train.train(replace(trained, model="bitnerf", lr=5e-5))
    assert "was trained with a different config (lr: 0.001 -> 5e-05, model: 'nerf' -> 'bitnerf')" in str(exc.value)
    with pytest.raises(UserError, match=r"already holds a checkpoint; pass --resume=true .*nothing was overwritten"):
        train.train(replace(trained, resume=False))
    assert snapshot(trained.run_dir) == before


@pytest.mark.slow
def test_bitnerf_checkpoint_loads_weights_only_and_resumes_exactly(tiny_cfg, tmp_path):
    """BitNeRF's torchao weight subclass must not leak into checkpoints (weights_only=True would refuse it), and
    the optimizer state must round-trip: 2 steps + resume + 2 steps == 4 steps, bitwise."""
    cfg = replace(tiny_cfg, model="bitnerf", steps=4, ckpt_every=2, keep_ckpts=3, lr=3e-3)
    train.train(cfg)
    ckpt = load_checkpoint(os.path.join(cfg.run_dir, "ckpt_step0000002.pt"))
    assert {type(t) for t in all_tensors(ckpt)} == {torch.Tensor}
    assert ckpt["optimizer"]["state"] and all(s["step"] == 2 for s in ckpt["optimizer"]["state"].values())
    resumed = replace(cfg, out_dir=str(tmp_path / "resumed"))
    os.makedirs(resumed.run_dir)
    shutil.copy(os.path.join(cfg.run_dir, "ckpt_step0000002.pt"), os.path.join(resumed.run_dir, "ckpt.pt"))
    train.train(resumed)
    a = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))
    b = load_checkpoint(os.path.join(resumed.run_dir, "ckpt.pt"))
    assert a["step"] == b["step"] == 4
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(all_tensors(a["optimizer"]), all_tensors(b["optimizer"])))
    assert all(torch.equal(a["occupancy"][k], b["occupancy"][k]) for k in a["occupancy"])  # the grid too


def test_truncated_checkpoint_falls_back_to_the_newest_good_one(trained, tmp_path, capsys):
    run = replace(trained, out_dir=str(tmp_path / "run"))
    shutil.copytree(trained.run_dir, run.run_dir)  # ckpt.pt and ckpt_step0000001..3.pt, all at or before step 3
    path = os.path.join(run.run_dir, "ckpt.pt")
    blob = open(path, "rb").read()
    open(path, "wb").write(blob[: len(blob) // 2])
    step3 = os.path.join(run.run_dir, "ckpt_step0000003.pt")
    open(step3, "wb").write(os.urandom(1000))
    capsys.readouterr()
    assert train.resume_state(run, run.run_dir)["step"] == 2
    warning = capsys.readouterr().err.strip()
    assert "\n" not in warning and warning.startswith(f"warning: cannot load checkpoint {path}")
    assert warning.endswith(f"using the newest good one, {os.path.join(run.run_dir, 'ckpt_step0000002.pt')} (step 2)")
    assert train.train(run)["steps"] == 3  # resumed from step 2, finished normally
    assert load_checkpoint(path)["step"] == 3
    # nothing good left: the one-line error about ckpt.pt, as before
    for name in os.listdir(run.run_dir):
        if name.startswith("ckpt"):
            open(os.path.join(run.run_dir, name), "wb").write(b"not a zip")
    with pytest.raises(UserError, match=f"^cannot load checkpoint {path}: "):
        train.resume_state(run, run.run_dir)
    # a readable file that is refused (not this project's) is never passed over for an older one
    shutil.copy(os.path.join(trained.run_dir, "ckpt_step0000001.pt"), os.path.join(run.run_dir, "ckpt_step1.pt"))
    torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(UserError, match="is not a checkpoint of this project"):
        train.resume_state(run, run.run_dir)


def test_resumed_run_keeps_its_wandb_run_wall_time_and_one_final_record(tiny_cfg, monkeypatch):
    inits = []

    class FakeRun:
        def __init__(self, **kwargs):
            inits.append(kwargs)
            self.id = kwargs.get("id") or "run-1"

        def log(self, record, step):
            pass

        def finish(self):
            pass

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    real_step = train.Trainer.step
    calls = []

    def slow_step_then_signal(self, *args):
        time.sleep(0.3)
        calls.append(1)
        out = real_step(self, *args)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)
        return out

    cfg = replace(tiny_cfg, steps=4, wandb="offline")
    with monkeypatch.context() as patch:
        patch.setattr(train.Trainer, "step", slow_step_then_signal)
        with pytest.raises(train.Interrupted):
            train.train(cfg)
    first = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))
    assert first["step"] == 2 and first["wandb_run_id"] == "run-1" and first["wall_time_s"] >= 0.6
    assert "id" not in inits[0] and "resume" not in inits[0]
    t0 = time.perf_counter()
    summary = train.train(cfg)
    elapsed = time.perf_counter() - t0
    assert inits[1]["id"] == "run-1" and inits[1]["resume"] == "allow"  # the same W&B run continues
    assert summary["steps"] == 4 and first["train_time_s"] < summary["train_time_s"] < summary["wall_time_s"]
    assert first["wall_time_s"] + 0.5 * elapsed < summary["wall_time_s"] <= first["wall_time_s"] + elapsed
    with open(os.path.join(cfg.run_dir, "summary.json")) as f:
        assert json.load(f)["wall_time_s"] == summary["wall_time_s"]
    final = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))
    assert final["wandb_run_id"] == "run-1" and final["wall_time_s"] > first["wall_time_s"]
    # the same command again: nothing to train, the final evaluation is redone but recorded once
    again = train.train(cfg)
    assert inits[2]["id"] == "run-1" and again["wall_time_s"] > final["wall_time_s"]
    records = read_metrics(cfg.run_dir)
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "val_psnr" in r] == [4]


def test_ddp_experiment_without_torchrun_says_it_is_one_process(tiny_cfg, monkeypatch, capsys):
    monkeypatch.setattr(train, "_run", lambda cfg, dist_info, device: {})
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    for name in ("exp5", "exp6", "exp1"):
        train.train(replace(tiny_cfg, name=name))
        out = capsys.readouterr().out
        if name == "exp1":
            assert "torchrun" not in out
        else:
            assert "running as a single process" in out
            assert f"torchrun --standalone --nproc_per_node=2 {name}.py" in out


# --- resumption after SIGKILL: bitwise the same as never stopping --------------------------------------------------
@pytest.fixture(scope="module")
def resume_cfg(tiny_scene_path, tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    return replace(EXP1, name="tiny", data=tiny_scene_path, out_dir=str(base / "straight"), width=32, depth=2,
                   skip_layer=1, n_freqs=4, n_samples=16, steps=8, batch_unit="ray",
                   batch_size=512, val_views=2, compile=False, video=False, wandb="disabled", log_every=3,
                   eval_every=4, ckpt_every=1, keep_ckpts=20, chunk_points=4096, lr_schedule="cosine",
                   warmup_steps=3, occ_resolution=32, occ_update_every=3)


@pytest.fixture(scope="module")
def straight_run(resume_cfg):
    """The uninterrupted reference run (a subprocess too, so both sides run the same way)."""
    code, out, err = run_exp1(cli_args(resume_cfg))
    assert code == 0, err
    return resume_cfg.run_dir


@pytest.mark.slow
def test_sigkill_then_resume_gives_bitwise_equal_weights(resume_cfg, straight_run, tmp_path):
    killed_dir = str(tmp_path / "killed")
    args = cli_args(replace(resume_cfg, out_dir=killed_dir))
    proc = start(args)
    second = os.path.join(killed_dir, "ckpt_step0000002.pt")
    deadline = time.monotonic() + 180
    while not os.path.exists(second) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.kill()  # SIGKILL: no handler, no cleanup; somewhere in step 3 or a later one
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed_at = load_checkpoint(os.path.join(killed_dir, "ckpt.pt"))["step"]
    assert 2 <= killed_at < resume_cfg.steps

    code, out, err = run_exp1(args)  # the same command again
    assert code == 0, err
    assert f"resuming {killed_dir} from step {killed_at}" in out
    a = load_checkpoint(os.path.join(straight_run, "ckpt.pt"))
    b = load_checkpoint(os.path.join(killed_dir, "ckpt.pt"))
    assert a["step"] == b["step"] == resume_cfg.steps
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(x, y) for x, y in zip(all_tensors(a["optimizer"]), all_tensors(b["optimizer"])))
    # the occupancy grid (carved, then refreshed at steps 0, 3, 6) resumes exactly too
    assert a["occupancy"]["updates"] == 3 and 0 < a["occupancy"]["occupied"].float().mean() < 1
    assert all(torch.equal(a["occupancy"][k], b["occupancy"][k]) for k in a["occupancy"])
    sa = json.load(open(os.path.join(straight_run, "summary.json")))
    sb = json.load(open(os.path.join(killed_dir, "summary.json")))
    assert sa["val_psnr"] == sb["val_psnr"]
    # loss windows end at checkpoints, so even the logged records match (all but the wall-clock fields)
    assert without_timings(read_metrics(straight_run)) == without_timings(read_metrics(killed_dir))


@pytest.mark.slow
def test_cli_refuses_other_config_or_no_resume_without_writing(resume_cfg, straight_run):
    before = snapshot(straight_run)
    args = cli_args(resume_cfg)
    procs = [start(args + ["--lr=0.002", "--n_samples=24"]), start(args + ["--resume=false"])]
    other, no_resume = (error_line(*finish(p)[::2]) for p in procs)
    ckpt = os.path.join(straight_run, "ckpt.pt")
    assert other == (f"error: {ckpt} was trained with a different config (lr: 0.001 -> 0.002, n_samples: 16 -> 24); "
                     f"use another --out_dir or the same settings")
    assert no_resume == (f"error: {straight_run} already holds a checkpoint; pass --resume=true to continue it, or "
                         f"choose another --out_dir (nothing was overwritten)")
    assert snapshot(straight_run) == before


@pytest.mark.slow
def test_cli_refuses_a_malicious_checkpoint_in_the_run_dir(resume_cfg, straight_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(straight_run, run_dir)
    marker = tmp_path / "pwned"
    torch.save({"model": RunsCode(os.system, f"touch {marker}"), "config": {}}, run_dir / "ckpt.pt")
    code, out, err = run_exp1(cli_args(replace(resume_cfg, out_dir=str(run_dir))))
    assert error_line(code, err) == (f"error: refusing checkpoint {run_dir / 'ckpt.pt'}: it asks to load "
                                     f"posix.system, which no checkpoint of this project contains; nothing in it "
                                     f"was run")
    assert not marker.exists()


# --- signals ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_with_a_message(tiny_cfg, sig):
    cfg = replace(tiny_cfg, steps=100_000, ckpt_every=0, log_every=1)
    proc = start(cli_args(cfg))
    metrics = os.path.join(cfg.run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(metrics) and len(open(metrics).readlines()) >= 2:
            break
        time.sleep(0.02)
    proc.send_signal(sig)
    code, out, err = finish(proc)
    assert code == 128 + sig, err
    step = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))["step"]
    assert 2 <= step < cfg.steps
    assert (f"stopped by {sig.name} at step {step}; checkpoint saved — run the same command again to resume"
            in out)
    assert "Traceback" not in err
    assert read_metrics(cfg.run_dir)[-1]["step"] == step  # the window up to the stop is logged, nothing past it


def test_signal_in_process_closes_wandb_and_restores_handlers(tiny_cfg, monkeypatch):
    runs = []

    class FakeRun:
        def __init__(self, **kwargs):
            self.kwargs, self.logged, self.finished = kwargs, [], 0
            runs.append(self)

        def log(self, record, step):
            self.logged.append(step)

        def finish(self):
            self.finished += 1

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: FakeRun(**kw)))
    monkeypatch.delenv("WANDB_MODE", raising=False)
    real_step = train.Trainer.step
    calls = []

    def step_then_signal(self, *args):
        out = real_step(self, *args)
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # as if `kill` arrived during step 2
        return out

    monkeypatch.setattr(train.Trainer, "step", step_then_signal)
    handler = signal.getsignal(signal.SIGTERM)
    cfg = replace(tiny_cfg, steps=50, wandb="offline")
    with pytest.raises(train.Interrupted) as exc:
        train.train(cfg)
    assert exc.value.exit_code == 128 + signal.SIGTERM and len(calls) == 2
    assert len(runs) == 1 and runs[0].finished == 1 and runs[0].logged == [1, 2]
    assert load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))["step"] == 2
    assert signal.getsignal(signal.SIGTERM) is handler


# --- NaN / inf ----------------------------------------------------------------------------------------------------
def test_nan_never_reaches_a_checkpoint(tiny_cfg, monkeypatch):
    """A NaN target at step 4 (index 3) poisons loss, gradients and then the weights; checkpoints are due every step
    but the loss is logged only every 100: the step-4 checkpoint must still be refused, step 3's kept."""
    real_batch = RayBatcher.batch

    def poisoned(self, step):
        rays_o, rays_d, target = real_batch(self, step)
        return rays_o, rays_d, target * float("nan") if step == 3 else target

    monkeypatch.setattr(RayBatcher, "batch", poisoned)
    cfg = replace(tiny_cfg, steps=8, ckpt_every=1, keep_ckpts=10, log_every=100)
    with pytest.raises(UserError) as exc:
        train.train(cfg)
    ckpt_path = os.path.join(cfg.run_dir, "ckpt.pt")
    assert str(exc.value) == (f"loss or gradients became NaN/inf by step 4; stopped without saving (the last good "
                              f"checkpoint, if any, is {ckpt_path}). Try a lower --lr, --grad_clip or --amp=false")
    ckpt = load_checkpoint(ckpt_path)
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in all_tensors(ckpt))
    assert sorted(f for f in os.listdir(cfg.run_dir) if f.startswith("ckpt_step")) == [
        "ckpt_step0000001.pt", "ckpt_step0000002.pt", "ckpt_step0000003.pt"]


@pytest.mark.slow
def test_cli_divergence_stops_with_one_line_and_keeps_the_last_good_checkpoint(tiny_cfg):
    cfg = replace(tiny_cfg, lr=1e6, steps=30, ckpt_every=1, keep_ckpts=50, log_every=1000)
    code, out, err = run_exp1(cli_args(cfg))
    line = error_line(code, err)
    assert line.startswith("error: loss or gradients became NaN/inf by step ")
    bad_step = int(line.split("by step ")[1].split(";")[0])
    saved = sorted(f for f in os.listdir(cfg.run_dir) if f.startswith("ckpt_step"))
    assert saved == [f"ckpt_step{s:07d}.pt" for s in range(1, bad_step)]
    if bad_step > 1:
        ckpt = load_checkpoint(os.path.join(cfg.run_dir, "ckpt.pt"))
        assert ckpt["step"] == bad_step - 1 and all(torch.isfinite(t).all() for t in all_tensors(ckpt))


def test_fp16_scaler_skips_a_step_with_inf_gradients(tiny_cfg):
    """CPU autocast does run fp16 in torch >= 2.x: a real GradScaler, a real inf gradient (an inf target)."""
    cfg = replace(tiny_cfg, amp=True, amp_dtype="fp16")
    torch.manual_seed(0)
    renderer = assembly.build_renderer(cfg, CPU)
    trainer = train.Trainer(cfg, renderer, Dist(), CPU)
    assert trainer.autocast_dtype == torch.float16 and trainer.scaler.is_enabled()
    gen = torch.Generator().manual_seed(0)
    rays_o = torch.tensor([[0.0, 0.0, 4.0]]).expand(64, 3)
    rays_d = torch.nn.functional.normalize(torch.randn(64, 3, generator=gen) * 0.1 + torch.tensor([0, 0, -1.0]), dim=-1)
    before = [p.detach().clone() for p in renderer.parameters()]
    scale = trainer.scaler.get_scale()
    loss, grad_norm = trainer.step(rays_o, rays_d, torch.full((64, 3), float("inf")), gen, 1e-3)
    assert not torch.isfinite(loss) and not torch.isfinite(grad_norm)
    assert all(torch.equal(a, b) for a, b in zip(before, renderer.parameters()))  # the update was skipped
    assert trainer.scaler.get_scale() == scale / 2
    # Adam never stepped (a fused AdamW may create its state, but with step 0 and zero moments)
    assert all(float(st["step"]) == 0 and not st["exp_avg"].any() for st in trainer.optimizer.state.values())
    loss, grad_norm = trainer.step(rays_o, rays_d, torch.rand(64, 3, generator=gen), gen, 1e-3)
    assert torch.isfinite(loss) and torch.isfinite(grad_norm)
    assert not all(torch.equal(a, b) for a, b in zip(before, renderer.parameters()))
    assert all(torch.isfinite(p).all() for p in renderer.parameters())
