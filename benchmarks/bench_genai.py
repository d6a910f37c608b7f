"""Generation speed against ONNX Runtime GenAI: its model builder's graphs as the anchor rows.

    python benchmarks/bench_genai.py [--model llama-32m] [--expert code] [--prompt-len 128] [--new-tokens 32]
                                     [--rounds 7] [--threads 2] [--seed 0] [--wait-quiet S] [--json OUT.json]

What a user deploys instead of X-LoRA on a CPU: the base model exported by ONNX Runtime GenAI's model builder
(`python -m onnxruntime_genai.models.builder -i BASE -o OUT -p fp32|int4 -e cpu`) and one LoRA served through
`og.Adapters`. Needs the `bench` extra (`pip install -e ".[bench]"`: onnxruntime-genai). Engines, all greedy, batch 1,
no stop token, the same random prompt:

    genai fp32               the builder's fp32 graph of the recipe's base model (the reference of every ratio)
    genai fp32 + lora        the same with one expert (--expert, a PEFT folder of the recipe) served by og.Adapters
    genai int4               the builder's int4 graph (`-p int4`, its defaults)
    base alone[ gqa]         the project's plain base graph (bench_generate.export_base_graph) in the runtime's
                             cache manager, in a child process of its own that holds that one session
    base in-process[ gqa]    the same graph in this process, beside every other session
    xlora two-pass[ gqa]     the runtime's Generator on the X-LoRA export, scalings per token (exact X-LoRA)
    xlora frozen[ gqa]       the same, scalings frozen after the prompt (one pass per token)
    int4 two-pass / frozen   the same on the `--attention gqa` export quantized to int4 (xlora-export --quantize
                             int4: MatMulNBits, block 32, lm_head int4, LoRA and classifier in 8 bits)

" gqa": the graphs exported with `--attention gqa`; without: the portable flavour (`--attention onnx`).

The builder's `adapter_path` option bakes the LoRA into the graph as constant MatMuls (the `lora_A` / `lora_B`
weights, B scaled by alpha / r). For `og.Adapters` those weights must be graph inputs and live in an adapter file:
`make_adapter_model` turns each `*.lora_[AB].MatMul.weight` initializer into a graph input whose rank dimension
is `lora_r` and writes the values with ONNX Runtime's `AdapterFormat` (.onnx_adapter); `og.Adapters` feeds them
at every step. The baked graph is kept: its logits check the adapter path.

Timing: every engine in this one process except the `base alone` rows (this process waits on the child while it
runs), taken round-robin in each round after one warm-up each; per token timestamps as bench_generate takes them
(prefill = call to first token, decode tok/s = (new tokens - 1) / first to last token). Each round gives each
engine's decode tok/s over GenAI fp32's of the same round (int4 rows also over GenAI int4's, X-LoRA rows also over
GenAI + LoRA's); the table shows the median and the range over the rounds. Checks (untimed): greedy tokens and the
logits of every step along them, GenAI fp32 against the project's base graph (both flavours), and GenAI + LoRA
served by og.Adapters against the baked LoRA graph.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_generate import CACHE, ROOT, Run, machine, prepare, runtime_engine, timings, wait_quiet  # noqa: E402

GENAI_ROOT = os.path.join(CACHE, "genai")
LORA_WEIGHT = re.compile(r"\.lora_([AB])\.MatMul\.weight$")
ADAPTER = "expert"  # the name the adapter is loaded under


# ----------------------------------------------------------------------------------------------- GenAI graphs
def build_genai(checkpoint: str, expert: str, threads: int, say: Callable[[str], None]) -> dict[str, str]:
    """The builder's graphs of the checkpoint's base model (fp32, int4, fp32 with `expert` baked in) under
    benchmarks/.cache/genai/NAME-*, rebuilt when the checkpoint or onnxruntime-genai changed; and the adapter
    model (graph + .onnx_adapter file). Returns folder paths by key ("fp32", "int4", "lora-baked", "lora") and
    "adapter_file"."""
    import onnxruntime_genai as og

    name = os.path.basename(checkpoint)
    base, adapter = os.path.join(checkpoint, "base"), os.path.join(checkpoint, expert)
    key = {"genai": og.__version__, "expert": expert, "threads": threads,
           "mtimes": [os.path.getmtime(os.path.join(base, "model.safetensors")),
                      os.path.getmtime(os.path.join(adapter, "adapter_model.safetensors"))]}
    out = {k: os.path.join(GENAI_ROOT, f"{name}-{k}") for k in ("fp32", "int4", "lora-baked", "lora")}
    out["adapter_file"] = os.path.join(out["lora"], f"{expert}.onnx_adapter")
    stamp_path = os.path.join(GENAI_ROOT, f"{name}.json")
    if os.path.isfile(stamp_path):
        with open(stamp_path) as f:
            if json.load(f) == key and all(os.path.exists(p) for p in out.values()):
                say(f"{name}: reusing the GenAI builds in {os.path.relpath(GENAI_ROOT, ROOT)}")
                return out
    os.makedirs(GENAI_ROOT, exist_ok=True)
    for kind, precision, extra in (("fp32", "fp32", None), ("int4", "int4", None),
                                   ("lora-baked", "fp32", f"adapter_path={adapter}")):
        say(f"{name}: onnxruntime_genai.models.builder -p {precision}" + (f" --extra_options {extra}" if extra else ""))
        shutil.rmtree(out[kind], ignore_errors=True)
        command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", base, "-o", out[kind],
                   "-p", precision, "-e", "cpu", "-c", os.path.join(GENAI_ROOT, "hf-cache")]
        built = subprocess.run(command + (["--extra_options", extra] if extra else []), capture_output=True, text=True)
        if built.returncode:
            raise SystemExit(f"the GenAI builder failed ({kind}):\n{built.stderr[-3000:]}")
        configure(out[kind], threads)
    shutil.rmtree(out["lora"], ignore_errors=True)
    shutil.copytree(out["lora-baked"], out["lora"])
    n = make_adapter_model(os.path.join(out["lora"], "model.onnx"), out["adapter_file"])
    say(f"{name}: {n} LoRA weights of the baked graph made graph inputs, written to "
        f"{os.path.relpath(out['adapter_file'], ROOT)}")
    with open(stamp_path, "w") as f:
        json.dump(key, f)
    return out


def configure(folder: str, threads: int) -> None:
    """genai_config.json: `threads` intra-op threads, and no end-of-sequence token (every run makes its tokens,
    as the project's rows run with no stop token)."""
    path = os.path.join(folder, "genai_config.json")
    with open(path) as f:
        config = json.load(f)
    config["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    config["model"]["eos_token_id"] = []  # an empty list: none (an id must be < vocab)
    with open(path, "w") as f:
        json.dump(config, f, indent=4)


def make_adapter_model(model_path: str, adapter_path: str) -> int:
    """Turn the baked LoRA weights of the builder's graph at `model_path` into graph inputs (rewritten in place) and
    write their values to `adapter_path` (ONNX Runtime's adapter format); returns how many.

    A weight `...lora_A.MatMul.weight` (in, r) becomes an input of shape (in, "lora_r"), `...lora_B...` (r, out)
    one of ("lora_r", out): og.Adapters feeds the adapter's tensors by these names."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper

    model = onnx.load(model_path)  # with its external data, read into memory before the files are rewritten
    params: dict[str, np.ndarray] = {}
    kept = []
    for init in model.graph.initializer:
        match = LORA_WEIGHT.search(init.name)
        if not match:
            kept.append(init)
            continue
        value = numpy_helper.to_array(init)
        params[init.name] = value
        dims = ["lora_r", value.shape[1]] if match.group(1) == "B" else [value.shape[0], "lora_r"]
        model.graph.input.append(onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT, dims))
    if not params:
        raise SystemExit(f"{model_path}: no LoRA weights found (expected initializers named *.lora_A.MatMul.weight)")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    data = os.path.basename(model_path) + ".data"
    os.remove(os.path.join(os.path.dirname(model_path), data))
    onnx.save_model(model, model_path, save_as_external_data=True, location=data)
    adapter = ort.AdapterFormat()
    adapter.set_adapter_version(1)
    adapter.set_model_version(1)
    adapter.set_parameters({k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for k, v in params.items()})
    adapter.export_adapter(adapter_path)
    return len(params)


def genai_engine(folder: str, adapter_file: str | None = None) -> Callable[..., Run]:
    """A GenAI generator per call (the adapter activated when given): `run(prompt, n, logits=None) -> Run`; with a
    list `logits`, each step's (vocab,) logits are appended to it.

    `generate_next_token` picks a token from the current logits, then runs the model on it: a token's timestamp is
    taken when its logits are ready (before the call that picks it), so that the first token comes after the prompt's
    forward and decode tok/s counts the forwards the project's rows count; the last call's forward (for a token
    never used) falls after the last timestamp."""
    import onnxruntime_genai as og

    model = og.Model(folder)
    adapters = None
    if adapter_file:
        adapters = og.Adapters(model)
        adapters.load(adapter_file, ADAPTER)

    def run(prompt: list[int], n: int, logits: list | None = None) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + n, do_sample=False)
        generator = og.Generator(model, params)
        if adapters is not None:
            generator.set_active_adapter(adapters, ADAPTER)
        generator.append_tokens(np.array([prompt], np.int32))  # the prompt's forward
        for _ in range(n):
            # this token's logits are ready: the prompt's forward, then each call's (as the project's rows time it)
            times.append(time.perf_counter())
            if logits is not None:
                logits.append(np.array(generator.get_logits()).reshape(-1))
            generator.generate_next_token()  # picks the token from them, then runs the model on it
            tokens.append(int(generator.get_next_tokens()[0]))
        return tokens, times, t0

    return run


# ----------------------------------------------------------------------------------------------- project base
def base_engine(graph: str, base_graph: str, threads: int) -> Callable[..., Run]:
    """The project's plain base graph in the runtime's cache manager, the X-LoRA graph's own session released (only
    the base graph's session stays open): `run(prompt, n, logits=None) -> Run`, as `genai_engine`."""
    from xlora_runtime import XLoraSession
    from xlora_runtime.kv_cache import CacheGroup

    session = XLoraSession(graph, threads=threads)
    session._frozen = session.backend.open(base_graph)
    del session.main  # the cache manager runs the frozen slot only
    info = session.info
    uniform = np.full((1, info.n_modules, info.n_experts), 1 / info.n_experts, np.float32)

    def run(prompt: list[int], n: int, logits: list | None = None) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        group = CacheGroup(session, np.arange(1), frozen=True, fixed_scalings=uniform)
        mask = np.ones((1, len(prompt) + n), np.int64)
        out = group.run(np.array([prompt]), mask[:, :len(prompt)], np.arange(len(prompt))[None], info.default_top_k)
        for step in range(n):
            last = out.last_logits[0].reshape(-1)
            tokens.append(int(last.argmax()))
            times.append(time.perf_counter())
            if logits is not None:
                logits.append(np.array(last))
            if step == n - 1:
                break
            total = len(prompt) + step + 1
            out = group.run(np.array([[tokens[-1]]]), mask[:, :total], np.array([[total - 1]]), info.default_top_k)
        group.release()
        return tokens, times, t0

    return run


def alone_engine(graph: str, base_graph: str, threads: int) -> tuple[Callable[..., Run], Callable[[], None]]:
    """`base_engine` in a child process of its own (this script with --worker); this process blocks while it runs.
    Returns (run, close)."""
    child = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", graph, base_graph, str(threads)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(prompt: list[int], n: int) -> Run:
        child.stdin.write(json.dumps({"prompt": prompt, "n": n}) + "\n")
        child.stdin.flush()
        while True:  # skip anything else a library printed
            line = child.stdout.readline()
            if not line:
                raise SystemExit("the base-graph worker exited")
            if line.startswith("{"):
                answer = json.loads(line)
                return answer["tokens"], answer["times"], answer["t0"]

    def close() -> None:
        child.stdin.close()
        child.wait(timeout=30)

    return run, close


def worker(graph: str, base_graph: str, threads: int) -> int:
    """The child of `alone_engine`: one JSON request per line on stdin, one Run per line on stdout."""
    run = base_engine(graph, base_graph, threads)
    for line in sys.stdin:
        request = json.loads(line)
        tokens, times, t0 = run(request["prompt"], request["n"])
        print(json.dumps({"tokens": tokens, "times": times, "t0": t0}), flush=True)
    return 0


# ----------------------------------------------------------------------------------------------- measurement
def compare(a: Callable, b: Callable, prompt: list[int], n: int) -> dict:
    """Greedy tokens and the logits of every step, engine `a` against `b` (untimed runs)."""
    la: list[np.ndarray] = []
    lb: list[np.ndarray] = []
    ta, tb = a(prompt, n, la)[0], b(prompt, n, lb)[0]
    same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), len(ta))  # steps until the first difference
    diffs = [float(np.abs(x - y).max()) for x, y in zip(la[:same + 1], lb[:same + 1])]
    return {"same_tokens": ta == tb, "steps_equal": same, "max_abs_logit_diff": max(diffs),
            "first_step_logit_diff": diffs[0], "logit_scale": float(np.abs(la[0]).max())}


