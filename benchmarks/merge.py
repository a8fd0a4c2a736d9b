"""Merge benchmark: adapterops vs PEFT merge_and_unload + save_pretrained vs a plain read+write copy.

    python benchmarks/merge.py                 # 1.1B Llama-shaped bf16 checkpoint, r=16 LoRA on all 7 projections
    python benchmarks/merge.py --dora          # the same with a DoRA adapter
    python benchmarks/merge.py --layers 44     # the model doubled (peak RSS should stay flat)
    python benchmarks/merge.py --skip-peft     # only ours, unmerge and the copies
    python benchmarks/merge.py --repeat 7      # more rounds (default 5)

Contenders: `cp -r`; the copy floor (every shard through safe_open + save_file, buffered writes); ours; ours with
--no-report; ours writing through the page cache (ADAPTEROPS_DIRECT_IO=0, as the copy floor writes); unmerge; PEFT.

Each contender runs as its own process, side by side (cp -r, copy floor, ours, unmerge, PEFT, then again, ...),
so that a machine whose load drifts hits every contender alike; we report median wall seconds, peak RSS
(ru_maxrss of that child), median CPU seconds (its user + system time: on a shared machine, the work done) and, for each ratio, the median over rounds of the ratio within a round. The synthetic checkpoint and adapter are made once under benchmarks/_work/ (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Self

import torch

from adapterops.io.safetensors_io import SafetensorsWriter, TensorSpec, save_file

WORK = Path(__file__).resolve().parent / "_work"
HIDDEN, INTER, HEADS, KV, VOCAB = 2048, 5632, 32, 4, 32000
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN * KV // HEADS, HIDDEN), "v_proj": (HIDDEN * KV // HEADS, HIDDEN),
        "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}


def module_path(layer: int, proj: str) -> str:
    """The module name of a projection in a Llama layer."""
    return f"model.layers.{layer}.{'self_attn' if proj in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{proj}"


def base_specs(layers: int) -> list[TensorSpec]:
    """Every tensor of the synthetic Llama, in a sensible order."""
    specs = [TensorSpec("model.embed_tokens.weight", torch.bfloat16, (VOCAB, HIDDEN))]
    for i in range(layers):
        specs.append(TensorSpec(f"model.layers.{i}.input_layernorm.weight", torch.bfloat16, (HIDDEN,)))
        specs.append(TensorSpec(f"model.layers.{i}.post_attention_layernorm.weight", torch.bfloat16, (HIDDEN,)))
        specs += [TensorSpec(f"{module_path(i, p)}.weight", torch.bfloat16, s) for p, s in PROJ.items()]
    specs.append(TensorSpec("model.norm.weight", torch.bfloat16, (HIDDEN,)))
    specs.append(TensorSpec("lm_head.weight", torch.bfloat16, (VOCAB, HIDDEN)))
    return specs


def make_base(path: Path, layers: int, shard_bytes: int = 1_000_000_000) -> None:
    """Write the synthetic checkpoint (random bf16 weights, ~0.02 std), sharded like save_pretrained."""
    if (path / "model.safetensors.index.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    groups: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in base_specs(layers):
        if groups[-1] and size + spec.nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += spec.nbytes
    weight_map = {}
    for n, group in enumerate(groups):
        name = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        w = SafetensorsWriter(path / name, group, {"format": "pt"})
        for spec in group:
            w.write(spec.name, (torch.randn(spec.shape, generator=g) * 0.02).to(torch.bfloat16))
            weight_map[spec.name] = name
        w.close()
    total = sum(s.nbytes for s in base_specs(layers))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTER,
              "num_hidden_layers": layers, "num_attention_heads": HEADS, "num_key_value_heads": KV, "vocab_size": VOCAB,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "dtype": "bfloat16"}
    (path / "config.json").write_text(json.dumps(config, indent=2))


def make_merged(path: Path, base: Path, adapter: Path) -> None:
    """Our merge of `adapter` into `base` at `path`, made once (diff's and extract's input)."""
    if not (path / "model.safetensors.index.json").exists():
        subprocess.run([sys.executable, "-m", "adapterops", "merge", str(base), str(adapter), str(path), "-q", "--force"],
                       check=True, stdout=subprocess.DEVNULL)


def make_adapter(path: Path, layers: int, dora: bool, r: int = 16, seed: int = 1,
                 proj: dict[str, tuple[int, int]] = PROJ) -> None:
    """An r=16 PEFT adapter on all seven projections of `proj` (fp32, random non-zero A and B; DoRA magnitudes near 1)."""
    if (path / "adapter_model.safetensors").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for p, (out_f, in_f) in proj.items():
            key = f"base_model.model.{module_path(i, p)}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, in_f, generator=g) / math.sqrt(in_f)
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, r, generator=g) * 0.01
            if dora:
                tensors[f"{key}.lora_magnitude_vector"] = 0.02 * math.sqrt(in_f) * (1 + 0.05 * torch.randn(out_f, generator=g))
    save_file(tensors, path / "adapter_model.safetensors", {"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 32, "use_dora": dora, "target_modules": list(proj),
              "task_type": "CAUSAL_LM", "bias": "none", "fan_in_fan_out": False}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))


PEFT_SCRIPT = """
import sys, torch, transformers, peft
base, adapter, out = sys.argv[1:4]
m = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
m = peft.PeftModel.from_pretrained(m, adapter).merge_and_unload()
m.save_pretrained(out)
"""

COPY_SCRIPT = """
import sys, json, pathlib
from safetensors import safe_open
from safetensors.torch import save_file
base, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
out.mkdir(parents=True, exist_ok=True)
for shard in sorted(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())):
    with safe_open(base / shard, "pt") as f:
        save_file({k: f.get_tensor(k) for k in f.keys()}, out / shard, metadata={"format": "pt"})
