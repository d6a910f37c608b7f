"""The one user-facing error type of xlora-export.

Every mistake a caller can make (a bad config field, a missing expert folder, a checkpoint
for another base model, an unsupported architecture) raises :class:`XLoraError` with a
one-line message that names the file or field and what was expected. The CLI catches it
once and prints it without a traceback.
"""

from __future__ import annotations

__all__ = ["XLoraError"]


class XLoraError(ValueError):
    """A user error: bad input, bad checkpoint, unsupported model. Printed as one line."""
