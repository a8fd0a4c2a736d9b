"""`adapterops extract`: a LoRA adapter from TUNED − BASE.

Tolerances:
- Recovery: tuned = merge(base, adapter) holds W + ΔW rounded, i.e. ΔW + E with E the merge's rounding. By
  Eckart–Young the rank-r extraction X satisfies ‖X − ΔW‖_F ≤ 2‖E‖_F; we assert that bound, E measured, plus
  1e-5·‖ΔW‖_F for our own float32 arithmetic (SVD and factors stored in float32 re-round ΔW at ~1e-6).
- Truncation: the error equals √Σ(discarded σ²) of numpy's dense SVD to 1e-4 relative (float32 SVDs).
- PEFT logits: 1e-4 absolute (float32 model; the extracted factors re-round ΔW).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, copy_fixture, leftovers, read_all, tree_hash

import adapterops
from adapterops.cli import cli
from adapterops.core.lora import delta_weight
from adapterops.io.adapter import open_adapter
from adapterops.ops.extract import extract


def deltas(path) -> dict[str, torch.Tensor]:
    """Every module's ΔW in the base layout (float64), from an adapter's factors."""
    ad = open_adapter(path)
    out = {}
    for name, mod in ad.modules.items():
        d = delta_weight(mod.kind, ad.read(mod.a_key), ad.read(mod.b_key), mod.scale, fan_in_fan_out=ad.fan_in_fan_out)
        out[name] = d.double()
    ad.close()
    return out


def cli_extract(*args):
    """Run the CLI and return its JSON summary."""
    res = CliRunner().invoke(cli, ["extract", *map(str, args), "--json", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.mark.parametrize("base,adapter,dtype", [
    ("llama-tied", "llama-lora", "float32"), ("llama-tied", "llama-lora", None), ("gpt2", "gpt2-lora", None),
    ("llama-tied", "llama-rslora-patterns", "float32"),
])
def test_extract_recovers_a_merged_adapter(base, adapter, dtype, tmp_path):
    adapterops.merge(MODELS / base, ADAPTERS / adapter, tmp_path / "tuned", dtype=dtype)
    r = open_adapter(ADAPTERS / adapter)
    rank = max(m.r for m in r.modules.values())
    r.close()
    summary = cli_extract(MODELS / base, tmp_path / "tuned", tmp_path / "x", "--rank", rank)
    want, got = deltas(ADAPTERS / adapter), deltas(tmp_path / "x")
    b, t = read_all(MODELS / base), read_all(tmp_path / "tuned")
    assert sorted(got) == sorted(want)
    for name, d in want.items():
        key = f"{name}.weight"
        stored = (t[key].double() - b[key].double())  # ΔW + E, in the stored layout
        e = torch.linalg.norm(stored - d)  # (deltas() follows fan_in_fan_out: GPT-2's are in the stored layout too)
        assert torch.linalg.norm(got[name] - d) <= 2 * e + 1e-5 * torch.linalg.norm(d), name
    linear = [k for k in b if k.endswith("proj.weight") or k.endswith(("c_attn.weight", "c_fc.weight"))]
    assert summary["retained_fro"] > 0.999 and summary["unchanged"] == len(linear) - len(want)


def test_truncation_error_is_the_discarded_singular_values(tmp_path):
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "tuned", dtype="float32")
    summary = cli_extract(MODELS / "llama-tied", tmp_path / "tuned", tmp_path / "x", "--rank", 3, "--split", "b")
    got = deltas(tmp_path / "x")
    b, t = read_all(MODELS / "llama-tied"), read_all(tmp_path / "tuned")
    for name, x in got.items():
        full = (t[f"{name}.weight"].double() - b[f"{name}.weight"].double()).numpy()
        s = np.linalg.svd(full, compute_uv=False)
        predicted = np.sqrt((s[3:] ** 2).sum())
        assert abs(float(torch.linalg.norm(x - torch.from_numpy(full))) - predicted) <= 1e-4 * np.linalg.norm(s), name
        assert summary["modules"][name]["rank"] == 3
        assert summary["modules"][name]["retained_fro"] == pytest.approx(np.sqrt((s[:3] ** 2).sum()) / np.linalg.norm(s), rel=1e-4)


def test_energy_picks_the_fewest_singular_values_per_module(tmp_path):
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-rslora-patterns", tmp_path / "tuned", dtype="float32")
    summary = cli_extract(MODELS / "llama-tied", tmp_path / "tuned", tmp_path / "x", "--energy", 0.9)
    b, t = read_all(MODELS / "llama-tied"), read_all(tmp_path / "tuned")
    ranks = set()
    for name, info in summary["modules"].items():
        s = np.linalg.svd((t[f"{name}.weight"].double() - b[f"{name}.weight"].double()).numpy(), compute_uv=False)
        share = np.cumsum(s**2) / (s**2).sum()
        assert info["rank"] == int(np.searchsorted(share, 0.9) + 1), name
        ranks.add(info["rank"])
    cfg = json.loads((tmp_path / "x" / "adapter_config.json").read_text())
    assert len(ranks) > 1 and cfg["rank_pattern"] and cfg["rank_pattern"] == cfg["alpha_pattern"]
    ad = open_adapter(tmp_path / "x")  # PEFT's rules give every module the rank we chose, at scale 1
    assert {n: m.r for n, m in ad.modules.items()} == {n: i["rank"] for n, i in summary["modules"].items()}
    assert all(m.scale == 1.0 for m in ad.modules.values())
    ad.close()


def test_target_and_embeddings(tmp_path):
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-embedding", tmp_path / "tuned", dtype="float32")
    with pytest.raises(adapterops.AdapteropsError, match="every chosen weight is identical"):
        extract(MODELS / "llama-tied", tmp_path / "tuned", tmp_path / "x", rank=4)
    summary = cli_extract(MODELS / "llama-tied", tmp_path / "tuned", tmp_path / "x", "--rank", 16, "--embeddings")
    assert list(summary["modules"]) == ["model.embed_tokens"]
    want, got = deltas(ADAPTERS / "llama-embedding"), deltas(tmp_path / "x")
    d = want["model.embed_tokens"] + want["lm_head"]  # lm_head is tied: both LoRAs were merged into the embedding
    assert torch.linalg.norm(got["model.embed_tokens"] - d) <= 1e-5 * torch.linalg.norm(d)
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "t2", dtype="float32")
    summary = cli_extract(MODELS / "llama-tied", tmp_path / "t2", tmp_path / "y", "--rank", 2, "--target", "q_proj",
                      "--target", r"model\.layers\.1\.mlp\.down_proj")
    assert sorted(summary["modules"]) == ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                                         "model.layers.1.self_attn.q_proj"]
    cfg = json.loads((tmp_path / "y" / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)  # a subset of down_proj: an exact regex, not leaf names
    assert "other tensors differ" in " ".join(summary["warnings"])


def test_bad_extract_inputs_write_nothing(tmp_path):
    tuned = copy_fixture("model", "llama-tied", tmp_path)
    before = tree_hash(tuned)
    cases = [
        (["--rank", "4", "--energy", "0.9"], "exactly one of --rank or --energy"),
        ([], "exactly one of --rank or --energy"),
        (["--rank", "4", "--target", "nope_proj"], "matches no Linear module"),
        (["--rank", "4"], "nothing to extract"),
    ]
    for args, msg in cases:
        res = CliRunner().invoke(cli, ["extract", str(MODELS / "llama-tied"), str(tuned), str(tmp_path / "out"), *args])
        assert res.exit_code == 2 and msg in res.stderr and res.stderr.count("\n") == 1, (args, res.output)
        assert leftovers(tmp_path) == []
    res = CliRunner().invoke(cli, ["extract", str(MODELS / "llama-tied"), str(MODELS / "gpt2"), str(tmp_path / "out"), "--rank", "4"])
    assert res.exit_code == 2 and "is not in the fine-tuned checkpoint" in res.stderr and "model.layers.0" in res.stderr
    assert tree_hash(tuned) == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("base,adapter", [("llama-tied", "llama-lora"), ("gpt2", "gpt2-lora")])
def test_peft_loads_the_extracted_adapter(base, adapter, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    adapterops.merge(MODELS / base, ADAPTERS / adapter, tmp_path / "tuned", dtype="float32")
    cli_extract(MODELS / base, tmp_path / "tuned", tmp_path / "x", "--rank", 8)
    ids = torch.tensor([[1, 5, 9, 17, 33, 65, 127, 2]])
    with torch.no_grad():
        tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned").eval()(ids).logits
        model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / base, dtype=torch.float32)
        got = peft.PeftModel.from_pretrained(model, tmp_path / "x").eval()(ids).logits
    assert torch.allclose(got, tuned, rtol=0, atol=1e-4), float((got - tuned).abs().max())


def test_float64_precision_agrees_with_float32(tmp_path):
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "tuned", dtype="float32")
    cli_extract(MODELS / "llama-tied", tmp_path / "tuned", tmp_path / "x32", "--rank", 8)
    cli_extract(MODELS / "llama-tied", tmp_path / "tuned", tmp_path / "x64", "--rank", 8, "--precision", "float64")
    d32, d64 = deltas(tmp_path / "x32"), deltas(tmp_path / "x64")
    for name, d in d64.items():
        assert torch.linalg.norm(d32[name] - d) <= 1e-5 * torch.linalg.norm(d)
