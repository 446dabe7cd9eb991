"""Pictures of a training run: learning curves and the linear model's pixel weights."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from serving.contract import IMAGE_SIDE
from training.train import EpochStats

matplotlib.use("Agg")  # files only: no display needed, none assumed


def save_figure(figure: Figure, path: Path) -> None:
    """Save a PNG through a temporary file and a rename, then free the figure."""
    fd, temp = tempfile.mkstemp(prefix="." + path.name + ".", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            figure.savefig(handle, format="png", dpi=100)
        os.chmod(temp, 0o644)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(figure)


def plot_curves(history: Sequence[EpochStats], path: Path) -> None:
    """Training and validation loss, and validation accuracy, per epoch."""
    epochs = [stats.epoch for stats in history]
    figure, (loss_axes, accuracy_axes) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axes.plot(epochs, [stats.train_loss for stats in history], label="train")
    loss_axes.plot(epochs, [stats.validation_loss for stats in history], label="validation")
    loss_axes.set(xlabel="epoch", ylabel="binary cross-entropy", title="loss", yscale="log")
    loss_axes.legend()
    accuracy_axes.plot(epochs, [100 * stats.validation_accuracy for stats in history])
    accuracy_axes.set(xlabel="epoch", ylabel="%", title="validation accuracy")
    for axes in (loss_axes, accuracy_axes):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path)


def plot_weights(weights: np.ndarray, path: Path) -> None:
    """The 784 pixel weights as a 28x28 map: red pixels vote 7, blue pixels vote 3."""
    image = np.asarray(weights, dtype=np.float64).reshape(IMAGE_SIDE, IMAGE_SIDE)
    limit = float(np.abs(image).max()) or 1.0
    figure, axes = plt.subplots(figsize=(5, 4.4))
    shown = axes.imshow(image, cmap="RdBu_r", vmin=-limit, vmax=limit)
    axes.set(title="linear model: what each pixel says", xticks=[], yticks=[])
    figure.colorbar(shown, ax=axes, label="weight (> 0: looks like a 7, < 0: like a 3)")
    figure.tight_layout()
    save_figure(figure, path)
