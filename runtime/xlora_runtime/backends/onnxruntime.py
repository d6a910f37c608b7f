"""ONNX Runtime: the CPU, CUDA and TensorRT execution providers, with IO binding.

Each step binds the host inputs, the pasts (OrtValues on the provider's device) and the presents to device
memory that ONNX Runtime allocates; the presents are the next step's pasts as they are. logits and scalings are
bound to host memory (one copy, no per-step work that grows with the sequence).

Rows gathered or joined (a finished row, a row moving to the frozen graph) go through the host on the CPU; on a
GPU, they are device-to-device copies of whole rows (`backends/cuda.py`), so bf16 caches, which numpy cannot
hold, never leave the device.

The TensorRT execution provider is given an explicit profile holding the engine builder's prefill and decode
profiles (`profiles.wide_profile`, from the graph's metadata and the default limits of `profiles.limits_for`):
without one it rebuilds its engine whenever a shape leaves the range it has seen. Its engines and timing cache
are kept beside the graph (`OUT.onnx.trt/`). Other ranges: build an engine with `xlora-engine` and its limits.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

import numpy as np
import onnxruntime as ort

from ..errors import XLoraError
from ..format import contract as C
from ..format.graph_file import external_tensors
from ..format.record import GraphInfo, peek
from ..profiles import limits_for, ort_tensorrt_options, wide_profile
from ..threads import check_threads
from . import Backend, Graph, window
from .dtypes import HOST_DTYPES, from_float32, to_float32

__all__ = ["OrtBackend", "OrtGraph", "check_provider", "make_backend", "open_graph", "provider_options"]

EXECUTION_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider",
                       "tensorrt": "TensorrtExecutionProvider"}
_ONNX_TYPES = {"float32": 1, "float16": 10, "bfloat16": 16}  # TensorProto.DataType
_TYPE_NAMES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16"}
# TensorProto.DataType -> the numpy dtype holding its bytes (bfloat16: uint16 bits)
_ELEMENT_DTYPES = {1: np.float32, 2: np.uint8, 3: np.int8, 4: np.uint16, 5: np.int16, 6: np.int32, 7: np.int64,
                   9: np.bool_, 10: np.float16, 11: np.float64, 12: np.uint32, 13: np.uint64, 16: np.uint16}


def provider_options(provider: str, graph_path: str | None, device_id: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """The `providers` list for `ort.InferenceSession`: the provider with its options, then the fallbacks.

    tensorrt: the TensorRT EP with explicit min/opt/max shapes of every dynamic input (the graph's metadata and
    its `tensorrt_profile` hints; none when the graph has no record), an engine and timing cache in
    `<graph>.trt/`, then CUDA, then CPU. cuda: CUDA then CPU. cpu: CPU.
    """
    if provider == "cpu":
        return [("CPUExecutionProvider", {})]
    cuda = ("CUDAExecutionProvider", {"device_id": device_id})
    if provider == "cuda":
        return [cuda, ("CPUExecutionProvider", {})]
    options: dict[str, Any] = {"device_id": device_id}
    info = _info(graph_path) if graph_path else None
    if info is not None:
        options.update(ort_tensorrt_options(wide_profile(info, limits_for(info))))
        cache = os.path.abspath(graph_path) + ".trt"
        options.update(trt_engine_cache_enable=True, trt_engine_cache_path=cache, trt_timing_cache_enable=True,
                       trt_timing_cache_path=cache)
    return [("TensorrtExecutionProvider", options), cuda, ("CPUExecutionProvider", {})]


def _info(path: str) -> GraphInfo | None:
    """The graph's metadata record read from the file (None when it does not read: the session reports why once
    the graph is open)."""
    try:
        return GraphInfo.read(path)
    except XLoraError:
        return None


def open_graph(path: str, provider: str = "cpu", threads: int | None = None, lean: bool = False,
               providers: list | None = None, prepack: bool = True,
               initializers: dict[str, ort.OrtValue] | None = None) -> ort.InferenceSession:
    """One ONNX Runtime session of one graph file. Its threads spin while a run lasts (a decode step is hundreds
    of small ops: waking sleeping threads for each cost a third of the step) and stop spinning when it ends
    (`session.force_spinning_stop`), so that the main and frozen graphs alternating on a few cores, or other
    processes, do not compete with idle spinners.

    Args:
        providers: the execution providers with their options (`backends.onnxruntime.provider_options`);
            default: `provider`'s, then the CPU's.
        prepack: let the CPU kernels keep pre-packed copies of the weights (faster; False: the kernels read the
            weights where they are).
        initializers: OrtValues that replace the graph's initializers of those names (`SharedWeights`): ONNX
            Runtime reads them where they are, without a copy, so that sessions given the same values hold the
            weights once. Use with prepack=False (packing would copy them again).
        lean: run the graph as written: no graph optimizations and no pre-packed weights, so that the session
            holds the weights once (on the CPU, ONNX Runtime otherwise adds packed copies and, for fp16 graphs,
            fp32 copies of every weight; its memory arena would keep a run's temporaries); slower, for one-off
            checks such as the exporter's validation.
    Raises:
        XLoraError: the graph cannot be loaded; threads outside 1..`threads.thread_limit()`.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = check_threads(threads)
    options.add_session_config_entry("session.intra_op.allow_spinning", "1")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False  # per-run temporaries (fp16 weights cast to fp32) are freed at once
        options.enable_mem_pattern = False  # and not planned into one block that holds them all
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED  # a tensor's producer runs close to its use
    for name, value in (initializers or {}).items():
        options.add_initializer(name, value)
    if providers is None:
        providers = provider_options(provider, None)
    try:  # no fallback: a provider that fails to load is an error, never a quiet run on the next one
        session = ort.InferenceSession(path, options, providers=providers, enable_fallback=0)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        reason = str(e).splitlines()[0][:200]
        raise XLoraError(f"{path}: ONNX Runtime cannot load it ({reason})") from None
    check_provider(session, providers, path)
    return session


def check_provider(session: ort.InferenceSession, providers: list, path: str) -> None:
    """Raise unless the session got the execution provider asked for first: ONNX Runtime skips a provider whose
    libraries do not load (TensorRT's, CUDA's) with a warning, and the next one in the list runs the graph.

    Raises:
        XLoraError: naming the provider asked for and the one the session got.
    """
    wanted = providers[0][0] if isinstance(providers[0], (tuple, list)) else providers[0]
    got = session.get_providers()
    if not got or got[0] != wanted:
        raise XLoraError(f"{path}: the session runs on {got[0] if got else 'no provider'}, not {wanted} as asked: "
                         f"ONNX Runtime could not load {wanted} (its warning above says why)")


class OrtGraph(Graph):
    """One `ort.InferenceSession` (`.session`) run with IO binding."""

    def __init__(self, backend: OrtBackend, path: str, session: ort.InferenceSession) -> None:
        self.backend = backend
        self.path = path
        self.session = session
        self.input_types = {i.name: _TYPE_NAMES.get(i.type) for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.output_types = {o.name: _TYPE_NAMES.get(o.type) for o in session.get_outputs()}
        # GroupQueryAttention writes the new positions into a past buffer bound as its present too (on the CPU:
        # the CacheGroup's buffers are host OrtValues; other devices keep the contract's concat). The session reports
        # a malformed record; a graph without one (a benchmark's plain base graph) may still say its attention.
        self.in_place = peek(self.metadata)["attention"] == C.ATTENTION_GQA and backend.device == "cpu"
        pasts = [n for n in self.input_types if n.startswith(("past_key_values.", "scaling_past_key_values."))]
        self.present_of = {C.present_name(past): past for past in pasts}  # present output -> its past input

    @property
    def metadata(self) -> str | None:
        return self.session.get_modelmeta().custom_metadata_map.get(C.METADATA_KEY)

    def step(self, feeds: dict[str, np.ndarray], pasts: dict[str, Any]) -> tuple[dict[str, np.ndarray],
                                                                                  dict[str, Any]]:
        binding = self.session.io_binding()
        for name, value in feeds.items():
            dtype = self.input_types.get(name)
            if dtype is None:  # int64 ids, mask, positions, top_k
                binding.bind_cpu_input(name, np.require(value, np.int64, "C"))
            else:  # the frozen graph's scalings, in the graph's float type
                binding.bind_ortvalue_input(name, self.backend.host_value(from_float32(value, dtype), dtype))
        for name, value in pasts.items():
            binding.bind_ortvalue_input(name, value)
        host = [name for name in (C.LOGITS, C.SCALINGS) if name in self.output_names]
        for name in self.output_names:
            if name in host:
                binding.bind_output(name, "cpu")
            elif self.in_place:
                binding.bind_ortvalue_output(name, pasts[self.present_of[name]])
            else:
                binding.bind_output(name, self.backend.device, self.backend.device_id)
        self.session.run_with_iobinding(binding)
        outputs = dict(zip(self.output_names, binding.get_outputs()))
        if self.in_place:  # the same buffers (get_outputs wraps them anew)
            return ({name: to_float32(_host_array(outputs[name]), self.output_types[name]) for name in host},
                    {name: pasts[self.present_of[name]] for name in outputs if name not in host})
        return ({name: to_float32(_host_array(outputs[name]), self.output_types[name]) for name in host},
                {name: value for name, value in outputs.items() if name not in host})


def _host_array(value: ort.OrtValue) -> np.ndarray:
    """A host OrtValue as numpy (bf16: its uint16 bits, copied out through the data pointer)."""
    if value.data_type() != "tensor(bfloat16)":
        return value.numpy()
    count = int(np.prod(value.shape()))
    buffer = (ctypes.c_uint16 * count).from_address(value.data_ptr())
    return np.frombuffer(buffer, dtype=np.uint16, count=count).reshape(value.shape()).copy()


class SharedWeights:
    """The weights of graphs that share external-data files, mapped once per file and handed to every session as
    OrtValues over that one mapping (`open_graph`'s initializers).

    Each ONNX Runtime session maps the external-data files itself: two sessions (main and frozen graph) of one
    `OUT.onnx.data` map it twice, which the resident set counts twice, and pre-packing adds a copy per session.
    Here a file is mapped once (read-only, `np.memmap`) and a tensor of the same file, offset and length is one
    OrtValue whichever graph asks for it.
    """

    def __init__(self) -> None:
        self._files: dict[str, np.memmap] = {}
        self._values: dict[tuple[str, int, int], ort.OrtValue] = {}

    def initializers(self, graph_path: str) -> dict[str, ort.OrtValue]:
        """name -> OrtValue of every initializer of the graph kept in an external-data file.

        Raises:
            XLoraError: the graph or one of its data files cannot be read, or a tensor lies outside its file.
        """
        folder = os.path.dirname(os.path.abspath(graph_path))
        try:
            tensors = external_tensors(graph_path)
        except (OSError, ValueError) as e:
            raise XLoraError(f"{graph_path}: cannot read its table of external weights ({e})") from None
        values = {}
        for t in tensors:
            file = os.path.join(folder, t.location)
            key = (file, t.offset, t.length)
            if key not in self._values:
                self._values[key] = self._value(file, t)
            values[t.name] = self._values[key]
        return values

    def _value(self, file: str, tensor: Any) -> ort.OrtValue:
        if file not in self._files:
            try:
                self._files[file] = np.memmap(file, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise XLoraError(f"{file}: cannot map the graph's weights ({e})") from None
        data = self._files[file]
        if tensor.data_type not in _ELEMENT_DTYPES:
            raise XLoraError(f"{file}: weight {tensor.name!r} has element type {tensor.data_type}, which low_memory "
                             f"cannot map (open the graph without low_memory)")
        dtype = np.dtype(_ELEMENT_DTYPES[tensor.data_type])
        count = int(np.prod(tensor.shape, dtype=np.int64))
        if count * dtype.itemsize != tensor.length or tensor.offset + tensor.length > len(data):
            raise XLoraError(f"{file}: weight {tensor.name!r} (type {tensor.data_type}, shape {list(tensor.shape)}, "
                             f"bytes {tensor.offset}..{tensor.offset + tensor.length}) does not fit the file "
                             f"({len(data)} bytes)")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=tensor.offset).reshape(tensor.shape)
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, tensor.data_type)


class OrtBackend(Backend):
    """ONNX Runtime with one execution provider; cache tensors are OrtValues on its device."""

    def __init__(self, provider: str, threads: int | None, device_id: int, graph_path: str | None) -> None:
        self.provider = provider
        self.threads = threads
        self.device = "cpu" if provider == "cpu" else "cuda"
        self.device_id = device_id
        self.providers = provider_options(provider, graph_path, device_id)
        self.prepack = True
        self.shared: SharedWeights | None = None  # low_memory on the CPU: the weights mapped once, for every graph

    def hold_weights_once(self) -> None:
        """No pre-packed copies; on the CPU, every graph opened from now on reads its weights from one mapping
        of each external-data file (`SharedWeights`), whichever graph opened it first."""
        self.prepack = False
        if self.device == "cpu":
            self.shared = SharedWeights()

    def open(self, path: str) -> OrtGraph:
        initializers = self.shared.initializers(path) if self.shared is not None else None
        return OrtGraph(self, path, open_graph(path, self.provider, self.threads, providers=self.providers,
                                               prepack=self.prepack, initializers=initializers))

    def host_value(self, array: np.ndarray, dtype: str) -> ort.OrtValue:
        """An OrtValue of host memory holding `array` (bf16: its uint16 bits) as the graph dtype."""
        if dtype == "bfloat16":
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array, _ONNX_TYPES[dtype])
        return ort.OrtValue.ortvalue_from_numpy(array)

    def _device_value(self, shape: tuple[int, ...], dtype: str) -> ort.OrtValue:
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), _ONNX_TYPES[dtype], self.device,
                                                         self.device_id)

    def empty(self, shape: tuple[int, ...], dtype: str) -> ort.OrtValue:
        if self.device == "cpu":
            return self.host_value(np.zeros(shape, HOST_DTYPES[dtype]), dtype)
        return self._device_value(shape, dtype)

    def gather(self, tensor: ort.OrtValue, rows: np.ndarray) -> ort.OrtValue:
        if self.device == "cpu":
            return self._from_host(_host_array(tensor)[rows], tensor)
        from .cuda import copy_rows

        shape = (len(rows), *tensor.shape()[1:])
        out = self._device_value(shape, _TYPE_NAMES[tensor.data_type()])
        copy_rows(out.data_ptr(), tensor.data_ptr(), rows, _row_bytes(tensor))
        return out

    def concat(self, tensors: list[ort.OrtValue]) -> ort.OrtValue:
        if self.device == "cpu":
            return self._from_host(np.concatenate([_host_array(t) for t in tensors]), tensors[0])
        from .cuda import copy_bytes

        shape = (sum(t.shape()[0] for t in tensors), *tensors[0].shape()[1:])
        out = self._device_value(shape, _TYPE_NAMES[tensors[0].data_type()])
        offset = 0
        for t in tensors:
            copy_bytes(out.data_ptr() + offset, t.data_ptr(), self.nbytes(t))
            offset += self.nbytes(t)
        return out

    def positions(self, tensor: ort.OrtValue, start: int, stop: int) -> ort.OrtValue:
        if self.device == "cpu":
            return self._from_host(window(_host_array(tensor), start, stop), tensor)
        from .cuda import copy_bytes

        dtype = _TYPE_NAMES[tensor.data_type()]
        host = np.empty(tensor.shape(), HOST_DTYPES[dtype])
        copy_bytes(host.ctypes.data, tensor.data_ptr(), host.nbytes, "DeviceToHost")
        host = window(host, start, stop)
        out = self._device_value(host.shape, dtype)
        copy_bytes(out.data_ptr(), host.ctypes.data, host.nbytes, "HostToDevice")
        return out

    def resize(self, tensor: ort.OrtValue, length: int, capacity: int) -> ort.OrtValue:
        if self.device != "cpu":
            return super().resize(tensor, length, capacity)
        host = _host_array(tensor)
        out = np.zeros((*host.shape[:2], capacity, *host.shape[3:]), host.dtype)
        out[:, :, :length] = host[:, :, :length]
        return self._from_host(out, tensor)

    def _from_host(self, array: np.ndarray, like: ort.OrtValue) -> ort.OrtValue:
        return self.host_value(np.ascontiguousarray(array), _TYPE_NAMES[like.data_type()])

    def nbytes(self, tensor: ort.OrtValue) -> int:
        return int(np.prod(tensor.shape())) * HOST_DTYPES[_TYPE_NAMES[tensor.data_type()]].itemsize


def _row_bytes(tensor: ort.OrtValue) -> int:
    """Bytes of one row (axis 0) of a cache tensor: rows are contiguous in its row-major layout."""
    return int(np.prod(tensor.shape()[1:])) * HOST_DTYPES[_TYPE_NAMES[tensor.data_type()]].itemsize


def make_backend(provider: str, threads: int | None, device: str | int | None, graph_path: str | None) -> OrtBackend:
    """The ONNX Runtime backend of `provider` ("cpu", "cuda", "tensorrt").

    Raises:
        XLoraError: the execution provider is not in this onnxruntime build, or `device` is not a GPU index.
    """
    if EXECUTION_PROVIDERS[provider] not in ort.get_available_providers():
        raise XLoraError(f"provider {provider!r}: {EXECUTION_PROVIDERS[provider]} is not available in this "
                         f"onnxruntime (available: {', '.join(ort.get_available_providers())})")
    if device is not None and (provider == "cpu" or isinstance(device, bool) or not isinstance(device, int)
                               or device < 0):
        raise XLoraError(f"device={device!r}: provider {provider!r} takes "
                         f"{'no device' if provider == 'cpu' else 'a CUDA device index >= 0'}")
    return OrtBackend(provider, threads, device or 0, graph_path)
