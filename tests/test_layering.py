"""Every import points down the layers (../README's layering; no cycles), read from the source with ast.

Imports inside functions count as much as those at the top. The one exception is the body of a module's
`if __name__ == "__main__":` block: it runs only when the file is the program, which is then an entry point
(so `python render.py` may reach the assembly layer while `import render` does not).
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import modules of its own layer or below, and the whole graph must be acyclic
LAYERS = [
    ("base", ["configs", "experiments", "utils", "hardware", "stats"]),
    ("parts", ["nerf", "bitnerf", "grid_field", "cameras", "occupancy", "samplers", "render", "scene_files", "dataset",
               "bitnerf_format", "bitnerf_packed", "bitnerf_ddp"]),
    ("assembly", ["assembly"]),
    ("loop", ["train"]),
    ("entry", ["study", "study_page", "evaluate", "export", "report", "bench",
               "data_setup", "gpu_check"]),
]
ENTRY = len(LAYERS) - 1


def _is_main_guard(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name) and test.left.id == "__name__"
            and len(test.comparators) == 1 and isinstance(test.comparators[0], ast.Constant)
            and test.comparators[0].value == "__main__")


def _imported(nodes) -> set[str]:
    """Top-level package names imported anywhere inside `nodes` (absolute imports)."""
    names = set()
    for node in nodes:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                names.update(alias.name.split(".")[0] for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom) and sub.level == 0 and sub.module:
                names.add(sub.module.split(".")[0])
    return names


def module_imports(path: str) -> tuple[set[str], set[str]]:
    """(names imported by the module as imported, names imported only by its `__main__` block)."""
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    main_blocks = [node for node in tree.body if _is_main_guard(node)]
    rest = [node for node in tree.body if not _is_main_guard(node)]
    return _imported(rest), _imported(main_blocks)


def layering_problems(root: str, layers=LAYERS) -> list[str]:
    """One line per import that points up, per module missing from `layers`, and per import cycle."""
    level = {name: i for i, (_, names) in enumerate(layers) for name in names}
    modules = sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py"))
    level.update({m: ENTRY for m in modules if re.fullmatch(r"exp\d+", m)})  # experiment scripts are programs
    problems = [f"{m}.py is in no layer: add it to LAYERS in tests/test_layering.py" for m in modules
                if m not in level]
    graph = {}
    for m in modules:
        imported, main_only = module_imports(os.path.join(root, f"{m}.py"))
        graph[m] = sorted(n for n in imported if n in modules and n != m)
        for name, at in [(n, level.get(m)) for n in graph[m]] + [(n, ENTRY) for n in sorted(main_only)]:
            if name in level and at is not None and level[name] > at:
                problems.append(f"{m} ({layers[at][0]}) imports {name} ({layers[level[name]][0]}): points up")
    # cycles: depth-first search over the graph of imports as imported
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in graph[m]:
            if state.get(n) == 1:
                problems.append("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in modules:
        if m not in state:
            visit(m)
    return problems


def test_every_import_points_down_and_nothing_cycles():
    assert layering_problems(ROOT) == []


def test_the_checker_finds_upward_imports_cycles_and_unplaced_modules(tmp_path):
    files = {
        "configs.py": "import os\n",
        "utils.py": "def f():\n    from dataset import X\n",  # a function-level import counts
        "dataset.py": "import utils\n",
        "render.py": 'import numpy\nif __name__ == "__main__":\n    import assembly\n',  # allowed: the program
        "nerf.py": "import bitnerf\n",
        "bitnerf.py": "from nerf import NeRF\n",
        "assembly.py": "import render\n",
        "train.py": "import assembly\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    problems = layering_problems(str(tmp_path))
    assert "stray.py is in no layer: add it to LAYERS in tests/test_layering.py" in problems
    assert "utils (base) imports dataset (parts): points up" in problems
    assert any(p.startswith("import cycle:") and "nerf" in p and "bitnerf" in p for p in problems)
    assert any(p.startswith("import cycle:") and "utils" in p and "dataset" in p for p in problems)
    assert not any("render" in p or "assembly" in p or "train" in p for p in problems), problems
    assert len(problems) == 4, problems
