"""What an ONNX file says about itself, read without loading the graph or its weights (no onnx package).

An ONNX file is one serialized `ModelProto`. `read_metadata_props` walks its top-level fields, reading only the
metadata entries and seeking past everything else (the graph, whose initializers may be gigabytes), so that
the engine builder, the TensorRT execution provider's profiles and the Triton repository writer can read the
`xlora_export` record in milliseconds. `external_tensors` reads the graph's table of initializers kept in
external-data files (name, element type, shape, file, offset, length), so that the runtime can map each
file once and hand the same bytes to every session (`backends/onnxruntime.py`, low_memory).

    ModelProto:              field 7 = GraphProto, field 14 = StringStringEntryProto (repeated)
    GraphProto:              field 5 = TensorProto (repeated: the initializers)
    TensorProto:             field 1 = dims (int64, packed or not), 2 = data_type, 8 = name,
                             13 = external_data (StringStringEntryProto: location, offset, length), 14 = data_location
    StringStringEntryProto:  field 1 = key (string), field 2 = value (string)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import BinaryIO

__all__ = ["ExternalTensor", "external_tensors", "read_metadata_props"]

_GRAPH, _METADATA_PROPS = 7, 14
_INITIALIZER = 5
_DIMS, _DATA_TYPE, _NAME, _EXTERNAL_DATA, _DATA_LOCATION = 1, 2, 8, 13, 14
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
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


def _fields(data: bytes | memoryview):
    """(field number, wire type, value) of every field of one serialized message: an int for varints and fixed
    widths, a memoryview for length-delimited fields."""
    data = memoryview(data)
    i = 0
    while i < len(data):
        tag, i = _varint_at(data, i)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            value, i = _varint_at(data, i)
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            value, i = int.from_bytes(data[i:i + width], "little"), i + width
        elif wire == _LENGTH:
            size, i = _varint_at(data, i)
            value, i = data[i:i + size], i + size
            if i > len(data):
                raise ValueError("a field runs past the end of its message")
        else:
            raise ValueError(f"field {number} has wire type {wire}")
        yield number, wire, value


def _entry(data: bytes | memoryview) -> tuple[str, str]:
    """(key, value) of one serialized StringStringEntryProto."""
    fields: dict[int, str] = {}
    for number, wire, value in _fields(data):
        if wire != _LENGTH:
            raise ValueError(f"metadata entry field {number} has wire type {wire}")
        fields[number] = bytes(value).decode("utf-8")
    return fields.get(1, ""), fields.get(2, "")


def _varint_at(data: bytes | memoryview, i: int) -> tuple[int, int]:
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


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer whose bytes live in an external-data file."""

    name: str
    data_type: int  # TensorProto.DataType (1 float, 10 float16, 16 bfloat16, 2 uint8, 3 int8, 7 int64, ...)
    shape: tuple[int, ...]
    location: str  # the data file's path, relative to the graph's folder
    offset: int
    length: int


def _tensor(data: memoryview) -> ExternalTensor | None:
    """The external-data record of one serialized TensorProto (None: its bytes are inside the graph)."""
    name, data_type, dims, external, location = "", 0, [], {}, 0
    for number, wire, value in _fields(data):
        if number == _NAME:
            name = bytes(value).decode("utf-8")
        elif number == _DATA_TYPE:
            data_type = value
        elif number == _DIMS and wire == _VARINT:
            dims.append(value)
        elif number == _DIMS:  # packed
            i = 0
            while i < len(value):
                dim, i = _varint_at(value, i)
                dims.append(dim)
        elif number == _EXTERNAL_DATA:
            key, text = _entry(value)
            external[key] = text
        elif number == _DATA_LOCATION:
            location = value
    if location != _EXTERNAL:
        return None
    return ExternalTensor(name, data_type, tuple(dims), external["location"], int(external.get("offset", 0)),
                          int(external["length"]))


def external_tensors(path: str) -> list[ExternalTensor]:
    """The initializers of an ONNX file that are stored in external-data files, in the graph's order.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is not a well-formed ModelProto, or an external tensor has no location or length.
    """
    with open(path, "rb") as f:
        data = f.read()
    tensors = []
    for number, wire, graph in _fields(data):
        if number != _GRAPH or wire != _LENGTH:
            continue
        for field, kind, value in _fields(graph):
            if field == _INITIALIZER and kind == _LENGTH:
                try:
                    tensor = _tensor(value)
                except KeyError as e:
                    raise ValueError(f"an external initializer has no {e.args[0]!r}") from None
                if tensor is not None:
                    tensors.append(tensor)
    return tensors
