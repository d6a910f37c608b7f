"""Random X-LoRA checkpoints at a real model's size, written straight to disk in fp16 (no model in memory).

`recipes.py` builds its models with transformers and PEFT in fp32, which at 7B would need 30 GB for the base
alone. Here every tensor is drawn in fp16 (`normal_` on a half tensor, seeded per tensor) and streamed into
its safetensors file as soon as it is drawn: memory is one tensor (the largest, the embedding: 262 MB at 7B),
the build a minute or two of random numbers and disk writes. The folder is the one `recipes.build` writes:

    base/                      a Hub snapshot: config.json, generation_config.json, model-0000i-of-0000n
                               .safetensors shards of at most `shard_bytes` with model.safetensors.index.json,
                               tokenizer.json + tokenizer_config.json (a byte-level BPE of exactly `vocab` tokens)
    <expert>/                  PEFT LoRA folders (adapter_config.json, adapter_model.safetensors), fp16
    xlora_config.json          base_model_id = "base"
    xlora_classifier.safetensors
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

__all__ = ["LargeRecipe", "build_large", "build_vocab_tokenizer", "write_safetensors"]

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
_ALIGN = 8  # safetensors pads its header so that the data starts on 8 bytes


@dataclass
class LargeRecipe:
    """A Mistral/Llama-shaped base with rank-`rank` experts on `targets` and the original X-LoRA classifier
    (defaults: Mistral-7B, zephyr-7b-beta's shape, with nine experts and the original README's classifier)."""

    arch: str = "mistral"  # "mistral" or "llama"
    hidden: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 8
    intermediate: int = 14336
    vocab: int = 32000
    max_positions: int = 32768
    sliding_window: int | None = 4096
    rope_theta: float = 10000.0
    experts: list[str] = field(default_factory=lambda: ["code", "math", "chat", "story", "science", "law",
                                                        "medicine", "poetry", "translation"])
    rank: int = 16
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ATTN + MLP)
    xlora_depth: int = 8
    xlora_size: int = 2048
    layerwise_scalings: bool = False
    shard_bytes: int = 2_000_000_000  # at most this much per base shard (a tensor is never split)
    seed: int = 0


def write_safetensors(path: str, tensors: list[tuple[str, tuple[int, ...]]],
                      values: Iterator[torch.Tensor]) -> None:
    """Write a safetensors file of fp16 tensors whose names and shapes are known up front, drawing each value
    from `values` (in the order of `tensors`) only when it is written: one tensor in memory at a time.

    Args:
        tensors: (name, shape) in file order.
        values: yields each tensor (fp16, of its shape) in that order.
    """
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        size = 2 * _numel(shape)
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(len(text) + 8) % _ALIGN)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for (name, shape), value in zip(tensors, values, strict=True):
            if value.dtype != torch.float16 or tuple(value.shape) != tuple(shape):
                raise ValueError(f"{path}: tensor {name} is {value.dtype} {tuple(value.shape)}, expected fp16 {shape}")
            f.write(memoryview(value.contiguous().view(torch.uint8).numpy().reshape(-1)))
    os.replace(tmp, path)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _draw(shape: tuple[int, ...], std: float, seed: int, mean: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float16).normal_(mean, std, generator=g)


def _head_dim(recipe: LargeRecipe) -> int:
    return recipe.hidden // recipe.heads


def _projection_shapes(recipe: LargeRecipe) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection of one decoder layer."""
    h, d = recipe.hidden, _head_dim(recipe)
    return {"q_proj": (recipe.heads * d, h), "k_proj": (recipe.kv_heads * d, h), "v_proj": (recipe.kv_heads * d, h),
            "o_proj": (h, recipe.heads * d), "gate_proj": (recipe.intermediate, h),
            "up_proj": (recipe.intermediate, h), "down_proj": (h, recipe.intermediate)}


def _module_path(name: str) -> str:
    return f"self_attn.{name}" if name in ATTN else f"mlp.{name}"


