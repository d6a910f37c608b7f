"""The batch core (`xlora_runtime/batch.py`) under both engines: the `Generator` and the server's `Scheduler` give
the same greedy tokens, texts and finish reasons for the same prompts, and no part of a stop string is ever
released, by either, even when it spans several tokens.

Oracles: the plain greedy run of each prompt (no stops) says where every stop must cut; the text a stop string
cuts is the free text up to the stop string's first occurrence.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from functools import cache

import numpy as np
import pytest

from helpers import BUILD_ROOT, built, exported
from xlora_export.export import ExportOptions, export
from xlora_runtime import Generator, XLoraSession
from xlora_runtime.batch import FINISH_REASONS, StopStrings
from xlora_runtime.serve.protocol import openai_finish_reason
from xlora_runtime.serve.scheduler import RequestSpec, Scheduler

PROMPT = [5, 17, 99, 230, 41, 8, 77]


@cache
def plain() -> Generator:
    return Generator(XLoraSession(exported("tiny-llama"), threads=1))


def free_run(prompt: list[int], steps: int, **options) -> tuple[list[int], list[str]]:
    """The greedy tokens of a prompt with no stop at all, and the text each one releases."""
    events = list(plain().stream([prompt], max_new_tokens=steps, stop_token_ids=[], **options))
    return [e.token for e in events], [e.text for e in events]


def spanning_stop(pieces: list[str]) -> tuple[str, int]:
    """A stop string that begins in one token's text and ends in the next one's (first occurring there), and the
    index of the token that completes it."""
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])
    for j in range(1, len(pieces)):
        if not pieces[j - 1] or not pieces[j]:
            continue
        start, end = int(ends[j - 1]) - 1, int(ends[j - 1]) + 1  # last character of j - 1, first of j
        stop = text[start:end]
        if text.find(stop) == start and "\ufffd" not in stop:
            return stop, j
    pytest.fail(f"no stop string spanning two tokens in {text!r}")


def scheduler_outputs(scheduler: Scheduler, specs: list[RequestSpec]) -> list[list]:
    """Every request's `TokenOut`s, the requests submitted at once."""
    loop = asyncio.new_event_loop()
    try:
        handles = scheduler.submit(specs, loop)

        async def collect() -> list[list]:
            async def one(handle) -> list:
                return [out async for out in handle]

            return await asyncio.gather(*(one(h) for h in handles))

        return loop.run_until_complete(collect())
    finally:
        loop.close()


# ----------------------------------------------------------------------------------------------- stop strings
def test_stop_strings_release_text_only_when_no_stop_can_begin_in_it():
    stops = StopStrings(["bcd", "xyz"])
    assert stops.push("ab") == ("a", False)  # "b" may begin "bcd"
    assert stops.push("c") == ("", False)  # "bc" still may
    assert stops.push("x") == ("bc", False)  # "bcx" cannot begin "bcd"; "x" may begin "xyz"
    assert stops.push("y") == ("", False)
    assert stops.push("zq") == ("", True)  # "xyz" spanned three tokens: none of it was released
    stops = StopStrings(["bcd"])
    assert stops.push("abc") == ("a", False)
    assert stops.flush() == "bc" and stops.flush() == ""  # the row ended otherwise: the held text goes out
    assert StopStrings().push("anything") == ("anything", False)


def test_stop_strings_never_release_stop_text_and_hold_less_than_the_longest():
    """Random texts in random pieces: the released text is always a prefix of the text cut where the first piece
    that completes a stop string ends it (at the first stop string in the text so far), and what is held stays
    shorter than the longest stop string."""
    rng = np.random.default_rng(0)
    for _ in range(2000):
        text = "".join(rng.choice(list("abc"), int(rng.integers(0, 30))))
        stops = ["".join(rng.choice(list("abc"), int(rng.integers(1, 5)))) for _ in range(int(rng.integers(1, 4)))]
        bounds = np.sort(rng.integers(0, len(text) + 1, int(rng.integers(0, 8))))
        pieces = ["".join(p) for p in np.split(np.array(list(text), dtype=object), bounds)]
        cut, hits = text, []
        for end in np.cumsum([len(p) for p in pieces]):
            hits = [i for i in (text[:end].find(s) for s in stops) if i >= 0]
            if hits:
                cut = text[:min(hits)]
                break
        state, released, stopped = StopStrings(stops), "", False
        for piece in pieces:
            out, stopped = state.push(piece)
            released += out
            assert cut.startswith(released), (text, stops, released)
            assert len(state.held) < max(map(len, stops))
            if stopped:
                break
        if not stopped:
            released += state.flush()
        assert (released, stopped) == (cut, bool(hits)), (text, stops)


