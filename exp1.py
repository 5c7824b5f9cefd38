"""exp1: base NeRF on one device. Overrides: --key=value (see --help)."""

import sys

from experiments import REGISTRY
from train import main

if __name__ == "__main__":
    sys.exit(main(REGISTRY["exp1"].preset))
