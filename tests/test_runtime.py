"""xlora-runtime: torch-free generation over an exported graph (cache semantics, API, graph contract, parity).

The runtime must reproduce the eager model: greedy tokens equal to the cached `generate` and to the no-cache
recompute (the correctness definition of section 3), logits within 1e-4, scalings within 1e-5, for every
top_k and for frozen scalings (per row); its scalings log must match the eager model's entry by entry and
load with `load_scalings_log`; bad inputs raise one-line `XLoraError`s and leave the generator usable; and
finished or frozen rows must release their caches.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from functools import cache

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

import xlora_export as xlora
from helpers import built, exported, left_padded
from models.recipes import FAMILY_RECIPES
from xlora_export.xlora_utils import load_scalings_log
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.format import contract as C

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_PACKAGE = os.path.join(ROOT, "runtime", "xlora_runtime")
RECIPES = FAMILY_RECIPES
PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])  # three lengths: left padding
STEPS = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread and one ONNX Runtime thread: these models are tiny, and two thread pools taking
    turns on two (possibly busy) cores made this file 30x slower under load than on a quiet machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@cache
def session(name: str = "tiny-llama") -> XLoraSession:
    return XLoraSession(exported(name), threads=1)


@cache
def eager(name: str = "tiny-llama") -> xlora.xLoRAModel:
    return xlora.xlora_utils.load_model(built(name))[0].eval()


def eager_generate(model: xlora.xLoRAModel, prompts, steps: int = STEPS, **kwargs) -> list[list[int]]:
    """The eager model's cached greedy `generate`, new tokens only, one list per prompt."""
    ids, mask = left_padded(list(prompts))
    out = model.generate(ids, attention_mask=mask, max_new_tokens=steps, eos_token_id=None, **kwargs)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def recompute(model: xlora.xLoRAModel, prompts, steps: int = STEPS):
    """The reference: the whole sequence through the model every step (no cache), argmax.

    Returns (tokens (b, steps), logits (b, steps, vocab), scalings (b, steps, L, n)) at each step's last position.
    """
    ids, mask = left_padded(list(prompts))
    tokens, logits, scalings = [], [], []
    for _ in range(steps):
        out = model(ids, attention_mask=mask, use_cache=False)
        last = out.logits[:, -1]
        nxt = last.argmax(-1)
        tokens.append(nxt)
        logits.append(last)
        scalings.append(out.scalings[:, -1])
        ids = torch.cat([ids, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return (torch.stack(tokens, 1).tolist(), torch.stack(logits, 1).double().numpy(),
            torch.stack(scalings, 1).double().numpy())


def tokens_of(results) -> list[list[int]]:
    return [r.tokens for r in results]


def expect_error(call, match: str) -> str:
    """`call()` raises a one-line XLoraError whose message contains `match` (case-insensitive)."""
    with pytest.raises(XLoraError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, f"not one line: {message!r}"
    assert match.lower() in message.lower(), f"{match!r} not in {message!r}"
    return message


def still_works(gen: Generator) -> None:
    [result] = gen.generate([PROMPTS[0]], max_new_tokens=4, stop_token_ids=[])
    assert len(result.tokens) == 4 and result.finish_reason == "length"


def unit_bytes(info) -> int:
    """Bytes one position of one row takes in ONE cache (key and value of every layer), computed from the
    metadata independently of the runtime's bookkeeping."""
    itemsize = {"float32": 4, "float16": 2}[info.cache_dtype]
    return 2 * info.num_layers * info.kv_heads * info.head_dim * itemsize


# ----------------------------------------------------------------------------------------------- torch-free
_TORCH_FREE_SCRIPT = textwrap.dedent("""
    import json, sys
    for name in ("torch", "transformers", "peft"):
        sys.modules[name] = None  # `import torch` now raises ImportError
    try:
        import torch  # noqa
    except ImportError:
        pass
    else:
        raise SystemExit("the torch block did not work")
    from xlora_runtime import Generator, XLoraSession
    gen = Generator(XLoraSession(sys.argv[1]))
    [text] = gen.generate("the model mixes", max_new_tokens=6, stop_token_ids=[])
    ids = gen.generate([[5, 17, 99, 230], [300, 22, 9]], max_new_tokens=5, stop_token_ids=[])
    assert sys.modules.get("torch") is None, "xlora_runtime imported torch"
    loaded = sorted(m for m in sys.modules if sys.modules[m] is not None
                    and m.split(".")[0] in ("torch", "transformers", "peft"))
    print(json.dumps({"text_tokens": text.tokens, "text": text.text, "id_tokens": [r.tokens for r in ids],
                      "loaded": loaded}))
""")


def test_runtime_runs_with_torch_unimportable():
    path = exported("tiny-llama")
    runtime_root = os.path.dirname(RUNTIME_PACKAGE)  # this checkout's runtime, installed or not
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [runtime_root, os.environ.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-c", _TORCH_FREE_SCRIPT, path], capture_output=True, text=True,
                            cwd=os.path.dirname(path), env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == [], f"imported without being asked: {report['loaded']}"
    assert len(report["text_tokens"]) == 6 and isinstance(report["text"], str)
    assert [len(t) for t in report["id_tokens"]] == [5, 5]
    # the same tokens as the runtime in this (torch-importing) process
    gen = Generator(session())
    assert report["text_tokens"] == gen.generate("the model mixes", max_new_tokens=6, stop_token_ids=[])[0].tokens
    assert report["id_tokens"] == tokens_of(gen.generate([[5, 17, 99, 230], [300, 22, 9]], max_new_tokens=5,
                                                         stop_token_ids=[]))


_FORBIDDEN = {"torch", "transformers", "peft"}


def _imports(tree: ast.AST) -> list[tuple[int, str]]:
    """Every module a file imports: import statements anywhere (functions included), `from . import`
    excluded, plus `importlib.import_module("x")` / `__import__("x")` with a literal name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            fn = node.func
            name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.append((node.lineno, node.args[0].value))
    return found


def test_runtime_sources_never_import_torch():
    files = [os.path.join(folder, f) for folder, _, names in os.walk(RUNTIME_PACKAGE) for f in names
             if f.endswith(".py")]
    assert len(files) >= 6, files
    offenders, seen = [], set()
    for path in sorted(files):
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        for line, module in _imports(tree):
            seen.add(module.split(".")[0])
            if module.split(".")[0] in _FORBIDDEN:
                offenders.append(f"{os.path.relpath(path, ROOT)}:{line} imports {module}")
    assert not offenders, offenders
    assert "onnxruntime" in seen and "numpy" in seen  # the walk did find the imports


def test_static_check_catches_a_function_level_import():
    source = "def f():\n    import torch.nn\n    from peft import x\n    importlib.import_module('transformers')\n"
    tree = ast.parse(source)
    assert {m.split(".")[0] for _, m in _imports(tree)} == _FORBIDDEN


# ----------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("name", RECIPES)
def test_greedy_equals_eager_generate_and_no_cache_recompute(name):
    model = eager(name)
    results = Generator(session(name)).generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[],
                                                return_logits=True)
    ref_tokens, ref_logits, ref_scalings = recompute(model, PROMPTS)
    cached = eager_generate(model, PROMPTS)
    assert cached == ref_tokens, "eager cached generate differs from the no-cache recompute"
    assert tokens_of(results) == ref_tokens
    info = session(name).info
    for i, r in enumerate(results):
        assert r.prompt_ids == list(PROMPTS[i])
        assert r.finish_reason == "length"
        assert r.logits.shape == (STEPS, info.vocab_size)
        assert r.scalings.shape == (STEPS, info.n_modules, info.n_experts)
        logit_diff = np.abs(r.logits - ref_logits[i]).max()
        scaling_diff = np.abs(r.scalings - ref_scalings[i]).max()
        assert logit_diff <= 1e-4, f"row {i}: logits differ by {logit_diff:.3g}"
        assert scaling_diff <= 1e-5, f"row {i}: scalings differ by {scaling_diff:.3g}"
    # not vacuous: the scalings change from token to token
    assert np.abs(np.diff(results[0].scalings, axis=0)).max() > 1e-3


# ----------------------------------------------------------------------------------------------- sampling, top-k
def test_sampling_reproducible_with_seed():
    gen = Generator(session())
    options = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95, stop_token_ids=[])
    first = tokens_of(gen.generate(list(PROMPTS), seed=7, **options))
    again = tokens_of(gen.generate(list(PROMPTS), seed=7, **options))
    other = tokens_of(gen.generate(list(PROMPTS), seed=8, **options))
    greedy = tokens_of(gen.generate(list(PROMPTS), max_new_tokens=16, stop_token_ids=[]))
    assert first == again
    assert first != other
    assert first != greedy


def test_top_k_matches_eager_set_topk_lora():
    model, info = eager(), session().info
    gen = Generator(session())
    before = model.get_topk_lora()
    outputs = {}
    try:
        for k in range(info.n_experts + 1):
            model.set_topk_lora(None if k == 0 else k)
            runtime = tokens_of(gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[],
                                             expert_top_k=k))
            assert runtime == eager_generate(model, PROMPTS), f"top_k={k}"
            outputs[k] = runtime
    finally:
        model.set_topk_lora(before)
    assert outputs[info.n_experts] == outputs[0]  # keeping every expert is dense
    assert any(outputs[k] != outputs[0] for k in range(1, info.n_experts)), "top-k never changed the tokens"


# ----------------------------------------------------------------------------------------------- frozen scalings
def test_frozen_scalings_equal_eager_frozen_generate():
    model, gen = eager(), Generator(session())
    granular = tokens_of(gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[]))
    differs = []
    for k in (0, 1, 3):
        runtime = gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[], freeze_scalings_after=k)
        assert tokens_of(runtime) == eager_generate(model, PROMPTS, freeze_scalings_after=k), f"k={k}"
        for r in runtime:  # the reported scalings stop changing once frozen
            assert np.array_equal(r.scalings[k:], np.broadcast_to(r.scalings[k], r.scalings[k:].shape))
        differs.append(tokens_of(runtime) != granular)
    assert any(differs), "freezing never changed the tokens (the test would be vacuous)"


def test_frozen_scalings_with_top_k():
    """The frozen graph applies the same top_k input to its fixed scalings as the eager model does."""
    model, gen = eager(), Generator(session())
    before = model.get_topk_lora()
    try:
        for k in (1, 2):
            model.set_topk_lora(k)
            runtime = gen.generate(list(PROMPTS), max_new_tokens=16, stop_token_ids=[], expert_top_k=k,
                                   freeze_scalings_after=1)
            assert tokens_of(runtime) == eager_generate(model, PROMPTS, steps=16, freeze_scalings_after=1), f"k={k}"
    finally:
        model.set_topk_lora(before)


def test_per_row_freezing():
    model, gen = eager(), Generator(session())
    ks = [0, None, 2]
    results = gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[], freeze_scalings_after=ks)
    for i, (prompt, k) in enumerate(zip(PROMPTS, ks)):
        [alone] = eager_generate(model, [prompt], freeze_scalings_after=k)
        assert results[i].tokens == alone, f"row {i} (freeze after {k})"
    granular = gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[])
    assert results[1].tokens == granular[1].tokens  # never frozen
    assert np.abs(results[1].scalings - granular[1].scalings).max() <= 1e-6
    assert np.abs(np.diff(results[1].scalings, axis=0)).max() > 1e-3
    for i, k in ((0, 0), (2, 2)):
        s = results[i].scalings
        assert np.array_equal(s[k:], np.broadcast_to(s[k], s[k:].shape)), f"row {i} kept changing after freezing"
        assert np.abs(s[:k + 1] - granular[i].scalings[:k + 1]).max() <= 1e-6  # granular up to the freeze


def test_freezing_after_more_steps_than_any_generation_is_never_freezing():
    """A freeze step beyond int64 (here numpy's largest uint64, which hypothesis found overflowing) never comes."""
    gen = Generator(session())
    late = gen.generate(list(PROMPTS), max_new_tokens=4, stop_token_ids=[],
                        freeze_scalings_after=[np.uint64(2**64 - 1), 2**70, None])
    granular = gen.generate(list(PROMPTS), max_new_tokens=4, stop_token_ids=[])
    assert [r.tokens for r in late] == [r.tokens for r in granular]


# ----------------------------------------------------------------------------------------------- stopping, streaming
def test_stop_token_ends_only_its_row():
    gen = Generator(session())
    free = tokens_of(gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[]))
    # a token that row 0 makes for the first time at some step >= 2 and no other row makes (checked, not assumed)
    at = next((j for j in range(2, STEPS) if free[0][j] not in free[0][:j]
               and all(free[0][j] not in row for row in free[1:])), None)
    assert at is not None, free
    stop = free[0][at]
    results = gen.generate(list(PROMPTS), max_new_tokens=STEPS, stop_token_ids=[stop])
    assert results[0].tokens == free[0][:at + 1]
    assert results[0].finish_reason == "stop_token"
    assert results[0].scalings.shape[0] == at + 1
    for i in (1, 2):
        assert results[i].tokens == free[i]
        assert results[i].finish_reason == "length"


def test_default_stop_ids_are_the_exports_eos():
    info = session().info
    assert info.eos_token_ids == [eager().model.generation_config.eos_token_id]


def _stop_string_in(pieces: list[str]) -> tuple[str, int] | None:
    """A substring of the generated text that ends mid-way through token j's text and first appears there."""
    text = "".join(pieces)
    ends = np.cumsum([len(p) for p in pieces])  # text length after each token
    for j in range(2, len(pieces)):
        if len(pieces[j]) < 2:
            continue
        end = int(ends[j]) - 1  # one character before the piece's end
        for start in range(max(0, end - 6), end - 2):
            candidate = text[start:end]
            if text.find(candidate) + len(candidate) == end and "\ufffd" not in candidate:
                return candidate, j
    return None


def test_stop_string_stops_at_the_token_completing_it():
    gen = Generator(session())
    for prompt in ("a small classifier that reads", "the model mixes low rank experts", "the model mixes"):
        events = list(gen.stream(prompt, max_new_tokens=STEPS, stop_token_ids=[]))
        pieces = [e.text for e in events]
        found = _stop_string_in(pieces)
        if found:
            break
    else:
        pytest.fail(f"no usable stop string in {''.join(pieces)!r}")
    stop, at = found
    [result] = gen.generate(prompt, max_new_tokens=STEPS, stop_token_ids=[], stop_strings=["never-seen", stop])
    assert result.tokens == [e.token for e in events][:at + 1], (stop, at, pieces)
    assert result.finish_reason == "stop_string"
    text = "".join(pieces)
    assert result.text == text[:text.index(stop)]  # the text ends before the stop string, none of it released


def test_stream_yields_generates_tokens_in_step_order():
    gen = Generator(session())
    options = dict(max_new_tokens=12, stop_token_ids=[], return_logits=True)
    events = list(gen.stream(list(PROMPTS), **options))
    steps = [e.step for e in events]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 11
    results = gen.generate(list(PROMPTS), **options)
    for i, r in enumerate(results):
        mine = [e for e in events if e.sequence == i]
        assert [e.step for e in mine] == list(range(12))
        assert [e.token for e in mine] == r.tokens
        assert np.array_equal(np.stack([e.logits for e in mine]), r.logits)
        assert [e.finish_reason for e in mine] == [None] * 11 + ["length"]


# ----------------------------------------------------------------------------------------------- scalings log
def test_scalings_log_round_trip_and_matches_eager(tmp_path):
    info = session().info
    gen = Generator(session())
    gen.log_scalings = True
    steps = 6
    gen.generate(list(PROMPTS), max_new_tokens=steps, stop_token_ids=[])
    log = gen.scalings_log
    b, width = len(PROMPTS), max(len(p) for p in PROMPTS)
    assert len(log) == steps  # the prefill and steps - 1 decode runs
    assert log[0].shape == (b, width, info.n_modules, info.n_experts)
    assert all(entry.shape == (b, 1, info.n_modules, info.n_experts) for entry in log[1:])
    path = str(tmp_path / "log")
    gen.flush_log_scalings(path)
    loaded = load_scalings_log(path)
    assert len(loaded) == len(log)
    for a, t in zip(log, loaded):
        assert isinstance(t, torch.Tensor) and np.array_equal(t.numpy(), a)

    model = eager()
    model.clear_scalings_log()
    model.enable_scalings_logging()
    try:
        eager_generate(model, PROMPTS, steps=steps)
        eager_log = model.get_scalings_log()
    finally:
        model.disable_scalings_logging()
        model.clear_scalings_log()
    assert [tuple(t.shape) for t in eager_log] == [a.shape for a in log]
    _, mask = left_padded(list(PROMPTS))
    real = mask.bool().numpy()  # compare real tokens only
    assert np.abs(eager_log[0].numpy()[real] - log[0][real]).max() <= 1e-5
    for j, (t, a) in enumerate(zip(eager_log[1:], log[1:]), 1):
        assert np.abs(t.numpy() - a).max() <= 1e-5, f"log entry {j}"


def test_frozen_scalings_log_matches_eager():
    """Frozen steps log their fixed scalings (b, 1, L, n), as the eager model's frozen forward does."""
    gen = Generator(session())
    gen.log_scalings = True
    gen.generate(list(PROMPTS), max_new_tokens=6, stop_token_ids=[], freeze_scalings_after=2)
    model = eager()
    model.clear_scalings_log()
    model.enable_scalings_logging()
    try:
        eager_generate(model, PROMPTS, steps=6, freeze_scalings_after=2)
        eager_log = model.get_scalings_log()
    finally:
        model.disable_scalings_logging()
        model.clear_scalings_log()
    log = gen.scalings_log
    assert [tuple(t.shape) for t in eager_log] == [a.shape for a in log]
    for j, (t, a) in enumerate(zip(eager_log[1:], log[1:]), 1):
        assert np.abs(t.numpy() - a).max() <= 1e-5, f"log entry {j}"
    np.testing.assert_array_equal(log[-1], log[-2])  # frozen: the same scalings every step


def test_per_row_freezing_log_matches_eager_row_by_row():
    """Rows freezing at different steps: one entry per step, every row in prompt order (not one entry per
    group), and each row equal to the eager model's log of that prompt alone with its own freeze step."""
    gen = Generator(session())
    gen.log_scalings = True
    ks, steps = [0, None, 2], 6
    results = gen.generate(list(PROMPTS), max_new_tokens=steps, stop_token_ids=[], freeze_scalings_after=ks)
    log = gen.scalings_log
    info, width = session().info, max(len(p) for p in PROMPTS)
    assert [a.shape for a in log] == [(3, width, info.n_modules, info.n_experts)] + \
        [(3, 1, info.n_modules, info.n_experts)] * (steps - 1)
    model = eager()
    for i, (prompt, k) in enumerate(zip(PROMPTS, ks)):
        model.clear_scalings_log()
        model.enable_scalings_logging()
        try:
            eager_generate(model, [prompt], steps=steps, freeze_scalings_after=k)
            alone = [t.numpy()[0] for t in model.get_scalings_log()]
        finally:
            model.disable_scalings_logging()
            model.clear_scalings_log()
        assert len(alone) == len(log)
        assert np.abs(log[0][i, width - len(prompt):] - alone[0]).max() <= 1e-5, f"row {i} prefill"
        for j in range(1, steps):
            assert np.abs(log[j][i] - alone[j]).max() <= 1e-5, f"row {i} (freeze after {k}), entry {j}"
        # the log's row is the scalings each token was chosen with, as the results report them
        chosen = np.concatenate([log[0][i, -1:]] + [log[j][i] for j in range(1, steps)])
        np.testing.assert_array_equal(chosen, results[i].scalings)


def test_scalings_log_with_a_finished_row_round_trips(tmp_path):
    """A finished row keeps its place in every entry, NaN from the step after its last token; the other rows
    match the eager model's log (which keeps feeding the finished row padding)."""
    gen = Generator(session())
    free = tokens_of(gen.generate(list(PROMPTS), max_new_tokens=8, stop_token_ids=[]))
    # the earliest token that is new to its row and that no other row makes: one row stops there
    step, row = next((t, i) for t in range(1, 6) for i in range(3)
                     if free[i][t] not in free[i][:t] and all(free[i][t] not in free[o] for o in range(3) if o != i))
    stop = free[row][step]
    gen.log_scalings = True
    results = gen.generate(list(PROMPTS), max_new_tokens=8, stop_token_ids=[stop])
    assert [len(r.tokens) for r in results] == [step + 1 if i == row else 8 for i in range(3)]
    log = gen.scalings_log
    assert [a.shape[:2] for a in log] == [(3, 7)] + [(3, 1)] * 7
    for k, entry in enumerate(log[1:], 1):
        assert np.isnan(entry[row]).all() == (k > step), f"entry {k}"
        assert np.isfinite(np.delete(entry, row, axis=0)).all(), f"entry {k}"
    model = eager()
    model.clear_scalings_log()
    model.enable_scalings_logging()
    try:
        ids, mask = left_padded(list(PROMPTS))
        model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[stop])
        eager_log = [t.numpy() for t in model.get_scalings_log()]
    finally:
        model.disable_scalings_logging()
        model.clear_scalings_log()
    assert [a.shape for a in eager_log] == [a.shape for a in log]
    for k, (want, got) in enumerate(zip(eager_log[1:], log[1:]), 1):
        running = [i for i in range(3) if i != row or k <= step]
        assert np.abs(want[running] - got[running]).max() <= 1e-5, f"log entry {k}"
    files = gen.flush_log_scalings(str(tmp_path / "log"))
    assert sorted(os.path.basename(f) for f in files) == ["log-0.npy", "log-1.npy", "log-mapping.json",
                                                          "log-tokens.json"]
    loaded = load_scalings_log(str(tmp_path / "log"))
    assert len(loaded) == len(log)
    assert all(np.array_equal(t.numpy(), a, equal_nan=True) for t, a in zip(loaded, log))


# ----------------------------------------------------------------------------------------------- bad inputs
def test_bad_graph_files(tmp_path):
    gen = Generator(session())
    expect_error(lambda: XLoraSession(str(tmp_path / "missing.onnx")), "no such file")
    still_works(gen)

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01this is not a protobuf\xff" * 50)
    expect_error(lambda: XLoraSession(str(garbage)), "cannot load")
    still_works(gen)

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "identity", [x], [y])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    other = tmp_path / "identity.onnx"
    onnx.save(proto, str(other))
    assert ort.InferenceSession(str(other), providers=["CPUExecutionProvider"]).run(None, {"x": np.ones(1, np.float32)})
    expect_error(lambda: XLoraSession(str(other)), "not an X-LoRA export")
    still_works(gen)

    frozen = C.frozen_path(exported("tiny-llama"))
    assert os.path.isfile(frozen)
    expect_error(lambda: XLoraSession(frozen), "frozen")
    still_works(gen)


def test_bad_ids_and_prompts():
    gen = Generator(session())
    info = session().info
    expect_error(lambda: gen.generate([[5, -1, 7]], max_new_tokens=2), "vocabulary")
    still_works(gen)
    expect_error(lambda: gen.generate([[5, 6], [info.vocab_size]], max_new_tokens=2), "vocabulary")
    still_works(gen)
    expect_error(lambda: gen.generate([5] * (info.max_positions + 1), max_new_tokens=2), "positions")
    still_works(gen)
    # capped by the positions: the last chosen token is never fed back, so a full-length prompt still gets one
    [longest] = gen.generate([5] * (info.max_positions - 1), max_new_tokens=8, stop_token_ids=[])
    assert len(longest.tokens) == 2 and longest.finish_reason == "max_positions"
    [full] = gen.generate([5] * info.max_positions, max_new_tokens=8, stop_token_ids=[])
    assert len(full.tokens) == 1 and full.finish_reason == "max_positions"
    [exact] = gen.generate([5] * info.max_positions, max_new_tokens=1, stop_token_ids=[])
    assert len(exact.tokens) == 1 and exact.finish_reason == "length"  # asked for no more than fits
    expect_error(lambda: gen.generate([[]], max_new_tokens=2), "empty")
    expect_error(lambda: gen.generate([[5, 6], []], max_new_tokens=2), "empty")
    expect_error(lambda: gen.generate("", max_new_tokens=2), "empty")
    expect_error(lambda: gen.generate([], max_new_tokens=2), "prompts")
    still_works(gen)


def test_bad_options():
    gen = Generator(session())
    n = session().info.n_experts
    expect_error(lambda: gen.generate([PROMPTS[0]], max_new_tokens=2, expert_top_k=n + 1), "expert_top_k")
    still_works(gen)
    expect_error(lambda: gen.generate([PROMPTS[0]], max_new_tokens=2, expert_top_k=-1), "expert_top_k")
    still_works(gen)
    expect_error(lambda: gen.generate([PROMPTS[0]], max_new_tokens=2, freeze_scalings_after=-1), "freeze")
    expect_error(lambda: gen.generate(list(PROMPTS), max_new_tokens=2, freeze_scalings_after=[0, 1]), "freeze")
    still_works(gen)


BAD_REQUESTS = [  # (prompts, options, what the one-line message says)
    (None, {}, "prompts=None: expected a string, a list of token ids"),
    (5, {}, "prompts=5: expected"),
    (b"ab", {}, "prompts=b'ab': expected a string"),
    ([b"ab"], {}, "prompt 0: expected a string or a list of token ids, got b'ab'"),
    ([[1, [2]]], {}, "prompt 0: [2] is not a token id"),
    ([[5, 6], object()], {}, "prompt 1: expected a string or a list of token ids, got <object object"),
    ([[5, 2.0]], {}, "prompt 0: 2.0 is not a token id"),
    ("\ud800", {}, "prompt 0: the tokenizer cannot encode it"),
    ([5], dict(max_new_tokens=0), "max_new_tokens=0: expected an int >= 1"),
    ([5], dict(max_new_tokens=2.5), "max_new_tokens=2.5"),
    ([5], dict(max_new_tokens=True), "max_new_tokens=True"),
    ([5], dict(do_sample="yes"), "do_sample='yes': expected True or False"),
    ([5], dict(do_sample=True, temperature=0.0), "temperature=0.0: expected a finite number > 0 when sampling"),
    ([5], dict(do_sample=True, temperature=float("inf")), "temperature=inf"),
    ([5], dict(temperature="hot"), "temperature='hot'"),
    ([5], dict(top_p=0.0), "top_p=0.0: expected 0 < top_p <= 1"),
    ([5], dict(top_p=float("nan")), "top_p=nan"),
    ([5], dict(seed=-1), "seed=-1: expected None or an int >= 0"),
    ([5], dict(seed=1.5), "seed=1.5"),
    ([5], dict(stop_token_ids=[384]), "stop_token_ids: 384 is not a token id in 0..383"),
    ([5], dict(stop_token_ids=["5"]), "stop_token_ids: '5' is not a token id"),
    ([5], dict(stop_token_ids="5"), "stop_token_ids='5': expected None, a token id or a list of them"),
    ([5], dict(stop_strings=[""]), "stop_strings: '' is not a non-empty string"),
    ([5], dict(stop_strings=5), "stop_strings=5: expected a string or a list of strings"),
    ([5], dict(expert_top_k=True), "expert_top_k=True: expected an int in 0..3"),
    ([5], dict(freeze_scalings_after=1.5), "freeze_scalings_after=1.5: expected None, an int >= 0, or one"),
    ([[5], [6]], dict(freeze_scalings_after=[0, -1]), "freeze_scalings_after=-1: expected None or an int >= 0"),
    ([5], dict(freeze_scalings_after="0"), "freeze_scalings_after='0'"),
    ([5], dict(return_logits="yes"), "return_logits='yes': expected True or False"),
    ([5], dict(freeze_scalings_after=np.zeros((2, 2), int)), "freeze_scalings_after=array([[0, 0], [0, 0]])"),
]


@pytest.mark.parametrize("prompts, options, message", BAD_REQUESTS, ids=[m.split(":")[0] for _, _, m in BAD_REQUESTS])
def test_bad_request_table(prompts, options, message):
    """Each bad input raises its one-line XLoraError at call time (`stream` runs nothing); the generator still
    works afterwards."""
    gen = Generator(session())
    expect_error(lambda: gen.stream(prompts, **options), message)
    still_works(gen)


def test_single_stop_id_and_stop_string_need_no_list():
    gen = Generator(session())
    [free] = gen.generate([PROMPTS[0]], max_new_tokens=8, stop_token_ids=[])
    [one] = gen.generate([PROMPTS[0]], max_new_tokens=8, stop_token_ids=free.tokens[2])
    assert one.tokens == free.tokens[:free.tokens.index(free.tokens[2]) + 1] and one.finish_reason == "stop_token"
    [text] = gen.generate("the model mixes", max_new_tokens=12, stop_token_ids=[])
    stop = text.text[3:5]
    assert stop and stop not in text.text[:3]
    [cut] = gen.generate("the model mixes", max_new_tokens=12, stop_token_ids=[], stop_strings=stop)
    assert cut.finish_reason == "stop_string" and cut.text == text.text[:text.text.index(stop)]


def test_freezing_without_the_frozen_graph(tmp_path):
    source = exported("tiny-llama")
    lonely = tmp_path / os.path.basename(source)
    shutil.copyfile(source, lonely)
    shutil.copyfile(source + ".data", str(lonely) + ".data")  # the weights file it shares with the frozen graph
    alone = XLoraSession(str(lonely))
    assert alone.info.frozen_path is None
    gen = Generator(alone)
    expect_error(lambda: gen.generate([PROMPTS[0]], max_new_tokens=3, freeze_scalings_after=1), "frozen.onnx")
    [result] = gen.generate([PROMPTS[0]], max_new_tokens=4, stop_token_ids=[])  # still works, ids need no tokenizer
    assert result.tokens == Generator(session()).generate([PROMPTS[0]], max_new_tokens=4, stop_token_ids=[])[0].tokens


def test_unavailable_provider():
    gen = Generator(session())
    missing = [p for p, ep in (("cuda", "CUDAExecutionProvider"), ("tensorrt", "TensorrtExecutionProvider"))
               if ep not in ort.get_available_providers()]
    for provider in missing:
        expect_error(lambda p=provider: XLoraSession(exported("tiny-llama"), provider=p), "not available")
        still_works(gen)
    expect_error(lambda: XLoraSession(exported("tiny-llama"), provider="tpu"), "provider")
    still_works(gen)
    if not missing:
        pytest.skip("CUDA and TensorRT providers are both installed: nothing unavailable to ask for")


# ----------------------------------------------------------------------------------------------- cache memory
def test_peak_cache_bytes_granular_and_frozen():
    info = session().info
    gen = Generator(session())
    b, width, new = len(PROMPTS), max(len(p) for p in PROMPTS), 16
    gen.generate(list(PROMPTS), max_new_tokens=new, stop_token_ids=[])
    # the last run holds width + new - 1 positions (the last token is never fed back)
    granular = 2 * unit_bytes(info) * b * (width + new - 1)
    assert granular == 2 * 2 * info.num_layers * b * info.kv_heads * (width + new - 1) * info.head_dim * 4
    assert gen.peak_cache_bytes == granular

    gen.generate(list(PROMPTS), max_new_tokens=new, stop_token_ids=[], freeze_scalings_after=0)
    # the prefill holds both caches of `width` positions; from the first decode step only the real cache
    frozen = max(2 * unit_bytes(info) * b * width, unit_bytes(info) * b * (width + new - 1))
    assert gen.peak_cache_bytes == frozen == granular // 2


def test_finished_rows_free_their_caches():
    info = session().info
    gen = Generator(session())
    new = 16
    # two prompts of one width; the first stops at its first token, the other runs to the end
    pairs = [([5, 17, 99, 230, 41], [12, 250, 14, 140, 33]), ([300, 22, 9, 41, 8], [77, 6, 120, 7, 200])]
    for pair in pairs:
        free = tokens_of(gen.generate(list(pair), max_new_tokens=new, stop_token_ids=[]))
        if free[0][0] not in free[1]:
            break
    else:
        pytest.fail(f"no prompt pair where the first row's first token is absent from the second row: {free}")
    width = len(pair[0])
    results = gen.generate(list(pair), max_new_tokens=new, stop_token_ids=[free[0][0]])
    assert results[0].tokens == free[0][:1] and results[0].finish_reason == "stop_token"
    assert results[1].tokens == free[1] and results[1].finish_reason == "length"
    unit = 2 * unit_bytes(info)  # both caches, one row, one position
    assert gen.peak_cache_bytes == unit * max(2 * width, width + new - 1)  # not 2 rows x (width + new - 1)
    gen.generate([pair[1]], max_new_tokens=new, stop_token_ids=[])
    assert gen.peak_cache_bytes == unit * (width + new - 1)  # the survivor alone holds as much as running alone
