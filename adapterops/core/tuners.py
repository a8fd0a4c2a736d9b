"""ΔW and merge maths of the other PEFT tuners that PEFT merges: IA3, LoHa, LoKr and VeRA, as PEFT 0.21 does it.

Every function is pure and repeats PEFT's expressions in PEFT's order, so that on the same backend the bits are
PEFT's. Adapter tensors arrive in float32 (PEFT upcasts them on load; VeRA's shared projections stay float32 too).

- IA3:  W' = round(W ⊙ l) (a product, not a sum: l scales output rows, or input columns for feed-forward modules);
        the bias of a non-feed-forward module is scaled too: b' = round(b ⊙ l).
- LoHa: ΔW = ((W1a·W1b) ⊙ (W2a·W2b)) · s, or with Tucker cores (use_effective_conv2d) einsum-rebuilt factors;
        W' = round(fp32(W) + ΔW).
- LoKr: ΔW = (W1 ⊗ W2) · s, each of W1, W2 full or a product (W2 also a Tucker rebuild); W' = round(fp32(W) + ΔW).
- VeRA: ΔW = (λ_b ⊙ B[:out]) · (λ_d ⊙ A[:, :in]), transposed for Conv1D, in float32; W' = round(fp32(W) + ΔW);
        projections regenerated from the PRNG key are first rounded to the base dtype, as PEFT does (`vera_delta`).
"""

from __future__ import annotations

import math

import torch

from adapterops.errors import AdapteropsError


def ia3_scaling(ia3_l: torch.Tensor, layer: str, feedforward: bool, fan_in_fan_out: bool) -> torch.Tensor:
    """The factor PEFT multiplies the weight by, shaped to broadcast over it (Linear/Conv1D or Conv)."""
    if layer == "conv":  # ia3_l is (1, C, 1, …): output channels (transposed) or input channels (groups == 1)
        return ia3_l if feedforward else ia3_l.transpose(0, 1)
    return ia3_l.T if fan_in_fan_out else ia3_l  # (out, 1) or (1, in) for an (out, in) weight


def ia3_merge(weight: torch.Tensor, ia3_l: torch.Tensor, layer: str, feedforward: bool, fan_in_fan_out: bool) -> torch.Tensor:
    """W' = W ⊙ l, computed in the promoted dtype (float32 for a 16-bit base) and rounded once to W's dtype."""
    return torch.mul(weight, ia3_scaling(ia3_l, layer, feedforward, fan_in_fan_out)).to(weight.dtype)


def ia3_merge_bias(bias: torch.Tensor, ia3_l: torch.Tensor) -> torch.Tensor:
    """b' = b ⊙ l for a non-feed-forward module, rounded once to b's dtype."""
    if ia3_l.numel() != bias.numel():  # a base whose bias does not fit its weight's output rows
        raise AdapteropsError(f"an IA3 vector of {ia3_l.numel()} values cannot scale a bias of shape {list(bias.shape)}")
    return torch.mul(bias, ia3_l.reshape(bias.shape)).to(bias.dtype)


def _scale_tensor(scale: float) -> torch.Tensor:
    """PEFT's LoHa passes `torch.tensor(self.scaling)`: a 0-dim tensor of the default dtype."""
    return torch.tensor(scale)


