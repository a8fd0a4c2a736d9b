"""Making an adapter servable: the machinery `convert` shares with future format targets.

`prepare` turns an opened PEFT adapter into an in-memory plain LoRA (`Converted`: per module float32 factors whose
product is the module's whole ΔW, scale baked in, one rank) that suits one engine release's rules:

- rsLoRA and rank/alpha patterns → scale baked into lora_B, α = r (exact);
- ranks → zero-padded (exact) or SVD-truncated (energy kept reported per module) to a rank the engine serves;
- DoRA → LoRA: the exact DoRA delta (m/‖W+ΔW‖)⊙(W+ΔW) − W of each module against the base, re-extracted by SVD,
  with each module's relative error;
- modules_to_save copies the engine refuses → a low-rank delta against the base when that is faithful (relative
  error ≤ max_error within the engine's rank), otherwise a refusal that says to merge;
- key names → the base's (multimodal prefixes), module types missing in some layers → zero factors (exact).

A target then writes it: `write_peft` writes a PEFT folder (the only format so far; GGUF, MLX and torchtune writers
plug in beside it, see `WRITERS`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterops.core.lora import delta_weight, merge_dora
from adapterops.core.lowrank import (
    ThinSVD,
    factors,
    svd_of_product,
    top_svd,
    top_svd_for_energy,
)
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import CONFIG_NAME, PREFIX, SAFETENSORS_NAME, Adapter
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.engines import EngineRules
from adapterops.io.jsonfile import write_json
from adapterops.io.nf4_checkpoint import is_nf4
from adapterops.io.safetensors_io import save_file
from adapterops.pipeline.serving import (
    LAYER_RE,
    accepted_copy,
    leaf,
    num_layers,
    replacements,
    strip_lm_prefix,
    tied_embedding,
)

# config keys that describe LoRA variants or per-module overrides: a converted adapter is plain LoRA
DROPPED_KEYS = ("rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "lora_bias", "modules_to_save",
                "layers_to_transform", "layers_pattern", "exclude_modules")


@dataclass
class ModuleOut:
    """One module of the converted adapter: factors with B·A = ΔW (scale 1), and how it was made."""

    name: str
    kind: str  # linear | embedding
    b: torch.Tensor  # (out, k) float32; embedding: (dim, k)
    a: torch.Tensor  # (k, in) float32; embedding: (k, vocab)
    how: str  # baked | truncated | dora→lora | modules_to_save→lora | zero-filled
    rank_in: int
    retained_fro: float = 1.0  # share of ‖ΔW‖_F kept (1.0 when exact)
    relative_error: float = 0.0  # ‖ΔW − B·A‖_F / ‖ΔW‖_F

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class Converted:
    """An adapter ready to be written: plain LoRA at one rank, whole tensors the engine accepts, what changed."""

    modules: dict[str, ModuleOut]
    copies: dict[str, torch.Tensor]  # base tensor name -> tensor (modules_to_save copies the engine takes as they are)
    config: dict[str, Any]
    rank: int
    changes: list[str] = field(default_factory=list)


def _svd_dense(m: torch.Tensor, *, rank: int | None, share: float | None, cap: int | None) -> ThinSVD:
    """The top singular triplets of a dense ΔW: a fixed rank, or the fewest reaching `share` of ‖m‖_F²."""
    if rank is not None:
        return top_svd(m, min(rank, *m.shape))
    return top_svd_for_energy(m, share if share is not None else 1.0, cap)


def _as_factors(kind: str, dense: torch.Tensor, fan_in_fan_out: bool) -> torch.Tensor:
    """The (out, in) matrix B·A must equal, from a ΔW in the base weight's layout."""
    return dense.T if kind == "embedding" or fan_in_fan_out else dense


def _refuse(what: str, rules: EngineRules, path: Path, why: str = "merge the adapter instead (adapterops merge)") -> None:
    raise AdapteropsError(f"cannot convert for {rules.label}: {what}; {why}", file=path)


