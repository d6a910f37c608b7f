"""Export benchmark: time, peak memory and files of `xlora-export` per recipe and dtype.

    python benchmarks/bench_export.py                                   # tiny-llama and llama-32m, fp32
    python benchmarks/bench_export.py --models tinyllama-1.1b --dtypes fp32 fp16 --json out.json

Each recipe is built into `benchmarks/.cache/NAME` (once; the 1.1B recipe takes about 1.5 min and 4.4 GB),
then exported with both graphs (`--frozen-scalings`, validated) by the `xlora-export` command in a child
process, whose peak resident memory the kernel reports (`ru_maxrss` of the reaped child). Printed: a table
and, with `--json`, every figure with the machine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(ROOT, "benchmarks", ".cache")
sys.path.insert(0, ROOT)


def build(name: str) -> str:
    """The recipe's checkpoint folder, built once."""
    from models.recipes import RECIPES
    from models.recipes import build as build_recipe

    folder = os.path.join(CACHE, name)
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


def export_once(folder: str, dtype: str, out: str) -> dict:
    """Run `xlora-export` in a child; its wall time, peak RSS (the child's own `ru_maxrss`), stages and files."""
    log_path = out + ".log"
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "xlora_export.cli", folder, out, "--dtype", dtype,
                                  "--frozen-scalings", "--force"], stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
    with open(log_path) as log:
        text = log.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"xlora-export failed: {text.strip().splitlines()[-1]}")
    stages = {m.group(2): float(m.group(1)) for m in re.finditer(r"\[\s*([\d.]+)s\] ([\w-]+)", text)}
    parity = [line for line in text.splitlines() if line.startswith("parity")]
    stem = os.path.basename(out)[:-len(".onnx")] + "."
    files = {f: os.path.getsize(os.path.join(os.path.dirname(out), f)) for f in os.listdir(os.path.dirname(out))
             if f.startswith(stem) and not f.endswith(".log")}
    return {"seconds": seconds, "peak_rss_bytes": usage.ru_maxrss * 1024, "stages": stages, "parity": parity,
            "files": files}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "llama-32m"], help="recipes of models/recipes.py")
    parser.add_argument("--dtypes", nargs="+", default=["fp32"], choices=["fp32", "fp16"])
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args(argv)
    os.makedirs(CACHE, exist_ok=True)
    rows = []
    for name in args.models:
        folder = build(name)
        for dtype in args.dtypes:
            out = os.path.join(CACHE, f"{name}-{dtype}.onnx")
            print(f"exporting {name} ({dtype}) ...", flush=True)
            result = export_once(folder, dtype, out)
            weights = weight_bytes(folder, dtype)
            on_disk = sum(size for f, size in result["files"].items() if not f.endswith(".json"))
            rows.append({"model": name, "dtype": dtype, "weight_bytes": weights, **result,
                         "rss_x_weights": result["peak_rss_bytes"] / weights,
                         "disk_x_weights": on_disk / weights})
    print()
    print("| model | dtype | weights | export s | peak RSS | RSS / weights | files on disk / weights |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['dtype']} | {r['weight_bytes'] / 1e9:.2f} GB | {r['seconds']:.0f} | "
              f"{r['peak_rss_bytes'] / 1e9:.2f} GB | {r['rss_x_weights']:.2f}x | {r['disk_x_weights']:.2f}x |")
    for r in rows:
        for line in r["parity"]:
            print(f"{r['model']} {r['dtype']}: {line}")
    if args.json:
        machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                   "load_avg": os.getloadavg()}
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
