"""Inputs straight from huggingface_hub's cache: every command, by Hub id and by snapshot path.

The cache is laid out exactly as huggingface_hub lays it out (content in `models--org--name/blobs/<etag>`,
`snapshots/<commit>/` holding only relative symlinks into `../../blobs/`, `refs/main` holding the commit;
`huggingface_hub.scan_cache_dir` accepts it without warnings). Each command runs three times: on the plain folders,
on the snapshot folders' paths (in-process) and on the Hub ids (the real command line in a subprocess, with
HF_HUB_CACHE pointing at the cache and HF_HUB_OFFLINE=1). The outputs must be the same bytes (JSON compared with
the input names replaced), OUT must hold regular files only (never the cache's symlinks), and nothing in the cache
may change.
"""

from __future__ import annotations

import json
import shutil
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    ADAPTERS,
    MODELS,
    add_to_hub_cache,
    file_hashes,
    lstat_tree,
    read_file,
    run_adapterops,
)

from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file

REPOS = {  # role -> Hub id
    "llama": "acme/tiny-llama",  # single file, with config, generation config, tokenizer config, chat template
    "sharded": "acme/tiny-llama-sharded",  # the same weights in 3 shards + index, and a tokenizer.json
    "nf4": "acme/tiny-llama-nf4",  # a quantized model in the cache
    "tuned": "acme/tiny-llama-tuned",  # llama + lora merged: a fine-tune, and a merged model to unmerge
    "lora": "acme/tiny-lora",
    "lora_rs": "acme/tiny-lora-rs",
}


def _sharded_copy(src: Path, dest: Path, n: int = 3) -> Path:
    """A sharded copy of a single-file fixture model, with the index transformers writes, and a tokenizer.json."""
    tensors = read_file(src / "model.safetensors")
    names = list(tensors)
    dest.mkdir()
    weight_map, total = {}, 0
    for i in range(n):
        part = names[i * len(names) // n:(i + 1) * len(names) // n]
        shard = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in part}, dest / shard, {"format": "pt"})
        weight_map.update({k: shard for k in part})
        total += sum(tensors[k].numel() * tensors[k].element_size() for k in part)
    (dest / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, dest / f.name)
    (dest / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {"a": 0}}}))
    return dest


