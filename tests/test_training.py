"""Training: the LM loss of the real pass trains the classifier; the experts only with
`use_trainable_adapters`; the base never; and the scaling pass carries no gradient.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from helpers import make_xlora, max_diff
from xlora_export.classifier import top_k_gates
from xlora_export.decoder import attention_masks, decoder_pass, lm_logits
from xlora_export.lora import column_gates

STEPS = 20


def batch(b: int = 4, s: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 300, (b, s), generator=torch.Generator().manual_seed(seed))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def changed(before: dict[str, torch.Tensor], model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if not torch.equal(before[name], p.detach())}


def kind(name: str) -> str:
    if name.startswith("internal_xlora_classifier."):
        return "classifier"
    if name.endswith(".lora_A") or name.endswith(".lora_B"):
        return "lora"
    return "base"


def names_of(model: torch.nn.Module, k: str) -> set[str]:
    return {name for name, _ in model.named_parameters() if kind(name) == k}


@torch.no_grad()
def eval_loss(model, ids: torch.Tensor) -> float:
    was = model.training
    model.eval()
    loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was)
    return loss


def plain_loop(model, ids: torch.Tensor, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(STEPS):
        out = model(input_ids=ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


def test_model_parameter_groups_are_as_expected():
    model = make_xlora("tiny-llama")
    assert names_of(model, "classifier") and names_of(model, "lora") and names_of(model, "base")
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == names_of(model, "classifier")
    model.set_use_trainable_adapters(True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == names_of(model, "classifier") | names_of(model, "lora")


def test_plain_loop_trains_only_the_classifier():
    model = make_xlora("tiny-llama")
    ids = batch()
    before, initial = snapshot(model), eval_loss(model, ids)
    losses = plain_loop(model, ids)
    final = eval_loss(model, ids)
    assert losses[0] == pytest.approx(initial, abs=1e-5)  # no dropout: train and eval losses agree
    assert final < initial - 0.1, f"loss {initial:.4f} -> {final:.4f}"
    moved = changed(before, model)
    assert moved == names_of(model, "classifier"), (
        f"unexpected: {sorted(moved - names_of(model, 'classifier'))}, "
        f"unchanged classifier: {sorted(names_of(model, 'classifier') - moved)}")


def test_trainable_adapters_train_the_experts_too():
    model = make_xlora("tiny-llama")
    model.set_use_trainable_adapters(True)
    ids = batch()
    before, initial = snapshot(model), eval_loss(model, ids)
    plain_loop(model, ids)
    final = eval_loss(model, ids)
    assert final < initial - 0.1, f"loss {initial:.4f} -> {final:.4f}"
    moved = changed(before, model)
    assert moved == names_of(model, "classifier") | names_of(model, "lora"), (
        f"base changed: {sorted(moved & names_of(model, 'base'))}, "
        f"unchanged: {sorted((names_of(model, 'classifier') | names_of(model, 'lora')) - moved)}")
    # the trained experts are what experts() reports (and what save_pretrained writes)
    layer = model.lora_layers()[0]
    a, b = layer.expert_weights()[layer.expert_names[0]]
    expert = next(e for e in model.experts() if e.name == layer.expert_names[0])
    assert torch.equal(expert.weights[layer.module_name][0], a)
    assert torch.equal(expert.weights[layer.module_name][1], b)


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


def test_hf_trainer_trains_the_classifier(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = make_xlora("tiny-llama")
    ids = batch(4, 12)
    before, initial = snapshot(model), eval_loss(model, ids)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", logging_steps=5, use_cpu=True,
                             seed=0, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=_Dataset(ids)).train()
    assert result.global_step == STEPS
    final = eval_loss(model, ids)
    assert final < initial - 0.1, f"loss {initial:.4f} -> {final:.4f}"
    moved = changed(before, model)
    assert moved == names_of(model, "classifier"), (
        f"unexpected: {sorted(moved - names_of(model, 'classifier'))}, "
        f"unchanged classifier: {sorted(names_of(model, 'classifier') - moved)}")


# ----------------------------------------------------------------------------- the scaling pass carries no gradient
def manual_grads(model, ids: torch.Tensor, scaling_pass_graph: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and gradients of the two-pass forward written out here, with or without the scaling pass's graph."""
    model.zero_grad(set_to_none=True)
    b, s = ids.shape
    mask = torch.ones(b, s, dtype=torch.int64)
    pos = torch.arange(s).expand(b, s)
    masks = attention_masks(mask, s, model.spec.windows)
    g = model.xlora_config.global_scaling_weight
    value = model.xlora_config.scaling_pass_value
    layers = model.lora_layers()
    with contextlib.nullcontext() if scaling_pass_graph else torch.no_grad():
        hidden, _ = decoder_pass(model.model, model.spec, ids, pos, masks, None,
                                 column_gates(layers, None if value == 0 else float(value), g))
    scalings = model.internal_xlora_classifier(hidden)
    gates = top_k_gates(scalings, model.xlora_config.top_k_lora, model.xlora_config.enable_softmax_topk)
    h, _ = decoder_pass(model.model, model.spec, ids, pos, masks, None, column_gates(layers, gates, g))
    logits = lm_logits(model.model, model.spec, h)
    loss = model.model.loss_function(logits=logits, labels=ids, vocab_size=logits.shape[-1])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.item(), grads


