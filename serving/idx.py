"""Read and write MNIST's IDX files, gzip-compressed or raw.

An IDX file is a big-endian header, then the items as unsigned bytes, row-major:
images: magic 0x00000803, count, rows, cols, then count * rows * cols pixels;
labels: magic 0x00000801, count, then count labels.

Reading checks everything the header claims against the bytes that are there; any
mismatch raises `IdxError` naming the file, never a partial load.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from serving.atomic import write_bytes_atomically
from serving.contract import IMAGE_SIDE

IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
_KINDS = {IMAGES_MAGIC: "an images file", LABELS_MAGIC: "a labels file"}
_GZIP_MAGIC = b"\x1f\x8b"


class IdxError(ValueError):
    """An IDX file is missing, truncated, corrupt or not the kind expected."""


def read_payload(path: Path) -> bytes:
    """The IDX bytes of a file, decompressed if it is gzip (detected by content, not name)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise IdxError(f"{path}: cannot read: {error.strerror or error}") from error
    return decompress_if_gzip(data, path)


def decompress_if_gzip(data: bytes, name: str | Path) -> bytes:
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except EOFError as error:
        raise IdxError(f"{name}: truncated gzip stream ({len(data)} bytes)") from error
    except (OSError, zlib.error) as error:
        raise IdxError(f"{name}: corrupt gzip data: {error}") from error


def _header(payload: bytes, expected_magic: int, name: str | Path) -> tuple[int, ...]:
    """The dimension sizes after the magic number, checked against the expected kind."""
    if len(payload) < 4:
        raise IdxError(f"{name}: truncated: {len(payload)} bytes, too short for an IDX header")
    (magic,) = struct.unpack(">I", payload[:4])
    if magic != expected_magic:
        found = _KINDS.get(magic, "not an IDX file of unsigned bytes")
        raise IdxError(
            f"{name}: wrong magic number 0x{magic:08x} ({found}); expected "
            f"0x{expected_magic:08x} ({_KINDS[expected_magic]})"
        )
    dimensions = magic & 0xFF
    header_size = 4 + 4 * dimensions
    if len(payload) < header_size:
        raise IdxError(f"{name}: truncated header: {len(payload)} of {header_size} bytes")
    return struct.unpack(f">{dimensions}I", payload[4:header_size])


def _body(payload: bytes, shape: tuple[int, ...], what: str, name: str | Path) -> np.ndarray:
    """The items after the header, which must be exactly as many bytes as the header says."""
    header_size = 4 + 4 * len(shape)
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(payload) - header_size
    if actual < expected:
        raise IdxError(
            f"{name}: truncated: the header promises {shape[0]} {what} ({expected} bytes) "
            f"but only {actual} bytes follow it"
        )
    if actual > expected:
        raise IdxError(
            f"{name}: {actual - expected} unexpected bytes after the {shape[0]} {what} "
            "the header promises (corrupt header or wrong file)"
        )
    return np.frombuffer(payload, dtype=np.uint8, offset=header_size).reshape(shape).copy()


def parse_images(payload: bytes, name: str | Path = "<bytes>") -> np.ndarray:
    """IDX images as uint8 [count, 28, 28]."""
    count, rows, cols = _header(payload, IMAGES_MAGIC, name)
    if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
        raise IdxError(
            f"{name}: images are {rows}x{cols} pixels; expected {IMAGE_SIDE}x{IMAGE_SIDE}"
        )
    return _body(payload, (count, rows, cols), "images", name)


def parse_labels(payload: bytes, name: str | Path = "<bytes>") -> np.ndarray:
    """IDX labels as uint8 [count], each a digit 0-9."""
    (count,) = _header(payload, LABELS_MAGIC, name)
    labels = _body(payload, (count,), "labels", name)
    not_digits = np.flatnonzero(labels > 9)
    if not_digits.size:
        first = int(not_digits[0])
        raise IdxError(
            f"{name}: {not_digits.size} labels are not digits 0-9 "
            f"(the first, at index {first}, is {labels[first]})"
        )
    return labels


def read_images(path: Path) -> np.ndarray:
    return parse_images(read_payload(path), path)


def read_labels(path: Path) -> np.ndarray:
    return parse_labels(read_payload(path), path)


def images_to_idx(images: np.ndarray) -> bytes:
    count, rows, cols = images.shape
    return struct.pack(">4I", IMAGES_MAGIC, count, rows, cols) + _as_bytes(images)


def labels_to_idx(labels: np.ndarray) -> bytes:
    return struct.pack(">2I", LABELS_MAGIC, len(labels)) + _as_bytes(labels)


def _as_bytes(array: np.ndarray) -> bytes:
    if array.dtype != np.uint8:
        raise IdxError(f"IDX stores unsigned bytes; got an array of {array.dtype}")
    return np.ascontiguousarray(array).tobytes()


def gzip_deterministically(payload: bytes) -> bytes:
    """gzip with no file name and mtime 0, so the same payload always gives the same bytes."""
    return gzip.compress(payload, compresslevel=9, mtime=0)


def write_idx(path: Path, payload: bytes) -> None:
    """Write IDX bytes, gzip-compressed when the name ends in `.gz`."""
    data = gzip_deterministically(payload) if path.suffix == ".gz" else payload
    write_bytes_atomically(path, data)
