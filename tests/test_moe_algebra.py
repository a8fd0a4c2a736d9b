"""The algebra commands on LoRA on parameters (PEFT's `target_parameters`: MoE experts as 3-D parameters).

Adapters are made by PEFT itself on tiny random Mixtral / Qwen2-MoE models (test_peft_coverage.py); every check
merges with adapterops, which is byte-identical to PEFT's merge for these adapters (tested there)."""

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

from test_peft_coverage import build, mixtral, qwen2_moe  # noqa: E402

QWEN = {"target_modules": ["q_proj"], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        "r": 3, "lora_alpha": 5, "rank_pattern": {"down_proj": 2}}
MIXTRAL = {"target_modules": "all-linear", "r": 2, "lora_alpha": 3}


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return build(tmp_path_factory.mktemp("qwen"), qwen2_moe, QWEN)


@pytest.fixture(scope="module")
def mix(tmp_path_factory):
    return build(tmp_path_factory.mktemp("mix"), mixtral, MIXTRAL)


def merged(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    adapterops.merge(base, adapter, out)
    return read_all(out)


def same_bytes(x: dict, y: dict) -> list[str]:
    assert sorted(x) == sorted(y)
    return [k for k in x if raw_bytes(x[k]) != raw_bytes(y[k])]


def peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        with torch.no_grad():
            return peft.PeftModel.from_pretrained(model, adapter).eval()(ids).logits


# --- rescale ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["mix", "qwen", "qwen+base"])
@pytest.mark.parametrize("args", [{"to": "rslora"}, {"to": "standard"}], ids=["rslora", "standard"])
def test_rescale_keeps_the_merge_bit_for_bit(which, args, request, tmp_path):
    """gate_up_proj and down_proj have different ranks in both (PEFT doubles Mixtral's fused gate_up_proj rank by
    itself); the config settles which parameter each wrapper adapts (rows = r·E, one E per owner), or the base."""
    base, adapter, _ = request.getfixturevalue(which.split("+")[0])
    kw = {"base": base} if which.endswith("+base") else {}
    res = adapterops.rescale(adapter, tmp_path / "r", **args, **kw)
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["use_rslora"] == (args["to"] == "rslora") and res.modules >= 2
    if args["to"] == "rslora":
        assert any("experts" in k for k in cfg["alpha_pattern"])  # keyed by the parameter's path
    want = merged(base, adapter, tmp_path / "m0")
    assert same_bytes(merged(base, tmp_path / "r", tmp_path / "m1"), want) == []


def test_rescale_bake_and_strength_merge_within_an_ulp(mix, tmp_path):
    """Baking computes (s·B)·A instead of (B·A)·s: float32 rounding differs in the last bits, never more."""
    base, adapter, _ = mix
    adapterops.rescale(adapter, tmp_path / "b", bake=True)
    orig, base_t = merged(base, adapter, tmp_path / "m0"), read_all(base)
    got = merged(base, tmp_path / "b", tmp_path / "m1")
    for k in orig:
        torch.testing.assert_close(got[k], orig[k], rtol=2e-7, atol=2e-7)
    adapterops.rescale(adapter, tmp_path / "h", strength=0.5)
    half = merged(base, tmp_path / "h", tmp_path / "m2")
    moved = [k for k in orig if ".experts." in k and not torch.equal(orig[k], base_t[k])]
    assert moved
    for k in moved:
        torch.testing.assert_close(half[k] - base_t[k], 0.5 * (orig[k] - base_t[k]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("args", [{"to": "rslora"}, {"bake": True}], ids=["rslora", "bake"])
def test_peft_loads_the_rescaled_moe_adapter(qwen, args, tmp_path):
    base, adapter, _ = qwen
    adapterops.rescale(adapter, tmp_path / "r", base=base, **args)
    torch.testing.assert_close(peft_logits(base, tmp_path / "r"), peft_logits(base, adapter), rtol=1e-5, atol=1e-5)


def test_without_the_base_a_config_that_fits_no_parameter_is_refused(qwen, tmp_path):
    import shutil

    _, adapter, _ = qwen
    shutil.copytree(adapter, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, rank_pattern={"down_proj": 5})))
    adapter = tmp_path / "a"
    with pytest.raises(AdapteropsError, match=r"by the config's ranks .*give the base \(--base"):
        adapterops.rescale(adapter, tmp_path / "r", to="rslora")


# --- analyze ----------------------------------------------------------------------------------------------------

def _dense_experts(adapter: Path, module: str, scale: float, experts: int, swapped: bool = True) -> torch.Tensor:
    """PEFT's whole-stack ΔW [E, d1, d2] of one parameter module (core/experts.py, PEFT's einsum)."""
    from adapterops.core.experts import param_delta

    from safetensors.torch import load_file

    t = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    return param_delta(t[f"{key}.lora_A.weight"], t[f"{key}.lora_B.weight"], scale, experts, swapped)


@pytest.mark.parametrize("which", ["mix", "qwen"])
def test_analyze_reports_each_expert_spectrum(which, request):
    import jsonschema
    from importlib import resources

    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import param_layouts

    base, adapter, _ = request.getfixturevalue(which)
    rep = adapterops.analyze(adapter)
    experts = [m for m in rep.modules if m.kind == "expert"]
    with open_adapter(adapter, params=True) as ad:
        layouts = param_layouts(ad)
    assert len(experts) == sum(lay.experts for lay in layouts.values()) > 0
    for lay in layouts.values():
        (param,) = lay.params
        dense = _dense_experts(adapter, lay.module.name, lay.scale, lay.experts)
        for e in range(lay.experts):
            row = next(m for m in experts if m.name == f"{param}[{e}]")
            assert row.parameter == param and row.expert == e and row.type == param.rsplit(".", 1)[1] and row.rank == lay.r
            want = torch.linalg.svdvals(dense[e].double())[: lay.r]
            torch.testing.assert_close(torch.tensor(row.singular_values, dtype=torch.float64), want, rtol=1e-4, atol=1e-7)
    assert any("one row per expert" in n for n in rep.notes)
    schema = json.loads(resources.files("adapterops").joinpath("schemas/analyze-1.schema.json").read_text())
    jsonschema.validate(json.loads(json.dumps(rep.to_dict())), schema)
    with_base = adapterops.analyze(adapter, base=base)  # the base settles the same rows, and tells a router's 2-D
    got = {m.name for m in with_base.modules if m.kind == "expert"}  # `weight` (rows = r, E = 1) from a Linear LoRA
    assert {m.name for m in experts} <= got and len(with_base.modules) == len(rep.modules)
