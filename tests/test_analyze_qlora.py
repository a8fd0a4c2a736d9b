"""analyze against a QLoRA base: ‖W₁₆ − deq(W₄)‖ and what `merge --requantize` loses, relative to ‖ΔW‖.

The figures are checked against what the other commands write: `dequantize` gives deq(W₄), `merge --requantize`
gives Q(deq(W₄) + ΔW). Tolerances: the quantization error to 1e-4 relative (reports round to 6 significant
digits, ΔW comes from the factors' SVD instead of B·A: float32 rounding); the requantization error to 3% relative,
because `merge --requantize` adds ΔW to the weight dequantized in its stored dtype while analyze adds it to the
float32 dequantization (inputs within a bf16 ulp of each other, so a few codes land in other bins).
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from click.testing import CliRunner

from adapterops.cli import cli
from adapterops.core.lora import delta_weight
from adapterops.io.adapter import open_adapter
from helpers import ADAPTERS, MODELS, read_all

BASE = MODELS / "llama-tied"
ADAPTER = ADAPTERS / "llama-lora"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    root = tmp_path_factory.mktemp("qlora")
    for argv in (["quantize", BASE, root / "q"], ["dequantize", root / "q", root / "dq", "--dtype", "float32"],
                 ["merge", root / "q", ADAPTER, root / "rq", "--requantize"],
                 ["dequantize", root / "rq", root / "drq", "--dtype", "float32"]):
        res = run(*argv, "-q")
        assert res.exit_code == 0, res.output
    return root


def deltas() -> dict[str, torch.Tensor]:
    with open_adapter(ADAPTER) as ad:
        return {f"{n}.weight": delta_weight(m.kind, ad.read(m.a_key).float(), ad.read(m.b_key).float(), m.scale)
                for n, m in ad.modules.items()}


def test_quantization_and_requantization_errors_match_the_other_commands(quantized):
    res = run("analyze", ADAPTER, "--base", BASE, "--quantized-base", quantized / "q", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    w16, w4, requant = read_all(BASE), read_all(quantized / "dq"), read_all(quantized / "drq")
    d = deltas()
    assert report["qlora"]["modules_measured"] == len(d) == 14
    for m in report["modules"]:
        name = m["name"] + ".weight"
        norm = float(d[name].norm())
        want_q = float((w16[name].float() - w4[name]).norm()) / norm
        assert m["quantization_error"] == pytest.approx(want_q, rel=1e-4)
        x = w4[name] + d[name]
        want_r = float((requant[name] - x).norm()) / norm
        assert m["requantization_error"] == pytest.approx(want_r, rel=0.03)
        assert 0 < m["requantization_error"] < 1
    assert report["qlora"]["advice"] and "requantize" in report["qlora"]["advice"][-1]
    assert report["by_layer"]["0"]["quantization_error_mean"] is not None


def test_an_nf4_base_alone_gives_the_requantization_figures(quantized):
    res = run("analyze", ADAPTER, "--base", quantized / "q", "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["qlora"]["quantization_error"] is None  # the 16-bit original was not given
    assert all(m["requantization_error"] > 0 and m["quantization_error"] is None for m in report["modules"])
    text = run("analyze", ADAPTER, "--base", quantized / "q").stdout
    assert "advice: merge --requantize would add an error of" in text and "requant" in text


def test_json_follows_the_schema(quantized):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(resources.files("adapterops").joinpath("schemas/analyze-1.schema.json").read_text())
    res = run("analyze", ADAPTER, "--base", BASE, "--quantized-base", quantized / "q", "--json")
    jsonschema.validate(json.loads(res.stdout), schema)


def test_bad_combinations(quantized, tmp_path):
    alone = run("analyze", ADAPTER, "--quantized-base", quantized / "q")
    assert alone.exit_code == 2 and "--quantized-base" in alone.stderr and "only with --base" in alone.stderr
    plain = run("analyze", ADAPTER, "--base", BASE, "--quantized-base", BASE)
    assert plain.exit_code == 2 and plain.stderr.startswith("error: ") and "not an NF4 checkpoint" in plain.stderr
    swapped = run("analyze", ADAPTER, "--base", quantized / "q", "--quantized-base", quantized / "q")
    assert swapped.exit_code == 2 and "16-bit original" in swapped.stderr
