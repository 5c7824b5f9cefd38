"""How a BitNeRF layer runs: its kernels, the choice between them and the fallback, each path with the same bits.

bitnerf.py states BitNet b1.58's arithmetic (the weights' quantization, the layer and its straight-through
gradients); this module computes it fast on the machine at hand, for training and for the packed model alike
(bitnerf_packed.py), so that both run the same code and a packed model computes what its trained forward did.

- **The integer product** (`ternary_matmul`): int8 activations times ternary weights, exact on every path:
  oneDNN's int8 matmul primitive, `torch._int_mm` (int8 inputs, int32 accumulator), or a float32 matmul of the
  same integers (every partial sum is an integer below 2^24), so the choice changes speed, never a result.
  `integer_product` decides once per process and device type: the kernels the hardware's int8 units allow (CUDA
  tensor cores; VNNI/AMX on x86 CPUs), each run once by a probe that must get the exact answer (cuBLASLt's int8
  path on sm_75 depends on the CUDA build), and on a CPU timed against the float product; elsewhere the float
  product. NERF_INT_MM overrides the choice.
- **The passes around it**: per-row int8 quantization of the activations (`quantize_int8_rows`), the scaling
  (`scale_and_bias`), and the fused layer's forward in two implementations: cpu_kernels' C++ passes
  (`fused_cpu_forward`, float32 on a CPU where they build; the RMS summed in their own order) and torch ops
  (`torch_ops_forward`, every other case); the backward's passes (`relu_backward`, `rms_norm_backward`) likewise.
- **Custom operators** (`int8_mm`, `ternary_mm_onednn`, `mm_bf16_inputs`): torch.compile calls the library
  kernels as they are (no graph break: each has a fake implementation giving inductor the shape).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import NamedTuple

import torch
from torch import nn

import cpu_kernels
from hardware import cpu_flags, cpu_has_native_bf16
from utils import UserError


# --- which integer product -----------------------------------------------------------------------------------------
INT8_DOT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # x86 int8 dot-product units (VNNI, AMX)
PRODUCTS = ("onednn", "int_mm", "float")  # BitNeRF's ternary product: see decide_integer_product
_INT_MM: dict[str, str] = {}  # device type -> the product BitNeRF's ternary layers use there
_INT_MM_WHY: dict[str, str] = {}  # device type -> why (decide_integer_product's text, timings included)


def integer_product(device: torch.device) -> str:
    """BitNeRF's ternary product on `device`, one of PRODUCTS: decided once per process and device type
    (decide_integer_product), then a dictionary look-up that torch.compile reads as a constant."""
    choice = _INT_MM.get(device.type)
    if choice is None:
        if torch.compiler.is_compiling():  # no probe inside a graph: the float product, same bits
            return "float"
        choice, _INT_MM_WHY[device.type] = decide_integer_product(device)
        _INT_MM[device.type] = choice
    return choice


def int_mm_available(device: torch.device) -> bool:
    """Whether BitNeRF's ternary product runs an int8 kernel on `device` (its ternary weights are then int8)."""
    return integer_product(device) != "float"


