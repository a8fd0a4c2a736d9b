"""`adapterops rerank`: SVD truncation predicts its own error; full rank and padding reproduce ΔW; PEFT loads it.

Tolerances: ΔW comparisons in float32 allow 1e-5 relative to ‖ΔW‖ (the QR/SVD route re-rounds the factors);
the truncation error must equal √Σ(discarded σ²) to 1e-4 relative; PEFT logits 1e-4.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS

from adapterops.cli import cli
from adapterops.core.lora import delta_weight
from adapterops.io.adapter import open_adapter


def rerank(*args):
    """Run rerank and return its JSON summary."""
    res = CliRunner().invoke(cli, ["rerank", *map(str, args), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def deltas(path):
    """Every module's dense ΔW (tiny fixtures only), in the base layout."""
    ad = open_adapter(path)
    return {name: delta_weight(mod.kind, ad.read(mod.a_key), ad.read(mod.b_key), mod.scale) for name, mod in ad.modules.items()}


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-rslora-patterns", "gpt2-lora", "conv-lora", "llama-embedding"])
@pytest.mark.parametrize("how", [["--pad-to", "12"], ["--sv-ratio", "1e9"]])
def test_full_rank_and_padding_reproduce_delta(adapter, how, tmp_path):
    rerank(ADAPTERS / adapter, tmp_path / "r", *how)
    before, after = deltas(ADAPTERS / adapter), deltas(tmp_path / "r")
    for name, d in before.items():
        assert torch.linalg.norm(after[name] - d) <= 1e-5 * torch.linalg.norm(d), name


@pytest.mark.parametrize("split", ["balanced", "b"])
def test_truncation_error_is_the_discarded_singular_values(split, tmp_path):
    summary = rerank(ADAPTERS / "llama-lora", tmp_path / "r", "--rank", "3", "--split", split)
    before, after = deltas(ADAPTERS / "llama-lora"), deltas(tmp_path / "r")
    for name, d in before.items():
        sv = torch.linalg.svdvals(d.double())
        predicted = float((sv[3:] ** 2).sum().sqrt())
        assert abs(float(torch.linalg.norm((after[name] - d).double())) - predicted) <= 1e-4 * float(torch.linalg.norm(d)), name
        assert summary["modules"][name]["new_rank"] == 3
        assert abs(summary["modules"][name]["retained_fro"] - float((sv[:3] ** 2).sum().sqrt() / sv.norm())) < 1e-4


def test_energy_policy_and_max_rank(tmp_path):
    summary = rerank(ADAPTERS / "llama-lora", tmp_path / "r", "--energy", "0.99", "--max-rank", "5")
    assert all(m["new_rank"] <= 5 for m in summary["modules"].values())
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is False and cfg["lora_alpha"] == cfg["r"]


@pytest.mark.parametrize("adapter,base,args", [
    ("llama-lora", "llama-tied", ["--pad-to", "16"]),
    ("llama-rslora-patterns", "llama-tied", ["--energy", "0.999999"]),
    ("llama-lora-bias", "llama-untied", ["--sv-ratio", "1e9"]),
    ("gpt2-lora", "gpt2", ["--sv-ratio", "1e9"]),
])
def test_peft_loads_reranked_adapter(adapter, base, args, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    rerank(ADAPTERS / adapter, tmp_path / "r", *args)
    ids = torch.tensor([[1, 5, 9, 17, 33]])

    def logits(path):
        model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / base, dtype=torch.float32)
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(model, path).eval()(ids).logits

    torch.testing.assert_close(logits(tmp_path / "r"), logits(ADAPTERS / adapter), rtol=1e-4, atol=1e-4)


def test_two_policies_are_refused(tmp_path):
    res = CliRunner().invoke(cli, ["rerank", str(ADAPTERS / "llama-lora"), str(tmp_path / "r"), "--rank", "2", "--energy", "0.9"])
    assert res.exit_code == 2 and "exactly one of" in res.stderr and not (tmp_path / "r").exists()
