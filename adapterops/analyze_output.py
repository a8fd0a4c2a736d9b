"""Showing an `AnalyzeReport`: a readable table for the terminal, and a PNG for a report (matplotlib, optional)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

from adapterops.analyze import AnalyzeReport, ModuleReport
from adapterops.errors import AdapteropsError
from adapterops.io.atomic import atomic_file


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


def render_table(report: AnalyzeReport, all_rows: bool = False) -> str:
    """The report as text: a header, a table by module type (or every module), a compact table by layer, warnings."""
    mods = report.modules
    with_base = report.base is not None
    with_cmp = report.compare is not None
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
    headers += ["φ top-1", "φ all"] if with_cmp else []
    rows = []
    if all_rows:
        for m in mods:
            row = [m.name, str(m.rank), _fmt(m.fro), _fmt(m.stable_rank), _fmt(m.effective_rank), _fmt(m.r90), _fmt(m.r99)]
            row += [_fmt(m.relative_update), _fmt(m.amplification)] if with_base else []
            row += _phi_cells(m) if with_cmp else []
            rows.append(row)
    else:
        for t, s in report.by_type.items():
            row = [t, str(s["modules"]), _fmt(s["rank"]), _fmt(s["fro_mean"]), _fmt(s["stable_rank_mean"]),
                   _fmt(s["effective_rank_mean"]), _fmt(s["r90_max"]), _fmt(s["r99_max"])]
            row += [_fmt(s["relative_update_mean"]), _fmt(s["amplification_mean"])] if with_base else []
            row += _phi_cells(None, [m.similarity for m in mods if m.type == t and m.similarity]) if with_cmp else []
            rows.append(row)
    out += _table(headers, rows)
    if not all_rows:
        out.append("(means over modules of each type; r90/r99: the largest; --all for every module)")
    if len(report.by_layer) > 1:
        cells = "  ".join(f"{k}:{_fmt(v['effective_rank_mean'], 2)}/{_fmt(v['r99_max'])}" for k, v in report.by_layer.items())
        out += ["", "by layer (layer:mean effective rank/max r99):"]
        out += textwrap.wrap(cells, width=100, initial_indent="  ", subsequent_indent="  ")
    out += [""] + [f"warning: {w}" for w in report.warnings] if report.warnings else []
    return "\n".join(out).rstrip() + "\n"


def render_plot(report: AnalyzeReport, path: Path) -> None:
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
