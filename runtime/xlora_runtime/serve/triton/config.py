"""config.pbtxt of the onnxruntime and tensorrt repositories (text format of Triton's ModelConfig), and the
TensorRT profiles of the served graph.

Both KV caches live in Triton as implicit sequence state: one `sequence_batching.state` entry per past/present
pair, in the graph contract's order (layer by layer, key then value, the real cache then the scaling cache).
Triton pairs a state's output with its input by their indexes in two name-sorted maps
(triton-inference-server/server#8586); `check_state_pairs` proves that pairing is the configured one for this
graph's names, and refuses names for which it is not. Every dims entry is the served graph's own (`graph_io`):
Triton's onnxruntime backend compares them exactly, so `logits` is `[-1, 1, V]` for a last-position export.

With `max_batch_size: 0` each execution is one request (one sequence, whose rows advance together); the `oldest`
strategy interleaves up to `max_sequences` sequences per instance. READY and CORRID controls are not model
inputs: with one sequence per execution it is always ready, and Triton keys the implicit state by correlation ID.

Engine profiles of the served graph (tensorrt backend; state = the dead position + the real ones, see graph.py):
    profile   batch       sequence    mask_sequence    state_batch    state_sequence
    first     1..B        1..S        1..S             1              1              (Triton's first-request state)
    decode    1..B        1           2..T             1..B (=batch)  2..T
"""

from __future__ import annotations

from ...errors import XLoraError
from ...format import contract as C
from ...format.record import GraphInfo
from ...format.sidecar import Shapes
from ...profiles import ProfileLimits, input_dims, profile_shapes
from .graph import MASK_SEQUENCE, START, STATE_BATCH, STATE_SEQUENCE

__all__ = ["check_state_pairs", "conversation_config", "engine_config", "model_config", "served_profiles"]

# ONNX element type -> Triton data type
TRITON_TYPES = {1: "TYPE_FP32", 10: "TYPE_FP16", 16: "TYPE_BF16", 7: "TYPE_INT64", 6: "TYPE_INT32", 9: "TYPE_BOOL"}

IO = dict[str, tuple[int, list[int]]]  # name -> (ONNX element type, dims), as `graph.graph_io` reads them


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