def prepare(ad: Adapter, rules: EngineRules, base: Checkpoint | None, *, rank: int | None = None,
            energy: float | None = None, max_error: float = 0.01, max_lora_rank: int | None = None) -> Converted:
    """The adapter as plain LoRA that this engine release serves with PEFT's effect (see the module docstring)."""
    path, cfg = ad.tensors.path, ad.config
    limit = max_lora_rank if max_lora_rank is not None else rules.max_rank_default
    sev = {k: r.severity for k, r in rules.rules.items()}
    fif = ad.fan_in_fan_out
    if base is not None and is_nf4(base):
        raise AdapteropsError("is an NF4 checkpoint: dequantize it first (adapterops dequantize)", file=base.root)
    base_keys = set(base.keys()) if base is not None else set()
    tied = tied_embedding(base) if base is not None else None
    changes: list[str] = []

    def base_name(module: str) -> str:
        """The base's name for an adapter module (multimodal prefixes dropped when the base has none)."""
        if base is not None and f"{module}.weight" not in base_keys and f"{strip_lm_prefix(module)}.weight" in base_keys:
            return strip_lm_prefix(module)
        return module

    def serves(module: str, kind: str) -> bool:
        """Whether the engine applies a LoRA on this module."""
        if kind == "conv":
            return False
        if kind == "embedding" or leaf(module) == "embed_tokens":
            return sev["embedding_lora"] == "fine"
        if leaf(module) == "lm_head":
            return sev["lm_head_lora"] == "fine" and not (tied and sev["tied_lm_head"] != "fine")
        return rules.supported_modules is None or leaf(module) in rules.supported_modules

    def base_weight(name: str) -> torch.Tensor:
        if base is None:
            raise AdapteropsError(f"needs --base to convert {name} (DoRA and modules_to_save are relative to the base)", file=path)
        key = name if name in base_keys else (tied if name == "lm_head.weight" and tied else None)
        if key is None:
            raise AdapteropsError(f"{name} is not in the base checkpoint", file=base.root)
        return base.read(key).float()

    # 1. what cannot be a LoRA for this engine
    for name, mod in ad.modules.items():
        if not serves(name, mod.kind):
            what = "convolution LoRA" if mod.kind == "conv" else f"LoRA on {leaf(name)}"
            _refuse(f"the engine does not apply {what} ({name})", rules, path)
        if mod.bias_key is not None:
            if bool(ad.read_finite(mod.bias_key).any()):
                _refuse(f"module {name} has a non-zero lora_B.bias (a bias change is not a LoRA)", rules, path)
            changes.append(f"dropped the all-zero lora_B.bias of {name} (exact)")
    copies: dict[str, torch.Tensor] = {}
    dense_copies: dict[str, tuple[str, torch.Tensor]] = {}  # module -> (kind, ΔW in factor layout)
    for rep in replacements(ad):
        t = ad.read_finite(rep.key)
        if rep.kind == "saved_embedding":
            if base is not None and rep.name in base_keys and not torch.equal(t.float(), base.read(rep.name).float()):
                _refuse(f"the adapter's saved {rep.name} differs from the base's (a resized vocabulary)", rules, path)
            continue
        module = rep.name.rsplit(".", 1)[0]
        if rep.kind == "modules_to_save" and accepted_copy(rules, module):
            copies[base_name(module) + "." + rep.name.rsplit(".", 1)[1]] = t
            continue
        if base is None:
            _refuse(f"{rep.name} is a {rep.kind} copy the engine does not take", rules, path,
                    "give --base to turn it into a low-rank delta, or merge the adapter instead")
        w = base_weight(base_name(module) + "." + rep.name.rsplit(".", 1)[1])
        delta = t.float() - w
        if not bool(delta.any()):
            changes.append(f"dropped {rep.name}: equal to the base's (exact)")
            continue
        kind = "embedding" if leaf(module) == "embed_tokens" else "linear"
        if rep.kind == "bias" or delta.dim() != 2 or not serves(module, kind):
            _refuse(f"{rep.name} ({rep.kind}) changes the base and the engine cannot apply it as a LoRA", rules, path)
        dense_copies[base_name(module)] = (kind, _as_factors(kind, delta, False))

    # 2. every module as exact factors or a dense ΔW, then the rank each gets
    exact: dict[str, tuple[str, torch.Tensor, torch.Tensor, int]] = {}  # name -> (kind, B·s, A, r)
    dense: dict[str, tuple[str, torch.Tensor, str, int]] = {}  # name -> (kind, ΔW (out, in), how, r_in)
    for name, mod in ad.modules.items():
        a, b = ad.read_finite(mod.a_key).float(), ad.read_finite(mod.b_key).float()
        if mod.is_dora:
            w = base_weight(f"{base_name(name)}.weight")
            d = delta_weight(mod.kind, a, b, mod.scale, fan_in_fan_out=fif, base_shape=tuple(w.shape))
            merged, _ = merge_dora(w.clone(), d, ad.read_finite(mod.magnitude_key).float(), mod.kind, fan_in_fan_out=fif)
            dense[base_name(name)] = (mod.kind, _as_factors(mod.kind, merged - w, fif), "dora→lora", mod.r)
        else:
            exact[base_name(name)] = (mod.kind, b * mod.scale, a, mod.r)
    for name, (kind, d) in dense_copies.items():
        dense[name] = (kind, d, "modules_to_save→lora", 0)

    out: dict[str, ModuleOut] = {}
    share = energy
    for name, (kind, bs, a, r) in exact.items():
        want = rank if rank is not None else r
        if limit is not None and want > limit:
            want = limit
        if energy is None and want >= r:
            out[name] = ModuleOut(name, kind, bs, a.reshape(r, -1), "baked", r)
            continue
        svd = svd_of_product(bs, a, 1.0)
        k = want if energy is None else max(1, min(_energy_rank(svd.S, energy), limit or r))
        k = min(k, svd.S.numel())
        nb, na = factors(svd, k)
        s2 = svd.S.double() ** 2
        total = float(s2.sum()) or 1.0
        out[name] = ModuleOut(name, kind, nb, na, "truncated" if k < r else "baked", r,
                              math.sqrt(min(1.0, float(s2[:k].sum()) / total)), math.sqrt(float(s2[k:].sum()) / total))
    for name, (kind, d, how, r) in dense.items():
        total = float(d.double().pow(2).sum())
        if how == "modules_to_save→lora":
            svd = _svd_dense(d, rank=None, share=1.0 - max_error**2, cap=limit)
        else:
            svd = _svd_dense(d, rank=None if energy is not None else min(rank or r, limit or 10**9),
                             share=share, cap=limit)
        nb, na = factors(svd, svd.S.numel())
        # measured, not 1 − kept: the difference of two nearly equal sums would lose the small errors
        err = float((d.double() - nb.double() @ na.double()).norm()) / math.sqrt(total) if total else 0.0
        retained = math.sqrt(max(0.0, 1.0 - err**2))
        if how == "modules_to_save→lora" and err > max_error:
            _refuse(f"the modules_to_save copy of {name} is not low-rank: rank {svd.S.numel()} keeps a relative error of "
                    f"{err:.3g} (> --max-error {max_error:g})", rules, path)
        out[name] = ModuleOut(name, kind, nb, na, how, r, retained, err)

    # 3. one rank for every module, zero-padded (exact), one the engine keeps as it is
    top = max([m.rank for m in out.values()] + [rank or 1])
    target = rules.padded_rank(top)
    if limit is not None and target > limit:
        _refuse(f"rank {target} is above the engine's maximum {limit}", rules, path, "give a lower --rank or --energy")
    padded = [m for m in out.values() if m.rank < target]
    if padded:
        changes.append(f"{len(padded)} modules zero-padded to rank {target} (exact)")
    for m in out.values():
        if m.rank < target:
            m.b = torch.cat([m.b, m.b.new_zeros(m.b.shape[0], target - m.rank)], dim=1)
            m.a = torch.cat([m.a, m.a.new_zeros(target - m.rank, m.a.shape[1])], dim=0)

    # 4. module types the engine drops when a layer lacks them: zero factors there (exact)
    if sev.get("partial_layers", "fine") != "fine":
        n = num_layers(base)
        if n is None:
            idx = [int(g.group(3)) for g in (LAYER_RE.search(k) for k in out) if g]
            n = max(idx) + 1 if idx else 0
        for name in list(out):
            g = LAYER_RE.search(name)
            if not g:
                continue
            for i in range(n):
                other = name[: g.start(3)] + str(i) + name[g.end(3):]
                if other not in out:
                    src = out[name]
                    out[other] = ModuleOut(other, src.kind, torch.zeros_like(src.b), torch.zeros_like(src.a), "zero-filled", 0)
                    changes.append(f"added zero LoRA factors for {other} ({rules.label} drops a module type missing in a layer)")
    out = dict(sorted(out.items()))

    for how, what in (("truncated", "truncated by SVD"), ("dora→lora", "DoRA → LoRA"),
                      ("modules_to_save→lora", "modules_to_save copy → low-rank delta")):
        n = sum(m.how == how for m in out.values())
        if n:
            changes.append(f"{n} modules {what}")
    if ad.use_rslora or any(x.r != cfg.get("r", 8) or x.alpha != cfg.get("lora_alpha", 8) for x in ad.modules.values()) or any(
            x.scale != 1.0 for x in ad.modules.values()):
        changes.append("scales baked into lora_B (α = r, standard scaling, no patterns)")
    renamed = [m for m in ad.modules if base_name(m) != m]
    if renamed:
        changes.append(f"{len(renamed)} module names renamed to the base's (e.g. {renamed[0]} → {base_name(renamed[0])})")
    if target != top:
        changes.append(f"rank {target}, not {top}: {rules.label} would pad {top} itself and then rescale")
    if rules.max_rank_option and (rules.max_rank_default is None or target > rules.max_rank_default):
        flag = min((a for a in rules.max_rank_allowed or (target,) if a >= target), default=target)
        changes.append(f"serve it with {rules.max_rank_option} {flag} or more (its rank is {target})")
    config = {k: v for k, v in cfg.items() if k not in DROPPED_KEYS}
    leaves = sorted({leaf(m) for m in out})
    config.update(peft_type="LORA", r=target, lora_alpha=target, use_rslora=False, use_dora=False, bias="none",
                  lora_bias=False, modules_to_save=None, rank_pattern={}, alpha_pattern={}, target_modules=leaves,
                  fan_in_fan_out=fif)
    return Converted(out, copies, config, target, changes)


