"""Export benchmark: time, peak memory and files of `xlora-export` per recipe and dtype, and per stage.

    python benchmarks/bench_export.py                                   # tiny-llama and llama-32m, fp32
    python benchmarks/bench_export.py --models tinyllama-1.1b --dtypes fp32 fp16 --json out.json
    python benchmarks/bench_export.py --models mistral-7b-xlora --dtypes fp16 --cache /big/disk   # 15 GB + 15 GB

Each recipe is built into `CACHE/NAME` (once; default `benchmarks/.cache`; the 1.1B recipe takes about 1.5 min
and 4.4 GB, the 7B one about 1.5 min and 15.3 GB), then exported with both graphs (`--frozen-scalings`, validated)
by the `xlora-export` command in a child process, whose peak resident memory the kernel reports (`ru_maxrss` of
the reaped child). Each stage the export announces (loading, tracing, eager references, validation, ...) gets
its seconds and the peak of the child's resident memory sampled every 50 ms while it ran. Printed: tables and,
with `--json`, every figure with the machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
sys.path.insert(0, ROOT)


def build(name: str, cache: str = CACHE) -> str:
    """The recipe's checkpoint folder in `cache`, built once."""
    from models.recipes import RECIPES
    from models.recipes import build as build_recipe

    folder = os.path.join(cache, name)
    if not os.path.isfile(os.path.join(folder, "xlora_config.json")):
        print(f"building {name} ...", flush=True)
        build_recipe(RECIPES[name], folder)
    return folder


