"""One `XLoraSession` (and one `Generator`) shared by threads generating at once.

Each thread must get exactly its single-threaded result (tokens, logits, scalings, its part of the scalings
log), and the frozen graph, opened lazily, must be opened once however many threads ask for it at once.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest

from helpers import exported
from xlora_runtime import Generator, XLoraSession
from xlora_runtime.scalings_log import tokens_record_path

THREADS = 8
# eight requests with distinct prompts, covering batches, top-k, per-row freezing, sampling and stops
REQUESTS = [
    dict(prompts=[[5, 17, 99, 230, 41, 8, 77], [300, 22, 9]], max_new_tokens=12, stop_token_ids=[]),
    dict(prompts="the model mixes", max_new_tokens=10, expert_top_k=1),
    dict(prompts=[[12, 250, 14, 140, 33], [7, 8, 9]], max_new_tokens=12, stop_token_ids=[],
         freeze_scalings_after=[0, 3]),
    dict(prompts="a cache", max_new_tokens=10, do_sample=True, seed=3, temperature=1.3, top_p=0.9,
         stop_token_ids=[]),
    dict(prompts=["low rank experts", "a small classifier"], max_new_tokens=12, stop_strings=["e"],
         stop_token_ids=[]),
    dict(prompts=[[40, 41, 42, 43]], max_new_tokens=12, expert_top_k=2, freeze_scalings_after=1,
         stop_token_ids=[]),
    dict(prompts=[[100, 200], [101, 201, 301], [102]], max_new_tokens=9, do_sample=True, seed=11,
         stop_token_ids=[]),
    dict(prompts="the model", max_new_tokens=8, expert_top_k=0, freeze_scalings_after=2, stop_token_ids=[]),
]


def graph() -> str:
    return exported("tiny-llama")


def run(gen: Generator, request: dict) -> list:
    options = dict(request)
    return gen.generate(options.pop("prompts"), return_logits=True, **options)


def single_threaded() -> tuple[list, list[list[np.ndarray]]]:
    """Each request's results and scalings log, one after the other on a fresh session."""
    gen = Generator(XLoraSession(graph(), threads=1))
    gen.log_scalings = True
    results, logs = [], []
    for request in REQUESTS:
        gen.clear_scalings_log()
        results.append(run(gen, request))
        logs.append(gen.scalings_log)
    return results, logs


def in_threads(work, count: int = THREADS) -> list:
    """`work(i)` in `count` threads started together; their return values, re-raising any thread's error."""
    barrier = threading.Barrier(count)
    out, errors = [None] * count, []

    def target(i: int) -> None:
        try:
            barrier.wait()
            out[i] = work(i)
        except BaseException as e:  # reported in the main thread
            errors.append(e)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]
    return out


def assert_same(got: list, want: list, what: str) -> None:
    assert len(got) == len(want), what
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.tokens == w.tokens, f"{what}, prompt {i}: tokens"
        assert g.finish_reason == w.finish_reason, f"{what}, prompt {i}"
        np.testing.assert_array_equal(g.logits, w.logits, err_msg=f"{what}, prompt {i}: logits")
        np.testing.assert_array_equal(g.scalings, w.scalings, err_msg=f"{what}, prompt {i}: scalings")


@pytest.mark.parametrize("shared_generator", [True, False])
def test_threads_get_their_single_threaded_results(shared_generator, tmp_path):
    want, want_logs = single_threaded()
    session = XLoraSession(graph(), threads=1)
    shared = Generator(session)
    shared.log_scalings = True
    rounds = 2  # each thread generates twice, so that calls overlap at different steps

    def work(i: int) -> list:
        gen = shared if shared_generator else Generator(session)
        return [run(gen, REQUESTS[i]) for _ in range(rounds)]

    got = in_threads(work)
    for i in range(THREADS):
        for r in range(rounds):
            assert_same(got[i][r], want[i], f"request {i}, round {r}")
    assert session.cache_bytes == 0
    if not shared_generator:
        return
    # the shared log holds every call's entries in one block, each equal to that request's own log
    log = shared.scalings_log
    shared.flush_log_scalings(str(tmp_path / "log"))
    with open(tokens_record_path(str(tmp_path / "log"))) as f:
        calls = json.load(f)["calls"]
    assert len(calls) == THREADS * rounds
    seen, first = [], 0
    for call in calls:
        ids = [p["prompt_ids"] for p in call["prompts"]]
        i = next(j for j, w in enumerate(want) if [r.prompt_ids for r in w] == ids)
        seen.append(i)
        assert call["first_entry"] == first and call["entries"] == len(want_logs[i])
        for a, b in zip(log[first:first + call["entries"]], want_logs[i]):
            np.testing.assert_array_equal(a, b, err_msg=f"request {i}")
        first += call["entries"]
    assert first == len(log) and sorted(seen) == sorted(list(range(THREADS)) * rounds)


def test_the_frozen_graph_is_opened_once():
    session = XLoraSession(graph(), threads=1)
    opened, original = [], session._open

    def slow_open(path: str):
        opened.append(path)
        time.sleep(0.05)  # widen the window in which a second thread could open it too
        return original(path)

    session._open = slow_open
    request = REQUESTS[5]
    [want] = run(Generator(XLoraSession(graph(), threads=1)), request)
    results = in_threads(lambda i: run(Generator(session), request))
    assert opened == [session.info.frozen_path]
    for [result] in results:
        assert result.tokens == want.tokens
        np.testing.assert_array_equal(result.logits, want.logits)
