"""Checkpoints, base models and experts named by Hugging Face Hub ids (`org/name`, `org/name@revision`),
resolved through huggingface_hub's cache, fully offline: the cache is a folder of this test laid out as
huggingface_hub lays it out (`models--org--name/snapshots/<commit>/...`, `refs/<branch>` holding the commit)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import xlora_export
from helpers import built, edit_json, expert_paths, load_base, make_xlora, peft_oracle
from xlora_export import XLoraError, cli, hub
from xlora_export.checkpoints import read_checkpoint
from xlora_export.xlora_utils import load_base_model, load_model

RECIPE = "tiny-llama"
PEFT_PREFIX = "base_model.internal_xlora_classifier."
COMMIT_MAIN = "a" * 40
COMMIT_V2 = "b" * 40


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty Hub cache, offline: HF_HUB_CACHE points at it and HF_HUB_OFFLINE is set."""
    folder = tmp_path / "hub-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def _publish(cache, repo: str, source: str, commit: str = COMMIT_MAIN, ref: str | None = "main") -> str:
    """Put a copy of the folder `source` into the cache as repository `repo` at `commit` (named by `ref`);
    returns the snapshot folder. The files lie in the snapshot itself (huggingface_hub links them to blobs/;
    its cache lookup reads only refs/ and snapshots/)."""
    storage = cache / ("models--" + repo.replace("/", "--"))
    snapshot = storage / "snapshots" / commit
    shutil.copytree(source, snapshot)
    if ref is not None:
        (storage / "refs").mkdir(parents=True, exist_ok=True)
        (storage / "refs" / ref).write_text(commit)
    return str(snapshot)


