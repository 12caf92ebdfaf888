"""Sensitivity analysis on tiny models with synthetic data: the fast engine must equal the naive one exactly."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils.data import TensorDataset

from dnnprune.analysis import (
    AnalyzeReport,
    analyze,
    grid_csv,
    plan_analysis,
    sensitivity_order,
    spearman,
    suggested_ratio,
    write_outputs,
)
from dnnprune.analysis import command as analysis_command
from dnnprune.analysis.engine import Job
from dnnprune.analysis.report import LayerReport
from dnnprune.checkpoint import CheckpointMeta, attach_meta
from dnnprune.data import make_loader
from dnnprune.distributed import backend_for, gather, share_by_cost
from dnnprune.errors import PruningError, RecipeError
from dnnprune.models import create_model
from dnnprune.observe import Observer
from dnnprune.recipe import AnalyzeSection
from dnnprune.surgery import ChannelGraph
from dnnprune.tasks import TaskSpec
from dnnprune.training import evaluate


def _model(arch: str, shape: tuple[int, int, int], **args: object) -> torch.nn.Module:
    """An untrained model with non-trivial BatchNorm statistics, so pruning changes the outputs."""
    torch.manual_seed(0)
    model = create_model(arch, num_classes=10, in_channels=shape[0], **args).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.copy_(torch.rand(module.num_features, generator=generator) * 0.2 - 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return attach_meta(model, CheckpointMeta(arch=arch, arch_args={}, input_shape=shape, dataset="synthetic"))


def _autoencoder(normal_classes: tuple[int, ...] = (0,)) -> torch.nn.Module:
    """An A2E anomaly detector: reconstruction task, class 0 normal, every other class an anomaly
    (without normal classes, a plain autoencoder scored by its MSE)."""
    torch.manual_seed(0)
    model = create_model("a2e", input_shape=(1, 4, 4), widths=[12, 6, 12], activation="tanh").eval()
    task = TaskSpec(kind="reconstruction", normal_classes=normal_classes)
    return attach_meta(model, CheckpointMeta(arch="a2e", arch_args={}, input_shape=(1, 4, 4), dataset="synthetic",
                                             task=task))


def _data(shape: tuple[int, ...], n: int, seed: int = 0, classes: int = 10) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=generator),
                         torch.randint(0, classes, (n,), generator=generator))


def _analyze(model: torch.nn.Module, section: AnalyzeSection, data: TensorDataset, **extra: Any) -> AnalyzeReport:
    returned, report = analyze(model, section, val_data=data, **extra)
    assert returned is model
    return report


def _cells(report: AnalyzeReport) -> list:
    return [(layer.name, [(c.ratio, c.removed, c.metrics(), c.params, c.macs) for c in layer.cells])
            for layer in report.layers]


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return _model("lenet5", (1, 28, 28))


@pytest.mark.parametrize(("arch", "shape", "ratios", "samples", "channels_last"), [
    ("lenet5", (1, 28, 28), [0.25, 0.5, 0.9], 40, False),  # batches of 16 + 16 + 8: a short last batch
    ("lenet5", (1, 28, 28), [0.25, 0.5, 0.9], 40, True),
    ("resnet20", (1, 8, 8), [0.5, 0.9], 40, False),  # residual coupling: cached activations, no channel selection
    ("vgg11_bn", (1, 32, 32), [0.5], 20, True),  # conv -> BN -> ReLU -> pool chains: channel selection
    ("torchvision.shufflenet_v2_x0_5", (3, 32, 32), [0.5], 20, False),  # routes that start at a tuple (chunk)
])
def test_fast_engine_equals_naive_exactly(arch: str, shape: tuple[int, int, int], ratios: list[float], samples: int,
                                          channels_last: bool) -> None:
    model = _model(arch, shape)
    section = AnalyzeSection(ratios=ratios, batch_size=16, channels_last=channels_last, winograd=False)
    data = _data(shape, samples)
    naive = _analyze(model, section, data, strategy="naive")
    for strategy in ("restore", "cache", "fast"):
        report = _analyze(model, section, data, strategy=strategy)
        assert _cells(report) == _cells(naive), strategy
        assert report.order == naive.order
    routes = report.timing.evaluations_by_route
    assert report.timing.prefix_cache and routes["from_cache"] + routes["selected"] > 0
    if arch in ("lenet5", "vgg11_bn"):  # plain chains: channel selection applies
        assert routes["selected"] > 0


def test_naive_cell_is_a_real_pruned_copy_evaluated_like_everything_else(lenet: torch.nn.Module) -> None:
    section = AnalyzeSection(ratios=[0.5], batch_size=16, channels_last=False, layers=["features.3"])
    data = _data((1, 28, 28), 40)
    report = _analyze(lenet, section, data)
    pruned = copy.deepcopy(lenet)
    graph = ChannelGraph(pruned, (1, 28, 28))
    scores = graph.importance("features.3", "l1")
    graph.prune({"features.3": graph.choose("features.3", scores, 8)})
    expected = evaluate(pruned, make_loader(data, 16))
    cell = report.layers[0].cells[0]
    assert cell.removed == 8 and cell.metrics() == expected.values
    assert report.baseline == evaluate(lenet, make_loader(data, 16)).as_dict()


def test_input_model_is_untouched(lenet: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    shapes = {k: v.shape for k, v in before.items()}
    _analyze(lenet, AnalyzeSection(ratios=[0.5, 0.9], batch_size=16), _data((1, 28, 28), 32))
    after = lenet.state_dict()
    assert {k: v.shape for k, v in after.items()} == shapes
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lenet.features[0].out_channels == 6


def test_report_contract(lenet: torch.nn.Module) -> None:
    section = AnalyzeSection(ratios=[0.3, 0.6], batch_size=16, budget=0.05)
    report = _analyze(lenet, section, _data((1, 28, 28), 32)).as_json()
    assert report["model"]["arch"] == "lenet5" and len(report["model"]["fingerprint"]) == 64
    assert report["model"]["groups"] == [["features.0", 6], ["features.3", 16], ["classifier.1", 120],
                                         ["classifier.3", 84]]
    assert (report["criterion"], report["granularity"], report["split"]) == ("l1", "filter", "val")
    assert (report["primary_metric"], report["higher_is_better"]) == ("top1", True)
    assert report["samples"] == 32 and report["dataset"] == "synthetic"
    assert report["ratios"] == [0.3, 0.6] and report["budget"] == 0.05
    assert set(report["baseline"]) == {"top1", "top5", "loss", "samples"}
    for layer in report["layers"]:
        assert set(layer) == {"name", "type", "width", "params", "macs", "members", "cells", "sensitivity",
                              "loss_increase", "suggested_ratio"}
        assert [c["ratio"] for c in layer["cells"]] == [0.3, 0.6]
        assert all(set(c) == {"ratio", "removed", "top1", "top5", "loss", "params", "macs"} for c in layer["cells"])
        drops = [report["baseline"]["top1"] - c["top1"] for c in layer["cells"]]
        assert layer["sensitivity"] == pytest.approx(sum(drops) / len(drops))
    sensitivities = {layer["name"]: layer["sensitivity"] for layer in report["layers"]}
    ordered = [sensitivities[name] for name in report["order"]]
    assert sorted(report["order"]) == sorted(sensitivities) and ordered == sorted(ordered)
    assert set(report["timing"]) >= {"seconds", "cells", "seconds_per_cell", "processes", "evaluations"}
    assert report["timing"]["cells"] == 8
    json.dumps(report)


def test_reconstruction_cells_carry_the_task_metrics_and_the_fast_engine_stays_exact() -> None:
    model = _autoencoder()
    data = _data((1, 4, 4), 48, classes=3)
    section = AnalyzeSection(ratios=[0.3, 0.6], batch_size=16, budget=0.02)
    fast = _analyze(model, section, data)
    naive = _analyze(model, section, data, strategy="naive")
    assert _cells(fast) == _cells(naive)
    assert (fast.primary_metric, fast.higher_is_better) == ("roc_auc", True)
    assert fast.baseline == evaluate(model, make_loader(data, 16)).as_dict()
    assert {"mse", "loss", "roc_auc", "pr_auc"} <= set(fast.layers[0].cells[0].metrics())
    for layer in fast.layers:
        drops = [fast.baseline["roc_auc"] - c.metrics()["roc_auc"] for c in layer.cells]
        assert layer.sensitivity == pytest.approx(sum(drops) / len(drops))
        assert layer.suggested_ratio == suggested_ratio([0.3, 0.6], drops, 0.02)
    header = grid_csv(fast).splitlines()[0].split(",")
    assert header[:3] == ["layer", "ratio", "removed"] and header[-2:] == ["params", "macs"]
    assert {"mse", "roc_auc", "pr_auc"} <= set(header)


def test_mse_sensitivity_is_a_relative_increase() -> None:
    model = _autoencoder(normal_classes=())  # no normal classes: MSE is primary
    report = _analyze(model, AnalyzeSection(ratios=[0.5], batch_size=16), _data((1, 4, 4), 32))
    assert (report.primary_metric, report.higher_is_better) == ("mse", False)
    base = report.baseline["mse"]
    for layer in report.layers:
        assert layer.sensitivity == pytest.approx((layer.cells[0].metrics()["mse"] - base) / base)


def test_suggested_ratio_is_the_largest_ratio_within_budget() -> None:
    ratios = [0.1, 0.2, 0.3, 0.4]
    drops = [0.0, 0.01, 0.1, 0.005]
    assert suggested_ratio(ratios, drops, 0.01) == 0.4
    assert suggested_ratio(ratios, drops, 0.0) == 0.1
    assert suggested_ratio(ratios, [d + 0.05 for d in drops], 0.01) == 0.0
    assert suggested_ratio([0.5], [float("nan")], 0.01) == 0.0


def _layer(name: str, sensitivity: float, loss: float) -> LayerReport:
    return LayerReport(name=name, type="Conv2d", width=4, params=1, macs=1, members=[name], cells=[],
                       sensitivity=sensitivity, loss_increase=loss, suggested_ratio=0.0)


def test_order_is_ascending_sensitivity_with_deterministic_ties() -> None:
    layers = [_layer(name, s, loss) for name, s, loss in
              [("a", 0.2, 0.1), ("b", 0.0, 0.3), ("c", 0.0, 0.1), ("d", 0.0, 0.1), ("e", float("nan"), 0.0)]]
    assert sensitivity_order(layers) == ["c", "d", "b", "a", "e"]


def test_spearman_with_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_cells_are_shared_out_by_cost_and_all_covered() -> None:
    jobs = [Job(f"layer{i % 4}", i, (i,)) for i in range(10)]
    cost = {job: float(i + 1) for i, job in enumerate(jobs)}

    def key(job: Job) -> tuple[str, int]:
        return job.layer, job.removed

    shares = share_by_cost(jobs, cost.__getitem__, 3, key=key)
    assert sorted(j.removed for share in shares for j in share) == list(range(10))
    loads = [sum(cost[j] for j in share) for share in shares]
    assert max(loads) - min(loads) <= max(cost.values())
    assert shares == share_by_cost(list(reversed(jobs)), cost.__getitem__, 3, key=key)


def test_distributed_helpers_for_a_plain_run() -> None:
    assert gather({"x": 1}, 1) == [{"x": 1}]
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 0)) == "nccl"


def test_outputs_written_next_to_the_json(tmp_path: Path, lenet: torch.nn.Module) -> None:
    report = _analyze(lenet, AnalyzeSection(ratios=[0.5, 0.8], batch_size=16), _data((1, 28, 28), 32))
    paths = write_outputs(report, tmp_path / "lenet.analysis.json", inputs={"checkpoint": "x.safetensors"})
    assert paths["csv"] == tmp_path / "lenet.analysis.csv" and paths["png"] == tmp_path / "lenet.analysis.png"
    written = json.loads(paths["json"].read_text())
    assert written["command"] == "analyze" and written["order"] == report.order
    assert written["inputs"] == {"checkpoint": "x.safetensors"}
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 * 2 and list(rows[0]) == ["layer", "ratio", "removed", "top1", "top5", "loss", "params",
                                                     "macs"]
    assert paths["csv"].read_text() == grid_csv(report)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class _Recorder(Observer):
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def begin(self, description: str, total: float) -> int:
        self.events.append(("begin", (description, total)))
        return 7

    def update(self, task: int, *, advance: float = 0.0, completed: float | None = None,
               total: float | None = None, info: str = "") -> None:
        self.events.append(("update", (task, completed, info)))

    def end(self, task: int, *, keep: bool = False) -> None:
        self.events.append(("end", task))


def test_progress_goes_through_the_observer_in_work_units(lenet: torch.nn.Module) -> None:
    observer = _Recorder()
    _analyze(lenet, AnalyzeSection(ratios=[0.5, 0.8], batch_size=16), _data((1, 28, 28), 32), observer=observer)
    kind, (description, total) = observer.events[0]
    assert (kind, description, total) == ("begin", "analyze", 8)  # cells, weighted by cost as they complete
    updates = [value for kind, value in observer.events if kind == "update"]
    assert all(task == 7 for task, _, _ in updates) and updates[-1] == (7, 8, "8/8 cells")
    done = [completed for _, completed, _ in updates]
    assert done == sorted(done) and len(set(done)) == 9 and observer.events[-1] == ("end", 7)


def test_bad_requests_fail_before_any_data_is_loaded(lenet: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_data(*_args: object) -> TensorDataset:
        raise AssertionError("data must not be loaded for a bad request")

    monkeypatch.setattr(analysis_command, "split_dataset", no_data)
    monkeypatch.setattr(analysis_command, "calibration_inputs", no_data)
    with pytest.raises(ValueError, match="granularity"):
        AnalyzeSection(granularity="channels")
    with pytest.raises(RecipeError, match="no removable unit"):
        analyze(lenet, AnalyzeSection(granularity="layer", layers=["nope*"]))
    with pytest.raises(RecipeError, match="taylor"):
        analyze(lenet, AnalyzeSection(criterion="taylor"))
    with pytest.raises(RecipeError, match="nope"):
        analyze(lenet, AnalyzeSection(layers=["nope*"]))
    with pytest.raises(PruningError, match="no prunable layer"):
        analyze(_model("mlp", (1, 28, 28), hidden=[]), AnalyzeSection())


def test_ratio_grid_validation() -> None:
    with pytest.raises(ValueError, match="empty"):
        AnalyzeSection(ratios=[])
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        AnalyzeSection(ratios=[0.5, 1.0])
    assert AnalyzeSection(ratios=[0.5, 0.1, 0.5]).ratios == [0.1, 0.5]


def test_plan_removes_nested_channel_sets(lenet: torch.nn.Module) -> None:
    plan = plan_analysis(copy.deepcopy(lenet), AnalyzeSection(ratios=[0.2, 0.5, 0.8]), (1, 28, 28))
    for layer in plan.layers:
        sets = [set(plan.indices[(layer, r)]) for r in (0.2, 0.5, 0.8)]
        assert sets[0] <= sets[1] <= sets[2]


def test_a_ratio_that_removes_nothing_measures_the_baseline(lenet: torch.nn.Module) -> None:
    report = _analyze(lenet, AnalyzeSection(ratios=[0.05, 0.5], batch_size=16, layers=["features.0"]),
                      _data((1, 28, 28), 32))
    first = report.layers[0].cells[0]
    assert first.removed == 0  # round(0.05 * 6) == 0
    assert {**first.metrics(), "samples": report.samples} == report.baseline
    assert first.params == sum(p.numel() for p in lenet.parameters())


def test_winograd_cells_equal_naive_to_float_rounding() -> None:
    shape = (1, 32, 32)
    model = _model("vgg11_bn", shape)  # 256-512 channels on 8x8 / 4x4 / 2x2 maps: Winograd-eligible
    data = _data(shape, 20)
    naive = _analyze(model, AnalyzeSection(ratios=[0.5], batch_size=16, winograd=False), data, strategy="naive")
    fast = _analyze(model, AnalyzeSection(ratios=[0.5], batch_size=16), data)
    assert fast.timing.winograd_convs > 0
    assert fast.baseline == naive.baseline, "the baseline keeps the direct convolution"
    for got, expected in zip(_cells(fast), _cells(naive)):
        assert got[0] == expected[0]
        for g, e in zip(got[1], expected[1]):
            assert g[:2] == e[:2] and g[3:] == e[3:]
            assert abs(g[2]["top1"] - e[2]["top1"]) <= 1 / 20 + 1e-12  # at most one near-tied sample may flip
            assert g[2]["loss"] == pytest.approx(e[2]["loss"], rel=1e-4)


def test_a_layer_analysis_refuses_options_that_only_shape_a_channel_analysis() -> None:
    """Each unit is removed whole: `--criterion taylor` or `--ratios` were recorded in the report and did nothing."""
    from dnnprune.analysis.command import _engine
    from dnnprune.errors import RecipeError
    from dnnprune.recipe import AnalyzeSection

    with pytest.raises(RecipeError, match="analyze.ratios, analyze.criterion shape a channel analysis"):
        _engine(AnalyzeSection(granularity="layer", ratios=[0.5], criterion="l2"))
    assert _engine(AnalyzeSection(granularity="layer", samples=100)) is not None
