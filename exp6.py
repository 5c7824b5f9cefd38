"""exp6: exp4 trained with DistributedDataParallel: torchrun --standalone --nproc_per_node=N exp6.py. Overrides: --key=value (see --help)."""

import sys

from experiments import REGISTRY
from train import main

if __name__ == "__main__":
    sys.exit(main(REGISTRY["exp6"].preset))
