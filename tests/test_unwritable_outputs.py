"""Every command that writes files, given an output path that cannot be written: exit code 1, one line on stderr
naming the path, no traceback; and the results come before any optional file, so a log or plot that cannot be
written loses no generated text.

A path under a regular file (`file.txt/out.onnx`) cannot be written even by root; so is a directory standing
where a file goes. Permissions (a folder without write access) only bind a user other than root.
"""

from __future__ import annotations

import os
import stat

import pytest

from helpers import built, exported
from models.recipes import main as recipes_main
from xlora_export.cli import main as export_main
from xlora_export.parity import main as parity_main
from xlora_runtime.cli import generate_main, plot_main
from xlora_runtime.engine import main as engine_main
from xlora_runtime.serve.triton import main as triton_main

RECIPE = "tiny-llama"
GENERATE = ["5,17", "--ids", "--max-new-tokens", "3"]


@pytest.fixture
def blocker(tmp_path) -> str:
    """A regular file: nothing can be written under it."""
    path = tmp_path / "file.txt"
    path.write_text("not a folder\n")
    return str(path)


@pytest.fixture(scope="module")
def scalings_log(tmp_path_factory) -> str:
    """A scalings log written by xlora-generate (for xlora-plot-scalings)."""
    log = str(tmp_path_factory.mktemp("log") / "run")
    assert generate_main([exported(RECIPE), *GENERATE, "--log-scalings", log]) == 0
    return log


def _one_line_error(capsys, prog: str, names: str) -> str:
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith(f"{prog}: error: ") and names in err, err
    return out


# every command that writes a file, its output under a regular file
COMMANDS = {
    "xlora-export": lambda bad, log: export_main([built(RECIPE), f"{bad}/out.onnx"]),
    "xlora-generate": lambda bad, log: generate_main([exported(RECIPE), *GENERATE, "--log-scalings", f"{bad}/log"]),
    "xlora-plot-scalings": lambda bad, log: plot_main([log, f"{bad}/out.png"]),
    "xlora-triton": lambda bad, log: triton_main([exported(RECIPE), f"{bad}/repo"]),
    "xlora-parity": lambda bad, log: parity_main([built(RECIPE), exported(RECIPE), "--json", f"{bad}/report.json",
                                                  "--lengths", "3", "--steps", "2"]),
    "xlora-engine": lambda bad, log: engine_main([exported(RECIPE), f"{bad}/out.engine"]),  # before TensorRT
    "python -m models.recipes": lambda bad, log: recipes_main([RECIPE, "--out", f"{bad}/models"]),
}


@pytest.mark.parametrize("prog", list(COMMANDS))
def test_an_output_under_a_regular_file_is_one_line(prog, blocker, scalings_log, capsys):
    capsys.readouterr()
    assert COMMANDS[prog](blocker, scalings_log) == 1
    assert _one_line_error(capsys, prog, blocker) == ""  # nothing done that the error would throw away
    assert os.path.isfile(blocker)


def test_generate_prints_its_text_then_fails_on_the_log_alone(tmp_path, capsys):
    """The log is written after the results: a log file that cannot be written (a directory stands where
    PATH-tokens.json goes) is one line naming it, and the generated text is on stdout all the same."""
    log = tmp_path / "run"
    (tmp_path / "run-tokens.json").mkdir()
    assert generate_main([exported(RECIPE), *GENERATE]) == 0
    expected = capsys.readouterr().out.splitlines()[0]  # the generated text
    assert generate_main([exported(RECIPE), *GENERATE, "--log-scalings", str(log)]) == 1
    out = _one_line_error(capsys, "xlora-generate", f"{log}-tokens.json: cannot write the scalings log (")
    assert out.splitlines()[0] == expected and " tokens/s, peak cache " in out


def test_generate_json_prints_its_lines_then_fails_on_the_log(tmp_path, capsys):
    log = tmp_path / "run"
    (tmp_path / "run-tokens.json").mkdir()
    assert generate_main([exported(RECIPE), *GENERATE, "--json", "--log-scalings", str(log)]) == 1
    out = _one_line_error(capsys, "xlora-generate", f"{log}-tokens.json: cannot write the scalings log (")
    assert out.startswith('{"prompt": 0, "tokens": [')


def test_plot_onto_a_directory_is_one_line_and_leaves_no_temporary_file(tmp_path, scalings_log, capsys):
    target = tmp_path / "out.png"
    target.mkdir()
    capsys.readouterr()
    assert plot_main([scalings_log, str(target)]) == 1
    _one_line_error(capsys, "xlora-plot-scalings", f"{target}: cannot write it (")
    assert sorted(os.listdir(tmp_path)) == ["out.png"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a folder whatever its mode")
def test_folders_without_write_permission(tmp_path, scalings_log, capsys):
    """The two commands that write into a folder that exists: the log and the plot."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        assert generate_main([exported(RECIPE), *GENERATE, "--log-scalings", str(folder / "log")]) == 1
        out = _one_line_error(capsys, "xlora-generate", f"{folder}/log")
        assert " tokens/s, peak cache " in out
        assert plot_main([scalings_log, str(folder / "out.png")]) == 1
        _one_line_error(capsys, "xlora-plot-scalings", f"{folder}/out.png: cannot write it (Permission denied)")
    finally:
        folder.chmod(stat.S_IRWXU)
