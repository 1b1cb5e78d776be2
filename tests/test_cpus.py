"""``--processes auto``: the cores a process may use, from its affinity and its cgroup's CPU quota."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pdp.config import ConfigError, resolve
from pdp.cpus import cgroup_quota, parse_cfs, parse_cpu_max, usable_cpus


@pytest.mark.parametrize(
    ("text", "cpus"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("150000 100000", 1.5), ("50000 100000\n", 0.5)],
)
def test_cgroup_v2_cpu_max(text: str, cpus: float | None) -> None:
    assert parse_cpu_max(text) == cpus


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "is not 'QUOTA PERIOD'"), ("max", "is not 'QUOTA PERIOD'"), ("100 0", "period '0'"), ("x 100", "quota 'x'")],
)
def test_cgroup_v2_cpu_max_refuses_what_it_cannot_read(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_cpu_max(text)


@pytest.mark.parametrize(
    ("quota", "period", "cpus"), [("-1\n", "100000\n", None), ("300000\n", "100000\n", 3.0), ("25000", "100000", 0.25)]
)
def test_cgroup_v1_cfs_quota(quota: str, period: str, cpus: float | None) -> None:
    assert parse_cfs(quota, period) == cpus


def test_cgroup_v1_cfs_quota_refuses_what_it_cannot_read() -> None:
    with pytest.raises(ValueError, match="not integers"):
        parse_cfs("lots", "100000")
    with pytest.raises(ValueError, match="period 0 is not positive"):
        parse_cfs("1000", "0")


def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_tightest_quota_of_the_cgroup_and_its_parents_wins_v2(tmp_path: Path) -> None:
    # A pod limit on the parent binds its container; an unlimited container does not lift it.
    root = tmp_path / "cgroup"
    _tree(
        root,
        {
            "cgroup.controllers": "cpu memory\n",
            "cpu.max": "max 100000\n",
            "kubepods/pod1/cpu.max": "150000 100000\n",
            "kubepods/pod1/ctr/cpu.max": "max 100000\n",
        },
    )
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/kubepods/pod1/ctr\n")
    assert cgroup_quota(root, proc) == 1.5
    assert usable_cpus(root, proc) == min(len(os.sched_getaffinity(0)), 2)
    proc.write_text("0::/\n")
    assert cgroup_quota(root, proc) is None


def test_the_quota_of_cgroup_v1s_cpu_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _tree(
        root,
        {
            "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
            "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
        },
    )
    proc = tmp_path / "proc-cgroup"
    proc.write_text("12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    assert cgroup_quota(root, proc) == 0.5
    assert usable_cpus(root, proc) == 1  # half a CPU is still one worker


def test_unreadable_or_malformed_quota_files_limit_nothing(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    _tree(root, {"cgroup.controllers": "cpu\n", "cpu.max": "garbage\n"})
    assert cgroup_quota(root, tmp_path / "missing") is None


def _real_quota() -> float | None:
    """This machine's own quota, read from its real files without pdp.cpus' walk."""
    base = Path("/sys/fs/cgroup")
    own = {line.split(":", 2)[1]: line.split(":", 2)[2] for line in Path("/proc/self/cgroup").read_text().splitlines()}
    if (base / "cgroup.controllers").exists():
        directory = base / own[""].lstrip("/")
        cpu_max = (directory / "cpu.max").read_text().split() if (directory / "cpu.max").exists() else ["max"]
        return None if cpu_max[0] == "max" else int(cpu_max[0]) / int(cpu_max[1])
    for mount, key in (("cpu,cpuacct", "cpu,cpuacct"), ("cpu", "cpu")):
        if key in own and (base / mount).is_dir():
            directory = base / mount / own[key].lstrip("/")
            quota = int((directory / "cpu.cfs_quota_us").read_text())
            return None if quota <= 0 else quota / int((directory / "cpu.cfs_period_us").read_text())
    return None


def test_usable_cpus_on_this_machine_reads_its_real_files() -> None:
    quota = _real_quota()
    expected = len(os.sched_getaffinity(0))
    if quota is not None:
        expected = min(expected, math.ceil(quota))
    assert usable_cpus() == expected
    assert cgroup_quota() == quota


def test_auto_follows_the_affinity_it_is_given() -> None:
    # A real process pinned to one CPU (as taskset does) resolves auto to 1.
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from pdp.cpus import usable_cpus; print(usable_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"


def test_processes_setting_takes_a_count_or_auto() -> None:
    assert resolve({}).processes == 1
    assert resolve({"processes": "3"}).processes == 3
    assert resolve({}, {"PDP_PROCESSES": "auto"}).processes == usable_cpus()
    with pytest.raises(ConfigError, match="--processes: 0 is not a positive integer"):
        resolve({"processes": "0"})
    with pytest.raises(ConfigError, match="PDP_PROCESSES: 'many' is not an integer"):
        resolve({}, {"PDP_PROCESSES": "many"})
