"""adapterops: surgery on model checkpoints and LoRA adapters — merge, unmerge, rescale, re-rank, stack, extract,
analyse, quantize to NF4 and back, and all of it in batches.

Every command of the `adapterops` CLI is a function here with the same verb, returning a result dataclass
(`.to_dict()` gives the CLI's `--json`); bad input raises `AdapteropsError` with a one-line message:

>>> import adapterops
>>> result = adapterops.merge("fixtures/models/llama-tied", "fixtures/adapters/llama-lora", "/tmp/merged")  # doctest: +SKIP
>>> result.modules_merged  # doctest: +SKIP
14

The functions are imported on first use (torch with them), so `import adapterops` itself is light.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from adapterops.errors import AdapteropsError
from adapterops.registry import OPS
from adapterops.version import __version__

_BATCH = {"run_batch": "adapterops.batch.runner", "BatchResult": "adapterops.batch.runner"}
_LAZY: dict[str, tuple[str, str]] = {
    **{op.name: (op.module, op.name) for op in OPS.values()},
    **{op.result: (op.module, op.result) for op in OPS.values()},
    **{name: (module, name) for name, module in _BATCH.items()},
}
__all__ = ["AdapteropsError", "__version__", *_LAZY]

if TYPE_CHECKING:  # for type checkers and editors; at run time these come lazily through __getattr__
    from adapterops.batch.runner import BatchResult, run_batch
    from adapterops.ops.analyze import AnalyzeReport, analyze
    from adapterops.ops.check import CheckResult, check
    from adapterops.ops.convert import ConvertResult, convert
    from adapterops.ops.dequantize import DequantizeResult, dequantize
    from adapterops.ops.diff import DiffResult, diff
    from adapterops.ops.extract import ExtractResult, extract
    from adapterops.ops.inspect import InspectResult, inspect
    from adapterops.ops.merge import MergeResult, merge
    from adapterops.ops.quantize import QuantizeResult, quantize
    from adapterops.ops.rerank import RerankResult, rerank
    from adapterops.ops.rescale import RescaleResult, rescale
    from adapterops.ops.stack import StackResult, stack
    from adapterops.ops.unmerge import UnmergeResult, unmerge


def __getattr__(name: str) -> Any:
    """Import an op (and torch) only when it is first used."""
    try:
        module, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'adapterops' has no attribute {name!r}") from None
    from importlib import import_module

    value = getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
