"""Property-based fuzzing (hypothesis) of the runtime's request validation.

Whatever a caller passes as prompts, token ids and options (max_new_tokens, sampling, expert top-k,
freezing, stop ids and strings), `Generator.stream` either raises a one-line `XLoraError` at call time or
yields a well-formed generation; nothing else escapes (no TypeError, no numpy or ONNX Runtime error), nothing
hangs, and a good request afterwards gives exactly what a fresh session gives. `xlora-generate` is fuzzed the
same way through its argv: exit code 0, 1 or 2, never a traceback, and no example leaves threads behind (thread
counts such as 99999 are refused; the process's OS threads are counted after every example).
"""

from __future__ import annotations

import contextlib
import os
import signal
from functools import cache

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from helpers import exported
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.cli import generate_main
from xlora_runtime.generation import pick_tokens
from xlora_runtime.threads import thread_limit

FINISH_REASONS = {"stop_token", "stop_string", "length", "max_positions"}
GOOD_PROMPT = [5, 17, 99, 230, 41]
GOOD = dict(max_new_tokens=4, stop_token_ids=[], expert_top_k=2, freeze_scalings_after=1)
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@cache
def generator() -> Generator:
    """The generator every example uses (one session for the whole run)."""
    return Generator(XLoraSession(exported("tiny-llama"), threads=1))


@cache
def fresh_result() -> list[int]:
    """The good request's tokens from a session that never saw a bad input."""
    [result] = Generator(XLoraSession(exported("tiny-llama"), threads=1)).generate(GOOD_PROMPT, **GOOD)
    return result.tokens


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail (TimeoutError, not an XLoraError) if the body runs longer than `seconds`: a hang."""
    def expire(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# ------------------------------------------------------------------------------------------------- strategies
VOCAB = 384  # tiny-llama's vocabulary (checked in the tests)
junk = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
    st.binary(max_size=4), st.lists(st.integers(-3, 3), max_size=2), st.dictionaries(st.text(max_size=2),
                                                                                       st.integers(), max_size=2),
    st.just(object()), st.just(np.array([[1, 2], [3, 4]])), st.just(np.float32("nan")), st.just(np.bool_(True)),
    st.just(1 + 2j), st.just(b"\x00"),
)
big_ints = st.one_of(st.integers(-2**70, 2**70), st.sampled_from([np.int64(5), np.int32(-1), np.uint64(2**64 - 1),
                                                                    np.int8(7), 2**63, -2**63]))
token_ids = st.one_of(st.integers(0, VOCAB - 1), st.integers(-3, VOCAB + 3), big_ints, junk)
texts = st.one_of(st.text(max_size=24), st.sampled_from(["", " ", "\ud800", "a\x00b", "\U0010ffff" * 3, "\n\t",
                                                         "the model mixes", "many words " * 200]))
id_lists = st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
                     st.lists(token_ids, max_size=6), st.tuples(token_ids, token_ids))
one_prompt = st.one_of(texts, id_lists, junk)
prompts = st.one_of(one_prompt, st.lists(one_prompt, max_size=3), st.lists(id_lists, min_size=1, max_size=3),
                    st.lists(texts, min_size=1, max_size=3), st.just([GOOD_PROMPT] * 2))
numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([1e-300, 5e-324, 1e300, 0.0, -0.0, 2, np.float32(0.5), np.float16(2.0)]), junk)


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values three times in four, so that the checks after this option are reached too."""
    return st.one_of(valid, valid, valid, invalid)


good_prompts = st.one_of(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=8),
                         st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=6), min_size=1, max_size=3),
                         st.sampled_from(["the model mixes", ["a cache", "low rank experts mix"]]),
                         st.just([5] * 250))  # near the 256 positions
options = st.fixed_dictionaries({}, optional=dict(
    max_new_tokens=mostly(st.integers(1, 6), st.one_of(st.integers(-2, 0), st.sampled_from([10**12, 2**64]),
                                                       st.just(np.int64(3)), junk)),
    do_sample=mostly(st.booleans(), st.one_of(st.just(np.bool_(True)), junk)),
    temperature=mostly(st.floats(0.05, 3.0), numbers),
    top_p=mostly(st.floats(0.05, 1.0), numbers),
    seed=mostly(st.one_of(st.none(), st.integers(0, 2**70)), st.one_of(st.integers(-5, -1), junk)),
    stop_token_ids=mostly(st.one_of(st.none(), st.just([]), st.lists(st.integers(0, VOCAB - 1), max_size=4)),
                          st.one_of(token_ids, st.lists(token_ids, max_size=4), junk)),
    stop_strings=mostly(st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=3)),
                        st.one_of(texts, st.lists(st.one_of(texts, junk), max_size=3), junk)),
    expert_top_k=mostly(st.one_of(st.none(), st.integers(0, 3)), st.one_of(st.integers(-2, 6), big_ints, junk)),
    freeze_scalings_after=mostly(st.one_of(st.none(), st.integers(0, 5)),
                                 st.one_of(st.integers(-2, -1), big_ints,
                                           st.lists(st.one_of(st.none(), st.integers(-2, 5), junk), max_size=4),
                                           junk)),
    return_logits=mostly(st.booleans(), junk),
))


