"""Structure: imports inside `xlora_export` go one way (no cycle, no function-level import hiding one), and the
experts a model reports are the experts it was built from; the runtime's layers import downward only (format and
backends under the core, the core under the commands and the server), never torch or the exporter, and every
command runs on the shared runner."""

from __future__ import annotations

import ast
import os
import re

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


# ------------------------------------------------------------------------------------- the runtime's format layer
RUNTIME = os.path.join(os.path.dirname(PACKAGE), "runtime", "xlora_runtime")
# The runtime's command modules: the console scripts of its pyproject.toml, and the scaffolding they share.
with open(os.path.join(RUNTIME, "..", "pyproject.toml"), encoding="utf-8") as _f:
    COMMAND_MODULES = {*re.findall(r'= "(xlora_runtime[\w.]*):', _f.read()), "xlora_runtime.commands"}


def _runtime_imports(path: str) -> set[str]:
    """The xlora_runtime modules a file of the runtime imports (relative imports resolved; `from P import m` counts
    both P and P.m)."""
    folder = os.path.relpath(os.path.dirname(path), RUNTIME)
    package = "xlora_runtime" if folder == os.curdir else "xlora_runtime." + folder.replace(os.sep, ".")
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {name for name in out if name.split(".")[0] == "xlora_runtime"}


def _sources(folder: str) -> list[str]:
    return sorted(os.path.join(top, name) for top, _, names in os.walk(folder) for name in names
                  if name.endswith(".py"))


def test_backends_and_the_format_import_no_command_module():
    """The backends and the format are imported by the commands, never the other way; the format imports the
    standard library, itself and the error type only."""
    assert {"xlora_runtime.engine", "xlora_runtime.cli", "xlora_runtime.serve.cli"} <= COMMAND_MODULES
    for folder in ("backends", "format"):
        for path in _sources(os.path.join(RUNTIME, folder)):
            upward = _runtime_imports(path) & COMMAND_MODULES
            assert not upward, f"{os.path.relpath(path, RUNTIME)} imports the command module(s) {sorted(upward)}"
    for path in _sources(os.path.join(RUNTIME, "format")):
        own = ("xlora_runtime.format", "xlora_runtime.errors")
        outside = {m for m in _runtime_imports(path) if not m.startswith(own)}
        assert not outside, f"{os.path.relpath(path, RUNTIME)} imports {sorted(outside)} from outside the format"


_METADATA = re.compile(r"METADATA_KEY|metadata_props|custom_metadata_map|rt_info|\.metadata\b")


def _parsing_functions(path: str) -> list[str]:
    """Names of the functions of a file that call json.loads or json.load and handle the graph's metadata."""
    text = open(path).read()
    found = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr in ("loads", "load") and getattr(call.func.value, "id", None) == "json"
                for call in ast.walk(node)) and _METADATA.search(ast.get_source_segment(text, node)):
            found.append(node.name)
    return found


def test_the_metadata_record_is_parsed_only_in_the_format():
    """One parser: no function outside `xlora_runtime/format/` decodes the graph's metadata record as JSON (the
    exporter, the quantizer, the session, the backends, the engine builder and the Triton writer go through
    `GraphInfo`). The format's own parser is found by the same check."""
    home = os.path.join(RUNTIME, "format")
    assert "parse" in _parsing_functions(os.path.join(home, "record.py"))
    for path in _sources(RUNTIME) + _sources(PACKAGE):
        if not path.startswith(home + os.sep):
            assert not _parsing_functions(path), f"{path} parses the metadata record: {_parsing_functions(path)}"


# ----------------------------------------------------------------------------- the runtime's layers and commands
ROOT = os.path.dirname(PACKAGE)
EXPORTER_ONLY = ("torch", "transformers", "peft", "safetensors", "accelerate", "xlora_export")  # never the runtime


def _module_path(module: str) -> str:
    """The source file of a module of this checkout (`xlora_runtime...` lives under runtime/)."""
    top = os.path.join(ROOT, "runtime") if module.startswith("xlora_runtime") else ROOT
    path = os.path.join(top, *module.split("."))
    return path + ".py" if os.path.isfile(path + ".py") else os.path.join(path, "__init__.py")


