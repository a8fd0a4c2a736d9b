"""The output file (O_DIRECT through an aligned buffer, or plain writes) and the reused output buffers: the bytes on
disk are exactly what was appended, whichever way they went, and a refused O_DIRECT falls back without a trace."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from helpers import ADAPTERS, MODELS

from adapterops.cli import cli
from adapterops.errors import AdapteropsError
from adapterops.io import outfile
from adapterops.io.outfile import OutputFile
from adapterops.pipeline.stream import Buffers


def direct_supported(folder: Path) -> bool:
    """Whether the file system under `folder` opens files with O_DIRECT (tmpfs on older kernels does not)."""
    try:
        fd = os.open(folder / ".probe", os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError:
        return False
    os.close(fd)
    os.remove(folder / ".probe")
    return True


def pieces() -> list[bytes]:
    """Byte strings of awkward lengths: empty, single bytes, across and exactly at the 8 KiB buffer's edges."""
    g = torch.Generator().manual_seed(3)
    sizes = [0, 1, 7, 8192 - 8, 8192, 8193, 3 * 8192 + 5, 1, 4096, 12345]
    return [bytes(torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8).tolist()) for n in sizes]


def fail_direct_writes(tmp_path: Path, monkeypatch, code: int) -> list[int]:
    """Every write through an O_DIRECT descriptor fails with `code` (plain writes go through), with 8 KiB buffers;
    returns the list the failed writes' lengths go into. Skips where the file system has no O_DIRECT."""
    import fcntl

    if not direct_supported(tmp_path):
        pytest.skip("no O_DIRECT on this file system")
    monkeypatch.setattr(outfile, "BUFFER_BYTES", 8192)
    real_write = os.write
    failed: list[int] = []

    def write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            failed.append(len(data))
            raise OSError(code, os.strerror(code))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    return failed


@pytest.mark.parametrize("direct", [False, True])
def test_appended_bytes_land_exactly(tmp_path, monkeypatch, direct):
    """Writes, file-to-file copies and a patch of the first bytes give the same file as a plain concatenation, with
    an 8 KiB buffer so that every piece crosses or meets a buffer's edge; the file ends at its true length (the
    padded tail is truncated away)."""
    monkeypatch.setattr(outfile, "BUFFER_BYTES", 8192)
    source = tmp_path / "source.bin"
    src_bytes = bytes(range(256)) * 300
    source.write_bytes(src_bytes)
    f = OutputFile(tmp_path / "out.bin", direct)
    if direct:
        assert f.direct == direct_supported(tmp_path)
    expect = bytearray()
    fd = os.open(source, os.O_RDONLY)
    try:
        for n, piece in enumerate(pieces()):
            f.write(memoryview(piece))
            expect += piece
            begin, count = (n * 977) % 1000, (n * 3001) % 20000
            f.copy_from(fd, source, begin, count)
            expect += src_bytes[begin:begin + count]
    finally:
        os.close(fd)
    f.patch(3, b"HEAD")
    expect[3:7] = b"HEAD"
    f.close()
    assert f.size == len(expect)
    assert (tmp_path / "out.bin").read_bytes() == bytes(expect)


def test_open_refusing_o_direct_falls_back_to_plain_writes(tmp_path, monkeypatch):
    """A file system that refuses O_DIRECT at open (EINVAL, as tmpfs on older kernels does) gets plain writes and the same bytes."""
    real_open = os.open

    def no_direct(path, flags, *a):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        return real_open(path, flags, *a)

    monkeypatch.setattr(os, "open", no_direct)
    f = OutputFile(tmp_path / "out.bin", True)
    assert not f.direct
    f.write(memoryview(b"abc" * 5000))
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == b"abc" * 5000


def test_write_refusing_o_direct_falls_back_mid_file(tmp_path, monkeypatch):
    """A file system that takes O_DIRECT at open but refuses the writes (EINVAL) gets the same bytes by plain
    writes: the refused buffer is written again without O_DIRECT."""
    refused = fail_direct_writes(tmp_path, monkeypatch, errno.EINVAL)
    f = OutputFile(tmp_path / "out.bin", True)
    data = b"".join(pieces())
    f.write(memoryview(data))
    f.close()
    assert refused == [8192]
    assert (tmp_path / "out.bin").read_bytes() == data


@pytest.mark.parametrize("direct", [False, True])
def test_os_errors_are_one_error_naming_the_file(tmp_path, monkeypatch, direct):
    """A failing write (here EIO) is an AdapteropsError naming the output file, on either path."""
    monkeypatch.setattr(outfile, "BUFFER_BYTES", 8192)

    def broken(fd, data):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    f = OutputFile(tmp_path / "out.bin", direct)
    monkeypatch.setattr(os, "write", broken)
    with pytest.raises(AdapteropsError) as err:
        f.write(memoryview(bytes(20000)))
        f.close()
    f.abort()
    assert "cannot write: Input/output error" in str(err.value) and "out.bin" in str(err.value)


