"""A TensorRT engine's sidecar, `OUT.engine.json` beside `OUT.engine` (written by `xlora-engine`, read by the
`trt-engine` backend): what the engine itself cannot say.

    {"format": "xlora-engine", "format_version": 1,
     "source": the ONNX graph it was built from, "tensorrt": the builder's version,
     "limits": {max_batch, max_sequence, max_total, opt_batch, opt_sequence, opt_total},
     "metadata": the graph's metadata record (`record.GraphInfo`), its "files" naming the engine's companions,
     "profiles": [{"name": "prefill" | "decode", "inputs": {input: {"min": dims, "opt": dims, "max": dims}}}, ...]}

The profiles are listed in the engine's order (a profile's index is its place in the list).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from ..errors import XLoraError
from .record import GraphInfo

__all__ = ["SIDECAR_FORMAT", "SIDECAR_VERSION", "Shapes", "engine_companions", "read_sidecar", "sidecar",
           "write_sidecar"]

SIDECAR_FORMAT = "xlora-engine"
SIDECAR_VERSION = 1
Shapes = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max) shapes
_POINTS = ("min", "opt", "max")


def _stem(engine_path: str) -> str:
    return engine_path[:-len(".engine")] if engine_path.endswith(".engine") else engine_path


def engine_companions(engine_path: str) -> dict[str, str]:
    """The files beside `OUT.engine`: the frozen engine, the tokenizer, the sidecar, the timing cache."""
    stem = _stem(engine_path)
    return {"frozen": stem + ".frozen.engine", "tokenizer": stem + ".tokenizer.json",
            "sidecar": engine_path + ".json",
            "timing_cache": os.path.join(os.path.dirname(os.path.abspath(engine_path)), "xlora-timing.cache")}


def sidecar(info: GraphInfo, limits: dict[str, int], profiles: dict[str, Shapes], source: str,
            tensorrt_version: str) -> dict[str, Any]:
    """The sidecar of one engine.

    Args:
        info: the graph's record, its `files` naming the engine's companions.
        limits: what the profiles cover (`profiles.ProfileLimits.as_dict`).
        profiles: name -> (min, opt, max) shape of every dynamic input, in the engine's order.
        source: the ONNX graph the engine was built from.
    """
    return {"format": SIDECAR_FORMAT, "format_version": SIDECAR_VERSION, "source": source,
            "tensorrt": tensorrt_version, "limits": dict(limits), "metadata": info.to_dict(),
            "profiles": [{"name": name, "inputs": {input_name: dict(zip(_POINTS, map(list, shape)))
                                                   for input_name, shape in profile.items()}}
                         for name, profile in profiles.items()]}


def write_sidecar(engine_path: str, content: dict[str, Any]) -> str:
    """Write `OUT.engine.json`; returns its path."""
    path = engine_companions(engine_path)["sidecar"]
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=1)
    return path


def read_sidecar(engine_path: str) -> tuple[GraphInfo, list[Shapes]]:
    """(the graph's record, its path the engine's; the profiles, in the engine's order) from `OUT.engine.json`.

    Raises:
        XLoraError: no sidecar, not JSON, not an xlora-engine sidecar, another version, a record `GraphInfo.parse`
            refuses (named as the sidecar's), profiles that are not lists of min/opt/max dims per input.
    """
    path = engine_companions(engine_path)["sidecar"]
    if not os.path.isfile(path):
        raise XLoraError(f"{engine_path}: not an X-LoRA engine (no sidecar {os.path.basename(path)} beside it; "
                         f"build it with xlora-engine)")
    try:
        with open(path, encoding="utf-8") as f:
            content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise XLoraError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(content, dict) or content.get("format") != SIDECAR_FORMAT:
        raise XLoraError(f"{path}: not an xlora-engine sidecar (no \"format\": \"{SIDECAR_FORMAT}\")")
    if content.get("format_version") != SIDECAR_VERSION:
        raise XLoraError(f"{path}: sidecar format_version {content.get('format_version')!r}; this runtime reads "
                         f"{SIDECAR_VERSION}")
    info = GraphInfo.parse(content.get("metadata"), path)
    try:
        profiles = [{name: tuple(tuple(_dim(d) for d in shape[k]) for k in _POINTS)
                     for name, shape in p["inputs"].items()} for p in content["profiles"]]
    except (KeyError, TypeError, AttributeError, ValueError):
        raise XLoraError(f'{path}: "profiles": expected a list of {{"name", "inputs": {{input: {{"min", "opt", '
                         f'"max": dims}}}}}}') from None
    return dataclasses.replace(info, path=engine_path), profiles


def _dim(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(value)
    return value
