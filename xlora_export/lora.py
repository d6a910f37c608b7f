"""The LoRA math of one wrapped Linear, for all experts at once.

    y = W x + bias + g * sum_i s[b, t, l, i] * scale_i * B_i A_i x

All experts targeting the module are concatenated along the rank dimension, so every
module costs one down-projection and one up-projection whatever the number of experts:

    A_cat (R, in) = [A_0; A_1; ...]      B_cat (out, R) = [B_0 | B_1 | ...]     R = sum r_i
    c = s[..., l, :] expanded over each expert's rank columns * scale_col * g    (b, s, R): column gates
    y = base(x) + ((x A_cat^T) * c) B_cat^T

Expanding the gates over rank columns is a matmul with a constant (n, R) matrix, one-hot
and scaled per column: exact (one product per column, the rest zeros), any mix of ranks,
and no shape ops in the graph; never `repeat_interleave`, which the TorchScript exporter
mistranslates. `column_gates` does it once per pass for all modules whose experts have
the same ranks and scales (usually all of them): one matmul for a non-layerwise
classifier, whose gates are the same in every module, one batched matmul otherwise.
Modules that read the same input (q/k/v, gate/up) share one down-projection
(`sibling_linears`: their A_cat stacked), each keeping its own up-projection. An export goes one
step further (`packed_linears`): the siblings' base weights stacked into one Linear, whose output the
modules' up-projections, side by side, are added to:

    y = x W_pack^T + [g_q B_q^T | g_k B_k^T | g_v B_v^T]     W_pack = [W_q; W_k; W_v],  g = (x A_pack^T) * c

The stacked weights are expressions of the parameters that the exporter evaluates once and stores
(`onnx_passes.attach_weights`), never copies held by the model. (A block-diagonal B, one up-projection
matmul, was measured: 3x the up-projections' bytes for q/k/v, and int4 graphs, where the float LoRA
matrices are most of the bytes read per token, decoded 5-30% slower.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .experts import Expert

__all__ = ["ColumnGates", "XLoraLinear", "column_gates", "packed_linears", "sibling_linears"]


class XLoraLinear(nn.Module):
    """A base `nn.Linear` plus the LoRA experts that target it (module index `module_index`)."""

    def __init__(self, base_layer: nn.Linear, module_name: str, module_index: int, experts: list[Expert],
                 expert_indices: list[int], n_experts: int) -> None:
        """
        Args:
            base_layer: the frozen Linear being wrapped.
            module_name: its name in the base model (`model.layers.0.self_attn.q_proj`).
            module_index: l, its index in the module ordering.
            experts: the experts that target this module, in expert order.
            expert_indices: each of those experts' class index (0..n-1).
            n_experts: n, the total number of experts.
        """
        super().__init__()
        self.base_layer = base_layer
        self.module_name = module_name
        self.module_index = module_index
        self.n_experts = n_experts
        self.expert_names = [e.name for e in experts]
        self.ranks = [e.rank for e in experts]
        weight = base_layer.weight
        a = torch.cat([e.weights[module_name][0] for e in experts], 0).to(weight.device, weight.dtype)
        b = torch.cat([e.weights[module_name][1] for e in experts], 1).to(weight.device, weight.dtype)
        self.lora_A = nn.Parameter(a, requires_grad=False)  # (R, in)
        self.lora_B = nn.Parameter(b, requires_grad=False)  # (out, R)
        col_expert = torch.cat([torch.full((e.rank,), i, dtype=torch.int64) for e, i in zip(experts, expert_indices)])
        col_scale = torch.cat([torch.full((e.rank,), e.scale) for e in experts])
        onehot = F.one_hot(col_expert, n_experts).t().to(weight.dtype)  # (n, R): 1 where column c is expert i's
        self.register_buffer("col_onehot", onehot, persistent=False)
        self.register_buffer("col_scale", col_scale.to(weight.dtype), persistent=False)  # (R,) alpha/r
        self.dropouts = [e.dropout for e in experts]
        # modules with equal column layouts share one gate expansion (`column_gates`)
        self.column_key = (tuple(col_expert.tolist()), tuple(col_scale.tolist()))

    def forward(self, x: torch.Tensor, gates: torch.Tensor | None) -> torch.Tensor:
        """
        Args:
            x: (b, s, in).
            gates: None (base layer only), or this module's column gates from `column_gates`:
                (R,) or (b, s, R).
        Returns:
            (b, s, out).
        """
        return self.up(x, None if gates is None else self._down(x) * gates)

    def up(self, x: torch.Tensor, gated: torch.Tensor | None) -> torch.Tensor:
        """base(x) + gated B_cat^T, from `gated` = (x A_cat^T) * column gates, (b, s, R); None: base(x)."""
        y = self.base_layer(x)
        return y if gated is None else y + F.linear(gated, self.lora_B)

    def column_weights(self, global_weight: float) -> torch.Tensor:
        """(n, R): entry [i, c] = alpha_i / r_i * g where rank column c is expert i's, else 0."""
        return self.col_onehot * (self.col_scale * global_weight)

    def _down(self, x: torch.Tensor) -> torch.Tensor:
        """x A_cat^T, (b, s, R); in training, each expert sees its own LoRA dropout of x."""
        if not (self.training and any(self.dropouts)):
            return F.linear(x, self.lora_A)
        parts, start = [], 0
        for rank, p in zip(self.ranks, self.dropouts):
            parts.append(F.linear(F.dropout(x, p, True), self.lora_A[start:start + rank]))
            start += rank
        return torch.cat(parts, -1)

    def expert_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per expert name, this module's (A (r, in), B (out, r)), sliced from the concatenation."""
        out, start = {}, 0
        for name, rank in zip(self.expert_names, self.ranks):
            out[name] = (self.lora_A[start:start + rank], self.lora_B[:, start:start + rank])
            start += rank
        return out

    def extra_repr(self) -> str:
        return f"module_index={self.module_index}, experts={self.expert_names}, ranks={self.ranks}"


