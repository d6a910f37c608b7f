"""The runtime's command-line tools, called in-process: `xlora-generate` and `xlora-plot-scalings`, and the plot.

Outputs are checked against `Generator` itself (text, tokens, scalings); the scalings log and its tokens record
are read back with `load_scalings_log` and followed row by row; every bad input gives exit code 1 and one line.
"""

from __future__ import annotations

import ast
import json
import os
import sys

import numpy as np
import pytest
import torch

from helpers import exported
from xlora_export.scalings_log import flush_log_scalings
from xlora_export.xlora_utils import load_scalings_log
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.cli import build_generate_parser, build_plot_parser, generate_main, plot_main
from xlora_runtime.plot import MAX_TOKEN_LABELS, plot_scalings, row_scalings, tick_positions, token_label
from xlora_runtime.scalings_log import tokens_record_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RUNTIME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "runtime", "xlora_runtime")


@pytest.fixture(scope="module")
def graph() -> str:
    return exported("tiny-llama")


@pytest.fixture(scope="module")
def generator(graph) -> Generator:
    return Generator(XLoraSession(graph, threads=1))


@pytest.fixture(scope="module")
def shape(generator) -> tuple[int, int]:
    """(L modules, n experts)."""
    return generator.session.info.n_modules, generator.session.info.n_experts


