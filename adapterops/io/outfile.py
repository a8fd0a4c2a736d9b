"""The file a writer appends to: large outputs bypass the page cache (O_DIRECT) through two aligned buffers.

A buffered `write()` makes the kernel allocate and fill a page-cache page for every 4 KiB written, on the writer's
CPU time: on our 2-core machine that cost 2–5 CPU seconds per 2.2 GB, more than the merge's arithmetic. With
O_DIRECT the disk reads the bytes straight from our buffer (0.3–0.7 CPU seconds and ~1–1.6 s wall for the same
2.2 GB there; `benchmarks/merge.py` measures both). O_DIRECT wants the buffer, the file offset and the length
aligned, so bytes are gathered into a page-aligned buffer and written in whole buffers (a flusher thread writes
one while the other fills); the last, partial one is padded to the alignment and the file truncated back to its
length. The buffers exist only while a file is being filled: from its first byte to its close.

Where the file system refuses O_DIRECT (tmpfs on older kernels, some FUSE mounts) at open or on a write, the file
falls back to plain writes, with the same bytes. Files under 64 MiB (most adapters, sidecars) always use plain
writes, and `ADAPTEROPS_DIRECT_IO=0` turns direct I/O off (e.g. a slow disk and plenty of free memory, where the page cache
absorbs a whole output faster than the disk takes it).
"""

from __future__ import annotations

import errno
import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from adapterops.errors import AdapteropsError

DIRECT_MIN_BYTES = 64 << 20  # smaller files: plain writes (the buffer and the alignment would cost more than they save)
BUFFER_BYTES = 16 << 20  # one direct write: 16 MiB measured as fast as 32 MiB here, and half the memory
ALIGN = 4096  # covers 512-byte and 4 KiB logical blocks


def direct_io_wanted(nbytes: int) -> bool:
    """Whether a file of about `nbytes` should try O_DIRECT (large, the OS has it, not turned off)."""
    return nbytes >= DIRECT_MIN_BYTES and hasattr(os, "O_DIRECT") and direct_io_setting()


SWITCH = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def direct_io_setting() -> bool:
    """ADAPTEROPS_DIRECT_IO: on when unset or empty; 1/true/yes/on or 0/false/no/off; anything else is an error."""
    text = os.environ.get("ADAPTEROPS_DIRECT_IO", "").strip().lower()
    if not text:
        return True
    if text not in SWITCH:
        raise AdapteropsError(f"ADAPTEROPS_DIRECT_IO must be 0 or 1 (or false/true, no/yes, off/on), got {text!r}")
    return SWITCH[text]


