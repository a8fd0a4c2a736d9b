"""The format layer (issue 18) without the consumers: PEFT → GGUF / mlx-lm / torchtune → PEFT round trips, the q/k
row permutation, refusals, the lossy path, format detection and `inspect` of each format.

The consumers' own checks (llama.cpp, mlx-lm, torchtune loading the converted adapters) are in
test_formats_interop.py. GGUF needs the gguf package (the `gguf` extra, in `dev` too); its cases skip without it.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import adapterops
from adapterops.core.heads import from_interleaved, to_interleaved
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import open_adapter
from adapterops.io.formats import detect_format
from adapterops.io.safetensors_io import save_file
from adapterops.pipeline.convert_formats import convert_format
from tests.helpers import ADAPTERS, MODELS, read_file

BASE = MODELS / "llama-tied"
TARGETS = ["mlx", "torchtune", pytest.param("gguf", marks=pytest.mark.skipif(
    __import__("importlib").util.find_spec("gguf") is None, reason="the gguf package is not installed (gguf extra)"))]


def _out(tmp_path: Path, to: str, name: str = "out") -> Path:
    return tmp_path / (f"{name}.gguf" if to == "gguf" else name)


def _deltas(path: Path) -> dict[str, torch.Tensor]:
    """Every module's ΔW = s·B·A in float64, from a PEFT adapter."""
    with open_adapter(path) as ad:
        return {m: mod.scale * (ad.read(mod.b_key).double() @ ad.read(mod.a_key).double()) for m, mod in ad.modules.items()}


@pytest.mark.parametrize("to", TARGETS)
def test_plain_lora_round_trip_is_exact(tmp_path: Path, to: str) -> None:
    """One rank and one alpha: every format keeps the factors as they are, and PEFT gets them back bit for bit."""
    src = ADAPTERS / "llama-lora"
    mid = _out(tmp_path, to)
    r = convert_format(src, mid, to=to, base=BASE)
    assert r.exact and not r.folded and detect_format(mid) == to
    back = convert_format(mid, tmp_path / "back", to="peft", base=BASE, allow_pickle=True)  # torchtune's .pt
    assert back.exact
    orig, got = read_file(src / "adapter_model.safetensors"), read_file(tmp_path / "back" / "adapter_model.safetensors")
    assert set(orig) == set(got)
    for k in orig:
        assert got[k].dtype == orig[k].dtype and torch.equal(got[k], orig[k]), k
    cfg, ocfg = json.loads((tmp_path / "back" / "adapter_config.json").read_text()), json.loads((src / "adapter_config.json").read_text())
    assert (cfg["r"], cfg["lora_alpha"], cfg["rank_pattern"], cfg["alpha_pattern"]) == (ocfg["r"], ocfg["lora_alpha"], {}, {})
    assert sorted(t.split(".")[-1] for t in cfg["target_modules"]) == sorted(ocfg["target_modules"])
    with open_adapter(tmp_path / "back") as a, open_adapter(src) as b:
        assert {m: x.scale for m, x in a.modules.items()} == {m: x.scale for m, x in b.modules.items()}


@pytest.mark.parametrize("to", TARGETS)
def test_rslora_with_patterns_round_trip(tmp_path: Path, to: str) -> None:
    """rsLoRA with rank and alpha patterns: scales are folded into lora_B (and ranks padded where the format has one
    rank); back in PEFT every module has its own rank again and ΔW equal to fp32 rounding."""
    src = ADAPTERS / "llama-rslora-patterns"
    mid = _out(tmp_path, to)
    r = convert_format(src, mid, to=to, base=BASE)
    assert r.folded and not r.exact
    convert_format(mid, tmp_path / "back", to="peft", base=BASE, allow_pickle=True)
    want, got = _deltas(src), _deltas(tmp_path / "back")
    assert set(want) == set(got)
    for m in want:
        assert (got[m] - want[m]).abs().max() <= 1e-6 * want[m].abs().max(), m
    with open_adapter(tmp_path / "back") as a, open_adapter(src) as b:
        assert {m: x.r for m, x in a.modules.items()} == {m: x.r for m, x in b.modules.items()}  # padding stripped


