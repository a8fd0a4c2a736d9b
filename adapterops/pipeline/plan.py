"""The merge planner: from headers and configs alone, decide what every output tensor will be.

`plan_merge` reads no tensor data. It checks every adapter module against the base (names, shapes, kinds), resolves
scales, tied embeddings and replacements, lays out the output shards, and returns a `MergePlan` that the executor
in `merge.py` carries out tensor by tensor (and that `--dry-run` prints).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adapterops.core.names import INPUT_EMBEDDING_SUFFIXES, OUTPUT_EMBEDDING
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import (
    Adapter,
    LoraModule,
    lora_base_shape,
    multiple_pattern_matches,
)
from adapterops.io.checkpoint import Checkpoint, conv1d_layout
from adapterops.io.renames import resolve as resolve_renamed
from adapterops.io.safetensors_io import TensorSpec
from adapterops.io.tuner_adapter import check_tuner_module
from adapterops.pipeline.params import ParamStep, plan_params
from adapterops.pipeline.token_steps import TokenStep, plan_tokens
from adapterops.pipeline.tuner_steps import TunerStep, prepare_vera, tuner_scale


@dataclass(frozen=True)
class LoraStep:
    """Merge one adapter module into a tensor."""

    adapter: int  # index into the adapters list
    module: LoraModule
    scale: float  # module scale times the user's weight for this adapter
    fan_in_fan_out: bool = False


@dataclass(frozen=True)
class BiasStep:
    """Add one module's `lora_B.bias`, scaled, to a base bias."""

    adapter: int
    module: LoraModule
    scale: float


@dataclass
class TensorPlan:
    """How one output tensor is made: a base tensor (or an adapter's replacement), then merge steps."""

    name: str
    spec: TensorSpec
    source: str | None  # base tensor to read; None when `replacement` provides it
    replacement: tuple[int, str] | None = None  # (adapter index, adapter key)
    steps: list[LoraStep | BiasStep | TunerStep | ParamStep | TokenStep] = field(default_factory=list)
    work_dtype: torch.dtype | None = None  # merge in this dtype, round once to spec.dtype (default: spec.dtype)

    @property
    def changed(self) -> bool:
        """Whether this tensor differs from a plain copy of the base."""
        return self.replacement is not None or bool(self.steps)


@dataclass
class ShardPlan:
    """One output file and the tensors it holds, in order."""

    filename: str
    tensors: list[TensorPlan]

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data in this shard."""
        return sum(t.spec.nbytes for t in self.tensors)


@dataclass
class MergePlan:
    """Everything a merge will write."""

    shards: list[ShardPlan]
    write_index: bool
    index_metadata: dict[str, Any]
    config: dict[str, Any] | None  # the output config.json, when it differs from the base's
    extra_files: list[Path]
    modules_merged: int
    warnings: list[str]

    @property
    def tensors(self) -> list[TensorPlan]:
        """Every output tensor, shard by shard."""
        return [t for s in self.shards for t in s.tensors]

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data in the output."""
        return sum(s.nbytes for s in self.shards)


def _base_name(base_keys: set[str], module: str) -> str | None:
    """The base tensor name for a module's weight, allowing one leading prefix the base lacks (transformer.h.0 vs h.0)."""
    name = f"{module}.weight"
    if name in base_keys:
        return name
    if "." in module and f"{module.split('.', 1)[1]}.weight" in base_keys:
        return f"{module.split('.', 1)[1]}.weight"
    return None


def _renamed_name(ckpt: Checkpoint, base_keys: set[str], name: str, renames: set[str]) -> str | None:
    """A model path's checkpoint key when transformers renamed the module (io/renames.py); records the rule used."""
    found = resolve_renamed(base_keys, ckpt.config, name)
    if found is None or len(found[0]) != 1 or found[0][0].expert is not None:
        return None
    renames.add(found[1])
    return found[0][0].key


def _tied_input_embedding(ckpt: Checkpoint) -> str | None:
    """The input embedding that lm_head is tied to, when the checkpoint stores no lm_head of its own.

    T5 and its kin (BART, Pegasus...) tie lm_head and both stacks' embed_tokens to one `shared` embedding; a
    checkpoint that stores `shared.weight` and no lm_head keeps the tied tensor there."""
    keys = ckpt.keys()
    if OUTPUT_EMBEDDING in keys or (ckpt.config or {}).get("tie_word_embeddings") is False:
        return None
    for shared in ("shared.weight", "model.shared.weight"):
        if shared in keys:
            return shared
    found = [k for k in keys if k.endswith(INPUT_EMBEDDING_SUFFIXES)]
    return found[0] if len(found) == 1 else None


