"""BitNeRF: the NeRF field with an RMSNorm before every hidden Linear, trained with BitNet b1.58 QAT.

BitNet b1.58 (the arithmetic of torchao's `bitnet_training`): in the forward pass each quantized Linear uses
ternary weights {-1, 0, +1} times one absmean scale per tensor and int8 per-row activations; gradients pass
straight through to the float latent weights. Only the hidden layers (and, with the direction branch, its feature
and direction layers) are quantized; the input (99 -> 256) and output (256 -> 4; with the direction branch, its
density and RGB heads) layers stay in float, as BitNet keeps its embedding and head in full precision.

Training does not use torchao's weight tensor subclass: `quantize_bitnet` makes each hidden layer one
autograd.Function (RMSNorm + BitLinear, `rmsnorm_bitlinear`) on plain nn.Parameters. Against torchao's subclass +
nn.RMSNorm (the reference, tests/torchao_reference.py): the same forward bits in float32 eager with torch ops,
the same gradients to float tolerance (tests/test_models.py). On a CPU the passes around the integer product run
as fused C++ kernels where they build (cpu_kernels.py: the RMS summed in their own order, so equal to float32
rounding rather than bit for bit); their speed against NeRF's is measured by `bench.py --ratio`
(README, "BitNeRF's speed on a CPU"). Plain parameters also let AdamW be fused and DDP all-reduce .grad as for
NeRF; checkpoints hold the same state dict keys.

`BitNeRF(norm=False)` (config `bitnet_norm=false`) leaves the RMSNorm out: each hidden layer is a BitLinear that
quantizes its raw input. Packed inference with the exported ternary weights is bitnerf_packed.py's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

import cpu_kernels
from hardware import cpu_has_native_bf16, int_mm_available, integer_product, onednn_int8_mm, pack_for_onednn
from nerf import NeRF


class RMSNormLinear(nn.Sequential):
    """RMSNorm then Linear: BitNet normalises the activations it quantizes per row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.RMSNorm(in_features, eps=1e-6), nn.Linear(in_features, out_features))

    @property
    def linear(self) -> nn.Linear:
        return self[1]


@dataclass(frozen=True)
class Quantization:
    """How a BitNeRF layer quantizes (config keys bitnet_scale, bitnet_scale_per, bitnet_act); the defaults are
    BitNet b1.58's, as torchao's bitnet_training computes it.

    scale: the weight scale the latent weights are divided by before rounding to {-1, 0, +1}: "absmean" (mean |w|,
    BitNet b1.58) or "median" (median |w|: BitNet b1.58 Reloaded's choice for small networks; more weights stay
    non-zero). per_channel: one scale per output row [out] instead of one per tensor [] (a row of small weights
    is not rounded to zeros by its neighbours' scale). int8_activations: per-row absmax int8 activations and an
    exact integer product (BitNet); False keeps the activations in float and multiplies them by the dequantized
    ternary weights (ternary weights alone: what the weights cost, without the activations' rounding)."""

    scale: str = "absmean"
    per_channel: bool = False
    int8_activations: bool = True

    @classmethod
    def of(cls, cfg) -> "Quantization":
        return cls(cfg.bitnet_scale, cfg.bitnet_scale_per == "channel", cfg.bitnet_act == "int8")


BITNET_B158 = Quantization()


