"""The `adapterops merge` command as a user runs it, through click's CliRunner."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, raw_bytes, read_all, read_file, tree_hash

from adapterops.cli import cli
from adapterops.io.safetensors_io import SafetensorsFile


def run(*args: str):
    """Invoke the CLI and return the result."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_merge_json_summary_and_files(out):
    before = tree_hash(MODELS / "llama-tied"), tree_hash(ADAPTERS / "llama-lora")
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", out, "--json")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["modules_merged"] == 14
    assert summary["tensors_written"] == 20
    assert summary["tensors_changed"] == 14
    assert summary["bytes_written"] == sum(t.numel() * t.element_size() for t in read_all(out).values())
    assert summary["device"] == "cpu" and summary["seconds"] >= 0
    # every non-weight file is copied, bytes unchanged
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (MODELS / "llama-tied" / name).read_bytes()
    with SafetensorsFile(out / "model.safetensors") as f:
        assert f.metadata == {"format": "pt"}
    assert (tree_hash(MODELS / "llama-tied"), tree_hash(ADAPTERS / "llama-lora")) == before


def test_sharded_base_keeps_its_split_and_index(out):
    res = run("merge", MODELS / "llama-untied", ADAPTERS / "llama-lora-bias", out, "-q")
    assert res.exit_code == 0, res.output
    base_index = json.loads((MODELS / "llama-untied" / "model.safetensors.index.json").read_text())
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == base_index["weight_map"]
    sizes = sum(t.numel() * t.element_size() for t in read_all(out).values())
    assert index["metadata"]["total_size"] == sizes
    assert "merged 4 modules" in res.stdout


def test_max_shard_size_resplits(out, peft_reference):
    """Tolerance: none; the resplit output has PEFT's bytes, computed live on this CPU (tests/references.py)."""
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", out, "--max-shard-size", "60KB", "-q")
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    ours = read_all(out)
    golden = peft_reference["llama-lora-bf16"][0]
    assert sorted(ours) == sorted(golden) and all(raw_bytes(ours[k]) == raw_bytes(golden[k]) for k in golden)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in ours.values())


def test_weights_option_matches_weighted_peft_merge(out, peft_reference):
    """Tolerance: none; against PEFT's weighted merge computed live on this CPU (tests/references.py)."""
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns", "--weights", "1,0.5", out, "-q")
    assert res.exit_code == 0, res.output
    ours, golden = read_all(out), peft_reference["llama-two-weighted"][0]
    assert sorted(ours) == sorted(golden) and all(raw_bytes(ours[k]) == raw_bytes(golden[k]) for k in golden)


def test_dtype_option_writes_that_dtype_and_config(out):
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", out, "--dtype", "float16", "-q")
    assert res.exit_code == 0, res.output
    assert {t.dtype for t in read_all(out).values()} == {__import__("torch").float16}
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"


def test_dry_run_writes_nothing(out):
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-dora", out, "--dry-run")
    assert res.exit_code == 0, res.output
    assert not out.exists()
    assert "model.layers.0.self_attn.q_proj.weight: dora model.layers.0.self_attn.q_proj r=4 scale=2" in res.stdout
    assert "7 modules would be merged" in res.stdout


def test_existing_output_needs_force(out):
    out.mkdir()
    (out / "old.txt").write_text("keep me unless --force")
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", out, "-q")
    assert res.exit_code == 2
    assert "not empty" in res.stderr and (out / "old.txt").exists()
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", out, "-q", "--force")
    assert res.exit_code == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()


def test_output_inside_input_is_refused(tmp_path):
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", MODELS / "llama-tied" / "merged", "-q")
    assert res.exit_code == 2 and "overlaps the input" in res.stderr
    assert not (MODELS / "llama-tied" / "merged").exists()


def test_help_teaches_with_examples():
    res = run("merge", "--help")
    assert res.exit_code == 0
    assert "--weights 1,0.5" in res.stdout and "Examples" in res.stdout
    assert run("--version").stdout.startswith("adapterops")


def test_missing_out_argument_is_a_usage_error():
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(ADAPTERS / "llama-lora")])
    assert res.exit_code == 2 and "OUT" in res.output