class OutputFile:
    """A new file written front to back (`write`, `copy_from`), whose first bytes may be rewritten at the end (`patch`).

    `direct` asks for O_DIRECT; `self.direct` says whether it is in use. Every OS error is one AdapteropsError
    naming the file; after one, the file can only be aborted.
    """

    def __init__(self, path: Path, direct: bool):
        self.path = path
        self.direct = False  # gathering into the aligned buffers (until the tail is written)
        self.size = 0  # bytes appended so far (the file's length once closed)
        self._fd = -1
        self._maps: list[mmap.mmap] = []  # the two buffers, made at the first byte
        self._fill = 0  # bytes gathered in the current buffer, not yet written
        self._flusher: ThreadPoolExecutor | None = None
        self._pending: Future | None = None  # the other buffer's write, in flight
        self._failed: AdapteropsError | None = None
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        if direct:
            try:
                self._fd = os.open(path, flags | os.O_DIRECT, 0o666)
                self.direct = True
            except OSError as exc:
                if exc.errno != errno.EINVAL:  # EINVAL: this file system has no O_DIRECT; plain open below
                    raise self._error("write", exc) from None
        if self._fd < 0:
            try:
                self._fd = os.open(path, flags, 0o666)
            except OSError as exc:
                raise self._error("write", exc) from None
        self._odirect = self.direct  # the descriptor has O_DIRECT set

    def _error(self, verb: str, exc: OSError) -> AdapteropsError:
        return AdapteropsError(f"cannot {verb}: {exc.strerror or exc}", file=self.path)

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def write(self, data: memoryview) -> None:
        """Append `data` (bytes-like)."""
        self._check()
        if not self.direct:
            self._write_plain(memoryview(data).cast("B"))
            return
        self._buffers()
        src = np.frombuffer(data, dtype=np.uint8)  # numpy copies without holding the GIL; a memoryview slice would
        pos = 0
        while pos < len(src):
            n = min(len(src) - pos, BUFFER_BYTES - self._fill)
            self._buf[self._fill:self._fill + n] = src[pos:pos + n]
            self._fill += n
            pos += n
            if self._fill == BUFFER_BYTES:
                self._flush()
        self.size += len(src)

    def copy_from(self, src: int, source: str | os.PathLike, offset: int, nbytes: int) -> None:
        """Append `nbytes` read from offset `offset` of the open file `src` (named `source`, for errors)."""
        self._check()
        if not self.direct:
            self._copy_plain(src, source, offset, nbytes)
            return
        self._buffers()
        left = nbytes
        while left:
            want = min(left, BUFFER_BYTES - self._fill)
            try:
                n = os.preadv(src, [self._buf[self._fill:self._fill + want]], offset)
            except OSError as exc:
                raise self._failing(AdapteropsError(f"cannot read: {exc.strerror or exc}", file=source)) from None
            if n == 0:
                raise self._failing(AdapteropsError(f"file is truncated: {left} bytes of tensor data missing", file=source))
            self._fill += n
            offset += n
            left -= n
            self.size += n
            if self._fill == BUFFER_BYTES:
                self._flush()

    def patch(self, offset: int, data: bytes) -> None:
        """Rewrite bytes already appended at `offset` (a header written last), with a plain positioned write."""
        self._check()
        self._finish_direct()
        try:
            while data:
                n = os.pwrite(self._fd, data, offset)
                data, offset = data[n:], offset + n
        except OSError as exc:
            raise self._failing(self._error("write", exc)) from None

    def close(self) -> None:
        """Write what is buffered and close (after an error: close, and raise that error again)."""
        if self.closed:
            return
        try:
            self._check()
            self._finish_direct()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close without writing what is buffered (the caller discards the file)."""
        if self.closed:
            return
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)  # a write in flight ends before its buffer and descriptor go
            self._flusher = None
        fd, self._fd = self._fd, -1
        self._release_buffers()
        os.close(fd)

    def _check(self) -> None:
        if self._failed is not None:
            raise self._failed

    def _failing(self, err: AdapteropsError) -> AdapteropsError:
        """Remember the first error: the file is incomplete from here on, and only `abort` is left."""
        self._failed = self._failed or err
        return err

    def _buffers(self) -> None:
        """Make the two page-aligned buffers (as O_DIRECT needs) and the flusher at the first byte."""
        if self._maps:
            return
        try:
            self._maps = [mmap.mmap(-1, BUFFER_BYTES) for _ in range(2)]
        except OSError as exc:
            raise self._failing(AdapteropsError(f"cannot write: no memory for the write buffers ({exc.strerror or exc})",
                                                file=self.path)) from None
        self._cur = 0
        self._buf = np.frombuffer(self._maps[0], dtype=np.uint8)
        self._flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapterops-flush")

    def _release_buffers(self) -> None:
        self.direct = False
        self._buf = None
        for m in self._maps:
            try:
                m.close()
            except BufferError:  # a view of it lives on in an exception's traceback: the collector frees it later
                pass
        self._maps = []

    def _finish_direct(self) -> None:
        """Write the buffered tail (padded to the alignment, then truncated back); plain writes from here on, at the
        file's end."""
        if not self.direct:
            return
        if self._fill:
            tail = self._fill
            pad = -tail % ALIGN
            self._buf[tail:tail + pad] = 0
            self._fill = tail + pad
            self._flush()
        if self._pending is not None:
            self._pending, pending = None, self._pending
            self._wait(pending)
        try:
            os.ftruncate(self._fd, self.size)
            os.lseek(self._fd, self.size, os.SEEK_SET)
        except OSError as exc:
            raise self._failing(self._error("write", exc)) from None
        if self._odirect:
            self._plain()
        if self._flusher is not None:
            self._flusher.shutdown(wait=True)
            self._flusher = None
        self._release_buffers()

    def _flush(self) -> None:
        """Hand the current buffer to the flusher thread and go on with the other one, once its own write is done
        (which raises that write's error, if any)."""
        previous, self._pending = self._pending, self._flusher.submit(self._write_out, self._maps[self._cur], self._fill)
        self._cur ^= 1
        self._buf = np.frombuffer(self._maps[self._cur], dtype=np.uint8)
        self._fill = 0
        if previous is not None:
            self._wait(previous)

    def _wait(self, write: Future) -> None:
        try:
            write.result()
        except AdapteropsError as err:
            raise self._failing(err) from None

    def _write_out(self, buffer: mmap.mmap, nbytes: int) -> None:
        """Write `nbytes` of `buffer` at the file's position (with O_DIRECT unless a write was refused)."""
        view = memoryview(buffer)[:nbytes]
        try:
            done = 0
            while done < nbytes:
                try:
                    done += os.write(self._fd, view[done:])
                except OSError as exc:
                    if exc.errno != errno.EINVAL or not self._odirect:
                        raise self._error("write", exc) from None
                    self._plain()  # the file system took O_DIRECT at open but refuses this write: plain from here
        finally:
            view.release()

    def _plain(self) -> None:
        """Turn O_DIRECT off for the writes that follow."""
        import fcntl  # POSIX only, as O_DIRECT is

        try:
            fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        except OSError as exc:
            raise self._error("write", exc) from None
        self._odirect = False

    def _write_plain(self, data: memoryview) -> None:
        try:
            while len(data):
                n = os.write(self._fd, data)
                data = data[n:]
                self.size += n
        except OSError as exc:
            raise self._failing(self._error("write", exc)) from None

    def _copy_plain(self, src: int, source: str | os.PathLike, offset: int, nbytes: int) -> None:
        """File to file in the kernel (`os.copy_file_range`); through a buffer where the OS cannot."""
        left = nbytes
        kernel = hasattr(os, "copy_file_range")
        while left:
            if kernel:
                try:
                    n = os.copy_file_range(src, self._fd, min(left, 1 << 30), offset)
                except OSError as exc:
                    if exc.errno in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EBADF):
                        kernel = False  # not between these files: copy through a buffer
                        continue
                    raise self._failing(self._error("write", exc)) from None
                self.size += n
            else:
                try:
                    chunk = os.pread(src, min(left, 16 << 20), offset)
                except OSError as exc:
                    raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=source) from None
                n = len(chunk)
                if n:
                    self._write_plain(memoryview(chunk))
            if n == 0:
                raise AdapteropsError(f"file is truncated: {left} bytes of tensor data missing", file=source)
            offset += n
            left -= n
