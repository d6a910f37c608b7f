"""Generation speed on a CPU: the torch-free runtime (ONNX Runtime) against the eager X-LoRA model.

    python benchmarks/bench_generate.py [--models tiny-llama llama-32m] [--prompt-len 128] [--new-tokens 32]
                                        [--runs 5] [--threads 2] [--json OUT.json]
                                        [--seed 0] [--no-hf-base] [--wait-quiet SECONDS]

For each model: build it with its recipe (models/recipes.py) into benchmarks/.cache/NAME (reused when the
recipe did not change), export it once with the frozen graph (benchmarks/.cache/NAME.onnx), then time greedy
generation of one random prompt (fixed seed, batch 1, no stop tokens) with every engine:

    ort granular    xlora_runtime.Generator.stream, scalings per token (two passes, both caches)
    ort frozen      the same with freeze_scalings_after=0 (frozen graph: one pass, one cache)
    graph two-pass  the exported main graph driven by the runtime's cache manager (`CacheGroup`) in a bare
                    greedy loop: what the graph costs per token, without the generator's bookkeeping
    graph frozen    the frozen graph (fixed uniform scalings) in the same loop
    graph base      the plain base model (no experts, no classifier) exported the same way (`export_base_graph`:
                    the same decoder forward and weight passes, last-position logits) in the same loop: the
                    floor the two-pass graph is measured against (2 passes + the LoRA terms)
    eager granular  the eager xLoRAModel with both caches: the reference of the ratios
    eager frozen    the same with the scalings frozen at the prompt's last token (generate's
                    freeze_scalings_after=0)
    hf base         the bare base model's transformers `generate` with its cache (no experts at all)
    peft xlora      PEFT's XLoraModel `generate` (it cannot use a KV cache: use_cache=False), --peft-tokens
                    new tokens only

Then the decode speed at several contexts (--contexts, default 32 128 448: prompts of those lengths, 16 new
tokens) for the graph rows and ort granular, and the runtime's peak resident memory in a child process
(main + frozen graph loaded, one granular and one frozen generation) against weights + caches.

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
def prepare(name: str, say: Callable[[str], None], attention: str = "onnx") -> dict:
    """Build (or reuse) the checkpoint and its export in benchmarks/.cache; returns paths and timings.

    `attention` "gqa": the graphs (and the plain base graph) exported with `--attention gqa`, as NAME.gqa.onnx."""
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
    flavour = "" if attention == "onnx" else f".{attention}"
    folder, graph = os.path.join(CACHE, name), os.path.join(CACHE, f"{name}{flavour}.onnx")
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
    digest = exporter_digest()
    done = stamp.setdefault("exports", {}).get(attention, {})  # this attention's export, if any
    if "export_s" in done and done.get("exporter") == digest and os.path.isfile(graph) and os.path.isfile(frozen):
        say(f"{name}: reusing {os.path.relpath(graph, ROOT)} (exported in {done['export_s']:.1f} s)")
        info.update(export_s=done["export_s"], export_reused=True)
    else:
        say(f"{name}: exporting (two-pass + frozen graphs, attention {attention}, validated against the eager model)")
        t0 = time.perf_counter()
        report = export(folder, graph, ExportOptions(frozen_scalings=True, force=True, attention=attention))
        done = {"export_s": time.perf_counter() - t0, "exporter": digest,
                "parity": {k: dict(v.max_diff) for k, v in report.parity.items()}}
        stamp["exports"][attention] = done
        info.update(export_s=done["export_s"], export_reused=False)
        say(f"{name}: exported in {done['export_s']:.1f} s, max diff vs eager {done['parity']}")
    info["parity"] = done.get("parity")
    info["base_graph"] = os.path.join(CACHE, f"{name}{flavour}.base.onnx")
    if not os.path.isfile(info["base_graph"]) or done.get("base_graph_of") != done.get("export_s"):
        say(f"{name}: exporting the plain base graph")
        export_base_graph(folder, info["base_graph"], attention)
        done["base_graph_of"] = done.get("export_s")
    with open(stamp_path, "w") as f:
        json.dump(stamp, f, indent=1)
    return info


def exporter_digest() -> str:
    """A hash of the exporter's sources (`xlora_export/*.py`): a cached graph from other code is exported again."""
    import hashlib

    folder = os.path.join(ROOT, "xlora_export")
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


