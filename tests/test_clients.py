"""Third-party clients against a real `xlora-serve` process on 127.0.0.1 serving the exported demo: the official
`openai` client (completions, chat, streams with usage, models, log-probabilities) and lm-eval's `local-completions`
and `local-chat-completions` models on small tasks written by the test (offline: a JSONL file and task configs in a
temporary folder, the demo's own tokenizer folder).

The oracle is the eager demo model (`models/xlora-demo`): its greedy answers (`xLoRAModel.decode`) and its
log-softmax over the vocabulary. The questions are held-out questions of the demo's four tasks.
"""

from __future__ import annotations

import json
import os
from functools import cache

import numpy as np
import pytest
import torch
from test_serve import ServerProcess

from helpers import BUILD_ROOT
from models.demo import TASKS, eval_set, plain_prompt
from models.demo_eval import DEFAULT_MODEL, MAX_NEW_TOKENS, eager_answers

openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install -e \".[test]\")")

MODEL = "xlora-demo"
PER_TASK = 5  # held-out questions per task: 20 in all
QUESTIONS = [(task, q, a) for task in TASKS for q, a in eval_set(task, PER_TASK, seed=11)]
TOKENIZER = os.path.join(DEFAULT_MODEL, "base")  # the demo's tokenizer folder (lm-eval reads it offline)


# ----------------------------------------------------------------------------------------------- fixtures
@cache
def demo_graph() -> str:
    """The demo exported once per test session (its tokenizer and chat template beside it)."""
    from xlora_export.export import ExportOptions, export

    folder = os.path.join(BUILD_ROOT, "exports")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{MODEL}.onnx")
    export(DEFAULT_MODEL, path, ExportOptions(validate=False))
    return path


@pytest.fixture(scope="module")
def demo():
    from xlora_export.xlora_utils import load_model

    return load_model(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(demo_graph(), "--model-name", MODEL, "--max-batch", "16", "--max-queue", "64")
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def eager(demo) -> dict[str, str]:
    """The eager model's greedy answer (text, eos excluded, stripped) to each question."""
    model, tokenizer = demo
    prompts = [tokenizer(plain_prompt(q))["input_ids"] for _, q, _ in QUESTIONS]
    answers = eager_answers(model, tokenizer, prompts, None)
    return {q: text for (_, q, _), text in zip(QUESTIONS, answers.texts)}


@torch.no_grad()
def log_softmax(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float32 log-probabilities of the token after each position, from the eager model."""
    return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def greedy_tokens(demo, prompt: str) -> tuple[list[int], list[int]]:
    """(prompt ids, the eager model's greedy tokens up to and including eos)."""
    model, tokenizer = demo
    ids = tokenizer(prompt)["input_ids"]
    return ids, eager_answers(model, tokenizer, [ids], None).tokens[0]


# ----------------------------------------------------------------------------------------------- openai client
def test_openai_completion_and_chat_answer_as_the_eager_model(client, eager):
    _, q, _ = QUESTIONS[0]
    completion = client.completions.create(model=MODEL, prompt=plain_prompt(q), max_tokens=MAX_NEW_TOKENS,
                                           temperature=0)
    assert completion.model == MODEL and completion.object == "text_completion"
    [choice] = completion.choices
    assert choice.text.strip() == eager[q] and choice.finish_reason == "stop"
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                                          max_tokens=MAX_NEW_TOKENS)
    [choice] = chat.choices
    assert choice.message.role == "assistant" and choice.message.content.strip() == eager[q]
    assert choice.finish_reason == "stop"
    assert chat.usage.completion_tokens == completion.usage.completion_tokens
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens


def test_openai_streams_with_usage_equal_the_whole_answers(client, demo):
    _, q, _ = QUESTIONS[5]
    prompt_ids, generated = greedy_tokens(demo, plain_prompt(q))
    whole = client.completions.create(model=MODEL, prompt=plain_prompt(q), max_tokens=MAX_NEW_TOKENS, temperature=0)
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(prompt_ids), len(generated))
    chunks = list(client.completions.create(model=MODEL, prompt=plain_prompt(q), max_tokens=MAX_NEW_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True}))
    *texts, last = chunks
    assert "".join(c.choices[0].text for c in texts) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in texts][-1] == "stop"
    assert all(c.usage is None for c in texts)
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()

    messages = [{"role": "user", "content": q}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_NEW_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_NEW_TOKENS,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    *deltas, last = chunks
    assert deltas[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in deltas) == whole.choices[0].message.content
    assert deltas[-1].choices[0].finish_reason == "stop"
    assert last.choices == [] and last.usage.model_dump() == whole.usage.model_dump()
    assert len({c.id for c in chunks}) == 1 and all(c.object == "chat.completion.chunk" for c in chunks)


def test_openai_continuous_usage_stats_count_every_chunk(client, demo):
    """vLLM's extension (guidellm sends it): usage in every chunk, completion tokens so far."""
    _, q, _ = QUESTIONS[10]
    prompt_ids, generated = greedy_tokens(demo, plain_prompt(q))
    chunks = list(client.completions.create(
        model=MODEL, prompt=plain_prompt(q), max_tokens=MAX_NEW_TOKENS, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"stream_options": {
            "include_usage": True, "continuous_usage_stats": True}}))
    *texts, last = chunks
    assert all(c.usage is not None for c in chunks)
    counts = [c.usage.completion_tokens for c in texts]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == last.usage.completion_tokens == len(generated)
    assert {c.usage.prompt_tokens for c in chunks} == {len(prompt_ids)}
    assert all(c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens for c in chunks)


