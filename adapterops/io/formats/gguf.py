"""LoRA adapters as llama.cpp reads them: one GGUF file, through the `gguf` package (the optional `gguf` extra).

The file: `general.architecture` (llama.cpp's name), `general.type = adapter`, `adapter.type = lora`,
`adapter.lora.alpha` (f32), and per module `<base tensor>.lora_a` / `.lora_b` with PEFT's shapes, e.g.
`blk.0.attn_q.weight.lora_a` (r, in) and `.lora_b` (out, r). llama.cpp scales each module by
`user_scale · alpha / rank`, the rank read from that module's lora_b, and by `user_scale` alone when alpha is 0
(src/llama-adapter.h, `get_scale`). For Llama-family models llama.cpp keeps q and k rows interleaved per head
(convert_hf_to_gguf's `permute`, k with the KV-head count), so lora_B of q_proj and k_proj is permuted alike.
Names come from gguf's own tables (`MODEL_ARCH_NAMES`, `get_tensor_name_map`).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapterops.core.heads import from_interleaved, heads_problem, to_interleaved
from adapterops.errors import AdapteropsError
from adapterops.io.formats import (
    BLOCK_LINEARS,
    TOP_LINEARS,
    ArchInfo,
    Factors,
    FormatAdapter,
    check_factors,
    foreign_number,
    split_module,
)
from adapterops.io.paths import regular_file

MAGIC = b"GGUF"
FILE_NAME = "adapter_model.gguf"  # what a GGUF conversion writes inside an OUT folder
# transformers model_type → (gguf MODEL_ARCH member, q/k rows interleaved as convert_hf_to_gguf's LlamaModel does)
ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("LLAMA", True),
    "mistral": ("LLAMA", True),  # MistralForCausalLM converts through LlamaModel: arch "llama", permuted
    "qwen2": ("QWEN2", False),
    "qwen3": ("QWEN3", False),
}
GGUF_TO_MODEL_TYPE = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
TENSOR = re.compile(r"^(.+)\.weight\.lora_([ab])$")


def gguf_module() -> Any:
    """The gguf package, imported on first use."""
    try:
        import gguf
    except ImportError:
        raise AdapteropsError("GGUF needs the gguf package: pip install 'adapterops[gguf]'") from None
    return gguf


def is_gguf_file(path: Path) -> bool:
    """Whether a regular file starts with the GGUF magic."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def gguf_in_folder(path: Path) -> Path | None:
    """The one .gguf file in a folder, None when it has none or several."""
    found = [p for p in path.iterdir() if p.suffix == ".gguf" and p.is_file()]
    return found[0] if len(found) == 1 else None


def target_arch(arch: ArchInfo) -> tuple[str, bool]:
    """(llama.cpp architecture name, whether q/k rows are interleaved) for a transformers model type."""
    if arch.model_type not in ARCHS:
        raise AdapteropsError(f"model_type {arch.model_type!r}: GGUF LoRA conversion supports "
                              f"{', '.join(sorted(ARCHS))}", file=arch.path)
    gguf = gguf_module()
    member, permute = ARCHS[arch.model_type]
    return gguf.MODEL_ARCH_NAMES[getattr(gguf.MODEL_ARCH, member)], permute


def _name_map(arch_name: str, n_blocks: int) -> dict[str, str]:
    """transformers module name → GGUF base tensor name (with .weight), from gguf's tensor tables."""
    gguf = gguf_module()
    member = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch_name)
    tmap = gguf.get_tensor_name_map(member, n_blocks)
    out = {}
    for module in [f"model.layers.{i}.{leaf}" for i in range(n_blocks) for leaf in BLOCK_LINEARS] + list(TOP_LINEARS):
        name = tmap.get_name(module)
        if name is not None:
            out[module] = name + ".weight"
    return out


def write_gguf(path: Path, arch: ArchInfo, modules: dict[str, Factors], alpha: float) -> dict[str, str]:
    """Write the modules (factors in transformers' layout, scale already matching `alpha`) as a llama.cpp LoRA.

    Returns module → GGUF tensor base name. Tensors are stored as float32.
    """
    gguf = gguf_module()
    arch_name, permute = target_arch(arch)
    names = _name_map(arch_name, arch.num_layers)
    writer = gguf.GGUFWriter(str(path), arch_name)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    mapped = {}
    for module, f in modules.items():
        if module not in names:
            raise AdapteropsError(f"module {module} has no tensor in llama.cpp's {arch_name} architecture")
        b = f.b.float()
        leaf = split_module(module)[1]
        if permute and leaf in ("self_attn.q_proj", "self_attn.k_proj"):
            heads = arch.num_heads if leaf == "self_attn.q_proj" else arch.num_kv_heads
            problem = heads_problem(b.shape[0], heads)
            if problem:
                raise AdapteropsError(f"cannot interleave q/k rows of module {module}: {problem}")
            b = to_interleaved(b, heads)
        base = names[module]
        writer.add_tensor(base + ".lora_a", f.a.float().contiguous().numpy())
        writer.add_tensor(base + ".lora_b", b.contiguous().numpy())
        mapped[module] = base
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return mapped


