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
from test_serve import CONVERSATION, ServerProcess, chat_checkpoint, chat_graph, sse

import xlora_export as xlora
from helpers import BUILD_ROOT, built, exported
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


# ----------------------------------------------------------------------------------------------- the server
@pytest.fixture(scope="module")
def server():
    """The default (last-position) graph with a chat template: echo scores the prompt one position per run."""
    s = ServerProcess(chat_graph(), "--max-batch", "8", "--max-queue", "8")
    yield s
    s.close()


def post(server: ServerProcess, path: str, **body) -> dict:
    body.setdefault("temperature", 0)
    response = server.client.post(path, json=dict(body, xlora=dict(return_token_ids=True)))
    assert response.status_code == 200, response.text
    return response.json()


def test_completion_echo_logprobs_equal_the_eager_log_softmax(server):
    prompt = list(PROMPTS[0])
    choice = post(server, "/v1/completions", prompt=prompt, max_tokens=4, logprobs=2, echo=True)["choices"][0]
    new = choice["xlora"]["token_ids"]
    lp = choice["logprobs"]
    reference = eager_logprobs(prompt + new[:-1])
    ids = prompt + new
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(ids) == len(lp["token_logprobs"]) == len(lp["top_logprobs"])
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None  # nothing predicts the first token
    for i in range(1, len(ids)):
        assert abs(lp["token_logprobs"][i] - reference[i - 1, ids[i]]) <= TOL, i
        top = lp["top_logprobs"][i]
        assert len(top) in (1, 2)  # two alternatives (fewer only if two tokens share a text)
        best = np.sort(reference[i - 1])[::-1][:2]
        assert abs(max(top.values()) - best[0]) <= TOL
    for i in range(len(prompt), len(ids)):  # greedy: the chosen token is the most likely, as lm-eval checks
        assert lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values())
    texts = lp["tokens"]
    assert lp["text_offset"] == [sum(len(t) for t in texts[:i]) for i in range(len(texts))]
    tokenizer = generator(chat_graph()).session.tokenizer
    assert choice["text"].startswith(tokenizer.decode(prompt, skip_special_tokens=False))


def test_completion_logprobs_zero_and_without_echo(server):
    choice = post(server, "/v1/completions", prompt=list(PROMPTS[1]), max_tokens=3, logprobs=0)["choices"][0]
    new = choice["xlora"]["token_ids"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == 3 and lp["top_logprobs"] == [{}, {}, {}] and lp["text_offset"][0] == 0
    reference = eager_logprobs(list(PROMPTS[1]) + new[:-1])
    for i, token in enumerate(new):
        assert abs(lp["token_logprobs"][i] - reference[len(PROMPTS[1]) - 1 + i, token]) <= TOL
    plain = post(server, "/v1/completions", prompt=list(PROMPTS[1]), max_tokens=3)["choices"][0]
    assert plain["logprobs"] is None and plain["xlora"]["token_ids"] == new


def chat_ids() -> list[int]:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(os.path.join(chat_checkpoint(), "base"))
    return list(hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=True, return_dict=False))


def test_chat_logprobs_equal_the_eager_log_softmax(server):
    choice = post(server, "/v1/chat/completions", messages=CONVERSATION, max_tokens=5, logprobs=True,
                  top_logprobs=3)["choices"][0]
    new = choice["xlora"]["token_ids"]
    content = choice["logprobs"]["content"]
    prompt = chat_ids()
    reference = eager_logprobs(prompt + new[:-1])
    assert len(content) == len(new)
    for i, (entry, token) in enumerate(zip(content, new)):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert abs(entry["logprob"] - reference[len(prompt) - 1 + i, token]) <= TOL
        assert len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the top one
        best = np.sort(reference[len(prompt) - 1 + i])[::-1][:3]
        np.testing.assert_allclose([t["logprob"] for t in entry["top_logprobs"]], best, atol=TOL)
    without = post(server, "/v1/chat/completions", messages=CONVERSATION, max_tokens=2, logprobs=True)["choices"][0]
    assert [e["top_logprobs"] for e in without["logprobs"]["content"]] == [[], []]


