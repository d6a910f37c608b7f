"""One pass of the base decoder with LoRA-wrapped Linears: the only forward in the project.

The X-LoRA model (`model.py`) calls it twice per step, once per pass, each with its own
KV cache; the eager model, training and the ONNX exporter all run this code.

    input_ids (b, s) -> embed -> [block i: norm -> attn(q,k,v; RoPE; past_i ++ new) -> o
                                  -> + -> norm -> down(act(gate) * up) -> +] x N -> norm
    -> hidden (b, s, H), presents [(k, v)_i] each (b, kv_heads, past + s, head_dim)

Masks are boolean and applied with the dtype's minimum (never -inf), so fully padded rows
stay finite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import XLoraLinear

__all__ = ["KV", "allowed_keys", "decoder_pass"]

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (b, kv_heads, t, head_dim)


def allowed_keys(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Which keys each new query may attend to.

    Args:
        attention_mask: (b, past + s), 1 for real tokens, 0 for padding.
        seq_len: s, the number of new tokens (the last s positions).
    Returns:
        bool (b, 1, s, past + s): causal and not padding.
    """
    total = attention_mask.shape[1]
    k_pos = torch.arange(total, device=attention_mask.device)  # (t,)
    q_pos = k_pos[total - seq_len:]  # (s,)
    causal = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)  # (s, t)
    return causal.unsqueeze(0).unsqueeze(0) & attention_mask.bool().unsqueeze(1).unsqueeze(2)


def _proj(layer: nn.Module, x: torch.Tensor, gates: torch.Tensor | float | None, g: float) -> torch.Tensor:
    return layer(x, gates, g) if isinstance(layer, XLoraLinear) else layer(x)


def _rotate_half(x: torch.Tensor, half: int) -> torch.Tensor:
    """RoPE's rotation; `half` = head_dim // 2 from the config (a constant in the graph, not a Shape op)."""
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _attention(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor,
               past: KV | None, gates: torch.Tensor | float | None, g: float) -> tuple[torch.Tensor, KV]:
    b, s, _ = x.shape
    hd = attn.head_dim
    q = _proj(attn.q_proj, x, gates, g).view(b, s, -1, hd).transpose(1, 2)  # (b, heads, s, hd)
    k = _proj(attn.k_proj, x, gates, g).view(b, s, -1, hd).transpose(1, 2)  # (b, kv_heads, s, hd)
    v = _proj(attn.v_proj, x, gates, g).view(b, s, -1, hd).transpose(1, 2)  # (b, kv_heads, s, hd)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (b, 1, s, hd)
    q = q * cos + _rotate_half(q, hd // 2) * sin
    k = k * cos + _rotate_half(k, hd // 2) * sin
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (b, kv_heads, past + s, hd)
        v = torch.cat([past[1], v], dim=2)
    present = (k, v)
    groups = attn.num_key_value_groups
    if groups > 1:  # grouped-query attention: repeat each kv head by expand + reshape
        kvh, t = k.shape[1], k.shape[2]
        k = k.unsqueeze(2).expand(b, kvh, groups, t, hd).reshape(b, kvh * groups, t, hd)
        v = v.unsqueeze(2).expand(b, kvh, groups, t, hd).reshape(b, kvh * groups, t, hd)
    scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling  # (b, heads, s, t)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, attn.attention_dropout, attn.training)
    out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)  # (b, s, heads * hd)
    return _proj(attn.o_proj, out, gates, g), present


def decoder_pass(lm: nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor, allowed: torch.Tensor,
                 past: list[KV] | None, gates: torch.Tensor | float | None,
                 global_weight: float) -> tuple[torch.Tensor, list[KV]]:
    """Run the base decoder once.

    Args:
        lm: a supported `*ForCausalLM` whose targeted Linears are `XLoraLinear`.
        input_ids: (b, s) int64.
        position_ids: (b, s) int64.
        allowed: (b, 1, s, past + s) bool, from `allowed_keys`.
        past: per block (key, value) of this pass's cache, or None (no past).
        gates: None (no LoRA at all), a float (every expert weighted equally), or (b, s, L, n).
        global_weight: g.
    Returns:
        hidden (b, s, H) after the final norm, and the per-block presents.
    """
    base = lm.model
    h = base.embed_tokens(input_ids)  # (b, s, H)
    cos, sin = base.rotary_emb(h, position_ids)  # (b, s, hd) each
    presents = []
    for i, block in enumerate(base.layers):
        a, kv = _attention(block.self_attn, block.input_layernorm(h), cos, sin, allowed,
                           None if past is None else past[i], gates, global_weight)
        h = h + a
        presents.append(kv)
        mlp, x = block.mlp, block.post_attention_layernorm(h)
        act = mlp.act_fn(_proj(mlp.gate_proj, x, gates, global_weight)) * _proj(mlp.up_proj, x, gates, global_weight)
        h = h + _proj(mlp.down_proj, act, gates, global_weight)
    return base.norm(h), presents
