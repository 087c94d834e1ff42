"""The layer rules of docs/architecture.md, no import cycles, size limits, and a torch-free report."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's [tool.setuptools.package-dir])
FOLDERS = {"calbench": "calbench", "baselines": "calbench.baselines", "cli": "calbench.cli"}
#: component -> layer; a module may import lower layers and its own component only (docs/architecture.md)
LAYERS = {
    "calbench.errors": 0,
    "calbench.streams": 0,
    "calbench.atomic": 1,
    "calbench.registry": 1,
    "calbench.metrics": 1,
    "calbench.smoothing": 1,
    "calbench.tissue": 1,
    "calbench.deferral": 1,
    "calbench.published": 1,
    "calbench.models": 2,
    "calbench.results": 2,
    "calbench.data": 3,
    "calbench.shards": 3,
    "calbench.jobs": 3,
    "calbench.losses": 4,
    "calbench.prompts": 4,
    "calbench.cache": 4,
    "calbench.online": 4,
    "calbench.plots": 4,
    "calbench.report": 4,
    "calbench.train": 5,
    "calbench.base": 6,
    "calbench.calibprompt": 7,
    "calbench.baselines": 8,
    "calbench.methods": 9,
    "calbench.session": 10,
    "calbench.scoring": 10,
    "calbench.batched": 10,
    "calbench.compare": 11,
    "calbench.certify": 11,
    "calbench.runs": 11,
    "calbench.tune": 12,
    "calbench.launch": 12,
    "calbench.cli": 13,
}
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(path: Path) -> set[str]:
    """Every calbench module ``path`` imports, at any depth (functions included), except under TYPE_CHECKING."""
    names: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            return
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.update(
                f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in MODULES else node.module
                for alias in node.names
            )
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in names if name in MODULES}


GRAPH = {module: _imports(path) - {module} for module, path in MODULES.items()}


def _component(module: str) -> str:
    return max((c for c in LAYERS if module == c or module.startswith(c + ".")), key=len)


def test_every_module_has_a_layer():
    assert [m for m in MODULES if m != "calbench" and not any(m == c or m.startswith(c + ".") for c in LAYERS)] == []


def test_imports_only_go_down_the_layers():
    wrong = []
    for module, imported in GRAPH.items():
        if module == "calbench":  # the public API names everything, loaded lazily
            continue
        for target in imported:
            if target == "calbench":
                wrong.append(f"{module} imports the calbench package root")
            elif _component(target) != _component(module) and LAYERS[_component(target)] >= LAYERS[_component(module)]:
                wrong.append(
                    f"{module} (layer {LAYERS[_component(module)]}) imports {target} (layer {LAYERS[_component(target)]})"
                )
    assert wrong == []


def test_no_import_cycles():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def strongconnect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                strongconnect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1:
                cycles.append(sorted(members))

    for node in GRAPH:
        if node not in index:
            strongconnect(node)
    assert cycles == []


def test_the_layer_rule_catches_a_wrong_way_import():
    assert LAYERS[_component("calbench.base")] < LAYERS[_component("calbench.baselines.coop")]
    assert "calbench.base" in GRAPH["calbench.baselines.coop"] and "calbench.baselines" in GRAPH["calbench.methods"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_small(module):
    source = MODULES[module].read_text(encoding="utf-8")
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_rendering_a_report_imports_no_torch(tmp_path):
    script = f"""
import sys
from pathlib import Path
from calbench.results import ResultsStore, RESULT_COLUMNS
row = {{c: 0.5 for c in RESULT_COLUMNS}}
row.update(model="plip", dataset="kather", method="coop-ce", seed=1, status="ok", error="", config="abc")
ResultsStore(Path({str(tmp_path)!r})).put(row)
from calbench.report import write_results_report
md, page = write_results_report(Path({str(tmp_path)!r}))
assert "histopathology" in md.read_text()
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
