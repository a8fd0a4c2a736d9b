"""`unmerge`: take merged adapters back out of a checkpoint, W = W' − ΔW in float32 with one rounding, streaming."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.core.finite import all_finite
from adapterops.core.lora import (
    delta_weight,
    dora_factor,
    unmerge_dora,
    unmerge_lora,
)
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter, open_adapter
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.dora_norms import SIDECAR_NAME, norm_key, read_dora_norms
from adapterops.io.hub import resolve
from adapterops.io.nf4_checkpoint import is_nf4
from adapterops.pipeline.build import (
    adapter_tensor,
    blocked_merge,
    blocked_path,
    overflow_error,
    param_step_delta,
)
from adapterops.pipeline.options import (
    as_list,
    cast_checked,
    check_weights,
    pick_device,
)
from adapterops.pipeline.output import write_index_and_files
from adapterops.pipeline.params import ParamStep
from adapterops.pipeline.plan import (
    BiasStep,
    LoraStep,
    MergePlan,
    TensorPlan,
    plan_merge,
)
from adapterops.pipeline.stream import (
    Buffers,
    ByteRange,
    byte_range,
    prefetched,
    write_shards,
)
from adapterops.result import Result


@dataclass
class UnmergeResult(Result):
    """What an unmerge did (the CLI's --json summary)."""

    output: str
    modules_unmerged: int
    tensors_written: int
    tensors_changed: int
    bytes_written: int
    seconds: float
    device: str
    warnings: list[str] = field(default_factory=list)


def _replaced(plan: MergePlan, adapters: list[Adapter], keep_replaced: bool) -> tuple[set[str], list[str]]:
    """Tensors an adapter replaced, to be written from the adapter's copy (the merge's starting point), and warnings.

    PEFT saves an adapted embedding's original weight as `...base_layer.weight`: that is the base tensor itself, so
    it restores the base exactly. A modules_to_save copy or a trained bias replaced the base tensor, which the
    merged checkpoint no longer holds: refused, or with `keep_replaced` written from the adapter's copy.
    """
    restored, warnings = set(), []
    for tp in plan.tensors:
        if tp.replacement is None:
            continue
        ad, key = adapters[tp.replacement[0]], tp.replacement[1]
        if ".base_layer." in key or keep_replaced:
            restored.add(tp.name)
            if ".base_layer." not in key:
                warnings.append(f"'{tp.name}': the original is lost; written from {ad.path} ({key})")
        else:
            raise AdapteropsError(f"the adapter replaces '{tp.name}' (modules_to_save or a trained bias): the original is not in "
                                  "the merged checkpoint (--keep-replaced writes the adapter's copy instead)", file=ad.path, tensor=key)
    return restored, warnings


def _check_norms(plan: MergePlan, adapters: list[Adapter], norms: dict[str, torch.Tensor] | None, merged: Path) -> None:
    """Refuse DoRA steps without the row norms the merge recorded in its sidecar."""
    for tp in plan.tensors:
        for step in tp.steps:
            if not (isinstance(step, LoraStep) and step.module.is_dora):
                continue
            if norms is None:
                raise AdapteropsError(f"DoRA module {step.module.name} cannot be unmerged without the row norms ‖W+ΔW‖ the merge "
                                      f"used: the merged checkpoint has no {SIDECAR_NAME} (written by adapterops merge)", file=merged)
            key = norm_key(step.adapter, step.module.name)
            if key not in norms:
                raise AdapteropsError(f"{SIDECAR_NAME} has no norms for DoRA module {step.module.name} of adapter {step.adapter + 1} "
                                      "(give the adapters in the order they were merged)", file=merged)
            shape, _ = adapters[step.adapter].tensors.shape_dtype(step.module.magnitude_key)
            if norms[key].numel() != torch.Size(shape).numel():
                raise AdapteropsError(f"{SIDECAR_NAME} holds {norms[key].numel()} norms for {step.module.name}, expected "
                                      f"{torch.Size(shape).numel()}", file=merged, tensor=key)


def unbuild_tensor(tp: TensorPlan, w: torch.Tensor, adapters: list[Adapter], device: torch.device,
                   norms: dict[str, torch.Tensor] | None, buffers: Buffers | None = None) -> torch.Tensor:
    """One unmerged tensor: undo each merge step in reverse order in float32, then round once to the merged dtype.
    With `buffers`, the blocked path writes into one of them (released by `write_shards` once written)."""
    if not tp.steps:
        return w.to(tp.spec.dtype)
    merged_dtype = w.dtype
    w = w.to(device)
    if blocked_path(tp, w):  # W' + B·A·(−s): exactly W' − ΔW (DoRA: W' / (m / ‖W + ΔW‖) − ΔW), cache-blocked
        step = tp.steps[0]
        ad, mod = adapters[step.adapter], step.module
        a, b = adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device)
        divisor = None
        if mod.is_dora:  # m / ‖W + ΔW‖ with the norms the merge recorded, as unmerge_dora computes it
            norm = norms[norm_key(step.adapter, mod.name)].to(device)
            divisor = dora_factor(adapter_tensor(ad, mod.magnitude_key, device), norm.reshape(-1), "linear", 2, False).reshape(-1)
        out, _, finite = blocked_merge(w, a, b, -step.scale, device, buffers, row_divisor=divisor)  # NaN/Inf check rides along
    else:
        x = w.to(torch.float32, copy=True)
        for step in reversed(tp.steps):
            ad, mod = adapters[step.adapter], step.module
            if isinstance(step, BiasStep):
                x.sub_(adapter_tensor(ad, mod.bias_key, device) * step.scale)
                continue
            if isinstance(step, ParamStep):  # the merge added ΔW rounded to the base dtype (ParamWrapper): the same goes
                x.sub_(param_step_delta(step, ad, device).to(merged_dtype).float())
                continue
            delta = delta_weight(mod.kind, adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device),
                                 step.scale, fan_in_fan_out=step.fan_in_fan_out, base_shape=tuple(x.shape))
            if mod.is_dora:
                norm = norms[norm_key(step.adapter, mod.name)].to(device)
                x = unmerge_dora(x, delta, adapter_tensor(ad, mod.magnitude_key, device), norm, mod.kind, step.fan_in_fan_out)
            else:
                x = unmerge_lora(x, delta, mod.kind, merged_dtype)
        out = x.to(merged_dtype)
        finite = all_finite(out)
    if not finite:
        raise overflow_error(tp, adapters, device, out.dtype, "unmerged")
    return out.cpu()


