"""`xlora-triton OUT.onnx REPO_DIR`: a Triton Inference Server model repository serving the exported graph.

--backend python: the runtime's continuous-batching engine inside Triton (`python_model.py`)
    REPO_DIR/<name>/1/model.py                 the engine model; generate, generate_stream, gRPC streaming
    REPO_DIR/<name>/1/OUT.onnx (+ companions)  the export as it is
    REPO_DIR/<name>_sequence/1/model.py        conversations by sequence id (sequence batcher), relayed to <name>

--backend onnxruntime | tensorrt: the graph itself, served by Triton's backend of that name
    REPO_DIR/<name>/config.pbtxt       backend onnxruntime (model.onnx) or tensorrt (model.plan, built here)
    REPO_DIR/<name>/1/model.onnx       the served copy of the graph (`graph.py`; + its weights file, unchanged)
    REPO_DIR/<name>/tokenizer.json     for clients (Triton ignores it)

Both KV caches live in Triton as implicit sequence state (`config.py`), so the client sends only new tokens:

    client per step: input_ids (b, s), attention_mask (b, real past + s), position_ids (b, s), top_k [k];
                     sequence_id, sequence_start on the prompt, sequence_end on the last step
"""

from __future__ import annotations

import argparse
import os
import shutil

from ...commands import positive_int, run
from ...engine import polygraphy_loaders, tensorrt_version
from ...errors import XLoraError
from ...format import contract as C
from ...format.graph_file import external_tensors
from ...format.record import GraphInfo
from ...format.sidecar import engine_companions
from ...profiles import limits_for
from .config import conversation_config, engine_config, model_config, served_profiles
from .graph import graph_io, onnx_module, served_graph

__all__ = ["build_parser", "main", "write_repository"]


def _weight_files(onnx_path: str) -> list[str]:
    """The external data files a graph references (relative names), e.g. OUT.onnx.data."""
    return sorted({tensor.location for tensor in external_tensors(onnx_path)})


def write_repository(onnx_path: str, repo_dir: str, name: str = "xlora", backend: str = "onnxruntime",
                     max_sequences: int = 16, gpu: bool = True, engine_limits: dict[str, int | None] | None = None,
                     force: bool = False, provider: str = "cpu", threads: int | None = None) -> list[str]:
    """Write the model repository (see the module docstring).

    Args:
        backend: "onnxruntime", "tensorrt" (the served graph, caches as implicit state) or "python" (the
            runtime's engine in Triton's Python backend: models `name` and `name`_sequence).
        provider, threads: the python backend's execution provider and CPU threads.
        engine_limits: max_batch (also the python backend's rows per step), max_sequence, max_total.
    Returns:
        The files written.
    Raises:
        XLoraError: not an X-LoRA export, the frozen graph given, an existing model folder without `force`,
            no onnx package, tensorrt without a GPU machine with TensorRT (nothing is written then).
    """
    info = GraphInfo.read(onnx_path)
    if info.graph != C.GRAPH_TWO_PASS:
        raise XLoraError(f"{onnx_path}: this is the frozen-scalings graph; give the main graph (OUT.onnx)")
    if backend == "tensorrt" and not gpu:
        raise XLoraError("--backend tensorrt runs on a GPU: drop --cpu")
    folders = [os.path.join(repo_dir, name)] + ([os.path.join(repo_dir, f"{name}_sequence")]
                                               if backend == "python" else [])
    for folder in folders:
        if os.path.exists(folder) and not force:
            raise XLoraError(f"{folder} already exists (use --force to overwrite)")
    if not os.path.isdir(repo_dir):
        raise XLoraError(f"{repo_dir}: not a folder (create the repository folder first)")
    if backend != "python":
        onnx_module()  # not installed: one line, before anything is written
    if backend == "tensorrt":
        tensorrt_version()  # no TensorRT or no GPU: one line, before anything is written
    for folder in folders:
        if os.path.exists(folder):
            shutil.rmtree(folder)
    if backend == "python":
        written = _python_models(onnx_path, folders, (engine_limits or {}).get("max_batch"), max_sequences,
                                 provider, threads)
    else:
        written = _served_model(onnx_path, info, folders[0], backend, max_sequences, gpu, engine_limits)
    tokenizer = C.tokenizer_path(onnx_path)
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(folders[0], "tokenizer.json"))
        written.append(os.path.join(folders[0], "tokenizer.json"))
    return written


def _served_model(onnx_path: str, info: GraphInfo, model_dir: str, backend: str, max_sequences: int, gpu: bool,
                  engine_limits: dict[str, int | None] | None) -> list[str]:
    """The onnxruntime or tensorrt model: the served graph (or its engine) and its config."""
    name = os.path.basename(model_dir)
    version_dir = os.path.join(model_dir, "1")
    os.makedirs(version_dir)
    served = os.path.join(version_dir, "model.onnx")
    served_graph(onnx_path, served)
    written = [served]
    for data in _weight_files(onnx_path):
        shutil.copyfile(os.path.join(os.path.dirname(os.path.abspath(onnx_path)), data),
                        os.path.join(version_dir, data))
        written.append(os.path.join(version_dir, data))
    inputs, outputs = graph_io(served)
    if backend == "tensorrt":
        plan = os.path.join(version_dir, "model.plan")
        profiles = served_profiles(info, limits_for(info, **(engine_limits or {})))
        polygraphy_loaders(served, plan, profiles, engine_companions(plan)["timing_cache"])()
        for path in written:
            os.remove(path)
        written = [plan]
    config = os.path.join(model_dir, "config.pbtxt")
    with open(config, "w", encoding="utf-8") as f:
        f.write(model_config(info, inputs, outputs, name, backend, max_sequences, gpu))
    return [*written, config]


