"""`check`: will an adapter load, and take effect, in a serving engine? One finding per rule of the engine release
that applies (refused / ignored silently / served differently / fine), each with the fix adapterops can apply and
the engine source the rule comes from. With a base: modules that match nothing, shapes, tied embeddings.
"""

from __future__ import annotations

import os
from contextlib import ExitStack
from dataclasses import dataclass, field

from adapterops.io.adapter import open_adapter
from adapterops.io.checkpoint import open_checkpoint
from adapterops.io.engines import load_engine
from adapterops.io.hub import resolve
from adapterops.pipeline.options import check_count
from adapterops.pipeline.serving import findings, verdict
from adapterops.result import Result

SCHEMA = "adapterops.check/1"


@dataclass
class CheckResult(Result):
    """The findings of one adapter against one engine release (schema adapterops.check/1)."""

    schema: str
    adapter: str
    base: str | None
    engine: str
    release: str
    engine_source: dict[str, str]
    verdict: str  # the worst severity: refused | ignored | served_differently | fine
    findings: list[dict[str, object]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the engine serves the adapter as PEFT would (every finding fine)."""
        return self.verdict == "fine"


def check(
    adapter: str | os.PathLike, *, engine: str, base: str | os.PathLike | None = None, max_lora_rank: int | None = None,
    revision: str | None = None, allow_pickle: bool = False,
) -> CheckResult:
    """Check an adapter against one serving engine's rules (`engine`: vllm, sglang, tgi, lorax, llamacpp, or
    NAME@RELEASE); `max_lora_rank` models the engine's --max-lora-rank flag.

    Example::

        adapterops.check("./my-lora", engine="vllm", base="./llama").verdict
    """
    check_count("max_lora_rank", max_lora_rank)
    rules = load_engine(engine)
    path = resolve(str(adapter))
    with ExitStack() as stack:
        ad = stack.enter_context(open_adapter(path, allow_pickle, strict_patterns=False))
        ckpt = stack.enter_context(open_checkpoint(resolve(str(base), revision), allow_pickle)) if base is not None else None
        found = findings(ad, rules, ckpt, max_lora_rank=max_lora_rank)
    return CheckResult(SCHEMA, str(adapter), None if base is None else str(base), rules.engine, rules.release,
                       rules.source, verdict(found), [f.to_dict() for f in found])
