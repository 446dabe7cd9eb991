"""The in-process reference: what onnxruntime alone does with the same model and batch.

`session.run` in a loop on ready-made images, no server, no copies, no network: the
ceiling a server's images/s is compared with. Two sessions: one thread (mnist37's
default `--intra-op-threads 1`) and onnxruntime's default options (a thread per core).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from serving.contract import IMAGE_SIDE, IMAGES, OUTPUT_NAMES

THREADINGS = ("single thread", "onnxruntime default")


@dataclass(frozen=True)
class InProcess:
    threading: str
    batch: int
    runs: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.runs * self.batch / self.seconds

    @property
    def run_us(self) -> float:
        return self.seconds / self.runs * 1e6


def _session(model: Path, threading: str):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threading == "single thread":
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def measure_in_process(model: Path, batches: list[int], seconds: float) -> list[InProcess]:
    """images/s of `session.run` for each batch and threading, each timed for `seconds`."""
    results = []
    generator = np.random.default_rng(0)
    for threading in THREADINGS:
        session = _session(model, threading)
        for batch in batches:
            images = generator.integers(0, 256, (batch, IMAGE_SIDE, IMAGE_SIDE), dtype=np.uint8)
            feed = {IMAGES.name: images}
            outputs = list(OUTPUT_NAMES)
            for _ in range(3):  # first runs allocate
                session.run(outputs, feed)
            runs = 0
            start = time.perf_counter()
            deadline = start + seconds
            while True:
                session.run(outputs, feed)
                runs += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            results.append(InProcess(threading, batch, runs, now - start))
    return results
