"""Checkpoints: this project's save/load round trip, original-xlora fixtures written by an independent
writer, PEFT X-LoRA checkpoints written by PEFT itself, and the one-line errors of bad inputs.

Covered: the orderings of experts and modules, setters reflected in what is saved, the formats read, and parity
with PEFT's XLoraModel.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
import transformers.modeling_utils as loader
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import xlora_export
from helpers import built, expert_paths, load_base, make_xlora, max_diff, peft_oracle
from xlora_export import XLoraError
from xlora_export.xlora_utils import load_base_model

RECIPE = "tiny-llama"
# The original xlora's xlora_config.json keys (xLoRAConfig fields minus `device`).
ORIGINAL_KEYS = ["hidden_size", "base_model_id", "adapters", "enable_softmax", "enable_softmax_topk",
                 "layerwise_scalings", "xlora_depth", "xlora_size", "enable_relu_and_dropout", "use_bias",
                 "xlora_dropout_p", "use_trainable_adapters", "softmax_temperature", "top_k_lora",
                 "scaling_pass_value", "global_scaling_weight"]
PEFT_PREFIX = "base_model.internal_xlora_classifier."
TOL = 1e-5


# ----------------------------------------------------------------------------- independent helpers
def _ids(vocab: int, seed: int = 11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (2, 9), generator=g)


def _expert_configs() -> dict[str, dict]:
    out = {}
    for name, path in expert_paths(RECIPE).items():
        with open(os.path.join(path, "adapter_config.json")) as f:
            out[name] = json.load(f)
    return out


def _expected_module_order(base: nn.Module) -> list[str]:
    """Every Linear targeted by at least one expert, in `named_modules()` order (the module ordering)."""
    targets = set()
    for cfg in _expert_configs().values():
        targets.update(cfg["target_modules"])
    return [name for name, m in base.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] in targets]


def _json_strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _json_strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _json_strings(v)


def _classifier_linears(model) -> list[nn.Linear]:
    """The loaded classifier's Linears in registration (= data-flow) order, found without its helpers."""
    return [m for m in model.internal_xlora_classifier.modules() if isinstance(m, nn.Linear)]


