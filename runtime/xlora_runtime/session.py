"""Loading an exported X-LoRA graph: `GraphInfo` (its metadata record) and `XLoraSession`
(`OUT.onnx` and, on first use, `OUT.frozen.onnx`, opened by a backend: ONNX Runtime, OpenVINO, or the
TensorRT engines `xlora-engine` built from them; see `backends/`).

Everything needed to drive the graph comes from the metadata record and the files beside the
graph (SPEC section 6); nothing here imports torch.

Threads: one `XLoraSession` may serve several threads generating at once. Each backend's step is
thread-safe (ONNX Runtime's `run` is, every step binds its own inputs and outputs), and the lazy opens
(the frozen graph, the tokenizer) and the cache registry are guarded by a lock.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from .backends import ENGINE_SUFFIX, PROVIDERS, Graph, default_provider, open_backend
from .backends.onnxruntime import open_graph
from .errors import XLoraError, brief
from .format import contract as C
from .format.graph_file import read_metadata_props
from .threads import check_threads

__all__ = ["PROVIDERS", "GraphInfo", "XLoraSession", "open_graph"]

_REQUIRED = {"num_layers", "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "n_modules",
             "n_experts", "modules", "adapters", "default_top_k", "caches", "graph"}


@dataclass(frozen=True)
class GraphInfo:
    """What the metadata record says about a graph (see `xlora_export.export._metadata`)."""

    path: str
    record: dict[str, Any]

    @property
    def num_layers(self) -> int:
        return self.record["num_layers"]

    @property
    def kv_heads(self) -> int:
        return self.record["num_key_value_heads"]

    @property
    def head_dim(self) -> int:
        return self.record["head_dim"]

    @property
    def vocab_size(self) -> int:
        return self.record["vocab_size"]

    @property
    def max_positions(self) -> int:
        return self.record["max_position_embeddings"]

    @property
    def attention(self) -> str:
        """How the graph writes attention (`contract.ATTENTIONS`); graphs exported before the field: plain ONNX."""
        return self.record.get("attention", C.ATTENTION_ONNX)

    @property
    def n_modules(self) -> int:
        return self.record["n_modules"]

    @property
    def n_experts(self) -> int:
        return self.record["n_experts"]

    @property
    def expert_names(self) -> list[str]:
        return sorted(self.record["adapters"], key=self.record["adapters"].get)

    @property
    def module_names(self) -> list[str]:
        return sorted(self.record["modules"], key=self.record["modules"].get)

    @property
    def default_top_k(self) -> int:
        return self.record["default_top_k"]

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.record.get("eos_token_id") or [])

    @property
    def pad_token_id(self) -> int:
        pad = self.record.get("pad_token_id")
        return pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else 0)

    @property
    def cache_dtype(self) -> str:
        """The caches' dtype as the record names it: "float32", "float16" or "bfloat16"."""
        return self.record["caches"]["real"]["dtype"]

    def _companion(self, key: str) -> str | None:
        name = (self.record.get("files") or {}).get(key)
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name) if name else None
        return path if path and os.path.isfile(path) else None

    @property
    def frozen_path(self) -> str | None:
        """`OUT.frozen.onnx` when it was exported and is present."""
        return self._companion("frozen")

    @property
    def tokenizer_path(self) -> str | None:
        """`OUT.tokenizer.json` when it travelled with the export."""
        return self._companion("tokenizer")

    @property
    def chat_template_path(self) -> str | None:
        """`OUT.chat_template.jinja` when the checkpoint's tokenizer had a chat template."""
        return self._companion("chat_template")


def _read_info(text: str | None, path: str) -> GraphInfo:
    """The record as the backend read it from the opened graph (None: the graph has none)."""
    if text is None:
        raise XLoraError(f"{path}: not an X-LoRA export (no '{C.METADATA_KEY}' metadata record)")
    try:
        record = json.loads(text)
    except json.JSONDecodeError as e:
        raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record is not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record is not a JSON object")
    if record.get("format_version") != C.FORMAT_VERSION:
        raise XLoraError(f"{path}: metadata format_version {record.get('format_version')!r}; this runtime reads "
                         f"{C.FORMAT_VERSION}")
    missing = sorted(_REQUIRED - set(record))
    if missing:
        raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record lacks {missing}")
    return GraphInfo(path, record)


def _check_before_opening(path: str, provider: str, low_memory: bool) -> None:
    """What the file's metadata record rules out before a backend opens it: a "gqa" graph on a provider that is
    not ONNX Runtime's; low_memory for an int4 graph. (A malformed record is reported once the graph is open.)"""
    props = read_metadata_props(path) or {}
    try:
        record = json.loads(props.get(C.METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        return
    if not isinstance(record, dict):
        return
    attention = record.get("attention", C.ATTENTION_ONNX)
    if attention != C.ATTENTION_ONNX and PROVIDERS.get(provider, ("",))[0] != "onnxruntime":
        raise XLoraError(f"{path}: exported with --attention {attention} (ONNX Runtime's GroupQueryAttention); "
                         f"provider {provider!r} cannot run it: use cpu, cuda or tensorrt (ONNX Runtime), or export "
                         f"with --attention onnx")
    quantization = record.get("quantization")
    if low_memory and isinstance(quantization, dict) and quantization.get("mode") == "int4":
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
            self.info = _read_info(self.main.metadata, path)
            if self.info.record.get("graph") != "two_pass":
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
