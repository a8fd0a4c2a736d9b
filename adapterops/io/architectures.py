"""Which of a checkpoint's 2-D weights transformers + bitsandbytes leave unquantized, per architecture.

transformers' 4-bit loader turns into `Linear4bit` exactly the modules of type `nn.Linear` (or GPT-2's `Conv1D`)
that its not-convert list does not match; that list is the model's tied weights, its last parameter, its output
embedding (whatever it is called: `lm_head`, GPT-NeoX's `embed_out`, ...) and its `_keep_in_fp32_modules` (T5's
`wo`). Everything else with a 2-D weight (embeddings, routers, relative attention biases) is not a Linear at all.
`data/architectures.json` holds that decision per model_type and head class, generated from transformers itself by
`fixtures/make_architectures.py`; a model_type it does not know gets a fallback rule, and a warning says so.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import torch

from adapterops.core.names import is_input_embedding, is_linear_weight

OUTPUT_HEAD = "lm_head"  # transformers' usual output-embedding module name


@dataclass(frozen=True)
class Unquantized:
    """What `quantize` leaves in full precision.

    `quantizable`: the 2-D weights transformers would load as Linear4bit (before any user --skip).
    `skip_modules`: the entries llm_int8_skip_modules must hold for transformers to leave the same Linears
    unconverted when it is given an explicit list (transformers' own module names: GPT-NeoX's is `lm_head`).
    `rule`: "transformers <version>: <model_type>/<class>" or "fallback".
    """

    quantizable: frozenset[str]
    skip_modules: tuple[str, ...]
    rule: str
    warnings: tuple[str, ...] = field(default=())

    @property
    def fallback(self) -> bool:
        """Whether the model_type was unknown and the fallback rule decided."""
        return self.rule == "fallback"


@cache
def table() -> dict:
    """The generated table (adapterops/data/architectures.json)."""
    return json.loads(resources.files("adapterops.data").joinpath("architectures.json").read_text())


def _head_class(config: Mapping, classes: Mapping[str, dict]) -> str | None:
    """The config's architecture if the table has it, else the model_type's first head class (causal LM first)."""
    archs = config.get("architectures")
    for arch in archs if isinstance(archs, list) else []:
        if isinstance(arch, str) and arch in classes:
            return arch
    return next(iter(classes), None)


def _is_2d_float_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    return name.endswith(".weight") and len(shape) == 2 and dtype.is_floating_point


def _output_embeddings(tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[str]:
    """The fallback's output embeddings: a 2-D weight outside the repeated layers whose module name ends in an
    output-embedding name some architecture in the table uses (`lm_head`, `embed_out`, `output`, ...), or whose
    shape is the input embedding's [vocab, hidden]."""
    known = set(table()["output_embedding_names"]) | {OUTPUT_HEAD}
    emb_shapes = {shape for name, (shape, _) in tensors.items() if is_input_embedding(name) and len(shape) == 2}
    found = []
    for name, (shape, dtype) in tensors.items():
        if not _is_2d_float_weight(name, shape, dtype) or is_input_embedding(name):
            continue
        module = name[: -len(".weight")]
        if any(part.isdigit() for part in module.split(".")):
            continue
        if shape in emb_shapes or any(module == n or module.endswith("." + n) for n in known):
            found.append(module)
    return sorted(found)


def unquantized(config: Mapping | None, tensors: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> Unquantized:
    """Decide, from a checkpoint's config and its tensor names, shapes and dtypes, which weights transformers +
    bitsandbytes would quantize and which they leave in full precision."""
    config = config or {}
    data = table()
    model_type = config.get("model_type")
    classes = data["model_types"].get(model_type, {}) if isinstance(model_type, str) else {}
    head = _head_class(config, classes)
    if head is not None:
        entry = classes[head]
        keep = [re.compile(p) for p in entry["keep"]]
        quantizable = frozenset(
            name for name, (shape, dtype) in tensors.items()
            if _is_2d_float_weight(name, shape, dtype) and not any(p.fullmatch(name[: -len(".weight")]) for p in keep))
        return Unquantized(quantizable, tuple(entry["skip_modules"]), f"transformers {data['transformers']}: {model_type}/{head}")
    heads = _output_embeddings(tensors)
    quantizable = frozenset(name for name, (shape, dtype) in tensors.items()
                            if is_linear_weight(name, shape, dtype) and name[: -len(".weight")] not in heads)
    why = f"model_type {model_type!r} is not in the table of transformers {data['transformers']}" if model_type else "the config has no model_type"
    warning = (f"{why}: used the fallback rule (left unquantized the embeddings and the output embedding: "
               f"{', '.join(heads) or 'none found'}); check that transformers loads the output")
    return Unquantized(quantizable, tuple(sorted(set(heads) | {OUTPUT_HEAD})), "fallback", (warning,))