class BitLinear(nn.Linear):
    """A Linear trained with BitNet b1.58 QAT (`quantize_bitnet` turns a hidden Linear into one): the same
    forward and straight-through gradients as torchao's `bitnet_training`, on a plain float `weight` Parameter
    (DDP all-reduces its .grad, AdamW may be fused, checkpoints hold it as is).

    The ternary weight and its scale are recomputed at every call: a weight-sized pass, small next to the
    activations. They are not cached: the fused AdamW step updates a weight without advancing its version
    counter, so a cache keyed on that counter would serve stale weights (tests/test_models.py checks this).
    """

    # the precision of the backward's two matmuls: float32 (torchao's STE) or, with bf16_grads, bf16 inputs and
    # float32 sums (mm_bf16_inputs); set by quantize_bitnet, as are the two below
    bf16_grads = False
    quantization = BITNET_B158
    # False: the layer runs as the float layer it was (late quantization trains in float first, then switches);
    # a Python attribute, so torch.compile guards on it and recompiles once when it flips
    qat = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.qat:
            return super().forward(x)
        return rmsnorm_bitlinear(x, None, 0.0, self)

    def ternary(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(ternary weight [out, in] for the integer matmul: int8 where _int_mm runs (hardware.int_mm_available),
        else float32 holding -1, 0, 1;
        scale [] (or [out] per channel) in the weight's dtype, or `dtype` when the weight is cast to it as under
        CUDA autocast).

        As torchao: the scale is computed in float32 from the (cast) weight, then cast back to its dtype."""
        return _ternary(self.weight, dtype, self.quantization)


@torch.no_grad()
def _ternary(weight: torch.Tensor, dtype: torch.dtype | None,
             quantization: Quantization) -> tuple[torch.Tensor, torch.Tensor]:
    w = weight.detach()
    if dtype is not None:
        w = w.to(dtype)
    ternary, scale = _ternary_of(w, quantization)
    ternary = ternary.to(torch.int8) if int_mm_available(w.device) else ternary
    return ternary, scale.to(w.dtype)


def _ternary_of(w: torch.Tensor, quantization: Quantization = BITNET_B158,
                eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """BitNet b1.58's weight quantization, in torchao's arithmetic: (round(w / scale) clipped to [-1, 1], float32
    holding -1, 0, 1; scale in float32: mean |w| (torchao's get_bitnet_scale and quantize_bitnet_weight), or the
    median, per tensor [] or per output row [out])."""
    magnitude = w.float().abs()
    if quantization.per_channel:
        scale = magnitude.mean(1) if quantization.scale == "absmean" else magnitude.median(1).values
        divisor = scale.clip(eps).unsqueeze(1)
    else:
        scale = magnitude.mean() if quantization.scale == "absmean" else magnitude.median()
        divisor = scale.clip(eps)
    return (w.float() / divisor).round_().clip_(-1, 1), scale


@torch.no_grad()
def ternary_weight(weight: torch.Tensor, quantization: Quantization = BITNET_B158) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights the forward pass of a BitLinear with this latent `weight` uses: (int8 ternary [out, in], float32
    scale [] or [out]). What export packs, and the scale bitnerf_ddp's replica check compares."""
    ternary, scale = _ternary_of(weight.detach(), quantization)
    return ternary.to(torch.int8), scale


def scaled_ternary(ternary: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ternary [out, in] * scale ([] or [out]) in `dtype`: the dequantized weight [out, in]."""
    return ternary.to(dtype) * (scale.to(dtype).unsqueeze(1) if scale.dim() else scale.to(dtype))


def rmsnorm_bitlinear(x: torch.Tensor, norm_weight: torch.Tensor | None, norm_eps: float | None,
                      linear: nn.Linear, extra: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
    """linear(rms_norm(x)) with `linear` a BitNet b1.58 QAT Linear (torchao bitnet_training's arithmetic):
    per-row absmax int8 activations (eps 1e-5) times the ternary weight, an exact integer product, scaled by the
    weight's absmean and the row scales, plus the bias. Gradients are the straight-through ones torchao computes:
    grad input = grad out @ ternary * scale (then through the RMSNorm), grad weight = grad out^T @ dequantized
    int8 activations (with `linear.bf16_grads`, both products with bf16-rounded inputs and float32 sums). No
    RMSNorm when `norm_weight` is None.

    `extra` [..., E] (no gradient; with an RMSNorm only): the layer's input is cat([x, extra], -1), never built
    (a NeRF skip layer's encoding). Autocast: as torchao, under CUDA autocast input, weight and bias are cast to
    its dtype; the integer product itself never runs in a low precision (a bf16 product would round).
    `relu`: relu(layer) in the same function (on a CPU in the scaling pass; its gradient with the bias's)."""
    if extra is not None and norm_weight is None:
        x, extra = torch.cat([x, extra.to(x.dtype)], dim=-1), None
    dtype = torch.get_autocast_dtype("cuda") if x.is_cuda and torch.is_autocast_enabled("cuda") else None
    ternary, scale = linear.ternary(dtype)
    if norm_eps is None:
        norm_eps = torch.finfo(x.dtype).eps
    args = (x, extra, norm_weight, linear.weight, linear.bias, ternary, scale, norm_eps, dtype, relu,
            linear.bf16_grads, linear.quantization.int8_activations)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _RMSNormBitLinear.apply(*args)
    return _RMSNormBitLinear.apply(*args)


class _RMSNormBitLinear(torch.autograd.Function):
    """RMSNorm (optional) + BitNet b1.58 Linear (+ the ReLU after it), forward and backward in few passes over the
    activations.

    On a CPU a pass over an activation-sized tensor costs a fair part of this layer's matmul (the tensors
    outgrow the cache). With float32 on a CPU the passes are cpu_kernels' fused C++ ones (two forward, two
    backward, besides the matmuls). Otherwise torch ops: the forward fills one fresh [M, K] buffer with x^2, then
    x * r, y and y_q in turn. Either way a skip layer's concatenation is never built (each part is written
    straight into its columns) and the backward recomputes what it needs from the saved input, kept alive anyway
    (the previous layer's output). Compiled, the last two matter most: with the concatenation built outside, inductor
    saves a bool ReLU mask for the skip layer, and storing that mask makes the layer's forward kernel ~10x slower than
    the others (bench.py --ratio).
    """

    @staticmethod
    def forward(ctx, x, extra, norm_weight, weight, bias, ternary, scale, eps, dtype, relu, bf16_grads, int8_act):
        lead, k = x.shape[:-1], x.shape[-1]
        x = x.reshape(-1, k)
        parts = (x,) if extra is None else (x, extra.reshape(x.shape[0], -1))
        eager = not torch.compiler.is_compiling()
        if (int8_act and dtype is None and cpu_kernels.active(x) and all(p.dtype == torch.float32 for p in parts)
                and (norm_weight is None or norm_weight.dtype == torch.float32)):
            # the same arithmetic in two C++ passes (cpu_kernels.py; the RMS summed in its own order)
            y_q, row_scale, deq, r = cpu_kernels.quantize_rows(*_x_and_extra(parts), norm_weight, eps, want_deq=True)
            out = integer_mm(y_q if ternary.dtype == torch.int8 else y_q.float(), ternary)
            out = scale_bias_cpu(out, row_scale, scale, bias, relu)
            ctx.save_for_backward(deq, ternary, scale, out if relu else None,
                                  *((r, norm_weight, *parts) if norm_weight is not None else ()))
            ctx.x_dtype, ctx.lead, ctx.weight_dtype, ctx.bf16_grads = x.dtype, lead, weight.dtype, bf16_grads
            return out.view(*lead, -1)
        if norm_weight is not None:
            # nn.RMSNorm's arithmetic (same bits): y = (x * r) * g, r = rsqrt(mean(x^2) + eps) [M, 1], in float32,
            # one [M, K] buffer holding x^2, then x * r, then y and y_q in turn
            buffer = _cat_times(parts, parts, eager)
            r = torch.rsqrt(buffer.mean(-1, keepdim=True).add_(eps))
            y = _cat_times(parts, (r,) * len(parts), eager, out=buffer if eager else None)
            y = y.mul_(norm_weight) if eager else y * norm_weight
            y = y.to(functools.reduce(torch.promote_types, (p.dtype for p in parts)))
        else:
            r = None
            y = x
        if dtype is not None:  # CUDA autocast: torchao casts the Linear's input
            y = y.to(dtype)
        if not int8_act:  # ternary weights times float activations; the weight gradient's operand is y itself
            out = nn.functional.linear(y, scaled_ternary(ternary, scale, y.dtype), None if bias is None else
                                       bias.to(y.dtype))
            out = out.relu_() if relu else out
            ctx.save_for_backward(y, ternary, scale, out if relu else None,
                                  *((r, norm_weight, *parts) if norm_weight is not None else ()))
            ctx.x_dtype, ctx.lead, ctx.weight_dtype, ctx.bf16_grads = x.dtype, lead, weight.dtype, bf16_grads
            return out.view(*lead, -1)
        # torchao's quantize_int8_rowwise(y, eps=1e-5), with its roundings; its clip to [-128, 127] only matters
        # for a scale below float32's (|y| * 127 / max|y| rounds to at most 127 in float32). max |y| per row as
        # max(amax, -amin): equal, and no |y| temporary
        row_scale = torch.maximum(y.amax(-1, keepdim=True), y.amin(-1, keepdim=True).neg_()) / 127  # [M, 1]
        inv = 1.0 / row_scale.float().clip(1e-5)
        y_q = y.mul_(inv) if y is not x and y.dtype == torch.float32 else y.float() * inv
        y_q = y_q.round_()
        if y.dtype != torch.float32:
            y_q = y_q.clip_(-128, 127)
        # exact: int32 from int8 operands, or float32 holding the same integers
        out = integer_mm(y_q.to(torch.int8) if ternary.dtype == torch.int8 else y_q, ternary)
        out = scale_and_bias(out, scale, row_scale, bias, dtype)
        if relu:
            out = out.relu_()
        # the weight gradient's operand: the dequantized activations (torchao: int8 activations * row scale),
        # in y_q's own buffer when it is float32
        deq = y_q.mul_(row_scale) if y_q.dtype == torch.float32 and eager \
            else y_q.to(row_scale.dtype) * row_scale
        ctx.save_for_backward(deq, ternary, scale, out if relu else None,
                              *((r, norm_weight, *parts) if norm_weight is not None else ()))
        ctx.x_dtype, ctx.lead = x.dtype, lead
        ctx.weight_dtype, ctx.bf16_grads = weight.dtype, bf16_grads
        return out.view(*lead, -1)

    @staticmethod
    def backward(ctx, grad_out):
        deq, ternary, scale, h = ctx.saved_tensors[:4]
        grad_out = grad_out.reshape(-1, ternary.shape[0])
        needs = ctx.needs_input_grad
        grad_x = grad_norm = grad_weight = grad_bias = None
        if h is not None:  # through the ReLU: the gradient passes where the output is positive
            if needs[4] and cpu_kernels.active(grad_out) and h.dtype == torch.float32:
                grad_out, grad_bias = cpu_kernels.relu_backward(grad_out, h)  # and the bias's, in one pass
            else:
                grad_out = torch.ops.aten.threshold_backward(grad_out, h, 0)
        if needs[4] and grad_bias is None:
            grad_bias = grad_out.sum(0)
        mm = mm_bf16_inputs if ctx.bf16_grads and grad_out.dtype == torch.float32 else torch.mm
        if needs[3]:  # torchao: grad_out^T @ (int8 activations * row scale)
            grad_weight = mm(grad_out.t(), deq.to(grad_out.dtype)).to(ctx.weight_dtype)
        if needs[0] or needs[2]:
            # torchao: grad of the Linear's input = grad_out @ ternary * scale (straight through the rounding);
            # the scale folded into the small weight saves a pass over the activations
            grad_y = mm(grad_out, scaled_ternary(ternary, scale, grad_out.dtype))
            if len(ctx.saved_tensors) == 4:  # no RMSNorm
                grad_x = grad_y.to(ctx.x_dtype)
            else:  # through y = xhat * g, xhat = x * r, r = rsqrt(mean(x^2) + eps), with c = mean(grad_y * g * xhat):
                # grad x = r * (grad_y * g - xhat * c) = (grad_y * g) * r - x * (r^2 c), grad g = sum over rows
                # of grad_y * xhat (x: the whole input, the extra part included; only x's part needs its grad)
                r, g, *parts = ctx.saved_tensors[4:]
                grad_y = grad_y.float()
                eager, k = not torch.compiler.is_compiling(), parts[0].shape[1]
                if cpu_kernels.active(grad_y) and g.dtype == torch.float32:  # one C++ pass
                    grad_x, grad_norm = cpu_kernels.rms_norm_backward(grad_y, *_x_and_extra(parts), r, g)
                    return (grad_x.to(ctx.x_dtype).view(*ctx.lead, -1), None, grad_norm if needs[2] else None,
                            grad_weight, grad_bias, None, None, None, None, None, None, None)
                columns = (grad_y,) if len(parts) == 1 else (grad_y[:, :k], grad_y[:, k:])
                product = _cat_times(parts, columns, eager)  # grad_y * xhat / r
                if needs[2]:
                    grad_norm = (product.t() @ r.view(-1)).to(g.dtype)
                c = (product @ g).mul_(r.view(-1)).div_(product.shape[1]).unsqueeze(-1)  # [M, 1]
                grad_x = (grad_y if k == grad_y.shape[1] else grad_y[:, :k]) * g[:k]
                grad_x = grad_x.mul_(r).addcmul_(parts[0].float(), r.square().mul_(c), value=-1).to(ctx.x_dtype)
            grad_x = grad_x.view(*ctx.lead, -1)
        return grad_x, None, grad_norm, grad_weight, grad_bias, None, None, None, None, None, None, None


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
    matmul primitive (hardware.onednn_int8_mm) as one opaque operator, like int8_mm. The weight's packed layout
    is reused while the ternary weight is unchanged (_PACKED)."""
    return onednn_int8_mm(a, ternary, _PACKED.get(ternary))


@ternary_mm_onednn.register_fake
def _(a: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    return a.new_empty((a.shape[0], ternary.shape[0]), dtype=torch.float32)


@torch.library.custom_op("nerf_experiments::mm_bf16_inputs", mutates_args=())
def mm_bf16_inputs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [M, K] @ b [K, N], float32 in and out, at bf16 precision: on a CPU with bf16 units (AMX, AVX-512 BF16)
    oneDNN's matmul allowed bf16 (several times the fp32 rate; it rounds the inputs, on some CPUs the result too,
    and keeps small shapes in float32); on CUDA a bf16 matmul with float32 output; elsewhere the float32 product
    of the inputs rounded to bf16 (float32 sums, no faster). One opaque operator, so that torch.compile calls it as it is (the CPU setting it needs is process
    state, which a compiled graph would not see)."""
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


def integer_mm(x_q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """x_q [M, K] @ ternary.T, both holding integers, exactly: with an int8 ternary (where the device has an int8
    kernel, see hardware.integer_product) oneDNN's int8 matmul (float32 out) or torch._int_mm (int32; shapes it
    takes), else a float32 matmul, which is exact: every partial sum is an integer of magnitude <= 128 K < 2^24
    (bitnerf_packed.ternary_matmul)."""
    if ternary.dtype == torch.int8:
        if integer_product(x_q.device) == "onednn":
            return ternary_mm_onednn(x_q, ternary)
        if x_q.shape[0] > 16 and x_q.shape[1] % 8 == 0 and ternary.shape[0] % 8 == 0:
            return int8_mm(x_q, ternary.t())
        x_q, ternary = x_q.float(), ternary.float()
    return x_q @ ternary.t()


class BitRMSNormLinear(nn.Sequential):
    """RMSNormLinear after `quantize_bitnet`: RMSNorm and BitLinear in one autograd.Function (fewer passes)."""

    takes_skip_input = True  # NeRF's skip layer calls it with (h, encoding), not their concatenation
    fuses_relu = True  # nerf.relu_of asks it for relu(layer(...)): one function, fewer passes

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """x: [..., K] (and extra: [..., E], no gradient) -> [..., N]: the layer of cat([x, extra], -1), ReLU'd
        if `relu`."""
        norm, linear = self
        if not linear.qat:  # the float layer it was: RMSNormLinear's forward of cat([x, extra], -1)
            out = linear(norm(x if extra is None else torch.cat([x, extra.to(x.dtype)], dim=-1)))
            return torch.relu(out) if relu else out
        return rmsnorm_bitlinear(x, norm.weight, norm.eps, linear, extra, relu)

    @property
    def linear(self) -> nn.Linear:
        return self[1]


class BitNeRF(NeRF):
    """NeRF whose hidden layers are RMSNorm + Linear (`norm`, BitNet b1.58's layer), or a plain Linear that
    quantizes its raw input (norm=False); `quantize_bitnet` makes them BitNet b1.58 QAT layers. With `viewdirs`
    the direction branch's `feature` and `view` layers are built and quantized the same way; its `sigma` and `rgb`
    heads stay float, as the output layer does."""

    def __init__(self, n_freqs: int = 16, width: int = 256, depth: int = 8, skip_layer: int = 4, norm: bool = True,
                 viewdirs: bool = False, n_freqs_dirs: int = 4):
        # pad the encodings to a multiple of 8 so the skip layer's K (width + encoding), and the direction layer's,
        # suit CUDA int8 matmul
        super().__init__(n_freqs, width, depth, skip_layer, hidden_layer=RMSNormLinear if norm else nn.Linear,
                         pad_input_to=8, viewdirs=viewdirs, n_freqs_dirs=n_freqs_dirs)
        self.norm = norm

    def quantized_layers(self) -> list[nn.Module]:
        """The layers `quantize_bitnet` quantizes, in the order of quantized_layer_names."""
        return [self.get_submodule(name) for name in quantized_layer_names(len(self.hidden), self.viewdirs)]

    def quantized_linears(self) -> list[nn.Linear]:
        return [layer.linear if self.norm else layer for layer in self.quantized_layers()]


def quantized_layer_names(depth: int, viewdirs: bool = False) -> list[str]:
    """Module names of a BitNeRF's quantized layers (RMSNorm + Linear, or a Linear without the norm): the hidden
    layers, then, with the direction branch, its feature and direction layers."""
    return [f"hidden.{i}" for i in range(depth)] + (["feature", "view"] if viewdirs else [])


def quantize_bitnet(model: BitNeRF, bf16_grads: bool = False, quantization: Quantization = BITNET_B158,
                    qat: bool = True) -> BitNeRF:
    """Make the hidden layers (and the direction branch's feature and direction layers) BitNet b1.58 QAT layers
    (RMSNorm + BitLinear, or a BitLinear alone without the norm; torchao bitnet_training's math in one
    autograd.Function), in place. Returns the model. The parameters stay the same plain nn.Parameters (state dict
    unchanged). Apply after loading float weights and before torch.compile / DDP.

    `bf16_grads` (config bitnet_grad=bf16): the backward's two matmuls take bf16-rounded inputs and keep float32
    sums, as BitNet's own bf16 mixed-precision training computes them; the forward is unchanged.
    `quantization`: how the weights (and activations) are quantized (config bitnet_scale, bitnet_scale_per,
    bitnet_act). `qat=False`: the layers run as float layers until `set_qat(model, True)` (late quantization).
    """
    device = next(model.parameters()).device
    int_mm_available(device)  # decided now, eagerly: a constant under torch.compile
    if device.type == "cpu":
        cpu_kernels.enabled()  # likewise (builds the C++ passes on first use)
    for layer in model.quantized_layers():
        if type(layer) is RMSNormLinear:
            layer.__class__ = BitRMSNormLinear
    for linear in model.quantized_linears():
        if type(linear) is nn.Linear:
            linear.__class__ = BitLinear
        linear.bf16_grads, linear.quantization, linear.qat = bf16_grads, quantization, qat
    return model


def set_qat(model: nn.Module, on: bool) -> None:
    """Turn quantization-aware training on (or off) in every BitLinear of `model`: off, each runs as the float
    layer it was; on, as BitNet b1.58's. The parameters and the optimizer's state stay as they are."""
    for module in model.modules():
        if isinstance(module, BitLinear):
            module.qat = on


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` has BitNet QAT layers (quantize_bitnet's, or torchao's weight subclass)."""
    if any(isinstance(m, BitLinear) for m in model.modules()):
        return True
    return any(type(p).__name__ == "BitNetTrainingLinearWeight" for p in model.parameters())


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of plain tensors (BitNet weight subclasses unwrapped), loadable with weights_only=True."""
    return {k: getattr(v, "_data", v).detach().clone() for k, v in model.state_dict().items()}
