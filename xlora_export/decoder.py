"""One pass of the base decoder with LoRA-wrapped Linears: the only forward in the project.

The X-LoRA model (`model.py`) calls it twice per step, once per pass, each with its own
KV cache; the eager model, training and the ONNX exporter all run this code. The family
differences (`architectures.DecoderSpec`) apply at the few places marked below.

    input_ids (b, s) -> embed (HF module: Gemma scales it)
      -> [block i: x = norm(h)
                   q, k, v = proj(x)                  (Phi-3: one fused qkv_proj, split)
                   q, k = q_norm(q), k_norm(k)        (Qwen3, Gemma 3)
                   q, k = RoPE(q, k)                  (partial RoPE: first rotary_dim features;
                                                       Gemma 3: the table of the layer's type)
                   k, v = past_i ++ (k, v)
                   a = o(softmax(softcap(q k^T * scaling) | mask_i) v)   (mask_i: causal, padding,
                                                                          the layer's sliding window)
                   h = h + attn_out_norm(a)           (Gemma: sandwich norm)
                   m = down(act(gate(y)) * up(y)), y = mlp_in_norm(h)    (Phi-3: fused gate_up_proj)
                   h = h + mlp_out_norm(m)            (Gemma: sandwich norm)] x N
      -> norm -> hidden (b, s, H), presents [(k, v)_i] each (b, kv_heads, past + s, head_dim)
    logits = softcap(lm_head(hidden))                 (Gemma 2: final soft-capping)

Masks are boolean and applied with the dtype's minimum (never -inf), so fully padded rows
stay finite. While tracing, q/k/v and gate/up run as one packed Linear each (`lora.packed_linears`),
and an `--attention gqa` graph writes RoPE, attention and each residual add with the norm after it as
ONNX Runtime nodes (the autograd Functions below, whose forward is this module's math).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from xlora_runtime.format import contract as C

from . import contrib_ops
from .architectures import DecoderSpec
from .lora import ColumnGates, XLoraLinear, packed_linears, sibling_linears

__all__ = ["KV", "GroupQueryAttention", "Masks", "SkipRMSNorm", "attention_masks", "decoder_pass", "lm_logits"]

KV = tuple[torch.Tensor, torch.Tensor]  # (key, value), each (b, kv_heads, t, head_dim)
Masks = dict[int | None, torch.Tensor]  # sliding window (None: full attention) -> allowed keys (b, 1, 1, s, t)


def attention_masks(attention_mask: torch.Tensor, seq_len: int, windows: tuple[int | None, ...]) -> Masks:
    """Which keys each new query may attend to, per distinct window of the model's layers.

    A query at real position i attends to keys at real positions j with i - w < j <= i (w = the
    layer's window, none for full attention) that are not padding. Positions count real tokens
    (`cumsum(attention_mask) - 1`), so left padding changes nothing.

    Args:
        attention_mask: (b, past + s), 1 for real tokens, 0 for padding.
        seq_len: s, the number of new tokens (the last s positions).
        windows: the per-layer windows of `DecoderSpec`.
    Returns:
        window -> bool (b, 1, 1, s, past + s) (broadcast over kv heads and their query groups).
    """
    total = attention_mask.shape[1]
    k_idx = torch.arange(total, device=attention_mask.device)  # (t,)
    q_idx = k_idx[total - seq_len:]  # (s,)
    causal = k_idx.unsqueeze(0) <= q_idx.unsqueeze(1)  # (s, t)
    full = causal[None, None, None] & attention_mask.bool()[:, None, None, None]  # (b, 1, 1, s, t)
    masks: Masks = {None: full}
    if any(w is not None for w in windows):
        k_pos = attention_mask.long().cumsum(-1) - 1  # (b, t) real position of every key
        distance = k_pos[:, total - seq_len:].unsqueeze(-1) - k_pos.unsqueeze(1)  # (b, s, t) = i - j
        for w in sorted({w for w in windows if w is not None}):
            masks[w] = full & (distance < w)[:, None, None]
    return masks


def _proj(layer: nn.Module, x: torch.Tensor, gates: ColumnGates | None) -> torch.Tensor:
    if not isinstance(layer, XLoraLinear):
        return layer(x)
    return layer(x, None if gates is None else gates.of([layer.module_index]))


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: DecoderSpec) -> torch.Tensor:
    """RoPE on the first `spec.rotary_dim` features of x (b, s, heads, head_dim); cos, sin (b, s, 1, rotary_dim).

    The widths come from the config (constants in the graph, not Shape ops). The rotation of the halves,
    (x1, x2) -> (-x2, x1), is a product with a constant signed permutation: exact (one nonzero per column), and
    one MatMul in a graph instead of two Slices, a Neg and a Concat."""
    rot, rest = (x, None) if spec.rotary_dim == spec.head_dim else x.split(
        [spec.rotary_dim, spec.head_dim - spec.rotary_dim], dim=-1)
    # a fresh tensor per call (a tensor kept across calls would tie one trace's constant to the next trace)
    rotation = torch.from_numpy(_half_rotation(spec.rotary_dim)).to(device=rot.device, dtype=rot.dtype)
    rot = rot * cos + torch.matmul(rot, rotation) * sin
    return rot if rest is None else torch.cat((rot, rest), dim=-1)


@functools.cache
def _half_rotation(dim: int) -> np.ndarray:
    """(dim, dim) float32 R with x R = cat(-x[dim/2:], x[:dim/2]) for x of `dim` features."""
    half = dim // 2
    r = np.zeros((dim, dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return r


def _softcap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma 2's soft-capping); x unchanged without a cap."""
    return x if cap is None else torch.tanh(x / cap) * cap


def _attention(attn: nn.Module, spec: DecoderSpec, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               allowed: torch.Tensor, past: KV | None, gates: ColumnGates | None,
               dims: tuple[int, int]) -> tuple[torch.Tensor, KV]:
    b, s = dims  # batch, new tokens (read once per pass: no Shape ops per layer in the graph)
    hd, heads, kvh = spec.head_dim, spec.num_heads, spec.kv_heads
    exporting = torch.onnx.is_in_onnx_export()
    qkv = None  # q, k, v side by side (b, s, (heads + 2 * kv_heads) * hd): one Linear in a graph
    if spec.fused_projections:
        qkv = _proj(attn.qkv_proj, x, gates)
    elif exporting:
        qkv = packed_linears([attn.q_proj, attn.k_proj, attn.v_proj], x, gates)
    if qkv is not None:
        q, k, v = qkv.split([heads * hd, kvh * hd, kvh * hd], dim=-1)
    else:
        q, k, v = sibling_linears([attn.q_proj, attn.k_proj, attn.v_proj], x, gates)
    if spec.qk_norm:  # RMSNorm over head_dim, per head
        q = attn.q_norm(q.view(b, s, heads, hd)).reshape(b, s, heads * hd)
        k = attn.k_norm(k.view(b, s, kvh, hd)).reshape(b, s, kvh * hd)
    if spec.attention_op == C.ATTENTION_GQA and past is not None and exporting:
        # RoPE stays its own node: GroupQueryAttention's own (`do_rotary`) numbers a first prompt's positions
        # from 0 in every row, which left padding contradicts
        q = RotaryEmbedding.apply(q, cos, sin, spec, heads)
        k = RotaryEmbedding.apply(k, cos, sin, spec, kvh)
        out, *present = GroupQueryAttention.apply(q, k, v, past[0], past[1], allowed, attn.scaling,
                                                  spec.attn_softcap, heads, kvh)
        return _proj(attn.o_proj, out, gates), tuple(present)
    q, k, v = q.view(b, s, heads, hd), k.view(b, s, kvh, hd), v.view(b, s, kvh, hd)  # (b, s, heads, hd)
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # (b, s, 1, rotary_dim)
    q, k = _rope(q, cos, sin, spec), _rope(k, cos, sin, spec)
    out, present = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), past, allowed, attn.scaling,
                           spec.attn_softcap, (b, s, heads, kvh, hd), attn.attention_dropout if attn.training else 0.0)
    return _proj(attn.o_proj, out, gates), present


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: KV | None, allowed: torch.Tensor,
            scaling: float, softcap: float | None, dims: tuple[int, int, int, int, int],
            dropout: float = 0.0) -> tuple[torch.Tensor, KV]:
    """Attention of the new queries over the cache and the new keys.

    Args:
        q: (b, heads, s, hd); k, v: (b, kv_heads, s, hd), after RoPE.
        past: this layer's (key, value), each (b, kv_heads, past, hd), or None.
        allowed: (b, 1, 1, s, past + s) bool, from `attention_masks`.
        dims: (b, s, heads, kv_heads, hd), given rather than read from the tensors (no Shape ops in a graph).
    Returns:
        out (b, s, heads * hd) and the present (key, value), each (b, kv_heads, past + s, hd).
    """
    b, s, heads, kvh, hd = dims
    if past is not None:
        k = torch.cat([past[0], k], dim=2)  # (b, kv_heads, past + s, hd)
        v = torch.cat([past[1], v], dim=2)
    # Grouped-query attention without copying the cache: query head j * groups + i reads kv head j, so the
    # queries are grouped per kv head and each kv head broadcasts over its group.
    q = q.reshape(b, kvh, heads // kvh, s, hd)  # (b, kv_heads, groups, s, hd)
    scores = torch.matmul(q, k.unsqueeze(2).transpose(3, 4)) * scaling  # (b, kv_heads, groups, s, t)
    scores = _softcap(scores, softcap).masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    probs = F.dropout(probs, dropout, dropout > 0)
    out = torch.matmul(probs, v.unsqueeze(2))  # (b, kv_heads, groups, s, hd)
    return out.reshape(b, heads, s, hd).transpose(1, 2).reshape(b, s, heads * hd), (k, v)


class RotaryEmbedding(torch.autograd.Function):
    """`_rope` on x (b, s, heads * head_dim) with cos, sin (b, s, rotary_dim): the math is `_rope`'s, eagerly and
    while tracing; an `--attention gqa` export writes it as ONNX Runtime's RotaryEmbedding node
    (`contrib_ops.rotary_embedding`)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, spec: DecoderSpec,
                heads: int) -> torch.Tensor:
        b, s = x.shape[:2]
        y = _rope(x.reshape(b, s, heads, spec.head_dim), cos.unsqueeze(2), sin.unsqueeze(2), spec)
        return y.reshape(b, s, heads * spec.head_dim)

    symbolic = staticmethod(contrib_ops.rotary_embedding)


class GroupQueryAttention(torch.autograd.Function):
    """`_attend` on the new q, k, v (b, s, heads * hd) after RoPE and the layer's past key and value (b, kv_heads,
    past, hd): the math is `_attend`'s, eagerly and while tracing; an `--attention gqa` export writes it as ONNX
    Runtime's GroupQueryAttention node (`contrib_ops.group_query_attention`). Returns out (b, s, heads * hd) and
    the presents concat(past, new)."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor, allowed: torch.Tensor, scaling: float, softcap: float | None, heads: int,
                kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, s = q.shape[:2]
        hd = past_key.shape[-1]
        split = [t.reshape(b, s, n, hd).transpose(1, 2) for t, n in ((q, heads), (k, kv_heads), (v, kv_heads))]
        out, (key, value) = _attend(*split, (past_key, past_value), allowed, scaling, softcap,
                                    (b, s, heads, kv_heads, hd))
        return out, key, value

    symbolic = staticmethod(contrib_ops.group_query_attention)


