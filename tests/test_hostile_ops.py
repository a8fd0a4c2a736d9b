"""Hostile inputs (issue 17, the rest): what used to give tracebacks or silently wrong results, class by class,
through every command that takes that input.

Same machinery as tests/test_hostile.py (`fails_cleanly` from tests/test_corpus.py under a SIGALRM deadline, inputs
built once per module): exactly one `error:` line naming the file, exit 2, nothing written, inputs unchanged.

Classes: 1. empty factors (a zero dimension); 2. factors that are not floating point; 3. NaN/Inf in tensors an
adapter replaces (modules_to_save, trained biases, base_layer embeddings); 4. weights and scales that are not finite
or overflow (named by adapter and cause); 5. dtype conversions that overflow (merge/unmerge/dequantize/extract);
6. batch manifests (shapes, option types, output patterns, aliased outputs); 7. lone surrogates in names (paths and
safetensors headers) through every command's text and --json output.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, copy_fixture, read_file, tree_hash
from test_corpus import ADAPTER_COMMANDS, fails_cleanly
from test_hostile import DEADLINE_S, Built, deadline, run_refused

from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file

Q = "base_model.model.model.layers.0.self_attn.q_proj."
COMMANDS = dict(ADAPTER_COMMANDS, **{"stack-svd": (lambda p, out: ["stack", ADAPTERS / "llama-lora", p, out, "--method", "svd"], True)})
USING = [c for c in COMMANDS if c not in ("inspect", "diff")]  # every command that computes with the factors


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("hostile-ops"))


def _tensors(fixture: str, edit, cfg: dict | None = None):
    """A builder: a copy of a fixture adapter with its tensors edited (and config keys changed)."""
    def build(d: Path):
        ad = copy_fixture("adapter", fixture, d)
        f = ad / "adapter_model.safetensors"
        if edit is not None:
            t = read_file(f)
            edit(t)
            save_file(t, f, {"format": "pt"})
        if cfg:
            c = json.loads((ad / "adapter_config.json").read_text())
            c.update(cfg)
            (ad / "adapter_config.json").write_text(json.dumps(c))
        return ad, f
    return build


def _factor(part: str, make):
    return lambda t: t.__setitem__(Q + part, make(t[Q + part]))


# ============ class 1: empty factors ============

EMPTY_CASES = {
    "zero_rank": lambda t: (t.__setitem__(Q + "lora_A.weight", torch.zeros(0, 64)), t.__setitem__(Q + "lora_B.weight", torch.zeros(64, 0))),
    "zero_out_rows": _factor("lora_B.weight", lambda b: torch.zeros(0, b.shape[1])),
    "zero_in_cols": _factor("lora_A.weight", lambda a: torch.zeros(a.shape[0], 0)),
    "zero_both": lambda t: (t.__setitem__(Q + "lora_A.weight", torch.zeros(8, 0)), t.__setitem__(Q + "lora_B.weight", torch.zeros(0, 8))),
    "zero_3d": _factor("lora_A.weight", lambda a: torch.zeros(a.shape[0], 64, 0)),
    "zero_last_module": lambda t: t.__setitem__("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight", torch.zeros(0, 8)),
}


@pytest.mark.parametrize("command", USING)
@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_factor_refused(case, command, built, tmp_path):
    ad, f = built.get(f"empty-{case}", _tensors("llama-lora", EMPTY_CASES[case]))
    argv, writes = COMMANDS[command]
    err = run_refused(argv(ad, tmp_path / "out"), f, [ad], tmp_path, writes)
    assert "tensor '" in err and ("zero dimension" in err or "rank" in err), err


# ============ class 2: factors that are not floating point ============

NON_FLOAT = {
    "a_int8": ("lora_A.weight", torch.int8), "b_int8": ("lora_B.weight", torch.int8), "a_uint8": ("lora_A.weight", torch.uint8),
    "b_bool": ("lora_B.weight", torch.bool), "a_int32": ("lora_A.weight", torch.int32), "a_int64": ("lora_A.weight", torch.int64),
    "a_float8": ("lora_A.weight", torch.float8_e4m3fn),
}


@pytest.mark.parametrize("command", USING)
@pytest.mark.parametrize("case", list(NON_FLOAT))
def test_non_float_factor_refused(case, command, built, tmp_path):
    part, dt = NON_FLOAT[case]
    ad, f = built.get(f"nonfloat-{case}", _tensors("llama-lora", _factor(part, lambda x: (x * 100).to(dt))))
    argv, writes = COMMANDS[command]
    err = run_refused(argv(ad, tmp_path / "out"), f, [ad], tmp_path, writes)
    assert "not floating point" in err and Q + part in err, err


def test_inspect_describes_non_float_adapter(built):
    ad, _ = built.get("nonfloat-a_int8", _tensors("llama-lora", _factor("lora_A.weight", lambda x: (x * 100).to(torch.int8))))
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["inspect", str(ad)])
    assert res.exit_code == 1 and "cannot be used" in res.stdout and "not floating point" in res.stdout, res.output


# ============ class 3: NaN/Inf in tensors an adapter replaces ============

def _bad(key: str, value: float):
    def edit(t):
        t[key] = t[key].clone()
        t[key].reshape(-1)[0] = value
    return edit


REPLACED = {  # case: (fixture, its base, the replaced tensor, value)
    "mts_norm_nan": ("llama-untied-mts", "llama-untied", "base_model.model.model.norm.weight", float("nan")),
    "mts_layernorm_inf": ("llama-untied-mts", "llama-untied", "base_model.model.model.layers.1.input_layernorm.weight", float("inf")),
    "mts_lm_head_nan": ("llama-tied-mts", "llama-tied", "base_model.model.lm_head.weight", float("nan")),
    "trained_bias_nan": ("llama-lora-bias", "llama-untied", "base_model.model.model.layers.0.self_attn.k_proj.bias", float("nan")),
    "base_layer_bias_inf": ("llama-lora-bias", "llama-untied", "base_model.model.model.layers.1.self_attn.q_proj.base_layer.bias", float("-inf")),
    "base_layer_embedding_nan": ("llama-embedding", "llama-tied", "base_model.model.model.embed_tokens.base_layer.weight", float("nan")),
}
REPLACED_SLOTS = {
    "merge": lambda ad, base, out: ["merge", MODELS / base, ad, out],
    "merge-float32": lambda ad, base, out: ["merge", MODELS / base, ad, out, "--dtype", "float32"],
    "stack": lambda ad, base, out: ["stack", ad, out],
}


@pytest.mark.parametrize("command", list(REPLACED_SLOTS))
@pytest.mark.parametrize("case", list(REPLACED))
def test_nan_in_replaced_tensor_refused(case, command, built, tmp_path):
    fixture, base, key, value = REPLACED[case]
    ad, f = built.get(f"replaced-{case}", _tensors(fixture, _bad(key, value)))
    err = run_refused(REPLACED_SLOTS[command](ad, base, tmp_path / "out"), f, [ad], tmp_path, True)
    assert key in err and "NaN or Inf" in err, err


# ============ class 4: weights and scales that are not finite or overflow ============

WEIGHTS = ["nan,1", "1,nan", "inf,1", "-inf,1", "1,-inf"]
WEIGHT_SLOTS = {
    "merge": lambda a, b, w, out: ["merge", MODELS / "llama-tied", a, b, out, "--weights", w],
    "unmerge": lambda a, b, w, out: ["unmerge", MODELS / "llama-tied", a, b, out, "--weights", w],
    "stack": lambda a, b, w, out: ["stack", a, b, out, "--weights", w],
    "stack-svd": lambda a, b, w, out: ["stack", a, b, out, "--weights", w, "--method", "svd"],
}


@pytest.mark.parametrize("command", list(WEIGHT_SLOTS))
@pytest.mark.parametrize("weights", WEIGHTS)
def test_non_finite_weight_refused(weights, command, built, tmp_path):
    a, _ = built.get("plain-a", _tensors("llama-lora", None))
    b, _ = built.get("plain-b", _tensors("llama-lora", None))
    bad = a if weights.split(",")[0] != "1" else b
    err = run_refused(WEIGHT_SLOTS[command](a, b, weights, tmp_path / "out"), bad, [a, b], tmp_path, True)
    assert "not a finite number" in err, err


def test_weights_checked_in_the_library_too(tmp_path):
    import adapterops

    for call in (lambda: adapterops.stack([ADAPTERS / "llama-lora"], tmp_path / "o", weights=[float("nan")]),
                 lambda: adapterops.merge(MODELS / "llama-tied", [ADAPTERS / "llama-lora"], tmp_path / "o", weights=[float("inf")])):
        with pytest.raises(adapterops.AdapteropsError, match="finite"):
            call()
    assert not (tmp_path / "o").exists()


HUGE_SCALE = {  # overflow of the written factors (stack) or of ΔW (merge): named by the adapter's config and its scale
    "alpha_1e300": {"lora_alpha": 1e300},
    "alpha_1e200_rslora": {"lora_alpha": 1e200, "use_rslora": True},
    "alpha_pattern_1e300": {"alpha_pattern": {"q_proj": 1e300}},
}
SCALE_SLOTS = {
    "merge": lambda p, out: ["merge", MODELS / "llama-tied", p, out],
    "unmerge": lambda p, out: ["unmerge", MODELS / "llama-tied", p, out],
    "stack": lambda p, out: ["stack", ADAPTERS / "llama-lora", p, out],
    "stack-svd": lambda p, out: ["stack", ADAPTERS / "llama-lora", p, out, "--method", "svd"],
    "rescale-bake": lambda p, out: ["rescale", p, out, "--bake"],
}


@pytest.mark.parametrize("command", list(SCALE_SLOTS))
@pytest.mark.parametrize("case", list(HUGE_SCALE))
def test_huge_scale_refused_and_blamed_on_the_config(case, command, built, tmp_path):
    ad, _ = built.get(f"scale-{case}", _tensors("llama-lora", None, HUGE_SCALE[case]))
    err = run_refused(SCALE_SLOTS[command](ad, tmp_path / "out"), ad, [ad], tmp_path, True)
    assert "overflow" in err or "NaN or Inf" in err, err
    if command != "rescale-bake":
        assert "adapter_config.json" in err and "scale" in err, err


def _fp16_base(d: Path, edit=None):
    base = copy_fixture("model", "llama-tied", d)
    f = base / "model.safetensors"
    t = {k: v.to(torch.float16) for k, v in read_file(f).items()}
    if edit:
        edit(t)
    save_file(t, f, {"format": "pt"})
    return base, f


@pytest.mark.parametrize("command", ["merge", "unmerge"])
@pytest.mark.parametrize("alpha", [1e9, 1e8, 1e12])
def test_alpha_overflowing_fp16_names_the_adapter_and_its_scale(alpha, command, built, tmp_path):
    """lora_alpha: 1e9 into an fp16 base: the adapter's config and its α/r are blamed, not the base weight."""
    base, _ = built.get("fp16-base", _fp16_base)
    ad, _ = built.get(f"alpha-{alpha:g}", _tensors("llama-lora", None, {"lora_alpha": alpha}))
    err = run_refused([command, base, ad, tmp_path / "out"], ad, [ad, base], tmp_path, True)
    assert "adapter_config.json" in err and "α/r" in err and "makes ΔW overflow float16" in err, err


