"""The bad-input corpus: every broken checkpoint and adapter, through every command that reads one.

Each case is generated from a fixture (small, in tmp_path). For each (command, case) pair: exit code 2, a single
`error: ...` line naming the broken file, no output and no temporary folder left beside it, every input unchanged
(hashed before and after). The corpus: 14 checkpoint cases × 9 command slots (126 pairs) and 12 adapter cases ×
8 commands, of which 79 pairs are errors; of the other 17, inspect describes 5 unusable adapters with a warning
(exit 1), and 12 do not apply (analyze/inspect report NaN as warnings; diff compares tensor files only).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, copy_fixture, edit_json, tree_hash

from adapterops.cli import cli
from adapterops.io.safetensors_io import SafetensorsFile, save_file


def _rewrite_header(f: Path, change) -> None:
    """Rewrite a safetensors header through change(header_dict), keeping the data."""
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    change(header)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _bytes_edit(f: Path, edit) -> Path:
    f.write_bytes(edit(f.read_bytes()))
    return f


# ---- broken checkpoints: each builder returns (folder to pass, the file the error must name) ----

def ck_truncated_data(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    return base, _bytes_edit(base / "model.safetensors", lambda d: d[:-1000])


def ck_truncated_header(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    return base, _bytes_edit(base / "model.safetensors", lambda d: d[:30])


def ck_huge_header_length(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    return base, _bytes_edit(base / "model.safetensors", lambda d: struct.pack("<Q", 2**62) + d[8:])


def ck_lying_offsets(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    f = base / "model.safetensors"
    _rewrite_header(f, lambda h: h[_first_tensor(h)]["data_offsets"].__setitem__(1, 10**9))
    return base, f


def ck_header_bad_json(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    return base, _bytes_edit(base / "model.safetensors", lambda d: d[:8] + b"{'" + d[10:])


def ck_unknown_dtype(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    f = base / "model.safetensors"
    _rewrite_header(f, lambda h: h[_first_tensor(h)].__setitem__("dtype", "Q4_K"))
    return base, f


def ck_shape_lies(tmp):
    base = copy_fixture("model", "llama-tied", tmp)
    f = base / "model.safetensors"
    _rewrite_header(f, lambda h: h[_first_tensor(h)].__setitem__("shape", [3, 3]))
    return base, f


def _index_case(tmp, shard: str):
    base = copy_fixture("model", "llama-untied", tmp)
    (tmp / "outside.safetensors").write_bytes((base / "model-00001-of-00002.safetensors").read_bytes())
    os.symlink(tmp / "outside.safetensors", base / "link.safetensors")
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"][next(iter(data["weight_map"]))] = shard
    index.write_text(json.dumps(data))
    return base, index


def ck_index_missing_shard(tmp):
    return _index_case(tmp, "model-00009-of-00009.safetensors")


def ck_index_dotdot(tmp):
    return _index_case(tmp, "../outside.safetensors")


def ck_index_absolute(tmp):
    return _index_case(tmp, str(tmp / "outside.safetensors"))


def ck_index_symlink(tmp):
    return _index_case(tmp, "link.safetensors")


def ck_index_bad_json(tmp):
    base = copy_fixture("model", "llama-untied", tmp)
    return base, _bytes_edit(base / "model.safetensors.index.json", lambda d: d[:-5])


def ck_empty_folder(tmp):
    (tmp / "empty-model").mkdir()
    return tmp / "empty-model", tmp / "empty-model"


def _as_pickle(folder: Path, safetensors_name: str, pickle_name: str) -> tuple[Path, Path]:
    """Replace a folder's safetensors file by a torch pickle of the same tensors."""
    with SafetensorsFile(folder / safetensors_name) as f:
        tensors = {k: f.read(k).clone() for k in f.keys()}
    (folder / safetensors_name).unlink()
    torch.save(tensors, folder / pickle_name)
    return folder, folder / pickle_name


def ck_pickle_only(tmp):
    return _as_pickle(copy_fixture("model", "llama-tied", tmp), "model.safetensors", "pytorch_model.bin")


CHECKPOINT_CASES = [ck_truncated_data, ck_truncated_header, ck_huge_header_length, ck_lying_offsets, ck_header_bad_json,
                    ck_unknown_dtype, ck_shape_lies, ck_index_missing_shard, ck_index_dotdot, ck_index_absolute,
                    ck_index_symlink, ck_index_bad_json, ck_empty_folder, ck_pickle_only]


