"""Command-line tools of the runtime (no torch needed).

`xlora-generate OUT.onnx PROMPT [PROMPT ...]`: generate with an exported graph (a thin command over `Generator`).
`xlora-plot-scalings LOG_PATH OUT.png`: draw a generation's scalings log as a token-by-expert heatmap.

Both run on `commands.run`: a user error (`XLoraError`) or a file-system error is one line on stderr and exit
code 1, a usage error exit code 2, Ctrl-C one line and exit code 130; `generate_main` and `plot_main` take
`argv` and return the exit code, so tests call them in-process. Only the standard library is imported at module
level: numpy and onnxruntime are imported inside the error handling (Ctrl-C while they load is one line too).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from typing import TYPE_CHECKING, Any

from .commands import add_session_options, check_output_folder, run, session_options
from .errors import XLoraError
from .format import contract as C

if TYPE_CHECKING:
    from .generation import TokenEvent
    from .session import XLoraSession

__all__ = ["build_generate_parser", "build_plot_parser", "generate_main", "plot_main"]


# ----------------------------------------------------------------------------------------------- xlora-generate
def build_generate_parser() -> argparse.ArgumentParser:
    """The options of `xlora-generate`, grouped by concern (imports onnxruntime: the defaults are `stream`'s)."""
    from .generation import Generator

    defaults = {name: p.default for name, p in inspect.signature(Generator.stream).parameters.items()}
    parser = argparse.ArgumentParser(
        prog="xlora-generate", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate with a graph exported by xlora-export (ONNX Runtime, OpenVINO or a TensorRT engine; "
                    "no torch). Prints each "
                    "prompt's generated text\n(token ids when no tokenizer travelled with the export), then "
                    "tokens/s and peak cache memory.")
    parser.add_argument("graph", metavar="OUT.onnx", help="main graph written by xlora-export")
    parser.add_argument("prompts", metavar="PROMPT", nargs="+", help="prompt text (several prompts run as one "
                        "left-padded batch)")
    inp = parser.add_argument_group("input")
    inp.add_argument("--ids", action="store_true", help="prompts are comma-separated token ids (e.g. 5,17,42) "
                     "instead of text")
    inp.add_argument("--chat", action="store_true", help="each PROMPT is a user message, rendered with the "
                     "export's chat template (OUT.chat_template.jinja; needs jinja2)")
    inp.add_argument("--system", metavar="TEXT", help="with --chat: a system message before each user message")
    gen = parser.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=int, default=defaults["max_new_tokens"], metavar="N",
                     help=f"new tokens per prompt (default {defaults['max_new_tokens']})")
    gen.add_argument("--sample", action="store_true", help="sample the next token (default: greedy)")
    gen.add_argument("--temperature", type=float, metavar="T", help="softmax temperature, with --sample "
                     f"(default {defaults['temperature']})")
    gen.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep the smallest set of tokens "
                     f"whose probability reaches P, with --sample (default {defaults['top_p']})")
    gen.add_argument("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only, with "
                     "--sample (default: all)")
    gen.add_argument("--min-p", type=float, metavar="P", help="drop tokens less likely than P x the most likely "
                     "one, with --sample (default 0: none)")
    gen.add_argument("--repetition-penalty", type=float, metavar="R", help="divide the positive logits of tokens "
                     "already in the sequence by R, multiply the negative ones (greedy too; default 1: none)")
    gen.add_argument("--min-tokens", type=int, metavar="N", help="the stop ids cannot end a sequence before N new "
                     "tokens (default 0)")
    gen.add_argument("--seed", type=int, help="random seed, for reproducible sampling")
    gen.add_argument("--stop-id", type=int, action="append", default=[], metavar="ID", help="also stop a "
                     "sequence at this token id (repeatable)")
    gen.add_argument("--no-eos", action="store_true", help="never stop at the export's eos token ids")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop a sequence once its "
                     "generated text contains TEXT (repeatable; needs the tokenizer)")
    exp = parser.add_argument_group("experts")
    exp.add_argument("--expert-top-k", type=int, metavar="K", help="experts kept per token and module, 0 = dense "
                     "(default: the model's top_k_lora)")
    exp.add_argument("--freeze-scalings-after", type=int, metavar="K", help="after K decode steps, freeze each "
                     "sequence's scalings at its latest token and continue on OUT.frozen.onnx (0: the prompt's "
                     "last token)")
    add_session_options(parser, "OUT")
    out = parser.add_argument_group("output")
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument("--stream", action="store_true", help="print text as it is generated (several prompts: "
                     "line by line, each prefixed [i])")
    fmt.add_argument("--json", action="store_true", help="print one JSON object per prompt instead: tokens, "
                     "text, finish_reason, scalings (tokens x modules x experts, 4 decimals)")
    out.add_argument("--log-scalings", metavar="PATH", help="write the scalings log to PATH.npy (or PATH-*.npy "
                     "+ PATH-mapping.json) and the generated tokens to PATH-tokens.json, for xlora-plot-scalings")
    return parser


