"""The protocol-free core: resolve a model, batch-infer images, account for the request.

Both gRPC APIs (Open Inference Protocol and mnist37.v1.Classifier) call `DataPlane.infer`
with plain numpy data and get plain results or a typed `ServingError` back. Whether the
server still takes requests, and how many are in flight, is the edge's business
(`serving.edge.EdgeState`), not the data plane's.
"""

from __future__ import annotations

import time
from asyncio import CancelledError as _Cancelled
from dataclasses import dataclass

import numpy as np

from serving.errors import InvalidInput, ServingError
from serving.registry import LoadedModel, ModelRegistry
from serving.stats import InferenceObserver, NullObserver

_EMPTY_PROBABILITY = np.zeros(0, dtype=np.float32)
_EMPTY_DIGIT = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    model_name: str
    model_version: str
    probability: np.ndarray
    digit: np.ndarray


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
        start_ns = time.perf_counter_ns()
        model.request_started()
        outcome = "success"
        try:
            if len(images):
                probability, digit = await model.batcher.infer(images, deadline)
                self.observer.predictions_made(model.name, model.version_label, probability, digit)
            else:
                probability, digit = _EMPTY_PROBABILITY, _EMPTY_DIGIT
            return InferenceResult(model.name, model.version_label, probability, digit)
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
        this) as failed in the model's Triton statistics. `infer` raises no InvalidInput, so
        no request is counted twice."""
        model.stats.fail.add(elapsed_ns)
