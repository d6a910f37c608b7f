"""xlora-serve under what clients send: bodies over the limit, prompts longer than the model, requests that can
never be admitted, `n` choices, /v1/models/{id}, usage in every streamed chunk, vLLM's sampling extensions, OpenAI's
bookkeeping and unsupported fields, disconnects. Real server processes on 127.0.0.1 (test_serve.py's helpers).

Time bounds are generous (a loaded 2-core machine): they catch a server that stalls for the whole parse of a 10 MB
body, not a slow one.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from test_serve import ServerProcess, chat_graph, complete, post_and_hang_up, solo, sse, tokens

CAPACITY = 4  # --max-batch 2 --max-queue 2


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])


@pytest.fixture(scope="module")
def server():
    """The chat graph, a 32 MB body limit (a 10 MB prompt reaches the parser), capacity 4 sequences."""
    s = ServerProcess(chat_graph(), "--max-batch", "2", "--max-queue", "2", "--max-body-mb", "32")
    yield s
    s.close()


class HealthProbe:
    """A thread asking /health all along; the slowest answer and every status seen."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.slowest = 0.0
        self.statuses: set[int] = set()
        self.running = True
        self.answered = threading.Event()
        self.thread = threading.Thread(target=self._run)
        self.thread.start()
        assert self.answered.wait(30), "/health never answered"

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=60) as client:
            while self.running:
                start = time.monotonic()
                self.statuses.add(client.get("/health").status_code)
                client.get("/metrics")
                self.slowest = max(self.slowest, time.monotonic() - start)
                self.answered.set()
                time.sleep(0.01)

    def stop(self) -> HealthProbe:
        self.running = False
        self.thread.join(60)
        return self


