"""`inspect`: what a folder holds — a PEFT adapter (LoRA / rsLoRA / DoRA), a GGUF / mlx-lm / torchtune LoRA adapter,
an NF4 checkpoint or a plain one.

Adapters are small, so every tensor is read and checked (NaN/Inf, all-zero lora_B). Checkpoints are described
from their headers alone unless `scan` asks to read every tensor for NaN/Inf.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.core.finite import all_finite
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import (
    find_tensor_file,
    is_adapter_folder,
    multiple_pattern_matches,
    open_adapter,
    read_adapter_config,
    untrained_warning,
)
from adapterops.io.checkpoint import open_checkpoint, open_tensor_file
from adapterops.io.dora_norms import SIDECAR_NAME
from adapterops.io.formats import detect_format
from adapterops.io.hub import resolve
from adapterops.io.nf4_checkpoint import QS_JSON, dequantized_view, is_nf4
from adapterops.io.provenance import read_provenance
from adapterops.io.renames import renamed_modules
from adapterops.io.tuner_adapter import CONVERTIBLE, display, untrained_tuner_modules
from adapterops.pipeline.params import param_layouts
from adapterops.pipeline.stream import prefetched
from adapterops.result import Result


@dataclass
class InspectResult(Result):
    """What a path holds: its kind, a summary, per-module rows (adapters) and warnings."""

    path: str
    kind: str  # "adapter", "gguf-adapter", "mlx-adapter", "torchtune-adapter", "nf4-checkpoint" or "checkpoint"
    summary: dict[str, object]
    modules: list[dict[str, object]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    scanned: int | None = None  # how many tensors were read for NaN/Inf (None: headers only)


def _dtype(d: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16."""
    return str(d).removeprefix("torch.")


