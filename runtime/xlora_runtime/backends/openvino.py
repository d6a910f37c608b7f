"""OpenVINO: the exported ONNX graph on Intel CPUs, GPUs and NPUs (edge devices), no conversion step.

OpenVINO reads `OUT.onnx` directly (the metadata record arrives in the model's rt_info under
`framework/xlora_export`) and compiles it for a device. The precision is set from the graph's dtype through
`INFERENCE_PRECISION_HINT`, never left to the device's default: on a CPU with bf16 units OpenVINO would otherwise
run an fp32 graph in bf16 (logits off by about 1e-2 on the tiny models; with the hint, within 1e-6 of ONNX
Runtime). fp32 graphs run in f32 everywhere; fp16 and bf16 graphs run in their own precision where the device has
it (GPU, NPU, a CPU that lists it in OPTIMIZATION_CAPABILITIES) and in f32 otherwise.

Each step runs a fresh infer request whose outputs are tensors this backend allocates (shapes from the inputs:
the contract fixes them), so a step's presents stay valid as the next step's pasts however OpenVINO reuses its
own buffers; pasts are passed as they are (no copy). Rows are gathered on the host: OpenVINO's CPU tensors are
host memory, and freezing or finishing a row is rare.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import openvino as ov

from ..errors import XLoraError
from ..format import contract as C
from ..format.record import peek
from . import Backend, Graph, window
from .dtypes import from_float32, to_float32

__all__ = ["OpenVinoBackend", "OpenVinoGraph", "make_backend", "precision_hint"]

_GRAPH_DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}  # OpenVINO type name -> graph dtype
_HINTS = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_CAPABILITIES = {"f16": "FP16", "bf16": "BF16"}  # OPTIMIZATION_CAPABILITIES names
_OV_TYPES = {"float32": ov.Type.f32, "float16": ov.Type.f16, "bfloat16": ov.Type.bf16}


def precision_hint(graph_dtype: str, capabilities: list[str]) -> str:
    """INFERENCE_PRECISION_HINT for a graph of `graph_dtype` ("float32", "float16", "bfloat16") on a device with
    these OPTIMIZATION_CAPABILITIES: the graph's own precision where the device lists it, f32 otherwise."""
    hint = _HINTS[graph_dtype]
    return hint if hint == "f32" or _CAPABILITIES[hint] in capabilities else "f32"


class OpenVinoGraph(Graph):
    """One compiled model. `step` creates its infer request, so threads may share the graph."""

    def __init__(self, path: str, model: Any, compiled: Any) -> None:
        self.path = path
        self.model = model
        self.compiled = compiled
        self.output_names = [o.get_any_name() for o in model.outputs]
        self.types = {p.get_any_name(): p.get_element_type() for p in [*model.inputs, *model.outputs]}
        # a last-position graph's logits are (g, 1, vocab); OpenVINO reads that axis as a bounded interval
        self.last_logits = peek(self.metadata)["logits"] == C.LOGITS_LAST  # the session reports a malformed record

    @property
    def metadata(self) -> str | None:
        key = ["framework", C.METADATA_KEY]
        return self.model.get_rt_info(key).astype(str) if self.model.has_rt_info(key) else None

    def _dtype(self, name: str) -> str | None:
        return _GRAPH_DTYPES.get(self.types[name].get_type_name())

    def _output_shapes(self, feeds: dict[str, np.ndarray], pasts: dict[str, Any]) -> dict[str, tuple[int, ...]]:
        """Every output's shape, from the contract: (g, s, vocab), (g, s, L, n), presents (g, kv, past + s, hd)."""
        g, s = feeds[C.INPUT_IDS].shape
        some_past = next(iter(pasts.values())).get_shape()
        shapes = {}
        for name in self.output_names:
            static = [d.get_length() if d.is_static else None for d in self.model.output(name).get_partial_shape()]
            if name in (C.LOGITS, C.SCALINGS):
                shapes[name] = (g, 1 if name == C.LOGITS and self.last_logits else s, *static[2:])
            else:
                shapes[name] = (g, some_past[1], some_past[2] + s, some_past[3])
        return shapes

    def step(self, feeds: dict[str, np.ndarray], pasts: dict[str, Any]) -> tuple[dict[str, np.ndarray],
                                                                                  dict[str, Any]]:
        request = self.compiled.create_infer_request()
        for name, value in feeds.items():
            dtype = self._dtype(name)
            array = np.require(value, np.int64, "C") if dtype is None else from_float32(value, dtype)
            request.set_tensor(name, _tensor(array, self.types[name]))
        for name, tensor in pasts.items():
            request.set_tensor(name, tensor)
        outputs = {name: ov.Tensor(self.types[name], list(shape))
                   for name, shape in self._output_shapes(feeds, pasts).items()}
        for name, tensor in outputs.items():
            request.set_tensor(name, tensor)
        request.infer()
        host = {name: to_float32(_host_array(outputs[name]), self._dtype(name))
                for name in (C.LOGITS, C.SCALINGS) if name in outputs}
        return host, {name: t for name, t in outputs.items() if name not in host}