def _energy_rank(s: torch.Tensor, share: float) -> int:
    energy = (s.double() ** 2).cumsum(0)
    total = float(energy[-1]) if energy.numel() else 0.0
    return 1 if total == 0.0 else int(torch.searchsorted(energy, torch.tensor(share * total, dtype=torch.float64))) + 1


def peft_tensors(conv: Converted) -> dict[str, torch.Tensor]:
    """The converted adapter as PEFT's state dict (float32 factors, PEFT's key names)."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in conv.modules.items():
        if m.kind == "embedding":
            tensors[f"{PREFIX}{name}.lora_embedding_A"] = m.a.contiguous()
            tensors[f"{PREFIX}{name}.lora_embedding_B"] = m.b.contiguous()
        else:
            tensors[f"{PREFIX}{name}.lora_A.weight"] = m.a.contiguous()
            tensors[f"{PREFIX}{name}.lora_B.weight"] = m.b.contiguous()
    for name, t in conv.copies.items():
        tensors[f"{PREFIX}{name}"] = t.contiguous()
    if conv.copies:
        conv.config["modules_to_save"] = sorted({re.sub(r"\.(weight|bias)$", "", n).rsplit(".", 1)[-1] for n in conv.copies})
    return tensors


def write_peft(conv: Converted, folder: Path) -> None:
    """Write a PEFT adapter folder (adapter_model.safetensors + adapter_config.json) into `folder`."""
    save_file(peft_tensors(conv), folder / SAFETENSORS_NAME, {"format": "pt"})
    write_json(folder / CONFIG_NAME, conv.config, sort_keys=True)


# output formats by --to name; each writes a Converted into a folder (other formats are added here)
WRITERS: dict[str, Callable[[Converted, Path], None]] = {"peft": write_peft}
