"""xlora-serve: real HTTP clients against a real server process on 127.0.0.1.

The oracle is the runtime's own `Generator` serving each request alone (itself exact against the eager model,
test_runtime.py): whatever the batch does (requests joining and leaving between steps, left-padded merges, several
top_k and frozen groups at once, sessions' kept caches), every request must get the tokens it gets alone. Chat
prompts are checked against transformers' `apply_chat_template`. Traffic goes to loopback only, bounded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from functools import cache

import httpx
import numpy as np
import pytest

from helpers import BUILD_ROOT, built, exported
from xlora_export.export import ExportOptions, chat_template, export
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.format import contract as C
from xlora_runtime.kv_cache import CacheGroup

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_ROOT = os.path.join(ROOT, "runtime")
# A template in the common style: bos once, role headers, eos after each turn, a generation prompt, a refusal.
TEMPLATE = ("{{ bos_token }}{% for message in messages %}"
            "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
            "{{ raise_exception('unknown role ' + message['role']) }}{% endif %}"
            "<|{{ message['role'] }}|>\n{{ message['content'] | trim }}{{ eos_token }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
CONVERSATION = [{"role": "system", "content": "the model mixes experts"},
                {"role": "user", "content": "what does the classifier read?"}]


# ----------------------------------------------------------------------------------------------- fixtures
@cache
def chat_checkpoint() -> str:
    """tiny-llama with a chat template in its tokenizer config (the recipes have none)."""
    folder = os.path.join(BUILD_ROOT, "tiny-llama-chat")
    if not os.path.isdir(folder):
        shutil.copytree(built("tiny-llama"), folder)
        config_path = os.path.join(folder, "base", "tokenizer_config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["chat_template"] = TEMPLATE
        with open(config_path, "w") as f:
            json.dump(config, f)
    return folder


@cache
def chat_graph() -> str:
    folder = os.path.join(BUILD_ROOT, "exports")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "tiny-llama-chat.onnx")
    export(chat_checkpoint(), path, ExportOptions(frozen_scalings=True, validate=False))
    return path


@cache
def generator() -> Generator:
    return Generator(XLoraSession(chat_graph(), threads=1))


def solo(prompt, max_tokens: int, **options) -> list[int]:
    """The oracle: the request alone through the runtime's Generator."""
    [result] = generator().generate([prompt], max_new_tokens=max_tokens, **options)
    return result.tokens


