"""Property-based fuzzing of the checkpoint readers: mutated JSON records (wrong types, missing,
extra and bad values, not an object, not JSON) and mutated tensor files (truncated, bytes flipped, tensors
re-shaped, re-typed, dropped or added) must load, or fail with a one-line XLoraError; nothing else, no hang.

Each test copies a built checkpoint once; every example rewrites one file and restores it afterwards.
Derandomized, so that a run is repeatable; 30 examples per reader keep the file under 30 s
(`XLORA_FUZZ_EXAMPLES=2000` runs a long randomized search).
"""

from __future__ import annotations

import copy
import io
import json
import os
import shutil
from functools import cache

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

import xlora_export
from helpers import built, load_base, make_xlora, peft_oracle
from xlora_export import XLoraError
from xlora_export.xlora_utils import load_base_model

RECIPE = "tiny-llama"
IDS = torch.tensor([[5, 6, 7]])
# XLORA_FUZZ_EXAMPLES=N: a longer, randomized run (the suite's default is short and repeatable)
DEEP = int(os.environ.get("XLORA_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=DEEP or 30, deadline=None, derandomize=not DEEP, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

SPECIAL = [0, 1, -1, 2, 3, 64, 10**9, 0.5, -0.5, 1e308, float("nan"), float("inf"), "", "alpha", "../alpha",
           "/abs", "0", [], {}, ["alpha", "beta", "gamma"], {"alpha": "alpha"}, None, True, False]
SCALARS = (st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=6)
           | st.sampled_from(SPECIAL))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


@cache
def _base() -> torch.nn.Module:
    return load_base(RECIPE)


def _load(ckpt: str, **kwargs) -> str:
    """Load and run one forward: "loaded", or "refused" with a one-line XLoraError (anything else fails)."""
    try:
        model = xlora_export.from_pretrained(ckpt, copy.deepcopy(_base()), **kwargs)
        with torch.no_grad():
            model(IDS)
    except XLoraError as e:
        assert str(e) and "\n" not in str(e), repr(str(e))
        return "refused"
    return "loaded"


def _mutating(path: str, data: bytes, ckpt: str, **kwargs) -> None:
    """Write `data` to `path`, load the checkpoint, restore the file."""
    original = open(path, "rb").read()
    try:
        with open(path, "wb") as f:
            f.write(data)
        event(_load(ckpt, **kwargs))  # --hypothesis-show-statistics: how many got through every check
    finally:
        with open(path, "wb") as f:
            f.write(original)


@st.composite
def json_mutations(draw, record: dict) -> bytes:
    """1-3 edits of a JSON object (set a key to any value, delete, add), or a whole other document."""
    kind = draw(st.sampled_from(["edit", "edit", "edit", "document", "bytes"]))
    if kind == "document":
        return json.dumps(draw(JSON_VALUES)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    record = dict(record)
    for _ in range(draw(st.sampled_from([1, 1, 1, 2, 3]))):
        op = draw(st.sampled_from(["nudge", "nudge", "nudge", "set", "delete", "add"]))
        if op == "add" or not record:
            record[draw(st.text(min_size=1, max_size=8))] = draw(JSON_VALUES)
        else:
            key = draw(st.sampled_from(sorted(record)))
            if op == "delete":
                del record[key]
            else:
                record[key] = draw(_same_type(record[key]) if op == "nudge" else JSON_VALUES)
    return json.dumps(record).encode()


def _same_type(value: object) -> st.SearchStrategy:
    """Values of the type a field already has (most of them valid), so that examples get past type checks."""
    if isinstance(value, bool):
        return st.booleans()
    if value is None:
        return st.none() | st.integers(-1, 4) | st.floats(-1.0, 1.0)
    if isinstance(value, int):
        return st.integers(-2, 80) | st.sampled_from([10**6, 2**31])
    if isinstance(value, float):
        return st.floats(-4.0, 4.0) | st.sampled_from([0.0, 1.0, float("nan"), float("inf"), 1e308])
    if isinstance(value, list):
        return st.lists(st.sampled_from(value or ["alpha"]), max_size=len(value) + 1) | st.permutations(value)
    if isinstance(value, dict):
        return st.dictionaries(st.sampled_from(sorted(value) or ["alpha"]),
                               st.sampled_from(list(value.values()) or [0]), max_size=len(value) + 1)
    return st.text(max_size=8) | st.sampled_from([value, value + "x", ""])


@st.composite
def tensor_mutations(draw, state: dict[str, torch.Tensor], raw: bytes) -> bytes:
    """A safetensors file truncated, with a byte flipped (mostly in the header), or with one tensor re-shaped,
    re-typed, dropped, or one added."""
    kind = draw(st.sampled_from(["truncate", "flip", "reshape", "dtype", "drop", "add"]))
    if kind == "truncate":
        return raw[:draw(st.integers(0, len(raw) - 1))]
    if kind == "flip":
        pos = draw(st.integers(0, min(len(raw) - 1, 600)))
        return raw[:pos] + bytes([draw(st.integers(0, 255))]) + raw[pos + 1:]
    state = dict(state)
    key = draw(st.sampled_from(sorted(state)))
    shape = draw(st.lists(st.integers(0, 70), max_size=3))
    if kind == "reshape":
        state[key] = torch.zeros(shape)
    elif kind == "dtype":
        dtype = draw(st.sampled_from([torch.int64, torch.int8, torch.bool, torch.float16, torch.bfloat16]))
        state[key] = state[key].to(dtype)
    elif kind == "drop":
        del state[key]
    else:
        state[draw(st.text(min_size=1, max_size=12))] = torch.zeros(shape)
    return safetensors_bytes(state)


def _checkpoint(tmp_path) -> str:
    folder = str(tmp_path / "ckpt")
    shutil.copytree(built(RECIPE), folder)
    assert _load(folder) == "loaded"  # positive control
    return folder


def _json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


# ----------------------------------------------------------------------------- JSON records
@pytest.mark.parametrize("file", ["xlora_config.json", "xlora_ordering.json", "beta/adapter_config.json"])
def test_fuzz_json_records(tmp_path, file):
    ckpt = _checkpoint(tmp_path)
    path = os.path.join(ckpt, file)

    @FUZZ
    @given(data=json_mutations(_json(path)))
    def run(data: bytes) -> None:
        _mutating(path, data, ckpt)

    run()


@pytest.fixture(scope="module")
def peft_checkpoint(tmp_path_factory) -> str:
    """A complete PEFT X-LoRA checkpoint (PEFT's save plus the classifier tensors it drops)."""
    oracle = peft_oracle(make_xlora(RECIPE, seed=5), RECIPE)
    ckpt = str(tmp_path_factory.mktemp("fuzz") / "peft")
    oracle.save_pretrained(ckpt)
    state = {f"base_model.internal_xlora_classifier.{k}": v.contiguous()
             for k, v in oracle.base_model.internal_xlora_classifier.state_dict().items()}
    with open(os.path.join(ckpt, "adapter_model.safetensors"), "wb") as f:
        f.write(safetensors_bytes(state, metadata={"format": "pt"}))
    assert _load(ckpt) == "loaded"
    return ckpt


def test_fuzz_peft_adapter_config(peft_checkpoint):
    path = os.path.join(peft_checkpoint, "adapter_config.json")

    @FUZZ
    @given(data=json_mutations(_json(path)))
    def run(data: bytes) -> None:
        _mutating(path, data, peft_checkpoint)

    run()


# ----------------------------------------------------------------------------- tensor files
@pytest.mark.parametrize("file", ["xlora_classifier.safetensors", "beta/adapter_model.safetensors"])
def test_fuzz_tensor_files(tmp_path, file):
    ckpt = _checkpoint(tmp_path)
    path = os.path.join(ckpt, file)
    raw = open(path, "rb").read()

    @FUZZ
    @given(data=tensor_mutations(load_file(path), raw))
    def run(data: bytes) -> None:
        _mutating(path, data, ckpt)

    run()


def test_fuzz_peft_adapter_model(peft_checkpoint):
    path = os.path.join(peft_checkpoint, "adapter_model.safetensors")
    raw = open(path, "rb").read()

    @FUZZ
    @given(data=tensor_mutations(load_file(path), raw))
    def run(data: bytes) -> None:
        _mutating(path, data, peft_checkpoint)

    run()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_fuzz_torch_pickle_files(tmp_path):
    """`adapter_model.bin` (torch.save): truncated, bytes flipped anywhere, or junk."""
    ckpt = _checkpoint(tmp_path)
    for name in ("alpha", "beta", "gamma"):
        folder = os.path.join(ckpt, name)
        state = load_file(os.path.join(folder, "adapter_model.safetensors"))
        torch.save(state, os.path.join(folder, "adapter_model.bin"))
    path = os.path.join(ckpt, "beta", "adapter_model.bin")
    raw = open(path, "rb").read()
    buffer = io.BytesIO()
    torch.save([torch.zeros(2)], buffer)

    @FUZZ
    @given(data=st.one_of(
        st.integers(0, len(raw) - 1).map(lambda n: raw[:n]),
        st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)).map(
            lambda p: raw[:p[0]] + bytes([p[1]]) + raw[p[0] + 1:]),
        st.binary(max_size=200), st.just(buffer.getvalue())))
    def run(data: bytes) -> None:
        _mutating(path, data, ckpt, from_safetensors=False)

    run()


def test_fuzz_base_model_weights(tmp_path):
    """The base model's `model.safetensors` (read by transformers, checked by `load_base_model`)."""
    folder = str(tmp_path / "base")
    shutil.copytree(os.path.join(built(RECIPE), "base"), folder)
    path = os.path.join(folder, "model.safetensors")
    raw = open(path, "rb").read()

    @FUZZ
    @given(data=tensor_mutations(load_file(path), raw))
    def run(data: bytes) -> None:
        with open(path, "wb") as f:
            f.write(data)
        try:
            load_base_model(folder)
            event("loaded")
        except XLoraError as e:
            assert str(e) and "\n" not in str(e), repr(str(e))
            event("refused")
        finally:
            with open(path, "wb") as f:
                f.write(raw)

    run()