def test_weight_overflowing_fp16_names_the_weight(built, tmp_path):
    base, _ = built.get("fp16-base", _fp16_base)
    err = run_refused(["merge", base, ADAPTERS / "llama-lora", ADAPTERS / "llama-dora", tmp_path / "out", "--weights", "1e6,1"],
                      ADAPTERS / "llama-lora", [base], tmp_path, True)
    assert "weight 1e+06" in err and "overflow float16" in err, err


def test_base_near_the_limit_is_told_apart(built, tmp_path):
    """ΔW fits float16 but W + ΔW does not: said so (the base weight is near the limit), not blamed on the scale."""
    key = "model.layers.0.self_attn.q_proj.weight"
    base, _ = built.get("fp16-near-limit", lambda d: _fp16_base(d, lambda t: t[key].fill_(65504)))
    err = run_refused(["merge", base, ADAPTERS / "llama-lora", tmp_path / "out", "--weights", "1000"], ADAPTERS / "llama-lora",
                      [base], tmp_path, True)
    assert key in err and "W ± ΔW overflows float16" in err and "near" in err, err


# ============ class 5: dtype conversions that overflow ============

BIG = {"plus_1e6": 1e6, "minus_1e6": -1e6, "just_over_fp16": 65520.0, "1e39_into_bf16": None}
UNTOUCHED = "model.layers.0.input_layernorm.weight"
CHANGED = "model.layers.0.self_attn.q_proj.weight"


