"""xlora-export: X-LoRA (a mixture of LoRA experts) from PyTorch to deployment.

`import xlora_export as xlora` gives the original X-LoRA package's global API (`add_xlora_to_model`,
`from_pretrained`, `xLoRAConfig`), the Model API on `xLoRAModel` and the Utility API in
`xlora.xlora_utils`.

The names are imported on first use (PEP 562), so that importing the package, or its command
line entry point `xlora_export.cli`, does not import torch: the CLI imports it inside its
error handling, where Ctrl-C is one line and exit code 130.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import xlora_utils
    from .config import xLoRAConfig
    from .errors import XLoraError
    from .model import XLoraCausalLMOutput, add_xlora_to_model, from_pretrained, xLoRAModel

__all__ = [
    "XLoraCausalLMOutput",
    "XLoraError",
    "add_xlora_to_model",
    "from_pretrained",
    "xLoRAConfig",
    "xLoRAModel",
    "xlora_utils",
]
__version__ = "0.1.0"

_HOME = {"XLoraCausalLMOutput": ".model", "XLoraError": ".errors", "add_xlora_to_model": ".model",
         "from_pretrained": ".model", "xLoRAConfig": ".config", "xLoRAModel": ".model"}


def __getattr__(name: str) -> object:
    if name == "xlora_utils":
        value = importlib.import_module(".xlora_utils", __name__)
    elif name in _HOME:
        value = getattr(importlib.import_module(_HOME[name], __name__), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
