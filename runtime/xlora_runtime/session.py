"""Loading an exported X-LoRA graph: `GraphInfo` (its metadata record) and `XLoraSession`
(the ONNX Runtime sessions of `OUT.onnx` and, on first use, `OUT.frozen.onnx`).

Everything needed to drive the graph comes from the metadata record and the files beside the
graph (SPEC section 6); nothing here imports torch.

Threads: one `XLoraSession` may serve several threads generating at once. ONNX Runtime's `run` is
thread-safe, every step binds its own inputs and outputs, and the lazy opens (the frozen graph, the
tokenizer) and the cache registry are guarded by a lock.
"""

from __future__ import annotations

import json
import os
import threading
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from . import contract as C
from .errors import XLoraError, brief

__all__ = ["PROVIDERS", "GraphInfo", "XLoraSession", "open_graph"]

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_DTYPES = {"float32": np.float32, "float16": np.float16}
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
    def kv_dtype(self) -> type:
        dtype = self.record["caches"]["real"]["dtype"]
        if dtype not in _DTYPES:
            raise XLoraError(f"{self.path}: cache dtype {dtype} cannot be fed from numpy (bf16 needs a GPU runtime)")
        return _DTYPES[dtype]

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


def _read_info(session: ort.InferenceSession, path: str) -> GraphInfo:
    meta = session.get_modelmeta().custom_metadata_map
    if C.METADATA_KEY not in meta:
        raise XLoraError(f"{path}: not an X-LoRA export (no '{C.METADATA_KEY}' metadata record)")
    try:
        record = json.loads(meta[C.METADATA_KEY])
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


def open_graph(path: str, provider: str = "cpu", threads: int | None = None,
               lean: bool = False) -> ort.InferenceSession:
    """One ONNX Runtime session of one graph file, idle threads not spinning (two sessions on a few cores
    must not compete).

    Args:
        lean: run the graph as written: no graph optimizations and no pre-packed weights, so that the session
            holds the weights once (on the CPU, ONNX Runtime otherwise adds packed copies and, for fp16 graphs,
            fp32 copies of every weight; its memory arena would keep a run's temporaries); slower, for one-off
            checks such as the exporter's validation.
    Raises:
        XLoraError: the graph cannot be loaded.
    """
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if lean:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.add_session_config_entry("session.disable_prepacking", "1")
        options.enable_cpu_mem_arena = False  # per-run temporaries (fp16 weights cast to fp32) are freed at once
        options.enable_mem_pattern = False  # and not planned into one block that holds them all
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for unreadable graphs
        reason = str(e).splitlines()[0][:200]
        raise XLoraError(f"{path}: ONNX Runtime cannot load it ({reason})") from None


class XLoraSession:
    """ONNX Runtime sessions for an exported X-LoRA graph.

    Args:
        path: `OUT.onnx` written by `xlora-export`.
        provider: "cpu", "cuda" or "tensorrt" (ONNX Runtime execution providers).
        threads: intra-op threads (None: ONNX Runtime's default). Idle threads never spin, so that the
            main and frozen sessions do not compete for cores.
    Raises:
        XLoraError: missing file, not an ONNX graph, not an X-LoRA export, unavailable provider.
    """

    def __init__(self, path: str, provider: str = "cpu", threads: int | None = None) -> None:
        if not os.path.isfile(path):
            raise XLoraError(f"{path}: no such file (expected an .onnx graph written by xlora-export)")
        if provider not in PROVIDERS:
            raise XLoraError(f"provider {provider!r}: expected one of {', '.join(PROVIDERS)}")
        if PROVIDERS[provider] not in ort.get_available_providers():
            raise XLoraError(f"provider {provider!r}: {PROVIDERS[provider]} is not available in this onnxruntime "
                             f"(available: {', '.join(ort.get_available_providers())})")
        self.provider = provider
        self.device = "cuda" if provider in ("cuda", "tensorrt") else "cpu"
        self.threads = threads
        self.main = self._open(path)
        self.info = _read_info(self.main, path)
        if self.info.record.get("graph") != "two_pass":
            raise XLoraError(f"{path}: this is the frozen-scalings graph; open the main graph (OUT.onnx) instead")
        self._frozen: ort.InferenceSession | None = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()  # the lazy opens and the cache registry
        self._caches: weakref.WeakSet = weakref.WeakSet()  # live `CacheGroup`s of every generation

    def _open(self, path: str) -> ort.InferenceSession:
        return open_graph(path, self.provider, self.threads)

    @property
    def frozen(self) -> ort.InferenceSession:
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