class SkipRMSNorm(torch.autograd.Function):
    """The residual add and the next RMSNorm: h + delta, and weight * x / rms(x) of it, both (b, s, H), for the
    families whose norm is that plain RMSNorm (HF's Llama, Mistral, Qwen, Phi-3 modules). Used while tracing an
    `--attention gqa` export, which writes it as ONNX Runtime's SkipSimplifiedLayerNormalization node
    (`contrib_ops.skip_rms_norm`), as ONNX Runtime GenAI's graphs do; eager runs call the HF module."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
        h = h + delta
        x = h.float()
        return h, weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + epsilon)).to(h.dtype)

    symbolic = staticmethod(contrib_ops.skip_rms_norm)


def _mlp(mlp: nn.Module, spec: DecoderSpec, x: torch.Tensor, gates: ColumnGates | None) -> torch.Tensor:
    if spec.fused_projections:  # Phi-3: gate and up in one Linear, gate first
        half = _width(mlp.gate_up_proj) // 2
        gate, up = _proj(mlp.gate_up_proj, x, gates).split([half, half], dim=-1)
        return _proj(mlp.down_proj, up * mlp.activation_fn(gate), gates)
    if torch.onnx.is_in_onnx_export():  # one Linear in a graph
        width = _width(mlp.gate_proj)  # a constant split: `chunk` would trace Shape/Div/Slice ops per layer
        gate, up = packed_linears([mlp.gate_proj, mlp.up_proj], x, gates).split([width, width], dim=-1)
    else:
        gate, up = sibling_linears([mlp.gate_proj, mlp.up_proj], x, gates)
    act = mlp.act_fn(gate) * up
    return _proj(mlp.down_proj, act, gates)


def _width(layer: nn.Module) -> int:
    """The output features of a Linear, wrapped or not."""
    return (layer.base_layer if isinstance(layer, XLoraLinear) else layer).out_features


def _rotary(base: nn.Module, spec: DecoderSpec, h: torch.Tensor,
            position_ids: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin), each (b, s, rotary_dim), per layer type (one shared table except in Gemma 3)."""
    if spec.rope_per_layer_type:
        return {t: base.rotary_emb(h, position_ids, t) for t in sorted(set(spec.layer_types))}
    table = base.rotary_emb(h, position_ids)
    return dict.fromkeys(set(spec.layer_types), table)


