"""The 3s and 7s of MNIST: loading, checksums and the train/validation split.

A data directory holds the four canonical MNIST files, each gzip-compressed (`NAME.gz`)
or raw (`NAME`). The shipped default, `training/data/`, holds only the 3s and 7s in the
same format; a full MNIST download works too (`--data-dir`), and its other digits are
dropped on loading.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from serving.contract import DIGITS
from serving.idx import IdxError, decompress_if_gzip, parse_images, parse_labels

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
CANONICAL_NAMES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)
CHECKSUM_FILE = "SHA256SUMS"


class DataError(ValueError):
    """A data directory is missing files, or its files disagree with each other."""


@dataclass(frozen=True)
class Mnist37Data:
    """MNIST's 3s and 7s: uint8 images [N, 28, 28] and their digits (3 or 7, uint8)."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    checksums: dict[str, str]  # file name (without .gz) -> sha256 of its decompressed bytes
    source: Path


class Split(NamedTuple):
    train_images: np.ndarray
    train_labels: np.ndarray
    validation_images: np.ndarray
    validation_labels: np.ndarray


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_idx_file(data_dir: Path, name: str) -> Path:
    """`NAME.gz` or `NAME` in a data directory."""
    for candidate in (data_dir / f"{name}.gz", data_dir / name):
        if candidate.is_file():
            return candidate
    raise DataError(f"{data_dir}: missing {name}.gz (or uncompressed {name})")


def read_checksum_file(path: Path) -> dict[str, str]:
    """`sha256sum` output: file name -> hex digest."""
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        digest, _, name = line.partition("  ")
        if len(digest) != 64 or not name:
            raise DataError(f"{path}:{number}: not a `sha256sum` line: {line!r}")
        sums[name.lstrip("*")] = digest
    return sums


def format_checksum_file(files: dict[str, bytes]) -> str:
    return "".join(f"{sha256_hex(data)}  {name}\n" for name, data in sorted(files.items()))


def verify_listed_checksum(path: Path, data: bytes) -> None:
    """Check a file against its directory's SHA256SUMS, if that lists it."""
    sums_file = path.parent / CHECKSUM_FILE
    if not sums_file.is_file():
        return
    expected = read_checksum_file(sums_file).get(path.name)
    if expected is not None and sha256_hex(data) != expected:
        raise DataError(
            f"{path}: sha256 {sha256_hex(data)} does not match {expected} in {sums_file} "
            "(corrupt or replaced file)"
        )


def load_labelled_images(
    data_dir: Path, images_name: str, labels_name: str
) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
    """One images file and its labels file, checked against each other and SHA256SUMS."""
    arrays, checksums = [], {}
    for name, parse in ((images_name, parse_images), (labels_name, parse_labels)):
        path = find_idx_file(data_dir, name)
        data = path.read_bytes()
        verify_listed_checksum(path, data)
        payload = decompress_if_gzip(data, path)
        arrays.append(parse(payload, path))
        checksums[name] = sha256_hex(payload)
    images, labels = arrays
    if len(images) != len(labels):
        raise DataError(
            f"{data_dir}: {images_name} holds {len(images)} images but {labels_name} "
            f"holds {len(labels)} labels; the files do not belong together"
        )
    return images, labels, checksums


def keep_digits(
    images: np.ndarray, labels: np.ndarray, digits: tuple[int, ...] = DIGITS
) -> tuple[np.ndarray, np.ndarray]:
    """Only the images of the given digits, in their original order."""
    keep = np.isin(labels, digits)
    return images[keep], labels[keep]


def load_dataset(data_dir: Path | None = None) -> Mnist37Data:
    """The 3s and 7s of a data directory; None means the dataset shipped with the package."""
    data_dir = Path(data_dir) if data_dir is not None else DEFAULT_DATA_DIR
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such data directory")
    try:
        train = load_labelled_images(data_dir, TRAIN_IMAGES, TRAIN_LABELS)
        test = load_labelled_images(data_dir, TEST_IMAGES, TEST_LABELS)
    except IdxError as error:
        raise DataError(str(error)) from error
    train_images, train_labels = keep_digits(*train[:2])
    test_images, test_labels = keep_digits(*test[:2])
    for part, labels in (("training", train_labels), ("test", test_labels)):
        missing = [digit for digit in DIGITS if not np.any(labels == digit)]
        if missing:
            raise DataError(f"{data_dir}: the {part} set has no images of digit {missing[0]}")
    return Mnist37Data(
        train_images=train_images,
        train_labels=train_labels,
        test_images=test_images,
        test_labels=test_labels,
        checksums={**train[2], **test[2]},
        source=data_dir,
    )


def split_train_validation(
    images: np.ndarray, labels: np.ndarray, fraction: float, seed: int
) -> Split:
    """Hold out `fraction` of each digit's images for validation, chosen by a seeded shuffle.

    Stratified: each digit keeps its share in both parts. Both parts keep the original order.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"the validation fraction must be between 0 and 1, not {fraction}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    rng = np.random.default_rng(seed)
    held_out = []
    for digit in np.unique(labels):
        members = np.flatnonzero(labels == digit)
        count = round(len(members) * fraction)
        held_out.append(rng.permutation(members)[:count])
    is_validation = np.zeros(len(labels), dtype=bool)
    is_validation[np.concatenate(held_out)] = True
    return Split(
        images[~is_validation],
        labels[~is_validation],
        images[is_validation],
        labels[is_validation],
    )
