"""The package's import structure: no cycles among fints modules, and the core never
imports the server, the benchmark or the CLI (grimp reads imports without running them).

Imports inside functions count as edges too; imports under ``TYPE_CHECKING`` do not
(they never run).
"""

from __future__ import annotations

import grimp
import pytest

CORE = (
    "fints.engine",
    "fints.plan",
    "fints.steering",
    "fints.retrieval",
    "fints.extraction",
    "fints.generation",
    "fints.modes",
    "fints.backends",
    "fints.dictionary",
    "fints.store",
    "fints.injection",
    "fints.recording",
)
OUTER = ("fints.serving", "fints.benchmark", "fints.cli")


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph("fints", exclude_type_checking_imports=True, cache_dir=None)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(edges):
        if root in state:
            continue
        path = [root]
        stack = [iter(sorted(edges[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(edges.get(nxt, ()))))
    return None


def test_find_cycle_reports_the_path() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_the_core_modules(graph: grimp.ImportGraph) -> None:
    """Guards the tests below: a graph without these modules would pass them vacuously."""
    assert set(CORE) <= graph.modules
    assert "fints.plan" in graph.find_modules_directly_imported_by("fints.modes")
    # SteeringVector.apply imports fints.injection inside the function: it counts
    assert "fints.injection" in graph.find_modules_directly_imported_by("fints.steering")


def test_fints_modules_import_each_other_without_cycles(graph: grimp.ImportGraph) -> None:
    edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("core", CORE)
def test_the_core_never_imports_serving_benchmark_or_cli(
    graph: grimp.ImportGraph, core: str
) -> None:
    importers = {core} | graph.find_descendants(core)
    reached = set().union(*(graph.find_upstream_modules(m) for m in importers))
    outer = {m for m in reached if any(m == o or m.startswith(o + ".") for o in OUTER)}
    chains = [graph.find_shortest_chain(importer=i, imported=o) for i in importers for o in outer]
    assert not outer, f"{core} imports {sorted(outer)}: {[c for c in chains if c]}"
