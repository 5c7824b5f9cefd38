"""The README and the pages of docs/, read as a user reads them: every command in them parses, every repository
file, test, attribute, page and section they point at exists (links across pages included), the experiments and
config tables say what configs.py does wherever they live, the README stays short and leads to every page, and
the tools write their files where the README says, into places git ignores.

Commands are checked without running them: a training script's `--key=value` overrides go through
configs.from_cli (unknown keys, bad types and invalid combinations are refused there); a tool's arguments go
through its own argparse parser.
"""

import argparse
import dataclasses
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

import configs
from experiments import REGISTRY
from tests.conftest import ROOT


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


README = _read("README.md")
# the pages a user reads: the README and the hand-written pages of docs/ (a study's generated results.md in a
# folder of docs/ is checked for diary lines only, below)
PAGES = {"README.md": README} | {
    f"docs/{name}": _read(f"docs/{name}") for name in sorted(os.listdir(os.path.join(ROOT, "docs")))
    if name.endswith(".md")}
DOC_PAGES = sorted(set(PAGES) - {"README.md"})
README_MAX_LINES = 250

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)


def code_blocks(text: str) -> list[str]:
    return FENCE.findall(text)


def prose(text: str) -> str:
    """The text outside fenced code blocks."""
    return FENCE.sub("", text)


def inline_spans(text: str) -> list[str]:
    """Inline code spans; one may break across a line (read as a space), as markdown's do, not a paragraph."""
    return [" ".join(span.split("\n")) for span in re.findall(r"`([^`]+)`", prose(text)) if "\n\n" not in span]


# --- commands ---------------------------------------------------------------------------------------------------
def command_lines(text: str) -> list[str]:
    """Every line of a code block (continuations joined) and every inline span that runs python or torchrun."""
    lines = []
    for block in code_blocks(text):
        lines += block.replace("\\\n", " ").splitlines()
    lines += inline_spans(text)
    found = []
    for line in lines:
        line = line.strip().lstrip("!")  # a notebook cell's shell line
        for part in shell_parts(line):
            words = part.split()
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
                words.pop(0)  # OMP_NUM_THREADS=1 python ...
            if words[:1] == ["taskset"] and len(words) > 2:
                del words[:3]  # taskset -c 0 python ...
            if words and (words[0] in ("python", "python3", "torchrun")):
                found.append(" ".join(words))
    return found


def shell_parts(line: str) -> list[str]:
    """A shell line cut at `&&` and `;` outside quotes (`python -c "import a; a.f()"` stays whole)."""
    parts, current, quote, i = [], "", None, 0
    while i < len(line):
        char = line[i]
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ";" or line.startswith("&&", i):
            parts.append(current)
            current, i = "", i + (2 if char == "&" else 1)
            continue
        current += char
        i += 1
    return parts + [current]


def script_and_args(command: str) -> tuple[str, list[str]] | None:
    """(script, arguments) of `python X.py ...` or `torchrun ... X.py ...`; None for `python -m ...` and prose."""
    words = shlex.split(command, comments=True)
    if words[0] == "torchrun":
        scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
        return (words[scripts[0]], words[scripts[0] + 1:]) if scripts else None
    if len(words) > 1 and words[1].endswith(".py"):
        return words[1], words[2:]
    return None


def commands(text: str) -> list[str]:
    return sorted({c for c in command_lines(text) if "|" in c or script_and_args(c)})


COMMANDS = commands(README)
PAGE_COMMANDS = [(page, command) for page, text in PAGES.items() for command in commands(text)]


def preset_of(script: str) -> configs.Config:
    """The preset a training script hands to train.main (train.py: exp1, which --preset=NAME replaces)."""
    if script == "train.py":
        return configs.EXP1
    with open(os.path.join(ROOT, script)) as f:
        match = re.search(r"\bmain\(REGISTRY\[\"(\w+)\"\]\.preset\)", f.read())
    assert match, f"{script} does not call train.main(REGISTRY[NAME].preset)"
    return REGISTRY[match.group(1)].preset


class Parsed(BaseException):
    """Raised in place of going on once a tool's parser has accepted its arguments."""


