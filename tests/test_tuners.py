"""IA3, LoHa, LoKr and VeRA adapters: `adapterops merge` against PEFT 0.21's merge_and_unload() + save_pretrained(),
byte for byte, run live (tiny Llama with and without biases, GPT-2 Conv1D, a ConvNet with k×k and 1×1 Conv2d and a
Conv1d); fp32, bf16 and fp16 bases. Then the refusals (commands that need LoRA factors, tuners PEFT cannot merge,
broken tuner files), `inspect`, and `rerank` turning LoHa/LoKr/VeRA into LoRA against PEFT's `convert_to_lora`.

The adapters are made here by real PEFT with fixed seeds and random non-zero weights (PEFT initialises LoHa's w2_b,
LoKr's w2 and VeRA's λ_b to zero and IA3's vectors to one, which would make every merge vacuous).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from helpers import MODELS, raw_bytes, read_all

import adapterops
from adapterops.errors import AdapteropsError

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _configs():
    from peft import IA3Config, LoHaConfig, LoKrConfig, VeraConfig

    return {
        "ia3-llama": ("llama-untied", IA3Config(target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                                                feedforward_modules=["down_proj", "up_proj"])),
        "loha-llama": ("llama-tied", LoHaConfig(r=4, alpha=8, target_modules=LLAMA, rank_pattern={"down_proj": 2},
                                                alpha_pattern={"v_proj": 3})),
        "lokr-llama": ("llama-tied", LoKrConfig(r=4, alpha=6, target_modules=LLAMA)),
        "lokr-llama-both": ("llama-tied", LoKrConfig(r=2, alpha=3, decompose_both=True, decompose_factor=4,
                                                     target_modules=["q_proj", "gate_proj", "down_proj"])),
        "vera-llama": ("llama-tied", VeraConfig(r=8, target_modules=["q_proj", "v_proj", "down_proj"])),
        "vera-llama-prng": ("llama-tied", VeraConfig(r=4, target_modules=["q_proj", "up_proj"], save_projection=False,
                                                     projection_prng_key=7)),
        "ia3-gpt2": ("gpt2", IA3Config(target_modules=["c_attn", "c_fc"], feedforward_modules=["c_fc"], fan_in_fan_out=True)),
        "vera-gpt2": ("gpt2", VeraConfig(r=4, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True)),
        "ia3-conv": ("convnet", IA3Config(target_modules=["conv1", "conv2", "head"], feedforward_modules=["conv2"])),
        "loha-conv": ("convnet", LoHaConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "conv3", "head"])),
        "loha-conv-cp": ("convnet", LoHaConfig(r=2, alpha=4, use_effective_conv2d=True, target_modules=["conv1", "conv3"])),
        "lokr-conv": ("convnet", LoKrConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "conv3", "head"])),
        "lokr-conv-cp": ("convnet", LoKrConfig(r=1, alpha=2, use_effective_conv2d=True, decompose_both=True,
                                               target_modules=["conv1"])),
    }


@pytest.fixture(scope="module")
def tuner_adapters(tmp_path_factory):
    """name -> (base, adapter folder), made by PEFT with random non-zero weights."""
    from references import make_fixtures

    mf = make_fixtures("the tuner adapters")
    from peft import get_peft_model

    root = tmp_path_factory.mktemp("tuners")
    made = {}
    for i, (name, (base, cfg)) in enumerate(_configs().items()):
        model = get_peft_model(mf.load_base(base, torch.float32), cfg)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if p.requires_grad:
                    noise = torch.randn(p.shape, generator=g)
                    p.copy_(1 + 0.2 * noise if "ia3_l" in pname else (0.3 if "hada" in pname else 0.1) * noise)
        model.save_pretrained(root / name)
        made[name] = (base, root / name)
    return made


def _peft_merge(base: str, adapter, dtype, workdir):
    from peft import PeftModel
    from references import make_fixtures

    mf = make_fixtures()
    model = PeftModel.from_pretrained(mf.load_base(base, getattr(torch, dtype) if dtype else None), adapter)
    return mf.saved_state(model.merge_and_unload(), workdir)[0]


CASES = [
    (name, dtype) for name in ("ia3-llama", "loha-llama", "lokr-llama", "lokr-llama-both", "vera-llama", "vera-llama-prng",
                               "ia3-gpt2", "vera-gpt2", "ia3-conv", "loha-conv", "loha-conv-cp", "lokr-conv", "lokr-conv-cp")
    for dtype in ((None, "float32", "float16") if "llama" in name else (None, "bfloat16"))
]


@pytest.mark.parametrize("name,dtype", CASES, ids=[f"{n}-{d or 'native'}" for n, d in CASES])
def test_tuner_merge_matches_peft_bit_for_bit(name, dtype, tuner_adapters, tmp_path):
    base, adapter = tuner_adapters[name]
    want = _peft_merge(base, adapter, dtype, tmp_path)
    result = adapterops.merge(MODELS / base, [adapter], tmp_path / "out", dtype=dtype)
    ours = read_all(tmp_path / "out")
    assert sorted(ours) == sorted(want)
    differing = [k for k in want if ours[k].dtype != want[k].dtype or raw_bytes(ours[k]) != raw_bytes(want[k])]
    assert differing == []
    assert result.modules_merged > 0
    original = read_all(MODELS / base)
    changed = [k for k in original if raw_bytes(original[k].to(want[k].dtype)) != raw_bytes(want[k])]
    assert len(changed) >= result.modules_merged  # PEFT's merge really changed them: the comparison is not vacuous


def test_weights_scale_loha_and_refuse_ia3(tuner_adapters, tmp_path):
    base, loha = tuner_adapters["loha-llama"]
    half = adapterops.merge(MODELS / base, [loha], tmp_path / "half", weights=[0.5], dtype="float32")
    assert half.modules_merged == 14
    _, ia3 = tuner_adapters["ia3-llama"]
    with pytest.raises(AdapteropsError, match="IA3 adapter has no scale to weight"):
        adapterops.merge(MODELS / "llama-untied", [ia3], tmp_path / "w", weights=[0.5])


@pytest.mark.parametrize("command", ["analyze", "stack", "rescale", "unmerge", "extract-free"])
def test_lora_only_commands_refuse_tuners_with_the_reason(command, tuner_adapters, tmp_path):
    _, ia3 = tuner_adapters["ia3-llama"]
    _, lokr = tuner_adapters["lokr-llama"]
    calls = {
        "analyze": lambda: adapterops.analyze(ia3),
        "stack": lambda: adapterops.stack([lokr, lokr], tmp_path / "o"),
        "rescale": lambda: adapterops.rescale(lokr, tmp_path / "o", to="rslora"),
        "unmerge": lambda: adapterops.unmerge(MODELS / "llama-tied", [lokr], tmp_path / "o"),
        "extract-free": lambda: adapterops.rerank(ia3, tmp_path / "o", rank=2),
    }
    with pytest.raises(AdapteropsError) as err:
        calls[command]()
    msg = str(err.value)
    assert "LoRA adapters only" in msg or "IA3" in msg
    assert ("W ⊙ l" in msg) or ("Kronecker" in msg)
    assert not (tmp_path / "o").exists()


def test_prompt_tuning_is_refused_as_unmergeable(tmp_path):
    ad = tmp_path / "pt"
    shutil.copytree(MODELS.parent / "adapters" / "llama-lora", ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["peft_type"] = "PROMPT_TUNING"
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapteropsError, match="nothing to merge"):
        adapterops.merge(MODELS / "llama-tied", [ad], tmp_path / "o")


def test_grouped_or_mismatched_tuner_shapes_are_refused(tuner_adapters, tmp_path):
    _, loha = tuner_adapters["loha-llama"]
    with pytest.raises(AdapteropsError, match="not in the base checkpoint|shape"):
        adapterops.merge(MODELS / "convnet", [loha], tmp_path / "o")


@pytest.mark.parametrize("name,variant", [("ia3-llama", "IA3"), ("loha-conv-cp", "LoHa"), ("lokr-llama-both", "LoKr"),
                                          ("vera-llama", "VeRA")])
def test_inspect_describes_tuners(name, variant, tuner_adapters):
    _, adapter = tuner_adapters[name]
    res = adapterops.inspect(adapter)
    assert res.kind == "adapter"
    assert res.summary["variant"] == variant
    assert res.modules and all(row["kind"] == variant.lower() for row in res.modules)
    assert res.warnings == []


def _lora_delta(adapter_dir, module):
    """ΔW of one module of a LoRA adapter, with its config's scale (as PEFT computes it)."""
    from adapterops.io.adapter import open_adapter

    with open_adapter(adapter_dir) as ad:
        mod = ad.modules[module]
        b, a = ad.read(mod.b_key).double(), ad.read(mod.a_key).double()
        return (b.reshape(b.shape[0], -1) @ a.reshape(a.shape[0], -1)) * mod.scale


