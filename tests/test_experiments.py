"""experiments.REGISTRY: one entry per experiment, read by the scripts, train.py, the study and the README."""

import os
import re
from dataclasses import fields, replace

import pytest

import study
from configs import EXP1
from experiments import METRICS, REGISTRY, Experiment, experiment
from tests.conftest import ROOT


@pytest.mark.parametrize("name", list(REGISTRY))
def test_each_entry_has_a_script_a_known_baseline_and_known_metrics(name):
    e = REGISTRY[name]
    assert e.name == name == e.preset.name and e.what
    with open(os.path.join(ROOT, f"{name}.py")) as f:
        assert re.search(rf'\bmain\(REGISTRY\["{name}"\]\.preset\)', f.read()), f"{name}.py runs another preset"
    if e.baseline:
        assert e.baseline in REGISTRY and e.question and set(e.metrics) <= set(METRICS)
        base = REGISTRY[e.baseline].preset  # it differs from what it is compared with, or in its launcher
        changed = [f.name for f in fields(base)
                   if f.name != "name" and getattr(base, f.name) != getattr(e.preset, f.name)]
        assert changed or e.torchrun != REGISTRY[e.baseline].torchrun, name


def test_the_ddp_experiments_are_the_torchrun_ones():
    assert [n for n, e in REGISTRY.items() if e.torchrun] == ["exp5", "exp6"]
    assert experiment("exp4").baseline == "exp1"
    with pytest.raises(KeyError, match="exp9"):
        experiment("exp9")


def test_the_ddp_scripts_are_launched_as_the_readme_launches_them():
    from experiments import launch_command

    assert launch_command("exp4.py") == "python exp4.py" and launch_command("train.py") == "python train.py"
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    for script in ("exp5.py", "exp6.py"):  # the README's commands give N as 2
        assert launch_command(script).startswith("torchrun ")
        assert launch_command(script).replace("=N", "=2") in readme, script


def test_a_new_entry_is_all_the_study_needs(monkeypatch):
    """One registry entry: the study plans it, launches its script, and compares it with its baseline."""
    entry = Experiment(replace(EXP1, name="exp8", n_samples=48), "more samples", baseline="exp1",
                       question="more samples per ray", metrics=("psnr",))
    monkeypatch.setitem(REGISTRY, "exp8", entry)
    arms = study.registered_arms()
    assert arms["exp8"].base == "exp1" and arms["exp8"].metrics == ("psnr",) and arms["exp8"].script == "exp8"
    assert study.selected(arms, [], "exp1,exp8") == ["exp1", "exp8"]
