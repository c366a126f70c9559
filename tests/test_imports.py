"""The package's modules import one another without a circle and never from a floor above their own, lazy
(function-level) imports included: a circle means two modules each know the other, and the lower one cannot be
read, tested or moved alone; an upward import is half a circle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cptoolkit"


def import_graph(package: Path) -> dict[str, set[str]]:
    """``module -> the package modules it imports anywhere in its file`` (dotted names)."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def test_the_finder_sees_a_circle_through_a_lazy_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert circles(graph) == [["a", "b", "c"]]


def test_no_module_of_the_package_is_in_an_import_circle():
    assert circles(import_graph(PACKAGE)) == []


# Each floor and the floors above it that it must not import: data flows one way (config -> layout -> groups ->
# layers -> model -> engine), so a lower module never reaches up.
HIGHER_FLOORS = {
    "cptoolkit.layers": ("cptoolkit.models", "cptoolkit.inference", "cptoolkit.serving", "cptoolkit.training"),
    "cptoolkit.moe": ("cptoolkit.inference", "cptoolkit.serving", "cptoolkit.training"),
}


def _in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``module -> target`` for every import of a module from a floor above its own (``HIGHER_FLOORS``)."""
    return [f"{module} -> {target}" for module in sorted(graph) for target in sorted(graph[module])
            for floor, above in HIGHER_FLOORS.items()
            if _in(module, floor) and any(_in(target, higher) for higher in above)]


def test_the_finder_sees_an_upward_import():
    graph = {"cptoolkit.layers.mla": {"cptoolkit.models.shape", "cptoolkit.layers.comm"},
             "cptoolkit.moe.layer": {"cptoolkit.models.moe_dims", "cptoolkit.training.trainer"},
             "cptoolkit.models.shape": {"cptoolkit.layers.mla_dims"}}
    assert upward_imports(graph) == ["cptoolkit.layers.mla -> cptoolkit.models.shape",
                                     "cptoolkit.moe.layer -> cptoolkit.training.trainer"]


def test_no_module_imports_a_floor_above_its_own():
    assert upward_imports(import_graph(PACKAGE)) == []
