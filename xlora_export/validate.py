"""Validation of an exported graph against the eager model, with ONNX Runtime.

Both run the same steps: the eager model's decoding loop (`xLoRAModel.decode`: a prefill of
left-padded prompts, then greedy decode steps), the graph fed the same inputs and its own
`present` outputs as the next past. Reported: the max abs difference of each output over real
(non-padded) positions. The tolerances by dtype (SPEC section 8) are those of the exporter and
of `xlora-parity`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from xlora_runtime import XLoraSession
from xlora_runtime import contract as C

from .generation import left_pad
from .model import xLoRAModel

__all__ = ["TOLERANCES", "ParityResult", "compare_with_eager", "validation_prompts"]

# Max abs difference allowed between a graph and the eager model of the same dtype, per output (SPEC section 8).
TOLERANCES = {"fp32": {C.LOGITS: 1e-4, C.SCALINGS: 1e-5}, "fp16": {C.LOGITS: 5e-2, C.SCALINGS: 1e-2}}
FIRST_ORDINARY_ID = 3  # ids below are special tokens in the usual vocabularies (pad, bos, eos)


@dataclass
class ParityResult:
    """Max abs differences (graph vs eager) per output, over every step; `steps` decode steps."""

    max_diff: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def update(self, name: str, graph: np.ndarray, eager: np.ndarray) -> None:
        """Fold in one step's comparison of output `name` (arrays of the same shape)."""
        diff = float(np.abs(graph.astype(np.float64) - eager.astype(np.float64)).max()) if graph.size else 0.0
        self.max_diff[name] = max(self.max_diff.get(name, 0.0), diff)


def validation_prompts(vocab_size: int, lengths: tuple[int, ...] = (7, 3), seed: int = 0) -> list[list[int]]:
    """Prompts of the given lengths, drawn deterministically (`seed`) from the ids of the model's vocabulary
    (above the usual special ids when the vocabulary has any others)."""
    rng = np.random.default_rng(seed)
    low = FIRST_ORDINARY_ID if vocab_size > FIRST_ORDINARY_ID else 0
    return [rng.integers(low, vocab_size, n).tolist() for n in lengths]


def compare_with_eager(model: xLoRAModel, graph: str, top_k: int = 0, steps: int = 8, frozen: bool = False,
                       prompts: list[list[int]] | tuple[list[int], ...] | None = None) -> ParityResult:
    """Run graph and eager model side by side (see the module docstring).

    Args:
        model: the eager model the graph was exported from (same dtype).
        graph: the main graph (`OUT.onnx`), opened with the runtime's `XLoraSession`.
        top_k: the graph's `top_k` input (0 = dense); the eager model gets the same `expert_top_k`.
        steps: decode steps after the prefill.
        frozen: compare the frozen graph beside it (`OUT.frozen.onnx`): scalings fixed to those of each
            prompt's last token.
        prompts: token ids (default `validation_prompts` of the model's vocabulary: batch 2, left padded).
    Returns:
        ParityResult: max abs differences of `logits` (b, s, vocab) and, two-pass only, `scalings` (b, s, L, n).
    """
    xsession = XLoraSession(graph)
    info = xsession.info
    session = xsession.frozen if frozen else xsession.main
    cfg = model.config
    n_layers, kv_heads, head_dim = model.spec.num_layers, model.spec.kv_heads, model.spec.head_dim
    ids, mask = left_pad(list(prompts or validation_prompts(cfg.vocab_size)))
    b = ids.shape[0]
    pasts = C.past_names(n_layers) + ([] if frozen else C.past_names(n_layers, scaling=True))
    presents = C.present_names(n_layers) + ([] if frozen else C.present_names(n_layers, scaling=True))
    feed = {name: np.zeros((b, kv_heads, 0, head_dim), info.kv_dtype) for name in pasts}
    feed[C.TOP_K] = np.array(top_k, dtype=np.int64)
    fixed = None
    if frozen:
        with torch.no_grad():
            fixed = model(ids, attention_mask=mask, use_cache=False).scalings[:, -1]  # (b, L, n)
        feed[C.SCALINGS] = fixed.float().numpy().astype(info.kv_dtype)
    result, real = ParityResult(), mask.bool().numpy()
    for step in model.decode(ids, mask, steps + 1, expert_top_k=top_k, scalings=fixed):
        feed.update({C.INPUT_IDS: step.input_ids.numpy(), C.ATTENTION_MASK: step.attention_mask.numpy(),
                     C.POSITION_IDS: step.position_ids.numpy()})
        outs = dict(zip(C.output_names(n_layers, frozen), session.run(None, feed)))
        rows = real if step.step == 0 else np.ones((b, 1), bool)
        result.update(C.LOGITS, outs[C.LOGITS][rows], step.logits.float().numpy()[rows])
        if not frozen:
            result.update(C.SCALINGS, outs[C.SCALINGS][rows], step.scalings.float().numpy()[rows])
        feed.update({p: outs[q] for p, q in zip(pasts, presents)})
    result.steps = steps
    return result
