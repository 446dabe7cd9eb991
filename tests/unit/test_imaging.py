from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from helpers import REPO_ROOT, png
from PIL import Image

from serving.errors import InvalidInput
from serving.imaging import (
    PNG_SIGNATURE,
    mnist_normalize,
    pixels_to_image,
    png_size,
    png_to_image,
)
from serving.runtime import ModelRuntime
from serving.synthetic import mean_difference_model


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


def rgba_png(rgba: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def ink_on(digit: np.ndarray, ink: int, paper: int | None) -> bytes:
    """`digit` (0-255 coverage) in `ink` colour over opaque `paper`, or over a transparent
    background (coverage as alpha) when `paper` is None."""
    big = np.asarray(Image.fromarray(digit).resize((112, 112), Image.BILINEAR), np.float32)
    rgba = np.zeros((140, 140, 4), np.uint8)
    if paper is None:
        rgba[..., :3] = 255 - ink  # the hidden colour of transparent pixels must not matter
        rgba[14:126, 14:126, :3] = ink
        rgba[14:126, 14:126, 3] = big.astype(np.uint8)
    else:
        coverage = np.zeros((140, 140), np.float32)
        coverage[14:126, 14:126] = big / 255
        rgba[..., :3] = np.rint(ink * coverage + paper * (1 - coverage))[..., None]
        rgba[..., 3] = 255
    return rgba_png(rgba)


@pytest.mark.parametrize(
    ("ink", "paper"),
    [(0, None), (255, None), (0, 255), (255, 0)],
    ids=["black-on-transparent", "white-on-transparent", "black-on-white", "white-on-black"],
)
def test_ink_and_background_of_any_colour_give_the_same_digit(test_digits, ink, paper):
    for index, digit in enumerate(test_digits[0][:10]):
        reference = png_to_image(ink_on(digit, 255, 0), index)
        assert reference.sum() > 255 * 40
        assert (
            np.abs(png_to_image(ink_on(digit, ink, paper), index).astype(int) - reference).max()
            <= 1
        )


@pytest.mark.parametrize(
    "blank",
    [
        png(np.full((30, 30), 255, np.uint8)),
        png(np.zeros((30, 30), np.uint8)),
        png(np.full((30, 30), 128, np.uint8), "RGB"),
        rgba_png(np.zeros((30, 30, 4), np.uint8)),  # fully transparent
        rgba_png(np.full((30, 30, 4), 255, np.uint8)),  # opaque white
    ],
    ids=["white", "black", "grey", "transparent", "opaque-white"],
)
def test_an_image_without_ink_is_refused(blank):
    with pytest.raises(InvalidInput, match=r"^images\[3\]: no ink found$"):
        png_to_image(blank, 3)


def test_mnist_normalize_refuses_a_blank_field():
    with pytest.raises(InvalidInput, match=r"images\[1\]: no ink found"):
        mnist_normalize(np.zeros((5, 5), np.uint8), 1)


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


def header_only_png(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk claiming width x height, then garbage for the pixels:
    only a size check made before decoding can name the size rather than the garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr
    chunk += struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return PNG_SIGNATURE + chunk + b"\x00" * 64


def test_the_size_limit_is_checked_from_the_header_before_decoding():
    assert png_size(header_only_png(1449, 1449), 0) == (1449, 1449)
    with pytest.raises(InvalidInput, match=r"images\[2\]\.png: 1449x1449 .*--max-png-pixels"):
        png_to_image(header_only_png(1449, 1449), 2)
    with pytest.raises(InvalidInput, match=r"images\[2\]\.png: cannot decode"):
        png_to_image(header_only_png(1448, 1448), 2)  # within the limit: decoding fails
    with pytest.raises(InvalidInput, match=r"images\[0\]\.png: 4096x4096"):
        png_to_image(png(np.zeros((4096, 4096), np.uint8), "1"), 0)


def test_the_pixel_limit_is_adjustable():
    digit = png(255 - np.pad(np.full((20, 4), 255, np.uint8), 4))
    assert png_to_image(digit, 0, max_pixels=28 * 12).any()
    with pytest.raises(InvalidInput, match=r"12x28 is 336 pixels, more than the limit of 335"):
        png_to_image(digit, 0, max_pixels=335)


def test_compressed_text_chunks_cannot_inflate_to_megabytes():
    data = png(np.pad(np.full((20, 4), 255, np.uint8), 4))
    text = zlib.compress(b"a" * 1_000_000, 9)
    chunks = b"".join(
        struct.pack(">I", len(body))
        + b"zTXt"
        + body
        + struct.pack(">I", zlib.crc32(b"zTXt" + body))
        for body in (b"k%d\x00\x00" % number + text for number in range(3))
    )
    end_of_ihdr = len(PNG_SIGNATURE) + 8 + 13 + 4
    with pytest.raises(InvalidInput, match=r"images\[0\]\.png: cannot decode: Too much memory"):
        png_to_image(data[:end_of_ihdr] + chunks + data[end_of_ihdr:], 0)


PEAK_MEMORY = r"""
import sys, time
from serving.imaging import png_to_image
data = open(sys.argv[1], "rb").read()
def peak_kib():
    return next(int(line.split()[1]) for line in open("/proc/self/status")
                if line.startswith("VmHWM"))
png_to_image(open(sys.argv[2], "rb").read(), 0)  # imports and code paths warmed up
before = peak_kib()
png_to_image(data, 0)
print((peak_kib() - before) / 1024)
"""


def test_decoding_the_largest_allowed_png_stays_small(tmp_path):
    """A 1448x1448 RGBA digit is 8 MiB decoded; the old float pipeline took 45 MiB more."""
    rgba = np.zeros((1448, 1448, 4), np.uint8)
    rgba[200:1200, 600:800] = 255
    large, small = tmp_path / "large.png", tmp_path / "small.png"
    large.write_bytes(rgba_png(rgba))
    small.write_bytes(png(np.pad(np.full((20, 4), 255, np.uint8), 4)))
    output = subprocess.run(
        [sys.executable, "-c", PEAK_MEMORY, str(large), str(small)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
    ).stdout
    assert float(output) < 24, f"decoding grew the peak RSS by {output.strip()} MiB"
