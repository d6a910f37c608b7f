"""GPU memory for the cache tensors, through polygraphy's CUDA wrapper (libcudart by ctypes; no torch, no pycuda).

`DeviceTensor` is a cache tensor in device memory that frees itself; `copy_rows` gathers whole rows (axis 0) of a
row-major tensor with one device-to-device copy per run of consecutive rows, so gathering or joining rows never
leaves the GPU and works for any dtype (bf16 included). `row_runs` is the copy plan, kept pure for the tests.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import numpy as np
from polygraphy import cuda as polygraphy_cuda

from .dtypes import HOST_DTYPES

__all__ = ["DeviceTensor", "copy_bytes", "copy_rows", "gpu_count", "row_runs", "set_device", "wrapper"]

_SCRATCH_BYTES = 256  # the address handed out for empty tensors (TensorRT wants a valid pointer)


def wrapper() -> Any:
    """polygraphy's CUDA wrapper (one per process; the tests put a host-memory fake here)."""
    return polygraphy_cuda.wrapper()


def row_runs(rows: Sequence[int], row_bytes: int) -> list[tuple[int, int, int]]:
    """The copies that gather `rows` (in order) of a row-major tensor: (destination offset, source offset, bytes)
    per run of consecutive source rows."""
    runs: list[tuple[int, int, int]] = []
    for i, row in enumerate(int(r) for r in rows):
        if runs and runs[-1][1] + runs[-1][2] == row * row_bytes and runs[-1][0] + runs[-1][2] == i * row_bytes:
            dst, src, size = runs[-1]
            runs[-1] = (dst, src, size + row_bytes)
        else:
            runs.append((i * row_bytes, row * row_bytes, row_bytes))
    return [run for run in runs if run[2]]


def copy_rows(dst: int, src: int, rows: Sequence[int], row_bytes: int) -> None:
    """Gather `rows` of the device tensor at `src` into the one at `dst` (device to device)."""
    for dst_offset, src_offset, size in row_runs(rows, row_bytes):
        copy_bytes(dst + dst_offset, src + src_offset, size)


def copy_bytes(dst: int, src: int, size: int, kind: str = "DeviceToDevice") -> None:
    """One synchronous cudaMemcpy of `size` bytes (`kind`: a polygraphy MemcpyKind name)."""
    if size:
        wrapper().memcpy(dst, src, size, getattr(polygraphy_cuda.MemcpyKind, kind))


class DeviceTensor:
    """A tensor in device memory (row-major), freed when the object goes.

    Args:
        shape: the tensor's shape.
        dtype: the graph's dtype name ("float32", "float16", "bfloat16", "int64", "int32").
    """

    _scratch: int | None = None  # shared by every empty tensor

    def __init__(self, shape: Sequence[int], dtype: str) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.nbytes = int(np.prod(self.shape)) * _itemsize(dtype)
        self._owned = self.nbytes > 0
        self.ptr = wrapper().malloc(self.nbytes) if self._owned else self._empty_address()

    @classmethod
    def _empty_address(cls) -> int:
        if cls._scratch is None:
            cls._scratch = wrapper().malloc(_SCRATCH_BYTES)
        return cls._scratch

    @classmethod
    def from_host(cls, array: np.ndarray, dtype: str) -> DeviceTensor:
        """A device copy of a host array already in `dtype`'s host layout (bf16: uint16 bits)."""
        tensor = cls(array.shape, dtype)
        host = np.ascontiguousarray(array)
        copy_bytes(tensor.ptr, host.ctypes.data, tensor.nbytes, "HostToDevice")
        return tensor

    def to_host(self) -> np.ndarray:
        """The values as a host array (bf16: uint16 bits)."""
        host = np.empty(self.shape, _host_dtype(self.dtype))
        copy_bytes(host.ctypes.data, self.ptr, self.nbytes, "DeviceToHost")
        return host

    def __del__(self) -> None:
        if getattr(self, "_owned", False):
            self._owned = False
            try:
                wrapper().free(self.ptr)
            except Exception:  # interpreter shutdown: the CUDA library may already be gone
                pass


def _host_dtype(dtype: str) -> np.dtype:
    return HOST_DTYPES[dtype] if dtype in HOST_DTYPES else np.dtype(dtype)


def _itemsize(dtype: str) -> int:
    return _host_dtype(dtype).itemsize


def gpu_count() -> int:
    """GPUs the CUDA runtime sees: 0 without libcudart, without a driver, or without a GPU."""
    try:
        handle = wrapper().handle
        count = ctypes.c_int(0)
        return count.value if handle.cudaGetDeviceCount(ctypes.byref(count)) == 0 else 0
    except Exception:  # polygraphy raises its own exception when libcudart is missing; ctypes raises OSError
        return 0


def set_device(index: int) -> None:
    """Make GPU `index` the current device of this thread (cudaSetDevice)."""
    wrapper().check(wrapper().handle.cudaSetDevice(ctypes.c_int(index)))
