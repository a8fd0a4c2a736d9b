"""The algebra commands on LoRA on parameters (PEFT's `target_parameters`: MoE experts as 3-D parameters): rescale,
analyze, rerank, stack (per expert, checked against PEFT's own merges) and unmerge.

Adapters are made by PEFT itself on tiny random Mixtral / Qwen2-MoE models (test_peft_coverage.py); every check
merges with adapterops, which is byte-identical to PEFT's merge for these adapters (tested there). Each numeric
test states its tolerance and why."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from helpers import raw_bytes, read_all, ulp

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


WEIGHTS = [0.7, -0.4]
PURE = {"target_modules": [], "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], "r": 3,
        "lora_alpha": 5, "rank_pattern": {"down_proj": 2}}  # no plain module: DARE's stream starts at the experts


def second_adapter(base: Path, config: dict, seed: int, out: Path) -> Path:
    """Another PEFT-made adapter on the same base (a new seed for its random weights)."""
    from test_peft_coverage import _randomize

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.get_peft_model(model, peft.LoraConfig(**config))
        _randomize(pm, seed)
        pm.save_pretrained(out)
    return out


def _pair(request, which: str, tmp_path_factory) -> tuple[Path, list[Path]]:
    base, adapter, _ = request.getfixturevalue(which)
    cfg = {"mix": MIXTRAL, "qwen": QWEN}[which]
    return base, [adapter, second_adapter(base, dict(cfg, r=cfg["r"] + 1), 11, tmp_path_factory.mktemp(which) / "b")]


@pytest.fixture(scope="module")
def mix_pair(request, tmp_path_factory):
    return _pair(request, "mix", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen_pair(request, tmp_path_factory):
    return _pair(request, "qwen", tmp_path_factory)


@pytest.fixture(scope="module")
def pure_pair(tmp_path_factory):
    base, adapter, _ = build(tmp_path_factory.mktemp("pure"), qwen2_moe, PURE)
    return base, [adapter, second_adapter(base, dict(PURE, r=4), 11, tmp_path_factory.mktemp("pure") / "b")]


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


# --- rerank -----------------------------------------------------------------------------------------------------

def test_rerank_truncates_each_expert_as_eckart_young(mix, tmp_path):
    """Merging the reranked adapter equals merging each expert's dense best rank-1 approximation (float32)."""
    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import param_layouts

    base, adapter, _ = mix
    res = adapterops.rerank(adapter, tmp_path / "r", rank=1)
    with open_adapter(adapter, params=True) as ad:
        layouts = param_layouts(ad)
    with open_adapter(tmp_path / "r", params=True) as ad2:
        new = param_layouts(ad2)
    for name, lay in layouts.items():
        assert res.modules[name]["new_rank"] == 1 and new[name].r == 1 and new[name].experts == lay.experts
        dense = _dense_experts(adapter, name, lay.scale, lay.experts).double()
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        want = (u[..., :1] * s[..., None, :1]) @ vh[..., :1, :]
        got = _dense_experts(tmp_path / "r", name, new[name].scale, lay.experts).double()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert same_bytes(merged(base, tmp_path / "r", tmp_path / "m"), read_all(base))  # the merge takes it
    peft_logits(base, tmp_path / "r")  # PEFT loads the repacked [r'·E, in] / [out, r'·E] factors