class ServerProcess:
    """`python -m xlora_runtime.serve.cli GRAPH --port 0 ...` as a child process; its URL from the ready line."""

    def __init__(self, graph: str, *options: str) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [RUNTIME_ROOT, os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen([sys.executable, "-m", "xlora_runtime.serve.cli", graph, "--port", "0",
                                         "--threads", "1", *options], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True, env=env)
        line = self.process.stdout.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+) ", line)
        if match is None:
            self.process.kill()
            raise RuntimeError(f"the server did not start: {line}{self.process.stdout.read()[-3000:]}")
        self.url = match.group(1)
        self.client = httpx.Client(base_url=self.url, timeout=60)
        deadline = time.monotonic() + 60
        while True:  # the engine starts with the app
            try:
                if self.client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server never became healthy"
            time.sleep(0.05)

    def metric(self, name: str) -> float:
        text = self.client.get("/metrics").text
        match = re.search(rf"^{re.escape(name)} ([-+0-9.e]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def close(self) -> None:
        self.client.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def server():
    """The main server: the chat-template graph, room for every test's traffic."""
    s = ServerProcess(chat_graph(), "--max-batch", "16", "--max-queue", "16")
    yield s
    s.close()


@pytest.fixture(scope="module")
def small_server():
    """A graph without chat template, one row at a time and one waiting: overflow and refusals."""
    s = ServerProcess(exported("tiny-llama"), "--max-batch", "1", "--max-queue", "1", "--session-cache-mb", "0",
                      "--model-name", "small")
    yield s
    s.close()


def complete(server: ServerProcess, prompt, max_tokens: int, **body) -> dict:
    body.setdefault("temperature", 0)
    xlora = body.pop("xlora", {})
    response = server.client.post("/v1/completions", json=dict(
        prompt=prompt, max_tokens=max_tokens, xlora=dict(return_token_ids=True, **xlora), **body))
    assert response.status_code == 200, response.text
    return response.json()


def tokens(response: dict, i: int = 0) -> list[int]:
    return response["choices"][i]["xlora"]["token_ids"]


def sse(response: httpx.Response) -> list:
    """The events of a server-sent event stream (JSON objects, and the final "[DONE]")."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


# ----------------------------------------------------------------------------------------------- the caches
@pytest.mark.parametrize("provider", ["cpu", "openvino"])
def test_left_padding_and_trimming_keep_a_row_exact(provider):
    """CacheGroup.pad_left + zero mask columns give the logits of the unpadded group; slice_positions undoes it
    (each backend's `positions`)."""
    if provider == "openvino":
        pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install \"xlora-runtime[openvino]\")")
    session = generator().session if provider == "cpu" else XLoraSession(chat_graph(), provider=provider)
    prompt = np.array([[5, 17, 99, 230, 41]])
    outs = []
    for pad in (0, 3):
        group = CacheGroup(session, np.array([0]))
        group.run(prompt, np.ones_like(prompt), np.arange(5)[None], 0)
        group.pad_left(pad)
        assert group.length == 5 + pad
        mask = np.array([[0] * pad + [1] * 6])
        outs.append(group.run(np.array([[7]]), mask, np.array([[5]]), 0))
        if pad:
            group.slice_positions(pad)
            assert group.length == 6
            again = group.run(np.array([[9]]), np.ones((1, 7), np.int64), np.array([[6]]), 0)
            reference = CacheGroup(session, np.array([0]))
            reference.run(np.array([[5, 17, 99, 230, 41, 7]]), np.ones((1, 6), np.int64), np.arange(6)[None], 0)
            expected = reference.run(np.array([[9]]), np.ones((1, 7), np.int64), np.array([[6]]), 0)
            np.testing.assert_allclose(again.last_logits, expected.last_logits, atol=1e-5)
            reference.release()
        group.release()
    np.testing.assert_allclose(outs[1].last_logits, outs[0].last_logits, atol=1e-5)
    np.testing.assert_allclose(outs[1].scalings, outs[0].scalings, atol=1e-6)


# ----------------------------------------------------------------------------------------------- completions
def test_completion_equals_the_runtime_alone(server):
    response = complete(server, "the model mixes", 12)
    expected = generator().generate(["the model mixes"], max_new_tokens=12)[0]
    assert tokens(response) == expected.tokens
    choice = response["choices"][0]
    assert choice["text"] == expected.text and choice["finish_reason"] == "length"
    prompt_tokens = len(generator().encode("the model mixes")[0])
    assert response["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 12,
                                 "total_tokens": prompt_tokens + 12, "prompt_tokens_details": {"cached_tokens": 0}}
    assert response["object"] == "text_completion" and response["model"] == "tiny-llama-chat"


def test_eight_concurrent_requests_arriving_at_different_times_equal_their_solo_results(server):
    """Different prompt lengths and lengths of output, staggered arrivals: requests join a running batch (left
    padding on either side of the merge) and leave it at different steps; each gets its solo tokens."""
    rng = np.random.default_rng(12)
    lengths, max_tokens = (3, 30, 7, 12, 1, 25, 5, 17), (40, 10, 25, 33, 8, 20, 37, 15)
    prompts = [rng.integers(3, 380, n).tolist() for n in lengths]
    before = server.metric("xlora_decode_batch_rows_sum"), server.metric("xlora_decode_batch_rows_count")
    results: dict[int, list[int]] = {}

    def client(i: int) -> None:
        time.sleep(0.015 * i)
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/completions", json=dict(prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
                                                    ignore_eos=True, xlora=dict(return_token_ids=True)))
            results[i] = r.json()["choices"][0]["xlora"]["token_ids"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i in range(8):
        assert results[i] == solo(prompts[i], max_tokens[i], stop_token_ids=[]), f"request {i}"
    rows = server.metric("xlora_decode_batch_rows_sum") - before[0]
    steps = server.metric("xlora_decode_batch_rows_count") - before[1]
    assert rows > steps, "the requests never shared a decode step"


def test_several_prompts_in_one_request(server):
    prompts = [[5, 17, 99], [300, 22, 9, 41, 8]]
    response = complete(server, prompts, 6, ignore_eos=True)
    assert [c["index"] for c in response["choices"]] == [0, 1]
    assert [tokens(response, i) for i in range(2)] == [solo(p, 6, stop_token_ids=[]) for p in prompts]
    assert response["usage"]["prompt_tokens"] == 8 and response["usage"]["completion_tokens"] == 12


def test_sampling_with_a_seed_equals_the_runtime_alone(server):
    options = dict(temperature=0.8, top_p=0.9, seed=7)
    first = tokens(complete(server, [12, 250, 14], 16, ignore_eos=True, **options))
    assert first == solo([12, 250, 14], 16, stop_token_ids=[], do_sample=True, **options)
    assert tokens(complete(server, [12, 250, 14], 16, ignore_eos=True, **options)) == first
    assert tokens(complete(server, [12, 250, 14], 16, ignore_eos=True, **dict(options, seed=8))) != first


def test_stop_strings_end_the_text_before_them(server):
    free = complete(server, "the model mixes", 24, ignore_eos=True)["choices"][0]["text"]
    stop = free[8:10]  # a piece of the greedy text: the output must end before its first occurrence
    response = complete(server, "the model mixes", 24, ignore_eos=True, stop=[stop, "never appears"])
    choice = response["choices"][0]
    assert choice["text"] == free[:free.index(stop)] and choice["finish_reason"] == "stop"
    streamed = server.client.post("/v1/completions", json=dict(prompt="the model mixes", max_tokens=24, temperature=0,
                                                               ignore_eos=True, stop=stop, stream=True))
    events = sse(streamed)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == choice["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_xlora_options_in_one_batch(server):
    """expert_top_k, freeze_scalings_after and return_scalings, sent at once: a granular group per top_k and a
    frozen group run side by side; tokens and scalings are each request's own."""
    prompt = [5, 17, 99, 230, 41, 8, 77]
    cases = [dict(expert_top_k=1), dict(expert_top_k=2, freeze_scalings_after=3), dict(freeze_scalings_after=0),
             dict()]
    results: dict[int, dict] = {}

    def client(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as c:
            body = dict(prompt=prompt, max_tokens=10, temperature=0, ignore_eos=True,
                        xlora=dict(return_token_ids=True, return_scalings=True, **cases[i]))
            results[i] = c.post("/v1/completions", json=body).json()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for i, case in enumerate(cases):
        [expected] = generator().generate([prompt], max_new_tokens=10, stop_token_ids=[],
                                          expert_top_k=case.get("expert_top_k"),
                                          freeze_scalings_after=case.get("freeze_scalings_after"))
        extras = results[i]["choices"][0]["xlora"]
        assert extras["token_ids"] == expected.tokens, case
        np.testing.assert_allclose(np.array(extras["scalings"]), expected.scalings, atol=1e-5)
    info = generator().session.info
    assert results[0]["xlora"] == {"experts": info.expert_names, "modules": info.module_names}
    top = complete(server, prompt, 4, ignore_eos=True, xlora=dict(return_scalings="top", expert_top_k=2))
    full = complete(server, prompt, 4, ignore_eos=True, xlora=dict(return_scalings=True, expert_top_k=2))
    for ranked, scalings in zip(top["choices"][0]["xlora"]["top_experts"], full["choices"][0]["xlora"]["scalings"]):
        mean = np.array(scalings).mean(0)
        assert [e["expert"] for e in ranked] == [info.expert_names[j] for j in np.argsort(-mean)[:2]]
        np.testing.assert_allclose([e["weight"] for e in ranked], np.sort(mean)[::-1][:2], atol=1e-6)


def test_streaming_events(server):
    body = dict(prompt="the model mixes", max_tokens=10, temperature=0, ignore_eos=True,
                xlora=dict(return_token_ids=True, return_scalings="top"))
    whole = server.client.post("/v1/completions", json=body).json()
    streamed = dict(body, stream=True, stream_options=dict(include_usage=True))
    with server.client.stream("POST", "/v1/completions", json=streamed) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse(r)
    assert events[-1] == "[DONE]"
    usage, chunks = events[-2], events[:-2]
    assert usage["choices"] == [] and usage["usage"] == whole["usage"]
    assert [c["choices"][0]["xlora"]["token_ids"][0] for c in chunks] == tokens(whole)
    assert [c["choices"][0]["xlora"]["top_experts"][0] for c in chunks] == whole["choices"][0]["xlora"]["top_experts"]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 9 + ["length"]
    assert {c["id"] for c in chunks} == {usage["id"]} and chunks[0]["object"] == "text_completion"


# ----------------------------------------------------------------------------------------------- chat
def test_chat_template_renders_as_transformers_does():
    from transformers import AutoTokenizer

    from xlora_runtime.chat import ChatTemplate

    hf = AutoTokenizer.from_pretrained(os.path.join(chat_checkpoint(), "base"))
    template = ChatTemplate.of_session(generator().session)
    conversations = [CONVERSATION, CONVERSATION + [{"role": "assistant", "content": "the hidden state"},
                                                   {"role": "user", "content": "  and then?  "}]]
    for messages in conversations:
        for generation_prompt in (True, False):
            assert template.render(messages, generation_prompt) == hf.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation_prompt)
    with pytest.raises(XLoraError, match="^chat template: unknown role tool$"):
        template.render([{"role": "tool", "content": "x"}])


def test_the_export_carries_the_chat_template(tmp_path):
    info = generator().session.info
    assert info.files.chat_template == os.path.basename(C.chat_template_path(chat_graph()))
    with open(info.chat_template_path) as f:
        assert f.read() == TEMPLATE
    assert XLoraSession(exported("tiny-llama")).info.chat_template_path is None  # no template: no file
    folder = tmp_path / "tok"
    folder.mkdir()
    templates = [{"name": "default", "template": "d"}, {"name": "tool_use", "template": "t"}]
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": templates}))
    assert chat_template(str(folder)) == "d"
    (folder / "chat_template.jinja").write_text("j")  # transformers' separate file wins, as transformers reads it
    assert chat_template(str(folder)) == "j"


def test_bad_chat_template_in_the_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    with pytest.raises(XLoraError, match=r"tokenizer_config.json: chat_template: expected a string or a list of "):
        chat_template(str(tmp_path))


def test_chat_completion_equals_the_runtime_on_the_rendered_prompt(server):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.join(chat_checkpoint(), "base"))
    ids = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=False)
    response = server.client.post("/v1/chat/completions", json=dict(
        messages=CONVERSATION, max_tokens=10, temperature=0, xlora=dict(return_token_ids=True))).json()
    expected = generator().generate([list(ids)], max_new_tokens=10)[0]
    choice = response["choices"][0]
    assert choice["xlora"]["token_ids"] == expected.tokens
    assert choice["message"] == {"role": "assistant", "content": expected.text}
    assert response["object"] == "chat.completion" and response["usage"]["prompt_tokens"] == len(ids)
    with server.client.stream("POST", "/v1/chat/completions", json=dict(
            messages=CONVERSATION, max_tokens=10, temperature=0, stream=True)) as r:
        events = sse(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert events[0]["object"] == "chat.completion.chunk" and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == expected.text


def test_a_session_extends_its_kept_caches(server):
    """Turn 2 of a conversation with an x-session-id reuses turn 1's caches (cached_tokens > 0) and gets the
    tokens of a cold prefill (another session id: nothing kept)."""
    def chat(messages, session_id):
        return server.client.post("/v1/chat/completions", headers={"x-session-id": session_id}, json=dict(
            messages=messages, max_tokens=8, temperature=0, xlora=dict(return_token_ids=True))).json()

    first = chat(CONVERSATION, "conversation-1")
    assert first["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    turn2 = CONVERSATION + [{"role": "assistant", "content": first["choices"][0]["message"]["content"]},
                            {"role": "user", "content": "and the experts?"}]
    warm, cold = chat(turn2, "conversation-1"), chat(turn2, "conversation-2")
    assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > first["usage"]["prompt_tokens"] // 2
    assert cold["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert warm["choices"][0]["xlora"]["token_ids"] == cold["choices"][0]["xlora"]["token_ids"]
    assert server.metric("xlora_session_cache_bytes") > 0


def test_chat_without_a_template_is_a_clear_400(small_server):
    r = small_server.client.post("/v1/chat/completions", json=dict(messages=CONVERSATION))
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("model 'small' has no chat template (its tokenizer config had none when "
                                            "it was exported); use /v1/completions with a prompt")


# ----------------------------------------------------------------------------------------------- errors
BAD = [
    ("/v1/completions", b"{not json", "request body: not valid JSON ("),
    ("/v1/completions", [1, 2], "request body: expected a JSON object, got list"),
    ("/v1/completions", {"max_tokens": 4}, "prompt: missing (expected a string, a list of token ids, or a list "),
    ("/v1/completions", {"prompt": "x", "frobnicate": 1}, "unknown field 'frobnicate' for /v1/completions (known: "),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens=0: expected an int >= 1"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, "max_tokens='8': expected an int >= 1"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature=-1: expected a number >= 0 (0 = greedy)"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p=0: expected 0 < top_p <= 1"),
    ("/v1/completions", {"prompt": "x", "seed": -3}, "seed=-3: expected null or an int >= 0"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", ""]}, "stop=['a', '']: expected a string or a list of up to 4 "),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream='yes': expected true or false"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}},
     "stream_options: only allowed with stream: true"),
    ("/v1/completions", {"prompt": "x", "n": 17}, "n=17: expected an int in 1..16"),
    ("/v1/completions", {"prompt": "x", "best_of": 2}, "best_of=2: not supported by this server (only null or 1)"),
    ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs=6: expected null or an int in 0..5"),
    ("/v1/chat/completions", {"messages": CONVERSATION, "logprobs": True, "top_logprobs": 21},
     "top_logprobs=21: expected null or an int in 0..20"),
    ("/v1/completions", {"prompt": ""}, "prompt is empty"),
    ("/v1/completions", {"prompt": [5, 400]}, "prompt: token id 400 is outside the vocabulary 0..383"),
    ("/v1/completions", {"prompt": [[5], "x"]}, "prompt=[[5], 'x']: expected a string, a list of token ids, or a "),
    ("/v1/completions", {"prompt": list(range(3, 300))}, "prompt has 297 tokens; the model has 256 positions"),
    ("/v1/completions", {"prompt": "x", "xlora": {"expert_top_k": 4}}, "expert_top_k=4: expected an int in 0..3"),
    ("/v1/completions", {"prompt": "x", "xlora": {"freeze_scalings_after": -1}},
     "xlora.freeze_scalings_after=-1: expected null or an int >= 0"),
    ("/v1/completions", {"prompt": "x", "xlora": {"return_scalings": "all"}},
     "xlora.return_scalings='all': expected false, true (every expert) or \"top\""),
    ("/v1/completions", {"prompt": "x", "xlora": {"top_k": 1}}, "unknown field 'xlora.top_k' (known: "),
    ("/v1/completions", {"prompt": "x", "xlora": 3}, "xlora=3: expected an object with some of "),
    ("/v1/completions", {"prompt": "x", "model": 5}, "model=5: expected a string"),
    ("/v1/completions", {"prompt": "x", "ignore_eos": "no"}, "ignore_eos='no': expected true or false"),
    ("/v1/completions", {"prompt": "x", "stream": True, "stream_options": {"x": 1}},
     "stream_options={'x': 1}: expected {\"include_usage\": true or false, \"continuous_usage_stats\": true or "),
    ("/v1/completions", {"prompt": "x", "xlora": {"expert_top_k": "2"}},
     "xlora.expert_top_k='2': expected an int (0 = dense)"),
    ("/v1/completions", {"prompt": "x", "xlora": {"return_token_ids": 1}},
     "xlora.return_token_ids=1: expected true or false"),
    ("/v1/chat/completions", {"max_tokens": 3}, "messages: missing (expected a non-empty list of {role, content} "),
    ("/v1/chat/completions", {"messages": [5]}, "messages[0]=5: expected a {role, content} object"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     "messages[0].content[0].type='image_url': not supported by this server (text parts only)"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
     "messages[0].content: expected a string or a list of {type: \"text\", text} parts"),
    ("/v1/chat/completions", {"messages": []}, "messages=[]: expected a non-empty list of {role, content} objects"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]},
     "messages[0].content=5: expected a string"),
    ("/v1/chat/completions", {"messages": [{"content": "x"}]}, "messages[0].role=None: expected a string such as "),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "x"}]},
     "chat template: unknown role tool"),
]


