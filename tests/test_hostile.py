"""Hostile inputs (issue 17), class by class, through every command that reads that kind of input.

This extends the corpus of tests/test_corpus.py with its own machinery (`fails_cleanly`, the command slots): each
broken input must give exactly one `error:` line naming the file, exit 2, no output, inputs unchanged, and no
traceback. Every case runs under a SIGALRM deadline, so a hang (a ReDoS pattern key, say) fails instead of
stalling CI. Each broken input is built once per module and shared (the contract checks that no command changes
it).

Classes: 1. rank/alpha pattern keys with catastrophic backtracking (and over-long or too many keys);
2. safetensors header and shape lies (and base weights that cannot take a LoRA); 3. adapter configs that lie;
4. NF4 checkpoints whose quant state lies.
"""

from __future__ import annotations

import json
import shutil
import signal
import struct
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, copy_fixture, read_file, tree_hash
from test_corpus import (
    ADAPTER_COMMANDS,
    _ckpt_commands,
    _first_tensor,
    _rewrite_header,
    fails_cleanly,
)

from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file

DEADLINE_S = 60  # far above any case (most take well under a second): only a hang reaches it
PATTERN_S = 2.0  # a refused pattern key must be refused at once, not after trying it


@contextmanager
def deadline(seconds: int):
    """Raise TimeoutError in the main thread after `seconds` (re's matcher checks for signals, so ReDoS too)."""

    def expired(*_):
        raise TimeoutError(f"no answer within {seconds} s: a hang")

    old = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Built:
    """Broken inputs built lazily, once per module, in one shared folder."""

    def __init__(self, root: Path):
        self.root, self.cache = root, {}

    def get(self, name: str, build):
        if name not in self.cache:
            d = self.root / name
            d.mkdir()
            self.cache[name] = build(d)
        return self.cache[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("hostile"))


def run_refused(argv, broken: Path, inputs: list[Path], tmp: Path, writes: bool) -> str:
    with deadline(DEADLINE_S):
        return fails_cleanly(argv, broken, inputs, tmp, writes)


# ============ class 1: pattern keys with catastrophic backtracking ============

REDOS_KEYS = [
    r"([\w.]|[\w.])*Z",  # the example
    r"(a+)+",
    r"(a|a)*",
    r"(a|aa)+",
    r"(.*)*",
    r"(\w+\.?)+$",
    r"((a+)b)*",
    r"(?:(?:a*)*)*x",
    r"(x+x+)+y",
    r"(.*a){12}",
    r"(ab?)*c",
    r"(q_proj|q_proj)*Z",
    r"(\d+|\w+)+Z",
    r".*.*.*.*.*.*Z",  # polynomial: a degree-7 match with PEFT's own (.*\.)? prefix
    r"(a)\1",  # backreference
    r"(?:[a-z]{1,9}){1,9}Z",
]
OTHER_KEYS = {
    "long_key": "|".join(f"layers\\.{i}\\.q_proj" for i in range(400)),  # over the key-length limit
    "empty_key": "",
}


def _pattern_config(kind: str, keys: dict) -> dict:
    cfg = json.loads((ADAPTERS / "llama-lora" / "adapter_config.json").read_text())
    cfg[kind] = keys
    return cfg


def _adapter_with_config(d: Path, cfg_text: str | bytes, base: str = "llama-lora") -> tuple[Path, Path]:
    ad = copy_fixture("adapter", base, d)
    f = ad / "adapter_config.json"
    f.write_bytes(cfg_text if isinstance(cfg_text, bytes) else cfg_text.encode("utf-8"))
    return ad, f


PATTERN_CASES = {f"redos{i}_{'rank' if i % 2 else 'alpha'}": ("rank_pattern" if i % 2 else "alpha_pattern", {k: 8 if i % 2 else 16})
                 for i, k in enumerate(REDOS_KEYS)}
PATTERN_CASES.update({name: ("rank_pattern", {k: 8}) for name, k in OTHER_KEYS.items()})
PATTERN_CASES["too_many_keys"] = ("alpha_pattern", {f"^model\\.layers\\.{i}\\.q_proj$": 16 for i in range(70_000)})
# a ReDoS key placed after an ordinary key that matches: every key is checked, not only the one that wins
PATTERN_CASES["redos_after_ordinary"] = ("rank_pattern", {"q_proj": 8, r"(a|aa)+$": 8})
WRITING_SLOTS = [c for c in ADAPTER_COMMANDS if c not in ("inspect", "diff")]  # diff compares tensors only


