"""`analyze`: how much rank an adapter really uses, module by module, from the factors alone (never a dense ΔW).

`analyze` returns an `AnalyzeReport` whose `to_dict()` follows the versioned JSON schema in
`adapterops/schemas/analyze-1.schema.json`. It holds no timings and rounds floats to 6 significant digits, so
two runs on the same adapter give the same JSON and CI can diff it. `analyze_output.py` draws the table and plot.
"""

from __future__ import annotations

import math
import os
import re
import statistics
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch

from adapterops.core import spectra
from adapterops.core.combine import sign_conflict
from adapterops.core.finite import all_finite
from adapterops.core.lowrank import NotFinite, ThinSVD, energy_rank, svd_of_product
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import Adapter, LoraModule, open_adapter, overflow_error, untrained_warning
from adapterops.io.checkpoint import Checkpoint, conv1d_layout, open_checkpoint
from adapterops.io.hub import resolve
from adapterops.io.nf4_checkpoint import dequantized_view, is_nf4
from adapterops.pipeline.options import check_count, check_number, pick_device
from adapterops.pipeline.params import ParamLayout, expert_slices, param_layouts
from adapterops.pipeline.plan import LoraStep, plan_merge
from adapterops.pipeline.stream import prefetched
from adapterops.result import Result

SCHEMA = "adapterops.analyze/1"
NEGLIGIBLE = 1e-3  # a module whose ‖ΔW‖_F is below this share of the median module's is flagged


def sig6(x: float | None) -> float | None:
    """A float rounded to 6 significant digits (stable JSON across runs and BLAS builds); None and inf pass."""
    return x if x is None or x != x or x in (float("inf"), float("-inf")) else float(f"{x:.6g}")


@dataclass
class ModuleReport:
    """Every measure of one adapted module."""

    name: str
    type: str  # the module's own name: q_proj, down_proj, c_attn, …
    layer: int | None
    kind: str  # linear, embedding or conv
    dora: bool
    rank: int
    alpha: float
    scale: float
    bytes: int  # bytes of its lora_A and lora_B
    fro: float | None = None  # ‖ΔW‖_F of ΔW = s·B·A (None when the factors are not finite)
    singular_values: list[float] = field(default_factory=list)
    stable_rank: float | None = None
    effective_rank: float | None = None
    r90: int | None = None
    r99: int | None = None
    relative_update: float | None = None  # ‖ΔW‖_F / ‖W‖_F (with a base)
    amplification: float | None = None  # ‖ΔW‖_F / ‖Uᵀ W V‖_F (with a base)
    similarity: dict[str, list] | None = None  # {"i": [...], "j": [...], "phi": [[...]]} (with --compare)
    sign_conflict: float | None = None  # with --compare: share of ΔW entries of opposite sign, among entries both set
    intruders: int | None = None  # with intruders: how many of the top-k singular vectors of W + ΔW are intruders
    intruder_cosines: list[float] | None = None  # each top-k vector's highest |cos| with the base's singular vectors
    quantization_error: float | None = None  # QLoRA: ‖W₁₆ − deq(W₄)‖_F / ‖ΔW‖_F (16-bit base and its NF4 copy)
    requantization_error: float | None = None  # QLoRA: ‖Q(deq(W₄)+ΔW) − (deq(W₄)+ΔW)‖_F / ‖ΔW‖_F (merge --requantize)
    parameter: str | None = None  # kind "expert": the parameter LoRA (target_parameters) this expert belongs to
    expert: int | None = None  # kind "expert": its index e (ΔW_e = s·B_e·A_e)


@dataclass
class AnalyzeReport(Result):
    """The whole analysis: modules, summaries by module type and by layer, advice and warnings."""

    adapter: str
    base: str | None
    compare: str | None
    use_rslora: bool
    modules: list[ModuleReport]
    by_type: dict[str, dict[str, float | int | None]]
    by_layer: dict[str, dict[str, float | int | None]]
    suggested_rank: int
    bytes: int
    bytes_at_energy_99: int
    warnings: list[str]
    notes: list[str] = field(default_factory=list)
    quantized_base: str | None = None
    qlora: dict[str, object] | None = None  # totals over modules and the advice on which base to merge onto
    intruder_k: int | None = None  # with intruders: the k and ε used (Shuttleworth et al. 2024)
    intruder_epsilon: float | None = None
    schema: str = SCHEMA



