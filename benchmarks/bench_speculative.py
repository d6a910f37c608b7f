"""Speculative exact X-LoRA, measured before it is built: what a batched call costs, how often the base drafts right.

    python benchmarks/bench_speculative.py [--cost-models llama-32m] [--acceptance-models models/xlora-demo
                                           xlora-related] [--rows 4] [--past 128] [--steps 16] [--rounds 7]
                                           [--threads 2] [--genai] [--low-memory] [--cache DIR] [--json OUT.json]
                                           [--acceptance-from EARLIER.json]

The scheme. Exact X-LoRA runs two passes per token: the scaling pass (with the scaling-pass value 0, the plain base
model) gives the scalings of token t, then the real pass with them gives token t+1. The scaling pass of token t+1
waits for that token; but the base's own logits at t (lm_head on the scaling pass's final hidden state) draft it.
With the top-c drafts, one batched call of the single-pass (frozen) graph runs the real pass of token t (row 0, its
scalings) and the scaling passes of the c candidates for t+1 (rows 1..c, scalings 0: the base). When the real pass
picks a drafted token, that row's hidden state already gives the scalings of t+1 (and its logits the next drafts);
on a miss one more 1-row scaling pass runs. Every result is the two-pass result. Per token:

    cost(c) = C(1 + c) + (1 - a_c) * C(1) + o

with C(b) the frozen graph's decode call of b rows, a_c the top-c acceptance, o the runtime's per-token bookkeeping
(the Generator's frozen row minus the bare 1-row loop). This script measures the parts:

1. Cost (`--cost-models`, built and exported with `--attention gqa` into --cache): in one process,
   round-robin per round, the decode time per token of the frozen graph with 1..--rows rows (row 0 the model's
   uniform scalings, the others 0) after a --past token prompt, --steps steps, in a bare loop over the runtime's
   cache manager; the two-pass graph in the same loop; the runtime's Generator, two passes and frozen; with
   --genai ONNX Runtime GenAI's fp32 base and fp32 + one LoRA through og.Adapters (bench_genai.py's rows).
2. Acceptance (`--acceptance-models`, recipes or checkpoint folders of the demo's tasks): X-LoRA's own greedy
   answers through the runtime (two passes, exact), on held-out plain and chat prompts of each task; along them the
   plain base graph (`bench_generate.export_base_graph`: exactly the scaling pass with value 0) teacher-forced;
   top-1..4 acceptance = how often X-LoRA's token is among the base's c largest logits. Two lengths: answers (up to
   eos) and --continue-tokens tokens with no stop token.
3. The estimate per round from 1 and 2 (every acceptance model against every cost model): decode tok/s of the
   scheme, x the Generator's two passes, x GenAI + LoRA, and the acceptance that 0.75x GenAI + LoRA needs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_generate  # noqa: E402
from bench_generate import ROOT, Run, generator_engine, machine, timings, wait_quiet  # noqa: E402

TARGET = 0.75  # of GenAI fp32 + LoRA's decode speed


# ----------------------------------------------------------------------------------------------- models
def prepare(name: str, say: Callable[[str], None], base_graph: bool = True) -> dict:
    """A checkpoint folder, or a recipe built into --cache/NAME (reused while `bench_generate.prepare`'s stamp
    NAME.json records the same recipe), and its `--attention gqa --frozen-scalings` export as --cache/NAME.gqa.onnx
    (reused while newer than the checkpoint's config); with `base_graph` also the plain base graph
    (`bench_generate.export_base_graph`). Returns paths: "checkpoint", "graph", "base_graph" (None without it)."""
    from xlora_export.export import ExportOptions, export

    cache = bench_generate.CACHE
    os.makedirs(cache, exist_ok=True)
    folder = name
    if not os.path.isdir(name):
        sys.path.insert(0, ROOT)  # `models` is a folder of the repository, not an installed package
        from models.recipes import RECIPES, build

        if name not in RECIPES:
            raise SystemExit(f"{name!r}: neither a checkpoint folder nor a recipe ({', '.join(RECIPES)})")
        folder, stamp_path = os.path.join(cache, name), os.path.join(cache, f"{name}.json")
        stamp = {}
        if os.path.isfile(stamp_path):
            with open(stamp_path) as f:
                stamp = json.load(f)
        if stamp.get("recipe") != repr(RECIPES[name]) or not os.path.isfile(os.path.join(folder, "xlora_config.json")):
            say(f"{name}: building with its recipe")
            start = time.perf_counter()
            build(RECIPES[name], folder)
            with open(stamp_path, "w") as f:
                json.dump({"recipe": repr(RECIPES[name]), "build_s": time.perf_counter() - start}, f)
    stem = os.path.join(cache, os.path.basename(os.path.normpath(folder)) + ".gqa")
    info = {"checkpoint": folder, "graph": stem + ".onnx", "base_graph": stem + ".base.onnx" if base_graph else None}
    config_time = os.path.getmtime(os.path.join(folder, "xlora_config.json"))
    if not os.path.isfile(info["graph"]) or os.path.getmtime(info["graph"]) < config_time:
        say(f"{name}: exporting (--attention gqa --frozen-scalings, validated)")
        export(folder, info["graph"], ExportOptions(frozen_scalings=True, force=True, attention="gqa"))
    if base_graph and (not os.path.isfile(info["base_graph"]) or os.path.getmtime(info["base_graph"]) < config_time):
        say(f"{name}: exporting the plain base graph")
        bench_generate.export_base_graph(folder, info["base_graph"], "gqa")
    return info


# ----------------------------------------------------------------------------------------------- cost
def rows_engine(session, rows: int, frozen: bool = True) -> Callable[[list[int], int], Run]:
    """A bare greedy loop over the runtime's cache manager with `rows` rows of the same prompt: frozen graph, row 0
    with the model's uniform scalings, the others with 0 (the base, as the scaling rows of the scheme); or with
    `frozen` False the two-pass graph (1 row). The tokens are row 0's."""
    from xlora_runtime.kv_cache import CacheGroup

    info = session.info
    scalings = np.zeros((rows, info.n_modules, info.n_experts), np.float32)
    scalings[0] = 1 / info.n_experts
    top_k = info.default_top_k

    def run(prompt: list[int], n: int) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        group = CacheGroup(session, np.arange(rows), frozen=frozen, fixed_scalings=scalings if frozen else None)
        group.reserve(len(prompt) + n)
        mask = np.ones((rows, len(prompt) + n), np.int64)
        ids = np.array([prompt] * rows)
        out = group.run(ids, mask[:, :len(prompt)], np.tile(np.arange(len(prompt)), (rows, 1)), top_k)
        for step in range(n):
            token = int(out.last_logits[0].argmax())
            tokens.append(token)
            times.append(time.perf_counter())
            if step == n - 1:
                break
            total = len(prompt) + step + 1
            out = group.run(np.full((rows, 1), token), mask[:, :total], np.full((rows, 1), total - 1), top_k)
        group.release()
        return tokens, times, t0

    return run


def cost(name: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Decode ms per token of every engine (1.), per round and medians."""
    from xlora_runtime import XLoraSession

    info = prepare(name, say, base_graph=False)
    session = XLoraSession(info["graph"], threads=args.threads, low_memory=args.low_memory)
    engines: dict[str, Callable] = {f"frozen x{b}": rows_engine(session, b) for b in range(1, args.rows + 1)}
    engines["two-pass x1"] = rows_engine(session, 1, frozen=False)
    engines["generator two-pass"] = generator_engine(session, None)
    engines["generator frozen"] = generator_engine(session, 0)
    if args.genai:
        import bench_genai  # after --cache is set: its GenAI builds go under it

        genai = bench_genai.build_genai(info["checkpoint"], args.expert, args.threads, say)
        engines["genai fp32"] = bench_genai.genai_engine(genai["fp32"])
        engines["genai fp32 + lora"] = bench_genai.genai_engine(genai["lora"], genai["adapter_file"])
    prompt = np.random.default_rng(args.seed).integers(3, session.info.vocab_size, args.past).tolist()
    n = args.steps + 1
    say(f"{name}: warm-up, then {args.rounds} rounds round-robin over {len(engines)} engines")
    first = {e: run(prompt, n)[0] for e, run in engines.items()}
    load_before = os.getloadavg()
    ms: dict[str, list[float]] = {e: [] for e in engines}
    for _ in range(args.rounds):
        for engine, run in engines.items():
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            ms[engine].append(1e3 / timings(run(prompt, n))["decode_tok_s"])
    same = {"frozen rows, row 0": all(first[f"frozen x{b}"] == first["frozen x1"] for b in range(1, args.rows + 1)),
            "two-pass bare loop vs generator": first["two-pass x1"] == first["generator two-pass"]}
    return {"model": name, "ms_per_token": ms, "median_ms": {e: statistics.median(v) for e, v in ms.items()},
            "same_tokens": same, "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "low_memory": args.low_memory}


# ----------------------------------------------------------------------------------------------- acceptance
def demo_prompts(count: int) -> list[tuple[str, str, str]]:
    """(task, kind, prompt text): `count` held-out plain prompts and `count` chat prompts of every demo task."""
    sys.path.insert(0, ROOT)
    from models.demo import TASKS, chat_set, eval_set, plain_prompt

    out = []
    for task in TASKS:
        out += [(task, "plain", plain_prompt(q)) for q, _ in eval_set(task, count)]
        out += [(task, "chat", p) for p, _ in chat_set(task, count)]
    return out


def acceptance(name: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Ranks of X-LoRA's greedy tokens in the base's logits along X-LoRA's trajectories (2.)."""
    from xlora_runtime import Generator, XLoraSession
    from xlora_runtime.kv_cache import CacheGroup

    info = prepare(name, say)
    session = XLoraSession(info["graph"], threads=args.threads)
    generator = Generator(session)
    base = XLoraSession(info["graph"], threads=args.threads)
    base._frozen = base.backend.open(info["base_graph"])  # the cache manager runs it in the frozen slot
    del base.main
    zeros = np.zeros((1, base.info.n_modules, base.info.n_experts), np.float32)

    def base_ranks(prompt: list[int], tokens: list[int]) -> list[int]:
        """The rank of each token in the base's logits at its position (0: the base's top-1)."""
        group = CacheGroup(base, np.arange(1), frozen=True, fixed_scalings=zeros)
        group.reserve(len(prompt) + len(tokens))
        mask = np.ones((1, len(prompt) + len(tokens)), np.int64)
        out = group.run(np.array([prompt]), mask[:, :len(prompt)], np.arange(len(prompt))[None], 0)
        ranks = []
        for i, token in enumerate(tokens):
            logits = out.last_logits[0].reshape(-1)
            ranks.append(int((logits > logits[token]).sum()))
            if i < len(tokens) - 1:
                total = len(prompt) + i + 1
                out = group.run(np.array([[token]]), mask[:, :total], np.array([[total - 1]]), 0)
        group.release()
        return ranks

    prompts = demo_prompts(args.count)
    result: dict = {"model": name, "prompts": len(prompts)}
    for mode, options in (("answers", {"max_new_tokens": 12}),
                          ("continued", {"max_new_tokens": args.continue_tokens, "stop_token_ids": []})):
        say(f"{name}: X-LoRA's greedy {mode} on {len(prompts)} prompts, the base along them")
        by: dict[str, list[int]] = {}
        examples = []
        for task, kind, text in prompts:
            generation = generator.generate(text, **options)[0]
            ranks = base_ranks(generation.prompt_ids, generation.tokens)
            for key in ("all", task, kind):
                by.setdefault(key, []).extend(ranks)
            if len(examples) < 3 and kind == "chat":
                examples.append({"prompt": text, "text": generation.text, "ranks": ranks})
        result[mode] = {key: {"tokens": len(r), **{f"top{c}": float(np.mean(np.array(r) < c)) for c in (1, 2, 3, 4)}}
                        for key, r in by.items()}
        result[mode]["examples"] = examples
    return result


# ----------------------------------------------------------------------------------------------- estimate
def estimate(costs: dict, accept: dict, rows: int) -> dict:
    """Per round of `costs`, the scheme's ms per token with top-c drafts for c = 1..rows-1 at `accept`'s
    acceptance (all tokens of both lengths); medians of its tok/s, x the Generator's two passes, x GenAI + LoRA, and
    the acceptance that 0.75x GenAI + LoRA needs (> 1: none does)."""
    ms = costs["ms_per_token"]
    rounds = len(ms["frozen x1"])
    out = {}
    for mode in ("answers", "continued"):
        for c in range(1, rows):
            a = accept[mode]["all"][f"top{c}"]
            per_round = []
            for r in range(rounds):
                c1, cb = ms["frozen x1"][r], ms[f"frozen x{c + 1}"][r]
                overhead = ms["generator frozen"][r] - c1
                spec = cb + (1 - a) * c1 + overhead
                row = {"tok_s": 1e3 / spec, "x_generator_two_pass": ms["generator two-pass"][r] / spec,
                       "x_bare_two_pass": ms["two-pass x1"][r] / (spec - overhead)}
                if "genai fp32 + lora" in ms:
                    lora = ms["genai fp32 + lora"][r]
                    row["x_genai_lora"] = lora / spec
                    row["acceptance_needed"] = 1 - (lora / TARGET - cb - overhead) / c1
                per_round.append(row)
            out[f"{mode}, top-{c}"] = {"acceptance": a, **{k: statistics.median(p[k] for p in per_round)
                                                          for k in per_round[0]}}
    return out


# ----------------------------------------------------------------------------------------------- report
def report(costs: list[dict], accepts: list[dict], estimates: dict, args: argparse.Namespace) -> None:
    for c in costs:
        med = c["median_ms"]
        print(f"\n{c['model']}: decode ms per token, medians of {args.rounds} rounds (past {args.past}, {args.steps} "
              f"steps; 1-min load {c['load_average_before'][0]:.1f} before, {c['load_average_after'][0]:.1f} after"
              + ("; low_memory sessions" if c["low_memory"] else "") + ")")
        base = c["ms_per_token"]["frozen x1"]
        print("| engine | ms/token | x frozen x1 (median of per-round ratios) |\n|---|---:|---:|")
        for engine, values in c["ms_per_token"].items():
            ratio = statistics.median(v / b for v, b in zip(values, base))
            print(f"| {engine} | {med[engine]:.2f} | {ratio:.2f} |")
        print(f"same tokens: {c['same_tokens']}")
    for a in accepts:
        print(f"\n{a['model']}: acceptance of the base's top-c drafts along X-LoRA's greedy tokens ({a['prompts']} "
              f"prompts)")
        print("| tokens | group | count | top-1 | top-2 | top-3 | top-4 |\n|---|---|---:|---:|---:|---:|---:|")
        for mode in ("answers", "continued"):
            for key, v in a[mode].items():
                if key != "examples":
                    print(f"| {mode} | {key} | {v['tokens']} | " + " | ".join(f"{v[f'top{c}']:.1%}"
                                                                           for c in (1, 2, 3, 4)) + " |")
    for (cm, am), est in estimates.items():
        print(f"\nestimate: cost {cm}, acceptance {am} (medians of per-round values)")
        print("| drafts | acceptance | tok/s | x generator two-pass | x bare two-pass | x GenAI + LoRA | "
              f"acceptance for {TARGET}x GenAI + LoRA |\n|---|---:|---:|---:|---:|---:|---:|")
        for key, e in est.items():
            genai = (f"{e['x_genai_lora']:.2f} | {e['acceptance_needed']:.2f}" if "x_genai_lora" in e else "- | -")
            print(f"| {key} | {e['acceptance']:.1%} | {e['tok_s']:.1f} | {e['x_generator_two_pass']:.2f} | "
                  f"{e['x_bare_two_pass']:.2f} | {genai} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cost-models", nargs="*", default=["llama-32m"], help="recipes or checkpoint folders timed")
    parser.add_argument("--acceptance-models", nargs="*", default=[os.path.join(ROOT, "models", "xlora-demo"),
                                                                   "xlora-related"],
                        help="recipes or checkpoint folders of the demo's tasks whose drafts are counted")
    parser.add_argument("--acceptance-from", metavar="JSON", help="the acceptance of an earlier run's --json "
                        "instead of measuring it again (--acceptance-models is then ignored)")
    parser.add_argument("--rows", type=int, default=4, help="frozen-graph calls of 1..ROWS rows (default 4)")
    parser.add_argument("--past", type=int, default=128, help="prompt tokens before the timed steps")
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per run")
    parser.add_argument("--rounds", type=int, default=7, help="round-robin rounds after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt of the cost runs")
    parser.add_argument("--count", type=int, default=25, help="held-out prompts per task and kind (plain, chat)")
    parser.add_argument("--continue-tokens", type=int, default=32, help="tokens of the no-stop trajectories")
    parser.add_argument("--genai", action="store_true", help="time GenAI's fp32 and fp32 + LoRA rows (the `bench` "
                        "extra: onnxruntime-genai)")
    parser.add_argument("--expert", default="code", help="the expert of --genai's og.Adapters row")
    parser.add_argument("--low-memory", action="store_true", help="open the timed graphs with low_memory (1.1B on a "
                        "machine without twice its weights of memory); calls of 2+ rows then pack the weights every "
                        "call, so their ratios measure the packing, not the rows")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S", help="bench_generate's --wait-quiet")
    parser.add_argument("--cache", default=bench_generate.CACHE, help="where recipes are built and exported "
                        "(default benchmarks/.cache)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.rows < 2 or args.steps < 2 or args.rounds < 1 or args.past < 1:
        parser.error("need --rows >= 2, --steps >= 2, --rounds >= 1, --past >= 1")
    bench_generate.CACHE = os.path.abspath(args.cache)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    if args.acceptance_from:
        with open(args.acceptance_from) as f:
            accepts = json.load(f)["acceptance"]
    else:
        accepts = [acceptance(m, args, say) for m in args.acceptance_models]
    costs = [cost(m, args, say) for m in args.cost_models]
    estimates = {(c["model"], a["model"]): estimate(c, a, args.rows) for c in costs for a in accepts}
    info = machine(args.threads)
    print(f"{info['date']}; {args.threads} threads; {info['cpu_count']} CPUs ({info['cpu']}); onnxruntime "
          f"{info['onnxruntime']}")
    report(costs, accepts, estimates, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": info, "cost": costs, "acceptance": accepts,
                       "estimates": [{"cost": c, "acceptance": a, "rows": e} for (c, a), e in estimates.items()]},
                      f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
