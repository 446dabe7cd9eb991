"""`python -m training.init_repository`: publish a first model only if there is none yet.

    python -m training.init_repository --repository /models            # linear, shipped data
    python -m training.init_repository --repository /models -- --arch mlp --epochs 40

The first-start job of a deployment (`train-init` in docker-compose.yml): if the model
already has a published version it prints so and exits 0 without training; otherwise it
runs `mnist37-train --repository DIR --model-name NAME [ARGS after --]`, which trains,
exports, checks parity and publishes version 1. Two of these started at once do not both
train: the check and the training run under an exclusive lock on `<repository>/.init.lock`.

Exit status: 0 when the model has a version at the end, 1 when training or publishing
failed, 2 on usage errors. `--repository` and `--model-name` default to MNIST37_REPOSITORY
and MNIST37_MODEL_NAME, like mnist37-train's; the arguments after `--` go to mnist37-train
unchanged (its MNIST37_* variables apply as usual).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from serving.repository import (
    DEFAULT_MODEL_NAME,
    RepositoryError,
    exclusive_lock,
    list_versions,
    validate_model_name,
)

LOCK_FILE = ".init.lock"
_RESERVED = {"--repository", "--model-name", "--out"}


def published_versions(repository: Path, model_name: str) -> list[int]:
    return [version.version for version in list_versions(repository, model_name)]


def initialise(
    repository: Path, model_name: str, train_args: Sequence[str], work_dir: Path | None = None
) -> int:
    """Train and publish the first version of `model_name` unless it has one; exit status."""
    repository.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(repository / LOCK_FILE):
        existing = published_versions(repository, model_name)
        if existing:
            listed = ", ".join(str(version) for version in existing)
            print(
                f"{repository} already has {model_name} version(s) {listed}: nothing to do",
                flush=True,
            )
            return 0
        print(f"{repository} has no version of {model_name}: training the first", flush=True)
        from training import cli  # torch: imported only when there is something to train

        argv = [*train_args, "--repository", str(repository), "--model-name", model_name]
        if work_dir is not None:
            argv += ["--out", str(work_dir)]
        status = cli.main(argv)
        if status == 0 and not published_versions(repository, model_name):
            print(f"init_repository: error: training published nothing to {repository}")
            return 1
        return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.init_repository",
        description="Train and publish a first model into a model repository that has no "
        "version of it; do nothing otherwise. Arguments after `--` go to mnist37-train.",
    )
    parser.add_argument(
        "--repository",
        type=Path,
        default=os.environ.get("MNIST37_REPOSITORY") or None,
        help="model repository directory, created if missing [MNIST37_REPOSITORY]",
    )
    parser.add_argument(
        "--model-name",
        default=os.environ.get("MNIST37_MODEL_NAME") or DEFAULT_MODEL_NAME,
        help="model to look for and publish [MNIST37_MODEL_NAME] (default: %(default)s)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="run directory for the training (default: mnist37-train's, runs/<arch>)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    train_args: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, train_args = argv[:split], argv[split + 1 :]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.repository is None:
        parser.error("--repository (or MNIST37_REPOSITORY) is required")
    reserved = _RESERVED if args.work_dir is not None else _RESERVED - {"--out"}
    clashing = sorted({arg.split("=", 1)[0] for arg in train_args} & reserved)
    if clashing:
        parser.error(f"set {', '.join(clashing)} before `--`, not among mnist37-train's arguments")
    try:
        validate_model_name(args.model_name)
    except RepositoryError as error:
        parser.error(str(error))
    try:
        return initialise(args.repository, args.model_name, train_args, args.work_dir)
    except OSError as error:
        print(f"init_repository: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
