"""The layout holds: no import cycles, one-line module docstrings, the daemon names no analysis, stages keep their lanes."""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("dicom_node", "inference", "reports", "offline", "universalclassifier")


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    return modules


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """Every module of the packages that ``name`` imports, at any depth of its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = base.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            found.add(module)
            found |= {f"{module}.{alias.name}" for alias in node.names}
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _external_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_no_module_imports_another_that_imports_it_back() -> None:
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_says_its_one_job_in_one_line(name: str) -> None:
    docstring = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")), clean=False)
    if MODULES[name].name == "__init__.py" and name.count(".") == 0 and docstring is None:
        pytest.fail(f"{name}: a package says what it holds")
    assert docstring, f"{name} has no module docstring"
    first = docstring.strip().splitlines()[0]
    assert first.endswith(".") and len(first) <= 160, f"{name}: the first line is one sentence: {first!r}"


def _analysis_names() -> dict[str, str]:
    """Analysis names and their packages, from the entry-point table."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["dicom_node.analyses"]
    return {name: target.split(":")[0].rsplit(".", 1)[0] for name, target in table.items()}


def test_the_daemon_names_no_specific_analysis() -> None:
    analyses = _analysis_names()
    packages = set(analyses.values())
    assert packages, "the entry-point table lists the shipped analyses"
    words = {name for name in analyses} | {p.rsplit(".", 1)[1] for p in packages}
    words |= {w.replace("-", " ") for w in words} | {w.replace("-", "_") for w in words}
    pattern = re.compile(r"\b(" + "|".join(sorted(map(re.escape, words), key=len, reverse=True)) + r")\b",
                         re.IGNORECASE)
    found = []
    for name, path in MODULES.items():
        if not name.startswith("dicom_node"):
            continue
        leaked = {m for m in GRAPH[name] if m.startswith(tuple(packages))}
        if leaked:
            found.append(f"{name} imports {sorted(leaked)}")
        if name == "dicom_node.config":  # configuration defaults may name the shipped analyses
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if pattern.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(("package", "forbidden"), [
    ("inference", {"reports", "dicom_node", "offline", "pynetdicom"}),
    ("reports", {"inference", "dicom_node", "offline", "torch"}),
    ("dicom_node", {"offline"}),
    ("universalclassifier", {"dicom_node", "offline", "reports", "pynetdicom"}),  # a facade over inference
])
def test_stages_keep_their_lanes(package: str, forbidden: set[str]) -> None:
    crossing = {name: sorted(_external_imports(path) & forbidden)
                for name, path in MODULES.items() if name.split(".")[0] == package}
    assert not {k: v for k, v in crossing.items() if v}
