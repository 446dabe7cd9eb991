"""The example PNGs in examples/ are what examples/make_examples.py makes from the shipped
test set, and the server's PNG decoding turns each back into its MNIST digit."""

from __future__ import annotations

import importlib.util
import io

import numpy as np
import pytest
from helpers import REPO_ROOT
from PIL import Image

from serving.imaging import png_to_image

EXAMPLES = REPO_ROOT / "examples"


def load_generator():
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_examples = load_generator()
DIGITS = make_examples.example_digits()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.mode == "L" and image.size == (112, 112)
        return np.asarray(image)


def test_the_shipped_examples_are_exactly_what_the_generator_makes(tmp_path):
    written = make_examples.write_examples(tmp_path)
    assert sorted(path.name for path in written) == sorted(
        path.name for path in EXAMPLES.glob("*.png")
    )
    for path in written:
        shipped = (EXAMPLES / path.name).read_bytes()
        np.testing.assert_array_equal(pixels(path.read_bytes()), pixels(shipped))
    again = make_examples.write_examples(tmp_path / "again")
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in written]


def test_names_say_the_truth_and_both_digits_appear():
    assert {digit for _, digit in DIGITS.values()} == {3, 7}
    for name, (_, digit) in DIGITS.items():
        assert name.startswith({3: "three-", 7: "seven-"}[digit])


@pytest.mark.parametrize("name", sorted(DIGITS))
def test_png_decoding_gives_back_the_mnist_digit(name):
    source, _ = DIGITS[name]
    decoded = png_to_image((EXAMPLES / f"{name}.png").read_bytes(), 0)
    assert decoded.shape == (28, 28) and decoded.dtype == np.uint8
    difference = np.abs(decoded.astype(np.int16) - source.astype(np.int16))
    assert difference.mean() < 8, difference.mean()
    correlation = np.corrcoef(decoded.ravel().astype(float), source.ravel().astype(float))[0, 1]
    assert correlation > 0.99, correlation
