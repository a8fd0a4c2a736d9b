"""`rerank`: SVD-truncate or zero-pad every module of an adapter, low-rank all the way (the thin SVD of s·B·A
comes from QR of the factors)."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from adapterops.core.lowrank import (
    NotFinite,
    ThinSVD,
    energy_rank,
    factors,
    pad_rank,
    svd_of_product,
    top_svd,
    top_svd_for_energy,
)
from adapterops.core.scaling import lora_scale
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import PREFIX, Adapter, open_adapter, overflow_error
from adapterops.io.adapter_writer import exact_key, unit_scale_ranks, write_adapter
from adapterops.io.atomic import check_output
from adapterops.io.checkpoint import open_checkpoint
from adapterops.io.hub import resolve
from adapterops.io.tuner_adapter import CONVERTIBLE, display, tuner_refusal
from adapterops.pipeline.options import check_count, check_number
from adapterops.pipeline.params import ParamLayout, expert_slices, linear_lookalike_rows, pack_experts, param_layouts
from adapterops.pipeline.tuner_steps import dense_delta, prepare_vera
from adapterops.result import Result


@dataclass
class RerankResult(Result):
    """What a rerank did: ranks and the Frobenius norm retained, per module and in total."""

    output: str
    modules: dict[str, dict[str, float]]
    retained_fro: float
    seconds: float


def choose_rank(sv: torch.Tensor, *, rank: int | None, energy: float | None, sv_ratio: float | None,
                sv_fro: float | None, max_rank: int | None) -> int:
    """How many singular values one policy keeps (at least 1, at most the module's rank and --max-rank)."""
    if rank is not None:
        k = rank
    elif energy is not None:
        k = energy_rank(sv, energy)
    elif sv_fro is not None:
        k = energy_rank(sv, sv_fro**2)  # retained Frobenius norm ≥ T  ⇔  retained energy ≥ T²
    elif sv_ratio is not None:
        k = int((sv >= sv[0] / sv_ratio).sum()) if sv.numel() and sv[0] > 0 else 0
    else:
        raise AdapteropsError("give one of --rank, --energy, --sv-ratio or --sv-fro")
    if max_rank is not None:
        k = min(k, max_rank)
    return max(1, min(k, sv.numel()))


def rerank(
    adapter: str | os.PathLike, out: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
    sv_ratio: float | None = None, sv_fro: float | None = None, max_rank: int | None = None, pad_to: int | None = None,
    split: Literal["balanced", "b"] = "balanced", precision: Literal["float32", "float64"] = "float32", force: bool = False,
    base: str | os.PathLike | None = None,
) -> RerankResult:
    """Truncate each module's ΔW = s·B·A to a chosen rank by its SVD (or zero-pad to a uniform rank), exactly.

    The new factors carry the scale (α = r', standard scaling), and every module's rank and alpha go into
    exact-match pattern keys. DoRA magnitudes and lora_B biases (scaled in) are kept. `pad_to` alone appends zero
    rows and columns and keeps every module's scale exactly (α scaled with r). A LoHa, LoKr or VeRA adapter is
    converted to LoRA (PEFT's `convert_to_lora`), one module's dense ΔW at a time; `base` (headers only) gives the
    layer shapes that convolutions and VeRA need.

    Example::

        adapterops.rerank("./lora-r64", "./lora-r16", rank=16).retained_fro
    """
    start = time.perf_counter()
    for name, v in (("rank", rank), ("max_rank", max_rank), ("pad_to", pad_to)):
        check_count(name, v)
    check_number("energy", energy, lo=0, hi=1, lo_open=True)
    check_number("sv_fro", sv_fro, lo=0, hi=1, lo_open=True)
    check_number("sv_ratio", sv_ratio, lo=1)
    policies = [p for p in (rank, energy, sv_ratio, sv_fro) if p is not None]
    if len(policies) > 1 or (not policies and pad_to is None):
        raise AdapteropsError("give exactly one of --rank, --energy, --sv-ratio, --sv-fro (or only --pad-to)")
    path = resolve(str(adapter))
    out = Path(out)
    check_output(out, [path] + ([resolve(str(base))] if base is not None else []), force)
    dtype = torch.float64 if precision == "float64" else torch.float32
    with open_adapter(path, tuners=True, params=True) as ad:
        if ad.peft_type != "LORA":
            if ad.peft_type not in CONVERTIBLE:
                raise AdapteropsError(tuner_refusal(ad.peft_type, "rerank"), file=path)
            if not policies:
                raise AdapteropsError(f"a {display(ad.peft_type)} adapter is converted to LoRA: give --rank, --energy, "
                                      "--sv-ratio or --sv-fro (--pad-to alone keeps a LoRA's factors)", file=path)
            report, ranks, tensors, cfg, kept_sq, total_sq = _convert_tuner(
                ad, base, {"rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro, "max_rank": max_rank}, pad_to, split, dtype)
            write_adapter(out, tensors, cfg, force=force)
            retained = math.sqrt(kept_sq / total_sq) if total_sq else 1.0
            return RerankResult(str(out), report, retained, round(time.perf_counter() - start, 3))
        layouts = param_layouts(ad, base)
        tensors = {k: ad.read_finite(k).clone() for k in ad.tensors.keys()}
        if not policies:  # --pad-to alone: append zero rows/columns, keep every scale bit for bit (no SVD)
            report, cfg = _pad_exact(ad, tensors, pad_to, path, layouts, base is None)
            write_adapter(out, tensors, cfg, force=force)
            return RerankResult(str(out), report, 1.0, round(time.perf_counter() - start, 3))
        report: dict[str, dict[str, float]] = {}
        kept_sq = total_sq = 0.0
        ranks: dict[str, int] = {}
        for mod in ad.modules.values():
            a, b = tensors[mod.a_key], tensors[mod.b_key]
            try:
                svd = svd_of_product(b, a, mod.scale, dtype)
            except NotFinite as exc:
                raise overflow_error(ad, mod.name, exc, mod) from None
            k = svd.S.numel() if not policies else choose_rank(svd.S, rank=rank, energy=energy, sv_ratio=sv_ratio,
                                                                sv_fro=sv_fro, max_rank=max_rank)
            new_b, new_a = factors(svd, k, split)
            if pad_to is not None:
                if pad_to < k:
                    raise AdapteropsError(f"--pad-to {pad_to} is below module {mod.name}'s rank {k}", file=path)
                new_b, new_a = pad_rank(new_b, new_a, pad_to)
            r_new = new_a.shape[0]
            store = torch.float32 if a.dtype in (torch.bfloat16, torch.float16) else a.dtype  # PEFT computes in fp32
            tensors[mod.a_key] = new_a.reshape(r_new, *a.shape[1:]).to(store).contiguous()
            tensors[mod.b_key] = new_b.reshape(b.shape[0], r_new, *b.shape[2:]).to(store).contiguous()
            if mod.bias_key is not None:  # the new scale is 1: fold the old one into the bias
                tensors[mod.bias_key] = tensors[mod.bias_key].float() * mod.scale
            kept, total = float((svd.S[:k].double() ** 2).sum()), float((svd.S.double() ** 2).sum())
            kept_sq, total_sq = kept_sq + kept, total_sq + total
            report[mod.name] = {"rank": mod.r, "new_rank": r_new, "retained_fro": math.sqrt(kept / total) if total else 1.0}
            ranks[mod.name] = r_new
            if base is None and mod.name in ad.param_modules:  # maybe a 2-D parameter's LoRA: PEFT keys it by path
                ranks.update({p: r_new for p in ad.param_modules[mod.name].candidates})
        expert_ranks: dict[str, tuple[int, int]] = {}
        for lay in layouts.values():
            kept, total, r_new = _rerank_experts(lay, tensors, pad_to, path, dtype, split, policy={
                "rank": rank, "energy": energy, "sv_ratio": sv_ratio, "sv_fro": sv_fro, "max_rank": max_rank})
            kept_sq, total_sq = kept_sq + kept, total_sq + total
            report[lay.module.name] = {"rank": lay.r, "new_rank": r_new, "experts": lay.experts,
                                       "retained_fro": math.sqrt(kept / total) if total else 1.0}
            ranks.update({p: r_new for p in lay.params})
            expert_ranks[lay.module.name] = (r_new, lay.experts)
        cfg = dict(ad.config, **unit_scale_ranks(ranks, linear_lookalike_rows(expert_ranks)))
        write_adapter(out, tensors, cfg, force=force, source=path)
    retained = math.sqrt(kept_sq / total_sq) if total_sq else 1.0
    return RerankResult(str(out), report, retained, round(time.perf_counter() - start, 3))


def _rerank_experts(lay: ParamLayout, tensors: dict[str, torch.Tensor], pad_to: int | None, path: Path,
                    dtype: torch.dtype, split, policy: dict) -> tuple[float, float, int]:
    """Truncate every expert of one parameter LoRA to the same rank r' (PEFT's layout has one rank per module: the
    largest any expert's policy asks for, so each keeps at least its share) and repack [r'·E, in] / [out, r'·E].
    The factors carry the scale (α = r'). Returns (kept σ², total σ², r')."""
    pm = lay.module
    a, b = tensors[pm.a_key], tensors[pm.b_key]
    try:
        svds = [svd_of_product(be, ae, lay.scale, dtype) for be, ae in expert_slices(a, b, lay.experts)]
    except NotFinite as exc:
        raise overflow_error(ad, pm.name, exc, tensor=pm.b_key) from None
    k = max(choose_rank(svd.S, **policy) for svd in svds)
    if pad_to is not None and pad_to < k:
        raise AdapteropsError(f"--pad-to {pad_to} is below module {pm.name}'s rank {k}", file=path)
    pairs, kept, total = [], 0.0, 0.0
    for svd in svds:
        nb, na = factors(svd, min(k, svd.S.numel()), split)
        width = k if pad_to is None else pad_to  # an expert whose SVD is shorter (rank-deficient) gets zeros too
        pairs.append(pad_rank(nb, na, width))
        kept += float((svd.S[:k].double() ** 2).sum())
        total += float((svd.S.double() ** 2).sum())
    new_b, new_a = pack_experts(pairs)
    store = torch.float32 if a.dtype in (torch.bfloat16, torch.float16) else a.dtype  # PEFT computes in fp32
    tensors[pm.a_key], tensors[pm.b_key] = new_a.to(store), new_b.to(store)
    return kept, total, new_a.shape[0] // lay.experts


def exact_alpha(scale: float, r: int, use_rslora: bool, alpha: float, r_old: int) -> float | None:
    """An α' with lora_scale(r, α') == scale bit for bit (PEFT divides α' by r or √r in double precision).

    α' = α·r/r_old first, which is exact when r/r_old is a power of two; otherwise the neighbours of that value, a
    few ulps either way, are tried. None when no α' nearby gives the scale exactly.
    """
    ratio = math.sqrt(r / r_old) if use_rslora else r / r_old
    cand = alpha * ratio
    if lora_scale(r, cand, use_rslora) == scale:
        return cand
    up = down = cand
    for _ in range(64):
        up, down = math.nextafter(up, math.inf), math.nextafter(down, -math.inf)
        for c in (up, down):
            if c > 0 and lora_scale(r, c, use_rslora) == scale:
                return c
    return None


def _pad_exact(ad: Adapter, tensors: dict[str, torch.Tensor], pad_to: int, path: Path,
               layouts: dict[str, ParamLayout] | None = None, unsettled: bool = True) -> tuple[dict, dict]:
    """Zero-pad every module's factors to rank `pad_to` in place; the config gets α' with α'/r' == α/r exactly.
    A parameter LoRA gets zeros in every expert: A_e's rows and B_e's columns (repacked [r'·E, in] / [out, r'·E])."""
    report: dict[str, dict[str, float]] = {}
    alphas: dict[str, float] = {}
    for lay in (layouts or {}).values():
        pm = lay.module
        if pad_to < lay.r:
            raise AdapteropsError(f"--pad-to {pad_to} is below module {pm.name}'s rank {lay.r}", file=path)
        pairs = [pad_rank(be, ae, pad_to) for be, ae in expert_slices(tensors[pm.a_key], tensors[pm.b_key], lay.experts)]
        tensors[pm.b_key], tensors[pm.a_key] = pack_experts(pairs)
        alpha = exact_alpha(lay.scale, pad_to, ad.use_rslora, lay.alpha, lay.r)
        if alpha is None:
            raise AdapteropsError(f"no lora_alpha gives module {pm.name} its scale {lay.scale!r} exactly at rank {pad_to} "
                                  "(PEFT divides α by r): choose a --pad-to that is a power-of-two multiple of its rank", file=path)
        alphas.update({p: alpha for p in lay.params})
        report[pm.name] = {"rank": lay.r, "new_rank": pad_to, "retained_fro": 1.0, "alpha": alpha, "experts": lay.experts}
    for mod in ad.modules.values():
        if pad_to < mod.r:
            raise AdapteropsError(f"--pad-to {pad_to} is below module {mod.name}'s rank {mod.r}", file=path)
        a, b = tensors[mod.a_key], tensors[mod.b_key]
        extra = pad_to - mod.r
        tensors[mod.a_key] = torch.cat([a, a.new_zeros(extra, *a.shape[1:])], dim=0).contiguous()
        tensors[mod.b_key] = torch.cat([b, b.new_zeros(b.shape[0], extra, *b.shape[2:])], dim=1).contiguous()
        alpha = exact_alpha(mod.scale, pad_to, ad.use_rslora, mod.alpha, mod.r)
        if alpha is None:
            raise AdapteropsError(f"no lora_alpha gives module {mod.name} its scale {mod.scale!r} exactly at rank {pad_to} "
                                  "(PEFT divides α by r): choose a --pad-to that is a power-of-two multiple of its rank", file=path)
        alphas[mod.name] = alpha
        if unsettled and mod.name in ad.param_modules:  # maybe a 2-D parameter's LoRA: PEFT keys it by path
            alphas.update({p: alpha for p in ad.param_modules[mod.name].candidates})
        report[mod.name] = {"rank": mod.r, "new_rank": pad_to, "retained_fro": 1.0, "alpha": alpha}
    default = max(set(alphas.values()), key=list(alphas.values()).count) if alphas else ad.config.get("lora_alpha", 8)
    cfg = dict(ad.config, r=pad_to, lora_alpha=default, rank_pattern={},
               alpha_pattern={exact_key(m): a for m, a in alphas.items() if a != default})
    return report, cfg


def _module_shape(ad: Adapter, mod, ckpt) -> tuple[int, ...]:
    """The (out, in, k…) shape of a tuner module's weight: from the base's header, or from 2-D factors (a Linear)."""
    if ckpt is not None:
        keys = set(ckpt.keys())
        for name in (f"{mod.name}.weight", f"{mod.name.split('.', 1)[-1]}.weight"):
            if name in keys:
                shape = tuple(ckpt.shape_dtype(name)[0])
                conv1d = mod.peft_type == "VERA" and bool(ad.config.get("fan_in_fan_out"))
                return (shape[1], shape[0]) if conv1d else shape
        raise AdapteropsError(f"module {mod.name} is not in the base checkpoint {ckpt.root}", file=ad.tensors.path, tensor=mod.a_key)
    shapes = {part: tuple(ad.tensors.shape_dtype(key)[0]) for part, key in mod.keys.items()}
    if mod.peft_type == "VERA" or any(len(s) > 2 for s in shapes.values()):
        what = "VeRA modules do not store their input size" if mod.peft_type == "VERA" else "its factors are convolution kernels"
        raise AdapteropsError(f"module {mod.name}: {what}; give the base (--base) so the LoRA gets the layer's shape",
                              file=ad.tensors.path, tensor=mod.a_key)
    if mod.peft_type == "LOHA":
        return (shapes["hada_w1_a"][0], shapes["hada_w1_b"][1])
    w1 = shapes.get("lokr_w1") or (shapes["lokr_w1_a"][0], shapes["lokr_w1_b"][1])
    w2 = shapes.get("lokr_w2") or (shapes["lokr_w2_a"][0], shapes["lokr_w2_b"][1])
    return (w1[0] * w2[0], w1[1] * w2[1])


def _tuner_svd(ad: Adapter, mod, shape: tuple[int, ...], policy: dict, dtype: torch.dtype) -> tuple[ThinSVD, float]:
    """The SVD a policy needs of one module's ΔW (flattened to out × rest) and ‖ΔW‖_F²: through the factors for
    VeRA (a rank-r product), else from this module's dense ΔW alone (randomized for --rank and --energy)."""
    if mod.peft_type == "VERA":
        from adapterops.core.tuners import vera_factors
        from adapterops.pipeline.tuner_steps import vera_projections

        va, vb = vera_projections(ad, torch.device("cpu"))
        bf, af = vera_factors(va, vb, ad.read_finite(mod.keys["vera_lambda_d"]).float(),
                              ad.read_finite(mod.keys["vera_lambda_b"]).float(), shape[1], shape[0])
        svd = svd_of_product(bf, af, 1.0, dtype)
        return svd, float((svd.S.double() ** 2).sum())
    m = dense_delta(ad, mod, shape, torch.device("cpu"), dtype).reshape(shape[0], -1)
    total = float(m.double().pow(2).sum())
    full = min(m.shape)
    if policy["rank"] is not None:
        k = min(policy["rank"], policy["max_rank"] or full, full)
        return top_svd(m, k), total
    if policy["energy"] is not None:
        return top_svd_for_energy(m, policy["energy"], policy["max_rank"]), total
    return top_svd(m, full), total


def _convert_tuner(ad: Adapter, base, policy: dict, pad_to: int | None, split, dtype: torch.dtype):
    """LoHa / LoKr / VeRA → LoRA: per module, the best rank-k approximation of ΔW (a LoRA with scale 1)."""
    ckpt = open_checkpoint(resolve(str(base))) if base is not None else None
    try:
        shapes = {name: _module_shape(ad, mod, ckpt) for name, mod in ad.tuner_modules.items()}
        prepare_vera(ad, [tuple(s[:2]) for s in shapes.values()])
        tensors = {k: ad.read_finite(k).clone() for k in ad.replacements.values()}
        report, ranks = {}, {}
        kept_sq = total_sq = 0.0
        for name, mod in ad.tuner_modules.items():
            shape = shapes[name]
            try:
                svd, total = _tuner_svd(ad, mod, shape, policy, dtype)
            except NotFinite as exc:
                raise overflow_error(ad, name, exc, tensor=next(iter(mod.keys.values()), None)) from None
            k = choose_rank(svd.S, **policy) if policy["rank"] is None or mod.peft_type == "VERA" else min(policy["rank"], svd.S.numel())
            if policy["energy"] is not None and mod.peft_type != "VERA":
                k = svd.S.numel()
            new_b, new_a = factors(svd, k, split)
            if pad_to is not None:
                if pad_to < k:
                    raise AdapteropsError(f"--pad-to {pad_to} is below module {name}'s rank {k}", file=ad.path)
                new_b, new_a = pad_rank(new_b, new_a, pad_to)
            r_new = new_a.shape[0]
            tensors[f"{PREFIX}{name}.lora_A.weight"] = new_a.reshape(r_new, *shape[1:]).float().contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = new_b.reshape(shape[0], r_new, *([1] * (len(shape) - 2))).float().contiguous()
            kept = float((svd.S[:k].double() ** 2).sum())
            kept_sq, total_sq = kept_sq + kept, total_sq + total
            report[name] = {"rank": mod.r, "new_rank": r_new, "retained_fro": math.sqrt(min(kept / total, 1.0)) if total else 1.0}
            ranks[name] = r_new
    finally:
        if ckpt is not None:
            ckpt.close()
    old = ad.config
    bias = {"vera_only": "lora_only"}.get(old.get("bias"), old.get("bias", "none"))
    cfg = {"peft_type": "LORA", "task_type": old.get("task_type"), "base_model_name_or_path": old.get("base_model_name_or_path"),
           "revision": old.get("revision"), "peft_version": old.get("peft_version"), "target_modules": sorted(ranks),
           "modules_to_save": old.get("modules_to_save"), "fan_in_fan_out": ad.peft_type == "VERA" and bool(old.get("fan_in_fan_out")),
           "bias": bias if bias in ("none", "all", "lora_only") else "none", "lora_dropout": 0.0, "use_dora": False,
           "init_lora_weights": True, "inference_mode": True, **unit_scale_ranks(ranks)}
    return report, ranks, tensors, cfg, kept_sq, total_sq
