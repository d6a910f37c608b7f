"""The demo served by a real Triton Inference Server (`tritonserver` 2.51 from the nvidia-pytriton wheel, in a venv
of its own: tests/triton_server.py) from the repository `xlora-triton --backend python` writes.

The oracle is the runtime's own greedy generation in this process (what `xlora-generate` answers), on held-out
questions of the demo's four tasks. Checked: `generate` answers the same text and tokens; `generate_stream`
streams the same tokens, one event each; 8 concurrent streamed requests each equal their solo answer; a 3-turn
conversation over gRPC with one sequence id reuses its caches (the cached token counts) and equals the cold
answers; bad requests get one-line errors and the server goes on serving; the onnxruntime repository's config
passes the server's own checks up to the backend it lacks; the server stops by its PID and leaves nothing in
/dev/shm.
"""

from __future__ import annotations

import json
import os
import queue
import threading
from functools import cache

import httpx
import numpy as np
import pytest
import tokenizers
from triton_server import TritonServer, server_env, shm_regions

from helpers import BUILD_ROOT, exported
from models.demo import TASKS, eval_set, plain_prompt
from models.demo_eval import DEFAULT_MODEL
from xlora_runtime import Generator, XLoraSession
from xlora_runtime.format import contract as C
from xlora_runtime.serve.triton import write_repository

grpcclient = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (in the test extra) is the client")

MAX_TOKENS = 24
PROMPTS = [plain_prompt(q) for task in TASKS for q, _ in eval_set(task, 2, seed=5)]  # 8 held-out questions


@cache
def demo_graph() -> str:
    """The demo exported once per test session, under a name of this module's own."""
    from xlora_export.export import ExportOptions, export

    folder = os.path.join(BUILD_ROOT, "exports")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "xlora-demo-triton.onnx")
    export(DEFAULT_MODEL, path, ExportOptions(frozen_scalings=True, validate=False))
    return path


@pytest.fixture(scope="module")
def python_env():
    try:
        return server_env()
    except RuntimeError as e:
        pytest.skip(f"the nvidia-pytriton wheel cannot be installed here: {e}")


@pytest.fixture(scope="module")
def server(python_env, tmp_path_factory):
    repo = tmp_path_factory.mktemp("repo")
    write_repository(demo_graph(), str(repo), backend="python", threads=1,
                     engine_limits={"max_batch": 16})
    before = shm_regions()
    s = TritonServer(str(repo), python_env)
    s.shm_before = before
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oracle():
    """(text, tokens) of each prompt, greedy, as xlora-generate answers."""
    gen = Generator(XLoraSession(demo_graph(), threads=1))
    return {p: (r.text, r.tokens) for p, r in zip(PROMPTS, gen.generate(PROMPTS, max_new_tokens=MAX_TOKENS))}


def _generate(server, body: dict, model: str = "xlora") -> httpx.Response:
    return httpx.post(f"http://{server.http}/v2/models/{model}/generate", json=body, timeout=120)


