"""scripts/setup-system.sh: what `make test` installs, and how it refuses when it cannot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from helpers import REPO_ROOT

SCRIPT = REPO_ROOT / "scripts" / "setup-system.sh"
# What the script itself needs from PATH; everything else is "missing" in these tests.
BASICS = ("bash", "sort", "printf", "grep", "cat")


def bare_path(directory: Path, uid: int, **fakes: str) -> dict[str, str]:
    """An environment whose PATH holds only the basics, an `id` that reports `uid`, and
    each fake command given as a shell script body."""
    directory.mkdir()
    for name in BASICS:
        (directory / name).symlink_to(shutil.which(name))
    fakes["id"] = f"echo {uid}"
    for name, body in fakes.items():
        script = directory / name
        script.write_text(f"#!/bin/bash\n{body}\n")
        script.chmod(0o755)
    return {"PATH": str(directory), "HOME": str(directory)}


def run_setup(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("bash"), str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def test_as_root_the_missing_packages_are_installed_with_apt_get(tmp_path):
    calls = tmp_path / "apt-calls"
    env = bare_path(tmp_path / "bin", 0, **{"apt-get": f'echo "$*" >> {calls}'})
    completed = run_setup(env)
    assert completed.returncode == 0, completed.stderr
    update, install = calls.read_text().splitlines()
    assert update == "update -q"
    assert install.startswith("install -y -q --no-install-recommends")
    packages = install.split("--no-install-recommends")[1].split()
    assert {
        "prometheus",
        "docker-compose",
        "curl",
        "openssl",
        "chromium",
        "chromium-driver",
    } <= set(packages)
    assert packages.count("prometheus") == 1  # prometheus and promtool: one package


def test_without_root_or_sudo_it_says_what_to_install_and_fails(tmp_path):
    env = bare_path(tmp_path / "bin", 1000)
    completed = run_setup(env)
    assert completed.returncode == 1
    assert "not root and no usable sudo" in completed.stderr
    assert "apt-get install -y --no-install-recommends" in completed.stderr
    assert "prometheus" in completed.stderr


def test_with_passwordless_sudo_it_installs_through_sudo(tmp_path):
    calls = tmp_path / "sudo-calls"
    env = bare_path(tmp_path / "bin", 1000, sudo=f'echo "$*" >> {calls}', **{"apt-get": "exit 0"})
    completed = run_setup(env)
    assert completed.returncode == 0, completed.stderr
    lines = calls.read_text().splitlines()
    assert lines[0] == "-n true" and lines[1] == "apt-get update -q"
    assert lines[2].startswith("apt-get install")


def test_on_this_machine_nothing_is_missing_after_make_test_set_it_up():
    completed = run_setup({**os.environ})
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout == ""  # quiet when everything is there
