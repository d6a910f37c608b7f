"""The runtime served inside a real Triton Inference Server (`xlora-triton --backend python`) against
`xlora-serve`, on the committed demo, in one run on one machine.

    python benchmarks/bench_triton.py [--model demo|RECIPE] [--clients 1 8] [--max-tokens 64] [--requests 16]
                                      [--threads 2] [--overhead 30] [--rounds 2] [--json OUT.json]

Both servers serve the same graph with the same threads and a batch of 16: the demo (models/xlora-demo exported
once into benchmarks/.cache, as bench_serve.py's guidellm rows; a 5 MB model whose decode step takes about as long
as streaming its token) or a recipe of models/recipes.py built and exported once (bench_generate.py's `prepare`;
llama-32m: a model whose step dominates, as bench_serve.py's own rows). Triton is the `tritonserver` of the
nvidia-pytriton wheel, in the venv tests/triton_server.py builds and caches, on 127.0.0.1. Every request (the same
list for both servers) is one of the demo's held-out questions, or for a recipe random token ids (16 to 63, seed
0, as bench_serve.py), greedy, `ignore_eos`, exactly --max-tokens new tokens, streamed: Triton's
`generate_stream` (server-sent events, one per token), xlora-serve's /v1/completions (one chunk per token with
`return_token_ids`). Rows:

    load C          C clients (asyncio + httpx) send --requests requests in all, back to back; output tokens/s
                    over the wall time, and its ratio to the same server's 1-client figure of the same round
                    (the table: the median over the rounds of each, so a round that other jobs slowed down
                    moves the ratio less than a ratio of medians would)
    overhead        one request at a time, one new token, not streamed (Triton's `generate`, xlora-serve's
                    /v1/completions), the two servers alternating request by request: the median latency of
                    each, and Triton's minus xlora-serve's (what Triton's HTTP front end, its scheduler and the
                    Python backend's stub add to a request)

--rounds repeats the load rows (both servers, each client count, alternating); the table shows medians.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [os.path.join(ROOT, "tests"), os.path.join(ROOT, "runtime"), ROOT, HERE]

from bench_serve import demo_graph, served  # noqa: E402
from triton_server import TritonServer, server_env  # noqa: E402


def prompts(model: str, count: int) -> list[str] | list[list[int]]:
    """The demo's held-out questions as plain prompts, round-robin over its tasks; for a recipe, token ids."""
    if model != "demo":
        rng = np.random.default_rng(0)
        return [rng.integers(3, 300, int(rng.integers(16, 64))).tolist() for _ in range(count)]
    from models.demo import TASKS, eval_set, plain_prompt

    per_task = [[plain_prompt(q) for q, _ in eval_set(task, count, seed=3)] for task in TASKS]
    return [per_task[i % len(TASKS)][i // len(TASKS)] for i in range(count)]


def graph_of(model: str, say) -> str:
    """The graph served: the demo's export, or the recipe's (built and exported in a child process)."""
    if model == "demo":
        return demo_graph(say)
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); from bench_generate import prepare; "
            f"print(json.dumps(prepare({model!r}, lambda m: print(m, file=sys.stderr, flush=True))))")
    prepared = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(prepared.stdout.strip().splitlines()[-1])["graph"]


class Target:
    """One server's streamed and single-token requests."""

    def __init__(self, name: str, url: str, stream_path: str, single_path: str, body) -> None:
        self.name, self.url, self.stream_path, self.single_path, self.body = name, url, stream_path, single_path, body

    async def stream(self, client: httpx.AsyncClient, prompt: str, max_tokens: int) -> int:
        """Tokens received for one streamed request."""
        tokens = 0
        async with client.stream("POST", self.url + self.stream_path, json=self.body(prompt, max_tokens, True),
                                 timeout=600) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    event = json.loads(line[6:])
                    if "error" in event:
                        raise RuntimeError(f"{self.name}: {event['error']}")
                    if "output_ids" in event:  # Triton: one event per token
                        tokens += 1
                    elif event.get("usage"):  # xlora-serve: the count in the last chunk (a chunk may hold none)
                        tokens += event["usage"]["completion_tokens"]
        return tokens

    def single(self, client: httpx.Client, prompt: str) -> float:
        """Seconds of one request for one new token, not streamed."""
        start = time.perf_counter()
        client.post(self.url + self.single_path, json=self.body(prompt, 1, False), timeout=600).raise_for_status()
        return time.perf_counter() - start


