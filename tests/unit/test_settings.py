"""serving.settings: flags, variables and the flag table from one dataclass, and the
commands built on it."""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import REPO_ROOT

from serving.settings import (
    COMMANDS,
    NON_NEGATIVE,
    POSITIVE,
    Range,
    build_parser,
    command_settings,
    flag_table,
    load,
    redefault,
    setting,
)


@dataclass(frozen=True)
class Example:
    """An example command."""

    prog: ClassVar[str] = "example"

    size: int = setting(3, "how many", allowed=POSITIVE)
    ratio: float = setting(0.5, "a share", allowed=Range(above=0, below=1))
    mode: str = setting("fast", "how to go", choices=("fast", "slow"))
    out: Path | None = setting(None, "where to write", default_help="`runs/<mode>`")
    quiet: bool = setting(False, "say less")


@dataclass(frozen=True)
class Needy(Example):
    """Needs a place."""

    prog: ClassVar[str] = "needy"

    mode: str | None = redefault(Example, "mode", None, "decided at run time")
    place: Path | None = setting(None, "a place | somewhere", required=True)


def usage_error(capsys: pytest.CaptureFixture[str], cls: type, argv: list[str], env: dict) -> str:
    with pytest.raises(SystemExit) as exit_info:
        load(cls, argv, env)
    assert exit_info.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


def test_a_flag_beats_its_variable_which_beats_the_default() -> None:
    assert load(Example, [], {}) == Example()
    env = {"MNIST37_SIZE": "5", "MNIST37_OUT": "/tmp/x", "MNIST37_MODE": "slow"}
    assert load(Example, [], env) == Example(size=5, mode="slow", out=Path("/tmp/x"))
    assert load(Example, ["--size", "7"], env).size == 7
    assert load(Example, ["--out", "here"], {}).out == Path("here")
    assert load(Example, [], {"MNIST37_SIZE": ""}).size == 3  # empty is unset


def test_a_switch_is_a_flag_and_a_variable_of_1_or_0() -> None:
    assert load(Example, ["--quiet"], {}).quiet is True
    for word, value in [("1", True), ("yes", True), ("TRUE", True), ("0", False), ("off", False)]:
        assert load(Example, [], {"MNIST37_QUIET": word}).quiet is value, word
    assert load(Example, ["--quiet"], {"MNIST37_QUIET": "0"}).quiet is True


def test_bad_flags_and_variables_get_the_same_messages(capsys) -> None:
    assert usage_error(capsys, Example, ["--size", "0"], {}).endswith(
        "argument --size: must be positive, got 0"
    )
    assert usage_error(capsys, Example, [], {"MNIST37_SIZE": "0"}).endswith(
        "MNIST37_SIZE='0': must be positive, got 0"
    )
    assert usage_error(capsys, Example, ["--size", "x"], {}).endswith(
        "argument --size: invalid int value: 'x'"
    )
    assert usage_error(capsys, Example, [], {"MNIST37_SIZE": "x"}).endswith(
        "MNIST37_SIZE='x': invalid int value"
    )
    assert usage_error(capsys, Example, ["--ratio", "1"], {}).endswith("must be > 0 and < 1, got 1")
    assert usage_error(capsys, Example, [], {"MNIST37_MODE": "warp"}).endswith(
        "MNIST37_MODE='warp': choose from fast, slow"
    )
    assert "MNIST37_QUIET='maybe': expected one of 1, true" in usage_error(
        capsys, Example, [], {"MNIST37_QUIET": "maybe"}
    )
    assert usage_error(capsys, Example, ["--bogus"], {}).endswith("unrecognized arguments: --bogus")


def test_ranges_say_their_rule() -> None:
    assert POSITIVE.problem(0) == "must be positive" and POSITIVE.problem(0.1) is None
    assert NON_NEGATIVE.problem(-1) == "must be 0 or more" and NON_NEGATIVE.problem(0) is None
    unit = Range(at_least=0, at_most=1)
    assert unit.problem(1) is None and unit.problem(1.5) == "must be >= 0 and <= 1"