@pytest.mark.parametrize("command", WRITING_SLOTS)
@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_pattern_key_refused_quickly(case, command, built, tmp_path):
    kind, keys = PATTERN_CASES[case]
    ad, cfg = built.get(f"pat-{case}", lambda d: _adapter_with_config(d, json.dumps(_pattern_config(kind, keys))))
    argv, writes = ADAPTER_COMMANDS[command]
    t0 = time.monotonic()
    err = run_refused(argv(ad, tmp_path / "out"), cfg, [ad], tmp_path, writes)
    assert time.monotonic() - t0 < PATTERN_S, f"took {time.monotonic() - t0:.1f} s"
    assert kind in err, err


@pytest.mark.parametrize("case", list(PATTERN_CASES))
def test_inspect_reports_pattern_key_quickly(case, built):
    """inspect describes an adapter no command can use with a warning (exit 1), as for any invalid regex."""
    kind, keys = PATTERN_CASES[case]
    ad, _ = built.get(f"pat-{case}", lambda d: _adapter_with_config(d, json.dumps(_pattern_config(kind, keys))))
    t0 = time.monotonic()
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["inspect", str(ad)])
    assert time.monotonic() - t0 < PATTERN_S
    assert res.exit_code == 1 and "warning: cannot be used: " in res.stdout and kind in res.stdout, res.output


def test_redos_key_in_a_subprocess_is_refused_within_2s(built, tmp_path):
    """The issue's own reproduction, as a user runs it: a real process, killed if it hangs."""
    kind, keys = PATTERN_CASES["redos0_alpha"]
    ad, cfg = built.get("pat-redos0_alpha", lambda d: _adapter_with_config(d, json.dumps(_pattern_config(kind, keys))))
    code = "import sys; from adapterops.cli import cli; sys.argv[0] = 'adapterops'; cli()"
    res = subprocess.run([sys.executable, "-c", code, "rescale", str(ad), str(tmp_path / "out"), "--to", "rslora"],
                         capture_output=True, text=True, timeout=DEADLINE_S)
    assert res.returncode == 2 and res.stderr.count("error: ") == 1 and cfg.name in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out").exists()


NAME_PATTERN_SLOTS = {  # the command-line patterns that pick modules by name: the same rule as pattern keys
    "quantize-skip": lambda key, out: ["quantize", MODELS / "llama-tied", out, "-q", "--skip", key],
    "extract-target": lambda key, out: ["extract", MODELS / "llama-tied", MODELS / "llama-untied", out, "--rank", "2", "-q",
                                        "--target", key],
}


@pytest.mark.parametrize("slot", list(NAME_PATTERN_SLOTS))
@pytest.mark.parametrize("key", REDOS_KEYS, ids=range(len(REDOS_KEYS)))
def test_module_name_pattern_refused_quickly(key, slot, tmp_path):
    t0 = time.monotonic()
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, [str(a) for a in NAME_PATTERN_SLOTS[slot](key, tmp_path / "out")])
    assert time.monotonic() - t0 < PATTERN_S, f"took {time.monotonic() - t0:.1f} s"
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("error: --") and "refused" in err and "\n" not in err, res.output
    assert not (tmp_path / "out").exists()


ORDINARY_PATTERNS = [
    "q_proj",
    r".*\.q_proj",
    "model.layers.0.self_attn.q_proj",
    r"layers\.(0|1)\.self_attn\.q_proj",
    r"^.*(q|v)_proj$",
    r"model\.layers\.\d+\.self_attn\.(q|k|v)_proj",
    r".*\.layers\.\d+\..*_proj",
    r"^model\.layers\.0\.mlp\.down_proj$",
    r"(?:up|down|gate)_proj",
    r"layers\.[0-9]+\.mlp\.(gate|up)_proj",
]


@pytest.mark.parametrize("key", ORDINARY_PATTERNS)
def test_ordinary_patterns_still_merge(key, tmp_path):
    """Every pattern PEFT users write still works: same rank, doubled alpha → merge runs and the key is used."""
    cfg = _pattern_config("rank_pattern", {key: 8})
    cfg["alpha_pattern"] = {key: 32}
    ad, _ = _adapter_with_config(tmp_path, json.dumps(cfg))
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(ad), str(tmp_path / "out"), "-q", "--json"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "model.safetensors").is_file()


