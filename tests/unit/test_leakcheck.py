"""The suite fails when a process a test started outlives the session."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from helpers import REPO_ROOT

LEAKY_TEST = """
import subprocess, sys

def test_starts_a_process_and_forgets_it():
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
"""


def pytest_with_leakcheck(test_file: Path) -> subprocess.CompletedProcess[str]:
    """Runs pytest on one file with only the leakcheck plugin."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "leakcheck",
            "-p",
            "no:cacheprovider",
            str(test_file),
        ],
        cwd=test_file.parent,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT / "tests")},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_surviving_child_fails_the_session_and_is_killed(tmp_path):
    (tmp_path / "test_leaky.py").write_text(LEAKY_TEST)
    completed = pytest_with_leakcheck(tmp_path / "test_leaky.py")
    assert completed.returncode == 1, completed.stdout + completed.stderr
    assert "1 passed" in completed.stdout
    assert "outlived them" in completed.stdout and "time.sleep(60)" in completed.stdout
    pid = int(completed.stdout.split("pid ")[1].split(":")[0])
    for _ in range(50):  # killed with SIGKILL: gone, or a zombie of init, within moments
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"pid {pid} still runs")


def test_a_clean_session_passes(tmp_path):
    (tmp_path / "test_clean.py").write_text("def test_nothing():\n    assert True\n")
    completed = pytest_with_leakcheck(tmp_path / "test_clean.py")
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert "outlived" not in completed.stdout