@pytest.mark.parametrize("path, body, message", BAD, ids=[m.split(":")[0][:40] for _, _, m in BAD])
def test_bad_requests_are_400_with_a_json_error(server, path, body, message):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = server.client.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith(message), error["message"]
    assert "\n" not in error["message"]


def test_other_refusals_and_the_server_still_serves(server):
    r = server.client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "model 'gpt-4' is not served here (this server serves 'tiny-llama-chat')",
                                 "type": "invalid_request_error", "param": None, "code": "model_not_found"}
    assert server.client.get("/v1/nothing").status_code == 404 and "error" in server.client.get("/v1/nothing").json()
    assert server.client.get("/v1/completions").status_code == 405
    r = server.client.post("/v1/completions", json={"prompt": "x"}, headers={"x-session-id": "s" * 300})
    assert r.status_code == 400 and r.json()["error"]["message"] == "x-session-id header: expected 1 to 256 characters"
    assert len(tokens(complete(server, "the model mixes", 3, ignore_eos=True, model="tiny-llama-chat"))) == 3


def test_queue_overflow_is_429_with_retry_after(small_server):
    """One running (max batch 1), one waiting (max queue 1): the third is refused, the first two complete."""
    client = small_server.client
    body = dict(prompt=[5, 17, 99], max_tokens=200, temperature=0, ignore_eos=True, stream=True)
    with client.stream("POST", "/v1/completions", json=body) as running:
        lines = running.iter_lines()
        next(line for line in lines if line.startswith("data: "))  # running: its first token came
        waiting = threading.Thread(target=lambda: client.post("/v1/completions", json=dict(body, stream=False,
                                                                                           max_tokens=2)))
        waiting.start()
        deadline = time.monotonic() + 30
        while small_server.metric("xlora_queue_depth") < 1:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        r = client.post("/v1/completions", json=dict(body, stream=False))
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full" and r.json()["error"]["type"] == "rate_limit_error"
        events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    waiting.join(30)
    assert small_server.metric("xlora_requests_rejected_total") == 1
    assert small_server.client.post("/v1/completions", json=dict(body, stream=False, max_tokens=2)).status_code == 200


