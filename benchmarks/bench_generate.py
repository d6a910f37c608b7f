"""Generation speed on a CPU: the torch-free runtime (ONNX Runtime) against the eager X-LoRA model.

    python benchmarks/bench_generate.py [--models tiny-llama llama-32m] [--prompt-len 128] [--new-tokens 32]
                                        [--runs 5] [--threads 2] [--json OUT.json]
                                        [--seed 0] [--no-hf-base] [--wait-quiet SECONDS]

For each model: build it with its recipe (models/recipes.py) into benchmarks/.cache/NAME (reused when the
recipe did not change), export it once with the frozen graph (benchmarks/.cache/NAME.onnx), then time greedy
generation of one random prompt (fixed seed, batch 1, no stop tokens) with every engine:

    ort granular    xlora_runtime.Generator.stream, scalings per token (two passes, both caches)
    ort frozen      the same with freeze_scalings_after=0 (frozen graph: one pass, one cache)
    eager granular  the eager xLoRAModel with both caches: the reference of the ratios
    eager frozen    the same with the scalings frozen at the prompt's last token (generate's
                    freeze_scalings_after=0)
    hf base         the bare base model's transformers `generate` with its cache (no experts at all)

Every engine is timed the same way, from per-token timestamps: prefill = time from the call to the
first new token (the prompt's forward + picking the token), decode tok/s = (new tokens - 1) / time
from the first to the last new token. Runs go round-robin over the engines (so that load from other
processes on a shared machine hits them alike); medians over --runs runs after one warm-up each.
Each run also records the CPUs this process used and those other processes kept busy meanwhile
(Linux /proc/stat), so that disturbed runs show; `--wait-quiet S` waits up to S seconds before each
run until the machine is quiet. benchmarks/README.md explains the columns and holds a measured table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CACHE = os.path.join(HERE, ".cache")

# One timed run: (token ids, timestamps of the tokens, start time), all times from time.perf_counter().
Run = tuple[list[int], list[float], float]
REFERENCE = "eager granular"


# ----------------------------------------------------------------------------------------------- build + export
def prepare(name: str, say: Callable[[str], None]) -> dict:
    """Build (or reuse) the checkpoint and its export in benchmarks/.cache; returns paths and timings."""
    sys.path.insert(0, ROOT)  # `models` is a folder of the repository, not an installed package
    from models.recipes import RECIPES, build
    from xlora_export.export import ExportOptions, export

    if name not in RECIPES:
        raise SystemExit(f"unknown model {name!r}; recipes: {', '.join(RECIPES)}")
    os.makedirs(CACHE, exist_ok=True)
    ignore = os.path.join(CACHE, ".gitignore")
    if not os.path.exists(ignore):
        with open(ignore, "w") as f:
            f.write("*\n")  # built checkpoints and graphs stay out of git
    recipe = repr(RECIPES[name])
    folder, graph = os.path.join(CACHE, name), os.path.join(CACHE, f"{name}.onnx")
    stamp_path = os.path.join(CACHE, f"{name}.json")
    stamp = {}
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            stamp = json.load(f)
    info = {"checkpoint": folder, "graph": graph}
    if stamp.get("recipe") == recipe and os.path.isfile(os.path.join(folder, "xlora_config.json")):
        say(f"{name}: reusing {os.path.relpath(folder, ROOT)} (built in {stamp['build_s']:.1f} s)")
        info.update(build_s=stamp["build_s"], build_reused=True)
    else:
        say(f"{name}: building with its recipe")
        t0 = time.perf_counter()
        build(RECIPES[name], folder)
        stamp = {"recipe": recipe, "build_s": time.perf_counter() - t0}
        info.update(build_s=stamp["build_s"], build_reused=False)
        say(f"{name}: built in {stamp['build_s']:.1f} s")
    frozen = graph[: -len(".onnx")] + ".frozen.onnx"
    if "export_s" in stamp and os.path.isfile(graph) and os.path.isfile(frozen):
        say(f"{name}: reusing {os.path.relpath(graph, ROOT)} (exported in {stamp['export_s']:.1f} s)")
        info.update(export_s=stamp["export_s"], export_reused=True)
    else:
        say(f"{name}: exporting (two-pass + frozen graphs, validated against the eager model)")
        t0 = time.perf_counter()
        report = export(folder, graph, ExportOptions(frozen_scalings=True, force=True))
        stamp["export_s"] = time.perf_counter() - t0
        stamp["parity"] = {k: dict(v.max_diff) for k, v in report.parity.items()}
        info.update(export_s=stamp["export_s"], export_reused=False)
        say(f"{name}: exported in {stamp['export_s']:.1f} s, max diff vs eager {stamp['parity']}")
    info["parity"] = stamp.get("parity")
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=1)
    return info


# ----------------------------------------------------------------------------------------------- engines
def runtime_engine(graph: str, threads: int, freeze: int | None) -> Callable[[list[int], int], Run]:
    """The runtime's streaming generator; each TokenEvent is timestamped when it is yielded."""
    from xlora_runtime import Generator, XLoraSession

    generator = Generator(XLoraSession(graph, threads=threads))  # sessions never spin (see XLoraSession)

    def run(prompt: list[int], n: int) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        for event in generator.stream(prompt, max_new_tokens=n, stop_token_ids=[], freeze_scalings_after=freeze):
            times.append(time.perf_counter())
            tokens.append(event.token)
        return tokens, times, t0

    return run