def bench(args: argparse.Namespace, say: Callable[[str], None]) -> dict:
    """Build what is missing, run the checks, then the timed rounds; returns the checks, each engine's medians,
    best and per-round ratios (`vs ANCHOR`), the load averages and the greedy tokens."""
    from bench_quantize import quantize_graph_files

    flavours = {a: prepare(args.model, say, a) for a in ("onnx", "gqa")}
    checkpoint = flavours["onnx"]["checkpoint"]
    if not os.path.isdir(os.path.join(checkpoint, args.expert)):
        raise SystemExit(f"--expert {args.expert!r}: no such expert folder in {checkpoint}")
    genai = build_genai(checkpoint, args.expert, args.threads, say)
    int4 = quantize_graph_files(flavours["gqa"]["graph"], "int4", 32, CACHE, say)["graph"]
    from xlora_runtime import XLoraSession

    vocab = XLoraSession(flavours["onnx"]["graph"]).info.vocab_size
    prompt = np.random.default_rng(args.seed).integers(3, vocab, args.prompt_len).tolist()
    n = args.new_tokens

    say(f"{args.model}: checks (greedy tokens and logits along them)")
    checks = {}
    fp32 = genai_engine(genai["fp32"])
    lora = genai_engine(genai["lora"], genai["adapter_file"])
    for attention, tag in (("onnx", ""), ("gqa", " gqa")):
        info = flavours[attention]
        checks[f"genai fp32 vs base{tag}"] = compare(fp32, base_engine(info["graph"], info["base_graph"], args.threads),
                                                     prompt, n)
    checks["genai fp32 + lora (og.Adapters) vs the baked LoRA graph"] = compare(lora, genai_engine(genai["lora-baked"]),
                                                                              prompt, n)
    checks["genai fp32 + lora vs genai fp32"] = compare(lora, fp32, prompt, n)

    engines: dict[str, Callable] = {"genai fp32": fp32, "genai fp32 + lora": lora,
                                    "genai int4": genai_engine(genai["int4"])}
    closers = []
    for attention, tag in (("onnx", ""), ("gqa", " gqa")):
        info = flavours[attention]
        run, close = alone_engine(info["graph"], info["base_graph"], args.threads)
        engines[f"base alone{tag}"] = run
        closers.append(close)
        engines[f"base in-process{tag}"] = base_engine(info["graph"], info["base_graph"], args.threads)
    for attention, tag in (("onnx", ""), ("gqa", " gqa")):
        engines[f"xlora two-pass{tag}"] = runtime_engine(flavours[attention]["graph"], args.threads, None)
        engines[f"xlora frozen{tag}"] = runtime_engine(flavours[attention]["graph"], args.threads, 0)
    engines["int4 two-pass gqa"] = runtime_engine(int4, args.threads, None)
    engines["int4 frozen gqa"] = runtime_engine(int4, args.threads, 0)

    say(f"{args.model}: warm-up, then {args.rounds} rounds round-robin over {len(engines)} engines")
    first = {e: run(prompt, n) for e, run in engines.items()}
    load_before = os.getloadavg()
    samples: dict[str, list[dict]] = {e: [] for e in engines}
    for _ in range(args.rounds):
        for engine, run in engines.items():
            quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
            result = run(prompt, n)
            if result[0] != first[engine][0]:
                raise SystemExit(f"{engine}: greedy tokens changed between runs")
            samples[engine].append(dict(timings(result), others_cpus_before=quiet))
    load_after = os.getloadavg()
    for close in closers:
        close()

    anchors = {"genai fp32": lambda e: True, "genai fp32 + lora": lambda e: e.startswith("xlora"),
               "genai int4": lambda e: e.startswith("int4")}
    rows = {}
    for engine, values in samples.items():
        row = {"prefill_ms": statistics.median(v["prefill_ms"] for v in values),
               "decode_tok_s": statistics.median(v["decode_tok_s"] for v in values),
               "best_decode_tok_s": max(v["decode_tok_s"] for v in values), "runs": values}
        for anchor, applies in anchors.items():
            if applies(engine):
                per_round = [v["decode_tok_s"] / a["decode_tok_s"] for v, a in zip(values, samples[anchor])]
                best = max(v["decode_tok_s"] for v in values) / max(a["decode_tok_s"] for a in samples[anchor])
                row[f"vs {anchor}"] = {"median": statistics.median(per_round), "min": min(per_round),
                                       "max": max(per_round), "best": best, "rounds": per_round}
        rows[engine] = row
    tokens = {e: first[e][0] for e in engines}
    return {"model": args.model, "expert": args.expert, "checks": checks, "engines": rows,
            "load_average_before": load_before, "load_average_after": load_after, "greedy_tokens": tokens}


def table(result: dict) -> str:
    """A markdown table of `bench`'s result: one row per engine, its ratios to the anchors that apply to it."""
    anchors = ("genai fp32", "genai fp32 + lora", "genai int4")
    lines = ["| engine | decode tok/s | best | prefill ms | " + " | ".join(f"x {a}" for a in anchors) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(anchors)]
    for engine, row in result["engines"].items():
        cells = []
        for anchor in anchors:
            r = row.get(f"vs {anchor}")
            cells.append(f"{r['median']:.2f} ({r['min']:.2f}-{r['max']:.2f}; best {r['best']:.2f})" if r else "")
        lines.append(f"| {engine} | {row['decode_tok_s']:.1f} | {row['best_decode_tok_s']:.1f} | "
                     f"{row['prefill_ms']:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    if argv is None and sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-32m", help="recipe of models/recipes.py (default llama-32m)")
    parser.add_argument("--expert", default="code", help="the recipe's expert served through og.Adapters")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7, help="timed round-robin rounds, after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every engine")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each timed run, wait up to S seconds until other processes use < 0.25 CPUs "
                             "(bench_generate's --wait-quiet; default 0: do not wait)")
    parser.add_argument("--json", help="write the results (with machine info and every run) here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.rounds < 1 or args.prompt_len < 1:
        parser.error("need --new-tokens >= 2, --rounds >= 1, --prompt-len >= 1")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    import onnxruntime_genai as og

    result = bench(args, say)
    info = machine(args.threads)
    info["onnxruntime_genai"] = og.__version__
    load = result["load_average_before"], result["load_average_after"]
    print(f"{args.model}, batch 1, prompt {args.prompt_len} tokens, {args.new_tokens} greedy tokens, {args.threads} "
          f"threads; {info['cpu_count']} CPUs ({info['cpu']}); onnxruntime {info['onnxruntime']}, onnxruntime-genai "
          f"{og.__version__}; 1-min load average {load[0][0]:.2f} before the rounds, {load[1][0]:.2f} after")
    print(f"medians of {args.rounds} rounds (best: the fastest round); x ANCHOR: decode tok/s over the anchor's in "
          f"the same round, median (range over the rounds; best: the fastest round's over the anchor's fastest)")
    print(table(result))
    for name, check in result["checks"].items():
        print(f"{name}: same greedy tokens {check['same_tokens']} ({check['steps_equal']}/{args.new_tokens} steps), "
              f"max |logit diff| {check['max_abs_logit_diff']:.2e} along them (first step "
              f"{check['first_step_logit_diff']:.2e}; logits up to {check['logit_scale']:.1f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "machine": info, "result": result}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
