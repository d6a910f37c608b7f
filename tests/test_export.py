"""`xlora-export`: the graph contract, parity with the eager model, structure, precision, safety."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import cache

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import xlora_export as xlora
from helpers import built, expert_paths, make_xlora, max_diff
from xlora_export import cli
from xlora_export.export import ExportOptions, export
from xlora_export.onnx_passes import fp16_weights_per_use
from xlora_export.trt_check import check_tensorrt
from xlora_export.validate import compare_with_eager
from xlora_runtime import Generator, XLoraSession
from xlora_runtime.format import contract as C
from xlora_runtime.session import open_graph

EXPORTS = tempfile.mkdtemp(prefix="xlora-test-exports-")
atexit.register(shutil.rmtree, EXPORTS, True)
PROMPTS3 = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])

# name -> (recipe, config overrides, export options)
VARIANTS = {
    "llama": ("tiny-llama", {}, {"frozen_scalings": True}),
    "llama-shared-depth1": ("tiny-llama", {"layerwise_scalings": False, "xlora_depth": 1}, {}),
    "llama-depth3": ("tiny-llama", {"xlora_depth": 3}, {}),
    "llama-softmaxtopk": ("tiny-llama", {"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False}, {}),
    "llama-scalingpass": ("tiny-llama", {"scaling_pass_value": 0.5}, {}),
    "llama-2experts": ("tiny-llama", {"adapters": "beta,gamma"}, {}),
    "llama-4experts": ("tiny-llama", {"adapters": "alpha,beta,gamma,beta:beta2"}, {}),
    "llama-external": ("tiny-llama", {}, {"external_data": True}),
    "llama-all-logits": ("tiny-llama", {}, {"all_logits": True, "frozen_scalings": True}),
    "mistral": ("tiny-mistral", {}, {}),
    "qwen2": ("tiny-qwen2", {}, {}),
    "qwen3": ("tiny-qwen3", {}, {}),
    "gemma2": ("tiny-gemma2", {}, {"frozen_scalings": True}),
    "gemma3": ("tiny-gemma3", {}, {}),
    "phi3": ("tiny-phi3", {}, {"frozen_scalings": True}),
}


def _adapters(recipe: str, spec: str) -> dict[str, str]:
    paths, out = expert_paths(recipe), {}
    for item in spec.split(","):
        source, _, name = item.partition(":")
        out[name or source] = paths[source]
    return out


@cache
def checkpoint(name: str) -> str:
    """The variant's checkpoint (this project's format), saved once per session."""
    recipe, overrides, _ = VARIANTS[name]
    overrides = dict(overrides)
    if "adapters" in overrides:
        overrides["adapters"] = _adapters(recipe, overrides["adapters"])
    folder = os.path.join(EXPORTS, f"{name}-ckpt")
    make_xlora(recipe, seed=11, **overrides).save_pretrained(folder)
    return folder


@cache
def exported(name: str) -> str:
    """The variant's graph, exported once per session (validation is what the tests below do)."""
    options = ExportOptions(validate=False, **VARIANTS[name][2])
    path = os.path.join(EXPORTS, f"{name}.onnx")
    export(checkpoint(name), path, options)
    return path


@cache
def eager(name: str) -> xlora.xLoRAModel:
    return xlora.xlora_utils.load_model(checkpoint(name))[0]


def metadata(path: str) -> dict:
    props = {p.key: p.value for p in onnx.load(path, load_external_data=False).metadata_props}
    return json.loads(props[C.METADATA_KEY])


