"""The two KV caches of an X-LoRA model.

Exact caching needs one cache per pass: the scaling pass (base model, or every expert at
`scaling_pass_value`) and the real pass (experts gated per token) see different keys and
values for the same tokens. A token's scalings depend only on the tokens up to it, so
both caches advance together, one entry per token, and neither is ever recomputed.
In the frozen path (fixed scalings) the scaling cache is dropped (`scaling is None`).
"""

from __future__ import annotations

from dataclasses import dataclass

from .decoder import KV

__all__ = ["XLoraCache"]


@dataclass
class XLoraCache:
    """Per transformer block, (key, value) of each pass, each (b, kv_heads, past, head_dim)."""

    real: list[KV]  # real pass (gated experts)
    scaling: list[KV] | None  # scaling pass; None once scalings are frozen

    def get_seq_length(self) -> int:
        """past: the number of positions (padding included) held."""
        return self.real[0][0].shape[2] if self.real else 0

    def nbytes(self) -> int:
        """Memory held by both caches, in bytes."""
        kvs = self.real + (self.scaling or [])
        return sum(t.numel() * t.element_size() for kv in kvs for t in kv)
