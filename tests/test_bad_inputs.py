"""Bad inputs that docs/ERRORS.md lists and no other test exercised: each gets its exact one-line XLoraError
(or, through a command, one line on stderr and exit code 1), and nothing partial is written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from safetensors.torch import load_file, save_file

import xlora_export
from helpers import built, edit_json, load_base
from xlora_export import cli, parity
from xlora_export.errors import XLoraError
from xlora_export.export import ExportOptions, export
from xlora_runtime import Generator, XLoraSession
from xlora_runtime.cli import generate_main, plot_main
from xlora_runtime.format import contract as C
from xlora_runtime.plot import plot_scalings, row_scalings
from xlora_runtime.scalings_log import load_scalings_arrays, save_scalings_arrays

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


def _edit_tensors(path, edit) -> None:
    save_file(edit(load_file(str(path))), str(path))


# ----------------------------------------------------------------------------------------------- checkpoints
def test_config_json_that_is_not_an_object(ckpt):
    (ckpt / "xlora_config.json").write_text("[64, 2048]")
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == f"{ckpt / 'xlora_config.json'}: expected a JSON object, got list"


def test_expert_without_adapter_config(ckpt):
    os.remove(ckpt / "beta" / "adapter_config.json")
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == (f"expert 'beta': {ckpt / 'beta' / 'adapter_config.json'} is missing (expected a "
                                 f"PEFT LoRA folder)")


@pytest.mark.parametrize("changes, says", [
    ({"peft_type": "IA3"}, "has peft_type 'IA3', expected 'LORA'"),
    ({"r": "eight"}, "field 'r' is 'eight'; expected a positive integer"),
    ({"r": 0}, "field 'r' is 0; expected a positive integer"),
    ({"lora_alpha": "16"}, "field 'lora_alpha' is '16'; expected a number"),
    ({"lora_dropout": 1.0}, "field 'lora_dropout' is 1.0; expected 0 <= p < 1"),
    ({"lora_bias": True}, "sets lora_bias=True, which is not supported"),
])
def test_expert_adapter_config_refused(ckpt, changes, says):
    edit_json(ckpt / "beta" / "adapter_config.json", **changes)
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == f"expert 'beta': {ckpt / 'beta' / 'adapter_config.json'} {says}"


def test_expert_adapter_config_not_json(ckpt):
    path = ckpt / "beta" / "adapter_config.json"
    path.write_text('{"r": 8,')
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo).startswith(f"expert 'beta': {path} is not valid JSON (Expecting property name")


def _first(state: dict, suffix: str) -> str:
    return next(k for k in sorted(state) if k.endswith(suffix))


@pytest.mark.parametrize("case", ["no-lora-b", "unexpected", "no-lora", "bias", "int", "outside-blocks"])
def test_expert_weights_refused(ckpt, case):
    path = ckpt / "gamma" / "adapter_model.safetensors"
    state = load_file(str(path))
    expert = "expert 'gamma':"
    if case == "no-lora-b":
        key = _first(state, "lora_B.weight")
        del state[key]
        module = key.split(".lora_B.")[0].removeprefix("base_model.model.")
        says = f"{expert} {path} lacks lora_A or lora_B for {module}"
    elif case == "unexpected":
        state["base_model.model.model.layers.0.input_layernorm.weight"] = torch.ones(64)
        says = f"{expert} {path} has an unexpected tensor 'base_model.model.model.layers.0.input_layernorm.weight'"
    elif case == "bias":
        key = _first(state, "lora_B.weight").replace(".weight", ".bias")
        state[key] = torch.zeros(4)
        says = f"{expert} {path} has a LoRA bias ({key}), which is not supported"
    elif case == "int":
        key = _first(state, "lora_A.weight")
        state[key] = state[key].to(torch.int32)
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        says = (f"{expert} {path} {module}: LoRA weights have dtypes torch.int32 and torch.float32; expected floating "
                f"point")
    elif case == "outside-blocks":
        state = {"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64),
                 "base_model.model.lm_head.lora_B.weight": torch.zeros(384, 4)}
        says = ("expert 'gamma' targets lm_head: X-LoRA experts may target only the Linears of the decoder blocks "
                "(model.layers.*), not the embedding or lm_head")
    else:
        state = {}
        says = f"{expert} {path} holds no LoRA weights"
    save_file(state, str(path))
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == says


def test_checkpoint_without_base_model_id(ckpt):
    edit_json(ckpt / "xlora_config.json", base_model_id=None)
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
    edit_json(ckpt / "base" / "config.json",
               rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert cli.main([str(ckpt), str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"xlora-export: error: {ckpt}: rope_type 'dynamic' changes with the sequence length at run time "
                   f"and cannot be fixed in a graph\n")
    assert not out.exists()


@pytest.mark.parametrize("opset", [13, 21])
def test_export_refuses_an_opset_out_of_range(tmp_path, opset):
    """export() itself checks what the CLI's argparse type checks (the Python API has no argparse)."""
    with pytest.raises(XLoraError) as excinfo:
        export(built(RECIPE), str(tmp_path / "m.onnx"), ExportOptions(opset=opset, validate=False))
    assert _message(excinfo) == (f"opset {opset}: expected 14 to 20 (the graph needs 14, torch's TorchScript exporter "
                                 f"stops at 20; 17 is the default)")
    assert os.listdir(tmp_path) == []


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


