"""Structured pruning: real channel removal that reloads in a new process, criteria, limits, plans, orders,
targets and the accuracy-aware loop."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from dnnprune import codecs as c
from dnnprune.checkpoint import CheckpointMeta, attach_meta, meta_of, save
from dnnprune.errors import PruningError
from dnnprune.models import accepts_argument, create_model, model_task, zoo_names
from dnnprune.observe import Observer
from dnnprune.pruning import prune
from dnnprune.pruning.schedule import StepEnvironment, accuracy_aware, layer_order, load_analysis, order_weights
from dnnprune.pruning.structured import (
    GlobalRanking,
    Limits,
    give_back,
    model_size,
    parse_target,
    pattern_ratios,
    pruned_size,
    ratio_plan,
    score_groups,
    solve_target,
    uniform_ratios,
)
from dnnprune.recipe import PruneSection
from dnnprune.surgery import ChannelGraph, channels_to_keep, lowest, model_fingerprint
from dnnprune.tasks import TaskSpec
from tests.conftest import needs_fmnist
from tests.reload import record_io, reload_in_new_process

FAST_TORCHVISION = ["resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "googlenet",
                    "shufflenet_v2_x1_0", "regnet_x_400mf"]
SLOW_TORCHVISION = ["alexnet", "vgg16_bn", "densenet121"]


def _shape(arch: str) -> tuple[int, int, int]:
    if arch in ("lenet5", "mlp"):
        return (1, 28, 28)
    if arch == "torchvision.alexnet":
        return (3, 64, 64)
    return (3, 32, 32) if arch.startswith("torchvision.") else (1, 32, 32)


def _model(arch: str) -> nn.Module:
    """A registered model with non-trivial BatchNorm statistics and its checkpoint metadata."""
    shape = _shape(arch)
    args: dict = {"in_channels": shape[0]}
    if model_task(arch) == "classification":
        args["num_classes"] = 10
    if accepts_argument(arch, "input_shape"):
        args["input_shape"] = list(shape)
    model = create_model(arch, **args).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return attach_meta(model, CheckpointMeta(arch=arch, arch_args=args, input_shape=shape,
                                             task=TaskSpec(kind=model_task(arch))))


def _prune_save_reload(archs: list[str], folder: Path) -> None:
    items, macs = [], {}
    for arch in archs:
        model = _model(arch)
        before = model_size(model, _shape(arch))["macs"]
        model, report = prune(model, PruneSection(ratio=0.5, criterion="l1", evaluate=False))
        macs[arch] = (before, model_size(model, _shape(arch))["macs"], report.after["macs"])
        stem = arch.replace(".", "_")
        items.append(record_io(model, save(model, folder / f"{stem}.safetensors"), _shape(arch)))
    results = reload_in_new_process(items)
    assert all(results.values()), results
    for arch, (before, after, reported) in macs.items():
        assert after < 0.75 * before and after == reported, (arch, before, after)


def test_zoo_and_torchvision_prune_half_save_reload_identical_in_new_process(tmp_path: Path) -> None:
    _prune_save_reload(zoo_names() + [f"torchvision.{n}" for n in FAST_TORCHVISION], tmp_path)


def test_heavy_torchvision_prune_half_save_reload_identical_in_new_process(tmp_path: Path) -> None:
    """alexnet, vgg16_bn (138M parameters) and densenet121 at small inputs: about a minute, so CI runs it."""
    _prune_save_reload([f"torchvision.{n}" for n in SLOW_TORCHVISION], tmp_path)


@pytest.mark.parametrize("arch", ["resnet20", "mobilenetv2_cifar", "vgg11_bn", "torchvision.resnet18",
                                  "torchvision.mobilenet_v3_small", "torchvision.googlenet",
                                  "torchvision.shufflenet_v2_x1_0", "torchvision.regnet_x_400mf"])
def test_pruned_model_computes_what_the_zero_masked_model_computes(arch: str) -> None:
    """The coupling is right: removing channels equals zeroing them (residual, depthwise, SE, concat, shuffle, groups)."""
    model = _model(arch)
    graph = ChannelGraph(model, _shape(arch))
    plan = {g.name: graph.choose(g.name, graph.importance(g.name, "l1"), g.width - channels_to_keep(g.width, 0.5))
            for g in graph.groups}
    sample = torch.randn(2, *_shape(arch))
    with torch.no_grad():
        original = model(sample)
        undo = graph.zero_channels(plan)
        masked = model(sample)
        undo()
        assert torch.equal(model(sample), original)
        graph.zero_channels(plan)
        graph.prune(plan)
        pruned = model(sample)
    assert not torch.allclose(masked, original)
    assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item())


def test_shufflenet_locks_the_channels_that_cross_the_shuffle() -> None:
    graph = ChannelGraph(_model("torchvision.shufflenet_v2_x1_0"), (3, 32, 32))
    assert graph.locked and all("stage" in name for name in graph.locked)
    names = {g.name for g in graph.groups}
    assert "conv1.0" in names and "stage2.1.branch2.0" in names
    assert not any(name.endswith("branch2.5") for name in names)


def test_grouped_convolutions_shrink_every_block_equally() -> None:
    model = _model("torchvision.regnet_x_400mf")
    graph = ChannelGraph(model, (3, 32, 32))
    group = next(g for g in graph.groups if g.divisor > 1)
    removed = graph.choose(group.name, torch.rand(group.width), group.width // 2 + 1)
    assert len(removed) % group.divisor == 0
    with pytest.raises(PruningError, match="same positions"):
        graph.prune({group.name: [0]})


# ----------------------------------------------------------------------------- criteria


_FILTER_SCALE = [3.0, 6.0, 1.0, 5.0, 2.0, 4.0]


def _lenet_with_ranked_filters() -> tuple[nn.Module, ChannelGraph]:
    """features.0 filter i has every weight equal to _FILTER_SCALE[i] (its consumer weighs all inputs the same)."""
    model = _model("lenet5")
    with torch.no_grad():
        conv, consumer = model.features[0], model.features[3]
        for i in range(conv.out_channels):
            conv.weight[i].fill_(_FILTER_SCALE[i])
        conv.bias.zero_()
        consumer.weight.fill_(0.01)
    return model, ChannelGraph(model, (1, 28, 28))


@pytest.mark.parametrize("criterion", ["l1", "l2"])
def test_magnitude_criteria_remove_the_smallest_filters(criterion: str) -> None:
    model, graph = _lenet_with_ranked_filters()
    scores = graph.importance("features.0", criterion)
    norms = model.features[0].weight.detach().flatten(1).abs().sum(1)
    assert lowest(scores, 2) == sorted(range(6), key=lambda i: float(norms[i]))[:2]
    assert lowest(scores, 2) == [2, 4]


def test_bn_scale_criterion_follows_gamma() -> None:
    model = _model("vgg11_bn")
    graph = ChannelGraph(model, (1, 32, 32))
    bn = model.features[1]
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(1.0, 0.1, bn.num_features))
        bn.weight[5] = -0.001
    assert lowest(graph.importance("features.0", "bn_scale"), 3) == [5, bn.num_features - 1, bn.num_features - 2]
    with pytest.raises(PruningError, match="bn_scale"):
        ChannelGraph(_model("lenet5"), (1, 28, 28)).importance("features.0", "bn_scale")


def test_random_criterion_is_seeded() -> None:
    _, graph = _lenet_with_ranked_filters()
    first, again = graph.importance("features.0", "random", seed=3), graph.importance("features.0", "random", seed=3)
    assert torch.equal(first, again) and not torch.equal(first, graph.importance("features.0", "random", seed=4))


def test_taylor_criterion_uses_gradients() -> None:
    from dnnprune.surgery import accumulate_gradients

    model, graph = _lenet_with_ranked_filters()
    with torch.no_grad():
        model.features[0].weight[4].zero_()
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 1, 28, 28, generator=generator), torch.randint(0, 10, (8,), generator=generator))]
    assert accumulate_gradients(model, batches) == 1
    scores = graph.importance("features.0", "taylor")
    assert scores.shape == (6,) and lowest(scores, 1) == [4]
    with pytest.raises(PruningError, match="Taylor"):
        accumulate_gradients(model, [])


# ----------------------------------------------------------------------------- limits and plans


def test_channels_to_keep_honours_floor_and_cap() -> None:
    assert channels_to_keep(64, 0.5) == 32
    assert channels_to_keep(64, 0.99, max_ratio=0.75) == 16
    assert channels_to_keep(64, 0.9, min_fraction=0.25) == 16
    assert channels_to_keep(4, 0.99, min_channels=3) == 3
    assert channels_to_keep(2, 0.99, min_channels=8) == 2
    assert all(channels_to_keep(w, r) >= 1 for w in (1, 2, 3, 17) for r in (0.0, 0.5, 0.99, 1.0))


def test_a_plan_never_empties_a_layer_and_surgery_refuses_to() -> None:
    model = _model("vgg11_bn")
    graph = ChannelGraph(model, (1, 32, 32))
    plan = ratio_plan(graph, {g.name: 0.999 for g in graph.groups}, Limits(max_ratio=0.95))
    assert all(g.width - plan[g.name] >= 1 for g in graph.groups)
    with pytest.raises(PruningError, match="empty"):
        graph.prune({"features.0": list(range(64))})


@pytest.mark.parametrize("kwargs", [{"ratio": 0.43}, {"target": "macs", "target_factor": 3.0},
                                    {"ratio": 0.4, "global_threshold": True}])
def test_round_to_keeps_channel_counts_multiples(kwargs: dict) -> None:
    _, report = prune(_model("vgg11_bn"), PruneSection(round_to=8, evaluate=False, **kwargs))
    widths = [row["width_after"] for row in report.layers]
    assert all(w % 8 == 0 for w in widths) and sum(widths) < sum(row["width_before"] for row in report.layers)
    assert Limits(round_to=8).keep(6, 0.5) == 6 and Limits(round_to=8).keep(64, 0.43) == 40


def test_global_threshold_keeps_each_layer_floor() -> None:
    model = _model("vgg11_bn")
    graph = ChannelGraph(model, (1, 32, 32))
    scores = {g.name: torch.ones(g.width) for g in graph.groups}
    scores["features.0"] = torch.full((64,), 1e-6)
    scores["features.0"][0] = 1e6  # normalised by the mean, the other 63 are ~0: cut first
    limits = Limits(min_channels=4, max_ratio=0.99)
    plan = GlobalRanking(graph, scores, limits).plan(0.02)
    assert plan["features.0"] == 60 and sum(plan.values()) == round(0.02 * sum(g.width for g in graph.groups))
    assert all(count <= g.width - 4 for g, count in zip(graph.groups, plan.values()))


def test_pattern_ratios_resolve_and_unmatched_patterns_fail() -> None:
    model = _model("resnet20")
    graph = ChannelGraph(model, (1, 32, 32))
    resolved = pattern_ratios(model, graph, {"layer3.*": 0.5, "layer3.2.conv1": 0.25})
    assert resolved["layer3.2.conv1"] == 0.25 and resolved["layer3.0.conv1"] == 0.5
    assert all(name.startswith("layer3") or name == "conv1" for name in resolved)
    with pytest.raises(Exception, match="matches no layer"):
        pattern_ratios(model, graph, {"nothing.*": 0.5})
    with pytest.raises(PruningError, match="no prunable layer"):
        pattern_ratios(model, graph, {"fc": 0.5})


def test_excluded_layers_keep_their_filters() -> None:
    model = _model("vgg11_bn")
    model, report = prune(model, PruneSection(ratio=0.5, exclude=["features.0", "features.4"], evaluate=False))
    widths = {row["name"]: row for row in report.layers}
    assert widths["features.0"]["width_after"] == 64 and widths["features.0"]["excluded"]
    assert widths["features.8"]["width_after"] == 128
    assert model.classifier[-1].out_features == 10


@pytest.mark.parametrize("metric, factor", [("macs", 2.5), ("params", 3.0), ("bytes", 2.0)])
def test_target_is_solved_with_real_counts(metric: str, factor: float) -> None:
    model = _model("resnet20")
    base = model_size(model, (1, 32, 32))
    model, report = prune(model, PruneSection(target=metric, target_factor=factor, evaluate=False))
    reached = base[metric] / model_size(model, (1, 32, 32))[metric]
    assert factor <= reached <= factor * 1.08
    assert report.target["met"] and report.target["reached"] == pytest.approx(reached)


def test_global_target_is_solved() -> None:
    model = _model("vgg11_bn")
    base = model_size(model, (1, 32, 32))["macs"]
    model, report = prune(model, PruneSection(target="macs", target_factor=2.0, global_threshold=True, evaluate=False))
    assert 2.0 <= base / model_size(model, (1, 32, 32))["macs"] <= 2.2 and report.mode == "target-global"


@pytest.mark.parametrize("round_to", [8, 16])
def test_a_coarse_target_gives_channels_back_while_it_still_holds(round_to: int) -> None:
    """A uniform ratio in steps of `round_to` passed 1.5x fewer MACs by far (2.54x at 8): the plan gives
    channels back, one step at a time, keeping the target and the held (pinned) groups."""
    model = _model("resnet20")
    graph = ChannelGraph(model, (1, 32, 32))
    scores, limits = score_groups(graph, "l1"), Limits(round_to=round_to)
    base = model_size(model, (1, 32, 32))
    measure = lambda plan: pruned_size(model, (1, 32, 32), scores, plan)  # noqa: E731
    solved = solve_target(measure, lambda knob: ratio_plan(graph, uniform_ratios(graph, knob), limits), "macs", 1.5,
                          base)
    held = {next(iter(solved.plan))}
    given = give_back(solved, measure, "macs", 1.5, base, scores, round_to, held=held)
    assert 1.5 <= given.factor < solved.factor and given.factor == base["macs"] / measure(given.plan)["macs"]
    assert all(given.plan[name] <= cut and (cut - given.plan[name]) % round_to == 0 for name, cut in solved.plan.items())
    assert all(given.plan[name] == solved.plan[name] for name in held) and given.plan != solved.plan
    _, report = prune(_model("resnet20"), PruneSection(target="macs", target_factor=1.5, round_to=round_to,
                                                       evaluate=False))
    assert 1.5 <= report.target["reached"] <= 1.04 * 1.5 and report.channels_given_back > 0


def test_unreachable_target_names_the_best_factor() -> None:
    with pytest.raises(PruningError, match=r"1000x smaller in macs .* is \d+\.\d\dx"):
        prune(_model("lenet5"), PruneSection(target="macs", target_factor=1000, evaluate=False))
    graph = ChannelGraph(_model("lenet5"), (1, 28, 28))
    with pytest.raises(PruningError, match="without emptying"):
        solve_target(lambda plan: {"macs": 100}, lambda knob: {}, "macs", 5.0, {"macs": 200})
    assert graph.groups


@pytest.mark.parametrize("text, message", [("macs", "METRIC:FACTOR"), ("flops:3", "METRIC:FACTOR"),
                                           ("macs:x", "number"), ("macs:0.5", "greater than 1")])
def test_bad_target_text(text: str, message: str) -> None:
    with pytest.raises(PruningError, match=message):
        parse_target(text)
    assert parse_target("params:4") == ("params", 4.0)


# ----------------------------------------------------------------------------- orders and the analysis report


def _analysis(model: nn.Module, graph: ChannelGraph, order: list[str], arch: str | None = None) -> dict:
    arch = arch or meta_of(model).arch
    return {"command": "analyze", "model": {"arch": arch, "fingerprint": model_fingerprint(arch, graph),
                                            "groups": [[g.name, g.width] for g in graph.all_groups]},
            "layers": [], "order": order, "baseline": {"top1": 0.9, "loss": 0.3}}


def test_orders(tmp_path: Path) -> None:
    model = _model("resnet20")
    graph = ChannelGraph(model, (1, 32, 32))
    names = [g.name for g in graph.groups]
    assert names[0] == "conv1" and layer_order(graph, "sequential") == names
    assert layer_order(graph, "reverse") == names[::-1]
    shuffled = layer_order(graph, "random", seed=1)
    assert sorted(shuffled) == sorted(names) and shuffled != names and shuffled == layer_order(graph, "random", seed=1)
    ranked = names[::-2]
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(_analysis(model, graph, ranked)))
    report = load_analysis(path, "resnet20", graph)
    order = layer_order(graph, "sensitivity", analysis=report)
    assert order[: len(ranked)] == ranked and sorted(order) == sorted(names)
    weights = order_weights(order, "sensitivity")
    assert weights[order[0]] == 1.0 and weights[order[-1]] == 0.5


def test_analysis_of_another_model_is_refused(tmp_path: Path) -> None:
    other = _model("resnet56")
    other_graph = ChannelGraph(other, (1, 32, 32))
    path = tmp_path / "other.json"
    path.write_text(json.dumps(_analysis(other, other_graph, [g.name for g in other_graph.groups])))
    graph = ChannelGraph(_model("resnet20"), (1, 32, 32))
    with pytest.raises(PruningError, match="another model"):
        load_analysis(path, "resnet20", graph)
    (tmp_path / "junk.json").write_text("{\"command\": \"train\"}")
    with pytest.raises(PruningError, match="not an analysis report"):
        load_analysis(tmp_path / "junk.json", "resnet20", graph)
    with pytest.raises(PruningError, match="not found"):
        load_analysis(tmp_path / "missing.json", "resnet20", graph)


def test_fingerprint_ignores_exclusions_but_not_widths() -> None:
    model = _model("resnet20")
    plain, excluded = ChannelGraph(model, (1, 32, 32)), ChannelGraph(model, (1, 32, 32), exclude=["layer1.*"])
    assert model_fingerprint("resnet20", plain) == model_fingerprint("resnet20", excluded)
    pruned, _ = prune(copy.deepcopy(model), PruneSection(ratio=0.25, evaluate=False))
    assert model_fingerprint("resnet20", ChannelGraph(pruned, (1, 32, 32))) != model_fingerprint("resnet20", plain)


def test_one_shot_sensitivity_target_prunes_least_sensitive_layers_more(tmp_path: Path) -> None:
    model = _model("vgg11_bn")
    graph = ChannelGraph(model, (1, 32, 32))
    ranked = [g.name for g in graph.groups][::-1]
    path = tmp_path / "analysis.json"
    path.write_text(json.dumps(_analysis(model, graph, ranked)))
    model, report = prune(model, PruneSection(target="macs", target_factor=2.0, order="sensitivity", analysis=path,
                                              evaluate=False))
    ratios = {row["name"]: row["ratio"] for row in report.layers}
    assert ratios[ranked[0]] > ratios[ranked[-1]] and report.target["met"]


# ----------------------------------------------------------------------------- accuracy-aware


def _fake_env(model: nn.Module, **kwargs) -> tuple[StepEnvironment, list[str]]:
    """An honest stand-in for training: accuracy falls when features.3 (LeNet's 2nd conv) drops below 8 filters."""
    calls: list[str] = []

    def evaluate(m: nn.Module) -> float:
        return 0.9 if m.features[3].out_channels >= 8 else 0.5

    base = model_size(model, (1, 28, 28))
    env = StepEnvironment(input_shape=(1, 28, 28), limits=Limits(max_ratio=0.9), step=0.25, max_drop=0.05,
                          score=lambda m, g, name: g.importance(name, "l1"), finetune=lambda m, name: calls.append(name),
                          evaluate=evaluate, drop=lambda before, after: before - after, target_met=lambda size: base["macs"] / size["macs"] >= 100, **kwargs)
    return env, calls


def test_accuracy_aware_backs_off_a_layer_that_drops_accuracy() -> None:
    model = _model("lenet5")
    order = ["features.3", "features.0", "classifier.1", "classifier.3"]
    env, finetuned = _fake_env(model)
    result = accuracy_aware(model, order, env)
    rows = result.rows
    conv2 = [r for r in rows if r["layer"] == "features.3"]
    assert [r["accepted"] for r in conv2] == [True, True, False]
    assert conv2[-1]["width_after"] == 4 and result.model.features[3].out_channels == 8
    assert result.ratios["features.3"] == 0.5 and not result.target_met
    assert result.ratios["features.0"] == pytest.approx(0.9) and result.ratios["classifier.1"] == pytest.approx(0.9)
    assert finetuned == [r["layer"] for r in rows]
    assert all({"layer", "ratio", "params", "macs", "val", "drop", "accepted"} <= set(r) for r in rows)
    assert all(r["drop"] == pytest.approx(result.baseline - r["val"]) for r in rows) and result.baseline == 0.9
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))


