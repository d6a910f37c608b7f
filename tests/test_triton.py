"""`xlora-triton`: the Triton model repository. Its config is parsed against Triton's own schema
(`tritonclient`'s `model_config_pb2`), its implicit state lists every past/present pair in the contract's order
(not name-sorted, and immune to Triton's sorted-index pairing: triton-inference-server/server#8586), and the
served copy of the graph reproduces the exported graph: a sequence's first request (START=1, state fed
uninitialized with each variable dimension 1, as Triton does) equals the prefill with empty caches, a later one
(START=0, the previous presents as state) equals the decode step."""

from __future__ import annotations

import dataclasses
import os
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest

from helpers import exported
from xlora_runtime import XLoraError
from xlora_runtime.format import contract as C
from xlora_runtime.format.record import CacheSpec, GraphInfo
from xlora_runtime.profiles import limits_for, select_profile
from xlora_runtime.serve.triton import main, write_repository
from xlora_runtime.serve.triton.config import check_state_pairs, model_config, served_profiles
from xlora_runtime.serve.triton.graph import START, graph_io

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2",
                                       reason="tritonclient[grpc] (in the test extra) holds Triton's config schema")
text_format = pytest.importorskip("google.protobuf.text_format")


def _parse(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.fixture(scope="module")
def repository(tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    written = write_repository(exported("tiny-llama"), str(repo))
    return repo, written


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_config_parses_against_the_schema(repository, backend):
    """Every dims entry is the served graph's own: Triton's onnxruntime backend compares output dims exactly, so
    the last-position logits are [-1, 1, V], not [-1, -1, V]."""
    repo, _ = repository
    record = GraphInfo.read(exported("tiny-llama"))
    inputs, outputs = graph_io(str(repo / "xlora" / "1" / "model.onnx"))
    config = _parse(model_config(record, inputs, outputs, "xlora", backend, max_sequences=8, gpu=True))
    assert config.name == "xlora" and config.max_batch_size == 0
    assert (config.platform, config.backend) == (("tensorrt_plan", "") if backend == "tensorrt" else
                                                 ("", "onnxruntime"))
    inputs = {i.name: (model_config_pb2.DataType.Name(i.data_type), list(i.dims)) for i in config.input}
    assert inputs == {C.INPUT_IDS: ("TYPE_INT64", [-1, -1]), C.ATTENTION_MASK: ("TYPE_INT64", [-1, -1]),
                      C.POSITION_IDS: ("TYPE_INT64", [-1, -1]), C.TOP_K: ("TYPE_INT64", [1])}
    outputs = {o.name: list(o.dims) for o in config.output}
    assert outputs == {C.LOGITS: [-1, 1, record.vocab_size], C.SCALINGS: [-1, -1, record.n_modules, record.n_experts]}
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
    pasts, presents = C.past_names(12) + C.past_names(12, True), C.present_names(12) + C.present_names(12, True)
    inputs = {C.INPUT_IDS: (7, [-1, -1]), **{name: (10, [-1, 4, -1, 64]) for name in pasts}}
    outputs = {C.LOGITS: (10, [-1, 1, 512]), **{name: (10, [-1, 4, -1, 64]) for name in presents}}
    config = _parse(model_config(record, inputs, outputs, "big", "onnxruntime", gpu=False))
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


def _feeds(n: int, ids: np.ndarray, mask: np.ndarray, pasts: dict[str, np.ndarray], top_k: int) -> dict:
    positions = np.clip(mask.cumsum(-1) - 1, 0, None)[:, -ids.shape[1]:]
    return {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask, C.POSITION_IDS: positions, **pasts,
            C.TOP_K: np.array(top_k, np.int64)}


def _first_request_state(names: list[str], fill: float) -> dict[str, np.ndarray]:
    """The states of a sequence's first request as Triton feeds them: every variable dimension 1, memory never
    written (here: `fill`, NaN included)."""
    return {name: np.full((1, 2, 1, 16), fill, np.float32) for name in names}


@pytest.mark.parametrize("fill", [np.nan, 1e30])
def test_served_graph_reproduces_the_export(repository, fill):
    """A first request (START=1, Triton's one-position uninitialized states) equals the prefill with empty caches,
    a later one (START=0, the previous presents as states, the client's mask over its real positions) equals the
    decode step; the presents carry one dead position in front of the export's."""
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
    ids = np.array([[0, 0, 5, 17, 99], [300, 22, 9, 41, 8], [0, 12, 250, 14, 140]], np.int64)
    mask = (ids != 0).astype(np.int64)
    real = mask.astype(bool)
    empty = {name: np.zeros((3, 2, 0, 16), np.float32) for name in names}
    want = original.run(None, _feeds(n, ids, mask, empty, 2))
    got = served.run(None, {**_feeds(n, ids, mask, _first_request_state(names, fill), 0),
                            C.TOP_K: np.array([2], np.int64), START: np.array([1], np.int32)})
    _assert_same(want, got, real)
    states = dict(zip(names, got[2:]))
    step_ids = want[0][:, -1].argmax(-1)[:, None]
    step_mask = np.concatenate([mask, np.ones((3, 1), np.int64)], 1)
    want = original.run(None, _feeds(n, step_ids, step_mask, dict(zip(names, want[2:])), 2))
    got = served.run(None, {**_feeds(n, step_ids, step_mask, states, 0), C.TOP_K: np.array([2], np.int64),
                            START: np.array([0], np.int32)})
    _assert_same(want, got, step_mask.astype(bool))


def _assert_same(want: list[np.ndarray], got: list[np.ndarray], real: np.ndarray) -> None:
    """logits equal; scalings equal at the real positions of this step; presents equal at every real position,
    behind one dead position of zeros."""
    assert want[0].shape == got[0].shape and np.abs(want[0] - got[0]).max() <= 1e-5
    new = real[:, -want[1].shape[1]:]
    assert want[1].shape == got[1].shape and np.abs(want[1] - got[1])[new].max() <= 1e-5
    for a, b in zip(want[2:], got[2:]):
        assert b.shape == (a.shape[0], a.shape[1], a.shape[2] + 1, a.shape[3])
        assert np.isfinite(b).all() and np.abs(a - b[:, :, 1:]).transpose(0, 2, 1, 3)[real].max() <= 1e-5


# Inputs of ONNX operators that set an output's shape (or which elements exist), by operator.
_SHAPE_INPUTS = {"Slice": (1, 2, 3, 4), "Reshape": (1,), "Expand": (1,), "Tile": (1,), "ConstantOfShape": (0,),
                 "Range": (0, 1, 2), "TopK": (1,), "Pad": (1, 2), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,),
                 "Resize": (2, 3), "OneHot": (1,), "NonZero": (0,), "Compress": (1,), "Trilu": (1,),
                 "CenterCropPad": (1,), "Upsample": (1,)}


def test_no_shape_of_the_served_graph_depends_on_a_control_input(repository):
    """START reaches values only, never a shape: TensorRT would otherwise need it as a shape tensor (and pin it
    to one value when no profile gives its values). Walks the graph: what START's value flows into (Shape cuts
    the flow) reaches no shape-setting input."""
    onnx = pytest.importorskip("onnx")
    repo, _ = repository
    graph = onnx.load(str(repo / "xlora" / "1" / "model.onnx"), load_external_data=False).graph
    tainted = {START}
    for node in graph.node:  # graph order is topological
        hits = [i for i, name in enumerate(node.input) if name in tainted]
        if not hits:
            continue
        shaping = set(hits) & set(_SHAPE_INPUTS.get(node.op_type, ()))
        assert not shaping, f"{node.name} ({node.op_type}) takes a shape from START through input {sorted(shaping)}"
        if node.op_type not in ("Shape", "Size"):
            tainted.update(node.output)
    assert len(tainted) > 1 + 2 * 4  # START reached the masked states (the walk ran)


def test_served_profiles_hold_tritons_first_request_and_decode_steps(repository):
    """The tensorrt repository's engine profiles hold a first request (states of one row and one position, as
    Triton fills them) and the decode steps after it; the served graph runs at every corner of both (TensorRT
    builds the network at min, opt and max)."""
    repo, _ = repository
    record = GraphInfo.read(exported("tiny-llama"))
    profiles = served_profiles(record, limits_for(record, max_batch=3, max_sequence=6, max_total=12))
    names = C.past_names(2) + C.past_names(2, True)

    def shapes(rows, new, state_rows, state_positions, mask):
        return {C.INPUT_IDS: (rows, new), C.POSITION_IDS: (rows, new), C.ATTENTION_MASK: (rows, mask),
                **{name: (state_rows, 2, state_positions, 16) for name in names}}

    assert select_profile(profiles, shapes(3, 6, 1, 1, 6)) == 0  # a prompt of 6 tokens in 3 rows
    assert select_profile(profiles, shapes(3, 1, 3, 7, 7)) == 1  # its first decode step: dead + 6 real positions
    assert select_profile(profiles, shapes(2, 1, 2, 12, 12)) == 1  # the last position the limits allow
    with pytest.raises(XLoraError, match="no optimization profile"):
        select_profile(profiles, shapes(3, 6, 1, 0, 6))  # a zero-length state: never fed by Triton
    served = ort.InferenceSession(str(repo / "xlora" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    for index, profile in enumerate(profiles):
        for corner in range(3):
            feeds = {name: np.zeros(profile[name][corner], np.float32 if name in names else np.int64)
                     for name in profile}
            feeds[C.ATTENTION_MASK][:] = 1
            feeds.update({C.TOP_K: np.array([0], np.int64), START: np.array([1 - index], np.int32)})
            logits = served.run([C.LOGITS], feeds)[0]
            assert logits.shape == (feeds[C.INPUT_IDS].shape[0], 1, record.vocab_size), (index, corner)


def test_python_repository(tmp_path):
    """--backend python: the export as it is under its own names, the engine model (decoupled, no sequence
    batcher, the provider and threads as parameters) and the conversation model relaying to it, both parsed with
    Triton's schema; model.py imports the runtime's classes."""
    path = exported("tiny-llama")
    written = write_repository(path, str(tmp_path), name="m", backend="python", threads=2, provider="cpu",
                               engine_limits={"max_batch": 8})
    assert sorted(os.path.relpath(p, tmp_path) for p in written) == sorted([
        "m/1/tiny-llama.onnx", "m/1/tiny-llama.onnx.data", "m/1/tiny-llama.frozen.onnx",
        "m/1/tiny-llama.tokenizer.json", "m/1/model.py", "m/config.pbtxt", "m_sequence/1/model.py",
        "m_sequence/config.pbtxt", "m/tokenizer.json"])
    engine = _parse((tmp_path / "m" / "config.pbtxt").read_text())
    assert (engine.backend, engine.model_transaction_policy.decoupled, engine.HasField("sequence_batching")) == \
        ("python", True, False)
    assert {k: v.string_value for k, v in engine.parameters.items()} == {
        "graph": "tiny-llama.onnx", "provider": "cpu", "max_batch": "8", "threads": "2"}
    assert all(i.optional for i in engine.input) and {"text_input", "input_ids", "session_id"} <= \
        {i.name for i in engine.input}
    relay = _parse((tmp_path / "m_sequence" / "config.pbtxt").read_text())
    assert relay.parameters["engine"].string_value == "m" and relay.sequence_batching.oldest.max_candidate_sequences
    assert [c.name for c in relay.sequence_batching.control_input] == ["START", "END"]
    assert "session_id" not in {i.name for i in relay.input}
    assert "EngineModel as TritonPythonModel" in (tmp_path / "m" / "1" / "model.py").read_text()
    assert "ConversationModel as TritonPythonModel" in (tmp_path / "m_sequence" / "1" / "model.py").read_text()
    with pytest.raises(XLoraError, match=r"m_sequence already exists"):
        shutil.rmtree(tmp_path / "m")
        write_repository(path, str(tmp_path), name="m", backend="python")


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
