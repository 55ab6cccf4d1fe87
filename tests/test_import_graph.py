"""pymerge's modules import one way (docs/ARCHITECTURE.md, "Layers"): no import cycle anywhere, and every import
runs from a layer to the same layer or one below it.

The graph is read from the source, not from a running interpreter: every `import` and `from ... import`
statement of every module of pymerge/ and kernels/ (installed as pymerge.kernels), function-level ones included,
relative ones resolved; `from package import name` counts as an import of the submodule `name` where one exists.
"""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Bottom to top. A module may import modules of its own layer and of the layers below it, never above.
LAYERS = (
    ("foundation", ("pymerge.dtypes", "pymerge.fused_grad")),          # what kernels and ops share
    ("io", ("pymerge.io",)),                                           # models on disk: readers, writer
    ("backends", ("pymerge.reference", "pymerge.kernels")),            # pymerge._C (csrc/) is built, not read
    ("ops", ("pymerge.ops",)),
    ("learn", ("pymerge.learn",)),
    ("teachers", ("pymerge.teachers",)),
    ("methods", ("pymerge.methods", "pymerge.merge")),
    ("adapters", ("pymerge.adapters", "pymerge.functional")),          # peers' tools calling pymerge
    ("peers, synthetic models", ("pymerge.peers", "pymerge.synthetic")),   # tests', benchmarks', demo's support
    ("eval", ("pymerge.eval",)),                                       # real tasks, cached experts
    ("entry points", ("pymerge", "pymerge.__main__", "pymerge.cli", "pymerge.cli.__main__", "pymerge.cli.common",
                      "pymerge.cli.learned", "pymerge.cli.merge", "pymerge.cli.merge_config", "pymerge.cli.eval",
                      "pymerge.demo")),
)


def package_modules(root):
    """{module name: source path} of root/pymerge and root/kernels (the latter as pymerge.kernels)."""
    modules = {}
    for folder, package in (("pymerge", "pymerge"), ("kernels", "pymerge.kernels")):
        top = os.path.join(root, folder)
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            rel = os.path.relpath(dirpath, top)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for f in filenames:
                if f.endswith(".py"):
                    name = ".".join(parts if f == "__init__.py" else parts + [f[:-3]])
                    modules[name] = os.path.join(dirpath, f)
    return modules


def _resolve(name, modules):
    """The module an import of `name` loads: name itself, else its longest enclosing module of pymerge."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules):
    """{module: {imported pymerge module: first line}} from each module's import statements (all of them)."""
    graph = {}
    for name, path in modules.items():
        package = name if os.path.basename(path) == "__init__.py" else name.rpartition(".")[0]
        edges = {}
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target == "pymerge" or target.startswith("pymerge."):
                    got = _resolve(target, modules)
                    if got is not None and got != name:
                        edges.setdefault(got, node.lineno)
        graph[name] = edges
    return graph


def layer_of(name):
    """Index into LAYERS of a module (entry points are whole module names, the others prefixes), or None."""
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if name == p or (i != len(LAYERS) - 1 and name.startswith(p + ".")):
                return i
    return None


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward_imports(graph, modules):
    """[(importer, line, imported)] of every import that runs from a lower layer to a higher one."""
    return sorted((a, line, b) for a, edges in graph.items() for b, line in edges.items()
                  if layer_of(a) is not None and layer_of(b) is not None and layer_of(a) < layer_of(b))


# ------------------------------------------------------------------------------------------------- the repo
MODULES = package_modules(ROOT)
GRAPH = import_graph(MODULES)


def test_every_module_has_a_layer():
    assert "pymerge.learn.pipeline" in MODULES and "pymerge.kernels.divergence" in MODULES
    assert [m for m in MODULES if layer_of(m) is None] == []


def test_no_import_cycle():
    found = cycles(GRAPH)
    detail = [{a: sorted(b for b in GRAPH[a] if b in c) for a in c} for c in found]
    assert found == [], f"import cycles: {detail}"


def test_layers_import_downwards():
    up = [f"{MODULES[a]}:{line} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
          for a, line, b in upward_imports(GRAPH, MODULES)]
    assert up == [], "\n".join(up)


def test_the_rules_the_layers_stand_for():
    """The same, spelled out: ops never import methods / learn / teachers / the CLI; learn and teachers never
    import the methods or the CLI; kernels never import pymerge.ops; learn never imports teachers."""
    def imports(src, dst):
        return [(a, b) for a, edges in GRAPH.items() if a.startswith(src) for b in edges if b.startswith(dst)]
    for dst in ("pymerge.methods", "pymerge.merge", "pymerge.learn", "pymerge.teachers", "pymerge.cli"):
        assert imports("pymerge.ops", dst) == []
    for src in ("pymerge.learn", "pymerge.teachers"):
        for dst in ("pymerge.methods", "pymerge.merge", "pymerge.cli"):
            assert imports(src, dst) == []
    assert imports("pymerge.kernels", "pymerge.ops") == []
    assert imports("pymerge.learn", "pymerge.teachers") == []
    # the graph does see the imports these rules are about
    assert "pymerge.ops.divergence" in GRAPH["pymerge.kernels.divergence"] or \
        "pymerge.fused_grad" in GRAPH["pymerge.kernels.divergence"]
    assert "pymerge.learn.pipeline" in GRAPH["pymerge.methods.divmerge"]


# ------------------------------------------------------------------------------- the checks can fail at all
def _tree(tmp_path, files):
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_modules(str(tmp_path))


def test_a_cycle_through_a_function_level_relative_import_is_found(tmp_path):
    modules = _tree(tmp_path, {
        "pymerge/__init__.py": "",
        "pymerge/ops/__init__.py": "",
        "pymerge/ops/a.py": "def f():\n    from ..learn import b\n",
        "pymerge/learn/__init__.py": "",
        "pymerge/learn/b.py": "from pymerge.ops.a import f\n",
        "kernels/__init__.py": "",
        "kernels/k.py": "import pymerge.ops.a\n",
    })
    graph = import_graph(modules)
    assert graph["pymerge.ops.a"] == {"pymerge.learn.b": 2}
    assert graph["pymerge.kernels.k"] == {"pymerge.ops.a": 1}
    assert cycles(graph) == [["pymerge.learn.b", "pymerge.ops.a"]]
    assert upward_imports(graph, modules) == [("pymerge.kernels.k", 1, "pymerge.ops.a"),
                                              ("pymerge.ops.a", 2, "pymerge.learn.b")]


@pytest.mark.parametrize("statement,imported", [
    ("from . import b", "pymerge.learn.b"),             # a submodule named in `from package import`
    ("from .b import g", "pymerge.learn.b"),
    ("from .. import ops", "pymerge.ops"),
    ("from ..ops import thing", "pymerge.ops"),         # a name defined in the package's __init__
    ("import pymerge.learn.b as b", "pymerge.learn.b"),
])
def test_import_forms_resolve(tmp_path, statement, imported):
    modules = _tree(tmp_path, {"pymerge/__init__.py": "", "pymerge/ops/__init__.py": "",
                               "pymerge/learn/__init__.py": "", "pymerge/learn/b.py": "",
                               "pymerge/learn/a.py": f"if True:\n    {statement}\n"})
    assert import_graph(modules)["pymerge.learn.a"] == {imported: 2}
