"""The scalings log: what is logged, the Model API around it, and the file format.

Format: `{path}.npy` (float32, (num_logged, b, s, L, n)) when every entry has one shape; otherwise
`{path}-{j}.npy` per shape plus `{path}-mapping.json` (file basename -> log indices), restored in order by
`xlora_utils.load_scalings_log`. The original xlora's multi-file layout (mapping keys are full paths) loads too.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import xlora_export as xlora
from helpers import make_xlora, max_diff
from xlora_export import XLoraError
from xlora_export.xlora_utils import load_scalings_log


@pytest.fixture(scope="module")
def model() -> xlora.xLoRAModel:
    return make_xlora("tiny-llama")


@pytest.fixture(autouse=True)
def _fresh_log(model):
    model.disable_scalings_logging()
    model.clear_scalings_log()
    yield
    model.disable_scalings_logging()
    model.clear_scalings_log()


def ids(b: int, s: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (b, s), generator=torch.Generator().manual_seed(seed))


def dims(model: xlora.xLoRAModel) -> tuple[int, int]:
    return len(model.module_names), len(model.adapter_names)


def files_in(folder) -> list[str]:
    return sorted(os.listdir(folder))


def assert_same_log(loaded: list[torch.Tensor], logged: list[torch.Tensor]) -> None:
    assert len(loaded) == len(logged), f"loaded {len(loaded)} entries, logged {len(logged)}"
    for i, (got, want) in enumerate(zip(loaded, logged)):
        assert got.dtype == torch.float32, f"entry {i}: loaded as {got.dtype}"
        assert got.shape == want.shape, f"entry {i}: loaded {tuple(got.shape)}, logged {tuple(want.shape)}"
        assert torch.equal(got, want.float()), f"entry {i}: max diff {max_diff(got, want)}"


# ----------------------------------------------------------------------------- file format round trips
def test_equal_shapes_one_npy_file(model, tmp_path):
    model.enable_scalings_logging()
    with torch.no_grad():
        outs = [model(input_ids=ids(2, 5, seed)) for seed in range(3)]
    logged = model.get_scalings_log()
    n_modules, n_experts = dims(model)
    assert [tuple(t.shape) for t in logged] == [(2, 5, n_modules, n_experts)] * 3
    for out, entry in zip(outs, logged):
        assert torch.equal(out.scalings, entry)

    path = str(tmp_path / "log")
    model.flush_log_scalings(path)
    assert files_in(tmp_path) == ["log.npy"]
    on_disk = np.load(tmp_path / "log.npy")
    assert on_disk.dtype == np.float32
    assert on_disk.shape == (3, 2, 5, n_modules, n_experts)
    assert_same_log(load_scalings_log(path), logged)
    assert_same_log(load_scalings_log(path + ".npy"), logged)  # the real file name works too


def test_varying_shapes_several_files_and_mapping(model, tmp_path):
    model.enable_scalings_logging()
    shapes = [(1, 4), (1, 6), (1, 4), (2, 4), (1, 6), (1, 7)]  # seq lengths and a batch size vary
    with torch.no_grad():
        for seed, (b, s) in enumerate(shapes):
            model(input_ids=ids(b, s, seed))
    logged = model.get_scalings_log()
    assert [tuple(t.shape[:2]) for t in logged] == shapes

    path = str(tmp_path / "log")
    model.flush_log_scalings(path)
    assert files_in(tmp_path) == ["log-0.npy", "log-1.npy", "log-2.npy", "log-3.npy", "log-mapping.json"]
    assert not os.path.exists(path + ".npy")
    with open(tmp_path / "log-mapping.json") as f:
        mapping = json.load(f)
    assert set(mapping) == {"log-0.npy", "log-1.npy", "log-2.npy", "log-3.npy"}  # basenames
    assert sorted(i for indices in mapping.values() for i in indices) == list(range(len(shapes)))
    for name, indices in mapping.items():
        stacked = np.load(tmp_path / name)
        assert stacked.dtype == np.float32
        assert indices == sorted(indices)
        assert stacked.shape[0] == len(indices)
        for row, i in zip(stacked, indices):
            assert row.shape == tuple(logged[i].shape)
            assert np.array_equal(row, logged[i].float().numpy())
    assert_same_log(load_scalings_log(path), logged)  # original order restored


def test_bf16_model_log_round_trip(tmp_path):
    model = make_xlora("tiny-llama").to(torch.bfloat16)
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(2, 5, 0))
        model(input_ids=ids(2, 3, 1))
        model(input_ids=ids(2, 5, 2))
    logged = model.get_scalings_log()
    assert all(t.dtype == torch.bfloat16 for t in logged)
    path = str(tmp_path / "bf16")
    model.flush_log_scalings(path)
    assert files_in(tmp_path) == ["bf16-0.npy", "bf16-1.npy", "bf16-mapping.json"]
    assert np.load(tmp_path / "bf16-0.npy").dtype == np.float32
    assert_same_log(load_scalings_log(path), logged)


def test_bf16_entries_single_file(model, tmp_path):
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 4, 0))
        model(input_ids=ids(1, 4, 1))
    model._log = [t.to(torch.bfloat16) for t in model._log]  # log entries of bf16 dtype
    logged = model.get_scalings_log()
    path = str(tmp_path / "log")
    model.flush_log_scalings(path)
    assert files_in(tmp_path) == ["log.npy"]
    assert np.load(tmp_path / "log.npy").dtype == np.float32
    assert_same_log(load_scalings_log(path), logged)


def test_train_mode_log_flushes(model, tmp_path):
    """Entries logged during training carry no graph (the original's `.numpy()` failed on them)."""
    model.train()
    try:
        model.enable_scalings_logging()
        out = model(input_ids=ids(1, 4, 0), labels=ids(1, 4, 0))
        assert out.scalings.requires_grad
        out.loss.backward()
    finally:
        model.eval()
        model.zero_grad(set_to_none=True)
    (entry,) = model.get_scalings_log()
    assert not entry.requires_grad
    path = str(tmp_path / "log")
    model.flush_log_scalings(path)
    assert_same_log(load_scalings_log(path), [entry])


def test_flush_errors(model, tmp_path):
    with pytest.raises(XLoraError, match="empty"):
        model.flush_log_scalings(str(tmp_path / "log"))
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 3))
    with pytest.raises(XLoraError, match="extension"):
        model.flush_log_scalings(str(tmp_path / "log.npy"))
    with pytest.raises(XLoraError, match="neither"):
        load_scalings_log(str(tmp_path / "missing"))


