"""BitNeRF: the NeRF field with an RMSNorm before every hidden Linear, trained with BitNet b1.58 QAT.

BitNet b1.58 (the arithmetic of torchao's `bitnet_training`): in the forward pass each quantized Linear uses
ternary weights {-1, 0, +1} times one absmean scale per tensor and int8 per-row activations; gradients pass
straight through to the float latent weights. Only the hidden layers (and, with the direction branch, its feature
and direction layers) are quantized; the input (99 -> 256) and output (256 -> 4; with the direction branch, its
density and RGB heads) layers stay in float, as BitNet keeps its embedding and head in full precision.

Training does not use torchao's weight tensor subclass: `quantize_bitnet` makes each hidden layer one
autograd.Function (RMSNorm + BitLinear, `rmsnorm_bitlinear`) on plain nn.Parameters. Against torchao's subclass +
nn.RMSNorm (the reference, tests/torchao_reference.py): the same forward bits in float32 eager with torch ops,
the same gradients to float tolerance (tests/test_models.py). How it runs (the integer product's kernel, and on
a CPU the passes around it as fused C++ kernels where they build: the RMS summed in their own order, so equal to
float32 rounding rather than bit for bit) is ternary_kernels.py's; its speed against NeRF's is measured by
`bench.py --ratio` (README, "BitNeRF's speed on a CPU"). Plain parameters also let AdamW be fused and DDP
all-reduce .grad as for NeRF; checkpoints hold the same state dict keys.

`BitNeRF(norm=False)` (config `bitnet_norm=false`) leaves the RMSNorm out: each hidden layer is a BitLinear that
quantizes its raw input. Packed inference with the exported ternary weights is bitnerf_packed.py's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nerf import NeRF
from ternary_kernels import (LayerOptions, TernaryWeights, decide_now, fused_cpu_forward, fused_cpu_serves,
                             int_mm_available, mm_bf16_inputs, relu_backward, rms_norm_backward, scaled_ternary,
                             torch_ops_forward)


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
        """(ternary weight [out, in] for the integer matmul: int8 where an int8 kernel runs
        (ternary_kernels.int_mm_available), else float32 holding -1, 0, 1;
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
    options = LayerOptions(norm_eps, dtype, relu, linear.quantization.int8_activations, linear.bf16_grads)
    args = (x, extra, norm_weight, linear.weight, linear.bias, ternary, scale, options)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _RMSNormBitLinear.apply(*args)
    return _RMSNormBitLinear.apply(*args)


class _RMSNormBitLinear(torch.autograd.Function):
    """RMSNorm (optional) + BitNet b1.58 Linear (+ the ReLU after it), forward and backward in few passes over the
    activations.

    On a CPU a pass over an activation-sized tensor costs a fair part of this layer's matmul (the tensors
    outgrow the cache). The forward is one of ternary_kernels' two implementations: cpu_kernels' fused C++ passes
    with float32 on a CPU (two forward, two backward, besides the matmuls), torch ops otherwise. Either way a skip
    layer's concatenation is never built (each part is written straight into its columns) and the backward
    recomputes what it needs from the saved input, kept alive anyway (the previous layer's output). Compiled, the
    last two matter most: with the concatenation built outside, inductor saves a bool ReLU mask for the skip
    layer, and storing that mask makes the layer's forward kernel ~10x slower than the others (bench.py --ratio).
    """

    @staticmethod
    def forward(ctx, x, extra, norm_weight, weight, bias, ternary, scale, options: LayerOptions):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        parts = (x,) if extra is None else (x, extra.reshape(x.shape[0], -1))
        weights = TernaryWeights(ternary, scale, bias)
        if options.int8_activations and fused_cpu_serves(parts, norm_weight):
            out, operand, r = fused_cpu_forward(parts, norm_weight, weights, options, want_deq=True)
        else:
            out, operand, r = torch_ops_forward(parts, norm_weight, weights, options)
        # operand: what the weight gradient multiplies (torchao: the int8 activations * row scale)
        ctx.has_norm, ctx.relu, ctx.bf16_grads = norm_weight is not None, options.relu, options.bf16_grads
        ctx.x_dtype, ctx.lead, ctx.weight_dtype = x.dtype, lead, weight.dtype
        ctx.save_for_backward(operand, ternary, scale, out if options.relu else None,
                              *((r, norm_weight, *parts) if ctx.has_norm else ()))
        return out.view(*lead, -1)

    @staticmethod
    def backward(ctx, grad_out):
        operand, ternary, scale, h, *norm_saved = ctx.saved_tensors
        needs_x, _, needs_norm, needs_weight, needs_bias, *_ = ctx.needs_input_grad
        grad_out = grad_out.reshape(-1, ternary.shape[0])
        grad_x = grad_norm = grad_weight = grad_bias = None
        if ctx.relu:  # through the ReLU: the gradient passes where the output is positive
            grad_out, grad_bias = relu_backward(grad_out, h, needs_bias)  # on a CPU with the bias's, in one pass
        if needs_bias and grad_bias is None:
            grad_bias = grad_out.sum(0)
        mm = mm_bf16_inputs if ctx.bf16_grads and grad_out.dtype == torch.float32 else torch.mm
        if needs_weight:  # torchao: grad_out^T @ (int8 activations * row scale)
            grad_weight = mm(grad_out.t(), operand.to(grad_out.dtype)).to(ctx.weight_dtype)
        if needs_x or needs_norm:
            # torchao: grad of the Linear's input = grad_out @ ternary * scale (straight through the rounding);
            # the scale folded into the small weight saves a pass over the activations
            grad_y = mm(grad_out, scaled_ternary(ternary, scale, grad_out.dtype))
            if ctx.has_norm:  # through the RMSNorm (x: the whole input; only x's part needs its gradient)
                r, g, *parts = norm_saved
                grad_x, grad_norm = rms_norm_backward(grad_y, parts, r, g, needs_norm)
            else:
                grad_x = grad_y
            grad_x = grad_x.to(ctx.x_dtype).view(*ctx.lead, -1)
        return grad_x, None, grad_norm, grad_weight, grad_bias, None, None, None


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
    decide_now(device)  # the kernels, chosen now, eagerly: constants under torch.compile
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


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of plain tensors (BitNet weight subclasses unwrapped), loadable with weights_only=True."""
    return {k: getattr(v, "_data", v).detach().clone() for k, v in model.state_dict().items()}
