"""Which bases are accepted (the families of `architectures.py`, their windows and differences), and the refusals."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Qwen2Config,
)

import xlora_export as xlora
from helpers import built, expert_paths, left_padded, load_base, make_xlora, max_diff
from models.recipes import FAMILY_RECIPES
from xlora_export import XLoraError
from xlora_export.architectures import decoder_spec


def _config(base) -> xlora.xLoRAConfig:
    return xlora.xLoRAConfig(base.config.hidden_size, adapters=expert_paths("tiny-llama"))


SMALL = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=176, vocab_size=384, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
             eos_token_id=2)


def test_zephyr_attention_settings_are_accepted():
    """zephyr-7b-beta (the original X-LoRA's base): Mistral, sliding_window=4096, max_position_embeddings=32768."""
    base = MistralForCausalLM(MistralConfig(**{**SMALL, "max_position_embeddings": 32768}, sliding_window=4096))
    model = xlora.add_xlora_to_model(base, _config(base))
    assert model.spec.windows == (4096,) * 4
    assert len(model.module_names) == 14  # the tiny-llama experts cover blocks 0 and 1


@pytest.mark.parametrize("kind,expected", [
    ("mistral", (6, 6, 6, 6)),
    ("mistral-window-covers-all", (None,) * 4),
    ("qwen2-max-window-layers-2", (None, None, 5, 5)),
    ("qwen2-use-sliding-window-off", (None,) * 4),
    ("gemma2-alternating", (4, None, 4, None)),
    ("gemma3-layer-types", (4, 4, 4, None)),
    ("phi3", (7, 7, 7, 7)),
])
def test_sliding_windows_follow_transformers(kind, expected):
    family = kind.split("-")[0]
    config = {
        "mistral": lambda: MistralConfig(**SMALL, sliding_window=256 if "covers" in kind else 6),
        "qwen2": lambda: Qwen2Config(**SMALL, use_sliding_window="off" not in kind, sliding_window=5,
                                     max_window_layers=2),
        "gemma2": lambda: Gemma2Config(**SMALL, head_dim=16, sliding_window=4),
        "gemma3": lambda: Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=4, layer_types=[
            "sliding_attention"] * 3 + ["full_attention"]),
        "phi3": lambda: Phi3Config(**SMALL, sliding_window=7),
    }[family]()
    assert decoder_spec(AutoModelForCausalLM.from_config(config)).windows == expected


def test_family_differences_are_read_from_the_config():
    qwen3 = decoder_spec(load_base("tiny-qwen3"))
    assert (qwen3.qk_norm, qwen3.head_dim, qwen3.sandwich_norm) == (True, 24, False)
    gemma2 = decoder_spec(load_base("tiny-gemma2"))
    assert (gemma2.sandwich_norm, gemma2.attn_softcap, gemma2.final_softcap) == (True, 1.0, 2.0)
    gemma3 = decoder_spec(load_base("tiny-gemma3"))
    assert gemma3.rope_per_layer_type and gemma3.qk_norm and gemma3.layer_types[-1] == "full_attention"
    phi3 = decoder_spec(load_base("tiny-phi3"))
    assert phi3.fused_projections and (phi3.rotary_dim, phi3.head_dim) == (8, 16)


def test_unsupported_family_is_refused_with_the_list():
    from transformers import GPT2Config

    base = AutoModelForCausalLM.from_config(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=384))
    with pytest.raises(XLoraError, match=r"unsupported architecture GPT2LMHeadModel \(model_type='gpt2'\); "
                                         r"supported: llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3"):
        xlora.add_xlora_to_model(base, _config(base))


def test_bidirectional_attention_is_refused():
    base = AutoModelForCausalLM.from_config(Gemma3TextConfig(**SMALL, head_dim=16, use_bidirectional_attention=True))
    with pytest.raises(XLoraError, match="use_bidirectional_attention=True"):
        decoder_spec(base)


@pytest.mark.parametrize("recipe", ["tiny-mistral", "tiny-qwen2", "tiny-gemma2", "tiny-gemma3", "tiny-phi3"])
def test_the_window_matters_in_the_parity_fixtures(recipe):
    """The windowed recipes' windows are shorter than the test prompts: full attention gives other logits."""
    model = make_xlora(recipe)
    ids, mask = left_padded([[5, 17, 99, 230, 41, 8, 77, 150, 64, 3, 12], [300, 22, 9, 181, 45, 6]])
    with torch.no_grad():
        windowed = model(ids, attention_mask=mask).logits
        model.spec = dataclasses.replace(model.spec, windows=(None,) * model.spec.num_layers)
        full = model(ids, attention_mask=mask).logits
    assert max_diff(windowed[mask.bool()], full[mask.bool()]) > 1e-3


def _swap_block_norms(base) -> None:
    for block in base.model.layers:
        a, b = block.input_layernorm.weight, block.post_attention_layernorm.weight
        a.data, b.data = b.data.clone(), a.data.clone()


def _drop_biases(base) -> None:
    for m in base.modules():
        if isinstance(m, torch.nn.Linear) and m.bias is not None:
            m.bias.data.zero_()


@pytest.mark.parametrize("recipe,mutation", [("tiny-llama", _swap_block_norms), ("tiny-qwen2", _swap_block_norms),
                                             ("tiny-gemma2", _swap_block_norms), ("tiny-qwen2", _drop_biases),
                                             ("tiny-gemma2", _drop_biases)])
def test_fixtures_catch_decoder_bugs(recipe, mutation):
    """Random norm weights and biases: swapping a block's two norms or dropping the biases moves the logits far
    beyond the parity tolerance (with 1/0 fresh-init weights neither would show)."""
    ids, mask = left_padded([[5, 17, 99, 230, 41, 8, 77], [300, 22, 9]])
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    base = load_base(recipe)
    with torch.no_grad():
        before = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        mutation(base)
        after = base(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    assert max_diff(before[mask.bool()], after[mask.bool()]) > 1e-2


def test_gqa_bases_are_what_the_recipes_build():
    for name in FAMILY_RECIPES:
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


def _peft_expert(folder: str, **lora) -> str:
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(os.path.join(built("tiny-llama"), "base"))
    get_peft_model(base, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(folder)
    return folder


def test_lm_head_expert_is_refused(tmp_path):
    folder = _peft_expert(str(tmp_path / "head"), r=4, target_modules=["lm_head", "q_proj"])
    with pytest.raises(XLoraError, match=r"expert 'head' targets lm_head: X-LoRA experts may target only the "
                                         r"Linears of the decoder blocks"):
        xlora.add_xlora_to_model(load_base("tiny-llama"), xlora.xLoRAConfig(64, adapters={"head": folder}))


def test_lora_bias_expert_is_refused(tmp_path):
    folder = _peft_expert(str(tmp_path / "b"), r=4, target_modules=["q_proj"], lora_bias=True)
    with pytest.raises(XLoraError, match=r"expert 'b': .*adapter_config.json sets lora_bias=True"):
        xlora.add_xlora_to_model(load_base("tiny-llama"), xlora.xLoRAConfig(64, adapters={"b": folder}))
    record = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    record["lora_bias"] = False  # a config that hides the bias tensors it ships
    (tmp_path / "b" / "adapter_config.json").write_text(json.dumps(record))
    with pytest.raises(XLoraError, match=r"expert 'b': .*has a LoRA bias \(.*lora_B\.bias\)"):
        xlora.add_xlora_to_model(load_base("tiny-llama"), xlora.xLoRAConfig(64, adapters={"b": folder}))
