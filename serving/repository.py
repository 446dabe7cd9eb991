"""The model repository: `<repository>/<model_name>/<version>/{model.onnx,model.json}`.

The layout follows Triton's. Versions are positive integers. A version directory appears
complete or not at all: publishers build it in a hidden staging directory on the same
filesystem, fsync it, and rename it into place while holding the model's publish lock, so
a scanning server never sees a half-written model and two publishers never share a number.
Numbers are never reused: the model directory remembers the highest one ever published, so
deleting a bad version does not hand its number to a different model.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from serving.atomic import fsync_directory, write_json_atomically

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
DEFAULT_MODEL_NAME = "mnist37"
_LOCK_FILE = ".publish.lock"
_HIGHEST_VERSION_FILE = ".highest-version"
_STAGING_PREFIX = ".staging-"
_VERSION_NAME = re.compile(r"[1-9][0-9]*")


class RepositoryError(Exception):
    """The repository or one of its versions is missing or malformed."""


@dataclass(frozen=True)
class ModelVersion:
    """One published version of a model."""

    name: str
    version: int
    path: Path

    @property
    def model_path(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def card_path(self) -> Path:
        return self.path / CARD_FILE

    def read_card(self) -> dict:
        """The model card (`model.json`) as a dict."""
        try:
            return json.loads(self.card_path.read_text())
        except (OSError, ValueError) as error:
            raise RepositoryError(f"cannot read model card {self.card_path}: {error}") from error


def validate_model_name(name: str) -> str:
    """A model name is one path component of letters, digits, '-', '_' and '.'."""
    allowed = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    if not name or name.startswith(".") or not set(name) <= allowed:
        raise RepositoryError(
            f"invalid model name {name!r}: use letters, digits, '-', '_' and '.', "
            "not starting with '.'"
        )
    return name


def list_models(repository: Path) -> list[str]:
    """Names of the models in a repository, sorted."""
    if not repository.is_dir():
        return []
    return sorted(
        entry.name
        for entry in repository.iterdir()
        if entry.is_dir() and not entry.name.startswith(".")
    )


def parse_version(name: str) -> int | None:
    """The version number `name` spells ("1", "2", ...: ASCII digits, no sign, no leading
    zero), the same rule as for version directories; None for anything else."""
    return int(name) if _VERSION_NAME.fullmatch(name) else None


def list_versions(repository: Path, name: str) -> list[ModelVersion]:
    """The published versions of a model, oldest first. Staging directories are ignored."""
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    versions = [
        ModelVersion(name, int(entry.name), entry)
        for entry in model_dir.iterdir()
        if _VERSION_NAME.fullmatch(entry.name) and entry.is_dir()
    ]
    return sorted(versions, key=lambda v: v.version)


def latest_version(repository: Path, name: str) -> ModelVersion | None:
    """The newest published version of a model, or None if it has none."""
    versions = list_versions(repository, name)
    return versions[-1] if versions else None


@contextmanager
def exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An exclusive flock on `lock_path` (created if needed); the kernel drops it if the
    holder dies."""
    with open(lock_path, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fsync_directory(directory)


def publish(
    repository: Path, name: str, write_version: Callable[[Path, int], None]
) -> ModelVersion:
    """Publish the next version of `name` atomically.

    `write_version(staging_dir, version)` writes the version's files into `staging_dir`.
    If it raises, or the process dies, no version becomes visible.
    """
    validate_model_name(name)
    model_dir = repository / name
    model_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(model_dir / _LOCK_FILE):
        for stale in model_dir.glob(_STAGING_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a publisher that died
        version = _highest_version_ever(model_dir) + 1
        staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX, dir=model_dir))
        try:
            write_version(staging, version)
            if not (staging / MODEL_FILE).is_file():
                raise RepositoryError(f"a version needs {MODEL_FILE}; {staging} has none")
            staging.chmod(0o755)
            _fsync_tree(staging)
            final = model_dir / str(version)
            # Recorded first: a crash before the rename skips a number, never reuses one.
            write_json_atomically(model_dir / _HIGHEST_VERSION_FILE, version)
            os.rename(staging, final)
            fsync_directory(model_dir)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return ModelVersion(name, version, final)


def _highest_version_ever(model_dir: Path) -> int:
    """The highest version number present or recorded as published (0 if none)."""
    present = [int(e.name) for e in model_dir.iterdir() if _VERSION_NAME.fullmatch(e.name)]
    record = model_dir / _HIGHEST_VERSION_FILE
    try:
        recorded = int(json.loads(record.read_text())) if record.exists() else 0
    except (OSError, ValueError, TypeError) as error:
        raise RepositoryError(
            f"cannot read {record} (the highest version published): {error}; "
            "fix or delete it to continue from the versions present"
        ) from error
    return max([recorded, *present])
