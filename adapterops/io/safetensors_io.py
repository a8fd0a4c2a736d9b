"""Reading and writing the safetensors format one tensor at a time, with strict header validation.

We parse the header ourselves (8-byte length, JSON) so that a corrupt, lying or truncated file is reported with
its name and the tensor concerned, and we read each tensor with a positioned read so that peak memory stays near
the largest tensor. The writer streams: it writes the header first (all shapes are known from the plan) and then
each tensor's bytes in order.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from adapterops.errors import AdapteropsError
from adapterops.io.outfile import OutputFile, direct_io_wanted
from adapterops.io.paths import open_regular

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's MAX_HEADER_SIZE

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file, and what it is."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return self.end - self.begin


def dtype_name(dtype: torch.dtype) -> str:
    """The safetensors name of a torch dtype (BF16, F32, ...)."""
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise AdapteropsError(f"dtype {dtype} cannot be stored in safetensors") from None


U64 = 2**64  # the library's dims and offsets are usize
TORCH_MAX_DIM = 2**63 - 1  # torch sizes are int64
# The fields of a header entry. The library's TensorInfo is a serde struct without deny_unknown_fields: any other
# field is skipped, and a known field given twice is an error ("duplicate field"). We do the same: other fields are
# dropped unread (a writer may add its own), a repeated known field is refused.
ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
# dtypes the safetensors library knows but adapterops (torch) cannot hold
LIBRARY_ONLY_DTYPES = ("F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64")


def _uint(x: object) -> bool:
    """A JSON unsigned integer as serde reads a usize (bool and float are not integers)."""
    return type(x) is int and 0 <= x < U64


def _brief(x: object, limit: int = 80) -> str:
    """repr() of a header value for an error line, cut short (a lying shape may hold a million dimensions)."""
    if isinstance(x, (list, dict, str)) and len(x) > limit:  # no repr of a huge value just to cut it
        head = x[:limit] if not isinstance(x, dict) else dict(list(x.items())[:8])
        text = repr(head)
        return f"{text[:limit]}... ({len(x)} {'items' if not isinstance(x, str) else 'characters'})"
    text = repr(x)
    return text if len(text) <= limit else f"{text[:limit]}..."


def _parse_entry(path: Path, name: str, entry: object, data_start: int, data_size: int) -> TensorInfo:
    """Validate one header entry and turn it into a TensorInfo (the safetensors library's rules, checked in its order)."""
    if not isinstance(entry, dict):
        raise AdapteropsError(f"header entry is a {type(entry).__name__}, not an object", file=path, tensor=name)
    missing = [f for f in ENTRY_FIELDS if f not in entry]
    if missing:
        raise AdapteropsError(f"header entry has no {', '.join(missing)}", file=path, tensor=name)
    dt = entry["dtype"]
    if not isinstance(dt, str):  # ["F32"] or {} would not even be hashable
        raise AdapteropsError(f"dtype {_brief(dt)} is not a string", file=path, tensor=name)
    if dt not in DTYPES:
        why = "is not supported by adapterops" if dt in LIBRARY_ONLY_DTYPES else "is not a safetensors dtype"
        raise AdapteropsError(f"dtype {_brief(dt)} {why}", file=path, tensor=name)
    shape = entry["shape"]
    offsets = entry["data_offsets"]
    if not isinstance(shape, list) or not all(_uint(s) for s in shape):
        raise AdapteropsError(f"invalid shape {_brief(shape)}: dimensions must be integers from 0 to 2**64-1", file=path, tensor=name)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_uint(o) for o in offsets)
        or not offsets[0] <= offsets[1]
    ):
        raise AdapteropsError(f"invalid data_offsets {_brief(offsets)}: must be [begin, end] with 0 <= begin <= end", file=path, tensor=name)
    numel = 1
    for s in shape:  # the library's left fold of checked multiplications: [2**62, 2**62, 0] overflows
        numel *= s
        if numel >= U64:
            raise AdapteropsError(f"shape {_brief(shape)} overflows: its element count does not fit in 64 bits", file=path, tensor=name)
    dtype = DTYPES[dt]
    expected = numel * dtype.itemsize
    if expected >= U64:
        raise AdapteropsError(f"shape {_brief(shape)} overflows: its {dt} byte size does not fit in 64 bits", file=path, tensor=name)
    if offsets[1] - offsets[0] != expected:
        raise AdapteropsError(
            f"data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes but shape {_brief(shape)} {dt} needs {expected}",
            file=path,
            tensor=name,
        )
    if any(s > TORCH_MAX_DIM for s in shape):
        raise AdapteropsError(f"shape {_brief(shape)} has a dimension over 2**63-1, which torch cannot hold", file=path, tensor=name)
    # torch's contiguous strides are products of the later dimensions (a 0 counting as 1), in int64, even when the
    # tensor is empty: torch.empty([0, 2**32, 2**32]) fails with "Stride calculation overflowed". The library
    # accepts such a shape (its element count is 0); torch cannot hold it.
    span = 1
    for s in shape:
        span *= max(s, 1)
        if span > TORCH_MAX_DIM:
            raise AdapteropsError(f"shape {_brief(shape)} is too large for torch: its dimensions other than 0 multiply to "
                                  "over 2**63-1 (strides overflow even with no elements)", file=path, tensor=name)
    if offsets[1] > data_size:
        raise AdapteropsError(
            f"file is truncated: tensor data ends at byte {data_start + offsets[1]} "
            f"but the file has {data_start + data_size} bytes",
            file=path,
            tensor=name,
        )
    return TensorInfo(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])


