"""TFRecord files and ``tf.train.Example`` protos without TensorFlow (or any protobuf package).

A TFRecord file is a sequence of records::

    uint64 length | uint32 masked_crc32c(length) | bytes data[length] | uint32 masked_crc32c(data)

and a TFDS-prepared split stores one serialised ``tf.train.Example`` per record::

    Example  { Features features = 1; }
    Features { map<string, Feature> feature = 1; }      # map entry: key = 1, value = 2
    Feature  { oneof { BytesList bytes_list = 1; FloatList float_list = 2; Int64List int64_list = 3; } }
    *List    { repeated value = 1; }                    # floats / int64s usually packed

TFDS stores ``Image`` features as encoded PNG/JPEG bytes, so decoding them with Pillow gives the exact
pixels of the reference pipeline for PNG (JPEG decoders may differ by one grey level).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from typing import Any, BinaryIO

from vptune.errors import VptuneError

FeatureValue = list[bytes] | list[float] | list[int]

# ------------------------------------------------------------------------------------------------------
# CRC-32C (Castagnoli), table driven, and TFRecord's masking
# ------------------------------------------------------------------------------------------------------


def _make_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _make_table()


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (pure Python; about 1 MB/s, fine for headers and small test files)."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for b in data:
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC: rotate right by 15 and add a constant."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


# ------------------------------------------------------------------------------------------------------
# Record framing
# ------------------------------------------------------------------------------------------------------


def scan_records(path: str | os.PathLike) -> Iterator[tuple[int, int]]:
    """Yield ``(offset_of_data, length)`` of every record, checking the length CRCs (data not read)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            header = f.read(12)
            if len(header) < 12:
                raise VptuneError(f"truncated TFRecord file {path}: partial header at byte {pos}")
            (length,) = struct.unpack("<Q", header[:8])
            (len_crc,) = struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != len_crc:
                raise VptuneError(f"corrupt TFRecord file {path}: bad length checksum at byte {pos}")
            if pos + 12 + length + 4 > size:
                raise VptuneError(f"truncated TFRecord file {path}: record at byte {pos} runs past the end")
            yield pos + 12, length
            pos += 12 + length + 4
            f.seek(pos)


def read_record(f: BinaryIO, offset: int, length: int, verify: bool = False, name: str = "") -> bytes:
    """Read one record's data at ``offset`` (from :func:`scan_records`); optionally check its CRC."""
    f.seek(offset)
    data = f.read(length)
    crc = f.read(4)
    if len(data) != length or len(crc) != 4:
        raise VptuneError(f"truncated TFRecord record at byte {offset} of {name or 'file'}")
    if verify and struct.unpack("<I", crc)[0] != masked_crc32c(data):
        raise VptuneError(f"corrupt TFRecord record at byte {offset} of {name or 'file'}: bad data checksum")
    return data


