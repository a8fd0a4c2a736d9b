"""LoRA adapters in other ecosystems' formats: GGUF (llama.cpp), mlx-lm and torchtune, read and written as data.

Every format module turns its files into, and writes from, one shape: `Factors` per module, keyed by the module's
transformers name (`model.layers.0.self_attn.q_proj`), with lora_A (r, in) and lora_B (out, r) in transformers'
row order, and the scale that gives ΔW = scale · B · A. What a format can express (one rank, one scale, which
modules) is the pipeline's business (`pipeline/convert_formats.py`); these modules only map names and layouts.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from adapterops.core.finite import FLOAT32_MAX, all_finite, finite_float
from adapterops.errors import AdapteropsError
from adapterops.io.paths import regular_file, safe_file

FORMATS = ("peft", "gguf", "mlx", "torchtune")
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# the Linear modules of a Llama-family decoder block, as transformers names them
BLOCK_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
TOP_LINEARS = ("lm_head",)


MAX_RANK = 1 << 24  # far above any LoRA rank; keeps a lying rank from sizing anything
# what a PEFT adapter's factors may be (io/adapter.py): the same rule for every foreign format
FACTOR_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def foreign_number(value: object, field: str, file: object, *, integer: bool = False, zero: bool = False) -> float | int:
    """A scalar read from a foreign format (GGUF metadata, an mlx-lm or torchtune config), checked: a number (not a
    bool, a string or an array), finite and within float32's range (a float can be NaN or Inf, an integer from a
    GGUF or a TOML file 400 digits long: never an OverflowError), an integer where `integer`, and positive (or also
    zero where `zero`). Anything else is one error naming the file and the field. Every format reader reads its
    numbers through here."""
    shown = f"{type(value).__name__} {value!r:.40}"
    if isinstance(value, bool) or type(value).__name__ == "bool_" or not isinstance(value, numbers.Real):
        raise AdapteropsError(f"{field} must be a number, got {shown}", file=file)
    if integer:
        if not isinstance(value, numbers.Integral):
            raise AdapteropsError(f"{field} must be an integer, got {shown}", file=file)
        number: float | int = int(value)
        if number > MAX_RANK:
            raise AdapteropsError(f"{field} is {shown}, more than any rank", file=file)
    else:
        number = finite_float(value)
        if number is None or abs(number) > FLOAT32_MAX:
            raise AdapteropsError(f"{field} must be a finite number (within float32's range), got {shown}", file=file)
    if number < 0 or (number == 0 and not zero):
        raise AdapteropsError(f"{field} must be {'zero or more' if zero else 'positive'}, got {shown}", file=file)
    return number


def check_factors(module: str, a: torch.Tensor, b: torch.Tensor, scale: float, file: object,
                  names: tuple[str, str]) -> None:
    """A foreign module's factors pass the rule a PEFT adapter's do before anything is computed or written from them:
    2-D floating-point tensors (float32, bfloat16, float16, float64) with no zero dimension, sharing a rank, no NaN
    or Inf, and lora_B times the scale still finite in float32 (where a conversion folds the scale in). `names`:
    the two tensors' names in the file, for the error."""
    for t, name in ((a, names[0]), (b, names[1])):
        if t.dtype not in FACTOR_DTYPES:
            raise AdapteropsError(f"LoRA tensor of module {module} is {str(t.dtype).removeprefix('torch.')} (not floating "
                                  "point); a LoRA adapter's factors must be float32, bfloat16, float16 or float64",
                                  file=file, tensor=name)
        if t.dim() != 2 or 0 in t.shape:
            raise AdapteropsError(f"LoRA tensor of module {module} has shape {list(t.shape)}: not a 2-D factor without a "
                                  "zero dimension", file=file, tensor=name)
        if not all_finite(t):
            raise AdapteropsError("holds NaN or Inf values", file=file, tensor=name)
    if a.shape[0] != b.shape[1]:
        raise AdapteropsError(f"lora_A {list(a.shape)} and lora_B {list(b.shape)} of module {module} do not share a rank",
                              file=file, tensor=names[0])
    if abs(scale) * a.shape[0] > FLOAT32_MAX:  # the alpha a one-alpha target writes (scale · r) must be a float32
        raise AdapteropsError(f"the scale {scale:g} of module {module} makes its alpha (scale · rank {a.shape[0]}) "
                              "overflow float32", file=file, tensor=names[1])
    top = float(b.abs().max()) * abs(scale)
    if not math.isfinite(top) or top > FLOAT32_MAX:
        raise AdapteropsError(f"the scale {scale:g} makes lora_B of module {module} overflow float32", file=file,
                              tensor=names[1])


