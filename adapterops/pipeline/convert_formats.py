"""Converting LoRA adapters between PEFT and other ecosystems' formats: GGUF (llama.cpp), mlx-lm and torchtune.

Every route goes through one shape, `Factors` per transformers module (io/formats): the source is read into it
(PEFT's per-module scales, rank and alpha patterns and rsLoRA resolved; a foreign format's q/k row order undone),
then the target's limits are met without changing ΔW:

- one scale for all modules (GGUF's single alpha, mlx-lm's scale, torchtune's α/r): kept when it reproduces every
  module's scale exactly, otherwise each module's scale is folded into lora_B (float32) and the target's scale is 1;
- one rank (mlx-lm, torchtune): lower ranks are zero-padded, which leaves ΔW unchanged;
- the same modules in every block (mlx-lm's `keys`, torchtune's builders): modules the target creates but the
  adapter lacks are written with zero factors;
- q/k row order: permuted as the target permutes the base weights.

What no target can hold (DoRA magnitudes, `modules_to_save`, trained biases, `lora_bias`, embedding or conv LoRA)
is refused with the reason, or with `allow_lossy` (and the base model) converted through an exact merge: ΔW of the
merged module minus the base, truncated to the module's rank by SVD, with the relative error reported per module.
"""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.core.lora import delta_weight, merge_dora
from adapterops.core.lowrank import top_svd
from adapterops.core.scaling import alpha_for, lora_scale
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import PREFIX, open_adapter
from adapterops.io.adapter_writer import exact_key
from adapterops.io.atomic import atomic_dir, atomic_file, check_output
from adapterops.io.formats import (
    BLOCK_LINEARS,
    FORMATS,
    TOP_LINEARS,
    ArchInfo,
    Factors,
    FormatAdapter,
    arch_info,
    check_factors,
    detect_format,
    split_module,
)
from adapterops.io.hub import resolve
from adapterops.io.jsonfile import read_json_object
from adapterops.result import Result

MLX_ARCHS = ("llama", "mistral", "qwen2", "qwen3")  # mlx-lm names these models' modules as transformers does


@dataclass
class FormatConversion(Result):
    """What a format conversion did (the convert command's --json summary).

    `exact` is true when every module's ΔW in the output equals the input's with no rounding at all (no scale
    folded into lora_B, nothing re-extracted or dropped); `folded` when per-module scales went into lora_B.
    """

    source: str
    output: str
    from_format: str
    to_format: str
    architecture: str | None
    rank: int | None  # the output's one rank (mlx, torchtune), None where each module keeps its own
    scale: float | None  # mlx-lm's scale, torchtune's α/r, GGUF's alpha (0: scales folded), None for PEFT
    folded: bool
    exact: bool
    modules: list[dict[str, object]] = field(default_factory=list)
    lossy: dict[str, float] = field(default_factory=dict)  # module → relative Frobenius error of the re-extraction
    dropped: list[str] = field(default_factory=list)
    filled: int = 0  # modules written with zero factors because the target creates them in every block
    warnings: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ---------------------------------------------------------------------------------------------------- reading


def _checkpoint_weight(base: Path | None, name: str, why: str) -> torch.Tensor:
    """One float32 base weight (lm_head falls back to the tied embedding)."""
    from adapterops.io.checkpoint import open_checkpoint

    if base is None:
        raise AdapteropsError(f"{why} needs the base model (base=/--base) for the merge and re-extraction")
    with open_checkpoint(base) as ckpt:
        keys = set(ckpt.keys())
        if name not in keys and name == "lm_head.weight" and "model.embed_tokens.weight" in keys:
            name = "model.embed_tokens.weight"
        if name not in keys:
            raise AdapteropsError("the base has no such tensor", file=base, tensor=name)
        return ckpt.read(name).float().clone()


