"""`--workers`: its values, `auto`'s resolution from the affinity mask and the cgroup v2
CPU quota (fake cgroup files), and what a worker inherits from the supervisor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from serving.config import ServerConfig, load_config
from serving.cpus import available_cpus, cgroup_cpu_quota, worker_count
from serving.logs import JsonFormatter, TextFormatter
from serving.workers import decode_config, encode_config


def fake_cgroup(tmp_path: Path, path: str, quotas: dict[str, str]) -> tuple[Path, Path]:
    """A /proc/self/cgroup naming `path` and a cgroup root whose directories (relative to
    it, "" for the root) hold the given cpu.max contents."""
    root = tmp_path / "cgroup"
    (root / path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for directory, cpu_max in quotas.items():
        (root / directory).mkdir(parents=True, exist_ok=True)
        (root / directory / "cpu.max").write_text(cpu_max + "\n")
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"12:memory:/ignored-v1\n0::{path}\n")
    return proc, root


@pytest.mark.parametrize(
    ("quotas", "expected"),
    [
        ({}, None),  # no cpu.max anywhere (cgroup v1, or the root cgroup)
        ({"kubepods/pod1": "max 100000"}, None),  # no quota
        ({"kubepods/pod1": "200000 100000"}, 2),
        ({"kubepods/pod1": "150000 100000"}, 2),  # 1.5 cores' worth: rounded up
        ({"kubepods/pod1": "50000 100000"}, 1),  # half a core is still one worker
        ({"kubepods/pod1": "max 100000", "kubepods": "300000 100000"}, 3),  # a parent's
        ({"kubepods/pod1": "800000 100000", "kubepods": "300000 100000"}, 3),  # the smaller
        ({"kubepods/pod1": "garbage"}, None),
    ],
)
def test_the_cgroup_quota_is_the_smallest_up_the_tree(tmp_path, quotas, expected):
    proc, root = fake_cgroup(tmp_path, "/kubepods/pod1", quotas)
    assert cgroup_cpu_quota(proc, root) == expected


def test_auto_is_the_affinity_mask_capped_by_the_quota(tmp_path):
    proc, root = fake_cgroup(tmp_path, "/container", {"container": "200000 100000"})
    assert available_cpus({0, 1, 2, 3, 4, 5, 6, 7}, proc, root) == 2  # --cpus 2 on 8 cores
    assert available_cpus({3}, proc, root) == 1  # pinned to one core
    unlimited, root = fake_cgroup(tmp_path / "free", "/", {"": "max 100000"})
    assert available_cpus({0, 1, 2}, unlimited, root) == 3
    assert available_cpus({0, 1}, tmp_path / "no-such-file", root) == 2


def test_auto_on_this_machine_is_at_most_its_affinity():
    import os

    assert 1 <= worker_count("auto") <= len(os.sched_getaffinity(0))
    assert worker_count("3") == 3


def test_workers_takes_a_positive_number_or_auto(capsys):
    assert load_config([]).workers == "1"
    assert load_config(["--workers", "4"]).workers == "4"
    assert load_config(["--workers", "AUTO"]).workers == "auto"
    assert load_config([], {"MNIST37_WORKERS": "auto"}).workers == "auto"
    assert load_config(["--workers", "2"], {"MNIST37_WORKERS": "auto"}).workers == "2"
    for bad in ("0", "-1", "two", "1.5"):
        with pytest.raises(SystemExit):
            load_config(["--workers", bad])
        assert "expected a positive number or auto" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_config([], {"MNIST37_WORKERS": "many"})
    assert "MNIST37_WORKERS='many'" in capsys.readouterr().err


def test_a_worker_gets_the_supervisors_config_whole(tmp_path):
    config = ServerConfig(
        repository=tmp_path / "repo",
        tls_cert=tmp_path / "cert.pem",
        protect_health=True,
        idle_timeout=12.5,
        workers="auto",
    )
    text = encode_config(config)
    assert json.loads(text)["repository"] == str(tmp_path / "repo")
    assert decode_config(text) == config
    assert isinstance(decode_config(text).tls_cert, Path)


def test_a_workers_log_lines_name_it():
    record = logging.LogRecord("serving", logging.INFO, __file__, 1, "hello", (), None)
    entry = json.loads(JsonFormatter(worker=1).format(record))
    assert entry["worker"] == 1 and entry["pid"] == record.process
    assert "worker" not in json.loads(JsonFormatter().format(record))
    assert f"worker 1 pid {record.process} serving: hello" in TextFormatter(worker=1).format(record)
    assert "worker" not in TextFormatter().format(record)
