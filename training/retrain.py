"""`mnist37-retrain`: train a candidate and publish it only if it passes the gate.

    mnist37-retrain --repository DIR [--model-name NAME] [--data-dir DIR] [--arch ...]

A one-shot batch job (a container command, a cron or Kubernetes Job). It trains a
candidate into `<work-dir>/candidate/` (with the latest published version's architecture,
read from its model card, unless `--arch` is set; `linear` if there is none), exports it
to ONNX, and measures the candidate and
the latest published version of the model with onnxruntime on the same held-out images:
the 3s and 7s of the data's official MNIST test set. The candidate is published as the
next version only if its accuracy is at least `--min-accuracy` and at most
`--max-regression` below the current version's. A rejected candidate stays in the work
directory, which is never inside the repository. `<work-dir>/retrain-report.json` records
the decision; the last line of stdout is the same summary as one JSON object.

Exit status: 0 published, 3 rejected by the gate, 1 error, 2 usage error.
"""

from __future__ import annotations

import json
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime
from torch import nn

from serving.atomic import write_bytes_atomically, write_json_atomically
from serving.console import console_script
from serving.contract import DIGIT, IMAGES, POSITIVE_DIGIT
from serving.repository import (
    DEFAULT_MODEL_NAME,
    ModelVersion,
    RepositoryError,
    latest_version,
    validate_model_name,
)
from serving.repository_cli import summarize_version
from serving.settings import POSITIVE, Range, load, redefault, setting
from training.cli import CHECKPOINT_FILE, TrainingRun, config_from_args, run_training, summary
from training.data import DataError, Mnist37Data, load_dataset
from training.export import (
    ExportError,
    ModelMetadata,
    export_onnx,
    finalize,
)
from training.models import ARCHITECTURES
from training.parity import ParityError
from training.publish import PublishError, TrainingRecord, publish_model, read_training_record
from training.train import TrainConfig, load_checkpoint

EXIT_PUBLISHED = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_REJECTED = 3
EXIT_CODES = {"published": EXIT_PUBLISHED, "rejected": EXIT_REJECTED, "error": EXIT_ERROR}

DEFAULT_MIN_ACCURACY = 0.97
DEFAULT_MAX_REGRESSION = 0.005
REPORT_FILE = "retrain-report.json"
DEFAULT_WORK_ROOT = Path("runs")
CANDIDATE_DIR = "candidate"
CANDIDATE_MODEL_FILE = "model.onnx"
UNPUBLISHED_VERSION = 0  # the version stamped into a candidate's model.onnx
REPORT_SCHEMA_VERSION = 1
UNIT_INTERVAL = Range(at_least=0, at_most=1)
# Accuracies are counts / images; this absorbs float rounding at the gate's boundaries.
GATE_TOLERANCE = 1e-9
EXPECTED_ERRORS = (
    DataError,
    ExportError,
    ParityError,
    PublishError,
    RepositoryError,
    OSError,
    ValueError,
)


class RetrainError(Exception):
    """Retraining cannot finish: the current version cannot be measured, or changed."""


@dataclass(frozen=True)
class Gate:
    min_accuracy: float
    max_regression: float

    def reasons_to_reject(
        self, candidate: float, current: float | None, current_version: int | None
    ) -> list[str]:
        """Why a candidate fails the gate; empty if it passes."""
        reasons = []
        if candidate < self.min_accuracy - GATE_TOLERANCE:
            reasons.append(
                f"candidate accuracy {candidate:.4f} is below the minimum "
                f"{self.min_accuracy:.4f} (--min-accuracy)"
            )
        if current is not None and current - candidate > self.max_regression + GATE_TOLERANCE:
            reasons.append(
                f"candidate accuracy {candidate:.4f} is {current - candidate:.4f} below "
                f"current version {current_version}'s {current:.4f}, more than the allowed "
                f"regression {self.max_regression:.4f} (--max-regression)"
            )
        return reasons


@dataclass(frozen=True)
class Score:
    """How a model did on the gate's images, measured through onnxruntime."""

    accuracy: float
    correct: int
    count: int
    confusion_matrix: list[list[int]]  # rows: true 3, 7; columns: predicted 3, 7


