"""Host-side dtypes of the graph's float tensors. numpy has no bfloat16: a bf16 tensor is held on the host as its
raw 16-bit patterns (uint16), widened to float32 exactly (bf16 is the upper half of a float32) and narrowed with
round-to-nearest-even, as the GPU does."""

from __future__ import annotations

import numpy as np

__all__ = ["HOST_DTYPES", "from_float32", "to_float32"]

HOST_DTYPES = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16)}


def to_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """A host array of the graph dtype `dtype` (bf16: uint16 bits) as float32."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(array, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32, copy=False)


def from_float32(array: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a contiguous host array of the graph dtype `dtype` (bf16: uint16 bits, rounded to
    nearest even; NaN stays NaN)."""
    values = np.ascontiguousarray(array, dtype=np.float32)
    if dtype != "bfloat16":
        return values.astype(HOST_DTYPES[dtype], copy=False)
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)
