"""One command-line convention for every command: --json prints JSON, --json-file writes it, options that cannot
apply are usage errors, notes are not warnings, text is for people, progress bars stay out of logs."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, copy_fixture, read_file

from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.mark.parametrize("argv", [
    ["merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", "{out}"],
    ["rescale", ADAPTERS / "llama-lora", "{out}", "--to", "rslora"],
    ["rerank", ADAPTERS / "llama-lora", "{out}", "--rank", "2"],
    ["stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora", "{out}"],
    ["analyze", ADAPTERS / "llama-lora"],
    ["inspect", ADAPTERS / "llama-lora"],
    ["diff", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora"],
], ids=lambda a: a[0])
def test_json_prints_and_json_file_writes_the_same_document(argv, tmp_path):
    argv = [str(a).replace("{out}", str(tmp_path / "o1")) for a in argv]
    printed = run(*argv, "--json")
    assert printed.exit_code == 0, printed.output
    data = json.loads(printed.stdout)
    argv2 = [a.replace(str(tmp_path / "o1"), str(tmp_path / "o2")) for a in argv]
    written = run(*argv2, "--json-file", tmp_path / "r.json")
    assert written.exit_code == 0, written.output
    assert not written.stdout.lstrip().startswith("{")  # the text for people, not the JSON
    again = json.loads((tmp_path / "r.json").read_text())
    assert set(again) == set(data)


def test_json_file_in_an_unwritable_place_is_one_error_line(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "file").write_text("")
    res = run("analyze", ADAPTERS / "llama-lora", "--json-file", tmp_path / "ro" / "file" / "r.json")  # under a file
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.output
    assert "r.json" in res.stderr


def test_a_nul_byte_in_any_argument_is_a_usage_error(tmp_path):
    for argv in (["analyze", "ad\0x"], ["merge", "a", "b\0", str(tmp_path / "o")], ["inspect", "x", "--json-file", "r\0.json"]):
        res = run(*argv)
        assert res.exit_code == 2 and "NUL byte" in res.stderr and "Traceback" not in res.output, res.output


@pytest.mark.parametrize("argv,option", [
    (["stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora", "{out}", "--rank", "4"], "--rank"),
    (["stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora", "{out}", "--split", "b"], "--split"),
    (["stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora", "{out}", "--precision", "float64"], "--precision"),
    (["extract", MODELS / "llama-tied", MODELS / "llama-tied", "{out}", "--rank", "2", "--max-rank", "4"], "--max-rank"),
    (["analyze", ADAPTERS / "llama-lora", "--json", "--all"], "--all"),
    (["analyze", ADAPTERS / "llama-lora", "--revision", "main"], "--revision"),
], ids=lambda a: a if isinstance(a, str) else a[0])
def test_options_that_cannot_apply_are_usage_errors(argv, option, tmp_path):
    res = run(*[str(a).replace("{out}", str(tmp_path / "o")) for a in argv])
    assert res.exit_code == 2 and option in res.stderr and "only" in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_stack_svd_accepts_its_options(tmp_path):
    res = run("stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-lora", tmp_path / "o", "--method", "svd", "--rank", "4")
    assert res.exit_code == 0, res.output


def test_dora_note_does_not_fail_strict():
    res = run("analyze", ADAPTERS / "llama-dora", "--strict")
    assert res.exit_code == 0, res.output
    assert "note: DoRA" in res.stdout and "warning:" not in res.output


def test_inspect_prints_values_not_python_reprs():
    res = run("inspect", ADAPTERS / "llama-lora")
    assert "{" not in res.stdout and "[" not in res.stdout and "'" not in res.stdout, res.stdout
    assert "  dtypes: " in res.stdout


def test_scan_says_what_it_found(tmp_path):
    clean = run("inspect", MODELS / "llama-tied", "--scan")
    assert clean.exit_code == 0 and "no NaN/Inf found" in clean.stdout
    model = copy_fixture("model", "llama-tied", tmp_path)
    tensors = read_file(model / "model.safetensors")
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, model / "model.safetensors", {"format": "pt"})
    bad = run("inspect", model, "--scan")
    assert bad.exit_code == 1 and "1 with NaN/Inf" in bad.stdout and name in bad.stdout
    assert "scan:" not in run("inspect", MODELS / "llama-tied").stdout  # headers only: no claim about values


def test_merging_an_untrained_adapter_warns(tmp_path):
    ad = copy_fixture("adapter", "llama-lora", tmp_path)
    tensors = read_file(ad / "adapter_model.safetensors")
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, ad / "adapter_model.safetensors",
              {"format": "pt"})
    res = run("merge", MODELS / "llama-tied", ad, tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.stderr and "all-zero lora_B" in res.stderr and "changes nothing" in res.stderr
    trained = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "o2")
    assert "warning" not in trained.stderr


def test_no_progress_bar_fragments_when_stderr_is_not_a_terminal(tmp_path):
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "o")  # no -q: CliRunner is no tty
    assert res.exit_code == 0 and res.stderr == "", res.stderr


def test_stack_shows_a_progress_bar_on_a_terminal_and_quiet_hides_it(tmp_path, monkeypatch, capsys):
    """A TIES stack of a whole model takes a minute: on a terminal a bar counts its modules; -q (quiet) hides it."""
    import sys

    import adapterops

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    args = ([ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns"],)
    adapterops.stack(*args, tmp_path / "o", method="ties", density=0.5, compat="exact")
    err = capsys.readouterr().err
    assert "stack:" in err and "module" in err
    adapterops.stack(*args, tmp_path / "q", method="ties", density=0.5, compat="exact", quiet=True)
    assert capsys.readouterr().err == ""
    res = run("stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns", tmp_path / "cli", "--method", "ties",
              "--density", "0.5", "--compat", "exact", "-q")
    assert res.exit_code == 0 and res.stderr == "", res.output


def test_help_texts():
    assert run("merge", "--help").stdout.count("Usage:") == 1
    assert "of MERGED" in run("unmerge", "--help").stdout
    rerank_help = run("rerank", "--help").stdout
    assert "--precision" in rerank_help and "Arithmetic of the SVDs" in rerank_help
    stack_help = run("stack", "--help").stdout
    assert "--split" in stack_help and "√S on both factors" in stack_help