class _Pairs(list):
    """A JSON object as the (key, value) pairs in file order, so that duplicates can be judged by where they are."""


def _header_json(path: Path, raw: bytes) -> tuple[dict[str, str] | None, list[tuple[str, object]]]:
    """(__metadata__, [(tensor name, entry)]) from the header bytes, refusing what the safetensors library refuses."""
    from adapterops.core.strict_json import loads_strict

    def bad(msg: str) -> AdapteropsError:
        return AdapteropsError(f"corrupt safetensors header: {msg}", file=path)

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad(f"not UTF-8 ({exc})") from None
    try:  # no NaN/Infinity, no lone surrogates, bounded nesting, as serde_json
        header = loads_strict(text, allow_nan=False, pairs=_Pairs)
    except ValueError as exc:
        raise bad(f"invalid JSON ({exc})") from None
    if not isinstance(header, _Pairs):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    meta: dict[str, str] | None = None
    seen_meta = False
    tensors: dict[str, object] = {}
    for key, value in header:
        if key == "__metadata__":
            if seen_meta:
                raise bad("__metadata__ appears twice")
            seen_meta = True
            if value is None:
                continue
            if not isinstance(value, _Pairs):
                raise bad(f"__metadata__ is a {type(value).__name__}, not an object of strings")
            meta = {}
            for k, v in value:  # duplicate metadata keys: the last wins, as in the library
                if not isinstance(v, str):
                    raise bad(f"__metadata__ value of {k!r} is {json.dumps(_plain(v))[:60]}, not a string")
                meta[k] = v
            continue
        if isinstance(value, _Pairs):  # a tensor entry: its known fields, each once (see ENTRY_FIELDS); one pass
            entry: dict[str, object] = {}
            for field, v in value:
                if field in ENTRY_FIELDS:
                    if field in entry:
                        raise AdapteropsError(f"corrupt safetensors header: field {field!r} appears twice", file=path, tensor=key)
                    entry[field] = _plain(v)  # nested objects too: a shape {} must not pass as the list []
            value = entry
        else:
            value = _plain(value)
        if key in tensors and tensors[key] != value:
            # the library keeps the last entry, and the first one's data then leaves a gap or an ambiguous tensor
            raise AdapteropsError(
                f"corrupt safetensors header: duplicate tensor name with different entries ({_brief(tensors[key], 120)} and "
                f"{_brief(value, 120)})",
                file=path,
                tensor=key,
            )
        tensors[key] = value  # an identical repeat is harmless: the library accepts it too
    return meta, list(tensors.items())


def _plain(x: object) -> object:
    """_Pairs (nested) back to dicts (recursive: loads_strict bounds the nesting to MAX_JSON_DEPTH levels)."""
    if isinstance(x, _Pairs):
        return {k: _plain(v) for k, v in x}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


