"""TensorRT: optimization profiles, the engine sidecar, ONNX Runtime's TensorRT provider options, `xlora-engine`,
and the TensorRT backend.

TensorRT cannot be installed in this project's CI (no GPU, the wheels fetch from a host it cannot reach), so
everything up to the TensorRT call is tested here: the profiles (derived from the graph's metadata, consistent at
every point), the polygraphy loader chain the builder calls, the command's one-line errors, and the backend's
whole step logic (profile selection, shapes, device buffers, row gathers) run against a stand-in TensorRT whose
"engine" executes the ONNX graph with ONNX Runtime in host memory. `TestOnGpu` builds real engines and checks
their parity; it skips only where `tensorrt` does not import or no GPU is visible.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest

from helpers import built, exported
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.backends import cuda as cuda_memory
from xlora_runtime.backends import tensorrt as trt_backend
from xlora_runtime.backends.cuda import row_runs
from xlora_runtime.backends.onnxruntime import provider_options
from xlora_runtime.engine import build_engines, main, polygraphy_loaders
from xlora_runtime.format import contract as C
from xlora_runtime.format.record import Files, GraphInfo, ProfileHints
from xlora_runtime.format.sidecar import engine_companions, read_sidecar, sidecar, write_sidecar
from xlora_runtime.profiles import (
    PHASES,
    ProfileLimits,
    check_profile,
    engine_profiles,
    input_dims,
    limits_for,
    select_profile,
    wide_profile,
)

PROMPTS = ([5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33])


def _records() -> dict[str, GraphInfo]:
    path = exported("tiny-llama")
    return {"main": GraphInfo.read(path), "frozen": GraphInfo.read(C.frozen_path(path))}


def _have_tensorrt_and_gpu() -> str | None:
    """None when real engines can be built here, else why not."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "tensorrt does not import"
    return None if cuda_memory.gpu_count() > 0 else "no GPU is visible to the CUDA runtime"


# ------------------------------------------------------------------------------------------------ profiles
@pytest.mark.parametrize("graph", ["main", "frozen"])
def test_profiles_cover_prefill_and_decode(graph):
    record = _records()[graph]
    limits = limits_for(record, max_batch=4, max_sequence=24, max_total=40)
    profiles = engine_profiles(record, limits)
    dims = input_dims(record)
    dynamic = [name for name, d in dims.items() if any(isinstance(x, str) for x in d)]
    assert dynamic == [name for name in C.input_names(record.num_layers, graph == "frozen") if name != C.TOP_K]
    caches = [name for name in dims if "past" in name]
    assert len(caches) == record.num_layers * (2 if graph == "frozen" else 4)
    for phase, profile in zip(PHASES, profiles):
        assert list(profile) == dynamic
        check_profile(record, profile)  # min <= opt <= max, one cache shape, mask = past + new, fixed dims
        for name, (low, opt, high) in profile.items():
            assert all(a <= b <= c for a, b, c in zip(low, opt, high)), (phase, name)
            if name in caches:
                assert low[1::2] == (record.kv_heads, record.head_dim)
        ids, mask, past = profile[C.INPUT_IDS], profile[C.ATTENTION_MASK], profile[caches[0]]
        assert [s[0] for s in ids] == [1, 1, 4]
        for k in range(3):
            assert mask[k][1] == past[k][2] + ids[k][1]
    prefill, decode = profiles
    assert prefill[caches[0]][2][2] == 0 and prefill[C.INPUT_IDS][2][1] == 24  # prefill: no past, prompts to S
    assert decode[C.INPUT_IDS][0][1] == decode[C.INPUT_IDS][2][1] == 1  # decode: one new token
    assert decode[C.ATTENTION_MASK][2][1] == 40 and decode[caches[0]][2][2] == 39
    # the runtime's calls land in the right profile; a step beyond the limits is one line
    assert select_profile(profiles, {C.INPUT_IDS: (3, 7), C.ATTENTION_MASK: (3, 7), caches[0]: (3, 2, 0, 16)}) == 0
    assert select_profile(profiles, {C.INPUT_IDS: (3, 1), C.ATTENTION_MASK: (3, 30), caches[0]: (3, 2, 29, 16)}) == 1
    with pytest.raises(XLoraError, match=r"^no optimization profile of the engine holds this step \(input_ids "
                                         r"\(5, 1\) is outside \(1, 1\)\.\.\(4, 1\)\); rebuild it with larger"):
        select_profile(profiles, {C.INPUT_IDS: (5, 1), C.ATTENTION_MASK: (5, 30)})
    wide = wide_profile(record, limits)
    check_profile(record, wide)
    for name in wide:  # holds every call of both profiles, tuned at decode's opt point
        for profile in profiles:
            assert all(a <= b for a, b in zip(wide[name][0], profile[name][0])), name
            assert all(a >= b for a, b in zip(wide[name][2], profile[name][2])), name
        assert wide[name][1] == decode[name][1]
    assert wide[C.ATTENTION_MASK][2][1] == 40 + 24 - 1  # consistent max corner: S tokens after T - 1


