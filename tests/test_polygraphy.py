"""polygraphy on the exported graph, with ONNX Runtime: `polygraphy check lint` and a golden-output comparison.

These are the tools a TensorRT user runs next (`polygraphy run OUT.onnx --trt --load-inputs ... --load-outputs
golden.json`, see benchmarks/gpu_check.sh); here they run with `--onnxrt`. The golden outputs come from the eager
model (an independent oracle), the inputs are a left-padded prefill and a decode step fed the eager prefill's
caches; a golden file with one logit moved by 1e-2 must fail the comparison.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import xlora_export as xlora
from helpers import built, exported, left_padded
from xlora_export.graph import XLoraGraph
from xlora_runtime.format import contract as C

pytest.importorskip("polygraphy", reason="polygraphy is in the test extra")
pytest.importorskip("onnx_graphsurgeon", reason="polygraphy's lint needs onnx_graphsurgeon (in the test extra)")


def _polygraphy(*args: str) -> subprocess.CompletedProcess:
    beside = os.path.join(os.path.dirname(sys.executable), "polygraphy")  # this interpreter's environment first
    tool = beside if os.path.isfile(beside) else shutil.which("polygraphy")
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """(inputs.json, golden.json, folder): two steps' feeds and the eager model's outputs for them."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    folder = tmp_path_factory.mktemp("polygraphy")
    model = xlora.xlora_utils.load_model(built("tiny-llama"))[0].eval()
    wrapper = XLoraGraph(model)
    n = model.config.num_hidden_layers
    ids, mask = left_padded([[5, 17, 99, 230, 41], [300, 22, 9]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    empty = [torch.zeros(2, 2, 0, 16) for _ in range(4 * n)]
    top_k = torch.tensor(2)
    feeds, results = [], []
    with torch.no_grad():
        prefill = (ids, mask, pos, *empty, top_k)
        out = wrapper(*prefill)
        step_ids = out[0][:, -1].argmax(-1, keepdim=True)
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        decode = (step_ids, step_mask, pos[:, -1:] + 1, *out[2:], top_k)
        for args in (prefill, decode):
            outputs = wrapper(*args)
            feeds.append({name: t.numpy() for name, t in zip(C.input_names(n), args)})
            results.append(IterationResult({name: t.numpy() for name, t in zip(C.output_names(n), outputs)},
                                           runner_name="eager"))
    save_json(feeds, str(folder / "inputs.json"))
    runs = RunResults()
    runs.append(("eager", results))
    runs.save(str(folder / "golden.json"))
    return folder


def test_polygraphy_lint(golden):
    report = golden / "lint.json"
    result = _polygraphy("check", "lint", exported("tiny-llama"), "--load-inputs", str(golden / "inputs.json"),
                         "-o", str(report))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    content = json.loads(report.read_text())
    assert content["summary"]["failing"] == [] or content["summary"]["failing"] == 0
    assert len(content["summary"]["passing"]) > 100 and content["lint_entries"] == []


def test_polygraphy_golden_outputs_with_onnxruntime(golden):
    """The graph's outputs (logits, scalings, both caches' presents) match the eager model's, compared by
    polygraphy; a golden file off by 1e-2 in one logit fails."""
    args = ["run", exported("tiny-llama"), "--onnxrt", "--load-inputs", str(golden / "inputs.json"),
            "--atol", "1e-4", f"{C.SCALINGS}:1e-5", "--rtol", "0", "--check-error-stat", "max"]
    result = _polygraphy(*args, "--load-outputs", str(golden / "golden.json"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "PASSED" in result.stdout + result.stderr

    from polygraphy.comparator import RunResults

    runs = RunResults.load(str(golden / "golden.json"))
    logits = runs["eager"][1][C.LOGITS]
    logits[0, 0, int(np.argmax(np.abs(logits[0, 0])))] += 1e-2
    runs.save(str(golden / "off.json"))
    result = _polygraphy(*args, "--load-outputs", str(golden / "off.json"))
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr
