"""Which bases are accepted: GQA Llama/Mistral/Qwen2 yes; short sliding windows, embedding LoRA, others no."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

import xlora_export as xlora
from helpers import built, expert_paths, load_base
from xlora_export import XLoraError


def _config(base) -> xlora.xLoRAConfig:
    return xlora.xLoRAConfig(base.config.hidden_size, adapters=expert_paths("tiny-llama"))


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_short_sliding_window_is_refused(kind):
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=176, vocab_size=384, max_position_embeddings=256)
    if kind == "mistral":
        base = MistralForCausalLM(MistralConfig(sliding_window=16, **common))
    else:
        base = Qwen2ForCausalLM(Qwen2Config(use_sliding_window=True, sliding_window=16, max_window_layers=0,
                                            **common))
    with pytest.raises(XLoraError, match=r"sliding-window attention \(sliding_window=16\)"):
        xlora.add_xlora_to_model(base, _config(base))


def test_sliding_window_covering_all_positions_is_accepted():
    base = MistralForCausalLM(MistralConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                            num_key_value_heads=2, intermediate_size=176, vocab_size=384,
                                            max_position_embeddings=256, sliding_window=256))
    model = xlora.add_xlora_to_model(base, _config(base))
    assert len(model.module_names) == 14


def test_gqa_bases_are_what_the_recipes_build():
    for name in ("tiny-llama", "tiny-mistral", "tiny-qwen2"):
        config = load_base(name).config
        assert config.num_key_value_heads < config.num_attention_heads
        assert config.vocab_size != config.intermediate_size


def test_embedding_lora_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(os.path.join(built("tiny-llama"), "base"))
    folder = str(tmp_path / "emb")
    get_peft_model(base, LoraConfig(r=4, target_modules=["embed_tokens"], init_lora_weights=False)
                   ).save_pretrained(folder)
    config = xlora.xLoRAConfig(64, adapters={"emb": folder})
    with pytest.raises(XLoraError, match="expert 'emb'.*embedding LoRA"):
        xlora.add_xlora_to_model(load_base("tiny-llama"), config)


def test_dora_expert_is_refused(tmp_path):
    folder = tmp_path / "dora"
    shutil.copytree(expert_paths("tiny-llama")["alpha"], folder)
    record = json.loads((folder / "adapter_config.json").read_text())
    record["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(record))
    with pytest.raises(XLoraError, match="use_dora=True"):
        xlora.add_xlora_to_model(load_base("tiny-llama"), xlora.xLoRAConfig(64, adapters={"d": str(folder)}))
