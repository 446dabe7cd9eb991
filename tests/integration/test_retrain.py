"""`mnist37-retrain`: the gate, and the real console script publishing and rejecting."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from serving.repository import Architecture, latest_version, list_versions
from serving.synthetic import publish_model, random_linear_model
from training.cli import main as train_main
from training.data import load_dataset
from training.export import export_onnx, read_metadata
from training.publish import read_training_record
from training.retrain import (
    EXIT_ERROR,
    EXIT_PUBLISHED,
    EXIT_REJECTED,
    EXIT_USAGE,
    REPORT_FILE,
    Candidate,
    ChosenArchitecture,
    Gate,
    RetrainError,
    choose_architecture,
    main,
    make_work_dir,
    parse_args,
    publish_candidate,
    train_candidate,
)
from training.train import load_checkpoint

RETRAIN = Path(sys.executable).parent / "mnist37-retrain"
GOOD = ["--epochs", "10"]  # linear: 97.94% on the 2,038 test images, above the 97% gate
WEAK = ["--epochs", "1", "--train-limit", "20"]  # about 50%: no better than guessing


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def summary(self) -> dict:
        return json.loads(self.stdout.splitlines()[-1])


def retrain(repository: Path, work_dir: Path, *extra: str) -> Result:
    """Run the installed console script, with no MNIST37_* settings from the environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST37_")}
    args = [str(RETRAIN), "--repository", str(repository), "--work-dir", str(work_dir)]
    done = subprocess.run(
        [*args, "--no-progress", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=work_dir.parent,
        timeout=240,
    )
    return Result(done.returncode, done.stdout, done.stderr)


def snapshot(directory: Path) -> dict[str, str]:
    """Every file under `directory`: relative path -> sha256 of its bytes."""
    return {
        str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def read_report(work_dir: Path) -> dict:
    return json.loads((work_dir / REPORT_FILE).read_text())


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Result]:
    """A retrain into an empty repository: (repository, work dir, result)."""
    root = tmp_path_factory.mktemp("retrain")
    repository = root / "repository"
    repository.mkdir()
    work_dir = root / "first"
    return repository, work_dir, retrain(repository, work_dir, *GOOD)


# --- the gate ----------------------------------------------------------------------------


def test_the_candidate_model_is_written_atomically(tmp_path, monkeypatch) -> None:
    """A new file renamed into place, never the old one rewritten: a hard link to the old
    model.onnx (a reader holding it) keeps the old bytes."""
    for name in [n for n in os.environ if n.startswith("MNIST37_")]:
        monkeypatch.delenv(name)
    run_dir = tmp_path / "candidate"
    run_dir.mkdir()
    old = tmp_path / "old.onnx"
    old.write_bytes(b"the previous candidate")
    os.link(old, run_dir / "model.onnx")
    args = parse_args(["--repository", str(tmp_path / "repository"), "--no-progress", *WEAK])

    candidate = train_candidate(args, run_dir, "mnist37")

    assert old.read_bytes() == b"the previous candidate"
    assert candidate.model_path == run_dir / "model.onnx"
    assert read_metadata(candidate.model_path)["model_name"] == "mnist37"
    assert candidate.model_path.stat().st_ino != old.stat().st_ino
    assert [path.name for path in run_dir.iterdir() if path.name.startswith(".")] == []


def test_without_a_current_version_only_the_minimum_applies() -> None:
    gate = Gate(min_accuracy=0.97, max_regression=0.005)
    assert gate.reasons_to_reject(0.97, None, None) == []
    (reason,) = gate.reasons_to_reject(0.9699, None, None)
    assert "below the minimum 0.9700 (--min-accuracy)" in reason


def test_the_allowed_regression_is_inclusive_and_measured_from_the_current() -> None:
    gate = Gate(min_accuracy=0.5, max_regression=0.005)
    assert gate.reasons_to_reject(0.975, 0.98, 2) == []  # exactly 0.005 worse: allowed
    assert gate.reasons_to_reject(0.99, 0.98, 2) == []
    (reason,) = gate.reasons_to_reject(0.9749, 0.98, 2)
    assert "current version 2's 0.9800" in reason and "(--max-regression)" in reason


def test_a_candidate_can_fail_both_rules_at_once() -> None:
    reasons = Gate(0.97, 0.0).reasons_to_reject(0.6, 0.98, 1)
    assert len(reasons) == 2


# --- the architecture --------------------------------------------------------------------


def test_without_arch_the_candidate_has_the_latest_versions_architecture(tmp_path) -> None:
    def chosen(*flags: str, environ: dict[str, str] | None = None) -> ChosenArchitecture:
        args = parse_args(["--repository", str(tmp_path), *flags], environ or {})
        return choose_architecture(args, latest_version(tmp_path, "mnist37"))

    assert chosen() == ChosenArchitecture(
        "linear", 30, "the default: mnist37 has no published version"
    )
    publish_model(tmp_path, "mnist37", random_linear_model())
    assert chosen().name == "linear"
    publish_model(tmp_path, "mnist37", random_linear_model(), architecture=Architecture("mlp", 16))
    assert chosen() == ChosenArchitecture(
        "mlp", 16, "that of mnist37 version 2, the latest published"
    )
    assert chosen("--hidden", "8").hidden == 8
    explicit = ChosenArchitecture("linear", 30, "set by --arch (or MNIST37_ARCH)")
    assert chosen("--arch", "linear") == explicit
    assert chosen(environ={"MNIST37_ARCH": "linear"}) == explicit
    assert chosen("--arch", "mlp").hidden == 30  # the served units follow only without --arch


def test_an_unreadable_architecture_is_an_error_that_says_to_set_arch(tmp_path) -> None:
    publish_model(tmp_path, "mnist37", random_linear_model(), architecture=Architecture("resnet"))
    args = parse_args(["--repository", str(tmp_path)], {})
    with pytest.raises(RetrainError, match=r"names no architecture.*'resnet'.*set --arch"):
        choose_architecture(args, latest_version(tmp_path, "mnist37"))
    (latest_version(tmp_path, "mnist37").path / "model.json").write_text("{")
    with pytest.raises(RetrainError, match=r"cannot read model card .*set --arch"):
        choose_architecture(args, latest_version(tmp_path, "mnist37"))


def test_after_linear_then_mlp_a_retrain_trains_the_served_mlp(first, tmp_path) -> None:
    """`make demo` publishes linear v1, then mlp v2: a plain retrain must retrain the MLP
    (here with 16 hidden units, read from its card), not a linear candidate that the gate
    rejects against it."""
    repository = tmp_path / "repository"
    shutil.copytree(first[0], repository)
    mlp = ["--arch", "mlp", "--hidden", "16", *GOOD, "--out", str(tmp_path / "mlp")]
    assert train_main([*mlp, "--repository", str(repository), "--no-progress"]) == 0

    result = retrain(repository, tmp_path / "again", *GOOD)

    assert result.returncode == EXIT_PUBLISHED, result.stdout + result.stderr
    summary = result.summary
    assert summary["architecture"] == "mlp"
    assert summary["architecture_reason"] == "that of mnist37 version 2, the latest published"
    assert (summary["version"], summary["current_version"]) == (3, 2)
    assert summary["candidate_accuracy"] == summary["current_accuracy"]  # the same MLP again
    assert "architecture: mlp (16 hidden units), that of mnist37 version 2" in result.stdout
    candidate = read_report(tmp_path / "again")["candidate"]
    assert candidate["architecture"]["hidden_units"] == 16
    assert candidate["training"]["config"]["arch"] == "mlp"


# --- the console script ------------------------------------------------------------------


def test_first_candidate_is_published_as_version_1(first) -> None:
    repository, work_dir, result = first
    assert result.returncode == EXIT_PUBLISHED, result.stderr
    summary = result.summary
    assert summary["event"] == "retrain" and summary["decision"] == "published"
    assert (summary["model"], summary["version"], summary["exit_code"]) == ("mnist37", 1, 0)
    assert summary["candidate_accuracy"] == pytest.approx(1996 / 2038)
    assert summary["current_version"] is None and summary["current_accuracy"] is None
    assert summary["reason"] is None
    assert summary["report"] == str((work_dir / REPORT_FILE).resolve())
    (published,) = list_versions(repository, "mnist37")
    assert published.version == 1
    # published through training.publish: the explanation graph too, checked
    assert published.explanation_path.is_file()
    assert published.read_card().explanation_file.check["digit_mismatches"] == 0
    report = read_report(work_dir)
    assert report["decision"] == "published" and report["published"]["version"] == 1
    assert report["candidate"]["gate_score"]["count"] == 2038
    assert published.read_card().training["run_dir"] == report["candidate"]["run_dir"]


def test_weak_candidate_is_rejected_and_the_served_version_is_unchanged(first) -> None:
    repository, _, published = first
    assert published.returncode == EXIT_PUBLISHED
    before = snapshot(repository)
    work_dir = repository.parent / "weak"

    result = retrain(repository, work_dir, *WEAK)

    assert result.returncode == EXIT_REJECTED, result.stderr
    assert snapshot(repository) == before  # same versions, same bytes, nothing else
    summary = result.summary
    assert (summary["decision"], summary["version"], summary["exit_code"]) == ("rejected", None, 3)
    assert summary["candidate_accuracy"] < 0.6
    assert summary["current_version"] == 1
    assert summary["current_accuracy"] == pytest.approx(1996 / 2038)
    assert "--min-accuracy" in summary["reason"] and "--max-regression" in summary["reason"]
    assert "rejected: candidate accuracy" in result.stdout
    report = read_report(work_dir)
    assert report["decision"] == "rejected" and len(report["reasons"]) == 2
    assert report["current"]["version"] == 1 and report["published"]["version"] is None
    candidate = Path(report["candidate"]["run_dir"])
    assert candidate == (work_dir / "candidate").resolve()
    assert repository.resolve() not in candidate.parents
    for name in ("checkpoint.pt", "metrics.json", "model.onnx"):
        assert (candidate / name).is_file()
    kept = read_metadata((candidate / "model.onnx").read_bytes())
    assert kept["model_version"] == "0" and kept["model_name"] == "mnist37"


def test_candidate_as_good_as_the_current_is_published_as_the_next(first, tmp_path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(first[0], repository)

    result = retrain(repository, tmp_path / "again", *GOOD)

    assert result.returncode == EXIT_PUBLISHED, result.stderr
    summary = result.summary
    assert (summary["version"], summary["current_version"]) == (2, 1)
    assert summary["candidate_accuracy"] == summary["current_accuracy"]  # same seed, same model
    assert [v.version for v in list_versions(repository, "mnist37")] == [1, 2]


def test_missing_data_is_an_error_with_a_report(tmp_path) -> None:
    repository = tmp_path / "repository"
    repository.mkdir()

    result = retrain(repository, tmp_path / "work", "--data-dir", str(tmp_path / "none"))

    assert result.returncode == EXIT_ERROR
    assert "mnist37-retrain: error: DataError:" in result.stderr
    assert "no such data directory" in result.stderr
    assert result.summary["decision"] == "error" and result.summary["exit_code"] == 1
    assert "no such data directory" in read_report(tmp_path / "work")["reason"]
    assert list(repository.iterdir()) == []


def test_sigterm_ends_the_job_with_a_report_and_publishes_nothing(tmp_path) -> None:
    repository = tmp_path / "repository"
    repository.mkdir()
    work_dir = tmp_path / "work"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST37_")}
    command = [str(RETRAIN), "--repository", str(repository), "--work-dir", str(work_dir)]
    job = subprocess.Popen(
        [*command, "--no-progress", "--epochs", "100000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 60
        while not work_dir.exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the work dir appears once the SIGTERM handler is in place
        assert work_dir.exists(), "the job never started"
        time.sleep(2.0)  # into the 100,000 epochs
        job.send_signal(signal.SIGTERM)
        stdout, stderr = job.communicate(timeout=60)
    finally:
        job.kill()

    assert job.returncode == EXIT_ERROR
    summary = json.loads(stdout.splitlines()[-1])
    assert summary["decision"] == "error" and summary["version"] is None
    assert "terminated by SIGTERM" in read_report(work_dir)["reason"]
    assert "terminated by SIGTERM" in stderr
    assert list_versions(repository, "mnist37") == []


def test_a_version_published_meanwhile_stops_the_publish(first, tmp_path) -> None:
    repository = tmp_path / "repository"
    shutil.copytree(first[0], repository)
    run_dir = first[1] / "candidate"
    model, checkpoint = load_checkpoint(run_dir / "checkpoint.pt")
    record = read_training_record(run_dir, checkpoint)
    candidate = Candidate(run_dir, model, record, export_onnx(model), run_dir / "model.onnx")
    images = load_dataset().test_images
    before = snapshot(repository)

    with pytest.raises(RetrainError, match="changed from None to 1"):
        publish_candidate(candidate, repository, "mnist37", None, images)

    assert snapshot(repository) == before


def test_runs_dir_gives_each_run_a_new_work_dir_that_keeps_the_report(tmp_path) -> None:
    """MNIST37_RUNS_DIR (compose's and the CronJob's /runs volume): the report and the
    rejected candidate land in a new retrain-<UTC>-<random> directory inside it."""
    repository, runs = tmp_path / "repository", tmp_path / "volume" / "runs"
    repository.mkdir()
    earlier = runs / "retrain-20000101T000000Z-earlier"
    earlier.mkdir(parents=True)
    (earlier / REPORT_FILE).write_text("{}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MNIST37_")}
    env["MNIST37_RUNS_DIR"] = str(runs)
    done = subprocess.run(
        [str(RETRAIN), "--repository", str(repository), "--no-progress", *WEAK],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=240,
    )
    assert done.returncode == EXIT_REJECTED, done.stdout + done.stderr
    (work_dir,) = [d for d in runs.iterdir() if d != earlier]
    assert work_dir.name.startswith("retrain-") and work_dir.is_dir()
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["report"] == str((work_dir / REPORT_FILE).resolve())
    report = read_report(work_dir)
    assert report["decision"] == "rejected"
    assert Path(report["candidate"]["run_dir"]) == (work_dir / "candidate").resolve()
    assert (work_dir / "candidate" / "model.onnx").is_file()
    assert (earlier / REPORT_FILE).read_text() == "{}"  # an earlier run is left alone
    assert not (tmp_path / "runs").exists()  # nothing in the default runs/ of the CWD
    assert make_work_dir(None, runs) != make_work_dir(None, runs)


def test_a_runs_dir_inside_the_repository_is_a_usage_error(tmp_path, monkeypatch) -> None:
    for name in [n for n in os.environ if n.startswith("MNIST37_")]:
        monkeypatch.delenv(name)
    repository = tmp_path / "repository"
    repository.mkdir()
    runs = repository / "runs"
    code = main(["--repository", str(repository), "--runs-dir", str(runs), "--no-progress"])
    assert code == EXIT_USAGE
    assert not runs.exists()


@pytest.mark.parametrize("problem", ["inside", "missing", "not empty"])
def test_usage_errors_exit_2_before_any_work(problem, tmp_path, monkeypatch, capsys) -> None:
    for name in [n for n in os.environ if n.startswith("MNIST37_")]:
        monkeypatch.delenv(name)
    repository, work_dir = tmp_path / "repository", tmp_path / "work"
    repository.mkdir()
    if problem == "inside":
        work_dir = repository / "work"
    elif problem == "missing":
        repository = tmp_path / "no-such-repository"
    else:
        work_dir.mkdir()
        (work_dir / "left-over").write_text("x")

    code = main(["--repository", str(repository), "--work-dir", str(work_dir), "--no-progress"])

    assert code == EXIT_USAGE
    assert capsys.readouterr().err.startswith("mnist37-retrain: error: ")
    assert not (work_dir / REPORT_FILE).exists()
    assert not repository.exists() or list(repository.iterdir()) == []
