"""Generation speed of one exported model on several backends, timed the way bench_generate.py times.

    python benchmarks/bench_backends.py GRAPH[@PROVIDER] [GRAPH[@PROVIDER] ...] [--prompt-len 64]
                                        [--new-tokens 32] [--batch 1] [--runs 5] [--threads 2] [--json OUT.json]

GRAPH is an OUT.onnx (provider cpu by default: cpu, cuda, tensorrt, openvino) or an OUT.engine (trt-engine).
For each: open the session (time shown), one warm-up, then --runs greedy generations of one random prompt (fixed
seed, no stop tokens). prefill = time from the call to the first new token; decode tok/s = (new tokens - 1) /
time from the first to the last new token; medians. The table also says whether each backend chose the first
row's tokens. benchmarks/gpu_check.sh runs it on a GPU machine; on a CPU it compares ONNX Runtime and OpenVINO.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "runtime"))  # this checkout's runtime, installed or not


def time_backend(path: str, provider: str | None, prompt: list[int], new_tokens: int, batch: int, runs: int,
                 threads: int | None) -> dict:
    """Open `path` on `provider` and time `runs` generations (after one warm-up)."""
    from xlora_runtime import Generator, XLoraSession

    start = time.perf_counter()
    session = XLoraSession(path, provider=provider, threads=threads)
    opened = time.perf_counter() - start
    generator = Generator(session)
    prompts = [prompt] * batch
    prefill, decode, tokens = [], [], None
    for run in range(runs + 1):
        stamps, chosen = [], []
        start = time.perf_counter()
        for event in generator.stream(prompts, max_new_tokens=new_tokens, stop_token_ids=[]):
            if event.sequence == 0:
                stamps.append(time.perf_counter())
                chosen.append(event.token)
        if run == 0:  # warm-up
            tokens = chosen
            continue
        prefill.append((stamps[0] - start) * 1e3)
        decode.append((len(stamps) - 1) * batch / (stamps[-1] - stamps[0]))
    return {"graph": path, "provider": session.provider, "open_s": opened, "prefill_ms": statistics.median(prefill),
            "decode_tok_s": statistics.median(decode), "tokens": tokens, "dtype": session.info.dtype}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs_on", nargs="+", metavar="GRAPH[@PROVIDER]")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="rows (the same prompt) per call")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per backend (medians), after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (ONNX Runtime CPU, OpenVINO)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    from xlora_runtime.format.record import GraphInfo
    from xlora_runtime.format.sidecar import read_sidecar

    first = args.runs_on[0].split("@")[0]
    info = read_sidecar(first)[0] if first.endswith(".engine") else GraphInfo.read(first)
    prompt = np.random.default_rng(args.seed).integers(3, info.vocab_size, args.prompt_len).tolist()
    rows = []
    for item in args.runs_on:
        path, _, provider = item.partition("@")
        rows.append(time_backend(path, provider or None, prompt, args.new_tokens, args.batch, args.runs,
                                 args.threads))
        print(f"timed {os.path.basename(path)} on {rows[-1]['provider']}", file=sys.stderr, flush=True)
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, greedy, medians of "
          f"{args.runs} runs ({platform.node()}, {platform.processor() or platform.machine()})")
    print(f"{'graph':<28} {'provider':<11} {'dtype':<6} {'open s':>7} {'prefill ms':>11} {'decode tok/s':>13}  "
          f"tokens")
    for row in rows:
        same = "same" if row["tokens"] == rows[0]["tokens"] else "DIFFERENT"
        print(f"{os.path.basename(row['graph']):<28} {row['provider']:<11} {row['dtype']:<6} {row['open_s']:>7.2f} "
              f"{row['prefill_ms']:>11.2f} {row['decode_tok_s']:>13.1f}  {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
