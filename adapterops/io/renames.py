"""Module paths that transformers 5 renamed while checkpoints keep their old key names, as data.

transformers loads some checkpoints under new module names and `save_pretrained` writes the old keys back
(`revert_weight_conversion`): ViT's module `vit.layers.0.attention.q_proj` is `vit.encoder.layer.0.attention.attention.query`
on disk; Mixtral's fused expert parameter `model.layers.0.mlp.experts.gate_up_proj` `[E, 2I, H]` is saved as
`model.layers.0.block_sparse_moe.experts.{e}.w1.weight` and `.w3.weight`, one `[I, H]` half each. PEFT names
adapter modules (and `target_parameters`) by the model's paths. `data/renames.json`, generated from transformers by
`fixtures/make_renames.py`, holds transformers' reversed transforms per model_type and class (their compiled
regexes, targets and scope prefixes); this module applies them as `revert_weight_conversion` does, without
transformers: renamings in order, after at most one expert converter.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any


@dataclass(frozen=True)
class Piece:
    """Where part of a model parameter lives on disk: a checkpoint key, which expert, which chunk."""

    key: str
    expert: int | None  # index along the fused [E, ...] axis; None: the whole tensor
    chunk: tuple[int, int, int] | None  # (index, count, dim in the per-expert tensor); None: all of it


class Renames:
    """One class's reversed transforms (model path -> checkpoint key)."""

    def __init__(self, rule: str, entries: list[dict[str, Any]]) -> None:
        self.rule = rule
        self.entries = [dict(e, compiled=re.compile(e["regex"])) for e in entries]
        self.renamings = [e for e in self.entries if e["kind"] == "rename"]
        self.converters = [e for e in self.entries if e["kind"] == "experts"]

    @staticmethod
    def _match(e: dict[str, Any], key: str) -> tuple[str | None, str, re.Match[str]] | None:
        """transformers' WeightTransform._scoped_match."""
        prefix = None
        if e["scope"] is not None:
            scope = f"{e['scope']}." if e["scope"] != "" else ""
            base = f"{e['base_prefix']}." if e["base_prefix"] else ""
            if key.startswith(base + scope):
                prefix = base + scope
            elif key.startswith(scope):
                prefix = scope
            else:
                return None
            key = key.removeprefix(prefix)
        m = e["compiled"].search(key)
        return None if m is None else (prefix, key, m)

    def _rename(self, e: dict[str, Any], key: str, target: str) -> str | None:
        """transformers' WeightTransform.rename_source_key with this target; None when it does not match."""
        matched = self._match(e, key)
        if matched is None:
            return None
        prefix, rest, m = matched
        if r"\1" in target:
            group = next(n for n, v in m.groupdict().items() if v is not None)
            target = target.replace(r"\1", m.group(e["compiled"].groupindex[group] + 1))
        out = rest.replace(m.group(0), target, 1)
        return (prefix or "") + out

    def _renamings(self, key: str) -> str:
        for e in self.renamings:
            key = self._rename(e, key, e["targets"][0]) or key
        return key

    def to_checkpoint(self, name: str, num_experts: int = 0) -> list[tuple[str, int | None, tuple[int, int, int] | None]]:
        """The checkpoint keys a model parameter is saved under: [(key, expert, chunk)]; experts expand `*` over
        `num_experts`."""
        for e in self.converters:
            if self._match(e, name) is None:
                continue
            out = []
            n = len(e["targets"])
            for c, target in enumerate(e["targets"]):
                renamed = self._rename(e, name, target)
                chunk = (c, n, e["chunk_dim"] - 1) if e["chunk_dim"] is not None else None
                for x in range(num_experts):
                    out.append((self._renamings(renamed.replace("*", str(x))), x, chunk))
            return out
        return [(self._renamings(name), None, None)]


@cache
def table() -> dict[str, Any]:
    """The generated table (adapterops/data/renames.json)."""
    return json.loads(resources.files("adapterops.data").joinpath("renames.json").read_text())


def tables_for(config: Mapping[str, Any] | None) -> list[Renames]:
    """The config's model_type's tables, its `architectures` class first."""
    config = config or {}
    mt = config.get("model_type")
    classes = table()["model_types"].get(mt) if isinstance(mt, str) else None
    if not classes:
        return []
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str) and a in classes]
    order = archs + [c for c in classes if c not in archs]
    return [Renames(f"transformers {table()['transformers']}: {mt}/{c}", classes[c]) for c in order]


def count_experts(keys: set[str], renames: Renames, name: str) -> int:
    """How many experts the checkpoint stores for a fused parameter (consecutive indices from 0)."""
    n = 0
    while all(k in keys for k, _, _ in renames.to_checkpoint(name, n + 1)):
        n += 1
        if n > 1 << 16:
            break
    return n


def resolve(keys: set[str], config: Mapping[str, Any] | None, name: str) -> tuple[list[Piece], str] | None:
    """Where the model parameter `name` lives in a checkpoint whose keys are `keys`: its pieces and the rule used
    ("transformers 5.x: mixtral/MixtralForCausalLM"), or None when no table maps it onto stored keys."""
    for r in tables_for(config):
        pieces = r.to_checkpoint(name, 1)
        if pieces and pieces[0][1] is not None:  # an expert converter: count the experts stored
            n = count_experts(keys, r, name)
            if n == 0:
                continue
            pieces = r.to_checkpoint(name, n)
        if pieces and pieces[0][0] != name and all(k in keys for k, _, _ in pieces):
            return [Piece(*p) for p in pieces], r.rule
    return None


def renamed_modules(keys: Iterable[str], config: Mapping[str, Any] | None) -> str | None:
    """The rule name when the config's model_type has a table (for inspect)."""
    ts = tables_for(config)
    return ts[0].rule if ts else None
