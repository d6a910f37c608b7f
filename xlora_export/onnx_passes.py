"""Rewrites of the traced ONNX graph that the trace cannot express (no math changes).

`store_tied_embedding_once`: with tied embeddings the trace keeps the embedding E (V, H) for the
lookup and constant folding adds E^T (H, V) for lm_head's MatMul: the largest tensor stored twice.
The lookup is rewritten to read E^T, so only E^T remains:

    Gather(E, ids)  (b, s, H)     ->     Transpose(Gather(E^T, ids, axis=1), perm=[1, 2, 0])
                                          (H, b, s) -> (b, s, H)
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["store_tied_embedding_once"]


def store_tied_embedding_once(proto: onnx.ModelProto) -> int:
    """Make every Gather whose table has a stored transpose read that transpose instead; drop the table.

    Returns:
        The number of bytes no longer stored.
    """
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    by_shape: dict[tuple[int, ...], list[onnx.TensorProto]] = {}
    for init in graph.initializer:
        if len(init.dims) == 2 and init.raw_data:
            by_shape.setdefault(tuple(init.dims), []).append(init)
    saved, nodes = 0, []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        transposed = _stored_transpose(table, by_shape) if table is not None and axis == 0 else None
        if transposed is None:
            nodes.append(node)
            continue
        gathered = f"{node.output[0]}/from_transpose"
        nodes.append(helper.make_node("Gather", [transposed.name, node.input[1]], [gathered], axis=1,
                                      name=f"{node.name or node.output[0]}/tied_gather"))
        nodes.append(helper.make_node("Transpose", [gathered], list(node.output), perm=[1, 2, 0],
                                      name=f"{node.name or node.output[0]}/tied_transpose"))
    if len(nodes) == len(graph.node):
        return 0
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    for init in list(graph.initializer):
        if init.name not in used:
            saved += len(init.raw_data)
            graph.initializer.remove(init)
    return saved


def _stored_transpose(table: onnx.TensorProto,
                      by_shape: dict[tuple[int, ...], list[onnx.TensorProto]]) -> onnx.TensorProto | None:
    """The initializer holding exactly `table`^T, if any."""
    if len(table.dims) != 2 or not table.raw_data:
        return None
    candidates = by_shape.get((table.dims[1], table.dims[0]), [])
    if not candidates:
        return None
    expected = np.ascontiguousarray(numpy_helper.to_array(table).T).tobytes()
    return next((c for c in candidates if c.raw_data == expected), None)
