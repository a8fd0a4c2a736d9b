"""`rescale`: the same ΔW under standard α/r or rsLoRA α/√r scaling, times --strength, or baked into lora_B."""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from adapterops.core.scaling import alpha_for
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import open_adapter
from adapterops.io.adapter_writer import exact_key, write_adapter
from adapterops.io.atomic import check_output
from adapterops.io.hub import resolve
from adapterops.pipeline.params import param_layouts
from adapterops.result import Result


@dataclass
class RescaleResult(Result):
    """What a rescale did (the CLI's --json summary)."""

    output: str
    modules: int
    use_rslora: bool
    baked: bool
    seconds: float


def rescale(
    adapter: str | os.PathLike, out: str | os.PathLike, *, to: Literal["rslora", "standard"] | None = None,
    strength: float = 1.0, bake: bool = False, force: bool = False, base: str | os.PathLike | None = None,
) -> RescaleResult:
    """The same ΔW (times `strength`) under the other scaling, or with the scale folded into B (`bake`).

    Ranks and factors are kept; alphas are rederived per module (rank and alpha patterns included), and any
    module whose alpha differs from the new default gets an exact-match alpha_pattern key, so PEFT gives every
    module the intended scale whatever order it reads the patterns in.

    LoRA on parameters (`target_parameters`, MoE experts) is rescaled as a whole module: all its experts share one
    scale, baked into lora_B or rederived as an alpha keyed by the parameter's path (PEFT looks patterns up by it).
    Which parameter a module adapts comes from the config when its candidates' patterns agree, else from `base`
    (headers only).

    Example::

        adapterops.rescale("./lora-rs", "./lora-baked", to="standard", bake=True)
    """
    start = time.perf_counter()
    path = resolve(str(adapter))
    out = Path(out)
    check_output(out, [path] + ([resolve(str(base))] if base is not None else []), force)
    ad = open_adapter(path, command="rescale", params=True)
    with ad:
        layouts = param_layouts(ad, base)
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
            if base is None and mod.name in ad.param_modules:  # rows = r: a plain LoRA or a 2-D parameter's (E = 1), the same maths
                pm = ad.param_modules[mod.name]
                if any(pm.rank_alpha(p, ad.config, 1)[2] != mod.scale for p in pm.candidates):
                    raise AdapteropsError(f"module {mod.name} may be a LoRA on one of {list(pm.candidates)} with another "
                                          "scale; give the base (--base, headers only) to settle which", file=path)
                alphas.update({p: alphas[mod.name] for p in pm.candidates})
        for name, lay in layouts.items():  # one scale for all E experts, keyed by the parameter's path
            scale = lay.scale * strength
            if bake:
                key = lay.module.b_key
                tensors[key] = tensors[key].float() * scale
                scale = 1.0
            alphas.update({p: alpha_for(scale, lay.r, use_rslora) for p in lay.params})
        r0 = cfg.get("r", 8)
        default = alpha_for(1.0, r0, use_rslora) if bake else alpha_for(
            (cfg.get("lora_alpha", 8) / (math.sqrt(r0) if ad.use_rslora else r0)) * strength, r0, use_rslora)
        cfg.update(use_rslora=use_rslora, lora_alpha=default,
                   alpha_pattern={exact_key(m): a for m, a in alphas.items() if a != default})
        if not all(math.isfinite(a) and a > 0 for a in alphas.values()):
            raise AdapteropsError("the rescaled alphas must be positive and finite (check --strength)", file=path)
        write_adapter(out, tensors, cfg, force=force, source=path)
    return RescaleResult(str(out), len(ad.modules) + len(layouts), use_rslora, bake, round(time.perf_counter() - start, 3))
