"""The model repository: layout, atomic and concurrent publishing, the model card, and
`mnist37-models`.

Torch-free, like the serving side it belongs to.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import REPO_ROOT

from serving.atomic import write_json_atomically
from serving.repository import (
    CARD_FILE,
    CARD_SCHEMA_VERSION,
    EXPLANATION_FILE,
    MODEL_FILE,
    Architecture,
    ExplanationFileRecord,
    ModelCard,
    ModelFileRecord,
    RepositoryError,
    latest_version,
    list_models,
    list_versions,
    publish,
)
from serving.repository_cli import main as models_main
from serving.synthetic import (
    linear_explanation_bytes,
    linear_model_bytes,
    publish_model,
    random_linear_model,
    random_linear_weights,
)


def write_fake_version(staging: Path, version: int, content: bytes = b"onnx bytes") -> None:
    (staging / MODEL_FILE).write_bytes(content)
    card = ModelCard(
        name="mnist37",
        version=version,
        architecture=Architecture("linear"),
        created_at="2025-01-02T03:04:05+00:00",
        metrics={"test": {"accuracy": 0.97}},
        model_file=ModelFileRecord.of(content),
    )
    card.write(staging / CARD_FILE)


def visible_entries(model_dir: Path) -> list[str]:
    return sorted(entry.name for entry in model_dir.iterdir() if not entry.name.startswith("."))


def test_versions_count_up_from_one_per_model(tmp_path):
    assert list_models(tmp_path) == [] and latest_version(tmp_path, "mnist37") is None
    published = [publish(tmp_path, "mnist37", write_fake_version) for _ in range(3)]
    other = publish(tmp_path, "candidate", write_fake_version)
    assert [v.version for v in published] == [1, 2, 3]
    assert other.version == 1
    assert list_models(tmp_path) == ["candidate", "mnist37"]
    assert list_versions(tmp_path, "mnist37") == published
    assert latest_version(tmp_path, "mnist37") == published[-1]
    assert published[1].path == tmp_path / "mnist37" / "2"
    assert published[1].read_card().version == 2
    assert oct(published[0].card_path.stat().st_mode & 0o777) == oct(0o644)
    assert oct(published[0].path.stat().st_mode & 0o777) == oct(0o755)


def test_listing_ignores_what_is_not_a_version(tmp_path):
    publish(tmp_path, "mnist37", write_fake_version)
    model_dir = tmp_path / "mnist37"
    for name in ("0", "007", "\u00b2", ".staging-x", "latest"):
        (model_dir / name).mkdir()
    (model_dir / "9").write_text("a file, not a directory")
    assert [v.version for v in list_versions(tmp_path, "mnist37")] == [1]


def test_a_failed_write_publishes_nothing_and_uses_no_number(tmp_path):
    def fail_midway(staging: Path, version: int) -> None:
        (staging / MODEL_FILE).write_bytes(b"half")
        raise RuntimeError("parity failed")

    with pytest.raises(RuntimeError, match="parity failed"):
        publish(tmp_path, "mnist37", fail_midway)
    with pytest.raises(RepositoryError, match=r"a version needs model\.onnx"):
        publish(tmp_path, "mnist37", lambda staging, version: None)
    assert visible_entries(tmp_path / "mnist37") == []
    assert not list((tmp_path / "mnist37").glob(".staging-*"))
    assert publish(tmp_path, "mnist37", write_fake_version).version == 1


def test_numbers_of_deleted_versions_are_not_reused(tmp_path):
    for _ in range(3):
        publish(tmp_path, "mnist37", write_fake_version)
    for number in ("3", "2"):
        for file in (tmp_path / "mnist37" / number).iterdir():
            file.unlink()
        (tmp_path / "mnist37" / number).rmdir()
    assert publish(tmp_path, "mnist37", write_fake_version).version == 4


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "name with spaces"])
def test_invalid_model_names_are_refused(tmp_path, name):
    with pytest.raises(RepositoryError, match="invalid model name"):
        publish(tmp_path, name, write_fake_version)


PUBLISHER = """
import json, sys, time
from pathlib import Path
from serving.repository import CARD_FILE, MODEL_FILE, publish