def test_a_required_flag_may_come_from_its_variable(capsys) -> None:
    assert "the following arguments are required: --place" in usage_error(capsys, Needy, [], {})
    assert load(Needy, [], {"MNIST37_PLACE": "p"}).place == Path("p")
    assert load(Needy, ["--place", "q"], {}).place == Path("q")


def test_redefault_keeps_the_help_and_choices_but_not_the_default() -> None:
    assert load(Needy, ["--place", "p"], {}).mode is None
    assert load(Needy, ["--place", "p", "--mode", "slow"], {}).mode == "slow"
    row = next(line for line in flag_table(Needy).splitlines() if "`--mode`" in line)
    assert row.endswith("| decided at run time | how to go; one of `fast`, `slow` |")


def test_help_names_each_variable_and_default() -> None:
    text = " ".join(build_parser(Example, {}).format_help().split())
    assert "how many [MNIST37_SIZE; default 3]" in text
    assert "where to write [MNIST37_OUT; default runs/<mode>]" in text  # no Markdown
    assert "say less [MNIST37_QUIET=1; default off]" in text
    assert text.startswith("usage: example ")
    assert "An example command." in text


def test_the_flag_table_has_one_row_per_field_in_markdown() -> None:
    assert flag_table(Needy).splitlines()[:2] == [
        "| flag | variable | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    rows = dict(line.split(" | ", 1) for line in flag_table(Needy).splitlines()[2:])
    assert list(rows) == [
        f"| `--{name}`" for name in ("size", "ratio", "mode", "out", "quiet", "place")
    ]
    assert rows["| `--out`"] == "`MNIST37_OUT` | `runs/<mode>` | where to write |"
    assert rows["| `--quiet`"] == "`MNIST37_QUIET=1` | off | say less |"
    assert rows["| `--place`"] == "`MNIST37_PLACE` | required | a place \\| somewhere |"


def test_a_field_without_help_is_a_mistake() -> None:
    @dataclass(frozen=True)
    class Bare:
        prog: ClassVar[str] = "bare"
        size: int = 3

    with pytest.raises(TypeError, match="size is not a setting"):
        build_parser(Bare)


# --- the commands built on it ------------------------------------------------------------

# Every flag these commands had before they were built on serving.settings: scripts,
# compose files and manifests use them.
EARLIER_FLAGS = {
    "mnist37-serve": {"--repository", "--host", "--grpc-port", "--metrics-port", "--device"},
    "mnist37-train": {
        "--arch",
        "--hidden",
        "--epochs",
        "--lr",
        "--batch-size",
        "--seed",
        "--validation-fraction",
        "--max-shift",
        "--data-dir",
        "--no-progress",
        "--out",
        "--repository",
        "--model-name",
    },
    "mnist37-retrain": {
        "--repository",
        "--model-name",
        "--arch",
        "--hidden",
        "--epochs",
        "--lr",
        "--batch-size",
        "--seed",
        "--validation-fraction",
        "--max-shift",
        "--data-dir",
        "--no-progress",
        "--train-limit",
        "--min-accuracy",
        "--max-regression",
        "--work-dir",
        "--runs-dir",
    },
    "serving.healthcheck": {"--address", "--service", "--timeout"},
}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_command_keeps_its_flags_and_tables_them_all(name: str) -> None:
    cls = command_settings(name)
    assert cls.prog.split()[-1] == name
    parser = build_parser(cls, {"MNIST37_REPOSITORY": "r"})
    flags = {option for action in parser._actions for option in action.option_strings}
    assert EARLIER_FLAGS[name] <= flags
    tabled = set(re.findall(r"^\| `(--[a-z-]+)` \|", flag_table(cls), re.MULTILINE))
    assert tabled == flags - {"-h", "--help"}


def test_python_m_serving_config_prints_each_commands_table() -> None:
    def config(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "serving.config", *args]
        return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)

    assert config().stdout == flag_table(command_settings("mnist37-serve"))
    for name in ("mnist37-train", "serving.healthcheck"):
        done = config(name)
        assert done.returncode == 0, done.stderr
        assert done.stdout == flag_table(command_settings(name))
    unknown = config("mnist37-nope")
    assert unknown.returncode == 2 and "mnist37-train" in unknown.stderr
