"""The export format's metadata record (`xlora_runtime.format.record`): one typed record, built by the exporter,
written as the same JSON it reads back, parsed strictly in one place, and peeked at leniently before a graph opens;
older exports of the same format_version keep opening."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import onnx
import pytest

from helpers import exported
from models.recipes import RECIPES
from xlora_runtime import Generator, XLoraError, XLoraSession
from xlora_runtime.format import contract as C
from xlora_runtime.format.graph_file import external_tensors, read_metadata_props
from xlora_runtime.format.record import GraphInfo, Quantization, peek, peek_file

DEFAULTS = {"classifier_sha256": None, "logits": C.LOGITS_ALL, "attention": C.ATTENTION_ONNX, "quantization": None}


def _text(path: str) -> str:
    """The record's text as the file holds it (no parse)."""
    return read_metadata_props(path)[C.METADATA_KEY]


def _object() -> dict:
    return json.loads(_text(exported("tiny-llama")))


def test_a_real_exports_record_reads_and_writes_back_the_same_text():
    path = exported("tiny-llama")
    for graph, kind in ((path, C.GRAPH_TWO_PASS), (C.frozen_path(path), C.GRAPH_FROZEN)):
        text = _text(graph)
        info = GraphInfo.parse(text, graph)
        assert info.to_json() == text  # the same JSON, key for key, in the exporter's order
        assert GraphInfo.read(graph) == info and info.graph == kind
        assert list(info.caches) == (["real"] if kind == C.GRAPH_FROZEN else ["real", "scaling"])
    info = XLoraSession(path, threads=1).info
    assert info == GraphInfo.read(path)
    assert info.expert_names == [e.name for e in RECIPES["tiny-llama"].experts]
    assert len(info.module_names) == info.n_modules and info.n_experts == len(info.expert_names)
    assert info.frozen_path == C.frozen_path(path) and info.tokenizer_path == C.tokenizer_path(path)
    assert info.chat_template_path is None and info.logits == C.LOGITS_LAST and info.cache_dtype == "float32"


def test_build_gives_the_record_parse_reads():
    """The exporter's constructor from plain values: what it writes is what the runtime reads, and the optional
    quantization is written only when there is one."""
    info = GraphInfo.build(
        "/x/m.onnx", frozen=False, producer="xlora-export 0", versions={"torch": "2"}, source="/ckpt",
        classifier_sha256="ab", architecture="llama", dtype="fp16", opset=17, num_layers=2, kv_heads=2, head_dim=8,
        hidden_size=16, vocab_size=32, max_positions=64, module_names=["q", "v"], expert_names=["b", "a", "c"],
        config={"top_k_lora": None}, default_top_k=0, all_logits=True, attention=C.ATTENTION_GQA,
        eos_token_ids=[2], pad_token_id=None, bos_token_id=1, max_batch=4, frozen_file="m.frozen.onnx",
        tokenizer_file=None, chat_template_file=None)
    obj = info.to_dict()
    assert list(obj)[:2] == ["format_version", "graph"] and "quantization" not in obj
    assert obj["adapters"] == {"b": 0, "a": 1, "c": 2} and obj["n_experts"] == 3
    assert obj["caches"]["scaling"] == {"inputs": C.past_names(2, True), "shape": [C.BATCH, 2, C.PAST_SEQUENCE, 8],
                                        "dtype": "float16"}
    assert obj["tensorrt_profile"] == {"max_batch": 4, "max_sequence": 64, "max_past": 64}
    assert GraphInfo.parse(info.to_json(), "/x/m.onnx") == info
    assert info.pad_token_id == 2  # no pad token: the first end-of-sequence id pads
    int4 = dataclasses.replace(info, quantization=Quantization(mode="int4", lm_head=False, block_size=32,
                                                               accuracy_level=4))
    assert int4.to_dict()["quantization"] == {"mode": "int4", "lm_head": False, "block_size": 32, "accuracy_level": 4}
    assert GraphInfo.parse(int4.to_json(), "/x/m.onnx") == int4