def test_rerank_pad_to_is_exact(qwen, tmp_path):
    """Each expert's factors are kept bit for bit with zeros after them, and every scale is the same float. The
    merge is byte-identical where PEFT's einsum reduces over the rank in the same order (gate_up_proj, r 3 → 6);
    for down_proj (r 2 → 6) the batched matmul's summation order depends on the rank's length, so zeros can move
    ΔW_e by an ulp of its own size: within 1 ulp of ΔW, not of W."""
    from safetensors.torch import load_file

    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import expert_slices, param_layouts

    base, adapter, _ = qwen
    res = adapterops.rerank(adapter, tmp_path / "p", pad_to=6)
    assert {v["new_rank"] for v in res.modules.values()} == {6}
    with open_adapter(adapter, params=True) as ad, open_adapter(tmp_path / "p", params=True) as ad2:
        old, new = param_layouts(ad), param_layouts(ad2, base)  # both ranks 6 now: only the base tells them apart
        t0, t1 = load_file(ad.tensors.path), load_file(ad2.tensors.path)
    for name, lay in old.items():
        assert new[name].scale == lay.scale and new[name].r == 6 and new[name].experts == lay.experts
        pm = lay.module
        for (b0, a0), (b1, a1) in zip(expert_slices(t0[pm.a_key], t0[pm.b_key], lay.experts),
                                      expert_slices(t1[pm.a_key], t1[pm.b_key], lay.experts)):
            assert torch.equal(a1[: lay.r], a0) and torch.equal(b1[:, : lay.r], b0)
            assert not a1[lay.r:].any() and not b1[:, lay.r:].any()
    m0, m1, w = merged(base, adapter, tmp_path / "m0"), merged(base, tmp_path / "p", tmp_path / "m1"), read_all(base)
    differ = same_bytes(m1, m0)
    assert all(".down_proj." in k for k in differ)
    for k in differ:
        torch.testing.assert_close(m1[k], m0[k], rtol=0, atol=float((m0[k] - w[k]).abs().max()) * 2.4e-7 + 6e-8)
    torch.testing.assert_close(peft_logits(base, tmp_path / "p"), peft_logits(base, adapter), rtol=1e-5, atol=1e-5)


# --- stack ------------------------------------------------------------------------------------------------------

def peft_merged(base: Path, adapter: Path, out: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge_and_unload() of one adapter into the float32 base, saved as transformers saves it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)
    return read_all(out)


def logits_of(model_dir: Path) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 9, 17, 33, 60]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        with torch.no_grad():
            return model.eval()(ids).logits


@pytest.mark.parametrize("which", ["mix_pair", "qwen_pair"])
def test_stack_cat_merges_as_the_weighted_sum_of_peft_merges(which, request, tmp_path):
    """cat of two MoE adapters (ranks r and r + 1, PEFT-made) against PEFT itself: W + Σ wᵢ·(W'ᵢ − W), W'ᵢ from
    PEFT's merge_and_unload() of each adapter into the float32 base, equals our merge of the stacked adapter within
    6 ulp of the tensor's largest |W|, |W'ᵢ| (measured: at most 2.9). Each of PEFT's merges and ours rounds once
    (½ ulp each); the rest is float32 rounding of the rank terms' sums (Σrᵢ terms in ours, rᵢ in PEFT's), which is
    relative to the size of the terms, so of the tensor, not of each element. PEFT loads the stacked adapter with
    every tensor as written, and its logits match the model holding W + Σ wᵢ·(W'ᵢ − W) to 1e-5 (PEFT adds the
    LoRA paths to the base's output instead of multiplying by merged weights: float32 sums in another order)."""
    from safetensors.torch import save_file

    base, pair = request.getfixturevalue(which)
    res = adapterops.stack(pair, tmp_path / "s", weights=WEIGHTS, method="cat")
    assert res.compat == "exact" and res.experts and all(e > 1 for n, e in res.experts.items() if "experts" in n)
    w0 = read_all(base)
    theirs = [peft_merged(base, a, tmp_path / f"p{i}") for i, a in enumerate(pair)]
    ours = merged(base, tmp_path / "s", tmp_path / "m")
    want = {}
    for k, w in w0.items():
        want[k] = w.double() + sum(wi * (t[k].double() - w.double()) for wi, t in zip(WEIGHTS, theirs))
        top = max(float(t[k].abs().max()) for t in (w0, *theirs))
        err = float((ours[k].double() - want[k]).abs().max())
        assert err <= 6 * float(ulp(torch.tensor(top), torch.float32)), (k, err)
    assert any(".experts." in k and not torch.equal(ours[k], w0[k]) for k in w0)
    # PEFT loads every tensor of the stacked adapter as written (ranks and keys as its config says) ...
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(model, tmp_path / "s").eval()
        loaded = peft.get_peft_model_state_dict(pm)
        with torch.no_grad():
            got = pm(torch.tensor([[1, 5, 9, 17, 33, 60]])).logits
    written = read_all(tmp_path / "s" / "adapter_model.safetensors")
    assert sorted(loaded) == sorted(written) and all(torch.equal(loaded[k], written[k]) for k in written)
    # ... and computes what the weighted sum of PEFT's merges computes
    import shutil

    shutil.copytree(base, tmp_path / "want")
    save_file({k: v.float().contiguous() for k, v in want.items()}, tmp_path / "want" / "model.safetensors", {"format": "pt"})
    torch.testing.assert_close(got, logits_of(tmp_path / "want"), rtol=1e-5, atol=1e-5)