def eager_engine(model, frozen: bool) -> Callable[[list[int], int], Run]:
    """The eager X-LoRA model with both caches.

    The decode loop is `xlora_export.generation.generate`'s own loop (prefill forward, then one cached
    forward per token with a mask grown by one column, scalings frozen at the prompt's last token when
    `frozen`), minus its eos bookkeeping, so that every token can be timestamped like the runtime's;
    "generate minus a separately timed prefill" would subtract two noisy numbers. `check_generate`
    confirms that this loop picks the tokens `model.generate` picks.
    """
    import torch

    @torch.no_grad()
    def run(prompt: list[int], n: int) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        ids = torch.tensor([prompt], dtype=torch.int64)
        mask = torch.ones_like(ids)
        out = model(ids, attention_mask=mask, use_cache=True)
        fixed = out.scalings[:, -1] if frozen else None
        for step in range(n):
            nxt = out.logits[:, -1].argmax(-1)
            tokens.append(int(nxt[0]))
            times.append(time.perf_counter())
            if step == n - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
            out = model(nxt[:, None], attention_mask=mask, cache=out.cache, scalings=fixed, use_cache=True)
        return tokens, times, t0

    return run


def check_generate(model, prompt: list[int], n: int, frozen: bool, expected: list[int]) -> bool:
    """Whether `model.generate` (greedy, no eos) gives the timed loop's tokens."""
    import torch

    ids = torch.tensor([prompt], dtype=torch.int64)
    out = model.generate(ids, max_new_tokens=n, eos_token_id=None, freeze_scalings_after=0 if frozen else None)
    return out[0, len(prompt):].tolist() == expected


def hf_base_engine(base) -> Callable[[list[int], int], Run]:
    """transformers' `generate` of the bare base model (cache on, greedy, no eos); a streamer timestamps
    each new token (its first `put` is the prompt, then one call per new token)."""
    import torch
    from transformers import GenerationConfig
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.tokens: list[int] = []
            self.prompt_seen = False

        def put(self, value) -> None:
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            self.times.append(time.perf_counter())
            self.tokens.append(int(value.reshape(-1)[0]))

        def end(self) -> None:
            pass

    @torch.no_grad()
    def run(prompt: list[int], n: int) -> Run:
        config = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=True, eos_token_id=None,
                                  pad_token_id=base.config.pad_token_id)
        clock = Clock()
        t0 = time.perf_counter()
        ids = torch.tensor([prompt], dtype=torch.int64)
        base.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=clock)
        return clock.tokens, clock.times, t0

    return run


