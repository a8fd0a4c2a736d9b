"""The one exception type adapterops raises for bad input; the CLI turns it into exit code 2."""

from __future__ import annotations


class AdapteropsError(Exception):
    """A user-facing error: one line that names the file and, where known, the tensor."""

    exit_code = 2

    def __init__(self, message: str, *, file: object | None = None, tensor: str | None = None) -> None:
        parts = []
        if file is not None:
            parts.append(str(file))
        if tensor is not None:
            parts.append(f"tensor '{tensor}'")
        prefix = ": ".join(parts)
        text = f"{prefix}: {message}" if prefix else message
        super().__init__(" ".join(text.split()))  # always one line
