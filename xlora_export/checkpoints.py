"""X-LoRA checkpoint files: read a folder once into a `Checkpoint` record, write this project's format.

Nothing here builds a model (`model.from_pretrained` does, from a `Checkpoint`). Formats read
(detected from the files present):
- this project's (written by `write_checkpoint`): the original xlora layout plus
  `xlora_ordering.json` (module name -> index, adapter name -> class index);
- original xlora: `xlora_config.json` (flat keys, `adapters` a list of names or a dict
  name -> path), `xlora_classifier.safetensors` (`inner.{i}.*`, `last.*`), one folder per expert;
- PEFT X-LoRA: `adapter_config.json` with `"peft_type": "XLORA"`, the classifier under
  `base_model.internal_xlora_classifier.layers.{i}.*` in `adapter_model.safetensors`.

The checkpoint, its base model and each expert may be a Hugging Face Hub id (`org/name`, `org/name@revision`)
instead of a folder: `hub.resolve` turns it into the folder of the Hub's cache (a folder with that text wins).

Every malformed file is an `XLoraError` of one line naming the file (and field) and what was expected.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

import torch

from .classifier import XLoraClassifier
from .config import xLoRAConfig
from .errors import XLoraError
from .experts import Expert, read_tensors, save_expert, save_tensors
from .hub import REVISION, parse_hub_id, resolve

__all__ = ["Checkpoint", "check_adapter_name", "check_ordering", "find_tokenizer", "load_classifier",
           "read_checkpoint", "read_json", "write_checkpoint"]

CONFIG_FILE = "xlora_config.json"
CLASSIFIER_FILE = "xlora_classifier.safetensors"
CLASSIFIER_FILE_PT = "xlora_classifier.pt"
ORDERING_FILE = "xlora_ordering.json"
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier.layers."
TOKENIZER_FILE = "tokenizer.json"
_OWN_FILES = {CONFIG_FILE, CLASSIFIER_FILE, CLASSIFIER_FILE_PT, ORDERING_FILE, PEFT_CONFIG_FILE, PEFT_WEIGHTS_FILE,
              TOKENIZER_FILE}
# adapter_config.json fields of PEFT's XLoraConfig that are not X-LoRA knobs
_PEFT_ONLY = {"peft_type", "task_type", "base_model_name_or_path", "revision", "inference_mode", "auto_mapping",
              "peft_version"}

Linears = list[tuple[torch.Tensor, torch.Tensor | None]]  # classifier (weight (out, in), bias (out,) | None)


@dataclass
class Checkpoint:
    """Everything a checkpoint folder says, read once by `read_checkpoint`; loading, export and parity take it."""

    directory: str
    format: str  # "xlora" (this project's or the original's) or "peft"
    config: xLoRAConfig  # `adapters` resolved: name -> expert folder, in class-index order
    classifier: Linears  # the classifier's Linears in data-flow order, shapes checked against `config`
    classifier_file: str
    ordering: dict[str, dict[str, int]] | None  # {"modules": name -> l, "adapters": name -> i}, or None
    ordering_file: str
    # the base model as named: a folder, or a Hub id `org/name[@revision]`; None when the checkpoint names none
    base_model: str | None

    @property
    def adapters(self) -> dict[str, str]:
        """Expert name -> folder (or Hub id, resolved by `experts.load_expert`), in class-index order."""
        return self.config.adapters

    def base_folder(self) -> str:
        """The base model's local folder: `base_model` itself, or its Hub id's folder in the cache (downloaded
        when not cached and not offline).

        Raises:
            XLoraError: no base model named; neither a folder nor a Hub id; a Hub id not cached while offline or
                whose download failed.
        """
        if not self.base_model:
            raise XLoraError(f"{self.directory}: the checkpoint names no base_model_id; pass base_model=PATH")
        folder = resolve(self.base_model, f"base model (from {self.directory})", prefer_safetensors=True)
        if not os.path.isdir(folder):
            raise XLoraError(f"base model {self.base_model!r} (from {self.directory}) is not a local folder, nor a "
                             f"Hub id (org/name or org/name@revision); pass base_model=PATH")
        return folder

    @property
    def tokenizer(self) -> str | None:
        """The folder holding tokenizer.json: the checkpoint's, else the base model's (a Hub id resolved as
        `base_folder` does), else None."""
        if self.base_model is None:
            return find_tokenizer(self.directory)
        base = resolve(self.base_model, f"base model (from {self.directory})", prefer_safetensors=True)
        return find_tokenizer(self.directory, base)

    def fresh_config(self) -> xLoRAConfig:
        """A copy of the config for a model to own (its setters write into it)."""
        config = copy.copy(self.config)
        config.adapters = dict(self.config.adapters)
        return config

    def classifier_digest(self) -> str:
        """sha256 of the classifier's tensors (float32 bytes and shapes, data-flow order): identifies the checkpoint
        in an export's metadata."""
        h = hashlib.sha256()
        for tensors in self.classifier:
            for t in tensors:
                if t is not None:
                    h.update(repr(tuple(t.shape)).encode())
                    h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()


