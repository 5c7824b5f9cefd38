"""gpu_check.py keeps working where CI can run it: every check on the CPU at toy sizes, a report row each."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKS = ("environment", "tests", "int_mm", "exp1", "exp2", "exp4", "resume", "export", "syncs", "ddp")


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_and_writes_its_table(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--device=cpu", f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "gpu_check.md") as f:
        rows = [line.split("|")[1:3] for line in f if line.startswith("| ") and "---" not in line][1:]
    assert [(name.strip(), result.strip()) for name, result in rows] == [(c, "ok") for c in CHECKS]


def test_gpu_check_refuses_an_unavailable_device_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--device=cuda", f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this machine has CUDA")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "CUDA is not available" in proc.stderr