def _manual_scalings(name: str, ids: torch.Tensor, linears, relu: bool, layerwise: bool, n_modules: int,
                     n_experts: int, temperature: float = 1.0) -> torch.Tensor:
    """Scalings computed from scratch: scaling pass value 0 = the bare base model's last hidden state,
    then the written Linears (ReLU between them iff `relu`), then softmax over experts."""
    base = load_base(name)
    with torch.no_grad():
        x = base(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        for i, (w, b) in enumerate(linears):
            x = x @ w.T + (b if b is not None else 0.0)
            if relu and i < len(linears) - 1:
                x = torch.relu(x)
    bsz, s = ids.shape
    if layerwise:
        x = x.reshape(bsz, s, n_modules, n_experts)
    else:
        x = x.unsqueeze(2).expand(bsz, s, n_modules, n_experts)
    return torch.softmax(x / temperature, dim=-1)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, f"expected a one-line message, got {msg!r}"
    return msg


# ----------------------------------------------------------------------------- 1. round trip
@pytest.mark.parametrize("case", ["plain", "setters", "softmaxtopk-dense"])
def test_save_load_round_trip(tmp_path, case):
    if case == "plain":
        model = make_xlora(RECIPE, seed=3, xlora_depth=2, layerwise_scalings=True)
    elif case == "softmaxtopk-dense":  # set_topk_lora(None) on a softmax-topk model saves a config that loads
        model = make_xlora(RECIPE, seed=5, top_k_lora=1, enable_softmax_topk=True, enable_softmax=False)
        model.set_topk_lora(None)
    else:
        model = make_xlora(RECIPE, seed=4, xlora_depth=3, layerwise_scalings=False)
        model.set_topk_lora(2)
        model.set_global_scaling_weight(1.5)
        model.set_scaling_pass_value(None)
        model.set_use_trainable_adapters(True)
        with torch.no_grad():  # "train" an expert in memory: the save must write the in-memory weights
            model.lora_layers()[0].lora_A.add_(0.25)
    model.xlora_config.base_model_id = "org/tiny-llama-base"  # a hub id: nothing machine-specific to save
    ids = _ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids, use_cache=False)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)

    # xlora_config.json: the original key set, adapters a list of names, no absolute paths anywhere
    with open(ckpt / "xlora_config.json") as f:
        text = f.read()
    record = json.loads(text)
    assert sorted(record) == sorted(ORIGINAL_KEYS)
    assert record["adapters"] == ["alpha", "beta", "gamma"]
    for s in _json_strings(record):
        assert not os.path.isabs(s), f"absolute path {s!r} in xlora_config.json"
    assert str(tmp_path) not in text and os.path.abspath(built(RECIPE)) not in text
    assert os.path.realpath(built(RECIPE)) not in text
    if case == "setters":
        assert record["top_k_lora"] == 2
        assert record["global_scaling_weight"] == 1.5
        assert record["scaling_pass_value"] is None or record["scaling_pass_value"] == pytest.approx(1 / 3)
        assert record["use_trainable_adapters"] is True
        assert record["xlora_depth"] == 3 and record["layerwise_scalings"] is False
    if case == "softmaxtopk-dense":
        assert record["top_k_lora"] is None and record["enable_softmax_topk"] is True

    # one PEFT LoRA folder per expert, named as the adapter
    originals = expert_paths(RECIPE)
    for name in ["alpha", "beta", "gamma"]:
        folder = ckpt / name
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        with open(folder / "adapter_config.json") as f:
            cfg = json.load(f)
        src_cfg = _expert_configs()[name]
        for key in ("r", "lora_alpha", "use_rslora"):
            assert cfg[key] == src_cfg[key]
        assert sorted(cfg["target_modules"]) == sorted(src_cfg["target_modules"])
        saved = load_file(str(folder / "adapter_model.safetensors"))
        source = load_file(os.path.join(originals[name], "adapter_model.safetensors"))
        assert sorted(saved) == sorted(source)
        if case == "plain":
            assert all(torch.equal(saved[k], source[k]) for k in source)

    # orderings: module name -> index, adapter name -> index
    with open(ckpt / "xlora_ordering.json") as f:
        ordering = json.load(f)
    expected_modules = _expected_module_order(load_base(RECIPE))
    assert len(expected_modules) == 14
    assert ordering["modules"] == {n: i for i, n in enumerate(expected_modules)}
    assert ordering["adapters"] == {"alpha": 0, "beta": 1, "gamma": 2}

    loaded = xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))
    with torch.no_grad():
        after = loaded(ids, use_cache=False)
    assert torch.equal(before.logits, after.logits)
    assert torch.equal(before.scalings, after.scalings)
    assert loaded.adapter_names == ["alpha", "beta", "gamma"]
    assert loaded.module_names == expected_modules
    if case == "setters":
        c = loaded.xlora_config
        assert c.top_k_lora == 2 and loaded.get_topk_lora() == 2
        assert c.global_scaling_weight == 1.5 and loaded.get_global_scaling_weight() == 1.5
        assert c.scaling_pass_value is None or c.scaling_pass_value == pytest.approx(1 / 3)
        assert c.use_trainable_adapters is True and loaded.get_use_trainable_adapters() is True
        assert all(layer.lora_A.requires_grad for layer in loaded.lora_layers())
        assert loaded.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()
        # the trained expert weights made it into the checkpoint: the logits differ from the untrained experts'
        fresh = xlora_export.from_pretrained(str(ckpt), load_base(RECIPE), adapters=originals)
        with torch.no_grad():
            untrained = fresh(ids, use_cache=False).logits
        assert max_diff(untrained, after.logits) > 1e-3
    if case == "softmaxtopk-dense":
        assert loaded.get_topk_lora() is None and loaded.xlora_config.enable_softmax_topk is True


