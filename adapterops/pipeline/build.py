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
from adapterops.io.adapter import CONFIG_NAME, Adapter, LoraModule, scale_cause
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.dora_norms import norm_key
from adapterops.io.tuner_adapter import display
from adapterops.pipeline.options import cast_checked, cast_error
from adapterops.pipeline.params import ParamStep
from adapterops.pipeline.plan import BiasStep, LoraStep, TensorPlan
from adapterops.pipeline.stream import Buffers, ByteRange, byte_range
from adapterops.pipeline.threads import block_workers, caller_threads, compute_threads
from adapterops.pipeline.token_steps import TokenStep, apply_token_step
from adapterops.pipeline.tuner_steps import TunerStep, apply_tuner_step, tuner_delta


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
        ad = adapters[step.adapter]
        if isinstance(step, TokenStep):  # rows copied in: no ΔW to blame
            continue
        if isinstance(step, TunerStep) and step.module.peft_type == "IA3":  # W·l: a product, no ΔW of its own
            err = _ia3_blame(step, ad, tp, device, name, base)
            if err is not None:
                return err
            continue
        delta, cause = _step_delta(step, ad, tp, device)
        big = delta.double().abs().max().item() if all_finite(delta) else math.inf
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


def _step_delta(step, ad: Adapter, tp: TensorPlan, device: torch.device) -> tuple[torch.Tensor, str]:
    """One merge step's ΔW (float32) and how its config scales it, for overflow_error's messages."""
    mod = step.module
    if isinstance(step, TunerStep):  # LoHa, LoKr, VeRA: their own scale, no α/r of a LoRA
        def read(a: Adapter, key: str, dev: torch.device) -> torch.Tensor:
            return a.read(key).to(dev, torch.float32)

        delta = tuner_delta(step, ad, tuple(tp.spec.shape), torch.float32, device, read)
        return delta, f"the scale {step.scale:g} of module {mod.name} of the {display(mod.peft_type)} adapter"
    if isinstance(step, BiasStep):
        delta = ad.read(mod.bias_key).to(device, torch.float32) * step.scale
    elif isinstance(step, ParamStep):  # LoRA on a parameter: its scale comes from the parameter's path
        delta = param_step_delta(step, ad, device)
        r, alpha, scale = mod.rank_alpha(step.param, ad.config, step.num_experts)
        mod = LoraModule(mod.name, "linear", mod.a_key, mod.b_key, r, alpha, scale)
    else:
        delta = delta_weight(mod.kind, ad.read(mod.a_key).to(device, torch.float32), ad.read(mod.b_key).to(device, torch.float32),
                             step.scale, fan_in_fan_out=step.fan_in_fan_out, base_shape=tuple(tp.spec.shape))
    weight = step.scale / mod.scale if mod.scale else 1.0
    return delta, scale_cause(ad, mod, weight if abs(weight - 1) > 1e-9 else 1.0)


def _ia3_blame(step: TunerStep, ad: Adapter, tp: TensorPlan, device: torch.device, name: str,
               base: torch.Tensor | None) -> AdapteropsError | None:
    """overflow_error for an IA3 step (W·l): its vector is to blame unless the base already held NaN/Inf."""
    mod = step.module
    vec = ad.read(mod.keys["ia3_l"]).to(device, torch.float32)
    where = f"module {mod.name} of the IA3 adapter"
    if not all_finite(vec):
        return AdapteropsError(f"the IA3 vector of {where} holds NaN or Inf values", file=ad.path, tensor=tp.name)
    if base is not None and not all_finite(base):
        return None
    big = float(vec.abs().max()) if vec.numel() else 0.0
    return AdapteropsError(f"the merged weight W·l overflows {name}: the IA3 vector of {where} reaches |l| = {big:.3g}",
                           file=ad.path / CONFIG_NAME, tensor=tp.name)


