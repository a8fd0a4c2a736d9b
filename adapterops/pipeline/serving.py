"""Will an adapter load, and take effect, in a serving engine? The facts of an adapter (and its base), checked
against one engine release's rules (`io/engines.py`), as findings with a severity, a fix and the engine source.

`check` prints these findings; `convert` uses them to decide what to change and checks its own output with them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from adapterops.io.adapter import PREFIX, Adapter
from adapterops.io.checkpoint import Checkpoint
from adapterops.io.engines import EngineRules
from adapterops.io.nf4_checkpoint import is_nf4

LAYER_RE = re.compile(r"(^|\.)(layers|h|blocks|layer)\.(\d+)\.")
LM_PREFIXES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.", ""))
SEVERITY_ORDER = {"refused": 0, "ignored": 1, "served_differently": 2, "fine": 3}
SHOWN = {"refused": "refused", "ignored": "ignored silently", "served_differently": "served differently", "fine": "fine"}

# what `adapterops convert --for ENGINE` does about each rule (None: nothing it can do faithfully; merge instead)
FIXES: dict[str, str | None] = {
    "dora": "convert --base: DoRA → LoRA (the exact DoRA delta re-extracted; relative error reported per module)",
    "lora_bias": "convert drops an all-zero lora_B.bias exactly; otherwise merge instead (adapterops merge)",
    "bias": "convert --base drops trained biases equal to the base; otherwise merge instead (adapterops merge)",
    "modules_to_save": "convert --base: a low-rank delta against the base where faithful; otherwise merge instead",
    "use_rslora": "convert: the scale baked into lora_B, α = r (exact)",
    "rank_pattern": "convert: per-module scales baked into lora_B, one rank by exact zero-padding",
    "alpha_pattern": "convert: per-module scales baked into lora_B, α = r (exact)",
    "max_rank": "convert: truncated by SVD to the engine's rank (energy kept reported per module), or --rank / --energy",
    "rank_padding": "convert: zero-padded to a rank the engine keeps as it is, scale baked in (exact)",
    "unsupported_module": None,
    "embedding_lora": None,
    "lm_head_lora": None,
    "key_prefix": "convert: keys written as base_model.model.NAME.lora_A.weight",
    "language_model_prefix": "convert --base: module names renamed to the base's",
    "partial_layers": "convert: the missing layers filled with zero LoRA factors (exact)",
    "target_modules_string": "convert: target_modules written as a list of module names",
    "tied_lm_head": None,
    "unmatched_module": "convert --base renames known prefixes; otherwise check that this is the adapter's base",
    "shape_mismatch": None,
}


@dataclass
class Finding:
    """One thing the engine does with this adapter."""

    rule: str
    severity: str  # refused | ignored | served_differently | fine
    message: str
    modules: list[str] = field(default_factory=list)
    fix: str | None = None
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "severity": self.severity, "message": self.message, "modules": self.modules,
                "fix": self.fix, "source": self.source}


def leaf(module: str) -> str:
    """The last component of a module name (q_proj)."""
    return module.rsplit(".", 1)[-1]


def layer_of(module: str) -> int | None:
    """The block index in a module name (model.layers.3.mlp.up_proj -> 3)."""
    m = LAYER_RE.search(module)
    return int(m.group(3)) if m else None


def strip_lm_prefix(name: str) -> str:
    """A multimodal model's text module name as the text-only model names it (language_model.model.x -> model.x)."""
    for pre, repl in LM_PREFIXES:
        if name.startswith(pre):
            return repl + name[len(pre):]
    return name