def decoder_pass(lm: nn.Module, spec: DecoderSpec, input_ids: torch.Tensor, position_ids: torch.Tensor,
                 masks: Masks, past: list[KV] | None,
                 gates: ColumnGates | None) -> tuple[torch.Tensor, list[KV]]:
    """Run the base decoder once.

    Args:
        lm: a supported `*ForCausalLM` whose targeted Linears are `XLoraLinear`.
        spec: its `DecoderSpec`.
        input_ids: (b, s) int64.
        position_ids: (b, s) int64.
        masks: from `attention_masks`, each (b, 1, 1, s, past + s) bool.
        past: per block (key, value) of this pass's cache, or None (no past).
        gates: None (no LoRA at all), or every module's column gates (`lora.column_gates`).
    Returns:
        hidden (b, s, H) after the final norm, and the per-block presents.
    """
    base = lm.model
    h = base.embed_tokens(input_ids)  # (b, s, H)
    rope = _rotary(base, spec, h, position_ids)
    dims = (input_ids.shape[0], input_ids.shape[1])  # b, s
    presents = []
    layers = list(base.layers)
    x = layers[0].input_layernorm(h)  # each later norm comes with the residual add before it (`_add_norm`)
    for i, block in enumerate(layers):
        cos, sin = rope[spec.layer_types[i]]
        a, kv = _attention(block.self_attn, spec, x, cos, sin, masks[spec.windows[i]],
                           None if past is None else past[i], gates, dims)
        presents.append(kv)
        h, y = _add_norm(h, block.post_attention_layernorm(a) if spec.sandwich_norm else a,
                         getattr(block, spec.mlp_in_norm), spec)
        m = _mlp(block.mlp, spec, y, gates)
        h, x = _add_norm(h, block.post_feedforward_layernorm(m) if spec.sandwich_norm else m,
                         layers[i + 1].input_layernorm if i + 1 < len(layers) else base.norm, spec)
    return x, presents


def _add_norm(h: torch.Tensor, delta: torch.Tensor, norm: nn.Module, spec: DecoderSpec) -> tuple[torch.Tensor,
                                                                                                  torch.Tensor]:
    """The residual stream h + delta and the next norm of it, each (b, s, H): one SkipRMSNorm node in an
    `--attention gqa` export of a family whose norms are plain RMSNorms (weight * x / rms(x))."""
    if (spec.attention_op == C.ATTENTION_GQA and not spec.sandwich_norm and torch.onnx.is_in_onnx_export()
            and hasattr(norm, "variance_epsilon") and type(norm).__name__.endswith("RMSNorm")):
        return SkipRMSNorm.apply(h, delta, norm.weight, float(norm.variance_epsilon))
    h = h + delta
    return h, norm(h)


def lm_logits(lm: nn.Module, spec: DecoderSpec, hidden: torch.Tensor) -> torch.Tensor:
    """logits (b, s, vocab) from the final hidden states (b, s, H): lm_head, then Gemma 2's final soft-cap."""
    return _softcap(lm.lm_head(hidden), spec.final_softcap)
