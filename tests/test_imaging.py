from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from serving.errors import InvalidInput
from serving.imaging import mnist_normalize, pixels_to_image, png_to_image
from serving.runtime import ModelRuntime
from serving.synthetic import mean_difference_model


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def as_photo(digit: np.ndarray, scale: int = 5, mode: str = "RGB") -> bytes:
    """A scanned-looking version of an MNIST digit: dark ink on white, larger, off-centre."""
    big = np.asarray(Image.fromarray(digit).resize((28 * scale, 28 * scale), Image.BILINEAR))
    canvas = np.zeros((28 * scale + 60, 28 * scale + 20), np.uint8)
    canvas[50 : 50 + 28 * scale, 5 : 5 + 28 * scale] = big
    return png(255 - canvas, mode)


def test_output_is_28x28_uint8_with_a_20px_box_centred_by_mass():
    bar = np.zeros((200, 100), np.uint8)
    bar[20:180, 40:60] = 255  # a tall stroke, white on black
    image = png_to_image(png(bar), 0)
    assert image.shape == (28, 28) and image.dtype == np.uint8
    rows = np.flatnonzero(image.max(axis=1) > 30)
    assert rows[-1] - rows[0] + 1 in (19, 20, 21)
    ys, xs = np.indices(image.shape)
    total = image.sum()
    assert abs((ys * image).sum() / total - 14) <= 0.5
    assert abs((xs * image).sum() / total - 14) <= 0.5


def test_light_background_is_inverted_and_modes_agree():
    stroke = np.zeros((60, 60), np.uint8)
    stroke[10:50, 25:35] = 255
    reference = png_to_image(png(stroke), 0)
    for mode in ("L", "RGB", "RGBA", "P", "1", "I;16"):
        dark_on_light = png_to_image(png(255 - stroke, mode), 0)
        assert np.abs(dark_on_light.astype(int) - reference).max() <= 2, mode


def test_transparent_background_counts_as_paper():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[5:35, 15:25] = (0, 0, 0, 255)  # black ink, transparent elsewhere
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    image = png_to_image(buffer.getvalue(), 0)
    assert image.max() > 200 and image[0, 0] == 0


def test_blank_image_gives_blank_digit():
    assert not png_to_image(png(np.full((30, 30), 255, np.uint8)), 0).any()
    assert not mnist_normalize(np.zeros((5, 5), np.float32)).any()


def test_an_mnist_digit_as_png_comes_back_as_itself(test_digits):
    sample = test_digits[0][:100]
    converted = np.stack(
        [png_to_image(png(255 - digit), index) for index, digit in enumerate(sample)]
    )
    assert np.abs(converted.astype(int) - sample).mean() < 0.5


def test_mnist_digits_survive_the_round_trip(test_digits, tmp_path):
    images, labels = test_digits
    path = tmp_path / "model.onnx"
    path.write_bytes(mean_difference_model(images, labels))
    runtime = ModelRuntime(path)
    sample = images[:200]
    converted = np.stack(
        [png_to_image(as_photo(digit), index) for index, digit in enumerate(sample)]
    )
    direct = runtime.predict(sample)[1]
    via_png = runtime.predict(converted)[1]
    assert (direct == via_png).mean() >= 0.96
    labels = labels[:200]
    assert abs((via_png == labels).mean() - (direct == labels).mean()) <= 0.02


@pytest.mark.parametrize("data", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 50])
def test_undecodable_png_names_the_image(data):
    with pytest.raises(InvalidInput, match=r"images\[4\]\.png"):
        png_to_image(data, 4)


def test_truncated_png_names_the_image():
    data = png(np.full((64, 64), 128, np.uint8))
    with pytest.raises(InvalidInput, match=r"images\[2\]\.png"):
        png_to_image(data[: len(data) // 2], 2)


def test_raw_pixels_need_exactly_784_bytes():
    assert pixels_to_image(bytes(784), 0).shape == (28, 28)
    with pytest.raises(InvalidInput, match=r"images\[1\]\.pixels: 783 bytes"):
        pixels_to_image(bytes(783), 1)
