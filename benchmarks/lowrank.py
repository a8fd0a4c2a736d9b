"""Low-rank benchmark: `rerank --rank 8` and `stack --method svd` against PEFT.

    python benchmarks/lowrank.py               # r=16 all-linear adapters for the 1.1B synthetic Llama of merge.py
    python benchmarks/lowrank.py --skip-peft   # only ours (PEFT's svd combination takes about 10 minutes)

Each contender runs as its own process (wall seconds, peak RSS). PEFT's side loads the base model and the
adapters as a user would, then for `stack` runs `add_weighted_adapter(..., combination_type="svd", svd_rank=R)`
and saves the new adapter; for `rerank` it runs `peft.save_as_lora(..., rank=8)` (convert_to_lora, PEFT's
re-rank tool), because add_weighted_adapter with a single adapter silently switches to `linear` and keeps the
rank; ours runs the CLI on the adapter files alone. Both outputs are then compared with the exact ΔW
(Σ wᵢ·sᵢ·BᵢAᵢ), in float64 and in low-rank form: relative error ‖ΔW_exact − ΔW_out‖_F / ‖ΔW_exact‖_F over all
modules. By Eckart–Young, no rank-R adapter can do better than the truncated SVD, so both should be at that floor.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import WORK, make_adapter, make_base, timed  # noqa: E402

from adapterops.core.lowrank import svd_of_sum  # noqa: E402
from adapterops.io.adapter import open_adapter  # noqa: E402

PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, out, rank, *adapters = sys.argv[1:]
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
pm = peft.PeftModel.from_pretrained(m, adapters[0], adapter_name="a0")
if len(adapters) == 1:  # add_weighted_adapter silently falls back to `linear` (no truncation) for one adapter
    peft.save_as_lora(out + "/combined", pm, int(rank), adapter_name="a0")
else:
    for i, a in enumerate(adapters[1:], 1):
        pm.load_adapter(a, adapter_name=f"a{i}")
    names = [f"a{i}" for i in range(len(adapters))]
    pm.add_weighted_adapter(names, [1.0] * len(names), "combined", combination_type="svd", svd_rank=int(rank))
    pm.save_pretrained(out, selected_adapters=["combined"])
"""


def relative_error(inputs: list[Path], output: Path) -> float:
    """‖Σ ΔWᵢ − ΔW_out‖_F / ‖Σ ΔWᵢ‖_F over every module, in float64, without forming any ΔW."""
    ins = [open_adapter(p) for p in inputs]
    got = open_adapter(output)
    err_sq = ref_sq = 0.0
    try:
        for name, mod in got.modules.items():
            terms = [(ad.read(ad.modules[name].b_key), ad.read(ad.modules[name].a_key), ad.modules[name].scale)
                     for ad in ins if name in ad.modules]
            ref = svd_of_sum(terms, torch.float64).S
            diff = svd_of_sum(terms + [(got.read(mod.b_key), got.read(mod.a_key), -mod.scale)], torch.float64).S
            ref_sq += float((ref**2).sum())
            err_sq += float((diff**2).sum())
    finally:
        for ad in (*ins, got):
            ad.close()
    return math.sqrt(err_sq / ref_sq)


def run_case(label: str, ours: list[str], peft_args: list[str] | None, inputs: list[Path], outs: dict[str, Path]) -> None:
    """Time ours and PEFT on one task and print wall, RSS and reconstruction error."""
    rows = {}
    cmds = {"ours": [sys.executable, "-m", "adapterops", *ours, str(outs["ours"])]}
    if peft_args is not None:
        cmds["peft"] = [sys.executable, "-c", PEFT_SCRIPT, *peft_args]
    for k, cmd in cmds.items():
        subprocess.run(["rm", "-rf", str(outs[k])], check=True)
        wall, rss = timed(cmd)
        result = outs[k] / "combined" if k == "peft" else outs[k]
        rows[k] = (wall, rss, relative_error(inputs, result))
    for k, (wall, rss, err) in rows.items():
        print(f"{label:<26} {k:<5} {wall:9.2f} s {rss:8.2f} GiB   relative error {err:.6f}")
    if "peft" in rows:
        print(f"{label:<26} peft / ours wall: {rows['peft'][0] / rows['ours'][0]:.1f}x (target >= 100x); "
              f"error ours - peft: {rows['ours'][2] - rows['peft'][2]:+.2e} (target <= 0)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--only", choices=["rerank", "stack"], help="run one of the two tasks")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    base = WORK / f"llama-{args.layers}l"
    a1, a2 = WORK / f"lora-{args.layers}l", WORK / f"lora-{args.layers}l-seed2"
    make_base(base, args.layers)
    make_adapter(a1, args.layers, False)
    make_adapter(a2, args.layers, False, seed=2)
    peft = not args.skip_peft
    if peft:
        try:
            import peft as _  # noqa: F401
        except ImportError:
            print("peft not installed: skipping the PEFT runs")
            peft = False
    outs = {"ours": WORK / "out-lowrank-ours", "peft": WORK / "out-lowrank-peft"}
    print(f"adapters: r=16 LoRA on 7 projections x {args.layers} layers ({7 * args.layers} modules); torch threads {torch.get_num_threads()}")
    if args.only in (None, "rerank"):
        run_case("rerank --rank 8", ["rerank", str(a1), "--rank", "8", "--split", "b"],
                 [str(base), str(outs["peft"]), "8", str(a1)] if peft else None, [a1], outs)
    if args.only in (None, "stack"):
        run_case("stack --method svd (r16)", ["stack", str(a1), str(a2), "--method", "svd", "--rank", "16", "--split", "b"],
                 [str(base), str(outs["peft"]), "16", str(a1), str(a2)] if peft else None, [a1, a2], outs)
    for o in outs.values():
        subprocess.run(["rm", "-rf", str(o)], check=True)


if __name__ == "__main__":
    main()
