"""Hostile paths: what a folder's entries may be, what an index may name, and what OUT may be.

Generated refusal cases: a hostile entry (a symlink to /etc/passwd, to /dev/zero, to another Hub repo's blob, a
dangling symlink, a FIFO, a socket, a character device) planted at every file slot (a shard, the single model
file, the index, config.json, tokenizer.json, adapter_config.json, adapter_model.safetensors), in a Hub cache
snapshot and in a plain folder, through every command that opens (or copies) that slot; index entries that name
absolute or `..` paths; shards holding tensors the index omits. Each must exit 2 with exactly one `error:` line
naming the file and the cause, no traceback, no OUT and no temporary folder, and its inputs unchanged. A FIFO
would block `open()` forever: every in-process case runs under an alarm, and FIFO cases also run through the real
command line in a subprocess with a timeout, so a regression fails instead of hanging.

Then OUT: two merges racing into one new OUT (exactly one wins, the other fails as if OUT had existed), OUT a
symlink to a folder (written through, no `-old` leftover), OUT the current folder or a mount point.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import (
    ADAPTERS,
    FIXTURES,
    MODELS,
    add_to_hub_cache,
    copy_fixture,
    file_hashes,
    hub_etag,
    lstat_tree,
    run_adapterops,
)

from adapterops.cli import cli
from adapterops.io.atomic import DISK_FULL_ERRNOS

NF4_MODEL = FIXTURES / "nf4" / "tf-llama-tied"
GOOD_ADAPTER = ADAPTERS / "llama-lora"
ALARM_SECONDS = 60


class Hung(Exception):
    """A command blocked (a FIFO opened?) past the alarm."""


@pytest.fixture(autouse=True)
def alarm():
    """Turn a hang in the main thread (open() on a FIFO) into a failure instead of a stuck test run."""
    def ring(signum, frame):
        raise Hung(f"still running after {ALARM_SECONDS} s")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.alarm(ALARM_SECONDS)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---- hostile entries: each replaces the file at `path` and returns the cause the error must give ----

FIFOS: list[Path] = []


def _release_fifos():
    """Open every planted FIFO's write end (non-blocking) so that a reader a regression left blocked gets EOF."""
    while FIFOS:
        p = FIFOS.pop()
        try:
            os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


@pytest.fixture(autouse=True)
def release_fifos():
    yield
    _release_fifos()


def plant_etc_passwd(path: Path, repo: Path | None) -> str:
    path.unlink()
    path.symlink_to("/etc/passwd")
    return "outside the"


def plant_dev_zero(path: Path, repo: Path | None) -> str:
    path.unlink()
    path.symlink_to("/dev/zero")
    return "a character device, not a regular file"


def plant_other_blob(path: Path, repo: Path | None) -> str:
    """A symlink into another repo's blobs, to a blob with the very same (valid) content."""
    other = repo.parent / "models--mallory--other" / "blobs"
    other.mkdir(parents=True, exist_ok=True)
    data = path.read_bytes()
    blob = other / hub_etag(path, data)
    blob.write_bytes(data)
    path.unlink()
    path.symlink_to(os.path.relpath(blob, path.parent))
    return "outside the"


def plant_dangling(path: Path, repo: Path | None) -> str:
    path.unlink()
    path.symlink_to(f"../../blobs/{'0' * 64}" if repo is not None else f"gone-{path.name}")
    return "which does not exist"


def plant_fifo(path: Path, repo: Path | None) -> str:
    path.unlink()
    os.mkfifo(path)
    FIFOS.append(path)
    return "is a FIFO, not a regular file"


def plant_socket(path: Path, repo: Path | None) -> str:
    path.unlink()
    here = os.getcwd()
    os.chdir(path.parent)  # a socket's path must fit in 108 bytes: bind by its short relative name
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(path.name)
    finally:
        os.chdir(here)
    return "is a socket, not a regular file"


def plant_char_device(path: Path, repo: Path | None) -> str:
    path.unlink()
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero's numbers
    except PermissionError:
        pytest.skip("creating a device node needs CAP_MKNOD")
    return "is a character device, not a regular file"


