"""`quantize` / `dequantize`: base checkpoints to and from NF4, in the layout transformers + bitsandbytes save.

Per quantized Linear weight `W` the checkpoint holds `W` (packed uint8, ((n+1)//2, 1)), `W.absmax`,
`W.quant_map`, with double quantization `W.nested_absmax` and `W.nested_quant_map`, and
`W.quant_state.bitsandbytes__nf4` (the packed JSON); config.json gets bitsandbytes' `quantization_config`.
Like transformers we quantize 2-D Linear weights only: not embeddings, lm_head, norms or biases. GPT-2's Conv1D
weights are transposed first, as transformers does.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.core import nf4
from adapterops.errors import AdapteropsError
from adapterops.io.atomic import atomic_dir, check_output
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.hub import resolve
from adapterops.io.nf4_checkpoint import QS_JSON, conv1d_layout, dequantized_view, is_nf4
from adapterops.io.safetensors_io import TensorSpec
from adapterops.io.streaming import prefetched, write_shards
from adapterops.merge import parse_dtype, pick_device, write_index_and_files
from adapterops.modules import OUTPUT_EMBEDDING, is_linear_weight, name_matches
from adapterops.result import Result


@dataclass
class QuantizeResult(Result):
    """What a quantize or dequantize run did (the CLI's --json summary)."""

    output: str
    tensors_quantized: int
    tensors_written: int
    bytes_written: int
    seconds: float
    device: str
    skipped_modules: list[str] = field(default_factory=list)


def quantization_config(double_quant: bool, compute_dtype: torch.dtype, skip_modules: list[str] | None) -> dict:
    """config.json's quantization_config, with the 13 keys BitsAndBytesConfig.to_dict writes.

    There is no key for the blocksize: each weight's quant state carries it, and loading reads it there.
    """
    return {
        "_load_in_4bit": True, "_load_in_8bit": False,
        "bnb_4bit_compute_dtype": str(compute_dtype).removeprefix("torch."), "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": double_quant,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules, "llm_int8_threshold": 6.0,
        "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
    }


def quantized_specs(name: str, numel: int, blocksize: int, double_quant: bool) -> list[TensorSpec]:
    """The tensors one quantized weight becomes (the JSON's length is known only after quantizing)."""
    nb = math.ceil(numel / blocksize)
    specs = [TensorSpec(name, torch.uint8, ((numel + 1) // 2, 1)),
             TensorSpec(f"{name}.absmax", torch.uint8 if double_quant else torch.float32, (nb,)),
             TensorSpec(f"{name}.quant_map", torch.float32, (16,))]
    if double_quant:
        specs += [TensorSpec(f"{name}.nested_absmax", torch.float32, (math.ceil(nb / nf4.NESTED_BLOCKSIZE),)),
                  TensorSpec(f"{name}.nested_quant_map", torch.float32, (256,))]
    return specs + [TensorSpec(f"{name}.{QS_JSON}", torch.uint8, None)]


def quantized_tensors(name: str, w: torch.Tensor, blocksize: int, double_quant: bool, conv1d: bool,
                      device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs one weight becomes in NF4, in `quantized_specs` order (Conv1D weights transposed
    first, as transformers does)."""
    w = w.to(device)
    packed, state = nf4.quantize(w.T.contiguous() if conv1d else w, blocksize, double_quant)
    yield name, packed.cpu()
    for key, t in state.as_tensors().items():
        yield f"{name}.{key}", t.cpu()


def _begin(base: str | os.PathLike, out: str | os.PathLike, revision: str | None, force: bool) -> tuple[Checkpoint, Path]:
    """Resolve and open the input, check the output."""
    base_path = resolve(str(base), revision)
    out = Path(out)
    check_output(out, [base_path], force)
    return open_checkpoint(base_path), out


def quantize_checkpoint(
    base: str | os.PathLike, out: str | os.PathLike, *, blocksize: int = 64, double_quant: bool = True,
    skip: list[str] | None = None, compute_dtype: str | None = None, device: str = "cpu", revision: str | None = None,
    force: bool = False, quiet: bool = True,
) -> QuantizeResult:
    """Quantize a base checkpoint's Linear weights to NF4, written as transformers + bitsandbytes save it.

    `compute_dtype` (bnb_4bit_compute_dtype) defaults to the weights' dtype.
    """
    start = time.perf_counter()
    if blocksize not in nf4.BLOCKSIZES:
        raise AdapteropsError(f"blocksize must be one of {nf4.BLOCKSIZES}, got {blocksize}")
    skip = list(skip or [])
    dev = pick_device(device)
    ckpt, out = _begin(base, out, revision, force)
    try:
        if is_nf4(ckpt) or (ckpt.config or {}).get("quantization_config"):
            raise AdapteropsError("is already quantized (NF4 tensors or a quantization_config)", file=ckpt.root)
        conv1d = conv1d_layout(ckpt)
        chosen, skipped = set(), []
        by_shard: dict[str, list[TensorSpec]] = {}
        dtypes = set()
        for name in ckpt.keys():
            shape, dtype = ckpt.shape_dtype(name)
            specs = [TensorSpec(name, dtype, shape)]
            if is_linear_weight(name, shape, dtype):
                module = name[: -len(".weight")]
                if any(name_matches(p, module) for p in skip):
                    skipped.append(module)
                else:
                    chosen.add(name)
                    dtypes.add(dtype)
                    specs = quantized_specs(name, math.prod(shape), blocksize, double_quant)
            by_shard.setdefault(ckpt.weight_map[name], []).extend(specs)
        if not chosen:
            raise AdapteropsError("has no Linear weights to quantize", file=ckpt.root)
        unused = [p for p in skip if not any(name_matches(p, m) for m in skipped)]
        if unused:
            raise AdapteropsError(f"--skip {unused[0]!r} matches no Linear module", file=ckpt.root)
        shards = list(by_shard.items())

        def items():
            for name, src in prefetched(ckpt.keys(), ckpt.read):
                if name not in chosen:
                    yield name, src
                    continue
                yield from quantized_tensors(name, src, blocksize, double_quant, conv1d, dev)

        cfg = dict(ckpt.config or {})
        compute = parse_dtype(compute_dtype) or (next(iter(dtypes)) if len(dtypes) == 1 else torch.float32)
        skip_modules = sorted(set(skipped) | {OUTPUT_EMBEDDING[: -len(".weight")]}) if skipped else None
        cfg["quantization_config"] = quantization_config(double_quant, compute, skip_modules)
        with atomic_dir(out, replace=force) as tmp:
            total = write_shards(tmp, shards, items(), quiet=quiet, desc="quantize")
            weight_map = {s.name: fname for fname, specs in shards for s in specs}
            write_index_and_files(tmp, ckpt.index_path is not None, weight_map, {"total_size": total},
                                  ckpt.extra_files(), cfg if ckpt.config is not None else None)
        written = sum(len(specs) for _, specs in shards)
    finally:
        ckpt.close()
    return QuantizeResult(str(out), len(chosen), written, total, round(time.perf_counter() - start, 3), str(dev), skipped)


def dequantize_checkpoint(
    base: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None, device: str = "cpu",
    revision: str | None = None, force: bool = False, quiet: bool = True,
) -> QuantizeResult:
    """An NF4 checkpoint (ours or transformers + bitsandbytes') back to a plain one."""
    start = time.perf_counter()
    target = parse_dtype(dtype)
    dev = pick_device(device)
    ckpt, out = _begin(base, out, revision, force)
    try:
        if not is_nf4(ckpt):
            raise AdapteropsError("holds no NF4 weights (no *.quant_state.bitsandbytes__nf4 tensors)", file=ckpt.root)
        view = dequantized_view(ckpt, target, dev)
        n_quantized = sum(len(s.states) for s in view.shards.values())
        specs: dict[str, list[TensorSpec]] = {}
        for name in view.keys():
            shape, dt = view.shape_dtype(name)
            specs.setdefault(view.weight_map[name], []).append(
                TensorSpec(name, target if (target and dt.is_floating_point) else dt, shape))
        spec_of = {s.name: s for ss in specs.values() for s in ss}
        items = ((name, t.to(spec_of[name].dtype)) for name, t in prefetched(view.keys(), view.read))
        with atomic_dir(out, replace=force) as tmp:
            total = write_shards(tmp, list(specs.items()), items, quiet=quiet, desc="dequantize")
            write_index_and_files(tmp, ckpt.index_path is not None, dict(view.weight_map), {"total_size": total},
                                  ckpt.extra_files(), view.config)
    finally:
        ckpt.close()
    return QuantizeResult(str(out), n_quantized, len(view.keys()), total, round(time.perf_counter() - start, 3), str(dev))