# ============ class 2: safetensors header and shape lies ============

def _ck(d: Path, change) -> tuple[Path, Path]:
    base = copy_fixture("model", "llama-tied", d)
    f = base / "model.safetensors"
    _rewrite_header(f, change)
    return base, f


def _ck_bytes(d: Path, edit) -> tuple[Path, Path]:
    base = copy_fixture("model", "llama-tied", d)
    f = base / "model.safetensors"
    f.write_bytes(edit(f.read_bytes()))
    return base, f


def _raw_header(d: Path, edit_text) -> tuple[Path, Path]:
    """Rewrite the header as text (for what json.dumps cannot write: duplicates, NaN, surrogates), keeping the data."""
    def edit(data: bytes) -> bytes:
        (n,) = struct.unpack("<Q", data[:8])
        raw = edit_text(json.dumps(json.loads(data[8:8 + n]))).encode()  # ", " and ": " separators from here on
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:]
    return _ck_bytes(d, edit)


def _set(field, value):
    return lambda h: h[_first_tensor(h)].__setitem__(field, value)


def _last_tensor(h: dict) -> str:
    return max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])


def _dup_name(text: str) -> str:
    h = json.loads(text)
    first, last = _first_tensor(h), _last_tensor(h)
    entry = json.dumps(h[last])
    return text[:-1] + f', "{first}": {entry}}}'


def _zero_size_overflow(h):
    h["extra.zero"] = {"dtype": "F32", "shape": [2**62, 2**62, 0], "data_offsets": [0, 0]}


HEADER_CASES = {
    "shape_overflow_zero_dim": lambda d: _ck(d, _zero_size_overflow),
    "shape_2p40_squared": lambda d: _ck(d, _set("shape", [2**40, 2**40])),
    "shape_2p62_2p62_0": lambda d: _ck(d, _set("shape", [2**62, 2**62, 0])),
    "shape_negative": lambda d: _ck(d, _set("shape", [-64, -64])),
    "shape_float": lambda d: _ck(d, _set("shape", [64.0, 64])),
    "shape_bool": lambda d: _ck(d, _set("shape", [True, 64])),
    "shape_string": lambda d: _ck(d, _set("shape", "64x64")),
    "shape_huge_dim": lambda d: _ck(d, _set("shape", [2**64, 1])),
    "dtype_unknown": lambda d: _ck(d, _set("dtype", "Q4_K")),
    "dtype_lowercase": lambda d: _ck(d, _set("dtype", "f32")),
    "dtype_not_string": lambda d: _ck(d, _set("dtype", 7)),
    "dtype_complex": lambda d: _ck(d, _set("dtype", "C64")),
    "offsets_overlap": lambda d: _ck(d, lambda h: h[_last_tensor(h)].__setitem__(
        "data_offsets", [h[_last_tensor(h)]["data_offsets"][0] - 4, h[_last_tensor(h)]["data_offsets"][1] - 4])),
    "offsets_gap_trailing": lambda d: _ck_bytes(d, lambda b: b + b"\0" * 64),
    "offsets_reversed": lambda d: _ck(d, lambda h: h[_first_tensor(h)].__setitem__(
        "data_offsets", h[_first_tensor(h)]["data_offsets"][::-1])),
    "offsets_bool": lambda d: _ck(d, _set("data_offsets", [False, True])),
    "offsets_three": lambda d: _ck(d, _set("data_offsets", [0, 4, 8])),
    "entry_missing_shape": lambda d: _ck(d, lambda h: h[_first_tensor(h)].pop("shape")),
    "entry_not_object": lambda d: _ck(d, lambda h: h.__setitem__(_first_tensor(h), [1, 2])),
    "duplicate_tensor_name": lambda d: _raw_header(d, _dup_name),
    "duplicate_field": lambda d: _raw_header(d, lambda t: t.replace('"dtype": ', '"dtype": "F32", "dtype": ', 1)),
    "duplicate_metadata": lambda d: _raw_header(d, lambda t: '{"__metadata__": {"format": "pt"}, ' + t[1:]),
    "header_over_cap": lambda d: _ck_bytes(d, lambda b: struct.pack("<Q", 100_000_001) + b[8:]),
    "header_far_over_cap": lambda d: _ck_bytes(d, lambda b: struct.pack("<Q", 2**30) + b[8:]),
    "metadata_list": lambda d: _ck(d, lambda h: h.__setitem__("__metadata__", ["format", "pt"])),
    "metadata_int_value": lambda d: _ck(d, lambda h: h.__setitem__("__metadata__", {"format": 1})),
    "metadata_nested": lambda d: _ck(d, lambda h: h.__setitem__("__metadata__", {"format": {"pt": "x"}})),
    "metadata_string": lambda d: _ck(d, lambda h: h.__setitem__("__metadata__", "pt")),
    "header_nan": lambda d: _raw_header(d, lambda t: t.replace('"shape": [', '"shape": [NaN, ', 1)),
    "header_lone_surrogate": lambda d: _raw_header(d, lambda t: t.replace('"model.', '"\\ud800model.', 1)),
    "header_deep_nesting": lambda d: _raw_header(d, lambda t: '{"__metadata__": {"x": ' + "[" * 100_000 + "]" * 100_000 + "}, " + t[1:]),
    "header_array": lambda d: _raw_header(d, lambda t: "[" + t + "]"),
    "header_not_utf8": lambda d: _ck_bytes(d, lambda b: b[:8] + b"{\xff" + b[10:]),
}
CKPT_SLOTS = list(_ckpt_commands(Path("x")))


