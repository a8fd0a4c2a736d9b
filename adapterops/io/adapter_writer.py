"""Writing a PEFT adapter folder: adapter_model.safetensors plus adapter_config.json, with the config keys that
give each module its exact scale."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from adapterops.core.finite import all_finite
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import CONFIG_NAME, SAFETENSORS_NAME
from adapterops.io.atomic import atomic_dir
from adapterops.io.jsonfile import write_json
from adapterops.io.safetensors_io import save_file


def exact_key(module: str) -> str:
    """A rank/alpha pattern key that matches exactly this module under PEFT's `(.*\\.)?(KEY)$` rule."""
    return "^" + re.escape(module)


def unit_scale_ranks(ranks: dict[str, int], avoid: frozenset[int] | set[int] = frozenset()) -> dict[str, object]:
    """Config keys for factors that already carry their scale: α = r per module (scale 1), standard scaling.

    The most common rank is the default; every other module gets exact-match rank and alpha pattern keys. `avoid`:
    ranks the default must not be (a MoE parameter LoRA whose r·E rows equal the default rank, looked up by its
    module name, would read as a plain Linear LoRA too); with no other rank, the default is one above them all.
    """
    values = list(ranks.values())
    usable = {r for r in values if r not in avoid}
    default = max(usable, key=values.count) if usable else max(avoid) + 1
    other = {exact_key(m): r for m, r in ranks.items() if r != default}
    return {"r": default, "lora_alpha": default, "use_rslora": False, "rank_pattern": other, "alpha_pattern": dict(other)}


def write_adapter(out: Path, tensors: dict[str, torch.Tensor], config: dict[str, object], *, force: bool,
                  source: Path | None = None) -> None:
    """Write a PEFT adapter folder (safetensors + sorted-keys config, as PEFT saves it), atomically.

    Every floating tensor must be finite: an overflow (a huge strength, weight or scale) is refused, naming `source`
    (the input it came from) or else OUT, before anything is written.
    """
    for key, t in tensors.items():
        if not all_finite(t):
            raise AdapteropsError(f"the output would hold NaN or Inf values (an overflow of {str(t.dtype).removeprefix('torch.')}: "
                                  "a strength, weight or scale too large?)", file=source or out, tensor=key)
    with atomic_dir(out, replace=force) as tmp:
        save_file(tensors, tmp / SAFETENSORS_NAME, {"format": "pt"})
        write_json(tmp / CONFIG_NAME, config, sort_keys=True)
