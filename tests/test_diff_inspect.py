"""`adapterops diff` and `adapterops inspect`: what they report and the exit codes CI relies on."""

from __future__ import annotations

import json
import math

import torch
from click.testing import CliRunner
from helpers import (
    ADAPTERS,
    MODELS,
    adapter_with_tensors,
    copy_fixture,
    edit_json,
    read_all,
)

import adapterops
from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file
from adapterops.ops.diff import compare_tensors


def run(*args):
    """Invoke the CLI."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_diff_of_a_merge_against_peft_is_clean(out, tmp_path, peft_reference):
    """Tolerance: none (diff's default); PEFT's merge, computed live on this CPU (tests/references.py), saved as a file."""
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", out)
    import safetensors.torch

    safetensors.torch.save_file(peft_reference["llama-lora-bf16"][0], tmp_path / "peft.safetensors", {"format": "pt"})
    res = run("diff", out, tmp_path / "peft.safetensors", "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["ok"] and data["bit_identical"] == data["tensors"] == 20 and data["max_abs"] == 0


def test_diff_reports_values_keys_shapes_and_dtypes(tmp_path):
    a = read_all(MODELS / "llama-tied")
    b = dict(a)
    b["model.norm.weight"] = a["model.norm.weight"].float() + 1e-3  # dtype and values
    b["model.layers.0.mlp.up_proj.weight"] = a["model.layers.0.mlp.up_proj.weight"].clone()
    b["model.layers.0.mlp.up_proj.weight"][0, 0] += 0.25
    b["model.layers.1.mlp.up_proj.weight"] = a["model.layers.1.mlp.up_proj.weight"][:, :10].contiguous()  # shape
    b["extra"] = torch.zeros(2)
    del b["model.layers.1.input_layernorm.weight"]
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    res = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    assert d["only_in_a"] == ["model.layers.1.input_layernorm.weight"] and d["only_in_b"] == ["extra"]
    by_name = {x["name"]: x for x in d["differing"]}
    assert by_name["model.norm.weight"]["dtype"] == ["bfloat16", "float32"]
    assert by_name["model.layers.1.mlp.up_proj.weight"]["shape"][1] == [128, 10]
    up = by_name["model.layers.0.mlp.up_proj.weight"]
    assert up["mismatched"] == 1 and 0.2 < up["max_abs"] < 0.3
    assert d["bit_identical"] == d["tensors"] - 3
    # tolerances: the 0.25 change passes at atol 0.3; the norm's dtype still differs unless ignored
    loose = json.loads(run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--atol", "0.3", "--json").stdout)
    assert sorted(x["name"] for x in loose["differing"]) == ["model.layers.1.mlp.up_proj.weight", "model.norm.weight"]
    ignoring = json.loads(run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--atol", "0.3",
                              "--ignore-dtype", "--json").stdout)
    assert [x["name"] for x in ignoring["differing"]] == ["model.layers.1.mlp.up_proj.weight"]
    text = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    assert "only in A: model.layers.1.input_layernorm.weight" in text.stdout and "DIFFERENT" in text.stdout


def test_compare_tensors_tolerance_rule():
    a = torch.tensor([1.0, 2.0, float("nan"), float("inf"), 0.0])
    b = torch.tensor([1.0, 2.1, float("nan"), float("inf"), 1e-9])
    max_abs, max_rel, bad = compare_tensors(a, b, atol=0.0, rtol=0.0)
    assert bad == 2 and abs(max_abs - 0.1) < 1e-6 and abs(max_rel - 0.1 / 2.1) < 1e-6  # of max |b|: finite
    assert compare_tensors(a, b, atol=0.0, rtol=0.05)[2] == 1  # 0.1 ≤ 0.05·2.1; 1e-9 > 0.05·1e-9
    assert compare_tensors(a, b, atol=1e-8, rtol=0.05)[2] == 0
    assert compare_tensors(torch.tensor([float("nan")]), torch.tensor([1.0]), 1.0, 1.0)[2] == 1  # NaN only matches NaN


def test_diff_adapters_and_bad_input(tmp_path):
    changed = adapter_with_tensors(tmp_path, "llama-lora", lambda t: t.__setitem__(next(iter(t)), next(iter(t.values())) * 2))
    assert run("diff", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora").exit_code == 0
    assert run("diff", ADAPTERS / "llama-lora", changed).exit_code == 1
    missing = run("diff", ADAPTERS / "llama-lora", tmp_path / "nope")
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ") and "nope" in missing.stderr


def test_inspect_adapters():
    res = run("inspect", ADAPTERS / "llama-rslora-patterns", "--json")
    assert res.exit_code == 0, res.output
    d = json.loads(res.stdout)
    assert d["kind"] == "adapter" and d["summary"]["variant"] == "LoRA + rsLoRA"
    assert d["summary"]["ranks"] == {"2": 1, "4": 3, "8": 2} and d["summary"]["modules"] == len(d["modules"]) == 6
    assert {round(m["scale"], 6) for m in d["modules"]} == set(d["summary"]["scales"])
    dora = json.loads(run("inspect", ADAPTERS / "llama-dora", "--json").stdout)
    assert dora["summary"]["variant"] == "DoRA" and all(m["dora"] for m in dora["modules"])
    assert dora["summary"]["replaced_tensors"]  # the embedding's saved base layer


def test_inspect_warns_and_exits_1(tmp_path):
    def spoil(t):
        key = next(k for k in t if k.endswith("lora_B.weight"))
        t[key] = torch.zeros_like(t[key])
        a_key = next(k for k in t if k.endswith("lora_A.weight"))
        t[a_key] = t[a_key].clone()
        t[a_key].view(-1)[0] = float("inf")

    ad = adapter_with_tensors(tmp_path, "llama-lora", spoil)
    edit_json(ad / "adapter_config.json", rank_pattern={"nothing_here": 4})
    res = run("inspect", ad)
    assert res.exit_code == 1
    assert "holds NaN or Inf" in res.stdout and "all-zero lora_B" in res.stdout and "'nothing_here' matches no module" in res.stdout


def test_inspect_checkpoints(tmp_path):
    from adapterops.ops.quantize import quantize

    plain = json.loads(run("inspect", MODELS / "llama-untied", "--json").stdout)
    assert plain["kind"] == "checkpoint" and plain["summary"]["sharded"] and len(plain["summary"]["files"]) == 2
    assert plain["summary"]["parameters"] == sum(t.numel() for t in read_all(MODELS / "llama-untied").values())
    quantize(MODELS / "llama-tied", tmp_path / "q", blocksize=128)
    q = json.loads(run("inspect", tmp_path / "q", "--json").stdout)
    assert q["kind"] == "nf4-checkpoint" and q["summary"]["nf4"]["blocksizes"] == [128] and q["summary"]["nf4"]["double_quant"] == [True]
    assert q["summary"]["dtypes"]["nf4"] == 14
    assert q["summary"]["parameters"] == sum(t.numel() for t in read_all(MODELS / "llama-tied").values())  # unpacked counts
    broken = copy_fixture("model", "llama-tied", tmp_path)
    tensors = read_all(broken)
    tensors["model.norm.weight"][3] = float("nan")
    save_file(tensors, broken / "model.safetensors", {"format": "pt"})
    assert run("inspect", broken).exit_code == 0  # headers only
    scanned = run("inspect", broken, "--scan")
    assert scanned.exit_code == 1 and "model.norm.weight holds NaN or Inf" in scanned.stdout


def test_compare_tensors_blocks_match_the_elementwise_rule_and_rel_stays_finite():
    """Several blocks, bf16 and float32: the counts are those of the element-wise rule in float64, and the relative
    difference is max |a − b| / max |b|, finite although B holds zeros."""
    from adapterops.ops import diff as diff_mod

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.bfloat16, torch.float32):
        b = torch.randn(3 * diff_mod.BLOCK + 17, generator=g).to(dtype)
        b[::7] = 0
        a = (b.float() + 1e-2 * torch.randn(b.shape, generator=g)).to(dtype)
        x, y = a.double(), b.double()
        for atol, rtol in ((0.0, 0.0), (1e-3, 1e-2), (0.0, 0.5)):
            max_abs, rel, bad = compare_tensors(a, b, atol, rtol)
            assert bad == int(((x - y).abs() > atol + rtol * y.abs()).sum())
            assert abs(max_abs - float((x - y).abs().max())) <= 1e-6 * max_abs
            assert abs(rel - max_abs / float(y.abs().max())) <= 1e-12 and math.isfinite(rel)
    assert compare_tensors(torch.ones(5), torch.zeros(5), 0.0, 0.0) == (1.0, 1.0, 5)


def test_compare_fast_paths_identical_one_element_nan_zeros():
    """The per-block paths (equal bytes skip the float work; blocks go to worker threads) give the figures of the
    element-wise rule. Tolerance: none — every value is a bf16 number whose differences here are exact in float32,
    and the figures are maxima and integer counts, so inline and threaded runs must agree exactly."""
    from concurrent.futures import ThreadPoolExecutor

    from adapterops.ops import diff as diff_mod

    n = 2 * diff_mod.CHUNK + 5  # three tasks, the last one a few elements long
    g = torch.Generator().manual_seed(1)
    b = torch.randn(n, generator=g).to(torch.bfloat16)
    mag = float(b.float().abs().max())
    with ThreadPoolExecutor(2) as pool:
        for p in (None, pool):
            same, max_abs, rel, bad = diff_mod._compare(b.clone(), b, 0.0, 0.0, p)
            assert same and (max_abs, rel, bad) == (0.0, 0.0, 0)
            a = b.clone()
            a[-1] = b[-1].float() + 2.0  # in the last, short block only
            want = abs(float(a[-1]) - float(b[-1]))
            assert diff_mod._compare(a, b, 0.0, 0.0, p) == (False, want, want / mag, 1)
            assert diff_mod._compare(a, b, 2.5, 0.0, p) == (False, want, want / mag, 0)
            a[7] = float("nan")  # NaN on one side: an infinite difference, counted; max |b| stays B's finite max
            assert diff_mod._compare(a, b, 0.0, 0.0, p) == (False, math.inf, math.inf, 2)
            both = b.clone()
            both[7] = float("nan")
            a2 = both.clone()
            a2[-1] = a[-1]  # NaN at the same place on both sides matches; the other difference is still reported
            assert diff_mod._compare(a2, both, 0.0, 0.0, p) == (False, want, want / mag, 1)
            zeros = torch.zeros(n, dtype=torch.bfloat16)
            assert diff_mod._compare(-zeros, zeros, 0.0, 0.0, p) == (False, 0.0, 0.0, 0)  # −0 = +0, bytes differ
            one = zeros.clone()
            one[diff_mod.CHUNK] = -3.0
            assert diff_mod._compare(one, zeros, 0.0, 0.0, p) == (False, 3.0, 1.0, 1)  # B all zeros: relative 1
            assert diff_mod._compare(zeros, one, 0.0, 0.0, p) == (False, 3.0, 1.0, 1)  # of max |b| = 3


def test_same_bytes_any_length_and_offset():
    """The byte comparison goes 8, 4, 2 or 1 bytes at a time as length and offsets allow; every width finds a
    difference in the last byte and passes equal data."""
    from adapterops.ops.diff import _same_bytes

    base = torch.arange(64, dtype=torch.uint8)
    for begin, length in ((0, 64), (4, 60), (2, 62), (1, 63), (0, 63)):
        x = base[begin:begin + length]
        y = x.clone()
        assert _same_bytes(x, y)
        y[-1] += 1
        assert not _same_bytes(x, y)
    bf = torch.randn(1001).to(torch.bfloat16)
    assert _same_bytes(bf[1:], bf.clone()[1:]) and not _same_bytes(bf[1:], bf[:-1])


def test_diff_reports_identical_one_element_nan_and_zero_tensors(tmp_path):
    """Through diff() and its JSON: bit-identical tensors are counted, a one-element change and a −0/+0 swap are
    told apart, NaN against a number is an infinite difference written as null, and the others stay finite.
    Tolerance: none (exact bf16 values, see above)."""
    from adapterops.ops import diff as diff_mod

    n = diff_mod.CHUNK + 3
    g = torch.Generator().manual_seed(2)
    w = torch.randn(n, generator=g).to(torch.bfloat16)
    a = {"same": w, "one": w.clone(), "nan": w.clone(), "signed_zero": -torch.zeros(4, dtype=torch.bfloat16),
         "zeros": torch.zeros(8, dtype=torch.bfloat16)}
    a["one"][n // 2] = 8.0
    a["nan"][0] = float("nan")
    b = {"same": w, "one": w, "nan": w, "signed_zero": torch.zeros(4, dtype=torch.bfloat16),
         "zeros": torch.zeros(8, dtype=torch.bfloat16)}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    res = run("diff", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "--json")
    assert res.exit_code == 1
    d = json.loads(res.stdout)
    assert d["bit_identical"] == 2 and d["tensors"] == 5  # same, zeros
    by_name = {x["name"]: x for x in d["differing"]}
    assert sorted(by_name) == ["nan", "one"]  # −0 against +0 is equal in value: within the (zero) tolerance
    want = 8.0 - float(w[n // 2])
    assert by_name["one"]["mismatched"] == 1 and by_name["one"]["max_abs"] == want
    assert by_name["one"]["max_rel"] == want / float(w.float().abs().max())
    assert by_name["nan"]["mismatched"] == 1 and by_name["nan"]["max_abs"] is None and by_name["nan"]["max_rel"] is None
    assert d["max_abs"] is None  # the largest difference over tensors is the infinite one
