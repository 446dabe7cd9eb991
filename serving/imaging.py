"""Turn a PNG of a handwritten digit into a 28x28 MNIST-style image.

MNIST's recipe: light ink on a dark background, the digit's bounding box scaled so its
longest side is 20 pixels (aspect ratio kept, anti-aliased), then placed in a 28x28 field
so that its centre of mass is the field's centre.

Decoding is bounded: sizes are read from the PNG header before anything is decoded (per
image and per request, `PngLimits`), images stay 8-bit (16-bit ones are scaled down at
once) and are box-reduced to at most `WORKING_SIDE` pixels a side right after decoding.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from PIL import Image, PngImagePlugin

from serving.contract import IMAGE_SIDE, PIXELS
from serving.errors import InvalidInput

# Text chunks are never used, yet Pillow decompresses up to 64 MB of them per PNG by
# default (from a few hundred KB of zTXt).
PngImagePlugin.MAX_TEXT_MEMORY = 1024 * 1024

DIGIT_BOX = 20
# 2 MP: a 1448x1448 scan fits; MNIST digits need far fewer.
MAX_PNG_PIXELS = 2 * 1024 * 1024
MAX_REQUEST_PNG_PIXELS = 16 * 1024 * 1024
# Larger images are box-reduced by an integer factor to at most this many pixels a side
# before any further work.
WORKING_SIDE = 512
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixels at most this bright (0-255, after inverting to light-on-dark) count as background
# when finding the ink's bounding box.
INK_THRESHOLD = 30
_WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "F")
_IHDR = struct.Struct(">I4sII")


@dataclass(frozen=True)
class PngLimits:
    """Most pixels (width x height, from the header) of one PNG and of a request's PNGs."""

    image_pixels: int = MAX_PNG_PIXELS
    request_pixels: int = MAX_REQUEST_PNG_PIXELS


DEFAULT_PNG_LIMITS = PngLimits()


def pixels_to_image(data: bytes, index: int) -> np.ndarray:
    """784 raw bytes -> uint8 [28, 28]."""
    if len(data) != PIXELS:
        raise InvalidInput(f"images[{index}].pixels: {len(data)} bytes, expected {PIXELS}")
    return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)


def png_size(data: bytes, index: int) -> tuple[int, int]:
    """(width, height) from the PNG's IHDR chunk, without decoding anything."""
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidInput(f"images[{index}].png: not a PNG (bad signature)")
    header = data[len(PNG_SIGNATURE) : len(PNG_SIGNATURE) + _IHDR.size]
    if len(header) < _IHDR.size or header[4:8] != b"IHDR":
        raise InvalidInput(f"images[{index}].png: cannot decode: no IHDR header")
    _length, _type, width, height = _IHDR.unpack(header)
    return width, height


def check_png_sizes(pngs: Iterable[tuple[int, bytes]], limits: PngLimits) -> None:
    """Refuse, before any decoding, a PNG over the per-image limit or the PNG that takes
    the request over its total. `pngs` are (image index, PNG bytes)."""
    total = 0
    for index, data in pngs:
        width, height = png_size(data, index)
        _check_image_size(width, height, index, limits.image_pixels)
        total += width * height
        if total > limits.request_pixels:
            raise InvalidInput(
                f"images[{index}].png: the request's PNGs add up to {total} pixels with this "
                f"one, more than the limit of {limits.request_pixels} per request "
                "(--max-request-png-pixels)"
            )


