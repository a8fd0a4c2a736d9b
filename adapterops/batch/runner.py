"""`batch`: run a manifest's tasks in parallel processes, skip outputs that are current, report every task.

Each output gets a provenance record (io/provenance.py): the op, its options, the content hashes of its inputs
and the adapterops version. A task whose output carries the same record is current and skipped; `check` only
says which outputs are missing or stale. A failing task never stops the others.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from adapterops.batch.manifest import Task, parse_manifest, shard
from adapterops.errors import AdapteropsError
from adapterops.io.atomic import atomic_file
from adapterops.io.provenance import (
    HashCache,
    hash_input,
    make_record,
    read_provenance,
    write_provenance,
)
from adapterops.pipeline.threads import usable_cores
from adapterops.registry import OPS
from adapterops.result import Result
from adapterops.version import __version__

GiB = 1 << 30


@dataclass
class TaskReport:
    """What happened to one task."""

    task: str
    op: str
    status: str  # done, skipped (current), failed; with check: current, stale, missing
    seconds: float
    inputs: dict[str, list[str]]
    output: str
    error: str | None = None


@dataclass
class BatchResult(Result):
    """Every task's report, and the counts."""

    manifest: str
    shard: str | None
    check: bool
    tasks: list[TaskReport] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Tasks per status."""
        out: dict[str, int] = {}
        for t in self.tasks:
            out[t.status] = out.get(t.status, 0) + 1
        return out

    @property
    def ok(self) -> bool:
        """No task failed, and with check every output is current."""
        return not any(t.status in ("failed", "stale", "missing") for t in self.tasks)

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict (the --json REPORT)."""
        return dict(super().to_dict(), counts=self.counts, ok=self.ok)


