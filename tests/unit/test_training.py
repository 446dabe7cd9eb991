"""Training: the maths, reproducibility, and short real runs through `mnist37-train`."""

from __future__ import annotations

import json
import sys
import types
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import train_quickly

from training.cli import main as train_main
from training.cli import parse_args
from training.data import load_dataset
from training.models import Linear
from training.train import (
    batch_accuracy,
    confusion_matrix,
    evaluate,
    is_seven,
    load_checkpoint,
    mnist_loss,
    predicts_seven,
    reproducible,
    shift_randomly,
    to_pixels,
)

# --- the maths ---------------------------------------------------------------------------


def test_mnist_loss_is_binary_cross_entropy_of_p7() -> None:
    logits = torch.tensor([2.0, -1.0, 0.5, -3.0])
    targets = torch.tensor([1.0, 0.0, 0.0, 1.0])
    p7 = torch.sigmoid(logits)
    by_hand = -(targets * p7.log() + (1 - targets) * (1 - p7).log()).mean()
    assert mnist_loss(logits, targets).item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_a_seven_is_predicted_from_p7_of_one_half() -> None:
    logits = torch.tensor([-1e-3, 0.0, 1e-3])
    assert predicts_seven(logits).tolist() == [False, True, True]


def test_accuracy_and_confusion_matrix_rows_true_columns_predicted() -> None:
    logits = torch.tensor([-2.0, -1.0, 3.0, 1.0, 2.0, -4.0])  # predicted: 3 3 7 7 7 3
    targets = is_seven(np.array([3, 3, 3, 7, 7, 7], dtype=np.uint8))
    assert confusion_matrix(logits, targets) == [[2, 1], [1, 2]]
    assert batch_accuracy(logits, targets) == pytest.approx(4 / 6)


def test_pixels_are_flattened_and_scaled_to_unit_interval() -> None:
    images = np.zeros((2, 28, 28), dtype=np.uint8)
    images[1, 0, 1] = 255
    pixels = to_pixels(images)
    assert pixels.shape == (2, 784) and pixels.dtype == torch.float32
    assert pixels[1, 1].item() == 1.0 and pixels.sum().item() == 1.0


def test_random_shifts_move_images_by_at_most_max_shift() -> None:
    images = np.zeros((64, 28, 28), dtype=np.uint8)
    images[:, 10:14, 12:15] = 255  # a block well inside the frame: shifting keeps all its ink
    pixels = to_pixels(images)
    shifted = shift_randomly(pixels, 1, torch.Generator().manual_seed(0)).view(64, 28, 28)
    assert torch.equal(shift_randomly(pixels, 0, torch.Generator()), pixels)
    assert torch.equal(shifted.sum(dim=(1, 2)), pixels.sum(dim=1))
    tops = {int(image.nonzero()[:, 0].min()) for image in shifted}
    lefts = {int(image.nonzero()[:, 1].min()) for image in shifted}
    assert tops == {9, 10, 11} and lefts == {11, 12, 13}


# --- reproducibility ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["linear", "mlp"])
def test_same_seed_gives_the_same_weights_bit_for_bit(arch: str) -> None:
    first, second = (
        train_quickly(arch, 3, seed=7).state_dict(),
        train_quickly(arch, 3, seed=7).state_dict(),
    )
    assert first.keys() == second.keys()
    for name in first:
        assert torch.equal(first[name], second[name]), name
    different = train_quickly(arch, 3, seed=8).state_dict()
    assert not all(torch.equal(first[name], different[name]) for name in first)


def test_reproducible_restores_torch_settings() -> None:
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    with reproducible(0):
        assert torch.get_num_threads() == 1
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
    assert torch.are_deterministic_algorithms_enabled() == deterministic


# --- real runs through the command -------------------------------------------------------


@pytest.fixture(scope="module")
def linear_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "linear"
    args = ["--arch", "linear", "--epochs", "8", "--out", str(out), "--no-progress"]
    assert train_main(args) == 0
    return out


def test_short_linear_run_beats_the_majority_baseline_by_far(linear_run: Path) -> None:
    test = json.loads((linear_run / "metrics.json").read_text())["test"]
    assert test["majority_baseline_accuracy"] == pytest.approx(1028 / 2038)
    assert test["accuracy"] >= 0.95
    assert test["accuracy"] - test["majority_baseline_accuracy"] > 0.4


def test_run_directory_and_metrics_schema(linear_run: Path) -> None:
    assert sorted(path.name for path in linear_run.iterdir()) == [
        "checkpoint.pt",
        "curves.png",
        "metrics.json",
        "weights.png",
    ]
    for picture in ("curves.png", "weights.png"):
        assert (linear_run / picture).read_bytes().startswith(b"\x89PNG")
    metrics = json.loads((linear_run / "metrics.json").read_text())
    assert metrics["arch"] == "linear" and metrics["seed"] == 37
    assert [epoch["epoch"] for epoch in metrics["history"]] == list(range(1, 9))
    first, last = metrics["history"][0], metrics["history"][-1]
    assert set(last) == {"epoch", "train_loss", "validation_loss", "validation_accuracy"}
    assert last["train_loss"] < first["train_loss"]  # it learned
    test = metrics["test"]
    matrix = np.array(test["confusion_matrix"])
    assert matrix.shape == (2, 2)
    assert matrix.sum(axis=1).tolist() == [1010, 1028]  # rows: true 3s, true 7s
    assert test["accuracy"] == pytest.approx(np.trace(matrix) / 2038)
    assert 0 < test["loss"] < 0.5
    data = metrics["data"]
    assert data["shipped_default"] is True
    assert data["checksums"] == load_dataset().checksums
    assert (data["train_count"], data["validation_count"], data["test_count"]) == (1682, 420, 2038)
    assert metrics["versions"]["torch"] == torch.__version__
    assert metrics["wall_time_s"] > 0 and metrics["train_time_s"] > 0


