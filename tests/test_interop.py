"""Interoperability: transformers loads our merged output and computes the logits of the PEFT-merged model.

Skips where transformers or peft is absent (`.ci/run` installs both). Tolerance: exact equality of logits, since
the weights are bit-identical and both models run the same transformers code on the same CPU.
"""

from __future__ import annotations

import pytest
import torch

import adapterops
from conftest import ADAPTERS, MODELS

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