# ----------------------------------------------------------------------------- 2. original-format fixtures
def _classifier_keys(depth: int, relu: bool) -> list[str]:
    """Original xlora state-dict prefixes of the Linears, in data-flow order."""
    step = 3 if relu else 1
    return [f"inner.{step * i}" for i in range(depth - 1)] + ["last"]


def write_original(directory, *, adapters, depth: int, size: int, relu: bool, use_bias: bool, layerwise: bool,
                   dropout_p: float = 0.0, stray_stop_token: bool = False, pt: bool = False, seed: int = 0,
                   expert_dirs: dict[str, str] | None = None, extra_fields: dict | None = None):
    """A checkpoint as the original xlora's save_pretrained writes it, from scratch.

    Returns the Linears as (weight, bias | None) in data-flow order.
    """
    os.makedirs(directory, exist_ok=True)
    base_cfg = load_base(RECIPE).config
    hidden = base_cfg.hidden_size
    names = list(adapters) if isinstance(adapters, list) else list(adapters.keys())
    targets = set()
    for cfg in _expert_configs().values():
        targets.update(cfg["target_modules"])
    n_modules = base_cfg.num_hidden_layers * len(targets)
    n_out = n_modules * len(names) if layerwise else len(names)
    g = torch.Generator().manual_seed(seed)
    widths = [hidden] + [size] * (depth - 1) + [n_out]
    linears, state = [], {}
    for key, (fan_in, fan_out) in zip(_classifier_keys(depth, relu), zip(widths[:-1], widths[1:])):
        w = torch.randn(fan_out, fan_in, generator=g) * 0.3
        b = torch.randn(fan_out, generator=g) * 0.3 if use_bias else None
        state[f"{key}.weight"] = w
        if b is not None:
            state[f"{key}.bias"] = b
        linears.append((w, b))
    if pt:
        torch.save(state, os.path.join(directory, "xlora_classifier.pt"))
    else:
        save_file(state, os.path.join(directory, "xlora_classifier.safetensors"))
    conf = {"hidden_size": hidden, "base_model_id": "org/some-base", "adapters": adapters,
            "enable_softmax": True, "enable_softmax_topk": False, "layerwise_scalings": layerwise,
            "xlora_depth": depth, "xlora_size": size, "enable_relu_and_dropout": relu, "use_bias": use_bias,
            "xlora_dropout_p": dropout_p, "use_trainable_adapters": False, "softmax_temperature": 1.0,
            "top_k_lora": None, "scaling_pass_value": 0.0, "global_scaling_weight": 1.0}
    assert list(conf) == ORIGINAL_KEYS
    if stray_stop_token:
        conf["stop_token_id"] = None
    conf.update(extra_fields or {})
    with open(os.path.join(directory, "xlora_config.json"), "w") as f:
        json.dump(conf, f)  # the original: no indent
    sources = expert_paths(RECIPE)
    if expert_dirs is None:
        expert_dirs = {n: n for n in names}
    for name in names:
        shutil.copytree(sources[name], os.path.join(directory, expert_dirs[name]))
    return linears


ORIGINAL_CASES = [
    # id, writer kwargs, oracle-comparable (PEFT always has ReLU and biases)
    ("list-depth3-relu-stoptoken", dict(adapters=["alpha", "beta", "gamma"], depth=3, size=24, relu=True,
                                        use_bias=True, layerwise=True, dropout_p=0.2, stray_stop_token=True), True),
    ("dict-relative-reordered-depth1", dict(adapters={"gamma": "experts/g", "alpha": "experts/a",
                                                      "beta": "experts/b"},
                                            expert_dirs={"gamma": "experts/g", "alpha": "experts/a",
                                                         "beta": "experts/b"},
                                            depth=1, size=16, relu=True, use_bias=True, layerwise=False), True),
    ("dict-depth2-relu-shared", dict(adapters={"alpha": "alpha", "beta": "beta", "gamma": "gamma"}, depth=2,
                                     size=20, relu=True, use_bias=True, layerwise=False), True),
    ("pt-classifier-depth2", dict(adapters=["alpha", "beta", "gamma"], depth=2, size=16, relu=True, use_bias=True,
                                  layerwise=True, pt=True), True),
    ("depth3-no-relu", dict(adapters=["alpha", "beta", "gamma"], depth=3, size=16, relu=False, use_bias=True,
                            layerwise=True), False),
    ("depth2-no-bias", dict(adapters=["alpha", "beta", "gamma"], depth=2, size=16, relu=True, use_bias=False,
                            layerwise=True), False),
]


