"""Faults: a merge killed mid-write, and a disk that fills up, leave no OUT and nothing a rerun trips over."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS, read_all, tree_hash

import adapterops
from adapterops.cli import cli
from adapterops.io.safetensors_io import save_file

TMP_MARK = ".adapterops-tmp-"


def big_pair(tmp: Path, layers: int = 24) -> tuple[Path, Path]:
    """A ~100 MB float32 base (layers × a 1024×1024 projection) and an r=4 LoRA on every projection."""
    base, ad = tmp / "base", tmp / "adapter"
    base.mkdir()
    ad.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({f"layers.{i}.proj.weight": torch.randn(1024, 1024, generator=g) for i in range(layers)}, base / "model.safetensors")
    save_file({k: v for i in range(layers) for k, v in {
        f"base_model.model.layers.{i}.proj.lora_A.weight": torch.randn(4, 1024, generator=g),
        f"base_model.model.layers.{i}.proj.lora_B.weight": torch.randn(1024, 4, generator=g)}.items()}, ad / "adapter_model.safetensors")
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["proj"]}))
    return base, ad


def temps(parent: Path) -> list[str]:
    """Temporary folders left beside an output."""
    return [p.name for p in parent.iterdir() if TMP_MARK in p.name]


def test_sigkill_mid_write_leaves_no_output_and_the_rerun_cleans_up(tmp_path):
    base, ad = big_pair(tmp_path)
    out = tmp_path / "out"
    before = tree_hash(base), tree_hash(ad)
    proc = subprocess.Popen([sys.executable, "-m", "adapterops", "merge", str(base), str(ad), str(out), "-q"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    killed_mid_write = False
    while time.monotonic() < deadline and proc.poll() is None:
        partial = [f for t in temps(tmp_path) for f in (tmp_path / t).glob("*.safetensors")]
        if partial and partial[0].stat().st_size > 8 << 20:  # a shard half written
            proc.send_signal(signal.SIGKILL)
            killed_mid_write = True
            break
        time.sleep(0.005)
    proc.wait()
    assert killed_mid_write, "the merge finished before it could be killed"
    assert not out.exists()
    assert len(temps(tmp_path)) == 1  # what a kill leaves: a marked temporary folder, never OUT
    result = adapterops.merge(base, ad, out)  # the rerun removes the dead process's folder and succeeds
    assert result.tensors_written == 24 and temps(tmp_path) == []
    assert (tree_hash(base), tree_hash(ad)) == before


def test_file_size_limit_mid_write_fails_cleanly(tmp_path):
    """A real write error from the OS: RLIMIT_FSIZE makes write() fail with EFBIG part-way through the shard."""
    out = tmp_path / "out"
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
            "from adapterops.cli import main; sys.argv = ['adapterops'] + sys.argv[1:]; main()")
    res = subprocess.run([sys.executable, "-c", code, "merge", str(MODELS / "llama-tied"), str(ADAPTERS / "llama-lora"),
                          str(out), "-q"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "cannot write: File too large" in err and "model.safetensors" in err
    assert not out.exists() and temps(tmp_path) == []


def fill_disk(monkeypatch, folder: Path, room: int) -> None:
    """The disk under `folder` fills after `room` bytes: every syscall that writes into a file there (plain and
    O_DIRECT writes, positioned writes, file-to-file copies) fails with ENOSPC once it is full, after a partial
    write as a real disk gives."""
    left = [room]
    real = {name: getattr(os, name) for name in ("write", "pwrite", "copy_file_range")}

    def ours(fd: int) -> bool:
        try:
            return os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder))
        except OSError:
            return False

    def limited(name: str):
        def call(fd_or_src, *args):
            fd = args[0] if name == "copy_file_range" else fd_or_src
            if not ours(fd):
                return real[name](fd_or_src, *args)
            if left[0] <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            if name == "copy_file_range":
                n = min(args[1], left[0])
                left[0] -= n
                return real[name](fd_or_src, args[0], n, *args[2:])
            data = memoryview(args[0])[: left[0]]
            n = real[name](fd, data, *args[1:])
            left[0] -= n
            return n
        return call

    for name in real:
        monkeypatch.setattr(os, name, limited(name))


@pytest.mark.parametrize("direct", [False, True])
@pytest.mark.parametrize("room", [0, 50_000])
def test_full_disk_fails_cleanly(tmp_path, monkeypatch, room, direct):
    """The disk fills at the first byte, or part-way through the first shard, whichever way the bytes go: a write
    from memory or a file-to-file copy of an unchanged tensor, through the page cache or (`direct`) O_DIRECT."""
    from adapterops.io import outfile

    monkeypatch.setattr(outfile, "DIRECT_MIN_BYTES", 0 if direct else 1 << 62)
    fill_disk(monkeypatch, tmp_path, room)
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-untied"), str(ADAPTERS / "llama-lora-bias"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2, res.output
    assert "cannot write: No space left on device" in res.stderr and res.stderr.count("\n") == 1
    # the file is named under OUT, as the user gave it, not under the temporary folder that is gone by now
    assert f"{tmp_path / 'out'}/model-" in res.stderr and TMP_MARK not in res.stderr, res.stderr
    assert not (tmp_path / "out").exists() and temps(tmp_path) == []


def test_enospc_from_the_os_layer_is_one_line(tmp_path, monkeypatch):
    """An OSError raised below our writers (here: the config's write) still ends as one line, exit 2, nothing left."""
    import pathlib

    real = pathlib.Path.write_text

    def no_space(self, *a, **k):
        if self.name == "config.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return real(self, *a, **k)

    monkeypatch.setattr(pathlib.Path, "write_text", no_space)
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-tied"), str(ADAPTERS / "llama-lora"), str(tmp_path / "out"),
                                   "-q", "--dtype", "float32"])
    assert res.exit_code == 2, res.output
    assert "cannot write: No space left on device" in res.stderr and f"{tmp_path / 'out'}/config.json" in res.stderr
    assert not (tmp_path / "out").exists() and temps(tmp_path) == []
    assert read_all(MODELS / "llama-tied")  # inputs still readable
