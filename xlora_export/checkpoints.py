"""Saving and loading X-LoRA checkpoints.

Formats read (detected from the files present):
- this project's (written by `save_pretrained`): the original xlora layout plus
  `xlora_ordering.json` (module name -> index, adapter name -> class index);
- original xlora: `xlora_config.json` (flat keys, `adapters` a list of names or a dict
  name -> path), `xlora_classifier.safetensors` (`inner.{i}.*`, `last.*`), one folder per expert;
- PEFT X-LoRA: `adapter_config.json` with `"peft_type": "XLORA"`, the classifier under
  `base_model.internal_xlora_classifier.layers.{i}.*` in `adapter_model.safetensors`.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from .config import xLoRAConfig
from .errors import XLoraError
from .experts import load_expert, read_tensors, save_expert

__all__ = ["detect_format", "from_pretrained", "read_checkpoint", "resolve_base_model", "save_pretrained"]

CONFIG_FILE = "xlora_config.json"
CLASSIFIER_FILE = "xlora_classifier.safetensors"
CLASSIFIER_FILE_PT = "xlora_classifier.pt"
ORDERING_FILE = "xlora_ordering.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier.layers."
# adapter_config.json fields of PEFT's XLoraConfig that are not X-LoRA knobs
_PEFT_ONLY = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
              "peft_version"}


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            record = json.load(f)
    except json.JSONDecodeError as e:
        raise XLoraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise XLoraError(f"{path}: expected a JSON object")
    return record


def detect_format(directory: str) -> str:
    """'xlora' (this project's or the original's) or 'peft'; XLoraError when neither."""
    if not os.path.isdir(directory):
        raise XLoraError(f"{directory}: not a directory (expected an X-LoRA checkpoint folder)")
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return "xlora"
    peft_cfg = os.path.join(directory, PEFT_CONFIG_FILE)
    if os.path.isfile(peft_cfg) and _read_json(peft_cfg).get("peft_type") == "XLORA":
        return "peft"
    raise XLoraError(f"{directory}: not an X-LoRA checkpoint (no {CONFIG_FILE}, and no {PEFT_CONFIG_FILE} "
                     f"with peft_type XLORA)")


def _resolve(directory: str, path: str) -> str:
    """An expert path as stored: absolute, or relative to the checkpoint (else to the working directory)."""
    if os.path.isabs(path):
        return path
    inside = os.path.join(directory, path)
    return inside if os.path.exists(inside) or not os.path.exists(path) else path


def resolve_base_model(directory: str, base_model_id: str | None) -> str | None:
    """The base model's local folder for a checkpoint's `base_model_id` (relative to the checkpoint
    first, then to the working directory), or the id unchanged when it is no local folder."""
    if not base_model_id:
        return None
    return _resolve(directory, base_model_id)


def read_checkpoint(directory: str, adapters: dict[str, str] | None = None
                    ) -> tuple[xLoRAConfig, dict[str, str], list[tuple[torch.Tensor, torch.Tensor | None]],
                               dict[str, Any] | None]:
    """Read a checkpoint folder without building a model.

    Returns:
        (config, adapters name -> folder, classifier Linears as (weight, bias) in data-flow order,
        the orderings record or None).
    """
    fmt = detect_format(directory)
    if fmt == "xlora":
        config, linears = _read_xlora(directory)
        saved = config.adapters
    else:
        config, linears = _read_peft(directory)
        saved = config.adapters
    if adapters is None:
        if isinstance(saved, list):
            adapters = {name: os.path.join(directory, name) for name in saved}
        else:
            adapters = {name: _resolve(directory, path) for name, path in saved.items()}
    ordering_path = os.path.join(directory, ORDERING_FILE)
    ordering = _read_json(ordering_path) if os.path.isfile(ordering_path) else None
    config.adapters = dict(adapters)
    return config, config.adapters, linears, ordering


def _linears_from_state(state: dict[str, torch.Tensor], prefix: str, source: str
                        ) -> dict[int, dict[str, torch.Tensor]]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(weight|bias)$")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = pattern.match(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    return out


def _read_xlora(directory: str) -> tuple[xLoRAConfig, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    config_path = os.path.join(directory, CONFIG_FILE)
    config = xLoRAConfig.from_dict(_read_json(config_path), config_path)
    path = os.path.join(directory, CLASSIFIER_FILE)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, CLASSIFIER_FILE_PT)):
        path = os.path.join(directory, CLASSIFIER_FILE_PT)
    state = read_tensors(path, "classifier")
    inner = _linears_from_state(state, "inner.", path)
    last = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("last.")}
    if "weight" not in last:
        raise XLoraError(f"{path}: missing tensor 'last.weight'")
    linears = [(inner[i].get("weight"), inner[i].get("bias")) for i in sorted(inner)]
    linears.append((last["weight"], last.get("bias")))
    for i, (w, _) in zip(sorted(inner), linears):
        if w is None:
            raise XLoraError(f"{path}: missing tensor 'inner.{i}.weight'")
    return config, linears


def _read_peft(directory: str) -> tuple[xLoRAConfig, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    config_path = os.path.join(directory, PEFT_CONFIG_FILE)
    record = _read_json(config_path)
    fields = {k: v for k, v in record.items() if k not in _PEFT_ONLY}
    fields["base_model_id"] = record.get("base_model_name_or_path")
    fields["use_bias"] = True  # PEFT's classifier always has biases and ReLU
    fields["enable_relu_and_dropout"] = True
    config = xLoRAConfig.from_dict(fields, config_path)
    path = os.path.join(directory, PEFT_WEIGHTS_FILE)
    state = read_tensors(path, "classifier")
    found = _linears_from_state(state, PEFT_CLASSIFIER_PREFIX, path)
    if len(found) != config.xlora_depth or any(set(t) != {"weight", "bias"} for t in found.values()):
        have = sorted(f"layers.{i}.{k}" for i, t in found.items() for k in t)
        raise XLoraError(
            f"{path}: the classifier is incomplete: expected {config.xlora_depth} Linear layer(s) with weight and "
            f"bias under {PEFT_CLASSIFIER_PREFIX}, found {have or 'none'} (PEFT's save_pretrained drops classifier "
            f"tensors; re-save the classifier with all its tensors)")
    return config, [(found[i]["weight"], found[i]["bias"]) for i in sorted(found)]


def load_classifier(classifier: nn.Module, linears: list[tuple[torch.Tensor, torch.Tensor | None]],
                    source: str) -> None:
    """Copy (weight, bias) pairs into the classifier's Linears, checking count and shapes."""
    targets = classifier.linears()
    if len(targets) != len(linears):
        raise XLoraError(f"{source}: the classifier has {len(linears)} Linear layer(s), the config's xlora_depth "
                         f"implies {len(targets)}")
    for i, (layer, (w, b)) in enumerate(zip(targets, linears)):
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise XLoraError(f"{source}: classifier Linear {i} has weight shape {tuple(w.shape)}, expected "
                             f"{tuple(layer.weight.shape)} (hidden_size, xlora_size, module or expert count differ)")
        if (b is None) != (layer.bias is None):
            raise XLoraError(f"{source}: classifier Linear {i} {'lacks' if b is None else 'has'} a bias, but "
                             f"use_bias={layer.bias is not None}")
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)