_MODEL_PY = "from xlora_runtime.serve.triton.python_model import {cls} as TritonPythonModel  # noqa: F401\n"


def _python_models(onnx_path: str, folders: list[str], max_batch: int | None, max_sequences: int, provider: str,
                   threads: int | None) -> list[str]:
    """The engine model (the export as it is, under its own names) and the conversation model that relays to it;
    each model.py imports its class from the runtime installed in the server's Python."""
    from .python_model import ENGINE_INPUTS, ENGINE_OUTPUTS, SESSION_INPUTS

    engine_dir, sequence_dir = folders
    written = []
    version_dir = os.path.join(engine_dir, "1")
    os.makedirs(version_dir)
    source = os.path.dirname(os.path.abspath(onnx_path))
    graphs = [onnx_path] + ([C.frozen_path(onnx_path)] if os.path.isfile(C.frozen_path(onnx_path)) else [])
    files = {os.path.basename(p) for p in graphs} | {f for p in graphs for f in _weight_files(p)}
    files |= {os.path.basename(p) for p in (C.tokenizer_path(onnx_path), C.chat_template_path(onnx_path))
              if os.path.isfile(p)}
    for file in sorted(files):
        shutil.copyfile(os.path.join(source, file), os.path.join(version_dir, file))
        written.append(os.path.join(version_dir, file))
    parameters = {"graph": os.path.basename(onnx_path), "provider": provider, "max_batch": str(max_batch or 16)}
    if threads is not None:
        parameters["threads"] = str(threads)
    relayed = {k: v for k, v in ENGINE_INPUTS.items() if k not in SESSION_INPUTS}
    configs = {engine_dir: engine_config(os.path.basename(engine_dir), ENGINE_INPUTS, ENGINE_OUTPUTS, parameters),
               sequence_dir: conversation_config(os.path.basename(sequence_dir), os.path.basename(engine_dir),
                                                 relayed, ENGINE_OUTPUTS, max_sequences, 600)}
    for folder, cls in ((engine_dir, "EngineModel"), (sequence_dir, "ConversationModel")):
        os.makedirs(os.path.join(folder, "1"), exist_ok=True)
        for path, text in ((os.path.join(folder, "1", "model.py"), _MODEL_PY.format(cls=cls)),
                           (os.path.join(folder, "config.pbtxt"), configs[folder])):
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    """The options of `xlora-triton`, grouped by concern."""
    parser = argparse.ArgumentParser(
        prog="xlora-triton", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Write a Triton Inference Server model repository serving a graph exported by xlora-export:\n"
                    "both KV caches as implicit sequence state, so a client sends only the new tokens.\n"
                    "Serve it with: tritonserver --model-repository REPO_DIR")
    parser.add_argument("graph", metavar="OUT.onnx", help="main graph written by xlora-export")
    parser.add_argument("repo", metavar="REPO_DIR", help="model repository folder (must exist)")
    model = parser.add_argument_group("model")
    model.add_argument("--name", default="xlora", help="model name in the repository (default xlora)")
    model.add_argument("--backend", choices=["onnxruntime", "tensorrt", "python"], default="onnxruntime",
                       help="Triton backend; tensorrt builds model.plan here (needs TensorRT and the serving GPU); "
                            "python runs the runtime's engine in Triton (models NAME and NAME_sequence)")
    model.add_argument("--max-sequences", type=positive_int, default=16, metavar="N",
                       help="sequences interleaved per instance (sequence batcher, oldest strategy; default 16)")
    model.add_argument("--cpu", action="store_true", help="instances on the CPU (onnxruntime only; default GPU)")
    python = parser.add_argument_group("python backend (the runtime in the server's Python)")
    python.add_argument("--provider", choices=["cpu", "cuda", "tensorrt"], default="cpu",
                        help="the engine's ONNX Runtime execution provider (default cpu)")
    python.add_argument("--threads", type=positive_int, metavar="N", help="the engine's CPU threads")
    trt = parser.add_argument_group("tensorrt backend (engine profiles, as xlora-engine; --max-batch: also the "
                                    "python backend's rows per step)")
    for flag in ("max-batch", "max-sequence", "max-total"):
        trt.add_argument(f"--{flag}", type=positive_int, metavar="N")
    parser.add_argument("--force", action="store_true", help="replace an existing model folder")
    return parser


def _command(args: argparse.Namespace) -> int:
    limits = {"max_batch": args.max_batch, "max_sequence": args.max_sequence, "max_total": args.max_total}
    written = write_repository(args.graph, args.repo, args.name, args.backend, args.max_sequences, not args.cpu,
                               limits, args.force, args.provider, args.threads)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`xlora-triton`; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-triton", build_parser, _command, argv)
