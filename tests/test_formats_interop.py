"""Converted adapters checked by the real consumers: llama.cpp (llama-cpp-python), mlx-lm (mlx on CPU) and torchtune
0.6.1 load a tiny base plus the converted adapter, and their logits must match PEFT's for the original adapter.

Each consumer is optional (`pip install -e '.[interop]'`, or `bash benchmarks/interop.sh`); its tests skip, with the
reason, when it is absent. Bases are written here from fixed seeds (never downloaded): tiny Llama and Qwen2 models
from transformers' `from_config`, and for llama.cpp the same weights as a base GGUF written with the gguf package.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from adapterops.pipeline.convert_formats import convert_format

TOL = 2e-5  # fp32 everywhere; the consumers' kernels sum in other orders (observed ≈ 1e-6)
IDS = [1, 5, 9, 17, 33, 2, 60, 7, 41, 12]


def _need(*modules: str) -> None:
    for m in modules:
        if importlib.util.find_spec(m) is None:
            pytest.skip(f"{m} is not installed (pip install -e '.[interop]', or bash benchmarks/interop.sh)")


transformers = pytest.importorskip("transformers", reason="transformers is not installed (dev extra)")
peft = pytest.importorskip("peft", reason="peft is not installed (dev extra)")

ARCHS = {
    "llama": dict(cls="LlamaConfig", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
    "qwen2": dict(cls="Qwen2Config", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=96, max_position_embeddings=64, rms_norm_eps=1e-6,
                  tie_word_embeddings=False),
}
ROPE_THETA = 10000.0
ADAPTERS = {
    # plain LoRA: one rank, one alpha (kept as is by every format)
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
    # rsLoRA with rank and alpha patterns, lm_head too: scales are folded, ranks padded
    "rslora-patterns": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "down_proj", "lm_head"],
                            rank_pattern={"q_proj": 8, "layers.1.self_attn.v_proj": 2}, alpha_pattern={"down_proj": 3.5, "k_proj": 5}),
}


def _base(tmp: Path, arch: str) -> Path:
    out = tmp / f"base-{arch}"
    if out.exists():
        return out
    spec = dict(ARCHS[arch])
    cfg = getattr(transformers, spec.pop("cls"))(**spec, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():  # larger than the init so every term shows in the logits
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(out)
    return out


def _adapter(tmp: Path, arch: str, kind: str) -> Path:
    out = tmp / f"peft-{arch}-{kind}"
    if out.exists():
        return out
    base = transformers.AutoModelForCausalLM.from_pretrained(_base(tmp, arch), dtype=torch.float32)
    model = peft.get_peft_model(base, peft.LoraConfig(lora_dropout=0.0, **ADAPTERS[kind]))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    model.save_pretrained(out)
    return out


def _peft_logits(tmp: Path, arch: str, kind: str) -> torch.Tensor:
    base = transformers.AutoModelForCausalLM.from_pretrained(_base(tmp, arch), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, _adapter(tmp, arch, kind)).eval()
    with torch.no_grad():
        return model(torch.tensor([IDS])).logits[0].float()


CASES = [(arch, kind) for arch in ARCHS for kind in ADAPTERS]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("interop")


# ------------------------------------------------------------------------------------------------ llama.cpp


def _base_gguf(tmp: Path, arch: str) -> Path:
    """The tiny base as a GGUF llama.cpp loads: f32 tensors (q/k rows permuted for llama), an SPM vocabulary of
    placeholder tokens."""
    import gguf
    from safetensors.torch import load_file

    from adapterops.core.heads import to_interleaved

    out = tmp / f"base-{arch}.gguf"
    if out.exists():
        return out
    root = _base(tmp, arch)
    cfg = json.loads((root / "config.json").read_text())
    sd = load_file(root / "model.safetensors")
    ga = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2}[arch]
    w = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[ga])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(ROPE_THETA)
    w.add_rope_dimension_count(cfg["hidden_size"] // cfg["num_attention_heads"])
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    n = cfg["vocab_size"]
    w.add_tokenizer_model("llama")
    w.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, n)])
    w.add_token_scores([0.0] * n)
    w.add_token_types([gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.NORMAL] * (n - 3))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    tmap = gguf.get_tensor_name_map(ga, cfg["num_hidden_layers"])
    for name, t in sd.items():
        t = t.float()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = to_interleaved(t, cfg["num_attention_heads"] if "q_proj" in name else cfg["num_key_value_heads"])
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        w.add_tensor(new, t.contiguous().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def _llama_cpp_logits(model: Path, lora: Path | None) -> torch.Tensor:
    import llama_cpp

    llm = llama_cpp.Llama(str(model), lora_path=str(lora) if lora else None, n_ctx=32, n_batch=32, logits_all=True,
                          verbose=False, n_threads=2, type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32,
                          flash_attn=False, seed=0)
    try:
        llm.eval(IDS)
        import numpy as np

        return torch.from_numpy(np.array(llm.scores[: len(IDS)], dtype=np.float32))
    finally:
        llm.close()


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_llama_cpp_matches_peft(work: Path, arch: str, kind: str) -> None:
    _need("gguf", "llama_cpp")
    out = work / f"gguf-{arch}-{kind}.gguf"
    report = convert_format(_adapter(work, arch, kind), out, to="gguf", base=_base(work, arch), force=True)
    assert report.folded == (kind != "plain")
    base_gguf = _base_gguf(work, arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(_base(work, arch), dtype=torch.float32).eval()
    with torch.no_grad():
        base_ref = hf(torch.tensor([IDS])).logits[0]
    assert (_llama_cpp_logits(base_gguf, None) - base_ref).abs().max() < TOL  # the base itself agrees
    err = (_llama_cpp_logits(base_gguf, out) - _peft_logits(work, arch, kind)).abs().max().item()
    print(f"llama.cpp {arch} {kind}: max |logits - PEFT| = {err:.2e}")
    assert err < TOL


# ------------------------------------------------------------------------------------------------ mlx-lm


def _mlx_base(tmp: Path, arch: str) -> Path:
    """The base for mlx-lm: its config gets rope_theta, which mlx-lm 0.32 reads (it ignores rope_parameters)."""
    out = tmp / f"mlx-base-{arch}"
    if not out.exists():
        shutil.copytree(_base(tmp, arch), out)
        cfg = json.loads((out / "config.json").read_text())
        cfg["rope_theta"] = ROPE_THETA
        (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_mlx_lm_matches_peft(work: Path, arch: str, kind: str) -> None:
    _need("mlx", "mlx_lm")
    import mlx.core as mx
    import numpy as np
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    out = work / f"mlx-{arch}-{kind}"
    report = convert_format(_adapter(work, arch, kind), out, to="mlx", base=_base(work, arch), force=True)
    assert report.folded == (kind != "plain")
    assert any("rope_parameters" in w for w in report.warnings)
    model, _ = load_model(_mlx_base(work, arch))
    load_adapters(model, str(out))
    got = torch.from_numpy(np.array(model(mx.array([IDS]))[0].astype(mx.float32)))
    err = (got - _peft_logits(work, arch, kind)).abs().max().item()
    print(f"mlx-lm {arch} {kind}: max |logits - PEFT| = {err:.2e}")
    assert err < TOL


# ------------------------------------------------------------------------------------------------ torchtune


def _torchtune_model(tmp: Path, arch: str, tune_cfg: dict) -> torch.nn.Module:
    from safetensors.torch import load_file

    cfg = json.loads((_base(tmp, arch) / "config.json").read_text())
    sd = load_file(_base(tmp, arch) / "model.safetensors")
    common = dict(vocab_size=cfg["vocab_size"], num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
                  num_kv_heads=cfg["num_key_value_heads"], embed_dim=cfg["hidden_size"], max_seq_len=cfg["max_position_embeddings"],
                  intermediate_dim=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"], rope_base=ROPE_THETA,
                  lora_rank=tune_cfg["lora_rank"], lora_alpha=tune_cfg["lora_alpha"],
                  lora_attn_modules=tune_cfg["lora_attn_modules"], apply_lora_to_mlp=tune_cfg["apply_lora_to_mlp"],
                  apply_lora_to_output=tune_cfg["apply_lora_to_output"])
    if arch == "llama":
        from torchtune.models.convert_weights import hf_to_tune
        from torchtune.models.llama3._component_builders import lora_llama3

        model = lora_llama3(**common)
        state = hf_to_tune(sd, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"])
    else:
        from torchtune.models.qwen2._component_builders import lora_qwen2
        from torchtune.models.qwen2._convert_weights import qwen2_hf_to_tune

        model = lora_qwen2(**common, tie_word_embeddings=False)
        state = qwen2_hf_to_tune(sd, num_heads=cfg["num_attention_heads"], num_kv_heads=cfg["num_key_value_heads"], dim=cfg["hidden_size"])
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lora" in k for k in missing)
    return model


@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_torchtune_matches_peft(work: Path, arch: str, kind: str) -> None:
    _need("torchtune", "torchao")
    out = work / f"tune-{arch}-{kind}"
    report = convert_format(_adapter(work, arch, kind), out, to="torchtune", base=_base(work, arch), force=True)
    assert report.folded == (kind != "plain")
    tune_cfg = json.loads((out / "adapter_config.json").read_text())["torchtune"]
    model = _torchtune_model(work, arch, tune_cfg).float().eval()
    adapter = torch.load(out / "adapter_model.pt", weights_only=True)  # what torchtune's safe_torch_load does
    missing, unexpected = model.load_state_dict(adapter, strict=False)
    assert not unexpected and not [k for k in missing if "lora" in k]  # every LoRA parameter came from the file
    with torch.no_grad():
        got = model(torch.tensor([IDS]))[0].float()
    err = (got - _peft_logits(work, arch, kind)).abs().max().item()
    print(f"torchtune {arch} {kind}: max |logits - PEFT| = {err:.2e}")
    assert err < TOL


# ------------------------------------------------------------------------------------------------ back to PEFT


@pytest.mark.parametrize("to", ["gguf", "mlx", "torchtune"])
@pytest.mark.parametrize(("arch", "kind"), CASES)
def test_converted_back_matches_peft(work: Path, arch: str, kind: str, to: str) -> None:
    """PEFT → X → PEFT, loaded by PEFT itself: the same logits (and, unfolded, the same tensors)."""
    if to == "gguf":
        _need("gguf")
    mid = work / f"rt-{to}-{arch}-{kind}"
    convert_format(_adapter(work, arch, kind), mid, to=to, base=_base(work, arch), force=True)
    back = work / f"rt-{to}-{arch}-{kind}-peft"
    convert_format(mid, back, to="peft", base=_base(work, arch), force=True, allow_pickle=True)  # torchtune's .pt
    base = transformers.AutoModelForCausalLM.from_pretrained(_base(work, arch), dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, back).eval()
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits[0]
    assert (got - _peft_logits(work, arch, kind)).abs().max() < 1e-5
