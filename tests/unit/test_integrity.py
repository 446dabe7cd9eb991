"""What is loaded is what was published: the card's sha256, files inside the repository, a
readable card, version numbers in range on every path; messages carry no absolute paths."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from serving.registry import BatchingOptions, load_model_version
from serving.repository import (
    MAX_VERSION,
    ModelFileRecord,
    RepositoryError,
    list_versions,
    parse_version,
    publish,
)
from serving.runtime import RuntimeOptions
from serving.synthetic import publish_model, random_linear_model


@pytest.fixture
def version(tmp_path):
    return publish_model(tmp_path / "repository", "mnist37", random_linear_model(seed=1))


def load(version):
    with ThreadPoolExecutor(1) as executor:
        return load_model_version(version, RuntimeOptions(), BatchingOptions(), executor)


def refusal(version) -> str:
    with pytest.raises(RepositoryError) as refused:
        load(version)
    message = str(refused.value)
    assert str(version.path.parent.parent) not in message, "no absolute path in the reason"
    return message


def test_a_published_version_loads(version):
    assert load(version).card.model_file.sha256


def test_a_model_file_changed_after_publishing_is_refused(version):
    version.model_path.write_bytes(random_linear_model(seed=2))
    assert "differs from the card's" in refusal(version)


def test_a_symbolic_link_out_of_the_repository_is_refused(version, tmp_path):
    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(version.model_path.read_bytes())  # even the very same bytes
    version.model_path.unlink()
    version.model_path.symlink_to(outside)
    assert "leads out of the repository" in refusal(version)


def test_a_link_that_stays_inside_the_repository_is_fine(version):
    inside = version.path / "real.onnx"
    version.model_path.rename(inside)
    version.model_path.symlink_to(inside.name)
    assert load(version).version == version.version


def test_an_unreadable_or_missing_card_is_refused(version):
    version.card_path.write_text("{not json")
    assert "cannot read model card mnist37/1/model.json" in refusal(version)
    version.card_path.unlink()
    assert "No such file" in refusal(version)


def test_a_card_without_a_checksum_or_of_another_version_is_refused(version):
    card = version.read_card()
    replace(card, model_file=ModelFileRecord()).write(version.card_path)
    assert "records no sha256" in refusal(version)
    replace(card, version=9).write(version.card_path)
    assert "version 9's, not 1's" in refusal(version)


@pytest.mark.parametrize(
    "text",
    ["0", "01", "-1", "+1", " 1", "1.0", "\u0661", str(MAX_VERSION + 1), "9" * 1_000_000],
)
def test_version_strings_out_of_range_or_malformed_are_no_version(text):
    assert parse_version(text) is None


def test_the_highest_version_is_still_one():
    assert parse_version(str(MAX_VERSION)) == MAX_VERSION


def test_a_stray_absurd_version_directory_is_neither_listed_nor_in_the_way(version):
    model_dir = version.path.parent
    (model_dir / "99999999999999999999").mkdir()
    (model_dir / str(MAX_VERSION + 1)).mkdir()
    assert [v.version for v in list_versions(model_dir.parent, "mnist37")] == [1]
    following = publish_model(model_dir.parent, "mnist37", random_linear_model(seed=3))
    assert following.version == 2


def test_nothing_is_published_past_the_highest_version(version):
    model_dir = version.path.parent
    (model_dir / str(MAX_VERSION)).mkdir()
    with pytest.raises(RepositoryError, match="highest number there can be"):
        publish(model_dir.parent, "mnist37", lambda staging, number: None)
    (model_dir / str(MAX_VERSION)).rmdir()
    (model_dir / ".highest-version").write_text(json.dumps(MAX_VERSION))
    with pytest.raises(RepositoryError, match="next would pass"):
        publish(model_dir.parent, "mnist37", lambda staging, number: None)