def _fp32_base(value: float, key: str):
    def build(d: Path):
        base = copy_fixture("model", "llama-tied", d)
        f = base / "model.safetensors"
        t = {k: v.to(torch.float64 if value is None else torch.float32) for k, v in read_file(f).items()}
        t[key].reshape(-1)[1] = 1e39 if value is None else value
        save_file(t, f, {"format": "pt"})
        return base, f
    return build


@pytest.mark.parametrize("key", [UNTOUCHED, CHANGED])
@pytest.mark.parametrize("case", list(BIG))
def test_merge_dtype_overflow_refused(case, key, built, tmp_path):
    base, f = built.get(f"big-{case}-{key}", _fp32_base(BIG[case], key))
    dtype = "bfloat16" if BIG[case] is None else "float16"
    err = run_refused(["merge", base, ADAPTERS / "llama-lora", tmp_path / "out", "--dtype", dtype], f, [base], tmp_path, True)
    assert key in err and f"does not fit in {dtype}" in err, err


def test_merge_message_quotes_the_value(built, tmp_path):
    base, f = built.get(f"big-plus_1e6-{UNTOUCHED}", _fp32_base(1e6, UNTOUCHED))
    err = run_refused(["merge", base, ADAPTERS / "llama-lora", tmp_path / "out", "--dtype", "float16"], f, [base], tmp_path, True)
    assert "1e6 does not fit in float16" in err, err


