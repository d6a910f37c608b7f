"""`xlora-export MODEL_DIR OUT.onnx`: export an X-LoRA checkpoint to one validated ONNX graph.

MODEL_DIR is any checkpoint the reference model reads (this project's format, original xlora,
PEFT X-LoRA). The base model is the checkpoint's `base_model_id` when that is a local folder
(relative to the checkpoint or the working directory), or --base-model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from xlora_runtime import contract as C

from .errors import XLoraError
from .export import DTYPES, ExportOptions, ExportReport, export


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlora-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="X-LoRA checkpoint folder")
    parser.add_argument("out", metavar="OUT.onnx", help="graph to write (companions are written beside it)")
    src = parser.add_argument_group("source")
    src.add_argument("--base-model", metavar="PATH", help="base model folder (default: the checkpoint's "
                     "base_model_id)")
    graph = parser.add_argument_group("graph")
    graph.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="precision fixed in the graph "
                       "(default fp32)")
    graph.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17, which TensorRT parses)")
    graph.add_argument("--frozen-scalings", action="store_true", help="also write OUT.frozen.onnx, the "
                       "single-pass graph that takes scalings as an input")
    graph.add_argument("--external-data", action="store_true", help="store weights in OUT.onnx.data (automatic "
                       "above 2 GB)")
    graph.add_argument("--max-batch", type=int, default=8, help="TensorRT profile hint recorded in the metadata "
                       "(default 8)")
    check = parser.add_argument_group("validation")
    check.add_argument("--atol", type=float, help="logits tolerance (default 1e-4 fp32, 5e-2 fp16; scalings "
                       "1e-5 / 1e-2)")
    check.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime check against the "
                       "eager model")
    check.add_argument("--steps", type=int, default=8, help="decode steps of the validation (default 8)")
    out = parser.add_argument_group("output")
    out.add_argument("--force", action="store_true", help="overwrite existing output files")
    out.add_argument("-q", "--quiet", action="store_true", help="print only the summary")
    return parser


def format_report(report: ExportReport) -> str:
    """The summary printed at the end of an export."""
    lines = ["", "inputs:"]
    lines += [f"  {n:34s} {t:8s} {d}" for n, t, d in _squash(report.inputs)]
    lines += ["outputs:"]
    lines += [f"  {n:34s} {t:8s} {d}" for n, t, d in _squash(report.outputs)]
    ops = ", ".join(f"{op} {n}" for op, n in report.op_counts.items())
    lines += [f"ops ({sum(report.op_counts.values())} nodes): {ops}"]
    lines += [f"size: {report.size_bytes / 1e6:.2f} MB in {len(report.files)} file(s):"]
    lines += [f"  {f}" for f in report.files]
    if report.validation_skipped:
        lines += [f"VALIDATION SKIPPED: {report.validation_skipped}"]
    for kind, result in report.parity.items():
        figures = ", ".join(f"{k} {v:.2e}" for k, v in result.max_diff.items())
        lines += [f"parity ({kind} graph vs eager, prefill + {result.steps} decode steps): max abs diff {figures}"]
    if report.tensorrt_findings:
        lines += [f"TensorRT readiness: {len(report.tensorrt_findings)} finding(s):"]
        lines += [f"  {f}" for f in report.tensorrt_findings]
    else:
        lines += ["TensorRT readiness: nothing flagged"]
    return "\n".join(lines)


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
    """Run the command; returns the exit code (0 ok, 1 user error, 130 interrupted)."""
    args = build_parser().parse_args(argv)
    options = ExportOptions(dtype=args.dtype, opset=args.opset, frozen_scalings=args.frozen_scalings,
                            atol=args.atol, validate=not args.no_validate, force=args.force,
                            external_data=args.external_data, base_model=args.base_model,
                            validation_steps=args.steps, max_batch=args.max_batch)
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)

    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        report = export(args.model_dir, args.out, options, progress)
    except XLoraError as e:
        print(f"xlora-export: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xlora-export: interrupted; {args.out} was not written", file=sys.stderr)
        return 130
    print(format_report(report))
    print(f"wrote {os.path.abspath(args.out)} ({C.METADATA_KEY} metadata v{C.FORMAT_VERSION})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