def model_grads(model, ids: torch.Tensor) -> tuple[float, dict[str, torch.Tensor], torch.Tensor]:
    """Loss and gradients of `model.forward`, and the hidden state the classifier received."""
    model.zero_grad(set_to_none=True)
    seen = []
    handle = model.internal_xlora_classifier.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    try:
        loss = model(input_ids=ids, labels=ids).loss
    finally:
        handle.remove()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    (hidden,) = seen
    return loss.item(), grads, hidden


def assert_grads_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], other: dict[str, torch.Tensor],
                       names: set[str]) -> None:
    """`got` equals `want` (scaling pass detached) and differs clearly from `other` (scaling pass in the graph)."""
    assert set(got) == set(want)
    for n in sorted(names):
        diff, scale = max_diff(got[n], want[n]), want[n].abs().max().item()
        assert diff <= 1e-5 * max(scale, 1.0), f"{n}: gradient differs from the detached reference by {diff:.3g}"
    gap = max(max_diff(want[n], other[n]) / max(want[n].abs().max().item(), 1e-12) for n in names)
    assert gap > 1e-3, "the scaling pass's graph does not change these gradients: the check cannot discriminate"


def test_scaling_pass_without_gradient_default_config():
    """Scaling pass value 0 (the base model): with the embedding made trainable, its gradient comes from the
    real pass only; keeping the scaling pass's graph would add a path through the classifier."""
    model = make_xlora("tiny-llama")
    model.train()
    embed = model.model.model.embed_tokens.weight
    embed.requires_grad_(True)
    try:
        ids = batch(2, 8)
        loss, got, hidden = model_grads(model, ids)
        ref_loss, want = manual_grads(model, ids, scaling_pass_graph=False)
        _, other = manual_grads(model, ids, scaling_pass_graph=True)
    finally:
        embed.requires_grad_(False)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    name = "model.model.embed_tokens.weight"
    assert set(got) == {name} | names_of(model, "classifier")  # nothing else of the base gets a gradient
    assert_grads_match(got, want, other, {name} | names_of(model, "classifier"))
    assert not hidden.requires_grad and hidden.grad_fn is None  # the classifier's input has no graph


def test_scaling_pass_without_gradient_trainable_adapters():
    """With trainable experts and scaling_pass_value=0.5 the experts take part in the scaling pass too; their
    gradient must come from the real pass only."""
    model = make_xlora("tiny-llama", scaling_pass_value=0.5)
    model.set_use_trainable_adapters(True)
    model.train()
    ids = batch(2, 8)
    loss, got, hidden = model_grads(model, ids)
    ref_loss, want = manual_grads(model, ids, scaling_pass_graph=False)
    _, other = manual_grads(model, ids, scaling_pass_graph=True)
    assert loss == pytest.approx(ref_loss, abs=1e-6)
    assert set(got) == names_of(model, "classifier") | names_of(model, "lora")  # base params: grad None
    assert_grads_match(got, want, other, names_of(model, "lora"))
    assert not hidden.requires_grad and hidden.grad_fn is None  # the classifier's input has no graph


def _trainer_step(model, tmp_path, ids: torch.Tensor, batch_size: int, accumulation: int):
    """One optimizer step of plain SGD (no clipping) over all of `ids`; returns the trainer's log history."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, learning_rate=0.5, optim="sgd",
                             max_grad_norm=0.0, lr_scheduler_type="constant", report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=_Dataset(ids)).train()
    model.eval()


def test_hf_trainer_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Two micro-batches of 1 with gradient_accumulation_steps=2 make the same SGD step as one batch of 2
    (equal lengths, no padding, so the token-mean loss is the same). The Trainer sees `**kwargs` in `forward`,
    passes `num_items_in_batch` and then skips its own division by the accumulation steps: the model must use
    that count (or not advertise loss kwargs), else the accumulated gradient is too large."""
    ids = batch(2, 12, seed=5)
    deltas = []
    for bs, acc in ((2, 1), (1, 2)):
        model = make_xlora("tiny-llama")
        before = snapshot(model)
        _trainer_step(model, tmp_path / f"bs{bs}", ids, bs, acc)
        deltas.append({n: p.detach() - before[n] for n, p in model.named_parameters() if kind(n) == "classifier"})
    for n in deltas[0]:
        ratio = deltas[1][n].norm().item() / deltas[0][n].norm().item()
        assert ratio == pytest.approx(1.0, rel=1e-3), (
            f"{n}: the accumulated step is {ratio:.3f}x the one-batch step")


# ----------------------------------------------------------------------------- experts trained with known routing
def test_per_token_scalings_give_the_two_pass_forward_and_train_only_the_experts():
    """`forward(scalings=(b, s, L, n))` runs the real pass with each token's given scalings (no scaling pass): fed
    the classifier's own scalings it gives the two-pass logits; with trainable adapters its loss trains the
    experts (and not the classifier, which it does not run)."""
    model = make_xlora(use_trainable_adapters=True)
    ids = batch()
    model.eval()
    with torch.no_grad():
        two_pass = model(input_ids=ids)
        given = model(input_ids=ids, scalings=two_pass.scalings)
    assert max_diff(given.logits, two_pass.logits) < 1e-6
    routes = torch.nn.functional.one_hot(torch.randint(0, 3, ids.shape), 3).float()  # (b, s, n): one expert a token
    routed = routes.unsqueeze(2).expand(*ids.shape, len(model.module_names), 3)
    model.train()
    before = snapshot(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids, scalings=routed).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert {kind(name) for name in changed(before, model)} == {"lora"}