def inspect_adapter(path: Path, allow_pickle: bool = False) -> InspectResult:
    """Describe a PEFT adapter: variant, modules, ranks, alphas, scales, dtypes, sizes, and its health."""
    ad = open_adapter(path, allow_pickle, strict_patterns=False, tuners=True, params=True, tokens=True)
    if ad.peft_type != "LORA":
        with ad:
            return _inspect_tuner(path, ad)
    with ad:
        cfg = ad.config
        variant = ["DoRA" if cfg.get("use_dora") else "LoRA"] + (["rsLoRA"] if ad.use_rslora else [])
        if str(cfg.get("peft_type", "")).upper() == "TRAINABLE_TOKENS":
            variant = []
        variant += ["trainable tokens"] if ad.token_modules else []
        rows, dtypes, warnings, nbytes = [], Counter(), [], 0
        module_of_b = {mod.b_key: name for name, mod in ad.modules.items()}
        zero = set()
        for key in ad.tensors.keys():  # every tensor read once: NaN/Inf, and all-zero lora_B
            shape, dtype = ad.tensors.shape_dtype(key)
            dtypes[_dtype(dtype)] += 1
            nbytes += math.prod(shape) * dtype.itemsize
            t = ad.read(key)
            if not all_finite(t):
                warnings.append(f"tensor {key} holds NaN or Inf")
            if key in module_of_b and not bool(t.any()):
                zero.add(module_of_b[key])
        zero_b = [name for name in ad.modules if name in zero]  # in module order
        for name, mod in ad.modules.items():
            (b_shape, _), (a_shape, a_dtype) = ad.tensors.shape_dtype(mod.b_key), ad.tensors.shape_dtype(mod.a_key)
            rows.append({"name": name, "kind": mod.kind, "rank": mod.r, "alpha": mod.alpha, "scale": mod.scale,
                         "dora": mod.is_dora, "lora_bias": mod.bias_key is not None, "shape": [b_shape[0], a_shape[1]],
                         "dtype": _dtype(a_dtype)})
        try:  # which parameter, rank and expert count: from the config's ranks (rows = r·E) where they settle it
            layouts = param_layouts(ad)
        except AdapteropsError:  # ambiguous without the base: only the candidates and r·E are listed
            layouts = {}
        for name, pm in ad.param_modules.items():
            if name in ad.modules:
                continue  # could be a plain LoRA too (a short target name); listed above
            (b_shape, _), (a_shape, a_dtype) = ad.tensors.shape_dtype(pm.b_key), ad.tensors.shape_dtype(pm.a_key)
            lay = layouts.get(name)
            row = {"name": name, "kind": "parameter (target_parameters: MoE experts)",
                   "parameters": list(lay.params if lay else pm.candidates), "rank x experts": pm.rows}
            if lay is not None:
                row.update({"rank": lay.r, "experts": lay.experts, "alpha": lay.alpha, "scale": lay.scale})
            rows.append(dict(row, shape=[b_shape[0], a_shape[1]], dtype=_dtype(a_dtype)))
        for name, tm in ad.token_modules.items():  # trained rows of an embedding (or lm_head), copied in by a merge
            shape, dtype = ad.tensors.shape_dtype(tm.key)
            shown = list(tm.indices[:8]) + (["..."] if len(tm.indices) > 8 else [])
            rows.append({"name": name, "kind": "trainable tokens (embedding rows replaced)", "tokens": len(tm.indices),
                         "token ids": shown, "shape": list(shape), "dtype": _dtype(dtype)})
        if zero_b:
            warnings.append(untrained_warning(zero_b))
        warnings += [f"{p} matches no module" for p in ad.unused_patterns] + multiple_pattern_matches(ad)
        summary = {
            "variant": " + ".join(variant), "peft_version": cfg.get("peft_version"), "base_model": cfg.get("base_model_name_or_path"),
            "task_type": cfg.get("task_type"), "modules": len(ad.modules), "ranks": dict(sorted(Counter(m.r for m in ad.modules.values()).items())),
            "scales": sorted({round(m.scale, 6) for m in ad.modules.values()}), "target_modules": cfg.get("target_modules"),
            "target_parameters": cfg.get("target_parameters"), "parameter_modules": len(ad.param_modules),
            "trainable_tokens": {name: len(tm.indices) for name, tm in ad.token_modules.items()},
            "replaced_tensors": sorted(ad.replacements), "tensors": len(ad.tensors.keys()), "dtypes": dict(dtypes), "bytes": nbytes,
            "file": ad.tensors.path.name, "provenance": read_provenance(path),
        }
    return InspectResult(str(path), "adapter", summary, rows, warnings, scanned=len(ad.tensors.keys()))


