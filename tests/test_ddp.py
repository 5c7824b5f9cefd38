"""DDP on CPU (gloo): 2 processes x half a batch must train exactly like 1 process x the whole batch.

The two-process side runs in processes started with torch.multiprocessing (spawn) on a free local port; the
end-to-end tests launch exp5.py / exp6.py under torchrun. Everything here is tiny: the cost is process start-up.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch
import torch.multiprocessing as mp

from assembly import build_renderer, field_state_dict
from bitnerf_ddp import assert_replicas_agree, replica_fingerprint, replica_mismatch
from dataset import RayBatcher, load_views, split_views
from train import Trainer, evaluate_views, step_generator
from hardware import compute_cleanup, compute_init
from utils import (Dist, UserError, all_reduce_mean, master_decides,
                   seed_everything)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# (label, model, chunk, bypass): "bypass" calls the module inside the DDP wrapper, as the original code did.
# chunk: sample points per micro-batch (1 << 20: one micro-batch; 1024: 2 per rank, 4 in the reference, so
# DDP's no_sync accumulation is exercised). "compiled": the default torch.compile'd field inside DDP
VARIANTS = (("nerf", "nerf", 1 << 20, False), ("nerf_bypass", "nerf", 1 << 20, True),
            ("nerf_microbatch", "nerf", 1024, False), ("nerf_compiled", "nerf", 1024, False),
            ("bitnerf", "bitnerf", 1 << 20, False), ("bitnerf_bypass", "bitnerf", 1 << 20, True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def equivalence_cfg(base, label: str, model: str, chunk_points: int):
    # perturb=False: no sampling noise, so both sides see exactly the same points
    return replace(base, model=model, lr=1e-3, perturb=False, batch_size=256, chunk_points=chunk_points,
                   compile=label.endswith("compiled"))


def train_steps(cfg, dist_info: Dist, device: torch.device, bypass: bool) -> dict:
    """STEPS optimizer steps through train.Trainer on this rank's share of each global batch."""
    seed_everything(cfg.seed)
    train_views, val_views = split_views(load_views(cfg.data), cfg.val_views)
    batcher = RayBatcher(train_views, cfg.batch_unit, cfg.batch_size, cfg.seed, dist_info.rank,
                         dist_info.world_size)
    raw = build_renderer(cfg, device)
    raw.occupancy.carve(train_views.see_through(train_views.images), train_views.poses, train_views.cameras,
                        raw.sampler.near)
    trainer = Trainer(cfg, raw, dist_info, device)
    if bypass:
        trainer.model = trainer.model.module  # the original bug: DDP's gradient hooks never fire
    losses = []
    for step in range(STEPS):
        if step % 2 == 0:  # as train._loop does: split over ranks, the same grid everywhere
            raw.sampler.refresh(raw.density, step_generator(cfg.seed, 0, step, device), dist_info.rank,
                                dist_info.world_size)
        rays_o, rays_d, target = batcher.batch(step)
        loss, _ = trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, dist_info.rank, step, device),
                               cfg.lr)
        losses.append(all_reduce_mean(loss).item())
    val_psnr, _ = evaluate_views(raw, val_views, dist_info, chunk_rays=4096)
    return {"params": field_state_dict(raw), "losses": losses, "val_psnr": val_psnr,
            "mismatch": replica_mismatch(raw), "occupied": raw.occupancy.occupied.clone()}


