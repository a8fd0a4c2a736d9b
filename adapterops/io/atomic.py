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
import stat
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from adapterops.errors import AdapteropsError
from adapterops.io.paths import safe_file

TMP_MARK = ".adapterops-tmp-"
# errnos that mean "the disk (or the quota, or the file-size limit) is full": a write failed, not a read
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, *([errno.EDQUOT] if hasattr(errno, "EDQUOT") else [])})
EXISTS_MESSAGE = "exists and is not empty (use --force to replace it)"


def output_folder(out: Path) -> Path:
    """The folder OUT names: `.` and `..` as the folders they are, and a symlink to a folder as its target (the
    output is written where the link points, and the link stays)."""
    out = Path(out)
    if out.name in ("", ".", ".."):
        out = out.resolve()
    if out.is_symlink():
        if not out.exists():
            raise AdapteropsError(f"is a symlink to {os.readlink(out)}, which does not exist", file=out)
        if not out.is_dir():
            raise AdapteropsError("exists and is not a folder", file=out)
        out = out.resolve()
    return out


def _refuse_unreplaceable(out: Path, shown: Path) -> None:
    """OUT is replaced as a whole by renaming a new folder into place: refuse, with the reason, a folder that no
    rename can replace (the current folder, a mount point) instead of failing late with "Device or resource busy"."""
    if not out.is_dir():
        return
    target = out.resolve()
    try:
        cwd = Path.cwd().resolve()
    except OSError:
        cwd = None
    if cwd is not None and (cwd == target or cwd.is_relative_to(target)):
        raise AdapteropsError("is the current folder (or holds it); adapterops replaces OUT as a whole, so name a new "
                              "folder for the output (e.g. ./out)", file=shown)
    if os.path.ismount(target):
        raise AdapteropsError("is a mount point; adapterops replaces OUT as a whole by renaming a new folder into its "
                              "place, which a mount point does not allow: name a folder inside it", file=shown)


def check_output(out: Path, inputs: list[Path], force: bool) -> None:
    """Refuse an OUT that is an input (or inside/around one), that cannot be replaced (the current folder, a mount
    point), or that holds files when --force is not given."""
    shown = Path(out)
    out = output_folder(shown)
    target = out.resolve()
    for inp in inputs:
        src = inp.resolve()
        if target == src or target.is_relative_to(src) or src.is_relative_to(target):
            raise AdapteropsError(f"output overlaps the input {inp}; inputs are never modified", file=shown)
    if out.exists():
        if not out.is_dir():
            raise AdapteropsError("exists and is not a folder", file=shown)
        _refuse_unreplaceable(out, shown)
        if any(out.iterdir()) and not force:
            raise AdapteropsError(EXISTS_MESSAGE, file=shown)


