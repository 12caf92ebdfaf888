"""Layer (depth) pruning on tiny models: which units exist, what removing one costs and saves, the least-squares
bridge, the removal loop, and that every kind of removal survives a save and a reload in a new process."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import dnnprune
from dnnprune.checkpoint import CheckpointMeta, attach_meta, read_meta
from dnnprune.errors import PruningError
from dnnprune.models import create_model
from dnnprune.pruning.depth import (
    DepthPlan,
    Removal,
    check_reachable,
    check_units,
    chosen_units,
    efficiency_pick,
    remove_in_order,
    sensitivity_order,
    stripped_size,
    unit_drops,
    unit_metrics,
    unit_order,
    units_fingerprint,
)
from dnnprune.pruning.layers import BRIDGE_RIDGE, Unit, find_units, least_squares, remove_unit, unit_named
from dnnprune.pruning.structured import model_size
from dnnprune.tasks import Metrics, TaskSpec, make_task
from tests.reload import record_io, reload_in_new_process

CIFAR = (3, 32, 32)
ROW = (1, 1, 30)


def _model(arch: str, **args: Any) -> nn.Module:
    return create_model(arch, **args).eval()


def _a2e(widths: tuple[int, ...] = (16, 4, 16), features: int = 30) -> nn.Module:
    return _model("a2e", input_shape=(1, 1, features), widths=list(widths), activation="tanh")


def _saved(model: nn.Module, arch: str, args: dict[str, Any], shape: tuple[int, int, int],
           kind: str = "classification") -> nn.Module:
    task = TaskSpec(kind=kind, normal_classes=(0,) if kind == "reconstruction" else ())  # type: ignore[arg-type]
    return attach_meta(model, CheckpointMeta(arch=arch, arch_args=args, input_shape=shape, mean=(0.0,) * shape[0],
                                             std=(1.0,) * shape[0], task=task))


def _names(units: list[Unit]) -> list[str]:
    return [u.name for u in units]


# ----------------------------------------------------------------------------- finding units


def test_resnet20_has_nine_blocks_and_the_stage_transitions_become_their_shortcut_conv() -> None:
    units = find_units(_model("resnet20", in_channels=3), CIFAR)
    assert _names(units) == [f"layer{s}.{b}" for s in (1, 2, 3) for b in range(3)]
    assert all(u.kind == "block" and u.members == (u.name,) for u in units)
    assert {u.name: u.shortcut for u in units if u.shortcut} == {"layer2.0": "shortcut", "layer3.0": "shortcut"}
    # The saving of a transition block excludes its shortcut (1x1 conv + BN), which stays.
    model = _model("resnet20", in_channels=3)
    block = model.get_submodule("layer2.0")
    whole = sum(p.numel() for p in block.parameters())
    kept = sum(p.numel() for p in block.shortcut.parameters())
    assert unit_named(units, "layer2.0").params == whole - kept > 0


def test_torchvision_resnet18_blocks_with_and_without_downsample() -> None:
    model = _model("torchvision.resnet18", num_classes=10)
    units = find_units(model, CIFAR)
    assert _names(units) == [f"layer{s}.{b}" for s in (1, 2, 3, 4) for b in range(2)]
    assert {u.name: u.shortcut for u in units} == {
        "layer1.0": None, "layer1.1": None, "layer2.0": "downsample", "layer2.1": None, "layer3.0": "downsample",
        "layer3.1": None, "layer4.0": "downsample", "layer4.1": None}


def test_mobilenet_v2_only_inverted_residuals_with_a_residual_connection() -> None:
    model = _model("torchvision.mobilenet_v2", num_classes=10)
    residual = [name for name, m in model.named_modules() if getattr(m, "use_res_connect", False)]
    plain = [name for name, m in model.named_modules()
             if type(m).__name__ == "InvertedResidual" and not m.use_res_connect]
    units = find_units(model, CIFAR)
    assert len(residual) == 10 and plain
    assert _names(units) == residual and all(u.kind == "block" and u.shortcut is None for u in units)


def test_mnasnet_residual_blocks_are_units() -> None:
    """MNASNet marks its residual blocks `apply_residual`, not `use_res_connect`; it was refused as having none."""
    model = _model("torchvision.mnasnet0_5", num_classes=10)
    residual = [name for name, m in model.named_modules() if getattr(m, "apply_residual", False) is True]
    units = find_units(model, CIFAR)
    assert len(residual) == 10 and _names(units) == residual
    assert all(u.kind == "block" and u.shortcut is None for u in units)


@pytest.mark.parametrize("arch, convs", [("vgg11_bn", 4), ("vgg16_bn", 9)])
def test_vgg_same_shape_convs_go_with_their_batchnorm(arch: str, convs: int) -> None:
    model = _model(arch, in_channels=3)
    features = model.features
    expected = [f"features.{i}" for i, m in enumerate(features) if isinstance(m, nn.Conv2d)
                and m.in_channels == m.out_channels]
    units = find_units(model, CIFAR)
    conv_units = [u for u in units if u.kind == "conv"]
    assert _names(conv_units) == expected and len(expected) == convs
    for unit in conv_units:
        index = int(unit.name.split(".")[1])
        assert unit.members == (unit.name, f"features.{index + 1}")
        assert isinstance(features[index + 1], nn.BatchNorm2d)
    # The classifier's hidden Linear (512 -> 512) is a unit too, bridged into the output layer.
    assert [(u.name, u.bridge) for u in units if u.kind == "linear"] == [("classifier.1", "classifier.3")]


def test_mlp_a2e_and_a2e_classifier_hidden_linears() -> None:
    mlp = find_units(_model("mlp", hidden=[20, 10]), (1, 28, 28))
    assert [(u.name, u.kind, u.members, u.bridge) for u in mlp] == [
        ("classifier.1", "linear", ("classifier.1", "classifier.2"), "classifier.3"),
        ("classifier.3", "linear", ("classifier.3", "classifier.4"), "classifier.5")]
    a2e = find_units(_model("a2e", input_shape=ROW), ROW)  # default accordion 64-16-64-16-64
    assert _names(a2e) == [f"net.{i}" for i in (1, 3, 5, 7, 9)] and {u.kind for u in a2e} == {"linear"}
    classifier = find_units(_model("a2e_classifier", num_classes=3, input_shape=(1, 4, 4), widths=[8, 4, 8]), (1, 4, 4))
    assert _names(classifier) == [f"experts.{k}.{i}" for k in range(3) for i in (1, 3, 5)]
    assert unit_named(classifier, "experts.2.3").bridge == "experts.2.5"
    shared = find_units(_model("a2e_classifier", num_classes=3, input_shape=(1, 4, 4), widths=[8, 4, 8],
                               design="shared"), (1, 4, 4))
    assert [(u.name, u.bridge) for u in shared] == [("net.1", "net.3"), ("net.3", "net.5"), ("net.5", "net.7")]


def test_a_model_without_units_says_to_use_filter_granularity() -> None:
    model = _model("mlp", hidden=[])
    assert find_units(model, (1, 28, 28)) == []
    with pytest.raises(PruningError, match="--granularity filter"):
        check_units(model, (1, 28, 28))
    with pytest.raises(PruningError, match="not a removable unit"):
        unit_named(find_units(_model("mlp", hidden=[5]), (1, 28, 28)), "classifier.0")


def test_a_hidden_linear_whose_successor_has_no_bias_is_not_offered() -> None:
    """The bridge needs the next layer's bias to absorb the removed layer's offset; a unit that
    `remove_unit` would refuse must not be listed (the analysis and the loop would fail half-way)."""
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4, bias=False), nn.ReLU(), nn.Linear(4, 3))
    assert _names(find_units(model, (6,))) == ["2"]


# ----------------------------------------------------------------------------- removing units


def _size(model: nn.Module, shape: tuple[int, ...]) -> dict[str, int]:
    return model_size(model, shape)


SAVINGS_CASES = [
    ("resnet20", {"in_channels": 3}, CIFAR),
    ("torchvision.mobilenet_v2", {"num_classes": 10}, CIFAR),
    ("vgg11_bn", {"in_channels": 3}, CIFAR),
    ("mlp", {"hidden": [20, 10]}, (1, 28, 28)),
    ("a2e", {"input_shape": ROW}, ROW),
    ("a2e_classifier", {"num_classes": 3, "input_shape": (1, 4, 4), "widths": [8, 4, 8]}, (1, 4, 4)),
    ("a2e_classifier", {"num_classes": 3, "input_shape": (1, 4, 4), "widths": [8, 4, 8], "design": "shared"}, (1, 4, 4)),
]


@pytest.mark.parametrize("arch, args, shape", SAVINGS_CASES, ids=[c[0] for c in SAVINGS_CASES])
def test_removal_keeps_the_output_shape_and_saves_what_the_unit_reports(arch: str, args: dict[str, Any],
                                                                       shape: tuple[int, ...]) -> None:
    model = _model(arch, **args)
    calibration = torch.randn(32, *shape)
    base = _size(model, shape)
    with torch.inference_mode():
        expected = model(calibration[:2]).shape
    for unit in find_units(model, shape):
        clone = copy.deepcopy(model)
        remove_unit(clone, unit, calibration)
        after = _size(clone, shape)
        assert base["params"] - after["params"] == unit.params, unit
        assert base["macs"] - after["macs"] == unit.macs, unit
        with torch.inference_mode():
            assert clone(calibration[:2]).shape == expected


def test_torchvision_resnet18_downsample_block_saves_what_it_reports() -> None:
    model = _model("torchvision.resnet18", num_classes=10)
    base = _size(model, CIFAR)
    for name in ("layer1.0", "layer2.0"):
        unit = unit_named(find_units(model, CIFAR), name)
        clone = copy.deepcopy(model)
        remove_unit(clone, unit)
        after = _size(clone, CIFAR)
        assert (base["params"] - after["params"], base["macs"] - after["macs"]) == (unit.params, unit.macs)
        if unit.shortcut:
            assert clone.get_submodule(name) is not model.get_submodule(name)
            assert [type(m) for m in clone.get_submodule(name)] == [nn.Conv2d, nn.BatchNorm2d]


def _linear_chain(activation: type[nn.Module]) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 5), activation(), nn.Linear(5, 4), activation(), nn.Linear(4, 3)).eval()


@pytest.mark.parametrize("position", [0, 1])
def test_bridge_is_exact_when_the_removed_layer_is_linear(position: int) -> None:
    chain = _saved(_linear_chain(nn.Identity), "chain", {}, (1, 1, 6))
    units = find_units(chain, (6,))
    assert [(u.name, u.members, u.bridge) for u in units] == [("0", ("0",), "2"), ("2", ("2",), "4")]
    calibration = torch.randn(256, 6) * 3 + 1
    probe = torch.randn(64, 6) * 3 + 1  # not the calibration samples: the map itself is exact
    with torch.inference_mode():
        reference = chain(probe)
    remove_unit(chain, units[position], calibration, ridge=0.0)
    bridge = chain.get_submodule(units[position].bridge)
    assert isinstance(chain.get_submodule(units[position].name), nn.Identity)
    assert bridge.in_features == (6 if position == 0 else 5)
    with torch.inference_mode():
        torch.testing.assert_close(chain(probe), reference, atol=1e-5, rtol=1e-5)


def test_bridge_is_close_for_tanh_on_small_inputs() -> None:
    chain = _linear_chain(nn.Tanh)
    with torch.no_grad():
        chain[0].bias.zero_()  # tanh near 0 is nearly linear: x - x^3/3
    calibration, probe = torch.randn(512, 6) * 0.05, torch.randn(64, 6) * 0.05
    with torch.inference_mode():
        reference = chain(probe)
    remove_unit(chain, find_units(chain, (6,))[0], calibration, ridge=0.0)
    with torch.inference_mode():
        error = (chain(probe) - reference).abs().max()
    spread = (reference - reference.mean(0)).abs().max()
    assert error < 5e-3 * spread, (float(error), float(spread))


def test_the_default_ridge_keeps_an_underdetermined_bridge_small_and_costs_little_when_samples_abound() -> None:
    """784 noisy inputs and 1,024 samples: plain least squares interpolates the noise with huge weights."""
    torch.manual_seed(0)
    signal = torch.randn(1024, 8)
    inputs = signal @ torch.randn(8, 784) + 0.05 * torch.randn(1024, 784)
    targets = torch.relu(signal) @ torch.randn(8, 16)
    plain, _ = least_squares(inputs, targets)
    ridged, _ = least_squares(inputs, targets, ridge=BRIDGE_RIDGE)
    assert float(ridged.abs().max()) < float(plain.abs().max()) / 5
    affine = torch.randn(6, 3)
    many = torch.randn(4096, 6)
    exact, _ = least_squares(many, many @ affine, ridge=0.0)
    near, _ = least_squares(many, many @ affine, ridge=BRIDGE_RIDGE)
    torch.testing.assert_close(exact.T, affine, atol=1e-4, rtol=1e-4)
    assert float((near.T - affine).abs().max()) < 0.02 * float(affine.abs().max())


def test_least_squares_recovers_an_affine_map_and_survives_rank_deficiency() -> None:
    weight, bias = torch.randn(3, 5), torch.randn(3)
    inputs = torch.randn(100, 5) * 0.01  # small activations: the fit must not be biased toward zero
    found_w, found_b = least_squares(inputs, inputs @ weight.T + bias)
    torch.testing.assert_close(found_w, weight, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(found_b, bias, atol=1e-5, rtol=1e-5)
    dead = torch.cat([inputs, torch.zeros(100, 2), inputs[:, :1]], 1)  # dead units and a duplicated column
    found_w, found_b = least_squares(dead, inputs @ weight.T + bias)
    assert torch.isfinite(found_w).all()
    torch.testing.assert_close(dead @ found_w.T + found_b, inputs @ weight.T + bias, atol=1e-4, rtol=1e-4)


def test_removing_a_hidden_linear_needs_calibration() -> None:
    model = _a2e()
    with pytest.raises(PruningError, match="calibration"):
        remove_unit(model, find_units(model, ROW)[0], None)


# ----------------------------------------------------------------------------- the removal loop


def _removal(shape: tuple[int, ...], evaluate: Any = None, max_drop: float | None = None,
             rows: list[dict[str, Any]] | None = None) -> Removal:
    return Removal(input_shape=shape, calibration=torch.randn(64, *shape),
                   evaluate=evaluate or (lambda m: 1.0), drop=lambda before, after: before - after,
                   finetune=lambda m, name: 3, max_drop=max_drop, on_step=(rows.append if rows is not None else None))


def test_remove_n_removes_exactly_n_units_in_the_given_order() -> None:
    model = _model("resnet20", in_channels=3)
    units = find_units(model, CIFAR)
    plan = DepthPlan(remove=3, target=None, factor=None, base=_size(model, CIFAR))
    order = unit_order(units, "reverse", 0)
    seen: list[dict[str, Any]] = []
    pruned, rows = remove_in_order(model, order, plan, _removal(CIFAR, rows=seen))
    assert [r["unit"] for r in rows] == ["layer3.2", "layer3.1", "layer3.0"] and seen == rows
    assert all(r["accepted"] for r in rows) and rows[-1]["removed"] == 3
    assert isinstance(pruned.layer3[2], nn.Identity) and isinstance(pruned.layer3[1], nn.Identity)
    assert [type(m) for m in pruned.layer3[0]] == [nn.Conv2d, nn.BatchNorm2d]  # the shortcut path stays
    assert len(find_units(pruned, CIFAR)) == len(units) - 3
    assert rows[-1]["params"] == _size(pruned, CIFAR)["params"] == plan.base["params"] - sum(
        unit_named(units, n).params for n in ("layer3.2", "layer3.1", "layer3.0"))


def test_a_target_stops_the_loop_once_it_is_reached() -> None:
    model = _model("resnet20", in_channels=3)
    base = _size(model, CIFAR)
    plan = DepthPlan(remove=None, target="params", factor=1.5, base=base)
    pruned, rows = remove_in_order(model, unit_order(find_units(model, CIFAR), "reverse", 0), plan, _removal(CIFAR))
    reached = [base["params"] / r["params"] for r in rows]
    assert reached[-1] >= 1.5 and all(r < 1.5 for r in reached[:-1])
    assert _size(pruned, CIFAR)["params"] == rows[-1]["params"]


def test_a_bottleneck_removal_that_would_enlarge_the_model_is_skipped_for_a_size_target() -> None:
    model = _a2e((16, 4, 16))
    units = {u.name: u for u in find_units(model, ROW)}
    assert units["net.3"].params < 0 and units["net.3"].macs < 0 and units["net.1"].params > 0
    base = _size(model, ROW)
    for target in ("params", "macs"):
        plan = DepthPlan(remove=None, target=target, factor=1.2, base=base)  # type: ignore[arg-type]
        pruned, rows = remove_in_order(copy.deepcopy(model), ["net.3", "net.1"], plan, _removal(ROW))
        assert [r["unit"] for r in rows] == ["net.1"]
        assert isinstance(pruned.net[1], nn.Identity) and isinstance(pruned.net[3], nn.Linear)
    # Passed over, not dropped: once its wide neighbours are gone, removing it shrinks the model.
    model = _a2e((64, 16, 64, 16, 64))
    base = _size(model, ROW)
    plan = DepthPlan(remove=None, target="params", factor=6.7, base=base)
    pruned, rows = remove_in_order(model, ["net.1", "net.3", "net.7", "net.5", "net.9"], plan, _removal(ROW))
    assert [r["unit"] for r in rows] == ["net.1", "net.5", "net.3", "net.9"]
    assert base["params"] / _size(pruned, ROW)["params"] >= 6.7 > base["params"] / rows[-2]["params"]
    # Counting units (no size target) passes it over too: a compression step never grows the model.
    model = _a2e((16, 4, 16))
    plan = DepthPlan(remove=1, target=None, factor=None, base=_size(model, ROW))
    _, rows = remove_in_order(model, ["net.3"], plan, _removal(ROW))
    assert rows == []
    _, rows = remove_in_order(_a2e((16, 4, 16)), ["net.3", "net.1"], plan, _removal(ROW))
    assert [r["unit"] for r in rows] == ["net.1"]
    with pytest.raises(PruningError, match="removing net.3 would grow the model by"):
        chosen_units(model, find_units(model, ROW), ["net.3"], ROW)
    # In the user's order: once its wide neighbour is gone, the bottleneck shrinks the model.
    wide = _a2e((64, 16, 64, 16, 64))
    assert chosen_units(wide, find_units(wide, ROW), ["net.5", "net.3"], ROW) == ["net.5", "net.3"]
    with pytest.raises(PruningError, match="removing net.3 would grow"):
        chosen_units(wide, find_units(wide, ROW), ["net.3", "net.5"], ROW)


def test_efficiency_takes_the_wide_input_layer_first_where_it_saves_most_per_point() -> None:
    """On an accordion 30-256-8-256-8 the input-facing layer is the most sensitive alone but saves
    most; once the narrow layers around it are gone it can no longer shrink the model. Least drop
    per parameter saved, re-measured before each removal, takes it first; plain sensitivity order
    would strand it."""
    model = _a2e((256, 8, 256, 8))
    drops = {"net.1": 0.05, "net.3": 0.02, "net.5": 0.001, "net.7": 0.001}
    units = find_units(model, ROW)
    assert efficiency_pick(units, drops, "params").name == "net.5"  # free and large
    assert efficiency_pick([u for u in units if u.name != "net.5"], drops, "params").name == "net.1"
    assert efficiency_pick([], drops, "params") is None
    plan = DepthPlan(remove=3, target=None, factor=None, base=_size(model, ROW))
    env = _removal(ROW)
    env.efficiency = drops
    pruned, rows = remove_in_order(model, sensitivity_order(units, drops), plan, env)
    assert [r["unit"] for r in rows] == ["net.5", "net.1", "net.7"]
    assert [m.in_features for m in pruned.net if isinstance(m, nn.Linear)] == [30, 8]


def test_accuracy_aware_puts_back_a_unit_that_exceeds_the_budget() -> None:
    """A stubbed evaluation: removing `net.5` (the harmful unit) costs 0.3, any other module 0.001."""
    model = _a2e((16, 8, 16))

    def evaluate(candidate: nn.Module) -> float:
        gone = [isinstance(m, nn.Identity) for m in candidate.net]
        return 0.9 - 0.3 * gone[5] - 0.001 * sum(gone)

    finetuned: list[str] = []
    env = _removal(ROW, evaluate=evaluate, max_drop=0.01)
    env.finetune = lambda m, name: finetuned.append(name) or 2  # type: ignore[assignment]
    plan = DepthPlan(remove=2, target=None, factor=None, base=_size(model, ROW))
    pruned, rows = remove_in_order(model, ["net.5", "net.3", "net.1"], plan, env)
    assert [(r["unit"], r["accepted"]) for r in rows] == [("net.5", False), ("net.3", True), ("net.1", True)]
    assert finetuned == ["net.5", "net.3", "net.1"] and all(r["finetune_steps"] == 2 for r in rows)
    assert rows[0]["drop"] == pytest.approx(0.302) and rows[1]["drop"] == pytest.approx(0.002)
    assert [r["removed"] for r in rows] == [0, 1, 2]
    assert isinstance(pruned.net[5], nn.Linear) and isinstance(pruned.net[1], nn.Identity)  # net.5 was put back
    assert rows[0]["params"] == _size(model, ROW)["params"]  # a rejected try leaves the size as it was


def test_sensitivity_order_least_harmful_first() -> None:
    model = _a2e()
    units = find_units(model, ROW)
    task = make_task(TaskSpec(kind="reconstruction"))  # MSE: lower is better
    mse = {"net.1": 0.5, "net.3": 0.2, "net.5": 0.9}
    metrics = unit_metrics(model, units, lambda m: Metrics({"mse": _stub_mse(m, mse)}, 10, "mse", False),
                           torch.randn(32, *ROW))
    assert set(metrics) == {"net.1", "net.3", "net.5"}
    baseline = Metrics({"mse": 0.1}, 10, "mse", False)
    drops = unit_drops(units, baseline, metrics, task)
    assert drops == pytest.approx({"net.1": 4.0, "net.3": 1.0, "net.5": 8.0})  # relative rise of the MSE
    assert sensitivity_order(units, drops) == ["net.3", "net.1", "net.5"]
    assert unit_order(units, "sequential", 0) == ["net.1", "net.3", "net.5"]
    assert sorted(unit_order(units, "random", 3)) == ["net.1", "net.3", "net.5"]


def _stub_mse(model: nn.Module, mse: dict[str, float]) -> float:
    gone = [f"net.{i}" for i, m in enumerate(model.net) if isinstance(m, nn.Identity) and i % 2 == 1]
    return mse[gone[0]]


def test_unreachable_requests_are_input_errors() -> None:
    model = _model("resnet20", in_channels=3)
    units = find_units(model, CIFAR)
    base = _size(model, CIFAR)
    with pytest.raises(PruningError, match="more than the 9 removable units"):
        check_reachable(model, units, DepthPlan(10, None, None, base), CIFAR)
    check_reachable(model, units, DepthPlan(9, None, None, base), CIFAR)
    best = base["params"] / stripped_size(model, CIFAR)["params"]
    with pytest.raises(PruningError, match="lower the target"):
        check_reachable(model, units, DepthPlan(None, "params", best * 1.01, base), CIFAR)
    check_reachable(model, units, DepthPlan(None, "params", best * 0.99, base), CIFAR)


def test_reachability_counts_the_best_removals_not_every_removal() -> None:
    """On a bottleneck accordion, removing every hidden layer gives one wide in->out layer, larger than
    what removing only the wide layers gives; the check must not refuse a target the loop can reach."""
    model = _a2e((64, 2, 64))
    base = _size(model, ROW)
    units = find_units(model, ROW)
    all_gone = copy.deepcopy(model)
    while find_units(all_gone, ROW):
        remove_unit(all_gone, find_units(all_gone, ROW)[0], torch.randn(64, *ROW))
    factor = 0.5 * (base["params"] / _size(all_gone, ROW)["params"] + 10.0)  # between strip-all and reachable
    check_reachable(model, units, DepthPlan(None, "params", factor, base), ROW)
    pruned, _ = remove_in_order(model, ["net.3", "net.1", "net.5"], DepthPlan(None, "params", factor, base),
                                _removal(ROW))
    assert base["params"] / _size(pruned, ROW)["params"] >= factor


def test_fingerprint_tells_models_apart() -> None:
    a, b = find_units(_a2e((16, 4, 16)), ROW), find_units(_a2e((16, 5, 16)), ROW)
    assert units_fingerprint("a2e", a) == units_fingerprint("a2e", find_units(_a2e((16, 4, 16)), ROW))
    assert units_fingerprint("a2e", a) != units_fingerprint("a2e", b)
    assert units_fingerprint("a2e", a) != units_fingerprint("mlp", a)


# ----------------------------------------------------------------------------- save and reload


def _removed(arch: str, args: dict[str, Any], shape: tuple[int, int, int], names: list[str],
             kind: str = "classification") -> nn.Module:
    model = _saved(_model(arch, **args), arch, args, shape, kind)
    with torch.no_grad():  # BN statistics that are not the identity, so dropping a BN shows
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    calibration = torch.randn(64, *shape)
    for name in names:
        remove_unit(model, unit_named(find_units(model, shape), name), calibration)
    return model.eval()


def test_every_kind_of_removal_reloads_identically_in_a_new_process(tmp_path: Path) -> None:
    cases = {
        "resnet20": _removed("resnet20", {"in_channels": 3, "num_classes": 10}, CIFAR, ["layer1.1", "layer2.0"]),
        "resnet18": _removed("torchvision.resnet18", {"num_classes": 10}, CIFAR, ["layer2.0", "layer3.1"]),
        "mobilenet_v2": _removed("torchvision.mobilenet_v2", {"num_classes": 10}, CIFAR, ["features.5"]),
        "mnasnet0_5": _removed("torchvision.mnasnet0_5", {"num_classes": 10}, CIFAR, ["layers.9.2"]),
        "vgg11_bn": _removed("vgg11_bn", {"in_channels": 3, "num_classes": 10}, CIFAR, ["features.11", "features.22"]),
        "a2e": _removed("a2e", {"input_shape": list(ROW), "widths": [16, 4, 16, 4, 16], "activation": "tanh"}, ROW,
                        ["net.1", "net.5", "net.9"], kind="reconstruction"),
        "a2e_classifier": _removed("a2e_classifier", {"num_classes": 3, "input_shape": [1, 4, 4], "widths": [8, 4, 8]},
                                   (1, 4, 4), ["experts.0.1", "experts.1.3", "experts.1.5"]),
        "a2e_shared": _removed("a2e_classifier", {"num_classes": 3, "input_shape": [1, 4, 4], "widths": [8, 4, 8, 4],
                                                  "design": "shared"}, (1, 4, 4), ["net.1", "net.5"]),
    }
    assert [cases["a2e_shared"].net[i].in_features for i in (3, 7, 9)] == [16, 4, 4]
    assert [cases["a2e"].net[i].in_features for i in (3, 7, 11)] == [30, 4, 4]  # bridged from the input
    assert cases["a2e_classifier"].experts[1][7].in_features == 8
    items = []
    for name, model in cases.items():
        path = dnnprune.save(model, tmp_path / f"{name}.safetensors")
        assert read_meta(path).replaced, name  # the removals are in the metadata, not only in the tensors
        items.append(record_io(model, path, dnnprune.meta_of(model).input_shape))
    results = reload_in_new_process(items)
    assert all(results.values()), results
    again = dnnprune.load(tmp_path / "resnet20.safetensors")
    assert isinstance(again.layer1[1], nn.Identity) and [type(m) for m in again.layer2[0]] == [nn.Conv2d,
                                                                                                nn.BatchNorm2d]


def test_a_removed_conv_leaves_the_inplace_activation_after_it_out_of_place(tmp_path: Path) -> None:
    """RegNet's `f.a` is conv, BN, ReLU(inplace): with the conv gone, the ReLU would write over the block's input,
    which the shortcut `proj(x)` saved for backward; training such a checkpoint failed, and where a shortcut
    reads x after f(x) the outputs change. The ReLU is made out-of-place, and the checkpoint keeps it so."""
    arch, args = "torchvision.regnet_x_400mf", {"num_classes": 10}
    model = _saved(_model(arch, **args), arch, args, CIFAR)
    name = "trunk_output.block1.block1-0.f.a.0"
    remove_unit(model, unit_named(find_units(model, CIFAR), name))
    follower = model.get_submodule("trunk_output.block1.block1-0.f.a.2")
    assert isinstance(follower, nn.ReLU) and follower.inplace is False
    torch.manual_seed(0)
    x = torch.randn(4, *CIFAR)
    reference = copy.deepcopy(model)
    for module in reference.modules():
        if getattr(module, "inplace", False):
            module.inplace = False
    with torch.inference_mode():
        assert torch.equal(model(x), reference(x))
    model.train()
    model(x).sum().backward()  # raised "modified by an inplace operation" before
    model.eval()
    again = dnnprune.load(dnnprune.save(model, tmp_path / "regnet.safetensors"))
    assert again.get_submodule("trunk_output.block1.block1-0.f.a.2").inplace is False
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))