def blocked_path(tp: TensorPlan, w: torch.Tensor) -> bool:
    """Whether the row-blocked CPU path applies: one plain Linear LoRA/DoRA step."""
    if len(tp.steps) != 1 or not isinstance(tp.steps[0], LoraStep) or w.device.type != "cpu":
        return False
    step = tp.steps[0]
    return step.module.kind == "linear" and not step.fan_in_fan_out and w.dtype in (torch.float32, torch.bfloat16, torch.float16)


def delta_norm(tp: TensorPlan, adapters: list[Adapter], factors: tuple[torch.Tensor, ...] | None = None) -> float | None:
    """‖Σ s·B·A‖_F over a tensor's LoRA steps, from the factors: ‖B_c A_c‖_F² = trace((B_cᵀB_c)(A_cA_cᵀ)) with
    B_c = [s₁B₁ | s₂B₂ …] and A_c = [A₁; A₂ …], r×r products only. None where ΔW is not s·B·A (DoRA rescales
    rows, tuners, LoRA on parameters); a bias tensor's ΔW is Σ s·b_B."""
    if not tp.steps:
        return None
    if all(isinstance(s, BiasStep) for s in tp.steps):
        total = sum(adapters[s.adapter].read(s.module.bias_key).double() * s.scale for s in tp.steps)
        return float(torch.linalg.vector_norm(total))
    if not all(type(s) is LoraStep and not s.module.is_dora for s in tp.steps):
        return None
    bs, as_ = [], []
    for s in tp.steps:
        ad = adapters[s.adapter]
        if factors is not None and len(tp.steps) == 1:
            a, b = factors[0], factors[1]
        else:
            a, b = ad.read(s.module.a_key), ad.read(s.module.b_key)
        b, a = b.detach().float().reshape(b.shape[0], -1), a.detach().float().reshape(a.shape[0], -1)
        if s.fan_in_fan_out or s.module.kind == "embedding":  # ΔW = (B·A)ᵀ = Aᵀ·Bᵀ: one layout for every step
            b, a = a.T, b.T
        bs.append(b * s.scale)
        as_.append(a)
    b, a = (bs[0], as_[0]) if len(bs) == 1 else (torch.cat(bs, dim=1), torch.cat(as_, dim=0))
    return math.sqrt(max(float(((b.T @ b).double() * (a @ a.T).double()).sum()), 0.0))  # trace(XY) = Σ X∘Yᵀ, X, Y symmetric