def _peft_checkpoint(folder) -> str:
    """A PEFT X-LoRA checkpoint written by PEFT's save_pretrained over the recipe (experts "0".."2"), the whole
    classifier written back whatever the installed PEFT saves."""
    peft_model = peft_oracle(make_xlora(RECIPE, seed=5), RECIPE)
    peft_model.save_pretrained(str(folder))
    clf = peft_model.base_model.internal_xlora_classifier
    save_file({PEFT_PREFIX + k: v.detach().contiguous() for k, v in clf.state_dict().items()},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    return str(folder)


def _logits(model) -> torch.Tensor:
    ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return model(ids, use_cache=False).logits


def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def _base_folder() -> str:
    return os.path.join(built(RECIPE), "base")


# ----------------------------------------------------------------------------- the id itself
@pytest.mark.parametrize("text,parsed", [
    ("org/name", ("org/name", None)),
    ("HuggingFaceH4/zephyr-7b-beta", ("HuggingFaceH4/zephyr-7b-beta", None)),
    ("org/name@v2", ("org/name", "v2")),
    ("org/name@refs/pr/1", ("org/name", "refs/pr/1")),
    (f"org/name@{COMMIT_V2}", ("org/name", COMMIT_V2)),
    ("name", None),  # no namespace: a folder name
    ("base", None),
    ("/abs/org/name", None),
    ("./org/name", None),
    ("../org/name", None),
    ("a/b/c", None),
    ("org/na--me", None),
    ("org/name.git", None),
    ("org/name@", None),
    ("org/name@a b", None),
])
def test_what_counts_as_a_hub_id(text, parsed):
    assert hub.parse_hub_id(text) == parsed


def test_the_cache_folder_is_read_from_the_environment_at_each_call(tmp_path, monkeypatch):
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert hub.hub_cache() == str(tmp_path / "home" / ".cache" / "huggingface" / "hub")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub.hub_cache() == str(tmp_path / "xdg" / "huggingface" / "hub")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert hub.hub_cache() == str(tmp_path / "hf" / "hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(tmp_path / "legacy"))
    assert hub.hub_cache() == str(tmp_path / "legacy")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hub_cache() == str(tmp_path / "new")


def test_a_cached_id_resolves_to_its_snapshot_and_a_folder_with_the_same_text_wins(cache, tmp_path, monkeypatch):
    snapshot = _publish(cache, "org/tiny-base", _base_folder())
    assert hub.resolve("org/tiny-base", "base model") == snapshot
    monkeypatch.chdir(tmp_path)
    shutil.copytree(_base_folder(), tmp_path / "org" / "tiny-base")
    assert hub.resolve("org/tiny-base", "base model") == "org/tiny-base"
    assert hub.resolve("not-an-id", "base model") == "not-an-id"  # the caller names the missing folder


# ----------------------------------------------------------------------------- (a) base model by Hub id
def test_peft_checkpoint_with_a_hub_base_equals_the_local_base(cache, tmp_path):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    local = _logits(load_model(ckpt, base_model=_base_folder())[0])
    _publish(cache, "org/tiny-base", _base_folder())
    edit_json(os.path.join(ckpt, "adapter_config.json"), base_model_name_or_path="org/tiny-base")
    model, tokenizer = load_model(ckpt)
    assert torch.equal(_logits(model), local)
    # the tokenizer was found in the base model's snapshot (the PEFT checkpoint has none)
    assert tokenizer is not None and tokenizer.name_or_path.startswith(str(cache))


def test_xlora_export_of_a_hub_checkpoint_with_a_hub_base(cache, tmp_path, capsys):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    _publish(cache, "org/tiny-base", _base_folder())
    edit_json(os.path.join(ckpt, "adapter_config.json"), base_model_name_or_path="org/tiny-base")
    _publish(cache, "lab/x-lora-peft", ckpt)
    out = tmp_path / "m.onnx"
    assert cli.main(["lab/x-lora-peft", str(out), "--no-validate"]) == 0, capsys.readouterr().err
    assert out.is_file() and (tmp_path / "m.tokenizer.json").is_file()  # the base's tokenizer, from the cache


def test_load_base_model_takes_a_hub_id(cache):
    _publish(cache, "org/tiny-base", _base_folder())
    assert torch.equal(load_base_model("org/tiny-base").lm_head.weight, load_base(RECIPE).lm_head.weight)


# ----------------------------------------------------------------------------- (b) experts by Hub id
def test_peft_experts_given_as_hub_ids(cache, tmp_path):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    config = os.path.join(ckpt, "adapter_config.json")
    with open(config) as f:
        adapters = json.load(f)["adapters"]
    local = _logits(xlora_export.from_pretrained(ckpt, load_base(RECIPE)))
    hub_ids = {}
    for key, path in adapters.items():
        _publish(cache, f"org/expert-{key}", path)
        hub_ids[key] = f"org/expert-{key}"
    for path in adapters.values():  # the experts' folders are gone: only the cache has them
        shutil.move(path, path + ".moved")
    try:
        edit_json(config, adapters=hub_ids)
        assert torch.equal(_logits(xlora_export.from_pretrained(ckpt, load_base(RECIPE))), local)
        # load_model too, and with the base by Hub id as well
        _publish(cache, "org/tiny-base", _base_folder())
        edit_json(config, base_model_name_or_path="org/tiny-base")
        assert torch.equal(_logits(load_model(ckpt)[0]), local)
    finally:
        for path in adapters.values():
            shutil.move(path + ".moved", path)


def test_add_xlora_to_model_takes_experts_by_hub_id(cache):
    local = make_xlora(RECIPE, seed=2)
    for name, path in expert_paths(RECIPE).items():
        _publish(cache, f"org/{name}", path)
    by_id = make_xlora(RECIPE, seed=2, adapters={name: f"org/{name}" for name in expert_paths(RECIPE)})
    assert torch.equal(_logits(by_id), _logits(local))


# ----------------------------------------------------------------------------- (c) the original layout
def _original_with_hub_ids(cache, folder) -> str:
    """The recipe's checkpoint as the original X-LoRA writes it by hand: `adapters` a map name -> Hub id, the
    base a Hub id; neither the experts nor the base inside the folder."""
    source = built(RECIPE)
    folder.mkdir()
    for name in ("xlora_classifier.safetensors", "xlora_ordering.json"):
        shutil.copy(os.path.join(source, name), folder / name)
    for name, path in expert_paths(RECIPE).items():
        _publish(cache, f"org/lora-{name}", path)
    _publish(cache, "HuggingFaceH4/tiny-base", _base_folder())
    with open(os.path.join(source, "xlora_config.json")) as f:
        record = json.load(f)
    record["adapters"] = {name: f"org/lora-{name}" for name in record["adapters"]}
    record["base_model_id"] = "HuggingFaceH4/tiny-base"
    with open(folder / "xlora_config.json", "w") as f:
        json.dump(record, f)
    return str(folder)


def test_original_layout_with_hub_ids_equals_the_local_checkpoint(cache, tmp_path):
    ckpt = _original_with_hub_ids(cache, tmp_path / "orig")
    model, tokenizer = load_model(ckpt)
    assert torch.equal(_logits(model), _logits(load_model(built(RECIPE))[0]))
    assert tokenizer is not None


def test_a_checkpoint_named_by_hub_id(cache, tmp_path):
    ckpt = _original_with_hub_ids(cache, tmp_path / "orig")
    snapshot = _publish(cache, "lab/x-lora", ckpt)
    checkpoint = read_checkpoint("lab/x-lora")
    assert checkpoint.directory == snapshot
    assert torch.equal(_logits(load_model("lab/x-lora")[0]), _logits(load_model(built(RECIPE))[0]))


# ----------------------------------------------------------------------------- (d) an id not in the cache
def _says_what_to_do(message: str, text: str, repo: str, cache, command: str) -> None:
    assert repr(text) in message and str(cache) in message and "HF_HUB_OFFLINE is set" in message, message
    assert message.endswith(f"fetch it with: {command}"), message
    assert repo in command


def test_a_missing_base_is_one_line_naming_the_id_the_cache_and_the_command(cache, tmp_path):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    edit_json(os.path.join(ckpt, "adapter_config.json"), base_model_name_or_path="org/absent-base")
    with pytest.raises(XLoraError) as excinfo:
        load_model(ckpt)
    message = _one_line(excinfo)
    assert message.startswith(f"base model (from {ckpt}): 'org/absent-base' is not a local folder"), message
    _says_what_to_do(message, "org/absent-base", "org/absent-base", cache, "hf download org/absent-base")


def test_a_missing_expert_or_checkpoint_is_one_line(cache, tmp_path):
    ckpt = _original_with_hub_ids(cache, tmp_path / "orig")
    edit_json(os.path.join(ckpt, "xlora_config.json"),
          adapters={"alpha": "org/lora-alpha", "beta": "org/lora-beta@v9", "gamma": "org/lora-gamma"})
    with pytest.raises(XLoraError) as excinfo:
        load_model(ckpt)
    message = _one_line(excinfo)
    assert message.startswith("expert 'beta': 'org/lora-beta@v9' is not a local folder"), message
    _says_what_to_do(message, "org/lora-beta@v9", "org/lora-beta", cache, "hf download org/lora-beta --revision v9")
    with pytest.raises(XLoraError) as excinfo:
        load_model("lab/absent-checkpoint")
    _says_what_to_do(_one_line(excinfo), "lab/absent-checkpoint", "lab/absent-checkpoint", cache,
                     "hf download lab/absent-checkpoint")


def test_a_missing_base_on_the_command_line_is_one_line(cache, tmp_path, capsys):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    edit_json(os.path.join(ckpt, "adapter_config.json"), base_model_name_or_path="org/absent-base")
    out = tmp_path / "m.onnx"
    capsys.readouterr()
    assert cli.main([ckpt, str(out)]) == 1
    err = capsys.readouterr().err
    assert err == (f"xlora-export: error: base model (from {ckpt}): 'org/absent-base' is not a local folder, and "
                   f"not in the Hugging Face cache {cache} (HF_HUB_OFFLINE is set); fetch it with: "
                   f"hf download org/absent-base\n")
    assert not out.exists()


def test_no_network_is_one_line_with_the_reason(cache, tmp_path, monkeypatch):
    """Online (HF_HUB_OFFLINE unset) with the Hub unreachable: the download's failure, in one line."""
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def unreachable(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise OSError("[Errno 101] Network is unreachable\nsecond line")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(XLoraError) as excinfo:
        hub.resolve("org/tiny-base", "expert 'alpha'")
    assert _one_line(excinfo) == (f"expert 'alpha': 'org/tiny-base' is not a local folder, not in the Hugging Face "
                                  f"cache {cache}, and downloading it failed (OSError: [Errno 101] Network is "
                                  f"unreachable second line); fetch it with: hf download org/tiny-base")


def test_online_a_missing_id_is_downloaded_without_pickles_beside_safetensors(cache, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def download(repo, **kwargs):
        calls.append((repo, kwargs))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return "/snapshot"

    files = {"org/both": ["config.json", "model.safetensors", "pytorch_model.bin"],
             "org/pickles": ["config.json", "pytorch_model.bin"]}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo, revision=None: files[repo])
    assert hub.resolve("org/both@v2", "base model", prefer_safetensors=True) == "/snapshot"
    assert hub.resolve("org/pickles", "base model", prefer_safetensors=True) == "/snapshot"
    (_, first), (_, both), (_, _), (_, pickles) = calls
    assert first["local_files_only"] and first["cache_dir"] == str(cache) and first["revision"] == "v2"
    assert "*.bin" in both["ignore_patterns"] and both["revision"] == "v2" and "local_files_only" not in both
    assert "*.bin" not in pickles["ignore_patterns"] and "*.gguf" in pickles["ignore_patterns"]


# ----------------------------------------------------------------------------- (e) --base-model overrides
def test_base_model_option_overrides_a_hub_id(cache, tmp_path, capsys):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    edit_json(os.path.join(ckpt, "adapter_config.json"), base_model_name_or_path="org/absent-base")
    out = tmp_path / "m.onnx"
    assert cli.main([ckpt, str(out), "--no-validate", "--base-model", _base_folder()]) == 0, capsys.readouterr().err
    assert out.is_file()
    assert torch.equal(_logits(load_model(ckpt, base_model=_base_folder())[0]),
                       _logits(xlora_export.from_pretrained(ckpt, load_base(RECIPE))))


# ----------------------------------------------------------------------------- (f) revisions
def _other_base(folder) -> str:
    """The recipe's base with another lm_head: a different model at another commit."""
    shutil.copytree(_base_folder(), folder)
    weights = os.path.join(folder, "model.safetensors")
    state = load_file(weights)
    state = {k: (v + 0.5 if k == "lm_head.weight" else v) for k, v in state.items()}
    save_file(state, weights, metadata={"format": "pt"})
    return str(folder)


def test_a_revision_other_than_main(cache, tmp_path):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    local = _logits(load_model(ckpt, base_model=_base_folder())[0])
    _publish(cache, "org/tiny-base", _other_base(tmp_path / "other"), COMMIT_MAIN, "main")
    _publish(cache, "org/tiny-base", _base_folder(), COMMIT_V2, "v2")
    config = os.path.join(ckpt, "adapter_config.json")
    edit_json(config, base_model_name_or_path="org/tiny-base")
    assert not torch.equal(_logits(load_model(ckpt)[0]), local)  # main: the other base
    for base, revision in (("org/tiny-base@v2", None), (f"org/tiny-base@{COMMIT_V2}", None), ("org/tiny-base", "v2")):
        edit_json(config, base_model_name_or_path=base, revision=revision)  # `revision`: PEFT's key
        checkpoint = read_checkpoint(ckpt)
        assert checkpoint.base_folder().endswith(COMMIT_V2), (base, revision)
        assert torch.equal(_logits(load_model(checkpoint)[0]), local)


def test_a_revision_for_a_local_base_is_ignored_and_two_revisions_are_refused(cache, tmp_path):
    ckpt = _peft_checkpoint(tmp_path / "peft")
    config = os.path.join(ckpt, "adapter_config.json")
    edit_json(config, base_model_name_or_path=_base_folder(), revision="v2")
    assert read_checkpoint(ckpt).base_folder() == _base_folder()
    edit_json(config, base_model_name_or_path="org/tiny-base@v1", revision="v2")
    with pytest.raises(XLoraError) as excinfo:
        read_checkpoint(ckpt)
    assert _one_line(excinfo) == (f"{config}: base_model_name_or_path 'org/tiny-base@v1' names revision 'v1', but "
                                  f"field 'revision' is 'v2'; expected one revision")
    edit_json(config, base_model_name_or_path="org/tiny-base", revision=3)
    with pytest.raises(XLoraError) as excinfo:
        read_checkpoint(ckpt)
    assert _one_line(excinfo) == (f"{config}: field 'revision' is 3; expected a branch, tag or commit hash, or "
                                  f"null")


def test_an_absent_revision_names_it_in_the_command(cache, tmp_path):
    _publish(cache, "org/tiny-base", _base_folder())
    with pytest.raises(XLoraError) as excinfo:
        load_base_model("org/tiny-base@v3")
    message = _one_line(excinfo)
    _says_what_to_do(message, "org/tiny-base@v3", "org/tiny-base", cache, "hf download org/tiny-base --revision v3")


def test_a_snapshot_cached_in_part_is_used_offline_and_completed_online(cache, tmp_path, monkeypatch):
    """huggingface_hub refuses a snapshot its cached file list shows incomplete (IncompleteSnapshotError):
    offline it is used as it is (the loaders name a missing file), online it is completed by a download."""
    import huggingface_hub

    partial = _publish(cache, "org/tiny-base", _base_folder())
    calls = []

    def download(repo, **kwargs):
        calls.append(kwargs.get("local_files_only", False))
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.IncompleteSnapshotError("1 file(s) are missing", snapshot_path=partial)
        return "/completed"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    assert hub.resolve("org/tiny-base", "base model") == partial and calls == [True]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert hub.resolve("org/tiny-base", "base model") == "/completed" and calls == [True, True, False]
