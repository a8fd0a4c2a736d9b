"""Determinism: every command run twice on the same inputs writes byte-identical files (no timestamps anywhere).

Only file names and bytes are compared, metadata included (safetensors headers, configs, JSON reports).
"""

from __future__ import annotations

import shutil

import pytest
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, file_hashes

import adapterops
from adapterops.cli import cli
from adapterops.ops.quantize import quantize


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Inputs some commands need: a merged checkpoint and an NF4 one."""
    root = tmp_path_factory.mktemp("inputs")
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-dora", root / "merged-dora")
    adapterops.merge(MODELS / "llama-tied", ADAPTERS / "llama-lora", root / "merged-lora", dtype="float32")
    quantize(MODELS / "llama-tied", root / "nf4")
    return root


COMMANDS = {
    "merge": lambda p, o: ["merge", MODELS / "llama-tied", ADAPTERS / "llama-lora", o, "-q"],
    "merge-dora-sharded": lambda p, o: ["merge", MODELS / "llama-untied", ADAPTERS / "llama-dora", o, "-q", "--max-shard-size", "50KB"],
    "merge-requantize": lambda p, o: ["merge", p / "nf4", ADAPTERS / "llama-lora", o, "-q", "--requantize"],
    "unmerge": lambda p, o: ["unmerge", p / "merged-dora", ADAPTERS / "llama-dora", o, "-q"],
    "quantize": lambda p, o: ["quantize", MODELS / "gpt2", o, "-q"],
    "dequantize": lambda p, o: ["dequantize", p / "nf4", o, "-q"],
    "rescale": lambda p, o: ["rescale", ADAPTERS / "llama-rslora-patterns", o, "--to", "standard", "--bake"],
    "rerank": lambda p, o: ["rerank", ADAPTERS / "llama-lora", o, "--energy", "0.9"],
    "stack-cat": lambda p, o: ["stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns", o],
    "stack-svd": lambda p, o: ["stack", ADAPTERS / "llama-lora", ADAPTERS / "llama-rslora-patterns", o, "--method", "svd"],
    "extract": lambda p, o: ["extract", MODELS / "llama-tied", p / "merged-lora", o, "--energy", "0.95", "-q"],
    "analyze": lambda p, o: ["analyze", ADAPTERS / "llama-lora", "--base", MODELS / "llama-tied", "--compare",
                             ADAPTERS / "llama-rslora-patterns", "--json-file", o],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_twice_gives_the_same_bytes(command, prepared, tmp_path):
    outs = []
    for n in (1, 2):
        out = tmp_path / f"run{n}" / ("report.json" if command == "analyze" else "out")
        res = CliRunner().invoke(cli, [str(a) for a in COMMANDS[command](prepared, out)])
        assert res.exit_code == 0, res.output
        outs.append(file_hashes(out))
    assert outs[0] == outs[1] and outs[0]


def test_plot_twice_gives_the_same_bytes(tmp_path):
    pytest.importorskip("matplotlib")
    for n in (1, 2):
        res = CliRunner().invoke(cli, ["analyze", str(ADAPTERS / "llama-lora"), "--plot", str(tmp_path / f"p{n}.png")])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "p1.png").read_bytes() == (tmp_path / "p2.png").read_bytes()


@pytest.mark.parametrize("argv", [["inspect", str(ADAPTERS / "llama-dora"), "--json"],
                                  ["diff", str(MODELS / "llama-tied"), str(MODELS / "llama-untied"), "--json"]])
def test_reports_on_stdout_are_stable(argv):
    first, second = (CliRunner().invoke(cli, argv) for _ in range(2))
    assert first.exit_code == second.exit_code and first.stdout == second.stdout


def test_batch_twice_gives_the_same_outputs_and_records(tmp_path):
    for n in (1, 2):
        ws = tmp_path / f"ws{n}"
        shutil.copytree(ADAPTERS / "llama-lora", ws / "adapters" / "llama-lora")
        (ws / "m.toml").write_text('[[job]]\nname = "r4"\nop = "rerank"\nadapter = "adapters/*/"\noutput = "out/{name}"\nrank = 4\n')
        res = CliRunner().invoke(cli, ["batch", str(ws / "m.toml"), "-q", "-j", "1"])
        assert res.exit_code == 0, res.output
    a, b = file_hashes(tmp_path / "ws1" / "out"), file_hashes(tmp_path / "ws2" / "out")
    record = ".adapterops-provenance.json"
    # the records name their (different) input folders; everything else, the record's key included, is equal
    assert {k: v for k, v in a.items() if not k.endswith(record)} == {k: v for k, v in b.items() if not k.endswith(record)}
    import json

    ra, rb = (json.loads((tmp_path / w / "out" / "llama-lora" / record).read_text()) for w in ("ws1", "ws2"))
    assert ra["key"] == rb["key"] and ra["inputs"] == rb["inputs"]
