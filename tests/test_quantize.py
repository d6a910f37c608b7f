"""`xlora-export --quantize int8|int4`: what is quantized, what stays float, one weights file, agreement with
the float graph through the runtime, and the refusals."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import tempfile
from functools import cache

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper

import xlora_export as xlora
import xlora_export.int4 as int4
import xlora_export.quantize as quantize
from helpers import built
from xlora_export import cli, parity
from xlora_export.export import ExportOptions, export
from xlora_export.quantize import QuantizeOptions
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.format import contract as C
from xlora_runtime.format.record import GraphInfo

EXPORTS = tempfile.mkdtemp(prefix="xlora-test-quantized-")
atexit.register(shutil.rmtree, EXPORTS, True)
RECIPE = "tiny-llama-trained"  # peaked logits: greedy tokens are stable under quantization
PROMPTS = ["the model mixes low rank", "a small classifier that reads the", "cache key value attention"]  # its corpus
QUANTIZED_OPS = {"int8": "MatMulInteger", "int4": "MatMulNBits"}


@cache
def exported(mode: str | None) -> tuple[str, object]:
    """(path, report) of the recipe exported once per session with both graphs: float (None), int8 or int4."""
    path = os.path.join(EXPORTS, f"{mode or 'float'}.onnx")
    options = ExportOptions(frozen_scalings=True, validate=mode is not None, validation_steps=1,
                            quantize=QuantizeOptions(mode) if mode else None)
    return path, export(built(RECIPE), path, options)


def _greedy(path: str, freeze: int | None = None, low_memory: bool = False) -> np.ndarray:
    generator = Generator(XLoraSession(path, low_memory=low_memory))
    outs = generator.generate(list(PROMPTS), max_new_tokens=12, stop_token_ids=[], freeze_scalings_after=freeze)
    return np.array([o.tokens for o in outs])


def _graph(path: str) -> onnx.ModelProto:
    return onnx.load(path, load_external_data=False)


def _base_linear_weights() -> set[str]:
    """The initializer names (without `.T`) that should be quantized, from the eager model's modules: every
    nn.Linear inside the decoder blocks that is no LoRA matrix, q/k/v and gate/up under the name of their packed
    weight (`self_attn.q_proj+k_proj+v_proj.base_layer.weight`: the graphs hold them as one matrix)."""
    model = xlora.xlora_utils.load_model(built(RECIPE))[0]
    names = {f"{name}.weight" for name, module in model.model.model.layers.named_modules(prefix="model.model.layers")
             if isinstance(module, torch.nn.Linear) and "lora_" not in name}
    packed = ((r"self_attn\.[qkv]_proj\.", "self_attn.q_proj+k_proj+v_proj."),
              (r"mlp\.(gate|up)_proj\.", "mlp.gate_proj+up_proj."))
    for pattern, name in packed:
        names = {re.sub(pattern, name, n) for n in names}
    return names


# ----------------------------------------------------------------------------------------- graphs
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_graphs_generate_like_the_float_graph(mode):
    """Through the runtime: greedy tokens (both graphs, frozen too) mostly agree with the float graph's."""
    float_path, q_path = exported(None)[0], exported(mode)[0]
    for freeze in (None, 2):
        reference, tokens = _greedy(float_path, freeze), _greedy(q_path, freeze)
        assert (reference == tokens).mean() >= 0.8, (mode, freeze, reference, tokens)


def test_low_memory_session_of_an_int8_graph_gives_the_same_tokens():
    """low_memory hands ONNX Runtime the int8 weights, scales and zero points from one mapping of the data file:
    the same tokens as the default session, both graphs."""
    path = exported("int8")[0]
    for freeze in (None, 2):
        assert (_greedy(path, freeze, low_memory=True) == _greedy(path, freeze)).all(), freeze


def test_low_memory_refuses_an_int4_graph():
    """MatMulNBits without its pre-packed weights decodes about 18x slower (measured): refused, one line."""
    path = exported("int4")[0]
    with pytest.raises(XLoraError, match=r"int4\.onnx: low_memory does not apply to int4 graphs: ONNX Runtime's "
                                         r"MatMulNBits needs its pre-packed weights"):
        XLoraSession(path, low_memory=True)