KINDS = {"etc_passwd": plant_etc_passwd, "dev_zero": plant_dev_zero, "other_blob": plant_other_blob,
         "dangling": plant_dangling, "fifo": plant_fifo, "socket": plant_socket, "char_device": plant_char_device}
CONTAINERS = {"cache": list(KINDS), "plain": [k for k in KINDS if k != "other_blob"]}


# ---- slots: where the hostile entry goes, and the commands that open (or copy) it ----

def _ckpt_commands(p, out):
    return {
        "merge": ["merge", p, GOOD_ADAPTER, out, "-q"],
        "unmerge": ["unmerge", p, GOOD_ADAPTER, out, "-q"],
        "quantize": ["quantize", p, out, "-q"],
        "dequantize": ["dequantize", p, out, "-q"],
        "extract-base": ["extract", p, MODELS / "llama-tied", out, "--rank", "2", "-q"],
        "extract-tuned": ["extract", MODELS / "llama-tied", p, out, "--rank", "2", "-q"],
        "inspect": ["inspect", p, "--scan"],
        "diff": ["diff", p, MODELS / "llama-tied"],
        "analyze-base": ["analyze", GOOD_ADAPTER, "--base", p],
    }


def _adapter_commands(p, out):
    return {
        "merge": ["merge", MODELS / "llama-tied", p, out, "-q"],
        "unmerge": ["unmerge", MODELS / "llama-tied", p, out, "-q"],
        "rescale": ["rescale", p, out, "--to", "rslora"],
        "rerank": ["rerank", p, out, "--rank", "2"],
        "stack": ["stack", ADAPTERS / "llama-rslora-patterns", p, out],
        "analyze": ["analyze", p],
        "inspect": ["inspect", p],
        "diff": ["diff", p, GOOD_ADAPTER],
    }


CKPT = list(_ckpt_commands("p", "o"))
COPIERS = ["merge", "unmerge", "quantize", "dequantize"]  # the commands that copy tokenizer files into OUT
SLOTS = {  # slot -> (source folder, file, commands); dequantize takes the NF4 fixture instead
    "shard": (MODELS / "llama-untied", "model-00001-of-00002.safetensors", [c for c in CKPT if c != "dequantize"]),
    "model_file": (MODELS / "llama-tied", "model.safetensors", CKPT),
    "index": (MODELS / "llama-untied", "model.safetensors.index.json", [c for c in CKPT if c != "dequantize"]),
    "config": (MODELS / "llama-tied", "config.json", CKPT),
    "tokenizer": (MODELS / "llama-tied", "tokenizer.json", COPIERS),
    # diff compares tensor files only and never opens an adapter's config
    "adapter_config": (GOOD_ADAPTER, "adapter_config.json", [c for c in _adapter_commands("p", "o") if c != "diff"]),
    "adapter_model": (GOOD_ADAPTER, "adapter_model.safetensors", list(_adapter_commands("p", "o"))),
}


