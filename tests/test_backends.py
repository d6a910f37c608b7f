"""The runtime's backend seam (runtime/xlora_runtime/backends/) with its second real engine, OpenVINO.

OpenVINO must give the `Generator` calls the results of ONNX Runtime and of the eager model: identical greedy
tokens over 32 steps for a batch of 3 left-padded prompts with both caches, for several top-k values and on the
frozen graph (rows freezing at different steps: their caches are gathered and joined by the backend); logits and
scalings within the graph tolerances of ONNX Runtime (each figure is printed). Also: the precision hint comes from
the graph's dtype, the backend reads the metadata record itself, and its one-line errors.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import xlora_export as xlora
from helpers import built, exported, left_padded
from xlora_export.parity import eager_greedy
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.backends import PROVIDERS, open_backend
from xlora_runtime.backends.dtypes import from_float32, to_float32
from xlora_runtime.backends.openvino import precision_hint

pytest.importorskip("openvino", reason="the OpenVINO backend needs openvino (the test extra installs it)")

PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])  # three lengths: left padding
STEPS = 32
ATOL_LOGITS, ATOL_SCALINGS = 1e-4, 1e-5  # the exporter's fp32 tolerances


@pytest.fixture(scope="module")
def sessions() -> dict[str, XLoraSession]:
    path = exported("tiny-llama")
    return {provider: XLoraSession(path, provider=provider, threads=1) for provider in ("cpu", "openvino")}


@pytest.fixture(scope="module")
def eager() -> xlora.xLoRAModel:
    return xlora.xlora_utils.load_model(built("tiny-llama"))[0].eval()


def _run(session: XLoraSession, **options) -> list:
    return Generator(session).generate(list(PROMPTS), stop_token_ids=[], return_logits=True, **options)


def _max_diff(a: list, b: list, field: str) -> float:
    return max(float(np.abs(getattr(x, field) - getattr(y, field)).max()) for x, y in zip(a, b))


@pytest.mark.parametrize("top_k", [0, 1, 2])
def test_openvino_equals_onnxruntime_and_eager(sessions, eager, top_k):
    torch.set_num_threads(1)
    runs = {name: _run(session, max_new_tokens=STEPS, expert_top_k=top_k) for name, session in sessions.items()}
    tokens, logits, scalings = eager_greedy(eager, list(PROMPTS), STEPS, top_k)
    for name, results in runs.items():
        assert [r.tokens for r in results] == tokens.tolist(), name
        dl = max(float(np.abs(r.logits - logits[i]).max()) for i, r in enumerate(results))
        ds = max(float(np.abs(r.scalings - scalings[i]).max()) for i, r in enumerate(results))
        print(f"top_k={top_k} {name} vs eager: logits {dl:.2e}, scalings {ds:.2e}")
        assert dl <= ATOL_LOGITS and ds <= ATOL_SCALINGS, (name, dl, ds)
    dl, ds = (_max_diff(runs["openvino"], runs["cpu"], f) for f in ("logits", "scalings"))
    print(f"top_k={top_k} openvino vs onnxruntime: logits {dl:.2e}, scalings {ds:.2e}")
    assert dl <= ATOL_LOGITS and ds <= ATOL_SCALINGS


def test_openvino_frozen_graph_per_row(sessions, eager):
    """Rows freeze at different steps (one never): the backend gathers rows into the frozen group and joins two
    frozen groups; the uniform case equals the eager model's frozen decoding."""
    ks = [2, None, 5]
    runs = {name: _run(session, max_new_tokens=STEPS, freeze_scalings_after=ks) for name, session in sessions.items()}
    assert [r.tokens for r in runs["openvino"]] == [r.tokens for r in runs["cpu"]]
    dl, ds = (_max_diff(runs["openvino"], runs["cpu"], f) for f in ("logits", "scalings"))
    print(f"frozen per row: openvino vs onnxruntime: logits {dl:.2e}, scalings {ds:.2e}")
    assert dl <= ATOL_LOGITS and ds <= ATOL_SCALINGS
    ids, mask = left_padded(list(PROMPTS))
    out = eager.generate(ids, attention_mask=mask, max_new_tokens=16, eos_token_id=None, freeze_scalings_after=3)
    uniform = _run(sessions["openvino"], max_new_tokens=16, freeze_scalings_after=3)
    assert [r.tokens for r in uniform] == out[:, ids.shape[1]:].tolist()
    assert sessions["openvino"].cache_bytes == 0


