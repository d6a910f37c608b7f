"""TensorRT engines built by `xlora-engine`, run with the TensorRT API and polygraphy's CUDA wrapper (no torch).

    step: input shapes -> profile (prefill: past 0; decode: one new token) -> that profile's execution context
          -> set_input_shape for every input, output shapes from TensorRT (checked against the contract)
          -> device buffers: host inputs copied in, pasts as they are, presents taken from the pool
          -> execute_async_v3 on the context's stream -> logits and scalings copied out

Device buffers come from one pool per backend (`BufferPool`), by size class (powers of two bytes): a tensor that
goes gives its buffer back, and the next step's tensor of that class takes it. A decode step's presents are one
position longer than its pasts, so they take the buffers the previous step's pasts gave back: no cudaMalloc or
cudaFree per step (cudaFree synchronizes the device), one new buffer when a cache crosses a power of two (as the
CPU path's capacity doubles); buffers idle for `BufferPool.IDLE_STEPS` steps are freed.

Each profile has its own execution context (TensorRT lets one context own a profile at a time), created on first
use with memory for that profile only, and its own lock and stream: a prefill and decode steps of other
generations may run at once. The caches are `cuda.DeviceTensor`s: presents become the next step's pasts with no
copy, and rows are gathered by device-to-device copies. `EngineIO` is the shape bookkeeping (tested without
TensorRT); `make_backend` imports TensorRT.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from ..errors import XLoraError
from ..format import contract as C
from ..format.record import GraphInfo
from ..format.sidecar import Shapes, read_sidecar
from ..profiles import select_profile
from . import Backend, Graph, cuda, window
from .cuda import DeviceTensor
from .dtypes import HOST_DTYPES, from_float32, to_float32

__all__ = ["BufferPool", "EngineIO", "PooledTensor", "TrtBackend", "TrtGraph", "make_backend"]

_MIN_CLASS = 4096  # bytes of the smallest size class


class BufferPool:
    """Device buffers by size class (a power of two bytes, at least `_MIN_CLASS`): `take` reuses a free buffer of
    the class or allocates one; `give` puts it back; `tick` (once per step) frees buffers idle for `IDLE_STEPS`
    steps, so the classes a growing cache has left behind do not stay allocated."""

    IDLE_STEPS = 4

    def __init__(self) -> None:
        self._free: dict[int, collections.deque[tuple[int, int]]] = collections.defaultdict(collections.deque)
        self._lock = threading.RLock()  # a tensor may go (and give) while this thread holds it
        self._step = 0

    @staticmethod
    def size_class(nbytes: int) -> int:
        """The bytes of the buffer that holds `nbytes`."""
        return max(_MIN_CLASS, 1 << (nbytes - 1).bit_length())

    def take(self, nbytes: int) -> tuple[int, int]:
        """(device address, size class) of a buffer of at least `nbytes` bytes."""
        size = self.size_class(nbytes)
        with self._lock:
            if self._free[size]:
                return self._free[size].pop()[0], size
        return cuda.wrapper().malloc(size), size

    def give(self, ptr: int, size: int) -> None:
        """Put a buffer back (its tensor went)."""
        with self._lock:
            self._free[size].append((ptr, self._step))

    def tick(self) -> None:
        """One step went by: free the buffers no step has taken for `IDLE_STEPS` steps."""
        with self._lock:
            self._step += 1
            stale = []
            for queue in self._free.values():
                while queue and queue[0][1] <= self._step - self.IDLE_STEPS:
                    stale.append(queue.popleft()[0])
        for ptr in stale:
            cuda.wrapper().free(ptr)

    def __del__(self) -> None:
        try:
            for queue in self._free.values():
                for ptr, _ in queue:
                    cuda.wrapper().free(ptr)
        except Exception:  # interpreter shutdown: the CUDA library may already be gone
            pass


class PooledTensor(DeviceTensor):
    """A `DeviceTensor` whose buffer comes from a `BufferPool` and goes back to it when the tensor goes."""

    def __init__(self, shape: tuple[int, ...], dtype: str, pool: BufferPool) -> None:
        self.shape = tuple(int(d) for d in shape)
        self.dtype = dtype
        self.nbytes = int(np.prod(self.shape)) * HOST_DTYPES.get(dtype, np.dtype(dtype)).itemsize
        self._owned = False  # DeviceTensor's own free never runs: the buffer goes back to the pool
        self._pool: BufferPool | None = None
        if self.nbytes:
            self.ptr, self._size = pool.take(self.nbytes)
            self._pool = pool
        else:
            self.ptr = self._empty_address()

    @classmethod
    def copy_of(cls, array: np.ndarray, dtype: str, pool: BufferPool) -> PooledTensor:
        """A device copy of a host array already in `dtype`'s host layout (bf16: uint16 bits)."""
        host = np.ascontiguousarray(array)
        tensor = cls(host.shape, dtype, pool)
        cuda.copy_bytes(tensor.ptr, host.ctypes.data, tensor.nbytes, "HostToDevice")
        return tensor

    def __del__(self) -> None:
        if getattr(self, "_pool", None) is not None:
            self._pool.give(self.ptr, self._size)
            self._pool = None


