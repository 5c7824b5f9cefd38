"""exp6: exp4 trained with DistributedDataParallel: torchrun --standalone --nproc_per_node=N exp6.py. Overrides: --key=value (see --help)."""

import sys

from configs import EXP6
from train import main

if __name__ == "__main__":
    sys.exit(main(EXP6))
