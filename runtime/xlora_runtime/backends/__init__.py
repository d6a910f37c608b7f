"""Backends: the engines an exported graph runs on, behind one small seam.

The cache manager (`kv_cache.CacheGroup`) talks to two objects, and to nothing engine-specific:

    Backend   one inference engine on one device. Opens graphs; makes, gathers and concatenates the cache
              tensors, which stay on the backend's device (host copies only where the backend runs on the host).
    Graph     one opened graph file (the main or the frozen graph). `step(feeds, pasts)`: host inputs and the
              device pasts in, host logits/scalings and the device presents out.

    provider     backend                      where the caches live
    cpu          ONNX Runtime, CPU EP         host (OrtValue)
    cuda         ONNX Runtime, CUDA EP        GPU (OrtValue), IO binding
    tensorrt     ONNX Runtime, TensorRT EP    GPU (OrtValue), IO binding, explicit profiles from the metadata
    openvino     OpenVINO (CPU, GPU, NPU)     the device's memory (ov.Tensor), precision hint from the graph
    trt-engine   TensorRT engine (xlora-engine OUT.onnx OUT.engine), polygraphy's CUDA wrapper, no torch

Nothing heavy is imported here: `PROVIDERS` is read by the command-line parsers, the backends' modules are
imported by `open_backend` when a session opens.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from ..errors import XLoraError

if TYPE_CHECKING:
    import numpy as np

__all__ = ["PROVIDERS", "Backend", "Graph", "default_provider", "open_backend"]

# provider -> (module of backends/, what it runs on)
PROVIDERS = {"cpu": ("onnxruntime", "ONNX Runtime, CPU"), "cuda": ("onnxruntime", "ONNX Runtime, CUDA"),
             "tensorrt": ("onnxruntime", "ONNX Runtime, TensorRT execution provider"),
             "openvino": ("openvino", "OpenVINO"), "trt-engine": ("tensorrt", "TensorRT engine")}
ENGINE_SUFFIX = ".engine"
_INSTALL = {"openvino": 'pip install "xlora-runtime[openvino]"',
            "tensorrt": 'pip install "xlora-runtime[tensorrt]" (TensorRT 10 or 11, on a machine with an NVIDIA GPU)'}


class Graph(ABC):
    """One opened graph on a backend."""

    path: str
    # Whether `step` writes the presents into the pasts' buffers (a "gqa" graph on ONNX Runtime's CPU provider):
    # the caches are then buffers of a capacity >= their length (`Backend.resize`), and the presents `step`
    # returns are the pasts themselves.
    in_place: bool = False

    @property
    @abstractmethod
    def metadata(self) -> str | None:
        """The `xlora_export` metadata record (JSON text) as this engine read it; None when there is none."""

    @abstractmethod
    def step(self, feeds: dict[str, np.ndarray], pasts: dict[str, Any]) -> tuple[dict[str, np.ndarray],
                                                                                  dict[str, Any]]:
        """Run the graph once.

        Args:
            feeds: host inputs: input_ids, position_ids (g, s) int64, attention_mask (g, past + s) int64, top_k ()
                int64; the frozen graph's scalings (g, L, n) float32 (cast here to the graph's dtype).
            pasts: every past_* input's device tensor (g, kv_heads, past, head_dim), as made by the backend.
        Returns:
            (host outputs: logits (g, s, vocab) and, main graph, scalings (g, s, L, n), both float32;
             presents: every present_* output's device tensor (g, kv_heads, past + s, head_dim)).
        """


class Backend(ABC):
    """One inference engine on one device: opens graphs and owns the cache tensors' memory."""

    provider: str

    def hold_weights_once(self) -> None:
        """Hold every graph's weights once (low_memory), before any graph is opened.

        Raises:
            XLoraError: this engine keeps no extra copies of the weights to give up.
        """
        raise XLoraError(f"low_memory: provider {self.provider!r} keeps no pre-packed weight copies; "
                         f"it applies to ONNX Runtime's providers (cpu, cuda, tensorrt)")

    @abstractmethod
    def open(self, path: str) -> Graph:
        """Open one graph file.

        Raises:
            XLoraError: the engine cannot load it (one line with the engine's reason).
        """

    @abstractmethod
    def empty(self, shape: tuple[int, ...], dtype: str) -> Any:
        """A cache tensor of `shape` (past length 0) and the graph's cache dtype ("float32", "float16",
        "bfloat16") on the device."""

    @abstractmethod
    def gather(self, tensor: Any, rows: np.ndarray) -> Any:
        """A new tensor of the given rows (axis 0, in order) of a cache tensor."""

    @abstractmethod
    def concat(self, tensors: list[Any]) -> Any:
        """The tensors joined along axis 0 (rows), as a new tensor."""

    @abstractmethod
    def nbytes(self, tensor: Any) -> int:
        """Bytes a cache tensor holds."""

    def resize(self, tensor: Any, length: int, capacity: int) -> Any:
        """A cache buffer of `capacity` positions holding the first `length` positions of `tensor` (the rest zeros),
        for graphs that write in place (`Graph.in_place`)."""
        raise NotImplementedError(f"{type(self).__name__} runs no graph in place")

    @abstractmethod
    def positions(self, tensor: Any, start: int, stop: int) -> Any:
        """Positions [start, stop) (axis 2) of a cache tensor as a new tensor; positions before 0 are zeros, so a
        negative start left-pads. The server lines cache groups up with it (rare events: through the host)."""


def window(array: np.ndarray, start: int, stop: int) -> np.ndarray:
    """`Backend.positions` on a host array (batch, heads, positions, head_dim): a contiguous copy."""
    import numpy as np

    out = array[:, :, max(start, 0):stop]
    if start < 0:
        out = np.pad(out, ((0, 0), (0, 0), (-start, 0), (0, 0)))
    return np.ascontiguousarray(out)


def default_provider(path: str) -> str:
    """`trt-engine` for an `.engine` file, else `cpu`."""
    return "trt-engine" if path.endswith(ENGINE_SUFFIX) else "cpu"


def open_backend(provider: str, threads: int | None = None, device: str | int | None = None,
                 graph_path: str | None = None) -> Backend:
    """The backend of a provider name (its module imported now).

    Args:
        threads: CPU threads of ONNX Runtime's and OpenVINO's CPU devices (None: their default).
        device: OpenVINO's device name (default "CPU"), or the CUDA device index (default 0).
        graph_path: the graph the session opens first: ONNX Runtime's TensorRT provider reads its metadata for
            the explicit optimization profile.
    Raises:
        XLoraError: an unknown provider, or one whose engine is not installed / not available.
    """
    if provider not in PROVIDERS:
        raise XLoraError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider][0]
    try:
        module = importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:  # the engine's own package (openvino, polygraphy) is not installed
        hint = _INSTALL.get(name, f"pip install {e.name}")
        raise XLoraError(f"provider {provider!r} needs the {e.name} package: {hint}") from None
    return module.make_backend(provider, threads, device, graph_path)
