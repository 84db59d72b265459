"""Read a few numeric columns of the tf.train.Example records in a TFRecord file without reading the rest.

An RLDS episode is one Example whose step features are flattened lists (`steps/action`, `steps/observation/image`,
...). The statistics pass needs only the action and state lists, a few KB of a record that holds megabytes of JPEG
bytes. This reader maps the file, walks each record's protobuf framing (Example -> Features -> map entry -> Feature)
and jumps over every field it was not asked for, so the image bytes are never read, copied or checksummed: the pass
costs what the numbers cost, not what the images cost. (TFRecordDataset reads and CRC-checks every byte.)

Wire format facts used (protobuf encoding; TFRecord framing): a record is uint64 length, uint32 masked CRC of the
length, the data, uint32 masked CRC of the data, little-endian. Example.features = 1, Features.feature = 1 (map
entries: key = 1, value = 2), Feature.bytes_list = 1 / float_list = 2 / int64_list = 3, each list's values = 1,
packed or not.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from pathlib import Path

import numpy as np

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


def _varint(buffer, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buffer[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result & 0xFFFF_FFFF_FFFF_FFFF, pos  # protobuf keeps the low 64 bits of an over-long varint
        shift += 7


def _fields(buffer, start: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field number, wire type, value start, value end) of each field in buffer[start:end]; a varint's value span
    is its bytes, a fixed-width value's its 4 or 8 bytes."""
    pos = start
    while pos < end:
        tag, pos = _varint(buffer, pos)
        wire = tag & 7
        if wire == _VARINT:
            _, after = _varint(buffer, pos)
        elif wire == _LEN:
            length, pos = _varint(buffer, pos)
            after = pos + length
        elif wire in (_I32, _I64):
            after = pos + (4 if wire == _I32 else 8)
        else:
            raise ValueError(f"unsupported protobuf wire type {wire} at byte {pos}")
        if after > end:
            raise ValueError(f"a protobuf field runs past its message (byte {after} > {end})")
        yield tag >> 3, wire, pos, after
        pos = after


def _feature_values(buffer, start: int, end: int):
    """A Feature message -> float32 array, int64 array or list of bytes."""
    for kind, _, list_start, list_end in _fields(buffer, start, end):
        if kind == 2:  # float_list
            chunks = []
            for _, _, a, b in _fields(buffer, list_start, list_end):
                chunks.append(np.frombuffer(buffer[a:b], "<f4"))  # packed (LEN) or a single value (I32)
            return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        if kind == 3:  # int64_list
            values = []
            for _, _, a, b in _fields(buffer, list_start, list_end):
                pos = a
                while pos < b:  # a packed run of varints, or one varint
                    value, pos = _varint(buffer, pos)
                    values.append(value - (1 << 64) if value >= 1 << 63 else value)
            return np.asarray(values, np.int64)
        if kind == 1:  # bytes_list
            return [bytes(buffer[a:b]) for _, _, a, b in _fields(buffer, list_start, list_end)]
    return np.zeros(0, np.float32)  # an empty Feature


def _example_columns(buffer, start: int, end: int, keys: set[str]) -> dict:
    out = {}
    for field, _, features_start, features_end in _fields(buffer, start, end):
        if field != 1:
            continue
        for entry_field, _, entry_start, entry_end in _fields(buffer, features_start, features_end):
            if entry_field != 1:
                continue
            key, value = None, None
            for part, _, a, b in _fields(buffer, entry_start, entry_end):
                if part == 1:
                    key = bytes(buffer[a:b]).decode()
                elif part == 2:
                    value = (a, b)
            if key in keys and value is not None:
                out[key] = _feature_values(buffer, *value)
    return out


def read_columns(path: str | Path, keys: list[str]) -> Iterator[dict]:
    """{key: values} of every record in the file, for the given feature keys only (a key a record lacks is absent).
    Float lists come back float32, int64 lists int64, bytes lists as lists of bytes. A truncated file raises OSError
    naming it; a record whose bytes are not an Example raises ValueError naming the file and record."""
    wanted = set(keys)
    path = Path(path)
    with open(path, "rb") as file:
        if path.stat().st_size == 0:
            return
        with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
            size, pos, index = len(buffer), 0, 0
            while pos < size:
                if pos + 12 > size:
                    raise OSError(f"{path.name}: truncated TFRecord file (a record header cut at byte {pos})")
                length = int.from_bytes(buffer[pos : pos + 8], "little")
                start, end = pos + 12, pos + 12 + length
                if end + 4 > size:
                    raise OSError(
                        f"{path.name}: truncated TFRecord file (record {index} declares {length} bytes, "
                        f"{max(size - start, 0)} are left)"
                    )
                try:
                    columns = _example_columns(buffer, start, end, wanted)
                except (ValueError, IndexError, OverflowError) as e:
                    raise ValueError(f"{path.name}: record {index} is not a tf.train.Example: {e}") from e
                yield columns
                pos, index = end + 4, index + 1