def test_a_stop_string_spanning_tokens_never_reaches_the_generators_stream():
    tokens, pieces = free_run(PROMPT, 24)
    stop, at = spanning_stop(pieces)
    text = "".join(pieces)
    events = list(plain().stream([PROMPT], max_new_tokens=24, stop_token_ids=[], stop_strings=[stop]))
    assert [e.token for e in events] == tokens[:at + 1] and events[-1].finish_reason == "stop_string"
    streamed = ""
    for e in events:
        streamed += e.text
        assert text[:text.index(stop)].startswith(streamed), (stop, streamed)  # never a character of the stop
    assert streamed == text[:text.index(stop)]
    [result] = plain().generate([PROMPT], max_new_tokens=24, stop_token_ids=[], stop_strings=[stop])
    assert result.text == streamed and stop not in result.text and result.tokens == tokens[:at + 1]


def test_a_stop_string_spanning_tokens_never_reaches_the_servers_stream():
    from starlette.testclient import TestClient

    from xlora_runtime.serve.app import Server, ServerConfig, create_app

    tokens, pieces = free_run(PROMPT, 24)
    stop, at = spanning_stop(pieces)
    want = "".join(pieces)[:"".join(pieces).index(stop)]
    server = Server(ServerConfig(exported("tiny-llama"), threads=1))
    with TestClient(create_app(server)) as client:
        body = dict(prompt=PROMPT, max_tokens=24, temperature=0, ignore_eos=True, stop=[stop],
                    xlora=dict(return_token_ids=True))
        with client.stream("POST", "/v1/completions", json=dict(body, stream=True)) as response:
            assert response.status_code == 200
            chunks = [json.loads(line[len("data: "):]) for line in response.iter_lines()
                      if line.startswith("data: ") and line != "data: [DONE]"]
        whole = client.post("/v1/completions", json=body).json()["choices"][0]
    streamed = ""
    for chunk in chunks:
        streamed += chunk["choices"][0]["text"]
        assert want.startswith(streamed), (stop, streamed)
    assert streamed == want == whole["text"] and stop not in streamed
    assert [c["choices"][0]["xlora"]["token_ids"][0] for c in chunks] == tokens[:at + 1]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "stop"


# ----------------------------------------------------------------------------------------------- both engines
def graph_with_eos(eos: int) -> str:
    """tiny-llama exported with `eos` as its eos token: a stop id the model does choose."""
    folder = os.path.join(BUILD_ROOT, f"tiny-llama-eos-{eos}")
    if not os.path.isdir(folder):
        shutil.copytree(built("tiny-llama"), folder)
        path = os.path.join(folder, "base", "generation_config.json")
        with open(path) as f:
            config = json.load(f)
        with open(path, "w") as f:
            json.dump(dict(config, eos_token_id=eos), f)
    graph = os.path.join(BUILD_ROOT, "exports", f"tiny-llama-eos-{eos}.onnx")
    if not os.path.exists(graph):
        os.makedirs(os.path.dirname(graph), exist_ok=True)
        export(folder, graph, ExportOptions(frozen_scalings=True, validate=False))
    return graph


