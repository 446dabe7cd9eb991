"""`mnist37-train`: train a 3-vs-7 classifier and write a run directory.

    mnist37-train --arch linear            # -> runs/linear/
    mnist37-train --arch mlp --epochs 40 --out runs/mlp-short

A run directory holds `checkpoint.pt`, `curves.png`, `weights.png` (linear only) and
`metrics.json`, written last: a directory with `metrics.json` is a complete run.
Every flag also reads an environment variable (`--epochs`: MNIST37_EPOCHS, ...);
`python -m serving.config mnist37-train` prints them all.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from serving.atomic import write_json_atomically
from serving.console import console_script
from serving.contract import POSITIVE_DIGIT
from serving.repository import DEFAULT_MODEL_NAME
from serving.settings import load, setting
from training.data import (
    DEFAULT_DATA_DIR,
    DataError,
    Mnist37Data,
    Split,
    load_dataset,
    split_train_validation,
)
from training.models import Linear
from training.plots import plot_curves, plot_weights
from training.train import (
    Evaluation,
    TrainConfig,
    evaluate,
    fit,
    is_seven,
    new_model,
    reproducible,
    save_checkpoint,
    to_pixels,
)

CHECKPOINT_FILE = "checkpoint.pt"
METRICS_FILE = "metrics.json"
CURVES_FILE = "curves.png"
WEIGHTS_FILE = "weights.png"
METRICS_SCHEMA_VERSION = 1


def library_versions() -> dict[str, str]:
    try:
        mnist37 = metadata.version("mnist37")
    except metadata.PackageNotFoundError:
        mnist37 = "not installed"
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "numpy": np.__version__,
        "mnist37": mnist37,
    }


def majority_baseline(train_labels: np.ndarray, test_labels: np.ndarray) -> float:
    """Test accuracy of always answering the digit most common in training."""
    sevens = int(np.sum(train_labels == POSITIVE_DIGIT))
    majority_is_seven = sevens * 2 >= len(train_labels)
    return float(np.mean((test_labels == POSITIVE_DIGIT) == majority_is_seven))


def evaluation_json(scores: Evaluation, count: int) -> dict:
    return {**asdict(scores), "count": count}


def first_training_images(split: Split, limit: int) -> Split:
    """The split with only the first `limit` training images (validation unchanged)."""
    return split._replace(
        train_images=split.train_images[:limit], train_labels=split.train_labels[:limit]
    )


def run_training(
    config: TrainConfig,
    data_dir: Path | None,
    out_dir: Path,
    progress: bool = True,
    train_limit: int | None = None,
) -> dict:
    """Train on the training split, report on the test set, write the run directory.

    `train_limit` trains on only the first that many images of the training split (a
    deliberately weak model, for testing gates). Returns the metrics written to
    `metrics.json`.
    """
    started = time.perf_counter()
    data: Mnist37Data = load_dataset(data_dir)
    split = split_train_validation(
        data.train_images, data.train_labels, config.validation_fraction, config.seed
    )
    if train_limit is not None:
        split = first_training_images(split, train_limit)
    train = (to_pixels(split.train_images), is_seven(split.train_labels))
    validation = (to_pixels(split.validation_images), is_seven(split.validation_labels))
    test = (to_pixels(data.test_images), is_seven(data.test_labels))
    with reproducible(config.seed):
        model = new_model(config)
        fit_started = time.perf_counter()
        history = fit(model, train, validation, config, progress)
        fit_seconds = time.perf_counter() - fit_started
        model.eval()
        final_validation = evaluate(model, *validation)
        test_scores = evaluate(model, *test)
    created_at = datetime.now(UTC).isoformat(timespec="seconds")

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)  # the old run is incomplete from here on
    test_json = evaluation_json(test_scores, len(data.test_labels))
    test_json["majority_baseline_accuracy"] = majority_baseline(
        split.train_labels, data.test_labels
    )
    versions = library_versions()
    save_checkpoint(
        out_dir / CHECKPOINT_FILE,
        {
            "arch": config.arch,
            "hidden": config.hidden,
            "state_dict": model.state_dict(),
            "seed": config.seed,
            "created_at": created_at,
            "data_checksums": data.checksums,
            "config": asdict(config),
            "test": test_json,
            "versions": versions,
        },
    )
    plot_curves(history, out_dir / CURVES_FILE)
    if isinstance(model, Linear):
        plot_weights(model.weights.detach().numpy(), out_dir / WEIGHTS_FILE)
    else:
        (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)  # left by an earlier linear run
    metrics = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "arch": config.arch,
        "seed": config.seed,
        "config": asdict(config),
        "created_at": created_at,
        "data": {
            "dir": str(data.source),
            "shipped_default": data.source.resolve() == DEFAULT_DATA_DIR,
            "checksums": data.checksums,
            "train_count": len(split.train_labels),
            "validation_count": len(split.validation_labels),
            "test_count": len(data.test_labels),
        },
        "history": [asdict(stats) for stats in history],
        "validation": evaluation_json(final_validation, len(split.validation_labels)),
        "test": test_json,
        "versions": versions,
        "train_time_s": round(fit_seconds, 3),
        "wall_time_s": round(time.perf_counter() - started, 3),
    }
    write_json_atomically(out_dir / METRICS_FILE, metrics)
    return metrics


@dataclass(frozen=True)
class TrainingRun(TrainConfig):
    """The settings of a training run with its data: `mnist37-train`'s and
    `mnist37-retrain`'s."""

    data_dir: Path | None = setting(
        None,
        "a directory with the four MNIST IDX files",
        default_help="the 3s and 7s shipped in `training/data`",
    )
    no_progress: bool = setting(False, "no progress bars")


