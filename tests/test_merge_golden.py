"""Merges compared byte for byte with PEFT 0.21's merge_and_unload + save_pretrained (fixtures/golden).

Tolerance: none. On the CPU we run PEFT's operations in PEFT's order on the same torch backend, so every tensor
must have identical bytes, for fp32, bf16 and fp16 bases, LoRA, rsLoRA, patterns, DoRA, embeddings, convolutions,
lora_bias, modules_to_save, tied embeddings and weighted multi-adapter merges.
"""

from __future__ import annotations

import json

import pytest
from helpers import ADAPTERS, CASES, GOLDEN, MODELS, raw_bytes, read_all, read_file

import adapterops


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_merge_matches_peft_bit_for_bit(case, out):
    result = adapterops.merge(
        MODELS / case["base"], [ADAPTERS / a for a in case["adapters"]], out, weights=case["weights"], dtype=case["dtype"]
    )
    golden = read_file(GOLDEN / case["golden"])
    ours = read_all(out)
    assert sorted(ours) == sorted(golden)
    differing = [k for k in golden if ours[k].dtype != golden[k].dtype or raw_bytes(ours[k]) != raw_bytes(golden[k])]
    assert differing == []
    assert result.modules_merged > 0
    if case["tie_word_embeddings"] is not None:
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("tie_word_embeddings", True) == case["tie_word_embeddings"]


def test_merge_changes_the_weights():
    """Guard against a vacuous golden: PEFT's merge really changed the tensors the adapter targets."""
    base = read_all(MODELS / "llama-tied")
    golden = read_file(GOLDEN / "llama-lora-bf16.safetensors")
    changed = [k for k in base if raw_bytes(base[k]) != raw_bytes(golden[k])]
    assert len(changed) == 14  # 7 projections x 2 layers


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (CI has none)")
@pytest.mark.parametrize("case", [c for c in CASES if c["dtype"] in (None, "bfloat16")], ids=lambda c: c["case"])
def test_cuda_merge_within_one_ulp_of_peft(case, out):
    """On the GPU, cuBLAS sums B·A in another order than the CPU: allow 1 ulp of the stored dtype per element."""
    import torch

    adapterops.merge(MODELS / case["base"], [ADAPTERS / a for a in case["adapters"]], out, weights=case["weights"],
                     dtype=case["dtype"], device="cuda")
    golden, ours = read_file(GOLDEN / case["golden"]), read_all(out)
    for k, want in golden.items():
        got = ours[k]
        assert got.dtype == want.dtype
        if want.dtype.is_floating_point:
            spacing = torch.finfo(want.dtype).eps * want.double().abs().clamp(min=torch.finfo(want.dtype).tiny)
            assert bool(((got.double() - want.double()).abs() <= spacing).all()), k
        else:
            assert torch.equal(got, want), k
