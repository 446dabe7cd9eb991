"""Every prediction as pixel votes: the explanation graph.

Each pixel casts a vote, its value times a weight; the votes plus a bias make the score (the
logit), and sigmoid(score) is P(7). For `Linear` the weights and the bias are the model's own.
For `MLP` they depend on the image, but only through which hidden units it switches on: once
the ReLUs are fixed the network is linear in the pixels, so

    logit = sum_i x_i * (sum_j w2_j m_j W1_ij)  +  (sum_j w2_j m_j b1_j + b2),   m_j = [h_j > 0]

and x_i * sum_j w2_j m_j W1_ij is exactly the gradient of the logit times the input. Either
way the votes add up to the logit, with nothing left over.

The explanation graph computes it all from raw pixels, like the serving graph:

    images         UINT8 [N, 28, 28]   0 = background, 255 = ink
    contributions  FLOAT [N, 28, 28]   each pixel's vote: > 0 says 7, < 0 says 3
    bias_term      FLOAT [N]           the part of the logit no pixel casts
    logit          FLOAT [N]           the model's score: sum(contributions) + bias_term
    probability    FLOAT [N]           sigmoid(logit) = P(7), as the serving graph computes it
    digit          INT64 [N]           7 where probability >= 0.5, else 3

`check_explanation` proves an exported graph computes this, against torch and its autograd.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
import onnx
import onnxruntime
import torch
from torch import nn

from serving.contract import (
    BATCH_DIMENSION,
    BIAS_TERM,
    CONTRIBUTIONS,
    DIGIT,
    EXPLANATION_OUTPUT_NAMES,
    IMAGE_SIDE,
    IMAGES,
    LOGIT,
    NEGATIVE_DIGIT,
    PIXELS,
    POSITIVE_DIGIT,
    PROBABILITY,
)
from training.export import (
    OPSET_VERSION,
    ExportError,
    ModelMetadata,
    ServingModel,
    check_model,
    drop_location_metadata,
    finalize,
    quiet_exporter,
)
from training.models import MLP, Linear
from training.parity import RANDOM_BATCH_SIZES, RANDOM_SEED, as_images

# Limits on `relative_gap` (absolute up to 1, relative beyond; for logits, relative to the
# size of the votes they add up), for any image:
ADDITIVITY_TOLERANCE = 1e-4
"""sum(contributions) + bias_term against logit."""
SIGMOID_TOLERANCE = 1e-5
"""sigmoid(logit) against probability."""
TORCH_TOLERANCE = 1e-5
"""The graph's logit and probability against torch's."""
GRADIENT_TOLERANCE = 1e-4
"""Every contribution against autograd's gradient x input for its pixel."""

EXPLANATION_DOC = (
    f"mnist37 explanation: {IMAGES.name} UINT8 [N,28,28] raw pixels -> "
    f"{CONTRIBUTIONS.name} FLOAT [N,28,28] each pixel's vote (pixel x weight), "
    f"{BIAS_TERM.name} FLOAT [N], {LOGIT.name} FLOAT [N] = sum of votes + bias term, "
    f"{PROBABILITY.name} FLOAT [N] P(7), {DIGIT.name} INT64 [N] 3 or 7"
)

_QUIET = 3  # onnxruntime log severity: errors only


class ExplanationError(ExportError):
    """The explanation graph cannot be built, or does not compute what the model computes."""


# --- the maths ---------------------------------------------------------------------------


def hidden_units(mlp: MLP, pixels: torch.Tensor) -> torch.Tensor:
    """The MLP's hidden pre-activations h = pixels @ W1 + b1, [N, hidden]."""
    return pixels @ mlp.w1 + mlp.b1


def active_units(mlp: MLP, pixels: torch.Tensor) -> torch.Tensor:
    """The ReLU mask m = [h > 0] as 0.0/1.0, [N, hidden]: which units pass their input on.

    A unit at h = 0 exactly adds 0 to the logit either way; autograd's clamp would count it
    active (its gradient at 0 is 1), a tie that real images do not hit.
    """
    return (hidden_units(mlp, pixels) > 0).to(pixels.dtype)