"""


RUNNER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{usage.ru_maxrss} {usage.ru_utime} {usage.ru_stime}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


class Sample(tuple):
    """(wall seconds, peak RSS in GiB) of one run, with its CPU seconds (user + system) as `.cpu`."""

    def __new__(cls, wall: float, rss: float, cpu: float) -> Self:
        obj = super().__new__(cls, (wall, rss))
        obj.cpu = cpu
        return obj


def timed(cmd: list[str], ok: tuple[int, ...] = (0,)) -> Sample:
    """Run a command; return (wall seconds, peak RSS in GiB) of that process, its CPU seconds as `.cpu`.

    We sync first, so that no run pays for the writeback of the previous run's output. The command is started by
    a small Python process without torch, so that its peak RSS is its own, not the benchmark's (a forked child's
    ru_maxrss starts from its parent's size).
    """
    os.sync()
    rss_file = WORK / ".rss"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-S", "-c", RUNNER, str(rss_file), *cmd], stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    if proc.returncode not in ok:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    rss, user, system = rss_file.read_text().split()
    return Sample(wall, int(rss) / 2**20, float(user) + float(system))


def median(xs: list[float]) -> float:
    """The middle value (the mean of the two middle ones for an even count)."""
    s = sorted(xs)
    return (s[len(s) // 2] + s[(len(s) - 1) // 2]) / 2


def side_by_side(cmds: dict[str, list[str]], outs: dict[str, Path], repeat: int, once: set[str]) -> dict[str, list[tuple[float, float]]]:
    """Run the contenders in turn, A B C A B C ..., so that drifting machine load hits each alike."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for rep in range(repeat):
        for k, cmd in cmds.items():
            if k in once and rep > 0:
                continue
            subprocess.run(["rm", "-rf", str(outs[k])], check=True)
            samples[k].append(timed(cmd))
            print(f"  round {rep + 1} {k:<8} {samples[k][-1][0]:6.2f} s {samples[k][-1][1]:5.2f} GiB "
                  f"{samples[k][-1].cpu:6.2f} CPU s", file=sys.stderr, flush=True)
    return samples


