"""Row orders of the query and key projections: transformers' rotate-half RoPE layout and the interleaved one that
llama.cpp (GGUF) and torchtune use for Llama-family models (pure functions).

transformers keeps each head's rotary pairs as (first half, second half); Meta's checkpoints, llama.cpp and
torchtune keep them interleaved. Converters permute the rows of q_proj and k_proj weights (k with the KV-head
count), and a LoRA's ΔW = B·A changes rows through lora_B only, so lora_B's rows are permuted the same way.
"""

from __future__ import annotations

import torch


def heads_problem(rows: int, n_heads: int) -> str | None:
    """Why `rows` output features cannot be split into `n_heads` heads of rotary pairs, or None."""
    if n_heads <= 0 or rows % n_heads or (rows // n_heads) % 2:
        return f"{rows} rows do not split into {n_heads} heads of an even size"
    return None


def to_interleaved(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows in rotate-half order (transformers) → interleaved order (llama.cpp's and torchtune's `permute`)."""
    rows = t.shape[0]
    return t.reshape(n_heads, 2, rows // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()


def from_interleaved(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """The inverse of `to_interleaved` (torchtune's `_permute_lora_matrix`)."""
    rows = t.shape[0]
    return t.reshape(n_heads, rows // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape).contiguous()