# ----------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("all_logits", [False, True])
def test_contract_names_dtypes_ranks_and_axes(frozen, all_logits):
    path = exported("llama-all-logits" if all_logits else "llama")
    path = C.frozen_path(path) if frozen else path
    model = onnx.load(path)
    meta = metadata(path)
    assert meta["logits"] == ("all" if all_logits else "last")
    n_layers = meta["num_layers"]
    assert [i.name for i in model.graph.input] == C.input_names(n_layers, frozen)
    assert [o.name for o in model.graph.output] == C.output_names(n_layers, frozen)
    axes = C.dynamic_axes(n_layers, frozen, all_logits)
    float_type = onnx.TensorProto.FLOAT
    expected_type = {C.INPUT_IDS: onnx.TensorProto.INT64, C.ATTENTION_MASK: onnx.TensorProto.INT64,
                     C.POSITION_IDS: onnx.TensorProto.INT64, C.TOP_K: onnx.TensorProto.INT64}
    ranks = {C.INPUT_IDS: 2, C.ATTENTION_MASK: 2, C.POSITION_IDS: 2, C.TOP_K: 0, C.LOGITS: 3,
             C.SCALINGS: 3 if frozen else 4}
    for value in list(model.graph.input) + list(model.graph.output):
        t = value.type.tensor_type
        assert t.elem_type == expected_type.get(value.name, float_type), value.name
        dims = t.shape.dim
        assert len(dims) == ranks.get(value.name, 4), value.name
        for axis, symbol in axes.get(value.name, {}).items():
            assert dims[axis].dim_param == symbol, (value.name, axis)
        if "key_values" in value.name or "present" in value.name:
            assert [dims[1].dim_value, dims[3].dim_value] == [meta["num_key_value_heads"], meta["head_dim"]]
    logits = {o.name: o for o in model.graph.output}[C.LOGITS].type.tensor_type.shape.dim
    assert logits[2].dim_value == meta["vocab_size"]
    if not all_logits:
        assert logits[1].dim_value == 1  # the last position only: a static 1, no lm_head over the prompt


@pytest.mark.parametrize("frozen", [False, True])
def test_last_position_logits_are_those_of_the_all_logits_graph(frozen):
    """The default graph's one position of logits is the last position of `--all-logits`'s (same checkpoint)."""
    outs = {}
    for name in ("llama", "llama-all-logits"):
        path = exported(name)
        session = XLoraSession(path)
        meta = metadata(path)
        feed = {C.INPUT_IDS: np.array([[5, 6, 7, 8], [0, 0, 9, 10]]),
                C.ATTENTION_MASK: np.array([[1, 1, 1, 1], [0, 0, 1, 1]]),
                C.POSITION_IDS: np.array([[0, 1, 2, 3], [0, 0, 0, 1]]), C.TOP_K: np.array(0)}
        empty = np.zeros((2, meta["num_key_value_heads"], 0, meta["head_dim"]), np.float32)
        feed.update({n: empty for n in C.past_names(meta["num_layers"])})
        if frozen:
            feed[C.SCALINGS] = np.full((2, meta["n_modules"], meta["n_experts"]), 0.4, np.float32)
        else:
            feed.update({n: empty for n in C.past_names(meta["num_layers"], scaling=True)})
        outs[name] = (session.frozen if frozen else session.main).session.run([C.LOGITS], feed)[0]
    assert outs["llama"].shape == (2, 1, outs["llama-all-logits"].shape[-1])
    assert outs["llama-all-logits"].shape[1] == 4
    np.testing.assert_allclose(outs["llama"][:, 0], outs["llama-all-logits"][:, -1], atol=1e-5)


