"""Imports run one way: the network knows nothing of training; data and the LightningModule know
nothing of the entry points; no module imports itself back through another."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vit"
ENTRY_POINTS = {"train", "evaluate", "attention", "export"}


def _imports() -> dict[str, set[str]]:
    graph = {}
    for path in PACKAGE.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vit."):
                names.add(node.module.removeprefix("vit."))
            elif isinstance(node, ast.Import):
                names |= {a.name.removeprefix("vit.") for a in node.names if a.name.startswith("vit.")}
        graph[path.stem] = names
    return graph


def test_imports_run_one_way_without_cycles():
    graph = _imports()
    assert graph["model"] <= {"errors"}  # pure PyTorch
    for core in ("model", "data", "module", "optim", "schedule", "checkpoint", "config", "errors", "outputs"):
        assert not graph[core] & ENTRY_POINTS, (core, graph[core])
    assert "module" not in graph["data"] and "data" not in graph["module"]

    def reaches(start: str, target: str, seen: frozenset = frozenset()) -> bool:
        return any(n == target or (n not in seen and reaches(n, target, seen | {n})) for n in graph.get(start, ()))

    assert not [m for m in graph if reaches(m, m)]
