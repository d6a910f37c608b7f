"""Quantized graphs on a CPU: decode speed, sizes and agreement of int8 and int4 graphs against the float ones.

    python benchmarks/bench_quantize.py [--models llama-32m] [--agreement-models tiny-llama-trained]
                                        [--graphs FLOAT.onnx ...] [--no-timing] [--modes int8 int4] [--block-size 32]
                                        [--prompt-len 128] [--new-tokens 32] [--runs 5] [--threads 2]
                                        [--profile STEPS] [--wait-quiet S] [--out DIR] [--json OUT.json]

Float graphs: a recipe's export by bench_generate.prepare (benchmarks/.cache/NAME.onnx with its frozen graph), or
an existing float export given with --graphs (read only). Each is quantized by `xlora_export.quantize.quantize_files`
(what `xlora-export --quantize` runs after the float export) into OUT/NAME-MODE/NAME.onnx, reused while the float
graph and the options are unchanged, with its agreement against the float graph (teacher-forced top-1 tokens,
logits error, scalings, top-1 experts; see quantize.py). The process's peak resident set (VmHWM, reset before
each stage) is measured while quantizing and while measuring the agreement, against the float weights' file.

Speed (--models and --graphs): greedy generation of one random prompt (fixed seed, batch 1, no stop tokens) through
the runtime (`xlora_runtime.Generator`, IO binding), scalings per token (granular) and frozen, for the float graph
and each mode; timed as bench_generate times the runtime (prefill = call to first token, decode tok/s over the
other tokens), runs round-robin over the graphs, medians; `x float` is decode tok/s over the float graph's in the
same scalings mode. --agreement-models are only quantized and measured (a trained base: peaked logits).

--profile N: ONNX Runtime's profiler over N decode steps of each granular graph (after a prefill of the prompt):
milliseconds per token by op type, and the part of each run spent outside the ops (the session's own work).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_generate import CACHE, ROOT, machine, prepare, runtime_engine, timings, wait_quiet  # noqa: E402


# ----------------------------------------------------------------------------------------------- quantize
def quantize_graph_files(float_graph: str, variant: str, block_size: int, out_root: str, say) -> dict:
    """Quantize the float export at `float_graph` (and its frozen graph) into OUT/NAME-VARIANT/ (reused when nothing
    changed; VARIANT: a mode, `+head` for lm_head too); returns the paths, sizes and the agreement report."""
    import dataclasses

    from xlora_export.quantize import QuantizeOptions, quantize_files
    from xlora_runtime.format import contract as C

    stem = os.path.basename(float_graph)[: -len(".onnx")]
    folder = os.path.join(out_root, f"{stem}-{variant}")
    out = os.path.join(folder, os.path.basename(float_graph))
    mode = variant.removesuffix("+head")
    options = QuantizeOptions(mode, block_size=block_size, lm_head=True if variant.endswith("+head") else None)
    floats = {"main": float_graph, "frozen": C.frozen_path(float_graph)}
    key = {"options": dataclasses.asdict(options), "float": {k: os.path.getmtime(p) for k, p in floats.items()}}
    stamp_path = os.path.join(folder, "stamp.json")
    if os.path.isfile(stamp_path) and os.path.isfile(out):
        with open(stamp_path) as f:
            stamp = json.load(f)
        if stamp["key"] == key:
            say(f"{stem}: reusing {os.path.relpath(out, ROOT)} (quantized in {stamp['quantize_s']:.1f} s)")
            return stamp
    os.makedirs(folder, exist_ok=True)
    tokenizer = C.tokenizer_path(float_graph)
    if os.path.isfile(tokenizer):
        with open(tokenizer, "rb") as src, open(C.tokenizer_path(out), "wb") as dst:
            dst.write(src.read())
    say(f"{stem}: quantizing ({variant}) and measuring the agreement with the float graph")
    peaks: dict[str, int] = {}  # stage -> peak resident set
    seconds: dict[str, float] = {}

    def stage(message: str) -> None:  # quantize_files' progress: the agreement stage ends the quantizing one
        if message.startswith("measuring"):
            peaks["quantize"], seconds["quantize"] = peak_rss(reset=True), time.perf_counter() - t0
        say(f"{stem}: {message}")

    peak_rss(reset=True)
    t0 = time.perf_counter()
    report = quantize_files(floats, {"main": out, "frozen": C.frozen_path(out)}, options, validate=True,
                            progress=stage)
    peaks["agreement"] = peak_rss()
    data = float_graph + ".data"
    stamp = {"key": key, "graph": out, "quantize_s": time.perf_counter() - t0,
             "quantize_only_s": seconds.get("quantize"), "float_bytes": report.float_bytes,
             "float_weights_bytes": os.path.getsize(data) if os.path.isfile(data) else None,
             "peak_rss_bytes": peaks, "bytes": report.bytes, "quantized_matmuls": report.quantized,
             "prompts": report.prompts, "agreement": {k: dataclasses.asdict(v) for k, v in report.agreement.items()}}
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=1)
    say(f"{stem}: {variant} in {stamp['quantize_s']:.1f} s, {report.float_bytes / 1e6:.1f} MB -> "
        f"{report.bytes / 1e6:.1f} MB")
    return stamp


def peak_rss(reset: bool = False) -> int:
    """This process's peak resident set in bytes (VmHWM) since the last reset; `reset` starts a new peak from the
    current resident set (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    if reset:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    return peak


# ----------------------------------------------------------------------------------------------- profile
def profile_decode(graph: str, prompt: list[int], steps: int, threads: int) -> dict:
    """ONNX Runtime's profile of `steps` greedy decode steps after a prefill: ms per token by op type, and the
    runs' time outside any op."""
    import onnxruntime as ort

    from xlora_runtime.format import contract as C
    from xlora_runtime.session import XLoraSession

    info = XLoraSession(graph).info
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.enable_profiling = True
    options.profile_file_prefix = os.path.join(tempfile.mkdtemp(prefix="xlora-profile-"), "ort")
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    n = info.num_layers
    pasts, presents = C.past_names(n) + C.past_names(n, True), C.present_names(n) + C.present_names(n, True)
    feed = {p: np.zeros((1, info.kv_heads, 0, info.head_dim), np.float32) for p in pasts}
    ids, mask = np.array([prompt], np.int64), np.ones((1, len(prompt)), np.int64)
    feed[C.TOP_K] = np.array(info.default_top_k, np.int64)
    for _ in range(steps + 1):
        feed.update({C.INPUT_IDS: ids, C.ATTENTION_MASK: mask,
                     C.POSITION_IDS: np.arange(mask.shape[1] - ids.shape[1], mask.shape[1])[None]})
        outs = dict(zip(C.output_names(n), session.run(None, feed)))
        ids = outs[C.LOGITS][:, -1:].argmax(-1)
        mask = np.concatenate([mask, np.ones((1, 1), np.int64)], 1)
        feed.update({p: outs[q] for p, q in zip(pasts, presents)})
    with open(session.end_profiling()) as f:
        events = json.load(f)
    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"),
                  key=lambda e: e["ts"])[1:]  # the decode steps (the first run is the prefill)
    by_op: dict[str, float] = defaultdict(float)
    inside = 0.0
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if any(r["ts"] <= event["ts"] <= r["ts"] + r["dur"] for r in runs):
            by_op[event["args"]["op_name"]] += event["dur"] / 1e3
            inside += event["dur"] / 1e3
    total, k = sum(r["dur"] for r in runs) / 1e3, len(runs)
    return {"steps": k, "ms_per_token": total / k, "outside_ops_ms_per_token": (total - inside) / k,
            "ops_ms_per_token": {op: t / k for op, t in sorted(by_op.items(), key=lambda x: -x[1])}}


