"""NF4 (QLoRA's 4-bit NormalFloat) quantization with double quantization, byte for byte as bitsandbytes' CUDA kernels.

Pure torch, no bitsandbytes, any device. The facts matched (see fixtures/nf4 and the tests):

- blocks of `blocksize` consecutive elements of the flattened tensor; absmax per block in float32;
- x · (1/absmax) in float32, then the code is the number of the 15 thresholds strictly below it, using the
  thresholds as nvcc compiled them (4 of them 1 ulp away from the float32 midpoints); NaN → code 0, so an
  all-zero block (0 · inf) is all code 0;
- two codes per byte, the first element in the high nibble; an odd tail is padded with a 0.0 of the last block;
- double quantization: absmax minus its mean, quantized to 8 bits in blocks of 256 with the signed dynamic map,
  by bitsandbytes' binary search (nearest code, exact ties to the even index);
- dequantization: fl32(code · absmax) rounded once to the original dtype; a nested absmax is
  fl32(fl32(code8 · nested_absmax) + offset), two roundings.
"""

from __future__ import annotations

import ctypes
import json
import math
import mmap
import struct
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from adapterops.core.nf4_layout import BLOCKSIZES, NESTED_BLOCKSIZE  # noqa: F401 (re-exported)
from adapterops.core.finite import FLOAT32_MAX, finite_float
from adapterops.core.strict_json import loads_strict
from adapterops.core.lowrank import one_thread
from adapterops.core.parallel import share

_NF4_HEX = ("bf800000 bf3239b1 bf066b30 beca32a0 be91a24d be3d353f bdba7871 00000000 "
            "3da2faff 3e24cae3 3e7c04dd 3ead033a 3ee1a4b8 3f1007ab 3f3913b3 3f800000")
# dQuantizeNF4's decimal literals as nvcc rounds them (single rounding): t0, t8, t12 and t14 differ from
# torch.tensor(<python float>) by 1 ulp.
_THRESH_HEX = ("bf591cd9 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff "
               "3df64863 3e5067e0 3e9582d4 3ec753f9 3f006d03 3f248daf 3f5c89d9")


def _f32(hexes: str) -> torch.Tensor:
    """float32 values from their bit patterns."""
    return torch.tensor([struct.unpack(">f", bytes.fromhex(h))[0] for h in hexes.split()], dtype=torch.float32)


NF4_CODE = _f32(_NF4_HEX)
NF4_THRESHOLDS = _f32(_THRESH_HEX)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (create_dynamic_map(signed=True, 7, 8)), 256 float32 values."""
    values: list[float] = []
    for i in range(7):
        b = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (b[:-1] + b[1:]) / 2.0
        values += (10 ** (i - 6) * means).tolist()
        values += (-(10 ** (i - 6)) * means).tolist()
    values += [0.0, 1.0]
    values.sort()
    return torch.tensor(values, dtype=torch.float32)


DYNAMIC_MAP = dynamic_map()


@dataclass
class NF4State:
    """Everything needed to dequantize: what bitsandbytes' QuantState holds."""

    absmax: torch.Tensor  # float32 (nb,), or uint8 codes with double quantization
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int
    offset: torch.Tensor | None = None  # 0-dim float32 (double quantization)
    nested_absmax: torch.Tensor | None = None  # float32 (ceil(nb/256),)
    code: torch.Tensor = NF4_CODE
    nested_code: torch.Tensor = DYNAMIC_MAP

    @property
    def double_quant(self) -> bool:
        """Whether the absmax is itself quantized."""
        return self.nested_absmax is not None

    def quant_state_json(self) -> str:
        """The JSON bitsandbytes packs as `quant_state.bitsandbytes__nf4` (same keys, order and separators)."""
        d: dict[str, object] = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": str(self.dtype).removeprefix("torch."),
            "shape": list(self.shape),
        }
        if self.double_quant:
            d.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        return json.dumps(d)

    def as_tensors(self) -> dict[str, torch.Tensor]:
        """The quant-state tensors transformers stores beside `weight` (keys without the `weight.` prefix)."""
        out = {"absmax": self.absmax, "quant_map": self.code}
        if self.double_quant:
            out["nested_absmax"] = self.nested_absmax
            out["nested_quant_map"] = self.nested_code
        out["quant_state.bitsandbytes__nf4"] = torch.tensor(list(self.quant_state_json().encode("utf-8")), dtype=torch.uint8)
        return out


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """The flat float32 tensor, zero-padded to whole blocks, as (blocks, blocksize)."""
    nb = math.ceil(flat.numel() / blocksize)
    pad = nb * blocksize - flat.numel()
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(nb, blocksize)


