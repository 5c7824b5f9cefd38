"""exp4: BitNeRF: RMSNorm + BitNet b1.58 quantization-aware training (bitnerf.py). Overrides: --key=value
(see --help)."""

import sys

from experiments import REGISTRY
from train import main

if __name__ == "__main__":
    sys.exit(main(REGISTRY["exp4"].preset))
