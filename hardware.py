"""What the machine can do, decided in one place: device choice, AMP dtype and scaler, backends.

Every rule here is a fact about hardware or about a PyTorch version, so each is stated with its reason:

- **Device.** auto -> cuda:LOCAL_RANK, else mps, else cpu. Under torchrun (world size > 1) a process group needs
  NCCL (CUDA tensors) or gloo (CPU tensors); gloo has no MPS tensors, so auto picks the CPU there and an explicit
  mps is refused. `cuda:N` under torchrun would put every rank on GPU N (NCCL refuses a duplicate GPU): refused,
  each rank takes cuda:LOCAL_RANK (choose the GPUs with CUDA_VISIBLE_DEVICES).
- **AMP dtype** (`amp_policy`). bf16 only where the hardware computes it natively: CUDA capability >= 8.0
  (A100, H100, RTX 30xx+) and CPUs with bf16 units (avx512_bf16 or AMX; on Arm the bf16 feature).
  `torch.cuda.is_bf16_supported()` is not that test: on a T4 (sm_75) it returns True by emulation, and Triton
  then refuses bf16 below sm_80. Elsewhere on CUDA/MPS: fp16 with a GradScaler (fp16's 5-bit exponent lets small
  gradients underflow without one). On a CPU without bf16 units bf16 is still what `auto` picks (fp16 is emulated
  there too) but the run's first lines say it will be slow.
- **BitNeRF's backward matmuls** (`bitnet_bf16_grads`): bf16 inputs where a CPU has bf16 units. Its integer
  product and the passes around it are chosen in ternary_kernels.py.
- **Backends** (`configure_backends`). CUDA fp32 matmuls on TF32 tensor cores unless `--tf32=false`.
"""

from __future__ import annotations

import ctypes
import functools
import os
import platform
from datetime import timedelta
from typing import NamedTuple

import torch
import torch.distributed as dist

from configs import device_kind, launched_by_torchrun
from utils import Dist, UserError, print0


# --- device ------------------------------------------------------------------------------------------------------
def pick_device(requested: str, local_rank: int = 0, distributed: bool = False) -> torch.device:
    """The device of --device=`requested` for this process; an impossible request is a UserError."""
    if distributed and requested.startswith("cuda:"):
        raise UserError(f"--device={requested} under torchrun would put every rank on one GPU; use --device=cuda "
                        f"(rank r takes cuda:LOCAL_RANK) and choose GPUs with CUDA_VISIBLE_DEVICES")
    if distributed and requested == "mps":
        raise UserError("torchrun needs CUDA (NCCL) or CPU (gloo) tensors and gloo has none on MPS; use "
                        "--device=cpu, or run on one process without torchrun")
    kind = device_kind(requested, distributed)
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={requested} requested but CUDA is not available (use --device=auto or cpu)")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise UserError("device=mps requested but MPS is not available (use --device=auto or cpu)")
    if requested in ("auto", "cuda") and kind == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(kind if requested == "auto" else requested)


def check_device(requested: str) -> None:
    """Refuse (UserError) a --device=`requested` this machine lacks or this launch cannot use (pick_device's
    checks, under torchrun), before a scale or a device default is chosen for it."""
    pick_device(requested, distributed=launched_by_torchrun())


def compute_init(device_request: str) -> tuple[Dist, torch.device]:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); under torchrun start the process group, one
    rank included (so `torchrun --nproc_per_node=1` runs DDP on one GPU, as nanoGPT's train.py does).

    gloo on CPU, nccl on CUDA. A plain `python expN.py` is world size 1 with no process group.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0")), world,
                launched=launched_by_torchrun())
    device = pick_device(device_request, info.local_rank, info.enabled)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # bounded timeout: if a rank dies the others fail their next collective instead of hanging forever
        timeout = timedelta(seconds=dist_timeout_s())
        backend = "nccl" if device.type == "cuda" else "gloo"
        store = _restart_safe_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=info.rank, world_size=world, timeout=timeout)
    return info, device


