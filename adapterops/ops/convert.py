"""`convert`: an adapter made servable by an engine (`--for ENGINE`) and/or written in another format (`--to`
peft | gguf | mlx | torchtune, from the detected or `--from` format).

One command, up to three legs, each through a temporary folder beside OUT: a foreign source is first read into a
PEFT adapter (`pipeline/convert_formats.py`); with an engine, `pipeline/conversion.py` makes it servable (and the
output must pass `check` before it is put in place); a foreign target is written last. The report
(`adapterops-convert.json`, beside a PEFT output) says what each leg did.
"""

from __future__ import annotations

import os
import time
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from adapterops.errors import AdapteropsError
from adapterops.io.adapter import open_adapter
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.checkpoint import open_checkpoint
from adapterops.io.engines import load_engine
from adapterops.io.hub import resolve
from adapterops.io.paths import regular_file
from adapterops.io.jsonfile import write_json
from adapterops.pipeline.conversion import WRITERS, prepare
from adapterops.pipeline.options import check_count, check_number
from adapterops.io.formats import FORMATS, detect_format
from adapterops.pipeline.convert_formats import convert_format
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
    check: str  # the verdict of `check` on the output: fine, or "not run" without an engine
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    from_format: str = "peft"
    formats: list[dict[str, object]] = field(default_factory=list)  # each format leg's report (FormatConversion)


def convert(
    adapter: str | os.PathLike, out: str | os.PathLike, *, engine: str | None = None, to: str = "peft",
    from_format: str | None = None, base: str | os.PathLike | None = None, rank: int | None = None,
    energy: float | None = None, max_error: float = 0.01, max_lora_rank: int | None = None, allow_lossy: bool = False,
    revision: str | None = None, force: bool = False, allow_pickle: bool = False,
) -> ConvertResult:
    """Write ADAPTER as an adapter that `engine` (vllm, sglang, tgi, lorax, llamacpp, or NAME@RELEASE) serves with
    the same effect — rsLoRA/patterns baked, ranks padded or truncated, DoRA and modules_to_save re-extracted
    against `base`, keys renamed; `max_error` bounds a modules_to_save copy's low-rank relative error — and/or in
    the format `to` (peft, gguf, mlx, torchtune), reading a PEFT, GGUF, mlx-lm or torchtune source (`from_format`,
    or detected). Format conversions keep every module's ΔW (scales folded where the target cannot express them);
    what they cannot carry (DoRA, modules_to_save, biases) is refused unless `allow_lossy` re-extracts it.

    Example::

        adapterops.convert("./dora-lora", "./for-vllm", engine="vllm", base="./llama", energy=0.999).modules
        adapterops.convert("./my-lora", "./my-lora.gguf", to="gguf", base="./llama")
    """
    start = time.perf_counter()
    check_count("rank", rank), check_count("max_lora_rank", max_lora_rank)
    check_number("energy", energy, lo=0, hi=1, lo_open=True), check_number("max_error", max_error, lo=0, hi=1)
    if rank is not None and energy is not None:
        raise AdapteropsError("give at most one of --rank or --energy")
    if to not in FORMATS:
        raise AdapteropsError(f"unknown output format {to!r}; known: {', '.join(FORMATS)}")
    if from_format is not None and from_format not in FORMATS:
        raise AdapteropsError(f"unknown source format {from_format!r}; known: {', '.join(FORMATS)}")
    path = resolve(str(adapter))
    if not path.is_dir():  # a file (GGUF): the user named it, so it must be a regular file (a FIFO would block)
        regular_file(path, "adapter file")
    source = from_format or detect_format(path) or "peft"
    if engine is None:
        if source == to:
            raise AdapteropsError(f"is already a {to} adapter: give --for ENGINE, or --to another format", file=path)
        if rank is not None or energy is not None or max_lora_rank is not None:
            raise AdapteropsError("--rank, --energy and --max-lora-rank apply with --for ENGINE only")
        fc = convert_format(path, out, to=to, from_=source, base=base, allow_lossy=allow_lossy, force=force,
                            allow_pickle=allow_pickle)
        return _format_only(adapter, out, base, fc, start)
    out = Path(out)
    base_path = resolve(str(base), revision) if base is not None else None
    check_output(out, [path] + ([base_path] if base_path else []), force)
    legs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix=".adapterops-convert-", dir=out.parent if out.parent.exists() else None) as work:
        if source != "peft":  # read the foreign adapter into PEFT first
            fc = convert_format(path, Path(work) / "source", to="peft", from_=source, base=base,
                                allow_lossy=allow_lossy, force=True, allow_pickle=allow_pickle)
            legs.append(fc.to_dict())
            path = Path(work) / "source"
        served = out if to == "peft" else Path(work) / "served"
        result = _for_engine(path, served, engine, base, base_path, rank, energy, max_error, max_lora_rank,
                             force if to == "peft" else True, allow_pickle)
        if to != "peft":  # then write the servable adapter in the target format
            fc = convert_format(served, out, to=to, from_="peft", base=base, allow_lossy=allow_lossy, force=force)
            legs.append(fc.to_dict())
            result.warnings += fc.warnings
            result.to = to
    result.adapter, result.output, result.from_format, result.formats = str(adapter), str(out), source, legs
    result.seconds = round(time.perf_counter() - start, 3)
    return result


