"""`xlora-export` as a user meets it: usage errors (exit 2), user errors (one line, exit 1), Ctrl-C (one line,
exit 130) at any moment including inside `import torch`, `-q`, and nothing partial or private left behind."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys

import pytest
import torch

from helpers import built
from xlora_export import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()  # what came before (a recipe built on first use) is not the command's output
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _env() -> dict[str, str]:
    """The test's environment, with this checkout first on the path (also when it is not pip-installed)."""
    paths = [ROOT, os.path.join(ROOT, "runtime"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _one_error_line(err: str, prefix: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith(prefix), err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------ usage errors
@pytest.mark.parametrize("option,value", [
    ("--atol", "-1"), ("--atol", "0"), ("--atol", "nan"), ("--atol", "inf"), ("--atol", "tight"),
    ("--steps", "0"), ("--steps", "-3"), ("--steps", "2.5"),
    ("--max-batch", "0"), ("--max-batch", "-1"),
    ("--opset", "13"), ("--opset", "21"), ("--opset", "99"), ("--opset", "seventeen"), ("--dtype", "fp8"),
])
def test_meaningless_numbers_are_usage_errors(option, value, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = _run([str(tmp_path), str(out), f"{option}={value}"], capsys)
    assert code == 2 and stdout == ""
    assert err.startswith("usage: xlora-export") and f"xlora-export: error: argument {option}: " in err, err
    assert "Traceback" not in err and os.listdir(tmp_path) == []


def test_missing_arguments_are_a_usage_error(capsys):
    code, stdout, err = _run([], capsys)
    assert code == 2 and stdout == ""
    assert err.splitlines()[-1] == "xlora-export: error: the following arguments are required: MODEL_DIR, OUT.onnx"


def test_base_model_that_is_not_a_folder(tmp_path, capsys):
    code, _, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx"), "--base-model", str(tmp_path / "no")], capsys)
    assert code == 1 and err == f"xlora-export: error: --base-model {tmp_path / 'no'}: not a folder\n"
    assert os.listdir(tmp_path) == []


def test_opset_99_says_what_is_supported(tmp_path, capsys):
    code, stdout, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx"), "--opset", "99"], capsys)
    assert code == 2 and stdout == ""
    line = err.strip().splitlines()[-1]
    assert line == ("xlora-export: error: argument --opset: expected 14 to 20 (the graph needs 14, torch's TorchScript "
                    "exporter stops at 20; 17, the default, is what TensorRT parses), got 99")


def test_opset_range_is_what_this_torch_exports():
    from torch.onnx import _constants

    assert cli.OPSET_MAX == _constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET, (
        f"torch {torch.__version__} changed its TorchScript exporter's highest opset: update cli.OPSET_MAX")
    assert cli.OPSET_MIN <= cli.OPSET_DEFAULT == 17 <= cli.OPSET_MAX


def test_highest_opset_exports_and_validates(tmp_path, capsys):
    code, stdout, _ = _run([built("tiny-llama"), str(tmp_path / "m.onnx"), "--opset", str(cli.OPSET_MAX), "-q"],
                           capsys)
    assert code == 0, stdout
    import onnx

    assert [o.version for o in onnx.load(str(tmp_path / "m.onnx")).opset_import if o.domain == ""] == [cli.OPSET_MAX]


def test_dtypes_are_the_exporters():
    from xlora_export.export import DTYPES

    assert cli.DTYPES == tuple(DTYPES)


def test_help_exits_0_and_says_what_quiet_does(capsys):
    code, stdout, _ = _run(["--help"], capsys)
    assert code == 0
    text = " ".join(stdout.split())
    assert "-q, --quiet print no progress and no summary: only the 'wrote OUT.onnx' line" in text
    assert "Exit codes: 0 written, 1 user error" in text


# -------------------------------------------------------------------------------------------- -q and user errors
def test_quiet_prints_only_the_path(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    code, stdout, err = _run([built("tiny-llama"), str(out), "-q", "--frozen-scalings"], capsys)
    assert code == 0 and err == ""
    assert stdout == f"wrote {out} (xlora_export metadata v1)\n"


def test_bf16_quiet_warning_and_the_refusals_downstream(tmp_path, capsys):
    """-q still warns that a bf16 graph was not validated; the runtime and xlora-parity (CPU) refuse it in one line."""
    out = tmp_path / "m.onnx"
    code, stdout, err = _run([built("tiny-llama"), str(out), "-q", "--dtype", "bf16"], capsys)
    assert code == 0 and stdout == f"wrote {out} (xlora_export metadata v1)\n"
    line = _one_error_line(err, "xlora-export: warning: validation skipped: bf16 graphs cannot run")
    assert "CPU" in line
    from xlora_export import parity
    from xlora_runtime import XLoraError, XLoraSession

    with pytest.raises(XLoraError) as excinfo:  # the CPU provider has no bf16 kernels: the session cannot load
        XLoraSession(str(out))
    message = str(excinfo.value)
    assert message.startswith(f"{out}: ONNX Runtime cannot load it (") and "NOT_IMPLEMENTED" in message
    assert "\n" not in message
    model_dir = built("tiny-llama")
    capsys.readouterr()
    assert parity.main([model_dir, str(out)]) == 1
    assert capsys.readouterr().err == f"xlora-parity: error: {message}\n"


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, monkeypatch):
    import xlora_export.export as export_module

    def disk_full(src: str, dst: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), dst)

    monkeypatch.setattr(export_module.shutil, "copyfile", disk_full)
    code, stdout, err = _run([built("tiny-llama"), str(tmp_path / "m.onnx")], capsys)
    assert code == 1
    line = _one_error_line(err, "xlora-export: error: [Errno 28] No space left on device: ")
    assert "m.tokenizer.json" in line
    assert os.listdir(tmp_path) == []  # the staging folder is gone too


# ----------------------------------------------------------------------------------------------------- Ctrl-C
def test_importing_the_cli_imports_no_heavy_dependency():
    code = ("import sys, xlora_export.cli; "
            "print(sorted(m for m in ('torch', 'transformers', 'onnxruntime', 'onnx', 'numpy') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# Ctrl-C exactly while `import torch` runs: a meta path finder raises KeyboardInterrupt when torch is imported.
_INTERRUPT_IMPORT = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
from xlora_export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_inside_import_torch_is_one_line(tmp_path):
    out = tmp_path / "m.onnx"
    result = subprocess.run([sys.executable, "-c", _INTERRUPT_IMPORT, built("tiny-llama"), str(out)],
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 130, result.stderr
    assert _one_error_line(result.stderr, "xlora-export: interrupted") == (
        f"xlora-export: interrupted; {out} was not written")
    assert result.stdout == "" and os.listdir(tmp_path) == []


def test_sigint_during_the_export_is_one_line_and_leaves_nothing(tmp_path):
    """A real SIGINT (what Ctrl-C sends) once tracing has started, i.e. with the staging folder in place."""
    out = tmp_path / "m.onnx"
    proc = subprocess.Popen([sys.executable, "-m", "xlora_export.cli", built("tiny-llama"), str(out),
                             "--frozen-scalings"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "tracing" in line:
            proc.send_signal(signal.SIGINT)
            break
    stdout, stderr = proc.communicate(timeout=120)
    assert any("tracing" in line for line in seen), "".join(seen) + stdout + stderr
    assert proc.returncode == 130, stderr
    assert _one_error_line(stderr, "xlora-export: interrupted") == f"xlora-export: interrupted; {out} was not written"
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------------------- README
def test_export_transcript_is_what_the_command_prints(tmp_path, capsys):
    """docs/EXPORT.md's transcript is the README's first command's export, and (timings, paths and float
    differences aside) what the command prints today."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(ROOT, "docs", "EXPORT.md"), encoding="utf-8") as f:
        export_doc = f.read()
    first_command = re.search(r"^```bash\n(.*?)\n", readme, re.M).group(1)
    transcript = re.search(r"^```\n\$ (xlora-export .*?)\n(.*?)^```", export_doc, re.S | re.M)
    assert first_command.endswith(" && " + transcript.group(1)), (first_command, transcript.group(1))

    def stable(text: str) -> list[str]:
        return [line for line in text.split("\n") if line and not line.startswith(("[", "parity", "size:", "wrote"))]

    args = transcript.group(1).split()[1:]
    assert args[:2] == ["models/xlora-demo", "xlora-demo.onnx"]  # the committed trained demo
    code, stdout, _ = _run([os.path.join(ROOT, *args[0].split("/")), str(tmp_path / args[1]), *args[2:]], capsys)
    assert code == 0
    assert stable(transcript.group(2)) == stable(stdout)
    assert len(stable(stdout)) > 15