# ----------------------------------------------------------------------------------------------- no request stalls
def test_a_body_over_the_limit_is_413_before_parsing():
    s = ServerProcess(chat_graph(), "--max-body-mb", "1")
    try:
        body = json.dumps({"prompt": "x" * (10 << 20)}).encode()
        probe = HealthProbe(s.url)
        r = s.client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 413, r.text
        assert r.json()["error"] == {"message": "request body: over this server's limit of 1048576 bytes (xlora-serve "
                                                "--max-body-mb)", "type": "invalid_request_error", "param": None,
                                     "code": "body_too_large"}

        def chunked():  # no Content-Length: counted as it arrives
            yield b'{"prompt": "'
            for _ in range(40):
                yield b"y" * 65536
            yield b'"}'

        r = s.client.post("/v1/completions", content=chunked(), headers={"content-type": "application/json"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
        assert probe.stop().statuses == {200} and probe.slowest < 5.0, probe.slowest
        assert len(tokens(complete(s, "the model mixes", 3))) == 3  # the same connection pool goes on
    finally:
        s.close()


def test_a_10_mb_prompt_is_refused_without_tokenizing_and_health_answers(server):
    complete(server, "the model mixes", 3)
    pid = server.process.pid
    before = rss_kib(pid)
    probe = HealthProbe(server.url)
    start = time.monotonic()
    r = server.client.post("/v1/completions", json={"prompt": "the model mixes " * (10 << 16)})
    took = time.monotonic() - start
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "prompt has 10485760 characters: more tokens than the model's 256 positions (at most "
        f"{256 * longest_token()} characters)")
    for _ in range(2):  # the allocator's thresholds move after the first: later ones must be given back too
        r = server.client.post("/v1/chat/completions", json={"messages": [{"role": "user",
                                                                           "content": "x" * (10 << 20)}]})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("messages has 10485760 characters: ")
        r = server.client.post("/v1/completions", json={"prompt": "y" * (10 << 20)})
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt has 10485760 characters: ")
    probe.stop()
    assert probe.statuses == {200} and probe.slowest < 5.0 and took < 30.0, (probe.slowest, took)
    deadline = time.monotonic() + 20
    while rss_kib(pid) > before * 1.1:  # memory given back (allow the allocator a moment)
        assert time.monotonic() < deadline, f"RSS {before} KiB before, {rss_kib(pid)} KiB after"
        time.sleep(0.2)
    assert len(tokens(complete(server, "the model mixes", 3))) == 3


def longest_token() -> int:
    from xlora_runtime import XLoraSession

    return max(map(len, XLoraSession(chat_graph(), threads=1).tokenizer.get_vocab(with_added_tokens=True)))


def test_requests_that_can_never_be_admitted_are_400_naming_the_limit(server):
    message = (f"the request holds {CAPACITY + 1} sequences (prompts x n); this server holds at most {CAPACITY} at "
               f"once (max batch 2 + max queue 2)")
    for body in ({"prompt": [[5, 17]] * (CAPACITY + 1)}, {"prompt": [5, 17], "n": CAPACITY + 1}):
        r = server.client.post("/v1/completions", json=dict(body, max_tokens=2))
        assert r.status_code == 400 and "retry-after" not in r.headers, r.text
        assert r.json()["error"]["message"] == message
    r = server.client.post("/v1/completions", json={"prompt": [[5, 17]] * 2, "n": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == CAPACITY


# ----------------------------------------------------------------------------------------------- what clients send
def test_n_choices(server):
    greedy = complete(server, "the model mixes", 5, n=3, ignore_eos=True)
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2]
    assert len({tuple(tokens(greedy, i)) for i in range(3)}) == 1  # greedy: equal choices, as OpenAI's
    assert tokens(greedy, 0) == solo("the model mixes", 5, stop_token_ids=[])
    one = complete(server, "the model mixes", 5, ignore_eos=True)["usage"]
    assert greedy["usage"]["prompt_tokens"] == one["prompt_tokens"]  # the prompt counted once
    assert greedy["usage"]["completion_tokens"] == 15
    sampled = complete(server, "the model mixes", 6, n=2, temperature=1.0, seed=11, ignore_eos=True)
    for j in range(2):  # choice j samples with seed + j
        alone = complete(server, "the model mixes", 6, temperature=1.0, seed=11 + j, ignore_eos=True)
        assert tokens(sampled, j) == tokens(alone)
    two = complete(server, ["the model mixes", "experts"], 3, n=2, ignore_eos=True)
    assert [tokens(two, i) for i in range(4)] == [tokens(complete(server, p, 3, ignore_eos=True))
                                                    for p in ("the model mixes",) * 2 + ("experts",) * 2]
    with server.client.stream("POST", "/v1/chat/completions", json=dict(
            messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3, temperature=0, stream=True)) as r:
        events = sse(r)
    roles = [e["choices"][0]["index"] for e in events[:-1] if e["choices"][0]["delta"].get("role") == "assistant"]
    assert roles == [0, 1] and events[-1] == "[DONE]"


def test_models_retrieve(server):
    listed = server.client.get("/v1/models").json()["data"][0]
    one = server.client.get("/v1/models/tiny-llama-chat")
    assert one.status_code == 200 and one.json() == listed
    assert time.time() - 3600 < listed["created"] <= time.time()
    r = server.client.get("/v1/models/gpt-4")
    assert r.status_code == 404 and r.json()["error"] == {
        "message": "model 'gpt-4' is not served here (this server serves 'tiny-llama-chat')",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_put_usage_in_every_chunk(server, path):
    body = dict(max_tokens=5, temperature=0, ignore_eos=True, stream=True,
                stream_options={"include_usage": True, "continuous_usage_stats": True})
    body |= {"prompt": "the model mixes"} if path == "/v1/completions" else {"messages": [{"role": "user",
                                                                                          "content": "hi"}]}
    with server.client.stream("POST", path, json=body) as r:
        events = sse(r)
    chunks, final = events[:-2], events[-2]
    assert events[-1] == "[DONE]" and final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    assert all("usage" in c for c in chunks)
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[-1] == 5
    assert {c["usage"]["prompt_tokens"] for c in chunks} == {final["usage"]["prompt_tokens"]}
    del body["stream_options"]["continuous_usage_stats"]
    with server.client.stream("POST", path, json=body) as r:
        assert [e for e in sse(r)[:-2] if "usage" in e] == []  # include_usage alone: the last chunk only


def test_sampling_extensions_over_http_equal_the_generator(server):
    prompt = "the model mixes"
    penalized = complete(server, prompt, 10, ignore_eos=True, repetition_penalty=1.8)
    assert tokens(penalized) == solo(prompt, 10, stop_token_ids=[], repetition_penalty=1.8)
    assert tokens(penalized) != solo(prompt, 10, stop_token_ids=[])
    top1 = complete(server, prompt, 6, ignore_eos=True, temperature=1.0, top_k=1, seed=3)  # top-1 sampling: argmax
    assert tokens(top1) == solo(prompt, 6, stop_token_ids=[])
    sampled = complete(server, prompt, 6, ignore_eos=True, temperature=1.3, top_k=5, min_p=0.05, seed=9)
    assert tokens(sampled) == solo(prompt, 6, stop_token_ids=[], do_sample=True, temperature=1.3, top_k=5,
                                   min_p=0.05, seed=9)
    assert tokens(complete(server, prompt, 5, min_tokens=3)) == solo(prompt, 5, min_tokens=3)
    r = server.client.post("/v1/completions", json={"prompt": prompt, "min_p": 2})
    assert r.status_code == 400 and r.json()["error"]["message"] == "min_p=2: expected 0 <= min_p <= 1"


def test_bookkeeping_fields_are_ignored_and_unsupported_ones_named(server):
    ok = complete(server, "the model mixes", 3, user="u-1", store=False, metadata={"run": "x"},
                  service_tier="auto", response_format={"type": "text"})
    assert len(tokens(ok)) == 3
    chat = [{"role": "user", "content": "hi"}]
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "auto"),
                         ("parallel_tool_calls", False)]:
        r = server.client.post("/v1/chat/completions", json={"messages": chat, field: value})
        assert r.status_code == 400 and r.json()["error"]["message"] == f"{field}: not supported by this server"
    r = server.client.post("/v1/chat/completions", json={"messages": chat, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "response_format={'type': 'json_object'}: not supported by this server (only {\"type\": \"text\"})")
    r = server.client.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "42"}]})
    assert r.status_code == 400 and r.json()["error"]["message"] == (
        "messages: no user or assistant message (expected at least one)")


def test_a_client_that_disconnects_leaves_one_log_line():
    s = ServerProcess(chat_graph(), "--max-batch", "4")
    try:
        for _ in range(2):
            post_and_hang_up(s, dict(prompt=[5, 17, 99], max_tokens=250, temperature=0, ignore_eos=True))
            deadline = time.monotonic() + 30
            while s.metric("xlora_batch_size") > 0:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with httpx.Client(base_url=s.url, timeout=30) as c, c.stream("POST", "/v1/completions", json=dict(
                prompt=[5, 17, 99], max_tokens=250, temperature=0, ignore_eos=True, stream=True)) as r:
            chunks = (line for line in r.iter_lines() if line.startswith("data: "))
            next(chunks), next(chunks)
        deadline = time.monotonic() + 30
        while s.metric("xlora_batch_size") > 0 or s.metric("xlora_requests_cancelled_total") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert s.client.get("/health").status_code == 200
    finally:
        s.close()
    log = s.process.stdout.read()
    assert "Traceback" not in log and "Exception" not in log, log
    lines = [line for line in log.splitlines() if "disconnected" in line]
    assert len(lines) == 3 and all(line.startswith("WARNING:") for line in lines), log
    assert "from its stream" in lines[2]
