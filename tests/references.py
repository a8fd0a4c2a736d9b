"""References computed live, on the machine that runs the tests, by the code that built the fixtures.

Why live: a reference whose bits depend on the CPU that computed it cannot be stored. Every LoRA merge computes
B·A with a float32 matmul (the BLAS kernel picks the summation order and whether it uses FMA), DoRA takes row
norms, conv LoRA goes through oneDNN's convolution, and bitsandbytes' double quantization subtracts a torch mean:
all of these round differently on different CPUs (AVX2, AVX-512, NEON...). PEFT run on the same machine gives
exactly adapterops' bytes, so that is what the tests compare against.

The code path is fixtures/make_fixtures.py's own (`peft_merged`, `make_nf4_reference`), imported, not copied.
It needs the dev extra (peft, transformers, bitsandbytes); without them the tests that use it skip with a reason.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest
import torch
from helpers import CASES, FIXTURES

_MODULE: ModuleType | None = None


def make_fixtures(what: str = "the PEFT reference") -> ModuleType:
    """fixtures/make_fixtures.py as a module; skips the calling test where peft or transformers is absent."""
    global _MODULE
    for package in ("peft", "transformers"):  # make_fixtures imports both
        pytest.importorskip(package, reason=f"{what} is computed live with {package} (the dev extra; .ci/run installs it)")
    if _MODULE is None:
        spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _MODULE = module
    return _MODULE


class PeftReference:
    """PEFT's merge_and_unload() + save_pretrained() for each case of fixtures/golden/cases.json, each computed once
    (on first use) per test session: `ref[case] -> (tensors, config.json or None)`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.cases = {c["case"]: c for c in CASES}
        self._done: dict[str, tuple[dict[str, torch.Tensor], dict | None]] = {}

    def __getitem__(self, case: str) -> tuple[dict[str, torch.Tensor], dict | None]:
        if case not in self._done:
            c = self.cases[case]
            self._done[case] = make_fixtures().peft_merged(c["base"], c["adapters"], c["weights"], c["dtype"], workdir=self.workdir)
        return self._done[case]


def nf4_reference(root: Path) -> Path:
    """What transformers + bitsandbytes save for llama-tied and gpt2 in 4-bit NF4 on this CPU, under ROOT/tf-*."""
    what = "the transformers + bitsandbytes NF4 checkpoint reference"
    pytest.importorskip("bitsandbytes", reason=f"{what} is computed live with bitsandbytes (the dev extra; .ci/run installs it)")
    module = make_fixtures(what)
    module.make_nf4_reference(root)
    return root
