"""Export a trained BitNeRF as real packed ternary weights: a small, self-describing, pickle-free `.bitnerf` file.

    python export.py --ckpt RUN/ckpt.pt [--out RUN/model.bitnerf] [--packing=base3|2bit] [--floats=float16|float32]
    python export.py --info model.bitnerf      # verify the file and describe it

File layout (all integers little-endian):
    MAGIC (8 bytes) | format version (uint32) | header length H (uint32) | header: H bytes of UTF-8 JSON |
    payload: raw tensor bytes | SHA-256 of every byte before it (32 bytes)
The header holds the training config and, per tensor, its encoding, shape and (offset, nbytes) in the payload.
Encodings: "float16"/"float32" (little-endian IEEE) and "ternary-base3"/"ternary-2bit" (bitnerf.pack_ternary).
Hidden Linear weights are ternary (each with its fp32 absmean scale); everything else (input and output layers,
biases, RMSNorm weights) stays float. Loading it (`load_exported`, or train.load_trained on a .bitnerf path) gives
a renderer around bitnerf.ternary_field.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys

import numpy as np
import torch

from configs import Config, ConfigError, config_from_dict
from utils import ArgParser, UserError, atomic_write, load_checkpoint, run_cli

MAGIC = b"BITNERF\x00"
VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_DIGEST = 32
_FLOATS = {"float16": ("<f2", torch.float16), "float32": ("<f4", torch.float32)}


# --- encoding tensors ----------------------------------------------------------------------------------------------
def _encode(name: str, tensor: torch.Tensor, packing: str, floats: str) -> tuple[str, bytes]:
    from bitnerf import pack_ternary

    if tensor.dtype == torch.int8:
        return f"ternary-{packing}", pack_ternary(tensor, packing).numpy().tobytes()
    # the per-layer scales stay fp32: they multiply every output of their layer and cost 4 bytes each
    kind = "float32" if name.endswith(".scale") else floats
    return kind, tensor.detach().float().cpu().numpy().astype(_FLOATS[kind][0]).tobytes()


def _decode(entry: dict, data: bytes) -> torch.Tensor:
    from bitnerf import unpack_ternary

    kind, shape = entry["encoding"], tuple(entry["shape"])
    if kind in _FLOATS:
        array = np.frombuffer(data, dtype=_FLOATS[kind][0])
        return torch.from_numpy(array.astype(np.float32)).reshape(shape)
    if kind.startswith("ternary-"):
        packed = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
        return unpack_ternary(packed, int(np.prod(shape)), kind.removeprefix("ternary-")).reshape(shape)
    raise ValueError(f"unknown tensor encoding {kind!r}")


# --- the file -------------------------------------------------------------------------------------------------------
def write_bitnerf(path: str, state: dict[str, torch.Tensor], cfg: Config, packing: str = "base3",
                  floats: str = "float16") -> int:
    """Write a ternary_field state dict and its config to `path` (atomically). Returns the file size in bytes."""
    entries, chunks, offset = {}, [], 0
    for name, tensor in state.items():
        kind, data = _encode(name, tensor, packing, floats)
        entries[name] = {"encoding": kind, "shape": list(tensor.shape), "offset": offset, "nbytes": len(data)}
        chunks.append(data)
        offset += len(data)
    header = json.dumps({"config": cfg.to_dict(), "tensors": entries}, separators=(",", ":")).encode()
    body = _PREFIX.pack(MAGIC, VERSION, len(header)) + header + b"".join(chunks)
    blob = body + hashlib.sha256(body).digest()

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(blob)

    atomic_write(path, write)
    return len(blob)


def read_bitnerf(path: str) -> tuple[Config, dict[str, torch.Tensor], dict]:
    """Verify and decode a .bitnerf file -> (config, state dict, header). Raises UserError with one line."""
    if not os.path.isfile(path):
        raise UserError(f"model file not found: {path}")
    with open(path, "rb") as f:
        blob = f.read()
    if not blob.startswith(MAGIC):
        raise UserError(f"{path} is not a .bitnerf model file (bad magic bytes)")
    body, digest = blob[:-_DIGEST], blob[-_DIGEST:]
    if len(blob) < _PREFIX.size + _DIGEST or hashlib.sha256(body).digest() != digest:
        raise UserError(f"{path}: checksum mismatch — the file is truncated or corrupted; export it again")
    _, version, header_len = _PREFIX.unpack_from(body)
    if version != VERSION:
        raise UserError(f"{path}: .bitnerf format version {version} is not supported (this code reads {VERSION})")
    try:
        header = json.loads(body[_PREFIX.size:_PREFIX.size + header_len])
        payload = body[_PREFIX.size + header_len:]
        cfg = config_from_dict(header["config"])
        state = {name: _decode(e, payload[e["offset"]:e["offset"] + e["nbytes"]])
                 for name, e in header["tensors"].items()}
    # past the checksum only a writer bug (or a hand-made file) can be malformed
    except (ValueError, KeyError, TypeError, RuntimeError, ConfigError) as err:
        raise UserError(f"{path}: malformed .bitnerf contents ({err})") from None
    return cfg, state, header


def is_bitnerf_file(path: str) -> bool:
    """True for a path ending in .bitnerf or a file that starts with the .bitnerf magic bytes."""
    if path.endswith(".bitnerf"):
        return True
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


# --- export and load ------------------------------------------------------------------------------------------------
def export_checkpoint(ckpt_path: str, out_path: str, packing: str = "base3", floats: str = "float16") -> dict:
    """Training checkpoint of a BitNeRF -> .bitnerf file. Returns sizes for the report."""
    from bitnerf import ternary_state_dict
    from nerf import build_field

    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except (ConfigError, TypeError) as err:
        raise UserError(f"{ckpt_path}: saved config is unreadable ({err})") from None
    if cfg.model != "bitnerf":
        raise UserError(f"{ckpt_path} holds a {cfg.model!r} model; only BitNeRF (model=bitnerf, BitNet QAT) "
                        f"checkpoints have ternary weights to export")
    field = build_field(cfg.model, cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer)
    try:  # checks every name and shape before anything is written
        field.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"{ckpt_path}: weights do not fit its config: {str(err).splitlines()[0]}") from None
    state = ternary_state_dict({k: v.float() for k, v in field.state_dict().items()}, cfg.depth)
    size = write_bitnerf(out_path, state, cfg, packing, floats)
    float_bytes = sum(v.numel() * v.element_size() for v in ckpt["model"].values())
    return {"file_bytes": size, "float_weight_bytes": float_bytes, "ratio": float_bytes / size}


def load_exported(path: str, device: torch.device | str = "cpu", mode: str = "int8"):
    """A .bitnerf file -> (VolumeRenderer around bitnerf.ternary_field in eval mode, Config)."""
    from bitnerf import ternary_field
    from render import VolumeRenderer

    cfg, state, _ = read_bitnerf(path)
    field = ternary_field(cfg.n_freqs, cfg.width, cfg.depth, cfg.skip_layer, mode)
    try:
        field.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"{path}: tensors do not fit its config: {str(err).splitlines()[0]}") from None
    renderer = VolumeRenderer(field, cfg.near, cfg.far, cfg.n_samples, cfg.n_importance)
    return renderer.to(torch.device(device)).eval(), cfg


def describe(path: str) -> str:
    cfg, state, header = read_bitnerf(path)
    kinds: dict[str, int] = {}
    for e in header["tensors"].values():
        kinds[e["encoding"]] = kinds.get(e["encoding"], 0) + e["nbytes"]
    parts = ", ".join(f"{k} {v:,} B" for k, v in sorted(kinds.items()))
    return (f"{path}: ok (sha256 verified), {os.path.getsize(path):,} bytes, {cfg.model} {cfg.depth}x{cfg.width} "
            f"L={cfg.n_freqs}, {len(state)} tensors ({parts})")


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The command line; a bad file, checkpoint or flag is one `error: ...` line and exit code 2."""
    parser = ArgParser(prog="export.py", description="Export a BitNeRF checkpoint as packed ternary weights.")
    parser.add_argument("--ckpt", help="training checkpoint (RUN/ckpt.pt) of a model=bitnerf run")
    parser.add_argument("--out", help="output file (default: model.bitnerf beside the checkpoint)")
    parser.add_argument("--packing", choices=["base3", "2bit"], default="base3",
                        help="base3: 5 weights per byte (default, smallest); 2bit: 4 per byte")
    parser.add_argument("--floats", choices=list(_FLOATS), default="float16",
                        help="storage of the float tensors (input/output layers, biases, norms)")
    parser.add_argument("--info", metavar="FILE", help="verify a .bitnerf file and describe it")

    def body() -> None:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
        if args.info:
            print(describe(args.info))
            return
        if not args.ckpt:
            raise UserError("--ckpt RUN/ckpt.pt is required (or --info FILE)")
        out = args.out or os.path.join(os.path.dirname(args.ckpt), "model.bitnerf")
        sizes = export_checkpoint(args.ckpt, out, args.packing, args.floats)
        print(f"wrote {out}: {sizes['file_bytes']:,} bytes ({args.packing} ternary, {args.floats} floats) vs "
              f"{sizes['float_weight_bytes']:,} bytes of float weights: {sizes['ratio']:.1f}x smaller")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
