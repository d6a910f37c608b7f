"""Loading an exported X-LoRA graph: `XLoraSession` (`OUT.onnx` and, on first use, `OUT.frozen.onnx`, opened by a
backend: ONNX Runtime, OpenVINO, or the TensorRT engines `xlora-engine` built from them; see `backends/`).

Everything needed to drive the graph comes from its metadata record (`info`, a `format.record.GraphInfo`) and
the files beside the graph; nothing here imports torch.

Threads: one `XLoraSession` may serve several threads generating at once. Each backend's step is
thread-safe (ONNX Runtime's `run` is, every step binds its own inputs and outputs), and the lazy opens
(the frozen graph, the tokenizer) and the cache registry are guarded by a lock.
"""

from __future__ import annotations

import os
import threading
import weakref
from typing import Any

import numpy as np

from .backends import ENGINE_SUFFIX, PROVIDERS, Graph, default_provider, open_backend
from .backends.onnxruntime import open_graph
from .errors import XLoraError, brief
from .format import contract as C
from .format.record import GraphInfo, peek_file
from .threads import check_threads

__all__ = ["PROVIDERS", "XLoraSession", "open_graph"]


def _check_before_opening(path: str, provider: str, low_memory: bool) -> None:
    """What the file's metadata record rules out before a backend opens it: a "gqa" graph on a provider that is
    not ONNX Runtime's; low_memory for an int4 graph. (A malformed record is reported once the graph is open.)"""
    fields = peek_file(path)
    attention, quantization = fields["attention"], fields["quantization"]
    if attention != C.ATTENTION_ONNX and PROVIDERS.get(provider, ("",))[0] != "onnxruntime":
        raise XLoraError(f"{path}: exported with --attention {attention} (ONNX Runtime's GroupQueryAttention); "
                         f"provider {provider!r} cannot run it: use cpu, cuda or tensorrt (ONNX Runtime), or export "
                         f"with --attention onnx")
    if low_memory and quantization is not None and quantization.mode == "int4":
        raise XLoraError(f"{path}: low_memory does not apply to int4 graphs: ONNX Runtime's MatMulNBits needs its "
                         f"pre-packed weights (without them a decode step is about 18x slower); open it without "
                         f"low_memory (its weights are already about a quarter of the float graph's)")


