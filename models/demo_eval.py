"""Measure the trained demo (`models/xlora-demo`): does each expert know its task, does the classifier route to
it, and does the exported graph keep that?

    python -m models.demo_eval                          # the committed checkpoint, 100 held-out prompts per task
    python -m models.demo_eval MODEL_DIR --count 50 --json demo.json --no-graph

Per task, exact-match accuracy of the greedy answer (prompts "QUESTION =", held out from training) of:
    base               no expert (every scaling 0)
    expert <task>      that expert alone (its scaling 1 in every module, the others 0)
    uniform mix        every expert at 1/n in every module
    X-LoRA             the classifier's scalings, token by token (the eager model)
    ..., after 1-3 chat turns   the task's own expert and X-LoRA on the same questions asked after 1-3 answered
                       lines of random tasks (the chat template's format): the routing has to switch
    X-LoRA, graph      the plain prompts through the exported graph (`xlora-export MODEL OUT.onnx --frozen-scalings`)
                       run by the torch-free runtime (`xlora_runtime.Generator`); one row per graph precision
and the classifier's routing accuracy: a prompt is routed right when the expert with the largest scaling,
averaged over the prompt's tokens and the modules, is its task's (also per token: each prompt token's own
dominant expert, averaged over modules). Prints a table, then one JSON object (also written with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from models.demo import TASKS, chat_set, eval_set, plain_prompt
from xlora_export import XLoraError

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "xlora-demo")
MAX_NEW_TOKENS = 12  # the longest answer is 6 tokens with its eos
# Graph precisions measured through the runtime: (row name, extra xlora-export options). An option missing from
# this checkout's `xlora-export` is reported as not available rather than run.
GRAPH_VARIANTS = (("X-LoRA, graph fp32", ()), ("X-LoRA, graph fp32, --attention gqa", ("--attention", "gqa")),
                  ("X-LoRA, graph int8", ("--quantize", "int8")), ("X-LoRA, graph int4", ("--quantize", "int4")))


@dataclass
class Answers:
    """Greedy answers of one batch of prompts."""

    tokens: list[list[int]]  # generated ids of each prompt, up to and including eos
    texts: list[str]  # the answers' text, eos excluded, stripped
    prefill_scalings: torch.Tensor | None = None  # (b, p, L, n) of the prefill (X-LoRA only)


def answer_text(tokenizer, tokens: list[int], eos: int) -> str:
    """The text of generated tokens up to (not including) the first eos, stripped."""
    cut = tokens.index(eos) if eos in tokens else len(tokens)
    return tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()


@torch.no_grad()
def eager_answers(model, tokenizer, prompts: list[list[int]], scalings: torch.Tensor | None,
                  max_new_tokens: int = MAX_NEW_TOKENS) -> Answers:
    """Greedy generation of a left-padded batch with the eager model.

    Args:
        prompts: token ids of each prompt.
        scalings: (L, n) fixed scalings for every token of every prompt (an expert alone, a mix, or zeros for the
            base), or None for the classifier's per-token scalings.
    """
    from xlora_export.generation import left_pad

    eos = tokenizer.eos_token_id
    ids, mask = left_pad(prompts, tokenizer.pad_token_id)
    fixed = None if scalings is None else scalings.expand(len(prompts), *scalings.shape).contiguous()
    out: list[list[int]] = [[] for _ in prompts]
    prefill = None
    for step in model.decode(ids, mask, max_new_tokens, scalings=fixed, expert_top_k=0):
        if step.step == 0:
            prefill = step.scalings
        for row, token in enumerate(step.next_tokens.tolist()):
            if not out[row] or out[row][-1] != eos:
                out[row].append(token)
        if all(o[-1] == eos for o in out):
            break
    texts = [answer_text(tokenizer, o, eos) for o in out]
    return Answers(out, texts, prefill if scalings is None else None)


def routing(prefill: torch.Tensor, prompts: list[list[int]], expert: int) -> tuple[float, float]:
    """(share of prompts whose scalings, averaged over their tokens and the modules, peak at `expert`;
    share of prompt tokens whose module-averaged scalings peak at `expert`).

    Args:
        prefill: (b, p, L, n) scalings of the left-padded prompts.
    """
    right_prompts, right_tokens, tokens = 0, 0, 0
    width = prefill.shape[1]
    for row, ids in enumerate(prompts):
        per_token = prefill[row, width - len(ids):].mean(1)  # (len, n)
        right_prompts += int(per_token.mean(0).argmax().item() == expert)
        right_tokens += int((per_token.argmax(-1) == expert).sum().item())
        tokens += len(ids)
    return right_prompts / len(prompts), right_tokens / tokens


def export_graph(model_dir: str, out: str, extra: tuple[str, ...] = ()) -> None:
    """`xlora-export MODEL_DIR OUT --frozen-scalings --force -q` (validated against the eager model)."""
    from xlora_export import cli

    code = cli.main([model_dir, out, "--frozen-scalings", "--force", "-q", *extra])
    if code != 0:  # the command has printed its one-line error
        raise SystemExit(code)


def cli_has_option(option: str) -> bool:
    """Whether this checkout's `xlora-export` has `option` (e.g. --quantize, added by another change)."""
    from xlora_export import cli

    return option in cli.build_parser().format_help()


