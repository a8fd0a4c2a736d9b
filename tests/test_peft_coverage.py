"""Adapters beyond plain LoRA on Linear layers, merged byte for byte as PEFT 0.21 merges them (issue 12, part A).

Each case builds a tiny random model with transformers (fixed seed, no download), makes the adapter with real PEFT
and fills every adapter tensor with random non-zero values, saves both, merges with PEFT's `merge_and_unload()` +
`save_pretrained()` on this machine (B·A rounds differently on different CPUs, so the reference is live, as in
test_merge_golden.py), and compares `adapterops merge` with it tensor by tensor, byte for byte.

Tolerance: none. Skips where peft or transformers is absent.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import raw_bytes, read_all

import adapterops
from adapterops.errors import AdapteropsError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _randomize(model, seed: int) -> None:
    """Random non-zero values in every adapter tensor (PEFT initialises lora_B to zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or "trainable_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.05 + p.detach())


def build(tmp: Path, model_fn, config, seed: int = 0, dtype: torch.dtype = torch.float32,
          randomize=_randomize) -> tuple[Path, Path, Path]:
    """(base folder, adapter folder, PEFT's merged folder) for a tiny model and a LoRA config (a dict of LoraConfig
    fields, or any PEFT config); `randomize(model, seed)` gives the adapter its non-zero values."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = model_fn().to(dtype)
        base, adapter, merged = tmp / "base", tmp / "adapter", tmp / "peft-merged"
        model.save_pretrained(base)
        pm = peft.get_peft_model(model, peft.LoraConfig(**config) if isinstance(config, dict) else config)
        randomize(pm, seed + 1)
        pm.save_pretrained(adapter)
        pm.merge_and_unload().save_pretrained(merged)
    return base, adapter, merged


def assert_same_as_peft(base: Path, adapter: Path, want: Path, out: Path, changed_at_least: int = 1) -> dict:
    result = adapterops.merge(base, adapter, out)
    ours, theirs, orig = read_all(out), read_all(want), read_all(base)
    assert sorted(ours) == sorted(theirs)
    differing = [k for k in theirs if ours[k].dtype != theirs[k].dtype or raw_bytes(ours[k]) != raw_bytes(theirs[k])]
    assert differing == []
    changed = [k for k in orig if raw_bytes(orig[k]) != raw_bytes(theirs[k])]
    assert len(changed) >= changed_at_least  # the adapter really changed the model
    cfg_ours, cfg_theirs = (json.loads((p / "config.json").read_text()) for p in (out, want))
    assert cfg_ours.get("tie_word_embeddings") == cfg_theirs.get("tie_word_embeddings")
    return {"result": result, "changed": changed}


# --- MoE experts (target_parameters) ---------------------------------------------------------------------------

def mixtral():
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                                     num_attention_heads=2, num_key_value_heads=1, num_local_experts=3,
                                     num_experts_per_tok=2, max_position_embeddings=32)
    return transformers.AutoModelForCausalLM.from_config(cfg)


def qwen2_moe():
    cfg = transformers.Qwen2MoeConfig(vocab_size=64, hidden_size=16, intermediate_size=24, moe_intermediate_size=12,
                                      shared_expert_intermediate_size=20, num_hidden_layers=1, num_attention_heads=2,
                                      num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, max_position_embeddings=32)
    return transformers.AutoModelForCausalLM.from_config(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_mixtral_all_linear_merges_experts_per_expert_as_peft(tmp_path, dtype):
    """PEFT's all-linear on Mixtral adds target_parameters for the fused experts (and the router); transformers 5
    saves them as one w1/w2/w3 tensor per expert under block_sparse_moe."""
    base, adapter, want = build(tmp_path, mixtral, {"target_modules": "all-linear", "r": 2, "lora_alpha": 4}, dtype=dtype)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["target_parameters"]  # PEFT added them by itself
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert any(".experts.2.w3." in k for k in got["changed"]) and any(".experts.0.w2." in k for k in got["changed"])
    assert any("module names mapped" in w and "mixtral" in w for w in got["result"].warnings)


def test_qwen2_moe_experts_and_explicit_target_parameters(tmp_path):
    base, adapter, want = build(tmp_path, qwen2_moe, {
        "target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "r": 3, "lora_alpha": 5, "rank_pattern": {"down_proj": 2}})
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert any(".experts.3.up_proj." in k for k in got["changed"])


def test_fused_experts_stored_whole_merge_whole(tmp_path):
    """A checkpoint that stores the fused [E, 2I, H] parameter under its model path (as a converter would write
    it): the whole stack is merged with PEFT's einsum."""
    from safetensors.torch import load_file, save_file

    base, adapter, want = build(tmp_path, mixtral, {"target_modules": [], "r": 2,
                                                     "target_parameters": ["experts.gate_up_proj", "experts.down_proj"]})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        merged = transformers.AutoModelForCausalLM.from_pretrained(want)
    fused = tmp_path / "fused"
    fused.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight" or True},
              fused / "model.safetensors", metadata={"format": "pt"})
    (fused / "config.json").write_text((base / "config.json").read_text())
    adapterops.merge(fused, adapter, tmp_path / "out")
    ours = load_file(tmp_path / "out" / "model.safetensors")
    theirs = merged.state_dict()
    assert [k for k in ours if raw_bytes(ours[k]) != raw_bytes(theirs[k].contiguous())] == []
    assert not torch.equal(ours["model.layers.0.mlp.experts.gate_up_proj"], model.state_dict()["model.layers.0.mlp.experts.gate_up_proj"])


