"""LoRA on parameters (PEFT's `target_parameters`, `lora.ParamWrapper`): MoE experts stored as 3-D tensors.

PEFT 0.21's ParamWrapper on a parameter of shape `[E, d1, d2]` keeps `lora_A` as `[r·E, in]` and `lora_B` as
`[out, r·E]`, where (in, out) = (d2, d1) for the usual `[E, out, in]` layout (transformers' `is_transposed=False`)
and (d1, d2) otherwise. Its `get_delta_weight`:

    A = lora_A.reshape(E, r, in)          # expert e's rows are e·r ... e·r + r − 1
    B = lora_B.reshape(out, r, E)         # expert e's columns are e, E + e, 2E + e, ...
    ΔW = einsum("o r e, e r i -> e o i", B, A) * s      (or "-> e i o")
    ΔW = ΔW.to(W.dtype);  W += ΔW         # rounded to the base dtype first, then added

A 2-D parameter (E = 1, e.g. a router's `weight`) takes Linear's ΔW = (B @ A) * s, rounded the same way.
Everything here is float32 factors in, the base dtype out. One expert's ΔW is computed by the same einsum over that
expert's slice of the factors, so a checkpoint that stores one tensor per expert streams one expert at a time.
"""

from __future__ import annotations

import torch


def expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B as [out, r, E], A as [E, r, in]): PEFT's reshapes."""
    a = lora_a.float().reshape(num_experts, -1, lora_a.shape[-1])
    b = lora_b.float().reshape(lora_b.shape[0], -1, num_experts)
    return b, a


def param_delta(
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    num_experts: int,
    swapped: bool,
    expert: int | None = None,
) -> torch.Tensor:
    """ΔW in float32: the whole `[E, d1, d2]` stack (expert None), one expert's `[d1, d2]`, or for E = 1 the 2-D ΔW."""
    if num_experts == 1 and expert is None:
        return (lora_b.float() @ lora_a.float()) * scale
    b, a = expert_factors(lora_a, lora_b, num_experts)
    eq = "o r e, e r i -> e o i" if swapped else "o r e, e r i -> e i o"
    if expert is None:
        return torch.einsum(eq, b, a) * scale
    return (torch.einsum(eq, b[:, :, expert:expert + 1], a[expert:expert + 1]) * scale)[0]


def merge_param(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """W + ΔW.to(W.dtype): ParamWrapper rounds the delta to the base dtype before adding (like Embedding)."""
    return weight.add_(delta.to(weight.dtype))


def per_expert_factors(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each expert's own (B_e [out, r], A_e [r, in]): ΔW_e = s·B_e·A_e (in the `[out, in]` orientation)."""
    b, a = expert_factors(lora_a, lora_b, num_experts)
    return [(b[:, :, e].contiguous(), a[e].contiguous()) for e in range(num_experts)]
