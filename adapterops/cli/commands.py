"""The `adapterops` commands: each parses its options, makes one library call and shows the result.

Conventions, the same for every command: `--json` prints the result as JSON on stdout instead of the text,
`--json-file F` also writes it to F; warnings go to stderr as `warning:` lines; bad input is one `error:` line and
exit 2; options that cannot apply are usage errors (exit 2), never silently ignored. The library is imported
only inside each command, so `adapterops --help` does not load torch.
"""

from __future__ import annotations

import sys

import click

import adapterops
from adapterops.cli.common import (
    Group,
    adapter_options,
    call,
    emit,
    floats,
    json_options,
    only_with,
    output_options,
    warn,
)
from adapterops.core.nf4_layout import BLOCKSIZES
from adapterops.version import __version__

DTYPE_CHOICE = click.Choice(["float32", "bfloat16", "float16"])
PRECISION = click.Choice(["float32", "float64"])
PRECISION_HELP = "Arithmetic of the SVDs: float64 for the last digits, float32 is faster."
SPLIT_HELP = "Put √S on both factors (balanced), or all of S in lora_B (b, as PEFT's convert_to_lora)."
PICKLE_HELP = "Allow .bin pickle inputs (loaded with torch.load(weights_only=True))."


def _write(op: str, as_json: bool, json_file: str | None, fn) -> None:
    """A writing command: call, warnings on stderr, then its summary line or JSON."""
    from adapterops.cli.render import summary_line

    result = call(fn)
    warn(getattr(result, "warnings", []))
    emit(result, as_json, json_file, lambda: summary_line(op, result) + "\n")


def _adapters_and_out(paths: tuple[str, ...]) -> tuple[list[str], str]:
    """ADAPTER... OUT as (adapters, out)."""
    if len(paths) < 2:
        raise click.UsageError("give at least one ADAPTER and then OUT")
    *adapters, out = paths
    return adapters, out


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="adapterops")
def cli() -> None:
    """Surgery on model checkpoints and LoRA adapters: merge, unmerge, rescale, re-rank, stack, extract,
    analyse, quantize to NF4 and back, and all of it in batches.

    Every command streams tensor by tensor, writes its output atomically (a failure leaves nothing behind),
    never modifies its inputs, and exits 0 on success and 2 on bad input (one `error:` line naming the file).
    inspect, diff, batch and analyze --strict exit 1 when they ran but found something: warnings, a
    difference, a failed task or a stale output. Every command takes --json (JSON on stdout instead of text)
    and --json-file FILE. `adapterops COMMAND --help` shows examples.

    \b
    Environment (README: Environment):
      ADAPTEROPS_DIRECT_IO=0
          write outputs through the page cache (default: O_DIRECT, files >= 64MiB)
      ADAPTEROPS_MERGE_WORKERS=N
          threads merging LoRA/DoRA Linear weights on the CPU
          (default: every usable core; in batch, shared by the jobs)
      ADAPTEROPS_CACHE=DIR
          batch's input-hash cache
          (default: $XDG_CACHE_HOME/adapterops, else ~/.cache/adapterops)
    """


@cli.command()
@click.argument("base")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT")
@click.option("--weights", help="Comma-separated weight per adapter, multiplying its scale (default 1 each).")
@click.option("--dtype", type=DTYPE_CHOICE, help="Load the base in this dtype and write it (default: keep the base's).")
@click.option("--max-shard-size", help="Re-split the output into shards of at most this size (e.g. 5GB); default: the base's split.")
@click.option("--dry-run", is_flag=True, help="Check everything and print what would change; write nothing.")
@click.option("--requantize", is_flag=True, help="NF4 base: write NF4 again, as PEFT's merge into a 4-bit model does (default: 16-bit output).")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@click.option("--no-report", "no_report", is_flag=True,
              help="Skip measuring what survived the rounding (share of elements changed, ‖W' − W‖/‖ΔW‖, the "
                   "'changed nothing' warning): a faster merge, same bytes.")
