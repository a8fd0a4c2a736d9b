"""Adapter algebra commands that write PEFT adapters: `rescale` (standard α/r ⇄ rsLoRA α/√r, --strength, --bake)."""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal


from adapterops.errors import AdapteropsError
from adapterops.io.adapter import CONFIG_NAME, SAFETENSORS_NAME, open_adapter
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.hub import resolve
from adapterops.io.jsonfile import write_json
from adapterops.io.safetensors_io import save_file


@dataclass
class RescaleResult:
    """What a rescale did (the CLI's --json summary)."""

    output: str
    modules: int
    use_rslora: bool
    baked: bool
    seconds: float

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict."""
        return asdict(self)


def exact_key(module: str) -> str:
    """A rank/alpha pattern key that matches exactly this module under PEFT's `(.*\\.)?(KEY)$` rule."""
    return "^" + re.escape(module)


def alpha_for(scale: float, r: int, use_rslora: bool) -> float:
    """The alpha that gives this scale at rank r: s·r, or s·√r under rsLoRA."""
    return scale * math.sqrt(r) if use_rslora else scale * r


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
        tensors = {k: ad.read(k).clone() for k in ad.tensors.keys()}
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
        with atomic_dir(out) as tmp:
            save_file(tensors, tmp / SAFETENSORS_NAME, {"format": "pt"})
            write_json(tmp / CONFIG_NAME, cfg, sort_keys=True)
    finally:
        ad.close()
    return RescaleResult(str(out), len(ad.modules), use_rslora, bake, round(time.perf_counter() - start, 3))