@pytest.mark.parametrize("command", CKPT_SLOTS)
@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_lie_refused(case, command, built, tmp_path):
    base, broken = built.get(f"hdr-{case}", HEADER_CASES[case])
    argv, writes = _ckpt_commands(ADAPTERS / "llama-lora")[command]
    err = run_refused(argv(base, tmp_path / "out"), broken, [base], tmp_path, writes)
    if case.startswith("header_over") or case == "header_far_over_cap":
        assert "over the cap of 100000000 bytes" in err, err


@pytest.mark.parametrize("case", ["duplicate_tensor_name", "offsets_gap_trailing", "shape_2p62_2p62_0", "metadata_list", "header_nan"])
def test_header_verdicts_agree_with_the_safetensors_library(case, built):
    """Where the safetensors library refuses a file, so do we (its Rust reader is the reference)."""
    safetensors = pytest.importorskip("safetensors")
    _, broken = built.get(f"hdr-{case}", HEADER_CASES[case])
    with pytest.raises(Exception):
        with safetensors.safe_open(str(broken), "pt") as f:
            list(f.keys())


NON_FLOAT = {"I8": torch.int8, "U8": torch.uint8, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
             "BOOL": torch.bool, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16}
TARGET = "model.layers.0.self_attn.q_proj.weight"


