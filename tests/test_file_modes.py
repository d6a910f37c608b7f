"""Files this project writes get the mode any other new file gets (0666 less the process umask), not the private
0600 of a temporary file renamed into place (safetensors >= 0.8 writes its files that way):
exports, companions, checkpoints saved by `save_pretrained`, built recipes and plots."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import xlora_export
from helpers import built, load_base
from xlora_export.experts import follow_umask, save_tensors
from xlora_export.export import ExportOptions, export
from xlora_runtime.plot import plot_scalings


def _umask() -> int:
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def _modes(folder: str) -> dict[str, int]:
    return {os.path.relpath(os.path.join(parent, f), folder): os.stat(os.path.join(parent, f)).st_mode & 0o777
            for parent, _, files in os.walk(folder) for f in files}


@pytest.fixture
def umask_022():
    mask = os.umask(0o022)
    yield
    os.umask(mask)


def test_safetensors_files_are_given_the_umask_mode(tmp_path, umask_022):
    save_file({"w": torch.zeros(2)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "sub").mkdir()
    save_file({"w": torch.zeros(2)}, str(tmp_path / "sub" / "b.safetensors"))
    assert set(_modes(str(tmp_path)).values()) == {0o600}  # what safetensors does, the reason for the helper
    follow_umask(str(tmp_path))
    assert _modes(str(tmp_path)) == {"a.safetensors": 0o644, os.path.join("sub", "b.safetensors"): 0o644}
    save_tensors({"w": torch.zeros(2)}, str(tmp_path / "c.safetensors"))
    assert _modes(str(tmp_path))["c.safetensors"] == 0o644


def test_built_recipes_follow_the_umask():
    modes = _modes(built("tiny-llama"))
    assert any(f.endswith(".safetensors") for f in modes) and len(modes) >= 10, modes
    wrong = {f: oct(m) for f, m in modes.items() if m != 0o666 & ~_umask()}
    assert not wrong, wrong


def test_exported_files_follow_the_umask(tmp_path, umask_022):
    export(built("tiny-llama"), str(tmp_path / "m.onnx"), ExportOptions(frozen_scalings=True, validate=False))
    # the frozen graph shares the main graph's weights file, m.onnx.data
    assert _modes(str(tmp_path)) == {"m.onnx": 0o644, "m.onnx.data": 0o644, "m.frozen.onnx": 0o644,
                                     "m.tokenizer.json": 0o644}


def test_external_data_follows_the_umask(tmp_path, umask_022):
    export(built("tiny-llama"), str(tmp_path / "m.onnx"), ExportOptions(external_data=True, validate=False))
    assert _modes(str(tmp_path))["m.onnx.data"] == 0o644


def test_save_pretrained_follows_the_umask(tmp_path, umask_022):
    model = xlora_export.from_pretrained(built("tiny-llama"), load_base("tiny-llama"))
    model.save_pretrained(str(tmp_path / "ckpt"))
    modes = _modes(str(tmp_path / "ckpt"))
    assert any(f.endswith(".safetensors") for f in modes) and set(modes.values()) == {0o644}, modes


def test_plot_follows_the_umask(tmp_path, umask_022):
    pytest.importorskip("matplotlib")
    plot_scalings(np.full((3, 4, 2), 0.5, np.float32), str(tmp_path / "p.png"), ["a", "b"])
    assert _modes(str(tmp_path)) == {"p.png": 0o644}


def test_private_staged_files_are_given_the_umask_mode(tmp_path, umask_022, monkeypatch):
    """Whatever mode a writer gives a staged file (here the tokenizer copy, made 0600), the export renames
    into place files with the umask's mode."""
    import shutil

    copyfile = shutil.copyfile

    def private_copy(src: str, dst: str) -> str:
        copyfile(src, dst)
        os.chmod(dst, 0o600)
        return dst

    monkeypatch.setattr(shutil, "copyfile", private_copy)
    export(built("tiny-llama"), str(tmp_path / "m.onnx"), ExportOptions(validate=False))
    assert _modes(str(tmp_path)) == {"m.onnx": 0o644, "m.tokenizer.json": 0o644}
