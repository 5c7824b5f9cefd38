"""exp3: exp2 with 8 images per step instead of 4. Overrides: --key=value (see --help)."""

import sys

from configs import EXP3
from train import main

if __name__ == "__main__":
    sys.exit(main(EXP3))