@pytest.fixture(scope="module")
def nf4_big(tmp_path_factory) -> Path:
    """An NF4 checkpoint whose unquantized layernorm holds 1e6 (float32)."""
    d = tmp_path_factory.mktemp("nf4big")
    base, _ = _fp32_base(1e6, UNTOUCHED)(d)
    res = CliRunner().invoke(cli, ["quantize", str(base), str(d / "nf4"), "-q"])
    assert res.exit_code == 0, res.output
    return d / "nf4"


@pytest.mark.parametrize("argv", [["dequantize", "{p}", "{out}", "--dtype", "float16"],
                                  ["merge", "{p}", str(ADAPTERS / "llama-lora"), "{out}", "--dtype", "float16"]])
def test_nf4_dtype_overflow_refused(argv, nf4_big, tmp_path):
    args = [a.replace("{p}", str(nf4_big)).replace("{out}", str(tmp_path / "out")) for a in argv]
    err = run_refused(args, nf4_big / "model.safetensors", [nf4_big], tmp_path, True)
    assert UNTOUCHED in err and "does not fit in float16" in err, err


def test_unmerge_restored_copy_overflow_refused(built, tmp_path):
    """unmerge --keep-replaced writes an adapter's float32 copy into a bf16 checkpoint: checked like any cast."""
    ad, f = built.get("mts-huge", _tensors("llama-untied-mts", _bad("base_model.model.model.norm.weight", 3.4e38)))
    err = run_refused(["unmerge", MODELS / "llama-untied", ad, tmp_path / "out", "--keep-replaced"], f, [ad], tmp_path, True)
    assert "does not fit in bfloat16" in err, err


def test_extract_dtype_overflow_refused(built, tmp_path):
    def tuned(d: Path):
        t_dir = copy_fixture("model", "llama-tied", d)
        f = t_dir / "model.safetensors"
        t = {k: v.float() for k, v in read_file(f).items()}
        t[CHANGED] = t[CHANGED] + 1e12
        save_file(t, f, {"format": "pt"})
        return t_dir, f
    t_dir, _ = built.get("extract-huge", tuned)
    err = run_refused(["extract", MODELS / "llama-tied", t_dir, tmp_path / "out", "--rank", "2", "--dtype", "float16"],
                      t_dir, [t_dir], tmp_path, True)
    assert "does not fit in float16" in err and CHANGED in err, err


# ============ class 6: batch manifests ============

HEAD = '[[job]]\nname = "j"\nop = "rescale"\nadapter = "ad/x"\n'
MANIFESTS = {
    "deep_array": HEAD + 'output = "o/x"\nto = ' + "[" * 5000 + "]" * 5000 + "\n",
    "deep_inline_table": 'x = ' + "{a = " * 3000 + "1" + "}" * 3000 + "\n",
    "nested_40": HEAD + 'output = "o/x"\nto = ' + "[" * 40 + "]" * 40 + "\n",
    "defaults_int": "defaults = 5\n" + HEAD + 'output = "o/x"\n',
    "defaults_list": "defaults = [1]\n" + HEAD + 'output = "o/x"\n',
    "defaults_wrong_type": '[defaults]\nstrength = "big"\n' + HEAD + 'output = "o/x"\n',
    "job_ints": "job = [1, 2]\n",
    "job_string": 'job = "x"\n',
    "job_table": '[job]\nname = "j"\nop = "rescale"\nadapter = "ad/x"\noutput = "o/x"\n',
    "job_mixed": 'job = [{name = "j", op = "rescale", adapter = "ad/x", output = "o/x"}, 3]\n',
    "list_of_wrong_type": '[[job]]\nname = "j"\nop = "extract"\nbase = "ad/x"\ntuned = "ad/x"\noutput = "o/x"\nrank = 2\ntarget = [1, 2]\n',
    "list_nested_list": '[[job]]\nname = "j"\nop = "extract"\nbase = "ad/x"\ntuned = "ad/x"\noutput = "o/x"\nrank = 2\ntarget = [["q_proj"]]\n',
    "weights_strings": '[[job]]\nname = "j"\nop = "stack"\nadapters = ["ad/x", "ad/x"]\noutput = "o/x"\nweights = ["1", "2"]\n',
    "quoted_int_key": HEAD + 'output = "o/x"\n"1" = 2\n',
    "unknown_field": HEAD + 'output = "o/x"\nbogus = 1\n',
    "pattern_attr": HEAD + 'output = "o/{name.foo}"\n',
    "pattern_index": HEAD + 'output = "o/{name[0]}"\n',
    "pattern_positional": HEAD + 'output = "o/{0}"\n',
    "pattern_empty": HEAD + 'output = "o/{}"\n',
    "pattern_conversion": HEAD + 'output = "o/{name!r}"\n',
    "pattern_spec": HEAD + 'output = "o/{name:>10}"\n',
    "pattern_unknown": HEAD + 'output = "o/{foo}"\n',
    "pattern_dunder": HEAD + 'output = "o/{job.__class__.__mro__}"\n',
    "pattern_escaped": HEAD + 'output = "o/{{name}}"\n',
    "pattern_lone_brace": HEAD + 'output = "o/{name"\n',
    "output_not_string": HEAD + "output = 5\n",
    "alias_dotdot": HEAD + 'output = "o/x"\n' + HEAD.replace('"j"', '"k"') + 'output = "o/z/../x"\n',
    "alias_dot": HEAD + 'output = "o/x"\n' + HEAD.replace('"j"', '"k"') + 'output = "o/./x"\n',
    "alias_trailing_slash": HEAD + 'output = "o/x"\n' + HEAD.replace('"j"', '"k"') + 'output = "o/x//"\n',
    "alias_symlinked_folder": HEAD + 'output = "o/x"\n' + HEAD.replace('"j"', '"k"') + 'output = "olink/x"\n',
    "alias_absolute": HEAD + 'output = "o/x"\n' + HEAD.replace('"j"', '"k"') + 'output = "{root}/o/x"\n',
    "output_is_input": HEAD + 'output = "ad/x"\n',
    "output_inside_input": HEAD + 'output = "ad/x/out"\n',
    "output_holds_input": HEAD + 'output = "ad"\n',
    "output_via_link_into_input": HEAD + 'output = "adlink/x/sub"\n',
}


