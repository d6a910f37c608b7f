"""The exact one-line messages docs/ERRORS.md lists for the runtime's scalings log (`Generator.flush_log_scalings`,
a per-prompt `freeze_scalings_after` miscounted) and for `xlora-plot-scalings` given a tokens record
(`LOG_PATH-tokens.json`) that does not fit its log."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pytest

from helpers import exported
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.cli import plot_main
from xlora_runtime.plot import row_scalings
from xlora_runtime.scalings_log import save_scalings_arrays, tokens_record_path

L, N = 4, 2  # modules, experts of the synthetic logs


def _message(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------------------------ the runtime's log
def test_flush_of_an_empty_log_and_of_a_path_with_extension(tmp_path):
    gen = Generator(XLoraSession(exported("tiny-llama"), threads=1))
    with pytest.raises(XLoraError) as excinfo:
        gen.flush_log_scalings(str(tmp_path / "log"))
    assert _message(excinfo) == "flush_log_scalings: the scalings log is empty (enable logging first?)"
    gen.log_scalings = True
    gen.generate([[5, 6]], max_new_tokens=2, stop_token_ids=[])
    with pytest.raises(XLoraError) as excinfo:
        gen.flush_log_scalings(str(tmp_path / "log.npy"))
    assert _message(excinfo) == f"flush_log_scalings: give the path without extension, got '{tmp_path / 'log.npy'}'"
    assert os.listdir(tmp_path) == []
    with pytest.raises(XLoraError) as excinfo:
        gen.generate([[5, 6], [7], [8, 9]], max_new_tokens=2, freeze_scalings_after=[0, 1])
    assert _message(excinfo) == "freeze_scalings_after: 2 values for 3 prompts"


# ----------------------------------------------------------------------------------- the plot's tokens record
def _record(prompts: list[dict[str, Any]] | None = None, first: int = 0, entries: int = 2) -> dict[str, Any]:
    """The record of one call of two prompts, 2 new tokens each: prefill (2, 3, L, n), one decode entry."""
    prompts = prompts or [dict(prompt_ids=[1, 2, 3], tokens=[5, 6]), dict(prompt_ids=[4], tokens=[7, 8])]
    return dict(expert_names=["a", "b"], calls=[dict(first_entry=first, entries=entries, prompts=prompts)])


LOG = [np.full((2, 3, L, N), 0.5, np.float32), np.full((2, 1, L, N), 0.25, np.float32)]


def test_a_record_that_fits_plots():
    values, labels = row_scalings(LOG, 1, record=_record())
    assert values.shape == (2, L, N) and labels == ["#7", "#8"]


@pytest.mark.parametrize("record, row, call, says", [
    (_record(), 0, 1, "call 1: the tokens record has 1 call(s)"),
    (_record(), 2, None, "row 2: call 0 of the tokens record has 2 prompts"),
    ({"calls": []}, 0, None, "the tokens record lists no calls"),
    ({"calls": [{"entries": 2, "prompts": []}]}, 0, None, "the tokens record is malformed (KeyError('first_entry'))"),
    (_record([dict(prompt_ids=[1], tokens=[])]), 0, None,
     "the tokens record is malformed (call 0 has a prompt without tokens)"),
    (_record(entries=3), 0, None, "the tokens record does not describe this log: call 0 lists 3 entries from entry "
                                  "0, whose (rows, positions) are [(2, 3), (2, 1)] (2 entries); its prompts imply "
                                  "[(2, 3), (2, 1)] (2 entries)"),
    (_record([dict(prompt_ids=[1, 2, 3], tokens=[5, 6, 7])], entries=3), 0, None,
     "the tokens record does not describe this log: call 0 lists 3 entries from entry 0, whose (rows, positions) "
     "are [(2, 3), (2, 1)] (2 entries); its prompts imply [(1, 3), (1, 1), (1, 1)] (3 entries)"),
])
def test_records_that_do_not_fit_the_log(record, row, call, says):
    with pytest.raises(XLoraError) as excinfo:
        row_scalings(LOG, row, record=record, call=call)
    assert _message(excinfo) == says


@pytest.mark.parametrize("content, argv, says", [
    (None, ["--call", "1"], "call 1: choosing a call needs the tokens record (PATH-tokens.json) beside the log"),
    ("[1, 2]", [], "{record}: expected a JSON object"),
    (json.dumps(_record()), ["--call", "3"], "call 3: the tokens record has 1 call(s)"),
    (json.dumps(_record()), ["--row", "4"], "row 4: call 0 of the tokens record has 2 prompts"),
])
def test_plot_command_with_a_record_that_does_not_fit(tmp_path, capsys, content, argv, says):
    log, png = str(tmp_path / "run"), str(tmp_path / "p.png")
    save_scalings_arrays(LOG, log)
    if content is not None:
        with open(tokens_record_path(log), "w") as f:
            f.write(content)
    capsys.readouterr()
    assert plot_main([log, png, *argv]) == 1
    captured = capsys.readouterr()
    assert captured.err == f"xlora-plot-scalings: error: {says.format(record=tokens_record_path(log))}\n"
    assert captured.out == "" and not os.path.exists(png)
