"""Serving throughput and latency: xlora-serve (continuous batching) against requests served one at a time.

    python benchmarks/bench_serve.py [--model llama-32m] [--clients 1 4 8 16] [--max-tokens 64] [--rounds 3]
                                     [--threads 2] [--ray-replicas 1 2] [--json OUT.json]
                                     [--guidellm PATH [--guidellm-streams 1 2 4 8 16] [--guidellm-requests 20]]

The model is built with its recipe and exported once into benchmarks/.cache (bench_generate.py's `prepare`). Every
run sends the same kind of requests: random prompts of 16 to 63 tokens (seed 0), greedy, `ignore_eos`, exactly
--max-tokens new tokens each, streamed (server-sent events, one chunk per token). Rows:

    sequential      the runtime's Generator in this process, one request after another (no server, no batching):
                    the baseline of the ratios
    xlora-serve     `xlora-serve GRAPH --threads T` in a child process; C clients (asyncio + httpx) each send
                    requests back to back over 127.0.0.1
    ray N           the same app as a Ray Serve deployment with N replicas (T / N threads and CPUs each), run
                    with Ray's proxy inside a private network namespace (`unshare -n`, loopback only), where
                    Ray's components bind no other address

Columns: requests/s and output tokens/s over the run's wall time; time to first token (TTFT: request sent to its
first token) and time per output token (TPOT: a request's (last - first token time) / (tokens - 1)), p50 and p99
over the run's requests; x seq: output tokens/s relative to `sequential` measured in the same round. Each client
sends max(2, 8 / C) requests back to back (`sequential` serves the 1-client run's 8). --rounds rounds each run
`sequential` then every client count; the table shows each figure's median over the rounds (on a machine shared
with other jobs, pairing each run with a baseline measured minutes apart or less keeps the ratios meaningful).

--guidellm PATH adds a second table from a third-party load generator: guidellm (the `guidellm` command at PATH;
it pins older click and multidict than the test environment, so it lives in a virtual environment of its own:
`python -m venv .venv-guidellm && .venv-guidellm/bin/pip install "guidellm>=0.8" "torch==2.13.0"`) runs its
`concurrent` profile, one level per --guidellm-streams value, against `xlora-serve` serving the committed demo
(models/xlora-demo exported once into benchmarks/.cache/xlora-demo.onnx): /v1/completions streamed, with
guidellm's `stream_options` (`include_usage`, `continuous_usage_stats`), synthetic prompts of 64 tokens from the
demo's tokenizer, 64 output tokens (`ignore_eos`), --guidellm-requests requests per level. Rows: requests that
succeeded and failed, requests/s, output tokens/s, TTFT and inter-token latency (ITL) p50 and p99, as guidellm
reports them. `--clients` with no value skips the own client's rows (and Ray's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RUNTIME = os.path.join(ROOT, "runtime")
DEMO = os.path.join(ROOT, "models", "xlora-demo")  # the committed demo checkpoint (guidellm's run)
GUIDELLM_TOKENS = 64  # prompt and output tokens of guidellm's synthetic requests


def requests_for(clients: int, vocab: int, seed: int = 0) -> list[list[list[int]]]:
    """Per client, its prompts (token ids)."""
    rng = np.random.default_rng(seed)
    per_client = max(2, 8 // clients)
    return [[rng.integers(3, vocab, int(rng.integers(16, 64))).tolist() for _ in range(per_client)]
            for _ in range(clients)]


def summarize(records: list[dict], wall: float) -> dict:
    """requests/s, tokens/s, TTFT and TPOT percentiles of a run's request records (times in seconds)."""
    tokens = sum(r["tokens"] for r in records)
    ttft = [r["ttft"] for r in records]
    tpot = [r["tpot"] for r in records if r["tpot"] is not None]
    return dict(requests=len(records), tokens=tokens, wall_s=wall, requests_per_s=len(records) / wall,
                tokens_per_s=tokens / wall, ttft_p50_ms=1e3 * float(np.percentile(ttft, 50)),
                ttft_p99_ms=1e3 * float(np.percentile(ttft, 99)), tpot_p50_ms=1e3 * float(np.percentile(tpot, 50)),
                tpot_p99_ms=1e3 * float(np.percentile(tpot, 99)))