@pytest.mark.parametrize("mode", [None, "int8", "int4"])
def test_external_tensor_table_reads_what_onnx_reads(mode):
    """graph_file.external_tensors (the runtime's protobuf walk, no onnx package) against onnx's own parse."""
    from xlora_runtime.format.graph_file import external_tensors

    path = exported(mode)[0]
    for graph in (path, C.frozen_path(path)):
        expected = []
        for init in _graph(graph).graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                entry = {e.key: e.value for e in init.external_data}
                expected.append((init.name, init.data_type, tuple(init.dims), entry["location"],
                                 int(entry.get("offset", 0)), int(entry["length"])))
        table = [(t.name, t.data_type, t.shape, t.location, t.offset, t.length) for t in external_tensors(graph)]
        assert table == expected and len(table) > 10
        quantized = {None: set(), "int8": {TensorProto.INT8}, "int4": {TensorProto.UINT8}}[mode]
        assert {t[1] for t in table} >= {TensorProto.FLOAT} | quantized


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_only_the_base_projections_are_quantized(mode):
    """The decoder blocks' Linear weights, and lm_head by default in int4 only; in int4 the classifier and the
    LoRA A/B matrices in 8 bits, in int8 float; the embedding table stays float."""
    path, report = exported(mode)
    head = {"int8": set(), "int4": {"model.lm_head.weight"}}[mode]  # the recipe's lm_head is untied
    expected = _base_linear_weights() | head
    eight_bit = ("lora_", "classifier") if mode == "int4" else ()
    float_parts = ("embed_tokens",) + (() if eight_bit else ("lora_", "classifier")) + (() if head else ("lm_head",))
    suffix = {"int8": "_quantized", "int4": "_Q4"}[mode]
    for graph in (path, C.frozen_path(path)):
        proto = _graph(graph)
        initializers = {i.name: i for i in proto.graph.initializer}
        quantized = {name.removesuffix(suffix).removesuffix(".T") for name in initializers if name.endswith(suffix)}
        assert quantized == expected if graph == path else head <= quantized <= expected
        for name, init in initializers.items():  # the weights of the classifier, LoRA A/B, embedding: float
            weight = name.startswith(("model.", "internal_xlora_classifier."))  # not a folded constant ("/model/...")
            if weight and any(part in name for part in float_parts) and not name.endswith(suffix):
                assert init.data_type == TensorProto.FLOAT, name
        for node in proto.graph.node:
            bits = {a.name: a.i for a in node.attribute}.get("bits")
            if node.op_type == QUANTIZED_OPS[mode] and bits != 8:
                weight = node.input[1].removesuffix(suffix).removesuffix(".T")
                assert weight in expected
            if node.op_type == "MatMul" and any(p in node.input[1] for p in float_parts):
                assert initializers[node.input[1]].data_type == TensorProto.FLOAT
            if node.op_type == "MatMul" and node.input[1].startswith(("model.", "internal_xlora_classifier.")):
                assert any(p in node.input[1] for p in float_parts), node.input[1]  # a weight left float
            if bits == 8:
                assert any(p in node.input[1] for p in eight_bit) and node.input[1].endswith(".T_Q8"), node.input[1]
        if eight_bit:  # every LoRA and classifier MatMul of the graph
            assert sum(n.op_type == "MatMulNBits" and n.input[1].endswith("_Q8") for n in proto.graph.node) == sum(
                n.op_type == "MatMul" and any(p in n.input[1] for p in eight_bit)
                for n in _graph(exported(None)[0] if graph == path else C.frozen_path(exported(None)[0])).graph.node)
    assert report.quantization.quantized["main"] > report.quantization.quantized["frozen"] > 0


def test_int4_graph_has_matmulnbits_nodes_and_int8_none():
    ops4 = [n for n in _graph(exported("int4")[0]).graph.node if n.op_type == "MatMulNBits"]
    assert ops4 and all(n.domain == "com.microsoft" for n in ops4)
    attrs = {a.name: a.i for a in ops4[0].attribute}
    assert attrs["bits"] == 4 and attrs["block_size"] == quantize.BLOCK_SIZE
    ops8 = {n.op_type for n in _graph(exported("int8")[0]).graph.node}
    assert "MatMulInteger" in ops8 and "MatMulNBits" not in ops8