def _non_float_base(d: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    base = copy_fixture("model", "llama-tied", d)
    f = base / "model.safetensors"
    tensors = read_file(f)
    tensors[TARGET] = tensors[TARGET].to(dtype)
    save_file(tensors, f, {"format": "pt"})
    return base, f


@pytest.mark.parametrize("command", ["merge", "unmerge"])
@pytest.mark.parametrize("dt", list(NON_FLOAT))
def test_lora_on_non_float_base_refused(dt, command, built, tmp_path):
    base, f = built.get(f"dtype-{dt}", lambda d: _non_float_base(d, NON_FLOAT[dt]))
    argv, writes = _ckpt_commands(ADAPTERS / "llama-lora")[command]
    err = run_refused(argv(base, tmp_path / "out"), f, [base], tmp_path, writes)
    assert TARGET in err and "LoRA can only be merged into" in err, err


# ============ class 3: adapter configs that lie ============

def _cfg_edit(**changes):
    def build(d: Path):
        cfg = json.loads((ADAPTERS / "llama-lora" / "adapter_config.json").read_text())
        cfg.update(changes)
        return _adapter_with_config(d, json.dumps(cfg))
    return build


def _cfg_text(edit, base: str = "llama-lora"):
    return lambda d: _adapter_with_config(d, edit((ADAPTERS / base / "adapter_config.json").read_text()), base)


def _replace_value(key: str, literal: str):
    """Replace a top-level key's value by a raw JSON literal (NaN, 1e400, ...)."""
    def edit(text: str) -> str:
        cfg = json.loads(text)
        cfg[key] = "__PLACEHOLDER__"
        return json.dumps(cfg).replace('"__PLACEHOLDER__"', literal)
    return edit


def _dora_without_flag(d: Path):
    ad = copy_fixture("adapter", "llama-dora", d)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["use_dora"] = False
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad, ad / "adapter_model.safetensors"


def _lora_with_dora_flag(d: Path):
    ad, _ = _cfg_edit(use_dora=True)(d)
    return ad, ad / "adapter_model.safetensors"


CONFIG_CASES = {
    "alpha_nan": _cfg_text(_replace_value("lora_alpha", "NaN")),
    "alpha_infinity": _cfg_text(_replace_value("lora_alpha", "Infinity")),
    "alpha_minus_infinity": _cfg_text(_replace_value("lora_alpha", "-Infinity")),
    "alpha_1e400": _cfg_text(_replace_value("lora_alpha", "1e400")),
    "alpha_negative": _cfg_edit(lora_alpha=-16),
    "alpha_zero": _cfg_edit(lora_alpha=0),
    "alpha_string": _cfg_edit(lora_alpha="16"),
    "alpha_bool": _cfg_edit(lora_alpha=True),
    "alpha_null": _cfg_edit(lora_alpha=None),
    "r_zero": _cfg_edit(r=0),
    "r_negative": _cfg_edit(r=-8),
    "r_float": _cfg_edit(r=8.5),
    "r_float_integral": _cfg_edit(r=8.0),
    "r_huge": _cfg_edit(r=2**40),
    "r_string": _cfg_edit(r="8"),
    "r_bool": _cfg_edit(r=True),
    "r_nan": _cfg_text(_replace_value("r", "NaN")),
    "r_long_int": _cfg_text(_replace_value("r", "1" + "0" * 5000)),
    "rank_pattern_nan": _cfg_text(_replace_value("rank_pattern", '{"q_proj": NaN}')),
    "rank_pattern_inf": _cfg_text(_replace_value("rank_pattern", '{"q_proj": 1e400}')),
    "rank_pattern_float": _cfg_edit(rank_pattern={"q_proj": 8.5}),
    "rank_pattern_string": _cfg_edit(rank_pattern={"q_proj": "8"}),
    "rank_pattern_bool": _cfg_edit(rank_pattern={"q_proj": True}),
    "rank_pattern_list": _cfg_edit(rank_pattern=[["q_proj", 8]]),
    "alpha_pattern_nan": _cfg_text(_replace_value("alpha_pattern", '{"q_proj": NaN}')),
    "alpha_pattern_negative": _cfg_edit(alpha_pattern={"q_proj": -1}),
    "target_modules_int": _cfg_edit(target_modules=5),
    "target_modules_object": _cfg_edit(target_modules={"q_proj": 1}),
    "target_modules_mixed": _cfg_edit(target_modules=["q_proj", 5]),
    "peft_type_int": _cfg_edit(peft_type=5),
    "peft_type_list": _cfg_edit(peft_type=["LORA"]),
    "use_rslora_string": _cfg_edit(use_rslora="yes"),
    "use_rslora_int": _cfg_edit(use_rslora=1),
    "use_dora_string": _cfg_edit(use_dora="false"),
    "config_list": _cfg_text(lambda t: "[" + t + "]"),
    "config_string": _cfg_text(lambda t: json.dumps(t)),
    "config_null": _cfg_text(lambda t: "null"),
    "config_deep_nesting": _cfg_text(lambda t: "[" * 100_000 + "]" * 100_000),
    "config_deep_object": _cfg_text(lambda t: t[:-1].rstrip() + ', "x": ' + '{"a": ' * 50_000 + "1" + "}" * 50_000 + "}"),
    "config_duplicate_key": _cfg_text(lambda t: t.replace('"r": 8', '"r": 8, "r": 4', 1)),
    "config_duplicate_alpha": _cfg_text(lambda t: t.replace('"lora_alpha": 16', '"lora_alpha": 16, "lora_alpha": 32', 1)),
    "config_lone_surrogate": _cfg_text(lambda t: t.replace('"LORA"', '"LORA\\ud800"', 1)),
    "config_lone_surrogate_key": _cfg_text(lambda t: t[:-1].rstrip() + ', "\\udc00": 1}'),
    "config_not_utf8": lambda d: _adapter_with_config(d, b'{"r": 8, "peft_type": "\xff"}'),
}
DORA_CASES = {"use_dora_without_magnitudes": _lora_with_dora_flag, "magnitudes_without_use_dora": _dora_without_flag}


@pytest.mark.parametrize("command", WRITING_SLOTS)
@pytest.mark.parametrize("case", list(CONFIG_CASES) + list(DORA_CASES))
def test_config_lie_refused(case, command, built, tmp_path):
    ad, broken = built.get(f"cfg-{case}", CONFIG_CASES.get(case) or DORA_CASES[case])
    argv, writes = ADAPTER_COMMANDS[command]
    run_refused(argv(ad, tmp_path / "out"), broken, [ad], tmp_path, writes)


@pytest.mark.parametrize("case", list(CONFIG_CASES) + list(DORA_CASES))
def test_inspect_on_config_lie(case, built):
    """inspect: exit 2 with one error line when the config cannot be read, else exit 1 with the problem as a warning."""
    ad, broken = built.get(f"cfg-{case}", CONFIG_CASES.get(case) or DORA_CASES[case])
    before = tree_hash(ad)
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["inspect", str(ad)])
    assert "Traceback" not in res.output and res.exception is None or isinstance(res.exception, SystemExit), res.output
    if res.exit_code == 2:
        err = res.stderr.strip()
        assert err.startswith("error: ") and "\n" not in err and broken.name in err, err
    else:
        assert res.exit_code == 1 and "warning: cannot be used: " in res.stdout and broken.name in res.stdout, res.output
    assert tree_hash(ad) == before