def _module_name(path: str) -> str:
    return "xlora_runtime." + os.path.relpath(path, RUNTIME)[:-3].replace(os.sep, ".").removesuffix(".__init__")


def _console_scripts() -> dict[str, str]:
    """Every command: the console scripts of both packages (name -> "module:function"), and the two run as
    `python -m` (the eager demo, the recipes)."""
    scripts = {"python -m xlora_export.demo": "xlora_export.demo:main",
               "python -m models.recipes": "models.recipes:main"}
    for pyproject in (os.path.join(ROOT, "pyproject.toml"), os.path.join(ROOT, "runtime", "pyproject.toml")):
        with open(pyproject, encoding="utf-8") as f:
            section = f.read().split("[project.scripts]")[1].split("\n[")[0]
        scripts |= dict(re.findall(r'^([\w-]+) = "([\w.]+:\w+)"', section, re.M))
    return scripts


def test_the_runtime_core_imports_no_command_module_and_nothing_imports_serve():
    """Imports in the runtime go one way: the core (everything but the command modules and serve/) imports no
    command module, and nothing outside serve/ imports serve/ (the server sits on the core, never under it)."""
    serve = os.path.join(RUNTIME, "serve")
    assert {"xlora_runtime.serve.triton", "xlora_runtime.commands"} <= COMMAND_MODULES
    for path in _sources(RUNTIME):
        if path.startswith(serve + os.sep):
            continue
        imported = _runtime_imports(path)
        into_serve = sorted(m for m in imported if m == "xlora_runtime.serve" or m.startswith("xlora_runtime.serve."))
        assert not into_serve, f"{os.path.relpath(path, RUNTIME)} imports {into_serve}"
        if _module_name(path) not in COMMAND_MODULES:
            upward = imported & COMMAND_MODULES
            assert not upward, f"{os.path.relpath(path, RUNTIME)} imports the command module(s) {sorted(upward)}"


def test_the_runtime_imports_no_torch_and_onnx_only_lazily_for_an_extra():
    """No file of the runtime imports torch, transformers or the exporter, at any level; onnx only inside a
    function, and only while an optional extra of the runtime declares it (`triton`: the served graph)."""
    with open(os.path.join(ROOT, "runtime", "pyproject.toml"), encoding="utf-8") as f:
        extras = f.read().split("[project.optional-dependencies]")[1].split("\n[")[0]
    onnx_is_an_extra = re.search(r'"onnx[><=\s"]', extras) is not None
    for path in _sources(RUNTIME):
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            where = f"{os.path.relpath(path, RUNTIME)}:{node.lineno}"
            for name in names:
                top = name.split(".")[0]
                assert top not in EXPORTER_ONLY, f"{where} imports {name}"
                if top == "onnx":
                    assert node not in tree.body and onnx_is_an_extra, (
                        f"{where} imports onnx " + ("at module level" if node in tree.body else
                                                    "but no optional extra of the runtime declares it"))


def test_every_command_runs_on_the_shared_runner():
    """Each command's entry function returns `run(...)` of `xlora_runtime.commands`, imported by its public name:
    one place for one-line errors, exit codes and Ctrl-C; and no file imports a private name of the other
    package."""
    for prog, target in _console_scripts().items():
        module, function = target.split(":")
        path = _module_path(module)
        tree = ast.parse(open(path).read())
        runners = set()  # the local names `xlora_runtime.commands.run` is imported under
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    package = module.rsplit(".", node.level)[0]
                    base = ".".join(filter(None, [package, base]))
                if base == "xlora_runtime.commands":
                    runners |= {a.asname or a.name for a in node.names if a.name == "run"}
        [entry] = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function]
        calls = [n for n in ast.walk(entry) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)]
        assert runners and any(c.func.id in runners for c in calls), f"{prog} ({target}) does not run on commands.run"
    for folder, other in ((PACKAGE, "xlora_runtime"), (RUNTIME, "xlora_export")):
        for path in _sources(folder):
            for node in ast.walk(ast.parse(open(path).read())):
                if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith(other):
                    private = [a.name for a in node.names if a.name.startswith("_")]
                    assert not private, f"{path}:{node.lineno} imports {private} from {node.module}"
