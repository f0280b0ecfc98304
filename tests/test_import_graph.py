"""The library's import graph has no cycle, and the library imports no script.

Every import counts, including those inside functions: a deferred import hides a cycle from Python's import
machinery, not from the reader, who still cannot understand one module without the other.
"""

import ast
import pathlib

LIBRARY = pathlib.Path(__file__).resolve().parents[1] / "keras_ddpm"
SCRIPTS = ("train", "sample", "evaluate", "export", "bench")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module named by an `import` or `from ... import` anywhere in the file (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def import_graph() -> dict[str, set[str]]:
    """keras_ddpm module -> the keras_ddpm modules it imports (a package's `__init__` counts as the package)."""
    modules = {module_name(path): path for path in LIBRARY.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {imported for imported in imported_modules(path) if imported in modules and imported != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as a list of nodes (first == last), or None (depth-first search, three colours)."""
    state = {}  # absent: unvisited, 1: on the current path, 2: done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for neighbour in sorted(graph[node]):
            if state.get(neighbour) == 1:
                return path[path.index(neighbour):] + [neighbour]
            if neighbour not in state:
                cycle = visit(neighbour)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_library_import_graph_has_no_cycle():
    graph = import_graph()
    assert "keras_ddpm.model" in graph and "keras_ddpm.schedule" in graph["keras_ddpm.model"]  # the graph is real
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_library_imports_no_script():
    for path in LIBRARY.rglob("*.py"):
        scripts = {name for name in imported_modules(path) if name.split(".")[0] in SCRIPTS}
        assert not scripts, f"{path.name} imports the script(s) {sorted(scripts)}"