def test_metadata_is_enough_to_drive_the_graph():
    path = exported("llama")
    meta = metadata(path)
    assert meta["format_version"] == C.FORMAT_VERSION
    assert list(meta["modules"].values()) == list(range(meta["n_modules"]))
    assert meta["adapters"] == {"alpha": 0, "beta": 1, "gamma": 2}
    assert meta["files"] == {"frozen": "llama.frozen.onnx", "tokenizer": "llama.tokenizer.json", "chat_template": None}
    assert {"torch", "transformers", "onnx", "xlora_export"} <= set(meta["versions"])
    assert meta["eos_token_id"] == [2] and meta["pad_token_id"] == 0
    assert set(meta["tensorrt_profile"]) == {"max_batch", "max_sequence", "max_past"}
    assert os.path.isfile(os.path.join(EXPORTS, meta["files"]["tokenizer"]))
    # Build every cache input from the metadata alone and run a prefill of batch 1.
    session = XLoraSession(path).main.session
    feed = {C.INPUT_IDS: np.array([[5, 6, 7]]), C.ATTENTION_MASK: np.ones((1, 3), np.int64),
            C.POSITION_IDS: np.array([[0, 1, 2]]), C.TOP_K: np.array(meta["default_top_k"], np.int64)}
    for entry in meta["caches"].values():
        shape = [1 if d == C.BATCH else 0 if d == C.PAST_SEQUENCE else d for d in entry["shape"]]
        feed.update({name: np.zeros(shape, entry["dtype"]) for name in entry["inputs"]})
    outs = session.run([C.SCALINGS], feed)
    assert outs[0].shape == (1, 3, meta["n_modules"], meta["n_experts"])


# ----------------------------------------------------------------------------------------- parity
PARITY = [("llama", k) for k in range(4)] + [
    ("llama-shared-depth1", 0), ("llama-shared-depth1", 2), ("llama-depth3", 0), ("llama-depth3", 1),
    ("llama-softmaxtopk", 0), ("llama-softmaxtopk", 2), ("llama-scalingpass", 0), ("llama-scalingpass", 3),
    ("mistral", 0), ("mistral", 2), ("qwen2", 0), ("qwen2", 1), ("llama-external", 0),
    ("llama-all-logits", 0), ("llama-all-logits", 2),
    ("qwen3", 0), ("qwen3", 2),
    ("gemma2", 0), ("gemma2", 1), ("gemma3", 0), ("gemma3", 3), ("phi3", 0), ("phi3", 2)]


@pytest.mark.parametrize("name,top_k", PARITY, ids=[f"{n}-topk{k}" for n, k in PARITY])
def test_graph_matches_eager(name, top_k):
    """Prefill + 8 decode steps, batch 3, left padding; the graph fed its own presents."""
    result = compare_with_eager(eager(name), exported(name), top_k=top_k, steps=8, prompts=PROMPTS3)
    assert result.max_diff[C.LOGITS] < 1e-4, result.max_diff
    assert result.max_diff[C.SCALINGS] < 1e-5, result.max_diff


@pytest.mark.parametrize("top_k", [0, 1, 3])
def test_frozen_graph_matches_eager_with_the_same_scalings(top_k):
    result = compare_with_eager(eager("llama"), exported("llama"), top_k=top_k, steps=8, frozen=True,
                                prompts=PROMPTS3)
    assert result.max_diff[C.LOGITS] < 1e-4, result.max_diff


def test_top_k_input_changes_the_graph_output():
    """`top_k` is honoured at run time: the graph's outputs differ between 1 and dense, like the eager model."""
    session, meta = XLoraSession(exported("llama")).main.session, metadata(exported("llama"))
    feed = {C.INPUT_IDS: np.array([[5, 6, 7]]), C.ATTENTION_MASK: np.ones((1, 3), np.int64),
            C.POSITION_IDS: np.array([[0, 1, 2]])}
    for entry in meta["caches"].values():
        feed.update({n: np.zeros((1, meta["num_key_value_heads"], 0, meta["head_dim"]), np.float32)
                     for n in entry["inputs"]})
    dense = session.run([C.LOGITS], {**feed, C.TOP_K: np.array(0)})[0]
    sparse = session.run([C.LOGITS], {**feed, C.TOP_K: np.array(1)})[0]
    clamped = session.run([C.LOGITS], {**feed, C.TOP_K: np.array(99)})[0]
    assert np.abs(dense - sparse).max() > 1e-3
    np.testing.assert_allclose(clamped, dense, atol=1e-6)  # clamped to n = dense