def test_check_profile_catches_inconsistent_profiles():
    """Negative controls: a profile edited by hand (mask too wide, the two caches apart, opt above max)."""
    record = _records()["main"]
    decode = engine_profiles(record, limits_for(record, max_batch=2, max_total=32))[1]
    mask = {**decode, C.ATTENTION_MASK: tuple((b, t + 1) for b, t in decode[C.ATTENTION_MASK])}
    with pytest.raises(XLoraError, match=r"^profile min: attention_mask width 3 != past 1 \+ sequence 1$"):
        check_profile(record, mask)
    name = "scaling_past_key_values.1.value"
    apart = {**decode, name: (decode[name][0], decode[name][1], (2, 2, 40, 16))}
    with pytest.raises(XLoraError, match=rf"^profile max: cache input {name} is \(2, 2, 40, 16\)"):
        check_profile(record, apart)
    with pytest.raises(XLoraError, match=r"min \(1, 1\) <= opt \(3, 1\) <= max \(2, 1\) does not hold"):
        check_profile(record, {**decode, C.INPUT_IDS: ((1, 1), (3, 1), (2, 1))})


@pytest.mark.parametrize("limits, message", [
    (dict(max_total=1), "--max-total 1: expected an int >= 2 (a prompt token and a new one)"),
    (dict(max_total=10 ** 6), "--max-total 1000000: the model has 256 positions (max_position_embeddings)"),
    (dict(max_sequence=50, max_total=40), "--max-sequence 50: longer than --max-total 40"),
    (dict(max_batch=0), "--max-batch 0: expected an int >= 1"),
    (dict(max_batch=2, opt_batch=3), "--opt-batch 3: expected 1..2"),
    (dict(max_total=40, opt_total=1), "--opt-total 1: expected 2..40"),
    (dict(max_sequence=8, opt_sequence=9), "--opt-sequence 9: expected 1..8"),
])
def test_limits_errors(limits, message):
    record = _records()["main"]
    assert record.max_positions == 256
    with pytest.raises(XLoraError) as info:
        limits_for(record, **limits)
    assert str(info.value) == message


def test_default_limits_come_from_the_export():
    record = _records()["main"]
    limits = limits_for(record)
    assert limits == ProfileLimits(max_batch=record.tensorrt_profile.max_batch, max_sequence=256,
                                   max_total=256, opt_batch=1, opt_sequence=128, opt_total=128)
    long = dataclasses.replace(record, max_positions=131072,
                               tensorrt_profile=ProfileHints(max_batch=2, max_sequence=131072, max_past=131072))
    assert limits_for(long) == ProfileLimits(2, 1024, 4096, 1, 512, 2048)  # capped: memory grows with both


# ----------------------------------------------------------------------------- ONNX Runtime provider options
def _parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """Parse "name:1x2x0x16,name:..." the way ONNX Runtime's TensorRT provider does."""
    out = {}
    for item in text.split(","):
        name, dims = item.rsplit(":", 1)
        out[name] = tuple(int(d) for d in dims.split("x"))
    return out


def test_ort_provider_options():
    path = exported("tiny-llama")
    record = GraphInfo.read(path)
    providers = provider_options("tensorrt", path, device_id=1)
    assert [p for p, _ in providers] == ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    options = providers[0][1]
    assert options["device_id"] == 1 and providers[1][1] == {"device_id": 1}
    assert options["trt_engine_cache_enable"] and options["trt_engine_cache_path"] == os.path.abspath(path) + ".trt"
    assert options["trt_timing_cache_path"] == options["trt_engine_cache_path"]
    wide = wide_profile(record, limits_for(record))
    parsed = [_parse_shapes(options[f"trt_profile_{k}_shapes"]) for k in ("min", "opt", "max")]
    assert list(parsed[0]) == [n for n in C.input_names(record.num_layers) if n != C.TOP_K]  # every dynamic input
    for k in range(3):
        assert parsed[k] == {name: shape[k] for name, shape in wide.items()}
    check_profile(record, {name: tuple(p[name] for p in parsed) for name in parsed[0]})
    assert provider_options("cuda", path) == [("CUDAExecutionProvider", {"device_id": 0}), ("CPUExecutionProvider", {})]
    assert provider_options("cpu", path) == [("CPUExecutionProvider", {})]
    # a graph without the record (or none given): no explicit profile; the session reports the missing record
    assert "trt_profile_min_shapes" not in provider_options("tensorrt", None)[0][1]
    # the frozen graph has its own inputs (scalings instead of the scaling caches)
    frozen = _parse_shapes(provider_options("tensorrt", C.frozen_path(path))[0][1]["trt_profile_max_shapes"])
    assert C.SCALINGS in frozen and not any(n.startswith("scaling_past") for n in frozen)