def test_openai_models_list_and_retrieve(client, server):
    [model] = client.models.list().data
    assert model.id == MODEL and model.object == "model" and model.created > 1_600_000_000
    retrieved = client.models.retrieve(MODEL)
    assert retrieved.id == MODEL and retrieved.created == model.created
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("another-model")


def test_openai_greedy_n_choices_are_equal(client, eager):
    _, q, _ = QUESTIONS[15]
    completion = client.completions.create(model=MODEL, prompt=plain_prompt(q), max_tokens=MAX_NEW_TOKENS,
                                           temperature=0, n=3)
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert {c.text.strip() for c in completion.choices} == {eager[q]}
    assert completion.created > 1_600_000_000


def test_openai_chat_logprobs_are_the_eager_log_softmax(client, demo):
    """logprobs + top_logprobs on a chat: each chosen token's log-probability and the 3 most likely tokens'
    equal the eager model's float32 log-softmax within 1e-4."""
    model, tokenizer = demo
    _, q, _ = QUESTIONS[1]
    prompt_ids, generated = greedy_tokens(demo, plain_prompt(q))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": q}], temperature=0,
                                          max_tokens=MAX_NEW_TOKENS, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    expected = log_softmax(model, prompt_ids + generated)[len(prompt_ids) - 1:]
    assert len(content) == len(generated)  # eos included: it is a chosen token with its probability
    for entry, token, row in zip(content, generated, expected):
        assert entry.logprob == pytest.approx(row[token].item(), abs=1e-4)
        top = torch.topk(row, 3)
        assert [t.token for t in entry.top_logprobs] == [tokenizer.decode([i]) for i in top.indices.tolist()]
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], top.values.numpy(), atol=1e-4)
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy: the top token


def test_openai_completion_echo_logprobs_cover_the_prompt(client, demo):
    """echo + logprobs=2 on a completion: the prompt's tokens come back with their log-probabilities (the first
    has none), then the generated token; each equals the eager log-softmax within 1e-4."""
    model, tokenizer = demo
    _, q, _ = QUESTIONS[6]
    prompt = plain_prompt(q)
    prompt_ids, generated = greedy_tokens(demo, prompt)
    completion = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                           logprobs=2)
    [choice] = completion.choices
    ids = prompt_ids + generated[:1]
    assert choice.text == prompt + tokenizer.decode(generated[:1])
    logprobs = choice.logprobs
    assert logprobs.tokens == [tokenizer.decode([i]) for i in ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = log_softmax(model, ids)
    for position in range(1, len(ids)):
        row = expected[position - 1]
        assert logprobs.token_logprobs[position] == pytest.approx(row[ids[position]].item(), abs=1e-4)
        top = torch.topk(row, 2)
        got = logprobs.top_logprobs[position]
        assert list(got) == [tokenizer.decode([i]) for i in top.indices.tolist()]
        np.testing.assert_allclose(list(got.values()), top.values.numpy(), atol=1e-4)
    assert logprobs.text_offset[:2] == [0, len(logprobs.tokens[0])]


# ----------------------------------------------------------------------------------------------- lm-eval
def lm_eval_tasks(folder: str) -> None:
    """Three lm-eval tasks over QUESTIONS in `folder`: generate-until (plain prompts), generate-until over chat
    messages, and multiple choice by log-likelihood (the right answer and three other questions' answers of the
    same task, the right one at a rotating place). JSON is YAML: the configs are written as JSON."""
    rows = []
    for i, (task, q, a) in enumerate(QUESTIONS):
        same = [qa for t, _, qa in QUESTIONS if t == task and qa != a]
        wrong = [same[(i + k) % len(same)] for k in range(3)]
        label = i % 4
        rows.append({"question": q, "answer": a, "choices": wrong[:label] + [a] + wrong[label:], "label": label})
    data = os.path.join(folder, "questions.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    common = {"dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data},
                                                         "cache_dir": os.path.join(folder, "datasets")},
              "test_split": "test", "doc_to_target": "{{answer}}"}
    generate = {"output_type": "generate_until",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_NEW_TOKENS, "do_sample": False,
                                      "temperature": 0},
                "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                             {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    tasks = {"xlora_demo_generate": common | generate | {"doc_to_text": "{{question}} ="},
             "xlora_demo_chat": common | generate | {"doc_to_text": "{{question}}"},
             "xlora_demo_choice": common | {"output_type": "multiple_choice", "doc_to_text": "{{question}} =",
                                            "doc_to_choice": "choices", "doc_to_target": "label",
                                            "metric_list": [{"metric": "acc", "aggregation": "mean",
                                                             "higher_is_better": True}]}}
    for name, config in tasks.items():
        with open(os.path.join(folder, f"{name}.yaml"), "w") as f:
            json.dump({"task": name, **config}, f, indent=1)


