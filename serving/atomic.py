"""Files written atomically: a temporary file in the same directory, fsync, then rename.

A reader sees the old content or the new, never a mix, and a crash leaves no partial file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` (mode 644), fsyncing the file and its directory."""
    fd, temp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def write_json_atomically(path: Path, data: object) -> None:
    """Replace `path` with `data` as indented, key-sorted JSON."""
    write_bytes_atomically(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def fsync_directory(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