def module_type(name: str) -> str:
    """The last component of a module name (q_proj, c_attn, …)."""
    return name.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    """The first numeric component of a module name (the transformer block), or None."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def _factors(ad: Adapter, mod: LoraModule) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, A) in float32, or None when either holds NaN or Inf."""
    b, a = ad.read(mod.b_key), ad.read(mod.a_key)
    if not (all_finite(a) and all_finite(b)):
        return None
    return b.float(), a.float()


def _measure(rep: ModuleReport, svd: ThinSVD) -> None:
    """Fill the spectrum measures of one module."""
    s = svd.S
    rep.fro = sig6(spectra.frobenius(s))
    rep.singular_values = [sig6(float(x)) for x in s]
    rep.stable_rank = sig6(spectra.stable_rank(s))
    rep.effective_rank = sig6(spectra.entropy_rank(s))
    rep.r90, rep.r99 = energy_rank(s, 0.90), energy_rank(s, 0.99)


def _base_layouts(base: str, ad: Adapter, revision: str | None) -> tuple[Checkpoint, dict[str, tuple[str, str]]]:
    """Open the base and map each module to (base tensor, how to view it as ΔW's (out, in) layout)."""
    ckpt = open_checkpoint(resolve(base, revision))
    if is_nf4(ckpt):
        ckpt = dequantized_view(ckpt, torch.float32, torch.device("cpu"))
    layout: dict[str, tuple[str, str]] = {}
    try:
        plan = plan_merge(ckpt, [ad])
    except AdapteropsError:
        ckpt.close()
        raise
    for tp in plan.tensors:
        for st in tp.steps:
            if isinstance(st, LoraStep):
                view = "T" if (st.fan_in_fan_out or st.module.kind == "embedding") else ("flat" if st.module.kind == "conv" else "")
                layout[st.module.name] = (tp.source or tp.name, view)
    return ckpt, layout


def _with_base(reports: dict[str, ModuleReport], svds: dict[str, ThinSVD], base: str, ad: Adapter, revision: str | None,
               intruders: tuple[int, float, torch.device] | None = None) -> None:
    """Relative update and amplification of each module against its base weight (read one at a time); with
    `intruders` (k, ε, device), the intruder dimensions of W + ΔW: one SVD of the base and one of W + ΔW per module."""
    ckpt, layout = _base_layouts(base, ad, revision)
    with ckpt:
        names = [n for n in layout if n in svds]
        for name, w in prefetched(names, lambda n: ckpt.read(layout[n][0])):
            view = layout[name][1]
            w = w.float()
            w = w.T if view == "T" else (w.reshape(w.shape[0], -1) if view == "flat" else w)
            rep, svd = reports[name], svds[name]
            norm = float(torch.linalg.norm(w))
            rep.relative_update = sig6(rep.fro / norm) if norm > 0 else None
            amp = spectra.amplification(w, svd.U, svd.V, rep.fro) if rep.fro else None
            rep.amplification = sig6(amp) if amp is not None and amp != float("inf") else None  # JSON has no inf
            if intruders is not None:
                k, eps, dev = intruders
                wd = w.to(dev)
                base_u = torch.linalg.svd(wd, full_matrices=False).U
                tuned = wd + svd.dense().to(dev, wd.dtype)
                cos = spectra.intruder_cosines(base_u, tuned, k)
                rep.intruder_cosines = [sig6(c) for c in cos]
                rep.intruders = sum(c < eps for c in cos)
                del wd, base_u, tuned


def _is_nf4(path: str, revision: str | None) -> bool:
    """Whether a checkpoint holds bitsandbytes NF4 weights (headers only)."""
    with open_checkpoint(resolve(path, revision)) as ckpt:
        return is_nf4(ckpt)