def _same_as_base(base: Path, name: str, tensor: torch.Tensor) -> bool:
    """Whether an adapter's replacement tensor is the base's own tensor, bit for bit (nothing to convert)."""
    from adapterops.io.checkpoint import open_checkpoint

    with open_checkpoint(base) as ckpt:
        if name not in set(ckpt.keys()):
            return False
        own = ckpt.read(name)
        return own.dtype == tensor.dtype and own.shape == tensor.shape and torch.equal(own, tensor)


def _svd_factors(delta: torch.Tensor, rank: int) -> tuple[Factors, float]:
    """Rank-`rank` factors of a dense ΔW (scale 1) and the relative Frobenius error of that truncation."""
    svd = top_svd(delta, min(rank, *delta.shape))
    b, a = svd.U * svd.S, svd.V.T.contiguous()
    total = float(delta.norm())
    err = float((delta - b @ a).norm()) / total if total else 0.0
    return Factors(a, b.contiguous(), 1.0), err


def _read_peft(path: Path, to: str, base: Path | None, allow_lossy: bool,
               report: FormatConversion, allow_pickle: bool = False) -> dict[str, Factors]:
    """A PEFT adapter's Linear modules as Factors, refusing (or, with allow_lossy, re-extracting) what `to` cannot hold."""
    lossy_hint = " (allow_lossy with the base converts it through a merge and a truncated SVD)"
    with open_adapter(path, allow_pickle) as ad:
        if ad.fan_in_fan_out:
            raise AdapteropsError(f"fan_in_fan_out (Conv1D) adapters cannot be converted to {to}", file=path)
        modules: dict[str, Factors] = {}
        for name, mod in ad.modules.items():
            if mod.kind != "linear":
                raise AdapteropsError(f"{mod.kind} LoRA on module {name}: {to} conversion supports Linear modules only",
                                      file=ad.tensors.path, tensor=mod.a_key)
            a, b = ad.read_finite(mod.a_key), ad.read_finite(mod.b_key)
            if mod.is_dora:
                if not allow_lossy:
                    raise AdapteropsError(f"DoRA module {name}: {to} has no magnitude vectors{lossy_hint}",
                                          file=ad.tensors.path, tensor=mod.magnitude_key)
                w = _checkpoint_weight(base, f"{name}.weight", "DoRA")
                delta = delta_weight("linear", a, b, mod.scale)
                merged, _ = merge_dora(w, delta, ad.read_finite(mod.magnitude_key).float().reshape(-1), "linear")
                modules[name], report.lossy[name] = _svd_factors(merged - w, mod.r)
                continue
            if mod.bias_key is not None:
                if not allow_lossy:
                    raise AdapteropsError(f"lora_bias of module {name}: {to} has no lora_B bias{lossy_hint}",
                                          file=ad.tensors.path, tensor=mod.bias_key)
                report.dropped.append(f"{name}.lora_B.bias (norm {float(ad.read(mod.bias_key).float().norm() * mod.scale):.4g})")
            # the rule foreign sources pass too: a target's alpha (scale · r) and a folded lora_B must fit float32
            check_factors(name, a, b, mod.scale, ad.path / "adapter_config.json", (mod.a_key, mod.b_key))
            modules[name] = Factors(a, b, mod.scale)
        for target, key in ad.replacements.items():
            if base is not None and _same_as_base(base, target, ad.read(key)):
                report.warnings.append(f"{key} is the base's own {target} (PEFT's save_embedding_layers): not converted")
                continue
            what = f"{target} (modules_to_save or a trained bias) replaces a base tensor, which {to} cannot hold"
            if not allow_lossy:
                raise AdapteropsError(f"{what}{lossy_hint}", file=ad.tensors.path, tensor=key)
            module = target.removesuffix(".weight")
            leaf = split_module(module)[1]
            new = ad.read_finite(key).float()
            if target.endswith(".weight") and new.dim() == 2 and (leaf in BLOCK_LINEARS or leaf in TOP_LINEARS):
                if module in modules:
                    raise AdapteropsError(f"module {module} has both LoRA factors and a replaced weight", file=path)
                w = _checkpoint_weight(base, target, "modules_to_save")
                rank = max([m.r for m in ad.modules.values()] or [ad.config.get("r", 8)])
                modules[module], report.lossy[module] = _svd_factors(new - w, rank)
            else:
                report.dropped.append(f"{target} (replaced tensor, no LoRA form)")
    return modules


