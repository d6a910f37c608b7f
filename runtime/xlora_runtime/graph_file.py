"""The metadata record of an ONNX file, read without loading the graph or its weights (no onnx package).

An ONNX file is one serialized `ModelProto`; its `metadata_props` (field 14) are key/value string pairs at the
top level. This walks the top-level fields, reading only the metadata entries and seeking past everything
else (the graph, whose initializers may be gigabytes), so that the engine builder, the TensorRT execution
provider's profiles and the Triton repository writer can read the `xlora_export` record in milliseconds.

    ModelProto:              field 14 (length-delimited) = StringStringEntryProto, repeated
    StringStringEntryProto:  field 1 = key (string), field 2 = value (string)
"""

from __future__ import annotations

import os
from typing import BinaryIO

__all__ = ["read_metadata_props"]

_METADATA_PROPS = 14
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


def _varint(f: BinaryIO) -> int | None:
    """The next base-128 varint, or None at the end of the file."""
    value, shift = 0, 0
    while byte := f.read(1):
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            raise ValueError("a varint longer than 10 bytes")
    if shift:
        raise ValueError("the file ends inside a varint")
    return None


def _entry(data: bytes) -> tuple[str, str]:
    """(key, value) of one serialized StringStringEntryProto."""
    fields: dict[int, str] = {}
    i = 0
    while i < len(data):
        tag, i = _varint_at(data, i)
        number, wire = tag >> 3, tag & 7
        if wire != _LENGTH:
            raise ValueError(f"metadata entry field {number} has wire type {wire}")
        size, i = _varint_at(data, i)
        fields[number] = data[i:i + size].decode("utf-8")
        i += size
    return fields.get(1, ""), fields.get(2, "")


def _varint_at(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data):
            raise ValueError("a metadata entry ends inside a varint")
        value |= (data[i] & 0x7F) << shift
        i += 1
        if data[i - 1] < 0x80:
            return value, i
        shift += 7


def read_metadata_props(path: str) -> dict[str, str] | None:
    """The `metadata_props` of an ONNX file as a dict (last value wins, as in onnx).

    Returns:
        The entries, or None when the file is not a well-formed ModelProto at its top level.
    Raises:
        OSError: the file cannot be read.
    """
    size = os.path.getsize(path)
    props: dict[str, str] = {}
    with open(path, "rb") as f:
        try:
            while True:
                tag = _varint(f)
                if tag is None:
                    return props
                number, wire = tag >> 3, tag & 7
                if number == 0:
                    return None
                if wire == _VARINT:
                    _varint(f)
                elif wire == _FIXED64:
                    f.seek(8, os.SEEK_CUR)
                elif wire == _FIXED32:
                    f.seek(4, os.SEEK_CUR)
                elif wire == _LENGTH:
                    length = _varint(f)
                    if length is None or f.tell() + length > size:
                        return None
                    if number == _METADATA_PROPS:
                        key, value = _entry(f.read(length))
                        props[key] = value
                    else:
                        f.seek(length, os.SEEK_CUR)
                else:
                    return None
                if f.tell() > size:
                    return None
        except (ValueError, UnicodeDecodeError):
            return None
