"""gpu_check.py keeps working where CI can run it (every check on the CPU at toy sizes, a report row each), and its
runner keeps its rules: a check that cannot fit the budget is skipped and says so, a subprocess past its timeout is
a FAILED row (and is killed), the log holds a failure's whole traceback, the cuda marker selects the CUDA tests."""

import glob
import os
import re
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from gpu_check import Check, SyncingOps, python_reads, run_checks, run_logged, schedule_estimate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# on a CPU: the CUDA-only rows are skipped with their reasons, every other row passes
CPU_ROWS = [("environment", "ok"), ("int_mm", "ok"), ("exp1", "ok"), ("learn", "ok"), ("exp2", "ok"),
            ("exp4", "ok"), ("syncs", "ok"), ("ddp", "ok"), ("resume", "ok"), ("export", "ok"),
            ("tests", "skipped"), ("fp16", "ok"), ("tf32_off", "skipped"), ("skip_off", "ok"),
            ("bitnerf_amp", "ok"), ("exp3", "ok"), ("exp5_1gpu", "skipped"), ("exp5_2cpu", "ok")]


def table(path) -> list[list[str]]:
    with open(path) as f:
        return [[c.strip() for c in line.strip().strip("|").split("|")] for line in f
                if line.startswith("| ") and "---" not in line][1:]


@pytest.mark.slow
def test_gpu_check_passes_on_cpu_and_writes_its_table_and_log(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--device=cpu", f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "WANDB_MODE": "disabled"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table(tmp_path / "gpu_check.md")
    assert [(name, result) for name, result, *_ in rows] == CPU_ROWS
    figures = {name: cells[-1] for name, *cells in rows}
    assert "syncs_per_step=" in figures["syncs"] and "reason=" in figures["tests"]
    assert "exp1_1200_step_schedule_s_est=" in figures["exp1"] and "first_step_s=" in figures["exp1"]
    log = (tmp_path / "gpu_check.log").read_text()
    assert log.startswith("command: ") and "installed: " in log and "torch==" in log
    assert "--nproc_per_node=2 exp5.py" in log and "(exit code 0)" in log  # the torchrun job's output


def test_gpu_check_refuses_an_unavailable_device_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "gpu_check.py", "--device=cuda", f"--out={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        pytest.skip("this machine has CUDA")
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "CUDA is not available" in proc.stderr


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_check_that_cannot_fit_the_budget_is_skipped_and_says_so(tmp_path):
    clock, timeouts = FakeClock(), []

    def taking(seconds):
        def run(timeout):
            timeouts.append(timeout)
            clock.now += seconds
            return True, {}
        return run

    checks = [Check("first", 10, taking(50)), Check("big", 60, taking(1)), Check("small", 40, taking(1))]
    rows = run_checks(checks, str(tmp_path), budget_s=100, clock=clock)
    # 50 s left after the first: the 60-s check is skipped, the 40-s one still runs
    assert [(r.name, r.result) for r in rows] == [("first", "ok"), ("big", "skipped"), ("small", "ok")]
    assert rows[1].figures == {"reason": "skipped: needs ~60 s, 50 s left"}
    assert timeouts == [20, 50]  # twice the budget, at most the time left
    assert table(tmp_path / "gpu_check.md")[1] == ["big", "skipped", "0 (60)", "reason=skipped: needs ~60 s, 50 s left"]


def test_a_subprocess_past_its_timeout_is_a_failed_row_and_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)")
    check = Check("sleeper", 2, lambda timeout: run_logged([sys.executable, "-c", script], timeout))
    start = time.monotonic()
    rows = run_checks([check, Check("after", 1, lambda timeout: (True, {}))], str(tmp_path), budget_s=100)
    assert time.monotonic() - start < 30
    assert [(r.name, r.result) for r in rows] == [("sleeper", "FAILED"), ("after", "ok")]
    assert rows[0].figures["error"].startswith("CheckTimeout: ")
    assert "ran past its 4 s timeout and was killed (see gpu_check.log)" in rows[0].figures["error"]
    grandchild = int(pid_file.read_text())  # torchrun's workers are such grandchildren
    for _ in range(50):
        try:
            with open(f"/proc/{grandchild}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    break  # dead, not yet reaped
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the timed-out command's child {grandchild} is still running")


def test_the_log_holds_a_failing_checks_whole_traceback_and_the_row_its_last_line(tmp_path):
    def deep_inside_a_library():
        raise RuntimeError("the first line of a long message\na middle line\n"
                           "CUBLAS_STATUS_NOT_SUPPORTED for 17x360x256")

    def failing(timeout):
        deep_inside_a_library()

    rows = run_checks([Check("broken", 1, failing), Check("after", 1, lambda timeout: (True, {"x": 1}))],
                      str(tmp_path), budget_s=100)
    assert [(r.name, r.result) for r in rows] == [("broken", "FAILED"), ("after", "ok")]
    assert rows[0].figures == {"error": "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED for 17x360x256 (see gpu_check.log)"}
    log = (tmp_path / "gpu_check.log").read_text()
    assert "Traceback (most recent call last)" in log and "in deep_inside_a_library" in log
    assert "the first line of a long message\na middle line\nCUBLAS_STATUS_NOT_SUPPORTED" in log


def test_the_1200_step_estimate_counts_the_compiling_step_once():
    # a 60-step run: a 30 s first step (compiling), 0.05 s steps after it
    assert schedule_estimate(30.0, 0.05) == pytest.approx(30.0 + 1199 * 0.05)  # 89.95 s
    assert schedule_estimate(30.0, 0.05, steps=60) == pytest.approx(32.95)  # that run's own time
    # the rate of the whole short run would charge the compilation 1200 / 60 = 20 times: 659 s
    assert 1200 * schedule_estimate(30.0, 0.05, steps=60) / 60 == pytest.approx(659.0)


def cuda_only_tests() -> set[tuple[str, str]]:
    """(file, test) of every test in tests/ that skips itself without CUDA, read from the source."""
    found = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "test_*.py")):
        with open(path) as f:
            source = f.read()
        for decorators, name in re.findall(r"((?:^@.*\n)+)def (test_\w+)", source, re.M):
            if "cuda.is_available()" in decorators:
                found.add((os.path.basename(path), name))
    return found


