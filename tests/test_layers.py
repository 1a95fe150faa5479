"""The import graph: data flows one way (DESIGN.md's layers), with no cycle and no project
import hidden inside a function."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fidelity",)
#: The layers below the harness, by module prefix (DESIGN.md's layers, under one namespace).
LAYERS = ("core", "estimators", "retrain", "reports")


def project_imports(path: Path) -> list[tuple[str, bool]]:
    """(imported project module, whether the import sits inside a function) of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nested = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from package import name": the submodule when name is one, else the package
            names = [
                f"{node.module}.{alias.name}"
                if (ROOT / node.module.replace(".", "/") / f"{alias.name}.py").exists()
                or (ROOT / node.module.replace(".", "/") / alias.name / "__init__.py").exists()
                else node.module
                for alias in node.names
            ]
        else:
            continue
        for name in names:
            if name.split(".")[0] in PACKAGES:
                found.append((name, id(node) in nested))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def graph() -> dict[str, list[tuple[str, bool]]]:
    return {
        module_name(path): project_imports(path)
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def layer(module: str) -> str:
    if module == "fidelity":
        return "core"  # fidelity/__init__ re-exports core types only
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else "harness"


ALLOWED = {
    "core": {"core"},
    "estimators": {"core", "estimators"},
    "retrain": {"core", "retrain"},
    "harness": {"core", "estimators", "retrain", "harness", "reports"},
    "reports": {"core", "harness", "reports"},
}


def test_every_import_goes_down_a_layer_or_stays_in_its_own():
    modules = graph()
    assert ("fidelity.core.errors", False) in modules[
        "fidelity.estimators.base"
    ]  # the graph sees imports
    assert ("fidelity.retrain.refit", False) in modules["fidelity.retrain"]
    wrong = [
        f"{module} -> {target}"
        for module, imports in modules.items()
        for target, _ in imports
        if layer(target) not in ALLOWED[layer(module)]
    ]
    assert wrong == []


def test_no_project_import_hides_in_a_function():
    hidden = [
        f"{module} -> {target}"
        for module, imports in graph().items()
        for target, inside in imports
        if inside
    ]
    assert hidden == []


def test_the_import_graph_has_no_cycle():
    modules = graph()

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    edges = {
        module: {t for t in (resolve(target) for target, _ in imports) if t and t != module}
        for module, imports in modules.items()
    }
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                cycle = [*path[path.index(target) :], target] if target in path else [target]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])


def test_the_command_line_imports_no_plotting_or_statistics_library_until_it_needs_one():
    """matplotlib, seaborn and scipy.stats take about 1.3 s to import together; a command that
    draws nothing (check, history, list) must not pay it at start-up."""
    probe = (
        "import sys, fidelity.cli\n"
        "print(sorted(m for m in ('matplotlib', 'seaborn', 'scipy.stats', 'sklearn') "
        "if m in sys.modules))"
    )
    completed = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "[]"
