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
    """Append one item: a tensor's bytes, or a byte range copied by the kernel. A shard whose last tensor this is
    is closed at once (its buffer freed), not at the end."""
    if isinstance(item, ByteRange):
        n = writer.copy_range(name, item.dtype, item.shape, item.path, item.begin)
    else:
        n = writer.write(name, item)
    if writer.complete:
        writer.close()
    return n


def prefetched(jobs: list[Job], read: Callable[[Job], torch.Tensor]) -> Iterator[tuple[Job, torch.Tensor]]:
    """Yield (job, read(job)) in order, reading the next job's tensor in a background thread meanwhile."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-read") as reader:
        pending = reader.submit(read, jobs[0]) if jobs else None
        for n, job in enumerate(jobs):
            source = pending.result()
            pending = reader.submit(read, jobs[n + 1]) if n + 1 < len(jobs) else None
            yield job, source


class Buffers:
    """Output buffers handed back once written, so that the next output tensor reuses one.

    A fresh tensor of tens of MB is pages the kernel must fault in and zero, then unmap once written: a tenth of a
    merge's compute thread. `empty` gives a tensor in a free buffer big enough (the smallest such), or a new one;
    `release`, called by `write_shards` once a tensor's bytes are in the file, frees its buffer again. A tensor that
    is never released is simply never reused. Used from one thread (the one that drives `write_shards`).
    """

    def __init__(self, keep: int = 1):
        self.keep = keep  # free buffers kept: one is enough (two are lent at most: the one being written, the one computed)
        self._free: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous CPU tensor of `shape` and `dtype`, in a reused buffer when one fits."""
        nbytes = max(1, torch.Size(shape).numel() * dtype.itemsize)
        fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]  # _free is sorted by size
        if fits:
            buf = self._free.pop(fits[0])
        else:
            buf = torch.empty(nbytes, dtype=torch.uint8)
        self._lent[buf.data_ptr()] = buf
        return buf[: torch.Size(shape).numel() * dtype.itemsize].view(dtype).view(shape)

    def release(self, item: object) -> None:
        """`item` is written: its buffer, if it is one of ours, is free again (the largest `keep` are kept)."""
        if not isinstance(item, torch.Tensor):
            return
        buf = self._lent.pop(item.data_ptr(), None)
        if buf is not None:
            self._free.append(buf)
            self._free.sort(key=torch.Tensor.numel)
            del self._free[: -self.keep]


def progress(iterable=None, *, total: int, unit: str, desc: str, quiet: bool):
    """A progress bar on stderr, only when stderr is a terminal: CI logs get no `merge: 0%|` fragments."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, unit=unit, unit_scale=unit == "B", desc=desc, file=sys.stderr, leave=False,
                disable=quiet or not sys.stderr.isatty())


def write_shards(
    out: Path, shards: list[tuple[str, list[TensorSpec]]], items: Iterable[tuple[str, torch.Tensor | ByteRange]], *, quiet: bool, desc: str,
    buffers: Buffers | None = None,
) -> None:
    """Write the (name, tensor) items, which come in shard order, into their shard files in a background thread.

    An item may be a `ByteRange` instead of a tensor: bytes the output shares with an input go file to file. Each
    item, once written, is released to `buffers` (when given) for a later item to reuse.
    """
    shard_of = {spec.name: name for name, specs in shards for spec in specs}
    total = sum(s.nbytes for _, specs in shards for s in specs if s.shape is not None)
    done = 0
    writers: dict[str, SafetensorsWriter] = {}
    try:
        for name, specs in shards:
            writers[name] = SafetensorsWriter(out / name, specs, {"format": "pt"})
        with progress(total=total, unit="B", desc=desc, quiet=quiet) as bar, \
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-write") as wpool:
            def finish(written: tuple) -> int:  # wait for an item's write; its buffer is free again
                n = written[0].result()
                bar.update(n)
                if buffers is not None:
                    buffers.release(written[1])
                return n

            written = None  # (future, item) of the item being written while the next one is computed
            for name, tensor in items:
                if written is not None:
                    done += finish(written)
                written = (wpool.submit(_write, writers[shard_of[name]], name, tensor), tensor)
            if written is not None:
                done += finish(written)
        for w in writers.values():
            w.close()
        return done
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