def read_foreign(fmt: str, path: Path, arch: ArchInfo | None, allow_pickle: bool = False) -> FormatAdapter:
    """Read a GGUF, mlx-lm or torchtune adapter (q/k rows restored to transformers' order when `arch` is given);
    a pickle (torchtune's adapter_model.pt) only with `allow_pickle`."""
    if fmt == "gguf":
        from adapterops.io.formats.gguf import gguf_file, read_gguf

        return read_gguf(gguf_file(path), arch)
    if fmt == "mlx":
        from adapterops.io.formats.mlx import read_mlx

        return read_mlx(path)
    from adapterops.io.formats.torchtune import read_torchtune

    return read_torchtune(path, arch, allow_pickle)


# ---------------------------------------------------------------------------------------------------- planning


def _one_scale(modules: dict[str, Factors]) -> bool:
    """Whether every module has the same rank and scale."""
    return len({(f.rank, f.scale) for f in modules.values()}) <= 1


def _fold(f: Factors) -> Factors:
    """The scale folded into lora_B (float32, as PEFT computes): the same ΔW, scale 1."""
    return Factors(f.a.float(), f.b.float() * f.scale, 1.0)


def _pad(f: Factors, rank: int) -> Factors:
    """Zero rows of A and columns of B up to `rank`: ΔW unchanged."""
    extra = rank - f.rank
    if extra == 0:
        return f
    return Factors(torch.cat([f.a, f.a.new_zeros(extra, f.a.shape[1])]), torch.cat([f.b, f.b.new_zeros(f.b.shape[0], extra)], 1), f.scale)


def _uniform(modules: dict[str, Factors], report: FormatConversion) -> tuple[dict[str, Factors], int, float]:
    """One rank and one scale for all modules: kept when they already share them, else folded and padded."""
    if _one_scale(modules):
        first = next(iter(modules.values()))
        return dict(modules), first.rank, first.scale
    report.folded = True
    rank = max(f.rank for f in modules.values())
    return {m: _pad(_fold(f), rank) for m, f in modules.items()}, rank, 1.0


def _zero_fill(modules: dict[str, Factors], wanted: list[str], rank: int, shape_of) -> tuple[dict[str, Factors], int]:
    """Add zero factors for the modules the target creates but the adapter lacks (block order kept)."""
    out, filled = {}, 0
    for m in wanted:
        if m in modules:
            out[m] = modules[m]
        else:
            rows, cols = shape_of(m)
            out[m] = Factors(torch.zeros(rank, cols), torch.zeros(rows, rank), 1.0)
            filled += 1
    for m, f in modules.items():
        out.setdefault(m, f)
    return out, filled


def _leaf_shapes(modules: dict[str, Factors]) -> dict[str, tuple[int, int]]:
    return {split_module(m)[1]: (f.b.shape[0], f.a.shape[1]) for m, f in modules.items()}


def _strip(f: Factors) -> Factors:
    """Trailing rank components whose A row and B column are both zero (padding) removed, keeping rank ≥ 1."""
    r = f.rank
    while r > 1 and not bool(f.a[r - 1].any()) and not bool(f.b[:, r - 1].any()):
        r -= 1
    return f if r == f.rank else Factors(f.a[:r].contiguous(), f.b[:, :r].contiguous(), f.scale)


# ---------------------------------------------------------------------------------------------------- writing


