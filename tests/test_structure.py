"""Structure (issue 7): imports inside `xlora_export` go one way (no cycle, no function-level import hiding one),
and the experts a model reports are the experts it was built from."""

from __future__ import annotations

import ast
import os

import torch

from helpers import expert_paths, make_xlora
from xlora_export.experts import load_expert

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "xlora_export")


def _sibling_imports(path: str) -> tuple[set[str], set[str]]:
    """(modules of the package imported at module level, imported inside functions) by a source file."""
    tree = ast.parse(open(path).read())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
            (top if node in tree.body else nested).update(n.split(".")[0] for n in names)
    return top, nested


# Command entry points import the torch-heavy modules inside `main`, so that Ctrl-C while torch loads is one line.
ENTRY_POINTS = {"cli.py", "demo.py", "parity.py"}


def test_package_imports_are_one_way():
    graph = {}
    for name in sorted(os.listdir(PACKAGE)):
        if name.endswith(".py") and name != "__init__.py":
            top, nested = _sibling_imports(os.path.join(PACKAGE, name))
            assert name in ENTRY_POINTS or not nested, f"{name} imports {sorted(nested)} inside a function"
            graph[name[:-3]] = top | nested
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            assert state.get(dep) != "open", f"import cycle: {' -> '.join(path + [module, dep])}"
            if dep not in state:
                visit(dep, path + [module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])
    assert "model" not in graph["checkpoints"] and "model" not in graph["generation"]


def test_experts_report_their_rank_scale_and_weights():
    model = make_xlora("tiny-llama")
    reported = {e.name: e for e in model.experts()}
    assert list(reported) == model.adapter_names
    for name, folder in expert_paths("tiny-llama").items():
        loaded = load_expert(name, folder)
        got = reported[name]
        assert (got.rank, got.scale, got.dropout, got.adapter_config) == (loaded.rank, loaded.scale, loaded.dropout,
                                                                          loaded.adapter_config)
        assert got.rank > 0 and got.scale > 0
        assert sorted(got.weights) == sorted(loaded.weights)
        for module, (a, b) in loaded.weights.items():
            assert torch.equal(got.weights[module][0], a) and torch.equal(got.weights[module][1], b)
