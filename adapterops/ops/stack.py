"""`stack`: combine adapters into one: weighted sum (cat, svd, linear), TIES, DARE, magnitude pruning.

Two compatibility modes (see `stack()`): `peft` reproduces PEFT 0.21.2's `add_weighted_adapter` byte for byte,
its known bugs included; `exact` applies the method to each module's true ΔWᵢ = sᵢ·BᵢAᵢ and factorises the result.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from adapterops.core import combine as cb
from adapterops.core.finite import all_finite
from adapterops.core.lora import delta_weight
from adapterops.core.lowrank import (
    ThinSVD,
    cat_factors,
    energy_rank,
    factors,
    pad_rank,
    svd_of_sum,
)
from adapterops.core.scaling import invalid_pattern
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import (
    CONFIG_NAME,
    Adapter,
    LoraModule,
    open_adapter,
    param_candidates,
    scale_cause,
)
from adapterops.io.adapter_writer import unit_scale_ranks, write_adapter
from adapterops.io.atomic import check_output
from adapterops.io.hub import resolve
from adapterops.pipeline.options import (
    check_count,
    check_number,
    check_seed,
    check_weights,
)
from adapterops.pipeline.params import (
    expert_slices,
    linear_lookalike_rows,
    pack_experts,
    param_layouts,
)
from adapterops.pipeline.stream import prefetched, progress
from adapterops.pipeline.threads import usable_cores
from adapterops.result import Result

Method = Literal["linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                 "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd"]


@dataclass
class StackResult(Result):
    """What a stack did."""

    output: str
    modules: int
    method: str
    compat: str
    ranks: dict[str, int]
    seconds: float
    energy: dict[str, float] | None = None  # exact mode with truncation: Σσ²_kept / ‖ΔW‖_F² per module
    min_energy: float | None = None
    warnings: list[str] = field(default_factory=list)
    experts: dict[str, int] | None = None  # LoRA on parameters (MoE): experts per module; `ranks` is per expert


def default_compat(method: str) -> str:
    """`cat` and `svd` were exact before --compat existed and stay so; PEFT's other names default to `peft`."""
    return "exact" if method in ("cat", "svd") else "peft"


# ---------------------------------------------------------------- PEFT's module order (the RNG stream of DARE)

_ORDER = ["embed_tokens", "wte", "wpe", "embed_in", "word_embeddings", "self_attn", "attn", "attention", "mlp",
          "feed_forward", "q_proj", "k_proj", "v_proj", "o_proj", "query", "key", "value", "dense", "c_attn", "c_fc",
          "c_proj", "gate_proj", "up_proj", "down_proj", "w1", "w3", "w2", "fc1", "fc2"]


def _order_key(name: str) -> tuple:
    parts = []
    for p in name.split("."):
        if p.isdigit():
            parts.append((0, int(p), ""))
        elif p in _ORDER:
            parts.append((1, _ORDER.index(p), ""))
        elif p == "lm_head":
            parts.append((3, 0, p))
        else:
            parts.append((2, 0, p))
    return tuple(parts)


def _model_order(ad: Adapter) -> list[str] | None:
    """The base model's named_modules order, from its local config.json on the meta device (needs transformers)."""
    base = ad.config.get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(base)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config)
        return [n for n, _ in model.named_modules()]
    except Exception:  # noqa: BLE001 - any failure falls back to the name-based order
        return None


def peft_module_order(names: list[str], opened: list[Adapter]) -> tuple[list[str], str | None]:
    """Modules in the order PEFT visits them (model.named_modules()), and a warning when it had to be inferred."""
    order = _model_order(opened[0])
    if order is not None and set(names) <= set(order):
        pos = {n: i for i, n in enumerate(order)}
        return sorted(names, key=pos.__getitem__), None
    return sorted(names, key=_order_key), ("DARE's random masks follow PEFT's module order, here inferred from the names "
                                            "(the base model's config.json was not found locally): for PEFT's exact "
                                            "masks the order must match model.named_modules()")


# ---------------------------------------------------------------- checks


