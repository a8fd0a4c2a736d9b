"""Batch manifests: a TOML file of jobs, validated up front and expanded into tasks (one output each).

```toml
[defaults]                      # options every job gets unless it sets them (only where the op takes them)
device = "cpu"

[[job]]
name = "baked"                  # unique; {job} in output patterns
op = "rescale"                  # any op of adapterops.registry.OPS
adapter = "adapters/*/"         # the op's inputs: a path, a glob (one task per match) or a Hub repo id
output = "out/{name}-baked"     # {name}: the matched input's name; {job}: the job's name
to = "standard"                 # the op's options, as in the library call (adapterops.rescale)
bake = true
```

`parse_manifest` reads no tensors and writes nothing: an unknown key or op, a bad option type, a glob that matches
nothing or two tasks with one output is an error naming the line, before any work starts.
"""

from __future__ import annotations

import collections.abc
import functools
import glob
import inspect
import os
import re
import stat
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterops.core.finite import finite_float
from adapterops.errors import AdapteropsError
from adapterops.io.hub import is_hub_id
from adapterops.io.paths import regular_file
from adapterops.registry import OPS

NOT_OPTIONS = {"force", "quiet", "out", "dry_run"}  # set by batch itself (a dry run has no output)


@dataclass
class Task:
    """One run of one job: resolved input paths, one output, the options."""

    job: str
    op: str
    name: str
    inputs: dict[str, list[str]]  # input key -> paths (or Hub ids)
    output: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        """How reports name this task."""
        return f"{self.job}:{self.name}"


def _lines(text: str) -> tuple[dict[str, int], list[dict[str, int]]]:
    """Line numbers of the keys of [defaults] and of each [[job]] (tomllib gives none)."""
    defaults: dict[str, int] = {}
    jobs: list[dict[str, int]] = []
    current: dict[str, int] | None = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if s.startswith("[[job]]"):
            jobs.append({"[[job]]": n})
            current = jobs[-1]
        elif s.startswith("[defaults]"):
            current = defaults
            defaults["[defaults]"] = n
        elif s.startswith("["):
            current = {"[": n}
        elif current is not None and (m := re.match(r"\s*([A-Za-z0-9_\"'-]+)\s*=", line)):
            current.setdefault(m.group(1).strip("\"'"), n)
    return defaults, jobs


@functools.cache
def option_names(op: str) -> dict[str, Any]:
    """The options an op's library call accepts, with their type hints (keyword parameters, minus inputs and
    what batch sets itself)."""
    spec = OPS[op]
    func = spec.load()
    hints = typing.get_type_hints(func)
    skip = NOT_OPTIONS | set(spec.inputs) | set(spec.keyword_inputs)
    params = inspect.signature(func).parameters
    return {k: hints.get(k, Any) for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k not in skip}


def _accepts(hint: Any, value: Any) -> bool:
    """Whether a TOML value fits a parameter's type hint (unknown hints accept anything)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(h, value) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if origin in (list, tuple, collections.abc.Sequence):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return isinstance(value, list) and all(_accepts(args[0], v) for v in value) if args else isinstance(value, list)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:  # TOML's integers are 64-bit (tomllib reads longer ones): so are a manifest's
        return isinstance(value, int) and not isinstance(value, bool) and -(1 << 63) <= value < 1 << 63
    if hint is float:  # TOML has nan, inf and integers of any length: a float option must be a finite number
        return isinstance(value, (int, float)) and finite_float(value) is not None
    if hint is str or hint is os.PathLike:
        return isinstance(value, str)
    if hint is type(None):
        return False
    return True


def _type_error(value: Any, hint: Any) -> str | None:
    """Why a value cannot be this option, or None when it can."""
    if _accepts(hint, value):
        return None
    if typing.get_origin(hint) is typing.Literal or any(typing.get_origin(h) is typing.Literal for h in typing.get_args(hint)):
        choices = [c for h in (hint, *typing.get_args(hint)) if typing.get_origin(h) is typing.Literal for c in typing.get_args(h)]
        return f"must be one of {', '.join(map(repr, choices))}"
    names = {bool: "true or false", int: "an integer (64-bit)", float: "a finite number", str: "a string"}
    plural = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}

    def listed(h: Any) -> str:
        args = typing.get_args(h)
        return f"a list of {plural.get(args[0], 'values')}" if args and args[0] in plural else "a list"

    wanted = [names.get(h, listed(h) if typing.get_origin(h) in (list, tuple, collections.abc.Sequence) else None)
              for h in (typing.get_args(hint) or (hint,)) if h is not type(None)]
    return "must be " + " or ".join(w for w in wanted if w) if any(wanted) else "has the wrong type"


def _expand(pattern: str, root: Path, dirs_only: bool) -> list[str]:
    """The paths a pattern names: glob matches (sorted), an existing path, or a Hub repo id as given."""
    path = pattern if Path(pattern).is_absolute() else str(root / pattern)
    if glob.has_magic(pattern):
        found = sorted(glob.glob(path))
        return [p.rstrip("/") for p in found if not dirs_only or Path(p).is_dir()]
    if Path(path).exists():
        return [path.rstrip("/")]
    return [pattern] if is_hub_id(pattern) else []


def _matches(pattern: str, root: Path, dirs_only: bool, key: str, where: _Where) -> list[str]:
    """`_expand`, with a path the system refuses (a name too long, a folder that cannot be read) an error naming
    the manifest's field."""
    try:
        return _expand(pattern, root, dirs_only)
    except OSError as exc:
        raise where.error(key, f"{key} {pattern!r:.80}: {exc.strerror or exc}") from None


