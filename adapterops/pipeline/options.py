"""Turning a library call's arguments into what the pipeline works with: dtypes, devices, adapter lists, sizes."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import torch

from adapterops.core.finite import cast_loss, finite_float
from adapterops.errors import AdapteropsError
from adapterops.io.adapter import MAX_RANK  # ranks, paddings and counts above it are no adapter's
from adapterops.io.atomic import check_output
from adapterops.io.checkpoint import Checkpoint, open_checkpoint
from adapterops.io.hub import resolve

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """float32 / bfloat16 / float16 (or fp32, bf16, fp16) to a torch dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise AdapteropsError(f"unknown dtype {name!r} (use float32, bfloat16 or float16)") from None


def as_list(adapters: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str | os.PathLike]:
    """One adapter or several, as a non-empty list."""
    specs = [adapters] if isinstance(adapters, (str, os.PathLike)) else list(adapters)
    if not specs:
        raise AdapteropsError("no adapter given")
    return specs


def cast_checked(t: torch.Tensor, dtype: torch.dtype, *, file: object = None, tensor: str | None = None,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """`t.to(device, dtype)`, refusing a narrowing cast that turns finite values into ±Inf (1e6 into float16):
    every dtype conversion the pipeline does on a written tensor goes through here."""
    out = t.to(device, dtype)
    if cast_loss(t, out):
        raise cast_error(t, out, file, tensor)
    return out


def cast_error(t: torch.Tensor, out: torch.Tensor, file: object, tensor: str | None) -> AdapteropsError:
    """The error for a cast that overflowed (cast_loss(t, out) is not None)."""
    return AdapteropsError(f"{cast_loss(t, out)}: the tensor cannot be written as {str(out.dtype).removeprefix('torch.')}",
                           file=file, tensor=tensor)


def check_weights(weights: Sequence[float] | None, adapters: Sequence[object]) -> list[float]:
    """The per-adapter weights (default 1 each): one per adapter, each a finite number (merge, unmerge and stack).

    A NaN or infinite weight would write NaN/Inf factors or weights; the error names the adapter it belongs to.
    """
    if weights is None:
        return [1.0] * len(adapters)
    weights = list(weights)
    if len(weights) != len(adapters):
        raise AdapteropsError(f"{len(weights)} weights given for {len(adapters)} adapters")
    for w, ad in zip(weights, adapters):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise AdapteropsError(f"weight {w!r:.40} is not a number", file=ad)
        if not math.isfinite(w):
            raise AdapteropsError(f"weight {w} is not a finite number", file=ad)
    return [float(w) for w in weights]




def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '≥'} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '≤'} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_number(name: str, value: object, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
                 hi_open: bool = False) -> float | None:
    """None, or `value` as a finite float within the bounds; anything else is one error naming the option.

    The library's numeric options come from the command line, Python callers and batch manifests alike: NaN passes
    click's FloatRange (it compares false to both bounds), TOML has nan, inf and integers of any length, and a
    Python caller can pass anything. Never raises anything but AdapteropsError."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise AdapteropsError(f"{name} must be a number, got {type(value).__name__} {value!r:.40}")
    number = finite_float(value)
    if number is None:
        raise AdapteropsError(f"{name} must be a finite number, got {value!r:.40}")
    if (lo is not None and (number < lo or (lo_open and number == lo))) or \
            (hi is not None and (number > hi or (hi_open and number == hi))):
        raise AdapteropsError(f"{name} must be {_interval(lo, hi, lo_open, hi_open)}, got {value!r:.40}")
    return number


def check_count(name: str, value: object, minimum: int = 1, maximum: int = MAX_RANK) -> int | None:
    """None, or `value` as an integer (not a bool) in [minimum, maximum]: a rank, a padding, a count."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise AdapteropsError(f"{name} must be an integer, got {type(value).__name__} {value!r:.40}")
    if not minimum <= value <= maximum:
        raise AdapteropsError(f"{name} must be in [{minimum}, {maximum}], got {value!r:.40}")
    return value


