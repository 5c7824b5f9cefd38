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

from bitnerf_ddp import assert_replicas_agree, replica_fingerprint, replica_mismatch
from dataset import RayBatcher, load_views, split_views
from train import Trainer, build_renderer, evaluate_views, field_state_dict, step_generator
from utils import Dist, all_reduce_mean, compute_cleanup, compute_init, seed_everything

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4
# (label, model, lr, bypass DDP): "bypass" calls the module inside the DDP wrapper, as the original code did
VARIANTS = (("nerf", "nerf", 1e-3, False), ("nerf_bypass", "nerf", 1e-3, True),
            ("bitnerf", "bitnerf", 1e-3, False), ("bitnerf_bypass", "bitnerf", 1e-3, True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def equivalence_cfg(tiny_cfg, model: str, lr: float):
    # perturb=False: no sampling noise, so both sides see exactly the same points; one micro-batch per step
    return replace(tiny_cfg, model=model, lr=lr, perturb=False, batch_size=256, chunk_points=1 << 20)


def train_steps(cfg, dist_info: Dist, device: torch.device, bypass: bool) -> dict:
    """STEPS optimizer steps through train.Trainer on this rank's share of each global batch."""
    seed_everything(cfg.seed)
    train_views, val_views = split_views(load_views(cfg.data), cfg.val_views)
    batcher = RayBatcher(train_views, cfg.batch_unit, cfg.batch_size, cfg.seed, dist_info.rank,
                         dist_info.world_size)
    raw = build_renderer(cfg, device)
    trainer = Trainer(cfg, raw, dist_info, device)
    if bypass:
        trainer.model = trainer.model.module  # the original bug: DDP's gradient hooks never fire
    losses = []
    for step in range(STEPS):
        rays_o, rays_d, target = batcher.batch(step)
        loss, _ = trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, dist_info.rank, step, device),
                               cfg.lr)
        losses.append(all_reduce_mean(loss).item())
    val_psnr, _ = evaluate_views(raw, val_views, dist_info, chunk_rays=4096)
    return {"params": field_state_dict(raw), "losses": losses, "val_psnr": val_psnr,
            "mismatch": replica_mismatch(raw)}


def _worker(rank: int, world: int, port: int, cfgs: dict, out_dir: str) -> None:
    """One spawned rank: every variant in turn, in one process group; each rank saves its results."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist_info, device = compute_init("cpu")
    try:
        results = {label: train_steps(cfg, dist_info, device, bypass) for label, (cfg, bypass) in cfgs.items()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        compute_cleanup()


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
                   batch_unit="ray", val_views=2, compile=False, video=False, wandb="disabled")
    cfgs = {label: (equivalence_cfg(base, model, lr), bypass) for label, model, lr, bypass in VARIANTS}
    out = tmp_path_factory.mktemp("ddp")
    spawn(2, _worker, (2, free_port(), cfgs, str(out)), timeout_s=120)
    return {r: torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)}, cfgs


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("label", ["nerf", "bitnerf"])
def test_two_ranks_match_one_process_with_the_whole_batch(two_rank_results, label):
    results, cfgs = two_rank_results
    cfg, _ = cfgs[label]
    ref = train_steps(cfg, Dist(), torch.device("cpu"), bypass=False)
    ddp0, ddp1 = results[0][label], results[1][label]
    assert ddp0["mismatch"] == [] and max_diff(ddp0["params"], ddp1["params"]) == 0.0  # replicas bitwise equal
    diff = max_diff(ddp0["params"], ref["params"])
    print(f"{label}: max |param(2 ranks) - param(1 process)| = {diff:.2e}")
    assert diff < 1e-5
    assert ddp0["losses"] == pytest.approx(ref["losses"], rel=1e-5)  # logged loss: mean over ranks
    assert ddp0["val_psnr"] == pytest.approx(ref["val_psnr"], abs=1e-4)  # val views shared out, averaged


@pytest.mark.slow
@pytest.mark.parametrize("label", ["nerf", "bitnerf"])
def test_bypassing_ddp_breaks_equivalence(two_rank_results, label):
    """What the original code did: each rank steps on its own half-batch gradient and the replicas drift."""
    results, cfgs = two_rank_results
    cfg, _ = cfgs[label]
    ref = train_steps(cfg, Dist(), torch.device("cpu"), bypass=False)
    bypass0, bypass1 = results[0][f"{label}_bypass"], results[1][f"{label}_bypass"]
    diff = max_diff(bypass0["params"], ref["params"])
    print(f"{label} bypassing DDP: max |param(rank 0) - param(1 process)| = {diff:.2e}")
    assert diff > 1e-4
    assert max_diff(bypass0["params"], bypass1["params"]) > 1e-4
    assert len(bypass0["mismatch"]) > 0  # and the replica check notices
