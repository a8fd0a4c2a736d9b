"""`adapterops quantize` / `dequantize` against what transformers + bitsandbytes save.

References, and which are stored:
- Quantize, CPU-independent parts: stored (fixtures/nf4/tf-*). Keys, dtypes, shapes, the packed 4-bit codes (a max,
  an IEEE reciprocal and comparisons per element), the quant maps (format constants), the tensors left unquantized
  (copies), the quant-state JSON apart from its offset, and the config's quantization_config: no CPU changes them.
- Quantize, offset-dependent parts: live. Double quantization subtracts torch's `absmax.mean()`, a reduction whose
  summation order follows the CPU's kernels; the 8-bit absmax codes, the nested absmax and the JSON's
  `nested_offset` follow from it. The reference is what transformers + bitsandbytes save on this CPU, rebuilt once
  per session by fixtures/make_fixtures.py's `make_nf4_reference` (tests/references.py); it skips without them.
- Dequantize: stored (fixtures/nf4/tf-*/bnb_dequantized.safetensors.ref). From a stored checkpoint it is element-wise
  (code · absmax, nested code · nested absmax + offset), one IEEE rounding each, the same on every CPU.

Tolerances: none, except that the nested 8-bit absmax codes may differ in a few places from bitsandbytes' CPU path,
which snaps to a 16-bit lookup grid instead of the CUDA kernel's exact search that we follow (the CUDA golden tests
in test_nf4.py pin that down). The reference notes measure that LUT at 0.17 % of codes, each off by at most 4
steps; we allow 2 % of a tensor's codes (at least 2), each within 4 steps.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import FIXTURES, MODELS, leftovers, read_all, read_file

from adapterops.cli import cli
from adapterops.core import nf4

REF = FIXTURES / "nf4"


def run(*args):
    """Invoke the CLI."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


OFFSET_DEPENDENT = (".absmax", ".nested_absmax")  # follow from the offset, a CPU-dependent torch mean
QUANT_STATE = ".quant_state.bitsandbytes__nf4"  # a JSON whose nested_offset is that mean (and whose length varies with it)


def quant_state(t: torch.Tensor) -> dict:
    """The packed quant-state JSON of one NF4 weight."""
    return json.loads(bytes(t.tolist()))


def assert_nested_codes_close(got: torch.Tensor, want: torch.Tensor, name: str) -> None:
    """bitsandbytes-CPU's LUT, see the module docstring: a few 8-bit absmax codes may be off by at most 4 steps."""
    diff = got != want
    assert int(diff.sum()) <= max(2, got.numel() // 50), name
    assert all(abs(int(a) - int(b)) <= 4 for a, b in zip(got[diff], want[diff])), name


@pytest.mark.parametrize("model", ["llama-tied", "gpt2"])
def test_quantize_writes_what_transformers_bitsandbytes_write(model, out):
    """Against the stored reference, for everything that does not depend on the CPU (module docstring)."""
    res = run("quantize", MODELS / model, out, "-q", "--compute-dtype", "bfloat16")  # as the reference was made
    assert res.exit_code == 0, res.output
    ours, ref = read_all(out), read_all(REF / f"tf-{model}")
    assert sorted(ours) == sorted(ref)
    for k, want in ref.items():
        got = ours[k]
        if k.endswith(QUANT_STATE):
            mine, theirs = quant_state(got), quant_state(want)
            assert sorted(mine) == sorted(theirs) and mine.pop("nested_offset", None) is not None, k
            theirs.pop("nested_offset")
            assert mine == theirs, k
            continue
        assert (got.dtype, got.shape) == (want.dtype, want.shape), k
        if not k.endswith(OFFSET_DEPENDENT):  # those are checked against bitsandbytes run live, below
            assert torch.equal(got, want), k
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (out, REF / f"tf-{model}"))
    assert cfg["quantization_config"] == ref_cfg["quantization_config"]


