"""The one user-facing error type of xlora-export and xlora-runtime.

Every mistake a caller can make (a bad config field, a missing expert folder, a graph that is
not an X-LoRA export, ids outside the vocabulary) raises :class:`XLoraError` with a one-line
message naming the file, field or input and what was expected. Command-line tools catch it
once and print it without a traceback. `xlora_export` re-exports it.
"""

from __future__ import annotations

__all__ = ["XLoraError", "brief"]


class XLoraError(ValueError):
    """A user error: bad input, bad checkpoint or graph, unsupported model. Printed as one line."""


def brief(value: object, limit: int = 60) -> str:
    """A bounded, one-line repr of a caller's value, for error messages."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."
