"""int4 weight-only quantization of an exported graph, one weight at a time from its external data.

ONNX Runtime's `MatMulNBitsQuantizer` (default algorithm) loads the whole model with its weights and holds the
quantized copy beside it (about 1.2x the float weights at once); this writes the same graph from the float
graph's structure and reads one weight at a time, so that peak memory is about the largest weight (its quantized
blocks included) whatever the model's size:

    float graph (structure only)   MatMul(A, W)  W: (K, N) initializer, fp32 or fp16, inline or external
      -> per chosen MatMul:        MatMulNBits(A, W_Q4, W_scales, W_zero_points)   com.microsoft, named `<node>_Q4`
           K, N, bits 4, block_size, accuracy_level; W_Q4 (N, K/block, block/2) uint8, W_scales (N, K/block) in W's
           float type, W_zero_points (N, ceil(K/block / 2)) uint8: ONNX Runtime's own `quantize_matmul_4bits`
           (K padded to whole blocks with zeros, asymmetric), what its quantizer computes
      -> optionally other MatMuls in 8 bits: MatMulNBits bits 8 (`W_Q8` (N, K/block, block), zero points
           (N, K/block)): ONNX Runtime's `quantize_matmul_8bits`
      -> optionally the embedding lookup:  GatherBlockQuantized(E.rows_Q4, ids, E.rows_scales, E.rows_zero_points)
           gather_axis 0, quantize_axis 1, bits 4: the table's blocks as those of the MatMul weight E.T, the packed
           rows viewed as (V, H/2) (the same bytes in the file); a tied table (lm_head reads E.T, the lookup
           Gather(E.T, axis 1) then Transpose) reads lm_head's blocks, and no float table is left
      -> every other external tensor copied as it is (LoRA A/B, classifier, norms, a float embedding)
      -> the float weights no node reads any more dropped; the com.microsoft opset (version 1) imported

All tensors go through one `WeightStore`: the main and the frozen graph quantized into the same store share
each tensor's bytes by name (`Quantized.done` remembers what was written, so a weight both graphs read is read
and quantized once).

fp16 graphs: where two MatMulNBits of one graph read the same quantized weight (the main graph's scaling and
real passes), the second reads it under names of its own (`<W>.use2_Q4`, ... the same bytes in the file):
ONNX Runtime 1.32's CPU kernel computes wrong products from fp16 weights shared by two nodes once it has
pre-packed them (on tiny-llama-trained: 73% top-1 tokens and 74% logits error against the float graph instead of
99% and 6%; without pre-packing, or with names of their own, right).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from .onnx_passes import WeightStore

__all__ = ["Quantized", "quantize_blocks", "quantize_int4"]

_TORCH_DTYPES = {TensorProto.FLOAT: torch.float32, TensorProto.FLOAT16: torch.float16,
                 TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
                 TensorProto.BOOL: torch.bool, TensorProto.UINT8: torch.uint8, TensorProto.INT8: torch.int8}
_INLINE_BELOW = 1024  # bytes: smaller quantized tensors (short scales and zero points) stay inside each graph


@dataclass
class Quantized:
    """Tensors already written into a store, shared by the graphs quantized into it: name -> initializer."""

    store: WeightStore
    done: dict[str, TensorProto] = field(default_factory=dict)

    def alias(self, name: str, alias: str, dims: tuple[int, ...] | None = None) -> TensorProto:
        """The tensor written as `name`, under the name `alias` (the same bytes; `dims`: viewed in that shape)."""
        if alias not in self.done:
            self.done[alias] = TensorProto()
            self.done[alias].CopyFrom(self.done[name])
            self.done[alias].name = alias
            if dims is not None:
                self.done[alias].dims[:] = dims
        return self.done[alias]

    def put(self, name: str, value: np.ndarray | torch.Tensor) -> TensorProto:
        """The initializer `name` holding `value`, written once (small ones inline)."""
        if name not in self.done:
            tensor = torch.from_numpy(np.ascontiguousarray(value)) if isinstance(value, np.ndarray) else value
            if tensor.numel() * tensor.element_size() < _INLINE_BELOW:
                self.done[name] = numpy_helper.from_array(tensor.numpy(), name)
            else:
                self.done[name] = self.store.tensor(name, tensor)
        return self.done[name]


def quantize_blocks(weight: np.ndarray, block_size: int, bits: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A MatMul weight (K, N) in fp32 or fp16, quantized as ONNX Runtime's MatMulNBitsQuantizer quantizes it.

    Returns:
        packed (N, K/block, block/2) uint8 (two 4-bit values a byte, low nibble first), scales (N, K/block) in the
        weight's dtype, zero points (N, ceil(K/block / 2)) uint8; K/block rounded up.
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    rows, cols = weight.shape
    blocks = -(-rows // block_size)
    if blocks * block_size != rows:
        weight = np.pad(weight, ((0, blocks * block_size - rows), (0, 0)))
    per_byte = 8 // bits
    packed = np.zeros((cols, blocks, block_size // per_byte), np.uint8)
    zero_points = np.zeros((cols, -(-blocks // per_byte)), np.uint8)
    scales = np.zeros((cols, blocks), weight.dtype)
    quantize = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    quantize(packed, np.ascontiguousarray(weight), scales, zero_points, block_size, cols, rows, False)
    return packed, scales, zero_points


def _read(init: TensorProto, folder: str) -> torch.Tensor:
    """An initializer's value (external data read from its file into memory of its own, not mapped)."""
    if init.data_location != TensorProto.EXTERNAL:
        return torch.from_numpy(numpy_helper.to_array(init).copy())
    entry = {e.key: e.value for e in init.external_data}
    with open(os.path.join(folder, entry["location"]), "rb") as f:
        f.seek(int(entry.get("offset", 0)))
        raw = np.fromfile(f, np.uint8, int(entry["length"]))
    return torch.from_numpy(raw).view(_TORCH_DTYPES[init.data_type]).reshape(tuple(init.dims))


