"""Which base models the X-LoRA forward runs on: one record of what differs between families.

Every supported family is a transformers 5 `*ForCausalLM` with the Llama layout
`model.embed_tokens -> model.layers[i].{input_layernorm, self_attn, mlp, ...} -> model.norm -> lm_head`.
What differs is read once from the HF config into a `DecoderSpec`, which `decoder.py`
consults at the few places it applies (STYLE: a record of differences, not a forward per family):

    family        projections            norms per block          attention extras
    llama         q,k,v,o / gate,up,down 2 (pre-attn, pre-MLP)    -
    mistral       as llama               2                        sliding_window on every layer
    qwen2         as llama (+qkv bias)   2                        layer_types (use_sliding_window, max_window_layers)
    qwen3         as llama               2                        q_norm/k_norm, explicit head_dim, layer_types
    gemma2        as llama               4 (sandwich)             (1+w) norms, scaled embedding (HF modules),
                                                                  query_pre_attn_scalar, attention and final
                                                                  logit soft-capping, alternating layer_types
    gemma3_text   as llama               4 (sandwich)             gemma2's + q_norm/k_norm, RoPE per layer type
    phi3          qkv_proj, gate_up_proj 2                        sliding_window on every layer, partial RoPE

Norm weights, embedding scales and RoPE variants stay inside HF's own modules, which the
decoder calls; the spec only says which module runs where.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import XLoraError

__all__ = ["SUPPORTED_MODEL_TYPES", "DecoderSpec", "decoder_spec"]


@dataclass(frozen=True)
class _Family:
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE
    sandwich_norm: bool = False  # Gemma: norm the attention and MLP outputs too (four norms per block)
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj
    rope_per_layer_type: bool = False  # Gemma 3: local and global layers have their own RoPE tables


FAMILIES: dict[str, _Family] = {
    "llama": _Family(),
    "mistral": _Family(),
    "qwen2": _Family(),
    "qwen3": _Family(qk_norm=True),
    "gemma2": _Family(sandwich_norm=True),
    "gemma3_text": _Family(qk_norm=True, sandwich_norm=True, rope_per_layer_type=True),
    "phi3": _Family(fused_projections=True),
}
SUPPORTED_MODEL_TYPES = tuple(FAMILIES)
# RoPE types whose tables depend on the largest position of the call: exact eagerly, but the traced
# graph would freeze one branch, so the exporter refuses them.
DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class DecoderSpec:
    """The shapes and per-family differences of a base decoder, read once from its HF config."""

    model_type: str
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    rotary_dim: int  # head_dim, or fewer with partial RoPE (the first rotary_dim features rotate)
    windows: tuple[int | None, ...]  # per layer: sliding window w (keys i - w < j <= i), None = full attention
    layer_types: tuple[str, ...]  # per layer: "full_attention" | "sliding_attention" (RoPE table key in Gemma 3)
    qk_norm: bool
    sandwich_norm: bool
    fused_projections: bool
    rope_per_layer_type: bool
    attn_softcap: float | None  # scores -> cap * tanh(scores / cap)
    final_softcap: float | None  # logits -> cap * tanh(logits / cap)
    rope_type: str
    # how an export writes attention (`contract.ATTENTIONS`): "onnx" (plain ONNX ops, any runtime) or "gqa" (ONNX
    # Runtime's GroupQueryAttention, `xlora-export --attention gqa`); eager runs are the same either way
    attention_op: str = "onnx"

    @property
    def mlp_in_norm(self) -> str:
        """The block's norm before the MLP (Gemma names it `pre_feedforward_layernorm`)."""
        return "pre_feedforward_layernorm" if self.sandwich_norm else "post_attention_layernorm"


def _windows(config, model_type: str) -> tuple[tuple[int | None, ...], tuple[str, ...]]:
    """Per-layer sliding windows, as transformers applies them.

    Mistral and Phi-3 apply `sliding_window` to every layer; Qwen2/Qwen3 and Gemma read
    `layer_types` (Qwen derives it from `use_sliding_window` and `max_window_layers`).
    A window that covers every position the model accepts is full attention.
    """
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) if model_type not in ("mistral", "phi3") else None
    if layer_types is None:
        layer_types = ["sliding_attention" if window is not None else "full_attention"] * n
    layer_types = tuple(layer_types)
    if len(layer_types) != n or not set(layer_types) <= {"sliding_attention", "full_attention"}:
        raise XLoraError(f"unsupported architecture {model_type}: config.layer_types={list(layer_types)} (expected "
                         f"{n} entries of 'sliding_attention' / 'full_attention')")
    if window is not None and (not isinstance(window, int) or window < 1):
        raise XLoraError(f"unsupported architecture {model_type}: config.sliding_window={window!r} (expected a "
                         f"positive integer or null)")
    if window is not None and window >= config.max_position_embeddings:
        window = None  # i - j < max_position_embeddings <= window: nothing is ever masked
    return tuple(window if t == "sliding_attention" else None for t in layer_types), layer_types


def _rope_type(config, per_layer_type: bool) -> str:
    params = getattr(config, "rope_parameters", None) or {}
    tables = [p for p in params.values() if isinstance(p, dict)] if per_layer_type else [params]
    types = {t.get("rope_type", "default") for t in tables if t}
    dynamic = sorted(types & set(DYNAMIC_ROPE_TYPES))
    return dynamic[0] if dynamic else (sorted(types)[0] if types else "default")


def decoder_spec(model: nn.Module) -> DecoderSpec:
    """The `DecoderSpec` of a supported causal LM.

    Raises:
        XLoraError: one line naming what is not supported (family, layout or option).
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in FAMILIES:
        raise XLoraError(f"unsupported architecture {name} (model_type={model_type!r}); supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)} causal LMs")
    inner = getattr(model, "model", None)
    if not (hasattr(model, "lm_head") and hasattr(inner, "layers") and hasattr(inner, "embed_tokens")):
        raise XLoraError(f"unsupported architecture {name}: expected a *ForCausalLM with .model.layers and .lm_head")
    if getattr(config, "use_bidirectional_attention", False):
        raise XLoraError(f"unsupported architecture {name}: use_bidirectional_attention=True (X-LoRA needs a "
                         f"causal decoder)")
    family = FAMILIES[model_type]
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    params = getattr(config, "rope_parameters", None) or {}
    partial = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    windows, layer_types = _windows(config, model_type)
    return DecoderSpec(
        model_type=model_type,
        num_layers=config.num_hidden_layers,
        num_heads=heads,
        kv_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=head_dim,
        rotary_dim=int(head_dim * partial),
        windows=windows,
        layer_types=layer_types,
        qk_norm=family.qk_norm,
        sandwich_norm=family.sandwich_norm,
        fused_projections=family.fused_projections,
        rope_per_layer_type=family.rope_per_layer_type,
        attn_softcap=getattr(config, "attn_logit_softcapping", None),
        final_softcap=getattr(config, "final_logit_softcapping", None),
        rope_type=_rope_type(config, family.rope_per_layer_type),
    )
