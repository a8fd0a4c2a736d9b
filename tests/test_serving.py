"""`check` and `convert --for ENGINE`: the engine rule tables, findings on the fixtures, exit codes and schemas, and
end to end on a DoRA + rsLoRA + rank_pattern + modules_to_save adapter built with real PEFT: the converted adapter
passes `check`, PEFT loads it, and its logits and merged weights match the original within the reported error.
The vLLM interop test runs vLLM's own PEFTHelper validation (read from a vLLM wheel) on the same adapters."""

from __future__ import annotations

import json
import os
import sys
import types
import zipfile
from importlib import resources
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS

import adapterops
from adapterops.cli import cli
from adapterops.errors import AdapteropsError
from adapterops.io.engines import RULES, SEVERITIES, all_engines, load_engine

ENGINES = ["vllm", "sglang", "tgi", "lorax", "llamacpp"]


def _schema(name: str) -> dict:
    return json.loads(resources.files("adapterops").joinpath(f"schemas/{name}").read_text())


def test_every_engine_table_is_complete_and_valid():
    jsonschema = pytest.importorskip("jsonschema")
    schema = _schema("engine-rules-1.schema.json")
    jsonschema.Draft202012Validator.check_schema(schema)
    folder = resources.files("adapterops").joinpath("data/engines")
    tables = [json.loads(p.read_text()) for p in folder.iterdir() if p.name.endswith(".json")]
    assert sorted(t["engine"] for t in tables) == sorted(ENGINES)
    for t in tables:
        jsonschema.validate(t, schema)
        missing = set(RULES) - set(t["rules"]) - ({"rank_padding"} if not t["rank_padding"] else set())
        assert not missing, (t["engine"], missing)
        for rule in t["rules"].values():
            assert rule["severity"] in SEVERITIES and rule["source"]
    assert {e.engine for e in all_engines()} == set(ENGINES)
    assert load_engine("vllm@0.33.0").label == "vLLM 0.33.0"
    assert load_engine("text-generation-inference").engine == "tgi"
    with pytest.raises(AdapteropsError, match="unknown engine"):
        load_engine("tensorrt")


def test_padded_rank_follows_sgmv():
    tgi = load_engine("tgi")
    assert [tgi.padded_rank(r) for r in (1, 4, 8, 12, 16, 17, 64, 65)] == [8, 8, 8, 16, 16, 32, 64, 80]
    assert load_engine("vllm").padded_rank(12) == 12


@pytest.mark.parametrize(("adapter", "engine", "rule", "severity"), [
    ("llama-rslora-patterns", "vllm", "use_rslora", "fine"),
    ("llama-rslora-patterns", "sglang", "use_rslora", "served_differently"),
    ("llama-rslora-patterns", "llamacpp", "use_rslora", "served_differently"),
    ("llama-rslora-patterns", "tgi", "rank_pattern", "served_differently"),
    ("llama-rslora-patterns", "llamacpp", "alpha_pattern", "served_differently"),
    ("llama-dora", "vllm", "dora", "refused"),
    ("llama-dora", "tgi", "dora", "ignored"),
    ("llama-tied-mts", "vllm", "modules_to_save", "refused"),
    ("llama-tied-mts", "lorax", "modules_to_save", "ignored"),
    ("llama-lora-bias", "vllm", "lora_bias", "refused"),
    ("llama-lora-bias", "sglang", "bias", "ignored"),
    ("llama-embedding", "tgi", "embedding_lora", "ignored"),
    ("llama-embedding", "llamacpp", "tied_lm_head", "refused"),
    ("llama-dora", "tgi", "rank_padding", "served_differently"),
])
def test_findings_on_fixtures(adapter, engine, rule, severity):
    base = MODELS / ("llama-untied" if "bias" in adapter or "untied" in adapter else "llama-tied")
    r = adapterops.check(ADAPTERS / adapter, engine=engine, base=base)
    got = {f["rule"]: f for f in r.findings}
    assert got[rule]["severity"] == severity
    assert got[rule]["source"]
    assert (got[rule]["fix"] is None) == (severity == "fine") or rule in ("embedding_lora", "tied_lm_head")
    assert (r.verdict == "fine") == (severity == "fine")