def test_adapters_for_add_xlora_to_model():
    with pytest.raises(XLoraError) as excinfo:
        xlora_export.add_xlora_to_model(load_base(RECIPE), xlora_export.xLoRAConfig(64, adapters=["alpha"]))
    assert _message(excinfo) == ("xLoRAConfig.adapters: expected a dict name -> expert folder (a list of names only "
                                 "works with from_pretrained, which finds the folders in the checkpoint)")
    with pytest.raises(XLoraError) as excinfo:
        xlora_export.add_xlora_to_model(load_base(RECIPE), xlora_export.xLoRAConfig(64, adapters={}))
    assert _message(excinfo) == "xLoRAConfig.adapters: at least one expert is needed"


def test_forward_with_given_scalings_of_the_wrong_shape():
    model = xlora_export.from_pretrained(built(RECIPE), load_base(RECIPE))
    n_modules, n_experts = len(model.module_names), len(model.adapter_names)
    with pytest.raises(XLoraError) as excinfo:
        model(input_ids=torch.tensor([[5, 6]]), scalings=torch.zeros(1, n_modules, n_experts + 1))
    assert _message(excinfo) == (f"forward(scalings=...): expected shape (1, {n_modules}, {n_experts}) or, per "
                                 f"token, (1, 2, {n_modules}, {n_experts}), got (1, {n_modules}, {n_experts + 1})")


# ------------------------------------------------------------------------------- xlora-generate, xlora-parity
@pytest.mark.parametrize("argv, line", [
    (["--max-new-tokens", "0"], "max_new_tokens=0: expected an int >= 1"),
    (["--threads", "0"], "--threads 0: expected >= 1"),
    (["--sample", "--temperature", "0"], "temperature=0.0: expected a finite number > 0 when sampling"),
    (["--sample", "--temperature", "nan"], "temperature=nan: expected a finite number > 0 when sampling"),
    (["--seed", "-1"], "seed=-1: expected None or an int >= 0"),
    (["--stop-id", "99999"], "stop_token_ids: 99999 is not a token id in 0..{last_id}"),
    (["--stop", "x"], "stop_strings need the tokenizer, and none travelled with this export"),
    (["--sample", "--top-p", "2"], "top_p=2.0: expected 0 < top_p <= 1"),
    (["--log-scalings", "run.npy"], "--log-scalings run.npy: give the path without extension (PATH.npy is written)"),
    (["--freeze-scalings-after", "1"], "{graph}: frozen scalings need OUT.frozen.onnx beside the graph (export with "
                                       "--frozen-scalings)"),
])
def test_generate_command_refusals(lonely_graph, capsys, argv, line):
    assert generate_main([lonely_graph, "5,6", "--ids", *argv]) == 1
    captured = capsys.readouterr()
    last_id = XLoraSession(lonely_graph).info.vocab_size - 1
    assert captured.err == f"xlora-generate: error: {line.format(graph=lonely_graph, last_id=last_id)}\n"
    assert captured.out == ""


def test_parity_prompt_without_the_tokenizer(lonely_graph, capsys):
    model_dir = built(RECIPE)
    capsys.readouterr()
    assert parity.main([model_dir, lonely_graph, "--prompt", "the model"]) == 1
    assert capsys.readouterr().err == "xlora-parity: error: --prompt needs the tokenizer that travels with the export\n"


