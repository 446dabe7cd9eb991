"""Read IDX files (MNIST's format), plain or gzipped, with numpy only."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class IdxError(ValueError):
    """The file is not a well-formed IDX file."""


def read_idx(path: Path) -> np.ndarray:
    """The array stored in an IDX file (`.gz` is decompressed)."""
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxError(f"{path}: not an IDX file (bad magic)")
    type_code, rank = data[2], data[3]
    if type_code not in _DTYPES:
        raise IdxError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header = 4 + 4 * rank
    if len(data) < header:
        raise IdxError(f"{path}: truncated header")
    shape = tuple(int(n) for n in np.frombuffer(data, dtype=">u4", count=rank, offset=4))
    dtype = np.dtype(_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise IdxError(f"{path}: {len(data) - header} data bytes, expected {expected} for {shape}")
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(shape)
        .astype(dtype.newbyteorder("="))
    )