# a field of the wrong type or holding a NUL byte: one line naming the manifest, the job and the field
OUT_X = 'output = "o/x"\n'
FIELD_MANIFESTS = {  # case: (manifest, the job as errors name it, the field)
    "op_list": ('[[job]]\nname = "j"\nop = ["rescale"]\nadapter = "ad/x"\n' + OUT_X, "job 'j'", "op"),
    "op_table": ('[[job]]\nname = "j"\nop = {a = 1}\nadapter = "ad/x"\n' + OUT_X, "job 'j'", "op"),
    "op_int": ('[[job]]\nname = "j"\nop = 3\nadapter = "ad/x"\n' + OUT_X, "job 'j'", "op"),
    "name_list": ('[[job]]\nname = ["j"]\nop = "rescale"\nadapter = "ad/x"\n' + OUT_X, "job #1", "name"),
    "name_table_op_list": ('[[job]]\nname = {a = 1}\nop = ["x"]\nadapter = "ad/x"\n' + OUT_X, "job #1", "name"),
    "output_nul": (HEAD + 'output = "o/\\u0000x"\n', "job 'j'", "output"),
    "input_nul": ('[[job]]\nname = "j"\nop = "rescale"\nadapter = "ad/\\u0000x"\n' + OUT_X, "job 'j'", "adapter"),
    "input_list_nul": ('[[job]]\nname = "j"\nop = "stack"\nadapters = ["ad/x", "ad\\u0000"]\n' + OUT_X, "job 'j'", "adapters"),
    "option_nul": (HEAD + OUT_X + 'base = "m\\u0000"\n', "job 'j'", "base"),
    "key_nul": (HEAD + OUT_X + '"b\\u0000" = 1\n', "job 'j'", "b"),
    "input_name_too_long": ('[[job]]\nname = "j"\nop = "rescale"\nadapter = "ad/' + "x" * 300 + '"\n' + OUT_X, "job 'j'", "adapter"),
}
MANIFESTS.update({f"field_{case}": text for case, (text, _, _) in FIELD_MANIFESTS.items()})
MANIFESTS.update({
    "defaults_nul": '[defaults]\ndevice = "cp\\u0000u"\n' + HEAD + OUT_X,
    "version_bool": "version = true\n" + HEAD + OUT_X,
    "version_float": "version = 1.0\n" + HEAD + OUT_X,
})