def _task_name(path: str) -> str:
    """{name}: a folder's or file's name, or a Hub id's repo name."""
    return Path(path.rstrip("/")).name or path


@dataclass(frozen=True)
class _Where:
    """Where a job is in the manifest, for errors that name the line and the job."""

    path: Path
    lines: dict[str, int]
    job: str | None = None  # how errors name the job: "job 'a'" (or "job #2" while its name is unknown)

    def error(self, key: str | None, msg: str) -> AdapteropsError:
        """An error on the line of `key` (or of the job's header), naming the job."""
        line = self.lines.get(key or "", self.lines.get("[[job]]"))
        parts = ([f"line {line}"] if line else []) + ([self.job] if self.job else [])
        return AdapteropsError(": ".join([*parts, msg]), file=self.path)


def _read_manifest(path: Path) -> tuple[str, dict[str, Any]]:
    """The manifest's text and its parsed TOML, with its top level checked."""
    try:
        text = _read_text(path)
        data = tomllib.loads(text)
    except OSError as exc:
        raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=path) from None
    except UnicodeDecodeError:
        raise AdapteropsError("is not UTF-8 text", file=path) from None
    except tomllib.TOMLDecodeError as exc:
        raise AdapteropsError(f"invalid TOML: {exc}", file=path) from None
    except RecursionError:
        raise AdapteropsError(f"invalid manifest: arrays or tables nested over {MAX_DEPTH} levels", file=path) from None
    _check_shape(data, path)
    for key in data:
        if key not in ("job", "defaults", "version"):
            raise AdapteropsError(f"unknown top-level key {key!r} (expected [[job]], [defaults] or version)", file=path)
    version = data.get("version", 1)
    if type(version) is not int or version != 1:
        raise AdapteropsError(f"manifest version {data['version']!r} is not supported (this adapterops reads version 1)", file=path)
    if not isinstance(data.get("job"), list) or not data["job"]:
        raise AdapteropsError("no [[job]] entries", file=path)
    return text, data


