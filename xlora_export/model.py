"""`xLoRAModel`: the two-pass X-LoRA forward and the original X-LoRA package's Model API.

One step, with two caches (see `cache.py`):

    scaling pass:  hidden = decoder(input_ids, gates = scaling_pass_value, cache.scaling)   # no grad
    classifier:    scalings = softmax(classifier(hidden) / T)                               # (b, s, L, n)
    top-k:         gates = top_k_gates(scalings, k, enable_softmax_topk)
    real pass:     logits = lm_head(decoder(input_ids, column_gates(gates), cache.real))

Both passes are plain calls of `decoder_pass` below, with no hooks: the same code runs
eagerly, in training and under the ONNX exporter.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from .architectures import DecoderSpec, decoder_spec
from .cache import XLoraCache
from .checkpoints import Checkpoint, check_ordering, load_classifier, read_checkpoint, write_checkpoint
from .classifier import XLoraClassifier, top_k_gates
from .config import xLoRAConfig
from .decoder import attention_masks, decoder_pass, lm_logits
from .errors import XLoraError
from .experts import Expert, load_expert
from .generation import GenerationMixin
from .lora import XLoraLinear, column_gates
from .scalings_log import flush_log_scalings

__all__ = ["XLoraCausalLMOutput", "add_xlora_to_model", "from_pretrained", "xLoRAModel"]


@dataclass
class XLoraCausalLMOutput(ModelOutput):
    """HF-style output: `loss` (with labels), `logits` (b, s, vocab), `cache` (both passes),
    `scalings` (b, s, L, n) before top-k."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: XLoraCache | None = None
    scalings: torch.Tensor | None = None

    @property
    def past_key_values(self) -> XLoraCache | None:
        """Alias of `cache` (the pre-5.24 transformers name)."""
        return self.cache


