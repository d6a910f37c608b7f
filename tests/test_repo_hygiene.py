"""The suite runs on a user's clone: `.ci/run` runs the README's test command, no test reads a file outside the
repository, and the seed README tests (whose document lives beside the repository) skip there with a reason."""

from __future__ import annotations

import ast
import importlib.util
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")


def _readme_commands() -> list[str]:
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        first_block = re.search(r"^```bash\n(.*?)^```", f.read(), re.S | re.M).group(1)
    return first_block.strip().splitlines()


def test_ci_runs_the_readmes_test_command():
    test_command = _readme_commands()[1]
    assert test_command.endswith("python -m pytest -q"), test_command
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    assert lines.count(test_command) == 1, f"{test_command!r} is not a line of .ci/run"
    assert lines[1:3] == ["# CI: install (CPU torch pinned first, so no CUDA build is pulled) and run the README's "
                          "test command.", "set -euo pipefail"], "a failing command must fail the CI"
    exports = [line for line in lines if line.startswith("export XLORA_SEED_README=")]
    assert len(exports) == 1 and lines.index(exports[0]) < lines.index(test_command)


def test_no_test_reads_outside_the_repository():
    """No string in a test names the folder beside the repository or an absolute place outside it (only
    environment variables may point there). A bare `..` is allowed: the reader tests use it in the bad adapter
    names they check are refused."""
    found = []
    for name in sorted(os.listdir(TESTS)):
        if not name.endswith(".py") or name == os.path.basename(__file__):  # this file spells the patterns
            continue
        with open(os.path.join(TESTS, name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                parts = re.split(r"[/\\]", node.value)
                if "shared" in parts or node.value.startswith(("/work", "~")):
                    found.append(f"{name}:{node.lineno}: {node.value!r}")
    assert not found, found


def _import_seed_readme_tests() -> None:
    """Execute tests/test_seed_readme.py as pytest's collection would (a fresh module object)."""
    spec = importlib.util.spec_from_file_location("seed_readme_probe", os.path.join(TESTS, "test_seed_readme.py"))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_seed_readme_tests_skip_on_a_clone_and_fail_when_pointed_nowhere(tmp_path, monkeypatch):
    """No XLORA_SEED_README (a user's clone): the module skips, with the reason. Set to a missing file (a CI that
    lost the document): collection fails rather than passing by skipping."""
    monkeypatch.delenv("XLORA_SEED_README", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"set XLORA_SEED_README to its path to run these tests"):
        _import_seed_readme_tests()
    missing = str(tmp_path / "nowhere.md")
    monkeypatch.setenv("XLORA_SEED_README", missing)
    with pytest.raises(pytest.fail.Exception, match=re.escape(f"XLORA_SEED_README={missing!r} is not a file")):
        _import_seed_readme_tests()