def change_stats(new: torch.Tensor, old: torch.Tensor) -> tuple[float, int]:
    """(‖new − old‖_F, elements that differ), over row blocks of about 1 MiB (no full-size temporary)."""
    new, old = new.reshape(new.shape[0], -1) if new.dim() else new.reshape(1, 1), old.reshape(old.shape[0], -1) if old.dim() else old.reshape(1, 1)
    rows = max(1, (1 << 18) // max(new.shape[1], 1))
    sq, count = 0.0, 0
    for start in range(0, new.shape[0], rows):
        d = new[start:start + rows].float() - old[start:start + rows].float()
        sq += float(torch.linalg.vector_norm(d, dtype=torch.float64)) ** 2
        count += int(torch.count_nonzero(d))
    return math.sqrt(sq), count


def blocked_merge(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, device: torch.device,
                  buffers: Buffers | None, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """`merge_linear_blocked_checked` on `block_workers` threads, each on one torch thread (whatever the count, the
    change figures' dot products then sum alike), into one of `buffers` (CPU) when given."""
    into = buffers.empty(tuple(w.shape), w.dtype) if buffers is not None and w.device.type == "cpu" else None
    workers = block_workers(device)
    with compute_threads(device, 1):
        return merge_linear_blocked_checked(w, a, b, scale, out=into, workers=workers, **kwargs)


def build_tensor(tp: TensorPlan, w: torch.Tensor | ByteRange, adapters: list[Adapter], device: torch.device,
                 norms: dict[str, torch.Tensor] | None = None, factors: tuple[torch.Tensor, ...] | None = None, *,
                 source: Path | None = None, stats: dict[str, dict] | None = None,
                 buffers: Buffers | None = None) -> torch.Tensor | ByteRange:
    """Compute one output tensor from its source `w`: apply each merge step, in PEFT's order.

    Each DoRA step's row norms ‖W + ΔW‖ go into `norms` (for the sidecar that makes `unmerge` exact). A
    `ByteRange` (an unchanged tensor) passes through to the writer. `factors` are `read_factors`' tensors, when
    read ahead. Every dtype conversion is checked (a value beyond float16's range is refused, not written as Inf);
    `source` is the file `w` came from, for that error. The NaN/Inf check of the result rides along with the
    blocked Linear merge; the base is looked at separately only on the error path.

    With `stats` (a dict), a tensor with merge steps adds `{numel, changed, diff_norm, delta_norm}` under its name:
    how many elements of the output differ from the base rounded to the output dtype, ‖W' − W‖_F, and ‖ΔW‖_F
    (`delta_norm`). On the blocked path the first two are measured per block while it is in cache.

    With `buffers`, the blocked path writes its result into one of them (released by `write_shards` once written).
    """
    if isinstance(w, ByteRange):
        return w
    w = cast_checked(w, tp.work_dtype or tp.spec.dtype, device=device, file=source, tensor=tp.name)
    base = w
    want = stats is not None and bool(tp.steps)
    changes: list[float] | None = None
    unmerged = None
    if blocked_path(tp, w):
        step = tp.steps[0]
        a, b, mag = factors if factors is not None else read_factors(tp, adapters, device)
        factors = (a, b, mag)
        # measured in the blocks only when they are already in the output dtype (not an NF4 base merged in float32)
        changes = [] if want and w.dtype == tp.spec.dtype else None
        # the NaN/Inf check (and the change measure) ride along; a reused buffer only when `w` is the output dtype
        w, norm, finite = blocked_merge(w, a, b, step.scale, device, buffers if w.dtype == tp.spec.dtype else None,
                                        magnitude=mag, changes=changes)
        if norm is not None and norms is not None:
            norms[norm_key(step.adapter, step.module.name)] = norm.cpu()
    else:
        unmerged = w.clone() if want else None  # some steps add in place
        with caller_threads():  # PEFT's own expressions, at PEFT's thread count (convolutions' bits depend on it)
            w = _apply_steps(tp, w, adapters, device, norms)
        finite = not tp.steps or all_finite(w)
    if not finite:  # which of ΔW, the base or their sum: the base only when the merge did not overwrite it
        raise overflow_error(tp, adapters, device, w.dtype, base=base if base is not w else None, source=source)
    out = w.to("cpu", tp.spec.dtype)
    if cast_loss(w, out):  # the merged values do not fit the output dtype (float32 work → bfloat16/float16)
        raise overflow_error(tp, adapters, device, tp.spec.dtype) if tp.steps else cast_error(w, out, source, tp.name)
    if want:
        if changes is None:
            old = (base if unmerged is None else unmerged).to("cpu")
            changes = list(change_stats(out, old if old.dtype == out.dtype else old.to(out.dtype)))
        with compute_threads(device):  # r×r products: thread start-up would cost more than the arithmetic
            dn = delta_norm(tp, adapters, factors)
        stats[tp.name] = {"numel": out.numel(), "diff_norm": changes[0], "changed": int(changes[1]), "delta_norm": dn}
    return out


def param_step_delta(step: ParamStep, ad: Adapter, device: torch.device) -> torch.Tensor:
    """ΔW in float32 of one parameter-LoRA step: the whole parameter, its expert, or that expert's chunk."""
    mod = step.module
    delta = param_delta(adapter_tensor(ad, mod.a_key, device), adapter_tensor(ad, mod.b_key, device),
                        step.scale, step.num_experts, step.swapped, step.expert)
    if step.chunk is not None:
        c, parts, dim = step.chunk
        delta = delta.chunk(parts, dim=dim)[c]
    return delta


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
            w = merge_param(w, param_step_delta(step, ad, device))
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