@pytest.mark.parametrize("case_id,kwargs,oracle_ok", ORIGINAL_CASES, ids=[c[0] for c in ORIGINAL_CASES])
def test_original_format_loads(tmp_path, case_id, kwargs, oracle_ok):
    ckpt = tmp_path / "orig"
    written = write_original(ckpt, seed=sum(map(ord, case_id)), **kwargs)
    names = list(kwargs["adapters"]) if isinstance(kwargs["adapters"], list) else list(kwargs["adapters"])
    base = load_base(RECIPE)
    n_modules = len(_expected_module_order(base))
    loaded = xlora_export.from_pretrained(str(ckpt), base)
    assert loaded.adapter_names == names  # the config's order defines the class index

    # the classifier holds exactly the written tensors, in order
    got = _classifier_linears(loaded)
    assert len(got) == len(written)
    for layer, (w, b) in zip(got, written):
        assert torch.equal(layer.weight.detach(), w)
        if b is None:
            assert layer.bias is None
        else:
            assert torch.equal(layer.bias.detach(), b)

    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        out = loaded(ids, use_cache=False)
    expected = _manual_scalings(RECIPE, ids, written, kwargs["relu"], kwargs["layerwise"], n_modules, len(names))
    assert max_diff(out.scalings, expected) < TOL

    if oracle_ok:
        oracle = peft_oracle(loaded, RECIPE)
        with torch.no_grad():
            ref = oracle(input_ids=ids, use_cache=False)
        assert max_diff(out.logits, ref.logits) < TOL
        assert max_diff(out.scalings, oracle.get_latest_scalings()) < TOL


def test_original_format_dict_paths_are_honoured(tmp_path):
    """With a dict, each name's column reads the folder its path names, not the folder named like it:
    pointing beta at gamma's folder and gamma at beta's (same module union, so the classifier still fits)
    must change the model."""
    ckpt = tmp_path / "orig"
    write_original(ckpt, adapters=["alpha", "beta", "gamma"], depth=2, size=16, relu=True, use_bias=True,
                   layerwise=True, seed=5)
    ids = _ids(load_base(RECIPE).config.vocab_size)
    with torch.no_grad():
        a = xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))(ids, use_cache=False).logits
    _edit_config(ckpt, adapters={"alpha": "alpha", "beta": "gamma", "gamma": "beta"})
    swapped = xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))
    assert swapped.adapter_names == ["alpha", "beta", "gamma"]
    with torch.no_grad():
        b = swapped(ids, use_cache=False).logits
    assert max_diff(a, b) > 1e-4


# ----------------------------------------------------------------------------- 3. PEFT's own save
def _peft_model(depth: int, dropout_p: float, layerwise: bool, seed: int):
    """A PEFT XLoraModel over the recipe (adapters "0".."2") with a classifier of our own random values."""
    model = make_xlora(RECIPE, seed=seed, xlora_depth=depth, xlora_dropout_p=dropout_p, layerwise_scalings=layerwise)
    peft_model = peft_oracle(model, RECIPE)
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for p in peft_model.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return peft_model


