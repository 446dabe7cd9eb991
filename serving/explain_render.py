"""Draw one explained prediction as a PNG: the digit, its pixel votes, the score and P(7).

Red pixels vote 7 and blue pixels vote 3, on a colour scale symmetric about 0: the colours
of `weights.png` (training/plots.py, matplotlib's `RdBu_r`), rebuilt here with numpy so a
server or client needs only numpy and pillow, no matplotlib, torch or onnxruntime.

    score (logit) +3.870 = votes +3.639 + bias +0.231
    P(7) = 0.9796  ->  7
    the digit         pixel votes: red says 7, blue says 3
    [28x28, x10]      [28x28, x10]
                      [colour bar, -limit .. +limit]
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from serving.atomic import write_bytes_atomically
from serving.idx import IMAGE_SIDE

# ColorBrewer's 11-class RdBu, red to blue: matplotlib builds `RdBu` by interpolating
# linearly between exactly these colours, evenly spaced; `RdBu_r` runs them backwards.
_RDBU = (
    "#67001f",
    "#b2182b",
    "#d6604d",
    "#f4a582",
    "#fddbc7",
    "#f7f7f7",
    "#d1e5f0",
    "#92c5de",
    "#4393c3",
    "#2166ac",
    "#053061",
)
_RDBU_R = np.array(
    [[int(colour[i : i + 2], 16) for i in (1, 3, 5)] for colour in reversed(_RDBU)],
    dtype=np.float64,
)

SCALE = 10  # screen pixels per image pixel: a 28x28 digit becomes a 280x280 panel
PANEL = IMAGE_SIDE * SCALE
MARGIN = 12
LINE = 22  # height of a line of text
BAR = 12  # height of the colour bar under the votes
FONT_SIZE = 16

_PANELS_TOP = MARGIN + 3 * LINE  # two lines of figures, then the panels' captions
DIGIT_PANEL_BOX = (MARGIN, _PANELS_TOP, MARGIN + PANEL, _PANELS_TOP + PANEL)
"""(left, top, right, bottom) of the digit in the picture."""
VOTE_PANEL_BOX = (2 * MARGIN + PANEL, _PANELS_TOP, 2 * MARGIN + 2 * PANEL, _PANELS_TOP + PANEL)
"""(left, top, right, bottom) of the coloured votes in the picture."""
_BAR_TOP = _PANELS_TOP + PANEL + MARGIN // 2
RENDER_SIZE = (3 * MARGIN + 2 * PANEL, _BAR_TOP + BAR + LINE + MARGIN)
"""(width, height) of every picture `render_explanation` writes."""

_INK = (0, 0, 0)
_PAPER = (255, 255, 255)
_FRAME = (190, 190, 190)


def vote_colours(contributions: np.ndarray, limit: float) -> np.ndarray:
    """RGB uint8 colours of votes on RdBu_r: -limit dark blue, 0 near white, +limit dark red."""
    # Where on the colour scale each vote lies, 0 to 1, with 0 in the middle; beyond the
    # limit a vote takes the end colour, as matplotlib's vmin/vmax do.
    position = np.clip(np.asarray(contributions, np.float64) / (2 * limit) + 0.5, 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(_RDBU_R))
    channels = [np.interp(position, stops, _RDBU_R[:, channel]) for channel in range(3)]
    return np.rint(np.stack(channels, axis=-1)).astype(np.uint8)


def vote_limit(contributions: np.ndarray) -> float:
    """The colour scale's end, +-: the largest vote either way (1 when no pixel votes)."""
    return float(np.abs(contributions).max()) or 1.0