@pytest.fixture(scope="module")
def lm_eval_run(tmp_path_factory):
    """`lm_eval.simple_evaluate` offline on the tasks of `lm_eval_tasks`; returns run(model, model_args, task)."""
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install -e \".[test]\")")
    from lm_eval.tasks import TaskManager

    folder = str(tmp_path_factory.mktemp("lm-eval-tasks"))
    lm_eval_tasks(folder)
    manager = TaskManager(include_path=folder, include_defaults=False)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_DATASETS_OFFLINE", "1")

        def run(model: str, model_args: dict, task: str, **options) -> tuple[dict, list[dict]]:
            out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=[task], task_manager=manager,
                                          log_samples=True, **options)
            samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
            return out["results"][task], samples
        yield run


def test_lm_eval_local_completions_generate_until_equals_the_eager_model(server, lm_eval_run, eager):
    results, samples = lm_eval_run("local-completions", dict(
        base_url=f"{server.url}/v1/completions", model=MODEL, tokenizer_backend="huggingface", tokenizer=TOKENIZER,
        max_length=256, batch_size=8, num_concurrent=1), "xlora_demo_generate")
    answers = [s["filtered_resps"][0] for s in samples]
    assert answers == [eager[q] for _, q, _ in QUESTIONS]
    expected = sum(eager[q] == a for _, q, a in QUESTIONS) / len(QUESTIONS)
    assert results["exact_match,strip"] == pytest.approx(expected)
    assert expected >= 0.5  # the demo knows its tasks: a comparison of two wrong models would prove little


def test_lm_eval_local_chat_completions_generate_until_equals_the_eager_model(server, lm_eval_run, eager):
    results, samples = lm_eval_run("local-chat-completions", dict(
        base_url=f"{server.url}/v1/chat/completions", model=MODEL, max_length=256, num_concurrent=4),
        "xlora_demo_chat", apply_chat_template=True)
    assert [s["filtered_resps"][0] for s in samples] == [eager[q] for _, q, _ in QUESTIONS]
    expected = sum(eager[q] == a for _, q, a in QUESTIONS) / len(QUESTIONS)
    assert results["exact_match,strip"] == pytest.approx(expected)


def test_lm_eval_local_completions_multiple_choice_picks_the_eager_choice(server, lm_eval_run, demo):
    """Log-likelihood requests (`echo` + `logprobs`): every choice's summed log-probability equals the eager
    model's within 1e-3, so lm-eval picks the eager model's choice on every question and the accuracies are
    equal."""
    model, tokenizer = demo
    results, samples = lm_eval_run("local-completions", dict(
        base_url=f"{server.url}/v1/completions", model=MODEL, tokenizer_backend="huggingface", tokenizer=TOKENIZER,
        max_length=256, batch_size=8, num_concurrent=1), "xlora_demo_choice")
    picks = []
    for sample in samples:
        context, choices = plain_prompt(sample["doc"]["question"]), sample["doc"]["choices"]
        context_ids = tokenizer(context)["input_ids"]
        sums = []
        for choice in choices:  # lm-eval's split: the whole text's tokens after the context's
            ids = tokenizer(f"{context} {choice}")["input_ids"]
            assert ids[:len(context_ids)] == context_ids
            rows = log_softmax(model, ids)[len(context_ids) - 1:-1]
            sums.append(rows.gather(1, torch.tensor(ids[len(context_ids):])[:, None]).sum().item())
        served = [ll for ll, _ in sample["filtered_resps"]]
        np.testing.assert_allclose(served, sums, atol=1e-3)
        picks.append(int(np.argmax(sums)))
        assert int(np.argmax(served)) == picks[-1]
    expected = sum(p == s["doc"]["label"] for p, s in zip(picks, samples)) / len(samples)
    assert results["acc,none"] == pytest.approx(expected)
    assert expected >= 0.5
