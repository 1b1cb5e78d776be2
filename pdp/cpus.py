"""How many cores this process may use: ``--processes auto``.

Two limits apply and the smaller wins: the CPUs the scheduler lets the
process run on (``os.sched_getaffinity``: taskset, cpusets) and the CPU time
its cgroup may take per period (a Kubernetes CPU limit is a CFS quota, not an
affinity: a pod limited to 2 CPUs on a 64-core node still sees 64 CPUs).
cgroup v2 writes the quota as ``cpu.max`` (``"200000 100000"`` or ``"max
100000"``); cgroup v1 as ``cpu.cfs_quota_us`` (``-1`` for none) and
``cpu.cfs_period_us``. A fractional quota rounds up (1.5 CPUs: 2 workers, each
throttled a little) and never below 1.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_quota", "parse_cfs", "parse_cpu_max", "usable_cpus"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def parse_cpu_max(text: str) -> float | None:
    """CPUs allowed by a cgroup v2 ``cpu.max`` (``QUOTA PERIOD``); None for ``max``.

    :raises ValueError: the text is not ``QUOTA PERIOD`` with a positive period.
    """
    parts = text.split()
    if len(parts) != 2:
        raise ValueError(f"cpu.max {text.strip()!r} is not 'QUOTA PERIOD'")
    quota, period = parts
    if not period.isdigit() or int(period) == 0:
        raise ValueError(f"cpu.max period {period!r} is not a positive integer")
    if quota == "max":
        return None
    if not quota.isdigit() or int(quota) == 0:
        raise ValueError(f"cpu.max quota {quota!r} is neither 'max' nor a positive integer")
    return int(quota) / int(period)


def parse_cfs(quota_text: str, period_text: str) -> float | None:
    """CPUs allowed by cgroup v1 ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us``; None for ``-1``.

    :raises ValueError: either is not an integer, or the period is not positive.
    """
    try:
        quota, period = int(quota_text.strip()), int(period_text.strip())
    except ValueError:
        shown = f"{quota_text.strip()!r} / period {period_text.strip()!r}"
        raise ValueError(f"cfs quota {shown} are not integers") from None
    if period <= 0:
        raise ValueError(f"cfs period {period} is not positive")
    return None if quota <= 0 else quota / period


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """controller ("" for the v2 unified hierarchy) -> this process's cgroup path."""
    paths: dict[str, str] = {}
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return paths
    for line in lines:
        _, controllers, path = [*line.split(":", 2), "", ""][:3]
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _ancestors(base: Path, path: str) -> list[Path]:
    """The cgroup directory of ``path`` under ``base`` and every parent up to ``base``:
    a limit set on a parent (the pod) binds its children (the container) too."""
    parts = [part for part in path.split("/") if part and part != ".."]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The tightest CPU quota over this process's cgroup and its parents, v2 or v1; None: no quota.

    Unreadable or malformed files are skipped: a quota nobody can read limits nothing pdp can know.
    """
    own = _own_cgroups(proc_cgroup)
    found: list[float] = []
    if (root / "cgroup.controllers").exists():  # v2
        for directory in _ancestors(root, own.get("", "/")):
            try:
                quota = parse_cpu_max((directory / "cpu.max").read_text())
            except (OSError, ValueError):
                continue
            if quota is not None:
                found.append(quota)
    else:  # v1: the cpu controller's own mount (cpu,cpuacct or cpu)
        for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
            base = root / mount
            if not base.is_dir():
                continue
            for directory in _ancestors(base, own.get("cpu", own.get("cpu,cpuacct", "/"))):
                try:
                    quota = parse_cfs(
                        (directory / "cpu.cfs_quota_us").read_text(), (directory / "cpu.cfs_period_us").read_text()
                    )
                except (OSError, ValueError):
                    continue
                if quota is not None:
                    found.append(quota)
            break
    return min(found) if found else None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """The cores this process may use: its affinity, capped by its cgroup's quota (rounded up), at least 1."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        affinity = os.cpu_count() or 1
    quota = cgroup_quota(root, proc_cgroup)
    if quota is not None:
        affinity = min(affinity, math.ceil(quota))
    return max(1, affinity)