def draw_explanation(
    image: np.ndarray, contributions: np.ndarray, logit: float, probability: float, digit: int
) -> Image.Image:
    """The picture of one explained prediction, `RENDER_SIZE` pixels, RGB."""
    image, contributions = _checked(image, contributions, probability, digit)
    limit = vote_limit(contributions)
    votes = float(contributions.sum(dtype=np.float64))
    picture = Image.new("RGB", RENDER_SIZE, _PAPER)
    # Dark ink on white paper, like the votes' near-white 0, so the two panels line up.
    picture.paste(_enlarged(255 - image), DIGIT_PANEL_BOX[:2])
    picture.paste(_enlarged(vote_colours(contributions, limit)), VOTE_PANEL_BOX[:2])
    pen = ImageDraw.Draw(picture)
    for left, top, right, bottom in (DIGIT_PANEL_BOX, VOTE_PANEL_BOX):
        # A frame just outside each panel: the white digit panel needs an edge too.
        pen.rectangle((left - 1, top - 1, right, bottom), outline=_FRAME)
    font = ImageFont.load_default(size=FONT_SIZE)
    pen.text(
        (MARGIN, MARGIN),
        f"score (logit) {logit:+.3f} = votes {votes:+.3f} + bias {logit - votes:+.3f}",
        fill=_INK,
        font=font,
    )
    pen.text(
        (MARGIN, MARGIN + LINE), f"P(7) = {probability:.4f}  ->  {digit}", fill=_INK, font=font
    )
    pen.text((DIGIT_PANEL_BOX[0], MARGIN + 2 * LINE), "the digit", fill=_INK, font=font)
    pen.text(
        (VOTE_PANEL_BOX[0], MARGIN + 2 * LINE),
        "pixel votes: red says 7, blue says 3",
        fill=_INK,
        font=font,
    )
    _draw_colour_bar(picture, pen, font, limit)
    return picture


def render_explanation(
    image: np.ndarray,
    contributions: np.ndarray,
    logit: float,
    probability: float,
    digit: int,
    out_path: Path | str,
) -> Path:
    """Write the picture of one explained prediction to `out_path` as a PNG (atomically).

    `image` is the uint8 [28, 28] digit, `contributions` its float [28, 28] pixel votes, and
    `logit`, `probability` and `digit` the explanation graph's figures for it.
    """
    buffer = io.BytesIO()
    draw_explanation(image, contributions, logit, probability, digit).save(buffer, format="PNG")
    out_path = Path(out_path)
    write_bytes_atomically(out_path, buffer.getvalue())
    return out_path


def _draw_colour_bar(
    picture: Image.Image, pen: ImageDraw.ImageDraw, font: ImageFont.ImageFont, limit: float
) -> None:
    """The colour scale under the votes, -limit (left) to +limit (right), ends labelled."""
    left, _, right, _ = VOTE_PANEL_BOX
    scale = np.linspace(-limit, limit, right - left)
    strip = np.broadcast_to(vote_colours(scale, limit), (BAR, right - left, 3))
    picture.paste(Image.fromarray(np.ascontiguousarray(strip), "RGB"), (left, _BAR_TOP))
    labels_top = _BAR_TOP + BAR + 2
    pen.text((left, labels_top), f"{-limit:+.3g} (3)", fill=_INK, font=font)
    pen.text((right, labels_top), f"(7) {limit:+.3g}", fill=_INK, font=font, anchor="ra")


def _enlarged(pixels: np.ndarray) -> Image.Image:
    """A 28x28 grey or RGB array as a PANEL x PANEL image, each pixel a SCALE-wide square."""
    square = Image.fromarray(np.ascontiguousarray(pixels))
    return square.convert("RGB").resize((PANEL, PANEL), Image.Resampling.NEAREST)


def _checked(
    image: np.ndarray, contributions: np.ndarray, probability: float, digit: int
) -> tuple[np.ndarray, np.ndarray]:
    image, contributions = np.asarray(image), np.asarray(contributions)
    side = (IMAGE_SIDE, IMAGE_SIDE)
    if image.dtype != np.uint8 or image.shape != side:
        raise ValueError(f"the image must be uint8 {list(side)}; got {image.dtype} {image.shape}")
    if contributions.shape != side or not np.issubdtype(contributions.dtype, np.floating):
        raise ValueError(
            f"the contributions must be float {list(side)}; "
            f"got {contributions.dtype} {contributions.shape}"
        )
    if not np.isfinite(contributions).all():
        raise ValueError("the contributions must be finite numbers")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"P(7) must be between 0 and 1, not {probability}")
    if digit not in (3, 7):
        raise ValueError(f"the digit must be 3 or 7, not {digit}")
    return image, contributions