def _check_options(method: str, compat: str, n: int, rank, energy, density, majority_sign, seed, split, precision,
                   base=None) -> None:
    if method not in cb.PEFT_METHODS:
        raise AdapteropsError(f"unknown method {method!r}; choose one of {', '.join(cb.PEFT_METHODS)}")
    if compat not in ("peft", "exact"):
        raise AdapteropsError(f"compat must be 'peft' or 'exact', not {compat!r}")
    if method in cb.DENSITY_METHODS:
        if density is None:
            raise AdapteropsError(f"method {method} needs a density (the share of entries kept, in [0, 1])")
        if not 0.0 <= density <= 1.0:
            raise AdapteropsError(f"density must be in [0, 1], not {density}")
    elif density is not None:
        raise AdapteropsError(f"density applies only to {', '.join(cb.DENSITY_METHODS)}")
    if majority_sign not in ("total", "frequency"):
        raise AdapteropsError(f"majority_sign must be 'total' or 'frequency', not {majority_sign!r}")
    if majority_sign != "total" and method not in cb.SIGN_METHODS:
        raise AdapteropsError(f"majority_sign applies only to {', '.join(cb.SIGN_METHODS)}")
    if seed is not None and method not in cb.RANDOM_METHODS:
        raise AdapteropsError(f"seed applies only to {', '.join(cb.RANDOM_METHODS)}")
    if method == "cat" and (rank is not None or energy is not None):
        raise AdapteropsError("cat keeps every factor exactly: rank and energy do not apply")
    if compat == "peft":
        if energy is not None:
            raise AdapteropsError("energy applies only with compat 'exact' (PEFT truncates at a fixed rank)")
        if rank is not None and method not in cb.SVD_METHODS:
            raise AdapteropsError(f"with compat 'peft', rank applies only to {', '.join(cb.SVD_METHODS)} (PEFT's svd_rank)")
        if split != "balanced" or precision != "float32":
            raise AdapteropsError("split and precision apply only with compat 'exact' (PEFT puts S into B, in float32)")
        if base is not None:
            raise AdapteropsError("base applies only with compat 'exact' (it settles LoRA on parameters, which PEFT cannot stack)")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise AdapteropsError(f"energy must be in (0, 1], not {energy}")


def peft_init_draws(generator: torch.Generator, shapes: list[tuple[str, tuple, tuple]], init_lora_weights) -> None:
    """Consume the RNG as add_weighted_adapter's inject_adapter does before combining, module by module.

    Linear/conv: nn.Linear/nn.Conv builds lora_A and lora_B (kaiming_uniform_ each), then reset_lora_parameters
    draws lora_A again (kaiming_uniform_ for True, normal_ for "gaussian"). Embedding: randn A, randn B, normal_ B.
    `shapes` holds (kind, A shape, B shape) of the new adapter's factors, in module order. The draws only advance
    the generator: the values are discarded, as PEFT overwrites them.
    """
    for kind, a_shape, b_shape in shapes:
        if kind == "embedding":
            torch.randn(a_shape, generator=generator)
            b = torch.randn(b_shape, generator=generator)
            if init_lora_weights is not False:
                b.normal_(generator=generator)
            continue
        a, b = torch.empty(a_shape), torch.empty(b_shape)
        a.uniform_(generator=generator)
        b.uniform_(generator=generator)
        if init_lora_weights is True:
            a.uniform_(generator=generator)
        elif isinstance(init_lora_weights, str) and init_lora_weights.lower() == "gaussian":
            a.normal_(generator=generator)
        elif init_lora_weights is not False:
            raise AdapteropsError(f"DARE with compat 'peft' cannot reproduce PEFT's random stream for "
                                  f"init_lora_weights={init_lora_weights!r} (it draws from the base weights)")


def _peft_rank(ad: Adapter) -> int:
    """PEFT: max(config.r, *rank_pattern.values())."""
    return max([int(ad.config.get("r", 8)), *map(int, (ad.config.get("rank_pattern") or {}).values())])


# ---------------------------------------------------------------- the op


def _check_finite(name: str, new: tuple[torch.Tensor, ...] | None, terms: list, dtype: torch.dtype = torch.float32) -> None:
    """Refuse factors that overflow (`new`, or with None each term's factors × its scale in `dtype`, before they are
    combined), naming the adapter whose scale × weight causes it."""
    if new is not None and all(all_finite(t) for t in new):
        return
    bad = max(terms, key=lambda t: abs(t[1].scale * t[2])) if new is not None else None
    for ad, mod, w in terms:
        s = mod.scale * w
        if not (all_finite(ad.read(mod.a_key).to(dtype) * s) and all_finite(ad.read(mod.b_key).to(dtype) * s)):
            bad = (ad, mod, w)
            break
    if bad is None:
        return
    ad, mod, w = bad
    raise AdapteropsError(f"{scale_cause(ad, mod, w)} makes the stacked factors of module {name} overflow "
                          f"{str(dtype).removeprefix('torch.')}", file=ad.path / CONFIG_NAME, tensor=mod.a_key)


