"""The device policy (hardware.py) on GPUs this CPU-only machine fakes: a T4, an A100, an Apple GPU; and what
the step must not do on any GPU (host syncs per micro-batch, float64 on the device, silent fp16 skips)."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from dataclasses import replace

import pytest
import torch
from torch.overrides import TorchFunctionMode

import cpu_kernels
import hardware
import ternary_kernels
from assembly import amp_dtype, build_renderer
from bitnerf import BitNeRF, quantize_bitnet
from bitnerf_packed import TernaryLinear
from configs import EXP1, EXP2, apply_device_defaults, device_kind, from_cli
from dataset import RayBatcher, load_views, split_views
from gpu_check import SyncingOps  # gpu_check counts a GPU step's syncs with it too
from samplers import Samples
from hardware import amp_policy, configure_backends, make_grad_scaler, pick_device
from ternary_kernels import probe_product, scale_and_bias
from train import Trainer, evaluate_views, step_generator, train
from utils import Dist, UserError

CUDA0 = torch.device("cuda", 0)


def fake_gpu(monkeypatch, capability: tuple[int, int]) -> None:
    """What torch reports on a GPU of this compute capability; is_bf16_supported says True even on a T4 (sm_75),
    where bf16 is only emulated."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)


def fake_mac(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)


# --- AMP dtype and scaler ------------------------------------------------------------------------------------------
def test_t4_gets_fp16_and_a_scaler_not_emulated_bf16(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    policy = amp_policy(True, "auto", CUDA0)
    assert policy.dtype == torch.float16 and policy.scaler
    assert amp_dtype(EXP2, CUDA0) == torch.float16  # evaluate/render autocast the same way
    with pytest.raises(UserError, match="bf16 needs 8.0"):  # an explicit bf16 is refused, not emulated
        amp_policy(True, "bf16", CUDA0)


@pytest.mark.parametrize("capability", [(8, 0), (9, 0)])
def test_a100_and_h100_get_bf16_without_a_scaler(monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    policy = amp_policy(True, "auto", CUDA0)
    assert policy.dtype == torch.bfloat16 and not policy.scaler and "native" in policy.reason


def test_cpu_bf16_is_native_only_with_bf16_units(monkeypatch):
    monkeypatch.setattr(hardware, "cpu_flags", lambda: {"avx2", "fma"})  # an AVX2-only CPU
    emulated = amp_policy(True, "auto", torch.device("cpu"))
    assert emulated.dtype == torch.bfloat16 and not emulated.scaler and "EMULATED" in emulated.reason
    for flag in ("avx512_bf16", "amx_bf16"):
        monkeypatch.setattr(hardware, "cpu_flags", lambda flag=flag: {"avx2", flag})
        assert "native" in amp_policy(True, "auto", torch.device("cpu")).reason
    assert amp_policy(True, "fp16", torch.device("cpu")) == (torch.float16, True, "amp fp16 + GradScaler "
                                                                                  "(--amp_dtype=fp16)")
    assert amp_policy(False, "auto", torch.device("cpu")).dtype is None


def test_apple_gpu_fp16_scaler_needs_torch_2_8(monkeypatch):
    mps = torch.device("mps")
    policy = amp_policy(True, "auto", mps)
    assert policy.dtype == torch.float16 and policy.scaler
    monkeypatch.setattr(torch, "__version__", "2.7.1")
    with pytest.raises(UserError, match="needs torch >= 2.8"):  # GradScaler.unscale_ calls .double() on MPS
        make_grad_scaler(policy, mps)
    assert not make_grad_scaler(amp_policy(True, "auto", torch.device("cpu")), torch.device("cpu")).is_enabled()  # bf16


# --- device choice and defaults ------------------------------------------------------------------------------------
def test_apple_gpu_runs_eagerly_and_torchrun_there_uses_the_cpu(monkeypatch):
    fake_mac(monkeypatch)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = from_cli(EXP1, [])
    assert device_kind("auto") == "mps" and cfg.compile is False and cfg.scale == "cpu"
    assert from_cli(EXP1, ["--compile=true"]).compile is True  # the command line still wins
    assert device_kind("auto", distributed=True) == "cpu"  # gloo has no MPS tensors
    assert pick_device("auto", 0, distributed=True) == torch.device("cpu")
    with pytest.raises(UserError, match="gloo has none on MPS"):
        pick_device("mps", 0, distributed=True)


def test_cuda_index_under_torchrun_is_refused_before_any_process_group(monkeypatch):
    fake_gpu(monkeypatch, (7, 5))
    with pytest.raises(UserError, match="every rank on one GPU"):
        pick_device("cuda:1", local_rank=1, distributed=True)
    assert pick_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    assert pick_device("cuda:1") == torch.device("cuda", 1)  # one process: any GPU
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(UserError, match="every rank on one GPU"):
        hardware.compute_init("cuda:0")
    assert not torch.distributed.is_initialized()


def test_gpu_micro_batches_are_large_and_presets_keep_larger_ones():
    assert apply_device_defaults(EXP1, "cuda").chunk_points == 1 << 17
    assert apply_device_defaults(replace(EXP1, chunk_points=1 << 20), "cuda").chunk_points == 1 << 20
    assert apply_device_defaults(EXP1, "cpu") == EXP1
    assert from_cli(EXP1, ["--device=cuda", "--chunk_points=4096"]).chunk_points == 4096


def test_tf32_on_cuda_only_and_switchable():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        configure_backends(torch.device("cpu"), tf32=True)
        assert torch.get_float32_matmul_precision() == "highest"  # the CPU is left as it is
        configure_backends(CUDA0, tf32=True)
        assert torch.get_float32_matmul_precision() == "high"
        configure_backends(CUDA0, tf32=False)
        assert torch.get_float32_matmul_precision() == "highest"
    finally:
        torch.set_float32_matmul_precision(before)
    assert from_cli(EXP1, ["--tf32=false"]).tf32 is False


def test_collective_timeout_outlasts_a_cold_compile(monkeypatch):
    monkeypatch.delenv("NERF_DIST_TIMEOUT_S", raising=False)
    assert hardware.dist_timeout_s() >= 1800
    monkeypatch.setenv("NERF_DIST_TIMEOUT_S", "60")
    assert hardware.dist_timeout_s() == 60


# --- BitNeRF's integer product: the probe, the fallback, and one arithmetic for every path -----------------------
def test_int8_probes_fall_back_when_a_kernel_raises(monkeypatch):
    """A kernel that raises (or differs from the exact product) is never used: the next one, then the float
    product, which BitNeRF trains with."""
    cpu_kernels.enabled()  # built (or not) for this machine's own flags before they are faked
    monkeypatch.setattr(ternary_kernels, "cpu_flags", lambda: frozenset({"amx_int8"}))
    monkeypatch.delenv("NERF_INT_MM", raising=False)
    probe_product.cache_clear()
    try:
        assert probe_product("int_mm", "cpu")  # the real kernels run here and are exact
        assert ternary_kernels.decide_integer_product(torch.device("cpu"))[0] in ("onednn", "int_mm")

        def broken(*args):
            raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")  # what an old CUDA build says on sm_75

        probe_product.cache_clear()
        monkeypatch.setattr(ternary_kernels, "onednn_int8_mm", broken)
        product, why = ternary_kernels.decide_integer_product(torch.device("cpu"))
        assert product == "int_mm" and "oneDNN int8 matmul failed its probe" in why

        probe_product.cache_clear()
        monkeypatch.setattr(torch, "_int_mm", broken)
        product, why = ternary_kernels.decide_integer_product(torch.device("cpu"))
        assert product == "float" and "torch._int_mm failed its probe" in why
        monkeypatch.setattr(ternary_kernels, "_INT_MM", {"cpu": product})
        field = quantize_bitnet(BitNeRF(n_freqs=3, width=64, depth=3, skip_layer=1))
        field(torch.randn(64, 3)).sum().backward()
        assert field.hidden[0].linear.ternary()[0].dtype == torch.float32
    finally:
        probe_product.cache_clear()


def test_a_kernel_that_falls_back_to_slow_code_is_not_chosen(monkeypatch):
    """The timing guard: oneDNN's kernel comes first where the CPU has AMX, unless it runs 10x slower than the
    fastest exact product (what a reference-kernel fallback does); within the margin the order decides."""
    calls = []

    def slow(a, b, packed=None):
        calls.append(1)
        time.sleep(0.6)
        return a.float() @ b.float().t()

    monkeypatch.setattr(ternary_kernels, "onednn_int8_mm", slow)
    product, why = ternary_kernels.fast_product(["onednn", "int_mm", "float"])
    assert product == "int_mm" and len(calls) == 1 and "onednn" in why  # timed once: over 0.5 s
    assert ternary_kernels.fast_product(["int_mm", "float"])[0] == "int_mm"  # the preferred one, fast enough


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, "float"), ({"avx2", "avx512_vnni"}, "int_mm"),
                                             ({"avx2", "amx_int8"}, "onednn"), ({"avx_vnni"}, "int_mm")])
