"""`xlora-parity MODEL_DIR OUT.onnx`: the eager model against the deployed runtime, before you ship.

For several `top_k` values, a batch of prompts of different lengths (left padded) is generated
greedily by both: the eager model (torch, its two caches) and `xlora_runtime` (no torch; ONNX
Runtime by default, or `--provider`: CUDA, TensorRT, OpenVINO, a TensorRT engine). At every step
it compares the chosen tokens, the logits and the scalings (those of the position that chose the
token). Prints a table, writes a JSON report.

Exit codes: 0 every case passed, 1 a case failed or a user error (one line on stderr), 2 usage error,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from xlora_runtime.backends import PROVIDERS
from xlora_runtime.commands import check_output_folder, device_arg, integer, positive_float, positive_int, run
from xlora_runtime.format import contract as C

from .errors import XLoraError

if TYPE_CHECKING:
    import numpy as np

    from xlora_runtime import XLoraSession
    from xlora_runtime.format.record import GraphInfo

    from .checkpoints import Checkpoint
    from .model import xLoRAModel

# Only the standard library above (and XLoraError): torch, transformers, numpy and onnxruntime are imported
# inside the functions and main's try, so that Ctrl-C at any moment is "interrupted", exit 130.

__all__ = ["ParityCase", "check_graph_source", "eager_greedy", "main", "run_parity"]


@dataclass
class ParityCase:
    """One prompt at one top_k: did the runtime reproduce the eager model?"""

    top_k: int
    prompt: int
    prompt_len: int
    steps: int
    tokens_equal: bool
    first_divergence: int | None  # step of the first different token
    logits_max_diff: float  # over the steps up to the first divergence (inclusive)
    scalings_max_diff: float
    passed: bool


def eager_greedy(model: xLoRAModel, prompts: list[list[int]], steps: int, expert_top_k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy decoding with the eager model's two caches (`xLoRAModel.decode`).

    Returns:
        tokens (b, steps), logits (b, steps, vocab), scalings (b, steps, L, n): per step, those of the
        position that chose the token.
    """
    import torch

    from .generation import left_pad

    ids, mask = left_pad(prompts)
    run = list(model.decode(ids, mask, steps, expert_top_k=expert_top_k))
    return (torch.stack([s.next_tokens for s in run], 1).numpy(),
            torch.stack([s.logits[:, -1].float() for s in run], 1).numpy(),
            torch.stack([s.scalings[:, -1].float() for s in run], 1).numpy())


def _first_difference(in_graph: list[str], in_checkpoint: list[str]) -> tuple[str, object, object]:
    """(where, graph's item, checkpoint's item) of the first difference between two orderings."""
    for i, (a, b) in enumerate(zip(in_graph, in_checkpoint)):
        if a != b:
            return f" at index {i}:", a, b
    return " count:", len(in_graph), len(in_checkpoint)


def check_graph_source(checkpoint: Checkpoint, info: GraphInfo, model: xLoRAModel | None = None) -> None:
    """Raise XLoraError naming the first difference between what the graph's metadata records and the checkpoint
    (and, once built, its model): expert order, config fields, module order, classifier weights, base shapes."""

    def differ(what: str, in_graph: object, in_checkpoint: object) -> XLoraError:
        return XLoraError(f"{info.path} was not exported from {checkpoint.directory}: {what} {in_graph!r} in the "
                          f"graph, {in_checkpoint!r} in the checkpoint")

    if info.expert_names != list(checkpoint.adapters):
        where, a, b = _first_difference(info.expert_names, list(checkpoint.adapters))
        raise differ("expert ordering" + where, a, b)
    saved = checkpoint.config.to_dict()
    for key, value in info.config.items():
        if key in saved and saved[key] != value:
            raise differ(f"config field {key!r}:", value, saved[key])
    modules = (None if checkpoint.ordering is None else
               sorted(checkpoint.ordering["modules"], key=checkpoint.ordering["modules"].get))
    if model is not None:
        modules = model.module_names
    if modules is not None and info.module_names != modules:
        where, a, b = _first_difference(info.module_names, modules)
        raise differ("module ordering" + where, a, b)
    digest = info.classifier_sha256
    if digest is not None and digest != checkpoint.classifier_digest():
        raise differ("classifier weights (sha256)", digest[:16], checkpoint.classifier_digest()[:16])
    if model is None:
        return
    cfg = model.config
    for key, in_graph, value in (("num_layers", info.num_layers, cfg.num_hidden_layers),
                                 ("num_key_value_heads", info.kv_heads, cfg.num_key_value_heads),
                                 ("hidden_size", info.hidden_size, cfg.hidden_size),
                                 ("vocab_size", info.vocab_size, cfg.vocab_size)):
        if in_graph != value:
            raise differ(f"base model {key}", in_graph, value)