def check_seed(seed: object) -> int | None:
    """None, or a seed torch.Generator.manual_seed takes (an integer in [-2⁶³, 2⁶⁴)); it raises ValueError else."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise AdapteropsError(f"seed must be an integer, got {type(seed).__name__} {seed!r:.40}")
    if not -(1 << 63) <= seed < 1 << 64:
        raise AdapteropsError(f"seed must be in torch's seed range [-2^63, 2^64), got {seed!r:.40}")
    return seed


def check_name_patterns(option: str, patterns: object) -> list[str]:
    """--skip / --target patterns (a module name, a prefix, a suffix or a regex), checked before any matching:
    strings, and, where one is a regex, one whose matching time is bounded by the rule rank/alpha pattern keys
    follow (core/scaling.invalid_pattern): `(.*.*.*x)+y` would otherwise make the command hang on every module
    name. A pattern that is no valid regex is still matched as a name."""
    import re

    from adapterops.core.scaling import invalid_pattern

    if patterns is None:
        return []
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise AdapteropsError(f"{option} takes a list of patterns, got {type(patterns).__name__} {patterns!r:.40}")
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise AdapteropsError(f"{option} pattern {p!r:.40} is not a non-empty string")
        try:
            re.compile(p)
        except (re.error, RecursionError, OverflowError, ValueError):
            continue  # not a regex: matched as a module name, prefix or suffix only
        why = invalid_pattern(p)
        if why:
            raise AdapteropsError(f"{option} {p[:80]!r}: {why}")
    return list(patterns)


def pick_device(device: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (cuda when available). Nothing else: torch.device also parses meta, mps, xpu, hpu,
    ... whose tensors fail (or silently hold nothing: meta) deep inside the work, as tracebacks."""
    if not isinstance(device, str) or re.fullmatch(r"auto|cpu|cuda(?::\d{1,6})?", device, re.ASCII) is None:
        raise AdapteropsError(f"unknown device {device!r:.40} (use cpu, cuda, cuda:N or auto)")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise AdapteropsError("--device cuda was asked for but CUDA is not available")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise AdapteropsError(f"--device {device}: there is no CUDA device {index} ({torch.cuda.device_count()} visible)")
    return torch.device(device)


MAX_SIZE = 2**60  # 1 EiB: far above any shard a disk can hold
SIZE_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """'5GB', '500MB', '2GiB' or a number of bytes; None stays None. Exact (no float: '1e400' digits cannot overflow);
    below one byte or above 1 EiB is refused."""
    if text is None:
        return None
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise AdapteropsError(f"max_shard_size {text!r:.40} is not a size (use e.g. 5GB, 500MB or a byte count)")
    if isinstance(text, int):
        size = text
    else:
        m = re.fullmatch(r"\s*(\d+)(?:\.(\d+))?\s*((?:[KMGT]i?)?B?)\s*", text, re.IGNORECASE | re.ASCII)
        if not m:
            raise AdapteropsError(f"cannot read size {text[:60]!r} (use e.g. 5GB, 500MB or a byte count)")
        whole, frac = m.group(1).lstrip("0") or "0", (m.group(2) or "0")[:30]
        if len(whole) > 20:  # over 1e20 bytes whatever the unit: no need to read 400 digits
            raise AdapteropsError(f"size {text[:60]!r} is over 1 EiB, more than any shard can be")
        size = math.floor(Fraction(f"{whole}.{frac}") * SIZE_UNITS[m.group(3).upper().rstrip("B")])
    if size < 1:
        raise AdapteropsError(f"size {text!r:.60} is less than one byte")
    if size > MAX_SIZE:
        raise AdapteropsError(f"size {text!r:.60} is over 1 EiB, more than any shard can be")
    return size


def open_base(base: str | os.PathLike, out: str | os.PathLike, revision: str | None, force: bool) -> tuple[Checkpoint, Path]:
    """Resolve the input checkpoint (a folder, a file or a Hub id), check OUT against it, and open it."""
    base_path = resolve(str(base), revision)
    out = Path(out)
    check_output(out, [base_path], force)
    return open_checkpoint(base_path), out