@dataclass(frozen=True)
class TrainSettings(TrainingRun):
    """Train the fast.ai 3-vs-7 MNIST classifier into a run directory, and publish it to a
    model repository if asked."""

    prog: ClassVar[str] = "mnist37-train"

    out: Path | None = setting(None, "run directory", default_help="`runs/<arch>`")
    repository: Path | None = setting(
        None, "publish the trained model to this model repository (no quality gate)"
    )
    model_name: str = setting(DEFAULT_MODEL_NAME, "model name to publish under")


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> TrainSettings:
    return load(TrainSettings, argv, environ)


def config_from_args(run: TrainConfig) -> TrainConfig:
    """The training maths' part of a command's settings; a setting left None (decided at
    run time, and not decided) keeps TrainConfig's default."""
    values = {item.name: getattr(run, item.name) for item in fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in values.items() if value is not None})


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def summary(metrics: dict, out_dir: Path) -> str:
    test, validation = metrics["test"], metrics["validation"]
    (threes_right, _), (_, sevens_right) = test["confusion_matrix"]
    return (
        f"{metrics['arch']}: test accuracy {100 * test['accuracy']:.2f}% "
        f"({threes_right + sevens_right}/{test['count']}; always guessing the majority digit: "
        f"{100 * test['majority_baseline_accuracy']:.1f}%), test loss {test['loss']:.4f}, "
        f"validation accuracy {100 * validation['accuracy']:.2f}%\n"
        f"{plural(metrics['config']['epochs'], 'epoch')} in {metrics['train_time_s']:.1f} s "
        f"({metrics['wall_time_s']:.1f} s in all); run directory {out_dir}"
    )


def publish(run_dir: Path, repository: Path, model_name: str) -> str:
    """Publish a finished run as the next version of `model_name` in `repository`."""
    from training.publish import publish_run  # needs onnx and onnxruntime: only when asked

    version = publish_run(run_dir, repository, model_name)
    return f"published {version.name} version {version.version} at {version.path}"


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = config_from_args(args)
    out_dir = args.out if args.out is not None else Path("runs") / config.arch
    try:
        metrics = run_training(config, args.data_dir, out_dir, progress=not args.no_progress)
    except (DataError, ValueError, OSError) as error:
        print(f"mnist37-train: error: {error}", file=sys.stderr)
        return 1
    print(summary(metrics, out_dir))
    if args.repository is not None:
        try:
            print(publish(out_dir, args.repository, args.model_name))
        except Exception as error:  # the run is kept; say why it was not published
            print(
                f"mnist37-train: error: publishing {out_dir} to {args.repository} failed: "
                f"{type(error).__name__}: {error}",
                file=sys.stderr,
            )
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
