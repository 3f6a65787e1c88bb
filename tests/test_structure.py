"""The package's shape: no import circles between modules or between subpackages, the engine's
core never imports an entry point, and only kka_ray/cluster.py starts Ray. Read from the source
with ``ast`` (imports under ``if TYPE_CHECKING:`` are annotations only and do not count)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kka_ray"
# What a user or a Ray job runs; the engine's core must not depend on them.
ENTRY_POINTS = {"kka_ray.cli", "kka_ray.submit", "kka_ray.drivers", "kka_ray.tables.cli"}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the kka_ray modules it imports anywhere in its body (functions included)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text())
        skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
                for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                parent = ".".join(base[: len(base) - node.level + 1]) if node.level else ""
                module = ".".join(p for p in (parent, node.module or "") if p)
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target.startswith("kka_ray") and target not in (name, "kka_ray"):
                    edges[name].add(target)
    return edges


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def _subpackage(module: str) -> str:
    return ".".join(module.split(".")[:2])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_imports_itself_back():
    assert _cycles(_imports(_modules())) == []


def test_no_subpackage_imports_itself_back():
    packages: dict[str, set[str]] = defaultdict(set)
    for a, targets in _imports(_modules()).items():
        packages[_subpackage(a)] |= {_subpackage(b) for b in targets if _subpackage(b) != _subpackage(a)}
    assert _cycles(packages) == []


def test_the_engine_core_never_imports_an_entry_point():
    mods = _modules()
    assert ENTRY_POINTS <= set(mods)
    edges = _imports(mods)
    core = [m for m in mods if m not in ENTRY_POINTS]
    bad = {m: sorted(edges[m] & ENTRY_POINTS) for m in core if edges[m] & ENTRY_POINTS}
    assert bad == {}


def test_only_the_cluster_module_starts_ray():
    callers = set()
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("ray.init", "init"):
                callers.add(name)
    assert callers == {"kka_ray.cluster"}


def test_the_detector_registry_is_the_one_name_table():
    """The config's detector names are the registry's, and each name builds its own class from
    its own section."""
    from typing import get_args

    from kka_ray.config import BaselineName, DetectorName, load_config
    from kka_ray.detectors.base import DetectorContext
    from kka_ray.detectors.registry import DETECTORS, TAKES_ANOMALIES, build_detector, own_section

    assert set(get_args(BaselineName)) == set(DETECTORS)
    assert set(get_args(DetectorName)) == set(TAKES_ANOMALIES)
    section = load_config(None, []).detector
    for name in DETECTORS:
        det = build_detector(name, section, DetectorContext())
        assert det.name == name and det.cfg is own_section(name, section)