@pytest.mark.parametrize("model", ["llama-tied", "gpt2"])
def test_quantize_matches_transformers_bitsandbytes_live(model, out, nf4_checkpoint_reference):
    """Every tensor, the offset-dependent ones included, against transformers + bitsandbytes run on this CPU."""
    ref_dir = nf4_checkpoint_reference / f"tf-{model}"
    res = run("quantize", MODELS / model, out, "-q", "--compute-dtype", "bfloat16")  # as the reference is made
    assert res.exit_code == 0, res.output
    ours, ref = read_all(out), read_all(ref_dir)
    assert sorted(ours) == sorted(ref)
    for k, want in ref.items():
        got = ours[k]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), k
        if k.endswith(".absmax") and got.dtype == torch.uint8:
            assert_nested_codes_close(got, want, k)
        else:
            assert torch.equal(got, want), k  # nested absmax and the JSON's nested_offset included
    cfg, ref_cfg = (json.loads((d / "config.json").read_text()) for d in (out, ref_dir))
    assert cfg["quantization_config"] == ref_cfg["quantization_config"]


def test_transformers_reads_our_nf4_as_we_wrote_it(out, tmp_path):
    transformers = pytest.importorskip("transformers")
    bnb = pytest.importorskip("bitsandbytes")
    assert run("quantize", MODELS / "llama-tied", out, "-q").exit_code == 0
    assert run("dequantize", out, tmp_path / "deq", "-q").exit_code == 0
    ours = read_all(tmp_path / "deq")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
            assert torch.equal(w, ours[f"{name}.weight"]), name
            n += 1
    assert n == 14


@pytest.mark.parametrize("model", ["llama-tied", "gpt2"])
def test_dequantize_reads_transformers_checkpoints(model, out):
    """Stored input and stored reference: dequantizing is element-wise, so its bytes are the same on every CPU."""
    res = run("dequantize", REF / f"tf-{model}", out, "-q")
    assert res.exit_code == 0, res.output
    ours = read_all(out)
    bnb_deq = read_file(REF / f"tf-{model}" / "bnb_dequantized.safetensors.ref")
    base = read_all(MODELS / model)
    assert sorted(ours) == sorted(base)
    for k, want in bnb_deq.items():
        got = ours[k].T if model == "gpt2" else ours[k]  # Conv1D weights go back to their (in, out) layout
        assert torch.equal(got, want), k
    assert "quantization_config" not in json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("blocksize,dq", [(64, True), (128, False), (256, True)])