def run_parity(model: xLoRAModel, session: XLoraSession, prompts: list[list[int]], steps: int,
               top_ks: list[int], atol_logits: float | None, atol_scalings: float) -> tuple[list[ParityCase], float]:
    """Compare eager and runtime on every (top_k, prompt).

    Returns:
        The cases, and the logits tolerance applied: `atol_logits`, or by default the exporter's
        (`validate.tolerance`: it scales with the largest |eager logit|).
    """
    import numpy as np

    from xlora_runtime import Generator

    from .validate import tolerance

    generator = Generator(session)
    runs = [(top_k, *eager_greedy(model, prompts, steps, top_k)) for top_k in top_ks]
    if atol_logits is None:
        magnitude = max(float(np.abs(logits).max()) for _, _, logits, _ in runs)
        atol_logits = tolerance(session.info.dtype, C.LOGITS, magnitude)
    cases = []
    for top_k, tokens, logits, scalings in runs:
        results = generator.generate(prompts, max_new_tokens=steps, stop_token_ids=[], expert_top_k=top_k,
                                     return_logits=True)
        for i, result in enumerate(results):
            got = np.array(result.tokens)
            differ = np.nonzero(got != tokens[i, :len(got)])[0]
            first = int(differ[0]) if len(differ) else (len(got) if len(got) != steps else None)
            upto = min(first + 1, len(got)) if first is not None else steps
            dl = float(np.abs(result.logits[:upto] - logits[i, :upto]).max())
            ds = float(np.abs(result.scalings[:upto] - scalings[i, :upto]).max())
            equal = first is None
            cases.append(ParityCase(top_k, i, len(prompts[i]), steps, equal, first, dl, ds,
                                    equal and dl <= atol_logits and ds <= atol_scalings))
    return cases, atol_logits


def format_table(cases: list[ParityCase], atol_logits: float, atol_scalings: float) -> str:
    """The readable report."""
    lines = [f"{'top_k':>5} {'prompt':>6} {'len':>4} {'steps':>5} {'tokens':>8} {'logits diff':>12} "
             f"{'scalings diff':>13}  result",
             "-" * 70]
    for c in cases:
        tokens = "equal" if c.tokens_equal else f"step {c.first_divergence}"
        lines.append(f"{c.top_k:>5} {c.prompt:>6} {c.prompt_len:>4} {c.steps:>5} {tokens:>8} "
                     f"{c.logits_max_diff:>12.2e} {c.scalings_max_diff:>13.2e}  {'ok' if c.passed else 'FAIL'}")
    failed = sum(not c.passed for c in cases)
    lines.append("-" * 70)
    lines.append(f"{len(cases) - failed}/{len(cases)} passed (tolerances: logits {atol_logits:g}, "
                 f"scalings {atol_scalings:g}; tokens must be identical)")
    return "\n".join(lines)


