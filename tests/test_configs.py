"""Configs: presets differ only where their experiment differs; CLI overrides are typed and checked."""

import dataclasses
from dataclasses import replace
import os
import re
import subprocess
import sys

import pytest
import torch

from configs import (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6, PRESETS, Config, ConfigError, config_from_dict, from_cli,
                     scene_bounds)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def changed(a: Config, b: Config) -> set:
    return {f.name for f in dataclasses.fields(Config) if getattr(a, f.name) != getattr(b, f.name)}


def test_presets_differ_only_where_the_experiment_differs():
    assert changed(EXP1, EXP2) == {"name", "amp"}
    assert changed(EXP2, EXP3) == {"name", "batch_size"} and EXP3.batch_size == 8
    assert changed(EXP1, EXP4) == {"name", "model", "lr"} and EXP4.lr == 5e-5
    assert changed(EXP1, EXP5) == {"name"}
    assert changed(EXP4, EXP6) == {"name"}  # the original's exp6 silently changed lr, norm and weight decay


def test_reference_hyperparameters():
    c = EXP1
    assert (c.n_freqs, c.width, c.depth, c.skip_layer, c.n_samples) == (16, 256, 8, 4, 32)
    # near / far come from the data (0 in the config); the lego scenes resolve to the reference's 2 and 6
    assert scene_bounds(replace(c, scene="bounded"))[:2] == (2.0, 6.0)
    assert (c.batch_unit, c.batch_size, c.lr, c.epochs, c.val_views) == ("image", 4, 1e-3, 50, 11)
    assert (c.video_frames, c.video_fps, c.video_radius, c.video_elevation) == (120, 30, 4.0, -30.0)
    assert c.wandb == "offline"


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        EXP1.lr = 1.0


def test_cli_overrides_are_typed():
    cfg = from_cli(EXP1, ["--lr=3e-4", "--steps=7", "--compile=false", "--amp", "--data", "x.npz", "--out-dir=o"])
    assert (cfg.lr, cfg.steps, cfg.compile, cfg.amp, cfg.data, cfg.out_dir) == (3e-4, 7, False, True, "x.npz", "o")
    assert from_cli(EXP1, ["--preset=exp4", "--seed=3", "--scale=paper"]) == dataclasses.replace(EXP4, seed=3)


def test_paper_scale_is_the_preset_untouched():
    for preset in (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6):
        assert from_cli(preset, ["--scale=paper"]) == preset


def test_cpu_scale_keeps_what_makes_each_experiment_itself():
    from configs import CPU_SCALE

    cpu = {p.name: from_cli(p, ["--scale=cpu"]) for p in (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6)}
    allowed = set(CPU_SCALE) | {"scale", "batch_size", "steps", "lr"}  # size, encoding, sampling, batch, schedule
    for preset in (EXP1, EXP2, EXP3, EXP4, EXP5, EXP6):
        assert changed(preset, cpu[preset.name]) <= allowed, preset.name
    assert changed(cpu["exp1"], cpu["exp2"]) == {"name", "amp"}
    assert changed(cpu["exp2"], cpu["exp3"]) == {"name", "batch_size", "steps"}
    assert cpu["exp3"].batch_size == 2 * cpu["exp2"].batch_size  # twice the batch, as in the paper
    assert cpu["exp3"].steps * 2 == cpu["exp2"].steps  # and the same rays seen, as the paper's equal epochs
    assert changed(cpu["exp1"], cpu["exp4"]) <= {"name", "model", "lr"} and cpu["exp4"].model == "bitnerf"
    assert changed(cpu["exp1"], cpu["exp5"]) == {"name"} and changed(cpu["exp4"], cpu["exp6"]) == {"name"}
    assert cpu["exp1"].width < EXP1.width and cpu["exp1"].batch_unit == "ray"


def test_explicit_overrides_win_over_the_scale_and_auto_follows_the_device():
    cfg = from_cli(EXP1, ["--scale=cpu", "--width=32", "--lr=1e-4"])
    assert (cfg.scale, cfg.width, cfg.lr) == ("cpu", 32, 1e-4)
    assert from_cli(EXP1, ["--device=cpu"]).scale == "cpu"
    assert from_cli(EXP1, ["--device=cuda:1"]).scale == "paper"
    assert from_cli(EXP1, ["--device=cpu", "--scale=auto"]).scale == "cpu"
    with pytest.raises(ConfigError, match="scale='huge'"):
        from_cli(EXP1, ["--scale=huge"])


