"""Independent pieces of work shared by a few Python threads (torch and NumPy release the GIL in their kernels)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

T = TypeVar("T")


def share(work: Callable[[Iterator[int]], None], count: int, workers: int) -> None:
    """Run `work(items)` on `workers` threads (the caller's among them) over one shared iterator of 0..count-1.

    Each thread takes the next index when it is free, so a descheduled thread only leaves its share to the others;
    which thread does which index never changes the result as long as each index's work is independent of the
    others. Once any thread raises, the others take no new index; the first error (a KeyboardInterrupt before any
    other) is raised here, once every thread has stopped. Each new thread runs torch at the caller's thread count:
    a new thread's OpenMP/MKL count is otherwise the machine's, so a reduction (a BLAS dot) would sum in another
    order than on the caller's thread.
    """
    items = iter(range(count))  # next() on it is atomic under the GIL
    if workers < 2 or count < 2:
        work(items)
        return
    errors: list[BaseException] = []
    threads, caller = torch.get_num_threads(), threading.current_thread()

    def taken() -> Iterator[int]:  # the shared indices, until any thread has failed (or was interrupted)
        for i in items:
            if errors:
                return
            yield i

    def guarded() -> None:
        try:
            if threading.current_thread() is not caller:
                torch.set_num_threads(threads)
            work(taken())
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(exc)

    others = [threading.Thread(target=guarded, daemon=True) for _ in range(min(workers, count) - 1)]
    for t in others:
        t.start()
    guarded()
    for t in others:
        t.join()
    if errors:  # a Ctrl-C wins over the errors it may have caused elsewhere
        raise next((e for e in errors if isinstance(e, KeyboardInterrupt)), errors[0])


def map_indexed(fn: Callable[[int], T], count: int, workers: int) -> list[T]:
    """[fn(0), …, fn(count − 1)] in that order, computed by `share`."""
    results: list = [None] * count

    def work(items: Iterator[int]) -> None:
        for i in items:
            results[i] = fn(i)

    share(work, count, workers)
    return results
