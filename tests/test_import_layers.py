"""The import layers hold: the library ``ft_train`` never imports the command-line tools in
``data_tools``, and no import cycle runs through either package.

The graph is read from the source with :mod:`ast`, not by importing: every ``import`` and
``from ... import`` anywhere in a file (module level, inside functions, under ``TYPE_CHECKING``),
relative imports resolved against the file's package. An edge goes to the deepest module of the
two packages that the statement names (``from ft_train import media`` → ``ft_train.media``);
imports of other packages are ignored. Run this file directly to print the graph's summary.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ft_train", "data_tools")


def module_files() -> dict[str, Path]:
    """Dotted module name → file, for every ``.py`` under the packages (``__init__`` = the package)."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that ``path`` (module ``name``) imports."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            candidates = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for candidate in candidates:
            parts = candidate.split(".")
            while parts and ".".join(parts) not in known:
                parts.pop()  # ``from pkg.mod import function`` → ``pkg.mod``
            if parts:
                targets.add(".".join(parts))
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def edges_between(graph: dict[str, set[str]], source: str, target: str) -> list[tuple[str, str]]:
    return sorted(
        (a, b) for a, targets in graph.items() for b in targets if a.split(".")[0] == source and b.split(".")[0] == target
    )


def test_library_never_imports_the_tools():
    assert edges_between(import_graph(), "ft_train", "data_tools") == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_graph_sees_imports():
    """The parser finds the imports it must: relative, function-level, ``from pkg import module``."""
    graph = import_graph()
    assert "ft_train.media" in graph["ft_train.lit.validation"]  # from ..media import ...
    assert "ft_train.data.face" in graph["ft_train.inference.adapters"]  # inside detect_face_box
    assert "ft_train.media" in graph["data_tools.prep"]  # from ft_train import media
    assert "ft_train.data.raw_clip" in graph["data_tools.encode"]


def main() -> int:
    graph = import_graph()
    tools_edges = edges_between(graph, "data_tools", "ft_train")
    library_edges = edges_between(graph, "ft_train", "data_tools")
    found = cycles(graph)
    print(f"modules: {len(graph)} ({sum(n.startswith('ft_train') for n in graph)} ft_train, "
          f"{sum(n.startswith('data_tools') for n in graph)} data_tools)")
    print(f"import edges between them: {sum(len(t) for t in graph.values())}")
    print(f"data_tools -> ft_train edges: {len(tools_edges)}")
    for a, b in tools_edges:
        print(f"  {a} -> {b}")
    print(f"ft_train -> data_tools edges: {len(library_edges)}")
    for a, b in library_edges:
        print(f"  {a} -> {b}")
    print(f"import cycles: {len(found)}")
    for component in found:
        print("  " + " <-> ".join(component))
    return 1 if library_edges or found else 0


if __name__ == "__main__":
    raise SystemExit(main())
