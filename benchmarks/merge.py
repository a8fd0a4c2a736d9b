"""Merge benchmark: adapterops vs PEFT merge_and_unload + save_pretrained vs a plain read+write copy.

    python benchmarks/merge.py                 # 1.1B Llama-shaped bf16 checkpoint, r=16 LoRA on all 7 projections
    python benchmarks/merge.py --dora          # the same with a DoRA adapter
    python benchmarks/merge.py --layers 44     # the model doubled (peak RSS should stay flat)
    python benchmarks/merge.py --skip-peft     # only ours and the copy

Each contender runs as its own process; we report wall seconds and peak RSS (ru_maxrss of that child) and the
ratios. The synthetic checkpoint and adapter are made once under benchmarks/_work/ (ignored by git).
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


def timed(cmd: list[str]) -> tuple[float, float]:
    """Run a command; return (wall seconds, peak RSS in GiB) of that process.

    We sync first, so that no run pays for the writeback of the previous run's output.
    """
    os.sync()
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if status != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return wall, usage.ru_maxrss / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--dora", action="store_true")
    ap.add_argument("--skip-peft", action="store_true")
    ap.add_argument("--repeat", type=int, default=3, help="runs of ours and the copy (best wall, worst RSS reported)")
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
    outs = {k: WORK / f"out-{k}" for k in ("ours", "peft", "copy")}
    cmds = {
        "copy": [sys.executable, "-c", COPY_SCRIPT, str(base), str(outs["copy"])],
        "ours": [sys.executable, "-m", "adapterops", "merge", str(base), str(adapter), str(outs["ours"]), "-q"],
    }
    if not args.skip_peft:
        try:
            import peft  # noqa: F401

            cmds["peft"] = [sys.executable, "-c", PEFT_SCRIPT, str(base), str(adapter), str(outs["peft"])]
        except ImportError:
            print("peft not installed: skipping the PEFT run")
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in cmds}
    for rep in range(args.repeat):  # interleaved, so drifting machine load hits every contender alike
        for k, cmd in cmds.items():
            if k == "peft" and rep > 0:
                continue  # PEFT is slow and far from the targets; one run is enough
            subprocess.run(["rm", "-rf", str(outs[k])], check=True)
            samples[k].append(timed(cmd))
    runs = {k: (min(w for w, _ in v), max(r for _, r in v)) for k, v in samples.items()}
    print(f"{'run':<6} {'best wall s':>12} {'all wall s':>22} {'max peak RSS GiB':>17}")
    for k, (wall, rss) in runs.items():
        print(f"{k:<6} {wall:12.2f} {' '.join(f'{w:.1f}' for w, _ in samples[k]):>22} {rss:17.2f}")
    wall, rss = runs["ours"]
    print(f"ours / copy wall: {wall / runs['copy'][0]:.2f}x (target <= 1.5x)")
    if "peft" in runs:
        print(f"peft / ours wall: {runs['peft'][0] / wall:.2f}x faster (target >= 3x); peft / ours RSS: {runs['peft'][1] / rss:.2f}x")
    print(f"ours peak RSS {rss:.2f} GiB vs 1 GB + largest tensor = {(1e9 + largest) / 2**30:.2f} GiB")
    for o in outs.values():
        subprocess.run(["rm", "-rf", str(o)], check=True)


if __name__ == "__main__":
    main()