# ============ class 4: NF4 checkpoints whose quant state lies ============

@pytest.fixture(scope="module")
def nf4_base(tmp_path_factory) -> Path:
    """A valid NF4 checkpoint, made by the CLI from the tiny Llama."""
    out = tmp_path_factory.mktemp("nf4") / "llama-nf4"
    res = CliRunner().invoke(cli, ["quantize", str(MODELS / "llama-tied"), str(out), "-q"])
    assert res.exit_code == 0, res.output
    return out


QS = "quant_state.bitsandbytes__nf4"


def _nf4_case(edit):
    """A copy of the NF4 checkpoint with edit(tensors, weight name, quant-state dict) applied to one weight."""
    def build(d: Path, src: Path):
        base = d / "llama-nf4"
        shutil.copytree(src, base)
        f = base / "model.safetensors"
        tensors = read_file(f)
        name = sorted(k[: -len("." + QS)] for k in tensors if k.endswith("." + QS))[0]
        qs = json.loads(bytes(tensors[f"{name}.{QS}"].tolist()))
        result = edit(tensors, name, qs)
        if result is not None:
            tensors[f"{name}.{QS}"] = torch.tensor(list(result if isinstance(result, bytes) else json.dumps(qs).encode()), dtype=torch.uint8)
        save_file(tensors, f, {"format": "pt"})
        return base, f
    return build


def _qs(**changes):
    def edit(t, name, qs):
        qs.update(changes)
        return True
    return edit


def _qs_raw(text: bytes):
    return lambda t, name, qs: text


def _qs_literal(key: str, literal: str):
    def edit(t, name, qs):
        qs[key] = "__PLACEHOLDER__"
        return json.dumps(qs).replace('"__PLACEHOLDER__"', literal).encode()
    return edit


def _tensor(suffix: str, make):
    def edit(t, name, qs):
        t[f"{name}.{suffix}"] = make(t[f"{name}.{suffix}"])
    return edit


def _drop(suffix: str):
    def edit(t, name, qs):
        del t[f"{name}.{suffix}" if suffix else name]
    return edit


def _shape_scaled(t, name, qs):
    qs["shape"] = [qs["shape"][0] * 2, qs["shape"][1]]
    return True