def pixel_weights(core: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The weight of each pixel's vote, per image, [N, 784]."""
    if isinstance(core, Linear):
        return core.weights.expand(len(pixels), PIXELS)
    if isinstance(core, MLP):
        # w2_j m_j: how much a unit's input moves the logit; 0 for the units this image mutes.
        unit_weights = active_units(core, pixels) * core.w2
        return unit_weights @ core.w1.T
    raise _unsupported(core)


def bias_term(core: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The part of the logit no pixel casts, per image, [N]."""
    if isinstance(core, Linear):
        return core.bias.expand(len(pixels))
    if isinstance(core, MLP):
        unit_weights = active_units(core, pixels) * core.w2
        return unit_weights @ core.b1 + core.b2
    raise _unsupported(core)


def pixel_votes(core: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """Each pixel's vote, pixel x its weight, [N, 784]: they add up to logit - bias_term."""
    return pixels * pixel_weights(core, pixels)


def _unsupported(core: nn.Module) -> ExplanationError:
    return ExplanationError(
        f"no pixel-vote explanation for {type(core).__name__}: "
        f"only {Linear.__name__} and {MLP.__name__} are piecewise linear in the pixels"
    )


class Explanation(NamedTuple):
    """One batch's prediction, pixel by pixel (the explanation graph's outputs, in order)."""

    contributions: torch.Tensor
    bias_term: torch.Tensor
    logit: torch.Tensor
    probability: torch.Tensor
    digit: torch.Tensor


class ExplanationModel(nn.Module):
    """The graph that explains: uint8 images in, votes, bias term, logit, P(7), digit out."""

    def __init__(self, core: nn.Module) -> None:
        super().__init__()
        if not isinstance(core, Linear | MLP):
            raise _unsupported(core)
        self.core = core

    def forward(self, images: torch.Tensor) -> Explanation:
        # The serving graph's scaling, operation for operation, so the logits agree.
        pixels = images.flatten(1).to(torch.float32) / 255.0
        # The logit comes from the model itself, not from adding up the votes: that sum is
        # what check_explanation verifies, so it must not hold by construction.
        logit = self.core(pixels)
        probability = torch.sigmoid(logit)
        digit = torch.where(probability >= 0.5, POSITIVE_DIGIT, NEGATIVE_DIGIT)
        return Explanation(
            contributions=pixel_votes(self.core, pixels).unflatten(1, (IMAGE_SIDE, IMAGE_SIDE)),
            bias_term=bias_term(self.core, pixels),
            logit=logit,
            probability=probability,
            digit=digit.to(torch.int64),
        )


# --- the ONNX graph ----------------------------------------------------------------------


def export_explanation(core: nn.Module) -> onnx.ModelProto:
    """Export the explanation graph of `core` (a `Linear` or an `MLP`), fully checked.

    Exported like the serving graph (training/export.py): dynamo exporter, `OPSET_VERSION`,
    weights inside the one file, no install paths, nothing printed. Unstamped:
    `finalize_explanation` adds the model's metadata and serializes it.
    """
    explanation_model = ExplanationModel(core).eval()
    example = torch.zeros(2, IMAGE_SIDE, IMAGE_SIDE, dtype=torch.uint8)
    try:
        with quiet_exporter():
            program = torch.onnx.export(
                explanation_model,
                (example,),
                dynamo=True,
                external_data=False,
                verbose=False,
                opset_version=OPSET_VERSION,
                input_names=[IMAGES.name],
                output_names=list(EXPLANATION_OUTPUT_NAMES),
                dynamic_shapes=({0: BATCH_DIMENSION},),
            )
    except Exception as error:
        raise ExplanationError(
            f"torch.onnx.export failed for the explanation of {type(core).__name__}: {error}"
        ) from error
    if program is None:
        raise ExplanationError("torch.onnx.export returned no ONNX program")
    model = program.model_proto
    drop_location_metadata(model)
    model.doc_string = EXPLANATION_DOC
    check_model(model)
    return model


def finalize_explanation(model: onnx.ModelProto, metadata: ModelMetadata) -> bytes:
    """The explanation file's contents: stamped with the serving model's `metadata`, checked.

    `finalize` stamps and checks; its doc string describes the serving graph's outputs, so
    the explanation's own replaces it.
    """
    stamped = onnx.load_from_string(finalize(model, metadata))
    stamped.doc_string = EXPLANATION_DOC
    return stamped.SerializeToString(deterministic=True)


# --- proof against torch -----------------------------------------------------------------


@dataclass(frozen=True)
class Difference:
    """The largest difference between two things that must agree, and where it is."""

    what: str
    limit: float
    largest: float
    image: int  # index in its batch of the image with the largest difference; -1 if none

    @property
    def passed(self) -> bool:
        return self.largest <= self.limit


@dataclass(frozen=True)
class ExplanationCheck:
    """How well the explanation graph holds up on one set of images."""

    images: str
    count: int
    differences: tuple[Difference, ...]
    digit_mismatches: int  # digits that differ from torch's, or from the 0.5 rule

    @property
    def passed(self) -> bool:
        return self.digit_mismatches == 0 and all(d.passed for d in self.differences)

    def describe_failures(self) -> str:
        failures = [
            f"{d.what} differ by up to {d.largest:.3g} (limit {d.limit:g}, image {d.image})"
            for d in self.differences
            if not d.passed
        ]
        if self.digit_mismatches:
            failures.append(f"{self.digit_mismatches} of {self.count} digits differ")
        return f"{self.images}: " + ", ".join(failures)


@dataclass(frozen=True)
class ExplanationReport:
    """The explanation figures of one export."""

    checks: tuple[ExplanationCheck, ...]

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def images_compared(self) -> int:
        return sum(check.count for check in self.checks)

    def largest(self) -> dict[str, float]:
        """Each kind of difference's largest value over all the image sets."""
        largest: dict[str, float] = {}
        for check in self.checks:
            for difference in check.differences:
                largest[difference.what] = max(
                    largest.get(difference.what, 0.0), difference.largest
                )
        return largest

    def as_dict(self) -> dict:
        return {
            "images_compared": self.images_compared,
            "largest_differences": self.largest(),
            "digit_mismatches": sum(check.digit_mismatches for check in self.checks),
            "checks": [asdict(check) for check in self.checks],
        }

    def describe_failures(self) -> str:
        return "; ".join(check.describe_failures() for check in self.checks if not check.passed)


def measure_explanation(
    core: nn.Module,
    graph_bytes: bytes,
    images: np.ndarray,
    *,
    random_batch_sizes: Sequence[int] = RANDOM_BATCH_SIZES,
    seed: int = RANDOM_SEED,
) -> ExplanationReport:
    """Run the graph on `images` and seeded random uint8 batches; compare with torch."""
    session = _session(graph_bytes)
    rng = np.random.default_rng(seed)
    image_sets = [("test set", as_images(images))]
    for size in random_batch_sizes:
        batch = rng.integers(0, 256, size=(size, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
        image_sets.append((f"random uint8 batch of {size}", batch))
    return ExplanationReport(
        checks=tuple(_compare(core, session, name, batch) for name, batch in image_sets)
    )


def check_explanation(core: nn.Module, graph_bytes: bytes, images: np.ndarray) -> ExplanationReport:
    """`measure_explanation`, raising ExplanationError unless every check passes.

    Checked on every image, within `relative_gap`s of: sum(contributions) + bias_term =
    logit (1e-4) and sigmoid(logit) = probability (1e-5); logit and probability = torch's
    (1e-5); every contribution = autograd's gradient x input (1e-4). Logits are compared
    relative to the size of what adds up to them, sum(|contributions|) + |bias_term|.
    Every digit must be torch's and follow the 0.5 rule.
    """
    report = measure_explanation(core, graph_bytes, images)
    if not report.passed:
        raise ExplanationError(
            f"the explanation graph does not explain the model: {report.describe_failures()}"
        )
    return report


def gradient_times_input(core: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """d logit / d pixel x pixel for every pixel of every image, by autograd, [N, 784]."""
    with torch.enable_grad():
        pixels = pixels.detach().requires_grad_()
        # Each logit depends on its own image alone, so the gradient of their sum holds every
        # image's own gradient; and grad() leaves the model's .grad fields untouched.
        (gradient,) = torch.autograd.grad(core(pixels).sum(), pixels)
    return gradient * pixels.detach()


def _compare(
    core: nn.Module,
    session: onnxruntime.InferenceSession,
    description: str,
    images: np.ndarray,
) -> ExplanationCheck:
    outputs = session.run(list(EXPLANATION_OUTPUT_NAMES), {IMAGES.name: images})
    _check_outputs(outputs, len(images))
    contributions, bias, logit, probability, digit = outputs
    with torch.inference_mode():
        torch_images = torch.from_numpy(images)
        torch_probability, torch_digit = ServingModel(core).eval()(torch_images)
        pixels = torch_images.flatten(1).to(torch.float32) / 255.0
        torch_logit = core(pixels)
    torch_votes = gradient_times_input(core, pixels.clone()).view(-1, IMAGE_SIDE, IMAGE_SIDE)

    # Sums in float64: the graph's float32 rounding is measured, not the check's own.
    votes = contributions.astype(np.float64)
    logit64 = logit.astype(np.float64)
    # float32 rounds a sum in proportion to the size of its terms, not of its result: a
    # linear model whose large votes cancel (mean-difference weights x 10: |votes| add up
    # to 600) has test-set logits up to 1.5e-5 of |logit| apart from torch's.
    terms = np.abs(votes).sum(axis=(1, 2)) + np.abs(bias.astype(np.float64))
    differences = (
        _difference(
            "sum(contributions) + bias_term and logit",
            ADDITIVITY_TOLERANCE,
            votes.sum(axis=(1, 2)) + bias,
            logit64,
            terms,
        ),
        _difference(
            "sigmoid(logit) and probability",
            SIGMOID_TOLERANCE,
            np.exp(-np.logaddexp(0.0, -logit64)),  # sigmoid without overflowing exp
            probability,
        ),
        _difference("logit and torch's logit", TORCH_TOLERANCE, logit, torch_logit.numpy(), terms),
        _difference(
            "probability and torch's serving probability",
            TORCH_TOLERANCE,
            probability,
            torch_probability.numpy(),
        ),
        _difference(
            "contributions and autograd's gradient x input",
            GRADIENT_TOLERANCE,
            votes,
            torch_votes.numpy(),
        ),
    )
    by_rule = np.where(probability >= 0.5, POSITIVE_DIGIT, NEGATIVE_DIGIT)
    mismatches = (digit != torch_digit.numpy()) | (digit != by_rule)
    return ExplanationCheck(
        images=description,
        count=len(images),
        differences=differences,
        digit_mismatches=int(mismatches.sum()),
    )


def _check_outputs(outputs: list[np.ndarray], count: int) -> None:
    """Raise ExplanationError unless the outputs have the contract's dtypes and shapes."""
    expected = {
        CONTRIBUTIONS.name: (np.float32, (count, IMAGE_SIDE, IMAGE_SIDE)),
        BIAS_TERM.name: (np.float32, (count,)),
        LOGIT.name: (np.float32, (count,)),
        PROBABILITY.name: (np.float32, (count,)),
        DIGIT.name: (np.int64, (count,)),
    }
    for output, (name, (dtype, shape)) in zip(outputs, expected.items(), strict=True):
        if output.dtype != dtype or output.shape != shape:
            raise ExplanationError(
                f"the explanation graph's {name} for {count} images is {output.dtype} "
                f"{list(output.shape)}; expected {np.dtype(dtype)} {list(shape)}"
            )


def _difference(
    what: str,
    limit: float,
    actual: np.ndarray,
    expected: np.ndarray,
    scale: np.ndarray | None = None,
) -> Difference:
    """The largest `relative_gap` and the image it is in (axis 0 is the batch)."""
    gap = relative_gap(actual, expected, scale)
    per_image = gap.reshape(len(gap), -1).max(axis=1, initial=0.0)
    # NaN compares false with every limit, so it is reported as infinitely far off.
    per_image = np.where(np.isnan(per_image), np.inf, per_image)
    if per_image.size == 0:
        return Difference(what, limit, 0.0, -1)
    worst = int(per_image.argmax())
    return Difference(what, limit, float(per_image[worst]), worst)


def relative_gap(
    actual: np.ndarray, expected: np.ndarray, scale: np.ndarray | None = None
) -> np.ndarray:
    """|actual - expected| / max(1, |expected|, scale): absolute up to 1, relative beyond.

    float32 rounding grows with the numbers rounded, and the graph and torch add up 784
    products in different orders: on random uint8 noise a fully trained linear model's
    logits (|logit| up to 15) differ by 1.4e-5, so a fixed absolute 1e-5 would fail a good
    export. Probabilities and single votes stay below 1, where this is the absolute gap.
    `scale`, shaped like `expected`, is the size of the terms each expected value is a sum
    of, when it is one: rounding grows with them even where they cancel to a small sum.
    """
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    size = np.maximum(1.0, np.abs(expected))
    if scale is not None:
        size = np.maximum(size, scale)
    return np.abs(actual - expected) / size


def _session(graph_bytes: bytes) -> onnxruntime.InferenceSession:
    """An onnxruntime session for the graph, after checking it has the contract's names."""
    options = onnxruntime.SessionOptions()
    options.log_severity_level = _QUIET
    try:
        session = onnxruntime.InferenceSession(
            graph_bytes, sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as error:
        raise ExplanationError(f"onnxruntime cannot load the explanation graph: {error}") from error
    inputs = [tensor.name for tensor in session.get_inputs()]
    outputs = [tensor.name for tensor in session.get_outputs()]
    if inputs != [IMAGES.name] or outputs != list(EXPLANATION_OUTPUT_NAMES):
        raise ExplanationError(
            f"the explanation graph has inputs {inputs} and outputs {outputs}; "
            f"expected [{IMAGES.name!r}] and {list(EXPLANATION_OUTPUT_NAMES)}"
        )
    return session