# --------------------------------------------------------------------------------------------------- sidecar
def test_sidecar_round_trip(tmp_path):
    record = _records()["main"]
    limits = limits_for(record, max_batch=3, max_sequence=16, max_total=48)
    profiles = engine_profiles(record, limits)
    engine = str(tmp_path / "m.engine")
    files = Files(frozen="m.frozen.engine", tokenizer="m.tokenizer.json")
    path = write_sidecar(engine, sidecar(dataclasses.replace(record, files=files), limits.as_dict(),
                                         dict(zip(PHASES, profiles)), "/x/m.onnx", "10.13.0"))
    assert path == engine + ".json" == engine_companions(engine)["sidecar"]
    got_record, got_profiles = read_sidecar(engine)
    assert got_profiles == profiles
    assert got_record == dataclasses.replace(record, path=engine, files=files)
    content = json.load(open(path))
    assert content["limits"] == limits.as_dict() and [p["name"] for p in content["profiles"]] == ["prefill", "decode"]
    assert content["tensorrt"] == "10.13.0" and content["source"] == "/x/m.onnx"


def test_sidecar_errors(tmp_path):
    engine = str(tmp_path / "m.engine")
    with pytest.raises(XLoraError, match=r"m\.engine: not an X-LoRA engine \(no sidecar m\.engine\.json beside it; "
                                         r"build it with xlora-engine\)$"):
        read_sidecar(engine)
    side = tmp_path / "m.engine.json"
    side.write_text("{oops")
    with pytest.raises(XLoraError, match=r"m\.engine\.json: not valid JSON \("):
        read_sidecar(engine)
    side.write_text('{"format": "something"}')
    with pytest.raises(XLoraError, match=r'm\.engine\.json: not an xlora-engine sidecar \(no "format": '
                                         r'"xlora-engine"\)$'):
        read_sidecar(engine)
    side.write_text('{"format": "xlora-engine", "format_version": 7}')
    with pytest.raises(XLoraError, match=r"m\.engine\.json: sidecar format_version 7; this runtime reads 1$"):
        read_sidecar(engine)
    side.write_text('{"format": "xlora-engine", "format_version": 1, "metadata": {"format_version": 1}}')
    with pytest.raises(XLoraError, match=r"m\.engine\.json: the 'xlora_export' metadata record lacks \['graph', "):
        read_sidecar(engine)
    record = _records()["main"]
    side.write_text(json.dumps({"format": "xlora-engine", "format_version": 1, "metadata": record.to_dict(),
                                "profiles": [{"name": "prefill", "inputs": {C.INPUT_IDS: {"min": [1, 1]}}}]}))
    with pytest.raises(XLoraError, match=r'm\.engine\.json: "profiles": expected a list of \{"name", "inputs": '):
        read_sidecar(engine)


# ------------------------------------------------------------------------------------------------ the builder
def test_polygraphy_loader_chain(tmp_path):
    """The chain the builder calls: a strongly typed network from the ONNX file (precision from the graph; no
    FP16/BF16 flags, which TensorRT 11 removed), both profiles in order, one timing cache read and written."""
    path = exported("tiny-llama")
    record = GraphInfo.read(path)
    profiles = engine_profiles(record, limits_for(record, max_batch=2, max_total=64))
    cache = str(tmp_path / "timing.cache")
    save = polygraphy_loaders(path, str(tmp_path / "m.engine"), profiles, cache)
    assert type(save).__name__ == "SaveEngine" and save.path == str(tmp_path / "m.engine")
    build = save._engine
    assert type(build).__name__ == "EngineFromNetwork" and build.timing_cache_path == cache
    network, config = build._network, build._config
    assert type(network).__name__ == "NetworkFromOnnxPath" and network.path == path and network.strongly_typed
    assert config.timing_cache_path == cache
    assert [{name: tuple(map(tuple, p[name])) for name in p.keys()} for p in config.profiles] == profiles
    assert not any(getattr(config, flag, False) for flag in ("fp16", "bf16", "int8", "fp8", "tf32"))


