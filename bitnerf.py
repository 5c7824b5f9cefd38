"""BitNeRF: the NeRF field with an RMSNorm before every hidden Linear, trained with BitNet b1.58 QAT (torchao).

BitNet b1.58 (torchao's `bitnet_training`): in the forward pass each quantized Linear uses ternary weights
{-1, 0, +1} times one absmean scale per tensor and int8 per-row activations; gradients pass straight through to
the float latent weights. Only the hidden layers are quantized; the input (99 -> 256) and output (256 -> 4)
layers stay in float, as BitNet keeps its embedding and head in full precision.
"""

from __future__ import annotations

import torch
from torch import nn

from nerf import NeRF


class RMSNormLinear(nn.Sequential):
    """RMSNorm then Linear: BitNet normalises the activations it quantizes per row."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(nn.RMSNorm(in_features, eps=1e-6), nn.Linear(in_features, out_features))

    @property
    def linear(self) -> nn.Linear:
        return self[1]


class BitNeRF(NeRF):
    def __init__(self, n_freqs: int = 16, width: int = 256, depth: int = 8, skip_layer: int = 4):
        # pad the encoding to a multiple of 8 so the skip layer's K (width + encoding) suits CUDA int8 matmul
        super().__init__(n_freqs, width, depth, skip_layer, hidden_layer=RMSNormLinear, pad_input_to=8)

    def quantized_linears(self) -> list[nn.Linear]:
        return [layer.linear for layer in self.hidden]


def quantize_bitnet(model: BitNeRF) -> BitNeRF:
    """Swap the hidden Linear weights for torchao's BitNet training weights, in place. Returns the model.

    Apply after loading float weights and before torch.compile / DDP.
    """
    from torchao import quantize_
    from torchao.prototype.quantized_training import bitnet_training

    targets = set(map(id, model.quantized_linears()))
    quantize_(model, bitnet_training(), filter_fn=lambda module, fqn: id(module) in targets)
    return model


def is_quantized(model: nn.Module) -> bool:
    from torchao.prototype.quantized_training.bitnet import BitNetTrainingLinearWeight

    return any(isinstance(p, BitNetTrainingLinearWeight) for p in model.parameters())


def ternary_weight(weight: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights the forward pass uses: (int8 ternary [out, in], fp32 absmean scale []).

    Same arithmetic as torchao's bitnet forward (scale = mean |W|; round(W / scale) clipped to [-1, 1]).
    """
    from torchao.prototype.quantized_training.bitnet import get_bitnet_scale, quantize_bitnet_weight

    data = getattr(weight, "_data", weight).detach()
    scale = get_bitnet_scale(data)
    return quantize_bitnet_weight(data, scale, eps), scale


def plain_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict of plain tensors (BitNet weight subclasses unwrapped), loadable with weights_only=True."""
    return {k: getattr(v, "_data", v).detach().clone() for k, v in model.state_dict().items()}
