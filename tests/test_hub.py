"""Hub repo ids resolve through huggingface_hub's cache, offline (tests never download).

We lay out a cache the way huggingface_hub does (models--org--name/refs/main, snapshots/<commit>/...) and run the
CLI in a subprocess with HF_HUB_CACHE pointing there and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from helpers import ADAPTERS, MODELS, raw_bytes, read_all

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def fake_cache(root, repo_id, src):
    """Put a folder into a huggingface_hub cache as repo_id at revision main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(src, repo / "snapshots" / COMMIT)


def run_cli(args, cache):
    """Run the CLI offline against the fake cache."""
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "adapterops", *map(str, args)], env=env, capture_output=True, text=True)


def test_merge_from_hub_ids_offline(tmp_path, peft_reference):
    """Tolerance: none; PEFT's bytes, computed live on this CPU (tests/references.py)."""
    cache = tmp_path / "cache"
    fake_cache(cache, "acme/tiny-llama", MODELS / "llama-tied")
    fake_cache(cache, "acme/tiny-lora", ADAPTERS / "llama-lora")
    res = run_cli(["merge", "acme/tiny-llama", "acme/tiny-lora", tmp_path / "out", "-q"], cache)
    assert res.returncode == 0, res.stderr
    ours, golden = read_all(tmp_path / "out"), peft_reference["llama-lora-bf16"][0]
    assert sorted(ours) == sorted(golden) and all(raw_bytes(ours[k]) == raw_bytes(golden[k]) for k in golden)


def test_unknown_hub_id_offline_is_a_clean_error(tmp_path):
    res = run_cli(["merge", "acme/not-cached", ADAPTERS / "llama-lora", tmp_path / "out", "-q"], tmp_path / "cache")
    assert res.returncode == 2
    assert res.stderr.strip().startswith("error: acme/not-cached:") and res.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_batch_with_hub_ids_records_the_commit(tmp_path):
    import json

    cache = tmp_path / "cache"
    fake_cache(cache, "acme/tiny-llama", MODELS / "llama-tied")
    fake_cache(cache, "acme/tiny-lora", ADAPTERS / "llama-lora")
    (tmp_path / "m.toml").write_text('[[job]]\nname = "m"\nop = "merge"\nbase = "acme/tiny-llama"\nadapter = "acme/tiny-lora"\n'
                                     'output = "out/{name}"\n')
    res = run_cli(["batch", tmp_path / "m.toml", "-q", "-j", "1"], cache)
    assert res.returncode == 0, res.stdout + res.stderr
    record = json.loads((tmp_path / "out" / "tiny-lora" / ".adapterops-provenance.json").read_text())
    assert record["inputs"] == {"base": [f"hub:{COMMIT}"], "adapters": [f"hub:{COMMIT}"]}
    again = run_cli(["batch", tmp_path / "m.toml", "--check", "-q"], cache)
    assert again.returncode == 0 and "1 current" in again.stdout