def _invoke(argv: list[str]):
    res = CliRunner().invoke(cli, [str(a) for a in argv])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Plain folders, the same folders in a Hub cache, and a record of the cache as built."""
    root = tmp_path_factory.mktemp("hubcache")
    plain = {"llama": MODELS / "llama-tied", "lora": ADAPTERS / "llama-lora", "lora_rs": ADAPTERS / "llama-rslora-patterns"}
    plain["sharded"] = _sharded_copy(MODELS / "llama-tied", root / "plain-sharded")
    for role, argv in {"nf4": ["quantize", plain["llama"], root / "plain-nf4", "-q"],
                       "tuned": ["merge", plain["llama"], plain["lora"], root / "plain-tuned", "-q"]}.items():
        code, _, err = _invoke(argv)
        assert code == 0, err
        plain[role] = root / f"plain-{role}"
    cache = root / "cache"
    snapshots = {role: add_to_hub_cache(cache, REPOS[role], plain[role]) for role in REPOS}
    from huggingface_hub import scan_cache_dir

    scanned = scan_cache_dir(cache)
    assert not scanned.warnings and {r.repo_id for r in scanned.repos} == set(REPOS.values())
    assert all(p.is_symlink() for s in snapshots.values() for p in s.iterdir())
    return {"root": root, "cache": cache, "plain": plain, "snapshots": snapshots, "state": lstat_tree(cache)}


# name -> (argv with {role} and {out} placeholders, what the command produces: a folder, a file, or stdout)
COMMANDS = {
    "merge": (["merge", "{llama}", "{lora}", "{out}", "-q"], "dir"),
    "merge-sharded": (["merge", "{sharded}", "{lora}", "{out}", "-q"], "dir"),
    "merge-two": (["merge", "{sharded}", "{lora}", "{lora_rs}", "--weights", "1,0.5", "{out}", "-q"], "dir"),
    "unmerge": (["unmerge", "{tuned}", "{lora}", "{out}", "-q"], "dir"),
    "quantize": (["quantize", "{sharded}", "{out}", "-q"], "dir"),
    "dequantize": (["dequantize", "{nf4}", "{out}", "-q"], "dir"),
    "rescale": (["rescale", "{lora}", "{out}", "--to", "rslora"], "dir"),
    "rerank": (["rerank", "{lora}", "{out}", "--rank", "2"], "dir"),
    "stack": (["stack", "{lora}", "{lora_rs}", "{out}", "--weights", "1,0.5"], "dir"),
    "extract": (["extract", "{sharded}", "{tuned}", "{out}", "--rank", "2", "-q"], "dir"),
    "analyze": (["analyze", "{lora}", "--json-file", "{out}"], "file"),
    "analyze-base": (["analyze", "{lora}", "--base", "{sharded}", "--json-file", "{out}"], "file"),
    "inspect-model": (["inspect", "{sharded}", "--scan", "--json"], "stdout"),
    "inspect-nf4": (["inspect", "{nf4}", "--json"], "stdout"),
    "inspect-adapter": (["inspect", "{lora}", "--json"], "stdout"),
    "diff-models": (["diff", "{sharded}", "{llama}", "--json"], "stdout"),
    "diff-adapters": (["diff", "{lora}", "{lora}", "--json"], "stdout"),
}


def _argv(template: list[str], names: dict[str, str], out: Path) -> list[str]:
    return [a.format(out=out, **names) for a in template]


def _normalized(data: bytes, names: dict[str, str]) -> bytes:
    """JSON text with the input names (paths or Hub ids) replaced by their roles, longest first. A role may be
    given twice (`sharded` and `sharded@`): a Hub id and the snapshot path that reports show for it."""
    text = data.decode()
    for role, name in sorted(names.items(), key=lambda kv: -len(kv[1])):
        text = text.replace(json.dumps(name)[1:-1], f"<{role.rstrip('@')}>")
    return text.encode()


def _product(kind: str, out: Path, stdout: str, names: dict[str, str]) -> dict[str, bytes]:
    """What a run produced, file by file (tensor files as bytes, JSON with input names replaced)."""
    if kind == "stdout":
        return {"stdout": _normalized(stdout.encode(), names)}
    if kind == "file":
        return {out.name: _normalized(out.read_bytes(), names)}
    files = {}
    for p in sorted(out.rglob("*")):
        assert stat.S_ISREG(p.lstat().st_mode), f"{p} in OUT is not a regular file"
        data = p.read_bytes()
        files[p.relative_to(out).as_posix()] = _normalized(data, names) if p.suffix == ".json" else data
    return files


@pytest.fixture(scope="module")
def plain_runs(world):
    """Each command's product on the plain folders (run once)."""
    runs = {}
    names = {r: str(p) for r, p in world["plain"].items()}
    for name, (template, kind) in COMMANDS.items():
        out = world["root"] / f"plain-out-{name}" / ("report.json" if kind == "file" else "out")
        code, stdout, err = _invoke(_argv(template, names, out))
        assert code in (0, 1), f"{name}: {err}"
        runs[name] = (code, _product(kind, out, stdout, names))
    return runs


