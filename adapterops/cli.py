"""The `adapterops` command line: thin click commands, each one library call."""

from __future__ import annotations

import json
import sys

import click

from adapterops import __version__
from adapterops.errors import AdapteropsError
from adapterops.merge import merge as merge_fn


def _floats(text: str | None) -> list[float] | None:
    """'1,0.5' -> [1.0, 0.5]."""
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint="--weights") from None


def _fail(exc: AdapteropsError) -> None:
    """Print a one-line error and exit with the error's code."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(exc.exit_code)


def output_options(f):
    """The options every writing command shares: --device, --revision, --force, --json, --quiet."""
    for option in reversed([
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto."),
        click.option("--revision", help="Hub revision (branch, tag or commit) of BASE when it is a Hub repo id."),
        click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty."),
        click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar."),
    ]):
        f = option(f)
    return f


def _report(data: dict, json_path: str | None, table) -> None:
    """--json FILE for reports: '-' prints the JSON instead of the table; a FILE gets it (atomically) beside the table."""
    from adapterops.io.atomic import atomic_file

    text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    if json_path == "-":
        click.echo(text, nl=False)
        return
    if json_path:
        with atomic_file(json_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    click.echo(table(), nl=False)


def _run(call, as_json: bool, summary) -> object:
    """Run a library call; print its JSON summary or a one-line summary; bad input exits 2 with one line."""
    try:
        result = call()
    except AdapteropsError as exc:
        _fail(exc)
    except OSError as exc:  # a full disk or a vanished folder outside the writers' own checks: still one line
        _fail(AdapteropsError(f"cannot {'write' if exc.errno in (28, 27, 122) else 'access'}: {exc.strerror or exc}",
                              file=exc.filename))
    for w in getattr(result, "warnings", []):
        click.echo(f"warning: {w}", err=True)
    click.echo(json.dumps(result.to_dict(), indent=2) if as_json else summary(result))
    return result


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="adapterops")
def cli() -> None:
    """Surgery on model checkpoints and LoRA adapters: merge, unmerge, rescale, re-rank, stack, extract,
    analyse, quantize to NF4 and back, and all of it in batches.

    Every command streams tensor by tensor, writes its output atomically (a failure leaves nothing behind),
    never modifies its inputs, and exits 0 on success and 2 on bad input (one `error:` line naming the file).
    inspect, diff, batch and analyze --strict exit 1 when they ran but found something: warnings, a
    difference, a failed task or a stale output. `adapterops COMMAND --help` shows examples.
    """


@cli.command(context_settings={"ignore_unknown_options": False})
@click.argument("base")
@click.argument("paths", nargs=-1, required=True)
@click.option("--weights", help="Comma-separated weight per adapter, multiplying its scale (default 1 each).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Load the base in this dtype and write it (default: keep the base's).")
@click.option("--max-shard-size", help="Re-split the output into shards of at most this size (e.g. 5GB); default: the base's split.")
@click.option("--dry-run", is_flag=True, help="Check everything and print what would change; write nothing.")
@click.option("--requantize", is_flag=True, help="NF4 base: write NF4 again, as PEFT's merge into a 4-bit model does (default: 16-bit output).")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle inputs (loaded with torch.load(weights_only=True)).")
@output_options
def merge(base, paths, weights, dtype, device, revision, max_shard_size, force, dry_run, requantize, allow_pickle, as_json, quiet):
    """Merge LoRA / rsLoRA / DoRA adapters into BASE and write the merged checkpoint to OUT.

    \b
    Usage: adapterops merge BASE ADAPTER [ADAPTER...] OUT
    BASE and each ADAPTER are local folders or Hugging Face Hub repo ids.
    The result equals PEFT's merge_and_unload() + save_pretrained(), bit for bit on the CPU,
    without ever loading the whole model.

    \b
    Examples:
      adapterops merge meta-llama/Llama-3.1-8B ./my-lora ./merged
      adapterops merge ./base ./lora-a ./lora-b --weights 1,0.5 ./merged
      adapterops merge ./base ./lora ./merged --dtype bfloat16 --max-shard-size 2GB --json
      adapterops merge ./base ./lora ./merged --dry-run
      adapterops merge ./llama-nf4 ./qlora ./merged-nf4 --requantize   # stays 4-bit, as PEFT
    """
    if len(paths) < 2:
        raise click.UsageError("give at least one ADAPTER and then OUT")
    *adapters, out = paths

    def summary(r) -> str:
        if dry_run:
            lines = [f"{ch['tensor']}: " + "; ".join(ch["ops"]) for ch in r.changes]
            return "\n".join(lines + [f"dry run: {r.modules_merged} modules would be merged into {r.tensors_changed} tensors; nothing written"])
        return (f"merged {r.modules_merged} modules; wrote {r.tensors_written} tensors "
                f"({r.bytes_written / 1e6:.1f} MB, {r.shards} shard(s)) to {r.output} in {r.seconds:.1f}s")

    _run(lambda: merge_fn(
        base, adapters, out, weights=_floats(weights), dtype=dtype, device=device, revision=revision,
        max_shard_size=max_shard_size, force=force, dry_run=dry_run, requantize=requantize, allow_pickle=allow_pickle,
        quiet=quiet or as_json,
    ), as_json, summary)


@cli.command()
@click.argument("merged")
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT")
@click.option("--weights", help="The weights the adapters were merged with (default 1 each).")
@click.option("--keep-replaced", is_flag=True, help="Write tensors an adapter replaced (modules_to_save, trained biases) from the adapter's copy instead of refusing.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle inputs (loaded with torch.load(weights_only=True)).")
@output_options
def unmerge(merged, paths, weights, keep_replaced, device, revision, force, allow_pickle, as_json, quiet):
    """Take adapters back out of a MERGED checkpoint and write the recovered base to OUT.

    \b
    Each changed weight is W' − ΔW computed in float32 and rounded once: a bf16 merge → unmerge
    round trip is within one bf16 ulp of the original. Give the adapters and --weights as they
    were merged. DoRA needs the dora_norms.adapterops file that `adapterops merge` writes beside
    the merged weights. An adapted embedding is restored from the base layer PEFT saved with the
    adapter; other tensors an adapter replaced (modules_to_save, bias="all") are refused unless
    --keep-replaced writes them from the adapter's copy.

    \b
    Examples:
      adapterops unmerge ./merged ./my-lora ./base-again
      adapterops unmerge ./merged ./lora-a ./lora-b --weights 1,0.5 ./base-again --json
    """
    from adapterops.unmerge import unmerge as unmerge_fn

    if len(paths) < 2:
        raise click.UsageError("give at least one ADAPTER and then OUT")
    *adapters, out = paths
    _run(lambda: unmerge_fn(merged, adapters, out, weights=_floats(weights), device=device, revision=revision, force=force,
                            keep_replaced=keep_replaced, allow_pickle=allow_pickle, quiet=quiet or as_json), as_json,
         lambda r: f"unmerged {r.modules_unmerged} modules from {r.tensors_changed} tensors; wrote {r.bytes_written / 1e6:.1f} MB "
                   f"to {r.output} in {r.seconds:.1f}s")


@cli.command()
@click.argument("base")
@click.argument("out")
@click.option("--blocksize", type=click.Choice(["32", "64", "128", "256", "512", "1024", "2048", "4096"]), default="64", show_default=True)
@click.option("--no-double-quant", is_flag=True, help="Store the per-block absmax in float32 instead of quantizing it to 8 bits.")
@click.option("--skip", multiple=True, metavar="PATTERN", help="Leave these modules unquantized (name, suffix or regex; repeatable).")
@click.option("--compute-dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="bnb_4bit_compute_dtype (default: the weights' dtype).")
@output_options
def quantize(base, out, blocksize, no_double_quant, skip, compute_dtype, device, revision, force, as_json, quiet):
    """Quantize BASE's Linear weights to NF4 (QLoRA's 4-bit NormalFloat) and write OUT.

    \b
    The output is laid out as transformers + bitsandbytes save a 4-bit model, and loads with
    AutoModelForCausalLM.from_pretrained(OUT). The bytes equal bitsandbytes' CUDA kernels.

    \b
    Examples:
      adapterops quantize ./llama ./llama-nf4
      adapterops quantize ./llama ./llama-nf4 --blocksize 128 --no-double-quant --skip down_proj
    """
    from adapterops.quantize import quantize_checkpoint

    _run(lambda: quantize_checkpoint(
        base, out, blocksize=int(blocksize), double_quant=not no_double_quant, skip=list(skip), compute_dtype=compute_dtype,
        device=device, revision=revision, force=force, quiet=quiet or as_json,
    ), as_json, lambda r: f"quantized {r.tensors_quantized} weights to NF4; wrote {r.bytes_written / 1e6:.1f} MB to {r.output} in {r.seconds:.1f}s")


@cli.command()
@click.argument("base")
@click.argument("out")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), help="Output dtype (default: each weight's original dtype).")
@output_options
def dequantize(base, out, dtype, device, revision, force, as_json, quiet):
    """Turn an NF4 checkpoint (ours, or one transformers + bitsandbytes saved) back into a plain one.

    \b
    Examples:
      adapterops dequantize ./llama-nf4 ./llama-dequantized
      adapterops dequantize ./llama-nf4 ./llama-bf16 --dtype bfloat16
    """
    from adapterops.quantize import dequantize_checkpoint

    _run(lambda: dequantize_checkpoint(base, out, dtype=dtype, device=device, revision=revision, force=force, quiet=quiet or as_json),
         as_json, lambda r: f"dequantized {r.tensors_quantized} NF4 weights; wrote {r.bytes_written / 1e6:.1f} MB to {r.output} in {r.seconds:.1f}s")


@cli.command()
@click.argument("adapter")
@click.argument("out")
@click.option("--to", type=click.Choice(["rslora", "standard"]), help="Target scaling: rsLoRA α/√r or standard α/r (default: keep).")
@click.option("--strength", type=float, default=1.0, show_default=True, help="Multiply ΔW by this factor.")
@click.option("--bake", is_flag=True, help="Fold the scale into lora_B and write α = r (α = √r under rsLoRA): for engines that ignore use_rslora or patterns.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def rescale(adapter, out, to, strength, bake, force, as_json):
    """Write ADAPTER to OUT with the same ΔW under another scaling (PEFT format, loads unmodified).

    \b
    Examples:
      adapterops rescale ./lora ./lora-rs --to rslora
      adapterops rescale ./lora-rs ./lora-baked --to standard --bake      # for vLLM / TensorRT-LLM
      adapterops rescale ./lora ./lora-half --strength 0.5
    """
    from adapterops.algebra import rescale_adapter

    _run(lambda: rescale_adapter(adapter, out, to=to, strength=strength, bake=bake, force=force), as_json,
         lambda r: f"rescaled {r.modules} modules ({'rsLoRA' if r.use_rslora else 'standard'}{', baked' if r.baked else ''}) into {r.output}")


@cli.command()
@click.argument("adapter")
@click.argument("out")
@click.option("--rank", type=click.IntRange(min=1), help="Keep this many singular values per module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Keep the fewest singular values whose squares reach this share.")
@click.option("--sv-ratio", type=click.FloatRange(min=1), help="Keep σᵢ ≥ σ₁ / T.")
@click.option("--sv-fro", type=click.FloatRange(0, 1, min_open=True), help="Keep the fewest singular values retaining this share of ‖ΔW‖_F.")
@click.option("--max-rank", type=click.IntRange(min=1), help="Cap every module's new rank.")
@click.option("--pad-to", type=click.IntRange(min=1), help="Zero-pad every module to this rank (exact), after any truncation.")
@click.option("--split", type=click.Choice(["balanced", "b"]), default="balanced", show_default=True, help="Put √S on both factors, or S in lora_B (as PEFT does).")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary (per-module ranks and retained norm) on stdout.")
def rerank(adapter, out, rank, energy, sv_ratio, sv_fro, max_rank, pad_to, split, precision, force, as_json):
    """SVD-truncate (or zero-pad) every module of ADAPTER and write a PEFT adapter to OUT.

    The SVD of s·B·A comes from QR of the factors, never from a dense ΔW.

    \b
    Examples:
      adapterops rerank ./lora-r64 ./lora-r16 --rank 16
      adapterops rerank ./lora ./lora-99 --energy 0.99 --max-rank 32 --json
      adapterops rerank ./lora ./lora-slot64 --pad-to 64          # uniform rank for fixed-slot servers
    """
    from adapterops.algebra import rerank_adapter

    _run(lambda: rerank_adapter(adapter, out, rank=rank, energy=energy, sv_ratio=sv_ratio, sv_fro=sv_fro, max_rank=max_rank,
                                pad_to=pad_to, split=split, precision=precision, force=force), as_json,
         lambda r: f"reranked {len(r.modules)} modules into {r.output}; Frobenius norm retained {r.retained_fro:.4f}")


@cli.command()
@click.argument("paths", nargs=-1, required=True, metavar="ADAPTER... OUT")
@click.option("--weights", help="Comma-separated weight per adapter (default 1 each).")
@click.option("--method", type=click.Choice(["cat", "svd"]), default="cat", show_default=True, help="cat: exact, rank Σrᵢ; svd: truncated to --rank.")
@click.option("--rank", type=click.IntRange(min=1), help="With --method svd: the output rank (default: the largest input rank).")
@click.option("--split", type=click.Choice(["balanced", "b"]), default="balanced", show_default=True)
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True, help="Arithmetic of the --method svd factorisation.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on stdout.")
def stack(paths, weights, method, rank, split, precision, force, as_json):
    """Combine adapters into one whose ΔW is Σ wᵢ·ΔWᵢ (each with its own scale: patterns, rsLoRA).

    \b
    Examples:
      adapterops stack ./lora-a ./lora-b ./ab --weights 1,0.5
      adapterops stack ./lora-a ./lora-b ./ab-r16 --method svd --rank 16
    """
    from adapterops.algebra import stack_adapters

    if len(paths) < 2:
        raise click.UsageError("give at least one ADAPTER and then OUT")
    *adapters, out = paths
    _run(lambda: stack_adapters(adapters, out, weights=_floats(weights), method=method, rank=rank, split=split,
                                precision=precision, force=force),
         as_json, lambda r: f"stacked {r.modules} modules ({r.method}) into {r.output}")


@cli.command()
@click.argument("base")
@click.argument("tuned")
@click.argument("out")
@click.option("--rank", type=click.IntRange(min=1), help="Rank of every module.")
@click.option("--energy", type=click.FloatRange(0, 1, min_open=True), help="Per module, the fewest singular values whose squares reach this share of ‖ΔW‖_F².")
@click.option("--max-rank", type=click.IntRange(min=1), help="With --energy: cap every module's rank.")
@click.option("--target", multiple=True, metavar="PATTERN", help="Only these modules (name, suffix or regex; repeatable). Default: every Linear projection.")
@click.option("--embeddings", is_flag=True, help="Also extract the token embedding (as an embedding LoRA) and an untied lm_head.")
@click.option("--split", type=click.Choice(["balanced", "b"]), default="balanced", show_default=True, help="Put √S on both factors, or S in lora_B (as PEFT's convert_to_lora).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True, help="dtype of the adapter's factors.")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True, help="Arithmetic of the SVDs.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle inputs (loaded with torch.load(weights_only=True)).")
@output_options
def extract(base, tuned, out, rank, energy, max_rank, target, embeddings, split, dtype, precision, device, revision, force,
            allow_pickle, as_json, quiet):
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
    from adapterops.extract import extract_adapter

    _run(lambda: extract_adapter(base, tuned, out, rank=rank, energy=energy, max_rank=max_rank, target=list(target),
                                 embeddings=embeddings, split=split, dtype=dtype, precision=precision, device=device,
                                 revision=revision, force=force,
                                 allow_pickle=allow_pickle, quiet=quiet or as_json), as_json,
         lambda r: f"extracted {len(r.modules)} modules into {r.output}; Frobenius norm of ΔW retained {r.retained_fro:.4f}"
                   + (f"; {r.unchanged} chosen weights were unchanged" if r.unchanged else ""))


@cli.command()
@click.argument("adapter")
@click.option("--base", help="The base checkpoint (folder or Hub id): adds ‖ΔW‖/‖W‖ and the amplification factor.")
@click.option("--compare", "compare", metavar="OTHER_ADAPTER", help="Another adapter: adds the subspace similarity φ(i, j) per module.")
@click.option("--json", "json_path", metavar="FILE", help="Write the report as JSON (schema adapterops.analyze/1) to FILE; - for stdout.")
@click.option("--plot", "plot_path", metavar="FILE.png", help="Draw a PNG: effective-rank heatmap and normalized spectra (needs matplotlib).")
@click.option("--all", "all_rows", is_flag=True, help="One table row per module instead of one per module type.")
@click.option("--precision", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--revision", help="Hub revision of --base.")
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings (NaN/Inf, untrained or negligible modules, unused patterns).")
def analyze(adapter, base, compare, json_path, plot_path, all_rows, precision, revision, strict):
    """How much rank ADAPTER really uses: spectra, stable and effective rank, r90/r99, per module.

    The SVD of each ΔW = s·B·A comes from QR of the factors, never a dense ΔW, so an 8B
    adapter takes seconds. The table groups modules by type (q_proj, down_proj, …); the
    suggested rank is the largest r99, and the header says what `rerank --energy 0.99` saves.

    \b
    Examples:
      adapterops analyze ./my-lora
      adapterops analyze ./my-lora --base meta-llama/Llama-3.1-8B --all
      adapterops analyze ./lora-r8 --compare ./lora-r64 --json report.json --plot report.png
      adapterops analyze ./my-lora --json - --strict      # CI: JSON on stdout, exit 1 on warnings
    """
    from adapterops.analyze import analyze_adapter
    from adapterops.analyze_output import render_plot, render_table

    try:
        report = analyze_adapter(adapter, base=base, compare=compare, revision=revision, precision=precision)
        if plot_path:
            render_plot(report, plot_path)
    except AdapteropsError as exc:
        _fail(exc)
    _report(report.to_dict(), json_path, lambda: render_table(report, all_rows))
    if strict and report.warnings:
        if json_path == "-":
            for w in report.warnings:
                click.echo(f"warning: {w}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("a")
@click.argument("b")
@click.option("--atol", type=float, default=0.0, show_default=True, help="Absolute tolerance per element.")
@click.option("--rtol", type=float, default=0.0, show_default=True, help="Relative tolerance per element (of |B|).")
@click.option("--ignore-dtype", is_flag=True, help="Compare values only: a float32 and a bfloat16 tensor may agree.")
@click.option("--allow-pickle", is_flag=True, help="Allow .bin pickle inputs (loaded with torch.load(weights_only=True)).")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON on stdout.")
def diff(a, b, atol, rtol, ignore_dtype, allow_pickle, as_json):
    """Compare checkpoints or adapters A and B tensor by tensor; exit 0 when they agree, 1 when not.

    \b
    Reports tensors only on one side, shape and dtype differences, how many tensors are
    bit-identical and the largest absolute and relative differences. Each element must satisfy
    |a - b| <= atol + rtol * |b| (NaN matches NaN); the default asks for equal values.

    \b
    Examples:
      adapterops diff ./merged ./merged-by-peft                 # exit 1 unless equal
      adapterops diff ./merged-gpu ./merged-cpu --atol 1e-2 --rtol 1e-2
      adapterops diff ./lora-a ./lora-b --json
    """
    from adapterops.diff import diff_paths

    try:
        r = diff_paths(a, b, atol=atol, rtol=rtol, ignore_dtype=ignore_dtype, allow_pickle=allow_pickle)
    except AdapteropsError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2))
    else:
        lines = [f"only in A: {k}" for k in r.only_in_a] + [f"only in B: {k}" for k in r.only_in_b]
        for d in r.differing[:20]:
            what = [f"shape {d.shape[0]} vs {d.shape[1]}"] if d.shape else []
            what += [f"dtype {d.dtype[0]} vs {d.dtype[1]}"] if d.dtype else []
            what += [f"{d.mismatched} elements outside tolerance, max abs {d.max_abs:.3g}, max rel {d.max_rel:.3g}"] if d.mismatched else []
            lines.append(f"differs: {d.name}: {'; '.join(what)}")
        if len(r.differing) > 20:
            lines.append(f"... and {len(r.differing) - 20} more differing tensors (--json lists them all)")
        verdict = "same within tolerance" if r.ok else "DIFFERENT"
        lines.append(f"{r.tensors} tensors in both, {r.bit_identical} bit-identical, max abs diff {r.max_abs:.3g}, "
                     f"max rel diff {r.max_rel:.3g}: {verdict} (atol={atol:g}, rtol={rtol:g})")
        click.echo("\n".join(lines))
    sys.exit(0 if r.ok else 1)


@cli.command("inspect")
@click.argument("path")
@click.option("--scan", is_flag=True, help="Checkpoints: read every tensor and check for NaN/Inf (adapters are always scanned).")
@click.option("--revision", help="Hub revision when PATH is a Hub repo id.")
@click.option("--json", "as_json", is_flag=True, help="Print the description as JSON on stdout.")
def inspect_cmd(path, scan, revision, as_json):
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
    from adapterops.inspection import inspect_path

    try:
        r = inspect_path(path, scan=scan, revision=revision)
    except AdapteropsError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps(r.to_dict(), indent=2, default=str))
    else:
        click.echo(f"{r.path}: {r.kind}" + (f" ({r.summary['variant']})" if r.kind == "adapter" else ""))
        for key, value in r.summary.items():
            if key == "variant" or value in (None, [], {}):
                continue
            if key == "provenance":
                value = f"{value['op']} by adapterops {value['adapterops']} (key {value['key'][:12]})"
            if key == "nf4":
                value = {k: v for k, v in value.items() if k != "quantization_config"}
            click.echo(f"  {key}: {value}")
        for w in r.warnings:
            click.echo(f"warning: {w}")
    sys.exit(1 if r.warnings else 0)


@cli.command()
@click.argument("manifest", type=click.Path(dir_okay=False))
@click.option("--jobs", "-j", type=click.IntRange(min=1), help="Parallel processes (default: one per core, at most one per 4 GiB of memory).")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 when any output is missing or stale (a CI gate).")
@click.option("--shard", "shard_spec", metavar="I/N", help="Run only the I-th of N deterministic slices of the tasks (a CI matrix).")
@click.option("--json", "json_path", metavar="REPORT", help="Write every task's status, seconds, inputs, output and error to REPORT (- for stdout).")
@click.option("-q", "--quiet", is_flag=True, help="No line per finished task on stderr.")
def batch(manifest, jobs, check, shard_spec, json_path, quiet):
    """Run every job of a TOML MANIFEST; outputs that are already current are skipped.

    \b
    Each job names an op (merge, unmerge, rescale, rerank, stack, extract, quantize,
    dequantize, analyze), its inputs (paths, globs such as adapters/*/ or Hub ids), its
    options and an output pattern such as out/{name}-r16. The manifest is checked before
    any work starts. Each output records a hash of its inputs, the op, its options and the
    adapterops version; a rerun skips current outputs. A failing task does not stop the others.
    Exit 0 when every task succeeded (or, with --check, every output is current), 1 otherwise,
    2 for a bad manifest.

    \b
    Examples:
      adapterops batch adapters.toml
      adapterops batch adapters.toml --check                  # CI: fail when outputs are stale
      adapterops batch adapters.toml --shard 2/4 --json report.json
    """
    from adapterops.batch import run_batch

    try:
        r = run_batch(manifest, jobs=jobs, check=check, shard_spec=shard_spec, progress=not quiet)
    except AdapteropsError as exc:
        _fail(exc)

    def table() -> str:
        width = max([len(t.task) for t in r.tasks] + [4])
        lines = [f"{'task'.ljust(width)}  {'op':<10} {'status':<8} {'seconds':>8}  output"]
        for t in r.tasks:
            lines.append(f"{t.task.ljust(width)}  {t.op:<10} {t.status:<8} {t.seconds:8.1f}  {t.output}")
            if t.error:
                lines.append(f"{''.ljust(width)}  error: {t.error}")
        counts = ", ".join(f"{n} {s}" for s, n in sorted(r.counts.items()))
        return "\n".join(lines + [f"{len(r.tasks)} tasks: {counts or 'none'}"]) + "\n"

    _report(r.to_dict(), json_path, table)
    sys.exit(0 if r.ok else 1)


def main() -> None:
    """Console-script entry point."""
    cli()


if __name__ == "__main__":
    main()