class xLoRAModel(GenerationMixin, nn.Module):  # noqa: N801 - the original X-LoRA package's public name
    """A causal LM with n LoRA experts gated per token by a classifier (build it with
    `add_xlora_to_model` or `from_pretrained`); `generate` and `decode` come from `generation.py`."""

    def __init__(self, model: nn.Module, config: xLoRAConfig, experts: list[Expert], verbose: bool = False) -> None:
        super().__init__()
        self.spec: DecoderSpec = decoder_spec(model)  # what differs between base-model families
        if config.hidden_size != model.config.hidden_size:
            raise XLoraError(f"xLoRAConfig.hidden_size={config.hidden_size} does not match the base model's "
                             f"hidden_size={model.config.hidden_size}")
        if not experts:
            raise XLoraError("xLoRAConfig.adapters: at least one expert is needed")
        config.check_top_k(config.top_k_lora)
        for p in model.parameters():
            p.requires_grad_(False)
        self.model = model
        self.config = model.config  # the base model's HF config (what HF tooling expects)
        self.xlora_config = config
        self.adapter_names = [e.name for e in experts]
        self.module_names = _inject(model, experts)
        n_modules, n_experts = len(self.module_names), len(experts)
        weight = model.lm_head.weight
        self.internal_xlora_classifier = XLoraClassifier(config, n_modules, n_experts).to(weight.device, weight.dtype)
        self._expert_meta = {e.name: Expert(e.name, e.rank, e.scale, e.dropout, {}, e.adapter_config)
                             for e in experts}  # everything but the weights, which live in the XLoraLinears
        self._log: list[torch.Tensor] = []
        self._logging = False
        self._latest: torch.Tensor | None = None
        self.set_use_trainable_adapters(config.use_trainable_adapters)
        self.eval()
        if verbose:
            print(f"X-LoRA: {n_experts} experts {self.adapter_names} over {n_modules} modules")

    # ----------------------------------------------------------------------------- forward
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: XLoraCache | None = None,
                use_cache: bool | None = None, labels: torch.Tensor | None = None,
                scalings: torch.Tensor | None = None, expert_top_k: int | torch.Tensor | None = None,
                past_key_values: XLoraCache | None = None, num_items_in_batch: int | torch.Tensor | None = None,
                logits_to_keep: int = 0, **kwargs: Any) -> XLoraCausalLMOutput:
        """Both passes over the new tokens.

        Args:
            input_ids: (b, s) new tokens.
            attention_mask: (b, past + s), 1 = real token, 0 = (left) padding. Default all ones.
            position_ids: (b, s). Default `cumsum(attention_mask) - 1` clipped at 0.
            cache: the `XLoraCache` of earlier tokens (`past_key_values` is an alias).
            use_cache: return the updated cache (default: in eval mode).
            labels: (b, s) for the LM loss (HF convention: shifted inside, -100 ignored).
            scalings: given scalings instead of the classifier's, skipping the scaling pass (and its cache):
                (b, L, n) for every new token (the frozen path), or (b, s, L, n) per token (e.g. training
                experts with the routing known).
            expert_top_k: experts kept per token and module, overriding `top_k_lora` for this call (0 = dense);
                an int64 tensor when traced.
            num_items_in_batch: HF Trainer's token count for the loss under gradient accumulation.
            logits_to_keep: k > 0: logits of the last k positions only (generation needs the last one; lm_head
                is then not run over the prompt). 0: every position (needed with `labels`).
        Returns:
            XLoraCausalLMOutput(loss, logits (b, s or k, vocab), cache, scalings (b, s, L, n)).
        """
        cache = cache if cache is not None else past_key_values
        b, s = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = torch.ones(b, past + s, dtype=torch.int64, device=input_ids.device)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -s:]
        masks = attention_masks(attention_mask, s, self.spec.windows)  # window -> (b, 1, 1, s, past + s)
        g = self.xlora_config.global_scaling_weight
        n_modules, n_experts = len(self.module_names), len(self.adapter_names)
        layers = self.lora_layers()

        if scalings is None:
            with torch.no_grad():  # the scaling pass carries no gradient
                hidden, scaling_present = decoder_pass(
                    self.model, self.spec, input_ids, position_ids, masks,
                    cache.scaling if cache is not None else None,
                    column_gates(layers, self._scaling_pass_gates(), g))
            scalings = self.internal_xlora_classifier(hidden)  # (b, s, L, n)
            # a non-layerwise classifier gives every module the same scalings: gate them once
            per_module = scalings if self.xlora_config.layerwise_scalings else scalings[:, :, :1]
        else:
            if scalings.shape not in ((b, n_modules, n_experts), (b, s, n_modules, n_experts)):
                raise XLoraError(f"forward(scalings=...): expected shape ({b}, {n_modules}, {n_experts}) or, per "
                                 f"token, ({b}, {s}, {n_modules}, {n_experts}), got {tuple(scalings.shape)}")
            if scalings.dim() == 3:
                scalings = scalings.unsqueeze(1).expand(b, s, n_modules, n_experts)
            per_module = scalings
            scaling_present = None
        k = self.xlora_config.top_k_lora if expert_top_k is None else expert_top_k
        gates = top_k_gates(per_module, k, self.xlora_config.enable_softmax_topk)  # (b, s, L or 1, n)
        hidden, present = decoder_pass(self.model, self.spec, input_ids, position_ids, masks,
                                       cache.real if cache is not None else None, column_gates(layers, gates, g))
        if logits_to_keep:
            if labels is not None:
                raise XLoraError("forward(logits_to_keep=...) with labels: the loss needs every position's logits")
            hidden = hidden[:, -logits_to_keep:]
        logits = lm_logits(self.model, self.spec, hidden)  # (b, s or logits_to_keep, vocab)

        self._latest = scalings.detach()
        if self._logging:
            self._log.append(self._latest)
        loss = None
        if labels is not None:
            loss = self.model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1],
                                            num_items_in_batch=num_items_in_batch)
        if use_cache is None:
            use_cache = not self.training
        new_cache = XLoraCache(present, scaling_present) if use_cache else None
        return XLoraCausalLMOutput(loss=loss, logits=logits, cache=new_cache, scalings=scalings)

    def _scaling_pass_gates(self) -> float | None:
        """The scaling pass's uniform expert weight; None (no LoRA ops at all) when it is 0."""
        value = self.xlora_config.scaling_pass_value
        if value is None:
            return 1.0 / len(self.adapter_names)
        return None if value == 0 else float(value)

    # ----------------------------------------------------------------------------- checkpoints
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write config, classifier, orderings and each expert (original xlora layout + `xlora_ordering.json`)."""
        write_checkpoint(save_directory, self.xlora_config, self.module_names,
                         self.internal_xlora_classifier.state_dict(), self.experts())

    def lora_layers(self) -> list[XLoraLinear]:
        """The wrapped modules in module-index order."""
        return [m for m in self.model.modules() if isinstance(m, XLoraLinear)]

    def experts(self) -> list[Expert]:
        """The experts as they are now in memory (trained adapters included), rank and scale as loaded."""
        out = {name: dataclasses.replace(meta, weights={}) for name, meta in self._expert_meta.items()}
        for layer in self.lora_layers():
            for name, ab in layer.expert_weights().items():
                out[name].weights[layer.module_name] = ab
        return [out[name] for name in self.adapter_names]

    # ----------------------------------------------------------------------------- scalings log
    def enable_scalings_logging(self) -> None:
        """Log the scalings (b, s, L, n) of every forward from now on."""
        self._logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self._logging = False

    def clear_scalings_log(self) -> None:
        """Empty the log."""
        self._log = []

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A shallow copy of the log: a list of (b, s, L, n) tensors."""
        return list(self._log)

    def flush_log_scalings(self, path: str) -> None:
        """Write the log to `{path}.npy`, or `{path}-{j}.npy` + `{path}-mapping.json` (path without extension)."""
        flush_log_scalings(self._log, path)

    def get_latest_scalings(self) -> torch.Tensor | None:
        """The scalings (b, s, L, n) of the latest forward, or None."""
        return self._latest

    # ----------------------------------------------------------------------------- setters
    def set_scaling_pass_value(self, value: float | None) -> None:
        """Every scaling in the scaling pass (None: 1/n). Reflected in the config."""
        self.xlora_config.scaling_pass_value = value

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiply every expert's output by `weight`. Reflected in the config."""
        self.xlora_config.global_scaling_weight = float(weight)

    def get_global_scaling_weight(self) -> float:
        """The global LoRA weight."""
        return self.xlora_config.global_scaling_weight

    set_global_lora_weight = set_global_scaling_weight
    get_global_lora_weight = get_global_scaling_weight

    def set_topk_lora(self, value: int | None) -> None:
        """Keep the top `value` experts per token and module (None: dense). Reflected in the config."""
        self.xlora_config.check_top_k(value)
        self.xlora_config.top_k_lora = value

    def get_topk_lora(self) -> int | None:
        """The current top-k (None: dense)."""
        return self.xlora_config.top_k_lora

    def set_use_trainable_adapters(self, use_trainable_adapters: bool) -> None:
        """Make the experts trainable (or frozen). Reflected in the config."""
        self.xlora_config.use_trainable_adapters = bool(use_trainable_adapters)
        for layer in self.lora_layers():
            layer.lora_A.requires_grad_(bool(use_trainable_adapters))
            layer.lora_B.requires_grad_(bool(use_trainable_adapters))

    def get_use_trainable_adapters(self) -> bool:
        """Whether the experts are trainable."""
        return self.xlora_config.use_trainable_adapters

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(num_trainable, num_all_params), X-LoRA components included."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def print_trainable_parameters(self) -> None:
        """Print the trainable and total parameter counts."""
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || "
              f"trainable%: {100 * trainable / total:.4f}")