def parse_tool(monkeypatch, main, args: list[str]) -> None:
    """Run a tool's `main(args)` only as far as its argument parser: accepted arguments raise Parsed there."""
    real_known, real_full = argparse.ArgumentParser.parse_known_args, argparse.ArgumentParser.parse_args
    inside_full = []

    def parse_known_and_stop(self, args=None, namespace=None):
        result = real_known(self, args, namespace)
        if inside_full:  # parse_args asks first, then refuses what is left over
            return result
        raise Parsed(result)

    def parse_and_stop(self, args=None, namespace=None):
        inside_full.append(True)
        try:
            namespace = real_full(self, args, namespace)
        finally:
            inside_full.pop()
        raise Parsed(namespace)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_and_stop)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    try:
        code = main(args)
    except Parsed:
        return
    except SystemExit as done:  # --help
        assert done.code in (0, None), f"exit {done.code}"
        return
    pytest.fail(f"its parser refused the arguments (exit {code})")


# tools whose main() starts by parsing its arguments (module, entry point)
TOOL_MAINS = {"evaluate.py": ("evaluate", "main"), "render.py": ("render", "main"),
              "report.py": ("report", "main"), "export.py": ("export", "main")}


@pytest.mark.parametrize("page, command", PAGE_COMMANDS, ids=[f"{p}: {c}" for p, c in PAGE_COMMANDS])
def test_command_parses(page, command, monkeypatch, capsys):
    assert "|" not in command, "a '|' in a command pipes when it is pasted into a shell: write two commands"
    script, args = script_and_args(command)
    path = os.path.join(ROOT, script)
    assert os.path.isfile(path), f"{script} does not exist"
    with open(path) as f:
        source = f.read()
    if script == "train.py" or "from train import main" in source:
        try:
            configs.from_cli(preset_of(script), args)
        except SystemExit:  # --help prints the keys and exits
            assert "--help" in args or "-h" in args
        return
    module = importlib.import_module(script[:-3])
    if script in ("data_setup.py", "bench.py"):
        module.parse_args(args)
    elif script == "study.py":
        _, extras, entries = module.parse_args(args)
        module.check_overrides(extras)
        module.study_arms(entries)  # its variants and sweeps name known experiments and keys
    elif script in TOOL_MAINS:
        name, entry = TOOL_MAINS[script]
        parse_tool(monkeypatch, getattr(importlib.import_module(name), entry), args)
    elif args:  # another script: its main() must parse with argparse before doing anything
        assert "ArgumentParser" in source or "ArgParser" in source, f"no way to check {script}'s arguments"
        parse_tool(monkeypatch, module.main, args)


def test_the_readme_has_the_commands_a_newcomer_needs():
    """The extraction above must see the quickstart, or every check of it passes vacuously."""
    scripts = {script_and_args(c)[0] for c in COMMANDS}
    assert {"exp1.py", "evaluate.py", "render.py", "data_setup.py", "study.py", "exp5.py"} <= scripts
    assert any("--blender" in c for c in COMMANDS)


def test_command_checks_can_fail(monkeypatch):
    """A wrong key, a bad value, a refused combination and a tool's bad flag are all caught."""
    with pytest.raises(configs.ConfigError, match="unknown config key"):
        configs.from_cli(preset_of("exp1.py"), ["--lr_max=1"])
    with pytest.raises(configs.ConfigError, match="n_importance"):
        configs.from_cli(preset_of("exp1.py"), ["--n_importance=16"])
    for bad in (["--ckpt", "x.pt", "--split", "everything"], ["--ckpt", "x.pt", "--bogus"]):
        with pytest.raises(pytest.fail.Exception):
            parse_tool(monkeypatch, importlib.import_module("evaluate").main, bad)
    assert script_and_args("python -m pytest -q") is None
    assert "|" in "".join(command_lines("`python exp4.py|exp1.py --steps=1`"))
    assert command_lines("`OMP_NUM_THREADS=1 taskset -c 0 python exp1.py\n--steps=1` `cd x && python a.py; python b.py`"
                         "\n```bash\npython -c \"import a; a.f()\"\n```\n") == [
        'python -c "import a; a.f()"', "python exp1.py --steps=1", "python a.py", "python b.py"]


# --- files, tests, attributes, pages and sections they name -----------------------------------------------------
SOURCE_SUFFIXES = (".py", ".md", ".txt", ".cff", ".ini")
OUTPUT_ROOTS = ("runs/", "data/", "wandb/")  # what the tools write: not in a fresh clone


