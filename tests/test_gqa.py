"""`xlora-export --attention gqa`: attention as ONNX Runtime's GroupQueryAttention, and the runtime's in-place
caches for it.

Oracles: the exporter's own validation against the eager model (every family: windows, soft-capping, QK norms,
partial RoPE), the eager model's greedy decoding (`parity.eager_greedy`) for the runtime writing the caches in
place, across buffer growth, and the plain-ONNX graph of the same checkpoint through the runtime for what the
eager model has no direct counterpart of (rows frozen at different steps, the server's merges).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from functools import cache

import numpy as np
import onnx
import pytest

import xlora_export as xlora
from helpers import built, exported
from xlora_export import cli
from xlora_export.export import ExportOptions, export
from xlora_export.parity import eager_greedy
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.format import contract as C
from xlora_runtime.kv_cache import CacheGroup

EXPORTS = tempfile.mkdtemp(prefix="xlora-test-gqa-")
PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])  # left padding: three lengths
STEPS = 70  # 7 + 70 positions: past the first buffer's 64, so the buffers grow once
ATOL_LOGITS, ATOL_SCALINGS = 1e-4, 1e-5


@cache
def gqa_graph(name: str) -> str:
    """The recipe exported with --attention gqa and both graphs; the export's validation must pass."""
    path = os.path.join(EXPORTS, f"{name}.onnx")
    report = export(built(name), path, ExportOptions(frozen_scalings=True, attention=C.ATTENTION_GQA))
    assert report.validation_skipped is None and set(report.parity) == {"main", "frozen"}
    return path


def _results(session: XLoraSession, **options) -> list:
    return Generator(session).generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[], return_logits=True,
                                       **options)


def _max_diff(results: list, reference: np.ndarray, field: str) -> float:
    return max(float(np.abs(getattr(r, field) - reference[i]).max()) for i, r in enumerate(results))


# ----------------------------------------------------------------------------------------------- the graph
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2",
                                  "tiny-gemma3", "tiny-phi3"])
def test_every_family_exports_and_validates_with_group_query_attention(name):
    """One GroupQueryAttention per layer and pass replaces the attention ops, two RotaryEmbedding nodes the RoPE
    ops; the export validated against the eager model (left padding, sliding windows, soft-capping: the mask
    reaches it as an additive bias; partial RoPE, RoPE per layer type, QK norms)."""
    path = gqa_graph(name)
    layers = xlora.xlora_utils.load_model(built(name))[0].config.num_hidden_layers
    for graph, passes in ((path, 2), (C.frozen_path(path), 1)):
        proto = onnx.load(graph, load_external_data=False)
        gqa = [n for n in proto.graph.node if n.op_type == "GroupQueryAttention"]
        assert len(gqa) == layers * passes and {n.domain for n in gqa} == {C.ORT_DOMAIN}
        rope = [n for n in proto.graph.node if n.op_type == "RotaryEmbedding"]  # q and k, ONNX Runtime's
        assert len(rope) == 2 * layers * passes and {n.domain for n in rope} == {C.ORT_DOMAIN}
        assert not [n for n in proto.graph.node if n.op_type == "Neg"]  # no rotate_half left
        record = next(p.value for p in proto.metadata_props if p.key == C.METADATA_KEY)
        assert f'"attention": "{C.ATTENTION_GQA}"' in record
        assert [i.name for i in proto.graph.input] == C.input_names(layers, graph != path)  # the same contract


# ----------------------------------------------------------------------------------------------- the runtime
@pytest.fixture(scope="module")
def eager() -> xlora.xLoRAModel:
    return xlora.xlora_utils.load_model(built("tiny-llama"))[0].eval()


@pytest.mark.parametrize("top_k", [0, 2])
def test_in_place_caches_equal_the_eager_model(eager, top_k):
    """Batch of 3 left-padded prompts, 70 steps (the buffers grow past 64 positions): same greedy tokens, logits
    and scalings as the eager model's cached decoding."""
    session = XLoraSession(gqa_graph("tiny-llama"), threads=1)
    assert session.main.in_place
    results = _results(session, expert_top_k=top_k)
    tokens, logits, scalings = eager_greedy(eager, list(PROMPTS), STEPS, top_k)
    assert [r.tokens for r in results] == tokens.tolist()
    assert _max_diff(results, logits, "logits") < ATOL_LOGITS
    assert _max_diff(results, scalings, "scalings") < ATOL_SCALINGS