def _field_value(reader: Any, key: str, path: Path) -> Any:
    """A scalar or string metadata value (an array comes back as a list), None when absent."""
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except Exception as exc:  # noqa: BLE001 - gguf's reader raises many types on a damaged field
        raise AdapteropsError(f"metadata {key} cannot be read ({type(exc).__name__})", file=path) from None


def _field_text(reader: Any, key: str, path: Path) -> str | None:
    """A string metadata value, None when absent; a field of another type (an array, a number) is an error."""
    value = _field_value(reader, key, path)
    if value is not None and not isinstance(value, str):
        raise AdapteropsError(f"metadata {key} must be a string, got {type(value).__name__} {value!r:.40}", file=path)
    return value


def read_gguf(path: Path, arch: ArchInfo | None = None) -> FormatAdapter:
    """Read a llama.cpp LoRA GGUF into transformers-named factors (q/k rows restored when `arch` gives the heads)."""
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - gguf's reader raises many types on a damaged file
        raise AdapteropsError(f"not a readable GGUF file ({type(exc).__name__}: {exc})", file=path) from None
    gtype, atype = _field_text(reader, "general.type", path), _field_text(reader, gguf.Keys.Adapter.TYPE, path)
    if gtype != "adapter" or atype != "lora":
        raise AdapteropsError(f"not a LoRA adapter GGUF (general.type={gtype!r}, adapter.type={atype!r})", file=path)
    arch_name = _field_text(reader, "general.architecture", path)
    if arch_name not in GGUF_TO_MODEL_TYPE:
        raise AdapteropsError(f"architecture {arch_name!r}: reading GGUF LoRA supports "
                              f"{', '.join(sorted(GGUF_TO_MODEL_TYPE))}", file=path)
    raw_alpha = _field_value(reader, gguf.Keys.Adapter.LORA_ALPHA, path)
    # llama.cpp: alpha 0 (or none) means each module is scaled by the user's scale alone
    alpha = 0.0 if raw_alpha is None else foreign_number(raw_alpha, gguf.Keys.Adapter.LORA_ALPHA, path, zero=True)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    blocks = 0
    for t in reader.tensors:
        m = TENSOR.match(t.name)
        if m is None:
            raise AdapteropsError("not a LoRA tensor (expected NAME.weight.lora_a / .lora_b)", file=path, tensor=t.name)
        if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            raise AdapteropsError(f"tensor type {t.tensor_type.name} is not supported (F32, F16)", file=path, tensor=t.name)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        try:
            data = torch.from_numpy(np.array(t.data, copy=True).reshape(shape))
        except (ValueError, TypeError) as exc:  # a shape the data does not hold
            raise AdapteropsError(f"shape {list(shape)} does not fit the tensor's data ({exc})", file=path, tensor=t.name) from None
        pairs.setdefault(m.group(1) + ".weight", {})[m.group(2)] = data
        bm = re.match(r"^blk\.(\d+)\.", t.name)
        if bm:
            blocks = max(blocks, int(bm.group(1)) + 1)
    model_type = GGUF_TO_MODEL_TYPE[arch_name]
    permute = ARCHS[model_type][1]
    reverse = {v: k for k, v in _name_map(arch_name, blocks).items()}
    modules: dict[str, Factors] = {}
    for base, ab in sorted(pairs.items()):
        if set(ab) != {"a", "b"}:
            raise AdapteropsError(f"lora_{'a' if 'a' not in ab else 'b'} is missing", file=path, tensor=base)
        if base not in reverse:
            raise AdapteropsError("no transformers module is known for this tensor", file=path, tensor=base)
        a, b = ab["a"], ab["b"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise AdapteropsError(f"lora_a {list(a.shape)} and lora_b {list(b.shape)} do not share a rank", file=path, tensor=base)
        scale = alpha / b.shape[1] if alpha and b.shape[1] else 1.0
        check_factors(reverse[base], a, b, scale, path, (base + ".lora_a", base + ".lora_b"))  # a zero rank too
        modules[reverse[base]] = Factors(a, b, scale)
    interleaved = False
    if permute:
        for module, f in modules.items():
            leaf = split_module(module)[1]
            if leaf not in ("self_attn.q_proj", "self_attn.k_proj"):
                continue
            if arch is None:
                interleaved = True
                continue
            heads = arch.num_heads if leaf == "self_attn.q_proj" else arch.num_kv_heads
            problem = heads_problem(f.b.shape[0], heads)
            if problem:
                raise AdapteropsError(f"cannot restore q/k rows of module {module}: {problem}", file=path)
            f.b = from_interleaved(f.b, heads)
    info = {"architecture": arch_name, "model_type": model_type, "alpha": alpha, "blocks": blocks,
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors})}
    return FormatAdapter("gguf", Path(path), modules, info, interleaved)


def gguf_file(path: Path) -> Path:
    """The GGUF file a path names: the file itself, or the one .gguf file in a folder."""
    if path.is_dir():
        found = gguf_in_folder(path)
        if found is None:
            raise AdapteropsError("no single .gguf file in this folder", file=path)
        return found
    if not os.path.lexists(path):
        raise AdapteropsError("no such GGUF file", file=path)
    return regular_file(path, "GGUF file")  # named by the user: any symlink followed, but a FIFO would block