def _worker(rank: int, world: int, port: int, cfgs: dict, out_dir: str) -> None:
    """One spawned rank: every variant in turn, in one process group; each rank saves its results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist_info, device = compute_init("cpu")
    try:
        results = {label: train_steps(cfg, dist_info, device, bypass) for label, (cfg, bypass) in cfgs.items()}
        results["decided"] = master_decides(lambda: dist_info.rank)
        try:
            master_decides(lambda: _raise(UserError(f"only rank {dist_info.rank} sees this")))
        except UserError as err:
            results["error"] = str(err)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        compute_cleanup()


def _raise(err: Exception):
    raise err


def spawn(world: int, fn, args: tuple, timeout_s: float) -> None:
    """Run fn(rank, *args) in `world` spawned processes; fail (killing them) if they take over timeout_s."""
    ctx = mp.start_processes(fn, args=args, nprocs=world, start_method="spawn", join=False)
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{world} spawned ranks did not finish within {timeout_s} s")


@pytest.fixture(scope="module")
def two_rank_results(tiny_scene_path, tmp_path_factory):
    """{rank: {variant: results}} from one 2-process run, and the configs used."""
    from conftest import EXP1

    base = replace(EXP1, data=tiny_scene_path, width=32, depth=2, skip_layer=1, n_freqs=4, n_samples=16,
                   batch_unit="ray", val_views=2, compile=False, video=False, wandb="disabled", occ_resolution=32)
    cfgs = {label: (equivalence_cfg(base, label, model, chunk), bypass) for label, model, chunk, bypass in VARIANTS}
    out = tmp_path_factory.mktemp("ddp")
    spawn(2, _worker, (2, free_port(), cfgs, str(out)), timeout_s=300)
    return {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)}, cfgs


@pytest.fixture(scope="module")
def reference(two_rank_results):
    """One process, the whole global batch, same configs: {variant: results}, computed on first use."""
    _, cfgs = two_rank_results
    cache = {}

    def get(label):
        if label not in cache:
            cache[label] = train_steps(cfgs[label][0], Dist(), torch.device("cpu"), bypass=False)
        return cache[label]

    return get


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("label", ["nerf", "nerf_microbatch", "nerf_compiled", "bitnerf"])
def test_two_ranks_match_one_process_with_the_whole_batch(two_rank_results, reference, label):
    results, _ = two_rank_results
    ref = reference(label)
    ddp0, ddp1 = results[0][label], results[1][label]
    assert ddp0["mismatch"] == [] and max_diff(ddp0["params"], ddp1["params"]) == 0.0  # replicas bitwise equal
    # every rank holds the same occupancy grid (each evaluated half of its cells), and the one process's grid
    assert torch.equal(ddp0["occupied"], ddp1["occupied"]) and torch.equal(ddp0["occupied"], ref["occupied"])
    assert 0 < ddp0["occupied"].float().mean() < 1  # carved and updated: a real grid, not all or nothing
    diff = max_diff(ddp0["params"], ref["params"])
    # measured: 1.5e-08 for nerf and bitnerf (float32 summation order); bypassing DDP gives ~7e-03
    assert diff < 1e-5, diff
    assert ddp0["losses"] == pytest.approx(ref["losses"], rel=1e-5)  # logged loss: mean over ranks
    assert ddp0["val_psnr"] == pytest.approx(ref["val_psnr"], abs=1e-4)  # val views shared out, averaged


@pytest.mark.slow
def test_rank_0_decides_for_every_rank(two_rank_results):
    """resume_state runs on rank 0 only (other nodes may not see run_dir); its answer or error reaches all."""
    results, _ = two_rank_results
    assert results[0]["decided"] == results[1]["decided"] == 0
    assert results[0]["error"] == results[1]["error"] == "only rank 0 sees this"


@pytest.mark.slow
@pytest.mark.parametrize("label", ["nerf", "bitnerf"])
def test_bypassing_ddp_breaks_equivalence(two_rank_results, reference, label):
    """What the original code did: each rank steps on its own half-batch gradient and the replicas drift."""
    results, _ = two_rank_results
    bypass0, bypass1 = results[0][f"{label}_bypass"], results[1][f"{label}_bypass"]
    assert max_diff(bypass0["params"], reference(label)["params"]) > 1e-4
    assert max_diff(bypass0["params"], bypass1["params"]) > 1e-4
    assert len(bypass0["mismatch"]) > 0  # and the replica check notices


# --- single process: the replica check and the gather are no-ops -------------------------------------------------
def test_replica_check_is_a_no_op_without_a_process_group():
    from dataclasses import replace as _replace

    from configs import EXP4

    cfg = _replace(EXP4, width=16, depth=2, skip_layer=1, n_freqs=2)
    renderer = build_renderer(cfg, torch.device("cpu"))
    assert replica_mismatch(renderer) == []
    assert_replicas_agree(renderer)  # does not raise


def test_fingerprint_holds_the_ternary_scale_the_forward_uses():
    from bitnerf import BitNeRF, quantize_bitnet, ternary_weight

    field = quantize_bitnet(BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1))
    names, prints = replica_fingerprint(field)
    row = names.index("hidden.0.1.weight")
    weight = field.hidden[0].linear.weight
    latent = getattr(weight, "_data", weight).detach().double()
    assert prints[row, 0].item() == pytest.approx(latent.sum().item(), rel=1e-12)
    assert prints[row, 1].item() == ternary_weight(weight)[1].item()
    assert prints[row, 1].item() == pytest.approx(latent.abs().mean().item(), rel=1e-6)  # absmean
    assert prints.shape == (len(list(field.parameters())), 2)


def test_ddp_presets_differ_from_their_single_process_twins_only_in_name():
    """exp6 is exp4 under torchrun (the reference implementation's exp6 used 20x the lr, no RMSNorm and no
    weight decay)."""
    from dataclasses import asdict

    from configs import EXP1, EXP4, EXP5, EXP6

    for ddp, single in ((EXP5, EXP1), (EXP6, EXP4)):
        differ = {k for k, v in asdict(ddp).items() if asdict(single)[k] != v}
        assert differ == {"name"}


def test_gather_to_master_without_a_process_group():
    from utils import gather_to_master

    assert gather_to_master({"a": 1}) == [{"a": 1}]


# --- torchrun end to end ----------------------------------------------------------------------------------------
TINY_ARGS = ["--width=32", "--depth=2", "--skip_layer=1", "--n_freqs=4", "--n_samples=16", "--batch_unit=ray",
             "--val_views=2", "--compile=false", "--video=false", "--wandb=disabled", "--chunk_points=8192",
             "--occ_resolution=32"]


def torchrun(script: str, args: list[str], log_path, nproc: int = 2, extra: tuple = ()) -> subprocess.Popen:
    """Start `torchrun --standalone --nproc_per_node=nproc script args` from the repository root."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *extra,
           script, *args]
    with open(log_path, "w") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def worker_pid(parent: int, rank: int) -> int | None:
    """The pid of torchrun's worker process with RANK=rank (a direct child of the torchrun process)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours
        if ppid == parent and f"RANK={rank}".encode() in environ:
            return int(entry)
    return None


def wait_for(path: str, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear (torchrun exit code {proc.poll()})")
        time.sleep(0.1)


def finish(proc: subprocess.Popen, timeout_s: float) -> int:
    try:
        return proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"torchrun did not exit within {timeout_s} s")


def read_metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def check_outputs_written_once(run_dir, n_steps: int, log_every: int, world_size: int = 2) -> None:
    records = read_metrics(run_dir)
    loss_steps = [r["step"] for r in records if "loss" in r]
    assert loss_steps == list(range(log_every, n_steps + 1, log_every))  # one line per logged step, no repeats
    val_steps = [r["step"] for r in records if "val_psnr" in r]
    assert len(val_steps) == len(set(val_steps)) and val_steps[-1] == n_steps
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    assert summary["world_size"] == world_size and summary["steps"] == n_steps
    assert sorted(os.listdir(os.path.join(run_dir, "val"))) == ["view000.png", "view001.png"]  # both ranks' views
    names = set(os.listdir(run_dir))
    assert {"ckpt.pt", "config.json", "summary.json", f"ckpt_step{n_steps:07d}.pt"} <= names
    assert not [n for n in names if n.startswith(".tmp")]


def run_exp5(data: str, run_dir, tmp_path, steps: int, *extra: str, nproc: int = 2) -> str:
    """torchrun exp5.py on `data` with the tiny sizes for `steps` steps (a checkpoint at the end); its log, after
    checking that it exited 0 and wrote its outputs once."""
    args = [f"--data={data}", f"--out_dir={run_dir}", *TINY_ARGS, f"--steps={steps}", "--batch_size=256",
            "--log_every=1", *extra]
    proc = torchrun("exp5.py", args, tmp_path / "log.txt", nproc=nproc)
    code = finish(proc, timeout_s=180)
    log = (tmp_path / "log.txt").read_text()
    assert code == 0, log[-3000:]
    assert f"world size {nproc}" in log
    check_outputs_written_once(run_dir, n_steps=steps, log_every=1, world_size=nproc)
    return log


@pytest.mark.slow
def test_torchrun_exp5_end_to_end(tiny_scene_path, tmp_path):
    log = run_exp5(tiny_scene_path, tmp_path / "exp5", tmp_path, 6, "--eval_every=3", "--ckpt_every=3")
    assert log.count("val PSNR") == 2  # rank 0 prints: step 3, and the final line


@pytest.mark.slow
def test_torchrun_with_one_process_trains_through_ddp(tiny_scene_path, tmp_path):
    """`torchrun --nproc_per_node=1` is the multi-GPU path on one device (process group, DDP, the replica check),
    not a plain run: what a one-GPU rental can check of exp5/exp6."""
    log = run_exp5(tiny_scene_path, tmp_path / "exp5", tmp_path, 3, "--eval_every=0", "--ckpt_every=3", nproc=1)
    assert "is a DDP experiment but is running as a single process" not in log


@pytest.mark.slow
def test_torchrun_on_a_blender_scene_folder(blender_scene_path, tmp_path):
    """exp5 on a NeRF-synthetic folder (RGBA, random background in training, scored on white) at --downscale=2."""
    log = run_exp5(blender_scene_path, tmp_path / "exp5", tmp_path, 4, "--eval_every=0", "--ckpt_every=4",
                   "--downscale=2")
    assert "8 train / 2 val views of 16x16 (downscale 2), RGBA torch.uint8, background random in training, white" \
           in log


@pytest.mark.slow
def test_torchrun_on_a_capture_trains_its_proposal_grid_on_both_ranks(tmp_path):
    """exp5 on an unbounded capture: the proposal grid's gradients are all-reduced with the field's (the replica
    check at the end compares every parameter, the grid's included), and it is saved in the checkpoint."""
    from dataset import write_synthetic_capture

    capture = str(tmp_path / "capture")
    write_synthetic_capture(capture, n_views=8, width=24, height=20)
    log = run_exp5(capture, tmp_path / "exp5", tmp_path, 4, "--eval_every=0", "--ckpt_every=4")
    assert "proposal grid" in log
    ckpt = torch.load(tmp_path / "exp5" / "ckpt.pt", weights_only=True)
    assert ckpt["config"]["skip_with"] == "proposal" and ckpt["proposal"]["grid"].shape == (64**3, 1)


@pytest.mark.slow
def test_torchrun_exp6_survives_a_dead_rank_with_max_restarts(tiny_scene_path, tmp_path):
    """Kill rank 1 after the first checkpoint: torchrun restarts both workers, which resume from ckpt.pt."""
    run_dir = tmp_path / "exp6"
    args = [f"--data={tiny_scene_path}", f"--out_dir={run_dir}", *TINY_ARGS, "--steps=300", "--batch_size=64",
            "--log_every=10", "--eval_every=100", "--ckpt_every=20"]
    proc = torchrun("exp6.py", args, tmp_path / "log.txt", extra=("--max-restarts=1",))
    wait_for(str(run_dir / "ckpt.pt"), proc, timeout_s=120)
    victim = worker_pid(proc.pid, rank=1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    code = finish(proc, timeout_s=180)
    log = (tmp_path / "log.txt").read_text()
    assert code == 0, log[-3000:]
    assert f"resuming {run_dir} from step" in log
    check_outputs_written_once(run_dir, n_steps=300, log_every=10)


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_quickly(tiny_scene_path, tmp_path):
    """No restarts allowed: the survivor must not wait for the process-group timeout (300 s)."""
    run_dir = tmp_path / "exp5"
    args = [f"--data={tiny_scene_path}", f"--out_dir={run_dir}", *TINY_ARGS, "--steps=5000", "--batch_size=64",
            "--log_every=50", "--eval_every=0", "--ckpt_every=20"]
    proc = torchrun("exp5.py", args, tmp_path / "log.txt")
    wait_for(str(run_dir / "ckpt.pt"), proc, timeout_s=120)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    start = time.monotonic()
    code = finish(proc, timeout_s=60)
    elapsed = time.monotonic() - start
    log = (tmp_path / "log.txt").read_text()
    assert code != 0 and elapsed < 30, (code, elapsed)  # measured: exit 1 after ~2.5 s
    assert "exp5.py FAILED" in log and "rank      : 1" in log  # torchrun names the rank that died


@pytest.mark.parametrize("under_torchrun", [False, True])
def test_ranks_agree_on_stopping_every_log_every_steps_not_every_step(tiny_cfg, monkeypatch, under_torchrun):
    """Reading an all-reduce back on the host is a sync that idles a GPU: under torchrun (here a 1-rank gloo group
    in this process) the stop agreement runs at log records and the last step; a plain run checks every step
    (no collective, so no cost), which keeps its time budget exact."""
    import train as train_module

    if under_torchrun:
        monkeypatch.setenv("WORLD_SIZE", "1")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("LOCAL_RANK", "0")
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(free_port()))
    calls = []
    real = train_module.agree_to_stop
    monkeypatch.setattr(train_module, "agree_to_stop", lambda *a: (calls.append(1), real(*a))[1])
    summary = train_module.train(replace(tiny_cfg, steps=10, log_every=5))
    assert summary["steps"] == 10 and summary["world_size"] == 1
    assert len(calls) == (2 if under_torchrun else 10)