def _pid_alive(pid: int) -> bool:
    """Whether a process with this id exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    """Remove a folder tree, or a file or symlink (rmtree refuses symlinks, and ignore_errors would hide that)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temps(parent: Path, name: str) -> None:
    """Remove temporary folders for OUT left by runs that were killed."""
    for p in parent.glob(f".{name}{TMP_MARK}*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            _remove(p)


def _rename_error(exc: OSError, out: Path) -> AdapteropsError | None:
    """A one-line error for a final rename that failed because of what OUT is, or None for other failures."""
    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
        return AdapteropsError(f"{EXISTS_MESSAGE}; another run wrote it while this one ran, and nothing was replaced",
                               file=out)
    if exc.errno == errno.ENOTDIR:
        return AdapteropsError("exists and is not a folder (another run made it while this one ran)", file=out)
    if exc.errno == errno.EBUSY:
        return AdapteropsError("cannot be replaced by a rename (a mount point, or a folder in use)", file=out)
    return None


def _put_in_place(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the finished temporary folder to OUT; replace what is at OUT only when `replace`."""
    if replace and os.path.lexists(out):
        old = out.parent / f".{out.name}{TMP_MARK}{os.getpid()}-old{uuid.uuid4().hex[:8]}"
        try:
            os.rename(out, old)
        except OSError as exc:
            raise (_rename_error(exc, out) or exc) from None
        try:
            os.rename(tmp, out)
        except OSError as exc:
            try:
                os.rename(old, out)  # put the previous OUT back
            except OSError:
                _remove(old)
            raise (_rename_error(exc, out) or exc) from None
        _remove(old)
        return
    try:
        os.rename(tmp, out)  # the kernel replaces an empty folder at OUT, never a non-empty one or a file
    except OSError as exc:
        raise (_rename_error(exc, out) or exc) from None


@contextmanager
def atomic_dir(out: Path, *, replace: bool | None = None) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it becomes OUT, on failure it is removed.

    `replace`: whether the final rename may replace a non-empty OUT. Callers pass their --force. The default
    (None) allows it only when OUT already existed when this began (so check_output has accepted it: empty, or
    --force given); an OUT that another run created meanwhile is then never replaced, and this run fails as if
    OUT had existed from the start. An empty OUT is always replaced.
    """
    shown = Path(out)
    out = output_folder(shown)
    _refuse_unreplaceable(out, shown)
    parent = out.parent
    made = make_folders(parent)
    try:
        remove_stale_temps(parent, out.name)
        if replace is None:
            replace = os.path.lexists(out)
        tmp = parent / f".{out.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
    except BaseException:
        remove_made(made)
        raise
    try:
        yield tmp
        _put_in_place(tmp, out, replace)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_made(made)
        _name_the_output(exc, tmp, shown)
        raise


def make_folders(folder: Path) -> list[Path]:
    """`mkdir -p folder`; returns the folders it made, outermost first, so that a run that fails can take them away
    again (`remove_made`): a failed run leaves nothing behind, not even OUT's new parent folders."""
    folder = Path(folder)
    missing = []
    p = folder
    while not os.path.lexists(p) and p != p.parent:
        missing.append(p)
        p = p.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except BaseException:
        remove_made(missing[::-1])
        raise
    return missing[::-1]


def remove_made(made: list[Path]) -> None:
    """Remove the folders `make_folders` made, innermost first, each only if it is (still) empty."""
    for p in reversed(made):
        try:
            os.rmdir(p)
        except OSError:  # not empty (another run put something there), or already gone
            if os.path.lexists(p):
                return


def _name_the_output(exc: BaseException, tmp: Path, out: Path) -> None:
    """An error about a file in the temporary folder names it under OUT instead: the temporary folder is gone by
    the time the user reads the message, and OUT is the name they gave."""
    if isinstance(exc, AdapteropsError) and exc.args and str(tmp) in str(exc.args[0]):
        exc.args = (str(exc.args[0]).replace(str(tmp), str(out)), *exc.args[1:])
    elif isinstance(exc, OSError) and isinstance(exc.filename, str) and exc.filename.startswith(str(tmp)):
        exc.filename = str(out) + exc.filename[len(str(tmp)):]


def copy_file(src: Path, dst_dir: Path) -> Path:
    """Copy one file into a folder, keeping its name, as a regular file (a symlink's content, never the link).

    The source goes through the file rule (io/paths.py) first: inside its folder or its Hub cache repo, and a
    regular file; it is opened non-blocking and checked again, so a FIFO swapped in meanwhile cannot hang the copy.
    """
    src = safe_file(src.parent, src.name)
    dst = dst_dir / src.name
    try:
        fd = os.open(src, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=src) from None
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise AdapteropsError("changed into something that is not a regular file while it was copied", file=src)
        try:
            with open(dst, "wb") as out:
                shutil.copyfileobj(fh, out, 1 << 20)
        except OSError as exc:
            if exc.errno in DISK_FULL_ERRNOS:
                raise AdapteropsError(f"cannot write: {exc.strerror or exc}", file=dst) from None
            raise AdapteropsError(f"cannot copy: {exc.strerror or exc}", file=src) from None
    return dst


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    made = make_folders(path.parent)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        remove_made(made)
        raise
