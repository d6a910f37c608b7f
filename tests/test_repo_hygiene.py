"""The suite runs on a user's clone: `.ci/run` runs the README's test command, no test reads a file outside the
repository, and the tests of the original X-LoRA README (a document kept beside the repository, not in it) skip
there with a reason. The documents stay a product page and name only what a reader can follow."""

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
    exports = [line for line in lines if line.startswith("export XLORA_ORIGINAL_README=")]
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


def _import_original_readme_tests() -> None:
    """Execute tests/test_original_readme.py as pytest's collection would (a fresh module object)."""
    path = os.path.join(TESTS, "test_original_readme.py")
    spec = importlib.util.spec_from_file_location("original_readme_probe", path)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_original_readme_tests_skip_on_a_clone_and_fail_when_pointed_nowhere(tmp_path, monkeypatch):
    """No XLORA_ORIGINAL_README (a user's clone): the module skips, with the reason. Set to a missing file (a CI that
    lost the document): collection fails rather than passing by skipping."""
    monkeypatch.delenv("XLORA_ORIGINAL_README", raising=False)
    with pytest.raises(pytest.skip.Exception, match=r"set XLORA_ORIGINAL_README to its path to run these tests"):
        _import_original_readme_tests()
    missing = str(tmp_path / "nowhere.md")
    monkeypatch.setenv("XLORA_ORIGINAL_README", missing)
    with pytest.raises(pytest.fail.Exception, match=re.escape(f"XLORA_ORIGINAL_README={missing!r} is not a file")):
        _import_original_readme_tests()


# ----------------------------------------------------------------------------- the documents a reader follows
README_MAX_LINES = 300  # a product page, not a notebook: the rest lives in docs/ and benchmarks/README.md


def _documents() -> list[str]:
    """README.md, docs/*.md, benchmarks/README.md and the demo's model card."""
    docs = os.path.join(ROOT, "docs")
    names = ["README.md", "benchmarks/README.md", "models/xlora-demo/README.md"]
    names += [f"docs/{name}" for name in sorted(os.listdir(docs)) if name.endswith(".md")]
    return names


# References a reader of the repository cannot follow: the project's own issue numbers, sections of a document
# that is not in the repository, the folder beside it. Another project's issue named with its repository
# (`owner/name#123`) can be followed.
UNFOLLOWABLE = re.compile(r"\b(?i:issues?) #?\d+|\bSPEC\b|\b(?i:the\s+seed)\b|\.\./shared|/shared/docs")


def _unfollowable(relative_paths: list[str]) -> list[str]:
    found = []
    for name in relative_paths:
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                found += [f"{name}:{number}: {m.group(0)!r}" for m in UNFOLLOWABLE.finditer(line)]
    return found


def test_readme_is_a_product_page():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines; move details to docs/"


TEXT_SUFFIXES = (".py", ".md", ".sh", ".toml", ".yaml", ".yml", ".txt", ".cfg", ".ini", ".pbtxt")
NOT_SOURCES = {"__pycache__", "built", "node_modules"}  # build outputs; folders starting with "." are skipped too


def _sources() -> list[str]:
    """Every text file of the repository (code, docs, configs, benchmarks, tests) but this one, which spells
    the patterns, and `.ci/`, which points the original README's tests at the document beside the clone."""
    names = []
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in NOT_SOURCES
                               and not d.endswith(".egg-info"))
        names += [os.path.relpath(os.path.join(folder, f), ROOT) for f in sorted(files) if f.endswith(TEXT_SUFFIXES)]
    return [name for name in names if name != os.path.relpath(__file__, ROOT)]


def test_documents_name_nothing_a_reader_cannot_follow():
    assert not _unfollowable(_documents())


def test_no_file_of_the_repository_names_what_a_reader_cannot_follow():
    sources = _sources()
    assert {"xlora_export/model.py", "runtime/xlora_runtime/session.py", "tests/test_export.py",
            "benchmarks/bench_generate.py", "runtime/pyproject.toml"} <= set(sources)
    assert not _unfollowable(sources)


def test_the_unfollowable_pattern_catches_each_kind():
    seed = "the" + " seed"  # spelled in pieces, so that this file does not itself name what it forbids
    text = ("see issue 9 and Issue #12\nSPEC" + f" section 7\nas {seed} says\n`../" + "shared/docs/SPEC.md`\n"
            "a Kubernetes spec, a profile spec, triton-inference-server/server#8586, a seed of 0\n")
    hits = [m.group(0) for m in UNFOLLOWABLE.finditer(text)]
    assert hits == ["issue 9", "Issue #12", "SPEC", seed, "../shared", "SPEC"], hits


def test_document_links_point_at_files_of_the_repository():
    """Every relative link (`[text](path)`, `![alt](path)`) of the documents names a file or folder that exists."""
    missing = []
    for name in _documents():
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(name), target.split("#")[0]))
            if not os.path.exists(path):
                missing.append(f"{name}: {target}")
    assert not missing, missing
