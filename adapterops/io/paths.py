"""Which files inside an input folder adapterops may open or copy: the one rule every opener and copier uses.

A checkpoint or adapter folder names its files (an index names shards; a folder holds `model.safetensors`,
`config.json`, tokenizer files, ...). A file may be opened, or copied into an output, only when:

- its name stays inside the folder: no absolute path, no `..` part;
- it is, or is a symlink that resolves to, a **regular file** inside the folder, or inside the `blobs/` folder of
  the same huggingface_hub cache repo (`models--org--name/`: a snapshot folder holds only symlinks into
  `../../blobs/`);
- it is a regular file: a FIFO would block `open()` forever, a device reads endlessly, a socket cannot be read.

Anything else (a symlink to `/etc/passwd`, to `/dev/zero`, to another repo's blobs, a dangling symlink, a name
holding a NUL byte) is refused with one line that says what the file is. A path the user typed on the command line
is the user's choice: it may be a symlink to anywhere (`named_by_user=True`), but it must still end at a regular
file.

`open_regular` and `read_regular` are the rule at the moment of reading: whoever opens a file opens it through them
(non-blocking, checked again with fstat, size-capped), so a file that skipped `safe_file`, or a FIFO swapped in
after the check, is refused instead of hanging the process or reading /dev/zero forever.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from adapterops.errors import AdapteropsError

# huggingface_hub's cache: <cache>/<type>s--<org>--<name>/{blobs,refs,snapshots/<commit>/...}
HUB_REPO_DIR = re.compile(r"^(models|datasets|spaces)--.+")


def hub_cache_repo(folder: Path) -> Path | None:
    """The huggingface_hub cache repo folder (`…/models--org--name`) a real folder is a snapshot of, or None."""
    for p in (folder, *folder.parents):
        if p.parent.name == "snapshots" and HUB_REPO_DIR.match(p.parent.parent.name):
            return p.parent.parent
    return None


def file_kind(mode: int) -> str:
    """'a FIFO', 'a socket', ... for a stat mode that is not a regular file."""
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a file"


def safe_file(root: Path, name: str | os.PathLike, what: str = "file", *, listed_in: Path | None = None,
              folder: str = "folder", named_by_user: bool = False) -> Path:
    """`root / name`, after checking that it may be opened or copied (see the module docstring); raises otherwise.

    `listed_in` is the file that named `name` (an index): errors then name that file and quote `name` as `what`.
    Otherwise errors name the file itself. `folder` names the folder in messages ("checkpoint folder"). The path returned is `root / name`, not the symlink's target, so
    names (and suffixes) stay those of the folder.
    """
    root = Path(root)
    prefix = f"{what} {str(name)!r} " if listed_in is not None else ""

    def fail(message: str) -> AdapteropsError:
        return AdapteropsError(prefix + message, file=listed_in if listed_in is not None else root / name)

    if not isinstance(name, (str, os.PathLike)) or not str(name):
        raise AdapteropsError(f"{what} {name!r} is not a file name", file=listed_in or root)
    # A NUL byte (from file contents: an index's "model\u0000.safetensors") makes every os call raise ValueError.
    # The name is quoted, so that no raw NUL reaches the terminal.
    if "\0" in str(root):
        raise AdapteropsError(f"folder name {str(root)!r} holds a NUL byte, which no file name can")
    if "\0" in str(name):
        raise AdapteropsError(f"{what} {str(name)!r} is not a file name: it holds a NUL byte",
                              file=listed_in if listed_in is not None else root)
    if not named_by_user:
        if os.path.isabs(name):
            raise fail(f"points outside the {folder} (an absolute path)")
        if ".." in Path(name).parts:
            raise fail(f"points outside the {folder} (a '..' path)")
    path = root / name
    # ValueError too, everywhere below: os calls raise it for a path they cannot pass to the system (a NUL byte)
    try:
        link = path.lstat()
    except FileNotFoundError:
        raise fail("is missing") from None
    except (OSError, ValueError) as exc:
        raise fail(f"cannot be read: {_reason(exc)}") from None
    is_link = stat.S_ISLNK(link.st_mode)
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        try:
            dest = os.readlink(path) if is_link else "a missing folder"
        except (OSError, ValueError):
            dest = "a path"
        raise fail(f"is a symlink to {dest}, which does not exist") from None
    except (RuntimeError, OSError, ValueError):  # a loop (RuntimeError before Python 3.13), or an unreadable link
        raise fail("is a symlink that cannot be resolved (a loop?)") from None
    try:
        mode = os.stat(path).st_mode  # follows symlinks; stat never opens, so a FIFO cannot block here
    except (OSError, ValueError) as exc:
        raise fail(f"cannot be read: {_reason(exc)}") from None
    if not stat.S_ISREG(mode):
        via = f"is a symlink to {target}, which is " if is_link else "is "
        raise fail(f"{via}{file_kind(mode)}, not a regular file")
    if not named_by_user:
        try:
            real_root = root.resolve()
        except (RuntimeError, OSError, ValueError):
            raise fail(f"cannot be checked: its {folder} cannot be resolved (a symlink loop?)") from None
        allowed = [real_root]
        repo = hub_cache_repo(real_root)
        if repo is not None:
            try:  # a hostile cache's blobs/ may be a symlink loop: then nothing is allowed there
                allowed.append((repo / "blobs").resolve())
            except (RuntimeError, OSError, ValueError):
                pass
        if not any(target.is_relative_to(a) for a in allowed):
            where = f"the {folder} and its Hub cache repo's blobs" if repo is not None else f"the {folder}"
            raise fail(f"is a symlink to {target}, outside {where}")
    return path


def regular_file(path: Path, what: str = "file") -> Path:
    """A path the user named: any symlink is followed, but it must end at a regular file."""
    path = Path(path)
    return safe_file(path.parent, path.name, what, named_by_user=True)


def _reason(exc: BaseException) -> str:
    """An OSError's strerror, or what a ValueError from an os call means."""
    if isinstance(exc, ValueError):
        return "its name holds a NUL byte" if "null" in str(exc) else str(exc)
    return getattr(exc, "strerror", None) or str(exc)


