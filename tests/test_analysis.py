"""Sensitivity analysis on tiny models with synthetic data: the fast engine must equal the naive one exactly."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

from dnnprune.analysis import (_Job, _share, analyze, grid_csv, plan_analysis, sensitivity_order, spearman,
                               suggested_ratio, write_outputs)
from dnnprune.checkpoint import CheckpointMeta, attach_meta
from dnnprune.data import make_loader
from dnnprune.errors import PruningError, RecipeError
from dnnprune.models import create_model
from dnnprune.recipe import AnalyzeSection
from dnnprune.surgery import ChannelGraph
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


def _data(shape: tuple[int, int, int], n: int, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, *shape, generator=generator), torch.randint(0, 10, (n,), generator=generator))


def _cells(report: dict) -> list:
    return [(layer["name"], [(c["ratio"], c["removed"], c["top1"], c["top5"], c["loss"], c["params"], c["macs"])
                             for c in layer["cells"]]) for layer in report["layers"]]


@pytest.fixture(scope="module")
def lenet() -> torch.nn.Module:
    return _model("lenet5", (1, 28, 28))


@pytest.mark.parametrize("arch, shape, ratios, samples, channels_last", [
    ("lenet5", (1, 28, 28), [0.25, 0.5, 0.9], 40, False),  # batches of 16 + 16 + 8: a short last batch
    ("lenet5", (1, 28, 28), [0.25, 0.5, 0.9], 40, True),
    ("resnet20", (1, 8, 8), [0.5, 0.9], 40, False),  # residual coupling: cached activations, no channel selection
    ("vgg11_bn", (1, 32, 32), [0.5], 20, True),  # conv -> BN -> ReLU -> pool chains: channel selection
])
def test_fast_engine_equals_naive_exactly(arch: str, shape: tuple[int, int, int], ratios: list[float], samples: int,
                                          channels_last: bool) -> None:
    model = _model(arch, shape)
    config = AnalyzeSection(ratios=ratios, batch_size=16, channels_last=channels_last, winograd=False)
    data = _data(shape, samples)
    naive = analyze(model, config, data, strategy="naive")
    for strategy in ("restore", "cache", "fast"):
        report = analyze(model, config, data, strategy=strategy)
        assert _cells(report) == _cells(naive), strategy
        assert report["order"] == naive["order"]
    routes = report["timing"]["evaluations_by_route"]
    assert report["timing"]["prefix_cache"] and routes["from_cache"] + routes["selected"] > 0
    if arch != "resnet20":
        assert routes["selected"] > 0


def test_naive_cell_is_a_real_pruned_copy_evaluated_like_everything_else(lenet: torch.nn.Module) -> None:
    config = AnalyzeSection(ratios=[0.5], batch_size=16, channels_last=False, layers=["features.3"])
    data = _data((1, 28, 28), 40)
    report = analyze(lenet, config, data)
    pruned = copy.deepcopy(lenet)
    graph = ChannelGraph(pruned, (1, 28, 28))
    scores = graph.importance("features.3", "l1")
    graph.prune({"features.3": graph.choose("features.3", scores, 8)})
    expected = evaluate(pruned, make_loader(data, 16))
    cell = report["layers"][0]["cells"][0]
    assert (cell["removed"], cell["top1"], cell["loss"]) == (8, expected.top1, expected.loss)
    assert report["baseline"]["top1"] == evaluate(lenet, make_loader(data, 16)).top1


def test_input_model_is_untouched(lenet: torch.nn.Module) -> None:
    before = {k: v.clone() for k, v in lenet.state_dict().items()}
    shapes = {k: v.shape for k, v in before.items()}
    analyze(lenet, AnalyzeSection(ratios=[0.5, 0.9], batch_size=16), _data((1, 28, 28), 32))
    after = lenet.state_dict()
    assert {k: v.shape for k, v in after.items()} == shapes
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert lenet.features[0].out_channels == 6


def test_report_contract(lenet: torch.nn.Module) -> None:
    config = AnalyzeSection(ratios=[0.3, 0.6], batch_size=16, budget=0.05)
    report = analyze(lenet, config, _data((1, 28, 28), 32))
    assert report["model"]["arch"] == "lenet5" and len(report["model"]["fingerprint"]) == 64
    assert report["model"]["groups"] == [["features.0", 6], ["features.3", 16], ["classifier.1", 120],
                                         ["classifier.3", 84]]
    assert (report["criterion"], report["granularity"], report["split"]) == ("l1", "filter", "val")
    assert report["samples"] == 32
    assert report["ratios"] == [0.3, 0.6] and report["budget"] == 0.05
    assert set(report["baseline"]) >= {"top1", "loss"}
    for layer in report["layers"]:
        assert set(layer) >= {"name", "type", "width", "params", "macs", "cells", "sensitivity", "suggested_ratio"}
        assert [c["ratio"] for c in layer["cells"]] == [0.3, 0.6]
        assert all(set(c) >= {"ratio", "top1", "loss", "removed"} for c in layer["cells"])
        drops = [report["baseline"]["top1"] - c["top1"] for c in layer["cells"]]
        assert layer["sensitivity"] == pytest.approx(sum(drops) / len(drops))
    sensitivities = {l["name"]: l["sensitivity"] for l in report["layers"]}
    ordered = [sensitivities[name] for name in report["order"]]
    assert sorted(report["order"]) == sorted(sensitivities) and ordered == sorted(ordered)
    assert set(report["timing"]) >= {"seconds", "cells", "seconds_per_cell", "processes"}
    assert report["timing"]["cells"] == 8
    json.dumps(report)


def test_suggested_ratio_is_the_largest_ratio_within_budget() -> None:
    cells = [{"ratio": 0.1, "top1": 0.90}, {"ratio": 0.2, "top1": 0.89}, {"ratio": 0.3, "top1": 0.80},
             {"ratio": 0.4, "top1": 0.895}]
    assert suggested_ratio(cells, 0.90, 0.01) == 0.4
    assert suggested_ratio(cells, 0.90, 0.0) == 0.1
    assert suggested_ratio(cells, 0.95, 0.01) == 0.0


def test_order_is_ascending_sensitivity_with_deterministic_ties() -> None:
    layers = [{"name": name, "sensitivity": s, "loss_increase": loss}
              for name, s, loss in [("a", 0.2, 0.1), ("b", 0.0, 0.3), ("c", 0.0, 0.1), ("d", 0.0, 0.1)]]
    assert sensitivity_order(layers) == ["c", "d", "b", "a"]


def test_spearman_with_ties() -> None:
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # ranks (1, 2.5, 2.5, 4) vs (1, 3, 2, 4): Pearson of the ranks = 4.5 / sqrt(4.5 * 5)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / (4.5 * 5) ** 0.5)


def test_cells_are_shared_out_by_cost_and_all_covered() -> None:
    jobs = [_Job(f"layer{i % 4}", i, (i,)) for i in range(10)]
    cost = {job: float(i + 1) for i, job in enumerate(jobs)}
    shares = _share(jobs, cost.__getitem__, 3)
    assert sorted(j.removed for share in shares for j in share) == list(range(10))
    loads = [sum(cost[j] for j in share) for share in shares]
    assert max(loads) - min(loads) <= max(cost.values())
    assert shares == _share(list(reversed(jobs)), cost.__getitem__, 3)


def test_outputs_written_next_to_the_json(tmp_path: Path, lenet: torch.nn.Module) -> None:
    body = analyze(lenet, AnalyzeSection(ratios=[0.5, 0.8], batch_size=16), _data((1, 28, 28), 32))
    paths = write_outputs(body, tmp_path / "lenet.analysis.json")
    assert paths["csv"] == tmp_path / "lenet.analysis.csv" and paths["png"] == tmp_path / "lenet.analysis.png"
    assert json.loads(paths["json"].read_text())["order"] == body["order"]
    rows = list(csv.DictReader(paths["csv"].open()))
    assert len(rows) == 4 * 2 and set(rows[0]) >= {"layer", "ratio", "top1", "top5", "loss"}
    assert paths["csv"].read_text() == grid_csv(body)
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_requests_fail_before_any_data_is_loaded(lenet: torch.nn.Module) -> None:
    def no_data() -> TensorDataset:
        raise AssertionError("data must not be loaded for a bad request")

    with pytest.raises(RecipeError, match="granularity"):
        analyze(lenet, AnalyzeSection(granularity="layer"), no_data)
    with pytest.raises(RecipeError, match="taylor"):
        analyze(lenet, AnalyzeSection(criterion="taylor"), no_data)
    with pytest.raises(RecipeError, match="nope"):
        analyze(lenet, AnalyzeSection(layers=["nope*"]), no_data)
    with pytest.raises(PruningError, match="no prunable layer"):
        analyze(_model("mlp", (1, 28, 28), hidden=[]), AnalyzeSection(), no_data)


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
    report = analyze(lenet, AnalyzeSection(ratios=[0.05, 0.5], batch_size=16, layers=["features.0"]),
                     _data((1, 28, 28), 32))
    first = report["layers"][0]["cells"][0]
    assert first["removed"] == 0  # round(0.05 * 6) == 0
    assert (first["top1"], first["loss"]) == (report["baseline"]["top1"], report["baseline"]["loss"])
    assert first["params"] == sum(p.numel() for p in lenet.parameters())


def test_winograd_cells_equal_naive_to_float_rounding() -> None:
    shape = (1, 32, 32)
    model = _model("vgg11_bn", shape)  # 256-512 channels on 8x8 / 4x4 / 2x2 maps: Winograd-eligible
    data = _data(shape, 20)
    naive = analyze(model, AnalyzeSection(ratios=[0.5], batch_size=16, winograd=False), data, strategy="naive")
    fast = analyze(model, AnalyzeSection(ratios=[0.5], batch_size=16), data)
    assert fast["timing"]["winograd_convs"] > 0
    assert fast["baseline"] == naive["baseline"], "the baseline keeps the direct convolution"
    for got, expected in zip(_cells(fast), _cells(naive)):
        assert got[0] == expected[0]
        for g, e in zip(got[1], expected[1]):
            assert g[:2] == e[:2] and g[5:] == e[5:]
            assert abs(g[2] - e[2]) <= 1 / 20 + 1e-12  # at most one near-tied sample may flip
            assert g[4] == pytest.approx(e[4], rel=1e-4)
