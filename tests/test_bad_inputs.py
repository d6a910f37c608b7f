"""Bad inputs that docs/ERRORS.md lists and no other test exercised: each gets its exact one-line XLoraError
(or, through a command, one line on stderr and exit code 1), and nothing partial is written."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

import xlora_export
from helpers import built, load_base
from xlora_export import cli
from xlora_export.errors import XLoraError
from xlora_export.export import ExportOptions, export
from xlora_runtime import Generator, XLoraSession
from xlora_runtime import contract as C
from xlora_runtime.plot import plot_scalings, row_scalings

RECIPE = "tiny-llama"


def _message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def ckpt(tmp_path):
    """A copy of the recipe's checkpoint (this project's format: experts inside) to break."""
    folder = tmp_path / "ckpt"
    shutil.copytree(built(RECIPE), folder)
    return folder


def _load(folder) -> None:
    xlora_export.from_pretrained(str(folder), load_base(RECIPE))


def _edit_json(path, **changes) -> None:
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


def _edit_tensors(path, edit) -> None:
    save_file(edit(load_file(str(path))), str(path))


# ----------------------------------------------------------------------------------------------- checkpoints
def test_config_json_that_is_not_an_object(ckpt):
    (ckpt / "xlora_config.json").write_text("[64, 2048]")
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == f"{ckpt / 'xlora_config.json'}: expected a JSON object"


def test_expert_without_adapter_config(ckpt):
    os.remove(ckpt / "beta" / "adapter_config.json")
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == (f"expert 'beta': {ckpt / 'beta' / 'adapter_config.json'} is missing (expected a "
                                 f"PEFT LoRA folder)")


@pytest.mark.parametrize("changes, says", [
    ({"peft_type": "IA3"}, "has peft_type 'IA3', expected 'LORA'"),
    ({"use_dora": True}, "sets use_dora=True, which is not supported"),
    ({"r": "eight"}, "needs integer 'r' and numeric 'lora_alpha'"),
])
def test_expert_adapter_config_refused(ckpt, changes, says):
    _edit_json(ckpt / "beta" / "adapter_config.json", **changes)
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == f"expert 'beta': {ckpt / 'beta' / 'adapter_config.json'} {says}"


def _first(state: dict, suffix: str) -> str:
    return next(k for k in sorted(state) if k.endswith(suffix))


@pytest.mark.parametrize("case", ["no-lora-b", "embedding", "unexpected", "no-lora"])
def test_expert_weights_refused(ckpt, case):
    path = ckpt / "gamma" / "adapter_model.safetensors"
    state = load_file(str(path))
    if case == "no-lora-b":
        key = _first(state, "lora_B.weight")
        del state[key]
        says = f"lacks lora_A or lora_B for {key.split('.lora_B.')[0].removeprefix('base_model.model.')}"
    elif case == "embedding":
        key = "base_model.model.model.embed_tokens.lora_embedding_A"
        state[key] = torch.zeros(6, 384)
        says = f"has embedding LoRA ({key}), which is not supported"
    elif case == "unexpected":
        state["base_model.model.model.norm.weight"] = torch.ones(64)
        says = "has an unexpected tensor 'base_model.model.model.norm.weight'"
    else:
        state = {}
        says = "holds no LoRA weights"
    save_file(state, str(path))
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == f"expert 'gamma': {path} {says}"


def test_checkpoint_without_base_model_id(ckpt):
    _edit_json(ckpt / "xlora_config.json", base_model_id=None)
    with pytest.raises(XLoraError) as excinfo:
        xlora_export.xlora_utils.load_model(str(ckpt))
    assert _message(excinfo) == f"{ckpt}: the checkpoint names no base_model_id; pass base_model=PATH"


# ------------------------------------------------------------------------------------------------ xlora-export
def test_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch):
    """(Tests run as root here, where every folder is writable: the permission check itself is replaced.)"""
    import xlora_export.export as export_module

    monkeypatch.setattr(export_module.os, "access", lambda path, mode: False)
    out, model_dir = tmp_path / "m.onnx", built(RECIPE)
    capsys.readouterr()
    assert cli.main([model_dir, str(out)]) == 1
    err = capsys.readouterr().err
    assert err == f"xlora-export: error: {out}: output folder {tmp_path} is not writable\n"
    assert os.listdir(tmp_path) == []


def test_dynamic_rope_is_refused(ckpt, tmp_path, capsys):
    _edit_json(ckpt / "base" / "config.json",
               rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert cli.main([str(ckpt), str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"xlora-export: error: {ckpt}: rope_type 'dynamic' changes with the sequence length at run time "
                   f"and cannot be fixed in a graph\n")
    assert not out.exists()


# -------------------------------------------------------------------------------------- graphs and metadata
def _graph_with_metadata(path, value: str | None) -> str:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    proto = helper.make_model(helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                              opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    if value is not None:
        entry = proto.metadata_props.add()
        entry.key, entry.value = C.METADATA_KEY, value
    onnx.save(proto, str(path))
    return str(path)


@pytest.mark.parametrize("value, says", [
    ("{not json", "the 'xlora_export' metadata record is not valid JSON (Expecting property name enclosed in double "
                  "quotes: line 1 column 2 (char 1))"),
    ("[1, 2]", "the 'xlora_export' metadata record is not a JSON object"),
    (json.dumps({"format_version": 99}), "metadata format_version 99; this runtime reads 1"),
    (json.dumps({"format_version": 1}), "the 'xlora_export' metadata record lacks ["),
])
def test_malformed_metadata_record(tmp_path, value, says):
    path = _graph_with_metadata(tmp_path / "g.onnx", value)
    with pytest.raises(XLoraError) as excinfo:
        XLoraSession(path)
    assert _message(excinfo).startswith(f"{path}: {says}")


@pytest.fixture(scope="module")
def lonely_graph(tmp_path_factory):
    """The recipe's export with no companion beside it: no tokenizer, no frozen graph."""
    folder = tmp_path_factory.mktemp("lonely")
    export(built(RECIPE), str(folder / "m.onnx"), ExportOptions(validate=False))
    os.remove(folder / "m.tokenizer.json")
    return str(folder / "m.onnx")


