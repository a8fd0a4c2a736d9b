"""What every command shares: running a library call, one-line errors, JSON output, and the common options."""

from __future__ import annotations

import functools
import json
import os
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from adapterops.errors import AdapteropsError


def echo(text: str, err: bool = False, nl: bool = True) -> None:
    """Print text that may hold names no terminal encoding can show (lone surrogates): escaped, never a crash.

    Output that cannot be written (stdout on a full disk, a closed pipe) is one error line on stderr and exit 2,
    not a traceback; when stderr itself cannot be written there is nowhere to say so, and the exit code says it."""
    try:
        click.echo(text.encode("utf-8", "backslashreplace").decode("utf-8"), err=err, nl=nl)
    except OSError as exc:
        _drop_stream(sys.stderr if err else sys.stdout)  # no second error when Python flushes it at exit
        if err:
            sys.exit(2)
        fail(AdapteropsError(f"cannot write to standard output: {exc.strerror or exc}"))


def _drop_stream(stream: Any) -> None:
    """Point a standard stream that failed at /dev/null, so that nothing more is written to it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):  # not a real file (a test runner's buffer)
        pass


def fail(exc: AdapteropsError) -> None:
    """Print a one-line error and exit with the error's code (2)."""
    echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def _import_torch() -> None:
    """Import torch (every library call needs it) with Python's cyclic garbage collector paused, then freeze what
    the import made: its ~170k long-lived objects would otherwise be walked by each full collection, two during
    the import and one more while a merge parses headers (0.3 s of CPU per command, measured). The CLI process
    is one command long; frozen objects are simply never collected."""
    import gc

    was = gc.isenabled()
    gc.disable()
    try:
        import torch  # noqa: F401
    finally:
        gc.freeze()
        if was:
            gc.enable()


def call(fn: Callable[[], Any]) -> Any:
    """Run a library call; bad input (and an OS error outside the writers' own checks) exits 2 with one line."""
    from adapterops.core.lowrank import NotFinite
    from adapterops.io.atomic import DISK_FULL_ERRNOS
    from adapterops.io.outfile import direct_io_setting
    from adapterops.pipeline.threads import merge_workers_setting

    _import_torch()
    try:
        direct_io_setting()  # a bad ADAPTEROPS_* setting is refused before any work, whatever the command does
        merge_workers_setting()
        return fn()
    except AdapteropsError as exc:
        fail(exc)
    except OSError as exc:
        what = "write" if exc.errno in DISK_FULL_ERRNOS else "access"
        fail(AdapteropsError(f"cannot {what}: {exc.strerror or exc}", file=exc.filename))
    except NotFinite as exc:  # a ΔW too large for its dtype where no op named the module (the ops do where they can)
        fail(AdapteropsError(f"a matrix to decompose does not fit its dtype: {exc}"))
    except (MemoryError, RuntimeError) as exc:  # torch's allocators raise RuntimeError (OutOfMemoryError is one)
        oom = out_of_memory(exc)
        if oom is None:
            raise
        fail(AdapteropsError(oom))


def out_of_memory(exc: BaseException) -> str | None:
    """'not enough memory: ...' for an allocation that failed (Python's MemoryError, torch's CPU allocator, CUDA's
    OutOfMemoryError), None for any other error."""
    import re

    text = " ".join(str(exc).split())
    if not isinstance(exc, MemoryError) and type(exc).__name__ != "OutOfMemoryError" and \
            "can't allocate memory" not in text and "out of memory" not in text.lower():
        return None
    tried = re.search(r"tried to allocate ([\d.]+ ?[KMGT]?i?B|\d+ bytes)", text)
    return "not enough memory" + (f" (tried to allocate {tried.group(1)})" if tried else "") + \
        ": a smaller --rank / --pad-to, fewer jobs, or a machine with more memory"


def to_json(data: object) -> str:
    """JSON for scripts: ASCII-escaped, so any name (even a lone surrogate) survives any terminal."""
    return json.dumps(data, indent=2, default=str) + "\n"


def emit(result: Any, as_json: bool, json_file: str | None, text: Callable[[], str]) -> None:
    """Warnings on stderr; then --json prints the JSON instead of the text, --json-file F writes it beside the text.

    F was checked before the command did any work (`check_report_file`): what can still fail here is the write
    itself (a full disk), which leaves no partial report (the file is written atomically)."""
    from adapterops.io.atomic import atomic_file

    data = to_json(result.to_dict())
    if json_file:
        try:
            with atomic_file(json_file) as tmp:
                tmp.write_text(data, encoding="utf-8")
        except (OSError, ValueError) as exc:  # ValueError: a NUL in the name
            fail(AdapteropsError(f"cannot write the JSON report: {getattr(exc, 'strerror', None) or exc}", file=json_file))
    if as_json:
        echo(data, nl=False)
    else:
        echo(text(), nl=False)


# options whose value is an input path, besides the commands' positional arguments (inputs, and OUT)
INPUT_OPTIONS = ("base", "compare", "quantized_base")
# options naming a file the command writes after its work (the report files): (parameter, option)
REPORT_FILES = (("json_file", "--json-file"), ("plot_path", "--plot"))