def test_per_expert_delta_equals_the_whole_einsum():
    """Streaming one expert at a time computes the same bits as PEFT's einsum over the whole stack."""
    from adapterops.core.experts import param_delta

    g = torch.Generator().manual_seed(3)
    e, r, out_f, in_f = 8, 16, 96, 80
    a, b = torch.randn(r * e, in_f, generator=g), torch.randn(out_f, r * e, generator=g)
    for swapped in (True, False):
        whole = param_delta(a, b, 0.7, e, swapped)
        for x in range(e):
            assert raw_bytes(param_delta(a, b, 0.7, e, swapped, x)) == raw_bytes(whole[x].contiguous())


def test_algebra_commands_refuse_parameter_lora_clearly(tmp_path):
    _, adapter, _ = build(tmp_path, mixtral, {"target_modules": "all-linear", "r": 2})
    # rescale, rerank, stack, analyze and unmerge handle them (tests/test_moe_algebra.py); check and convert do not
    with pytest.raises(AdapteropsError, match="target_parameters.*not by this command"):
        adapterops.convert(adapter, tmp_path / "x", engine="vllm")
    assert not (tmp_path / "x").exists()
    report = adapterops.inspect(adapter)
    assert report is not None


# --- modules transformers 5 renamed (ViT) -----------------------------------------------------------------------

def vit():
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=24, num_labels=3)
    return transformers.ViTForImageClassification(cfg)


def test_vit_renamed_modules_merge_into_the_old_checkpoint_keys(tmp_path):
    base, adapter, want = build(tmp_path, vit, {"target_modules": ["q_proj", "v_proj", "fc1"], "r": 2})
    assert "attention.attention.query.weight" in " ".join(read_all(base))  # the checkpoint keeps the old names
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out", changed_at_least=6)
    assert any("vit/ViTForImageClassification" in w for w in got["result"].warnings)


def test_adapter_module_matching_nothing_is_refused_with_its_name(tmp_path):
    base, adapter, _ = build(tmp_path, vit, {"target_modules": ["q_proj"], "r": 2})
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps(dict(cfg, model_type="not-a-model")))
    with pytest.raises(AdapteropsError, match=r"module vit\.layers\.0\.attention\.q_proj is not in the base"):
        adapterops.merge(base, adapter, tmp_path / "out")


# --- grouped convolutions ---------------------------------------------------------------------------------------

def test_grouped_convolution_is_refused_with_peft_reason(tmp_path):
    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 8, 3, groups=2)

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(Net(), peft.LoraConfig(target_modules=["conv"], r=4))
    pm.save_pretrained(tmp_path / "adapter")
    from safetensors.torch import save_file

    (tmp_path / "base").mkdir()
    save_file({"conv.weight": torch.randn(8, 2, 3, 3), "conv.bias": torch.zeros(8)}, tmp_path / "base" / "model.safetensors")
    with pytest.raises(AdapteropsError, match="grouped convolutions are not supported"):
        adapterops.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "out")


def test_inspect_describes_parameter_modules_and_the_rename_table(tmp_path):
    base, adapter, _ = build(tmp_path, mixtral, {"target_modules": "all-linear", "r": 2})
    rep = adapterops.inspect(adapter)
    assert rep.summary["target_parameters"] and rep.summary["parameter_modules"] >= 4
    assert any(str(r["kind"]).startswith("parameter") for r in rep.modules)
    assert "mixtral/MixtralForCausalLM" in adapterops.inspect(base).summary["module_renames"]
