"""Hugging Face Hub ids: a checkpoint, its base model or an expert named `org/name` (or `org/name@revision`)
instead of a folder, resolved to a local folder through huggingface_hub's cache, as transformers does.

One rule everywhere (`resolve`): a local folder with that text always wins; else a Hub id is looked up in the
cache first (no network), and downloaded when not cached and not offline; anything else is returned as it was
(the caller reports the missing folder in its own words). The cache folder and the offline switches are read
from the environment at each call (huggingface_hub reads its constants once, at import).
"""

from __future__ import annotations

import os
import re

from .errors import XLoraError

__all__ = ["REVISION", "fetch_command", "hub_cache", "offline_variable", "parse_hub_id", "resolve"]

# `org/name`: what huggingface_hub accepts as a repository id, with the namespace required (a bare `name` is
# a relative folder here); `@revision` a branch, tag or commit hash (branches may hold `/`, e.g. refs/pr/1).
_REPO_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*")
REVISION = re.compile(r"[^\s@]+")
# Files no loader of this project reads (other frameworks' weights, Meta's original checkpoints): never fetched.
NEVER_READ = ["*.h5", "*.msgpack", "*.ot", "*.tflite", "*.gguf", "*.onnx", "*.onnx_data", "onnx/*", "openvino/*",
              "original/*"]
# PyTorch pickles: skipped where the repository also has safetensors files and the caller reads those.
PICKLES = ["*.bin", "*.pt", "*.pth"]


def parse_hub_id(text: str) -> tuple[str, str | None] | None:
    """(repo id, revision or None) of `org/name` or `org/name@revision`; None for any other text."""
    repo, at, revision = text.partition("@")
    if not _REPO_ID.fullmatch(repo) or len(repo) > 96 or "--" in repo or ".." in repo or repo.endswith(".git"):
        return None
    if at and not REVISION.fullmatch(revision):
        return None
    return repo, revision or None


def _is_true(value: str | None) -> bool:
    return (value or "").upper() in {"1", "ON", "YES", "TRUE"}


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def hub_cache() -> str:
    """huggingface_hub's cache folder (its HF_HUB_CACHE constant) as the environment sets it now: HF_HUB_CACHE,
    else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub, else
    ~/.cache/huggingface/hub."""
    cache_home = os.getenv("XDG_CACHE_HOME", os.path.join(os.path.expanduser("~"), ".cache"))
    home = _expand(os.getenv("HF_HOME", os.path.join(cache_home, "huggingface")))
    return _expand(os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub"))))


def offline_variable() -> str | None:
    """The environment variable that makes huggingface_hub offline now (HF_HUB_OFFLINE, TRANSFORMERS_OFFLINE),
    or None when downloads are allowed."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _is_true(os.environ.get(name)):
            return name
    return "HF_HUB_OFFLINE" if constants.HF_HUB_OFFLINE else None


def fetch_command(repo: str, revision: str | None) -> str:
    """The shell command that puts `repo` (at `revision`) into the cache."""
    return f"hf download {repo}" + (f" --revision {revision}" if revision else "")


def _reason(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:200]}" if text else type(error).__name__


def resolve(name: str | os.PathLike, what: str, prefer_safetensors: bool = False) -> str:
    """The local folder that `name` stands for.

    Args:
        name: a folder, or a Hub id `org/name` / `org/name@revision` (a folder that exists wins).
        what: what `name` is, for messages (e.g. "base model (from ckpt)", "expert 'alpha'").
        prefer_safetensors: skip PyTorch pickles (`*.bin`, `*.pt`, `*.pth`) when the repository has
            safetensors files (the base model's loader reads those first).
    Returns:
        `name` when it is a folder or no Hub id (the caller reports a missing folder); else the Hub id's snapshot
        folder in the cache, downloaded first when it is not cached and huggingface_hub is not offline.
    Raises:
        XLoraError: a Hub id that is not cached while offline, or whose download failed (one line naming the id,
            the cache folder and the command that fetches it).
    """
    name = os.fspath(name)
    parsed = None if os.path.isdir(name) else parse_hub_id(name)
    if parsed is None:
        return name
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    repo, revision = parsed
    cache = hub_cache()
    skip = NEVER_READ + (PICKLES if prefer_safetensors else [])
    partial = None
    try:
        return huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache, local_files_only=True,
                                                 ignore_patterns=skip)
    except LocalEntryNotFoundError as e:  # not cached; or cached in part (IncompleteSnapshotError)
        partial = getattr(e, "snapshot_path", None)
    offline = offline_variable()
    if offline is not None:
        if partial and os.path.isdir(partial):  # what is there may be all that is needed; loaders name a gap
            return partial
        raise XLoraError(f"{what}: {name!r} is not a local folder, and not in the Hugging Face cache {cache} "
                         f"({offline} is set); fetch it with: {fetch_command(repo, revision)}")
    try:
        if prefer_safetensors:
            files = huggingface_hub.HfApi().list_repo_files(repo, revision=revision)
            if not any(f.endswith(".safetensors") for f in files):
                skip = NEVER_READ
        return huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache, ignore_patterns=skip)
    except Exception as e:  # no network, no such repository or revision, gated, Hub errors: one line
        raise XLoraError(f"{what}: {name!r} is not a local folder, not in the Hugging Face cache {cache}, and "
                         f"downloading it failed ({_reason(e)}); fetch it with: "
                         f"{fetch_command(repo, revision)}") from None