def _format_only(adapter: str | os.PathLike, out: str | os.PathLike, base, fc, start: float) -> ConvertResult:
    """The report of a conversion between formats alone (no engine: `check` is not run)."""
    modules = {row["module"]: {"how": "re-extracted" if row.get("lossy_error") is not None else ("folded" if fc.folded else "kept"),
                               "rank_in": row["rank"], "rank": row["rank"], "retained_fro": 1.0,
                               "relative_error": float(f"{row.get('lossy_error') or 0.0:.6g}")} for row in fc.modules}
    worst = max((m["relative_error"] for m in modules.values()), default=0.0)
    changes = [f"{fc.from_format} → {fc.to_format}" + (" (exact)" if fc.exact else (", scales folded into lora_B" if fc.folded else ""))]
    changes += [f"dropped {name}" for name in fc.dropped]
    return ConvertResult(SCHEMA, str(adapter), str(out), None if base is None else str(base), None, None, fc.to_format,
                         max(fc.rank or 1, max((m["rank"] for m in modules.values()), default=1)), changes, modules,
                         worst, "not run", round(time.perf_counter() - start, 3), list(fc.warnings),
                         fc.from_format, [fc.to_dict()])


def _for_engine(path: Path, out: Path, engine: str, base, base_path, rank, energy, max_error, max_lora_rank, force: bool,
                allow_pickle: bool) -> ConvertResult:
    """The engine leg: a PEFT adapter the engine serves with the same effect, checked before it is put in place."""
    rules = load_engine(engine)
    with ExitStack() as stack:
        ad = stack.enter_context(open_adapter(path, allow_pickle))
        ckpt = stack.enter_context(open_checkpoint(base_path, allow_pickle)) if base_path else None
        conv = prepare(ad, rules, ckpt, rank=rank, energy=energy, max_error=max_error, max_lora_rank=max_lora_rank)
        modules = {n: {"how": m.how, "rank_in": m.rank_in, "rank": m.rank, "retained_fro": round(m.retained_fro, 6),
                       "relative_error": float(f"{m.relative_error:.6g}")} for n, m in conv.modules.items()}
        worst = max((m.relative_error for m in conv.modules.values()), default=0.0)
        result = ConvertResult(SCHEMA, str(path), str(out), None if base is None else str(base), rules.engine,
                               rules.release, "peft", conv.rank, conv.changes, modules, float(f"{worst:.6g}"), "fine")
        with atomic_dir(out, replace=force) as tmp:
            WRITERS["peft"](conv, tmp)
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
    return result
