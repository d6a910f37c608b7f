"""`xlora-triton OUT.onnx REPO_DIR`: a Triton Inference Server model repository serving the exported graph.

    REPO_DIR/<name>/config.pbtxt       backend onnxruntime (model.onnx) or tensorrt (model.plan, built here)
    REPO_DIR/<name>/1/model.onnx       the served copy of the graph (+ its weights file, unchanged)
    REPO_DIR/<name>/tokenizer.json     for clients (Triton ignores it)

Both KV caches live in Triton as implicit sequence state: one `sequence_batching.state` entry per past/present
pair, in the graph contract's order (layer by layer, key then value, the real cache then the scaling cache), so
the client sends only new tokens, the attention mask and positions, and `top_k`. Triton pairs a state's output
with its input by their indexes in two name-sorted maps (triton-inference-server/server#8586);
`check_state_pairs` proves that pairing is the configured one for this graph's names, and refuses names for which
it is not.

The served copy differs from OUT.onnx in two inputs, because of what Triton can feed:
    top_k    [1] int64 instead of a scalar (Triton has no rank-0 inputs), squeezed to the scalar the graph uses
    START    [1] int32, the sequence batcher's CONTROL_SEQUENCE_START: on a sequence's first request Triton
             feeds the state inputs uninitialized with each variable dimension 1; the copy keeps 0 positions of
             them then (Slice to past_len * (1 - START)) and broadcasts the batch (Expand to the request's rows).
With `max_batch_size: 0` each execution is one request (one sequence, whose rows advance together, as in the
runtime's cache groups); the `oldest` strategy interleaves up to `--max-sequences` sequences per instance. READY
and CORRID controls are not model inputs: with one sequence per execution it is always ready, and Triton keys the
implicit state by correlation ID itself.

    client per step: input_ids (b, s), attention_mask (b, past + s), position_ids (b, s), top_k [k];
                     sequence_id, sequence_start on the prompt, sequence_end on the last step
"""

from __future__ import annotations

import argparse
import os
import shutil
from typing import Any

from ..commands import positive_int, run
from ..engine import polygraphy_loaders, tensorrt_version
from ..errors import XLoraError
from ..format import contract as C
from ..format.graph_file import external_tensors
from ..format.record import GraphInfo
from ..format.sidecar import engine_companions
from ..profiles import engine_profiles, limits_for

__all__ = ["START", "build_parser", "check_state_pairs", "main", "model_config", "served_graph", "write_repository"]

START = "START"  # the sequence batcher's CONTROL_SEQUENCE_START input of the served graph
_TRITON_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16"}


def check_state_pairs(pairs: list[tuple[str, str]]) -> None:
    """Raise unless pairing each state output with the input at its index in the name-sorted order (what Triton
    does, triton-inference-server/server#8586) gives back the configured pairs.

    Raises:
        XLoraError: the names sort differently, so Triton would swap states.
    """
    inputs = sorted(i for i, _ in pairs)
    outputs = sorted(o for _, o in pairs)
    for input_name, output_name in pairs:
        paired = inputs[outputs.index(output_name)]
        if paired != input_name:
            raise XLoraError(f"state {output_name} would be fed back as {paired} instead of {input_name}: Triton pairs "
                             f"states by their name-sorted positions (triton-inference-server/server#8586)")


def _dims(shape: list[Any]) -> str:
    return "[ " + ", ".join(str(d) if isinstance(d, int) else "-1" for d in shape) + " ]"


def model_config(info: GraphInfo, name: str, backend: str, max_sequences: int = 16,
                 gpu: bool = True, idle_seconds: int = 60) -> str:
    """config.pbtxt of the served main graph (text format of Triton's ModelConfig).

    Args:
        backend: "onnxruntime" or "tensorrt" (which then needs gpu and uses both engine profiles).
    """
    n, kv = info.num_layers, info.caches["real"].shape
    state_type = _TRITON_TYPES[info.cache_dtype]
    inputs = [(C.INPUT_IDS, "TYPE_INT64", [-1, -1]), (C.ATTENTION_MASK, "TYPE_INT64", [-1, -1]),
              (C.POSITION_IDS, "TYPE_INT64", [-1, -1]), (C.TOP_K, "TYPE_INT64", [1])]
    outputs = [(C.LOGITS, state_type, [-1, -1, info.vocab_size]),
               (C.SCALINGS, state_type, [-1, -1, info.n_modules, info.n_experts])]
    pairs = list(zip(C.past_names(n) + C.past_names(n, True), C.present_names(n) + C.present_names(n, True)))
    check_state_pairs(pairs)
    lines = [f'name: "{name}"',
             'platform: "tensorrt_plan"' if backend == "tensorrt" else 'backend: "onnxruntime"',
             "max_batch_size: 0"]
    for kind, tensors in (("input", inputs), ("output", outputs)):
        lines.append(f"{kind} [")
        lines.append(",\n".join(f'  {{ name: "{t}" data_type: {d} dims: {_dims(s)} }}' for t, d, s in tensors))
        lines.append("]")
    lines += ["sequence_batching {", f"  max_sequence_idle_microseconds: {idle_seconds * 1_000_000}",
              f"  oldest {{ max_candidate_sequences: {max_sequences} }}",
              f'  control_input [ {{ name: "{START}" control [ {{ kind: CONTROL_SEQUENCE_START '
              f"int32_false_true: [ 0, 1 ] }} ] }} ]",
              "  state ["]
    lines.append(",\n".join(f'    {{ input_name: "{i}" output_name: "{o}" data_type: {state_type} dims: '
                            f"{_dims(kv)} }}" for i, o in pairs))
    lines += ["  ]", "}"]
    profiles = ' profile: [ "0", "1" ]' if backend == "tensorrt" else ""
    lines.append(f"instance_group [ {{ kind: {'KIND_GPU' if gpu else 'KIND_CPU'} count: 1{profiles} }} ]")
    return "\n".join(lines) + "\n"


