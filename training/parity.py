"""Prove an exported ONNX model computes what its PyTorch model computes.

onnxruntime and PyTorch run the same images: the whole shipped test set plus random uint8
batches of 1, 7 and 1,000 images. Every probability must agree within `TOLERANCE` and every
predicted digit must be identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import onnxruntime
import torch

from serving.contract import IMAGE_SIDE, IMAGES, OUTPUT_NAMES
from training.export import ServingModel

TOLERANCE = 1e-5
"""Largest allowed |probability(onnxruntime) - probability(PyTorch)| for any image."""

RANDOM_BATCH_SIZES = (1, 7, 1000)
RANDOM_SEED = 0
_QUIET = 3  # onnxruntime log severity: errors only


class ParityError(ValueError):
    """onnxruntime and PyTorch disagree about an exported model."""


@dataclass(frozen=True)
class ParityCheck:
    """How far onnxruntime and PyTorch agree on one set of images."""

    images: str
    count: int
    max_abs_probability_diff: float
    digit_mismatches: int

    def passed(self, tolerance: float) -> bool:
        return self.max_abs_probability_diff <= tolerance and self.digit_mismatches == 0


@dataclass(frozen=True)
class ParityReport:
    """The parity figures of one export."""

    tolerance: float
    checks: tuple[ParityCheck, ...]

    @property
    def max_abs_probability_diff(self) -> float:
        return max(check.max_abs_probability_diff for check in self.checks)

    @property
    def digit_mismatches(self) -> int:
        return sum(check.digit_mismatches for check in self.checks)

    @property
    def images_compared(self) -> int:
        return sum(check.count for check in self.checks)

    @property
    def passed(self) -> bool:
        return all(check.passed(self.tolerance) for check in self.checks)

    def as_dict(self) -> dict:
        return {
            "tolerance": self.tolerance,
            "images_compared": self.images_compared,
            "max_abs_probability_diff": self.max_abs_probability_diff,
            "digit_mismatches": self.digit_mismatches,
            "checks": [asdict(check) for check in self.checks],
        }

    def describe_failures(self) -> str:
        return "; ".join(
            f"{check.images}: max |probability difference| "
            f"{check.max_abs_probability_diff:.3g} (limit {self.tolerance:g}), "
            f"{check.digit_mismatches} of {check.count} digits differ"
            for check in self.checks
            if not check.passed(self.tolerance)
        )


def measure_parity(
    serving_model: ServingModel,
    onnx_model: bytes,
    test_images: np.ndarray,
    *,
    random_batch_sizes: Sequence[int] = RANDOM_BATCH_SIZES,
    seed: int = RANDOM_SEED,
    tolerance: float = TOLERANCE,
) -> ParityReport:
    """Run both models on the test images and seeded random uint8 batches; compare."""
    session = _session(onnx_model)
    rng = np.random.default_rng(seed)
    image_sets = [("test set", as_images(test_images))]
    for size in random_batch_sizes:
        batch = rng.integers(0, 256, size=(size, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        image_sets.append((f"random uint8 batch of {size}", batch))
    checks = tuple(
        _compare(serving_model, session, description, images) for description, images in image_sets
    )
    return ParityReport(tolerance=tolerance, checks=checks)


def check_parity(
    serving_model: ServingModel, onnx_model: bytes, test_images: np.ndarray
) -> ParityReport:
    """`measure_parity`, raising ParityError unless every check passes."""
    report = measure_parity(serving_model, onnx_model, test_images)
    if not report.passed:
        raise ParityError(
            f"the ONNX export disagrees with the PyTorch model: {report.describe_failures()}"
        )
    return report


def _compare(
    serving_model: ServingModel,
    session: onnxruntime.InferenceSession,
    description: str,
    images: np.ndarray,
) -> ParityCheck:
    with torch.inference_mode():
        torch_probability, torch_digit = serving_model(torch.from_numpy(images))
    onnx_probability, onnx_digit = session.run(list(OUTPUT_NAMES), {IMAGES.name: images})
    difference = np.abs(onnx_probability.astype(np.float64) - torch_probability.double().numpy())
    return ParityCheck(
        images=description,
        count=len(images),
        max_abs_probability_diff=float(difference.max(initial=0.0)),
        digit_mismatches=int((onnx_digit != torch_digit.numpy()).sum()),
    )


def _session(onnx_model: bytes) -> onnxruntime.InferenceSession:
    options = onnxruntime.SessionOptions()
    options.log_severity_level = _QUIET
    return onnxruntime.InferenceSession(
        onnx_model, sess_options=options, providers=["CPUExecutionProvider"]
    )


def as_images(images: np.ndarray) -> np.ndarray:
    images = np.ascontiguousarray(images)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGES.shape[1:]:
        raise ValueError(
            f"test images must be uint8 [N, {IMAGE_SIDE}, {IMAGE_SIDE}]; "
            f"got {images.dtype} {list(images.shape)}"
        )
    return images
