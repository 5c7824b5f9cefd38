"""A study's results page (OUT/results.md and its figures), from the run folders study.py filled.

One row per experiment or variant (mean ± standard deviation over seeds), then one line per comparison of an arm
with the one it derives from, each number with its 95% confidence interval over paired seeds (stats.py), and
figures with a band over seeds. Everything here is read back from the runs' own files (summary.json, eval.json,
metrics.jsonl, study.json) through report.py's loaders.
"""

from __future__ import annotations

import math
import os
import shlex
from dataclasses import dataclass

import report
import stats
from experiments import FIRST_SEED, METRICS, REGISTRY



@dataclass
class Finished:
    """A finished run as its folder holds it."""
    trial: object  # study.Trial: .arm, .k, .run_dir, .cfg
    run: report.Run
    memory: dict  # RUN/study.json: peak memory of its launches


def collect(trials: list) -> dict[str, list[Finished]]:
    """{arm name: its finished runs, by seed}, in the study's order; unfinished runs are left out."""
    groups: dict[str, list[Finished]] = {}
    for t in sorted(trials, key=lambda t: t.k):
        if not os.path.exists(os.path.join(t.run_dir, "summary.json")):
            continue
        run = report.load_run(t.run_dir)
        memory_path = os.path.join(t.run_dir, "study.json")
        memory = (report.read_json(memory_path) if os.path.exists(memory_path) else None) or {}
        if run and run.summary:
            groups.setdefault(t.exp, []).append(Finished(t, run, memory))
    order = list(dict.fromkeys(t.exp for t in trials))
    return {name: groups[name] for name in order if name in groups}


def value(f: Finished, key: str) -> float | None:
    """One number of a finished run: held-out metrics from eval.json, the rest from summary.json, study.json,
    metrics.jsonl and the file sizes."""
    s, ev, run = f.run.summary, f.run.evaluation or {}, f.run
    if key == "loss_noise":
        return stats.loss_noise([r["loss"] for r in run.metrics if "loss" in r])
    found = {
        "psnr": ev.get("psnr", s.get("val_psnr")), "ssim": ev.get("ssim"), "depth_mae": ev.get("depth_mae"),
        "background_opacity": ev.get("background_opacity"), "train_s": s.get("train_time_s"),
        "points": s.get("train_points_per_s"), "steps": s.get("steps"), "peak_mb": f.memory.get("peak_rss_mb"),
        "sum_mb": f.memory.get("workers_rss_sum_mb"),
        "ckpt_mb": None if run.ckpt_bytes is None else run.ckpt_bytes / 1e6,
        "packed_kb": None if run.packed_bytes is None else run.packed_bytes / 1e3,
    }[key]
    return None if found is None else float(found)


def values(group: list[Finished], key: str) -> list[float]:
    return [v for v in (value(f, key) for f in group) if v is not None]


def stat_cell(xs: list[float], fmt) -> str:
    """'x' for one value, 'mean ± sd' over seeds, '—' for none. fmt: a format spec or a function."""
    show = fmt if callable(fmt) else (lambda v: f"{v:{fmt}}")
    if not xs:
        return "—"
    mean, sd = stats.mean_sd(xs)
    return show(mean) if len(xs) == 1 else f"{show(mean)} ± {show(sd)}"


# --- the table ------------------------------------------------------------------------------------------------------
COLUMNS = ("experiment", "differs from", "model", "lr", "batch", "steps", "AMP", "world", "train (s)", "points/s",
           "peak RSS (MB)", "PSNR (dB)", "SSIM", "depth MAE", "loss noise", "bg opacity", "ckpt (MB)",
           ".bitnerf (KB)", "note")
TEXT_COLUMNS = ("experiment", "differs from", "model", "batch", "AMP", "note")
IGNORED = {"name", "out_dir", "seed"}


def differs(name: str, shared: dict, world: int) -> str:
    """What the arm changes relative to the one it derives from, from the two configs (and the process count)."""
    arm, c = shared["arms"][name], shared["configs"]
    if not arm.base or arm.base not in c:
        return REGISTRY[name].what if name in REGISTRY else "—"
    cfg, base = c[name], c[arm.base]
    keys = [k for k in cfg.to_dict() if k not in IGNORED and getattr(cfg, k) != getattr(base, k)]
    parts = [k if getattr(cfg, k) is True else f"{k}={getattr(cfg, k)}" for k in keys]
    parts += [f"world size {world}"] if world > 1 else []
    return f"{arm.base}: {', '.join(parts) or 'nothing but the launcher'}"


