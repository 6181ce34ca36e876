"""The package's shape, read from its source with ``ast`` (nothing is imported):

* the import graph of ``dmgl_cli`` has no cycle;
* only the package ``dmgl_cli/tracking/`` imports MLflow ("the only package that talks to MLflow");
* only ``dmgl_cli/sweep/storage.py`` imports Optuna's private modules (``optuna.storages._heartbeat``...);
* pyproject.toml lists every package, so the wheel carries all of them (and the recipes);
* no function in ``dmgl_cli/cli/`` is longer than :data:`CLI_FUNCTION_LINES` (a command parses, calls, prints);
* ``report/`` and ``explain.py`` do not import each other (a recorded run's model is ``dmgl_cli/recorded.py``'s);
* ARCHITECTURE.md's layer table places every module, and every import goes to its own layer or one below.

Every import counts: at module level, inside functions, under ``if TYPE_CHECKING:``,
``importlib.import_module("constant")``. ``from pkg import name`` is an edge to the
submodule ``pkg.name`` when there is one, else to ``pkg``; ``import a.b`` is an edge to ``a.b``.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "dmgl_cli"
MLFLOW_MODULE = "dmgl_cli.tracking"
OPTUNA_PRIVATE_MODULE = "dmgl_cli.sweep.storage"
CLI_FUNCTION_LINES = 60  # decorators left out, the docstring in


@dataclass(frozen=True)
class Import:
    target: str  # dotted name as written (absolute), or the submodule for `from pkg import submodule`
    line: int
    type_checking: bool  # under `if TYPE_CHECKING:`


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every ``dmgl_cli/**/*.py`` (a package is its ``__init__.py``)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join([*base, name] if name else base)


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[Import]:
    """Every import in ``path``, resolved to absolute dotted names."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []

    def visit(node: ast.AST, type_checking: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_checking)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, node.lineno, type_checking) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = _resolve_relative(module, is_package, node.level, node.module)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                # `from pkg import submodule` is an edge to the submodule; `from optuna.storages import _heartbeat`
                # names a private module (or a private attribute) either way.
                if submodule in modules or (base.split(".")[0] != PACKAGE and alias.name != "*"):
                    found.append(Import(submodule, node.lineno, type_checking))
                else:
                    found.append(Import(base, node.lineno, type_checking))
        elif (
            isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__"))
            )
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and not node.args[0].value.startswith(".")
        ):
            found.append(Import(node.args[0].value, node.lineno, type_checking))
        for child in ast.iter_child_nodes(node):
            visit(child, type_checking)

    visit(tree, False)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[Import]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def _rel(module: str) -> str:
    return str(module_files()[module].relative_to(ROOT))


def _internal(target: str, modules: dict[str, Path]) -> str | None:
    """The dmgl_cli module an import loads: the name itself, or (for `from pkg import function`) its package."""
    while target:
        if target in modules:
            return target
        target = target.rpartition(".")[0]
    return None


def find_cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first repeated at the end) per strongly connected component (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1 or node in edges[node]:
                components.append(component)

    for node in sorted(edges):
        if node not in index:
            connect(node)

    cycles = []
    for component in components:
        members = set(component)
        start = min(component)
        # Breadth-first search inside the component for the shortest way back to `start`.
        previous: dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:
            following = []
            for node in frontier:
                for nxt in sorted(edges[node]):
                    if nxt in members and nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        path.append(start)
        cycles.append([path[0], *reversed(path[1:-1]), start])
    return cycles


def test_find_cycles_names_the_cycle():
    edges = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}, "e": {"e": 5}}
    assert sorted(find_cycles(edges)) == [["a", "b", "c", "a"], ["e", "e"]]
    assert find_cycles({"a": {"b": 1}, "b": {}}) == []


