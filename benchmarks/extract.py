"""Extract benchmark: `adapterops extract --rank 16` against mergekit's `mergekit-extract-lora` (and torch.svd_lowrank).

    python benchmarks/extract.py                       # 1.1B Llama-shaped bf16 model of benchmarks/merge.py
    python benchmarks/extract.py --layers 4 --repeat 3  # a smaller model (the same modules per layer), more rounds
    python benchmarks/extract.py --mergekit /path/to/venv/bin/mergekit-extract-lora

TUNED is BASE with benchmarks/merge.py's r=16 LoRA merged in (by adapterops, bf16), so ΔW = TUNED − BASE is rank 16
plus the merge's bf16 rounding. Contenders, each its own process, side by side (A B C A B C ...), peak RSS measured
by merge.py's launcher:

- ours: `python -m adapterops extract BASE TUNED OUT --rank 16`;
- mergekit: `mergekit-extract-lora --model TUNED --base-model BASE --out-path OUT --max-rank 16` (a dense
  torch.linalg.svd per module). mergekit is not a dependency of adapterops: install it in a venv of its own
  (`python -m venv /work/bench-venv && /work/bench-venv/bin/pip install mergekit`) and point --mergekit at it;
  without it the row is skipped;
- lowrank: a per-module `torch.svd_lowrank(ΔW, q=16+16, niter=2)` script (what one would write by hand), run with
  this interpreter.

Then, for every module, the error ‖ΔW − B·A‖_F of each adapter (in float64, ΔW exact), and the ratios: wall and
RSS medians of per-round ratios, error sums and the worst per-module error ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import WORK, make_adapter, make_base, make_merged, median, side_by_side  # noqa: E402

DEFAULT_MERGEKIT = "/work/bench-venv/bin/mergekit-extract-lora"

LOWRANK_SCRIPT = """
import sys, json, pathlib, torch
from safetensors import safe_open
from safetensors.torch import save_file
base, tuned, out, rank = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), pathlib.Path(sys.argv[3]), int(sys.argv[4])
wm = json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]
twm = json.loads((tuned / "model.safetensors.index.json").read_text())["weight_map"]
proj = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
tensors = {}
torch.manual_seed(0)
for name, shard in wm.items():
    if not name.endswith(".weight") or name.split(".")[-2] not in proj:
        continue
    with safe_open(base / shard, "pt") as fb, safe_open(tuned / twm[name], "pt") as ft:
        d = ft.get_tensor(name).float() - fb.get_tensor(name).float()
    u, s, v = torch.svd_lowrank(d, q=rank + 16, niter=2)
    r = s[:rank].sqrt()
    key = "base_model.model." + name[: -len(".weight")]
    tensors[key + ".lora_A.weight"] = (v[:, :rank] * r).T.contiguous()
    tensors[key + ".lora_B.weight"] = (u[:, :rank] * r).contiguous()
out.mkdir(parents=True, exist_ok=True)
save_file(tensors, out / "adapter_model.safetensors")
"""


def load_adapter(path: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module → (B, A, scale) of a PEFT LoRA adapter (scale α/r with its rank and alpha patterns)."""
    from safetensors.torch import load_file

    cfg_file = path / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {"r": 1, "lora_alpha": 1}
    t = load_file(path / "adapter_model.safetensors")
    out = {}
    for k, a in t.items():
        if not k.endswith(".lora_A.weight"):
            continue
        module = k[len("base_model.model."): -len(".lora_A.weight")]
        b = t[k.replace("lora_A", "lora_B")]
        r = (cfg.get("rank_pattern") or {}).get(module, cfg.get("r", a.shape[0]))
        alpha = (cfg.get("alpha_pattern") or {}).get(module, cfg.get("lora_alpha", r))
        out[module] = (b, a, alpha / r)
    return out


