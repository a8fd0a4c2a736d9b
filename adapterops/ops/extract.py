"""`extract`: a LoRA adapter from the difference of a fine-tuned and a base checkpoint, module by module, streaming.

For each chosen weight, ΔW = W_tuned − W_base (float32) and its best rank-r approximation by a seeded randomized
SVD (exact SVD when r is a large share of the matrix's rank) give B = U·√S, A = √S·Vᵀ (or S in B with `split="b"`,
as PEFT's convert_to_lora does). Only one pair of tensors and one ΔW are in memory at a time.
"""

from __future__ import annotations

import math
import os
import re
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from adapterops.core.finite import all_finite
from adapterops.core.lowrank import factors, sum_squares, top_svd, top_svd_for_energy
from adapterops.core.names import (
    OUTPUT_EMBEDDING,
    is_input_embedding,
    is_linear_weight,
    name_matches,
)
from adapterops.errors import AdapteropsError
from adapterops.io.adapter_writer import unit_scale_ranks, write_adapter
from adapterops.io.atomic import check_output
from adapterops.io.checkpoint import Checkpoint, conv1d_layout, open_checkpoint
from adapterops.io.hub import resolve
from adapterops.io.nf4_checkpoint import is_nf4
from adapterops.pipeline.options import (
    cast_checked,
    check_count,
    check_name_patterns,
    check_number,
    parse_dtype,
    pick_device,
)
from adapterops.pipeline.stream import prefetched, progress
from adapterops.pipeline.threads import compute_threads
from adapterops.result import Result


@dataclass
class ExtractResult(Result):
    """What an extract did: ranks and the share of ‖ΔW‖_F kept, per module and in total."""

    output: str
    modules: dict[str, dict[str, float]]
    retained_fro: float
    unchanged: int  # chosen weights that are identical in both checkpoints (no module written)
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Target:
    """One weight to extract: its module name and the LoRA layer PEFT would put there."""

    name: str  # checkpoint tensor name (…weight)
    module: str
    kind: Literal["linear", "embedding"]
    transposed: bool  # ΔW is stored (in, out): GPT-2 Conv1D, or an embedding (vocab, dim)


def choose_targets(base: Checkpoint, tuned: Checkpoint, patterns: list[str], embeddings: bool) -> list[Target]:
    """The weights to extract (Linear projections, plus embeddings and lm_head when asked).

    Checks every chosen weight against the tuned checkpoint (present, same shape). With `patterns`, only modules
    matching one of them (name, suffix or regex) are chosen.
    """
    conv1d = conv1d_layout(base)
    tuned_keys = set(tuned.keys())
    targets = []
    for name in base.keys():
        shape, dtype = base.shape_dtype(name)
        module = name[: -len(".weight")]
        embedding = is_input_embedding(name) and len(shape) == 2
        linear = is_linear_weight(name, shape, dtype) or (name == OUTPUT_EMBEDDING and len(shape) == 2)
        if not (linear or embedding) or ((embedding or name == OUTPUT_EMBEDDING) and not embeddings):
            continue
        if patterns and not any(name_matches(p, module) for p in patterns):
            continue
        if name not in tuned_keys:
            raise AdapteropsError(f"is not in the fine-tuned checkpoint {tuned.root}", file=base.root, tensor=name)
        t_shape, _ = tuned.shape_dtype(name)
        if t_shape != shape:
            raise AdapteropsError(f"shape {list(t_shape)} in the fine-tuned checkpoint, {list(shape)} in the base {base.root}",
                                  file=tuned.root, tensor=name)
        transposed = embedding or (conv1d and name != OUTPUT_EMBEDDING)
        targets.append(Target(name, module, "embedding" if embedding else "linear", transposed))
    if patterns:
        for p in patterns:
            if not any(name_matches(p, t.module) for t in targets):
                raise AdapteropsError(f"--target {p!r} matches no Linear module of the base checkpoint", file=base.root)
    if not targets:
        raise AdapteropsError("has no Linear projection weights to extract", file=base.root)
    return targets