def test_openvino_finished_rows_and_cache_bytes(sessions):
    """A stop token ends one row (its caches gathered away); cache memory is counted on the backend and freed."""
    gen = {name: Generator(session) for name, session in sessions.items()}
    first = gen["cpu"].generate(list(PROMPTS), max_new_tokens=6, stop_token_ids=[])
    stop = first[1].tokens[2]  # row 1's third token: row 1 stops there, the others may too, or not
    runs = {name: g.generate(list(PROMPTS), max_new_tokens=8, stop_token_ids=[stop]) for name, g in gen.items()}
    assert [r.tokens for r in runs["openvino"]] == [r.tokens for r in runs["cpu"]]
    assert gen["openvino"].peak_cache_bytes == gen["cpu"].peak_cache_bytes > 0
    assert sessions["openvino"].cache_bytes == 0


def test_precision_hint_follows_the_graph():
    """fp32 graphs always f32 (a bf16-capable CPU would otherwise run them in bf16); reduced-precision graphs in
    their own type where the device lists it, f32 where it does not."""
    assert precision_hint("float32", ["BF16", "FP16", "FP32"]) == "f32"
    assert precision_hint("float16", ["FP16", "FP32"]) == "f16"
    assert precision_hint("float16", ["FP32"]) == "f32"
    assert precision_hint("bfloat16", ["BF16", "FP32"]) == "bf16"
    assert precision_hint("bfloat16", ["FP32", "FP16"]) == "f32"


def test_openvino_compiles_fp32_graphs_in_f32(sessions):
    graph = sessions["openvino"].main
    assert str(graph.compiled.get_property("INFERENCE_PRECISION_HINT")) == "<Type: 'float32'>"
    assert sessions["openvino"].info == sessions["cpu"].info  # read from OpenVINO's rt_info


def test_bf16_bits_round_trip():
    values = np.array([1.0, -2.5, 3.140625, 1e-3, 65504.0, np.inf, -np.inf, np.nan], np.float32)
    bits = from_float32(values, "bfloat16")
    assert bits.dtype == np.uint16 and bits[0] == 0x3F80 and bits[1] == 0xC020
    back = to_float32(bits, "bfloat16")
    assert np.array_equal(back[:2], values[:2]) and np.isnan(back[-1]) and np.isinf(back[5:7]).all()
    assert np.abs(back[:5] - values[:5]).max() <= np.abs(values[:5]).max() * 2 ** -8  # bf16 keeps 8 bits
    halfway = np.array([1 + 2 ** -8], np.float32)  # exactly between two bf16 values: rounds to the even one
    assert to_float32(from_float32(halfway, "bfloat16"), "bfloat16")[0] == 1.0


def test_backend_errors(tmp_path):
    with pytest.raises(XLoraError, match=r"^provider 'tpu': expected one of cpu, cuda, tensorrt, openvino, "
                                         r"trt-engine$"):
        open_backend("tpu")
    assert set(PROVIDERS) == {"cpu", "cuda", "tensorrt", "openvino", "trt-engine"}
    with pytest.raises(XLoraError, match=r"^device='TPU': OpenVINO sees CPU"):
        XLoraSession(exported("tiny-llama"), provider="openvino", device="TPU")
    with pytest.raises(XLoraError, match=r"^device=1: provider 'cpu' takes no device$"):
        XLoraSession(exported("tiny-llama"), provider="cpu", device=1)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01this is not a protobuf\xff" * 50)
    with pytest.raises(XLoraError, match=r"garbage.onnx: OpenVINO cannot load it on CPU \(.+\)$"):
        XLoraSession(str(garbage), provider="openvino")


def test_a_missing_engine_package_is_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now fails
    monkeypatch.delitem(sys.modules, "xlora_runtime.backends.openvino", raising=False)
    with pytest.raises(XLoraError) as info:
        open_backend("openvino")
    assert str(info.value) == 'provider \'openvino\' needs the openvino package: pip install "xlora-runtime[openvino]"'


def test_commands_run_on_openvino(tmp_path, capsys):
    """`xlora-generate` and `xlora-parity` take the provider (and the device) like every other one."""
    from xlora_export.parity import main as parity
    from xlora_runtime.cli import generate_main

    path = exported("tiny-llama")
    assert generate_main([path, "5,17,99", "--ids", "--max-new-tokens", "4", "--provider", "openvino", "--device",
                          "CPU", "--json", "--threads", "1"]) == 0
    [line] = capsys.readouterr().out.splitlines()
    cpu = Generator(XLoraSession(path)).generate([[5, 17, 99]], max_new_tokens=4)
    assert json.loads(line)["tokens"] == cpu[0].tokens
    report = tmp_path / "parity.json"
    assert parity([built("tiny-llama"), path, "--provider", "openvino", "--steps", "4", "--json", str(report)]) == 0
    assert json.loads(report.read_text())["passed"]