def _expert_deltas(adapter: Path, base: Path | None = None) -> dict[str, torch.Tensor]:
    """Each parameter LoRA's dense ΔW_e = s·B_e·A_e, stacked [E, out, in], in float64 (tiny adapters only)."""
    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import expert_slices, param_layouts

    with open_adapter(adapter, params=True) as ad:
        out = {}
        for name, lay in param_layouts(ad, base).items():
            a, b = ad.read(lay.module.a_key).double(), ad.read(lay.module.b_key).double()
            out[name] = torch.stack([lay.scale * be @ ae for be, ae in expert_slices(a, b, lay.experts)])
        return out


def _ranks(adapter: Path) -> dict[str, int]:
    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import param_layouts

    with open_adapter(adapter, params=True) as ad:
        return {name: lay.r for name, lay in param_layouts(ad).items()}


def test_stack_svd_truncates_each_expert_as_eckart_young(qwen_pair, tmp_path):
    """svd --rank 2: each expert of the stacked adapter is the best rank-2 approximation of that expert's
    Σ wᵢ·ΔWᵢ. Singular values agree to 1e-4 relative and the dense ΔW to 1e-4 (float32 factors, QR-based SVD);
    beyond rank 2 nothing is left (1e-6 of σ₁)."""
    _, pair = qwen_pair
    res = adapterops.stack(pair, tmp_path / "s", weights=WEIGHTS, method="svd", rank=2)
    ins = [_expert_deltas(a) for a in pair]
    got = _expert_deltas(tmp_path / "s")
    assert sorted(got) == sorted(ins[0]) and set(got) <= set(res.experts)
    for name, stacked in got.items():
        assert res.ranks[name] == 2 and stacked.shape[0] == res.experts[name] == ins[0][name].shape[0] > 1
        want = sum(w * d[name] for w, d in zip(WEIGHTS, ins))
        for e in range(stacked.shape[0]):
            u, s, vh = torch.linalg.svd(want[e], full_matrices=False)
            sv = torch.linalg.svdvals(stacked[e])
            torch.testing.assert_close(sv[:2], s[:2], rtol=1e-4, atol=0)
            assert sv.numel() > 2 and float(sv[2:].max()) <= 1e-6 * float(s[0])
            torch.testing.assert_close(stacked[e], (u[:, :2] * s[:2]) @ vh[:2], rtol=1e-4, atol=1e-6 * float(s[0]))