def test_plain_lora_is_fine_everywhere_and_rank_limits_apply():
    for e in ENGINES:
        assert adapterops.check(ADAPTERS / "llama-lora", engine=e, base=MODELS / "llama-tied").ok
    r = adapterops.check(ADAPTERS / "llama-lora", engine="vllm", max_lora_rank=4)
    assert [f["rule"] for f in r.findings] == ["max_rank"] and r.findings[0]["severity"] == "refused"


def test_base_reveals_unmatched_modules_and_prefixes(tmp_path):
    from helpers import adapter_with_tensors

    def rename(t):
        for k in list(t):
            t[k.replace("base_model.model.model.", "base_model.model.language_model.model.")] = t.pop(k)
    ad = adapter_with_tensors(tmp_path, "llama-lora", rename)
    r = adapterops.check(ad, engine="tgi", base=MODELS / "llama-tied")
    rules = {f["rule"]: f["severity"] for f in r.findings}
    assert rules["unmatched_module"] == "ignored" and rules["language_model_prefix"] == "ignored"
    assert adapterops.check(ad, engine="llamacpp").findings[0]["severity"] in ("fine", "refused")
    out = adapterops.convert(ad, tmp_path / "renamed", engine="tgi", base=MODELS / "llama-tied")
    assert any("renamed" in c for c in out.changes)
    assert adapterops.check(tmp_path / "renamed", engine="tgi", base=MODELS / "llama-tied").ok


def test_partial_layers_are_filled_for_tgi(tmp_path):
    from helpers import adapter_with_tensors

    ad = adapter_with_tensors(tmp_path, "llama-lora", lambda t: [t.pop(k) for k in list(t) if ".layers.1.mlp.down_proj" in k])
    r = adapterops.check(ad, engine="tgi", base=MODELS / "llama-tied")
    assert {f["rule"]: f["severity"] for f in r.findings}["partial_layers"] == "ignored"
    assert adapterops.check(ad, engine="vllm", base=MODELS / "llama-tied").ok
    adapterops.convert(ad, tmp_path / "out", engine="tgi", base=MODELS / "llama-tied")
    assert adapterops.check(tmp_path / "out", engine="tgi", base=MODELS / "llama-tied").ok