def _is_saved_module(ad: Adapter, name: str) -> bool:
    """Whether a replaced tensor is a `modules_to_save` copy (as the config lists it), not a saved embedding layer."""
    module = name.rpartition(".")[0]
    return any(module == m or module.endswith("." + m) for m in ad.config.get("modules_to_save") or [])


def _fan_in_fan_out(
    a_shape: tuple[int, ...], b_shape: tuple[int, ...], base_shape: tuple[int, ...], module: str, conv1d: bool | None, cfg: bool
) -> bool | None:
    """Whether ΔW must be transposed for this module (a GPT-2 Conv1D), or None when neither layout fits."""
    normal, transposed = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
    fits_n, fits_t = base_shape == normal, base_shape == transposed
    if fits_n and fits_t:  # square: PEFT forces the flag by layer type, which the architecture tells us
        return (conv1d and not module.endswith("lm_head")) if conv1d is not None else cfg
    return fits_t if (fits_n or fits_t) else None


def _check_module(adapter: Adapter, mod: LoraModule, base_shape: tuple[int, ...], base_name: str, conv1d: bool | None) -> bool:
    """Check an adapter module's tensor shapes against its base tensor; returns fan_in_fan_out."""
    t = adapter.tensors
    a_shape, _ = t.shape_dtype(mod.a_key)
    b_shape, _ = t.shape_dtype(mod.b_key)

    def fail(msg: str, key: str) -> AdapteropsError:
        return AdapteropsError(f"{msg}; base tensor '{base_name}' has shape {list(base_shape)}", file=t.path, tensor=key)

    if b_shape[1] != a_shape[0]:
        raise fail(f"lora_B has rank {b_shape[1]} but lora_A has rank {a_shape[0]}", mod.b_key)
    fif = False
    if mod.kind == "linear":
        if len(base_shape) != 2 or len(a_shape) != 2 or len(b_shape) != 2:
            raise fail(f"shape mismatch: lora_A {list(a_shape)}, lora_B {list(b_shape)}", mod.a_key)
        got = _fan_in_fan_out(a_shape, b_shape, base_shape, mod.name, conv1d, adapter.fan_in_fan_out)
        if got is None:
            raise fail(f"shape mismatch: lora_B·lora_A is {[b_shape[0], a_shape[1]]}", mod.a_key)
        fif = got
        out_features = base_shape[1] if fif else base_shape[0]
    elif mod.kind == "embedding":
        if len(base_shape) != 2 or base_shape != (a_shape[1], b_shape[0]):
            raise fail(f"shape mismatch: embedding LoRA (lora_B·lora_A)ᵀ is {[a_shape[1], b_shape[0]]}", mod.a_key)
        out_features = base_shape[1]
    else:
        if len(base_shape) != len(a_shape) or tuple(a_shape[1:]) != tuple(base_shape[1:]) or b_shape[0] != base_shape[0]:
            hint = " (grouped convolutions are not supported)" if len(base_shape) == len(a_shape) else ""
            raise fail(f"shape mismatch: conv lora_A {list(a_shape)}, lora_B {list(b_shape)}{hint}", mod.a_key)
        if any(s != 1 for s in b_shape[2:]):
            raise fail(f"conv lora_B must be a 1×1 kernel, got {list(b_shape)}", mod.b_key)
        out_features = base_shape[0]
    if mod.magnitude_key is not None:
        m_shape, _ = t.shape_dtype(mod.magnitude_key)
        if math.prod(m_shape) != out_features:
            raise fail(f"DoRA magnitude has shape {list(m_shape)}, expected {out_features} values", mod.magnitude_key)
    if mod.bias_key is not None:
        bias_shape, _ = t.shape_dtype(mod.bias_key)
        if bias_shape != (out_features,):
            raise fail(f"lora_B.bias has shape {list(bias_shape)}, expected [{out_features}]", mod.bias_key)
    return fif


