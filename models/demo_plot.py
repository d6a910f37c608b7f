"""The demo's headline picture: X-LoRA's scalings token by token over a chat that switches task at every turn.

    python -m models.demo_plot                     # writes docs/xlora-demo-scalings.png from models/xlora-demo

It exports the checkpoint (a temporary folder), generates the last answer with the torch-free runtime logging the
scalings, and draws every position (prompt and answer) with `xlora-plot-scalings`' code, averaged over modules.
The same by hand:

    xlora-export models/xlora-demo demo.onnx --frozen-scalings --force
    xlora-generate demo.onnx "$(python -m models.demo_plot --print-prompt)" --log-scalings run
    xlora-plot-scalings run docs/xlora-demo-scalings.png --include-prompt
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from models.demo import chat_prompt
from models.demo_eval import DEFAULT_MODEL, MAX_NEW_TOKENS, export_graph
from xlora_export import XLoraError

DOCS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs")
DEFAULT_OUT = os.path.join(DOCS, "xlora-demo-scalings.png")
# Three answered turns of three tasks, then a question of the fourth: (task, question, answer).
SWITCH_TURNS = (("spell", "spell: 305", "three zero five"), ("reverse", "reverse: cat fish moon", "moon fish cat"),
                ("brackets", "close: ( [ { < (", ") > } ] )"))
SWITCH_QUESTION = ("translate", "translate: big red runs")


def switch_prompt() -> str:
    """The chat of `SWITCH_TURNS` then `SWITCH_QUESTION`, rendered as the chat template does."""
    return chat_prompt([(q, a) for _, q, a in SWITCH_TURNS], SWITCH_QUESTION[1])


def plot(model_dir: str, out: str) -> tuple[str, str]:
    """Export `model_dir`, generate the switching chat's answer with the runtime and draw its scalings to `out`;
    returns (out, the generated answer)."""
    from xlora_runtime import Generator, XLoraSession
    from xlora_runtime.plot import plot_scalings, row_scalings
    from xlora_runtime.scalings_log import load_scalings_arrays, load_tokens_record

    with tempfile.TemporaryDirectory(prefix="xlora-demo-plot-") as tmp:
        graph = os.path.join(tmp, "demo.onnx")
        export_graph(model_dir, graph)
        session = XLoraSession(graph, provider="cpu", threads=2)
        generator = Generator(session)
        generator.log_scalings = True
        [result] = generator.generate(switch_prompt(), max_new_tokens=MAX_NEW_TOKENS, expert_top_k=0)
        log_path = os.path.join(tmp, "run")
        generator.flush_log_scalings(log_path)
        record = load_tokens_record(log_path)
        values, labels = row_scalings(load_scalings_arrays(log_path), 0, True, record)
        tasks = " -> ".join([t for t, _, _ in SWITCH_TURNS] + [SWITCH_QUESTION[0]])
        plot_scalings(values, out, session.info.expert_names, labels,
                      title=f"xlora-demo: scalings per token (mean over {values.shape[1]} modules), a chat of "
                            f"{tasks}")
    return out, result.text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.demo_plot", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL, help="the demo checkpoint (default: the "
                        "committed models/xlora-demo)")
    parser.add_argument("--out", default=DEFAULT_OUT, help="PNG to write (default docs/xlora-demo-scalings.png)")
    parser.add_argument("--print-prompt", action="store_true", help="only print the switching chat prompt")
    args = parser.parse_args(argv)
    if args.print_prompt:
        print(switch_prompt())
        return 0
    import transformers

    transformers.utils.logging.disable_progress_bar()
    try:
        out, answer = plot(args.model_dir, args.out)
    except XLoraError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(f"answer: {answer!r}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
