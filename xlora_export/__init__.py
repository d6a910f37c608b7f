"""xlora-export: X-LoRA (a mixture of LoRA experts) from PyTorch to deployment.

`import xlora_export as xlora` gives the seed's Global API (`add_xlora_to_model`,
`from_pretrained`, `xLoRAConfig`), the Model API on `xLoRAModel` and the Utility API in
`xlora.xlora_utils`.
"""

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
