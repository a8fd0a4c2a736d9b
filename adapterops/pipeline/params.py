"""Planning LoRA on parameters (PEFT's `target_parameters`: MoE experts, routers) against a checkpoint.

Each `ParamModule` of an adapter names an owner module and the parameters `target_parameters` selects on it; the
parameter it adapts is the one whose shape fits its factors (PEFT nests one wrapper per parameter, in the owner's
registration order, which a checkpoint does not record; shapes decide, and a tie is refused). The parameter is found
in the checkpoint under its model path (a fused `[E, d1, d2]` tensor, merged whole) or, through transformers'
reversed conversion (io/renames.py), as one tensor per expert, possibly in chunks (Mixtral's w1/w3 halves of
gate_up_proj): then each stored tensor gets a `ParamStep` for its expert and chunk, and streams on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter, ParamModule, lora_base_shape
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.renames import Piece, resolve


@dataclass(frozen=True)
class ParamStep:
    """Merge (part of) one parameter LoRA into a stored tensor: the whole parameter, one expert, or one chunk."""

    adapter: int
    module: ParamModule
    param: str  # the model parameter it adapts (model path)
    r: int
    scale: float
    num_experts: int  # 1 for a 2-D parameter
    swapped: bool  # ΔW laid out [E, out, in] (transformers' default) rather than [E, in, out]
    expert: int | None
    chunk: tuple[int, int, int] | None  # (index, count, dim) within one expert's ΔW


@dataclass(frozen=True)
class ParamTarget:
    """Where a parameter lives and its logical shape."""

    pieces: list[Piece]
    shape: tuple[int, ...]  # [E, d1, d2] or [d1, d2]
    rule: str | None  # the rename table used, None when stored under its model path


def locate(ckpt: Checkpoint, keys: set[str], param: str) -> ParamTarget | None:
    """Find a model parameter in the checkpoint, stored whole or per expert."""
    for name in (param, param.split(".", 1)[1] if "." in param else param):
        if name in keys:
            return ParamTarget([Piece(name, None, None)], tuple(lora_base_shape(ckpt, name)), None)
    found = resolve(keys, ckpt.config, param)
    if found is None:
        return None
    pieces, rule = found
    shape = list(lora_base_shape(ckpt, pieces[0].key))
    for p in pieces:
        if tuple(lora_base_shape(ckpt, p.key)) != tuple(shape):
            raise AdapteropsError(f"the stored pieces of {param} differ in shape", file=ckpt.root, tensor=p.key)
    if pieces[0].chunk is not None:
        shape[pieces[0].chunk[2]] *= pieces[0].chunk[1]
    experts = 1 + max(p.expert for p in pieces) if pieces[0].expert is not None else 0
    return ParamTarget(pieces, (experts, *shape) if experts else tuple(shape), rule)


def _fits(pm: ParamModule, ad: Adapter, shape: tuple[int, ...], r: int) -> list[bool]:
    """The layouts (swapped or not) in which the module's factors fit a parameter of this shape and rank."""
    a_shape, _ = ad.tensors.shape_dtype(pm.a_key)
    b_shape, _ = ad.tensors.shape_dtype(pm.b_key)
    experts = shape[0] if len(shape) == 3 else 1
    if a_shape[0] != r * experts:
        return []
    d1, d2 = shape[-2], shape[-1]
    out = []
    if (a_shape[1], b_shape[0]) == (d2, d1):
        out.append(True)  # [E, out, in]: PEFT swaps in/out for 3-D parameters of non-transposed experts
    if len(shape) == 3 and (a_shape[1], b_shape[0]) == (d1, d2):
        out.append(False)
    return out


def plan_params(ckpt: Checkpoint, keys: set[str], ad: Adapter, index: int, weight: float
                ) -> tuple[dict[str, list[ParamStep]], list[str], set[str]]:
    """Steps for every parameter LoRA of one adapter, by stored tensor; the rename rules used; and the names of the
    modules that are parameter LoRAs (a module that could be either and whose owner has no such parameter in the
    base is a plain LoRA, left to the caller)."""
    steps: dict[str, list[ParamStep]] = {}
    notes: list[str] = []
    taken: dict[str, str] = {}
    consumed: set[str] = set()
    for pm in ad.param_modules.values():
        if pm.name in ad.modules and not any(locate(ckpt, keys, p) for p in pm.candidates):
            continue
        consumed.add(pm.name)
        fits = []
        for param in pm.candidates:
            target = locate(ckpt, keys, param)
            if target is None or len(target.shape) not in (2, 3):
                continue
            r, _, scale = pm.rank_alpha(param, ad.config, target.shape[0] if len(target.shape) == 3 else 1)
            layouts = _fits(pm, ad, target.shape, r)
            if layouts:
                fits.append((param, target, r, scale, layouts[0]))
        if not fits:
            raise AdapteropsError(
                f"parameter LoRA {pm.name} fits none of {list(pm.candidates)} in the base checkpoint {ckpt.root}",
                file=ad.tensors.path, tensor=pm.a_key)
        if len(fits) > 1:
            raise AdapteropsError(f"parameter LoRA {pm.name} fits several parameters ({[f[0] for f in fits]}); "
                                  "which one PEFT wrapped cannot be told from the files", file=ad.tensors.path, tensor=pm.a_key)
        param, target, r, scale, swapped = fits[0]
        if param in taken:
            raise AdapteropsError(f"parameter LoRA {pm.name} and {taken[param]} both fit {param}", file=ad.tensors.path, tensor=pm.a_key)
        taken[param] = pm.name
        experts = target.shape[0] if len(target.shape) == 3 else 1
        for p in target.pieces:
            steps.setdefault(p.key, []).append(
                ParamStep(index, pm, param, r, scale * weight, experts, swapped, p.expert, p.chunk))
        if target.rule and target.rule not in notes:
            notes.append(target.rule)
    return steps, notes, consumed
