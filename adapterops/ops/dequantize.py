"""`dequantize`: an NF4 checkpoint (ours, or one transformers + bitsandbytes saved) back to a plain one, exactly as
bitsandbytes dequantizes."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from adapterops.errors import AdapteropsError
from adapterops.io.atomic import atomic_dir
from adapterops.io.nf4_checkpoint import dequantized_view, is_nf4
from adapterops.io.safetensors_io import TensorSpec
from adapterops.pipeline.options import (
    cast_checked,
    open_base,
    parse_dtype,
    pick_device,
)
from adapterops.pipeline.output import write_index_and_files
from adapterops.pipeline.stream import prefetched, write_shards
from adapterops.result import Result


@dataclass
class DequantizeResult(Result):
    """What a dequantize run did (the CLI's --json summary)."""

    output: str
    tensors_quantized: int
    tensors_written: int
    bytes_written: int
    seconds: float
    device: str
    skipped_modules: list[str] = field(default_factory=list)


def dequantize(
    base: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None, device: str = "cpu",
    revision: str | None = None, force: bool = False, quiet: bool = True,
) -> DequantizeResult:
    """An NF4 checkpoint (ours or transformers + bitsandbytes') back to a plain one.

    Example::

        adapterops.dequantize("./llama-nf4", "./llama-bf16", dtype="bfloat16")
    """
    start = time.perf_counter()
    target = parse_dtype(dtype)
    dev = pick_device(device)
    ckpt, out = open_base(base, out, revision, force)
    with ckpt:
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
        items = ((name, cast_checked(t, spec_of[name].dtype, file=ckpt.single_file or ckpt.root / view.weight_map[name], tensor=name))
                 for name, t in prefetched(view.keys(), view.read))
        with atomic_dir(out, replace=force) as tmp:
            total = write_shards(tmp, list(specs.items()), items, quiet=quiet, desc="dequantize")
            write_index_and_files(tmp, ckpt.index_path is not None, dict(view.weight_map), {"total_size": total},
                                  ckpt.extra_files(), view.config)
    return DequantizeResult(str(out), n_quantized, len(view.keys()), total, round(time.perf_counter() - start, 3), str(dev))
