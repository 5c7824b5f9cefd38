"""The `.bitnerf` file: a small, self-describing, pickle-free store of a BitNeRF's packed ternary weights.

File layout (all integers little-endian):
    MAGIC (8 bytes) | format version (uint32) | header length H (uint32) | header: H bytes of UTF-8 JSON |
    payload: raw tensor bytes | SHA-256 of every byte before it (32 bytes)
The header holds the training config and, per tensor, its encoding, shape and (offset, nbytes) in the payload.
Encodings: "float16"/"float32" (little-endian IEEE), "ternary-base3"/"ternary-2bit" (pack_ternary) and
"bits-zlib" (the occupancy grid `occupancy.occupied`, when the run skipped empty space: numpy.packbits, big-endian
within a byte, then zlib-compressed; a grid is mostly empty space in large runs, so a 128^3 grid of 256 KiB of bits
takes ~10 KB) and "bits" (the same without compression, read for files that hold it).
The quantized Linears' weights (the hidden layers'; with the direction branch also its feature and direction
layers') are ternary, each with its fp32 absmean scale; everything else (input and output layers or heads, biases,
RMSNorm weights) stays float. export.py writes it; assembly.load_trained (or assembly.load_exported)
loads it as a renderer around bitnerf_packed.ternary_field.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import numpy as np
import torch
from torch import nn

from configs import Config, ConfigError, config_from_dict
from utils import UserError, atomic_write

MAGIC = b"BITNERF\x00"
OCCUPIED_KEY = "occupancy.occupied"  # the occupancy grid's cells, stored beside the field's tensors
PROPOSAL_KEY = "proposal.grid"  # a proposal sampler's density grid, likewise
VERSION = 1
_PREFIX = struct.Struct("<8sII")  # magic, version, header length
_DIGEST = 32
_FLOATS = {"float16": ("<f2", torch.float16), "float32": ("<f4", torch.float32)}
FLOAT_STORAGES = tuple(_FLOATS)  # how the float tensors may be stored


# --- packing ternary digits ---------------------------------------------------------------------------------------
# Ternary digits are stored as t + 1 in {0, 1, 2}, little-endian within a byte: base 3 packs 5 per byte
# (3^5 = 243 <= 256), base 4 is the plain 2-bit packing (4 per byte).
PACKINGS = {"base3": (3, 5), "2bit": (4, 4)}


def pack_ternary(values: torch.Tensor, packing: str = "base3") -> torch.Tensor:
    """Ternary int8 values (any shape, flattened row-major) -> uint8 [ceil(n / per_byte)]."""
    base, per_byte = PACKINGS[packing]
    digits = values.reshape(-1).to(torch.int64) + 1
    if digits.numel() and (digits.min() < 0 or digits.max() > 2):
        raise ValueError("pack_ternary: values must be in {-1, 0, 1}")
    digits = nn.functional.pad(digits, (0, -digits.numel() % per_byte)).view(-1, per_byte)
    powers = base ** torch.arange(per_byte, device=digits.device)  # [per_byte]
    return (digits * powers).sum(dim=-1).to(torch.uint8)


def unpack_ternary(packed: torch.Tensor, n: int, packing: str = "base3") -> torch.Tensor:
    """uint8 [ceil(n / per_byte)] -> int8 [n] in {-1, 0, 1}. ValueError when the bytes cannot be ternary digits."""
    base, per_byte = PACKINGS[packing]
    if packed.numel() != -(-n // per_byte):
        raise ValueError(f"{packed.numel()} packed bytes cannot hold {n} ternary values ({packing})")
    powers = base ** torch.arange(per_byte, device=packed.device)
    packed = packed.to(torch.int64)
    digits = ((packed[:, None] // powers) % base).reshape(-1)  # [bytes * per_byte]
    # padding digits beyond n must be 0 too (pack writes 0 there), so every byte has exactly one meaning
    if digits.numel() and (digits.max() > 2 or packed.max() >= base ** per_byte or digits[n:].any()):
        raise ValueError("bytes that are not packed ternary digits")
    return (digits[:n] - 1).to(torch.int8)


# --- encoding tensors ----------------------------------------------------------------------------------------------
def _encode(name: str, tensor: torch.Tensor, packing: str, floats: str) -> tuple[str, bytes]:
    if tensor.dtype == torch.bool:  # the occupancy grid: one bit per cell, compressed
        return "bits-zlib", zlib.compress(np.packbits(tensor.cpu().numpy().reshape(-1)).tobytes(), 9)
    if tensor.dtype == torch.int8:
        return f"ternary-{packing}", pack_ternary(tensor, packing).numpy().tobytes()
    # the per-layer scales stay fp32: they multiply every output of their layer and cost 4 bytes each
    kind = "float32" if name.endswith(".scale") else floats
    return kind, tensor.detach().float().cpu().numpy().astype(_FLOATS[kind][0]).tobytes()


def _decode(entry: dict, data: bytes) -> torch.Tensor:
    kind, shape = entry["encoding"], tuple(entry["shape"])
    if kind in _FLOATS:
        array = np.frombuffer(data, dtype=_FLOATS[kind][0])
        return torch.from_numpy(array.astype(np.float32)).reshape(shape)
    if kind in ("bits", "bits-zlib"):
        data = zlib.decompress(data) if kind == "bits-zlib" else data
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=int(np.prod(shape)))
        return torch.from_numpy(bits.astype(bool)).reshape(shape)
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
    except (ValueError, KeyError, TypeError, RuntimeError, ConfigError, zlib.error) as err:
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
