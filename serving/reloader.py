"""Hot reload: keep the registry in step with the model repository, without failing a request.

`ModelReloader.reload()` scans the repository (directory listings and a `stat` per version,
cheap enough to run every --poll-interval seconds), and for each model serves the newest
`keep_versions` versions that load. A version is new to it -> loaded off the event loop
(the contract checks and warm-up batches of its model and explanation graphs run in
`serving.runtime`), then swapped into the registry at once. A version that left (a newer
one arrived, or its directory was deleted) is unloaded once its in-flight requests finish.
A version that fails to load is logged, counted and remembered with its files'
fingerprint (inode, size, mtime): it is not tried again until its files change, and the
versions already served keep serving.

Scans never overlap: `trigger()` (SIGHUP) during a scan runs another one right after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from serving.registry import LoadedModel, ModelRegistry
from serving.repository import ModelVersion, list_models, list_versions
from serving.runtime import DeviceUnavailable
from serving.stats import InferenceObserver

log = logging.getLogger(__name__)

FileStamp = tuple[int, int, int]  # inode, size, mtime in ns
# directory inode, then model.onnx, model.json and explanation.onnx (None: no such file)
Fingerprint = tuple[int, FileStamp | None, FileStamp | None, FileStamp | None]
Loader = Callable[[ModelVersion], LoadedModel]


@dataclass(frozen=True)
class VersionOnDisk:
    model_version: ModelVersion
    fingerprint: Fingerprint


def _stamp(path: Path) -> FileStamp | None:
    try:
        status = path.stat()
    except OSError:
        return None
    return status.st_ino, status.st_size, status.st_mtime_ns


def scan_model(repository: Path, name: str) -> list[VersionOnDisk]:
    """The versions of `name` on disk, newest first, with their fingerprints (blocking)."""
    found = []
    for model_version in reversed(list_versions(repository, name)):
        try:
            directory_inode = os.stat(model_version.path).st_ino
        except OSError:
            continue  # deleted while we looked
        fingerprint = (
            directory_inode,
            _stamp(model_version.model_path),
            _stamp(model_version.card_path),
            _stamp(model_version.explanation_path),  # it loads with the version, or fails it
        )
        found.append(VersionOnDisk(model_version, fingerprint))
    return found


def scan_repository(repository: Path) -> dict[str, list[VersionOnDisk] | None]:
    """Every model's versions on disk; None for a model that could not be read this time."""
    scanned: dict[str, list[VersionOnDisk] | None] = {}
    for name in list_models(repository):
        try:
            scanned[name] = scan_model(repository, name)
        except OSError as error:
            log.warning("cannot scan model %s in %s: %s", name, repository, error)
            scanned[name] = None
    return scanned


@dataclass(frozen=True)
class LoadFailure:
    fingerprint: Fingerprint
    reason: str