PEFT_CASES = [("depth2-p0", 2, 0.0, True), ("depth3-p0.2", 3, 0.2, True), ("depth1-shared", 1, 0.0, False)]
# per case, a tensor of PEFT's classifier Sequential (Linear, ReLU[, Dropout] per hidden layer, then the last Linear)
# that the incomplete checkpoint lacks: the last Linear's bias, a hidden Linear's weight, the only Linear's weight
PEFT_REMOVED = {"depth2-p0": "layers.2.bias", "depth3-p0.2": "layers.3.weight", "depth1-shared": "layers.0.weight"}


@pytest.mark.parametrize("case_id,depth,dropout_p,layerwise", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_peft_incomplete_checkpoint_is_refused(tmp_path, case_id, depth, dropout_p, layerwise):
    """A PEFT checkpoint whose classifier lacks a tensor (written by PEFT, then one tensor removed) is refused
    with one line naming the file and the missing tensor, not half loaded."""
    peft_model = _peft_model(depth, dropout_p, layerwise, seed=21)
    ckpt = tmp_path / "peft"
    peft_model.save_pretrained(str(ckpt))
    weights = ckpt / "adapter_model.safetensors"
    state = load_file(str(weights))
    removed = PEFT_PREFIX + PEFT_REMOVED[case_id]
    assert removed in state
    save_file({k: v for k, v in state.items() if k != removed}, str(weights), metadata={"format": "pt"})
    with pytest.raises(XLoraError, match="incomplete") as excinfo:
        xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert msg.startswith(f"{weights}: the classifier is incomplete: missing tensor {removed} ")


@pytest.mark.parametrize("case_id,depth,dropout_p,layerwise", PEFT_CASES, ids=[c[0] for c in PEFT_CASES])
def test_peft_save_loads_exactly(tmp_path, case_id, depth, dropout_p, layerwise):
    """The installed PEFT's own `save_pretrained`, as it is: the classifier loads tensor for tensor, and the
    logits and scalings equal PEFT's XLoraModel's."""
    peft_model = _peft_model(depth, dropout_p, layerwise, seed=31)
    ckpt = tmp_path / "peft"
    peft_model.save_pretrained(str(ckpt))
    assert (ckpt / "0").is_dir()  # PEFT's numbered folders are there and must not be used as experts

    base = load_base(RECIPE)
    loaded = xlora_export.from_pretrained(str(ckpt), base)
    assert loaded.adapter_names == ["0", "1", "2"]
    clf = peft_model.base_model.internal_xlora_classifier
    peft_linears = [m for m in clf.layers if isinstance(m, nn.Linear)]
    got = _classifier_linears(loaded)
    assert len(got) == len(peft_linears) == depth
    for ours, theirs in zip(got, peft_linears):
        assert torch.equal(ours.weight.detach(), theirs.weight.detach())
        assert torch.equal(ours.bias.detach(), theirs.bias.detach())

    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        out = loaded(ids, use_cache=False)
        ref = peft_model(input_ids=ids, use_cache=False)
    assert max_diff(out.logits, ref.logits) < TOL
    assert max_diff(out.scalings, peft_model.get_latest_scalings()) < TOL


def test_peft_checkpoint_with_cwd_relative_expert_paths(tmp_path, monkeypatch):
    """PEFT stores `adapters` paths as given and resolves relative ones against the working directory."""
    peft_model = _peft_model(2, 0.0, True, seed=51)
    ckpt = tmp_path / "peft"
    peft_model.save_pretrained(str(ckpt))
    with open(ckpt / "adapter_config.json") as f:
        conf = json.load(f)
    conf["adapters"] = {"0": "alpha", "1": "beta", "2": "gamma"}
    with open(ckpt / "adapter_config.json", "w") as f:
        json.dump(conf, f)
    base = load_base(RECIPE)
    monkeypatch.chdir(built(RECIPE))
    loaded = xlora_export.from_pretrained(str(ckpt), base)
    ids = _ids(base.config.vocab_size)
    with torch.no_grad():
        out = loaded(ids, use_cache=False)
        ref = peft_model(input_ids=ids, use_cache=False)
    assert max_diff(out.logits, ref.logits) < TOL
    assert max_diff(out.scalings, peft_model.get_latest_scalings()) < TOL


# ----------------------------------------------------------------------------- 4. bad inputs
@pytest.fixture
def orig(tmp_path):
    """A valid original-format checkpoint (depth 2, layerwise) to break in each test."""
    ckpt = tmp_path / "orig"
    write_original(ckpt, adapters=["alpha", "beta", "gamma"], depth=2, size=16, relu=True, use_bias=True,
                   layerwise=True, seed=9)
    return ckpt


def _edit_config(ckpt, **changes):
    path = ckpt / "xlora_config.json"
    with open(path) as f:
        conf = json.load(f)
    conf.update(changes)
    with open(path, "w") as f:
        json.dump(conf, f)


def test_fixture_checkpoint_is_valid(orig):
    xlora_export.from_pretrained(str(orig), load_base(RECIPE))


def test_missing_expert_folder_in_dict(orig):
    _edit_config(orig, adapters={"alpha": "alpha", "beta": "no-such-expert", "gamma": "gamma"})
    with pytest.raises(XLoraError, match="does not exist") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert "no-such-expert" in msg and "beta" in msg


def test_missing_expert_folder_override(orig):
    with pytest.raises(XLoraError, match="does not exist") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE),
                                     adapters={"alpha": str(orig / "alpha"), "beta": "/nonexistent/beta"})
    assert "/nonexistent/beta" in _one_line(excinfo)