def test_generator_and_scheduler_agree_through_the_core():
    """The same prompts through both engines, every finish reason among them: the Generator one call per prompt,
    the Scheduler all at once (left-padded merges, a frozen group and a second top_k beside them)."""
    max_positions = plain().session.info.max_positions
    rng = np.random.default_rng(5)
    long_prompt = rng.integers(3, 380, max_positions - 3).tolist()  # room for 4 new tokens
    prompts = [PROMPT, [300, 22, 9], [12, 250, 14, 140, 33], long_prompt, [77, 6, 120]]
    steps = [12, 12, 6, 12, 8]
    cases = [dict(), dict(), dict(expert_top_k=1), dict(), dict(freeze_scalings_after=1)]
    free = [free_run(p, n, **c) for p, n, c in zip(prompts, steps, cases)]
    # an eos the first prompt chooses at step >= 2 and the other prompts do not choose at all
    others = {t for tokens, _ in free[1:] for t in tokens}
    first = free[0][0]
    eos = next((t for j, t in enumerate(first) if j >= 2 and t not in first[:j] and t not in others), None)
    assert eos is not None, f"no token of {first} to serve as eos: the others choose {sorted(others)}"
    stop, _ = spanning_stop(free[1][1])
    session = XLoraSession(graph_with_eos(eos), threads=1)
    assert session.info.eos_token_ids == [eos]
    cases[1]["stop_strings"] = [stop]

    generator = Generator(session)
    by_generator = []
    for prompt, n, case in zip(prompts, steps, cases):
        [result] = generator.generate([prompt], max_new_tokens=n, **case)
        by_generator.append((result.tokens, result.text, result.finish_reason))
    scheduler = Scheduler(session)
    scheduler.start()
    try:
        specs = [RequestSpec(p, max_tokens=n, stop=tuple(c.get("stop_strings", ())), top_k=c.get("expert_top_k"),
                             freeze_after=c.get("freeze_scalings_after")) for p, n, c in zip(prompts, steps, cases)]
        outputs = scheduler_outputs(scheduler, specs)
    finally:
        scheduler.stop()
    by_scheduler = [([o.token for o in outs], "".join(o.text for o in outs), outs[-1].finish_reason)
                    for outs in outputs]
    assert by_scheduler == by_generator
    assert [r for _, _, r in by_generator] == ["stop_token", "stop_string", "length", "max_positions", "length"]
    assert set(FINISH_REASONS) >= {r for _, _, r in by_generator}
    assert [openai_finish_reason(r) for _, _, r in by_scheduler] == ["stop", "stop", "length", "length", "length"]
    for (tokens, text, reason), (free_tokens, pieces) in zip(by_generator, free):
        assert tokens == free_tokens[:len(tokens)]  # a stop ends a row; it never changes the tokens before it
        if reason == "stop_token":
            assert text == "".join(pieces[:len(tokens) - 1])  # the stop id's text is not released
    assert session.cache_bytes == 0


# ----------------------------------------------------------------------------------------------- sampling extensions
LOGITS = np.array([[2.0, 1.5, 1.2, 0.3, -0.4, -1.0, 0.9, 1.9]], np.float32)


def reference_probs(logits: np.ndarray, temperature: float, top_k: int = 0, min_p: float = 0.0, top_p: float = 1.0,
                    penalty: float = 1.0, seen: tuple[int, ...] = (), banned: tuple[int, ...] = ()) -> np.ndarray:
    """vLLM's sampling written out token by token: penalty and bans on the logits, then softmax at the temperature,
    min-p, top-k (ties kept), top-p over the tokens sorted by probability."""
    z = [float(v) for v in logits]
    for t in seen:
        z[t] = z[t] / penalty if z[t] > 0 else z[t] * penalty
    for t in banned:
        z[t] = -np.inf
    top = max(z)
    p = [np.exp((v - top) / temperature) for v in z]
    p = [v / sum(p) for v in p]
    p = [0.0 if v < min_p * max(p) else v for v in p]
    if top_k:
        kth = sorted(p, reverse=True)[top_k - 1]
        p = [0.0 if v < kth else v for v in p]
    p = [v / sum(p) for v in p]
    kept, mass = set(), 0.0
    for t in sorted(range(len(p)), key=lambda t: -p[t]):
        if mass >= top_p:
            break
        kept.add(t)
        mass += p[t]
    p = [v if t in kept else 0.0 for t, v in enumerate(p)]
    return np.array([v / sum(p) for v in p])


