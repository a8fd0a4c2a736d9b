"""Analyze benchmark: `adapterops analyze` on an r=16 all-linear adapter shaped for an 8B Llama, on the CPU.

    python benchmarks/analyze.py               # 32 layers x 7 projections = 224 modules (hidden 4096, intermediate 14336)
    python benchmarks/analyze.py --plot        # also draws benchmarks/_work/analyze-8b.png

Runs the CLI as its own process (wall seconds, peak RSS; targets: under 10 s and 2 GB), then times a dense-SVD
implementation (form ΔW = s·B·A, torch.linalg.svd) against our QR route on a few modules and checks that both
give the same singular values.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import WORK, make_adapter, timed  # noqa: E402

from adapterops.core.lowrank import svd_of_product  # noqa: E402
from adapterops.io.adapter import open_adapter  # noqa: E402

HIDDEN, INTER, KV = 4096, 14336, 1024
PROJ_8B = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV, HIDDEN), "v_proj": (KV, HIDDEN), "o_proj": (HIDDEN, HIDDEN),
        "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plot", action="store_true")
    ap.add_argument("--dense-modules", default="q_proj,k_proj,o_proj", help="layer-0 modules to time with a dense SVD")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    adapter = WORK / "lora-8b-r16"
    make_adapter(adapter, 32, False, seed=3, proj=PROJ_8B)
    size = (adapter / "adapter_model.safetensors").stat().st_size
    cmd = [sys.executable, "-m", "adapterops", "analyze", str(adapter), "--json", str(WORK / "analyze-8b.json")]
    if args.plot:
        cmd += ["--plot", str(WORK / "analyze-8b.png")]
    wall, rss = min(timed(cmd) for _ in range(3))
    print(f"adapter: 224 modules, r=16, {size / 1e6:.0f} MB; torch threads {torch.get_num_threads()}")
    print(f"adapterops analyze: {wall:.2f} s wall (target < 10 s), peak RSS {rss:.2f} GiB (target < 2 GB), best of 3")
    ad = open_adapter(adapter)
    for p in args.dense_modules.split(","):
        mod = ad.modules[f"model.layers.0.{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p}"]
        b, a = ad.read(mod.b_key).float(), ad.read(mod.a_key).float()
        svd_of_product(b, a, mod.scale)  # warm-up: the first LAPACK call of a shape pays one-time costs
        t = time.perf_counter()
        ours = svd_of_product(b, a, mod.scale).S
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        dense = torch.linalg.svd((b @ a) * mod.scale, full_matrices=False).S[: ours.numel()]
        t_dense = time.perf_counter() - t
        agree = float((ours - dense).abs().max() / dense[0])
        print(f"{p:<10} {tuple(b.shape[:1]) + tuple(a.shape[1:])}: dense SVD {t_dense:7.2f} s, QR route {t_ours * 1e3:7.2f} ms "
              f"-> {t_dense / t_ours:8.0f}x; max |σ diff| / σ1 = {agree:.1e}")
    ad.close()


if __name__ == "__main__":
    main()
