"""Merge steps for IA3, LoHa, LoKr and VeRA modules: planned by plan.py, applied by build.py, with PEFT's maths
(core/tuners.py) and PEFT's dtype rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from adapterops.core.tuners import (
    add_delta,
    ia3_merge,
    ia3_merge_bias,
    kaiming_projection,
    loha_delta,
    lokr_delta,
    lokr_factor,
    vera_delta,
)
from adapterops.errors import AdapteropsError
from adapterops.io.tuner_adapter import TunerModule, display


@dataclass(frozen=True)
class TunerStep:
    """Merge one IA3/LoHa/LoKr/VeRA module into a tensor (`bias`: an IA3 step on the module's bias)."""

    adapter: int
    module: TunerModule
    scale: float  # LoHa/LoKr: alpha/r times the user's weight; IA3/VeRA: 1
    layer: str = "linear"  # "linear" or "conv"
    fan_in_fan_out: bool = False
    bias: bool = False


def tuner_scale(mod: TunerModule, weight: float, path: Any) -> float:
    """The step's scale: LoHa/LoKr multiply alpha/r by the weight (PEFT's `scale_layer`); IA3 and VeRA have no scale
    that a weight could multiply, so only 1 is accepted."""
    if mod.peft_type in ("LOHA", "LOKR"):
        return mod.scale * weight if weight != 1 else mod.scale
    if weight != 1:
        raise AdapteropsError(f"--weights {weight:g}: a {display(mod.peft_type)} adapter has no scale to weight "
                              "(only LoRA, LoHa and LoKr adapters take weights other than 1)", file=path)
    return 1.0


def vera_projections(ad: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared (vera_A, vera_B): from the adapter file, or regenerated from projection_prng_key as PEFT does
    when save_projection is false (sized by the largest targeted in/out features, which the λ vectors tell)."""
    if ad.shared:
        return (ad.read_finite(ad.shared["vera_A"]).to(device), ad.read_finite(ad.shared["vera_B"]).to(device))
    cached = getattr(ad, "_vera_cache", None)
    if cached is None:
        raise AdapteropsError("VeRA projections were not prepared", file=ad.path)
    return cached[0].to(device), cached[1].to(device)


def prepare_vera(ad: Any, dims: list[tuple[int, int]]) -> None:
    """Regenerate VeRA's projections from the PRNG key (save_projection=false), sized as PEFT's `_find_dim`."""
    if ad.peft_type != "VERA" or ad.shared or not dims:
        return
    out_dim, in_dim = (max(d[0] for d in dims), max(d[1] for d in dims))
    r = int(ad.config.get("r", 256))
    g = torch.Generator(device="cpu").manual_seed(int(ad.config.get("projection_prng_key", 0)))
    vera_a = kaiming_projection((r, in_dim), g)
    vera_b = kaiming_projection((out_dim, r), g)
    ad._vera_cache = (vera_a, vera_b)


def tuner_delta(step: TunerStep, ad: Any, base_shape: tuple[int, ...], base_dtype: torch.dtype,
                device: torch.device, read: Any) -> torch.Tensor:
    """ΔW of a LoHa, LoKr or VeRA step in the base weight's layout (float32)."""
    mod = step.module

    def part(name: str) -> torch.Tensor | None:
        key = mod.key(name)
        return None if key is None else read(ad, key, device)

    if mod.peft_type == "LOHA":
        return loha_delta(part("hada_w1_a"), part("hada_w1_b"), part("hada_w2_a"), part("hada_w2_b"), step.scale,
                          base_shape, part("hada_t1"), part("hada_t2"))
    if mod.peft_type == "LOKR":
        w1 = lokr_factor(part("lokr_w1"), part("lokr_w1_a"), part("lokr_w1_b"))
        w2 = lokr_factor(part("lokr_w2"), part("lokr_w2_a"), part("lokr_w2_b"), part("lokr_t2"))
        return lokr_delta(w1, w2, step.scale, base_shape)
    if mod.peft_type == "VERA":
        vera_a, vera_b = vera_projections(ad, device)
        out_f, in_f = (base_shape[1], base_shape[0]) if step.fan_in_fan_out else (base_shape[0], base_shape[1])
        proj_dtype = torch.float32 if ad.shared else base_dtype  # saved: float32; regenerated: the base's dtype
        return vera_delta(vera_a, vera_b, part("vera_lambda_d"), part("vera_lambda_b"), in_f, out_f, step.fan_in_fan_out, proj_dtype)
    raise ValueError(f"{mod.peft_type} has no additive ΔW")


def apply_tuner_step(step: TunerStep, w: torch.Tensor, ad: Any, device: torch.device, read: Any) -> torch.Tensor:
    """One IA3 (product) or LoHa/LoKr/VeRA (sum) merge step on the working tensor `w`, rounded as PEFT rounds it.
    `read(ad, key, device)` gives an adapter tensor in float32."""
    mod = step.module
    if mod.peft_type == "IA3":
        ia3_l = read(ad, mod.keys["ia3_l"], device)
        if step.bias:
            return ia3_merge_bias(w, ia3_l)
        return ia3_merge(w, ia3_l, step.layer, bool(mod.feedforward), step.fan_in_fan_out)
    delta = tuner_delta(step, ad, tuple(w.shape), w.dtype, device, read)
    return add_delta(w, delta)


def dense_delta(ad: Any, mod: TunerModule, base_shape: tuple[int, ...], device: torch.device,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One module's dense ΔW (for rerank's conversion to LoRA), in `dtype`, in the (out, in, …) layout."""
    def read(a: Any, key: str, dev: torch.device) -> torch.Tensor:
        return a.read_finite(key).to(device=dev, dtype=dtype)

    step = TunerStep(0, mod, mod.scale if mod.peft_type in ("LOHA", "LOKR") else 1.0)
    if mod.peft_type == "VERA":
        b_out, a_in = base_shape[0], math.prod(base_shape[1:])
        from adapterops.core.tuners import vera_factors

        va, vb = vera_projections(ad, device)
        bf, af = vera_factors(va.to(dtype), vb.to(dtype), read(ad, mod.keys["vera_lambda_d"], device),
                              read(ad, mod.keys["vera_lambda_b"], device), a_in, b_out)
        return bf @ af
    return tuner_delta(step, ad, base_shape, dtype, device, read)
