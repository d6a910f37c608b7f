"""Quantized graphs for edge devices: `xlora-export MODEL_DIR OUT.onnx --quantize int8|int4`.

The float export is traced, staged and validated against the eager model as usual; then the MatMuls of the
base model's projections (the decoder blocks' Linear weights, found by their initializer names) are
quantized in both graphs, and the quantized graphs are measured against the float ones, which they replace:

    staged float graphs: OUT.onnx (+ OUT.frozen.onnx, OUT.onnx.data)       moved aside into float/
      -> per graph, the MatMuls reading `model.model.layers.<i>.<...>.weight[.T]`:
           int8: onnxruntime.quantization.quantize_dynamic   int8 weights (per column), activations quantized
                 per call (MatMulInteger; ONNX Runtime fuses it into DynamicQuantizeMatMul)
           int4: int4.quantize_int4                          weight-only, blockwise along K, com.microsoft
                 (ONNX Runtime's MatMulNBitsQuantizer's result,   MatMulNBits (accuracy level 4: int8 compute);
                 one weight at a time from the external data)     fp32 or fp16 graphs
         lm_head too in int4 (int8: with --quantize-lm-head); in int4 the LoRA A/B and classifier MatMuls in 8 bits
         (MatMulNBits bits 8, same blocks; --no-quantize-lora: float), in int8 float
      -> the weights written through one WeightStore: main and frozen graph share OUT.onnx.data again
      -> agreement with the float graphs (`measure_agreement`), float/ removed, renamed into place by export

Agreement, the float graph as the reference: prompts (text through the exported tokenizer, else random ids),
left padded, a prefill and decode steps teacher-forced with the float graph's greedy tokens; the fraction of
positions whose top-1 token agrees, the logits' relative error, the scalings' max and mean abs difference and
the fraction of (position, module) whose top-1 expert agrees; for the frozen graph (scalings fixed to the float
main graph's at each prompt's last token) the top-1 tokens and the logits' error.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from xlora_runtime.format import contract as C
from xlora_runtime.format.record import GraphInfo, Quantization
from xlora_runtime.session import open_graph

from .errors import XLoraError
from .int4 import Quantized, quantize_int4
from .onnx_passes import WeightStore, fp16_weights_per_use
from .trt_check import check_tensorrt, op_counts
from .validate import validation_prompts

__all__ = ["MODES", "Agreement", "QuantizeOptions", "QuantizeReport", "measure_agreement", "quantize_export",
           "quantize_files", "quantize_int8", "quantized_lookups", "quantized_lora", "quantized_matmuls"]

MODES = ("int8", "int4")
# int4 default block: the best agreement of 32/64/128 on tiny-llama-trained (95.4/94.7/94.4% top-1 tokens);
# 64 and 128 decode llama-32m 8% and 15% faster (best of 9 runs: 148 and 158 against 137 tok/s), files 3-4% smaller.
BLOCK_SIZE = 32
INT4_ACCURACY_LEVEL = 4  # MatMulNBits computes with int8 activations: 1.5x the decode of level 0 (fp32; best of 9
# runs on llama-32m, 137 against 91 tok/s), the same agreement
INT8_PER_CHANNEL = True  # one scale per output column: better agreement than one per tensor, same speed
INT8_REDUCE_RANGE = True  # 7-bit weights: u8 x s8 products summed in pairs cannot saturate 16 bits on CPUs without
# VNNI (AVX2: the demo's spell task fell from 100% to 0% with 8-bit weights)
# lm_head quantized by default (--[no-]quantize-lm-head overrides). int4: on tiny-llama-trained the same
# teacher-forced top-1 tokens and experts as a float lm_head, and llama-32m decodes 10-20% faster
# (benchmarks/README.md); int8: float, as before (not measured again).
LM_HEAD_DEFAULT = {"int4": True, "int8": False}
# The embedding lookup as com.microsoft GatherBlockQuantized (int4 only: the table's int4 blocks; a tied table's are
# lm_head's, so its float copy goes), off by default: on tiny-llama-trained 97% top-1 tokens against 100% with the
# float lookup (logits error 7.5% against 6.8%, top-1 experts 96.9% against 97.3%), the same in fp16.
EMBEDDING_DEFAULT = False
# int4: the LoRA A/B and classifier MatMuls as 8-bit MatMulNBits (--[no-]quantize-lora). llama-32m (gqa, int4),
# 16 rounds alternated on a loaded machine: decode 1.17x (two passes) and 1.19x (frozen) the float LoRA's, faster
# in 14 of 16 rounds each, files 64 -> 44 MB; tiny-llama-trained: the same top-1 tokens (100%, frozen 99%),
# top-1 experts 97.1% against 97.3%, logits error 6.8% both.
LORA_DEFAULT = True
AGREEMENT_STEPS = 24  # teacher-forced decode steps after the prefill
# A quantized graph whose logits differ from the float graph's by this fraction of their size (centred, median
# over positions) is broken: unrelated logits of the same size differ by sqrt(2). Correct int4 graphs measured up
# to 0.48 (llama-32m, random weights); one with its scales negated 1.3 to 2.0.
BROKEN_LOGITS_ERROR = 1.0
# Natural text for the agreement prompts (through the exported tokenizer); random ids when there is none.
PROMPTS = (
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch of the old house.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969 the first people landed on the Moon, and the mission",
    "A mixture of experts routes every token to",
)
# Weight initializers of the base decoder's Linear layers (the exporter's names: export.py attaches the
# parameters of xLoRAModel as `<name>` or `<name>.T`); the LoRA A/B (`lora_A.T`) and norms never match.
_BASE_LINEAR = re.compile(r"^model\.model\.layers\.\d+\..*\.weight(\.T)?$")
_EMBEDDING = "model.model.embed_tokens.weight"  # the lookup table (V, H); tied: stored as `E.T` (H, V)
_LM_HEAD = ("model.lm_head.weight.T", "model.lm_head.weight", f"{_EMBEDDING}.T")  # tied: E.T
# The LoRA A/B matrices of the decoder blocks (packed ones too: `...q_proj+k_proj+v_proj.lora_A.T`) and the
# classifier's Linear weights.
_LORA = re.compile(r"^(model\.model\.layers\.\d+\..*\.lora_[AB]\b|internal_xlora_classifier\.).*\.T$")
_EXTERNAL_FROM = 1024  # bytes: smaller quantized tensors (scalars, short zero points) stay inside each graph
_FLOAT_DIR = "float"  # the float graphs' folder inside the staging folder while quantizing


@dataclass
class QuantizeOptions:
    """What `--quantize` and its options ask for (defaults = the CLI's)."""

    mode: str = "int4"  # one of MODES
    block_size: int = BLOCK_SIZE  # int4: weights per scale along K, a power of two >= 16
    lm_head: bool | None = None  # also quantize lm_head (a tied embedding then keeps its float table for the
    # lookup); None: the mode's default, `LM_HEAD_DEFAULT`
    min_agreement: float = 0.0  # fail the export when a graph's top-1 token agreement is below this fraction
    embedding: bool | None = None  # int4: the embedding lookup through the table's int4 blocks (a tied table: only
    # with lm_head); None: `EMBEDDING_DEFAULT` in int4, no in int8
    lora: bool | None = None  # int4: the LoRA A/B and classifier MatMuls in 8 bits; None: `LORA_DEFAULT` in int4

    def __post_init__(self) -> None:
        if self.lm_head is None:
            self.lm_head = LM_HEAD_DEFAULT.get(self.mode, False)
        if self.embedding is None:
            self.embedding = EMBEDDING_DEFAULT and self.mode == "int4"
        if self.lora is None:
            self.lora = LORA_DEFAULT and self.mode == "int4"

    def check(self, dtype: str) -> None:
        """Refuse what cannot be exported, before the float export runs.

        Raises:
            XLoraError: unknown mode, bad block size or threshold, a float dtype other than fp32 (int4: or fp16).
        """
        if self.mode not in MODES:
            raise XLoraError(f"--quantize {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise XLoraError(f"--block-size {self.block_size}: expected a power of two, at least 16")
        if not 0 <= self.min_agreement <= 1:
            raise XLoraError(f"--min-agreement {self.min_agreement}: expected a fraction in 0..1")
        if self.mode == "int4" and dtype not in ("fp32", "fp16"):
            raise XLoraError(f"--quantize int4 needs --dtype fp32 or fp16 (the quantized graph keeps the float graph's "
                             f"activations and LoRA terms, and is measured against it on the CPU), got --dtype {dtype}")
        if self.mode == "int8" and self.embedding:
            raise XLoraError("--quantize-embedding applies to --quantize int4 only")
        if self.mode == "int8" and self.lora:
            raise XLoraError("--quantize-lora applies to --quantize int4 only")
        if self.mode == "int8" and dtype != "fp32":
            raise XLoraError(f"--quantize int8 needs --dtype fp32 (the quantized graph keeps fp32 activations "
                             f"and float LoRA terms), got --dtype {dtype}")


@dataclass
class Agreement:
    """One quantized graph against its float graph (module docstring): fractions in 0..1."""

    positions: int = 0  # token positions compared
    tokens: float = 0.0  # top-1 token agreement
    logits_error: float = 0.0  # median over positions of |q - f| / |f|, logits centred over the vocabulary
    scalings_max_diff: float | None = None  # main graph only
    scalings_mean_diff: float | None = None
    experts: float | None = None  # top-1 expert agreement per (position, module); main graph only


@dataclass
class QuantizeReport:
    """What `quantize_files` did and measured."""

    options: QuantizeOptions
    quantized: dict[str, int] = field(default_factory=dict)  # graph kind -> MatMuls quantized
    lookups: dict[str, int] = field(default_factory=dict)  # graph kind -> embedding lookups quantized
    float_bytes: int = 0  # the float graphs' files
    bytes: int = 0  # the quantized graphs' files
    agreement: dict[str, Agreement] = field(default_factory=dict)
    prompts: str = ""  # what the agreement was measured on
    skipped: str | None = None  # why agreement was not measured

    def lines(self) -> list[str]:
        """The export summary's lines."""
        o = self.options
        how = f"{o.mode}, block {o.block_size}, accuracy level {INT4_ACCURACY_LEVEL}" if o.mode == "int4" else (
            "int8 dynamic, per-column weight scales")
        kept = [part for part, float_ in (("classifier, LoRA A/B", not o.lora), ("lm_head", not o.lm_head)) if float_]
        parts = (["classifier and LoRA A/B in 8 bits"] if o.lora else []) + ([" and ".join(kept) + " kept float"]
                                                                           if kept else [])
        counts = ", ".join(f"{n} MatMuls" + (f" and {self.lookups[kind]} embedding lookup" if self.lookups.get(kind)
                                              else "") + f" of the {kind} graph" for kind, n in self.quantized.items())
        lines = [f"quantized ({how}): {counts}; {'; '.join(parts)}; files {self.float_bytes / 1e6:.1f} MB "
                 f"-> {self.bytes / 1e6:.1f} MB"]
        if self.skipped:
            return lines + [f"AGREEMENT NOT MEASURED: {self.skipped}"]
        parts = []
        for kind, a in self.agreement.items():
            part = f"{kind} graph top-1 tokens {a.tokens:.1%} of {a.positions}, logits error {a.logits_error:.1%}"
            if a.scalings_max_diff is not None:
                part += (f", scalings max diff {a.scalings_max_diff:.2e} (mean {a.scalings_mean_diff:.1e}), top-1 "
                         f"experts {a.experts:.1%}")
            parts.append(part)
        return lines + [f"agreement with the float graph ({self.prompts}): " + "; ".join(parts)]


def quantized_matmuls(proto: onnx.ModelProto, lm_head: bool = False) -> list[str]:
    """Names of the MatMul nodes to quantize: those whose weight (input B, an initializer) is a base decoder
    Linear weight, plus lm_head's with `lm_head` (the quantizers select nodes by name: the exporter names every
    node, uniquely). `proto` may be loaded without its external data."""
    initializers = {i.name for i in proto.graph.initializer}
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul"]
    assert all(n.name for n in matmuls) and len({n.name for n in matmuls}) == len(matmuls), "MatMul names not unique"
    return [n.name for n in matmuls if n.input[1] in initializers
            and (_BASE_LINEAR.match(n.input[1]) or (lm_head and n.input[1] in _LM_HEAD))]


def quantized_lora(proto: onnx.ModelProto) -> list[str]:
    """Names of the MatMul nodes whose weight (input B, a 2-D initializer) is a LoRA A/B matrix of the decoder blocks
    or a classifier Linear weight: int4 quantizes them in 8 bits. `proto` may be loaded without its external data."""
    shapes = {i.name: i.dims for i in proto.graph.initializer}
    return [n.name for n in proto.graph.node if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2
            and _LORA.match(n.input[1])]


def quantized_lookups(proto: onnx.ModelProto, lm_head: bool, block_size: int) -> list[str]:
    """Names of the Gather nodes that look up the embedding, for GatherBlockQuantized: an untied table (V, H) read
    by Gather(axis 0); a tied one (stored (H, V)) read by Gather(axis 1) then Transpose([1, 2, 0]), only with
    `lm_head` (the lookup then reads lm_head's int4 blocks; otherwise lm_head keeps the float table). None when H
    is no whole number of blocks. `proto` may be loaded without its external data."""
    dims = {i.name: tuple(i.dims) for i in proto.graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    found = []
    for node in proto.graph.node:
        if node.op_type != "Gather" or not node.input or node.input[0] not in (_EMBEDDING, f"{_EMBEDDING}.T"):
            continue
        tied = node.input[0].endswith(".T")
        shape = dims.get(node.input[0], ())
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        after = readers.get(node.output[0], [])
        if tied and not (lm_head and axis == 1 and len(after) == 1 and after[0].op_type == "Transpose"
                         and [list(a.ints) for a in after[0].attribute if a.name == "perm"] == [[1, 2, 0]]):
            continue
        if len(shape) == 2 and axis == int(tied) and shape[0 if tied else 1] % block_size == 0:  # H
            found.append(node.name)
    return found


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ONNX Runtime's quantizers log every node they skip (INFO) and advise pre-processing (WARNING)."""
    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(before)


def quantize_int8(path: str, options: QuantizeOptions, work: str) -> tuple[onnx.ModelProto, int]:
    """The float graph at `path`, quantized to int8 in memory (weights loaded), and the number of MatMuls
    quantized. Peak memory: the float weights once plus the quantized ones; quantize_dynamic writes a
    shape-inferred copy of the graph (not of its weights) beside `path` for a moment.

    Args:
        work: an empty scratch folder (quantize_dynamic writes its result as a file).
    """
    chosen = quantized_matmuls(onnx.load(path, load_external_data=False), options.lm_head)
    with _quiet():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        result = os.path.join(work, "int8.onnx")
        quantize_dynamic(path, result, op_types_to_quantize=["MatMul"],
                         nodes_to_quantize=chosen, per_channel=INT8_PER_CHANNEL, reduce_range=INT8_REDUCE_RANGE,
                         weight_type=QuantType.QInt8,
                         use_external_data_format=True)
        return onnx.load(result), len(chosen)


def _record(proto: onnx.ModelProto, options: QuantizeOptions, path: str) -> None:
    """Add the quantization to the metadata record of the graph quantized from `path` (xlora-parity and low_memory
    read it)."""
    int4 = options.mode == "int4"
    quantization = Quantization(mode=options.mode, lm_head=options.lm_head,
                                block_size=options.block_size if int4 else None,
                                accuracy_level=INT4_ACCURACY_LEVEL if int4 else None,
                                per_channel=None if int4 else INT8_PER_CHANNEL)
    for entry in proto.metadata_props:
        if entry.key == C.METADATA_KEY:
            info = GraphInfo.parse(entry.value, path)
            entry.value = replace(info, quantization=quantization).to_json()


def _write(proto: onnx.ModelProto, path: str, store: WeightStore | None, weights: set[str],
           digests: dict[str, bytes]) -> None:
    """Save `proto` to `path`, its tensors derived from the float weights (`weights`: their names) in `store`.

    Both graphs quantize a shared weight to the same bytes under the same name, so the store writes it once;
    `digests` checks that.
    """
    if store is not None:
        for i, init in enumerate(proto.graph.initializer):
            derived = init.name in weights or any(init.name.startswith(w + "_") for w in weights)
            if not derived or init.data_location == onnx.TensorProto.EXTERNAL:
                continue
            value = numpy_helper.to_array(init)
            if value.nbytes < _EXTERNAL_FROM:
                continue
            digest = hashlib.blake2b(np.ascontiguousarray(value).tobytes(), digest_size=16).digest()
            assert digests.setdefault(init.name, digest) == digest, f"{init.name}: other bytes in the other graph"
            proto.graph.initializer[i].CopyFrom(store.tensor(init.name, torch.from_numpy(value.copy())))
    onnx.save_model(proto, path)


def quantize_files(floats: dict[str, str], outputs: dict[str, str], options: QuantizeOptions, validate: bool,
                   progress: Callable[[str], None] | None = None) -> QuantizeReport:
    """Quantize float graphs into new files and measure them against the float ones (module docstring).

    Args:
        floats: kind ("main", and "frozen" when exported) -> a float graph written by the exporter (left as it
            is; int8 writes a temporary file beside it).
        outputs: kind -> where its quantized graph goes, all in one folder; they share `outputs["main"] + ".data"`
            when the float graphs had external data, else hold their weights inside.
        validate: measure the agreement (prompts through the tokenizer beside `outputs["main"]` or the float graph).
    Raises:
        XLoraError: a quantized graph is clearly broken (`BROKEN_LOGITS_ERROR`) or its top-1 token agreement is
            below `options.min_agreement`.
    """
    data = floats["main"] + ".data"
    external = os.path.isfile(data)
    report = QuantizeReport(options, float_bytes=sum(os.path.getsize(p) for p in [*floats.values()]
                                                     + ([data] if external else [])))
    store = WeightStore(outputs["main"] + ".data" if external else None)
    shared, digests = Quantized(store), {}
    try:
        for kind, path in outputs.items():
            _say(progress, f"quantizing the {kind} graph ({options.mode})")
            structure = onnx.load(floats[kind], load_external_data=False)
            if options.mode == "int4":  # one weight at a time, straight into the store
                chosen = quantized_matmuls(structure, options.lm_head)
                lookups = quantized_lookups(structure, options.lm_head, options.block_size) if options.embedding \
                    else []
                wide = quantized_lora(structure) if options.lora else []
                proto = quantize_int4(floats[kind], chosen, options.block_size, INT4_ACCURACY_LEVEL, shared, lookups,
                                      wide)
                report.quantized[kind], report.lookups[kind] = len(chosen), len(lookups)
            else:
                weights = {i.name for i in structure.graph.initializer
                           if i.data_location == onnx.TensorProto.EXTERNAL}
                work = tempfile.mkdtemp(prefix=".quantize-", dir=os.path.dirname(path))
                try:
                    proto, report.quantized[kind] = quantize_int8(floats[kind], options, work)
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            del structure
            _record(proto, options, floats[kind])
            if options.mode == "int4":
                onnx.save_model(proto, path)
            else:
                _write(proto, path, store, weights, digests)
            del proto
    finally:
        store.close()
    report.bytes = sum(os.path.getsize(p) for p in [*outputs.values()] + ([store.data_path] if external else []))
    if not validate:
        report.skipped = "--no-validate"
        return report
    _say(progress, "measuring the quantized graphs' agreement with the float graphs")
    tokenizer = next((t for t in (C.tokenizer_path(outputs["main"]), C.tokenizer_path(floats["main"]))
                      if os.path.isfile(t)), None)
    report.agreement, report.prompts = measure_agreement(floats, outputs, tokenizer)
    for kind, a in report.agreement.items():
        if a.logits_error >= BROKEN_LOGITS_ERROR:
            raise XLoraError(f"validation failed: the {options.mode} {kind} graph's logits differ from the float "
                             f"graph's by {a.logits_error:.0%} of their size (median over {a.positions} positions; "
                             f"unrelated logits differ by about 141%); no file was written")
        if a.tokens < options.min_agreement:
            raise XLoraError(f"validation failed: the {options.mode} {kind} graph's top-1 tokens agree with the "
                             f"float graph's at {a.tokens:.0%} of {a.positions} positions (--min-agreement "
                             f"{options.min_agreement:g}); no file was written")
    return report


def quantize_export(staged: dict[str, str], options: QuantizeOptions, report: Any, validate: bool,
                    progress: Callable[[str], None] | None = None) -> None:
    """The export's hook: replace the staged float graphs (`staged`: kind -> path, one folder, validated against
    the eager model) by their quantized versions and update `report` (an `export.ExportReport`): `quantization`,
    and the main graph's op counts and TensorRT findings (MatMulNBits is an ONNX Runtime op). On failure the
    export removes the staging folder, float graphs included."""
    aside = os.path.join(os.path.dirname(staged["main"]), _FLOAT_DIR)
    os.makedirs(aside)
    data = staged["main"] + ".data"
    floats = {kind: os.path.join(aside, os.path.basename(path)) for kind, path in staged.items()}
    for path in [*staged.values()] + ([data] if os.path.isfile(data) else []):
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    report.quantization = quantize_files(floats, staged, options, validate, progress)
    shutil.rmtree(aside)
    main = onnx.load(staged["main"], load_external_data=False)
    report.op_counts = dict(op_counts(main).most_common())
    report.tensorrt_findings = check_tensorrt(main)


def _say(progress: Callable[[str], None] | None, message: str) -> None:
    if progress is not None:
        progress(message)


# ----------------------------------------------------------------------------------------------- agreement
@dataclass
class _Run:
    """One graph's teacher-forced decoding: per step the centred logits of the real positions (positions, V),
    scalings (b, s', L, n) or None, real positions (b, s'), and the tokens fed next (b,)."""

    logits: list[np.ndarray]
    scalings: list[np.ndarray | None]
    real: list[np.ndarray]
    fed: list[np.ndarray]


def _prompts(tokenizer_path: str | None, vocab_size: int) -> tuple[list[list[int]], str]:
    if tokenizer_path is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(tokenizer_path)
        ids = [[i for i in tokenizer.encode(text).ids if i < vocab_size] for text in PROMPTS]
        if all(ids):
            return ids, f"{len(ids)} text prompts"
    ids = validation_prompts(vocab_size, lengths=(16, 11, 7, 4))
    return ids, f"{len(ids)} random-id prompts"


def _decode(path: str, info: GraphInfo, prompts: list[list[int]], frozen: bool, forced: list[np.ndarray] | None,
            fixed: np.ndarray | None) -> _Run:
    """Prefill the left-padded prompts, then `AGREEMENT_STEPS` decode steps, each feeding `forced[step]` (or the
    graph's own greedy tokens), the graph's presents as the next pasts. A float graph (no `forced` tokens) runs
    lean (its weights held once); a quantized one as the runtime runs it (its fused kernels are what it ships)."""
    lean = forced is None
    per_use = os.path.join(os.path.dirname(path), ".agreement." + os.path.basename(path))
    if lean and info.dtype == "fp16":  # the CPU provider's fp32 copies of fp16 weights, one at a time (as validation)
        fp16_weights_per_use(path, per_use)
    try:
        session = open_graph(per_use if os.path.isfile(per_use) else path, lean=lean)
    finally:
        if os.path.isfile(per_use):
            os.remove(per_use)
    n, b = info.num_layers, len(prompts)
    width = max(map(len, prompts))
    ids = np.zeros((b, width), np.int64)
    mask = np.zeros((b, width), np.int64)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):], mask[row, width - len(p):] = p, 1
    pasts = C.past_names(n) + ([] if frozen else C.past_names(n, scaling=True))
    presents = C.present_names(n) + ([] if frozen else C.present_names(n, scaling=True))
    shape = (b, info.kv_heads, 0, info.head_dim)
    dtype = np.dtype(info.cache_dtype)  # float32 or float16
    feed = {name: np.zeros(shape, dtype) for name in pasts}
    feed[C.TOP_K] = np.array(info.default_top_k, np.int64)
    if frozen:
        feed[C.SCALINGS] = fixed.astype(dtype)
    run, real = _Run([], [], [], []), mask.astype(bool)
    for step in range(AGREEMENT_STEPS + 1):
        positions = np.clip(np.cumsum(mask, 1) - 1, 0, None)[:, -ids.shape[1]:]
        feed.update({C.INPUT_IDS: ids, C.ATTENTION_MASK: mask, C.POSITION_IDS: positions})
        outs = dict(zip(C.output_names(n, frozen), session.run(None, feed)))
        logits = outs[C.LOGITS].astype(np.float32)  # (b, s', V): s' may be fewer than s (last-position logits)
        run.real.append(real[:, real.shape[1] - logits.shape[1]:])
        kept = logits[run.real[-1]]
        run.logits.append(kept - kept.mean(-1, keepdims=True))
        run.scalings.append(None if frozen else outs[C.SCALINGS][:, -logits.shape[1]:].astype(np.float32))
        run.fed.append(forced[step] if forced is not None else logits[:, -1].argmax(-1))
        ids, real = run.fed[-1][:, None], np.ones((b, 1), bool)
        mask = np.concatenate([mask, np.ones((b, 1), np.int64)], 1)
        feed.update({p: outs[q] for p, q in zip(pasts, presents)})
    return run


def _compare(reference: _Run, run: _Run) -> Agreement:
    f, q = np.concatenate(reference.logits), np.concatenate(run.logits)
    error = np.linalg.norm(q - f, axis=-1) / np.maximum(np.linalg.norm(f, axis=-1), np.finfo(np.float32).tiny)
    result = Agreement(positions=len(f), tokens=float((f.argmax(-1) == q.argmax(-1)).mean()),
                       logits_error=float(np.median(error)))
    if reference.scalings[0] is not None:
        diff = np.concatenate([np.abs(r[m] - q[m]).ravel() for r, q, m in zip(reference.scalings, run.scalings,
                                                                              reference.real)])
        experts = np.concatenate([(r.argmax(-1) == q.argmax(-1))[m].ravel()
                                  for r, q, m in zip(reference.scalings, run.scalings, reference.real)])
        result.scalings_max_diff, result.scalings_mean_diff = float(diff.max()), float(diff.mean())
        result.experts = float(experts.mean())
    return result


def measure_agreement(floats: dict[str, str], quantized: dict[str, str],
                      tokenizer_path: str | None) -> tuple[dict[str, Agreement], str]:
    """Each quantized graph against its float graph (module docstring); one graph open at a time.

    Args:
        floats, quantized: kind ("main", "frozen") -> graph path.
        tokenizer_path: the export's tokenizer file (None: random-id prompts).
    Returns:
        kind -> Agreement, and a description of what was compared.
    """
    info = GraphInfo.read(floats["main"])
    prompts, described = _prompts(tokenizer_path, info.vocab_size)
    reference = _decode(floats["main"], info, prompts, False, None, None)
    result = {"main": _compare(reference, _decode(quantized["main"], info, prompts, False, reference.fed, None))}
    if "frozen" in floats:
        fixed = reference.scalings[0][:, -1]  # (b, L, n): each prompt's last token (left padding)
        frozen_reference = _decode(floats["frozen"], info, prompts, True, None, fixed)
        result["frozen"] = _compare(frozen_reference, _decode(quantized["frozen"], info, prompts, True,
                                                              frozen_reference.fed, fixed))
    return result, f"teacher-forced, {described}, prefill + {AGREEMENT_STEPS} decode steps"
