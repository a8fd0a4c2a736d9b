"""`adapterops convert` as one command: --for ENGINE, --to/--from FORMAT, or both, through the CLI.

The format layer itself (exactness, refusals, consumers) is tested in test_formats.py and test_formats_interop.py,
the engine layer in test_serving.py; this file checks that the command composes them and reports what it did.
Tolerance: ΔW equality in float32 to 1e-6 relative where scales are folded into lora_B (one float32 rounding of
s·B), exact equality where the source's scales survive.
"""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, copy_fixture, read_file

from adapterops.cli import cli
from adapterops.core.lora import delta_weight
from adapterops.io.adapter import open_adapter
from adapterops.io.safetensors_io import save_file

BASE = MODELS / "llama-tied"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def deltas(path) -> dict[str, torch.Tensor]:
    """Every module's ΔW = s·B·A (float64) of a PEFT adapter."""
    with open_adapter(path) as ad:
        return {n: delta_weight(m.kind, ad.read(m.a_key).double(), ad.read(m.b_key).double(), m.scale) for n, m in ad.modules.items()}


def assert_same_deltas(a, b, rtol=1e-6):
    da, db = deltas(a), deltas(b)
    assert sorted(da) == sorted(db)
    for name in da:
        err = float((da[name] - db[name]).norm() / da[name].norm())
        assert err <= rtol, (name, err)


@pytest.mark.parametrize("fmt,target", [("mlx", "mlx-out"), ("torchtune", "tt-out"), ("gguf", "out.gguf")])
@pytest.mark.parametrize("adapter", ["llama-lora", "llama-rslora-patterns"])
def test_to_a_format_and_back_keeps_every_delta(fmt, target, adapter, tmp_path):
    if fmt == "gguf":
        pytest.importorskip("gguf", reason="the gguf package (the gguf extra; the dev extra installs it)")
    there = run("convert", ADAPTERS / adapter, tmp_path / target, "--to", fmt, "--base", BASE, "--json")
    assert there.exit_code == 0, there.output
    report = json.loads(there.stdout)
    assert report["from_format"] == "peft" and report["to"] == fmt and report["engine"] is None
    assert report["check"] == "not run" and report["formats"][0]["to_format"] == fmt
    back = run("convert", tmp_path / target, tmp_path / "back", "--to", "peft", "--base", BASE,  # source detected
               *(["--allow-pickle"] if fmt == "torchtune" else []))  # torchtune's adapter_model.pt is a pickle
    assert back.exit_code == 0, back.output
    assert f"from {fmt} to peft" in back.stdout
    assert_same_deltas(ADAPTERS / adapter, tmp_path / "back")


def test_for_an_engine_and_into_gguf_in_one_command(tmp_path):
    pytest.importorskip("gguf", reason="the gguf package (the gguf extra; the dev extra installs it)")
    res = run("convert", ADAPTERS / "llama-rslora-patterns", tmp_path / "x.gguf", "--for", "llamacpp", "--to", "gguf",
              "--base", BASE, "--json")
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert report["engine"] == "llamacpp" and report["to"] == "gguf" and report["check"] == "fine"
    assert len(report["formats"]) == 1 and (tmp_path / "x.gguf").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".adapterops")]  # no temporary folder left
    back = run("convert", tmp_path / "x.gguf", tmp_path / "back", "--to", "peft", "--base", BASE)
    assert back.exit_code == 0, back.output
    assert_same_deltas(ADAPTERS / "llama-rslora-patterns", tmp_path / "back")


def test_report_follows_the_schema(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(resources.files("adapterops").joinpath("schemas/convert-1.schema.json").read_text())
    for argv in (["--to", "mlx", "--base", BASE], ["--for", "sglang"]):
        res = run("convert", ADAPTERS / "llama-rslora-patterns", tmp_path / argv[1], *argv, "--json")
        assert res.exit_code == 0, res.output
        jsonschema.validate(json.loads(res.stdout), schema)


@pytest.mark.parametrize("argv,needle", [
    ([], "--for ENGINE"),
    (["--to", "mlx", "--rank", "4"], "--rank"),
    (["--to", "mlx", "--max-lora-rank", "8"], "--max-lora-rank"),
    (["--to", "gguf", "--revision", "main"], "--revision"),
])
def test_options_that_cannot_apply(argv, needle, tmp_path):
    res = run("convert", ADAPTERS / "llama-lora", tmp_path / "o", *argv)
    assert res.exit_code == 2 and needle in res.stderr, res.output
    assert not (tmp_path / "o").exists()


def test_converting_to_the_format_it_already_is_is_refused(tmp_path):
    res = run("convert", ADAPTERS / "llama-lora", tmp_path / "o", "--to", "peft")
    assert res.exit_code == 2 and res.stderr.startswith("error: ") and "already a peft adapter" in res.stderr


def test_dora_into_a_format_without_magnitudes_is_refused_with_the_reason(tmp_path):
    dora = copy_fixture("adapter", "llama-dora", tmp_path)  # without its embedding LoRA, which is refused first
    tensors = read_file(dora / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "embed_tokens" not in k}, dora / "adapter_model.safetensors", {"format": "pt"})
    res = run("convert", dora, tmp_path / "o", "--to", "mlx", "--base", BASE)
    assert res.exit_code == 2 and "DoRA" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv", [[], ["--from", "gguf"]])
def test_a_source_file_that_is_not_a_regular_file_is_refused_as_such(argv, tmp_path):
    """ADAPTER named as a file (a GGUF) is the user's: it must be a regular file; a FIFO is said to be one, never
    opened (it would block) nor mistaken for another format."""
    import os

    os.mkfifo(tmp_path / "x.gguf")
    res = run("convert", tmp_path / "x.gguf", tmp_path / "o", "--to", "peft", *argv)
    assert res.exit_code == 2 and "x.gguf: is a FIFO, not a regular file" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "o").exists()