def steps_cell(name: str, group: list[Finished], shared: dict) -> str:
    """Steps done (mean ± sd); 'of P' when the time budget stopped it before its schedule's P."""
    done, planned = values(group, "steps"), shared["planned"][name]
    cell = stat_cell(done, ".0f")
    return cell + (f" of {planned}" if done and max(done) < planned else "")


def memory_cell(group: list[Finished]) -> str:
    """Peak RSS of the largest process; for torchrun, the sum over its workers follows."""
    cell = stat_cell(values(group, "peak_mb"), ".0f")
    total = values(group, "sum_mb")
    return cell + (f" per process (workers' sum {stat_cell(total, '.0f')})" if total else "")


def note(name: str, shared: dict) -> str:
    """Where the arm's design confounds its comparison, from the configs."""
    arm, c, planned = shared["arms"][name], shared["configs"], shared["planned"]
    notes = []
    if arm.base in c and c[name].batch_size != c[arm.base].batch_size:
        rays = [planned[n] * c[n].batch_size for n in (name, arm.base)]
        same = "equal epochs" if rays[0] == rays[1] else "equal steps" if planned[name] == planned[arm.base] else (
            "different budgets")
        notes.append(f"{same}: {planned[name]} planned steps of {c[name].batch_size} vs {arm.base}'s "
                     f"{planned[arm.base]} of {c[arm.base].batch_size}")
    if arm.torchrun:
        if shared["nproc"] == 1:
            notes.append("world size 1 (one GPU): the same computation as without DDP")
        elif not shared["cuda"]:
            notes.append(f"{shared['nproc']} processes share {shared['cores']} CPU core{'s' * (shared['cores'] > 1)} "
                         f"({shared['threads'] or 'default'} thread(s) each); single-process runs use the same "
                             f"core{'s' * (shared['cores'] > 1)}")
    return "; ".join(notes)


def table_row(name: str, group: list[Finished], shared: dict) -> dict[str, str]:
    """One arm's cells: its first seed's settings, every seed's numbers (mean ± sd)."""
    first = group[0]
    cfg, s = first.trial.cfg, first.run.summary
    world = int(s.get("world_size", 1))
    cells = {
        "experiment": name, "differs from": differs(name, shared, world),
        "model": f"{cfg.model} {cfg.depth}×{cfg.width}, L={cfg.n_freqs}", "lr": f"{cfg.lr:g}",
        "batch": f"{cfg.batch_size} {cfg.batch_unit}s", "steps": steps_cell(name, group, shared),
        "AMP": str(s.get("amp", "—")), "world": str(world), "peak RSS (MB)": memory_cell(group),
        "note": note(name, shared),
    }
    for column, key, fmt in (("train (s)", "train_s", ".0f"), ("points/s", "points", report.si),
                             ("PSNR (dB)", "psnr", ".2f"), ("SSIM", "ssim", ".4f"), ("depth MAE", "depth_mae", ".4f"),
                             ("loss noise", "loss_noise", ".3f"), ("bg opacity", "background_opacity", ".4f"),
                             ("ckpt (MB)", "ckpt_mb", ".2f"), (".bitnerf (KB)", "packed_kb", ".1f")):
        cells[column] = stat_cell(values(group, key), fmt)
    return cells


def results_table(groups: dict[str, list[Finished]], shared: dict) -> str:
    """The markdown table, without the columns no arm has a value for."""
    rows = [table_row(name, group, shared) for name, group in groups.items()]
    columns = [c for c in COLUMNS if any(row[c] not in ("—", "") for row in rows)]
    return report.markdown(columns, rows, left=TEXT_COLUMNS)


# --- the comparisons ------------------------------------------------------------------------------------------------
METHOD = ("Each comparison pairs seed k of an arm with seed k of the one it derives from (the same data order; the "
          "same initial weights where the models have the same shape) and gives the mean paired difference with "
          "its 95% confidence interval, Student's t over the seeds (n - 1 degrees of freedom); points/s as the "
          "geometric-mean ratio with its interval, from the logarithms. A difference is claimed only when its "
          "interval excludes zero (a ratio's: 1). With one seed there is no interval: the seed-to-seed spread is "
          "unknown, and the page gives instead how the held-out views differ from each other, which bounds "
          "nothing about another seed.")
NAMES = {"psnr": "held-out PSNR", "ssim": "SSIM", "depth_mae": "depth MAE", "loss_noise": "loss noise",
         "points": "points/s"}