class XLoraSession:
    """An exported X-LoRA graph opened by one backend (the same calls and results on every one).

    Args:
        path: `OUT.onnx` written by `xlora-export`, or `OUT.engine` written by `xlora-engine`.
        provider: "cpu", "cuda", "tensorrt" (ONNX Runtime execution providers), "openvino", or "trt-engine"
            (a TensorRT engine); default "trt-engine" for an `.engine` file, else "cpu". See `backends/`.
        threads: CPU threads (ONNX Runtime's intra-op threads, OpenVINO's inference threads; None: their
            default), 1 to twice the CPUs this process may run on (`threads.thread_limit()`). ONNX Runtime's
            threads spin only while a step runs, so that the main and frozen sessions do not compete.
        device: OpenVINO's device ("CPU", "GPU", "NPU", "AUTO"; default "CPU"), or the CUDA device index of the
            GPU providers (default 0).
        low_memory: ONNX Runtime without pre-packed weight copies; on the CPU both graphs' sessions are handed the
            weights from one memory map of `OUT.onnx.data` (`backends.onnxruntime.SharedWeights`), held once:
            peak RSS 0.99x weights + caches at 1.1B (1.94x by default), and loading in seconds; decode about
            15% slower, prefill about 25% (the kernels pack the weights as they go). Not for int4 graphs:
            ONNX Runtime's MatMulNBits without its packed weights decodes about 18x slower.
    Raises:
        XLoraError: missing file, not a graph the backend can load, not an X-LoRA export, unavailable provider,
            threads outside 1..`threads.thread_limit()`. A graph opened before the error is released at once.
    """

    def __init__(self, path: str, provider: str | None = None, threads: int | None = None,
                 device: str | int | None = None, low_memory: bool = False) -> None:
        threads = check_threads(threads)
        if not os.path.isfile(path):
            raise XLoraError(f"{path}: no such file (expected an .onnx graph written by xlora-export)")
        provider = default_provider(path) if provider is None else provider
        if not path.endswith(ENGINE_SUFFIX):
            _check_before_opening(path, provider, low_memory)
        self.backend = open_backend(provider, threads, device, graph_path=path)
        if low_memory:
            self.backend.hold_weights_once()
        self.provider = self.backend.provider
        self.threads = threads
        self.main = self._open(path)
        try:
            self.info = GraphInfo.parse(self.main.metadata, path)
            if self.info.graph != C.GRAPH_TWO_PASS:
                raise XLoraError(f"{path}: this is the frozen-scalings graph; open the main graph (OUT.onnx) "
                                 f"instead")
        except BaseException:
            del self.main  # its threads and memory go now, not when the traceback that holds `self` does
            raise
        self._frozen: Graph | None = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # the lazy opens and the cache registry
        self._caches: weakref.WeakSet = weakref.WeakSet()  # live `CacheGroup`s of every generation

    def _open(self, path: str) -> Graph:
        return self.backend.open(path)

    @property
    def frozen(self) -> Graph:
        """The frozen-scalings session (opened on first use, once, whichever thread asks first)."""
        if self._frozen is None:
            with self._lock:
                if self._frozen is None:
                    path = self.info.frozen_path
                    if path is None:
                        raise XLoraError(f"{self.info.path}: frozen scalings need OUT.frozen.onnx beside the graph "
                                         f"(export with --frozen-scalings)")
                    self._frozen = self._open(path)
        return self._frozen

    @property
    def tokenizer(self) -> Any:
        """The `tokenizers.Tokenizer` that travelled with the export (None when there is none)."""
        if self._tokenizer is None and self.info.tokenizer_path:
            with self._lock:
                if self._tokenizer is None:
                    from tokenizers import Tokenizer

                    self._tokenizer = Tokenizer.from_file(self.info.tokenizer_path)
        return self._tokenizer

    def track_cache(self, group: Any) -> None:
        """Register a `CacheGroup` (weakly) so that `cache_bytes` counts it while it lives."""
        with self._lock:
            self._caches.add(group)

    @property
    def cache_bytes(self) -> int:
        """Bytes of KV cache held now by the generations running on this session (every thread): 0 when
        none runs, and again 0 after a generation finished, was closed early or failed."""
        with self._lock:
            groups = list(self._caches)
        return sum(g.nbytes() for g in groups)

    def check_top_k(self, top_k: int) -> int:
        """`top_k` as the graph takes it: an int in 0..n (0 = dense)."""
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or not 0 <= top_k <= self.info.n_experts:
            raise XLoraError(f"expert_top_k={brief(top_k)}: expected an int in 0..{self.info.n_experts} (0 = dense)")
        return int(top_k)

    def check_ids(self, ids: list[int], what: str = "prompt") -> list[int]:
        """Validate one sequence of token ids against the vocabulary and the positions."""
        if len(ids) == 0:
            raise XLoraError(f"{what} is empty")
        not_ints = [i for i in ids if isinstance(i, bool) or not isinstance(i, (int, np.integer))]
        if not_ints:
            raise XLoraError(f"{what}: {brief(not_ints[0])} is not a token id (expected ints)")
        bad = [i for i in ids if not 0 <= i < self.info.vocab_size]
        if bad:
            raise XLoraError(f"{what}: token id {brief(bad[0])} is outside the vocabulary "
                             f"0..{self.info.vocab_size - 1}")
        if len(ids) > self.info.max_positions:
            raise XLoraError(f"{what} has {len(ids)} tokens; the model has {self.info.max_positions} positions")
        return [int(i) for i in ids]
