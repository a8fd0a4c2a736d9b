"""The per-tensor builder merge and merge --requantize share: read an output tensor's source, apply each merge step
in PEFT's order (the row-blocked Linear path where it applies), check the result is finite.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from adapterops.core.experts import merge_param, param_delta
from adapterops.core.finite import all_finite, cast_loss
from adapterops.core.lora import (
    delta_weight,
    merge_dora,
    merge_linear_blocked_checked,
    merge_lora,
    merge_lora_bias,
)
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import CONFIG_NAME, Adapter, scale_cause
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.dora_norms import norm_key
from adapterops.pipeline.options import cast_checked, cast_error
from adapterops.pipeline.params import ParamStep
from adapterops.pipeline.plan import BiasStep, LoraStep, TensorPlan
from adapterops.pipeline.stream import ByteRange, byte_range
from adapterops.pipeline.threads import compute_threads
from adapterops.pipeline.token_steps import TokenStep, apply_token_step
from adapterops.pipeline.tuner_steps import TunerStep, apply_tuner_step


def adapter_tensor(ad: Adapter, key: str, device: torch.device) -> torch.Tensor:
    """An adapter tensor on the device, upcast to float32 as PEFT does when it loads adapters."""
    return ad.read_finite(key).to(device=device, dtype=torch.float32)


def read_source(tp: TensorPlan, ckpt: Checkpoint, adapters: list[Adapter]) -> torch.Tensor | ByteRange:
    """The tensor an output starts from: the base tensor, or an adapter's replacement for it (which must be finite:
    a NaN in a modules_to_save copy or a trained bias would pass into the output unseen).

    An output that is a base tensor unchanged (no step, same dtype) comes back as its `ByteRange`: it goes from
    input file to output file in the kernel, never read into memory.
    """
    if tp.replacement is not None:
        i, key = tp.replacement
        return adapters[i].read_finite(key)
    if not tp.steps:
        same = byte_range(ckpt.source(tp.source), tp.source, tp.spec)
        if same is not None:
            return same
    return ckpt.read(tp.source)


def read_factors(tp: TensorPlan, adapters: list[Adapter], device: torch.device) -> tuple[torch.Tensor, ...] | None:
    """The (A, B, magnitude or None) of a tensor's single Linear LoRA/DoRA step, read ahead with its source (in
    the reader thread, off the compute thread); None for other plans."""
    if len(tp.steps) != 1 or not isinstance(tp.steps[0], LoraStep) or tp.steps[0].module.kind != "linear":
        return None
    ad, mod = adapters[tp.steps[0].adapter], tp.steps[0].module
    mag = adapter_tensor(ad, mod.magnitude_key, device) if mod.is_dora else None
    return adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device), mag


def source_file(tp: TensorPlan, ckpt: Checkpoint, adapters: list[Adapter]) -> Path:
    """The file an output tensor starts from (for errors): the adapter's for a replacement, else the base shard."""
    if tp.replacement is not None:
        return adapters[tp.replacement[0]].tensors.path
    return ckpt.single_file or Path(ckpt.root) / ckpt.weight_map[tp.source]


def overflow_error(tp: TensorPlan, adapters: list[Adapter], device: torch.device,
                   dtype: torch.dtype, what: str = "merged", *, base: torch.Tensor | None = None,
                   source: Path | None = None) -> AdapteropsError:
    """Why a tensor with merge steps came out non-finite in `dtype` (only called on that error path): an adapter's
    ΔW itself overflows (its scale α/r × weight, named with its config), the base tensor already held NaN/Inf
    (`base`, when the merge did not overwrite it), or ΔW fits and W ± ΔW does not."""
    name, limit = str(dtype).removeprefix("torch."), torch.finfo(dtype).max
    worst = None
    for step in tp.steps:
        ad, mod = adapters[step.adapter], step.module
        if isinstance(step, TokenStep):  # rows copied in: no ΔW to blame
            continue
        if isinstance(step, BiasStep):
            delta = ad.read(mod.bias_key).to(device, torch.float32) * step.scale
        else:
            delta = delta_weight(mod.kind, ad.read(mod.a_key).to(device, torch.float32), ad.read(mod.b_key).to(device, torch.float32),
                                 step.scale, fan_in_fan_out=step.fan_in_fan_out, base_shape=tuple(tp.spec.shape))
        big = delta.double().abs().max().item() if all_finite(delta) else math.inf
        weight = step.scale / mod.scale if mod.scale else 1.0
        cause = scale_cause(ad, mod, weight if abs(weight - 1) > 1e-9 else 1.0)
        if big > limit:
            shown = "NaN/Inf" if math.isinf(big) else f"{big:.3g}"
            return AdapteropsError(f"{cause} makes ΔW overflow {'float32' if math.isinf(big) else name} (|ΔW| reaches {shown}, beyond {limit:.4g}); the base "
                                   "weight itself is finite", file=ad.path / CONFIG_NAME, tensor=tp.name)
        if worst is None or big > worst[0]:
            worst = (big, ad, cause)
    if base is not None and not all_finite(base):
        return AdapteropsError("the base tensor holds NaN or Inf values (before any adapter is merged)", file=source,
                               tensor=tp.name)
    if worst is None:
        return AdapteropsError("the merged tensor holds NaN or Inf values", file=source, tensor=tp.name)
    _, ad, cause = worst
    return AdapteropsError(f"the {what} weight W ± ΔW overflows {name}: ΔW fits ({cause}) but the base weight plus ΔW "
                           "does not (the base weight is near the dtype's limit)", file=ad.path / CONFIG_NAME, tensor=tp.name)