# ----------------------------------------------------------------------------------------- structure
def _initializer_bytes(path: str) -> int:
    model = onnx.load(path)
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma2"])
def test_weights_are_stored_once(name):
    """Untied and tied embeddings (qwen3, gemma2): the graph stores each parameter once (a tied embedding
    would otherwise be stored as the lookup table and as lm_head's transpose)."""
    params = sum(p.numel() * p.element_size() for p in eager(name).parameters())  # a tied weight counts once
    stored = _initializer_bytes(exported(name))
    assert abs(stored - params) <= 0.10 * params, (stored, params)


def _matmuls(path: str) -> int:
    return sum(n.op_type == "MatMul" for n in onnx.load(path).graph.node)


def test_scaling_pass_lora_only_when_its_value_is_nonzero():
    assert _matmuls(exported("llama-scalingpass")) > _matmuls(exported("llama"))


def _column_layouts(name: str) -> int:
    """Distinct sets of (expert, rank) over the wrapped modules: each costs one gate expansion per pass."""
    from xlora_export.xlora_utils import load_model

    model = load_model(checkpoint(name))[0]
    return len({(tuple(layer.expert_names), tuple(layer.ranks)) for layer in model.lora_layers()})


def test_matmul_count_does_not_grow_with_experts():
    """Per module one down and one up matmul whatever the number of experts; the gates expand once per pass
    per column layout, not once per module."""
    two, four = _matmuls(exported("llama-2experts")), _matmuls(exported("llama-4experts"))
    assert four - two == _column_layouts("llama-4experts") - _column_layouts("llama-2experts"), (two, four)


def test_external_data_is_written_and_loaded():
    path = exported("llama-external")
    assert os.path.getsize(path + ".data") > 0.9 * _initializer_bytes(path)
    assert os.path.getsize(path) < 0.5 * os.path.getsize(path + ".data")


def test_default_graph_passes_the_tensorrt_check():
    assert check_tensorrt(onnx.load(exported("llama"))) == []
    assert check_tensorrt(onnx.load(C.frozen_path(exported("llama")))) == []


def _graph_with(node: onnx.NodeProto, extra_inputs=(), initializers=()) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    graph = helper.make_graph([node], "crafted", [x, *extra_inputs], [y], list(initializers))
    return helper.make_model(graph)


def _branch(name: str) -> onnx.GraphProto:
    out = helper.make_tensor_value_info(f"{name}_out", onnx.TensorProto.FLOAT, None)
    return helper.make_graph([helper.make_node("Identity", ["x"], [f"{name}_out"])], name, [], [out])


@pytest.mark.parametrize("kind", ["If", "Loop", "com.microsoft", "TopK-unsorted"])
def test_tensorrt_check_flags_crafted_graphs(kind):
    cond = helper.make_tensor_value_info("c", onnx.TensorProto.BOOL, [])
    if kind == "If":
        model = _graph_with(helper.make_node("If", ["c"], ["y"], then_branch=_branch("a"), else_branch=_branch("b")),
                            [cond])
    elif kind == "Loop":
        body = helper.make_graph(
            [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Identity", ["x"], ["v"])],
            "body", [helper.make_tensor_value_info("i", onnx.TensorProto.INT64, []),
                     helper.make_tensor_value_info("cond_in", onnx.TensorProto.BOOL, [])],
            [helper.make_tensor_value_info("cond_out", onnx.TensorProto.BOOL, []),
             helper.make_tensor_value_info("v", onnx.TensorProto.FLOAT, None)])
        trip = numpy_helper.from_array(np.array(2, np.int64), "trip")
        model = _graph_with(helper.make_node("Loop", ["trip", "c"], ["y"], body=body), [cond], [trip])
    elif kind == "com.microsoft":
        model = _graph_with(helper.make_node("FusedMatMul", ["x", "x"], ["y"], domain="com.microsoft"))
    else:
        k = numpy_helper.from_array(np.array([2], np.int64), "k")
        model = _graph_with(helper.make_node("TopK", ["x", "k"], ["y", "idx"], sorted=0), initializers=[k])
    findings = check_tensorrt(model)
    assert findings, f"{kind} was not flagged"
    assert any(kind.split("-")[0] in (f.op_type + " " + f.reason) for f in findings) or kind == "com.microsoft"
    if kind == "com.microsoft":
        assert "com.microsoft" in findings[0].reason


# ----------------------------------------------------------------------------------------- precision
def test_fp16_export_agrees_with_fp32_eager_greedy():
    """On a recipe with clearly peaked logits (a trained base); documented tolerance: see README."""
    folder = built("tiny-llama-trained")
    path = os.path.join(EXPORTS, "trained16.onnx")
    report = export(folder, path, ExportOptions(dtype="fp16"))
    assert report.parity["main"].max_diff[C.LOGITS] < 5e-2  # fp16 graph vs fp16 eager
    model = xlora.xlora_utils.load_model(folder)[0]
    prompt = [5, 17, 99, 230, 41]
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=16, eos_token_id=None)[0, 5:].tolist()
        ref_logits = model(torch.tensor([prompt + reference[:-1]])).logits[0, 4:]
    [result] = Generator(XLoraSession(path)).generate([prompt], max_new_tokens=16, stop_token_ids=[],
                                                      return_logits=True)
    assert result.tokens == reference
    assert max_diff(torch.from_numpy(result.logits), ref_logits) < 2e-2  # measured 4.5e-3