def served_graph(onnx_path: str, out_path: str) -> None:
    """Write the served copy of the main graph (see the module docstring): `top_k` [1] and the `START` control
    input; the weights stay in the original external data file, whose name the copy keeps referencing.

    Raises:
        XLoraError: the onnx package, which writes the copy, is not installed (the `triton` extra).
    """
    import numpy as np

    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    n = len([i for i in graph.input if i.name.startswith("past_key_values.")]) // 2
    pasts = C.past_names(n) + C.past_names(n, scaling=True)
    kept = {name: f"{name}/kept" for name in pasts}
    scalar_top_k = "top_k/scalar"
    for node in graph.node:
        node.input[:] = [kept.get(x, scalar_top_k if x == C.TOP_K else x) for x in node.input]
    top_k = next(i for i in graph.input if i.name == C.TOP_K)
    top_k.type.tensor_type.shape.dim.add().dim_value = 1
    graph.input.append(helper.make_tensor_value_info(START, TensorProto.INT32, [1]))
    consts = {"served/zero": [0], "served/one": [1], "served/two": [2], "served/three": [3]}
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items())
    nodes = [helper.make_node("Squeeze", [C.TOP_K, "served/zero"], [scalar_top_k], name="served/top_k"),
             helper.make_node("Cast", [START], ["served/start"], to=TensorProto.INT64, name="served/start_cast"),
             helper.make_node("Sub", ["served/one", "served/start"], ["served/not_start"], name="served/not_start"),
             helper.make_node("Shape", [pasts[0]], ["served/past_shape"], name="served/past_shape"),
             helper.make_node("Slice", ["served/past_shape", "served/two", "served/three"], ["served/past_len"],
                              name="served/past_len"),
             helper.make_node("Mul", ["served/past_len", "served/not_start"], ["served/keep"], name="served/keep"),
             helper.make_node("Shape", [C.INPUT_IDS], ["served/ids_shape"], name="served/ids_shape"),
             helper.make_node("Slice", ["served/ids_shape", "served/zero", "served/one"], ["served/rows"],
                              name="served/rows"),
             helper.make_node("Concat", ["served/rows", "served/one", "served/one", "served/one"],
                              ["served/rows_shape"], axis=0, name="served/rows_shape")]
    for name in pasts:  # past[:, :, :keep] broadcast to the request's rows
        nodes += [helper.make_node("Slice", [name, "served/zero", "served/keep", "served/two"], [f"{name}/sliced"],
                                   name=f"served/{name}/slice"),
                  helper.make_node("Expand", [f"{name}/sliced", "served/rows_shape"], [kept[name]],
                                   name=f"served/{name}/expand")]
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    onnx.save(model, out_path)


def _onnx() -> Any:
    """The onnx package (the runtime's `triton` extra), or a one-line error naming the extra."""
    try:
        import onnx
    except ImportError:
        raise XLoraError('xlora-triton writes the served graph with the onnx package: pip install '
                         '"xlora-runtime[triton]"') from None
    return onnx


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
    _onnx()  # not installed: one line, before anything is written
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
    if backend == "tensorrt":
        plan = os.path.join(version_dir, "model.plan")
        profiles = engine_profiles(info, limits_for(info, **(engine_limits or {})))
        polygraphy_loaders(served, plan, profiles, engine_companions(plan)["timing_cache"])()
        for path in written:
            os.remove(path)
        written = [plan]
    config = os.path.join(model_dir, "config.pbtxt")
    with open(config, "w", encoding="utf-8") as f:
        f.write(model_config(info, name, backend, max_sequences, gpu))
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
