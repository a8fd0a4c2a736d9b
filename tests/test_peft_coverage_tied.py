"""Issue 12, the items left: trainable tokens, bias="all" beside a modules_to_save classifier, modules_to_save on a
tied embedding (with and without ensure_weight_tying) and T5's shared embedding, merged byte for byte as PEFT 0.21.

As in test_peft_coverage.py: a tiny random model made with transformers, the adapter made with real PEFT and every
trainable adapter tensor filled with random non-zero values, PEFT's `merge_and_unload()` + `save_pretrained()` run
live, and `adapterops merge` compared with it tensor by tensor, byte for byte, and on config.json's
`tie_word_embeddings`. Tolerance: none. Skips where peft or transformers is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import raw_bytes, read_all

import adapterops
from adapterops.errors import AdapteropsError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from test_peft_coverage import build as coverage_build  # noqa: E402


def llama(tied: bool):
    def make():
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                                       tie_word_embeddings=tied)
        return transformers.AutoModelForCausalLM.from_config(cfg)
    return make


def t5():
    cfg = transformers.T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2,
                                tie_word_embeddings=True)
    return transformers.T5ForConditionalGeneration(cfg)


def bert():
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def roberta():
    cfg = transformers.RobertaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=40, num_labels=3)
    return transformers.RobertaForSequenceClassification(cfg)


def _noise_trainable(model, seed: int) -> None:
    """Random noise on every trainable tensor (trained biases of bias="all" too, so they differ from the base)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_((torch.randn(p.shape, generator=g) * 0.05).to(p.dtype))


def build(tmp: Path, model_fn, config, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[Path, Path, Path]:
    """(base, adapter, PEFT's merge) for a tiny model and a PEFT config, every trainable tensor with noise."""
    return coverage_build(tmp, model_fn, config, seed, dtype, randomize=_noise_trainable)


def assert_same_as_peft(base: Path, adapter: Path, want: Path, out: Path) -> dict:
    result = adapterops.merge(base, adapter, out)
    ours, theirs, orig = read_all(out), read_all(want), read_all(base)
    assert sorted(ours) == sorted(theirs)
    assert [k for k in theirs if ours[k].dtype != theirs[k].dtype or raw_bytes(ours[k]) != raw_bytes(theirs[k])] == []
    cfg_ours, cfg_theirs = (json.loads((p / "config.json").read_text()) for p in (out, want))
    assert cfg_ours.get("tie_word_embeddings") == cfg_theirs.get("tie_word_embeddings")
    changed = [k for k in orig if k in theirs and raw_bytes(orig[k]) != raw_bytes(theirs[k])]
    assert changed  # the adapter really changed the model
    return {"result": result, "changed": changed, "tied": cfg_theirs.get("tie_word_embeddings"), "keys": sorted(theirs)}


# --- 1. trainable tokens ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_trainable_tokens_alone(tmp_path, tied, dtype):
    """PEFT_TYPE TRAINABLE_TOKENS: the trained rows replace the embedding's (and, tied, lm_head's: the same tensor)."""
    cfg = peft.TrainableTokensConfig(target_modules=["embed_tokens"], token_indices=[1, 5, 7, 63])
    base, adapter, want = build(tmp_path, llama(tied), cfg, dtype=dtype)
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert got["changed"] == ["model.embed_tokens.weight"]
    assert ("lm_head.weight" in got["keys"]) is not tied


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_trainable_tokens_beside_lora(tmp_path, tied):
    cfg = peft.LoraConfig(target_modules=["q_proj", "v_proj"], r=2, trainable_token_indices=[2, 3, 40])
    base, adapter, want = build(tmp_path, llama(tied), cfg, dtype=torch.bfloat16)
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert "model.embed_tokens.weight" in got["changed"] and len(got["changed"]) == 3


def test_trainable_tokens_by_module_name_on_an_untied_lm_head(tmp_path):
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=2, trainable_token_indices={"embed_tokens": [4, 9], "lm_head": [4]})
    base, adapter, want = build(tmp_path, llama(False), cfg)
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(got["changed"])