def test_cli_exit_codes_json_and_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    runner = CliRunner()
    res = runner.invoke(cli, ["check", str(ADAPTERS / "llama-rslora-patterns"), "--for", "sglang", "--json"])
    assert res.exit_code == 1
    data = json.loads(res.stdout)
    jsonschema.validate(data, _schema("check-1.schema.json"))
    assert data["schema"] == "adapterops.check/1" and data["verdict"] == "served_differently"
    assert runner.invoke(cli, ["check", str(ADAPTERS / "llama-lora"), "--for", "vllm"]).exit_code == 0
    res = runner.invoke(cli, ["check", str(ADAPTERS / "llama-lora"), "--for", "nope"])
    assert res.exit_code == 2 and "unknown engine" in res.stderr
    res = runner.invoke(cli, ["check", str(ADAPTERS / "llama-lora"), "--for", "vllm", "--revision", "main"])
    assert res.exit_code == 2
    res = runner.invoke(cli, ["convert", str(ADAPTERS / "llama-rslora-patterns"), str(tmp_path / "o"), "--for", "sglang", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    jsonschema.validate(data, _schema("convert-1.schema.json"))
    report = json.loads((tmp_path / "o" / "adapterops-convert.json").read_text())
    jsonschema.validate(report, _schema("convert-1.schema.json"))
    assert report["check"] == "fine"


def test_rslora_patterns_conversion_is_exact(tmp_path):
    """Baking and zero-padding change no ΔW: the converted adapter merges to the same weights (float32 rounding)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    for e in ENGINES:
        adapterops.convert(ADAPTERS / "llama-rslora-patterns", tmp_path / e, engine=e)
        assert adapterops.check(tmp_path / e, engine=e).ok
    w0 = _merged(peft, AutoModelForCausalLM, MODELS / "llama-tied", ADAPTERS / "llama-rslora-patterns")
    for e in ENGINES:
        w1 = _merged(peft, AutoModelForCausalLM, MODELS / "llama-tied", tmp_path / e)
        for k in w0:
            torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=2e-7)


def test_refusals_say_to_merge(tmp_path):
    with pytest.raises(AdapteropsError, match="merge the adapter instead"):
        adapterops.convert(ADAPTERS / "llama-lora-bias", tmp_path / "a", engine="vllm", base=MODELS / "llama-untied")
    with pytest.raises(AdapteropsError, match="needs --base"):
        adapterops.convert(ADAPTERS / "llama-dora", tmp_path / "b", engine="vllm")
    with pytest.raises(AdapteropsError, match="not low-rank"):  # a random full-rank lm_head copy at vLLM's rank 16
        adapterops.convert(ADAPTERS / "llama-tied-mts", tmp_path / "c", engine="vllm", base=MODELS / "llama-tied")
    assert not (tmp_path / "c").exists()


# --- end to end: DoRA + rsLoRA + rank_pattern + modules_to_save, built with PEFT --------------------------------

def make_dora_rslora_mts(dest: Path, seed: int = 0) -> Path:
    """A tiny-Llama adapter with everything engines trip on: DoRA, rsLoRA, a rank pattern, and a trained lm_head
    copy in modules_to_save (its change from the base is rank 4, as short fine-tunes' updates often nearly are)."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(MODELS / "llama-untied", dtype=torch.float32)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, use_rslora=True, use_dora=True, rank_pattern={"down_proj": 4},
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                          modules_to_save=["lm_head"])
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p))
            elif "modules_to_save" in name and name.endswith("weight"):
                u, v = torch.randn(p.shape[0], 4), torch.randn(4, p.shape[1])
                p.add_(0.01 * u @ v)
    model.save_pretrained(dest)
    return dest


def _merged(peft, auto, base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter)
    return {k: v.detach().clone() for k, v in model.merge_and_unload().state_dict().items()}


def _logits(peft, auto, base: Path, adapter: Path) -> torch.Tensor:
    model = peft.PeftModel.from_pretrained(auto.from_pretrained(base, dtype=torch.float32), adapter).eval()
    ids = torch.arange(0, 120, 3).reshape(2, 20)
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llamacpp"])
def test_dora_rslora_mts_end_to_end(tmp_path, engine):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    src = make_dora_rslora_mts(tmp_path / "src")
    base = MODELS / "llama-untied"
    before = adapterops.check(src, engine=engine, base=base)
    assert before.verdict in ("refused", "served_differently")
    out = tmp_path / "out"
    r = adapterops.convert(src, out, engine=engine, base=base, energy=0.9999, max_lora_rank=64)
    assert adapterops.check(out, engine=engine, base=base, max_lora_rank=64).ok
    assert r.check == "fine" and (out / "adapterops-convert.json").is_file()
    assert {m["how"] for m in r.modules.values()} >= {"dora→lora", "modules_to_save→lora"}
    w0, w1 = _merged(peft, AutoModelForCausalLM, base, src), _merged(peft, AutoModelForCausalLM, base, out)
    wb = {k: v.float() for k, v in AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).state_dict().items()}
    for name, m in r.modules.items():  # the reported error is the error of the merged weights
        key = f"{name}.weight"
        want = float((w1[key] - w0[key]).norm() / (w0[key] - wb[key]).norm())
        assert want == pytest.approx(m["relative_error"], abs=2e-4), name
    l0, l1 = _logits(peft, AutoModelForCausalLM, base, src), _logits(peft, AutoModelForCausalLM, base, out)
    assert float((l1 - l0).abs().max()) <= 20 * r.max_relative_error * float(l0.abs().max()) + 1e-4