def tied_embedding(ckpt: Checkpoint) -> str | None:
    """The input embedding lm_head is tied to, when the checkpoint stores no lm_head and its config does not untie."""
    keys = set(ckpt.keys())
    if "lm_head.weight" in keys or (ckpt.config or {}).get("tie_word_embeddings") is False:
        return None
    return next((k for k in ckpt.keys() if k.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight"))), None)


@dataclass
class Replacement:
    """A tensor the adapter stores whole: a modules_to_save copy, a trained bias, or PEFT's saved embedding."""

    name: str  # base tensor name
    key: str  # adapter key
    kind: str  # modules_to_save | bias | saved_embedding


def replacements(ad: Adapter) -> list[Replacement]:
    """The adapter's whole tensors, classified."""
    out = []
    for name, key in ad.replacements.items():
        if ".base_layer." in key:
            kind = "saved_embedding"
        elif name.endswith(".bias") and not _in_modules_to_save(ad, name.rsplit(".", 1)[0]):
            kind = "bias"
        else:
            kind = "modules_to_save"
        out.append(Replacement(name, key, kind))
    return out


def _in_modules_to_save(ad: Adapter, module: str) -> bool:
    """PEFT's rule: a module is saved whole when its name ends with an entry of modules_to_save."""
    return any(module == m or module.endswith(m) for m in ad.config.get("modules_to_save") or [])


def accepted_copy(rules: EngineRules, module: str) -> bool:
    """Whether the engine takes a modules_to_save copy of this module (vLLM: classifier heads; llama.cpp: norms)."""
    return any(re.fullmatch(p, leaf(module)) for p in rules.modules_to_save_accepted)


def _rank_limit(rules: EngineRules, max_lora_rank: int | None) -> int | None:
    return max_lora_rank if max_lora_rank is not None else rules.max_rank_default


def _layer_gaps(modules: list[str], n_layers: int | None) -> dict[str, list[int]]:
    """Per module type (the name with its layer index replaced), the layers it is missing."""
    by_type: dict[str, set[int]] = {}
    for m in modules:
        i = layer_of(m)
        if i is not None:
            by_type.setdefault(LAYER_RE.sub(lambda g: f"{g.group(1)}{g.group(2)}.*.", m, count=1), set()).add(i)
    if not by_type:
        return {}
    total = n_layers if n_layers is not None else max(max(s) for s in by_type.values()) + 1
    return {t: sorted(set(range(total)) - s) for t, s in by_type.items() if set(range(total)) - s}


def num_layers(ckpt: Checkpoint | None) -> int | None:
    """The base's number of blocks, from its config (or its tensor names)."""
    if ckpt is None:
        return None
    cfg = ckpt.config or {}
    cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
    n = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    if isinstance(n, int) and n > 0:
        return n
    idx = [layer_of(k) for k in ckpt.keys()]
    idx = [i for i in idx if i is not None]
    return max(idx) + 1 if idx else None


def _short(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def findings(ad: Adapter, rules: EngineRules, base: Checkpoint | None = None, *,
             max_lora_rank: int | None = None) -> list[Finding]:
    """Every rule of this engine release that applies to the adapter (and its base), most severe first."""
    out: list[Finding] = []
    cfg = ad.config
    label = rules.label

    def add(rule: str, message: str, modules: list[str] | None = None, severity: str | None = None) -> None:
        r = rules.rules.get(rule)
        sev = severity or (r.severity if r else "refused")
        out.append(Finding(rule, sev, message, sorted(modules or []), FIXES.get(rule) if sev != "fine" else None,
                           r.source if r else "adapterops (generic)"))

    mods = ad.modules
    dora = [m for m, x in mods.items() if x.is_dora]
    if dora:
        add("dora", f"DoRA magnitudes on {len(dora)} modules", dora)
    lb = [m for m, x in mods.items() if x.bias_key]
    if lb:
        add("lora_bias", f"lora_bias: {len(lb)} modules have a lora_B.bias", lb)
    reps = replacements(ad)
    biases = [r.name for r in reps if r.kind == "bias"]
    if biases or cfg.get("bias", "none") != "none":
        add("bias", f"bias={cfg.get('bias')!r}: {len(biases)} trained base biases in the adapter", biases)
    copies = [r.name for r in reps if r.kind == "modules_to_save"]
    refused = [c for c in copies if not accepted_copy(rules, c.rsplit(".", 1)[0])]
    if refused:
        add("modules_to_save", f"modules_to_save copies {_short(refused)}", refused)
    elif copies:
        add("modules_to_save", f"modules_to_save copies {_short(copies)} are of modules {label} accepts", copies, "fine")

    if ad.use_rslora and mods:
        add("use_rslora", "use_rslora: PEFT scales by α/√r" + ("" if rules.rules["use_rslora"].severity == "fine"
                                                               else f"; {label} uses α/r"))
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rank_odd = [m for m, x in mods.items() if x.r != r0]
    alpha_odd = [m for m, x in mods.items() if x.alpha != a0]
    if rank_odd:
        add("rank_pattern", f"rank_pattern gives {len(rank_odd)} modules a rank other than r={r0}", rank_odd)
    if alpha_odd:
        add("alpha_pattern", f"alpha_pattern gives {len(alpha_odd)} modules an alpha other than {a0}", alpha_odd)

    limit = _rank_limit(rules, max_lora_rank)
    top = max((x.r for x in mods.values()), default=0)
    if limit is not None and top > limit:
        flag = f" ({rules.max_rank_option} {limit})" if rules.max_rank_option else ""
        add("max_rank", f"rank {top} is above {label}'s maximum{flag}", [m for m, x in mods.items() if x.r > limit])
    if rules.rank_padding and mods:
        ranks = sorted({x.r for x in mods.values()})
        padded = {r: rules.padded_rank(r) for r in ranks}
        # the engine loads module types in its own order; the shared config's r is rewritten after the first one
        order = list(rules.supported_modules or ())
        present = sorted({leaf(m) for m in mods}, key=lambda t: order.index(t) if t in order else len(order))
        hit = [m for m, x in mods.items() if leaf(m) != present[0] and leaf(m) in order]
        if any(p != r for r, p in padded.items()) and hit:
            changed = ", ".join(f"{r}→{p}" for r, p in padded.items() if p != r)
            add("rank_padding", f"{label} pads ranks for its SGMV kernels ({changed}) and then scales every module type "
                f"after {present[0]} by α/padded_rank instead of α/r", hit, rules.rules["rank_padding"].severity)

    if rules.supported_modules is not None:
        bad = [m for m in mods if leaf(m) not in rules.supported_modules and leaf(m) not in ("embed_tokens", "lm_head")]
        if bad:
            add("unsupported_module", f"{label} wraps no LoRA layer for {_short(sorted({leaf(m) for m in bad}))}", bad)
    emb = [m for m, x in mods.items() if x.kind == "embedding"]
    if emb:
        add("embedding_lora", f"LoRA on the token embedding ({_short(emb)})", emb)
    heads = [m for m, x in mods.items() if leaf(m) == "lm_head" and x.kind != "embedding"]
    if heads:
        add("lm_head_lora", "LoRA on lm_head", heads)

    plain = [k for k in ad.tensors.keys() if not k.startswith(PREFIX)]
    if plain:
        add("key_prefix", f"{len(plain)} tensor keys do not start with {PREFIX!r} (e.g. {plain[0]})", [])
    lm = [m for m in mods if strip_lm_prefix(m) != m]
    base_keys = set(base.keys()) if base is not None else None
    if lm and (base_keys is None or any(f"{m}.weight" not in base_keys for m in lm)):
        add("language_model_prefix", f"{len(lm)} module names carry a multimodal prefix (e.g. {lm[0]})"
            + ("" if base_keys is None else " that the base does not have"), lm)
    gaps = _layer_gaps(list(mods), num_layers(base))
    if gaps:
        t, missing = next(iter(gaps.items()))
        add("partial_layers", f"{len(gaps)} module types cover only some layers (e.g. {t} misses layers "
            f"{_short([str(i) for i in missing], 6)})", list(gaps))
    tm = cfg.get("target_modules")
    if isinstance(tm, str) and tm not in ("all", "all-linear"):
        add("target_modules_string", f"target_modules is a regex string ({tm[:60]!r})")

    if base is not None:
        tied = tied_embedding(base)
        if tied and heads:
            add("tied_lm_head", f"the base ties lm_head to {tied}, and the adapter has a LoRA on lm_head", heads)
        if tied and "lm_head.weight" in copies:
            out.append(Finding("tied_lm_head", "fine", f"the base ties lm_head to {tied}; the modules_to_save copy of "
                               "lm_head unties it (PEFT does the same)", ["lm_head"], None, "adapterops (generic)"))
        nf4 = is_nf4(base)
        missing, shapes = [], []
        for m, x in mods.items():
            name = f"{m}.weight"
            if name not in base_keys:
                if m == "lm_head" and tied:
                    continue
                missing.append(m)
            elif not nf4:
                got = tuple(base.shape_dtype(name)[0])
                want = _lora_shape(ad, x)
                if want is not None and tuple(got[:2]) != want and tuple(got[:2]) != want[::-1]:
                    shapes.append(f"{m} {list(want)} vs {list(got)}")
        if missing:
            add("unmatched_module", f"{len(missing)} adapter modules match no module of the base: they load and do "
                f"nothing (e.g. {missing[0]})", missing)
        if shapes:
            out.append(Finding("shape_mismatch", "refused", f"shapes disagree with the base: {_short(shapes)}",
                               [s.split(" ")[0] for s in shapes], None, "adapterops (generic)"))
    out.sort(key=lambda f: (SEVERITY_ORDER[f.severity], f.rule))
    return out


def _lora_shape(ad: Adapter, x: Any) -> tuple[int, int] | None:
    """(out, in) of a Linear module from its factors; (vocab, dim) of an embedding; None for convolutions."""
    a_shape, _ = ad.tensors.shape_dtype(x.a_key)
    b_shape, _ = ad.tensors.shape_dtype(x.b_key)
    if x.kind == "linear":
        return (b_shape[0], a_shape[1])
    if x.kind == "embedding":
        return (a_shape[1], b_shape[0])
    return None


def verdict(found: list[Finding]) -> str:
    """The worst severity (fine when there is nothing to say)."""
    return min((f.severity for f in found), key=SEVERITY_ORDER.__getitem__, default="fine")