_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def open_regular(path: str | os.PathLike) -> tuple[int, os.stat_result]:
    """(a raw read-only descriptor, its fstat) for a path that must be a regular file, else an AdapteropsError.

    stat first, so that a device is never opened at all; then open non-blocking (a FIFO swapped in meanwhile opens at
    once instead of waiting for a writer) and check the opened file again with fstat. The caller closes the fd.
    O_NONBLOCK does not change reads of a regular file.
    """
    def refuse(mode: int) -> AdapteropsError:
        return AdapteropsError(f"is {file_kind(mode)}, not a regular file", file=path)

    if "\0" in str(path):
        raise AdapteropsError(f"file name {str(path)!r} holds a NUL byte, which no file name can")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise AdapteropsError("file not found", file=path) from None
    except (OSError, ValueError) as exc:
        raise AdapteropsError(f"cannot read: {_reason(exc)}", file=path) from None
    if not stat.S_ISREG(mode):
        raise refuse(mode)
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        raise AdapteropsError("file not found", file=path) from None
    except (OSError, ValueError) as exc:
        raise AdapteropsError(f"cannot read: {_reason(exc)}", file=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise refuse(st.st_mode)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """All bytes of a regular file of at most `limit` bytes (open_regular's checks; reading stops past `limit`, so a
    file that grows meanwhile cannot make it read forever)."""
    fd, st = open_regular(path)
    try:
        if st.st_size > limit:
            raise AdapteropsError(f"is {st.st_size} bytes, over the {limit}-byte limit for a {what}", file=path)
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 24, limit + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise AdapteropsError(f"grew past the {limit}-byte limit for a {what} while it was read", file=path)
        return b"".join(chunks)
    except OSError as exc:
        raise AdapteropsError(f"cannot read: {_reason(exc)}", file=path) from None
    finally:
        os.close(fd)