@pytest.mark.parametrize("name", ["loha-llama", "lokr-llama", "vera-llama"])
def test_rerank_converts_to_lora_as_well_as_peft(name, tuner_adapters, tmp_path):
    """Same rank → error equal to PEFT's convert_to_lora (the Eckart–Young floor), or better."""
    from peft import PeftModel
    from peft.tuners.lora.conversion import save_as_lora
    from references import make_fixtures

    base, adapter = tuner_adapters[name]
    mf = make_fixtures()
    model = PeftModel.from_pretrained(mf.load_base(base, torch.float32), adapter)
    save_as_lora(tmp_path / "peft", model, rank=3)
    dense = {n[len("base_model.model."):]: m.get_delta_weight("default").double()
             for n, m in model.named_modules() if hasattr(m, "get_delta_weight") and hasattr(m, "base_layer")}
    res = adapterops.rerank(adapter, tmp_path / "ours", rank=3, base=MODELS / base)
    peft_lora = tmp_path / "peft"
    assert set(res.modules) == set(dense)
    for module, dw in dense.items():
        ours = (_lora_delta(tmp_path / "ours", module) - dw).norm()
        theirs = (_lora_delta(peft_lora, module) - dw).norm()
        assert ours <= theirs * (1 + 1e-5) + 1e-7 * dw.norm(), module
        assert res.modules[module]["new_rank"] == 3