def test_cpu_int8_kernel_only_where_the_cpu_has_int8_units(monkeypatch, flags, expected):
    monkeypatch.setattr(ternary_kernels, "cpu_flags", lambda: frozenset(flags))
    # the timing is tested above; here every kernel is as fast (a faked AMX flag would time oneDNN's slow fallback)
    monkeypatch.setattr(ternary_kernels, "fast_product", lambda products: (products[0], "timed"))
    monkeypatch.delenv("NERF_INT_MM", raising=False)
    onednn = probe_product("onednn", "cpu")
    if expected == "onednn" and not onednn:  # oneDNN's only where its probe passes
        expected = "int_mm"
    assert ternary_kernels.decide_integer_product(torch.device("cpu"))[0] == expected
    for mode, product in (("off", "float"), ("on", "int_mm"), ("onednn", "onednn" if onednn else "float")):
        monkeypatch.setenv("NERF_INT_MM", mode)  # forced, to compare
        assert ternary_kernels.decide_integer_product(torch.device("cpu"))[0] == product
    monkeypatch.setenv("NERF_INT_MM", "maybe")
    with pytest.raises(UserError, match="not auto, onednn, on or off"):
        ternary_kernels.decide_integer_product(torch.device("cpu"))


def _forward_and_grads(field: torch.nn.Module, x: torch.Tensor):
    field.zero_grad()
    out = field(x)
    out.square().sum().backward()
    return out.detach(), {k: p.grad.clone() for k, p in field.named_parameters()}