def record(sent: float, times: list[float]) -> dict:
    return dict(tokens=len(times), ttft=times[0] - sent,
                tpot=(times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else None)


# ----------------------------------------------------------------------------------------------- the rows
def sequential(graph: str, threads: int, vocab: int, max_tokens: int):
    """The baseline: Generator.stream, one request after another (the 1-client prompts); returns the runner."""
    from xlora_runtime import Generator, XLoraSession

    generator = Generator(XLoraSession(graph, threads=threads))
    list(generator.stream([5, 17, 99], max_new_tokens=4, stop_token_ids=[]))  # warm-up
    prompts = [p for client in requests_for(1, vocab) for p in client]

    def run() -> dict:
        records, start = [], time.perf_counter()
        for prompt in prompts:
            sent, times = time.perf_counter(), []
            for _ in generator.stream(prompt, max_new_tokens=max_tokens, stop_token_ids=[]):
                times.append(time.perf_counter())
            records.append(record(sent, times))
        return summarize(records, time.perf_counter() - start)

    return run


async def _client(http, prompts: list[list[int]], max_tokens: int, records: list[dict]) -> None:
    for prompt in prompts:
        body = dict(prompt=prompt, max_tokens=max_tokens, temperature=0, ignore_eos=True, stream=True,
                    xlora=dict(return_token_ids=True))  # token ids: every token is a chunk
        sent, times = time.perf_counter(), []
        async with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        assert len(times) == max_tokens, len(times)
        records.append(record(sent, times))


async def _load(url: str, clients: int, vocab: int, max_tokens: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await _client(http, [[5, 17, 99]], 4, [])  # warm-up
        records: list[dict] = []
        start = time.perf_counter()
        await asyncio.gather(*(_client(http, p, max_tokens, records) for p in requests_for(clients, vocab)))
        return summarize(records, time.perf_counter() - start)


def rounds(url: str, baseline, args: argparse.Namespace, vocab: int, say) -> dict:
    """--rounds rounds of: the sequential baseline, then each client count against the server at `url`.
    Returns {"sequential": [per round], "clients": {C: [per round, with x_seq]}}."""
    out: dict = {"sequential": [], "clients": {c: [] for c in args.clients}}
    for r in range(args.rounds):
        base = baseline()
        out["sequential"].append(base)
        say(f" round {r + 1}: sequential {base['tokens_per_s']:.1f} tok/s")
        for clients in args.clients:
            run = asyncio.run(_load(url, clients, vocab, args.max_tokens))
            run["x_seq"] = run["tokens_per_s"] / base["tokens_per_s"]
            out["clients"][clients].append(run)
            say(f"  {clients:2d} clients: {run['tokens_per_s']:.1f} tok/s, {run['x_seq']:.2f}x")
    return out


@contextlib.contextmanager
def served(graph: str, threads: int, *options: str) -> Iterator[str]:
    """`xlora-serve GRAPH` in a child process on 127.0.0.1 (a free port, batch 16, queue 64); yields its URL."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [RUNTIME, os.environ.get("PYTHONPATH")])))
    server = subprocess.Popen([sys.executable, "-m", "xlora_runtime.serve.cli", graph, "--port", "0", "--threads",
                               str(threads), "--max-batch", "16", "--max-queue", "64", *options],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        line = server.stdout.readline()
        yield re.search(r"on (http://127\.0\.0\.1:\d+) ", line).group(1)
    finally:
        server.terminate()
        server.wait(30)


def serve_rows(graph: str, baseline, args: argparse.Namespace, vocab: int, say) -> dict:
    """xlora-serve in a child process, loaded by each client count in turn."""
    with served(graph, args.threads) as url:
        return rounds(url, baseline, args, vocab, say)


def ray_child(args: argparse.Namespace) -> None:
    """Inside the private network namespace: a local Ray cluster, the deployment with N replicas, the load."""
    import ray
    from ray import serve

    from xlora_runtime.serve.ray_app import XLoraDeployment

    replicas = args.ray_child
    temp = tempfile.mkdtemp(prefix="xlora-ray-")  # Ray's files (not /tmp/ray), removed at the end
    os.environ["RAY_TMPDIR"] = temp
    os.makedirs(os.path.join(temp, "ray"))
    ray.init(num_cpus=args.threads, include_dashboard=False, object_store_memory=80 << 20, logging_level="ERROR",
             log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8000}, proxy_location="HeadOnly")
    threads = max(1, args.threads // replicas)
    deployment = XLoraDeployment.options(num_replicas=replicas, max_ongoing_requests=80,
                                         ray_actor_options={"num_cpus": args.threads / replicas})
    serve.run(deployment.bind(args.graph, threads=threads, max_batch=16, max_queue=64), name="xlora")
    baseline = sequential(args.graph, args.threads, args.vocab, args.max_tokens)
    rows = rounds("http://127.0.0.1:8000", baseline, args, args.vocab, lambda s: print(s, file=sys.stderr))
    print("RESULT " + json.dumps(rows), flush=True)
    serve.shutdown()
    ray.shutdown()
    shutil.rmtree(temp, ignore_errors=True)


def ray_rows(graph: str, replicas: int, args: argparse.Namespace, vocab: int, say) -> dict | None:
    prefix = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-rn"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [RUNTIME, os.environ.get("PYTHONPATH")])),
               RAY_USAGE_STATS_ENABLED="0")
    command = (f"ip link set lo up && exec {sys.executable} {os.path.abspath(__file__)} --ray-child {replicas} "
               f"--graph {graph} --vocab {vocab} --threads {args.threads} --max-tokens {args.max_tokens} "
               f"--rounds {args.rounds} --clients {' '.join(map(str, args.clients))}")
    out = subprocess.run([*prefix, "sh", "-c", command], stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if out.returncode != 0:
        say(f"ray {replicas}: failed (exit {out.returncode}); no private network namespace here?")
        return None
    [result] = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    rows = json.loads(result[len("RESULT "):])
    rows["clients"] = {int(k): v for k, v in rows["clients"].items()}
    return rows


# ----------------------------------------------------------------------------------------------- guidellm
def demo_graph(say) -> str:
    """The committed demo exported into benchmarks/.cache/xlora-demo.onnx by `xlora-export` in a child process
    (reused while it is newer than the checkpoint)."""
    graph = os.path.join(HERE, ".cache", "xlora-demo.onnx")
    newest = max(os.path.getmtime(os.path.join(folder, name)) for folder, _, names in os.walk(DEMO) for name in names)
    if os.path.isfile(graph) and os.path.getmtime(graph) > newest:
        say(f"demo: reusing {os.path.relpath(graph, ROOT)}")
        return graph
    os.makedirs(os.path.dirname(graph), exist_ok=True)
    say(f"demo: exporting {os.path.relpath(DEMO, ROOT)} to {os.path.relpath(graph, ROOT)}")
    code = ("from xlora_export.cli import main; "
            f"raise SystemExit(main([{DEMO!r}, {graph!r}, '--frozen-scalings', '--force', '-q']))")
    subprocess.run([sys.executable, "-c", code], check=True, stdout=sys.stderr)
    return graph


def guidellm_figures(benchmark: dict) -> dict:
    """One level of guidellm's JSON report: request counts, throughput (means over the level, as guidellm's
    console shows them) and latency percentiles of the successful requests."""
    metrics, state = benchmark["metrics"], benchmark["scheduler_state"]

    def ok(name: str) -> dict:
        return metrics[name]["successful"]

    return dict(streams=benchmark["config"]["strategy"]["streams"], successful=state["successful_requests"],
                errored=state["errored_requests"] + state["cancelled_requests"],
                requests_per_s=ok("requests_per_second")["mean"], tokens_per_s=ok("output_tokens_per_second")["mean"],
                ttft_p50_ms=ok("time_to_first_token_ms")["percentiles"]["p50"],
                ttft_p99_ms=ok("time_to_first_token_ms")["percentiles"]["p99"],
                itl_p50_ms=ok("inter_token_latency_ms")["percentiles"]["p50"],
                itl_p99_ms=ok("inter_token_latency_ms")["percentiles"]["p99"])


def guidellm_rows(guidellm: str, args: argparse.Namespace, say) -> list[dict]:
    """guidellm's concurrent profile (--guidellm-streams levels, --guidellm-requests each) against xlora-serve
    serving the demo; guidellm's own report goes to stderr. Returns the figures of each level."""
    graph = demo_graph(say)
    model = "xlora-demo"
    with served(graph, args.threads, "--model-name", model) as url, \
            tempfile.TemporaryDirectory(prefix="xlora-guidellm-") as tmp:
        report = os.path.join(tmp, "guidellm.json")
        command = [guidellm, "run", "--disable-console-interactive",
                   "--backend", f"kind=openai_http,target={url},model={model},request_format=/v1/completions",
                   "--profile", "kind=concurrent,streams=1",
                   "--override", "profile.streams", ",".join(map(str, args.guidellm_streams)),
                   "--constraint", f"kind=max_requests,count={args.guidellm_requests}",
                   "--data", f"kind=synthetic_text,prompt_tokens={GUIDELLM_TOKENS},output_tokens={GUIDELLM_TOKENS}",
                   "--tokenizer", f"kind=huggingface_auto,model={os.path.join(DEMO, 'base')}",
                   "--output", f"kind=json,path={report}"]
        say("guidellm: " + " ".join(command))
        subprocess.run(command, check=True, stdout=sys.stderr, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        with open(report) as f:
            return [guidellm_figures(b) for b in json.load(f)["benchmarks"]]


def guidellm_table(rows: list[dict]) -> str:
    lines = ["| streams | succeeded | failed | requests/s | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | "
             "ITL p99 ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['streams']} | {r['successful']} | {r['errored']} | {r['requests_per_s']:.2f} | "
                     f"{r['tokens_per_s']:.1f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                     f"{r['itl_p50_ms']:.1f} | {r['itl_p99_ms']:.1f} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------- report
def median(runs: list[dict]) -> dict:
    """Each figure's median over rounds."""
    return {key: float(np.median([r[key] for r in runs])) for key in runs[0] if isinstance(runs[0][key], float)}


def table(results: dict) -> str:
    lines = ["| server | clients | requests/s | output tok/s | x seq | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | "
             "TPOT p99 ms |", "|---|---|---|---|---|---|---|---|---|"]

    def row(name: str, clients: str, r: dict) -> None:
        lines.append(f"| {name} | {clients} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r.get('x_seq', 1.0):.2f} | {r['ttft_p50_ms']:.0f} | {r['ttft_p99_ms']:.0f} | "
                     f"{r['tpot_p50_ms']:.1f} | {r['tpot_p99_ms']:.1f} |")

    all_baselines = [b for rows in results["servers"].values() for b in rows["sequential"]]
    row("sequential (Generator)", "1", median(all_baselines))
    for name, rows in results["servers"].items():
        for clients, runs in sorted(rows["clients"].items(), key=lambda item: int(item[0])):  # JSON keys are str
            row(name, str(clients), median(runs))
    return "\n".join(lines)


def own_client_rows(args: argparse.Namespace, results: dict, say) -> None:
    """The sequential baseline, xlora-serve and Ray Serve under the own client, into results["servers"]."""
    # build and export in a child process: torch (its threads, its memory) stays out of the process that times the
    # sequential baseline
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); from bench_generate import prepare; "
            f"print(json.dumps(prepare({args.model!r}, lambda m: print(m, file=sys.stderr, flush=True))))")
    prepared = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, check=True)
    graph = json.loads(prepared.stdout.strip().splitlines()[-1])["graph"]
    vocab = 300  # prompts from the tokenizer's few hundred real tokens (the embedding is padded beyond them)
    say("xlora-serve (each round: the sequential baseline, then every client count)")
    baseline = sequential(graph, args.threads, vocab, args.max_tokens)
    results["servers"]["xlora-serve"] = serve_rows(graph, baseline, args, vocab, say)
    del baseline  # its session's memory
    for replicas in args.ray_replicas:
        say(f"Ray Serve, {replicas} replica(s)")
        rows = ray_rows(graph, replicas, args, vocab, say)
        if rows is not None:
            results["servers"][f"ray {replicas} replica{'s' if replicas > 1 else ''}"] = rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-32m", help="recipe of models/recipes.py (default llama-32m)")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 8, 16], help="concurrent clients per run "
                        "(none: skip the own client's and Ray's rows)")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (sequential, every client count); the table "
                        "shows medians (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (Ray: CPUs) in all (default 2)")
    parser.add_argument("--ray-replicas", type=int, nargs="*", default=[1, 2], help="Ray Serve replica counts "
                        "(default 1 2; none: skip Ray)")
    parser.add_argument("--json", help="write every figure and the settings here")
    parser.add_argument("--guidellm", metavar="PATH", help="the guidellm command (its own virtual environment): "
                        "add its concurrency sweep against xlora-serve serving the demo")
    parser.add_argument("--guidellm-streams", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="guidellm's "
                        "concurrent streams, one level each (default 1 2 4 8 16)")
    parser.add_argument("--guidellm-requests", type=int, default=20, help="requests per guidellm level (default 20)")
    parser.add_argument("--ray-child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--graph", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_child:
        ray_child(args)
        return
    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict = {"servers": {}}
    if args.clients:
        own_client_rows(args, results, say)
        print(table(results))
    if args.guidellm:
        say(f"guidellm against xlora-serve serving the demo (streams {' '.join(map(str, args.guidellm_streams))})")
        results["guidellm"] = guidellm_rows(args.guidellm, args, say)
        print(guidellm_table(results["guidellm"]))
    if args.json:
        settings = dict(model=args.model, max_tokens=args.max_tokens, threads=args.threads, clients=args.clients,
                        rounds=args.rounds, guidellm_streams=args.guidellm_streams if args.guidellm else None,
                        guidellm_requests=args.guidellm_requests if args.guidellm else None,
                        machine=dict(cpu=platform.processor() or platform.machine(), cpus=os.cpu_count(),
                                     python=platform.python_version(), load=os.getloadavg()))
        with open(args.json, "w") as f:
            json.dump(dict(settings=settings, results=results), f, indent=1)


if __name__ == "__main__":
    main()