@pytest.mark.parametrize("argv, message", [
    (["--bogus=1"], "unknown config key --bogus"),
    (["--lr=fast"], "--lr expects float"),
    (["--steps=1.5"], "--steps expects int"),
    (["--compile=maybe"], "--compile expects true/false"),
    (["--lr=0"], "lr must be > 0"),
    (["--n_samples=1"], "n_samples must be >= 2"),
    (["--near=6", "--far=2"], "need 0 <= near < far"),
    (["--device=tpu"], "device='tpu'"),
    (["--wandb=maybe"], "wandb='maybe' is not one of"),
    (["--bitnet_grad=fp16"], "bitnet_grad='fp16' is not one of auto, fp32, bf16"),
    (["--steps=-1"], "steps must be >= 0"),
    (["--preset=fast", "--viewdirs=true"], "model=grid has no direction branch: set --viewdirs=false"),
    (["--viewdirs", "--n_freqs_dirs=-1"], "n_freqs_dirs must be >= 0"),
    (["--preset=exp9"], "unknown preset"),
    (["lr=1"], "unexpected argument"),
])
def test_cli_rejects_bad_input(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        from_cli(EXP1, argv)


def test_config_round_trips_through_dict():
    for preset in PRESETS.values():
        assert config_from_dict(preset.to_dict()) == preset
    with pytest.raises(ConfigError, match="unknown keys"):
        config_from_dict({**EXP1.to_dict(), "extra": 1})


def test_experiment_script_reports_bad_flag_in_one_line():
    proc = subprocess.run([sys.executable, "exp1.py", "--bogus=1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key --bogus (see --help for the list)"


def test_saved_config_without_bitnet_norm_loads_with_the_norm():
    saved = EXP4.to_dict()
    del saved["bitnet_norm"]  # a config.json written before the key existed
    assert config_from_dict(saved) == EXP4 and config_from_dict(saved).bitnet_norm is True
    assert from_cli(EXP4, ["--bitnet_norm=false"]).bitnet_norm is False


def test_viewdirs_is_off_in_every_preset_and_a_saved_config_without_it_loads_without_it():
    assert not any(preset.viewdirs for preset in PRESETS.values())
    assert all(preset.n_freqs_dirs == 4 for preset in PRESETS.values())  # the original NeRF's L for directions
    for scale in ("paper", "cpu"):
        assert not from_cli(EXP1, [f"--scale={scale}"]).viewdirs
    saved = EXP1.to_dict()
    del saved["viewdirs"], saved["n_freqs_dirs"]  # a config.json or .bitnerf header written before the keys
    assert config_from_dict(saved) == EXP1
    cfg = from_cli(EXP4, ["--viewdirs", "--n_freqs_dirs=2"])
    assert cfg.viewdirs and cfg.n_freqs_dirs == 2 and cfg.model == "bitnerf"


def test_points_per_ray_and_rays_per_chunk_are_one_rule_for_sampler_renderer_and_bench():
    from assembly import build_renderer
    from configs import points_per_ray, rays_per_chunk

    stratified = dataclasses.replace(EXP1, n_samples=32, chunk_points=8192, skip=False)
    fine = dataclasses.replace(stratified, n_importance=16)
    # the fine pass evaluates the field again at all 32 + 16 samples, after the 32 coarse ones
    assert (points_per_ray(stratified), points_per_ray(fine)) == (32, 32 + 48)
    assert (rays_per_chunk(stratified), rays_per_chunk(fine)) == (256, 8192 // 80)
    assert rays_per_chunk(dataclasses.replace(fine, chunk_points=8)) == 1
    for cfg, occupancy in ((stratified, 1), (fine, 1), (dataclasses.replace(EXP1, chunk_points=8192), 16)):
        renderer = build_renderer(dataclasses.replace(cfg, width=8, depth=2, skip_layer=1, n_freqs=2,
                                                      occ_resolution=4), torch.device("cpu"))
        assert renderer.sampler.points_per_ray == points_per_ray(cfg)
        assert renderer.eval_chunk_rays() == rays_per_chunk(cfg) * occupancy


def test_bitnet_grad_reaches_every_quantized_layer(monkeypatch):
    from assembly import build_renderer
    import hardware

    tiny = dict(width=8, depth=2, skip_layer=1, n_freqs=2, occ_resolution=4, viewdirs=True)
    for choice, units, expected in (("fp32", True, False), ("bf16", False, True), ("auto", True, True),
                                    ("auto", False, False)):
        monkeypatch.setattr(hardware, "cpu_has_native_bf16", lambda: units)
        cfg = from_cli(dataclasses.replace(EXP4, **tiny), [f"--bitnet_grad={choice}"])
        field = build_renderer(cfg, torch.device("cpu")).field
        flags = [linear.bf16_grads for linear in field.quantized_linears()]
        assert len(flags) == cfg.depth + 2 and flags == [expected] * len(flags)  # hidden layers, feature, view


def test_help_describes_every_key_from_its_comment_and_shows_the_cli_scale(capsys):
    from configs import field_descriptions

    with pytest.raises(SystemExit) as done:
        from_cli(EXP1, ["--scale=paper", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    described = field_descriptions()
    for f in dataclasses.fields(Config):
        at = next(i for i, line in enumerate(lines) if line.startswith(f"  --{f.name}="))
        section, description = described[f.name]
        assert section and description, f.name
        assert lines[at + 1].startswith("      ") and lines[at + 1].strip(), f.name  # printed under the key
        assert description.split()[0] in lines[at + 1], f.name
    assert "  --scale=paper  (str: auto | paper | cpu; the default, auto, is paper on CUDA, cpu elsewhere" in text
    assert "  --lr=0.001  (cpu scale: 0.005)  (float)" in text  # the preset's value, and the other scale's
    assert "  --bitnet_norm=true  (bool)" in text  # the same at both scales: nothing beside it
    # the description is the comment above the field and the one at the end of its line
    assert described["bitnet_norm"][1].startswith("model=bitnerf: the RMSNorm before each BitLinear")
    assert described["width"] == ("model", "MLP width")


def without_cuda() -> dict:
    """The environment of a subprocess that sees no CUDA device, whatever this machine has."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def test_experiment_script_help_lists_every_key_at_the_scale_the_command_runs():
    proc = subprocess.run([sys.executable, "exp4.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=without_cuda())
    assert proc.returncode == 0, proc.stderr
    shown = proc.stdout
    assert all(f"--{f.name}=" in shown for f in dataclasses.fields(Config))
    assert shown.splitlines()[0] == "usage: python exp4.py [--key=value ...]   (preset: exp4)"
    # no CUDA: auto runs the cpu scale, and the paper scale's value stands beside each that differs
    assert "  --scale=cpu  (str: auto | paper | cpu; the default, auto, is paper on CUDA, cpu elsewhere: cpu here)" \
           in shown
    assert "  --lr=0.005  (paper scale: 5e-05)  (float)" in shown
    assert "  --width=128  (paper scale: 256)  (int)" in shown and "  --chunk_points=8192  (int)" in shown


def test_help_shows_what_the_command_runs_with(monkeypatch, capsys):
    def shown(argv: list[str]) -> list[str]:
        with pytest.raises(SystemExit) as done:
            from_cli(EXP4, argv, prog="python exp4.py")
        assert done.value.code == 0
        return capsys.readouterr().out.splitlines()

    paper = shown(["--scale=paper", "--help"])
    assert "  --lr=5e-05  (cpu scale: 0.005)  (float)" in paper and "  --width=256  (cpu scale: 128)  (int)" in paper
    assert "  --lr=0.002  (float)" in shown(["--help", "--lr=2e-3"])  # an override is the value at both scales
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_cuda = shown(["--help"])  # auto: the paper scale, with CUDA's micro-batches at both scales
    assert "  --lr=5e-05  (cpu scale: 0.005)  (float)" in on_cuda and "  --chunk_points=131072  (int)" in on_cuda
    assert on_cuda[0] == "usage: python exp4.py [--key=value ...]   (preset: exp4)"


def test_ddp_experiment_help_shows_its_torchrun_line(capsys):
    import train

    with pytest.raises(SystemExit) as done:
        train.main(EXP5, ["--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.splitlines()[0] == \
           "usage: torchrun --standalone --nproc_per_node=N exp5.py [--key=value ...]   (preset: exp5)"


def test_help_into_a_pipe_whose_reader_left_ends_quietly():
    read, write = os.pipe()
    os.close(read)  # as `| head` does once it has its lines
    try:
        proc = subprocess.run([sys.executable, "exp5.py", "--help"], cwd=ROOT, stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=120, env=without_cuda())
    finally:
        os.close(write)
    assert (proc.returncode, proc.stderr) == (141, "")  # 128 + SIGPIPE, no traceback


def test_a_device_this_machine_lacks_is_one_error_before_any_scale(monkeypatch, capsys):
    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.main(EXP1, ["--device=cuda"]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # no "scale paper (auto: CUDA available)" first
    assert err == "error: device=cuda requested but CUDA is not available (use --device=auto or cpu)\n"


def test_help_states_rules_not_measurements():
    import inspect

    from configs import field_descriptions

    measurement = re.compile(r"\d dB|\d(\.\d+)?x\b|bench\.py|EPYC|measured")
    quoted = {k: text for k, (_, text) in field_descriptions().items() if measurement.search(text)}
    assert not quoted
    assert "# measured: 1.16x (compiled)" in inspect.getsource(Config)  # the evidence stays beside the default
    assert field_descriptions()["chunk_points"][1].startswith("sample points per forward/backward micro-batch")


def test_the_first_line_names_the_scale_and_whether_amp_is_on():
    from configs import scale_line

    assert ", amp off, compile on" in scale_line(from_cli(EXP1, ["--scale=cpu"]), ["--scale=cpu"])
    assert ", amp on, compile on" in scale_line(from_cli(EXP2, ["--scale=cpu"]), ["--scale=cpu"])