def test_accuracy_aware_jumps_to_suggested_ratios_and_steps_on_after_a_rejected_jump() -> None:
    model = _model("lenet5")
    order = ["features.3", "features.0"]
    env, finetuned = _fake_env(model, jumps={"features.3": 0.75, "features.0": 0.5})
    result = accuracy_aware(model, order, env)
    conv2 = [(r["kind"], r["ratio"], r["accepted"]) for r in result.rows if r["layer"] == "features.3"]
    # the jump to 0.75 leaves 4 filters (accuracy falls): undone, then steps of 0.25 from 0 as usual
    assert conv2 == [("jump", 0.75, False), ("step", 0.25, True), ("step", 0.5, True), ("step", 0.75, False)]
    conv1 = [(r["kind"], r["ratio"], r["accepted"]) for r in result.rows if r["layer"] == "features.0"]
    assert conv1[0] == ("jump", 0.5, True) and conv1[1][:2] == ("step", 0.75)
    assert result.model.features[3].out_channels == 8 and finetuned == [r["layer"] for r in result.rows]


def test_with_rollback_a_step_fine_tune_that_lowers_accuracy_is_undone() -> None:
    model = _model("lenet5")

    def harmful_finetune(m: nn.Module, name: str) -> int:
        with torch.no_grad():
            m.classifier[5].weight.zero_()  # what a bad fine-tune could do: the classifier forgets
        return 7

    def evaluate(m: nn.Module) -> float:
        return 0.2 if float(m.classifier[5].weight.detach().abs().sum()) == 0 else 0.9

    env, _ = _fake_env(model)
    env.finetune, env.evaluate = harmful_finetune, evaluate
    kept = accuracy_aware(model, ["features.0"], env)
    assert [(r["val"], r["finetune_kept"], r["accepted"]) for r in kept.rows] == [(0.2, True, False)]
    env.rollback = True
    result = accuracy_aware(model, ["features.0"], env)
    assert result.rows and all(r["accepted"] and not r["finetune_kept"] for r in result.rows)
    assert all(r["finetune_steps"] == 7 and r["val"] == r["val_pruned"] == 0.9 for r in result.rows)
    assert float(result.model.classifier[5].weight.detach().abs().sum()) > 0


