"""Turn a PNG of a handwritten digit into a 28x28 MNIST-style image.

MNIST's recipe: light ink on a dark background, the digit's bounding box scaled so its
longest side is 20 pixels (aspect ratio kept, anti-aliased), then placed in a 28x28 field
so that its centre of mass is the field's centre.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from serving.errors import InvalidInput
from serving.runtime import IMAGE_SIDE, PIXELS

DIGIT_BOX = 20
MAX_PNG_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Pixels at most this bright (0-255, after inverting to light-on-dark) count as background
# when finding the ink's bounding box.
INK_THRESHOLD = 30


def pixels_to_image(data: bytes, index: int) -> np.ndarray:
    """784 raw bytes -> uint8 [28, 28]."""
    if len(data) != PIXELS:
        raise InvalidInput(f"images[{index}].pixels: {len(data)} bytes, expected {PIXELS}")
    return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIDE, IMAGE_SIDE)


def png_to_image(data: bytes, index: int) -> np.ndarray:
    """An encoded PNG -> uint8 [28, 28], the MNIST way. InvalidInput names the image."""
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidInput(f"images[{index}].png: not a PNG (bad signature)")
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            width, height = image.size
            if width * height > MAX_PNG_PIXELS:
                raise InvalidInput(
                    f"images[{index}].png: {width}x{height} is larger than {MAX_PNG_PIXELS} pixels"
                )
            gray = _to_grayscale(image)
    except InvalidInput:
        raise
    except Exception as error:  # Pillow raises many types for corrupt data
        raise InvalidInput(f"images[{index}].png: cannot decode: {error}") from error
    return mnist_normalize(gray)


def _to_grayscale(image: Image.Image) -> np.ndarray:
    """Luminance as float32 [H, W] in 0..255; transparency is composited onto white."""
    has_alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    elif image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        wide = np.asarray(image, dtype=np.float64)
        peak = float(wide.max()) or 1.0
        return (wide * (255.0 / peak)).astype(np.float32)
    return np.asarray(image.convert("L"), dtype=np.float32)


def mnist_normalize(gray: np.ndarray) -> np.ndarray:
    """Grayscale float [H, W] (0..255, any polarity) -> uint8 [28, 28] MNIST-style."""
    if _has_light_background(gray):
        gray = 255.0 - gray
    ink = gray > INK_THRESHOLD
    if not ink.any():
        return np.zeros((IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
    rows = np.flatnonzero(ink.any(axis=1))
    columns = np.flatnonzero(ink.any(axis=0))
    cropped = gray[rows[0] : rows[-1] + 1, columns[0] : columns[-1] + 1]
    height, width = cropped.shape
    scale = DIGIT_BOX / max(height, width)
    new_size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = Image.fromarray(np.clip(cropped, 0, 255).astype(np.uint8)).resize(
        new_size, Image.Resampling.LANCZOS
    )
    digit = np.asarray(resized, dtype=np.float32)
    return _center_by_mass(digit)


def _has_light_background(gray: np.ndarray) -> bool:
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(border)) > 127.5


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
