"""Every operation adapterops has, in one table that the public API, the CLI and batch manifests all read.

An op is a module `adapterops/ops/NAME.py` with a library function `NAME(...)` that returns a `Result`. Its entry
here says which of the function's parameters are inputs (paths or Hub ids, hashed by batch for provenance), which
input fans out into one batch task per glob match, and what it writes. Nothing here imports an op until it is
used, so `adapterops --help` stays free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import import_module
from typing import Any


@dataclass(frozen=True)
class Op:
    """One operation: its library call, its inputs, and how batch runs it."""

    name: str  # the command, the library function and the module adapterops/ops/NAME.py
    result: str  # the result type's name in that module
    inputs: tuple[str, ...]  # input parameters, in the order the call takes them positionally
    required: tuple[str, ...]
    expand: str | None  # the input whose glob matches become one batch task each
    lists: tuple[str, ...] = ()  # inputs that take several paths (all matches go to one task)
    keyword_inputs: tuple[str, ...] = ()  # optional path inputs passed by keyword (hashed like the others)
    report: bool = False  # writes no folder: batch stores its result as a JSON report file

    @property
    def module(self) -> str:
        """The op's module path."""
        return f"adapterops.ops.{self.name}"

    def load(self) -> Callable[..., Any]:
        """The library function (imports the op, and so torch, on first use)."""
        return getattr(import_module(self.module), self.name)

    def result_type(self) -> type:
        """The dataclass the function returns."""
        return getattr(import_module(self.module), self.result)


OPS: dict[str, Op] = {op.name: op for op in (
    Op("merge", "MergeResult", ("base", "adapters"), ("base",), "adapter", lists=("adapters",)),
    Op("unmerge", "UnmergeResult", ("merged", "adapters"), ("merged",), "merged", lists=("adapters",)),
    Op("rescale", "RescaleResult", ("adapter",), ("adapter",), "adapter"),
    Op("rerank", "RerankResult", ("adapter",), ("adapter",), "adapter"),
    Op("stack", "StackResult", ("adapters",), ("adapters",), None, lists=("adapters",), keyword_inputs=("base",)),
    Op("extract", "ExtractResult", ("base", "tuned"), ("base", "tuned"), "tuned"),
    Op("quantize", "QuantizeResult", ("base",), ("base",), "base"),
    Op("dequantize", "DequantizeResult", ("base",), ("base",), "base"),
    Op("analyze", "AnalyzeReport", ("adapter",), ("adapter",), "adapter", keyword_inputs=("base", "compare"), report=True),
    Op("inspect", "InspectResult", ("path",), ("path",), "path", report=True),
    Op("diff", "DiffResult", ("a", "b"), ("a", "b"), "a", report=True),
    Op("check", "CheckResult", ("adapter",), ("adapter",), "adapter", keyword_inputs=("base",), report=True),
    Op("convert", "ConvertResult", ("adapter",), ("adapter",), "adapter", keyword_inputs=("base",)),
)}


def get(name: str) -> Op:
    """The op of this name (KeyError for an unknown one)."""
    return OPS[name]
