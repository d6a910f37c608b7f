"""Which base models the X-LoRA forward runs on, and the checks that refuse the others.

Supported: the Llama, Mistral and Qwen2 families of transformers 5 (`*ForCausalLM`), with
grouped-query attention, attention/MLP biases and any RoPE type transformers implements.
They share one decoder layout, which `decoder.py` runs:
`model.embed_tokens -> model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp.{gate,up,down}_proj, mlp.act_fn} -> model.norm -> lm_head`.
"""

from __future__ import annotations

from torch import nn

from .errors import XLoraError

__all__ = ["SUPPORTED_MODEL_TYPES", "check_architecture"]

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


def check_architecture(model: nn.Module) -> None:
    """Raise XLoraError unless `model` is a supported causal LM without a short sliding window."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise XLoraError(
            f"unsupported architecture {name} (model_type={model_type!r}); "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} causal LMs"
        )
    inner = getattr(model, "model", None)
    if not (hasattr(model, "lm_head") and hasattr(inner, "layers") and hasattr(inner, "embed_tokens")):
        raise XLoraError(f"unsupported architecture {name}: expected a *ForCausalLM with .model.layers and .lm_head")
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None) or []
    sliding = window is not None and ("sliding_attention" in layer_types or model_type == "mistral")
    if sliding and window < config.max_position_embeddings:
        raise XLoraError(
            f"unsupported architecture {name}: sliding-window attention (sliding_window={window}) is shorter "
            f"than max_position_embeddings={config.max_position_embeddings}; only full attention is implemented"
        )