NF4_CASES = {
    "blocksize_0": _qs(blocksize=0),
    "blocksize_negative": _qs(blocksize=-64),
    "blocksize_2p40": _qs(blocksize=2**40),
    "blocksize_48": _qs(blocksize=48),
    "blocksize_63": _qs(blocksize=63),
    "blocksize_8192": _qs(blocksize=8192),
    "blocksize_string": _qs(blocksize="64"),
    "blocksize_float": _qs(blocksize=64.0),
    "shape_twice_packed": _shape_scaled,
    "shape_one_more": lambda t, n, qs: qs.update(shape=[qs["shape"][0], qs["shape"][1] + 1]) or True,
    "shape_negative": lambda t, n, qs: qs.update(shape=[-qs["shape"][0], -qs["shape"][1]]) or True,
    "shape_huge": _qs(shape=[2**40, 2**40]),
    "shape_string": _qs(shape="64x64"),
    "absmax_cut_short": _tensor("absmax", lambda a: a[:-1].clone()),
    "absmax_too_long": _tensor("absmax", lambda a: torch.cat([a, a[:3]])),
    "absmax_float": _tensor("absmax", lambda a: a.float()),
    "nested_absmax_empty": _tensor("nested_absmax", lambda a: a[:0].clone()),
    "nested_absmax_nan": _tensor("nested_absmax", lambda a: torch.full_like(a, float("nan"))),
    "quant_map_3": _tensor("quant_map", lambda q: q[:3].clone()),
    "quant_map_17": _tensor("quant_map", lambda q: torch.cat([q, q[:1]])),
    "quant_map_inf": _tensor("quant_map", lambda q: torch.full_like(q, float("inf"))),
    "nested_quant_map_255": _tensor("nested_quant_map", lambda q: q[:255].clone()),
    "nested_offset_nan": _qs_literal("nested_offset", "NaN"),
    "nested_offset_inf": _qs_literal("nested_offset", "Infinity"),
    "nested_offset_1e400": _qs_literal("nested_offset", "1e400"),
    "nested_offset_string": _qs(nested_offset="0.1"),
    "nested_offset_400_digits": _qs_literal("nested_offset", "1" + "0" * 400),  # float() overflows: no OverflowError
    "nested_offset_2p128": _qs(nested_offset=2**128),  # finite as a float64, Inf in float32
    "nested_offset_bool": _qs(nested_offset=True),
    "nested_offset_list": _qs(nested_offset=[0.1]),
    "nested_offset_missing": lambda t, n, qs: qs.pop("nested_offset") and True,
    "quant_state_list": _qs_raw(b"[1, 2, 3]"),
    "quant_state_string": _qs_raw(b'"nf4"'),
    "quant_state_not_json": _qs_raw(b"{blocksize: 64"),
    "quant_state_not_utf8": _qs_raw(b'{"quant_type": "\xff"}'),
    "quant_state_deep": _qs_raw(b"[" * 100_000 + b"]" * 100_000),
    "quant_state_duplicate_key": lambda t, n, qs: json.dumps(qs)[:-1].encode() + b', "blocksize": 128}',
    "dtype_unknown": _qs(dtype="float64"),
    "dtype_not_string": _qs(dtype=16),
    "quant_type_fp4": _qs(quant_type="fp4"),
    "packed_weight_missing": _drop(""),
    "absmax_missing": _drop("absmax"),
    "packed_cut_short": lambda t, name, qs: t.__setitem__(name, t[name][:-1].clone()),
}
NF4_SLOTS = {
    "dequantize": (lambda p, out: ["dequantize", p, out], True),
    "merge": (lambda p, out: ["merge", p, ADAPTERS / "llama-lora", out], True),
    "merge-requantize": (lambda p, out: ["merge", p, ADAPTERS / "llama-lora", out, "--requantize"], True),
    "inspect": (lambda p, out: ["inspect", p], False),
    "analyze-base": (lambda p, out: ["analyze", ADAPTERS / "llama-lora", "--base", p], False),
}


@pytest.mark.parametrize("command", list(NF4_SLOTS))
@pytest.mark.parametrize("case", list(NF4_CASES))
def test_nf4_quant_state_lie_refused(case, command, built, nf4_base, tmp_path):
    base, broken = built.get(f"nf4-{case}", lambda d: _nf4_case(NF4_CASES[case])(d, nf4_base))
    argv, writes = NF4_SLOTS[command]
    err = run_refused(argv(base, tmp_path / "out"), broken, [base], tmp_path, writes)
    assert "tensor '" in err, err


