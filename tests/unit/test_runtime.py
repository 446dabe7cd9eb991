from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from serving.contract import EXPLANATION_OUTPUT_NAMES
from serving.runtime import (
    CPU_PROVIDER,
    ContractViolation,
    DeviceUnavailable,
    ExplanationRuntime,
    ModelRuntime,
    RuntimeOptions,
    cuda_usable,
    requested_providers,
)
from serving.synthetic import (
    linear_explanation_bytes,
    linear_model_bytes,
    random_linear_model,
    random_linear_weights,
)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(random_linear_model(seed=3))
    return path


def test_predict_matches_numpy_reference(tmp_path):
    rng = np.random.default_rng(0)
    weights, bias = rng.normal(0, 0.05, 784), 0.3
    path = tmp_path / "model.onnx"
    path.write_bytes(linear_model_bytes(weights, bias))
    runtime = ModelRuntime(path)
    images = rng.integers(0, 256, (50, 28, 28), dtype=np.uint8)
    probability, digit = runtime.predict(images)
    logits = images.reshape(50, 784).astype(np.float64) / 255.0 @ weights + bias
    expected = 1 / (1 + np.exp(-logits))
    assert probability.dtype == np.float32 and probability.shape == (50,)
    assert digit.dtype == np.int64
    np.testing.assert_allclose(probability, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(digit, np.where(probability >= 0.5, 7, 3))


def test_every_uint8_extreme_and_batch_size_is_served(model_path):
    runtime = ModelRuntime(model_path)
    for batch in (1, 7, 1000):
        for fill in (0, 255):
            probability, digit = runtime.predict(np.full((batch, 28, 28), fill, np.uint8))
            assert np.isfinite(probability).all() and len(digit) == batch
            assert set(digit.tolist()) <= {3, 7}


def test_cpu_provider_is_checked_and_reported(model_path):
    runtime = ModelRuntime(model_path, RuntimeOptions(device="cpu", intra_op_threads=2))
    assert runtime.provider == CPU_PROVIDER
    assert runtime.session.get_providers() == [CPU_PROVIDER]


def test_auto_picks_what_is_usable(model_path):
    runtime = ModelRuntime(model_path, RuntimeOptions(device="auto"))
    assert runtime.provider == ("CUDAExecutionProvider" if cuda_usable() else CPU_PROVIDER)


def test_cuda_without_onnxruntime_gpu_refuses_and_says_why(model_path):
    if cuda_usable():
        assert requested_providers("cuda")[0] == "CUDAExecutionProvider"
        return
    with pytest.raises(DeviceUnavailable, match="onnxruntime-gpu"):
        ModelRuntime(model_path, RuntimeOptions(device="cuda"))


@pytest.mark.parametrize("level", ["disable", "basic", "extended", "all"])
def test_graph_optimisation_levels_all_load(model_path, level):
    runtime = ModelRuntime(model_path, RuntimeOptions(graph_optimization=level))
    assert runtime.predict(np.zeros((1, 28, 28), np.uint8))[1].tolist() in ([3], [7])


def _identity_model(tmp_path, input_type, input_shape, outputs):
    graph = helper.make_graph(
        [helper.make_node("Identity", ["images"], [name]) for name, _, _ in outputs],
        "bad",
        [helper.make_tensor_value_info("images", input_type, input_shape)],
        [helper.make_tensor_value_info(name, kind, shape) for name, kind, shape in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "bad.onnx"
    path.write_bytes(model.SerializeToString())
    return path


def test_contract_violations_are_refused_with_the_reason(tmp_path):
    float_input = _identity_model(
        tmp_path,
        TensorProto.FLOAT,
        ["N", 28, 28],
        [("probability", TensorProto.FLOAT, ["N", 28, 28])],
    )
    with pytest.raises(ContractViolation, match="tensor\\(float\\), expected tensor\\(uint8\\)"):
        ModelRuntime(float_input)
    fixed_batch = _identity_model(
        tmp_path, TensorProto.UINT8, [4, 28, 28], [("digit", TensorProto.UINT8, [4, 28, 28])]
    )
    with pytest.raises(ContractViolation, match="fixed batch size 4"):
        ModelRuntime(fixed_batch)
    missing_output = _identity_model(
        tmp_path, TensorProto.UINT8, ["N", 28, 28], [("other", TensorProto.UINT8, ["N", 28, 28])]
    )
    with pytest.raises(ContractViolation, match="no output 'probability'"):
        ModelRuntime(missing_output)
    assert onnx  # the fixtures above are built with onnx.helper


def test_an_explanation_graph_loads_checked_and_its_votes_add_up_to_the_served_logit(tmp_path):
    weights = random_linear_weights(seed=4)
    (tmp_path / "model.onnx").write_bytes(linear_model_bytes(*weights))
    (tmp_path / "explanation.onnx").write_bytes(linear_explanation_bytes(*weights))
    options = RuntimeOptions(graph_optimization="basic")
    model = ModelRuntime(tmp_path / "model.onnx", options)
    explainer = ExplanationRuntime(tmp_path / "explanation.onnx", options)
    assert explainer.provider == model.provider == CPU_PROVIDER
    images = np.random.default_rng(1).integers(0, 256, (40, 28, 28), dtype=np.uint8)
    contributions, bias_term, logit, probability, digit = explainer.run(images)
    assert contributions.shape == (40, 28, 28) and bias_term.shape == (40,)
    pixels = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(contributions, pixels * weights.weights.reshape(28, 28), atol=1e-6)
    np.testing.assert_allclose(bias_term, weights.bias, rtol=1e-6)
    np.testing.assert_allclose(contributions.sum(axis=(1, 2)) + bias_term, logit, atol=1e-4)
    served_probability, served_digit = model.predict(images)
    np.testing.assert_array_equal(probability, served_probability)
    np.testing.assert_array_equal(digit, served_digit)


def test_an_explanation_graph_is_held_to_its_own_outputs(tmp_path, model_path):
    with pytest.raises(ContractViolation, match="no output 'contributions'"):
        ExplanationRuntime(model_path)  # a serving graph is no explanation
    wrong_type = _identity_model(
        tmp_path,
        TensorProto.UINT8,
        ["N", 28, 28],
        [(name, TensorProto.UINT8, ["N", 28, 28]) for name in EXPLANATION_OUTPUT_NAMES],
    )
    with pytest.raises(ContractViolation, match=r"contributions is tensor\(uint8\), expected"):
        ExplanationRuntime(wrong_type)
