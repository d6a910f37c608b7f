"""xlora-runtime: the torch-free side of xlora-export (the graph contract; the runtime lands in issue 4)."""

from . import contract

__all__ = ["contract"]
__version__ = "0.1.0"