def _read_text(path: Path) -> str:
    """The manifest's text. The user named the file: any symlink is followed, but it must be a regular file (a FIFO
    would block the read forever); it is opened non-blocking and checked again, so one swapped in meanwhile cannot."""
    path = regular_file(path, "manifest")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with open(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise AdapteropsError("changed into something that is not a regular file while it was read", file=path)
        return fh.read().decode("utf-8")


MAX_DEPTH = 32  # far above any real manifest (options are at most a list of strings)


def _check_shape(data: dict[str, Any], path: Path) -> None:
    """The top level's types: [defaults] a table, job an array of [[job]] tables; nothing nested over MAX_DEPTH."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:  # iterative: a deep value must not overflow the checker's own stack
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise AdapteropsError(f"invalid manifest: arrays or tables nested over {MAX_DEPTH} levels", file=path)
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for v in value.values())
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)
    if "defaults" in data and not isinstance(data["defaults"], dict):
        raise AdapteropsError(f"defaults must be a [defaults] table, got {type(data['defaults']).__name__}", file=path)
    jobs = data.get("job")
    if jobs is not None and not (isinstance(jobs, list) and all(isinstance(j, dict) for j in jobs)):
        bad = jobs if not isinstance(jobs, list) else next(j for j in jobs if not isinstance(j, dict))
        raise AdapteropsError(f"job must be an array of [[job]] tables, got {type(bad).__name__} {bad!r:.40}", file=path)


def _nul_field(value: Any) -> bool:
    """Whether a value (a string, or lists and tables of them) holds a NUL byte, which no path or name can hold."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str) and "\0" in v:
            return True
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _check_nul(table: dict[str, Any], where: _Where, what: str = "") -> None:
    """Refuse a NUL byte in any key or string of a job or [defaults], naming the field."""
    for key, value in table.items():
        if "\0" in key or _nul_field(value):
            raise where.error(key, f"{what}{key!r} holds a NUL byte, which no path, name or option value can hold")


def _output_pattern(output: str, where: _Where) -> None:
    """Output patterns hold `{name}` and `{job}` literally and no other brace: no format fields, indexes,
    attributes, conversions or format specs (str.format would read them as code)."""
    rest = output.replace("{name}", "").replace("{job}", "")
    if "{" in rest or "}" in rest:
        raise where.error("output", f"bad output pattern {output!r}: only {{name}} and {{job}} may appear in braces")


def _resolved(path: str) -> str:
    """A local path with symlinks, '.', '..' and trailing slashes resolved (so aliases compare equal)."""
    return os.path.realpath(path)


def _inside(path: str, folder: str) -> bool:
    """Whether resolved `path` is `folder` or inside it."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def _check_output_vs_inputs(task: Task, where: _Where) -> None:
    """A task's output must not be, or be inside, one of its inputs, nor hold one (writing it would replace it)."""
    out = _resolved(task.output)
    for paths in task.inputs.values():
        for p in paths:
            if not os.path.exists(p):
                continue  # a Hub id
            inp = _resolved(p)
            if _inside(out, inp) or _inside(inp, out):
                raise where.error("output", f"output {task.output} {'is' if out == inp else 'overlaps'} the input {p} "
                                            f"of task {task.id}")


def _job_options(job: dict[str, Any], op: str, defaults: dict[str, Any], where: _Where) -> dict[str, Any]:
    """The job's options (defaults it takes, then its own), each checked against the library call's type hints."""
    spec = OPS[op]
    allowed = option_names(op)
    input_keys = set(spec.inputs) | set(spec.keyword_inputs) | ({spec.expand} if spec.expand else set())
    options = {}
    for key, value in defaults.items():
        if key in allowed:
            why = _type_error(value, allowed[key])
            if why:
                raise where.error(None, f"default {key} {why} (for op {op!r})")
            options[key] = value
    for key, value in job.items():
        if key in ("op", "name", "output") or key in input_keys:
            continue
        if key not in allowed:
            raise where.error(key, f"unknown key {key!r} for op {op!r} (inputs: {', '.join(sorted(input_keys))}; "
                                   f"options: {', '.join(sorted(allowed))})")
        why = _type_error(value, allowed[key])
        if why:
            raise where.error(key, f"{key} {why}")
        options[key] = value
    return options


def _job_inputs(job: dict[str, Any], op: str, root: Path, where: _Where) -> tuple[dict[str, list[str]], list[str | None]]:
    """(inputs fixed for every task, the matches of the fanning-out input or [None]), every pattern matched."""
    spec = OPS[op]
    fixed: dict[str, list[str]] = {}
    for key in (*spec.inputs, *spec.keyword_inputs):
        if key not in job or key == spec.expand:
            continue
        values = job[key] if isinstance(job[key], list) else [job[key]]
        if not all(isinstance(v, str) for v in values) or (key not in spec.lists and len(values) != 1):
            raise where.error(key, f"{key} must be {'a path or a list of paths' if key in spec.lists else 'one path'}")
        found = [_matches(v, root, False, key, where) for v in values]
        unmatched = [v for v, m in zip(values, found) if not m]
        if unmatched:
            raise where.error(key, f"{key} {unmatched[0]!r} matches nothing")
        fixed[key] = [p for m in found for p in m]
    matches: list[str | None] = [None]
    if spec.expand and spec.expand in job:
        pattern = job[spec.expand]
        if not isinstance(pattern, str):
            raise where.error(spec.expand, f"{spec.expand} must be one path or glob")
        matches = list(_matches(pattern, root, pattern.endswith("/"), spec.expand, where))
        if not matches:
            raise where.error(spec.expand, f"{spec.expand} {pattern!r} matches nothing")
    fans = matches != [None]
    if spec.expand == "adapter" and "adapters" in spec.inputs and fans == ("adapters" in fixed):  # merge / unmerge
        raise where.error(None, f"op {op!r} needs either adapter (one task per match) or adapters (one task)")
    missing = [k for k in spec.required if k not in fixed and not (k == spec.expand and fans)]
    if missing:
        raise where.error(None, f"op {op!r} needs {', '.join(missing)}")
    return fixed, matches


def _job_tasks(job: dict[str, Any], name: str, op: str, root: Path, defaults: dict[str, Any], where: _Where) -> list[Task]:
    """Every task of one job: one per match of its fanning-out input, each with its output path."""
    spec = OPS[op]
    options = _job_options(job, op, defaults, where)
    fixed, matches = _job_inputs(job, op, root, where)
    output = job.get("output")
    if not isinstance(output, str) or not output:
        raise where.error("output", "each job needs an output pattern, e.g. \"out/{name}\"")
    _output_pattern(output, where)
    if len(matches) > 1 and "{name}" not in output:
        raise where.error("output", f"{spec.expand} matches {len(matches)} inputs: the output needs {{name}}")
    tasks = []
    for m in matches:
        inputs = dict(fixed)
        if m is not None:
            inputs["adapters" if spec.expand == "adapter" and "adapters" in spec.inputs else spec.expand] = [m]
        tname = _task_name(m) if m is not None else name
        out = output.replace("{name}", tname).replace("{job}", name)
        out = (out if Path(out).is_absolute() else str(root / out)).rstrip("/")
        tasks.append(Task(name, op, tname, inputs, out, dict(options)))
        _check_output_vs_inputs(tasks[-1], where)
    return tasks


def parse_manifest(path: str | Path) -> list[Task]:
    """Read and check a manifest and expand it into tasks, in a stable order (job by job, matches sorted)."""
    path = Path(path)
    text, data = _read_manifest(path)
    def_lines, job_lines = _lines(text)
    defaults = data.get("defaults", {})
    _check_nul(defaults, _Where(path, def_lines), "default ")
    for key in defaults:
        if not any(key in option_names(o) for o in OPS):
            raise _Where(path, def_lines).error(key, f"unknown default {key!r}")
    tasks: list[Task] = []
    outputs: dict[str, tuple[str, str]] = {}
    for n, job in enumerate(data["job"]):
        lines = job_lines[n] if n < len(job_lines) else {}
        op, name = job.get("op"), job.get("name")
        named = isinstance(name, str) and re.fullmatch(r"[\w.-]+", name) is not None
        where = _Where(path, lines, f"job {name!r}" if named else f"job #{n + 1}")
        _check_nul(job, where)
        if not named:
            raise where.error("name", "each job needs a name of letters, digits, '.', '_' or '-'"
                              + (f" (name is {type(name).__name__} {name!r:.40})" if name is not None else ""))
        if op is None:
            raise where.error("op", "job has no op")
        if not isinstance(op, str):
            raise where.error("op", f"op must be a string (one of {', '.join(OPS)}), got {type(op).__name__} {op!r:.40}")
        if op not in OPS:
            raise where.error("op", f"unknown op {op!r} (one of {', '.join(OPS)})")
        if any(t.job == name for t in tasks):
            raise where.error("name", f"two jobs are named {name!r}")
        for task in _job_tasks(job, name, op, path.parent, defaults, where):
            key = _resolved(task.output)  # o/x, o/./x, o/z/../x and a symlinked folder are one output
            if key in outputs:
                other, shown = outputs[key]
                same = task.output if shown == task.output else f"{task.output} (the same as {shown})"
                raise where.error("output", f"jobs {other!r} and {name!r} both write {same}")
            outputs[key] = (name, task.output)
            tasks.append(task)
    return tasks


def shard(tasks: list[Task], index: int, count: int) -> list[Task]:
    """The index-th (1-based) of `count` deterministic round-robin slices of the task list."""
    if count < 1 or not 1 <= index <= count:
        raise AdapteropsError(f"--shard {index}/{count}: need 1 <= I <= N")
    return [t for n, t in enumerate(tasks) if n % count == index - 1]
