"""`xlora-export MODEL_DIR OUT.onnx`: export an X-LoRA checkpoint to one validated ONNX graph.

MODEL_DIR is any checkpoint the reference model reads (this project's format, original xlora,
PEFT X-LoRA), a folder or a Hugging Face Hub id (org/name or org/name@revision). The base model is
the checkpoint's `base_model_id`: a folder (relative to the checkpoint or the working directory) or
a Hub id, read from the Hub's cache (HF_HUB_CACHE) and downloaded unless HF_HUB_OFFLINE=1; or
--base-model, which overrides it.

Exit codes: 0 written, 1 user error (one line on stderr), 2 usage error, 130 interrupted.
Nothing is written unless every check passed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from xlora_runtime.commands import Interrupted, integer, positive_float, positive_int, raise_if_interrupted, run
from xlora_runtime.format import contract as C

if TYPE_CHECKING:
    from .export import ExportReport

# Only the standard library above: torch, transformers and onnxruntime are imported inside main's try
# (seconds), so that Ctrl-C at any moment is "interrupted", exit 130, never a traceback.

DTYPES = ("fp32", "fp16", "bf16")  # the keys of export.DTYPES (a test keeps them equal)
QUANTIZE = ("int8", "int4")  # quantize.MODES (a test keeps them equal)
OPSET_MIN, OPSET_MAX, OPSET_DEFAULT = C.OPSET_MIN, C.OPSET_MAX, C.OPSET_DEFAULT  # the contract's opset range


def _opset(text: str) -> int:
    value = integer(text)
    if not OPSET_MIN <= value <= OPSET_MAX:
        raise argparse.ArgumentTypeError(
            f"expected {OPSET_MIN} to {OPSET_MAX} (the graph needs {OPSET_MIN}, torch's TorchScript exporter stops "
            f"at {OPSET_MAX}; {OPSET_DEFAULT}, the default, is what TensorRT parses), got {value}")
    return value


def _block_size(text: str) -> int:
    value = integer(text)
    if value < 16 or value & (value - 1):
        raise argparse.ArgumentTypeError(f"expected a power of two, at least 16 (MatMulNBits), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in 0..1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlora-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="X-LoRA checkpoint folder or Hub id")
    parser.add_argument("out", metavar="OUT.onnx", help="graph to write (companions are written beside it)")
    src = parser.add_argument_group("source")
    src.add_argument("--base-model", metavar="PATH", help="base model folder, overriding the checkpoint's "
                     "base_model_id (a folder or a Hub id)")
    graph = parser.add_argument_group("graph")
    graph.add_argument("--dtype", choices=DTYPES, default="fp32", help="precision fixed in the graph "
                       "(default fp32)")
    graph.add_argument("--opset", type=_opset, default=OPSET_DEFAULT, metavar="N",
                       help=f"ONNX opset, {OPSET_MIN} to {OPSET_MAX} (default {OPSET_DEFAULT}, which TensorRT parses)")
    graph.add_argument("--frozen-scalings", action="store_true", help="also write OUT.frozen.onnx, the "
                       "single-pass graph that takes scalings as an input (both graphs then share OUT.onnx.data)")
    graph.add_argument("--external-data", action="store_true", help="store weights in OUT.onnx.data (automatic "
                       "above 2 GB and with --frozen-scalings)")
    graph.add_argument("--all-logits", action="store_true", help="output the logits of every position (for "
                       "scoring); by default only the last position's, which is what generation needs")
    graph.add_argument("--attention", choices=C.ATTENTIONS, default=C.ATTENTION_ONNX, help="onnx: attention as "
                       "plain ONNX ops, for every runtime (default); gqa: ONNX Runtime's GroupQueryAttention, whose "
                       "cache the runtime updates in place (faster decode, less growth with the context; ONNX "
                       "Runtime only: not TensorRT, OpenVINO or Triton's other backends)")
    graph.add_argument("--max-batch", type=positive_int, default=8, metavar="N", help="TensorRT profile hint "
                       "recorded in the metadata, at least 1 (default 8)")
    quant = parser.add_argument_group("quantization (the float graph is exported and validated first, then "
                                      "quantized and measured against it)")
    quant.add_argument("--quantize", choices=QUANTIZE, help="quantize the base model's projection MatMuls of both "
                       "graphs: int8 (dynamic: int8 weights, activations quantized per call) or int4 (weight-only, "
                       "ONNX Runtime's MatMulNBits; fp32 or fp16 exports), and lm_head in int4; in int4 the classifier "
                       "and LoRA A/B in 8 bits, in int8 float")
    quant.add_argument("--block-size", type=_block_size, metavar="N", help="int4: weights per scale along the "
                       "input dimension, a power of two >= 16 (default 32)")
    quant.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, help="quantize lm_head too (a "
                       "tied embedding keeps its float table for the lookup); default: yes in int4, no in int8")
    quant.add_argument("--quantize-embedding", action="store_true", default=None, help="int4: the embedding "
                       "lookup too, through the table's int4 blocks (GatherBlockQuantized; a tied table: lm_head's "
                       "blocks, with lm_head quantized, and no float copy); default: float lookup")
    quant.add_argument("--quantize-lora", action=argparse.BooleanOptionalAction, help="int4: the LoRA A/B and "
                       "classifier MatMuls in 8 bits (MatMulNBits); default: yes in int4")
    quant.add_argument("--min-agreement", type=_fraction, metavar="X", help="fail when a quantized graph's "
                       "teacher-forced top-1 tokens agree with the float graph's at fewer than this fraction of the "
                       "positions, 0..1 (default 0: only a clearly broken graph fails, one whose logits are no "
                       "closer to the float graph's than unrelated logits)")
    check = parser.add_argument_group("validation")
    check.add_argument("--atol", type=positive_float, metavar="X", help="logits tolerance, > 0 (default: the "
                       "larger of 1e-4 and 5e-5 x the largest |logit| in fp32, of 5e-2 and 5e-3 x it in fp16)")
    check.add_argument("--atol-scalings", type=positive_float, metavar="X", help="scalings tolerance, > 0 "
                       "(default: 1e-5 in fp32, 1e-2 in fp16, times (layers x hidden / 128) ** 0.6 when above 1)")
    check.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check against the "
                       "eager model")
    check.add_argument("--steps", type=positive_int, default=8, metavar="N", help="decode steps of the "
                       "validation, at least 1 (default 8)")
    out = parser.add_argument_group("output")
    out.add_argument("--force", action="store_true", help="overwrite existing output files")
    out.add_argument("-q", "--quiet", action="store_true", help="print no progress and no summary: only the "
                     "'wrote OUT.onnx' line on stdout, and errors and warnings on stderr")
    return parser


def format_report(report: ExportReport) -> str:
    """The summary printed at the end of an export."""
    lines = ["", "inputs:"]
    lines += [f"  {n:34s} {t:8s} {d}" for n, t, d in _squash(report.inputs)]
    lines += ["outputs:"]
    lines += [f"  {n:34s} {t:8s} {d}" for n, t, d in _squash(report.outputs)]
    ops = ", ".join(f"{op} {n}" for op, n in report.op_counts.items())
    lines += [f"ops ({sum(report.op_counts.values())} nodes): {ops}"]
    lines += [f"size: {report.size_bytes / 1e6:.2f} MB in {len(report.files)} file(s) beside each other: "
              + ", ".join(os.path.basename(f) for f in report.files)]
    if report.validation_skipped:
        lines += [f"VALIDATION SKIPPED: {report.validation_skipped}"]
    for kind, result in report.parity.items():
        figures = ", ".join(f"{k} {v:.2e} (tolerance {result.tolerances[k]:.1e})" for k, v in result.max_diff.items())
        ties = (f"; logits of {result.skipped_positions} position(s) not compared, after the graph's top-k kept "
                f"other near-tied experts") if result.skipped_positions else ""
        graph = f"float {kind}" if report.quantization else kind  # the quantized graphs' reference
        lines += [f"parity ({graph} graph vs eager, prefill + {result.steps} decode steps, every top_k): max abs "
                  f"diff {figures}; greedy tokens agree{ties}"]
    if report.quantization is not None:
        lines += report.quantization.lines()
    if report.tensorrt_findings:
        lines += [f"TensorRT readiness: {len(report.tensorrt_findings)} finding(s):"]
        groups: dict[tuple[str, str], list[str]] = {}  # (op, reason) -> nodes: 305 MatMulNBits are one line
        for f in report.tensorrt_findings:
            groups.setdefault((f.op_type, f.reason), []).append(f.node or "<unnamed>")
        for (op, reason), nodes in groups.items():
            where = nodes[0] if len(nodes) == 1 else f"{len(nodes)} nodes ({nodes[0]}, ...)"
            lines += [f"  {op} {where}: {reason}"]
    else:
        lines += ["TensorRT readiness: nothing flagged"]
    return "\n".join(lines)


def _check_quantize_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The quantization options that mean nothing without --quantize (or with int8) are usage errors."""
    given = [name for name, value in (("--block-size", args.block_size), ("--quantize-lm-head", args.quantize_lm_head),
                                      ("--quantize-embedding", args.quantize_embedding),
                                      ("--quantize-lora", args.quantize_lora),
                                      ("--min-agreement", args.min_agreement)) if value is not None]
    if given and not args.quantize:
        parser.error(f"{given[0]} needs --quantize (int8 or int4)")
    if args.block_size is not None and args.quantize != "int4":
        parser.error("--block-size applies to --quantize int4 only (int8 has one scale per column)")
    for flag, value in (("--quantize-embedding", args.quantize_embedding), ("--quantize-lora", args.quantize_lora)):
        if value and args.quantize != "int4":
            parser.error(f"{flag} applies to --quantize int4 only")