def post_and_hang_up(server: ServerProcess, body: dict) -> None:
    """POST `body` to /v1/completions over a raw socket and close it once the request's rows are decoding (the
    batch-size gauge above 0): a non-streamed client that disconnects."""
    host, port = server.url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        deadline = time.monotonic() + 30
        while server.metric("xlora_batch_size") == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)


def _wait_for_free_caches(server: ServerProcess, cancelled_before: float) -> None:
    deadline = time.monotonic() + 30
    while True:
        held = server.metric("xlora_kv_cache_bytes") - server.metric("xlora_session_cache_bytes")
        if held == 0 and server.metric("xlora_batch_size") == 0 and \
                server.metric("xlora_requests_cancelled_total") > cancelled_before:
            return
        assert time.monotonic() < deadline, f"{held} bytes of cache still held"
        time.sleep(0.05)


def test_a_client_that_disconnects_frees_its_caches(server):
    """Streaming: the connection closes after two chunks. Not streaming: the socket closes while it waits."""
    body = dict(prompt=[5, 17, 99], max_tokens=250, temperature=0, ignore_eos=True)
    cancelled = server.metric("xlora_requests_cancelled_total")
    with httpx.Client(base_url=server.url, timeout=30) as c, \
            c.stream("POST", "/v1/completions", json=dict(body, stream=True)) as r:
        chunks = (line for line in r.iter_lines() if line.startswith("data: "))
        next(chunks), next(chunks)
        assert server.metric("xlora_kv_cache_bytes") > 0
    _wait_for_free_caches(server, cancelled)
    cancelled = server.metric("xlora_requests_cancelled_total")
    post_and_hang_up(server, dict(body, prompt=[[5, 17, 99]] * 16))  # 16 rows: long enough to be cut
    _wait_for_free_caches(server, cancelled)