def test_deleted_expert_subfolder(orig):
    shutil.rmtree(orig / "gamma")
    with pytest.raises(XLoraError, match="does not exist") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert "gamma" in msg and str(orig) in msg


def test_peft_checkpoint_with_missing_expert_path(tmp_path):
    peft_model = _peft_model(2, 0.0, True, seed=41)
    ckpt = tmp_path / "peft"
    peft_model.save_pretrained(str(ckpt))
    with open(ckpt / "adapter_config.json") as f:
        conf = json.load(f)
    conf["adapters"]["1"] = str(tmp_path / "moved-away")
    with open(ckpt / "adapter_config.json", "w") as f:
        json.dump(conf, f)
    with pytest.raises(XLoraError, match="does not exist") as excinfo:
        xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))
    assert "moved-away" in _one_line(excinfo)


def _rewrite_expert(folder, fn):
    path = os.path.join(folder, "adapter_model.safetensors")
    state = load_file(path)
    save_file(fn(state), path)


def test_expert_with_wrong_input_width(orig):
    def widen(state):
        key = next(k for k in sorted(state) if k.endswith("lora_A.weight"))
        state[key] = torch.randn(state[key].shape[0], 48)  # rank kept, in-features of another base
        return state

    _rewrite_expert(orig / "beta", widen)
    with pytest.raises(XLoraError, match="another base") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert "'beta'" in msg and "48" in msg


def test_expert_with_wrong_rank(orig):
    def bad_rank(state):
        key = next(k for k in sorted(state) if k.endswith("lora_B.weight"))
        state[key] = torch.randn(state[key].shape[0], state[key].shape[1] + 1)
        return state

    _rewrite_expert(orig / "alpha", bad_rank)
    with pytest.raises(XLoraError, match="alpha") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert os.path.join(str(orig), "alpha", "adapter_model.safetensors") in _one_line(excinfo)


def test_expert_made_by_peft_for_another_base(orig, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=48, vocab_size=384)
    other = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                            init_lora_weights=False, task_type="CAUSAL_LM"))
    shutil.rmtree(orig / "alpha")
    other.save_pretrained(str(orig / "alpha"))
    with pytest.raises(XLoraError, match="another base") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert "'alpha'" in _one_line(excinfo)


def test_expert_targets_a_module_the_base_lacks(orig):
    def deeper(state):  # as if built for a deeper model of the same family
        return {k.replace("model.layers.1.", "model.layers.7."): v for k, v in state.items()}

    _rewrite_expert(orig / "gamma", deeper)
    with pytest.raises(XLoraError, match="another base") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert "'gamma'" in msg and "model.layers.7." in msg