def _write_peft(out: Path, modules: dict[str, Factors], arch: ArchInfo | None, base: str | None,
                report: FormatConversion, force: bool) -> None:
    """A PEFT adapter whose every module has its exact scale (rank and alpha pattern keys where needed)."""
    from adapterops.io.adapter_writer import write_adapter

    kept = {}
    for m, f in modules.items():
        if not bool(f.a.any()) and not bool(f.b.any()):
            report.filled += 1  # zero fill written for the other format: ΔW = 0, not a module of the adapter
            continue
        kept[m] = _strip(f)
    if not kept:
        raise AdapteropsError("the adapter holds no non-zero LoRA module")
    ranks = {m: f.rank for m, f in kept.items()}
    alphas = {m: alpha_for(f.scale, f.rank, False) for m, f in kept.items()}
    r0 = Counter(ranks.values()).most_common(1)[0][0]
    a0 = Counter(alphas.values()).most_common(1)[0][0]
    leaves: dict[str, set[int | None]] = {}
    for m in kept:
        block, leaf = split_module(m)
        leaves.setdefault(leaf, set()).add(block)
    if arch is not None and all(blocks == set(range(arch.num_layers)) or blocks == {None} for blocks in leaves.values()):
        targets = sorted(leaves)  # each leaf in every block: the short names select exactly these modules
    else:
        targets = list(kept)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base, "r": r0, "lora_alpha": a0,
        "target_modules": targets, "rank_pattern": {exact_key(m): r for m, r in ranks.items() if r != r0},
        "alpha_pattern": {exact_key(m): a for m, a in alphas.items() if a != a0}, "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "lora_dropout": 0.0, "bias": "none", "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True,
    }
    tensors = {}
    for m, f in kept.items():
        tensors[f"{PREFIX}{m}.lora_A.weight"] = f.a.contiguous()
        tensors[f"{PREFIX}{m}.lora_B.weight"] = f.b.contiguous()
    write_adapter(out, tensors, config, force=force)
    report.files = ["adapter_model.safetensors", "adapter_config.json"]
    for m, f in kept.items():
        if abs(lora_scale(f.rank, alphas[m], False) - f.scale) > 4 * math.ulp(f.scale):
            report.warnings.append(f"module {m}: scale {f.scale!r} is not reachable as α/r; off by "
                                   f"{abs(lora_scale(f.rank, alphas[m], False) - f.scale):.3g}")


def _need_arch(arch: ArchInfo | None, why: str) -> ArchInfo:
    if arch is None:
        raise AdapteropsError(f"{why} needs the base model (base=/--base: its config.json gives the architecture "
                              "and head counts)")
    return arch


def _write_gguf(target: Path, modules: dict[str, Factors], arch: ArchInfo | None, report: FormatConversion) -> None:
    """Write the one GGUF file `target`."""
    from adapterops.io.formats import gguf as fmt

    arch = _need_arch(arch, "GGUF")
    name, permute = fmt.target_arch(arch)
    report.architecture = name
    if "lm_head" in modules and arch.tie_word_embeddings:
        raise AdapteropsError("LoRA on lm_head of a model with tied embeddings: llama.cpp has no output.weight "
                              "for it to apply to", file=arch.path)
    # llama.cpp's scale is alpha / rank(lora_b): one alpha serves when it gives every module its scale exactly
    first = next(iter(modules.values()))
    alpha = first.scale * first.rank
    if alpha > 0 and all(alpha / f.rank == f.scale for f in modules.values()):
        written = modules
    else:
        report.folded = True
        alpha = 0.0  # llama.cpp then applies user_scale alone
        written = {m: _fold(f) for m, f in modules.items()}
    names = fmt.write_gguf(target, arch, written, alpha)
    report.scale = alpha
    for row in report.modules:
        row["target"] = names[row["module"]]
        row["permuted"] = permute and split_module(row["module"])[1] in ("self_attn.q_proj", "self_attn.k_proj")