def _engine_cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_xlora_engine_errors(tmp_path, capsys):
    path = exported("tiny-llama")
    engine = str(tmp_path / "m.engine")
    reason = _have_tensorrt_and_gpu()
    if reason is not None:  # here: the one-line refusal, nothing written
        code, out, err = _engine_cli([path, engine, "--max-total", "64"], capsys)
        assert code == 1 and out == ""
        expected = ("xlora-engine: error: xlora-engine needs TensorRT 10 or 11 and polygraphy: pip install "
                    "\"xlora-runtime[tensorrt]\" (tensorrt does not import)\n") if "import" in reason else \
            ("xlora-engine: error: xlora-engine needs an NVIDIA GPU: the CUDA runtime sees none (an engine is built "
             "on the GPU model it will run on)\n")
        assert err == expected
        assert os.listdir(tmp_path) == []
    cases = [
        ([str(tmp_path / "missing.onnx"), engine], f"{tmp_path / 'missing.onnx'}: no such file (expected an .onnx "
                                                    f"graph written by xlora-export)"),
        ([C.tokenizer_path(path), engine], f"{C.tokenizer_path(path)}: not an ONNX file"),
        ([C.frozen_path(path), engine], f"{C.frozen_path(path)}: this is the frozen-scalings graph; give the main "
                                        f"graph (OUT.onnx)"),
        ([path, engine, "--max-total", "999"], "--max-total 999: the model has 256 positions "
                                               "(max_position_embeddings)"),
        ([path, str(tmp_path / "nowhere" / "m.engine")], f"{tmp_path / 'nowhere' / 'm.engine'}: the folder "
                                                          f"{tmp_path / 'nowhere'} does not exist"),
    ]
    for argv, message in cases:
        code, out, err = _engine_cli(argv, capsys)
        assert (code, out, err) == (1, "", f"xlora-engine: error: {message}\n"), argv
    open(engine, "w").close()
    code, _, err = _engine_cli([path, engine], capsys)
    assert code == 1 and err == f"xlora-engine: error: {engine} already exists (use --force to overwrite)\n"
    code, _, err = _engine_cli([path, engine, "--max-batch", "0"], capsys)
    assert code == 2 and err.endswith("xlora-engine: error: argument --max-batch: expected a positive integer, got 0\n")


def test_not_an_xlora_export(tmp_path):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    save(helper.make_model(graph), str(tmp_path / "plain.onnx"))
    with pytest.raises(XLoraError, match=r"plain\.onnx: not an X-LoRA export \(no 'xlora_export' metadata record\)$"):
        build_engines(str(tmp_path / "plain.onnx"), str(tmp_path / "m.engine"), {})


def test_row_runs():
    """The device copies that gather rows: one per run of consecutive rows, in the requested order."""
    assert row_runs([0, 1, 3, 4, 5, 2], 10) == [(0, 0, 20), (20, 30, 30), (50, 20, 10)]
    assert row_runs([2], 8) == [(0, 16, 8)]
    assert row_runs([1, 0], 8) == [(0, 8, 8), (8, 0, 8)]
    assert row_runs([0, 1], 0) == []