repository, token, start_signal, mode = sys.argv[1:]
repository, start_signal = Path(repository), Path(start_signal)

def write_version(staging, version):
    (staging / MODEL_FILE).write_text(token)
    if mode == "hang":
        Path(token).write_text(str(staging))  # tells the test we are midway
        time.sleep(600)
    time.sleep(0.05)  # widen the window in which a second publisher could interfere
    (staging / CARD_FILE).write_text(json.dumps({"token": token, "version": version}))

while not start_signal.exists():
    time.sleep(0.005)
print(publish(repository, "mnist37", write_version).version)
"""


def start_publisher(repository: Path, token: Path, start_signal: Path, mode: str):
    return subprocess.Popen(
        [sys.executable, "-c", PUBLISHER, str(repository), str(token), str(start_signal), mode],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_a_publisher_killed_midway_leaves_no_version(tmp_path):
    repository, midway, go = tmp_path / "repository", tmp_path / "midway", tmp_path / "go"
    go.touch()
    publisher = start_publisher(repository, midway, go, "hang")
    deadline = time.monotonic() + 60
    while not midway.exists():
        assert publisher.poll() is None, publisher.communicate()
        assert time.monotonic() < deadline, "the publisher never reached its write"
        time.sleep(0.01)
    staging = Path(midway.read_text())
    assert (staging / MODEL_FILE).is_file()  # it really died with a half-written version
    publisher.send_signal(signal.SIGKILL)
    publisher.communicate(timeout=30)

    model_dir = repository / "mnist37"
    assert list_versions(repository, "mnist37") == []
    assert visible_entries(model_dir) == []
    assert list_models(repository) == ["mnist37"]

    version = publish(repository, "mnist37", write_fake_version)
    assert version.version == 1
    assert not staging.exists(), "the next publisher should clear the dead one's staging"
    assert visible_entries(model_dir) == ["1"]


def test_concurrent_publishers_get_distinct_complete_versions(tmp_path):
    repository, go = tmp_path / "repository", tmp_path / "go"
    publishers = [
        start_publisher(repository, tmp_path / f"token-{i}", go, "normal") for i in range(4)
    ]
    time.sleep(0.3)  # let them all start and wait on the signal
    go.touch()
    outcomes = [publisher.communicate(timeout=120) for publisher in publishers]
    assert [p.returncode for p in publishers] == [0] * 4, outcomes
    assert sorted(int(stdout) for stdout, _ in outcomes) == [1, 2, 3, 4]

    versions = list_versions(repository, "mnist37")
    assert [v.version for v in versions] == [1, 2, 3, 4]
    tokens = set()
    for version in versions:
        assert sorted(p.name for p in version.path.iterdir()) == [CARD_FILE, MODEL_FILE]
        card = json.loads(version.card_path.read_text())
        assert card["version"] == version.version
        assert version.model_path.read_text() == card["token"]
        tokens.add(card["token"])
    assert len(tokens) == 4


def test_write_json_atomically_leaves_no_temporary_files(tmp_path):
    write_json_atomically(tmp_path / "card.json", {"b": 1, "a": [1, 2]})
    write_json_atomically(tmp_path / "card.json", {"c": 3})
    assert [p.name for p in tmp_path.iterdir()] == ["card.json"]
    assert json.loads((tmp_path / "card.json").read_text()) == {"c": 3}


def test_models_list_prints_a_table(tmp_path, capsys):
    publish(tmp_path, "mnist37", write_fake_version)
    publish(tmp_path, "mnist37", write_fake_version)
    assert models_main(["list", "--repository", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == [
        "MODEL", "VERSION", "ARCH", "TEST", "ACC", "CREATED", "AT", "SHA256", "EXPLAIN", "STATUS"
    ]  # fmt: skip
    sha_prefix = hashlib.sha256(b"onnx bytes").hexdigest()[:12]
    assert lines[2].split() == [
        "mnist37", "2", "linear", "0.9700", "2025-01-02T03:04:05+00:00", sha_prefix, "no", "ok"
    ]  # fmt: skip


def test_models_list_json_flags_damaged_versions(tmp_path, capsys):
    publish(tmp_path, "mnist37", write_fake_version)
    damaged = publish(tmp_path, "mnist37", write_fake_version)
    damaged.model_path.write_bytes(b"tampered")
    publish(tmp_path, "other", write_fake_version)
    assert (
        models_main(["list", "--repository", str(tmp_path), "--model-name", "mnist37", "--json"])
        == 1
    )
    captured = capsys.readouterr()
    listing = json.loads(captured.out)
    assert [(entry["model"], entry["version"]) for entry in listing] == [
        ("mnist37", 1),
        ("mnist37", 2),
    ]
    assert listing[0]["problems"] == [] and listing[0]["test_accuracy"] == 0.97
    assert "the card says" in listing[1]["problems"][0]
    assert "mnist37 v2" in captured.err


def test_models_list_refuses_a_missing_repository(tmp_path, capsys):
    assert models_main(["list", "--repository", str(tmp_path / "nowhere")]) == 2
    assert "no model repository at" in capsys.readouterr().err


def test_the_listing_command_runs_without_torch(tmp_path):
    publish(tmp_path, "mnist37", write_fake_version)
    script = (
        "import sys; from serving.repository_cli import main; code = main(sys.argv[1:]); "
        "assert 'torch' not in sys.modules, 'serving must not import torch'; sys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, "list", "--repository", str(tmp_path)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "mnist37  1" in result.stdout


# A card as training/publish.py writes it (figures shortened).
PUBLISHED_CARD = {
    "schema_version": 1,
    "name": "mnist37",
    "version": 3,
    "architecture": {"name": "mlp", "hidden_units": 30, "parameters": 23581},
    "created_at": "2026-11-29T09:06:11+00:00",
    "published_at": "2026-11-29T09:06:13+00:00",
    "training": {"run_dir": None, "seed": 37, "data_checksums": {"t10k-images-idx3-ubyte": "42"}},
    "metrics": {"test": {"accuracy": 0.98, "count": 2038, "confusion_matrix": [[1, 0], [0, 1]]}},
    "model_file": {"name": "model.onnx", "sha256": "ab" * 32, "bytes": 8944},
    "onnx": {
        "opset": 20,
        "batch_dimension": "N",
        "inputs": [{"name": "images", "datatype": "UINT8", "shape": [-1, 28, 28]}],
        "outputs": [
            {"name": "probability", "datatype": "FP32", "shape": [-1]},
            {"name": "digit", "datatype": "INT64", "shape": [-1]},
        ],
        "metadata": {"model_name": "mnist37", "model_version": "3"},
    },
    "parity": {"tolerance": 1e-05, "digit_mismatches": 0, "checks": []},
    "libraries": {"torch": "2.13.0+cpu", "onnxruntime": "1.32.0"},
}


def test_a_published_card_reads_and_writes_back_byte_for_byte(tmp_path):
    original = tmp_path / "original.json"
    write_json_atomically(original, PUBLISHED_CARD)  # how publishing wrote cards before
    card = ModelCard.read(original)
    assert (card.name, card.version, card.schema_version) == ("mnist37", 3, CARD_SCHEMA_VERSION)
    assert card.architecture == Architecture("mlp", hidden_units=30, parameters=23581)
    assert card.architecture_name == "mlp"
    assert card.test_accuracy == 0.98
    assert card.model_file == ModelFileRecord("ab" * 32, 8944)
    assert card.training["seed"] == 37 and card.onnx["opset"] == 20
    assert not card.synthetic
    rewritten = tmp_path / "rewritten.json"
    card.write(rewritten)
    assert rewritten.read_bytes() == original.read_bytes()
    assert ModelCard.read(rewritten) == card


def test_a_card_with_a_plain_string_architecture_is_read():
    legacy = {"name": "mnist37", "version": 1, "architecture": "linear", "synthetic": True}
    card = ModelCard.from_json(legacy)
    assert card.architecture == Architecture("linear") and card.architecture_name == "linear"
    assert card.synthetic and card.schema_version is None


def test_a_card_missing_optional_fields_reads_them_as_none():
    card = ModelCard.from_json({})
    assert card == ModelCard(schema_version=None)
    assert (card.name, card.version, card.architecture_name, card.test_accuracy) == (None,) * 4
    assert card.model_file is None and card.created_at is None and card.as_json() == {}
    assert ModelCard.from_json({"metrics": {"test": {"loss": 0.1}}}).test_accuracy is None
    assert ModelCard.from_json({"architecture": {"name": "linear"}}).architecture == (
        Architecture("linear")
    )
    assert ModelCard.from_json({"model_file": {"bytes": 3}}).model_file == ModelFileRecord(
        None, 3, MODEL_FILE
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", r"model card .*model\.json is not a JSON object"),
        ('"linear"', "is not a JSON object"),
        ("null", "is not a JSON object"),
        ("{not json", r"cannot read model card .*model\.json"),
        ('{"version": "2"}', 'version is "2", not an integer'),
        ('{"version": true}', "version is true, not an integer"),
        ('{"architecture": 5}', "architecture is 5, not an object or a string"),
        ('{"architecture": {"hidden_units": "30"}}', "architecture.hidden_units is"),
        ('{"metrics": {"test": {"accuracy": "high"}}}', "metrics.test.accuracy is"),
        ('{"metrics": {"test": []}}', "metrics.test is"),
        ('{"model_file": {"sha256": 12}}', "model_file.sha256 is 12, not a string"),
        ('{"training": "yesterday"}', "training is"),
    ],
)
def test_a_malformed_card_is_a_repository_error(tmp_path, content, message):
    path = tmp_path / CARD_FILE
    path.write_text(content)
    with pytest.raises(RepositoryError, match=message):
        ModelCard.read(path)


def test_a_missing_card_is_a_repository_error(tmp_path):
    with pytest.raises(RepositoryError, match="cannot read model card"):
        ModelCard.read(tmp_path / CARD_FILE)


def test_models_list_shows_synthetic_models(tmp_path, capsys):
    version = publish_model(tmp_path, "mnist37", random_linear_model())
    card = version.read_card()
    assert card.synthetic and card.architecture == Architecture("linear", parameters=785)
    assert card.model_file == ModelFileRecord.of(version.model_path.read_bytes())
    assert models_main(["list", "--repository", str(tmp_path)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:3] == ["mnist37", "1", "linear"] and row[-1] == "ok"


def test_models_list_reports_cards_of_older_synthetic_models_without_a_traceback(tmp_path, capsys):
    version = publish_model(tmp_path, "mnist37", random_linear_model())
    # what serving.synthetic wrote before it shared the card writer
    legacy = {"name": "mnist37", "version": 1, "architecture": "linear", "synthetic": True}
    version.card_path.write_text(json.dumps(legacy))
    assert models_main(["list", "--repository", str(tmp_path), "--json"]) == 1
    captured = capsys.readouterr()
    (entry,) = json.loads(captured.out)
    assert entry["architecture"] == "linear" and entry["sha256"] is None
    assert entry["problems"] == [
        f"{version.model_path} has sha256 "
        f"{hashlib.sha256(version.model_path.read_bytes()).hexdigest()}, the card records none"
    ]
    assert "Traceback" not in captured.err


def test_models_list_reports_a_malformed_card_as_damaged(tmp_path, capsys):
    version = publish(tmp_path, "mnist37", write_fake_version)
    version.card_path.write_text('{"architecture": {"name": 7}}')
    assert models_main(["list", "--repository", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert "DAMAGED" in captured.out
    assert "architecture.name is 7, not a string" in captured.err


def publish_explainable(repository: Path, seed: int = 5):
    weights = random_linear_weights(seed)
    return publish_model(
        repository,
        "mnist37",
        linear_model_bytes(*weights),
        explanation=linear_explanation_bytes(*weights),
    )


def test_an_explanation_is_published_with_its_version_and_listed_in_the_card(tmp_path):
    version = publish_explainable(tmp_path)
    assert sorted(p.name for p in version.path.iterdir()) == [
        EXPLANATION_FILE,
        CARD_FILE,
        MODEL_FILE,
    ]
    record = version.read_card().explanation_file
    assert record == ExplanationFileRecord.of(version.explanation_path.read_bytes())
    assert record.name == EXPLANATION_FILE and record.bytes > 0
    assert json.loads(version.card_path.read_text())["explanation_file"] == {
        "name": EXPLANATION_FILE,
        "sha256": record.sha256,
        "bytes": record.bytes,
        "check": None,
    }


def test_an_explanation_record_with_its_check_round_trips(tmp_path):
    check = {"images_compared": 3046, "digit_mismatches": 0, "checks": []}
    record = ExplanationFileRecord.of(b"graph", check)
    assert (record.sha256, record.bytes) == (hashlib.sha256(b"graph").hexdigest(), 5)
    card = replace(ModelCard.from_json(PUBLISHED_CARD), explanation_file=record)
    card.write(tmp_path / CARD_FILE)
    assert ModelCard.read(tmp_path / CARD_FILE) == card
    assert ModelCard.read(tmp_path / CARD_FILE).explanation_file.check == check
    # A card written before explanations (PUBLISHED_CARD) says nothing of one.
    assert ModelCard.from_json(PUBLISHED_CARD).explanation_file is None
    older = ModelCard.from_json({"explanation_file": {"sha256": "ab", "bytes": 3}})
    assert older.explanation_file == ExplanationFileRecord("ab", 3, EXPLANATION_FILE, None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"explanation_file": []}', "explanation_file is"),
        ('{"explanation_file": {"bytes": "3"}}', 'explanation_file.bytes is "3", not an integer'),
        ('{"explanation_file": {"check": 1}}', "explanation_file.check is 1, not an object"),
    ],
)
def test_a_malformed_explanation_record_is_a_repository_error(tmp_path, content, message):
    (tmp_path / CARD_FILE).write_text(content)
    with pytest.raises(RepositoryError, match=message):
        ModelCard.read(tmp_path / CARD_FILE)


def test_models_list_says_which_versions_can_explain(tmp_path, capsys):
    publish_model(tmp_path, "mnist37", random_linear_model())
    publish_explainable(tmp_path)
    assert models_main(["list", "--repository", str(tmp_path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[1], row[-2], row[-1]) for row in rows] == [("1", "no", "ok"), ("2", "yes", "ok")]
    assert models_main(["list", "--repository", str(tmp_path), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [entry["explainable"] for entry in listing] == [False, True]
    assert (
        listing[1]["explanation_sha256"]
        == hashlib.sha256((tmp_path / "mnist37" / "2" / EXPLANATION_FILE).read_bytes()).hexdigest()
    )


def test_models_list_reports_a_damaged_explanation_file(tmp_path, capsys):
    version = publish_explainable(tmp_path)
    version.explanation_path.write_bytes(b"tampered")
    assert models_main(["list", "--repository", str(tmp_path)]) == 1
    captured = capsys.readouterr()
    assert captured.out.splitlines()[1].split()[-2:] == ["yes", "DAMAGED"]
    recorded = version.read_card().explanation_file.sha256
    assert captured.err.splitlines() == [
        f"mnist37-models: mnist37 v1: {version.explanation_path} has sha256 "
        f"{hashlib.sha256(b'tampered').hexdigest()}, the card says {recorded}"
    ]


def test_models_list_reports_an_explanation_file_and_its_record_apart(tmp_path, capsys):
    recorded_only = publish_explainable(tmp_path)
    recorded_only.explanation_path.unlink()
    unrecorded = publish_model(tmp_path, "mnist37", random_linear_model())
    unrecorded.explanation_path.write_bytes(b"graph")
    assert models_main(["list", "--repository", str(tmp_path), "--json"]) == 1
    first, second = json.loads(capsys.readouterr().out)
    assert not first["explainable"] and first["problems"] == [
        f"cannot read {recorded_only.explanation_path}: No such file or directory"
    ]
    assert second["explainable"] and second["problems"] == [
        f"{unrecorded.explanation_path} has sha256 {hashlib.sha256(b'graph').hexdigest()}, "
        "the card records none"
    ]
