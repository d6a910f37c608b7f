"""Shared test helpers: tiny model builds (from `models/recipes.py`), the PEFT oracle, diffs."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from functools import cache

import torch
from transformers import AutoModelForCausalLM

import xlora_export as xlora
from models.recipes import RECIPES, build

# Each pytest process builds its own copies (seconds), so that concurrent runs never share a folder.
BUILD_ROOT = os.environ.get("XLORA_TEST_MODELS") or tempfile.mkdtemp(prefix="xlora-test-models-")
if "XLORA_TEST_MODELS" not in os.environ:
    atexit.register(shutil.rmtree, BUILD_ROOT, True)


@cache
def built(name: str) -> str:
    """Folder of a recipe's checkpoint, built once per test session (a few seconds each)."""
    return build(RECIPES[name], os.path.join(BUILD_ROOT, name))


def load_base(name: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A fresh copy of a recipe's base model."""
    return AutoModelForCausalLM.from_pretrained(os.path.join(built(name), "base"), dtype=dtype).eval()


def expert_paths(name: str) -> dict[str, str]:
    """The recipe's experts: name -> folder, in the recipe's order."""
    folder = built(name)
    return {e.name: os.path.join(folder, e.name) for e in RECIPES[name].experts}


def make_xlora(name: str = "tiny-llama", seed: int = 0, classifier_std: float = 0.3,
               **overrides) -> xlora.xLoRAModel:
    """An X-LoRA model over a recipe's base and experts, with a random classifier and config overrides."""
    base = load_base(name)
    fields = dict(xlora_depth=2, xlora_size=32, layerwise_scalings=True, xlora_dropout_p=0.0)
    fields.update(overrides)
    adapters = fields.pop("adapters", expert_paths(name))
    config = xlora.xLoRAConfig(base.config.hidden_size, base_model_id=os.path.join(built(name), "base"),
                               adapters=adapters, **fields)
    model = xlora.add_xlora_to_model(base, config)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.internal_xlora_classifier.parameters():
            p.normal_(0.0, classifier_std)
    return model


def peft_oracle(model: xlora.xLoRAModel, name: str) -> torch.nn.Module:
    """PEFT's XLoraModel with the same base, experts and classifier weights (fp32, use_cache=False).

    PEFT needs expert keys "0".."n-1" and always has classifier biases and ReLU.
    """
    from peft import XLoraConfig, get_peft_model

    c = model.xlora_config
    base = load_base(name)
    base.config.use_cache = False
    paths = expert_paths(name)
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=c.hidden_size,
                      adapters={str(i): paths[n] for i, n in enumerate(model.adapter_names)},
                      enable_softmax=c.enable_softmax, enable_softmax_topk=c.enable_softmax_topk,
                      softmax_temperature=c.softmax_temperature, layerwise_scalings=c.layerwise_scalings,
                      top_k_lora=c.top_k_lora, xlora_depth=c.xlora_depth, xlora_size=c.xlora_size,
                      xlora_dropout_p=c.xlora_dropout_p, scaling_pass_value=c.scaling_pass_value,
                      global_scaling_weight=c.global_scaling_weight)
    peft_model = get_peft_model(base, cfg).eval()
    if c.scaling_pass_value is None:
        peft_model.set_scaling_pass_value(None)
    clf = peft_model.base_model.internal_xlora_classifier
    targets = [m for m in clf.layers if isinstance(m, torch.nn.Linear)]
    sources = model.internal_xlora_classifier.linears()
    assert len(targets) == len(sources)
    with torch.no_grad():
        for t, s in zip(targets, sources):
            t.weight.copy_(s.weight)
            t.bias.copy_(s.bias)
    return peft_model


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max absolute difference, as a float (for messages that report the figure)."""
    return (a.detach().double() - b.detach().double()).abs().max().item()


def left_padded(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of left-padded prompts."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@cache
def exported(name: str) -> str:
    """A recipe's checkpoint exported once per test session (with the frozen graph), not validated here."""
    from xlora_export.export import ExportOptions, export

    folder = os.path.join(BUILD_ROOT, "exports")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{name}.onnx")
    export(built(name), path, ExportOptions(frozen_scalings=True, validate=False))
    return path


def edit_json(path: str, **changes) -> None:
    """Overwrite some top-level fields of a JSON file (a checkpoint's config, say) in place."""
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)
