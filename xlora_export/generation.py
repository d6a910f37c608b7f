"""HF-style `generate` for `xLoRAModel`, with both KV caches.

    prefill: forward(prompt) -> cache (both passes), logits of the last token
    decode:  pick a token -> forward(token, cache) -> ... until max_new_tokens or every row hit eos

Prompts in a batch are left padded; each decode step appends one column of ones to the
attention mask, so positions stay `cumsum(mask) - 1`. With `freeze_scalings_after=k`, each
row's scalings are frozen at its own latest token after k decode steps (k = 0: the prompt's
last token) and the scaling pass and its cache are dropped from then on.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from .errors import XLoraError

if TYPE_CHECKING:
    from .model import xLoRAModel

__all__ = ["generate", "sample_next"]

_FROM_CONFIG = object()


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0) -> torch.Tensor:
    """Pick the next token of every row.

    Args:
        logits: (b, vocab) of the last position.
        do_sample: sample (else greedy argmax).
        temperature, top_k, top_p: HF's sampling filters (only when sampling).
    Returns:
        (b,) int64 token ids.
    """
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1).squeeze(-1)


@torch.no_grad()
def generate(model: xLoRAModel, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int = 0,
             do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
             eos_token_id: Any = _FROM_CONFIG, pad_token_id: int | None = None,
             freeze_scalings_after: int | None = None, use_cache: bool = True, **kwargs: Any) -> torch.Tensor:
    """Generate continuations of left-padded prompts.

    Args:
        input_ids: (b, p) prompts (`inputs` is accepted too).
        attention_mask: (b, p), 0 on left padding. Default all ones.
        max_new_tokens / max_length: how many tokens to add (default 20 new tokens).
        min_new_tokens: eos is suppressed until this many tokens were generated.
        do_sample, temperature, top_k, top_p: sampling (global torch RNG); greedy by default.
        eos_token_id: int or list of ints; default the base model's generation config; None: never stop.
        pad_token_id: written after a row finished (default: the first eos id, else 0).
        freeze_scalings_after: freeze each row's scalings after this many decode steps.
        use_cache: False recomputes the whole sequence every step (the reference behaviour).
    Returns:
        (b, p + new) int64: prompts followed by the generated tokens.
    """
    if input_ids is None:
        input_ids = kwargs.pop("inputs", None)
    for ignored in ("use_flash_attention_2", "return_dict_in_generate", "output_scores", "num_beams"):
        if ignored in kwargs and kwargs[ignored] not in (False, None, 1):
            raise XLoraError(f"generate: {ignored}={kwargs[ignored]!r} is not supported")
        kwargs.pop(ignored, None)
    if kwargs:
        raise XLoraError(f"generate: unknown argument(s) {sorted(kwargs)}")
    if input_ids is None or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise XLoraError("generate: input_ids must be a non-empty (batch, length) tensor")
    if freeze_scalings_after is not None and (not use_cache or freeze_scalings_after < 0):
        raise XLoraError("generate: freeze_scalings_after needs use_cache=True and a value >= 0")
    b, p = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = max_length - p if max_length is not None else 20
    if eos_token_id is _FROM_CONFIG:
        eos_token_id = getattr(getattr(model.model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    device = input_ids.device
    eos_t = torch.tensor(eos, dtype=torch.int64, device=device)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)

    was_training = model.training
    model.eval()
    tokens, mask = input_ids, attention_mask.long()
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    out = model(tokens, attention_mask=mask, use_cache=use_cache)
    frozen = out.scalings[:, -1] if freeze_scalings_after == 0 else None
    granular_steps = 0
    for step in range(max_new_tokens):
        logits = out.logits[:, -1]  # (b, vocab)
        if step < min_new_tokens and eos:
            logits = logits.index_fill(-1, eos_t, float("-inf"))
        nxt = sample_next(logits, do_sample, temperature, top_k, top_p)
        nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
        tokens = torch.cat([tokens, nxt[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        if eos:
            finished = finished | torch.isin(nxt, eos_t)
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if use_cache:
            out = model(nxt[:, None], attention_mask=mask, cache=out.cache, scalings=frozen, use_cache=True)
            if frozen is None and freeze_scalings_after is not None:
                granular_steps += 1
                if granular_steps == freeze_scalings_after:
                    frozen = out.scalings[:, -1]
        else:
            out = model(tokens, attention_mask=mask, use_cache=False)
    model.train(was_training)
    return tokens