def named_paths(text: str, page: str = "README.md") -> list[str]:
    """Repository paths in inline code (a file or test name, or a path under an existing top-level folder: from the
    repository's root, where the commands run) and relative link targets (from the folder of `page`, as a
    browser follows them), both as paths from the root."""
    paths = []
    for span in inline_spans(text):
        token = span.strip()
        if not re.fullmatch(r"[\w.\-/]+(::\w+)?", token) or token.startswith(OUTPUT_ROOTS):
            continue
        file = token.split("::")[0]
        if "/" in file:
            if os.path.exists(os.path.join(ROOT, file.split("/")[0])):
                paths.append(token)
        elif file.endswith(SOURCE_SUFFIXES) or file == "LICENSE":
            paths.append(token)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if not re.match(r"[a-z]+:|#", target):
            paths.append(os.path.normpath(os.path.join(os.path.dirname(page), target.split("#")[0])))
    return sorted(set(paths))


PAGE_PATHS = [(page, path) for page, text in PAGES.items() for path in named_paths(text, page)]


@pytest.mark.parametrize("page, path", PAGE_PATHS, ids=[f"{p}: {q}" for p, q in PAGE_PATHS])
def test_named_path_exists(page, path):
    assert not path.startswith(".."), f"{path} is outside the repository"
    file, _, test = path.partition("::")
    assert os.path.exists(os.path.join(ROOT, file)), f"{file} does not exist"
    if test:
        with open(os.path.join(ROOT, file)) as f:
            assert re.search(rf"^def {test}\(", f.read(), re.M), f"{file} has no test {test}"


def named_attributes(text: str) -> list[tuple[str, str]]:
    """`module.NAME` spans where module.py is a file of the repository."""
    found = set()
    for span in inline_spans(text):
        match = re.fullmatch(r"([a-z_][a-z0-9_]*)\.([A-Za-z_]\w*)", span.strip())
        if match and not ("." + match.group(2)).endswith(SOURCE_SUFFIXES) and \
                os.path.isfile(os.path.join(ROOT, match.group(1) + ".py")):
            found.add(match.groups())
    return sorted(found)


PAGE_ATTRIBUTES = sorted({pair for text in PAGES.values() for pair in named_attributes(text)})


@pytest.mark.parametrize("module, name", PAGE_ATTRIBUTES)
def test_named_attribute_exists(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name} does not exist"


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), re.M):
        base = slug(heading)
        out.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return out


def test_every_section_link_has_its_section():
    targets = set(re.findall(r"\]\(#([^)]+)\)", prose(README)))
    assert targets and targets <= anchors(README), targets - anchors(README)


def section_links(text: str, page: str) -> list[tuple[str, str]]:
    """(page, anchor) of every link to a section: `#anchor` on `page` itself, `other.md#anchor` on another page
    (from `page`'s folder, as a path from the root)."""
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        file, hash_, anchor = target.partition("#")
        if hash_ and not re.match(r"[a-z]+:", target):
            found.append((os.path.normpath(os.path.join(os.path.dirname(page), file)) if file else page, anchor))
    return found


def _anchors_of(page: str) -> set[str]:
    path = os.path.join(ROOT, page)
    return anchors(_read(page)) if page.endswith(".md") and os.path.isfile(path) else set()


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_link_to_a_section_has_its_section(page):
    """In-page `#anchor` links and `page.md#anchor` links to another page land on an existing heading."""
    missing = [f"{target}#{anchor}" for target, anchor in section_links(PAGES[page], page)
               if anchor not in _anchors_of(target)]
    assert missing == []


def test_the_pages_link_each_other():
    """The cross-page check sees links both ways, or it passes vacuously."""
    readme_to_docs = {t for t, _ in section_links(README, "README.md") if t.startswith("docs/")}
    docs_to_readme = {p for p in DOC_PAGES for t, _ in section_links(PAGES[p], p) if t == "README.md"}
    assert len(readme_to_docs) >= 3 and docs_to_readme