def _restart_safe_store(timeout) -> "dist.Store | None":
    """A per-restart namespace in torchrun's shared store, or None for the default env:// rendezvous.

    torchrun (torch 2.13) keeps one TCPStore for the whole job when TORCHELASTIC_USE_AGENT_STORE=True, so after a
    `--max-restarts` restart the new workers' init_process_group finds the dead attempt's gloo/NCCL addresses
    under the same keys and hangs until the timeout. Prefixing the keys with the restart count fixes that. The
    count is the same for every worker only when one agent started them all (one node); on several nodes torchrun
    must be told not to share the store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1), which this warns about.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if int(os.environ.get("GROUP_WORLD_SIZE", "1")) > 1:
        if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0:
            print0("warning: --max-restarts on several nodes needs TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in "
                   "torchrun's environment, or restarted workers may hang until the process-group timeout")
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"nerf_attempt{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)


def compute_cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- mixed precision ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (Linux; lower case), or an empty set where unknown."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 | Arm
            return frozenset(value.split())
    return frozenset()


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # x86 AVX-512 BF16, x86 AMX, Arm FEAT_BF16


def cpu_has_native_bf16(flags: set[str] | None = None) -> bool:
    """Whether this CPU has bf16 arithmetic units (an Apple M2+ reports none here: it is not Linux)."""
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in CPU_BF16_FLAGS)


def cuda_has_native_bf16(device: torch.device) -> bool:
    """bf16 tensor cores: compute capability 8.0 or newer (A100, H100, RTX 30xx); a T4 (7.5) emulates it."""
    return torch.cuda.get_device_capability(device) >= (8, 0)


def torch_at_least(major: int, minor: int) -> bool:
    version = torch.__version__.split("+")[0].split(".")
    return (int(version[0]), int(version[1])) >= (major, minor)


class AmpPolicy(NamedTuple):
    dtype: torch.dtype | None  # autocast dtype; None = AMP off
    scaler: bool  # training needs a GradScaler (fp16)
    reason: str  # one line for the run's first lines


def amp_policy(amp: bool, requested: str, device: torch.device) -> AmpPolicy:
    """The autocast dtype for `--amp`, `--amp_dtype=auto|bf16|fp16` on `device`, and whether to scale losses."""
    if not amp:
        return AmpPolicy(None, False, "amp off (fp32)")
    native = _native_bf16(device)
    if requested == "bf16" and device.type == "cuda" and not native:
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        raise UserError(f"--amp_dtype=bf16 on a GPU of compute capability {capability}: bf16 needs 8.0+ (Triton "
                        f"refuses it below); use --amp_dtype=fp16 or auto")
    if requested == "fp16" or (requested == "auto" and device.type != "cpu" and not native):
        where = {"cuda": "this GPU has no native bf16 (capability < 8.0)", "mps": "Apple GPU"}.get(device.type, "")
        return AmpPolicy(torch.float16, True, "amp fp16 + GradScaler" + (f" ({where})" if requested == "auto"
                                                                      else " (--amp_dtype=fp16)"))
    if device.type == "cpu" and not native:
        return AmpPolicy(torch.bfloat16, False, "amp bf16, EMULATED: this CPU has no bf16 units (avx512_bf16/AMX), "
                                               "so bf16 autocast may run several times slower than --amp=false")
    return AmpPolicy(torch.bfloat16, False, "amp bf16 (native on this device; fp32's exponent range: no scaler)")


def _native_bf16(device: torch.device) -> bool:
    if device.type == "cuda":
        return cuda_has_native_bf16(device)
    if device.type == "cpu":
        return cpu_has_native_bf16()
    return False  # MPS: fp16 is the Apple GPU's fast half type


def make_grad_scaler(policy: AmpPolicy, device: torch.device) -> torch.amp.GradScaler:
    """The step's GradScaler, enabled when the policy needs one (fp16); disabled, each of its calls is the
    identity or the plain optimizer step. On MPS before torch 2.8 GradScaler.unscale_ calls .double(), which MPS
    cannot hold: refused with one line instead of a crash mid-step."""
    if not policy.scaler:
        return torch.amp.GradScaler(device.type, enabled=False)
    if device.type == "mps" and not torch_at_least(2, 8):
        raise UserError(f"fp16 AMP on MPS needs torch >= 2.8 for its GradScaler (this is {torch.__version__}); "
                        f"use --amp=false or upgrade torch")
    return torch.amp.GradScaler(device.type)


# --- BitNeRF's backward matmuls ----------------------------------------------------------------------------------
def bitnet_bf16_grads(bitnet_grad: str, device: torch.device) -> bool:
    """Whether BitNeRF's backward matmuls take bf16 inputs (config bitnet_grad): auto = on a CPU with bf16 units,
    where they run several times faster; CUDA's fp32 matmuls already run on TF32 tensor cores."""
    if bitnet_grad == "auto":
        return device.type == "cpu" and cpu_has_native_bf16()
    return bitnet_grad == "bf16"


