"""Diff benchmark: `adapterops diff MERGED BASE` against the time to read both checkpoints.

    python benchmarks/diff.py              # the 1.1B model of benchmarks/merge.py, merged with its r=16 LoRA
    python benchmarks/diff.py --repeat 5

The floor reads every tensor of both checkpoints (safetensors' safe_open + get_tensor, touching every page so that
it is really read) and compares nothing. The two run side by side (floor, ours, floor, ours, ...);
we report median walls, peak RSS and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import WORK, make_adapter, make_base, make_merged, median, ratio, timed  # noqa: E402

READ_SCRIPT = """
import sys, json, pathlib
import torch
from safetensors import safe_open
for root in map(pathlib.Path, sys.argv[1:3]):
    for shard in sorted(set(json.loads((root / "model.safetensors.index.json").read_text())["weight_map"].values())):
        with safe_open(root / shard, "pt") as f:
            for k in f.keys():
                f.get_tensor(k).reshape(-1).view(torch.uint8)[::4096].max()  # touch every page: really read it
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    base, adapter, merged = WORK / f"llama-{args.layers}l", WORK / f"lora-{args.layers}l", WORK / f"merged-lora-{args.layers}l"
    make_base(base, args.layers)
    make_adapter(adapter, args.layers, False)
    make_merged(merged, base, adapter)
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    cmds = {"read": [sys.executable, "-c", READ_SCRIPT, str(merged), str(base)],
            "diff": [sys.executable, "-m", "adapterops", "diff", str(merged), str(base), "-q", "--json"]}
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for rep in range(args.repeat):
        for k, cmd in cmds.items():
            samples[k].append(timed(cmd, ok=(0, 1)))  # diff exits 1: the checkpoints differ, as they should
            print(f"  round {rep + 1} {k:<5} {samples[k][-1][0]:6.2f} s {samples[k][-1][1]:5.2f} GiB", file=sys.stderr, flush=True)
    for k, v in samples.items():
        print(f"{k:<5} median {median([w for w, _ in v]):6.2f} s  all {' '.join(f'{w:.1f}' for w, _ in v)}  peak RSS {max(r for _, r in v):.2f} GiB")
    print(f"diff / read both: {ratio(samples, 'diff', 'read'):.2f}x (median of per-round ratios; target <= 1.5x)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
