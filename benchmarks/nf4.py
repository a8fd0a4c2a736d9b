"""NF4 benchmark: adapterops.core.nf4 against bitsandbytes (where installed).

    python benchmarks/nf4.py --interleaved   # ours and bitsandbytes' alternate call by call (each call after the other's)
    python benchmarks/nf4.py            # CPU: 4096x4096 bf16 on 1 thread and torch's default; GPU too when CUDA is available (8192x28672 bf16),
                                        # with torch ops and with the fused Triton kernels (the `gpu` extra)

Prints median ms (9 rounds, quantize 5, in which ours and bitsandbytes' take turns, each called 4 times back to back,
the first not counted) and GB/s (bytes read + written) for
quantize and dequantize, with and without double quantization, and whether our bytes equal bitsandbytes' on that
device (on the CPU bitsandbytes' own nested codes and zero blocks differ from its CUDA kernels, which are our
reference; see fixtures/nf4). On the CPU, "dequantize into out=" times both writing into a buffer allocated once
(ours with `out=`, bitsandbytes' C++ kernel called directly): the compute without the fresh output's page faults.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from adapterops.core import nf4


RUN = 4  # calls of one library back to back in each round (--interleaved: 1, the libraries alternate call by call)


def bench(fns: list, device: str, repeat: int = 9, run: int | None = None) -> list[float]:
    """Median wall milliseconds of each fn(): in each of `repeat` rounds every fn runs `run` times back to back (as a
    loop over a model's weights calls one library), the fns taking turns round by round so that the load of a
    shared machine falls on each alike. The first call of each run is not counted: it starts while the other
    library's threads may still be spinning (OpenMP's idle threads spin for a while after a parallel region), or
    right after its allocations. With `--interleaved` every call counts and the libraries alternate call by call."""
    run = RUN if run is None else min(run, RUN)
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeat):
        for fn, ts in zip(fns, times):
            for k in range(run):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                fn()
                if device == "cuda":
                    torch.cuda.synchronize()
                if k or run == 1:
                    ts.append(time.perf_counter() - t)
    return [statistics.median(ts) * 1000 for ts in times]


def bnb_kernel_into(packed, state, out: torch.Tensor):
    """bitsandbytes' CPU C++ NF4 kernel writing into a preallocated bf16 buffer (what its op runs after torch.empty),
    or None where that entry point is missing; without double quantization only."""
    try:
        import ctypes

        from bitsandbytes.cextension import lib

        kernel = lib.cdequantize_blockwise_cpu_nf4_bf16
    except (ImportError, AttributeError):
        return None
    a = packed.view(torch.uint8)
    rows, cols = out.shape
    args = [ctypes.c_void_p(t.data_ptr()) for t in (a, state.absmax, out)]
    return lambda: kernel(*args, ctypes.c_longlong(state.blocksize), ctypes.c_longlong(rows), ctypes.c_longlong(cols))


def run(device: str, shape: tuple[int, int], backend: str = "torch") -> None:
    """Time ours (one backend: torch ops or the fused Triton kernels) and bitsandbytes' on one device."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16).to(device)
    n = x.numel()
    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
    print(f"\n{device}, ours = {backend}: {shape[0]}x{shape[1]} bf16, torch threads {torch.get_num_threads()}")
    print(f"{'op':<26} {'ours ms':>9} {'GB/s':>7} {'bnb ms':>9} {'GB/s':>7} {'ratio':>7} {'same bytes':>10}")
    for dq in (False, True):
        q_bytes = n * 2 + n / 2 + n / 64 * (1 if dq else 4)
        d_bytes = n / 2 + n / 64 * (1 if dq else 4) + n * 2
        packed, state = nf4.quantize(x, 64, dq, backend=backend)
        ours_q = [lambda: nf4.quantize(x, 64, dq, backend=backend)]
        ours_d = [lambda: nf4.dequantize(packed, state, backend=backend)]
        same = {"quantize": "-", "dequantize": "-"}
        if F is None:
            row = {"quantize": bench(ours_q, device, 5, 2), "dequantize": bench(ours_d, device)}  # quantize ~0.5 s on the CPU
        else:
            bp, bs = F.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4")
            row = {"quantize": bench(ours_q + [lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=dq,
                                                                       quant_type="nf4")], device, 5, 2),
                   "dequantize": bench(ours_d + [lambda: F.dequantize_4bit(bp, bs)], device)}
            same["quantize"] = str(torch.equal(bp.view(torch.uint8).reshape(-1), packed.reshape(-1)))
            same["dequantize"] = str(torch.equal(F.dequantize_4bit(bp, bs), nf4.dequantize(bp, nf4.state_from_tensors(
                {k.split("weight.")[-1]: v for k, v in bs.as_dict(packed=True).items()}), backend=backend)))
            if device == "cpu" and not dq:
                # the compute alone: both write into a buffer allocated once (the rows above allocate a fresh output)
                buf = torch.empty(shape, dtype=torch.bfloat16)
                kernel = bnb_kernel_into(bp, bs, buf)
                ours_into = [lambda p=packed, s=state, b=buf: nf4.dequantize(p, s, out=b)]
                row["dequantize into out="] = bench(ours_into + ([kernel] if kernel else []), device)
                if kernel is not None:
                    kernel()
                    same["dequantize into out="] = str(torch.equal(buf, nf4.dequantize(packed, state)))
        for op, times in row.items():
            label = f"{op}{' +dq' if dq else ''}"
            nbytes = q_bytes if op == "quantize" else d_bytes
            ms = times[0]
            if len(times) > 1:
                r = times[1]
                print(f"{label:<26} {ms:9.2f} {nbytes / ms / 1e6:7.1f} {r:9.2f} {nbytes / r / 1e6:7.1f} {r / ms:6.2f}x {same[op]:>10}")
            else:
                print(f"{label:<26} {ms:9.2f} {nbytes / ms / 1e6:7.1f}")


def main() -> None:
    global RUN
    if "--interleaved" in sys.argv[1:]:
        RUN = 1
    threads = torch.get_num_threads()
    for n in sorted({1, threads}):  # one thread and torch's default: a busy machine punishes threaded small ops
        torch.set_num_threads(n)
        run("cpu", (4096, 4096))
    torch.set_num_threads(threads)
    if torch.cuda.is_available():
        run("cuda", (8192, 28672), "torch")
        try:
            import triton  # noqa: F401

            run("cuda", (8192, 28672), "triton")
        except ImportError:
            print("\ntriton not installed (pip install 'adapterops[gpu]'): fused kernels skipped")
    else:
        print("\nno CUDA device: GPU figures skipped")


if __name__ == "__main__":
    main()