def stack(
    adapters: list[str | os.PathLike], out: str | os.PathLike, *, weights: list[float] | None = None,
    method: Method = "cat", compat: Literal["peft", "exact"] | None = None, rank: int | None = None,
    energy: float | None = None, density: float | None = None, majority_sign: Literal["total", "frequency"] = "total",
    seed: int | None = None, split: Literal["balanced", "b"] = "balanced",
    precision: Literal["float32", "float64"] = "float32", force: bool = False, base: str | os.PathLike | None = None,
    quiet: bool = False,
) -> StackResult:
    """One adapter combining the given adapters by `method`, weight wᵢ each.

    compat="exact" (the default for cat and svd): the method on each module's true ΔWᵢ = sᵢ·BᵢAᵢ (one scale each,
    rank/alpha patterns and rsLoRA included). cat is exact (rank Σrᵢ); linear and svd form Σwᵢ·ΔWᵢ in low-rank
    form and truncate it; ties, dare_* and magnitude_prune* work on one dense ΔW at a time (element-wise rules
    need it) and factorise the result by a randomized truncated SVD. Truncation is at `rank` (default: the
    largest input rank) or at the fewest singular values keeping `energy` of ‖ΔW‖_F² (capped at `rank` if given);
    the energy kept is reported per module. The `_svd` suffix changes nothing here. The output has scale 1.

    compat="peft" (the default for PEFT's other names): the same tensors as PEFT 0.21.2's
    `add_weighted_adapter(adapters, weights, combination_type=method, svd_rank=rank, density=density,
    majority_sign_method=majority_sign)` after `torch.manual_seed(seed)`, its documented bugs included
    (per-factor combination with cross terms, inherited use_rslora, one adapter forced to linear).

    LoRA on parameters (PEFT's `target_parameters`: MoE experts as `[E, …]` parameters, routers): compat="exact"
    only (PEFT's add_weighted_adapter refuses them). Each expert is combined on its own, ΔW_e = s·B_e·A_e with
    A_e = lora_A rows e·r…e·r+r−1 and B_e = lora_B columns e, E+e, …, by the same rule as a module, and the
    experts are repacked into one `[r'·E, in]` / `[out, r'·E]` pair. PEFT's layout has one rank per module: with
    `energy`, experts that need fewer singular values than the module's largest get zero rows and columns, and the
    energy reported for the module is the smallest any of its experts keeps. The adapters must agree on a module's
    expert count, shapes and parameter, and target the same parameters of its owner (PEFT nests one wrapper per
    targeted parameter, so the set decides which key holds which parameter). The output keeps `target_parameters`
    (their union, in order), lists only plain modules in `target_modules`, and keys the parameters' ranks by
    parameter path, as PEFT looks them up. `base` (a checkpoint, headers only) settles which parameter a module
    adapts when the config cannot tell (as `rerank`). A 2-D parameter LoRA that could also be a Linear LoRA
    (rows = r, e.g. a router) is a parameter LoRA unless its target_modules select it. DARE draws its masks for
    the parameter modules after every plain module's, expert by expert (deterministic for a seed; PEFT has no
    counterpart).

    density: share of entries kept (ties, dare_*, magnitude_prune*). majority_sign: TIES' sign election
    (`total` = sign of the sum, `frequency` = the commoner sign). seed: DARE's masks (None: torch's global RNG).
    quiet: no progress bar (a bar over the modules is shown on stderr only when it is a terminal).

    Example::

        adapterops.stack(["./lora-a", "./lora-b"], "./ab", weights=[1, 0.5], method="ties", density=0.5)
    """
    start = time.perf_counter()
    if len(adapters) < 1:
        raise AdapteropsError("no adapter given")
    paths = [resolve(str(a)) for a in adapters]
    weights = check_weights(weights, paths)
    compat = compat or default_compat(method)
    check_count("rank", rank), check_seed(seed)
    check_number("energy", energy, lo=0, hi=1, lo_open=True), check_number("density", density, lo=0, hi=1)
    _check_options(method, compat, len(adapters), rank, energy, density, majority_sign, seed, split, precision, base)
    warnings: list[str] = []
    if compat == "peft" and len(adapters) == 1 and method != "linear":
        warnings.append(f"PEFT combines a single adapter with 'linear' whatever the method: {method} was replaced by linear")
        method, density, majority_sign, seed, rank = "linear", None, "total", None, None
    out = Path(out)
    base_path = resolve(str(base)) if base is not None else None
    check_output(out, paths + ([base_path] if base_path is not None else []), force)
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with ExitStack() as stack_:
        opened = [stack_.enter_context(open_adapter(p, command="stack", params=True)) for p in paths]
        if compat == "peft":
            _refuse_params(opened)
        params = [_param_terms(ad, base_path) for ad in opened]
        for ad in opened:
            if any(m.is_dora for m in ad.modules.values()):
                raise AdapteropsError("DoRA adapters cannot be stacked: ΔW depends on the base weight through the norm", file=ad.path)
            biased = any(m.bias_key is not None for m in ad.modules.values())
            if biased and (compat == "peft" or cb.base_method(method) not in ("linear", "cat")):
                why = ("PEFT does not combine lora_B biases (the new adapter keeps its initial bias)" if compat == "peft"
                       else f"a bias term has no {method} counterpart (only weighted sums carry it exactly)")
                raise AdapteropsError(f"adapters with lora_bias cannot be stacked with {method} ({compat}): {why}", file=ad.path)
        tensors: dict[str, torch.Tensor] = {}
        for ad in opened:  # modules_to_save copies and trained biases: carried over, never two for one tensor
            for name, key in ad.replacements.items():
                if key in tensors:
                    raise AdapteropsError(f"two adapters replace '{name}'", file=ad.path, tensor=key)
                tensors[key] = ad.read_finite(key)
        names = list(dict.fromkeys(m for ad in opened for m in ad.modules))
        pnames = list(dict.fromkeys(m for pt in params for m in pt))
        targets = list(dict.fromkeys(t for ad in opened for t in ad.config.get("target_parameters") or []))
        _check_params(opened, params, names, targets)
        if method in cb.RANDOM_METHODS:
            names, order_warning = peft_module_order(names, opened)
            if order_warning and compat == "peft":
                warnings.append(order_warning)
        ranks: dict[str, int] = {}
        energies: dict[str, float] = {}
        new_rank = _peft_new_rank(method, opened, rank) if compat == "peft" else None
        if generator is not None:
            # PEFT initialises the new adapter (random draws) before it combines: the masks start after those draws.
            # Exact mode draws the same, so that its DARE masks are PEFT's dare_*_svd masks for the same seed.
            draw_rank = new_rank or _peft_new_rank(method, opened, rank, strict=False)
            shapes = []
            for name in names:
                kind, a_shape, b_shape = _factor_shapes(name, opened)
                shapes.append((kind, (draw_rank, *a_shape[1:]), (b_shape[0], draw_rank, *b_shape[2:])))
            peft_init_draws(generator, shapes, opened[0].config.get("init_lora_weights", True))
        ahead = None
        if compat == "exact" and method in cb.RANDOM_METHODS and density < 1:
            # DARE's masks (a sequential random stream) are drawn for the next module in a background thread while
            # this one combines: the same draws in the same order, overlapped with the arithmetic
            ahead = stack_.enter_context(closing(prefetched(names, lambda n: _module_masks(n, opened, density, generator))))
        workers = usable_cores()
        bar = stack_.enter_context(progress(total=len(names) + len(pnames), unit="module", desc="stack", quiet=quiet))
        for name in _counted(names, bar):
            masks = next(ahead)[1] if ahead is not None else None
            terms = [(ad, ad.modules[name], w) for ad, w in zip(opened, weights) if name in ad.modules]
            kinds = {mod.kind for _, mod, _ in terms}
            if len(kinds) > 1:
                raise AdapteropsError(f"module {name} is {' and '.join(sorted(kinds))} in different adapters", file=terms[0][0].path)
            first_ad, first, _ = terms[0]
            a_shape, b_shape = first_ad.read(first.a_key).shape, first_ad.read(first.b_key).shape
            fac = [(ad.read_finite(mod.b_key).float(), ad.read_finite(mod.a_key).float(), w, mod) for ad, mod, w in terms]
            for (b, a, _, _), (ad, mod, _) in zip(fac, terms):
                if a.shape[1:] != a_shape[1:] or b.shape[0] != b_shape[0]:
                    raise AdapteropsError(f"module {name} has other shapes than in {first_ad.path}", file=ad.path, tensor=mod.a_key)
            _check_finite(name, None, terms, torch.float64 if precision == "float64" else torch.float32)
            if compat == "peft":
                new_a, new_b = _peft_module(method, fac, first, first_ad, new_rank, density, majority_sign, generator)
            else:
                new_a, new_b, kept = _exact_module(method, fac, rank, energy, density, majority_sign, generator, split,
                                                   torch.float64 if precision == "float64" else torch.float32,
                                                   masks=masks, workers=workers)
                if kept is not None:
                    energies[name] = round(kept, 6)
            _check_finite(name, (new_b, new_a), terms)
            tensors[first.a_key] = new_a.contiguous()
            tensors[first.b_key] = new_b.contiguous()
            biases = [(ad.read_finite(mod.bias_key).float(), w * mod.scale) for ad, mod, w in terms if mod.bias_key is not None]
            if biases:
                tensors[f"{first.b_key[: -len('.weight')]}.bias"] = sum(b * s for b, s in biases)
            ranks[name] = new_a.shape[0]
        pattern = dict(ranks)
        experts: dict[str, int] = {}
        for name in _counted(pnames, bar):  # after every plain module: their DARE masks do not depend on the parameter modules
            terms = [(ad, pt[name], w) for ad, pt, w in zip(opened, params, weights) if name in pt]
            shared = _shared_params(terms)
            new_a, new_b, kept = _exact_experts(name, terms, method, rank, energy, density, majority_sign, generator, split,
                                                torch.float64 if precision == "float64" else torch.float32)
            tensors[terms[0][1].mod.a_key], tensors[terms[0][1].mod.b_key] = new_a, new_b
            if kept is not None:
                energies[name] = round(kept, 6)
            experts[name] = terms[0][1].experts
            ranks[name] = new_a.shape[0] // experts[name]
            pattern.update({p: ranks[name] for p in shared})
        if compat == "peft":
            # PEFT: replace(config of the first adapter, r=new_rank, lora_alpha=new_rank, patterns cleared): every
            # other field (use_rslora included) is inherited
            cfg = dict(opened[0].config, r=new_rank, lora_alpha=new_rank, rank_pattern={}, alpha_pattern={},
                       target_modules=sorted(names))
            if cfg.get("use_rslora"):
                warnings.append(f"PEFT's result inherits use_rslora from the first adapter: it is applied with scale "
                                f"√{new_rank} = {new_rank ** 0.5:.4g} instead of 1 (peft#3761; use --compat exact)")
        else:
            rows = linear_lookalike_rows({n: (ranks[n], e) for n, e in experts.items()})
            cfg = dict(opened[0].config, **unit_scale_ranks(pattern, rows), target_modules=sorted(names),
                       lora_bias=any(t.endswith("lora_B.bias") for t in tensors))
            if targets:
                cfg["target_parameters"] = targets
        write_adapter(out, tensors, cfg, force=force)
    return StackResult(str(out), len(names) + len(pnames), method, compat, ranks, round(time.perf_counter() - start, 3),
                       energy=energies or None, min_energy=min(energies.values()) if energies else None, warnings=warnings,
                       experts=experts or None)


