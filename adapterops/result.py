"""What every command returns: a dataclass that turns itself into the CLI's --json summary."""

from __future__ import annotations

from dataclasses import asdict


class Result:
    """Mixed into each command's result dataclass."""

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready dict of every field."""
        return asdict(self)