def _prompts(args: argparse.Namespace, session: XLoraSession) -> list[str] | list[list[int]]:
    if args.system is not None and not args.chat:
        raise XLoraError("--system is a chat message: add --chat")
    if args.chat:
        return _chat_prompts(args, session)
    if not args.ids:
        return list(args.prompts)
    prompts = []
    for i, text in enumerate(args.prompts):
        try:
            prompts.append([int(t) for t in text.replace(" ", "").split(",") if t])
        except ValueError:
            raise XLoraError(f"prompt {i}: {text!r} is not a comma-separated list of token ids (--ids)") from None
    return prompts


def _chat_prompts(args: argparse.Namespace, session: XLoraSession) -> list[list[int]]:
    """Each prompt as a one-turn chat (after `--system`), rendered by the export's template and encoded without
    adding special tokens (the template writes them), as transformers' `apply_chat_template` does."""
    from .chat import ChatTemplate

    if args.ids:
        raise XLoraError("--chat and --ids: chat messages are text")
    template = ChatTemplate.of_session(session)
    if template is None:
        raise XLoraError(f"--chat: {args.graph} has no chat template beside it ({C.chat_template_path(args.graph)}; "
                         f"the checkpoint's tokenizer config had none)")
    if session.tokenizer is None:
        raise XLoraError(f"--chat: no tokenizer travelled with {args.graph} ({C.tokenizer_path(args.graph)})")
    system = [] if args.system is None else [{"role": "system", "content": args.system}]
    texts = [template.render(system + [{"role": "user", "content": text}]) for text in args.prompts]
    return [session.tokenizer.encode(text, add_special_tokens=False).ids for text in texts]


