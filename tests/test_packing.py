"""Packed projections in the exported graphs: q/k/v and gate/up as one base MatMul each (their weights stacked),
stored once for both passes and both graphs, the modules' LoRA up-projections added side by side, and the weight
expressions that `onnx_passes.attach_weights` evaluates to get there.

Oracles: numpy on the stacked matrices (the pass alone), the exporter's validation against the eager model
(tests/test_export.py, tests/test_gqa.py run it on every family), and the external-data offsets of the files.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

import xlora_export as xlora
from helpers import built, exported
from xlora_export.onnx_passes import WeightStore, attach_weights
from xlora_runtime.format import contract as C

RECIPE = "tiny-llama"  # two layers; alpha targets q and v, beta q/k/v/o, gamma the MLP and q


def _stacked_graph() -> onnx.ModelProto:
    """y = x @ concat(W0, W1)^T and z = x @ (W0 reshaped), with W0 (3, 4) and W1 (2, 4) graph inputs, as a trace
    with `export_params=False` gives them."""
    nodes = [helper.make_node("Concat", ["w0", "w1"], ["cat"], axis=0),
             helper.make_node("Transpose", ["cat"], ["cat_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "cat_t"], ["y"]),
             helper.make_node("Reshape", ["w0", "shape"], ["w0_r"]),
             helper.make_node("MatMul", ["x", "w0_r"], ["z"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4]),
         helper.make_tensor_value_info("w0", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("w1", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 3])],
        [numpy_helper.from_array(np.array([4, 3], np.int64), "shape")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_weight_expressions_become_one_initializer_each():
    w0, w1 = torch.randn(3, 4), torch.randn(2, 4)
    proto = _stacked_graph()
    attach_weights(proto, {"w0": w0, "w1": w1}, WeightStore(None),
                   rename={"w0": "m.layers.0.q_proj.weight", "w1": "m.layers.0.k_proj.weight"})
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert set(initializers) == {"m.layers.0.q_proj+k_proj.weight.T", "m.layers.0.q_proj.weight.reshape"}
    np.testing.assert_array_equal(initializers["m.layers.0.q_proj+k_proj.weight.T"], torch.cat([w0, w1]).t().numpy())
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "MatMul"]  # Concat, Transpose, Reshape folded
    assert not [i for i in proto.graph.input if i.name.startswith("w")]
    x = np.random.default_rng(0).normal(size=(2, 4)).astype(np.float32)
    y, z = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ torch.cat([w0, w1]).t().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(z, x @ w0.numpy().reshape(4, 3), rtol=1e-6, atol=1e-6)


def _matmul_weights(path: str) -> tuple[list[str], dict[str, tuple[str, str]]]:
    """The B input of every MatMul, and each external initializer's (offset, length)."""
    proto = onnx.load(path, load_external_data=False)
    offsets = {i.name: tuple(e.value for e in i.external_data if e.key in ("offset", "length"))
               for i in proto.graph.initializer if i.data_location == TensorProto.EXTERNAL}
    return [n.input[1] for n in proto.graph.node if n.op_type == "MatMul"], offsets


def test_exported_projections_are_packed_and_stored_once():
    main = exported(RECIPE)
    layers = 2
    weights, offsets = _matmul_weights(main)
    frozen_weights, frozen_offsets = _matmul_weights(C.frozen_path(main))
    for i in range(layers):
        qkv = f"model.model.layers.{i}.self_attn.q_proj+k_proj+v_proj.base_layer.weight.T"
        gate_up = f"model.model.layers.{i}.mlp.gate_proj+up_proj.base_layer.weight.T"
        # one MatMul per pass (in layer 0 the passes read the same normed embeddings: the trace keeps one)
        assert weights.count(qkv) in (1, 2) and weights.count(gate_up) == 2
        assert frozen_weights.count(qkv) == 1 and frozen_weights.count(gate_up) == 1
        for name in (qkv, gate_up):  # one copy of the bytes for both graphs
            assert offsets[name] == frozen_offsets[name]
        assert not [w for w in weights if f"layers.{i}.self_attn.q_proj.base_layer" in w]
        for module in ("q_proj", "k_proj", "v_proj"):  # each up-projection read once, by the real pass
            assert weights.count(f"model.model.layers.{i}.self_attn.{module}.lora_B.T") == 1
    # the stacked base weight: the modules' weights one after the other, transposed
    proto = onnx.load(main, load_external_data=True)
    arrays = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    attention = xlora.xlora_utils.load_model(built(RECIPE))[0].model.model.layers[0].self_attn
    modules = (attention.q_proj, attention.k_proj, attention.v_proj)
    expected = torch.cat([m.base_layer.weight.detach() for m in modules]).t()
    np.testing.assert_array_equal(arrays["model.model.layers.0.self_attn.q_proj+k_proj+v_proj.base_layer.weight.T"],
                                  expected.numpy())
