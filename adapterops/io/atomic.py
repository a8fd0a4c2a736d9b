"""Atomic output folders: everything is written into a temporary folder beside OUT and renamed into place.

A failure (an exception, Ctrl-C) removes the temporary folder; a process killed outright leaves one behind whose
name marks it as ours, and the next run removes stale ones whose process is gone. OUT itself only ever appears
complete. Like save_pretrained we do not fsync (that forces the whole output to disk, seconds per GB): the
rename protects against failed and killed runs, not against power loss before the OS has written the data.
"""

from __future__ import annotations

import errno
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterops.errors import AdapteropsError

TMP_MARK = ".adapterops-tmp-"
# the errors that mean "the disk (or the quota, or the file size limit) is full": a write failed, not a read
DISK_FULL = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an OUT that is an input (or inside/around one), or that holds files when --force is not given."""
    target = out.resolve()
    for inp in inputs:
        src = inp.resolve()
        if target == src or target.is_relative_to(src) or src.is_relative_to(target):
            raise AdapteropsError(f"output overlaps the input {inp}; inputs are never modified", file=out)
    if out.exists():
        if not out.is_dir():
            raise AdapteropsError("exists and is not a folder", file=out)
        if any(out.iterdir()) and not force:
            raise AdapteropsError("exists and is not empty (use --force to replace it)", file=out)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(parent: Path, name: str) -> None:
    """Remove temporary folders for OUT left by runs that were killed."""
    for p in parent.glob(f".{name}{TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


@contextmanager
def atomic_dir(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes OUT (replacing it), on failure it is removed."""
    out = Path(out)
    parent = out.parent
    parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(parent, out.name)
    tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = parent / f".{out.name}{TMP_MARK}{os.getpid()}-old{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def copy_file(src: Path, dst_dir: Path) -> Path:
    """Copy one file into a folder, keeping its name."""
    try:
        return Path(shutil.copyfile(src, dst_dir / src.name))
    except OSError as exc:
        raise AdapteropsError(f"cannot copy: {exc.strerror or exc}", file=src) from None


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
