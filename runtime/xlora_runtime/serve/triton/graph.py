"""The served copy of the main graph (Triton's onnxruntime and tensorrt backends) and the dims Triton's config
takes from it.

Triton feeds what the exported graph cannot take as it is:
    top_k    [1] int64 instead of a scalar (Triton has no rank-0 inputs), squeezed to the scalar the graph uses
    START    [1] int32, the sequence batcher's CONTROL_SEQUENCE_START. On a sequence's first request Triton fills
             every state with each variable dimension 1: one position of one row, uninitialized.
The copy never gives those positions a length of zero (that would make START drive a shape, and TensorRT would
then need START as a shape tensor): every state holds one dead position in front of the real ones, always.
    pasts    Where(START, 0, past) broadcast to the request's rows (Expand to input_ids' batch): the dead
             position is zeros on the first request, whatever Triton's uninitialized memory held
    mask     Concat(zeros(rows, 1), attention_mask): the client's mask covers its real positions only; the
             dead one is masked in every step
So a state's length is 1 + the real positions, the presents keep the dead position in front, and no shape of
the copy depends on START (tests/test_triton.py walks the graph to prove it).

The pasts get their own dimension names (`state_batch`, `state_sequence`) and the mask `mask_sequence`: the first
request's states have one row while the request has several, and TensorRT takes equal names for equal sizes.
"""

from __future__ import annotations

from typing import Any

from ...errors import XLoraError
from ...format import contract as C

__all__ = ["START", "STATE_BATCH", "STATE_SEQUENCE", "MASK_SEQUENCE", "graph_io", "onnx_module", "served_graph"]

START = "START"  # the sequence batcher's CONTROL_SEQUENCE_START input of the served graph
STATE_BATCH, STATE_SEQUENCE, MASK_SEQUENCE = "state_batch", "state_sequence", "mask_sequence"


def onnx_module() -> Any:
    """The onnx package (the runtime's `triton` extra), or a one-line error naming the extra."""
    try:
        import onnx
    except ImportError:
        raise XLoraError('xlora-triton writes the served graph with the onnx package: pip install '
                         '"xlora-runtime[triton]"') from None
    return onnx


def graph_io(path: str) -> tuple[dict[str, tuple[int, list[int]]], dict[str, tuple[int, list[int]]]]:
    """(inputs, outputs) of a graph file: name -> (ONNX element type, dims with -1 for every named or unknown
    dimension), in graph order. Triton's config takes its dims from here, never typed again."""
    onnx = onnx_module()
    graph = onnx.load(path, load_external_data=False).graph

    def table(values: Any) -> dict[str, tuple[int, list[int]]]:
        return {v.name: (v.type.tensor_type.elem_type,
                         [d.dim_value if d.HasField("dim_value") else -1 for d in v.type.tensor_type.shape.dim])
                for v in values}

    return table(graph.input), table(graph.output)


def _rename_dims(value: Any, names: dict[int, str]) -> None:
    """Give a graph input's dimensions at these axes these names."""
    for axis, name in names.items():
        dim = value.type.tensor_type.shape.dim[axis]
        dim.Clear()
        dim.dim_param = name


def served_graph(onnx_path: str, out_path: str) -> None:
    """Write the served copy of the main graph (see the module docstring); the weights stay in the original
    external data file, whose name the copy keeps referencing.

    Raises:
        XLoraError: the onnx package, which writes the copy, is not installed (the `triton` extra).
    """
    import numpy as np

    onnx = onnx_module()
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(onnx_path, load_external_data=False)
    graph = model.graph
    n = len([i for i in graph.input if i.name.startswith("past_key_values.")]) // 2
    pasts = C.past_names(n) + C.past_names(n, scaling=True)
    inputs = {i.name: i for i in graph.input}
    state_type = inputs[pasts[0]].type.tensor_type.elem_type
    renamed = {name: f"{name}/kept" for name in pasts}
    renamed[C.TOP_K] = "top_k/scalar"
    renamed[C.ATTENTION_MASK] = "attention_mask/with_dead"
    for node in graph.node:
        node.input[:] = [renamed.get(x, x) for x in node.input]
    inputs[C.TOP_K].type.tensor_type.shape.dim.add().dim_value = 1
    for name in pasts:
        _rename_dims(inputs[name], {0: STATE_BATCH, 2: STATE_SEQUENCE})
    _rename_dims(inputs[C.ATTENTION_MASK], {1: MASK_SEQUENCE})
    graph.input.append(helper.make_tensor_value_info(START, TensorProto.INT32, [1]))
    zero_state = helper.make_tensor("served/zero_state", state_type, [], [0])  # the caches' type, bf16 included
    graph.initializer.extend([
        zero_state, *(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in
                      {"served/zero": [0], "served/one": [1], "served/dead": [[0]]}.items())])
    nodes = [helper.make_node("Squeeze", [C.TOP_K, "served/zero"], ["top_k/scalar"], name="served/top_k"),
             helper.make_node("Cast", [START], ["served/start"], to=TensorProto.BOOL, name="served/start"),
             helper.make_node("Shape", [C.INPUT_IDS], ["served/ids_shape"], name="served/ids_shape"),
             helper.make_node("Slice", ["served/ids_shape", "served/zero", "served/one"], ["served/rows"],
                              name="served/rows"),
             helper.make_node("Concat", ["served/rows", "served/one", "served/one", "served/one"],
                              ["served/rows_shape"], axis=0, name="served/rows_shape"),
             helper.make_node("Concat", ["served/rows", "served/one"], ["served/dead_shape"], axis=0,
                              name="served/dead_shape"),
             helper.make_node("Expand", ["served/dead", "served/dead_shape"], ["served/dead_mask"],
                              name="served/dead_mask"),
             helper.make_node("Concat", ["served/dead_mask", C.ATTENTION_MASK], ["attention_mask/with_dead"], axis=1,
                              name="served/mask")]
    for name in pasts:  # zeros on a first request, broadcast to the request's rows
        nodes += [helper.make_node("Where", ["served/start", "served/zero_state", name], [f"{name}/masked"],
                                   name=f"served/{name}/where"),
                  helper.make_node("Expand", [f"{name}/masked", "served/rows_shape"], [renamed[name]],
                                   name=f"served/{name}/expand")]
    rest = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + rest)
    onnx.save(model, out_path)