class SafetensorsFile:
    """A lazily read safetensors file: the header is parsed and checked up front, tensors are read on demand."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fh: BinaryIO | None = None  # raw (unbuffered) handle for positioned reads
        self._size = 0  # the file's size when the header was read
        self.metadata: dict[str, str] = {}
        self.tensors: dict[str, TensorInfo] = self._read_header()

    def _read_header(self) -> dict[str, TensorInfo]:
        """Parse and validate the header: length, JSON, every entry, data that tile the rest of the file exactly."""
        fd, st = open_regular(self.path)  # a FIFO or device (a caller that skipped safe_file) is refused, never opened blocking
        size = st.st_size
        self._size = size
        try:
            with open(fd, "rb") as fh:
                raw_len = fh.read(8)
                if len(raw_len) < 8:
                    raise AdapteropsError("not a safetensors file: shorter than its 8-byte header length", file=self.path)
                (header_len,) = struct.unpack("<Q", raw_len)
                if header_len > MAX_HEADER_BYTES:
                    raise AdapteropsError(
                        f"corrupt safetensors header: its length field says {header_len} bytes, over the cap of "
                        f"{MAX_HEADER_BYTES} bytes (100 MB, the safetensors library's limit)",
                        file=self.path,
                    )
                if header_len > size - 8:
                    raise AdapteropsError(
                        f"corrupt safetensors header: its length field says {header_len} bytes "
                        f"but the file has {size} bytes",
                        file=self.path,
                    )
                raw = fh.read(header_len)
        except OSError as exc:
            raise AdapteropsError(f"cannot read: {exc.strerror or exc}", file=self.path) from None
        if len(raw) != header_len:
            raise AdapteropsError(f"file is truncated: header of {header_len} bytes, {len(raw)} read", file=self.path)
        meta, entries = _header_json(self.path, raw)
        self.metadata = meta or {}
        data_start = 8 + header_len
        data_size = size - data_start
        infos = {name: _parse_entry(self.path, name, e, data_start, data_size) for name, e in entries}
        # The library's rule: sorted by offsets, each tensor begins where the previous ended, the last ends the file.
        ordered = sorted(infos.values(), key=lambda i: (i.begin, i.end))
        expected, prev = data_start, None
        for cur in ordered:
            if cur.begin < expected:
                raise AdapteropsError(f"corrupt safetensors header: data overlaps '{prev.name}'", file=self.path, tensor=cur.name)
            if cur.begin > expected:
                after = f"after '{prev.name}'" if prev is not None else "at the start of the data"
                raise AdapteropsError(
                    f"corrupt safetensors header: a gap of {cur.begin - expected} bytes {after} that no tensor covers",
                    file=self.path,
                    tensor=cur.name,
                )
            expected, prev = cur.end, cur
        if expected != size:
            raise AdapteropsError(
                f"corrupt safetensors header: {size - expected} bytes after the last tensor's data that no tensor covers",
                file=self.path,
            )
        return dict(sorted(infos.items(), key=lambda kv: kv[1].begin))

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.tensors)

    def info(self, name: str) -> TensorInfo:
        """Header facts for one tensor."""
        try:
            return self.tensors[name]
        except KeyError:
            raise AdapteropsError("no such tensor", file=self.path, tensor=name) from None

    def read(self, name: str) -> torch.Tensor:
        """One tensor as a writable CPU tensor, mapped copy-on-write from the file (no copy until written).

        Only that tensor's pages are mapped, and the mapping goes away with the tensor, so memory stays near the
        tensors in use however large the file.
        """
        info = self.info(name)
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        if self._fh is None:
            fd, st = open_regular(self.path)
            self._fh = open(fd, "rb", buffering=0)
            if st.st_size != self._size:  # mapped pages past a shrunk end would kill the process (SIGBUS)
                self.close()
                raise AdapteropsError(f"changed while it was read: {self._size} bytes when its header was read, "
                                      f"{st.st_size} now", file=self.path, tensor=name)
        start = info.begin - info.begin % mmap.ALLOCATIONGRANULARITY
        try:
            mapped = mmap.mmap(self._fh.fileno(), info.end - start, offset=start, access=mmap.ACCESS_COPY)
        except (OSError, ValueError) as exc:
            raise AdapteropsError(f"cannot map tensor data: {exc}", file=self.path, tensor=name) from None
        if hasattr(mmap, "MADV_SEQUENTIAL"):
            mapped.madvise(mmap.MADV_SEQUENTIAL)
        flat = torch.frombuffer(mapped, dtype=torch.uint8, count=info.nbytes, offset=info.begin - start)
        return flat.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        """Close the file handle, if one is open."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


@dataclass(frozen=True)
class TensorSpec:
    """What the writer will store under one name; `shape` None means known only when the tensor arrives."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...] | None

    @property
    def nbytes(self) -> int:
        """Size of the tensor's data in bytes."""
        return math.prod(self.shape) * self.dtype.itemsize


