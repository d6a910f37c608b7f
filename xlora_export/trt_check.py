"""TensorRT readiness of an ONNX graph: what TensorRT's ONNX parser would refuse or mishandle.

Flags (each a `Finding`): an op outside the parser's supported set, an op from a non-default
domain (e.g. `com.microsoft`), any If/Loop/Scan (control flow; this project's graphs have none),
data-dependent output shapes (NonZero, Unique: they break optimization profiles), TopK with
`sorted=0` or a constant K above 3840, and Slice/Squeeze/Unsqueeze/CumSum whose axes are not
constants (the parser needs them at build time).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

__all__ = ["Finding", "SUPPORTED_OPS", "check_tensorrt", "op_counts"]

# ONNX ops (default domain) that TensorRT 10's ONNX parser implements (onnx-tensorrt docs/operators.md).
SUPPORTED_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast CastLike Ceil
Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div
Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gelu Gemm
GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual GroupNormalization GRU HardSigmoid HardSwish
Identity If InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax Loop
LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean Min Mod Mul Neg Not Or Pad PRelu Pow QuantizeLinear
RandomNormal RandomNormalLike RandomUniform RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum
ReduceLogSumExp ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize
ReverseSequence RNN Round Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin Sinh Size
Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh ThresholdedRelu Tile TopK
Transpose Trilu Unsqueeze Where Xor
""".split())
CONTROL_FLOW = frozenset({"If", "Loop", "Scan"})
DATA_DEPENDENT_SHAPES = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression"})
TOPK_MAX_K = 3840
_CONSTANT_AXES = {"Slice": (3,), "Squeeze": (1,), "Unsqueeze": (1,), "CumSum": (1,)}  # input positions


@dataclass(frozen=True)
class Finding:
    """One problem: the node, its op type and why TensorRT would not take it."""

    node: str
    op_type: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op_type} {self.node or '<unnamed>'}: {self.reason}"


def op_counts(model: onnx.ModelProto) -> Counter:
    """Op types of the main graph, with their counts."""
    return Counter(node.op_type for node in model.graph.node)


def check_tensorrt(model: onnx.ModelProto) -> list[Finding]:
    """Every node TensorRT's ONNX parser would refuse or that would break optimization profiles."""
    constants = {init.name: init for init in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            constants[node.output[0]] = node
    findings = []
    for node in model.graph.node:
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            findings.append(Finding(node.name, op, f"custom domain {node.domain!r} (not an ONNX standard op)"))
            continue
        if op in CONTROL_FLOW:
            findings.append(Finding(node.name, op, "control flow (If/Loop/Scan) is not allowed in the graph"))
        elif op in DATA_DEPENDENT_SHAPES:
            findings.append(Finding(node.name, op, "data-dependent output shape breaks optimization profiles"))
        elif op not in SUPPORTED_OPS:
            findings.append(Finding(node.name, op, "not supported by TensorRT's ONNX parser"))
        if op == "TopK":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("sorted", 1) == 0:
                findings.append(Finding(node.name, op, "sorted=0 is not supported"))
            k = constants.get(node.input[1]) if len(node.input) > 1 else None
            if isinstance(k, onnx.TensorProto) and int(numpy_helper.to_array(k).max()) > TOPK_MAX_K:
                findings.append(Finding(node.name, op, f"K above {TOPK_MAX_K}"))
        for position in _CONSTANT_AXES.get(op, ()):
            if len(node.input) > position and node.input[position] and node.input[position] not in constants:
                findings.append(Finding(node.name, op, f"input {position} (axes) is not a constant"))
    return findings
