"""int4 quantization one weight at a time (xlora_export/int4.py): ONNX Runtime's own quantizer's graph, byte for
byte, from the external data; fp16 graphs; the weights read once."""

from __future__ import annotations

import logging
import os

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from helpers import built
from xlora_export import int4
from xlora_export.export import ExportOptions, export
from xlora_export.onnx_passes import WeightStore
from xlora_export.quantize import QuantizeOptions, quantize_files

K, N, BLOCK = 80, 48, 32  # K not a whole number of blocks: padded with zeros


def _graph(folder: str, dtype: type) -> str:
    """A graph of three MatMuls: W1 read twice, W2 once, W3 left float; weights in an external-data file."""
    rng = np.random.default_rng(0)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    weights = {name: rng.standard_normal((K, N)).astype(dtype) for name in ("W1", "W2")}
    weights["W3"] = rng.standard_normal((N, N)).astype(dtype)
    nodes = [helper.make_node("MatMul", ["A", "W1"], ["Y1"], name="m1"),
             helper.make_node("MatMul", ["Y1", "W3"], ["Y3"], name="m3"),
             helper.make_node("Relu", ["A"], ["R"], name="relu"),
             helper.make_node("MatMul", ["R", "W1"], ["Y2"], name="m2"),
             helper.make_node("MatMul", ["R", "W2"], ["Y4"], name="m4")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", elem, ["m", K])],
                              [helper.make_tensor_value_info(y, elem, ["m", N]) for y in ("Y2", "Y3", "Y4")])
    store = WeightStore(os.path.join(folder, "f.onnx.data"))
    import torch

    graph.initializer.extend(store.tensor(name, torch.from_numpy(value)) for name, value in weights.items())
    store.close()
    path = os.path.join(folder, "f.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _onnxruntime_quantizer(path: str, nodes: list[str], bits: int = 4) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    proto = onnx.load(path)
    others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name not in nodes]
    logging.disable(logging.WARNING)
    try:
        quantizer = MatMulNBitsQuantizer(proto, bits=bits, block_size=BLOCK, is_symmetric=False, accuracy_level=4,
                                         nodes_to_exclude=others)
        quantizer.process()
    finally:
        logging.disable(logging.NOTSET)
    return quantizer.model.model


