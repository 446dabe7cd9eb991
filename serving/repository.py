"""The model repository: `<repository>/<model_name>/<version>/{model.onnx,model.json}`,
and `explanation.onnx` in versions that can explain their predictions.

The layout follows Triton's. Versions are positive integers. A version directory appears
complete or not at all: publishers build it in a hidden staging directory on the same
filesystem, fsync it, and rename it into place while holding the model's publish lock, so
a scanning server never sees a half-written model and two publishers never share a number.
Numbers are never reused: the model directory remembers the highest one ever published, so
deleting a bad version does not hand its number to a different model.

Each version's `model.json` is its model card, read and written only as a `ModelCard`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, TypeVar

from serving.atomic import fsync_directory, write_json_atomically

MODEL_FILE = "model.onnx"
CARD_FILE = "model.json"
EXPLANATION_FILE = "explanation.onnx"
"""The explanation graph (training/explain.py), published next to the model since the
Explain RPC; versions published before have none."""
DEFAULT_MODEL_NAME = "mnist37"
_LOCK_FILE = ".publish.lock"
_HIGHEST_VERSION_FILE = ".highest-version"
_STAGING_PREFIX = ".staging-"
_VERSION_NAME = re.compile(r"[1-9][0-9]*")
# The highest version number there can be, on every path (RPCs, scans, publishing): Triton's
# int64 versions would fit, but a number no publisher reaches in practice keeps a stray
# directory named 99999999999 from being served as the newest or blocking the next publish.
MAX_VERSION = 2**31 - 1
CARD_SCHEMA_VERSION = 1
"""The card schema this code writes. Cards of any schema are read as far as they go, so a
field may only be added, never renamed or given another meaning, without a new number."""


class RepositoryError(Exception):
    """The repository or one of its versions is missing or malformed."""


@dataclass(frozen=True)
class Architecture:
    """The card's `architecture`: `{"name": "mlp", "hidden_units": 30, "parameters": ...}`."""

    name: str | None = None
    hidden_units: int | None = None
    parameters: int | None = None


@dataclass(frozen=True)
class ModelFileRecord:
    """The card's `model_file`: what `model.onnx` was when it was published."""

    sha256: str | None = None
    bytes: int | None = None
    name: str = MODEL_FILE

    @classmethod
    def of(cls, model: bytes) -> ModelFileRecord:
        return cls(hashlib.sha256(model).hexdigest(), len(model))


@dataclass(frozen=True)
class ExplanationFileRecord(ModelFileRecord):
    """The card's `explanation_file`: what `explanation.onnx` was when it was published,
    and the check it passed then (`training.explain.ExplanationReport.as_dict()`)."""

    name: str = EXPLANATION_FILE
    check: Mapping[str, Any] | None = None

    @classmethod
    def of(cls, graph: bytes, check: Mapping[str, Any] | None = None) -> ExplanationFileRecord:
        return replace(super().of(graph), check=_copy(check))


