"""The one user-facing error type, shared with the runtime package (see `xlora_runtime.errors`)."""

from xlora_runtime.errors import XLoraError

__all__ = ["XLoraError"]