def test_fp16_validation_variant_runs_each_weight_through_its_own_identity(tmp_path):
    """The exporter's fp16 validation graph (`fp16_weights_per_use`): every fp16 initializer feeds only
    Identity nodes, one per use (so ONNX Runtime's CPU provider casts each use separately), and it computes
    exactly what the exported graph computes."""
    source = os.path.join(EXPORTS, "trained16.onnx")
    if not os.path.isfile(source):
        export(built("tiny-llama-trained"), source, ExportOptions(dtype="fp16", validate=False))
    variant = os.path.join(EXPORTS, ".validate.trained16.onnx")
    uses = fp16_weights_per_use(source, variant)
    try:
        proto = onnx.load(variant)
        fp16 = {t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
        consumers = [n for n in proto.graph.node if set(n.input) & fp16]
        assert uses >= len(fp16) > 10 and len(consumers) == uses
        assert {n.op_type for n in consumers} == {"Identity"}
        meta = metadata(source)
        feed = {C.INPUT_IDS: np.array([[5, 6, 7]]), C.ATTENTION_MASK: np.ones((1, 3), np.int64),
                C.POSITION_IDS: np.array([[0, 1, 2]]), C.TOP_K: np.array(0)}
        feed.update({n: np.zeros((1, meta["num_key_value_heads"], 0, meta["head_dim"]), np.float16)
                     for entry in meta["caches"].values() for n in entry["inputs"]})
        expected = open_graph(source, lean=True).run(None, feed)
        for got, want in zip(open_graph(variant, lean=True).run(None, feed), expected):
            np.testing.assert_array_equal(got, want)
    finally:
        os.remove(variant)


def test_bf16_export_says_validation_was_skipped():
    path = os.path.join(EXPORTS, "bf16.onnx")
    report = export(checkpoint("llama"), path, ExportOptions(dtype="bf16"))
    assert "bf16" in report.validation_skipped and "CPU" in report.validation_skipped
    onnx.checker.check_model(path)
    weights = [t for t in onnx.load(path).graph.initializer if "lm_head.weight" in t.name]
    assert weights and weights[0].data_type == onnx.TensorProto.BFLOAT16


# ----------------------------------------------------------------------------------------- CLI and safety
def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_exports_validates_and_reports(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    code, stdout, _ = _run([built("tiny-llama"), out, "--frozen-scalings"], capsys)
    assert code == 0
    assert "parity (main graph vs eager" in stdout and "parity (frozen graph vs eager" in stdout
    assert "TensorRT readiness: nothing flagged" in stdout
    # both graphs reference one weights file
    assert sorted(os.listdir(tmp_path)) == ["m.frozen.onnx", "m.onnx", "m.onnx.data", "m.tokenizer.json"]
    code, _, err = _run([built("tiny-llama"), out], capsys)  # exists, no --force
    assert code == 1 and "already exists" in err and "--force" in err
    code, _, _ = _run([built("tiny-llama"), out, "--force", "-q"], capsys)
    assert code == 0 and sorted(os.listdir(tmp_path)) == ["m.onnx", "m.tokenizer.json"]  # stale frozen removed


def test_help_documents_every_option():
    parser = cli.build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, action.dest


def _tiny_other_base(folder: str, kind: str) -> str:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if kind == "gpt2":
        GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100)).save_pretrained(folder)
    else:
        LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=48, vocab_size=100)
                         ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["not-a-model-dir", "base-missing", "base-mismatched", "unsupported-arch",
                                  "output-folder-missing", "output-is-a-directory"])