def export_base_graph(folder: str, path: str, attention: str = "onnx") -> None:
    """The checkpoint's base model alone as a graph with the frozen graph's signature, traced and given its
    weights by the exporter's own passes: `decoder_pass` without gates (no LoRA op), lm_head on the last position.
    The frozen graph's `scalings` and `top_k` inputs are kept by a zero-cost use (ONNX drops unused inputs), so
    that the runtime's cache manager drives it like the frozen graph. With `attention` "gqa" its attention is
    GroupQueryAttention too, and its metadata says so (the runtime then updates its caches in place)."""
    import dataclasses
    import json

    import onnx
    import torch

    from xlora_export.decoder import attention_masks, decoder_pass, lm_logits
    from xlora_export.export import ExportOptions, _example_inputs
    from xlora_export.graph import _flat, _pairs
    from xlora_export.onnx_passes import WeightStore, attach_weights, fold_constants
    from xlora_export.xlora_utils import load_model
    from xlora_runtime.format import contract as C

    model = load_model(folder)[0].eval()
    model.spec = dataclasses.replace(model.spec, attention_op=attention)
    n = model.config.num_hidden_layers

    class BaseGraph(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids, mask, pos, *rest):
            past, scalings, top_k = _pairs(rest[:2 * n]), rest[2 * n], rest[-1]
            masks = attention_masks(mask, ids.shape[1], model.spec.windows)
            hidden, present = decoder_pass(model.model, model.spec, ids, pos, masks, past, None)
            logits = lm_logits(model.model, model.spec, hidden[:, -1:])
            keep = (scalings[:1, :1, :1] * 0 + top_k * 0).to(logits.dtype)  # (1, 1, 1) zeros
            return (logits + keep, *_flat(present))

    wrapper = BaseGraph()
    with torch.no_grad():
        torch.onnx.export(wrapper, _example_inputs(model, True), path, input_names=C.input_names(n, True),
                          output_names=C.output_names(n, True), dynamic_axes=C.dynamic_axes(n, True),
                          opset_version=ExportOptions().opset, dynamo=False, export_params=False,
                          do_constant_folding=False, custom_opsets={C.ORT_DOMAIN: 1} if attention == "gqa" else None)
    proto = onnx.load(path)
    fold_constants(proto)
    weights = dict(wrapper.named_buffers(remove_duplicate=False))
    weights.update(wrapper.named_parameters(remove_duplicate=False))
    large = sum(w.numel() * w.element_size() for w in weights.values()) > 1 << 30  # protobuf's 2 GB limit
    store = WeightStore(path + ".data" if large else None)  # its own weights file: the base graph is separate
    attach_weights(proto, weights, store, rename={k: k.removeprefix("model.") for k in weights})
    store.close()
    entry = proto.metadata_props.add()
    entry.key, entry.value = C.METADATA_KEY, json.dumps({"attention": attention})
    onnx.save_model(proto, path)


# ----------------------------------------------------------------------------------------------- engines
def runtime_engine(graph: str, threads: int, freeze: int | None) -> Callable[[list[int], int], Run]:
    """The runtime's streaming generator; each TokenEvent is timestamped when it is yielded."""
    from xlora_runtime import XLoraSession

    return generator_engine(XLoraSession(graph, threads=threads), freeze)


def generator_engine(session, freeze: int | None) -> Callable[[list[int], int], Run]:
    """`runtime_engine` on an open `XLoraSession` (two passes, or frozen after `freeze` steps)."""
    from xlora_runtime import Generator

    generator = Generator(session)

    def run(prompt: list[int], n: int) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        for event in generator.stream(prompt, max_new_tokens=n, stop_token_ids=[], freeze_scalings_after=freeze):
            times.append(time.perf_counter())
            tokens.append(event.token)
        return tokens, times, t0

    return run


def graph_engine(graph: str, threads: int, kind: str, base_graph: str | None = None
                 ) -> Callable[[list[int], int], Run]:
    """A bare greedy loop over the runtime's cache manager: `kind` "two-pass" (main graph), "frozen" (frozen
    graph, uniform fixed scalings) or "base" (`base_graph` in the frozen graph's place)."""
    from xlora_runtime import XLoraSession
    from xlora_runtime.kv_cache import CacheGroup

    session = XLoraSession(graph, threads=threads)
    if kind == "base":
        session._frozen = session.backend.open(base_graph)
    info = session.info
    uniform = np.full((1, info.n_modules, info.n_experts), 1 / info.n_experts, np.float32)
    top_k = info.default_top_k

    def run(prompt: list[int], n: int) -> Run:
        tokens, times = [], []
        t0 = time.perf_counter()
        group = CacheGroup(session, np.arange(1), frozen=kind != "two-pass",
                           fixed_scalings=None if kind == "two-pass" else uniform)
        mask = np.ones((1, len(prompt) + n), np.int64)
        out = group.run(np.array([prompt]), mask[:, :len(prompt)], np.arange(len(prompt))[None], top_k)
        for step in range(n):
            token = int(out.last_logits[0].argmax())
            tokens.append(token)
            times.append(time.perf_counter())
            if step == n - 1:
                break
            total = len(prompt) + step + 1
            out = group.run(np.array([[token]]), mask[:, :total], np.array([[total - 1]]), top_k)
        group.release()
        return tokens, times, t0

    return run


