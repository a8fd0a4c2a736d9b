"""Bad input: a one-line error naming the file (and tensor), exit code 2, no output and no temporary folder."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from click.testing import CliRunner
from helpers import (
    ADAPTERS,
    MODELS,
    adapter_with_tensors,
    copy_fixture,
    edit_json,
    leftovers,
    tree_hash,
)

from adapterops.cli import cli
from adapterops.io.safetensors_io import SafetensorsFile, save_file


def merge_fails(base, adapter, tmp_path, *extra: str) -> str:
    """Run a merge that must fail cleanly; return its one-line error."""
    inputs = [p for p in (base, adapter) if os.path.isdir(p)]
    before = [tree_hash(p) for p in inputs]
    res = CliRunner().invoke(cli, ["merge", str(base), str(adapter), str(tmp_path / "out"), "-q", *extra])
    assert res.exit_code == 2, res.output
    assert leftovers(tmp_path) == []
    assert [tree_hash(p) for p in inputs] == before
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in res.output
    return err


def adapter_with(tmp_path, name="llama-lora", **config):
    """A copy of a fixture adapter with config keys changed."""
    ad = copy_fixture("adapter", name, tmp_path)
    edit_json(ad / "adapter_config.json", **config)
    return ad


@pytest.mark.parametrize("ptype", ["ADALORA", "OFT", "BOFT", "HRA"])
def test_unsupported_adapter_types(tmp_path, ptype):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, peft_type=ptype), tmp_path)
    assert f"adapter type {ptype} is not supported" in err and "adapter_config.json" in err


@pytest.mark.parametrize("ptype", ["PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING"])
def test_prompt_learning_adapters_have_nothing_to_merge(tmp_path, ptype):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, peft_type=ptype), tmp_path)
    assert "nothing to merge" in err and "adapter_config.json" in err


@pytest.mark.parametrize("ptype,shown", [("IA3", "IA3"), ("LOHA", "LoHa"), ("LOKR", "LoKr"), ("VERA", "VeRA")])
def test_lora_tensors_under_another_tuners_config(tmp_path, ptype, shown):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, peft_type=ptype), tmp_path)
    assert f"does not belong in a {shown} adapter" in err and "adapter_model.safetensors" in err


@pytest.mark.parametrize("feature", [{"layer_replication": [[0, 1]]}, {"init_lora_weights": "pissa"}, {"trainable_token_indices": [1, 2]}])
def test_unsupported_lora_features(tmp_path, feature):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, **feature), tmp_path)
    assert "adapter_config.json" in err


def test_module_not_in_base(tmp_path):
    err = merge_fails(MODELS / "llama-tied", ADAPTERS / "gpt2-lora", tmp_path)
    assert "adapter_model.safetensors" in err and "is not in the base checkpoint" in err and "transformer.h.0.attn.c_attn" in err


def test_shape_mismatch_names_tensor(tmp_path):
    key = "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"
    ad = adapter_with_tensors(tmp_path, "llama-lora", lambda t: t.__setitem__(key, torch.zeros(100, 8)))
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert "shape mismatch" in err and "model.layers.1.mlp.up_proj" in err and str(ad / "adapter_model.safetensors") in err


def test_rank_in_config_disagrees_with_tensors(tmp_path):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, r=4), tmp_path)
    assert "lora_A has rank 8 but the config gives module" in err


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_pattern_key_matching_no_module(tmp_path, pattern):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, **{pattern: {"nonexistent_proj": 8}}), tmp_path)
    assert f"{pattern} key 'nonexistent_proj' matches no module" in err


def test_pattern_key_invalid_regex(tmp_path):
    err = merge_fails(MODELS / "llama-tied", adapter_with(tmp_path, alpha_pattern={"q_proj(": 8}), tmp_path)
    assert "not a valid regular expression" in err


def test_truncated_base(tmp_path):
    base = copy_fixture("model", "llama-tied", tmp_path)
    f = base / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    err = merge_fails(base, ADAPTERS / "llama-lora", tmp_path)
    assert "truncated" in err and "model.safetensors" in err and "tensor '" in err


def test_truncated_adapter(tmp_path):
    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    f = ad / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[:20])
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert "adapter_model.safetensors" in err and "header" in err


@pytest.mark.parametrize("how", ["huge-length", "bad-json", "not-object", "bad-dtype", "bad-offsets", "tiny"])
def test_corrupt_header(tmp_path, how):
    base = copy_fixture("model", "llama-tied", tmp_path)
    f = base / "model.safetensors"
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    if how == "huge-length":
        data = struct.pack("<Q", 2**62) + data[8:]
    elif how == "tiny":
        data = data[:5]
    else:
        name = next(k for k in header if k != "__metadata__")
        if how == "bad-json":
            raw = b"{" + data[9 : 8 + n]
            raw = raw.replace(b'"', b"'", 1)
            data = data[:8] + raw[:n] + data[8 + n :]
        elif how == "not-object":
            raw = b"[]".ljust(n)
            data = data[:8] + raw + data[8 + n :]
        else:
            if how == "bad-dtype":
                header[name]["dtype"] = "Q4"
            else:
                header[name]["data_offsets"][1] += 2
            raw = json.dumps(header).encode()
            raw += b" " * (-len(raw) % 8)
            data = struct.pack("<Q", len(raw)) + raw + data[8 + n :]
    f.write_bytes(data)
    err = merge_fails(base, ADAPTERS / "llama-lora", tmp_path)
    assert "model.safetensors" in err


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "link.safetensors", "missing.safetensors"])
def test_index_pointing_outside_or_missing(tmp_path, shard):
    base = copy_fixture("model", "llama-untied", tmp_path)
    (tmp_path / "outside.safetensors").write_bytes((base / "model-00001-of-00002.safetensors").read_bytes())
    os.symlink(tmp_path / "outside.safetensors", base / "link.safetensors")
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    err = merge_fails(base, ADAPTERS / "llama-lora-bias", tmp_path)
    assert "model.safetensors.index.json" in err
    assert ("missing" in err) if shard.startswith("missing") else ("outside the checkpoint folder" in err)


def test_index_names_tensor_its_shard_lacks(tmp_path):
    base = copy_fixture("model", "llama-untied", tmp_path)
    index_path = base / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    err = merge_fails(base, ADAPTERS / "llama-lora-bias", tmp_path)
    assert "model.layers.9.mlp.up_proj.weight" in err


def test_empty_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no model.safetensors" in merge_fails(tmp_path / "empty", ADAPTERS / "llama-lora", tmp_path)
    assert "no adapter_config.json" in merge_fails(MODELS / "llama-tied", tmp_path / "empty", tmp_path)


def test_missing_inputs(tmp_path):
    assert "no such file or folder" in merge_fails(tmp_path / "nope", ADAPTERS / "llama-lora", tmp_path)


def test_pickle_adapter_is_refused_unless_allowed(tmp_path):
    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    with SafetensorsFile(ad / "adapter_model.safetensors") as f:
        tensors = {k: f.read(k) for k in f.keys()}
    (ad / "adapter_model.safetensors").unlink()
    torch.save(tensors, ad / "adapter_model.bin")
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert "adapter_model.bin" in err and "--allow-pickle" in err
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(ad), str(tmp_path / "out"), "-q", "--allow-pickle"])
    assert res.exit_code == 0, res.output


def test_malicious_pickle_is_not_executed_even_when_allowed(tmp_path):
    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    (ad / "adapter_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Evil()}, ad / "adapter_model.bin")
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path, "--allow-pickle")
    assert "weights_only=True" in err and not (tmp_path / "pwned").exists()


def test_nan_in_adapter_fails_midway_and_leaves_nothing(tmp_path):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    ad = adapter_with_tensors(tmp_path, "llama-lora", lambda t: t[key].__setitem__((0, 0), float("nan")))
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert "NaN" in err and key in err


def test_lora_bias_without_base_bias(tmp_path):
    err = merge_fails(MODELS / "llama-tied", ADAPTERS / "llama-lora-bias", tmp_path)
    assert "not in the base checkpoint" in err or "has no" in err


def test_grouped_conv_is_refused(tmp_path):
    base = tmp_path / "base"
    base.mkdir()
    save_file({"conv.weight": torch.randn(8, 2, 3, 3)}, base / "model.safetensors")
    ad = tmp_path / "ad"
    ad.mkdir()
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"base_model.model.conv.lora_A.weight": torch.randn(2, 8, 3, 3),
               "base_model.model.conv.lora_B.weight": torch.randn(8, 2, 1, 1)}, ad / "adapter_model.safetensors")
    err = merge_fails(base, ad, tmp_path)
    assert "grouped convolutions are not supported" in err


# ---- numbers and nesting every JSON reader refuses (core/strict_json.py): one parser, so one class of tests ----

JSON_LIES = {  # name -> (raw JSON literal, the cause the error must give)
    "int_309_digits": ("1" + "0" * 308, "integer with 309 digits is out of range"),  # just over a float's range
    "int_400_digits": ("1" + "0" * 399, "integer with 400 digits is out of range"),
    "int_minus_400_digits": ("-1" + "0" * 399, "integer with 400 digits is out of range"),
    "int_4301_digits": ("9" * 4301, "integer with 4301 digits is out of range"),  # past Python's int-string limit
    "int_2p64": (str(2**64), f"integer {2**64} is out of range"),
    "int_minus_2p64": (str(-(2**64)), f"integer {-(2**64)} is out of range"),
    "float_1e400": ("1e400", "number 1e400 is out of range"),
    "float_minus_1e400": ("-1e400", "number -1e400 is out of range"),
    "float_long_overflow": ("1" * 400 + ".5", "is out of range: over the largest float"),
    "nested_arrays_100": ("[" * 99 + "]" * 99, "nested deeper than 64 levels"),
    "nested_objects_100": ('{"a": ' * 99 + "1" + "}" * 99, "nested deeper than 64 levels"),
}


def _json_with(path, literal: str) -> None:
    """A JSON file with one more top-level key whose value is the raw literal."""
    data = json.loads(path.read_text())
    data["adapterops_test"] = "__LIE__"
    path.write_text(json.dumps(data).replace('"__LIE__"', literal))


def _header_with(path, literal: str) -> None:
    """A safetensors file whose first tensor entry has one more field holding the raw literal (the data kept)."""
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header[next(k for k in header if k != "__metadata__")]["adapterops_test"] = "__LIE__"
    raw = json.dumps(header).replace('"__LIE__"', literal).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


JSON_SLOTS = {  # name -> (base fixture or None for the adapter, file, how the literal goes in)
    "adapter_config": (None, "adapter_config.json", _json_with),
    "adapter_header": (None, "adapter_model.safetensors", _header_with),
    "base_config": ("llama-tied", "config.json", _json_with),
    "base_header": ("llama-tied", "model.safetensors", _header_with),
    "base_index": ("llama-untied", "model.safetensors.index.json", _json_with),
    "base_shard_header": ("llama-untied", "model-00002-of-00002.safetensors", _header_with),
}


@pytest.mark.parametrize("slot", list(JSON_SLOTS))
@pytest.mark.parametrize("lie", list(JSON_LIES))
def test_json_number_or_nesting_refused_by_the_parser(lie, slot, tmp_path):
    """Refused where parsed, with the reason, in every JSON text merge reads: an integer of 309+ digits used to pass
    and break math.isfinite (OverflowError), 1e400 became infinity, 480 levels overflowed a recursive walker."""
    literal, cause = JSON_LIES[lie]
    fixture, name, plant = JSON_SLOTS[slot]
    base = copy_fixture("model", fixture, tmp_path) if fixture else MODELS / "llama-tied"
    adapter = ADAPTERS / "llama-lora" if fixture else copy_fixture("adapter", "llama-lora", tmp_path)
    broken = (base if fixture else adapter) / name
    plant(broken, literal)
    err = merge_fails(base, adapter, tmp_path)
    assert str(broken) in err and cause in err, err


def test_json_numbers_and_nesting_at_the_limits_are_accepted(tmp_path):
    """The bounds are the limits, not below them: 2**64-1, the largest float, 64 levels (the object itself is one)."""
    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    cfg = ad / "adapter_config.json"
    data = json.loads(cfg.read_text())
    data.update(big="__BIG__", small="__SMALL__", huge=1.7e308, tiny="__TINY__", deep="__DEEP__")
    cfg.write_text(json.dumps(data).replace('"__BIG__"', str(2**64 - 1)).replace('"__SMALL__"', str(-(2**64 - 1)))
                   .replace('"__TINY__"', "1e-400").replace('"__DEEP__"', "[" * 63 + "]" * 63))
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(ad), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    data["deep"] = "__DEEP__"
    cfg.write_text(json.dumps(data).replace('"__DEEP__"', "[" * 64 + "]" * 64))  # one level more
    (tmp_path / "again").mkdir()
    assert "nested deeper than 64 levels" in merge_fails(MODELS / "llama-tied", ad, tmp_path / "again")


P = "base_model.model."
Q_PROJ = "model.layers.0.self_attn.q_proj"


DOWN = "model.layers.0.mlp.down_proj"
K_PROJ = "model.layers.0.self_attn.k_proj"
# fixture, a tensor it has, a second name for the same thing, the new tensor's values, the role the error names
TWO_NAMES = {
    # the same factor with and without PEFT's prefix: the last in file order used to win
    "unprefixed_lora_A": ("llama-lora", f"{P}{Q_PROJ}.lora_A.weight", f"{Q_PROJ}.lora_A.weight", lambda t: t * 2,
                          f"lora_A.weight of module {Q_PROJ}"),
    "unprefixed_lora_B": ("llama-lora", f"{P}{Q_PROJ}.lora_B.weight", f"{Q_PROJ}.lora_B.weight", lambda t: t.clone(),
                          f"lora_B.weight of module {Q_PROJ}"),
    # a trained bias as `X.base_layer.bias` and as `X.bias`: both replace base tensor X.bias
    "base_layer_and_plain_bias": ("llama-lora-bias", f"{P}{Q_PROJ}.base_layer.bias", f"{P}{Q_PROJ}.bias", lambda t: t + 1,
                                  f"a replacement for base tensor {Q_PROJ}.bias"),
    "unprefixed_replacement": ("llama-lora-bias", f"{P}{K_PROJ}.bias", f"{K_PROJ}.bias", lambda t: t.clone(),
                               f"a replacement for base tensor {K_PROJ}.bias"),
    # DoRA's magnitude under both names PEFT has used
    "magnitude_with_and_without_weight": ("llama-dora", f"{P}{DOWN}.lora_magnitude_vector",
                                          f"{P}{DOWN}.lora_magnitude_vector.weight", lambda t: t * 3,
                                          f"lora_magnitude_vector of module {DOWN}"),
}


@pytest.mark.parametrize("case", list(TWO_NAMES))
def test_two_tensors_for_one_role_are_refused_naming_both(tmp_path, case):
    fixture, original, twin, make, role = TWO_NAMES[case]
    ad = adapter_with_tensors(tmp_path, fixture, lambda t: t.__setitem__(twin, make(t[original])))
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert f"are both {role}" in err and f"'{original}'" in err and f"'{twin}'" in err, err


def test_embedding_module_with_linear_factors_too_is_refused(tmp_path):
    """lora_embedding_A/B and lora_A/B on one module: the Linear pair used to be dropped without a word."""
    emb = f"{P}model.embed_tokens"
    ad = adapter_with_tensors(tmp_path, "llama-embedding", lambda t: t.update({
        f"{emb}.lora_A.weight": torch.randn(4, 64), f"{emb}.lora_B.weight": torch.randn(128, 4)}))
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert "both embedding factors" in err and f"{emb}.lora_A.weight" in err, err


def test_trainable_tokens_under_two_names_are_refused(tmp_path):
    delta = "model.embed_tokens.token_adapter.trainable_tokens_delta"
    ad = adapter_with_tensors(tmp_path, "llama-lora", lambda t: t.update({
        P + delta: torch.randn(2, 64), delta: torch.randn(2, 64)}))
    edit_json(ad / "adapter_config.json", trainable_token_indices=[1, 2])
    err = merge_fails(MODELS / "llama-tied", ad, tmp_path)
    assert "trainable tokens of module model.embed_tokens" in err and delta in err and P + delta in err, err


@pytest.mark.parametrize("field,value", [("lora_alpha", 10**400), ("lora_alpha", -(10**5000)), ("r", 10**5000), ("r", 2**64),
                                         ("rank_pattern", {"q_proj": 10**400}), ("alpha_pattern", {"q_proj": 2**1100})],
                         ids=["alpha_1e400", "alpha_minus_5000_digits", "r_5000_digits", "r_2p64", "rank_pattern_1e400",
                              "alpha_pattern_2p1100"])
def test_config_numbers_of_any_size_are_errors_not_exceptions(tmp_path, field, value):
    """The number checks run on the parsed config: an integer too large for a float (or for str()) is the usual error,
    never an OverflowError or ValueError from the check itself, whatever the JSON reader lets through."""
    from adapterops.errors import AdapteropsError
    from adapterops.io.adapter import _check_config

    cfg = json.loads((ADAPTERS / "llama-lora" / "adapter_config.json").read_text())
    cfg[field] = value
    with pytest.raises(AdapteropsError) as err:
        _check_config(cfg, tmp_path / "adapter_config.json")
    assert field in str(err.value) and len(str(err.value)) < 300, str(err.value)


@pytest.mark.parametrize("size", ["1" * 400, "1" * 400 + ".5GB", "9" * 25 + "TiB", "0", "0B", "0.4", "5iB", "5 xB", "-5GB",
                                  "1e400", "inf", "nan"])
def test_absurd_max_shard_size_is_refused(size, tmp_path):
    """Read exactly (no float: 400 digits cannot overflow), and refused below one byte or above 1 EiB."""
    err = merge_fails(MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path, "--max-shard-size", size)
    assert "size" in err and ("less than one byte" in err or "over 1 EiB" in err or "cannot read size" in err), err


@pytest.mark.parametrize("size", [True, 0, -1, 2**70, 1.5])
def test_absurd_max_shard_size_is_refused_by_the_library(size, tmp_path):
    """The library call (and a batch manifest's integer) takes byte counts: checked the same way."""
    import adapterops

    with pytest.raises(adapterops.AdapteropsError, match="size"):
        adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-lora"], tmp_path / "out", max_shard_size=size)
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "hpu", "cpu:3", "cuda:" + "9" * 20, "cuda:9999", "CPU", ""])
@pytest.mark.parametrize("command", ["merge", "quantize", "extract"])
def test_devices_other_than_cpu_cuda_auto_are_refused_up_front(device, command, tmp_path):
    """torch.device parses meta, mps, xpu, ...: their tensors failed deep inside the work (tracebacks), and meta's
    hold nothing at all. Only cpu, cuda, cuda:N (a visible one) and auto are taken."""
    argv = {"merge": ["merge", MODELS / "llama-tied", ADAPTERS / "llama-lora"], "quantize": ["quantize", MODELS / "llama-tied"],
            "extract": ["extract", MODELS / "llama-tied", MODELS / "llama-untied"]}[command]
    extra = ["--rank", "2"] if command == "extract" else []
    res = CliRunner().invoke(cli, [str(a) for a in argv] + [str(tmp_path / "out"), "-q", "--device", device, *extra])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("error: ") and "\n" not in err, res.output
    assert "unknown device" in err or "CUDA is not available" in err or "no CUDA device" in err, err
    assert leftovers(tmp_path) == []