def test_import_graph_has_no_cycle(graph):
    modules = module_files()
    edges: dict[str, dict[str, int]] = {name: {} for name in graph}
    for name, imports in graph.items():
        for imp in imports:
            target = _internal(imp.target, modules)
            if target is not None and target != name:
                edges[name].setdefault(target, imp.line)
    cycles = find_cycles(edges)
    described = [
        " -> ".join(cycle)
        + "\n      ("
        + ", ".join(f"{_rel(a)}:{edges[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:], strict=False))
        + ")"
        for cycle in cycles
    ]
    assert not cycles, (
        "import cycle(s) in dmgl_cli (break one edge, e.g. move the shared piece to its own module):\n"
        + ("\n".join(f"  {line}" for line in described))
    )


def _offenders(graph: dict[str, list[Import]], allowed: str, bad) -> list[str]:
    return [
        f"{_rel(name)}:{imp.line} imports {imp.target}"
        for name, imports in sorted(graph.items())
        if name != allowed and not name.startswith(allowed + ".")
        for imp in imports
        if bad(imp.target)
    ]


def test_only_the_tracking_package_imports_mlflow(graph):
    offenders = _offenders(graph, MLFLOW_MODULE, lambda target: target.split(".")[0] == "mlflow")
    assert not offenders, (
        "only the package dmgl_cli/tracking/ may import mlflow (it is the one package that talks to MLflow; add what "
        "you need there):\n  " + "\n  ".join(offenders)
    )


def _private_optuna(target: str) -> bool:
    parts = target.split(".")
    return parts[0] == "optuna" and any(p.startswith("_") and not p.endswith("__") for p in parts[1:])


def test_only_sweep_storage_imports_private_optuna(graph):
    offenders = _offenders(graph, OPTUNA_PRIVATE_MODULE, _private_optuna)
    assert not offenders, (
        "only dmgl_cli/sweep/storage.py may import Optuna's private modules (they change between releases; keep "
        "them behind that one module):\n  " + "\n  ".join(offenders)
    )


def test_import_rules_see_imports_inside_functions_and_type_checking(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from dmgl_cli import tracking\n"
        "def f():\n"
        "    import mlflow.tracking\n"
        "    from optuna.storages import _heartbeat\n"
        "    importlib.import_module('optuna._imports')\n"
        "from . import paths\n"
    )
    modules = {"dmgl_cli.probe": source, "dmgl_cli.tracking": source, "dmgl_cli.paths": source}
    found = imports_of("dmgl_cli.probe", source, modules)
    assert [(imp.target, imp.type_checking) for imp in found] == [
        ("typing.TYPE_CHECKING", False),
        ("dmgl_cli.tracking", True),
        ("mlflow.tracking", False),
        ("optuna.storages._heartbeat", False),
        ("optuna._imports", False),
        ("dmgl_cli.paths", False),
    ]
    assert [_private_optuna(imp.target) for imp in found[3:5]] == [True, True]
    assert not _private_optuna("optuna.__version__")


def test_pyproject_lists_every_package():
    """pyproject.toml lists the packages by hand (one of them, dmgl_cli.recipes, is the top-level recipes/ folder):
    a package missing from that list would be missing from the wheel."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(config["packages"])
    on_disk = {
        ".".join(path.parent.relative_to(ROOT).parts)
        for path in (ROOT / PACKAGE).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    assert config["package-dir"] == {"dmgl_cli.recipes": "recipes"}
    assert sorted(on_disk - listed) == [], "add these packages to [tool.setuptools] packages in pyproject.toml"
    assert sorted(listed - on_disk - {"dmgl_cli.recipes"}) == [], "pyproject.toml lists packages that do not exist"
    assert sorted((ROOT / "recipes").glob("*.yaml")), "recipes/ has no *.yaml for the wheel to carry"


def test_recipes_dir_is_the_top_level_folder_unless_overridden(tmp_path, monkeypatch):
    from dmgl_cli.paths import recipes_dir

    monkeypatch.delenv("DMGL_RECIPES", raising=False)
    assert recipes_dir().resolve() == (ROOT / "recipes").resolve()
    monkeypatch.setenv("DMGL_RECIPES", str(tmp_path))
    assert recipes_dir() == tmp_path


def long_functions(path: Path, limit: int) -> list[str]:
    """``NAME (N lines)`` for every function (nested ones too) in ``path`` longer than ``limit`` lines, counted
    from its ``def`` to its last line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > limit
    ]


def test_long_functions_counts_def_to_last_line(tmp_path):
    source = tmp_path / "probe.py"
    source.write_text("@decorator\ndef short():\n    return 1\n\n\ndef long():\n" + "    x = 1\n" * 4)
    assert long_functions(source, 4) == ["long (5 lines)"]
    assert long_functions(source, 5) == []