def quantize_int4(path: str, nodes: list[str], block_size: int, accuracy_level: int, out: Quantized,
                  lookups: list[str] = (), eight_bit: list[str] = ()) -> onnx.ModelProto:
    """The graph at `path` with the MatMuls named in `nodes` replaced by MatMulNBits and the embedding lookups
    named in `lookups` by GatherBlockQuantized (module docstring), every external tensor written through `out`;
    peak memory about one weight and its quantized blocks.

    Args:
        nodes: MatMul node names whose input B is a 2-D initializer.
        block_size: weights per scale along K, a power of two >= 16.
        accuracy_level: MatMulNBits' `accuracy_level` (0: the attribute left out, as ONNX Runtime does).
        eight_bit: MatMul node names quantized in 8 bits instead (MatMulNBits bits 8: one byte a weight, the same
            blocks, `<W>_Q8`).
        lookups: `quantized_lookups`' Gather nodes (a table (V, H), or a tied one stored (H, V) and read through
            Gather(axis 1) and Transpose([1, 2, 0])), H a whole number of blocks.
    """
    proto = onnx.load(path, load_external_data=False)
    graph, folder = proto.graph, os.path.dirname(os.path.abspath(path))
    initializers = {init.name: init for init in graph.initializer}
    chosen, tables, wide = set(nodes) | set(eight_bit), set(lookups), set(eight_bit)
    uses: dict[str, int] = {}  # weight -> quantized nodes reading it so far

    def blocks(name: str, as_rows: bool, bits: int = 4) -> tuple[str, str, str]:
        """The names of `name`'s blocks as a MatMul weight (K, N) (`as_rows`: stored (N, K), a lookup table),
        quantized and written on first use; a second use in an fp16 graph under names of its own."""
        q, s, z = f"{name}_Q{bits}", f"{name}_scales", f"{name}_zero_points"
        if q not in out.done:
            value = _read(initializers[name], folder)
            value = value.t() if as_rows else value
            if value.dtype == torch.bfloat16:  # as ONNX Runtime does: blocks of the fp32 values, bf16 scales
                packed, scales, zero_points = quantize_blocks(value.float().contiguous().numpy(), block_size, bits)
                scales = torch.from_numpy(scales).bfloat16()
            else:
                packed, scales, zero_points = quantize_blocks(value.contiguous().numpy(), block_size, bits)
            del value
            out.put(q, packed)
            out.put(s, scales)
            out.put(z, zero_points)
        uses[name] = uses.get(name, 0) + 1
        if uses[name] > 1 and initializers[name].data_type == TensorProto.FLOAT16:  # see the module docstring
            stem = f"{name}.use{uses[name]}"
            q, s, z = (out.alias(n, f"{stem}{suffix}").name for n, suffix in
                       ((q, f"_Q{bits}"), (s, "_scales"), (z, "_zero_points")))
        return q, s, z

    transposes = {n.input[0]: n for n in graph.node if n.op_type == "Transpose"}
    dropped: set[str] = set()  # the tied lookups' Transposes
    new_nodes, added = [], []
    for node in graph.node:
        if node.name in chosen:
            name = node.input[1]
            rows, cols = initializers[name].dims
            assert node.op_type == "MatMul" and len(initializers[name].dims) == 2, f"{node.name}: not a 2-D MatMul"
            bits = 8 if node.name in wide else 4
            inputs = blocks(name, False, bits)
            added += [out.done[t] for t in inputs]
            attributes = {"K": rows, "N": cols, "bits": bits, "block_size": block_size}
            if accuracy_level:
                attributes["accuracy_level"] = accuracy_level
            new_nodes.append(helper.make_node("MatMulNBits", [node.input[0], *inputs], [node.output[0]],
                                              name=f"{node.name}_Q{bits}", domain="com.microsoft", **attributes))
        elif node.name in tables:
            name, tied = node.input[0], _axis(node) == 1
            vocab, hidden = reversed(initializers[name].dims) if tied else initializers[name].dims
            q, s, z = blocks(name, not tied)
            q = out.alias(q, f"{name}.rows_Q4", (vocab, hidden // 2)).name  # (V, H/block, block/2) as (V, H/2)
            s, z = (out.alias(t, f"{name}.rows{suffix}").name for t, suffix in ((s, "_scales"), (z, "_zero_points")))
            added += [out.done[t] for t in (q, s, z)]
            output = node.output[0]
            if tied:  # Gather(E.T, ids, axis=1) -> (H, b, s), Transpose -> (b, s, H): one lookup of rows
                dropped.add(transposes[output].name)
                output = transposes[output].output[0]
            new_nodes.append(helper.make_node("GatherBlockQuantized", [q, node.input[1], s, z], [output],
                                              name=f"{node.name}_Q4", domain="com.microsoft", bits=4,
                                              block_size=block_size, gather_axis=0, quantize_axis=1))
        elif node.name not in dropped:
            new_nodes.append(node)
    used = {name for node in new_nodes for name in node.input} | {o.name for o in graph.output}
    kept = []
    for init in [*graph.initializer, *added]:
        if init.name not in used:
            continue
        if init.data_location == TensorProto.EXTERNAL and init.name not in out.done:
            out.put(init.name, _read(init, folder))
        kept.append(out.done.get(init.name, init))
    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.initializer[:]
    graph.initializer.extend(_unique(kept))
    for opset in proto.opset_import:
        if opset.domain == "com.microsoft":
            opset.version = 1
            break
    else:
        proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return proto


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 0)


def _unique(tensors: list[TensorProto]) -> list[TensorProto]:
    """The tensors, each name once (a weight two MatMuls read is quantized once), in order."""
    seen: set[str] = set()
    return [t for t in tensors if not (t.name in seen or seen.add(t.name))]