# ----------------------------------------------------------------------------------------------- speed
def bench_speed(name: str, graphs: dict[str, str], args: argparse.Namespace, say) -> dict:
    """Round-robin timed generation over float and quantized graphs (granular and frozen)."""
    from xlora_runtime.session import XLoraSession

    info = XLoraSession(graphs["float"]).info
    prompt = np.random.default_rng(args.seed).integers(3, info.vocab_size, args.prompt_len).tolist()
    modes = (("granular", None),) if args.granular_only else (("granular", None), ("frozen", 0))
    engines = {f"{graph} {how}": runtime_engine(path, args.threads, freeze)
               for how, freeze in modes for graph, path in graphs.items()}
    say(f"{name}: warm-up, then {args.runs} runs round-robin over {len(engines)} engines")
    first = {engine: run(prompt, args.new_tokens) for engine, run in engines.items()}
    samples: dict[str, list[dict]] = {engine: [] for engine in engines}
    for _ in range(args.runs):
        for engine, run in engines.items():
            if args.wait_quiet:
                wait_quiet(args.wait_quiet)
            samples[engine].append(timings(run(prompt, args.new_tokens)))
    rows = {}
    for engine, values in samples.items():
        graph, how = engine.split()
        reference = first[f"float {how}"][0]
        rows[engine] = {"graph": graph, "scalings": how,
                        "prefill_ms": statistics.median(v["prefill_ms"] for v in values),
                        "decode_tok_s": statistics.median(v["decode_tok_s"] for v in values),
                        "best_decode_tok_s": max(v["decode_tok_s"] for v in values),
                        "free_running_token_agreement": float(np.mean(np.array(first[engine][0]) == reference)),
                        "runs": values}
    for row in rows.values():
        row["decode_x_float"] = row["decode_tok_s"] / rows[f"float {row['scalings']}"]["decode_tok_s"]
        row["prefill_x_float"] = rows[f"float {row['scalings']}"]["prefill_ms"] / row["prefill_ms"]
    result = {"model": name, "engines": rows}
    if args.profile:
        say(f"{name}: profiling {args.profile} decode steps of each granular graph")
        result["profile"] = {graph: profile_decode(path, prompt, args.profile, args.threads)
                             for graph, path in graphs.items()}
    return result