def test_mlx_layout(tmp_path: Path) -> None:
    """mlx-lm's files: lora_a = Aᵀ (in, r), lora_b = Bᵀ (r, out), scale used directly, no alpha key."""
    convert_format(ADAPTERS / "llama-lora", tmp_path / "mlx", to="mlx", base=BASE)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    assert cfg["fine_tune_type"] == "lora" and cfg["num_layers"] == 2
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": [
        "mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj", "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj"]}
    t = read_file(tmp_path / "mlx" / "adapters.safetensors")
    o = read_file(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    q = "model.layers.0.self_attn.q_proj"
    assert torch.equal(t[f"{q}.lora_a"], o[f"base_model.model.{q}.lora_A.weight"].T)
    assert torch.equal(t[f"{q}.lora_b"], o[f"base_model.model.{q}.lora_B.weight"].T)


def test_torchtune_layout_permutes_q_and_k(tmp_path: Path) -> None:
    """torchtune's keys, with lora_B of q and k interleaved per head (k by the KV-head count), v untouched."""
    convert_format(ADAPTERS / "llama-lora", tmp_path / "tt", to="torchtune", base=BASE)
    t = torch.load(tmp_path / "tt" / "adapter_model.pt", weights_only=True)
    o = read_file(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    p = "base_model.model.model.layers.1."
    assert torch.equal(t["layers.1.attn.q_proj.lora_b.weight"], to_interleaved(o[p + "self_attn.q_proj.lora_B.weight"], 4))
    assert torch.equal(t["layers.1.attn.k_proj.lora_b.weight"], to_interleaved(o[p + "self_attn.k_proj.lora_B.weight"], 2))
    assert torch.equal(t["layers.1.attn.v_proj.lora_b.weight"], o[p + "self_attn.v_proj.lora_B.weight"])
    assert torch.equal(t["layers.1.mlp.w2.lora_a.weight"], o[p + "mlp.down_proj.lora_A.weight"])
    cfg = json.loads((tmp_path / "tt" / "adapter_config.json").read_text())["torchtune"]
    assert cfg == {"model_type": "llama", "lora_rank": 8, "lora_alpha": 16.0, "lora_attn_modules": ["q_proj", "k_proj", "v_proj", "output_proj"],
                   "apply_lora_to_mlp": True, "apply_lora_to_output": False}


def _rope_half(x: torch.Tensor, pos: int, hd: int) -> torch.Tensor:
    """transformers' RoPE on one head: pairs (i, i + hd/2)."""
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    c, s = torch.cos(pos * inv), torch.sin(pos * inv)
    x1, x2 = x[: hd // 2], x[hd // 2:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s])


def _rope_interleaved(x: torch.Tensor, pos: int, hd: int) -> torch.Tensor:
    """Meta's / llama.cpp's / torchtune's RoPE on one head: pairs (2i, 2i + 1)."""
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    c, s = torch.cos(pos * inv), torch.sin(pos * inv)
    x1, x2 = x[0::2], x[1::2]
    return torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], 1).reshape(-1)


def test_interleaving_is_what_rope_needs() -> None:
    """Permuted rows under interleaved RoPE give the permuted result of rotate-half RoPE, head by head."""
    heads, hd = 3, 8
    w = torch.randn(heads * hd, 5, dtype=torch.float64)
    x = torch.randn(5, dtype=torch.float64)
    assert torch.equal(from_interleaved(to_interleaved(w, heads), heads), w)
    for pos in (0, 3, 11):
        hf = torch.cat([_rope_half((w @ x)[h * hd:(h + 1) * hd], pos, hd) for h in range(heads)])
        wp = to_interleaved(w, heads)
        il = torch.cat([_rope_interleaved((wp @ x)[h * hd:(h + 1) * hd], pos, hd) for h in range(heads)])
        assert torch.allclose(il, to_interleaved(hf.unsqueeze(1), heads).squeeze(1), atol=1e-12)


@pytest.mark.parametrize(("adapter", "to", "base", "match"), [
    ("llama-dora", "mlx", BASE, "DoRA|embedding"),
    ("llama-embedding", "torchtune", BASE, "embedding LoRA"),
    ("llama-lora-bias", "mlx", None, "lora_bias"),
    ("llama-untied-mts", "torchtune", MODELS / "llama-untied", "modules_to_save"),
    ("gpt2-lora", "mlx", None, "fan_in_fan_out"),
    ("llama-lora", "torchtune", None, "needs the base model"),
    ("llama-lora", "torchtune", MODELS / "gpt2", "torchtune conversion supports"),
    ("llama-lora", "peft", None, "already a peft adapter"),
])
def test_refusals(tmp_path: Path, adapter: str, to: str, base: Path | None, match: str) -> None:
    with pytest.raises(AdapteropsError, match=match):
        convert_format(ADAPTERS / adapter, tmp_path / "out", to=to, base=base)
    assert not (tmp_path / "out").exists()


def test_gguf_needs_a_base_and_refuses_tied_lm_head(tmp_path: Path) -> None:
    pytest.importorskip("gguf", reason="the gguf package is not installed (gguf extra)")
    with pytest.raises(AdapteropsError, match="GGUF needs the base model"):
        convert_format(ADAPTERS / "llama-lora", tmp_path / "x.gguf", to="gguf")
    ad = tmp_path / "lm-head"  # llama-lora plus a LoRA on lm_head, whose weight the tied base shares
    shutil.copytree(ADAPTERS / "llama-lora", ad)
    tensors = read_file(ad / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.ones(8, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.ones(128, 8)
    save_file(tensors, ad / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(AdapteropsError, match="tied embeddings"):
        convert_format(ad, tmp_path / "y.gguf", to="gguf", base=BASE)
    with pytest.raises(AdapteropsError, match="tied embeddings"):
        convert_format(ad, tmp_path / "z", to="torchtune", base=BASE)


def test_lossy_modules_to_save_are_re_extracted(tmp_path: Path) -> None:
    """allow_lossy: lm_head (modules_to_save) becomes a LoRA by SVD of W_new − W_base at the adapter's rank, with
    its relative error reported; the norms (no LoRA form) are dropped and listed."""
    r = convert_format(ADAPTERS / "llama-untied-mts", tmp_path / "out", to="mlx", base=MODELS / "llama-untied", allow_lossy=True)
    assert not r.exact and set(r.lossy) == {"lm_head"} and 0 <= r.lossy["lm_head"] < 1
    assert any("norm" in d for d in r.dropped)
    row = next(x for x in r.modules if x["module"] == "lm_head")
    assert row["lossy_error"] == r.lossy["lm_head"]


def test_lossy_drops_lora_bias_with_its_norm(tmp_path: Path) -> None:
    r = convert_format(ADAPTERS / "llama-lora-bias", tmp_path / "out", to="mlx", allow_lossy=True)
    assert any("lora_B.bias" in d for d in r.dropped) and not r.exact


def test_foreign_refusals(tmp_path: Path) -> None:
    convert_format(ADAPTERS / "llama-lora", tmp_path / "mlx", to="mlx", base=BASE)
    cfg = json.loads((tmp_path / "mlx" / "adapter_config.json").read_text())
    cfg["lora_parameters"]["alpha"] = cfg["lora_parameters"].pop("scale")
    (tmp_path / "mlx" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapteropsError, match="uses 'scale', not 'alpha'"):
        convert_format(tmp_path / "mlx", tmp_path / "back", to="peft")
    convert_format(ADAPTERS / "llama-lora", tmp_path / "tt", to="torchtune", base=BASE)
    with pytest.raises(AdapteropsError, match="head counts"):  # q/k rows cannot be restored without the heads
        convert_format(tmp_path / "tt", tmp_path / "back2", to="peft", allow_pickle=True)
    torch.save({"layers.0.attn.q_proj.lora_a.weight": torch.zeros(2, 2), "layers.0.attn.pos.weight": torch.zeros(1)},
               tmp_path / "tt" / "adapter_model.pt")
    with pytest.raises(AdapteropsError, match="layers.0.attn.pos.weight"):
        convert_format(tmp_path / "tt", tmp_path / "back3", to="peft", base=BASE, allow_pickle=True)


def test_output_rules(tmp_path: Path) -> None:
    """An existing OUT is replaced only with force; the input is never an output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(AdapteropsError, match="--force"):
        convert_format(ADAPTERS / "llama-lora", out, to="mlx", base=BASE)
    assert (out / "keep").exists()
    convert_format(ADAPTERS / "llama-lora", out, to="mlx", base=BASE, force=True)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapters.safetensors"]
    copy = tmp_path / "copy"
    shutil.copytree(ADAPTERS / "llama-lora", copy)
    with pytest.raises(AdapteropsError, match="overlaps the input"):
        convert_format(copy, copy / "inside", to="mlx", base=BASE)


@pytest.mark.parametrize("to", TARGETS)
def test_inspect_recognises_each_format(tmp_path: Path, to: str) -> None:
    mid = _out(tmp_path, to)
    convert_format(ADAPTERS / "llama-rslora-patterns", mid, to=to, base=BASE)
    r = adapterops.inspect(mid, allow_pickle=True)
    assert r.kind == f"{to}-adapter" and r.summary["format"] == to
    assert r.summary["modules"] - r.summary["empty_modules"] == 6 and not r.warnings
    assert all(math.isfinite(row["scale"]) for row in r.modules)


def test_report_to_dict_is_json(tmp_path: Path) -> None:
    r = convert_format(ADAPTERS / "llama-rslora-patterns", tmp_path / "tt", to="torchtune", base=BASE)
    d = json.loads(json.dumps(r.to_dict()))
    assert d["to_format"] == "torchtune" and d["rank"] == 8 and d["folded"] and d["filled"] == 4
    q = next(x for x in d["modules"] if x["module"] == "model.layers.0.self_attn.q_proj")
    assert q["target"] == "layers.0.attn.q_proj" and q["permuted"] and q["rank"] == 8


# ---- numbers and tensors read from a foreign format are checked as PEFT's are (never NaN, Inf, or a crash) ----

def _literal(text: str, path: list[str], literal: str) -> str:
    """JSON text with the value at `path` replaced by a raw literal (NaN, 1e400, a 400-digit integer...)."""
    cfg = json.loads(text)
    node = cfg
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = "__X__"
    return json.dumps(cfg).replace('"__X__"', literal)


BAD_SCALARS = {"nan": "NaN", "inf": "Infinity", "minus_inf": "-Infinity", "1e400": "1e400", "over_float32": "1e39",
               "int_400_digits": "1" + "0" * 400, "negative": "-2", "zero": "0", "string": '"2"', "bool": "true",
               "list": "[2]", "object": '{"v": 2}', "null": "null"}
OVERFLOWING = {"1e400", "int_400_digits"}  # the JSON reader may refuse these first: either way one clean error


def _refused(src: Path, tmp_path: Path, field: str | None, case: str, **kw) -> None:
    with pytest.raises(AdapteropsError) as exc:
        convert_format(src, tmp_path / "back", to="peft", base=BASE, **kw)
    assert "adapter_config.json" in str(exc.value), exc.value
    if case not in OVERFLOWING and field is not None:
        assert field in str(exc.value), exc.value
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("key", ["scale", "rank"])
@pytest.mark.parametrize("case", list(BAD_SCALARS))
def test_mlx_numbers_are_checked(key, case, tmp_path: Path) -> None:
    if key == "rank" and case == "null":
        pytest.skip("no rank is allowed: it is read from the tensors")
    src = tmp_path / "mlx"
    convert_format(ADAPTERS / "llama-lora", src, to="mlx", base=BASE)
    f = src / "adapter_config.json"
    f.write_text(_literal(f.read_text(), ["lora_parameters", key], BAD_SCALARS[case]))
    _refused(src, tmp_path, None if case == "null" else f"lora_parameters.{key}", case)


@pytest.mark.parametrize("key", ["lora_alpha", "lora_rank"])
@pytest.mark.parametrize("case", list(BAD_SCALARS))
def test_torchtune_numbers_are_checked(key, case, tmp_path: Path) -> None:
    src = tmp_path / "tt"
    convert_format(ADAPTERS / "llama-lora", src, to="torchtune", base=BASE)
    f = src / "adapter_config.json"
    f.write_text(_literal(f.read_text(), ["torchtune", key], BAD_SCALARS[case]))
    field = "missing" if case == "null" else f"torchtune.{key}"
    _refused(src, tmp_path, field, case, allow_pickle=True)


def test_mlx_scale_nan_never_reaches_a_written_config(tmp_path: Path) -> None:
    """The audit's case, through the command line: `--to peft` wrote "lora_alpha": NaN with exit 0."""
    from click.testing import CliRunner

    from adapterops.cli import cli

    src = tmp_path / "mlx"
    convert_format(ADAPTERS / "llama-lora", src, to="mlx", base=BASE)
    f = src / "adapter_config.json"
    f.write_text(_literal(f.read_text(), ["lora_parameters", "scale"], "NaN"))
    res = CliRunner().invoke(cli, ["convert", str(src), str(tmp_path / "out"), "--to", "peft"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "lora_parameters.scale" in res.stderr, res.output
    assert res.stderr.count("\n") == 1 and not (tmp_path / "out").exists()


FACTOR_EDITS = {
    "nan": lambda t: t.index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("nan"), dtype=t.dtype)),
    "inf": lambda t: t.index_put_((torch.tensor([0]), torch.tensor([0])), torch.tensor(float("inf"), dtype=t.dtype)),
    "int8": lambda t: (t * 100).to(torch.int8),
    "bool": lambda t: t != 0,
    "zero_width": lambda t: t[:, :0].clone(),
}


@pytest.mark.parametrize("case", list(FACTOR_EDITS))
@pytest.mark.parametrize("fmt", ["mlx", "torchtune-safetensors"])
def test_foreign_factors_pass_the_peft_rules(fmt, case, tmp_path: Path) -> None:
    """Non-float, NaN/Inf or empty factors are refused before anything is written (format-only conversions run no
    `check`), naming the file and the tensor."""
    src = tmp_path / "src"
    if fmt == "mlx":
        convert_format(ADAPTERS / "llama-lora", src, to="mlx", base=BASE)
        weights, key = src / "adapters.safetensors", "model.layers.0.self_attn.v_proj.lora_b"
        tensors = read_file(weights)
    else:  # torchtune's keys in adapter_model.safetensors: no pickle involved
        convert_format(ADAPTERS / "llama-lora", src, to="torchtune", base=BASE)
        tensors = torch.load(src / "adapter_model.pt", weights_only=True)
        (src / "adapter_model.pt").unlink()
        weights, key = src / "adapter_model.safetensors", "layers.0.attn.v_proj.lora_b.weight"
    tensors[key] = FACTOR_EDITS[case](tensors[key].clone())
    save_file(tensors, weights, {"format": "pt"})
    with pytest.raises(AdapteropsError) as exc:
        convert_format(src, tmp_path / "back", to="peft", base=BASE)
    assert weights.name in str(exc.value) and "v_proj" in str(exc.value), exc.value
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("scale,b_max,needle", [("1e38", None, "alpha"), ("1e37", 100.0, "lora_B")])
def test_huge_scale_that_overflows_float32_is_refused(scale, b_max, needle, tmp_path: Path) -> None:
    """A finite scale so large that the alpha a target writes (scale · r), or scale · lora_B where a target folds
    it in, overflows float32 is refused before anything is written."""
    src = tmp_path / "mlx"
    convert_format(ADAPTERS / "llama-lora", src, to="mlx", base=BASE)
    f = src / "adapter_config.json"
    f.write_text(_literal(f.read_text(), ["lora_parameters", "scale"], scale))
    if b_max is not None:
        tensors = read_file(src / "adapters.safetensors")
        tensors["model.layers.0.self_attn.v_proj.lora_b"][0, 0] = b_max
        save_file(tensors, src / "adapters.safetensors", {"format": "mlx"})
    for to in ("torchtune", "peft"):
        with pytest.raises(AdapteropsError, match=f"{needle}.*overflow float32"):
            convert_format(src, tmp_path / to, to=to, base=BASE)
        assert not (tmp_path / to).exists()


@pytest.mark.parametrize("to", TARGETS)
def test_peft_source_whose_alpha_overflows_float32_is_refused(to, tmp_path: Path) -> None:
    """A PEFT source passes the same rule: lora_alpha 1e39 fits JSON's float64 but no target's float32 alpha (GGUF's
    writer raised OverflowError; mlx-lm and torchtune got an alpha their float32 arithmetic turns into Inf)."""
    src = tmp_path / "src"
    shutil.copytree(ADAPTERS / "llama-lora", src)
    cfg = json.loads((src / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 1e39
    (src / "adapter_config.json").write_text(json.dumps(cfg))
    out = _out(tmp_path, to)
    with pytest.raises(AdapteropsError, match="adapter_config.json.*alpha.*overflow float32"):
        convert_format(src, out, to=to, base=BASE)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".adapterops-tmp-" in p.name]


# ---- GGUF metadata and tensors ----

def _gguf(path: Path, *, alpha=16.0, arch="llama", a=None, b=None, alpha_kind="float32", arch_kind="string") -> Path:
    """A one-module (blk.0.attn_v) llama.cpp LoRA GGUF with the given metadata and factors."""
    gguf = pytest.importorskip("gguf", reason="the gguf package is not installed (gguf extra)")
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    if arch_kind != "string":
        del w.kv_data[0][gguf.Keys.General.ARCHITECTURE]
        w.add_array(gguf.Keys.General.ARCHITECTURE, [arch])
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    if alpha is not None:
        {"float32": w.add_float32, "string": w.add_string, "array": w.add_array, "bool": w.add_bool}[alpha_kind](
            gguf.Keys.Adapter.LORA_ALPHA, alpha)
    a = np.ones((2, 64), dtype=np.float32) if a is None else a
    b = np.ones((32, 2), dtype=np.float32) if b is None else b
    w.add_tensor("blk.0.attn_v.weight.lora_a", a)
    w.add_tensor("blk.0.attn_v.weight.lora_b", b)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _nan_b():
    import numpy as np

    b = np.ones((32, 2), dtype=np.float32)
    b[0, 0] = np.nan
    return b


GGUF_CASES = {
    "alpha_nan": ({"alpha": float("nan")}, "adapter.lora.alpha"),
    "alpha_inf": ({"alpha": float("inf")}, "adapter.lora.alpha"),
    "alpha_negative": ({"alpha": -16.0}, "adapter.lora.alpha"),
    "alpha_string": ({"alpha": "16", "alpha_kind": "string"}, "adapter.lora.alpha"),
    "alpha_array": ({"alpha": [16.0, 1.0], "alpha_kind": "array"}, "adapter.lora.alpha"),
    "alpha_bool": ({"alpha": True, "alpha_kind": "bool"}, "adapter.lora.alpha"),
    "architecture_array": ({"arch_kind": "array"}, "general.architecture"),
    "zero_rank": ({"a": "zero", "b": "zero"}, "zero dimension"),
    "nan_factor": ({"b": "nan"}, "NaN or Inf"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_gguf_metadata_and_factors_are_checked(case, tmp_path: Path) -> None:

    kw, needle = GGUF_CASES[case]
    kw = dict(kw)
    zero = kw.get("a") == "zero"
    if zero:  # the writer cannot write an empty tensor: written with rank 2, then the rank set to 0 in the header
        kw.pop("a"), kw.pop("b")
    if kw.get("b") == "nan":
        kw["b"] = _nan_b()
    f = _gguf(tmp_path / "x.gguf", **kw)
    if zero:
        import struct

        data = bytearray(f.read_bytes())
        for name, dim in ((b"blk.0.attn_v.weight.lora_a", 1), (b"blk.0.attn_v.weight.lora_b", 0)):
            at = data.index(name) + len(name)
            assert struct.unpack_from("<I", data, at)[0] == 2  # n_dims, then the dims (innermost first)
            struct.pack_into("<Q", data, at + 4 + 8 * dim, 0)
        f.write_bytes(bytes(data))
    with pytest.raises(AdapteropsError, match=needle) as exc:
        convert_format(f, tmp_path / "back", to="peft", base=BASE)
    assert "x.gguf" in str(exc.value)
    assert not (tmp_path / "back").exists()


def test_a_valid_handmade_gguf_converts(tmp_path: Path) -> None:
    """The builder itself is sound: the same file with good metadata converts (alpha 16 over rank 2: scale 8)."""
    f = _gguf(tmp_path / "ok.gguf")
    r = convert_format(f, tmp_path / "back", to="peft", base=BASE)
    assert [row["scale"] for row in r.modules] == [8.0]


# ---- pickles: torchtune's adapter_model.pt is loaded only when allowed ----

def test_torchtune_pickle_needs_allow_pickle(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from adapterops.cli import cli

    src = tmp_path / "tt"
    convert_format(ADAPTERS / "llama-lora", src, to="torchtune", base=BASE)
    with pytest.raises(AdapteropsError, match="is a pickle file.*--allow-pickle"):
        convert_format(src, tmp_path / "back", to="peft", base=BASE)
    with pytest.raises(AdapteropsError, match="is a pickle file"):
        adapterops.inspect(src)
    for argv in (["convert", src, tmp_path / "back", "--to", "peft", "--base", BASE],
                 ["convert", src, tmp_path / "back", "--for", "vllm", "--base", BASE],
                 ["inspect", src]):
        res = CliRunner().invoke(cli, [str(a) for a in argv])
        assert res.exit_code == 2 and "adapter_model.pt: is a pickle file" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "back").exists()
    for argv in (["convert", src, tmp_path / "back", "--to", "peft", "--base", BASE, "--allow-pickle"],
                 ["inspect", src, "--allow-pickle"]):
        res = CliRunner().invoke(cli, [str(a) for a in argv])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "back" / "adapter_model.safetensors").is_file()