def _inspect_tuner(path: Path, ad) -> InspectResult:
    """Describe an IA3, LoHa, LoKr or VeRA adapter: per module its kind, layer shape, rank, alpha, scale and
    tensors; warnings for NaN/Inf and for modules still at PEFT's initialisation (merging them changes nothing)."""
    cfg = ad.config
    dtypes, warnings, nbytes = Counter(), [], 0
    for key in ad.tensors.keys():
        shape, dtype = ad.tensors.shape_dtype(key)
        dtypes[_dtype(dtype)] += 1
        nbytes += math.prod(shape) * dtype.itemsize
        if not all_finite(ad.read(key)):
            warnings.append(f"tensor {key} holds NaN or Inf")
    rows = []
    for name, mod in ad.tuner_modules.items():
        parts = {part: list(ad.tensors.shape_dtype(key)[0]) for part, key in mod.keys.items()}
        row: dict[str, object] = {"name": name, "kind": mod.kind, "parts": parts,
                                  "dtype": _dtype(ad.tensors.shape_dtype(mod.a_key)[1])}
        if mod.peft_type in ("LOHA", "LOKR"):
            row.update(rank=mod.r, alpha=mod.alpha, scale=mod.scale,
                       tucker="hada_t1" in mod.keys or "lokr_t2" in mod.keys)
        elif mod.peft_type == "VERA":
            row.update(rank=mod.r)
        else:
            row.update(feedforward=mod.feedforward)
        rows.append(row)
    idle = untrained_tuner_modules(ad)
    if idle:
        warnings.append(f"{len(idle)} modules are at PEFT's initialisation (merging them changes nothing), e.g. {idle[0]}")
    warnings += [f"{p} matches no module" for p in ad.unused_patterns]
    what = {"IA3": "W' = W ⊙ l (learned vectors scale rows, or input columns of feed-forward modules)",
            "LOHA": "ΔW = (W1a·W1b) ⊙ (W2a·W2b) · α/r (Hadamard product of two low-rank products)",
            "LOKR": "ΔW = (W1 ⊗ W2) · α/r (Kronecker product; either factor may be low-rank)",
            "VERA": "ΔW = (λ_b ⊙ B)(λ_d ⊙ A) with shared random projections A, B"}[ad.peft_type]
    summary = {
        "variant": display(ad.peft_type), "update": what, "peft_version": cfg.get("peft_version"),
        "base_model": cfg.get("base_model_name_or_path"), "task_type": cfg.get("task_type"), "modules": len(ad.tuner_modules),
        "ranks": dict(sorted(Counter(m.r for m in ad.tuner_modules.values() if m.r).items())),
        "scales": sorted({round(m.scale, 6) for m in ad.tuner_modules.values()}), "target_modules": cfg.get("target_modules"),
        "replaced_tensors": sorted(ad.replacements), "tensors": len(ad.tensors.keys()), "dtypes": dict(dtypes), "bytes": nbytes,
        "file": ad.tensors.path.name, "provenance": read_provenance(path),
        "commands": "merge (PEFT's bytes)" + (", rerank (to LoRA)" if ad.peft_type in CONVERTIBLE else ""),
    }
    if ad.peft_type == "VERA":
        summary["projections"] = "saved" if ad.shared else f"regenerated from projection_prng_key={cfg.get('projection_prng_key', 0)}"
    return InspectResult(str(path), "adapter", summary, rows, warnings, scanned=len(ad.tensors.keys()))


def inspect_unusable_adapter(path: Path, problem: AdapteropsError, allow_pickle: bool = False) -> InspectResult:
    """What can still be said of an adapter whose config and tensors disagree (or that we cannot use): its config
    and its tensors, with the problem as a warning. Unreadable files still raise."""
    cfg = read_adapter_config(path)[1]
    tensor_path = find_tensor_file(path)
    if tensor_path is None:
        raise problem
    name = tensor_path.name
    src = open_tensor_file(tensor_path, allow_pickle)  # refuses pickles (unless allowed) and corrupt files with its own one-line error
    with src:
        dtypes = Counter(_dtype(src.shape_dtype(k)[1]) for k in src.keys())
        nbytes = sum(math.prod(src.shape_dtype(k)[0]) * src.shape_dtype(k)[1].itemsize for k in src.keys())
    summary = {"variant": f"{cfg.get('peft_type', '?')}, not usable", "peft_version": cfg.get("peft_version"),
               "r": cfg.get("r"), "lora_alpha": cfg.get("lora_alpha"), "target_modules": cfg.get("target_modules"),
               "tensors": len(src.keys()), "dtypes": dict(dtypes), "bytes": nbytes, "file": name}
    return InspectResult(str(path), "adapter", summary, [], [f"cannot be used: {problem}"])


def inspect_foreign(path: Path, fmt: str, allow_pickle: bool = False) -> InspectResult:
    """Describe a GGUF (llama.cpp), mlx-lm or torchtune LoRA adapter: modules, ranks, scales, what the file says."""
    from adapterops.pipeline.convert_formats import read_foreign

    ad = read_foreign(fmt, path, None, allow_pickle)
    rows, warnings, zero, filled = [], [], [], []
    for name, f in ad.modules.items():
        rows.append({"name": name, "kind": "linear", "rank": f.rank, "scale": f.scale, "dora": False, "lora_bias": False,
                     "shape": [f.b.shape[0], f.a.shape[1]], "dtype": _dtype(f.a.dtype)})
        if not bool(f.b.any()):
            # A and B both zero: a module the format creates in every block, written empty (ΔW = 0), not untrained
            (zero if bool(f.a.any()) else filled).append(name)
        if not (all_finite(f.a) and all_finite(f.b)):
            warnings.append(f"module {name} holds NaN or Inf")
    if zero:
        warnings.append(untrained_warning(zero))
    summary = {"variant": f"LoRA ({fmt})", "format": fmt, "modules": len(ad.modules), "empty_modules": len(filled),
               "ranks": dict(sorted(Counter(f.rank for f in ad.modules.values()).items())),
               "scales": sorted({round(f.scale, 6) for f in ad.modules.values()}), "file": ad.path.name,
               "bytes": ad.path.stat().st_size, **{k: v for k, v in ad.info.items() if k not in ("rank",)}}
    return InspectResult(str(path), f"{fmt}-adapter", summary, rows, warnings, scanned=2 * len(ad.modules))