def ratio(samples: dict[str, list[tuple[float, float]]], a: str, b: str) -> float:
    """Median over rounds of wall(a) / wall(b), each pair from the same round (robust to load drifting between rounds)."""
    n = min(len(samples[a]), len(samples[b]))
    return median([samples[a][i][0] / samples[b][i][0] for i in range(n)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=5, help="rounds of cp, copy, ours and unmerge, side by side (medians reported)")
    ap.add_argument("--peft-repeat", type=int, default=1, help="rounds that include PEFT (slow: 1 by default)")
    args = ap.parse_args()
    WORK.mkdir(exist_ok=True)
    base = WORK / f"llama-{args.layers}l"
    adapter = WORK / f"lora-{args.layers}l{'-dora' if args.dora else ''}"
    make_base(base, args.layers)
    make_adapter(adapter, args.layers, args.dora)
    params = sum(math.prod(s.shape) for s in base_specs(args.layers))
    largest = max(s.nbytes for s in base_specs(args.layers))
    print(f"model: {params / 1e9:.2f}B params bf16 ({params * 2 / 2**30:.2f} GiB), largest tensor {largest / 2**20:.0f} MiB; "
          f"adapter: r=16 {'DoRA' if args.dora else 'LoRA'} on 7 projections x {args.layers} layers; torch threads {torch.get_num_threads()}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores")
    outs = {k: WORK / f"out-{k}" for k in ("cp", "copy", "ours", "ours-nr", "ours-pc", "unmerge", "peft")}
    merged = WORK / "out-merged"  # unmerge's input: our merge of this adapter
    subprocess.run(["rm", "-rf", str(merged)], check=True)
    subprocess.run([sys.executable, "-m", "adapterops", "merge", str(base), str(adapter), str(merged), "-q"], check=True,
                   stdout=subprocess.DEVNULL)
    cmds = {
        "cp": ["cp", "-r", str(base), str(outs["cp"])],
        "copy": [sys.executable, "-c", COPY_SCRIPT, str(base), str(outs["copy"])],
        "ours": [sys.executable, "-m", "adapterops", "merge", str(base), str(adapter), str(outs["ours"]), "-q"],
        "ours-nr": [sys.executable, "-m", "adapterops", "merge", str(base), str(adapter), str(outs["ours-nr"]), "-q", "--no-report"],
        # ours writing through the page cache, as the copy floor does (no O_DIRECT): what direct I/O contributes
        "ours-pc": ["env", "ADAPTEROPS_DIRECT_IO=0", sys.executable, "-m", "adapterops", "merge", str(base), str(adapter),
                    str(outs["ours-pc"]), "-q"],
        "unmerge": [sys.executable, "-m", "adapterops", "unmerge", str(merged), str(adapter), str(outs["unmerge"]), "-q"],
    }
    if not args.skip_peft:
        try:
            import peft  # noqa: F401

            cmds["peft"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(outs["peft"])]
        except ImportError:
            print("peft not installed: skipping the PEFT run")
    once = {"peft"} if args.peft_repeat <= 1 else set()
    samples = side_by_side(cmds, outs, args.repeat, once)
    print(f"{'run':<8} {'median s':>9} {'all wall s':>32} {'max peak RSS GiB':>17} {'median CPU s':>13}")
    for k, v in samples.items():
        print(f"{k:<8} {median([w for w, _ in v]):9.2f} {' '.join(f'{w:.1f}' for w, _ in v):>32} {max(r for _, r in v):17.2f} "
              f"{median([x.cpu for x in v]):13.2f}")
    rss = max(r for _, r in samples["ours"])
    print(f"ours / copy floor wall: {ratio(samples, 'ours', 'copy'):.2f}x (median of per-round ratios; target <= {1.5 if args.dora else 1.2}x)")
    print(f"ours / copy floor CPU seconds (user + system): {median([o.cpu / c.cpu for o, c in zip(samples['ours'], samples['copy'])]):.2f}x")
    print(f"ours --no-report / copy floor wall: {ratio(samples, 'ours-nr', 'copy'):.2f}x (the same bytes without the rounding report)")
    print(f"ours through the page cache (ADAPTEROPS_DIRECT_IO=0) / copy floor wall: {ratio(samples, 'ours-pc', 'copy'):.2f}x")
    print(f"ours / cp -r wall: {ratio(samples, 'ours', 'cp'):.2f}x")
    print(f"unmerge / merge wall: {ratio(samples, 'unmerge', 'ours'):.2f}x (target <= 1.2x)")
    if "peft" in samples:
        print(f"peft / ours wall: {ratio(samples, 'peft', 'ours'):.2f}x faster (target >= {5 if args.dora else 4}x); "
              f"peft / ours RSS: {max(r for _, r in samples['peft']) / rss:.2f}x")
    print(f"ours peak RSS {rss:.2f} GiB (target <= 0.5 GiB, flat when the model doubles: compare --layers 44)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for o in [*outs.values(), merged]:
        subprocess.run(["rm", "-rf", str(o)], check=True)


if __name__ == "__main__":
    main()
