"""docs/ERRORS.md cannot drift: every row names tests that exist, uses a known exit code, and (for what the
code itself words) shows a message the code can produce; every command has its section."""

from __future__ import annotations

import ast
import functools
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATALOGUE = os.path.join(ROOT, "docs", "ERRORS.md")
SOURCES = [os.path.join(ROOT, "xlora_export"), os.path.join(ROOT, "runtime", "xlora_runtime")]

HEADERS = {
    ("bad input", "message", "exit", "test"): "errors",
    ("guarantee", "test"): "guarantees",
    ("bad input", "today", "test"): "gaps",
}
EXITS = {"0", "1", "2", "130", "raises", "400", "404", "413", "429"}  # HTTP statuses: the server's answers
TEST_REF = re.compile(r"(tests/[\w/]+\.py)::(\w+)(?:::(\w+))?")
PLACEHOLDER = re.compile(r"<[^<>\s][^<>]*>")


def _tables() -> list[tuple[str, dict[str, str], int]]:
    """(kind, row as header -> cell, line number) for every row of every table."""
    rows, header = [], None
    with open(CATALOGUE, encoding="utf-8") as f:
        lines = f.read().split("\n")
    for number, line in enumerate(lines, 1):
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = tuple(cells)
            assert header in HEADERS, f"ERRORS.md:{number}: unknown table header {header}"
        elif not set(line) <= set("|- "):
            assert len(cells) == len(header), f"ERRORS.md:{number}: {len(cells)} cells for {len(header)} columns"
            rows.append((HEADERS[header], dict(zip(header, cells)), number))
    return rows


@functools.cache
def _test_names(path: str) -> set[str]:
    """`name` and `Class::name` of the tests defined in a test file."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    names = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            names.add(node.name)
        elif isinstance(node, ast.ClassDef):
            names |= {f"{node.name}::{m.name}" for m in node.body
                      if isinstance(m, ast.FunctionDef) and m.name.startswith("test")}
    return names


@functools.cache
def _templates() -> list[tuple[re.Pattern, int]]:
    """Every string the code can write, as (pattern, literal length): literal text, and `.+` where a value is
    formatted in."""
    out = []
    paths = sorted(os.path.join(top, name) for folder in SOURCES for top, _, names in os.walk(folder)
                   for name in names if name.endswith(".py"))  # subpackages too (xlora_runtime/backends)
    for path in paths:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.JoinedStr):
                literal = [v.value for v in node.values if isinstance(v, ast.Constant)]
                parts = [re.escape(v.value) if isinstance(v, ast.Constant) else ".+" for v in node.values]
                out.append((re.compile("".join(parts), re.S), len("".join(literal))))
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                out.append((re.compile(re.escape(node.value), re.S), len(node.value)))
    return out


def _written_by_the_code(message: str) -> bool:
    """A template matches the message, and it has some literal text of its own: 10 characters, or half of the
    message's (so that `f"{a}: {b}"` matches nothing)."""
    sample = PLACEHOLDER.sub("\0", message)
    literal = len(sample.replace("\0", ""))
    return any((size >= 10 or size * 2 >= literal) and pattern.fullmatch(sample) for pattern, size in _templates())


def test_rows_exist_and_use_known_exit_codes():
    rows = _tables()
    kinds = {kind for kind, _, _ in rows}
    assert {"errors", "guarantees"} <= kinds, kinds  # "gaps" only while some are known
    assert len([r for r in rows if r[0] == "errors"]) >= 80
    bad = [f"ERRORS.md:{n}: exit {row['exit']!r}" for kind, row, n in rows if kind == "errors" and
           row["exit"] not in EXITS]
    assert not bad, bad


def test_every_row_names_tests_that_exist():
    missing = []
    for _, row, number in _tables():
        refs = [r.strip() for r in row["test"].split(",")]
        for ref in refs:
            m = TEST_REF.fullmatch(ref)
            if m is None:
                missing.append(f"ERRORS.md:{number}: {ref!r} is not tests/FILE.py::test_name")
            elif not os.path.isfile(os.path.join(ROOT, m.group(1))):
                missing.append(f"ERRORS.md:{number}: {m.group(1)} does not exist")
            elif "::".join(g for g in m.groups()[1:] if g) not in _test_names(m.group(1)):
                missing.append(f"ERRORS.md:{number}: {ref} names no test in {m.group(1)}")
    assert not missing, "\n".join(missing)


def _xfail_tests() -> set[str]:
    """`tests/FILE.py::name` of every test marked `xfail` (a known gap)."""
    out = set()
    for name in sorted(os.listdir(os.path.join(ROOT, "tests"))):
        if not (name.startswith("test_") and name.endswith(".py")):
            continue
        with open(os.path.join(ROOT, "tests", name), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("xfail" in ast.unparse(d) for d in node.decorator_list):
                out.add(f"tests/{name}::{node.name}")
    return out


def test_known_gaps_are_the_xfail_tests():
    """A test marked xfail is a known gap: listed under "Known gaps", and named by no row that says the input
    is handled."""
    named: dict[str, set[str]] = {kind: set() for kind in HEADERS.values()}
    for kind, row, _ in _tables():
        named[kind] |= {ref.strip() for ref in row["test"].split(",")}
    xfails = _xfail_tests()
    assert xfails == named["gaps"], (sorted(xfails - named["gaps"]), sorted(named["gaps"] - xfails))
    handled = named["errors"] | named["guarantees"]
    assert not xfails & handled, sorted(xfails & handled)


def test_messages_are_what_the_code_writes():
    """Each message the code words (not argparse's usage errors, not the OS's `[Errno ...]`) matches a string
    of xlora_export or xlora_runtime, the `<...>` placeholders standing where the code formats a value in."""
    unknown = []
    for kind, row, number in _tables():
        if kind != "errors":
            continue
        m = re.fullmatch(r"`([^`]+)`", row["message"])
        if m is None:
            unknown.append(f"ERRORS.md:{number}: the message must be one `code span`")
            continue
        message = m.group(1)
        if row["exit"] == "2" or message.startswith("[Errno "):
            continue
        if not _written_by_the_code(message):
            unknown.append(f"ERRORS.md:{number}: no string in the code reads {message!r}")
    assert not unknown, "\n".join(unknown)


def test_the_checker_sees_a_wrong_message():
    """Negative control for the test above: a message the code never writes matches no template."""
    assert _written_by_the_code("<dir>: not a directory (expected an X-LoRA checkpoint folder)")
    assert not _written_by_the_code("<dir>: not a folder (expected an X-LoRA checkpoint folder)")
    assert not _written_by_the_code("<dir>: the checkpoint is broken")


def test_every_command_has_a_section():
    scripts = set()
    for pyproject in (os.path.join(ROOT, "pyproject.toml"), os.path.join(ROOT, "runtime", "pyproject.toml")):
        with open(pyproject, encoding="utf-8") as f:  # tomllib is Python 3.11+, the project supports 3.10
            section = re.search(r"^\[project\.scripts\]\n(.*?)(?:^\[|\Z)", f.read(), re.S | re.M).group(1)
        scripts |= set(re.findall(r"^([\w-]+)\s*=", section, re.M))
    with open(CATALOGUE, encoding="utf-8") as f:
        headings = [line for line in f.read().split("\n") if line.startswith("### `")]
    missing = sorted(s for s in scripts if not any(h.startswith(f"### `{s} ") for h in headings))
    assert scripts and not missing, missing