def test_parity_report_in_a_folder_that_does_not_exist(lonely_graph, tmp_path, capsys):
    report = tmp_path / "missing" / "report.json"
    capsys.readouterr()
    assert parity.main([built(RECIPE), lonely_graph, "--json", str(report)]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"xlora-parity: error: --json {report}: the folder {report.parent} does not exist\n"
    assert captured.out == ""


def test_plot_with_an_unreadable_tokens_record(tmp_path, capsys):
    log = str(tmp_path / "run")
    save_scalings_arrays([np.zeros((1, 3, 4, 2), np.float32)], log)
    (tmp_path / "run-tokens.json").write_text("{truncated")
    assert plot_main([log, str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"xlora-plot-scalings: error: {log}-tokens.json: cannot read it (Expecting property name")
    assert err.count("\n") == 1 and not (tmp_path / "p.png").exists()


# ------------------------------------------------------------------------- xlora-parity usage errors, Ctrl-C
@pytest.mark.parametrize("argv, says", [
    (["--steps", "0"], "argument --steps: expected a positive integer, got 0"),
    (["--lengths", "abc"], "argument --lengths: expected an integer, got 'abc'"),
    (["--lengths", "3,0"], "argument --lengths: expected integers >= 1, got 0"),
    (["--top-k", "x"], "argument --top-k: expected an integer, got 'x'"),
    (["--top-k", "-1"], "argument --top-k: expected integers >= 0, got -1"),
    (["--atol-logits", "-1"], "argument --atol-logits: expected a positive number, got -1"),
    (["--atol-scalings", "nan"], "argument --atol-scalings: expected a positive number, got nan"),
])
def test_parity_meaningless_numbers_are_usage_errors(lonely_graph, capsys, argv, says):
    capsys.readouterr()
    assert parity.main([built(RECIPE), lonely_graph, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: xlora-parity ") and err.endswith(f"xlora-parity: error: {says}\n"), err


# Ctrl-C exactly while a heavy module is imported: a meta path finder raises KeyboardInterrupt at its import.
_INTERRUPT_IMPORT = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
from {module} import {main}
sys.exit({main}(sys.argv[2:]))
"""


def _interrupted_import(heavy: str, module: str, main: str, argv: list[str]) -> subprocess.CompletedProcess:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "runtime"),
                                                        os.environ.get("PYTHONPATH", "")])}
    code = _INTERRUPT_IMPORT.format(module=module, main=main)
    return subprocess.run([sys.executable, "-c", code, heavy, *argv], capture_output=True, text=True, env=env,
                          timeout=120)


@pytest.mark.parametrize("module", ["xlora_export.parity", "xlora_runtime.cli", "xlora_runtime", "xlora_runtime.engine",
                                    "xlora_runtime.serve.triton"])
def test_importing_the_commands_imports_no_heavy_dependency(module):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "runtime"),
                                                        os.environ.get("PYTHONPATH", "")])}
    code = (f"import sys, {module}; print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', "
            f"'numpy', 'tokenizers') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("heavy", ["torch", "onnxruntime"])
def test_parity_ctrl_c_is_one_line(lonely_graph, heavy):
    result = _interrupted_import(heavy, "xlora_export.parity", "main", [built(RECIPE), lonely_graph])
    assert result.returncode == 130 and result.stderr == "xlora-parity: interrupted\n", result.stderr


@pytest.mark.parametrize("heavy, main, prog", [
    ("onnxruntime", "generate_main", "xlora-generate"),
    ("numpy", "generate_main", "xlora-generate"),
    ("numpy", "plot_main", "xlora-plot-scalings"),
])
def test_runtime_commands_ctrl_c_during_imports(lonely_graph, tmp_path, heavy, main, prog):
    argv = [lonely_graph, "5,6", "--ids"] if main == "generate_main" else [str(tmp_path / "log"), "p.png"]
    result = _interrupted_import(heavy, "xlora_runtime.cli", main, argv)
    assert result.returncode == 130 and result.stderr == f"{prog}: interrupted\n", result.stderr


def test_expert_without_weights(ckpt):
    path = ckpt / "beta" / "adapter_model.safetensors"
    os.remove(path)
    with pytest.raises(XLoraError) as excinfo:
        _load(ckpt)
    assert _message(excinfo) == f"expert 'beta': {path} is missing"


def test_parity_graph_of_another_checkpoint(ckpt, lonely_graph, capsys):
    """The same experts in another order: the checkpoint loads, but it is not what the graph was exported from."""
    edit_json(ckpt / "xlora_config.json", adapters=["beta", "alpha", "gamma"])
    edit_json(ckpt / "xlora_ordering.json", adapters={"beta": 0, "alpha": 1, "gamma": 2})
    capsys.readouterr()
    assert parity.main([str(ckpt), lonely_graph]) == 1
    assert capsys.readouterr().err == (f"xlora-parity: error: {lonely_graph} was not exported from {ckpt}: expert "
                                       f"ordering at index 0: 'alpha' in the graph, 'beta' in the checkpoint\n")


def test_scalings_log_files_that_disagree(tmp_path):
    log = str(tmp_path / "run")
    save_scalings_arrays([np.zeros((1, 3, 4, 2), np.float32), np.zeros((1, 1, 4, 2), np.float32)], log)
    mapping_path = f"{log}-mapping.json"
    with open(mapping_path) as f:
        mapping = json.load(f)
    first, second = sorted(mapping)
    with open(mapping_path, "w") as f:
        json.dump({first: mapping[first] + [7], second: mapping[second]}, f)
    with pytest.raises(XLoraError) as excinfo:
        load_scalings_arrays(log)
    assert _message(excinfo) == f"load_scalings_arrays: {first} holds 1 entries, {mapping_path} lists 2"
    with open(mapping_path, "w") as f:
        json.dump({first: [0], second: [5]}, f)
    with pytest.raises(XLoraError) as excinfo:
        load_scalings_arrays(log)
    assert _message(excinfo) == f"load_scalings_arrays: {mapping_path} does not cover indices 0..1"


def test_plot_of_a_log_with_a_garbage_mapping(tmp_path, capsys):
    log = str(tmp_path / "run")
    (tmp_path / "run-mapping.json").write_text("{garbage")
    assert plot_main([log, str(tmp_path / "p.png")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"xlora-plot-scalings: error: load_scalings_arrays: {log}-mapping.json: cannot read it "
                          f"(Expecting property name") and err.count("\n") == 1, err
    assert not (tmp_path / "p.png").exists()


def test_scalings_logs_with_broken_files(tmp_path):
    log = str(tmp_path / "run")
    save_scalings_arrays([np.zeros((1, 3, 4, 2), np.float32), np.zeros((1, 1, 4, 2), np.float32)], log)
    mapping_path = f"{log}-mapping.json"
    first, second = sorted(json.loads(open(mapping_path).read()))
    (tmp_path / second).write_bytes(b"not a numpy file")
    with pytest.raises(XLoraError) as excinfo:
        load_scalings_arrays(log)
    assert _message(excinfo).startswith(f"load_scalings_arrays: cannot read {tmp_path / second} (")
    np.save(tmp_path / second, np.zeros((2, 3), np.float32))
    with pytest.raises(XLoraError) as excinfo:
        load_scalings_arrays(log)
    assert _message(excinfo) == (f"load_scalings_arrays: {tmp_path / second} holds shape (2, 3) of float32; "
                                 f"expected a stack (entries, b, s, L, n) of numbers")
    with open(tmp_path / second, "wb") as f:
        np.savez(f, a=np.zeros(2))  # an archive under the .npy name
    with pytest.raises(XLoraError) as excinfo:
        load_scalings_arrays(log)
    assert _message(excinfo) == (f"load_scalings_arrays: {tmp_path / second} holds an archive; expected a stack "
                                 f"(entries, b, s, L, n) of numbers")
    os.remove(tmp_path / second)
    with pytest.raises(XLoraError) as excinfo:
        load_scalings_arrays(log)
    assert _message(excinfo) == (f"load_scalings_arrays: {mapping_path} names {second}, and {tmp_path / second} "
                                 f"does not exist")
    for mapping in ('["run-0.npy"]', '{"run-0.npy": [0, "1"]}'):
        with open(mapping_path, "w") as f:
            f.write(mapping)
        with pytest.raises(XLoraError) as excinfo:
            load_scalings_arrays(log)
        assert _message(excinfo) == (f"load_scalings_arrays: {mapping_path}: expected a JSON object file name -> "
                                     f"list of indices")
    save_scalings_arrays([np.zeros((1, 3, 4, 2), np.float32)], log)  # a flush over a garbage mapping replaces it
    assert not os.path.exists(mapping_path) and len(load_scalings_arrays(log)) == 1