def weight_bytes(folder: str, dtype: str) -> int:
    """Bytes of the X-LoRA model's weights in `dtype` (base, experts, classifier), from the safetensors headers."""
    total = 0
    for parent, _, files in os.walk(folder):
        for f in files:
            if f.endswith(".safetensors"):
                with open(os.path.join(parent, f), "rb") as handle:
                    header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
                total += sum(_numel(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total * (4 if dtype == "fp32" else 2)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _rss(pid: int) -> int:
    """Resident bytes of process `pid` now (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _StageWatch:
    """The child's progress lines as stages: each one's start (the child's own clock), wall seconds and the peak
    of its RSS, sampled every `period` seconds by a thread while the parent reads the lines."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.stages: list[dict] = [{"stage": "start-up", "start_s": 0.0, "peak_rss_bytes": 0}]
        self._t0 = time.perf_counter()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._done.wait(self.period):
            stage = self.stages[-1]
            stage["peak_rss_bytes"] = max(stage["peak_rss_bytes"], _rss(self.pid))

    def line(self, text: str) -> None:
        m = re.match(r"\[\s*([\d.]+)s\] (.*)", text)
        if m:
            self._close(time.perf_counter())
            self.stages.append({"stage": m.group(2).strip(), "start_s": float(m.group(1)), "peak_rss_bytes": 0,
                                "_t": time.perf_counter()})

    def _close(self, now: float) -> None:
        last = self.stages[-1]
        last["seconds"] = now - last.pop("_t", self._t0)

    def finish(self) -> list[dict]:
        self._done.set()
        self._thread.join()
        self._close(time.perf_counter())
        return self.stages


def _child_env() -> dict[str, str]:
    """The child's environment: torch's OpenMP threads sleep between parallel regions (OMP_WAIT_POLICY=PASSIVE
    unless set). On a shared 2-core machine spinning threads wait for each other's time slices: an eager fp16
    forward of a 1.3 GB model took 5.5 s spinning, 0.9 s passive, at a load average of 7."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def export_once(folder: str, dtype: str, out: str, extra: list[str] | None = None) -> dict:
    """Run `xlora-export` in a child; its wall time, peak RSS (the child's own `ru_maxrss`), stages (seconds and
    sampled peak RSS each) and files."""
    log_path = out + ".log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "xlora_export.cli", folder, out, "--dtype", dtype,
                                  "--frozen-scalings", "--force", *(extra or [])], stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, bufsize=1, env=_child_env())
        watch = _StageWatch(child.pid)
        for text in child.stdout:
            log.write(text)
            log.flush()
            watch.line(text)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        stages = watch.finish()
    with open(log_path) as log:
        text = log.read()
    failed = os.waitstatus_to_exitcode(status) != 0  # its stages are still reported (how far it got, at what cost)
    parity = [line for line in text.splitlines() if line.startswith("parity")]
    stem = os.path.basename(out)[:-len(".onnx")] + "."
    files = {f: os.path.getsize(os.path.join(os.path.dirname(out), f)) for f in os.listdir(os.path.dirname(out))
             if f.startswith(stem) and not f.endswith(".log")}
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "stages": stages, "parity": parity,
            "files": files, "error": text.strip().splitlines()[-1] if failed else None}


_QUANTIZE_CHILD = r"""
import os, shutil, sys, time
from xlora_export import quantize
from xlora_export.quantize import QuantizeOptions, quantize_files
from xlora_runtime.format import contract as C
float_main, out_main, mode, agreement, steps = sys.argv[1:6]
if steps != "0":
    quantize.AGREEMENT_STEPS = int(steps)
start = time.perf_counter()
def progress(message):
    print(f"[{time.perf_counter() - start:6.1f}s] {message}", flush=True)
floats = {"main": float_main, "frozen": C.frozen_path(float_main)}
outputs = {"main": out_main, "frozen": C.frozen_path(out_main)}
shutil.copyfile(C.tokenizer_path(float_main), C.tokenizer_path(out_main))
report = quantize_files(floats, outputs, QuantizeOptions(mode), agreement == "1", progress)
progress("done")
print("\n".join(report.lines()))
"""


def quantize_once(float_graph: str, mode: str, agreement: bool = True, steps: int = 0) -> dict:
    """Quantize an earlier float export (`float_graph`, with its frozen graph) in a child, as `--quantize` does
    after the export's validation (`quantize.quantize_files`: both graphs, one weights file, the agreement with
    the float graphs measured unless not `agreement`, over `steps` decode steps instead of the exporter's when
    given), into a folder beside it named after the mode, under the same file names; wall time, peak RSS, stages
    and files as `export_once`."""
    folder = os.path.join(os.path.dirname(float_graph), os.path.basename(float_graph)[:-len(".onnx")] + "-" + mode)
    os.makedirs(folder, exist_ok=True)
    out = os.path.join(folder, os.path.basename(float_graph))
    with open(out + ".log", "w") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-c", _QUANTIZE_CHILD, float_graph, out, mode,
                                  "1" if agreement else "0", str(steps)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                 env=_child_env())
        watch = _StageWatch(child.pid)
        lines = []
        for text in child.stdout:
            log.write(text)
            log.flush()
            watch.line(text)
            lines.append(text.rstrip())
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        stages = watch.finish()
    failed = os.waitstatus_to_exitcode(status) != 0
    files = {f: os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if not f.endswith(".log")}
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "stages": stages,
            "parity": [line for line in lines if not line.startswith("[")], "files": files,
            "error": (lines[-1] if lines else str(status)) if failed else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "llama-32m"], help="recipes of models/recipes.py")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "fp16"])
    parser.add_argument("--quantize", choices=["int8", "int4"], help="export with --quantize too")
    parser.add_argument("--reuse-float", action="store_true", help="with --quantize: quantize the float export an "
                        "earlier run left in the cache (the quantization stage alone, in its own process) instead of "
                        "exporting again")
    parser.add_argument("--no-agreement", action="store_true", help="with --reuse-float: skip the quantized graphs' "
                        "agreement runs (four decodes of 25 steps, two of them on the float graphs)")
    parser.add_argument("--agreement-steps", type=int, default=0, metavar="N", help="with --reuse-float: decode "
                        "steps of the agreement runs (default: the exporter's)")
    parser.add_argument("--cache", default=CACHE, help="where checkpoints and exports go (default benchmarks/.cache)")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    rows = []
    for name in args.models:
        folder = build(name, args.cache)
        for dtype in args.dtypes:
            tag = f"-{args.quantize}" if args.quantize else ""
            if args.quantize and args.reuse_float:
                print(f"quantizing the {name} {dtype} export ({args.quantize}) ...", flush=True)
                result = quantize_once(os.path.join(args.cache, f"{name}-{dtype}.onnx"), args.quantize,
                                       not args.no_agreement, args.agreement_steps)
            else:
                out = os.path.join(args.cache, f"{name}-{dtype}{tag}.onnx")
                print(f"exporting {name} ({dtype}{', ' + args.quantize if args.quantize else ''}) ...", flush=True)
                result = export_once(folder, dtype, out, ["--quantize", args.quantize] if args.quantize else None)
            weights = weight_bytes(folder, dtype)
            on_disk = sum(size for f, size in result["files"].items() if not f.endswith(".json"))
            rows.append({"model": name, "dtype": dtype, "quantize": args.quantize, "weight_bytes": weights, **result,
                         "rss_x_weights": result["peak_rss_bytes"] / weights,
                         "disk_x_weights": on_disk / weights})
    print()
    print("| model | dtype | weights | export s | peak RSS | RSS / weights | files on disk / weights |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['weight_bytes'] / 1e9:.2f} GB | {r['seconds']:.0f} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['rss_x_weights']:.2f}x | {r['disk_x_weights']:.2f}x |")
    for r in rows:
        print(f"\n{r['model']} {r['dtype']}: stages (seconds, peak RSS sampled every 50 ms, / weights)")
        print("| stage | starts at s | seconds | peak RSS | / weights |")
        print("|---|---|---|---|---|")
        for st in r["stages"]:
            print(f"| {st['stage'][:90]} | {st['start_s']:.1f} | {st['seconds']:.1f} | "
                  f"{st['peak_rss_bytes'] / 1e9:.2f} GB | {st['peak_rss_bytes'] / r['weight_bytes']:.2f}x |")
    for r in rows:
        for line in r["parity"]:
            print(f"{r['model']} {r['dtype']}: {line}")
        if r["error"]:
            print(f"{r['model']} {r['dtype']}: FAILED: {r['error']}")
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "load_avg": os.getloadavg()}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
