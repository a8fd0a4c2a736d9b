"""`quantize` / `dequantize`: base checkpoints to and from NF4, in the layout transformers + bitsandbytes save.

Per quantized Linear weight `W` the checkpoint holds `W` (packed uint8, ((n+1)//2, 1)), `W.absmax`,
`W.quant_map`, with double quantization `W.nested_absmax` and `W.nested_quant_map`, and
`W.quant_state.bitsandbytes__nf4` (the packed JSON); config.json gets bitsandbytes' `quantization_config`.
Like transformers we quantize the Linear weights it would (adapterops/io/architectures.py): not embeddings, the
output embedding (lm_head, embed_out, ...), `_keep_in_fp32_modules`, norms or biases. GPT-2's Conv1D
weights are transposed first, as transformers does.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field

import torch

from adapterops.core import nf4
from adapterops.core.names import name_matches
from adapterops.errors import AdapteropsError
from adapterops.io.architectures import unquantized
from adapterops.io.atomic import atomic_dir
from adapterops.io.checkpoint import conv1d_layout
from adapterops.io.nf4_checkpoint import is_nf4
from adapterops.io.safetensors_io import TensorSpec
from adapterops.pipeline.nf4_tensors import (
    quantization_config,
    quantized_specs,
    quantized_tensors,
)
from adapterops.pipeline.options import (
    check_name_patterns,
    open_base,
    parse_dtype,
    pick_device,
)
from adapterops.pipeline.output import write_index_and_files
from adapterops.pipeline.stream import prefetched, write_shards
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
    warnings: list[str] = field(default_factory=list)


def quantize(
    base: str | os.PathLike, out: str | os.PathLike, *, blocksize: int = 64, double_quant: bool = True,
    skip: list[str] | None = None, compute_dtype: str | None = None, device: str = "cpu", revision: str | None = None,
    force: bool = False, quiet: bool = True,
) -> QuantizeResult:
    """Quantize a base checkpoint's Linear weights to NF4, written as transformers + bitsandbytes save it.

    `compute_dtype` (bnb_4bit_compute_dtype) defaults to the weights' dtype.

    Example::

        adapterops.quantize("./llama", "./llama-nf4", blocksize=64, double_quant=True)
    """
    start = time.perf_counter()
    if blocksize not in nf4.BLOCKSIZES:
        raise AdapteropsError(f"blocksize must be one of {nf4.BLOCKSIZES}, got {blocksize}")
    skip = check_name_patterns("--skip", skip)
    dev = pick_device(device)
    ckpt, out = open_base(base, out, revision, force)
    with ckpt:
        if is_nf4(ckpt) or (ckpt.config or {}).get("quantization_config"):
            raise AdapteropsError("is already quantized (NF4 tensors or a quantization_config)", file=ckpt.root)
        conv1d = conv1d_layout(ckpt)
        # what transformers + bitsandbytes would quantize for this architecture (its output embedding, whatever it
        # is called, its _keep_in_fp32_modules, embeddings and other non-Linear 2-D weights stay as they are)
        rule = unquantized(ckpt.config, {name: ckpt.shape_dtype(name) for name in ckpt.keys()})
        chosen, skipped = set(), []
        by_shard: dict[str, list[TensorSpec]] = {}
        dtypes = set()
        for name in ckpt.keys():
            shape, dtype = ckpt.shape_dtype(name)
            specs = [TensorSpec(name, dtype, shape)]
            if name in rule.quantizable:
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
        # None lets transformers recompute its own default skips on load (what it saves itself); an explicit list
        # (--skip, or the fallback's guess) replaces those defaults, so it also names what transformers would skip
        skip_modules = sorted(set(skipped) | set(rule.skip_modules)) if skipped or rule.fallback else None
        cfg["quantization_config"] = quantization_config(double_quant, compute, skip_modules)
        with atomic_dir(out, replace=force) as tmp:
            total = write_shards(tmp, shards, items(), quiet=quiet, desc="quantize")
            weight_map = {s.name: fname for fname, specs in shards for s in specs}
            write_index_and_files(tmp, ckpt.index_path is not None, weight_map, {"total_size": total},
                                  ckpt.extra_files(), cfg if ckpt.config is not None else None)
        written = sum(len(specs) for _, specs in shards)
    return QuantizeResult(str(out), len(chosen), written, total, round(time.perf_counter() - start, 3), str(dev), skipped,
                          list(rule.warnings))
