"""exp2: NeRF with automatic mixed precision (amp_dtype=auto: bf16 where the hardware has it, else fp16 with a
GradScaler). Overrides: --key=value (see --help)."""

import sys

from experiments import REGISTRY
from train import main

if __name__ == "__main__":
    sys.exit(main(REGISTRY["exp2"].preset))