def errors(base: Path, tuned: Path, adapters: dict[str, Path]) -> dict[str, dict[str, float]]:
    """module → {contender: ‖ΔW − s·B·A‖_F} in float64, plus "norm": ‖ΔW‖_F."""
    from adapterops.io.checkpoint import open_checkpoint

    loaded = {k: load_adapter(p) for k, p in adapters.items()}
    res: dict[str, dict[str, float]] = {}
    with open_checkpoint(base, False) as b, open_checkpoint(tuned, False) as t:
        for module in sorted(next(iter(loaded.values()))):
            name = module + ".weight"
            d = t.read(name).double() - b.read(name).double()
            row = {"norm": float(torch.linalg.norm(d))}
            for k, ad in loaded.items():
                if module not in ad:
                    row[k] = row["norm"]
                    continue
                bb, aa, s = ad[module]
                row[k] = float(torch.linalg.norm(d - s * (bb.double() @ aa.double())))
            res[module] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1, help="rounds, side by side (medians reported)")
    ap.add_argument("--mergekit", default=DEFAULT_MERGEKIT, help="the mergekit-extract-lora executable (its own venv)")
    ap.add_argument("--skip-lowrank", action="store_true")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    base, adapter, tuned = WORK / f"llama-{args.layers}l", WORK / f"lora-{args.layers}l", WORK / f"tuned-{args.layers}l"
    make_base(base, args.layers)
    make_adapter(adapter, args.layers, False)
    make_merged(tuned, base, adapter)
    for f in ("config.json",):  # mergekit reads the tuned model's config
        if not (tuned / f).exists():
            shutil.copy(base / f, tuned / f)
    print(f"model: {args.layers} layers (7 projections each), ΔW = rank-16 LoRA merged in bf16; --rank {args.rank}; "
          f"torch threads {torch.get_num_threads()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    outs = {k: WORK / f"extract-{k}" for k in ("ours", "mergekit", "lowrank")}
    cmds = {"ours": [sys.executable, "-m", "adapterops", "extract", str(base), str(tuned), str(outs["ours"]),
                     "--rank", str(args.rank), "-q"]}
    if Path(args.mergekit).exists():
        cmds["mergekit"] = [args.mergekit, "--model", str(tuned), "--base-model", str(base), "--out-path",
                            str(outs["mergekit"]), "--max-rank", str(args.rank)]
    else:
        print(f"mergekit-extract-lora not found at {args.mergekit}: its row is skipped")
    if not args.skip_lowrank:
        cmds["lowrank"] = [sys.executable, "-c", LOWRANK_SCRIPT, str(base), str(tuned), str(outs["lowrank"]), str(args.rank)]
    samples = side_by_side(cmds, outs, args.repeat, set())
    errs = errors(base, tuned, {k: outs[k] for k in cmds})
    norm = sum(r["norm"] ** 2 for r in errs.values()) ** 0.5
    print(f"\n{'run':<9} {'median s':>9} {'all wall s':>24} {'peak RSS GiB':>13} {'Σ‖ΔW−BA‖² ^½':>13} {'/ ‖ΔW‖':>9}")
    for k, v in samples.items():
        tot = sum(r[k] ** 2 for r in errs.values()) ** 0.5
        print(f"{k:<9} {median([w for w, _ in v]):9.2f} {' '.join(f'{w:.1f}' for w, _ in v):>24} "
              f"{max(r for _, r in v):13.2f} {tot:13.6f} {tot / norm:9.6f}")
    for other in [k for k in cmds if k != "ours"]:
        n = min(len(samples["ours"]), len(samples[other]))
        wall = median([samples[other][i][0] / samples["ours"][i][0] for i in range(n)])
        rss = max(r for _, r in samples[other]) / max(r for _, r in samples["ours"])
        per = [r["ours"] / r[other] for r in errs.values() if r[other] > 0]
        worst = max(errs, key=lambda m: errs[m]["ours"] / max(errs[m][other], 1e-30))
        print(f"{other} / ours: wall {wall:.2f}x (median of per-round ratios; target >= 3x for mergekit), peak RSS {rss:.2f}x; "
              f"error ours / {other} per module: median {median(per):.6f}, max {max(per):.6f} ({worst})")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for o in outs.values():
        subprocess.run(["rm", "-rf", str(o)], check=True)


if __name__ == "__main__":
    main()
