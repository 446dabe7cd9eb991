"""The explanation picture: a PNG of the digit and its red/blue pixel votes, numpy + PIL only."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from helpers import REPO_ROOT
from matplotlib import colormaps
from matplotlib.colors import Normalize
from PIL import Image

from serving.explain_render import (
    DIGIT_PANEL_BOX,
    RENDER_SIZE,
    SCALE,
    VOTE_PANEL_BOX,
    draw_explanation,
    render_explanation,
    vote_colours,
    vote_limit,
)


@pytest.fixture(scope="module")
def mean_difference_votes(test_digits) -> tuple[np.ndarray, np.ndarray, float]:
    """A real 7 and its votes under the mean-difference linear model (numpy, no torch):
    each pixel weighs how much more ink the average 7 has there than the average 3."""
    images, labels = test_digits
    pixels = images.reshape(len(images), -1).astype(np.float64) / 255
    weights = 10 * (pixels[labels == 7].mean(axis=0) - pixels[labels == 3].mean(axis=0))
    seven = images[np.flatnonzero(labels == 7)[0]]
    votes = (seven.reshape(-1) / 255 * weights).reshape(28, 28).astype(np.float32)
    return seven, votes, float(votes.sum())


def panel_pixel(picture: np.ndarray, box: tuple[int, int, int, int], row: int, column: int):
    """The picture's colour at the centre of image pixel (row, column) of a panel."""
    left, top, _, _ = box
    return picture[top + SCALE * row + SCALE // 2, left + SCALE * column + SCALE // 2]


def test_the_png_is_written_with_the_documented_size(mean_difference_votes, tmp_path):
    seven, votes, logit = mean_difference_votes
    path = render_explanation(seven, votes, logit, 0.9, 7, tmp_path / "explanation.png")
    assert path == tmp_path / "explanation.png"
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.size == RENDER_SIZE
        assert picture.mode == "RGB"
    assert [p.name for p in tmp_path.iterdir()] == ["explanation.png"], "no temporary left"
    render_explanation(seven, votes, logit, 0.9, 7, str(path))  # replaces it, str path too
    assert (
        path.read_bytes()
        == render_explanation(seven, votes, logit, 0.9, 7, tmp_path / "again.png").read_bytes()
    ), "same explanation, same bytes"


def test_red_pixels_vote_7_and_blue_pixels_vote_3(mean_difference_votes):
    seven, votes, logit = mean_difference_votes
    picture = np.asarray(draw_explanation(seven, votes, logit, 0.9, 7)).astype(int)
    strong = np.abs(votes) > 0.25 * vote_limit(votes)
    assert (votes[strong] > 0).sum() > 10 and (votes[strong] < 0).sum() > 3, "both kinds"
    for row, column in zip(*np.nonzero(strong), strict=True):
        red, _, blue = panel_pixel(picture, VOTE_PANEL_BOX, row, column)
        if votes[row, column] > 0:
            assert red > blue + 40, (row, column)
        else:
            assert blue > red + 40, (row, column)


def test_the_vote_overlay_is_not_blank_and_the_digit_is_shown(mean_difference_votes):
    seven, votes, logit = mean_difference_votes
    picture = np.asarray(draw_explanation(seven, votes, logit, 0.9, 7)).astype(int)
    left, top, right, bottom = VOTE_PANEL_BOX
    panel = picture[top:bottom, left:right]
    neutral = vote_colours(np.zeros(1), 1.0)[0]
    coloured = np.abs(panel - neutral).sum(axis=-1) > 30
    assert coloured.mean() > 0.05, "the votes should colour a good part of the panel"
    no_ink = seven == 0
    row, column = np.argwhere(no_ink)[0]
    assert list(panel_pixel(picture, VOTE_PANEL_BOX, row, column)) == list(neutral)
    row, column = np.unravel_index(np.argmax(seven), seven.shape)
    assert list(panel_pixel(picture, DIGIT_PANEL_BOX, row, column)) == [0, 0, 0], "ink is dark"


def test_the_figures_are_written_as_text(mean_difference_votes):
    seven, votes, logit = mean_difference_votes
    picture = np.asarray(draw_explanation(seven, votes, logit, 0.9, 7).convert("L"))
    header = picture[: DIGIT_PANEL_BOX[1]]
    assert (header < 128).mean() > 0.01, "the logit, P(7) and the captions are drawn"
    other = np.asarray(draw_explanation(seven, votes, logit + 1, 0.4, 3).convert("L"))
    assert not np.array_equal(header, other[: DIGIT_PANEL_BOX[1]]), "the text shows the figures"
    assert np.array_equal(picture[DIGIT_PANEL_BOX[1] :], other[DIGIT_PANEL_BOX[1] :])


def test_colours_are_weights_png_colours_matplotlibs_rdbu_r_centred_on_0():
    limit = 0.3
    votes = np.linspace(-1.5 * limit, 1.5 * limit, 1001)
    ours = vote_colours(votes, limit).astype(float) / 255
    normalize = Normalize(vmin=-limit, vmax=limit)
    theirs = colormaps["RdBu_r"](normalize(votes))[:, :3]
    # matplotlib samples the same ramp into a 256-entry table: one step is < 0.02.
    assert np.abs(ours - theirs).max() < 0.02
    assert list(vote_colours(np.array([0.0]), limit)[0]) == [0xF7, 0xF7, 0xF7]
    assert list(vote_colours(np.array([limit]), limit)[0]) == [0x67, 0x00, 0x1F]  # dark red
    assert list(vote_colours(np.array([-limit]), limit)[0]) == [0x05, 0x30, 0x61]  # dark blue


def test_the_scale_is_symmetric_and_survives_no_votes():
    votes = np.zeros((28, 28), np.float32)
    votes[0, 0], votes[0, 1] = 0.5, -0.1
    assert vote_limit(votes) == 0.5
    # The scale runs -0.5 .. +0.5 although no vote is below -0.1: 0 stays in the middle.
    weak_three = vote_colours(np.array([-0.1]), vote_limit(votes))
    assert np.array_equal(weak_three, vote_colours(np.array([-0.2]), 1.0))
    assert not np.array_equal(weak_three, vote_colours(np.array([-1.0]), 1.0))
    blank = np.zeros((28, 28), np.uint8)
    assert vote_limit(np.zeros((28, 28))) == 1.0
    assert draw_explanation(blank, np.zeros((28, 28)), -0.5, 0.38, 3).size == RENDER_SIZE


@pytest.mark.parametrize(
    ("image", "votes", "probability", "digit", "message"),
    [
        (np.zeros((28, 28), np.float32), np.zeros((28, 28)), 0.5, 7, "image must be uint8"),
        (np.zeros((28, 27), np.uint8), np.zeros((28, 28)), 0.5, 7, "image must be uint8"),
        (np.zeros((28, 28), np.uint8), np.zeros(784), 0.5, 7, "contributions must be float"),
        (np.zeros((28, 28), np.uint8), np.full((28, 28), np.nan), 0.5, 7, "must be finite"),
        (np.zeros((28, 28), np.uint8), np.zeros((28, 28)), 1.5, 7, "between 0 and 1"),
        (np.zeros((28, 28), np.uint8), np.zeros((28, 28)), 0.5, 5, "must be 3 or 7"),
    ],
)
def test_bad_inputs_are_refused_clearly(image, votes, probability, digit, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        render_explanation(image, votes, 0.0, probability, digit, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_the_renderer_needs_no_torch_onnxruntime_or_matplotlib():
    script = (
        "import sys, serving.explain_render\n"
        "print(sorted({'torch', 'onnxruntime', 'onnx', 'matplotlib'} & set(sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