# ---------------------------------------------------------------- LoRA on parameters (MoE experts)


@dataclass(frozen=True)
class _ParamTerm:
    """One adapter's LoRA on a parameter: `experts` experts of rank `mod.r` under one scale (`mod` carries the keys,
    r, α and scale as a LoraModule, for `_exact_module` and the overflow checks), and the parameter path(s) PEFT
    looks its rank up by."""

    mod: LoraModule
    experts: int
    params: tuple[str, ...]
    owner: str
    candidates: tuple[str, ...]


def _counted(items: list[str], bar) -> Iterator[str]:
    """The items, the progress bar moving on as each one's work is done."""
    for item in items:
        yield item
        bar.update()


def _targets_module(cfg: dict, name: str) -> bool | None:
    """Whether the config's target_modules selects module `name` (PEFT: a string must match the whole name as a
    regex; a list entry equals the name or ends it after a dot). None when that cannot be told: PEFT's
    "all-linear" shorthand (it depends on the model's layers), or a regex whose matching time is unbounded."""
    tm = cfg.get("target_modules")
    if isinstance(tm, str):  # a regex the config chose: run only when invalid_pattern bounds its matching time
        if tm.lower() == "all-linear" or invalid_pattern(tm) is not None:
            return None
        return re.fullmatch(tm, name) is not None
    return any(name == t or name.endswith("." + t) for t in tm or [])


