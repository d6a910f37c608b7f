"""The trained demo (`models/xlora-demo`, committed; `python -m models.recipes xlora-demo` rebuilds it): it is the
recipe's build, its chat template renders what it was trained on, the classifier routes held-out prompts to their
task's expert (and switches within one chat), and the exported graph run by the runtime gives the eager tokens."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from models.demo import TASKS, chat_prompt, eval_set, plain_prompt
from models.demo_eval import DEFAULT_MODEL, answer_text, eager_answers, routing
from models.demo_plot import SWITCH_QUESTION, SWITCH_TURNS, switch_prompt
from models.recipes import RECIPES

ROUTING_PROMPTS = 25  # per task


@pytest.fixture(scope="module")
def demo():
    from xlora_export.xlora_utils import load_model

    return load_model(DEFAULT_MODEL)


def test_the_checkpoint_is_the_recipes_build(demo):
    """The committed checkpoint records the recipe it was trained with: a changed recipe needs a rebuild."""
    model, _ = demo
    with open(os.path.join(DEFAULT_MODEL, "demo.json")) as f:
        record = json.load(f)
    assert record["recipe"] == dataclasses.asdict(RECIPES["xlora-demo"]), (
        "models/xlora-demo was built from another recipe: python -m models.recipes xlora-demo --out models")
    assert model.adapter_names == list(TASKS)


def test_the_chat_template_renders_the_training_format(demo):
    _, tokenizer = demo
    with open(os.path.join(DEFAULT_MODEL, "base", "tokenizer_config.json")) as f:
        assert "chat_template" in json.load(f)
    turns = [("12+7", "19"), ("close: ( [", "] )")]
    messages = [{"role": "system", "content": "Answer briefly."}]
    for q, a in turns:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    messages.append({"role": "user", "content": "reverse: cat dog"})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == chat_prompt(turns, "reverse: cat dog", system="Answer briefly.")


@pytest.mark.parametrize("task", TASKS)
def test_the_classifier_routes_held_out_prompts_to_their_expert(demo, task):
    model, tokenizer = demo
    prompts = [tokenizer(plain_prompt(q))["input_ids"] for q, _ in eval_set(task, ROUTING_PROMPTS, seed=7)]
    got = eager_answers(model, tokenizer, prompts, None, max_new_tokens=1)
    by_prompt, _ = routing(got.prefill_scalings, prompts, model.adapter_names.index(task))
    assert by_prompt >= 0.9, f"{task}: {by_prompt:.0%} of held-out prompts routed to the {task} expert"


def test_routing_switches_with_the_task_within_one_chat(demo):
    """In a chat whose turns are of different tasks, each turn (question and answer) is routed to its task's expert."""
    model, tokenizer = demo
    ids = tokenizer(switch_prompt())["input_ids"]
    with torch.no_grad():
        scalings = model(torch.tensor([ids])).scalings[0].mean(1)  # (tokens, n)
    turns = [(q, a) for _, q, a in SWITCH_TURNS]
    tasks = [t for t, _, _ in SWITCH_TURNS] + [SWITCH_QUESTION[0]]
    ends = [len(tokenizer(chat_prompt(turns[:k], turns[k][0]) + f" {turns[k][1]}</s>")["input_ids"])
            for k in range(len(turns))] + [len(ids)]
    start = 0
    for task, end in zip(tasks, ends):
        dominant = model.adapter_names[int(scalings[start:end].mean(0).argmax())]
        assert dominant == task, f"tokens {start}..{end - 1}: routed to {dominant}, expected {task}"
        start = end


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    from xlora_export.export import ExportOptions, export

    path = str(tmp_path_factory.mktemp("demo") / "demo.onnx")
    export(DEFAULT_MODEL, path, ExportOptions(validate=False))
    return path


def test_the_graph_gives_the_eager_greedy_tokens(demo, graph):
    from xlora_runtime import Generator, XLoraSession

    model, tokenizer = demo
    texts = [plain_prompt(q) for task in TASKS for q, _ in eval_set(task, 2, seed=3)] + [switch_prompt()]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    eager = eager_answers(model, tokenizer, prompts, None)
    results = Generator(XLoraSession(graph, threads=2)).generate(texts, max_new_tokens=12, expert_top_k=0)
    assert [r.prompt_ids for r in results] == prompts  # the runtime's tokenizer is the checkpoint's
    assert [r.tokens for r in results] == eager.tokens
    assert answer_text(tokenizer, results[-1].tokens, tokenizer.eos_token_id) != ""


