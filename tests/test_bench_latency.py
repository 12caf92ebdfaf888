"""bench/latency.py on two tiny checkpoints: the reference row is 1.00x, the pruned one has fewer MACs,
and the ratio column is speedup divided by MACs reduction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dnnprune
from dnnprune.pruning import prune
from dnnprune.pruning.structured import model_size
from dnnprune.recipe import DataSection, PruneSection
from tests.conftest import bench_module, make_checkpoint


def test_latency_rows_compare_every_model_with_the_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = make_checkpoint(tmp_path / "base.safetensors", "lenet5", input_shape=(1, 28, 28))
    pruned, _ = prune(dnnprune.load(base), PruneSection(ratio=0.5, evaluate=False), data=DataSection())
    small = dnnprune.save(pruned, tmp_path / "small.safetensors")
    out = tmp_path / "latency.json"
    bench_module("latency.py").main([str(base), str(small), "--batches", "1,4", "--repeats", "3", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(Path(r["model"]).name, r["batch"]) for r in rows] == [
        ("base.safetensors", 1), ("small.safetensors", 1), ("base.safetensors", 4), ("small.safetensors", 4)]
    for row in rows:
        assert row["median_ms"] > 0
        assert row["speedup_per_macs_reduction"] == pytest.approx(row["speedup"] / row["macs_reduction"])
    assert rows[0]["speedup"] == 1.0 and rows[1]["macs_reduction"] > 1.5
    assert "| small.safetensors | eager | 4 |" in capsys.readouterr().out


def test_latency_rows_per_runtime(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "base.safetensors", "lenet5", input_shape=(1, 28, 28))
    out = tmp_path / "latency.json"
    bench_module("latency.py").main([str(base), "--batches", "2", "--repeats", "2", "--runtimes", "eager,fused",
                                     "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["runtime"], r["batch"]) for r in rows] == [("eager", 2), ("fused", 2)]
    assert all(r["median_ms"] > 0 and r["speedup"] == 1.0 for r in rows)


def test_resnet18_parts_time_every_part_and_block_removal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/resnet18_parts.py on an untrained resnet18 and a half-width copy: 10 parts per batch size,
    MACs per part that add up to the model's, and block removal that only ever removes MACs."""
    base = make_checkpoint(tmp_path / "base.safetensors", "torchvision.resnet18", input_shape=(1, 32, 32))
    pruned, _ = prune(dnnprune.load(base), PruneSection(ratio=0.5, evaluate=False), data=DataSection())
    small = dnnprune.save(pruned, tmp_path / "small.safetensors")
    bench_module("resnet18_parts.py").main([str(small), "--baseline", str(base), "--repeats", "1"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    parts = [row for row in lines if "part" in row]
    assert [row["part"] for row in parts[:10]] == ["stem", *[f"layer{i}.{j}" for i in range(1, 5) for j in range(2)],
                                                   "head"]
    assert len(parts) == 20 and all(row["base_ms"] > 0 and row["pruned_ms"] > 0 for row in parts)
    whole = dnnprune.load(base)
    assert sum(row["base_macs"] for row in parts[:10]) == model_size(whole, (1, 32, 32))["macs"]
    variants = [row for row in lines if "variant" in row]
    assert len(variants) == 8
    macs = [row["macs_x"] for row in variants[::2]]
    assert macs == sorted(macs) and macs[0] > 2.0
    assert all(row["ratio"] == pytest.approx(row["speedup"] / row["macs_x"], rel=0.01) for row in variants)


def test_resnet18_depth_width_designs_have_the_shapes_they_name(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/resnet18_depth_width.py: a removed stage takes its width with it, cuts remove MACs, and the
    ratio is the speedup over the MACs reduction, for every design at both batch sizes."""
    base = make_checkpoint(tmp_path / "base.safetensors", "torchvision.resnet18", input_shape=(1, 32, 32))
    bench = bench_module("resnet18_depth_width.py")
    whole = bench.variant(dnnprune.load(base), [], [1] * 4, [1] * 4)
    assert model_size(whole, (1, 32, 32))["macs"] == model_size(dnnprune.load(base), (1, 32, 32))["macs"]
    no_layer4 = bench.variant(dnnprune.load(base), ["layer4.0", "layer4.1"], [0.5] * 4, [0.75] * 4)
    assert no_layer4.fc.in_features == 192 and no_layer4.layer1[0].conv1.out_channels == 32
    designs = [{"remove": ["layer4.1"]}, {"remove": ["layer3.1", "layer4.0", "layer4.1"], "mid": [0.5] * 4, "res": [0.75] * 4}]
    bench.main([str(base), json.dumps(designs), "--repeats", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["batch"], r["design"]) for r in rows] == [(64, designs[0]), (64, designs[1]), (1, designs[0]), (1, designs[1])]
    assert 1.0 < rows[0]["macs_x"] < rows[1]["macs_x"]
    assert all(r["ratio"] == pytest.approx(r["speedup"] / r["macs_x"]) and r["ms"] > 0 for r in rows)


def test_pairwise_rows_time_each_model_with_the_reference_alone(tmp_path: Path) -> None:
    base = make_checkpoint(tmp_path / "base.safetensors", "lenet5", input_shape=(1, 28, 28))
    smalls = []
    for ratio in (0.3, 0.6):
        pruned, _ = prune(dnnprune.load(base), PruneSection(ratio=ratio, evaluate=False), data=DataSection())
        smalls.append(dnnprune.save(pruned, tmp_path / f"small{ratio}.safetensors"))
    out = tmp_path / "latency.json"
    bench_module("latency.py").main([str(base), *map(str, smalls), "--batches", "2", "--repeats", "3", "--pairwise",
                                     "--out", str(out)])
    report = json.loads(out.read_text())
    rows = report["rows"]
    assert report["models_per_run"] == 2 and [Path(r["model"]).name for r in rows] == [
        "base.safetensors", "small0.3.safetensors", "small0.6.safetensors"]
    assert rows[0]["speedup"] == 1.0 and rows[0]["median_ms"] == rows[0]["reference_ms"]
    for row in rows[1:]:
        assert row["speedup"] == pytest.approx(row["reference_ms"] / row["median_ms"])
    # the reference row is the median of its readings, one per pair
    assert min(r["reference_ms"] for r in rows[1:]) <= rows[0]["reference_ms"] <= max(r["reference_ms"] for r in rows[1:])


def test_processes_combine_into_medians_with_their_range(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`--processes 2` runs the measurement in two fresh processes and reports, per row, the median ratio and
    each process's own."""
    base = make_checkpoint(tmp_path / "base.safetensors", "lenet5", input_shape=(1, 28, 28))
    pruned, _ = prune(dnnprune.load(base), PruneSection(ratio=0.5, evaluate=False), data=DataSection())
    small = dnnprune.save(pruned, tmp_path / "small.safetensors")
    out = tmp_path / "latency.json"
    bench_module("latency.py").main([str(base), str(small), "--batches", "2", "--repeats", "3", "--pairwise",
                                     "--processes", "2", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["processes"] == 2 and [Path(r["model"]).name for r in report["rows"]] == [
        "base.safetensors", "small.safetensors"]
    row = report["rows"][1]
    assert len(row["ratio_per_process"]) == 2 and row["ratio_range"] == [min(row["ratio_per_process"]),
                                                                          max(row["ratio_per_process"])]
    assert row["ratio_range"][0] <= row["speedup_per_macs_reduction"] <= row["ratio_range"][1]
    assert not list(tmp_path.glob("process*.json"))  # the children's files stay in a temporary folder
    assert "processes: 2" in capsys.readouterr().out


def test_over_processes_takes_medians_row_by_row() -> None:
    latency = bench_module("latency.py")

    def row(ms: float, ref: float, ratio: float) -> dict[str, object]:
        return {"model": "m", "runtime": "fused", "batch": 64, "median_ms": ms, "reference_ms": ref,
                "speedup": ref / ms, "macs_reduction": 4.0, "speedup_per_macs_reduction": ratio}

    runs = [[row(5.0, 20.0, 1.0)], [row(6.0, 21.0, 0.875)], [row(7.0, 19.0, 0.68)]]
    [combined] = latency.over_processes(runs)
    assert combined["median_ms"] == 6.0 and combined["reference_ms"] == 20.0
    assert combined["speedup_per_macs_reduction"] == 0.875 and combined["ratio_range"] == [0.68, 1.0]
    assert latency.without_option(["a", "--out", "x", "--processes=3", "--pairwise"], "--out", "--processes") == [
        "a", "--pairwise"]