# ------------------------------------------------------------------------ the backend, on a stand-in TensorRT
class _HostCuda:
    """polygraphy's CUDA wrapper on host memory: pointers are addresses of numpy buffers this object owns."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.live_bytes = 0

    def malloc(self, nbytes: int) -> int:
        buffer = np.empty(max(nbytes, 1), np.uint8)
        self.buffers[buffer.ctypes.data] = buffer
        self.live_bytes += nbytes
        return buffer.ctypes.data

    def free(self, ptr: int) -> None:
        self.live_bytes -= len(self.buffers.pop(ptr))

    def memcpy(self, dst: int, src: int, nbytes: int, kind: object, stream_ptr: int | None = None) -> None:
        ctypes.memmove(dst, src, nbytes)

    def create_stream(self) -> int:
        return 7

    def stream_synchronize(self, ptr: int) -> None:
        assert ptr == 7


def _read(ptr: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    count = int(np.prod(shape))
    if count == 0:
        return np.zeros(shape, dtype)
    raw = (ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(ptr)
    return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape).copy()


_TYPES = {"tensor(int64)": "INT64", "tensor(float)": "FLOAT", "tensor(float16)": "HALF"}
_NUMPY = {"INT64": np.int64, "FLOAT": np.float32, "HALF": np.float16}


class _Context:
    """An execution context: checks every call the way TensorRT does, runs the ONNX graph with ONNX Runtime."""

    def __init__(self, engine: _Engine) -> None:
        self.engine, self.profile, self.shapes, self.addresses, self.results = engine, None, {}, {}, None

    def set_optimization_profile_async(self, index: int, stream: int) -> bool:
        assert index not in self.engine.taken, "a profile is owned by one context at a time"
        self.engine.taken.add(index)
        self.profile = index
        return True

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        low, high = self.engine.profiles[self.profile].get(name, ((), (), ()))[::2]
        if not all(a <= v <= b for a, v, b in zip(low, shape, high)):
            return False
        self.shapes[name], self.results = tuple(shape), None
        return True

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        self.addresses[name] = ptr
        return True

    def _run(self) -> dict[str, np.ndarray]:
        if self.results is None:
            feed = {i.name: _read(self.addresses[i.name], self.shapes[i.name], _NUMPY[_TYPES[i.type]])
                    for i in self.engine.session.get_inputs()}
            self.results = dict(zip(self.engine.outputs, self.engine.session.run(None, feed)))
        return self.results

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self._run()[name].shape

    def execute_async_v3(self, stream: int) -> bool:
        self.engine.runs.append((self.profile, self.shapes[C.INPUT_IDS]))
        for name, value in self._run().items():
            ctypes.memmove(self.addresses[name], np.ascontiguousarray(value).ctypes.data, value.nbytes)
        self.results = None
        return True


class _Engine:
    """A deserialized engine whose plan file names the ONNX graph it stands for."""

    def __init__(self, onnx_path: str, profiles: list) -> None:
        self.session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.types = {v.name: _TYPES[v.type] for v in [*self.session.get_inputs(), *self.session.get_outputs()]}
        self.profiles, self.taken, self.runs = profiles, set(), []
        self.num_io_tensors = len(self.inputs) + len(self.outputs)
        self.num_optimization_profiles = len(profiles)

    def get_tensor_name(self, index: int) -> str:
        return (self.inputs + self.outputs)[index]

    def get_tensor_dtype(self, name: str) -> str:
        return self.types[name]

    def is_shape_inference_io(self, name: str) -> bool:
        return name == C.TOP_K  # exercised: a host-memory input

    def create_execution_context(self, strategy: object = None) -> _Context:
        assert strategy == "ON_PROFILE_CHANGE"
        return _Context(self)


def _stand_in_tensorrt(engines: dict[str, _Engine]) -> SimpleNamespace:
    """The `tensorrt` module as the backend uses it: a logger, a runtime, data types, an allocation strategy."""

    class Logger:
        WARNING = 2

        def __init__(self, level: int) -> None:
            pass

    class Runtime:
        def __init__(self, logger: Logger) -> None:
            pass

        def deserialize_cuda_engine(self, plan: bytes) -> _Engine | None:
            return engines.get(plan.decode())

    return SimpleNamespace(Runtime=Runtime, Logger=Logger,
                           DataType=SimpleNamespace(FLOAT="FLOAT", HALF="HALF", INT64="INT64"),
                           ExecutionContextAllocationStrategy=SimpleNamespace(ON_PROFILE_CHANGE="ON_PROFILE_CHANGE"))


@pytest.fixture
def stand_in_engine(tmp_path, monkeypatch):
    """`m.engine` (+ frozen) with real sidecars, deserialized by the stand-in TensorRT, on host-memory CUDA."""
    source = exported("tiny-llama")
    record = GraphInfo.read(source)
    limits = limits_for(record, max_batch=3, max_sequence=16, max_total=48)
    engine = str(tmp_path / "m.engine")
    names = engine_companions(engine)
    files = Files(frozen=os.path.basename(names["frozen"]), tokenizer=os.path.basename(names["tokenizer"]))
    engines = {}
    for onnx_path, target in ((source, engine), (C.frozen_path(source), names["frozen"])):
        graph_record = GraphInfo.read(onnx_path)
        profiles = engine_profiles(graph_record, limits)
        write_sidecar(target, sidecar(dataclasses.replace(graph_record, files=files), limits.as_dict(),
                                      dict(zip(PHASES, profiles)), onnx_path, "stand-in"))
        with open(target, "w") as f:
            f.write(onnx_path)
        engines[onnx_path] = _Engine(onnx_path, profiles)
    shutil.copyfile(C.tokenizer_path(source), names["tokenizer"])
    memory = _HostCuda()
    monkeypatch.setattr(cuda_memory, "wrapper", lambda: memory)
    monkeypatch.setattr(cuda_memory.DeviceTensor, "_scratch", None)
    trt = _stand_in_tensorrt(engines)
    monkeypatch.setattr(trt_backend, "make_backend", lambda *args: trt_backend.TrtBackend(trt))
    return SimpleNamespace(path=engine, engines=engines, memory=memory, source=source)


def test_engine_backend_step_logic(stand_in_engine):
    """The TensorRT backend's generation equals ONNX Runtime's: both profiles used (prefill, then decode), one
    context per profile, rows gathered and joined on the device, caches freed; a step beyond the profiles is one
    line."""
    reference = Generator(XLoraSession(stand_in_engine.source, threads=1))
    session = XLoraSession(stand_in_engine.path)  # an .engine file: provider "trt-engine"
    assert session.provider == "trt-engine" and session.info.tokenizer_path.endswith("m.tokenizer.json")
    gen = Generator(session)
    options = dict(max_new_tokens=12, stop_token_ids=[], return_logits=True)
    for extra in ({}, {"expert_top_k": 1}, {"freeze_scalings_after": [1, None, 3]}):
        want = reference.generate(list(PROMPTS), **options, **extra)
        got = gen.generate(list(PROMPTS), **options, **extra)
        assert [r.tokens for r in got] == [r.tokens for r in want], extra
        for a, b in zip(got, want):
            assert np.array_equal(a.logits, b.logits) and np.array_equal(a.scalings, b.scalings)
    main_engine = stand_in_engine.engines[stand_in_engine.source]
    assert main_engine.taken == {0, 1}
    assert main_engine.runs[0] == (0, (3, 7)) and set(main_engine.runs[1:12]) == {(1, (3, 1))}
    frozen_engine = stand_in_engine.engines[C.frozen_path(stand_in_engine.source)]
    assert frozen_engine.taken == {1}  # the frozen graph only ever decodes
    assert session.cache_bytes == 0 and gen.peak_cache_bytes > 0
    [text] = gen.generate("the model mixes", max_new_tokens=3)
    assert text.text == reference.generate("the model mixes", max_new_tokens=3)[0].text
    with pytest.raises(XLoraError, match=r"^no optimization profile of the engine holds this step \(input_ids "
                                         r"\(4, 7\) is outside"):
        gen.generate([PROMPTS[0]] * 4, max_new_tokens=2)
    assert session.cache_bytes == 0


@pytest.mark.parametrize("provider", ["tensorrt", "cuda"])
def test_a_provider_that_does_not_load_is_an_error(monkeypatch, provider):
    """ONNX Runtime skips an execution provider it cannot load (a CPU build here, missing CUDA or TensorRT
    libraries on a GPU machine) with a warning and runs the graph on the next one: the session refuses that, so
    `--provider tensorrt` never runs on the CPU unnoticed (and a GPU parity check cannot pass on the CPU)."""
    available = ort.get_available_providers()
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: [*available, "TensorrtExecutionProvider", "CUDAExecutionProvider"])
    wanted = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider"}[provider]
    path = exported("tiny-llama")
    with pytest.raises(XLoraError) as info:
        XLoraSession(path, provider=provider)
    assert str(info.value) == (f"{path}: the session runs on CPUExecutionProvider, not {wanted} as asked: ONNX "
                               f"Runtime could not load {wanted} (its warning above says why)")
    assert XLoraSession(path, provider="cpu").provider == "cpu"  # what the session got is what was asked


def test_engine_steps_reuse_device_buffers(stand_in_engine):
    """Decode steps take their presents and inputs from the backend's pool: a step allocates (cudaMalloc) only
    when a cache grows into the next power-of-two size, never frees (cudaFree synchronizes the device) but the
    buffers of classes the caches have left behind; the tokens stay the reference's."""
    memory, engine = stand_in_engine.memory, stand_in_engine.engines[stand_in_engine.source]
    malloc, free = memory.malloc, memory.free
    calls = []  # (engine run during which it happened, "malloc" or "free", bytes)

    def counting_malloc(nbytes: int) -> int:
        calls.append((len(engine.runs), "malloc", nbytes))
        return malloc(nbytes)

    def counting_free(ptr: int) -> None:
        calls.append((len(engine.runs), "free", len(memory.buffers[ptr])))
        free(ptr)

    memory.malloc, memory.free = counting_malloc, counting_free
    reference = Generator(XLoraSession(stand_in_engine.source, threads=1))
    gen = Generator(XLoraSession(stand_in_engine.path))
    steps = 40
    got = gen.generate(list(PROMPTS), max_new_tokens=steps, stop_token_ids=[])
    assert [r.tokens for r in got] == [r.tokens for r in reference.generate(list(PROMPTS), max_new_tokens=steps,
                                                                            stop_token_ids=[])]
    assert len(engine.runs) == steps  # one prefill, then a decode step per token but the last
    decode = [c for c in calls if 2 <= c[0] < steps]  # during the decode steps after the first
    allocating = {run for run, kind, _ in decode if kind == "malloc"}
    # a batch of 3, 2 kv heads of 16 float32: 384 bytes per position; 9..47 positions cross 4096, 8192, 16384
    assert len(allocating) <= 2 * 3, sorted(allocating)
    assert all(size & (size - 1) == 0 for _, _, size in calls)  # size classes only
    assert {kind for _, kind, _ in decode} == {"malloc", "free"}  # the left-behind classes were freed
    del got, gen