@dataclass(frozen=True)
class ModelCard:
    """A version's model card (`model.json`), one attribute per top-level key of the schema
    (keys it does not know are not kept).

    Every field is optional: a reader gets None for what a card does not say, and
    `ModelCard()` says nothing. The records serving does not interpret (`training`,
    `metrics`, `onnx`, `parity`, `libraries`) stay the JSON objects they are.
    """

    name: str | None = None
    version: int | None = None
    architecture: Architecture | None = None
    created_at: str | None = None
    published_at: str | None = None
    training: Mapping[str, Any] | None = None
    metrics: Mapping[str, Any] | None = None  # {"test": {"accuracy": ..., ...}}
    model_file: ModelFileRecord | None = None
    explanation_file: ExplanationFileRecord | None = None  # None: the version cannot explain
    onnx: Mapping[str, Any] | None = None
    parity: Mapping[str, Any] | None = None
    libraries: Mapping[str, str] | None = None
    synthetic: bool = False  # built by serving.synthetic, not trained
    schema_version: int | None = CARD_SCHEMA_VERSION

    @property
    def architecture_name(self) -> str | None:
        return self.architecture.name if self.architecture is not None else None

    @property
    def test_accuracy(self) -> float | None:
        accuracy = ((self.metrics or {}).get("test") or {}).get("accuracy")
        return float(accuracy) if accuracy is not None else None

    @classmethod
    def read(cls, path: Path, shown: str | None = None) -> ModelCard:
        """The card in `path`; RepositoryError if it is unreadable or malformed. Messages
        name the card `shown` (e.g. `mnist37/2/model.json`: no absolute path) if given."""
        shown = shown or str(path)
        try:
            data = json.loads(path.read_text())
        except OSError as error:
            raise RepositoryError(f"cannot read model card {shown}: {error.strerror}") from error
        except ValueError as error:
            raise RepositoryError(f"cannot read model card {shown}: {error}") from error
        return cls.from_json(data, f"model card {shown}")

    @classmethod
    def from_json(cls, data: object, where: str = "model card") -> ModelCard:
        """The card a parsed `model.json` holds; `where` names it in errors."""
        if not isinstance(data, dict):
            raise RepositoryError(f"{where} is not a JSON object")

        def field(key: str, kind: type) -> Any:
            return _field(data, key, kind, where)

        return cls(
            name=field("name", str),
            version=field("version", int),
            architecture=_read_architecture(data.get("architecture"), where),
            created_at=field("created_at", str),
            published_at=field("published_at", str),
            training=field("training", dict),
            metrics=_read_metrics(field("metrics", dict), where),
            model_file=_read_file_record(
                field("model_file", dict), ModelFileRecord, "model_file", where
            ),
            explanation_file=_read_file_record(
                field("explanation_file", dict), ExplanationFileRecord, "explanation_file", where
            ),
            onnx=field("onnx", dict),
            parity=field("parity", dict),
            libraries=field("libraries", dict),
            synthetic=bool(field("synthetic", bool)),
            schema_version=field("schema_version", int),
        )

    def as_json(self) -> dict[str, Any]:
        """The card as `model.json` holds it; what it does not say is left out."""
        architecture, model_file = self.architecture, self.model_file
        explanation = self.explanation_file
        keys = {
            "schema_version": self.schema_version,
            "name": self.name,
            "version": self.version,
            # every key of these two, null when unknown, as publishing has always written them
            "architecture": asdict(architecture) if architecture is not None else None,
            "created_at": self.created_at,
            "published_at": self.published_at,
            "training": _copy(self.training),
            "metrics": _copy(self.metrics),
            "model_file": asdict(model_file) if model_file is not None else None,
            "explanation_file": asdict(explanation) if explanation is not None else None,
            "onnx": _copy(self.onnx),
            "parity": _copy(self.parity),
            "libraries": _copy(self.libraries),
            "synthetic": True if self.synthetic else None,
        }
        return {key: value for key, value in keys.items() if value is not None}

    def write(self, path: Path) -> None:
        """Write the card to `path` atomically (indented, key-sorted JSON)."""
        write_json_atomically(path, self.as_json())


_JSON_KINDS = {
    str: "a string",
    int: "an integer",
    float: "a number",
    dict: "an object",
    bool: "true or false",
}


def _field(data: dict, key: str, kind: type, where: str, within: str = "") -> Any:
    """`data[key]` if it is of `kind` (float: any number), None if absent or null, else
    RepositoryError naming `within` + `key`. JSON's true and false are not numbers."""
    value = data.get(key)
    if value is None:
        return None
    accepted = (int, float) if kind is float else kind
    if isinstance(value, accepted) and (kind is bool or not isinstance(value, bool)):
        return value
    shown = json.dumps(value)[:40]
    raise RepositoryError(f"{where}: {within}{key} is {shown}, not {_JSON_KINDS[kind]}")


def _read_architecture(value: object, where: str) -> Architecture | None:
    if value is None:
        return None
    if isinstance(value, str):
        return Architecture(value)  # synthetic cards before the shared writer said only this
    if not isinstance(value, dict):
        raise RepositoryError(
            f"{where}: architecture is {json.dumps(value)[:40]}, not an object or a string"
        )
    return Architecture(
        name=_field(value, "name", str, where, "architecture."),
        hidden_units=_field(value, "hidden_units", int, where, "architecture."),
        parameters=_field(value, "parameters", int, where, "architecture."),
    )


def _read_metrics(metrics: dict | None, where: str) -> dict | None:
    """The card's metrics, with `test.accuracy` checked: `test_accuracy` reads it."""
    test = _field(metrics, "test", dict, where, "metrics.") if metrics is not None else None
    if test is not None:
        _field(test, "accuracy", float, where, "metrics.test.")
    return metrics