@pytest.mark.parametrize("method", ["ties", "dare_linear"])
def test_exact_ties_and_dare_work_per_expert(method, pure_pair, tmp_path):
    """ties / dare_linear under --compat exact on MoE adapters: each expert is the method of core/combine.py applied
    to that expert's dense ΔWᵢ, truncated at the largest input rank. The truncation error is within 1% (plus 1e-6
    of ‖ΔW‖) of Eckart–Young's floor for that expert's combined ΔW (as for plain modules). TIES is checked on every
    expert of the first module; DARE on the first expert of the first module, whose masks come first in the seeded
    stream (these adapters have no plain module), and a second run with the seed writes the same bytes."""
    from adapterops.core import combine as cb

    _, pair = pure_pair
    kw = {"density": 0.5, "compat": "exact"} | ({"seed": 3} if method == "dare_linear" else {})
    res = adapterops.stack(pair, tmp_path / "s", weights=WEIGHTS, method=method, **kw)
    name = next(iter(res.experts))
    experts = res.experts[name]
    ins = [_expert_deltas(a)[name].float() for a in pair]
    got = _expert_deltas(tmp_path / "s")[name]
    assert got.shape[0] == experts > 1 and res.ranks[name] == max(_ranks(a)[name] for a in pair)
    for e in range(experts if method == "ties" else 1):
        g = torch.Generator().manual_seed(3) if method == "dare_linear" else None
        want = cb.exact_combine(method, [d[e].clone() for d in ins], WEIGHTS, 0.5, "total", g).double()
        sv = torch.linalg.svdvals(want)
        k = res.ranks[name]
        floor = float((sv[k:] ** 2).sum().sqrt())
        assert float(torch.linalg.norm(got[e] - want)) <= floor * 1.01 + 1e-6 * float(sv.norm()), (name, e)
    if method == "dare_linear":
        adapterops.stack(pair, tmp_path / "t", weights=WEIGHTS, method=method, **kw)
        assert same_bytes(read_all(tmp_path / "s"), read_all(tmp_path / "t")) == []


def test_compat_peft_refuses_moe_adapters_with_peft_reason(qwen_pair, tmp_path):
    from click.testing import CliRunner

    from adapterops.cli import cli

    _, pair = qwen_pair
    for args in (["--method", "ties", "--density", "0.5"], ["--method", "svd", "--compat", "peft"]):
        res = CliRunner().invoke(cli, ["stack", *map(str, pair), str(tmp_path / "o"), *args])
        assert res.exit_code == 2 and res.stderr.count("error:") == 1 and "Traceback" not in res.output, res.output
        assert "add_weighted_adapter does not support targeting nn.Parameter" in res.stderr and "--compat exact" in res.stderr
        assert "adapter_model.safetensors" in res.stderr and "module model.layers.0.mlp.experts" in res.stderr
        assert not (tmp_path / "o").exists()
    res = CliRunner().invoke(cli, ["stack", *map(str, pair), str(tmp_path / "o"), "--method", "ties", "--density", "0.5",
                                   "--base", str(qwen_pair[0])])
    assert res.exit_code == 2 and "--base applies only with --compat exact" in res.output


def test_inspect_and_analyze_describe_the_stacked_experts(qwen_pair, tmp_path):
    _, pair = qwen_pair
    res = adapterops.stack(pair, tmp_path / "s", method="cat")
    rows = {m["name"]: m for m in adapterops.inspect(tmp_path / "s").modules}
    rep = adapterops.analyze(tmp_path / "s")
    expert_rows = [m for m in rep.modules if m.kind == "expert"]
    assert len(expert_rows) == sum(res.experts.values()) == 8
    for name, experts in res.experts.items():
        row = rows[name]
        assert row["experts"] == experts and row["rank"] == res.ranks[name] and row["scale"] == 1.0
        assert row["rank x experts"] == experts * res.ranks[name] and len(row["parameters"]) == 1
        (param,) = row["parameters"]
        assert {m.expert for m in expert_rows if m.parameter == param} == set(range(experts))
        assert all(m.rank == res.ranks[name] for m in expert_rows if m.parameter == param)
    # cat: the ranks add up per expert (gate_up_proj 3 + 4, down_proj 2 + 2)
    assert sorted(res.ranks[n] for n in res.experts) == [4, 7]


