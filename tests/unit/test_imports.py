"""The package's architecture, read from its imports (``ast``, nothing is imported): data flows one
way, images -> latents -> batches -> loss -> weights -> samples -> metrics, so no file and no folder
imports its way back up; the leaves (``runtime/``, ``diffusion/``, ``models/``) import nothing above
them; and an import inside a function is only for an optional heavy dependency."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = SRC / "ditlab"
# Third-party modules a function may import where it needs them: slow to import or optional.
LAZY_OK = ("boto3", "botocore", "diffusers", "litdata", "matplotlib", "torch.distributed")


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def resolve(name: str) -> str | None:
    """The ditlab module an import names (``from ditlab.data import prepared`` names a module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """(imported ditlab module or third-party name, inside a function?, line) of one file."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(sub) for sub in ast.walk(node) if sub is not node}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            found.append((name, id(node) in in_function, node.lineno))
    return found


def graph() -> dict[str, set[str]]:
    edges = defaultdict(set)
    for name, path in MODULES.items():
        for imported, _, _ in imports_of(path):
            target = resolve(imported) if imported.startswith("ditlab") else None
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                edges[name].add(target)
    return edges


def room(module: str) -> str:
    """A module's room: its folder under ditlab/ (data, models, ...), or itself at the top level."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and (PACKAGE / parts[1]).is_dir() else module


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def room_edges() -> dict[str, set[str]]:
    rooms = defaultdict(set)
    for source, targets in graph().items():
        for target in targets:
            if room(source) != room(target):
                rooms[room(source)].add(room(target))
    return rooms


def test_no_import_cycle_between_files():
    assert find_cycle(graph()) is None, " -> ".join(find_cycle(graph()))


def test_no_import_cycle_between_folders():
    assert find_cycle(room_edges()) is None, " -> ".join(find_cycle(room_edges()))


# (room, rooms it must not import): the one-way flow, and the leaves
FORBIDDEN = [
    ("data", {"training", "metrics", "pipelines", "callbacks", "ditlab.inference"}),
    ("metrics", {"training", "pipelines", "callbacks"}),
    ("training", {"data", "metrics", "pipelines", "callbacks", "ditlab.inference"}),
    ("ditlab.inference", {"training", "metrics", "pipelines", "callbacks"}),
    ("runtime", {"data", "models", "diffusion", "training", "metrics", "pipelines", "callbacks", "bench"}),
    ("diffusion", {"data", "models", "training", "metrics", "pipelines", "callbacks", "runtime"}),
    ("models", {"data", "diffusion", "training", "metrics", "pipelines", "callbacks"}),
]


@pytest.mark.parametrize("source, forbidden", FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_each_room_imports_only_what_lies_below_it(source, forbidden):
    top_level = {m for m in MODULES if room(m) == m and m != "ditlab"}
    imported = room_edges().get(source, set())
    assert not imported & forbidden, f"{source} imports {sorted(imported & forbidden)}"
    if source == "runtime":  # a leaf: nothing of ditlab's but itself
        assert not imported - {"runtime"}, f"runtime imports {sorted(imported)}"
    assert not imported & (top_level - {"ditlab.inference", "ditlab.seeding"}) or source in top_level


def test_imports_inside_functions_are_for_optional_heavy_dependencies_only():
    misplaced = [
        f"{path.relative_to(SRC)}:{line} imports {name}"
        for path in MODULES.values()
        for name, inside, line in imports_of(path)
        if inside and not name.startswith(LAZY_OK)
    ]
    assert not misplaced, misplaced


def test_the_checks_see_a_cycle_when_there_is_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}}) is None
    assert room("ditlab.data.prepared") == "data" and room("ditlab.inference") == "ditlab.inference"
    assert resolve("ditlab.data.prepared.PreparedDir") == "ditlab.data.prepared"
