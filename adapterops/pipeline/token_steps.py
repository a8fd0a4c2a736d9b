"""Trainable tokens (io/trainable_tokens.py) in a merge: plan a `TokenStep` per trained embedding, and apply it.

PEFT's `TrainableTokensLayer.merge` is `W = W.index_copy(0, indices, delta.to(W))`: the trained rows replace the
base's rows, cast once to the base dtype. A tied `lm_head` shares the embedding's tensor, so its rows land there
too (the output stays tied, as PEFT's does).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from adapterops.core.names import OUTPUT_EMBEDDING
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter, lora_base_shape
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.trainable_tokens import TokenModule


@dataclass(frozen=True)
class TokenStep:
    """Write one adapter's trained rows into an embedding (or lm_head) tensor."""

    adapter: int
    module: TokenModule
    dtype: torch.dtype  # the model dtype PEFT casts the rows to (the output dtype)


def token_target(base_keys: set[str], module: str, tied: str | None) -> str | None:
    """The base tensor a module's trainable tokens go into: its weight, or the shared tensor for a tied lm_head."""
    for name in (f"{module}.weight", f"{module.split('.', 1)[1]}.weight" if "." in module else None):
        if name in base_keys:
            return name
    if tied and f"{module}.weight".endswith(OUTPUT_EMBEDDING) and module.split(".")[-1] == "lm_head":
        return tied
    return None


def plan_tokens(ckpt: Checkpoint, base_keys: set[str], ad: Adapter, i: int, tied: str | None,
                out_dtype: torch.dtype | None) -> dict[str, list[TokenStep]]:
    """A TokenStep per trained embedding of adapter `i`, keyed by the base tensor it changes (shapes checked)."""
    steps: dict[str, list[TokenStep]] = {}
    for mod in ad.token_modules.values():
        target = token_target(base_keys, mod.name, tied)
        if target is None:
            raise AdapteropsError(f"trainable tokens of module {mod.name}, which is not in the base checkpoint {ckpt.root}",
                                  file=ad.tensors.path, tensor=mod.key)
        base_shape = lora_base_shape(ckpt, target)
        shape, dtype = ad.tensors.shape_dtype(mod.key)
        if not dtype.is_floating_point:
            raise AdapteropsError(f"trainable tokens are {str(dtype).removeprefix('torch.')}, not floating point",
                                  file=ad.tensors.path, tensor=mod.key)
        if len(base_shape) != 2 or tuple(shape) != (len(mod.indices), base_shape[1]):
            raise AdapteropsError(f"trainable tokens have shape {list(shape)}; the config lists {len(mod.indices)} token ids "
                                  f"and base tensor '{target}' has shape {list(base_shape)}", file=ad.tensors.path, tensor=mod.key)
        if max(mod.indices) >= base_shape[0]:
            raise AdapteropsError(f"token id {max(mod.indices)} is beyond the {base_shape[0]} rows of base tensor '{target}'",
                                  file=ad.tensors.path, tensor=mod.key)
        base_dtype = ckpt.shape_dtype(target)[1]
        steps.setdefault(target, []).append(TokenStep(i, mod, out_dtype if out_dtype is not None else base_dtype))
    return steps


def apply_token_step(step: TokenStep, w: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """PEFT's merge: the rows, rounded to the model dtype, replace the base's rows (a new tensor, as index_copy)."""
    index = torch.tensor(step.module.indices, dtype=torch.long, device=w.device)
    return w.index_copy(0, index, rows.to(step.dtype).to(w.dtype))
