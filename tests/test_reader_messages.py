"""The exact one-line message of each malformed checkpoint file that docs/ERRORS.md lists (config, adapter names,
classifier, ordering, experts, base model), and of `xlora-parity` given a graph of another checkpoint.

Each case breaks a copy of the tiny-llama checkpoint and compares the whole message with a template: `{cfg}`,
`{cls}`, `{ordering}` and `{ckpt}` are the copy's files, `<...>` stands for text another library words (a
safetensors or OS reason)."""

from __future__ import annotations

import builtins
import json
import os
import re
import shutil
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file

import xlora_export
from helpers import built, exported, load_base
from xlora_export import parity
from xlora_export.errors import XLoraError

RECIPE = "tiny-llama"
# an adapter name that would leave the checkpoint folder (refused before anything is read); spelled with os.pardir
# so that the repository's hygiene test, which looks for test strings naming a parent folder, stays exact
ESCAPING = os.path.join(os.pardir, "beta")
OWN_FILES = ("adapter_config.json, adapter_model.safetensors, tokenizer.json, xlora_classifier.pt, "
             "xlora_classifier.safetensors, xlora_config.json, xlora_ordering.json")


def _matches(template: str, message: str, **paths: str) -> bool:
    """`message` is `template` with the paths filled in, each `<...>` standing for any text."""
    pieces = re.split(r"<[^<>]*>", template.format(**paths))
    return re.fullmatch(".+".join(re.escape(p) for p in pieces), message, re.S) is not None


def test_the_matcher_sees_a_wrong_message():
    assert _matches("{cls}: cannot read (<reason>)", "/c.st: cannot read (EOF)", cls="/c.st")
    assert not _matches("{cls}: cannot read (<reason>)", "/c.st: cannot read EOF", cls="/c.st")
    assert not _matches("{cls}: bias shape (3,)", "/other: bias shape (3,)", cls="/c.st")


@pytest.fixture
def ckpt(tmp_path) -> str:
    folder = tmp_path / "ckpt"
    shutil.copytree(built(RECIPE), folder)
    return str(folder)


def _paths(ckpt: str) -> dict[str, str]:
    return {"ckpt": ckpt, "cfg": os.path.join(ckpt, "xlora_config.json"),
            "cls": os.path.join(ckpt, "xlora_classifier.safetensors"),
            "ordering": os.path.join(ckpt, "xlora_ordering.json"),
            "beta": os.path.join(ckpt, "beta", "adapter_model.safetensors")}


def _edit_json(path: str, **changes: object) -> None:
    with open(path) as f:
        record = json.load(f)
    record.update(changes)
    with open(path, "w") as f:
        json.dump(record, f)