def _check_image_size(width: int, height: int, index: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise InvalidInput(
            f"images[{index}].png: {width}x{height} is {width * height} pixels, more than "
            f"the limit of {max_pixels} per image (--max-png-pixels)"
        )


def png_to_image(data: bytes, index: int, max_pixels: int = MAX_PNG_PIXELS) -> np.ndarray:
    """An encoded PNG -> uint8 [28, 28], the MNIST way. InvalidInput names the image."""
    _check_image_size(*png_size(data, index), index, max_pixels)  # before any decoding
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            gray = _to_working_grayscale(image)
    except InvalidInput:
        raise
    except Exception as error:  # Pillow raises many types for corrupt data
        raise InvalidInput(f"images[{index}].png: cannot decode: {error}") from error
    return mnist_normalize(gray, index)


def _to_working_grayscale(image: Image.Image) -> np.ndarray:
    """uint8 luminance [H, W], at most WORKING_SIDE a side; transparency is resolved by
    `_composite_on_contrast`."""
    if image.mode in ("L", "LA", "RGB", "RGBA") and "transparency" not in image.info:
        reduced = _to_l_or_la(_reduce(image))  # reduce first: fewer full-size copies
    else:
        reduced = _reduce(_to_l_or_la(image))
    if reduced.mode == "LA":
        luminance, alpha = (np.asarray(band) for band in reduced.split())
        return _composite_on_contrast(luminance, alpha)
    return np.asarray(reduced)


def _to_l_or_la(image: Image.Image) -> Image.Image:
    """Full-size "L", or "LA" when the image has transparency."""
    if image.mode in _WIDE_MODES:
        values = np.asarray(image)
        peak = int(values.max()) or 1
        scaled = (values.astype(np.uint32) * 255 + peak // 2) // peak
        luminance = Image.fromarray(scaled.astype(np.uint8), "L")
        transparent = image.info.get("transparency")
        if transparent is None:
            return luminance
        alpha = np.where(values == transparent, 0, 255).astype(np.uint8)
        return Image.merge("LA", (luminance, Image.fromarray(alpha, "L")))
    if image.mode == "LA" or (image.mode == "L" and "transparency" not in image.info):
        return image
    if image.mode in ("RGBA", "PA") or "transparency" in image.info:
        return image.convert("RGBA").convert("LA")
    return image.convert("L")


def _reduce(image: Image.Image) -> Image.Image:
    """Box-reduce by the integer factor that brings the longest side to WORKING_SIDE or
    less (Pillow premultiplies "LA", so transparent pixels' colour does not bleed in)."""
    factor = math.ceil(max(image.size) / WORKING_SIDE)
    return image.reduce(factor) if factor > 1 else image


def _composite_on_contrast(luminance: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Flatten transparency. With an opaque border, transparent pixels are more of that
    background. With a transparent border, the opaque pixels are the ink and go onto
    white or black, whichever contrasts with them, so white ink does not vanish."""
    if alpha.min() == 255:
        return luminance
    border_alpha = _border(alpha)
    if np.median(border_alpha) >= 128:
        background = float(np.median(_border(luminance)[border_alpha >= 128]))
    else:
        weight = int(alpha.sum(dtype=np.int64))
        ink = int((luminance.astype(np.int64) * alpha).sum()) / weight if weight else 0.0
        background = 0.0 if ink > 127.5 else 255.0
    opacity = alpha.astype(np.float32) / 255
    blended = luminance * opacity + background * (1 - opacity)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def mnist_normalize(gray: np.ndarray, index: int) -> np.ndarray:
    """uint8 grayscale [H, W] (any polarity) -> uint8 [28, 28] MNIST-style; an image
    without ink is InvalidInput naming `images[index]`."""
    if _has_light_background(gray):
        gray = 255 - gray
    ink = gray > INK_THRESHOLD
    if not ink.any() or int(gray.max()) - int(gray.min()) <= INK_THRESHOLD:
        raise InvalidInput(f"images[{index}]: no ink found")
    rows = np.flatnonzero(ink.any(axis=1))
    columns = np.flatnonzero(ink.any(axis=0))
    cropped = gray[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    height, width = cropped.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(np.ascontiguousarray(cropped), "L").resize(
        new_size, Image.Resampling.LANCZOS
    )
    digit = np.asarray(resized, dtype=np.float32)
    return _center_by_mass(digit)


def _border(values: np.ndarray) -> np.ndarray:
    return np.concatenate([values[0], values[-1], values[:, 0], values[:, -1]])


def _has_light_background(gray: np.ndarray) -> bool:
    return float(np.median(_border(gray))) > 127.5


def _center_by_mass(digit: np.ndarray) -> np.ndarray:
    """Paste `digit` into a 28x28 field so that its centre of mass lands at the centre."""
    height, width = digit.shape
    total = float(digit.sum())
    if total > 0:
        ys, xs = np.indices(digit.shape)
        center_y = float((ys * digit).sum()) / total
        center_x = float((xs * digit).sum()) / total
    else:
        center_y, center_x = (height - 1) / 2, (width - 1) / 2
    # MNIST puts the centre of mass at (14, 14) in 0-based pixel coordinates.
    half = IMAGE_SIDE / 2
    top = round(half - center_y)
    left = round(half - center_x)
    field = np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.float32)
    source_top, source_left = max(0, -top), max(0, -left)
    target_top, target_left = max(0, top), max(0, left)
    rows = min(height - source_top, IMAGE_SIDE - target_top)
    columns = min(width - source_left, IMAGE_SIDE - target_left)
    if rows > 0 and columns > 0:
        field[target_top : target_top + rows, target_left : target_left + columns] = digit[
            source_top : source_top + rows, source_left : source_left + columns
        ]
    return np.clip(np.rint(field), 0, 255).astype(np.uint8)
