"""`xlora-parity MODEL_DIR OUT.onnx`: the eager model against the deployed runtime, before you ship.

For several `top_k` values, a batch of prompts of different lengths (left padded) is generated
greedily by both: the eager model (torch, its two caches) and `xlora_runtime` (ONNX Runtime,
no torch). At every step it compares the chosen tokens, the logits and the scalings (those of
the position that chose the token). Prints a table, writes a JSON report, exits 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch

from xlora_runtime import Generator, XLoraSession
from xlora_runtime import contract as C

from .errors import XLoraError
from .model import xLoRAModel
from .xlora_utils import load_model

__all__ = ["ParityCase", "eager_greedy", "main", "run_parity"]

TOLERANCES = {"fp32": (1e-4, 1e-5), "fp16": (5e-2, 1e-2)}  # (logits, scalings), SPEC section 8


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


@torch.no_grad()
def eager_greedy(model: xLoRAModel, prompts: list[list[int]], steps: int, top_k: int
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy decoding with the eager model's two caches.

    Returns:
        tokens (b, steps), logits (b, steps, vocab), scalings (b, steps, L, n): per step, those of the
        position that chose the token.
    """
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model(ids, attention_mask=mask, top_k=top_k, use_cache=True)
    tokens, logits, scalings = [], [], []
    for step in range(steps):
        logits.append(out.logits[:, -1].float())
        scalings.append(out.scalings[:, -1].float())
        tokens.append(out.logits[:, -1].argmax(-1))
        if step == steps - 1:
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        out = model(tokens[-1][:, None], attention_mask=mask, cache=out.cache, top_k=top_k, use_cache=True)
    return (torch.stack(tokens, 1).numpy(), torch.stack(logits, 1).numpy(), torch.stack(scalings, 1).numpy())


def run_parity(model: xLoRAModel, session: XLoraSession, prompts: list[list[int]], steps: int,
               top_ks: list[int], atol_logits: float, atol_scalings: float) -> list[ParityCase]:
    """Compare eager and runtime on every (top_k, prompt)."""
    generator = Generator(session)
    cases = []
    for top_k in top_ks:
        tokens, logits, scalings = eager_greedy(model, prompts, steps, top_k)
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
    return cases


def _default_prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lengths]


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xlora-parity", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", metavar="MODEL_DIR", help="the X-LoRA checkpoint that was exported")
    parser.add_argument("graph", metavar="OUT.onnx", help="the exported graph")
    parser.add_argument("--base-model", metavar="PATH", help="base model folder (default: the checkpoint's)")
    parser.add_argument("--prompt", action="append", help="a text prompt (repeatable; needs the tokenizer); "
                        "default: random ids of lengths --lengths")
    parser.add_argument("--lengths", default="3,11,24", help="lengths of the default random prompts "
                        "(default 3,11,24)")
    parser.add_argument("--steps", type=int, default=16, help="greedy steps per prompt (default 16)")
    parser.add_argument("--top-k", default=None, help="comma-separated top_k values (default: 0, 1 and n)")
    parser.add_argument("--atol-logits", type=float, help="logits tolerance (default by dtype: 1e-4 fp32)")
    parser.add_argument("--atol-scalings", type=float, help="scalings tolerance (default by dtype: 1e-5 fp32)")
    parser.add_argument("--provider", default="cpu", help="runtime execution provider: cpu, cuda, tensorrt")
    parser.add_argument("--json", metavar="PATH", help="write the report as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the parity suite; 0 when every case passes, 1 otherwise (or on a user error)."""
    args = build_parser().parse_args(argv)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        session = XLoraSession(args.graph, provider=args.provider)
        dtype = session.info.record["dtype"]
        if dtype not in TOLERANCES:
            raise XLoraError(f"{args.graph}: a {dtype} graph cannot be fed from numpy on this runtime")
        model, tokenizer = load_model(args.model_dir, dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype],
                                      base_model=args.base_model)
        if model.module_names != session.info.module_names or model.adapter_names != session.info.expert_names:
            raise XLoraError(f"{args.graph} was not exported from {args.model_dir} (module or expert orderings "
                             f"differ)")
        if args.prompt:
            if session.tokenizer is None:
                raise XLoraError("--prompt needs the tokenizer that travels with the export")
            prompts = [session.tokenizer.encode(p).ids for p in args.prompt]
        else:
            prompts = _default_prompts(session.info.vocab_size, [int(x) for x in args.lengths.split(",")])
        n = session.info.n_experts
        top_ks = sorted({0, 1, n}) if args.top_k is None else [int(k) for k in args.top_k.split(",")]
        for k in top_ks:
            session.check_top_k(k)
        atol_logits = args.atol_logits if args.atol_logits is not None else TOLERANCES[dtype][0]
        atol_scalings = args.atol_scalings if args.atol_scalings is not None else TOLERANCES[dtype][1]
        cases = run_parity(model, session, prompts, args.steps, top_ks, atol_logits, atol_scalings)
    except XLoraError as e:
        print(f"xlora-parity: error: {e}", file=sys.stderr)
        return 1
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
