"""The analysis on disk: the JSON report, its cells as a CSV grid, and a plot of the primary metric."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from dnnprune.analysis.report import AnalyzeReport
from dnnprune.checkpoint import atomic_write_bytes
from dnnprune.reports import envelope, write_report


def output_paths(json_path: Path) -> dict[str, Path]:
    """The JSON report plus its CSV grid and PNG plot, side by side."""
    return {"json": json_path, "csv": json_path.with_suffix(".csv"), "png": json_path.with_suffix(".png")}


def grid_csv(report: AnalyzeReport) -> str:
    """layer,ratio,removed,<the task's metrics>,params,macs: one row per cell; an undefined value is empty."""
    names = report.metric_names()
    lines = [",".join(["layer", "ratio", "removed", *names, "params", "macs"])]
    for layer in report.layers:
        for cell in layer.cells:
            values = cell.metrics()
            row = [layer.name, repr(cell.ratio), str(cell.removed), *(_field(values.get(n)) for n in names),
                   str(cell.params), str(cell.macs)]
            lines.append(",".join(row))
    return "\n".join(lines) + "\n"


def _field(value: Any) -> str:
    return "" if value is None else repr(value)


def plot_png(report: AnalyzeReport) -> bytes:
    """The primary metric vs ratio, one line per layer (no pyplot: no global state, no display needed)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale = 100.0 if report.higher_is_better else 1.0  # accuracy-like metrics are fractions: plot percent
    primary = report.primary_metric
    fig = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    base = _plotted(report.baseline.get(primary), scale)
    cmap = matplotlib.colormaps["tab20"]
    markers = "osD^v<>ph*"
    for i, layer in enumerate(report.layers):
        xs = [0.0] + [c.ratio for c in layer.cells]
        ys = [base] + [_plotted(c.metrics().get(primary), scale) for c in layer.cells]
        ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=3.5, linewidth=1.3,
                color=cmap(i % 20), label=layer.name)
    ax.axhline(_budget_line(report, base), color="grey", linestyle="--", linewidth=1, label=_budget_label(report))
    unit = " (%)" if report.higher_is_better else ""
    ax.set_xlabel("fraction of channels removed from the layer (pruned alone, no fine-tuning)")
    ax.set_ylabel(f"{primary} on {report.samples} {report.split} samples{unit}")
    ax.set_title(f"{report.model.arch}: sensitivity to pruning ({report.criterion} criterion)")
    ax.set_xlim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 if len(report.layers) <= 22 else 2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plotted(value: float | None, scale: float) -> float:
    return float("nan") if value is None else float(value) * scale


def _budget_line(report: AnalyzeReport, base: float) -> float:
    """Where the budget lies: points below an accuracy-like baseline, a relative increase above an error."""
    if report.higher_is_better:
        return base - report.budget * 100
    return base * (1 + report.budget)


def _budget_label(report: AnalyzeReport) -> str:
    if report.higher_is_better:
        return f"budget: {report.budget * 100:g} pt below baseline"
    return f"budget: {report.budget * 100:g} % above baseline"


def write_outputs(report: AnalyzeReport, json_path: Path, *, inputs: dict[str, Any] | None = None) -> dict[str, Path]:
    """The JSON report (in the common envelope), CSV and PNG, each written atomically; everything is
    rendered before anything is written, so a failure leaves no partial set."""
    paths = output_paths(Path(json_path))
    payload = envelope("analyze", report, inputs=inputs)
    csv_bytes, png_bytes = grid_csv(report).encode(), plot_png(report)
    write_report(paths["json"], payload)
    atomic_write_bytes(paths["csv"], csv_bytes)
    atomic_write_bytes(paths["png"], png_bytes)
    return paths