def files_mb(graph: str) -> float:
    from xlora_runtime.format import contract as C

    paths = [graph, graph + ".data", C.frozen_path(graph)]
    return sum(os.path.getsize(p) for p in paths if os.path.isfile(p)) / 1e6


def render(rows: list[tuple], head: tuple) -> str:
    lines = [head] + rows
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = ["  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
           for line in lines]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=["llama-32m"], help="recipes to time (and measure)")
    parser.add_argument("--agreement-models", nargs="*", default=["tiny-llama-trained"],
                        help="recipes whose agreement only is measured")
    parser.add_argument("--graphs", nargs="*", default=[], help="existing float exports (with OUT.frozen.onnx) to "
                        "time and measure, read only")
    parser.add_argument("--no-timing", action="store_true", help="quantize and measure only (no generation timed)")
    parser.add_argument("--modes", nargs="+", default=["int8", "int4"], choices=["int8", "int4"])
    parser.add_argument("--block-size", type=int, default=32, help="int4 block size")
    parser.add_argument("--quantize-lm-head", action="store_true", help="also measure each mode with lm_head "
                        "quantized (variants MODE+head; plain MODE: the export's default, lm_head quantized in int4)")
    parser.add_argument("--granular-only", action="store_true", help="time the granular graphs only (a large model: "
                        "each frozen engine opens the main graph again)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per engine (medians), after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of ONNX Runtime")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS", help="profile STEPS decode steps of each "
                        "granular graph with ONNX Runtime's profiler (default 0: no profile)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S", help="before each timed run, wait up to "
                        "S seconds until other processes use < 0.25 CPUs (default 0: do not wait)")
    parser.add_argument("--out", default=CACHE, help="folder of the quantized graphs (default benchmarks/.cache)")
    parser.add_argument("--json", help="write the results (with machine info and every run) here")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    sources = {name: prepare(name, say)["graph"] for name in args.models + args.agreement_models}
    sources.update({os.path.basename(g)[: -len(".onnx")]: os.path.abspath(g) for g in args.graphs})
    timed = [] if args.no_timing else args.models + [os.path.basename(g)[: -len(".onnx")] for g in args.graphs]
    variants = args.modes + ([f"{m}+head" for m in args.modes] if args.quantize_lm_head else [])
    quantized = {(name, v): quantize_graph_files(graph, v, args.block_size, args.out, say)
                 for name, graph in sources.items() for v in variants}
    speed = [bench_speed(name, {"float": sources[name], **{v: quantized[name, v]["graph"] for v in variants}},
                         args, say) for name in timed]

    info = machine(args.threads)
    print(f"batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy; {args.threads} threads; "
          f"{info['cpu_count']} CPUs ({info['cpu']}); onnxruntime {info['onnxruntime']}; int4 block size "
          f"{args.block_size}")
    rows = []
    for result in speed:
        for row in result["engines"].values():
            name = result["model"]
            graph = sources[name] if row["graph"] == "float" else quantized[name, row["graph"]]["graph"]
            rows.append((name, row["graph"], row["scalings"], f"{row['prefill_ms']:.1f}", f"{row['decode_tok_s']:.1f}",
                         f"{row['best_decode_tok_s']:.1f}", f"{row['decode_x_float']:.2f}", f"{files_mb(graph):.1f}",
                         f"{row['free_running_token_agreement']:.0%}"))
    if rows:
        print(f"speed, medians of {args.runs} runs:")
        print(render(rows, ("model", "graph", "scalings", "prefill ms", "decode tok/s", "best tok/s", "x float",
                            "files MB", "same tokens")))
        print("x float: decode tok/s over the float graph's (same scalings mode); files: graph(s) + weights on disk; "
              "same tokens: free-running greedy tokens equal to the float graph's (diverge after one flip)")
    rows, memory = [], []
    for (name, mode), stamp in quantized.items():
        a, f = stamp["agreement"]["main"], stamp["agreement"].get("frozen")
        rows.append((name, mode, "", str(a["positions"]), f"{a['tokens']:.1%}", f"{a['logits_error']:.1%}",
                     f"{a['scalings_max_diff']:.3f}", f"{a['scalings_mean_diff']:.4f}", f"{a['experts']:.1%}",
                     f"{f['tokens']:.1%}" if f else "-", f"{stamp['float_bytes'] / 1e6:.1f}",
                     f"{stamp['bytes'] / 1e6:.1f}"))
        weights, peaks = stamp.get("float_weights_bytes"), stamp.get("peak_rss_bytes") or {}
        if weights and peaks:
            memory.append((name, mode, "", f"{weights / 1e9:.2f}",
                           *(f"{peaks[s] / 1e9:.2f} ({peaks[s] / weights:.2f}x)" if s in peaks else "-"
                             for s in ("quantize", "agreement")), f"{stamp.get('quantize_only_s') or 0:.0f}",
                           f"{stamp['quantize_s']:.0f}"))
    print("agreement with the float graph (teacher-forced; main graph, and frozen graph top-1 tokens):")
    print(render(rows, ("model", "mode", "", "positions", "top-1 tokens", "logits error", "scalings max",
                        "scalings mean", "top-1 experts", "frozen top-1", "float MB", "quantized MB")))
    if memory:
        print("peak resident set of this process (GB, and x the float weights' file), seconds:")
        print(render(memory, ("model", "mode", "", "float weights GB", "quantizing", "agreement", "quantize s",
                              "total s")))
    for result in speed:
        for graph, p in (result.get("profile") or {}).items():
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(p["ops_ms_per_token"].items())[:8])
            print(f"profile {result['model']} {graph} granular: {p['ms_per_token']:.2f} ms per decode token, "
                  f"{p['outside_ops_ms_per_token']:.2f} outside the ops; ms per token: {top}")
    if args.json:
        payload = {"settings": {k: v for k, v in vars(args).items() if k != "json"}, "machine": info,
                   "speed": speed, "quantized": {f"{n} {m}": s for (n, m), s in quantized.items()}}
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