def _qlora(reports: dict[str, ModuleReport], svds: dict[str, ThinSVD], base: str, quantized: str | None, ad: Adapter,
           revision: str | None) -> dict[str, object]:
    """Per module, against the NF4 base a QLoRA adapter was trained on: how far the 16-bit original is from it
    (‖W₁₆ − deq(W₄)‖, when both are given) and what `merge --requantize` would lose (W₄ dequantized plus ΔW,
    quantized again with W₄'s blocksize and double quantization), each relative to ‖ΔW‖; then the advice."""
    from adapterops.core import nf4

    q_path = quantized if quantized is not None else base
    qckpt, layout = _base_layouts(q_path, ad, revision if quantized is None else None)
    with ExitStack() as stack:
        stack.enter_context(qckpt)
        if not any(getattr(src, "states", None) for src in qckpt.shards.values()):
            raise AdapteropsError("is not an NF4 checkpoint (--quantized-base needs bitsandbytes 4-bit weights)", file=q_path)
        w16 = stack.enter_context(open_checkpoint(resolve(base, revision))) if quantized is not None else None
        if w16 is not None and is_nf4(w16):
            raise AdapteropsError("is an NF4 checkpoint: with --quantized-base, --base is the 16-bit original", file=base)
        conv1d = bool(conv1d_layout(qckpt))
        sq = {"quantization": 0.0, "requantization": 0.0, "delta": 0.0}
        measured = 0
        for name in [n for n in layout if n in svds]:
            tname, view = layout[name]
            state = qckpt.source(tname).states.get(tname) if hasattr(qckpt.source(tname), "states") else None
            rep = reports[name]
            if state is None or not rep.fro:  # not a quantized weight (embeddings, norms...), or ΔW = 0
                continue
            wq = qckpt.read(tname).float()
            delta = svds[name].dense().float()
            delta = delta.T if view == "T" else delta.reshape(wq.shape)
            merged = wq + delta
            packed, st = nf4.quantize(merged.T.contiguous() if conv1d else merged, state.blocksize, state.double_quant)
            back = nf4.dequantize(packed, st).float()
            back = back.T if conv1d else back
            rq = float(torch.linalg.norm(back - merged))
            rep.requantization_error = sig6(rq / rep.fro)
            sq["requantization"] += rq * rq
            sq["delta"] += rep.fro * rep.fro
            if w16 is not None:
                qe = float(torch.linalg.norm(w16.read(tname).float() - wq))
                rep.quantization_error = sig6(qe / rep.fro)
                sq["quantization"] += qe * qe
            measured += 1
            del wq, delta, merged, back
    d = math.sqrt(sq["delta"]) or 1.0
    q = math.sqrt(sq["quantization"]) / d if w16 is not None else None
    r = math.sqrt(sq["requantization"]) / d
    advice = []
    if q is not None:
        if q > 0.1:
            advice.append(f"merge onto the dequantized NF4 base (`adapterops merge {q_path} ADAPTER OUT`): the adapter "
                          f"was trained against it, and the 16-bit original differs from it by {q:.3g}× ‖ΔW‖, which would "
                          "move the merged model away from the one you trained")
        else:
            advice.append(f"either base works: the 16-bit original differs from the NF4 one by only {q:.3g}× ‖ΔW‖; "
                          "merging onto the original keeps its precision")
    advice.append(f"merge --requantize would add an error of {r:.3g}× ‖ΔW‖ (the update rounded to 4 bits again)"
                  + ("; keep a 16-bit output unless memory forces 4 bits" if r > 0.5 else ""))
    return {"modules_measured": measured, "quantization_error": None if q is None else sig6(q),
            "requantization_error": sig6(r), "advice": advice}


def _with_compare(reports: dict[str, ModuleReport], svds: dict[str, ThinSVD], other: Adapter, ad: Adapter | None = None) -> list[str]:
    """φ(i, j) grids and the sign-conflict share against the same modules of another adapter; warnings for modules
    only one side has. The sign conflict needs both dense ΔW: one module at a time."""
    shared = [n for n in svds if n in other.modules]
    for name in shared:
        mod = other.modules[name]
        f = _factors(other, mod)
        if f is None:
            continue
        try:
            u2 = svd_of_product(f[0], f[1], mod.scale).U
        except NotFinite as exc:
            raise overflow_error(other, name, exc, mod) from None
        u1 = svds[name].U
        i, j = spectra.grid_sizes(u1.shape[1]), spectra.grid_sizes(u2.shape[1])
        phi = spectra.similarity_grid(u1, u2, i, j)
        reports[name].similarity = {"i": i, "j": j, "phi": [[sig6(x) for x in row] for row in phi]}
        mine = _factors(ad, ad.modules[name]) if ad is not None else None
        if mine is not None:
            d1 = (mine[0].reshape(mine[0].shape[0], -1) @ mine[1].reshape(mine[1].shape[0], -1)).mul_(ad.modules[name].scale)
            d2 = (f[0].reshape(f[0].shape[0], -1) @ f[1].reshape(f[1].shape[0], -1)).mul_(mod.scale)
            reports[name].sign_conflict = sig6(sign_conflict(d1, d2)[0])
            del d1, d2
    missing = len(svds) - len(shared)
    return [f"{missing} modules are not in the compared adapter {other.path}"] if missing else []


def _mean(values: list[float | None]) -> float | None:
    """The mean of the known values (None when there are none)."""
    known = [v for v in values if v is not None and v == v and v != float("inf")]
    return sig6(statistics.fmean(known)) if known else None


