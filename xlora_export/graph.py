"""The module the exporter traces: `xLoRAModel.forward` with the graph contract's flat signature.

    (input_ids, attention_mask, position_ids, *past, *scaling_past, top_k)
        -> xLoRAModel.forward(cache=XLoraCache(past, scaling_past), expert_top_k=top_k,
                              logits_to_keep=1, or 0 with `all_logits`)
        -> (logits, scalings, *present, *scaling_present)

The frozen variant takes `scalings` (batch, L, n) instead of the scaling caches and returns
(logits, *present). No math lives here: it only reshapes arguments around the one forward.
"""

from __future__ import annotations

import torch
from torch import nn

from .cache import XLoraCache
from .decoder import KV
from .model import xLoRAModel

__all__ = ["XLoraGraph"]


def _pairs(flat: tuple[torch.Tensor, ...]) -> list[KV]:
    return [(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]


def _flat(kvs: list[KV]) -> list[torch.Tensor]:
    return [t for kv in kvs for t in kv]


class XLoraGraph(nn.Module):
    """Flat-signature wrapper of an `xLoRAModel` for tracing (main graph, or `frozen=True`); logits of the last
    position (generation), or of every position with `all_logits=True` (scoring)."""

    def __init__(self, model: xLoRAModel, frozen: bool = False, all_logits: bool = False) -> None:
        super().__init__()
        self.model = model
        self.frozen = frozen
        self.logits_to_keep = 0 if all_logits else 1
        self.n_layers = model.config.num_hidden_layers
        self.train(model.training)  # a fresh Module is in training mode, and export restores it recursively

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *rest: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """See the module docstring; `rest` is (*past, *scaling_past | scalings, top_k)."""
        n = 2 * self.n_layers
        past, top_k = _pairs(rest[:n]), rest[-1]
        if self.frozen:
            scalings, scaling_past = rest[n], None
        else:
            scalings, scaling_past = None, _pairs(rest[n:2 * n])
        out = self.model(input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=XLoraCache(past, scaling_past), use_cache=True, scalings=scalings,
                         expert_top_k=top_k, logits_to_keep=self.logits_to_keep)
        if self.frozen:
            return (out.logits, *_flat(out.cache.real))
        return (out.logits, out.scalings, *_flat(out.cache.real), *_flat(out.cache.scaling))
