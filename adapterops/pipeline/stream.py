"""The streaming pipeline every checkpoint command uses: read ahead, compute, write behind.

Three stages overlap (file I/O and torch kernels release the GIL): reading the next source tensor, computing
this one, writing the previous one. At most one tensor waits in each stage, so memory stays near a few tensors.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from adapterops.io.safetensors_io import SafetensorsFile, SafetensorsWriter, TensorSpec

Job = TypeVar("Job")


@dataclass(frozen=True)
class ByteRange:
    """An output tensor that is an input tensor's stored bytes, unchanged: the writer copies them file to file."""

    path: Path
    begin: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def byte_range(source: object, name: str, spec: TensorSpec) -> ByteRange | None:
    """Where `spec`'s bytes already lie in a safetensors input (`source` holds tensor `name`), or None when they
    must be computed (another dtype or shape, or a source that is not a plain safetensors file)."""
    if not isinstance(source, SafetensorsFile):
        return None
    info = source.info(name)
    if info.dtype != spec.dtype or (spec.shape is not None and info.shape != spec.shape) or info.nbytes == 0:
        return None
    return ByteRange(source.path, info.begin, info.dtype, info.shape)


def _write(writer: SafetensorsWriter, name: str, item: torch.Tensor | ByteRange) -> int:
    """Append one item: a tensor's bytes, or a byte range copied by the kernel."""
    if isinstance(item, ByteRange):
        return writer.copy_range(name, item.dtype, item.shape, item.path, item.begin)
    return writer.write(name, item)


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
    out: Path, shards: list[tuple[str, list[TensorSpec]]], items: Iterable[tuple[str, torch.Tensor | ByteRange]], *, quiet: bool, desc: str
) -> None:
    """Write the (name, tensor) items, which come in shard order, into their shard files in a background thread.

    An item may be a `ByteRange` instead of a tensor: bytes the output shares with an input go file to file.
    """
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
                written = wpool.submit(_write, writers[shard_of[name]], name, tensor)
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
