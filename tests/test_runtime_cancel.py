"""A generation that ends early (closed by its consumer, an exception inside the stream or in the consumer)
frees its KV caches at once: `XLoraSession.cache_bytes` returns to zero even while the exception, whose
traceback holds the generator's frame, is still alive; and the generator still gives fresh results."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import exported
from xlora_runtime import Generator, XLoraSession
from xlora_runtime.kv_cache import CacheGroup

PROMPTS = [[5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33]]
OPTIONS = dict(max_new_tokens=16, stop_token_ids=[], freeze_scalings_after=[None, 1, None])  # two groups


@pytest.fixture
def gen() -> Generator:
    return Generator(XLoraSession(exported("tiny-llama"), threads=1))


def unit_bytes(info) -> int:
    """Bytes of one position of one row in one cache, from the metadata."""
    return 2 * info.num_layers * info.kv_heads * info.head_dim * 4


def still_works(gen: Generator) -> None:
    want = Generator(XLoraSession(exported("tiny-llama"), threads=1)).generate(PROMPTS, **OPTIONS)
    got = gen.generate(PROMPTS, **OPTIONS)
    assert [r.tokens for r in got] == [r.tokens for r in want]
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g.scalings, w.scalings)
    assert gen.session.cache_bytes == 0


def test_closing_a_stream_early(gen):
    session = gen.session
    assert session.cache_bytes == 0
    stream = gen.stream(PROMPTS, **OPTIONS)
    events = [next(stream) for _ in range(3 * len(PROMPTS))]  # three steps: row 1 is frozen by now
    assert [e.step for e in events[-3:]] == [2, 2, 2]
    width = max(len(p) for p in PROMPTS)
    # during step 2 the groups hold width + 2 positions: rows 0 and 2 both caches, row 1 the real one
    assert session.cache_bytes == unit_bytes(session.info) * (width + 2) * (2 * 2 + 1)
    stream.close()
    assert session.cache_bytes == 0
    still_works(gen)


def test_an_exception_inside_the_stream(gen, monkeypatch):
    session, runs, original = gen.session, [], CacheGroup.run

    def failing(self, *args, **kwargs):
        runs.append(len(self))
        if len(runs) == 5:  # a decode step, with two groups alive
            raise RuntimeError("injected failure")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(CacheGroup, "run", failing)
    stream = gen.stream(PROMPTS, **OPTIONS)
    with pytest.raises(RuntimeError, match="injected failure") as info:
        for _ in stream:
            pass
    assert info.value.__traceback__ is not None  # the generator's frame is still reachable from here
    assert session.cache_bytes == 0
    monkeypatch.setattr(CacheGroup, "run", original)
    still_works(gen)


def test_an_exception_thrown_into_the_stream(gen):
    stream = gen.stream(PROMPTS, **OPTIONS)
    next(stream)
    assert gen.session.cache_bytes > 0
    with pytest.raises(KeyboardInterrupt) as info:
        stream.throw(KeyboardInterrupt())
    assert info.value.__traceback__ is not None and gen.session.cache_bytes == 0
    still_works(gen)


def test_an_exception_in_the_consumer_of_generate(gen):
    seen = []

    def consumer(event):
        seen.append(event)
        if len(seen) == 7:
            raise ValueError("consumer gave up")

    with pytest.raises(ValueError, match="consumer gave up") as info:
        gen.generate(PROMPTS, on_token=consumer, **OPTIONS)
    assert info.value.__traceback__ is not None  # generate's frame (holding the stream) is reachable
    assert gen.session.cache_bytes == 0
    still_works(gen)


def test_a_cancelled_call_is_not_logged(gen):
    gen.log_scalings = True
    stream = gen.stream(PROMPTS, **OPTIONS)
    next(stream)
    stream.close()
    assert gen.scalings_log == []
    [result] = gen.generate(PROMPTS[0], max_new_tokens=3, stop_token_ids=[])
    assert len(gen.scalings_log) == 3
