"""The `xlora-related` recipe (models/related.py): its base corpus holds the tasks' answered lines, which the demo's
never does, and `models.recipes.build` makes it an X-LoRA checkpoint of the demo's tasks (a few training steps here;
the full build takes minutes)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re

from models.demo import TASKS
from models.recipes import RECIPES, SLOW_RECIPES, build
from models.related import RelatedRecipe, related_example

ANSWERED_SPELL = re.compile(r"spell: \d+ = [a-z]")  # a spell question followed by its answer


def _texts(share: float, count: int = 300) -> list[str]:
    rng = random.Random(0)
    return ["".join(text for text, _, _ in related_example(rng, share)) for _ in range(count)]


def test_the_base_reads_answered_task_lines_only_in_the_related_corpus():
    assert any(ANSWERED_SPELL.search(text) for text in _texts(0.5))
    assert not any(ANSWERED_SPELL.search(text) for text in _texts(0.0))  # the demo's base corpus
    rng = random.Random(0)
    assert all(trained for _ in range(50) for _, trained, _ in related_example(rng, 1.0))  # every token trained


def test_a_short_build_is_a_checkpoint_of_the_demo_tasks(tmp_path):
    from xlora_export.xlora_utils import load_model

    assert isinstance(RECIPES["xlora-related"], RelatedRecipe) and "xlora-related" in SLOW_RECIPES
    recipe = dataclasses.replace(RECIPES["xlora-related"], base_steps=2, expert_steps=2, classifier_steps=2, batch=2)
    folder = build(recipe, str(tmp_path / "related"))
    model, _ = load_model(folder)
    assert model.adapter_names == list(TASKS)
    with open(os.path.join(folder, "related.json")) as f:
        assert json.load(f)["recipe"] == dataclasses.asdict(recipe)
    for task in TASKS:
        with open(os.path.join(folder, task, "adapter_config.json")) as f:
            assert json.load(f)["base_model_name_or_path"] == "../base"