def _squash(values: list) -> list:
    """Collapse the per-block cache names into one line per cache kind."""
    out, seen = [], set()
    for name, dtype, dims in values:
        parts = name.split(".")
        key = f"{parts[0]}.{{i}}.{parts[2]}" if len(parts) == 3 and parts[1].isdigit() else name
        if key not in seen:
            seen.add(key)
            out.append((key, dtype, dims))
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-export", build_parser, _export, argv, check=_check_quantize_options)


def _export(args: argparse.Namespace) -> int:
    """The export of `main`, once the arguments are parsed. Ctrl-C says whether OUT.onnx was written: the
    progress calls raise a Ctrl-C that a destructor swallowed again, and the last one comes before anything is
    renamed into place."""
    written = False  # the export renamed OUT.onnx into place
    try:
        import transformers

        from .export import ExportOptions, export

        transformers.utils.logging.disable_progress_bar()
        start = time.perf_counter()  # progress times count from here, after the imports

        def progress(message: str) -> None:
            raise_if_interrupted()
            if not args.quiet:
                print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

        quantize = None
        if args.quantize:
            from .quantize import QuantizeOptions

            quantize = QuantizeOptions(args.quantize, lm_head=args.quantize_lm_head, embedding=args.quantize_embedding,
                                       lora=args.quantize_lora)
            quantize.block_size = args.block_size or quantize.block_size
            quantize.min_agreement = quantize.min_agreement if args.min_agreement is None else args.min_agreement
        options = ExportOptions(dtype=args.dtype, opset=args.opset, frozen_scalings=args.frozen_scalings,
                                all_logits=args.all_logits, attention=args.attention,
                                atol=args.atol, atol_scalings=args.atol_scalings,
                                validate=not args.no_validate, force=args.force,
                                external_data=args.external_data, base_model=args.base_model,
                                validation_steps=args.steps, max_batch=args.max_batch, quantize=quantize)
        report = export(args.model_dir, args.out, options, progress)
        written = True
        if args.quiet:
            if report.validation_skipped:
                print(f"xlora-export: warning: validation skipped: {report.validation_skipped}", file=sys.stderr)
        else:
            print(format_report(report))
        print(f"wrote {os.path.abspath(args.out)} ({C.METADATA_KEY} metadata v{C.FORMAT_VERSION})")
        return 0
    except KeyboardInterrupt:
        raise Interrupted(f" after writing {args.out}" if written else f"; {args.out} was not written") from None


if __name__ == "__main__":
    raise SystemExit(main())
