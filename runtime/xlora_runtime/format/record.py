"""The graph's metadata record: one JSON object, the `xlora_export` entry of an exported graph's metadata_props
(`contract.METADATA_KEY`), with `"format_version": contract.FORMAT_VERSION` first. `GraphInfo` is its one typed form:

    GraphInfo.build(path, ...)      the exporter, from plain values (the caches, hints and files derived here)
    info.to_json()                  the text it writes; info.to_dict() the object (a sidecar embeds it)
    GraphInfo.parse(text, path)     strict, the one parser: every missing or ill-typed field is one XLoraError
                                    naming the file and the field
    GraphInfo.read(onnx_path)       an ONNX file's record, read without loading the graph (`graph_file`)
    peek(text), peek_file(path)     lenient, for checks before a backend opens a graph: the fields that read

Each field is declared once, in `GraphInfo` below, with its JSON key and its check; parsing, writing and peeking
walk those declarations, so a new field is one declaration here (and the exporter's value for it). Fields added
after the first exports of format_version 1 have defaults that say what those exports are: `attention` "onnx",
`logits` "all", no `classifier_sha256`, no `files.chat_template`, no `quantization` (a float graph). Keys that no
declaration names (`sliding_windows`, which early exports wrote) are ignored.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, NamedTuple

from ..errors import XLoraError, brief
from . import contract as C
from .graph_file import read_metadata_props

__all__ = ["CacheSpec", "Files", "GraphInfo", "ProfileHints", "Quantization", "peek", "peek_file"]


class _InvalidError(Exception):
    """A value the format does not allow: (dotted key, the value, what was expected)."""


class _LackingError(Exception):
    """Required keys absent: (dotted keys,)."""


class _Codec(NamedTuple):
    """How one field is read from JSON (`load(value, dotted key)`, raising _InvalidError) and written back."""

    load: Callable[[Any, str], Any]
    dump: Callable[[Any], Any]


def _same(value: Any) -> Any:
    return value


def _checked(test: Callable[[Any], bool], expected: str) -> _Codec:
    def load(value: Any, key: str) -> Any:
        if not test(value):
            raise _InvalidError(key, value, expected)
        return value
    return _Codec(load, _same)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(low: int) -> _Codec:
    return _checked(lambda v: _is_int(v) and v >= low, f"an int >= {low}")


_ANY_INT = _checked(_is_int, "an int")
_TEXT = _checked(lambda v: isinstance(v, str), "a string")
_BOOL = _checked(lambda v: isinstance(v, bool), "true or false")
_OBJECT = _checked(lambda v: isinstance(v, dict), "a JSON object")
_STRINGS = _checked(lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
                    "an object of strings")


def _choice(*options: str) -> _Codec:
    return _checked(lambda v: v in options, f"one of {', '.join(repr(o) for o in options)}")


def _optional(codec: _Codec) -> _Codec:
    return _Codec(lambda v, key: None if v is None else codec.load(v, key),
                  lambda v: None if v is None else codec.dump(v))


def _list_of(test: Callable[[Any], bool], expected: str) -> _Codec:
    return _Codec(_checked(lambda v: isinstance(v, list) and all(test(x) for x in v), expected).load,
                  lambda v: list(v))


def _names() -> _Codec:
    """An object name -> index (the graph's order) read as the names in that order, written back as the object."""
    def load(value: Any, key: str) -> list[str]:
        if not isinstance(value, dict) or not all(_is_int(i) for i in value.values()) or \
                sorted(value.values()) != list(range(len(value))):
            raise _InvalidError(key, value, "an object of name: index, the indices 0..n-1")
        return sorted(value, key=value.get)
    return _Codec(load, lambda names: {name: i for i, name in enumerate(names)})


def _nested(cls: type) -> _Codec:
    return _Codec(lambda v, key: _load(cls, v, key + "."), lambda v: v.to_dict())


def _caches() -> _Codec:
    """Cache name ("real", "scaling") -> CacheSpec; the real cache is always there."""
    def load(value: Any, key: str) -> dict[str, CacheSpec]:
        if not isinstance(value, dict):
            raise _InvalidError(key, value, "a JSON object")
        if "real" not in value:
            raise _LackingError([f"{key}.real"])
        return {name: _load(CacheSpec, spec, f"{key}.{name}.") for name, spec in value.items()}
    return _Codec(load, lambda caches: {name: spec.to_dict() for name, spec in caches.items()})


def _key(key: str, codec: _Codec, default: Any = MISSING, omit_none: bool = False) -> Any:
    """A field that is the JSON key `key` (`omit_none`: not written while None)."""
    return field(default=default, metadata={"key": key, "codec": codec, "omit_none": omit_none})


def _declared(cls: type) -> list[Any]:
    return [f for f in fields(cls) if "key" in f.metadata]


def _load(cls: type, obj: Any, prefix: str = "", **given: Any) -> Any:
    """An instance of `cls` from its JSON object (keys under `prefix` in messages), with the fields `given`.

    Raises:
        _LackingError: the required keys absent (all of them); _InvalidError: the first value of the wrong kind.
    """
    if not isinstance(obj, dict):
        raise _InvalidError(prefix.rstrip("."), obj, "a JSON object")
    declared = _declared(cls)
    missing = [prefix + f.metadata["key"] for f in declared if f.metadata["key"] not in obj and f.default is MISSING]
    if missing:
        raise _LackingError(missing)
    return cls(**given, **{f.name: f.metadata["codec"].load(obj[f.metadata["key"]], prefix + f.metadata["key"])
                           for f in declared if f.metadata["key"] in obj})


class _Json:
    """`to_dict` for the record's dataclasses: every declared field under its key, in declaration order."""

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in _declared(type(self)):
            value = getattr(self, f.name)
            if value is not None or not f.metadata["omit_none"]:
                out[f.metadata["key"]] = f.metadata["codec"].dump(value)
        return out


@dataclass(frozen=True, kw_only=True)
class CacheSpec(_Json):
    """One cache's inputs (`past_key_values.{i}.key|value`, or the scaling pass's), their dims and dtype."""

    inputs: list[str] = _key("inputs", _list_of(lambda v: isinstance(v, str), "a list of input names"))
    shape: list[str | int] = _key("shape", _list_of(lambda v: isinstance(v, str) or _is_int(v),
                                                    "a list of dimension names and sizes"))
    dtype: str = _key("dtype", _choice(*C.GRAPH_DTYPES.values()))


@dataclass(frozen=True, kw_only=True)
class ProfileHints(_Json):
    """What the export was sized for (`xlora-export --max-batch`, the model's positions): the TensorRT profiles'
    default limits (`profiles.limits_for`)."""

    max_batch: int = _key("max_batch", _int(1))
    max_sequence: int = _key("max_sequence", _int(1))
    max_past: int = _key("max_past", _int(1))


@dataclass(frozen=True, kw_only=True)
class Files(_Json):
    """The companions' file names, beside the graph (None: not exported, or not there to carry)."""

    frozen: str | None = _key("frozen", _optional(_TEXT))
    tokenizer: str | None = _key("tokenizer", _optional(_TEXT))
    chat_template: str | None = _key("chat_template", _optional(_TEXT), default=None)


@dataclass(frozen=True, kw_only=True)
class Quantization(_Json):
    """How `xlora-export --quantize` quantized the graph's base projections (xlora-parity and low_memory read it)."""

    mode: str = _key("mode", _choice("int8", "int4"))
    lm_head: bool = _key("lm_head", _BOOL)
    block_size: int | None = _key("block_size", _optional(_int(1)), default=None, omit_none=True)  # int4
    accuracy_level: int | None = _key("accuracy_level", _optional(_int(0)), default=None, omit_none=True)  # int4
    per_channel: bool | None = _key("per_channel", _optional(_BOOL), default=None, omit_none=True)  # int8


@dataclass(frozen=True, kw_only=True)
class GraphInfo(_Json):
    """What an exported graph's metadata record says about it, and where the graph is (`path`: the file the record
    was read from, or will be written into; its companions are found beside it)."""

    path: str
    graph: str = _key("graph", _choice(C.GRAPH_TWO_PASS, C.GRAPH_FROZEN))
    producer: str = _key("producer", _TEXT)
    versions: dict[str, str] = _key("versions", _STRINGS)  # package -> version, of the exporting environment
    source: str = _key("source", _TEXT)  # the checkpoint folder
    classifier_sha256: str | None = _key("classifier_sha256", _optional(_TEXT), default=None)
    architecture: str = _key("architecture", _TEXT)  # transformers' model_type
    dtype: str = _key("dtype", _choice(*C.GRAPH_DTYPES))  # --dtype: "fp32", "fp16", "bf16"
    opset: int = _key("opset", _int(1))
    num_layers: int = _key("num_layers", _int(1))
    kv_heads: int = _key("num_key_value_heads", _int(1))
    head_dim: int = _key("head_dim", _int(1))
    hidden_size: int = _key("hidden_size", _int(1))
    vocab_size: int = _key("vocab_size", _int(1))
    max_positions: int = _key("max_position_embeddings", _int(1))
    n_modules: int = _key("n_modules", _int(1))  # L: the adapted modules, the scalings' third axis
    n_experts: int = _key("n_experts", _int(1))  # n: the experts, the scalings' last axis
    module_names: list[str] = _key("modules", _names())
    expert_names: list[str] = _key("adapters", _names())
    config: dict[str, Any] = _key("config", _OBJECT)  # the checkpoint's X-LoRA config
    default_top_k: int = _key("default_top_k", _int(0))  # 0: dense
    caches: dict[str, CacheSpec] = _key("caches", _caches())  # "real" and, in the two-pass graph, "scaling"
    logits: str = _key("logits", _choice(C.LOGITS_LAST, C.LOGITS_ALL), default=C.LOGITS_ALL)
    attention: str = _key("attention", _choice(*C.ATTENTIONS), default=C.ATTENTION_ONNX)
    eos_token_ids: list[int] = _key("eos_token_id", _list_of(_is_int, "a list of token ids"))
    pad_token: int | None = _key("pad_token_id", _optional(_ANY_INT))  # as the config has it; see pad_token_id
    bos_token_id: int | None = _key("bos_token_id", _optional(_ANY_INT))
    tensorrt_profile: ProfileHints = _key("tensorrt_profile", _nested(ProfileHints))
    files: Files = _key("files", _nested(Files))
    quantization: Quantization | None = _key("quantization", _optional(_nested(Quantization)), default=None,
                                             omit_none=True)

    # ------------------------------------------------------------------------------------------------- writing
    @classmethod
    def build(cls, path: str, *, frozen: bool, producer: str, versions: dict[str, str], source: str,
              classifier_sha256: str, architecture: str, dtype: str, opset: int, num_layers: int, kv_heads: int,
              head_dim: int, hidden_size: int, vocab_size: int, max_positions: int, module_names: list[str],
              expert_names: list[str], config: dict[str, Any], default_top_k: int, all_logits: bool, attention: str,
              eos_token_ids: list[int], pad_token_id: int | None, bos_token_id: int | None, max_batch: int,
              frozen_file: str | None, tokenizer_file: str | None, chat_template_file: str | None) -> GraphInfo:
        """The record of one graph the exporter writes to `path` (the frozen graph's when `frozen`), from plain
        values: the caches follow from the contract, the TensorRT hints from `max_batch` and the positions.

        Args:
            dtype: `--dtype` ("fp32", "fp16", "bf16").
            module_names, expert_names: in the graph's order (the scalings' axes).
            frozen_file, tokenizer_file, chat_template_file: the companions' file names, None where there is none.
        """
        shape: list[str | int] = [C.BATCH, kv_heads, C.PAST_SEQUENCE, head_dim]
        caches = {"real": CacheSpec(inputs=C.past_names(num_layers), shape=shape, dtype=C.GRAPH_DTYPES[dtype])}
        if not frozen:
            caches["scaling"] = CacheSpec(inputs=C.past_names(num_layers, scaling=True), shape=shape,
                                          dtype=C.GRAPH_DTYPES[dtype])
        return cls(path=path, graph=C.GRAPH_FROZEN if frozen else C.GRAPH_TWO_PASS, producer=producer,
                   versions=dict(versions), source=source, classifier_sha256=classifier_sha256,
                   architecture=architecture, dtype=dtype, opset=opset, num_layers=num_layers, kv_heads=kv_heads,
                   head_dim=head_dim, hidden_size=hidden_size, vocab_size=vocab_size, max_positions=max_positions,
                   n_modules=len(module_names), n_experts=len(expert_names), module_names=list(module_names),
                   expert_names=list(expert_names), config=dict(config), default_top_k=default_top_k, caches=caches,
                   logits=C.LOGITS_ALL if all_logits else C.LOGITS_LAST, attention=attention,
                   eos_token_ids=list(eos_token_ids), pad_token=pad_token_id, bos_token_id=bos_token_id,
                   tensorrt_profile=ProfileHints(max_batch=max_batch, max_sequence=max_positions,
                                                 max_past=max_positions),
                   files=Files(frozen=frozen_file, tokenizer=tokenizer_file, chat_template=chat_template_file))

    def to_dict(self) -> dict[str, Any]:
        """The record as a JSON object: `format_version`, then every field under its key, in declaration order."""
        return {"format_version": C.FORMAT_VERSION, **super().to_dict()}

    def to_json(self) -> str:
        """The record's text, as the exporter writes it into the graph."""
        return json.dumps(self.to_dict())

    # ------------------------------------------------------------------------------------------------- reading
    @classmethod
    def parse(cls, text: str | dict[str, Any] | None, path: str) -> GraphInfo:
        """The record of the graph at `path`, from its text (or its already decoded object; None: the graph has none).

        Raises:
            XLoraError: no record, not JSON, not an object, another format_version, required keys absent (all named
                at once), a field of the wrong kind (named with its value and what was expected).
        """
        if text is None:
            raise XLoraError(f"{path}: not an X-LoRA export (no '{C.METADATA_KEY}' metadata record)")
        obj = text
        if isinstance(text, str):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record is not a JSON object")
        if obj.get("format_version") != C.FORMAT_VERSION:
            raise XLoraError(f"{path}: metadata format_version {brief(obj.get('format_version'))}; this runtime "
                             f"reads {C.FORMAT_VERSION}")
        try:
            return _load(cls, obj, path=path)
        except _LackingError as e:
            raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record lacks {e.args[0]}") from None
        except _InvalidError as e:
            key, value, expected = e.args
            raise XLoraError(f"{path}: the '{C.METADATA_KEY}' metadata record: {key} is {brief(value)}; expected "
                             f"{expected}") from None

    @classmethod
    def read(cls, onnx_path: str) -> GraphInfo:
        """The record of an ONNX file, read without loading the graph or its weights.

        Raises:
            XLoraError: no such file, not an ONNX file, and what `parse` refuses.
        """
        if not os.path.isfile(onnx_path):
            raise XLoraError(f"{onnx_path}: no such file (expected an .onnx graph written by xlora-export)")
        props = read_metadata_props(onnx_path)
        if props is None:
            raise XLoraError(f"{onnx_path}: not an ONNX file")
        return cls.parse(props.get(C.METADATA_KEY), onnx_path)

    # ------------------------------------------------------------------------------------------------ accessors
    @property
    def cache_dtype(self) -> str:
        """The caches' dtype: "float32", "float16" or "bfloat16"."""
        return self.caches["real"].dtype

    @property
    def pad_token_id(self) -> int:
        """The id left padding uses: the config's pad token, else the first end-of-sequence id, else 0."""
        if self.pad_token is not None:
            return self.pad_token
        return self.eos_token_ids[0] if self.eos_token_ids else 0

    def _companion(self, name: str | None) -> str | None:
        path = os.path.join(os.path.dirname(os.path.abspath(self.path)), name) if name else None
        return path if path and os.path.isfile(path) else None

    @property
    def frozen_path(self) -> str | None:
        """`OUT.frozen.onnx` (or `OUT.frozen.engine`) when it was exported and is present."""
        return self._companion(self.files.frozen)

    @property
    def tokenizer_path(self) -> str | None:
        """`OUT.tokenizer.json` when it travelled with the export."""
        return self._companion(self.files.tokenizer)

    @property
    def chat_template_path(self) -> str | None:
        """`OUT.chat_template.jinja` when the checkpoint's tokenizer had a chat template."""
        return self._companion(self.files.chat_template)


def peek(text: str | None) -> dict[str, Any]:
    """The fields of a record that read, before it is parsed: field name -> value for every field present and of
    its kind, and every optional field's default otherwise (a record that is absent, not JSON or not an object
    gives the defaults alone). Unknown keys and any format_version are let through: `parse` reports them.
    For checks that must run before a backend opens the graph (what its provider cannot run), and for backends
    that read a field while the graph opens."""
    try:
        obj = json.loads(text) if text else {}
    except json.JSONDecodeError:
        obj = {}
    if not isinstance(obj, dict):
        obj = {}
    out = {}
    for f in _declared(GraphInfo):
        key = f.metadata["key"]
        if key in obj:
            try:
                out[f.name] = f.metadata["codec"].load(obj[key], key)
                continue
            except (_InvalidError, _LackingError):
                pass
        if f.default is not MISSING:
            out[f.name] = f.default
    return out


def peek_file(path: str) -> dict[str, Any]:
    """`peek` of an ONNX file's record (the defaults alone when the file cannot be read as one)."""
    try:
        props = read_metadata_props(path) or {}
    except OSError:
        props = {}
    return peek(props.get(C.METADATA_KEY))
