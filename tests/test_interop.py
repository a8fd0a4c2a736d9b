"""Interoperability: transformers loads our merged output and computes the logits of the PEFT-merged model.

Skips where transformers or peft is absent (`.ci/run` installs both). Tolerance: exact equality of logits, since
the weights are bit-identical and both models run the same transformers code on the same CPU.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ADAPTERS, MODELS

import adapterops

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.mark.parametrize(
    "base,adapter",
    [("llama-tied", "llama-lora"), ("llama-tied", "llama-dora"), ("llama-tied", "llama-tied-mts"),
     ("llama-untied", "llama-lora-bias"), ("gpt2", "gpt2-dora"), ("llama-tied", "llama-embedding")],
)
def test_transformers_loads_merged_output_with_peft_logits(base, adapter, out):
    adapterops.merge(MODELS / base, ADAPTERS / adapter, out)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2]])
    ours = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ref = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(MODELS / base), ADAPTERS / adapter)
    ref = ref.merge_and_unload().eval()
    with torch.no_grad():
        got, want = ours(ids).logits, ref(ids).logits
    assert got.dtype == want.dtype
    assert torch.equal(got, want)
    base_logits = transformers.AutoModelForCausalLM.from_pretrained(MODELS / base).eval()(ids).logits
    assert not torch.equal(got, base_logits)  # the adapter really changed the model


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-dora"])
def test_transformers_loads_unmerged_output_with_the_base_logits(adapter, tmp_path):
    """Tolerance 1e-5 absolute on logits of size ~1: in float32 each unmerged weight is within a few ulps (~1e-7
    relative) of the base, and those differences move a 2-layer model's logits by far less than 1e-5."""
    from adapterops.ops.unmerge import unmerge

    adapterops.merge(MODELS / "llama-tied", ADAPTERS / adapter, tmp_path / "m", dtype="float32")
    unmerge(tmp_path / "m", ADAPTERS / adapter, tmp_path / "u")
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2]])
    with torch.no_grad():
        got = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "u").eval()(ids).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(MODELS / "llama-tied", dtype=torch.float32).eval()(ids).logits
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(ids).logits
    assert got.dtype == torch.float32
    assert torch.allclose(got, base, rtol=0, atol=1e-5), float((got - base).abs().max())
    assert not torch.allclose(merged, base, rtol=0, atol=1e-3)  # the merge really moved the logits
