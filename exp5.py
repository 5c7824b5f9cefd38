"""exp5: exp1 trained with DistributedDataParallel: torchrun --standalone --nproc_per_node=N exp5.py. Overrides: --key=value (see --help)."""

import sys

from configs import EXP5
from train import main

if __name__ == "__main__":
    sys.exit(main(EXP5))
