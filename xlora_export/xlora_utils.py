"""The seed's Utility API: `load_model` and `load_scalings_log`."""

from __future__ import annotations

import os
from typing import Any

import torch

from .checkpoints import detect_format, from_pretrained, read_checkpoint, resolve_base_model
from .errors import XLoraError
from .scalings_log import load_scalings_log

__all__ = ["find_tokenizer", "load_model", "load_scalings_log", "load_tokenizer"]


def find_tokenizer(*folders: str | None) -> str | None:
    """The first folder (checkpoint first, then base model) that has a `tokenizer.json`, or None."""
    return next((f for f in folders if f and os.path.isfile(os.path.join(f, "tokenizer.json"))), None)


def load_tokenizer(*folders: str | None) -> Any:
    """The tokenizer of the first folder that has one (see `find_tokenizer`), left padding; or None."""
    from transformers import AutoTokenizer

    folder = find_tokenizer(*folders)
    if folder is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the generation convention of this project
    return tokenizer


def load_model(model_name: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               adapters: dict[str, str] | None = None, use_flash_attention_2: bool = False,
               load_xlora: bool = True, verbose: bool = False, from_safetensors: bool = True,
               base_model: str | None = None) -> tuple[Any, Any]:
    """Load the base model named by a checkpoint's `base_model_id` and (by default) the X-LoRA model on it.

    Args:
        model_name: an X-LoRA checkpoint folder (any format `from_pretrained` reads).
        device, dtype: where and in which precision to load.
        adapters: name -> expert folder overriding the saved ones.
        use_flash_attention_2: accepted for compatibility; this project runs its own attention.
        load_xlora: False returns the bare base model.
        base_model: base model folder overriding the checkpoint's `base_model_id`.
    Returns:
        (model, tokenizer); the tokenizer is None when neither folder has one.
    """
    from transformers import AutoModelForCausalLM

    detect_format(model_name)
    config = read_checkpoint(model_name, adapters)[0]
    base = base_model or resolve_base_model(model_name, config.base_model_id)
    if not base:
        raise XLoraError(f"{model_name}: the checkpoint names no base_model_id; pass base_model=PATH")
    if not os.path.isdir(base):
        raise XLoraError(f"base model {base!r} (from {model_name}) is not a local folder; this toolchain does not "
                         f"download weights: pass base_model=PATH")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).to(device)
    tokenizer = load_tokenizer(model_name, base)
    if not load_xlora:
        return model, tokenizer
    return from_pretrained(model_name, model, device, adapters, verbose, from_safetensors), tokenizer
