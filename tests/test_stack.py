"""`adapterops stack`: cat is the exact weighted sum (each adapter with its own scale); svd truncates that sum.

Tolerances: float32 merges agree to 1e-5 relative (factors re-rounded); the svd truncation error equals
√Σ(discarded σ²) of the dense sum to 1e-4 relative; PEFT logits to 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, read_all

import adapterops
from adapterops.cli import cli
from adapterops.core.lora import delta_weight
from adapterops.io.adapter import open_adapter

PAIR = [ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns"]  # different ranks, patterns, rsLoRA, modules


def stack(*args):
    """Run stack; it must succeed."""
    res = CliRunner().invoke(cli, ["stack", *map(str, args)], catch_exceptions=False)
    assert res.exit_code == 0, res.output


def dense_sum(paths, weights):
    """Σ wᵢ ΔWᵢ per module, dense (tiny fixtures only)."""
    out: dict[str, torch.Tensor] = {}
    for p, w in zip(paths, weights):
        ad = open_adapter(p)
        for name, mod in ad.modules.items():
            d = w * delta_weight(mod.kind, ad.read(mod.a_key), ad.read(mod.b_key), mod.scale)
            out[name] = out.get(name, 0) + d
    return out


@pytest.mark.parametrize("args", [["--method", "cat"], ["--method", "svd", "--rank", "32"]])
def test_exact_stacks_equal_the_weighted_merge(args, tmp_path):
    stack(*PAIR, tmp_path / "s", "--weights", "1,0.5", *args)
    adapterops.merge(MODELS / "llama-tied", tmp_path / "s", tmp_path / "a", dtype="float32")
    adapterops.merge(MODELS / "llama-tied", PAIR, tmp_path / "b", weights=[1, 0.5], dtype="float32")
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_svd_truncation_error_is_the_discarded_singular_values(tmp_path):
    stack(*PAIR, tmp_path / "s", "--weights", "1,-0.7", "--method", "svd", "--rank", "4")
    want, got = dense_sum(PAIR, [1, -0.7]), dense_sum([tmp_path / "s"], [1])
    for name, d in want.items():
        sv = torch.linalg.svdvals(d.double())
        predicted = float((sv[4:] ** 2).sum().sqrt())
        assert abs(float(torch.linalg.norm((got[name] - d).double())) - predicted) <= 1e-4 * float(sv.norm()), name


def test_peft_loads_the_stack(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    stack(*PAIR, tmp_path / "s", "--weights", "1,0.5")
    adapterops.merge(MODELS / "llama-tied", PAIR, tmp_path / "m", weights=[1, 0.5], dtype="float32")
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        model = transformers.AutoModelForCausalLM.from_pretrained(MODELS / "llama-tied", dtype=torch.float32)
        got = peft.PeftModel.from_pretrained(model, tmp_path / "s").eval()(ids).logits
        want = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_dora_cannot_be_stacked(tmp_path):
    res = CliRunner().invoke(cli, ["stack", str(ADAPTERS / "llama-lora"), str(ADAPTERS / "llama-dora"), str(tmp_path / "s")])
    assert res.exit_code == 2 and "DoRA adapters cannot be stacked" in res.stderr and not (tmp_path / "s").exists()


def test_svd_float64_precision(tmp_path):
    from adapterops.ops.stack import stack

    pair = [ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns"]
    stack(pair, tmp_path / "s64", method="svd", rank=16, precision="float64")
    ad, ins = open_adapter(tmp_path / "s64"), [open_adapter(p) for p in pair]
    for name, mod in ad.modules.items():
        got = delta_weight("linear", ad.read(mod.a_key), ad.read(mod.b_key), mod.scale).double()
        want = sum(delta_weight("linear", i.read(i.modules[name].a_key), i.read(i.modules[name].b_key), i.modules[name].scale).double()
                   for i in ins if name in i.modules)
        assert torch.linalg.norm(got - want) <= 1e-6 * torch.linalg.norm(want), name  # rank 16 ≥ 8 + 8: exact
        assert ad.read(mod.a_key).dtype == torch.float32