UNITS = {"psnr": (2, " dB"), "ssim": (4, ""), "depth_mae": (4, ""), "loss_noise": (3, "")}
PER_VIEW = {"psnr", "ssim", "depth_mae"}
SCENE_KEYS = ("data", "downscale", "background", "val_views")  # arms on other data are not compared


def signed(x: float, digits: int) -> str:
    """+0.00 rather than -0.00 for a difference that rounds to nothing."""
    return f"{round(x, digits) + 0.0:+.{digits}f}"


def paired(new: list[Finished], base: list[Finished], key: str) -> tuple[list[float], list[float]]:
    """The two arms' values of `key` for the seeds both have, in seed order."""
    a = {f.trial.k: value(f, key) for f in new}
    b = {f.trial.k: value(f, key) for f in base}
    ks = sorted(k for k in a if k in b and a[k] is not None and b[k] is not None)
    return [a[k] for k in ks], [b[k] for k in ks]


def per_view(f: Finished, key: str) -> list[float]:
    return [v[key] for v in (f.run.evaluation or {}).get("per_view", []) if v.get(key) is not None]


def verdict(interval: stats.Interval, neutral: float = 0.0) -> str:
    """'a difference' or 'no difference shown', from where the interval lies."""
    low, high = interval.low - neutral, interval.high - neutral
    return "a difference" if low > 0 or high < 0 else "no difference shown (the interval holds " + (
        "1×" if neutral else "0") + ")"


def compare(key: str, new: list[Finished], base: list[Finished]) -> str | None:
    """One number of one comparison: its mean difference (or ratio), interval and verdict; None if unmeasured."""
    a, b = paired(new, base, key)
    if not a:
        return None
    if key == "points":
        interval = stats.paired_ratio(a, b)
        head = f"points/s {interval.mean if interval else a[0] / b[0]:.2f}×"
        if interval:
            return f"{head} [{interval.low:.2f}, {interval.high:.2f}], {verdict(interval, 1.0)}"
        return f"{head} (one seed, no interval over seeds)"
    digits, unit = UNITS[key]
    diff = sum(x - y for x, y in zip(a, b)) / len(a)
    head = f"{NAMES[key]} {signed(diff, digits)}{unit} ({sum(a) / len(a):.{digits}f} vs {sum(b) / len(b):.{digits}f})"
    interval = stats.paired_difference(a, b)
    if interval:
        return (f"{head}, 95% interval [{signed(interval.low, digits)}, {signed(interval.high, digits)}]{unit} over "
                f"{interval.n} seeds, {verdict(interval)}")
    views = views_interval(key, new[0], base[0])
    return f"{head} (one seed, no interval over seeds" + (f"; {views}" if views else "") + ")"


def views_interval(key: str, new: Finished, base: Finished) -> str:
    """With one seed: how the paired per-view differences spread over the held-out views."""
    if key not in PER_VIEW:
        return ""
    a, b = per_view(new, key), per_view(base, key)
    interval = stats.paired_difference(a, b) if len(a) == len(b) else None
    if interval is None:
        return ""
    digits, unit = UNITS[key]
    return (f"over the {interval.n} held-out views [{signed(interval.low, digits)}, "
            f"{signed(interval.high, digits)}]{unit}, 95%: how views differ, not how runs do")


def extra_facts(name: str, base: str, groups: dict, shared: dict) -> list[str]:
    """Sentences the comparison of `name` with `base` needs beyond its numbers: confounds, sizes, AMP dtype."""
    group = groups[name]
    facts = [note(name, shared)] if note(name, shared) and base == shared["arms"][name].base else []
    if shared["configs"][name].amp:
        facts.insert(0, f"AMP dtype {group[0].run.summary.get('amp')}")
    packed, params = values(group, "packed_kb"), groups[base][0].run.summary.get("parameters")
    if packed and params and shared["configs"][base].model != "bitnerf":
        facts.append(f"packed .bitnerf {stats.mean_sd(packed)[0]:.1f} KB vs {base}'s {params * 4 / 1e3:.1f} KB "
                     f"of fp32 weights ({params:,} parameters; ckpt.pt also holds the optimizer state)")
    if stats.mean_sd(values(group, "steps") or [0])[0] != stats.mean_sd(values(groups[base], "steps") or [0])[0]:
        steps = [stat_cell(values(groups[n], "steps"), ".0f") for n in (name, base)]
        facts.append(f"steps done {steps[0]} vs {steps[1]}")
    return facts