class ColumnGates:
    """Every module's column gates for one pass (`column_gates` builds it): `of(indices)` gives the gates of
    modules read together (one module, or siblings in module order), their columns side by side.

    Modules with one column layout share one expansion: per module the same (b, s, R) tensor (gates equal in
    every module), or slices of one (b, s, L * R) tensor laid out module after module, so that consecutive
    modules' gates are one slice; otherwise one tensor per module, siblings' joined by a Concat.
    """

    def __init__(self, per_module: list[torch.Tensor], flat: torch.Tensor | None = None, width: int = 0) -> None:
        """
        Args:
            per_module: each module's gates, (R_l,) or (b, s, R_l); unused for modules of `flat`.
            flat: (b, s, L * width): every module's gates at columns [l * width, (l + 1) * width), or None.
            width: R, the rank columns of every module when `flat` is given.
        """
        self.per_module = per_module
        self.flat = flat
        self.width = width

    def of(self, indices: list[int]) -> torch.Tensor:
        """The gates of modules `indices`, columns side by side: (sum R,) or (b, s, sum R)."""
        if self.flat is None:
            return self.per_module[indices[0]] if len(indices) == 1 else torch.cat(
                [self.per_module[i] for i in indices], -1)
        if indices == list(range(indices[0], indices[-1] + 1)):  # consecutive modules: one slice
            return self.flat[..., indices[0] * self.width:(indices[-1] + 1) * self.width]
        return torch.cat([self.of([i]) for i in indices], -1)


def column_gates(layers: list[XLoraLinear], gates: torch.Tensor | float | None,
                 global_weight: float) -> ColumnGates | None:
    """Every module's column gates: each rank column's expert gate times alpha_i / r_i times g.

    Modules with the same column layout (same experts, ranks and scales: usually all) share one
    expansion, so that a pass costs one gate matmul, not one per module.

    Args:
        layers: the model's `XLoraLinear`s in module-index order.
        gates: None (no LoRA at all), a float (every expert weighted by it: the scaling pass),
            (b, s, L, n) per-token gates of every module, or (b, s, 1, n): the same gates in every
            module (a non-layerwise classifier).
        global_weight: g, multiplies every expert's output.
    Returns:
        None, or the gates of every module, (R_l,) for a float, else (b, s, R_l) (see `ColumnGates`).
    """
    if gates is None:
        return None
    if not isinstance(gates, torch.Tensor):
        return ColumnGates([layer.col_scale * (global_weight * gates) for layer in layers])
    groups: dict[tuple, list[int]] = {}
    for index, layer in enumerate(layers):
        groups.setdefault(layer.column_key, []).append(index)
    if gates.shape[2] > 1 and len(groups) == 1:  # per-module gates, one layout: one (b, s, L * R) tensor
        weights = layers[0].column_weights(global_weight)  # (n, R)
        expanded = gates.to(weights.dtype) @ weights  # (b, s, L, R)
        return ColumnGates([], expanded.flatten(2), weights.shape[1])
    out: list[torch.Tensor | None] = [None] * len(layers)
    for members in groups.values():
        weights = layers[members[0]].column_weights(global_weight)  # (n, R)
        if gates.shape[2] == 1:
            shared = gates[:, :, 0].to(weights.dtype) @ weights  # (b, s, R)
            for index in members:
                out[index] = shared
            continue
        expanded = gates[:, :, members].to(weights.dtype) @ weights  # (b, s, len(members), R)
        for j, index in enumerate(members):
            out[index] = expanded[:, :, j]
    return ColumnGates(out)


