"""`merge --requantize`: merge onto an NF4 base and write NF4 again, the way PEFT merges into a 4-bit model.

PEFT's `Linear4bit.merge` dequantizes the weight with bitsandbytes (to its original dtype, e.g. bf16), adds the
float32 ΔW (so the sum is float32) and quantizes that float32 tensor again with the same blocksize and double
quantization; the new quant state says float32. Weights without an adapter keep their original NF4 bytes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch

from adapterops.io.adapter import Adapter
from adapterops.io.checkpoint import Checkpoint, conv1d_layout
from adapterops.io.safetensors_io import TensorSpec
from adapterops.pipeline.build import build_tensor, read_source
from adapterops.pipeline.nf4_tensors import quantized_specs, quantized_tensors
from adapterops.pipeline.output import write_index_and_files
from adapterops.pipeline.plan import MergePlan, TensorPlan
from adapterops.pipeline.stream import prefetched, write_shards


def _state_keys(ckpt: Checkpoint, name: str) -> list[str]:
    """A quantized weight's own tensors in the NF4 checkpoint: the packed codes, then its quant-state tensors."""
    return [name] + [k for k in ckpt.keys() if k.startswith(name + ".")]


def write_requantized(plan: MergePlan, nf4_ckpt: Checkpoint, view: Checkpoint, adapters: list[Adapter], out: Path,
                      device: torch.device, quiet: bool) -> int:
    """Write the merged checkpoint in NF4: changed quantized weights requantized from float32, the rest as they were."""
    states = {n: st for src in view.shards.values() for n, st in src.states.items()}
    conv1d = conv1d_layout(nf4_ckpt)
    shards: list[tuple[str, list[TensorSpec]]] = []
    for s in plan.shards:
        specs: list[TensorSpec] = []
        for tp in s.tensors:
            st = states.get(tp.name)
            if st is None:
                specs.append(tp.spec)
            elif tp.steps:
                specs += quantized_specs(tp.name, math.prod(st.shape), st.blocksize, st.double_quant)
            else:
                specs += [TensorSpec(k, nf4_ckpt.shape_dtype(k)[1], nf4_ckpt.shape_dtype(k)[0]) for k in _state_keys(nf4_ckpt, tp.name)]
        shards.append((s.filename, specs))

    def read(tp: TensorPlan) -> torch.Tensor | None:
        if tp.name in states and not tp.steps:
            return None  # copied byte for byte below
        return read_source(tp, view, adapters)

    def items():
        for tp, src in prefetched(plan.tensors, read):
            st = states.get(tp.name)
            if st is None:
                yield tp.name, build_tensor(tp, src, adapters, device)
            elif not tp.steps:
                for k in _state_keys(nf4_ckpt, tp.name):
                    yield k, nf4_ckpt.read(k)
            else:  # PEFT: bnb-dequantized weight (its dtype) + float32 ΔW, requantized from float32
                merged = build_tensor(replace(tp, spec=replace(tp.spec, dtype=torch.float32)), src, adapters, device)
                yield from quantized_tensors(tp.name, merged, st.blocksize, st.double_quant, conv1d, device)

    total = write_shards(out, shards, items(), quiet=quiet, desc="merge+requantize")
    weight_map = {spec.name: fname for fname, specs in shards for spec in specs}
    write_index_and_files(out, plan.write_index, weight_map, {"total_size": total}, plan.extra_files, nf4_ckpt.config)
    return total