# ---- broken adapters ----

def ad_truncated(tmp):
    ad = copy_fixture("adapter", "llama-lora", tmp)
    return ad, _bytes_edit(ad / "adapter_model.safetensors", lambda d: d[:-100])


def ad_huge_header_length(tmp):
    ad = copy_fixture("adapter", "llama-lora", tmp)
    return ad, _bytes_edit(ad / "adapter_model.safetensors", lambda d: struct.pack("<Q", 2**40) + d[8:])


def ad_config_bad_json(tmp):
    ad = copy_fixture("adapter", "llama-lora", tmp)
    return ad, _bytes_edit(ad / "adapter_config.json", lambda d: d.replace(b'"r":', b'"r" '))


def ad_other_peft_type(tmp):
    """A tuner that neither PEFT nor adapterops can merge (prompt tuning learns virtual tokens, not weights); IA3,
    LoHa, LoKr and VeRA are merged since issue 12 (tests/test_tuners.py)."""
    ad = copy_fixture("adapter", "llama-lora", tmp)
    edit_json(ad / "adapter_config.json", peft_type="PREFIX_TUNING")
    return ad, ad / "adapter_config.json"


def ad_invalid_regex(tmp):
    ad = copy_fixture("adapter", "llama-lora", tmp)
    edit_json(ad / "adapter_config.json", rank_pattern={"q_proj(": 4})
    return ad, ad / "adapter_config.json"


def _tensor_edit(tmp, edit):
    ad = copy_fixture("adapter", "llama-lora", tmp)
    f = ad / "adapter_model.safetensors"
    with SafetensorsFile(f) as sf:
        tensors = {k: sf.read(k).clone() for k in sf.keys()}
    edit(tensors)
    save_file(tensors, f, {"format": "pt"})
    return ad, f


def ad_nan(tmp):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    return _tensor_edit(tmp, lambda t: t[key].__setitem__((0, 0), float("nan")))


def ad_inf(tmp):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    return _tensor_edit(tmp, lambda t: t[key].__setitem__((0, 0), float("inf")))


def ad_rank_mismatch(tmp):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    return _tensor_edit(tmp, lambda t: t.__setitem__(key, torch.zeros(64, 5)))