def test_requests_that_need_the_tokenizer(lonely_graph):
    gen = Generator(XLoraSession(lonely_graph))
    with pytest.raises(XLoraError) as excinfo:
        gen.generate("the model", max_new_tokens=2)
    assert _message(excinfo) == f"{lonely_graph}: no tokenizer travelled with this export; give token ids"
    with pytest.raises(XLoraError) as excinfo:
        gen.generate([[5, 6]], max_new_tokens=2, stop_strings=["x"])
    assert _message(excinfo) == "stop_strings need the tokenizer, and none travelled with this export"
    with pytest.raises(XLoraError) as excinfo:
        gen.generate([[5, "6"]], max_new_tokens=2)
    assert _message(excinfo) == "prompt 0: '6' is not a token id (expected ints)"
    [result] = gen.generate([[5, 6]], max_new_tokens=2, stop_token_ids=[])  # the generator still works
    assert len(result.tokens) == 2


# ----------------------------------------------------------------------------------- logs and plots (runtime)
def test_plot_and_log_shapes_refused(tmp_path):
    scalings = np.full((3, 4, 2), 0.5, np.float32)
    with pytest.raises(XLoraError) as excinfo:
        plot_scalings(scalings, str(tmp_path / "p.png"), ["a", "b"], token_labels=["x"])
    assert _message(excinfo) == "1 token labels for 3 tokens"
    log = [np.zeros((2, 5, 4, 2), np.float32), np.zeros((2, 1, 4, 2), np.float32)]
    with pytest.raises(XLoraError) as excinfo:
        row_scalings(log, 2)
    assert _message(excinfo) == "row 2: the log's first entry has 2 rows"
    with pytest.raises(XLoraError) as excinfo:
        row_scalings([log[0], np.zeros((2, 1, 3, 2), np.float32)], 0)
    assert _message(excinfo).startswith("scalings log entries of shapes [(2, 1, 3, 2), (2, 5, 4, 2)]: expected")
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- eager model
def test_generate_refuses_beam_search():
    model = xlora_export.from_pretrained(built(RECIPE), load_base(RECIPE))
    with pytest.raises(XLoraError) as excinfo:
        model.generate(torch.tensor([[5, 6]]), max_new_tokens=2, num_beams=2)
    assert _message(excinfo) == "generate: num_beams=2 is not supported"
