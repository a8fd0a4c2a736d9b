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
import re
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
from helpers import ADAPTERS, MODELS, copy_fixture, read_file, run_adapterops, tree_hash
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


def test_pattern_index_gives_peft_answers():
    r"""The pattern index (plain keys looked up by string operations, other keys by their regex, compiled once) gives
    what PEFT's `re.match(rf"(.*\.)?({key})$", name)` gives, first match and every match, on keys and names built to
    hit its edges: wildcards, escapes, ^ and $, groups, classes, newlines in names (`.` and `$` treat them apart)."""
    import random
    import re

    from adapterops.core.scaling import PatternIndex, _plain_key, invalid_pattern

    rng = random.Random(17)
    atoms = ["a", "b", ".", r"\.", "ab", "q_proj", r"\-", "-", " ", "(a|b)", "[ab]", "a*", r"\d", "(?i:a)", r"\\", "#",
             "(ab)", r"\Z"]
    name_atoms = ["a", "b", ".", "\n", "ab", "q_proj", "-", " ", "A", "1", "\\", "#"]
    checked = matched = plain = 0
    for _ in range(1500):
        keys = []
        for _ in range(rng.randint(1, 8)):
            k = ("^" if rng.random() < 0.2 else "") + "".join(rng.choice(atoms) for _ in range(rng.randint(1, 4)))
            k += "$" if rng.random() < 0.2 else ""
            if invalid_pattern(k) is None and k not in keys:
                keys.append(k)
        if not keys:
            continue
        plain += sum(_plain_key(k) is not None for k in keys)
        index = PatternIndex(tuple(keys))
        for _ in range(20):
            if rng.random() < 0.4:  # a name one of the keys was written for, in odd surroundings
                core = re.sub(r"[\\^$()\[\]*?|]", "", rng.choice(keys))
                name = rng.choice(["", "x.", "x\n.", "a.b.", "\n"]) + core + rng.choice(["", "\n", "\n\n", "."])
            else:
                name = "".join(rng.choice(name_atoms) for _ in range(rng.randint(0, 7)))
            want = [k for k in keys if re.match(rf"(.*\.)?({k})$", name)]
            assert index.matching(name) == want, (keys, name)
            assert index.first(name) == (want[0] if want else None), (keys, name)
            checked, matched = checked + 1, matched + bool(want)
    assert checked > 20_000 and matched > 1_000 and plain > 1_000  # the comparison is not vacuous


