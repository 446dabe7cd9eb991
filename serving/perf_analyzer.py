"""`mnist37-perf-analyzer`: Triton's perf_analyzer, the one bundled with tritonclient 2.51,
ready to run against mnist37-serve. Every argument goes to perf_analyzer unchanged:

    mnist37-perf-analyzer -m mnist37 -i grpc -u 127.0.0.1:8001 -b 8 --concurrency-range 4

The binary links libcudart.so.12 even for CPU-only use, which pip's
nvidia-cuda-runtime-cu12 installs where the loader does not look, and libb64.so.0d, which
the Debian package libb64-0d provides. This puts the first on LD_LIBRARY_PATH, says what
to install when a library is missing, and then execs perf_analyzer. `make bench` uses
the same functions.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path

from serving.console import console_script

DISTRIBUTION = "tritonclient"
BINARY = "perf_analyzer"
CUDA_RUNTIME_MODULE = "nvidia.cuda_runtime"
# What to install for each library perf_analyzer 2.51 links that a machine may lack.
LIBRARY_HINTS = {
    "libcudart.so.12": "pip install nvidia-cuda-runtime-cu12 (in mnist37's dev extra)",
    "libb64.so.0d": "apt-get install libb64-0d (`make system` installs it)",
}


class PerfAnalyzerUnavailable(Exception):
    """perf_analyzer is not installed or cannot start here; the message says what to do."""


def find_perf_analyzer(distribution: str = DISTRIBUTION) -> Path:
    """The perf_analyzer binary that `distribution`'s wheel installed (into the
    environment's bin/, as a data file of the wheel)."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        raise PerfAnalyzerUnavailable(
            f"{distribution} is not installed, and perf_analyzer comes with it: "
            "pip install -e '.[dev]' (tritonclient[grpc,http]==2.51.0)"
        ) from None
    for file in dist.files or ():
        path = Path(dist.locate_file(file))
        if file.name == BINARY and path.is_file():
            return path.resolve()
    raise PerfAnalyzerUnavailable(
        f"{distribution} {dist.version} installed no {BINARY} (2.51.0's Linux wheel has one)"
    )


def perf_analyzer_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (os.environ) with nvidia-cuda-runtime-cu12's lib/ first on
    LD_LIBRARY_PATH, for libcudart.so.12."""
    env = dict(os.environ if environ is None else environ)
    spec = importlib.util.find_spec(CUDA_RUNTIME_MODULE)
    if spec and spec.submodule_search_locations:
        library = Path(next(iter(spec.submodule_search_locations))) / "lib"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            part for part in (str(library), env.get("LD_LIBRARY_PATH", "")) if part
        )
    return env


def missing_libraries(binary: Path, env: Mapping[str, str]) -> list[str]:
    """The shared libraries the loader would not find for `binary` under `env`, as ldd
    lists them; none if there is no ldd to ask (the loader then names what is missing)."""
    ldd = shutil.which("ldd")
    if ldd is None:
        return []
    listing = subprocess.run(
        [ldd, str(binary)], env=dict(env), capture_output=True, text=True, timeout=60
    )
    return re.findall(r"^\s*(\S+) => not found", listing.stdout, re.MULTILINE)


def check_libraries(binary: Path, env: Mapping[str, str]) -> None:
    missing = missing_libraries(binary, env)
    if missing:
        hints = "; ".join(f"{name}: {LIBRARY_HINTS.get(name, 'not found')}" for name in missing)
        raise PerfAnalyzerUnavailable(f"{binary} cannot start, libraries missing: {hints}")


def ready_perf_analyzer() -> tuple[Path, dict[str, str]]:
    """perf_analyzer's path and the environment to run it in, checked to start."""
    binary, env = find_perf_analyzer(), perf_analyzer_env()
    check_libraries(binary, env)
    return binary, env


@console_script
def main(argv: Sequence[str] | None = None) -> int:
    """Exec perf_analyzer with `argv` (sys.argv[1:]): this process becomes it, so never
    call this from a process that must go on (tests run `python -m serving.perf_analyzer`)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    try:
        binary, env = ready_perf_analyzer()
    except PerfAnalyzerUnavailable as error:
        print(f"mnist37-perf-analyzer: error: {error}", file=sys.stderr)
        return 1
    sys.stdout.flush()
    # Python ignores SIGPIPE, and an ignored signal stays ignored across exec: give the C++
    # program the default a shell would (stopped quietly by `| head`), as subprocess does.
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    os.execve(binary, [str(binary), *arguments], env)


if __name__ == "__main__":
    sys.exit(main())
