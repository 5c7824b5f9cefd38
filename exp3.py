"""exp3: exp2 with twice the batch (paper scale: 8 images per step instead of 4; cpu scale: 4096 rays instead of
2048). Overrides: --key=value (see --help)."""

import sys

from experiments import REGISTRY
from train import main

if __name__ == "__main__":
    sys.exit(main(REGISTRY["exp3"].preset))
