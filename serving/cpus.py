"""How many cores this process may use, for `--workers auto`.

Not `os.cpu_count()`, which counts the machine's cores: a container limited to 2 CPUs on
a 64-core node would start 64 workers. Two limits apply, and the smaller one wins:

- the CPU affinity mask (`os.sched_getaffinity`: taskset, cpusets, Kubernetes' static CPU
  manager), which says on which cores the process may run;
- the cgroup v2 CPU quota (`cpu.max`, "QUOTA PERIOD" in microseconds, or "max QUOTA" for
  none: Docker's `--cpus`, Kubernetes' CPU limit), which says how much CPU time it gets:
  QUOTA/PERIOD cores' worth, rounded up. The cgroup is the process's own
  (`/proc/self/cgroup`, line `0::PATH`) and each of its ancestors up to the root, since a
  parent's quota limits its children too. cgroup v1's quota files are not read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

from serving.config import AUTO_WORKERS

PROC_SELF_CGROUP = Path("/proc/self/cgroup")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def worker_count(workers: str) -> int:
    """`--workers`' value as a number of processes: itself, or for `auto` the cores this
    process may use (`available_cpus`)."""
    return available_cpus() if workers == AUTO_WORKERS else int(workers)


def available_cpus(
    affinity: set[int] | None = None,
    proc_self_cgroup: Path = PROC_SELF_CGROUP,
    cgroup_root: Path = CGROUP_ROOT,
) -> int:
    """The cores this process may use: its affinity mask's (`affinity`, read from the
    process when None), capped by its cgroup's CPU quota when there is one; at least 1."""
    cores = len(os.sched_getaffinity(0) if affinity is None else affinity)
    quota = cgroup_cpu_quota(proc_self_cgroup, cgroup_root)
    return max(1, min(cores, quota) if quota is not None else cores)


def cgroup_cpu_quota(
    proc_self_cgroup: Path = PROC_SELF_CGROUP, cgroup_root: Path = CGROUP_ROOT
) -> int | None:
    """The smallest CPU quota, in whole cores rounded up, of this process's cgroup v2 and
    its ancestors; None when none has one (no cgroup v2, or `max` all the way up)."""
    quotas = [
        quota
        for directory in _cgroup_and_ancestors(proc_self_cgroup, cgroup_root)
        if (quota := _quota_cores(directory / "cpu.max")) is not None
    ]
    return min(quotas, default=None)


def _cgroup_and_ancestors(proc_self_cgroup: Path, cgroup_root: Path) -> Iterator[Path]:
    """The process's cgroup v2 directory, then its parents up to `cgroup_root`."""
    try:
        lines = proc_self_cgroup.read_text().splitlines()
    except OSError:
        return
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy != "0" or controllers:  # cgroup v2's line is "0::PATH"
            continue
        directory = cgroup_root / path.lstrip("/")
        while True:
            yield directory
            if directory == cgroup_root or cgroup_root not in directory.parents:
                return
            directory = directory.parent


def _quota_cores(cpu_max: Path) -> int | None:
    """`cpu.max`'s quota in whole cores, rounded up; None for `max`, no file or nonsense."""
    try:
        quota, period = cpu_max.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        cores = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return max(1, math.ceil(cores)) if cores > 0 else None
