"""NF4 checkpoints (bitsandbytes 4-bit, as transformers saves them) seen as plain ones: weights dequantize on read."""

from __future__ import annotations

from dataclasses import replace

import torch

from adapterops.core import nf4
from adapterops.errors import AdapteropsError
from adapterops.io.checkpoint import Checkpoint, conv1d_layout

QS_JSON = "quant_state.bitsandbytes__nf4"


def _read_state(ckpt: Checkpoint, name: str) -> nf4.NF4State:
    """The NF4 state of one quantized weight, from its stored quant-state tensors, checked against its packed bytes.

    A lying state (a blocksize bitsandbytes never uses, a shape the packed bytes do not hold, absmax or quant maps of
    the wrong size, a NaN offset, JSON that is not an object...) is a one-line error naming the file and tensor.
    """
    qs_key = f"{name}.{QS_JSON}"
    qs_file = ckpt.source(qs_key).path
    if name not in ckpt.weight_map:
        raise AdapteropsError(f"NF4 quant state without its packed weight '{name}'", file=qs_file, tensor=qs_key)
    keys = {k[len(name) + 1:]: k for k in ckpt.keys() if k.startswith(name + ".") and k != name}
    keys = {short: full for short, full in keys.items() if short in QUANT_STATE_KEYS}
    try:
        return nf4.state_from_tensors({short: ckpt.read(full) for short, full in keys.items()}, packed=ckpt.read(name))
    except nf4.BadState as exc:
        tensor = keys.get(exc.tensor, name) if exc.tensor else name
        raise AdapteropsError(f"bad NF4 quant state: {exc}", file=ckpt.source(tensor).path, tensor=tensor) from None


QUANT_STATE_KEYS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", QS_JSON)


def is_nf4(ckpt: Checkpoint) -> bool:
    """Whether a checkpoint holds bitsandbytes NF4 weights."""
    return any(k.endswith("." + QS_JSON) for k in ckpt.keys())


class NF4Source:
    """A shard of an NF4 checkpoint seen as a plain one: quantized weights dequantize on read."""

    def __init__(self, inner, states: dict[str, nf4.NF4State], dtype: torch.dtype | None, conv1d: bool, device: torch.device):
        self.inner, self.states, self.dtype, self.conv1d, self.device = inner, states, dtype, conv1d, device
        self.path = inner.path
        hidden = {k for k in inner.keys() for q in states if k.startswith(q + ".")}
        self._keys = [k for k in inner.keys() if k not in hidden]

    def keys(self) -> list[str]:
        """Tensor names, without the quant-state tensors."""
        return self._keys

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """The dequantized weight's shape and dtype (the given dtype, else the original one)."""
        st = self.states.get(name)
        if st is None:
            return self.inner.shape_dtype(name)
        return (tuple(reversed(st.shape)) if self.conv1d else st.shape), (self.dtype or st.dtype)

    def read(self, name: str) -> torch.Tensor:
        """A dequantized weight (fl32(code · absmax), rounded once to the dtype), or a plain tensor."""
        st = self.states.get(name)
        if st is None:
            return self.inner.read(name)
        dense = nf4.dequantize(self.inner.read(name).to(self.device), replace(st, dtype=torch.float32))
        dense = dense.T.contiguous() if self.conv1d else dense
        return dense.to("cpu", self.shape_dtype(name)[1])

    def close(self) -> None:
        """Close the underlying file."""
        self.inner.close()


def dequantized_view(ckpt: Checkpoint, dtype: torch.dtype | None = None, device: torch.device = torch.device("cpu")) -> Checkpoint:
    """An NF4 checkpoint as a plain one: its weights dequantize when read, its config loses quantization_config."""
    quantized = sorted(k[: -len("." + QS_JSON)] for k in ckpt.keys() if k.endswith("." + QS_JSON))
    states = {name: _read_state(ckpt, name) for name in quantized}
    conv1d = conv1d_layout(ckpt)
    shards = {f: NF4Source(src, {n: s for n, s in states.items() if ckpt.weight_map[n] == f}, dtype, conv1d, device)
              for f, src in ckpt.shards.items()}
    weight_map = {k: f for f, src in shards.items() for k in src.keys()}
    weight_map = {k: weight_map[k] for k in ckpt.keys() if k in weight_map}
    config = None
    if ckpt.config is not None:
        config = {k: v for k, v in ckpt.config.items() if k != "quantization_config"}
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
    return Checkpoint(ckpt.root, shards, weight_map, ckpt.index_path, ckpt.index_metadata, config, ckpt.single_file)
