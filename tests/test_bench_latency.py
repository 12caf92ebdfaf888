"""bench/latency.py on two tiny checkpoints: the reference row is 1.00x, the pruned one has fewer MACs,
and the ratio column is speedup divided by MACs reduction."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import dnnprune
from dnnprune.pruning import prune
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