def _absmax(blocks: torch.Tensor) -> torch.Tensor:
    """Per-block max |x|, ignoring NaN as CUDA's fmaxf does."""
    a = blocks.abs()
    if torch.isnan(a).any():
        a = torch.where(torch.isnan(a), torch.zeros((), dtype=a.dtype, device=a.device), a)
    return a.amax(dim=1)


def _nf4_count(x: torch.Tensor) -> torch.Tensor:
    """The definition: code = number of thresholds strictly below x (ties go down); NaN → 0. int32."""
    thr = NF4_THRESHOLDS.to(x.device)
    return torch.bucketize(x, thr, right=False, out_int32=True).masked_fill_(torch.isnan(x), 0)


_NF4_BY_TOP16: tuple[torch.Tensor, torch.Tensor] | None = None


def _nf4_by_top16() -> tuple[torch.Tensor, torch.Tensor]:
    """`_nf4_count` by a float32's top 16 bits: (uint8 code of the lowest value with those bits, the threshold
    that lies among those values, +inf where none does).

    Thresholds are ≥ 0.08 apart and those 16 bits span at most 1/128 of a value, so at most one threshold lies
    among the values sharing them (checked here): the code is the lowest value's, plus one above that threshold.
    """
    global _NF4_BY_TOP16
    if _NF4_BY_TOP16 is None:
        top = torch.arange(65536, dtype=torch.int32)
        neg = top >= 32768  # sign bit set: the lowest value has the largest magnitude
        low = torch.where(neg, (top << 16) | 0xFFFF, top << 16).view(torch.float32)
        high = torch.where(neg, top << 16, (top << 16) | 0xFFFF).view(torch.float32)
        base, above = _nf4_count(low), _nf4_count(high)
        finite = torch.isfinite(low) & torch.isfinite(high)  # (the NaN/inf ones are whole-tensor-masked or constant)
        step = above - base
        if not bool(((step[finite] == 0) | (step[finite] == 1)).all()):
            raise AssertionError("two NF4 thresholds share a float32's top 16 bits")
        fix = torch.full((65536,), math.inf)
        one = finite & (step == 1)
        fix[one] = NF4_THRESHOLDS[base[one].long()]
        _NF4_BY_TOP16 = (base.to(torch.uint8), fix)
    return _NF4_BY_TOP16


def _nf4_codes(normalized: torch.Tensor, chunk: int = 1 << 18) -> torch.Tensor:
    """`_nf4_count` as uint8, by a 65536-entry table on each value's top 16 bits and one comparison (4x faster
    than torch.bucketize on the CPU), `chunk` values at a time there so the intermediates stay in cache."""
    flat = normalized.reshape(-1)
    base, fix = (t.to(flat.device) for t in _nf4_by_top16())
    out = torch.empty(flat.numel(), dtype=torch.uint8, device=flat.device)
    bits = flat.view(torch.int32)
    chunk = min(chunk, flat.numel()) if flat.device.type == "cpu" else flat.numel()
    if chunk:
        idx = torch.empty(chunk, dtype=torch.int32, device=flat.device)
        thr = torch.empty(chunk, dtype=torch.float32, device=flat.device)
        above = torch.empty(chunk, dtype=torch.bool, device=flat.device)
        for s in range(0, flat.numel(), chunk):
            e = min(s + chunk, flat.numel())
            k = e - s
            i = torch.bitwise_right_shift(bits[s:e], 16, out=idx[:k]).bitwise_and_(0xFFFF)
            torch.index_select(base, 0, i, out=out[s:e])
            torch.gt(flat[s:e], torch.index_select(fix, 0, i, out=thr[:k]), out=above[:k])
            out[s:e].add_(above[:k])
    return out.masked_fill_(torch.isnan(flat), 0).view(normalized.shape)