class EngineIO:
    """What an engine's sidecar says about its inputs and outputs, and the shapes of one step.

    Args:
        info: the graph's metadata record (from the sidecar).
        profiles: the engine's profiles, in the engine's order.
    """

    def __init__(self, info: GraphInfo, profiles: list[Shapes]) -> None:
        self.info = info
        self.profiles = profiles
        self.frozen = info.graph == C.GRAPH_FROZEN
        self.input_names = C.input_names(info.num_layers, self.frozen)
        self.output_names = C.output_names(info.num_layers, self.frozen)

    def plan(self, shapes: dict[str, tuple[int, ...]]) -> tuple[int, dict[str, tuple[int, ...]]]:
        """(profile index, every output's shape) of a step with these input shapes.

        Raises:
            XLoraError: shapes no profile holds.
        """
        assert all(name in shapes for name in self.input_names), "a step gives every input"
        g, s = shapes[C.INPUT_IDS]
        past = shapes[C.past_names(self.info.num_layers)[0]]
        positions = 1 if self.info.logits == C.LOGITS_LAST else s  # last-position logits, or every position's
        outputs = {C.LOGITS: (g, positions, self.info.vocab_size)}
        if not self.frozen:
            outputs[C.SCALINGS] = (g, s, self.info.n_modules, self.info.n_experts)
        for name in self.output_names[len(outputs):]:
            outputs[name] = (g, past[1], past[2] + s, past[3])
        return select_profile(self.profiles, shapes), outputs