def test_the_graph_declares_static_module_and_expert_dims(demo, graph):
    """A non-layerwise classifier (the demo's) still gives the `scalings` output static L and n dims."""
    import onnx

    model, _ = demo
    [scalings] = [o for o in onnx.load(graph, load_external_data=False).graph.output if o.name == "scalings"]
    dims = [d.dim_value or d.dim_param for d in scalings.type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence", len(model.module_names), len(model.adapter_names)]


def test_the_eager_demo_command_answers_and_stops_at_eos(capsys):
    """`python -m xlora_export.demo models/xlora-demo PROMPT`: each new token with its top expert, up to eos."""
    from xlora_export import demo as demo_command

    assert demo_command.main([DEFAULT_MODEL, "reverse: cat fish moon ="]) == 0
    lines = capsys.readouterr().out.splitlines()[2:]
    assert [line.split("'")[1] for line in lines] == [" moon", " fish", " cat", "</s>"]
    assert all(line.split("top expert ")[1].startswith("reverse") for line in lines)


def test_generate_chat_renders_the_exports_template_as_transformers_does(demo, graph, capsys):
    """`xlora-generate --chat`: each prompt a user message (after --system) through OUT.chat_template.jinja; the
    tokens are those of the eager model on transformers' `apply_chat_template` ids."""
    from xlora_runtime.cli import generate_main

    model, tokenizer = demo
    questions = ["spell: 305", "close: ( [ { < ("]
    assert generate_main([graph, "--chat", "--system", "Answer briefly.", "--json", *questions]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    prompts = [tokenizer.apply_chat_template([{"role": "system", "content": "Answer briefly."},
                                              {"role": "user", "content": q}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for q in questions]
    assert [r["tokens"] for r in results] == eager_answers(model, tokenizer, prompts, None).tokens
    assert [r["text"].strip() for r in results] == ["three zero five", ") > } ] )"]


def test_generate_chat_refusals(graph, tmp_path, capsys, monkeypatch):
    import shutil
    import sys

    from xlora_runtime.cli import generate_main
    from xlora_runtime.format import contract as C

    def copy_without(folder: str, missing: str) -> str:
        """The export's files in `folder`, all but `missing` (a path function of the contract)."""
        os.makedirs(folder)
        for path in (graph, graph + ".data", C.tokenizer_path(graph), C.chat_template_path(graph)):
            if path != getattr(C, missing)(graph) and os.path.exists(path):
                shutil.copy(path, os.path.join(folder, os.path.basename(path)))
        return os.path.join(folder, os.path.basename(graph))

    no_template = copy_without(str(tmp_path / "a"), "chat_template_path")
    no_tokenizer = copy_without(str(tmp_path / "b"), "tokenizer_path")
    cases = [([graph, "--system", "x", "a"], "--system is a chat message: add --chat"),
             ([graph, "--chat", "--ids", "1,2"], "--chat and --ids: chat messages are text"),
             ([no_template, "--chat", "a"], f"--chat: {no_template} has no chat template beside it "
              f"({C.chat_template_path(no_template)}; the checkpoint's tokenizer config had none)"),
             ([no_tokenizer, "--chat", "a"], f"--chat: no tokenizer travelled with {no_tokenizer} "
              f"({C.tokenizer_path(no_tokenizer)})")]
    for argv, message in cases:
        assert generate_main(argv) == 1
        assert capsys.readouterr().err.strip() == f"xlora-generate: error: {message}"
    monkeypatch.setitem(sys.modules, "jinja2", None)  # not installed
    assert generate_main([graph, "--chat", "a"]) == 1
    assert capsys.readouterr().err.strip() == (f"xlora-generate: error: {C.chat_template_path(graph)}: rendering "
                                               f"a chat template needs jinja2: pip install \"./runtime[chat]\" "
                                               f"(or jinja2)")
