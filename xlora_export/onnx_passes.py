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
    Concat(W_q, W_k, W_v) -> Transpose -> MatMul  becomes  initializer <q_proj+k_proj+v_proj>.T -> MatMul

The last line stands for every weight expression: a subgraph of layout ops (Concat, Transpose, Reshape, ...)
that reads only weights and constants, as the decoder's packed projections trace
(`lora.packed_linears`), is evaluated here, one result at a time, and stored under a name made of its
weights' names, so that the main and the frozen graph share its bytes like any weight's.

`fp16_weights_per_use` writes, for the exporter's own validation only, a variant of an fp16 graph in which
every use of a weight reads it through its own Identity (see there).

`WeightStore` writes the tensors either inline or into one external-data file that several
graphs (the main and the frozen graph) reference with the same offsets: the weights are on disk once.
"""

from __future__ import annotations

import hashlib
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
                torch.bool: TensorProto.BOOL, torch.uint8: TensorProto.UINT8, torch.int8: TensorProto.INT8}
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
    expressions = _weight_expressions(graph, weights)  # output name -> index of a node computing it from weights
    consumers: dict[str, list[int]] = defaultdict(list)  # input name -> indices of the nodes reading it
    for index, node in enumerate(graph.node):
        if node.output[0] in expressions:
            continue  # evaluated below: not a use of the weights it reads
        for name in node.input:
            consumers[name].append(index)
    replaced: dict[str, str] = {}  # a Transpose's output (or a weight input) -> the initializer it becomes
    drop: set[int] = {expressions[name] for name in expressions}  # nodes folded into the initializers
    gathers: dict[int, str] = {}  # Gather(E, ids) nodes -> the transposed table they read instead
    initializers = []
    constants = {init.name: init for init in graph.initializer}
    evaluated: dict[str, str] = {}  # an expression's form -> its initializer (both passes read each one)
    for root in [name for name in expressions if consumers.get(name) or name in {o.name for o in graph.output}]:
        form = _form(root, graph, expressions, constants)
        if form not in evaluated:
            stored, value = _evaluate_expression(root, graph, expressions, weights, constants, rename)
            if stored in evaluated.values():
                raise AssertionError(f"two weight expressions named {stored}")
            initializers.append(store.tensor(stored, value))
            evaluated[form] = stored
            del value
        replaced[root] = evaluated[form]
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
    if expressions:  # the constants that only expressions read (zero blocks, shapes) go with them
        used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
        unused = [init for init in graph.initializer if init.name not in used]
        for init in unused:
            graph.initializer.remove(init)
    graph.initializer.extend(initializers)


_EXPRESSION_OPS = ("Concat", "Transpose", "Identity", "Reshape", "Unsqueeze", "Squeeze")


def _weight_expressions(graph: onnx.GraphProto, weights: dict[str, torch.Tensor]) -> dict[str, int]:
    """The layout nodes that compute from weights and constants only: output name -> node index. A Transpose of
    a weight alone is left to `attach_weights`'s own rules (stored transposed, the tied lookup)."""
    constants = {init.name for init in graph.initializer}
    found: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        inputs = [name for name in node.input if name]
        if node.domain not in ("", "ai.onnx") or node.op_type not in _EXPRESSION_OPS or not inputs:
            continue
        if node.op_type == "Transpose" and inputs[0] in weights:
            continue
        if all(n in weights or n in found or n in constants for n in inputs) and any(
                n in weights or n in found for n in inputs):
            found[node.output[0]] = index
    return found


def _form(name: str, graph: onnx.GraphProto, expressions: dict[str, int], constants: dict[str, TensorProto]) -> str:
    """A weight expression written out (ops, attributes, weights by name, constants by value): equal forms are
    equal values."""
    if name in constants:
        data = numpy_helper.to_array(constants[name])
        return f"const{list(data.shape)}{data.dtype}:{hashlib.sha256(data.tobytes()).hexdigest()}"
    if name not in expressions:
        return name  # a weight
    node = graph.node[expressions[name]]
    attributes = ",".join(f"{a.name}={helper.get_attribute_value(a)}" for a in node.attribute)
    inputs = ",".join(_form(n, graph, expressions, constants) for n in node.input if n)
    return f"{node.op_type}[{attributes}]({inputs})"


def _evaluate_expression(root: str, graph: onnx.GraphProto, expressions: dict[str, int],
                         weights: dict[str, torch.Tensor], constants: dict[str, TensorProto],
                         rename: dict[str, str]) -> tuple[str, torch.Tensor]:
    """The value of the weight expression `root` and the name it is stored under: its weights' stored names
    joined (`a.q_proj.w`, `a.k_proj.w` -> `a.q_proj+k_proj.w`), `.T` appended where the last node transposes;
    an expression of one weight gets its last op's name appended (`a.q_proj.w.reshape`)."""
    leaves: list[str] = []

    def value(name: str) -> torch.Tensor:
        if name in weights:
            if name not in leaves:
                leaves.append(name)
            return weights[name].detach()
        if name in constants:
            array = numpy_helper.to_array(constants[name])
            if constants[name].data_type == TensorProto.BFLOAT16:  # numpy holds it as ml_dtypes' bfloat16
                return torch.from_numpy(array.view(np.uint16).copy()).view(torch.bfloat16)
            return torch.from_numpy(array.copy())
        node = graph.node[expressions[name]]
        args = [value(n) for n in node.input if n]
        op = node.op_type
        if op == "Concat":
            return torch.cat(args, _axis(node))
        if op == "Transpose":
            perm = _perm(node) or list(reversed(range(args[0].dim())))
            return args[0].permute(perm).contiguous()
        if op == "Identity":
            return args[0]
        if op == "Reshape":
            shape = [d if d != 0 else args[0].shape[i] for i, d in enumerate(args[1].tolist())]
            return args[0].reshape(shape)
        if op == "Unsqueeze":
            out = args[0]
            for axis in sorted(a % (out.dim() + len(args[1])) for a in args[1].tolist()):
                out = out.unsqueeze(axis)
            return out
        axes = args[1].tolist() if len(args) > 1 else [i for i, d in enumerate(args[0].shape) if d == 1]
        return args[0].squeeze(tuple(axes))  # Squeeze

    result = value(root)
    names = [rename.get(n, n).split(".") for n in leaves]
    prefix = 0
    while all(len(p) > prefix + 1 for p in names) and len({tuple(p[:prefix + 1]) for p in names}) == 1:
        prefix += 1
    suffix = 0
    while (all(len(p) > prefix + suffix + 1 for p in names)
           and len({tuple(p[len(p) - suffix - 1:]) for p in names}) == 1):
        suffix += 1
    middle = "+".join(".".join(p[prefix:len(p) - suffix]) for p in names)
    stored = ".".join([*names[0][:prefix], middle, *names[0][len(names[0]) - suffix:]])
    op = graph.node[expressions[root]].op_type
    if len(names) == 1:  # one weight reshaped or the like: a name of its own beside the weight's
        stored += f".{op.lower()}"
    elif op == "Transpose":
        stored += ".T"
    return stored, result


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
