"""Export a trained BitNeRF as real packed ternary weights: a small, self-describing, pickle-free `.bitnerf` file.

    python export.py --ckpt RUN/ckpt.pt [--out RUN/model.bitnerf] [--packing=base3|2bit] [--floats=float16|float32]
    python export.py --info model.bitnerf      # verify the file and describe it

The file format is bitnerf_format.py's. Loading it (assembly.load_trained on a .bitnerf path) gives a renderer
around bitnerf_packed.ternary_field.
"""

from __future__ import annotations

import os
import sys

from assembly import build_field
from bitnerf import Quantization
from bitnerf_format import FLOAT_STORAGES, OCCUPIED_KEY, PROPOSAL_KEY, read_bitnerf, write_bitnerf
from bitnerf_packed import ternary_state_dict
from configs import ConfigError, config_from_dict
from utils import ArgParser, UserError, load_checkpoint, run_cli


# --- export -------------------------------------------------------------------------------------------------------
def export_checkpoint(ckpt_path: str, out_path: str, packing: str = "base3", floats: str = "float16") -> dict:
    """Training checkpoint of a BitNeRF -> .bitnerf file. Returns sizes for the report."""
    ckpt = load_checkpoint(ckpt_path)
    try:
        cfg = config_from_dict(ckpt["config"])
    except (ConfigError, TypeError) as err:
        raise UserError(f"{ckpt_path}: saved config is unreadable ({err})") from None
    if cfg.model != "bitnerf":
        raise UserError(f"{ckpt_path} holds a {cfg.model!r} model; only BitNeRF (model=bitnerf, BitNet QAT) "
                        f"checkpoints have ternary weights to export")
    field = build_field(cfg)
    try:  # checks every name and shape before anything is written
        field.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise UserError(f"{ckpt_path}: weights do not fit its config: {str(err).splitlines()[0]}") from None
    state = ternary_state_dict({k: v.float() for k, v in field.state_dict().items()}, cfg.depth, cfg.bitnet_norm,
                               cfg.viewdirs, Quantization.of(cfg))
    if cfg.skip and ckpt.get("occupancy"):  # inference skips the same empty space as training's renders
        state[OCCUPIED_KEY] = ckpt["occupancy"]["occupied"]
    if cfg.skip and ckpt.get("proposal"):  # and samples where training's renders did
        state[PROPOSAL_KEY] = ckpt["proposal"]["grid"].float()
    size = write_bitnerf(out_path, state, cfg, packing, floats)
    grid = read_bitnerf(out_path)[2]["tensors"].get(OCCUPIED_KEY, {}).get("nbytes", 0)
    float_bytes = sum(v.numel() * v.element_size() for v in ckpt["model"].values())
    return {"file_bytes": size, "grid_bytes": grid, "float_weight_bytes": float_bytes, "ratio": float_bytes / size}


def describe(path: str) -> str:
    cfg, state, header = read_bitnerf(path)
    kinds: dict[str, int] = {}
    for e in header["tensors"].values():
        kinds[e["encoding"]] = kinds.get(e["encoding"], 0) + e["nbytes"]
    parts = ", ".join(f"{k} {v:,} B" for k, v in sorted(kinds.items()))
    dirs = f", viewdirs L={cfg.n_freqs_dirs}" if cfg.viewdirs else ""
    return (f"{path}: ok (sha256 verified), {os.path.getsize(path):,} bytes, {cfg.model} {cfg.depth}x{cfg.width} "
            f"L={cfg.n_freqs}{dirs}, {len(state)} tensors ({parts})")


# --- command line ---------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    """The command line; a bad file, checkpoint or flag is one `error: ...` line and exit code 2."""
    parser = ArgParser(prog="export.py", description="Export a BitNeRF checkpoint as packed ternary weights.")
    parser.add_argument("--ckpt", help="training checkpoint (RUN/ckpt.pt) of a model=bitnerf run")
    parser.add_argument("--out", help="output file (default: model.bitnerf beside the checkpoint)")
    parser.add_argument("--packing", choices=["base3", "2bit"], default="base3",
                        help="base3: 5 weights per byte (default, smallest); 2bit: 4 per byte")
    parser.add_argument("--floats", choices=FLOAT_STORAGES, default="float16",
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
        print(f"wrote {out}: {sizes['file_bytes']:,} bytes ({args.packing} ternary, {args.floats} floats; of which "
              f"the occupancy grid {sizes['grid_bytes']:,}) vs {sizes['float_weight_bytes']:,} bytes of float "
              f"weights: {sizes['ratio']:.1f}x smaller")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