def decide_integer_product(device: torch.device) -> tuple[str, str]:
    """(product, why). Every product is exact and gives the same bits; this only chooses the fastest:
    "onednn" (oneDNN's int8 matmul primitive, whose AMX kernels ran the CPU's product 2-4x faster than
    torch._int_mm, which calls oneDNN's older int8 gemm), "int_mm" (torch._int_mm: int8 tensor cores on CUDA,
    VNNI on a CPU), or "float" (a float32 matmul of the integers: an AVX2-only CPU, Arm, MPS). On a CPU the
    kernels its int8 units allow are probed, then timed against the float product (fast_product), so a kernel
    that falls back to slow code (AMX the OS does not enable, a VM hiding it) is not used. NERF_INT_MM overrides
    the choice: onednn, on (torch._int_mm) or off (the float product, to compare or to rule the kernels out); a
    kernel that fails its probe is never used."""
    mode = os.environ.get("NERF_INT_MM", "auto")
    if mode not in ("auto", "onednn", "on", "off"):
        raise UserError(f"NERF_INT_MM={mode!r} is not auto, onednn, on or off")
    if mode == "off":
        return "float", f"{PRODUCT_NAMES['float']} (NERF_INT_MM=off)"
    if device.type == "cuda":
        wanted, why = ["int_mm"], "int8 tensor cores"
    elif device.type == "cpu":
        units = [flag for flag in INT8_DOT_FLAGS if flag in cpu_flags()]
        # oneDNN's primitive only with AMX: with VNNI alone (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI) it fell back to
        # a reference kernel for int8 x int8, seconds per product, where torch._int_mm's gemm took 0.6 ms
        wanted = (["onednn"] if "amx_int8" in units else []) + (["int_mm"] if units else [])
        why = f"int8 units: {', '.join(units)}" if units else "no VNNI/AMX int8 units"
    else:
        wanted, why = [], f"no int8 matmul kernel on {device.type}"
    if mode != "auto":
        wanted, why = ["int_mm" if mode == "on" else mode], f"NERF_INT_MM={mode}"
    passing = [product for product in wanted if probe_product(product, str(device))]
    why += "".join(f"; {PRODUCT_NAMES[p].split(',')[0]} failed its probe" for p in wanted if p not in passing)
    if not passing:
        return "float", f"{PRODUCT_NAMES['float']} ({why})"
    if device.type != "cpu" or mode != "auto":
        return passing[0], f"{PRODUCT_NAMES[passing[0]]} ({why})"
    product, timings = fast_product(passing + ["float"])
    return product, f"{PRODUCT_NAMES[product]} ({why}; {timings})"


PRODUCT_NAMES = {"onednn": "oneDNN int8 matmul, int8 -> exact float32", "int_mm": "torch._int_mm, int8 -> int32",
                 "float": "float32 matmul of the integers"}


def fast_product(products: list[str], m: int = 4096, k: int = 128) -> tuple[str, str]:
    """(the first of `products`, in order of preference, whose time is within 10x of the fastest's; the timings
    as text), each timed as the best of 5 runs of an [m, k] @ [k, k] product on the CPU (~1 ms). The wide margin
    keeps a busy machine (a single timing can be off 2-3x when another process holds the cores) from swapping two
    good kernels, while a kernel that fell back to slow code (AMX the OS does not enable, a VM hiding it: a
    reference kernel, ~1000x slower) loses. A run over 0.5 s ends that product's timing (no fast kernel takes it;
    a busy machine's pauses are shorter)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
    b = torch.randint(-1, 2, (k, k), generator=gen, dtype=torch.int8)
    packed = pack_for_onednn(b) if "onednn" in products else None
    runs = {"onednn": lambda: onednn_int8_mm(a, b, packed), "int_mm": lambda: torch._int_mm(a, b.t()),
            "float": lambda: a.float() @ b.float().t()}
    seconds = {}
    for product in products:
        seconds[product] = math.inf
        for _ in range(5):
            start = time.perf_counter()
            runs[product]()
            seconds[product] = min(seconds[product], time.perf_counter() - start)
            if seconds[product] > 0.5:
                break
    fastest = min(seconds.values())
    chosen = next(p for p in products if seconds[p] <= 10 * fastest)
    timed = ", ".join(f"{p} {t * 1e3:.3f} ms" for p, t in seconds.items())
    return chosen, f"timed on a {m}x{k}x{k} product: {timed}"


def onednn_int8_mm(a: torch.Tensor, ternary: torch.Tensor, packed: torch.Tensor | None = None) -> torch.Tensor:
    """a [M, K] int8 @ ternary [N, K] int8 .T -> float32 [M, N] holding the exact integer product, by oneDNN's int8
    matmul primitive (CPU). `packed`: ternary already in oneDNN's layout (pack_for_onednn); packed here if None."""
    n = ternary.shape[0]
    if packed is None:
        packed = pack_for_onednn(ternary)
    ones, zeros = torch.ones(n), torch.zeros(n, dtype=torch.long)  # per-column scale 1 and zero point 0
    return torch.ops.onednn.qlinear_pointwise(a, 1.0, 0, packed, ones, zeros, None, 1.0, 0, torch.float32,
                                              "none", [], "")


