"""`adapterops analyze`: every measure against numpy's dense SVD, known spectra, health warnings, JSON schema, PNG.

Tolerances: measures come from float32 factors through QR (never a dense ΔW) and are rounded to 6 significant
digits in the report, so we compare with numpy's float64 dense SVD to 1e-4 relative (singular values of a
float32 product carry ~1e-6 relative error; 6 digits add 5e-7).
"""

from __future__ import annotations

import json
import math
from importlib import resources

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, edit_json, read_all

from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file
from adapterops.ops.analyze import analyze

REL = 1e-4


def write_adapter(path, modules: dict[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float, **cfg) -> None:
    """A PEFT LoRA adapter folder from {module: (B, A)}."""
    path.mkdir(parents=True)
    tensors = {}
    for name, (b, a) in modules.items():
        tensors[f"base_model.model.{name}.lora_A.weight"] = a.contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = b.contiguous()
    save_file(tensors, path / "adapter_model.safetensors", {"format": "pt"})
    targets = sorted({n.rsplit(".", 1)[-1] for n in modules})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, **cfg}
    (path / "adapter_config.json").write_text(json.dumps(config))


def dense_measures(b: np.ndarray, a: np.ndarray, scale: float) -> dict[str, float]:
    """Reference measures from the dense ΔW."""
    s = np.linalg.svd(scale * (b.astype(np.float64) @ a.astype(np.float64)), compute_uv=False)[: a.shape[0]]
    share = np.cumsum(s**2) / (s**2).sum()
    p = s / s.sum()
    p = p[p > 0]
    return {"sv": s, "fro": math.sqrt((s**2).sum()), "stable": (s**2).sum() / s[0] ** 2, "eff": math.exp(-(p * np.log(p)).sum()),
            "r90": int(np.searchsorted(share, 0.9) + 1), "r99": int(np.searchsorted(share, 0.99) + 1)}


def test_measures_match_the_dense_svd(tmp_path):
    g = torch.Generator().manual_seed(7)
    mods = {f"model.layers.{i}.self_attn.{p}": (torch.randn(48, 6, generator=g), torch.randn(6, 40, generator=g))
            for i in range(2) for p in ("q_proj", "v_proj")}
    write_adapter(tmp_path / "ad", mods, r=6, alpha=12, use_rslora=True)
    report = analyze(tmp_path / "ad")
    scale = 12 / math.sqrt(6)
    for m in report.modules:
        ref = dense_measures(mods[m.name][0].numpy(), mods[m.name][1].numpy(), scale)
        assert np.allclose(m.singular_values, ref["sv"], rtol=REL, atol=0)
        assert m.fro == pytest.approx(ref["fro"], rel=REL)
        assert m.stable_rank == pytest.approx(ref["stable"], rel=REL)
        assert m.effective_rank == pytest.approx(ref["eff"], rel=REL)
        assert (m.r90, m.r99) == (ref["r90"], ref["r99"])
        assert m.scale == pytest.approx(scale, rel=1e-6) and m.layer in (0, 1) and m.type in ("q_proj", "v_proj")
    assert set(report.by_type) == {"q_proj", "v_proj"} and set(report.by_layer) == {"0", "1"}
    assert report.by_type["q_proj"]["modules"] == 2
    assert report.suggested_rank == max(m.r99 for m in report.modules)