PLACEHOLDER_SHAPE = (10**12,)  # an upper bound on the header text a not-yet-known small shape will need


def build_header(specs: list[TensorSpec], metadata: dict[str, str] | None, length: int | None = None) -> bytes:
    """The length-prefixed, space-padded JSON header for tensors stored in the given order.

    `length` pads the header to exactly that many bytes (prefix included), to fill space reserved earlier.
    """
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": dtype_name(spec.dtype),
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw) % 8) if length is None else (length - 8 - len(raw)))
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in the order the specs give.

    When every shape is known the header goes first. Otherwise space for an upper-bound header is reserved, the
    data follow it, and the exact header (padded with spaces to the reserved size) is written at close.
    """

    def __init__(self, path: str | os.PathLike, specs: list[TensorSpec], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.specs = list(specs)
        self.metadata = metadata
        self._written: list[TensorSpec] = []
        self._deferred = any(s.shape is None for s in self.specs)
        if self._deferred:
            bound = [TensorSpec(s.name, s.dtype, PLACEHOLDER_SHAPE if s.shape is None else s.shape) for s in self.specs]
            header = bytes(len(build_header(bound, metadata)))  # zeros for now: the exact header goes in at close
        else:
            header = build_header(self.specs, metadata)
        self._header_len = len(header)
        known = sum(s.nbytes for s in self.specs if s.shape is not None)
        self._file = OutputFile(self.path, direct_io_wanted(self._header_len + known))
        try:
            self._file.write(memoryview(header))
        except BaseException:
            self._file.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor) -> int:
        """Append the next tensor; it must be the one the specs expect next. Returns the bytes written."""
        spec = self.specs[len(self._written)]
        shape = tuple(tensor.shape)
        if name != spec.name or tensor.dtype != spec.dtype or (spec.shape is not None and shape != spec.shape):
            raise AdapteropsError(
                f"internal error: expected {spec.name} {spec.dtype} {spec.shape}, got {name} {tensor.dtype} {list(shape)}",
                file=self.path,
            )
        self._file.write(tensor_bytes(tensor).cast("B"))  # a full disk: one error naming the file
        self._written.append(TensorSpec(name, tensor.dtype, shape))
        return self._written[-1].nbytes

    def copy_range(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], source: str | os.PathLike, begin: int) -> int:
        """Append the next tensor straight from another file's byte range (its stored bytes, unchanged).

        The bytes never pass through Python: the kernel copies file to file, or (direct I/O) reads them into the
        output's aligned buffer. Returns the bytes written.
        """
        spec = self.specs[len(self._written)]
        if name != spec.name or dtype != spec.dtype or (spec.shape is not None and tuple(shape) != spec.shape):
            raise AdapteropsError(f"internal error: expected {spec.name} {spec.dtype} {spec.shape}, got {name} {dtype} {list(shape)}",
                                  file=self.path)
        nbytes = math.prod(shape) * dtype.itemsize
        src, _ = open_regular(source)
        try:
            self._file.copy_from(src, source, begin, nbytes)
        finally:
            os.close(src)
        self._written.append(TensorSpec(name, dtype, tuple(shape)))
        return nbytes

    @property
    def complete(self) -> bool:
        """Every tensor of the specs is written."""
        return len(self._written) == len(self.specs)

    def close(self) -> None:
        """Write the deferred header if any, close, and check that every tensor was written.

        Like save_pretrained we leave flushing to the OS (no fsync): the atomic rename already guarantees that a
        failed or killed run never leaves a partial output under the final name.
        """
        if self._file.closed:
            return
        try:
            if len(self._written) != len(self.specs):
                raise AdapteropsError(f"internal error: wrote {len(self._written)} of {len(self.specs)} tensors", file=self.path)
            if self._deferred:
                self._file.patch(0, build_header(self._written, self.metadata, self._header_len))
            self._file.close()
        finally:
            self._file.abort()

    def abort(self) -> None:
        """Close without the completeness check (the caller is discarding the file)."""
        self._file.abort()


def save_file(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a whole dict of tensors (small files: adapters, sidecars), names in sorted order."""
    specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in sorted(tensors.items())]
    w = SafetensorsWriter(path, specs, metadata)
    try:
        for spec in specs:
            w.write(spec.name, tensors[spec.name])
        w.close()
    except BaseException:
        w.abort()
        raise
