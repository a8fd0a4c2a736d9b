"""Turning a command-line input into a local path: a folder or file as is, a Hub repo id through huggingface_hub.

Hub downloads go through `snapshot_download`, so its cache, `HF_HOME`/`HF_HUB_CACHE` and `HF_HUB_OFFLINE` apply.
Only safetensors weights and small text files are fetched; pickles and other weight formats are not.
"""

from __future__ import annotations

import re
from pathlib import Path

from adapterops.errors import AdapteropsError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")  # org/name: what we accept as a Hub repo id
ALLOW = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "*.py", "*.md"]


def is_hub_id(spec: str) -> bool:
    """Whether a string reads as a Hub repo id (org/name), not as a local path."""
    return not spec.startswith((".", "/", "~")) and REPO_ID.match(spec) is not None


def resolve(spec: str, revision: str | None = None) -> Path:
    """A local path for a folder, a file or a Hub repo id (downloaded or taken from the cache)."""
    try:
        local = Path(spec).expanduser()
    except RuntimeError:  # ~user for a user that does not exist (or no home folder): the name as typed
        local = Path(spec)
    try:
        if local.exists():
            return local
    except OSError as exc:  # a name too long, a folder that cannot be searched
        raise AdapteropsError(f"cannot access: {exc.strerror or exc}", file=spec) from None
    if not is_hub_id(spec):
        raise AdapteropsError("no such file or folder (and not a Hub repo id)", file=spec)
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise AdapteropsError("huggingface_hub is not installed; pass a local folder", file=spec) from None
    try:
        return Path(snapshot_download(spec, revision=revision, allow_patterns=ALLOW))
    except RepositoryNotFoundError:
        raise AdapteropsError("Hub repository not found (or private: log in with `hf auth login`)", file=spec) from None
    except RevisionNotFoundError:
        raise AdapteropsError(f"Hub repository has no revision {revision or 'main'!r}", file=spec) from None
    except LocalEntryNotFoundError:
        raise AdapteropsError("not in the local Hub cache and the Hub cannot be reached (HF_HUB_OFFLINE?)", file=spec) from None
    except Exception as exc:  # noqa: BLE001 - whatever the Hub client or its HTTP library raises (proxy, connection,
        # read, protocol, TLS, Xet errors, ...): one line naming the repo and the cause; Ctrl-C is not an Exception
        raise AdapteropsError(f"cannot download from the Hub: {_cause(exc)}", file=spec) from None


def _cause(exc: BaseException) -> str:
    """`ProxyError: 502 Bad Gateway`: the exception's type and its message, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