def default_jobs() -> int:
    """Parallel processes by default: one per core, but no more than one per 4 GiB of memory."""
    cores = usable_cores()
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        mem = 4 * GiB * cores
    return max(1, min(cores, mem // (4 * GiB)))


def task_record(task: Task, cache: HashCache) -> dict[str, Any]:
    """The provenance record this task's output must carry to be current."""
    from adapterops.io.hub import resolve

    hashes = {p: hash_input(resolve(p), cache) for paths in task.inputs.values() for p in paths}
    return make_record(task.op, task.options, task.inputs, hashes, __version__)


def _call(task: Task) -> None:
    """Run a task's library call, writing its output."""
    spec = OPS[task.op]
    func = spec.load()
    args = [task.inputs[k] if k in spec.lists else task.inputs[k][0] for k in spec.inputs if k in task.inputs]
    kwargs = {k: task.inputs[k][0] for k in spec.keyword_inputs if k in task.inputs}
    if spec.report:  # analyze, inspect, diff: write the JSON report
        report = func(*args, **kwargs, **task.options)
        with atomic_file(Path(task.output)) as tmp:
            # a name no UTF-8 can hold (a lone surrogate from an undecodable file name) becomes its JSON escape \udcff
            tmp.write_text(json.dumps(report.to_dict(), indent=2, ensure_ascii=False, default=str) + "\n", encoding="utf-8",
                           errors="backslashreplace")
        return
    accepted = inspect.signature(func).parameters
    extra = {k: v for k, v in (("force", True), ("quiet", True)) if k in accepted}
    func(*args, task.output, **kwargs, **task.options, **extra)


def task_status(task: Task, cache: HashCache) -> tuple[str, dict[str, Any] | None, str | None]:
    """("current" | "stale" | "missing", the record the output needs, error): a cheap check before any work."""
    out = Path(task.output)
    try:
        record = task_record(task, cache)
    except AdapteropsError as exc:
        return "failed", None, str(exc)
    current = read_provenance(out, OPS[task.op].report)
    if not out.exists():
        return "missing", record, None
    return ("current" if current is not None and current.get("key") == record["key"] else "stale"), record, None


def run_task(task: Task, record: dict[str, Any]) -> TaskReport:
    """Write one task's output and its provenance record; never raises (a failure is reported)."""
    start = time.perf_counter()
    out = Path(task.output)
    report = OPS[task.op].report
    status, error = "done", None
    try:
        if out.exists() and read_provenance(out, report) is None and (out.is_file() or any(out.iterdir())):
            raise AdapteropsError("exists and was not written by adapterops batch; move it away or remove it", file=out)
        _call(task)
        write_provenance(out, record, report)
    except AdapteropsError as exc:
        status, error = "failed", str(exc)
    except Exception as exc:  # a bug or an environment problem: still one line, still only this task
        status, error = "failed", f"{type(exc).__name__}: {' '.join(str(exc).split())}"
    return TaskReport(task.id, task.op, status, round(time.perf_counter() - start, 3), task.inputs, task.output, error)


def _init_worker(threads: int) -> None:
    """Share the cores between the worker processes: torch's threads and the merge's block workers (unless the
    user set ADAPTEROPS_MERGE_WORKERS)."""
    import torch

    torch.set_num_threads(threads)
    os.environ.setdefault("ADAPTEROPS_MERGE_WORKERS", str(threads))


def run_batch(
    manifest: str | os.PathLike, *, jobs: int | None = None, check: bool = False, shard_spec: str | None = None,
    progress: bool = True, report_file: str | os.PathLike | None = None,
) -> BatchResult:
    """Validate the manifest, then run (or check) its tasks, `jobs` processes at a time.

    `report_file`: a file the caller writes once the run is over (the CLI's --json-file); a manifest whose task would
    read it, or write it or the folder holding it, is refused before any work.

    Example::

        adapterops.run_batch("adapters.toml", jobs=2, check=True).ok
    """
    tasks = parse_manifest(manifest)
    if report_file is not None:
        _check_report_file(Path(report_file), tasks)
    if shard_spec is not None:
        try:
            i, n = (int(x) for x in shard_spec.split("/"))
        except ValueError:
            raise AdapteropsError(f"--shard {shard_spec!r}: use I/N, e.g. 1/4") from None
        tasks = shard(tasks, i, n)
    jobs = jobs or default_jobs()
    result = BatchResult(str(manifest), shard_spec, check)
    done: dict[str, TaskReport] = {}

    def note(rep: TaskReport) -> None:
        done[rep.task] = rep
        if progress:
            tail = f": {rep.error}" if rep.error else ""
            print(f"[{len(done)}/{len(tasks)}] {rep.status:<8} {rep.task} ({rep.seconds:.1f}s){tail}", file=sys.stderr, flush=True)

    # First the cheap part, in this process: hash the inputs, compare with each output's record.
    cache = HashCache()
    todo: list[tuple[Task, dict[str, Any]]] = []
    for t in tasks:
        start = time.perf_counter()
        status, record, error = task_status(t, cache)
        if status == "current" or check or error:
            status = "skipped" if status == "current" and not check else status
            note(TaskReport(t.id, t.op, status, round(time.perf_counter() - start, 3), t.inputs, t.output, error))
        else:
            todo.append((t, record))
    cache.save()
    # Then the work, `jobs` processes at a time.
    if jobs == 1 or len(todo) <= 1:
        for t, record in todo:
            note(run_task(t, record))
    else:
        cores = usable_cores()
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=_context(),
                                 initializer=_init_worker, initargs=(max(1, cores // jobs),)) as pool:
            futures = {pool.submit(run_task, t, record): t for t, record in todo}
            for f in as_completed(futures):
                try:
                    note(f.result())
                except Exception as exc:  # the worker process died (killed, out of memory)
                    t = futures[f]
                    note(TaskReport(t.id, t.op, "failed", 0.0, t.inputs, t.output, f"worker died: {type(exc).__name__}"))
    result.tasks = [done[t.id] for t in tasks]  # manifest order, whatever order they finished in
    return result


def _check_report_file(report: Path, tasks: list[Task]) -> None:
    """Refuse a report file that is, or is inside, a task's output or input (the report would be replaced by the
    task, or would replace its input)."""
    target = Path(os.path.realpath(report))
    for t in tasks:
        for what, p in [("output", t.output)] + [("input", p) for ps in t.inputs.values() for p in ps]:
            if what == "input" and not os.path.lexists(p):
                continue  # a Hub id
            real = Path(os.path.realpath(p))
            if target == real or target.is_relative_to(real):
                raise AdapteropsError(f"{'is' if target == real else 'is inside'} the {what} {p} of task {t.id}; the "
                                      "batch report must be written elsewhere", file=report)


def _context():
    """fork where the platform has it (workers start in milliseconds with torch already imported; this process
    has run no torch kernels, so no thread pool is copied half-way), spawn elsewhere."""
    import multiprocessing

    return get_context("fork" if "fork" in multiprocessing.get_all_start_methods() and sys.platform != "darwin" else "spawn")