@dataclass
class Factors:
    """One module's LoRA: ΔW = scale · b @ a, with a (r, in) and b (out, r) in transformers' layout."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        """The stored rank."""
        return int(self.a.shape[0])


@dataclass
class ArchInfo:
    """What the converters need to know of the base model (from its config.json)."""

    model_type: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    hidden_size: int
    intermediate_size: int
    head_dim: int
    tie_word_embeddings: bool
    vocab_size: int
    path: str | None = None

    def module_shape(self, module: str) -> tuple[int, int]:
        """(out, in) of a block or top-level Linear, by its transformers name."""
        leaf = split_module(module)[1]
        d, q, kv, i = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        shapes = {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
                  "self_attn.o_proj": (d, q), "mlp.gate_proj": (i, d), "mlp.up_proj": (i, d), "mlp.down_proj": (d, i),
                  "lm_head": (self.vocab_size, d)}
        if leaf not in shapes:
            raise AdapteropsError(f"no known shape for module {module}")
        if 0 in shapes[leaf]:
            raise AdapteropsError(f"the base's config.json does not give the sizes of module {module} (hidden_size, "
                                  "num_attention_heads, head_dim, intermediate_size, vocab_size as integers)", file=self.path)
        return shapes[leaf]


@dataclass
class FormatAdapter:
    """An adapter read from a foreign format: its modules as `Factors`, and what the file said."""

    format: str
    path: Path
    modules: dict[str, Factors]
    info: dict[str, object] = field(default_factory=dict)
    qk_interleaved: bool = False  # q/k lora_B rows still in the format's interleaved order (no head counts given)


def split_module(module: str) -> tuple[int | None, str]:
    """(block index, name inside the block) for `model.layers.N.x`, (None, name) for top-level modules."""
    m = LAYER.match(module)
    return (int(m.group(1)), m.group(2)) if m else (None, module)


def arch_info(base: str | os.PathLike) -> ArchInfo:
    """The base model's architecture from its config.json (a folder, or a config.json file itself)."""
    from adapterops.io.checkpoint import read_config

    root = Path(base)
    if not root.is_dir() and root.name != "config.json":
        raise AdapteropsError("give the base model's folder (or its config.json) for the architecture", file=root)
    # the file rule: inside the folder, or (named by the user) any symlink followed; a regular file either way
    cfg_path = safe_file(root, "config.json") if root.is_dir() else regular_file(root, "config.json")
    cfg = read_config(cfg_path)
    text = cfg.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in cfg:
        cfg = {**text, "model_type": text.get("model_type", cfg.get("model_type"))}
    def num(*keys: str) -> int:
        for k in keys:
            v = cfg.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return 0  # unknown: the formats that need it refuse the model type first

    if not isinstance(cfg.get("model_type"), str):
        raise AdapteropsError("config.json has no model_type", file=cfg_path)
    heads, hidden = num("num_attention_heads", "n_head"), num("hidden_size", "n_embd")
    info = ArchInfo(
        model_type=cfg["model_type"],
        num_layers=num("num_hidden_layers", "n_layer"),
        num_heads=heads,
        num_kv_heads=num("num_key_value_heads") or heads,
        hidden_size=hidden,
        intermediate_size=num("intermediate_size"),
        head_dim=num("head_dim") or (hidden // heads if heads else 0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        vocab_size=num("vocab_size"),
        path=str(root),
    )
    return info


def detect_format(path: str | os.PathLike) -> str | None:
    """Which adapter format a file or folder holds: "gguf", "mlx", "torchtune", "peft", or None.

    GGUF: a file starting with the GGUF magic (or a folder holding exactly one .gguf file and no PEFT weights).
    mlx-lm: a folder with adapters.safetensors. torchtune: a folder with adapter_model.pt and no PEFT weights, or
    whose adapter_model.safetensors has torchtune's keys (layers.N.attn.q_proj.lora_a.weight). PEFT: a folder with
    adapter_config.json and adapter_model.safetensors (or .bin).
    """
    from adapterops.io.formats import gguf, mlx, torchtune

    p = Path(path)
    if p.is_file():
        return "gguf" if gguf.is_gguf_file(p) else None
    if not p.is_dir():
        return None
    if mlx.is_mlx_folder(p):
        return "mlx"
    if torchtune.is_torchtune_folder(p):
        return "torchtune"
    if os.path.lexists(p / "adapter_config.json") and (
            os.path.lexists(p / "adapter_model.safetensors") or os.path.lexists(p / "adapter_model.bin")):
        return "peft"
    if gguf.gguf_in_folder(p) is not None:
        return "gguf"
    return "peft" if os.path.lexists(p / "adapter_config.json") else None