def _param_terms(ad: Adapter, base: Path | None) -> dict[str, _ParamTerm]:
    """The adapter's LoRAs on parameters by module name: those the config's ranks (rows = r·E) or the base settle
    (`param_layouts`), and without a base the 2-D ones that could also be a Linear LoRA (rows = r: E = 1, the same
    ΔW, its scale looked up by module name as the other commands do) when target_modules does not select the
    module, so PEFT wrapped its parameter. Those are taken out of `ad.modules`."""
    out: dict[str, _ParamTerm] = {}
    for name, lay in param_layouts(ad, base).items():
        pm = lay.module
        mod = LoraModule(name, "linear", pm.a_key, pm.b_key, lay.r, lay.alpha, lay.scale)
        out[name] = _ParamTerm(mod, lay.experts, lay.params, pm.owner, pm.candidates)
    if base is None:
        for name, pm in ad.param_modules.items():
            if name not in ad.modules:
                continue
            selected = _targets_module(ad.config, name)
            if selected is None:
                raise AdapteropsError(f"module {name} could be a Linear LoRA or a LoRA on its parameter "
                                      f"({', '.join(pm.candidates)}), and target_modules {ad.config['target_modules']!r:.60} "
                                      "cannot tell which: give the base (--base, headers only) to settle it",
                                      file=ad.path / CONFIG_NAME)
            if not selected:
                out[name] = _ParamTerm(ad.modules.pop(name), 1, pm.candidates, pm.owner, pm.candidates)
    return out


