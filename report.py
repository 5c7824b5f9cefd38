"""Compare training runs: a markdown table and loss / PSNR plots, from the files each run wrote. Offline.

    python report.py runs/* [--out report.md] [--plots DIR]

The markdown goes to stdout (and to --out). The two plots, report_step.png and report_time.png, go to --plots,
else beside --out, else into the folder that holds the runs (runs/ for `runs/*`), never into the current folder
by default.

A run directory holds config.json (written when training starts), metrics.jsonl and, once finished,
summary.json and ckpt.pt; anything else given is skipped with a one-line warning. SSIM comes from an
evaluate.py JSON saved in the run directory (eval.json, else the newest eval*.json).
"""

from __future__ import annotations

import glob
import json
import os
import sys
from dataclasses import dataclass, field

from utils import ArgParser, UserError, run_cli


@dataclass
class Run:
    path: str
    label: str
    config: dict
    summary: dict | None  # None while training has not finished
    metrics: list[dict] = field(default_factory=list)
    evaluation: dict | None = None
    eval_path: str | None = None
    ckpt_bytes: int | None = None
    packed_bytes: int | None = None  # a packed ternary *.bitnerf export, if the run has one


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def read_json(path: str) -> dict | None:
    """The JSON object in `path`, or None (with a warning) when it is missing or unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as err:
        warn(f"cannot read {path} ({type(err).__name__}); ignoring it")
        return None
    return value if isinstance(value, dict) else None


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a malformed line (a run killed mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and "step" in record:
                records.append(record)
    return records


def find_eval(run_dir: str) -> str | None:
    preferred = os.path.join(run_dir, "eval.json")
    if os.path.exists(preferred):
        return preferred
    found = sorted(glob.glob(os.path.join(run_dir, "eval*.json")), key=os.path.getmtime)
    return found[-1] if found else None


def load_run(path: str) -> Run | None:
    """A Run, or None (with a warning) when `path` is not a run directory."""
    if not os.path.isdir(path):
        warn(f"skipping {path}: not a directory")
        return None
    config_path, summary_path = os.path.join(path, "config.json"), os.path.join(path, "summary.json")
    if not (os.path.exists(config_path) or os.path.exists(summary_path)):
        warn(f"skipping {path}: not a run (no config.json or summary.json)")
        return None
    config = read_json(config_path) if os.path.exists(config_path) else {}
    summary = read_json(summary_path) if os.path.exists(summary_path) else None
    if config is None or (config == {} and summary is None):
        warn(f"skipping {path}: its config.json / summary.json cannot be read")
        return None
    run = Run(path, os.path.basename(os.path.normpath(path)), config, summary,
              read_metrics(os.path.join(path, "metrics.jsonl")))
    run.eval_path = find_eval(path)
    run.evaluation = read_json(run.eval_path) if run.eval_path else None
    ckpt = os.path.join(path, "ckpt.pt")
    run.ckpt_bytes = os.path.getsize(ckpt) if os.path.exists(ckpt) else None
    packed = sorted(glob.glob(os.path.join(path, "*.bitnerf")))
    run.packed_bytes = os.path.getsize(packed[0]) if packed else None
    return run


# --- the table ---------------------------------------------------------------------------------------------------
def _last(records: list[dict], key: str):
    values = [r[key] for r in records if key in r]
    return values[-1] if values else None


def _fmt(value, spec: str = "", suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def si(value: float | None) -> str:
    """A number with an SI suffix: 1234567 -> '1.23M' (points per second span several orders of magnitude);
    None -> '—'."""
    if value is None:
        return "—"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def table_row(run: Run) -> dict[str, str]:
    """One run's table cells. A run without summary.json is unfinished: its figures come from metrics.jsonl."""
    s, c, m = run.summary or {}, run.config, run.metrics
    amp = s.get("amp") or (("on" if c.get("amp") else "off") if "amp" in c else None)
    rates = [r["points_per_s"] for r in m if "points_per_s" in r]
    ev = run.evaluation or {}
    return {
        "run": run.label + ("" if run.summary else " (unfinished)"),
        "model": s.get("model") or c.get("model") or "—",
        "AMP": amp or "—",
        "world": _fmt(s.get("world_size")),
        "steps": _fmt(s.get("steps", _last(m, "step"))),
        "val PSNR (dB)": _fmt(s.get("val_psnr", _last(m, "val_psnr")), ".2f"),
        "SSIM": _fmt(ev.get("ssim"), ".4f"),
        "train time (s)": _fmt(s.get("train_time_s", _last(m, "time_s")), ".0f"),
        "wall time (s)": _fmt(s.get("wall_time_s"), ".0f"),
        "points/s": si(s.get("train_points_per_s", sum(rates) / len(rates) if rates else None)),
        "params": _fmt(s.get("parameters"), ","),
        "ckpt (MB)": _fmt(None if run.ckpt_bytes is None else run.ckpt_bytes / 1e6, ".2f"),
        "packed (KB)": _fmt(None if run.packed_bytes is None else run.packed_bytes / 1e3, ".1f"),
    }


