"""What a process tree spends, read from /proc (Linux): CPU seconds and memory.

A server with worker processes is a tree: its CPU time is every live process's
utime + stime, plus cutime + cstime (what its children that ended and were waited for
spent), which counts each process once. Memory is summed over the live processes: VmRSS
now, VmHWM (each process's own peak, so the sum is an upper bound of the tree's peak).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class TreeSample:
    processes: int
    cpu_s: float
    rss_bytes: int
    peak_rss_bytes: int


def _stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (which may hold spaces), or None."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def descendants(root: int) -> list[int]:
    """`root` and every live process below it."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def _memory_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of `pid` in KiB; zeros for a process that is gone or a zombie."""
    rss = hwm = 0
    try:
        lines = (PROC / str(pid) / "status").read_text().splitlines()
    except OSError:
        return 0, 0
    for line in lines:
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def sample_tree(root: int) -> TreeSample:
    """CPU seconds so far and memory now of `root`'s process tree."""
    ticks = rss = hwm = count = 0
    for pid in descendants(root):
        fields = _stat_fields(pid)
        if fields is None:
            continue
        # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
        ticks += sum(int(value) for value in fields[11:15])
        pid_rss, pid_hwm = _memory_kib(pid)
        rss += pid_rss
        hwm += pid_hwm
        count += 1
    return TreeSample(count, ticks / _TICKS, rss * 1024, hwm * 1024)