@pytest.mark.parametrize("size", [dict(n_freqs=3, width=64, depth=3, skip_layer=1),
                                  dict(n_freqs=4, width=40, depth=2, skip_layer=1)])  # K, N not multiples of 8
def test_int_mm_and_float_products_give_the_same_bits(monkeypatch, size):
    """The choice of kernel changes speed, never a result: forward and gradients bit for bit."""
    torch.manual_seed(0)
    field = quantize_bitnet(BitNeRF(**size))
    x = torch.randn(512, 3)
    results = {}
    for product in ternary_kernels.PRODUCTS:
        monkeypatch.setattr(ternary_kernels, "_INT_MM", {"cpu": product})
        assert (field.hidden[0].linear.ternary()[0].dtype == torch.int8) is (product != "float")  # the path taken
        results[product] = _forward_and_grads(field, x)
    for product in ("onednn", "int_mm"):
        assert torch.equal(results["float"][0], results[product][0]), product
        for name in results["float"][1]:
            assert torch.equal(results["float"][1][name], results[product][1][name]), (product, name)


def test_ternary_inference_layer_same_bits_on_either_product(monkeypatch):
    torch.manual_seed(1)
    layer = TernaryLinear(64, 32)
    layer.ternary.copy_(torch.randint(-1, 2, (32, 64), dtype=torch.int8))
    layer.scale.fill_(0.037)
    layer.bias.normal_()
    x = torch.randn(100, 64)
    outputs = []
    for product in ternary_kernels.PRODUCTS:
        monkeypatch.setattr(ternary_kernels, "_INT_MM", {"cpu": product})
        outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_scaling_under_bf16_autocast_is_float32_as_torchao_kernel():
    """torchao's scaled_int8_mm (CUDA): int32 accumulator -> fp32, * row scale, * column scale, one rounding to
    the output dtype (then + bias). Here 12345 is not a bf16 number (8-bit mantissa: 12352): scaling the int32
    tensor by a bf16 scale directly rounds it first and lands on another bf16 value."""
    acc = torch.tensor([[12345, -771, 3]], dtype=torch.int32)
    row = torch.tensor([[0.0123]], dtype=torch.bfloat16)
    scale = torch.tensor(0.713, dtype=torch.bfloat16)
    bias = torch.tensor([0.5, -0.25, 0.125])
    torchao_kernel = (acc.float() * row.float() * scale.float()).to(torch.bfloat16) + bias.to(torch.bfloat16)
    got = scale_and_bias(acc.clone(), scale, row, bias, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, torchao_kernel)
    rounded_first = acc * scale.view(-1) * row + bias.to(torch.bfloat16)  # the accumulator in bf16
    assert not torch.equal(rounded_first, torchao_kernel)
    # the float product of the same integers gives the same bits
    assert torch.equal(scale_and_bias(acc.float(), scale, row, bias, torch.bfloat16), torchao_kernel)


# --- the step on a GPU: no host sync per micro-batch, no float64 on the device ---------------------------------------
class SyncCounter:
    """Counts the calls that make a GPU wait for the host: .item(), .tolist(), int()/float()/bool() of a tensor."""

    NAMES = ("item", "tolist", "__int__", "__float__", "__bool__", "__index__")

    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in self.NAMES:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counting(name, original))

    def _counting(self, name, original):
        def wrapper(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)

        return wrapper


