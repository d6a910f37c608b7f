"""The scalings log of the eager model, in the file format of `xlora_runtime.scalings_log`
(shared with the runtime): torch tensors in, torch tensors out."""

from __future__ import annotations

import torch

from xlora_runtime.scalings_log import load_scalings_arrays, save_scalings_arrays

__all__ = ["flush_log_scalings", "load_scalings_log"]


def flush_log_scalings(log: list[torch.Tensor], path: str) -> list[str]:
    """Write `log` (a list of (b, s, L, n) tensors, any dtype or device); return the files written."""
    return save_scalings_arrays([t.detach().to("cpu", torch.float32).numpy() for t in log], path)


def load_scalings_log(path: str, verbose: bool = False) -> list[torch.Tensor]:
    """Read a log: the list of (b, s, L, n) float32 tensors in logged order."""
    return [torch.from_numpy(a) for a in load_scalings_arrays(path, verbose)]
