"""PEFT IA3, LoHa, LoKr and VeRA adapters: their configs and tensors, parsed into `TunerModule` records.

`io/adapter.py` dispatches here on `peft_type`. A tuner adapter is an `Adapter` whose `tuner_modules` (not `modules`)
are filled; `merge` plans a `TunerStep` per module (pipeline/tuner_steps.py) and `rerank` turns LoHa, LoKr and VeRA
into LoRA. Every other command refuses tuner adapters with the reason (`tuner_refusal`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapterops.core.scaling import (
    MAX_MODULE_NAME,
    MAX_PATTERN_KEYS,
    invalid_pattern,
    resolve_rank_alpha,
)
from adapterops.errors import AdapteropsError

PREFIX = "base_model.model."

# peft_type -> (display name, tensor suffixes)
TUNERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "IA3": ("IA3", (".ia3_l",)),
    "LOHA": ("LoHa", (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2")),
    "LOKR": ("LoKr", (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")),
    "VERA": ("VeRA", (".vera_lambda_b", ".vera_lambda_d")),
}
VERA_SHARED = ("base_model.vera_A", "base_model.vera_B")
# Adapter types whose ΔW is a low-rank or dense product that rerank can turn into LoRA
CONVERTIBLE = ("LOHA", "LOKR", "VERA")

WHY_NOT_LORA = {
    "IA3": "IA3 multiplies the weights by learned vectors (W ⊙ l) instead of adding a ΔW, so it has no B·A factors",
    "LOHA": "LoHa's ΔW is a Hadamard product of two low-rank products, not B·A (rerank --rank/--energy converts it to LoRA)",
    "LOKR": "LoKr's ΔW is a Kronecker product, not B·A (rerank --rank/--energy converts it to LoRA)",
    "VERA": "VeRA's ΔW comes from shared random projections scaled per module, not stored B·A factors "
            "(rerank --rank/--energy converts it to LoRA)",
}


def tuner_type(cfg: dict[str, Any]) -> str | None:
    """The upper-case peft_type when the config is one of the tuners handled here, else None."""
    ptype = cfg.get("peft_type")
    return ptype.upper() if isinstance(ptype, str) and ptype.upper() in TUNERS else None


def display(ptype: str) -> str:
    """'LoHa' for 'LOHA'."""
    return TUNERS[ptype][0]


def tuner_refusal(ptype: str, command: str | None) -> str:
    """Why a command that works on LoRA factors refuses this tuner adapter."""
    what = f"{command} works" if command else "this command works"
    return f"{what} on LoRA adapters only: {WHY_NOT_LORA[ptype]}; merge and inspect take {display(ptype)} adapters"


@dataclass
class TunerModule:
    """One module of an IA3, LoHa, LoKr or VeRA adapter: its tensors (by suffix), rank, alpha and scale."""

    name: str
    peft_type: str  # "IA3", "LOHA", "LOKR", "VERA"
    keys: dict[str, str] = field(default_factory=dict)  # suffix without the dot ("hada_w1_a") -> tensor key
    r: int = 0
    alpha: float = 0.0
    scale: float = 1.0
    feedforward: bool | None = None  # IA3 only
    # LoHa / LoKr, from the factor shapes (`_check_factor_shapes`): "flat" (products of 2-D factors), "tucker"
    # (hada_t1/t2 or lokr_t2 cores) or, for LoKr's w2, "full"; LoHa's ΔW shape before PEFT reshapes it to the
    # weight; LoKr's two Kronecker factor shapes
    form: str = ""
    delta_shape: tuple[int, ...] = ()
    kron_shapes: tuple[tuple[int, ...], tuple[int, ...]] = ((), ())

    is_dora = False
    bias_key = None

    @property
    def weight_name(self) -> str:
        """The base tensor this module changes."""
        return f"{self.name}.weight"

    @property
    def kind(self) -> str:
        """'ia3', 'loha', 'lokr' or 'vera' (what `merge --dry-run` and `inspect` print)."""
        return self.peft_type.lower()

    @property
    def a_key(self) -> str:
        """A tensor key of this module, for error messages."""
        return next(iter(self.keys.values()))

    def key(self, part: str) -> str | None:
        """The tensor key of one part ('hada_w1_a', 'lokr_w2', …), None when absent."""
        return self.keys.get(part)


def check_tuner_config(cfg: dict[str, Any], cfg_path: Path, ptype: str) -> None:
    """Values of the wrong type or range in an IA3, LoHa, LoKr or VeRA config (numbers checked as LoRA's are)."""
    from adapterops.io.adapter import number_problem  # adapter.py imports this module

    for name in ("fan_in_fan_out", "use_effective_conv2d", "save_projection", "inference_mode", "decompose_both"):
        if name in cfg and cfg[name] is not None and not isinstance(cfg[name], bool):
            raise AdapteropsError(f"{name} must be true or false, got {type(cfg[name]).__name__}", file=cfg_path)
    if ptype in ("LOHA", "LOKR", "VERA"):
        for name in ("r",) + (("alpha",) if ptype != "VERA" else ()):
            why = number_problem(cfg[name], integer=name == "r") if name in cfg else None
            if why:
                raise AdapteropsError(f"{name} {why}", file=cfg_path)
    for pat in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(pat)
        if not patterns:
            continue
        if not isinstance(patterns, dict):
            raise AdapteropsError(f"{pat} must be an object, got {type(patterns).__name__}", file=cfg_path)
        if len(patterns) > MAX_PATTERN_KEYS:
            raise AdapteropsError(f"{pat} has {len(patterns)} keys, over the limit of {MAX_PATTERN_KEYS}", file=cfg_path)
        for key, value in patterns.items():
            err = invalid_pattern(key)
            if err:
                raise AdapteropsError(f"{pat} key {key[:80]!r} is not usable: {err}", file=cfg_path)
            why = number_problem(value, integer=pat == "rank_pattern")
            if why:
                raise AdapteropsError(f"{pat} value for {key!r} {why}", file=cfg_path)
    ff = cfg.get("feedforward_modules")
    if ptype == "IA3" and ff is not None:
        if isinstance(ff, str):
            err = invalid_pattern(ff)
            if err:
                raise AdapteropsError(f"feedforward_modules regex is not usable: {err}", file=cfg_path)
        elif not (isinstance(ff, list) and all(isinstance(t, str) for t in ff)):
            raise AdapteropsError("feedforward_modules must be a regex or a list of module names", file=cfg_path)
    if ptype == "VERA" and cfg.get("save_projection") is False:
        key = cfg.get("projection_prng_key", 0)
        # torch.Generator.manual_seed takes [-2**63, 2**64 - 1] and raises RuntimeError outside
        if isinstance(key, bool) or not isinstance(key, int) or not -(2**63) <= key < 2**64:
            shown = f"an integer of {key.bit_length()} bits" if isinstance(key, int) and key.bit_length() > 64 else f"{key!r:.40}"
            raise AdapteropsError(f"projection_prng_key must be an integer seed (-2**63 to 2**64 - 1), got {shown}", file=cfg_path)


def _ia3_feedforward(cfg: dict[str, Any], module: str) -> bool | None:
    """PEFT's `_check_target_module_feedforward`; None when the config does not say (then the shape decides)."""
    ff = cfg.get("feedforward_modules")
    if ff is None:
        return None
    if isinstance(ff, str):
        return bool(re.fullmatch(ff, module))
    return any(module.endswith(t) for t in ff)


def parse_tuner_modules(adapter: Any, cfg_path: Path, ptype: str, strict_patterns: bool) -> None:
    """Group an IA3/LoHa/LoKr/VeRA adapter's tensors by module into `adapter.tuner_modules`; other tensors
    (modules_to_save copies, trained biases) become replacements, VeRA's shared projections `adapter.shared`."""
    from adapterops.io.adapter import (  # adapter.py imports this module
        check_factor_tensor,
        check_unused_patterns,
        claim,
    )

    cfg = adapter.config
    suffixes = TUNERS[ptype][1]
    parts: dict[str, dict[str, str]] = {}
    for key in adapter.tensors.keys():
        if ptype == "VERA" and key in VERA_SHARED:
            adapter.shared[key.rsplit(".", 1)[1]] = key
            continue
        name = key.removeprefix(PREFIX)
        suffix = next((s for s in suffixes if name.endswith(s)), None)
        if suffix is None:
            if any(t in name for t in (".lora_", ".hada_", ".lokr_", ".ia3_", ".vera_")):
                raise AdapteropsError(f"tensor does not belong in a {display(ptype)} adapter", file=adapter.tensors.path, tensor=key)
            target = name.replace(".base_layer.", ".")
            claim(adapter.replacements, target, key, f"a replacement for base tensor {target}", adapter.tensors.path)
            continue
        module = name[: -len(suffix)]
        if len(module) > MAX_MODULE_NAME:
            raise AdapteropsError(f"module name is {len(module)} characters long, over the limit of {MAX_MODULE_NAME}",
                                  file=adapter.tensors.path, tensor=key[:MAX_MODULE_NAME] + "...")
        claim(parts.setdefault(module, {}), suffix[1:], key, f"{suffix[1:]} of module {module}", adapter.tensors.path)
    r0, alpha0 = cfg.get("r", 8), cfg.get("alpha", 8)
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    for module, found in parts.items():
        mod = TunerModule(module, ptype, found)
        if ptype in ("LOHA", "LOKR"):
            r, alpha = resolve_rank_alpha(module, r0, alpha0, rank_pattern, alpha_pattern)
            mod.r, mod.alpha, mod.scale = int(r), float(alpha), alpha / r  # PEFT: scaling = alpha / r
        elif ptype == "VERA":
            mod.r = int(r0)
        else:
            mod.feedforward = _ia3_feedforward(cfg, module)
        _check_parts(adapter, mod)
        for key in found.values():  # what LoRA factors must be: floating point, no empty dimension
            check_factor_tensor(adapter.tensors, key, f"{display(ptype)} tensor of module {module}",
                                f"a {display(ptype)} adapter's tensors")
        if ptype in ("LOHA", "LOKR"):
            _check_factor_shapes(adapter, mod)
        adapter.tuner_modules[module] = mod
    for key in adapter.shared.values():
        check_factor_tensor(adapter.tensors, key, "VeRA's shared projection", "a VeRA adapter's tensors")
    if ptype == "VERA" and adapter.tuner_modules and cfg.get("save_projection", True) is not False:
        missing = [k for k in VERA_SHARED if k.rsplit(".", 1)[1] not in adapter.shared]
        if missing:
            raise AdapteropsError(f"save_projection is set but the adapter has no {missing[0]}", file=adapter.tensors.path)
    check_unused_patterns(adapter, cfg_path, list(adapter.tuner_modules), strict_patterns)


def _check_parts(adapter: Any, mod: TunerModule) -> None:
    """Each module must have a complete set of tensors for its kind."""
    have = set(mod.keys)

    def need(*names: str) -> None:
        for n in names:
            if n not in have:
                raise AdapteropsError(f"{display(mod.peft_type)} module {mod.name} has no {n}", file=adapter.tensors.path, tensor=mod.a_key)

    if mod.peft_type == "LOHA":
        need("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        if ("hada_t1" in have) != ("hada_t2" in have):
            need("hada_t1", "hada_t2")
    elif mod.peft_type == "LOKR":
        for full, parts in (("lokr_w1", ("lokr_w1_a", "lokr_w1_b")), ("lokr_w2", ("lokr_w2_a", "lokr_w2_b", "lokr_t2"))):
            both = [p for p in parts if p in have]
            if full in have and both:  # PEFT makes one form per factor; the other would be ignored
                raise AdapteropsError(f"LoKr module {mod.name} has both {full} and {both[0]}: a factor is stored whole "
                                      "or as a product, not both", file=adapter.tensors.path, tensor=mod.keys[both[0]])
            if full not in have:
                need(*parts[:2])
    elif mod.peft_type == "VERA":
        need("vera_lambda_b", "vera_lambda_d")


# How PEFT 0.21 lays out LoHa and LoKr factors (tuners/loha/layer.py, tuners/lokr/layer.py: create_adapter_parameters
# and get_delta_weight), r the module's rank:
#   LoHa, flat:    hada_w1_a/w2_a [out, r], hada_w1_b/w2_b [r, in·k…]; ΔW = (w1a·w1b) ⊙ (w2a·w2b): [out, in·k…]
#   LoHa, Tucker:  hada_t1/t2 [r, r, k1, k2] (Conv1d: [r, r, k, 1]), hada_w1_a/w2_a [r, out], hada_w1_b/w2_b [r, in];
#                  ΔW [out, in, k1, k2] (Conv1d [out, in, k, 1])
#   LoKr:          w1 = lokr_w1 [a, c] or lokr_w1_a [a, r] · lokr_w1_b [r, c];
#                  w2 = lokr_w2 [b, d] (Linear), [b, d, k] (Conv1d), [b, d, k1, k2] (Conv2d),
#                       or lokr_w2_a [b, r] · lokr_w2_b [r, d·k…], or Tucker lokr_t2 [r, r, k1, k2] (Conv1d [r, r, k, 1])
#                       with lokr_w2_a [r, b], lokr_w2_b [r, d]; ΔW = w1 ⊗ w2 with a·b = out, c·d = in
# and reshapes ΔW to the weight's shape. Tucker cores exist only with use_effective_conv2d on a kernel larger than 1.
# Only an element count that matches is not enough: a LoHa made for a [128, 64] up_proj has the 8,192 values of a
# [64, 128] down_proj, and the reshape would merge it scrambled (PEFT refuses to load it).
LOHA_LAYOUT = {"hada_w1_a": "[out, r]", "hada_w2_a": "[out, r]", "hada_w1_b": "[r, in·k…]", "hada_w2_b": "[r, in·k…]"}
LOHA_TUCKER = {"hada_t1": "[r, r, k1, k2]", "hada_t2": "[r, r, k1, k2]", "hada_w1_a": "[r, out]", "hada_w2_a": "[r, out]",
               "hada_w1_b": "[r, in]", "hada_w2_b": "[r, in]"}
LOKR_LAYOUT = {"lokr_w1": "[a, c]", "lokr_w1_a": "[a, r]", "lokr_w1_b": "[r, c]", "lokr_w2_a": "[b, r]",
               "lokr_w2_b": "[r, d·k…]", "lokr_t2": "[r, r, k1, k2]"}
LOKR_TUCKER = {"lokr_w2_a": "[r, b]", "lokr_w2_b": "[r, d]"}


def _check_factor_shapes(adapter: Any, mod: TunerModule) -> None:
    """A LoHa/LoKr module's factors against each other and its rank, as PEFT creates them (headers only, before
    any dimension is indexed); records `form`, `delta_shape` / `kron_shapes` for the check against the base."""
    t = adapter.tensors
    name = display(mod.peft_type)
    tucker = "hada_t1" in mod.keys or "lokr_t2" in mod.keys
    if mod.peft_type == "LOHA":
        layout = LOHA_TUCKER if tucker else LOHA_LAYOUT
    else:
        layout = {**LOKR_LAYOUT, **LOKR_TUCKER} if tucker else LOKR_LAYOUT

    def fail(part: str, msg: str) -> AdapteropsError:
        return AdapteropsError(f"{name} module {mod.name}: {msg}", file=t.path, tensor=mod.keys[part])

    def shape(part: str, ndim: int | tuple[int, ...]) -> tuple[int, ...]:
        got = tuple(t.shape_dtype(mod.keys[part])[0])
        if len(got) not in ((ndim,) if isinstance(ndim, int) else ndim):
            want = layout.get(part, "[b, d], [b, d, k] or [b, d, k1, k2]")
            raise fail(part, f"{part} has shape {list(got)}, not {want} as PEFT makes it")
        return got

    def rank(part: str, got: int) -> None:
        if got != mod.r:
            raise fail(part, f"{part} has rank {got} but the config gives this module r={mod.r}")

    def same(part: str, got: tuple[int, ...], other: str, want: tuple[int, ...]) -> None:
        if got != want:
            raise fail(part, f"{part} has shape {list(got)}, {other} {list(want)}: they do not fit together")

    if mod.peft_type == "LOHA":
        w1a, w1b = shape("hada_w1_a", 2), shape("hada_w1_b", 2)
        w2a, w2b = shape("hada_w2_a", 2), shape("hada_w2_b", 2)
        if tucker:
            t1, t2 = shape("hada_t1", 4), shape("hada_t2", 4)
            for part, r in (("hada_t1", t1[0]), ("hada_t1", t1[1]), ("hada_w1_a", w1a[0]), ("hada_w1_b", w1b[0])):
                rank(part, r)
            same("hada_t2", t2, "hada_t1", t1)
            same("hada_w2_a", w2a, "hada_w1_a", w1a)
            same("hada_w2_b", w2b, "hada_w1_b", w1b)
            mod.form, mod.delta_shape = "tucker", (w1a[1], w1b[1], t1[2], t1[3])
        else:
            for part, r in (("hada_w1_a", w1a[1]), ("hada_w1_b", w1b[0]), ("hada_w2_a", w2a[1]), ("hada_w2_b", w2b[0])):
                rank(part, r)
            same("hada_w2_a", w2a, "hada_w1_a", w1a)
            same("hada_w2_b", w2b, "hada_w1_b", w1b)
            mod.form, mod.delta_shape = "flat", (w1a[0], w1b[1])
        return
    if "lokr_w1" in mod.keys:
        w1 = shape("lokr_w1", 2)
    else:
        w1a, w1b = shape("lokr_w1_a", 2), shape("lokr_w1_b", 2)
        rank("lokr_w1_a", w1a[1])
        rank("lokr_w1_b", w1b[0])
        w1 = (w1a[0], w1b[1])
    if "lokr_w2" in mod.keys:
        mod.form, w2 = "full", shape("lokr_w2", (2, 3, 4))
    elif tucker:
        t2, w2a, w2b = shape("lokr_t2", 4), shape("lokr_w2_a", 2), shape("lokr_w2_b", 2)
        for part, r in (("lokr_t2", t2[0]), ("lokr_t2", t2[1]), ("lokr_w2_a", w2a[0]), ("lokr_w2_b", w2b[0])):
            rank(part, r)
        mod.form, w2 = "tucker", (w2a[1], w2b[1], t2[2], t2[3])
    else:
        w2a, w2b = shape("lokr_w2_a", 2), shape("lokr_w2_b", 2)
        rank("lokr_w2_a", w2a[1])
        rank("lokr_w2_b", w2b[0])
        mod.form, w2 = "flat", (w2a[0], w2b[1])
    mod.kron_shapes = (w1, w2)


def _tuner_layout_problem(mod: TunerModule, base_shape: tuple[int, ...], effective_conv: bool) -> tuple[str, str] | None:
    """Why a LoHa/LoKr module's factors are not what PEFT makes for this base weight, and the tensor to name; None
    when they are. `effective_conv`: PEFT makes Tucker cores here (use_effective_conv2d, a conv kernel larger than 1)."""
    name = display(mod.peft_type)
    conv = len(base_shape) > 2
    core = "hada_t1" if mod.peft_type == "LOHA" else "lokr_t2"
    if mod.form == "tucker" and not effective_conv:
        why = ("Tucker cores are for convolutions" if not conv else
               "PEFT makes Tucker cores only with use_effective_conv2d and a kernel larger than 1")
        return f"{name} module {mod.name} has {core} but {why}", core
    if mod.form == "flat" and effective_conv:
        first = "hada_w1_a" if mod.peft_type == "LOHA" else "lokr_w2_a"
        why = "with use_effective_conv2d PEFT makes Tucker cores for a kernel larger than 1"
        return f"{name} module {mod.name} has no {core}, but {why}", first
    flat_shape = (base_shape[0], math.prod(base_shape[1:]))  # [out, in·k…]
    tucker_shape = base_shape if len(base_shape) == 4 else (*base_shape, 1)  # Conv1d: [out, in, k, 1]
    if mod.peft_type == "LOHA":
        got, want = mod.delta_shape, (tucker_shape if mod.form == "tucker" else flat_shape)
        key = "hada_t1" if mod.form == "tucker" else "hada_w1_a"
        if got != want:
            return f"LoHa factors make a ΔW of shape {list(got)}, PEFT needs {list(want)} for this weight", key
        return None
    (a, c), w2 = mod.kron_shapes
    key = {"full": "lokr_w2", "tucker": "lokr_t2", "flat": "lokr_w2_b"}[mod.form]
    if mod.form == "full":
        if len(w2) != len(base_shape):
            return f"lokr_w2 has shape {list(w2)}, PEFT makes it {len(base_shape)}-D for this weight", key
        got, want = (a * w2[0], c * w2[1], *w2[2:]), base_shape
    elif mod.form == "tucker":
        got, want = (a * w2[0], c * w2[1], *w2[2:]), tucker_shape
    else:
        kernel = math.prod(base_shape[2:])
        if w2[1] % kernel:
            return (f"lokr_w2_b has {w2[1]} columns, not a multiple of the kernel's {kernel} values "
                    f"(PEFT makes it [r, d·{'·'.join(map(str, base_shape[2:]))}])"), key
        got, want = (a * w2[0], c * w2[1]), flat_shape
    if got != want:
        return (f"LoKr factors {list(mod.kron_shapes[0])} ⊗ {list(w2)} make a ΔW of shape {list(got)}, PEFT needs "
                f"{list(want)} for this weight"), key
    return None


def check_tuner_module(adapter: Any, mod: TunerModule, base_shape: tuple[int, ...], base_name: str,
                       conv1d: bool | None) -> tuple[str, bool]:
    """Check a tuner module's tensors against its base weight; returns (layer kind 'linear'|'conv', fan_in_fan_out).

    Only what PEFT 0.21 wraps is accepted: Linear (and GPT-2 Conv1D for IA3 and VeRA), Conv1d/2d (LoHa, LoKr),
    Conv2d/3d (IA3); grouped convolutions and embeddings are refused.
    """
    t = adapter.tensors

    def fail(msg: str, key: str | None = None) -> AdapteropsError:
        return AdapteropsError(f"{msg}; base tensor '{base_name}' has shape {list(base_shape)}", file=t.path, tensor=key or mod.a_key)

    def shape(part: str) -> tuple[int, ...]:
        return tuple(t.shape_dtype(mod.keys[part])[0])

    name = display(mod.peft_type)
    layer = "linear" if len(base_shape) == 2 else "conv"
    if len(base_shape) < 2 or len(base_shape) > 5:
        raise fail(f"{name} cannot be merged into a {len(base_shape)}-D weight")
    fif = bool(conv1d) and layer == "linear" and not mod.name.endswith("lm_head")
    if fif and mod.peft_type in ("LOHA", "LOKR"):
        raise fail(f"{name} does not support GPT-2 Conv1D layers (PEFT wraps only nn.Linear and nn.Conv1d/2d)")
    out_f, in_f = (base_shape[1], base_shape[0]) if fif else (base_shape[0], base_shape[1])
    if mod.peft_type == "IA3":
        l_shape = shape("ia3_l")
        if layer == "conv":
            if len(base_shape) not in (4, 5):
                raise fail("IA3 supports Conv2d and Conv3d, not Conv1d (PEFT wraps no other convolution)", mod.keys["ia3_l"])
            ff = mod.feedforward if mod.feedforward is not None else None
            want = [(1, base_shape[1]) if ff else (1, base_shape[0])] if ff is not None else [(1, base_shape[1]), (1, base_shape[0])]
            if l_shape[:2] not in want or any(s != 1 for s in l_shape[2:]) or len(l_shape) != len(base_shape):
                raise fail(f"ia3_l has shape {list(l_shape)} (grouped convolutions are not supported)", mod.keys["ia3_l"])
            if ff is None:
                if base_shape[0] == base_shape[1]:
                    raise fail("feedforward_modules is not in the config and the shape cannot tell", mod.keys["ia3_l"])
                mod.feedforward = l_shape[1] == base_shape[1]
        else:
            ff_shape, out_shape = (1, in_f), (out_f, 1)
            if mod.feedforward is None:
                if ff_shape == out_shape or l_shape not in (ff_shape, out_shape):
                    raise fail(f"ia3_l has shape {list(l_shape)} and feedforward_modules is not in the config", mod.keys["ia3_l"])
                mod.feedforward = l_shape == ff_shape
            if l_shape != (ff_shape if mod.feedforward else out_shape):
                raise fail(f"ia3_l has shape {list(l_shape)}, expected {list(ff_shape if mod.feedforward else out_shape)}"
                           f" for a{' feed-forward' if mod.feedforward else 'n attention'} module", mod.keys["ia3_l"])
        return layer, fif
    if mod.peft_type == "VERA":
        if layer != "linear":
            raise fail("VeRA supports Linear and Conv1D layers only")
        lb, ld = shape("vera_lambda_b"), shape("vera_lambda_d")
        if lb != (out_f,) or ld != (mod.r,):
            raise fail(f"vera_lambda_b {list(lb)} / vera_lambda_d {list(ld)} do not fit r={mod.r}", mod.keys["vera_lambda_b"])
        if adapter.shared:
            a_shape = tuple(t.shape_dtype(adapter.shared["vera_A"])[0])
            b_shape = tuple(t.shape_dtype(adapter.shared["vera_B"])[0])
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != mod.r or b_shape[1] != mod.r or a_shape[1] < in_f or b_shape[0] < out_f:
                raise fail(f"shared projections vera_A {list(a_shape)} / vera_B {list(b_shape)} are too small for this module",
                           adapter.shared["vera_A"])
        return layer, fif
    # LoHa / LoKr: the factors must make the ΔW PEFT makes for this weight, not only as many values
    if layer == "conv" and len(base_shape) not in (3, 4):
        raise fail(f"{name} supports Conv1d and Conv2d, not Conv3d")
    effective = layer == "conv" and adapter.config.get("use_effective_conv2d") is True and any(k != 1 for k in base_shape[2:])
    problem = _tuner_layout_problem(mod, base_shape, effective)
    if problem:
        raise fail(problem[0], mod.keys[problem[1]])
    return layer, fif


def untrained_tuner_modules(adapter: Any) -> list[str]:
    """Modules whose ΔW is zero or whose IA3 vector is all ones (PEFT's initialisation: merging changes nothing)."""
    out = []
    for name, mod in adapter.tuner_modules.items():
        if mod.peft_type == "IA3":
            idle = bool((adapter.read(mod.keys["ia3_l"]).float() == 1).all())
        elif mod.peft_type == "LOHA":
            idle = not adapter.read(mod.keys["hada_w2_b"]).any() or not adapter.read(mod.keys["hada_w1_b"]).any()
        elif mod.peft_type == "LOKR":
            part = "lokr_w2" if "lokr_w2" in mod.keys else "lokr_w2_b"
            idle = not adapter.read(mod.keys[part]).any()
        else:
            idle = not adapter.read(mod.keys["vera_lambda_b"]).any()
        if idle:
            out.append(name)
    return out
