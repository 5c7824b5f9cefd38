"""exp7: BitNeRF with hidden layers twice as wide (configs.EXP7). Overrides: --key=value
(see --help)."""

import sys

from experiments import REGISTRY
from train import main

if __name__ == "__main__":
    sys.exit(main(REGISTRY["exp7"].preset))
