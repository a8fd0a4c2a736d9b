"""`stack --method ties|dare_*|magnitude_prune*|linear|svd|cat`: PEFT 0.21.2's bytes under --compat peft, the
method on the true ΔWᵢ under --compat exact, option checks, batch manifests, and the sign-conflict share of analyze.

The interop test runs real PEFT (`add_weighted_adapter` after `torch.manual_seed`) on a tiny Llama with three
r=4 adapters whose lora_B are random, and requires identical tensors (torch.equal and the same bytes).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, raw_bytes, read_file

import adapterops
from adapterops.cli import cli
from adapterops.core import combine as cb
from adapterops.io.adapter import open_adapter

METHODS = ["linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
           "magnitude_prune", "magnitude_prune_svd"]
WEIGHTS = [1.0, -0.7, 0.4]
SEED = 1234
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]


def _kwargs(method: str) -> dict:
    kw = {}
    if method in cb.DENSITY_METHODS:
        kw["density"] = 0.5
    if method in cb.SIGN_METHODS and method.startswith("ties"):
        kw["majority_sign_method"] = "frequency"
    return kw


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama, three PEFT adapters (random B) and PEFT's add_weighted_adapter output for every method."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    root = tmp_path_factory.mktemp("stackmethods")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(root / "base")
    adapters = []
    for i in range(3):
        torch.manual_seed(10 + i)
        base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8 + 4 * i, target_modules=TARGETS))
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_B" in name or "lora_embedding_B" in name:
                    p.copy_(torch.randn_like(p) * 0.1)
                if "lora_embedding_A" in name:
                    p.copy_(torch.randn_like(p))
        pm.save_pretrained(root / f"a{i}", save_embedding_layers=False)
        adapters.append(root / f"a{i}")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    pm = peft.PeftModel.from_pretrained(base, adapters[0], adapter_name="a0")
    for i in (1, 2):
        pm.load_adapter(adapters[i], adapter_name=f"a{i}")
    for method in METHODS:
        torch.manual_seed(SEED)
        pm.add_weighted_adapter(["a0", "a1", "a2"], WEIGHTS, method, combination_type=method, **_kwargs(method))
    pm.save_pretrained(root / "peft", selected_adapters=METHODS, save_embedding_layers=False)
    return root, adapters


def _ours(tiny, method, tmp_path, **extra):
    _root, adapters = tiny
    kw = _kwargs(method)
    args = {"density": kw.get("density"), "majority_sign": kw.get("majority_sign_method", "total"),
                "seed": SEED if method.startswith("dare") else None}
    args.update(extra)
    res = adapterops.stack(adapters, tmp_path / method, weights=WEIGHTS, method=method, compat="peft", **args)
    return res, read_file(tmp_path / method / "adapter_model.safetensors")


@pytest.mark.parametrize("method", METHODS)
def test_compat_peft_gives_peft_bytes(tiny, method, tmp_path):
    root, _ = tiny
    res, got = _ours(tiny, method, tmp_path)
    want = read_file(root / "peft" / method / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, k
        assert raw_bytes(got[k]) == raw_bytes(want[k]), (method, k, float((got[k] - want[k]).abs().max()))
    peft_cfg = json.loads((root / "peft" / method / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / method / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern"):
        assert cfg[key] == peft_cfg[key], key
    assert not [w for w in res.warnings if "order" in w]  # the base model's config gave PEFT's exact module order


def test_dare_other_seed_differs(tiny, tmp_path):
    _, a = _ours(tiny, "dare_ties", tmp_path)
    _, b = _ours(tiny, "dare_ties", tmp_path / "x", seed=SEED + 1)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_name_order_matches_named_modules(tiny):
    transformers = pytest.importorskip("transformers")
    root, adapters = tiny
    from adapterops.ops.stack import _order_key

    names = list(open_adapter(adapters[0]).modules)
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    order = [n for n, _ in model.named_modules() if n in names]
    assert sorted(names, key=_order_key) == order


def _true_deltas(adapters):
    out = []
    for p in adapters:
        ad = open_adapter(p)
        out.append({n: (ad.read(m.b_key).float() @ ad.read(m.a_key).float()) * m.scale for n, m in ad.modules.items()})
    return out


def _stacked_delta(path):
    ad = open_adapter(path)
    return {n: (ad.read(m.b_key).double() @ ad.read(m.a_key).double()) * m.scale for n, m in ad.modules.items()}


def test_exact_ties_is_ties_of_true_deltas_truncated(tiny, tmp_path):
    _, adapters = tiny
    res = adapterops.stack(adapters, tmp_path / "t", weights=WEIGHTS, method="ties", compat="exact", density=0.5, rank=12)
    got = _stacked_delta(tmp_path / "t")
    for name in got:
        deltas = [d[name].clone() for d in _true_deltas(adapters)]
        want = cb.peft_combine("ties", deltas, torch.tensor(WEIGHTS), 0.5, "total").double()
        sv = torch.linalg.svdvals(want)
        k = res.ranks[name]
        floor = float((sv[k:] ** 2).sum().sqrt())
        err = float(torch.linalg.norm(got[name] - want))
        assert err <= floor * 1.01 + 1e-6 * float(sv.norm()), name  # near Eckart–Young's floor
        assert abs(res.energy[name] - float((sv[:k] ** 2).sum() / (sv**2).sum())) < 1e-3


def test_exact_linear_is_the_weighted_sum_and_ignores_peft_bugs(tiny, tmp_path):
    _, adapters = tiny
    adapterops.stack(adapters, tmp_path / "l", weights=WEIGHTS, method="linear", compat="exact", rank=12)
    got = _stacked_delta(tmp_path / "l")
    deltas = _true_deltas(adapters)
    for name in got:
        want = sum(w * d[name].double() for w, d in zip(WEIGHTS, deltas))
        torch.testing.assert_close(got[name], want, rtol=1e-4, atol=1e-5)


def test_exact_energy_and_dare_masks_are_peft_svd_masks(tiny, tmp_path):
    """Exact dare_linear with density 1 equals the weighted sum; with a seed its masks are those of PEFT's svd form."""
    _, adapters = tiny
    res = adapterops.stack(adapters, tmp_path / "e", weights=WEIGHTS, method="ties", compat="exact", density=0.7, energy=0.9)
    assert res.min_energy >= 0.9 and all(0.9 <= e <= 1 + 1e-6 for e in res.energy.values())
    a = adapterops.stack(adapters, tmp_path / "d1", weights=WEIGHTS, method="dare_linear_svd", compat="exact", density=0.5, seed=SEED, rank=12)
    p = adapterops.stack(adapters, tmp_path / "d2", weights=WEIGHTS, method="dare_linear_svd", compat="peft", density=0.5, seed=SEED, rank=12)
    ga, gp = _stacked_delta(tmp_path / "d1"), _stacked_delta(tmp_path / "d2")
    for name in ga:
        if "embed" not in name:
            torch.testing.assert_close(ga[name], gp[name], rtol=1e-4, atol=1e-5)
    assert a.compat == "exact" and p.compat == "peft"


