"""BitNeRF's training recipes (configs bitnet_scale, bitnet_scale_per, bitnet_act, bitnet_qat_from): each switch
does what it says, against hand-computed cases and float64 references. That the packed export of each computes
what its QAT model computes is tests/test_export.py's."""

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from bitnerf import BitNeRF, Quantization, quantize_bitnet, set_qat, ternary_weight
from configs import EXP1, EXP4, Config, ConfigError
from train import qat_on, train

ARCH = dict(n_freqs=2, width=16, depth=3, skip_layer=1)


def _field(seed: int = 0) -> BitNeRF:
    torch.manual_seed(seed)
    return BitNeRF(**ARCH)


# --- the weight scale ----------------------------------------------------------------------------------------------
def test_median_and_absmean_scales_by_hand():
    w = torch.tensor([[0.1, -0.5, 2.0, 0.3]])
    # absmean: mean |w| = 2.9 / 4 = 0.725; w / 0.725 = 0.14, -0.69, 2.76, 0.41 -> 0, -1, 1, 0
    ternary, scale = ternary_weight(w)
    assert ternary.tolist() == [[0, -1, 1, 0]] and scale.item() == pytest.approx(0.725)
    # median |w| of 0.1, 0.3, 0.5, 2.0: torch's median of an even count is the lower middle, 0.3;
    # w / 0.3 = 0.33, -1.67, 6.67, 1 -> 0, -1, 1, 1: the 0.3 weight survives
    ternary, scale = ternary_weight(w, Quantization(scale="median"))
    assert ternary.tolist() == [[0, -1, 1, 1]] and scale.item() == pytest.approx(0.3)


def test_per_channel_scale_by_hand():
    w = torch.tensor([[0.2, -0.2, 0.0, 0.4], [3.0, -1.0, 0.0, 0.0]])
    # one scale: mean |w| = 4.8 / 8 = 0.6; the small row rounds to 0, 0, 0, 1
    ternary, scale = ternary_weight(w)
    assert ternary.tolist() == [[0, 0, 0, 1], [1, -1, 0, 0]] and scale.item() == pytest.approx(0.6)
    # per row: 0.8 / 4 = 0.2 -> 1, -1, 0, 2 clipped to 1; 4 / 4 = 1 -> 3, -1, 0, 0 clipped to 1, -1, 0, 0
    ternary, scale = ternary_weight(w, Quantization(per_channel=True))
    assert ternary.tolist() == [[1, -1, 0, 1], [1, -1, 0, 0]]
    torch.testing.assert_close(scale, torch.tensor([0.2, 1.0]))
    ternary, scale = ternary_weight(w, Quantization(scale="median", per_channel=True))
    # per-row medians (lower middle): |0.2, 0.2, 0, 0.4| -> 0.2; |3, 1, 0, 0| -> 0 (clipped to 1e-5: signs only)
    assert ternary.tolist() == [[1, -1, 0, 1], [1, -1, 0, 0]]
    torch.testing.assert_close(scale, torch.tensor([0.2, 0.0]))


@pytest.mark.parametrize("quantization", [Quantization(per_channel=True),
                                          Quantization(scale="median", per_channel=True)])
def test_per_channel_layer_is_the_float64_product(quantization):
    # y = rmsnorm(x) * g; q = round(y * 127 / max|y|) per row; out = (q @ ternary.T) * max|y| / 127 * scale[n] + b[n]
    field = quantize_bitnet(_field(), quantization=quantization)
    layer = field.hidden[0]
    norm, linear = layer
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        linear.bias.normal_()
    x = torch.randn(64, 16)
    ternary, scale = ternary_weight(linear.weight, quantization)
    y = x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    row = y.abs().amax(-1, keepdim=True) / 127
    expected = (y / row).round() @ ternary.double().T * row * scale.double() + linear.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-4)


# --- float activations ---------------------------------------------------------------------------------------------
def test_float_activations_forward_and_straight_through_gradients_are_the_float64_ones():
    field = quantize_bitnet(_field(), quantization=Quantization(int8_activations=False))
    norm, linear = field.hidden[0]
    x = torch.randn(32, 16, requires_grad=True)
    out = field.hidden[0](x)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    # the reference: the same layer in float64 with the ternary weight as a constant (straight through: the latent
    # weight's gradient is the constant's)
    ternary, scale = ternary_weight(linear.weight)
    x64 = x.detach().double().requires_grad_()
    weight64 = (ternary.double() * scale.double()).requires_grad_()
    y64 = x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + 1e-6) * norm.weight.double()
    ref = nn.functional.linear(y64, weight64, linear.bias.double())
    ref.backward(grad_out.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(linear.weight.grad.double(), weight64.grad, rtol=1e-4, atol=1e-4)


# --- late quantization ---------------------------------------------------------------------------------------------
def test_before_qat_starts_the_layers_are_the_float_bitnerfs_and_after_it_bitnets():
    float_field = _field()
    late = quantize_bitnet(copy.deepcopy(float_field), qat=False)
    bitnet = quantize_bitnet(copy.deepcopy(float_field))
    points = torch.rand(200, 3) * 2 - 1
    expected = float_field(points)
    out = late(points)
    assert torch.equal(out, expected)  # the float RMSNorm + Linear layers, bit for bit
    out.sum().backward()
    expected.sum().backward()
    for (name, p), q in zip(late.named_parameters(), float_field.parameters()):
        assert torch.equal(p.grad, q.grad), name
    set_qat(late, True)
    with torch.no_grad():
        assert torch.equal(late(points), bitnet(points))
        assert not torch.equal(late(points), expected)


def test_qat_starts_at_its_share_of_the_steps_or_of_the_time_budget():
    cfg = replace(EXP4, bitnet_qat_from=0.5)
    # 100 steps: step 49 is 49 % of the way, step 50 is half
    assert not qat_on(cfg, 49, 100) and qat_on(cfg, 50, 100)
    # a time budget 60 % spent at step 10 of 100: past half
    assert qat_on(cfg, 10, 100, budget_used=0.6)
    assert all(qat_on(EXP4, step, 100) for step in (0, 1, 99))  # 0: quantized from the first step


def test_late_quantization_trains_float_then_quantized(tiny_cfg, capsys):
    cfg = replace(tiny_cfg, model="bitnerf", steps=40, bitnet_qat_from=0.5, lr=5e-3, log_every=10)
    summary = train(cfg)
    printed = capsys.readouterr()
    assert "step 20: quantization-aware training starts" in printed.out + printed.err
    assert summary["steps"] == 40


def test_recipe_keys_are_refused_for_other_models_and_out_of_range():
    with pytest.raises(ConfigError, match="bitnet_act apply to model=bitnerf only"):
        Config(bitnet_act="float")
    with pytest.raises(ConfigError, match="bitnet_qat_from must be in"):
        replace(EXP4, bitnet_qat_from=1.0)
    with pytest.raises(ConfigError, match="bitnet_scale='mean' is not one of absmean, median"):
        replace(EXP4, bitnet_scale="mean")
    assert replace(EXP1, model="bitnerf", bitnet_scale_per="channel").bitnet_scale_per == "channel"
