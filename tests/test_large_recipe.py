"""models/large.py at a tiny size: the code path of the 7B recipe (fp16 tensors streamed into Hub-snapshot shards,
the byte-level tokenizer of an exact size, PEFT experts, the original classifier), loaded by transformers, PEFT's
key layout and this project's loader."""

import json
import os

import pytest
import torch
from safetensors import safe_open

from models.large import LargeRecipe, build_large, write_safetensors
from models.recipes import RECIPES, SLOW_RECIPES

TINY = LargeRecipe(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=96, vocab=600, max_positions=128,
                   sliding_window=5, experts=["a", "b", "c"], rank=4, xlora_depth=3, xlora_size=32,
                   shard_bytes=60_000, seed=3)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> str:
    return build_large(TINY, str(tmp_path_factory.mktemp("large") / "ckpt"))


def _header(path: str) -> dict:
    with open(path, "rb") as f:
        return json.loads(f.read(int.from_bytes(f.read(8), "little")))


def test_the_base_is_a_hub_snapshot_of_fp16_shards(built):
    base = os.path.join(built, "base")
    with open(os.path.join(base, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    total = 0
    for shard in shards:
        header = _header(os.path.join(base, shard))
        names = {k for k in header if k != "__metadata__"}
        assert names == {k for k, v in index["weight_map"].items() if v == shard}
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    assert total == index["metadata"]["total_size"]
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    assert (config["model_type"], config["vocab_size"], config["sliding_window"], config["dtype"]) == \
        ("mistral", 600, 5, "float16")


def test_the_tokenizer_has_exactly_the_vocabulary(built):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(built, "base"))
    assert len(tokenizer) == TINY.vocab
    ids = tokenizer("abc abd")["input_ids"]
    assert len(ids) < len("abc abd")  # merges apply
    assert tokenizer.decode(ids) == "abc abd"


def test_transformers_and_the_project_load_the_same_weights(built):
    from transformers import AutoModelForCausalLM

    from xlora_export.xlora_utils import load_model

    base = AutoModelForCausalLM.from_pretrained(os.path.join(built, "base"))
    assert base.dtype == torch.float16
    model, tokenizer = load_model(built, dtype=torch.float16)
    assert model.adapter_names == ["a", "b", "c"] and tokenizer is not None
    assert len(model.module_names) == TINY.layers * 7
    ours = dict(model.model.named_parameters())
    for name, p in base.named_parameters():
        key = next(k for k in ours if k.endswith(name) or k.endswith(name.replace(".weight", ".base_layer.weight")))
        assert torch.equal(ours[key], p), name
    with torch.no_grad():
        out = model(torch.tensor([[5, 9, 300, 7]]))
    assert out.scalings.shape == (1, 4, len(model.module_names), 3)
    assert torch.isfinite(out.logits).all()
    assert not torch.allclose(out.scalings[0, 0], out.scalings[0, -1])  # the classifier reads each token


def test_experts_use_peft_keys_and_the_classifier_the_original_layout(built):
    with safe_open(os.path.join(built, "a", "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 7 * TINY.layers and a.shape == (TINY.rank, TINY.intermediate)
    header = _header(os.path.join(built, "xlora_classifier.safetensors"))
    assert {k for k in header if k != "__metadata__"} == {"inner.0.weight", "inner.0.bias", "inner.3.weight",
                                                          "inner.3.bias", "last.weight", "last.bias"}


def test_the_build_is_deterministic(built, tmp_path):
    again = build_large(TINY, str(tmp_path / "again"))
    for shard in ("model-00001-of-", "model.safetensors.index.json"):
        name = next(f for f in sorted(os.listdir(os.path.join(built, "base"))) if f.startswith(shard))
        with open(os.path.join(built, "base", name), "rb") as x, open(os.path.join(again, "base", name), "rb") as y:
            assert x.read() == y.read()


def test_write_safetensors_refuses_a_tensor_of_another_shape(tmp_path):
    path = str(tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="expected fp16"):
        write_safetensors(path, [("w", (2, 3))], iter([torch.zeros(3, 2, dtype=torch.float16)]))
    assert not os.path.exists(path)


def test_the_7b_recipe_has_the_shape_it_names():
    recipe = RECIPES["mistral-7b-xlora"]
    assert "mistral-7b-xlora" in SLOW_RECIPES
    assert (recipe.hidden, recipe.layers, recipe.heads, recipe.kv_heads, recipe.intermediate, recipe.vocab,
            recipe.sliding_window, recipe.rope_theta) == (4096, 32, 32, 8, 14336, 32000, 4096, 10000.0)
    assert (len(recipe.experts), recipe.rank, len(recipe.targets), recipe.xlora_depth, recipe.xlora_size,
            recipe.layerwise_scalings) == (9, 16, 7, 8, 2048, False)
