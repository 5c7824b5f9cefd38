"""NeRF and BitNeRF fields: architecture, ternary forward, straight-through gradients, live density at init."""

import torch
from torch import nn

from bitnerf import BitNeRF, is_quantized, plain_state_dict, quantize_bitnet, ternary_weight
from nerf import NeRF


def test_nerf_reference_architecture():
    model = NeRF()  # the original's: L=16 (99-dim input), 8 hidden 256-wide layers, skip before hidden layer 4
    assert model.input.in_features == 99
    assert [layer.in_features for layer in model.hidden] == [256] * 4 + [256 + 99] + [256] * 3
    assert model.output.out_features == 4
    assert model(torch.randn(5, 7, 3)).shape == (5, 7, 4)


def test_bitnerf_has_rmsnorm_before_every_hidden_linear_and_pads_for_int8():
    model = BitNeRF()
    assert all(isinstance(layer[0], nn.RMSNorm) and isinstance(layer[1], nn.Linear) for layer in model.hidden)
    assert model.input.in_features % 8 == 0 and model.hidden[4].linear.in_features % 8 == 0
    # the zero padding changes nothing: the padded columns multiply zeros
    enc = model.encode(torch.randn(4, 3))
    assert torch.all(enc[:, 99:] == 0)


def _quantize_rows_int8(x):
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5) / 127
    return (x / scale).round().clamp(-128, 127) * scale


def test_bitnerf_forward_uses_ternary_weights_and_int8_activations():
    torch.manual_seed(0)
    model = BitNeRF(n_freqs=2, width=32, depth=2, skip_layer=1)
    layer = model.hidden[0]
    x = torch.randn(20, 32)
    float_out = layer(x)
    quantize_bitnet(model)
    assert is_quantized(model)
    out = layer(x)
    # independent float64 recomputation: absmean-scaled ternary weights, per-row absmax int8 activations
    w = layer.linear.weight._data.double()
    scale = w.abs().mean()
    w_t = (w / scale).round().clamp(-1, 1)
    assert set(w_t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    h = _quantize_rows_int8(layer[0](x).double())
    expected = h @ (w_t * scale).T + layer.linear.bias.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
    assert (out - float_out).abs().max() > 1e-3  # it is not the float layer
    q, s = ternary_weight(layer.linear.weight)
    torch.testing.assert_close(q.double(), w_t)
    torch.testing.assert_close(s.double(), scale)


def test_bitnerf_gradients_reach_latent_weights():
    torch.manual_seed(0)
    model = quantize_bitnet(BitNeRF(n_freqs=2, width=32, depth=2, skip_layer=1))
    latent = model.hidden[1].linear.weight
    before = latent._data.clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(64, 3)).square().mean().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    opt.step()
    assert (latent._data - before).abs().max() > 0


def test_plain_state_dict_unwraps_quantized_weights():
    model = quantize_bitnet(BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1))
    state = plain_state_dict(model)
    assert all(type(v) is torch.Tensor for v in state.values())
    fresh = BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.hidden[0].linear.weight, model.hidden[0].linear.weight._data)


def test_density_gradient_alive_at_init_for_many_seeds():
    # The original (ReLU density) had every sigma pre-activation negative at init with its seed: zero gradient.
    # Softplus density gives a gradient for every seed.
    from render import render_rays

    for seed in range(8):
        torch.manual_seed(seed)
        model = NeRF(n_freqs=4, width=32, depth=2, skip_layer=1)
        out = render_rays(model, torch.zeros(16, 3) + torch.tensor([0.0, 0.0, 4.0]),
                          torch.randn(16, 3) * 0.1 + torch.tensor([0.0, 0.0, -1.0]), 2.0, 6.0, 8)
        out.rgb.sum().backward()
        assert model.output.weight.grad[3].abs().sum() > 0, f"dead density gradient for seed {seed}"


def test_exact_float_int8_matmul_equals_torchao_int_mm():
    # quantize_bitnet routes torchao's CPU int8 matmul through an exact float32 product: same bits, faster
    import torchao.prototype.quantized_training.bitnet as torchao_bitnet

    torch.manual_seed(0)
    model = quantize_bitnet(BitNeRF(n_freqs=3, width=64, depth=3, skip_layer=1))
    patched = torchao_bitnet.scaled_int8_mm
    assert patched.exact_off_cuda
    x = torch.randn(300, 3)
    fast = model(x)
    try:
        torchao_bitnet.scaled_int8_mm = lambda a, b, rs, cs: torch._int_mm(a, b) * cs.view(-1) * rs.view(-1, 1)
        reference = model(x)
    finally:
        torchao_bitnet.scaled_int8_mm = patched
    assert torch.equal(fast, reference)
