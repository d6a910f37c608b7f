"""The Python side of gpu_check.sh: the environment report, the CPU reference, the GPU runs compared with it, and
polygraphy's inputs.

    python benchmarks/gpu_check.py environment              versions, driver, GPUs; exit 1 with one line when
                                                            libcudart does not load or no GPU is visible
    python benchmarks/gpu_check.py reference OUT.onnx REF.npz
                                  greedy tokens, logits and scalings of three left-padded prompts (16 new tokens)
                                  on ONNX Runtime's CPU provider (run on the machine that exported the graph)
    python benchmarks/gpu_check.py compare GRAPH PROVIDER REF.npz --atol A
                                  the same generation on PROVIDER (cuda, tensorrt, trt-engine; GRAPH an .onnx or
                                  an .engine): tokens equal, logits within A; the session refuses to start on any
                                  provider but the one asked for, so the check cannot pass on the CPU
    python benchmarks/gpu_check.py polygraphy OUT.onnx INPUTS.json SHAPES.txt
                                  a left-padded prefill of batch 2 (polygraphy's JSON format) and the TensorRT
                                  profile arguments (`--trt-min-shapes ...`, one line each) of the wide profile
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime"))

PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])  # three lengths: left padding
NEW_TOKENS = 16


def _cudart() -> ctypes.CDLL | None:
    """libcudart as the runtime's CUDA wrapper finds it (polygraphy's), or any the loader finds."""
    try:
        from polygraphy import cuda

        return cuda.wrapper().handle
    except Exception:  # polygraphy missing or its loader failing: the system's own search
        for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", ctypes.util.find_library("cudart")):
            try:
                return ctypes.CDLL(name) if name else None
            except OSError:
                continue
    return None


def environment() -> int:
    import onnxruntime

    versions = {"onnxruntime": onnxruntime.__version__, "providers": onnxruntime.get_available_providers()}
    for module in ("tensorrt", "polygraphy"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    print(json.dumps(versions))
    cudart = _cudart()
    if cudart is None:
        print("libcudart not found: no CUDA runtime library loads (install the CUDA runtime, or "
              "nvidia-cuda-runtime-cu12 beside onnxruntime-gpu)", file=sys.stderr)
        return 1
    runtime, driver, count = ctypes.c_int(0), ctypes.c_int(0), ctypes.c_int(0)
    cudart.cudaRuntimeGetVersion(ctypes.byref(runtime))
    cudart.cudaDriverGetVersion(ctypes.byref(driver))
    status = cudart.cudaGetDeviceCount(ctypes.byref(count))
    print(f"CUDA runtime {runtime.value // 1000}.{runtime.value % 1000 // 10}, driver supports CUDA "
          f"{driver.value // 1000}.{driver.value % 1000 // 10}, GPUs {count.value}")
    if status != 0 or count.value == 0:
        print(f"no GPU visible: libcudart loads, cudaGetDeviceCount returned error {status} with {count.value} "
              f"GPUs (driver {driver.value or 'missing'})", file=sys.stderr)
        return 1
    return 0


def _generate(graph: str, provider: str) -> list:
    from xlora_runtime import Generator, XLoraSession

    session = XLoraSession(graph, provider=provider, threads=1 if provider == "cpu" else None)
    return Generator(session).generate(list(PROMPTS), max_new_tokens=NEW_TOKENS, stop_token_ids=[],
                                       return_logits=True)


def reference(graph: str, out: str) -> int:
    results = _generate(graph, "cpu")
    np.savez(out, tokens=np.array([r.tokens for r in results]), logits=np.stack([r.logits for r in results]),
             scalings=np.stack([r.scalings for r in results]))
    print(f"reference: {out}")
    return 0


def compare(graph: str, provider: str, ref: str, atol: float) -> int:
    want = np.load(ref)
    results = _generate(graph, provider)
    tokens = np.array([r.tokens for r in results])
    logits = float(np.abs(np.stack([r.logits for r in results]) - want["logits"]).max())
    scalings = float(np.abs(np.stack([r.scalings for r in results]) - want["scalings"]).max())
    same = bool((tokens == want["tokens"]).all())
    print(json.dumps({"graph": os.path.basename(graph), "provider": provider, "tokens_equal": same,
                      "max_logits_diff": logits, "max_scalings_diff": scalings, "atol": atol}))
    return 0 if same and logits <= atol else 1


def polygraphy_inputs(graph: str, inputs_path: str, shapes_path: str) -> int:
    from polygraphy.json import save_json

    from xlora_runtime.format import contract as C
    from xlora_runtime.format.record import GraphInfo
    from xlora_runtime.profiles import limits_for, wide_profile

    info = GraphInfo.read(graph)
    n, kv, hd = info.num_layers, info.kv_heads, info.head_dim
    ids = np.random.default_rng(0).integers(3, info.vocab_size, (2, 9))
    mask = np.ones((2, 9), np.int64)
    mask[1, :4] = 0  # left padding
    feed = {C.INPUT_IDS: ids, C.ATTENTION_MASK: mask, C.POSITION_IDS: np.clip(mask.cumsum(-1) - 1, 0, None),
            C.TOP_K: np.array(2, np.int64)}
    feed.update({name: np.zeros((2, kv, 0, hd), np.float32) for name in C.past_names(n) + C.past_names(n, True)})
    save_json([feed], inputs_path)
    profile = wide_profile(info, limits_for(info, max_batch=4, max_sequence=64, max_total=128))
    with open(shapes_path, "w") as f:
        for k, flag in enumerate(("--trt-min-shapes", "--trt-opt-shapes", "--trt-max-shapes")):
            shapes = " ".join(f"{name}:[{','.join(map(str, shape[k]))}]" for name, shape in profile.items())
            f.write(f"{flag} {shapes}\n")
    return 0


def main(argv: list[str]) -> int:
    command, rest = argv[0], argv[1:]
    if command == "environment":
        return environment()
    if command == "reference":
        return reference(*rest)
    if command == "compare":
        graph, provider, ref, flag, atol = rest
        assert flag == "--atol"
        return compare(graph, provider, ref, float(atol))
    if command == "polygraphy":
        return polygraphy_inputs(*rest)
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
