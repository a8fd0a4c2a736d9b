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


@pytest.mark.parametrize("adapter,base,pad", [
    ("llama-lora", "llama-tied", 16), ("llama-lora", "llama-tied", 12), ("llama-rslora-patterns", "llama-tied", 16),
    ("llama-dora", "llama-tied", 13), ("llama-lora-bias", "llama-untied", 8), ("gpt2-lora", "gpt2", 10),
    ("conv-lora", "convnet", 8), ("llama-embedding", "llama-tied", 9),
])
def test_pad_alone_merges_to_the_same_bytes(adapter, base, pad, tmp_path):
    """--pad-to alone: zero rows/columns, no SVD, every scale bit for bit: merging gives byte-identical tensors."""
    from helpers import raw_bytes, read_all

    import adapterops

    summary = rerank(ADAPTERS / adapter, tmp_path / "p", "--pad-to", pad)
    assert {m["new_rank"] for m in summary["modules"].values()} == {pad}
    before, after = open_adapter(ADAPTERS / adapter), open_adapter(tmp_path / "p")
    for name, mod in before.modules.items():
        assert after.modules[name].scale == mod.scale, name  # α'/r' == α/r in double precision, as PEFT divides
        assert after.modules[name].r == pad
    adapterops.merge(MODELS / base, [ADAPTERS / adapter], tmp_path / "m1")
    adapterops.merge(MODELS / base, [tmp_path / "p"], tmp_path / "m2")
    a, b = read_all(tmp_path / "m1"), read_all(tmp_path / "m2")
    assert [k for k in a if raw_bytes(a[k]) != raw_bytes(b[k])] == []


def test_exact_alpha_for_padding(tmp_path):
    """When α'/r' == α/r in floating point (PEFT divides in double precision):
    - standard scaling, r'/r a power of two: α' = α·r'/r, always exact;
    - rsLoRA, r'/r a power of four: α' = α·√(r'/r), always exact;
    - any other ratio: a nudged α' (a few ulps from α·r'/r) hits the scale in about 92% of cases (measured over
      3000 random (r, α, r'), both scalings); otherwise no α' exists and --pad-to alone is refused for that module."""
    import random

    from adapterops.core.scaling import lora_scale
    from adapterops.ops.rerank import exact_alpha

    rng = random.Random(0)
    found = tried = 0
    for _ in range(500):
        r, alpha = rng.randint(1, 64), rng.choice([rng.randint(1, 128), round(rng.uniform(0.1, 64), 3)])
        for rslora in (False, True):
            s = lora_scale(r, alpha, rslora)
            for k in (1, 2, 3):
                ratio = 4**k if rslora else 2**k
                assert exact_alpha(s, r * ratio, rslora, alpha, r) == alpha * (2**k if rslora else ratio)
            r_new = rng.randint(r, 256)
            a = exact_alpha(s, r_new, rslora, alpha, r)
            tried += 1
            if a is not None:
                found += 1
                assert lora_scale(r_new, a, rslora) == s
    assert found / tried > 0.85
    # an unreachable scale is refused, naming the module, and nothing is written
    r, alpha, r_new = next((r, a, n) for r in range(1, 64) for a in (0.1, 0.3, 0.7, 1.1, 2.9) for n in range(r, 200)
                           if exact_alpha(lora_scale(r, a, False), n, False, a, r) is None)
    import shutil

    from safetensors.torch import load_file, save_file

    import adapterops
    from adapterops.errors import AdapteropsError

    ad = tmp_path / "ad"
    shutil.copytree(ADAPTERS / "llama-lora", ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    t = load_file(ad / "adapter_model.safetensors")
    keep = {k: v for k, v in t.items() if ".layers.0.self_attn.q_proj." in k}
    keep = {k: (v[:r] if "lora_A" in k else v[:, :r]).contiguous() for k, v in keep.items()} if r <= 8 else None
    if keep is None:
        pytest.skip("no small unreachable case")
    save_file(keep, ad / "adapter_model.safetensors", {"format": "pt"})
    cfg.update(r=r, lora_alpha=alpha, rank_pattern={}, alpha_pattern={}, target_modules=["q_proj"])
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapteropsError, match="no lora_alpha gives module"):
        adapterops.rerank(ad, tmp_path / "o", pad_to=r_new)
    assert not (tmp_path / "o").exists()