def test_rerank_lora_by_energy_and_conv_with_base(tuner_adapters, tmp_path):
    """--energy picks per-module ranks; conv modules take their kernel shape from --base, and the LoRA that comes out
    merges (through PEFT's rules) to within the truncation of the tuner's own merge."""
    base, adapter = tuner_adapters["loha-conv"]
    full = adapterops.rerank(adapter, tmp_path / "full", energy=1.0, base=MODELS / base)
    assert full.retained_fro == pytest.approx(1.0, abs=1e-6)
    adapterops.merge(MODELS / base, [adapter], tmp_path / "m1", dtype="float32")
    adapterops.merge(MODELS / base, [tmp_path / "full"], tmp_path / "m2", dtype="float32")
    a, b = read_all(tmp_path / "m1"), read_all(tmp_path / "m2")
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=0, atol=1e-5), k
    part = adapterops.rerank(adapter, tmp_path / "e90", energy=0.9, base=MODELS / base)
    assert part.retained_fro >= 0.9**0.5 - 1e-9


@pytest.mark.parametrize("name", ["loha-conv-cp", "lokr-conv", "vera-llama"])
def test_rerank_needs_the_base_for_conv_kernels_and_vera(name, tuner_adapters, tmp_path):
    base, adapter = tuner_adapters[name]
    with pytest.raises(AdapteropsError, match="--base"):
        adapterops.rerank(adapter, tmp_path / "no", rank=2)
    assert not (tmp_path / "no").exists()
    adapterops.rerank(adapter, tmp_path / "ok", rank=2, base=MODELS / base)


@pytest.mark.parametrize("name", ["ia3-llama", "loha-llama", "lokr-llama", "vera-llama", "loha-conv", "ia3-gpt2"])
def test_tuner_overflow_is_one_error_naming_the_adapter(name, tuner_adapters, tmp_path):
    """A tuner whose ΔW (or scaled weight) overflows float16 is refused with the usual one-line error, naming the
    adapter's file and the tensor, never a traceback from the error path itself."""
    from safetensors.torch import load_file, save_file

    base, adapter = tuner_adapters[name]
    huge = tmp_path / "huge"
    shutil.copytree(adapter, huge)
    f = huge / "adapter_model.safetensors"
    tensors = {k: (v * 1e7 if v.is_floating_point() else v) for k, v in load_file(f).items()}
    save_file(tensors, f, {"format": "pt"})
    with pytest.raises(AdapteropsError) as err:
        adapterops.merge(MODELS / base, [huge], tmp_path / "out", dtype="float16")
    assert "overflow" in str(err.value) or "NaN or Inf" in str(err.value), str(err.value)
    assert not (tmp_path / "out").exists()


