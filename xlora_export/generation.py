"""The decoding loop of `xLoRAModel` (mixed in as `GenerationMixin`), with both KV caches.

    prefill: forward(prompt) -> cache (both passes), logits of the last token -> choose a token
    decode:  forward(token, cache) -> choose -> ... (`decode` yields every step)

`decode` is the one loop: `generate` (HF-style), the exporter's validation and `xlora-parity`
all run it. Prompts in a batch are left padded; each step appends one column of ones to the
attention mask, so positions stay `cumsum(mask) - 1`. With `freeze_scalings_after=k`, each
row's scalings are frozen at its own latest token after k decode steps (k = 0: the prompt's
last token) and the scaling pass and its cache are dropped from then on.

The mixin calls `self(...)`, i.e. `xLoRAModel.forward`; this module imports nothing of the model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from .errors import XLoraError

__all__ = ["DecodeStep", "GenerationMixin", "left_pad", "positions", "sample_next"]

_FROM_CONFIG = object()


def left_pad(prompts: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids (b, p), attention_mask (b, p)) of prompts of different lengths."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts], dtype=torch.int64)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], dtype=torch.int64)
    return ids, mask


def positions(attention_mask: torch.Tensor, new: int) -> torch.Tensor:
    """position_ids (b, new) of the last `new` columns: `cumsum(mask) - 1` clipped at 0 (left padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


def sample_next(logits: torch.Tensor, do_sample: bool, temperature: float = 1.0, top_k: int | None = None,
                top_p: float = 1.0) -> torch.Tensor:
    """Pick the next token of every row.

    Args:
        logits: (b, vocab) of the last position.
        do_sample: sample (else greedy argmax).
        temperature, top_k, top_p: HF's sampling filters (only when sampling; top_k counts tokens).
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


def _greedy(logits: torch.Tensor, step: int) -> torch.Tensor:
    return logits.argmax(-1)


@dataclass
class DecodeStep:
    """One forward of the decoding loop (step 0 is the prefill) and the tokens chosen from it."""

    step: int
    input_ids: torch.Tensor  # (b, s) fed: the prompt at step 0, then the previous tokens (all of them without cache)
    attention_mask: torch.Tensor  # (b, past + s)
    position_ids: torch.Tensor  # (b, s)
    logits: torch.Tensor  # (b, s, vocab)
    scalings: torch.Tensor  # (b, s, L, n): the classifier's (fixed ones expanded over s when frozen)
    next_tokens: torch.Tensor  # (b,) chosen from logits[:, -1]


class GenerationMixin:
    """`decode` and `generate` for `xLoRAModel` (whose `forward` `self(...)` calls)."""

    def decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
               choose: Callable[[torch.Tensor, int], torch.Tensor] = _greedy, expert_top_k: int | None = None,
               scalings: torch.Tensor | None = None, freeze_scalings_after: int | None = None,
               use_cache: bool = True) -> Iterator[DecodeStep]:
        """Run `steps` forwards (prefill + steps-1 decodes), yielding each; no gradients.

        Args:
            input_ids: (b, p) left-padded prompts.
            attention_mask: (b, p), 0 on left padding.
            steps: forwards to run (= tokens chosen); the consumer may stop early.
            choose: (logits (b, vocab) of the last position, step) -> (b,) next tokens; default greedy.
            expert_top_k: experts kept per token and module (None: the config's `top_k_lora`; 0: dense).
            scalings: (b, L, n) fixed scalings from the prefill on (the frozen path); None: per token.
            freeze_scalings_after: freeze each row's scalings after this many decode steps.
            use_cache: False feeds the whole sequence every step (the reference behaviour).
        """
        tokens, mask, new, frozen, cache = input_ids, attention_mask.long(), input_ids, scalings, None
        for step in range(steps):
            fed = new if use_cache else tokens
            pos = positions(mask, fed.shape[1])
            with torch.no_grad():
                out = self(fed, attention_mask=mask, position_ids=pos, cache=cache, scalings=frozen,
                           expert_top_k=expert_top_k, use_cache=use_cache)
            nxt = choose(out.logits[:, -1], step)
            yield DecodeStep(step, fed, mask, pos, out.logits, out.scalings, nxt)
            if frozen is None and freeze_scalings_after is not None and step == freeze_scalings_after:
                frozen = out.scalings[:, -1]  # (b, L, n): each row's latest token
            cache, new = out.cache, nxt[:, None]
            tokens = torch.cat([tokens, new], 1)
            mask = torch.cat([mask, torch.ones_like(new)], 1)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 max_new_tokens: int | None = None, max_length: int | None = None, min_new_tokens: int = 0,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                 eos_token_id: Any = _FROM_CONFIG, pad_token_id: int | None = None,
                 freeze_scalings_after: int | None = None, use_cache: bool = True, **kwargs: Any) -> torch.Tensor:
        """Generate continuations of left-padded prompts (HF's `generate`).

        Args:
            input_ids: (b, p) prompts (`inputs` is accepted too).
            attention_mask: (b, p), 0 on left padding. Default all ones.
            max_new_tokens / max_length: how many tokens to add (default 20 new tokens).
            min_new_tokens: eos is suppressed until this many tokens were generated.
            do_sample, temperature, top_k, top_p: token sampling (global torch RNG; top_k counts tokens, as in
                HF, not experts); greedy by default.
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
            eos_token_id = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        eos = [] if eos_token_id is None else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
        eos_t = torch.tensor(eos, dtype=torch.int64, device=input_ids.device)
        finished = torch.zeros(b, dtype=torch.bool, device=input_ids.device)

        def choose(logits: torch.Tensor, step: int) -> torch.Tensor:
            if step < min_new_tokens and eos:
                logits = logits.index_fill(-1, eos_t, float("-inf"))
            nxt = sample_next(logits, do_sample, temperature, top_k, top_p)
            return torch.where(finished, torch.full_like(nxt, pad), nxt)

        was_training = self.training
        self.eval()
        tokens = input_ids
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        for step in self.decode(input_ids, mask, max_new_tokens, choose, scalings=None,
                                freeze_scalings_after=freeze_scalings_after, use_cache=use_cache):
            tokens = torch.cat([tokens, step.next_tokens[:, None]], 1)
            if eos:
                finished = finished | torch.isin(step.next_tokens, eos_t)
                if bool(finished.all()):
                    break
        self.train(was_training)
        return tokens
