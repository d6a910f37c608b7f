"""Bad files and names: every corrupt, truncated or mismatched file the project reads is a
one-line XLoraError naming the file; adapter names cannot leave the checkpoint; the exporter's validation
prompts fit any vocabulary; `xlora-parity` names the first difference between a graph and a checkpoint."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import xlora_export
from helpers import built, expert_paths, exported, load_base, make_xlora
from models.recipes import Recipe, build
from xlora_export import XLoraError, cli, parity
from xlora_export.checkpoints import read_checkpoint
from xlora_export.export import export
from xlora_export.validate import validation_prompts
from xlora_export.xlora_utils import load_model

RECIPE = "tiny-llama"


def _one_line(message: str) -> str:
    assert message and "\n" not in message.rstrip("\n"), f"expected one line, got {message!r}"
    return message


def _copy(tmp_path, name: str = "ckpt") -> str:
    folder = str(tmp_path / name)
    shutil.copytree(built(RECIPE), folder)
    return folder


def _export_cli(ckpt: str, out: str, capsys) -> tuple[int, str]:
    capsys.readouterr()  # progress bars of the fixture builds
    code = cli.main([ckpt, out, "--no-validate"])
    return code, capsys.readouterr().err


# ----------------------------------------------------------------------------- base model files
def _truncate(path: str) -> None:
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _reshape_tensor(path: str, key: str, shape: tuple[int, ...]) -> None:
    state = load_file(path)
    state[key] = torch.zeros(shape)
    save_file(state, path, metadata={"format": "pt"})


def _drop_tensor(path: str, key: str) -> None:
    state = load_file(path)
    del state[key]
    save_file(state, path, metadata={"format": "pt"})


BASE_CASES = {
    "truncated": (lambda base: _truncate(os.path.join(base, "model.safetensors")), "model.safetensors",
                  "cannot read"),
    "garbage": (lambda base: open(os.path.join(base, "model.safetensors"), "wb").write(b"\x00junk" * 9),
                "model.safetensors", "cannot read"),
    "shape": (lambda base: _reshape_tensor(os.path.join(base, "model.safetensors"), "lm_head.weight", (10, 64)),
              "model.safetensors", "'lm_head.weight' has shape (10, 64), expected (384, 64)"),
    "missing-tensor": (lambda base: _drop_tensor(os.path.join(base, "model.safetensors"),
                                                 "model.layers.0.self_attn.q_proj.weight"),
                       "model.safetensors", "'model.layers.0.self_attn.q_proj.weight' is missing"),
    "no-weights": (lambda base: os.remove(os.path.join(base, "model.safetensors")), "base", "cannot load"),
    "config-not-json": (lambda base: open(os.path.join(base, "config.json"), "w").write("{oops"), "base",
                        "cannot load"),
}


@pytest.mark.parametrize("case", list(BASE_CASES))
def test_bad_base_model_files_are_one_line_errors(case, tmp_path, capsys):
    ckpt = _copy(tmp_path)
    breaks, names, expected = BASE_CASES[case]
    breaks(os.path.join(ckpt, "base"))
    code, err = _export_cli(ckpt, str(tmp_path / "m.onnx"), capsys)
    assert code == 1 and err.startswith("xlora-export: error:"), err
    _one_line(err)
    assert names in err and expected in err and "Traceback" not in err, err
    assert not os.path.exists(tmp_path / "m.onnx")


# ----------------------------------------------------------------------------- X-LoRA files
def _peft_checkpoint(tmp_path) -> str:
    from helpers import peft_oracle

    oracle = peft_oracle(make_xlora(RECIPE, seed=5), RECIPE)
    ckpt = str(tmp_path / "peft")
    oracle.save_pretrained(ckpt)
    state = {f"base_model.internal_xlora_classifier.{k}": v.contiguous()
             for k, v in oracle.base_model.internal_xlora_classifier.state_dict().items()}
    save_file(state, os.path.join(ckpt, "adapter_model.safetensors"), metadata={"format": "pt"})
    return ckpt


def test_truncated_peft_adapter_model(tmp_path):
    ckpt = _peft_checkpoint(tmp_path)
    load_model(ckpt, base_model=os.path.join(built(RECIPE), "base"))  # positive control
    path = os.path.join(ckpt, "adapter_model.safetensors")
    _truncate(path)
    with pytest.raises(XLoraError, match="cannot read") as info:
        read_checkpoint(ckpt)
    assert path in _one_line(str(info.value))


@pytest.mark.parametrize("case,expected", [
    ("bias-shape", "bias shape (3,), expected (32,)"),
    ("int-weight", "expected a floating point tensor"),
    ("extra-bias", "has a bias, but"),
])
def test_mismatched_classifier_tensors(tmp_path, case, expected):
    ckpt = _copy(tmp_path)
    path = os.path.join(ckpt, "xlora_classifier.safetensors")
    state = load_file(path)
    if case == "bias-shape":
        state["inner.0.bias"] = torch.zeros(3)
    elif case == "int-weight":
        state["inner.0.weight"] = state["inner.0.weight"].to(torch.int32)
    else:
        with open(os.path.join(ckpt, "xlora_config.json")) as f:
            record = json.load(f)
        record["use_bias"] = False
        with open(os.path.join(ckpt, "xlora_config.json"), "w") as f:
            json.dump(record, f)
    save_file(state, path)
    with pytest.raises(XLoraError) as info:
        xlora_export.from_pretrained(ckpt, load_base(RECIPE))
    message = _one_line(str(info.value))
    assert path in message and expected in message, message


@pytest.mark.parametrize("case,expected", [
    ("r-zero", "field 'r' is 0; expected a positive integer"),
    ("r-string", "field 'r' is '8'; expected a positive integer"),
    ("dropout-string", "field 'lora_dropout' is 'x'"),
    ("not-an-object", "expected a JSON object, got list"),
    ("int-weights", "expected floating point"),
])
def test_bad_expert_files(tmp_path, case, expected):
    ckpt = _copy(tmp_path)
    folder = os.path.join(ckpt, "beta")
    cfg_path = os.path.join(folder, "adapter_config.json")
    with open(cfg_path) as f:
        cfg = json.load(f)
    if case == "int-weights":
        path = os.path.join(folder, "adapter_model.safetensors")
        save_file({k: v.to(torch.int64) for k, v in load_file(path).items()}, path)
    else:
        value = {"r-zero": {**cfg, "r": 0}, "r-string": {**cfg, "r": "8"},
                 "dropout-string": {**cfg, "lora_dropout": "x"}, "not-an-object": [cfg]}[case]
        with open(cfg_path, "w") as f:
            json.dump(value, f)
    with pytest.raises(XLoraError) as info:
        xlora_export.from_pretrained(ckpt, load_base(RECIPE))
    message = _one_line(str(info.value))
    assert "'beta'" in message and expected in message, message


@pytest.mark.parametrize("field,value,expected", [
    ("xlora_dropout_p", "x", "field 'xlora_dropout_p' is \"x\"; expected float"),
    ("softmax_temperature", None, "expected float"),
    ("hidden_size", True, "expected int"),
    ("adapters", {"alpha": 5}, "field 'adapters'"),
    ("adapters", [], "'adapters' is empty"),
    ("adapters", ["alpha", "alpha", "beta"], "'alpha' appears twice"),
    ("global_scaling_weight", [1], "expected float"),
    ("xlora_depth", 0, "xLoRAConfig.xlora_depth: expected an int >= 1, got 0"),
    ("top_k_lora", 4, "top_k_lora: expected None or an int in 1..3, got 4"),
])
def test_bad_config_fields(tmp_path, field, value, expected):
    ckpt = _copy(tmp_path)
    path = os.path.join(ckpt, "xlora_config.json")
    with open(path) as f:
        record = json.load(f)
    record[field] = value
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(XLoraError) as info:
        read_checkpoint(ckpt)
    message = _one_line(str(info.value))
    assert "xlora_config.json" in message and expected in message, message


@pytest.mark.parametrize("value", [[1, 2], {"modules": {"a": "0"}, "adapters": {}}, {"modules": 5}])
def test_bad_ordering_file(tmp_path, value):
    ckpt = _copy(tmp_path)
    with open(os.path.join(ckpt, "xlora_ordering.json"), "w") as f:
        json.dump(value, f)
    with pytest.raises(XLoraError) as info:
        read_checkpoint(ckpt)
    assert "xlora_ordering.json" in _one_line(str(info.value))


# ----------------------------------------------------------------------------- adapter names
BAD_NAMES = ["../outside", "/tmp/absolute", "sub/dir", "..", ".", "", "back\\slash"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_adapter_names_in_a_list_config_are_refused(tmp_path, name):
    ckpt = _copy(tmp_path)
    path = os.path.join(ckpt, "xlora_config.json")
    with open(path) as f:
        record = json.load(f)
    record["adapters"] = ["alpha", name, "gamma"]
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(XLoraError, match="adapter name") as info:
        xlora_export.from_pretrained(ckpt, load_base(RECIPE))
    assert "xlora_config.json" in _one_line(str(info.value))


def test_bad_adapter_name_as_dict_key_is_refused_but_paths_may_be_absolute(tmp_path):
    ckpt = _copy(tmp_path)
    path = os.path.join(ckpt, "xlora_config.json")
    with open(path) as f:
        record = json.load(f)
    record["adapters"] = {name: os.path.abspath(folder) for name, folder in expert_paths(RECIPE).items()}
    with open(path, "w") as f:
        json.dump(record, f)
    xlora_export.from_pretrained(ckpt, load_base(RECIPE))  # absolute expert paths are fine
    record["adapters"] = {"../beta" if k == "beta" else k: v for k, v in record["adapters"].items()}
    with open(path, "w") as f:
        json.dump(record, f)
    with pytest.raises(XLoraError, match="adapter name '../beta'") as info:
        xlora_export.from_pretrained(ckpt, load_base(RECIPE))
    _one_line(str(info.value))


def test_adapters_override_names_are_checked(tmp_path):
    with pytest.raises(XLoraError, match="adapter name") as info:
        read_checkpoint(built(RECIPE), adapters={"a/b": expert_paths(RECIPE)["alpha"]})
    _one_line(str(info.value))


@pytest.mark.parametrize("name", ["../evil", os.sep + "evil", "sub" + os.sep + "evil", "xlora_config.json"])
def test_save_pretrained_refuses_names_that_leave_the_folder(tmp_path, name):
    paths = expert_paths(RECIPE)
    model = make_xlora(RECIPE, adapters={"alpha": paths["alpha"], name: paths["beta"]})
    save = tmp_path / "save"
    with pytest.raises(XLoraError, match="save_pretrained: adapter name") as info:
        model.save_pretrained(save)
    _one_line(str(info.value))
    assert os.listdir(tmp_path) == []  # refused before anything was written


# ----------------------------------------------------------------------------- validation prompts
def test_validation_prompts_fit_any_vocabulary():
    for vocab in (1, 2, 3, 4, 5, 50, 384):
        prompts = validation_prompts(vocab)
        assert [len(p) for p in prompts] == [7, 3]
        assert all(0 <= t < vocab for p in prompts for t in p), vocab
    assert validation_prompts(384) == validation_prompts(384)  # deterministic
    assert all(t >= 3 for p in validation_prompts(384) for t in p)


def test_export_validates_a_model_with_a_small_vocabulary(tmp_path):
    """Embedding of 259 rows (the recipe's tokenizer size for vocab=200), below the ids the old fixed prompts
    used (up to 300): the export's validation must run and pass."""
    ckpt = build(Recipe(vocab=200, layers=1, seed=7), str(tmp_path / "small"))
    with open(os.path.join(ckpt, "base", "config.json")) as f:
        assert json.load(f)["vocab_size"] < 300
    report = export(ckpt, str(tmp_path / "small.onnx"))
    assert report.parity["main"].max_diff["logits"] < 1e-4


# ----------------------------------------------------------------------------- xlora-parity: wrong checkpoint
def _edit_json(path: str, **changes) -> None:
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


@pytest.mark.parametrize("case,expected", [
    ("classifier", "classifier weights (sha256)"),
    ("config", "config field 'softmax_temperature': 1.0 in the graph, 2.0 in the checkpoint"),
    ("experts", "expert ordering at index 0: 'alpha' in the graph, 'beta' in the checkpoint"),
])
def test_parity_names_the_first_difference_with_another_checkpoint(tmp_path, capsys, case, expected):
    ckpt = _copy(tmp_path)
    if case == "classifier":
        path = os.path.join(ckpt, "xlora_classifier.safetensors")
        save_file({k: v + 0.01 for k, v in load_file(path).items()}, path)
    elif case == "config":
        _edit_json(os.path.join(ckpt, "xlora_config.json"), softmax_temperature=2.0)
    else:
        _edit_json(os.path.join(ckpt, "xlora_config.json"), adapters=["beta", "alpha", "gamma"])
    graph = exported(RECIPE)
    capsys.readouterr()  # progress bars of the fixture builds
    code = parity.main([ckpt, graph, "--steps", "2"])
    captured = capsys.readouterr()
    assert code == 1 and "passed" not in captured.out
    err = _one_line(captured.err)
    assert err.startswith("xlora-parity: error:") and "was not exported from" in err and expected in err, err
