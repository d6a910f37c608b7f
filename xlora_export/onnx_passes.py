"""Rewrites of the traced ONNX graph: the weights, attached by reference, and small constants folded.

The exporter traces with the weights as graph inputs and without constant folding
(`export_params=False, do_constant_folding=False`): the TorchScript exporter's shape inference
serialises every constant it holds, which took 130 of 180 s and 1.65x the weights in memory on
a 1.1B model. The weights are attached here, one tensor at a time, and the small constant
subgraphs are folded with ONNX's reference evaluator:

    input W -> Transpose([1, 0]) -> MatMul      becomes   initializer W.T -> MatMul      (stored transposed)
    input E -> Gather(ids) ; E -> Transpose     becomes   Transpose(Gather(E.T, ids, axis=1), [1, 2, 0])
             (tied embedding: lookup and lm_head)           and E.T alone is stored
    input P -> anything else                    becomes   initializer P

`fp16_weights_per_use` writes, for the exporter's own validation only, a variant of an fp16 graph in which
every use of a weight reads it through its own Identity (see there).

`WeightStore` writes the tensors either inline or into one external-data file that several
graphs (the main and the frozen graph) reference with the same offsets: the weights are on disk once.
"""

from __future__ import annotations

import os
from collections import defaultdict

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

__all__ = ["WeightStore", "attach_weights", "fold_constants", "fp16_weights_per_use"]

_ONNX_DTYPES = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
                torch.bfloat16: TensorProto.BFLOAT16, torch.int64: TensorProto.INT64, torch.int32: TensorProto.INT32,
                torch.bool: TensorProto.BOOL}
_ALIGN = 4096  # external tensors start on a page boundary (lets ONNX Runtime map them instead of copying)


class WeightStore:
    """Initializers for the weights: raw bytes inline, or references into one shared external-data file.

    Args:
        data_path: the external-data file to write (None: weights inline in each graph).
    """

    def __init__(self, data_path: str | None) -> None:
        self.data_path = data_path
        self._offsets: dict[str, tuple[int, int]] = {}  # name -> (offset, length) in the data file
        self._file = open(data_path, "wb") if data_path else None  # noqa: SIM115 - closed by close()

    def tensor(self, name: str, value: torch.Tensor) -> TensorProto:
        """The initializer `name` holding `value` (written once per name; later calls reuse the bytes)."""
        value = value.detach().cpu().contiguous()
        proto = TensorProto(name=name, data_type=_ONNX_DTYPES[value.dtype], dims=list(value.shape))
        raw = value.view(torch.uint8).numpy() if value.numel() else np.zeros(0, np.uint8)
        if self._file is None:
            proto.raw_data = raw.tobytes()
            return proto
        if name not in self._offsets:
            offset = -(-self._file.tell() // _ALIGN) * _ALIGN
            self._file.seek(offset)
            self._file.write(memoryview(raw.reshape(-1)))
            self._offsets[name] = (offset, raw.size)
        offset, length = self._offsets[name]
        proto.data_location = TensorProto.EXTERNAL
        for key, v in (("location", os.path.basename(self.data_path)), ("offset", str(offset)),
                       ("length", str(length))):
            entry = proto.external_data.add()
            entry.key, entry.value = key, v
        return proto

    def close(self) -> None:
        """Flush and close the data file."""
        if self._file is not None:
            self._file.close()
            self._file = None


def attach_weights(proto: onnx.ModelProto, weights: dict[str, torch.Tensor], store: WeightStore,
                   rename: dict[str, str] | None = None) -> None:
    """Turn the graph inputs named in `weights` into initializers (see the module docstring).

    Args:
        proto: a graph traced with `export_params=False`; its weight inputs carry the parameters' names.
        weights: input name -> tensor.
        store: where the bytes go.
        rename: input name -> initializer name (default: the input name); `.T` is appended when stored transposed.
    """
    graph = proto.graph
    rename = rename or {}
    consumers: dict[str, list[int]] = defaultdict(list)  # input name -> indices of the nodes reading it
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers[name].append(index)
    replaced: dict[str, str] = {}  # a Transpose's output (or a weight input) -> the initializer it becomes
    drop: set[int] = set()  # Transpose nodes folded into the initializers
    gathers: dict[int, str] = {}  # Gather(E, ids) nodes -> the transposed table they read instead
    initializers = []
    for name, value in weights.items():
        users = consumers.get(name, [])
        if not users:
            continue
        stored = rename.get(name, name)
        transposes = [i for i in users if graph.node[i].op_type == "Transpose" and value.dim() == 2
                      and _perm(graph.node[i]) == [1, 0]]
        lookups = [i for i in users if graph.node[i].op_type == "Gather" and graph.node[i].input[0] == name
                   and _axis(graph.node[i]) == 0]
        if transposes and len(transposes) + len(lookups) == len(users):
            initializers.append(store.tensor(f"{stored}.T", value.t()))
            for i in transposes:
                replaced[graph.node[i].output[0]] = f"{stored}.T"
                drop.add(i)
            for i in lookups:
                gathers[i] = f"{stored}.T"
        else:
            initializers.append(store.tensor(stored, value))
            replaced[name] = stored
    nodes = []
    for index, node in enumerate(graph.node):
        if index in drop:
            continue
        node = onnx.NodeProto.FromString(node.SerializeToString())
        for i, name in enumerate(node.input):
            node.input[i] = replaced.get(name, name)
        if index in gathers:  # (H, V) table: gather columns, then (H, b, s) -> (b, s, H)
            picked = f"{node.output[0]}/columns"
            nodes.append(helper.make_node("Gather", [gathers[index], node.input[1]], [picked], axis=1,
                                          name=f"{node.name or node.output[0]}/tied"))
            nodes.append(helper.make_node("Transpose", [picked], list(node.output), perm=[1, 2, 0],
                                          name=f"{node.name or node.output[0]}/tied_transpose"))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [i for i in graph.input if i.name not in weights]
    del graph.input[:]
    graph.input.extend(kept)
    graph.initializer.extend(initializers)


def fold_constants(proto: onnx.ModelProto) -> int:
    """Evaluate every node whose inputs are all constants (Constant nodes, initializers) once, at export.

    Graph inputs (and so the weights, attached after this pass) are never folded. Returns the number of
    nodes removed.
    """
    graph = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 17)
    known = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    kept = []
    for node in (onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node):
        if node.domain not in ("", "ai.onnx") or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                                     for a in node.attribute):
            kept.append(node)
            continue
        if all(not name or name in known for name in node.input):
            outputs = _evaluate(node, known, opset)
            if outputs is not None:
                known.update(zip(node.output, outputs))
                continue
        kept.append(node)
    used = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    existing = {init.name for init in graph.initializer}
    folded = [numpy_helper.from_array(np.asarray(value), name) for name, value in known.items()
              if name in used and name not in existing]
    removed = len(graph.node) - len(kept)
    del graph.node[:]
    graph.node.extend(kept)
    graph.initializer.extend(folded)
    return removed


def _evaluate(node: onnx.NodeProto, known: dict[str, np.ndarray], opset: int) -> list[np.ndarray] | None:
    """The node's outputs on constant inputs, or None if the reference evaluator cannot run it."""
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(known[n].dtype), known[n].shape)
              for n in node.input if n]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in node.output]
    model = helper.make_model(helper.make_graph([node], "fold", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    try:
        return ReferenceEvaluator(model).run(None, {n: known[n] for n in node.input if n})
    except Exception:  # noqa: BLE001 - an op the evaluator lacks stays in the graph, unfolded
        return None


def _perm(node: onnx.NodeProto) -> list[int] | None:
    return next((list(a.ints) for a in node.attribute if a.name == "perm"), None)


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def fp16_weights_per_use(src: str, dst: str) -> int:
    """Write `dst`: the graph `src` with every use of an fp16 initializer going through its own Identity.

    The same computation (Identity is exact), for validating fp16 graphs on ONNX Runtime's CPU provider
    within memory: that provider has no fp16 MatMul on x86 and casts fp16 inputs to fp32, one Cast per
    tensor shared by all its consumers. Every base weight is read by both passes, so each weight's fp32
    copy would live from the scaling pass to the real pass: all of them at once, 2x the fp16 weights on top
    of the weights (measured 3.1x the weights on a 1.1B model). Through one Identity per use, each copy is
    freed after its one MatMul (with `ExecutionOrder.PRIORITY_BASED`: 1.14x). `dst` must sit beside `src`:
    the external-data references are relative and stay as they are.

    Returns:
        The number of uses rerouted.
    """
    proto = onnx.load(src, load_external_data=False)
    graph = proto.graph
    fp16 = {t.name for t in graph.initializer if t.data_type == TensorProto.FLOAT16}
    nodes, uses = [], 0
    for node in graph.node:
        for j, name in enumerate(node.input):
            if name in fp16:
                uses += 1
                nodes.append(helper.make_node("Identity", [name], [f"{name}/use{uses}"], name=f"fp16_use{uses}"))
                node.input[j] = f"{name}/use{uses}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save_model(proto, dst)
    return uses
