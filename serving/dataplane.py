"""The protocol-free core: resolve a model, batch-infer or explain images, account for the
request.

Both gRPC APIs (Open Inference Protocol and mnist37.v1.Classifier) call `DataPlane.infer`,
and Classifier's Explain `DataPlane.explain`, with plain numpy data and get plain results
or a typed `ServingError` back. Whether the server still takes requests, and how many are
in flight, is the edge's business (`serving.edge.EdgeState`), not the data plane's.
"""

from __future__ import annotations

import time
from asyncio import CancelledError as _Cancelled
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from serving.contract import IMAGE_SIDE
from serving.errors import InvalidInput, NotExplainable, ServingError
from serving.registry import LoadedExplanation, LoadedModel, ModelRegistry
from serving.repository import EXPLANATION_FILE
from serving.stats import InferenceObserver, NullObserver

_EMPTY_PROBABILITY = np.zeros(0, dtype=np.float32)
_EMPTY_DIGIT = np.zeros(0, dtype=np.int64)
_EMPTY_EXPLANATION = (
    np.zeros((0, IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32),
    _EMPTY_PROBABILITY,
    _EMPTY_PROBABILITY,
    _EMPTY_PROBABILITY,
    _EMPTY_DIGIT,
)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    model_name: str
    model_version: str
    probability: np.ndarray
    digit: np.ndarray


@dataclass(frozen=True, slots=True)
class ExplanationResult:
    """Each image's prediction as pixel votes: the explanation graph's outputs."""

    model_name: str
    model_version: str
    contributions: np.ndarray  # float32 [N, 28, 28]: each pixel's vote, > 0 says 7
    bias_term: np.ndarray  # float32 [N]: the part of the logit no pixel casts
    logit: np.ndarray  # float32 [N]: sum of the votes + bias_term
    probability: np.ndarray  # float32 [N]: sigmoid(logit) = P(7)
    digit: np.ndarray  # int64 [N]: 3 or 7


class DataPlane:
    def __init__(
        self,
        registry: ModelRegistry,
        max_request_images: int,
        observer: InferenceObserver | None = None,
    ) -> None:
        self.registry = registry
        self.max_request_images = max_request_images
        self.observer: InferenceObserver = observer or NullObserver()

    def resolve(self, name: str, version: str = "") -> LoadedModel:
        return self.registry.resolve(name, version)

    def check_image_count(self, count: int, field: str) -> None:
        """Refuse a request of more than --max-request-images images; both APIs call this
        before decoding anything. `field` names where the count came from."""
        if count > self.max_request_images:
            raise InvalidInput(
                f"{field}: {count} images exceed the limit of {self.max_request_images} "
                "per request (--max-request-images)"
            )

    async def infer(
        self, model: LoadedModel, images: np.ndarray, deadline: float | None = None
    ) -> InferenceResult:
        """Predictions for uint8 [N, 28, 28] images from an already resolved model."""
        with self._accounted(model):
            if not len(images):
                return InferenceResult(
                    model.name, model.version_label, _EMPTY_PROBABILITY, _EMPTY_DIGIT
                )
            probability, digit = await model.batcher.infer(images, deadline)
            self.observer.predictions_made(model.name, model.version_label, probability, digit)
            return InferenceResult(model.name, model.version_label, probability, digit)

    async def explain(
        self, model: LoadedModel, images: np.ndarray, deadline: float | None = None
    ) -> ExplanationResult:
        """Predictions for uint8 [N, 28, 28] images as pixel votes, from an already resolved
        model: its explanation graph, batched and run in the inference threads like `infer`.
        NotExplainable (before any accounting: `serving.edge.RpcCall` counts the refusal)
        if the version has no explanation graph."""
        explanation = self.explanation_of(model)
        with self._accounted(model):
            name, version = model.name, model.version_label
            if not len(images):
                return ExplanationResult(name, version, *_EMPTY_EXPLANATION)
            outputs = await explanation.batcher.infer(images, deadline)
            result = ExplanationResult(name, version, *outputs)  # fields in the graph's order
            # Explained images are classified images too.
            self.observer.predictions_made(name, version, result.probability, result.digit)
            return result

    @staticmethod
    def explanation_of(model: LoadedModel) -> LoadedExplanation:
        """The version's explanation graph; NotExplainable if it was published without."""
        if model.explanation is None:
            raise NotExplainable(
                f"model {model.name!r} version {model.version} was published without an "
                f"explanation graph ({EXPLANATION_FILE}: versions published before Explain "
                "existed have none); publish its training run again "
                "(training.publish.publish_run) or train a new version (mnist37-train "
                "--repository, mnist37-retrain) to explain its predictions"
            )
        return model.explanation

    @contextmanager
    def _accounted(self, model: LoadedModel) -> Iterator[None]:
        """Around a request's inference: in flight on `model` (an unload waits for it) and
        timed into its Triton statistics, as a success or a failure."""
        start_ns = time.perf_counter_ns()
        model.request_started()
        outcome = "success"
        try:
            yield
        except ServingError as error:
            outcome = error.kind
            raise
        except BaseException as error:
            outcome = "cancelled" if isinstance(error, _Cancelled) else "internal"
            raise
        finally:
            model.request_finished()
            elapsed_ns = time.perf_counter_ns() - start_ns
            (model.stats.success if outcome == "success" else model.stats.fail).add(elapsed_ns)

    def record_rejected(self, model: LoadedModel, elapsed_ns: int) -> None:
        """Count a request refused as invalid before inference (`serving.edge.RpcCall` calls
        this) as failed in the model's Triton statistics. `infer` and `explain` raise no
        InvalidInput, and `explain` raises NotExplainable before its accounting, so no
        request is counted twice."""
        model.stats.fail.add(elapsed_ns)
