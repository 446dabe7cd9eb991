"""The model contract: what every served model takes and returns, defined once.

    images       UINT8 [N, 28, 28]   raw pixels, 0 = background, 255 = ink
    probability  FP32  [N]           P(the digit is a 7)
    digit        INT64 [N]           7 where probability >= 0.5, else 3

Training, export, the parity check, the runtime's load check, both gRPC APIs, the client
and the metrics all import these names. Pure constants: no numpy, no torch, so anything
(the torch-free server, the client) can import it.
"""

from __future__ import annotations

from dataclasses import dataclass

IMAGE_SIDE = 28
PIXELS = IMAGE_SIDE * IMAGE_SIDE
BATCH_DIMENSION = "N"
"""The symbolic name of the dynamic first dimension in an exported graph."""

POSITIVE_DIGIT = 7
"""The digit `probability` is about: the positive class."""
NEGATIVE_DIGIT = 3
DIGITS = (NEGATIVE_DIGIT, POSITIVE_DIGIT)
DECISION_THRESHOLD = 0.5
"""`digit` is POSITIVE_DIGIT where probability >= DECISION_THRESHOLD."""


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of the contract. `datatype` is the Open Inference Protocol's name (the
    model card and Triton use it too); -1 in `shape` is the batch dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def as_json(self) -> dict[str, object]:
        """As the model card records it: `{"name": ..., "datatype": ..., "shape": [...]}`."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


IMAGES = TensorSpec("images", "UINT8", (-1, IMAGE_SIDE, IMAGE_SIDE))
PROBABILITY = TensorSpec("probability", "FP32", (-1,))
DIGIT = TensorSpec("digit", "INT64", (-1,))
OUTPUTS = (PROBABILITY, DIGIT)
OUTPUT_NAMES = tuple(output.name for output in OUTPUTS)
OUTPUT_DATATYPES = {output.name: output.datatype for output in OUTPUTS}

# The explanation graph (`explanation.onnx`, next to `model.onnx`): the same `images` in;
# each pixel's vote (pixel x its weight, in [0, 1] pixel units), the bias term, the logit
# (votes + bias term), P(7) and the digit out. Exact for both architectures.
CONTRIBUTIONS = TensorSpec("contributions", "FP32", (-1, IMAGE_SIDE, IMAGE_SIDE))
BIAS_TERM = TensorSpec("bias_term", "FP32", (-1,))
LOGIT = TensorSpec("logit", "FP32", (-1,))
EXPLANATION_OUTPUTS = (CONTRIBUTIONS, BIAS_TERM, LOGIT, PROBABILITY, DIGIT)
EXPLANATION_OUTPUT_NAMES = tuple(output.name for output in EXPLANATION_OUTPUTS)
