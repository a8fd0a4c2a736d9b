"""Adapter algebra commands that write PEFT adapters.

`rescale` (standard α/r ⇄ rsLoRA α/√r, --strength, --bake) and `rerank` (SVD truncation or padding, low-rank
all the way: the thin SVD of s·B·A comes from QR of the factors).
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from adapterops.core.lowrank import cat_factors, energy_rank, factors, svd_of_product, svd_of_sum
from adapterops.core.scaling import alpha_for
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import CONFIG_NAME, SAFETENSORS_NAME, open_adapter
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.hub import resolve
from adapterops.io.jsonfile import write_json
from adapterops.io.safetensors_io import save_file
from adapterops.result import Result


@dataclass
class RescaleResult(Result):
    """What a rescale did (the CLI's --json summary)."""

    output: str
    modules: int
    use_rslora: bool
    baked: bool
    seconds: float


def exact_key(module: str) -> str:
    """A rank/alpha pattern key that matches exactly this module under PEFT's `(.*\\.)?(KEY)$` rule."""
    return "^" + re.escape(module)


def unit_scale_ranks(ranks: dict[str, int]) -> dict[str, object]:
    """Config keys for factors that already carry their scale: α = r per module (scale 1), standard scaling.

    The most common rank is the default; every other module gets exact-match rank and alpha pattern keys.
    """
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    other = {exact_key(m): r for m, r in ranks.items() if r != default}
    return {"r": default, "lora_alpha": default, "use_rslora": False, "rank_pattern": other, "alpha_pattern": dict(other)}


def write_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, object]) -> None:
    """Write a PEFT adapter folder (safetensors + sorted-keys config, as PEFT saves it), atomically."""
    with atomic_dir(out) as tmp:
        save_file(tensors, tmp / SAFETENSORS_NAME, {"format": "pt"})
        write_json(tmp / CONFIG_NAME, config, sort_keys=True)


def rescale_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, *, to: Literal["rslora", "standard"] | None = None,
    strength: float = 1.0, bake: bool = False, force: bool = False,
) -> RescaleResult:
    """The same ΔW (times `strength`) under the other scaling, or with the scale folded into B (`bake`).

    Ranks and factors are kept; alphas are rederived per module (rank and alpha patterns included), and any
    module whose alpha differs from the new default gets an exact-match alpha_pattern key, so PEFT gives every
    module the intended scale whatever order it reads the patterns in.
    """
    start = time.perf_counter()
    path = resolve(str(adapter))
    out = Path(out)
    check_output(out, [path], force)
    ad = open_adapter(path)
    try:
        use_rslora = ad.use_rslora if to is None else (to == "rslora")
        cfg = dict(ad.config)
        tensors = {k: ad.read_finite(k).clone() for k in ad.tensors.keys()}
        alphas: dict[str, float] = {}
        for mod in ad.modules.values():
            scale = mod.scale * strength
            if bake:
                for key in (mod.b_key, mod.bias_key):
                    if key is not None:  # kept in float32: PEFT computes in float32, and bf16 would round B·s again
                        tensors[key] = tensors[key].float() * scale
                scale = 1.0
            alphas[mod.name] = alpha_for(scale, mod.r, use_rslora)
        r0 = cfg.get("r", 8)
        default = alpha_for(1.0, r0, use_rslora) if bake else alpha_for(
            (cfg.get("lora_alpha", 8) / (math.sqrt(r0) if ad.use_rslora else r0)) * strength, r0, use_rslora)
        cfg.update(use_rslora=use_rslora, lora_alpha=default,
                   alpha_pattern={exact_key(m): a for m, a in alphas.items() if a != default})
        if not all(math.isfinite(a) and a > 0 for a in alphas.values()):
            raise AdapteropsError("the rescaled alphas must be positive and finite (check --strength)", file=path)
        write_adapter(out, tensors, cfg)
    finally:
        ad.close()
    return RescaleResult(str(out), len(ad.modules), use_rslora, bake, round(time.perf_counter() - start, 3))


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


def rerank_adapter(
    adapter: str | os.PathLike, out: str | os.PathLike, *, rank: int | None = None, energy: float | None = None,
    sv_ratio: float | None = None, sv_fro: float | None = None, max_rank: int | None = None, pad_to: int | None = None,
    split: Literal["balanced", "b"] = "balanced", precision: Literal["float32", "float64"] = "float32", force: bool = False,
) -> RerankResult:
    """Truncate each module's ΔW = s·B·A to a chosen rank by its SVD (or zero-pad to a uniform rank), exactly.

    The new factors carry the scale (α = r', standard scaling), and every module's rank and alpha go into
    exact-match pattern keys. DoRA magnitudes and lora_B biases (scaled in) are kept.
    """
    start = time.perf_counter()
    policies = [p for p in (rank, energy, sv_ratio, sv_fro) if p is not None]
    if len(policies) > 1 or (not policies and pad_to is None):
        raise AdapteropsError("give exactly one of --rank, --energy, --sv-ratio, --sv-fro (or only --pad-to)")
    path = resolve(str(adapter))
    out = Path(out)
    check_output(out, [path], force)
    ad = open_adapter(path)
    dtype = torch.float64 if precision == "float64" else torch.float32
    try:
        tensors = {k: ad.read_finite(k).clone() for k in ad.tensors.keys()}
        report: dict[str, dict[str, float]] = {}
        kept_sq = total_sq = 0.0
        ranks: dict[str, int] = {}
        for mod in ad.modules.values():
            a, b = tensors[mod.a_key], tensors[mod.b_key]
            svd = svd_of_product(b, a, mod.scale, dtype)
            k = svd.S.numel() if not policies else choose_rank(svd.S, rank=rank, energy=energy, sv_ratio=sv_ratio,
                                                                sv_fro=sv_fro, max_rank=max_rank)
            new_b, new_a = factors(svd, k, split)
            if pad_to is not None:
                if pad_to < k:
                    raise AdapteropsError(f"--pad-to {pad_to} is below module {mod.name}'s rank {k}", file=path)
                new_b = torch.cat([new_b, new_b.new_zeros(new_b.shape[0], pad_to - k)], dim=1)
                new_a = torch.cat([new_a, new_a.new_zeros(pad_to - k, new_a.shape[1])], dim=0)
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
        cfg = dict(ad.config, **unit_scale_ranks(ranks))
        write_adapter(out, tensors, cfg)
    finally:
        ad.close()
    retained = math.sqrt(kept_sq / total_sq) if total_sq else 1.0
    return RerankResult(str(out), report, retained, round(time.perf_counter() - start, 3))