def _input_folder(tmp: Path, source: Path, container: str) -> tuple[Path, Path | None]:
    """A copy of `source` (plus a tokenizer.json) as a plain folder, or as a Hub cache snapshot; and its repo."""
    staged = tmp / "staged"
    staged.mkdir()
    for f in source.iterdir():
        (staged / f.name).write_bytes(f.read_bytes())
    if (staged / "config.json").exists() and not (staged / "adapter_config.json").exists():
        (staged / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE"}}))
    if container == "plain":
        return staged, None
    snapshot = add_to_hub_cache(tmp / "cache", "victim/model", staged)
    return snapshot, snapshot.parent.parent


def refuses(argv, slot_file: str, cause: str, watched: Path, tmp: Path) -> str:
    """Run a command that must refuse; check the contract; return the error line."""
    before = lstat_tree(watched)
    res = CliRunner().invoke(cli, [str(a) for a in argv])
    assert not isinstance(res.exception, Hung), f"hung: {argv}"
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in res.output, res.output
    assert slot_file in err and cause in err, err
    assert not (tmp / "out").exists() and not [p for p in tmp.iterdir() if ".adapterops-tmp-" in p.name]
    assert lstat_tree(watched) == before
    return err


CASES = [(container, kind, slot, command) for container, kinds in CONTAINERS.items() for kind in kinds
         for slot, (_, _, commands) in SLOTS.items() for command in commands]


@pytest.mark.parametrize("container,kind,slot,command", CASES, ids=["-".join(c) for c in CASES])
def test_hostile_entry(container, kind, slot, command, tmp_path):
    source, name, _ = SLOTS[slot]
    if command == "dequantize":
        source = NF4_MODEL
    folder, repo = _input_folder(tmp_path, source, container)
    cause = KINDS[kind](folder / name, repo)
    commands = _adapter_commands if slot.startswith("adapter") else _ckpt_commands
    refuses(commands(folder, tmp_path / "out")[command], name, cause, tmp_path, tmp_path)


@pytest.mark.parametrize("slot", list(SLOTS))
def test_fifo_through_the_real_command_line(slot, tmp_path):
    """The real `adapterops` process, killed by the timeout if a FIFO ever blocks it again."""
    source, name, commands = SLOTS[slot]
    folder, repo = _input_folder(tmp_path, source, "cache")
    cause = plant_fifo(folder / name, repo)
    argv = (_adapter_commands if slot.startswith("adapter") else _ckpt_commands)(folder, tmp_path / "out")[commands[0]]
    try:
        res = run_adapterops(argv, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{argv[0]} blocked on the FIFO at {name}")
    err = res.stderr.strip()
    assert res.returncode == 2 and err.startswith("error: ") and "\n" not in err and name in err and cause in err, res.stderr
    assert not (tmp_path / "out").exists()


# ---- what an index may name ----

def _index_case(tmp: Path, edit) -> tuple[Path, Path]:
    """A sharded copy whose index is changed by edit(weight_map, folder); an outside copy of shard 1 is at hand."""
    base = copy_fixture("model", "llama-untied", tmp)
    (tmp / "outside.safetensors").write_bytes((base / "model-00001-of-00002.safetensors").read_bytes())
    index = base / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"], base)
    index.write_text(json.dumps(data))
    return base, index


def _rename_first(to):
    def edit(wm, base):
        wm[next(iter(wm))] = to(base)
    return edit


def _omit(pick):
    def edit(wm, base):
        del wm[pick(wm)]
    return edit


INDEX_CASES = {  # name -> (edit, what the error must say)
    "absolute-outside": (_rename_first(lambda b: str(b.parent / "outside.safetensors")), "(an absolute path)"),
    "absolute-etc": (_rename_first(lambda b: "/etc/passwd"), "(an absolute path)"),
    "absolute-own-shard": (_rename_first(lambda b: str(b / "model-00001-of-00002.safetensors")), "(an absolute path)"),
    "dotdot-outside": (_rename_first(lambda b: "../outside.safetensors"), "(a '..' path)"),
    "dotdot-back-in": (_rename_first(lambda b: f"../{b.name}/model-00001-of-00002.safetensors"), "(a '..' path)"),
    "dotdot-inner": (_rename_first(lambda b: "sub/../model-00001-of-00002.safetensors"), "(a '..' path)"),
    "dotdot-deep": (_rename_first(lambda b: "../../../../../../etc/passwd"), "(a '..' path)"),
    "omits-first": (_omit(lambda wm: next(iter(wm))), "does not list it"),
    "omits-last": (_omit(lambda wm: list(wm)[-1]), "does not list it"),
    "omits-from-shard-2": (_omit(lambda wm: next(k for k, v in wm.items() if v.endswith("00002-of-00002.safetensors"))),
                           "does not list it"),
    "omits-lm-head": (_omit(lambda wm: "lm_head.weight"), "does not list it"),
    # a NUL byte: every os call on such a path raises ValueError ("embedded null byte")
    "nul-byte": (_rename_first(lambda b: "model\u0000.safetensors"), "is not a file name: it holds a NUL byte"),
    "nul-byte-after-own-shard": (_rename_first(lambda b: "model-00001-of-00002.safetensors\u0000"), "holds a NUL byte"),
}


@pytest.mark.parametrize("command", [c for c in CKPT if c != "dequantize"])
@pytest.mark.parametrize("case", list(INDEX_CASES))
def test_index_names(case, command, tmp_path):
    edit, cause = INDEX_CASES[case]
    base, index = _index_case(tmp_path, edit)
    argv = _ckpt_commands(base, tmp_path / "out")[command]
    if case.startswith("omits"):
        original = json.loads((MODELS / "llama-untied" / "model.safetensors.index.json").read_text())["weight_map"]
        omitted = next(k for k in original if k not in json.loads(index.read_text())["weight_map"])
        err = refuses(argv, original[omitted], cause, tmp_path, tmp_path)  # names the shard, the tensor, the cause
        assert f"tensor '{omitted}'" in err and index.name in err
    else:
        refuses(argv, index.name, cause, tmp_path, tmp_path)


# ---- readers that do not rely on safe_file: the file rule again where the bytes are read ----

READ_KINDS = {k: KINDS[k] for k in ("dev_zero", "fifo", "socket", "char_device")}


@pytest.mark.parametrize("kind", list(READ_KINDS))
def test_base_config_named_by_the_user_is_read_as_a_regular_file(kind, tmp_path):
    """`convert --base DIR/config.json`: the user names the file (no safe_file), and read_json itself refuses what
    is not a regular file: a FIFO used to block read_text() forever, /dev/zero to read until memory ran out."""
    folder, _ = _input_folder(tmp_path, MODELS / "llama-tied", "plain")
    config = folder / "config.json"
    cause = READ_KINDS[kind](config, None)
    for to in ("mlx", "gguf"):
        refuses(["convert", GOOD_ADAPTER, tmp_path / "out", "--to", to, "--base", config], "config.json", cause.split(", which is ")[-1],
                tmp_path, tmp_path)


@pytest.mark.parametrize("kind", list(READ_KINDS))
def test_library_readers_refuse_what_is_not_a_regular_file(kind, tmp_path):
    """The library entry points that open files themselves (a safetensors file, a JSON file) apply the rule too."""
    from adapterops.errors import AdapteropsError
    from adapterops.io.jsonfile import read_json
    from adapterops.io.safetensors_io import SafetensorsFile

    for name, read in (("model.safetensors", SafetensorsFile), ("config.json", read_json)):
        path = tmp_path / name
        path.write_bytes((MODELS / "llama-tied" / name).read_bytes())
        cause = READ_KINDS[kind](path, None)
        with pytest.raises(AdapteropsError, match="not a regular file") as info:
            read(path)
        assert str(path) in str(info.value) and cause.split(", which is ")[-1] in str(info.value)


# ---- provenance records and the hash cache: files in folders someone else prepared ----

RECORD = ".adapterops-provenance.json"
BAD_RECORDS = {  # name -> contents; each must read as "no record", never a traceback or a hang
    "null": b"null",
    "list": b"[]",
    "string": b'"adapterops-provenance"',
    "nested_100": b"[" * 100 + b"]" * 100,
    "nested_100k": b"[" * 100_000 + b"]" * 100_000,
    "nested_480_in_a_record": b'{"format": "adapterops-provenance", "x": ' + b"[" * 479 + b"]" * 479 + b"}",  # asdict recursed
    "int_400_digits": b'{"format": "adapterops-provenance", "version": 1' + b"0" * 399 + b"}",
    "float_1e400": b'{"format": "adapterops-provenance", "key": 1e400}',
    "duplicate_key": b'{"format": "adapterops-provenance", "format": "other"}',
    "not_utf8": b'{"format": "\xff"}',
    "over_16_mib": b'{"format": "adapterops-provenance", "x": "' + b"a" * (16 << 20) + b'"}',
}
RECORD_KINDS = {k: KINDS[k] for k in ("etc_passwd", "dev_zero", "dangling", "fifo", "socket", "char_device")}


def _inspect_provenance(path: Path):
    res = CliRunner().invoke(cli, ["inspect", str(path), "--json"])
    assert not isinstance(res.exception, Hung), "inspect hung on the record"
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    return json.loads(res.stdout)["summary"]["provenance"]


def _with_record(tmp: Path, source: Path) -> Path:
    """A copy of `source` holding a valid record (so that each hostile variant replaces a real one)."""
    from adapterops.io.provenance import make_record, write_provenance

    folder, _ = _input_folder(tmp, source, "plain")
    write_provenance(folder, make_record("rescale", {"to": "rslora"}, {"adapter": ["x"]}, {"x": "0" * 64}, "0"))
    return folder


@pytest.mark.parametrize("source", [GOOD_ADAPTER, MODELS / "llama-tied"], ids=["adapter", "checkpoint"])
@pytest.mark.parametrize("case", list(BAD_RECORDS) + list(RECORD_KINDS))
def test_inspect_ignores_a_hostile_provenance_record(case, source, tmp_path):
    """inspect shows a folder's record; one it may not or cannot read is no record (the record is a courtesy, not
    an input). It used to be read with read_text() and json.loads: a FIFO hung, /dev/zero read forever, 100 levels
    or `null` ended in a traceback."""
    folder = _with_record(tmp_path, source)
    assert _inspect_provenance(folder)["op"] == "rescale"  # the valid record is shown: the cases below can fail
    if case in BAD_RECORDS:
        (folder / RECORD).write_bytes(BAD_RECORDS[case])
    else:
        RECORD_KINDS[case](folder / RECORD, None)
    before = lstat_tree(tmp_path)
    assert _inspect_provenance(folder) is None
    assert lstat_tree(tmp_path) == before


BATCH = """\
[[job]]
name = "r4"
op = "rerank"
adapter = "{adapter}"
output = "out/r4"
rank = 4
"""


def _batch(tmp: Path, adapter: Path = GOOD_ADAPTER, env: dict | None = None, *extra: str) -> dict:
    (tmp / "m.toml").write_text(BATCH.format(adapter=adapter))
    res = run_adapterops(["batch", tmp / "m.toml", "--json", "-q", "-j", "1", *extra], env=env, timeout=120)
    assert res.returncode in (0, 1) and "Traceback" not in res.stderr, res.stderr
    return json.loads(res.stdout)


@pytest.mark.parametrize("case", ["nested_100", "null", "fifo", "dev_zero", "etc_passwd"])
def test_batch_will_not_overwrite_an_output_with_a_hostile_record(case, tmp_path):
    """An output whose record cannot be read is not batch's: it is left alone, as any foreign output (one failed
    task, one line), never hung on (a real process, killed by the timeout) or overwritten."""
    out = tmp_path / "out" / "r4"
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    if case in BAD_RECORDS:
        (out / RECORD).write_bytes(BAD_RECORDS[case])
    else:
        (out / RECORD).write_text("{}")
        RECORD_KINDS[case](out / RECORD, None)
    before = lstat_tree(out)
    for extra in ([], ["--check"]):
        report = _batch(tmp_path, GOOD_ADAPTER, None, *extra)
        [task] = report["tasks"]
        if extra:
            assert task["status"] == "stale", task
        else:
            assert task["status"] == "failed" and "not written by adapterops batch" in task["error"], task
    assert lstat_tree(out) == before


HASH_CACHES = {  # the file-hash cache (ADAPTEROPS_CACHE/file-hashes.json): anything unusable is an empty cache
    "null": lambda p: p.write_bytes(b"null"),
    "list": lambda p: p.write_bytes(b"[]"),
    "values_not_strings": lambda p: p.write_bytes(b'{"a": 1, "b": [2]}'),
    "nested_100": lambda p: p.write_bytes(b"[" * 100 + b"]" * 100),
    "int_400_digits": lambda p: p.write_bytes(b'{"a": 1' + b"0" * 399 + b"}"),
    "fifo": lambda p: (os.mkfifo(p), FIFOS.append(p)),
    "dev_zero": lambda p: p.symlink_to("/dev/zero"),
}


@pytest.mark.parametrize("case", list(HASH_CACHES))
def test_batch_with_a_hostile_hash_cache(case, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    HASH_CACHES[case](cache / "file-hashes.json")
    report = _batch(tmp_path, GOOD_ADAPTER, {"ADAPTEROPS_CACHE": str(cache)})
    assert [t["status"] for t in report["tasks"]] == ["done"], report
    assert (tmp_path / "out" / "r4" / RECORD).is_file()


def test_batch_hashes_an_input_folder_nested_1100_levels(tmp_path):
    """Input hashing walks the folder with a stack: Path.rglob recursed once per level (RecursionError)."""
    adapter, _ = _input_folder(tmp_path, GOOD_ADAPTER, "plain")
    fd = os.open(adapter, os.O_RDONLY)
    try:
        for _ in range(1100):  # relative to an open folder: no path ever gets long
            os.mkdir("d", dir_fd=fd)
            inner = os.open("d", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.close(os.open("notes.txt", os.O_WRONLY | os.O_CREAT, dir_fd=fd))
    finally:
        os.close(fd)
    try:
        report = _batch(tmp_path, adapter)
        assert [t["status"] for t in report["tasks"]] == ["done"], report
    finally:
        _remove_deep(adapter / "d")


def test_batch_hashes_an_input_with_a_non_utf8_file_name(tmp_path):
    """A name that is not UTF-8 used to fail the input hash (UnicodeEncodeError, a traceback); its cache entry must
    not make the whole hash cache unreadable to strict JSON (lone surrogates) either: the rerun is skipped."""
    adapter, _ = _input_folder(tmp_path, GOOD_ADAPTER, "plain")
    Path(os.fsdecode(os.fsencode(adapter) + b"/notes-\xff.txt")).write_bytes(b"mine")
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {"ADAPTEROPS_CACHE": str(cache)}
    assert [t["status"] for t in _batch(tmp_path, adapter, env)["tasks"]] == ["done"]
    assert len(json.loads((cache / "file-hashes.json").read_text())) == 3  # adapter_config, model, notes
    assert [t["status"] for t in _batch(tmp_path, adapter, env)["tasks"]] == ["skipped"]


def _remove_deep(top: Path) -> None:
    """Remove a deeply nested chain of folders without recursion (shutil.rmtree and pytest's cleanup recurse)."""
    chain = [top]
    while (chain[-1] / "d").is_dir():
        chain.append(chain[-1] / "d")
    for folder in reversed(chain):
        for p in folder.iterdir():
            if not p.is_dir():
                p.unlink()
        folder.rmdir()


# ---- OUT ----

GATED = """
import os, sys, time, pathlib
import adapterops.io.atomic as atomic
gate, argv = pathlib.Path(sys.argv[1]), sys.argv[2:]
real = atomic._put_in_place
def gated(tmp, out, replace):  # both runs have checked OUT and written everything: now both rename
    (gate / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(gate.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    real(tmp, out, replace)
atomic._put_in_place = gated
from adapterops.cli import main
sys.argv = ["adapterops", *argv]
main()
"""


def _race(tmp: Path, extra: list[str]) -> list[subprocess.CompletedProcess]:
    gate = tmp / "gate"
    gate.mkdir()
    argv = [sys.executable, "-c", GATED, str(gate), "merge", str(MODELS / "llama-untied"), str(GOOD_ADAPTER),
            str(tmp / "out"), "-q", *extra]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = []
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            p.kill()
            pytest.fail("a racing merge hung")
        results.append(subprocess.CompletedProcess(argv, p.returncode, stdout, stderr))
    return results


def test_two_merges_into_one_new_out(tmp_path):
    """Both pass the OUT check before either renames: exactly one wins, the other fails as if OUT had existed."""
    results = _race(tmp_path, [])
    assert sorted(r.returncode for r in results) == [0, 2], [r.stderr for r in results]
    loser = next(r for r in results if r.returncode == 2)
    err = loser.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "exists and is not empty (use --force" in err, err
    assert str(tmp_path / "out") in err
    assert [p.name for p in tmp_path.iterdir() if ".adapterops-tmp-" in p.name] == []
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()


def test_two_forced_merges_into_one_new_out(tmp_path):
    """With --force replacing is allowed: both succeed, and OUT is one complete output."""
    results = _race(tmp_path, ["--force"])
    assert [r.returncode for r in results] == [0, 0], [r.stderr for r in results]
    assert [p.name for p in tmp_path.iterdir() if ".adapterops-tmp-" in p.name] == []
    expected = tmp_path / "expected"
    assert CliRunner().invoke(cli, ["merge", str(MODELS / "llama-untied"), str(GOOD_ADAPTER), str(expected), "-q"]).exit_code == 0
    assert file_hashes(tmp_path / "out") == file_hashes(expected)


@pytest.mark.parametrize("command", ["merge", "rescale"])
@pytest.mark.parametrize("force", [False, True])
def test_out_a_symlink_to_a_folder(command, force, tmp_path):
    """The output is written where the link points; the link stays; nothing `-old` is left on either side."""
    target = tmp_path / "disk" / "merged"
    target.mkdir(parents=True)
    if force:
        (target / "stale.txt").write_text("old output")
    out = tmp_path / "out"
    out.symlink_to(target, target_is_directory=True)
    argv = {"merge": ["merge", MODELS / "llama-tied", GOOD_ADAPTER, out, "-q"],
            "rescale": ["rescale", GOOD_ADAPTER, out, "--to", "rslora"]}[command]
    res = CliRunner().invoke(cli, [str(a) for a in argv] + (["--force"] if force else []))
    assert res.exit_code == 0, res.output
    assert out.is_symlink() and out.resolve() == target.resolve()
    assert not (target / "stale.txt").exists() and any(target.iterdir())
    for folder in (tmp_path, target.parent):
        assert [p.name for p in folder.iterdir() if ".adapterops-tmp-" in p.name] == []


def test_out_a_dangling_symlink(tmp_path):
    out = tmp_path / "out"
    out.symlink_to(tmp_path / "nowhere")
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(GOOD_ADAPTER), str(out), "-q"])
    assert res.exit_code == 2 and "which does not exist" in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "nowhere").exists() and [p for p in tmp_path.iterdir() if ".adapterops-tmp-" in p.name] == []


@pytest.mark.parametrize("spelling", [".", "./", "cwd-absolute", "..", "parent-absolute"])
@pytest.mark.parametrize("force", [False, True])
def test_out_the_current_folder(spelling, force, tmp_path, monkeypatch):
    """OUT=. (or the folder holding the current one) is refused with the reason, not "Device or resource busy"."""
    here = tmp_path / "work" / "here"
    here.mkdir(parents=True)
    (here / "notes.txt").write_text("mine")
    monkeypatch.chdir(here)
    out = {"cwd-absolute": str(here), "parent-absolute": str(here.parent)}.get(spelling, spelling)
    before = lstat_tree(tmp_path)
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(GOOD_ADAPTER), out, "-q"] + (["--force"] if force else []))
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "is the current folder" in err, err
    assert lstat_tree(tmp_path) == before


def test_out_a_mount_point(tmp_path):
    mount = next((m for m in ("/proc", "/sys", "/dev/shm", "/dev") if os.path.ismount(m)), None)
    if mount is None:
        pytest.skip("no mount point to try")
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(GOOD_ADAPTER), mount, "-q", "--force"])
    assert res.exit_code == 2, res.output
    assert "is a mount point" in res.stderr and res.stderr.count("\n") == 1, res.stderr


def test_disk_full_errnos_are_named():
    assert errno.ENOSPC in DISK_FULL_ERRNOS and errno.EFBIG in DISK_FULL_ERRNOS and errno.EDQUOT in DISK_FULL_ERRNOS


def test_hostile_case_counts():
    """The report quotes these numbers."""
    per_kind = {k: sum(1 for c in CASES if c[1] == k) for k in KINDS}
    assert len(CASES) == sum(per_kind.values())
    assert len(INDEX_CASES) == 13
    print(len(CASES), per_kind)