def test_merge_bytes_are_the_same_with_and_without_direct_io(tmp_path, monkeypatch):
    """A whole merge (sharded fixture, unchanged tensors copied file to file) gives the same files whether every
    output goes through O_DIRECT (threshold 0) or through the page cache (ADAPTEROPS_DIRECT_IO=0)."""
    args = [str(MODELS / "llama-untied"), str(ADAPTERS / "llama-lora"), "-q", "--max-shard-size", "50KB"]
    monkeypatch.setattr(outfile, "DIRECT_MIN_BYTES", 0)
    monkeypatch.setattr(outfile, "BUFFER_BYTES", 8192)
    opened = []
    real_init = OutputFile.__init__

    def spy(self, path, direct):
        real_init(self, path, direct)
        opened.append(self.direct)

    monkeypatch.setattr(OutputFile, "__init__", spy)
    res = CliRunner().invoke(cli, ["merge", args[0], args[1], str(tmp_path / "direct"), *args[2:]])
    assert res.exit_code == 0, res.output
    assert opened and all(opened) == direct_supported(tmp_path)
    monkeypatch.setenv("ADAPTEROPS_DIRECT_IO", "0")
    opened.clear()
    res = CliRunner().invoke(cli, ["merge", args[0], args[1], str(tmp_path / "plain"), *args[2:]])
    assert res.exit_code == 0, res.output
    assert opened and not any(opened)
    shards = sorted(p.name for p in (tmp_path / "plain").glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in (tmp_path / "direct").glob("*.safetensors"))
    for name in shards:
        assert (tmp_path / "direct" / name).read_bytes() == (tmp_path / "plain" / name).read_bytes()


def test_buffers_are_reused_once_released_and_only_then():
    """A released buffer serves the next request that fits (the smallest such); one still lent is never handed out
    twice; tensors that are not ours are ignored; at most `keep` free buffers stay."""
    pool = Buffers(keep=2)
    a = pool.empty((4, 8), torch.bfloat16)
    b = pool.empty((100,), torch.float32)
    assert a.shape == (4, 8) and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert a.data_ptr() != b.data_ptr()
    c = pool.empty((4, 8), torch.bfloat16)  # a is still lent
    assert c.data_ptr() not in (a.data_ptr(), b.data_ptr())
    pool.release(a)
    pool.release(b)
    pool.release(torch.zeros(3))  # not ours
    pool.release(None)
    d = pool.empty((2, 8), torch.bfloat16)  # 32 bytes: a's 64-byte buffer fits and is the smallest that does
    assert d.data_ptr() == a.data_ptr()
    e = pool.empty((50,), torch.float32)
    assert e.data_ptr() == b.data_ptr()
    for t in (c, d, e):
        pool.release(t)
    assert len(pool._free) == 2  # the two largest kept


def test_merge_reuses_output_buffers(tmp_path, monkeypatch):
    """A merge of many Linear modules allocates a handful of output buffers, not one per merged tensor."""
    made = []
    real_empty = Buffers.empty

    def counting(self, shape, dtype):
        t = real_empty(self, shape, dtype)
        made.append(t.data_ptr())
        return t

    monkeypatch.setattr(Buffers, "empty", counting)
    res = CliRunner().invoke(cli, ["merge", str(MODELS / "llama-untied"), str(ADAPTERS / "llama-lora"), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 0, res.output
    assert len(made) >= 8 and len(set(made)) <= 4


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_failed_header_write_leaves_no_descriptor_open(tmp_path, monkeypatch):
    """The disk full at a writer's first byte (its header): one error naming the file, and its descriptor closed."""
    from adapterops.io.safetensors_io import SafetensorsWriter, TensorSpec

    def full(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = open_fds()
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(AdapteropsError, match="No space left on device"):
        SafetensorsWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (4,))])
    monkeypatch.undo()
    assert open_fds() == before