_FILE_RECORD_KINDS = {"sha256": str, "bytes": int, "name": str, "check": dict}
FileRecord = TypeVar("FileRecord", bound=ModelFileRecord)


def _read_file_record(
    record: dict | None, kind: type[FileRecord], key: str, where: str
) -> FileRecord | None:
    """The card's record `key` of one of the version's files, as a `kind`; what the card
    leaves out or leaves empty (an older card has no `name`) takes `kind`'s default."""
    if record is None:
        return None
    values = {
        name: _field(record, name, _FILE_RECORD_KINDS[name], where, f"{key}.")
        for name in (field.name for field in fields(kind))
    }
    return kind(**{name: value for name, value in values.items() if value not in (None, "")})


def _copy(record: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(record) if record is not None else None


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

    @property
    def label(self) -> str:
        """`name/version`: how messages shown to clients name the version (no paths)."""
        return f"{self.name}/{self.version}"

    @property
    def explanation_path(self) -> Path:
        """Where the version's explanation graph is, if it has one."""
        return self.path / EXPLANATION_FILE

    def read_card(self) -> ModelCard:
        """The version's model card; RepositoryError if it is unreadable or malformed."""
        return ModelCard.read(self.card_path, f"{self.label}/{CARD_FILE}")

    def read_verified(
        self, card: ModelCard, record: ModelFileRecord | None, name: str = MODEL_FILE
    ) -> bytes:
        """The bytes of the file `record` describes, checked against it: a regular file
        inside the repository (a symbolic link may not lead out of it) whose sha256 is the
        one the card recorded at publishing. The caller loads these very bytes, so the file
        cannot change between the check and the load."""
        shown = f"{self.label}/{name}"
        if record is None or not record.sha256:
            raise RepositoryError(f"{shown}: the model card records no sha256 to check it by")
        if card.version is not None and card.version != self.version:
            raise RepositoryError(
                f"{shown}: the model card is version {card.version}'s, not {self.version}'s"
            )
        path = self.path / name
        repository = self.path.parent.parent.resolve()
        if repository not in path.resolve().parents:
            raise RepositoryError(f"{shown}: a symbolic link that leads out of the repository")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise RepositoryError(f"{shown}: cannot read: {error.strerror}") from error
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.sha256:
            raise RepositoryError(
                f"{shown}: sha256 {digest[:12]}... differs from the card's "
                f"{record.sha256[:12]}...: the file changed after it was published"
            )
        return data


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
    """The version number `name` spells ("1", "2", ... up to MAX_VERSION: ASCII digits, no
    sign, no leading zero), the same rule as for version directories; None for anything
    else. The length is checked first, so a client's million-digit string costs nothing."""
    if len(name) > len(str(MAX_VERSION)) or not _VERSION_NAME.fullmatch(name):
        return None
    number = int(name)
    return number if number <= MAX_VERSION else None


def list_versions(repository: Path, name: str) -> list[ModelVersion]:
    """The published versions of a model, oldest first. Staging directories are ignored."""
    model_dir = repository / name
    if not model_dir.is_dir():
        return []
    versions = [
        ModelVersion(name, number, entry)
        for entry in model_dir.iterdir()
        if (number := parse_version(entry.name)) is not None and entry.is_dir()
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
        if version > MAX_VERSION:
            raise RepositoryError(
                f"model {name} has a version {MAX_VERSION}, the highest number there can be: "
                "nothing can be published after it (remove that version to go on)"
            )
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
    present = [number for entry in model_dir.iterdir() if (number := parse_version(entry.name))]
    record = model_dir / _HIGHEST_VERSION_FILE
    try:
        recorded = int(json.loads(record.read_text())) if record.exists() else 0
    except (OSError, ValueError, TypeError) as error:
        raise RepositoryError(
            f"cannot read {record} (the highest version published): {error}; "
            "fix or delete it to continue from the versions present"
        ) from error
    if not 0 <= recorded < MAX_VERSION:
        raise RepositoryError(
            f"{record} says {recorded} versions were published; the next would pass "
            f"the highest version number, {MAX_VERSION}: fix or delete it"
        )
    return max([recorded, *present])