def test_known_spectrum(tmp_path):
    """B = U·diag(s), A = Vᵀ with s = (8, 4, 2, 1, 0, 0): every measure has a closed form."""
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(32, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(24, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([8.0, 4, 2, 1, 0, 0], dtype=torch.float64)
    write_adapter(tmp_path / "ad", {"layers.0.proj": ((u * s).float(), v.T.float())}, r=6, alpha=6)
    m = analyze(tmp_path / "ad").modules[0]
    assert m.singular_values[:4] == pytest.approx([8, 4, 2, 1], rel=1e-5)
    assert max(m.singular_values[4:]) < 1e-5
    assert m.stable_rank == pytest.approx(85 / 64, rel=1e-5)
    p = np.array([8, 4, 2, 1]) / 15
    assert m.effective_rank == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-5)
    assert (m.r90, m.r99) == (2, 4)  # 80/85 = 0.941 ≥ 0.9; 84/85 = 0.988 < 0.99, so r99 needs the 4th
    assert m.fro == pytest.approx(math.sqrt(85), rel=1e-6)


@pytest.mark.parametrize("base,adapter", [("llama-tied", "llama-lora"), ("gpt2", "gpt2-lora"), ("llama-tied", "llama-embedding")])
def test_base_measures_match_dense(base, adapter):
    report = analyze(ADAPTERS / adapter, base=MODELS / base)
    weights = read_all(MODELS / base)
    ad = read_all(ADAPTERS / adapter / "adapter_model.safetensors")
    cfg = json.loads((ADAPTERS / adapter / "adapter_config.json").read_text())
    for m in report.modules:
        key = f"base_model.model.{m.name}"
        if m.kind == "embedding":
            b, a = ad[f"{key}.lora_embedding_B"], ad[f"{key}.lora_embedding_A"]
        else:
            b, a = ad[f"{key}.lora_B.weight"], ad[f"{key}.lora_A.weight"]
        delta = m.scale * (b.double() @ a.double())  # PEFT's B·A layout (out, in)
        wname = f"{m.name}.weight" if f"{m.name}.weight" in weights else "model.embed_tokens.weight"  # tied lm_head
        w = weights[wname].double()
        if m.kind == "embedding" or cfg.get("fan_in_fan_out"):
            w = w.T
        assert m.relative_update == pytest.approx(float(torch.linalg.norm(delta) / torch.linalg.norm(w)), rel=REL)
        uu, ss, vh = torch.linalg.svd(delta, full_matrices=False)
        r = m.rank
        amp = float(torch.linalg.norm(delta) / torch.linalg.norm(uu[:, :r].T @ w @ vh[:r].T))
        assert m.amplification == pytest.approx(amp, rel=REL), m.name


def test_compare_similarity(tmp_path):
    same = analyze(ADAPTERS / "llama-lora", compare=ADAPTERS / "llama-lora")
    for m in same.modules:
        sim = m.similarity
        assert sim["i"] == [1, 2, 4, 8] == sim["j"]
        for n in range(4):  # an adapter against itself: φ(i, i) = 1
            assert sim["phi"][n][n] == pytest.approx(1.0, abs=1e-5)
    other = analyze(ADAPTERS / "llama-lora", compare=ADAPTERS / "llama-rslora-patterns")
    ad1 = read_all(ADAPTERS / "llama-lora" / "adapter_model.safetensors")
    ad2 = read_all(ADAPTERS / "llama-rslora-patterns" / "adapter_model.safetensors")
    compared = [m for m in other.modules if m.similarity]
    assert compared and any("not in the compared adapter" in w for w in other.warnings)
    for m in compared:
        key = f"base_model.model.{m.name}"
        u1 = np.linalg.svd(ad1[f"{key}.lora_B.weight"].double().numpy() @ ad1[f"{key}.lora_A.weight"].double().numpy())[0]
        u2 = np.linalg.svd(ad2[f"{key}.lora_B.weight"].double().numpy() @ ad2[f"{key}.lora_A.weight"].double().numpy())[0]
        for a, i in enumerate(m.similarity["i"]):
            for b, j in enumerate(m.similarity["j"]):
                want = np.linalg.norm(u1[:, :i].T @ u2[:, :j]) ** 2 / min(i, j)
                assert m.similarity["phi"][a][b] == pytest.approx(want, abs=1e-4)


def test_health_warnings(tmp_path):
    g = torch.Generator().manual_seed(2)
    mods = {f"model.layers.{i}.mlp.up_proj": (torch.randn(16, 4, generator=g), torch.randn(4, 12, generator=g)) for i in range(4)}
    mods["model.layers.1.mlp.up_proj"] = (torch.zeros(16, 4), torch.randn(4, 12, generator=g))  # untrained
    mods["model.layers.2.mlp.up_proj"] = (mods["model.layers.2.mlp.up_proj"][0] * 1e-7, mods["model.layers.2.mlp.up_proj"][1])
    bad = mods["model.layers.3.mlp.up_proj"][0].clone()
    bad[0, 0] = float("nan")
    mods["model.layers.3.mlp.up_proj"] = (bad, mods["model.layers.3.mlp.up_proj"][1])
    write_adapter(tmp_path / "ad", mods, r=4, alpha=8, rank_pattern={"gate_proj": 2}, alpha_pattern={"gate_proj": 4})
    report = analyze(tmp_path / "ad")
    text = "\n".join(report.warnings)
    assert "model.layers.3.mlp.up_proj: lora_A or lora_B holds NaN or Inf" in text
    assert "1 modules have an all-zero lora_B" in text and "model.layers.1.mlp.up_proj" in text
    assert "negligible ΔW" in text and "model.layers.2.mlp.up_proj" in text
    assert "rank_pattern key 'gate_proj'" in text and "alpha_pattern key 'gate_proj'" in text
    nan_mod = next(m for m in report.modules if m.layer == 3)
    assert nan_mod.fro is None and nan_mod.singular_values == []
    res = CliRunner().invoke(cli, ["analyze", str(tmp_path / "ad"), "--strict"])
    assert res.exit_code == 1 and "warning: " in res.stdout
    clean = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora"), "--strict"])
    assert clean.exit_code == 0, clean.output


def test_json_follows_its_schema_and_is_reproducible(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(resources.files("adapterops").joinpath("schemas/analyze-1.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    for args in ([str(ADAPTERS / "llama-lora")], [str(ADAPTERS / "gpt2-lora"), "--base", str(MODELS / "gpt2")],
                 [str(ADAPTERS / "llama-lora"), "--compare", str(ADAPTERS / "llama-rslora-patterns")],
                 [str(ADAPTERS / "conv-dora")]):
        res = CliRunner().invoke(cli, ["analyze", *args, "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        jsonschema.validate(data, schema)
        again = CliRunner().invoke(cli, ["analyze", *args, "--json"])
        assert again.stdout == res.stdout  # CI can diff it
    res = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora"), "--json-file", str(tmp_path / "r.json")])
    assert res.exit_code == 0 and "suggested rank" in res.stdout
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == "adapterops.analyze/1"


def test_table_groups_by_type_and_all_lists_every_module():
    grouped = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora")])
    assert grouped.exit_code == 0
    lines = grouped.stdout.splitlines()
    assert sum(1 for ln in lines if ln.startswith(("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))) == 7
    every = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora"), "--all"])
    assert sum(1 for ln in every.stdout.splitlines() if ln.startswith("model.layers.")) == 14
    missing = CliRunner().invoke(cli, ["analyze", "/nonexistent/adapter"])
    assert missing.exit_code == 2 and missing.stderr.startswith("error: ")


def test_plot_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    res = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora"), "--plot", str(tmp_path / "p.png"),
                                   "--compare", str(ADAPTERS / "llama-lora")])
    assert res.exit_code == 0, res.output
    data = (tmp_path / "p.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width > 800 and height > 400
    from matplotlib.image import imread

    img = imread(tmp_path / "p.png")
    assert img.shape[:2] == (height, width) and float(img.std()) > 0.05  # not a blank canvas


def test_pattern_keys_that_match_nothing_still_refuse_merges(tmp_path):
    """analyze only warns, but the commands that write outputs keep refusing such adapters."""
    import shutil

    import adapterops

    shutil.copytree(ADAPTERS / "llama-lora", tmp_path / "ad")
    edit_json(tmp_path / "ad" / "adapter_config.json", rank_pattern={"nope": 2})
    with pytest.raises(adapterops.AdapteropsError, match="matches no module"):
        adapterops.merge(MODELS / "llama-tied", tmp_path / "ad", tmp_path / "out")
    assert any("nope" in w for w in analyze(tmp_path / "ad").warnings)