def pack_for_onednn(ternary: torch.Tensor) -> torch.Tensor:
    """ternary [N, K] int8 reordered into oneDNN's blocked weight layout (an opaque tensor onednn_int8_mm takes)."""
    return torch.ops.onednn.qlinear_prepack(ternary, None)


@functools.lru_cache(maxsize=None)
def probe_product(product: str, device: str) -> bool:
    """Run `product`'s kernel once on `device` on shapes BitNeRF uses (K and M not multiples of 8 for oneDNN,
    which takes them) and compare it with the exact float64 product; False (it is not used) when it raises or
    differs."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(32, 64, 32)] if product == "int_mm" else [(32, 64, 32), (37, 51, 24), (5, 264, 136)]
    for m, k, n in shapes:
        a = torch.randint(-128, 128, (m, k), generator=gen, dtype=torch.int8)
        b = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
        try:
            if product == "int_mm":
                got = torch._int_mm(a.to(device), b.t().to(device)).cpu()
            else:
                got = onednn_int8_mm(a, b) if device == "cpu" and torch.backends.mkldnn.is_available() else None
        except (RuntimeError, NotImplementedError, AttributeError):
            return False
        if got is None or not torch.equal(got.double(), a.double() @ b.double().t()):
            return False
    return True


def probe_int_mm(device: str) -> bool:
    """Whether torch._int_mm runs on `device` and is exact (probe_product)."""
    return probe_product("int_mm", device)


def decide_now(device: torch.device) -> None:
    """Make this process's choices for `device` now, eagerly, so that torch.compile reads them as constants: the
    integer product and, on a CPU, whether the C++ passes serve (built on first use)."""
    int_mm_available(device)
    if device.type == "cpu":
        cpu_kernels.enabled()


def integer_matmul_line(device: torch.device) -> str:
    """The run's line naming the product its BitNeRF layers use (the process's one decision, not a new one)."""
    product = integer_product(device)
    why = _INT_MM_WHY.get(device.type, "")
    return f"BitNeRF integer product: {why if why.startswith(PRODUCT_NAMES[product]) else PRODUCT_NAMES[product]}"


def kernels_line() -> str:
    """What the run's first lines say (compiled or not: under torch.compile the kernels are opaque operators)."""
    return f"BitNeRF activation passes on the CPU: {cpu_kernels.decide()[1]}"


# --- the products as operators torch.compile calls as they are ---------------------------------------------------
@torch.library.custom_op("nerf_experiments::int8_mm", mutates_args=())
def int8_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch._int_mm (a [M, K] int8 @ b [K, N] int8 -> int32) as one opaque operator: torch.compile calls the
    library kernel (cuBLASLt, oneDNN) instead of lowering the product itself, which on a CPU ran at about half
    the library's speed. No graph break: the fake implementation gives inductor the shape."""
    return torch._int_mm(a, b)


@int8_mm.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.int32)


@torch.library.custom_op("nerf_experiments::ternary_mm_onednn", mutates_args=())
def ternary_mm_onednn(a: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """a [M, K] int8 @ ternary [N, K] int8 .T -> float32 [M, N], the exact integer product, by oneDNN's int8
    matmul primitive (onednn_int8_mm) as one opaque operator, like int8_mm. The weight's packed layout is reused
    while the ternary weight is unchanged (_PACKED)."""
    return onednn_int8_mm(a, ternary, _PACKED.get(ternary))


@ternary_mm_onednn.register_fake
def _(a: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], ternary.shape[0]), dtype=torch.float32)