def _inject(model: nn.Module, experts: list[Expert]) -> list[str]:
    """Replace every Linear targeted by an expert with an `XLoraLinear`; return the module order."""
    modules = dict(model.named_modules())
    for e in experts:
        for name, (a, b) in e.weights.items():
            layer = modules.get(name)
            if not isinstance(layer, nn.Linear):
                raise XLoraError(f"expert '{e.name}' targets {name}, which is not a Linear of the base model "
                                 f"{type(model).__name__} (expert built for another base?)")
            if a.shape[1] != layer.in_features or b.shape[0] != layer.out_features:
                raise XLoraError(
                    f"expert '{e.name}' {name}: LoRA shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit the "
                    f"base Linear ({layer.in_features} -> {layer.out_features}) (expert built for another base?)")
    order = [name for name, m in model.named_modules() if any(name in e.weights for e in experts)]
    for index, name in enumerate(order):
        mine = [(e, i) for i, e in enumerate(experts) if name in e.weights]
        wrapped = XLoraLinear(modules[name], name, index, [e for e, _ in mine], [i for _, i in mine], len(experts))
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, wrapped)
    return order


def add_xlora_to_model(model: nn.Module, xlora_config: xLoRAConfig, verbose: bool = False,
                       from_safetensors: bool = True) -> xLoRAModel:
    """Wrap `model` (a supported HF causal LM) with the experts of `xlora_config.adapters`
    (name -> PEFT LoRA folder or Hub id `org/name[@revision]`) and a freshly initialised classifier."""
    if not isinstance(xlora_config.adapters, dict):
        raise XLoraError("xLoRAConfig.adapters: expected a dict name -> expert folder (a list of names only "
                         "works with from_pretrained, which finds the folders in the checkpoint)")
    decoder_spec(model)  # refuse an unsupported base before reading the experts
    experts = [load_expert(name, os.fspath(path), from_safetensors) for name, path in xlora_config.adapters.items()]
    return xLoRAModel(model, xlora_config, experts, verbose)