class _Context:
    """One execution context bound to one profile, with its stream and lock."""

    def __init__(self, engine: Any, trt: Any, index: int) -> None:
        strategy = getattr(getattr(trt, "ExecutionContextAllocationStrategy", None), "ON_PROFILE_CHANGE", None)
        self.context = engine.create_execution_context() if strategy is None else \
            engine.create_execution_context(strategy)
        if self.context is None:
            raise XLoraError("TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda.wrapper().create_stream()
        self.lock = threading.Lock()
        if not self.context.set_optimization_profile_async(index, self.stream):
            raise XLoraError(f"TensorRT refused optimization profile {index}")
        cuda.wrapper().stream_synchronize(self.stream)


class TrtGraph(Graph):
    """One deserialized engine (`OUT.engine` or `OUT.frozen.engine`) and its sidecar."""

    def __init__(self, backend: TrtBackend, path: str, info: GraphInfo, profiles: list[Shapes],
                 engine: Any) -> None:
        self.backend = backend
        self.path = path
        self.info = info
        self.io = EngineIO(info, profiles)
        self.engine = engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        expected = self.io.input_names + self.io.output_names
        if sorted(names) != sorted(expected):
            odd = sorted(set(names) ^ set(expected))
            raise XLoraError(f"{path}: the engine's tensors differ from its sidecar's graph ({odd[0]})")
        if engine.num_optimization_profiles != len(profiles):
            raise XLoraError(f"{path}: the engine has {engine.num_optimization_profiles} optimization profiles, its "
                             f"sidecar {len(profiles)}")
        self.dtypes = {name: backend.dtype_name(engine.get_tensor_dtype(name)) for name in names}
        self.host_inputs = {name for name in self.io.input_names if engine.is_shape_inference_io(name)}
        self._contexts: dict[int, _Context] = {}
        self._lock = threading.Lock()

    @property
    def metadata(self) -> str | None:
        return self.info.to_json()

    def _context(self, index: int) -> _Context:
        with self._lock:
            if index not in self._contexts:
                self._contexts[index] = _Context(self.engine, self.backend.trt, index)
            return self._contexts[index]

    def step(self, feeds: dict[str, np.ndarray], pasts: dict[str, DeviceTensor]) -> tuple[dict[str, np.ndarray],
                                                                                           dict[str, DeviceTensor]]:
        self.backend.on_device()
        host_feeds = {name: self._host(name, value) for name, value in feeds.items()}
        shapes = {**{name: value.shape for name, value in host_feeds.items()},
                  **{name: tensor.shape for name, tensor in pasts.items()}}
        index, expected = self.io.plan(shapes)
        slot = self._context(index)
        context = slot.context
        with slot.lock:
            alive: list[Any] = []  # host arrays and device copies of the inputs, until the step has run
            for name, value in host_feeds.items():
                if not context.set_input_shape(name, value.shape):
                    raise XLoraError(f"{self.path}: TensorRT refused shape {value.shape} for input {name}")
                if name in self.host_inputs:
                    alive.append(value)
                    address = value.ctypes.data
                else:
                    alive.append(PooledTensor.copy_of(value, self.dtypes[name], self.backend.pool))
                    address = alive[-1].ptr
                context.set_tensor_address(name, address)
            for name, tensor in pasts.items():
                if not context.set_input_shape(name, tensor.shape):
                    raise XLoraError(f"{self.path}: TensorRT refused shape {tensor.shape} for input {name}")
                context.set_tensor_address(name, tensor.ptr)
            outputs = {}
            for name in self.io.output_names:
                shape = tuple(int(d) for d in context.get_tensor_shape(name))
                if shape != expected[name]:
                    raise XLoraError(f"{self.path}: the engine computes {name} as {shape}, the graph contract "
                                     f"{expected[name]}")
                outputs[name] = PooledTensor(shape, self.dtypes[name], self.backend.pool)
                context.set_tensor_address(name, outputs[name].ptr)
            if not context.execute_async_v3(slot.stream):
                raise XLoraError(f"{self.path}: TensorRT failed to run a step (its log above says why)")
            cuda.wrapper().stream_synchronize(slot.stream)
        del alive
        self.backend.pool.tick()
        host = {name: to_float32(outputs[name].to_host(), self.dtypes[name])
                for name in (C.LOGITS, C.SCALINGS) if name in outputs}
        return host, {name: tensor for name, tensor in outputs.items() if name not in host}

    def _host(self, name: str, value: np.ndarray) -> np.ndarray:
        """A feed in the engine's dtype, contiguous (bf16: its uint16 bits)."""
        dtype = self.dtypes[name]
        if dtype in ("int64", "int32"):
            return np.require(value, dtype, "C")
        return from_float32(value, dtype)


class TrtBackend(Backend):
    """TensorRT on one GPU: engines deserialized by one runtime; caches are `DeviceTensor`s.

    Args:
        trt: the `tensorrt` module (a test may give a stand-in).
    """

    def __init__(self, trt: Any, device: int | None = None) -> None:
        self.provider = "trt-engine"
        self.trt = trt
        self.device = device  # None: the current GPU; else made current before every CUDA call of a step
        self.runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.pool = BufferPool()
        self._dtypes = {getattr(trt.DataType, key): name for key, name in (
            ("FLOAT", "float32"), ("HALF", "float16"), ("BF16", "bfloat16"), ("INT64", "int64"),
            ("INT32", "int32")) if hasattr(trt.DataType, key)}

    def dtype_name(self, dtype: Any) -> str:
        """Our name of a TensorRT data type."""
        if dtype not in self._dtypes:
            raise XLoraError(f"engine tensor of TensorRT type {dtype}: expected one of {sorted(self._dtypes.values())}")
        return self._dtypes[dtype]

    def on_device(self) -> None:
        """Make the backend's GPU current in this thread (CUDA's current device is per thread)."""
        if self.device is not None:
            cuda.set_device(self.device)

    def open(self, path: str) -> TrtGraph:
        info, profiles = read_sidecar(path)
        self.on_device()
        with open(path, "rb") as f:
            engine = self.runtime.deserialize_cuda_engine(f.read())
        if engine is None:
            raise XLoraError(f"{path}: TensorRT cannot load this engine (built by another TensorRT version or for "
                             f"another GPU model?); rebuild it here with xlora-engine")
        return TrtGraph(self, path, info, profiles, engine)

    def empty(self, shape: tuple[int, ...], dtype: str) -> DeviceTensor:
        self.on_device()
        return PooledTensor(shape, dtype, self.pool)

    def gather(self, tensor: DeviceTensor, rows: np.ndarray) -> DeviceTensor:
        self.on_device()
        out = PooledTensor((len(rows), *tensor.shape[1:]), tensor.dtype, self.pool)
        cuda.copy_rows(out.ptr, tensor.ptr, rows, tensor.nbytes // tensor.shape[0] if tensor.shape[0] else 0)
        return out

    def concat(self, tensors: list[DeviceTensor]) -> DeviceTensor:
        self.on_device()
        out = PooledTensor((sum(t.shape[0] for t in tensors), *tensors[0].shape[1:]), tensors[0].dtype, self.pool)
        offset = 0
        for tensor in tensors:
            cuda.copy_bytes(out.ptr + offset, tensor.ptr, tensor.nbytes)
            offset += tensor.nbytes
        return out

    def positions(self, tensor: DeviceTensor, start: int, stop: int) -> DeviceTensor:
        self.on_device()
        return PooledTensor.copy_of(window(tensor.to_host(), start, stop), tensor.dtype, self.pool)

    def nbytes(self, tensor: DeviceTensor) -> int:
        return tensor.nbytes


def make_backend(provider: str, threads: int | None, device: str | int | None, graph_path: str | None
                 ) -> TrtBackend:
    """The TensorRT backend on GPU `device` (default 0).

    Raises:
        XLoraError: tensorrt does not import, no GPU is visible, `device` is not a GPU index.
    """
    try:
        import tensorrt as trt
    except ImportError:
        raise XLoraError('provider \'trt-engine\' needs TensorRT 10 or 11: pip install "xlora-runtime[tensorrt]"'
                         ) from None
    count = cuda.gpu_count()
    if count == 0:
        raise XLoraError("provider 'trt-engine' needs an NVIDIA GPU: the CUDA runtime sees none")
    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or not 0 <= device < count):
        raise XLoraError(f"device={device!r}: expected a GPU index in 0..{count - 1}")
    return TrtBackend(trt, device)