def _stream_options(args: argparse.Namespace, session: XLoraSession) -> dict[str, Any]:
    """`Generator.stream` keyword arguments from the options (defaults stay `stream`'s own)."""
    if not args.sample and (args.temperature is not None or args.top_p is not None):
        raise XLoraError("--temperature and --top-p apply to sampling: add --sample")
    if not args.sample and (args.top_k is not None or args.min_p is not None):
        raise XLoraError("--top-k and --min-p apply to sampling: add --sample")
    options: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=args.sample, seed=args.seed,
                                   stop_strings=list(args.stop), expert_top_k=args.expert_top_k,
                                   freeze_scalings_after=args.freeze_scalings_after)
    if args.temperature is not None:
        options["temperature"] = args.temperature
    if args.top_p is not None:
        options["top_p"] = args.top_p
    for name in ("top_k", "min_p", "repetition_penalty", "min_tokens"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.no_eos or args.stop_id:
        options["stop_token_ids"] = ([] if args.no_eos else session.info.eos_token_ids) + list(args.stop_id)
    return options


def _check_log_path(path: str) -> None:
    if os.path.splitext(path)[1] == ".npy":
        raise XLoraError(f"--log-scalings {path}: give the path without extension (PATH.npy is written)")
    check_output_folder("--log-scalings", path)


class _Printer:
    """`--stream` output: one prompt prints its pieces as they come; several print whole lines, prefixed [i]."""

    def __init__(self, count: int, has_text: bool) -> None:
        self.several = count > 1
        self.has_text = has_text
        self.lines = [""] * count

    def __call__(self, event: TokenEvent) -> None:
        piece = event.text if self.has_text else f"{event.token}" + ("" if event.finish_reason else ",")
        if not self.several:
            sys.stdout.write(piece + ("\n" if event.finish_reason else ""))
            sys.stdout.flush()
            return
        *done, self.lines[event.sequence] = (self.lines[event.sequence] + piece).split("\n")
        if event.finish_reason:
            done.append(self.lines[event.sequence])
        for line in done:
            print(f"[{event.sequence}] {line}", flush=True)


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def _generate(args: argparse.Namespace) -> int:
    import numpy as np

    from .generation import Generator
    from .session import XLoraSession

    if args.log_scalings:
        _check_log_path(args.log_scalings)
    session = XLoraSession(args.graph, **session_options(args))
    generator = Generator(session)
    generator.log_scalings = bool(args.log_scalings)
    prompts, options = _prompts(args, session), _stream_options(args, session)
    has_text = session.tokenizer is not None
    encoded = generator.encode(prompts)  # validated before anything runs; `generate` takes the ids
    printer = _Printer(len(encoded), has_text) if args.stream else None
    start = time.perf_counter()
    results = generator.generate(encoded, on_token=printer, **options)
    elapsed = time.perf_counter() - start
    capped = [i for i, r in enumerate(results) if r.finish_reason == "max_positions"]
    if capped:
        print(f"xlora-generate: note: generation stopped at the model's max_position_embeddings "
              f"({session.info.max_positions} positions) after {len(results[capped[0]].tokens)} of "
              f"{args.max_new_tokens} new tokens (prompt{'s' if len(capped) > 1 else ''} "
              f"{', '.join(map(str, capped))}; longest prompt {max(len(ids) for ids in encoded)} tokens)",
              file=sys.stderr)
    if args.json:
        for i, r in enumerate(results):
            print(json.dumps(dict(prompt=i, tokens=r.tokens, text=r.text, finish_reason=r.finish_reason,
                                  scalings=np.round(r.scalings.astype(np.float64), 4).tolist())))
    else:
        if not args.stream:
            for i, r in enumerate(results):
                body = r.text if has_text else ",".join(map(str, r.tokens))
                print(body if len(results) == 1 else f"[{i}] {body}")
        count = sum(len(r.tokens) for r in results)
        print(f"{count} tokens in {elapsed:.2f} s: {count / max(elapsed, 1e-9):.1f} tokens/s, peak cache "
              f"{_format_bytes(generator.peak_cache_bytes)} ({session.provider})")
    if args.log_scalings:  # the optional file after the results: a write that fails loses no generated text
        sys.stdout.flush()
        written = generator.flush_log_scalings(args.log_scalings)
        if not args.json:  # --json prints JSON lines only
            for path in written:
                print(f"wrote {path}")
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    """`xlora-generate`; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-generate", build_generate_parser, _generate, argv)


# ------------------------------------------------------------------------------------------ xlora-plot-scalings
def build_plot_parser() -> argparse.ArgumentParser:
    """The options of `xlora-plot-scalings`, grouped by concern."""
    parser = argparse.ArgumentParser(
        prog="xlora-plot-scalings", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Draw the scalings of one generated sequence as a heatmap (tokens across, experts down).\n\n"
                    "LOG_PATH is a scalings log (xlora-generate --log-scalings, Generator.flush_log_scalings, or the\n"
                    "eager model's flush_log_scalings): per generate call the prefill, then one entry per decode\n"
                    "step holding every row in prompt order. Each column is the scalings that chose the token it is\n"
                    "labelled with: the prefill's last position, then the decode steps (--include-prompt: every\n"
                    "prompt position first); rows may freeze at different steps. With LOG_PATH-tokens.json beside\n"
                    "the log (the runtime writes it), the labels are the tokens' text and --call picks the call;\n"
                    "without it, the first call is read and a row ends where it is NaN (finished) or missing.")
    parser.add_argument("log", metavar="LOG_PATH", help="scalings log path, without extension")
    parser.add_argument("out", metavar="OUT.png", help="PNG to write")
    sel = parser.add_argument_group("selection")
    sel.add_argument("--row", type=int, default=0, help="prompt index, its row in every entry (default 0)")
    sel.add_argument("--call", type=int, metavar="N", help="which generate call of the log (default 0; needs "
                     "LOG_PATH-tokens.json)")
    sel.add_argument("--include-prompt", action="store_true", help="also plot the prompt's positions (left "
                     "padding skipped when LOG_PATH-tokens.json gives the prompt)")
    sel.add_argument("--module", type=int, metavar="I", help="plot scaled module I (0..L-1) only (default: the "
                     "mean over modules)")
    lab = parser.add_argument_group("labels")
    lab.add_argument("--experts", metavar="A,B,C", help="expert names, comma separated (default: from "
                     "LOG_PATH-tokens.json, else expert 0..n-1)")
    lab.add_argument("--title", help="figure title (default: says which module, or the mean)")
    return parser


def _plot(args: argparse.Namespace) -> int:
    from .plot import plot_scalings, row_scalings
    from .scalings_log import load_scalings_arrays, load_tokens_record

    log = load_scalings_arrays(args.log)
    record = load_tokens_record(args.log)
    values, labels = row_scalings(log, args.row, args.include_prompt, record, args.call)
    n_experts = values.shape[-1]
    if args.experts is not None:
        experts = [name.strip() for name in args.experts.split(",")]
        if len(experts) != n_experts:
            raise XLoraError(f"--experts {args.experts}: {len(experts)} names for {n_experts} experts")
    else:
        experts = (record or {}).get("expert_names") or [f"expert {j}" for j in range(n_experts)]
    module_names = (record or {}).get("module_names") or []
    module_name = module_names[args.module] if args.module is not None and 0 <= args.module < len(module_names) \
        else None
    path = plot_scalings(values, args.out, experts, labels, args.module, module_name, args.title)
    print(path)
    return 0


def plot_main(argv: list[str] | None = None) -> int:
    """`xlora-plot-scalings`; returns the exit code (0 ok, 1 user error, 2 usage error, 130 interrupted)."""
    return run("xlora-plot-scalings", build_plot_parser, _plot, argv)


if __name__ == "__main__":
    raise SystemExit(generate_main())