def _refuse_params(opened: list[Adapter]) -> None:
    """PEFT 0.21's add_weighted_adapter raises for any adapter whose config has target_parameters."""
    for ad in opened:
        if ad.config.get("target_parameters"):
            pm = next(iter(ad.param_modules.values()), None)
            what = f"module {pm.name} is a LoRA on a parameter" if pm is not None else "the adapter targets parameters"
            raise AdapteropsError(f"{what} (target_parameters, e.g. MoE experts), which PEFT's add_weighted_adapter refuses "
                                  "(\"add_weighted_adapter does not support targeting nn.Parameter\"): use --compat exact, which "
                                  "combines each expert's ΔW", file=ad.tensors.path, tensor=pm.a_key if pm else None)


def _check_params(opened: list[Adapter], params: list[dict[str, _ParamTerm]], names: list[str], targets: list[str]) -> None:
    """Refuse what the output could not hold: a module that is a Linear LoRA in one adapter and a LoRA on a parameter
    in another, and an owner whose targeted parameters differ between adapters (PEFT nests one wrapper per targeted
    parameter, in the owner's order: the set decides which key, `…experts` or `…experts.base_layer`, holds which)."""
    for ad, pt in zip(opened, params):
        for name, term in pt.items():
            if name in names:
                other = next(o for o in opened if name in o.modules)
                raise AdapteropsError(f"module {name} is a LoRA on a parameter ({', '.join(term.params)}) here but a Linear "
                                      f"LoRA in {other.path}: one adapter cannot hold both", file=ad.tensors.path, tensor=term.mod.a_key)
            union = param_candidates(term.owner, targets)
            extra = [c for c in union if c not in term.candidates]
            if extra:
                raise AdapteropsError(f"the adapters' target_parameters also select {', '.join(extra)}, which this adapter does "
                                      f"not target: PEFT nests one wrapper per targeted parameter of {term.owner}, so the keys "
                                      f"of module {name} would hold other parameters; stack adapters that target the same "
                                      "parameters", file=ad.path / CONFIG_NAME)