@pytest.fixture(scope="module")
def batch_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("batch")
    (root / "ad").mkdir()
    shutil.copytree(ADAPTERS / "llama-lora", root / "ad" / "x")
    (root / "o").mkdir()
    os.symlink(root / "o", root / "olink")
    os.symlink(root / "ad", root / "adlink")
    return root


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_bad_manifest_refused(case, batch_root, tmp_path):
    f = tmp_path / f"{case}.toml"
    f.write_text(MANIFESTS[case].replace("{root}", str(tmp_path)))
    (tmp_path / "ad").symlink_to(batch_root / "ad")
    (tmp_path / "adlink").symlink_to(batch_root / "adlink")
    (tmp_path / "o").mkdir()
    (tmp_path / "olink").symlink_to(tmp_path / "o")
    before = tree_hash(batch_root / "ad")
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["batch", str(f), "-j", "1"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("error: ") and "\n" not in err and f.name in err, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert not any((tmp_path / "o").iterdir()) and tree_hash(batch_root / "ad") == before


@pytest.mark.parametrize("case", list(FIELD_MANIFESTS))
def test_manifest_errors_name_the_job_and_the_field(case, batch_root, tmp_path):
    text, job, field = FIELD_MANIFESTS[case]
    f = tmp_path / "m.toml"
    f.write_text(text)
    (tmp_path / "ad").symlink_to(batch_root / "ad")
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["batch", str(f), "-j", "1"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith(f"error: {f}: line ") and "\n" not in err, res.output
    assert f": {job}: " in err and repr(field)[1:-1] in err.split(f"{job}: ", 1)[1], err
    assert not (tmp_path / "o").exists()


def test_manifest_that_is_a_fifo_is_refused_at_once(tmp_path):
    """The manifest is a file the user names: the regular-file rule applies (a FIFO would block the read forever)."""
    os.mkfifo(tmp_path / "m.toml")
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, ["batch", str(tmp_path / "m.toml"), "-j", "1"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("error: ") and "\n" not in err and "FIFO" in err, res.output


def test_good_patterns_still_work(batch_root, tmp_path):
    f = tmp_path / "ok.toml"
    f.write_text(HEAD.replace('"ad/x"', f'"{batch_root}/ad/*/"') + 'output = "o/{job}-{name}"\nto = "rslora"\n')
    res = CliRunner().invoke(cli, ["batch", str(f), "-j", "1", "-q"])
    assert res.exit_code == 0 and (tmp_path / "o" / "j-x" / "adapter_config.json").is_file(), res.output


# ============ numeric options from any source: NaN passes click's FloatRange, TOML has nan, inf, long integers ============

L, M = ADAPTERS / "llama-lora", MODELS / "llama-tied"
NUMERIC_OPTIONS = {  # case: (argv without OUT's placeholder filled, the option the error names)
    "rerank_energy_nan": (["rerank", L, "{out}", "--energy", "nan"], "energy"),
    "rerank_sv_ratio_nan": (["rerank", L, "{out}", "--sv-ratio", "nan"], "sv_ratio"),
    "rerank_sv_ratio_inf": (["rerank", L, "{out}", "--sv-ratio", "inf"], "sv_ratio"),
    "rerank_sv_fro_nan": (["rerank", L, "{out}", "--sv-fro", "nan"], "sv_fro"),
    "rerank_pad_to_huge": (["rerank", L, "{out}", "--pad-to", "1" + "0" * 20], "pad_to"),
    "rerank_pad_to_10g": (["rerank", L, "{out}", "--pad-to", "10000000000"], "pad_to"),
    "extract_energy_nan": (["extract", M, MODELS / "llama-untied", "{out}", "--energy", "nan", "-q"], "energy"),
    "stack_seed_huge": (["stack", L, L, "{out}", "--method", "dare_linear", "--density", "0.5", "--seed", "1" + "0" * 30], "seed"),
    "stack_density_nan": (["stack", L, L, "{out}", "--method", "ties", "--density", "nan"], "density"),
    "convert_max_error_nan": (["convert", L, "{out}", "--for", "vllm", "--max-error", "nan"], "max_error"),
    "convert_energy_nan": (["convert", L, "{out}", "--for", "vllm", "--energy", "nan"], "energy"),
    "diff_atol_nan": (["diff", L, L, "--atol", "nan"], "atol"),
    "diff_rtol_inf": (["diff", L, L, "--rtol", "inf"], "rtol"),
    "analyze_epsilon_nan": (["analyze", L, "--base", M, "--intruders", "--intruder-epsilon", "nan"], "intruder_epsilon"),
    "check_max_lora_rank_huge": (["check", L, "--for", "vllm", "--max-lora-rank", "1" + "0" * 30], "max_lora_rank"),
}


@pytest.mark.parametrize("case", list(NUMERIC_OPTIONS))
def test_numeric_option_out_of_range_is_one_error_line(case, tmp_path):
    argv, option = NUMERIC_OPTIONS[case]
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, [str(a).replace("{out}", str(tmp_path / "out")) for a in argv])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith(f"error: {option} must be") and "\n" not in err, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("field,value", [("energy", "nan"), ("energy", "inf"), ("energy", "1" + "0" * 400), ("rank", "1" + "0" * 30)])
def test_manifest_numbers_are_checked_before_any_work(field, value, batch_root, tmp_path):
    f = tmp_path / "m.toml"
    f.write_text('[[job]]\nname = "j"\nop = "rerank"\nadapter = "ad/x"\noutput = "o/x"\n' + f"{field} = {value}\n")
    (tmp_path / "ad").symlink_to(batch_root / "ad")
    res = CliRunner().invoke(cli, ["batch", str(f), "-j", "1"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith(f"error: {f}: line 6: job 'j': {field} must be") and "\n" not in err, res.output
    assert not (tmp_path / "o").exists()


def test_an_allocation_that_fails_is_one_error_line(tmp_path, monkeypatch):
    """torch's CPU allocator raises RuntimeError ('can't allocate memory'), CUDA OutOfMemoryError: not a traceback."""
    import adapterops

    def huge(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 5119999995904 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(adapterops, "rerank", huge)
    res = CliRunner().invoke(cli, ["rerank", str(ADAPTERS / "llama-lora"), str(tmp_path / "out"), "--rank", "2"])
    err = res.stderr.strip()
    assert res.exit_code == 2 and err.startswith("error: not enough memory (tried to allocate 5119999995904 bytes)"), res.output
    assert "\n" not in err

    def bug(*args, **kwargs):
        raise RuntimeError("shape mismatch")  # not a memory error: still a bug, shown as one

    monkeypatch.setattr(adapterops, "rerank", bug)
    res = CliRunner().invoke(cli, ["rerank", str(ADAPTERS / "llama-lora"), str(tmp_path / "out"), "--rank", "2"])
    assert isinstance(res.exception, RuntimeError)


# ============ class 7: lone surrogates in names ============

SURROGATE = "\udcff"


@pytest.fixture(scope="module")
def surrogate_tree(tmp_path_factory) -> Path:
    """Folders whose names hold a lone surrogate (a file name that is not UTF-8: b'\\xff' decodes so)."""
    root = tmp_path_factory.mktemp("sur") / f"s{SURROGATE}"
    root.mkdir()
    shutil.copytree(ADAPTERS / "llama-lora", root / f"lora-{SURROGATE}")
    shutil.copytree(ADAPTERS / "llama-lora", root / f"zero-{SURROGATE}")
    f = root / f"zero-{SURROGATE}" / "adapter_model.safetensors"  # untrained: gives warnings that name the path
    save_file({k: (v if "lora_A" in k else torch.zeros_like(v)) for k, v in read_file(f).items()}, f, {"format": "pt"})
    base = root / f"base-{SURROGATE}"
    shutil.copytree(MODELS / "llama-tied", base)
    tuned = root / f"tuned-{SURROGATE}"
    shutil.copytree(MODELS / "llama-tied", tuned)
    t = read_file(tuned / "model.safetensors")
    t["model.layers.0.self_attn.q_proj.weight"] += 1
    save_file(t, tuned / "model.safetensors", {"format": "pt"})
    (root / "m.toml").write_bytes(
        ('[[job]]\nname = "j"\nop = "analyze"\nadapter = "lora-*"\noutput = "o/{name}.json"\n'
         '[[job]]\nname = "k"\nop = "rescale"\nadapter = "zero-*"\noutput = "o/{name}"\nto = "rslora"\n').encode())
    res = CliRunner().invoke(cli, ["quantize", str(base), str(root / f"nf4-{SURROGATE}"), "-q"])
    assert res.exit_code == 0, res.output
    return root


SURROGATE_COMMANDS = {
    "merge": lambda r, o: ["merge", r / f"base-{SURROGATE}", r / f"zero-{SURROGATE}", o, "-q"],
    "merge-dry-run": lambda r, o: ["merge", r / f"base-{SURROGATE}", r / f"lora-{SURROGATE}", o, "--dry-run"],
    "unmerge": lambda r, o: ["unmerge", r / f"base-{SURROGATE}", r / f"lora-{SURROGATE}", o, "-q"],
    "rescale": lambda r, o: ["rescale", r / f"lora-{SURROGATE}", o, "--to", "rslora"],
    "rerank": lambda r, o: ["rerank", r / f"lora-{SURROGATE}", o, "--rank", "2"],
    "stack": lambda r, o: ["stack", r / f"lora-{SURROGATE}", r / f"zero-{SURROGATE}", o],
    "extract": lambda r, o: ["extract", r / f"base-{SURROGATE}", r / f"tuned-{SURROGATE}", o, "--rank", "2", "-q"],
    "quantize": lambda r, o: ["quantize", r / f"base-{SURROGATE}", o, "-q"],
    "dequantize": lambda r, o: ["dequantize", r / f"nf4-{SURROGATE}", o, "-q"],
    "analyze": lambda r, o: ["analyze", r / f"zero-{SURROGATE}", "--base", r / f"base-{SURROGATE}", "--compare", r / f"lora-{SURROGATE}"],
    "inspect-adapter": lambda r, o: ["inspect", r / f"zero-{SURROGATE}"],
    "inspect-checkpoint": lambda r, o: ["inspect", r / f"nf4-{SURROGATE}", "--scan"],
    "diff": lambda r, o: ["diff", r / f"lora-{SURROGATE}", r / f"zero-{SURROGATE}"],
    "batch": lambda r, o: ["batch", r / "m.toml", "-j", "1"],
    "error": lambda r, o: ["rescale", r / f"lora-{SURROGATE}", r / f"nothing-{SURROGATE}" / "x" / ".." / "..", "--to", "rslora"],
}


@pytest.mark.parametrize("mode", ["text", "json", "json-file"])
@pytest.mark.parametrize("command", list(SURROGATE_COMMANDS))
def test_surrogate_names_in_every_output(command, mode, surrogate_tree, tmp_path):
    out = tmp_path / f"out-{SURROGATE}"
    argv = [str(a) for a in SURROGATE_COMMANDS[command](surrogate_tree, out)]
    report = tmp_path / f"report-{SURROGATE}.json"
    argv += {"text": [], "json": ["--json"], "json-file": ["--json-file", str(report)]}[mode]
    if command == "batch":
        shutil.rmtree(surrogate_tree / "o", ignore_errors=True)
    with deadline(DEADLINE_S):
        res = CliRunner().invoke(cli, argv)
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert "Traceback" not in res.output and res.exit_code in (0, 1, 2), res.output
    assert SURROGATE not in res.stdout + res.stderr  # escaped, never raw (no terminal can print it)
    if res.exit_code == 2:
        assert res.stderr.count("error: ") == 1 and "\\udcff" in res.stderr, res.stderr
        return
    if mode == "json":
        json.loads(res.stdout)
    if mode == "json-file":
        json.loads(report.read_text(encoding="utf-8"))
    if command == "batch":
        reports = list((surrogate_tree / "o").glob("*.json"))
        assert reports and all(json.loads(p.read_text(encoding="utf-8")) for p in reports)


def _surrogate_header(d: Path, fixture: str, kind: str):
    """A safetensors file whose header names a tensor with a lone surrogate (as another tool could write it)."""
    src = copy_fixture(kind, fixture, d)
    f = src / ("adapter_model.safetensors" if kind == "adapter" else "model.safetensors")
    t = read_file(f)
    key = next(k for k in t if "q_proj" in k)
    t[key.replace("q_proj", f"q{SURROGATE}proj")] = t.pop(key)
    save_file(t, f, {"format": "pt"})
    return src, f


@pytest.mark.parametrize("mode", [[], ["--json"]])
@pytest.mark.parametrize("command", list(COMMANDS))
def test_surrogate_tensor_name_in_adapter_header(command, mode, built, tmp_path):
    ad, f = built.get("sur-adapter", lambda d: _surrogate_header(d, "llama-lora", "adapter"))
    argv, writes = COMMANDS[command]
    args = [str(a) for a in argv(ad, tmp_path / "out")] + (mode if command in ("analyze", "inspect", "diff") else [])
    err = run_refused(args, f, [ad], tmp_path, writes)
    assert SURROGATE not in err and "\\udcff" in err, err


@pytest.mark.parametrize("command", ["merge", "unmerge", "quantize", "dequantize", "extract-base", "inspect", "diff", "analyze-base"])
def test_surrogate_tensor_name_in_checkpoint_header(command, built, tmp_path):
    from test_corpus import _ckpt_commands

    base, f = built.get("sur-ckpt", lambda d: _surrogate_header(d, "llama-tied", "model"))
    argv, writes = _ckpt_commands(ADAPTERS / "llama-lora")[command]
    err = run_refused(argv(base, tmp_path / "out"), f, [base], tmp_path, writes)
    assert SURROGATE not in err, err


def test_case_counts():
    """The report quotes these counts (variants per class)."""
    assert len(EMPTY_CASES) >= 5 and len(NON_FLOAT) >= 6 and len(REPLACED) >= 5 and len(WEIGHTS) >= 5
    assert len(BIG) >= 4 and len(MANIFESTS) >= 30 and len(SURROGATE_COMMANDS) >= 14


def test_fails_cleanly_is_shared():
    assert fails_cleanly.__module__ == "test_corpus"