def run(main, argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


def check_png(path: str) -> None:
    from matplotlib.image import imread

    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    height, width = imread(path).shape[:2]
    assert height > 0 and width > 0


# --------------------------------------------------------------------------------------------- xlora-generate
def test_text_prompt(graph, generator, capsys):
    code, out, err = run(generate_main, [graph, "the model mixes", "--max-new-tokens", "6", "--threads", "1"],
                         capsys)
    assert code == 0, err
    [expected] = generator.generate("the model mixes", max_new_tokens=6)
    assert expected.text and out.startswith(expected.text + "\n")
    stats = out.splitlines()[-1]
    assert "tokens/s" in stats and "peak cache" in stats and "KiB" in stats


def test_ids_two_prompts(graph, generator, capsys):
    code, out, err = run(generate_main, [graph, "5,6,7", "8, 9, 10, 11", "--ids", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    expected = generator.generate([[5, 6, 7], [8, 9, 10, 11]], max_new_tokens=4)
    lines = out.splitlines()
    assert lines[0] == f"[0] {expected[0].text}" and lines[1] == f"[1] {expected[1].text}"
    assert "tokens/s" in lines[2]


def test_json(graph, generator, shape, capsys):
    code, out, err = run(generate_main, [graph, "the model mixes", "hello", "--json", "--max-new-tokens", "5",
                                         "--no-eos"], capsys)
    assert code == 0, err
    records = json_lines(out)
    expected = generator.generate(["the model mixes", "hello"], max_new_tokens=5, stop_token_ids=[])
    assert len(records) == 2
    for i, (record, want) in enumerate(zip(records, expected)):
        assert set(record) >= {"tokens", "text", "finish_reason", "scalings"}
        assert record["prompt"] == i and record["tokens"] == want.tokens and record["text"] == want.text
        assert record["finish_reason"] == "length"
        scalings = np.array(record["scalings"])
        assert scalings.shape == (5, *shape)
        np.testing.assert_allclose(scalings, want.scalings, atol=6e-5)


def test_freeze_scalings_after_0(graph, capsys):
    base = [graph, "the model mixes", "--json", "--max-new-tokens", "6", "--no-eos"]
    code, out, err = run(generate_main, base + ["--freeze-scalings-after", "0"], capsys)
    assert code == 0, err
    [frozen] = json_lines(out)
    [granular] = json_lines(run(generate_main, base, capsys)[1])
    scalings = np.array(frozen["scalings"])
    assert len(frozen["tokens"]) == 6 and (scalings == scalings[0]).all()  # frozen at the prompt's last token
    assert frozen["scalings"][0] == granular["scalings"][0] and frozen["tokens"][0] == granular["tokens"][0]


def test_stream_prints_the_same_text(graph, generator, capsys):
    code, out, err = run(generate_main, [graph, "the model mixes", "--stream", "--max-new-tokens", "6"], capsys)
    assert code == 0, err
    [expected] = generator.generate("the model mixes", max_new_tokens=6)
    assert out.startswith(expected.text + "\n") and "tokens/s" in out.splitlines()[-1]
    code, out, err = run(generate_main, [graph, "the", "hello", "--stream", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert sorted(line[:3] for line in out.splitlines()[:-1]) == ["[0]", "[1]"]


def test_stop_ids_and_sampling(graph, generator, capsys):
    [greedy] = generator.generate("the model mixes", max_new_tokens=4, stop_token_ids=[])
    code, out, err = run(generate_main, [graph, "the model mixes", "--json", "--stop-id", str(greedy.tokens[0])],
                         capsys)
    assert code == 0, err
    [record] = json_lines(out)
    assert record["tokens"] == greedy.tokens[:1] and record["finish_reason"] == "stop_token"
    argv = [graph, "the model mixes", "--json", "--sample", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    first, second = (json_lines(run(generate_main, argv, capsys)[1]) for _ in range(2))
    assert first == second  # --seed makes sampling reproducible


def test_vllm_sampling_options(graph, generator, capsys):
    """--top-k, --min-p, --repetition-penalty and --min-tokens reach the Generator's keywords."""
    options = dict(max_new_tokens=6, stop_token_ids=[], do_sample=True, seed=4, top_k=5, min_p=0.05,
                   repetition_penalty=1.5)
    [expected] = generator.generate("the model mixes", **options)
    argv = [graph, "the model mixes", "--json", "--no-eos", "--max-new-tokens", "6", "--sample", "--seed", "4",
            "--top-k", "5", "--min-p", "0.05", "--repetition-penalty", "1.5"]
    code, out, err = run(generate_main, argv, capsys)
    assert code == 0, err
    assert json_lines(out)[0]["tokens"] == expected.tokens
    [greedy] = generator.generate("the model mixes", max_new_tokens=1, stop_token_ids=[])
    argv = [graph, "the model mixes", "--json", "--max-new-tokens", "3", "--stop-id", str(greedy.tokens[0]),
            "--min-tokens", "2"]
    [record] = json_lines(run(generate_main, argv, capsys)[1])
    assert greedy.tokens[0] not in record["tokens"][:2] and len(record["tokens"]) >= 2
    code, _, err = run(generate_main, [graph, "x", "--top-k", "3"], capsys)
    assert code == 1 and err == "xlora-generate: error: --top-k and --min-p apply to sampling: add --sample\n"


def test_log_scalings_and_plot(graph, shape, tmp_path, capsys):
    log = str(tmp_path / "log")
    code, out, err = run(generate_main, [graph, "the model mixes", "hi", "--max-new-tokens", "6", "--no-eos",
                                         "--log-scalings", log], capsys)
    assert code == 0, err
    assert f"wrote {tokens_record_path(log)}" in out
    entries = load_scalings_log(log)
    assert len(entries) == 6 and entries[0].shape[0] == 2 and entries[0].shape[2:] == shape
    assert all(tuple(e.shape) == (2, 1, *shape) for e in entries[1:])
    with open(tokens_record_path(log)) as f:
        record = json.load(f)
    [call] = record["calls"]
    assert call["first_entry"] == 0 and call["entries"] == 6 and call["freeze_scalings_after"] == [None, None]
    assert [len(p["tokens"]) for p in call["prompts"]] == [6, 6] and len(record["expert_names"]) == shape[1]
    for extra in ([], ["--module", "1"], ["--row", "1", "--include-prompt"]):
        png = str(tmp_path / f"plot{len(extra)}.png")
        code, out, err = run(plot_main, [log, png] + extra, capsys)
        assert code == 0, err
        assert out.strip() == png
        check_png(png)


@pytest.mark.parametrize("freeze", [None, 2])
def test_log_rows_match_the_tokens(graph, tmp_path, capsys, freeze):
    """Every entry holds every row in prompt order (a finished row is NaN); the tokens record labels them."""
    prompts = ["5,6,7", "8,9,10,11", "12,13"]
    [_, middle, _] = json_lines(run(generate_main, [graph, *prompts, "--ids", "--json", "--no-eos"], capsys)[1])
    log = str(tmp_path / "log")
    argv = [graph, *prompts, "--ids", "--json", "--no-eos", "--max-new-tokens", "8", "--stop-id",
            str(middle["tokens"][1]), "--log-scalings", log]
    argv += [] if freeze is None else ["--freeze-scalings-after", str(freeze)]
    code, out, err = run(generate_main, argv, capsys)
    assert code == 0, err
    records = json_lines(out)
    assert records[1]["finish_reason"] == "stop_token" and len(records[1]["tokens"]) <= 2
    with open(tokens_record_path(log)) as f:
        record = json.load(f)
    arrays = [e.numpy() for e in load_scalings_log(log)]
    assert [a.shape[:2] for a in arrays] == [(3, 4)] + [(3, 1)] * (len(arrays) - 1)
    assert np.isnan(arrays[-1][1]).all()  # prompt 1 finished: NaN in the last entry
    for row, want in enumerate(records):
        values, labels = row_scalings(arrays, row, record=record)
        assert len(labels) == len(values) == len(want["tokens"])
        pieces = record["calls"][0]["prompts"][row]["pieces"]
        assert "".join(pieces) == want["text"] and labels == [token_label(p, t) for p, t in zip(pieces, want["tokens"])]
        np.testing.assert_allclose(values, np.array(want["scalings"]), atol=6e-5)
        with_prompt, labels = row_scalings(arrays, row, include_prompt=True, record=record)
        prompt_length = len(prompts[row].split(","))
        assert len(with_prompt) == len(labels) == prompt_length - 1 + len(want["tokens"])
    os.remove(tokens_record_path(log))  # without the record, a row ends where it is NaN
    for row, want in enumerate(records):
        values, labels = row_scalings(arrays, row)
        assert len(values) == len(labels) == len(want["tokens"])
        np.testing.assert_allclose(values, np.array(want["scalings"]), atol=6e-5)


def test_python_api_log_with_per_row_freezing_plots(graph, tmp_path, capsys):
    """A log flushed from the Python API carries the tokens record: plots are labelled with the token texts,
    rows freezing at different steps are followed exactly, and --call picks a later call of the log."""
    gen = Generator(XLoraSession(graph, threads=1))
    gen.log_scalings = True
    prompts, ks = ["the model mixes", "a cache", "low rank experts mix"], [0, None, 3]
    first = gen.generate(prompts, max_new_tokens=7, stop_token_ids=[], freeze_scalings_after=ks)
    second = gen.generate(prompts[1], max_new_tokens=4, stop_token_ids=[])
    log = str(tmp_path / "api")
    files = gen.flush_log_scalings(log)
    assert tokens_record_path(log) in files
    arrays = [e.numpy() for e in load_scalings_log(log)]
    assert len(arrays) == 7 + 4
    record = json.loads(open(tokens_record_path(log)).read())
    assert [(c["first_entry"], c["entries"]) for c in record["calls"]] == [(0, 7), (7, 4)]
    assert record["calls"][0]["freeze_scalings_after"] == ks
    for row, want in enumerate(first):
        values, labels = row_scalings(arrays, row, record=record)
        np.testing.assert_array_equal(values, want.scalings)
        assert labels == [token_label(p, t) for p, t in zip(record["calls"][0]["prompts"][row]["pieces"],
                                                          want.tokens)]
        assert "".join(record["calls"][0]["prompts"][row]["pieces"]) == want.text
    for row, k in ((0, 0), (2, 3)):  # frozen from step k on, at its own step
        values = row_scalings(arrays, row, record=record)[0]
        assert (values[k:] == values[k]).all() and not (values[:k + 1] == values[k]).all(axis=(1, 2))[:k].any()
    values, labels = row_scalings(arrays, 0, record=record, call=1)
    np.testing.assert_array_equal(values, second[0].scalings)
    assert len(labels) == 4
    for argv in (["--row", "2"], ["--row", "0", "--call", "1", "--include-prompt"]):
        png = str(tmp_path / f"plot{len(argv)}.png")
        code, out, err = run(plot_main, [log, png] + argv, capsys)
        assert code == 0, err
        check_png(png)
    code, out, err = run(plot_main, [log, str(tmp_path / "x.png"), "--call", "2"], capsys)
    assert code == 1 and "call 2: the tokens record has 2 call(s)" in err


def test_generation_cut_by_the_position_limit_says_so(graph, generator, capsys):
    """A 250-token prompt on a 256-position model leaves room for 7 of 32 tokens: finish reason max_positions
    in the API and one line from xlora-generate naming max_position_embeddings."""
    info = generator.session.info
    assert info.max_positions == 256
    prompt = [5 + i % 50 for i in range(250)]
    [result] = generator.generate(prompt, max_new_tokens=32, stop_token_ids=[])
    assert len(result.tokens) == 7 and result.finish_reason == "max_positions"
    events = list(generator.stream(prompt, max_new_tokens=32, stop_token_ids=[]))
    assert [e.finish_reason for e in events] == [None] * 6 + ["max_positions"]
    ids = ",".join(map(str, prompt))
    code, out, err = run(generate_main, [graph, ids, "--ids", "--max-new-tokens", "32", "--no-eos", "--json"],
                         capsys)
    assert code == 0, err
    [record] = json_lines(out)
    assert len(record["tokens"]) == 7 and record["finish_reason"] == "max_positions"
    [line] = err.splitlines()
    assert "max_position_embeddings (256 positions)" in line and "after 7 of 32 new tokens" in line
    code, out, err = run(generate_main, [graph, ids, "--ids", "--max-new-tokens", "7", "--no-eos"], capsys)
    assert code == 0 and err == ""  # 7 fit: no notice


def test_png_mode_follows_the_umask(shape, tmp_path):
    scalings = np.random.default_rng(0).random((4, *shape)).astype(np.float32)
    experts = [f"e{j}" for j in range(shape[1])]
    for umask, mode in ((0o022, 0o644), (0o002, 0o664), (0o077, 0o600)):
        before = os.umask(umask)
        try:
            path = plot_scalings(scalings, str(tmp_path / f"plot-{umask:o}.png"), experts)
        finally:
            os.umask(before)
        assert os.stat(path).st_mode & 0o777 == mode, f"umask {umask:o}: mode {os.stat(path).st_mode & 0o777:o}"
    assert sorted(os.listdir(tmp_path)) == ["plot-2.png", "plot-22.png", "plot-77.png"]


@pytest.mark.parametrize("argv, message", [
    (["missing.onnx", "hi"], "no such file"),
    (["{graph}", "5,6,99999", "--ids"], "outside the vocabulary"),
    (["{graph}", "hi", "--expert-top-k", "99"], "expert_top_k=99"),
    (["{graph}", "5,x", "--ids"], "comma-separated list of token ids"),
    (["{graph}", "hi", "--temperature", "0.5"], "add --sample"),
    (["{graph}", "hi", "--log-scalings", "/no/such/folder/log"], "does not exist"),
])
def test_generate_user_errors(graph, capsys, argv, message):
    code, out, err = run(generate_main, [a.replace("{graph}", graph) for a in argv], capsys)
    assert code == 1
    assert len(err.splitlines()) == 1 and err.startswith("xlora-generate: error:") and message in err
    assert "Traceback" not in err + out


def test_plot_user_errors(graph, tmp_path, capsys):
    log = str(tmp_path / "log")
    assert run(generate_main, [graph, "hi", "--max-new-tokens", "3", "--log-scalings", log], capsys)[0] == 0
    png = str(tmp_path / "out.png")
    for argv, message in [([str(tmp_path / "missing"), png], "neither"), ([log, png, "--module", "99"], "module 99"),
                          ([log, png, "--experts", "a,b"], "2 names"), ([log, png, "--row", "4"], "row 4")]:
        code, out, err = run(plot_main, argv, capsys)
        assert code == 1
        assert len(err.splitlines()) == 1 and err.startswith("xlora-plot-scalings: error:") and message in err
        assert "Traceback" not in err + out
    assert not os.path.exists(png)


def test_log_of_an_export_without_tokenizer_is_labelled_by_ids(graph, tmp_path):
    lonely = tmp_path / os.path.basename(graph)
    lonely.write_bytes(open(graph, "rb").read())  # the graph and its weights file: no tokenizer beside them
    if os.path.exists(graph + ".data"):
        (tmp_path / (lonely.name + ".data")).write_bytes(open(graph + ".data", "rb").read())
    gen = Generator(XLoraSession(str(lonely), threads=1))
    gen.log_scalings = True
    [result] = gen.generate([5, 6, 7], max_new_tokens=3, stop_token_ids=[])
    log = str(tmp_path / "log")
    gen.flush_log_scalings(log)
    record = json.loads(open(tokens_record_path(log)).read())
    assert record["calls"][0]["prompts"][0]["pieces"] is None
    values, labels = row_scalings([e.numpy() for e in load_scalings_log(log)], 0, record=record)
    assert labels == [f"#{t}" for t in result.tokens]
    np.testing.assert_array_equal(values, result.scalings)


def test_tokens_record_errors_and_staleness(generator, tmp_path, capsys):
    """A record that does not describe the log, or is not JSON, is a one-line error; a flush without a record
    (the eager model's) removes the stale record of an earlier runtime flush to the same path."""
    gen = Generator(generator.session)
    gen.log_scalings = True
    gen.generate(["the model", "a"], max_new_tokens=3, stop_token_ids=[])
    log, png = str(tmp_path / "log"), str(tmp_path / "out.png")
    gen.flush_log_scalings(log)
    record = json.loads(open(tokens_record_path(log)).read())
    record["calls"][0]["prompts"][0]["tokens"].append(5)  # claims one more step than the log holds
    with open(tokens_record_path(log), "w") as f:
        json.dump(record, f)
    code, _, err = run(plot_main, [log, png], capsys)
    assert code == 1 and "does not describe this log" in err and len(err.splitlines()) == 1
    with open(tokens_record_path(log), "w") as f:
        f.write("{not json")
    code, _, err = run(plot_main, [log, png], capsys)
    assert code == 1 and "cannot read it" in err and len(err.splitlines()) == 1
    flush_log_scalings([torch.zeros(1, 2, *gen.scalings_log[0].shape[2:])], log)
    assert not os.path.exists(tokens_record_path(log))
    code, _, err = run(plot_main, [log, png, "--call", "1"], capsys)
    assert code == 1 and "needs the tokens record" in err
    assert run(plot_main, [log, png], capsys)[0] == 0


@pytest.mark.parametrize("main, parser", [(generate_main, build_generate_parser), (plot_main, build_plot_parser)])
def test_help_lists_every_option(main, parser, capsys):
    code, out, _ = run(main, ["--help"], capsys)
    assert code == 0
    flat = "".join(out.split())  # help lines wrap anywhere, even after a hyphen
    for action in parser()._actions:
        assert action.help, action.option_strings or action.dest
        for option in action.option_strings:
            assert option in out
        assert "".join(action.help.split()) in flat


# ------------------------------------------------------------------------------------------------------ plot
def test_plot_function(shape, tmp_path):
    scalings = np.random.default_rng(0).random((10, *shape)).astype(np.float32)
    experts = [f"e{j}" for j in range(shape[1])]
    labels = [f"tok{i}" for i in range(12)]
    with pytest.raises(XLoraError, match="12 token labels for 10 tokens"):
        plot_scalings(scalings, str(tmp_path / "bad.png"), experts, labels)
    with pytest.raises(XLoraError, match="module 99"):
        plot_scalings(scalings, str(tmp_path / "bad.png"), experts, module=99)
    with pytest.raises(XLoraError, match="expert names"):
        plot_scalings(scalings, str(tmp_path / "bad.png"), experts[:-1])
    for module in (None, 1):
        path = str(tmp_path / f"plot-{module}.png")
        assert plot_scalings(scalings, path, experts, labels[:10], module=module, module_name="q_proj") == path
        check_png(path)
    assert sorted(os.listdir(tmp_path)) == ["plot-1.png", "plot-None.png"]  # no temporary file left behind


def test_token_labels_are_thinned():
    assert tick_positions(12) == list(range(12))
    shown = tick_positions(500)
    assert shown[0] == 0 and len(shown) <= MAX_TOKEN_LABELS and len(tick_positions(MAX_TOKEN_LABELS)) == 64


def test_plot_without_matplotlib(shape, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(XLoraError, match=r'^plotting needs matplotlib: pip install "\./runtime\[plot\]"$'):
        plot_scalings(np.zeros((3, *shape)), str(tmp_path / "x.png"), [f"e{j}" for j in range(shape[1])])


def test_runtime_imports_no_heavy_dependency():
    for name in sorted(os.listdir(RUNTIME)):
        if name.endswith(".py"):
            with open(os.path.join(RUNTIME, name)) as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                for module in modules:
                    assert module.split(".")[0] not in {"torch", "transformers", "peft"}, f"{name} imports {module}"