def markdown(columns: list[str], rows: list[dict[str, str]], left: tuple[str, ...] = ()) -> str:
    """A markdown table of `rows` (dicts of cell text) in `columns`; `left` columns are left-aligned (text),
    the others right-aligned (numbers). A '|' inside a cell is escaped."""
    def cell(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---" if k in left else "---:" for k in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(k, "—")) for k in columns) + " |" for row in rows]
    return "\n".join(lines)


def markdown_table(runs: list[Run]) -> str:
    rows = [table_row(r) for r in runs]
    columns = [k for k in rows[0] if k != "packed (KB)" or any(r.packed_bytes for r in runs)]
    return markdown(columns, rows, left=("run", "model", "AMP"))


def notes(runs: list[Run]) -> list[str]:
    """Where each SSIM came from (evaluate.py's data and split), so the number can be reproduced."""
    out = []
    for run in runs:
        if run.evaluation:
            ev = run.evaluation
            out.append(f"- {run.label}: SSIM from {run.eval_path} ({ev.get('split', '?')} views of "
                       f"{ev.get('data', '?')}, PSNR there {_fmt(ev.get('psnr'), '.2f')} dB)")
    return out


# --- the plots ---------------------------------------------------------------------------------------------------
def plot_curves(runs: list[Run], x_key: str, x_label: str, path: str) -> None:
    """Training loss (top, log scale) and PSNR (bottom: training line, validation markers) against x_key,
    one colour per run. 7 x 6 inches at 100 dpi: 700 px wide."""
    plt = pyplot()
    fig, (ax_loss, ax_psnr) = plt.subplots(2, 1, figsize=(7, 6), dpi=100, sharex=True)
    for k, run in enumerate(runs):
        colour = f"C{k % 10}"
        ax_loss.plot(*series(run.metrics, x_key, "loss"), color=colour, label=run.label)
        ax_psnr.plot(*series(run.metrics, x_key, "psnr"), color=colour, alpha=0.8)
        ax_psnr.plot(*series(run.metrics, x_key, "val_psnr"), "o", color=colour, markersize=5)
    loss_axis(ax_loss)
    ax_loss.legend(fontsize="small")
    ax_psnr.set_ylabel("PSNR (dB)")
    ax_psnr.set_xlabel(x_label)
    ax_psnr.plot([], [], "-", color="grey", label="training batches")
    ax_psnr.plot([], [], "o", color="grey", label="validation views")
    ax_psnr.legend(fontsize="small")
    save_figure(fig, [ax_loss, ax_psnr], path)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def series(records: list[dict], x_key: str, y_key: str) -> tuple[list, list]:
    """(xs, ys) of the records that hold both keys, in file order."""
    both = [r for r in records if x_key in r and y_key in r]
    return [r[x_key] for r in both], [r[y_key] for r in both]


def loss_axis(ax) -> None:
    """A log-scale training-loss axis with plain tick labels (not 1.9x10^-1 on short log ranges)."""
    import matplotlib.ticker

    ax.set_yscale("log")
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.3g}")
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(plain)
    ax.set_ylabel("training loss (MSE)")


def save_figure(fig, axes: list, path: str) -> None:
    """Light grids, tight layout, write `path`, free the figure."""
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)


def write_plots(runs: list[Run], folder: str) -> list[str]:
    with_metrics = [r for r in runs if r.metrics]
    if not with_metrics:
        warn("no run has metrics.jsonl records: no plots")
        return []
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, "report_step.png"), os.path.join(folder, "report_time.png")]
    plot_curves(with_metrics, "step", "step", paths[0])
    plot_curves(with_metrics, "time_s", "training time (s, wall clock; validation excluded)", paths[1])
    return paths


# --- command line ------------------------------------------------------------------------------------------------
def build_report(runs: list[Run], plot_paths: list[str], md_dir: str) -> str:
    parts = ["# Experiments", "", markdown_table(runs), ""]
    extra = notes(runs)
    if extra:
        parts += ["SSIM source:", *extra, ""]
    for path in plot_paths:
        rel = os.path.relpath(path, md_dir)
        parts += [f"![{os.path.splitext(os.path.basename(path))[0]}]({rel})", ""]
    return "\n".join(parts)


def runs_folder(runs: list[Run]) -> str:
    """The folder that holds the runs: their parents' common folder, or the first run's parent where that is the
    filesystem's root (runs from unrelated places)."""
    parents = [os.path.dirname(os.path.abspath(r.path)) for r in runs]
    common = os.path.commonpath(parents)
    return parents[0] if os.path.dirname(common) == common else common


def _parse(argv: list[str] | None):
    p = ArgParser(prog="report.py", description="Markdown table and plots comparing training runs.")
    p.add_argument("runs", nargs="+", help="run directories (e.g. runs/*)")
    p.add_argument("--out", help="also write the markdown here (e.g. report.md)")
    p.add_argument("--plots", help="folder for the PNG plots (default: beside --out, else the folder holding the "
                                   "runs)")
    return p.parse_args(argv)


def _report_cli(argv: list[str] | None) -> int:
    args = _parse(argv)
    runs = [run for run in map(load_run, args.runs) if run is not None]
    if not runs:
        raise UserError(f"none of the {len(args.runs)} path(s) given is a run directory")
    labels = [r.label for r in runs]
    for run in runs:
        if labels.count(run.label) > 1:  # same folder name under different parents
            run.label = os.path.normpath(run.path)
    md_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else os.getcwd()
    plot_paths = write_plots(runs, args.plots or (md_dir if args.out else runs_folder(runs)))
    text = build_report(runs, plot_paths, md_dir)
    print(text)
    if args.out:
        os.makedirs(md_dir, exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(lambda: _report_cli(argv))


if __name__ == "__main__":
    sys.exit(main())