def sibling_linears(layers: list[nn.Module], x: torch.Tensor, gates: ColumnGates | None) -> list[torch.Tensor]:
    """Linears that read the same input (q/k/v, gate/up): each base Linear on its own, the wrapped ones' LoRA
    down-projections in one matmul (their A_cat stacked: one node instead of one per module), then each
    module's up-projection: what calling each layer gives, up to the rounding of the wider matmul.

    Args:
        layers: `XLoraLinear`s or plain Linears, all reading `x`.
        x: (b, s, in).
        gates: every module's column gates (`column_gates`), or None.
    Returns:
        each layer's output, (b, s, out_i).
    """
    wrapped = [layer for layer in layers if isinstance(layer, XLoraLinear)]
    dropout = any(layer.training and any(layer.dropouts) for layer in wrapped)  # each expert its own dropout
    if gates is None or len(wrapped) < 2 or dropout:
        return [layer(x, None if gates is None else gates.of([layer.module_index]))
                if isinstance(layer, XLoraLinear) else layer(x) for layer in layers]
    a = torch.cat([layer.lora_A for layer in wrapped])  # (sum R, in)
    columns = gates.of([layer.module_index for layer in wrapped])  # (sum R,) or (b, s, sum R)
    parts = (F.linear(x, a) * columns).split([layer.lora_A.shape[0] for layer in wrapped], -1)
    gated = dict(zip(map(id, wrapped), parts))
    return [layer.up(x, gated[id(layer)]) if isinstance(layer, XLoraLinear) else layer(x) for layer in layers]


def _base(layer: nn.Module) -> nn.Linear:
    return layer.base_layer if isinstance(layer, XLoraLinear) else layer


def packed_linears(layers: list[nn.Module], x: torch.Tensor, gates: ColumnGates | None) -> torch.Tensor:
    """Linears that read the same input as one: their outputs side by side, what `sibling_linears` gives
    concatenated, up to rounding (see the module docstring). Meant for tracing, where the stacked weight
    becomes one initializer; eagerly it would copy the weights on every call.

    Args:
        layers: `XLoraLinear`s or plain Linears, all reading `x`, in output order.
        x: (b, s, in).
        gates: every module's column gates (`column_gates`), or None (base layers only).
    Returns:
        (b, s, sum out_i).
    """
    bases = [_base(layer) for layer in layers]
    weight = torch.cat([base.weight for base in bases])  # (sum out, in)
    bias = None
    if any(base.bias is not None for base in bases):
        bias = torch.cat([base.bias if base.bias is not None else x.new_zeros(base.out_features) for base in bases])
    y = F.linear(x, weight, bias)
    wrapped = [layer for layer in layers if isinstance(layer, XLoraLinear)]
    if gates is None or not wrapped:
        return y
    a = torch.cat([layer.lora_A for layer in wrapped])  # (sum R, in)
    gated = (F.linear(x, a) * gates.of([layer.module_index for layer in wrapped])).split(
        [layer.lora_A.shape[0] for layer in wrapped], -1)  # each module's (b, s, R_m)
    parts = iter(gated)
    deltas = [F.linear(next(parts), layer.lora_B) if isinstance(layer, XLoraLinear)
              else x.new_zeros(*x.shape[:-1], _base(layer).out_features) for layer in layers]
    return y + torch.cat(deltas, -1)
