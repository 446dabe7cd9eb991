"""A bounded coverage-guided fuzz run of the decoders (tests/fuzz/fuzz_decoding.py):
libFuzzer exits non-zero, with the crashing input, if any decoder raises anything but its
typed refusal. Long runs: see that file's docstring."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

FUZZER = REPO_ROOT / "tests" / "fuzz" / "fuzz_decoding.py"


def fuzz(tmp_path, *arguments: str) -> subprocess.CompletedProcess[str]:
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    return subprocess.run(
        [sys.executable, str(FUZZER), *arguments, f"-artifact_prefix={tmp_path}/", str(corpus)],
        cwd=REPO_ROOT,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_decoders_survive_a_bounded_fuzz_run(tmp_path):
    completed = fuzz(tmp_path, "-runs=30000", "-max_total_time=60")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "DONE" in completed.stderr
    coverage = int(completed.stderr.rsplit("cov: ", 1)[1].split()[0])
    assert coverage > 200, "the seeds should take the fuzzer past the protobuf parser"


def test_every_seed_decodes_and_an_unexpected_error_escapes_the_harness(monkeypatch):
    harness = runpy.run_path(str(FUZZER), run_name="fuzz_decoding")
    for data in harness["seeds"]():
        harness["one_input"](data)  # valid inputs: no refusal at all

    def broken(*_args, **_kwargs):
        raise TypeError("a decoder bug")

    monkeypatch.setitem(harness["fuzz_classify_request"].__globals__, "decode_images", broken)
    classify_seed = harness["seeds"]()[2]
    with pytest.raises(TypeError):  # what libFuzzer would report as a crash
        harness["one_input"](classify_seed)
