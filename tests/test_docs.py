"""Every registered op is reachable and documented everywhere a user looks (in the spirit of sqlite-utils' test_docs):
a CLI command whose --help has examples, a README section, a public function with a docstring example, and a
batch manifest entry that validates. Adding an op to adapterops/registry.py without these fails here."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS

import adapterops
from adapterops.batch.manifest import parse_manifest
from adapterops.cli import cli
from adapterops.registry import OPS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
HEADINGS = [h.strip() for h in re.findall(r"^## (.+)$", README, flags=re.M)]
# a fixture of the right kind for each input name the registry uses
SAMPLE_INPUT = {"base": MODELS / "llama-tied", "merged": MODELS / "llama-tied", "tuned": MODELS / "llama-tied",
                "adapter": ADAPTERS / "llama-lora", "adapters": ADAPTERS / "llama-lora", "path": ADAPTERS / "llama-lora",
                "a": ADAPTERS / "llama-lora", "b": ADAPTERS / "llama-lora"}


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_has_a_command_with_examples(name):
    command = cli.commands.get(name)
    assert command is not None, f"no `adapterops {name}` command"
    res = CliRunner().invoke(cli, [name, "--help"])
    assert res.exit_code == 0
    examples = res.stdout.split("Examples:", 1)
    assert len(examples) == 2 and f"adapterops {name} " in examples[1], res.stdout
    assert res.stdout.count("Usage:") == 1  # click's own usage line, not a second one from the docstring
    undocumented = [p.name for p in command.params if isinstance(p, __import__("click").Option) and not p.help]
    assert undocumented == []


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_has_a_readme_section(name):
    assert any(re.search(rf"\b{name}\b", h) for h in HEADINGS), f"README has no '## {name}' section"
    assert f"adapterops {name} " in README


@pytest.mark.parametrize("name", [*OPS, "run_batch"])
def test_every_op_is_a_public_function_with_an_example(name):
    fn = getattr(adapterops, name)
    assert callable(fn) and fn.__doc__ and f"adapterops.{name}(" in fn.__doc__
    assert name in adapterops.__all__
    if name in OPS:
        assert getattr(adapterops, OPS[name].result) is OPS[name].result_type()


@pytest.mark.parametrize("name", list(OPS))
def test_every_op_is_a_batch_op(name, tmp_path):
    op = OPS[name]
    lines = ["[[job]]", f'name = "{name}-job"', f'op = "{name}"', f'output = "{tmp_path}/out/{{name}}"']
    for key in dict.fromkeys([*op.required, *(k for k in op.inputs if k in op.lists)]):
        value = SAMPLE_INPUT[key]
        lines.append(f'{key} = ["{value}"]' if key in op.lists else f'{key} = "{value}"')
    (tmp_path / "m.toml").write_text("\n".join(lines) + "\n")
    tasks = parse_manifest(tmp_path / "m.toml")
    assert len(tasks) == 1 and tasks[0].op == name


def test_every_command_is_in_the_readme_table():
    table = README.split("## merge", 1)[0]
    for name in [*OPS, "batch"]:
        assert f"`{name}`" in table, name


def test_help_and_version_do_not_import_torch():
    code = ("import sys\nfrom adapterops.cli import cli\nfor args in (['--help'], ['--version'], ['merge', '--help']):\n"
            "    try:\n        cli.main(args, standalone_mode=False)\n    except SystemExit:\n        pass\n"
            "print('torch' in sys.modules)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "False"


def test_every_environment_variable_the_package_reads_is_in_the_help_and_the_readme():
    """An ADAPTEROPS_* variable the package reads is listed in `adapterops --help` and named in the README."""
    package = Path(adapterops.__file__).parent
    names = set()
    for path in package.rglob("*.py"):
        names |= set(re.findall(r"""environ(?:\.get\(|\[)["'](ADAPTEROPS_[A-Z_]+)""", path.read_text()))
    assert {"ADAPTEROPS_DIRECT_IO", "ADAPTEROPS_MERGE_WORKERS", "ADAPTEROPS_CACHE"} <= names
    text = CliRunner().invoke(cli, ["--help"]).output
    for name in sorted(names):
        assert name in text and name in README, name
