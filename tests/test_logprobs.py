"""Log-probabilities: the Generator's and the server's (chat `logprobs`/`top_logprobs`, completions `logprobs` with
`echo`) against the eager model's log-softmax over the same ids, within 1e-4.

The oracle is the eager `xLoRAModel` run once over the whole sequence (prompt and generated tokens, no cache): its
logits at each position, log-softmaxed, give every prompt token's (after the first) and every new token's
log-probability. Prompts are scored both ways the runtime can: one run of a graph exported with --all-logits, and
one position per run on the default graph (the one the server below serves). The multiple-choice check does what
lm-eval's `local-completions` does for a log-likelihood task (`echo`, `logprobs: 1`, `max_tokens: 1`, the sum of
the continuation's token log-probabilities, the argmax over the choices) and compares its picks with the eager
model's.
"""

from __future__ import annotations

import os
from functools import cache

import numpy as np
import pytest
import torch

import xlora_export as xlora
from helpers import BUILD_ROOT, built, exported
from test_serve import ServerProcess, sse
from xlora_export.export import ExportOptions, export
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.format import contract as C

PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])  # three lengths: left padding
STEPS = 6
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def eager() -> xlora.xLoRAModel:
    return xlora.xlora_utils.load_model(built("tiny-llama"))[0].eval()


@cache
def all_logits_graph() -> str:
    path = os.path.join(BUILD_ROOT, "exports", "tiny-llama-all-logits.onnx")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    export(built("tiny-llama"), path, ExportOptions(all_logits=True, validate=False))
    return path


@cache
def generator(graph: str) -> Generator:
    return Generator(XLoraSession(graph, threads=1))


@torch.no_grad()
def eager_logprobs(ids: list[int]) -> np.ndarray:
    """(len(ids), vocab) float64: the eager model's log-softmax at every position of `ids` (one row, no cache)."""
    out = eager()(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), use_cache=False)
    return torch.log_softmax(out.logits[0].double(), -1).numpy()


def check_token(entry, reference: np.ndarray, token: int, k: int) -> None:
    """A `TokenLogprob` against the eager (vocab,) log-probabilities of its position."""
    assert entry.token == token
    assert abs(entry.logprob - reference[token]) <= TOL, (entry.logprob, reference[token])
    assert len(entry.top) == k
    order = np.argsort(-reference, kind="stable")
    for (t, lp), expected in zip(entry.top, order):
        assert abs(lp - reference[t]) <= TOL
        assert abs(reference[t] - reference[expected]) <= TOL  # the k most likely (ties either way)
    assert [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)


# ----------------------------------------------------------------------------------------------- the Generator
@pytest.mark.parametrize("graph", ["default", "all-logits"])
def test_generator_logprobs_equal_the_eager_log_softmax(graph):
    path = exported("tiny-llama") if graph == "default" else all_logits_graph()
    assert XLoraSession(path).info.logits == (C.LOGITS_LAST if graph == "default" else C.LOGITS_ALL)
    results = generator(path).generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[], logprobs=3,
                                       prompt_logprobs=True)
    for prompt, r in zip(PROMPTS, results):
        reference = eager_logprobs(list(prompt) + r.tokens[:-1])
        assert len(r.prompt_logprobs) == len(prompt) - 1 and len(r.logprobs) == STEPS
        for i, entry in enumerate(r.prompt_logprobs):  # prompt token i + 1, predicted at position i
            check_token(entry, reference[i], prompt[i + 1], 3)
        for i, entry in enumerate(r.logprobs):
            check_token(entry, reference[len(prompt) - 1 + i], r.tokens[i], 3)
            assert entry.top[0][0] == r.tokens[i]  # greedy: the chosen token is the most likely one


def test_generator_logprobs_are_the_model_distribution_and_leave_tokens_unchanged():
    """Sampling options change the choice, never the reported distribution; asking changes no token."""
    gen = generator(exported("tiny-llama"))
    plain = gen.generate([PROMPTS[0]], max_new_tokens=STEPS, stop_token_ids=[])[0]
    asked = gen.generate([PROMPTS[0]], max_new_tokens=STEPS, stop_token_ids=[], logprobs=0)[0]
    assert asked.tokens == plain.tokens and plain.logprobs is None
    assert all(e.top == [] for e in asked.logprobs)
    sampled = gen.generate([PROMPTS[0]], max_new_tokens=STEPS, stop_token_ids=[], do_sample=True, temperature=0.3,
                           seed=1, logprobs=1)[0]
    reference = eager_logprobs(list(PROMPTS[0]) + sampled.tokens[:-1])
    for i, entry in enumerate(sampled.logprobs):
        assert abs(entry.logprob - reference[len(PROMPTS[0]) - 1 + i, sampled.tokens[i]]) <= TOL


@pytest.mark.parametrize("options", [dict(logprobs=-1), dict(logprobs=21), dict(logprobs=1.5),
                                     dict(logprobs=True), dict(prompt_logprobs="yes")])
def test_generator_refuses_bad_logprobs(options):
    with pytest.raises(XLoraError) as info:
        generator(exported("tiny-llama")).generate([PROMPTS[0]], max_new_tokens=2, **options)
    assert next(iter(options)) in str(info.value) and "\n" not in str(info.value)
