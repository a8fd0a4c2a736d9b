"""All text the CLI shows a person: one summary line per writing command, the tables of analyze, diff, inspect and
batch, and analyze's PNG (matplotlib, optional). Scripts read `--json` instead."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapterops.errors import AdapteropsError

if TYPE_CHECKING:  # the renderers take results; importing the ops here would pull torch into `--help`
    from adapterops.batch.runner import BatchResult
    from adapterops.ops.analyze import AnalyzeReport, ModuleReport
    from adapterops.ops.diff import DiffResult
    from adapterops.ops.inspect import InspectResult


def _fmt(x: float | int | None, digits: int = 3) -> str:
    """A compact number: '-' when unknown, 3 significant digits, ints as they are."""
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    if math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    """Left-aligned first column, right-aligned numbers, columns as wide as their widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return [line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _phi_cells(m: ModuleReport | None, similarity: list[dict] | None = None) -> list[str]:
    """φ at the top direction and at full rank, for one module or the mean of a group."""
    sims = similarity if similarity is not None else ([m.similarity] if m is not None and m.similarity else [])
    if not sims:
        return ["-", "-"]
    top = sum(s["phi"][0][0] for s in sims) / len(sims)
    full = sum(s["phi"][-1][-1] for s in sims) / len(sims)
    return [_fmt(top), _fmt(full)]


def _sign_cell(values: list[float | None]) -> str:
    """The mean sign-conflict share of a module or a group (modules without one left out)."""
    vals = [v for v in values if v is not None]
    return _fmt(sum(vals) / len(vals)) if vals else "-"


def render_table(report: AnalyzeReport, all_rows: bool = False) -> str:
    """The report as text: a header, a table by module type (or every module), a compact table by layer, warnings."""
    mods = report.modules
    with_base = report.base is not None
    with_cmp = report.compare is not None
    with_intr = report.intruder_k is not None
    with_q = report.qlora is not None
    total_fro = math.sqrt(sum((m.fro or 0.0) ** 2 for m in mods))
    ranks = sorted({m.rank for m in mods})
    out = [
        f"adapter {report.adapter}: {len(mods)} modules, rank {'/'.join(map(str, ranks))}"
        f"{', rsLoRA' if report.use_rslora else ''}, {report.bytes / 1e6:.2f} MB of factors, ‖ΔW‖_F total {_fmt(total_fro, 4)}",
        f"suggested rank (largest r99): {report.suggested_rank}; rerank --energy 0.99 would keep "
        f"{report.bytes_at_energy_99 / 1e6:.2f} MB ({report.bytes_at_energy_99 / max(report.bytes, 1):.0%}), saving "
        f"{(report.bytes - report.bytes_at_energy_99) / 1e6:.2f} MB",
        "",
    ]
    headers = ["module"] if all_rows else ["type", "n"]
    headers += ["rank", "‖ΔW‖_F", "stable", "eff.rank", "r90", "r99"]
    headers += ["ΔW/W", "amplif."] if with_base else []
    headers += ["intruders"] if with_intr else []
    headers += ["W16−W4", "requant"] if with_q else []
    headers += ["φ top-1", "φ all", "sign≠"] if with_cmp else []
    rows = []
    if all_rows:
        for m in mods:
            row = [m.name, str(m.rank), _fmt(m.fro), _fmt(m.stable_rank), _fmt(m.effective_rank), _fmt(m.r90), _fmt(m.r99)]
            row += [_fmt(m.relative_update), _fmt(m.amplification)] if with_base else []
            row += [_fmt(m.intruders)] if with_intr else []
            row += [_fmt(m.quantization_error), _fmt(m.requantization_error)] if with_q else []
            row += _phi_cells(m) + [_sign_cell([m.sign_conflict])] if with_cmp else []
            rows.append(row)
    else:
        for t, s in report.by_type.items():
            row = [t, str(s["modules"]), _fmt(s["rank"]), _fmt(s["fro_mean"]), _fmt(s["stable_rank_mean"]),
                   _fmt(s["effective_rank_mean"]), _fmt(s["r90_max"]), _fmt(s["r99_max"])]
            row += [_fmt(s["relative_update_mean"]), _fmt(s["amplification_mean"])] if with_base else []
            row += [_fmt(s.get("intruders"))] if with_intr else []
            row += [_fmt(s.get("quantization_error_mean")), _fmt(s.get("requantization_error_mean"))] if with_q else []
            row += (_phi_cells(None, [m.similarity for m in mods if m.type == t and m.similarity])
                    + [_sign_cell([m.sign_conflict for m in mods if m.type == t])]) if with_cmp else []
            rows.append(row)
    out += _table(headers, rows)
    if not all_rows:
        out.append("(means over modules of each type; r90/r99: the largest; --all for every module)")
    if with_intr:
        total = sum(m.intruders or 0 for m in mods)
        out.append(f"(intruders: of the top {report.intruder_k} singular vectors of W + ΔW, those with |cos| < "
                   f"{report.intruder_epsilon:g} to every singular vector of W (Shuttleworth et al. 2024); {total} in all"
                   f"{'' if all_rows else ', summed per type'})")
    if with_q:
        out.append("(QLoRA, each relative to ‖ΔW‖: W16−W4 = ‖W₁₆ − deq(W₄)‖, how far the 16-bit original is from the NF4 "
                   "base the adapter was trained on; requant = the error `merge --requantize` adds)")
        out += [f"advice: {a}" for a in report.qlora["advice"]]
    if with_cmp:
        out.append("(sign≠: share of ΔW entries whose signs differ between the two adapters, among entries both set; "
                   "near 0.5 means unrelated updates, where TIES' sign election drops about half the entries)")
    if len(report.by_layer) > 1:
        cells = "  ".join(f"{k}:{_fmt(v['effective_rank_mean'], 2)}/{_fmt(v['r99_max'])}" for k, v in report.by_layer.items())
        out += ["", "by layer (layer:mean effective rank/max r99):"]
        out += textwrap.wrap(cells, width=100, initial_indent="  ", subsequent_indent="  ")
    out += [""] + [f"warning: {w}" for w in report.warnings] if report.warnings else []
    out += [""] + [f"note: {n}" for n in report.notes] if report.notes else []
    return "\n".join(out).rstrip() + "\n"


def render_plot(report: AnalyzeReport, path: Path) -> None:
    from adapterops.io.atomic import atomic_file

    """A PNG with a heatmap of effective rank over layer × module type and the normalized spectra by type."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AdapteropsError("--plot needs matplotlib: pip install 'adapterops[plot]'") from None
    mods = [m for m in report.modules if m.singular_values]
    types = list(report.by_type)
    layers = sorted({m.layer for m in mods if m.layer is not None})
    fig, (ax_map, ax_sv) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw={"width_ratios": [1.15, 1]})
    fig.suptitle(f"{Path(report.adapter).name}: {len(report.modules)} modules — suggested rank {report.suggested_rank}",
                 fontsize=12, fontweight="bold")
    if layers:
        grid = [[math.nan] * len(layers) for _ in types]
        for m in mods:
            if m.layer is not None and m.effective_rank is not None:
                grid[types.index(m.type)][layers.index(m.layer)] = m.effective_rank
        top = max((m.rank for m in mods), default=1)
        im = ax_map.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=top, interpolation="nearest")
        ax_map.set_yticks(range(len(types)), types)
        step = max(1, len(layers) // 16)
        ax_map.set_xticks(range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)])
        ax_map.set_xlabel("layer")
        fig.colorbar(im, ax=ax_map, label="effective rank exp(H)")
    else:
        ax_map.axis("off")
        ax_map.text(0.5, 0.5, "no layer indices in module names", ha="center", va="center")
    ax_map.set_title("Effective rank by layer and module type")
    colors = plt.get_cmap("tab10")
    for n, t in enumerate(types):
        group = [m for m in mods if m.type == t]
        for m in group:
            top_sv = m.singular_values[0] or 1.0
            ax_sv.plot(range(1, len(m.singular_values) + 1), [s / top_sv if s > 0 else math.nan for s in m.singular_values],
                       color=colors(n % 10), alpha=0.15, linewidth=0.8)
        k = min(len(m.singular_values) for m in group)
        mean = [sum(m.singular_values[i] / (m.singular_values[0] or 1.0) for m in group) / len(group) for i in range(k)]
        ax_sv.plot(range(1, k + 1), mean, color=colors(n % 10), linewidth=2.2, label=f"{t} (mean of {len(group)})")
    ax_sv.set_yscale("log")
    ax_sv.set_xlabel("singular value index i")
    ax_sv.set_ylabel("σᵢ / σ₁")
    ax_sv.set_title("Normalized spectra of ΔW = s·B·A")
    ax_sv.grid(True, which="both", alpha=0.3)
    ax_sv.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def summary_line(op: str, r: Any) -> str:
    """The one line a writing command prints when it succeeds."""
    mb = lambda n: f"{n / 1e6:.1f} MB"  # noqa: E731
    if op == "merge":
        if r.dry_run:
            lines = [f"{ch['tensor']}: " + "; ".join(ch["ops"]) for ch in r.changes]
            return "\n".join(lines + [f"dry run: {r.modules_merged} modules would be merged into {r.tensors_changed} tensors; nothing written"])
        line = (f"merged {r.modules_merged} modules; wrote {r.tensors_written} tensors ({mb(r.bytes_written)}, "
                f"{r.shards} shard(s)) to {r.output} in {r.seconds:.1f}s")
        if r.changed_share is None:
            return line
        kept = "" if r.survived is None else f"; ‖W' − W‖/‖ΔW‖ = {r.survived:.4g}"
        return line + f"\nΔW after rounding: {r.changed_share:.2%} of the merged tensors' elements changed{kept}"
    if op == "unmerge":
        return f"unmerged {r.modules_unmerged} modules from {r.tensors_changed} tensors; wrote {mb(r.bytes_written)} to {r.output} in {r.seconds:.1f}s"
    if op == "quantize":
        return f"quantized {r.tensors_quantized} weights to NF4; wrote {mb(r.bytes_written)} to {r.output} in {r.seconds:.1f}s"
    if op == "dequantize":
        return f"dequantized {r.tensors_quantized} NF4 weights; wrote {mb(r.bytes_written)} to {r.output} in {r.seconds:.1f}s"
    if op == "rescale":
        return f"rescaled {r.modules} modules ({'rsLoRA' if r.use_rslora else 'standard'}{', baked' if r.baked else ''}) into {r.output}"
    if op == "rerank":
        return f"reranked {len(r.modules)} modules into {r.output}; Frobenius norm retained {r.retained_fro:.4f}"
    if op == "stack":
        kept = f"; energy kept ≥ {r.min_energy:.4f} per module" if r.min_energy is not None else ""
        return f"stacked {r.modules} modules ({r.method}, {r.compat}) into {r.output}{kept}"
    if op == "extract":
        return (f"extracted {len(r.modules)} modules into {r.output}; Frobenius norm of ΔW retained {r.retained_fro:.4f}"
                + (f"; {r.unchanged} chosen weights were unchanged" if r.unchanged else ""))
    if op == "convert":
        if r.engine is None:
            head = f"converted {len(r.modules)} modules from {r.from_format} to {r.to} into {r.output}"
        else:
            head = (f"converted {len(r.modules)} modules for {r.engine} {r.release}"
                    + (f" from {r.from_format}" if r.from_format != "peft" else "") + (f" as {r.to}" if r.to != "peft" else "")
                    + f" into {r.output} (rank {r.rank}; largest relative error {r.max_relative_error:.3g}; check: {r.check})")
        return head + "".join(f"\n  {c}" for c in r.changes)
    raise KeyError(op)


def render_check(r: Any) -> str:
    """One line per finding (severity, rule, what, fix, source), then the verdict."""
    shown = {"refused": "REFUSED", "ignored": "IGNORED SILENTLY", "served_differently": "SERVED DIFFERENTLY", "fine": "fine"}
    lines = [f"{r.adapter} for {r.engine} {r.release}" + (f" (base {r.base})" if r.base else "") + ":"]
    for f in r.findings:
        lines.append(f"  {shown[f['severity']]}: {f['rule']}: {f['message']}")
        if f["fix"]:
            lines.append(f"      fix: {f['fix']}")
        lines.append(f"      source: {f['source']}")
    if not r.findings:
        lines.append("  nothing in this adapter is handled differently from PEFT")
    lines.append(f"verdict: {shown[r.verdict]}" + ("" if r.ok else " (exit 1)"))
    return "\n".join(lines) + "\n"


def render_diff(r: DiffResult, atol: float, rtol: float) -> str:
    """What differs, at most 20 tensors by name, then the verdict."""
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
    return "\n".join(lines) + "\n"


def _value(key: str, value: object) -> str:
    """One inspect summary value as a person reads it (no Python reprs)."""
    if key == "provenance" and isinstance(value, dict):
        return f"{value.get('op')} by adapterops {value.get('adapterops')} (key {str(value.get('key'))[:12]})"
    if isinstance(value, dict):
        if key == "nf4":
            value = {k: v for k, v in value.items() if k != "quantization_config"}
        return ", ".join(f"{k}: {_value(k, v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(key, v) for v in value)
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def render_inspect(r: InspectResult) -> str:
    """What the path is, its summary one key a line, and the scan's outcome."""
    lines = [f"{r.path}: {r.kind}" + (f" ({r.summary['variant']})" if r.kind == "adapter" else "")]
    for key, value in r.summary.items():
        if key == "variant" or value in (None, [], {}):
            continue
        lines.append(f"  {key}: {_value(key, value)}")
    if r.scanned is not None:
        bad = sum("NaN or Inf" in w for w in r.warnings)
        lines.append(f"  scan: {r.scanned} tensors read, " + (f"{bad} with NaN/Inf" if bad else "no NaN/Inf found"))
    return "\n".join(lines + [f"warning: {w}" for w in r.warnings]) + "\n"


def render_batch(r: BatchResult) -> str:
    """One row per task, its error under it, then the counts."""
    width = max([len(t.task) for t in r.tasks] + [4])
    lines = [f"{'task'.ljust(width)}  {'op':<10} {'status':<8} {'seconds':>8}  output"]
    for t in r.tasks:
        lines.append(f"{t.task.ljust(width)}  {t.op:<10} {t.status:<8} {t.seconds:8.1f}  {t.output}")
        if t.error:
            lines.append(f"{''.ljust(width)}  error: {t.error}")
    counts = ", ".join(f"{n} {s}" for s, n in sorted(r.counts.items()))
    return "\n".join(lines + [f"{len(r.tasks)} tasks: {counts or 'none'}"]) + "\n"