def _shared_params(terms: list[tuple[Adapter, _ParamTerm, float]]) -> tuple[str, ...]:
    """The parameter(s) every adapter's module may adapt (one where the config or the base settled it)."""
    common = [p for p in terms[0][1].params if all(p in t.params for _, t, _ in terms)]
    if not common:
        (ad0, t0, _), (ad, t, _) = terms[0], next(x for x in terms[1:] if set(x[1].params) != set(terms[0][1].params))
        raise AdapteropsError(f"module {t.mod.name} adapts {', '.join(t.params)} here but {', '.join(t0.params)} in {ad0.path}",
                              file=ad.tensors.path, tensor=t.mod.a_key)
    return tuple(common)


def _exact_experts(name, terms, method, rank, energy, density, majority, generator, split, dtype):
    """One LoRA on a parameter, expert by expert through `_exact_module`, repacked at one rank (the largest any expert
    got; the others padded with zeros). Returns (lora_A, lora_B, the smallest energy kept by an expert, or None)."""
    first_ad, first, _ = terms[0]
    experts = first.experts
    shape_a, _ = first_ad.tensors.shape_dtype(first.mod.a_key)
    shape_b, _ = first_ad.tensors.shape_dtype(first.mod.b_key)
    for ad, t, _ in terms:
        a_shape, _ = ad.tensors.shape_dtype(t.mod.a_key)
        b_shape, _ = ad.tensors.shape_dtype(t.mod.b_key)
        if t.experts != experts or a_shape[1] != shape_a[1] or b_shape[0] != shape_b[0]:
            raise AdapteropsError(f"module {name} has {t.experts} experts of {b_shape[0]}×{a_shape[1]} here but {experts} of "
                                  f"{shape_b[0]}×{shape_a[1]} in {first_ad.path}", file=ad.tensors.path, tensor=t.mod.a_key)
    plain = [(ad, t.mod, w) for ad, t, w in terms]
    _check_finite(name, None, plain, dtype)
    slices = [expert_slices(ad.read_finite(t.mod.a_key).float(), ad.read_finite(t.mod.b_key).float(), experts)
              for ad, t, _ in terms]
    pairs, kept = [], []
    for e in range(experts):
        fac = [(s[e][0], s[e][1], w, t.mod) for s, (_, t, w) in zip(slices, terms)]
        new_a, new_b, k = _exact_module(method, fac, rank, energy, density, majority, generator, split, dtype,
                                        workers=usable_cores())
        pairs.append((new_b, new_a))
        if k is not None:
            kept.append(k)
    width = max(a.shape[0] for _, a in pairs)
    new_b, new_a = pack_experts([pad_rank(b, a, width) for b, a in pairs])
    _check_finite(name, (new_b, new_a), plain)
    return new_a, new_b, (min(kept) if kept else None)


def _peft_new_rank(method: str, opened: list[Adapter], rank: int | None, strict: bool = True) -> int:
    ranks = [_peft_rank(ad) for ad in opened]
    if not strict:  # exact mode: the rank PEFT's svd forms would give (for the shared RNG stream only)
        return rank or max(ranks) if method != "cat" else sum(ranks)
    if method == "cat":
        return sum(ranks)
    if method in cb.SVD_METHODS:
        return rank or max(ranks)
    if len(set(ranks)) > 1:
        raise AdapteropsError(f"All adapters must have the same r value when using {method} (PEFT); they have {ranks}: "
                              "use cat, an _svd method or --compat exact")
    for ad in opened:
        if any(m.r != ranks[0] for m in ad.modules.values()):
            raise AdapteropsError(f"PEFT's {method} writes per-module ranks its config cannot describe (rank_pattern, "
                                  "peft#3737): use --compat exact", file=ad.path)
    return ranks[0]


