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

from adapterops.core.scaling import MAX_MODULE_NAME, MAX_PATTERN_KEYS, invalid_pattern, resolve_rank_alpha
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
    from adapterops.io.adapter import check_factor_tensor, check_unused_patterns, claim  # adapter.py imports this module

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
    numel = math.prod(base_shape)
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
    # LoHa / LoKr: the factors must rebuild exactly the base weight's number of elements (PEFT reshapes to it)
    if layer == "conv" and len(base_shape) not in (3, 4):
        raise fail(f"{name} supports Conv1d and Conv2d, not Conv3d")
    got = tuner_delta_numel(adapter, mod)
    if got != numel:
        raise fail(f"{name} factors rebuild {got} values, the base weight has {numel} (grouped convolutions are not supported)")
    return layer, fif


def tuner_delta_numel(adapter: Any, mod: TunerModule) -> int:
    """How many values a LoHa/LoKr module's ΔW has, from the factor shapes (headers only)."""
    t = adapter.tensors

    def shape(part: str) -> tuple[int, ...]:
        return tuple(t.shape_dtype(mod.keys[part])[0])

    def mm(a: tuple[int, ...], b: tuple[int, ...], what: str) -> tuple[int, ...]:
        if len(a) != 2 or len(b) != 2 or a[1] != b[0]:
            raise AdapteropsError(f"{display(mod.peft_type)} factors of {what} do not multiply: {list(a)} · {list(b)}",
                                  file=t.path, tensor=mod.a_key)
        return (a[0], b[1])

    if mod.peft_type == "LOHA":
        if "hada_t1" in mod.keys:
            t1, w1a, w1b = shape("hada_t1"), shape("hada_w1_a"), shape("hada_w1_b")
            if len(t1) != 4 or t1[:2] != (w1a[0], w1b[0]) or shape("hada_t2") != t1 or shape("hada_w2_a") != w1a or shape("hada_w2_b") != w1b:
                raise AdapteropsError("LoHa Tucker core and factors do not fit", file=t.path, tensor=mod.keys["hada_t1"])
            return w1a[1] * w1b[1] * t1[2] * t1[3]
        p1 = mm(shape("hada_w1_a"), shape("hada_w1_b"), "w1")
        p2 = mm(shape("hada_w2_a"), shape("hada_w2_b"), "w2")
        if p1 != p2:
            raise AdapteropsError(f"LoHa products differ in shape: {list(p1)} and {list(p2)}", file=t.path, tensor=mod.a_key)
        return math.prod(p1)
    w1 = shape("lokr_w1") if "lokr_w1" in mod.keys else mm(shape("lokr_w1_a"), shape("lokr_w1_b"), "w1")
    if len(w1) != 2:
        raise AdapteropsError(f"LoKr w1 must be 2-D, got {list(w1)}", file=t.path, tensor=mod.a_key)
    if "lokr_w2" in mod.keys:
        w2 = shape("lokr_w2")
    elif "lokr_t2" in mod.keys:
        t2, wa, wb = shape("lokr_t2"), shape("lokr_w2_a"), shape("lokr_w2_b")
        if len(t2) != 4 or len(wa) != 2 or len(wb) != 2 or t2[:2] != (wa[0], wb[0]):
            raise AdapteropsError("LoKr Tucker core and factors do not fit", file=t.path, tensor=mod.keys["lokr_t2"])
        w2 = (wa[1], wb[1], t2[2], t2[3])
    else:
        w2 = mm(shape("lokr_w2_a"), shape("lokr_w2_b"), "w2")
    return math.prod(w1) * math.prod(w2)


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
