"""The shape of the code: a one-way import graph between the project's files."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FILES = {p.stem: p for p in ROOT.glob("*.py")}
ENTRY_SCRIPTS = {"main", "app", "compare", "benchmark", "faces"}


def imports_of(path):
    """(module, names) for every import of a project file anywhere in `path`, functions included."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name.split(".")[0], []) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], [a.name for a in node.names]))
    return [(m, names) for m, names in found if m in FILES]


GRAPH = {name: imports_of(path) for name, path in FILES.items()}


def test_nothing_imports_an_entry_script():
    bad = [(name, m) for name, deps in GRAPH.items() for m, _ in deps if m in ENTRY_SCRIPTS]
    assert not bad, f"entry scripts imported by: {bad}"


def test_no_private_names_cross_files():
    bad = [(name, m, n) for name, deps in GRAPH.items() for m, names in deps for n in names if n.startswith("_")]
    assert not bad


def test_the_import_graph_has_no_cycle():
    state = {}

    def visit(name, path):
        if state.get(name) == "open":
            raise AssertionError("import cycle: " + " -> ".join(path + [name]))
        if state.get(name) == "done":
            return
        state[name] = "open"
        for dep, _ in GRAPH[name]:
            visit(dep, path + [name])
        state[name] = "done"
    for name in GRAPH:
        visit(name, [])
