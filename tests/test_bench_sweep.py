"""The double-pruning sweep (bench/double_prune.py --sweep) on two tiny BatchNorm nets and generated data.

The real sweep takes hours; this runs the same code on a 2 x 2 grid with a few steps, and checks the
controls (one per training budget), the table, the winner line and the PNG it writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import bench_module, make_checkpoint
from tests.fakedata import idx_bytes


def _write_fashion(root: Path, n_train: int = 400, n_test: int = 100) -> Path:
    """Fashion-MNIST's four IDX files in torchvision's layout, with class-dependent brightness to learn."""
    rng = np.random.default_rng(0)
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n, dtype=np.uint8) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19
        (raw / f"{split}-images-idx3-ubyte").write_bytes(idx_bytes(images.astype(np.uint8)))
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(idx_bytes(labels))
    return root


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_the_sweep_writes_a_table_a_winner_and_a_plot(tmp_path: Path) -> None:
    data = _write_fashion(tmp_path / "data")
    recipe = {"data": {"dataset": "fashion-mnist", "root": str(data), "val_fraction": 0.2, "batch_size": 64},
              "double_prune": {"sparsity_steps": 2, "finetune_steps": 4, "threshold": "global",
                               "finetune": {"batch_size": 16, "lr": 0.01}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    models = []
    for name, arch in (("resnet20", "resnet20"), ("mbv2", "mobilenetv2_cifar")):
        checkpoint = make_checkpoint(tmp_path / f"{name}.safetensors", arch, input_shape=(1, 32, 32))
        models.append({"name": name, "checkpoint": str(checkpoint), "recipe": str(tmp_path / "recipe.yaml")})
    plan = {"phases": {"finetune_steps": 3}, "slimming": [0.0, 0.4], "sparsity": [0.0, 0.6], "models": models}
    (tmp_path / "plan.yaml").write_text(yaml.safe_dump(plan))
    out = tmp_path / "sweep"

    bench = bench_module("double_prune.py")
    bench.main(["--sweep", str(tmp_path / "plan.yaml"), "--split", "val", "--out", str(out)])

    points = yaml.safe_load((out / "sweep.json").read_text())["points"]  # JSON is YAML
    # one control per distinct budget: sparsity alone trains 3 steps, slimming 2 + 3, both 2 + 3 + 3
    assert [(p["model"], p["arm"], p["slimming"], p["sparsity"], p["steps"]) for p in points] == [
        (m, *row) for m in ("resnet20", "mbv2") for row in (
            ("baseline", 0.0, 0.0, 0), ("control", 0.0, 0.0, 3), ("double-prune", 0.0, 0.6, 3),
            ("control", 0.0, 0.0, 5), ("double-prune", 0.4, 0.0, 5), ("control", 0.0, 0.0, 8),
            ("double-prune", 0.4, 0.6, 8))]
    for model in ("resnet20", "mbv2"):
        rows = [p for p in points if p["model"] == model]
        base, sparse, slim, both = [p for p in rows if p["arm"] in ("baseline", "double-prune")]
        controls = {p["steps"]: p for p in rows if p["arm"] == "control"}
        for point in (sparse, slim, both):
            assert point["drop_vs_control"] == pytest.approx(controls[point["steps"]]["top1"] - point["top1"])
        assert all(c["params"] == base["params"] for c in controls.values())
        assert sparse["params"] == base["params"] and sparse["nonzero_params"] < 0.5 * base["nonzero_params"]
        assert slim["params"] < base["params"] and slim["macs"] < base["macs"]
        assert both["nonzero_params"] < slim["nonzero_params"] and both["file_bytes"] < slim["file_bytes"]
    table = (out / "sweep.md").read_text()
    assert table.count("**best of model**") == 2 and table.count("| control |") == 6
    assert "Best NetScore after pruning (non-zero params): **" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_anchor_in_another_process_matches_the_non_zero_count_of_the_same_seed(tmp_path: Path) -> None:
    bench = bench_module("double_prune.py")
    rows = [{"arm": "dnnprune", "seed": 0, "nonzero_params": 111}, {"arm": "tp", "seed": 1, "nonzero_params": 5},
            {"arm": "dnnprune", "seed": 1, "nonzero_params": 222}]
    (tmp_path / "result.json").write_text(__import__("json").dumps({"rows": rows}))
    assert bench.matched_nonzero(tmp_path, 1) == 222
    with pytest.raises(SystemExit, match="seed 2"):
        bench.matched_nonzero(tmp_path, 2)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_headline_arms_share_the_budget_with_slimming_rounds(tmp_path: Path) -> None:
    """dnnprune, control and Torch-Pruning arms on a tiny net: the same phases (two slimming rounds),
    the anchor matched to dnnprune's non-zero count, and the control left whole."""
    data = _write_fashion(tmp_path / "data")
    recipe = {"data": {"dataset": "fashion-mnist", "root": str(data), "val_fraction": 0.2, "batch_size": 64},
              "double_prune": {"slimming_ratio": 0.5, "slimming_rounds": 2, "sparsity": 0.5, "sparsity_steps": 2,
                               "finetune_steps": 4, "threshold": "global", "finetune": {"batch_size": 16}},
              "quantize": {"bits": 6, "layers": ["type:Linear"]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    checkpoint = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    bench = bench_module("double_prune.py")
    assert [steps for _, steps in bench.phases(bench.load_recipe(tmp_path / "recipe.yaml"))] == [2, 2, 2, 4]
    out = tmp_path / "headline"
    bench.main([str(checkpoint), "-r", str(tmp_path / "recipe.yaml"), "--arms", "dnnprune,control,tp",
                "--split", "val", "--out", str(out)])
    rows = {row["arm"]: row for row in yaml.safe_load((out / "result.json").read_text())["rows"]}
    baseline = yaml.safe_load((out / "result.json").read_text())["baseline"]
    assert rows["tp"]["nonzero_params"] == rows["dnnprune"]["nonzero_params"] < 0.5 * baseline["nonzero_params"]
    assert rows["tp"]["params"] < baseline["params"] and rows["dnnprune"]["params"] < baseline["params"]
    assert rows["control"]["params"] == baseline["params"]
    assert rows["dnnprune"]["quantized"]["file_bytes"] < rows["dnnprune"]["file_bytes"]


def test_a_sweep_plan_may_list_its_points() -> None:
    bench = bench_module("double_prune.py")
    assert bench.grid({"points": [[0.5, 0.8], [0.7, 0.45]]}) == [(0.5, 0.8), (0.7, 0.45)]
    assert bench.grid({"slimming": [0.0, 0.3], "sparsity": [0.0, 0.5]}) == [(0.0, 0.5), (0.3, 0.0), (0.3, 0.5)]


def _point(model: str, arm: str, top1: float, nonzero: int, netscore: float, **extra: float) -> dict:
    return {"model": model, "arm": arm, "slimming": 0.5 if arm == "double-prune" else 0.0,
            "sparsity": 0.5 if arm == "double-prune" else 0.0, "steps": 0 if arm == "baseline" else 10, "top1": top1,
            "params": 2 * nonzero, "nonzero_params": nonzero, "macs": 1000, "netscore": netscore - 1,
            "netscore_nonzero": netscore, **extra}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_sweeps_run_in_separate_processes_merge_into_one_table(tmp_path: Path) -> None:
    """One sweep per model (one per core), then one table, one plot and one winner over all of them."""
    import json

    sweeps = {"a": [_point("resnet20", "baseline", 0.9, 1000, 60), _point("resnet20", "control", 0.91, 1000, 61),
                    _point("resnet20", "double-prune", 0.88, 100, 80, drop_vs_control=0.03)],
              "b": [_point("mnv3", "baseline", 0.87, 5000, 50), _point("mnv3", "control", 0.88, 5000, 51),
                    _point("mnv3", "double-prune", 0.85, 200, 85, drop_vs_control=0.03)]}
    for name, points in sweeps.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "sweep.json").write_text(json.dumps({"points": points}))
    out = tmp_path / "merged"
    bench_module("double_prune.py").main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    merged = json.loads((out / "sweep.json").read_text())["points"]
    assert merged == sweeps["a"] + sweeps["b"]
    table = (out / "sweep.md").read_text()
    assert table.count("**best of model**") == 2 and "(non-zero params): **mnv3** (85.00" in table
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # one model split over two processes: the second's baseline and control (same budget) are not repeated
    later = [_point("resnet20", "baseline", 0.9, 1000, 60), _point("resnet20", "control", 0.91, 1000, 61),
             _point("resnet20", "double-prune", 0.86, 50, 82, drop_vs_control=0.05)]
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "sweep.json").write_text(json.dumps({"points": later}))
    bench_module("double_prune.py").main(["--merge", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(out)])
    merged = json.loads((out / "sweep.json").read_text())["points"]
    assert merged == sweeps["a"] + later[2:]


