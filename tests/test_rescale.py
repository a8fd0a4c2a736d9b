"""`adapterops rescale`: the same ΔW under the other scaling, loaded by PEFT unmodified.

Tolerances: merges of a rescaled adapter must be bit-identical to merges of the original (the fp32 scale PEFT
multiplies by is the same number); PEFT's logits with a baked adapter (scale folded into B: one more rounding of
B in float32) must agree to 1e-5 relative.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, raw_bytes, read_all

import adapterops
from adapterops.cli import cli


def rescale(*args):
    """Run the rescale command; it must succeed."""
    res = CliRunner().invoke(cli, ["rescale", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res


@pytest.mark.parametrize("adapter,to", [("llama-rslora-patterns", "standard"), ("llama-lora", "rslora"), ("llama-dora", "rslora")])
def test_rescaled_adapter_merges_to_the_same_bytes(adapter, to, tmp_path):
    rescale(ADAPTERS / adapter, tmp_path / "r", "--to", to)
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] == (to == "rslora")
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / adapter, tmp_path / "a")
    adapterops.merge(MODELS / "llama-tied", tmp_path / "r", tmp_path / "b")
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)


def test_there_and_back_restores_the_scales(tmp_path):
    rescale(ADAPTERS / "llama-rslora-patterns", tmp_path / "std", "--to", "standard")
    rescale(tmp_path / "std", tmp_path / "rs", "--to", "rslora")
    from adapterops.io.adapter import open_adapter

    orig, back = open_adapter(ADAPTERS / "llama-rslora-patterns"), open_adapter(tmp_path / "rs")
    for name, mod in orig.modules.items():
        assert torch.tensor(back.modules[name].scale, dtype=torch.float32) == torch.tensor(mod.scale, dtype=torch.float32)


def test_strength_scales_the_delta(tmp_path):
    rescale(ADAPTERS / "llama-lora", tmp_path / "half", "--strength", "0.5")
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "full", dtype="float32")
    adapterops.merge(MODELS / "llama-tied", tmp_path / "half", tmp_path / "h", dtype="float32")
    base = {k: v.float() for k, v in read_all(MODELS / "llama-tied").items()}
    full, half = read_all(tmp_path / "full"), read_all(tmp_path / "h")
    for k in base:
        torch.testing.assert_close(half[k] - base[k], 0.5 * (full[k] - base[k]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("adapter,args", [
    ("llama-rslora-patterns", ["--to", "standard"]),
    ("llama-rslora-patterns", ["--to", "standard", "--bake"]),
    ("llama-lora", ["--to", "rslora", "--bake"]),
    ("llama-lora-bias", ["--bake"]),
])
def test_peft_loads_rescaled_adapter_with_the_same_outputs(adapter, args, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    rescale(ADAPTERS / adapter, tmp_path / "r", *args)
    base = "llama-untied" if adapter == "llama-lora-bias" else "llama-tied"
    ids = torch.tensor([[1, 5, 9, 17, 33, 65]])

    def logits(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / base, dtype=torch.float32)
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(model, path).eval()(ids).logits

    want, got = logits(ADAPTERS / adapter), logits(tmp_path / "r")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = transformers.AutoModelForCausalLM.from_pretrained(MODELS / base, dtype=torch.float32).eval()(ids).logits
    assert not torch.allclose(plain, want, atol=1e-3)  # the adapter matters
