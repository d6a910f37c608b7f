"""Inputs for gpu_check.sh's polygraphy comparison: a left-padded prefill of batch 2 (polygraphy's JSON format),
and the TensorRT profile arguments (`--trt-min-shapes ...`, one line each) from the runtime's wide profile.

    python benchmarks/gpu_check_inputs.py OUT.onnx INPUTS.json SHAPES.txt
"""

from __future__ import annotations

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime"))


def main(graph: str, inputs_path: str, shapes_path: str) -> int:
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


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:]))
