"""The import graph of ``src/rexrag``: no cycles, and the layering the README's architecture section states.

The graph is read from the source with ``ast``, nothing is imported: every ``import`` /
``from ... import`` of ``rexrag.*``, at module level and inside functions alike (a function-level
import is still a dependency; it only hides a cycle), relative imports resolved. ``from pkg import
name`` is an edge to ``pkg.name`` when that is a module, else to ``pkg``. Importing ``rexrag.pkg.mod``
runs ``rexrag/pkg/__init__.py`` first, so it is an edge to ``rexrag.pkg`` as well (from outside
``pkg``). Imports under ``if TYPE_CHECKING:`` never run, but they count for the layering and for cycles
alike: an annotation still ties the two modules (``typing.get_type_hints`` and the API docs resolve it,
and it is one edit away from a runtime import), so a circle closed by one is still a circle.
Dynamic imports (``importlib.import_module`` with a computed name) are not edges.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "rexrag"

# Layering (README "Architecture"): a module under the key never imports one under any listed prefix.
_UPPER = ("rexrag.rollout", "rexrag.train", "rexrag.rex", "rexrag.commands", "rexrag.demo")
FORBIDDEN = {
    "rexrag.protocol": _UPPER,
    "rexrag.retrieval": _UPPER,
    "rexrag.algos": _UPPER,
    "rexrag.rollout": _UPPER[1:],
}
# Subcommands sit on top: only the CLI and other subcommands import them.
COMMANDS = "rexrag.commands"
COMMAND_IMPORTERS = ("rexrag.cli", "rexrag.commands")


@dataclass(frozen=True)
class Edge:
    src: str  # importing module, e.g. "rexrag.data"
    dst: str  # imported module, e.g. "rexrag.retrieval.base"
    path: str  # importing file, relative to the repository, e.g. "src/rexrag/data.py"
    line: int
    stmt: str  # the import statement as written
    type_only: bool = False  # under ``if TYPE_CHECKING:``

    def where(self) -> str:
        return f"{self.path}:{self.line}: {self.stmt}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that ``name`` names or lies inside (``rexrag.x.attr`` -> ``rexrag.x``)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, type_only: bool = False):
    """(import node, under TYPE_CHECKING) for every import anywhere in ``tree``."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node, type_only
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), True)
            for child in node.orelse:
                yield from _imports(ast.Module(body=[child], type_ignores=[]), type_only)
        else:
            yield from _imports(node, type_only)