def test_the_cuda_marker_selects_exactly_the_tests_that_need_cuda():
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p",
                           "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    ids = [line for line in proc.stdout.splitlines() if "::" in line]
    selected = {(os.path.basename(i.split("::")[0]), i.split("::")[1].split("[")[0]) for i in ids}
    assert len(cuda_only_tests()) >= 3  # the source scan sees them
    assert selected == cuda_only_tests()
    assert f"{len(ids)}/" in proc.stdout  # and nothing else was collected


def test_the_sync_counters_see_what_makes_a_gpu_wait_and_not_what_does_not():
    x, mask = torch.arange(6.0), torch.tensor([True, False] * 3)
    with python_reads() as calls, SyncingOps() as mode:
        x.index_select(0, torch.tensor([0, 2, 4])).sum()
    assert calls == [] and mode.ops == []
    with python_reads() as calls, SyncingOps() as mode:
        x[mask]
        mask.nonzero()
        x.sum().item()
        x.tolist()
    assert calls == ["item", "tolist"]
    assert [op.split(".")[1] for op in mode.ops] == ["index", "nonzero", "_local_scalar_dense"]


def test_the_tests_row_names_the_failing_tests_and_refuses_an_empty_selection(monkeypatch):
    """The CUDA branch with pytest's run faked: its failing ids reach the row; no test selected is a failure."""
    import gpu_check

    output = ("..F.\nFAILED tests/test_export.py::test_cuda_int8_layer_matches_cpu[5-40-24] - RuntimeError: x\n"
              "ERROR tests/test_models.py::test_fused_bitnerf_matches_torchao_on_cuda[amp1] - boom\n"
              "1 failed, 6 passed, 1 error in 9.1s\n")
    commands = []
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, timeout: (commands.append((cmd, timeout)), (1, output))[1])
    ok, figures = gpu_check.check_tests(torch.device("cuda"), 60)
    assert not ok and figures == {"pytest": "1 failed, 6 passed, 1 error in 9.1s", "failed":
                                  "tests/test_export.py::test_cuda_int8_layer_matches_cpu[5-40-24] "
                                  "tests/test_models.py::test_fused_bitnerf_matches_torchao_on_cuda[amp1]"}
    assert commands[0][0][1:5] == ["-m", "pytest", "-m", "cuda"] and commands[0][1] == 60
    monkeypatch.setattr(gpu_check, "run_logged", lambda cmd, timeout: (5, "8 deselected\n"))
    assert gpu_check.check_tests(torch.device("cuda"), 60)[0] is False
    with pytest.raises(gpu_check.Skip, match="need CUDA"):
        gpu_check.check_tests(torch.device("cpu"), 60)