def test_models_health_and_metrics(server):
    complete(server, "the model mixes", 3)
    assert server.client.get("/health").json()["status"] == "ok"
    [model] = server.client.get("/v1/models").json()["data"]
    assert model["id"] == "tiny-llama-chat" and model["object"] == "model" and model["max_model_len"] == 256
    assert model["xlora"]["chat_template"] is True and model["xlora"]["experts"] == ["alpha", "beta", "gamma"]
    text = server.client.get("/metrics").text
    for name in ("xlora_requests_total", "xlora_generation_tokens_total", "xlora_prompt_tokens_total",
                 "xlora_queue_depth", "xlora_batch_size", "xlora_time_to_first_token_seconds_count",
                 "xlora_time_per_output_token_seconds_count", "xlora_kv_cache_bytes"):
        assert re.search(rf"^{name}(\{{[^}}]*\}})? ", text, re.M), name
    assert server.metric("xlora_time_to_first_token_seconds_count") >= 1
    assert server.metric("xlora_generation_tokens_total") >= 3
    assert 'xlora_requests_total{endpoint="/v1/completions",status="200"}' in text


# ----------------------------------------------------------------------------------------------- the Python API
def test_scheduler_and_server_refusals(monkeypatch):
    from xlora_runtime.chat import ChatTemplate
    from xlora_runtime.serve.app import Server, ServerConfig
    from xlora_runtime.serve.scheduler import RequestSpec, Scheduler

    session = generator().session
    with pytest.raises(XLoraError, match=r"^max_batch=0: expected an int >= 1$"):
        Scheduler(session, max_batch=0)
    with pytest.raises(XLoraError, match=r"^max_queue=-1: expected an int >= 0$"):
        Scheduler(session, max_queue=-1)
    with pytest.raises(XLoraError, match=r"^session cache -1.0 MB: expected a number >= 0$"):
        Server(ServerConfig(chat_graph(), session_cache_mb=-1.0))
    with pytest.raises(XLoraError, match=r"^max body 0 MB: expected a number > 0$"):
        Server(ServerConfig(chat_graph(), max_body_mb=0))
    with pytest.raises(XLoraError, match=r"^bad.jinja: not a valid Jinja chat template \(.+\)$"):
        ChatTemplate("{% for %}", {}, "bad.jinja")
    bare = XLoraSession(exported("tiny-llama"), threads=1)  # its tokenizer taken away
    monkeypatch.setattr(bare, "info", dataclasses.replace(bare.info, files=dataclasses.replace(bare.info.files,
                                                                                              tokenizer=None)))
    with pytest.raises(XLoraError, match=r"^stop: stop strings need the tokenizer, and none travelled with this "):
        Scheduler(bare).submit([RequestSpec([5, 6], stop=("x",))])
    server = Server(ServerConfig(exported("tiny-llama"), threads=1))
    server.session = bare
    with pytest.raises(XLoraError, match=r"^model 'tiny-llama': no tokenizer travelled with this export; send token "):
        server.encode("text")