def test_checkpoint_reproduces_the_reported_test_accuracy(linear_run: Path) -> None:
    model, checkpoint = load_checkpoint(linear_run / "checkpoint.pt")
    assert isinstance(model, Linear) and not model.training
    assert model.weights.shape == (784,)
    for key in ("arch", "hidden", "state_dict", "seed", "created_at", "data_checksums"):
        assert key in checkpoint
    created = datetime.fromisoformat(checkpoint["created_at"])
    assert created.utcoffset() == timedelta(0)
    data = load_dataset()
    scores = evaluate(model, to_pixels(data.test_images), is_seven(data.test_labels))
    test = json.loads((linear_run / "metrics.json").read_text())["test"]
    assert scores.accuracy == test["accuracy"]
    assert scores.confusion_matrix == test["confusion_matrix"]


def test_the_same_command_twice_gives_identical_weights(linear_run: Path, tmp_path: Path):
    args = ["--arch", "linear", "--epochs", "8", "--out", str(tmp_path), "--no-progress"]
    assert train_main(args) == 0
    first = load_checkpoint(linear_run / "checkpoint.pt")[1]["state_dict"]
    second = load_checkpoint(tmp_path / "checkpoint.pt")[1]["state_dict"]
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_short_mlp_run(tmp_path: Path, capsys) -> None:
    args = ["--arch", "mlp", "--hidden", "16", "--epochs", "6", "--out", str(tmp_path)]
    assert train_main([*args, "--no-progress"]) == 0
    assert "mlp: test accuracy" in capsys.readouterr().out
    assert not (tmp_path / "weights.png").exists()
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.95
    model, checkpoint = load_checkpoint(tmp_path / "checkpoint.pt")
    assert checkpoint["hidden"] == 16 and model.w1.shape == (784, 16)


def test_repository_flag_publishes_the_run(tmp_path: Path, monkeypatch, capsys) -> None:
    calls = []

    def publish_run(run_dir: Path, repository: Path, model_name: str) -> types.SimpleNamespace:
        calls.append((run_dir, repository, model_name, (run_dir / "metrics.json").is_file()))
        return types.SimpleNamespace(name=model_name, version=3, path=repository / "m" / "3")

    fake = types.ModuleType("training.publish")
    fake.publish_run = publish_run
    monkeypatch.setitem(sys.modules, "training.publish", fake)
    monkeypatch.setenv("MNIST37_MODEL_NAME", "m")
    out, repository = tmp_path / "run", tmp_path / "repo"
    args = ["--epochs", "1", "--out", str(out), "--repository", str(repository), "--no-progress"]
    assert train_main(args) == 0
    assert calls == [(out, repository, "m", True)]
    assert "published m version 3" in capsys.readouterr().out


def test_failed_publish_is_reported_and_keeps_the_run(tmp_path: Path, monkeypatch, capsys):
    def publish_run(run_dir: Path, repository: Path, model_name: str) -> None:
        raise RuntimeError("parity check failed")

    fake = types.ModuleType("training.publish")
    fake.publish_run = publish_run
    monkeypatch.setitem(sys.modules, "training.publish", fake)
    args = ["--epochs", "1", "--out", str(tmp_path), "--repository", str(tmp_path / "r")]
    assert train_main([*args, "--no-progress"]) == 1
    assert "parity check failed" in capsys.readouterr().err
    assert (tmp_path / "metrics.json").is_file()


def test_flags_default_to_environment_variables(monkeypatch) -> None:
    for name, value in {
        "ARCH": "mlp",
        "EPOCHS": "5",
        "LR": "0.25",
        "BATCH_SIZE": "32",
        "SEED": "9",
        "HIDDEN": "12",
        "DATA_DIR": "/data/mnist",
        "OUT": "/tmp/out",
    }.items():
        monkeypatch.setenv(f"MNIST37_{name}", value)
    args = parse_args([])
    assert (args.arch, args.epochs, args.lr, args.batch_size) == ("mlp", 5, 0.25, 32)
    assert (args.seed, args.hidden) == (9, 12)
    assert args.data_dir == Path("/data/mnist") and args.out == Path("/tmp/out")
    assert parse_args(["--epochs", "2"]).epochs == 2  # a flag beats its variable


def test_invalid_settings_are_refused(monkeypatch) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--epochs", "0"])
    monkeypatch.setenv("MNIST37_LR", "fast")
    with pytest.raises(SystemExit):
        parse_args([])


def test_missing_data_dir_is_a_clean_error(tmp_path: Path, capsys) -> None:
    args = ["--data-dir", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert train_main(args) == 1
    assert "no such data directory" in capsys.readouterr().err


def test_plural_says_one_epoch_and_many_epochs():
    from training.cli import plural

    assert plural(1, "epoch") == "1 epoch"
    assert plural(80, "epoch") == "80 epochs"