def graph_answers(graph: str, texts: list[str], max_new_tokens: int = MAX_NEW_TOKENS) -> list[list[int]]:
    """Greedy tokens of the runtime (main graph, per-token scalings), stopping at the export's eos."""
    from xlora_runtime import Generator, XLoraSession

    generator = Generator(XLoraSession(graph, provider="cpu", threads=2))
    return [r.tokens for r in generator.generate(texts, max_new_tokens=max_new_tokens, expert_top_k=0)]


def evaluate(model_dir: str, count: int, graph: bool = True, log=print) -> dict:
    """Every measurement of the module docstring; returns the JSON record."""
    from xlora_export.xlora_utils import load_model

    model, tokenizer = load_model(model_dir)
    names = model.adapter_names
    n_modules, n = len(model.module_names), len(names)
    configs: dict[str, torch.Tensor | None] = {"base": torch.zeros(n_modules, n)}
    for i, name in enumerate(names):
        configs[f"expert {name}"] = torch.nn.functional.one_hot(torch.tensor(i), n).float().expand(n_modules, n)
    configs["uniform mix"] = torch.full((n_modules, n), 1.0 / n)
    configs["X-LoRA"] = None
    sets = {task: eval_set(task, count) for task in TASKS}
    texts = {task: [plain_prompt(q) for q, _ in pairs] for task, pairs in sets.items()}
    ids = {task: [tokenizer(t)["input_ids"] for t in texts[task]] for task in TASKS}
    chats = {task: chat_set(task, count) for task in TASKS}
    record: dict = {"model": model_dir, "prompts_per_task": count, "tasks": list(TASKS), "experts": names,
                    "accuracy": {}, "routing": {}, "routing_per_token": {}}
    xlora_tokens = {}
    start = time.perf_counter()
    for row, scalings in configs.items():
        record["accuracy"][row] = {}
        for task in TASKS:
            got = eager_answers(model, tokenizer, ids[task], scalings)
            record["accuracy"][row][task] = sum(g == a for g, (_, a) in zip(got.texts, sets[task])) / count
            if scalings is None:
                xlora_tokens[task] = got.tokens
                by_prompt, by_token = routing(got.prefill_scalings, ids[task], names.index(task))
                record["routing"][task], record["routing_per_token"][task] = by_prompt, by_token
        log(f"{row}: {time.perf_counter() - start:.0f} s")
    for row in ("own expert, after 1-3 chat turns", "X-LoRA, after 1-3 chat turns"):
        record["accuracy"][row] = {}
        for task in TASKS:
            prompts = [tokenizer(text)["input_ids"] for text, _ in chats[task]]
            got = eager_answers(model, tokenizer, prompts, None if row.startswith("X-LoRA") else
                                configs[f"expert {task}"])
            record["accuracy"][row][task] = sum(g == a for g, (_, a) in zip(got.texts, chats[task])) / len(prompts)
        log(f"{row}: {time.perf_counter() - start:.0f} s")
    if graph:
        record["graph"] = {}
        with tempfile.TemporaryDirectory(prefix="xlora-demo-eval-") as tmp:
            for row, extra in GRAPH_VARIANTS:
                if extra and not cli_has_option(extra[0]):
                    record["graph"][row] = f"not available: this checkout's xlora-export has no {extra[0]}"
                    continue
                path = os.path.join(tmp, f"demo{len(record['graph'])}.onnx")
                export_graph(model_dir, path, extra)
                record["accuracy"][row], same = {}, 0
                for task in TASKS:
                    tokens = graph_answers(path, texts[task])
                    answers = [answer_text(tokenizer, t, tokenizer.eos_token_id) for t in tokens]
                    record["accuracy"][row][task] = sum(g == a for g, (_, a) in zip(answers, sets[task])) / count
                    same += sum(t == e for t, e in zip(tokens, xlora_tokens[task]))
                record["graph"][row] = {"options": list(extra), "greedy_tokens_equal_to_eager": same / (count * n)}
                log(f"{row}: {time.perf_counter() - start:.0f} s")
    return record


def format_table(record: dict) -> str:
    """The record as a Markdown table: rows = configurations, columns = tasks (accuracy in %), then routing."""
    tasks = record["tasks"]
    lines = ["| | " + " | ".join(tasks) + " | mean |", "|---|" + "---:|" * (len(tasks) + 1)]
    for row, acc in record["accuracy"].items():
        values = [100 * acc[t] for t in tasks]
        lines.append(f"| {row} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values) / len(values):.1f} |")
    for key, name in (("routing", "routing (prompt mean)"), ("routing_per_token", "routing (per token)")):
        values = [100 * record[key][t] for t in tasks]
        lines.append(f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values) / len(values):.1f} |")
    for row, info in record.get("graph", {}).items():
        if isinstance(info, str):
            lines.append(f"\n{row}: {info}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m models.demo_eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", nargs="?", default=DEFAULT_MODEL, help="the demo checkpoint (default: the "
                        "committed models/xlora-demo)")
    parser.add_argument("--count", type=int, default=100, help="held-out prompts per task (default 100)")
    parser.add_argument("--no-graph", action="store_true", help="skip the exported graph's rows")
    parser.add_argument("--json", metavar="PATH", help="also write the JSON record to PATH")
    args = parser.parse_args(argv)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(2)
    try:
        record = evaluate(args.model_dir, args.count, graph=not args.no_graph,
                          log=lambda m: print(m, file=sys.stderr, flush=True))
    except XLoraError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    print(format_table(record))
    text = json.dumps(record, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
