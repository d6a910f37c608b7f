"""The original X-LoRA's utility API: `load_model` and `load_scalings_log`; and the base model's loading
(a local folder or a Hugging Face Hub id)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from .checkpoints import Checkpoint, read_checkpoint
from .errors import XLoraError
from .hub import resolve
from .model import from_pretrained, xLoRAModel
from .scalings_log import load_scalings_log

__all__ = ["load_base_model", "load_model", "load_scalings_log", "load_tokenizer"]


def load_tokenizer(folder: str | None) -> Any:
    """The transformers tokenizer in `folder` (a `Checkpoint.tokenizer`), left padding; None without a folder."""
    from transformers import AutoTokenizer

    if folder is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the generation convention of this project
    return tokenizer


def _weights_file(folder: str, key: str) -> str:
    """The file of `folder` that holds tensor `key` (sharded checkpoints: from the index), for messages."""
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                return os.path.join(folder, json.load(f)["weight_map"][key])
        except (OSError, ValueError, KeyError, TypeError):
            return index
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors"))) or sorted(glob.glob(os.path.join(folder, "*.bin")))
    return files[0] if len(files) == 1 else folder


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


def _converts(files: list[str], dtype: torch.dtype) -> bool:
    """Whether any floating tensor of the safetensors `files` is stored in another dtype than `dtype`."""
    for path in files:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        stored = {_SAFETENSORS_DTYPES.get(v.get("dtype"), dtype) for k, v in header.items() if k != "__metadata__"}
        if stored - {dtype}:
            return True
    return False


@contextlib.contextmanager
def _read_without_mmap() -> Iterator[None]:
    """transformers reads safetensors files through a memory map; when it converts their tensors to another
    dtype, every page of the file it touched stays resident until the load ends (an fp32 file loaded as fp16:
    the file's 2x plus the model's 1x, 3.1x the fp16 weights on a 1.1B model). safetensors' `pread` backend
    reads one tensor at a time instead (1.2x). This sets it for the call (transformers' module-level
    `safe_open`; without one, the load merely uses more memory)."""
    import transformers.modeling_utils as loader

    original = getattr(loader, "safe_open", None)
    if original is None:
        yield
        return
    loader.safe_open = lambda *args, **kwargs: original(*args, **{**kwargs, "backend": "pread"})
    try:
        yield
    finally:
        loader.safe_open = original


def load_base_model(folder: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base causal LM of a local folder (or of a Hub id `org/name[@revision]`: its folder in the Hub's
    cache), every weight checked.

    Raises:
        XLoraError: a Hub id not cached while offline, or whose download failed.
        XLoraError: a corrupt or truncated weights file, a config transformers rejects, a weight whose shape
            differs from the config's, or a weight missing from the files (transformers would initialise it
            randomly and only warn).
    """
    import transformers
    from transformers import AutoModelForCausalLM

    folder = resolve(os.fspath(folder), "base model", prefer_safetensors=True)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    for path in files:
        try:
            with safe_open(path, "pt"):
                pass
        except (SafetensorError, OSError) as e:
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise XLoraError(f"{path}: cannot read ({reason}); expected a complete safetensors file of the base "
                             f"model's weights") from None
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report is several lines; ours is one
    try:
        with _read_without_mmap() if _converts(files, dtype) else contextlib.nullcontext():
            model, info = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True,
                                                               ignore_mismatched_sizes=True)
    except Exception as e:  # transformers raises many types for a bad folder; we report one line
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise XLoraError(f"base model {folder}: transformers cannot load it ({type(e).__name__}: {reason}); expected "
                         f"a transformers causal LM folder (config.json and its weights)") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    mismatched = sorted(info.get("mismatched_keys") or [], key=str)
    if mismatched:
        key, got, want = mismatched[0]
        raise XLoraError(f"{_weights_file(folder, key)}: tensor {key!r} has shape {tuple(got)}, expected "
                         f"{tuple(want)} from {os.path.join(folder, 'config.json')}")
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise XLoraError(f"{_weights_file(folder, missing[0])}: tensor {missing[0]!r}{more} is missing; expected "
                         f"every weight of the model {os.path.join(folder, 'config.json')} describes")
    return model


def load_model(model_name: str | os.PathLike | Checkpoint, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, adapters: dict[str, str] | None = None,
               use_flash_attention_2: bool = False, load_xlora: bool = True, verbose: bool = False,
               from_safetensors: bool = True, base_model: str | None = None) -> tuple[xLoRAModel | nn.Module, Any]:
    """Load the base model named by a checkpoint's `base_model_id` and (by default) the X-LoRA model on it.

    Args:
        model_name: an X-LoRA checkpoint folder (any format `from_pretrained` reads) or Hub id
            (`org/name[@revision]`), or its `Checkpoint` record (which already holds any adapters or base model
            override).
        device, dtype: where and in which precision to load.
        adapters: name -> expert folder or Hub id overriding the saved ones.
        use_flash_attention_2: accepted for compatibility; this project runs its own attention.
        load_xlora: False returns the bare base model.
        base_model: base model folder or Hub id overriding the checkpoint's `base_model_id`.
    Returns:
        (model, tokenizer); the tokenizer is None when neither folder has one.
    Raises:
        XLoraError: as `read_checkpoint`, `Checkpoint.base_folder`, `load_base_model` and `from_pretrained`.
    """
    if isinstance(model_name, Checkpoint):
        if adapters is not None or base_model is not None:
            raise XLoraError("load_model: pass adapters and base_model to read_checkpoint, not beside a "
                             "Checkpoint record")
        checkpoint = model_name
    else:
        checkpoint = read_checkpoint(model_name, adapters, base_model)
    model = load_base_model(checkpoint.base_folder(), dtype).to(device)
    tokenizer = load_tokenizer(checkpoint.tokenizer)
    if not load_xlora:
        return model, tokenizer
    return from_pretrained(checkpoint, model, device, verbose=verbose, from_safetensors=from_safetensors), tokenizer