@pytest.mark.parametrize("options", [dict(top_k=3), dict(min_p=0.5), dict(top_k=4, top_p=0.8, min_p=0.2),
                                     dict(penalty=1.5, seen=(0, 4, 7)), dict(banned=(0, 7), top_k=2),
                                     dict(temperature=0.5, penalty=2.0, seen=(1, 5), min_p=0.1)],
                         ids=["top_k", "min_p", "all_filters", "repetition_penalty", "banned", "penalty_and_min_p"])
def test_pick_tokens_samples_from_the_hand_computed_distribution(options):
    from xlora_runtime.batch import pick_tokens

    options = dict(temperature=1.0) | options
    expected = reference_probs(LOGITS[0], **options)
    seen = np.zeros_like(LOGITS, bool)
    seen[0, list(options.get("seen", ()))] = True
    drawn = set()
    for seed in range(200):
        [token] = pick_tokens(LOGITS, True, options["temperature"], options.get("top_p", 1.0),
                              np.random.default_rng(seed), top_k=options.get("top_k", 0),
                              min_p=options.get("min_p", 0.0), repetition_penalty=options.get("penalty", 1.0),
                              seen=seen, banned=options.get("banned", ()))
        assert token == np.random.default_rng(seed).choice(len(expected), p=expected), seed
        drawn.add(int(token))
    assert drawn == set(np.flatnonzero(expected))  # every kept token comes up, no dropped one does


def test_pick_tokens_greedy_with_a_penalty_and_banned_ids():
    from xlora_runtime.batch import pick_tokens

    seen = np.zeros_like(LOGITS, bool)
    assert pick_tokens(LOGITS, False, 1.0, 1.0, None).tolist() == [0]
    seen[0, 0] = True  # 2.0 / 1.2 = 1.67 < 1.9
    assert pick_tokens(LOGITS, False, 1.0, 1.0, None, repetition_penalty=1.2, seen=seen).tolist() == [7]
    assert pick_tokens(LOGITS, False, 1.0, 1.0, None, repetition_penalty=1.05, seen=seen).tolist() == [0]
    assert pick_tokens(LOGITS, False, 1.0, 1.0, None, banned=[0, 7]).tolist() == [1]
    negative = np.array([[-0.5, -0.55]], np.float32)  # a negative logit is multiplied: -0.5 * 1.2 < -0.55
    assert pick_tokens(negative, False, 1.0, 1.0, None, repetition_penalty=1.2,
                       seen=np.array([[True, False]])).tolist() == [1]


def test_sampling_options_are_checked():
    from xlora_runtime import XLoraError

    for options, message in [(dict(top_k=-1), r"^top_k=-1: expected an int >= 0 \(0 = every token\)$"),
                             (dict(min_p=1.5), r"^min_p=1.5: expected 0 <= min_p <= 1$"),
                             (dict(repetition_penalty=0),
                              r"^repetition_penalty=0: expected a number > 0 \(1 = none\)$"),
                             (dict(min_tokens=2.5), r"^min_tokens=2.5: expected an int >= 0$")]:
        with pytest.raises(XLoraError, match=message):
            plain().generate([PROMPT], max_new_tokens=2, **options)


def test_generator_repetition_penalty_and_min_tokens_follow_the_reference():
    """Greedy with a repetition penalty: each step's token is the argmax of that step's logits with the prompt's
    and the earlier tokens' logits penalized; min_tokens keeps the stop id out of the first tokens."""
    [result] = plain().generate([PROMPT], max_new_tokens=12, stop_token_ids=[], repetition_penalty=1.8,
                                return_logits=True)
    history = list(PROMPT)
    for token, logits in zip(result.tokens, result.logits):
        expected = reference_probs(logits, 1e-3, penalty=1.8, seen=tuple(set(history)))
        assert token == int(np.argmax(expected))
        history.append(token)
    assert result.tokens != free_run(PROMPT, 12)[0]  # the penalty changed the choice
    first = free_run(PROMPT, 1)[0][0]
    [held] = plain().generate([PROMPT], max_new_tokens=6, stop_token_ids=[first], min_tokens=4)
    assert first not in held.tokens[:4] and len(held.tokens) >= 4
    [free] = plain().generate([PROMPT], max_new_tokens=6, stop_token_ids=[first])
    assert free.tokens == [first] and free.finish_reason == "stop_token"