def check_report_file(name: str, option: str, others: list[str]) -> Path:
    """The file a report option (--json-file, --plot) names, checked before any work, so that a run which would fail
    to write it, or would write it over an input, fails before it writes anything: not a folder nor anything but a
    regular file, in a folder that exists (or can be made) and is writable, and neither one of `others` (the
    command's inputs and OUT) nor inside one. Returns the path to write: a symlink's target (the link stays)."""
    from adapterops.io.paths import file_kind

    shown = name
    if name.endswith(("/", os.sep)) or Path(name).name in ("", ".", ".."):
        raise AdapteropsError(f"names a folder; {option} names the file to write", file=shown)
    target = Path(os.path.realpath(name))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise AdapteropsError(f"cannot be written: {exc.strerror or exc}", file=shown) from None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise AdapteropsError(f"is a folder; {option} names the file to write", file=shown)
        if not stat.S_ISREG(st.st_mode):
            raise AdapteropsError(f"is {file_kind(st.st_mode)}, not a regular file; {option} replaces a file atomically"
                                  + (" (--json prints the JSON on stdout)" if option == "--json-file" else ""), file=shown)
    folder = target.parent
    while not os.path.lexists(folder):  # missing folders are made when the report is written
        folder = folder.parent
    if not folder.is_dir():
        raise AdapteropsError(f"cannot be written: {folder} is not a folder", file=shown)
    if not os.access(folder, os.W_OK | os.X_OK):
        raise AdapteropsError(f"cannot be written: no permission to write in the folder {folder}", file=shown)
    for other in others:
        real = Path(os.path.realpath(other))
        if target == real or target.is_relative_to(real):
            where = "is" if target == real else "is inside"
            raise AdapteropsError(f"{where} {other}, an input or the output of this command; {option} must name "
                                  "another file (inputs are never modified, and OUT is replaced as a whole)", file=shown)
    return target


def _command_paths(ctx: click.Context) -> list[str]:
    """The paths a command reads or writes: its positional arguments (inputs and OUT) and its input options."""
    paths: list[str] = []
    for param in ctx.command.params:
        if isinstance(param, click.Argument) or param.name in INPUT_OPTIONS:
            value = ctx.params.get(param.name)
            values = value if isinstance(value, (tuple, list)) else [value]
            paths += [str(v) for v in values if v is not None and str(v)]
    return paths


def checks_report_files(f: Callable) -> Callable:
    """Check the report files a command will write (--json-file, --plot) before it runs (`check_report_file`)."""
    @functools.wraps(f)
    def checked(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        paths = _command_paths(ctx)
        given = {key: kwargs[key] for key, _ in REPORT_FILES if kwargs.get(key)}
        try:
            for key, option in REPORT_FILES:
                if key in given:
                    others = paths + [str(v) for k, v in given.items() if k != key]
                    kwargs[key] = str(check_report_file(str(given[key]), option, others))
        except AdapteropsError as exc:
            fail(exc)
        return f(*args, **kwargs)
    return checked


def warn(warnings: list[str]) -> None:
    """Each warning as its own `warning:` line on stderr."""
    for w in warnings:
        echo(f"warning: {w}", err=True)


def only_with(ctx: click.Context, allowed: bool, reason: str, *options: str) -> None:
    """Refuse options the user set that cannot apply (instead of silently ignoring them)."""
    if allowed:
        return
    names = {opt: param.name for param in ctx.command.params for opt in param.opts}
    given = [o for o in options if ctx.get_parameter_source(names[o]) == click.core.ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only {reason}")


def floats(text: str | None, option: str = "--weights") -> list[float] | None:
    """'1,0.5' -> [1.0, 0.5]."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=option) from None


class Group(click.Group):
    """The top-level group: refuses arguments no file system can hold (a NUL byte) before any command runs."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        for arg in args:
            if "\0" in arg:
                raise click.UsageError(f"argument {arg!r} holds a NUL byte, which no file or option name can contain")
        return super().parse_args(ctx, args)


def json_options(f: Callable) -> Callable:
    """--json prints the result as JSON on stdout (instead of the text); --json-file F writes it to F (checked before
    the command runs)."""
    f = checks_report_files(f)
    f = click.option("--json-file", metavar="FILE", help="Also write the result as JSON to FILE (atomically).")(f)
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout instead of text.")(f)


def output_options(revision_of: str) -> Callable[[Callable], Callable]:
    """The options every command that writes a checkpoint shares."""
    def decorate(f: Callable) -> Callable:
        for option in reversed([
            click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
            click.option("--revision", help=f"Hub revision (branch, tag or commit) of {revision_of} when it is a Hub repo id."),
            click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty."),
            click.option("-q", "--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal)."),
        ]):
            f = option(f)
        return json_options(f)
    return decorate


def adapter_options(f: Callable) -> Callable:
    """The options every command that writes an adapter shares."""
    f = click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")(f)
    return json_options(f)
