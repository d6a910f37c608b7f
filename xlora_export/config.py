"""`xLoRAConfig`: every knob of an X-LoRA model, with the original X-LoRA package's names and defaults.

The config is validated at construction; each error names the field. It serialises to the
original xlora's flat `xlora_config.json` key set (`to_dict`/`from_dict`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any

from .errors import XLoraError

__all__ = ["xLoRAConfig"]

# Keys a saved record may carry that this project reads and ignores.
_IGNORED_KEYS = {"device"}
# Fields not written: the device is the loader's choice; stop_token_id was removed from the
# original's config, whose loader would reject it.
_NOT_SAVED = {"device", "stop_token_id"}


# Scalar fields and the types they accept (bool only where listed; int wherever float is).
_SCALAR_TYPES: dict[str, tuple[type, ...]] = {
    "hidden_size": (int,), "base_model_id": (str, type(None)), "enable_softmax": (bool,),
    "enable_softmax_topk": (bool,), "softmax_temperature": (float, int), "layerwise_scalings": (bool,),
    "top_k_lora": (int, type(None)), "xlora_depth": (int,), "xlora_size": (int,), "enable_relu_and_dropout": (bool,),
    "use_bias": (bool,), "xlora_dropout_p": (float, int), "stop_token_id": (int, type(None)),
    "use_trainable_adapters": (bool,), "scaling_pass_value": (float, int, type(None)),
    "global_scaling_weight": (float, int),
}
_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=4)


@dataclass
class xLoRAConfig:  # noqa: N801 - the original X-LoRA package's public name
    """Configuration of an X-LoRA model (field order and defaults as in the original X-LoRA README)."""

    hidden_size: int  # hidden size of the base model; the classifier's input width
    base_model_id: str | None = None  # hub id or local path of the base model
    device: Any = "cpu"  # device of the classifier (not saved)
    adapters: dict[str, str] | list[str] = field(default_factory=dict)  # expert name -> folder
    enable_softmax: bool = True  # softmax over experts of the classifier logits
    enable_softmax_topk: bool = False  # softmax over the kept top-k entries only
    softmax_temperature: float = 1.0  # logits are divided by it before the softmax
    layerwise_scalings: bool = False  # one set of scalings per LoRA-wrapped module
    top_k_lora: int | None = None  # keep the k largest scalings per token and module
    xlora_depth: int = 1  # number of Linear layers of the classifier
    xlora_size: int = 2048  # hidden width of the classifier (depth >= 2)
    enable_relu_and_dropout: bool = True  # ReLU + Dropout after every inner Linear
    use_bias: bool = True  # bias on every classifier Linear
    xlora_dropout_p: float = 0.2  # classifier dropout probability
    stop_token_id: int | None = None  # kept for compatibility; unused
    use_trainable_adapters: bool = False  # experts are trained with the classifier
    scaling_pass_value: float | None = 0.0  # every scaling in the scaling pass; None = 1/n
    global_scaling_weight: float = 1.0  # multiplies every LoRA expert's output

    def __post_init__(self) -> None:
        self._check_types()
        if not isinstance(self.hidden_size, int) or self.hidden_size < 1:
            raise XLoraError(f"xLoRAConfig.hidden_size: expected a positive int, got {self.hidden_size!r}")
        if self.enable_softmax_topk and self.top_k_lora is None:
            raise XLoraError("xLoRAConfig.enable_softmax_topk: needs top_k_lora to be set (got top_k_lora=None)")
        if self.top_k_lora is not None:
            self.check_top_k(self.top_k_lora)
        if not isinstance(self.xlora_depth, int) or self.xlora_depth < 1:
            raise XLoraError(f"xLoRAConfig.xlora_depth: expected an int >= 1, got {self.xlora_depth!r}")
        if not isinstance(self.xlora_size, int) or self.xlora_size < 1:
            raise XLoraError(f"xLoRAConfig.xlora_size: expected an int >= 1, got {self.xlora_size!r}")
        if not 0.0 <= float(self.xlora_dropout_p) < 1.0:
            raise XLoraError(f"xLoRAConfig.xlora_dropout_p: expected 0 <= p < 1, got {self.xlora_dropout_p!r}")
        if not float(self.softmax_temperature) > 0.0:
            raise XLoraError(
                f"xLoRAConfig.softmax_temperature: expected a positive number, got {self.softmax_temperature!r}"
            )
        if not isinstance(self.adapters, (dict, list)):
            raise XLoraError(f"xLoRAConfig.adapters: expected a dict name -> path or a list of names, "
                             f"got {type(self.adapters).__name__}")
        if self.enable_softmax and self.enable_softmax_topk:
            _warn_once("xLoRAConfig: enable_softmax and enable_softmax_topk are both on; X-LoRA's README calls "
                       "them mutually exclusive. Computing what PEFT computes: softmax over experts, top-k, then a "
                       "softmax over the kept probabilities.")

    def _check_types(self) -> None:
        """Each scalar field has its annotated type (bools are not numbers here; ints are accepted as floats)."""
        for name, kinds in _SCALAR_TYPES.items():
            value = getattr(self, name)
            if value is None and type(None) in kinds:
                continue
            ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
            if not ok:
                expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                raise XLoraError(f"xLoRAConfig.{name}: expected {expected}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise XLoraError(f"xLoRAConfig.{name}: expected a finite number, got {value!r}")

    @property
    def n_experts(self) -> int:
        """Number of experts (adapters)."""
        return len(self.adapters)

    def check_top_k(self, k: int | None) -> None:
        """Raise unless `k` is None (dense) or an int in 1..n_experts."""
        if k is None:
            return
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or (self.adapters and k > self.n_experts):
            upper = self.n_experts if self.adapters else "n_experts"
            raise XLoraError(f"xLoRAConfig.top_k_lora: expected None or an int in 1..{upper}, got {k!r}")

    def to_dict(self) -> dict[str, Any]:
        """The flat `xlora_config.json` record (original key set; `adapters` as a list of names)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_SAVED}
        out["adapters"] = list(self.adapters)
        return out

    @classmethod
    def from_dict(cls, record: dict[str, Any], source: str = "xlora_config.json") -> xLoRAConfig:
        """Build a config from a saved record; unknown keys are an error naming `source`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - names - _IGNORED_KEYS)
        if unknown:
            raise XLoraError(f"{source}: unknown field(s) {unknown}; expected only {sorted(names - {'device'})}")
        if "hidden_size" not in record:
            raise XLoraError(f"{source}: missing required field 'hidden_size'")
        kwargs = {k: v for k, v in record.items() if k in names and k not in _IGNORED_KEYS}
        # "enable_softmax_topk needs top_k_lora" holds at construction only: a model whose top-k was
        # set to None (dense) at run time saves a config that must load.
        softmax_topk_dense = kwargs.get("enable_softmax_topk") and kwargs.get("top_k_lora") is None
        if softmax_topk_dense:
            kwargs["enable_softmax_topk"] = False
        config = cls(**kwargs)
        config.enable_softmax_topk = config.enable_softmax_topk or bool(softmax_topk_dense)
        return config
