"""BitNeRF inference with its exported ternary weights: the field a `.bitnerf` file loads into.

Each quantized Linear (the hidden layers; with the direction branch also its feature and direction layers)
becomes a `TernaryLinear`: int8 ternary weights {-1, 0, +1} [out, in] and a float32 scale (one, or one per
output channel), as the training forward quantizes the latent weights (bitnerf.ternary_weight), and int8 per-row
activations (unless the recipe keeps them in float) with an exact integer product, so that its forward equals the trained model's bit for bit in float32
(tests/test_export.py). Everything else (encoding, input and output layers, RMSNorms, biases) is the trained
BitNeRF's. How the weights are packed into bytes is the file's business (bitnerf_format.py).
"""

from __future__ import annotations

import torch
from torch import nn

from bitnerf import BITNET_B158, BitNeRF, Quantization, quantized_layer_names, ternary_weight
from ternary_kernels import (LayerOptions, TernaryWeights, float_linear, fused_cpu_forward, fused_cpu_serves,
                             int8_linear)


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
            return float_linear(x, TernaryWeights(self.ternary, self.scale, self.bias))
        scale, dtype = self.scale, None
        if torch.is_autocast_enabled("cuda"):  # torchao casts input, weight and bias to the autocast dtype
            dtype = torch.get_autocast_dtype("cuda")
            x, scale = x.to(dtype), scale.to(dtype)
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        weights = TernaryWeights(self.ternary, scale, self.bias)
        if dtype is None and fused_cpu_serves((x,), None):
            return fused_cpu_forward((x,), None, weights, LayerOptions())[0].view(*lead, -1)
        return int8_linear(x, weights, dtype)[0].view(*lead, -1)


class TernaryRMSNormLinear(nn.Sequential):
    """RMSNorm then TernaryLinear (the packed form of bitnerf.RMSNormLinear, same state dict keys): on a CPU the
    normalisation, quantization and scaling run as the training layer's fused passes
    (ternary_kernels.fused_cpu_forward), so the packed model computes what the trained one did, bit for bit."""

    takes_skip_input = True  # NeRF's skip layer calls it with (h, encoding), not their concatenation
    fuses_relu = True  # nerf.relu_of asks it for relu(layer(...)): the ReLU runs in the scaling pass

    def forward(self, x: torch.Tensor, extra: torch.Tensor | None = None, relu: bool = False) -> torch.Tensor:
        """x: [..., K] (and extra: [..., E]) -> [..., N]: the layer of cat([x, extra], -1), ReLU'd if `relu`."""
        norm, linear = self
        parts = (x,) if extra is None else (x, extra)
        if not (linear.int8_activations and fused_cpu_serves(parts, norm.weight)):
            out = linear(norm(x if extra is None else torch.cat([x, extra], dim=-1)))
            return torch.relu(out) if relu else out
        lead, x = x.shape[:-1], x.reshape(-1, x.shape[-1])
        parts = (x,) if extra is None else (x, extra.reshape(x.shape[0], -1))
        options = LayerOptions(norm.eps if norm.eps is not None else torch.finfo(x.dtype).eps, relu=relu)
        weights = TernaryWeights(linear.ternary, linear.scale, linear.bias)
        return fused_cpu_forward(parts, norm.weight, weights, options)[0].view(*lead, -1)


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

