"""Stack-methods benchmark: `stack --method ties_svd|dare_ties_svd --compat exact` against PEFT's add_weighted_adapter.

    python benchmarks/stack.py --layers 4              # two and four r=16 adapters, ours and PEFT, side by side
    python benchmarks/stack.py --skip-peft             # only ours, on the 1.1B synthetic Llama (22 layers)
    python benchmarks/stack.py --floor-only            # only the floor below (the 100x question), no contenders

For two and four r=16 adapters on the synthetic Llama of merge.py (weights 1, density 0.5, rank 16, seed 0), each
contender runs as its own process (wall seconds, peak RSS). PEFT loads the base model (float32) and the adapters,
calls `torch.manual_seed(0)` and `add_weighted_adapter(..., combination_type=M, density=0.5, svd_rank=16)` and
saves; ours runs the CLI with `--compat exact` on the adapter files alone.

Relative error: ‖ΔW_method − ΔW_out‖_F / ‖ΔW_method‖_F over all modules, where ΔW_method is the method applied to
the true ΔWᵢ = sᵢ·BᵢAᵢ without truncation (computed here one dense module at a time). For DARE both sides draw the
same masks (ours replays PEFT's RNG stream for the same seed), so they approximate the same matrix. By
Eckart–Young nobody can beat the rank-16 truncated SVD, which PEFT computes (dense, full_matrices=True): "equal
error" is the best any rank-16 result can do.

The floor (printed last, for each count): what any exact `*_svd` combination must spend on this machine, measured
piece by piece on the same modules, each at its best of 3 on all torch threads:
- start: a process importing torch and adapterops (best of 3);
- form: one product Bᵢ·Aᵢ per adapter per module into a reused buffer (TIES and DARE read every entry of each ΔWᵢ,
  so each must be formed at least once; nothing else of the method is counted);
- truncate: the products of each dense combined d×n module with Σrᵢ columns, 2 of them (a one-pass sketch: the
  least any randomized truncation reads the matrix) and 6 (two power steps, what reaching PEFT's error takes).
Then, on two modules, how far above the Eckart–Young error the truncation lands with 0, 1 and 2 power steps (the
optimum from a float64 SVD), which is why 6 products and not 2. With PEFT run in the same invocation, it prints
PEFT's wall / 100, the time that 100x would leave.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from merge import WORK, make_adapter, make_base, timed

from adapterops.core import combine as cb
from adapterops.io.adapter import open_adapter
from adapterops.ops.stack import _peft_new_rank, peft_init_draws, peft_module_order

PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, out, method, *adapters = sys.argv[1:]
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
pm = peft.PeftModel.from_pretrained(m, adapters[0], adapter_name="a0")
for i, a in enumerate(adapters[1:], 1):
    pm.load_adapter(a, adapter_name=f"a{i}")
names = [f"a{i}" for i in range(len(adapters))]
torch.manual_seed(0)
pm.add_weighted_adapter(names, [1.0] * len(names), "combined", combination_type=method, svd_rank=16, density=0.5)
pm.save_pretrained(out, selected_adapters=["combined"])
"""


def relative_error(inputs: list[Path], output: Path, method: str) -> float:
    """‖ΔW_method − ΔW_out‖_F / ‖ΔW_method‖_F over all modules; ΔW_method dense, one module at a time."""
    ins = [open_adapter(p) for p in inputs]
    got = open_adapter(output)
    names = list(dict.fromkeys(n for ad in ins for n in ad.modules))
    g = None
    if method.startswith("dare"):
        names, _ = peft_module_order(names, ins)
        g = torch.Generator().manual_seed(0)
        rank = _peft_new_rank(method, ins, 16)
        shapes = []
        for n in names:
            mod = ins[0].modules[n]
            shapes.append((mod.kind, (rank, *ins[0].read(mod.a_key).shape[1:]), (ins[0].read(mod.b_key).shape[0], rank)))
        peft_init_draws(g, shapes, True)
    err_sq = ref_sq = 0.0
    for n in names:
        deltas = [(ad.read(ad.modules[n].b_key).float() @ ad.read(ad.modules[n].a_key).float()).mul_(ad.modules[n].scale) for ad in ins]
        ref = cb.exact_combine(cb.base_method(method), deltas, [1.0] * len(ins), 0.5, "total", g).double()
        mod = got.modules[n]
        out = (got.read(mod.b_key).double() @ got.read(mod.a_key).double()) * mod.scale
        ref_sq += float(ref.square().sum())
        err_sq += float((ref - out).square().sum())
    return math.sqrt(err_sq / ref_sq)


