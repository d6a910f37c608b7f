"""Validation of an exported graph against the eager model, with ONNX Runtime.

Two phases, so that the eager model and a graph never need memory at the same time (a 1B model
would otherwise be held three times: eager, main graph, frozen graph):

1. `eager_reference`: the eager model's decoding loop (`xLoRAModel.decode`: a prefill of
   left-padded prompts, then greedy decode steps) for every `top_k` to check, recording each
   step's inputs, logits, scalings and chosen tokens (small: only real positions are kept).
2. `compare_with_reference`: the graph fed the same inputs step by step, its own `present`
   outputs as the next past; the max abs difference of each output over real positions, and
   the greedy tokens (logits and tokens only as long as the graph's top-k keeps the experts the
   eager model kept, see `compare_with_reference`).

Tolerances scale with what is compared: logits within max(floor, relative x the
largest |logit|), scalings within floor x a factor that grows with depth and width (float error
accumulates through the scaling pass before the classifier sees it), and the graph's greedy token
equal to the eager one wherever the eager top-2 margin exceeds the logits tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch

from xlora_runtime.format import contract as C
from xlora_runtime.session import open_graph

from .generation import left_pad
from .model import xLoRAModel

__all__ = ["TOLERANCES", "EagerReference", "ParityResult", "compare_with_eager", "compare_with_reference",
           "eager_reference", "frozen_scalings", "tolerance", "validation_prompts"]

# Absolute floors of the max abs difference between a graph and the eager model of the same dtype.
TOLERANCES = {"fp32": {C.LOGITS: 1e-4, C.SCALINGS: 1e-5}, "fp16": {C.LOGITS: 5e-2, C.SCALINGS: 1e-2}}
# Logits: the tolerance also covers this fraction of the largest |logit| compared.
RELATIVE_LOGITS = {"fp32": 5e-5, "fp16": 5e-3}
LOGITS_FLOOR_SIZE = 34.0  # the size factor up to which the logits' floors hold as they are (TinyLlama-1.1B: 33.7)
FIRST_ORDINARY_ID = 3  # ids below are special tokens in the usual vocabularies (pad, bos, eos)


def size_factor(num_layers: int, hidden_size: int) -> float:
    """How much float error the scaling pass accumulates against the tiny fixtures (2 layers, width 64): depth
    x width relative to them to the power 0.6 (a little faster than the random-walk square root), at least 1
    (TinyLlama-1.1B: about 34, where a correct graph's scalings differ by up to 1.7e-4)."""
    return max(1.0, (num_layers * hidden_size / 128) ** 0.6)


def tolerance(dtype: str, name: str, magnitude: float, factor: float = 1.0) -> float:
    """The allowed max abs difference of output `name` (`logits` or `scalings`) for a graph of `dtype`.

    The logits' floor was measured up to TinyLlama-1.1B's size; past it, it grows with the square root of the
    size factor (Mistral-7B's shape in fp16, random weights with small logits: 0.058 for a correct graph, against
    the 0.05 floor).

    Args:
        magnitude: the largest |value| of the eager output compared (used for logits).
        factor: `size_factor` of the model.
    """
    floor = TOLERANCES[dtype][name]
    if name == C.LOGITS:
        return max(floor * max(1.0, factor / LOGITS_FLOOR_SIZE) ** 0.5, RELATIVE_LOGITS[dtype] * magnitude)
    return floor * factor


@dataclass
class ParityResult:
    """Max abs differences (graph vs eager) per output, over every step; `steps` decode steps; greedy tokens
    that differ where the eager choice was clear (`token_mismatches`); the largest |eager logit|."""

    max_diff: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    token_mismatches: int = 0
    logits_magnitude: float = 0.0
    tolerances: dict[str, float] = field(default_factory=dict)  # what the exporter held the differences to
    skipped_positions: int = 0  # logits not compared once the graph's top-k kept other experts (a near-tie)

    def update(self, name: str, graph: np.ndarray, eager: np.ndarray) -> None:
        """Fold in one step's comparison of output `name` (arrays of the same shape)."""
        diff = float(np.abs(graph.astype(np.float64) - eager.astype(np.float64)).max()) if graph.size else 0.0
        self.max_diff[name] = max(self.max_diff.get(name, 0.0), diff)
        if name == C.LOGITS and eager.size:
            self.logits_magnitude = max(self.logits_magnitude, float(np.abs(eager.astype(np.float64)).max()))


@dataclass
class _Step:
    feed: dict[str, np.ndarray]  # input_ids, attention_mask, position_ids
    real: np.ndarray  # bool (b, s): real tokens (not padding)
    logits: np.ndarray  # eager logits (b, s, vocab)
    scalings: np.ndarray | None  # eager scalings (b, s, L, n); None for the frozen graph


@dataclass
class EagerReference:
    """What the eager model computed for one `top_k` (and, for the frozen graph, its fixed scalings)."""

    top_k: int
    frozen: bool
    steps: list[_Step]
    fixed_scalings: np.ndarray | None  # (b, L, n) the frozen graph's `scalings` input
    dtype: str


def validation_prompts(vocab_size: int, lengths: tuple[int, ...] = (7, 3), seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths, drawn deterministically (`seed`) from the ids of the model's vocabulary
    (above the usual special ids when the vocabulary has any others)."""
    rng = np.random.default_rng(seed)
    low = FIRST_ORDINARY_ID if vocab_size > FIRST_ORDINARY_ID else 0
    return [rng.integers(low, vocab_size, n).tolist() for n in lengths]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def frozen_scalings(model: xLoRAModel, prompts: list[list[int]] | tuple[list[int], ...] | None = None
                    ) -> torch.Tensor:
    """(b, L, n): the scalings of each prompt's last token (the frozen graph's `scalings` input of a reference;
    the same for every `top_k`, so a caller checking several computes them once)."""
    ids, mask = left_pad(list(prompts or validation_prompts(model.config.vocab_size)))
    with torch.no_grad():
        return model(ids, attention_mask=mask, use_cache=False).scalings[:, -1]


def eager_reference(model: xLoRAModel, top_k: int = 0, steps: int = 8, frozen: bool = False,
                    prompts: list[list[int]] | tuple[list[int], ...] | None = None,
                    fixed: torch.Tensor | None = None) -> EagerReference:
    """Run the eager model's greedy decoding and keep what a graph must reproduce.

    Args:
        model: the eager model (the graph's dtype).
        top_k: experts kept (0 = dense), the graph's `top_k` input.
        steps: decode steps after the prefill.
        frozen: reference for the frozen graph: scalings fixed to those of each prompt's last token.
        prompts: token ids (default `validation_prompts` of the model's vocabulary: batch 2, left padded).
        fixed: with `frozen`, `frozen_scalings(model, prompts)` when the caller has them (else computed here).
    """
    ids, mask = left_pad(list(prompts or validation_prompts(model.config.vocab_size)))
    if frozen and fixed is None:
        fixed = frozen_scalings(model, prompts)
    elif not frozen:
        fixed = None
    real, out = mask.bool().numpy(), []
    for step in model.decode(ids, mask, steps + 1, expert_top_k=top_k, scalings=fixed):
        feed = {C.INPUT_IDS: step.input_ids.numpy(), C.ATTENTION_MASK: step.attention_mask.numpy(),
                C.POSITION_IDS: step.position_ids.numpy()}
        out.append(_Step(feed, real if step.step == 0 else np.ones((ids.shape[0], 1), bool), _numpy(step.logits),
                         None if frozen else _numpy(step.scalings)))
    dtype = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[model.model.lm_head.weight.dtype]
    return EagerReference(top_k, frozen, out, None if fixed is None else _numpy(fixed), dtype)


def _kept(scalings: np.ndarray, top_k: int) -> np.ndarray:
    """bool (..., n): the experts top-k keeps (ties to the lower index, as `classifier.top_k_gates` does)."""
    n = scalings.shape[-1]
    k = n if top_k <= 0 else min(top_k, n)
    x = scalings.astype(np.float64)
    idx = np.arange(n)
    beats = (x[..., None, :] > x[..., :, None]) | ((x[..., None, :] == x[..., :, None]) & (idx[None, :] < idx[:, None]))
    return beats.sum(-1) < k


def compare_with_reference(reference: EagerReference, session: ort.InferenceSession, num_layers: int,
                           kv_heads: int, head_dim: int) -> ParityResult:
    """Feed the graph the reference's inputs (its own presents as pasts) and compare (module docstring).

    Top-k is discontinuous: where the graph's scalings, within tolerance of the eager ones, rank two
    near-tied experts the other way, it keeps another expert, legitimately. From such a position on, a row's
    logits (and tokens) are not compared (its later positions attend to it); its scalings still are.

    Args:
        session: the main graph, or the frozen graph for a frozen reference (whose scalings are the eager ones).
    """
    frozen = reference.frozen
    b = reference.steps[0].feed[C.INPUT_IDS].shape[0]
    kv_dtype = np.float16 if reference.dtype == "fp16" else np.float32
    pasts = C.past_names(num_layers) + ([] if frozen else C.past_names(num_layers, scaling=True))
    presents = C.present_names(num_layers) + ([] if frozen else C.present_names(num_layers, scaling=True))
    feed = {name: np.zeros((b, kv_heads, 0, head_dim), kv_dtype) for name in pasts}
    feed[C.TOP_K] = np.array(reference.top_k, dtype=np.int64)
    if frozen:
        feed[C.SCALINGS] = reference.fixed_scalings.astype(kv_dtype)
    result = ParityResult()
    greedy = []  # (graph's last-position logits, eager's) of the rows still compared, per step
    clear_rows = np.ones(b, bool)  # rows with no near-tie of the top-k selection so far
    for step in reference.steps:
        feed.update(step.feed)
        outs = dict(zip(C.output_names(num_layers, frozen), session.run(None, feed)))
        same = np.ones(step.real.shape, bool) if frozen else (
            _kept(outs[C.SCALINGS], reference.top_k) == _kept(step.scalings, reference.top_k)).all((-2, -1))
        clear = np.logical_and.accumulate(same | ~step.real, axis=1)  # (b, s) before any selection differs
        compared = step.real & clear & clear_rows[:, None]  # (b, s)
        result.skipped_positions += int((step.real & ~compared).sum())
        kept = outs[C.LOGITS].shape[1]  # the last position only, or every position (--all-logits)
        result.update(C.LOGITS, outs[C.LOGITS][compared[:, -kept:]], step.logits[:, -kept:][compared[:, -kept:]])
        if not frozen:
            result.update(C.SCALINGS, outs[C.SCALINGS][step.real], step.scalings[step.real])
        last = compared[:, -1]
        greedy.append((outs[C.LOGITS][last, -1], step.logits[last, -1]))
        clear_rows &= clear[:, -1]
        feed.update({p: outs[q] for p, q in zip(pasts, presents)})
    margin = 2 * tolerance(reference.dtype, C.LOGITS, result.logits_magnitude)
    for graph_last, eager_last in greedy:  # a flip between near-tied tokens (within tolerance) is no error
        eager_last = eager_last.astype(np.float64)
        chosen = graph_last.argmax(-1)
        lost = eager_last.max(-1) - eager_last[np.arange(len(chosen)), chosen]
        result.token_mismatches += int((lost > margin).sum())
    result.steps = len(reference.steps) - 1
    return result


def compare_with_eager(model: xLoRAModel, graph: str, top_k: int = 0, steps: int = 8, frozen: bool = False,
                       prompts: list[list[int]] | tuple[list[int], ...] | None = None) -> ParityResult:
    """Both phases at once, for tests and small models: eager reference, then the graph.

    Args:
        graph: the main graph (`OUT.onnx`); with `frozen`, the frozen graph beside it is compared.
    """
    reference = eager_reference(model, top_k, steps, frozen, prompts)
    path = C.frozen_path(graph) if frozen else graph
    spec = model.spec
    return compare_with_reference(reference, open_graph(path), spec.num_layers, spec.kv_heads, spec.head_dim)