def test_a_boolean_mask_as_an_index_is_seen_as_a_sync():
    """The counter (gpu_check's) itself: what a step must not do is caught (and a gather by positions is not)."""
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with SyncingOps() as mode:
        x.index_select(0, torch.tensor([0, 2, 4]))
        x.sum()
    assert mode.ops == []
    with SyncingOps() as mode:
        x[mask]
        torch.zeros(6).index_put((mask,), x[:3])
        mask.nonzero()
        bool(x.sum() > 0)
    assert len(mode.ops) >= 4, mode.ops


@pytest.mark.parametrize("viewdirs", [False, True])
def test_a_skipping_step_syncs_with_the_host_once_however_many_micro_batches(tiny_cfg, monkeypatch, viewdirs):
    """One .tolist() (the micro-batch plan) and no syncing aten op in a whole step, forward and backward: on a
    GPU each one idles the device (a boolean mask as an index was one per micro-batch, twice forward, once back)."""
    cfg = replace(tiny_cfg, chunk_points=512, batch_size=512, viewdirs=viewdirs, occ_update_every=1000)
    train_views, _ = split_views(load_views(cfg.data), cfg.val_views)
    raw = build_renderer(cfg, torch.device("cpu"))
    trainer = Trainer(cfg, raw, Dist(), torch.device("cpu"))
    batcher = RayBatcher(train_views, cfg.batch_unit, cfg.batch_size, cfg.seed)
    rays_o, rays_d, target = batcher.batch(0)
    raw.update_sampler(0, step_generator(cfg.seed, 0, 0, torch.device("cpu")))  # the grid's refresh: not a step
    trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, 0, 0, torch.device("cpu")), cfg.lr)  # warm up
    parts, _ = trainer.micro_batches(raw.sampler.sample(rays_o, rays_d, None))
    assert len(parts) >= 4  # 512 rays x 16 samples in chunks of 512 points
    rays_o, rays_d, target = batcher.batch(1)
    background, see_through = batcher.background(1)
    counter = SyncCounter(monkeypatch)
    with SyncingOps() as mode:
        trainer.step(rays_o, rays_d, target, step_generator(cfg.seed, 0, 1, torch.device("cpu")), cfg.lr,
                     background, see_through)
    assert counter.calls == ["tolist"], counter.calls
    assert mode.ops == [], mode.ops


def test_micro_batches_carry_the_positions_of_exactly_their_occupied_samples(tiny_cfg):
    """Samples.kept of each slice lists the flat positions of its keep mask's true entries, in order, and the
    slices tile the rays; hand-made mask: 5 rays of 4 samples, chunks of 3 points."""
    cfg = replace(tiny_cfg, chunk_points=3, n_samples=4)
    trainer = Trainer(cfg, build_renderer(cfg, torch.device("cpu")), Dist(), torch.device("cpu"))
    keep = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 1]], dtype=torch.bool)
    t = torch.zeros(5, 4)
    parts, total = trainer.micro_batches(Samples(t, t, keep))
    assert total == 9
    # running counts 2, 2, 6, 8, 9 -> chunk of each ray's last point 0, 0, 1, 2, 2: slices [0, 2), [2, 3), [3, 5)
    assert [(s.start, s.stop) for s, _ in parts] == [(0, 2), (2, 3), (3, 5)]
    for s, part in parts:
        assert torch.equal(part.kept, part.keep.reshape(-1).nonzero().squeeze(1))
        assert torch.equal(part.keep, keep[s])


class Float64Moves(TorchFunctionMode):
    """Records every Tensor.to() of a float64 tensor that names a device: an Apple GPU has no float64."""

    def __init__(self):
        super().__init__()
        self.moves = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to and args[0].dtype == torch.float64:
            targets = list(args[1:]) + list(kwargs.values())
            if any(isinstance(t, (torch.device, str)) and str(t) not in ("torch.float32",) for t in targets):
                self.moves.append(targets)
        return func(*args, **kwargs)


def test_validation_keeps_float64_off_the_device(tiny_cfg):
    views, val = split_views(load_views(tiny_cfg.data), tiny_cfg.val_views)
    raw = build_renderer(tiny_cfg, torch.device("cpu"))
    with Float64Moves() as mode:
        psnr, _ = evaluate_views(raw, val, Dist(), chunk_rays=4096)
    assert mode.moves == [] and psnr > 0


