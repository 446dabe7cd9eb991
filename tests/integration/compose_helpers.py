"""Run docker-compose.yml's services as plain processes, from the file itself.

A service's `entrypoint`, `command` and `environment` are taken as written; only its
container paths are rewritten: each volume's mount point to a host directory (a named
volume to `<volumes>/<name>`, a bind mount to the host directory the test gives for its
source) and the container's own `/tmp` to a directory of its own. So `models:/models` (the
repository) and `runs:/runs` (training run directories) become `<volumes>/models` and
`<volumes>/runs`, shared by every service that mounts them, as in Docker. An absolute path that no
rule maps is an error, so a compose change that the mapping does not cover fails loudly.
Commands resolve `python` and `mnist37-*` in this virtual environment's bin directory.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
VENV_BIN = Path(sys.executable).parent
MODELS_MOUNT = "/models"
RUNS_MOUNT = "/runs"
CONTAINER_TMP = "/tmp"


def load_compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def compose_services() -> dict[str, dict[str, Any]]:
    return load_compose()["services"]


def seconds(duration: str) -> float:
    """A compose duration such as `30s` (the only form these files use)."""
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, f"write durations as <n>s, not {duration!r}"
    return float(match.group(1))


def volume_mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Mount point in the container -> source (a named volume or a `./` host path)."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, mount_point, *_mode = volume.split(":")
        mounts[mount_point] = source
    return mounts


class ContainerPaths:
    """Rewrites the container paths in one service's arguments and variables."""

    def __init__(self, host_paths: Mapping[str, Path]) -> None:
        # Longest mount point first, so that a nested mount wins over its parent.
        self.host_paths = sorted(host_paths.items(), key=lambda item: -len(item[0]))

    @classmethod
    def for_service(
        cls,
        service: Mapping[str, Any],
        volumes_dir: Path,
        container_tmp: Path,
        bind_sources: Mapping[str, Path] | None = None,
    ) -> ContainerPaths:
        bind_sources = bind_sources or {}
        host_paths = {CONTAINER_TMP: container_tmp}
        for mount_point, source in volume_mounts(service).items():
            if source.startswith(("./", "/")):
                assert source in bind_sources, f"no host directory given for {source}"
                host_paths[mount_point] = bind_sources[source]
            else:
                host_paths[mount_point] = volumes_dir / source
        return cls(host_paths)

    def host_path(self, text: str) -> str:
        """`text` with its container path mapped; text that is not a path unchanged."""
        if not text.startswith("/"):
            return text
        for container, host in self.host_paths:
            if text == container or text.startswith(container + "/"):
                return str(host) + text[len(container) :]
        raise AssertionError(f"{text}: no volume or /tmp maps this container path")

    def argument(self, argument: str) -> str:
        """An argument `PATH` or `--flag=PATH` with its path mapped."""
        flag, equals, value = argument.partition("=")
        if equals and flag.startswith("--"):
            return f"{flag}={self.host_path(value)}"
        return self.host_path(argument)

    def arguments(self, arguments: Sequence[str]) -> list[str]:
        return [self.argument(argument) for argument in arguments]


def plain_environment(
    service: Mapping[str, Any], paths: ContainerPaths, overrides: Mapping[str, str] | None = None
) -> dict[str, str]:
    """This process's environment without MNIST37_* variables, the venv's bin first on
    PATH, then the service's `environment` with paths mapped, then `overrides`, each of
    which must replace a variable the service sets."""
    compose_environment: dict[str, str] = service.get("environment", {})
    overrides = overrides or {}
    unknown = set(overrides) - set(compose_environment)
    assert not unknown, f"the service sets no {sorted(unknown)}: nothing to override"
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MNIST37_")}
    inherited["PATH"] = os.pathsep.join([str(VENV_BIN), inherited.get("PATH", "")])
    mapped = {name: paths.host_path(value) for name, value in compose_environment.items()}
    return inherited | mapped | dict(overrides)
