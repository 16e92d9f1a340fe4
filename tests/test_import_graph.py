"""The package's import graph has no cycles (STYLE.md: data flows one way), deferred imports included."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("samba_jax", "pallas_kernels")


def module_name(path):
    rel = os.path.relpath(path, ROOT)[:-len(".py")].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def imported_modules(path, modules):
    """Modules of ours that `path` imports anywhere (top level or inside a function)."""
    name = module_name(path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from a.b import c` names module a.b.c or a.b
                target = target.rpartition(".")[0]
            if target and target != name and not name.startswith(target + "."):  # a package's own __init__
                found.add(target)
    return found


def import_graph():
    paths = [os.path.join(d, f) for p in PACKAGES for d, _, files in os.walk(os.path.join(ROOT, p))
             for f in files if f.endswith(".py")]
    modules = {module_name(p): p for p in paths}
    return {name: imported_modules(path, modules) for name, path in modules.items()}


def find_cycle(graph):
    """One cycle as a list of modules, or None."""
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, stack)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node, [])
            if cycle:
                return cycle
    return None


def test_no_module_imports_one_that_imports_it_back():
    cycle = find_cycle(import_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_cycle_finder_sees_a_deferred_import():
    graph = import_graph()
    assert "samba_jax.data.tfds_source" in graph["samba_jax.data.sources"]  # imported inside a function
    graph["samba_jax.data.tfds_source"] = graph["samba_jax.data.tfds_source"] | {"samba_jax.data.sources"}
    assert find_cycle(graph) is not None
