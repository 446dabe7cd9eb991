"""The IDX reader: round trips, and an error naming the file for every kind of bad file."""

from __future__ import annotations

import gzip
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from serving.idx import (
    IdxError,
    gzip_deterministically,
    images_to_idx,
    labels_to_idx,
    read_images,
    read_labels,
    write_idx,
)


def sample_images(count: int = 5) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(count, 28, 28), dtype=np.uint8)


def sample_labels(count: int = 5) -> np.ndarray:
    return (np.arange(count) % 10).astype(np.uint8)


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_images_round_trip_raw_and_gzip(tmp_path: Path, name: str) -> None:
    images = sample_images()
    write_idx(tmp_path / name, images_to_idx(images))
    loaded = read_images(tmp_path / name)
    assert loaded.dtype == np.uint8
    np.testing.assert_array_equal(loaded, images)


@pytest.mark.parametrize("name", ["labels-idx1-ubyte", "labels-idx1-ubyte.gz"])
def test_labels_round_trip_raw_and_gzip(tmp_path: Path, name: str) -> None:
    labels = sample_labels(12)
    write_idx(tmp_path / name, labels_to_idx(labels))
    np.testing.assert_array_equal(read_labels(tmp_path / name), labels)


def test_gzip_is_detected_by_content_not_name(tmp_path: Path) -> None:
    path = tmp_path / "looks-raw-idx3-ubyte"
    path.write_bytes(gzip.compress(images_to_idx(sample_images())))
    np.testing.assert_array_equal(read_images(path), sample_images())


def test_header_layout_is_big_endian_idx() -> None:
    payload = images_to_idx(sample_images(3))
    assert struct.unpack(">4I", payload[:16]) == (0x00000803, 3, 28, 28)
    assert len(payload) == 16 + 3 * 28 * 28
    assert labels_to_idx(sample_labels(4))[:8] == bytes.fromhex("00000801 00000004")


def test_deterministic_gzip_has_no_timestamp_or_file_name() -> None:
    payload = images_to_idx(sample_images())
    first, second = gzip_deterministically(payload), gzip_deterministically(payload)
    assert first == second
    flags, mtime = first[3], struct.unpack("<I", first[4:8])[0]
    assert flags == 0  # no FNAME, no comment
    assert mtime == 0
    assert gzip.decompress(first) == payload


def _images_payload() -> bytes:
    return images_to_idx(sample_images(4))


def _labels_payload() -> bytes:
    return labels_to_idx(sample_labels(4))


def _corrupt_gzip(payload: bytes) -> bytes:
    compressed = bytearray(gzip.compress(payload))
    for offset in range(12, len(compressed) - 8):
        compressed[offset] ^= 0x5A
    return bytes(compressed)


IMAGE_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated pixels": (lambda: _images_payload()[:-100], "truncated"),
    "truncated header": (lambda: _images_payload()[:10], "truncated header"),
    "too short for a magic number": (lambda: b"\x00\x00", "too short"),
    "empty file": (lambda: b"", "too short"),
    "trailing bytes": (lambda: _images_payload() + b"\x00" * 7, "7 unexpected bytes"),
    "count larger than the file": (
        lambda: struct.pack(">4I", 0x803, 1000, 28, 28) + bytes(4 * 784),
        "promises 1000 images",
    ),
    "labels file given as images": (_labels_payload, "a labels file"),
    "not an IDX file": (lambda: b"PK\x03\x04" + bytes(100), "not an IDX file"),
    "wrong image size": (
        lambda: struct.pack(">4I", 0x803, 2, 32, 32) + bytes(2 * 32 * 32),
        "32x32",
    ),
    "truncated gzip": (lambda: gzip.compress(_images_payload())[:200], "truncated gzip"),
    "corrupt gzip": (lambda: _corrupt_gzip(_images_payload()), "corrupt gzip"),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_bad_images_file_is_rejected_with_its_name(tmp_path: Path, case: str) -> None:
    make_payload, problem = IMAGE_CASES[case]
    path = tmp_path / "bad-images-idx3-ubyte"
    path.write_bytes(make_payload())
    with pytest.raises(IdxError) as raised:
        read_images(path)
    assert str(path) in str(raised.value)
    assert problem in str(raised.value)


LABEL_CASES: dict[str, tuple[Callable[[], bytes], str]] = {
    "truncated labels": (lambda: _labels_payload()[:-2], "truncated"),
    "trailing bytes": (lambda: _labels_payload() + b"\x01", "1 unexpected bytes"),
    "images file given as labels": (_images_payload, "an images file"),
    "label that is not a digit": (
        lambda: struct.pack(">2I", 0x801, 3) + bytes([3, 12, 7]),
        "index 1, is 12",
    ),
}


@pytest.mark.parametrize("case", sorted(LABEL_CASES))
def test_bad_labels_file_is_rejected_with_its_name(tmp_path: Path, case: str) -> None:
    make_payload, problem = LABEL_CASES[case]
    path = tmp_path / "bad-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(make_payload()))
    with pytest.raises(IdxError) as raised:
        read_labels(path)
    assert str(path) in str(raised.value)
    assert problem in str(raised.value)


def test_missing_file_is_an_idx_error(tmp_path: Path) -> None:
    with pytest.raises(IdxError, match="nowhere-idx3-ubyte: cannot read"):
        read_images(tmp_path / "nowhere-idx3-ubyte")


def test_only_bytes_can_be_written() -> None:
    with pytest.raises(IdxError, match="unsigned bytes"):
        images_to_idx(np.zeros((1, 28, 28), dtype=np.float32))


def test_writing_leaves_no_temporary_files(tmp_path: Path) -> None:
    write_idx(tmp_path / "x-idx1-ubyte.gz", labels_to_idx(sample_labels()))
    assert [path.name for path in tmp_path.iterdir()] == ["x-idx1-ubyte.gz"]
