"""The NeRF field: positional encoding and an MLP mapping 3-D points to (RGB, density) pre-activations.

A field is just a module `points [..., 3] -> raw [..., 4]`; the renderer (renderer.py) turns raw values into
colour and density, so NeRF and BitNeRF (bitnerf.py) are interchangeable. A field whose `viewdirs` attribute is
true (NeRF's optional direction branch) is called as `field(points, dirs)`, dirs [..., 3] the unit viewing
direction of each point; its density does not depend on dirs, its colour does.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def positional_encoding(x: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """[x, sin(2^0 x), cos(2^0 x), ..., sin(2^(L-1) x), cos(2^(L-1) x)].

    x: [..., D] -> [..., D * (1 + 2 L)]. The ordering matches the original (per frequency: sin block, cos block).
    """
    freqs = 2.0 ** torch.arange(n_freqs, device=x.device, dtype=x.dtype)  # [L]
    scaled = x[..., None, :] * freqs[:, None]  # [..., L, D]
    # not sin(a + pi/2) for cos: at 2^15 * x the float32 sum loses ~1e-2 of the phase
    trig = torch.stack([torch.sin(scaled), torch.cos(scaled)], dim=-2)  # [..., L, 2, D]
    return torch.cat([x, trig.flatten(-3)], dim=-1)


def encoded_dim(n_freqs: int, in_dim: int = 3) -> int:
    return in_dim * (1 + 2 * n_freqs)


LayerFactory = Callable[[int, int], nn.Module]


class NeRF(nn.Module):
    """Input Linear(E -> W), `depth` hidden Linear(W -> W) + ReLU with the encoding concatenated back before
    hidden layer `skip_layer`, output Linear(W -> 4).

    With `viewdirs` (the original NeRF's direction branch, Mildenhall et al. 2020) there is no `output` layer:
    `sigma` Linear(W -> 1) gives the density pre-activation from the last hidden layer, `feature` (W -> W, no
    activation) a feature vector, which is concatenated with the viewing direction encoded with `n_freqs_dirs`
    frequencies (3 + 6 L_dirs) and passed through `view` (W + 3 + 6 L_dirs -> W/2) + ReLU and `rgb`
    Linear(W/2 -> 3). Density thus depends on the position alone, colour on position and direction.

    `hidden_layer(in, out)` builds the hidden layers (and `feature`, `view`): nn.Linear here, RMSNorm + Linear in
    BitNeRF. `pad_input_to` pads the encodings with zeros to a multiple of it (CUDA int8 matmuls want K % 8 == 0);
    zero columns change nothing but the shape.
    """

    def __init__(self, n_freqs: int = 16, width: int = 256, depth: int = 8, skip_layer: int = 4,
                 hidden_layer: LayerFactory = nn.Linear, pad_input_to: int = 1, viewdirs: bool = False,
                 n_freqs_dirs: int = 4):
        super().__init__()
        self.n_freqs = n_freqs
        enc = encoded_dim(n_freqs)
        self.enc_pad = -enc % pad_input_to
        enc += self.enc_pad
        self.skip_layer = skip_layer
        self.input = nn.Linear(enc, width)
        self.hidden = nn.ModuleList(
            hidden_layer(width + (enc if i == skip_layer else 0), width) for i in range(depth)
        )
        self.viewdirs = viewdirs
        if not viewdirs:
            self.output = nn.Linear(width, 4)
            return
        self.n_freqs_dirs = n_freqs_dirs
        enc_dirs = encoded_dim(n_freqs_dirs)
        self.dirs_pad = -enc_dirs % pad_input_to
        self.sigma = nn.Linear(width, 1)
        self.feature = hidden_layer(width, width)
        self.view = hidden_layer(width + enc_dirs + self.dirs_pad, width // 2)
        self.rgb = nn.Linear(width // 2, 3)

    def encode(self, points: torch.Tensor) -> torch.Tensor:
        enc = positional_encoding(points, self.n_freqs)
        if self.enc_pad:
            enc = nn.functional.pad(enc, (0, self.enc_pad))
        return enc

    def encode_dirs(self, dirs: torch.Tensor) -> torch.Tensor:
        """dirs [..., 3] -> [..., 3 + 6 L_dirs (+ padding)], the direction branch's encoding."""
        enc = positional_encoding(dirs, self.n_freqs_dirs)
        if self.dirs_pad:
            enc = nn.functional.pad(enc, (0, self.dirs_pad))
        return enc

    def forward(self, points: torch.Tensor, dirs: torch.Tensor | None = None) -> torch.Tensor:
        """points: [..., 3], dirs: [..., 3] unit viewing directions (used by the direction branch only, which
        needs them; ignored without it) -> raw [..., 4] (RGB logits, density pre-activation)."""
        enc = self.encode(points)
        h = torch.relu(self.input(enc))
        for i, layer in enumerate(self.hidden):
            h = relu_of(layer, h, enc if i == self.skip_layer else None)
        if not self.viewdirs:
            return self.output(h)
        if dirs is None:
            raise ValueError("this field's colour depends on the viewing direction: call it as field(points, dirs)")
        sigma = self.sigma(h)
        h = relu_of(self.view, self.feature(h), self.encode_dirs(dirs))
        return torch.cat([self.rgb(h), sigma], dim=-1)


def relu_of(layer: nn.Module, h: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
    """relu(layer(h)), or relu of the layer of cat([h, extra], -1) (skip_linear). A layer that says `fuses_relu`
    (BitNeRF's quantized layers, trained or packed) applies the ReLU in its own last pass: one pass over the
    activations fewer."""
    if getattr(layer, "fuses_relu", False):
        return layer(h, extra, relu=True)
    return torch.relu(layer(h) if extra is None else skip_linear(layer, h, extra))


def skip_linear(layer: nn.Module, h: torch.Tensor, enc: torch.Tensor) -> torch.Tensor:
    """layer(cat([h, enc], -1)): a skip layer's input, or the direction branch's feature and encoded direction.
    For a plain Linear, without building the concatenation: one matmul per block of the weight's columns, and the
    encoding's block (it needs no gradient) skips its grad-input matmul: exp1's field, compiled, in 8192-point
    micro-batches, trains ~1.1x faster per point than with the concatenation.
    Other layers (BitNeRF's RMSNorm + Linear normalises the whole concatenation) get the concatenation, or
    (h, enc) where they say `takes_skip_input` (BitNeRF's fused layer, which needs no concatenation either)."""
    if getattr(layer, "takes_skip_input", False):
        return layer(h, enc)
    if type(layer) is not nn.Linear:
        return layer(torch.cat([h, enc], dim=-1))
    width = h.shape[-1]
    return nn.functional.linear(enc, layer.weight[:, width:], layer.bias) + h @ layer.weight[:, :width].t()


def density(raw_sigma: torch.Tensor) -> torch.Tensor:
    """Density from its pre-activation.

    The original used ReLU; with its seed every pre-activation is negative at init, so ReLU passes no gradient
    and training never starts. Softplus is positive and has a gradient everywhere, so learning starts for any
    seed (tests/test_train.py checks several seeds).
    """
    return nn.functional.softplus(raw_sigma)


def colour(raw_rgb: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(raw_rgb)