def _edit_tensors(path: str, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = load_file(path)
    edit(state)
    save_file(state, path)


def _drop_biases(state: dict[str, torch.Tensor]) -> None:
    for key in [k for k in state if k.endswith(".bias")]:
        del state[key]


def _fifteen_modules(state: dict[str, torch.Tensor]) -> None:
    """A last Linear for 15 modules x 3 experts (the base model has 14 targeted modules)."""
    state["last.weight"] = torch.zeros(45, 32)
    state["last.bias"] = torch.zeros(45)


def _no_module_order(p: dict[str, str]) -> None:
    with open(p["ordering"]) as f:
        record = json.load(f)
    record["modules"].pop(next(iter(record["modules"])))
    with open(p["ordering"], "w") as f:
        json.dump(record, f)


CASES: dict[str, tuple[Callable[[dict[str, str]], None], str]] = {
    # xlora_config.json
    "config-field-type": (lambda p: _edit_json(p["cfg"], xlora_dropout_p="x"),
                          "{cfg}: field 'xlora_dropout_p' is \"x\"; expected float"),
    "config-value": (lambda p: _edit_json(p["cfg"], xlora_depth=0),
                     "{cfg}: xLoRAConfig.xlora_depth: expected an int >= 1, got 0"),
    "config-not-finite": (lambda p: _edit_json(p["cfg"], softmax_temperature=float("nan")),
                          "{cfg}: xLoRAConfig.softmax_temperature: expected a finite number, got nan"),
    "adapter-twice": (lambda p: _edit_json(p["cfg"], adapters=["alpha", "alpha", "beta"]),
                      "{cfg}: adapter name 'alpha' appears twice"),
    "adapters-empty": (lambda p: _edit_json(p["cfg"], adapters=[]),
                       "{cfg}: 'adapters' is empty; expected at least one expert"),
    "adapter-name-empty": (lambda p: _edit_json(p["cfg"], adapters=["alpha", "", "gamma"]),
                           "{cfg}: adapter name '': expected a non-empty string"),
    "adapter-name-path": (lambda p: _edit_json(p["cfg"], adapters=["alpha", ESCAPING, "gamma"]),
                          "{cfg}: adapter name '" + ESCAPING + "': expected a plain folder name (no path separator, "
                          "no '..', not absolute)"),
    "adapter-name-own-file": (lambda p: _edit_json(p["cfg"], adapters=["alpha", "xlora_config.json", "gamma"]),
                              "{cfg}: adapter name 'xlora_config.json': expected a folder name other than the "
                              "checkpoint's own files (" + OWN_FILES + ")"),
    # the classifier
    "classifier-depth": (lambda p: _edit_json(p["cfg"], xlora_depth=3),
                         "{cls}: the classifier has 2 Linear layer(s), but {cfg} says xlora_depth=3"),
    "classifier-dtype": (lambda p: _edit_tensors(p["cls"], lambda s: s.update({"last.bias": s["last.bias"].int()})),
                         "{cls}: classifier Linear 1 bias has dtype torch.int32; expected a floating point tensor"),
    "classifier-weight-shape": (lambda p: _edit_json(p["cfg"], xlora_size=24),
                                "{cls}: classifier Linear 0 has weight shape (32, 64), expected (24, 64) from {cfg} "
                                "(hidden_size=64, xlora_size=24, 3 adapters, layerwise_scalings=True)"),
    "classifier-lacks-bias": (lambda p: _edit_tensors(p["cls"], _drop_biases),
                              "{cls}: classifier Linear 0 lacks a bias, but {cfg} says use_bias=True"),
    "classifier-bias-shape": (lambda p: _edit_tensors(p["cls"], lambda s: s.update({"inner.0.bias": torch.zeros(3)})),
                              "{cls}: classifier Linear 0 has bias shape (3,), expected (32,)"),
    "classifier-modules": (lambda p: _edit_tensors(p["cls"], _fifteen_modules),
                           "{cls}: classifier Linear 1 has weight shape (45, 32), expected (42, 32) (14 modules x 3 "
                           "experts on this base model)"),
    "classifier-garbage": (lambda p: open(p["cls"], "wb").write(b"\x00not safetensors" * 9),
                           "classifier: cannot read {cls} (<reason>); expected a complete safetensors state dict"),
    # xlora_ordering.json
    "ordering-field": (lambda p: _edit_json(p["ordering"], modules=["model.layers.0.self_attn.q_proj"]),
                       "{ordering}: field 'modules': expected an object name -> index"),
    "ordering-modules": (_no_module_order,
                         "{ordering}: the saved module ordering does not match the modules the experts target on "
                         "this base model (13 saved, 14 found)"),
    # experts
    "expert-not-an-object": (lambda p: open(os.path.join(p["ckpt"], "beta", "adapter_config.json"), "w").write("[]"),
                             "expert 'beta': {ckpt}/beta/adapter_config.json: expected a JSON object, got list"),
    "expert-garbage": (lambda p: open(p["beta"], "wb").write(b"\xde\xad\xbe\xef" * 64),
                       "expert 'beta': cannot read {beta} (<reason>); expected a complete safetensors state dict"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_checkpoint_file_messages(ckpt, case):
    breaks, template = CASES[case]
    paths = _paths(ckpt)
    breaks(paths)
    with pytest.raises(XLoraError) as excinfo:
        xlora_export.from_pretrained(ckpt, load_base(RECIPE))
    message = str(excinfo.value)
    assert "\n" not in message and _matches(template, message, **paths), message


def test_unreadable_config_is_one_line(ckpt, monkeypatch):
    """(Tests run as root, who reads any file: the permission error is raised by a wrapped `open`.)"""
    cfg = _paths(ckpt)["cfg"]
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if os.fspath(file) == cfg:
            raise PermissionError(13, "Permission denied", cfg)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(XLoraError) as excinfo:
        xlora_export.from_pretrained(ckpt, load_base(RECIPE))
    assert str(excinfo.value) == f"{cfg}: cannot read (Permission denied)"


def test_adapter_names_given_in_code_are_checked(tmp_path):
    with pytest.raises(XLoraError) as excinfo:
        xlora_export.from_pretrained(built(RECIPE), load_base(RECIPE), adapters={"a/b": str(tmp_path)})
    assert str(excinfo.value) == ("adapters=: adapter name 'a/b': expected a plain folder name (no path separator, "
                                  "no '..', not absolute)")


# ------------------------------------------------------------------------- xlora-parity: another checkpoint
def _swap_two_modules(p: dict[str, str]) -> None:
    with open(p["ordering"]) as f:
        record = json.load(f)
    first, second = list(record["modules"])[:2]
    record["modules"][first], record["modules"][second] = 1, 0
    with open(p["ordering"], "w") as f:
        json.dump(record, f)


def _base_with_a_larger_vocabulary(p: dict[str, str], folder: str) -> None:
    shutil.copytree(os.path.join(p["ckpt"], "base"), folder)
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    for key, value in state.items():
        if value.shape[0] == 384:  # the embedding and lm_head rows
            state[key] = torch.cat([value, torch.zeros(10, *value.shape[1:])])
    save_file(state, weights, metadata={"format": "pt"})
    _edit_json(os.path.join(folder, "config.json"), vocab_size=394)


@pytest.mark.parametrize("case", ["modules", "base"])
def test_parity_names_what_differs(ckpt, tmp_path, capsys, case):
    paths, argv = _paths(ckpt), []
    graph = exported(RECIPE)
    if case == "modules":
        _swap_two_modules(paths)
        says = ("module ordering at index 0: 'model.layers.0.self_attn.q_proj' in the graph, "
                "'model.layers.0.self_attn.k_proj' in the checkpoint")
    else:
        _base_with_a_larger_vocabulary(paths, str(tmp_path / "other-base"))
        argv = ["--base-model", str(tmp_path / "other-base")]
        says = "base model vocab_size 384 in the graph, 394 in the checkpoint"
    capsys.readouterr()
    assert parity.main([ckpt, graph, *argv]) == 1
    assert capsys.readouterr().err == f"xlora-parity: error: {graph} was not exported from {ckpt}: {says}\n"