def test_cli_functions_are_short():
    """A command builds a request and makes one call; what it decides belongs in an importable module."""
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for path in sorted((ROOT / PACKAGE / "cli").glob("*.py"))
        for name in long_functions(path, CLI_FUNCTION_LINES)
    ]
    assert not offenders, (
        f"functions in dmgl_cli/cli/ longer than {CLI_FUNCTION_LINES} lines (move the logic into a module the "
        "command calls, or the printing into a helper):\n  " + "\n  ".join(offenders)
    )


def test_report_and_explain_do_not_import_each_other(graph):
    modules = module_files()
    crossing = [
        f"{_rel(name)}:{imp.line} imports {target}"
        for name, imports in sorted(graph.items())
        for imp in imports
        if (target := _internal(imp.target, modules)) is not None
        and {name.split(".")[1] if "." in name else "", target.split(".")[1] if "." in target else ""}
        == {"report", "explain"}
    ]
    assert not crossing, "report/ and explain.py share dmgl_cli/recorded.py, not each other:\n  " + "\n  ".join(
        crossing
    )


# ------------------------------------------------------------------------------------------------ layers


def _outside_parentheses(text: str) -> str:
    kept, depth = [], 0
    for char in text:
        depth += char == "("
        if depth == 0:
            kept.append(char)
        depth -= char == ")" and depth > 0
    return "".join(kept)


def documented_layers() -> list[tuple[str, list[str]]]:
    """ARCHITECTURE.md's layer table, top layer first: (layer, the dotted modules and packages its row names). A
    row names a module or package in backticks outside parentheses (``run/``, ``recorded.py``,
    ``strategies/outer_step.py``); what sits in parentheses describes it."""
    text = (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    layers = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if not line.startswith("| ") or cells[0] == "layer" or set(cells[0]) <= {"-"}:
            continue
        names = re.findall(r"`([^`]+)`", _outside_parentheses(cells[1]))
        layers.append(
            (cells[0], [f"{PACKAGE}." + name.rstrip("/").removesuffix(".py").replace("/", ".") for name in names])
        )
    return layers


def layer_of(module: str, layers: list[tuple[str, list[str]]]) -> int | None:
    """The index of the layer whose row names ``module`` or the longest package holding it."""
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(layers):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[1]):
                best = (index, len(name))
    return None if best is None else best[0]


def test_every_module_has_a_layer_in_the_architecture_table():
    layers = documented_layers()
    assert [name for name, _ in layers] == [
        "command line",
        "commands",
        "recording",
        "training",
        "data",
        "foundations",
    ]
    unplaced = [_rel(m) for m in module_files() if m != PACKAGE and layer_of(m, layers) is None]
    assert not unplaced, f"modules that ARCHITECTURE.md's layer table does not place: {unplaced}"


def test_imports_go_down_the_layers_of_the_architecture_table(graph):
    """Every import (inside functions and under TYPE_CHECKING too) goes to the importer's own layer or one below."""
    layers, modules = documented_layers(), module_files()
    upward = []
    for name, imports in sorted(graph.items()):
        here = layer_of(name, layers)
        for imp in imports:
            target = _internal(imp.target, modules)
            there = None if target is None else layer_of(target, layers)
            if here is not None and there is not None and there < here:
                upward.append(
                    f"{_rel(name)}:{imp.line} ({layers[here][0]}) imports {target} ({layers[there][0]})"
                    + (" under TYPE_CHECKING" if imp.type_checking else "")
                )
    assert not upward, "imports that go up ARCHITECTURE.md's layer table:\n  " + "\n  ".join(upward)


def test_the_layer_check_sees_an_upward_import():
    layers = [("top", [f"{PACKAGE}.cli"]), ("bottom", [f"{PACKAGE}.paths", f"{PACKAGE}.strategies"])]
    assert layer_of(f"{PACKAGE}.cli.train", layers) == 0 and layer_of(f"{PACKAGE}.strategies.specs", layers) == 1
    assert layer_of(f"{PACKAGE}.unknown", layers) is None
    assert _outside_parentheses("`a/` (with `b.py` (and `c`)) and `d.py`") == "`a/`  and `d.py`"
