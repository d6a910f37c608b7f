"""The exported graph's contract: every input/output name, dtype, symbolic dimension and companion
file, defined once. The exporter (`xlora_export`), the runtime and the tests import it; it imports
nothing heavy, so a deployment installs it without torch.

Main graph `OUT.onnx` (both passes):
    inputs   input_ids (batch, sequence) int64
             attention_mask (batch, total_sequence) int64
             position_ids (batch, sequence) int64
             past_key_values.{i}.key|value (batch, kv_heads, past_sequence, head_dim)          real pass
             scaling_past_key_values.{i}.key|value (batch, kv_heads, past_sequence, head_dim)  scaling pass
             top_k () int64, 0 = dense
    outputs  logits (batch, 1, vocab): the last position's (default; exported with --all-logits:
                    (batch, sequence, vocab), every position's)
             scalings (batch, sequence, L, n)   before top-k
             present.{i}.key|value, scaling_present.{i}.key|value (batch, kv_heads, total_sequence, head_dim)
Frozen graph `OUT.frozen.onnx` (real pass only): the same inputs minus the scaling caches, plus
`scalings` (batch, L, n) before `top_k`; outputs logits and present.*.

Kinds (`graph` in the metadata record): "two_pass" (OUT.onnx), "frozen" (OUT.frozen.onnx). Logits (`logits`):
"last" (the default) or "all" (--all-logits). Float tensors (logits, scalings, caches) have the element type of the
export's --dtype: fp32 float32, fp16 float16, bf16 bfloat16 (`GRAPH_DTYPES`).

Attention (`attention` in the metadata record): "onnx", plain ONNX ops; or "gqa" (`xlora-export --attention
gqa`), ONNX Runtime's com.microsoft GroupQueryAttention per layer and pass. The names and shapes are the same;
a "gqa" graph may also be run with each present bound to its past's buffer, longer than the past
(batch, kv_heads, capacity, head_dim): it writes the new positions in place (ONNX Runtime only).
"""

from __future__ import annotations

__all__ = [
    "ATTENTIONS", "ATTENTION_GQA", "ATTENTION_MASK", "ATTENTION_ONNX", "BATCH", "FORMAT_VERSION", "GRAPH_DTYPES",
    "GRAPH_FROZEN", "GRAPH_TWO_PASS", "INPUT_IDS", "LOGITS", "LOGITS_ALL", "LOGITS_LAST", "METADATA_KEY",
    "OPSET_DEFAULT", "OPSET_MAX", "OPSET_MIN", "ORT_DOMAIN", "PAST_SEQUENCE", "POSITION_IDS", "SCALINGS", "SEQUENCE",
    "TOP_K", "TOTAL_SEQUENCE", "chat_template_path", "dynamic_axes", "frozen_path", "input_names", "output_names",
    "past_names", "present_name", "present_names", "tokenizer_path",
]

FORMAT_VERSION = 1
METADATA_KEY = "xlora_export"  # metadata_props key holding the JSON record
# Opsets a graph may have: the graph needs 14; torch 2.13's TorchScript exporter writes up to 20
# (torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET; a test keeps them equal). 17 is the default
# because TensorRT's ONNX parser reads it.
OPSET_MIN, OPSET_MAX, OPSET_DEFAULT = 14, 20, 17
# How attention is written (the record's "attention"; see the module docstring).
ATTENTION_ONNX, ATTENTION_GQA = "onnx", "gqa"
ATTENTIONS = (ATTENTION_ONNX, ATTENTION_GQA)
ORT_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators
GRAPH_TWO_PASS, GRAPH_FROZEN = "two_pass", "frozen"  # the record's "graph": OUT.onnx, OUT.frozen.onnx
LOGITS_LAST, LOGITS_ALL = "last", "all"  # the record's "logits": the last position's, or every position's
GRAPH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}  # --dtype -> element type of float tensors

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
TOP_K = "top_k"
SCALINGS = "scalings"  # an output of the main graph, an input of the frozen graph
LOGITS = "logits"

BATCH = "batch"
SEQUENCE = "sequence"
PAST_SEQUENCE = "past_sequence"
TOTAL_SEQUENCE = "total_sequence"


def past_names(n_layers: int, scaling: bool = False) -> list[str]:
    """`past_key_values.{i}.key|value` (or `scaling_past_key_values...`), block by block."""
    prefix = "scaling_past_key_values" if scaling else "past_key_values"
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def present_name(past: str) -> str:
    """The present output that continues a past input: `past_key_values.3.key` -> `present.3.key`."""
    return past.replace("past_key_values.", "present.", 1)


def present_names(n_layers: int, scaling: bool = False) -> list[str]:
    """`present.{i}.key|value` (or `scaling_present...`), block by block."""
    prefix = "scaling_present" if scaling else "present"
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def input_names(n_layers: int, frozen: bool = False) -> list[str]:
    """Graph inputs in order."""
    head = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS] + past_names(n_layers)
    return head + ([SCALINGS] if frozen else past_names(n_layers, scaling=True)) + [TOP_K]


def output_names(n_layers: int, frozen: bool = False) -> list[str]:
    """Graph outputs in order."""
    if frozen:
        return [LOGITS] + present_names(n_layers)
    return [LOGITS, SCALINGS] + present_names(n_layers) + present_names(n_layers, scaling=True)


def dynamic_axes(n_layers: int, frozen: bool = False, all_logits: bool = False) -> dict[str, dict[int, str]]:
    """Symbolic dimensions of every input and output (`all_logits`: logits of every position, not the last)."""
    axes = {INPUT_IDS: {0: BATCH, 1: SEQUENCE}, ATTENTION_MASK: {0: BATCH, 1: TOTAL_SEQUENCE},
            POSITION_IDS: {0: BATCH, 1: SEQUENCE}, LOGITS: {0: BATCH, 1: SEQUENCE} if all_logits else {0: BATCH}}
    axes[SCALINGS] = {0: BATCH} if frozen else {0: BATCH, 1: SEQUENCE}
    for scaling in (False, True) if not frozen else (False,):
        axes.update({name: {0: BATCH, 2: PAST_SEQUENCE} for name in past_names(n_layers, scaling)})
        axes.update({name: {0: BATCH, 2: TOTAL_SEQUENCE} for name in present_names(n_layers, scaling)})
    return axes


def _stem(onnx_path: str) -> str:
    return onnx_path[:-len(".onnx")] if onnx_path.endswith(".onnx") else onnx_path


def frozen_path(onnx_path: str) -> str:
    """`OUT.frozen.onnx` beside `OUT.onnx`."""
    return _stem(onnx_path) + ".frozen.onnx"


def tokenizer_path(onnx_path: str) -> str:
    """`OUT.tokenizer.json` beside `OUT.onnx`."""
    return _stem(onnx_path) + ".tokenizer.json"


def chat_template_path(onnx_path: str) -> str:
    """`OUT.chat_template.jinja` beside `OUT.onnx` (the checkpoint tokenizer's chat template, when it has one)."""
    return _stem(onnx_path) + ".chat_template.jinja"