# --- fp16: steps the GradScaler skips are counted; a run that skips them all is never saved -----------------------
def test_fp16_run_whose_every_step_overflows_is_refused_not_checkpointed(tiny_cfg, monkeypatch):
    cfg = replace(tiny_cfg, amp=True, amp_dtype="fp16", steps=6, ckpt_every=3)
    # an overflow in the loss's graph: inf gradients at every loss scale, so the scaler skips every step
    monkeypatch.setattr(Trainer, "background_penalty", lambda self, acc, target, n: acc.float().sum() * 1e38 * 1e38)
    with pytest.raises(UserError, match="fp16 overflow: the GradScaler skipped all 3 steps up to step 3"):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.run_dir, "ckpt.pt"))


def test_fp16_run_logs_its_skipped_steps(tiny_cfg):
    import json

    cfg = replace(tiny_cfg, amp=True, amp_dtype="fp16", steps=4)
    summary = train(cfg)
    with open(os.path.join(cfg.run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if '"loss"' in line]
    assert summary["amp"] == "float16" and all("skipped_steps" in r for r in records)
    assert all(0 <= r["skipped_steps"] < r["step"] for r in records)  # some steps trained


@pytest.mark.skipif(not (sys.platform == "linux" and platform.libc_ver()[0] == "glibc"), reason="glibc's malloc")
def test_cpu_runs_keep_freed_memory_for_reuse():
    """An 8 MB activation comes from malloc's heap, not a fresh mmap whose every page faults on first touch."""
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                          "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL(None)
    if not hasattr(libc, "mallinfo2"):  # glibc < 2.33
        pytest.skip("no mallinfo2 to read the heap with")
    libc.mallinfo2.restype = Mallinfo2
    configure_backends(torch.device("cpu"), tf32=True)
    assert hardware.keep_freed_memory()
    mapped = libc.mallinfo2().hblkhd  # bytes in mmap'd blocks
    x = torch.empty(2 << 20)
    assert libc.mallinfo2().hblkhd == mapped and x.numel() == 2 << 20


@pytest.mark.skipif(not probe_product("onednn", "cpu"), reason="oneDNN's int8 matmul is not usable here")
def test_onednn_product_follows_a_weight_changed_in_place():
    """The packed copy of a ternary weight is looked up by content: a weight updated in place (as the fused
    AdamW step does, without a version bump) gets a fresh layout, never a stale one."""
    from ternary_kernels import ternary_mm_onednn

    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-128, 128, (40, 24), generator=gen, dtype=torch.int8)
    ternary = torch.randint(-1, 2, (16, 24), generator=gen, dtype=torch.int8)
    for _ in range(2):
        for _ in range(2):  # the second call reuses the packed layout
            assert torch.equal(ternary_mm_onednn(a, ternary).double(), a.double() @ ternary.double().t())
        ternary.neg_()


def test_the_runs_line_names_the_product_in_use(monkeypatch):
    monkeypatch.setattr(ternary_kernels, "_INT_MM", {})
    monkeypatch.setattr(ternary_kernels, "_INT_MM_WHY", {})
    cpu = torch.device("cpu")
    line = ternary_kernels.integer_matmul_line(cpu)
    decided = ternary_kernels._INT_MM["cpu"]
    assert line.startswith(f"BitNeRF integer product: {ternary_kernels.PRODUCT_NAMES[decided]} (")
    other = "float" if decided != "float" else "int_mm"
    monkeypatch.setitem(ternary_kernels._INT_MM, "cpu", other)  # a later choice gets its own name, not stale reasons
    expected = f"BitNeRF integer product: {ternary_kernels.PRODUCT_NAMES[other]}"
    assert ternary_kernels.integer_matmul_line(cpu) == expected


def test_the_runs_line_names_the_backward_precision(monkeypatch):
    cpu = torch.device("cpu")
    assert hardware.bitnet_grad_line("fp32", cpu) == ("BitNeRF backward matmuls: float32 (torchao's "
                                                     "straight-through estimator)")
    for native, how in ((True, "on this device's bf16 units"), (False, "no bf16 units here")):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: native)
        line = hardware.bitnet_grad_line("bf16", cpu)
        assert line.startswith("BitNeRF backward matmuls: bf16 inputs, float32 sums (" + how), line
    # auto: bf16 only on a CPU with the units; CUDA and MPS keep the float32 backward, bf16 is asked for by name
    for name in ("cuda", "mps"):
        assert not hardware.bitnet_bf16_grads("auto", torch.device(name))
        assert hardware.bitnet_bf16_grads("bf16", torch.device(name))
    assert hardware.bitnet_grad_line("auto", cpu).startswith("BitNeRF backward matmuls: auto: float32")
    monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: True)
    assert hardware.bitnet_grad_line("auto", cpu).startswith("BitNeRF backward matmuls: auto: bf16 inputs")