@output_options("BASE")
def merge(base, paths, weights, dtype, max_shard_size, dry_run, requantize, allow_pickle, no_report, device, revision, force,
          quiet, as_json, json_file):
    """Merge LoRA / rsLoRA / DoRA adapters into BASE and write the merged checkpoint to OUT.

    \b
    BASE and each ADAPTER are local folders or Hugging Face Hub repo ids.
    The result equals PEFT's merge_and_unload() + save_pretrained(), bit for bit on the CPU,
    without ever loading the whole model.

    \b
    Examples:
      adapterops merge meta-llama/Llama-3.1-8B ./my-lora ./merged
      adapterops merge ./base ./lora-a ./lora-b --weights 1,0.5 ./merged
      adapterops merge ./base ./lora ./merged --dtype bfloat16 --max-shard-size 2GB --json
      adapterops merge ./base ./lora ./merged --dry-run
      adapterops merge ./base ./lora ./merged --no-report           # skip the rounding report: faster
      adapterops merge ./llama-nf4 ./qlora ./merged-nf4 --requantize   # stays 4-bit, as PEFT
    """
    adapters, out = _adapters_and_out(paths)
    _write("merge", as_json, json_file, lambda: adapterops.merge(
        base, adapters, out, weights=floats(weights), dtype=dtype, device=device, revision=revision,
        max_shard_size=max_shard_size, force=force, dry_run=dry_run, requantize=requantize, allow_pickle=allow_pickle,
        quiet=quiet or as_json, report=not no_report))