def test_cli_bad_inputs(case, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    argv = [built("tiny-llama"), out]
    match = {"not-a-model-dir": "not an X-LoRA checkpoint", "base-missing": "not a local folder",
             "base-mismatched": "hidden_size", "unsupported-arch": "unsupported architecture",
             "output-folder-missing": "does not exist", "output-is-a-directory": "is a directory"}[case]
    if case == "not-a-model-dir":
        (tmp_path / "empty").mkdir()
        argv[0] = str(tmp_path / "empty")
    elif case == "base-missing":
        ckpt = tmp_path / "ckpt"
        shutil.copytree(built("tiny-llama"), ckpt, ignore=shutil.ignore_patterns("base"))
        argv[0] = str(ckpt)
    elif case in ("base-mismatched", "unsupported-arch"):
        argv += ["--base-model", _tiny_other_base(str(tmp_path / "other"), "gpt2" if "arch" in case else "llama")]
    elif case == "output-folder-missing":
        argv[1] = str(tmp_path / "nowhere" / "m.onnx")
    else:
        os.mkdir(out)
    code, _, err = _run(argv, capsys)
    assert code == 1
    assert err.startswith("xlora-export: error:") and match in err and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert not os.path.isfile(out)


def test_validation_failure_leaves_no_file(tmp_path, capsys, monkeypatch):
    """Corrupt one weight as it is written: validation must fail and nothing may be left behind."""
    from xlora_export.onnx_passes import WeightStore

    original = WeightStore.tensor

    def corrupting_tensor(self, name, value):
        return original(self, name, value * 1.01 if "lm_head.weight" in name else value)

    monkeypatch.setattr(WeightStore, "tensor", corrupting_tensor)
    out = str(tmp_path / "m.onnx")
    code, _, err = _run([built("tiny-llama"), out, "--frozen-scalings"], capsys)
    assert code == 1 and "validation failed" in err and "logits" in err
    assert os.listdir(tmp_path) == []


def test_interrupted_export_leaves_no_file(tmp_path, capsys, monkeypatch):
    import xlora_export.export as export_module

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "compare_with_reference", interrupt)
    out = str(tmp_path / "m.onnx")
    code, _, err = _run([built("tiny-llama"), out], capsys)
    assert code == 130 and "not written" in err
    assert os.listdir(tmp_path) == []


def test_export_from_a_peft_checkpoint_matches(tmp_path):
    """MODEL_DIR may be a PEFT X-LoRA checkpoint (complete classifier): the export validates."""
    from safetensors.torch import save_file

    from helpers import peft_oracle

    model = make_xlora("tiny-llama", seed=5)
    oracle = peft_oracle(model, "tiny-llama")
    ckpt = tmp_path / "peft"
    oracle.save_pretrained(str(ckpt))
    state = {f"base_model.internal_xlora_classifier.{k}": v.contiguous()
             for k, v in oracle.base_model.internal_xlora_classifier.state_dict().items()}
    save_file(state, str(ckpt / "adapter_model.safetensors"), metadata={"format": "pt"})
    report = export(str(ckpt), str(tmp_path / "p.onnx"),
                    ExportOptions(base_model=os.path.join(built("tiny-llama"), "base")))
    assert report.parity["main"].max_diff[C.LOGITS] < 1e-4