def test_int8_weights_use_seven_bits():
    """int8 weights stay within [-64, 64] (reduce_range): ONNX Runtime's u8 x s8 kernels on CPUs without VNNI sum
    products in pairs in 16 bits, which 8-bit weights can saturate (the demo's spell task fell to 0% on AVX2)."""
    model = onnx.load(exported("int8")[0])
    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int16)).max()) for w in weights) <= 64


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_main_and_frozen_graph_share_one_weights_file(mode):
    path = exported(mode)[0]
    assert sorted(f for f in os.listdir(EXPORTS) if f.startswith(mode)) == [
        f"{mode}.frozen.onnx", f"{mode}.onnx", f"{mode}.onnx.data", f"{mode}.tokenizer.json"]
    where = {}
    for graph in (path, C.frozen_path(path)):
        for init in _graph(graph).graph.initializer:
            if init.data_location == TensorProto.EXTERNAL:
                entry = {e.key: e.value for e in init.external_data}
                assert entry["location"] == f"{mode}.onnx.data"
                assert where.setdefault(init.name, (entry["offset"], entry["length"])) == (entry["offset"],
                                                                                          entry["length"])
    stored = sum(int(length) for _, length in where.values())
    assert stored <= os.path.getsize(path + ".data") < stored + 4096 * (len(where) + 1)  # each tensor once
    float_path = exported(None)[0]
    assert os.path.getsize(path + ".data") < os.path.getsize(float_path + ".data")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_report_measures_agreement_against_the_float_graph(mode, capsys):
    report = exported(mode)[1]
    q = report.quantization
    assert set(q.agreement) == {"main", "frozen"}
    main = q.agreement["main"]
    assert main.positions > 50 and main.tokens >= {"int8": 0.9, "int4": 0.85}[mode] and main.experts >= 0.85
    assert 0 < main.scalings_max_diff < 1 and 0 < main.logits_error < quantize.BROKEN_LOGITS_ERROR
    assert q.bytes < q.float_bytes and report.parity["main"].max_diff  # the float graphs were validated first
    assert any(op == QUANTIZED_OPS[mode] for op in report.op_counts)
    text = "\n".join(q.lines())
    assert "top-1 tokens" in text and "top-1 experts" in text and "scalings max diff" in text


def _head_op(path: str) -> tuple[str, bool]:
    """The op that reads lm_head's weight in the graph at `path`, and the lm_head flag of its quantization record."""
    ops = [n.op_type for n in _graph(path).graph.node if n.op_type in {"MatMul", *QUANTIZED_OPS.values()}
           and n.input[1].startswith("model.lm_head")]
    assert len(ops) == 1, ops
    return ops[0], GraphInfo.read(path).quantization.lm_head


def test_quantize_lm_head_and_block_size_through_the_cli(tmp_path, capsys):
    """int4 quantizes lm_head unless --no-quantize-lm-head; int8 keeps it float unless --quantize-lm-head."""
    for mode, flag, expected in (("int4", "--no-quantize-lm-head", ("MatMul", False)),
                                 ("int8", "--quantize-lm-head", ("MatMulInteger", True))):
        (tmp_path / mode).mkdir()
        path = str(tmp_path / mode / "m.onnx")
        assert cli.main([built(RECIPE), path, "--quantize", mode, flag, "--steps", "1", "--quiet"]) == 0
        assert _head_op(path) == expected, (mode, flag)
        shutil.rmtree(tmp_path / mode)
    out = str(tmp_path / "m.onnx")
    code = cli.main([built(RECIPE), out, "--quantize", "int4", "--block-size", "16"])
    stdout = capsys.readouterr().out
    assert code == 0 and "agreement with the float graph" in stdout and "MatMulNBits" in stdout
    assert "classifier and LoRA A/B in 8 bits; files" in stdout and _head_op(out) == ("MatMulNBits", True)
    proto = _graph(out)
    heads = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.input[1].startswith("model.lm_head")]
    assert len(heads) == 1 and {a.name: a.i for a in heads[0].attribute}["block_size"] == 16
    assert sorted(os.listdir(tmp_path)) == ["m.onnx", "m.tokenizer.json"]  # weights inside, like the float export
    code = parity.main([built(RECIPE), out])
    err = capsys.readouterr().err
    assert code == 1 and "an int4 graph; xlora-parity holds float graphs" in err and err.count("\n") == 1


def test_no_validate_says_agreement_was_not_measured(tmp_path):
    report = export(built(RECIPE), str(tmp_path / "m.onnx"), ExportOptions(validate=False,
                                                                           quantize=QuantizeOptions("int8")))
    assert report.quantization.skipped == "--no-validate" and not report.quantization.agreement
    assert "AGREEMENT NOT MEASURED" in "\n".join(report.quantization.lines())


