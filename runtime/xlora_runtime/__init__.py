"""xlora-runtime: run graphs exported by `xlora-export` with ONNX Runtime, without torch.

    from xlora_runtime import XLoraSession, Generator
    gen = Generator(XLoraSession("tiny-llama.onnx"))
    [result] = gen.generate("the model mixes", max_new_tokens=16)
    result.tokens, result.text, result.scalings   # scalings: (16, L modules, n experts)
"""

from . import contract
from .errors import XLoraError
from .generation import Generation, Generator, TokenEvent
from .scalings_log import load_scalings_arrays, save_scalings_arrays
from .session import GraphInfo, XLoraSession

__all__ = ["Generation", "Generator", "GraphInfo", "TokenEvent", "XLoraError", "XLoraSession", "contract",
           "load_scalings_arrays", "save_scalings_arrays"]
__version__ = "0.1.0"