def blocked_path(tp: TensorPlan, w: torch.Tensor) -> bool:
    """Whether the row-blocked CPU path applies: one plain Linear LoRA/DoRA step."""
    if len(tp.steps) != 1 or not isinstance(tp.steps[0], LoraStep) or w.device.type != "cpu":
        return False
    step = tp.steps[0]
    return step.module.kind == "linear" and not step.fan_in_fan_out and w.dtype in (torch.float32, torch.bfloat16, torch.float16)


def build_tensor(tp: TensorPlan, w: torch.Tensor | ByteRange, adapters: list[Adapter], device: torch.device,
                 norms: dict[str, torch.Tensor] | None = None, factors: tuple[torch.Tensor, ...] | None = None, *,
                 source: Path | None = None) -> torch.Tensor | ByteRange:
    """Compute one output tensor from its source `w`: apply each merge step, in PEFT's order.

    Each DoRA step's row norms ‖W + ΔW‖ go into `norms` (for the sidecar that makes `unmerge` exact). A
    `ByteRange` (an unchanged tensor) passes through to the writer. `factors` are `read_factors`' tensors, when
    read ahead. Every dtype conversion is checked (a value beyond float16's range is refused, not written as Inf);
    `source` is the file `w` came from, for that error. The NaN/Inf check of the result rides along with the
    blocked Linear merge; the base is looked at separately only on the error path.
    """
    if isinstance(w, ByteRange):
        return w
    w = cast_checked(w, tp.work_dtype or tp.spec.dtype, device=device, file=source, tensor=tp.name)
    base = w
    if blocked_path(tp, w):
        step = tp.steps[0]
        a, b, mag = factors if factors is not None else read_factors(tp, adapters, device)
        with compute_threads(device):
            w, norm, finite = merge_linear_blocked_checked(w, a, b, step.scale, mag)  # the NaN/Inf check rides along
        if norm is not None and norms is not None:
            norms[norm_key(step.adapter, step.module.name)] = norm.cpu()
    else:
        w = _apply_steps(tp, w, adapters, device, norms)
        finite = not tp.steps or all_finite(w)
    if not finite:  # which of ΔW, the base or their sum: the base only when the merge did not overwrite it
        raise overflow_error(tp, adapters, device, w.dtype, base=base if base is not w else None, source=source)
    out = w.to("cpu", tp.spec.dtype)
    if cast_loss(w, out):  # the merged values do not fit the output dtype (float32 work → bfloat16/float16)
        raise overflow_error(tp, adapters, device, tp.spec.dtype) if tp.steps else cast_error(w, out, source, tp.name)
    return out


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
        if isinstance(step, TokenStep):  # trainable tokens: rows replaced
            w = apply_token_step(step, w, adapter_tensor(ad, mod.key, device))
            continue
        if isinstance(step, TunerStep):  # IA3, LoHa, LoKr, VeRA
            w = apply_tuner_step(step, w, ad, device, adapter_tensor)
            continue
        if isinstance(step, ParamStep):
            delta = param_delta(adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device),
                                step.scale, step.num_experts, step.swapped, step.expert)
            if step.chunk is not None:
                c, parts, dim = step.chunk
                delta = delta.chunk(parts, dim=dim)[c]
            w = merge_param(w, delta)
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
