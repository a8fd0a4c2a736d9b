"""`adapterops quantize` across architectures, against transformers + bitsandbytes' own 4-bit load (issue 17).

For each family a tiny random model (fixed seed, float32) is saved with `save_pretrained`; `adapterops quantize
--no-double-quant` turns it into NF4, transformers loads that with `from_pretrained(OUT)`, and the reference is
`from_pretrained(BASE, quantization_config=BitsAndBytesConfig(load_in_4bit=True, nf4, no double quant,
compute dtype float32))`, both on the CPU.

Tolerance: none. Without double quantization the stored state is the float32 absmax and the 4-bit codes, and
bitsandbytes' CPU quantizer and adapterops (bitsandbytes' CUDA rule) give the same codes except for a value that
lies exactly on one of 4 thresholds 1 ulp apart, which random weights do not hit; the tests check the packed bytes
equal. Same bytes, same bitsandbytes CPU kernels, same process: the logits must be equal bit for bit. (With double
quantization bitsandbytes' CPU path snaps 8-bit absmax codes to a lookup grid, see test_quantize.py, so exact
equality would not hold there; that path is covered by test_quantize.py.)

Also checked: the modules left unquantized are exactly those transformers leaves unquantized (the same Linear4bit
modules after loading, and the same tensor names as transformers' own save_pretrained of its 4-bit model), and
quantization_config is the one transformers saves.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import read_all

from adapterops.cli import cli

transformers = pytest.importorskip("transformers")
bnb = pytest.importorskip("bitsandbytes")
pytest.importorskip("accelerate")

V, H, L = 96, 64, 2  # vocabulary, hidden size, layers: small enough for a fast test, 64 = one NF4 block per row


def tiny(family: str):
    """A tiny config of one family (the class to load it with, the config)."""
    t = transformers
    common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=4, intermediate_size=2 * H,
                  max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if family == "gpt_neox":
        return t.AutoModelForCausalLM, t.GPTNeoXConfig(**common, tie_word_embeddings=False)
    if family == "phi3":
        return t.AutoModelForCausalLM, t.Phi3Config(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "qwen2":
        return t.AutoModelForCausalLM, t.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True)
    if family == "mistral":
        return t.AutoModelForCausalLM, t.MistralConfig(**common, num_key_value_heads=2, tie_word_embeddings=False)
    if family == "gpt2":
        return t.AutoModelForCausalLM, t.GPT2Config(vocab_size=V, n_embd=H, n_layer=L, n_head=4, n_positions=64,
                                                    bos_token_id=1, eos_token_id=2)
    if family == "t5":
        return t.AutoModelForSeq2SeqLM, t.T5Config(vocab_size=V, d_model=H, d_kv=16, d_ff=2 * H, num_layers=L,
                                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    raise ValueError(family)


# what each family must leave unquantized, by checkpoint name (the table's result, spelled out)
UNQUANTIZED = {
    "gpt_neox": {"embed_out", "gpt_neox.embed_in"},  # the output layer is embed_out in checkpoints
    "phi3": {"lm_head", "model.embed_tokens"},
    "qwen2": {"model.embed_tokens"},  # lm_head is tied, not stored
    "mistral": {"lm_head", "model.embed_tokens"},
    "gpt2": {"transformer.wte", "transformer.wpe"},  # tied lm_head
    "t5": {"shared", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias",
           "decoder.block.0.layer.0.SelfAttention.relative_attention_bias"}  # tied lm_head
          | {f"{side}.block.{i}.layer.{j}.DenseReluDense.wo" for side, j in (("encoder", 1), ("decoder", 2)) for i in range(L)},
}


def inputs(family: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 12), generator=g)
    return {"input_ids": ids, "decoder_input_ids": ids[:, :7]} if family == "t5" else {"input_ids": ids}


def linear4bit(model) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


@pytest.mark.parametrize("family", sorted(UNQUANTIZED))
def test_transformers_loads_our_nf4_as_its_own(family, tmp_path):
    auto, config = tiny(family)
    torch.manual_seed(0)
    model = auto.from_config(config, dtype=torch.float32)
    base, out, ref_dir = tmp_path / "base", tmp_path / "nf4", tmp_path / "ref"
    model.save_pretrained(base)

    res = CliRunner().invoke(cli, ["quantize", str(base), str(out), "-q", "--no-double-quant", "--compute-dtype", "float32",
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "warning" not in res.stderr  # a known model_type: the table decided, not the fallback
    ours = read_all(out)
    stored = read_all(base)
    left = {k[: -len(".weight")] for k, t in ours.items() if k.endswith(".weight") and t.dim() == 2 and t.is_floating_point()}
    assert left == UNQUANTIZED[family]
    for k in left:
        assert torch.equal(ours[f"{k}.weight"], stored[f"{k}.weight"]), k

    qc = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                                         bnb_4bit_compute_dtype=torch.float32)
    ref = auto.from_pretrained(base, quantization_config=qc, device_map="cpu").eval()
    mine = auto.from_pretrained(out, device_map="cpu").eval()
    assert linear4bit(mine) == linear4bit(ref) and linear4bit(ref)  # the same modules quantized, none forgotten

    ref.save_pretrained(ref_dir)
    theirs = read_all(ref_dir)
    assert sorted(ours) == sorted(theirs)  # the same tensors quantized and left, by checkpoint name
    for k, t in theirs.items():
        assert (ours[k].dtype, ours[k].shape) == (t.dtype, t.shape), k
        if k.endswith(".weight") and t.dtype == torch.uint8:  # packed 4-bit codes: equal, see the docstring
            assert torch.equal(ours[k], t), k
    ref_qc = json.loads((ref_dir / "config.json").read_text())["quantization_config"]
    assert json.loads((out / "config.json").read_text())["quantization_config"] == ref_qc

    with torch.no_grad():
        want, got = ref(**inputs(family)).logits, mine(**inputs(family)).logits
    assert torch.equal(got, want)  # tolerance 0, see the docstring


def test_unknown_model_type_uses_the_fallback_and_says_so(tmp_path):
    """An architecture the table lacks: the output embedding is found by name or by the input embedding's shape."""
    auto, config = tiny("gpt_neox")
    torch.manual_seed(0)
    base, out = tmp_path / "base", tmp_path / "nf4"
    auto.from_config(config).save_pretrained(base)
    cfg = json.loads((base / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "not_in_transformers", ["NotInTransformersForCausalLM"]
    (base / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(cli, ["quantize", str(base), str(out), "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "fallback" in res.stderr and "embed_out" in res.stderr
    summary = json.loads(res.stdout)
    assert any("fallback" in w for w in summary["warnings"])
    tensors = read_all(out)
    assert tensors["embed_out.weight"].dtype == torch.float32 and "embed_out.weight.absmax" not in tensors
    assert "gpt_neox.layers.0.mlp.dense_h_to_4h.weight.absmax" in tensors
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["embed_out", "lm_head"]  # explicit: transformers' defaults are unknown


def test_fallback_finds_an_unnamed_output_embedding_by_shape():
    from adapterops.io.architectures import unquantized

    f32 = torch.float32
    tensors = {"model.tok.embed_tokens.weight": ((V, H), f32), "model.blocks.0.proj.weight": ((H, H), f32),
               "model.final.weight": ((V, H), f32), "model.norm.weight": ((H,), f32)}
    rule = unquantized({"model_type": "unheard_of"}, tensors)
    assert rule.fallback and rule.quantizable == {"model.blocks.0.proj.weight"}
    assert rule.skip_modules == ("lm_head", "model.final") and "model.final" in rule.warnings[0]


def test_table_matches_the_installed_transformers():
    """The shipped table equals what fixtures/make_architectures.py finds now (for the families above), when the
    installed transformers is the one it was generated with."""
    import importlib.util
    from pathlib import Path

    from adapterops.io.architectures import table

    data = table()
    if data["transformers"] != transformers.__version__:
        pytest.skip(f"table made with transformers {data['transformers']}, {transformers.__version__} installed")
    spec = importlib.util.spec_from_file_location("make_architectures", Path(__file__).parent.parent / "fixtures" / "make_architectures.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    for mt, cls in [("gpt_neox", "GPTNeoXForCausalLM"), ("t5", "T5ForConditionalGeneration"), ("gpt2", "GPT2LMHeadModel"),
                    ("mixtral", "MixtralForCausalLM")]:
        assert gen.analyse(getattr(transformers, cls), mt, 2) == data["model_types"][mt][cls], mt
    assert len(data["model_types"]) >= 200