def bitnet_grad_line(bitnet_grad: str, device: torch.device) -> str:
    """The run's line naming the precision of BitNeRF's backward matmuls (config bitnet_grad)."""
    chosen = "" if bitnet_grad != "auto" else "auto: "
    if not bitnet_bf16_grads(bitnet_grad, device):
        return f"BitNeRF backward matmuls: {chosen}float32 (torchao's straight-through estimator)"
    how = "on this device's bf16 units" if _native_bf16(device) else "no bf16 units here: rounded, then float32, no faster"
    return f"BitNeRF backward matmuls: {chosen}bf16 inputs, float32 sums ({how})"


# --- backends ----------------------------------------------------------------------------------------------------


def configure_backends(device: torch.device, tf32: bool, distributed: bool = False) -> None:
    """Process-wide settings for `device`, made once before training: CUDA fp32 matmuls on TF32 tensor cores
    ("high": inputs rounded to a 10-bit mantissa, fp32 accumulation) unless tf32 is False; on a CPU, freed memory
    kept for reuse (keep_freed_memory). Distributed: no DDPOptimizer (it splits a compiled graph at gradient-bucket
    boundaries to overlap the all-reduce, which buys nothing for fields whose ~2 MB of gradients fill one bucket,
    and with dynamic shapes that path is where compiled DDP has crashed and recompiled)."""
    if distributed:
        torch._dynamo.config.optimize_ddp = False
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high" if tf32 else "highest")
    elif device.type == "cpu":
        keep_freed_memory()


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed blocks for reuse. By default it returns blocks above a threshold to the
    system (mmap'd ones on free, the heap's top beyond another), so the next tensor of that size page-faults on
    each of its 4 KB pages. The threshold adapts to a process that reuses one size; a process that alternates
    sizes or models keeps paying: bench.py's interleaved NeRF/BitNeRF renders ran 1.4-1.9x slower, a lone
    evaluation ~7 %, a training loop no slower. Here blocks up to 32 MB come from the heap and the heap is never
    trimmed, so a process holds its peak memory until it exits. False where the C library has no mallopt
    (macOS) or refuses the settings."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def device_line(device: torch.device, policy: AmpPolicy, tf32: bool) -> str:
    """One line: the device, its AMP choice and matmul precision, for the run's first lines."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        capability = ".".join(map(str, torch.cuda.get_device_capability(device)))
        what = f"{name} (capability {capability}), fp32 matmuls {'TF32' if tf32 else 'full fp32'}"
    elif device.type == "cpu":
        what = f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads, bf16 units " \
               f"{'yes' if cpu_has_native_bf16() else 'no'}"
    else:
        what = "Apple GPU"
    return f"device {device}: {what}; {policy.reason}"


def dist_timeout_s() -> float:
    """Seconds a collective may wait for another rank. Generous by default: a cold torch.compile on a slow
    notebook CPU can take minutes on one rank while the others wait at the next collective."""
    return float(os.environ.get("NERF_DIST_TIMEOUT_S", "1800"))


# --- provenance ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name ("AMD EPYC", "Intel(R) Xeon(R) ..."), from /proc/cpuinfo where there is one."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model"):
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def source_commit() -> str:
    """The git commit of this checkout ("unknown" outside git), "+changes" when tracked files differ from it:
    a measurement is reproducible from its commit only if the code was that commit."""
    import subprocess
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=here, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--short=10", "HEAD")
        if head.returncode:
            return "unknown"
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("+changes" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(device: torch.device) -> dict:
    """What a measurement was made with: commit, torch, Python, the machine, the date (UTC)."""
    from datetime import datetime, timezone
    flags = sorted(cpu_flags() & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16"})
    machine = f"{cpu_model()} ({', '.join(flags) or 'no AVX2'}), {os.cpu_count()} cores"
    if device.type == "cuda":
        machine = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}; {machine}"
    return {"commit": source_commit(), "torch": torch.__version__, "python": platform.python_version(),
            "machine": machine, "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
