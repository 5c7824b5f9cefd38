"""BitNeRF inference with its exported ternary weights: the field a `.bitnerf` file loads into.

Each quantized Linear (the hidden layers; with the direction branch also its feature and direction layers)
becomes a `TernaryLinear`: int8 ternary weights {-1, 0, +1} [out, in] and one float32 absmean scale, as the
training forward quantizes the latent weights (bitnerf.ternary_weight), and int8 per-row activations with an
exact integer product, so that its forward equals the trained model's bit for bit in float32
(tests/test_export.py). Everything else (encoding, input and output layers, RMSNorms, biases) is the trained
BitNeRF's. How the weights are packed into bytes is the file's business (bitnerf_format.py).
"""

from __future__ import annotations

import torch
from torch import nn

import cpu_kernels
from bitnerf import (BITNET_B158, BitNeRF, Quantization, integer_mm, int8_mm, quantized_layer_names, scale_and_bias,
                     scale_bias_cpu, scaled_ternary, ternary_weight)
from hardware import int_mm_available


def ternary_matmul(x_q: torch.Tensor, ternary: torch.Tensor) -> torch.Tensor:
    """Exact integer product x_q [M, K] @ ternary.T (ternary: int8 [N, K]) -> [M, N], int32 or float32.

    x_q holds integers in [-128, 127] (any dtype). The device's int8 kernel where it has one
    (hardware.integer_product: oneDNN's, or torch._int_mm where its shape rules hold). Elsewhere a float32 matmul
    of the same integers: every partial sum is an integer of magnitude <= 128 K < 2^24, which float32 holds
    exactly, so every path gives the same bits.
    """
    if int_mm_available(x_q.device):
        return integer_mm(x_q.to(torch.int8), ternary)
    if 128 * x_q.shape[1] >= 2**24:  # beyond float32's exact integers
        return int8_mm(x_q.to(torch.int8), ternary.T)
    return x_q.float() @ ternary.T.float()


