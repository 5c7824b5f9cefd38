"""BitNeRF under DDP: a check that every rank holds the same model, and deliberately nothing else.

BitNeRF needs no extra machinery under DistributedDataParallel. BitNet b1.58 training (bitnerf.BitLinear, the
arithmetic of torchao's bitnet_training) keeps no running statistics: each forward derives the ternary weights and their per-tensor absmean scale from the
float latent weights, and the int8 activation scales per row from the batch itself. DDP broadcasts rank 0's latent
weights when it wraps the model and averages the gradients, and every rank runs the same AdamW update. So the
latent weights, and with them every ternary scale, are bitwise identical on all ranks after each step. (The
original exp6 re-quantized rank 0's model to a frozen int4 format inside the epoch loop; nothing like that is
needed or wanted: the checkpoint holds the float latent weights, as for exp4.)

What does go wrong is a forward that bypasses the DDP wrapper (`model.module(...)`): DDP's gradient hooks then
stay idle, each rank follows its own shard's gradient and the replicas drift apart without any error.
`assert_replicas_agree` catches that: it all-gathers a small fingerprint per parameter (for torchao's weight
subclass, the ternary scale the forward uses) and per buffer (the occupancy grid, which every rank must hold
alike) and compares it with rank 0's. The training loop calls it at every checkpoint.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def replica_fingerprint(model: nn.Module) -> tuple[list[str], torch.Tensor]:
    """(parameter names, fingerprints [P, 2] float64): per parameter, the float64 sum of its (latent) values and
    its scale: the ternary absmean scale for a BitNet weight, mean |value| for any other parameter."""
    from bitnerf import ternary_weight

    names, rows = [], []
    for name, param in model.named_parameters():
        data = getattr(param, "_data", param).detach()
        if type(param).__name__ == "BitNetTrainingLinearWeight":
            scale = ternary_weight(data)[1]  # exactly the scale the quantized forward multiplies by
        else:
            scale = data.float().abs().mean()
        names.append(name)
        rows.append(torch.stack([data.double().sum(), scale.double()]))
    for name, buffer in model.named_buffers():  # e.g. the occupancy grid, which every rank must hold alike
        values = buffer.detach().double()
        names.append(name)
        rows.append(torch.stack([values.sum(), (values * torch.arange(values.numel(), device=values.device,
                                                                       dtype=torch.float64).view_as(values)).sum()]))
    return names, torch.stack(rows)


def replica_mismatch(model: nn.Module) -> list[str]:
    """Names of the parameters whose fingerprint on some rank differs from rank 0's (exact comparison: replicas
    kept in step by DDP are bitwise equal). Collective: every rank must call it. [] when not distributed."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return []
    names, mine = replica_fingerprint(model)
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, mine)
    reference = gathered[0]
    differs = torch.zeros(len(names), dtype=torch.bool, device=mine.device)
    for other in gathered[1:]:
        differs |= (other != reference).any(dim=1)
    return [name for name, bad in zip(names, differs.tolist()) if bad]


def assert_replicas_agree(model: nn.Module) -> None:
    """Raise RuntimeError (on every rank) when the ranks' models differ. Collective: every rank must call it."""
    bad = replica_mismatch(model)
    if bad:
        shown = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
        raise RuntimeError(f"DDP replicas diverged in {len(bad)} parameter(s) ({shown}): gradients were not "
                           f"synchronised; is the forward bypassing the DDP wrapper?")