def _check(world, plain_runs, name, code, stdout, err, out, names):
    kind = COMMANDS[name][1]
    assert err.count("error:") == 0, err
    assert (code, _product(kind, out, stdout, names)) == plain_runs[name]
    assert lstat_tree(world["cache"]) == world["state"], "the cache changed"
    assert not [p for p in out.parent.iterdir() if ".adapterops-tmp-" in p.name]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_snapshot_paths(world, plain_runs, name, tmp_path):
    """Every command on `.../snapshots/<commit>/` folders, whose files are all symlinks into the repo's blobs."""
    template, kind = COMMANDS[name]
    names = {r: str(p) for r, p in world["snapshots"].items()}
    out = tmp_path / ("report.json" if kind == "file" else "out")
    code, stdout, err = _invoke(_argv(template, names, out))
    _check(world, plain_runs, name, code, stdout, err, out, names)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_hub_ids(world, plain_runs, name, tmp_path):
    """Every command on Hub ids, resolved offline from the cache by the real command line."""
    template, kind = COMMANDS[name]
    out = tmp_path / ("report.json" if kind == "file" else "out")
    res = run_adapterops(_argv(template, REPOS, out), env={"HF_HUB_CACHE": str(world["cache"]), "HF_HUB_OFFLINE": "1"})
    shown = {**REPOS, **{f"{r}@": str(p) for r, p in world["snapshots"].items()}}  # inspect shows the local path
    _check(world, plain_runs, name, res.returncode, res.stdout, res.stderr, out, shown)


def test_single_file_from_a_snapshot(world, plain_runs, tmp_path):
    """A checkpoint named as one file inside a snapshot: the file is a symlink into the blobs, and is followed."""
    link = world["snapshots"]["llama"] / "model.safetensors"
    assert link.is_symlink()
    outs = {}
    for label, base in {"plain": MODELS / "llama-tied" / "model.safetensors", "snapshot": link}.items():
        code, _, err = _invoke(["merge", base, world["plain"]["lora"], tmp_path / label, "-q"])
        assert code == 0, err
        outs[label] = file_hashes(tmp_path / label)
        assert all(stat.S_ISREG(p.lstat().st_mode) for p in (tmp_path / label).iterdir())
    assert outs["plain"] == outs["snapshot"]
    assert lstat_tree(world["cache"]) == world["state"]


def test_hub_repo_through_a_symlinked_cache_path(world, plain_runs, tmp_path):
    """HF_HUB_CACHE reached through a symlink (~/.cache -> /data/cache): the blobs still belong to the repo."""
    linked = tmp_path / "linked-cache"
    linked.symlink_to(world["cache"], target_is_directory=True)
    snapshot = linked / world["snapshots"]["sharded"].relative_to(world["cache"])
    names = {**{r: str(p) for r, p in world["plain"].items()}, "sharded": str(snapshot)}
    out = tmp_path / "out"
    code, stdout, err = _invoke(_argv(COMMANDS["merge-sharded"][0], names, out))
    _check(world, plain_runs, "merge-sharded", code, stdout, err, out, names)


def test_batch_with_hub_ids(world, plain_runs, tmp_path):
    """A manifest naming Hub ids: the merge and the rescale equal the plain runs, and record the commits."""
    (tmp_path / "m.toml").write_text(
        f'[[job]]\nname = "merged"\nop = "merge"\nbase = "{REPOS["sharded"]}"\nadapter = "{REPOS["lora"]}"\noutput = "build/merged"\n\n'
        f'[[job]]\nname = "rs"\nop = "rescale"\nadapter = "{REPOS["lora"]}"\noutput = "build/rs"\nto = "rslora"\n')
    env = {"HF_HUB_CACHE": str(world["cache"]), "HF_HUB_OFFLINE": "1"}
    res = run_adapterops(["batch", tmp_path / "m.toml", "-q", "-j", "1"], env=env)
    assert res.returncode == 0, res.stdout + res.stderr
    for job, command in (("merged", "merge-sharded"), ("rs", "rescale")):
        out = tmp_path / "build" / job
        record = json.loads((out / ".adapterops-provenance.json").read_text())
        assert all(h.startswith("hub:") for hs in record["inputs"].values() for h in hs)
        (out / ".adapterops-provenance.json").unlink()
        assert (0, _product("dir", out, "", dict(REPOS))) == plain_runs[command]
    assert lstat_tree(world["cache"]) == world["state"]
