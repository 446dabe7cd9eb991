"""The loaded model versions, keyed by (name, version).

The registry holds one immutable mapping and replaces it whole (`swap`), so a request sees
either the old set of models or the new one. A reload (`serving.reloader`) builds new
`LoadedModel`s off to the side, swaps them in, then unloads the ones that left once their
in-flight requests finish.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from serving.batcher import BatchListener, DynamicBatcher, PredictFunction
from serving.errors import ModelNotFound, shown
from serving.repository import EXPLANATION_FILE, MODEL_FILE, ModelCard, ModelVersion, parse_version
from serving.runtime import ExplanationRuntime, ModelRuntime, RuntimeOptions
from serving.stats import InferenceStats

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchingOptions:
    max_batch_size: int = 64
    max_queue_delay_s: float = 0.0
    max_queued_images: int | None = None  # None: unbounded (the server always bounds it)
    max_queued_requests: int | None = None
    # Calls expected to take less run on the event loop (serving.batcher's docstring): about
    # half the CPU a worker-thread round trip costs on a 2-core machine (~200 us measured).
    inline_below_s: float = 250e-6


@dataclass(frozen=True, eq=False)
class LoadedExplanation:
    """A version's explanation graph, served beside its model: a session of its own with
    the same runtime options, and a batcher of its own (a batch is of one graph) on the
    same executor, statistics and batch listener: an explanation is an inference of the
    version, which also classifies its images."""

    runtime: ExplanationRuntime
    batcher: DynamicBatcher


@dataclass(eq=False)
class LoadedModel:
    name: str
    version: int
    path: Path
    runtime: ModelRuntime
    batcher: DynamicBatcher
    card: ModelCard
    stats: InferenceStats
    explanation: LoadedExplanation | None = None  # None: published without explanation.onnx
    in_flight: int = 0
    _idle: asyncio.Event | None = field(default=None, repr=False)

    @property
    def version_label(self) -> str:
        return str(self.version)

    @property
    def architecture(self) -> str:
        """The card's architecture name, "" if it names none (a metrics label value)."""
        return self.card.architecture_name or ""

    @property
    def provider(self) -> str:
        return self.runtime.provider

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._idle is not None:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Returns once no request is using this model version (any number may wait)."""
        while self.in_flight:
            if self._idle is None or self._idle.is_set():
                self._idle = asyncio.Event()
            await self._idle.wait()


ModelMap = Mapping[str, Mapping[int, LoadedModel]]


class ModelRegistry:
    def __init__(self) -> None:
        self._models: ModelMap = MappingProxyType({})
        self._load_failures: Mapping[tuple[str, int], str] = MappingProxyType({})

    def swap(self, models: Iterable[LoadedModel]) -> list[LoadedModel]:
        """Serve exactly `models` from now on; returns the entries that left."""
        grouped: dict[str, dict[int, LoadedModel]] = {}
        for model in models:
            grouped.setdefault(model.name, {})[model.version] = model
        new = MappingProxyType(
            {
                name: MappingProxyType(dict(sorted(versions.items())))
                for name, versions in sorted(grouped.items())
            }
        )
        kept = {id(model) for versions in new.values() for model in versions.values()}
        left = [model for model in self.all() if id(model) not in kept]
        self._models = new
        return left

    def all(self) -> list[LoadedModel]:
        return [model for versions in self._models.values() for model in versions.values()]

    def names(self) -> list[str]:
        return list(self._models)

    def versions(self, name: str) -> list[LoadedModel]:
        return list(self._models.get(name, {}).values())

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        """The loaded model `name` at `version`; the newest loaded one if version is ''."""
        versions = self._models.get(name)
        if not versions:
            raise ModelNotFound(f"model {shown(name)} is not loaded (loaded: {self.names()})")
        if not version:
            return versions[next(reversed(versions))]
        number = parse_version(version)
        model = versions.get(number) if number is not None else None
        if model is None:
            raise ModelNotFound(
                f"model {shown(name)} has no loaded version {shown(version)} "
                f"(loaded: {[str(number) for number in versions]})"
            )
        return model

    def is_ready(self) -> bool:
        return bool(self._models)

    @property
    def load_failures(self) -> Mapping[tuple[str, int], str]:
        """(model, version) -> why that version is not served, for versions that failed to
        load and are still in the repository unchanged."""
        return self._load_failures

    def set_load_failures(self, failures: Mapping[tuple[str, int], str]) -> None:
        self._load_failures = MappingProxyType(dict(failures))


def load_model_version(
    model_version: ModelVersion,
    runtime_options: RuntimeOptions,
    batching: BatchingOptions,
    executor: Executor,
    on_batch: BatchListener | None = None,
) -> LoadedModel:
    """Load, check and warm up one version, and its explanation graph if it has one
    (blocking: call it off the event loop). Its card must be readable and each file the
    one the card describes (sha256, inside the repository): a version that is not what
    was published is not served, nor one whose explanation graph does not load."""
    card = model_version.read_card()
    label = Path(model_version.label)
    model = model_version.read_verified(card, card.model_file)
    runtime = ModelRuntime(label / MODEL_FILE, runtime_options, model)
    explainer = None
    if card.explanation_file is not None or model_version.explanation_path.exists():
        graph = model_version.read_verified(card, card.explanation_file, EXPLANATION_FILE)
        explainer = ExplanationRuntime(label / EXPLANATION_FILE, runtime_options, graph)
    stats = InferenceStats()

    def batcher_for(predict: PredictFunction) -> DynamicBatcher:
        return DynamicBatcher(
            predict,
            executor,
            max_batch_size=batching.max_batch_size,
            max_queue_delay_s=batching.max_queue_delay_s,
            max_queued_images=batching.max_queued_images,
            max_queued_requests=batching.max_queued_requests,
            stats=stats,
            on_batch=on_batch,
            inline_below_s=batching.inline_below_s,
        )

    return LoadedModel(
        name=model_version.name,
        version=model_version.version,
        path=model_version.path,
        runtime=runtime,
        batcher=batcher_for(runtime.predict),
        card=card,
        stats=stats,
        explanation=(
            LoadedExplanation(explainer, batcher_for(explainer.run))
            if explainer is not None
            else None
        ),
    )