def read_json(path: str) -> dict[str, Any]:
    """A JSON object from `path`; XLoraError when the file is unreadable, not JSON or not an object."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, absurd nesting
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise XLoraError(f"{path}: not valid JSON ({reason})") from None
    except OSError as e:
        raise XLoraError(f"{path}: cannot read ({e.strerror or type(e).__name__})") from None
    if not isinstance(record, dict):
        raise XLoraError(f"{path}: expected a JSON object, got {type(record).__name__}")
    return record


def check_adapter_name(name: Any, source: str) -> str:
    """`name` as a plain folder name (an expert lives in `<checkpoint>/<name>/`); XLoraError naming `source`
    for anything else: not a string, empty, `.`/`..`, absolute, holding a path separator, or one of the
    checkpoint's own file names."""
    if not isinstance(name, str) or not name:
        raise XLoraError(f"{source}: adapter name {name!r}: expected a non-empty string")
    separators = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if name in (".", "..") or os.path.isabs(name) or any(s in name for s in separators) or "\x00" in name:
        raise XLoraError(f"{source}: adapter name {name!r}: expected a plain folder name (no path separator, "
                         f"no '..', not absolute)")
    if name in _OWN_FILES:
        raise XLoraError(f"{source}: adapter name {name!r}: expected a folder name other than the checkpoint's own "
                         f"files ({', '.join(sorted(_OWN_FILES))})")
    return name


def find_tokenizer(*folders: str | None) -> str | None:
    """The first folder (checkpoint first, then base model) that has a `tokenizer.json`, or None."""
    return next((f for f in folders if f and os.path.isfile(os.path.join(f, TOKENIZER_FILE))), None)


def _detect_format(directory: str) -> str:
    if not os.path.isdir(directory):
        raise XLoraError(f"{directory}: not a directory (expected an X-LoRA checkpoint folder)")
    if os.path.isfile(os.path.join(directory, CONFIG_FILE)):
        return "xlora"
    peft_cfg = os.path.join(directory, PEFT_CONFIG_FILE)
    if os.path.isfile(peft_cfg) and read_json(peft_cfg).get("peft_type") == "XLORA":
        return "peft"
    raise XLoraError(f"{directory}: not an X-LoRA checkpoint (no {CONFIG_FILE}, and no {PEFT_CONFIG_FILE} "
                     f"with peft_type XLORA)")


def _resolve(directory: str, path: str) -> str:
    """A path as stored: absolute, or relative to the checkpoint (else to the working directory); a Hub id that
    names neither stays as it is (`hub.resolve` looks it up)."""
    if os.path.isabs(path):
        return path
    inside = os.path.join(directory, path)
    if os.path.exists(inside):
        return inside
    return path if os.path.exists(path) or parse_hub_id(path) is not None else inside