def test_path_and_link_checks_can_fail():
    assert named_paths("`tests/test_nothing.py::test_x` `confgs.py` [x](docs/none.md) `runs/a/ckpt.pt`") == [
        "confgs.py", "docs/none.md", "tests/test_nothing.py::test_x"]
    assert named_paths("[r](../README.md) [n](none.md#a) `tests/conftest.py`", "docs/x.md") == [
        "README.md", "docs/none.md", "tests/conftest.py"]
    assert anchors("## GPUs: CUDA, Colab\n### A\n### A") == {"gpus-cuda-colab", "a", "a-1"}
    assert section_links("[a](#x) [b](../README.md#quickstart) [c](gpu.md#no-such-section) [d](https://a.b/#c)",
                         "docs/x.md") == [("docs/x.md", "x"), ("README.md", "quickstart"),
                                          ("docs/gpu.md", "no-such-section")]
    assert "quickstart" in _anchors_of("README.md") and "no-such-section" not in _anchors_of("docs/gpu.md")
    assert _anchors_of("docs/none.md") == set()


# --- the README: short, and a way into every page -----------------------------------------------------------------
def test_the_readme_is_short():
    assert README.count("\n") <= README_MAX_LINES


def test_the_readme_links_every_page_of_docs():
    linked = set(named_paths(README))
    assert [p for p in DOC_PAGES if p not in linked] == []


@pytest.mark.parametrize("page", DOC_PAGES)
def test_each_page_has_one_title(page):
    headings = re.findall(r"^(#{1,6}) ", prose(PAGES[page]), re.M)
    assert PAGES[page].startswith("# ") and headings.count("#") == 1


# --- documentation for users, not a build diary ------------------------------------------------------------------
DIARY = re.compile(r"\b(last|earlier|previous|this|that|one) (session|sitting)\b|\bissue ?#?\d+|\bthe issue'?s?\b"
                   r"|\bwas before\b|\bno longer\b|\bused to\b|\bbefore this (work|change)\b|\bwere rerun\b"
                   r"|\bpreviously\b", re.I)


def documents() -> list[str]:
    paths = [os.path.join(ROOT, "README.md")]
    for folder, _, files in os.walk(os.path.join(ROOT, "docs")):
        paths += [os.path.join(folder, f) for f in files if f.endswith(".md")]
    return paths


@pytest.mark.parametrize("path", documents(), ids=lambda p: os.path.relpath(p, ROOT))
def test_documents_describe_the_code_not_its_history(path):
    with open(path, encoding="utf-8") as f:
        hits = [line.strip() for line in f if DIARY.search(line)]
    assert hits == []


def test_diary_check_can_fail():
    assert DIARY.search("0.63 dB with last session's layer") and DIARY.search("bench notes (issue 10)")
    assert DIARY.search("as previously measured")
    assert not DIARY.search("wall_time_s (over all sessions of a resumed run)")


# --- the tables --------------------------------------------------------------------------------------------------
def table_after(heading: str, text: str = README) -> list[dict]:
    """The first table after the line `heading`, as one dict per row keyed by the header's cells."""
    lines = prose(text).splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    header, body = rows[0], rows[2:]
    return [dict(zip(header, cells)) for cells in body]


def settings(cell: str) -> dict:
    """{key: typed value} of the `key=value` spans in a cell."""
    types = {f.name: configs._field_type(f) for f in dataclasses.fields(configs.Config)}
    out = {}
    for key, raw in re.findall(r"`(\w+)=([^`]+)`", cell):
        assert key in types, f"{key} is not a config key"
        out[key] = configs.parse_value(key, raw, types[key])
    return out


def changes(a: configs.Config, b: configs.Config) -> dict:
    return {f.name: getattr(a, f.name) for f in dataclasses.fields(configs.Config)
            if f.name != "name" and getattr(a, f.name) != getattr(b, f.name)}


def headings_titled(title: str) -> list[tuple[str, str]]:
    """(page, heading line) of every heading, at any level, titled `title` on the pages."""
    return [(page, line) for page, text in PAGES.items() for line in prose(text).splitlines()
            if re.fullmatch(r"#{1,6} " + re.escape(title), line)]


def table_under(title: str) -> list[dict]:
    """The first table after the one heading titled `title`, on whichever page holds it; no rows unless exactly
    one page has such a heading (which test_each_checked_table_has_one_home reports)."""
    found = headings_titled(title)
    return table_after(found[0][1], PAGES[found[0][0]]) if len(found) == 1 else []