def _base_tensors(recipe: LargeRecipe) -> list[tuple[str, tuple[int, ...], float, float]]:
    """(name, shape, mean, std) of every base weight, in the order a Hub snapshot stores them (layer by layer):
    projections N(0, 0.02) as transformers initialises them, norms around 1 (random, so a swapped norm shows)."""
    out: list[tuple[str, tuple[int, ...], float, float]] = [("model.embed_tokens.weight", (recipe.vocab, recipe.hidden),
                                                             0.0, 0.02)]
    for i in range(recipe.layers):
        prefix = f"model.layers.{i}."
        out.append((prefix + "input_layernorm.weight", (recipe.hidden,), 1.0, 0.1))
        out.extend((prefix + _module_path(p) + ".weight", shape, 0.0, 0.02)
                   for p, shape in _projection_shapes(recipe).items())
        out.append((prefix + "post_attention_layernorm.weight", (recipe.hidden,), 1.0, 0.1))
    out.append(("model.norm.weight", (recipe.hidden,), 1.0, 0.1))
    out.append(("lm_head.weight", (recipe.vocab, recipe.hidden), 0.0, 0.02))
    return out


def _shards(tensors: list, limit: int) -> list[list]:
    """Consecutive groups of at most `limit` bytes (a tensor larger than the limit alone)."""
    shards: list[list] = [[]]
    size = 0
    for t in tensors:
        nbytes = 2 * _numel(t[1])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def build_vocab_tokenizer(out_dir: str, vocab_size: int) -> None:
    """A byte-level BPE tokenizer of exactly `vocab_size` tokens (3 specials, the 256 byte symbols, then merges of
    two byte symbols, letters first), saved as a transformers fast tokenizer in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    order = sorted(alphabet, key=lambda c: (not c.isalpha(), not c.islower(), c))
    specials = ["<pad>", "<s>", "</s>"]
    if vocab_size < len(specials) + len(order) or vocab_size > len(specials) + len(order) * (len(order) + 1):
        raise ValueError(f"vocab {vocab_size}: expected {len(specials) + len(order)} to "
                         f"{len(specials) + len(order) * (len(order) + 1)}")
    vocab = {t: i for i, t in enumerate(specials + order)}
    merges = []
    for a in order:
        for b in order:
            if len(vocab) == vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.add_special_tokens(specials)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")
    fast.save_pretrained(out_dir)


def _write_base(recipe: LargeRecipe, out_dir: str) -> None:
    from transformers import GenerationConfig, LlamaConfig, MistralConfig

    os.makedirs(out_dir, exist_ok=True)
    fields = dict(hidden_size=recipe.hidden, num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                  num_key_value_heads=recipe.kv_heads, intermediate_size=recipe.intermediate, vocab_size=recipe.vocab,
                  max_position_embeddings=recipe.max_positions, tie_word_embeddings=False, rms_norm_eps=1e-5,
                  rope_theta=recipe.rope_theta, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if recipe.arch == "mistral":
        config = MistralConfig(sliding_window=recipe.sliding_window, **fields)
    elif recipe.arch == "llama":
        config = LlamaConfig(**fields)
    else:
        raise ValueError(f"arch {recipe.arch!r}: expected mistral or llama")
    config.architectures = [type(config).__name__.replace("Config", "ForCausalLM")]
    config.dtype = "float16"
    config.save_pretrained(out_dir)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=0).save_pretrained(out_dir)
    build_vocab_tokenizer(out_dir, recipe.vocab)
    tensors = _base_tensors(recipe)
    shards = _shards(tensors, recipe.shard_bytes)
    weight_map, seed = {}, recipe.seed * 1_000_003
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        first = seed
        write_safetensors(os.path.join(out_dir, file), [(name, shape) for name, shape, _, _ in shard],
                          (_draw(shape, std, first + j, mean) for j, (_, shape, mean, std) in enumerate(shard)))
        seed += len(shard)
        weight_map.update({name: file for name, *_ in shard})
    index = {"metadata": {"total_size": sum(2 * _numel(t[1]) for t in tensors)}, "weight_map": weight_map}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def _write_expert(recipe: LargeRecipe, out_dir: str, seed: int) -> None:
    """A PEFT LoRA folder: A ~ N(0, 1/in) (PEFT's kaiming scale), B ~ N(0, 0.02), so that each expert moves the
    output by a few percent."""
    os.makedirs(out_dir, exist_ok=True)
    shapes = _projection_shapes(recipe)
    tensors, stds = [], []
    for i in range(recipe.layers):
        for p in recipe.targets:
            out, inp = shapes[p]
            key = f"base_model.model.model.layers.{i}.{_module_path(p)}"
            tensors += [(f"{key}.lora_A.weight", (recipe.rank, inp)), (f"{key}.lora_B.weight", (out, recipe.rank))]
            stds += [inp ** -0.5, 0.02]
    write_safetensors(os.path.join(out_dir, "adapter_model.safetensors"), tensors,
                      (_draw(shape, std, seed * 100_003 + j) for j, ((_, shape), std) in enumerate(zip(tensors, stds))))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "base", "r": recipe.rank,
              "lora_alpha": recipe.alpha, "target_modules": list(recipe.targets), "lora_dropout": 0.0,
              "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "init_lora_weights": False, "inference_mode": True, "modules_to_save": None}
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def _write_classifier(recipe: LargeRecipe, out_dir: str) -> None:
    """The classifier's Linears (He-scaled weights so the logits keep their spread through the depth, small
    biases) under the original xlora's keys (`inner.{3i}` with ReLU and Dropout between, `last`)."""
    n_modules = recipe.layers * len(recipe.targets)
    out = len(recipe.experts) * (n_modules if recipe.layerwise_scalings else 1)
    widths = [recipe.hidden] + [recipe.xlora_size] * (recipe.xlora_depth - 1) + [out]
    tensors, stds = [], []
    for i in range(recipe.xlora_depth):
        prefix = "last" if i == recipe.xlora_depth - 1 else f"inner.{3 * i}"
        tensors += [(f"{prefix}.weight", (widths[i + 1], widths[i])), (f"{prefix}.bias", (widths[i + 1],))]
        stds += [(2.0 / widths[i]) ** 0.5, 0.02]
    write_safetensors(os.path.join(out_dir, "xlora_classifier.safetensors"), tensors,
                      (_draw(shape, std, recipe.seed * 7 + 5_000_000 + j)
                       for j, ((_, shape), std) in enumerate(zip(tensors, stds))))
    config = {"hidden_size": recipe.hidden, "base_model_id": "base", "adapters": list(recipe.experts),
              "enable_softmax": True, "enable_softmax_topk": False, "softmax_temperature": 1.0,
              "layerwise_scalings": recipe.layerwise_scalings, "top_k_lora": None, "xlora_depth": recipe.xlora_depth,
              "xlora_size": recipe.xlora_size, "enable_relu_and_dropout": True, "use_bias": True,
              "xlora_dropout_p": 0.0, "use_trainable_adapters": False, "scaling_pass_value": 0.0,
              "global_scaling_weight": 1.0}
    with open(os.path.join(out_dir, "xlora_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def build_large(recipe: LargeRecipe, out_dir: str) -> str:
    """Write the whole checkpoint folder (module docstring) into `out_dir` (replaced); returns it."""
    from xlora_export.experts import follow_umask

    shutil.rmtree(out_dir, ignore_errors=True)
    _write_base(recipe, os.path.join(out_dir, "base"))
    for i, name in enumerate(recipe.experts):
        _write_expert(recipe, os.path.join(out_dir, name), recipe.seed + 1 + i)
    _write_classifier(recipe, out_dir)
    follow_umask(out_dir)
    return out_dir
