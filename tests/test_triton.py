"""`xlora-triton`: the Triton model repository. Its config is parsed against Triton's own schema
(`tritonclient`'s `model_config_pb2`), its implicit state lists every past/present pair in the contract's order
(not name-sorted, and immune to Triton's sorted-index pairing: triton-inference-server/server#8586), and the
served copy of the graph reproduces the exported graph: a sequence's first request (START=1, state fed
uninitialized with each variable dimension 1, as Triton does) equals the prefill with empty caches, a later one
(START=0, the previous presents as state) equals the decode step."""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import onnxruntime as ort
import pytest

from helpers import exported
from xlora_runtime import XLoraError
from xlora_runtime.format import contract as C
from xlora_runtime.format.record import CacheSpec, GraphInfo
from xlora_runtime.serve.triton import START, check_state_pairs, main, model_config, write_repository

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (in the test extra) holds Triton's config schema")
text_format = pytest.importorskip("google.protobuf.text_format")


def _parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_config_parses_against_the_schema(backend):
    record = GraphInfo.read(exported("tiny-llama"))
    config = _parse(model_config(record, "xlora", backend, max_sequences=8, gpu=True))
    assert config.name == "xlora" and config.max_batch_size == 0
    assert (config.platform, config.backend) == (("tensorrt_plan", "") if backend == "tensorrt" else
                                                 ("", "onnxruntime"))
    inputs = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input}
    assert inputs == {C.INPUT_IDS: ("TYPE_INT64", [-1, -1]), C.ATTENTION_MASK: ("TYPE_INT64", [-1, -1]),
                      C.POSITION_IDS: ("TYPE_INT64", [-1, -1]), C.TOP_K: ("TYPE_INT64", [1])}
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {C.LOGITS: [-1, -1, record.vocab_size], C.SCALINGS: [-1, -1, record.n_modules, record.n_experts]}
    batching = config.sequence_batching
    assert batching.oldest.max_candidate_sequences == 8
    [control] = batching.control_input
    assert control.name == START and control.control[0].kind == model_config_pb2.ModelSequenceBatching.Control.Kind.\
        Value("CONTROL_SEQUENCE_START") and list(control.control[0].int32_false_true) == [0, 1]
    n = record.num_layers
    assert [(s.input_name, s.output_name) for s in batching.state] == list(zip(
        C.past_names(n) + C.past_names(n, True), C.present_names(n) + C.present_names(n, True)))
    for state in batching.state:
        assert model_config_pb2.DataType.Name(state.data_type) == "TYPE_FP32"
        assert list(state.dims) == [-1, record.kv_heads, -1, record.head_dim]
    [group] = config.instance_group
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(group.kind) == "KIND_GPU"
    assert list(group.profile) == (["0", "1"] if backend == "tensorrt" else [])


def test_state_order_is_the_contracts_not_sorted():
    """With 12 layers the contract order (2 before 10) differs from sorted order: the config keeps the contract's,
    and the names still pair correctly under Triton's sorted-index mapping."""
    real = CacheSpec(inputs=C.past_names(12), shape=[C.BATCH, 4, C.PAST_SEQUENCE, 64], dtype="float16")
    record = dataclasses.replace(GraphInfo.read(exported("tiny-llama")), num_layers=12, caches={"real": real})
    config = _parse(model_config(record, "big", "onnxruntime", gpu=False))
    names = [s.input_name for s in config.sequence_batching.state]
    assert names == C.past_names(12) + C.past_names(12, True) and names != sorted(names)
    assert model_config_pb2.DataType.Name(config.sequence_batching.state[0].data_type) == "TYPE_FP16"
    assert model_config_pb2.ModelInstanceGroup.Kind.Name(config.instance_group[0].kind) == "KIND_CPU"
    check_state_pairs(list(zip(names, [s.output_name for s in config.sequence_batching.state])))


def test_state_pairs_guard_refuses_names_triton_would_swap():
    """Negative control: the pair of triton-inference-server/server#8586, whose output names sort the other way
    round."""
    with pytest.raises(XLoraError, match=r"^state cache_last_channel_next would be fed back as cache_last_channel_len "
                                         r"instead of cache_last_channel: Triton pairs states by their "
                                         r"name-sorted positions \(triton-inference-server/server#8586\)$"):
        check_state_pairs([("cache_last_channel", "cache_last_channel_next"),
                           ("cache_last_channel_len", "cache_last_channel_len_next")])


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    written = write_repository(exported("tiny-llama"), str(repo))
    return repo, written