@cli.command()
@click.argument("merged")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT")
@click.option("--weights", help="The weights the adapters were merged with (default 1 each).")
@click.option("--keep-replaced", is_flag=True, help="Write tensors an adapter replaced (modules_to_save, trained biases) from the adapter's copy instead of refusing.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@output_options("MERGED")
def unmerge(merged, paths, weights, keep_replaced, allow_pickle, device, revision, force, quiet, as_json, json_file):
    """Take adapters back out of a MERGED checkpoint and write the recovered base to OUT.

    \b
    Each changed weight is W' − ΔW computed in float32 and rounded once. Measured bounds of a
    merge → unmerge round trip, per element, in ulps of the stored dtype (tests/test_unmerge.py):
      one LoRA adapter:   1 ulp of max(|W|, |W'|);
      DoRA:               ½ ulp of |W| + 2 ulp of |W + ΔW| (2 ulp in fp32; the norm rescales the
                          merge's rounding);
      n adapters:         (n + 1)/2 ulp of the largest intermediate (each merge step rounds once;
                          1.5 ulp for two).
    Give the adapters and --weights as they were merged. LoRA, rsLoRA and DoRA only: IA3, LoHa,
    LoKr and VeRA merges are refused. DoRA needs the dora_norms.adapterops file that `adapterops merge` writes beside
    the merged weights. An adapted embedding is restored from the base layer PEFT saved with the
    adapter; other tensors an adapter replaced (modules_to_save, bias="all") are refused unless
    --keep-replaced writes them from the adapter's copy.

    \b
    Examples:
      adapterops unmerge ./merged ./my-lora ./base-again
      adapterops unmerge ./merged ./lora-a ./lora-b --weights 1,0.5 ./base-again --json
    """
    adapters, out = _adapters_and_out(paths)
    _write("unmerge", as_json, json_file, lambda: adapterops.unmerge(
        merged, adapters, out, weights=floats(weights), device=device, revision=revision, force=force,
        keep_replaced=keep_replaced, allow_pickle=allow_pickle, quiet=quiet or as_json))


@cli.command()
@click.argument("base")
@click.argument("out")
@click.option("--blocksize", type=click.Choice([str(b) for b in BLOCKSIZES]), default="64", show_default=True,
              help="Weights per absmax block (bitsandbytes' choices).")
@click.option("--no-double-quant", is_flag=True, help="Store the per-block absmax in float32 instead of quantizing it to 8 bits.")
@click.option("--skip", multiple=True, metavar="PATTERN", help="Leave these modules unquantized (name, suffix or regex; repeatable).")
@click.option("--compute-dtype", type=DTYPE_CHOICE, help="bnb_4bit_compute_dtype (default: the weights' dtype).")
@output_options("BASE")
def quantize(base, out, blocksize, no_double_quant, skip, compute_dtype, device, revision, force, quiet, as_json, json_file):
    """Quantize BASE's Linear weights to NF4 (QLoRA's 4-bit NormalFloat) and write OUT.

    \b
    The output is laid out as transformers + bitsandbytes save a 4-bit model, and loads with
    AutoModelForCausalLM.from_pretrained(OUT). The bytes equal bitsandbytes' CUDA kernels.

    \b
    Examples:
      adapterops quantize ./llama ./llama-nf4
      adapterops quantize ./llama ./llama-nf4 --blocksize 128 --no-double-quant --skip down_proj
    """
    _write("quantize", as_json, json_file, lambda: adapterops.quantize(
        base, out, blocksize=int(blocksize), double_quant=not no_double_quant, skip=list(skip), compute_dtype=compute_dtype,
        device=device, revision=revision, force=force, quiet=quiet or as_json))


@cli.command()
@click.argument("base")
@click.argument("out")
@click.option("--dtype", type=DTYPE_CHOICE, help="Output dtype (default: each weight's original dtype).")
@output_options("BASE")
def dequantize(base, out, dtype, device, revision, force, quiet, as_json, json_file):
    """Turn an NF4 checkpoint (ours, or one transformers + bitsandbytes saved) back into a plain one.

    \b
    Examples:
      adapterops dequantize ./llama-nf4 ./llama-dequantized
      adapterops dequantize ./llama-nf4 ./llama-bf16 --dtype bfloat16
    """
    _write("dequantize", as_json, json_file, lambda: adapterops.dequantize(
        base, out, dtype=dtype, device=device, revision=revision, force=force, quiet=quiet or as_json))


@cli.command()
@click.argument("adapter")
@click.argument("out")
@click.option("--to", type=click.Choice(["rslora", "standard"]), help="Target scaling: rsLoRA α/√r or standard α/r (default: keep).")
@click.option("--strength", type=float, default=1.0, show_default=True, help="Multiply ΔW by this factor.")
@click.option("--bake", is_flag=True, help="Fold the scale into lora_B and write α = r (α = √r under rsLoRA): for engines that ignore use_rslora or patterns.")
@click.option("--base", "base", help="LoRA on parameters (MoE experts): the base (headers only), when the config cannot tell which parameter a module adapts.")
@adapter_options
def rescale(adapter, out, to, strength, bake, base, force, as_json, json_file):
    """Write ADAPTER to OUT with the same ΔW under another scaling (PEFT format, loads unmodified).

    \b
    Examples:
      adapterops rescale ./lora ./lora-rs --to rslora
      adapterops rescale ./lora-rs ./lora-baked --to standard --bake      # for vLLM / TensorRT-LLM
      adapterops rescale ./lora ./lora-half --strength 0.5
    """
    _write("rescale", as_json, json_file, lambda: adapterops.rescale(adapter, out, to=to, strength=strength, bake=bake, force=force, base=base))


@cli.command()
@click.argument("adapter")
@click.argument("out")
@click.option("--rank", type=click.IntRange(min=1), help="Keep this many singular values per module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Keep the fewest singular values whose squares reach this share.")
@click.option("--sv-ratio", type=click.FloatRange(min=1), help="Keep σᵢ ≥ σ₁ / T.")
@click.option("--sv-fro", type=click.FloatRange(0, 1, min_open=True), help="Keep the fewest singular values retaining this share of ‖ΔW‖_F.")
@click.option("--max-rank", type=click.IntRange(min=1), help="Cap every module's new rank.")
@click.option("--pad-to", type=click.IntRange(min=1), help="Zero-pad every module to this rank, after any truncation. Alone: no SVD, "
              "zero rows/columns and α scaled with r so every scale (α/r) stays bit for bit; merging gives the same bytes.")
@click.option("--base", "base", help="LoHa/LoKr/VeRA → LoRA: the base (headers only) for layer shapes (convolutions, VeRA); "
              "LoRA on parameters (MoE experts): which parameter a module adapts, when the config cannot tell.")
@click.option("--split", type=click.Choice(["balanced", "b"]), default="balanced", show_default=True, help=SPLIT_HELP)
@click.option("--precision", type=PRECISION, default="float32", show_default=True, help=PRECISION_HELP)
@adapter_options
def rerank(adapter, out, rank, energy, sv_ratio, sv_fro, max_rank, pad_to, base, split, precision, force, as_json, json_file):
    """SVD-truncate (or zero-pad) every module of ADAPTER and write a PEFT adapter to OUT.

    The SVD of s·B·A comes from QR of the factors, never from a dense ΔW. A LoHa, LoKr or VeRA adapter is
    converted to a LoRA of the chosen rank (one module's dense ΔW at a time for LoHa and LoKr).

    \b
    Examples:
      adapterops rerank ./lora-r64 ./lora-r16 --rank 16
      adapterops rerank ./lora ./lora-99 --energy 0.99 --max-rank 32 --json
      adapterops rerank ./lora ./lora-slot64 --pad-to 64          # uniform rank for fixed-slot servers
      adapterops rerank ./loha ./lora-r16 --rank 16               # LoHa/LoKr/VeRA → LoRA
    """
    _write("rerank", as_json, json_file, lambda: adapterops.rerank(
        adapter, out, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank, pad_to=pad_to,
        split=split, precision=precision, force=force, base=base))


STACK_METHODS = ["linear", "svd", "cat", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd",
                 "magnitude_prune", "magnitude_prune_svd"]
_DENSITY = [m for m in STACK_METHODS if m.startswith(("ties", "dare", "magnitude"))]
_SIGN = ["ties", "ties_svd", "dare_ties", "dare_ties_svd"]


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT")
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each).")
@click.option("--method", type=click.Choice(STACK_METHODS), default="cat", show_default=True,
              help="cat: exact, rank Σrᵢ; svd/linear: weighted sum; ties, dare_*, magnitude_prune*: see the README.")
