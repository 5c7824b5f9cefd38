"""exp1: base NeRF on one device. Overrides: --key=value (see --help)."""

import sys

from configs import EXP1
from train import main

if __name__ == "__main__":
    sys.exit(main(EXP1))