def test_stack_with_the_base_and_the_refusals(mix_pair, qwen_pair, tmp_path):
    """--base settles the same modules (the routers' 2-D `weight` LoRAs too) and gives the same tensors; without it an
    ambiguous config is refused naming --base; adapters whose experts or targeted parameters differ are refused."""
    import shutil

    from safetensors.torch import load_file, save_file

    from adapterops.pipeline.params import expert_slices, pack_experts

    base, pair = mix_pair
    a = adapterops.stack(pair, tmp_path / "a", method="svd", rank=2)
    b = adapterops.stack(pair, tmp_path / "b", method="svd", rank=2, base=base)
    assert a.experts == b.experts and same_bytes(read_all(tmp_path / "a"), read_all(tmp_path / "b")) == []
    assert same_bytes(merged(base, tmp_path / "a", tmp_path / "ma"), merged(base, tmp_path / "b", tmp_path / "mb")) == []
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert not any("experts" in m or m.endswith(".gate") for m in cfg["target_modules"])  # parameters stay parameters
    assert cfg["target_parameters"] == json.loads((pair[0] / "adapter_config.json").read_text())["target_parameters"]

    qbase, (qa, qb) = qwen_pair
    shutil.copytree(qb, tmp_path / "amb")
    c = json.loads((qb / "adapter_config.json").read_text())
    (tmp_path / "amb" / "adapter_config.json").write_text(json.dumps(dict(c, rank_pattern={"down_proj": 5})))
    with pytest.raises(AdapteropsError, match=r"give the base \(--base"):
        adapterops.stack([qa, tmp_path / "amb"], tmp_path / "x")

    shutil.copytree(qb, tmp_path / "three")  # the first three experts only: same parameters, 3 experts instead of 4
    t = load_file(qb / "adapter_model.safetensors")
    for key in [k for k in t if ".experts." in k and k.endswith("lora_A.weight")]:
        bkey = key.replace("lora_A", "lora_B")
        t[bkey], t[key] = pack_experts(expert_slices(t[key], t[bkey], 4)[:3])
    save_file(t, tmp_path / "three" / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(AdapteropsError, match=r"module model\.layers\.0\.mlp\.experts.* has 3 experts .* but 4"):
        adapterops.stack([qa, tmp_path / "three"], tmp_path / "x")

    only_down = second_adapter(qbase, dict(QWEN, target_parameters=["mlp.experts.down_proj"], rank_pattern={}), 5,
                               tmp_path / "down")
    with pytest.raises(AdapteropsError, match=r"also select model\.layers\.0\.mlp\.experts\.gate_up_proj.*target the same"):
        adapterops.stack([qa, only_down], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_stacked_experts_never_read_as_a_linear_lora(qwen, tmp_path):
    """cat of r = 4, down_proj r = 1 with itself: q_proj and gate_up_proj get rank 8, down_proj 2 per expert, whose
    2·4 = 8 rows would equal a default r of 8, and `…experts` (down_proj's wrapper, looked up by module name) would
    also read as a Linear LoRA. The default rank avoids it, so the config alone settles 4 experts again. (PEFT's own
    input has that ambiguity, 1·4 rows = r: only the base settles it.)"""
    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import param_layouts

    base, _, _ = qwen
    a = second_adapter(base, dict(QWEN, r=4, rank_pattern={"down_proj": 1}), 5, tmp_path / "a")
    with pytest.raises(AdapteropsError, match="give the base"):
        adapterops.stack([a, a], tmp_path / "s", weights=[1, 0.5])
    res = adapterops.stack([a, a], tmp_path / "s", weights=[1, 0.5], base=base)
    assert res.ranks["model.layers.0.mlp.experts"] * 4 == res.ranks["model.layers.0.self_attn.q_proj"] == 8
    with open_adapter(tmp_path / "s", params=True) as ad:
        assert "model.layers.0.mlp.experts" not in ad.modules
        assert {n: lay.experts for n, lay in param_layouts(ad).items()} == res.experts
    cfg = json.loads((tmp_path / "s" / "adapter_config.json").read_text())
    assert cfg["r"] != 8 and cfg["lora_alpha"] == cfg["r"]
    torch.testing.assert_close(peft_logits(base, tmp_path / "s"), _logits_of_weighted(base, a, 1.5, tmp_path), rtol=1e-5, atol=1e-5)


def test_reranked_experts_never_read_as_a_linear_lora(qwen, tmp_path):
    """rerank --rank 4 of r = 4, down_proj r = 1 keeps q_proj and gate_up_proj at 4 and down_proj at 1 per expert,
    whose 1·4 rows would equal a default r of 4 (read by module name as a Linear LoRA): the default avoids it, so
    the written config alone settles 4 experts, and PEFT's logits are unchanged (the rerank keeps every
    singular value; float32 rounding of the refactorisation: 1e-5)."""
    from adapterops.io.adapter import open_adapter
    from adapterops.pipeline.params import param_layouts

    base, _, _ = qwen
    a = second_adapter(base, dict(QWEN, r=4, rank_pattern={"down_proj": 1}), 5, tmp_path / "a")
    adapterops.rerank(a, tmp_path / "r", rank=4, base=base)
    cfg = json.loads((tmp_path / "r" / "adapter_config.json").read_text())
    assert cfg["r"] != 4
    with open_adapter(tmp_path / "r", params=True) as ad:
        assert "model.layers.0.mlp.experts" not in ad.modules
        assert {lay.experts for lay in param_layouts(ad).values()} == {4}
    torch.testing.assert_close(peft_logits(base, tmp_path / "r"), peft_logits(base, a), rtol=1e-5, atol=1e-5)


def _logits_of_weighted(base: Path, adapter: Path, weight: float, tmp_path: Path) -> torch.Tensor:
    """Logits of PEFT's model with the adapter's ΔW times `weight` (rescale --strength, checked elsewhere)."""
    adapterops.rescale(adapter, tmp_path / "w", strength=weight, base=base)
    return peft_logits(base, tmp_path / "w")


@pytest.mark.parametrize("target_modules", ["(.*.*)*q", "all-linear"])
def test_a_target_modules_string_that_cannot_tell_needs_the_base(target_modules, mix, tmp_path):
    """Mixtral's router LoRA (and, by the short target names, every attention LoRA) could be a Linear LoRA or one
    on a parameter: target_modules decides. A config regex with nested repeats (minutes of backtracking on a
    module's name) is not run, and "all-linear" depends on the model: stack refuses, naming --base, and with the
    base it stacks. Run in a subprocess with a deadline, so that a regression fails instead of hanging the suite."""
    import shutil
    import subprocess
    import sys

    base, adapter, _ = mix
    shutil.copytree(adapter, tmp_path / "a")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(dict(cfg, target_modules=target_modules)))
    code = "import sys; from adapterops.cli import cli; sys.argv[0] = 'adapterops'; cli()"
    args = [sys.executable, "-c", code, "stack", str(tmp_path / "a"), str(tmp_path / "a"), str(tmp_path / "s"), "--json"]
    res = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and res.stderr.count("error:") == 1 and "give the base (--base" in res.stderr, res.stderr
    res = subprocess.run([*args, "--base", str(base)], capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout)
    assert got["experts"]["model.layers.0.mlp.gate"] == 1 and "model.layers.0.self_attn.q_proj" not in got["experts"]


def test_batch_stacks_moe_adapters_with_the_base_as_an_input(mix_pair, tmp_path):
    """A manifest's `base` for stack is an input (hashed into the provenance record), not a free option."""
    from click.testing import CliRunner

    from adapterops.batch.manifest import parse_manifest
    from adapterops.cli import cli

    base, pair = mix_pair
    manifest = tmp_path / "m.toml"
    manifest.write_text(f'''[[job]]
name = "moe"
op = "stack"
adapters = ["{pair[0]}", "{pair[1]}"]
base = "{base}"
output = "{tmp_path}/out/{{job}}"
method = "svd"
rank = 2
''')
    (task,) = parse_manifest(manifest)
    assert task.inputs["base"] == [str(base)] and "base" not in task.options
    res = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert res.exit_code == 0, res.output
    adapterops.stack(pair, tmp_path / "s", method="svd", rank=2, base=base)
    assert same_bytes(read_all(tmp_path / "out" / "moe"), read_all(tmp_path / "s")) == []
    record = json.loads((tmp_path / "out" / "moe" / ".adapterops-provenance.json").read_text())
    assert len(record["inputs"]["base"]) == 1 and len(record["inputs"]["base"][0]) == 64  # the base's sha256


# --- unmerge ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("which,dtype", [("mix", None), ("mix", "bfloat16"), ("qwen", None)])
def test_unmerge_returns_the_base_within_one_ulp(which, dtype, request, tmp_path):
    """merge → unmerge of a MoE adapter: the README's bound for one LoRA adapter, 1 ulp of max(|W|, |W'|) per
    element (the merge rounded ΔW and then W + ΔW; unmerge subtracts the same rounded ΔW in float32 and rounds
    once). Untouched tensors come back bit for bit."""
    base, adapter, _ = request.getfixturevalue(which)
    adapterops.merge(base, adapter, tmp_path / "m", dtype=dtype)
    res = adapterops.unmerge(tmp_path / "m", adapter, tmp_path / "u")
    m, u = read_all(tmp_path / "m"), read_all(tmp_path / "u")
    orig = {k: v.to(m[k].dtype) for k, v in read_all(base).items()}
    moved = [k for k in orig if not torch.equal(orig[k], m[k])]
    assert any(".experts." in k for k in moved) and res.modules_unmerged > 0
    for k, w in orig.items():
        if k not in moved:
            assert raw_bytes(u[k]) == raw_bytes(w), k
            continue
        err = (u[k].double() - w.double()).abs()
        assert bool((err <= ulp(torch.maximum(w.double().abs(), m[k].double().abs()), w.dtype)).all()), k


def test_unmerge_two_moe_adapters_within_the_n_adapter_bound(mix_pair, tmp_path):
    """Two adapters merged with weights: (n + 1)/2 = 1.5 ulp of the largest intermediate (README)."""
    base, pair = mix_pair
    adapterops.merge(base, pair, tmp_path / "m", weights=WEIGHTS, dtype="bfloat16")
    adapterops.merge(base, pair[:1], tmp_path / "m1", weights=WEIGHTS[:1], dtype="bfloat16")
    adapterops.unmerge(tmp_path / "m", pair, tmp_path / "u", weights=WEIGHTS)
    m, m1, u = read_all(tmp_path / "m"), read_all(tmp_path / "m1"), read_all(tmp_path / "u")
    worst = 0.0
    for k, w in read_all(base).items():
        o = w.to(torch.bfloat16).double()
        top = torch.maximum(torch.maximum(o.abs(), m[k].double().abs()), m1[k].double().abs())
        err = (u[k].double() - o).abs() / ulp(top, torch.bfloat16)
        assert bool((err <= 1.5).all()), k
        worst = max(worst, float(err.max()))
    assert worst > 0


def test_an_overflowing_moe_adapter_is_refused_in_one_line(qwen, tmp_path):
    """Factors that are finite but whose ΔW overflows float32: merge and unmerge name the adapter's scale and the
    tensor (no traceback) and leave nothing behind."""
    import shutil

    from safetensors.torch import load_file, save_file

    base, adapter, _ = qwen
    shutil.copytree(adapter, tmp_path / "big")
    t = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v * 1e30 if ".experts.lora_" in k else v for k, v in t.items()},
              tmp_path / "big" / "adapter_model.safetensors", {"format": "pt"})
    with pytest.raises(AdapteropsError, match=r"scale α/r = 5/2 = 2.5 makes ΔW overflow float32"):
        adapterops.merge(base, tmp_path / "big", tmp_path / "m")
    adapterops.merge(base, adapter, tmp_path / "m")
    with pytest.raises(AdapteropsError, match=r"adapter_config.json: tensor '.*experts\.0\.down_proj\.weight'.*overflow"):
        adapterops.unmerge(tmp_path / "m", tmp_path / "big", tmp_path / "u")
    assert not (tmp_path / "u").exists()
