"""NF4 benchmark: adapterops.core.nf4 against bitsandbytes (where installed).

    python benchmarks/nf4.py            # CPU: 4096x4096 bf16 on 1 thread and torch's default; GPU too when CUDA is available (8192x28672 bf16),
                                        # with torch ops and with the fused Triton kernels (the `gpu` extra)

Prints ms and GB/s (bytes read + written) for quantize and dequantize, with and without double quantization,
and whether our bytes equal bitsandbytes' on that device (on the CPU bitsandbytes' own nested codes and zero
blocks differ from its CUDA kernels, which are our reference; see fixtures/nf4).
"""

from __future__ import annotations

import time

import torch

from adapterops.core import nf4


def bench(fn, device: str, repeat: int = 5) -> float:
    """Best wall milliseconds of fn() over a few runs."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best * 1000


def run(device: str, shape: tuple[int, int], backend: str = "torch") -> None:
    """Time ours (one backend: torch ops or the fused Triton kernels) and bitsandbytes' on one device."""
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.bfloat16).to(device)
    n = x.numel()
    try:
        import bitsandbytes.functional as F
    except ImportError:
        F = None
    print(f"\n{device}, ours = {backend}: {shape[0]}x{shape[1]} bf16, torch threads {torch.get_num_threads()}")
    print(f"{'op':<24} {'ours ms':>9} {'GB/s':>7} {'bnb ms':>9} {'GB/s':>7} {'ratio':>7} {'same bytes':>10}")
    for dq in (False, True):
        q_bytes = n * 2 + n / 2 + n / 64 * (1 if dq else 4)
        d_bytes = n / 2 + n / 64 * (1 if dq else 4) + n * 2
        ours_q = bench(lambda: nf4.quantize(x, 64, dq, backend=backend), device)
        packed, state = nf4.quantize(x, 64, dq, backend=backend)
        ours_d = bench(lambda: nf4.dequantize(packed, state, backend=backend), device)
        row = {"quantize": (ours_q, q_bytes), "dequantize": (ours_d, d_bytes)}
        ref = {}
        same = {"quantize": "-", "dequantize": "-"}
        if F is not None:
            ref["quantize"] = bench(lambda: F.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4"), device)
            bp, bs = F.quantize_4bit(x, blocksize=64, compress_statistics=dq, quant_type="nf4")
            ref["dequantize"] = bench(lambda: F.dequantize_4bit(bp, bs), device)
            same["quantize"] = str(torch.equal(bp.view(torch.uint8).reshape(-1), packed.reshape(-1)))
            same["dequantize"] = str(torch.equal(F.dequantize_4bit(bp, bs), nf4.dequantize(bp, nf4.state_from_tensors(
                {k.split("weight.")[-1]: v for k, v in bs.as_dict(packed=True).items()}), backend=backend)))
        for op, (ms, nbytes) in row.items():
            label = f"{op}{' +dq' if dq else ''}"
            if op in ref:
                r = ref[op]
                print(f"{label:<24} {ms:9.2f} {nbytes / ms / 1e6:7.1f} {r:9.2f} {nbytes / r / 1e6:7.1f} {r / ms:6.2f}x {same[op]:>10}")
            else:
                print(f"{label:<24} {ms:9.2f} {nbytes / ms / 1e6:7.1f}")


def main() -> None:
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
