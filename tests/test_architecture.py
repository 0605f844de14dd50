"""The layer order of docs/architecture.md holds in the code, and no file imports a file
that imports it.

The layers are read from the document's table (one fact in one place); the
package's folders from pyproject's ``package-dir``; every ``import`` statement
of every module is parsed with ``ast``, those inside functions (lazy imports)
included, those under ``if TYPE_CHECKING:`` left out (they never run).
"""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"


@dataclasses.dataclass(frozen=True)
class Layer:
    level: int
    name: str
    pattern: str  # "dir/" (everything below), or "dir/*.py" (the files directly in dir)

    def holds(self, path: str) -> bool:
        if self.pattern.endswith("/*.py"):
            return path.rpartition("/")[0] == self.pattern[: -len("/*.py")]
        return path.startswith(self.pattern)

    def specificity(self) -> int:
        return len(self.pattern.replace("*.py", ""))


def doc_layers() -> list[Layer]:
    """Rows ``| 3 passes | `passes/` | ... |`` of the document's layer table."""
    layers = []
    for line in DOC.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 2 and (match := re.fullmatch(r"(\d+) (.+)", cells[0])):
            for pattern in re.findall(r"`([^`]+)`", cells[1]):
                layers.append(Layer(int(match.group(1)), match.group(2), pattern))
    return layers


def package_dirs() -> dict[str, str]:
    """Import package -> folder, from pyproject (``edgec.passes`` -> ``passes``)."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]


def modules() -> dict[str, str]:
    """Module name -> path relative to the root, for every .py file of the package."""
    found = {}
    for package, folder in package_dirs().items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT / folder).with_suffix("")
            parts = [part for part in relative.parts if part != "__init__"]
            name = ".".join([package, *parts])
            if name.count(".") > package.count(".") + len(parts):
                continue
            # a sub-package mapped on its own (edgec.passes) is found from its own folder only
            if any(name.startswith(other + ".") or name == other for other in package_dirs() if other != package
                   and other.startswith(package + ".")):
                continue
            found[name] = path.relative_to(ROOT).as_posix()
    return found


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports_of(path: Path, known: dict[str, str]) -> dict[str, int]:
    """Modules of the package that ``path`` imports -> the first line importing each."""
    tree = ast.parse(path.read_text())
    skipped = _type_checking_lines(tree)
    found: dict[str, int] = {}
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skipped:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        for name in names:
            while name and name not in known:  # import a.b.c of a module a.b: the module a.b
                name = name.rpartition(".")[0]
            if name:
                found.setdefault(name, node.lineno)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, dict[str, int]]:
    known = modules()
    return {name: imports_of(ROOT / path, known) for name, path in known.items()}


def layer_of(path: str, layers: list[Layer]) -> Layer:
    matching = [layer for layer in layers if layer.holds(path)]
    assert matching, f"{path} lies in no folder of the layer table in docs/architecture.md: add its folder there"
    return max(matching, key=Layer.specificity)


def test_document_names_the_layers():
    layers = doc_layers()
    assert {layer.level for layer in layers} == {0, 1, 2, 3, 4}, layers
    assert {layer.pattern for layer in layers} >= {"edgec/core/", "edgec/ops/", "passes/", "runtimes/", "edgec/*.py"}


def test_every_package_file_has_a_layer():
    layers = doc_layers()
    for path in modules().values():
        layer_of(path, layers)


def test_imports_go_down_the_layers(graph):
    """A file imports files of its own folder or of a lower layer, never a layer beside or above it."""
    layers, known = doc_layers(), modules()
    wrong = []
    for name, imported in graph.items():
        mine = layer_of(known[name], layers)
        for other, line in imported.items():
            theirs = layer_of(known[other], layers)
            if theirs.level < mine.level or theirs == mine:
                continue
            wrong.append(
                f"{known[name]}:{line} ({mine.level} {mine.name}) imports {known[other]} ({theirs.level} {theirs.name})"
            )
    assert not wrong, "imports against docs/architecture.md's layer order:\n" + "\n".join(wrong)


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph.get(node, {}):
            if other == node:
                continue
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_file_imports_a_file_that_imports_it(graph):
    cycles = _cycles(graph)
    assert not cycles, "import cycles between files:\n" + "\n".join(" <-> ".join(cycle) for cycle in cycles)