def test_stale_temporary_folder_of_a_killed_run_is_removed(out):
    """A run killed outright (SIGKILL) leaves its temporary folder; the next run clears it and succeeds."""
    stale = out.parent / f".{out.name}.adapterops-tmp-99999999-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", out, "-q")
    assert res.exit_code == 0, res.output
    assert not stale.exists() and (out / "model.safetensors").exists()


def test_max_shard_size_counts_output_sizes(out):
    """The split uses output sizes: --dtype float32 doubles bf16 tensors, and an untied lm_head copy is a full matrix."""
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-tied-mts", out, "--max-shard-size", "40KB", "--dtype", "float32", "-q")
    assert res.exit_code == 0, res.output
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = read_file(out / shard)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        assert nbytes <= 40_000 or len(tensors) == 1, shard
    assert "lm_head.weight" in index["weight_map"]


# ---- --json-file (and --plot) are checked before any work: exit 2 writes nothing, and never over an input ----

def _report_case(tmp_path, case):
    """(argv's --json-file value, the adapter to merge) for one bad report path; inputs are writable copies, so a
    report written over one would show."""
    import os
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(ADAPTERS / "llama-lora", ad)
    out = tmp_path / "out"
    if case == "folder":
        (tmp_path / "d").mkdir()
        return tmp_path / "d", ad
    if case == "trailing_slash":
        return f"{tmp_path / 'new'}/", ad
    if case == "under_a_file":
        (tmp_path / "f").write_text("")
        return tmp_path / "f" / "sub" / "r.json", ad
    if case == "fifo":
        os.mkfifo(tmp_path / "pipe.json")
        return tmp_path / "pipe.json", ad
    if case == "input_file":
        return ad / "adapter_config.json", ad
    if case == "inside_input":
        return ad / "report.json", ad
    if case == "input_via_symlink":
        (tmp_path / "link.json").symlink_to(ad / "adapter_config.json")
        return tmp_path / "link.json", ad
    if case == "base_file":
        base = tmp_path / "base"
        shutil.copytree(MODELS / "llama-tied", base)
        return base / "config.json", ad
    if case == "is_out":
        return out, ad
    if case == "inside_out":
        return out / "report.json", ad
    raise AssertionError(case)


REPORT_CASES = ["folder", "trailing_slash", "under_a_file", "fifo", "input_file", "inside_input", "input_via_symlink",
                "base_file", "is_out", "inside_out"]


@pytest.mark.parametrize("case", REPORT_CASES)
def test_bad_json_file_is_refused_before_any_work(case, tmp_path):
    import signal

    report, ad = _report_case(tmp_path, case)
    base = tmp_path / "base" if (tmp_path / "base").exists() else MODELS / "llama-tied"
    before = tree_hash(ad), tree_hash(base)
    signal.alarm(60)  # a FIFO opened for writing would block: fail instead of hanging
    try:
        res = run("merge", base, ad, tmp_path / "out", "-q", "--json-file", report)
    finally:
        signal.alarm(0)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and str(report).rstrip("/") in err, err
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if ".adapterops-tmp-" in p.name]
    assert (tree_hash(ad), tree_hash(base)) == before and not (tmp_path / "new").exists()


def test_json_file_in_a_folder_without_write_permission_is_refused_first(tmp_path, monkeypatch):
    """os.access says no (as for a read-only folder, which root could write anyway): refused before the merge runs."""
    import os

    from adapterops.cli import common

    (tmp_path / "ro").mkdir()
    real = os.access
    monkeypatch.setattr(common.os, "access", lambda p, mode, **kw: False if str(p) == str(tmp_path / "ro") else real(p, mode, **kw))
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "out", "-q", "--json-file", tmp_path / "ro" / "r.json")
    assert res.exit_code == 2 and "no permission to write" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(__import__("os").geteuid() == 0, reason="root writes into a read-only folder")
def test_json_file_in_a_read_only_folder_is_refused_first(tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "out", "-q", "--json-file", tmp_path / "ro" / "r.json")
    finally:
        (tmp_path / "ro").chmod(0o700)
    assert res.exit_code == 2 and "no permission to write" in res.stderr, res.output
    assert not (tmp_path / "out").exists()


