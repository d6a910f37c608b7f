"""The scalings log file format, shared by the eager model and the runtime (numpy only).

`path` is given without extension.
- every entry has one shape: `{path}.npy`, float32 (num_logged, b, s, L, n);
- otherwise: one `{path}-{j}.npy` per distinct shape, each (num_of_that_shape, b, s, L, n),
  and `{path}-mapping.json` mapping each file's basename to the log indices it holds, so
  that loading restores the original order. (The original xlora stored full paths as keys;
  those load too.)
- the runtime also writes `{path}-tokens.json` (`tokens_record_path`): per logged call its first entry,
  its number of entries and, per prompt, the prompt ids, the generated tokens and their texts, so that
  a plot can label every column. A flush without a record removes a stale one.

Layout of one `generate` call (eager model and runtime alike): the prefill (b, p, L, n), then one
(b, 1, L, n) entry per decode step, every row in prompt order. The runtime writes NaN for a row that has
already finished (the eager model keeps feeding it padding); frozen rows log their fixed scalings.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from .errors import XLoraError

__all__ = ["load_scalings_arrays", "load_tokens_record", "save_scalings_arrays", "tokens_record_path"]


def tokens_record_path(path: str) -> str:
    """`PATH-tokens.json`, the tokens record beside the scalings log `PATH`."""
    return (path[:-len(".npy")] if path.endswith(".npy") else path) + "-tokens.json"


def save_scalings_arrays(arrays: list[np.ndarray], path: str, tokens_record: dict[str, Any] | None = None) -> list[str]:
    """Write a log (a list of (b, s, L, n) arrays, cast to float32) and, when given, its tokens record (JSON);
    return the files written.

    Raises:
        XLoraError: an empty log, a path with an extension, or a file-system error (a folder that cannot be
            written, a directory where a file goes, a full disk): `<file>: cannot write the scalings log (<the
            OS's reason>)`.
    """
    if not arrays:
        raise XLoraError("flush_log_scalings: the scalings log is empty (enable logging first?)")
    if os.path.splitext(path)[1] == ".npy":
        raise XLoraError(f"flush_log_scalings: give the path without extension, got {path!r}")
    arrays = [np.asarray(a, dtype=np.float32) for a in arrays]
    try:
        return _write_log(arrays, path, tokens_record)
    except OSError as e:
        raise XLoraError(f"{e.filename or path}: cannot write the scalings log ({e.strerror or e})") from None


def _write_log(arrays: list[np.ndarray], path: str, tokens_record: dict[str, Any] | None) -> list[str]:
    shapes = list(dict.fromkeys(a.shape for a in arrays))
    _remove_previous(path)  # a log flushed earlier to this path must not shadow this one
    if len(shapes) == 1:
        np.save(f"{path}.npy", np.stack(arrays))
        return [f"{path}.npy"] + _write_record(tokens_record, path)
    mapping, files = {}, []
    for j, shape in enumerate(shapes):
        indices = [i for i, a in enumerate(arrays) if a.shape == shape]
        name = f"{path}-{j}.npy"
        np.save(name, np.stack([arrays[i] for i in indices]))
        mapping[os.path.basename(name)] = indices
        files.append(name)
    with open(f"{path}-mapping.json", "w") as f:
        json.dump(mapping, f)
    return files + [f"{path}-mapping.json"] + _write_record(tokens_record, path)


def _write_record(record: dict[str, Any] | None, path: str) -> list[str]:
    if record is None:
        return []
    with open(tokens_record_path(path), "w") as f:
        json.dump(record, f)
    return [tokens_record_path(path)]


def load_tokens_record(path: str) -> dict[str, Any] | None:
    """The tokens record beside the log `path` (None when there is none)."""
    record_path = tokens_record_path(path)
    if not os.path.isfile(record_path):
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XLoraError(f"{record_path}: cannot read it ({e})") from None
    if not isinstance(record, dict):
        raise XLoraError(f"{record_path}: expected a JSON object")
    return record


def _remove_previous(path: str) -> None:
    mapping_path = f"{path}-mapping.json"
    if os.path.isfile(mapping_path):
        try:
            names = list(_read_mapping(mapping_path))
        except XLoraError:  # a garbage mapping names no file to remove; the mapping itself goes
            names = []
        for name in names:
            old = os.path.join(os.path.dirname(path), os.path.basename(name))
            if os.path.isfile(old):
                os.remove(old)
        os.remove(mapping_path)
    for stale in (f"{path}.npy", tokens_record_path(path)):
        if os.path.isfile(stale):
            os.remove(stale)


def load_scalings_arrays(path: str, verbose: bool = False) -> list[np.ndarray]:
    """Read a log written by `save_scalings_arrays`: the list of (b, s, L, n) arrays, in logged order.

    Raises:
        XLoraError: no log at `path`, a `.npy` file that numpy cannot read or that is not a stack of
            (b, s, L, n) arrays, a `-mapping.json` that is not an object file name -> indices, or that
            disagrees with its files.
    """
    single = path if path.endswith(".npy") and os.path.isfile(path) else f"{path}.npy"
    if os.path.isfile(single):
        stacked = _load_stack(single)
        if verbose:
            print(f"Loaded {stacked.shape[0]} scalings of shape {stacked.shape[1:]} from {single}")
        return list(stacked)
    mapping_path = f"{path}-mapping.json"
    if not os.path.isfile(mapping_path):
        raise XLoraError(f"load_scalings_arrays: neither {path}.npy nor {mapping_path} exists")
    mapping = _read_mapping(mapping_path)
    entries: dict[int, np.ndarray] = {}
    folder = os.path.dirname(path)
    for name, indices in mapping.items():
        file = os.path.join(folder, os.path.basename(name))  # the original stored full paths
        if not os.path.isfile(file):
            raise XLoraError(f"load_scalings_arrays: {mapping_path} names {name}, and {file} does not exist")
        stacked = _load_stack(file)
        if len(stacked) != len(indices):
            raise XLoraError(f"load_scalings_arrays: {name} holds {len(stacked)} entries, {mapping_path} lists "
                             f"{len(indices)}")
        entries.update(zip(indices, stacked))
        if verbose:
            print(f"Loaded {len(indices)} scalings of shape {stacked.shape[1:]} from {name}")
    if sorted(entries) != list(range(len(entries))):
        raise XLoraError(f"load_scalings_arrays: {mapping_path} does not cover indices 0..{len(entries) - 1}")
    return [entries[i] for i in range(len(entries))]


def _load_stack(file: str) -> np.ndarray:
    """One `.npy` of the log: a stack (k, b, s, L, n) of numbers."""
    try:
        stacked = np.load(file)  # allow_pickle=False: a pickle is refused, never run
    except (OSError, ValueError, EOFError) as e:
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise XLoraError(f"load_scalings_arrays: cannot read {file} ({reason})") from None
    if not isinstance(stacked, np.ndarray):  # an .npz archive under the .npy name
        stacked.close()
        raise XLoraError(f"load_scalings_arrays: {file} holds an archive; expected a stack (entries, b, s, L, n) "
                         f"of numbers")
    if stacked.ndim != 5 or not np.issubdtype(stacked.dtype, np.number):
        what = f"shape {stacked.shape} of {stacked.dtype}"
        raise XLoraError(f"load_scalings_arrays: {file} holds {what}; expected a stack (entries, b, s, L, n) of "
                         f"numbers")
    return stacked


def _read_mapping(mapping_path: str) -> dict[str, list[int]]:
    """`PATH-mapping.json`: file basename -> the log indices that file holds."""
    try:
        with open(mapping_path, encoding="utf-8") as f:
            mapping = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise XLoraError(f"load_scalings_arrays: {mapping_path}: cannot read it ({e})") from None
    if not isinstance(mapping, dict) or not all(
            isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            for v in mapping.values()):
        raise XLoraError(f"load_scalings_arrays: {mapping_path}: expected a JSON object file name -> list of "
                         f"indices")
    return mapping