def from_pretrained(load_directory: str | os.PathLike | Checkpoint, model: nn.Module, device: Any = None,
                    adapters: dict[str, str] | None = None, verbose: bool = False,
                    from_safetensors: bool = True) -> xLoRAModel:
    """Load an X-LoRA checkpoint onto `model` (the base HF model).

    Args:
        load_directory: checkpoint folder (this project's, original xlora or PEFT X-LoRA) or Hub id
            (`org/name[@revision]`), or its `Checkpoint` record from `read_checkpoint` (which already holds any
            adapters override).
        model: the base causal LM (its Linears are wrapped in place).
        device: where to put the model (default: leave it where it is).
        adapters: name -> expert folder or Hub id, overriding the saved ones (None: the saved ones).
        verbose: print what was loaded.
        from_safetensors: read `.safetensors` experts (else `adapter_model.bin`).
    Returns:
        xLoRAModel.
    """
    if isinstance(load_directory, Checkpoint):
        if adapters is not None:
            raise XLoraError("from_pretrained: pass adapters to read_checkpoint, not beside a Checkpoint record")
        checkpoint = load_directory
    else:
        checkpoint = read_checkpoint(load_directory, adapters)
    experts = [load_expert(name, path, from_safetensors) for name, path in checkpoint.adapters.items()]
    config = checkpoint.fresh_config()
    if device is not None:
        model = model.to(device)
        config.device = device
    xmodel = xLoRAModel(model, config, experts, verbose)
    check_ordering(checkpoint, xmodel.module_names, xmodel.adapter_names)
    load_classifier(xmodel.internal_xlora_classifier, checkpoint)
    if verbose:
        print(f"Loaded X-LoRA classifier from {checkpoint.directory}")
    return xmodel
