"""Merges compared byte for byte with PEFT 0.21's merge_and_unload + save_pretrained, run live on this machine.

Reference: PEFT itself, computed once per session by the `peft_reference` fixture for every case of
fixtures/golden/cases.json (fp32, bf16 and fp16 bases, LoRA, rsLoRA, patterns, DoRA, embeddings, convolutions,
lora_bias, modules_to_save, tied embeddings and weighted multi-adapter merges). It is not stored: every case
computes B·A with a float32 matmul (and DoRA norms, and conv LoRA a oneDNN convolution), whose rounding depends on
the CPU's kernels, so PEFT's bytes differ between machines while adapterops' equal PEFT's on each one.
Skips (with the reason) where peft or transformers is absent; `.ci/run` installs both.

Tolerance: none. On the CPU we run PEFT's operations in PEFT's order on the same torch backend, so every tensor
must have identical bytes and dtype.
"""

from __future__ import annotations

import json

import pytest
from helpers import ADAPTERS, CASES, MODELS, raw_bytes, read_all

import adapterops


@pytest.mark.parametrize("case", CASES, ids=[c["case"] for c in CASES])
def test_merge_matches_peft_bit_for_bit(case, out, peft_reference):
    want, want_config = peft_reference[case["case"]]
    result = adapterops.merge(
        MODELS / case["base"], [ADAPTERS / a for a in case["adapters"]], out, weights=case["weights"], dtype=case["dtype"]
    )
    ours = read_all(out)
    assert sorted(ours) == sorted(want)
    differing = [k for k in want if ours[k].dtype != want[k].dtype or raw_bytes(ours[k]) != raw_bytes(want[k])]
    assert differing == []
    assert result.modules_merged > 0
    if want_config is not None:  # tied or untied output, as PEFT's save_pretrained wrote it
        cfg = json.loads((out / "config.json").read_text())
        assert cfg.get("tie_word_embeddings", True) == want_config.get("tie_word_embeddings", True)


def test_merge_changes_the_weights(peft_reference):
    """Guard against a vacuous reference: PEFT's merge really changed the tensors the adapter targets."""
    base = read_all(MODELS / "llama-tied")
    want, _ = peft_reference["llama-lora-bf16"]
    changed = [k for k in base if raw_bytes(base[k]) != raw_bytes(want[k])]
    assert len(changed) == 14  # 7 projections x 2 layers


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device (CI has none)")
@pytest.mark.parametrize("case", [c for c in CASES if c["dtype"] in (None, "bfloat16")], ids=lambda c: c["case"])
def test_cuda_merge_within_one_ulp_of_peft(case, out, peft_reference):
    """On the GPU, cuBLAS sums B·A in another order than the CPU: allow 1 ulp of the stored dtype per element,
    against PEFT run on this machine's CPU."""
    import torch

    adapterops.merge(MODELS / case["base"], [ADAPTERS / a for a in case["adapters"]], out, weights=case["weights"],
                     dtype=case["dtype"], device="cuda")
    golden, ours = peft_reference[case["case"]][0], read_all(out)
    for k, want in golden.items():
        got = ours[k]
        assert got.dtype == want.dtype
        if want.dtype.is_floating_point:
            spacing = torch.finfo(want.dtype).eps * want.double().abs().clamp(min=torch.finfo(want.dtype).tiny)
            assert bool(((got.double() - want.double()).abs() <= spacing).all()), k
        else:
            assert torch.equal(got, want), k
