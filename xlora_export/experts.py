"""Reading and writing the LoRA experts: PEFT LoRA folders (`adapter_config.json` +
`adapter_model.safetensors`), one per expert; an expert named by a Hugging Face Hub id is read from the Hub's
cache (`hub.resolve`).

An expert is held as {module name -> (A (r, in), B (out, r))} plus its scale alpha/r
(alpha/sqrt(r) with rsLoRA). Module names are those of the base model's `named_modules()`
(e.g. `model.layers.0.self_attn.q_proj`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .errors import XLoraError
from .hub import resolve

__all__ = ["Expert", "follow_umask", "load_expert", "read_tensors", "save_expert", "save_tensors"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
WEIGHTS_NAME_BIN = "adapter_model.bin"
_PREFIX = "base_model.model."
_BLOCKS = "model.layers."  # every supported family keeps its decoder blocks here (architectures.py)
# LoRA features this project does not implement: refused rather than silently ignored.
_UNSUPPORTED = {
    "use_dora": lambda v: bool(v),
    "fan_in_fan_out": lambda v: bool(v),
    "rank_pattern": lambda v: bool(v),
    "alpha_pattern": lambda v: bool(v),
    "layers_to_transform": lambda v: v is not None,
    "bias": lambda v: v not in (None, "none"),
    # PEFT adds lora_B's bias after the X-LoRA gate (ungated, in both passes): refused rather than half supported.
    "lora_bias": lambda v: bool(v),
}


@dataclass
class Expert:
    """One LoRA expert: per-module low-rank factors and the LoRA scale."""

    name: str
    rank: int
    scale: float  # alpha / r, or alpha / sqrt(r) with rsLoRA
    dropout: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> (A, B)
    adapter_config: dict[str, Any] = field(default_factory=dict)  # as read, written back on save


def follow_umask(path: str) -> None:
    """Give the file `path`, or every file under the folder `path`, the mode any other new file gets: 0666 less
    the process umask. safetensors >= 0.8 writes a private temporary file (0600) and renames it into place
    (safetensors >= 0.8), so its files would otherwise be unreadable to the group and to others."""
    mask = os.umask(0o077)  # reading the umask sets it: briefly a restrictive one
    os.umask(mask)
    files = [path] if not os.path.isdir(path) else [os.path.join(parent, name)
                                                     for parent, _, names in os.walk(path) for name in names]
    for file in files:
        os.chmod(file, 0o666 & ~mask)


def save_tensors(state: dict[str, torch.Tensor], path: str) -> None:
    """`safetensors.torch.save_file`, the file then given the umask's mode (`follow_umask`)."""
    save_file(state, path)
    follow_umask(path)


def read_tensors(path: str, what: str) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` (or torch `.bin`/`.pt`) state dict (name -> tensor).

    Raises:
        XLoraError: a missing, corrupt or truncated file, or one that holds no state dict (one line naming it).
    """
    if not os.path.isfile(path):
        raise XLoraError(f"{what}: {path} is missing")
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors' and torch's unpickler/zip reader raise many types on junk bytes
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise XLoraError(f"{what}: cannot read {path} ({reason}); expected a complete "
                         f"{'safetensors' if path.endswith('.safetensors') else 'torch'} state dict") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise XLoraError(f"{what}: {path} does not hold a state dict (name -> tensor)")
    return state


def load_expert(name: str, path: str, from_safetensors: bool = True) -> Expert:
    """Read a PEFT LoRA folder, or the folder of a Hub id `org/name[@revision]` in the Hub's cache (`hub.resolve`).

    Raises:
        XLoraError: missing folder or file, unsupported LoRA options, corrupt weights; a Hub id not cached while
            offline, or whose download failed.
    """
    path = resolve(path, f"expert '{name}'", prefer_safetensors=from_safetensors)
    if not os.path.isdir(path):
        raise XLoraError(f"expert '{name}': folder {path} does not exist")
    cfg_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(cfg_path):
        raise XLoraError(f"expert '{name}': {cfg_path} is missing (expected a PEFT LoRA folder)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise XLoraError(f"expert '{name}': {cfg_path} is not valid JSON ({reason})") from None
    if not isinstance(cfg, dict):
        raise XLoraError(f"expert '{name}': {cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise XLoraError(f"expert '{name}': {cfg_path} has peft_type {cfg.get('peft_type')!r}, expected 'LORA'")
    for key, bad in _UNSUPPORTED.items():
        if bad(cfg.get(key)):
            raise XLoraError(f"expert '{name}': {cfg_path} sets {key}={cfg[key]!r}, which is not supported")
    rank, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout") or 0.0
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise XLoraError(f"expert '{name}': {cfg_path} field 'r' is {rank!r}; expected a positive integer")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise XLoraError(f"expert '{name}': {cfg_path} field 'lora_alpha' is {alpha!r}; expected a number")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise XLoraError(f"expert '{name}': {cfg_path} field 'lora_dropout' is {dropout!r}; expected 0 <= p < 1")
    scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank

    weights_path = os.path.join(path, WEIGHTS_NAME if from_safetensors else WEIGHTS_NAME_BIN)
    state = read_tensors(weights_path, f"expert '{name}'")

    embedding = [key for key in state if "lora_embedding_" in key]
    if embedding:
        raise XLoraError(f"expert '{name}': {weights_path} has embedding LoRA ({embedding[0]}), which is not supported")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if ".lora_" in key or ".base_layer." in key:  # a LoRA-wrapped module: where is it?
            module = key.split(".lora_")[0].split(".base_layer.")[0]
            module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
            if not module.startswith(_BLOCKS):
                raise XLoraError(f"expert '{name}' targets {module}: X-LoRA experts may target only the Linears of "
                                 f"the decoder blocks ({_BLOCKS}*), not the embedding or lm_head")
        if ".lora_" in key and key.endswith(".bias"):
            raise XLoraError(f"expert '{name}': {weights_path} has a LoRA bias ({key}), which is not supported")
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0]
                module = module[len(_PREFIX):] if module.startswith(_PREFIX) else module
                pairs.setdefault(module, {})[part] = tensor
                break
        else:
            raise XLoraError(f"expert '{name}': {weights_path} has an unexpected tensor {key!r}")
    if not pairs:
        raise XLoraError(f"expert '{name}': {weights_path} holds no LoRA weights")
    weights = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise XLoraError(f"expert '{name}': {weights_path} lacks lora_A or lora_B for {module}")
        a, b = ab["lora_A"], ab["lora_B"]
        if not (a.is_floating_point() and b.is_floating_point()):
            raise XLoraError(f"expert '{name}': {weights_path} {module}: LoRA weights have dtypes {a.dtype} and "
                             f"{b.dtype}; expected floating point")
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise XLoraError(
                f"expert '{name}': {weights_path} {module}: expected A (r={rank}, in) and B (out, r={rank}), "
                f"got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        weights[module] = (a, b)
    return Expert(name, rank, scale, float(dropout), weights, cfg)


def save_expert(expert: Expert, path: str) -> None:
    """Write `expert` as a PEFT LoRA folder at `path` (created)."""
    os.makedirs(path, exist_ok=True)
    state = {}
    for module, (a, b) in expert.weights.items():
        state[f"{_PREFIX}{module}.lora_A.weight"] = a.detach().contiguous().cpu()
        state[f"{_PREFIX}{module}.lora_B.weight"] = b.detach().contiguous().cpu()
    save_tensors(state, os.path.join(path, WEIGHTS_NAME))
    with open(os.path.join(path, CONFIG_NAME), "w") as f:
        json.dump(expert.adapter_config, f, indent=2, sort_keys=True)