@dataclass(frozen=True)
class Candidate:
    run_dir: Path
    model: nn.Module
    record: TrainingRecord
    exported: onnx.ModelProto
    model_path: Path  # the candidate's stamped ONNX file (version 0: unpublished)


@dataclass(frozen=True)
class ChosenArchitecture:
    """The candidate's architecture, and why it is that one."""

    name: str
    hidden: int
    reason: str

    def describe(self) -> str:
        units = f" ({self.hidden} hidden units)" if self.name == "mlp" else ""
        return f"{self.name}{units}, {self.reason}"

    def as_json(self) -> dict:
        hidden = self.hidden if self.name == "mlp" else None  # as model cards record it
        return {"name": self.name, "hidden_units": hidden, "reason": self.reason}


@dataclass
class Outcome:
    """What the job decided and measured; the report and the summary line."""

    model: str
    repository: str
    work_dir: str
    gate: Gate
    decision: str = "error"
    architecture: ChosenArchitecture | None = None
    reasons: list[str] = field(default_factory=list)
    version: int | None = None
    version_path: str | None = None
    candidate_dir: str | None = None
    candidate: Score | None = None
    current_version: int | None = None
    current_path: str | None = None
    current: Score | None = None
    gate_data: dict | None = None
    report_path: str | None = None
    training: dict | None = None
    duration_s: float | None = None

    def summary_line(self) -> dict:
        return {
            "event": "retrain",
            "decision": self.decision,
            "exit_code": EXIT_CODES[self.decision],
            "model": self.model,
            "version": self.version,
            "architecture": self.architecture.name if self.architecture else None,
            "architecture_reason": self.architecture.reason if self.architecture else None,
            "candidate_accuracy": self.candidate.accuracy if self.candidate else None,
            "current_version": self.current_version,
            "current_accuracy": self.current.accuracy if self.current else None,
            "min_accuracy": self.gate.min_accuracy,
            "max_regression": self.gate.max_regression,
            "reason": "; ".join(self.reasons) or None,
            "report": self.report_path,
            "duration_s": self.duration_s,
        }

    def report(self) -> dict:
        return {
            **self.summary_line(),
            "schema_version": REPORT_SCHEMA_VERSION,
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "reasons": self.reasons,
            "repository": self.repository,
            "work_dir": self.work_dir,
            "published": {"version": self.version, "path": self.version_path},
            "candidate": {
                "run_dir": self.candidate_dir,
                "architecture": self.architecture.as_json() if self.architecture else None,
                "training": self.training,
                "gate_score": asdict(self.candidate) if self.candidate else None,
            },
            "current": {
                "version": self.current_version,
                "path": self.current_path,
                "gate_score": asdict(self.current) if self.current else None,
            },
            "gate": {**asdict(self.gate), "data": self.gate_data},
        }


@dataclass(frozen=True)
class RetrainSettings(TrainingRun):
    """Train a candidate, compare it with the latest published version on the held-out
    test images, and publish it only if it passes the gate. The candidate has the latest
    version's architecture unless --arch says otherwise. Exit status: 0 published,
    3 rejected by the gate, 1 error, 2 usage error."""

    prog: ClassVar[str] = "mnist37-retrain"

    # None: decided at run time from the latest version's model card (choose_architecture).
    arch: str | None = redefault(
        TrainConfig, "arch", None, f"the latest version's; `{TrainConfig.arch}` without one"
    )
    hidden: int | None = redefault(
        TrainConfig,
        "hidden",
        None,
        f"the latest version's without `--arch`; `{TrainConfig.hidden}` otherwise",
    )
    repository: Path | None = setting(
        None,
        "the model repository; it must exist (a mistyped path must not bypass the gate)",
        required=True,
    )
    model_name: str = setting(DEFAULT_MODEL_NAME, "the model to retrain")
    train_limit: int | None = setting(
        None,
        "train on only the first N images of the training split: a deliberately weak "
        "candidate, for testing the gate",
        allowed=POSITIVE,
        default_help="all",
    )
    min_accuracy: float = setting(
        DEFAULT_MIN_ACCURACY,
        "the candidate's least accuracy on the held-out images",
        allowed=UNIT_INTERVAL,
    )
    max_regression: float = setting(
        DEFAULT_MAX_REGRESSION,
        "how far the candidate's accuracy may fall below the current version's "
        "(0.005 is about 10 of 2,038 images)",
        allowed=UNIT_INTERVAL,
    )
    work_dir: Path | None = setting(
        None,
        "new or empty directory for the candidate run and the report, outside the repository",
        default_help="a new `<runs-dir>/retrain-<UTC time>-<random>`",
    )
    runs_dir: Path = setting(
        DEFAULT_WORK_ROOT,
        "without `--work-dir`, each run creates a new `retrain-<UTC time>-<random>` "
        "directory in this one, outside the repository",
    )


