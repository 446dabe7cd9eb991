"""The onnxruntime sessions of a model version, each checked against the model contract
(`serving.contract`) when it loads: the serving graph's, and the explanation graph's
where the version has one. One class loads, checks and warms up both."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnxruntime as ort

from serving.contract import EXPLANATION_OUTPUTS, IMAGE_SIDE, IMAGES, OUTPUTS, TensorSpec

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"

_GRAPH_OPTIMIZATION = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
# onnxruntime's name for each contract datatype
_ORT_TYPES = {"UINT8": "tensor(uint8)", "FP32": "tensor(float)", "INT64": "tensor(int64)"}


class ModelLoadError(Exception):
    """A model version cannot be loaded."""


class DeviceUnavailable(ModelLoadError):
    """The requested execution provider cannot be used here."""


class ContractViolation(ModelLoadError):
    """The ONNX model does not have the contract's inputs and outputs."""


@dataclass(frozen=True)
class RuntimeOptions:
    device: str = "cpu"
    intra_op_threads: int = 1
    inter_op_threads: int = 1
    graph_optimization: str = "all"


def cuda_usable() -> bool:
    return CUDA_PROVIDER in ort.get_available_providers()


def requested_providers(device: str) -> list[str]:
    """The provider list for a --device value; raises DeviceUnavailable for cuda without it."""
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "cuda":
        if not cuda_usable():
            raise DeviceUnavailable(
                "--device cuda needs onnxruntime-gpu with a usable CUDA; this onnxruntime "
                f"{ort.__version__} offers only {', '.join(ort.get_available_providers())} "
                "(install the `gpu` extra instead of `serve`, or use --device cpu/auto)"
            )
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "auto":
        return [CUDA_PROVIDER, CPU_PROVIDER] if cuda_usable() else [CPU_PROVIDER]
    raise ValueError(f"unknown device {device!r}")


class GraphRuntime:
    """One loaded, checked and warmed-up graph of a model version: `images` in, the
    contract's `outputs` (a subclass's) out. `run` is thread-safe (onnxruntime's `run` is)
    and blocks: call it off the event loop."""

    outputs: ClassVar[tuple[TensorSpec, ...]]

    def __init__(
        self,
        model_path: Path,
        options: RuntimeOptions = RuntimeOptions(),
        model_bytes: bytes | None = None,
    ) -> None:
        """Load `model_bytes` if given (already checked by the caller; `model_path` then
        only names the model in messages), else the file at `model_path`."""
        self.model_path = model_path
        session_options = ort.SessionOptions()
        session_options.intra_op_num_threads = options.intra_op_threads
        session_options.inter_op_num_threads = options.inter_op_threads
        session_options.graph_optimization_level = _GRAPH_OPTIMIZATION[options.graph_optimization]
        session_options.log_severity_level = 3
        providers = requested_providers(options.device)
        try:
            self.session = ort.InferenceSession(
                model_bytes if model_bytes is not None else str(model_path),
                sess_options=session_options,
                providers=providers,
            )
        except Exception as error:
            if model_bytes is None:
                raise  # onnxruntime named the file itself
            raise _naming(error, model_path) from error
        # onnxruntime falls back to CPU silently when a provider fails to initialise.
        self.provider = self.session.get_providers()[0]
        if options.device == "cuda" and self.provider != CUDA_PROVIDER:
            raise DeviceUnavailable(
                f"--device cuda: onnxruntime could not start CUDA for {model_path} and fell "
                f"back to {self.provider} (check the driver, CUDA and cuDNN libraries)"
            )
        self._check_contract()
        self._output_names = [spec.name for spec in self.outputs]
        self.run(np.zeros((2, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8))

    def _check_contract(self) -> None:
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != IMAGES.name:
            names = [tensor.name for tensor in inputs]
            raise ContractViolation(f"{self.model_path}: inputs {names}, expected {[IMAGES.name]}")
        _check_tensor(self.model_path, inputs[0], IMAGES)
        outputs = {tensor.name: tensor for tensor in self.session.get_outputs()}
        for spec in self.outputs:
            if spec.name not in outputs:
                raise ContractViolation(
                    f"{self.model_path}: no output {spec.name!r} (outputs: {sorted(outputs)})"
                )
            _check_tensor(self.model_path, outputs[spec.name], spec)

    def run(self, images: np.ndarray) -> tuple[np.ndarray, ...]:
        """The `outputs` for uint8 [N, 28, 28] images, in their order."""
        return tuple(self.session.run(self._output_names, {IMAGES.name: images}))


class ModelRuntime(GraphRuntime):
    """The serving graph (`model.onnx`): P(7) and the digit."""

    outputs = OUTPUTS

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """P(7) as float32 [N] and the digit (3 or 7) as int64 [N] for uint8 [N, 28, 28]."""
        probability, digit = self.run(images)
        return probability, digit


class ExplanationRuntime(GraphRuntime):
    """The explanation graph (`explanation.onnx`, training/explain.py): `run` gives the
    contributions [N, 28, 28], bias_term, logit, probability and digit [N], in that order."""

    outputs = EXPLANATION_OUTPUTS


def _naming(error: Exception, model_path: Path) -> Exception:
    """onnxruntime's `error` about bytes it was given, of the same type where it can be
    built again, naming the file they came from (which graph of the version failed)."""
    message = f"{model_path}: {error}"
    try:
        return type(error)(message)
    except Exception:
        return ModelLoadError(message)


def _check_tensor(model_path: Path, tensor: ort.NodeArg, spec: TensorSpec) -> None:
    element_type = _ORT_TYPES[spec.datatype]
    if tensor.type != element_type:
        raise ContractViolation(
            f"{model_path}: {tensor.name} is {tensor.type}, expected {element_type}"
        )
    shape, rank = tensor.shape, len(spec.shape)
    if len(shape) != rank:
        raise ContractViolation(f"{model_path}: {tensor.name} has shape {shape}, not rank {rank}")
    if isinstance(shape[0], int):
        raise ContractViolation(
            f"{model_path}: {tensor.name} has a fixed batch size {shape[0]}; export it with a "
            "dynamic first dimension"
        )
    if list(shape[1:]) != list(spec.shape[1:]):
        need = ", ".join(["N", *map(str, spec.shape[1:])])
        raise ContractViolation(f"{model_path}: {tensor.name} has shape {shape}, need [{need}]")