# --------------------------------------------------------------------------------------------- on a real GPU
@pytest.mark.skipif(_have_tensorrt_and_gpu() is not None, reason=f"needs TensorRT and a GPU: "
                                                                 f"{_have_tensorrt_and_gpu()}")
class TestOnGpu:
    """Real engines (fp32 and fp16): built, run with the same calls, and checked against the ONNX graph and the
    eager model with xlora-parity."""

    @pytest.mark.parametrize("dtype", ["fp32", "fp16"])
    def test_engine_build_and_parity(self, tmp_path, dtype):
        from xlora_export.export import ExportOptions, export
        from xlora_export.parity import main as parity

        onnx_path = str(tmp_path / "m.onnx")
        export(built("tiny-llama"), onnx_path, ExportOptions(dtype=dtype, frozen_scalings=True, validate=False))
        engine = str(tmp_path / "m.engine")
        written = build_engines(onnx_path, engine, {"max_batch": 4, "max_sequence": 32, "max_total": 96})
        assert engine in written and engine_companions(engine)["frozen"] in written
        want = Generator(XLoraSession(onnx_path)).generate(list(PROMPTS), max_new_tokens=16, stop_token_ids=[])
        got = Generator(XLoraSession(engine)).generate(list(PROMPTS), max_new_tokens=16, stop_token_ids=[])
        if dtype == "fp32":
            assert [r.tokens for r in got] == [r.tokens for r in want]
        assert parity([built("tiny-llama"), engine, "--provider", "trt-engine", "--lengths", "3,11,24",
                       "--steps", "16"]) == 0

    def test_cuda_provider_parity(self):
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("this onnxruntime has no CUDA execution provider")
        from xlora_export.parity import main as parity

        assert parity([built("tiny-llama"), exported("tiny-llama"), "--provider", "cuda"]) == 0