def _search_8bit(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' binary search of each normalized x in the 256-value code (nearest code, exact ties to the even
    index) → int64 indices. The definition; `_steps_8bit` turns it into one sorted lookup."""
    pivot = torch.full_like(x, 127, dtype=torch.long)
    lower_pivot, upper_pivot = torch.zeros_like(pivot), torch.full_like(pivot, 255)
    lower, upper = torch.full_like(x, -1.0), torch.full_like(x, 1.0)
    val = code[pivot]
    for step in (64, 32, 16, 8, 4, 2, 1):
        gt = x > val
        lower_pivot = torch.where(gt, pivot, lower_pivot)
        lower = torch.where(gt, val, lower)
        upper_pivot = torch.where(gt, upper_pivot, pivot)
        upper = torch.where(gt, upper, val)
        pivot = torch.where(gt, pivot + step, pivot - step)
        val = code[pivot]
    upper = torch.where(upper_pivot == 255, code[255], upper)
    lower = torch.where(lower_pivot == 0, code[0], lower)
    gt = x > val
    up = torch.where(x > (upper + val) * 0.5, upper_pivot, pivot)
    down = torch.where(x < (lower + val) * 0.5, lower_pivot, pivot)
    return torch.where(gt, up, down)


_STEPS_8BIT: dict[bytes, tuple[torch.Tensor, torch.Tensor, int]] = {}


def _steps_8bit(code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`_search_8bit` as a step function: (sorted float32 edges, uint8 code from each edge up, code of NaN).

    Every comparison the search makes is of x against a code value or the float32 midpoint (a + b) · 0.5 of two of
    them (±1 included, its starting bounds). Between two consecutive such values every comparison, and so the
    result, is the same; so the search run once at each value and at the float32 just above it gives the result
    for every float32. Edges where the result does not change are dropped (≤ 256 remain).
    """
    key = code.numpy().tobytes()
    if key not in _STEPS_8BIT:
        ops = torch.cat([code, torch.tensor([-1.0, 1.0])]).float()
        cand = torch.unique(torch.cat([ops, ((ops[:, None] + ops[None, :]) * 0.5).reshape(-1)]))  # sorted
        above = torch.nextafter(cand, torch.tensor(math.inf))
        edges = torch.stack([cand, above], 1).reshape(-1)
        edges = torch.cat([torch.tensor([-math.inf]), edges[torch.cat([torch.tensor([True]), edges[1:] > edges[:-1]])]])
        value = _search_8bit(edges, code)  # the result on [edge, next edge)
        keep = torch.cat([torch.tensor([True]), value[1:] != value[:-1]])
        nan = int(_search_8bit(torch.tensor([math.nan]), code)[0])
        _STEPS_8BIT[key] = (edges[keep].contiguous(), value[keep].to(torch.uint8), nan)
    return _STEPS_8BIT[key]