# ----------------------------------------------------------------------------- JSON field types
def _matches(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a field's type hint (bool is not a number; an int is a float)."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_matches(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        return not isinstance(value, bool) and isinstance(value, (int,) if hint is int else (int, float))
    if origin is dict:
        key, item = typing.get_args(hint)
        return isinstance(value, dict) and all(_matches(k, key) and _matches(v, item) for k, v in value.items())
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    if typing.get_origin(hint) in (Union, types.UnionType):
        return " or ".join(_describe(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", None) if typing.get_origin(hint) is None else str(hint)


_FIELD_TYPES = typing.get_type_hints(xLoRAConfig)


def _config_from_record(record: dict[str, Any], source: str) -> xLoRAConfig:
    """`xLoRAConfig.from_dict` after checking each known field's JSON type against the dataclass's hints."""
    for key, value in record.items():
        hint = _FIELD_TYPES.get(key)
        if hint is not None and not _matches(value, hint):
            raise XLoraError(f"{source}: field {key!r} is {json.dumps(value)[:60]}; expected {_describe(hint)}")
    try:
        return xLoRAConfig.from_dict(record, source)
    except XLoraError as e:  # the config's value checks name the field; say which file holds it
        raise XLoraError(str(e) if str(e).startswith(source) else f"{source}: {e}") from None


# ----------------------------------------------------------------------------- reading
def read_checkpoint(directory: str | os.PathLike, adapters: dict[str, str] | None = None,
                    base_model: str | None = None) -> Checkpoint:
    """Read a checkpoint folder (any format above) into a `Checkpoint`, checking every file it names except the
    experts' weights (read when a model is built) and the base model.

    Args:
        directory: the checkpoint folder, or a Hub id `org/name[@revision]` (its folder in the Hub's cache).
        adapters: name -> expert folder or Hub id, overriding the saved ones (None: the saved ones).
        base_model: base model folder or Hub id overriding the checkpoint's `base_model_id`.
    Raises:
        XLoraError: not a checkpoint, malformed JSON or field, bad adapter name, missing/corrupt/mis-shaped
            classifier tensors, malformed ordering record; a Hub id not cached while offline.
    """
    directory = resolve(os.fspath(directory), "checkpoint")
    fmt = _detect_format(directory)
    revision = None
    if fmt == "xlora":
        config_file = os.path.join(directory, CONFIG_FILE)
        config = _config_from_record(read_json(config_file), config_file)
        classifier_file, linears = _read_xlora_classifier(directory)
    else:
        config_file = os.path.join(directory, PEFT_CONFIG_FILE)
        config, revision = _read_peft_config(config_file)
        classifier_file, linears = _read_peft_classifier(directory, config)
    saved = config.adapters
    names = list(saved)
    if len(set(names)) != len(names):
        raise XLoraError(f"{config_file}: adapter name {next(n for n in names if names.count(n) > 1)!r} appears twice")
    for name in names:
        check_adapter_name(name, config_file)
    if adapters is None:
        if isinstance(saved, list):
            adapters = {name: os.path.join(directory, name) for name in saved}
        else:
            adapters = {name: _resolve(directory, path) for name, path in saved.items()}
    else:
        adapters = {check_adapter_name(name, "adapters="): os.fspath(path) for name, path in adapters.items()}
    if not adapters:
        raise XLoraError(f"{config_file}: 'adapters' is empty; expected at least one expert")
    config.adapters = adapters
    _check_classifier_shapes(linears, config, classifier_file, config_file)
    ordering_file = os.path.join(directory, ORDERING_FILE)
    ordering = _read_ordering(ordering_file) if os.path.isfile(ordering_file) else None
    base = os.fspath(base_model) if base_model else _named_base(directory, config.base_model_id, revision,
                                                                 config_file)
    return Checkpoint(directory=directory, format=fmt, config=config, classifier=linears,
                      classifier_file=classifier_file, ordering=ordering, ordering_file=ordering_file,
                      base_model=base)


def _named_base(directory: str, base_id: str | None, revision: str | None, config_file: str) -> str | None:
    """The base model as the checkpoint names it: a folder (relative to the checkpoint, else to the working
    directory), else the Hub id, with PEFT's `revision` as `@revision`."""
    if not base_id:
        return None
    base = _resolve(directory, base_id)
    parsed = None if os.path.isdir(base) else parse_hub_id(base)
    if revision is None or parsed is None:
        return base
    if parsed[1] is not None and parsed[1] != revision:
        raise XLoraError(f"{config_file}: base_model_name_or_path {base_id!r} names revision {parsed[1]!r}, but "
                         f"field 'revision' is {revision!r}; expected one revision")
    return f"{parsed[0]}@{revision}"


def _linears_from_state(state: dict[str, torch.Tensor], prefix: str) -> dict[int, dict[str, torch.Tensor]]:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.(weight|bias)$")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        m = pattern.match(key)
        if m:
            out.setdefault(int(m.group(1)), {})[m.group(2)] = tensor
    return out


def _read_xlora_classifier(directory: str) -> tuple[str, Linears]:
    path = os.path.join(directory, CLASSIFIER_FILE)
    if not os.path.isfile(path) and os.path.isfile(os.path.join(directory, CLASSIFIER_FILE_PT)):
        path = os.path.join(directory, CLASSIFIER_FILE_PT)
    state = read_tensors(path, "classifier")
    inner = _linears_from_state(state, "inner.")
    last = {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith("last.")}
    for i in sorted(inner):
        if "weight" not in inner[i]:
            raise XLoraError(f"{path}: missing tensor 'inner.{i}.weight'")
    if "weight" not in last:
        raise XLoraError(f"{path}: missing tensor 'last.weight'")
    linears = [(inner[i]["weight"], inner[i].get("bias")) for i in sorted(inner)]
    return path, linears + [(last["weight"], last.get("bias"))]


def _read_peft_config(path: str) -> tuple[xLoRAConfig, str | None]:
    """The config of a PEFT X-LoRA `adapter_config.json`, and its `revision` (of the base model) or None."""
    record = read_json(path)
    fields = {k: v for k, v in record.items() if k not in _PEFT_ONLY}
    fields["base_model_id"] = record.get("base_model_name_or_path")
    fields["use_bias"] = True  # PEFT's classifier always has biases and ReLU
    fields["enable_relu_and_dropout"] = True
    revision = record.get("revision")
    if not (revision is None or isinstance(revision, str) and REVISION.fullmatch(revision)):
        raise XLoraError(f"{path}: field 'revision' is {json.dumps(revision)[:60]}; expected a branch, tag or "
                         f"commit hash, or null")
    return _config_from_record(fields, path), revision


def _read_peft_classifier(directory: str, config: xLoRAConfig) -> tuple[str, Linears]:
    path = os.path.join(directory, PEFT_WEIGHTS_FILE)
    state = read_tensors(path, "classifier")
    found = _linears_from_state(state, PEFT_CLASSIFIER_PREFIX)
    if len(found) != config.xlora_depth or any(set(t) != {"weight", "bias"} for t in found.values()):
        # PEFT's Sequential: Linear, ReLU and (xlora_dropout_p > 0) Dropout per hidden layer, then the last Linear
        step = 3 if config.xlora_dropout_p > 0 else 2
        missing = [name for i in range(config.xlora_depth) for k in ("weight", "bias")
                   if (name := f"{PEFT_CLASSIFIER_PREFIX}{i * step}.{k}") not in state]
        have = sorted(f"layers.{i}.{k}" for i, t in found.items() for k in t)
        what = f"missing tensor {', '.join(missing)}" if missing else f"found {have or 'none'}"
        raise XLoraError(f"{path}: the classifier is incomplete: {what} (expected {config.xlora_depth} Linear "
                         f"layer(s), each with weight and bias, under {PEFT_CLASSIFIER_PREFIX})")
    return path, [(found[i]["weight"], found[i]["bias"]) for i in sorted(found)]


def _check_classifier_shapes(linears: Linears, config: xLoRAConfig, path: str, config_file: str) -> None:
    """Count, dtypes and shapes of the classifier's Linears against the config (the module count L is only known
    with the base model: the last Linear's width is checked here as a multiple of n, exactly by
    `load_classifier`)."""
    if len(linears) != config.xlora_depth:
        raise XLoraError(f"{path}: the classifier has {len(linears)} Linear layer(s), but {config_file} says "
                         f"xlora_depth={config.xlora_depth}")
    n = len(config.adapters)
    for i, (w, b) in enumerate(linears):
        last = i == len(linears) - 1
        width_in = config.hidden_size if i == 0 else config.xlora_size
        for what, t in (("weight", w), ("bias", b)):
            if t is not None and not t.is_floating_point():
                raise XLoraError(f"{path}: classifier Linear {i} {what} has dtype {t.dtype}; expected a floating "
                                 f"point tensor")
        out = w.shape[0] if w.dim() == 2 else -1
        ok_out = (out > 0 and (out % n == 0 if config.layerwise_scalings else out == n)) if last \
            else out == config.xlora_size
        if w.dim() != 2 or w.shape[1] != width_in or not ok_out:
            want_out = ("L*n" if config.layerwise_scalings else str(n)) if last else str(config.xlora_size)
            raise XLoraError(
                f"{path}: classifier Linear {i} has weight shape {tuple(w.shape)}, expected ({want_out}, {width_in}) "
                f"from {config_file} (hidden_size={config.hidden_size}, xlora_size={config.xlora_size}, "
                f"{n} adapters, layerwise_scalings={config.layerwise_scalings})")
        if (b is not None) != config.use_bias:
            raise XLoraError(f"{path}: classifier Linear {i} {'has' if b is not None else 'lacks'} a bias, but "
                             f"{config_file} says use_bias={config.use_bias}")
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise XLoraError(f"{path}: classifier Linear {i} has bias shape {tuple(b.shape)}, expected "
                             f"({w.shape[0]},)")


def _read_ordering(path: str) -> dict[str, dict[str, int]]:
    record = read_json(path)
    for key in ("modules", "adapters"):
        value = record.get(key)
        if not (isinstance(value, dict) and all(isinstance(v, int) and not isinstance(v, bool)
                                                for v in value.values())):
            raise XLoraError(f"{path}: field {key!r}: expected an object name -> index")
    return {"modules": record["modules"], "adapters": record["adapters"]}


# ----------------------------------------------------------------------------- checks against a built model
def check_ordering(checkpoint: Checkpoint, module_names: list[str], adapter_names: list[str]) -> None:
    """The saved orderings (if any) equal those of the model built from the checkpoint."""
    if checkpoint.ordering is None:
        return
    path = checkpoint.ordering_file
    modules = {name: i for i, name in enumerate(module_names)}
    adapters = {name: i for i, name in enumerate(adapter_names)}
    if checkpoint.ordering["modules"] != modules:
        raise XLoraError(f"{path}: the saved module ordering does not match the modules the experts target on "
                         f"this base model ({len(checkpoint.ordering['modules'])} saved, {len(modules)} found)")
    if checkpoint.ordering["adapters"] != adapters:
        raise XLoraError(f"{path}: the saved adapter ordering {checkpoint.ordering['adapters']} does not match "
                         f"{adapters}")


def load_classifier(classifier: XLoraClassifier, checkpoint: Checkpoint) -> None:
    """Copy the checkpoint's classifier Linears into `classifier` (counts and widths were checked on reading;
    here the last width against L*n)."""
    for i, (layer, (w, b)) in enumerate(zip(classifier.linears(), checkpoint.classifier, strict=True)):
        if tuple(w.shape) != tuple(layer.weight.shape):
            raise XLoraError(f"{checkpoint.classifier_file}: classifier Linear {i} has weight shape {tuple(w.shape)}, "
                             f"expected {tuple(layer.weight.shape)} ({classifier.n_modules} modules x "
                             f"{classifier.n_experts} experts on this base model)")
        with torch.no_grad():
            layer.weight.copy_(w)
            if b is not None:
                layer.bias.copy_(b)


# ----------------------------------------------------------------------------- writing
def write_checkpoint(directory: str | os.PathLike, config: xLoRAConfig, module_names: list[str],
                     classifier_state: dict[str, torch.Tensor], experts: list[Expert]) -> None:
    """Write this project's format: the original xlora layout + `xlora_ordering.json`.

    Args:
        directory: the folder to write (created).
        config: the model's config (`adapters` is written as the experts' names).
        module_names: the module ordering (index l = position).
        classifier_state: the classifier's state dict (`inner.{i}.*`, `last.*`).
        experts: the experts in class-index order, written to `<directory>/<name>/`.
    Raises:
        XLoraError: an expert name that is not a plain folder name (checked before anything is written).
    """
    directory = os.fspath(directory)
    names = [check_adapter_name(e.name, "save_pretrained") for e in experts]
    os.makedirs(directory, exist_ok=True)
    record = config.to_dict()
    record["adapters"] = names
    if record["scaling_pass_value"] is None:  # what the original writes for None, and its forward can use
        record["scaling_pass_value"] = 1.0 / len(names)
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(record, f, indent=2)
    save_tensors({k: v.detach().contiguous().cpu() for k, v in classifier_state.items()},
                 os.path.join(directory, CLASSIFIER_FILE))
    ordering = {"format_version": 1,
                "modules": {name: i for i, name in enumerate(module_names)},
                "adapters": {name: i for i, name in enumerate(names)}}
    with open(os.path.join(directory, ORDERING_FILE), "w") as f:
        json.dump(ordering, f, indent=2)
    for expert in experts:
        save_expert(expert, os.path.join(directory, expert.name))