def test_engine_command_is_torch_free():
    """`xlora-engine` belongs to the deployment package: importing it imports neither torch nor TensorRT."""
    code = ("import sys, xlora_runtime.engine, xlora_runtime.backends.tensorrt; "
            "print(sorted(m for m in ('torch', 'tensorrt', 'onnx') if m in sys.modules))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(root, "runtime"), os.environ.get("PYTHONPATH",
                                                                                                     "")])}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stdout + result.stderr


@pytest.mark.parametrize("fault, message", [
    ("deserialize", "m.engine: TensorRT cannot load this engine (built by another TensorRT version or for another GPU "
                    "model?); rebuild it here with xlora-engine"),
    ("tensors", "m.engine: the engine's tensors differ from its sidecar's graph (top_k)"),
    ("profiles", "m.engine: the engine has 1 optimization profiles, its sidecar 2"),
    ("dtype", "engine tensor of TensorRT type UINT8: expected one of ['float16', 'float32', 'int64']"),
    ("context", "TensorRT could not create an execution context (out of GPU memory?)"),
    ("profile", "TensorRT refused optimization profile 0"),
    ("shape", "m.engine: TensorRT refused shape (3, 7) for input input_ids"),
    ("output", "m.engine: the engine computes logits as (3, 7, 99), the graph contract (3, 1, 384)"),
    ("execute", "m.engine: TensorRT failed to run a step (its log above says why)"),
])
def test_engine_failures_are_one_line(stand_in_engine, monkeypatch, fault, message):
    engine = stand_in_engine.engines[stand_in_engine.source]
    patches = {
        "deserialize": lambda: stand_in_engine.engines.clear(),
        "tensors": lambda: engine.inputs.remove(C.TOP_K) or setattr(engine, "num_io_tensors",
                                                                    engine.num_io_tensors - 1),
        "profiles": lambda: setattr(engine, "num_optimization_profiles", 1),
        "dtype": lambda: engine.types.update({C.LOGITS: "UINT8"}),
        "context": lambda: monkeypatch.setattr(_Engine, "create_execution_context", lambda self, strategy: None),
        "profile": lambda: monkeypatch.setattr(_Context, "set_optimization_profile_async", lambda self, i, s: False),
        "shape": lambda: monkeypatch.setattr(_Context, "set_input_shape", lambda self, name, shape: False),
        "output": lambda: monkeypatch.setattr(_Context, "get_tensor_shape", lambda self, name: (3, 7, 99)),
        "execute": lambda: monkeypatch.setattr(_Context, "execute_async_v3", lambda self, stream: False),
    }
    patches[fault]()
    with pytest.raises(XLoraError) as info:
        Generator(XLoraSession(stand_in_engine.path)).generate(list(PROMPTS), max_new_tokens=2)
    text = str(info.value)
    assert text.endswith(message) and "\n" not in text, text