def parse_args(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> RetrainSettings:
    return load(RetrainSettings, argv, environ)


def choose_architecture(args: RetrainSettings, latest: ModelVersion | None) -> ChosenArchitecture:
    """--arch and --hidden as set; without --arch, the latest version's (from its model
    card): a candidate is compared with the version it would replace, and a linear one is
    rejected against an MLP. TrainConfig's defaults for what is left."""
    hidden = args.hidden or TrainConfig.hidden
    if args.arch is not None:
        return ChosenArchitecture(args.arch, hidden, "set by --arch (or MNIST37_ARCH)")
    if latest is None:
        reason = f"the default: {args.model_name} has no published version"
        return ChosenArchitecture(TrainConfig.arch, hidden, reason)
    name, served_hidden = served_architecture(latest)
    reason = f"that of {latest.name} version {latest.version}, the latest published"
    return ChosenArchitecture(name, args.hidden or served_hidden or TrainConfig.hidden, reason)


def served_architecture(version: ModelVersion) -> tuple[str, int | None]:
    """The architecture name and hidden units (None for linear) on a version's card."""
    try:
        card = version.read_card()
    except RepositoryError as error:
        raise RetrainError(f"{error}: cannot tell its architecture; set --arch") from error
    name = card.architecture_name or ""
    if name not in ARCHITECTURES:
        raise RetrainError(
            f"the model card of {version.name} version {version.version} names no "
            f"architecture this command trains ({name!r}); set --arch"
        )
    hidden = card.architecture.hidden_units if card.architecture is not None else None
    return name, hidden if hidden is not None and hidden > 0 else None


def is_inside(path: Path, directory: Path) -> bool:
    path, directory = path.resolve(), directory.resolve()
    return path == directory or directory in path.parents


def usage_problem(args: RetrainSettings) -> str | None:
    """What is wrong with the settings that parsing them cannot see, or None."""
    try:
        validate_model_name(args.model_name)
    except RepositoryError as error:
        return str(error)
    if not args.repository.is_dir():
        return f"no model repository at {args.repository} (create the directory first)"
    work_dir = args.work_dir if args.work_dir is not None else args.runs_dir
    if is_inside(work_dir, args.repository):
        return f"the work directory {work_dir} is inside the repository {args.repository}"
    if args.work_dir is not None and not is_new_or_empty_dir(args.work_dir):
        return f"--work-dir {args.work_dir} exists and is not an empty directory"
    return None


def is_new_or_empty_dir(path: Path) -> bool:
    return not path.exists() or (path.is_dir() and not any(path.iterdir()))


def make_work_dir(requested: Path | None, runs_dir: Path = DEFAULT_WORK_ROOT) -> Path:
    """The requested directory, created if needed, or a new one under `runs_dir`."""
    if requested is not None:
        requested.mkdir(parents=True, exist_ok=True)
        return requested
    runs_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return Path(tempfile.mkdtemp(prefix=f"retrain-{stamp}-", dir=runs_dir))


def score_onnx(model: bytes | Path, images: np.ndarray, labels: np.ndarray) -> Score:
    """Accuracy of an ONNX serving graph's `digit` output, run by onnxruntime on CPU."""
    source = str(model) if isinstance(model, Path) else model
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    session = onnxruntime.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    (digits,) = session.run([DIGIT.name], {IMAGES.name: images})
    truth, predicted = labels == POSITIVE_DIGIT, digits == POSITIVE_DIGIT
    correct = int(np.sum(digits == labels))
    return Score(
        accuracy=correct / len(labels),
        correct=correct,
        count=len(labels),
        confusion_matrix=[
            [int(np.sum(~truth & ~predicted)), int(np.sum(~truth & predicted))],
            [int(np.sum(truth & ~predicted)), int(np.sum(truth & predicted))],
        ],
    )


def score_version(version: ModelVersion, images: np.ndarray, labels: np.ndarray) -> Score:
    try:
        return score_onnx(version.model_path, images, labels)
    except Exception as error:  # onnxruntime's errors derive from Exception only
        raise RetrainError(
            f"cannot run the current version {version.version} ({version.model_path}) "
            f"with onnxruntime: {error}"
        ) from error


def gate_data_description(data: Mnist37Data) -> dict:
    return {
        "images": "the 3s and 7s of the official MNIST test set",
        "dir": str(data.source),
        "count": len(data.test_labels),
        "checksums": {name: digest for name, digest in data.checksums.items() if "t10k" in name},
    }


def train_candidate(args: RetrainSettings, run_dir: Path, model_name: str) -> Candidate:
    """Train, export and stamp the candidate (as the unpublished version 0) in `run_dir`."""
    config = config_from_args(args)
    metrics = run_training(
        config, args.data_dir, run_dir, progress=not args.no_progress, train_limit=args.train_limit
    )
    print(summary(metrics, run_dir))
    model, checkpoint = load_checkpoint(run_dir / CHECKPOINT_FILE)
    record = read_training_record(run_dir, checkpoint)
    exported = export_onnx(model)
    stamped = finalize(exported, candidate_metadata(record, model_name))
    model_path = run_dir / CANDIDATE_MODEL_FILE
    write_bytes_atomically(model_path, stamped)
    return Candidate(run_dir, model, record, exported, model_path)


def candidate_metadata(record: TrainingRecord, model_name: str) -> ModelMetadata:
    return record.metadata(model_name, UNPUBLISHED_VERSION)


def training_description(args: RetrainSettings, record: TrainingRecord) -> dict:
    return {
        "config": asdict(config_from_args(args)),
        "train_limit": args.train_limit,
        "data_dir": str(args.data_dir) if args.data_dir else None,
        "test_accuracy_torch": record.test_accuracy,
    }


def checked_current_version(repository: Path, model_name: str) -> ModelVersion | None:
    """The latest published version, refused if its card or file is damaged."""
    current = latest_version(repository, model_name)
    if current is None:
        return None
    problems = summarize_version(current).problems
    if problems:
        raise RetrainError(
            f"cannot measure the current version {current.version} of {model_name}: "
            + "; ".join(problems)
        )
    return current


def publish_candidate(
    candidate: Candidate,
    repository: Path,
    model_name: str,
    compared_with: int | None,
    test_images: np.ndarray,
) -> ModelVersion:
    """Publish the candidate, unless the latest version changed since it was measured."""

    def latest_is_still_the_one_compared(version: int) -> None:
        latest = latest_version(repository, model_name)
        now = latest.version if latest is not None else None
        if now != compared_with:
            raise RetrainError(
                f"the latest version of {model_name} changed from {compared_with} to {now} "
                "while the candidate was being measured; nothing published, run again"
            )

    return publish_model(
        candidate.model,
        candidate.record,
        test_images,
        repository,
        model_name,
        exported=candidate.exported,
        before_write=latest_is_still_the_one_compared,
    )


def retrain(args: RetrainSettings, outcome: Outcome) -> None:
    """Train, measure, gate and publish or reject, filling in `outcome` as it goes."""
    data = load_dataset(args.data_dir)
    outcome.gate_data = gate_data_description(data)
    architecture = choose_architecture(args, latest_version(args.repository, args.model_name))
    outcome.architecture = architecture
    print(f"architecture: {architecture.describe()}")
    args = replace(args, arch=architecture.name, hidden=architecture.hidden)
    candidate = train_candidate(args, Path(outcome.work_dir) / CANDIDATE_DIR, args.model_name)
    measure_candidate(candidate, data, args, outcome)
    measure_current(args.repository, args.model_name, data, outcome)
    outcome.reasons = outcome.gate.reasons_to_reject(
        outcome.candidate.accuracy,
        outcome.current.accuracy if outcome.current else None,
        outcome.current_version,
    )
    if outcome.reasons:
        outcome.decision = "rejected"
        print(f"rejected: {'; '.join(outcome.reasons)}; candidate kept in {candidate.run_dir}")
        return
    published = publish_candidate(
        candidate, args.repository, args.model_name, outcome.current_version, data.test_images
    )
    outcome.decision, outcome.version = "published", published.version
    outcome.version_path = str(published.path.resolve())
    print(f"published {published.name} version {published.version} at {published.path}")


def measure_candidate(
    candidate: Candidate, data: Mnist37Data, args: RetrainSettings, outcome: Outcome
) -> None:
    outcome.candidate_dir = str(candidate.run_dir.resolve())
    outcome.training = training_description(args, candidate.record)
    outcome.candidate = score_onnx(candidate.model_path, data.test_images, data.test_labels)
    count = len(data.test_labels)
    print(f"candidate: {describe(outcome.candidate)} on {count} held-out test images")


def measure_current(repository: Path, name: str, data: Mnist37Data, outcome: Outcome) -> None:
    current = checked_current_version(repository, name)
    if current is None:
        print(f"current: {name} has no published version; only --min-accuracy applies")
        return
    outcome.current_version = current.version
    outcome.current_path = str(current.path.resolve())
    outcome.current = score_version(current, data.test_images, data.test_labels)
    print(f"current: {name} version {current.version}: {describe(outcome.current)}")


def describe(score: Score) -> str:
    return f"accuracy {score.accuracy:.4f} ({score.correct}/{score.count})"


def report_error(error: Exception) -> str:
    """One line for the user; a traceback too if the error was not expected."""
    if not isinstance(error, (*EXPECTED_ERRORS, RetrainError)):
        traceback.print_exc()
    message = f"{type(error).__name__}: {error}"
    print(f"mnist37-retrain: error: {message}", file=sys.stderr)
    return message


def write_report(outcome: Outcome) -> None:
    path = Path(outcome.work_dir) / REPORT_FILE
    outcome.report_path = str(path)
    try:
        write_json_atomically(path, outcome.report())
    except OSError as error:
        outcome.report_path = None
        print(f"mnist37-retrain: error: cannot write the report: {error}", file=sys.stderr)
        outcome.decision = "error"
        outcome.reasons.append(f"cannot write the report: {error}")


def stop_on_sigterm() -> None:
    """Make SIGTERM (a Job's deadline, `docker stop`) end the run like any error: nothing
    half-published, and the report and summary line still written."""

    def terminated(signum: int, _frame: object) -> None:
        raise RetrainError(f"terminated by {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, terminated)


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    problem = usage_problem(args)
    if problem is not None:
        print(f"mnist37-retrain: error: {problem}", file=sys.stderr)
        return EXIT_USAGE
    stop_on_sigterm()
    started = time.perf_counter()
    gate = Gate(args.min_accuracy, args.max_regression)
    outcome = Outcome(args.model_name, str(args.repository.resolve()), str(args.work_dir), gate)
    try:
        outcome.work_dir = str(make_work_dir(args.work_dir, args.runs_dir).resolve())
    except OSError as error:
        outcome.reasons = [report_error(error)]
    else:
        try:
            retrain(args, outcome)
        except Exception as error:  # a batch job: always end with the report and summary line
            outcome.decision, outcome.version = "error", None
            outcome.reasons = [report_error(error)]
        outcome.duration_s = round(time.perf_counter() - started, 3)
        write_report(outcome)
    print(json.dumps(outcome.summary_line(), separators=(",", ":")), flush=True)
    return EXIT_CODES[outcome.decision]


if __name__ == "__main__":
    sys.exit(main())
