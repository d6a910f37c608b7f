"""Generation from a large export with the torch-free runtime: memory against weights + caches, prefill, decode.

    python benchmarks/bench_large_generate.py GRAPH.onnx [--low-memory] [--batch 1 4] [--prompt-len 128]
                                              [--new-tokens 8] [--threads 2] [--json OUT.json]

For a model too large to hold twice (the 7B recipe, whose export the eager model cannot run beside), so no
eager engine: each batch size runs in a fresh child process that opens the export (`XLoraSession`, main and
frozen graph), then generates greedily from `batch` random prompts of `prompt-len` tokens (fixed seed, no stop
tokens) twice: scalings per token (two passes, both caches), then frozen after the prompt
(`freeze_scalings_after=0`: the prompt on the main graph, the decode on the frozen graph, one pass). Per
generation: prefill = the call to the first new tokens, decode tok/s = (new tokens - 1) / time from the first to
the last new token, per sequence (x batch for the aggregate). Memory: the child's peak RSS (`VmHWM`) less its
RSS after the imports, against weights (the export's files) + the generator's peak cache bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

_CHILD = r"""
import json, sys, time
import numpy as np
from xlora_runtime import Generator, XLoraSession

def rss(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))

graph, batch, length, new, threads, low_memory = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1"
baseline = rss("VmRSS")
t0 = time.perf_counter()
session = XLoraSession(graph, threads=threads, low_memory=low_memory)
session.frozen
load_s = time.perf_counter() - t0
rng = np.random.default_rng(0)
prompts = [rng.integers(3, session.info.vocab_size, length).tolist() for _ in range(batch)]
generator = Generator(session)
out = {"load_s": load_s, "baseline_rss": baseline, "after_load_rss": rss("VmRSS"), "runs": {}}
for kind, freeze in (("per-token", None), ("frozen", 0)):
    times = []
    t0 = time.perf_counter()
    for event in generator.stream(prompts, max_new_tokens=new, stop_token_ids=[], freeze_scalings_after=freeze):
        if event.sequence == batch - 1:
            times.append(time.perf_counter())
    out["runs"][kind] = {"prefill_s": times[0] - t0,
                         "decode_tok_s_per_sequence": (len(times) - 1) / (times[-1] - times[0]),
                         "cache_bytes": generator.peak_cache_bytes}
out["peak_rss"] = rss("VmHWM")
print(json.dumps(out))
"""


def export_bytes(graph: str) -> int:
    """Bytes of the export's graphs and weights files (OUT.onnx, OUT.frozen.onnx and every OUT*.data)."""
    folder, stem = os.path.dirname(os.path.abspath(graph)), os.path.basename(graph)[: -len(".onnx")]
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)
               if f.startswith(stem + ".") and (f.endswith((".onnx", ".data"))) and not f.startswith("."))


def measure(graph: str, batch: int, length: int, new: int, threads: int, low_memory: bool) -> dict:
    """One child process (module docstring); its figures with the ratios."""
    child = subprocess.run([sys.executable, "-c", _CHILD, graph, str(batch), str(length), str(new), str(threads),
                            "1" if low_memory else "0"], capture_output=True, text=True)
    if child.returncode != 0:
        raise SystemExit(f"the child failed: {(child.stderr or child.stdout).strip().splitlines()[-1]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    weights = export_bytes(graph)
    cache = max(r["cache_bytes"] for r in result["runs"].values())
    result.update(graph=graph, batch=batch, prompt_len=length, new_tokens=new, threads=threads,
                  low_memory=low_memory, weight_bytes=weights,
                  rss_over_weights_and_caches=(result["peak_rss"] - result["baseline_rss"]) / (weights + cache))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("graph", help="OUT.onnx of an export with --frozen-scalings")
    parser.add_argument("--low-memory", action="store_true", help="open it with low_memory (float graphs)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    rows = [measure(args.graph, b, args.prompt_len, args.new_tokens, args.threads, args.low_memory)
            for b in args.batch]
    name = os.path.basename(args.graph) + (" (low memory)" if args.low_memory else "")
    print(f"\n{name}: weights {rows[0]['weight_bytes'] / 1e9:.2f} GB, {args.threads} threads, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens")
    print("| batch | scalings | load s | prefill s | decode tok/s (per sequence) | caches | peak RSS "
          "| RSS / (weights + caches) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for kind, run in r["runs"].items():
            print(f"| {r['batch']} | {kind} | {r['load_s']:.0f} | {run['prefill_s']:.1f} | "
                  f"{run['decode_tok_s_per_sequence'] * r['batch']:.2f} ({run['decode_tok_s_per_sequence']:.2f}) | "
                  f"{run['cache_bytes'] / 1e6:.0f} MB | {(r['peak_rss'] - r['baseline_rss']) / 1e9:.2f} GB | "
                  f"{r['rss_over_weights_and_caches']:.2f}x |")
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "load_avg": os.getloadavg()}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
