"""The streaming pipeline every checkpoint command uses: read ahead, compute, write behind.

Three stages overlap (file I/O and torch kernels release the GIL): reading the next source tensor, computing
this one, writing the previous one. At most one tensor waits in each stage, so memory stays near a few tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import torch

from adapterops.io.safetensors_io import SafetensorsWriter, TensorSpec

Job = TypeVar("Job")


def prefetched(jobs: list[Job], read: Callable[[Job], torch.Tensor]) -> Iterator[tuple[Job, torch.Tensor]]:
    """Yield (job, read(job)) in order, reading the next job's tensor in a background thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-read") as reader:
        pending = reader.submit(read, jobs[0]) if jobs else None
        for n, job in enumerate(jobs):
            source = pending.result()
            pending = reader.submit(read, jobs[n + 1]) if n + 1 < len(jobs) else None
            yield job, source


def progress(iterable=None, *, total: int, unit: str, desc: str, quiet: bool):
    """A progress bar on stderr, only when stderr is a terminal: CI logs get no `merge: 0%|` fragments."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, unit=unit, unit_scale=unit == "B", desc=desc, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def write_shards(
    out: Path, shards: list[tuple[str, list[TensorSpec]]], items: Iterable[tuple[str, torch.Tensor]], *, quiet: bool, desc: str
) -> None:
    """Write the (name, tensor) items, which come in shard order, into their shard files in a background thread."""
    writers = {name: SafetensorsWriter(out / name, specs, {"format": "pt"}) for name, specs in shards}
    shard_of = {spec.name: name for name, specs in shards for spec in specs}
    total = sum(s.nbytes for _, specs in shards for s in specs if s.shape is not None)
    done = 0
    try:
        with progress(total=total, unit="B", desc=desc, quiet=quiet) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-write") as wpool:
            written = None
            for name, tensor in items:
                if written is not None:
                    done += written.result()
                    bar.update(written.result())
                written = wpool.submit(writers[shard_of[name]].write, name, tensor)
            if written is not None:
                done += written.result()
                bar.update(written.result())
        for w in writers.values():
            w.close()
        return done
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