def _max(values: list[int | None]) -> int | None:
    """The largest known value."""
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _summary(mods: list[ModuleReport]) -> dict[str, float | int | None]:
    """Means (and maxima of the energy ranks) over a group of modules."""
    return {
        "modules": len(mods), "rank": _max([m.rank for m in mods]), "fro_mean": _mean([m.fro for m in mods]),
        "stable_rank_mean": _mean([m.stable_rank for m in mods]), "effective_rank_mean": _mean([m.effective_rank for m in mods]),
        "r90_max": _max([m.r90 for m in mods]), "r99_max": _max([m.r99 for m in mods]),
        "relative_update_mean": _mean([m.relative_update for m in mods]), "amplification_mean": _mean([m.amplification for m in mods]),
        "intruders": None if all(m.intruders is None for m in mods) else sum(m.intruders or 0 for m in mods),
        "quantization_error_mean": _mean([m.quantization_error for m in mods]),
        "requantization_error_mean": _mean([m.requantization_error for m in mods]),
    }


def _health(ad: Adapter, reports: list[ModuleReport], zero_b: list[str], nonfinite: list[str]) -> list[str]:
    """Warnings a person should read before shipping the adapter."""
    out = [f"{n}: lora_A or lora_B holds NaN or Inf" for n in nonfinite]
    if zero_b:
        out.append(untrained_warning(zero_b))
    norms = [m.fro for m in reports if m.fro]
    if norms:
        median = statistics.median(norms)
        small = [m.name for m in reports if m.fro is not None and 0 < m.fro < NEGLIGIBLE * median]
        if small:
            out.append(f"{len(small)} modules have a negligible ΔW (‖ΔW‖_F < {NEGLIGIBLE:g} × the median module's), e.g. {small[0]}")
    out += [f"{p} in {ad.path / 'adapter_config.json'} matches no module" for p in ad.unused_patterns]
    return out


def _experts(ad: Adapter, layouts: dict[str, ParamLayout], reports: dict[str, ModuleReport], zero_b: list[str],
             nonfinite: list[str], dtype: torch.dtype) -> list[str]:
    """One row per expert of each parameter LoRA (MoE experts), named `PARAM[e]`: the spectrum of ΔW_e = s·B_e·A_e
    from that expert's factors (svd_of_product), type the parameter's own name (gate_up_proj, down_proj), kind
    "expert". Rows stay spectra only: base-relative figures (--base) and --compare cover plain modules."""
    if not layouts:
        return []
    for lay in layouts.values():
        pm = lay.module
        param = lay.params[0] if len(lay.params) == 1 else pm.name
        a, b = ad.read(pm.a_key), ad.read(pm.b_key)
        finite = all_finite(a) and all_finite(b)
        size = (a.numel() + b.numel()) * a.dtype.itemsize // lay.experts
        if finite and not bool(b.any()):
            zero_b.append(pm.name)
        for e, (be, ae) in enumerate(expert_slices(a.float(), b.float(), lay.experts)):
            name = f"{param}[{e}]"
            rep = ModuleReport(name, module_type(param), layer_index(param), "expert", False, lay.r, sig6(lay.alpha),
                               sig6(lay.scale), size, parameter=param, expert=e)
            reports[name] = rep
            if not finite:
                nonfinite.append(name)
                continue
            try:
                _measure(rep, svd_of_product(be, ae, lay.scale, dtype))
            except NotFinite as exc:
                raise overflow_error(ad, name, exc, tensor=pm.b_key) from None
    return [f"LoRA on parameters (MoE experts): one row per expert, named PARAM[e], from each expert's own factors; "
            f"{sum(lay.experts for lay in layouts.values())} experts in {len(layouts)} parameter modules"]


def _notes(reports: list[ModuleReport]) -> list[str]:
    """How to read the figures: explanations, not problems (they never fail --strict)."""
    if any(m.dora for m in reports):
        return ["DoRA modules: the spectra are of the directional update s·B·A; the magnitude vector rescales rows on top"]
    return []


