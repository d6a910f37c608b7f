"""xlora-runtime: run graphs exported by `xlora-export` with ONNX Runtime, without torch.

    from xlora_runtime import XLoraSession, Generator
    gen = Generator(XLoraSession("tiny-llama.onnx"))
    [result] = gen.generate("the model mixes", max_new_tokens=16)
    result.tokens, result.text, result.scalings   # scalings: (16, L modules, n experts)

The names are imported on first use (PEP 562), so that importing the package, or its command line entry
points `xlora_runtime.cli`, does not import onnxruntime or numpy: the commands import them inside their error
handling, where Ctrl-C is one line and exit code 130.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .errors import XLoraError

if TYPE_CHECKING:
    from .format.record import GraphInfo
    from .generation import Generation, Generator, TokenEvent
    from .scalings_log import load_scalings_arrays, save_scalings_arrays
    from .session import XLoraSession

__all__ = ["Generation", "Generator", "GraphInfo", "TokenEvent", "XLoraError", "XLoraSession", "load_scalings_arrays",
           "save_scalings_arrays"]
__version__ = "0.1.0"

_HOME = {"Generation": ".generation", "Generator": ".generation", "TokenEvent": ".generation",
         "load_scalings_arrays": ".scalings_log", "save_scalings_arrays": ".scalings_log",
         "GraphInfo": ".format.record", "XLoraSession": ".session"}


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