def write_records(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Write ``records`` as a TFRecord file (readable by TensorFlow); returns how many were written."""
    n = 0
    with open(path, "wb") as f:
        for data in records:
            head = struct.pack("<Q", len(data))
            f.write(head + struct.pack("<I", masked_crc32c(head)))
            f.write(data + struct.pack("<I", masked_crc32c(data)))
            n += 1
    return n


# ------------------------------------------------------------------------------------------------------
# Minimal protobuf wire format
# ------------------------------------------------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise VptuneError("malformed tf.train.Example: truncated varint")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(field_number, wire_type, value)``; LEN values are memoryviews, others ints/bytes."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = bytes(buf[pos:pos + 8]), pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        elif wire == 5:
            value, pos = bytes(buf[pos:pos + 4]), pos + 4
        else:
            raise VptuneError(f"malformed tf.train.Example: unsupported wire type {wire}")
        if pos > end:
            raise VptuneError("malformed tf.train.Example: field runs past the end")
        yield field, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_list(kind: int, buf: memoryview) -> FeatureValue:
    out: list[Any] = []
    for field, wire, value in _fields(buf):
        if field != 1:
            continue
        if kind == 1:  # bytes_list
            out.append(bytes(value))
        elif kind == 2:  # float_list: packed (LEN) or single fixed32
            raw = bytes(value)
            out.extend(struct.unpack(f"<{len(raw) // 4}f", raw))
        elif wire == 2:  # int64_list packed
            pos, mv = 0, value
            while pos < len(mv):
                v, pos = _varint(mv, pos)
                out.append(_signed64(v))
        else:
            out.append(_signed64(value))
    return out


def _parse_feature(buf: memoryview) -> FeatureValue:
    for field, _wire, value in _fields(buf):
        if field in (1, 2, 3):
            return _parse_list(field, value)
    return []


def parse_example(data: bytes, keys: Iterable[str] | None = None) -> dict[str, FeatureValue]:
    """Decode a serialised ``tf.train.Example`` into ``{key: list of values}``.

    ``keys``: only decode these features (others are skipped by length, so large image bytes cost nothing).
    """
    wanted = set(keys) if keys is not None else None
    out: dict[str, FeatureValue] = {}
    for field, _w, features in _fields(memoryview(data)):
        if field != 1:
            continue
        for f2, _w2, entry in _fields(features):
            if f2 != 1:
                continue
            key, value = None, None
            for f3, _w3, v in _fields(entry):
                if f3 == 1:
                    key = bytes(v).decode("utf-8")
                elif f3 == 2:
                    value = v
            if key is not None and (wanted is None or key in wanted):
                out[key] = _parse_feature(value) if value is not None else []
    return out


def _enc_varint(v: int) -> bytes:
    v &= (1 << 64) - 1
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _enc_len(field: int, payload: bytes) -> bytes:
    return _enc_varint(field << 3 | 2) + _enc_varint(len(payload)) + payload


def _enc_feature(value: Any) -> bytes:
    values = value if isinstance(value, (list, tuple)) else [value]
    if all(isinstance(v, (bytes, bytearray, str)) for v in values):
        items = b"".join(_enc_len(1, v.encode() if isinstance(v, str) else bytes(v)) for v in values)
        return _enc_len(1, items)
    if all(isinstance(v, int) for v in values):
        return _enc_len(3, _enc_len(1, b"".join(_enc_varint(int(v)) for v in values)))
    return _enc_len(2, _enc_len(1, struct.pack(f"<{len(values)}f", *[float(v) for v in values])))


def encode_example(features: dict[str, Any]) -> bytes:
    """Serialise ``{key: bytes | str | int | float | list of one kind}`` as a ``tf.train.Example``."""
    entries = b"".join(
        _enc_len(1, _enc_len(1, k.encode()) + _enc_len(2, _enc_feature(v))) for k, v in features.items()
    )
    return _enc_len(1, entries)


def write_examples(path: str | os.PathLike, examples: Iterable[dict[str, Any]]) -> int:
    """Write ``examples`` (dicts, see :func:`encode_example`) as a TFRecord file."""
    return write_records(path, (encode_example(e) for e in examples))


# ------------------------------------------------------------------------------------------------------
# VTAB's labels derived from TFDS features (task_adaptation, Apache-2.0)
# ------------------------------------------------------------------------------------------------------

# google-research/task_adaptation, task_adaptation/data/clevr.py: ``_closest_object_preprocess_fn`` takes
# ``dist = reduce_min(objects/pixel_coords[:, 2])`` (the depth coordinate of each object's pixel coords) and
# ``label = reduce_max(where(thrs - dist < 0))`` with these thresholds: 6 classes.
CLEVR_DIST_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def clevr_count_all(feats: dict[str, FeatureValue]) -> int:
    """VTAB ``clevr_count``: number of objects - 3 (scenes hold 3..10 objects -> 8 classes);
    task_adaptation clevr.py ``_count_preprocess_fn``: ``tf.size(x["objects"]["size"]) - 3``."""
    return len(feats.get("objects/size", [])) - 3


def clevr_closest_object_distance(feats: dict[str, FeatureValue]) -> int:
    """VTAB ``clevr_dist``: the bin of the smallest object depth (see :data:`CLEVR_DIST_THRESHOLDS`)."""
    coords = list(feats.get("objects/pixel_coords", []))
    if not coords or len(coords) % 3:
        raise VptuneError("CLEVR record without objects/pixel_coords (3 values per object)")
    dist = min(coords[2::3])
    return max(i for i, t in enumerate(CLEVR_DIST_THRESHOLDS) if t - dist < 0)


def _binned(key: str, factor: float) -> Any:
    """task_adaptation dsprites.py: ``floordiv(value, num_original_classes / num_classes)``."""
    def label(feats: dict[str, FeatureValue]) -> int:
        values = feats.get(key)
        if not values:
            raise VptuneError(f"dSprites record without feature {key!r}")
        return int(float(values[0]) // factor)
    return label


# name -> (TFDS feature keys to parse, label function, number of classes). TFDS flattens nested features
# with "/" (``objects/size``); VTAB task names (vptune's folder names) map to the same derivations.
DERIVED_LABELS: dict[str, tuple[tuple[str, ...], Any, int]] = {
    "clevr/count_all": (("objects/size",), clevr_count_all, 8),
    "clevr/closest_object_distance": (("objects/pixel_coords",), clevr_closest_object_distance, 6),
    # 32 x positions / 16 classes = 2; 40 orientations / 16 classes = 2.5 (VTAB-1k uses 16 classes for both)
    "dsprites/label_x_position": (("label_x_position",), _binned("label_x_position", 32 / 16), 16),
    "dsprites/label_orientation": (("label_orientation",), _binned("label_orientation", 40 / 16), 16),
}
DERIVED_LABELS["clevr_count"] = DERIVED_LABELS["clevr/count_all"]
DERIVED_LABELS["clevr_dist"] = DERIVED_LABELS["clevr/closest_object_distance"]
DERIVED_LABELS["dsprites_loc"] = DERIVED_LABELS["dsprites/label_x_position"]
DERIVED_LABELS["dsprites_ori"] = DERIVED_LABELS["dsprites/label_orientation"]

# Pixel scale per label rule: TFDS dSprites stores its (64, 64, 1) images with values 0/1, and VTAB
# multiplies them by 255 (task_adaptation, task_adaptation/data/dsprites.py, both preprocess fns:
# ``image = tf.tile(x["image"], [1, 1, 3]) * 255``). Rules not listed keep their pixels as decoded.
PIXEL_SCALE: dict[str, int] = {
    name: 255 for name in DERIVED_LABELS if name.startswith("dsprites")
}