@click.option("--compat", type=click.Choice(["peft", "exact"]),
              help="peft: PEFT 0.21.2's add_weighted_adapter byte for byte (bugs included); exact: the method on each "
                   "true ΔWᵢ, then truncated. Default: exact for cat and svd, peft for the other methods.")
@click.option("--density", type=click.FloatRange(0, 1), help="Share of entries kept (ties, dare_*, magnitude_prune*; required there).")
@click.option("--majority-sign", type=click.Choice(["total", "frequency"]), default="total", show_default=True,
              help="TIES sign election: sign of the sum (total) or the commoner sign (frequency).")
@click.option("--seed", type=int, help="DARE's random masks: the seed PEFT users pass to torch.manual_seed (default: unseeded).")
@click.option("--rank", type=click.IntRange(min=1), help="The output rank (default: the largest input rank); with --compat peft only for *svd methods.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="With --compat exact: the fewest singular values keeping this share of ‖ΔW‖_F² per module (capped by --rank).")
@click.option("--split", type=click.Choice(["balanced", "b"]), default="balanced", show_default=True, help="With --compat exact: " + SPLIT_HELP)
@click.option("--precision", type=PRECISION, default="float32", show_default=True, help="With --compat exact, svd/linear: " + PRECISION_HELP)
@click.option("--base", "base", help="With --compat exact, LoRA on parameters (MoE experts): the base (headers only) that settles which "
              "parameter a module adapts, or whether a router's LoRA is one on its weight, when the config cannot tell.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
@adapter_options
@click.pass_context
def stack(ctx, paths, weights, method, compat, density, majority_sign, seed, rank, energy, split, precision, base, quiet, force,
          as_json, json_file):
    """Combine adapters into one: weighted sum, TIES, DARE or magnitude pruning (each adapter with its own scale).

    \b
    Examples:
      adapterops stack ./lora-a ./lora-b ./ab --weights 1,0.5
      adapterops stack ./lora-a ./lora-b ./ab-r16 --method svd --rank 16
      adapterops stack ./a ./b ./ties --method ties --density 0.5                  # PEFT's bytes
      adapterops stack ./a ./b ./dare --method dare_ties_svd --density 0.3 --seed 0
      adapterops stack ./a ./b ./t16 --method ties --density 0.5 --compat exact --energy 0.9
      adapterops stack ./moe-a ./moe-b ./moe-ab --method svd --rank 8 --base ./mixtral   # per expert
    """
    from adapterops.ops.stack import default_compat

    compat_ = compat or default_compat(method)
    only_with(ctx, method in _DENSITY, "with " + ", ".join(_DENSITY), "--density")
    only_with(ctx, method in _SIGN, "with " + ", ".join(_SIGN), "--majority-sign")
    only_with(ctx, method.startswith("dare"), "with the dare_* methods", "--seed")
    only_with(ctx, method != "cat", "with methods other than cat (cat keeps every factor exactly)", "--rank", "--energy", "--split", "--precision")
    only_with(ctx, compat_ == "exact", "with --compat exact (PEFT truncates at a fixed rank, S in B, float32)", "--energy", "--split", "--precision")
    only_with(ctx, compat_ == "exact", "with --compat exact (PEFT cannot stack LoRA on parameters)", "--base")
    only_with(ctx, compat_ == "exact" or method.endswith("svd"), "with --compat exact or an *svd method (PEFT's svd_rank)", "--rank")
    if method in _DENSITY and density is None:
        raise click.UsageError(f"--method {method} needs --density")
    adapters, out = _adapters_and_out(paths)
    _write("stack", as_json, json_file, lambda: adapterops.stack(
        adapters, out, weights=floats(weights), method=method, compat=compat, rank=rank, energy=energy, density=density,
        majority_sign=majority_sign, seed=seed, split=split, precision=precision, force=force, base=base,
        quiet=quiet or as_json))


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of every module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Per module, the fewest singular values whose squares reach this share of ‖ΔW‖_F².")
@click.option("--max-rank", type=click.IntRange(min=1), help="With --energy: cap every module's rank.")
@click.option("--target", multiple=True, metavar="PATTERN", help="Only these modules (name, suffix or regex; repeatable). Default: every Linear projection.")
@click.option("--embeddings", is_flag=True, help="Also extract the token embedding (as an embedding LoRA) and an untied lm_head.")
@click.option("--split", type=click.Choice(["balanced", "b"]), default="balanced", show_default=True, help=SPLIT_HELP)
@click.option("--dtype", type=DTYPE_CHOICE, default="float32", show_default=True, help="dtype of the adapter's factors.")
@click.option("--precision", type=PRECISION, default="float32", show_default=True, help=PRECISION_HELP)
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@output_options("BASE and TUNED")
@click.pass_context
def extract(ctx, base, tuned, out, rank, energy, max_rank, target, embeddings, split, dtype, precision, allow_pickle, device,
            revision, force, quiet, as_json, json_file):
    """Extract a LoRA adapter from TUNED − BASE (a fully fine-tuned model and its base), module by module.

    \b
    Each ΔW is truncated by its SVD (randomized, seeded, exact where it matters); the adapter is
    written in PEFT format (scale 1, per-module ranks as exact patterns) and loads with
    PeftModel.from_pretrained(BASE model, OUT). Layernorms and other tensors that changed are not
    representable as LoRA: the summary says how many.

    \b
    Examples:
      adapterops extract ./llama ./llama-sft ./sft-lora-r64 --rank 64
      adapterops extract ./llama ./llama-sft ./sft-lora --energy 0.9 --max-rank 256 --json
      adapterops extract ./llama ./llama-sft ./attn-lora --rank 16 --target q_proj --target v_proj
    """
    only_with(ctx, energy is not None, "with --energy (--rank fixes every module's rank)", "--max-rank")
    _write("extract", as_json, json_file, lambda: adapterops.extract(
        base, tuned, out, rank=rank, energy=energy, max_rank=max_rank, target=list(target), embeddings=embeddings,
        split=split, dtype=dtype, precision=precision, device=device, revision=revision, force=force,
        allow_pickle=allow_pickle, quiet=quiet or as_json))


@cli.command()
@click.argument("adapter")
@click.option("--base", help="The base checkpoint (folder or Hub id): adds ‖ΔW‖/‖W‖ and the amplification factor.")
@click.option("--quantized-base", metavar="NF4_BASE", help="With --base (the 16-bit original): its NF4 copy a QLoRA adapter was trained on; adds ‖W16 − W4‖ and what merge --requantize loses, relative to ‖ΔW‖, and which base to merge onto (automatic when --base itself is NF4).")
@click.option("--compare", "compare", metavar="OTHER_ADAPTER", help="Another adapter: adds the subspace similarity φ(i, j) per module.")
@click.option("--plot", "plot_path", metavar="FILE.png", help="Draw a PNG: effective-rank heatmap and normalized spectra (needs matplotlib).")
@click.option("--all", "all_rows", is_flag=True, help="One table row per module instead of one per module type.")
@click.option("--precision", type=PRECISION, default="float32", show_default=True, help=PRECISION_HELP)
@click.option("--revision", help="Hub revision of --base when it is a Hub repo id.")
@click.option("--intruders", is_flag=True, help="With --base: count intruder dimensions of W + ΔW (Shuttleworth et al. 2024); two dense SVDs per module.")
@click.option("--intruder-k", type=click.IntRange(min=1), default=10, show_default=True, help="With --intruders: how many top singular vectors of W + ΔW to examine.")
@click.option("--intruder-epsilon", type=click.FloatRange(0, 1, min_open=True), default=0.5, show_default=True, help="With --intruders: |cosine| below which a vector matches no singular vector of W.")
@click.option("--device", default="cpu", show_default=True, help="With --intruders: where the SVDs run (cpu, cuda, auto).")
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings (NaN/Inf, untrained or negligible modules, unused patterns); notes never count.")
@json_options
@click.pass_context
def analyze(ctx, adapter, base, quantized_base, compare, plot_path, all_rows, precision, revision, intruders, intruder_k, intruder_epsilon, device,
            strict, as_json, json_file):
    """How much rank ADAPTER really uses: spectra, stable and effective rank, r90/r99, per module.

    The SVD of each ΔW = s·B·A comes from QR of the factors, never a dense ΔW, so an 8B
    adapter takes seconds. The table groups modules by type (q_proj, down_proj, …); the
    suggested rank is the largest r99, and the header says what `rerank --energy 0.99` saves.
    --json follows the schema adapterops.analyze/1 (adapterops/schemas/analyze-1.schema.json).

    \b
    Examples:
      adapterops analyze ./my-lora
      adapterops analyze ./my-lora --base meta-llama/Llama-3.1-8B --all
      adapterops analyze ./my-lora --base ./llama --intruders --device auto
      adapterops analyze ./lora-r8 --compare ./lora-r64 --json-file report.json --plot report.png
      adapterops analyze ./my-lora --json --strict      # CI: JSON on stdout, exit 1 on warnings
    """
    from adapterops.cli.render import render_plot, render_table

    only_with(ctx, not as_json, "to the text table (--json prints every module)", "--all")
    only_with(ctx, base is not None, "with --base", "--revision", "--intruders", "--quantized-base")
    only_with(ctx, intruders, "with --intruders", "--intruder-k", "--intruder-epsilon", "--device")
    report = call(lambda: adapterops.analyze(adapter, base=base, compare=compare, revision=revision, precision=precision,
                                             intruders=intruders, intruder_k=intruder_k, intruder_epsilon=intruder_epsilon, device=device,
                                             quantized_base=quantized_base))
    if plot_path:
        call(lambda: render_plot(report, plot_path))
    if as_json:
        warn(report.warnings)
    emit(report, as_json, json_file, lambda: render_table(report, all_rows))
    if strict and report.warnings:
        sys.exit(1)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Absolute tolerance per element.")
@click.option("--rtol", type=click.FloatRange(min=0), default=0.0, show_default=True, help="Relative tolerance per element (of |B|).")
@click.option("--ignore-dtype", is_flag=True, help="Compare values only: a float32 and a bfloat16 tensor may agree.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@click.option("-q", "--quiet", is_flag=True, help="No progress bar (there is none when stderr is not a terminal).")
@json_options
def diff(a, b, atol, rtol, ignore_dtype, allow_pickle, quiet, as_json, json_file):
    """Compare checkpoints or adapters A and B tensor by tensor; exit 0 when they agree, 1 when not.

    \b
    Reports tensors only on one side, shape and dtype differences, how many tensors are
    bit-identical and the largest absolute and relative differences. Each element must satisfy
    |a - b| <= atol + rtol * |b| (NaN matches NaN); the default asks for equal values.
    The relative difference of a tensor is max|a - b| / max|b|: relative to B's largest
    magnitude (1 if B is all zeros), so it stays finite where B has zeros.

    \b
    Examples:
      adapterops diff ./merged ./merged-by-peft                 # exit 1 unless equal
      adapterops diff ./merged-gpu ./merged-cpu --atol 1e-2 --rtol 1e-2
      adapterops diff ./lora-a ./lora-b --json
    """
    from adapterops.cli.render import render_diff

    r = call(lambda: adapterops.diff(a, b, atol=atol, rtol=rtol, ignore_dtype=ignore_dtype, allow_pickle=allow_pickle,
                                    quiet=quiet or as_json))
    emit(r, as_json, json_file, lambda: render_diff(r, atol, rtol))
    sys.exit(0 if r.ok else 1)


@cli.command("inspect")
@click.argument("path")
@click.option("--scan", is_flag=True, help="Checkpoints: read every tensor and check for NaN/Inf (adapters are always scanned).")
@click.option("--revision", help="Hub revision of PATH when it is a Hub repo id.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP.replace(".bin", ".bin/.pt"))
@json_options
def inspect_cmd(path, scan, revision, allow_pickle, as_json, json_file):
    """Say what PATH is (PEFT LoRA / rsLoRA / DoRA adapter, NF4 or plain checkpoint) and what it holds.

    \b
    Adapters: modules, ranks, alphas, effective scales, dtypes, size, replaced tensors and warnings
    (NaN/Inf, all-zero lora_B, pattern keys that match no module). Checkpoints: files, tensors,
    parameters, dtypes, config, NF4 blocksize and double quantization, DoRA sidecar, and the
    provenance record `adapterops batch` leaves. Exits 1 when there are warnings.

    \b
    Examples:
      adapterops inspect ./my-lora
      adapterops inspect ./llama-nf4 --json
      adapterops inspect ./merged --scan
    """
    from adapterops.cli.render import render_inspect

    r = call(lambda: adapterops.inspect(path, scan=scan, revision=revision, allow_pickle=allow_pickle))
    emit(r, as_json, json_file, lambda: render_inspect(r))
    sys.exit(1 if r.warnings else 0)


ENGINE_HELP = ("Serving engine: vllm, sglang, tgi, lorax or llamacpp (its newest release here), or NAME@RELEASE "
               "(vllm@0.33.0). The rules are adapterops/data/engines/*.json.")
MAX_LORA_RANK_HELP = "The engine's --max-lora-rank as you will start it (default: the engine release's default)."


@cli.command()
@click.argument("adapter")
@click.option("--for", "engine", required=True, metavar="ENGINE", help=ENGINE_HELP)
@click.option("--base", help="The base model (folder or Hub id): adapter modules that match nothing, shapes, tied embeddings.")
@click.option("--max-lora-rank", type=click.IntRange(min=1), help=MAX_LORA_RANK_HELP)
@click.option("--revision", help="Hub revision of --base when it is a Hub repo id.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP)
@json_options
@click.pass_context
def check(ctx, adapter, engine, base, max_lora_rank, revision, allow_pickle, as_json, json_file):
    """Will ADAPTER load, and take effect, in a serving engine? One line per finding.

    \b
    Each finding has a severity: refused (the engine will not load it), ignored silently (it
    loads and the feature does nothing), served differently (another effect than PEFT's) or
    fine; the fix `adapterops convert` can apply; and the engine source the rule comes from.
    Exit 0: every finding fine. 1: a finding that changes behaviour. 2: bad input.
    --json follows the schema adapterops.check/1 (adapterops/schemas/check-1.schema.json).

    \b
    Examples:
      adapterops check ./my-lora --for vllm
      adapterops check ./my-lora --for tgi --base meta-llama/Llama-3.1-8B
      adapterops check ./my-lora --for vllm@0.33.0 --max-lora-rank 64 --json
    """
    from adapterops.cli.render import render_check

    only_with(ctx, base is not None, "with --base", "--revision")
    r = call(lambda: adapterops.check(adapter, engine=engine, base=base, max_lora_rank=max_lora_rank, revision=revision,
                                      allow_pickle=allow_pickle))
    emit(r, as_json, json_file, lambda: render_check(r))
    sys.exit(0 if r.ok else 1)


@cli.command()
@click.argument("adapter")
@click.argument("out")
@click.option("--for", "engine", metavar="ENGINE", help=ENGINE_HELP)
@click.option("--to", "to", type=click.Choice(["peft", "gguf", "mlx", "torchtune"]), default="peft", show_default=True,
              help="Output format: PEFT, GGUF (llama.cpp; OUT ending in .gguf is one file), mlx-lm or torchtune.")
@click.option("--from", "from_format", type=click.Choice(["peft", "gguf", "mlx", "torchtune"]),
              help="Source format (default: detected).")
@click.option("--base", help="The base model: needed for DoRA, modules_to_save copies and renaming keys to the base's (--for), and for GGUF/torchtune's architecture and q/k head counts.")
@click.option("--rank", type=click.IntRange(min=1), help="With --for: rank of every module (truncated by SVD or zero-padded).")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="With --for: per module, the fewest singular values whose squares reach this share of ‖ΔW‖_F².")
@click.option("--max-error", type=click.FloatRange(0, 1), default=0.01, show_default=True,
              help="With --for: a modules_to_save copy becomes a low-rank delta only within this relative error.")
@click.option("--max-lora-rank", type=click.IntRange(min=1), help="With --for: " + MAX_LORA_RANK_HELP)
@click.option("--allow-lossy", is_flag=True, help="Formats: re-extract what the target cannot carry exactly (DoRA, modules_to_save) from --base, reporting each module's error, instead of refusing.")
@click.option("--revision", help="Hub revision of --base when it is a Hub repo id.")
@click.option("--allow-pickle", is_flag=True, help=PICKLE_HELP.replace(".bin", ".bin/.pt (torchtune's adapter_model.pt)"))
@adapter_options
@click.pass_context
def convert(ctx, adapter, out, engine, to, from_format, base, rank, energy, max_error, max_lora_rank, allow_lossy, revision,
            allow_pickle, force, as_json, json_file):
    """Write ADAPTER to OUT as an adapter ENGINE serves with the same effect, and/or in another format.

    \b
    --for ENGINE: rsLoRA and rank/alpha patterns: scale baked in (exact). Ranks: zero-padded
    (exact) or SVD-truncated to the engine's (energy kept per module). DoRA: the exact DoRA delta
    re-extracted as LoRA (needs --base; relative error per module). modules_to_save copies the
    engine refuses: a low-rank delta against --base within --max-error, else a refusal that says
    to merge. Keys: renamed to the base's. The output passes `adapterops check --for ENGINE`.
    --to / --from: PEFT ⇄ GGUF (llama.cpp), mlx-lm, torchtune, keeping every module's ΔW (scales
    folded into lora_B where the target has one alpha; q/k rows permuted as llama.cpp and
    torchtune expect). OUT/adapterops-convert.json (PEFT outputs) reports every change.

    \b
    Examples:
      adapterops convert ./dora-lora ./for-vllm --for vllm --base ./llama --energy 0.999 --max-lora-rank 64
      adapterops convert ./rslora ./for-sglang --for sglang
      adapterops convert ./my-lora ./my-lora.gguf --to gguf --base ./llama      # llama.cpp / Ollama
      adapterops convert ./my-lora ./mlx-adapter --to mlx --base ./llama
      adapterops convert ./mlx-adapter ./peft-adapter --to peft              # source format detected
      adapterops convert ./rslora ./for-llamacpp.gguf --for llamacpp --to gguf --base ./llama
    """
    if engine is None and ctx.get_parameter_source("to") != click.core.ParameterSource.COMMANDLINE:
        raise click.UsageError("give --for ENGINE (make it servable) and/or --to FORMAT (write another format)")
    only_with(ctx, base is not None, "with --base", "--revision")
    only_with(ctx, engine is not None, "with --for ENGINE", "--rank", "--energy", "--max-error", "--max-lora-rank")
    _write("convert", as_json, json_file, lambda: adapterops.convert(
        adapter, out, engine=engine, to=to, from_format=from_format, base=base, rank=rank, energy=energy,
        max_error=max_error, max_lora_rank=max_lora_rank, allow_lossy=allow_lossy, revision=revision, force=force,
        allow_pickle=allow_pickle))


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Parallel processes (default: one per core, at most one per 4 GiB of memory).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when any output is missing or stale (a CI gate).")
@click.option("--shard", "shard_spec", metavar="I/N", help="Run only the I-th of N deterministic slices of the tasks (a CI matrix).")
@click.option("-q", "--quiet", is_flag=True, help="No line per finished task on stderr.")
@json_options
def batch(manifest, jobs, check, shard_spec, quiet, as_json, json_file):
    """Run every job of a TOML MANIFEST; outputs that are already current are skipped.

    \b
    Each job names an op (any command above except batch), its inputs (paths, globs such as
    adapters/*/ or Hub ids), its options and an output pattern such as out/{name}-r16. The
    manifest is checked before any work starts. Each output records a hash of its inputs, the
    op, its options and the adapterops version; a rerun skips current outputs. A failing task
    does not stop the others. Exit 0 when every task succeeded (or, with --check, every output
    is current), 1 otherwise, 2 for a bad manifest.

    \b
    Examples:
      adapterops batch adapters.toml
      adapterops batch adapters.toml --check                  # CI: fail when outputs are stale
      adapterops batch adapters.toml --shard 2/4 --json-file report.json
    """
    from adapterops.cli.render import render_batch

    r = call(lambda: adapterops.run_batch(manifest, jobs=jobs, check=check, shard_spec=shard_spec, progress=not quiet,
                                         report_file=json_file))
    emit(r, as_json, json_file, lambda: render_batch(r))
    sys.exit(0 if r.ok else 1)


def main() -> None:
    """Console-script entry point."""
    cli()


