"""The ONNX Runtime contrib ops an `--attention gqa` export writes: the graph nodes that replace the decoder's
RoPE and attention math when the TorchScript exporter traces it.

`decoder.RotaryEmbedding` and `decoder.GroupQueryAttention` are autograd Functions whose forward is the
decoder's own math (`_rope`, `_attend`: one forward for eager runs, training and tracing); their `symbolic`
is the function of the same name here, which emits the `com.microsoft` node in the traced graph:

    rotary_embedding        x (b, s, heads * hd), cos, sin (b, s, rotary_dim)  ->  RotaryEmbedding
                            (2 nodes per layer and pass instead of 14)
    group_query_attention   q, k, v (b, s, heads * hd), past key and value (b, kv_heads, past, hd),
                            allowed (b, 1, 1, s, total) bool  ->  GroupQueryAttention, out and the presents
    skip_rms_norm           h, delta (b, s, H), the norm weight  ->  SkipSimplifiedLayerNormalization: the
                            residual add and the next RMSNorm in one node, as ONNX Runtime GenAI's graphs have it

Everything besides the node reads only tensors that are the same in every layer of a pass (cos and sin, the
mask), so ONNX Runtime's common-subexpression elimination keeps one copy of it per pass.
"""

from __future__ import annotations

from typing import Any

import torch

from xlora_runtime.format import contract as C

from .architectures import DecoderSpec

__all__ = ["group_query_attention", "rotary_embedding", "skip_rms_norm"]


def rotary_embedding(g: Any, x: Any, cos: Any, sin: Any, spec: DecoderSpec, heads: int) -> Any:
    """`_rope` as ONNX Runtime's RotaryEmbedding node.

    The node gets the pass's own tables (HF's rotary module, any RoPE type) as a cache of b * s rows,
    cos_cache[i] = cos[i // s, i % s, :half], indexed by position_ids = arange(b * s) reshaped (b, s): the
    positions, left padding included, are already in the tables.

    Args:
        g: the exporter's graph context; x, cos, sin: its values, shaped as in the module docstring.
        spec: the decoder's family spec (head_dim, rotary_dim: partial RoPE rotates the first features only).
        heads: the heads of x (query or key-value heads).
    Returns:
        y (b, s, heads * hd), typed as x.
    """
    def const(value: Any) -> Any:
        return g.op("Constant", value_t=torch.tensor(value, dtype=torch.int64))

    half = spec.rotary_dim // 2
    rows = [g.op("Reshape", g.op("Slice", t, const([0]), const([half]), const([2])), const([-1, half]))
            for t in (cos, sin)]  # (b * s, half)
    shape = g.op("Slice", g.op("Shape", cos), const([0]), const([2]), const([0]))  # (2,) = [b, s]
    count = g.op("ReduceProd", shape, keepdims_i=0)  # b * s
    positions = g.op("Reshape", g.op("Range", const(0), count, const(1)), shape)  # (b, s)
    extra = {} if spec.rotary_dim == spec.head_dim else {"rotary_embedding_dim_i": spec.rotary_dim}
    y = g.op(f"{C.ORT_DOMAIN}::RotaryEmbedding", x, positions, *rows, interleaved_i=0, num_heads_i=heads, **extra)
    y.setType(x.type())
    return y


def group_query_attention(g: Any, q: Any, k: Any, v: Any, past_key: Any, past_value: Any, allowed: Any,
                          scaling: float, softcap: float | None, heads: int, kv_heads: int) -> tuple[Any, Any, Any]:
    """`_attend` as ONNX Runtime's GroupQueryAttention node.

    The node takes the new queries, keys and values after RoPE, the layer's past key and value, `seqlens_k` =
    total - 1 per row and `total_sequence_length` (every row has the same length: prompts are left padded), and
    the padding and window mask as an additive `attention_bias` (b, 1, s, total) of 0 and the dtype's minimum.
    Its presents are concat(past, new), as the graph contract says; a runtime that binds each present to its
    past's buffer (longer than the past) gets them written in place (`past_present_share_buffer`).

    Args:
        g: the exporter's graph context; q, k, v, past_key, past_value, allowed: its values, shaped as in the
            module docstring.
        scaling, softcap: the attention's score scale and Gemma 2's soft-cap (None: none).
        heads, kv_heads: query and key-value heads.
    Returns:
        out (b, s, heads * hd), present key and value (b, kv_heads, total, hd).
    """
    def const(value: Any, dtype: torch.dtype) -> Any:
        return g.op("Constant", value_t=torch.tensor(value, dtype=dtype))

    dtype = {"Half": torch.float16, "BFloat16": torch.bfloat16}.get(q.type().scalarType(), torch.float32)
    mask = g.op("Squeeze", allowed, const([2], torch.int64))  # (b, 1, s, total)
    bias = g.op("Where", mask, const(0.0, dtype), const(torch.finfo(dtype).min, dtype))
    shape = g.op("Shape", allowed)  # (b, 1, 1, s, total)
    total = g.op("Gather", shape, const(4, torch.int64), axis_i=0)  # ()
    batch = g.op("Gather", shape, const([0], torch.int64), axis_i=0)  # (1,)
    seqlens = g.op("Expand", g.op("Cast", g.op("Sub", total, const(1, torch.int64)), to_i=6), batch)  # int32
    none = g.op("prim::Constant").setType(torch._C.OptionalType.ofTensor())
    out, key, value = g.op(f"{C.ORT_DOMAIN}::GroupQueryAttention", q, k, v, past_key, past_value, seqlens,
                           g.op("Cast", total, to_i=6), none, none, none, bias, num_heads_i=heads,
                           kv_num_heads_i=kv_heads, scale_f=scaling, softcap_f=softcap or 0.0, outputs=3)
    out.setType(q.type())
    key.setType(past_key.type())
    value.setType(past_value.type())
    return out, key, value


def skip_rms_norm(g: Any, h: Any, delta: Any, weight: Any, epsilon: float) -> tuple[Any, Any]:
    """The residual add and RMSNorm as ONNX Runtime's SkipSimplifiedLayerNormalization node.

    Args:
        g: the exporter's graph context; h, delta (b, s, H) and the norm's weight (H,): its values.
        epsilon: the norm's epsilon.
    Returns:
        h + delta and its norm, each (b, s, H).
    """
    out, _, _, total = g.op(f"{C.ORT_DOMAIN}::SkipSimplifiedLayerNormalization", delta, h, weight,
                            epsilon_f=epsilon, outputs=4)
    out.setType(h.type())
    total.setType(h.type())
    return total, out
