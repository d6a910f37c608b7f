"""`xlora-parity`: the eager model against the runtime, the tool a user runs before deploying."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import numpy_helper

from helpers import built, exported
from xlora_export import parity


def test_parity_passes_on_the_default_model(tmp_path, capsys):
    report = tmp_path / "report.json"
    code = parity.main([built("tiny-llama"), exported("tiny-llama"), "--json", str(report), "--steps", "12"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "9/9 passed" in out
    record = json.loads(report.read_text())
    assert record["passed"] is True
    assert sorted({c["top_k"] for c in record["cases"]}) == [0, 1, 3]
    assert {c["prompt_len"] for c in record["cases"]} == {3, 11, 24}
    assert all(c["tokens_equal"] and c["logits_max_diff"] < 1e-4 for c in record["cases"])


def test_parity_with_text_prompts_and_chosen_top_k(capsys):
    code = parity.main([built("tiny-llama"), exported("tiny-llama"), "--prompt", "the model mixes",
                        "--prompt", "a cache", "--top-k", "2", "--steps", "6"])
    assert code == 0
    assert "2/2 passed" in capsys.readouterr().out


def test_parity_fails_on_a_corrupted_graph(tmp_path, capsys):
    source = exported("tiny-llama")
    model = onnx.load(source)
    for init in model.graph.initializer:
        if "lm_head.weight" in init.name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(1.01), init.name))
    bad = tmp_path / "bad.onnx"
    onnx.save_model(model, str(bad))
    report = tmp_path / "report.json"
    code = parity.main([built("tiny-llama"), str(bad), "--steps", "4", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out
    assert json.loads(report.read_text())["passed"] is False


def test_parity_bad_inputs(tmp_path, capsys):
    code = parity.main([built("tiny-llama"), str(tmp_path / "missing.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("xlora-parity: error:") and err.count("\n") == 1
    code = parity.main([built("tiny-llama"), exported("tiny-llama"), "--top-k", "9"])
    err = capsys.readouterr().err
    assert code == 1 and "expert_top_k=9" in err