def peft_engine(model, checkpoint: str) -> Callable[[list[int], int], Run]:
    """PEFT's XLoraModel over the same base, experts and classifier weights; its `generate` without a cache
    (PEFT's X-LoRA cannot run one), timestamped per token like `hf base`."""
    import torch
    from peft import XLoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    c = model.xlora_config
    base = AutoModelForCausalLM.from_pretrained(os.path.join(checkpoint, "base")).eval()
    base.config.use_cache = False
    adapters = {str(i): os.path.join(checkpoint, name) for i, name in enumerate(model.adapter_names)}
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=c.hidden_size, adapters=adapters,
                         enable_softmax=c.enable_softmax, enable_softmax_topk=c.enable_softmax_topk,
                         softmax_temperature=c.softmax_temperature, layerwise_scalings=c.layerwise_scalings,
                         top_k_lora=c.top_k_lora, xlora_depth=c.xlora_depth, xlora_size=c.xlora_size,
                         xlora_dropout_p=0.0, scaling_pass_value=c.scaling_pass_value,
                         global_scaling_weight=c.global_scaling_weight)
    peft_model = get_peft_model(base, config).eval()
    targets = [m for m in peft_model.base_model.internal_xlora_classifier.layers if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for target, source in zip(targets, model.internal_xlora_classifier.linears(), strict=True):
            target.weight.copy_(source.weight)
            target.bias.copy_(source.bias)
    return hf_base_engine(peft_model, use_cache=False)


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


def hf_base_engine(base, use_cache: bool = True) -> Callable[[list[int], int], Run]:
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
        config = GenerationConfig(max_new_tokens=n, do_sample=False, use_cache=use_cache, eos_token_id=None,
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

    flavours = {attention: prepare(name, say, attention) for attention in args.attention}
    info = flavours[args.attention[0]]
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

    engines = {}
    for attention, graph in flavours.items():  # the first --attention unnamed, the others' rows suffixed
        tag = "" if attention == args.attention[0] else f" {attention}"
        engines[f"ort granular{tag}"] = runtime_engine(graph["graph"], args.threads, None)
        engines[f"ort frozen{tag}"] = runtime_engine(graph["graph"], args.threads, 0)
        for kind in ("two-pass", "frozen", "base"):
            engines[f"graph {kind}{tag}"] = graph_engine(graph["graph"], args.threads, kind, graph["base_graph"])
    engines[REFERENCE] = eager_engine(model, frozen=False)
    engines["eager frozen"] = eager_engine(model, frozen=True)
    if not args.no_hf_base:
        engines["hf base"] = hf_base_engine(base)
    if args.peft_tokens:
        engines["peft xlora"] = peft_engine(model, info["checkpoint"])
    new_tokens = {engine: args.peft_tokens if engine == "peft xlora" else args.new_tokens for engine in engines}
    say(f"{name}: {n_base / 1e6:.1f}M base parameters ({n_all / 1e6:.1f}M with experts and classifier); "
        f"warm-up, then {args.runs} runs round-robin over {len(engines)} engines")
    first = {engine: run(prompt, new_tokens[engine]) for engine, run in engines.items()}  # warm-up
    samples: dict[str, list[dict]] = {engine: [] for engine in engines}
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    for _ in range(args.runs):
        for engine, run in engines.items():
            quiet = wait_quiet(args.wait_quiet) if args.wait_quiet else None
            busy0, cpu0 = busy_cpu_s(), time.process_time()
            result = run(prompt, new_tokens[engine])
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
        "peft xlora": (first["peft xlora"][0] == first[REFERENCE][0][:args.peft_tokens]
                       if "peft xlora" in first else None),
        REFERENCE: check_generate(model, prompt, args.new_tokens, False, first[REFERENCE][0]),
        "eager frozen": check_generate(model, prompt, args.new_tokens, True, first["eager frozen"][0]),
    }
    for tag in tags(args.attention):
        same[f"ort granular{tag}"] = first[f"ort granular{tag}"][0] == first[REFERENCE][0]
        same[f"ort frozen{tag}"] = first[f"ort frozen{tag}"][0] == first["eager frozen"][0]
        same[f"graph two-pass{tag}"] = first[f"graph two-pass{tag}"][0] == first[REFERENCE][0]
        same[f"graph base{tag}"] = first[f"graph base{tag}"][0] == first["hf base"][0] if "hf base" in first else None
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
            if f"{prefix}decode_tok_s" in row:
                row[f"{prefix}decode_speedup_vs_eager"] = row[f"{prefix}decode_tok_s"] / ref[f"{prefix}decode_tok_s"]
    ratios = {}
    for tag in tags(args.attention):  # per token, against the plain base graph of the same attention, same loop
        base_row = rows[f"graph base{tag}"]
        ratios.update({
            f"decode two-pass / base{tag}": base_row["decode_tok_s"] / rows[f"graph two-pass{tag}"]["decode_tok_s"],
            f"prefill two-pass / base{tag}": rows[f"graph two-pass{tag}"]["prefill_ms"] / base_row["prefill_ms"],
            f"decode frozen / base{tag}": base_row["decode_tok_s"] / rows[f"graph frozen{tag}"]["decode_tok_s"],
        })
        granular = rows[f"ort granular{tag}"]["decode_tok_s"]
        if "hf base" in rows:
            ratios[f"ort granular{tag} decode tok/s / hf base"] = granular / rows["hf base"]["decode_tok_s"]
        if "peft xlora" in rows:  # PEFT's tokens/s, each token recomputing the whole sequence twice
            ratios[f"ort granular{tag} decode tok/s / peft xlora"] = granular / rows["peft xlora"]["decode_tok_s"]
    say(f"{name}: decode speed at contexts {args.contexts}")
    contexts = context_sweep({k: v for k, v in engines.items() if k.startswith(("graph", "ort granular"))},
                             args.contexts, vocab, args.seed, max(1, args.runs // 2))
    say(f"{name}: runtime peak memory (child process)")
    memory, sizes = {}, {}
    for graph, tag in zip(flavours.values(), tags(args.attention)):
        for mode in ("default", "low_memory"):
            memory[f"{mode}{tag}"] = runtime_memory(graph["graph"], prompt, args.new_tokens, args.threads,
                                                    mode == "low_memory")
        sizes.update({os.path.basename(p): os.path.getsize(p) for p in
                      (graph["graph"], graph["graph"] + ".data", graph["graph"][:-5] + ".frozen.onnx",
                       graph["base_graph"]) if os.path.isfile(p)})
    return {"ratios": ratios, "contexts": contexts, "memory": memory, "graph_bytes": sizes,
            "model": name, "base_params": n_base, "all_params": n_all, "vocab_size": vocab,
            "n_modules": len(model.module_names), "n_experts": len(model.adapter_names),
            "build_s": info["build_s"], "build_reused": info["build_reused"], "export_s": info["export_s"],
            "export_reused": info["export_reused"], "export_parity_max_diff": info["parity"],
            "load_average_before": load_before, "load_average_after": load_after,
            "greedy_tokens": {e: first[e][0] for e in engines}, "engines": rows}


def tags(attentions: list[str]) -> list[str]:
    """The suffix of each attention's engine names: none for the first, " gqa" for the others."""
    return ["" if i == 0 else f" {a}" for i, a in enumerate(attentions)]


def context_sweep(engines: dict[str, Callable[[list[int], int], Run]], contexts: list[int], vocab: int, seed: int,
                  runs: int, new: int = 16) -> dict:
    """Decode tok/s (median of `runs`) of each engine after prompts of each length; and the growth of the time
    per token from the shortest to the longest context."""
    out: dict[str, dict] = {engine: {} for engine in engines}
    for context in contexts:
        prompt = np.random.default_rng(seed + context).integers(3, vocab, context).tolist()
        for engine, run in engines.items():
            run(prompt, 2)  # warm-up at this shape
            out[engine][context] = statistics.median(timings(run(prompt, new))["decode_tok_s"] for _ in range(runs))
    for values in out.values():
        values["growth"] = values[contexts[0]] / values[contexts[-1]]  # time per token, longest / shortest
    return out


_MEMORY_CHILD = """
import json, sys
from xlora_runtime import Generator, XLoraSession
graph, prompt, n, threads = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
low_memory = sys.argv[5] == "1"
def rss(key="VmRSS", path="/proc/self/status"):  # VmHWM: this process's peak (ru_maxrss would carry the parent's)
    with open(path) as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
baseline, baseline_pss = rss(), rss("Pss", "/proc/self/smaps_rollup")
session = XLoraSession(graph, threads=threads, low_memory=low_memory)
session.frozen
generator = Generator(session)
generator.generate(prompt, max_new_tokens=n, stop_token_ids=[])
granular = generator.peak_cache_bytes
generator.generate(prompt, max_new_tokens=n, stop_token_ids=[], freeze_scalings_after=0)
print(json.dumps({"baseline_rss": baseline, "peak_rss": rss("VmHWM"), "baseline_pss": baseline_pss,
                  "end_pss": rss("Pss", "/proc/self/smaps_rollup"),
                  "cache_bytes": max(granular, generator.peak_cache_bytes)}))
"""


def runtime_memory(graph: str, prompt: list[int], n: int, threads: int, low_memory: bool = False) -> dict:
    """Peak RSS of a fresh process that loads the main and the frozen graph and generates with each, against
    weights (the graphs' files) + the peak cache bytes; `baseline_rss` is the process after its imports. Also its
    PSS at the end (`end_pss`): RSS counts a file mapped by both graphs' sessions twice (`low_memory`), PSS once."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, graph, json.dumps(prompt), str(n), str(threads),
                          "1" if low_memory else "0"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    stem = graph[: -len(".onnx")]
    result["weight_bytes"] = sum(os.path.getsize(p) for p in (graph, graph + ".data", stem + ".frozen.onnx")
                                 if os.path.isfile(p))
    held = result["weight_bytes"] + result["cache_bytes"]
    result["rss_over_weights_and_caches"] = (result["peak_rss"] - result["baseline_rss"]) / held
    result["pss_over_weights_and_caches"] = (result["end_pss"] - result["baseline_pss"]) / held
    return result


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
    parser.add_argument("--peft-tokens", type=int, default=4, metavar="N",
                        help="new tokens of PEFT's cache-less X-LoRA generate (0: skip that row; default 4)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[32, 128, 448], metavar="T",
                        help="prompt lengths of the decode-speed-by-context table (default 32 128 448)")
    parser.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                        help="before each timed run, wait up to S seconds until other processes use < 0.25 CPUs "
                             "(for shared machines; Linux only; default 0: do not wait)")
    parser.add_argument("--attention", choices=["onnx", "gqa"], nargs="+", default=["onnx"],
                        help="how the graphs write attention (xlora-export --attention; default onnx); two values "
                             "time both in one run, the second's rows suffixed (\"ort granular gqa\")")
    parser.add_argument("--json", help="write the results (with machine info and every run) here")
    args = parser.parse_args(argv)
    if args.new_tokens < 2 or args.runs < 1 or args.prompt_len < 1:
        parser.error("need --new-tokens >= 2, --runs >= 1, --prompt-len >= 1")
    if len(set(args.attention)) != len(args.attention):
        parser.error("--attention: each value once")

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = [bench_model(name, args, say) for name in args.models]
    info = machine(args.threads)
    print(f"attention {' and '.join(args.attention)}; batch 1, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, greedy; {args.threads} threads; "
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
    for r in results:
        print(f"{r['model']}: " + "; ".join(f"{k} {v:.2f}x" for k, v in r["ratios"].items()))
        print(f"{r['model']}: decode tok/s by context (16 new tokens; growth = time per token at "
              f"{args.contexts[-1]} / at {args.contexts[0]})")
        for engine, values in r["contexts"].items():
            print(f"  {engine:20s} " + "  ".join(f"{c}: {values[c]:7.1f}" for c in args.contexts)
                  + f"  growth {values['growth']:.2f}x")
        for mode, m in r["memory"].items():
            print(f"{r['model']}: runtime ({mode}) peak RSS {m['peak_rss'] / 1e6:.0f} MB "
                  f"({m['baseline_rss'] / 1e6:.0f} MB after imports), PSS at the end {m['end_pss'] / 1e6:.0f} MB, with "
                  f"main + frozen graph loaded; weights {m['weight_bytes'] / 1e6:.0f} MB, peak caches "
                  f"{m['cache_bytes'] / 1e6:.1f} MB: (peak RSS - imports) / (weights + caches) = "
                  f"{m['rss_over_weights_and_caches']:.2f}, (PSS - imports) / (weights + caches) = "
                  f"{m['pss_over_weights_and_caches']:.2f}")
        print(f"{r['model']}: files " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["graph_bytes"].items()))
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