def test_trainable_tokens_inspect_and_refusals(tmp_path):
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=2, trainable_token_indices=[2, 3])
    base, adapter, _ = build(tmp_path, llama(True), cfg)
    rep = adapterops.inspect(adapter)
    assert "trainable tokens" in rep.summary["variant"] and rep.summary["trainable_tokens"] == {"model.embed_tokens": 2}
    assert any(str(r["kind"]).startswith("trainable tokens") and r["tokens"] == 2 for r in rep.modules)
    with pytest.raises(AdapteropsError, match="trainable tokens .* only supported by merge and inspect"):
        adapterops.rescale(adapter, tmp_path / "x", to="rslora")
    conf = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(dict(conf, trainable_token_indices=[2, 3, 5])))
    with pytest.raises(AdapteropsError, match="the config lists 3 token ids"):
        adapterops.merge(base, adapter, tmp_path / "out")
    (adapter / "adapter_config.json").write_text(json.dumps(dict(conf, trainable_token_indices=[2, 2])))
    with pytest.raises(AdapteropsError, match="lists a token id twice"):
        adapterops.merge(base, adapter, tmp_path / "out")
    (adapter / "adapter_config.json").write_text(json.dumps(dict(conf, trainable_token_indices=[2, 64])))
    with pytest.raises(AdapteropsError, match="beyond the 64 rows"):
        adapterops.merge(base, adapter, tmp_path / "out")


# --- 2. bias="all" with a modules_to_save classifier --------------------------------------------------------------

@pytest.mark.parametrize("model_fn", [bert, roberta], ids=["bert", "roberta"])
def test_bias_all_with_a_modules_to_save_classifier(tmp_path, model_fn):
    """PEFT also saves the wrapper's `classifier.modules_to_save[.default].*.bias` and `original_module.*.bias`."""
    cfg = peft.LoraConfig(target_modules=["query", "value"], r=2, bias="all", task_type="SEQ_CLS")
    base, adapter, want = build(tmp_path, model_fn, cfg)
    keys = " ".join(read_all(adapter))
    assert ".original_module." in keys and ".modules_to_save." in keys
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert any(k.startswith("classifier.") and k.endswith(".bias") for k in got["changed"])
    assert any("LayerNorm.bias" in k for k in got["changed"])  # the trained base biases too


# --- 3. modules_to_save on a tied embedding -----------------------------------------------------------------------

@pytest.mark.parametrize("saved", ["embed_tokens", "lm_head"])
def test_ensure_weight_tying_keeps_the_output_tied(tmp_path, saved):
    cfg = peft.LoraConfig(target_modules=["q_proj"], r=2, modules_to_save=[saved], ensure_weight_tying=True)
    base, adapter, want = build(tmp_path, llama(True), cfg)
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert got["tied"] is True and "lm_head.weight" not in got["keys"] and "model.embed_tokens.weight" in got["changed"]


def test_modules_to_save_embedding_without_ensure_weight_tying_unties_as_peft(tmp_path):
    """lm_head keeps the original tensor, with its own LoRA merged into it; the embedding is the trained copy."""
    cfg = peft.LoraConfig(target_modules=["q_proj", "lm_head"], r=2, modules_to_save=["embed_tokens"])
    base, adapter, want = build(tmp_path, llama(True), cfg)
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    assert got["tied"] is False and "lm_head.weight" in got["keys"]
    assert any("untied" in w for w in got["result"].warnings)


# --- 4. T5's shared embedding -------------------------------------------------------------------------------------

@pytest.mark.parametrize("config", [
    {"target_modules": ["q", "lm_head"]},                           # LoRA on the tied lm_head: merged into shared
    {"target_modules": ["q"], "modules_to_save": ["lm_head"]},      # a trained lm_head copy: untied
    {"target_modules": ["shared", "v"]},                            # LoRA on the shared embedding itself
], ids=["lora-lm_head", "modules_to_save-lm_head", "lora-shared"])
def test_t5_shared_embedding(tmp_path, config):
    base, adapter, want = build(tmp_path, t5, peft.LoraConfig(r=2, **config))
    assert "lm_head.weight" not in read_all(base) and "shared.weight" in read_all(base)
    got = assert_same_as_peft(base, adapter, want, tmp_path / "out")
    if config["target_modules"] == ["q", "lm_head"]:
        assert "shared.weight" in got["changed"] and got["tied"] is not False
        assert any("lm_head is tied to shared.weight" in w for w in got["result"].warnings)
