"""PEFT LoRA adapters on disk: `adapter_config.json` plus `adapter_model.safetensors`, parsed into modules.

This reads what PEFT 0.21 writes for LoRA (plain, rsLoRA, DoRA, rank/alpha patterns, fan_in_fan_out, embeddings,
convolutions, `lora_bias`, trained base biases, `modules_to_save`) and refuses, with a one-line error, what it
cannot merge faithfully.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterops.core.lora import Kind
from adapterops.core.scaling import first_matching_key, invalid_pattern, lora_scale, pattern_matches, resolve_rank_alpha
from adapterops.core.finite import all_finite
from adapterops.errors import AdapteropsError
from adapterops.io.checkpoint import PICKLE_SUFFIXES, TensorSource, open_tensor_file
from adapterops.io.jsonfile import read_json_object
from adapterops.io.paths import safe_file

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
PICKLE_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# init_lora_weights values that modify the base weights at initialisation: merging into the original base is wrong.
MUTATING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
UNSUPPORTED_FEATURES = {
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on parameters (target_parameters)",
    "trainable_token_indices": "trainable tokens",
    "alora_invocation_tokens": "aLoRA",
    "use_qalora": "QA-LoRA",
    "arrow_config": "Arrow routing",
}
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
class Adapter:
    """A PEFT LoRA adapter: its config, its tensor file and its parsed modules."""

    path: Path
    config: dict[str, Any]
    tensors: TensorSource
    modules: dict[str, LoraModule] = field(default_factory=dict)
    replacements: dict[str, str] = field(default_factory=dict)  # base tensor name -> adapter key
    unused_patterns: list[str] = field(default_factory=list)  # "rank_pattern key 'x'" entries that match no module

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

    def close(self) -> None:
        """Close the tensor file."""
        self.tensors.close()


def _check_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """Refuse adapter types and LoRA features we cannot merge faithfully."""
    ptype = cfg.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise AdapteropsError(f"adapter type {ptype} is not supported (only LoRA, rsLoRA and DoRA)", file=cfg_path)
    for key, what in UNSUPPORTED_FEATURES.items():
        if cfg.get(key):
            raise AdapteropsError(f"{what} ({key}) is not supported", file=cfg_path)
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(MUTATING_INITS):
        raise AdapteropsError(
            f"init_lora_weights={init!r} changed the base weights at initialisation; convert the adapter to plain "
            "LoRA with PEFT (path_initial_model_for_weight_conversion) before merging",
            file=cfg_path,
        )
    for name in ("r", "lora_alpha"):
        if name in cfg and (not isinstance(cfg[name], (int, float)) or isinstance(cfg[name], bool) or cfg[name] <= 0):
            raise AdapteropsError(f"{name} must be a positive number, got {cfg[name]!r}", file=cfg_path)
    for pat in ("rank_pattern", "alpha_pattern"):
        patterns = cfg.get(pat) or {}
        if not isinstance(patterns, dict):
            raise AdapteropsError(f"{pat} must be an object", file=cfg_path)
        for key, value in patterns.items():
            err = invalid_pattern(key)
            if err:
                raise AdapteropsError(f"{pat} key {key!r} is not a valid regular expression ({err})", file=cfg_path)
            if not isinstance(value, (int, float)) or value <= 0:
                raise AdapteropsError(f"{pat} value for {key!r} must be a positive number", file=cfg_path)


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


def _parse_modules(adapter: Adapter, cfg_path: Path, strict_patterns: bool) -> None:
    """Group LoRA tensors by module, resolve each module's rank, alpha and scale, and collect replacements."""
    cfg = adapter.config
    parts: dict[str, dict[str, str]] = {}
    for key in adapter.tensors.keys():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        split = _split_key(name)
        if split is None:
            if ".lora_" in name or "." + "hada_" in name or ".lokr_" in name or ".ia3_" in name or ".vera_" in name:
                raise AdapteropsError("this kind of adapter tensor is not supported", file=adapter.tensors.path, tensor=key)
            if ".token_adapter." in name:
                raise AdapteropsError("trainable tokens are not supported", file=adapter.tensors.path, tensor=key)
            # modules_to_save copies and trained base biases/embeddings replace a base tensor outright
            adapter.replacements[name.replace(".base_layer.", ".")] = key
            continue
        module, suffix = split
        parts.setdefault(module, {})[suffix] = key
    r0 = cfg.get("r", 8)
    alpha0 = cfg.get("lora_alpha", 8)
    rank_pattern = cfg.get("rank_pattern") or {}
    alpha_pattern = cfg.get("alpha_pattern") or {}
    for module, found in parts.items():
        embedding = ".lora_embedding_A" in found or ".lora_embedding_B" in found
        a_key = found.get(".lora_embedding_A" if embedding else ".lora_A.weight")
        b_key = found.get(".lora_embedding_B" if embedding else ".lora_B.weight")
        if a_key is None or b_key is None:
            missing = "lora_A" if a_key is None else "lora_B"
            raise AdapteropsError(f"module {module} has no {missing}", file=adapter.tensors.path, tensor=a_key or b_key)
        a_shape, _ = adapter.tensors.shape_dtype(a_key)
        b_shape, _ = adapter.tensors.shape_dtype(b_key)
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
            magnitude_key=found.get(".lora_magnitude_vector") or found.get(".lora_magnitude_vector.weight"),
        )
    for pat in ("rank_pattern", "alpha_pattern"):
        for key in cfg.get(pat) or {}:
            if not any(pattern_matches(key, m) for m in adapter.modules):
                if strict_patterns:
                    raise AdapteropsError(f"{pat} key {key!r} matches no module of the adapter", file=cfg_path)
                adapter.unused_patterns.append(f"{pat} key {key!r}")


def open_adapter(path: str | os.PathLike, allow_pickle: bool = False, strict_patterns: bool = True) -> Adapter:
    """Open a PEFT adapter folder: check its config, index its tensors and modules (no tensor data read).

    Pattern keys that match no module are an error, or with `strict_patterns=False` listed in `unused_patterns`.
    """
    root = Path(path)
    if not root.is_dir():
        raise AdapteropsError("no such adapter folder", file=root)
    cfg_path, cfg = read_adapter_config(root)
    _check_config(cfg, cfg_path)
    tensor_path = find_tensor_file(root)
    if tensor_path is None:
        raise AdapteropsError(f"no {SAFETENSORS_NAME} here", file=root)
    if tensor_path.suffix in PICKLE_SUFFIXES and not allow_pickle:
        open_tensor_file(tensor_path, allow_pickle)  # raises the pickle refusal
    adapter = Adapter(root, cfg, open_tensor_file(tensor_path, allow_pickle))
    _parse_modules(adapter, cfg_path, strict_patterns)
    if not adapter.modules and not adapter.replacements:
        raise AdapteropsError("adapter holds no LoRA tensors", file=tensor_path)
    return adapter


def multiple_pattern_matches(adapter: Adapter) -> list[str]:
    """Modules that more than one rank/alpha pattern key matches (the first wins; worth a warning)."""
    out = []
    for pat in ("rank_pattern", "alpha_pattern"):
        keys = list(adapter.config.get(pat) or {})
        for module in adapter.modules:
            hits = [k for k in keys if pattern_matches(k, module)]
            if len(hits) > 1:
                out.append(f"{pat}: {module} matches {hits}; {first_matching_key(keys, module)!r} wins")
    return out
