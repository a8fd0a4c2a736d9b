"""Batch benchmark: a 20-task manifest with --jobs 1 and --jobs 2, then a rerun (all current) and --check.

    python benchmarks/batch.py             # 10 r=16 adapters for the 1.1B Llama (22 layers) x {rerank --rank 8, rescale --bake}

Each run is its own process on fresh outputs; prints wall seconds and the speed-up.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import WORK, make_adapter, timed  # noqa: E402

MANIFEST = """\
[[job]]
name = "r8"
op = "rerank"
adapter = "adapters/*/"
output = "out/{name}-r8"
rank = 8

[[job]]
name = "baked"
op = "rescale"
adapter = "adapters/*/"
output = "out/{name}-baked"
to = "rslora"
bake = true
"""


def main() -> None:
    root = WORK / "batch"
    for i in range(10):
        make_adapter(root / "adapters" / f"lora-{i:02d}", layers=22, dora=False, seed=100 + i)
    (root / "m.toml").write_text(MANIFEST)
    cli = [sys.executable, "-m", "adapterops", "batch", str(root / "m.toml"), "-q"]
    walls = {}
    for jobs in (1, 2):
        subprocess.run(["rm", "-rf", str(root / "out")], check=True)
        walls[jobs], rss = timed(cli + ["--jobs", str(jobs)])
        print(f"--jobs {jobs}: {walls[jobs]:6.2f} s wall, peak RSS of the parent {rss:.2f} GiB")
    rerun, _ = timed(cli)
    check, _ = timed(cli + ["--check"])
    print(f"speed-up --jobs 2 vs 1: {walls[1] / walls[2]:.2f}x; rerun with every output current: {rerun:.2f} s; --check: {check:.2f} s")
    size = sum(p.stat().st_size for p in (root / "adapters").rglob("*.safetensors"))
    print(f"20 tasks over 10 adapters ({size / 1e6:.0f} MB of adapter files)")


if __name__ == "__main__":
    main()