def _values(proto: onnx.ModelProto, folder: str) -> dict[str, np.ndarray]:
    onnx.load_external_data_for_model(proto, folder)
    return {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_the_graph_onnxruntime_quantizer_writes(tmp_path, dtype):
    """Same nodes (names, inputs, attributes), same tensors (names, dtypes, shapes, bytes) and opsets as
    MatMulNBitsQuantizer's; fp16: a second use of a weight under names of its own (same bytes in the file)."""
    (tmp_path / "q").mkdir()
    path = _graph(str(tmp_path), dtype)
    chosen = ["m1", "m2", "m4"]
    store = WeightStore(str(tmp_path / "q" / "q.onnx.data"))
    out = int4.Quantized(store)
    mine = int4.quantize_int4(path, chosen, BLOCK, 4, out)
    store.close()
    onnx.save(mine, str(tmp_path / "q" / "q.onnx"))
    reference = _onnxruntime_quantizer(path, chosen)
    mine = onnx.load(str(tmp_path / "q" / "q.onnx"), load_external_data=False)
    assert [(o.domain, o.version) for o in mine.opset_import] == [(o.domain, o.version) for o in reference.opset_import]
    aliases = {}
    if dtype == np.float16:
        second = next(n for n in mine.graph.node if n.name == "m2_Q4")
        assert list(second.input[1:]) == ["W1.use2_Q4", "W1.use2_scales", "W1.use2_zero_points"]
        aliases = {f"W1.use2{s}": f"W1{s}" for s in ("_Q4", "_scales", "_zero_points")}
        for node in mine.graph.node:
            node.input[:] = [aliases.get(name, name) for name in node.input]
    assert [n.SerializeToString() for n in mine.graph.node] == [n.SerializeToString() for n in reference.graph.node]
    ours, theirs = _values(mine, str(tmp_path / "q")), _values(reference, str(tmp_path))
    assert set(ours) == set(theirs) | set(aliases) and len(theirs) == 7  # W1, W2 as 3 tensors each, W3 float
    for name, value in ours.items():
        expected = theirs[aliases.get(name, name)]
        assert value.dtype == expected.dtype and value.shape == expected.shape, name
        assert value.tobytes() == expected.tobytes(), name


def test_eight_bit_matmuls_are_what_onnxruntime_quantizer_writes(tmp_path):
    """A MatMul chosen for 8 bits (the LoRA and classifier ones): ONNX Runtime's quantizer's node and tensors with
    bits=8, byte for byte; K (48) padded to whole blocks."""
    path = _graph(str(tmp_path), np.float32)
    store = WeightStore(None)
    mine = int4.quantize_int4(path, ["m1"], BLOCK, 4, int4.Quantized(store), eight_bit=["m3"])
    reference = _onnxruntime_quantizer(path, ["m3"], bits=8)
    node = next(n for n in mine.graph.node if n.name == "m3_Q8")
    assert node.SerializeToString() == next(n for n in reference.graph.node if n.name == "m3_Q8").SerializeToString()
    ours, theirs = _values(mine, str(tmp_path)), _values(reference, str(tmp_path))
    for name in node.input[1:]:
        assert ours[name].dtype == theirs[name].dtype and ours[name].tobytes() == theirs[name].tobytes(), name
    assert ours["W3_Q8"].shape == (N, 2, BLOCK)


def test_each_weight_is_read_once(tmp_path, monkeypatch):
    """One graph after another into one store: a weight both graphs read is read (and quantized) once."""
    path = _graph(str(tmp_path), np.float32)
    read = []
    original = int4._read
    monkeypatch.setattr(int4, "_read", lambda init, folder: read.append(init.name) or original(init, folder))
    store = WeightStore(str(tmp_path / "q.onnx.data"))
    out = int4.Quantized(store)
    for nodes in (["m1", "m2", "m4"], ["m4"]):
        int4.quantize_int4(path, nodes, BLOCK, 4, out)
    store.close()
    assert sorted(read) == ["W1", "W1", "W2", "W3"]  # W1: quantized once, then read as float by the second graph


def test_fp16_export_quantizes_and_agrees(tmp_path):
    """An fp16 export quantized (`--dtype fp16 --quantize int4`): fp16 scales, both graphs measured against the
    float fp16 graphs (the main graph's scaling and real passes share the weights, which ONNX Runtime's fp16
    kernel gets wrong unless each reads them under its own names)."""
    floats = {"main": str(tmp_path / "f.onnx"), "frozen": str(tmp_path / "f.frozen.onnx")}
    export(built("tiny-llama-trained"), floats["main"], ExportOptions(dtype="fp16", frozen_scalings=True,
                                                                       validate=False))
    (tmp_path / "q").mkdir()
    path = str(tmp_path / "q" / "m.onnx")
    report = quantize_files(floats, {"main": path, "frozen": str(tmp_path / "q" / "m.frozen.onnx")},
                            QuantizeOptions("int4"), validate=True)
    agreement = report.agreement
    assert agreement["main"].tokens >= 0.85 and agreement["main"].experts >= 0.85
    assert agreement["frozen"].tokens >= 0.85 and agreement["main"].logits_error < 0.2
    scales = [i for i in onnx.load(path, load_external_data=False).graph.initializer if i.name.endswith("_scales")]
    assert scales and {i.data_type for i in scales} == {TensorProto.FLOAT16}


def _dequantized_rows(proto: onnx.ModelProto, folder: str, node: onnx.NodeProto) -> np.ndarray:
    """The table a GatherBlockQuantized node reads, dequantized with numpy: (V, H) = (q - zero point) * scale."""
    values = _values(proto, folder)
    data, scales, zero_points = (values[name] for name in (node.input[0], node.input[2], node.input[3]))
    block = next(a.i for a in node.attribute if a.name == "block_size")
    vocab, blocks = scales.shape
    q = np.stack([data & 15, data >> 4], -1).reshape(vocab, blocks, block).astype(np.float32)
    zero = np.stack([zero_points & 15, zero_points >> 4], -1).reshape(vocab, -1)[:, :blocks].astype(np.float32)
    return ((q - zero[..., None]) * scales.astype(np.float32)[..., None]).reshape(vocab, blocks * block)


@pytest.mark.parametrize("recipe", ["tiny-llama-trained", "tiny-qwen3"])  # untied; tied (lm_head's blocks)
def test_embedding_lookup_reads_the_int4_rows(tmp_path, recipe):
    """--quantize-embedding: the lookup is one GatherBlockQuantized whose output equals a float Gather of the
    table dequantized with numpy (logits of the frozen graph, prefill and decode); a tied table is stored once,
    in lm_head's int4 blocks (no float copy left)."""
    from xlora_export import quantize
    from xlora_runtime.format.record import GraphInfo

    floats = {"main": str(tmp_path / "f.onnx"), "frozen": str(tmp_path / "f.frozen.onnx")}
    export(built(recipe), floats["main"], ExportOptions(frozen_scalings=True, validate=False))
    (tmp_path / "q").mkdir()
    out = {"main": str(tmp_path / "q" / "m.onnx"), "frozen": str(tmp_path / "q" / "m.frozen.onnx")}
    report = quantize_files(floats, out, QuantizeOptions("int4", embedding=True), validate=False)
    assert report.lookups == {"main": 1, "frozen": 1} and "1 embedding lookup of the main graph" in report.lines()[0]
    proto = onnx.load(out["frozen"], load_external_data=False)
    lookup = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookup) == 1 and not [n for n in proto.graph.node if n.op_type == "Gather"
                                     and n.input[0].startswith("model.model.embed_tokens")]
    external = {i.name: {e.key: e.value for e in i.external_data} for i in proto.graph.initializer
                if i.data_location == TensorProto.EXTERNAL}
    assert not [name for name in external if name.startswith("model.model.embed_tokens.weight") and "_" not in
                name.rsplit(".", 1)[-1]]  # no float table
    if recipe == "tiny-qwen3":  # the lookup's rows are lm_head's blocks: the same bytes in the file
        head = next(n for n in proto.graph.node if n.op_type == "MatMulNBits" and "embed_tokens" in n.input[1])
        assert external[lookup[0].input[0]] == external[head.input[1]]
    table = _dequantized_rows(onnx.load(out["frozen"], load_external_data=False), str(tmp_path / "q"), lookup[0])
    reference = onnx.load(out["frozen"], load_external_data=False)
    node = next(n for n in reference.graph.node if n.op_type == "GatherBlockQuantized")
    node.CopyFrom(helper.make_node("Gather", ["dequantized_table", node.input[1]], list(node.output), axis=0))
    reference.graph.initializer.append(numpy_helper.from_array(table, "dequantized_table"))
    onnx.save(reference, str(tmp_path / "q" / "reference.onnx"))
    info = GraphInfo.read(out["main"])
    prompts = [[5, 9, 11, 3, 7], [4, 4, 8]]
    fixed = np.full((2, info.n_modules, info.n_experts), 1 / info.n_experts, np.float32)
    runs = [quantize._decode(path, info, prompts, True, None, fixed)
            for path in (out["frozen"], str(tmp_path / "q" / "reference.onnx"))]
    for got, expected in zip(*(r.logits for r in runs)):
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4)
