"""The per-tensor builder merge and merge --requantize share: read an output tensor's source, apply each merge step
in PEFT's order (the row-blocked Linear path where it applies), check the result is finite.
"""

from __future__ import annotations

import torch

from adapterops.core.experts import merge_param, param_delta
from adapterops.core.finite import all_finite
from adapterops.core.lora import (
    delta_weight,
    merge_dora,
    merge_linear_blocked,
    merge_lora,
    merge_lora_bias,
)
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.dora_norms import norm_key
from adapterops.pipeline.params import ParamStep
from adapterops.pipeline.plan import BiasStep, LoraStep, TensorPlan
from adapterops.pipeline.threads import compute_threads


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
        if isinstance(step, ParamStep):
            delta = param_delta(adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device),
                                step.scale, step.num_experts, step.swapped, step.expert)
            if step.chunk is not None:
                c, n, dim = step.chunk
                delta = delta.chunk(n, dim=dim)[c]
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
