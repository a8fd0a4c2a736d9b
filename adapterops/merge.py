"""`merge`: fold one or more LoRA/DoRA adapters into a base checkpoint, streaming, into an atomic output folder."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.core.finite import all_finite
from adapterops.core.lora import delta_weight, merge_dora, merge_linear_blocked, merge_lora, merge_lora_bias
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter, open_adapter
from adapterops.io.atomic import atomic_dir, check_output, copy_file
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.dora_norms import norm_key, write_dora_norms
from adapterops.io.hub import resolve
from adapterops.io.jsonfile import write_json
from adapterops.io.nf4_checkpoint import dequantized_view, is_nf4
from adapterops.io.streaming import prefetched, write_shards
from adapterops.plan import BiasStep, LoraStep, MergePlan, TensorPlan, parse_size, plan_merge
from adapterops.result import Result

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """float32 / bfloat16 / float16 (or fp32, bf16, fp16) to a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise AdapteropsError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)") from None


def as_list(adapters: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """One adapter or several, as a non-empty list."""
    specs = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    if not specs:
        raise AdapteropsError("no adapter given")
    return specs


def pick_device(device: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when available)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise AdapteropsError("--device cuda was asked for but CUDA is not available")
    try:
        return torch.device(device)
    except RuntimeError:
        raise AdapteropsError(f"unknown device {device!r}") from None


def adapter_tensor(ad: Adapter, key: str, device: torch.device) -> torch.Tensor:
    """An adapter tensor on the device, upcast to float32 as PEFT does when it loads adapters."""
    return ad.read_finite(key).to(device=device, dtype=torch.float32)


def read_source(tp: TensorPlan, ckpt: Checkpoint, adapters: list[Adapter]) -> torch.Tensor:
    """The tensor an output starts from: the base tensor, or an adapter's replacement for it."""
    if tp.replacement is not None:
        i, key = tp.replacement
        return adapters[i].read(key)
    return ckpt.read(tp.source)


def blocked_path(tp: TensorPlan, w: torch.Tensor) -> bool:
    """Whether the row-blocked CPU path applies: one plain Linear LoRA/DoRA step."""
    if len(tp.steps) != 1 or not isinstance(tp.steps[0], LoraStep) or w.device.type != "cpu":
        return False
    step = tp.steps[0]
    return step.module.kind == "linear" and not step.fan_in_fan_out and w.dtype in (torch.float32, torch.bfloat16, torch.float16)


def build_tensor(tp: TensorPlan, w: torch.Tensor, adapters: list[Adapter], device: torch.device,
                 norms: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Compute one output tensor from its source `w`: apply each merge step, in PEFT's order.

    Each DoRA step's row norms ‖W + ΔW‖ go into `norms` (for the sidecar that makes `unmerge` exact).
    """
    w = w.to(device=device, dtype=tp.work_dtype or tp.spec.dtype)
    if blocked_path(tp, w):
        step = tp.steps[0]
        ad, mod = adapters[step.adapter], step.module
        mag = adapter_tensor(ad, mod.magnitude_key, device) if mod.is_dora else None
        a, b = adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device)
        with compute_threads(device):
            w, norm = merge_linear_blocked(w, a, b, step.scale, mag)
        if norm is not None and norms is not None:
            norms[norm_key(step.adapter, mod.name)] = norm.cpu()
    else:
        w = _apply_steps(tp, w, adapters, device, norms)
    if tp.steps and not all_finite(w):
        raise AdapteropsError("the merged tensor holds NaN or Inf values (overflow?)", tensor=tp.name)
    return w.to("cpu", tp.spec.dtype)


def _apply_steps(tp: TensorPlan, w: torch.Tensor, adapters: list[Adapter], device: torch.device,
                 norms: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """The general path: each LoRA, DoRA or bias step in turn, with PEFT's own expressions."""
    has_dora = any(isinstance(s, LoraStep) and s.module.is_dora for s in tp.steps)
    unmerged = w.clone() if has_dora and len(tp.steps) > 1 else None
    for n, step in enumerate(tp.steps):
        ad = adapters[step.adapter]
        mod = step.module
        if isinstance(step, BiasStep):
            w = merge_lora_bias(w, adapter_tensor(ad, mod.bias_key, device), step.scale)
            continue
        delta = delta_weight(
            mod.kind,
            adapter_tensor(ad, mod.a_key, device),
            adapter_tensor(ad, mod.b_key, device),
            step.scale,
            fan_in_fan_out=step.fan_in_fan_out,
            base_shape=tuple(w.shape),
        )
        if mod.is_dora:
            magnitude = adapter_tensor(ad, mod.magnitude_key, device)
            w, norm = merge_dora(w, delta, magnitude, mod.kind, fan_in_fan_out=step.fan_in_fan_out,
                                 norm_base=unmerged if n > 0 else None)
            if norms is not None:
                norms[norm_key(step.adapter, mod.name)] = norm.cpu()
        else:
            w = merge_lora(w, delta, mod.kind)
    return w


def write_checkpoint(plan: MergePlan, ckpt: Checkpoint, adapters: list[Adapter], out: Path, device: torch.device, quiet: bool) -> None:
    """Write every shard, the index, the config, the other files and any DoRA sidecar into `out` (a temporary folder)."""
    norms: dict[str, torch.Tensor] = {}
    sources = prefetched(plan.tensors, lambda tp: read_source(tp, ckpt, adapters))
    items = ((tp.name, build_tensor(tp, src, adapters, device, norms)) for tp, src in sources)
    write_shards(out, [(s.filename, [t.spec for t in s.tensors]) for s in plan.shards], items, quiet=quiet, desc="merge")
    if norms:
        write_dora_norms(out, norms, [str(a.path) for a in adapters])
    write_index_and_files(out, plan.write_index, {t.name: s.filename for s in plan.shards for t in s.tensors},
                          plan.index_metadata, plan.extra_files, plan.config)


def write_index_and_files(out: Path, write_index: bool, weight_map: dict[str, str], index_metadata: dict,
                          extra_files: list[Path], config: dict | None) -> None:
    """The index (when sharded), the config (rewritten when changed) and every other file of the base."""
    if write_index:
        write_json(out / "model.safetensors.index.json", {"metadata": index_metadata, "weight_map": weight_map})
    for path in extra_files:
        if path.name == "config.json" and config is not None:
            write_json(out / "config.json", config, sort_keys=True)
        else:
            copy_file(path, out)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextmanager
def compute_threads(device: torch.device) -> Iterator[None]:
    """On the CPU, leave one core to the read and write threads (then restore torch's setting).

    Only for the blocked Linear merge, whose bits do not depend on the thread count (each output is one dot
    product over the rank); convolutions can pick another algorithm with another thread count, so they keep the
    caller's setting, like PEFT.
    """
    previous = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(previous, usable_cores() - 1)))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


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
            what = "lora_bias" if isinstance(s, BiasStep) else ("dora" if s.module.is_dora else "lora")
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
) -> MergeResult:
    """Merge adapters into a base checkpoint and write OUT, as PEFT's `merge_and_unload` + `save_pretrained` would.

    An NF4 base (bitsandbytes 4-bit, detected from its tensors) is dequantized exactly, merged in float32 and
    written in `dtype` (default bfloat16), rounded once; with `requantize` the merged weights are quantized to NF4
    again, as PEFT does (see requantize.py).
    """
    start = time.perf_counter()
    adapter_specs = as_list(adapters)
    out = Path(out)
    torch_dtype = parse_dtype(dtype)
    dev = pick_device(device)
    shard_size = parse_size(max_shard_size)
    base_path = resolve(str(base), revision)
    adapter_paths = [resolve(str(a)) for a in adapter_specs]
    if not dry_run:
        check_output(out, [base_path, *adapter_paths], force)
    ckpt = nf4_ckpt = open_checkpoint(base_path, allow_pickle)
    opened: list[Adapter] = []
    try:
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
        opened = [open_adapter(p, allow_pickle) for p in adapter_paths]
        plan = plan_merge(ckpt, opened, list(weights) if weights is not None else None, torch_dtype, shard_size, work_dtype)
        written = plan.total_bytes
        if not dry_run:
            with atomic_dir(out, replace=force) as tmp:
                if requantize:
                    from adapterops.requantize import write_requantized

                    written = write_requantized(plan, nf4_ckpt, ckpt, opened, tmp, dev, quiet)
                else:
                    write_checkpoint(plan, ckpt, opened, tmp, dev, quiet)
    finally:
        ckpt.close()
        for a in opened:
            a.close()
    changed = describe_changes(plan, opened)
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
        warnings=plan.warnings,
        changes=changed if dry_run else [],
    )