class TernaryLinear(nn.Module):
    """A Linear whose weight is ternary [out, in] (int8) times an fp32 scale ([], or [out] per channel), plus a
    float bias; it computes what the training layer of the same Quantization does.

    int8 activations (BitNet's forward, torchao bitnet's arithmetic): per-row absmax int8 activations, integer
    matmul with the ternary weights, then * row scale * scale + bias. Float activations (bitnet_act=float): a
    float matmul with ternary * scale, as training's forward of that recipe.
    """

    def __init__(self, in_features: int, out_features: int, quantization: Quantization = BITNET_B158):
        super().__init__()
        self.int8_activations = quantization.int8_activations
        self.register_buffer("ternary", torch.zeros(out_features, in_features, dtype=torch.int8))
        scale_shape = (out_features,) if quantization.per_channel else ()
        self.register_buffer("scale", torch.ones(scale_shape, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., in] -> [..., out]."""
        if not self.int8_activations:
            return nn.functional.linear(x, scaled_ternary(self.ternary, self.scale, x.dtype), self.bias.to(x.dtype))
        return self._int8_forward(x)

    def _int8_forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, dtype = self.scale, None
        if torch.is_autocast_enabled("cuda"):  # torchao casts input, weight and bias to the autocast dtype
            dtype = torch.get_autocast_dtype("cuda")
            x, scale = x.to(dtype), scale.to(dtype)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if dtype is None and cpu_kernels.active(x):
            return _fused_cpu_forward(x, None, None, 0.0, self).view(*lead, -1)
        # torchao's quantize_int8_rowwise(eps=1e-5) in fewer passes with the same roundings (equal bits): max |x|
        # per row as max(amax, -amin) (torch.aminmax measured 5x slower than the two on a CPU); its clip to
        # [-128, 127] is left out because |x| * 127 / max|x| rounds to at most 127 (three float32 roundings are far
        # from the 127.5 that would round up)
        row_scale = torch.maximum(x.amax(dim=1), -x.amin(dim=1)) / 127  # [M], x's dtype
        x_q = (x.float() * (1.0 / row_scale.float().clip(1e-5)).view(-1, 1)).round_()
        out = ternary_matmul(x_q, self.ternary)
        return scale_and_bias(out, scale, row_scale.view(-1, 1), self.bias, dtype).view(*lead, -1)


class TernaryRMSNormLinear(nn.Sequential):
    """RMSNorm then TernaryLinear (the packed form of bitnerf.RMSNormLinear, same state dict keys): on a CPU the
    normalisation, quantization and scaling run as the training layer's fused passes (cpu_kernels.py), so the
    packed model computes what the trained one did, bit for bit."""

    takes_skip_input = True  # NeRF's skip layer calls it with (h, encoding), not their concatenation
    fuses_relu = True  # nerf.relu_of asks it for relu(layer(...)): the ReLU runs in the scaling pass

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """x: [..., K] (and extra: [..., E]) -> [..., N]: the layer of cat([x, extra], -1), ReLU'd if `relu`."""
        norm, linear = self
        fused = (linear.int8_activations and cpu_kernels.active(x) and norm.weight.dtype == torch.float32
                 and (extra is None or extra.dtype == torch.float32))
        if not fused:
            out = linear(norm(x if extra is None else torch.cat([x, extra], dim=-1)))
            return torch.relu(out) if relu else out
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        extra = None if extra is None else extra.reshape(x.shape[0], -1)
        eps = norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps
        return _fused_cpu_forward(x, extra, norm.weight, eps, linear, relu).view(*lead, -1)


def _fused_cpu_forward(x: torch.Tensor, extra: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                       linear: TernaryLinear, relu: bool = False) -> torch.Tensor:
    """TernaryLinear's int8 forward of cat([x, extra], -1) [M, K] (RMSNorm'd with gain norm_weight [K] when
    given) in the fused C++ passes, as training's forward computes it (then the ReLU if `relu`) -> [M, N]."""
    x_q, row_scale, _, _ = cpu_kernels.quantize_rows(x, extra, norm_weight, eps, want_deq=False)
    return scale_bias_cpu(ternary_matmul(x_q, linear.ternary), row_scale, linear.scale, linear.bias, relu)


def ternary_field(n_freqs: int, width: int, depth: int, skip_layer: int, norm: bool = True, viewdirs: bool = False,
                  n_freqs_dirs: int = 4, quantization: Quantization = BITNET_B158) -> BitNeRF:
    """An empty inference BitNeRF: every quantized Linear (the hidden layers and, with `viewdirs`, the direction
    branch's feature and direction layers) replaced by a TernaryLinear (fill it with
    `load_state_dict(ternary_state_dict(...))`). Same forward, encodings, skip and (with `norm`) RMSNorms as the
    trained model."""
    field = BitNeRF(n_freqs, width, depth, skip_layer, norm, viewdirs, n_freqs_dirs)
    for name, linear in zip(quantized_layer_names(depth, viewdirs), field.quantized_linears()):
        ternary = TernaryLinear(linear.in_features, linear.out_features, quantization)
        if norm:
            layer = field.get_submodule(name)
            layer[1] = ternary
            layer.__class__ = TernaryRMSNormLinear
        else:
            parent, _, child = name.rpartition(".")
            setattr(field.get_submodule(parent), child, ternary)
    return field.requires_grad_(False)


def ternary_state_dict(float_state: dict[str, torch.Tensor], depth: int, norm: bool = True,
                       viewdirs: bool = False, quantization: Quantization = BITNET_B158) -> dict[str, torch.Tensor]:
    """A trained BitNeRF's plain float state dict -> the state dict of `ternary_field` (with the same `norm`,
    `viewdirs` and `quantization`): each quantized Linear's latent weight becomes (ternary int8, fp32 scale)
    exactly as training's forward quantizes it."""
    state = dict(float_state)
    for name in quantized_layer_names(depth, viewdirs):
        prefix = f"{name}.1." if norm else f"{name}."
        ternary, scale = ternary_weight(state.pop(prefix + "weight").float(), quantization)
        state[prefix + "ternary"], state[prefix + "scale"] = ternary, scale
    return state