def test_a_failing_graph_fails_the_requests_in_flight_and_the_engine_goes_on(monkeypatch):
    import asyncio

    from xlora_runtime.serve.scheduler import RequestSpec, Scheduler

    session = XLoraSession(chat_graph(), threads=1)
    scheduler = Scheduler(session)
    scheduler.start()
    try:
        run = CacheGroup.run
        monkeypatch.setattr(CacheGroup, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost")))
        loop = asyncio.new_event_loop()
        handles = scheduler.submit([RequestSpec([5, 6, 7], max_tokens=4), RequestSpec([8], max_tokens=4)], loop)
        errors = loop.run_until_complete(_outcomes(handles))
        assert [str(e) for e in errors] == ["generation failed (RuntimeError: device lost)"] * 2
        assert session.cache_bytes == 0
        monkeypatch.setattr(CacheGroup, "run", run)
        handles = scheduler.submit([RequestSpec([5, 6, 7], max_tokens=4, ignore_eos=True)], loop)
        assert loop.run_until_complete(_outcomes(handles)) == [solo([5, 6, 7], 4, stop_token_ids=[])]
        loop.close()
    finally:
        scheduler.stop()


async def _outcomes(handles) -> list:
    """Each handle's tokens, or the XLoraError it raised."""
    import asyncio

    async def one(handle):
        try:
            return [out.token async for out in handle]
        except XLoraError as e:
            return e

    return await asyncio.gather(*(one(h) for h in handles))


def test_stopping_the_engine_ends_the_requests_in_flight():
    import asyncio

    from xlora_runtime.serve.scheduler import RequestSpec, Scheduler

    scheduler = Scheduler(XLoraSession(chat_graph(), threads=1), max_batch=1)  # one runs, one waits
    scheduler.start()
    loop = asyncio.new_event_loop()
    handles = scheduler.submit([RequestSpec([5, 6, 7], max_tokens=250, ignore_eos=True), RequestSpec([8])], loop)
    scheduler.stop()
    results = loop.run_until_complete(_outcomes(handles))
    loop.close()
    assert [str(r) for r in results] == ["the server is shutting down"] * 2
    assert scheduler.session.cache_bytes == 0


def test_ray_app_builder_refusals():
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install \"xlora-runtime[ray]\")")
    from xlora_runtime.serve.ray_app import build

    with pytest.raises(XLoraError, match=r"^xlora_runtime.serve.ray_app:build: missing the argument graph=PATH/TO/"):
        build({})
    with pytest.raises(XLoraError, match=r"^xlora_runtime.serve.ray_app:build: unknown argument 'batch' \(known: "):
        build({"graph": "m.onnx", "batch": 4})
    with pytest.raises(XLoraError, match=r"^xlora_runtime.serve.ray_app:build: max_batch='many': expected int$"):
        build({"graph": "m.onnx", "max_batch": "many"})
    app = build({"graph": "m.onnx", "max_batch": "8", "session_cache_mb": "64", "max_body_mb": "2"})  # strings
    assert app._bound_deployment.init_kwargs == {"graph": "m.onnx", "max_batch": 8, "session_cache_mb": 64.0,
                                                 "max_body_mb": 2.0}