def test_dora_truncated_error_is_reported(tmp_path):
    src = make_dora_rslora_mts(tmp_path / "src")
    r = adapterops.convert(src, tmp_path / "out", engine="vllm", base=MODELS / "llama-untied", rank=4, max_lora_rank=64)
    dora = [m for m in r.modules.values() if m["how"] == "dora→lora"]
    assert r.warnings and "relative error" in r.warnings[0]
    assert all(m["rank"] == r.rank for m in r.modules.values())
    assert all(0 < m["relative_error"] < 1 and m["retained_fro"] ** 2 + m["relative_error"] ** 2 == pytest.approx(1, abs=1e-5)
               for m in dora)


# --- interop: vLLM's own validation ----------------------------------------------------------------------------

def _vllm_peft_helper():
    """vLLM's PEFTHelper (vllm/lora/peft_helper.py) from a vLLM wheel named by $ADAPTEROPS_VLLM_WHEEL, with stubs for
    its two imports (vllm.config.lora.LoRAConfig, vllm.logger). vLLM itself needs CUDA and a large install."""
    wheel = os.environ.get("ADAPTEROPS_VLLM_WHEEL")
    if not wheel or not Path(wheel).is_file():
        pytest.skip("set ADAPTEROPS_VLLM_WHEEL to a vllm-0.33.0 wheel (pip download vllm==0.33.0 --no-deps)")
    pytest.importorskip("regex")
    with zipfile.ZipFile(wheel) as z:
        code = z.read("vllm/lora/peft_helper.py").decode()
    stubs = {"vllm": types.ModuleType("vllm"), "vllm.config": types.ModuleType("vllm.config"),
             "vllm.config.lora": types.ModuleType("vllm.config.lora"), "vllm.logger": types.ModuleType("vllm.logger")}

    class LoRAConfig:  # the one field validate_legal reads
        def __init__(self, max_lora_rank: int = 16) -> None:
            self.max_lora_rank = max_lora_rank

    class Logger:
        def info_once(self, *a, **k) -> None: ...

    stubs["vllm.config.lora"].LoRAConfig = LoRAConfig
    stubs["vllm.logger"].init_logger = lambda name: Logger()
    module = types.ModuleType("vllm_peft_helper")
    stubs["vllm_peft_helper"] = module
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        exec(compile(code, "vllm/lora/peft_helper.py", "exec"), module.__dict__)  # noqa: S102 - the engine's own code, on purpose
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    return module.PEFTHelper, LoRAConfig


@pytest.mark.parametrize("adapter", ["llama-lora", "llama-dora", "llama-rslora-patterns", "llama-tied-mts",
                                     "llama-untied-mts", "llama-lora-bias", "llama-embedding"])
@pytest.mark.parametrize("max_rank", [4, 16])
def test_vllm_peft_helper_agrees_with_check(adapter, max_rank):
    helper, lora_config = _vllm_peft_helper()
    try:
        helper.from_local_dir(str(ADAPTERS / adapter), None).validate_legal(lora_config(max_rank))
        vllm_refuses = False
    except ValueError:
        vllm_refuses = True
    ours = adapterops.check(ADAPTERS / adapter, engine="vllm@0.33.0", max_lora_rank=max_rank)
    config_rules = {"dora", "lora_bias", "bias", "modules_to_save", "max_rank"}  # what validate_legal covers
    we_refuse = any(f["severity"] == "refused" and f["rule"] in config_rules for f in ours.findings)
    assert we_refuse == vllm_refuses