@dataclass
class StackResult(Result):
    """What a stack did."""

    output: str
    modules: int
    method: str
    ranks: dict[str, int]
    seconds: float


def stack_adapters(
    adapters: list[str | os.PathLike], out: str | os.PathLike, *, weights: list[float] | None = None,
    method: Literal["cat", "svd"] = "cat", rank: int | None = None, split: Literal["balanced", "b"] = "balanced",
    precision: Literal["float32", "float64"] = "float32", force: bool = False,
) -> StackResult:
    """One adapter whose ΔW is Σ wᵢ·ΔWᵢ, each term with its own scale (rank/alpha patterns, rsLoRA).

    `cat` is exact (rank Σ rᵢ, scales folded into A); `svd` forms the same sum in low-rank form and truncates it
    to `rank` (default: the largest input rank). Modules may differ between adapters (the union is written).
    """
    start = time.perf_counter()
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters) or len(adapters) < 1:
        raise AdapteropsError(f"{len(weights)} weights given for {len(adapters)} adapters")
    paths = [resolve(str(a)) for a in adapters]
    out = Path(out)
    check_output(out, paths, force)
    opened = []
    try:
        opened = [open_adapter(p) for p in paths]
        for ad in opened:
            if any(m.is_dora for m in ad.modules.values()):
                raise AdapteropsError("DoRA adapters cannot be stacked: ΔW depends on the base weight through the norm", file=ad.path)
        tensors: dict[str, torch.Tensor] = {}
        for ad in opened:  # modules_to_save copies and trained biases: carried over, never two for one tensor
            for name, key in ad.replacements.items():
                if key in tensors:
                    raise AdapteropsError(f"two adapters replace '{name}'", file=ad.path, tensor=key)
                tensors[key] = ad.read(key)
        names = list(dict.fromkeys(m for ad in opened for m in ad.modules))
        ranks: dict[str, int] = {}
        for name in names:
            terms = [(ad, ad.modules[name], w) for ad, w in zip(opened, weights) if name in ad.modules]
            kinds = {mod.kind for _, mod, _ in terms}
            if len(kinds) > 1:
                raise AdapteropsError(f"module {name} is {' and '.join(sorted(kinds))} in different adapters", file=terms[0][0].path)
            first_ad, first, _ = terms[0]
            a_shape, b_shape = first_ad.read(first.a_key).shape, first_ad.read(first.b_key).shape
            factors_ = [(ad.read_finite(mod.b_key).float(), ad.read_finite(mod.a_key).float(), w * mod.scale) for ad, mod, w in terms]
            for (b, a, _), (ad, mod, _) in zip(factors_, terms):
                if a.shape[1:] != a_shape[1:] or b.shape[0] != b_shape[0]:
                    raise AdapteropsError(f"module {name} has other shapes than in {first_ad.path}", file=ad.path, tensor=mod.a_key)
            if method == "cat":
                new_b, new_a = cat_factors(factors_)
            else:
                svd = svd_of_sum(factors_, torch.float64 if precision == "float64" else torch.float32)
                k = min(rank or max(mod.r for _, mod, _ in terms), svd.S.numel())
                fb, fa = factors(svd, k, split)
                new_b = fb.float().reshape(b_shape[0], k, *b_shape[2:])
                new_a = fa.float().reshape(k, *a_shape[1:])
            tensors[first.a_key] = new_a.contiguous()
            tensors[first.b_key] = new_b.contiguous()
            biases = [(ad.read_finite(mod.bias_key).float(), w * mod.scale) for ad, mod, w in terms if mod.bias_key is not None]
            if biases:
                tensors[f"{first.b_key[: -len('.weight')]}.bias"] = sum(b * s for b, s in biases)
            ranks[name] = new_a.shape[0]
        cfg = dict(opened[0].config, **unit_scale_ranks(ranks), target_modules=sorted(names),
                   lora_bias=any(t.endswith("lora_B.bias") for t in tensors))
        write_adapter(out, tensors, cfg)
    finally:
        for ad in opened:
            ad.close()
    return StackResult(str(out), len(names), method, ranks, round(time.perf_counter() - start, 3))
