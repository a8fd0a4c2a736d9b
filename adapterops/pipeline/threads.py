"""How many cores the compute may use while the read and write threads wait on I/O."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from adapterops.errors import AdapteropsError

CGROUP_CPU_FILES = ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us", "/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the OS has one, capped by a container's CPU quota
    (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us`; `docker --cpus=2` on a 64-core host gives 2, not 64)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota()
    return max(1, min(cores, quota)) if quota is not None else cores


def cgroup_cpu_quota(files: tuple[str, ...] = CGROUP_CPU_FILES) -> int | None:
    """The CPUs a cgroup quota allows (quota / period, rounded up), or None where there is no quota or no file."""
    for path in files:
        try:
            text = Path(path).read_text().split()
            if path.endswith("cpu.max"):  # "max 100000" or "200000 100000"
                quota, period = text[0], text[1]
            else:
                quota, period = text[0], (Path(path).parent / "cpu.cfs_period_us").read_text().split()[0]
        except (OSError, IndexError):
            continue
        if quota == "max" or quota.startswith("-"):
            return None
        try:
            q, p = int(quota), int(period)
        except ValueError:
            return None
        return max(1, -(-q // p)) if q > 0 and p > 0 else None
    return None


@contextmanager
def compute_threads(device: torch.device, threads: int | None = None) -> Iterator[None]:
    """On the CPU, leave one core to the read and write threads (then restore torch's setting); `threads` sets the
    count instead (1 where the caller runs its own worker per core).

    For the blocked Linear merge, whose bits do not depend on the thread count (each output is one dot product
    over the rank), and for the small checks and reads around it; convolutions can pick another algorithm with
    another thread count, so the general merge path goes back to the caller's setting (`caller_threads`), like PEFT.
    """
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, min(previous, usable_cores() - 1)))
    callers = _callers()
    callers.append(previous)
    try:
        yield
    finally:
        callers.pop()
        torch.set_num_threads(previous)


def block_workers(device: torch.device) -> int:
    """Python threads for the blocked Linear merge (each block on one torch thread): every usable core, or
    ADAPTEROPS_MERGE_WORKERS. Its reader and writer threads mostly wait on I/O (io/outfile.py writes with O_DIRECT)."""
    if device.type != "cpu":
        return 1
    return merge_workers_setting() or usable_cores()


def merge_workers_setting() -> int | None:
    """ADAPTEROPS_MERGE_WORKERS as a count ≥ 1, None when unset or empty; anything else is an error."""
    text = os.environ.get("ADAPTEROPS_MERGE_WORKERS", "").strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise AdapteropsError(f"ADAPTEROPS_MERGE_WORKERS must be a whole number ≥ 1, got {text!r}")
    return int(text)


_local = threading.local()


def _callers() -> list[int]:
    """This thread's torch thread counts from before each enclosing compute_threads (outermost first)."""
    if not hasattr(_local, "callers"):
        _local.callers = []
    return _local.callers


@contextmanager
def caller_threads() -> Iterator[None]:
    """Inside compute_threads: the caller's thread count again, for the arithmetic whose bits may depend on it
    (convolutions, the general merge path), as PEFT would run it. Outside: nothing changes."""
    callers = _callers()
    if not callers:
        yield
        return
    now = torch.get_num_threads()
    torch.set_num_threads(callers[0])
    try:
        yield
    finally:
        torch.set_num_threads(now)