def _write_mlx(out: Path, modules: dict[str, Factors], arch: ArchInfo | None, report: FormatConversion) -> None:
    from adapterops.io.formats.mlx import write_mlx

    written, rank, scale = _uniform(modules, report)
    blocks = sorted({b for b in (split_module(m)[0] for m in written) if b is not None})
    block_leaves = sorted({split_module(m)[1] for m in written if split_module(m)[0] is not None})
    if arch is not None:
        if arch.model_type not in MLX_ARCHS:
            report.warnings.append(f"model_type {arch.model_type!r}: module names are taken to be mlx-lm's as well "
                                   f"(checked for {', '.join(MLX_ARCHS)})")
        first = blocks[0] if blocks else arch.num_layers
        num_layers, span = arch.num_layers - first, range(first, arch.num_layers)
        report.architecture = arch.model_type
    else:
        num_layers, span = -1, range(0, (blocks[-1] + 1) if blocks else 0)
        report.warnings.append("no base given: num_layers is -1 (all blocks); mlx-lm gives blocks the file lacks "
                               "zero lora_b")
    shapes = _leaf_shapes(written)
    wanted = [f"model.layers.{i}.{leaf}" for i in span for leaf in block_leaves]
    written, report.filled = _zero_fill(written, wanted, rank, lambda m: shapes[split_module(m)[1]])
    write_mlx(out, written, rank=rank, scale=scale, num_layers=num_layers)
    report.rank, report.scale = rank, scale
    report.files = ["adapters.safetensors", "adapter_config.json"]
    for row in report.modules:
        row["target"] = row["module"]


def _write_torchtune(out: Path, modules: dict[str, Factors], arch: ArchInfo | None, report: FormatConversion) -> None:
    from adapterops.io.formats import torchtune as fmt

    arch = _need_arch(arch, "torchtune")
    report.architecture = arch.model_type
    if "lm_head" in modules and arch.tie_word_embeddings:
        raise AdapteropsError("LoRA on lm_head of a model with tied embeddings: torchtune's tied output has no LoRA",
                              file=arch.path)
    for m in modules:
        fmt.module_name(m)  # refuses modules torchtune's decoder has no LoRA for
    written, rank, scale = _uniform(modules, report)
    alpha = alpha_for(scale, rank, False)
    args = fmt.builder_args(list(written))
    leaves = [k for k, v in fmt.ATTN.items() if v in args["lora_attn_modules"]] + (list(fmt.MLP) if args["apply_lora_to_mlp"] else [])
    wanted = [f"model.layers.{i}.{leaf}" for i in range(arch.num_layers) for leaf in leaves]
    written, report.filled = _zero_fill(written, wanted, rank, arch.module_shape)
    fmt.write_torchtune(out, arch, written, rank=rank, alpha=alpha)
    report.rank, report.scale = rank, alpha / rank
    report.files = [fmt.WEIGHTS, fmt.CONFIG]
    for row in report.modules:
        row["target"] = fmt.module_name(row["module"])
        row["permuted"] = fmt._permuted(arch, row["module"]) is not None


# ---------------------------------------------------------------------------------------------------- entry


