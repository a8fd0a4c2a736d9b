"""analyze --intruders: intruder dimensions (Shuttleworth et al. 2024) on synthetic bases with a known answer, the
schema, the table and the CLI's usage errors."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from click.testing import CliRunner
from test_analyze import write_adapter

from adapterops.cli import cli
from adapterops.core import spectra
from adapterops.errors import AdapteropsError
from adapterops.io.safetensors_io import save_file
from adapterops.ops.analyze import analyze

NAME = "model.layers.0.self_attn.q_proj"


def _orthonormal(n: int, m: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def _case(tmp_path, out_f: int, in_f: int, b, a=None) -> tuple:
    """A base whose weight has singular values 10 … 1 (evenly spaced) and known singular vectors, and a rank-r
    adapter on it: (B, A) given, or made by `b(U, V)` from the base's singular vectors."""
    m = min(out_f, in_f)
    u, v = _orthonormal(out_f, m, 1), _orthonormal(in_f, m, 2)
    if a is None:
        b, a = b(u, v)
    s = torch.linspace(10, 1, m, dtype=torch.float64)
    w = (u * s) @ v.T
    save_file({f"{NAME}.weight": w.float()}, tmp_path / "base.safetensors", {"format": "pt"})
    write_adapter(tmp_path / "ad", {NAME: (b.float(), a.float())}, r=a.shape[0], alpha=a.shape[0])  # scale 1
    return tmp_path / "base.safetensors", tmp_path / "ad", u, v


def test_new_orthogonal_direction_is_an_intruder(tmp_path):
    """ΔW = 30·x·yᵀ with x orthogonal to every left singular vector of W (a tall W leaves room): the top singular
    vector of W + ΔW is x, whose cosine with all of W's is 0."""
    out_f, in_f = 64, 32
    u = _orthonormal(out_f, 32, 1)
    x = torch.randn(out_f, 1, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    x -= u @ (u.T @ x)
    x /= x.norm()
    y = _orthonormal(in_f, 1, 6)
    base, ad, _, _ = _case(tmp_path, out_f, in_f, 30 * x, y.T)
    r = analyze(ad, base=base, intruders=True)
    m = r.modules[0]
    assert r.intruder_k == 10 and r.intruder_epsilon == 0.5
    assert m.intruders == 1 and m.intruder_cosines[0] < 0.2 and min(m.intruder_cosines[1:]) >= 0.5
    assert r.by_type["q_proj"]["intruders"] == 1


def test_update_within_the_top_subspace_has_no_intruder(tmp_path):
    """ΔW = U₄·diag(δ)·V₄ᵀ only rescales W's top singular values: the singular vectors stay W's own."""
    delta = torch.tensor([3.0, -2.0, 1.5, 4.0], dtype=torch.float64)
    base, ad, _, _ = _case(tmp_path, 48, 40, lambda u, v: (u[:, :4] * delta, v[:, :4].T))
    r = analyze(ad, base=base, intruders=True, intruder_k=8)
    m = r.modules[0]
    assert m.intruders == 0 and len(m.intruder_cosines) == 8 and min(m.intruder_cosines) > 0.99


def test_epsilon_and_k_change_the_count(tmp_path):
    """A random direction in a square W: its best cosine with W's basis is about √(2 ln n / n) (≈ 0.36 at n = 64),
    below 0.5 but above 0.01."""
    n = 64
    x, y = _orthonormal(n, 1, 7), _orthonormal(n, 1, 8)
    base, ad, _, _ = _case(tmp_path, n, n, 40 * x, y.T)
    assert analyze(ad, base=base, intruders=True).modules[0].intruders == 1
    assert analyze(ad, base=base, intruders=True, intruder_epsilon=0.01).modules[0].intruders == 0
    cos = analyze(ad, base=base, intruders=True, intruder_k=1).modules[0].intruder_cosines
    assert len(cos) == 1 and 0.05 < cos[0] < 0.5


def test_spectra_function_against_a_dense_reference():
    g = torch.Generator().manual_seed(3)
    w, d = torch.randn(30, 20, generator=g), torch.randn(30, 20, generator=g)
    bu = torch.linalg.svd(w, full_matrices=False).U
    tu = torch.linalg.svd(w + d, full_matrices=False).U
    want = [float((tu[:, j:j + 1].T @ bu).abs().max()) for j in range(5)]
    assert spectra.intruder_cosines(bu, w + d, 5) == pytest.approx(want, abs=1e-5)


def test_schema_table_and_usage_errors(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    n = 32
    base, ad, _, _ = _case(tmp_path, n, n, 40 * _orthonormal(n, 1, 7), _orthonormal(n, 1, 8).T)
    runner = CliRunner()
    res = runner.invoke(cli, ["analyze", str(ad), "--base", str(base), "--intruders", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    schema = json.loads(resources.files("adapterops").joinpath("schemas/analyze-1.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert data["modules"][0]["intruders"] == 1 and data["intruder_epsilon"] == 0.5
    res = runner.invoke(cli, ["analyze", str(ad), "--base", str(base), "--intruders", "--all"])
    assert res.exit_code == 0 and "intruders" in res.stdout and "Shuttleworth" in res.stdout
    res = runner.invoke(cli, ["analyze", str(ad), "--base", str(base), "--intruder-k", "5"])
    assert res.exit_code == 2 and "--intruder-k applies only with --intruders" in res.output
    res = runner.invoke(cli, ["analyze", str(ad), "--intruders"])
    assert res.exit_code == 2 and "--intruders applies only with --base" in res.output
    with pytest.raises(AdapteropsError):
        analyze(ad, intruders=True)
    plain = analyze(ad, base=base)  # without --intruders: nothing computed, nothing in the table
    assert plain.modules[0].intruders is None and plain.intruder_k is None