def test_rslora_inheritance_is_reproduced_and_warned(tmp_path):
    pair = [ADAPTERS / "llama-rslora-patterns", ADAPTERS / "llama-rslora-patterns"]
    res = adapterops.stack(pair, tmp_path / "s", method="svd", compat="peft")
    assert json.loads((tmp_path / "s" / "adapter_config.json").read_text())["use_rslora"] is True
    assert any("peft#3761" in w for w in res.warnings)
    res = adapterops.stack(pair, tmp_path / "x", method="svd", compat="exact")
    assert json.loads((tmp_path / "x" / "adapter_config.json").read_text())["use_rslora"] is False


def test_peft_refusals():
    pair = [ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns"]
    with pytest.raises(adapterops.AdapteropsError, match="same r value|peft#3737"):
        adapterops.stack(pair, "/tmp/never-written-x", method="ties", density=0.5)
    with pytest.raises(adapterops.AdapteropsError, match="lora_bias"):
        adapterops.stack([ADAPTERS / "llama-lora-bias"] * 2, "/tmp/never-written-x", method="ties", density=0.5, compat="exact")
    with pytest.raises(adapterops.AdapteropsError, match="needs a density"):
        adapterops.stack(pair, "/tmp/never-written-x", method="ties")


@pytest.mark.parametrize("args, message", [
    (["--method", "cat", "--density", "0.5"], "--density applies only"),
    (["--method", "svd", "--seed", "1"], "--seed applies only"),
    (["--method", "linear", "--majority-sign", "frequency"], "--majority-sign applies only"),
    (["--method", "ties", "--density", "0.5", "--energy", "0.9"], "--energy applies only"),
    (["--method", "ties", "--density", "0.5", "--rank", "4"], "--rank applies only"),
    (["--method", "cat", "--rank", "4"], "--rank applies only"),
    (["--method", "ties"], "needs --density"),
])
def test_cli_usage_errors(args, message, tmp_path):
    res = CliRunner().invoke(cli, ["stack", str(ADAPTERS / "llama-lora"), str(ADAPTERS / "llama-lora"), str(tmp_path / "o"), *args])
    assert res.exit_code == 2 and message in res.output, res.output


def test_cli_every_method(tiny, tmp_path):
    _, adapters = tiny
    for method in METHODS:
        extra = ["--density", "0.5"] if method in cb.DENSITY_METHODS else []
        extra += ["--seed", "3"] if method.startswith("dare") else []
        for compat in ("peft", "exact"):
            out = tmp_path / f"{method}-{compat}"
            res = CliRunner().invoke(cli, ["stack", *map(str, adapters), str(out), "--weights", "1,-0.7,0.4", "--method", method,
                                           "--compat", compat, "--json", *extra])
            assert res.exit_code == 0, res.output
            data = json.loads(res.stdout)
            assert data["method"] == method and data["compat"] == compat
            open_adapter(out)  # readable


def test_batch_manifest_takes_the_new_options(tiny, tmp_path):
    from adapterops.batch.manifest import parse_manifest

    root, _ = tiny
    manifest = tmp_path / "m.toml"
    manifest.write_text(f"""[[job]]
name = "dare"
op = "stack"
adapters = ["{root}/a0", "{root}/a1", "{root}/a2"]
weights = [1.0, -0.7, 0.4]
output = "{tmp_path}/out/{{job}}"
method = "dare_ties"
density = 0.5
seed = {SEED}
majority_sign = "frequency"
compat = "peft"
""")
    (task,) = parse_manifest(manifest)
    assert task.options["seed"] == SEED and task.options["method"] == "dare_ties"
    res = CliRunner().invoke(cli, ["batch", str(manifest)])
    assert res.exit_code == 0, res.output
    adapterops.stack([root / f"a{i}" for i in range(3)], tmp_path / "d", weights=WEIGHTS, method="dare_ties", density=0.5,
                     seed=SEED, majority_sign="frequency")
    a, b = read_file(tmp_path / "out" / "dare" / "adapter_model.safetensors"), read_file(tmp_path / "d" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    bad = manifest.read_text().replace('method = "dare_ties"', 'method = "nope"')
    manifest.write_text(bad)
    with pytest.raises(adapterops.AdapteropsError, match="method"):
        parse_manifest(manifest)


def test_sign_conflict_share():
    d1 = torch.tensor([[1.0, -2.0, 0.0], [3.0, 4.0, -1.0]])
    d2 = torch.tensor([[2.0, 1.0, 5.0], [-1.0, 0.0, -2.0]])
    share, n = cb.sign_conflict(d1, d2)
    assert n == 4 and math.isclose(share, 0.5)


def test_magnitude_threshold_is_exact():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600_000, generator=g).abs()
    for k in (1, 1000, 300_000, 599_999):
        assert cb.magnitude_threshold(x, k) == float(torch.topk(x, k).values[-1])


def test_analyze_compare_reports_sign_conflict():
    from adapterops.ops.analyze import analyze

    same = analyze(ADAPTERS / "llama-lora", compare=ADAPTERS / "llama-lora")
    assert all(m.sign_conflict == 0.0 for m in same.modules)
    other = analyze(ADAPTERS / "llama-lora", compare=ADAPTERS / "llama-rslora-patterns")
    a, b = open_adapter(ADAPTERS / "llama-lora"), open_adapter(ADAPTERS / "llama-rslora-patterns")
    for m in other.modules:
        if m.name not in b.modules:
            assert m.sign_conflict is None
            continue
        d = [(ad.read(x.b_key).float() @ ad.read(x.a_key).float()) * x.scale for ad, x in ((a, a.modules[m.name]), (b, b.modules[m.name]))]
        assert math.isclose(m.sign_conflict, cb.sign_conflict(*d)[0], rel_tol=1e-5)
    res = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora"), "--compare", str(ADAPTERS / "llama-rslora-patterns")])
    assert "sign≠" in res.output


def test_exact_combine_factors_is_exact_combine_blockwise():
    """The blocked form from factors gives exact_combine's values, ties at the cut-off included (exactly k kept)."""
    g = torch.Generator().manual_seed(3)
    terms = []
    for _ in range(3):
        b, a = torch.randn(300, 4, generator=g), torch.randn(4, 200, generator=g)
        terms.append(((b * 8).round() / 8, (a * 4).round() / 4))  # coarse values: many exact ties at the cut
    weights = [1.0, -0.5, 0.7]
    for method in ("ties", "magnitude_prune", "dare_ties", "dare_linear", "linear"):
        for majority in ("total", "frequency") if method.endswith("ties") else ("total",):
            deltas = [b @ a for b, a in terms]
            want = cb.exact_combine(method, deltas, weights, 0.4, majority, torch.Generator().manual_seed(5))
            got, norm_sq = cb.exact_combine_factors(method, terms, weights, 0.4, majority,
                                                    torch.Generator().manual_seed(5), block=1000)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert math.isclose(norm_sq, float(want.double().square().sum()), rel_tol=1e-5)
    d = terms[0][0] @ terms[0][1]
    k = int(0.4 * d.numel())
    thr, n_gt, n_eq = cb.magnitude_cut(d.abs().reshape(-1), k)
    assert n_gt < k < n_gt + n_eq  # the case under test: ties at the cut
    kept = cb.exact_magnitude_prune_(d.clone(), 0.4)
    assert int((kept != 0).sum()) == k  # exactly k entries (all above zero here)
    assert float(kept.abs()[kept != 0].min()) == thr


def test_sketch_svd_reaches_the_optimal_truncation():
    g = torch.Generator().manual_seed(0)
    terms = [(torch.randn(900, 16, generator=g) * 0.01, torch.randn(16, 700, generator=g) / 30) for _ in range(2)]
    m, _ = cb.exact_combine_factors("ties", terms, [1.0, 1.0], 0.5)
    sv = torch.linalg.svdvals(m.double())
    svd = cb.sketch_svd(m, 16, cb.sketch_start([a for _, a in terms], 16))
    opt = float((sv[16:] ** 2).sum().sqrt())
    err = float(torch.linalg.norm(m.double() - svd.dense().double()))
    assert err <= opt * (1 + 1e-6)


def test_exact_combine_factors_same_bits_on_any_number_of_threads():
    """Blocks are independent: two worker threads give the bytes of one (no tolerance: the same operations on the
    same values, only in another order of blocks), and masks drawn ahead (`dare_masks`, as `stack` draws them in a
    background thread) give the bytes of masks drawn inside."""
    g = torch.Generator().manual_seed(7)
    terms = [(torch.randn(700, 8, generator=g), torch.randn(8, 500, generator=g)) for _ in range(3)]
    weights = [1.0, -0.5, 0.7]
    for method in ("ties", "magnitude_prune", "dare_ties", "dare_linear"):
        one, n1 = cb.exact_combine_factors(method, terms, weights, 0.3, "total", torch.Generator().manual_seed(1), block=4096)
        two, n2 = cb.exact_combine_factors(method, terms, weights, 0.3, "total", torch.Generator().manual_seed(1), block=4096,
                                           workers=2)
        assert torch.equal(one, two) and n1 == n2
        if method.startswith("dare"):
            masks = cb.dare_masks((700, 500), 3, 0.3, torch.Generator().manual_seed(1))
            ahead, _ = cb.exact_combine_factors(method, terms, weights, 0.3, "total", None, block=4096, masks=masks)
            assert torch.equal(one, ahead)


def test_magnitude_cut_in_one_pass_keeps_entries_equal_to_the_cut():
    """The pruning pass zeroes |x| < τ and keeps |x| = τ (hardshrink below the float32 just under τ), as the
    reference `exact_magnitude_prune_` does; τ = 0 keeps everything, τ = inf nothing."""
    x = torch.tensor([[0.5, -0.5, 0.25, -0.75, 0.0, 1.0]])
    for thr in (0.5, 0.25, 0.0, float("inf")):
        want = x.masked_fill(x.abs() < thr, 0.0)
        got = torch.empty_like(x)
        cb._combine_block(got, 0, [(torch.eye(1), x)], [("thr", thr)], [1.0], None,
                          False, False, "total")
        assert torch.equal(got, want), thr


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_sign_election_block_equals_the_torch_expression_bit_for_bit(majority):
    """The TIES block (comparisons done in NumPy for speed) against the same election written in torch ops, on
    entries that cancel, ties and zeros of both signs. Tolerance: none, signs of zeros included."""
    from adapterops.core.combine import _combine_block

    b1, a1 = torch.tensor([[1.0], [-1.0], [0.0], [2.0]]), torch.tensor([[1.0, -0.0, 0.0, -2.0, 3.0]])
    b2, a2 = torch.tensor([[-1.0], [1.0], [-0.0], [-2.0]]), torch.tensor([[1.0, 0.0, -0.0, -2.0, -3.0]])
    g = torch.Generator().manual_seed(1)
    b3, a3 = torch.randn(4, 2, generator=g), torch.randn(2, 5, generator=g)
    terms, weights = [(b1, a1), (b2, a2), (b3, a3)], [1.0, 0.5, -0.25]
    got = torch.empty(4, 5)
    norm_sq = _combine_block(got, 0, terms, [("all", None)] * 3, weights, None, False, True, majority)
    ps = [b @ a for b, a in terms]
    el = sum(ps[1:], ps[0].clone()) if majority == "total" else sum((p.sign() for p in ps[1:]), ps[0].sign())
    sgn = torch.where(el >= 0, 1.0, -1.0)
    count, want = torch.zeros_like(sgn), torch.zeros(4, 5)
    for p, w in zip(ps, weights):
        count.add_(p.mul_(sgn) > 0)
        want.add_(p.clamp_(min=0.0), alpha=w)
    want.mul_(sgn).div_(count.clamp_(min=1.0))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert norm_sq == float(torch.dot(want.reshape(-1), want.reshape(-1)))
