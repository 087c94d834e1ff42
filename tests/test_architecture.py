"""The layer rules of docs/architecture.md, no import cycles, size limits, and a torch-free report."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: source folder -> the package it installs as (pyproject's [tool.setuptools.package-dir])
FOLDERS = {"calbench": "calbench", "baselines": "calbench.baselines", "cli": "calbench.cli"}
ARCHITECTURE = ROOT / "docs" / "architecture.md"


def _layers() -> dict[str, int]:
    """Component -> layer, read from the layer table of docs/architecture.md: the one table, so the doc
    cannot drift from what is enforced. A module may import lower layers and its own component only."""
    layers = {}
    for line in ARCHITECTURE.read_text(encoding="utf-8").splitlines():
        row = re.match(r"^\| (\d+) \| (.+?) \| .* \|$", line)
        if row:
            layers.update({name: int(row[1]) for name in re.findall(r"`(calbench[\w.]*)`", row[2])})
    return layers


LAYERS = _layers()
#: a library module over this many lines, or a function over MAX_FUNCTION_LINES, is a review signal: it passes
#: once listed in LONG with the reason it stays whole; no module grows past MAX_LISTED_LINES
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
MAX_LISTED_LINES = 600
#: module -> why it is longer than MAX_MODULE_LINES (reviewed; remove the entry when it shrinks)
LONG: dict[str, str] = {}


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


def _private(name: str) -> bool:
    """A dotted name with a private part (``_heartbeat``, ``_trial_id``; dunders such as ``__version__`` are public)."""
    return any(part.startswith("_") and not part.endswith("__") for part in name.split("."))


def _other_library(name: str) -> bool:
    top = name.split(".")[0]
    return top != "calbench" and top not in sys.stdlib_module_names


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for a chain of attributes on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def private_names_used(source: str) -> set[str]:
    """The private names of other libraries that ``source`` imports or reaches as an attribute of what it imported
    (``from optuna.storages._heartbeat import ...``, ``optuna.storages._heartbeat``, ``from x import _y``)."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> what it is in its library
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if _other_library(alias.name):
                    found |= {alias.name} if _private(alias.name) else set()
                    local = alias.asname or alias.name.split(".")[0]
                    bound[local] = alias.name if alias.asname else local
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and _other_library(node.module):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found |= {full} if _private(full) else set()
                bound[alias.asname or alias.name] = full
    for node in ast.walk(tree):
        chain = _dotted(node) if isinstance(node, ast.Attribute) else None
        if chain is not None and chain.split(".")[0] in bound:
            full = ".".join([bound[chain.split(".")[0]], *chain.split(".")[1:]])
            found |= {full} if _private(full) else set()
    return found


def test_no_module_uses_a_private_name_of_another_library():
    """Only public APIs of the libraries calbench builds on: a private name can change in any release."""
    used = {module: private_names_used(path.read_text(encoding="utf-8")) for module, path in MODULES.items()}
    assert {module: sorted(names) for module, names in used.items() if names} == {}


def test_the_private_name_rule_catches_each_form():
    source = """
import optuna
import optuna.storages._callbacks as callbacks
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages import _CachedStorage, RDBStorage
from sys import _getframe
optuna.storages._heartbeat.is_heartbeat_enabled
RDBStorage._get_stale_trial_ids
optuna.__version__
trial._trial_id
"""
    assert private_names_used(source) == {
        "optuna.storages._callbacks",
        "optuna.storages._heartbeat.BaseHeartbeat",
        "optuna.storages._CachedStorage",
        "optuna.storages._heartbeat",
        "optuna.storages._heartbeat.is_heartbeat_enabled",
        "optuna.storages.RDBStorage._get_stale_trial_ids",
    }


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_small(module):
    source = MODULES[module].read_text(encoding="utf-8")
    lines = len(source.splitlines())
    assert lines <= (MAX_LISTED_LINES if module in LONG else MAX_MODULE_LINES), (
        f"{module} has {lines} lines: split it by meaning, or list it in LONG with the reason it stays whole"
    )
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_every_listed_long_module_is_still_long():
    """A LONG entry whose module shrank is removed, so the list stays the short list of reviewed exceptions."""
    assert [m for m in LONG if len(MODULES[m].read_text(encoding="utf-8").splitlines()) <= MAX_MODULE_LINES] == []


def test_the_layer_table_is_read_from_the_architecture_doc():
    assert LAYERS["calbench.errors"] == 0 and LAYERS["calbench.cli"] == max(LAYERS.values())
    assert LAYERS["calbench.compare"] > LAYERS["calbench.methods"] > LAYERS["calbench.base"]


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
from calbench.report.tables import write_table
assert "5.92" in write_table(Path({str(tmp_path)!r}), "latex").read_text()  # the published PLIP · Kather row
write_table(Path({str(tmp_path)!r}), "csv")
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_every_package_is_installed_by_a_plain_pip_install():
    """pyproject lists the packages a non-editable install copies: a package missing there imports in the
    editable checkout the tests use, yet not after `pip install .` (the README's first command)."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"])
    packages = {module for module, path in MODULES.items() if path.name == "__init__.py"}
    assert packages - listed == set()