def _stream(server, body: dict) -> list[dict]:
    """The events of one generate_stream request."""
    events = []
    with httpx.stream("POST", f"http://{server.http}/v2/models/xlora/generate_stream", json=body,
                      timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    return events


def test_generate_equals_xlora_generate(server, oracle):
    for prompt in PROMPTS:
        response = _generate(server, {"text_input": prompt, "max_tokens": MAX_TOKENS})
        assert response.status_code == 200, response.text
        answer = response.json()
        assert (answer["text_output"], answer["output_ids"]) == (oracle[prompt][0], oracle[prompt][1]), prompt
        assert answer["finish_reason"] in ("stop_token", "length") and answer["prompt_tokens"] > 0


def test_generate_stream_sends_one_token_per_event(server, oracle):
    prompt = PROMPTS[0]
    events = _stream(server, {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True,
                              "return_scalings": True})
    assert all("error" not in e for e in events), events
    tokens = [e for e in events if "output_ids" in e]
    assert [e["output_ids"] for e in tokens] == oracle[prompt][1]  # one id each (a one-element array: a number)
    assert "".join(e["text_output"] for e in tokens) == oracle[prompt][0]
    scalings = np.array(tokens[0]["scalings"]).reshape(-1, 4)  # (1, modules, 4 experts), flattened in JSON
    assert len(scalings) > 1 and np.allclose(scalings.sum(-1), 1, atol=1e-4)
    assert "finish_reason" in tokens[-1] and all("finish_reason" not in e for e in tokens[:-1])


def test_eight_concurrent_streams_equal_their_solo_answers(server, oracle):
    results: dict[str, list[dict]] = {}

    def run(prompt: str) -> None:
        results[prompt] = _stream(server, {"text_input": prompt, "max_tokens": MAX_TOKENS, "stream": True})

    threads = [threading.Thread(target=run, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert len(results) == 8
    for prompt, events in results.items():
        assert [e["output_ids"] for e in events if "output_ids" in e] == oracle[prompt][1], prompt


def test_frozen_scalings_equal_xlora_generates(server):
    """freeze_scalings_after reaches the engine as xlora-generate's option: the same tokens and scalings, which
    stop changing once frozen (the frozen graph), where the two-pass graph's keep moving."""
    gen = Generator(XLoraSession(demo_graph(), threads=1))
    options = {"max_new_tokens": 8, "stop_token_ids": []}
    for prompt, frozen, free in zip(PROMPTS[2:4], gen.generate(PROMPTS[2:4], freeze_scalings_after=2, **options),
                                    gen.generate(PROMPTS[2:4], **options)):
        answer = _generate(server, {"text_input": prompt, "max_tokens": 8, "ignore_eos": True,
                                    "return_scalings": True, "freeze_scalings_after": 2}).json()
        scalings = np.array(answer["scalings"], np.float32).reshape(frozen.scalings.shape)
        assert answer["output_ids"] == frozen.tokens and np.abs(scalings - frozen.scalings).max() <= 1e-5
        assert np.array_equal(scalings[-1], scalings[-2]) and not np.array_equal(free.scalings[-1], free.scalings[-2])


def _grpc_turn(client, text: str, sequence_id: int, start: bool, end: bool) -> dict:
    """One streamed turn of a conversation on the sequence model: its tokens and last response's counts."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        text_input = grpcclient.InferInput("text_input", [1], "BYTES")
        text_input.set_data_from_numpy(np.array([text.encode()], dtype=object))
        stream = grpcclient.InferInput("stream", [1], "BOOL")
        stream.set_data_from_numpy(np.array([True]))
        limit = grpcclient.InferInput("max_tokens", [1], "INT32")
        limit.set_data_from_numpy(np.array([MAX_TOKENS], np.int32))
        client.async_stream_infer("xlora_sequence", [text_input, stream, limit], sequence_id=sequence_id,
                                  sequence_start=start, sequence_end=end, enable_empty_final_response=True)
        turn = {"ids": [], "cached": None}
        while True:
            result, error = answers.get(timeout=120)
            assert error is None, error
            if result.as_numpy("output_ids") is not None:
                turn["ids"] += result.as_numpy("output_ids").tolist()
            if result.as_numpy("cached_tokens") is not None:
                turn["cached"] = int(result.as_numpy("cached_tokens")[0])
            if result.get_response().parameters["triton_final_response"].bool_param:
                return turn
    finally:
        client.stop_stream()


def test_a_conversation_over_grpc_reuses_its_caches_and_equals_the_cold_answers(server):
    tokenizer = tokenizers.Tokenizer.from_file(C.tokenizer_path(demo_graph()))
    turns = [PROMPTS[0], " " + PROMPTS[3], " " + PROMPTS[5]]
    client = grpcclient.InferenceServerClient(server.grpc)
    history: list[int] = []
    for i, text in enumerate(turns):
        turn = _grpc_turn(client, text, 77, start=i == 0, end=i == len(turns) - 1)
        prompt = history + tokenizer.encode_batch([text], add_special_tokens=not history)[0].ids
        assert turn["cached"] == (len(history) - 1 if history else 0), i  # all but the last token: no recompute
        cold = _generate(server, {"input_ids": prompt, "max_tokens": MAX_TOKENS}).json()
        assert turn["ids"] == cold["output_ids"] and cold["cached_tokens"] == 0, i
        history = prompt + turn["ids"]
    again = _grpc_turn(client, turns[1], 77, start=True, end=True)  # the ended sequence's id, a new conversation
    assert again["cached"] == 0


@pytest.mark.parametrize("body, message", [
    ({"max_tokens": 4}, "give one of text_input or input_ids"),
    ({"text_input": "hi", "input_ids": [1, 2], "max_tokens": 4}, "give one of text_input or input_ids"),
    ({"text_input": "hi", "expert_top_k": 99}, "expert_top_k=99: expected an int in 0..4 (0 = dense)"),
    ({"text_input": "hi", "max_tokens": 0}, "max_tokens=0: expected an int >= 1"),
    ({"input_ids": [10 ** 6]}, "prompt"),
])
def test_bad_requests_get_errors_and_the_server_goes_on(server, oracle, body, message):
    response = _generate(server, body)
    assert response.status_code == 400 and message in response.json()["error"], response.text
    good = _generate(server, {"text_input": PROMPTS[1], "max_tokens": MAX_TOKENS}).json()
    assert good["output_ids"] == oracle[PROMPTS[1]][1]


def test_the_server_stops_by_its_pid_and_leaves_no_shared_memory(server):
    assert shm_regions() - server.shm_before  # the stubs' regions while it serves
    assert server.stop() == 0
    assert not shm_regions() - server.shm_before


def test_the_onnxruntime_repository_passes_the_servers_config_checks(python_env, tmp_path):
    """Without its backend (not in the wheel), the server still parses the onnxruntime repository's config and
    checks its sequence batcher's controls (--disable-auto-complete-config): it fails on the missing backend only
    (a START control without its values fails earlier, on the config)."""
    write_repository(exported("tiny-llama"), str(tmp_path), name="graph", gpu=False)
    s = TritonServer(str(tmp_path), python_env, "--disable-auto-complete-config", ready=False)
    try:
        assert s.wait(120) != 0
    finally:
        s.stop()
    log = s.output()
    assert "failed to load 'graph'" in log and "unable to find backend library for backend 'onnxruntime'" in log, \
        log[-3000:]