def test_65536_pattern_keys_merge_loha_quickly(tuner_adapters, tmp_path):
    """A LoHa config with MAX_PATTERN_KEYS rank_pattern keys merges in a real process (killed if slow: one regex
    compile per module and key took minutes) to the same bytes as its one-key config. The original key comes first;
    every later key matches some module, those matching a down_proj with a wrong rank (the first match must win)."""
    import random

    from helpers import run_adapterops

    from adapterops.core.scaling import MAX_PATTERN_KEYS

    base, adapter = tuner_adapters["loha-llama"]
    many = tmp_path / "many"
    shutil.copytree(adapter, many)
    cfg = json.loads((many / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] == {"down_proj": 2}
    modules = [f"model.layers.{i}.{'mlp' if m.endswith(('up_proj', 'down_proj', 'gate_proj')) else 'self_attn'}.{m}"
               for i in (0, 1) for m in LLAMA]
    rng = random.Random(3)
    keys = {"down_proj": 2}
    while len(keys) < MAX_PATTERN_KEYS:
        module = rng.choice(modules)
        parts = module.split(".")
        text = list(".".join(parts[rng.randint(0, len(parts) - 1):]))
        for j in rng.sample(range(len(text)), len(text) // 4):
            text[j] = "."
        keys.setdefault("".join(text), 7 if module.endswith("down_proj") else 4)
    cfg["rank_pattern"] = keys
    (many / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_adapterops(["merge", MODELS / base, many, tmp_path / "got", "-q"], timeout=60)
    assert res.returncode == 0, res.stderr
    adapterops.merge(MODELS / base, [adapter], tmp_path / "want")
    got, want = read_all(tmp_path / "got"), read_all(tmp_path / "want")
    assert sorted(got) == sorted(want) and all(raw_bytes(got[k]) == raw_bytes(want[k]) for k in want)


def _tuner_with(tuner_adapters, name, tmp_path, edit):
    """A copy of a PEFT-made tuner adapter whose tensors dict `edit(tensors)` changed."""
    from safetensors.torch import load_file, save_file

    base, adapter = tuner_adapters[name]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    f = bad / "adapter_model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, {"format": "pt"})
    return base, bad


def _refused(base, adapter, tmp_path) -> str:
    """The merge's refusal: an AdapteropsError from the library, and from the command line exactly one error line,
    exit 2, no traceback and no output."""
    from click.testing import CliRunner

    from adapterops.cli import cli

    with pytest.raises(AdapteropsError) as err:
        adapterops.merge(MODELS / base, [adapter], tmp_path / "out")
    res = CliRunner().invoke(cli, ["merge", str(MODELS / base), str(adapter), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    line = res.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line and line == f"error: {err.value}", line
    assert not (tmp_path / "out").exists()
    return str(err.value)


P = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("name,original,twin", [
    ("loha-llama", f"{P}{Q}.hada_w1_a", f"{Q}.hada_w1_a"),  # with and without PEFT's prefix
    ("lokr-llama", f"{P}{Q}.lokr_w1", f"{Q}.lokr_w1"),
    ("ia3-llama", f"{P}{Q}.ia3_l", f"{Q}.ia3_l"),
    ("vera-llama", f"{P}{Q}.vera_lambda_b", f"{Q}.vera_lambda_b"),
])
def test_tuner_tensor_under_two_names_is_refused(name, original, twin, tuner_adapters, tmp_path):
    """Two keys for one tensor of a module: the last in file order used to win without a word."""
    base, bad = _tuner_with(tuner_adapters, name, tmp_path, lambda t: t.__setitem__(twin, t[original] * 2))
    err = _refused(base, bad, tmp_path)
    assert "are both" in err and original in err and twin in err, err


@pytest.mark.parametrize("extra", [("lokr_w1_a", "lokr_w1_b"), ("lokr_w2_a", "lokr_w2_b"), ("lokr_t2",)])
def test_lokr_factor_stored_whole_and_as_a_product_is_refused(extra, tuner_adapters, tmp_path):
    """lokr_w1 beside lokr_w1_a/b (or lokr_w2 beside lokr_w2_a/b or lokr_t2): one form was used, the other ignored."""
    def edit(t):
        w = t[f"{P}{Q}.{'lokr_w1' if 'w1' in extra[0] else 'lokr_w2'}"]
        assert w.dim() == 2
        shapes = {"lokr_w1_a": (w.shape[0], 4), "lokr_w1_b": (4, w.shape[1]), "lokr_w2_a": (w.shape[0], 4),
                  "lokr_w2_b": (4, w.shape[1]), "lokr_t2": (4, 4, 1, 1)}
        for part in extra:
            t[f"{P}{Q}.{part}"] = torch.randn(shapes[part])

    base, bad = _tuner_with(tuner_adapters, "lokr-llama", tmp_path, edit)
    err = _refused(base, bad, tmp_path)
    assert "stored whole" in err and extra[0] in err, err


NOT_FLOAT = {"int8": torch.int8, "int64": torch.int64, "bool": torch.bool, "float8": torch.float8_e4m3fn,
             "uint8": torch.uint8}
# adapter, tensor: a factor or vector of each tuner, and VeRA's shared projection
TUNER_PARTS = [("loha-llama", f"{P}{Q}.hada_w2_a"), ("lokr-llama", f"{P}{UP}.lokr_w2_b"), ("ia3-llama", f"{P}{Q}.ia3_l"),
               ("vera-llama", f"{P}{Q}.vera_lambda_d"), ("vera-llama", "base_model.vera_A"),
               ("loha-conv-cp", f"{P}conv1.hada_t1")]


@pytest.mark.parametrize("dt", list(NOT_FLOAT))
@pytest.mark.parametrize("name,key", TUNER_PARTS, ids=[f"{n}-{k.rsplit('.', 1)[-1]}" for n, k in TUNER_PARTS])
def test_tuner_tensor_not_floating_point_is_refused(name, key, dt, tuner_adapters, tmp_path):
    """An integer, bool or float8 tuner tensor used to be upcast to float32 without a word (LoRA factors are refused)."""
    base, bad = _tuner_with(tuner_adapters, name, tmp_path, lambda t: t.__setitem__(key, (t[key] * 4).to(NOT_FLOAT[dt])))
    err = _refused(base, bad, tmp_path)
    assert "not floating point" in err and key in err, err


@pytest.mark.parametrize("name,key", TUNER_PARTS, ids=[f"{n}-{k.rsplit('.', 1)[-1]}" for n, k in TUNER_PARTS])
def test_tuner_tensor_with_a_zero_dimension_is_refused(name, key, tuner_adapters, tmp_path):
    base, bad = _tuner_with(tuner_adapters, name, tmp_path, lambda t: t.__setitem__(key, t[key][..., :0].clone()))
    err = _refused(base, bad, tmp_path)
    assert "zero dimension" in err and key in err, err


@pytest.mark.parametrize("name,key", TUNER_PARTS, ids=[f"{n}-{k.rsplit('.', 1)[-1]}" for n, k in TUNER_PARTS])
def test_tuner_tensor_with_nan_is_refused(name, key, tuner_adapters, tmp_path):
    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")

    base, bad = _tuner_with(tuner_adapters, name, tmp_path, edit)
    err = _refused(base, bad, tmp_path)
    assert "NaN or Inf" in err and key in err, err


@pytest.mark.parametrize("field,value", [("r", 2**40), ("r", 2**63), ("r", -3), ("r", 4.0), ("alpha", 10**400), ("alpha", -1e308),
                                         ("rank_pattern", {"q_proj": 2**62}), ("alpha_pattern", {"q_proj": 10**5000}),
                                         ("alpha_pattern", {"q_proj": float("inf")})])
def test_tuner_config_numbers_are_checked_without_raising(field, value, tuner_adapters, tmp_path):
    """Tuner configs get LoRA's number checks (ranks up to MAX_RANK), and a huge integer is an error, never an
    OverflowError or ValueError (the check runs on the parsed dict, whatever the JSON reader lets through)."""
    from adapterops.io.tuner_adapter import check_tuner_config

    _, adapter = tuner_adapters["loha-llama"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg[field] = value
    with pytest.raises(AdapteropsError) as err:
        check_tuner_config(cfg, adapter / "adapter_config.json", "LOHA")
    assert field in str(err.value) and len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 10**400, "7", 7.0])
def test_vera_prng_key_outside_torch_seed_range_is_refused(seed, tuner_adapters, tmp_path):
    """torch's manual_seed raises RuntimeError outside [-2**63, 2**64 - 1]: a traceback from the merge."""
    from adapterops.io.tuner_adapter import check_tuner_config

    _, adapter = tuner_adapters["vera-llama-prng"]
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["projection_prng_key"] = seed
    with pytest.raises(AdapteropsError, match="projection_prng_key"):
        check_tuner_config(cfg, adapter / "adapter_config.json", "VERA")
    cfg["projection_prng_key"] = 2**64 - 1
    check_tuner_config(cfg, adapter / "adapter_config.json", "VERA")


# ---- LoHa / LoKr factor shapes: ranks (ndim) and sizes checked before any indexing, and the ΔW PEFT would make ----

DOWN = "model.layers.0.mlp.down_proj"
CONV1 = f"{P}conv1"


def _set(key: str, make):
    return lambda t: t.__setitem__(key, make(t[key]).contiguous())


def _w1_as_3d_product(t):
    """lokr_w1 [8, 8] replaced by its product form (lokr_w1_a [8, r], lokr_w1_b [r, 8]), lokr_w1_a then made 3-D."""
    w1 = t.pop(f"{P}{Q}.lokr_w1")
    t[f"{P}{Q}.lokr_w1_a"] = torch.randn(1, w1.shape[0], 4)
    t[f"{P}{Q}.lokr_w1_b"] = torch.randn(4, w1.shape[1])


BAD_NDIM = {  # the audit's case first: a Tucker LoHa whose hada_w1_a is 1-D (w1a[1] raised IndexError)
    "loha_tucker_1d_w1a": ("loha-conv-cp", f"{CONV1}.hada_w1_a", lambda w: w.reshape(-1)),
    "loha_tucker_3d_t2": ("loha-conv-cp", f"{CONV1}.hada_t2", lambda w: w[..., 0]),
    "loha_1d_w1a": ("loha-llama", f"{P}{Q}.hada_w1_a", lambda w: w.reshape(-1)),
    "loha_3d_w2b": ("loha-llama", f"{P}{Q}.hada_w2_b", lambda w: w[None]),
    "loha_0d_w1b": ("loha-llama", f"{P}{Q}.hada_w1_b", lambda w: w[0, 0]),
    "lokr_1d_w1": ("lokr-llama", f"{P}{Q}.lokr_w1", lambda w: w.reshape(-1)),
    "lokr_5d_w2": ("lokr-llama", f"{P}{Q}.lokr_w2", lambda w: w[None, None, None]),
    "lokr_1d_w2_a": ("lokr-llama", f"{P}{UP}.lokr_w2_a", lambda w: w.reshape(-1)),
    "lokr_3d_w1_a": ("lokr-llama", f"{P}{Q}.lokr_w1_a", _w1_as_3d_product),
    "lokr_tucker_3d_t2": ("lokr-conv-cp", f"{CONV1}.lokr_t2", lambda w: w[..., 0]),
}


@pytest.mark.parametrize("case", list(BAD_NDIM))
def test_tuner_factor_of_the_wrong_rank_is_refused_naming_it(case, tuner_adapters, tmp_path):
    name, key, make = BAD_NDIM[case]
    base, bad = _tuner_with(tuner_adapters, name, tmp_path, make if make is _w1_as_3d_product else _set(key, make))
    assert key in bad.joinpath("adapter_model.safetensors").read_bytes().decode("latin-1")
    err = _refused(base, bad, tmp_path)
    assert key in err and "as PEFT makes it" in err, err
    with pytest.raises(AdapteropsError, match="as PEFT makes it"):  # rerank reads the same factors
        adapterops.rerank(bad, tmp_path / "rr", rank=2, base=MODELS / base)


@pytest.mark.parametrize("name,field,value", [("loha-llama", "r", 3), ("lokr-llama-both", "r", 3),
                                              ("loha-llama", "rank_pattern", {"down_proj": 4})])
def test_tuner_factor_rank_other_than_the_configs_is_refused(name, field, value, tuner_adapters, tmp_path):
    """PEFT makes the factors with the config's r (it refuses a file of another size); merging them would scale by
    α/r with the wrong r."""
    base, adapter = tuner_adapters[name]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg[field] = value
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    err = _refused(base, bad, tmp_path)
    assert "has rank" in err and "but the config gives this module r=" in err, err


def _transposed(kind: str, module: str):
    """An edit that transposes one module's ΔW through its factors: (AB)ᵀ = BᵀAᵀ, kron(A, B)ᵀ = kron(Aᵀ, Bᵀ)."""
    def edit(t):
        k = f"{P}{module}."
        if kind == "loha":
            for i in "12":
                a, b = t[f"{k}hada_w{i}_a"], t[f"{k}hada_w{i}_b"]
                t[f"{k}hada_w{i}_a"], t[f"{k}hada_w{i}_b"] = b.T.contiguous(), a.T.contiguous()
        else:
            t[f"{k}lokr_w1"] = t[f"{k}lokr_w1"].T.contiguous()
            a, b = t[f"{k}lokr_w2_a"], t[f"{k}lokr_w2_b"]
            t[f"{k}lokr_w2_a"], t[f"{k}lokr_w2_b"] = b.T.contiguous(), a.T.contiguous()
    return edit


@pytest.mark.parametrize("kind,name", [("loha", "loha-llama"), ("lokr", "lokr-llama")])
def test_tuner_delta_with_the_weights_element_count_but_not_its_shape_is_refused(kind, name, tuner_adapters, tmp_path):
    """up_proj's weight is [128, 64]; factors whose ΔW is [64, 128] (an adapter made for down_proj) have the same
    8,192 values, and the reshape used to merge them scrambled, exit 0. PEFT refuses to load such a file."""
    from peft import PeftModel
    from references import make_fixtures

    base, bad = _tuner_with(tuner_adapters, name, tmp_path, _transposed(kind, UP))
    err = _refused(base, bad, tmp_path)
    assert "[64, 128]" in err and "[128, 64]" in err and UP in err, err
    with pytest.raises(AdapteropsError, match=r"\[64, 128\]"):  # rerank --base too (the same ΔW, from core.tuners)
        adapterops.rerank(bad, tmp_path / "rr", rank=2, base=MODELS / base)
    with pytest.raises(Exception, match="size mismatch"):
        PeftModel.from_pretrained(make_fixtures().load_base(base, torch.float32), bad)


def test_tuner_transposed_on_a_square_weight_still_merges(tuner_adapters, tmp_path):
    """The same transposition on q_proj ([64, 64]) is another valid ΔW, which PEFT loads: it still merges."""
    base, edited = _tuner_with(tuner_adapters, "loha-llama", tmp_path, _transposed("loha", Q))
    adapterops.merge(MODELS / base, [edited], tmp_path / "out")
    assert (tmp_path / "out").is_dir()


@pytest.mark.parametrize("name,flag,part", [("loha-conv-cp", False, "hada_t1"), ("loha-conv", True, "hada_w1_a"),
                                            ("lokr-conv-cp", False, "lokr_t2")])
def test_tuner_conv_factors_in_the_other_form_than_the_config_are_refused(name, flag, part, tuner_adapters, tmp_path):
    """use_effective_conv2d decides whether PEFT makes Tucker cores for a k×k kernel; factors in the other form are
    not what PEFT would load (it refuses them, or keeps its random cores)."""
    base, adapter = tuner_adapters[name]
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["use_effective_conv2d"] = flag
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    err = _refused(base, bad, tmp_path)
    assert "use_effective_conv2d" in err and part in err and "conv1" in err, err


def test_ia3_on_a_base_bias_that_does_not_fit_its_weight_is_an_error(tuner_adapters, tmp_path):
    """IA3 scales a non-feed-forward module's bias by its vector; a base bias of another size used to end in
    reshape's RuntimeError (a traceback)."""
    from helpers import copy_fixture, read_file

    from adapterops.io.safetensors_io import save_file

    _, adapter = tuner_adapters["ia3-llama"]
    base = copy_fixture("model", "llama-untied", tmp_path)
    bias = "model.layers.0.self_attn.q_proj.bias"
    index = json.loads((base / "model.safetensors.index.json").read_text())
    shard = base / index["weight_map"][bias]
    tensors = read_file(shard)
    tensors[bias] = torch.randn(65)
    save_file(tensors, shard)
    with pytest.raises(AdapteropsError, match=r"IA3 vector of 64 values cannot scale a bias of shape \[65\]"):
        adapterops.merge(base, [adapter], tmp_path / "out")
    assert not (tmp_path / "out").exists()