# ----------------------------------------------------------------------------------------------- the command
@pytest.mark.parametrize("argv, message", [
    (["missing.onnx"], "missing.onnx: no such file (expected an .onnx graph written by xlora-export)"),
    (["GRAPH", "--port", "70000"], "--port 70000: expected 0 to 65535"),
    (["GRAPH", "--max-batch", "0"], "--max-batch 0: expected >= 1"),
    (["GRAPH", "--max-queue", "-1"], "--max-queue -1: expected >= 0"),
    (["GRAPH", "--session-cache-mb", "-1"], "--session-cache-mb -1.0: expected a number >= 0"),
    (["GRAPH", "--threads", "0"], "--threads 0: expected >= 1"),
    (["GRAPH", "--max-body-mb", "0"], "--max-body-mb 0.0: expected a number > 0"),
])
def test_serve_user_errors(argv, message, capsys):
    from xlora_runtime.serve.cli import main

    argv = [exported("tiny-llama") if a == "GRAPH" else a for a in argv]
    assert main(argv) == 1
    assert capsys.readouterr().err == f"xlora-serve: error: {message}\n"


def test_serve_on_a_port_in_use(capsys):
    from xlora_runtime.serve.cli import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        assert main([exported("tiny-llama"), "--port", str(port)]) == 1
    assert re.fullmatch(rf"xlora-serve: error: --host 127.0.0.1 --port {port}: cannot listen there \(.+\)\n",
                        capsys.readouterr().err)