@pytest.mark.parametrize("changes, removed, says", [
    ({"num_layers": "2"}, (), "the 'xlora_export' metadata record: num_layers is '2'; expected an int >= 1"),
    ({"num_key_value_heads": 0}, (), "the 'xlora_export' metadata record: num_key_value_heads is 0; expected an int "
                                     ">= 1"),
    ({"attention": "flash"}, (), "the 'xlora_export' metadata record: attention is 'flash'; expected one of 'onnx', "
                                 "'gqa'"),
    ({"adapters": {"a": 0, "b": 0}}, (), "the 'xlora_export' metadata record: adapters is {'a': 0, 'b': 0}; expected "
                                         "an object of name: index, the indices 0..n-1"),
    ({"caches": {"real": {"inputs": [], "shape": [], "dtype": "int8"}}}, (),
     "the 'xlora_export' metadata record: caches.real.dtype is 'int8'; expected one of 'float32', 'float16', "
     "'bfloat16'"),
    ({"caches": {"scaling": {}}}, (), "the 'xlora_export' metadata record lacks ['caches.real']"),
    ({"files": {"frozen": None}}, (), "the 'xlora_export' metadata record lacks ['files.tokenizer']"),
    ({"eos_token_id": 2}, (), "the 'xlora_export' metadata record: eos_token_id is 2; expected a list of token ids"),
    ({"quantization": {"mode": "int4"}}, (), "the 'xlora_export' metadata record lacks ['quantization.lm_head']"),
    ({}, ("vocab_size", "caches"), "the 'xlora_export' metadata record lacks ['vocab_size', 'caches']"),
    ({"format_version": 2}, (), "metadata format_version 2; this runtime reads 1"),
])
def test_strict_parse_names_the_file_and_the_field(changes, removed, says):
    obj = {key: value for key, value in {**_object(), **changes}.items() if key not in removed}
    with pytest.raises(XLoraError) as info:
        GraphInfo.parse(json.dumps(obj), "m.onnx")
    assert str(info.value) == f"m.onnx: {says}"


def test_peek_tolerates_what_parse_refuses(tmp_path):
    obj = {**_object(), "num_layers": "2", "attention": C.ATTENTION_GQA, "later_field": [1],
           "quantization": {"mode": "int4", "lm_head": False, "block_size": 32, "accuracy_level": 4}}
    with pytest.raises(XLoraError, match=r"num_layers is '2'"):
        GraphInfo.parse(json.dumps(obj), "m.onnx")
    fields = peek(json.dumps(obj))
    assert "num_layers" not in fields and fields["vocab_size"] == obj["vocab_size"]
    assert fields["attention"] == C.ATTENTION_GQA and fields["quantization"].mode == "int4"
    # a partial record (a benchmark's plain base graph says only its attention); none at all; not a record
    assert peek(json.dumps({"attention": C.ATTENTION_GQA})) == {**DEFAULTS, "attention": C.ATTENTION_GQA}
    assert peek(json.dumps({"logits": 7})) == DEFAULTS
    for text in (None, "{oops", "[1, 2]"):
        assert peek(text) == DEFAULTS
    (tmp_path / "notes.onnx").write_text("not a graph")
    assert peek_file(str(tmp_path / "notes.onnx")) == peek_file(str(tmp_path / "missing.onnx")) == DEFAULTS
    assert peek_file(exported("tiny-llama")) == peek(_text(exported("tiny-llama")))


def test_an_older_export_of_the_same_format_version_still_opens(tmp_path):
    """Exports written before `attention`, `logits`, `classifier_sha256` and `files.chat_template` existed (and
    with the `sliding_windows` key they had then) open, with the defaults that describe them."""
    path = exported("tiny-llama")
    proto = onnx.load(path, load_external_data=False)
    old = _object()
    for key in ("attention", "logits", "classifier_sha256"):
        del old[key]
    del old["files"]["chat_template"]
    old["sliding_windows"] = [None, None]
    for entry in proto.metadata_props:
        if entry.key == C.METADATA_KEY:
            entry.value = json.dumps(old)
    target = str(tmp_path / os.path.basename(path))
    onnx.save(proto, target)
    for location in {t.location for t in external_tensors(path)}:
        shutil.copyfile(os.path.join(os.path.dirname(path), location), str(tmp_path / location))
    session = XLoraSession(target, threads=1)
    info = session.info
    assert (info.attention, info.logits, info.classifier_sha256, info.files.chat_template) == (
        C.ATTENTION_ONNX, C.LOGITS_ALL, None, None)
    assert info.frozen_path is None  # named in the record, but not beside this copy
    prompt = [5, 17, 99, 230]
    [now] = Generator(XLoraSession(path, threads=1)).generate(prompt, max_new_tokens=4, stop_token_ids=[])
    [then] = Generator(session).generate(prompt, max_new_tokens=4, stop_token_ids=[])
    assert then.tokens == now.tokens