# ----------------------------------------------------------------------------------------------- measurement
def busy_cpu_s() -> float | None:
    """CPU seconds all processes of the machine have used since boot (/proc/stat; None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait; the rest (user, nice, system, irq, softirq, steal...) is busy
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def others_busy(seconds: float) -> float | None:
    """CPUs that other processes kept busy over the next `seconds` (this one sleeps meanwhile)."""
    b0 = busy_cpu_s()
    time.sleep(seconds)
    b1 = busy_cpu_s()
    return None if b0 is None or b1 is None else max(0.0, (b1 - b0) / seconds)


def wait_quiet(limit_s: float, threshold: float = 0.25) -> float | None:
    """Wait (at most `limit_s`) until other processes use less than `threshold` CPUs; returns what they used."""
    deadline = time.perf_counter() + limit_s
    while True:
        load = others_busy(0.3)
        if load is None or load < threshold or time.perf_counter() >= deadline:
            return load
        time.sleep(0.7)


def timings(run: Run) -> dict:
    tokens, times, t0 = run
    decode_s = times[-1] - times[0]
    return {"prefill_ms": 1e3 * (times[0] - t0), "decode_tok_s": (len(times) - 1) / decode_s if decode_s else None,
            "total_ms": 1e3 * (times[-1] - t0)}


def bench_model(name: str, args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from xlora_export.xlora_utils import load_model

    info = prepare(name, say)
    torch.set_num_threads(args.threads)
    model, _ = load_model(info["checkpoint"])
    model.eval()
    base = AutoModelForCausalLM.from_pretrained(os.path.join(info["checkpoint"], "base")).eval()
    n_base = sum(p.numel() for p in base.parameters())
    n_all = sum(p.numel() for p in model.parameters())
    vocab = model.config.vocab_size
    if args.prompt_len + args.new_tokens > model.config.max_position_embeddings:
        raise SystemExit(f"{name}: prompt + new tokens exceed its {model.config.max_position_embeddings} positions")
    # Random ids over the model's whole vocabulary, above the special tokens (pad, bos, eos).
    prompt = np.random.default_rng(args.seed).integers(3, vocab, args.prompt_len).tolist()

    engines = {
        "ort granular": runtime_engine(info["graph"], args.threads, None),
        "ort frozen": runtime_engine(info["graph"], args.threads, 0),
        REFERENCE: eager_engine(model, frozen=False),
        "eager frozen": eager_engine(model, frozen=True),
    }
    if not args.no_hf_base:
        engines["hf base"] = hf_base_engine(base)
    say(f"{name}: {n_base / 1e6:.1f}M base parameters ({n_all / 1e6:.1f}M with experts and classifier); "
        f"warm-up, then {args.runs} runs round-robin over {len(engines)} engines")
    first = {engine: run(prompt, args.new_tokens) for engine, run in engines.items()}  # warm-up
    samples: dict[str, list[dict]] = {engine: [] for engine in engines}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for _ in range(args.runs):
        for engine, run in engines.items():
            quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
            busy0, cpu0 = busy_cpu_s(), time.process_time()
            result = run(prompt, args.new_tokens)
            busy1, cpu_s = busy_cpu_s(), time.process_time() - cpu0
            if result[0] != first[engine][0]:
                raise SystemExit(f"{name}/{engine}: greedy tokens changed between runs")
            sample = timings(result)
            # CPU seconds this process used per wall second (at most --threads; far less: it waited for cores)
            sample["cpu_per_wall"] = cpu_s / (sample["total_ms"] / 1e3)
            # CPUs the other processes of the machine kept busy meanwhile (clock-tick resolution, 10 ms)
            sample["others_cpus"] = (None if busy0 is None else
                                     max(0.0, (busy1 - busy0 - cpu_s) / (sample["total_ms"] / 1e3)))
            sample["others_cpus_before"] = quiet
            samples[engine].append(sample)
    load_after = os.getloadavg() if hasattr(os, "getloadavg") else None

    same = {  # the sanity check: greedy tokens of the runtime against the eager model (same scalings mode)
        "ort granular": first["ort granular"][0] == first[REFERENCE][0],
        "ort frozen": first["ort frozen"][0] == first["eager frozen"][0],
        REFERENCE: check_generate(model, prompt, args.new_tokens, False, first[REFERENCE][0]),
        "eager frozen": check_generate(model, prompt, args.new_tokens, True, first["eager frozen"][0]),
    }
    rows = {}
    for engine, values in samples.items():
        row = {key: statistics.median(v[key] for v in values) for key in values[0] if values[0][key] is not None}
        # best of the runs: the least disturbed by other processes (the medians are the headline numbers)
        row["best_prefill_ms"] = min(v["prefill_ms"] for v in values)
        row["best_decode_tok_s"] = max(v["decode_tok_s"] for v in values)
        row["runs"] = values
        row["tokens_match"] = same.get(engine)
        rows[engine] = row
    ref = rows[REFERENCE]
    for row in rows.values():
        for prefix in ("", "best_"):
            row[f"{prefix}prefill_speedup_vs_eager"] = ref[f"{prefix}prefill_ms"] / row[f"{prefix}prefill_ms"]
            row[f"{prefix}decode_speedup_vs_eager"] = row[f"{prefix}decode_tok_s"] / ref[f"{prefix}decode_tok_s"]
    return {"model": name, "base_params": n_base, "all_params": n_all, "vocab_size": vocab,
            "n_modules": len(model.module_names), "n_experts": len(model.adapter_names),
            "build_s": info["build_s"], "build_reused": info["build_reused"], "export_s": info["export_s"],
            "export_reused": info["export_reused"], "export_parity_max_diff": info["parity"],
            "load_average_before": load_before, "load_average_after": load_after,
            "greedy_tokens": {e: first[e][0] for e in engines}, "engines": rows}


def machine(threads: int) -> dict:
    import onnxruntime
    import torch
    import transformers

    cpu = platform.processor()
    if os.path.isfile("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return {"cpu": cpu, "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": threads,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def table(results: list[dict], best: bool = False) -> str:
    """Medians (total ms, cpu/wall, same tokens too), or with `best` the best runs' prefill and decode."""
    head = ("model", "engine", "prefill ms", "decode tok/s", "prefill x", "decode x")
    head += () if best else ("total ms", "cpu/wall", "others", "same tokens")
    p = "best_" if best else ""
    lines = [head]
    for result in results:
        for engine, row in result["engines"].items():
            line = (result["model"], engine, f"{row[p + 'prefill_ms']:.1f}", f"{row[p + 'decode_tok_s']:.1f}",
                    f"{row[p + 'prefill_speedup_vs_eager']:.2f}", f"{row[p + 'decode_speedup_vs_eager']:.2f}")
            if not best:
                match = {True: "yes", False: "NO", None: "-"}[row["tokens_match"]]
                others = f"{row['others_cpus']:.2f}" if "others_cpus" in row else "?"
                line += (f"{row['total_ms']:.0f}", f"{row['cpu_per_wall']:.2f}", others, match)
            lines.append(line)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "llama-32m"], help="recipes to benchmark")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (medians), after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of ONNX Runtime and torch")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--no-hf-base", action="store_true", help="skip the bare base model's HF generate row")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each timed run, wait up to S seconds until other processes use < 0.25 CPUs "
                             "(for shared machines; Linux only; default 0: do not wait)")
    parser.add_argument("--json", help="write the results (with machine info and every run) here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.runs < 1 or args.prompt_len < 1:
        parser.error("need --new-tokens >= 2, --runs >= 1, --prompt-len >= 1")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = [bench_model(name, args, say) for name in args.models]
    info = machine(args.threads)
    print(f"batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; {args.threads} threads; "
          f"{info['cpu_count']} CPUs ({info['cpu']}); onnxruntime "
          f"{info['onnxruntime']}, torch {info['torch']}")
    print(f"medians of {args.runs} runs:")
    print(table(results))
    print("prefill x / decode x: speed relative to eager granular (> 1 is faster)")
    print("same tokens: greedy tokens equal the eager model's (ort rows: same scalings mode; eager rows: the timed "
          "loop against model.generate)")
    print("cpu/wall: CPU seconds used per wall second (<= threads; lower: the process waited for cores); "
          "others: CPUs that other processes kept busy meanwhile")
    for r in results:
        g, f = r["engines"]["ort granular"], r["engines"]["ort frozen"]
        cached = {True: " (cached)", False: ""}
        load = r["load_average_before"], r["load_average_after"]
        print(f"{r['model']}: {r['base_params'] / 1e6:.1f}M base params ({r['all_params'] / 1e6:.1f}M in all); "
              f"build {r['build_s']:.1f} s{cached[r['build_reused']]}, export {r['export_s']:.1f} s"
              f"{cached[r['export_reused']]}; ort frozen decodes {f['decode_tok_s'] / g['decode_tok_s']:.2f}x as "
              f"fast as ort granular" + (f"; 1-min load average {load[0][0]:.2f} before the runs, {load[1][0]:.2f} "
                                         f"after" if load[0] else ""))
    print(f"best of {args.runs} runs (least disturbed by other processes):")
    print(table(results, best=True))
    if args.json:
        payload = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": info,
                   "results": results}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1, default=lambda o: dataclasses.asdict(o) if dataclasses.is_dataclass(o)
                      else str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
