"""PEFT trainable tokens (`tuners/trainable_tokens`): trained rows of an embedding, stored as a small delta tensor.

Two ways PEFT writes them:
- `peft_type: TRAINABLE_TOKENS` alone: `token_indices` (a list) for every module in `target_modules`; tensors
  `<module>.trainable_tokens_delta`. With a tied `lm_head`, PEFT also saves `lm_head.trainable_tokens_delta`
  (the same rows: the tied layer shares its delta).
- beside LoRA (`trainable_token_indices` in a LoraConfig): a list (rows of the input embedding) or an object
  `{module name: rows}`; tensors `<module>.token_adapter.trainable_tokens_delta`.

Despite its name the "delta" holds the rows themselves: PEFT's merge is `W.index_copy(0, indices, delta.to(W))`,
the trained rows replace the base's, cast to the base dtype (pipeline/token_steps.py does the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapterops.errors import AdapteropsError

DELTA = "trainable_tokens_delta"
WRAPPED = ".token_adapter." + DELTA
PLAIN = "." + DELTA


@dataclass(frozen=True)
class TokenModule:
    """The trained rows of one embedding (or lm_head): which rows, and the adapter tensor that holds them."""

    name: str  # module path, e.g. model.embed_tokens
    key: str  # adapter tensor [len(indices), dim]
    indices: tuple[int, ...]


def token_module_name(name: str) -> str | None:
    """The module a trainable-tokens tensor belongs to (PEFT prefix already removed), None for other tensors."""
    for suffix in (WRAPPED, PLAIN):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _index_list(value: Any, what: str, cfg_path: Path) -> tuple[int, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise AdapteropsError(f"{what} must be a non-empty list of non-negative token ids", file=cfg_path)
    if len(set(value)) != len(value):
        # index_copy with a repeated index keeps an unspecified one of the rows: no merge can promise PEFT's bytes
        raise AdapteropsError(f"{what} lists a token id twice", file=cfg_path)
    return tuple(value)


def check_token_config(cfg: dict[str, Any], cfg_path: Path) -> None:
    """The config's token indices must be lists of distinct non-negative integers."""
    if str(cfg.get("peft_type", "")).upper() == "TRAINABLE_TOKENS":
        _index_list(cfg.get("token_indices"), "token_indices", cfg_path)
        return
    tti = cfg.get("trainable_token_indices")
    if tti is None:
        return
    if isinstance(tti, dict):
        for k, v in tti.items():
            _index_list(v, f"trainable_token_indices[{k!r}]", cfg_path)
    else:
        _index_list(tti, "trainable_token_indices", cfg_path)


def indices_for(cfg: dict[str, Any], module: str, cfg_path: Path) -> tuple[int, ...]:
    """The rows a module's trainable tokens replace, as the config gives them."""
    if str(cfg.get("peft_type", "")).upper() == "TRAINABLE_TOKENS":
        return _index_list(cfg.get("token_indices"), "token_indices", cfg_path)
    tti = cfg.get("trainable_token_indices")
    if isinstance(tti, list):
        return _index_list(tti, "trainable_token_indices", cfg_path)
    if isinstance(tti, dict):  # PEFT matches a key as the module's name or its last dotted part(s)
        hits = [k for k in tti if module == k or module.endswith("." + k)]
        if len(hits) == 1:
            return _index_list(tti[hits[0]], f"trainable_token_indices[{hits[0]!r}]", cfg_path)
    raise AdapteropsError(f"trainable tokens of module {module} but the config gives no token indices for it", file=cfg_path)
