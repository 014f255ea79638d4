"""The package's import graph is layered and acyclic.

Every ``.py`` under ``verl_hindsight/`` and ``envs/`` (installed as ``verl_hindsight.envs``) is parsed with ``ast``;
every ``import verl_hindsight...`` / ``from verl_hindsight... import ...`` counts, at module level or inside a
function. Imports by string (``importlib.import_module``, the post-import hooks of ``register.py``, the built-in env
table of ``environment.protocol``) are plugin look-ups and are not part of the graph.

Data flows one way: environments -> agent loop (which builds the hindsight answers with ``hindsight.analyzer``)
-> hindsight stage -> advantage / distillation loss (``algo``) -> trainer; the demo, the report and the command
line sit on top. A module may import its own top-level package freely and any package of a strictly lower layer;
packages that share a layer are independent of each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
ROOT = "verl_hindsight"

# top-level package or module of verl_hindsight ("" is verl_hindsight/__init__.py) -> layer
LAYERS: dict[str, int] = {
    # base: no verl_hindsight imports beyond their own package
    "": 0, "config": 0, "spans": 0, "post_import": 0, "launch": 0, "environment": 0, "tasks": 0,
    # benchmark adapters (may use environment, config)
    "envs": 1,
    # independent services: model serving, the CPU runtime, hindsight analysis/stage (no agent loop, algo, trainer)
    "rollout": 2, "runtime": 2, "hindsight": 2,
    # the agent loops (record episodes, ask the hindsight questions)
    "agent_loops": 3,
    # advantage estimators and distillation losses
    "algo": 4,
    # the trainer, and the verl plugin entry point that registers everything
    "trainer": 5, "register": 5,
    # tools, on top of everything the training uses
    "report": 6, "tiny_model": 6, "models": 6, "lift": 6, "plan": 6,
    "demo": 7,
    "cli": 8,
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = rel.parts if rel.parts[0] == ROOT else (ROOT, *rel.parts)  # envs/x.py -> verl_hindsight.envs.x
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    files = [*(REPO / ROOT).rglob("*.py"), *(REPO / "envs").rglob("*.py")]
    return {_module_name(p): p for p in sorted(files)}


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The verl_hindsight modules ``name`` imports (a ``from M import x`` counts as M.x when that is a module)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == ROOT or a.name.startswith(ROOT + "."))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base != ROOT and not base.startswith(ROOT + "."):
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _top(module: str) -> str:
    """verl_hindsight.agent_loops.env_loop -> agent_loops; verl_hindsight -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path) per strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:  # breadth-first: the shortest way from the component's first module back to it
        start = min(component)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:
            next_frontier = []
            for v in frontier:
                for w in sorted(graph[v] & component):
                    if w not in came_from:
                        came_from[w] = v
                        next_frontier.append(w)
            frontier = next_frontier
        path = [start, came_from[start]]
        while path[-1] != start:
            path.append(came_from[path[-1]])
        cycles.append(path[::-1])
    return cycles


def test_every_module_has_a_layer_and_every_import_exists():
    graph = _graph()
    unlayered = sorted(m for m in graph if _top(m) not in LAYERS)
    missing = sorted(f"{src} -> {dst}" for src, dsts in graph.items() for dst in dsts if dst not in graph)
    assert not unlayered and not missing, (
        f"modules whose top-level package has no entry in LAYERS: {unlayered}; "
        f"imports of verl_hindsight modules that do not exist: {missing}")


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles between verl_hindsight modules:\n" + "\n".join(
        "  " + " -> ".join(c) for c in cycles)


def test_no_upward_or_sideways_imports():
    graph = _graph()
    bad = []
    for src, dsts in sorted(graph.items()):
        for dst in sorted(dsts):
            a, b = _top(src), _top(dst)
            if a == b or a not in LAYERS or b not in LAYERS:
                continue
            if LAYERS[b] >= LAYERS[a]:
                kind = "up" if LAYERS[b] > LAYERS[a] else "sideways"
                bad.append(f"  {src} (layer {LAYERS[a]}) -> {dst} (layer {LAYERS[b]}, {kind})")
    assert not bad, ("imports against the layer table (a module may import its own package and strictly lower "
                     "layers only; see LAYERS in this file):\n" + "\n".join(bad))