def stream(server: ServerProcess, path: str, **body) -> list[dict]:
    with server.client.stream("POST", path, json=dict(body, temperature=0, stream=True)) as r:
        assert r.status_code == 200
        events = sse(r)
    assert events[-1] == "[DONE]"
    return events[:-1]


def test_streamed_chunks_carry_the_same_logprobs(server):
    body = dict(prompt=list(PROMPTS[2]), max_tokens=4, logprobs=2, echo=True)
    whole = post(server, "/v1/completions", **body)["choices"][0]
    chunks = [e["choices"][0] for e in stream(server, "/v1/completions", **body) if e["choices"]]
    assert all(c["logprobs"] is not None for c in chunks)
    joined = {key: sum((c["logprobs"][key] for c in chunks), []) for key in whole["logprobs"]}
    assert joined == whole["logprobs"]
    assert "".join(c["text"] for c in chunks) == whole["text"]
    body = dict(messages=CONVERSATION, max_tokens=4, logprobs=True, top_logprobs=2)
    whole = post(server, "/v1/chat/completions", **body)["choices"][0]
    chunks = [e["choices"][0] for e in stream(server, "/v1/chat/completions", **body)][1:]  # after the role chunk
    assert sum((c["logprobs"]["content"] for c in chunks), []) == whole["logprobs"]["content"]


@pytest.mark.parametrize("path, body, field", [
    ("/v1/completions", dict(logprobs=6), "logprobs"),
    ("/v1/completions", dict(logprobs=-1), "logprobs"),
    ("/v1/completions", dict(logprobs=True), "logprobs"),
    ("/v1/completions", dict(logprobs="1"), "logprobs"),
    ("/v1/completions", dict(echo="yes"), "echo"),
    ("/v1/chat/completions", dict(logprobs=True, top_logprobs=21), "top_logprobs"),
    ("/v1/chat/completions", dict(logprobs=True, top_logprobs=-1), "top_logprobs"),
    ("/v1/chat/completions", dict(top_logprobs=2), "top_logprobs"),
    ("/v1/chat/completions", dict(logprobs=1), "logprobs"),
])
def test_bad_logprobs_are_400_naming_the_field(server, path, body, field):
    body = dict(body, max_tokens=1, **(dict(prompt="the model") if "chat" not in path else dict(messages=CONVERSATION)))
    response = server.client.post(path, json=body)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert message.startswith(f"{field}") and "\n" not in message, message


def test_multiple_choice_as_lm_eval_scores_it_picks_the_eager_models_answers(server):
    """lm-eval's local-completions log-likelihood request: context + continuation ids, echo, logprobs 1,
    max_tokens 1; the continuation's score is the sum of its tokens' log-probabilities (`[ctxlen:-1]`)."""
    rng = np.random.default_rng(7)
    vocab = generator(chat_graph()).session.info.vocab_size
    picks, eager_picks = [], []
    for _ in range(4):
        context = rng.integers(3, vocab, int(rng.integers(3, 9))).tolist()
        choices = [rng.integers(3, vocab, int(rng.integers(1, 4))).tolist() for _ in range(4)]
        response = post(server, "/v1/completions", prompt=[context + c for c in choices], max_tokens=1, logprobs=1,
                        echo=True, seed=1234)
        scores, eager_scores = [], []
        for choice, continuation in zip(sorted(response["choices"], key=lambda c: c["index"]), choices):
            scores.append(sum(choice["logprobs"]["token_logprobs"][len(context):-1]))
            reference = eager_logprobs(context + continuation)
            eager_scores.append(sum(reference[len(context) - 1 + j, t] for j, t in enumerate(continuation)))
            assert abs(scores[-1] - eager_scores[-1]) <= TOL * len(continuation)
        picks.append(int(np.argmax(scores)))
        eager_picks.append(int(np.argmax(eager_scores)))
    assert picks == eager_picks
