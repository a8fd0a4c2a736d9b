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

from adapterops.core.lowrank import energy_rank, factors, svd_of_product
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import open_adapter
from adapterops.io.adapter_writer import unit_scale_ranks, write_adapter
from adapterops.io.atomic import check_output
from adapterops.io.hub import resolve
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
) -> RerankResult:
    """Truncate each module's ΔW = s·B·A to a chosen rank by its SVD (or zero-pad to a uniform rank), exactly.

    The new factors carry the scale (α = r', standard scaling), and every module's rank and alpha go into
    exact-match pattern keys. DoRA magnitudes and lora_B biases (scaled in) are kept.

    Example::

        adapterops.rerank("./lora-r64", "./lora-r16", rank=16).retained_fro
    """
    start = time.perf_counter()
    policies = [p for p in (rank, energy, sv_ratio, sv_fro) if p is not None]
    if len(policies) > 1 or (not policies and pad_to is None):
        raise AdapteropsError("give exactly one of --rank, --energy, --sv-ratio, --sv-fro (or only --pad-to)")
    path = resolve(str(adapter))
    out = Path(out)
    check_output(out, [path], force)
    dtype = torch.float64 if precision == "float64" else torch.float32
    with open_adapter(path) as ad:
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
        write_adapter(out, tensors, cfg, force=force, source=path)
    retained = math.sqrt(kept_sq / total_sq) if total_sq else 1.0
    return RerankResult(str(out), report, retained, round(time.perf_counter() - start, 3))
