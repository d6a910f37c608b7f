"""A trained X-LoRA model whose experts adapt a base that already knows their kind of text (`xlora-related`).

    python -m models.recipes xlora-related    # models/built/xlora-related (about 8 minutes, one thread)

The demo's base (models/demo.py) never reads a task's answer: only its experts know the tasks, so the base model's
next token rarely equals X-LoRA's. A deployed X-LoRA model is usually the other case: LoRA experts fine-tuned from a
pretrained model on text that model has seen the like of. This recipe builds that case from the demo's pieces
(tasks, tokenizer, the experts' and the classifier's training): its base is pretrained on the demo's base corpus
mixed with the tasks' answered lines (`answered_share` of the examples, every token trained), so it already answers
most questions; the experts are then fine-tuned from it on their tasks and the classifier routes them, as in the
demo. What it is for: measuring how often the base model's prediction (X-LoRA's scaling pass) drafts X-LoRA's own
next token (benchmarks/bench_speculative.py).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from models.demo import (
    DemoRecipe,
    Example,
    base_example,
    build_demo,
    mixture_example,
    train_base,
)


@dataclass
class RelatedRecipe(DemoRecipe):
    """The demo's sizes, a base that reads the tasks' answers too, shorter expert and classifier training (the
    experts start from a base that knows most of their text)."""

    base_steps: int = 800
    answered_share: float = 0.5  # share of the base corpus that is answered task lines (the demo's base: none)
    expert_steps: int = 800
    classifier_steps: int = 500


def related_example(rng: random.Random, answered_share: float) -> Example:
    """One example of the base's corpus: with probability `answered_share` an example of the tasks' mixture with
    its answers (every segment trained), else one of the demo's base corpus."""
    if rng.random() < answered_share:
        return [(text, True, None) for text, _, _ in mixture_example(rng)]
    return base_example(rng)


def train_related_base(recipe: RelatedRecipe, base_dir: str, log: Callable[[str], None]) -> float:
    """Tokenizer and base model in `base_dir` (the demo's shape and tokenizer, `related_example`'s corpus); returns
    the last training loss."""
    return train_base(recipe, base_dir, log, lambda rng: related_example(rng, recipe.answered_share))


def build_related(recipe: RelatedRecipe, out_dir: str, log: Callable[[str], None] = print) -> str:
    """Train the whole checkpoint into `out_dir` (replaced); returns it. `out_dir/related.json` records the recipe,
    the last training losses and the time taken (`build_demo` with this recipe's base training)."""
    return build_demo(recipe, out_dir, log, train_related_base, "related.json")
