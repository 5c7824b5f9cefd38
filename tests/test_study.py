"""study.py and study_page.py: a study runs experiments and variants, skips finished runs, resumes interrupted
ones, and writes results.md whose numbers are the runs' own (summary.json, eval.json); comparisons pair seeds
and carry t intervals (stats.py)."""

import contextlib
import io
import json
import math
import os
import shutil
from dataclasses import replace
from types import SimpleNamespace

import pytest

import report
import study
import study_page
import train
from experiments import REGISTRY

# a model, sampling and schedule that train in about a second; the study's own flags are added per test
TINY = ["--scale=cpu", "--device=cpu", "--width=16", "--depth=2", "--skip_layer=1", "--n_freqs=2", "--n_samples=8",
        "--compile=false", "--wandb=disabled", "--val_views=2", "--skip=false"]


def run_study(args: list[str]) -> tuple[int, str]:
    """study.main's exit code and what it printed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = study.main(args)
    return code, out.getvalue()


def table(md_path: str) -> dict[str, dict[str, str]]:
    """results.md's table: {experiment: {column: cell}}."""
    with open(md_path) as f:
        lines = [line for line in f if line.startswith("| ")]
    split = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    head = split[0]
    return {row[0]: dict(zip(head, row)) for row in split[1:]}


def read(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def study_out(tmp_path_factory, tiny_scene_path) -> dict:
    """One study of exp1, exp4 and exp5 (torchrun, 2 processes), 2 steps each."""
    out = str(tmp_path_factory.mktemp("study"))
    args = [f"--out={out}", "--only=exp1,exp4,exp5", "--steps=2", f"--data={tiny_scene_path}", *TINY]
    code, printed = run_study(args)
    assert code == 0, printed
    return {"out": out, "args": args, "printed": printed}


# --- a study and its results.md -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_table_and_figures_match_the_runs(study_out):
    out = study_out["out"]
    rows = table(os.path.join(out, "results.md"))
    assert list(rows) == ["exp1", "exp4", "exp5"]
    for exp, row in rows.items():
        run = os.path.join(out, exp, "seed0")
        summary, ev = read(os.path.join(run, "summary.json")), read(os.path.join(run, "eval.json"))
        assert summary["steps"] == 2 and row["steps"] == "2"
        assert ev["psnr"] == pytest.approx(summary["val_psnr"], abs=0.01)  # evaluate.py = training's validation
        assert row["PSNR (dB)"] == f"{ev['psnr']:.2f}" and row["SSIM"] == f"{ev['ssim']:.4f}"
        assert row["train (s)"] == f"{summary['train_time_s']:.0f}"
        assert row["points/s"] == report.si(summary["train_points_per_s"])
        assert row["world"] == str(summary["world_size"]) and row["AMP"] == summary["amp"]
        assert row["ckpt (MB)"] == f"{os.path.getsize(os.path.join(run, 'ckpt.pt')) / 1e6:.2f}"
        assert float(row["peak RSS (MB)"].split()[0]) > 50  # a Python process with torch
        assert row["depth MAE"] != "—"  # the procedural scene has ground-truth depth
    bitnerf = os.path.join(out, "exp4", "seed0", "model.bitnerf")
    assert rows["exp4"][".bitnerf (KB)"] == f"{os.path.getsize(bitnerf) / 1e3:.1f}"
    assert rows["exp1"][".bitnerf (KB)"] == "—"
    assert rows["exp4"]["differs from"] == "exp1: model=bitnerf"  # cpu scale: the same lr
    assert rows["exp5"]["world"] == "2" and "per process (workers' sum" in rows["exp5"]["peak RSS (MB)"]
    assert "2 processes share" in rows["exp5"]["note"]
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    for name in ("psnr_time.png", "loss_step.png", "views.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text  # linked, so a markdown viewer shows it inline


@pytest.mark.slow
def test_the_page_names_the_commit_versions_and_machine_its_runs_were_measured_with(study_out):
    import hardware
    summary = read(os.path.join(study_out["out"], "exp1", "seed0", "summary.json"))
    prov = summary["provenance"]
    assert prov["torch"] == __import__("torch").__version__ and prov["commit"] == hardware.source_commit()
    with open(os.path.join(study_out["out"], "results.md")) as f:
        line = next(x for x in f if x.startswith("- measured at commit"))
    assert f"`{prov['commit']}`" in line and prov["machine"] in line and "MIXED" not in line


def test_a_page_whose_runs_disagree_on_the_commit_says_so():
    def finished(commit):
        prov = {"commit": commit, "torch": "2.13.0", "python": "3.12.1", "machine": "M", "date": "2026-12-02 20:00 UTC"}
        return SimpleNamespace(run=SimpleNamespace(summary={"provenance": prov}))
    line = study_page.provenance_line({"a": [finished("abc")], "b": [finished("def")]})
    assert "MIXED: abc | def" in line and "torch 2.13.0" in line
    assert "not recorded" in study_page.provenance_line({"a": [SimpleNamespace(run=SimpleNamespace(summary={}))]})


@pytest.mark.slow
def test_comparisons_with_one_seed_give_no_interval_and_say_so(study_out):
    with open(os.path.join(study_out["out"], "results.md")) as f:
        text = f.read()
    claims = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(claims) == 2  # the study's arms compared with their baselines: exp4 and exp5 with exp1
    bit = next(line for line in claims if "(exp4 vs exp1)" in line)
    assert "held-out PSNR" in bit and "SSIM" in bit and "points/s" in bit and "packed .bitnerf" in bit
    assert bit.count("one seed, no interval over seeds") == 3 and "a difference" not in bit
    assert "held-out views [" in bit and "how views differ, not how runs do" in bit  # the per-view spread
    assert "(exp6 vs exp4)" not in text  # not in this study: not a line of its page


@pytest.mark.slow
def test_rerun_skips_finished_runs(study_out):
    out = study_out["out"]
    files = [os.path.join(out, e, "seed0", n) for e in ("exp1", "exp4", "exp5")
             for n in ("summary.json", "ckpt.pt", "eval.json")]
    before = {p: os.path.getmtime(p) for p in files}
    code, printed = run_study(study_out["args"])
    assert code == 0
    assert printed.count("finished before, skipped") == 3 and ": training" not in printed
    assert {p: os.path.getmtime(p) for p in files} == before  # nothing retrained or re-evaluated


# --- resume and seeds ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_interrupted_run_is_resumed(tmp_path, tiny_scene_path):
    out = str(tmp_path / "study")
    base = [f"--out={out}", "--only=exp1", "--steps=4", f"--data={tiny_scene_path}", *TINY]
    trial = study.plan(*study.parse_args(base))[0][0]
    # the study's exp1 run, stopped after its first step (here by a time budget, in this process: quicker)
    train.train(replace(trial.cfg, max_time_s=1e-6))
    run = os.path.join(out, "exp1", "seed0")
    assert read(os.path.join(run, "summary.json"))["steps"] == 1
    os.remove(os.path.join(run, "summary.json"))  # as if stopped before the end: a checkpoint, no summary
    code, printed = run_study(base)
    assert code == 0 and "resuming from its checkpoint" in printed
    with open(os.path.join(run, "train.log")) as f:
        assert "from step 1" in f.read()  # training continued the checkpoint
    assert read(os.path.join(run, "summary.json"))["steps"] == 4
    assert table(os.path.join(out, "results.md"))["exp1"]["steps"] == "4"


@pytest.mark.slow
def test_seeds_give_mean_and_std(study_out, tmp_path, tiny_scene_path):
    out = str(tmp_path / "study")
    shutil.copytree(study_out["out"], out)  # a second seed added to a finished study: seed 42 is reused
    code, printed = run_study([f"--out={out}", "--only=exp1", "--seeds=2", "--steps=2",
                               f"--data={tiny_scene_path}", *TINY])
    assert code == 0, printed
    assert "exp1 seed 42: finished before, skipped" in printed and "exp1 seed 43: training" in printed
    runs = [os.path.join(out, "exp1", f"seed{k}") for k in (0, 1)]
    assert [read(os.path.join(r, "config.json"))["seed"] for r in runs] == [42, 43]
    psnrs = [read(os.path.join(r, "eval.json"))["psnr"] for r in runs]
    mean, std = sum(psnrs) / 2, abs(psnrs[0] - psnrs[1]) / math.sqrt(2)
    assert table(os.path.join(out, "results.md"))["exp1"]["PSNR (dB)"] == f"{mean:.2f} ± {std:.2f}"


# --- pieces, without training -------------------------------------------------------------------------------------
def fake(exp: str, psnrs: list[float], rates: list[float]) -> list:
    """Finished runs of `exp`, one per seed, with these held-out PSNRs and points/s."""
    runs = []
    for k, (p, r) in enumerate(zip(psnrs, rates)):
        run = report.Run(f"/nowhere/{exp}/seed{k}", exp, {}, {"train_points_per_s": r, "val_psnr": p},
                         evaluation={"psnr": p, "per_view": []})
        runs.append(study_page.Finished(SimpleNamespace(k=k), run, {}))
    return runs


def test_a_comparison_pairs_seeds_and_claims_only_an_interval_without_zero():
    base = fake("exp1", [20.0, 20.5, 21.0], [100.0, 100.0, 100.0])
    # paired differences 2.0, 2.2, 2.4 (tests/test_stats.py: [1.70, 2.70] dB), though the arms' spreads overlap
    line = study_page.compare("psnr", fake("exp4", [22.0, 22.7, 23.4], [1, 1, 1]), base)
    assert line == ("held-out PSNR +2.20 dB (22.70 vs 20.50), 95% interval [+1.70, +2.70] dB over 3 seeds, "
                    "a difference")
    line = study_page.compare("psnr", fake("exp4", [21.0, 22.5, 24.0], [1, 1, 1]), base)  # d = 1, 2, 3
    assert line.endswith("[-0.48, +4.48] dB over 3 seeds, no difference shown (the interval holds 0)")
    line = study_page.compare("points", fake("exp2", [1, 1, 1], [200.0, 210.0, 190.0]), base)
    assert line == "points/s 2.00× [1.76, 2.26], a difference"
    # seeds pair by index: a missing seed drops its pair, not a shift of the others
    assert study_page.paired(fake("exp4", [22.0, 22.7], [1, 1]), base, "psnr") == ([22.0, 22.7], [20.0, 20.5])
    assert study_page.paired(fake("exp4", [22.0, 22.7], [1, 1])[1:], base, "psnr") == ([22.7], [20.5])
    one = study_page.compare("psnr", fake("exp4", [25.0], [1]), base[:1])
    assert one == "held-out PSNR +5.00 dB (25.00 vs 20.00) (one seed, no interval over seeds)"


def test_variants_sweeps_and_plan_files_parse_into_arms(tmp_path):
    arms = study.registered_arms()
    v = study.parse_variant("bitnerf-lr1e-2 = exp4 --lr=1e-2 --n_samples=32", arms)
    assert (v.name, v.script, v.base) == ("bitnerf-lr1e-2", "exp4", "exp4")
    assert v.overrides == ("--lr=1e-2", "--n_samples=32")
    arms[v.name] = v
    child = study.parse_variant("child=bitnerf-lr1e-2 --width=64", arms)  # a variant of a variant
    assert child.overrides == ("--lr=1e-2", "--n_samples=32", "--width=64") and child.base == "bitnerf-lr1e-2"
    ddp = study.parse_variant("ddp-lr = exp5 --lr=1e-2", arms)
    assert ddp.torchrun and not v.torchrun  # launched like the experiment it derives from
    assert [a.name for a in study.parse_sweep("exp1 lr=1e-3,2e-3", arms)] == ["exp1-lr=1e-3", "exp1-lr=2e-3"]
    for bad, message in (("x = exp9 --lr=1", "neither an experiment"), ("exp1 = exp1 --lr=1", "is taken"),
                         ("x = exp1 --seed=3", "leaves to you"), ("x = exp1 lr=1", "leaves to you"),
                         ("just words", "NAME = BASE")):
        with pytest.raises(study.UserError, match=message):
            study.parse_variant(bad, arms)
    with pytest.raises(study.UserError, match="BASE key=v1,v2"):
        study.parse_sweep("exp1 lr", arms)
    plan_file = tmp_path / "p.study"
    plan_file.write_text("# a comment\noptions: --steps=7 --seeds=2\n\nsweep exp1 width=8,16  # two\n"
                         "deep = exp1-width=8 --depth=3\n")
    args, extras, entries = study.parse_args([f"--plan={plan_file}", "--seeds=3", "--out=o", *TINY])
    assert args.steps == 7 and args.seeds == 3  # the command line wins over the plan's options
    arms, variants = study.study_arms(entries)
    assert variants == ["exp1-width=8", "exp1-width=16", "deep"]
    assert study.selected(arms, variants, None) == ["exp1", "exp1-width=8", "exp1-width=16", "deep"]
    plan_file.write_text("compare exp1 nothing\n")
    args, extras, entries = study.parse_args([f"--plan={plan_file}"])
    with pytest.raises(study.UserError, match="compare 'exp1 nothing'"):
        study.compared_pairs(entries, arms, list(arms))
    plan_file.write_text("what is this\n")
    with pytest.raises(study.UserError, match="p.study:1: not"):
        study.parse_args([f"--plan={plan_file}"])


def test_a_variant_that_trains_what_its_base_trains_is_refused(tiny_scene_path):
    with pytest.raises(study.UserError, match="exp1-width=16 would train exactly what exp1 trains"):
        study.plan(*study.parse_args(["--out=o", "--steps=2", f"--data={tiny_scene_path}", "--sweep",
                                      "exp1 width=16", *TINY]))


def test_study_and_the_experiment_scripts_default_to_the_same_data(tmp_path, monkeypatch):
    """Without --data a study trains what `python expN.py` trains: configs.Config.data, the procedural scene, even
    where `python data_setup.py` has fetched the tiny NeRF file; real data is always named."""
    import configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tiny_nerf_data.npz").write_bytes(b"")  # a fetched file must not change the default
    tiny = [a for a in TINY if not a.startswith("--width=")]  # one width for all would make exp7 train exp4
    trials, shared = study.plan(*study.parse_args(["--out=o", "--steps=2", *tiny]))
    assert shared["data"] == configs.Config.data == "synthetic"
    assert {t.arm.script for t in trials} == set(REGISTRY)
    for trial in trials:
        alone = configs.from_cli(REGISTRY[trial.arm.script].preset, tiny)  # the script run without --data
        assert trial.cfg.data == alone.data == "synthetic", trial.arm.name
    trials, shared = study.plan(*study.parse_args(["--out=o", "--steps=2", "--data=data/tiny_nerf_data.npz", *tiny]))
    assert shared["data"] == "data/tiny_nerf_data.npz" and {t.cfg.data for t in trials} == {shared["data"]}


@pytest.mark.slow
def test_a_two_seed_study_with_a_variant_end_to_end(tmp_path, tiny_scene_path):
    out = str(tmp_path / "study")
    plan_file = tmp_path / "narrow.study"  # a comparison beyond the variant's with its base: exp1 against it
    plan_file.write_text("narrow = exp1 --width=8\ncompare exp1 narrow\n")
    args = [f"--out={out}", "--seeds=2", "--steps=3", f"--data={tiny_scene_path}", f"--plan={plan_file}", *TINY]
    code, printed = run_study(args)
    assert code == 0, printed
    assert [line.split(":")[0] for line in printed.splitlines() if line.endswith("train.log")] == [
        "[1/4] exp1 seed 42", "[2/4] narrow seed 42", "[3/4] exp1 seed 43", "[4/4] narrow seed 43"]  # seed-major
    assert read(os.path.join(out, "narrow", "seed1", "config.json"))["width"] == 8
    assert read(os.path.join(out, "narrow", "seed1", "config.json"))["name"] == "narrow"
    with open(os.path.join(out, "results.md")) as f:
        text = f.read()
    rows = table(os.path.join(out, "results.md"))
    assert rows["narrow"]["differs from"] == "exp1: width=8"
    line = next(line for line in text.splitlines() if line.startswith("- **--width=8** (narrow vs exp1)"))
    psnr = [[read(os.path.join(out, e, f"seed{k}", "eval.json"))["psnr"] for k in (0, 1)] for e in ("narrow", "exp1")]
    iv = study_page.stats.paired_difference(*psnr)
    assert f"95% interval [{study_page.signed(iv.low, 2)}, {study_page.signed(iv.high, 2)}] dB over 2 seeds" in line
    assert "points/s" in line and "SSIM" in line  # loss noise needs more logged steps than 3
    line = next(line for line in text.splitlines() if line.startswith("- **exp1 vs narrow**"))
    iv = study_page.stats.paired_difference(*psnr[::-1])
    assert f"95% interval [{study_page.signed(iv.low, 2)}, {study_page.signed(iv.high, 2)}] dB over 2 seeds" in line


def test_plan_commands_threads_and_confound_notes(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    trials, shared = study.plan(*study.parse_args(["--out=o", "--minutes=1", "--scale=cpu", "--device=cpu",
                                                  "--val_views=10"]))
    assert [t.exp for t in trials] == list(REGISTRY) and shared["nproc"] == 2
    exp5 = next(t for t in trials if t.exp == "exp5")
    cmd = study.command(exp5)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert "--video=false" in cmd and "--max_time_s=60" in cmd and cmd[-1] == "--val_views=10"
    assert exp5.cfg.val_views == 10 and exp5.cfg.seed == 42 and exp5.run_dir == os.path.join("o", "exp5", "seed0")
    assert study.child_env(2, False)["OMP_NUM_THREADS"] == str(max(1, study.cpu_count() // 2))
    assert "OMP_NUM_THREADS" not in study.child_env(1, False)
    note = study_page.note("exp3", shared)  # cpu scale: equal epochs, so half the steps
    assert "equal epochs: 15000 planned steps of 1024 vs exp2's 30000 of 512" in note


def test_a_folder_of_another_config_stops_the_study_before_it_runs(tmp_path):
    trial = study.plan(*study.parse_args([f"--out={tmp_path}", "--only=exp1", "--steps=5", *TINY]))[0][0]
    os.makedirs(trial.run_dir)
    with open(os.path.join(trial.run_dir, "config.json"), "w") as f:
        f.write(replace(trial.cfg, lr=0.5).to_json())
    open(os.path.join(trial.run_dir, "ckpt.pt"), "wb").close()
    with pytest.raises(study.UserError, match="another config .*lr: 0.5 -> 0.005"):
        study.trial_state(trial)
    os.remove(os.path.join(trial.run_dir, "ckpt.pt"))  # no checkpoint: training starts afresh
    assert study.trial_state(trial) == "new"


def test_overrides_the_study_sets_or_configs_refuse_exit_2(capsys):
    assert study.main(["--seed=1"]) == 2
    assert study.main(["--width=wide"]) == 2
    assert study.main(["--only=exp99"]) == 2
    err = capsys.readouterr().err
    assert "--seed is set by the study" in err and "--width expects int" in err and "exp99" in err


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM needs Linux /proc")
def test_peak_memory_is_the_training_process_own_not_the_launcher(tmp_path):
    """A small child launched by a process holding ~400 MB: its peak must be its own (~10-30 MB). wait4's
    ru_maxrss would report the launcher's memory here (Linux keeps the replaced memory's high-water mark at exec),
    about 1.15 GB for a study's runs whose training uses ~0.5 GB."""
    import sys

    import numpy as np

    held = np.ones(50_000_000)  # 400 MB, resident
    child = [sys.executable, "-c", "import time; time.sleep(1.5)"]
    record = study.launch(child, dict(os.environ), str(tmp_path / "log"), torchrun=False)
    assert record["returncode"] == 0 and held[-1] == 1
    assert 1 < record["peak_rss_mb"] < 200
    assert record["workers_rss_sum_mb"] is None
