"""`xlora-triton OUT.onnx REPO_DIR`: a Triton Inference Server model repository serving the exported graph.

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
from .config import model_config, served_profiles
from .graph import graph_io, onnx_module, served_graph

__all__ = ["build_parser", "main", "write_repository"]


def _weight_files(onnx_path: str) -> list[str]:
    """The external data files a graph references (relative names), e.g. OUT.onnx.data."""
    return sorted({tensor.location for tensor in external_tensors(onnx_path)})


def write_repository(onnx_path: str, repo_dir: str, name: str = "xlora", backend: str = "onnxruntime",
                     max_sequences: int = 16, gpu: bool = True, engine_limits: dict[str, int | None] | None = None,
                     force: bool = False) -> list[str]:
    """Write the model repository (see the module docstring).

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
    model_dir = os.path.join(repo_dir, name)
    if os.path.exists(model_dir) and not force:
        raise XLoraError(f"{model_dir} already exists (use --force to overwrite)")
    if not os.path.isdir(repo_dir):
        raise XLoraError(f"{repo_dir}: not a folder (create the repository folder first)")
    onnx_module()  # not installed: one line, before anything is written
    if backend == "tensorrt":
        tensorrt_version()  # no TensorRT or no GPU: one line, before anything is written
    if os.path.exists(model_dir):
        shutil.rmtree(model_dir)
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
    written.append(config)
    tokenizer = C.tokenizer_path(onnx_path)
    if os.path.isfile(tokenizer):
        shutil.copyfile(tokenizer, os.path.join(model_dir, "tokenizer.json"))
        written.append(os.path.join(model_dir, "tokenizer.json"))
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
    model.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                       help="Triton backend; tensorrt builds model.plan here (needs TensorRT and the serving GPU)")
    model.add_argument("--max-sequences", type=positive_int, default=16, metavar="N",
                       help="sequences interleaved per instance (sequence batcher, oldest strategy; default 16)")
    model.add_argument("--cpu", action="store_true", help="instances on the CPU (onnxruntime only; default GPU)")
    trt = parser.add_argument_group("tensorrt backend (engine profiles, as xlora-engine)")
    for flag in ("max-batch", "max-sequence", "max-total"):
        trt.add_argument(f"--{flag}", type=positive_int, metavar="N")
    parser.add_argument("--force", action="store_true", help="replace an existing model folder")
    return parser


def _command(args: argparse.Namespace) -> int:
    limits = {"max_batch": args.max_batch, "max_sequence": args.max_sequence, "max_total": args.max_total}
    written = write_repository(args.graph, args.repo, args.name, args.backend, args.max_sequences, not args.cpu,
                               limits, args.force)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`xlora-triton`; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-triton", build_parser, _command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