def _many_pattern_keys(target: str, n: int) -> dict[str, int]:
    """n distinct rank_pattern keys, each matching some module of the tiny Llama, and `target` (rank 4) matched by one
    exact key in the middle only: the keys before it keep a literal '0', so never match layer 1; the keys after it may
    (PEFT: the first match wins). Plain keys with random wildcards (each its own index group: the index's worst case),
    exact keys as adapterops writes them, and regex keys."""
    import random
    import re

    rng = random.Random(5)
    modules = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                                                  "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    keys: dict[str, int] = {}

    def variant(module: str) -> str:
        parts = module.split(".")
        text = list(".".join(parts[rng.randint(0, 2):]))  # from a component boundary, keeping the layer number
        digit = len(text) - len(".".join(parts[3:])) - 2
        for j in rng.sample(range(len(text)), rng.randint(0, len(text) // 3)):
            if j != digit:
                text[j] = "."
        kind = rng.random()
        if kind < 0.15:
            return "^" + re.escape(module)[:-1] + "(" + module[-1] + ")"  # a regex key
        return "".join(text) if kind < 0.9 else "^" + re.escape(module)

    while len(keys) < n // 2:
        keys.setdefault(variant(rng.choice([m for m in modules if "layers.0" in m])), 8)
    keys[re.escape(target)] = 4
    while len(keys) < n:
        keys.setdefault(variant(rng.choice(modules)), 8)
    return keys


def test_65536_pattern_keys_inspect_and_merge_quickly(tmp_path):
    """MAX_PATTERN_KEYS keys: every module looked up against every key must cost string operations, not regex
    compiles (65,536 keys outrun every regex cache: one compile per module and key took minutes), in inspect and in
    merge, in a real process killed if slow. One module has rank 4 through one key in the middle of the config; the
    merge must equal the merge with only that key."""
    from helpers import read_all, run_adapterops

    from adapterops.core.scaling import MAX_PATTERN_KEYS

    target = "model.layers.1.mlp.down_proj"

    def make(d: Path, keys: dict) -> Path:
        ad = copy_fixture("adapter", "llama-lora", d)
        f = ad / "adapter_model.safetensors"
        t = read_file(f)
        a, b = f"base_model.model.{target}.lora_A.weight", f"base_model.model.{target}.lora_B.weight"
        t[a], t[b] = t[a][:4].clone(), t[b][:, :4].clone()
        save_file(t, f)
        cfg = json.loads((ad / "adapter_config.json").read_text())
        cfg["rank_pattern"] = keys
        (ad / "adapter_config.json").write_text(json.dumps(cfg))
        return ad

    keys = _many_pattern_keys(target, MAX_PATTERN_KEYS)
    assert len(keys) == MAX_PATTERN_KEYS
    big = make(tmp_path / "big", keys)
    small = make(tmp_path / "small", {r"^model\.layers\.1\.mlp\.down_proj": 4})
    t0 = time.monotonic()
    res = run_adapterops(["inspect", big, "--json"], timeout=60)
    assert res.returncode in (0, 1), res.stderr
    ranks = {m["name"]: m["rank"] for m in json.loads(res.stdout)["modules"]}
    assert ranks[target] == 4 and set(ranks.values()) == {4, 8} and len(ranks) == 14
    res = run_adapterops(["merge", MODELS / "llama-tied", big, tmp_path / "out", "-q"], timeout=60)
    assert res.returncode == 0, res.stderr
    assert time.monotonic() - t0 < 60
    res = run_adapterops(["merge", MODELS / "llama-tied", small, tmp_path / "want", "-q"], timeout=60)
    assert res.returncode == 0, res.stderr
    got, want = read_all(tmp_path / "out"), read_all(tmp_path / "want")
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


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


def _zero_size(shape):
    """One more tensor, empty (a 0 dimension) and so with no data: the library accepts it whatever the other dims."""
    return lambda h: h.__setitem__("extra.zero", {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]})


def _object_shape(d: Path) -> tuple[Path, Path]:
    """One more tensor of 4 bytes whose shape is an empty object: once read as the scalar shape []."""
    def edit(data: bytes) -> bytes:
        (n,) = struct.unpack("<Q", data[:8])
        h = json.loads(data[8:8 + n])
        end = len(data) - 8 - n
        h["extra.scalar"] = {"dtype": "F32", "shape": {}, "data_offsets": [end, end + 4]}
        raw = json.dumps(h).encode()
        raw += b" " * (-len(raw) % 8)
        return struct.pack("<Q", len(raw)) + raw + data[8 + n:] + b"\0" * 4
    return _ck_bytes(d, edit)


def _literal(field: str, literal: str):
    """Replace the first tensor's field by a raw JSON literal (what json.dumps cannot write: 1e400, 400 digits)."""
    return lambda t: re.sub(rf'"{field}": (\[[^\]]*\]|"[^"]*")', lambda m: f'"{field}": {literal}', t, count=1)


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
    # numbers and nesting the JSON parser refuses (core/strict_json.py)
    "shape_400_digits": lambda d: _raw_header(d, _literal("shape", "[" + "1" + "0" * 399 + ", 64]")),
    "shape_4301_digits": lambda d: _raw_header(d, _literal("shape", "[" + "9" * 4301 + "]")),
    "offsets_2p64": lambda d: _ck(d, _set("data_offsets", [0, 2**64])),
    "shape_1e400": lambda d: _raw_header(d, _literal("shape", "[1e400, 64]")),
    "header_nested_100": lambda d: _raw_header(d, _literal("shape", "[" * 99 + "]" * 99)),
    "extra_field_nested_100": lambda d: _raw_header(d, lambda t: t.replace('"dtype": ', '"x": ' + "[" * 99 + "]" * 99 + ', "dtype": ', 1)),
    # empty tensors whose other dimensions overflow torch's int64 strides
    "shape_zero_2p32_2p32": lambda d: _ck(d, _zero_size([0, 2**32, 2**32])),
    "shape_zero_2p62_2": lambda d: _ck(d, _zero_size([0, 2**62, 2])),
    "shape_2p63_zero_2": lambda d: _ck(d, _zero_size([2**63, 0, 2])),
    # dtypes that are no string (["F32"] is not even hashable)
    "dtype_list": lambda d: _ck(d, _set("dtype", ["F32"])),
    "dtype_object": lambda d: _ck(d, _set("dtype", {"F32": 1})),
    "dtype_null": lambda d: _ck(d, _set("dtype", None)),
    "shape_empty_object": _object_shape,
}
HEADER_CAUSES = {  # the reason these cases must give
    "shape_400_digits": "integer with 400 digits is out of range",
    "shape_4301_digits": "integer with 4301 digits is out of range",
    "offsets_2p64": f"integer {2**64} is out of range",
    "shape_1e400": "number 1e400 is out of range",
    "header_nested_100": "nested deeper than 64 levels",
    "extra_field_nested_100": "nested deeper than 64 levels",
    "shape_zero_2p32_2p32": "is too large for torch",
    "shape_zero_2p62_2": "is too large for torch",
    "shape_2p63_zero_2": "which torch cannot hold",
    "dtype_list": "dtype ['F32'] is not a string",
    "dtype_object": "dtype {'F32': 1} is not a string",
    "dtype_null": "dtype None is not a string",
    "shape_empty_object": "invalid shape {}",
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
    assert HEADER_CAUSES.get(case, "") in err, err


@pytest.mark.parametrize("case", ["duplicate_tensor_name", "offsets_gap_trailing", "shape_2p62_2p62_0", "metadata_list", "header_nan",
                                  "shape_400_digits", "offsets_2p64", "shape_1e400", "header_nested_100", "dtype_list",
                                  "dtype_object", "shape_empty_object"])
def test_header_verdicts_agree_with_the_safetensors_library(case, built):
    """Where the safetensors library refuses a file, so do we (its Rust reader is the reference)."""
    safetensors = pytest.importorskip("safetensors")
    _, broken = built.get(f"hdr-{case}", HEADER_CASES[case])
    with pytest.raises(Exception):
        with safetensors.safe_open(str(broken), "pt") as f:
            list(f.keys())


def _extra_fields(text: str, fields: str) -> str:
    """Every tensor entry gets `fields` (raw JSON members) before its dtype."""
    return text.replace('"dtype": ', fields + ', "dtype": ')


EXTRA_FIELD_CASES = {  # the library's TensorInfo skips fields it does not know (serde without deny_unknown_fields)
    "one": '"comment": "mine"',
    "repeated": '"x": 1, "x": [2, {"y": null}]',  # an unknown field given twice is skipped twice
    "nested_60": '"x": ' + "[" * 58 + "]" * 58,  # header, entry, then 58 levels: 60 in all
}


@pytest.mark.parametrize("case", list(EXTRA_FIELD_CASES))
def test_unknown_entry_fields_are_ignored_like_the_library(case, built, tmp_path):
    base, f = built.get(f"extra-{case}", lambda d: _raw_header(d, lambda t: _extra_fields(t, EXTRA_FIELD_CASES[case])))
    safetensors = pytest.importorskip("safetensors")
    with safetensors.safe_open(str(f), "pt") as st:
        assert len(list(st.keys())) > 0
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["merge", str(base), str(ADAPTERS / "llama-lora"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert read_file(tmp_path / "out" / "model.safetensors").keys() == read_file(f).keys()


MANY_KEYS = 300_000
MANY_KEYS_S = 20  # a linear check takes about a second; the quadratic one never finished


@pytest.mark.parametrize("then", ["nothing", "duplicate_dtype"])
def test_entry_with_300k_extra_fields_is_read_in_linear_time(then, built, tmp_path):
    """A 4 MB header (far under the 100 MB cap) whose entry has 300k unknown fields: each field used to be
    counted against every other (fields.count), hours of work. A real process, killed if it hangs."""
    extra = "".join(f'"k{i}": 0, ' for i in range(MANY_KEYS))
    tail = '"dtype": "F32", ' if then == "duplicate_dtype" else ""
    base, f = built.get(f"many-keys-{then}", lambda d: _raw_header(d, lambda t: t.replace('"dtype": ', extra + tail + '"dtype": ', 1)))
    t0 = time.monotonic()
    try:
        res = run_adapterops(["inspect", base], timeout=MANY_KEYS_S * 3)
    except subprocess.TimeoutExpired:
        pytest.fail(f"inspect did not finish within {MANY_KEYS_S * 3} s")
    assert time.monotonic() - t0 < MANY_KEYS_S and "Traceback" not in res.stderr, res.stderr
    if then == "nothing":
        assert res.returncode == 0, res.stderr
    else:
        err = res.stderr.strip()
        assert res.returncode == 2 and err.startswith("error: ") and "\n" not in err, res.stderr
        assert f.name in err and "field 'dtype' appears twice" in err, err


def _deep(levels: int) -> str:
    """A JSON value nested `levels` deep (arrays and objects in turn)."""
    return "".join("[" if i % 2 else '{"a": ' for i in range(levels)) + "1" + "".join("]" if i % 2 else "}" for i in reversed(range(levels)))


def _json_value(folder_kind: str, fixture: str, name: str, key: str, levels: int):
    """A copy of a fixture whose JSON file `name` gets `key` set to a value nested so that the file is `levels` deep."""
    def build(d: Path):
        folder = copy_fixture(folder_kind, fixture, d)
        f = folder / name
        data = json.loads(f.read_text())
        data[key] = "__DEEP__"
        f.write_text(json.dumps(data).replace('"__DEEP__"', _deep(levels - 1)))
        return folder, f
    return build


NESTING_PLACES = {  # name -> (builder taking the total depth, commands as (argv, writes))
    "adapter_peft_version": (lambda n: _json_value("adapter", "llama-lora", "adapter_config.json", "peft_version", n), "adapter"),
    "adapter_unknown_key": (lambda n: _json_value("adapter", "llama-lora", "adapter_config.json", "notes", n), "adapter"),
    "base_config": (lambda n: _json_value("model", "llama-tied", "config.json", "task_specific_params", n), "ckpt"),
    "base_index": (lambda n: _json_value("model", "llama-untied", "model.safetensors.index.json", "metadata", n), "ckpt"),
    "header_extra_field": (lambda n: lambda d: _raw_header(d, lambda t: t.replace('"dtype": ', f'"x": {_deep(n - 2)}, "dtype": ', 1)), "ckpt"),
    "header_shape": (lambda n: lambda d: _raw_header(d, lambda t: t.replace('"shape": [', '"shape": [' + _deep(n - 3) + ", ", 1)), "ckpt"),
}
REPORTING = ["inspect", "analyze", "analyze-base", "diff"]


@pytest.mark.parametrize("levels", [60, 100])
@pytest.mark.parametrize("place", list(NESTING_PLACES))
def test_nesting_never_overflows_a_walker(place, levels, built, tmp_path):
    """60 levels, under MAX_JSON_DEPTH (64): used or refused, never a RecursionError from whatever walks the parsed
    value (dataclasses.asdict for --json, header helpers). 100 levels: refused by the parser, with the reason."""
    build, kind = NESTING_PLACES[place]
    folder, f = built.get(f"nest-{place}-{levels}", build(levels))
    commands = ADAPTER_COMMANDS if kind == "adapter" else _ckpt_commands(ADAPTERS / "llama-lora")
    for command, (argv, writes) in commands.items():
        out = tmp_path / command / "out"
        out.parent.mkdir()
        args = [str(a) for a in argv(folder, out)] + (["--json"] if command in REPORTING else [])
        with deadline(DEADLINE_S):
            res = CliRunner().invoke(cli, args)
        assert res.exception is None or isinstance(res.exception, SystemExit), (command, res.exception)
        assert "Traceback" not in res.output and "RecursionError" not in res.output, res.output
        if levels == 100 and not (kind == "adapter" and command == "diff"):  # diff reads adapter tensors only
            assert res.exit_code == 2, (command, res.output)
        if res.exit_code == 2:
            err = res.stderr.strip()
            assert err.startswith("error: ") and "\n" not in err, (command, err)
            assert levels == 60 or (f.name in err and "nested deeper than 64 levels" in err), (command, err)
            assert not out.exists(), command


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
    "target_parameters_too_many": _cfg_edit(target_parameters=[f"experts.p{i}" for i in range(5000)]),
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
    # numbers and nesting the JSON parser refuses: 309+ digits used to reach math.isfinite (OverflowError)
    "alpha_400_digits": _cfg_text(_replace_value("lora_alpha", "1" + "0" * 399)),
    "r_309_digits": _cfg_text(_replace_value("r", "1" + "0" * 308)),
    "r_2p64": _cfg_text(_replace_value("r", str(2**64))),
    "alpha_minus_1e400": _cfg_text(_replace_value("lora_alpha", "-1e400")),
    "rank_pattern_400_digits": _cfg_text(_replace_value("rank_pattern", '{"q_proj": 1' + "0" * 399 + "}")),
    "peft_version_nested_65": _cfg_text(_replace_value("peft_version", "[" * 64 + "]" * 64)),
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


def test_many_modules_to_save_wrapper_tensors_open_in_linear_time(tmp_path):
    """Each `X.original_module.Y` tensor (a modules_to_save wrapper's untrained original) is checked against the
    trained copy `X.Y` PEFT saves beside it: one set look-up each, not a set of every key rebuilt per tensor (quadratic:
    20,000 wrappers took 35 s of CPU, 40,000 over two minutes), in a real process killed if slow (30 s: the linear
    look-up opens them in ~3 s here, the quadratic one did not finish)."""
    from helpers import run_adapterops

    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    f = ad / "adapter_model.safetensors"
    tensors = read_file(f)
    for i in range(20_000):
        tensors[f"base_model.model.heads.{i}.weight"] = torch.zeros(1)
        tensors[f"base_model.model.heads.{i}.original_module.weight"] = torch.zeros(1)
    save_file(tensors, f)
    t0 = time.monotonic()
    res = run_adapterops(["inspect", ad, "--json"], timeout=30)
    assert res.returncode in (0, 1), res.stderr
    summary = json.loads(res.stdout)["summary"]
    assert summary["modules"] == 14 and len(summary["replaced_tensors"]) == 20_000, summary["replaced_tensors"][:3]
    assert time.monotonic() - t0 < 30


def test_param_candidates_are_peft_targets_without_a_pass_per_module():
    """target_parameters: a module's candidates are its `owner.p` that equal or end with `.TARGET` (PEFT's rule, the
    reference below); looked up in an index of the targets, never a pass over all targets per module with a
    quadratic de-duplication (4,096 names for 300 modules took minutes)."""
    import random

    from adapterops.io.adapter import param_candidates

    def rule(owner, targets):
        out = []
        for t in sorted(set(targets)):
            key = f"{owner}.{t.rpartition('.')[2]}"
            if (key == t or key.endswith("." + t)) and key not in out:
                out.append(key)
        return tuple(out)

    rng = random.Random(11)
    parts = ["a", "b", "experts", "mlp", "", "gate_up_proj", "down_proj", "0"]
    matched = 0
    for _ in range(5000):
        targets = [".".join(rng.choice(parts) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 6))]
        owner = ".".join(rng.choice(parts) for _ in range(rng.randint(0, 4)))
        assert param_candidates(owner, targets) == rule(owner, targets), (owner, targets)
        matched += bool(rule(owner, targets))
    assert matched > 1000
    names = [f"p{i}" for i in range(4096)] + [f"model.layers.{i}.mlp.experts.w{i}" for i in range(4096)]
    with deadline(30):
        for i in range(300):
            assert len(param_candidates(f"model.layers.{i}.mlp.experts", names)) == 4097


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
    "blocksize_400_digits": _qs_literal("blocksize", "1" + "0" * 399),
    "nested_offset_2p64": _qs_literal("nested_offset", str(2**64)),
    "nested_offset_minus_1e400": _qs_literal("nested_offset", "-1e400"),
    "quant_state_nested_65": _qs_literal("notes", "[" * 64 + "]" * 64),
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