def analyze(
    adapter: str | os.PathLike, *, base: str | os.PathLike | None = None, compare: str | os.PathLike | None = None,
    revision: str | None = None, precision: str = "float32", intruders: bool = False,
    intruder_k: int = spectra.INTRUDER_K, intruder_epsilon: float = spectra.INTRUDER_EPSILON, device: str = "cpu",
    quantized_base: str | os.PathLike | None = None,
) -> AnalyzeReport:
    """Measure every module of an adapter: spectrum, stable/effective/energy ranks, and with a base or a second
    adapter the relative update, amplification and subspace similarity; then summaries, advice and warnings.
    With an NF4 base (or `quantized_base`, the NF4 copy of a 16-bit `base`): per module ‖W₁₆ − deq(W₄)‖ and what
    `merge --requantize` would lose, each relative to ‖ΔW‖, and which base to merge a QLoRA adapter onto.

    Example::

        adapterops.analyze("./my-lora", base="./llama").suggested_rank

    With `intruders` (needs `base`): per module, how many of the top `intruder_k` singular vectors of W + ΔW have
    no singular vector of W with |cosine| ≥ `intruder_epsilon` (intruder dimensions, Shuttleworth et al. 2024);
    the SVDs run on `device`.
    """
    if intruders and base is None:
        raise AdapteropsError("intruder dimensions need the base weights: pass --base")
    intruder_k = check_count("intruder_k", intruder_k)
    intruder_epsilon = check_number("intruder_epsilon", intruder_epsilon, lo=0, hi=1, lo_open=True)
    intr = (intruder_k, float(intruder_epsilon), pick_device(device)) if intruders else None
    dtype = torch.float64 if precision == "float64" else torch.float32
    with ExitStack() as stack:
        ad = stack.enter_context(open_adapter(resolve(str(adapter)), strict_patterns=False, command="analyze", params=True))
        layouts = param_layouts(ad, None if base is None else str(base))
        reports: dict[str, ModuleReport] = {}
        svds: dict[str, ThinSVD] = {}
        zero_b, nonfinite = [], []
        for name, mod in ad.modules.items():
            a_shape, a_dtype = ad.tensors.shape_dtype(mod.a_key)
            b_shape, _ = ad.tensors.shape_dtype(mod.b_key)
            size = (torch.Size(a_shape).numel() + torch.Size(b_shape).numel()) * a_dtype.itemsize
            rep = ModuleReport(name, module_type(name), layer_index(name), mod.kind, mod.is_dora, mod.r, sig6(mod.alpha),
                               sig6(mod.scale), size)
            reports[name] = rep
            f = _factors(ad, mod)
            if f is None:
                nonfinite.append(name)
                continue
            if not bool(f[0].any()):
                zero_b.append(name)
            try:
                svds[name] = svd_of_product(f[0], f[1], mod.scale, dtype)
            except NotFinite as exc:
                raise overflow_error(ad, name, exc, mod) from None
            _measure(rep, svds[name])
        expert_rows = _experts(ad, layouts, reports, zero_b, nonfinite, dtype)
        warnings: list[str] = []
        if base is not None:
            _with_base(reports, svds, str(base), ad, revision, intr)
        qlora_report = None
        if quantized_base is not None and base is None:
            raise AdapteropsError("--quantized-base goes with --base (the 16-bit original it was quantized from)")
        if base is not None and (quantized_base is not None or _is_nf4(str(base), revision)):
            qlora_report = _qlora(reports, svds, str(base), None if quantized_base is None else str(quantized_base), ad, revision)
        if compare is not None:
            other = stack.enter_context(open_adapter(resolve(str(compare)), strict_patterns=False, command="analyze", params=True))
            warnings += _with_compare(reports, svds, other, ad)
        mods = list(reports.values())
        by_type: dict[str, list[ModuleReport]] = {}
        by_layer: dict[str, list[ModuleReport]] = {}
        for m in mods:
            by_type.setdefault(m.type, []).append(m)
            by_layer.setdefault("none" if m.layer is None else str(m.layer), []).append(m)
        at99 = sum(m.bytes * (m.rank if m.r99 is None else max(1, m.r99)) // m.rank for m in mods)
        report = AnalyzeReport(
            adapter=str(adapter), base=None if base is None else str(base), compare=None if compare is None else str(compare),
            use_rslora=ad.use_rslora, modules=mods,
            by_type={t: _summary(g) for t, g in sorted(by_type.items())},
            by_layer={k: _summary(g) for k, g in sorted(by_layer.items(), key=lambda kv: (kv[0] == "none", int(kv[0]) if kv[0].isdigit() else 0))},
            suggested_rank=_max([m.r99 for m in mods]) or 0, bytes=sum(m.bytes for m in mods), bytes_at_energy_99=at99,
            warnings=_health(ad, mods, zero_b, nonfinite) + warnings, notes=_notes(mods) + expert_rows,
            intruder_k=intruder_k if intr else None, intruder_epsilon=intr[1] if intr else None,
            quantized_base=None if quantized_base is None else str(quantized_base), qlora=qlora_report,
        )
    return report