def _quantize_8bit(values: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' blockwise 8-bit quantization (blocks of 256, binary search) → (uint8 codes, float32 absmax)."""
    n = values.numel()
    blocks = _blocks(values.reshape(-1).float(), NESTED_BLOCKSIZE)
    absmax = _absmax(blocks)
    x = (blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)
    edges, value, nan = _steps_8bit(code.detach().float().cpu())
    edges, value = edges.to(x.device), value.to(x.device)
    # the last edge at or below x; -inf is the first edge, so every non-NaN x has one
    q = value[torch.searchsorted(edges, x, right=True, out_int32=True) - 1]
    q = q.masked_fill_(torch.isnan(x), nan)
    return q[:n], absmax


def _use_triton(backend: str, device: torch.device) -> bool:
    """Whether to run the fused Triton kernels: "auto" where they can run, "triton" always, "torch" never."""
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be auto, torch or triton, not {backend!r}")
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return False  # (and no triton import on the CPU path)
    from adapterops.core import nf4_triton

    if backend == "triton" and not nf4_triton.available(device):
        raise ValueError("the triton backend needs triton and a CUDA tensor (or TRITON_INTERPRET=1)")
    return nf4_triton.available(device) and (backend == "triton" or device.type == "cuda")


def quantize(
    x: torch.Tensor, blocksize: int = 64, double_quant: bool = True, offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, NF4State]:
    """Quantize to NF4 → (packed uint8 of shape ((n+1)//2, 1), state), bit-exact with bitsandbytes' CUDA kernels.

    With double quantization the offset is `absmax.mean()` on x's device: on a GPU it matches bitsandbytes there;
    on the CPU torch's summation order can put it 1 ulp away (then nested absmax and dequantized values differ in
    the last bit, all codes still equal). `offset` overrides the mean, to reproduce another device's bytes.
    `backend`: "auto" runs the fused Triton kernel on CUDA tensors when triton is installed, torch ops otherwise.
    """
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"NF4 quantizes float32, bfloat16 or float16 tensors, not {x.dtype}")
    n = x.numel()
    if _use_triton(backend, x.device):
        from adapterops.core import nf4_triton

        packed, absmax = nf4_triton.quantize_blocks(x.reshape(-1).contiguous(), blocksize, NF4_THRESHOLDS)
        packed = packed.reshape(-1, 1)
    else:
        # one CPU thread: element-wise ops and exact maxima, the same bits on any count; the chunked code lookup's
        # small ops on two threads took 2.5x as long as on one at load 4 on 2 cores
        with one_thread(x.device):
            blocks = _blocks(x.reshape(-1).float(), blocksize)
            absmax = _absmax(blocks)
            codes = _nf4_codes(blocks * (1.0 / absmax).unsqueeze(1)).reshape(-1)
            if codes.numel() % 2:
                codes = torch.cat([codes, codes.new_full((1,), 7)])
            packed = ((codes[0::2] << 4) | codes[1::2])[: (n + 1) // 2].reshape(-1, 1)
    state = NF4State(absmax=absmax, shape=tuple(x.shape), dtype=x.dtype, blocksize=blocksize)
    if double_quant:
        # (the mean on torch's own threads, as before: its summation order may follow the thread count)
        offset = absmax.mean() if offset is None else offset.to(device=absmax.device, dtype=torch.float32)
        with one_thread(absmax.device):
            state.absmax, state.nested_absmax = _quantize_8bit(absmax - offset, DYNAMIC_MAP)
        state.offset = offset
    return packed, state


def block_absmax(state: NF4State) -> torch.Tensor:
    """The float32 per-block absmax, undoing double quantization with bitsandbytes' two roundings."""
    if not state.double_quant:
        return state.absmax.float()
    nested = state.nested_absmax.float()
    q = state.absmax.reshape(-1)
    absmax = torch.index_select(state.nested_code.to(q.device), 0, q.int())  # code8, then · nested_absmax per 256
    whole = q.numel() // NESTED_BLOCKSIZE * NESTED_BLOCKSIZE
    head = absmax[:whole].view(-1, NESTED_BLOCKSIZE)
    head.mul_(nested[: head.shape[0]].unsqueeze(1))
    if whole < q.numel():
        absmax[whole:].mul_(nested[-1])
    return absmax.add_(state.offset.to(absmax.device))


def _byte_table(code: torch.Tensor) -> torch.Tensor:
    """(256, 2): the two code values each packed byte stands for (high nibble first)."""
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 0x0F]], dim=1)


_HUGE_PAGE = 1 << 21
_MADVISE = None  # libc's madvise once looked up; False where there is none