def inspect_checkpoint(path: Path, scan: bool = False, allow_pickle: bool = False) -> InspectResult:
    """Describe a checkpoint from its headers: files, tensors, parameters, dtypes, config, NF4 details."""
    ckpt = open_checkpoint(path, allow_pickle)
    with ckpt:
        nf4 = is_nf4(ckpt)
        view = dequantized_view(ckpt) if nf4 else ckpt
        dtypes, params, warnings = Counter(), 0, []
        quantized = {k[: -len("." + QS_JSON)] for k in ckpt.keys() if k.endswith("." + QS_JSON)}
        for k in view.keys():
            shape, dtype = view.shape_dtype(k)
            dtypes["nf4" if k in quantized else _dtype(dtype)] += 1
            params += math.prod(shape)
        files = {name: (ckpt.root / name).stat().st_size for name in ckpt.shards}
        cfg = ckpt.config or {}
        summary: dict[str, object] = {
            "model_type": cfg.get("model_type"), "architectures": cfg.get("architectures"), "tensors": len(view.keys()),
            "parameters": params, "dtypes": dict(dtypes), "files": files, "bytes": sum(files.values()),
            "sharded": ckpt.index_path is not None, "tie_word_embeddings": cfg.get("tie_word_embeddings"),
            "dora_norms_sidecar": (ckpt.root / SIDECAR_NAME).is_file(), "provenance": read_provenance(ckpt.root),
            # how adapter module names (the model's paths) map to this checkpoint's keys: transformers 5 renamings
            "module_renames": renamed_modules(view.keys(), cfg),
        }
        if nf4:
            states = [view.source(q).states[q] for q in sorted(quantized)]
            summary["nf4"] = {"quantized_weights": len(quantized), "blocksizes": sorted({s.blocksize for s in states}),
                              "double_quant": sorted({s.double_quant for s in states}),
                              "quantization_config": cfg.get("quantization_config")}
        if scan:
            for name, t in prefetched(view.keys(), view.read):
                if not all_finite(t):
                    warnings.append(f"tensor {name} holds NaN or Inf")
    return InspectResult(str(path), "nf4-checkpoint" if nf4 else "checkpoint", summary, [], warnings,
                         scanned=len(view.keys()) if scan else None)


def inspect(path: str | os.PathLike, *, scan: bool = False, revision: str | None = None,
            allow_pickle: bool = False) -> InspectResult:
    """Inspect a local folder or file, or a Hub repo id: an adapter when it has adapter_config.json. Pickles (.bin
    weights, torchtune's adapter_model.pt) are read only with `allow_pickle` (torch.load(weights_only=True)).

    Example::

        adapterops.inspect("./my-lora").summary["variant"]
    """
    local = resolve(str(path), revision)
    fmt = detect_format(local)
    if fmt in ("gguf", "mlx", "torchtune"):
        return inspect_foreign(local, fmt, allow_pickle)
    if is_adapter_folder(local):
        try:
            return inspect_adapter(local, allow_pickle)
        except AdapteropsError as exc:  # say what the folder holds, and why no command will take it
            return inspect_unusable_adapter(local, exc, allow_pickle)
    if not local.exists():
        raise AdapteropsError("no such file or folder", file=local)
    return inspect_checkpoint(local, scan, allow_pickle)
