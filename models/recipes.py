"""Deterministic recipes for tiny X-LoRA checkpoints (seconds on a CPU, no downloads).

    python -m models.recipes                 # the default model: models/built/tiny-llama
    python -m models.recipes --all           # every recipe built in seconds (one per family, the trained, the 32M)
    python -m models.recipes xlora-demo      # the trained demo (models/demo.py; minutes): models/built/xlora-demo
    python -m models.recipes tinyllama-1.1b  # TinyLlama-1.1B's shape, 4.4 GB (the export benchmark's; a minute or two)
    python -m models.recipes mistral-7b-xlora  # Mistral-7B, nine experts, 15.3 GB in fp16 (models/large.py)

A built checkpoint folder holds (this project's format):
    base/                 the base causal LM (transformers) and its tokenizer (made with `tokenizers`)
    <expert>/             one PEFT LoRA folder per expert (random weights, `init_lora_weights=False`)
    xlora_config.json     base_model_id = "base" (relative to the checkpoint)
    xlora_classifier.safetensors, xlora_ordering.json
"""

from __future__ import annotations

import argparse
import os
import shutil
import warnings
from dataclasses import dataclass, field

import torch

from models.demo import DemoRecipe, build_demo
from models.large import LargeRecipe, build_large
from models.related import RelatedRecipe, build_related

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "built")

# A small corpus for the tokenizer: enough text that byte-level BPE learns a few hundred merges.
_WORDS = ("the model mixes low rank experts per token with a small classifier that reads the hidden state "
          "of a first pass and gates every adapter in the second pass protein design mechanics code math "
          "chat story question answer export graph runtime cache key value attention layer norm rotary "
          "position embedding softmax temperature top expert scaling weight training loss gradient batch").split()


def _corpus() -> list[str]:
    g = torch.Generator().manual_seed(0)
    lines = []
    for _ in range(400):
        idx = torch.randint(0, len(_WORDS), (12,), generator=g).tolist()
        lines.append(" ".join(_WORDS[i] for i in idx) + ".")
    return lines


def build_tokenizer(out_dir: str, vocab_size: int) -> int:
    """Train a byte-level BPE tokenizer and save it as a transformers fast tokenizer; return its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   padding_side="left")
    fast.save_pretrained(out_dir)
    return tok.get_vocab_size()


@dataclass
class ExpertSpec:
    name: str
    r: int
    alpha: float
    targets: list[str]
    rslora: bool = False


ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


@dataclass
class Recipe:
    """Sizes and experts of one tiny X-LoRA model."""

    arch: str = "llama"  # a key of ARCHS
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 176  # differs from the vocab size on purpose
    vocab: int = 384
    max_positions: int = 256
    tie_embeddings: bool = False
    sliding_window: int | None = None  # shorter than the tests' prompts where set, so the window matters
    config: dict = field(default_factory=dict)  # further HF config fields of the family (soft caps, head_dim...)
    experts: list[ExpertSpec] = field(default_factory=lambda: [
        ExpertSpec("alpha", 4, 16, ["q_proj", "v_proj"]),
        ExpertSpec("beta", 8, 16, ATTN),
        ExpertSpec("gamma", 6, 12, [*MLP, "q_proj"], rslora=True),
    ])
    xlora_depth: int = 2
    xlora_size: int = 32
    layerwise_scalings: bool = True
    classifier_std: float = 0.2  # larger than nn.Linear's init so scalings differ between tokens
    randomize_norms: bool = True  # norm weights and Linear biases random (a fresh init has 1s and 0s: blind tests)
    train_steps: int = 0  # > 0: train the base on the tokenizer corpus, so its logits are clearly peaked
    seed: int = 0


def _config_classes() -> dict[str, type]:
    from transformers import (
        Gemma2Config,
        Gemma3TextConfig,
        LlamaConfig,
        MistralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    return {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config,
            "gemma2": Gemma2Config, "gemma3": Gemma3TextConfig, "phi3": Phi3Config}


def base_config(recipe: Recipe, vocab: int):
    """The transformers config of the recipe's base model."""
    classes = _config_classes()
    if recipe.arch not in classes:
        raise ValueError(f"unknown recipe arch {recipe.arch!r}; known: {', '.join(classes)}")
    fields = dict(hidden_size=recipe.hidden, num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads,
                  num_key_value_heads=recipe.kv_heads, intermediate_size=recipe.intermediate, vocab_size=vocab,
                  max_position_embeddings=recipe.max_positions, tie_word_embeddings=recipe.tie_embeddings,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if recipe.arch != "llama":
        fields["sliding_window"] = recipe.sliding_window
    fields.update(recipe.config)
    return classes[recipe.arch](**fields)


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Random norm weights (around the init) and Linear biases, so that a swapped norm or a dropped bias
    changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower():
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
            elif name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def build_base(recipe: Recipe, out_dir: str) -> str:
    """Random base model + tokenizer in `out_dir`; returns the folder."""
    from transformers import AutoModelForCausalLM

    os.makedirs(out_dir, exist_ok=True)
    vocab = max(recipe.vocab, build_tokenizer(out_dir, recipe.vocab))  # a larger embedding than the tokenizer
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(base_config(recipe, vocab))
    if recipe.randomize_norms:
        _randomize_norms(model, recipe.seed + 50)
    if recipe.train_steps:
        _train_on_corpus(model, out_dir, recipe.train_steps)
    model.save_pretrained(out_dir)
    return out_dir


def _train_on_corpus(model: torch.nn.Module, tokenizer_dir: str, steps: int) -> None:
    """A few hundred AdamW steps of next-token prediction on a repeated word cycle (seconds on a CPU):
    random tiny models are near ties between tokens; this one has clearly peaked logits."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = torch.tensor(tokenizer(" ".join(_WORDS * 40))["input_ids"])  # a cycle: every next token is predictable
    block, batch = 32, 16
    g = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - block, (batch,), generator=g)
        x = torch.stack([ids[s:s + block] for s in starts.tolist()])
        loss = model(input_ids=x, labels=x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def build_expert(base_dir: str, spec: ExpertSpec, out_dir: str, seed: int) -> str:
    """A random LoRA expert (PEFT format) for the base model in `base_dir`."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=spec.r, lora_alpha=spec.alpha, target_modules=spec.targets, use_rslora=spec.rslora,
                     lora_dropout=0.0, init_lora_weights=False, task_type="CAUSAL_LM")
    get_peft_model(base, cfg).save_pretrained(out_dir)
    return out_dir


