"""`mnist37-train`: train a 3-vs-7 classifier and write a run directory.

    mnist37-train --arch linear            # -> runs/linear/
    mnist37-train --arch mlp --epochs 40 --out runs/mlp-short

A run directory holds `checkpoint.pt`, `curves.png`, `weights.png` (linear only) and
`metrics.json`, written last: a directory with `metrics.json` is a complete run.
Every flag also reads an environment variable (`--epochs`: MNIST37_EPOCHS, ...).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from serving.atomic import write_json_atomically
from serving.contract import POSITIVE_DIGIT
from serving.repository import DEFAULT_MODEL_NAME
from training.data import (
    DEFAULT_DATA_DIR,
    DataError,
    Mnist37Data,
    Split,
    load_dataset,
    split_train_validation,
)
from training.models import ARCHITECTURES, Linear
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


def _env(name: str, default: object) -> str | None:
    value = os.environ.get(f"MNIST37_{name}")
    return value if value else (None if default is None else str(default))


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, not {value}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {value}")
    return value


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    """The training settings (--arch ... --data-dir), shared with `mnist37-retrain`."""
    defaults = TrainConfig()
    add = parser.add_argument
    add(
        "--arch",
        choices=ARCHITECTURES,
        default=_env("ARCH", defaults.arch),
        help="linear: 784 weights + bias; mlp: 784 -> hidden -> ReLU -> 1 "
        "[MNIST37_ARCH] (default: %(default)s)",
    )
    add(
        "--hidden",
        type=_positive_int,
        default=_env("HIDDEN", defaults.hidden),
        help="hidden units of the mlp [MNIST37_HIDDEN] (default: %(default)s)",
    )
    add(
        "--epochs",
        type=_positive_int,
        default=_env("EPOCHS", defaults.epochs),
        help="[MNIST37_EPOCHS] (default: %(default)s)",
    )
    add(
        "--lr",
        type=_positive_float,
        default=_env("LR", defaults.lr),
        help="SGD learning rate [MNIST37_LR] (default: %(default)s)",
    )
    add(
        "--batch-size",
        type=_positive_int,
        default=_env("BATCH_SIZE", defaults.batch_size),
        help="[MNIST37_BATCH_SIZE] (default: %(default)s)",
    )
    add(
        "--seed",
        type=int,
        default=_env("SEED", defaults.seed),
        help="seeds the split, the initial weights and the batches "
        "[MNIST37_SEED] (default: %(default)s)",
    )
    add(
        "--validation-fraction",
        type=_fraction,
        default=_env("VALIDATION_FRACTION", defaults.validation_fraction),
        help="share of each digit's training images held out "
        "[MNIST37_VALIDATION_FRACTION] (default: %(default)s)",
    )
    add(
        "--max-shift",
        type=_non_negative_int,
        default=_env("MAX_SHIFT", defaults.max_shift),
        help="augmentation: shift training images by up to this many pixels, 0 for none "
        "[MNIST37_MAX_SHIFT] (default: %(default)s)",
    )
    add(
        "--data-dir",
        type=Path,
        default=_env("DATA_DIR", None),
        help="a directory with the four MNIST IDX files [MNIST37_DATA_DIR] "
        "(default: the 3s and 7s shipped in training/data)",
    )
    add(
        "--no-progress",
        action="store_true",
        default=os.environ.get("MNIST37_NO_PROGRESS", "") not in ("", "0"),
        help="no progress bars [MNIST37_NO_PROGRESS=1]",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="mnist37-train",
        description="Train the fast.ai 3-vs-7 MNIST classifier. "
        "Each flag's default can be set by the environment variable in brackets.",
    )
    add_training_arguments(parser)
    add = parser.add_argument
    add(
        "--out",
        type=Path,
        default=_env("OUT", None),
        help="run directory [MNIST37_OUT] (default: runs/<arch>)",
    )
    add(
        "--repository",
        type=Path,
        default=_env("REPOSITORY", None),
        help="publish the trained model to this model repository [MNIST37_REPOSITORY]",
    )
    add(
        "--model-name",
        default=_env("MODEL_NAME", DEFAULT_MODEL_NAME),
        help="name to publish under [MNIST37_MODEL_NAME] (default: %(default)s)",
    )
    return parser.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        arch=args.arch,
        hidden=args.hidden,
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        max_shift=args.max_shift,
    )


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


def main(argv: list[str] | None = None) -> int:
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