def test_hidden_size_mismatch(orig):
    _edit_config(orig, hidden_size=32)
    with pytest.raises(XLoraError, match="hidden_size") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert "32" in msg and "64" in msg


def test_classifier_shape_mismatch(orig):
    _edit_config(orig, xlora_size=24)  # the tensors were written with xlora_size 16
    with pytest.raises(XLoraError, match="shape") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert str(orig) in _one_line(excinfo)


def test_classifier_missing_tensor(orig):
    path = str(orig / "xlora_classifier.safetensors")
    state = load_file(path)
    del state["last.weight"]
    save_file(state, path)
    with pytest.raises(XLoraError, match="last.weight") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert "xlora_classifier.safetensors" in _one_line(excinfo)


def test_missing_classifier_file(orig):
    os.remove(orig / "xlora_classifier.safetensors")
    with pytest.raises(XLoraError, match="missing") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert "xlora_classifier.safetensors" in _one_line(excinfo)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_classifier_file(orig, how):
    path = orig / "xlora_classifier.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\x00garbage bytes, not safetensors\xff" * 50 if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(XLoraError, match="cannot read") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert str(path) in _one_line(excinfo)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_expert_file(orig, how):
    path = orig / "beta" / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(b"\xde\xad\xbe\xef" * 64 if how == "garbage" else data[: len(data) - 100])
    with pytest.raises(XLoraError, match="cannot read") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert str(path) in msg and "'beta'" in msg


@pytest.fixture
def orig_pt(tmp_path):
    """A valid original-format checkpoint whose classifier is `xlora_classifier.pt` (safe_serialization=False)."""
    ckpt = tmp_path / "orig_pt"
    write_original(ckpt, adapters=["alpha", "beta", "gamma"], depth=2, size=16, relu=True, use_bias=True,
                   layerwise=True, seed=10, pt=True)
    xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))  # positive control
    return ckpt


@pytest.mark.parametrize("how", ["garbage", "truncated", "pickle-garbage", "not-a-state-dict"])
def test_corrupt_classifier_pt(orig_pt, how):
    path = orig_pt / "xlora_classifier.pt"
    data = path.read_bytes()
    if how == "garbage":
        path.write_bytes(b"\xde\xad\xbe\xef" * 64)
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "pickle-garbage":
        path.write_bytes(b"\x80\x02garbage, a pickle protocol header then junk")
    else:
        torch.save([torch.zeros(3)], path)  # loadable with weights_only, but no state dict
    with pytest.raises(XLoraError, match="xlora_classifier.pt") as excinfo:
        xlora_export.from_pretrained(str(orig_pt), load_base(RECIPE))
    _one_line(excinfo)


@pytest.mark.parametrize("how", ["garbage", "truncated"])
def test_corrupt_expert_bin(orig, how):
    for name in ["alpha", "beta", "gamma"]:  # experts saved with safe_serialization=False
        folder = orig / name
        torch.save(load_file(str(folder / "adapter_model.safetensors")), folder / "adapter_model.bin")
        os.remove(folder / "adapter_model.safetensors")
    xlora_export.from_pretrained(str(orig), load_base(RECIPE), from_safetensors=False)  # positive control
    path = orig / "beta" / "adapter_model.bin"
    data = path.read_bytes()
    path.write_bytes(b"\xde\xad\xbe\xef" * 64 if how == "garbage" else data[: len(data) // 2])
    with pytest.raises(XLoraError, match="beta") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE), from_safetensors=False)
    assert str(path) in _one_line(excinfo)


def test_corrupt_config_json(orig):
    (orig / "xlora_config.json").write_text('{"hidden_size": 64, "adapters": [')
    with pytest.raises(XLoraError, match="not valid JSON") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert "xlora_config.json" in _one_line(excinfo)


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=2, vocab_size=100, n_positions=32)).eval()