def comparisons(groups: dict[str, list[Finished]], shared: dict) -> list[str]:
    """One markdown bullet per arm that has a base, then per pair the plan asks for (`compare A B`): each of its
    numbers against the other's, with intervals."""
    pairs = [(f"**{arm.question}** ({name} vs {arm.base})", name, arm.base, arm.metrics)
             for name, arm in shared["arms"].items() if arm.base]
    pairs += [(f"**{name} vs {base}**", name, base, METRICS) for name, base in shared.get("pairs", ())]
    return [comparison(title, name, base, metrics, groups, shared) for title, name, base, metrics in pairs]


def comparison(title: str, name: str, base: str, metrics: tuple[str, ...], groups: dict, shared: dict) -> str:
    if name not in groups or base not in groups:
        return f"- {title}: not measured in this study."
    cfg, base_cfg = shared["configs"][name], shared["configs"][base]
    scene = [k for k in SCENE_KEYS if getattr(cfg, k) != getattr(base_cfg, k)]
    if scene:
        return f"- {title}: not compared, the data differ ({', '.join(scene)}); its variants are."
    parts = [c for c in (compare(k, groups[name], groups[base]) for k in metrics) if c]
    return f"- {title}: " + "; ".join(parts + extra_facts(name, base, groups, shared)) + "."


# --- the figures ----------------------------------------------------------------------------------------------------
def band(group: list[Finished], x_key: str, y_key: str, log: bool = False):
    """(xs, mean ys, sd ys) over seeds at the records (steps) every seed logged; xs are the seeds' mean x."""
    curves = [{r["step"]: (r[x_key], r[y_key]) for r in f.run.metrics if x_key in r and y_key in r} for f in group]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    xs, means, sds = [], [], []
    for step in steps:
        ys = [math.log(c[step][1]) if log else c[step][1] for c in curves]
        mean, sd = stats.mean_sd(ys)
        xs.append(sum(c[step][0] for c in curves) / len(curves))
        means.append(mean)
        sds.append(sd)
    return xs, means, sds


def plot_band(groups: dict[str, list[Finished]], x_key: str, y_key: str, path: str, x_label: str,
              log: bool = False) -> None:
    """Mean over seeds of y against x, one colour per arm, with a ±1 sd band where there are several seeds."""
    plt = report.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for i, (name, group) in enumerate(groups.items()):
        xs, mean, sd = band(group, x_key, y_key, log)
        if not xs:
            continue
        low = [m - s for m, s in zip(mean, sd)]
        high = [m + s for m, s in zip(mean, sd)]
        if log:
            mean, low, high = ([math.exp(v) for v in seq] for seq in (mean, low, high))
        colour = f"C{i % 10}"
        ax.plot(xs, mean, marker="o" if y_key == "val_psnr" else None, color=colour, markersize=3,
                label=f"{name} ({len(group)} seed{'s' if len(group) > 1 else ''})",
                linestyle="--" if i >= 10 else "-")  # ten colours: the eleventh arm on is dashed
        if len(group) > 1:
            ax.fill_between(xs, low, high, color=colour, alpha=0.2, linewidth=0)
    if log:
        report.loss_axis(ax)
    else:
        ax.set_ylabel("held-out PSNR (dB)")
    ax.set_xlabel(x_label)
    ax.legend(fontsize="x-small", ncol=2)
    report.save_figure(fig, [ax], path)


def plot_psnr_time(groups: dict[str, list[Finished]], path: str) -> None:
    plot_band(groups, "time_s", "val_psnr", path, "training time (s; validation excluded; mean over seeds)")


def plot_loss_step(groups: dict[str, list[Finished]], path: str) -> None:
    plot_band(groups, "step", "loss", path, "step", log=True)


def plot_views(groups: dict[str, list[Finished]], path: str, view: int = 0) -> bool:
    """Held-out view `view`: ground truth, then each arm's prediction (first seed), from RUN/val PNGs
    (ground truth | prediction | depth). False when no run has the image."""
    import imageio.v3 as iio

    panels = []
    for name, group in groups.items():
        png = os.path.join(group[0].run.path, "val", f"view{view:03d}.png")
        if os.path.exists(png):
            image = iio.imread(png)
            third = image.shape[1] // 3
            psnr = next((v["psnr"] for v in (group[0].run.evaluation or {}).get("per_view", [])
                         if v["view"] == view), None)
            panels.append((name, image[:, :third], image[:, third:2 * third], psnr))
    if not panels:
        return False
    plt = report.pyplot()
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(1.8 * (len(panels) + 1), 2.3), dpi=100)
    shown = [("ground truth", panels[0][1])] + [
        (name + ("" if psnr is None else f"\n{psnr:.2f} dB"), pred) for name, _, pred, psnr in panels]
    for ax, (title, image) in zip(axes, shown):
        ax.imshow(image)
        ax.set_title(title, fontsize="small")
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