# ----------------------------------------------------------------------------- what a cached decode step logs
def test_cached_decode_step_logs_one_position(model):
    n_modules, n_experts = dims(model)
    prompt = ids(2, 5, 3)
    model.enable_scalings_logging()
    with torch.no_grad():
        out = model(input_ids=prompt, use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (2, 1)
        step = model(input_ids=nxt, cache=out.cache, use_cache=True)
    logged = model.get_scalings_log()
    assert [tuple(t.shape) for t in logged] == [(2, 5, n_modules, n_experts), (2, 1, n_modules, n_experts)]
    # the decode step's scalings are the no-cache recompute's at that position (scalings never change once computed)
    model.disable_scalings_logging()
    with torch.no_grad():
        full = model(input_ids=torch.cat([prompt, nxt], 1), use_cache=False)
    assert max_diff(logged[1], full.scalings[:, -1:]) < 1e-5
    assert torch.equal(logged[1], step.scalings)


def test_generate_logs_prefill_then_one_token_per_step(model):
    n_modules, n_experts = dims(model)
    model.enable_scalings_logging()
    out = model.generate(ids(2, 5, 4), max_new_tokens=4, eos_token_id=None)
    assert out.shape == (2, 9)
    shapes = [tuple(t.shape) for t in model.get_scalings_log()]
    assert shapes == [(2, 5, n_modules, n_experts)] + [(2, 1, n_modules, n_experts)] * 3


# ----------------------------------------------------------------------------- the Model API around the log
def test_get_scalings_log_is_a_shallow_copy(model):
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 4))
    copy = model.get_scalings_log()
    copy.append(torch.zeros(1))
    copy.pop(0)
    again = model.get_scalings_log()
    assert len(again) == 1 and again is not copy
    assert again[0] is model.get_scalings_log()[0]  # the tensors themselves are shared, not copied


def test_clear_scalings_log_keeps_logging_on(model):
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 4))
        model(input_ids=ids(1, 5))
    kept = model.get_scalings_log()
    model.clear_scalings_log()
    assert model.get_scalings_log() == []
    assert len(kept) == 2  # a copy taken before is unaffected
    with torch.no_grad():
        model(input_ids=ids(1, 6))
    assert [t.shape[1] for t in model.get_scalings_log()] == [6]


def test_disable_stops_logging_and_keeps_the_log(model):
    with torch.no_grad():
        model(input_ids=ids(1, 4))
    assert model.get_scalings_log() == []  # off by default
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 4))
    model.disable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 5))
        model(input_ids=ids(1, 6))
    assert [t.shape[1] for t in model.get_scalings_log()] == [4]
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 7))
    assert [t.shape[1] for t in model.get_scalings_log()] == [4, 7]