def _int_list(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated integers, each at least `minimum`."""

    def parse(text: str) -> list[int]:
        values = [integer(part.strip()) for part in text.split(",") if part.strip()]
        if not values:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
        bad = [v for v in values if v < minimum]
        if bad:
            raise argparse.ArgumentTypeError(f"expected integers >= {minimum}, got {bad[0]}")
        return values

    return parse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlora-parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the X-LoRA checkpoint that was exported")
    parser.add_argument("graph", metavar="OUT.onnx", help="the exported graph (or OUT.engine, its TensorRT engine)")
    parser.add_argument("--base-model", metavar="PATH", help="base model folder (default: the checkpoint's)")
    parser.add_argument("--prompt", action="append", help="a text prompt (repeatable; needs the tokenizer); "
                        "default: random ids of lengths --lengths")
    parser.add_argument("--lengths", type=_int_list(1), default=[3, 11, 24], metavar="A,B,...",
                        help="lengths of the default random prompts, each at least 1 (default 3,11,24)")
    parser.add_argument("--steps", type=positive_int, default=16, metavar="N",
                        help="greedy steps per prompt, at least 1 (default 16)")
    parser.add_argument("--top-k", type=_int_list(0), default=None, metavar="K,...",
                        help="comma-separated top_k values, 0 = dense (default: 0, 1 and n)")
    parser.add_argument("--atol-logits", type=positive_float, metavar="X",
                        help="logits tolerance, > 0 (default: xlora-export's, the larger of 1e-4 and 5e-5 x the "
                        "largest |logit| in fp32)")
    parser.add_argument("--atol-scalings", type=positive_float, metavar="X",
                        help="scalings tolerance, > 0 (default: xlora-export's, 1e-5 in fp32 times (layers x "
                        "hidden / 128) ** 0.6 when above 1)")
    parser.add_argument("--provider", choices=list(PROVIDERS), help="where the runtime runs the graph: ONNX "
                        "Runtime's cpu, cuda or tensorrt execution provider, openvino, or trt-engine (OUT.engine "
                        "built by xlora-engine; then give OUT.engine as the graph); default trt-engine for an .engine "
                        "file, else cpu")
    parser.add_argument("--device", metavar="D", help="OpenVINO device (default CPU), or the GPU index (default 0)")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the parity suite; returns the exit code (0 every case passed, 1 a case failed or a user error,
    2 usage error, 130 interrupted)."""
    return run("xlora-parity", build_parser, _parity, argv)


def _parity(args: argparse.Namespace) -> int:
    """The parity suite of `main`, once the arguments are parsed."""
    import torch
    import transformers

    from xlora_runtime import Generator, XLoraSession

    from .checkpoints import read_checkpoint
    from .validate import TOLERANCES, size_factor, tolerance, validation_prompts
    from .xlora_utils import load_model

    if args.json is not None:  # before minutes of work, not after
        check_output_folder("--json", args.json)
    transformers.utils.logging.disable_progress_bar()
    session = XLoraSession(args.graph, provider=args.provider, device=device_arg(args.device))
    dtype = session.info.dtype
    if dtype not in TOLERANCES:
        raise XLoraError(f"{args.graph}: a {dtype} graph cannot be fed from numpy on this runtime")
    quantized = session.info.quantization
    if quantized is not None:
        raise XLoraError(f"{args.graph}: an {quantized.mode} graph; xlora-parity holds float graphs to the eager "
                         f"model's tolerances (the export measured this one against its float graph)")
    checkpoint = read_checkpoint(args.model_dir, base_model=args.base_model)
    check_graph_source(checkpoint, session.info)
    model = load_model(checkpoint, dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype])[0]
    check_graph_source(checkpoint, session.info, model)
    if args.prompt:
        if session.tokenizer is None:
            raise XLoraError("--prompt needs the tokenizer that travels with the export")
        prompts = args.prompt
    else:
        prompts = validation_prompts(session.info.vocab_size, tuple(args.lengths))
    prompts = Generator(session).encode(prompts)  # empty, too long: the runtime's one-line errors, before any run
    n = session.info.n_experts
    top_ks = sorted({0, 1, n}) if args.top_k is None else args.top_k
    for k in top_ks:
        session.check_top_k(k)
    atol_scalings = args.atol_scalings if args.atol_scalings is not None else tolerance(
        dtype, C.SCALINGS, 0.0, size_factor(model.spec.num_layers, model.config.hidden_size))
    cases, atol_logits = run_parity(model, session, prompts, args.steps, top_ks, args.atol_logits, atol_scalings)
    print(format_table(cases, atol_logits, atol_scalings))
    passed = all(c.passed for c in cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"graph": args.graph, "model_dir": args.model_dir, "dtype": dtype, "passed": passed,
                       "tolerances": {C.LOGITS: atol_logits, C.SCALINGS: atol_scalings},
                       "cases": [asdict(c) for c in cases]}, f, indent=2)
    return 0 if passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