def test_valid_nf4_checkpoint_still_works(nf4_base, tmp_path):
    """The fixture itself is fine: dequantize and merge onto it succeed."""
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["dequantize", str(nf4_base), str(tmp_path / "deq"), "-q"])
        assert res.exit_code == 0, res.output
        res = CliRunner().invoke(cli, ["merge", str(nf4_base), str(ADAPTERS / "llama-lora"), str(tmp_path / "m"), "-q"])
        assert res.exit_code == 0, res.output


def test_case_counts():
    """The report quotes these counts (variants per class)."""
    assert len(PATTERN_CASES) >= 8 and len(HEADER_CASES) >= 8 and len(NON_FLOAT) >= 6
    assert len(CONFIG_CASES) + len(DORA_CASES) >= 8 and len(NF4_CASES) >= 8


# ============ class 5: a checkpoint's config.json whose fields have the wrong type ============

def _base_config(**changes):
    """A copy of the tiny Llama whose config.json has these fields changed."""
    def build(d: Path) -> tuple[Path, Path]:
        base = copy_fixture("model", "llama-tied", d)
        f = base / "config.json"
        cfg = json.loads(f.read_text())
        cfg.update(changes)
        f.write_text(json.dumps(cfg))
        return base, f
    return build


BASE_CONFIG_CASES = {
    "model_type_list": ("model_type", _base_config(model_type=["llama"])),
    "model_type_object": ("model_type", _base_config(model_type={"a": 1})),
    "model_type_int": ("model_type", _base_config(model_type=5)),
    "model_type_null": ("model_type", _base_config(model_type=None)),
    "architectures_null_item": ("architectures", _base_config(architectures=[None])),
    "architectures_object": ("architectures", _base_config(architectures={})),
    "architectures_int": ("architectures", _base_config(architectures=5)),
    "architectures_nested": ("architectures", _base_config(architectures=[[1]])),
    "architectures_string": ("architectures", _base_config(architectures="LlamaForCausalLM")),  # iterated, it would be letters
    "tie_word_embeddings_string": ("tie_word_embeddings", _base_config(tie_word_embeddings="false")),  # truthy: read as tied
    "num_hidden_layers_string": ("num_hidden_layers", _base_config(num_hidden_layers="2")),
    "num_hidden_layers_negative": ("num_hidden_layers", _base_config(num_hidden_layers=-2)),
    "head_dim_float": ("head_dim", _base_config(head_dim=16.0)),
    "quantization_config_string": ("quantization_config", _base_config(quantization_config="nf4")),
    "text_config_list": ("text_config", _base_config(text_config=[1])),
    "text_config_model_type_list": ("text_config.model_type", _base_config(text_config={"model_type": ["llama"]})),
}
CONFIG_SLOTS = dict(_ckpt_commands(ADAPTERS / "llama-lora"), **{  # convert has no -q: OUT is checked below
    "convert-mlx-base": (lambda p, out: ["convert", ADAPTERS / "llama-lora", out, "--to", "mlx", "--base", p], False),
    "convert-torchtune-base-file": (lambda p, out: ["convert", ADAPTERS / "llama-lora", out, "--to", "torchtune", "--base",
                                                    p / "config.json"], False),
})


@pytest.mark.parametrize("command", list(CONFIG_SLOTS))
@pytest.mark.parametrize("case", list(BASE_CONFIG_CASES))
def test_base_config_field_of_the_wrong_type_refused(case, command, built, tmp_path):
    field, build = BASE_CONFIG_CASES[case]
    base, broken = built.get(f"basecfg-{case}", build)
    argv, writes = CONFIG_SLOTS[command]
    err = run_refused(argv(base, tmp_path / "out"), broken, [base], tmp_path, writes)
    assert not (tmp_path / "out").exists()
    assert err.split("config.json: ", 1)[1].startswith(f"field {field}"), err


def test_config_json_named_as_base_must_be_a_regular_file(tmp_path):
    """--base PATH/config.json, a file the user names: a FIFO there is refused at once, never opened (it would block)."""
    import os

    (tmp_path / "b").mkdir()
    os.mkfifo(tmp_path / "b" / "config.json")
    err = run_refused(["convert", ADAPTERS / "llama-lora", tmp_path / "out", "--to", "torchtune", "--base",
                       tmp_path / "b" / "config.json"], tmp_path / "b" / "config.json", [], tmp_path, False)
    assert "FIFO" in err and not (tmp_path / "out").exists(), err