# ---- a scale so large that s·B·A overflows float32: every command that takes the adapter says so, no traceback ----

HUGE_SCALE_RUNS = {  # name -> argv after the command name (AD: the adapter with lora_alpha 1.7e308, OUT: the output)
    "analyze": ["analyze", "AD"],
    "analyze_compare": ["analyze", str(ADAPTERS / "llama-lora"), "--compare", "AD"],
    "rerank": ["rerank", "AD", "OUT", "--rank", "2"],
    "rerank_energy": ["rerank", "AD", "OUT", "--energy", "0.9"],
    "stack_svd": ["stack", "AD", str(ADAPTERS / "llama-lora"), "OUT", "--method", "svd", "--rank", "4"],
    "stack_ties": ["stack", "AD", str(ADAPTERS / "llama-lora"), "OUT", "--method", "ties_svd", "--compat", "exact",
                   "--density", "0.5", "--rank", "4"],
    "merge": ["merge", str(MODELS / "llama-tied"), "AD", "OUT"],
    "convert_vllm": ["convert", "AD", "OUT", "--for", "vllm"],
    "check_vllm": ["check", "AD", "--for", "vllm"],
}


@pytest.mark.parametrize("case", sorted(HUGE_SCALE_RUNS))
def test_a_scale_that_overflows_float32_is_one_error_line(case, tmp_path):
    """lora_alpha = 1.7e308 is a finite JSON number, so the config check passes it; s·B·A then overflows float32.
    analyze and rerank used to end in a LinAlgError traceback from the SVD of the overflowed core. Every command
    either refuses with one line naming the adapter's config and the scale (exit 2, nothing written) or, where it
    never forms ΔW (check, and convert's re-layout for an engine, which copies the factors and α as they are),
    succeeds; never a traceback."""
    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    edit_json(ad / "adapter_config.json", lora_alpha=1.7e308)
    argv = [str(ad) if a == "AD" else str(tmp_path / "out") if a == "OUT" else a for a in HUGE_SCALE_RUNS[case]]
    before = tree_hash(ad)
    res = CliRunner().invoke(cli, argv)
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit), res.output
    assert tree_hash(ad) == before
    if res.exit_code == 2:
        err = res.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err, err
        assert "overflow" in err and "adapter_config.json" in err, err
        assert not (tmp_path / "out").exists()
    else:
        assert case.split("_")[0] in ("check", "convert") and res.exit_code in (0, 1), (res.exit_code, res.output)