def test_accuracy_aware_stops_at_the_target() -> None:
    model = _model("lenet5")
    env, _ = _fake_env(model)
    base = model_size(model, (1, 28, 28))["macs"]
    env.target_met = lambda size: base / size["macs"] >= 1.5
    result = accuracy_aware(model, ["features.0", "features.3"], env)
    assert result.target_met and result.rows[-1]["target_met"]
    assert base / model_size(result.model, (1, 28, 28))["macs"] >= 1.5


class _Rows(Observer):
    """Keeps the structured rows a command sends."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, dict]] = []

    def row(self, kind: str, row: dict) -> None:
        self.rows.append((kind, dict(row)))


@needs_fmnist
def test_accuracy_aware_end_to_end_on_fashion_mnist() -> None:
    from dnnprune.loaders import train_loader
    from dnnprune.recipe import DataSection, FineTuneSection, TrainSection
    from dnnprune.training import fit_loop

    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    data = DataSection(train_limit=2000, batch_size=256)
    fit_loop(model, train_loader(meta_of(model), data, 64, 0), TrainSection(max_steps=40, lr=0.05, eval_every_epoch=False),
             device=torch.device("cpu"))
    config = PruneSection(target="macs", target_factor=2.0, accuracy_aware=True, strategy="round-robin", step=0.3,
                          max_accuracy_drop=0.05, val_samples=300, samples=300, criterion="taylor", taylor_batches=1,
                          step_finetune=FineTuneSection(max_steps=3, epochs=1, lr=0.01),
                          finetune=FineTuneSection(max_steps=5, epochs=1, lr=0.01))
    observer = _Rows()
    model, report = prune(model, config, data=data, observer=observer)
    seen = [row for kind, row in observer.rows if kind == "prune.step"]
    assert report.steps == seen and seen
    assert all({"val", "val_pruned", "drop", "accepted"} <= set(row) for row in seen)
    assert (report.primary_metric, report.higher_is_better) == ("top1", True)
    assert report.baseline_val is not None and 0.0 <= report.baseline_val <= 1.0
    assert report.before["test"]["samples"] == 300 and report.after["val"] is not None
    assert report.accuracy_drop["test"] == pytest.approx(report.before["test"]["top1"] - report.after["test"]["top1"])
    assert report.final_finetune["steps"] == 5 and report.seconds["total"] > 0
    assert report.target["met"] == (report.target["reached"] >= 2.0)
    assert meta_of(model).lineage[-1].command == "prune"


@needs_fmnist
def test_accuracy_aware_increments_accept_the_taylor_criterion() -> None:
    from dnnprune.recipe import DataSection, FineTuneSection

    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    config = PruneSection(target="macs", target_factor=1.5, accuracy_aware=True, max_accuracy_drop=0.5,
                          val_samples=200, samples=200, criterion="taylor", taylor_batches=1, increments=1,
                          step_finetune=FineTuneSection(max_steps=1, epochs=1, lr=0.01))
    model, report = prune(model, config, data=DataSection(train_limit=500, batch_size=256))
    assert report.mode == "accuracy-aware-increments" and report.target["met"]


@needs_fmnist
def test_accuracy_aware_increments_hold_a_recipe_ratio_pattern() -> None:
    """`ratios` patterns pin those layers' widths in increments too (they were ignored there before)."""
    from dnnprune.recipe import DataSection, FineTuneSection

    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    config = PruneSection(target="macs", target_factor=1.5, accuracy_aware=True, max_accuracy_drop=0.5,
                          val_samples=200, samples=200, increments=1, ratios={"features.0": 0.5},
                          step_finetune=FineTuneSection(max_steps=1, epochs=1, lr=0.01))
    model, report = prune(model, config, data=DataSection(train_limit=500, batch_size=256))
    assert report.mode == "accuracy-aware-increments" and report.target["met"]
    assert model.features[0].out_channels == 3


