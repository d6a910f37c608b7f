"""The X-LoRA classifier and the gating math that turns its logits into expert weights.

    hidden (b, s, H) --MLP--> logits (b, s, L*n | n) --view/expand--> (b, s, L, n)
        --softmax(./T)--> scalings (reported, logged, the graph's `scalings` output)
        --top_k_gates(k)--> gates used by the real pass

`top_k_gates` is written with comparisons instead of `torch.topk`, so that `k` may be a
run-time tensor: the same code runs eagerly and traces to a graph whose `top_k` is an
input (no TopK op, no If).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import xLoRAConfig

__all__ = ["XLoraClassifier", "top_k_gates"]


class XLoraClassifier(nn.Module):
    """MLP from the final hidden state of the scaling pass to per-token expert scalings.

    Layout (and state-dict keys) as in the original xlora: `inner` holds the hidden Linears,
    each followed by ReLU and Dropout iff `enable_relu_and_dropout`; `last` is the output Linear.
    """

    def __init__(self, config: xLoRAConfig, n_modules: int, n_experts: int) -> None:
        super().__init__()
        self.config = config
        self.n_modules = n_modules  # L: LoRA-wrapped modules
        self.n_experts = n_experts  # n
        out = n_modules * n_experts if config.layerwise_scalings else n_experts
        self.inner = nn.ModuleList()
        width = config.hidden_size
        for _ in range(config.xlora_depth - 1):
            self.inner.append(nn.Linear(width, config.xlora_size, bias=config.use_bias))
            if config.enable_relu_and_dropout:
                self.inner.append(nn.ReLU())
                self.inner.append(nn.Dropout(p=config.xlora_dropout_p))
            width = config.xlora_size
        self.last = nn.Linear(width, out, bias=config.use_bias)

    def linears(self) -> list[nn.Linear]:
        """The classifier's Linear layers in data-flow order."""
        return [m for m in self.inner if isinstance(m, nn.Linear)] + [self.last]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Scalings of every token.

        Args:
            hidden: final hidden states of the scaling pass, (b, s, H).
        Returns:
            scalings (b, s, L, n): softmax(logits / T) if `enable_softmax`, else raw logits.
        """
        x = hidden
        for layer in self.inner:
            x = layer(x)
        logits = self.last(x)  # (b, s, L*n) or (b, s, n)
        b, s = logits.shape[0], logits.shape[1]
        if self.config.layerwise_scalings:
            logits = logits.reshape(b, s, self.n_modules, self.n_experts)  # flat index layer*n + expert
        else:
            logits = logits.unsqueeze(2)  # (b, s, 1, n): the same for every module
        if self.config.enable_softmax:
            logits = torch.softmax(logits / self.config.softmax_temperature, dim=-1)
        if not self.config.layerwise_scalings:  # a Tile by constants: the graph's output keeps static L and n
            logits = logits.repeat(1, 1, self.n_modules, 1)
        return logits


def top_k_gates(scalings: torch.Tensor, k: int | torch.Tensor | None, softmax_topk: bool) -> torch.Tensor:
    """Keep the `k` largest scalings per token and module; optionally softmax over the kept ones.

    Args:
        scalings: (..., n) scalings as `XLoraClassifier.forward` returns them.
        k: None, 0 (dense: every expert kept) or 1..n; an int64 scalar tensor when traced.
            Values are clamped to [0, n]. Ties keep the lower expert index.
        softmax_topk: softmax over the kept entries (dropped ones stay exactly 0).
    Returns:
        gates (..., n) for the real pass.
    """
    if k is None and not softmax_topk:
        return scalings
    n = scalings.shape[-1]
    if k is None:
        keep = torch.ones_like(scalings, dtype=torch.bool)
    else:
        k = torch.as_tensor(k, dtype=torch.int64, device=scalings.device).clamp(0, n)
        k = torch.where(k == 0, torch.full_like(k, n), k)
        # rank of entry i = number of entries that beat it (larger, or equal with a lower index)
        xi, xj = scalings.unsqueeze(-1), scalings.unsqueeze(-2)  # (..., n, 1), (..., 1, n)
        idx = torch.arange(n, device=scalings.device)
        lower = idx.unsqueeze(0) < idx.unsqueeze(1)  # [i, j] = j < i
        beats = (xj > xi) | ((xj == xi) & lower)  # (..., n, n)
        rank = beats.to(torch.int64).sum(-1)  # (..., n)
        keep = rank < k
    if softmax_topk:
        masked = scalings.masked_fill(~keep, torch.finfo(scalings.dtype).min)
        return torch.softmax(masked, dim=-1) * keep.to(scalings.dtype)
    return scalings * keep.to(scalings.dtype)