@torch.library.custom_op("nerf_experiments::mm_bf16_inputs", mutates_args=())
def mm_bf16_inputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N], float32 in and out, at bf16 precision: on a CPU with bf16 units (AMX, AVX-512 BF16)
    oneDNN's matmul allowed bf16 (several times the fp32 rate; it rounds the inputs, on some CPUs the result too,
    and keeps small shapes in float32); on CUDA a bf16 matmul with float32 output; elsewhere the float32 product
    of the inputs rounded to bf16 (float32 sums, no faster). One opaque operator, so that torch.compile calls it
    as it is (the CPU setting it needs is process state, which a compiled graph would not see)."""
    if a.device.type == "cpu" and cpu_has_native_bf16():
        matmul = torch.backends.mkldnn.matmul
        before = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
        try:
            return a @ b
        finally:
            matmul.fp32_precision = before
    if a.device.type == "cuda":
        return torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
    return a.bfloat16().float() @ b.bfloat16().float()


@mm_bf16_inputs.register_fake
def _(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], b.shape[1]))


class PackedCache:
    """The ternary weights recently multiplied, each with its copy in oneDNN's layout. Packing costs about
    half the product itself at width 128 and a training step multiplies every weight once per micro-batch (a
    .bitnerf, always the same): a look-up compares the weight's bytes (a few microseconds), so a changed weight
    is never served a stale layout, whatever updated it."""

    def __init__(self, size: int = 32):
        self.size, self.entries = size, []  # [(ternary copy, packed)], most recent first

    def get(self, ternary: torch.Tensor) -> torch.Tensor:
        for i, (key, packed) in enumerate(self.entries):
            if key.shape == ternary.shape and torch.equal(key, ternary):
                self.entries.insert(0, self.entries.pop(i))
                return packed
        packed = pack_for_onednn(ternary)
        self.entries = [(ternary.clone(), packed)] + self.entries[:self.size - 1]
        return packed


_PACKED = PackedCache()


# --- the exact product ---------------------------------------------------------------------------------------------
def ternary_matmul(x_q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """Exact integer product x_q [M, K] @ ternary.T -> [M, N], int32 or float32 holding the same integers.

    x_q holds integers in [-128, 127] (int8 or float); ternary [N, K] is int8 (where the device has an int8
    kernel, see integer_product, training's weights are; a packed model's always are) or float32 holding -1, 0,
    1. With an int8 ternary and an int8 kernel: oneDNN's int8 matmul (float32 out) or torch._int_mm (int32; the
    shapes it takes). Elsewhere a float32 matmul of the same integers: every partial sum is an integer of
    magnitude <= 128 K < 2^24, which float32 holds exactly, so every path gives the same bits (beyond that K, an
    int8 ternary goes through torch._int_mm).
    """
    if ternary.dtype == torch.int8:
        if int_mm_available(x_q.device):
            x_q = x_q.to(torch.int8)
            if integer_product(x_q.device) == "onednn":
                return ternary_mm_onednn(x_q, ternary)
            if x_q.shape[0] > 16 and x_q.shape[1] % 8 == 0 and ternary.shape[0] % 8 == 0:
                return int8_mm(x_q, ternary.t())
        elif 128 * x_q.shape[1] >= 2**24:  # beyond float32's exact integers
            return int8_mm(x_q.to(torch.int8), ternary.t())
    return x_q.float() @ ternary.t().float()


def scaled_ternary(ternary: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ternary [out, in] * scale ([] or [out]) in `dtype`: the dequantized weight [out, in]."""
    return ternary.to(dtype) * (scale.to(dtype).unsqueeze(1) if scale.dim() else scale.to(dtype))