def _tensor(array: np.ndarray, element_type: ov.Type) -> ov.Tensor:
    """A new tensor (its own memory) holding a host array (bf16: the array holds the uint16 bits)."""
    tensor = ov.Tensor(element_type, list(array.shape))
    if array.size:
        _host_array(tensor)[...] = array
    return tensor


def _host_array(tensor: ov.Tensor) -> np.ndarray:
    """A view of a tensor's values as numpy (bf16: its uint16 bits)."""
    data = tensor.data
    return data.view(np.uint16) if tensor.get_element_type() == ov.Type.bf16 else data


class OpenVinoBackend(Backend):
    """OpenVINO on one device; cache tensors are ov.Tensors."""

    def __init__(self, device: str, threads: int | None) -> None:
        self.provider = "openvino"
        self.device = device
        self.threads = threads
        self.core = ov.Core()
        self.capabilities = list(self.core.get_property(device, "OPTIMIZATION_CAPABILITIES"))

    def open(self, path: str) -> OpenVinoGraph:
        try:  # OpenVINO raises RuntimeError subclasses with multi-line reasons
            model = self.core.read_model(path)
            logits = [o for o in model.outputs if o.get_any_name() == C.LOGITS]
            graph_dtype = _GRAPH_DTYPES.get(logits[0].get_element_type().get_type_name(), "float32") if logits \
                else "float32"
            config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": precision_hint(graph_dtype, self.capabilities)}
            if self.threads is not None:
                config["INFERENCE_NUM_THREADS"] = self.threads
            compiled = self.core.compile_model(model, self.device, config)
        except Exception as e:
            raise XLoraError(f"{path}: OpenVINO cannot load it on {self.device} ({_first_line(e)})") from None
        return OpenVinoGraph(path, model, compiled)

    def empty(self, shape: tuple[int, ...], dtype: str) -> ov.Tensor:
        return ov.Tensor(_OV_TYPES[dtype], list(shape))

    def gather(self, tensor: ov.Tensor, rows: np.ndarray) -> ov.Tensor:
        return _tensor(_host_array(tensor)[rows], tensor.get_element_type())

    def concat(self, tensors: list[ov.Tensor]) -> ov.Tensor:
        return _tensor(np.concatenate([_host_array(t) for t in tensors]), tensors[0].get_element_type())

    def positions(self, tensor: ov.Tensor, start: int, stop: int) -> ov.Tensor:
        return _tensor(window(_host_array(tensor), start, stop), tensor.get_element_type())

    def nbytes(self, tensor: ov.Tensor) -> int:
        return int(tensor.get_byte_size())


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:200]


def make_backend(provider: str, threads: int | None, device: str | int | None, graph_path: str | None
                 ) -> OpenVinoBackend:
    """The OpenVINO backend on `device` ("CPU" by default; "GPU", "NPU", "AUTO", ...).

    Raises:
        XLoraError: the device is not one OpenVINO sees.
    """
    device = "CPU" if device is None else device
    available = ov.Core().available_devices
    if not isinstance(device, str) or device.split(".")[0].split(":")[0] not in {*available, "AUTO", "HETERO",
                                                                                 "MULTI"}:
        raise XLoraError(f"device={device!r}: OpenVINO sees {', '.join(available)} (or AUTO)")
    return OpenVinoBackend(device, threads)
