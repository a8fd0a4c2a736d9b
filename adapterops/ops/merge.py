"""`merge`: fold one or more LoRA/DoRA adapters into a base checkpoint, streaming, into an atomic output folder."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter, open_adapter, untrained_warning
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.dora_norms import write_dora_norms
from adapterops.io.hub import resolve
from adapterops.io.nf4_checkpoint import dequantized_view, is_nf4
from adapterops.pipeline.build import (
    build_tensor,
    read_factors,
    read_source,
    source_file,
)
from adapterops.pipeline.options import (
    as_list,
    check_weights,
    parse_dtype,
    parse_size,
    pick_device,
)
from adapterops.pipeline.output import write_index_and_files
from adapterops.pipeline.params import ParamStep
from adapterops.pipeline.plan import BiasStep, MergePlan, plan_merge
from adapterops.pipeline.requantize import write_requantized
from adapterops.pipeline.stream import Buffers, prefetched, write_shards
from adapterops.pipeline.threads import compute_threads
from adapterops.pipeline.token_steps import TokenStep
from adapterops.result import Result


@dataclass
class MergeResult(Result):
    """What a merge did (the CLI's --json summary)."""

    output: str
    dry_run: bool
    modules_merged: int
    tensors_written: int
    tensors_changed: int
    bytes_written: int
    shards: int
    seconds: float
    device: str
    warnings: list[str] = field(default_factory=list)
    changes: list[dict[str, object]] = field(default_factory=list)
    # how much of ΔW survived the rounding into the output dtype (None for --dry-run and --requantize)
    changed_share: float | None = None  # elements W' ≠ W over all merged tensors' elements
    survived: float | None = None  # ‖W' − W‖_F / ‖ΔW‖_F over the tensors where ΔW = s·B·A
    module_changes: list[dict[str, object]] = field(default_factory=list)  # per merged tensor: tensor, changed_share, survived


LITTLE = 0.5  # a tensor (or merge) keeping less than this share of ‖ΔW‖_F is warned about


def _sig(x: float) -> float:
    return float(f"{x:.6g}")


def change_report(stats: dict[str, dict], zero_delta: set[str]) -> tuple[list[dict[str, object]], float | None, float | None, list[str]]:
    """Per tensor and in total: the share of elements the merge changed and ‖W' − W‖/‖ΔW‖, with warnings for
    tensors (and a merge) that changed nothing or kept little of ΔW. Tensors whose ΔW is exactly zero because
    lora_B is all zero (`zero_delta`: the untrained warning says so already) get no second warning."""
    rows, nothing, lost, little = [], [], [], []
    numel = changed = 0
    diff_sq = delta_sq = 0.0
    for name, st in stats.items():
        numel += st["numel"]
        changed += st["changed"]
        dn = st["delta_norm"]
        survived = None
        if dn is not None:
            diff_sq, delta_sq = diff_sq + st["diff_norm"] ** 2, delta_sq + dn**2
            survived = _sig(st["diff_norm"] / dn) if dn > 0 else None
        rows.append({"tensor": name, "changed_share": _sig(st["changed"] / st["numel"]) if st["numel"] else None, "survived": survived})
        if name in zero_delta:
            continue
        if st["changed"] == 0:
            (lost if dn is None or dn > 0 else nothing).append(name)
        elif survived is not None and survived < LITTLE:
            little.append(name)
    warnings = []
    if nothing:
        warnings.append(f"{len(nothing)} merged tensors changed nothing: their ΔW is exactly 0 (a scale or weight of 0, or an "
                        f"all-zero lora_A), e.g. {nothing[0]}")
    if lost:
        warnings.append(f"{len(lost)} merged tensors changed nothing: ΔW is below the output dtype's resolution and rounds "
                        f"away (merge in float32 with --dtype float32, or check the adapter's scale), e.g. {lost[0]}")
    if little:
        warnings.append(f"{len(little)} merged tensors kept less than {LITTLE:.0%} of ‖ΔW‖_F after rounding to the output dtype, "
                        f"e.g. {little[0]}")
    if stats and changed == 0 and len(zero_delta & stats.keys()) < len(stats):
        warnings.append("the merge changed nothing: every output tensor equals the base (the merged model behaves exactly like the base)")
    total_share = _sig(changed / numel) if numel else None
    total_survived = _sig((diff_sq / delta_sq) ** 0.5) if delta_sq > 0 else None
    return rows, total_share, total_survived, warnings


def write_checkpoint(plan: MergePlan, ckpt: Checkpoint, adapters: list[Adapter], out: Path, device: torch.device, quiet: bool,
                     stats: dict[str, dict] | None = None) -> None:
    """Write every shard, the index, the config, the other files and any DoRA sidecar into `out` (a temporary folder);
    each merged tensor's change figures go into `stats` (build_tensor)."""
    norms: dict[str, torch.Tensor] = {}
    buffers = Buffers()  # each merged tensor reuses a written one's buffer instead of fresh pages
    # the reader thread reads each tensor's source and its adapter factors while the previous one is computed
    sources = prefetched(plan.tensors, lambda tp: (read_source(tp, ckpt, adapters), read_factors(tp, adapters, device)))
    items = ((tp.name, build_tensor(tp, src, adapters, device, norms, factors, source=source_file(tp, ckpt, adapters),
                                    stats=stats, buffers=buffers))
             for tp, (src, factors) in sources)
    # small checks and reads (here and in the reader thread: torch's count is process-wide) on compute_threads' count:
    # two threads meet at a barrier per small tensor, which waits for a descheduled thread on a busy machine
    with compute_threads(device):
        write_shards(out, [(s.filename, [t.spec for t in s.tensors]) for s in plan.shards], items, quiet=quiet, desc="merge",
                     buffers=buffers)
    if norms:
        write_dora_norms(out, norms, [str(a.path) for a in adapters])
    write_index_and_files(out, plan.write_index, {t.name: s.filename for s in plan.shards for t in s.tensors},
                          plan.index_metadata, plan.extra_files, plan.config)


def check_unused_replacements(plan: MergePlan, adapters: list[Adapter]) -> None:
    """NaN/Inf in a replaced tensor the plan does not write (the second copy of a tied embedding) is refused too:
    the written copy is checked as it is read (read_source), this one here."""
    used = {tp.replacement for tp in plan.tensors if tp.replacement is not None}
    for i, ad in enumerate(adapters):
        for key in ad.replacements.values():
            if (i, key) not in used:
                ad.read_finite(key)


def untrained(adapters: list[Adapter], found: set[tuple[int, str]] | None = None) -> list[str]:
    """A warning per adapter with all-zero lora_B modules: they change nothing (the usual cause of "my merged
    model behaves exactly like the base"). Each (adapter index, module) found is added to `found`."""
    out = []
    for i, ad in enumerate(adapters):
        zero = ad.untrained_modules()
        if found is not None:
            found.update((i, m) for m in zero)
        if zero:
            whole = "every module: merging it changes nothing" if len(zero) == len(ad.modules) else "those modules are unchanged"
            out.append(f"{ad.path}: {untrained_warning(zero)}; {whole}")
    return out


def describe_changes(plan: MergePlan, adapters: list[Adapter]) -> list[dict[str, object]]:
    """One entry per changed tensor: what will be done to it (for --dry-run and --json)."""
    out = []
    for tp in plan.tensors:
        if not tp.changed:
            continue
        ops: list[str] = []
        if tp.replacement is not None:
            ops.append(f"replace from {adapters[tp.replacement[0]].path}")
        for s in tp.steps:
            if isinstance(s, ParamStep):
                part = "" if s.expert is None else f" expert {s.expert}" + ("" if s.chunk is None else f" chunk {s.chunk[0] + 1}/{s.chunk[1]}")
                ops.append(f"lora {s.param}{part} r={s.r} scale={s.scale:g} from {adapters[s.adapter].path}")
                continue
            if isinstance(s, TokenStep):
                ops.append(f"trainable tokens {s.module.name}: {len(s.module.indices)} rows from {adapters[s.adapter].path}")
                continue
            what = "lora_bias" if isinstance(s, BiasStep) else ("dora" if s.module.is_dora else "lora")
            what = getattr(s.module, "kind", what) + (" bias" if getattr(s, "bias", False) else "") if hasattr(s.module, "peft_type") else what
            ops.append(f"{what} {s.module.name} r={s.module.r} scale={s.scale:g} from {adapters[s.adapter].path}")
        out.append({"tensor": tp.name, "ops": ops})
    return out


def merge(
    base: str | os.PathLike,
    adapters: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    dtype: str | torch.dtype | None = None,
    device: str = "cpu",
    revision: str | None = None,
    max_shard_size: str | int | None = None,
    force: bool = False,
    dry_run: bool = False,
    requantize: bool = False,
    allow_pickle: bool = False,
    quiet: bool = True,
    report: bool = True,
) -> MergeResult:
    """Merge adapters into a base checkpoint and write OUT, as PEFT's `merge_and_unload` + `save_pretrained` would.

    An NF4 base (bitsandbytes 4-bit, detected from its tensors) is dequantized exactly, merged in float32 and
    written in `dtype` (default bfloat16), rounded once; with `requantize` the merged weights are quantized to NF4
    again, as PEFT does (see requantize.py).

    `report` (default): measure what survived the rounding into the output dtype, per merged tensor (the share of
    elements that changed, ‖W' − W‖/‖s·B·A‖) and warn where nothing changed; False skips that arithmetic (about a
    third of a bf16 merge's compute; the all-zero lora_B warning stays).

    Example::

        adapterops.merge("./llama", ["./lora-a", "./lora-b"], "./merged", weights=[1, 0.5], dtype="bfloat16")
    """
    start = time.perf_counter()
    adapter_specs = as_list(adapters)
    out = Path(out)
    torch_dtype = parse_dtype(dtype)
    dev = pick_device(device)
    shard_size = parse_size(max_shard_size)
    base_path = resolve(str(base), revision)
    adapter_paths = [resolve(str(a)) for a in adapter_specs]
    weights = check_weights(weights, adapter_paths)
    if not dry_run:
        check_output(out, [base_path, *adapter_paths], force)
    with ExitStack() as stack:
        ckpt = nf4_ckpt = stack.enter_context(open_checkpoint(base_path, allow_pickle))
        work_dtype = None
        if requantize and not is_nf4(ckpt):
            raise AdapteropsError("--requantize needs an NF4 base (bitsandbytes 4-bit weights)", file=base_path)
        if requantize and (torch_dtype is not None or shard_size is not None):
            raise AdapteropsError("--requantize keeps the base's NF4 layout: drop --dtype and --max-shard-size")
        if requantize:  # PEFT's QLoRA merge: bnb-dequantized weights (their dtype) + float32 ΔW, quantized again
            ckpt, work_dtype = dequantized_view(nf4_ckpt, None, dev), torch.float32
        elif is_nf4(ckpt):  # a QLoRA base: dequantize exactly, merge in float32, round once
            ckpt = dequantized_view(ckpt, torch.float32, dev)
            torch_dtype, work_dtype = torch_dtype or torch.bfloat16, torch.float32
        opened = [stack.enter_context(open_adapter(p, allow_pickle, tuners=True, params=True, tokens=True)) for p in adapter_paths]
        tuner = next((a for a in opened if a.tuner_modules), None)
        if tuner is not None and nf4_ckpt is not ckpt:
            raise AdapteropsError(f"{tuner.peft_type} adapters are merged into 16/32-bit bases only (PEFT cannot merge them into "
                                  "bitsandbytes 4-bit layers): dequantize the base first", file=tuner.path)
        plan = plan_merge(ckpt, opened, weights, torch_dtype, shard_size, work_dtype)
        check_unused_replacements(plan, opened)
        zero_b: set[tuple[int, str]] = set()
        warnings = plan.warnings + untrained(opened, zero_b)
        written = plan.total_bytes
        stats: dict[str, dict] | None = None
        if not dry_run:
            with atomic_dir(out, replace=force) as tmp:
                if requantize:
                    written = write_requantized(plan, nf4_ckpt, ckpt, opened, tmp, dev, quiet)
                else:
                    stats = {} if report else None
                    write_checkpoint(plan, ckpt, opened, tmp, dev, quiet, stats)
    changed = describe_changes(plan, opened)
    rows, share, survived = [], None, None
    if stats is not None:
        zero_delta = {tp.name for tp in plan.tensors if tp.steps and all(
            (s.adapter, getattr(getattr(s, "module", None), "name", None)) in zero_b for s in tp.steps)}
        rows, share, survived, more = change_report(stats, zero_delta)
        warnings += more
    return MergeResult(
        output=str(out),
        dry_run=dry_run,
        modules_merged=plan.modules_merged,
        tensors_written=0 if dry_run else len(plan.tensors),
        tensors_changed=len(changed),
        bytes_written=0 if dry_run else written,
        shards=len(plan.shards),
        seconds=round(time.perf_counter() - start, 3),
        device=str(dev),
        warnings=warnings,
        changes=changed if dry_run else [],
        changed_share=share,
        survived=survived,
        module_changes=rows,
    )
