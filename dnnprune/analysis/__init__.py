"""Sensitivity analysis: prune each layer alone over a ratio grid, measure the task's metrics, rank.

    model, report = dnnprune.analysis.analyze(model, AnalyzeSection(ratios=[0.3, 0.6]), data=DataSection())
    write_outputs(report, Path("model.analysis.json"))

- `command`: `analyze`, the library command (`@command("analyze")` shape), and the granularity dispatch;
- `engine`: the filter engine (prefix cache, channel selection, Winograd, the naive reference);
  `plan` fixes its cells, `trace` runs the model from any cut;
- `measurement`: what engines share (batches, cell evaluation through the task, their result);
- `report`: the typed `AnalyzeReport`, sensitivity, suggested ratios and the order;
- `outputs`: JSON, CSV and PNG; `stats`: Spearman's rank correlation.

Sharing the cells across torchrun processes lives in `dnnprune.distributed`.
"""

from dnnprune.analysis.command import analyze
from dnnprune.analysis.outputs import grid_csv, output_paths, plot_png, write_outputs
from dnnprune.analysis.plan import plan_analysis
from dnnprune.analysis.report import AnalyzeReport, sensitivity_order, suggested_ratio
from dnnprune.analysis.stats import spearman

__all__ = ["AnalyzeReport", "analyze", "grid_csv", "output_paths", "plan_analysis", "plot_png", "sensitivity_order",
           "spearman", "suggested_ratio", "write_outputs"]
