"""Which tensors belong to which kind of module: Linear weights, embeddings, and module-name patterns.

Shared by the commands that choose modules from a checkpoint's tensor names alone (quantize, extract) and by the
merge planner (tied embeddings).
"""

from __future__ import annotations

import re

import torch

INPUT_EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")
OUTPUT_EMBEDDING = "lm_head.weight"
NOT_LINEAR_SUFFIXES = INPUT_EMBEDDING_SUFFIXES + (
    OUTPUT_EMBEDDING, "wpe.weight", "embed_positions.weight", "position_embeddings.weight", "token_type_embeddings.weight",
)


def name_matches(pattern: str, module: str) -> bool:
    """transformers' rule for llm_int8_skip_modules: the module itself, a prefix at a dot, a suffix, or a regex."""
    if module == pattern or module.startswith(pattern + ".") or module.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, module) is not None
    except re.error:
        return False


def is_linear_weight(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """Whether this tensor is the 2-D weight of a Linear (or Conv1D) projection: not an embedding, lm_head or norm."""
    return name.endswith(".weight") and len(shape) == 2 and dtype.is_floating_point and not name.endswith(NOT_LINEAR_SUFFIXES)


def is_input_embedding(name: str) -> bool:
    """Whether this tensor is a token embedding (embed_tokens, wte, ...)."""
    return name.endswith(INPUT_EMBEDDING_SUFFIXES)