def test_engine_provider_needs_tensorrt_and_a_gpu(monkeypatch, stand_in_engine):
    monkeypatch.undo()  # the real make_backend, on this machine
    path = stand_in_engine.path
    if _have_tensorrt_and_gpu() == "tensorrt does not import":
        with pytest.raises(XLoraError, match=r"^provider 'trt-engine' needs TensorRT 10 or 11: pip install "
                                             r"\"xlora-runtime\[tensorrt\]\"$"):
            XLoraSession(path)
    monkeypatch.setitem(sys.modules, "tensorrt", SimpleNamespace(__version__="10.13"))
    monkeypatch.setattr(cuda_memory, "gpu_count", lambda: 0)
    with pytest.raises(XLoraError, match=r"^provider 'trt-engine' needs an NVIDIA GPU: the CUDA runtime sees none$"):
        XLoraSession(path)
    monkeypatch.setattr(cuda_memory, "gpu_count", lambda: 1)
    with pytest.raises(XLoraError, match=r"^device=3: expected a GPU index in 0\.\.0$"):
        XLoraSession(path, device=3)
    from xlora_runtime.engine import tensorrt_version

    monkeypatch.setattr(cuda_memory, "gpu_count", lambda: 0)
    monkeypatch.setitem(sys.modules, "polygraphy", SimpleNamespace())
    with pytest.raises(XLoraError, match=r"^xlora-engine needs an NVIDIA GPU: the CUDA runtime sees none \(an engine "
                                         r"is built on the GPU model it will run on\)$"):
        tensorrt_version()


def test_a_failed_build_is_one_line(tmp_path, monkeypatch):
    import xlora_runtime.engine as engine_module

    def failing(*args):
        def build():
            raise RuntimeError("[E] 4: [network.cpp::validate] Error Code 4: API Usage Error\nInvalid Node - X")
        return build

    monkeypatch.setattr(engine_module, "tensorrt_version", lambda: "10.13")
    monkeypatch.setattr(engine_module, "polygraphy_loaders", failing)
    path = exported("tiny-llama")
    with pytest.raises(XLoraError) as info:
        build_engines(path, str(tmp_path / "m.engine"), {"max_total": 64})
    assert str(info.value) == f"{path}: TensorRT could not build an engine (Invalid Node - X)"
    assert not (tmp_path / "m.engine").exists()


@pytest.mark.parametrize("value, says", [
    ("{not json", "the 'xlora_export' metadata record is not valid JSON ("),
    ('{"format_version": 99}', "metadata format_version 99; this runtime reads 1"),
    ("[1]", "the 'xlora_export' metadata record is not a JSON object"),
    ('{"format_version": 1, "caches": {}}', "the 'xlora_export' metadata record lacks ['graph', "),
])
def test_malformed_records_for_the_builder(tmp_path, value, says):
    from onnx import TensorProto, helper, save

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    model = helper.make_model(graph)
    helper.set_model_props(model, {C.METADATA_KEY: value})
    path = str(tmp_path / "g.onnx")
    save(model, path)
    with pytest.raises(XLoraError) as info:
        GraphInfo.read(path)
    assert str(info.value).startswith(f"{path}: {says}")


_CTRL_C_AT_IMPORT = """
import sys

class CtrlC:
    def find_spec(self, name, path=None, target=None):
        if name == sys.argv[1]:
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, CtrlC())
from {module} import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("module, heavy, prog", [("xlora_runtime.engine", "polygraphy", "xlora-engine"),
                                                 ("xlora_runtime.serve.triton", "onnx", "xlora-triton")])
def test_ctrl_c_is_one_line(tmp_path, module, heavy, prog):
    """Ctrl-C while the command imports its heavy dependency (polygraphy before TensorRT; onnx for the served
    graph): one line, exit 130."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.path.join(root, "runtime"),
                                                        os.environ.get("PYTHONPATH", "")])}
    target = str(tmp_path / "m.engine") if prog == "xlora-engine" else str(tmp_path)
    result = subprocess.run([sys.executable, "-c", _CTRL_C_AT_IMPORT.format(module=module), heavy,
                             exported("tiny-llama"), target], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 130 and result.stderr == f"{prog}: interrupted\n", result.stderr
