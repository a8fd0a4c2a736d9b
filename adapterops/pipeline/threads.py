"""How many cores the compute may use while the read and write threads wait on I/O."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def compute_threads(device: torch.device, threads: int | None = None) -> Iterator[None]:
    """On the CPU, leave one core to the read and write threads (then restore torch's setting); `threads` sets the
    count instead (1 where the caller runs its own worker per core).

    Only for the blocked Linear merge, whose bits do not depend on the thread count (each output is one dot
    product over the rank); convolutions can pick another algorithm with another thread count, so they keep the
    caller's setting, like PEFT.
    """
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(threads or max(1, min(previous, usable_cores() - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)
