"""The model contract is one importable definition, free of numpy and torch."""

from __future__ import annotations

import subprocess
import sys

from helpers import REPO_ROOT

from serving.contract import DIGIT, IMAGES, OUTPUT_DATATYPES, OUTPUT_NAMES, PROBABILITY


def test_the_contract_imports_neither_numpy_nor_torch():
    script = (
        "import sys, serving.contract; "
        "heavy = {'numpy', 'torch', 'onnxruntime', 'grpc'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_the_contract_tensors_as_the_model_card_records_them():
    assert IMAGES.as_json() == {"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}
    assert [output.as_json() for output in (PROBABILITY, DIGIT)] == [
        {"name": "probability", "datatype": "FP32", "shape": [-1]},
        {"name": "digit", "datatype": "INT64", "shape": [-1]},
    ]
    assert OUTPUT_NAMES == ("probability", "digit")
    assert OUTPUT_DATATYPES == {"probability": "FP32", "digit": "INT64"}