def peft_keys(t: Target) -> tuple[str, str]:
    """The adapter keys (A, B) PEFT uses for this module."""
    prefix = f"base_model.model.{t.module}"
    if t.kind == "embedding":
        return f"{prefix}.lora_embedding_A", f"{prefix}.lora_embedding_B"
    return f"{prefix}.lora_A.weight", f"{prefix}.lora_B.weight"


def target_modules(targets: list[Target], base_keys: list[str]) -> list[str] | str:
    """PEFT's target_modules: the leaf names when they pick exactly these modules in the base, else an exact regex."""
    chosen = {t.module for t in targets}
    leaves = {m.rsplit(".", 1)[-1] for m in chosen}
    picked = {k[: -len(".weight")] for k in base_keys if k.endswith(".weight") and k[: -len(".weight")].rsplit(".", 1)[-1] in leaves}
    if picked == chosen:
        return sorted(leaves)
    return "^(?:" + "|".join(re.escape(m) for m in sorted(chosen)) + ")$"


def adapter_config(targets: list[Target], ranks: dict[str, int], base: Checkpoint, base_ref: str) -> dict[str, object]:
    """The adapter_config.json of the extracted adapter (scale 1 everywhere: α = r, per-module patterns)."""
    archs = (base.config or {}).get("architectures")  # a list of strings (io/checkpoint.py checks config.json)
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    return {
        "peft_type": "LORA", "base_model_name_or_path": base_ref, "task_type": "CAUSAL_LM" if arch.endswith("ForCausalLM") else None,
        "target_modules": target_modules(targets, base.keys()), "fan_in_fan_out": conv1d_layout(base), "bias": "none", "lora_dropout": 0.0,
        "use_dora": False, "inference_mode": True, "init_lora_weights": True, "modules_to_save": None,
        **unit_scale_ranks(ranks),
    }