# ----------------------------------------------------------------------------------------- failures
def test_broken_quantized_graph_fails_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    original = int4.Quantized.put

    def negated_scales(self, name, value):  # the decoder's projections (negating lm_head too partly cancels out)
        negate = name.endswith("_scales") and not name.startswith("model.lm_head") and name not in self.done
        return original(self, name, -value if negate else value)

    monkeypatch.setattr(int4.Quantized, "put", negated_scales)
    argv = [built(RECIPE), str(tmp_path / "m.onnx"), "--quantize", "int4", "--frozen-scalings", "--steps", "1"]
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "validation failed: the int4 main graph's logits differ from the float graph's" in err
    assert err.count("\n") == 1 and os.listdir(tmp_path) == []


def test_min_agreement_fails_the_export(tmp_path, capsys, monkeypatch):
    def poor(floats, quantized, tokenizer):
        return {"main": quantize.Agreement(positions=100, tokens=0.4, logits_error=0.2)}, "stub"

    monkeypatch.setattr(quantize, "measure_agreement", poor)
    argv = [built(RECIPE), str(tmp_path / "m.onnx"), "--quantize", "int8", "--min-agreement", "0.5", "--steps", "1"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert ("the int8 main graph's top-1 tokens agree with the float graph's at 40% of 100 positions (--min-agreement "
            "0.5); no file was written") in err and os.listdir(tmp_path) == []
    report = quantize.quantize_files({"main": exported(None)[0]}, {"main": str(tmp_path / "m.onnx")},
                                     QuantizeOptions("int8"), validate=True)
    assert report.agreement["main"].tokens == 0.4  # the default threshold, 0, lets it pass


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int3"], "argument --quantize: invalid choice: 'int3' (choose from 'int8', 'int4')"),
    (["--quantize", "int4", "--block-size", "24"], "argument --block-size: expected a power of two, at least 16"),
    (["--quantize", "int4", "--block-size", "8"], "argument --block-size: expected a power of two, at least 16"),
    (["--quantize", "int8", "--block-size", "32"], "--block-size applies to --quantize int4 only"),
    (["--block-size", "32"], "--block-size needs --quantize (int8 or int4)"),
    (["--quantize-lm-head"], "--quantize-lm-head needs --quantize (int8 or int4)"),
    (["--quantize-embedding"], "--quantize-embedding needs --quantize (int8 or int4)"),
    (["--quantize", "int8", "--quantize-embedding"], "--quantize-embedding applies to --quantize int4 only"),
    (["--quantize", "int8", "--quantize-lora"], "--quantize-lora applies to --quantize int4 only"),
    (["--min-agreement", "0.9"], "--min-agreement needs --quantize (int8 or int4)"),
    (["--quantize", "int8", "--min-agreement", "1.5"], "argument --min-agreement: expected a fraction in 0..1"),
])
def test_bad_quantize_options_are_usage_errors(args, message, tmp_path, capsys):
    assert cli.main([built(RECIPE), str(tmp_path / "m.onnx"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.strip().split("\n")[-1].startswith("xlora-export: error:")
    assert os.listdir(tmp_path) == []


def test_refusals_before_the_export(tmp_path, capsys):
    for mode, dtype, message in (("int4", "bf16", "--quantize int4 needs --dtype fp32 or fp16"),
                                 ("int8", "fp16", "--quantize int8 needs --dtype fp32")):
        code = cli.main([built(RECIPE), str(tmp_path / "m.onnx"), "--quantize", mode, "--dtype", dtype])
        err = capsys.readouterr().err
        assert code == 1 and message in err and err.count("\n") == 1
    for options, message in ((QuantizeOptions("int3"), "--quantize 'int3': expected one of int8, int4"),
                             (QuantizeOptions(block_size=48), "--block-size 48: expected a power of two"),
                             (QuantizeOptions(min_agreement=2.0), "--min-agreement 2.0: expected a fraction")):
        with pytest.raises(xlora.XLoraError, match=message.replace("(", r"\(")):
            export(built(RECIPE), str(tmp_path / "m.onnx"), ExportOptions(quantize=options))
    assert os.listdir(tmp_path) == []


def test_cli_choices_are_the_quantize_modes():
    assert cli.QUANTIZE == quantize.MODES