def test_a_refused_int_mm_shape_is_a_row_not_a_crash(monkeypatch):
    """cuBLASLt refusing one of BitNeRF's shapes (faked: the skip layer's K) names that shape in a FAILED row."""
    import gpu_check
    from configs import EXP4

    cfg = gpu_check.configs_for(torch.device("cpu"), "/unused", "synthetic")["exp4"]
    skip_k = cfg.width + 40  # toy: 64 wide, 3 + 6 * 6 = 39 encoding dims padded to 40
    assert (skip_k, cfg.width) in gpu_check.ternary_shapes(cfg)
    assert (256 + 104, 256) in gpu_check.ternary_shapes(EXP4)  # the paper scale's skip layer: K = 360
    real = gpu_check.int8_mm

    def refusing(a, b):
        if a.shape[1] == skip_k:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_NOT_SUPPORTED when calling cublasLtMatmul")
        return real(a, b)

    monkeypatch.setattr(gpu_check, "int8_mm", refusing)
    monkeypatch.setattr(gpu_check, "probe_int_mm", lambda device: True)
    ok, figures = gpu_check.check_int_mm(replace(cfg, chunk_points=1024), torch.device("cpu"))
    assert not ok
    assert f"eager 1024x{skip_k}x{cfg.width}" in figures["refused"]
    assert figures["refused"][f"eager 1001x{skip_k}x{cfg.width}"].endswith("CUBLAS_STATUS_NOT_SUPPORTED when "
                                                                          "calling cublasLtMatmul")
    assert not [shape for shape in figures["refused"] if f"x{skip_k}x" not in shape]  # only that K


def test_an_apple_gpu_skips_what_it_cannot_do_with_a_reason_each(tmp_path):
    """--device=mps: no NCCL, no int8 matmul, no compiled path (the device policy runs MPS eagerly), no TF32, no
    DDP; each such row raises Skip before touching the device, so this runs anywhere."""
    import gpu_check

    checks = {c.name: c for c in gpu_check.build_checks(torch.device("mps"), str(tmp_path), "synthetic")}
    reasons = {}
    for name in ("int_mm", "ddp", "tests", "tf32_off", "skip_off", "exp5_1gpu"):
        with pytest.raises(gpu_check.Skip) as why:
            checks[name].run(60)
        reasons[name] = str(why.value)
    assert "MPS" in reasons["int_mm"] and "NCCL" in reasons["ddp"] and "eagerly" in reasons["skip_off"]
    assert all(reasons.values())
    cfgs = gpu_check.configs_for(torch.device("mps"), str(tmp_path), "synthetic")
    assert not any(c.compile for c in cfgs.values()) and {c.scale for c in cfgs.values()} == {"cpu"}