def _out_dtype(dtype: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    """The output dtype: --dtype for floating tensors when given, the base dtype otherwise."""
    return target if (target is not None and dtype.is_floating_point) else dtype


def _layout(tensors: list[tuple[TensorPlan, str]], max_shard_size: int | None) -> list[ShardPlan]:
    """Output shards: the base's split (each tensor's base shard), or a fresh split by output size."""
    if max_shard_size is None:
        by_shard: dict[str, list[TensorPlan]] = {}
        for tp, shard in tensors:
            by_shard.setdefault(shard, []).append(tp)
        return [ShardPlan(f, tps) for f, tps in by_shard.items()]
    groups: list[list[TensorPlan]] = [[]]
    size = 0
    for tp, _ in tensors:
        if groups[-1] and size + tp.spec.nbytes > max_shard_size:
            groups.append([])
            size = 0
        groups[-1].append(tp)
        size += tp.spec.nbytes
    n = len(groups)
    if n == 1:
        return [ShardPlan("model.safetensors", groups[0])]
    return [ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def plan_merge(
    ckpt: Checkpoint,
    adapters: list[Adapter],
    weights: list[float] | None = None,
    dtype: torch.dtype | None = None,
    max_shard_size: int | None = None,
    work_dtype: torch.dtype | None = None,
) -> MergePlan:
    """Check the adapters against the base and decide every output tensor (headers only, nothing read or written)."""
    weights = list(weights) if weights is not None else [1.0] * len(adapters)
    if len(weights) != len(adapters):
        raise AdapteropsError(f"{len(weights)} weights given for {len(adapters)} adapters")
    base_keys = set(ckpt.keys())
    cfg = ckpt.config or {}
    conv1d = conv1d_layout(ckpt)
    tied = _tied_input_embedding(ckpt)
    warnings: list[str] = []
    steps: dict[str, list[LoraStep | BiasStep | TunerStep | ParamStep | TokenStep]] = {}
    replacements: dict[str, tuple[int, str]] = {}
    modules_merged = 0
    renames: set[str] = set()
    untied_by: list[tuple[int, str]] = []  # modules_to_save copies of the tied embedding that untie lm_head
    for i, (ad, w) in enumerate(zip(adapters, weights)):
        warnings += [f"{ad.path}: {m}" for m in multiple_pattern_matches(ad)]
        param_steps, rules, consumed = plan_params(ckpt, base_keys, ad, i, w)
        for name, lst in param_steps.items():
            steps.setdefault(name, []).extend(lst)
        modules_merged += len(consumed)
        renames.update(rules)
        for mod in ad.modules.values():
            if mod.name in consumed:
                continue
            target = _base_name(base_keys, mod.name) or _renamed_name(ckpt, base_keys, f"{mod.name}.weight", renames)
            if target is None and mod.name.split(".")[-1] == "lm_head" and tied:
                target = tied
                warnings.append(f"{ad.path}: lm_head is tied to {tied}; its LoRA changes both (as PEFT's merge does)")
            if target is None:
                raise AdapteropsError(f"module {mod.name} is not in the base checkpoint {ckpt.root}", file=ad.tensors.path, tensor=mod.a_key)
            base_shape = lora_base_shape(ckpt, target)  # refuses integer/bool/float8 bases
            fif = _check_module(ad, mod, base_shape, target, conv1d)
            scale = mod.scale * w
            steps.setdefault(target, []).append(LoraStep(i, mod, scale, fif))
            modules_merged += 1
            if mod.bias_key is not None:
                bias_name = target[: -len("weight")] + "bias"
                if bias_name not in base_keys:
                    raise AdapteropsError(f"lora_bias needs a bias but the base has no '{bias_name}'", file=ad.tensors.path, tensor=mod.bias_key)
                steps.setdefault(bias_name, []).append(BiasStep(i, mod, scale))
        vera_dims = []
        for tmod in ad.tuner_modules.values():  # IA3, LoHa, LoKr, VeRA (io/tuner_adapter.py)
            target = _base_name(base_keys, tmod.name)
            if target is None:
                raise AdapteropsError(f"module {tmod.name} is not in the base checkpoint {ckpt.root}", file=ad.tensors.path, tensor=tmod.a_key)
            base_shape = lora_base_shape(ckpt, target)
            layer, fif = check_tuner_module(ad, tmod, base_shape, target, conv1d)
            vera_dims.append((base_shape[1], base_shape[0]) if fif else tuple(base_shape[:2]))
            steps.setdefault(target, []).append(TunerStep(i, tmod, tuner_scale(tmod, w, ad.path), layer, fif))
            modules_merged += 1
            bias_name = target[: -len("weight")] + "bias"
            if tmod.peft_type == "IA3" and not tmod.feedforward and bias_name in base_keys:
                steps.setdefault(bias_name, []).append(TunerStep(i, tmod, 1.0, layer, fif, bias=True))
        prepare_vera(ad, vera_dims)
        for name, lst in plan_tokens(ckpt, base_keys, ad, i, tied, dtype).items():  # trainable tokens
            steps.setdefault(name, []).extend(lst)
            modules_merged += len(lst)
        keep_tied = ad.config.get("ensure_weight_tying") is True
        # the embedding's own copy first: with ensure_weight_tying PEFT saves lm_head's too, the same tied tensor
        for name, key in sorted(ad.replacements.items(), key=lambda kv: kv[0] == OUTPUT_EMBEDDING):
            target = name if name in base_keys else (_base_name(base_keys, name[: -len(".weight")]) if name.endswith(".weight") else None)
            if target is None:
                target = _renamed_name(ckpt, base_keys, name, renames)
            if target is None and name == OUTPUT_EMBEDDING and tied:
                # lm_head.base_layer.weight (PEFT's save_embedding_layers) is the shared tensor itself;
                # a modules_to_save copy of lm_head is a new tensor that unties the embeddings, unless the adapter was
                # made with ensure_weight_tying (PEFT then ties the two copies and the output stays tied).
                target = tied if (".base_layer." in key or keep_tied) else name
            if target is not None and target == tied and not keep_tied and _is_saved_module(ad, name):
                untied_by.append((i, key))
            if target is None:
                raise AdapteropsError(f"replaces '{name}', which is not in the base checkpoint {ckpt.root}", file=ad.tensors.path, tensor=key)
            if target in replacements:
                if replacements[target][0] == i and target == tied:
                    continue  # the embedding and tied lm_head both saved the same shared tensor
                raise AdapteropsError(f"two adapters replace '{target}'", file=ad.tensors.path, tensor=key)
            shape, _ = ad.tensors.shape_dtype(key)
            ref = ckpt.shape_dtype(tied if target == OUTPUT_EMBEDDING and target not in base_keys else target)[0]
            if shape != ref:
                raise AdapteropsError(f"shape {list(shape)} does not match the base's {list(ref)}", file=ad.tensors.path, tensor=key)
            replacements[target] = (i, key)
    for name, lst in steps.items():
        if any(isinstance(st, TokenStep) for st in lst) and (name in replacements or not all(isinstance(st, TokenStep) for st in lst)):
            st = next(st for st in lst if isinstance(st, TokenStep))
            raise AdapteropsError(f"trainable tokens and another adapter change the same tensor '{name}' (PEFT's order for "
                                  "that is not reproduced)", file=adapters[st.adapter].tensors.path, tensor=st.module.key)
    if untied_by and OUTPUT_EMBEDDING not in replacements:
        # A modules_to_save copy of the tied embedding (without ensure_weight_tying) replaces the embedding module
        # only: lm_head keeps the original tensor (and any LoRA of its own), and PEFT's output is untied.
        for lst in list(steps.values()):
            moved = [st for st in lst if st.module.name.split(".")[-1] == "lm_head"]
            for st in moved:
                lst.remove(st)
            steps.setdefault(OUTPUT_EMBEDDING, []).extend(moved)
    # PEFT merges module by module in model order: a tensor's own module first, then lm_head tied onto it.
    for name, lst in steps.items():
        lst.sort(key=lambda st: (_base_name(base_keys, st.module.name) is None, st.adapter))
    warnings += [f"module names mapped to the checkpoint's keys with {r}" for r in sorted(renames)]
    # Output tensor list: base order; an untied lm_head goes at the end of the last shard.
    order = [(k, ckpt.weight_map[k]) for k in ckpt.keys()]
    new_config = None
    if OUTPUT_EMBEDDING in replacements and OUTPUT_EMBEDDING not in base_keys:
        order.append((OUTPUT_EMBEDDING, order[-1][1]))
        new_config = dict(cfg, tie_word_embeddings=False)
        warnings.append("lm_head is replaced by a trained copy: the output unties it from the input embedding")
    elif untied_by and OUTPUT_EMBEDDING not in base_keys:
        order.append((OUTPUT_EMBEDDING, order[-1][1]))
        new_config = dict(cfg, tie_word_embeddings=False)
        warnings.append(f"{adapters[untied_by[0][0]].path}: the tied embedding {tied} is replaced by a modules_to_save copy "
                        "(no ensure_weight_tying): lm_head keeps the original, and the output is untied (as PEFT's)")
    tensors = []
    for name, shard in order:
        rep = replacements.get(name)
        src_name = name if name in base_keys else tied
        shape, base_dtype = ckpt.shape_dtype(src_name)
        spec = TensorSpec(name, _out_dtype(base_dtype, dtype), shape)
        tensors.append((TensorPlan(name, spec, None if rep else src_name, rep, steps.get(name, []), work_dtype), shard))
    shards = _layout(tensors, max_shard_size)
    if dtype is not None and cfg:
        new_config = dict(new_config or cfg)
        key = "torch_dtype" if "torch_dtype" in new_config and "dtype" not in new_config else "dtype"
        new_config[key] = str(dtype).removeprefix("torch.")
    write_index = ckpt.index_path is not None or len(shards) > 1
    meta = {"total_size": sum(s.nbytes for s in shards)}
    if "total_parameters" in ckpt.index_metadata:
        meta["total_parameters"] = sum(math.prod(t.spec.shape) for s in shards for t in s.tensors)
    return MergePlan(shards, write_index, meta, new_config, ckpt.extra_files(), modules_merged, warnings)
