"""The tensors one NF4 weight becomes in a transformers + bitsandbytes checkpoint, and config.json's
quantization_config: shared by quantize and merge --requantize."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from adapterops.core import nf4
from adapterops.io.nf4_checkpoint import QS_JSON
from adapterops.io.safetensors_io import TensorSpec


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