# --- the passes around it, as torch ops ----------------------------------------------------------------------------
def quantize_int8_rows(y: torch.Tensor, in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's quantize_int8_rowwise(y, eps=1e-5) of rows y [M, K], with its roundings, in fewer passes (equal
    bits): (y_q [M, K] float32 holding the integers, row scale max|y| / 127 [M, 1] in y's dtype). max |y| per row
    as max(amax, -amin): equal, and no |y| temporary (torch.aminmax measured 5x slower than the two on a CPU).
    torchao's clip to [-128, 127] is kept only for a y below float32: in float32 |y| * 127 / max|y| rounds to at
    most 127 (three roundings are far from the 127.5 that would round up). `in_place`: y_q may take y's own
    buffer (float32 y the caller owns)."""
    row_scale = torch.maximum(y.amax(-1, keepdim=True), y.amin(-1, keepdim=True).neg_()) / 127  # [M, 1]
    inv = 1.0 / row_scale.float().clip(1e-5)
    y_q = y.mul_(inv) if in_place and y.dtype == torch.float32 else y.float() * inv
    y_q = y_q.round_()
    if y.dtype != torch.float32:
        y_q = y_q.clip_(-128, 127)
    return y_q, row_scale


def scale_and_bias(out: torch.Tensor, scale: torch.Tensor, row_scale: torch.Tensor, bias: torch.Tensor | None,
                   dtype: torch.dtype | None) -> torch.Tensor:
    """The integer product [M, N] (int32, or float32 holding the same integers) * row scale [M, 1] * weight scale
    + bias, with the roundings of torchao's CUDA kernel (scaled_int8_mm): the product in float32, times the row
    scale, times the weight scale, then one rounding to the autocast dtype `dtype` (if any), then the bias. Both
    kinds of product therefore give the same bits. (Multiplying the int32 tensor by a bf16 scale directly would
    round the accumulator to bf16's 8-bit mantissa first.) In place where the product is float32."""
    # int32 times a float32 row scale: converted and scaled in one pass (int32 -> float32 is exact below 2^24)
    out = out * row_scale.float() if out.dtype == torch.int32 else out.mul_(row_scale)
    out = out.mul_(scale)
    if dtype is not None:
        out = out.to(dtype)
    if bias is None:
        return out
    b = bias if dtype is None else bias.to(dtype)
    return out.add_(b) if out.dtype == torch.promote_types(out.dtype, b.dtype) else out + b


def scale_bias_cpu(out: torch.Tensor, row_scale: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   relu: bool) -> torch.Tensor:
    """scale_and_bias (then the ReLU) in cpu_kernels' fused pass; a per-channel scale [N] multiplies after it, in
    scale_and_bias's order (row scale, then weight scale, then bias), so both give the same bits."""
    if scale.dim() == 0:
        return cpu_kernels.scale_bias(out, row_scale, scale, bias, relu)
    out = cpu_kernels.scale_bias(out, row_scale, torch.ones((), dtype=torch.float32), None, False).mul_(scale)
    out = out if bias is None else out.add_(bias)
    return out.relu_() if relu else out


def _x_and_extra(parts: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor | None]:
    return parts[0], parts[1] if len(parts) > 1 else None


def _cat_times(parts: tuple[torch.Tensor, ...], factors: tuple[torch.Tensor, ...], eager: bool,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """cat([p.float() * f for p, f in zip(parts, factors)], -1) [M, sum K_i] without building the concatenation
    first: eager, each product goes straight into its columns of `out` (a fresh buffer when None). parts:
    [M, K_i]; factors: each broadcastable to its part ([M, K_i], [M, 1], ...)."""
    if len(parts) == 1:
        return torch.mul(parts[0].float(), factors[0], out=out) if out is not None else parts[0].float() * factors[0]
    if not eager:  # compiled: one fused kernel either way
        return torch.cat([p.float() * f for p, f in zip(parts, factors)], dim=-1)
    if out is None:
        out = torch.empty(parts[0].shape[0], sum(p.shape[1] for p in parts), device=parts[0].device)
    start = 0
    for p, f in zip(parts, factors):
        end = start + p.shape[1]
        torch.mul(p.float(), f, out=out[:, start:end])
        start = end
    return out


# --- the fused layer: RMSNorm (optional) + ternary Linear (+ ReLU), in two implementations --------------------------
class TernaryWeights(NamedTuple):
    """A quantized Linear's weights as its kernels take them."""

    ternary: torch.Tensor  # [N, K]: int8, or float32 holding -1, 0, 1 (see ternary_matmul)
    scale: torch.Tensor  # [] or [N] per channel
    bias: torch.Tensor | None  # [N]


class LayerOptions(NamedTuple):
    """How one call of the fused layer computes, besides its tensors (constants under torch.compile)."""

    eps: float = 0.0  # the RMSNorm's (unused without one)
    dtype: torch.dtype | None = None  # CUDA autocast's: the Linear's input, weight and bias are cast to it
    relu: bool = False  # relu(layer) in the same function
    int8_activations: bool = True  # BitNet's per-row int8 activations; False: float activations (bitnet_act=float)
    bf16_grads: bool = False  # the backward's two matmuls with bf16-rounded inputs and float32 sums (mm_bf16_inputs)


def fused_cpu_serves(parts: tuple[torch.Tensor, ...], norm_weight: torch.Tensor | None) -> bool:
    """Whether fused_cpu_forward runs this layer: float32 rows (and RMSNorm gain) on a CPU where the C++ passes
    build (cpu_kernels.active)."""
    return (cpu_kernels.active(parts[0]) and all(p.dtype == torch.float32 for p in parts)
            and (norm_weight is None or norm_weight.dtype == torch.float32))


def fused_cpu_forward(parts: tuple[torch.Tensor, ...], norm_weight: torch.Tensor | None, weights: TernaryWeights,
                      options: LayerOptions, want_deq: bool = False
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The int8 layer of the rows cat(parts) [M, K] (x [M, Kx] and a skip layer's extra part, never
    concatenated; RMSNorm'd with gain norm_weight [K] when given) in cpu_kernels' two C++ passes around the
    product (the RMS summed in their own order): (out [M, N], ReLU'd if options.relu; the dequantized
    activations q * row scale [M, K], the weight gradient's operand, or an empty tensor without `want_deq`; the
    RMSNorm's r [M, 1] or an empty tensor)."""
    y_q, row_scale, deq, r = cpu_kernels.quantize_rows(*_x_and_extra(parts), norm_weight, options.eps, want_deq)
    out = scale_bias_cpu(ternary_matmul(y_q, weights.ternary), row_scale, weights.scale, weights.bias, options.relu)
    return out, deq, r


def torch_ops_forward(parts: tuple[torch.Tensor, ...], norm_weight: torch.Tensor | None, weights: TernaryWeights,
                      options: LayerOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fused_cpu_forward's layer as torch ops, for every dtype and device, with either kind of activations:
    (out [M, N]; the weight gradient's operand [M, K]: the dequantized int8 activations, or with float
    activations the Linear's input itself; the RMSNorm's r [M, 1] or None).

    The RMSNorm is nn.RMSNorm's arithmetic (same bits) in one fresh [M, K] buffer holding x^2, then x * r, then
    y and the quantized y in turn; a skip layer's parts are written straight into their columns."""
    eager = not torch.compiler.is_compiling()
    if norm_weight is not None:
        # y = (x * r) * g, r = rsqrt(mean(x^2) + eps) [M, 1], in float32
        buffer = _cat_times(parts, parts, eager)
        r = torch.rsqrt(buffer.mean(-1, keepdim=True).add_(options.eps))
        y = _cat_times(parts, (r,) * len(parts), eager, out=buffer if eager else None)
        y = y.mul_(norm_weight) if eager else y * norm_weight
        y = y.to(functools.reduce(torch.promote_types, (p.dtype for p in parts)))
    else:
        r = None
        y = parts[0]
    if options.dtype is not None:  # CUDA autocast: torchao casts the Linear's input
        y = y.to(options.dtype)
    if not options.int8_activations:  # ternary weights times float activations
        out = float_linear(y, weights)
        return (out.relu_() if options.relu else out), y, r
    out, y_q, row_scale = int8_linear(y, weights, options.dtype, in_place=y is not parts[0])
    if options.relu:
        out = out.relu_()
    # torchao: int8 activations * row scale, in y_q's own buffer when it is float32
    deq = y_q.mul_(row_scale) if y_q.dtype == torch.float32 and eager else y_q.to(row_scale.dtype) * row_scale
    return out, deq, r


def int8_linear(y: torch.Tensor, weights: TernaryWeights, dtype: torch.dtype | None,
                in_place: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BitNet's int8 Linear of the rows y [M, K] as torch ops: (out [M, N], y_q, row scale; quantize_int8_rows's),
    out = the exact product of y's int8 rows with the ternary weight, scaled (scale_and_bias; rounded to the
    autocast `dtype` if any)."""
    y_q, row_scale = quantize_int8_rows(y, in_place)
    out = scale_and_bias(ternary_matmul(y_q, weights.ternary), weights.scale, row_scale, weights.bias, dtype)
    return out, y_q, row_scale


def float_linear(y: torch.Tensor, weights: TernaryWeights) -> torch.Tensor:
    """Ternary weights times float activations (bitnet_act=float): y @ (ternary * scale).T + bias in y's dtype."""
    bias = None if weights.bias is None else weights.bias.to(y.dtype)
    return nn.functional.linear(y, scaled_ternary(weights.ternary, weights.scale, y.dtype), bias)


# --- the backward's passes -----------------------------------------------------------------------------------------
def relu_backward(grad_h: torch.Tensor, h: torch.Tensor, want_bias_grad: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Through h = relu(z) [M, N]: (grad z, where h > 0 grad_h, else 0; its column sums [N], the bias's gradient,
    or None): in one C++ pass on a CPU where the bias wants its gradient, else torch's threshold_backward (and
    None)."""
    if want_bias_grad and cpu_kernels.active(grad_h) and h.dtype == torch.float32:
        return cpu_kernels.relu_backward(grad_h, h)
    return torch.ops.aten.threshold_backward(grad_h, h, 0), None


def rms_norm_backward(grad_y: torch.Tensor, parts: tuple[torch.Tensor, ...], r: torch.Tensor, g: torch.Tensor,
                      want_gain_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of y = xhat * g, xhat = x * r, r = rsqrt(mean(x^2) + eps) for grad_y [M, K], x = cat(parts)
    (only the first part needs its gradient): (grad of parts[0] [M, Kx] in float32, grad g [K] or None without
    `want_gain_grad`). With c = mean(grad_y * g * xhat): grad x = r * (grad_y * g - xhat * c) =
    (grad_y * g) * r - x * (r^2 c), grad g = sum over rows of grad_y * xhat. One C++ pass on a CPU where the
    passes build, else torch ops."""
    grad_y = grad_y.float()
    if cpu_kernels.active(grad_y) and g.dtype == torch.float32:
        grad_x, grad_g = cpu_kernels.rms_norm_backward(grad_y, *_x_and_extra(parts), r, g)
        return grad_x, grad_g if want_gain_grad else None
    eager, k = not torch.compiler.is_compiling(), parts[0].shape[1]
    columns = (grad_y,) if len(parts) == 1 else (grad_y[:, :k], grad_y[:, k:])
    product = _cat_times(parts, columns, eager)  # grad_y * xhat / r
    grad_g = (product.t() @ r.view(-1)).to(g.dtype) if want_gain_grad else None
    c = (product @ g).mul_(r.view(-1)).div_(product.shape[1]).unsqueeze(-1)  # [M, 1]
    grad_x = (grad_y if k == grad_y.shape[1] else grad_y[:, :k]) * g[:k]
    return grad_x.mul_(r).addcmul_(parts[0].float(), r.square().mul_(c), value=-1), grad_g
