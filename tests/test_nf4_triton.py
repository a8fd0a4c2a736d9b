"""The fused Triton kernels against the torch path (itself pinned to bitsandbytes' CUDA bytes in test_nf4.py).

Where there is no GPU they run in Triton's interpreter (TRITON_INTERPRET=1, set in a subprocess because Triton
reads it when the kernels are defined). Tolerance: none; every packed byte, absmax and dequantized value must
equal the torch path's, on the golden inputs and on edge cases (odd sizes, partial blocks, zero blocks, NaN,
Inf; float32, bfloat16, float16); a NaN only has to be a NaN (its payload bits carry no meaning). Skips where triton is not installed (the `gpu` extra; `.ci/run` has it).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from helpers import FIXTURES, read_file
from adapterops.core import nf4

def same(a, b):
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:  # NaN payloads carry no meaning: NaN where NaN, every other value's bits
        nan = torch.isnan(a)
        if not torch.equal(nan, torch.isnan(b)):
            return False
        a, b = a[~nan], b[~nan]
    return torch.equal(a.reshape(-1).contiguous().view(torch.uint8), b.reshape(-1).contiguous().view(torch.uint8))

def check(x, bs, dq, label):
    p1, s1 = nf4.quantize(x, bs, dq, backend="torch")
    p2, s2 = nf4.quantize(x, bs, dq, backend="triton")
    assert same(p1, p2), ("packed", label)
    assert same(s1.absmax, s2.absmax), ("absmax", label)
    if dq:
        assert same(s1.nested_absmax, s2.nested_absmax) and same(s1.offset, s2.offset), ("nested", label)
    d1, d2 = nf4.dequantize(p1, s1, backend="torch"), nf4.dequantize(p1, s1, backend="triton")
    assert same(d1, d2), ("dequantize", label)

gold = read_file(FIXTURES / "nf4" / "golden.safetensors")
cases = sorted({{k.split(".")[0] for k in gold}})
for c in cases:
    for bs, dq in ((64, True), (128, False), (256, True)):
        check(gold[c + ".input"], bs, dq, (c, bs, dq))
g = torch.Generator().manual_seed(0)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for n in (1, 2, 63, 65, 129, 1001, 4097):
        x = torch.randn(n, generator=g).to(dtype)
        check(x, 64, True, (dtype, n))
    x = torch.randn(4, 256, generator=g).to(dtype)
    x[0] = 0.0                                   # a zero block
    x[1, 3] = float("nan"); x[2, 5] = float("inf"); x[3, 7] = -float("inf")
    for bs in (32, 64, 256, 1024):
        check(x, bs, False, (dtype, "specials", bs))
print("ok", len(cases))
"""


def test_triton_kernels_equal_the_torch_path():
    tests = str(Path(__file__).resolve().parent)
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr[-3000:]
    assert res.stdout.startswith("ok ")


def test_auto_backend_keeps_the_cpu_on_torch():
    """Without CUDA, "auto" never imports triton; asking for the triton backend on the CPU is a clear error."""
    import torch

    from adapterops.core import nf4

    x = torch.randn(100)
    if os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="triton backend needs"):
            nf4.quantize(x, 64, True, backend="triton")
    packed, state = nf4.quantize(x, 64, True)  # auto: the torch path
    assert packed.shape == (50, 1)
