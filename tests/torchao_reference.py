"""The reference BitNeRF's layers are checked against: torchao's own BitNet b1.58 training (`bitnet_training`, a
weight tensor subclass on each hidden Linear, with nn.RMSNorm before it).

Off CUDA torchao's int8 matmul is routed through an exact float32 product scaled as its CUDA kernel scales, so
that the reference computes on a CPU what torchao computes on a GPU. Used by the tests (tests/test_models.py,
tests/test_export.py) and by `python bench.py --ratio --bitnerf-impl torchao`.
"""

from __future__ import annotations

import logging

from torch import nn

from ternary_kernels import ternary_matmul


def quiet_torchao_import() -> None:
    """torchao logs "Failed to load ..." for its CUDA-only kernels on CPU machines (harmless), and torch warns
    about one of its enums; keep them off stderr so that one-line errors stay one line."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)


def use_exact_float_int8_mm_off_cuda() -> None:
    """Route torchao's BitNet int8 matmul through `ternary_matmul` off CUDA, with the scaling arithmetic of its
    CUDA kernel (its CPU fallback scales in another order, which changes the last bit). CUDA keeps torchao's own
    kernel. Idempotent.
    """
    quiet_torchao_import()
    import torchao.prototype.quantized_training.bitnet as torchao_bitnet

    original = torchao_bitnet.scaled_int8_mm
    if getattr(original, "exact_off_cuda", False):
        return

    def scaled_int8_mm(a, b, row_scale, col_scale):
        if a.is_cuda:
            return original(a, b, row_scale, col_scale)
        # the arithmetic of torchao's CUDA kernel: float32 product * row scale * column scale, one rounding
        product = ternary_matmul(a, b.T).float()
        return (product * row_scale.view(-1, 1).float() * col_scale.view(-1).float()).to(row_scale.dtype)

    scaled_int8_mm.exact_off_cuda = True
    torchao_bitnet.scaled_int8_mm = scaled_int8_mm


def quantize_bitnet_torchao(model: nn.Module) -> nn.Module:
    """torchao's BitNet training weights (tensor subclass) on the Linears of `model.quantized_linears()` (a
    bitnerf.BitNeRF), in place, with the exact float32 product for its int8 matmul off CUDA. Returns the model."""
    use_exact_float_int8_mm_off_cuda()
    from torchao import quantize_
    from torchao.prototype.quantized_training import bitnet_training

    targets = set(map(id, model.quantized_linears()))
    quantize_(model, bitnet_training(), filter_fn=lambda module, fqn: id(module) in targets)
    return model


def torchao_bitnet_linear(linear: nn.Linear) -> nn.Linear:
    """`linear` with torchao's BitNet training weight, in place (exact product off CUDA, as above)."""
    use_exact_float_int8_mm_off_cuda()
    from torchao import quantize_
    from torchao.prototype.quantized_training import bitnet_training

    quantize_(linear, bitnet_training())
    return linear


def torchao_ternary_weight(weight) -> tuple:
    """torchao's own weight quantization of a plain float weight: (int8 ternary, float32 absmean scale)."""
    quiet_torchao_import()
    from torchao.prototype.quantized_training.bitnet import get_bitnet_scale, quantize_bitnet_weight

    scale = get_bitnet_scale(weight)
    return quantize_bitnet_weight(weight, scale, 1e-5), scale
