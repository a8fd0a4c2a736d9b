"""Serving engines' rules for LoRA adapters, as data: one JSON table per engine release in
`adapterops/data/engines/` (schema `adapterops/schemas/engine-rules-1.schema.json`).

Each table says, rule by rule, what that release does with an adapter feature (DoRA, rsLoRA, patterns, ranks,
modules_to_save, embedding LoRA, key names...): `refused` (load error), `ignored` (loads, silently does nothing
with it), `served_differently` (loads and applies it with another effect than PEFT) or `fine`, and the file and
line of the engine's source the rule was read from. `pipeline/serving.py` evaluates the rules.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from adapterops.errors import AdapteropsError

SEVERITIES = ("refused", "ignored", "served_differently", "fine")
RULES = (
    "dora", "lora_bias", "bias", "modules_to_save", "use_rslora", "rank_pattern", "alpha_pattern", "max_rank",
    "rank_padding", "unsupported_module", "embedding_lora", "lm_head_lora", "key_prefix", "language_model_prefix", "partial_layers",
    "target_modules_string", "tied_lm_head", "unmatched_module",
)


@dataclass(frozen=True)
class Rule:
    """What one engine release does with one adapter feature, and where its source says so."""

    severity: str
    source: str
    quote: str = ""


@dataclass(frozen=True)
class EngineRules:
    """One engine release's table."""

    engine: str  # the --for name: vllm, sglang, tgi, lorax, llamacpp
    name: str  # as people write it: vLLM, text-generation-inference...
    release: str
    source: dict[str, str]
    rules: dict[str, Rule]
    max_rank_default: int | None = None
    max_rank_allowed: tuple[int, ...] | None = None
    max_rank_option: str | None = None
    max_rank_source: str = ""
    rank_padding: dict[str, Any] | None = None  # {"min": 8, "block": 16, "source": ...}: SGMV padding (TGI, LoRAX)
    supported_modules: tuple[str, ...] | None = None  # None: every Linear of the model
    embedding_modules: tuple[str, ...] = ()
    modules_source: str = ""
    modules_to_save_accepted: tuple[str, ...] = field(default_factory=tuple)

    @property
    def label(self) -> str:
        """`vLLM 0.33.0`."""
        return f"{self.name} {self.release}"

    @property
    def key(self) -> str:
        """`vllm@0.33.0`: what --for accepts to pin this release."""
        return f"{self.engine}@{self.release}"

    def padded_rank(self, r: int) -> int:
        """The rank the engine pads r to (SGMV: at least `min`, then a multiple of `block`), or r."""
        if not self.rank_padding:
            return r
        lo, block = self.rank_padding["min"], self.rank_padding["block"]
        return lo if r <= lo else -(-r // block) * block


def _tables() -> dict[str, dict[str, Any]]:
    """Every shipped table by file name."""
    folder = resources.files("adapterops").joinpath("data/engines")
    return {p.name: json.loads(p.read_text(encoding="utf-8")) for p in folder.iterdir() if p.name.endswith(".json")}


def _parse(data: dict[str, Any]) -> EngineRules:
    mr, mods = data["max_rank"], data["modules"]
    return EngineRules(
        engine=data["engine"], name=data["name"], release=data["release"], source=data["source"],
        rules={k: Rule(v["severity"], v["source"], v.get("quote", "")) for k, v in data["rules"].items()},
        max_rank_default=mr.get("default"), max_rank_allowed=tuple(mr["allowed"]) if mr.get("allowed") else None,
        max_rank_option=mr.get("option"), max_rank_source=mr.get("source", ""), rank_padding=data.get("rank_padding"),
        supported_modules=tuple(mods["supported"]) if mods.get("supported") is not None else None,
        embedding_modules=tuple(mods.get("embedding") or ()), modules_source=mods.get("source", ""),
        modules_to_save_accepted=tuple(data.get("modules_to_save_accepted") or ()),
    )


def all_engines() -> list[EngineRules]:
    """Every engine release adapterops knows, sorted by engine then release."""
    return sorted((_parse(d) for d in _tables().values()), key=lambda e: (e.engine, e.release))


ALIASES = {"text-generation-inference": "tgi", "llama.cpp": "llamacpp", "llama-cpp": "llamacpp", "gguf": "llamacpp"}


def engine_names() -> list[str]:
    """The --for names (each engine once)."""
    return sorted({e.engine for e in all_engines()})


def load_engine(spec: str) -> EngineRules:
    """The table for `ENGINE` (its newest release here) or `ENGINE@RELEASE`."""
    name, _, release = spec.strip().partition("@")
    name = ALIASES.get(name.lower(), name.lower())
    found = [e for e in all_engines() if e.engine == name]
    if not found:
        raise AdapteropsError(f"unknown engine {spec!r}; known: {', '.join(engine_names())}")
    if release:
        exact = [e for e in found if e.release == release]
        if not exact:
            raise AdapteropsError(f"no rules for {name} release {release!r}; known: {', '.join(e.release for e in found)}")
        return exact[0]
    return found[-1]
