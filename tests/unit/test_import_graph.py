"""The import graph of catq/: no cycle among its modules, and nothing in it imports ``workers``.

Read from the source with ``ast`` (nothing is imported): every ``import`` and ``from ... import``
counts, at module level and inside functions alike (a lazy import is still a dependency), and so
does ``importlib.import_module("...")`` with a constant (or f-string) prefix. Imports under
``if TYPE_CHECKING:`` are left out: they never run. ``from pkg import name`` is an edge to
``pkg.name`` when that is a module, else to ``pkg``.

    python tests/unit/test_import_graph.py      # prints the cycles and upward imports, if any
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "catq"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(package: str = PACKAGE) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_nodes(tree: ast.AST):
    """Every node but those under ``if TYPE_CHECKING:`` (its ``else`` branch still counts)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _import_module_target(call: ast.Call) -> str | None:
    """The constant prefix of ``importlib.import_module(...)``'s first argument."""
    func = call.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if name != "import_module" or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        return str(arg.values[0].value).rstrip(".") or None
    return None


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules ``name`` (the file at ``path``) imports, as dotted names (any package)."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in known else target)
        elif isinstance(node, ast.Call):
            target = _import_module_target(node)
            if target:
                found.add(target)
    found.discard(name)
    return found


def graph(package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports (an import of a module's own package
    ``__init__`` from inside that package is kept: it runs)."""
    mods = modules(package)
    known = set(mods)
    edges = {}
    for name, path in mods.items():
        edges[name] = {m for m in imports_of(name, path, known) if m in known}
    return edges


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return sorted(found)


def upward_imports(package: str = PACKAGE, forbidden: str = "workers") -> dict[str, set[str]]:
    """Module of ``package`` -> what it imports from ``forbidden`` (or ``forbidden`` itself)."""
    mods = modules(package)
    known = set(mods)
    out = {}
    for name, path in mods.items():
        bad = {m for m in imports_of(name, path, known) if m == forbidden or m.startswith(forbidden + ".")}
        if bad:
            out[name] = bad
    return out


LIBRARY = ("catq.bus", "catq.messages", "catq.teacher", "catq.learner", "catq.engines", "catq.roles",
           "catq.runtime", "catq.ingest", "catq.prompt_requests", "catq.results", "catq.topology",
           "catq.config")
"""Packages and modules below the operator commands: none of them may import ``catq.ops``."""


def imports_of_ops(edges: dict[str, set[str]]) -> dict[str, set[str]]:
    """Library module -> the catq.ops modules it imports (see catq/ops/__init__.py)."""
    out = {}
    for name, targets in edges.items():
        if name.startswith("catq.ops") or not any(name == p or name.startswith(p + ".") for p in LIBRARY):
            continue
        bad = {t for t in targets if t == "catq.ops" or t.startswith("catq.ops.")}
        if bad:
            out[name] = bad
    return out


def test_the_graph_sees_the_imports_it_should():
    edges = graph()
    assert "catq.learner.distributed" in edges["catq.learner.trainer"]  # module level
    assert "catq.learner.trainer" in edges["catq.learner.leader"]
    assert any(edges.values()) and len(edges) > 40


def test_cycles_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_among_catq_modules():
    assert cycles(graph()) == []


def test_nothing_in_catq_imports_workers():
    assert upward_imports() == {}


def test_the_library_and_roles_do_not_import_the_operator_commands():
    edges = graph()
    assert "catq.ops.health" in edges["catq.launcher"]  # the checker sees ops imports at all
    assert imports_of_ops(edges) == {}


if __name__ == "__main__":
    print("cycles:", cycles(graph()) or "none")
    print("imports of workers from catq:", upward_imports() or "none")
    print("imports of catq.ops from the library:", imports_of_ops(graph()) or "none")