def test_unknown_architecture_add_xlora(tmp_path):
    config = xlora_export.xLoRAConfig(64, adapters=expert_paths(RECIPE), xlora_depth=1)
    with pytest.raises(XLoraError, match="unsupported architecture") as excinfo:
        xlora_export.add_xlora_to_model(_tiny_gpt2(), config)
    assert "GPT2LMHeadModel" in _one_line(excinfo)


def test_unknown_architecture_from_pretrained(orig):
    with pytest.raises(XLoraError, match="unsupported architecture") as excinfo:
        xlora_export.from_pretrained(str(orig), _tiny_gpt2())
    assert "gpt2" in _one_line(excinfo)


def test_not_a_checkpoint_empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(XLoraError, match="not an X-LoRA checkpoint") as excinfo:
        xlora_export.from_pretrained(str(folder), load_base(RECIPE))
    assert str(folder) in _one_line(excinfo)


def test_not_a_checkpoint_lora_expert_folder(tmp_path):
    folder = tmp_path / "expert"
    shutil.copytree(expert_paths(RECIPE)["alpha"], folder)  # a plain LoRA adapter, not an X-LoRA model
    with pytest.raises(XLoraError, match="not an X-LoRA checkpoint") as excinfo:
        xlora_export.from_pretrained(str(folder), load_base(RECIPE))
    assert str(folder) in _one_line(excinfo)


def test_not_a_checkpoint_missing_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(XLoraError, match="not a directory") as excinfo:
        xlora_export.from_pretrained(str(missing), load_base(RECIPE))
    assert str(missing) in _one_line(excinfo)


def test_unknown_field_in_config(orig):
    _edit_config(orig, xlora_frobnication=3)
    with pytest.raises(XLoraError, match="unknown field") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    msg = _one_line(excinfo)
    assert "xlora_frobnication" in msg and "xlora_config.json" in msg


def test_missing_required_field_in_config(orig):
    with open(orig / "xlora_config.json") as f:
        conf = json.load(f)
    del conf["hidden_size"]
    with open(orig / "xlora_config.json", "w") as f:
        json.dump(conf, f)
    with pytest.raises(XLoraError, match="hidden_size") as excinfo:
        xlora_export.from_pretrained(str(orig), load_base(RECIPE))
    assert "xlora_config.json" in _one_line(excinfo)


def test_saved_ordering_mismatch(tmp_path):
    model = make_xlora(RECIPE, seed=2)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    with open(ckpt / "xlora_ordering.json") as f:
        ordering = json.load(f)
    ordering["adapters"] = {"beta": 0, "alpha": 1, "gamma": 2}
    with open(ckpt / "xlora_ordering.json", "w") as f:
        json.dump(ordering, f)
    with pytest.raises(XLoraError, match="ordering") as excinfo:
        xlora_export.from_pretrained(str(ckpt), load_base(RECIPE))
    assert "xlora_ordering.json" in _one_line(excinfo)


def test_base_model_loaded_in_another_dtype_reads_each_tensor_once(monkeypatch):
    """An fp32 checkpoint loaded as fp16 goes through safetensors' pread backend (no memory map keeping the
    whole fp32 file resident), with the same weights as transformers' own (mmap) load; an fp32 load keeps the
    memory map."""
    folder = os.path.join(built("tiny-llama"), "base")
    backends = []
    monkeypatch.setattr(loader, "safe_open", lambda *a, **k: backends.append(k.get("backend")) or safe_open(*a, **k))
    half = load_base_model(folder, torch.float16)
    assert backends == ["pread"]
    reference = load_base("tiny-llama", torch.float16)
    for (name, p), q in zip(half.state_dict().items(), reference.state_dict().values()):
        assert p.dtype == torch.float16 and torch.equal(p, q), name
    backends.clear()
    load_base_model(folder, torch.float32)
    assert backends == ["mmap"]