def _write(plan: MergePlan, ckpt: Checkpoint, adapters: list[Adapter], norms: dict[str, torch.Tensor] | None,
           restored: set[str], out: Path, device: torch.device, quiet: bool) -> None:
    """Write every shard, the index and the other files (the DoRA sidecar is left behind) into `out`."""

    def read(tp: TensorPlan) -> torch.Tensor:
        if tp.name in restored:  # the adapter holds the original: merge started from it
            i, key = tp.replacement
            return adapters[i].read_finite(key)
        if not tp.steps:  # unchanged by the merge: file to file in the kernel
            same = byte_range(ckpt.source(tp.name), tp.name, tp.spec)
            if same is not None:
                return same
        return ckpt.read(tp.name)

    def build(tp: TensorPlan, src: torch.Tensor | ByteRange) -> torch.Tensor | ByteRange:
        if isinstance(src, ByteRange):
            return src
        if tp.name in restored:
            return cast_checked(src, tp.spec.dtype, file=adapters[tp.replacement[0]].tensors.path, tensor=tp.name)
        return unbuild_tensor(tp, src, adapters, device, norms, buffers)

    buffers = Buffers()  # each unmerged tensor reuses a written one's buffer instead of fresh pages
    sources = prefetched(plan.tensors, read)
    items = ((tp.name, build(tp, src)) for tp, src in sources)
    write_shards(out, [(s.filename, [t.spec for t in s.tensors]) for s in plan.shards], items, quiet=quiet, desc="unmerge",
                 buffers=buffers)
    write_index_and_files(out, plan.write_index, {t.name: s.filename for s in plan.shards for t in s.tensors},
                          plan.index_metadata, plan.extra_files, None)


def unmerge(
    merged: str | os.PathLike,
    adapters: str | os.PathLike | Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    weights: Sequence[float] | None = None,
    device: str = "cpu",
    revision: str | None = None,
    force: bool = False,
    keep_replaced: bool = False,
    allow_pickle: bool = False,
    quiet: bool = True,
) -> UnmergeResult:
    """Recover the base checkpoint from a merged one and the adapters (with the weights) that were merged into it.

    Each changed tensor is computed as W' − ΔW (DoRA: W'·‖W+ΔW‖/m − ΔW, with the norms from the merge's sidecar)
    in float32 and rounded once; LoRA on parameters (MoE experts) subtracts ΔW rounded to the checkpoint's dtype, as
    PEFT's ParamWrapper added it. Round-trip bounds, per element (tests/test_unmerge.py, test_moe_algebra.py): one
    LoRA adapter 1 ulp of max(|W|, |W'|); DoRA ½ ulp(W) + 2 ulp(W + ΔW); n adapters (n + 1)/2 ulp of the largest
    intermediate.

    Example::

        adapterops.unmerge("./merged", ["./my-lora"], "./base-again")
    """
    start = time.perf_counter()
    specs = as_list(adapters)
    out = Path(out)
    dev = pick_device(device)
    merged_path = resolve(str(merged), revision)
    adapter_paths = [resolve(str(a)) for a in specs]
    weights = check_weights(weights, adapter_paths)
    check_output(out, [merged_path, *adapter_paths], force)
    with ExitStack() as stack:
        ckpt = stack.enter_context(open_checkpoint(merged_path, allow_pickle))
        if is_nf4(ckpt):
            raise AdapteropsError("is an NF4 checkpoint: merges into NF4 bases are written in 16 bits; unmerge that output",
                                  file=merged_path)
        opened = [stack.enter_context(open_adapter(p, allow_pickle, command="unmerge", params=True)) for p in adapter_paths]
        plan = plan_merge(ckpt, opened, weights)
        norms = read_dora_norms(ckpt.root) if ckpt.single_file is None else None
        restored, kept = _replaced(plan, opened, keep_replaced)
        _check_norms(plan, opened, norms, merged_path)
        with atomic_dir(out, replace=force) as tmp:
            _write(plan, ckpt, opened, norms, restored, tmp, dev, quiet)
    changed = sum(1 for tp in plan.tensors if tp.steps or tp.name in restored)
    warnings = plan.warnings + kept
    return UnmergeResult(str(out), plan.modules_merged, len(plan.tensors), changed, plan.total_bytes,
                         round(time.perf_counter() - start, 3), str(dev), warnings)