def _feeds(n: int, ids: np.ndarray, mask: np.ndarray, pasts: dict[str, np.ndarray], top_k: int) -> dict:
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -ids.shape[1]:]
    return {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask, C.POSITION_IDS: positions, **pasts,
            C.TOP_K: np.array(top_k, np.int64)}


def test_served_graph_reproduces_the_export(repository):
    repo, written = repository
    served_path = str(repo / "xlora" / "1" / "model.onnx")
    assert sorted(os.path.relpath(p, repo) for p in written) == sorted([
        "xlora/1/model.onnx", "xlora/1/tiny-llama.onnx.data", "xlora/config.pbtxt", "xlora/tokenizer.json"])
    original = ort.InferenceSession(exported("tiny-llama"), providers=["CPUExecutionProvider"])
    served = ort.InferenceSession(served_path, providers=["CPUExecutionProvider"])
    config = _parse((repo / "xlora" / "config.pbtxt").read_text())
    served_inputs = {i.name: i for i in served.get_inputs()}
    assert {i.name for i in config.input} | {START} | {s.input_name for s in config.sequence_batching.state} == \
        set(served_inputs)
    assert served_inputs[C.TOP_K].shape == [1] and served_inputs[START].type == "tensor(int32)"
    assert {o.name for o in config.output} | {s.output_name for s in config.sequence_batching.state} == \
        {o.name for o in served.get_outputs()}

    n = 2
    names = C.past_names(n) + C.past_names(n, True)
    rng = np.random.default_rng(0)
    ids = np.array([[0, 0, 5, 17, 99], [300, 22, 9, 41, 8], [0, 12, 250, 14, 140]], np.int64)
    mask = (ids != 0).astype(np.int64)
    empty = {name: np.zeros((3, 2, 0, 16), np.float32) for name in names}
    garbage = {name: rng.normal(size=(1, 2, 1, 16)).astype(np.float32) * 1e3 for name in names}  # Triton's first
    want = original.run(None, _feeds(n, ids, mask, empty, 2))
    got = served.run(None, {**_feeds(n, ids, mask, garbage, 0), C.TOP_K: np.array([2], np.int64),
                            START: np.array([1], np.int32)})
    for a, b in zip(want, got):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6
    presents = dict(zip(names, want[2:]))
    step_ids = want[0][:, -1].argmax(-1)[:, None]
    step_mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
    want = original.run(None, _feeds(n, step_ids, step_mask, presents, 2))
    got = served.run(None, {**_feeds(n, step_ids, step_mask, presents, 0), C.TOP_K: np.array([2], np.int64),
                            START: np.array([0], np.int32)})
    for a, b in zip(want, got):
        assert a.shape == b.shape and np.abs(a - b).max() <= 1e-6


def test_xlora_triton_command(tmp_path, capsys):
    path = exported("tiny-llama")
    assert main([path, str(tmp_path), "--name", "m", "--cpu"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'm' / 'config.pbtxt'}" in out
    assert "KIND_CPU" in (tmp_path / "m" / "config.pbtxt").read_text()
    cases = [
        ([path, str(tmp_path), "--name", "m"], f"{tmp_path / 'm'} already exists (use --force to overwrite)"),
        ([path, str(tmp_path / "none")], f"{tmp_path / 'none'}: not a folder (create the repository folder first)"),
        ([C.frozen_path(path), str(tmp_path)], f"{C.frozen_path(path)}: this is the frozen-scalings graph; give the "
                                               f"main graph (OUT.onnx)"),
        ([path, str(tmp_path), "--name", "t", "--backend", "tensorrt", "--cpu"], "--backend tensorrt runs on a GPU: "
                                                                                 "drop --cpu"),
    ]
    for argv, message in cases:
        assert main(argv) == 1
        assert capsys.readouterr().err == f"xlora-triton: error: {message}\n", argv
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        assert main([path, str(tmp_path), "--name", "t", "--backend", "tensorrt"]) == 1
        assert capsys.readouterr().err.startswith("xlora-triton: error: xlora-engine needs TensorRT 10 or 11")
        assert not (tmp_path / "t").exists()
    assert main([path, str(tmp_path), "--max-sequences", "0"]) == 2


def test_xlora_triton_without_onnx_is_one_line(tmp_path, capsys, monkeypatch):
    """The runtime installs without onnx; xlora-triton, which writes the served graph with it (the `triton`
    extra), says so in one line and writes nothing."""
    path = exported("tiny-llama")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` raises ImportError
    assert main([path, str(tmp_path), "--cpu"]) == 1
    assert capsys.readouterr().err == ('xlora-triton: error: xlora-triton writes the served graph with the onnx '
                                       'package: pip install "xlora-runtime[triton]"\n')
    assert os.listdir(tmp_path) == []