def test_get_latest_scalings():
    model = make_xlora("tiny-llama")
    assert model.get_latest_scalings() is None  # no forward yet
    with torch.no_grad():
        first = model(input_ids=ids(2, 4, 0))
        assert torch.equal(model.get_latest_scalings(), first.scalings)
        last = model(input_ids=ids(1, 6, 1))
    latest = model.get_latest_scalings()
    assert latest.shape == (1, 6, *dims(model))
    assert torch.equal(latest, last.scalings)
    assert model.get_scalings_log() == []  # latest works without logging


# ----------------------------------------------------------------------------- the original xlora's layout
def _write_original_layout(path: str, log: list[np.ndarray]) -> None:
    """What the original `flush_log_scalings(path)` wrote when shapes differ: buckets keyed by batch size,
    `{path}-{key}.npy` files, and a mapping whose keys are those full file names (formats.md A3)."""
    buckets: dict[int, tuple[list[int], list[np.ndarray]]] = {}
    for i, s in enumerate(log):
        buckets.setdefault(s.shape[0], ([], []))
        buckets[s.shape[0]][0].append(i)
        buckets[s.shape[0]][1].append(s)
    mapping = {}
    for key, (indices, arrays) in buckets.items():
        mapping[f"{path}-{key}.npy"] = indices
        np.save(f"{path}-{key}", np.stack(arrays))
    with open(f"{path}-mapping.json", "w") as f:
        f.write(json.dumps(mapping))


def _original_log(n_modules: int = 5, n_experts: int = 3) -> list[np.ndarray]:
    g = np.random.default_rng(0)
    return [g.random((b, 4, n_modules, n_experts), dtype=np.float32) for b in (2, 1, 2, 3, 1)]


def test_original_multi_file_layout_with_absolute_keys(tmp_path):
    log = _original_log()
    path = str(tmp_path / "orig")
    _write_original_layout(path, log)
    with open(path + "-mapping.json") as f:
        assert all(os.path.isabs(k) for k in json.load(f))
    loaded = load_scalings_log(path)
    assert len(loaded) == len(log)
    for got, want in zip(loaded, log):
        assert np.array_equal(got.numpy(), want)


def test_original_multi_file_layout_with_relative_keys(tmp_path, monkeypatch):
    """Written with a relative path from one directory, loaded by absolute path from another."""
    log = _original_log()
    (tmp_path / "logs").mkdir()
    monkeypatch.chdir(tmp_path)
    _write_original_layout(os.path.join("logs", "run"), log)
    with open(tmp_path / "logs" / "run-mapping.json") as f:
        assert set(json.load(f)) == {"logs/run-1.npy", "logs/run-2.npy", "logs/run-3.npy"}
    monkeypatch.chdir(tmp_path / "logs")
    loaded = load_scalings_log(str(tmp_path / "logs" / "run"))
    assert [tuple(t.shape) for t in loaded] == [a.shape for a in log]
    for got, want in zip(loaded, log):
        assert np.array_equal(got.numpy(), want)


def test_original_single_file_layout(tmp_path):
    """The original's single-file flush is `numpy.save(path, stacked)`; its loader wants the `.npy` name."""
    log = [a for a in _original_log() if a.shape[0] == 2]
    np.save(str(tmp_path / "single"), np.stack(log))
    for name in ("single", "single.npy"):
        loaded = load_scalings_log(str(tmp_path / name))
        assert len(loaded) == 2
        for got, want in zip(loaded, log):
            assert np.array_equal(got.numpy(), want)


def test_reflush_to_the_same_path_loads_the_latest_log(model, tmp_path):
    """Flushing a one-shape log, then a mixed-shape log, to the same path: loading returns the latest log,
    not the stale `{path}.npy` of the first flush (and the reverse order too)."""
    path = str(tmp_path / "log")
    model.enable_scalings_logging()
    with torch.no_grad():
        model(input_ids=ids(1, 4, 0))
    model.flush_log_scalings(path)
    model.clear_scalings_log()
    with torch.no_grad():
        model(input_ids=ids(1, 5, 1))
        model(input_ids=ids(1, 6, 2))
    second = model.get_scalings_log()
    model.flush_log_scalings(path)
    assert_same_log(load_scalings_log(path), second)

    model.clear_scalings_log()
    with torch.no_grad():
        model(input_ids=ids(1, 3, 3))
    third = model.get_scalings_log()
    model.flush_log_scalings(path)
    assert_same_log(load_scalings_log(path), third)