def build(recipe: Recipe | DemoRecipe | LargeRecipe, out_dir: str) -> str:
    """Build the whole checkpoint folder (see the module docstring; a `DemoRecipe` is trained by
    `models/demo.py`, a `LargeRecipe` written in fp16 by `models/large.py`); returns it."""
    from transformers import AutoModelForCausalLM

    import xlora_export as xlora
    from xlora_export.experts import follow_umask

    if isinstance(recipe, RelatedRecipe):
        return build_related(recipe, out_dir)
    if isinstance(recipe, DemoRecipe):
        return build_demo(recipe, out_dir)
    if isinstance(recipe, LargeRecipe):
        return build_large(recipe, out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    base_dir = build_base(recipe, os.path.join(out_dir, "base"))
    staging = os.path.join(out_dir, ".experts")
    adapters = {s.name: build_expert(base_dir, s, os.path.join(staging, s.name), recipe.seed + 1 + i)
                for i, s in enumerate(recipe.experts)}
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = xlora.xLoRAConfig(recipe.hidden, base_model_id="base", adapters=adapters,
                               xlora_depth=recipe.xlora_depth, xlora_size=recipe.xlora_size,
                               layerwise_scalings=recipe.layerwise_scalings, xlora_dropout_p=0.0)
    xmodel = xlora.add_xlora_to_model(model, config)
    torch.manual_seed(recipe.seed + 100)
    with torch.no_grad():
        for p in xmodel.internal_xlora_classifier.parameters():
            p.normal_(0.0, recipe.classifier_std)
    xmodel.save_pretrained(out_dir)
    shutil.rmtree(staging)
    follow_umask(out_dir)  # the base model's safetensors are written 0600 (safetensors >= 0.8)
    return out_dir


PHI3_EXPERTS = [
    ExpertSpec("alpha", 4, 16, ["qkv_proj"]),
    ExpertSpec("beta", 8, 16, ["qkv_proj", "o_proj", "gate_up_proj"]),
    ExpertSpec("gamma", 6, 12, ["gate_up_proj", "down_proj"], rslora=True),
]
RECIPES = {
    "tiny-llama": Recipe(arch="llama"),
    # zephyr-7b-beta's attention (Mistral with sliding_window on every layer), the window shorter than prompts
    "tiny-mistral": Recipe(arch="mistral", seed=1, sliding_window=6),
    # Qwen2 with q/k/v biases; use_sliding_window from layer max_window_layers=1 on (layer 0 full, layer 1 window 5)
    "tiny-qwen2": Recipe(arch="qwen2", seed=2, sliding_window=5,
                         config=dict(use_sliding_window=True, max_window_layers=1)),
    # Qwen3: q_norm/k_norm, head_dim (24) not hidden/heads, tied embeddings
    "tiny-qwen3": Recipe(arch="qwen3", seed=5, tie_embeddings=True, config=dict(head_dim=24)),
    # Gemma 2: (1+w) norms, four per block, scaled embedding, query_pre_attn_scalar, both soft caps (small enough
    # to bite on a tiny model), alternating sliding (window 4) / full layers, attention biases, tied embeddings
    "tiny-gemma2": Recipe(arch="gemma2", seed=6, layers=3, tie_embeddings=True, sliding_window=4,
                          config=dict(head_dim=16, query_pre_attn_scalar=24, attn_logit_softcapping=1.0,
                                      final_logit_softcapping=2.0, attention_bias=True)),
    # Gemma 3 text: gemma2's norms + q_norm/k_norm, RoPE per layer type, sliding window 4 on layers 0 and 1
    "tiny-gemma3": Recipe(arch="gemma3", seed=7, layers=3, tie_embeddings=True, sliding_window=4,
                          config=dict(head_dim=16, query_pre_attn_scalar=16,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
    # Phi-3: fused qkv_proj and gate_up_proj (experts target the fused modules), partial RoPE, window 6
    "tiny-phi3": Recipe(arch="phi3", seed=8, sliding_window=6, config=dict(partial_rotary_factor=0.5),
                        experts=PHI3_EXPERTS),
    # A trained base with gentler experts: clearly peaked logits, for greedy agreement of fp16 exports.
    "tiny-llama-trained": Recipe(arch="llama", seed=3, train_steps=200, experts=[
        ExpertSpec("alpha", 4, 2, ["q_proj", "v_proj"]),
        ExpertSpec("beta", 8, 2, ATTN),
        ExpertSpec("gamma", 6, 1.5, [*MLP, "q_proj"], rslora=True)]),
    # About 32M parameters (the size of the project's speed calibration), for benchmarks/: the vocabulary is padded
    # to 8192 rows beyond the tokenizer's few hundred tokens so that embedding and lm_head weigh what they would.
    "llama-32m": Recipe(arch="llama", hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1408, vocab=8192,
                        max_positions=512, tie_embeddings=False, seed=4, experts=[
                            ExpertSpec(name, 16, 16, ATTN + MLP) for name in ("code", "math", "chat", "story")]),
    # TinyLlama-1.1B's shape (random weights, 4.4 GB in fp32), for the export-at-scale benchmark; never built by the
    # tests. The vocabulary is the tokenizer's few hundred tokens padded to 32000 rows.
    "tinyllama-1.1b": Recipe(arch="llama", hidden=2048, layers=22, heads=32, kv_heads=4, intermediate=5632,
                             vocab=32000, max_positions=2048, seed=9, xlora_size=2048, classifier_std=0.02, experts=[
                                 ExpertSpec(name, 16, 16, ATTN + MLP) for name in ("code", "math", "chat")]),
    # The trained demo: experts that each know one task and a classifier that routes to them (models/demo.py,
    # minutes on a CPU). Its build is committed as models/xlora-demo (`python -m models.recipes xlora-demo --out
    # models` rebuilds it there).
    "xlora-demo": DemoRecipe(),
    # The demo's tasks on a base pretrained on their answered lines too, experts fine-tuned from it (models/related.py,
    # minutes): the base model's next token is usually X-LoRA's, as for experts adapting a trained base.
    "xlora-related": RelatedRecipe(),
    # Mistral-7B's shape (zephyr-7b-beta's, the original X-LoRA model) with nine rank-16 experts on every projection
    # and the original classifier (depth 8, width 2048): 15.3 GB in fp16, written by models/large.py; benchmarks only.
    "mistral-7b-xlora": LargeRecipe(),
}
# Minutes or gigabytes to build: only when named (the demo's build is committed as models/xlora-demo).
SLOW_RECIPES = ("tinyllama-1.1b", "xlora-demo", "xlora-related", "mistral-7b-xlora")
# The families the parity tests cover, one recipe each (hidden cases add other sizes and configurations).
FAMILY_RECIPES = ("tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma2", "tiny-gemma3", "tiny-phi3")
DEFAULT = "tiny-llama"


def build_parser() -> argparse.ArgumentParser:
    """The options of `python -m models.recipes`."""
    parser = argparse.ArgumentParser(prog="python -m models.recipes",
                                     description="Build the tiny X-LoRA checkpoints of models/.")
    parser.add_argument("names", nargs="*", default=[DEFAULT], help=f"recipes to build (default {DEFAULT}); "
                        f"known: {', '.join(RECIPES)}")
    parser.add_argument("--all", action="store_true", help="build every recipe built in seconds (not "
                        f"{' or '.join(SLOW_RECIPES)}: name them)")
    parser.add_argument("--out", default=ROOT, help="parent folder (default models/built)")
    return parser


def _check_names(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in args.names:
        if name not in RECIPES:
            parser.error(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")


def _build(args: argparse.Namespace) -> int:
    import transformers

    from xlora_export import XLoraError

    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices
    names = [n for n in RECIPES if n not in SLOW_RECIPES] if args.all else args.names
    for name in names:
        out_dir = os.path.join(args.out, name)
        try:
            path = build(RECIPES[name], out_dir)
        except OSError as e:
            raise XLoraError(f"--out {args.out}: cannot write {out_dir} ({e.strerror or e})") from None
        print(f"built {name}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Build the named recipes; returns the exit code (0 ok, 1 a folder that cannot be written, 2 usage error,
    130 interrupted)."""
    from xlora_runtime.commands import run

    return run("python -m models.recipes", build_parser, _build, argv, check=_check_names)


if __name__ == "__main__":
    raise SystemExit(main())