def triton_target(http: str) -> Target:
    def body(prompt: str | list[int], max_tokens: int, stream: bool) -> dict:
        text = {"text_input": prompt} if isinstance(prompt, str) else {"input_ids": prompt}
        return {**text, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}

    return Target("triton", f"http://{http}", "/v2/models/xlora/generate_stream", "/v2/models/xlora/generate", body)


def serve_target(url: str) -> Target:
    def body(prompt: str | list[int], max_tokens: int, stream: bool) -> dict:
        return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0,
                "stream": stream, "xlora": {"return_token_ids": True},
                **({"stream_options": {"include_usage": True}} if stream else {})}

    return Target("xlora-serve", url, "/v1/completions", "/v1/completions", body)


async def load(target: Target, clients: int, questions: list[str], max_tokens: int) -> dict:
    """`clients` clients share `questions` (each takes the next one when its last is done)."""
    pending = list(reversed(questions))
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients)) as client:
        async def worker() -> int:
            tokens = 0
            while pending:
                tokens += await target.stream(client, pending.pop(), max_tokens)
            return tokens

        start = time.perf_counter()
        counts = await asyncio.gather(*(worker() for _ in range(clients)))
        seconds = time.perf_counter() - start
    if sum(counts) != len(questions) * max_tokens:
        raise RuntimeError(f"{target.name}: {sum(counts)} tokens, expected {len(questions) * max_tokens}")
    return {"tokens_per_s": sum(counts) / seconds, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="demo (default) or a recipe of models/recipes.py")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--requests", type=int, default=16, help="requests per load row (default 16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--overhead", type=int, default=30, help="single-token requests per server (default 30)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", metavar="OUT.json")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    from xlora_runtime.serve.triton import write_repository

    graph = graph_of(args.model, say)
    python = server_env()
    repo = tempfile.mkdtemp(prefix="xlora-bench-triton-")
    write_repository(graph, repo, backend="python", threads=args.threads, engine_limits={"max_batch": 16})
    questions = prompts(args.model, args.requests)
    say(f"tritonserver (nvidia-pytriton) and xlora-serve, {args.threads} threads each")
    triton = TritonServer(repo, python)
    try:
        with served(graph, args.threads, "--model-name", "bench") as url:
            targets = [triton_target(triton.http), serve_target(url)]
            for target in targets:  # warm-up: sessions, pre-packed weights, connections
                asyncio.run(load(target, 2, questions[:2], 4))
            rows: dict[str, dict[int, list[dict]]] = {t.name: {c: [] for c in args.clients} for t in targets}
            for r in range(args.rounds):
                for clients in args.clients:
                    for target in targets:
                        run = asyncio.run(load(target, clients, questions, args.max_tokens))
                        rows[target.name][clients].append(run)
                        say(f"round {r + 1}: {target.name:11s} {clients:2d} clients {run['tokens_per_s']:7.1f} tok/s")
            latencies: dict[str, list[float]] = {t.name: [] for t in targets}
            with httpx.Client() as client:
                for i in range(args.overhead):
                    for target in targets:
                        latencies[target.name].append(target.single(client, questions[i % len(questions)]))
    finally:
        triton.stop()
    report = {"model": args.model, "threads": args.threads, "max_tokens": args.max_tokens,
              "requests": args.requests, "load": {}, "overhead_ms": {}}
    print("\n| server | clients | output tok/s | x 1 client |\n|---|---:|---:|---:|")
    for name, by_clients in rows.items():
        ones = by_clients[min(args.clients)]
        for clients, runs in by_clients.items():
            rate = statistics.median(r["tokens_per_s"] for r in runs)
            ratio = statistics.median(r["tokens_per_s"] / one["tokens_per_s"] for r, one in zip(runs, ones))
            report["load"].setdefault(name, {})[clients] = {"tokens_per_s": rate, "x_one": ratio,
                                                            "runs": [r["tokens_per_s"] for r in runs]}
            print(f"| {name} | {clients} | {rate:.1f} | {ratio:.2f} |")
    print("\n| server | one-token request, median ms |\n|---|---:|")
    for name, values in latencies.items():
        report["overhead_ms"][name] = 1000 * statistics.median(values)
        print(f"| {name} | {report['overhead_ms'][name]:.1f} |")
    extra = report["overhead_ms"]["triton"] - report["overhead_ms"]["xlora-serve"]
    print(f"\nTriton's per-request overhead against xlora-serve: {extra:+.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
