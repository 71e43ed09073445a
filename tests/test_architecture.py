"""The house's dependency contract: packages form layers and import only downwards.

    medit.errors, medit (the package: version and hookimpl)  <  medit.plugin  <  medit.core  <  medit.model
    <  medit.scoring  <  medit.toolkit
    <  medit.evaluation  <  medit.plugins (built-ins)  <  medit.api, medit.testing  <  medit.cli

``medit/__init__.py`` is the public facade: it resolves its names lazily, so importing the package
costs only the version and ``hookimpl`` (checked: its module-level imports are that alone).

Within a layer, no modules import each other, round any loop. Imports under ``if TYPE_CHECKING:``
are annotations, not dependencies, and are not counted; imports inside functions are (deferring an
import does not remove the dependency).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "medit"
LAYERS = [
    ("medit.errors", "medit"),
    ("medit.plugin",),
    ("medit.core",),
    ("medit.model",),
    ("medit.scoring",),
    ("medit.toolkit",),
    ("medit.evaluation",),
    ("medit.plugins",),
    ("medit.api", "medit.testing"),
    ("medit.cli", "medit.__main__"),
]


def layer_of(module: str) -> int:
    """Index in LAYERS of the longest prefix naming ``module``'s package."""
    best, best_len = -1, -1
    for i, names in enumerate(LAYERS):
        for name in names:
            exact = name in ("medit", "medit.api", "medit.__main__", "medit.errors")
            if (module == name or (not exact and module.startswith(name + "."))) and len(name) > best_len:
                best, best_len = i, len(name)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports(path: Path) -> list[tuple[int, str]]:
    """(line, imported medit module) of every runtime import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path)
    out: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                for sub in child.orelse:  # type: ignore[attr-defined]
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.extend((child.lineno, a.name) for a in child.names if a.name.split(".")[0] == "medit")
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = me.split(".")[: len(me.split(".")) - child.level + (path.name == "__init__.py")]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                if mod.split(".")[0] == "medit":
                    # `from medit.x import y` may import the submodule medit.x.y
                    for a in child.names:
                        sub = f"{mod}.{a.name}"
                        target = sub if (ROOT.parent / (sub.replace(".", "/") + ".py")).exists() or \
                            (ROOT.parent / sub.replace(".", "/")).is_dir() else mod
                        out.append((child.lineno, target))
            visit(child)

    visit(tree)
    return out


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in ROOT.rglob("*.py") if layer_of(module_name(p)) < 0]
    assert not missing, f"modules outside the layer map: {missing}"


def test_imports_point_downwards():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = module_name(path)
        if me == "medit":
            continue  # the lazy facade; see test_the_facade_imports_nothing_eagerly
        mine = layer_of(me)
        for line, target in imports(path):
            theirs = layer_of(target)
            if theirs > mine:
                bad.append(f"{path.relative_to(ROOT.parent)}:{line} {me} imports {target} "
                           f"(layer {LAYERS[theirs][0]} is above {LAYERS[mine][0]})")
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def module_graph() -> dict[str, set[str]]:
    """Each medit module -> the medit modules it imports (a name inside a module counts as that module)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for me, path in paths.items():
        deps = set()
        for _, target in imports(path):
            while target and target not in paths:
                target = target.rpartition(".")[0]
            if target and target != me:
                deps.add(target)
        graph[me] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or round a loop (strongly connected
    components of more than one module), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    """Within a layer too, modules import one way: a loop (even through an import deferred into a
    function) means neither module can be read, tested or moved without the other."""
    graph = module_graph()
    graph.pop("medit", None)  # the lazy facade names everything; nothing inside imports it
    assert cycles(graph) == [], "modules importing each other"


def test_the_cycle_finder_sees_a_loop():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_checker_sees_a_violation(tmp_path):
    """The contract can fail: a core module importing a built-in plugin is caught."""
    fake = ROOT / "core" / "_architecture_probe.py"
    fake.write_text("from medit.plugins.methods import rome\n")
    try:
        found = [(line, t) for line, t in imports(fake) if layer_of(t) > layer_of(module_name(fake))]
    finally:
        fake.unlink()
    assert found == [(1, "medit.plugins.methods.rome")]


def test_the_facade_imports_nothing_eagerly():
    tree = ast.parse((ROOT / "__init__.py").read_text(encoding="utf-8"))
    eager = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    names = [(n.module if isinstance(n, ast.ImportFrom) else n.names[0].name) for n in eager]
    assert set(names) <= {"__future__", "medit.plugin.hookspecs", "typing"}, names