# ----------------------------------------------------------------------------------------------- low memory
def test_low_memory_sessions_hold_no_packed_copies_and_give_the_same_results(sessions):
    """`XLoraSession(low_memory=True)`: both ONNX Runtime sessions without pre-packed weights (the weights read
    where they are mapped from OUT.onnx.data), and the same tokens, logits and scalings as the default session,
    with scalings per token and frozen after 2 steps (the frozen graph)."""
    lean = XLoraSession(sessions["cpu"].info.path, threads=1, low_memory=True)
    for options in (dict(expert_top_k=0), dict(expert_top_k=2, freeze_scalings_after=2)):
        default, low = _run(sessions["cpu"], max_new_tokens=12, **options), _run(lean, max_new_tokens=12, **options)
        assert [r.tokens for r in low] == [r.tokens for r in default]
        assert _max_diff(low, default, "logits") < ATOL_LOGITS and _max_diff(low, default, "scalings") < ATOL_SCALINGS
    for graph in (lean.main, lean.frozen):
        assert graph.session.get_session_options().get_session_config_entry("session.disable_prepacking") == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # the default session pre-packs
        sessions["cpu"].main.session.get_session_options().get_session_config_entry("session.disable_prepacking")
    # Both sessions were handed the weights from one mapping of OUT.onnx.data: one OrtValue per stored tensor,
    # the same object for both graphs, pointing into that mapping.
    shared = lean.backend.shared
    (data,) = shared._files.values()
    assert data.filename == os.path.abspath(lean.info.path + ".data")
    main, frozen = shared.initializers(lean.info.path), shared.initializers(lean.info.frozen_path)
    common = set(main) & set(frozen)
    assert len(common) > 10 and all(main[name] is frozen[name] for name in common)
    start = data.ctypes.data
    assert all(start <= value.data_ptr() < start + len(data) for value in main.values())
    assert len({value.data_ptr() for value in main.values()}) == len(shared._values)  # each tensor once


def test_low_memory_sessions_compute_with_the_shared_values(monkeypatch):
    """The sessions run on the OrtValues that SharedWeights hands them, not on weights they read themselves:
    values halved (own copies) change the logits; the same values unchanged give the default logits."""
    from xlora_runtime.backends import onnxruntime as backend

    original = backend.SharedWeights._value

    def halved(self, file, tensor):
        value = original(self, file, tensor)
        array = value.numpy()
        return ort.OrtValue.ortvalue_from_numpy(array * 0.5 if array.dtype == np.float32 else array)

    path = exported("tiny-llama")
    reference = _run(XLoraSession(path, threads=1, low_memory=True), max_new_tokens=1)
    monkeypatch.setattr(backend.SharedWeights, "_value", halved)
    changed = _run(XLoraSession(path, threads=1, low_memory=True), max_new_tokens=1)
    assert _max_diff(reference, _run(XLoraSession(path, threads=1), max_new_tokens=1), "logits") < ATOL_LOGITS
    assert _max_diff(changed, reference, "logits") > 0.01


def test_low_memory_names_a_weight_outside_its_data_file(tmp_path):
    source = exported("tiny-llama")
    for suffix in (".onnx", ".onnx.data", ".frozen.onnx"):
        shutil.copy(source[:-len(".onnx")] + suffix, tmp_path)
    data = tmp_path / "tiny-llama.onnx.data"
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with pytest.raises(XLoraError, match=r"tiny-llama\.onnx\.data: weight '.+' \(type 1, shape \[\d+(, \d+)*\], "
                                         r"bytes \d+\.\.\d+\) does not fit the file \(\d+ bytes\)$"):
        XLoraSession(str(tmp_path / "tiny-llama.onnx"), low_memory=True)
    os.remove(data)
    with pytest.raises(XLoraError, match=r"tiny-llama\.onnx\.data: cannot map the graph's weights \(.*No such file"):
        XLoraSession(str(tmp_path / "tiny-llama.onnx"), low_memory=True)


def test_low_memory_names_a_weight_of_an_element_type_it_cannot_map(monkeypatch):
    from xlora_runtime.backends import onnxruntime as backend

    monkeypatch.setattr(backend, "_ELEMENT_DTYPES", {})  # as if float32 (1) were a type numpy could not hold
    with pytest.raises(XLoraError, match=r"tiny-llama\.onnx\.data: weight '.+' has element type 1, which low_memory "
                                         r"cannot map \(open the graph without low_memory\)$"):
        XLoraSession(exported("tiny-llama"), low_memory=True)


def test_low_memory_is_refused_where_no_weights_are_packed():
    with pytest.raises(XLoraError, match=r"^low_memory: provider 'openvino' keeps no pre-packed weight copies; it "
                                         r"applies to ONNX Runtime's providers \(cpu, cuda, tensorrt\)$"):
        XLoraSession(exported("tiny-llama"), provider="openvino", low_memory=True)