def test_frozen_rows_equal_the_plain_graph():
    """Rows frozen at different steps move to the frozen graph with their buffers (gathered rows, the frozen
    graph writing in place too): the tokens and logits of the plain-ONNX export through the runtime."""
    options = dict(expert_top_k=2, freeze_scalings_after=[2, 40, None])
    session = XLoraSession(gqa_graph("tiny-llama"), threads=1)
    assert session.frozen.in_place
    results = _results(session, **options)
    plain = _results(XLoraSession(exported("tiny-llama"), threads=1), **options)
    assert [r.tokens for r in results] == [r.tokens for r in plain]
    assert _max_diff(results, np.array([r.logits for r in plain]), "logits") < ATOL_LOGITS


def test_the_buffers_are_written_in_place_and_grow_by_doubling():
    """Each step binds every past buffer as its present too: the same OrtValues before and after, their
    positions beyond `length` untouched; a step that does not fit doubles the capacity once."""
    session = XLoraSession(gqa_graph("tiny-llama"), threads=1)
    group = CacheGroup(session, np.arange(1))
    prompt = np.array([[5, 17, 99, 230, 41]])
    group.run(prompt, np.ones_like(prompt), np.arange(5)[None], 0)
    assert (group.length, group.capacity) == (5, 64)
    buffers = dict(group.pasts)
    before = buffers[C.past_names(1)[0]].numpy()
    group.run(np.array([[7]]), np.ones((1, 6), np.int64), np.array([[5]]), 0)
    assert all(group.pasts[name] is value for name, value in buffers.items())
    after = group.pasts[C.past_names(1)[0]].numpy()
    assert after.shape == (1, session.info.kv_heads, 64, session.info.head_dim)
    np.testing.assert_array_equal(after[:, :, :5], before[:, :, :5])  # the held positions stay
    assert np.abs(after[:, :, 5]).max() > 0 and not after[:, :, 6:].any()  # one new position written
    per_position = session.info.kv_heads * session.info.head_dim * 4
    assert group.nbytes() == 4 * session.info.num_layers * 64 * per_position  # buffers count their capacity
    for step in range(6, 64):
        group.run(np.array([[7]]), np.ones((1, step + 1), np.int64), np.array([[step]]), 0)
    assert (group.length, group.capacity) == (64, 64) and group.pasts[C.past_names(1)[0]] is buffers[
        C.past_names(1)[0]]
    group.run(np.array([[7]]), np.ones((1, 65), np.int64), np.array([[64]]), 0)
    assert (group.length, group.capacity) == (65, 128)
    group.release()


def test_the_generator_allocates_the_buffers_once(monkeypatch):
    """The Generator knows the final length: one allocation of exactly the positions the graph sees (prompt width
    + new tokens - 1), no doubling; its peak cache bytes are those buffers."""
    session = XLoraSession(gqa_graph("tiny-llama"), threads=1)
    sizes = []
    resize = session.backend.resize
    monkeypatch.setattr(session.backend, "resize", lambda t, n, c: sizes.append(c) or resize(t, n, c))
    generator = Generator(session)
    generator.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[])
    info = session.info
    positions = max(map(len, PROMPTS)) + STEPS - 1
    assert set(sizes) == {positions} and len(sizes) == 4 * info.num_layers  # each buffer once, real + scaling
    assert generator.peak_cache_bytes == 4 * info.num_layers * len(PROMPTS) * positions * info.kv_heads * \
        info.head_dim * 4


