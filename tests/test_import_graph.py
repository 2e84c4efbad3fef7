"""No import cycle in fifa_jax/, counting imports inside functions.

Every module under fifa_jax/ is parsed with `ast`; every Import / ImportFrom node anywhere in
it (top level, functions, `if TYPE_CHECKING`) is an edge, relative imports resolved against
the module's package. The edge rule:

- `import a.b.c` -> a.b.c (the named module; its parent packages are imported too, but only
  as containers, see below).
- `from a.b import c` -> a.b.c when that is a module of ours (a submodule import), else a.b
  (a name defined by a.b's `__init__`: a real dependency on the package's contents).

Parent packages are not edges: when a submodule is imported its parents' `__init__` run first,
but a package `__init__` importing its own submodules (`fifa_jax/sampling/__init__.py`
re-exporting `sampling.denoise`) is fine as long as the submodules never use names of the
partly initialised `__init__`; if one does (`from fifa_jax.sampling import denoise` where
`denoise` is a function of the `__init__`, not the submodule), the second rule makes it an
edge back to the package, and the cycle is reported. So the graph's cycles are the real ones:
each means some module runs while another it needs is half-initialised, or works only
because of the order in which function bodies happen to execute.
"""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fifa_jax"


def modules() -> dict[str, tuple[pathlib.Path, bool]]:
    """Dotted module name -> (file, is a package `__init__`) of every module under fifa_jax/."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def imports_of(name: str, path: pathlib.Path, is_pkg: bool, known) -> set[str]:
    """The modules of ours that module `name` imports anywhere in its file (the edge rule of
    the module docstring)."""
    package = name if is_pkg else name.rpartition(".")[0]
    deps = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            deps.update(a.name for a in node.names if a.name in known)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[:len(parts) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for a in node.names:
                sub = f"{source}.{a.name}"
                if sub in known:
                    deps.add(sub)
                elif source in known:
                    deps.add(source)
    deps.discard(name)
    return deps


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {n: imports_of(n, p, is_pkg, known) for n, (p, is_pkg) in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def describe(graph, comp) -> str:
    return "\n".join(f"  {m} -> {', '.join(sorted(graph[m] & set(comp)))}" for m in comp)


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 100, f"found only {len(graph)} modules under {PACKAGE}"
    found = cycles(graph)
    assert not found, "import cycles in fifa_jax/:\n" + "\n\n".join(
        describe(graph, c) for c in found)


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    """The rules on a made-up package: a cycle through a function-level import, a relative
    import and a name of a package __init__ is found; a package re-exporting its submodule
    is not a cycle."""
    pkg = tmp_path / "p"
    (pkg / "q").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "q" / "__init__.py").write_text("from p.q.leaf import f\nX = 1\n")
    (pkg / "q" / "leaf.py").write_text("def f():\n    return 1\n")
    (pkg / "a.py").write_text("def g():\n    from .b import h\n    return h\n")
    (pkg / "b.py").write_text("from p import a\nfrom p.q import X\n")
    known = {"p": (pkg / "__init__.py", True), "p.q": (pkg / "q" / "__init__.py", True),
             "p.q.leaf": (pkg / "q" / "leaf.py", False), "p.a": (pkg / "a.py", False),
             "p.b": (pkg / "b.py", False)}
    graph = {n: imports_of(n, p, i, known) for n, (p, i) in known.items()}
    assert graph["p.a"] == {"p.b"} and graph["p.b"] == {"p.a", "p.q"}
    assert graph["p.q"] == {"p.q.leaf"} and graph["p.q.leaf"] == set()
    assert cycles(graph) == [["p.a", "p.b"]]
    (pkg / "q" / "leaf.py").write_text("from p.q import X\n")     # leaf uses the __init__'s X
    known_graph = {n: imports_of(n, p, i, known) for n, (p, i) in known.items()}
    assert ["p.q", "p.q.leaf"] in cycles(known_graph)