def extract(
    base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, *, rank: int | None = None,
    energy: float | None = None, max_rank: int | None = None, target: list[str] | None = None, embeddings: bool = False,
    split: Literal["balanced", "b"] = "balanced", dtype: str = "float32", precision: Literal["float32", "float64"] = "float32",
    device: str = "cpu", revision: str | None = None,
    force: bool = False, allow_pickle: bool = False, quiet: bool = True,
) -> ExtractResult:
    """Write a PEFT LoRA adapter that approximates TUNED − BASE at a fixed rank or a retained-energy share.

    Example::

        adapterops.extract("./llama", "./llama-sft", "./sft-lora", energy=0.9, max_rank=256)
    """
    start = time.perf_counter()
    if (rank is None) == (energy is None):
        raise AdapteropsError("give exactly one of --rank or --energy")
    check_count("rank", rank), check_count("max_rank", max_rank)
    target = check_name_patterns("--target", target)
    check_number("energy", energy, lo=0, hi=1, lo_open=True)
    out_dtype, dev = parse_dtype(dtype), pick_device(device)
    base_path, tuned_path = resolve(str(base), revision), resolve(str(tuned))
    out = Path(out)
    check_output(out, [base_path, tuned_path], force)
    with ExitStack() as stack:
        b_ckpt = stack.enter_context(open_checkpoint(base_path, allow_pickle))
        t_ckpt = stack.enter_context(open_checkpoint(tuned_path, allow_pickle))
        for ck in (b_ckpt, t_ckpt):
            if is_nf4(ck):
                raise AdapteropsError("is an NF4 checkpoint: dequantize it first (adapterops dequantize)", file=ck.root)
        targets = choose_targets(b_ckpt, t_ckpt, target or [], embeddings)
        warnings: list[str] = []
        tensors: dict[str, torch.Tensor] = {}
        report: dict[str, dict[str, float]] = {}
        ranks: dict[str, int] = {}
        kept_sq = total_sq = 0.0
        unchanged = 0
        deltas = prefetched(targets, lambda t: _delta(t_ckpt, b_ckpt, t.name))
        # the reader thread reads and subtracts the next ΔW meanwhile: leave it a core (on 2 busy cores, the
        # sketch's products ran 3.5× faster on one thread than on two)
        stack.enter_context(compute_threads(dev))
        for t, (delta, total) in progress(deltas, total=len(targets), unit="module", desc="extract", quiet=quiet):
            if total is None:
                raise AdapteropsError(f"holds NaN or Inf values here or in {base_path}", file=tuned_path, tensor=t.name)
            if total == 0.0:
                unchanged += 1
                continue
            delta = delta.to(dev)
            m = delta.T if t.transposed else delta  # the (out, in) matrix PEFT factors as B·A
            m = m.double() if precision == "float64" else m
            # tol: stop the subspace iteration once it stops paying (one iteration where σ_r+1 ≪ σ_r, as in a fine-tune's ΔW)
            svd = top_svd(m, min(rank, *m.shape), tol=1e-3) if rank is not None else top_svd_for_energy(m, energy, max_rank)
            new_b, new_a = factors(svd, svd.S.numel(), split)
            a_key, b_key = peft_keys(t)
            tensors[a_key] = cast_checked(new_a, out_dtype, file=tuned_path, tensor=t.name).contiguous()
            tensors[b_key] = cast_checked(new_b, out_dtype, file=tuned_path, tensor=t.name).contiguous()
            kept = float((svd.S.double() ** 2).sum())
            kept_sq, total_sq = kept_sq + kept, total_sq + total
            ranks[t.module] = svd.S.numel()
            report[t.module] = {"rank": svd.S.numel(), "retained_fro": min(1.0, math.sqrt(kept / total))}
        if not ranks:
            raise AdapteropsError(f"every chosen weight is identical in {base_path}: nothing to extract", file=tuned_path)
        chosen = {t.name for t in targets}
        others = [k for k in t_ckpt.keys() if k in b_ckpt.weight_map and k not in chosen and _differs(b_ckpt, t_ckpt, k)]
        if others:
            warnings.append(f"{len(others)} other tensors differ and are not in the adapter (e.g. {others[0]}); "
                            "--embeddings or --target may cover some")
        write_adapter(out, tensors, adapter_config([t for t in targets if t.module in ranks], ranks, b_ckpt, str(base)), force=force)
    retained = min(1.0, math.sqrt(kept_sq / total_sq)) if total_sq else 1.0
    return ExtractResult(str(out), report, retained, unchanged, round(time.perf_counter() - start, 3), warnings)


def _delta(tuned: Checkpoint, base: Checkpoint, name: str) -> tuple[torch.Tensor, float | None]:
    """(ΔW = tuned − base in float32, ‖ΔW‖_F²), the square None when ΔW holds NaN or Inf.

    One float32 copy subtracted in place, and one pass for the sum of squares (~1e-7 relative) that also tells
    finiteness and whether ΔW is zero; the exact checks run only when it says inf/NaN or 0.
    """
    delta = tuned.read(name).to(torch.float32, copy=True)
    delta.sub_(base.read(name))
    total = sum_squares(delta)
    if not math.isfinite(total):
        if not all_finite(delta):
            return delta, None
        total = float(delta.double().pow(2).sum())  # only a float32 partial sum overflowed
    elif total == 0.0 and bool(delta.any()):  # squares below float32's range
        total = float(delta.double().pow(2).sum())
    return delta, total


def _differs(a: Checkpoint, b: Checkpoint, name: str) -> bool:
    """Whether one tensor differs in value between two checkpoints (a float tensor only recast does not)."""
    (sa, da), (sb, db) = a.shape_dtype(name), b.shape_dtype(name)
    if sa != sb:
        return True
    x, y = a.read(name), b.read(name)
    if da != db and da.is_floating_point and db.is_floating_point:
        x, y = x.double(), y.double()
    return not torch.equal(x, y)