CHECKED_TABLES = ("The experiments", "Config reference")


@pytest.mark.parametrize("title", CHECKED_TABLES)
def test_each_checked_table_has_one_home(title):
    assert len(headings_titled(title)) == 1, f"headings titled {title!r}: {headings_titled(title)}"


EXPERIMENT_ROWS = table_under("The experiments")


@pytest.mark.parametrize("row", EXPERIMENT_ROWS, ids=lambda r: r["script"].strip("`"))
def test_experiment_row_is_what_the_preset_changes(row):
    script = row["script"].strip("`")
    preset = preset_of(script)
    assert row["builds on"] == (REGISTRY[preset.name].baseline or "—")  # built on what it is compared with
    base = None if row["builds on"] == "—" else REGISTRY[row["builds on"]].preset
    for scale, column in (("paper", "changes, paper scale"), ("cpu", "changes, cpu scale")):
        said = settings(row[column])
        actual = {} if base is None else changes(configs.apply_scale(preset, scale),
                                                 configs.apply_scale(base, scale))
        assert said == actual, f"{script} at the {scale} scale"
    launched = script_and_args(row["launch"].strip("`"))
    assert launched and launched[0] == script


def test_every_numbered_experiment_has_a_row():
    listed = {preset_of(r["script"].strip("`")).name for r in EXPERIMENT_ROWS}
    assert listed == set(REGISTRY)


def test_table_checks_can_fail():
    assert changes(configs.EXP2, configs.EXP1) == {"amp": True}
    assert settings("`amp=true`, `batch_size=8`") == {"amp": True, "batch_size": 8}
    assert settings("`amp=true`") != changes(configs.EXP3, configs.EXP1)
    assert table_after("# T", "# T\ntext\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\nafter\n") == [{"a": "1", "b": "2"}]
    assert headings_titled("No such table") == [] and table_under("No such table") == []


CONFIG_ROWS = [r for r in table_under("Config reference") if r["key"].startswith("`")]


def cell_value(key: str, cell: str):
    raw = re.search(r"`([^`]*)`", cell).group(1)
    raw = "" if raw == '""' else raw
    return configs.parse_value(key, raw, configs._field_type(
        next(f for f in dataclasses.fields(configs.Config) if f.name == key)))


def test_config_reference_lists_every_key_once():
    keys = [r["key"].strip("`") for r in CONFIG_ROWS]
    assert len(keys) == len(set(keys))
    assert set(keys) == {f.name for f in dataclasses.fields(configs.Config)}


@pytest.mark.parametrize("row", CONFIG_ROWS, ids=lambda r: r["key"].strip("`"))
def test_config_reference_values_are_exp1s_at_both_scales(row):
    key = row["key"].strip("`")
    paper = cell_value(key, row["paper"])
    cpu = paper if row["cpu"] == "same" else cell_value(key, row["cpu"])
    assert paper == getattr(configs.EXP1, key), "paper"
    assert cpu == getattr(configs.apply_scale(configs.EXP1, "cpu"), key), "cpu"


# --- where the tools write ---------------------------------------------------------------------------------------
def test_report_plots_go_beside_the_runs_not_into_the_current_folder(tmp_path, monkeypatch, capsys):
    import report

    runs, cwd = tmp_path / "runs", tmp_path / "cwd"
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.json").write_text(json.dumps({"name": name}))
        records = [{"step": s, "loss": 0.1 / s, "psnr": 10.0 + s, "time_s": float(s)} for s in (1, 2, 3)]
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert report.main([str(runs / "a"), str(runs / "b")]) == 0
    assert os.listdir(cwd) == []
    assert {"report_step.png", "report_time.png"} <= set(os.listdir(runs))
    assert "runs/report_step.png" in capsys.readouterr().out  # the printed markdown links them


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="needs a git checkout")
@pytest.mark.parametrize("path", ["runs/exp1/ckpt.pt", "runs/study/results.md", "data/lego100.npz",
                                  "data/tiny_nerf_data.npz", "wandb/run/x", "model.bitnerf", "ckpt.pt",
                                  "report_step.png", "report_time.png", "report.md", "eval.json"])
def test_gitignore_covers_what_the_tools_write(path):
    ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT).returncode == 0
    assert ignored, f"{path} would show up in `git status`"
