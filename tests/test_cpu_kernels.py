"""The fused C++ passes around BitNeRF's integer product (cpu_kernels.py): quantization and scaling give the torch
ops' bits, the RMSNorm (forward and backward) matches float64, whole fields agree with the torch ops path, and
the packed model computes exactly what training's forward computes."""

import copy
import shutil

import pytest
import torch

import cpu_kernels
import ternary_kernels
from bitnerf import BitNeRF, Quantization, plain_state_dict, quantize_bitnet
from bitnerf_packed import ternary_field, ternary_state_dict
from ternary_kernels import scale_and_bias
from utils import UserError

pytestmark = pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None,
                                reason="needs a C++ compiler (torch.compile on a CPU needs one too)")


@pytest.fixture(autouse=True)
def built():
    assert cpu_kernels.decide()[0], cpu_kernels.decide()[1]  # with a compiler the build must succeed


def _rows(m: int, k: int, seed: int) -> torch.Tensor:
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[1], x[2], x[3] = 0.0, x[2] * 1e-7, x[3] * 1e6  # a zero row, one below the scale's clip, a huge one
    x[4] = -x[4].abs()  # max |x| negative: quantizes to -127
    return x


def _torch_quantize(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torchao's quantize_int8_rowwise (eps 1e-5) as torch ops: (int8 q, row scale)."""
    row_scale = y.abs().amax(-1, keepdim=True) / 127
    return (y * (1.0 / row_scale.clip(1e-5))).round().clip(-128, 127).to(torch.int8), row_scale


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("extra_width", [0, 8])
def test_quantize_rows_without_norm_gives_the_torch_ops_bits(threads, extra_width):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, extra = _rows(300, 40, seed=1), (torch.randn(300, extra_width) if extra_width else None)
        whole = x if extra is None else torch.cat([x, extra], -1)
        q, row_scale, deq, r = cpu_kernels.quantize_rows(x, extra, None, 0.0, want_deq=True)
        expected_q, expected_scale = _torch_quantize(whole)
        assert torch.equal(q, expected_q) and torch.equal(row_scale, expected_scale)
        assert torch.equal(deq, expected_q.float() * expected_scale) and r.numel() == 0
        assert cpu_kernels.quantize_rows(x, extra, None, 0.0, want_deq=False)[2].numel() == 0
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("extra_width", [0, 24])
def test_quantize_rows_with_norm_matches_float64(threads, extra_width):
    """The RMS is summed in the kernel's own order: r equals float64's to float32 rounding, and a quantized value
    may differ from the torch ops' by one step where y lies on a rounding boundary (here: none or very few)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, extra = _rows(300, 40, seed=2), (torch.randn(300, extra_width) if extra_width else None)
        whole = x if extra is None else torch.cat([x, extra], -1)
        g, eps = torch.rand(whole.shape[1]) + 0.5, 1e-6
        q, row_scale, deq, r = cpu_kernels.quantize_rows(x, extra, g, eps, want_deq=True)
        r64 = torch.rsqrt(whole.double().square().mean(-1, keepdim=True) + eps)
        torch.testing.assert_close(r.double(), r64, rtol=1e-6, atol=0)
        expected_q, expected_scale = _torch_quantize(torch.nn.functional.rms_norm(whole, (whole.shape[1],), g, eps))
        torch.testing.assert_close(row_scale, expected_scale, rtol=1e-6, atol=0)
        steps = (q.int() - expected_q.int()).abs()
        assert steps.max() <= 1 and (steps > 0).float().mean() < 1e-3
        assert torch.equal(deq, q.float() * row_scale)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("acc_dtype", [torch.int32, torch.float32])
def test_scale_bias_gives_the_torch_ops_bits(acc_dtype):
    gen = torch.Generator().manual_seed(2)
    acc = torch.randint(-40000, 40000, (130, 24), generator=gen).to(acc_dtype)
    row_scale, scale, bias = torch.rand(130, 1, generator=gen), torch.tensor(0.037), torch.randn(24, generator=gen)
    expected = scale_and_bias(acc.clone(), scale, row_scale, bias, None)
    assert torch.equal(cpu_kernels.scale_bias(acc, row_scale, scale, bias), expected)
    assert torch.equal(cpu_kernels.scale_bias(acc, row_scale, scale, None), (acc.float() * row_scale) * scale)
    assert torch.equal(cpu_kernels.scale_bias(acc, row_scale, scale, bias, relu=True), torch.relu(expected))


def test_relu_backward_is_relus_gradient_and_the_bias_sum():
    gen = torch.Generator().manual_seed(7)
    h, grad_h = torch.relu(torch.randn(300, 24, generator=gen)), torch.randn(300, 24, generator=gen)
    h[0, :5] = 0.0  # the ReLU's kink: no gradient at 0, as torch's
    grad_z, grad_bias = cpu_kernels.relu_backward(grad_h, h)
    assert torch.equal(grad_z, torch.ops.aten.threshold_backward(grad_h, h, 0))
    torch.testing.assert_close(grad_bias.double(), grad_z.double().sum(0), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("extra_width", [0, 16])
def test_rms_norm_backward_matches_float64_autograd(extra_width):
    torch.manual_seed(3)
    x, extra = torch.randn(200, 32), (torch.randn(200, extra_width) if extra_width else None)
    g, grad_y, eps = torch.rand(32 + extra_width) + 0.5, torch.randn(200, 32 + extra_width), 1e-6
    # reference: y = cat * rsqrt(mean(cat^2) + eps) * g in float64, differentiated by autograd
    x64, g64 = x.double().requires_grad_(True), g.double().requires_grad_(True)
    whole = x64 if extra is None else torch.cat([x64, extra.double()], -1)
    y = whole * torch.rsqrt(whole.square().mean(-1, keepdim=True) + eps) * g64
    y.backward(grad_y.double())
    whole32 = x if extra is None else torch.cat([x, extra], -1)
    r = torch.rsqrt(whole32.square().mean(-1, keepdim=True) + eps)
    grad_x, grad_g = cpu_kernels.rms_norm_backward(grad_y, x, extra, r, g)
    torch.testing.assert_close(grad_x.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_g.double(), g64.grad, rtol=1e-5, atol=1e-5)


def _assert_equal_but_for_rare_steps(out: torch.Tensor, expected: torch.Tensor):
    """The RMS summed in another order changes r in its last bit: now and then an activation on a rounding
    boundary quantizes one step off, which moves a few outputs slightly; everything else agrees to float32."""
    diff = (out - expected).abs()
    assert diff.max() <= 1e-2 * expected.abs().max()
    assert (diff > 1e-5 * expected.abs().max()).float().mean() <= 0.02


def _without_kernels(monkeypatch):
    monkeypatch.setitem(cpu_kernels._ENABLED, "cpu", False)


@pytest.mark.parametrize("per_channel", [False, True])  # a per-channel scale multiplies after the fused pass
def test_bitnerf_training_forward_and_gradients_match_the_torch_path(monkeypatch, per_channel):
    torch.manual_seed(4)
    fused = quantize_bitnet(BitNeRF(n_freqs=3, width=64, depth=4, skip_layer=2),
                            quantization=Quantization(per_channel=per_channel))
    plain = copy.deepcopy(fused)
    x = torch.randn(700, 3)
    out = fused(x)
    (out.square().mean() + out[:, 0].sum()).backward()
    with monkeypatch.context() as patch:
        _without_kernels(patch)
        expected = plain(x)
        (expected.square().mean() + expected[:, 0].sum()).backward()
    _assert_equal_but_for_rare_steps(out, expected)
    for (name, p), q in zip(fused.named_parameters(), plain.parameters()):
        # a rare int8 step (the RMS summed in another order) moves a gradient by ~1e-4 of its largest where a
        # channel's own scale multiplies it, by less than 1e-6 under one scale per tensor
        atol = (1e-3 if per_channel else 1e-6) * q.grad.abs().max().item()
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol, msg=name)


def test_packed_field_renders_as_the_trained_model_with_and_without_kernels(monkeypatch):
    arch = dict(n_freqs=3, width=64, depth=4, skip_layer=2)
    torch.manual_seed(5)
    trained = quantize_bitnet(BitNeRF(**arch))
    packed = ternary_field(**arch)
    packed.load_state_dict(ternary_state_dict(plain_state_dict(trained), arch["depth"]))
    x = torch.randn(500, 3)
    with torch.no_grad():
        out, qat = packed(x), trained(x)
        with monkeypatch.context() as patch:
            _without_kernels(patch)
            expected = packed(x)
    assert torch.equal(out, qat)  # the packed model computes what training's forward computes
    _assert_equal_but_for_rare_steps(out, expected)


def test_the_switch(monkeypatch):
    monkeypatch.setenv("NERF_CPU_KERNELS", "off")
    cpu_kernels.decide.cache_clear()
    try:
        assert cpu_kernels.decide() == (False, "torch ops (NERF_CPU_KERNELS=off)")
        monkeypatch.setenv("NERF_CPU_KERNELS", "sometimes")
        cpu_kernels.decide.cache_clear()
        with pytest.raises(UserError, match="NERF_CPU_KERNELS"):
            cpu_kernels.decide()
    finally:
        monkeypatch.delenv("NERF_CPU_KERNELS")
        cpu_kernels.decide.cache_clear()
    assert "fused C++ passes" in ternary_kernels.kernels_line()
    assert cpu_kernels.active(torch.zeros(2)) and not cpu_kernels.active(torch.zeros(2, dtype=torch.float64))
    monkeypatch.setitem(cpu_kernels._ENABLED, "cpu", False)
    assert not cpu_kernels.active(torch.zeros(2))


def test_compiled_bitnerf_calls_the_kernels_without_graph_breaks():
    from torch._dynamo.utils import counters
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(6)
    model = quantize_bitnet(BitNeRF(n_freqs=2, width=16, depth=2, skip_layer=1))
    x = torch.randn(50, 3)
    compiled = torch.compile(model, fullgraph=True)

    def step():
        out = compiled(x)
        out.square().mean().backward()  # compiles the backward graph too
        return out

    out, code = run_and_get_code(step)
    assert not counters["graph_break"], dict(counters["graph_break"])
    code = "".join(code)
    assert all(f"torch.ops.nerf_cpu.{name}" in code
               for name in ("quantize_rows", "scale_bias", "rms_norm_backward", "relu_backward"))
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x)
    expected.square().mean().backward()
    # inductor's own encoding and RMS reductions may round differently: an activation can cross a rounding boundary
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    for got, p in zip(grads, model.parameters()):
        torch.testing.assert_close(got, p.grad, rtol=5e-2, atol=5e-3)
