"""The client library and `mnist37-client` against the real server."""

from __future__ import annotations

import gzip
import io
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT, shipped_digit_files
from PIL import Image

from serving.client import Mnist37Client, main
from serving.explain_render import DIGIT_PANEL_BOX, RENDER_SIZE, VOTE_PANEL_BOX
from serving.repository import latest_version
from serving.runtime import ModelRuntime


def write_idx(path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape
    )
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_library_classify_and_infer(server, test_digits):
    images = test_digits[0][:6]
    buffer = io.BytesIO()
    Image.fromarray(255 - images[0]).save(buffer, "PNG")
    with Mnist37Client(server.target) as client:
        predictions = client.classify([buffer.getvalue(), images[1].tobytes(), *images[2:]])
        outputs = client.infer(images, outputs=["digit"], request_id="lib")
        typed = client.infer(images, raw=False)
    assert len(predictions) == 6
    assert [p.digit for p in predictions[1:]] == outputs["digit"][1:].tolist()
    assert list(outputs) == ["digit"]
    np.testing.assert_array_equal(typed["digit"], outputs["digit"])


@pytest.mark.parametrize(("batch_size", "requests"), [(256, 8), (1000, 3)])
def test_check_prints_the_offline_accuracy(
    server, model_repository, test_digits, capsys, batch_size, requests
):
    images_path, labels_path = shipped_digit_files()
    runtime = ModelRuntime(latest_version(model_repository, "mnist37").model_path)
    images, labels = test_digits
    offline = (runtime.predict(images)[1] == labels).sum()
    code = main(
        [
            "--server",
            server.target,
            "classify",
            "--check",
            str(images_path),
            "--labels",
            str(labels_path),
            "--batch-size",
            str(batch_size),
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"accuracy {offline / len(labels):.6f} ({offline}/{len(labels)})" in out
    assert f"requests {requests} of up to {batch_size} images" in out
    assert "p50" in out and "images/s" in out


def test_batch_size_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        main(["classify", "--check", "x", "--labels", "y", "--batch-size", "0"])
    assert "argument --batch-size: must be positive, got 0" in capsys.readouterr().err


def test_cli_classifies_pngs_and_idx_files(server, test_digits, tmp_path):
    images = test_digits[0][:3]
    png_path = tmp_path / "digit.png"
    Image.fromarray(255 - images[0]).resize((56, 56)).save(png_path)
    idx_path = tmp_path / "three-images-idx3-ubyte.gz"
    write_idx(idx_path, images)
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.client",
            "--server",
            server.target,
            "classify",
            str(png_path),
            str(idx_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("digit.png\tdigit=")
    assert lines[1].startswith("three-images-idx3-ubyte.gz[0]\tdigit=")
    assert all("P(7)=" in line and "model=mnist37/2" in line for line in lines)


def test_cli_reports_server_errors_without_a_traceback(server, tmp_path, capsys):
    bad = tmp_path / "bad.idx"
    bad.write_bytes(b"nonsense")
    assert main(["--server", server.target, "classify", str(bad)]) == 1
    assert "mnist37-client:" in capsys.readouterr().err
    png_path = tmp_path / "blank.png"
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(png_path)
    assert main(["--server", server.target, "classify", "--model", "nope", str(png_path)]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_server_flag_works_before_and_after_the_command():
    from serving.client import build_parser

    before = build_parser().parse_args(["--server", "h:1", "classify", "x.png"])
    after = build_parser().parse_args(["classify", "--server", "h:2", "--timeout", "5", "x.png"])
    default = build_parser().parse_args(["classify", "x.png"])
    assert (before.server, after.server, after.timeout) == ("h:1", "h:2", 5.0)
    assert default.server and default.timeout == 30.0


def test_a_file_that_is_neither_png_nor_idx_is_named(tmp_path, capsys):
    bogus = tmp_path / "drawing.png"
    bogus.write_text("hello")
    assert main(["--server", "127.0.0.1:1", "classify", str(bogus)]) == 1
    assert "drawing.png: neither a PNG nor an IDX images file" in capsys.readouterr().err


def test_no_server_is_one_line_on_stderr():
    """Only our line: no gRPC C-core lines around it."""
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    images, _ = shipped_digit_files()
    command = [sys.executable, "-m", "serving.client", "--server", f"127.0.0.1:{port}"]
    done = subprocess.run(
        [*command, "--timeout", "5", "classify", str(images)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert (done.returncode, done.stdout) == (1, "")
    (line,) = done.stderr.splitlines()
    assert line.startswith("mnist37-client: UNAVAILABLE: ")


def _panel(picture: Path, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    return np.asarray(Image.open(picture).convert("RGB"))[top:bottom, left:right]


def test_cli_explains_a_png_into_a_picture(server, test_digits, tmp_path):
    png_path = tmp_path / "digit.png"
    Image.fromarray(255 - test_digits[0][0]).resize((56, 56)).save(png_path)
    out = tmp_path / "explanation.png"
    completed = subprocess.run(
        [
            *(sys.executable, "-m", "serving.client", "explain", str(png_path)),
            *("--server", server.target, "--out", str(out)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )
    assert completed.returncode == 0, completed.stderr
    (line,) = completed.stdout.splitlines()
    label, digit, p7, logit, bias, model, picture = line.split("\t")
    assert (label, model, picture) == ("digit.png", "model=mnist37/2", f"picture={out}")
    assert digit in ("digit=3", "digit=7") and re.fullmatch(r"P\(7\)=[01]\.\d{4}", p7)
    assert re.fullmatch(r"logit=[+-]\d+\.\d{3}", logit), logit
    assert re.fullmatch(r"bias=[+-]\d+\.\d{3}", bias), bias
    assert Image.open(out).format == "PNG" and Image.open(out).size == RENDER_SIZE
    votes = _panel(out, VOTE_PANEL_BOX).reshape(-1, 3)
    assert len(np.unique(votes, axis=0)) > 10, "the votes are drawn in many shades"
    assert (_panel(out, DIGIT_PANEL_BOX) < 128).mean() > 0.05, "the digit is drawn in ink"


def test_cli_explains_several_images_into_a_directory(server, test_digits, tmp_path, capsys):
    png_path = tmp_path / "digit.png"
    Image.fromarray(255 - test_digits[0][0]).save(png_path)
    idx_path = tmp_path / "three-images-idx3-ubyte.gz"
    write_idx(idx_path, test_digits[0][1:4])
    out = tmp_path / "pictures"
    arguments = ["--server", server.target, "explain", str(png_path), str(idx_path)]
    assert main([*arguments, "--out", str(out), "--batch-size", "2"]) == 0
    names = [f"three-images-idx3-ubyte-{index}.explained.png" for index in range(3)]
    names.insert(0, "digit.explained.png")
    assert sorted(path.name for path in out.iterdir()) == sorted(names)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [
        "digit.png",
        *(f"three-images-idx3-ubyte.gz[{i}]" for i in range(3)),
    ]
    assert [line.split("\t")[-1] for line in lines] == [f"picture={out / name}" for name in names]
    assert all(Image.open(out / name).size == RENDER_SIZE for name in names)


def test_cli_explain_errors_are_one_line(server, test_digits, tmp_path, capsys):
    png_path = tmp_path / "digit.png"
    Image.fromarray(255 - test_digits[0][0]).save(png_path)
    arguments = ["--server", server.target, "explain", "--out", str(tmp_path), str(png_path)]
    assert main([*arguments, "--model", "other"]) == 1
    error = capsys.readouterr().err
    assert error.startswith("mnist37-client: FAILED_PRECONDITION: model 'other' version 1 was ")
    assert "Traceback" not in error
    twin = tmp_path / "twin"
    twin.mkdir()
    Image.fromarray(255 - test_digits[0][1]).save(twin / "digit.png")
    assert main([*arguments, str(twin / "digit.png")]) == 1
    assert "would both be drawn to" in capsys.readouterr().err
    assert not (tmp_path / "digit.explained.png").exists(), "nothing drawn before the clash"
