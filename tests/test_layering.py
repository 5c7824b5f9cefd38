"""Every import points down the layers (../README's layering; no cycles), read from the source with ast.

Imports inside functions, and inside an `if __name__ == "__main__":` block, count as much as those at the top:
a file that is both a library and a program belongs to the lower layer, so its program part must not reach up
(render.py is the program; the renderer it drives is renderer.py).
"""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# lowest first; a module may import modules of its own layer or below, and the whole graph must be acyclic
LAYERS = [
    ("base", ["configs", "experiments", "utils", "hardware", "stats", "cpu_kernels", "ternary_kernels"]),
    ("parts", ["nerf", "bitnerf", "grid_field", "cameras", "occupancy", "samplers", "renderer", "orbit", "scene_files", "llff",
               "dataset", "bitnerf_format", "bitnerf_packed", "bitnerf_ddp"]),
    ("assembly", ["assembly"]),
    ("loop", ["train"]),
    ("entry", ["render", "study", "study_page", "evaluate", "export", "report", "bench",
               "data_setup", "gpu_check"]),
]
ENTRY = len(LAYERS) - 1


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


def module_imports(path: str) -> set[str]:
    """Names the module imports anywhere: at the top, in functions, in its `__main__` block."""
    with open(path) as f:
        return _imported(ast.parse(f.read(), path).body)


def layering_problems(root: str, layers=LAYERS) -> list[str]:
    """One line per import that points up, per module missing from `layers`, and per import cycle."""
    level = {name: i for i, (_, names) in enumerate(layers) for name in names}
    modules = sorted(f[:-3] for f in os.listdir(root) if f.endswith(".py"))
    level.update({m: ENTRY for m in modules if re.fullmatch(r"exp\d+", m)})  # experiment scripts are programs
    problems = [f"{m}.py is in no layer: add it to LAYERS in tests/test_layering.py" for m in modules
                if m not in level]
    graph = {}
    for m in modules:
        graph[m] = sorted(n for n in module_imports(os.path.join(root, f"{m}.py")) if n in modules and n != m)
        for name, at in [(n, level.get(m)) for n in graph[m]]:
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
        "renderer.py": 'import numpy\nif __name__ == "__main__":\n    import assembly\n',  # the program counts
        "nerf.py": "import bitnerf\n",
        "bitnerf.py": "from nerf import NeRF\n",
        "assembly.py": "import renderer\n",
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
    assert "renderer (parts) imports assembly (assembly): points up" in problems
    assert any(p.startswith("import cycle:") and "renderer" in p and "assembly" in p for p in problems)
    assert not any("train" in p for p in problems), problems
    assert len(problems) == 6, problems