def _peft_module(method, fac, first: LoraModule, first_ad: Adapter, new_rank, density, majority, generator):
    """One module as add_weighted_adapter builds it. Returns (lora_A, lora_B)."""
    if method == "cat":
        a = torch.cat([a * w * mod.scale for _, a, w, mod in fac], dim=0)
        b = torch.cat([b for b, _, _, _ in fac], dim=1)
        new_a = torch.zeros((new_rank, *a.shape[1:]))
        new_b = torch.zeros((b.shape[0], new_rank, *b.shape[2:]))
        new_a[: a.shape[0]] = a
        new_b[:, : b.shape[1]] = b
        return new_a, new_b
    if method in cb.FACTOR_METHODS:
        return cb.peft_factor_combine(method, [a for _, a, _, _ in fac], [b for b, _, _, _ in fac],
                                      [w for _, _, w, _ in fac], [mod.scale for _, _, _, mod in fac], density, majority, generator)
    kind = first.kind
    if kind == "conv" and fac[0][1].dim() != 4:
        raise AdapteropsError(f"PEFT's {method} fails on Conv1d/Conv3d layers (peft#3769); module {first.name}: use --compat exact")
    fif = kind == "linear" and first_ad.fan_in_fan_out
    deltas = []
    for b, a, _, mod in fac:
        base_shape = (b.shape[0], a.shape[1], *a.shape[2:]) if kind == "conv" else None
        deltas.append(delta_weight(kind, a, b, mod.scale, fan_in_fan_out=fif, base_shape=base_shape))
    delta = cb.peft_combine(cb.base_method(method), deltas, torch.tensor([w for _, _, w, _ in fac]), density, majority, generator)
    b_shape, a_shape = fac[0][0].shape, fac[0][1].shape
    if kind == "conv":
        delta = delta.squeeze() if tuple(a_shape[2:4]) == (1, 1) else delta.flatten(start_dim=1)
    if fif or kind == "embedding":
        delta = delta.T
    new_a, new_b = cb.peft_svd_factors(delta, new_rank)
    if kind == "conv":
        new_b = new_b.reshape(b_shape[0], new_rank, *b_shape[2:])
        new_a = new_a.reshape(new_rank, *a_shape[1:])
    return new_a, new_b


def _factor_shapes(name: str, opened: list[Adapter]) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """(kind, lora_A shape, lora_B shape) of a module in the first adapter that has it, from the file headers."""
    ad = next(a for a in opened if name in a.modules)
    mod = ad.modules[name]
    return mod.kind, tuple(ad.tensors.shape_dtype(mod.a_key)[0]), tuple(ad.tensors.shape_dtype(mod.b_key)[0])


def _module_masks(name: str, opened: list[Adapter], density: float, generator: torch.Generator | None) -> list[torch.Tensor]:
    """DARE's masks for one module: one per adapter that has it, over its ΔW in lora_B @ lora_A layout."""
    _, a_shape, b_shape = _factor_shapes(name, opened)
    count = sum(name in ad.modules for ad in opened)
    return cb.dare_masks((b_shape[0], math.prod(a_shape[1:])), count, density, generator)


def _exact_module(method, fac, rank, energy, density, majority, generator, split, dtype, masks=None, workers=1):
    """One module by the method on the true ΔWᵢ, factorised. Returns (lora_A, lora_B, energy kept or None)."""
    b_shape, a_shape = fac[0][0].shape, fac[0][1].shape
    default_rank = max(mod.r for _, _, _, mod in fac)
    if method == "cat":
        new_b, new_a = cat_factors([(b, a, w * mod.scale) for b, a, w, mod in fac])
        return new_a, new_b, None
    base = cb.base_method(method)
    if base == "linear":
        svd = svd_of_sum([(b, a, w * mod.scale) for b, a, w, mod in fac], dtype)
        total = float((svd.S.double() ** 2).sum())
        k = min(rank or default_rank, svd.S.numel()) if energy is None else min(energy_rank(svd.S, energy) or 1, rank or svd.S.numel())
    else:
        # element-wise rules need the dense ΔW (lora_B @ lora_A layout), one module at a time, formed block by block
        terms = [(b.reshape(b.shape[0], -1) * mod.scale, a.reshape(a.shape[0], -1)) for b, a, _, mod in fac]
        m, total = cb.exact_combine_factors(base, terms, [w for _, _, w, _ in fac], density, majority, generator,
                                            workers=workers, masks=masks)
        m = m.to(dtype)
        a_rows = [a for _, a in terms]
        if energy is None:
            k = min(rank or default_rank, *m.shape)
            svd = cb.sketch_svd(m, k, cb.sketch_start(a_rows, k), cb.sketch_steps(method))
        else:
            svd = cb.sketch_svd_for_energy(m, energy, a_rows, rank, total, cb.sketch_steps(method))
        k = svd.S.numel()
        del m
    kept = float((svd.S[:k].double() ** 2).sum()) / total if total else 1.0
    k = max(k, 1)
    fb, fa = factors(ThinSVD(svd.U, svd.S, svd.V), k, split)
    new_b = fb.float().reshape(b_shape[0], k, *b_shape[2:])
    new_a = fa.float().reshape(k, *a_shape[1:])
    return new_a, new_b, kept
