"""Hub repo ids resolve through huggingface_hub's cache, offline (tests never download).

We lay out a cache the way huggingface_hub does (models--org--name/refs/main, snapshots/<commit>/...) and run the
CLI in a subprocess with HF_HUB_CACHE pointing there and HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
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


def _client_errors() -> dict:
    """What the Hub client lets escape for network trouble, by the HTTP library it uses (httpx2, httpx or
    requests), and its own errors of no HTTP family: each must become one error line naming the repo."""
    import importlib

    from huggingface_hub import errors

    made = {"xet": lambda: errors.XetDownloadError("xet storage unreachable"),
            "revision_resolution": lambda: errors.RevisionResolutionError("cannot resolve main"),
            "runtime_multiline": lambda: RuntimeError("first line\nsecond line"),
            "empty_message": lambda: ConnectionResetError()}
    for name in ("httpx2", "httpx"):
        try:
            http = importlib.import_module(name)
        except ImportError:
            continue
        made.update({"proxy": lambda h=http: h.ProxyError("502 Bad Gateway"),
                     "remote_protocol": lambda h=http: h.RemoteProtocolError("peer closed connection"),
                     "read_timeout": lambda h=http: h.ReadTimeout("timed out"),
                     "read_error": lambda h=http: h.ReadError("connection reset")})
        break
    return made


CLIENT_ERRORS = _client_errors()


@pytest.mark.parametrize("case", list(CLIENT_ERRORS))
def test_any_hub_client_failure_is_one_error_line(case, tmp_path, monkeypatch):
    import huggingface_hub
    from click.testing import CliRunner

    from adapterops.cli import cli

    exc = CLIENT_ERRORS[case]()

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fail)
    res = CliRunner().invoke(cli, ["merge", "acme/tiny-llama", str(ADAPTERS / "llama-lora"), str(tmp_path / "out"), "-q"])
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
    assert res.exit_code == 2, res.output
    err = res.stderr.strip()
    assert err.startswith("error: acme/tiny-llama: cannot download from the Hub: ") and "\n" not in err, res.output
    assert type(exc).__name__ in err and not (tmp_path / "out").exists()


def test_a_proxy_that_refuses_is_one_error_line(tmp_path):
    """The real command line behind a proxy that answers every CONNECT with 502 (a local socket: nothing leaves
    this machine; the endpoint is 127.0.0.1:9 as well, which refuses at once should the proxy be ignored)."""
    import socket
    import threading

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(60)

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    threading.Thread(target=serve, daemon=True).start()
    proxy = f"http://127.0.0.1:{srv.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(("HF_", "NO_PROXY", "HTTP", "ALL_PROXY"))}
    env.update(HTTPS_PROXY=proxy, HTTP_PROXY=proxy, NO_PROXY="", HF_ENDPOINT="https://127.0.0.1:9",
               HF_HUB_CACHE=str(tmp_path / "cache"), HF_HUB_ETAG_TIMEOUT="5", HF_HUB_DOWNLOAD_TIMEOUT="5")
    try:
        res = subprocess.run([sys.executable, "-m", "adapterops", "merge", "acme/not-cached", str(ADAPTERS / "llama-lora"),
                              str(tmp_path / "out"), "-q"], env=env, capture_output=True, text=True, timeout=120,
                             check=False)
    finally:
        srv.close()
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    err = res.stderr.strip()
    assert err.startswith("error: acme/not-cached: ") and "\n" not in err and "502" in err, err
    assert not (tmp_path / "out").exists()


def test_tilde_of_an_unknown_user_is_no_such_file(tmp_path):
    """Path('~nosuchuser/x').expanduser() raises RuntimeError: the name is then taken as typed."""
    res = run_cli(["inspect", "~adapterops-no-such-user/x"], tmp_path / "cache")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: ~adapterops-no-such-user/x: no such file") and res.stderr.count("\n") == 1
