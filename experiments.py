"""The experiments, in one registry: what each one is, how it is launched, and what it is compared with.

The scripts (`expN.py`), `train.py`'s launch check, `study.py`, its results page, the README's experiment table
(checked by tests/test_readme.py) and the tests read this registry. Adding an experiment is one entry here (its
preset built with `dataclasses.replace` from the one it changes) and a script like exp1.py:

    import sys
    from experiments import REGISTRY
    from train import main
    if __name__ == "__main__":
        sys.exit(main(REGISTRY["exp8"].preset))
"""

from __future__ import annotations

from dataclasses import dataclass

from configs import EXP1, EXP2, EXP3, EXP4, EXP5, EXP6, EXP7, Config

# the numbers a comparison can name: held-out PSNR / SSIM / depth error (eval.json), sample points per second of
# training (summary.json), and the noise of the training loss around its moving average (metrics.jsonl)
METRICS = ("psnr", "ssim", "depth_mae", "points", "loss_noise")
FIRST_SEED = 42  # a study's run k uses seed FIRST_SEED + k


@dataclass(frozen=True)
class Experiment:
    preset: Config
    what: str  # one line: what the experiment changes
    torchrun: bool = False  # launched as `torchrun --nproc_per_node=N` (DDP); else one process
    baseline: str = ""  # the experiment it is compared with ("" for the base experiment)
    question: str = ""  # what that comparison answers, as a results page heads it
    metrics: tuple[str, ...] = ("psnr", "points")  # what the comparison compares, from METRICS

    @property
    def name(self) -> str:
        return self.preset.name


REGISTRY: dict[str, Experiment] = {e.name: e for e in (
    Experiment(EXP1, "base NeRF"),
    Experiment(EXP2, "+ automatic mixed precision", baseline="exp1", question="AMP's speed-up or cost",
               metrics=("points", "psnr")),
    Experiment(EXP3, "+ AMP, twice the batch", baseline="exp2", question="the larger batch's trade-off",
               metrics=("points", "psnr")),
    Experiment(EXP4, "BitNeRF: BitNet b1.58 quantization-aware training", baseline="exp1",
               question="BitNeRF's gap to NeRF", metrics=("psnr", "ssim", "points")),
    Experiment(EXP5, "exp1 under DDP", torchrun=True, baseline="exp1", question="DDP vs a single process",
               metrics=("points", "psnr")),
    Experiment(EXP6, "exp4 under DDP", torchrun=True, baseline="exp4", question="BitNeRF-DDP vs BitNeRF",
               metrics=("points", "psnr")),
    Experiment(EXP7, "BitNeRF twice as wide", baseline="exp4", question="twice the width for a ternary field",
               metrics=("psnr", "ssim", "points")),
)}


def launch_command(script: str) -> str:
    """The command that runs `script` (a file name such as exp5.py), as its --help's usage line opens: torchrun
    for a DDP experiment's script (as the README launches it, N processes), python for any other."""
    entry = REGISTRY.get(script.removesuffix(".py"))
    return f"torchrun --standalone --nproc_per_node=N {script}" if entry and entry.torchrun else f"python {script}"


def experiment(name: str) -> Experiment:
    """The registered experiment `name`; KeyError with the known names otherwise."""
    if name not in REGISTRY:
        raise KeyError(f"{name!r} is not a registered experiment ({', '.join(REGISTRY)})")
    return REGISTRY[name]