def _targets(node: ast.Import | ast.ImportFrom, mod: str, is_pkg: bool, modules: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base_parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
        base_parts = base_parts[: len(base_parts) - (node.level - 1)]
        base = ".".join(base_parts + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]


def import_edges(modules: dict[str, Path] | None = None) -> list[Edge]:
    """Every static import of a ``rexrag`` module by a ``rexrag`` module, with file, line and statement."""
    modules = modules if modules is not None else _modules()
    edges = []
    for mod, path in modules.items():
        source = path.read_text(encoding="utf-8")
        rel = path.relative_to(SRC.parent).as_posix()
        for node, type_only in _imports(ast.parse(source, filename=str(path))):
            stmt = " ".join((ast.get_source_segment(source, node) or ast.unparse(node)).split())
            for target in dict.fromkeys(_targets(node, mod, path.name == "__init__.py", modules)):
                dst = _resolve(target, modules) if _within(target, PACKAGE) else None
                if dst is None:
                    continue
                parts = dst.split(".")
                for n in range(2, len(parts) + 1):  # the packages on the way run their __init__ first
                    hop = ".".join(parts[:n])
                    if hop != mod and not _within(mod, hop) and hop in modules:
                        edges.append(Edge(mod, hop, rel, node.lineno, stmt, type_only))
    return edges


def _strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[set[str]]:
    """Tarjan's algorithm; the components with more than one module (there are no self-edges)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def visit(v: str) -> None:  # a few dozen modules: recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _shortest_cycle(graph: dict[str, dict[str, Edge]], comp: set[str]) -> list[Edge]:
    """Breadth-first from the component's first module back to itself, staying inside the component."""
    start = min(comp)
    parent: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w, e in sorted(graph.get(v, {}).items()):
                if w == start:
                    path = [e]
                    while path[0].src != start:
                        path.insert(0, parent[path[0].src])
                    return path
                if w in comp and w not in parent:
                    parent[w] = e
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")  # a component always has one


def find_cycles(edges: list[Edge]) -> list[tuple[set[str], list[Edge]]]:
    """(modules, one shortest cycle as the edges that close it) per group of mutually importing modules."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:  # type-only edges included (module docstring)
        graph.setdefault(e.src, {}).setdefault(e.dst, e)
    return [(comp, _shortest_cycle(graph, comp)) for comp in _strongly_connected(graph)]


def layering_violations(edges: list[Edge]) -> list[str]:
    out = []
    for e in edges:
        for layer, banned in FORBIDDEN.items():
            if _within(e.src, layer):
                out += [f"{e.where()}  ({layer} must not import {p})" for p in banned if _within(e.dst, p)]
        if _within(e.dst, COMMANDS) and not any(_within(e.src, p) for p in COMMAND_IMPORTERS):
            out.append(f"{e.where()}  (only {' and '.join(COMMAND_IMPORTERS)} import {COMMANDS})")
    return list(dict.fromkeys(out))  # ``import a.b.c`` is one message, not one per package on the way


def _describe(comp: set[str], cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].src] + [e.dst for e in cycle])
    lines = [chain] + [f"    {e.where()}" + ("  (type-only)" if e.type_only else "") for e in cycle]
    if len(comp) > len(cycle):
        lines.append(f"    (other modules in the same loop: {', '.join(sorted(comp - {e.src for e in cycle}))})")
    return "\n".join(lines)


def test_no_import_cycles():
    edges = import_edges()
    assert len({e.src for e in edges}) > 20, f"too few rexrag modules found under {SRC}"
    cycles = find_cycles(edges)
    assert not cycles, "import cycles in src/rexrag:\n" + "\n".join(_describe(*c) for c in cycles)


# The config is read first and by everything (CLI, trainer, workers): what it imports to check a choice (the
# backends' names, the reward names and the text views rewards read) must load none of the agent, the engines
# or the models, which import the config themselves.
CONFIG = "rexrag.config"
CONFIG_NEVER_REACHES = ("rexrag.rollout.agent", "rexrag.rollout.backends", "rexrag.rollout.engine",
                        "rexrag.rollout.vllm_backend", "rexrag.models")


def import_chain(edges: list[Edge], start: str, goal: str) -> list[Edge] | None:
    """The shortest chain of imports (type-only and function-level included) from ``start`` to ``goal``."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.src, {}).setdefault(e.dst, e)
    parent: dict[str, Edge] = {}
    frontier, seen = [start], {start}
    while frontier:
        nxt = []
        for v in frontier:
            for w, e in sorted(graph.get(v, {}).items()):
                if w in seen:
                    continue
                seen.add(w)
                parent[w] = e
                if w == goal:
                    chain = [e]
                    while chain[0].src != start:
                        chain.insert(0, parent[chain[0].src])
                    return chain
                nxt.append(w)
        frontier = nxt
    return None


def test_config_reads_choices_without_the_engines():
    edges = import_edges()
    found = {goal: import_chain(edges, CONFIG, goal) for goal in CONFIG_NEVER_REACHES}
    bad = [f"{CONFIG} -> ... -> {goal}:\n" + "\n".join(f"    {e.where()}" for e in chain)
           for goal, chain in found.items() if chain]
    assert not bad, "the config imports what imports the config back:\n" + "\n".join(bad)


# The size the house holds itself to: a module longer than this is split along a seam.
MAX_MODULE_LINES = 600


def test_no_module_over_the_line_limit():
    sizes = {p.relative_to(SRC.parent).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in sorted((SRC / PACKAGE).rglob("*.py"))}
    long = [f"{path}: {n} lines" for path, n in sizes.items() if n > MAX_MODULE_LINES]
    assert not long, (f"modules over {MAX_MODULE_LINES} lines (split one along a seam, as train/passes.py is from "
                      "train/trainer.py):\n" + "\n".join(long))


def test_layering():
    bad = layering_violations(import_edges())
    assert not bad, "imports that break the README's layering:\n" + "\n".join(bad)


def test_graph_reader_sees_function_level_relative_and_package_imports(tmp_path, monkeypatch):
    """The checker itself: a cycle hidden in a function and through a package ``__init__``, one closed by
    a TYPE_CHECKING import, a relative import and a layering breach are caught."""
    src = tmp_path / "src"
    pkg = src / PACKAGE
    (pkg / "retrieval").mkdir(parents=True)
    (pkg / "rollout").mkdir()
    files = {
        "__init__.py": "",
        "retrieval/__init__.py": "from .index import build\n",
        "retrieval/base.py": "X = 1\n",
        "retrieval/index.py": "def build():\n    from rexrag.data import load\n",
        "data.py": "from rexrag.retrieval.base import X\n",
        "rollout/__init__.py": "",
        "rollout/agent.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rexrag.config import C\n",
        "config.py": "def check():\n    from rexrag.rollout import agent\n",
        "retrieval/uses.py": "from ..rollout.agent import X\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "SRC", src)
    edges = import_edges()
    pairs = {(e.src, e.dst) for e in edges}
    assert ("rexrag.retrieval", "rexrag.retrieval.index") in pairs  # relative, from a package
    assert ("rexrag.retrieval.index", "rexrag.data") in pairs  # function-level
    assert {("rexrag.data", "rexrag.retrieval"), ("rexrag.data", "rexrag.retrieval.base")} <= pairs  # runs __init__
    assert ("rexrag.retrieval.uses", "rexrag.rollout.agent") in pairs  # relative, two levels up
    assert ("rexrag.config", "rexrag.rollout.agent") in pairs  # ``from pkg import module``
    cycles = {frozenset(comp): _describe(comp, cycle) for comp, cycle in find_cycles(edges)}
    assert set(cycles) == {frozenset({"rexrag.data", "rexrag.retrieval", "rexrag.retrieval.index"}),
                           frozenset({"rexrag.config", "rexrag.rollout.agent"})}
    described = cycles[frozenset({"rexrag.data", "rexrag.retrieval", "rexrag.retrieval.index"})]
    assert "rexrag.data -> rexrag.retrieval -> rexrag.retrieval.index -> rexrag.data" in described
    assert "src/rexrag/retrieval/index.py:2: from rexrag.data import load" in described
    typed = cycles[frozenset({"rexrag.config", "rexrag.rollout.agent"})]  # closed by the TYPE_CHECKING import
    assert "src/rexrag/rollout/agent.py:3: from rexrag.config import C  (type-only)" in typed
    (bad,) = layering_violations(edges)
    assert (
        bad
        == "src/rexrag/retrieval/uses.py:1: from ..rollout.agent import X  (rexrag.retrieval must not import rexrag.rollout)"
    )


# --------------------------------------------------------------------------- collectives live in sharding.py

COLLECTIVES = frozenset({
    "all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all", "all_to_all_single",
    "barrier", "monitored_barrier", "broadcast", "broadcast_object_list", "gather", "gather_object", "reduce",
    "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send", "recv", "isend", "irecv"})
ACCELERATE_COLLECTIVES = frozenset({"gather", "gather_object", "reduce", "broadcast", "broadcast_object_list",
                                    "pad_across_processes", "gather_for_metrics"})
ACCELERATOR_NAMES = frozenset({"acc", "accelerator"})
COLLECTIVES_HOME = "src/rexrag/sharding.py"


def _dist_aliases(tree: ast.AST) -> set[str]:
    """Names bound to ``torch.distributed`` anywhere in the module."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            names |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    return names


def _is_torch_distributed(node: ast.expr, aliases: set[str]) -> bool:
    """``dist``, ``self.dist`` (an alias kept on an object) or ``torch.distributed``."""
    if isinstance(node, ast.Name) or (isinstance(node, ast.Attribute) and node.attr in aliases):
        return _receiver_name(node) in aliases
    return (isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name)
            and node.value.id == "torch")


def _receiver_name(node: ast.expr) -> str | None:
    return node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None


def collective_calls(path: Path) -> list[str]:
    """``file:line: what`` for every collective that ``path`` runs or imports itself."""
    tree = ast.parse(path.read_text(), filename=str(path))
    aliases, rel = _dist_aliases(tree), path.relative_to(SRC.parent)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch.distributed", "accelerate.utils"):
            names = COLLECTIVES if node.module == "torch.distributed" else ACCELERATE_COLLECTIVES
            found += [f"{rel}:{node.lineno}: from {node.module} import {a.name}" for a in node.names if a.name in names]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, recv = node.func.attr, node.func.value
            if attr in COLLECTIVES and _is_torch_distributed(recv, aliases):
                found.append(f"{rel}:{node.lineno}: torch.distributed.{attr}")
            elif attr in ACCELERATE_COLLECTIVES and _receiver_name(recv) in ACCELERATOR_NAMES:
                found.append(f"{rel}:{node.lineno}: accelerator.{attr}")
    return found


def test_collectives_are_called_from_sharding_only():
    """A collective anywhere else would escape the strict mode's checks and the comm-device rule."""
    home = SRC.parent / COLLECTIVES_HOME
    assert collective_calls(home), "the scan finds nothing in sharding.py itself: it is broken"
    stray = [hit for path in sorted((SRC / PACKAGE).rglob("*.py")) if path != home for hit in collective_calls(path)]
    assert not stray, "collectives outside rexrag.sharding (use its reduce_values / gather_objects / barrier):\n" + "\n".join(stray)