def test_json_file_through_a_symlink_writes_its_target_and_in_new_folders(tmp_path):
    """A symlink to a report file is followed (the link stays); missing folders above the report are made."""
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "r.json").write_text("old")
    (tmp_path / "link.json").symlink_to(tmp_path / "reports" / "r.json")
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "out", "-q", "--json-file", tmp_path / "link.json")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "link.json").is_symlink() and json.loads((tmp_path / "reports" / "r.json").read_text())["modules_merged"] == 14
    res = run("analyze", ADAPTERS / "llama-lora", "--json-file", tmp_path / "a" / "b" / "r.json")
    assert res.exit_code == 0 and json.loads((tmp_path / "a" / "b" / "r.json").read_text()), res.output


@pytest.mark.parametrize("option", ["--json-file", "--plot"])
def test_analyze_report_files_never_replace_an_input(option, tmp_path):
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(ADAPTERS / "llama-lora", ad)
    before = tree_hash(ad)
    for target in (ad / "adapter_model.safetensors", ad / "report.png"):
        res = run("analyze", ad, option, target)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and str(target) in res.stderr, res.output
    res = run("analyze", ad, "--json-file", tmp_path / "same", "--plot", tmp_path / "same")  # one file, two reports
    assert res.exit_code == 2 and "same" in res.stderr, res.output
    assert tree_hash(ad) == before and not (tmp_path / "same").exists()


def test_batch_report_inside_a_task_output_is_refused_before_any_work(tmp_path):
    import shutil

    shutil.copytree(ADAPTERS / "llama-lora", tmp_path / "ad")
    (tmp_path / "m.toml").write_text('[[job]]\nname = "j"\nop = "rescale"\nadapter = "ad"\noutput = "o/x"\nto = "rslora"\n')
    for report in (tmp_path / "o" / "x" / "r.json", tmp_path / "o" / "x", tmp_path / "ad" / "r.json", tmp_path / "m.toml"):
        res = run("batch", tmp_path / "m.toml", "-q", "-j", "1", "--json-file", report)
        assert res.exit_code == 2 and res.stderr.count("\n") == 1 and str(report) in res.stderr, res.output
        assert not (tmp_path / "o").exists()
    res = run("batch", tmp_path / "m.toml", "-q", "-j", "1", "--json-file", tmp_path / "o" / "r.json")  # beside: fine
    assert res.exit_code == 0 and json.loads((tmp_path / "o" / "r.json").read_text())["ok"], res.output


def test_failed_run_removes_the_folders_it_made_for_out(tmp_path):
    """OUT's missing parent folders are made for the run, and removed again (only those, only if empty) when it fails."""
    from helpers import adapter_with_tensors

    key = "base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"
    bad = adapter_with_tensors(tmp_path, "llama-lora", lambda t: t[key].__setitem__((0, 0), float("nan")))
    (tmp_path / "keep").mkdir()
    for out in (tmp_path / "a" / "b" / "out", tmp_path / "keep" / "c" / "out"):
        res = run("merge", MODELS / "llama-tied", bad, out, "-q")
        assert res.exit_code == 2 and "NaN" in res.stderr, res.output
    assert not (tmp_path / "a").exists() and (tmp_path / "keep").is_dir() and not any((tmp_path / "keep").iterdir())
    res = run("merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", tmp_path / "a" / "b" / "out", "-q")
    assert res.exit_code == 0 and (tmp_path / "a" / "b" / "out" / "model.safetensors").is_file()


@pytest.mark.skipif(not __import__("os").path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["inspect", ADAPTERS / "llama-lora"], ["inspect", ADAPTERS / "llama-lora", "--json"]])
def test_stdout_that_cannot_be_written_is_one_error_line(argv):
    """stdout on a full disk: one error line on stderr and exit 2, not an OSError traceback."""
    import subprocess
    import sys

    with open("/dev/full", "w") as full:
        res = subprocess.run([sys.executable, "-m", "adapterops", *map(str, argv)], stdout=full, stderr=subprocess.PIPE,
                             text=True, timeout=120, check=False)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr == "error: cannot write to standard output: No space left on device\n", res.stderr