def convert_format(
    src: str | os.PathLike, out: str | os.PathLike, *, to: str, from_: str | None = None,
    base: str | os.PathLike | None = None, allow_lossy: bool = False, force: bool = False, allow_pickle: bool = False,
) -> FormatConversion:
    """Convert a LoRA adapter between PEFT, GGUF (llama.cpp), mlx-lm and torchtune, keeping every module's ΔW.

    `src` is a PEFT adapter folder, a GGUF file (or a folder holding one), an mlx-lm adapter folder or a torchtune
    adapter folder; its format is detected unless `from_` names it. `to` is "peft", "gguf", "mlx" or "torchtune".
    `base` is the base model's folder (its config.json): GGUF and torchtune need it for the architecture and the
    head counts by which q/k rows are permuted, `allow_lossy` for its weights; mlx-lm uses it for `num_layers`.
    `out` is a folder (for GGUF, a path ending in .gguf is written as that one file); an existing non-empty OUT is
    replaced only with `force`. Writes are atomic. Pickles (torchtune's adapter_model.pt, a PEFT adapter_model.bin)
    are loaded only with `allow_pickle` (torch.load(weights_only=True)).

    Per-module scales (rsLoRA, rank and alpha patterns) are kept where the target's single alpha/scale expresses
    them exactly and folded into lora_B otherwise; ranks are zero-padded where the target has one rank. DoRA,
    `modules_to_save`, trained biases and `lora_bias` are refused, or with `allow_lossy` re-extracted from the
    merged module (ΔW truncated to the module's rank by SVD, the relative error reported per module) or dropped
    (listed). Raises AdapteropsError (one line naming the file and tensor) for anything else it cannot convert.

    Example::

        convert_format("./my-lora", "./my-lora.gguf", to="gguf", base="./Llama-3.2-1B").to_dict()
    """
    start = time.perf_counter()
    if to not in FORMATS:
        raise AdapteropsError(f"unknown target format {to!r} (one of {', '.join(FORMATS)})")
    if from_ is not None and from_ not in FORMATS:
        raise AdapteropsError(f"unknown source format {from_!r} (one of {', '.join(FORMATS)})")
    src_path = resolve(str(src))
    fmt = from_ or detect_format(src_path)
    if fmt is None:
        raise AdapteropsError("cannot tell which adapter format this is (give the source format)", file=src_path)
    if fmt == to:
        raise AdapteropsError(f"is already a {to} adapter", file=src_path)
    base_path = resolve(str(base)) if base is not None else None
    arch = arch_info(base_path) if base_path is not None else None
    out = Path(out)
    single_file = to == "gguf" and out.suffix == ".gguf"
    if single_file:
        if out.is_dir() or (out.exists() and not out.is_file()):
            raise AdapteropsError("exists and is not a file", file=out)
        if out.exists() and not force:
            raise AdapteropsError("exists (use --force to replace it)", file=out)
        if out.resolve() == src_path.resolve() or out.resolve().is_relative_to(src_path.resolve()):
            raise AdapteropsError(f"output overlaps the input {src_path}; inputs are never modified", file=out)
    else:
        check_output(out, [src_path], force)
    report = FormatConversion(str(src_path), str(out), fmt, to, None, None, None, False, True)

    if fmt == "peft":
        modules = _read_peft(src_path, to, base_path, allow_lossy, report, allow_pickle)
    else:
        foreign = read_foreign(fmt, src_path, arch, allow_pickle)
        if foreign.qk_interleaved:
            raise AdapteropsError(f"the {fmt} adapter keeps q/k rows interleaved; restoring transformers' order needs "
                                  "the base model (base=/--base) for the head counts", file=foreign.path)
        modules = foreign.modules
        report.architecture = foreign.info.get("architecture") or foreign.info.get("model_type")  # type: ignore[assignment]
    if not modules:
        raise AdapteropsError("the adapter holds no convertible LoRA module", file=src_path)
    report.modules = [{"module": m, "rank": f.rank, "scale": f.scale, "target": None, "permuted": False,
                       "lossy_error": report.lossy.get(m)} for m, f in modules.items()]

    if to == "peft":
        _write_peft(out, modules, arch, str(base) if base is not None else None, report, force)
    elif single_file:
        with atomic_file(out) as tmp:
            _write_gguf(tmp, modules, arch, report)
        report.files = [out.name]
    else:
        with atomic_dir(out, replace=force) as tmp:
            if to == "gguf":
                from adapterops.io.formats.gguf import FILE_NAME

                _write_gguf(tmp / FILE_NAME, modules, arch, report)
                report.files = [FILE_NAME]
            elif to == "mlx":
                _write_mlx(tmp, modules, arch, report)
            else:
                _write_torchtune(tmp, modules, arch, report)
    for row in report.modules:
        row["folded"] = report.folded
    if to == "mlx" and arch is not None and arch.path is not None:
        cfg = read_json_object(Path(arch.path) / "config.json") if Path(arch.path).is_dir() else {}
        if "rope_parameters" in cfg and "rope_theta" not in cfg:
            report.warnings.append("the base's config.json has transformers 5's rope_parameters but no rope_theta: "
                                   "mlx-lm 0.32 ignores rope_parameters and uses its default rope_theta; add "
                                   "rope_theta to the config mlx-lm loads")
    report.exact = not report.folded and not report.lossy and not report.dropped
    report.seconds = round(time.perf_counter() - start, 3)
    return report

