"""bench/prune_compare.py with a depth stage, on a tiny ResNet and generated Fashion-MNIST files.

The real run takes most of an hour per seed; this runs the same code for a few steps and checks what
the benchmark promises: blocks removed first, the channel target counted from the original, and a
control that replays every fine-tune phase the pruned model received, the depth stage's included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import dnnprune
from dnnprune.metrics import count_macs
from tests.conftest import bench_module, make_checkpoint
from tests.test_bench_sweep import _write_fashion


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_depth_then_channels_against_a_control_that_replays_every_phase(tmp_path: Path) -> None:
    data = {"dataset": "fashion-mnist", "root": str(_write_fashion(tmp_path / "data")), "val_fraction": 0.2,
            "batch_size": 64}
    tune = {"max_steps": 2, "batch_size": 16, "lr": 0.01}
    channels = {"data": data, "analyze": {"ratios": [0.5], "samples": 40},
                "prune": {"criterion": "l1", "target": "macs", "target_factor": 2.5, "order": "sensitivity",
                          "analysis": "unused-the-bench-writes-its-own.json", "accuracy_aware": True,
                          "strategy": "increments", "increments": 2, "max_accuracy_drop": 1.0, "val_samples": 40,
                          "step_finetune": tune, "finetune": {**tune, "max_steps": 3}}}
    depth = {"data": data, "prune": {"granularity": "layer", "remove": 2, "order": "sequential", "finetune": tune}}
    (tmp_path / "channels.yaml").write_text(yaml.safe_dump(channels))
    (tmp_path / "depth.yaml").write_text(yaml.safe_dump(depth))
    checkpoint = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    out = tmp_path / "out"

    bench = bench_module("prune_compare.py")
    args = [str(checkpoint), "-r", str(tmp_path / "channels.yaml"), "--depth-recipe", str(tmp_path / "depth.yaml"),
            "--split", "val", "--arms", "dnnprune,control,tp", "--latency-repeats", "2", "--out", str(out)]
    bench.main(args)

    result = json.loads((out / "result.json").read_text())
    rows = {row["arm"]: row for row in result["rows"]}
    ours = rows["dnnprune"]
    assert ours["depth"]["removed"] == ["layer1.0", "layer1.1"]
    assert ours["macs_reduction"] >= 2.5 and ours["target_met"]
    # depth fine-tune 2 + two increments of 2 + final 3: all of it replayed by the control, given to the anchor
    assert ours["finetune_steps_received"] == rows["control"]["finetune_steps_received"] == 9
    assert rows["tp"]["finetune_steps_received"] == 9
    baseline = dnnprune.load(checkpoint)
    gaps = [abs(sum(count_macs(bench.torch_pruning_uniform(baseline, r / 20, 1), (1, 32, 32)).values()) - ours["macs"])
            for r in range(20)]
    assert abs(rows["tp"]["macs"] - ours["macs"]) <= min(gaps)  # the anchor sits at the MACs nearest ours
    assert rows["control"]["macs"] == rows["baseline"]["macs"]
    assert (out / "depth-seed0.analysis.json").exists() and {r["batch_size"] for r in result["latency"]} == {1, 64}
    saved_anchor = dnnprune.load(out / "tp-seed0.safetensors")  # kept for idle re-timing: the anchor's own widths
    assert sum(count_macs(saved_anchor, (1, 32, 32)).values()) == rows["tp"]["macs"]

    # --reuse-arms: the anchor alone is redone; the other arms' rows come back unchanged from result.json
    bench.main([*args, "--reuse-arms", "dnnprune,control"])
    again = {row["arm"]: row for row in json.loads((out / "result.json").read_text())["rows"]}
    assert again["dnnprune"]["value"] == ours["value"] and again["control"]["value"] == rows["control"]["value"]
    assert again["dnnprune"]["seconds"] == ours["seconds"] and again["tp"]["seconds"] != rows["tp"]["seconds"]
    with pytest.raises(SystemExit, match="needs control reused too"):
        bench.main([*args, "--reuse-arms", "dnnprune"])
