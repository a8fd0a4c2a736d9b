"""`stack`: combine adapters into one whose ΔW is Σ wᵢ·ΔWᵢ, exactly (cat) or truncated (svd)."""

from __future__ import annotations

import os
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from adapterops.core.lowrank import cat_factors, factors, svd_of_sum
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import open_adapter
from adapterops.io.adapter_writer import unit_scale_ranks, write_adapter
from adapterops.io.atomic import check_output
from adapterops.io.hub import resolve
from adapterops.result import Result


@dataclass
class StackResult(Result):
    """What a stack did."""

    output: str
    modules: int
    method: str
    ranks: dict[str, int]
    seconds: float


def stack(
    adapters: list[str | os.PathLike], out: str | os.PathLike, *, weights: list[float] | None = None,
    method: Literal["cat", "svd"] = "cat", rank: int | None = None, split: Literal["balanced", "b"] = "balanced",
    precision: Literal["float32", "float64"] = "float32", force: bool = False,
) -> StackResult:
    """One adapter whose ΔW is Σ wᵢ·ΔWᵢ, each term with its own scale (rank/alpha patterns, rsLoRA).

    `cat` is exact (rank Σ rᵢ, scales folded into A); `svd` forms the same sum in low-rank form and truncates it
    to `rank` (default: the largest input rank). Modules may differ between adapters (the union is written).

    Example::

        adapterops.stack(["./lora-a", "./lora-b"], "./ab", weights=[1, 0.5], method="cat")
    """
    start = time.perf_counter()
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters) or len(adapters) < 1:
        raise AdapteropsError(f"{len(weights)} weights given for {len(adapters)} adapters")
    paths = [resolve(str(a)) for a in adapters]
    out = Path(out)
    check_output(out, paths, force)
    with ExitStack() as stack:
        opened = [stack.enter_context(open_adapter(p, command="stack")) for p in paths]
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
        write_adapter(out, tensors, cfg, force=force)
    return StackResult(str(out), len(names), method, ranks, round(time.perf_counter() - start, 3))
