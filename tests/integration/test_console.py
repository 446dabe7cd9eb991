"""Every console script ends quietly when the reader of its output leaves early (`| head`),
through real pipes."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import tomllib

from helpers import REPO_ROOT, shipped_digit_files

from serving.console import EXIT_STDOUT_CLOSED


def read_one_line_then_close(command: list[str]) -> tuple[bytes, int, bytes]:
    """Run `command` with its stdout a pipe that is closed after one line, like `| head -1`:
    (that line, exit status, everything on stderr)."""
    process = subprocess.Popen(
        command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        line = process.stdout.readline()
        process.stdout.close()
        stderr = process.stderr.read()
        return line, process.wait(timeout=120), stderr
    finally:
        process.kill()
        process.wait()


def test_every_console_script_is_a_console_script_main() -> None:
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert "mnist37-perf-analyzer" in scripts
    for name, target in scripts.items():
        module, attribute = target.split(":")
        main = getattr(importlib.import_module(module), attribute)
        assert getattr(main, "console_script", False), f"{name}: {target} lacks @console_script"


def test_the_client_piped_into_head_ends_quietly(server) -> None:
    images, _ = shipped_digit_files()  # 2,038 lines of output, more than a pipe holds
    command = [sys.executable, "-m", "serving.client", "--server", server.target]
    line, status, stderr = read_one_line_then_close([*command, "classify", str(images)])
    assert line.startswith(b"t10k-images-idx3-ubyte.gz[0]\tdigit=")
    assert stderr == b""
    assert status == EXIT_STDOUT_CLOSED


def test_a_closed_pipe_gets_past_a_commands_own_except_oserror() -> None:
    """A command that catches OSError (to report unreadable files) still stops quietly:
    the closed pipe is not an OSError by the time it reaches the command."""
    program = textwrap.dedent(
        """
        import sys
        from serving.console import console_script

        @console_script
        def main(argv=None):
            try:
                for number in range(1_000_000):
                    print(number)
            except OSError as error:
                print(f"error: {error}", file=sys.stderr)
                return 1
            return 0

        sys.exit(main())
        """
    )
    line, status, stderr = read_one_line_then_close([sys.executable, "-c", program])
    assert line == b"0\n"
    assert (status, stderr) == (EXIT_STDOUT_CLOSED, b"")
