"""LoRA and DoRA merge maths over tensors, operation for operation as PEFT 0.21 does it.

Every function here is pure. Adapter factors are float32 (PEFT upcasts them on load); the base weight keeps its
dtype. The order of operations is PEFT's, so that on the same backend the results are bit-identical:

- Linear / Conv1D: ΔW = transpose(B @ A, fan_in_fan_out) * s (fp32); W += ΔW in place, one rounding.
- Embedding: ΔW = (B @ A)ᵀ * s; W += ΔW.to(W.dtype): the delta is rounded first, then the sum.
- Conv: 1×1 kernels as a matmul, other kernels as conv(Aᵀ, B)ᵀ * s; added like Linear.
- DoRA: W' = (m / ‖W + ΔW‖) ⊙ (W + ΔW) in float32, one rounding at the end.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Kind = Literal["linear", "embedding", "conv"]

_CONV_FN = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}


def delta_weight(
    kind: Kind,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    fan_in_fan_out: bool = False,
    base_shape: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """ΔW in float32, in the base weight's layout (PEFT's `get_delta_weight`)."""
    a = lora_a.float()
    b = lora_b.float()
    if kind == "linear":
        out = b @ a
        if fan_in_fan_out:
            out = out.T
        return out * scale
    if kind == "embedding":
        return (b @ a).T * scale
    if kind == "conv":
        if base_shape is not None and len(base_shape) == 4 and tuple(base_shape[2:4]) == (1, 1):
            return (b.squeeze(3).squeeze(2) @ a.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
        out = _CONV_FN[a.dim()](a.transpose(0, 1), b)
        return out.transpose(0, 1) * scale
    raise ValueError(f"unknown LoRA kind {kind!r}")


def merge_lora(weight: torch.Tensor, delta: torch.Tensor, kind: Kind) -> torch.Tensor:
    """W + ΔW in the base dtype, rounded as PEFT's default (unsafe) merge rounds it. Modifies `weight`."""
    if kind == "embedding":
        weight += delta.to(weight.dtype)
    else:
        weight += delta
    return weight


def dora_weight_norm(weight: torch.Tensor, delta: torch.Tensor, kind: Kind, fan_in_fan_out: bool = False) -> torch.Tensor:
    """‖W + ΔW‖ per output feature (float32), along the axis PEFT's DoRA normalises for this layer type."""
    if kind == "conv":
        w = weight + delta
        dims = tuple(range(1, w.dim()))
        return w.norm(p=2, dim=dims, keepdim=True).transpose(1, 0)
    if kind == "embedding":
        w = weight.T + delta.T
    elif fan_in_fan_out:
        w = weight.T + delta.T
    else:
        w = weight + delta
    return torch.linalg.norm(w, dim=1).to(w.dtype)


def dora_factor(magnitude: torch.Tensor, norm: torch.Tensor, kind: Kind, ndim: int, fan_in_fan_out: bool) -> torch.Tensor:
    """m / ‖W + ΔW‖, shaped to broadcast over the base weight."""
    factor = magnitude.float() / norm
    if kind == "conv":
        return factor.view(-1, *([1] * (ndim - 1)))
    if kind == "embedding":
        return factor.view(1, -1)
    factor = factor.view(-1, 1)
    return factor.T if fan_in_fan_out else factor


def merge_dora(
    weight: torch.Tensor,
    delta: torch.Tensor,
    magnitude: torch.Tensor,
    kind: Kind,
    *,
    fan_in_fan_out: bool = False,
    norm_base: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DoRA merge: (m / ‖W₀ + ΔW‖) ⊙ (W + ΔW), one rounding; returns (merged weight, norm).

    `norm_base` is the unmerged base W₀ when earlier adapters were merged into `weight` already (PEFT 0.21).
    """
    base = weight if norm_base is None else norm_base
    norm = dora_weight_norm(base, delta, kind, fan_in_fan_out)
    factor = dora_factor(magnitude, norm, kind, weight.dim(), fan_in_fan_out)
    merged = (factor * (weight + delta)).to(weight.dtype)
    return merged, norm


def merge_lora_bias(bias: torch.Tensor, lora_b_bias: torch.Tensor, scale: float) -> torch.Tensor:
    """b + s·b_B (lora_bias), rounded once to the bias dtype. Modifies `bias`."""
    bias += lora_b_bias.float() * scale
    return bias
