"""PEFT LoRA adapters on disk: `adapter_config.json` plus `adapter_model.safetensors`, parsed into modules.

This reads what PEFT 0.21 writes for LoRA (plain, rsLoRA, DoRA, rank/alpha patterns, fan_in_fan_out, embeddings,
convolutions, `lora_bias`, trained base biases, `modules_to_save`, trainable tokens) and refuses, with a one-line error, what it
cannot merge faithfully.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterops.core.finite import all_finite
from adapterops.core.lora import Kind, lora_base_dtype_problem
from adapterops.core.lowrank import one_thread
from adapterops.core.scaling import (
    MAX_MODULE_NAME,
    MAX_PATTERN_KEYS,
    invalid_pattern,
    lora_scale,
    pattern_index,
    resolve_rank_alpha,
)
from adapterops.errors import AdapteropsError
from adapterops.io.checkpoint import PICKLE_SUFFIXES, TensorSource, open_tensor_file
from adapterops.io.jsonfile import read_json_object
from adapterops.io.paths import safe_file
from adapterops.io.trainable_tokens import (
    TokenModule,
    check_token_config,
    indices_for,
    token_module_name,
)
from adapterops.io.tuner_adapter import (
    check_tuner_config,
    parse_tuner_modules,
    tuner_refusal,
    tuner_type,
)

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# init_lora_weights values that modify the base weights at initialisation: merging into the original base is wrong.
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
UNSUPPORTED_FEATURES = {
    "layer_replication": "layer replication",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QA-LoRA",
    "arrow_config": "Arrow routing",
}
# Prompt-learning methods: no weights change, so neither PEFT nor adapterops can merge them.
PROMPT_LEARNING = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING", "MULTITASK_PROMPT_TUNING", "ADAPTION_PROMPT", "CPT")
LORA_SUFFIXES = (
    ".lora_A.weight",
    ".lora_B.weight",
    ".lora_B.bias",
    ".lora_embedding_A",
    ".lora_embedding_B",
    ".lora_magnitude_vector",
    ".lora_magnitude_vector.weight",
)


@dataclass
class LoraModule:
    """One adapted module: where its factors are, its kind, rank, alpha and scale."""

    name: str  # module path inside the base model, e.g. model.layers.0.self_attn.q_proj
    kind: Kind
    a_key: str
    b_key: str
    r: int
    alpha: float
    scale: float
    bias_key: str | None = None  # lora_B.bias (lora_bias=True)
    magnitude_key: str | None = None  # DoRA

    @property
    def weight_name(self) -> str:
        """The base tensor this module changes."""
        return f"{self.name}.weight"

    @property
    def is_dora(self) -> bool:
        """Whether this module is DoRA."""
        return self.magnitude_key is not None


@dataclass
class ParamModule:
    """A LoRA on a parameter (PEFT's `target_parameters`, `lora.ParamWrapper`), e.g. fused MoE experts.

    PEFT nests one wrapper per targeted parameter of a module, so `name` is the owner module with zero or more
    `.base_layer` suffixes; which of `candidates` (the owner's targeted parameters, model paths) it adapts, the
    number of experts, the rank and the scale are settled against the base by the planner (by shape)."""

    name: str  # adapter module name, e.g. model.layers.0.mlp.experts.base_layer
    owner: str  # model.layers.0.mlp.experts
    candidates: tuple[str, ...]  # model.layers.0.mlp.experts.gate_up_proj, ...down_proj
    a_key: str
    b_key: str
    rows: int  # lora_A rows: r · experts

    def rank_alpha(self, param: str, cfg: dict[str, Any], experts: int) -> tuple[int, float, float]:
        """(r, alpha, scale) for this module adapting `param`: PEFT looks patterns up by the parameter's path."""
        r, alpha = resolve_rank_alpha(param, cfg.get("r", 8), cfg.get("lora_alpha", 8),
                                      cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {})
        return int(r), alpha, lora_scale(int(r), alpha, bool(cfg.get("use_rslora", False)))


def param_candidates(owner: str, targets: list[str]) -> tuple[str, ...]:
    """The owner's parameters that `target_parameters` names (PEFT: `owner.p` equals or ends with `.TARGET`).

    From an index of the targets built once per list: a few dict look-ups per owner, not a pass over every target
    for every module (`target_parameters` has no length limit)."""
    return _candidates(owner, _target_index(tuple(targets)))


def _candidates(owner: str, index: tuple[tuple[str, ...], dict[str, tuple[str, ...]]]) -> tuple[str, ...]:
    plain, by_head = index
    hits = set(plain)
    for i in (-1, *(i for i, c in enumerate(owner) if c == ".")):  # owner and its every dotted suffix
        hits.update(by_head.get(owner[i + 1:], ()))
    return tuple(dict.fromkeys(f"{owner}.{t.rpartition('.')[2]}" for t in sorted(hits)))  # first of each, in order


@functools.lru_cache(maxsize=8)  # stack asks per module and adapter
def _target_index(targets: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, tuple[str, ...]]]:
    """(targets without a dot: they name a parameter of every module; {HEAD: targets HEAD.p}: they name parameter p
    of a module that is HEAD or ends with .HEAD)."""
    by_head: dict[str, list[str]] = {}
    for t in set(targets):
        if "." in t:
            by_head.setdefault(t.rpartition(".")[0], []).append(t)
    return tuple(t for t in set(targets) if "." not in t), {h: tuple(v) for h, v in by_head.items()}


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its config, its tensor file and its parsed modules."""

    path: Path
    config: dict[str, Any]
    tensors: TensorSource
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    unused_patterns: list[str] = field(default_factory=list)  # "rank_pattern key 'x'" entries that match no module
    peft_type: str = "LORA"  # or IA3, LOHA, LOKR, VERA (io/tuner_adapter.py)
    tuner_modules: dict[str, Any] = field(default_factory=dict)  # TunerModule by module name (non-LoRA tuners)
    shared: dict[str, str] = field(default_factory=dict)  # VeRA's shared projections: "vera_A"/"vera_B" -> key
    param_modules: dict[str, ParamModule] = field(default_factory=dict)  # target_parameters (MoE experts)
    token_modules: dict[str, TokenModule] = field(default_factory=dict)  # trainable tokens (io/trainable_tokens.py)

    @property
    def use_rslora(self) -> bool:
        """Whether the adapter scales by α/√r."""
        return bool(self.config.get("use_rslora", False))

    @property
    def fan_in_fan_out(self) -> bool:
        """The config's fan_in_fan_out flag (PEFT forces it per layer type; see the merge planner)."""
        return bool(self.config.get("fan_in_fan_out", False))

    def read(self, key: str) -> torch.Tensor:
        """Read one adapter tensor."""
        return self.tensors.read(key)

    def read_finite(self, key: str) -> torch.Tensor:
        """Read one adapter tensor, refusing NaN and Inf (for commands that compute with it)."""
        t = self.tensors.read(key)
        if not all_finite(t):
            raise AdapteropsError("holds NaN or Inf values", file=self.tensors.path, tensor=key)
        return t

    def untrained_modules(self) -> list[str]:
        """Modules whose lora_B is all zeros (ΔW = 0: PEFT's initialisation, never trained), in module order.

        On one thread: each lora_B is small, and two threads meet at a barrier per tensor, which on a busy machine
        waits for a descheduled thread (154 modules of an r=16 Llama adapter: 0.9 s at load 4 on 2 cores)."""
        with one_thread(torch.device("cpu")):
            return [name for name, mod in [*self.modules.items(), *self.param_modules.items()]
                    if not bool(self.tensors.read(mod.b_key).any())]

    def close(self) -> None:
        """Close the tensor file."""
        self.tensors.close()

    def __enter__(self) -> Adapter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def scale_cause(ad: Adapter, mod: LoraModule, weight: float = 1.0) -> str:
    """The adapter's scale as the config gives it (and the user's weight), for overflow errors."""
    rule = f"α/√r = {mod.alpha:g}/√{mod.r}" if ad.use_rslora else f"α/r = {mod.alpha:g}/{mod.r}"
    times = f" × weight {weight:g}" if weight != 1 else ""
    return f"the adapter's scale {rule} = {mod.scale:g}{times}"


def overflow_error(ad: Adapter, name: str, cause: Exception, mod: LoraModule | None = None,
                   tensor: str | None = None) -> AdapteropsError:
    """The error for a module whose ΔW does not fit the working dtype (`lowrank.NotFinite`), naming a LoRA
    module's scale (`mod`) or the tensor given."""
    why = f"; {scale_cause(ad, mod)}" if mod is not None else ""
    return AdapteropsError(f"the ΔW of module {name}: {cause}{why}", file=ad.path / CONFIG_NAME,
                           tensor=mod.b_key if mod is not None else tensor)


def untrained_warning(zero_b: list[str]) -> str:
    """The warning for modules with an all-zero lora_B (inspect, analyze and merge say it alike)."""
    return f"{len(zero_b)} modules have an all-zero lora_B (untrained: ΔW = 0), e.g. {zero_b[0]}"


MAX_RANK = 2**20  # far above any real LoRA rank (full rank of a 1M-wide layer); 2**40 is a lie
# A parameter name without a dot ("down_proj") is a candidate of every adapted module, so the candidates grow as
# modules × names; real configs name a handful of parameters (an MoE's gate_up_proj and down_proj).
MAX_TARGET_PARAMETERS = 4096
BOOL_FIELDS = ("use_rslora", "use_dora", "fan_in_fan_out", "lora_bias", "inference_mode")


def number_problem(value: object, integer: bool) -> str | None:
    """Why a config value is not a positive finite number (a positive integer up to MAX_RANK for ranks).

    Never raises, whatever the value: integers too large for a float (or for str()) are told by their size."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {json.dumps(value)[:40] if _jsonable(value) else type(value).__name__}, not a number"
    shown = _shown_number(value)
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {shown}, not a finite number"
    if integer and not isinstance(value, int):
        return f"is {shown}, not an integer"
    if value <= 0:
        return f"is {shown}, not positive"
    if integer and value > MAX_RANK:
        return f"is {shown}, over the largest rank adapterops accepts ({MAX_RANK})"
    if value > sys.float_info.max:  # an integer alpha that no float holds: α/r would raise OverflowError
        return f"is {shown}, over the largest number a float holds"
    return None


def _shown_number(value: float) -> str:
    """A config number as an error shows it; a huge integer by its size (str() refuses over 4,300 digits)."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _jsonable(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Refuse adapter types and LoRA features we cannot merge faithfully, and values of the wrong type or range."""
    ptype = cfg.get("peft_type", "LORA")
    if not isinstance(ptype, str):
        raise AdapteropsError(f"peft_type must be a string, got {type(ptype).__name__}", file=cfg_path)
    if ptype.upper() in PROMPT_LEARNING:
        raise AdapteropsError(f"adapter type {ptype} learns virtual tokens or prefixes, not weights: there is nothing to merge "
                              "(PEFT's merge_and_unload cannot merge it either)", file=cfg_path)
    if ptype.upper() not in ("LORA", "TRAINABLE_TOKENS"):
        raise AdapteropsError(f"adapter type {ptype} is not supported (only LoRA, rsLoRA, DoRA, IA3, LoHa, LoKr, VeRA and "
                              "trainable tokens)",
                              file=cfg_path)
    for key, what in UNSUPPORTED_FEATURES.items():
        if cfg.get(key):
            raise AdapteropsError(f"{what} ({key}) is not supported", file=cfg_path)
    check_token_config(cfg, cfg_path)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise AdapteropsError(
            f"init_lora_weights={init!r} changed the base weights at initialisation; convert the adapter to plain "
            "LoRA with PEFT (path_initial_model_for_weight_conversion) before merging",
            file=cfg_path,
        )
    for name in BOOL_FIELDS:
        if name in cfg and cfg[name] is not None and not isinstance(cfg[name], bool):
            raise AdapteropsError(f"{name} must be true or false, got {type(cfg[name]).__name__} {cfg[name]!r:.40}", file=cfg_path)
    for name in ("r", "lora_alpha"):
        if name in cfg:
            why = number_problem(cfg[name], integer=name == "r")
            if why:
                raise AdapteropsError(f"{name} {why}", file=cfg_path)
    for name in ("target_modules", "exclude_modules"):
        tm = cfg.get(name)
        if tm is not None and not isinstance(tm, str) and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
            raise AdapteropsError(f"{name} must be a string (a regex) or a list of module names, got {type(tm).__name__}", file=cfg_path)
    tp = cfg.get("target_parameters")
    if tp is not None and not (isinstance(tp, list) and all(isinstance(t, str) for t in tp)):
        raise AdapteropsError(f"target_parameters must be a list of parameter names, got {type(tp).__name__}", file=cfg_path)
    if tp is not None and len(tp) > MAX_TARGET_PARAMETERS:
        raise AdapteropsError(f"target_parameters has {len(tp)} entries, over the limit of {MAX_TARGET_PARAMETERS}", file=cfg_path)
    for name in ("modules_to_save",):
        v = cfg.get(name)
        if v is not None and not (isinstance(v, list) and all(isinstance(t, str) for t in v)):
            raise AdapteropsError(f"{name} must be a list of module names, got {type(v).__name__}", file=cfg_path)
    if "bias" in cfg and cfg["bias"] not in ("none", "all", "lora_only"):
        raise AdapteropsError(f"bias must be \"none\", \"all\" or \"lora_only\", got {cfg['bias']!r:.40}", file=cfg_path)
    for pat in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(pat)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise AdapteropsError(f"{pat} must be an object, got {type(patterns).__name__}", file=cfg_path)
        if len(patterns) > MAX_PATTERN_KEYS:
            raise AdapteropsError(f"{pat} has {len(patterns)} keys, over the limit of {MAX_PATTERN_KEYS}", file=cfg_path)
        for key, value in patterns.items():
            err = invalid_pattern(key)
            if err:
                shown = key if len(key) <= 80 else key[:60] + f"... ({len(key)} characters)"
                raise AdapteropsError(f"{pat} key {shown!r} is not usable: {err}", file=cfg_path)
            why = number_problem(value, integer=pat == "rank_pattern")
            if why:
                raise AdapteropsError(f"{pat} value for {key!r} {why}", file=cfg_path)


def is_adapter_folder(path: Path) -> bool:
    """Whether a path is a PEFT adapter folder (it has an adapter_config.json entry, whatever that entry is: a FIFO
    or a bad symlink there is then refused as the adapter's config, not mistaken for a checkpoint)."""
    return path.is_dir() and os.path.lexists(path / CONFIG_NAME)


def find_tensor_file(root: Path) -> Path | None:
    """The adapter's weights file, checked by the file rule (io/paths.py): safetensors, else the pickle (which
    open_tensor_file refuses unless allowed); None when the folder has neither."""
    for name in (SAFETENSORS_NAME, PICKLE_NAME):
        if os.path.lexists(root / name):
            return safe_file(root, name)
    return None


def read_adapter_config(root: Path) -> tuple[Path, dict[str, Any]]:
    """The adapter's config file (checked by the file rule) and its parsed contents."""
    cfg_path = root / CONFIG_NAME
    if not os.path.lexists(cfg_path):
        raise AdapteropsError(f"no {CONFIG_NAME} here: not a PEFT adapter", file=root)
    return cfg_path, read_json_object(safe_file(root, CONFIG_NAME))


def _split_key(key: str) -> tuple[str, str] | None:
    """(module name, LoRA suffix) for a LoRA tensor key, None for anything else."""
    for suffix in LORA_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def claim(slots: dict[str, str], slot: str, key: str, what: str, path: Path) -> None:
    """Record that tensor `key` is `slot`; refuse a second tensor for the same slot.

    Several keys can name one thing (with and without PEFT's `base_model.model.` prefix, `X.base_layer.weight` and
    `X.weight`, `lora_magnitude_vector` with and without `.weight`, …); keeping the last one in file order would
    pick one silently, and which one PEFT loads depends on its key mapping, not on the file's order.
    """
    other = slots.get(slot)
    if other is not None:
        raise AdapteropsError(f"this tensor and '{other}' are both {what} (which one applies would depend on the order "
                              "of the file)", file=path, tensor=key)
    slots[slot] = key


MAGNITUDE_SUFFIXES = (".lora_magnitude_vector", ".lora_magnitude_vector.weight")


def _parse_modules(adapter: Adapter, cfg_path: Path, strict_patterns: bool) -> None:
    """Group LoRA tensors by module, resolve each module's rank, alpha and scale, and collect replacements."""
    cfg = adapter.config
    path = adapter.tensors.path
    parts: dict[str, dict[str, str]] = {}
    roles: dict[str, str] = {}  # "module role" -> key, to refuse two keys for one tensor
    all_keys = adapter.tensors.keys()
    key_set = set(all_keys)  # once: _wrapper_duplicate looks keys up for each wrapper tensor
    for key in all_keys:
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        split = _split_key(name)
        if split is None:
            if ".lora_" in name or "." + "hada_" in name or ".lokr_" in name or ".ia3_" in name or ".vera_" in name:
                raise AdapteropsError("this kind of adapter tensor is not supported", file=path, tensor=key)
            token_module = token_module_name(name)
            if token_module is not None:
                claim(roles, f"{token_module} tokens", key, f"the trainable tokens of module {token_module}", path)
                adapter.token_modules[token_module] = TokenModule(token_module, key, indices_for(cfg, token_module, cfg_path))
                continue
            if _wrapper_duplicate(adapter, name, key, key_set):
                continue
            # modules_to_save copies and trained base biases/embeddings replace a base tensor outright
            target = name.replace(".base_layer.", ".")
            claim(adapter.replacements, target, key, f"a replacement for base tensor {target}", path)
            continue
        module, suffix = split
        if len(module) > MAX_MODULE_NAME:
            raise AdapteropsError(f"module name is {len(module)} characters long, over the limit of {MAX_MODULE_NAME}",
                                  file=path, tensor=key[:MAX_MODULE_NAME] + "...")
        role = ".lora_magnitude_vector" if suffix in MAGNITUDE_SUFFIXES else suffix
        claim(roles, f"{module} {role}", key, f"{role.lstrip('.')} of module {module}", path)
        parts.setdefault(module, {})[suffix] = key
    r0 = cfg.get("r", 8)
    alpha0 = cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    targets = cfg.get("target_parameters") or []
    target_index = _target_index(tuple(targets))  # once: every module looks its parameters up in it
    for module, found in parts.items():
        owner = module.replace(".base_layer", "")
        candidates = _candidates(owner, target_index) if targets else ()
        if candidates and ".lora_A.weight" in found and ".lora_B.weight" in found:
            a_shape, _ = adapter.tensors.shape_dtype(found[".lora_A.weight"])
            b_shape, _ = adapter.tensors.shape_dtype(found[".lora_B.weight"])
            if len(a_shape) != 2 or len(b_shape) != 2 or b_shape[1] != a_shape[0]:
                raise AdapteropsError(f"lora_B {list(b_shape)} and lora_A {list(a_shape)} of parameter LoRA {module} "
                                      "do not share a rank", file=adapter.tensors.path, tensor=found[".lora_B.weight"])
            extra = set(found) - {".lora_A.weight", ".lora_B.weight"}
            if extra:
                raise AdapteropsError(f"parameter LoRA {module} has {sorted(extra)[0]}, which PEFT's ParamWrapper never has",
                                      file=adapter.tensors.path, tensor=found[sorted(extra)[0]])
            adapter.param_modules[module] = ParamModule(module, owner, candidates, found[".lora_A.weight"],
                                                        found[".lora_B.weight"], int(a_shape[0]))
            # A short target name ("down_proj") names a parameter of any module; whether this module has it only
            # the base can tell. A module that could also be a plain Linear LoRA stays one too; the planner keeps one.
            if ".base_layer" in module or a_shape[0] != resolve_rank_alpha(module, r0, alpha0, rank_pattern, alpha_pattern)[0]:
                continue
        embedding = ".lora_embedding_A" in found or ".lora_embedding_B" in found
        if embedding and (".lora_A.weight" in found or ".lora_B.weight" in found):
            both = found.get(".lora_A.weight") or found[".lora_B.weight"]
            raise AdapteropsError(f"module {module} has both embedding factors (lora_embedding_A/B) and Linear factors "
                                  "(lora_A/B): one of them would be ignored", file=path, tensor=both)
        a_key = found.get(".lora_embedding_A" if embedding else ".lora_A.weight")
        b_key = found.get(".lora_embedding_B" if embedding else ".lora_B.weight")
        if a_key is None or b_key is None:
            missing = "lora_A" if a_key is None else "lora_B"
            raise AdapteropsError(f"module {module} has no {missing}", file=adapter.tensors.path, tensor=a_key or b_key)
        _check_factors(adapter, module, found)
        a_shape, _ = adapter.tensors.shape_dtype(a_key)
        b_shape, _ = adapter.tensors.shape_dtype(b_key)
        if len(a_shape) >= 3 and len(b_shape) == len(a_shape) and b_shape[1] and a_shape[0] % b_shape[1] == 0 \
                and b_shape[1] != a_shape[0]:  # PEFT's grouped conv: lora_B is [out, r/groups, 1...]
            raise AdapteropsError(
                f"grouped convolutions are not supported: module {module} was made on a conv with groups="
                f"{a_shape[0] // b_shape[1]} (PEFT: \"Merging is not supported for _ConvNd layers with groups > 1!\")",
                file=adapter.tensors.path, tensor=b_key)
        if len(b_shape) < 2 or len(a_shape) < 2 or b_shape[1] != a_shape[0]:
            raise AdapteropsError(f"lora_B {list(b_shape)} and lora_A {list(a_shape)} of module {module} do not share a rank",
                                  file=adapter.tensors.path, tensor=b_key)
        kind: Kind = "embedding" if embedding else ("conv" if len(a_shape) >= 3 else "linear")
        r, alpha = resolve_rank_alpha(module, r0, alpha0, rank_pattern, alpha_pattern)
        if a_shape[0] != r:
            raise AdapteropsError(
                f"lora_A has rank {a_shape[0]} but the config gives module {module} r={r}",
                file=adapter.tensors.path,
                tensor=a_key,
            )
        adapter.modules[module] = LoraModule(
            name=module,
            kind=kind,
            a_key=a_key,
            b_key=b_key,
            r=int(r),
            alpha=alpha,
            scale=lora_scale(int(r), alpha, adapter.use_rslora),
            bias_key=found.get(".lora_B.bias"),
            magnitude_key=next((found[s] for s in MAGNITUDE_SUFFIXES if s in found), None),
        )
    _check_dora(adapter, cfg_path)
    params = [c for pm in adapter.param_modules.values() for c in pm.candidates]
    check_unused_patterns(adapter, cfg_path, [*adapter.modules, *params], strict_patterns)


def check_unused_patterns(adapter: Adapter, cfg_path: Path, modules: list[str], strict_patterns: bool) -> None:
    """Pattern keys that match none of `modules`: an error, or with `strict_patterns=False` listed in
    `adapter.unused_patterns`. Each module is looked up once in the keys' index (modules × keys string operations,
    not one regex per key and module)."""
    for pat in ("rank_pattern", "alpha_pattern"):
        keys = list(adapter.config.get(pat) or {})
        if not keys:
            continue
        index = pattern_index(keys)
        used = {k for m in modules for k in index.matching(m)}
        for key in keys:
            if key not in used:
                if strict_patterns:
                    raise AdapteropsError(f"{pat} key {key!r} matches no module of the adapter", file=cfg_path)
                adapter.unused_patterns.append(f"{pat} key {key!r}")


def _wrapper_duplicate(adapter: Adapter, name: str, key: str, keys: set[str]) -> bool:
    """Whether this is a tensor of a `modules_to_save` wrapper's inner modules that merge_and_unload drops or that
    PEFT also saved under its plain key (`bias="all"` with a modules_to_save classifier saves every bias of the
    model's state dict, wrapper internals included).

    `X.original_module.Y` is the untrained original, which the merge discards. `X.modules_to_save[.adapter].Y` is
    the trained copy, which PEFT also saves as `X.Y` (what adapterops uses); the two must hold the same values.
    """
    for marker in (".original_module.", ".modules_to_save."):
        if marker not in name:
            continue
        head, _, tail = name.partition(marker)
        plain = [f"{head}.{tail}"] + ([f"{head}.{tail.split('.', 1)[1]}"] if "." in tail else [])
        found = [k for c in plain for k in (PREFIX + c, c) if k in keys]
        if not found:
            raise AdapteropsError(f"a tensor of the modules_to_save wrapper of {head} without the trained copy PEFT saves "
                                  f"beside it ({plain[-1]})", file=adapter.tensors.path, tensor=key)
        if marker == ".modules_to_save." and not torch.equal(adapter.read(key), adapter.read(found[0])):
            raise AdapteropsError(f"holds other values than {found[0]}, the same trained tensor of modules_to_save "
                                  f"{head}", file=adapter.tensors.path, tensor=key)
        return True
    return False


FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _check_factors(adapter: Adapter, module: str, found: dict[str, str]) -> None:
    """Every LoRA tensor of a module (factors, bias, DoRA magnitude) must be a non-empty float tensor."""
    for key in found.values():
        check_factor_tensor(adapter.tensors, key, f"LoRA tensor of module {module}", "a LoRA adapter's factors")


def check_factor_tensor(tensors: TensorSource, key: str, what: str, whose: str) -> None:
    """One adapter tensor that takes part in a ΔW (LoRA factors, LoHa/LoKr/VeRA/IA3 tensors) must be non-empty
    floating point.

    An empty dimension (a zero-rank or zero-width factor) has no ΔW to merge, factor or truncate; an integer, bool or
    float8 factor would be silently upcast (or SVD-factored into integers): both are refused here, for every op.
    NaN and Inf are refused where the values are read (`Adapter.read_finite`).
    """
    shape, dtype = tensors.shape_dtype(key)
    if dtype not in FACTOR_DTYPES:
        raise AdapteropsError(f"{what} is {str(dtype).removeprefix('torch.')} (not floating point); {whose} must be "
                              "float32, bfloat16, float16 or float64", file=tensors.path, tensor=key)
    if 0 in shape:
        raise AdapteropsError(f"{what} has shape {list(shape)}, with a zero dimension (an empty factor)",
                              file=tensors.path, tensor=key)


def _check_dora(adapter: Adapter, cfg_path: Path) -> None:
    """use_dora and the magnitude tensors must agree.

    use_dora without magnitudes would merge as plain LoRA, silently wrong. Magnitudes without use_dora: PEFT builds
    no magnitude parameters, drops them on load as unexpected keys and merges plain LoRA, the opposite of what the
    file's tensors say; the adapter contradicts itself, so it is refused too.
    """
    use_dora = adapter.config.get("use_dora") is True
    for mod in adapter.modules.values():
        if use_dora and mod.magnitude_key is None:
            raise AdapteropsError(
                f"{cfg_path.name} sets use_dora but module {mod.name} has no lora_magnitude_vector",
                file=adapter.tensors.path, tensor=mod.a_key,
            )
        if not use_dora and mod.magnitude_key is not None:
            raise AdapteropsError(
                f"DoRA magnitude of module {mod.name} but {cfg_path.name} does not set use_dora (PEFT would drop it "
                "and merge plain LoRA); set use_dora: true or remove the magnitudes",
                file=adapter.tensors.path, tensor=mod.magnitude_key,
            )


def lora_base_shape(ckpt: Any, name: str) -> tuple[int, ...]:
    """The shape of the base tensor a LoRA module merges into, refusing dtypes that cannot take a LoRA."""
    shape, dtype = ckpt.shape_dtype(name)
    problem = lora_base_dtype_problem(dtype)
    if problem:
        raise AdapteropsError(problem, file=ckpt.source(name).path, tensor=name)
    return shape


def open_adapter(path: str | os.PathLike, allow_pickle: bool = False, strict_patterns: bool = True,
                 tuners: bool = False, command: str | None = None, params: bool = False, tokens: bool = False) -> Adapter:
    """Open a PEFT adapter folder: check its config, index its tensors and modules (no tensor data read).

    Pattern keys that match no module are an error, or with `strict_patterns=False` listed in `unused_patterns`.
    IA3, LoHa, LoKr and VeRA adapters are opened (into `tuner_modules`) only with `tuners=True`; otherwise they are
    refused with the reason `command` cannot use them.
    LoRA on parameters (`target_parameters`: MoE experts) is refused unless the caller handles it (`params=True`),
    and so are trainable tokens (`tokens=True`).
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapteropsError("no such adapter folder", file=root)
    cfg_path, cfg = read_adapter_config(root)
    ptype = tuner_type(cfg)
    if ptype is not None and not tuners:
        raise AdapteropsError(tuner_refusal(ptype, command), file=cfg_path)
    if ptype is not None:
        check_tuner_config(cfg, cfg_path, ptype)
    else:
        _check_config(cfg, cfg_path)
    tensor_path = find_tensor_file(root)
    if tensor_path is None:
        raise AdapteropsError(f"no {SAFETENSORS_NAME} here", file=root)
    if tensor_path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        open_tensor_file(tensor_path, allow_pickle)  # raises the pickle refusal
    adapter = Adapter(root, cfg, open_tensor_file(tensor_path, allow_pickle))
    if ptype is not None:
        adapter.peft_type = ptype
        parse_tuner_modules(adapter, cfg_path, ptype, strict_patterns)
    else:
        _parse_modules(adapter, cfg_path, strict_patterns)
        wants_tokens = cfg.get("trainable_token_indices") or str(cfg.get("peft_type", "")).upper() == "TRAINABLE_TOKENS"
        if wants_tokens and not adapter.token_modules:
            adapter.close()
            raise AdapteropsError(f"the config sets trainable tokens but {tensor_path.name} holds no trainable_tokens_delta "
                                  "tensor", file=cfg_path)
    if not (adapter.modules or adapter.tuner_modules or adapter.replacements or adapter.param_modules or adapter.token_modules):
        raise AdapteropsError("adapter holds no LoRA tensors", file=tensor_path)
    if adapter.token_modules and not tokens:
        name = next(iter(adapter.token_modules))
        adapter.close()
        raise AdapteropsError("trainable tokens (trained embedding rows) are only supported by merge and inspect, not by "
                              f"this command (module {name})", file=tensor_path)
    if adapter.param_modules and not params:
        name = next(iter(adapter.param_modules))
        adapter.close()
        raise AdapteropsError("LoRA on parameters (target_parameters, e.g. MoE experts) is only supported by merge, unmerge, "
                              f"inspect, rescale, rerank, stack and analyze, not by this command (module {name})", file=tensor_path)
    return adapter


def multiple_pattern_matches(adapter: Adapter) -> list[str]:
    """Modules that more than one rank/alpha pattern key matches (the first wins; worth a warning)."""
    out = []
    for pat in ("rank_pattern", "alpha_pattern"):
        keys = list(adapter.config.get(pat) or {})
        if not keys:
            continue
        index = pattern_index(keys)
        for module in adapter.modules:
            hits = index.matching(module)
            if len(hits) > 1:
                shown = f"{hits}" if len(hits) <= 8 else f"{hits[:8]} and {len(hits) - 8} more keys"
                out.append(f"{pat}: {module} matches {shown}; {hits[0]!r} wins")
    return out