def test_the_anchor_waits_for_the_count_that_a_process_alongside_writes(tmp_path: Path) -> None:
    bench = bench_module("double_prune.py")
    (tmp_path / "result.json").write_text("{half a fi")  # a writer mid-way: not yet a row, not an error
    with pytest.raises(SystemExit, match="seed 0"):
        bench.matched_nonzero(tmp_path, 0, wait=0.1)
    (tmp_path / "result.json").write_text('{"rows": [{"arm": "dnnprune", "seed": 0, "nonzero_params": 7}]}')
    assert bench.matched_nonzero(tmp_path, 0, wait=0.1) == 7


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_parallel_arms_give_the_rows_of_a_serial_run(tmp_path: Path) -> None:
    """--parallel runs each arm in its own process; tp still matches the dnnprune count of its seed."""
    data = _write_fashion(tmp_path / "data")
    recipe = {"data": {"dataset": "fashion-mnist", "root": str(data), "val_fraction": 0.2, "batch_size": 64},
              "double_prune": {"slimming_ratio": 0.4, "sparsity": 0.6, "sparsity_steps": 2, "finetune_steps": 4,
                               "finetune": {"batch_size": 16, "lr": 0.01}},
              "quantize": {"method": "kmeans", "bits": 6, "layers": ["type:Linear"]}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    checkpoint = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    bench = bench_module("double_prune.py")
    common = [str(checkpoint), "-r", str(tmp_path / "recipe.yaml"), "--split", "val", "--seeds", "0"]

    bench.main([*common, "--parallel", "--out", str(tmp_path / "parallel")])
    bench.main([*common, "--out", str(tmp_path / "serial")])

    def rows(folder: str) -> dict[str, dict]:
        result = yaml.safe_load((tmp_path / folder / "result.json").read_text())
        return {row["arm"]: row for row in result["rows"]}

    parallel, serial = rows("parallel"), rows("serial")
    assert sorted(parallel) == ["control", "dnnprune", "tp"]
    assert parallel["tp"]["nonzero_params"] == parallel["dnnprune"]["nonzero_params"]
    for arm in parallel:  # one process per arm changes nothing in what each arm computes
        for key in ("top1", "params", "nonzero_params", "macs"):
            assert parallel[arm][key] == pytest.approx(serial[arm][key]), (arm, key)
    assert "| tp | 0 |" in (tmp_path / "parallel" / "table.md").read_text()
