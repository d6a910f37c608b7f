"""Cached generation against the no-cache recompute (docs/XLORA.md, the cache semantics), and generate's options."""

from __future__ import annotations

import pytest
import torch

from helpers import left_padded, make_xlora, max_diff
from models.recipes import FAMILY_RECIPES
from xlora_export import XLoraError

PROMPTS = [[5, 17, 99, 230, 41, 8, 77], [300, 22, 9], [12, 250, 14, 140, 33]]
STEPS = 32


def recompute(model, ids, mask, steps=STEPS):
    """The reference: feed the whole sequence every step, no cache; greedy."""
    logits, scalings = [], []
    for _ in range(steps):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, use_cache=False)
        logits.append(out.logits[:, -1])
        scalings.append(out.scalings[:, -1])
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
    return ids, torch.stack(logits, 1), torch.stack(scalings, 1)


def cached(model, ids, mask, steps=STEPS, share_one_cache=False):
    """Prefill + decode with the model's cache; `share_one_cache` is the original xlora's bug."""
    logits, scalings = [], []
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        for step in range(steps):
            logits.append(out.logits[:, -1])
            scalings.append(out.scalings[:, -1])
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, nxt], 1), torch.cat([mask, torch.ones_like(nxt)], 1)
            if step == steps - 1:
                break
            cache = out.cache
            if share_one_cache:
                cache.scaling = cache.real
            out = model(nxt, attention_mask=mask, cache=cache, use_cache=True)
    return ids, torch.stack(logits, 1), torch.stack(scalings, 1)


@pytest.mark.parametrize("recipe", FAMILY_RECIPES)
def test_cached_generate_equals_recompute(recipe):
    model = make_xlora(recipe, seed=3)
    ids, mask = left_padded(PROMPTS)
    ref_ids, ref_logits, ref_scalings = recompute(model, ids, mask)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=STEPS, eos_token_id=None)
    assert torch.equal(got, ref_ids), "cached generate chose other tokens than the no-cache recompute"
    _, logits, scalings = cached(model, ids, mask)
    assert max_diff(logits, ref_logits) < 1e-4
    assert max_diff(scalings, ref_scalings) < 1e-5


def test_sharing_one_cache_between_passes_fails():
    """Negative control: the original xlora's single shared cache must not pass the parity above."""
    model = make_xlora("tiny-llama", seed=3)
    ids, mask = left_padded(PROMPTS)
    ref_ids, ref_logits, _ = recompute(model, ids, mask)
    bad_ids, bad_logits, _ = cached(model, ids, mask, share_one_cache=True)
    assert not torch.equal(bad_ids, ref_ids) or max_diff(bad_logits, ref_logits) > 1e-4
    assert max_diff(bad_logits, ref_logits) > 1e-2


def test_padded_positions_stay_finite():
    model = make_xlora("tiny-llama")
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.scalings).all()
    assert all(torch.isfinite(t).all() for kv in out.cache.real + out.cache.scaling for t in kv)


def test_cache_holds_both_passes():
    model = make_xlora("tiny-llama")
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
    cache = out.cache
    assert len(cache.real) == len(cache.scaling) == model.config.num_hidden_layers
    assert cache.get_seq_length() == ids.shape[1]
    assert cache.real[0][0].shape == (3, model.config.num_key_value_heads, ids.shape[1],
                                      model.config.hidden_size // model.config.num_attention_heads)
    assert max_diff(cache.real[0][0], cache.scaling[0][0]) > 0  # different passes, different keys
    assert cache.nbytes() == 2 * 2 * model.config.num_hidden_layers * cache.real[0][0].numel() * 4


def test_freeze_scalings_after():
    model = make_xlora("tiny-llama", seed=3)
    ids, mask = left_padded(PROMPTS)
    granular = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None)
    late = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, freeze_scalings_after=20)
    assert torch.equal(granular, late)  # frozen after the end: never frozen
    frozen = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=None, freeze_scalings_after=2)
    # Reference for k = 2: prefill and two decode steps granular, then each row's last scalings, no scaling pass.
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        toks, m = ids, mask
        for step in range(12):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            toks, m = torch.cat([toks, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            if step == 11:
                break
            fixed = out.scalings[:, -1] if step >= 2 else None
            if step == 2:
                fixed_at_2 = fixed
            out = model(nxt, attention_mask=m, cache=out.cache, scalings=fixed_at_2 if step >= 2 else None)
            if step >= 2:
                assert out.cache.scaling is None  # the scaling pass and its cache are dropped
    assert torch.equal(frozen, toks)
    assert not torch.equal(frozen, granular), "freezing the scalings changed nothing: the test is vacuous"


def test_sampling_is_reproducible_with_a_seed():
    model = make_xlora("tiny-llama")
    ids, mask = left_padded(PROMPTS)
    kwargs = dict(attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=1.5, top_p=0.9,
                  eos_token_id=None)
    torch.manual_seed(5)
    a = model.generate(ids, **kwargs)
    torch.manual_seed(5)
    b = model.generate(ids, **kwargs)
    torch.manual_seed(6)
    c = model.generate(ids, **kwargs)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_eos_stops_and_pads_and_min_new_tokens():
    model = make_xlora("tiny-llama", seed=3)
    ids, mask = left_padded(PROMPTS)
    free = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None)
    eos = int(free[0, ids.shape[1] + 1])  # row 0's second new token becomes "eos"
    stopped = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=0)
    row0 = stopped[0, ids.shape[1]:].tolist()
    assert row0[:2] == free[0, ids.shape[1]:ids.shape[1] + 2].tolist()
    assert all(t == 0 for t in row0[2:])  # padded after eos
    late = model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, eos_token_id=eos)
    assert eos not in late[:, ids.shape[1]:].tolist()[0]


def test_generate_rejects_bad_arguments():
    model = make_xlora("tiny-llama")
    ids, mask = left_padded(PROMPTS)
    with pytest.raises(XLoraError, match="unknown argument"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, nonsense=1)
    with pytest.raises(XLoraError, match="input_ids"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=2)
    with pytest.raises(XLoraError, match="freeze_scalings_after"):
        model.generate(ids, max_new_tokens=2, use_cache=False, freeze_scalings_after=1)