def test_the_server_merges_rows_of_an_in_place_graph():
    """Requests arriving at different times through the continuous-batching scheduler (left padding on either
    side of each merge, rows leaving at different steps): each gets the tokens of the plain graph alone."""
    from xlora_runtime.serve.scheduler import RequestSpec, Scheduler

    rng = np.random.default_rng(3)
    lengths, max_tokens = (3, 20, 7, 12, 1, 9), (30, 10, 25, 33, 8, 20)
    prompts = [rng.integers(3, 380, n).tolist() for n in lengths]
    plain = Generator(XLoraSession(exported("tiny-llama"), threads=1))
    expected = [plain.generate([p], max_new_tokens=m, stop_token_ids=[])[0].tokens for p, m in zip(prompts, max_tokens)]
    scheduler = Scheduler(XLoraSession(gqa_graph("tiny-llama"), threads=1))
    scheduler.start()
    loop = asyncio.new_event_loop()
    try:
        handles = []
        for p, m in zip(prompts, max_tokens):
            handles += scheduler.submit([RequestSpec(p, max_tokens=m, ignore_eos=True)], loop)
            time.sleep(0.01)

        async def tokens() -> list[list[int]]:
            async def one(handle) -> list[int]:
                return [out.token async for out in handle]

            return await asyncio.gather(*(one(h) for h in handles))

        got = loop.run_until_complete(tokens())
    finally:
        loop.close()
        scheduler.stop()
    assert got == expected


# ----------------------------------------------------------------------------------------------- refusals
def test_other_engines_refuse_a_gqa_graph():
    with pytest.raises(XLoraError, match=r"tiny-llama\.onnx: exported with --attention gqa \(ONNX Runtime's "
                                         r"GroupQueryAttention\); provider 'openvino' cannot run it: use cpu, cuda or "
                                         r"tensorrt \(ONNX Runtime\), or export with --attention onnx$"):
        XLoraSession(gqa_graph("tiny-llama"), provider="openvino")
    from xlora_runtime.engine import build_engines

    with pytest.raises(XLoraError, match=r"tiny-llama\.onnx: exported with --attention gqa \(ONNX Runtime's "
                                         r"GroupQueryAttention\), which TensorRT's parser does not read"):
        build_engines(gqa_graph("tiny-llama"), os.path.join(EXPORTS, "x.engine"), {})


def test_multi_token_steps_after_a_past_run_one_row_at_a_time():
    """ONNX Runtime's GroupQueryAttention refuses batch > 1 with several new tokens after a past (the runtime's
    own paths never do that: prefills start at 0, resumed sessions are single rows): a one-line error first."""
    session = XLoraSession(gqa_graph("tiny-llama"), threads=1)
    group = CacheGroup(session, np.arange(2))
    ids = np.array([[5, 17, 99], [4, 8, 15]])
    group.run(ids, np.ones_like(ids), np.tile(np.arange(3), (2, 1)), 0)
    with pytest.raises(XLoraError, match=r"tiny-llama\.onnx: a step of 2 tokens for 2 rows after 3 positions; ONNX "
                                         r"Runtime's GroupQueryAttention \(--attention gqa\) runs steps of several "
                                         r"tokens after a past one row at a time$"):
        group.run(ids[:, :2], np.ones((2, 5), np.int64), np.tile(np.arange(3, 5), (2, 1)), 0)
    single = group.take(np.array([True, False]))  # one row: allowed
    out = single.run(ids[:1, :2], np.ones((1, 5), np.int64), np.arange(3, 5)[None], 0)
    assert out.last_logits.shape == (1, session.info.vocab_size) and single.length == 5
    group.release()
    single.release()


def test_attention_option_of_the_cli(tmp_path, capsys):
    assert cli.main([built("tiny-llama"), str(tmp_path / "bad.onnx"), "--attention", "flash"]) == 2
    assert "argument --attention: invalid choice: 'flash' (choose from 'onnx', 'gqa')" in capsys.readouterr().err
    with pytest.raises(XLoraError, match=r"^--attention 'flash': expected one of onnx, gqa$"):
        export(built("tiny-llama"), str(tmp_path / "bad.onnx"), ExportOptions(attention="flash"))
    assert not os.listdir(tmp_path)
    # the summary: one line for the 4 GroupQueryAttention nodes (2 layers x 2 passes) TensorRT would not parse
    # (and one for the 8 RotaryEmbedding nodes, one for the 8 SkipSimplifiedLayerNormalization nodes: the residual
    # add into the next norm, twice per layer and pass)
    assert cli.main([built("tiny-llama"), str(tmp_path / "g.onnx"), "--attention", "gqa", "--no-validate"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT readiness: 20 finding(s):\n" in out
    assert [line for line in out.splitlines() if line.startswith("  GroupQueryAttention")] == [
        "  GroupQueryAttention 4 nodes (/model/GroupQueryAttention, ...): custom domain 'com.microsoft' (not an ONNX "
        "standard op)"]