def _best(fn, reps: int = 3) -> float:
    """The least wall seconds of `reps` calls of fn (after one call not counted)."""
    fn()
    best = math.inf
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def floor(inputs: list[Path]) -> dict[str, float]:
    """The floor's pieces in seconds over every module (see the module's docstring): start, form, and truncate with
    2 and 6 products."""
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch, adapterops.ops.stack"], check=True)
        starts.append(time.perf_counter() - t)
    ins = [open_adapter(p) for p in inputs]
    names = list(dict.fromkeys(n for ad in ins for n in ad.modules))
    biggest = max(ins[0].read(ins[0].modules[n].b_key).shape[0] * ins[0].read(ins[0].modules[n].a_key).shape[1] for n in names)
    buf = torch.empty(biggest)
    form = two = six = 0.0
    for n in names:
        facs = [(ad.read(ad.modules[n].b_key).float(), ad.read(ad.modules[n].a_key).float()) for ad in ins]
        d, k = facs[0][0].shape[0], facs[0][1].shape[1]
        m = buf[: d * k].view(d, k)
        for b, a in facs:
            form += _best(lambda: torch.matmul(b, a, out=m))
        x = torch.cat([a for _, a in facs]).T.contiguous()  # k×Σr
        y = m @ x  # d×Σr
        right, left = _best(lambda: m @ x), _best(lambda: m.T @ y)
        two += right + left
        six += 3 * (right + left)
    return {"start": min(starts), "form": form, "truncate2": two, "truncate6": six}


def power_steps(inputs: list[Path]) -> list[str]:
    """For two modules of layer 0 (an MLP and an attention one): the TIES combination's rank-16 truncation error
    with 0, 1 and 2 power steps, above the Eckart–Young optimum (float64 SVD), relative to ‖ΔW‖_F."""
    ins = [open_adapter(p) for p in inputs]
    rows = []
    for name in ("model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj"):
        terms = [(ad.read(ad.modules[name].b_key).float() * ad.modules[name].scale, ad.read(ad.modules[name].a_key).float()) for ad in ins]
        m, _ = cb.exact_combine_factors("ties", terms, [1.0] * len(ins), 0.5, "total", None)
        md = m.double()
        s = torch.linalg.svdvals(md)
        opt = math.sqrt(float((s[16:] ** 2).sum() / (s ** 2).sum()))
        start = cb.sketch_start([a for _, a in terms], 16)
        above = []
        for steps in (0, 1, 2):
            svd = cb.sketch_svd(m, 16, start, niter=steps)
            err = float((md - (svd.U.double() * svd.S.double()) @ svd.V.double().T).norm() / md.norm())
            above.append(f"{steps}: {err - opt:+.1e}")
        rows.append(f"{name} x{len(ins)}: optimum {opt:.6f}; above it with power steps " + ", ".join(above))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--counts", default="2,4", help="numbers of adapters to combine")
    ap.add_argument("--methods", default="ties_svd,dare_ties_svd")
    ap.add_argument("--floor-only", action="store_true", help="only the floor, no contenders")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    base = WORK / f"llama-{args.layers}l"
    make_base(base, args.layers)
    adapters = [WORK / (f"lora-{args.layers}l" + ("" if s == 1 else f"-seed{s}")) for s in range(1, 5)]
    for s, a in enumerate(adapters, 1):
        make_adapter(a, args.layers, False, seed=s)
    print(f"adapters: r=16 LoRA on 7 projections x {args.layers} layers ({7 * args.layers} modules); "
          f"density 0.5, rank 16, seed 0; torch threads {torch.get_num_threads()}")
    print(f"{'case':<28} {'who':<5} {'wall':>9}   {'peak RSS':>9}   relative error")
    peft_walls: dict[int, list[float]] = {}
    for count in map(int, args.counts.split(",")) if not args.floor_only else []:
        ins = adapters[:count]
        for method in args.methods.split(","):
            label = f"{method} x{count}"
            rows = {}
            out = WORK / "out-stack-ours"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            cmd = [sys.executable, "-m", "adapterops", "stack", *map(str, ins), str(out), "--method", method,
                   "--compat", "exact", "--density", "0.5", "--rank", "16"] + (["--seed", "0"] if method.startswith("dare") else [])
            wall, rss = timed(cmd)
            rows["ours"] = (wall, rss, relative_error(ins, out, method))
            if not args.skip_peft:
                pout = WORK / "out-stack-peft"
                subprocess.run(["rm", "-rf", str(pout)], check=True)
                wall, rss = timed([sys.executable, "-c", PEFT_SCRIPT, str(base), str(pout), method, *map(str, ins)])
                rows["peft"] = (wall, rss, relative_error(ins, pout / "combined", method))
                peft_walls.setdefault(count, []).append(wall)
            for k, (wall, rss, err) in rows.items():
                print(f"{label:<28} {k:<5} {wall:8.2f} s {rss:8.2f} GiB   {err:.6f}", flush=True)
            if "peft" in rows:
                print(f"{label:<28} peft / ours wall: {rows['peft'][0] / rows['ours'][0]:.1f}x (target >= 100x); "
                      f"error ours - peft: {rows['ours'][2] - rows['peft'][2]:+.2e} (target <= 0)", flush=True)
    for count in map(int, args.counts.split(",")):
        f = floor(adapters[:count])
        line = (f"floor x{count}: start {f['start']:.2f} s + form {f['form']:.2f} s + truncate {f['truncate2']:.2f} s "
                f"(2 products) = {f['start'] + f['form'] + f['truncate2']:.2f} s; with 6 products "
                f"= {f['start'] + f['form'] + f['truncate6']:.2f} s")
        if count in peft_walls:
            line += f"; PEFT / 100 = {min(peft_walls[count]) / 100:.2f} s (fastest PEFT method)"
        print(line, flush=True)
        for row in power_steps(adapters[:count]):
            print("  " + row, flush=True)


if __name__ == "__main__":
    main()