def _advise_huge_pages(t: torch.Tensor, populate: bool = False) -> None:
    """Ask Linux to back the whole 2 MiB pages inside a fresh CPU tensor's memory with huge pages.

    Its first write then takes one page fault per 2 MiB instead of one per 4 KiB: a fresh 32 MB output took 16-18 ms
    to fill with 4 KiB faults and ~4 ms after this hint on the 2-core dev machine (transparent huge pages set to
    `madvise`). A hint only: where the kernel, libc or the THP setting says no, nothing changes, values never do.
    With THP's defrag also `madvise` (as there) a huge-page fault may first compact memory; over 50 dequantizes
    of that output /proc/vmstat counted 750 huge-page faults and no compaction stall.
    """
    global _MADVISE
    if _MADVISE is None:
        _MADVISE = False
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                fn = ctypes.CDLL(None).madvise
                fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
                _MADVISE = fn
            except (OSError, AttributeError):
                pass
    if not _MADVISE:
        return
    start = -(-t.data_ptr() // _HUGE_PAGE) * _HUGE_PAGE
    stop = (t.data_ptr() + t.numel() * t.element_size()) // _HUGE_PAGE * _HUGE_PAGE
    if stop > start:
        _MADVISE(start, stop - start, mmap.MADV_HUGEPAGE)
        if populate:  # fault them all in now, in one call (Linux >= 5.14; elsewhere the call fails and nothing changes)
            _MADVISE(start, stop - start, _MADV_POPULATE_WRITE)


_MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux's value where mmap has no name for it


def _fresh_output(n: int, dtype: torch.dtype, device: torch.device, populate: bool = False) -> torch.Tensor:
    """An uninitialised flat output; on the CPU, large ones advised onto huge pages before their first write, and with
    `populate` (several threads will fill it) faulted in first: threads faulting the same huge pages at once wait
    on each other (2 threads, fresh 32 MB output: 12.1 ms against 5.1 ms into a caller's buffer)."""
    out = torch.empty(n, dtype=dtype, device=device)
    if device.type == "cpu" and n * out.element_size() >= 2 * _HUGE_PAGE:
        _advise_huge_pages(out, populate)
    return out


def dequantize(
    packed: torch.Tensor, state: NF4State, chunk_blocks: int = 4096, backend: str = "auto",
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """NF4 back to the original dtype and shape: fl32(code · absmax), rounded once.

    `out`: a contiguous tensor of the state's dtype, element count and the packed weight's device to write into
    (returned, reshaped to the state's shape); without it a fresh one is allocated.

    The CPU path works through `chunk_blocks` blocks at a time with per-worker buffers, so the float32
    intermediates stay in cache: int32 byte indices, a gather of each byte's two codes as one 8-byte scalar, an
    in-place float32 multiply by the block's absmax, and a copy into the output that rounds once to its dtype.
    Called from the main thread with torch set to k > 1 threads, k Python threads share the chunks (each torch op
    on one thread; a descheduled worker only leaves its chunks to the others). A fresh output of 4 MB or more is
    advised onto huge pages (see `_advise_huge_pages`). On CUDA with triton installed ("auto"), one fused kernel
    does it all.
    """
    n = math.prod(state.shape)
    bs = state.blocksize
    flat = packed.reshape(-1)
    if out is not None and (out.dtype != state.dtype or out.numel() != n or out.device != flat.device
                            or not out.is_contiguous()):
        raise ValueError(f"out must be a contiguous {state.dtype} tensor of {n} elements on {flat.device}, got "
                         f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} {list(out.shape)} on {out.device}")
    if _use_triton(backend, flat.device):
        from adapterops.core import nf4_triton

        res = nf4_triton.dequantize_flat(flat, block_absmax(state), state.code, n, bs, state.dtype)
        if out is None:
            return res.reshape(state.shape)
        out.view(-1).copy_(res.reshape(-1))
        return out.view(state.shape)
    # Python threads share the chunks only from the main thread, where one_thread sets torch to one thread before
    # they start (core.parallel.share gives each new thread that count): each small op on a descheduled OpenMP
    # thread made the whole dequantize 5-15x slower on a busy machine. Elsewhere, one loop on the caller's torch setting.
    threads = torch.get_num_threads() if threading.current_thread() is threading.main_thread() else 1
    dest = _fresh_output(n, state.dtype, flat.device, populate=threads > 1) if out is None else out.view(-1)
    with one_thread(flat.device):
        _dequantize_chunks(flat, block_absmax(state), state.code, n, bs, dest, chunk_blocks, threads)
    return dest.view(state.shape)


def _dequantize_chunks(
    flat: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, n: int, bs: int, dest: torch.Tensor,
    chunk_blocks: int, threads: int,
) -> None:
    """dest[:n] = fl32(code · absmax) in dest's dtype, `chunk_blocks` blocks at a time, on up to `threads` threads."""
    # each byte's two float32 codes as one 8-byte scalar: a 1-D index_select of those is 4x faster than an
    # embedding lookup of (256, 2) rows
    table = _byte_table(code.to(device=flat.device, dtype=torch.float32)).view(torch.int64).reshape(-1)
    nb = absmax.numel()
    chunk = min(chunk_blocks, nb)
    per = chunk * bs // 2  # packed bytes per chunk
    nfull = n // (chunk * bs)  # chunks whose blocks, bytes and outputs are all whole
    # their views made once, so that each chunk costs four torch calls (per-call overhead was ~1/3 of the time)
    src = flat[: nfull * per].view(nfull, per).unbind(0)
    scales = absmax[: nfull * chunk].view(nfull, chunk, 1).unbind(0)
    dests = dest[: nfull * chunk * bs].view(nfull, chunk, bs).unbind(0)

    def tail() -> None:
        """The blocks after the whole chunks: a partial last block's missing bytes give values cut off below."""
        b0 = nfull * chunk
        lo = b0 * bs // 2
        i = torch.zeros((nb - b0) * bs // 2, dtype=torch.int32, device=flat.device)
        i[: flat.numel() - lo].copy_(flat[lo:])
        vals = torch.index_select(table, 0, i).view(torch.float32).view(nb - b0, bs)
        dest[b0 * bs :].copy_(vals.mul_(absmax[b0:].unsqueeze(1)).view(-1)[: n - b0 * bs])

    def work(items: Iterator[int]) -> None:
        idx = torch.empty(per, dtype=torch.int32, device=flat.device)
        pairs = torch.empty(per, dtype=torch.int64, device=flat.device)
        vals = pairs.view(torch.float32).view(chunk, bs)
        direct = dest.dtype == torch.float32
        for j in items:
            if j == nfull:
                tail()
                continue
            idx.copy_(src[j])
            torch.index_select(table, 0, idx, out=pairs)
            if direct:
                torch.mul(vals, scales[j], out=dests[j])
            else:  # float32 product, then one rounding to the output dtype (faster than a mixed-dtype mul)
                dests[j].copy_(vals.mul_(scales[j]))

    # each worker takes the next chunk when it is free
    share(work, nfull + (nfull * chunk < nb), min(threads, nfull // 2) if flat.device.type == "cpu" else 1)


NF4_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_NF4_ELEMENTS = 2**48  # far above any weight; keeps a lying shape from sizing allocations


class BadState(ValueError):
    """A stored quant state that contradicts itself or its packed weight; the message says which tensor and why."""

    def __init__(self, message: str, tensor: str | None = None) -> None:
        super().__init__(message)
        self.tensor = tensor  # the quant-state key concerned (absmax, quant_map, ...), None for the JSON


def _qs_json(raw: torch.Tensor) -> dict:
    """The quant-state JSON object stored as uint8 bytes."""
    if raw.dtype != torch.uint8 or raw.dim() != 1:
        raise BadState(f"quant state must be 1-D uint8 bytes, got {raw.dtype} {list(raw.shape)}", QS_KEY)
    try:
        qs = loads_strict(bytes(raw.tolist()).decode("utf-8"), allow_nan=False)
    except (UnicodeDecodeError, ValueError) as exc:
        raise BadState(f"quant state is not valid JSON ({exc})", QS_KEY) from None
    if not isinstance(qs, dict):
        raise BadState(f"quant state JSON is a {type(qs).__name__}, not an object", QS_KEY)
    return qs


def _int(x: object) -> bool:
    return type(x) is int


def _finite(x: object) -> float | None:
    """`x` as a float when it is a number (int or float, not a bool) that float32 holds finite, else None; never
    raises."""
    value = finite_float(x) if isinstance(x, (int, float)) else None
    return value if value is not None and abs(value) <= FLOAT32_MAX else None


def _float_tensor(tensors: dict[str, torch.Tensor], key: str, numel: int, what: str) -> torch.Tensor:
    t = tensors[key]
    if t.dtype != torch.float32:
        raise BadState(f"{what} must be float32, got {t.dtype}", key)
    if t.numel() != numel:
        raise BadState(f"{what} has {t.numel()} values, expected {numel}", key)
    if not bool(torch.isfinite(t).all()):
        raise BadState(f"{what} holds NaN or Inf", key)
    return t


QS_KEY = "quant_state.bitsandbytes__nf4"


def state_from_tensors(tensors: dict[str, torch.Tensor], packed: torch.Tensor | None = None) -> NF4State:
    """Rebuild the state from stored quant-state tensors (keys as in `as_tensors`), checking every fact.

    Each quant-state tensor must agree with the JSON and, when `packed` is given, with the packed weight: the
    blocksize one of bitsandbytes', the shape's element count the packed size, absmax one value per block, the
    quant maps 16 and 256 finite float32 values, the nested offset finite. A lie raises BadState naming the key.
    """
    for key in (QS_KEY, "absmax"):
        if key not in tensors:
            raise BadState(f"missing quant-state tensor {key}", key)
    qs = _qs_json(tensors[QS_KEY])
    if qs.get("quant_type") != "nf4":
        raise BadState(f"quant_type {qs.get('quant_type')!r} is not nf4", QS_KEY)
    bs = qs.get("blocksize")
    if not _int(bs) or bs not in BLOCKSIZES:
        raise BadState(f"blocksize {bs!r} is not one of bitsandbytes' blocksizes {BLOCKSIZES}", QS_KEY)
    dt = qs.get("dtype")
    if not isinstance(dt, str) or dt not in NF4_DTYPES:
        raise BadState(f"dtype {dt!r} is not one of {sorted(NF4_DTYPES)}", QS_KEY)
    shape = qs.get("shape")
    if not isinstance(shape, list) or not shape or not all(_int(d) and d > 0 for d in shape):
        raise BadState(f"shape {shape!r} is not a list of positive integers", QS_KEY)
    n = math.prod(shape)
    if n > MAX_NF4_ELEMENTS:
        raise BadState(f"shape {shape} has {n} elements, more than any weight", QS_KEY)
    if packed is not None:
        if packed.dtype != torch.uint8:
            raise BadState(f"packed weight is {packed.dtype}; only uint8 storage is supported", None)
        if packed.numel() != (n + 1) // 2:
            raise BadState(f"packed weight has {packed.numel()} bytes but shape {shape} needs {(n + 1) // 2}", None)
    nb = math.ceil(n / bs)
    code = _float_tensor(tensors, "quant_map", 16, "quant_map") if "quant_map" in tensors else NF4_CODE
    state = NF4State(absmax=tensors["absmax"], shape=tuple(shape), dtype=NF4_DTYPES[dt], blocksize=bs, code=code)
    nested = "nested_absmax" in tensors
    if nested != ("nested_offset" in qs):
        have, lack = ("nested_absmax", "nested_offset in the JSON") if nested else ("nested_offset in the JSON", "nested_absmax")
        raise BadState(f"{have} without {lack}: double quantization half stored", "nested_absmax" if nested else QS_KEY)
    if nested:
        absmax = tensors["absmax"]
        if absmax.dtype != torch.uint8 or absmax.numel() != nb:
            raise BadState(f"absmax (double-quantized) must be {nb} uint8 codes, got {absmax.numel()} {absmax.dtype}", "absmax")
        if qs.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE or qs.get("nested_dtype", "float32") != "float32":
            raise BadState(f"nested_blocksize/nested_dtype must be {NESTED_BLOCKSIZE}/float32, got "
                           f"{qs.get('nested_blocksize')!r}/{qs.get('nested_dtype')!r}", QS_KEY)
        off = _finite(qs["nested_offset"])
        if off is None:
            raise BadState(f"nested_offset {qs['nested_offset']!r:.40} is not a finite float32 number", QS_KEY)
        state.nested_absmax = _float_tensor(tensors, "nested_absmax", math.ceil(nb / NESTED_BLOCKSIZE), "nested_absmax")
        state.nested_code = (_float_tensor(tensors, "nested_quant_map", 256, "nested_quant_map")
                             if "nested_quant_map" in tensors else DYNAMIC_MAP)
        state.offset = torch.tensor(float(off), dtype=torch.float32)
        if not bool(torch.isfinite(block_absmax(state)).all()):
            raise BadState("the double-quantized absmax overflows to Inf", "nested_absmax")
    else:
        if "nested_quant_map" in tensors:
            raise BadState("nested_quant_map without nested_absmax", "nested_quant_map")
        _float_tensor(tensors, "absmax", nb, "absmax")
    return state