def from_pretrained(load_directory: str | os.PathLike, model: nn.Module, device: Any = None,
                    adapters: dict[str, str] | None = None, verbose: bool = False,
                    from_safetensors: bool = True) -> Any:
    """Load an X-LoRA checkpoint onto `model` (the base HF model).

    Args:
        load_directory: checkpoint folder (this project's, original xlora or PEFT X-LoRA).
        model: the base causal LM.
        device: where to put the model (default: leave it where it is).
        adapters: name -> expert folder, overriding the saved ones (None: the saved ones).
        verbose: print what was loaded.
        from_safetensors: read `.safetensors` experts (else `adapter_model.bin`).
    Returns:
        xLoRAModel.
    """
    from .model import xLoRAModel

    directory = os.fspath(load_directory)
    config, resolved, linears, ordering = read_checkpoint(directory, adapters)
    experts = [load_expert(name, path, from_safetensors) for name, path in resolved.items()]
    if device is not None:
        model = model.to(device)
        config.device = device
    xmodel = xLoRAModel(model, config, experts, verbose)
    if ordering is not None:
        _check_ordering(ordering, xmodel, os.path.join(directory, ORDERING_FILE))
    load_classifier(xmodel.internal_xlora_classifier, linears, directory)
    if verbose:
        print(f"Loaded X-LoRA classifier from {directory}")
    return xmodel


def _check_ordering(ordering: dict[str, Any], xmodel: Any, path: str) -> None:
    modules = {name: i for i, name in enumerate(xmodel.module_names)}
    adapters = {name: i for i, name in enumerate(xmodel.adapter_names)}
    if ordering.get("modules") != modules:
        raise XLoraError(f"{path}: the saved module ordering does not match the modules the experts target on "
                         f"this base model ({len(ordering.get('modules') or {})} saved, {len(modules)} found)")
    if ordering.get("adapters") != adapters:
        raise XLoraError(f"{path}: the saved adapter ordering {ordering.get('adapters')} does not match {adapters}")


def save_pretrained(xmodel: Any, save_directory: str) -> None:
    """Write `xmodel` in this project's format (the original xlora layout + `xlora_ordering.json`)."""
    os.makedirs(save_directory, exist_ok=True)
    record = xmodel.xlora_config.to_dict()
    record["adapters"] = list(xmodel.adapter_names)
    if record["scaling_pass_value"] is None:  # what the original writes for None, and its forward can use
        record["scaling_pass_value"] = 1.0 / len(xmodel.adapter_names)
    with open(os.path.join(save_directory, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in xmodel.internal_xlora_classifier.state_dict().items()}
    save_file(state, os.path.join(save_directory, CLASSIFIER_FILE))
    ordering = {"format_version": 1,
                "modules": {name: i for i, name in enumerate(xmodel.module_names)},
                "adapters": {name: i for i, name in enumerate(xmodel.adapter_names)}}
    with open(os.path.join(save_directory, ORDERING_FILE), "w") as f:
        json.dump(ordering, f, indent=2)
    for expert in xmodel.experts():
        save_expert(expert, os.path.join(save_directory, expert.name))
