"""NeRF and BitNeRF fields: architecture, ternary forward, straight-through gradients, live density at init."""

import pytest
import torch
from torch import nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from bitnerf import BitLinear, BitNeRF, plain_state_dict, quantize_bitnet, ternary_weight
from nerf import NeRF
from torchao_reference import quantize_bitnet_torchao, torchao_ternary_weight


def is_quantized(model: nn.Module) -> bool:
    """Whether `model` has BitNet QAT layers (quantize_bitnet's, or torchao's weight subclass)."""
    if any(isinstance(m, BitLinear) for m in model.modules()):
        return True
    return any(type(p).__name__ == "BitNetTrainingLinearWeight" for p in model.parameters())


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
    w = layer.linear.weight.double()
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


class TorchCalls(TorchFunctionMode):
    """Records the name of every torch function called while it is active."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def test_bitnerf_without_norm_quantizes_the_raw_input(monkeypatch):
    """bitnet_norm=false: each hidden layer is a BitLinear alone (no RMSNorm parameters, no normalisation), and its
    output is the hand-built BitNet b1.58 path on the raw input: per-row absmax int8 activations times the ternary
    weight, scaled back, plus the bias. (The torch ops, whose calls a TorchFunctionMode sees.)"""
    import cpu_kernels

    monkeypatch.setitem(cpu_kernels._ENABLED, "cpu", False)

    torch.manual_seed(0)
    model = quantize_bitnet(BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1, norm=False))
    assert is_quantized(model) and all(type(layer) is BitLinear for layer in model.hidden)
    assert not any(isinstance(m, nn.RMSNorm) for m in model.modules())
    assert sorted(name for name, _ in model.hidden.named_parameters()) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    layer = model.hidden[0]
    x = torch.randn(6, 16)
    x[1], x[2], x[3] = 0.0, x[2] * 1e-7, -x[3].abs()  # a zero row, a row below the scale's clip, max |x| negative
    with TorchCalls() as calls:
        out = layer(x)
    assert not any("rsqrt" in name or "norm" in name for name in calls.names), calls.names
    row_scale = x.abs().amax(dim=-1, keepdim=True) / 127
    x_q = (x * (1.0 / row_scale.clip(1e-5))).round()
    ternary, scale = ternary_weight(layer.weight)
    expected = (x_q @ ternary.float().T) * row_scale * scale + layer.bias
    assert torch.equal(out, expected)
    # the recorder does see the norm where there is one
    normed = quantize_bitnet(BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1))
    with TorchCalls() as calls:
        normed.hidden[0](x)
    assert "rsqrt" in calls.names
    model(torch.randn(40, 3)).square().mean().backward()  # the skip layer too, and its gradients
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.hidden.parameters())


def test_ternary_weight_is_torchaos_quantization():
    gen = torch.Generator().manual_seed(0)
    for weight in (torch.randn(24, 40, generator=gen), torch.zeros(4, 8), torch.randn(3, 5, generator=gen) * 1e-7,
                   torch.randn(8, 8, generator=gen).to(torch.bfloat16)):
        ternary, scale = ternary_weight(weight)
        expected_ternary, expected_scale = torchao_ternary_weight(weight)
        assert ternary.dtype == torch.int8 and scale.dtype == torch.float32
        assert torch.equal(ternary, expected_ternary) and torch.equal(scale, expected_scale)


def test_bitnerf_gradients_reach_latent_weights():
    torch.manual_seed(0)
    model = quantize_bitnet(BitNeRF(n_freqs=2, width=32, depth=2, skip_layer=1))
    latent = model.hidden[1].linear.weight
    assert type(latent) is nn.Parameter  # plain: DDP all-reduces its .grad, AdamW may be fused
    before = latent.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(64, 3)).square().mean().backward()
    assert latent.grad is not None and latent.grad.abs().sum() > 0
    opt.step()
    assert (latent.detach() - before).abs().max() > 0


def test_plain_state_dict_unwraps_quantized_weights():
    model = quantize_bitnet(BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1))
    state = plain_state_dict(model)
    assert all(type(v) is torch.Tensor for v in state.values())
    fresh = BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.hidden[0].linear.weight, model.hidden[0].linear.weight.detach())


def test_density_gradient_alive_at_init_for_many_seeds():
    # The original (ReLU density) had every sigma pre-activation negative at init with its seed: zero gradient.
    # Softplus density gives a gradient for every seed.
    from renderer import render_rays

    for seed in range(8):
        torch.manual_seed(seed)
        model = NeRF(n_freqs=4, width=32, depth=2, skip_layer=1)
        out = render_rays(model, torch.zeros(16, 3) + torch.tensor([0.0, 0.0, 4.0]),
                          torch.randn(16, 3) * 0.1 + torch.tensor([0.0, 0.0, -1.0]), 2.0, 6.0, 8)
        out.rgb.sum().backward()
        assert model.output.weight.grad[3].abs().sum() > 0, f"dead density gradient for seed {seed}"


# --- the direction branch (viewdirs) -----------------------------------------------------------------------------
TINY = dict(n_freqs=2, width=16, depth=3, skip_layer=1)


def _directional(kind: str) -> nn.Module:
    """A tiny field with the direction branch: NeRF, or BitNeRF (QAT layers) with or without its RMSNorms."""
    if kind == "nerf":
        return NeRF(**TINY, viewdirs=True)
    return quantize_bitnet(BitNeRF(**TINY, norm=kind == "bitnerf", viewdirs=True))


def test_viewdirs_architecture_is_the_original_nerfs():
    """Density from the last hidden layer (W -> 1); a feature vector (W -> W, no activation) concatenated with the
    direction encoded with L_dirs = 4 (3 + 24 values) -> W/2 + ReLU -> RGB (W/2 -> 3)."""
    model = NeRF(viewdirs=True)
    assert not hasattr(model, "output")
    shapes = {name: (layer.in_features, layer.out_features)
              for name, layer in (("sigma", model.sigma), ("feature", model.feature), ("view", model.view),
                                  ("rgb", model.rgb))}
    assert shapes == {"sigma": (256, 1), "feature": (256, 256), "view": (256 + 27, 128), "rgb": (128, 3)}
    points, dirs = torch.randn(5, 7, 3), F.normalize(torch.randn(5, 7, 3), dim=-1)
    assert model(points, dirs).shape == (5, 7, 4)
    with pytest.raises(ValueError, match="viewing direction"):
        model(points)
    # BitNeRF: the feature and direction layers are RMSNorm + BitLinear like the hidden ones (the direction
    # encoding padded for int8 matmuls); the density and RGB heads stay float, as the output layer does
    bit = quantize_bitnet(BitNeRF(viewdirs=True))
    assert bit.quantized_layers()[-2:] == [bit.feature, bit.view]
    assert all(type(layer).__name__ == "BitRMSNormLinear" for layer in (bit.feature, bit.view))
    assert bit.view.linear.in_features == 256 + 32 and type(bit.sigma) is type(bit.rgb) is nn.Linear


@pytest.mark.parametrize("kind", ["nerf", "bitnerf", "bitnerf_no_norm"])
def test_viewdirs_colour_depends_on_the_direction_and_density_does_not(kind):
    torch.manual_seed(0)
    model = _directional(kind)
    points = torch.randn(1, 3).expand(32, 3)  # one point, seen from 32 directions
    gen = torch.Generator().manual_seed(1)
    dirs_a, dirs_b = (F.normalize(torch.randn(32, 3, generator=gen), dim=-1) for _ in range(2))
    dirs_a.requires_grad_(True)
    raw_a, raw_b = model(points, dirs_a), model(points, dirs_b)
    assert torch.equal(raw_a[:, 3], raw_b[:, 3])  # the same density bits, whatever the directions
    grad = torch.autograd.grad(raw_a[:, 3].sum(), dirs_a, retain_graph=True, allow_unused=True)[0]
    assert grad is None or not grad.any()  # nor a gradient towards them
    assert (raw_a[:, :3] - raw_b[:, :3]).abs().amax(dim=-1).min() > 1e-4  # every direction's colour moves
    assert (raw_a[:, :3] - raw_a[:1, :3]).abs().amax() > 1e-3  # and the one point's colour varies with it
    raw_a.square().sum().backward()  # every parameter learns, the direction branch's included
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_without_viewdirs_the_fields_are_unchanged_and_ignore_directions():
    """viewdirs=false (every preset): the same modules and parameter names (checkpoints and .bitnerf files keep
    theirs), and directions, if given, change nothing."""
    hidden = [f"hidden.{i}.{p}" for i in range(3) for p in ("weight", "bias")]
    normed = [f"hidden.{i}.{m}.{p}" for i in range(3) for m, p in (("0", "weight"), ("1", "weight"), ("1", "bias"))]
    ends = (["input.weight", "input.bias"], ["output.weight", "output.bias"])
    torch.manual_seed(0)
    points, dirs = torch.randn(40, 3), F.normalize(torch.randn(40, 3), dim=-1)
    for model, keys in ((NeRF(**TINY), hidden), (BitNeRF(**TINY), normed), (BitNeRF(**TINY, norm=False), hidden)):
        assert list(model.state_dict()) == ends[0] + keys + ends[1]
        assert not model.viewdirs and not any(hasattr(model, m) for m in ("sigma", "feature", "view", "rgb"))
        for field in (model, quantize_bitnet(model) if isinstance(model, BitNeRF) else model):
            assert torch.equal(field(points, dirs), field(points))
    torch.manual_seed(0)
    default = NeRF(**TINY)
    torch.manual_seed(0)
    explicit = NeRF(**TINY, viewdirs=False, n_freqs_dirs=7)
    assert torch.equal(default(points), explicit(points))  # the same initialisation draws


def test_exact_float_int8_matmul_equals_torchao_int_mm():
    # the torchao reference routes torchao's CPU int8 matmul through an exact float32 product scaled as torchao's
    # CUDA kernel scales (int32 accumulator -> float32, * row scale, * column scale): same bits as _int_mm there
    import torchao.prototype.quantized_training.bitnet as torchao_bitnet

    torch.manual_seed(0)
    model = quantize_bitnet_torchao(BitNeRF(n_freqs=3, width=64, depth=3, skip_layer=1))
    patched = torchao_bitnet.scaled_int8_mm
    assert patched.exact_off_cuda
    x = torch.randn(300, 3)
    fast = model(x)
    try:
        torchao_bitnet.scaled_int8_mm = lambda a, b, rs, cs: (
            torch._int_mm(a, b).float() * rs.view(-1, 1).float() * cs.view(-1).float()).to(rs.dtype)
        reference = model(x)
    finally:
        torchao_bitnet.scaled_int8_mm = patched
    assert torch.equal(fast, reference)


# --- the fused RMSNorm + BitLinear layer against torchao's BitNet (the reference) ----------------------------------
def _twins(arch: dict, seed: int = 0):
    """(torchao-quantized BitNeRF, fused-quantized BitNeRF) with the same weights (RMSNorm gains not all 1)."""
    import copy

    torch.manual_seed(seed)
    base = BitNeRF(**arch)
    with torch.no_grad():
        for layer in base.hidden:
            layer[0].weight.uniform_(0.5, 1.5)
    return quantize_bitnet_torchao(copy.deepcopy(base)), quantize_bitnet(copy.deepcopy(base))


def _assert_grads_close(reference: nn.Module, fused: nn.Module, rtol: float = 1e-5):
    ref_params = dict(reference.named_parameters())
    for name, param in fused.named_parameters():
        expected = getattr(ref_params[name].grad, "_data", ref_params[name].grad)
        scale = expected.abs().max().clamp_min(1e-12)
        assert (param.grad - expected).abs().max() <= rtol * scale, name


def test_fused_bitnerf_equals_torchao_bitnet_forward_bits_and_gradients(monkeypatch):
    """The torch ops path (the C++ passes sum the RMS in another order: tests/test_cpu_kernels.py)."""
    import cpu_kernels

    monkeypatch.setitem(cpu_kernels._ENABLED, "cpu", False)
    for arch in (dict(n_freqs=3, width=64, depth=4, skip_layer=2), dict(n_freqs=2, width=24, depth=2, skip_layer=1)):
        reference, fused = _twins(arch)
        assert is_quantized(fused) and all(type(p) is nn.Parameter for p in fused.parameters())
        x = torch.randn(5, 77, 3)  # leading dims are kept
        a, b = reference(x), fused(x)
        assert torch.equal(a, b)  # same bits: same RMSNorm, roundings and exact integer product
        (a.square().mean() + a[..., 0].sum()).backward()
        (b.square().mean() + b[..., 0].sum()).backward()
        _assert_grads_close(reference, fused)


def test_fused_bitlinear_edge_rows_equal_torchao():
    from bitnerf import rmsnorm_bitlinear

    torch.manual_seed(1)
    reference, fused = _twins(dict(n_freqs=2, width=16, depth=2, skip_layer=1))
    ref_layer, layer = reference.hidden[0], fused.hidden[0]
    x = torch.randn(6, 16)
    x[1] = 0.0  # an all-zero row (RMSNorm eps, the scale's clip)
    x[2] *= 1e-7
    x[3] *= 1e6
    x[4] = -x[4].abs()  # max |x| negative
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    a, b = ref_layer(x_ref), layer(x)
    assert torch.equal(a, b)
    a.sum().backward()
    b.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    # without an RMSNorm: the BitLinear alone equals torchao's weight on a plain Linear
    assert isinstance(layer[1], BitLinear)
    y = torch.randn(9, 16)
    torch.testing.assert_close(layer[1](y), ref_layer[1](y), rtol=0, atol=0)
    assert torch.equal(rmsnorm_bitlinear(y, None, None, layer[1]), layer[1](y))


def test_ternary_weights_follow_every_weight_update(monkeypatch):
    """The ternary weights must be those of the current latent weights after every optimizer step, also with the
    fused AdamW training uses, which updates weights without advancing their version counter (a cache keyed on
    it went stale: resumed runs then diverged from uninterrupted ones). The torch ops' gradients, which track
    torchao's to the last bits: Adam's first steps amplify the fused C++ backward's other summation order enough to
    flip a ternary weight (that backward is checked in tests/test_cpu_kernels.py)."""
    import cpu_kernels

    monkeypatch.setitem(cpu_kernels._ENABLED, "cpu", False)
    reference, fused = _twins(dict(n_freqs=2, width=32, depth=3, skip_layer=1))
    opts = [torch.optim.AdamW(reference.parameters(), lr=1e-2), torch.optim.AdamW(fused.parameters(), lr=1e-2, fused=True)]
    for step in range(3):
        x = torch.randn(64, 3)
        for model, opt in zip((reference, fused), opts):
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad()
        x = torch.randn(64, 3)
        torch.testing.assert_close(fused(x), reference(x), rtol=1e-4, atol=1e-5)
        # the forward equals a fresh copy's: no state is carried from before the step
        fresh = quantize_bitnet(BitNeRF(n_freqs=2, width=32, depth=3, skip_layer=1))
        fresh.load_state_dict(fused.state_dict())
        assert torch.equal(fused(x), fresh(x))
    # load_state_dict and a change of dtype also change the ternary weights
    fused.load_state_dict(plain_state_dict(reference))
    assert torch.equal(fused(x), reference(x))
    fused.double()
    assert fused(x.double()).dtype == torch.float64


def test_fused_bitnerf_under_cpu_autocast():
    reference, fused = _twins(dict(n_freqs=3, width=32, depth=2, skip_layer=1))
    x = torch.randn(200, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fused.parameters())
    # bf16 rounds the float layers; the quantized layers' integer product stays exact
    torch.testing.assert_close(out.float(), reference(x), rtol=0.1, atol=0.1)


@pytest.mark.parametrize("units", [True, False])
def test_bf16_matmul_is_the_product_of_rounded_inputs(monkeypatch, units):
    """Without bf16 units: exactly the float32 product of the bf16-rounded inputs (float32 sums). With them:
    oneDNN's matmul at bf16 precision, which rounds as it sees fit (the inputs, sometimes the result; small
    shapes it keeps in float32), always within bf16's 2^-8 of the exact product."""
    import ternary_kernels
    from hardware import cpu_has_native_bf16

    if units and not cpu_has_native_bf16():
        pytest.skip("this CPU has no bf16 units")
    monkeypatch.setattr(ternary_kernels, "cpu_has_native_bf16", lambda: units)
    torch.manual_seed(0)
    a, b = torch.randn(300, 40), torch.randn(40, 24)
    for left in (a, a.t().contiguous().t()):  # the weight gradient's operand is a transposed view
        got = ternary_kernels.mm_bf16_inputs(left, b).double()
        assert (got - a.double() @ b.double()).abs().max() <= 2 ** -8 * (a.double() @ b.double()).abs().max()
    if not units:
        # hand case: 1 + 2^-10 rounds to 1 in bf16, so each sum is exactly 1000 (float32 inputs: 1000.98); a
        # bf16 running sum would stop at 256 (256 + 1 rounds back to 256). 1000 is a bf16 number
        ones = torch.full((8, 1000), 1 + 2 ** -10)
        assert torch.equal(ternary_kernels.mm_bf16_inputs(ones, torch.ones(1000, 3)), torch.full((8, 3), 1000.0))


