"""Training the 3-vs-7 classifiers, fast.ai chapter 4 style: loss, accuracy, SGD, evaluation.

A model maps pixels [N, 784] in [0, 1] to logits [N]; sigmoid(logit) is P(the digit is 7).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from serving.atomic import write_bytes_atomically
from serving.contract import DECISION_THRESHOLD, IMAGE_SIDE, POSITIVE_DIGIT
from serving.settings import NON_NEGATIVE, POSITIVE, Range, setting
from training.models import ARCHITECTURES, build_model


@dataclass(frozen=True)
class TrainConfig:
    """The settings of one training run. Each field is also a flag of `mnist37-train` and
    `mnist37-retrain` (`--max-shift`, MNIST37_MAX_SHIFT): `serving.settings`."""

    arch: str = setting(
        "linear",
        "`linear`: 784 weights + bias; `mlp`: 784 -> hidden -> ReLU -> 1",
        choices=ARCHITECTURES,
    )
    hidden: int = setting(
        30, "hidden units of the `mlp` (recorded but unused by `linear`)", allowed=POSITIVE
    )
    epochs: int = setting(80, "passes over the training split", allowed=POSITIVE)
    lr: float = setting(0.5, "SGD learning rate", allowed=POSITIVE)
    batch_size: int = setting(256, "images per SGD step", allowed=POSITIVE)
    seed: int = setting(37, "seeds the split, the initial weights, batch order and shifts")
    validation_fraction: float = setting(
        0.2, "share of each digit's training images held out", allowed=Range(above=0, below=1)
    )
    max_shift: int = setting(
        1,
        "augmentation: shift each training image by up to this many pixels, 0 for none",
        allowed=NON_NEGATIVE,
    )


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    confusion_matrix: list[list[int]]  # rows: true 3, 7; columns: predicted 3, 7


@dataclass(frozen=True)
class EpochStats:
    epoch: int
    train_loss: float
    validation_loss: float
    validation_accuracy: float


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 images [N, 28, 28] -> float32 [N, 784] in [0, 1]."""
    return torch.from_numpy(images).reshape(len(images), -1).float() / 255.0


def is_seven(labels: np.ndarray) -> torch.Tensor:
    """Digits [N] -> targets [N]: 1.0 for a 7, 0.0 for a 3."""
    return torch.from_numpy(labels == POSITIVE_DIGIT).float()


def mnist_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of P(7) = sigmoid(logits), computed stably from the logits."""
    return F.binary_cross_entropy_with_logits(logits, targets)


def predicts_seven(logits: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(logits) >= DECISION_THRESHOLD


def batch_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The fraction of images whose predicted digit is right."""
    return int((predicts_seven(logits) == targets.bool()).sum()) / len(targets)


def confusion_matrix(logits: torch.Tensor, targets: torch.Tensor) -> list[list[int]]:
    """Counts [[3 as 3, 3 as 7], [7 as 3, 7 as 7]]."""
    truth, predicted = targets.bool(), predicts_seven(logits)
    return [
        [int((~truth & ~predicted).sum()), int((~truth & predicted).sum())],
        [int((truth & ~predicted).sum()), int((truth & predicted).sum())],
    ]


@torch.no_grad()
def evaluate(model: nn.Module, pixels: torch.Tensor, targets: torch.Tensor) -> Evaluation:
    logits = model(pixels)
    return Evaluation(
        loss=mnist_loss(logits, targets).item(),
        accuracy=batch_accuracy(logits, targets),
        confusion_matrix=confusion_matrix(logits, targets),
    )


@torch.no_grad()
def sgd_step(params: list[nn.Parameter], lr: float) -> None:
    """Step each parameter against its gradient, then clear the gradient."""
    for param in params:
        param -= param.grad * lr
        param.grad = None


def shift_randomly(
    pixels: torch.Tensor, max_shift: int, generator: torch.Generator
) -> torch.Tensor:
    """Move each image [784] by a random -max_shift..max_shift pixels along each axis.

    Blank pixels move in at the edges. A 3 is still a 3 one pixel to the left: the model
    sees a slightly different copy of each training image every epoch.
    """
    if max_shift == 0:
        return pixels
    count, side, reach = len(pixels), IMAGE_SIDE, 2 * max_shift + 1
    padded = F.pad(pixels.view(count, side, side), (max_shift,) * 4)
    top = torch.randint(0, reach, (count, 1, 1), generator=generator)
    left = torch.randint(0, reach, (count, 1, 1), generator=generator)
    rows = top + torch.arange(side).view(1, side, 1)
    cols = left + torch.arange(side).view(1, 1, side)
    return padded[torch.arange(count).view(count, 1, 1), rows, cols].reshape(count, -1)


def shuffled_batches(
    count: int, batch_size: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Indices of a fresh random permutation of the data, `batch_size` at a time."""
    return iter(torch.randperm(count, generator=generator).split(batch_size))


def train_epoch(
    model: nn.Module,
    pixels: torch.Tensor,
    targets: torch.Tensor,
    config: TrainConfig,
    generator: torch.Generator,
    bar: tqdm,
) -> float:
    """One pass of mini-batch SGD over the training data; returns its mean loss."""
    params = list(model.parameters())
    total_loss = 0.0
    for batch in shuffled_batches(len(pixels), config.batch_size, generator):
        inputs = shift_randomly(pixels[batch], config.max_shift, generator)
        loss = mnist_loss(model(inputs), targets[batch])
        loss.backward()
        sgd_step(params, config.lr)
        total_loss += loss.item() * len(batch)
        bar.update(len(batch))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
    return total_loss / len(pixels)


def fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    validation: tuple[torch.Tensor, torch.Tensor],
    config: TrainConfig,
    progress: bool = True,
) -> list[EpochStats]:
    """Train for `config.epochs` epochs, measuring the validation set after each."""
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    for epoch in range(1, config.epochs + 1):
        with tqdm(
            total=len(train[0]),
            desc=f"epoch {epoch}/{config.epochs}",
            unit="img",
            disable=not progress,
            leave=True,
        ) as bar:
            model.train()
            train_loss = train_epoch(model, *train, config, generator, bar)
            model.eval()
            scores = evaluate(model, *validation)
            bar.set_postfix(
                loss=f"{train_loss:.4f}",
                val_loss=f"{scores.loss:.4f}",
                val_acc=f"{scores.accuracy:.4f}",
            )
        history.append(EpochStats(epoch, train_loss, scores.loss, scores.accuracy))
    return history


@contextmanager
def reproducible(seed: int, threads: int = 1) -> Iterator[None]:
    """Seeded, deterministic, fixed-thread torch: the same seed gives the same bits.

    Restores the previous settings on exit.
    """
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(previous_threads)
        torch.use_deterministic_algorithms(previous_deterministic)


def new_model(config: TrainConfig) -> nn.Module:
    """A freshly initialised model; its initial weights depend only on `config.seed`."""
    torch.manual_seed(config.seed)
    return build_model(config.arch, config.hidden)


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """torch.save, written atomically."""
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    write_bytes_atomically(path, buffer.getvalue())


def load_checkpoint(path: Path) -> tuple[nn.Module, dict]:
    """The model of a checkpoint, in eval mode, and the checkpoint dict itself."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    model = build_model(checkpoint["arch"], checkpoint["hidden"])
    model.load_state_dict(checkpoint["state_dict"])
    return model.eval(), checkpoint