@needs_fmnist
def test_accuracy_aware_increments_priced_in_measured_ms_use_and_keep_a_table(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from dnnprune.latency import table_dir
    from dnnprune.recipe import DataSection, FineTuneSection

    monkeypatch.setenv("DNNPRUNE_CACHE", str(tmp_path))
    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    config = PruneSection(target="macs", target_factor=1.5, accuracy_aware=True, max_accuracy_drop=0.5,
                          val_samples=200, samples=200, increments=1, plan_cost="latency", latency_runtime="fused",
                          latency_batch=4, latency_repeats=2,
                          step_finetune=FineTuneSection(max_steps=1, epochs=1, lr=0.01))
    model, report = prune(model, config, data=DataSection(train_limit=500, batch_size=256))
    assert report.mode == "accuracy-aware-increments" and report.target["met"]
    tables = list(table_dir().glob("*.json"))
    assert len(tables) == 1 and all(key.startswith("fused|") for key in json.loads(tables[0].read_text()))


@needs_fmnist
@pytest.mark.parametrize("plan_cost", ["none", "latency"])
def test_latency_widths_are_timed_on_the_reported_runtime_in_one_shared_table(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan_cost: str) -> None:
    """Widths rounded to the fastest nearby ones are timed on `latency_runtime` (they were timed eager
    whatever the runtime), in the one table the ms-priced plans also use (two copies of the file each
    saved over the other's entries)."""
    import dnnprune.pruning.command as command
    from dnnprune.latency import LayerTable, table_dir
    from dnnprune.recipe import DataSection, FineTuneSection

    built: list[str] = []

    class Counted(LayerTable):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
            built.append(self.runtime)

    monkeypatch.setattr(command, "LayerTable", Counted)
    monkeypatch.setenv("DNNPRUNE_CACHE", str(tmp_path))
    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    config = PruneSection(target="macs", target_factor=1.5, accuracy_aware=True, max_accuracy_drop=0.5,
                          val_samples=200, samples=200, increments=1, plan_cost=plan_cost, latency_widths=True,
                          latency_runtime="fused", latency_batch=4, latency_repeats=2, width_search=2,
                          step_finetune=FineTuneSection(max_steps=1, epochs=1, lr=0.01))
    prune(model, config, data=DataSection(train_limit=500, batch_size=256))
    assert built == ["fused"]
    tables = list(table_dir().glob("*.json"))
    assert len(tables) == 1
    keys = json.loads(tables[0].read_text())
    assert keys and all(key.startswith("fused|") for key in keys)


def test_pruned_size_leaves_the_original_alone() -> None:
    model = _model("resnet20")
    graph = ChannelGraph(model, (1, 32, 32))
    before = model_size(model, (1, 32, 32))
    size = pruned_size(model, (1, 32, 32), score_groups(graph, "l1"), {"conv1": 8})
    assert size["macs"] < before["macs"] and model_size(model, (1, 32, 32)) == before


def test_quantized_checkpoints_are_refused() -> None:
    model = _model("lenet5")
    meta_of(model).encodings = {"classifier.1.weight": c.Encoding(values=c.KMeansSpec(bits=4))}
    with pytest.raises(PruningError, match="quantized"):
        prune(model, PruneSection(ratio=0.5, evaluate=False))


@needs_fmnist
def test_prune_and_quantize_fine_tunes_distil_from_their_input(monkeypatch: pytest.MonkeyPatch) -> None:
    import dnnprune.training as training
    from dnnprune.quantization import quantize
    from dnnprune.recipe import DataSection, FineTuneSection, QuantizeSection

    teachers: list[nn.Module] = []
    original = training._with_distillation

    def spy(loss: torch.Tensor, output: torch.Tensor, inputs: torch.Tensor, teacher: nn.Module, *args: object) -> torch.Tensor:
        teachers.append(teacher)
        return original(loss, output, inputs, teacher, *args)  # type: ignore[arg-type]

    monkeypatch.setattr("dnnprune.training._with_distillation", spy)
    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    data = DataSection(train_limit=512, batch_size=128)
    reference = copy.deepcopy(model).eval()
    probe = torch.randn(2, *meta_of(model).input_shape)
    pruned, _ = prune(model, PruneSection(ratio=0.5, evaluate=False, finetune=FineTuneSection(max_steps=4, distill=0.8)),
                      data=data)
    assert len(teachers) == 4 and all(t is teachers[0] for t in teachers)
    with torch.no_grad():
        assert torch.equal(teachers[0](probe), reference(probe))
    frozen = copy.deepcopy(pruned).eval()
    teachers.clear()
    quantize(pruned, QuantizeSection(bits=4, evaluate=False, finetune=FineTuneSection(max_steps=3, epochs=1, distill=0.5)),
             data=data)
    assert len(teachers) == 3
    with torch.no_grad():
        assert torch.equal(teachers[0](probe), frozen(probe))  # the float model, before its codes


def test_latency_target_is_solved_by_measurement() -> None:
    """`--target latency:F` bisects on measured speedups; the report's reached speedup is the measured one."""
    model = _model("vgg11_bn")
    base_macs = model_size(model, (1, 32, 32))["macs"]
    model, report = prune(model, PruneSection(target="latency", target_factor=1.5, latency_batch=8, latency_repeats=5,
                                              evaluate=False))
    assert model_size(model, (1, 32, 32))["macs"] < base_macs / 1.3  # it had to remove real work to get faster
    speedups = {row["batch_size"]: row["speedup"] for row in report.latency["rows"]}
    assert sorted(speedups) == [1, 8] and report.target["reached"] == pytest.approx(speedups[8])
    assert report.target["tolerance"] == 0.05
    assert report.target["met"] == (speedups[8] >= 1.5 * 0.95)
    assert len(report.target["search"]) >= 9  # the cap, 7 bisection steps and at least one verification


def test_within_budget_undoes_only_a_confident_drop() -> None:
    """The paired rule shared by increments and the final fine-tune: a dip inside the evaluation's noise is
    kept, a drop beyond it is not; without an error estimate (or at confidence 0) the plain comparison."""
    from dnnprune.tasks import within_budget

    assert within_budget(0.003, 0.004, 0.0, 0.95)  # 0.3 points on a noise of 0.4: kept (the plain rule undid it)
    assert not within_budget(0.003, 0.004, 0.0, 0.0)
    assert not within_budget(0.02, 0.004, 0.0, 0.95)
    assert within_budget(0.02, 0.004, 0.025, 0.95) and not within_budget(0.04, 0.004, 0.025, 0.95)
    assert within_budget(-0.01, None, 0.0, 0.95) and not within_budget(0.001, None, 0.0, 0.95)


@needs_fmnist
def test_a_final_fine_tune_that_ruins_val_is_undone() -> None:
    """Accuracy-aware: a final fine-tune that wrecks the model (lr 50) is undone and reported with its paired
    drop and error; the model is left as the increments made it."""
    from dnnprune.loaders import train_loader
    from dnnprune.recipe import DataSection, FineTuneSection, TrainSection
    from dnnprune.training import fit_loop

    torch.manual_seed(0)
    model = _model("lenet5")
    meta_of(model).dataset = "fashion-mnist"
    data = DataSection(train_limit=2000, batch_size=256)
    fit_loop(model, train_loader(meta_of(model), data, 64, 0), TrainSection(max_steps=150, lr=0.1, momentum=0.9,
                                                                          eval_every_epoch=False),
             device=torch.device("cpu"))  # well above chance, so that a ruinous fine-tune has something to ruin
    config = PruneSection(target="macs", target_factor=1.2, accuracy_aware=True, max_accuracy_drop=0.05,
                          val_samples=300, samples=200, increments=1,
                          step_finetune=FineTuneSection(max_steps=2, epochs=1, lr=0.01),
                          finetune=FineTuneSection(max_steps=3, epochs=1, lr=50.0))
    model, report = prune(model, config, data=data)
    final = report.final_finetune
    assert final["steps"] == 3 and final["kept"] is False
    assert final["drop"] > 0 and final["drop_stderr"] is not None and final["drop"] > 1.645 * final["drop_stderr"]
    assert final["val_after"] < final["val_before"]
    assert report.after["val"]["top1"] == pytest.approx(final["val_before"], abs=0.02)


def test_a_bytes_target_on_a_sparse_model_counts_the_bytes_its_file_stores(tmp_path: Path) -> None:
    """Solved on dense float32 bytes, `--target bytes:2` on a double-pruned model reported 2.00x met while
    its file shrank 1.88x; the target is now what the stored (sparse) tensors lose."""
    from safetensors import safe_open

    import dnnprune
    from dnnprune.pruning.double import double_prune
    from dnnprune.recipe import DoublePruneSection
    from tests.conftest import make_checkpoint

    torch.manual_seed(0)
    lenet = dnnprune.load(make_checkpoint(tmp_path / "lenet5.safetensors"))
    sparse, _ = double_prune(lenet, DoublePruneSection(slimming_ratio=0, sparsity=0.7, evaluate=False))
    save(sparse, tmp_path / "sparse.safetensors")
    pruned, report = prune(dnnprune.load(tmp_path / "sparse.safetensors"),
                           PruneSection(target="bytes", target_factor=1.5, evaluate=False))
    save(pruned, tmp_path / "pruned.safetensors")

    def tensor_bytes(path: Path) -> int:
        with safe_open(str(path), framework="pt") as handle:
            return sum(handle.get_tensor(key).nbytes for key in handle.keys())

    before, after = tensor_bytes(tmp_path / "sparse.safetensors"), tensor_bytes(tmp_path / "pruned.safetensors")
    assert report.before["bytes"] == before and report.after["bytes"] == after
    assert report.target is not None and report.target["met"] and before / after >= 1.5
    assert meta_of(pruned).encodings  # still stored sparse


def test_layer_granularity_refuses_what_it_would_ignore_and_keeps_excluded_units(tmp_path: Path) -> None:
    import dnnprune
    from tests.conftest import make_checkpoint

    resnet = make_checkpoint(tmp_path / "resnet20.safetensors", "resnet20", input_shape=(1, 32, 32))
    refused = [({"target": "latency", "target_factor": 2.0}, "takes --target params:F or macs:F, not latency"),
               ({"remove": 1, "criterion": "taylor"}, "prune.criterion shapes channel pruning"),
               ({"remove": 1, "round_to": 8, "latency_widths": True}, "prune.round_to, prune.latency_widths shape"),
               ({"remove": 1, "exclude": ["layer*"]}, "keeps every removable unit"),
               ({"units": ["layer1.0"], "target": "params", "target_factor": 1.2}, "drop --target (prune.target)"),
               ({"remove": 1, "target": "params", "target_factor": 1.2}, "say how much to remove twice"),
               ({"units": ["layer3.2"], "exclude": ["layer3.2"]}, "--units names layer3.2, which --exclude keeps")]
    for fields, fragment in refused:
        with pytest.raises(PruningError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
            prune(dnnprune.load(resnet), PruneSection(granularity="layer", evaluate=False, **fields))
    pruned, report = prune(dnnprune.load(resnet), PruneSection(granularity="layer", remove=3, order="reverse",
                                                              exclude=["layer3.2.conv1", "layer3.1"], evaluate=False))
    assert [step["unit"] for step in report.steps] == ["layer3.0", "layer2.2", "layer2.1"]
    assert not isinstance(pruned.layer3[2], nn.Identity) and not isinstance(pruned.layer3[1], nn.Identity)


def test_layer_pruning_reports_latency_when_asked() -> None:
    model = attach_meta(create_model("resnet20", num_classes=10, in_channels=1),
                        CheckpointMeta(arch="resnet20", arch_args={"num_classes": 10, "in_channels": 1},
                                       input_shape=(1, 32, 32)))
    _, report = prune(model, PruneSection(granularity="layer", remove=2, evaluate=False, report_latency=True,
                                          latency_batch=2, latency_repeats=3))
    assert report.latency is not None and [row["batch_size"] for row in report.latency["rows"]] == [1, 2]
    assert all(row["before_ms"] > 0 and row["after_ms"] > 0 for row in report.latency["rows"])


class _Shuffle(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)


def test_a_model_with_every_group_locked_is_refused_with_the_reason_and_what_else_to_do() -> None:
    """A ViT's MLP Linears, or convs feeding channel shuffles, are locked; the refusal used to say only
    'all excluded, locked or output layers'."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), _Shuffle(), nn.Conv2d(8, 8, 3, padding=1), _Shuffle(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    meta = CheckpointMeta(arch="lenet5", arch_args={}, input_shape=(1, 8, 8))
    with pytest.raises(PruningError) as caught:
        prune(attach_meta(model, meta), PruneSection(ratio=0.5, evaluate=False))
    message = str(caught.value)
    assert "has no prunable channel group" in message and "locked, e.g." in message and "channel shuffle" in message
    assert "`quantize`" in message and "--slimming-ratio 0" in message
