"""merge's report of how much of ΔW survived the rounding into the output dtype: per tensor and in total, the share
of elements that changed and ‖W' − W‖/‖ΔW‖, and a warning per cause when a merge (or a module) changed nothing."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from helpers import ADAPTERS, MODELS, adapter_with_tensors, read_all

import adapterops
from adapterops.io.adapter import open_adapter


def _scale_b(factor: float):
    def edit(tensors):
        for k in tensors:
            if "lora_B" in k:
                tensors[k] = tensors[k] * factor
    return edit


def _dense_survival(base: dict, merged: dict, adapter, tensor: str) -> float:
    """‖W' − W‖/‖s·B·A‖ computed densely, the reference for the streamed figure."""
    with open_adapter(adapter) as ad:
        mod = next(m for n, m in ad.modules.items() if tensor.startswith(n + "."))
        delta = (ad.read(mod.b_key).double() @ ad.read(mod.a_key).double()) * mod.scale
    diff = merged[tensor].double() - base[tensor].double()
    return float(diff.norm() / delta.norm())


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_normal_adapter_survives_whole(out, dtype):
    r = adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-lora"], out, dtype=dtype)
    tol = 0.03 if dtype is None else 1e-4  # bf16 rounding adds noise of about an ulp of W to each changed element
    assert r.warnings == []
    assert len(r.module_changes) == 14 and r.changed_share > 0.99
    assert abs(r.survived - 1) < tol
    base, merged = read_all(MODELS / "llama-tied"), read_all(out)
    for row in r.module_changes:
        assert abs(row["survived"] - 1) < tol
        want = _dense_survival(base, merged, ADAPTERS / "llama-lora", row["tensor"])
        assert row["survived"] == pytest.approx(want, rel=1e-4)
        changed = (merged[row["tensor"]] != base[row["tensor"]].to(merged[row["tensor"]].dtype)).double().mean().item()
        assert row["changed_share"] == pytest.approx(changed, rel=1e-5)


def test_update_below_bf16_resolution_changed_nothing(tmp_path, out):
    ad = adapter_with_tensors(tmp_path, "llama-lora", _scale_b(1e-12))  # ΔW far below an ulp of W in bfloat16
    r = adapterops.merge(MODELS / "llama-tied", [ad], out)
    assert r.changed_share == 0 and r.survived == 0
    assert all(row["changed_share"] == 0 for row in r.module_changes)
    assert len(r.warnings) == 2, r.warnings
    assert "14 merged tensors changed nothing: ΔW is below the output dtype's resolution" in r.warnings[0]
    assert "the merge changed nothing" in r.warnings[1]


def test_small_update_kept_in_float32_lost_in_bf16(tmp_path, out):
    ad = adapter_with_tensors(tmp_path, "llama-lora", _scale_b(1e-5))
    r = adapterops.merge(MODELS / "llama-tied", [ad], out)
    assert r.changed_share < 0.01 and r.survived < 0.5
    assert any("kept less than 50% of ‖ΔW‖_F" in w for w in r.warnings), r.warnings
    r32 = adapterops.merge(MODELS / "llama-tied", [ad], tmp_path / "f32", dtype="float32")
    assert r32.changed_share > 0.5 and r32.warnings == [] and abs(r32.survived - 1) < 0.05


def test_untrained_adapter_warns_once(tmp_path, out):
    ad = adapter_with_tensors(tmp_path, "llama-lora", _scale_b(0.0))
    r = adapterops.merge(MODELS / "llama-tied", [ad], out)
    assert r.changed_share == 0 and r.survived is None
    assert len(r.warnings) == 1 and "all-zero lora_B" in r.warnings[0], r.warnings  # one cause, one warning


def test_zero_lora_a_is_its_own_cause(tmp_path, out):
    def edit(tensors):
        for k in tensors:
            if "lora_A" in k:
                tensors[k] = torch.zeros_like(tensors[k])
    r = adapterops.merge(MODELS / "llama-tied", [adapter_with_tensors(tmp_path, "llama-lora", edit)], out)
    assert len(r.warnings) == 2 and "ΔW is exactly 0" in r.warnings[0] and "the merge changed nothing" in r.warnings[1]


def test_general_path_and_partial_loss(tmp_path, out):
    """The embedding LoRA goes through the general path (not the blocked Linear one): figures measured there."""
    r = adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-embedding"], out)
    assert r.module_changes and all(row["survived"] is None or math.isfinite(row["survived"]) for row in r.module_changes)
    emb = next(row for row in r.module_changes if "embed_tokens" in row["tensor"])
    assert emb["changed_share"] > 0
    # a ΔW near bf16's resolution: some elements change, most of it is lost or distorted
    ad = adapter_with_tensors(tmp_path, "llama-lora", _scale_b(3e-3))
    r = adapterops.merge(MODELS / "llama-tied", [ad], tmp_path / "small")
    assert 0 < r.changed_share < 0.9


def test_dora_reports_share_but_no_survival(out):
    r = adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-dora"], out)
    assert r.module_changes and all(row["survived"] is None for row in r.module_changes) and r.survived is None
    assert r.changed_share > 0.5


def test_cli_prints_the_survival_line(out):
    res = subprocess.run([sys.executable, "-m", "adapterops", "merge", str(MODELS / "llama-tied"), str(ADAPTERS / "llama-lora"),
                          str(out)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "ΔW after rounding:" in res.stdout and "‖W' − W‖/‖ΔW‖ = " in res.stdout


def test_no_report_writes_the_same_bytes_and_no_figures(tmp_path):
    """--no-report skips the measurement only: the same output bytes, no figures, no 'changed nothing' warning
    (an update below bf16's resolution here), while the all-zero lora_B warning comes from the factors and stays."""
    from helpers import raw_bytes

    with_report = adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-lora"], tmp_path / "a")
    without = adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-lora"], tmp_path / "b", report=False)
    a, b = read_all(tmp_path / "a"), read_all(tmp_path / "b")
    assert sorted(a) == sorted(b) and all(raw_bytes(a[k]) == raw_bytes(b[k]) for k in a)
    assert with_report.changed_share is not None and with_report.module_changes
    assert without.changed_share is None and without.survived is None and without.module_changes == []
    tiny = adapter_with_tensors(tmp_path / "tiny", ADAPTERS / "llama-lora", _scale_b(1e-9))
    assert any("changed nothing" in w for w in adapterops.merge(MODELS / "llama-tied", [tiny], tmp_path / "c").warnings)
    assert not any("changed nothing" in w for w in adapterops.merge(MODELS / "llama-tied", [tiny], tmp_path / "d",
                                                                   report=False).warnings)
    zero = adapter_with_tensors(tmp_path / "zero", ADAPTERS / "llama-lora", _scale_b(0.0))
    assert any("all-zero lora_B" in w for w in adapterops.merge(MODELS / "llama-tied", [zero], tmp_path / "e",
                                                               report=False).warnings)
    res = subprocess.run([sys.executable, "-m", "adapterops", "merge", str(MODELS / "llama-tied"), str(ADAPTERS / "llama-lora"),
                          str(tmp_path / "f"), "--no-report"], capture_output=True, text=True, check=False)
    assert res.returncode == 0 and "ΔW after rounding" not in res.stdout, res.stdout + res.stderr