@pytest.mark.parametrize("bf16_grads", [False, True])
def test_bf16_grads_round_only_the_backward_matmuls(bf16_grads):
    """bitnet_grad=bf16: the forward is the same bits; the gradients are those of the float32 backward to within
    bf16's rounding of the two matmuls' inputs (relative 2^-9 each)."""
    _, base = _twins(dict(n_freqs=3, width=32, depth=3, skip_layer=1))
    other = quantize_bitnet(BitNeRF(n_freqs=3, width=32, depth=3, skip_layer=1), bf16_grads=bf16_grads)
    other.load_state_dict(base.state_dict())
    x = torch.randn(400, 3)
    out_base, out_other = base(x), other(x)
    assert torch.equal(out_base, out_other)
    out_base.square().mean().backward()
    out_other.square().mean().backward()
    for (name, p), q in zip(base.named_parameters(), other.parameters()):
        error = (q.grad - p.grad).abs().max() / p.grad.abs().max()
        assert error <= (2e-2 if bf16_grads else 0), (name, float(error))


@pytest.mark.slow
@pytest.mark.parametrize("product, op, bf16_grads",
                         [("onednn", "ternary_mm_onednn", True), ("int_mm", "int8_mm", False)])
def test_fused_bitnerf_compiles_fullgraph_and_matches_eager(monkeypatch, product, op, bf16_grads):
    """Compiled with an int8 kernel (oneDNN's on a CPU with VNNI/AMX, torch._int_mm on CUDA): no graph break,
    and the product stays the library's kernel (a custom op), not a loop inductor writes itself; so does the
    backward's bf16 matmul (bitnet_grad=bf16)."""
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    import ternary_kernels

    monkeypatch.setattr(ternary_kernels, "_INT_MM", {"cpu": product})
    torch._dynamo.reset()
    counters.clear()
    _, fused = _twins(dict(n_freqs=2, width=16, depth=2, skip_layer=1))
    quantize_bitnet(fused, bf16_grads=bf16_grads)
    compiled = torch.compile(fused, fullgraph=True)  # fullgraph: a graph break raises
    x = torch.randn(50, 3)

    def step():
        y = compiled(x)
        y.square().mean().backward()
        return y

    out, code = run_and_get_code(step)
    assert not counters["graph_break"], dict(counters["graph_break"])
    code = "".join(code)
    assert f"torch.ops.nerf_experiments.{op}" in code
    assert ("torch.ops.nerf_experiments.mm_bf16_inputs" in code) == bf16_grads
    grads = {n: p.grad.clone() for n, p in fused.named_parameters()}
    fused.zero_grad()
    expected = fused(x)
    expected.square().mean().backward()
    # the compiled RMSNorm may round differently, which can move an activation across a rounding boundary
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for name, param in fused.named_parameters():
        torch.testing.assert_close(grads[name], param.grad, rtol=5e-2, atol=5e-3)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_fused_bitnerf_matches_torchao_on_cuda(amp):
    """CUDA: the int8 path (torch._int_mm) and torchao's autocast casts (input, weight, bias to the AMP dtype)."""
    reference, fused = (m.cuda() for m in _twins(dict(n_freqs=3, width=64, depth=3, skip_layer=1)))
    x = torch.randn(4096, 3, device="cuda")
    outs = []
    for model in (reference, fused):
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out.float())
    if amp is not None:
        torch.testing.assert_close(outs[1], outs[0], rtol=5e-2, atol=5e-2)
    else:
        # CUDA's fused RMSNorm reduces in another order than the reference's: a last-bit difference at a rounding
        # boundary moves one int8 activation by one level, and the outputs of the rays through it by ~1e-3. So:
        # nearly every output equal to float rounding, a small share moved, none by more than a few such flips
        diff = (outs[1] - outs[0]).abs()
        assert float(diff.median()) <= 1e-5, float(diff.median())
        assert float((diff > 1e-4).float().mean()) <= 0.05, float((diff > 1e-4).float().mean())
        assert float(diff.max()) <= 2e-2, float(diff.max())
    _assert_grads_close(reference, fused, rtol=1e-4 if amp is None else 5e-2)
