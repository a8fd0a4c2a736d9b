"""LoRA adapters as mlx-lm reads them (`mlx_lm.tuner.utils.load_adapters`): a folder with adapters.safetensors and
adapter_config.json. No mlx needed: the files are safetensors and JSON.

Tensors: `<module>.lora_a` of shape (in, r) = lora_Aᵀ and `<module>.lora_b` of shape (r, out) = lora_Bᵀ, named as
mlx-lm names the model's modules (the same names as transformers for the Llama family). Config: `fine_tune_type`
"lora", `num_layers` (LoRA goes into the last N blocks; -1 all), `lora_parameters` {rank, scale, dropout, keys}:
one rank and one scale for every module, the scale used directly (y += scale · (x @ lora_a) @ lora_b); an
`alpha` key is refused by mlx-lm. `keys` are module paths inside a block (`self_attn.q_proj`) or at the top
(`lm_head`). Modules mlx-lm creates but the file lacks keep their initial lora_b of zeros.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from adapterops.errors import AdapteropsError
from adapterops.io.formats import (
    Factors,
    FormatAdapter,
    check_factors,
    foreign_number,
    split_module,
)
from adapterops.io.jsonfile import read_json_object, write_json
from adapterops.io.paths import safe_file
from adapterops.io.safetensors_io import SafetensorsFile, save_file

WEIGHTS = "adapters.safetensors"
CONFIG = "adapter_config.json"


def is_mlx_folder(path: Path) -> bool:
    """Whether a folder holds an mlx-lm adapter (adapters.safetensors)."""
    return os.path.lexists(path / WEIGHTS)


def write_mlx(out: Path, modules: dict[str, Factors], *, rank: int, scale: float, num_layers: int) -> list[str]:
    """Write the factors (every one of rank `rank`, scale `scale` already applied or shared) into folder `out`.

    Returns the config's keys.
    """
    tensors: dict[str, torch.Tensor] = {}
    keys: set[str] = set()
    for module, f in modules.items():
        if f.rank != rank:
            raise AdapteropsError(f"module {module} has rank {f.rank}, not the adapter's {rank}")
        tensors[f"{module}.lora_a"] = f.a.t().contiguous()
        tensors[f"{module}.lora_b"] = f.b.t().contiguous()
        keys.add(split_module(module)[1])
    save_file(tensors, out / WEIGHTS, {"format": "mlx"})
    config = {"fine_tune_type": "lora", "num_layers": num_layers,
              "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)}}
    write_json(out / CONFIG, config)
    return sorted(keys)


def read_mlx(path: Path) -> FormatAdapter:
    """Read an mlx-lm LoRA adapter folder into transformers-named factors."""
    cfg_path = safe_file(path, CONFIG)
    cfg = read_json_object(cfg_path)
    kind = cfg.get("fine_tune_type", "lora")
    if kind != "lora":
        raise AdapteropsError(f"fine_tune_type {kind!r} is not supported (only \"lora\")", file=cfg_path)
    params = cfg.get("lora_parameters")
    if not isinstance(params, dict):
        raise AdapteropsError("lora_parameters is missing", file=cfg_path)
    if "scale" not in params:
        hint = " (mlx-lm uses 'scale', not 'alpha')" if "alpha" in params else ""
        raise AdapteropsError(f"lora_parameters has no scale{hint}", file=cfg_path)
    scale = foreign_number(params["scale"], "lora_parameters.scale", cfg_path)
    rank = params.get("rank")
    if rank is not None:
        rank = foreign_number(rank, "lora_parameters.rank", cfg_path, integer=True)
    weights = safe_file(path, WEIGHTS)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    with SafetensorsFile(weights) as f:
        for key in f.keys():
            module, _, leaf = key.rpartition(".")
            if leaf not in ("lora_a", "lora_b"):
                what = "DoRA magnitude" if leaf == "m" else "not a LoRA tensor"
                raise AdapteropsError(f"{what}: not supported", file=weights, tensor=key)
            parts.setdefault(module, {})[leaf] = f.read(key).clone()
    modules: dict[str, Factors] = {}
    for module, ab in sorted(parts.items(), key=lambda kv: _order(kv[0])):
        if set(ab) != {"lora_a", "lora_b"}:
            raise AdapteropsError(f"module {module} lacks {'lora_a' if 'lora_a' not in ab else 'lora_b'}", file=weights)
        a, b = ab["lora_a"], ab["lora_b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or (rank is not None and a.shape[1] != rank):
            raise AdapteropsError(f"lora_a {list(a.shape)} and lora_b {list(b.shape)} do not match rank {rank}",
                                  file=weights, tensor=f"{module}.lora_a")
        a, b = a.t().contiguous(), b.t().contiguous()
        check_factors(module, a, b, scale, weights, (f"{module}.lora_a", f"{module}.lora_b"))
        modules[module] = Factors(a, b, float(scale))
    info = {"rank": rank, "scale": float(scale), "num_layers": cfg.get("num_layers"), "keys": params.get("keys")}
    return FormatAdapter("mlx", weights, modules, info)


def _order(module: str) -> tuple[int, str]:
    block, leaf = split_module(module)
    return (-1 if block is None else block, leaf)