def ad_missing_lora_b(tmp):
    return _tensor_edit(tmp, lambda t: t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"))


def ad_config_rank_disagrees(tmp):
    ad = copy_fixture("adapter", "llama-lora", tmp)
    edit_json(ad / "adapter_config.json", r=4)
    return ad, ad / "adapter_model.safetensors"


def ad_empty_folder(tmp):
    (tmp / "empty-adapter").mkdir()
    return tmp / "empty-adapter", tmp / "empty-adapter"


def ad_pickle_only(tmp):
    return _as_pickle(copy_fixture("adapter", "llama-lora", tmp), "adapter_model.safetensors", "adapter_model.bin")


ADAPTER_CASES = [ad_truncated, ad_huge_header_length, ad_config_bad_json, ad_other_peft_type, ad_invalid_regex, ad_nan,
                 ad_inf, ad_rank_mismatch, ad_missing_lora_b, ad_config_rank_disagrees, ad_empty_folder, ad_pickle_only]
# analyze and inspect exist to report NaN/Inf (as warnings, exit 1 with --strict / inspect): not errors for them.
# diff compares tensor files only: a config, NaN (a value like any other) or a missing tensor (exit 1) is not bad input.
REPORTS_NAN = {"analyze", "inspect"}
DIFF_CASES = {"truncated", "huge_header_length", "empty_folder", "pickle_only"}
# inspect describes an adapter no command can use (config and tensors disagree, another PEFT type) with a warning
INSPECT_WARNS = {"other_peft_type", "invalid_regex", "rank_mismatch", "missing_lora_b", "config_rank_disagrees"}


# ---- commands: (name, argv builder given the broken path, whether it writes OUT) ----

def _ckpt_commands(good_adapter: Path):
    return {
        "merge": (lambda p, out: ["merge", p, good_adapter, out], True),
        "unmerge": (lambda p, out: ["unmerge", p, good_adapter, out], True),
        "quantize": (lambda p, out: ["quantize", p, out], True),
        "dequantize": (lambda p, out: ["dequantize", p, out], True),
        "extract-base": (lambda p, out: ["extract", p, MODELS / "llama-tied", out, "--rank", "2"], True),
        "extract-tuned": (lambda p, out: ["extract", MODELS / "llama-tied", p, out, "--rank", "2"], True),
        "inspect": (lambda p, out: ["inspect", p, "--scan"], False),
        "diff": (lambda p, out: ["diff", p, MODELS / "llama-tied"], False),
        "analyze-base": (lambda p, out: ["analyze", good_adapter, "--base", p], False),
    }


ADAPTER_COMMANDS = {
    "merge": (lambda p, out: ["merge", MODELS / "llama-tied", p, out], True),
    "unmerge": (lambda p, out: ["unmerge", MODELS / "llama-tied", p, out], True),
    "rescale": (lambda p, out: ["rescale", p, out, "--to", "rslora"], True),
    "rerank": (lambda p, out: ["rerank", p, out, "--rank", "2"], True),
    "stack": (lambda p, out: ["stack", ADAPTERS / "llama-rslora-patterns", p, out], True),
    "analyze": (lambda p, out: ["analyze", p], False),
    "inspect": (lambda p, out: ["inspect", p], False),
    "diff": (lambda p, out: ["diff", p, ADAPTERS / "llama-lora"], False),
}


def fails_cleanly(argv, broken: Path, inputs: list[Path], tmp: Path, writes: bool) -> str:
    """Run a command that must refuse; check the contract and return its error line."""
    before = [tree_hash(p) if p.is_dir() else p.read_bytes() for p in inputs]
    res = CliRunner().invoke(cli, [str(a) for a in argv] + (["-q"] if writes and argv[0] not in ("rescale", "rerank", "stack") else []))
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in res.output, res.output
    assert broken.name in err, err
    if writes:
        assert not (tmp / "out").exists() and not [p for p in tmp.iterdir() if ".adapterops-tmp-" in p.name]
    assert [tree_hash(p) if p.is_dir() else p.read_bytes() for p in inputs] == before
    return err


@pytest.mark.parametrize("case", CHECKPOINT_CASES, ids=[c.__name__[3:] for c in CHECKPOINT_CASES])
@pytest.mark.parametrize("command", list(_ckpt_commands(Path("x"))))
def test_broken_checkpoint(case, command, tmp_path):
    path, broken = case(tmp_path)
    argv, writes = _ckpt_commands(ADAPTERS / "llama-lora")[command]
    fails_cleanly(argv(path, tmp_path / "out"), broken, [path], tmp_path, writes)


def _applies(command: str, case) -> bool:
    """Whether a command must refuse this broken adapter: analyze and inspect report NaN/Inf as warnings (tested in
    their own files), diff compares tensors only, and inspect describes unusable adapters with a warning
    (test_inspect_warns_about_unusable_adapters)."""
    name = case.__name__[3:]
    if command in REPORTS_NAN and case in (ad_nan, ad_inf):
        return False
    if command == "diff" and name not in DIFF_CASES:
        return False
    return not (command == "inspect" and name in INSPECT_WARNS)


ADAPTER_PAIRS = [(case, command) for case in ADAPTER_CASES for command in ADAPTER_COMMANDS if _applies(command, case)]


@pytest.mark.parametrize("case,command", ADAPTER_PAIRS, ids=[f"{cmd}-{c.__name__[3:]}" for c, cmd in ADAPTER_PAIRS])
def test_broken_adapter(case, command, tmp_path):
    path, broken = case(tmp_path)
    argv, writes = ADAPTER_COMMANDS[command]
    fails_cleanly(argv(path, tmp_path / "out"), broken, [path], tmp_path, writes)


def test_corpus_size():
    """The closing note quotes these counts."""
    assert len(CHECKPOINT_CASES) == 14 and len(_ckpt_commands(Path("x"))) == 9
    assert len(ADAPTER_CASES) == 12 and len(ADAPTER_COMMANDS) == 8 and len(ADAPTER_PAIRS) == 79


@pytest.mark.parametrize("case", [c for c in ADAPTER_CASES if c.__name__[3:] in INSPECT_WARNS], ids=lambda c: c.__name__[3:])
def test_inspect_warns_about_unusable_adapters(case, tmp_path):
    path, _ = case(tmp_path)
    before = tree_hash(path)
    res = CliRunner().invoke(cli, ["inspect", str(path)])
    assert res.exit_code == 1, res.output
    assert "not usable" in res.stdout and "warning: cannot be used: " in res.stdout and "tensors: " in res.stdout
    assert tree_hash(path) == before

