"""The import graph of the project's packages, read from the source with `ast` (nothing is imported).

Rules (docs/architecture.md, "Layers"):
- no import cycles, counting module-level and function-level imports alike (an import inside a
  function still ties the two modules together; it only hides the cycle from the interpreter);
- library code never imports a CLI module (a module named `cli` or ending in `_cli`); only CLI
  modules and `__main__` modules may;
- `model/` is the ground floor: it imports nothing from `flows/` or `services/`;
- the lifecycle's console (`flows/console.py`, a presenter) is the CLI's: only CLI modules import it,
  library code reports through callbacks and `flows/progress.py`.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("model", "flows", "services", "infra")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            found[_module_name(path)] = path
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` names or lies in (`a.b.func` -> `a.b`)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(known: dict[str, Path] | None = None) -> dict[str, set[tuple[str, int]]]:
    """module -> {(imported project module, line)} for every import statement at any depth."""
    known = known if known is not None else _modules()
    edges: dict[str, set[tuple[str, int]]] = {m: set() for m in known}
    for mod, path in known.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        for owner, node in _import_nodes(mod, ast.parse(path.read_text(), filename=str(path))):
            edges.setdefault(owner, set())
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one.
                targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
                targets = [t for t in targets[:-1] if t in known] or [prefix]
            for target in targets:
                resolved = _resolve(target, known)
                if resolved is not None and resolved != mod:
                    edges[owner].add((resolved, node.lineno))
    return edges


def _import_nodes(mod: str, tree: ast.Module):
    """(owner, import node) for every import at any depth, an `if __name__ == "__main__":` block's
    too: it is part of the module's file, so a library module's main guard may not import a CLI
    (`python -m pkg` entrypoints live in a `__main__.py` of their own)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield mod, node


def _is_cli(mod: str) -> bool:
    last = mod.rpartition(".")[2]
    return last == "cli" or last.endswith("_cli") or last == "__main__"


def find_cycles(edges: dict[str, set[tuple[str, int]]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    graph = {m: sorted({t for t, _ in ts}) for m, ts in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def _edge_lines(edges, sources, predicate) -> list[str]:
    out = []
    for mod in sorted(sources):
        for target, line in sorted(edges[mod], key=lambda e: (e[1], e[0])):
            if predicate(mod, target):
                out.append(f"{edges_path(mod)}:{line}: {mod} -> {target}")
    return out


_KNOWN = _modules()


@functools.cache
def _graph() -> dict[str, set[tuple[str, int]]]:
    return import_edges(_KNOWN)


def edges_path(mod: str) -> str:
    return str(_KNOWN[mod].relative_to(ROOT))


def test_graph_sees_the_packages():
    edges = _graph()
    assert {"model.model", "flows.cli", "services.engine.engine", "infra.kustomize"} <= set(edges)
    # A sanity check that relative and absolute imports are both read.
    assert any(t == "model.config" for t, _ in edges["model.model"])
    assert sum(len(v) for v in edges.values()) > 200
    # Function-level imports count: flows/finetune/__init__.py imports its stages inside functions.
    assert any(t == "flows.finetune.sft" for t, _ in edges["flows.finetune"])
    # `python -m flows.lifecycle` is the package's own __main__ module, a CLI: it parses with the
    # lifecycle's own cli module, not the whole `herd` parser; the driver imports no CLI.
    assert {t for t, _ in edges["flows.lifecycle.__main__"]} == {"flows.lifecycle.cli"}
    assert not any(_is_cli(t) for t, _ in edges["flows.lifecycle.run"])


def test_the_checks_find_what_they_look_for():
    graph = {"a": {("b", 1)}, "b": {("c", 2)}, "c": {("a", 3)}, "d": {("a", 4)}}
    assert find_cycles(graph) == [["a", "b", "c"]]
    assert find_cycles({"a": {("b", 1)}, "b": set()}) == []
    assert _is_cli("model.cli") and _is_cli("flows.lifecycle.cli") and _is_cli("flows.lifecycle.__main__")
    assert not _is_cli("flows.client") and not _is_cli("services.api.app")


def test_no_import_cycles():
    edges = _graph()
    cycles = find_cycles(edges)
    report = []
    for comp in cycles:
        members = set(comp)
        report.append("cycle: " + ", ".join(comp))
        report += ["  " + e for e in _edge_lines(edges, comp, lambda m, t, members=members: t in members)]
    assert not cycles, "import cycles (module- and function-level imports):\n" + "\n".join(report)


def test_library_code_never_imports_a_cli_module():
    edges = _graph()
    bad = _edge_lines(edges, [m for m in edges if not _is_cli(m)], lambda m, t: _is_cli(t))
    assert not bad, "library modules importing CLI modules:\n" + "\n".join(bad)


def test_only_cli_modules_use_the_console():
    edges = _graph()
    assert "flows.console" in edges
    bad = _edge_lines(edges, [m for m in edges if not _is_cli(m)], lambda m, t: t == "flows.console")
    assert not bad, "library modules importing the console:\n" + "\n".join(bad)


def test_model_imports_nothing_above_it():
    edges = _graph()
    above = ("flows", "services", "infra")
    bad = _edge_lines(
        edges,
        [m for m in edges if m == "model" or m.startswith("model.")],
        lambda m, t: t.split(".")[0] in above,
    )
    assert not bad, "model/ importing flows/, services/ or infra/:\n" + "\n".join(bad)


def _top_level_names(tree: ast.Module) -> set[str]:
    """Names a module binds at its top level (definitions, assignments and imports, also inside
    top-level if/try blocks)."""
    names: set[str] = set()

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return names


def test_every_name_in_all_is_bound():
    """`from module import *` must not raise: each name in a module's `__all__` is bound there."""
    missing = []
    for mod, path in _modules().items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
            ):
                bound = _top_level_names(tree)
                missing += [f"{mod}.{name}" for name in ast.literal_eval(node.value) if name not in bound]
    assert not missing, "names in __all__ that the module does not bind:\n" + "\n".join(missing)