# ------------------------------------------------------------------------------------------------- properties
def test_the_fuzzed_graph_is_tiny_llama():
    info = generator().session.info
    assert info.vocab_size == VOCAB and info.max_positions == 256 and info.n_experts == 3


def run_request(prompts, options: dict) -> None:
    """`stream` raises a one-line XLoraError at call time, or runs to a well-formed end; then a good request
    on the same session gives what a fresh session gives."""
    gen = generator()
    with time_limit(30):
        try:
            stream = gen.stream(prompts, **options)  # every mistake is raised here, before anything runs
        except XLoraError as e:
            message = str(e)
            assert message and "\n" not in message, repr(message)
            event(f"rejected: {message.split('=')[0].split(':')[0][:20]}")
        else:
            event("accepted")
            events = list(stream)  # a request that was accepted runs to the end without any exception
            assert events and events[-1].finish_reason in FINISH_REASONS
            ends = {e.sequence: e.finish_reason for e in events if e.finish_reason is not None}
            assert set(ends.values()) <= FINISH_REASONS and len(ends) == len({e.sequence for e in events})
            assert all(0 <= e.token < VOCAB for e in events)
            assert gen.session.cache_bytes == 0
        [good] = gen.generate(GOOD_PROMPT, **GOOD)
    assert good.tokens == fresh_result()


@FUZZ
@given(prompts=prompts)
def test_bad_prompts_get_xlora_error_only(prompts):
    run_request(prompts, dict(max_new_tokens=2, stop_token_ids=[]))


@FUZZ
@given(prompts=good_prompts, options=options)
def test_bad_options_get_xlora_error_only(prompts, options):
    run_request(prompts, options)


@FUZZ
@given(prompts=prompts)
def test_encode_accepts_ids_and_text_or_says_why(prompts):
    gen = generator()
    try:
        encoded = gen.encode(prompts)
    except XLoraError as e:
        assert "\n" not in str(e)
    else:
        assert encoded and all(ids and all(type(i) is int and 0 <= i < VOCAB for i in ids) for ids in encoded)


LIMIT = str(thread_limit())  # the most --threads accepted; one more is refused
arg_values = mostly(st.sampled_from(["-1", "0", "1", "2", "3", "4", "1e309", "nan", "inf", "0.5", "99999", "400",
                                     LIMIT, str(int(LIMIT) + 1)]),
                    st.one_of(st.sampled_from(["x", "5,17,99", "5,,x", "", "\n", "cuda", "tpu"]), st.text(max_size=5)))
with_value = st.sampled_from(["--max-new-tokens", "--expert-top-k", "--freeze-scalings-after", "--temperature",
                              "--top-p", "--seed", "--stop-id", "--stop", "--threads", "--provider"])
flags = st.sampled_from(["--sample", "--no-eos", "--json", "--stream", "5,17,99", "300", "5,x", "--bogus"])
argv_lists = st.lists(st.one_of(flags.map(lambda f: [f]), st.tuples(with_value, arg_values).map(list)),
                      max_size=4).map(lambda groups: [a for g in groups for a in g])


def os_threads() -> int:
    """This process's threads as the OS counts them (ONNX Runtime's intra-op pools included)."""
    return len(os.listdir("/proc/self/task"))


@cache
def threads_at_rest() -> int:
    """The process's threads after one xlora-generate run (what lives as long as the process has started)."""
    generate_main([exported("tiny-llama"), "5,17", "--ids", "--max-new-tokens", "2", "--threads", LIMIT])
    return os_threads()


@settings(max_examples=40, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # capsys: read per example
@given(argv=argv_lists)
def test_xlora_generate_argv_never_shows_a_traceback(argv, capsys):
    counted = os.path.isdir("/proc/self/task")  # Linux
    rest = threads_at_rest() if counted else 0
    with time_limit(30):
        code = generate_main([exported("tiny-llama"), "5,17", "--ids", "--max-new-tokens", "2", *argv])
    out, err = capsys.readouterr()
    event(f"exit code {code}")
    assert code in (0, 1, 2), (argv, code, err)
    assert "Traceback" not in out + err
    if code == 1:
        assert len(err.splitlines()) == 1 and err.startswith("xlora-generate: error:"), err
    if counted:  # the sessions this run opened are gone with it, whatever --threads was
        assert os_threads() <= rest + 2, (argv, os_threads(), rest)


@given(temperature=st.sampled_from([5e-324, 1e-300, 1e-30]), seed=st.integers(0, 2**32))
@settings(max_examples=10, deadline=None, database=None)
def test_sampling_at_a_vanishing_temperature_is_greedy(temperature, seed):
    """logits / 1e-300 overflows to inf, and inf - inf is NaN: the maximum is subtracted before dividing."""
    logits = np.random.default_rng(seed).normal(size=(3, VOCAB)).astype(np.float32) * 30
    picked = pick_tokens(logits, True, temperature, 1.0, np.random.default_rng(seed))
    np.testing.assert_array_equal(picked, logits.argmax(-1))