class ModelReloader:
    def __init__(
        self,
        repository: Path,
        registry: ModelRegistry,
        loader: Loader,
        observer: InferenceObserver,
        *,
        keep_versions: int = 1,
        poll_interval: float = 5.0,
        on_change: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        if keep_versions < 1:
            raise ValueError("keep_versions must be at least 1")
        self.repository = repository
        self.registry = registry
        self.loader = loader
        self.observer = observer
        self.keep_versions = keep_versions
        self.poll_interval = poll_interval
        self.on_change = on_change
        self._failures: dict[tuple[str, int], LoadFailure] = {}
        self._known_models: set[str] = set()
        self._unloading: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._triggered = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    @property
    def known_models(self) -> list[str]:
        """Every model name seen in the repository or served since the start, sorted."""
        return sorted(self._known_models)

    @property
    def failures(self) -> Mapping[tuple[str, int], str]:
        return {key: failure.reason for key, failure in self._failures.items()}

    async def start(self) -> None:
        """The first scan (a device that cannot be used stops the server), then the
        polling task."""
        await self.reload(raise_device_errors=True)
        self._watcher = asyncio.create_task(self._watch(), name="model-reloader")

    def trigger(self) -> None:
        """Scan now (SIGHUP); safe to call from a signal handler on the event loop."""
        self._triggered.set()

    async def stop(self) -> None:
        """Stop watching, then wait for the versions being unloaded to finish their requests."""
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        if self._unloading:
            await asyncio.gather(*self._unloading)

    async def _watch(self) -> None:
        while True:
            if self.poll_interval > 0:
                try:
                    async with asyncio.timeout(self.poll_interval):
                        await self._triggered.wait()
                except TimeoutError:
                    pass
            else:
                await self._triggered.wait()
            try:
                await self.reload()
            except Exception:  # never let a surprise stop the watching
                log.exception("reloading from %s failed; serving what was loaded", self.repository)

    async def reload(self, raise_device_errors: bool = False) -> None:
        """Bring the registry in step with the repository once."""
        async with self._lock:
            self._triggered.clear()
            if not self.repository.is_dir():
                log.warning(
                    "model repository %s is not a directory; serving what was loaded",
                    self.repository,
                )
                return
            try:
                scanned = await asyncio.to_thread(scan_repository, self.repository)
            except OSError as error:
                log.warning("cannot scan %s: %s; serving what was loaded", self.repository, error)
                return
            names = sorted(set(scanned) | set(self.registry.names()))
            failures_before = self.failures
            changed = not self._known_models.issuperset(names)
            self._known_models.update(names)
            for name in names:
                on_disk = scanned.get(name, [])
                if on_disk is None:
                    continue
                changed |= await self._reconcile(name, on_disk, raise_device_errors)
            self._forget_failures_not_on_disk(scanned)
            failures = self.failures
            self.registry.set_load_failures(failures)
            changed |= failures != failures_before
            if changed and self.on_change is not None:
                await self.on_change()

    async def _reconcile(
        self, name: str, on_disk: Sequence[VersionOnDisk], raise_device_errors: bool
    ) -> bool:
        """Serve the newest `keep_versions` loadable versions of `name`; True if the set of
        served versions changed."""
        served = {model.version: model for model in self.registry.versions(name)}
        chosen: list[LoadedModel] = []
        for entry in on_disk:
            if len(chosen) == self.keep_versions:
                break
            version = entry.model_version.version
            if version in served:
                # Versions are immutable once published: a served one is not reloaded.
                chosen.append(served[version])
                continue
            failure = self._failures.get((name, version))
            if failure is not None and failure.fingerprint == entry.fingerprint:
                continue
            loaded = await self._load(entry, raise_device_errors)
            if loaded is not None:
                chosen.append(loaded)
        if {model.version for model in chosen} == set(served):
            return False
        others = [model for model in self.registry.all() if model.name != name]
        left = self.registry.swap([*others, *chosen])
        newest = max((model.version for model in chosen), default=None)
        log.info(
            "model %s now serves version(s) %s%s",
            name,
            sorted(model.version for model in chosen) or "none",
            f" (unversioned requests go to {newest})" if newest is not None else "",
        )
        for model in left:
            task = asyncio.create_task(self._unload(model), name=f"unload-{name}-{model.version}")
            self._unloading.add(task)
            task.add_done_callback(self._unloading.discard)
        return True

    async def _load(self, entry: VersionOnDisk, raise_device_errors: bool) -> LoadedModel | None:
        model_version = entry.model_version
        key = (model_version.name, model_version.version)
        started = time.perf_counter()
        try:
            loaded = await asyncio.to_thread(self.loader, model_version)
        except DeviceUnavailable:
            if raise_device_errors:
                raise
            self._record_failure(entry, "the execution provider is not usable")
            return None
        except Exception as error:  # onnxruntime raises its own error types
            self._record_failure(entry, f"{type(error).__name__}: {error}")
            return None
        self._failures.pop(key, None)
        log.info(
            "loaded model %s version %d (%s) from %s on %s in %.0f ms",
            loaded.name,
            loaded.version,
            loaded.architecture or "unknown architecture",
            loaded.path,
            loaded.provider,
            (time.perf_counter() - started) * 1000,
        )
        self.observer.model_loaded(
            loaded.name, loaded.version_label, loaded.architecture, loaded.provider
        )
        return loaded

    def _record_failure(self, entry: VersionOnDisk, reason: str) -> None:
        model_version = entry.model_version
        self._failures[(model_version.name, model_version.version)] = LoadFailure(
            entry.fingerprint, reason
        )
        serving = [model.version for model in self.registry.versions(model_version.name)]
        log.error(
            "model %s version %d failed to load and is skipped until its files change "
            "(still serving %s): %s",
            model_version.name,
            model_version.version,
            serving or "no version",
            reason,
        )
        self.observer.model_load_failed(model_version.name)

    def _forget_failures_not_on_disk(
        self, scanned: Mapping[str, Sequence[VersionOnDisk] | None]
    ) -> None:
        present = {
            (name, entry.model_version.version)
            for name, entries in scanned.items()
            for entry in entries or ()
        }
        unreadable = {name for name, entries in scanned.items() if entries is None}
        for key in list(self._failures):
            if key not in present and key[0] not in unreadable:
                del self._failures[key]

    async def _unload(self, model: LoadedModel) -> None:
        # Nothing is torn down: the onnxruntime session is freed with the last reference,
        # so a request that resolved this version just before it left still finishes on it.
        await model.wait_idle()
        log.info("unloaded model %s version %d", model.name, model.version)
        self.observer.model_unloaded(
            model.name, model.version_label, model.architecture, model.provider
        )