# --- results.md -----------------------------------------------------------------------------------------------------
def setup_lines(groups: dict, shared: dict) -> list[str]:
    """How the study was run, and how to reproduce it."""
    budget = ", ".join(x for x in (f"{shared['minutes']:g} min of training" if shared["minutes"] else "",
                                   f"--steps={shared['steps']}" if shared["steps"] else "") if x)
    any_run = next(iter(groups.values()))[0]
    ddp = [n for n, a in shared["arms"].items() if a.torchrun]
    seeds = ", ".join(str(FIRST_SEED + k) for k in range(shared["seeds"]))
    return [f"- scale **{shared['scale']}**{' (auto)' if shared['scale_auto'] else ''}, data `{shared['data']}`, "
            f"budget {budget or 'the schedule of the scale'} per run, {shared['seeds']} seed(s) ({seeds}), run "
            f"seed by seed; device {any_run.run.summary.get('device', '?')}, {shared['cores']} CPU "
            f"core{'s' if shared['cores'] > 1 else ''}",
            (f"- {', '.join(ddp)} under torchrun with {shared['nproc']} process(es); " if ddp else "- ") +
            f"every run `--video=false` unless overridden; overrides for all: `{' '.join(shared['extras']) or 'none'}`",
            f"- reproduce (skips what is done): `python study.py {shlex.join(shared['argv'])}`"]


def provenance_line(groups: dict) -> str:
    """What the runs were measured with (commit, torch, Python, machine, dates), from their summary.json; a study
    whose runs disagree on any of these says so, since its comparisons then mix code or machines."""
    found = [f.run.summary.get("provenance") or {} for group in groups.values() for f in group]
    def one(key: str) -> str:
        seen = sorted({p.get(key, "not recorded") for p in found})
        return seen[0] if len(seen) == 1 else "MIXED: " + " | ".join(seen)
    dates = sorted(p["date"] for p in found if "date" in p)
    when = f"{dates[0]} to {dates[-1]}" if dates else "not recorded"
    return (f"- measured at commit `{one('commit')}`, torch {one('torch')}, Python {one('python')}, on "
            f"{one('machine')}, {when}")


def column_notes(groups: dict) -> list[str]:
    views = next(iter(groups.values()))[0].run.evaluation or {}
    return [
        f"- PSNR, SSIM{', depth MAE' if views.get('depth_mae') is not None else ''}: evaluate.py's code over "
        f"every held-out view ({views.get('views', '?')} views; RUN/eval.json); ± is the standard deviation over "
        f"seeds.",
        "- train (s): training time without validation; points/s: sample points per second of training, over all "
        "processes, from summary.json; steps: done, 'of N' where the time budget stopped the schedule.",
        "- loss noise: the standard deviation of log(training loss) around its 9-record moving average over the "
        "second half of the run (0.1: the logged loss strays ~10% from its trend).",
        "- peak RSS: the largest peak resident set (VmHWM, polled from /proc) of the training process; for "
        "torchrun rows the largest of its workers, then their sum.",
        "- ckpt: ckpt.pt (float weights + optimizer state); .bitnerf: export.py's packed ternary file.",
    ]


FIGURES = (("held-out PSNR against training time", "psnr_time.png", plot_psnr_time),
           ("training loss against step", "loss_step.png", plot_loss_step),
           ("held-out view 0: ground truth, then each arm", "views.png", plot_views))


def write_results(trials: list, shared: dict) -> str:
    """OUT/results.md and its figures from the finished runs; returns its path."""
    out = shared["out"]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "results.md")
    groups = collect(trials)
    if not groups:
        with open(path, "w") as f:
            f.write("# Study\n\nNo run has finished yet.\n")
        return path
    parts = [f"# Study: {', '.join(groups)}", "", *setup_lines(groups, shared), provenance_line(groups), "",
             results_table(groups, shared), "", *column_notes(groups), "", "## Comparisons", "", METHOD, "",
             *comparisons(groups, shared), "", "## Figures", ""]
    for title, name, plot in FIGURES:
        if plot(groups, os.path.join(out, name)) is not False:
            parts += [f"![{title}]({name})", ""]
    missing = [t.label for t in trials if t.exp not in groups or t not in [f.trial for f in groups[t.exp]]]
    if missing:
        parts += [f"Not finished (left out above): {', '.join(missing)}.", ""]
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path