def _dims(shape: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _type(name: str, elem_type: int) -> str:
    if elem_type not in TRITON_TYPES:
        raise XLoraError(f"served graph tensor {name}: ONNX element type {elem_type} has no Triton type here "
                         f"(expected one of {sorted(TRITON_TYPES)})")
    return TRITON_TYPES[elem_type]


def model_config(info: GraphInfo, inputs: IO, outputs: IO, name: str, backend: str, max_sequences: int = 16,
                 gpu: bool = True, idle_seconds: int = 60) -> str:
    """config.pbtxt of the served main graph.

    Args:
        info: the export's metadata record (layer count).
        inputs, outputs: the served graph's own (`graph.graph_io`): every dims entry is copied from them.
        backend: "onnxruntime" or "tensorrt" (which then needs gpu and uses both engine profiles).
    """
    n = info.num_layers
    pasts, presents = C.past_names(n) + C.past_names(n, True), C.present_names(n) + C.present_names(n, True)
    pairs = list(zip(pasts, presents))
    check_state_pairs(pairs)
    model_inputs = [(i, *inputs[i]) for i in inputs if i not in pasts and i != START]
    model_outputs = [(o, *outputs[o]) for o in outputs if o not in presents]
    lines = [f'name: "{name}"',
             'platform: "tensorrt_plan"' if backend == "tensorrt" else 'backend: "onnxruntime"',
             "max_batch_size: 0"]
    for kind, tensors in (("input", model_inputs), ("output", model_outputs)):
        lines.append(f"{kind} [")
        lines.append(",\n".join(f'  {{ name: "{t}" data_type: {_type(t, e)} dims: {_dims(s)} }}'
                                for t, e, s in tensors))
        lines.append("]")
    lines += ["sequence_batching {", f"  max_sequence_idle_microseconds: {idle_seconds * 1_000_000}",
              f"  oldest {{ max_candidate_sequences: {max_sequences} }}",
              f'  control_input [ {{ name: "{START}" control [ {{ kind: CONTROL_SEQUENCE_START '
              f"int32_false_true: [ 0, 1 ] }} ] }} ]",
              "  state ["]
    lines.append(",\n".join(f'    {{ input_name: "{i}" output_name: "{o}" data_type: {_type(i, inputs[i][0])} '
                            f"dims: {_dims(inputs[i][1])} }}" for i, o in pairs))
    lines += ["  ]", "}"]
    profiles = ' profile: [ "0", "1" ]' if backend == "tensorrt" else ""
    lines.append(f"instance_group [ {{ kind: {'KIND_GPU' if gpu else 'KIND_CPU'} count: 1{profiles} }} ]")
    return "\n".join(lines) + "\n"


def served_profiles(info: GraphInfo, limits: ProfileLimits) -> list[Shapes]:
    """The served graph's engine profiles, [first request, decode] (see the module's table)."""
    dims = input_dims(info)
    n = info.num_layers
    for name in C.past_names(n) + C.past_names(n, True):
        _, heads, _, head_dim = dims[name]
        dims[name] = (STATE_BATCH, heads, STATE_SEQUENCE, head_dim)
    dims[C.ATTENTION_MASK] = (C.BATCH, MASK_SEQUENCE)
    dims[C.TOP_K] = (1,)
    dims[START] = (1,)
    b = (1, limits.opt_batch, limits.max_batch)
    s = (1, limits.opt_sequence, limits.max_sequence)
    t = (2, limits.opt_total, limits.max_total)
    first = {C.BATCH: b, C.SEQUENCE: s, MASK_SEQUENCE: s, STATE_BATCH: (1, 1, 1), STATE_SEQUENCE: (1, 1, 1)}
    decode = {C.BATCH: b, C.SEQUENCE: (1, 1, 1), MASK_SEQUENCE: t, STATE_BATCH: b, STATE_SEQUENCE: t}
    return [profile_shapes(dims, first), profile_shapes(dims, decode)]


def _tensors(kind: str, tensors: dict[str, tuple[str, list[int]]], optional: bool) -> list[str]:
    flag = " optional: true" if optional else ""
    return [f"{kind} [", ",\n".join(f'  {{ name: "{t}" data_type: {d} dims: {_dims(s)}{flag} }}'
                                    for t, (d, s) in tensors.items()), "]"]


def _parameters(values: dict[str, str]) -> list[str]:
    entries = (f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in values.items())
    return ["parameters [", ",\n".join(entries), "]"]


def engine_config(name: str, inputs: dict[str, tuple[str, list[int]]], outputs: dict[str, tuple[str, list[int]]],
                  parameters: dict[str, str]) -> str:
    """config.pbtxt of the python-backend engine model (`python_model.EngineModel`): decoupled, every input
    optional, no sequence batcher (so Triton's generate endpoints, which carry no sequence id, reach it)."""
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }",
             *_tensors("input", inputs, True), *_tensors("output", outputs, False),
             "instance_group [ { kind: KIND_CPU count: 1 } ]", *_parameters(parameters)]
    return "\n".join(lines) + "\n"


def conversation_config(name: str, engine: str, inputs: dict[str, tuple[str, list[int]]],
                        outputs: dict[str, tuple[str, list[int]]], max_sequences: int, idle_seconds: int) -> str:
    """config.pbtxt of the python-backend conversation model (`python_model.ConversationModel`): a sequence
    batcher (`oldest`, so sequences do not hold an instance between their requests) whose START and END controls
    the model relays to `engine`."""
    controls = ", ".join(f'{{ name: "{n}" control [ {{ kind: CONTROL_SEQUENCE_{n} int32_false_true: [ 0, 1 ] }} ] }}'
                         for n in ("START", "END"))
    lines = [f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
             "model_transaction_policy { decoupled: true }",
             *_tensors("input", inputs, True), *_tensors("output", outputs, False),
             "sequence_batching {", f"  max_sequence_idle_microseconds: {idle_seconds * 1_000_000}",
             f"  oldest {{ max_candidate_sequences: {max_sequences} }}", f"  control_input [ {controls} ]", "}",
             "instance_group [ { kind: KIND_CPU count: 1 } ]", *_parameters({"engine": engine})]
    return "\n".join(lines) + "\n"