# ----------------------------------------------------------------------------------------- validation at scale
def test_one_negated_expert_fails_validation(tmp_path, capsys, monkeypatch):
    """A wrong graph (expert 'beta' with its B negated in one module) is refused with the default tolerances."""
    from xlora_export.onnx_passes import WeightStore

    original = WeightStore.tensor

    def negating_tensor(self, name, value):
        wrong = "layers.0.self_attn.o_proj.lora_B" in name  # only beta targets o_proj
        return original(self, name, -value if wrong else value)

    monkeypatch.setattr(WeightStore, "tensor", negating_tensor)
    code, _, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx")], capsys)
    assert code == 1 and "validation failed" in err
    assert os.listdir(tmp_path) == []


def test_validation_covers_every_top_k_and_releases_the_eager_model(tmp_path, monkeypatch):
    import gc
    import weakref

    import xlora_export.export as export_module

    seen, alive = [], []
    original_reference, original_open = export_module.eager_reference, export_module.open_graph

    def recording_reference(model, top_k, steps, frozen=False, prompts=None, fixed=None):
        seen.append((top_k, frozen))
        recording_reference.model = weakref.ref(model)
        return original_reference(model, top_k, steps, frozen, prompts, fixed)

    def checking_open(path, *args, **kwargs):
        gc.collect()
        alive.append(recording_reference.model() is not None)
        return original_open(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "eager_reference", recording_reference)
    monkeypatch.setattr(export_module, "open_graph", checking_open)
    export(built("tiny-llama"), str(tmp_path / "m.onnx"), ExportOptions(frozen_scalings=True))
    assert sorted(seen) == sorted([(k, f) for k in range(4) for f in (False, True)])
    assert alive == [False, False], "the eager model was still alive when a graph was opened"


def test_tolerances_scale_with_logits_and_model_size():
    from xlora_export.validate import size_factor, tolerance

    assert tolerance("fp32", C.LOGITS, 1.0) == 1e-4  # the floor
    assert tolerance("fp32", C.LOGITS, 30.0) == pytest.approx(1.5e-3)  # 5e-5 x the largest |logit|
    assert tolerance("fp32", C.SCALINGS, 30.0, size_factor(2, 64)) == 1e-5
    assert size_factor(22, 2048) == pytest.approx(33.7, abs=0.1)  # TinyLlama-1.1B: 3.4e-4 for the scalings
    assert tolerance("fp16", C.LOGITS, 20.0) == pytest.approx(0.1)
    # past TinyLlama-1.1B's size the logits' floor grows with the square root of the size factor (Mistral-7B: x1.37)
    assert tolerance("fp16", C.LOGITS, 1.0, size_factor(22, 2048)) == 5e-2
    assert tolerance("fp16", C.LOGITS, 1.0, size_factor(32, 4096)) == pytest.approx(6.86e-2, rel=1e-2)
    assert tolerance("fp16", C.LOGITS, 30.0, size_factor(32, 4096)) == pytest.approx(0.15)  # relative above it


def test_greedy_token_flip_is_caught_unless_within_tolerance():
    """The graph's greedy token must be the eager one where the eager margin exceeds the logits tolerance."""
    from xlora_export.validate import compare_with_reference, eager_reference

    model = eager("llama")
    reference = eager_reference(model, 0, 2)

    class Flipping:
        """Returns the real graph's outputs with two vocabulary entries swapped in the last-position logits."""

        def __init__(self, session, margin):
            self.session, self.margin = session, margin

        def run(self, names, feed):
            outs = self.session.run(names, feed)
            logits = outs[0]
            last = logits[:, -1]
            top = last.argmax(-1)
            for row, t in enumerate(top):
                last[row, t] -= self.margin  # the eager favourite loses `margin`: another token wins
            return outs

    from xlora_runtime.session import open_graph

    session = open_graph(exported("llama"))
    spec = model.spec
    clear = compare_with_reference(reference, Flipping(session, 5.0), spec.num_layers, spec.kv_heads, spec.head_dim)
    assert clear.token_mismatches > 0
    honest = compare_with_reference(reference, session, spec.num_layers, spec.kv_heads, spec.head_dim)
    assert honest.token_mismatches == 0


