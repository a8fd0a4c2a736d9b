"""`convert`: an adapter turned into one a serving engine serves with the same effect (`--for ENGINE`), written in
a format (`to`; PEFT so far). The work is `pipeline/conversion.py`; this op opens the inputs, writes the output
with its report (`adapterops-convert.json`) atomically, and checks the output against the engine's rules before
it is put in place.
"""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from adapterops.errors import AdapteropsError
from adapterops.io.adapter import open_adapter
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.checkpoint import open_checkpoint
from adapterops.io.engines import load_engine
from adapterops.io.hub import resolve
from adapterops.io.jsonfile import write_json
from adapterops.pipeline.conversion import WRITERS, prepare
from adapterops.pipeline.serving import findings, verdict
from adapterops.result import Result

SCHEMA = "adapterops.convert/1"
REPORT_NAME = "adapterops-convert.json"


@dataclass
class ConvertResult(Result):
    """What a conversion did (schema adapterops.convert/1; also written to OUT/adapterops-convert.json)."""

    schema: str
    adapter: str
    output: str
    base: str | None
    engine: str | None
    release: str | None
    to: str
    rank: int
    changes: list[str]
    modules: dict[str, dict[str, object]]  # per module: how, rank_in, rank, retained_fro, relative_error
    max_relative_error: float
    check: str  # the verdict of `check` on the output: fine
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def convert(
    adapter: str | os.PathLike, out: str | os.PathLike, *, engine: str, to: str = "peft",
    base: str | os.PathLike | None = None, rank: int | None = None, energy: float | None = None, max_error: float = 0.01,
    max_lora_rank: int | None = None, revision: str | None = None, force: bool = False, allow_pickle: bool = False,
) -> ConvertResult:
    """Write ADAPTER as an adapter that `engine` (vllm, sglang, tgi, lorax, llamacpp, or NAME@RELEASE) serves with
    the same effect: rsLoRA/patterns baked, ranks padded or truncated, DoRA and modules_to_save re-extracted
    against `base`, keys renamed. `max_error` bounds a modules_to_save copy's low-rank relative error.

    Example::

        adapterops.convert("./dora-lora", "./for-vllm", engine="vllm", base="./llama", energy=0.999).modules
    """
    start = time.perf_counter()
    if rank is not None and energy is not None:
        raise AdapteropsError("give at most one of --rank or --energy")
    if to not in WRITERS:
        raise AdapteropsError(f"unknown output format {to!r}; known: {', '.join(sorted(WRITERS))}")
    rules = load_engine(engine)
    path = resolve(str(adapter))
    base_path = resolve(str(base), revision) if base is not None else None
    out = Path(out)
    check_output(out, [path] + ([base_path] if base_path else []), force)
    with ExitStack() as stack:
        ad = stack.enter_context(open_adapter(path, allow_pickle))
        ckpt = stack.enter_context(open_checkpoint(base_path, allow_pickle)) if base_path else None
        conv = prepare(ad, rules, ckpt, rank=rank, energy=energy, max_error=max_error, max_lora_rank=max_lora_rank)
        modules = {n: {"how": m.how, "rank_in": m.rank_in, "rank": m.rank, "retained_fro": round(m.retained_fro, 6),
                       "relative_error": float(f"{m.relative_error:.6g}")} for n, m in conv.modules.items()}
        worst = max((m.relative_error for m in conv.modules.values()), default=0.0)
        result = ConvertResult(SCHEMA, str(adapter), str(out), None if base is None else str(base), rules.engine,
                               rules.release, to, conv.rank, conv.changes, modules, float(f"{worst:.6g}"), "fine")
        with atomic_dir(out, replace=force) as tmp:
            WRITERS[to](conv, tmp)
            with open_adapter(tmp) as written:  # the output must pass `check` before it is put in place
                left = [f for f in findings(written, rules, ckpt, max_lora_rank=max_lora_rank) if f.severity != "fine"]
            if left:
                raise AdapteropsError(f"internal: the converted adapter still fails check for {rules.label}: "
                                      + "; ".join(f"{f.rule}: {f.message}" for f in left), file=path)
            result.check = verdict(left)
            write_json(tmp / REPORT_NAME, result.to_dict() | {"seconds": 0.0}, sort_keys=True)
    if worst > 0.1:
        name = max(conv.modules.values(), key=lambda m: m.relative_error)
        result.warnings.append(f"{sum(m.relative_error > 0.1 for m in conv.modules.values())} modules keep a relative error "
                               f"above 0.1 (largest {worst:.3g}, {name.name}, {name.how}); a higher --energy or rank "
                               "(and the engine's --max-lora-rank) keeps more, or merge instead")
    result.seconds = round(time.perf_counter() - start, 3)
    return result