def _fits(kind: str, got: tuple[int, ...], base_shape: tuple[int, ...]) -> None:
    """PEFT reshapes ΔW to the weight: only a ΔW laid out as PEFT makes it for this weight may be reshaped (the same
    element count in another layout, e.g. [in, out] on an [out, in] weight, would merge scrambled). The callers
    check this with the adapter's file and tensor names first (io/tuner_adapter.py); this is the last guard."""
    flat = (base_shape[0], math.prod(base_shape[1:]))
    tucker = tuple(base_shape) if len(base_shape) == 4 else (*base_shape, 1)
    if tuple(got) not in (tuple(base_shape), flat, tucker):
        raise AdapteropsError(f"{kind} factors make a ΔW of shape {list(got)}, which does not fit a weight of shape "
                              f"{list(base_shape)}")


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, scale: float,
               base_shape: tuple[int, ...], t1: torch.Tensor | None = None, t2: torch.Tensor | None = None) -> torch.Tensor:
    """LoHa's ΔW (PEFT's `make_weight` / `make_weight_cp`), reshaped to the base weight."""
    _fits("LoHa", (w1a.shape[1], w1b.shape[1], *t1.shape[2:]) if t1 is not None else (w1a.shape[0], w1b.shape[1]), base_shape)
    s = _scale_tensor(scale).to(w1a.device)
    if t1 is not None:
        rebuild1 = torch.einsum("i j k l, j r, i p -> p r k l", t1, w1b, w1a)
        rebuild2 = torch.einsum("i j k l, j r, i p -> p r k l", t2, w2b, w2a)
        weight = rebuild1 * rebuild2 * s
    else:
        weight = ((w1a @ w1b) * (w2a @ w2b)) * s
    return weight.reshape(base_shape)


def lokr_delta(w1: torch.Tensor, w2: torch.Tensor, scale: float, base_shape: tuple[int, ...]) -> torch.Tensor:
    """LoKr's ΔW from its two Kronecker factors (PEFT's `make_kron`), reshaped to the base weight."""
    _fits("LoKr", (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1], *w2.shape[2:]), base_shape)
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    w2 = w2.contiguous()
    return (torch.kron(w1, w2) * scale).reshape(base_shape)


def lokr_factor(full: torch.Tensor | None, a: torch.Tensor | None, b: torch.Tensor | None,
                t: torch.Tensor | None = None) -> torch.Tensor:
    """One LoKr Kronecker factor: stored whole, a product a·b, or a Tucker rebuild from the core t."""
    if full is not None:
        return full
    if t is not None:
        return torch.einsum("i j k l, i p, j r -> p r k l", t, a, b)
    return a @ b


def vera_delta(vera_a: torch.Tensor, vera_b: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
               in_features: int, out_features: int, fan_in_fan_out: bool,
               projection_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """VeRA's ΔW as PEFT's `get_delta_weight` computes it, in float32.

    Projections loaded from the adapter file are used as they are (float32). Projections regenerated from
    `projection_prng_key` (save_projection=false) pass through the base layer's dtype when PEFT attaches them and
    come back as float32 (measured with PEFT 0.21.2: a bf16 base gets bf16-rounded float32 projections):
    `projection_dtype` is that dtype. ΔW is then added in float32 with one rounding, like LoRA.
    """
    a, b = vera_a.to(projection_dtype).float(), vera_b.to(projection_dtype).float()
    out = (lambda_b.unsqueeze(-1) * b[:out_features, :]) @ (lambda_d.unsqueeze(-1) * a[:, :in_features])
    return out.T if fan_in_fan_out else out


def vera_factors(vera_a: torch.Tensor, vera_b: torch.Tensor, lambda_d: torch.Tensor, lambda_b: torch.Tensor,
                 in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with ΔW = B·A exactly (in an (out, in) layout): VeRA is a rank-r product already."""
    return lambda_b.unsqueeze(-1) * vera_b[:out_features, :].float(), lambda_d.unsqueeze(-1) * vera_a[:, :in_features].float()


def add_delta(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """PEFT's `weight.data += ΔW`: computed in the promoted dtype and rounded once to W's dtype."""
    if delta.dtype == weight.dtype:
        return weight.add_(delta)
    return delta.add_(weight).to(weight.dtype) if delta.dtype == torch.float32 else weight.add_(delta)


def kaiming_projection(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """PEFT's VeRA `_kaiming_init`: uniform(±√3·√2/√fan_in) from the shared generator (fan_in = shape[1])."""
    import math

    bound = math.sqrt(3.0) * (math.sqrt(2) / math.sqrt(shape[1]))
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)
