"""Planning LoRA on parameters (PEFT's `target_parameters`: MoE experts, routers) against a checkpoint.

Each `ParamModule` of an adapter names an owner module and the parameters `target_parameters` selects on it; the
parameter it adapts is the one whose shape fits its factors (PEFT nests one wrapper per parameter, in the owner's
registration order, which a checkpoint does not record; shapes decide, and a tie is refused). The parameter is found
in the checkpoint under its model path (a fused `[E, d1, d2]` tensor, merged whole) or, through transformers'
reversed conversion (io/renames.py), as one tensor per expert, possibly in chunks (Mixtral's w1/w3 halves of
gate_up_proj): then each stored tensor gets a `ParamStep` for its expert and chunk, and streams on its own.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

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


@dataclass(frozen=True)
class ParamLayout:
    """What the algebra commands need of one parameter LoRA: its E experts of rank r under one scale.

    Expert e's factors are A_e = lora_A rows e·r … e·r + r − 1 and B_e = lora_B columns e, E + e, 2E + e, …
    (PEFT's reshapes, core/experts.py); ΔW_e = scale·B_e·A_e, whichever way round the parameter stores it."""

    module: ParamModule
    params: tuple[str, ...]  # the parameter(s) it may adapt: one when the base settled it, else every candidate
    r: int
    alpha: float
    scale: float
    experts: int


def param_layouts(ad: Adapter, base: str | None = None) -> dict[str, ParamLayout]:
    """Rank, scale and expert count of each parameter LoRA of `ad`, from the config alone or from the base's headers.

    Without a base, the candidates' rank and alpha patterns (looked up by parameter path, as PEFT does) must agree,
    and lora_A's rows must be a multiple of that rank (rows = r·E); otherwise the base is needed and the reason
    says so. A module that could also be a plain Linear LoRA (rows = r: E = 1, the same maths) stays in
    `ad.modules` unless the base shows it is a parameter LoRA; then it is taken out of `ad.modules` here."""
    out: dict[str, ParamLayout] = {}
    if not ad.param_modules:
        return out
    if base is not None:
        from adapterops.io.checkpoint import open_checkpoint
        from adapterops.io.hub import resolve as resolve_path

        with open_checkpoint(resolve_path(str(base))) as ckpt:
            steps, _, consumed = plan_params(ckpt, set(ckpt.keys()), ad, 0, 1.0)
        for step in (s for lst in steps.values() for s in lst):
            pm = step.module
            if pm.name not in out:
                r, alpha, scale = pm.rank_alpha(step.param, ad.config, step.num_experts)
                out[pm.name] = ParamLayout(pm, (step.param,), r, alpha, scale, step.num_experts)
        for name in consumed:
            ad.modules.pop(name, None)
        return {n: out[n] for n in ad.param_modules if n in out}
    owners: dict[str, list[ParamModule]] = {}
    for pm in ad.param_modules.values():
        if pm.name not in ad.modules:
            owners.setdefault(pm.owner, []).append(pm)
    for mods in owners.values():
        # PEFT wraps each parameter once: the owner's modules take distinct candidates; each module's rows must be
        # r·E for its candidate's r, and the experts of one owner (gate_up_proj, down_proj) are as many
        candidates = mods[0].candidates
        fits = []
        for chosen in itertools.permutations(candidates, len(mods)):
            got = []
            for pm, p in zip(mods, chosen):
                r, alpha, scale = pm.rank_alpha(p, ad.config, 0)
                if r <= 0 or pm.rows % r:
                    break
                got.append((p, r, alpha, scale, pm.rows // r))
            if len(got) == len(mods) and len({g[4] for g in got}) == 1:
                fits.append(got)
        outcomes = {tuple(g[1:] for g in got) for got in fits}
        if len(outcomes) != 1:
            pm = mods[0]
            why = "fit none of" if not fits else "could adapt several of"
            raise AdapteropsError(f"parameter LoRA {pm.name} and the other wrappers of {pm.owner} {why} {list(candidates)} "
                                  "by the config's ranks (rows = r·experts); give the base (--base, headers only) to settle which",
                                  file=ad.tensors.path, tensor=pm.a_key)
        for i, pm in enumerate(mods):
            params = tuple(dict.fromkeys(got[i][0] for got in fits))
            _, r, alpha, scale, experts = fits[0][i]
            out[pm.name] = ParamLayout(pm, params, r, alpha, scale, experts)
    return {n: out[n] for n in ad.param_modules if n in out}


def linear_lookalike_rows(modules: dict[str, tuple[int, int]]) -> set[int]:
    """lora_A row counts r·E of parameter LoRAs (module name -> (rank per expert r, experts E)) that a config's
    default rank must not equal: the outermost wrapper is looked up by its module name, and rows = default r would
    read it as a plain Linear LoRA (E = 1). Nested `.base_layer` wrappers are not looked up that way."""
    return {r * e for name, (r, e) in modules.items() if e > 1 and ".base_layer" not in name}


def expert_slices(a: torch.Tensor, b: torch.Tensor, experts: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each expert's (B_e [out, r], A_e [r, in]) in the tensors' own dtype (PEFT's reshapes)."""
    a3 = a.reshape(experts, -1, a.shape[-1])
    b3 = b.reshape(b.shape[0], -1, experts)
    return [(b3[:, :, e], a3[e]) for e in range(experts)]


def pack_experts(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(lora_B [out, r·E], lora_A [r·E, in]) from each expert's (B_e [out, r], A_e [r, in]): the inverse of
    `expert_slices` (A's rows expert-major, B's columns rank-major)."""
    a = torch.stack([ae for _, ae in pairs], dim=0)  # [E, r, in]
    b = torch.stack([be for be, _ in pairs], dim=2)  # [out, r, E]
    return b.reshape(b.shape[0], -1).contiguous(), a.reshape(-1, a.shape[-1]).contiguous()
