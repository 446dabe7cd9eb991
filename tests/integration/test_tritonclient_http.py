"""tritonclient.http (Triton's own HTTP client, geventhttpclient underneath) against the
real server: it classifies all 2,038 shipped test digits in batches, with binary and JSON
tensors both ways, and every prediction is the one onnxruntime gives offline.

The client runs in a subprocess, as the gRPC one in test_server.py does: gevent stays out
of the test process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from serving.repository import latest_version
from serving.runtime import ModelRuntime

# (input binary, outputs binary): the ways tritonclient.http can send a request; None: no
# outputs named, and tritonclient asks for every output in binary (binary_data_output).
MODES = [(True, True), (False, False), (True, False), (False, True), (True, None), (False, None)]


def key(binary_input: bool, binary_output: bool | None) -> str:
    return f"{int(binary_input)}{'-' if binary_output is None else int(binary_output)}"


_CLIENT = """
import json, sys
import numpy as np
import tritonclient.http as triton

address, images_path, out_path = sys.argv[1:4]
images = np.load(images_path)
modes = json.loads(sys.argv[4])
with triton.InferenceServerClient(address, concurrency=4) as client:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mnist37")
    config = client.get_model_config("mnist37")
    # As many images a request as the batcher prefers, within the model's max batch size.
    batch = min(config["dynamic_batching"]["preferred_batch_size"][0], config["max_batch_size"])
    starts = range(0, len(images), batch)
    found, ids = {}, []
    for binary_input, binary_output in modes:
        key = f"{int(binary_input)}{'-' if binary_output is None else int(binary_output)}"
        pending = []
        for start in starts:
            tensor = triton.InferInput("images", list(images[start : start + batch].shape), "UINT8")
            tensor.set_data_from_numpy(images[start : start + batch], binary_data=binary_input)
            outputs = None if binary_output is None else [
                triton.InferRequestedOutput(name, binary_data=binary_output)
                for name in ("probability", "digit")
            ]
            request_id = f"{key}-{start}"
            pending.append(
                client.async_infer("mnist37", [tensor], outputs=outputs, request_id=request_id)
            )
        results = [call.get_result() for call in pending]
        for name in ("probability", "digit"):
            found[f"{key}-{name}"] = np.concatenate([r.as_numpy(name) for r in results])
        ids += [r.get_response()["id"] for r in results]
        binary_outputs = [
            "binary_data_size" in output.get("parameters", {})
            for output in results[0].get_response()["outputs"]
        ]
        found[f"{key}-binary"] = np.array(binary_outputs)
    np.savez(out_path, **found)
    print(json.dumps({"batch": batch, "requests": len(starts), "ids": ids}))
"""


@pytest.fixture(scope="module")
def offline(model_repository):
    return ModelRuntime(latest_version(model_repository, "mnist37").model_path)


def test_tritonclient_http_classifies_every_test_digit_as_offline(
    server, test_digits, offline, tmp_path: Path
):
    images, labels = test_digits
    assert len(images) == 2038
    np.save(tmp_path / "images.npy", images)
    completed = subprocess.run(
        [
            sys.executable,
            "-c",
            _CLIENT,
            server.http_address,
            str(tmp_path / "images.npy"),
            str(tmp_path / "found.npz"),
            json.dumps(MODES),
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert completed.returncode == 0, completed.stderr
    summary = json.loads(completed.stdout)
    assert summary["batch"] == 64 and summary["requests"] == 32  # 31 of 64 and one of 54
    assert summary["ids"] == [
        f"{key(*mode)}-{start}" for mode in MODES for start in range(0, 2038, 64)
    ]

    probability, digit = offline.predict(images)
    offline_accuracy = float((digit == labels).mean())
    assert offline_accuracy > 0.9
    found = np.load(tmp_path / "found.npz")
    for mode in MODES:
        name = key(*mode)
        served = found[f"{name}-digit"]
        assert served.dtype == np.int64 and served.shape == (2038,), name
        np.testing.assert_array_equal(served, digit, err_msg=name)
        assert float((served == labels).mean()) == offline_accuracy, name
        # float32 both ways: raw bytes, or JSON numbers that read back to the same float32
        assert found[f"{name}-probability"].dtype == np.float32, name
        np.testing.assert_array_equal(found[f"{name}-probability"], probability, err_msg=name)
        # the server answered in the form asked for (binary when no output was named)
        binary = mode[1] is not False
        assert found[f"{name}-binary"].tolist() == [binary, binary], name