def test_logits_after_the_graph_keeps_other_experts_are_not_compared():
    """Top-k is discontinuous: where the graph's scalings rank near-tied experts the other way, its logits may
    differ legitimately. Simulated by a graph whose classifier is zeroed (all-equal scalings: top-1 keeps
    expert 0 everywhere) against the real eager model: no logits are compared from the first position where
    the eager model keeps another expert; scalings still are (and differ). Without top-k nothing is skipped."""
    from xlora_export.validate import compare_with_reference, eager_reference
    from xlora_runtime.session import open_graph

    model = eager("llama")
    spec = model.spec
    zeroed = os.path.join(EXPORTS, "llama-zero-classifier")
    if not os.path.isfile(zeroed + ".onnx"):
        clone = xlora.xlora_utils.load_model(checkpoint("llama"))[0]
        with torch.no_grad():
            for p in clone.internal_xlora_classifier.parameters():
                p.zero_()
        clone.save_pretrained(zeroed)
        export(zeroed, zeroed + ".onnx", ExportOptions(validate=False))
    session = open_graph(zeroed + ".onnx")
    dims = spec.num_layers, spec.kv_heads, spec.head_dim
    top1 = compare_with_reference(eager_reference(model, 1, 2), session, *dims)
    assert top1.skipped_positions > 0 and top1.max_diff[C.SCALINGS] > 0.01
    dense = compare_with_reference(eager_reference(model, 0, 2), session, *dims)
    assert dense.skipped_positions == 0 and dense.max_diff[C.LOGITS] > 1e-3  # the zeroed graph differs


def test_hiding_the_weights_from_shape_inference_changes_nothing(tmp_path, monkeypatch):
    """The exporter's shape inference sees no weight values (a speed-up at 1B scale): the graph is the same."""
    import contextlib

    import xlora_export.export as export_module

    options = ExportOptions(validate=False, frozen_scalings=True)
    export(built("tiny-qwen3"), str(tmp_path / "fast.onnx"), options)
    monkeypatch.setattr(export_module, "_weights_kept_from_shape_inference", contextlib.nullcontext)
    export(built("tiny-qwen3"), str(tmp_path / "plain.onnx"), options)
    for name in ("{}.onnx", "{}.frozen.onnx"):
        graphs = []
        for kind in ("fast", "plain"):
            graph = onnx.load(str(tmp_path / name.format(kind)), load_external_data=False).graph
            for init in graph.initializer:  # the weights file is named after each export
                for entry in init.external_data:
                    entry.value = "" if entry.key == "location" else entry.value
            graphs.append(graph.SerializeToString())
        assert graphs[0] == graphs[1]


def test_atol_scalings_is_applied(tmp_path, capsys):
    """--atol-scalings overrides the scalings tolerance (a user's way out at scales the defaults misjudge)."""
    code, _, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx"), "--atol-scalings", "1e-12"], capsys)
    assert code == 1 and "output 'scalings'" in err and "tolerance 1e-12" in err
    code, _, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx"), "--atol-scalings", "0"], capsys)
    assert code == 2 and "argument --atol-scalings: expected a positive number, got 0" in err


def test_a_greedy_token_flip_fails_the_export(tmp_path, capsys, monkeypatch):
    import xlora_export.export as export_module

    original = export_module.compare_with_reference

    def flipping(*args, **kwargs):
        result = original(*args, **kwargs)
        result.token_mismatches = 1
        return result

    monkeypatch.setattr(export_module, "compare_with_reference", flipping)
    code, _, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx")], capsys)
    assert code == 1 and "chose another greedy token than the eager model" in err
    assert os.listdir(tmp_path) == []
