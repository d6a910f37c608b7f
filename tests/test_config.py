"""xLoRAConfig: seed defaults, validation at construction, run-time top-k, serialisation."""

from __future__ import annotations

import pytest

from helpers import expert_paths, make_xlora
from xlora_export import XLoraError, xLoRAConfig


def test_seed_defaults():
    c = xLoRAConfig(64)
    assert (c.enable_softmax, c.enable_softmax_topk, c.softmax_temperature, c.layerwise_scalings) == (
        True, False, 1.0, False)
    assert (c.top_k_lora, c.xlora_depth, c.xlora_size, c.enable_relu_and_dropout, c.use_bias) == (
        None, 1, 2048, True, True)
    assert (c.xlora_dropout_p, c.stop_token_id, c.use_trainable_adapters) == (0.2, None, False)
    assert (c.scaling_pass_value, c.global_scaling_weight) == (0.0, 1.0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(enable_softmax_topk=True), "enable_softmax_topk"),
    (dict(top_k_lora=0, adapters={"a": "x", "b": "y"}), "top_k_lora"),
    (dict(top_k_lora=3, adapters={"a": "x", "b": "y"}), "top_k_lora"),
    (dict(xlora_depth=0), "xlora_depth"),
    (dict(xlora_dropout_p=1.5), "xlora_dropout_p"),
    (dict(softmax_temperature=0.0), "softmax_temperature"),
    (dict(hidden_size=0), "hidden_size"),
])
def test_invalid_fields_are_named(kwargs, match):
    kwargs = {"hidden_size": 64, **kwargs}
    with pytest.raises(XLoraError, match=match):
        xLoRAConfig(**kwargs)


def test_unknown_fields_are_an_error():
    with pytest.raises(XLoraError, match=r"my.json: unknown field\(s\) \['not_a_field'\]"):
        xLoRAConfig.from_dict({"hidden_size": 64, "not_a_field": 1}, "my.json")
    with pytest.raises(TypeError):
        xLoRAConfig(64, not_a_field=1)


def test_runtime_top_k_none_is_dense_even_with_softmax_topk(tmp_path):
    model = make_xlora("tiny-llama", top_k_lora=2, enable_softmax_topk=True, enable_softmax=False)
    model.set_topk_lora(None)
    assert model.get_topk_lora() is None
    model.save_pretrained(tmp_path)  # a config saved after it still loads
    import json

    record = json.loads((tmp_path / "xlora_config.json").read_text())
    assert record["top_k_lora"] is None and record["enable_softmax_topk"] is True
    assert xLoRAConfig.from_dict(record).top_k_lora is None
    with pytest.raises(XLoraError, match="top_k_lora"):
        model.set_topk_lora(4)


def test_top_k_above_expert_count_rejected_at_build():
    with pytest.raises(XLoraError, match="top_k_lora"):
        make_xlora("tiny-llama", top_k_lora=4)
    assert len(expert_paths("tiny-llama")) == 3


def test_to_dict_has_the_original_key_set():
    record = xLoRAConfig(64, adapters={"a": "/abs/a"}).to_dict()
    assert record["adapters"] == ["a"]
    assert "device" not in record and "stop_token_id" not in record


def test_softmax_with_softmax_topk_warns_once(monkeypatch):
    import warnings

    from xlora_export import config as config_module

    monkeypatch.setattr(config_module, "_warned", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        xLoRAConfig(64, enable_softmax=True, enable_softmax_topk=True, top_k_lora=1)
        xLoRAConfig(64, enable_softmax=True, enable_softmax_topk=True, top_k_lora=2)
        xLoRAConfig(64, enable_softmax=False, enable_softmax_topk=True, top_k_lora=1)
    messages = [str(w.message) for w in caught if "mutually exclusive" in str(w.message)]
    assert len(messages) == 1, messages


@pytest.mark.parametrize("field,value,expected", [
    ("enable_softmax", "yes", "expected bool"), ("enable_softmax", 1, "expected bool"),
    ("softmax_temperature", "1.0", "expected float or int"),
    ("softmax_temperature", float("nan"), "expected a finite number"),
    ("global_scaling_weight", float("inf"), "expected a finite number"),
    ("global_scaling_weight", True, "expected float or int"),
    ("top_k_lora", 1.5, "expected int or null"), ("xlora_depth", None, "expected int"),
    ("scaling_pass_value", [0.5], "expected float or int or null"), ("base_model_id", 3, "expected str or null"),
])
def test_field_types_are_checked(field, value, expected):
    with pytest.raises(XLoraError, match=rf"xLoRAConfig\.{field}: {expected}"):
        xLoRAConfig.from_dict({"hidden_size": 64, field: value})
