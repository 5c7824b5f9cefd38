"""Packed ternary export (export.py, bitnerf_packed.py's inference field): packing, integer matmul, the file format's
integrity checks, and that an exported BitNeRF renders what the QAT model renders."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import numpy as np
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from bitnerf import BitNeRF, Quantization
from bitnerf_format import is_bitnerf_file, pack_ternary, read_bitnerf, unpack_ternary, write_bitnerf
from bitnerf_packed import TernaryLinear, ternary_state_dict
from configs import EXP1, EXP4, EXP7
from dataset import load_views, split_views, train_val_views
import assembly
from assembly import load_trained
from export import main
from nerf import NeRF
from cameras import pose_spherical
from renderer import get_rays, render_image
from ternary_kernels import ternary_matmul
from train import train
from utils import UserError, atomic_torch_save, psnr

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_ARCH = dict(n_freqs=2, width=16, depth=3, skip_layer=1)


# --- packing ---------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), cols=st.one_of(st.sampled_from([1, 3, 5, 7, 255]), st.integers(1, 300)),
       packing=st.sampled_from(["base3", "2bit"]), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip_is_exact(rows, cols, packing, seed):
    values = torch.randint(-1, 2, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_ternary(values, packing)
    per_byte = 5 if packing == "base3" else 4
    assert packed.dtype == torch.uint8 and packed.numel() == -(-rows * cols // per_byte)
    assert torch.equal(unpack_ternary(packed, rows * cols, packing).view(rows, cols), values)


def test_pack_hand_computed_bytes():
    # digits t + 1, least significant first: base 3: 0 + 1*3 + 2*9 + 2*27 + 1*81 = 156; then [2] padded -> 2
    assert pack_ternary(torch.tensor([-1, 0, 1, 1, 0, 1], dtype=torch.int8)).tolist() == [156, 2]
    # 2 bits: 2 + 0*4 + 1*16 + 2*64 = 146
    assert pack_ternary(torch.tensor([1, -1, 0, 1], dtype=torch.int8), "2bit").tolist() == [146]


def test_pack_and_unpack_reject_non_ternary():
    with pytest.raises(ValueError):
        pack_ternary(torch.tensor([0, 2], dtype=torch.int8))
    for packed, n, packing in [([243], 5, "base3"), ([3], 1, "2bit"), ([0b11000000], 4, "2bit"),
                               ([2 + 3 * 1], 1, "base3"),  # a non-zero padding digit
                               ([1, 1], 3, "base3")]:  # wrong byte count
        with pytest.raises(ValueError):
            unpack_ternary(torch.tensor(packed, dtype=torch.uint8), n, packing)


# --- arithmetic ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m,k,n", [(1, 3, 5), (17, 8, 8), (40, 360, 24)])
def test_ternary_matmul_is_exact(m, k, n):
    gen = torch.Generator().manual_seed(m + k + n)
    x = torch.randint(-127, 128, (m, k), generator=gen, dtype=torch.int8)
    w = torch.randint(-1, 2, (n, k), generator=gen, dtype=torch.int8)
    assert torch.equal(ternary_matmul(x, w).long(), x.long() @ w.T.long())


def _qat_linear(in_features: int, out_features: int, seed: int) -> torch.nn.Linear:
    """A Linear with torchao's BitNet training weight, computing as torchao's CUDA kernel does (the reference
    both integer products of this project follow: float32 accumulator * row scale * weight scale)."""
    from torchao_reference import torchao_bitnet_linear

    torch.manual_seed(seed)
    return torchao_bitnet_linear(torch.nn.Linear(in_features, out_features))


@pytest.mark.parametrize("in_features,out_features,rows", [(40, 24, 50), (7, 3, 2)])
def test_int8_mode_equals_torchao_bitnet_forward_bitwise(in_features, out_features, rows):
    qat = _qat_linear(in_features, out_features, seed=rows)
    state = ternary_state_dict({"hidden.0.1.weight": qat.weight._data, "hidden.0.1.bias": qat.bias}, depth=1)
    layer = TernaryLinear(in_features, out_features)
    layer.load_state_dict({k.removeprefix("hidden.0.1."): v for k, v in state.items()})
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(0))
    x[0] = -x[0].abs()  # the row maximum |x| is negative: quantizes to -127
    if rows > 3:  # an all-zero row, a row below the scale's clip (1e-5 * 127), a huge row
        x[1], x[2], x[3] = 0.0, x[2] * 1e-7, x[3] * 1e6
    with torch.no_grad():
        assert torch.equal(layer(x), qat(x))


@pytest.mark.parametrize("per_channel", [False, True])
def test_float_activations_match_float64_reference(per_channel):
    # bitnet_act=float: x @ (ternary * scale).T + bias, no rounding of x
    layer = TernaryLinear(6, 4, Quantization(per_channel=per_channel, int8_activations=False))
    gen = torch.Generator().manual_seed(3)
    layer.ternary.copy_(torch.randint(-1, 2, (4, 6), generator=gen))
    scale = torch.tensor([0.37, 0.5, 1.25, 2.0]) if per_channel else torch.tensor(0.37)
    layer.scale.copy_(scale)
    layer.bias.copy_(torch.randn(4, generator=gen))
    x = torch.randn(5, 6, generator=gen)
    weight = layer.ternary.double() * (scale.double().view(-1, 1) if per_channel else scale.double())
    expected = x.double() @ weight.T + layer.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-6, atol=1e-6)


def test_per_channel_int8_layer_matches_float64_reference():
    # int8 activations, a scale per output row: (round(x * 127 / max|x|) @ ternary.T) * max|x| / 127 * scale + b
    layer = TernaryLinear(8, 3, Quantization(per_channel=True))
    gen = torch.Generator().manual_seed(4)
    layer.ternary.copy_(torch.randint(-1, 2, (3, 8), generator=gen))
    layer.scale.copy_(torch.tensor([0.25, 1.0, 3.0]))
    layer.bias.copy_(torch.randn(3, generator=gen))
    x = torch.randn(40, 8, generator=gen)
    row = x.double().abs().amax(1, keepdim=True) / 127
    expected = (x.double() / row).round() @ layer.ternary.double().T * row * torch.tensor([0.25, 1.0, 3.0]).double()
    torch.testing.assert_close(layer(x).double(), expected + layer.bias.double(), rtol=1e-5, atol=1e-5)


# --- the file ------------------------------------------------------------------------------------------------------
def _tiny_file(path, floats="float32", packing="base3", bitnet_norm=True, viewdirs=False):
    torch.manual_seed(0)
    field = BitNeRF(**TINY_ARCH, norm=bitnet_norm, viewdirs=viewdirs)
    cfg = replace(EXP4, model="bitnerf", bitnet_norm=bitnet_norm, viewdirs=viewdirs, **TINY_ARCH)
    state = ternary_state_dict(field.state_dict(), cfg.depth, bitnet_norm, viewdirs)
    write_bitnerf(str(path), state, cfg, packing, floats)
    return state


@pytest.mark.parametrize("packing", ["base3", "2bit"])
def test_file_round_trip(tmp_path, packing):
    path = tmp_path / "m.bitnerf"
    state = _tiny_file(path, packing=packing)
    cfg, loaded, header = read_bitnerf(str(path))
    assert (cfg.width, cfg.depth, cfg.model) == (16, 3, "bitnerf")
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name
    assert header["tensors"]["hidden.0.1.ternary"]["encoding"] == f"ternary-{packing}"
    assert is_bitnerf_file(str(path))


def test_file_without_norm_round_trips_and_loads_without_rmsnorm(tmp_path):
    path = tmp_path / "m.bitnerf"
    state = _tiny_file(path, bitnet_norm=False)
    assert "hidden.0.ternary" in state and not any(".0.weight" in k and k.startswith("hidden") for k in state)
    cfg, loaded, _ = read_bitnerf(str(path))
    assert cfg.bitnet_norm is False and all(torch.equal(loaded[k], v) for k, v in state.items())
    renderer, _ = load_trained(str(path))
    assert all(isinstance(layer, TernaryLinear) for layer in renderer.field.hidden)
    assert not any(isinstance(m, torch.nn.RMSNorm) for m in renderer.field.modules())


@pytest.mark.parametrize("bitnet_norm", [True, False])
def test_viewdirs_file_packs_the_direction_branch_and_loads_as_the_qat_field(tmp_path, bitnet_norm):
    """The direction branch's feature and direction layers are stored ternary like the hidden ones, its density
    and RGB heads as floats; the loaded field computes the QAT field's forward bit for bit (float32 storage),
    and renders as it does."""
    path = tmp_path / "m.bitnerf"
    state = _tiny_file(path, bitnet_norm=bitnet_norm, viewdirs=True)
    cfg, loaded, header = read_bitnerf(str(path))
    assert cfg.viewdirs and all(torch.equal(loaded[k], v) for k, v in state.items())
    encodings = {name: entry["encoding"] for name, entry in header["tensors"].items()}
    ternary = [name for name, kind in encodings.items() if kind.startswith("ternary-")]
    layers = [f"hidden.{i}" for i in range(TINY_ARCH["depth"])] + ["feature", "view"]
    assert ternary == [f"{layer}{'.1' if bitnet_norm else ''}.ternary" for layer in layers]
    assert encodings["sigma.weight"] == encodings["rgb.weight"] == "float32"
    assert main(["--info", str(path)]) == 0
    exported, _ = load_trained(str(path))
    assert isinstance(exported.field.view[1] if bitnet_norm else exported.field.view, TernaryLinear)
    torch.manual_seed(0)  # _tiny_file's weights
    qat = assembly.build_renderer(replace(cfg, skip=False), torch.device("cpu"),
                                  BitNeRF(**TINY_ARCH, norm=bitnet_norm, viewdirs=True).state_dict()).eval()
    gen = torch.Generator().manual_seed(1)
    points, dirs = torch.randn(64, 3, generator=gen), F.normalize(torch.randn(64, 3, generator=gen), dim=-1)
    assert torch.equal(exported.field(points, dirs), qat.field(points, dirs))
    rays_o, rays_d = get_rays(20, 20, 25.0, pose_spherical(30.0, -30.0, 4.0))
    assert torch.equal(render_image(exported, rays_o, rays_d, 128).rgb, render_image(qat, rays_o, rays_d, 128).rgb)


def _assert_refused(path, capsys, words):
    with pytest.raises(UserError, match=words):
        read_bitnerf(str(path))
    assert main(["--info", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err


def test_flipped_byte_anywhere_is_refused(tmp_path, capsys):
    path = tmp_path / "m.bitnerf"
    _tiny_file(path)
    blob = path.read_bytes()
    assert main(["--info", str(path)]) == 0 and "ok" in capsys.readouterr().out
    for at in (12, 20, len(blob) // 2, len(blob) - 40, len(blob) - 1):  # version, header, payload, digest
        bad = bytearray(blob)
        bad[at] ^= 0x10
        path.write_bytes(bytes(bad))
        _assert_refused(path, capsys, "checksum mismatch")
    bad = bytearray(blob)
    bad[0] ^= 0x01
    path.write_bytes(bytes(bad))
    _assert_refused(path, capsys, "not a .bitnerf")


def test_truncated_file_is_refused(tmp_path, capsys):
    path = tmp_path / "m.bitnerf"
    _tiny_file(path)
    blob = path.read_bytes()
    for keep in (len(blob) - 1, len(blob) // 2, 20):
        path.write_bytes(blob[:keep])
        _assert_refused(path, capsys, "truncated")
        with pytest.raises(UserError):
            load_trained(str(path))


def test_plain_nerf_checkpoint_is_refused(tmp_path, capsys):
    cfg = replace(EXP1, **TINY_ARCH)
    ckpt = tmp_path / "ckpt.pt"
    atomic_torch_save({"model": NeRF(**TINY_ARCH).state_dict(), "config": cfg.to_dict()}, str(ckpt))
    assert main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.bitnerf")]) == 2
    err = capsys.readouterr().err
    assert "only BitNeRF" in err and err.count("\n") == 1
    assert not (tmp_path / "m.bitnerf").exists()


@pytest.mark.parametrize("preset", [EXP4, EXP7], ids=lambda p: p.name)
def test_bitnerf_file_with_its_grid_is_at_least_12x_smaller(tmp_path, preset):
    """exp4's field (8x256, L=16; exp7's 8x512) and its 128^3 occupancy grid in <= 1/12 of the field's float32
    weight bytes. The grid here is a ball (8% of the cells), as compact as a real scene's: lego's carved 128^3 grid
    compresses from 262,144 bytes of bits to ~8.5 KB. The grid comes back bit for bit."""
    from bitnerf_format import OCCUPIED_KEY, read_bitnerf

    torch.manual_seed(0)
    field = BitNeRF(preset.n_freqs, preset.width, preset.depth, preset.skip_layer)
    float_bytes = sum(v.numel() * 4 for v in field.state_dict().values())
    state = ternary_state_dict(field.state_dict(), preset.depth)
    r = preset.occ_resolution
    centres = (torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1) + 0.5) / r * 3 - 1.5
    state[OCCUPIED_KEY] = (centres.norm(dim=-1) < 0.8).reshape(-1)
    size = write_bitnerf(str(tmp_path / "m.bitnerf"), state, preset)
    assert size * 12 <= float_bytes, (size, float_bytes)
    _, loaded, header = read_bitnerf(str(tmp_path / "m.bitnerf"))
    assert torch.equal(loaded[OCCUPIED_KEY], state[OCCUPIED_KEY])
    assert header["tensors"][OCCUPIED_KEY]["nbytes"] < r**3 // 8 // 20  # compressed


def test_uncompressed_grid_bits_still_read():
    from bitnerf_format import _decode

    cells = torch.tensor([True, False, False, True, True, False, True, False, True, True])
    data = np.packbits(cells.numpy()).tobytes()
    assert torch.equal(_decode({"encoding": "bits", "shape": [10]}, data), cells)


# --- export of a trained model -----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("viewdirs", [False, True])
@pytest.mark.parametrize("bitnet_norm", [True, False])
def test_exported_model_renders_like_the_qat_model(tiny_cfg, tmp_path, bitnet_norm, viewdirs):
    cfg = replace(tiny_cfg, model="bitnerf", steps=2, log_every=10, bitnet_norm=bitnet_norm, viewdirs=viewdirs)
    train(cfg)
    ckpt = os.path.join(cfg.run_dir, "ckpt.pt")
    qat, _ = load_trained(ckpt)
    _, val = split_views(load_views(cfg.data), cfg.val_views)
    for floats in ("float16", "float32"):
        out = str(tmp_path / f"{floats}.bitnerf")
        assert main(["--ckpt", ckpt, "--out", out, "--floats", floats]) == 0
        exported, saved = load_trained(out)  # a .bitnerf path goes through the export loader
        quantized = [exported.field.hidden[0]] + ([exported.field.feature, exported.field.view] if viewdirs else [])
        assert saved == train_val_views(cfg)[0] and all(isinstance(layer[1] if bitnet_norm else layer, TernaryLinear)
                                    for layer in quantized)
        assert any(isinstance(m, torch.nn.RMSNorm) for m in exported.field.modules()) == bitnet_norm
        for i in range(len(val)):
            rays_o, rays_d = get_rays(val.height, val.width, val.focal, val.poses[i])
            a = render_image(qat, rays_o, rays_d, 256).rgb
            b = render_image(exported, rays_o, rays_d, 256).rgb
            assert psnr(a, b) >= 40.0, (floats, i)
            if floats == "float32":  # the same arithmetic as training's forward
                assert torch.equal(a, b)


# each BitNeRF recipe's export computes what its QAT model computes: the same bits in float32
@pytest.mark.slow
@pytest.mark.parametrize("recipe", [dict(bitnet_scale="median"), dict(bitnet_scale_per="channel"),
                                    dict(bitnet_act="float"), dict(bitnet_qat_from=0.5, bitnet_scale="median",
                                                                   bitnet_scale_per="channel")])
def test_exported_recipe_renders_like_its_qat_model(tiny_cfg, tmp_path, recipe):
    cfg = replace(tiny_cfg, model="bitnerf", steps=4, log_every=10, **recipe)
    train(cfg)
    ckpt = os.path.join(cfg.run_dir, "ckpt.pt")
    out = str(tmp_path / "m.bitnerf")
    assert main(["--ckpt", ckpt, "--out", out, "--floats", "float32"]) == 0
    qat, exported = load_trained(ckpt)[0], load_trained(out)[0]
    per_channel = recipe.get("bitnet_scale_per") == "channel"
    assert exported.field.hidden[0][1].scale.shape == ((cfg.width,) if per_channel else ())
    _, val = split_views(load_views(cfg.data), cfg.val_views)
    rays_o, rays_d = get_rays(val.height, val.width, val.focal, val.poses[0])
    assert torch.equal(render_image(qat, rays_o, rays_d, 256).rgb, render_image(exported, rays_o, rays_d, 256).rgb)


@pytest.mark.slow
def test_cli_exit_code_and_one_line_error(tmp_path):
    path = tmp_path / "m.bitnerf"
    path.write_bytes(b"BITNERF\x00 not really")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), "--info", str(path)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: ") and "checksum" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,in_features,out_features", [(64, 40, 24), (5, 40, 24), (64, 7, 3)])
def test_cuda_int8_layer_matches_cpu(rows, in_features, out_features):
    """CUDA: torch._int_mm where its shape rules hold (first case), the exact float path otherwise."""
    layer = TernaryLinear(in_features, out_features)
    gen = torch.Generator().manual_seed(rows)
    layer.ternary.copy_(torch.randint(-1, 2, (out_features, in_features), generator=gen))
    layer.scale.fill_(0.05)
    layer.bias.copy_(torch.randn(out_features, generator=gen))
    x = torch.randn(rows, in_features, generator=gen)
    torch.testing.assert_close(layer.cuda()(x.cuda()).cpu(), layer.cpu()(x), rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("viewdirs", [False, True])
def test_cuda_exported_render_matches_cpu(tmp_path, viewdirs):
    path = str(tmp_path / "m.bitnerf")
    _tiny_file(path, viewdirs=viewdirs)
    rays_o, rays_d = get_rays(20, 20, 25.0, pose_spherical(30.0, -30.0, 4.0))
    cpu, _ = load_trained(path)
    gpu, _ = load_trained(path, "cuda")
    a = render_image(cpu, rays_o, rays_d, 128).rgb
    b = render_image(gpu, rays_o.cuda(), rays_d.cuda(), 128).rgb.cpu()
    assert psnr(a, b) >= 60.0