def test_a_shard_that_cannot_be_opened_closes_the_ones_opened_before(tmp_path, monkeypatch):
    """write_shards opens every shard first: when the third cannot be opened, the two before it are closed again."""
    from adapterops.io.safetensors_io import TensorSpec
    from adapterops.pipeline.stream import write_shards

    real_open = os.open

    def third_fails(path, flags, *a):
        if str(path).endswith("c.safetensors"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        return real_open(path, flags, *a)

    shards = [(f"{n}.safetensors", [TensorSpec(n, torch.float32, (4,))]) for n in "abc"]
    before = open_fds()
    monkeypatch.setattr(os, "open", third_fails)
    with pytest.raises(AdapteropsError, match="Permission denied"):
        write_shards(tmp_path, shards, iter([]), quiet=True, desc="t")
    monkeypatch.undo()
    assert open_fds() == before


def test_direct_buffers_exist_only_while_a_file_is_filled(tmp_path, monkeypatch):
    """Opening a direct file takes no buffer (a checkpoint opens every shard at once); its first byte makes them,
    its close frees them."""
    monkeypatch.setattr(outfile, "BUFFER_BYTES", 8192)
    f = OutputFile(tmp_path / "out.bin", True)
    assert f._maps == []
    f.write(memoryview(b"x" * 10))
    assert len(f._maps) == (2 if f.direct else 0)
    f.close()
    assert f._maps == [] and (tmp_path / "out.bin").read_bytes() == b"x" * 10


@pytest.mark.parametrize("direct", [False, True])
def test_appends_after_a_patch_continue_at_the_end(tmp_path, monkeypatch, direct):
    """After the tail is written (a patch of the first bytes), later appends land right after the last byte, not
    after the padding the tail was written with."""
    monkeypatch.setattr(outfile, "BUFFER_BYTES", 8192)
    f = OutputFile(tmp_path / "out.bin", direct)
    f.write(memoryview(b"a" * 5000))
    f.patch(0, b"H")
    f.write(memoryview(b"abc"))
    f.close()
    assert (tmp_path / "out.bin").read_bytes() == b"H" + b"a" * 4999 + b"abc" and f.size == 5003


def test_after_a_failed_flush_close_raises_the_error_without_writing_again(tmp_path, monkeypatch):
    """A write the flusher thread could not do fails the file: the next operation raises that error, and close
    raises it again instead of writing the same buffer a second time."""
    attempts = fail_direct_writes(tmp_path, monkeypatch, errno.EIO)
    f = OutputFile(tmp_path / "out.bin", True)
    with pytest.raises(AdapteropsError, match="Input/output error"):
        f.write(memoryview(bytes(3 * 8192)))  # the second buffer's flush waits on the first, which failed
    with pytest.raises(AdapteropsError, match="Input/output error"):
        f.close()
    assert f.closed and len(attempts) == 2


def test_share_stops_handing_out_work_once_a_thread_fails_and_prefers_ctrl_c():
    """After one thread raises, the others take no new index; a KeyboardInterrupt is raised before other errors."""
    import threading
    import time

    from adapterops.core.parallel import share

    done = []

    def work(items):
        for i in items:
            if i == 0:
                raise ValueError("boom")
            time.sleep(0.001)
            done.append(i)

    with pytest.raises(ValueError):
        share(work, 1000, 3)
    assert len(done) < 100

    seen = threading.Event()

    def interrupted(items):
        for i in items:
            if i == 1:
                seen.set()
                raise KeyboardInterrupt
            if i == 2:
                seen.wait(1)
                raise ValueError("later")

    with pytest.raises(KeyboardInterrupt):
        share(interrupted, 10, 2)


def test_cgroup_cpu_quota_caps_the_cores(tmp_path):
    """A container's CPU quota (cgroup v2 cpu.max; v1 quota / period) gives the cores to use; 'max' or -1: none."""
    from adapterops.pipeline.threads import cgroup_cpu_quota

    v2 = tmp_path / "cpu.max"
    v2.write_text("250000 100000\n")
    assert cgroup_cpu_quota((str(v2),)) == 3
    v2.write_text("max 100000\n")
    assert cgroup_cpu_quota((str(v2),)) is None
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("150000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota((str(tmp_path / "missing"), str(v1 / "cpu.cfs_quota_us"))) == 2
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota((str(v1 / "cpu.cfs_quota_us"),)) is None


@pytest.mark.parametrize("name,value", [("ADAPTEROPS_MERGE_WORKERS", "abc"), ("ADAPTEROPS_MERGE_WORKERS", "0"),
                                        ("ADAPTEROPS_MERGE_WORKERS", "²"), ("ADAPTEROPS_DIRECT_IO", "maybe")])
@pytest.mark.parametrize("model,adapter", [("llama-untied", "llama-lora"), ("gpt2", "gpt2-lora")])
def test_a_bad_setting_is_one_error_before_any_work(tmp_path, monkeypatch, name, value, model, adapter):
    """A bad ADAPTEROPS_* value: one error line, exit 2, nothing written, whether or not the merge would reach the
    code that reads it (GPT-2's Conv1D weights take the general path, not the blocked one)."""
    monkeypatch.setenv(name, value)
    res = CliRunner().invoke(cli, ["merge", str(MODELS / model), str(ADAPTERS / adapter), str(tmp_path / "out"), "-q"])
    assert res.exit_code == 2 and name in res.stderr and res.stderr.count("\n") == 1, res.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("on", True), ("0", False), ("False", False), ("off", False)])
def test_direct_io_setting_words(monkeypatch, value, on):
    monkeypatch.setenv("ADAPTEROPS_DIRECT_IO", value)
    assert outfile.direct_io_setting() is on


def test_batch_workers_share_the_cores_with_the_merge_threads(monkeypatch):
    """A batch worker process (cores // jobs threads) gives the merge that many block workers, unless the user
    chose a count."""
    import torch

    from adapterops.batch.runner import _init_worker
    from adapterops.pipeline.threads import block_workers

    previous = torch.get_num_threads()
    try:
        monkeypatch.setenv("ADAPTEROPS_MERGE_WORKERS", "1")  # recorded, so that the test's end restores the original
        monkeypatch.delenv("ADAPTEROPS_MERGE_WORKERS")
        _init_worker(3)
        assert block_workers(torch.device("cpu")) == 3
        monkeypatch.setenv("ADAPTEROPS_MERGE_WORKERS", "5")
        _init_worker(1)
        assert block_workers(torch.device("cpu")) == 5
    finally:
        torch.set_num_threads(previous)