def test_round_trip_through_the_cli(blocksize, dq, tmp_path):
    q, d = tmp_path / "q", tmp_path / "d"
    args = ["quantize", MODELS / "llama-untied", q, "-q", "--blocksize", blocksize] + ([] if dq else ["--no-double-quant"])
    assert run(*args).exit_code == 0
    res = run("dequantize", q, d, "--json")
    assert res.exit_code == 0 and json.loads(res.stdout)["tensors_quantized"] == 14
    base, back = read_all(MODELS / "llama-untied"), read_all(d)
    assert sorted(base) == sorted(back)
    half_gap = float((nf4.NF4_CODE[1:] - nf4.NF4_CODE[:-1]).max() / 2)
    for k, w in base.items():
        if k.endswith("proj.weight"):
            err = (back[k].float() - w.float()).abs().reshape(-1, blocksize)
            absmax = w.float().abs().reshape(-1, blocksize).amax(1, keepdim=True)
            # NF4 rounding + the nested absmax's own error (8-bit, relative) + bf16 output rounding
            assert bool((err <= absmax * (half_gap + 0.02)).all()), k
        else:
            assert torch.equal(back[k], w), k  # norms, embeddings, lm_head and biases are not quantized
    assert json.loads((q / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in read_all(q).values())


def test_skip_writes_full_module_names(out):
    res = run("quantize", MODELS / "llama-tied", out, "-q", "--skip", "down_proj")
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    tensors = read_all(out)
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert "model.layers.0.mlp.down_proj.weight.absmax" not in tensors


@pytest.mark.parametrize("args,message", [
    (["quantize", REF / "tf-llama-tied"], "already quantized"),
    (["quantize", MODELS / "llama-tied", "--skip", "nothing_here"], "matches no Linear module"),
    (["dequantize", MODELS / "llama-tied"], "holds no NF4 weights"),
])
def test_bad_input(args, message, tmp_path):
    res = CliRunner().invoke(cli, [str(a) for a in args[:2]] + [str(tmp_path / "out"), "-q"] + [str(a) for a in args[2:]])
    assert res.exit_code == 2 and message in res.stderr
    assert leftovers(tmp_path) == []


def test_merge_onto_nf4_base(tmp_path):
    """QLoRA merge: W' = bf16(fl32(dequant(W)) + ΔW), one rounding; the output is a plain bf16 checkpoint.

    Tolerance: none; the expectation is built from the same core functions (NF4 dequantize in float32, PEFT's
    ΔW) that the golden tests tie to bitsandbytes and PEFT.
    """
    from adapterops.core.lora import delta_weight
    from adapterops.io.adapter import open_adapter
    from adapterops.io.checkpoint import open_checkpoint
    from adapterops.io.nf4_checkpoint import dequantized_view

    q, out = tmp_path / "q", tmp_path / "merged"
    assert run("quantize", MODELS / "llama-tied", q, "-q").exit_code == 0
    res = run("merge", q, FIXTURES / "adapters" / "llama-lora", out, "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["modules_merged"] == 14
    merged = read_all(out)
    view = dequantized_view(open_checkpoint(q), torch.float32)
    ad = open_adapter(FIXTURES / "adapters" / "llama-lora")
    assert sorted(merged) == sorted(read_all(MODELS / "llama-tied"))
    for name, t in merged.items():
        assert t.dtype == torch.bfloat16, name
        w = view.read(name).float()
        mod = ad.modules.get(name[: -len(".weight")])
        want = w if mod is None else w + delta_weight("linear", ad.read(mod.a_key), ad.read(mod.b_key), mod.scale)
        assert torch.equal(t, want.to(torch.bfloat16)), name
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"


def test_requantize_keeps_nf4_and_leaves_other_weights_alone(tmp_path):
    """--requantize: changed weights are NF4 of (bnb-dequantized W + ΔW) in float32; untouched ones keep their bytes."""
    q = tmp_path / "q"
    assert run("quantize", MODELS / "llama-tied", q, "-q", "--blocksize", "128").exit_code == 0
    res = run("merge", q, FIXTURES / "adapters" / "llama-rslora-patterns", tmp_path / "rq", "--requantize", "-q")
    assert res.exit_code == 0, res.output
    base, got = read_all(q), read_all(tmp_path / "rq")
    assert sorted(base) == sorted(got)
    changed = {k for k in base if not torch.equal(base[k], got[k])}
    adapted = {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
               "model.layers.1.self_attn.v_proj", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert {k.split(".weight")[0] for k in changed} == adapted
    state = json.loads(bytes(got["model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"].tolist()))
    assert state["dtype"] == "float32" and state["blocksize"] == 128  # bnb quantizes the float32 sum, as PEFT
    cfg = json.loads((tmp_path / "rq" / "config.json").read_text())
    assert cfg["quantization_config"] == json.loads((q / "config.json").read_text())["quantization_config"]
    bad = run("merge", MODELS / "llama-tied", FIXTURES / "adapters" / "llama-lora", tmp_path / "x", "--requantize")
    assert bad.exit_code == 2 and "--requantize needs an NF4 base" in bad.stderr
    bad = run("merge", q, FIXTURES / "adapters" / "llama-lora", tmp_path / "x", "--requantize", "--dtype", "float32")
    assert bad.exit_code == 2 and "drop --dtype" in bad.stderr
    assert leftovers(tmp_path) == []


def test_requantize_matches_peft_merge_on_bitsandbytes(tmp_path):
    """PEFT's merge_and_unload on a transformers 4-bit model (bitsandbytes on the CPU) requantizes too.

    Tolerance: packed 4-bit codes equal; nested absmax codes as in the module docstring (bitsandbytes-CPU's LUT).
    """
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    bnb = pytest.importorskip("bitsandbytes")
    q = tmp_path / "q"
    assert run("quantize", MODELS / "llama-tied", q, "-q").exit_code == 0
    assert run("merge", q, FIXTURES / "adapters" / "llama-lora", tmp_path / "rq", "--requantize", "-q").exit_code == 0
    ours = read_all(tmp_path / "rq")
    model = transformers.AutoModelForCausalLM.from_pretrained(q, device_map="cpu")
    merged = peft.PeftModel.from_pretrained(model, FIXTURES / "adapters" / "llama-lora").merge_and_unload()
    n = 0
    for name, module in merged.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        qs = module.weight.quant_state
        assert torch.equal(module.weight.data.reshape(-1), ours[f"{name}.weight"].reshape(-1)), name
        assert qs.dtype == torch.float32 and qs.blocksize == 64
        assert_nested_codes_close(ours[f"{name}.weight.absmax"], qs.absmax, name)
        n += 1
    assert n == 14