def test_serve_without_the_serve_extra(monkeypatch, capsys):
    from xlora_runtime.serve.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert main([exported("tiny-llama")]) == 1
    assert capsys.readouterr().err == ('xlora-serve: error: xlora-serve needs the serve extra: pip install '
                                       '"xlora-runtime[serve]" (missing fastapi)\n')


def test_serve_package_imports_nothing_heavy():
    heavy = ("fastapi", "uvicorn", "ray", "onnxruntime", "numpy", "jinja2")
    code = f"import sys, xlora_runtime.serve, xlora_runtime.serve.cli; print(sorted(set({heavy}) & set(sys.modules)))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [RUNTIME_ROOT, os.environ.get("PYTHONPATH")])))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr


# ----------------------------------------------------------------------------------------------- Ray Serve
def _private_network() -> list[str] | None:
    """A command prefix running its command in a new network namespace with only loopback up, or None where this
    machine cannot make one (no unshare, no user namespaces)."""
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    try:
        ok = subprocess.run([*prefix, "sh", "-c", "ip link set lo up && ip -o link show up | wc -l"],
                            capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if ok.returncode == 0 and ok.stdout.strip() == "1" else None


@pytest.mark.ray
def test_ray_serve_on_a_two_node_cluster():
    """deploy/ray/serve_config.yaml on a simulated 2-node cluster (tests/serve_ray_cluster.py): one replica per node;
    every turn of interleaved sessions gets the tokens the runtime gives alone, wherever it lands (which replica
    answers is the router's best effort, so it is not asserted: only that cached state is never used where it
    is not held); the same turn answered by both replicas, without caches, gets the same tokens; streaming through
    Ray's proxy."""
    pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install \"xlora-runtime[ray]\")")
    prefix = _private_network()
    if prefix is None:
        pytest.skip("cannot make a private network namespace here (unshare -n); Ray binds non-loopback addresses")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [RUNTIME_ROOT, os.environ.get("PYTHONPATH")])),
               RAY_USAGE_STATS_ENABLED="0")
    command = f"ip link set lo up && exec {sys.executable} {os.path.join(ROOT, 'tests', 'serve_ray_cluster.py')} " \
              f"{chat_graph()} 8000"
    out = subprocess.run([*prefix, "sh", "-c", command], capture_output=True, text=True, env=env, timeout=540)
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["cpus"] == {"total": 2.0, "free": 0.0, "nodes": 2}  # a replica on each node
    session = generator().session
    template = __import__("xlora_runtime.chat", fromlist=["ChatTemplate"]).ChatTemplate.of_session(session)

    def alone(messages: list[dict]) -> list[int]:
        ids = session.tokenizer.encode(template.render(messages), add_special_tokens=False).ids
        return solo(ids, 8)

    assert report["errors"] == []
    for name, (first, second) in report["turns"].items():
        assert first["tokens"] == alone(first["messages"]) and second["tokens"] == alone(second["messages"]), name
        assert first["cached"] == 0, name  # a new session has nothing cached
        if second["instance"] != first["instance"]:  # caches live on the replica of the first turn
            assert second["cached"] == 0, name
    warm, probes = report["turns"]["session-0"][1], report["probes"]
    assert len({p["instance"] for p in probes}) == 2, "one replica answered all of 40 probes"
    for probe in probes:
        assert probe["cached"] == 0 and probe["tokens"] == warm["tokens"], probe
    stream = report["stream"]
    assert stream["status"] == 200 and stream["done"] and stream["text"] == stream["expected"]
