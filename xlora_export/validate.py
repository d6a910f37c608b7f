"""Validation of an exported graph against the eager model, with ONNX Runtime.

Both run the same steps: a prefill of left-padded prompts, then `steps` greedy decode steps
chosen by the eager model, the graph fed its own `present` outputs as the next past. Reported:
the max abs difference of each output over real (non-padded) positions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort
import torch

from xlora_runtime import contract as C

from .model import xLoRAModel

__all__ = ["ParityResult", "compare_with_eager", "ort_session", "PROMPTS"]

PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9])  # two prompts of different lengths (left padded)


@dataclass
class ParityResult:
    """Max abs differences (graph vs eager) per output, over every step; `steps` decode steps."""

    max_diff: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    def update(self, name: str, graph: np.ndarray, eager: np.ndarray) -> None:
        diff = float(np.abs(graph.astype(np.float64) - eager.astype(np.float64)).max()) if graph.size else 0.0
        self.max_diff[name] = max(self.max_diff.get(name, 0.0), diff)


def ort_session(path: str, threads: int = 0, providers: list[str] | None = None) -> ort.InferenceSession:
    """A session (CPU by default) that does not spin idle threads."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])


def _np_dtype(session: ort.InferenceSession, name: str) -> np.dtype:
    kind = {i.name: i.type for i in session.get_inputs()}[name]
    return {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}[kind]


def compare_with_eager(model: xLoRAModel, onnx_path: str, top_k: int = 0, steps: int = 8, frozen: bool = False,
                       prompts: tuple[list[int], ...] = PROMPTS, session: ort.InferenceSession | None = None
                       ) -> ParityResult:
    """Run graph and eager model side by side (see the module docstring).

    Args:
        model: the eager model the graph was exported from (same dtype).
        onnx_path: the main graph, or the frozen graph with `frozen=True`.
        top_k: the graph's `top_k` input (0 = dense); the eager model gets the same.
        steps: decode steps after the prefill.
        frozen: compare the frozen graph: scalings are fixed to those of each prompt's last token.
    """
    session = session or ort_session(onnx_path)
    cfg = model.config
    n_layers, kv_heads = cfg.num_hidden_layers, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    b = ids.shape[0]
    pasts = C.past_names(n_layers) + ([] if frozen else C.past_names(n_layers, scaling=True))
    presents = C.present_names(n_layers) + ([] if frozen else C.present_names(n_layers, scaling=True))
    kv_dtype = _np_dtype(session, pasts[0])
    feed = {name: np.zeros((b, kv_heads, 0, head_dim), kv_dtype) for name in pasts}
    feed[C.TOP_K] = np.array(top_k, dtype=np.int64)
    result = ParityResult()
    fixed = None
    if frozen:
        with torch.no_grad():
            fixed = model(ids, attention_mask=mask, use_cache=False).scalings[:, -1]  # (b, L, n)
        feed[C.SCALINGS] = fixed.float().numpy().astype(_np_dtype(session, C.SCALINGS))
    cache, new_ids, real = None, ids, mask.bool().numpy()
    with torch.no_grad():
        for step in range(steps + 1):
            pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, -new_ids.shape[1]:]
            feed.update({C.INPUT_IDS: new_ids.numpy(), C.ATTENTION_MASK: mask.numpy(), C.POSITION_IDS: pos.numpy()})
            outs = dict(zip(C.output_names(n_layers, frozen), session.run(None, feed)))
            eager = model(new_ids, attention_mask=mask, position_ids=pos, cache=cache, top_k=top_k, scalings=fixed,
                          use_cache=True)
            rows = real if step == 0 else np.ones((b, 1), bool)
            result.update(C.LOGITS, outs[C.LOGITS][rows], eager.logits.float().numpy()[rows])
            if not frozen:
                result.update(C.SCALINGS, outs[C.SCALINGS][rows], eager.scalings.float().numpy()[rows])
            cache = eager.cache
            feed.update({p: outs[q] for p, q in zip(pasts, presents)})
            new_ids = eager.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones_like(new_ids)], 1)
    result.steps = steps
    return result
