"""double-prune on tiny models: network slimming (one global |gamma| threshold, floors, coupled channels,
physical removal), then gradual magnitude pruning (target reached, layer and global thresholds, lighter
first/last layers, min_density, cubic ramp, masks held), sparse storage and reload, the report, and CSR
execution of Linear layers."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import dnnprune
import dnnprune.training as training
from dnnprune.checkpoint import CheckpointMeta, attach_meta, meta_of, save
from dnnprune.data import DATASETS, default_spec
from dnnprune.errors import PruningError
from dnnprune.metrics import count_parameters
from dnnprune.models import create_model
from dnnprune.observe import NULL_OBSERVER
from dnnprune.pruning.double import DoublePruneReport, double_prune
from dnnprune.pruning.slimming import PLAIN_LAMBDA, RESIDUAL_LAMBDA
from dnnprune.pruning.unstructured import GradualPruner, cubic_fraction, plan_sparsity
from dnnprune.recipe import DataSection, DoublePruneSection, FineTuneSection
from dnnprune.sparse_exec import SparseLinear, measure_linears, with_sparse_linears
from dnnprune.surgery import ChannelGraph
from tests.conftest import FMNIST_DIR, make_checkpoint, needs_fmnist
from tests.reload import record_io, reload_in_new_process

CPU = torch.device("cpu")
SHAPE = (1, 16, 16)
PRUNABLE = (nn.Conv2d, nn.Linear)


@pytest.fixture(scope="module")
def resnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ResNet-20 (residual, 448 BN channels in 11 groups) at 16x16: small enough to slim in a second."""
    return make_checkpoint(tmp_path_factory.mktemp("double") / "resnet20.safetensors", "resnet20", input_shape=SHAPE)


@pytest.fixture
def resnet(resnet_file: Path) -> nn.Module:
    return dnnprune.load(resnet_file)


def _double(model: nn.Module, data: DataSection | None = None, **section: Any) -> tuple[nn.Module, DoublePruneReport]:
    config = DoublePruneSection(**{"evaluate": False, **section})
    return double_prune(model, config, data=data or DataSection(), device=CPU, observer=NULL_OBSERVER)


def _bn_groups(model: nn.Module, shape: tuple[int, ...] = SHAPE) -> dict[str, list[str]]:
    """Channel group -> the BatchNorms in it (coupled channels share one group)."""
    graph = ChannelGraph(model, shape)
    return {g.name: [m for m in g.members if isinstance(model.get_submodule(m), nn.BatchNorm2d)] for g in graph.groups}


def _set_gammas(model: nn.Module, bns: list[str], values: torch.Tensor, beta: torch.Tensor | None = None) -> None:
    with torch.no_grad():
        for name in bns:
            bn = model.get_submodule(name)
            bn.weight.copy_(values)
            if beta is not None:
                bn.bias.copy_(beta)


def _prunable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, PRUNABLE)}


def _zeros(model: nn.Module) -> dict[str, int]:
    return {n: int((w == 0).sum()) for n, w in _prunable(model).items()}


def _in_memory(arch: str, shape: tuple[int, int, int]) -> nn.Module:
    """Like make_checkpoint, without the file: a registered model with its metadata attached."""
    spec = default_spec("fashion-mnist")
    args = {"num_classes": 10, "in_channels": shape[0]}
    meta = CheckpointMeta(arch=arch, arch_args=args, input_shape=shape, mean=spec.mean * shape[0],
                          std=spec.std * shape[0], dataset="fashion-mnist",
                          classes=list(DATASETS["fashion-mnist"].classes))
    return attach_meta(create_model(arch, **args), meta)


# ----------------------------------------------------------------------------- network slimming


def test_slimming_removes_the_lowest_gammas_over_all_layers(resnet: nn.Module) -> None:
    groups = _bn_groups(resnet)
    generator = torch.Generator().manual_seed(1)
    scores: dict[str, torch.Tensor] = {}
    for i, (name, bns) in enumerate(groups.items()):
        width = resnet.get_submodule(bns[0]).num_features
        # Groups on different scales (0.6x .. 1x), so a global threshold takes unequal shares per layer;
        # negative gammas count by their magnitude.
        magnitudes = (0.6 + 0.4 * (i % 4) / 3) * (0.5 + torch.rand(width, generator=generator))
        signs = torch.where(torch.rand(width, generator=generator) < 0.3, -1.0, 1.0)
        _set_gammas(resnet, bns, magnitudes * signs)
        scores[name] = magnitudes
    total = sum(s.numel() for s in scores.values())
    budget = round(0.4 * total)
    ranked = sorted((float(v), name, idx) for name, s in scores.items() for idx, v in enumerate(s))
    expected = {name: sorted(idx for _, n, idx in ranked[:budget] if n == name) for name in scores}
    for name, removed in expected.items():  # the test's premise: no floor binds, so the cut is purely global
        assert len(removed) <= scores[name].numel() - max(2, math.ceil(0.05 * scores[name].numel()))
    assert len({len(v) / scores[k].numel() for k, v in expected.items()}) > 3, "layers should lose unequal shares"
    original = {bn: resnet.get_submodule(bn).weight.detach().clone() for bns in groups.values() for bn in bns}

    model, report = _double(resnet, slimming_ratio=0.4, sparsity=0.0)

    slimming = report.slimming
    assert slimming["channels"] == total == 448
    assert slimming["removed"] == budget == sum(slimming["removed_per_layer"].values())
    assert slimming["threshold"] == pytest.approx(ranked[budget - 1][0])
    for name, removed in expected.items():
        assert slimming["widths_after"][name] == scores[name].numel() - len(removed), name
        kept = [i for i in range(scores[name].numel()) if i not in removed]
        for bn in groups[name]:  # the surviving channels are exactly the ones above the threshold
            assert torch.equal(model.get_submodule(bn).weight.detach(), original[bn][kept]), bn
    assert model(torch.randn(2, *SHAPE)).shape == (2, 10)


@pytest.mark.parametrize("min_channels, min_fraction, kept", [(2, 0.05, 2), (5, 0.05, 5), (1, 0.25, 8)])
def test_slimming_never_empties_a_layer(resnet: nn.Module, min_channels: int, min_fraction: float, kept: int) -> None:
    groups = _bn_groups(resnet)
    generator = torch.Generator().manual_seed(2)
    for bns in groups.values():
        width = resnet.get_submodule(bns[0]).num_features
        _set_gammas(resnet, bns, 0.5 + torch.rand(width, generator=generator))
    dead = "layer2.1.conv1"  # 32 channels, all scaled to ~0: a bare global threshold would take them all
    _set_gammas(resnet, groups[dead], torch.full((32,), 1e-8))

    model, report = _double(resnet, slimming_ratio=0.2, sparsity=0.0, min_channels=min_channels,
                            min_fraction=min_fraction)

    assert model.get_submodule(dead).out_channels == kept
    assert model.get_submodule("layer2.1.bn1").num_features == kept
    assert report.slimming["widths_after"][dead] == kept
    assert report.slimming["removed"] == round(0.2 * 448)  # the rest of the budget went to other layers
    assert all(width >= max(min_channels, math.ceil(min_fraction * report.slimming["widths_before"][name]))
               for name, width in report.slimming["widths_after"].items())
    assert torch.isfinite(model(torch.randn(2, *SHAPE))).all()


def test_slimming_removes_coupled_residual_channels_together(resnet: nn.Module) -> None:
    """Channels of the stage-1 residual stream pass through conv1/bn1 and every block's conv2/bn2: they go
    from all of those at once, and from the inputs of every layer that reads the stream."""
    groups = _bn_groups(resnet)
    generator = torch.Generator().manual_seed(3)
    for bns in groups.values():
        width = resnet.get_submodule(bns[0]).num_features
        _set_gammas(resnet, bns, 0.5 + torch.rand(width, generator=generator))
    stream = groups["conv1"]
    assert {"bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"} <= set(stream)
    dead = [1, 5, 9]
    gamma = 0.5 + torch.rand(16, generator=generator)
    beta = torch.zeros(16)
    gamma[dead] = 0.0  # these channels carry exact zeros everywhere in the stream: removing them changes nothing
    _set_gammas(resnet, stream, gamma, beta)
    keep = [i for i in range(16) if i not in dead]
    before = copy.deepcopy(resnet).eval()
    sample = torch.randn(4, *SHAPE)

    model, report = _double(resnet, slimming_ratio=3 / 448, sparsity=0.0)

    produce = ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    read = ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"]
    for name in produce:
        assert torch.equal(model.get_submodule(name).weight, before.get_submodule(name).weight[keep]), name
    for name in read:
        assert torch.equal(model.get_submodule(name).weight, before.get_submodule(name).weight[:, keep]), name
    for name in stream:
        assert model.get_submodule(name).num_features == 13, name
    assert report.slimming["removed_per_layer"] == {"conv1": 3}
    unchanged = {k: v for k, v in report.slimming["widths_after"].items() if k != "conv1"}
    assert unchanged == {k: v for k, v in report.slimming["widths_before"].items() if k != "conv1"}
    with torch.inference_mode():
        torch.testing.assert_close(model.eval()(sample), before(sample), rtol=1e-5, atol=1e-5)


def test_slimming_removes_channels_physically(resnet: nn.Module, resnet_file: Path, tmp_path: Path) -> None:
    params_before = count_parameters(resnet)
    model, report = _double(resnet, slimming_ratio=0.5, sparsity=0.0)
    before, slimmed = report.stages[0], report.stages[1]
    assert [s["stage"] for s in report.stages] == ["before", "slimmed", "after_slimming", "final"]
    assert before["params"] == params_before
    assert slimmed["params"] == count_parameters(model) < 0.75 * params_before
    assert slimmed["macs"] < 0.6 * before["macs"]
    assert report.totals["macs_reduction"] == pytest.approx(before["macs"] / slimmed["macs"])
    assert report.parameter_pruning is None and not meta_of(model).encodings  # nothing stored sparse
    out = save(model, tmp_path / "slim.safetensors")
    assert out.stat().st_size < 0.75 * resnet_file.stat().st_size
    assert dnnprune.load(out).get_submodule("conv1").out_channels == model.get_submodule("conv1").out_channels


def test_slimming_lambda_defaults_and_override(resnet: nn.Module) -> None:
    _, residual = _double(copy.deepcopy(resnet), slimming_ratio=0.3, sparsity=0.0)
    assert residual.slimming["lambda"] == RESIDUAL_LAMBDA == 1e-5
    assert residual.slimming["residual"] is True and residual.slimming["lambda_default"] is True
    _, given = _double(resnet, slimming_ratio=0.3, sparsity=0.0, sparsity_lambda=3e-4)
    assert given.slimming["lambda"] == 3e-4 and given.slimming["lambda_default"] is False
    plain = _in_memory("vgg11_bn", (1, 32, 32))
    _, report = _double(plain, slimming_ratio=0.3, sparsity=0.0)
    assert report.slimming["lambda"] == PLAIN_LAMBDA == 1e-4 and report.slimming["residual"] is False
    assert report.slimming["skipped_without_bn"] == ["classifier.1"]  # the hidden Linear has no BN to rank by


# ----------------------------------------------------------------------------- parameter pruning


@pytest.mark.parametrize("threshold", ["layer", "global"])
def test_parameter_pruning_reaches_the_target_with_one_threshold(resnet: nn.Module, threshold: str) -> None:
    original = {n: w.detach().clone() for n, w in _prunable(resnet).items()}
    model, report = _double(resnet, slimming_ratio=0.0, sparsity=0.7, threshold=threshold)
    weights = _prunable(model)
    total = sum(w.numel() for w in weights.values())
    zeros = _zeros(model)
    assert abs(sum(zeros.values()) - round(0.7 * total)) <= len(weights)  # within one weight per layer
    pruning = report.parameter_pruning
    assert pruning["reached_sparsity"] == pytest.approx(sum(zeros.values()) / total)
    assert pruning["threshold"] == threshold
    for name, sparsity in pruning["layer_sparsity"].items():
        assert zeros[name] == round(sparsity * weights[name].numel()), name
    # One knob for all heavy layers: every pruned weight is below it, every kept one at or above it,
    # measured on |w| (global) or on |w| / std of the layer (Han's quality x std).
    heavy = [n for n in weights if n not in ("conv1", "fc")]
    pruned_max, kept_min = 0.0, math.inf
    for name in heavy:
        scale = float(original[name].double().std()) if threshold == "layer" else 1.0
        magnitude = original[name].abs().double() / scale
        pruned = weights[name] == 0
        pruned_max = max(pruned_max, float(magnitude[pruned].max()))
        kept_min = min(kept_min, float(magnitude[~pruned].min()))
        assert torch.equal(weights[name][~pruned], original[name][~pruned]), name  # kept weights untouched
    assert pruned_max <= pruning["knob"] <= kept_min * (1 + 1e-9)
    if threshold == "layer":  # per-layer thresholds differ: layers do not all get the same sparsity
        assert len({round(pruning["layer_sparsity"][n], 2) for n in heavy}) > 1


def test_first_and_last_layers_get_a_fraction_of_the_sparsity(resnet: nn.Module) -> None:
    model, report = _double(resnet, slimming_ratio=0.0, sparsity=0.8, first_last_factor=0.25)
    zeros = _zeros(model)
    assert zeros["conv1"] == round(0.25 * 0.8 * 144)  # the first conv: 16 x 1 x 3 x 3
    assert zeros["fc"] == round(0.25 * 0.8 * 640)  # the output layer: 10 x 64
    rest = [r for r in report.layers if r["name"] not in ("conv1", "fc")]
    assert sum(r["params"] - r["nonzero"] for r in rest) / sum(r["params"] for r in rest) > 0.8


def test_min_density_keeps_a_floor_under_a_global_threshold(resnet: nn.Module) -> None:
    with torch.no_grad():  # one layer on a tiny scale: a bare global threshold would empty it
        resnet.get_submodule("layer2.1.conv1").weight.mul_(1e-3)
    model, report = _double(resnet, slimming_ratio=0.0, sparsity=0.8, threshold="global", min_density=0.1)
    layer = model.get_submodule("layer2.1.conv1").weight
    assert int(torch.count_nonzero(layer)) == math.ceil(0.1 * layer.numel())
    assert all(r["density"] >= 0.1 for r in report.layers)
    total = sum(r["params"] for r in report.layers)
    assert abs(sum(r["params"] - r["nonzero"] for r in report.layers) - round(0.8 * total)) <= len(report.layers)


@pytest.mark.parametrize("slimming_ratio, sparsity, min_density", [(0.0, 0.95, 0.1), (0.5, 0.95, 0.1),
                                                                    (0.9, 0.945, 0.05)])
def test_unreachable_sparsity_fails_before_touching_the_model(resnet: nn.Module, slimming_ratio: float,
                                                              sparsity: float, min_density: float) -> None:
    """The last case is reachable on ResNet-20 as it is (0.9486) but not once slimming has shrunk its
    layers (about 0.93): it must fail before the slimming, not after it (and after training)."""
    original = copy.deepcopy(resnet.state_dict())
    with pytest.raises(PruningError, match="would empty layers.*lower --sparsity"):
        _double(resnet, slimming_ratio=slimming_ratio, sparsity=sparsity, min_density=min_density)
    assert all(torch.equal(original[k], v) for k, v in resnet.state_dict().items())
    assert resnet.get_submodule("conv1").out_channels == 16
    if slimming_ratio == 0.9:
        _double(copy.deepcopy(resnet), slimming_ratio=0.0, sparsity=sparsity, min_density=min_density)  # reachable


def test_cubic_fraction_follows_zhu_and_gupta() -> None:
    assert cubic_fraction(0, 10) == 0.0
    assert cubic_fraction(5, 10) == pytest.approx(1 - 0.5 ** 3)
    assert cubic_fraction(2, 10) == pytest.approx(1 - 0.8 ** 3)
    assert cubic_fraction(10, 10) == cubic_fraction(12, 10) == cubic_fraction(3, 0) == 1.0
    steps = [cubic_fraction(t, 20) for t in range(21)]
    increments = [b - a for a, b in zip(steps, steps[1:])]
    assert all(d > 0 for d in increments)  # rises at every step ...
    assert all(later < earlier for earlier, later in zip(increments, increments[1:]))  # ... fast first, then slower


def test_gradual_pruner_ramps_cubically_and_holds_masks_under_momentum_and_weight_decay() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 4))
    names = ["0", "2", "5", "7"]
    weights = {n: model.get_submodule(n).weight for n in names}
    plan = plan_sparsity(weights, 0.8, threshold="layer", light={"0", "7"}, factor=0.5, min_density=0.01)
    pruner = GradualPruner(model, plan, total_steps=20, ramp=0.5, every=3)
    assert pruner.ramp_steps == 10
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    start = {n: w.detach().clone() for n, w in weights.items()}
    previous = {n: torch.zeros_like(w, dtype=torch.bool) for n, w in weights.items()}
    fraction = 0.0
    for step in range(1, 21):
        optimizer.zero_grad()
        model(torch.randn(16, 1, 8, 8)).square().mean().backward()
        optimizer.step()
        pruner(model)
        if step <= 10 and (step % 3 == 0 or step == 10):
            fraction = cubic_fraction(step, 10)
        for name, weight in weights.items():
            zero = weight == 0
            size = weight.numel()
            assert int(zero.sum()) == round(fraction * (size - plan.keep[name])), (step, name)
            assert bool(zero[previous[name]].all()), (step, name)  # a pruned weight never comes back
            previous[name] = zero
    pruner.finish()
    assert not pruner.hooks
    for name, weight in weights.items():
        assert int(torch.count_nonzero(weight)) == plan.keep[name]
        assert not torch.equal(weight[weight != 0], start[name][weight != 0])  # the kept weights did train


def test_gradual_pruner_never_revives_a_weight_that_momentum_moved() -> None:
    """Between re-zeroings an optimizer step with momentum moves pruned weights (their gradient is masked,
    their momentum is not); the next pruning event must still leave them pruned, not rank them by size."""
    torch.manual_seed(0)
    layer = nn.Linear(20, 10)
    model = nn.Sequential(layer)
    plan = plan_sparsity({"0": layer.weight}, 0.8, threshold="layer", light=set(), factor=1.0, min_density=0.01)
    pruner = GradualPruner(model, plan, total_steps=4, ramp=1.0, every=2)
    pruner.tighten(0.5)
    pruned = layer.weight == 0
    assert int(pruned.sum()) == round(0.5 * 0.8 * 200)
    with torch.no_grad():  # what one momentum step does to pruned weights before `apply` re-zeroes them
        layer.weight[pruned] = 10.0
    pruner.tighten(1.0)
    assert int(torch.count_nonzero(layer.weight)) == plan.keep["0"] == 40
    assert bool((layer.weight[pruned] == 0).all())


def test_pruned_layers_get_the_sparse_encoding(resnet: nn.Module) -> None:
    model, report = _double(resnet, slimming_ratio=0.3, sparsity=0.6)
    encodings = meta_of(model).encodings
    layers = _prunable(model)
    assert set(encodings) == {f"{n}.weight" for n in layers}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE):
            bits = 5 if isinstance(module, nn.Linear) else 8
            assert encodings[f"{name}.weight"].model_dump(mode="json") == {"sparse": {"index_bits": bits}}
    rows = {r["name"]: r for r in report.layers}
    assert set(rows) == set(layers)
    for name, weight in layers.items():
        assert rows[name]["encoding"] == {"sparse": {"index_bits": 5 if name == "fc" else 8}}
        assert rows[name]["nonzero"] == int(torch.count_nonzero(weight))
        assert rows[name]["density"] == pytest.approx(rows[name]["nonzero"] / weight.numel())
        assert rows[name]["shape"] == list(weight.shape)


# ----------------------------------------------------------------------------- storage and reload


def test_sparse_file_shrinks_by_about_the_nonzero_factor(resnet: nn.Module, tmp_path: Path) -> None:
    model, report = _double(resnet, slimming_ratio=0.0, sparsity=0.9)
    path = tmp_path / "sparse.safetensors"
    save(model, path)
    fp32 = report.stages[0]["params"] * 4
    nonzero_factor = report.totals["nonzero_reduction"]
    file_factor = fp32 / path.stat().st_size
    assert nonzero_factor > 8.0
    # float32 values plus 8-bit relative indices (or a 1-bit mask): between half and all of the non-zero factor
    assert 0.5 * nonzero_factor < file_factor < nonzero_factor
    assert abs(report.totals["predicted_file_bytes"] - path.stat().st_size) < 4096  # only the lineage differs
    assert report.totals["effective_bits_per_weight"] == pytest.approx(8 * report.stages[-1]["bytes"] / report.stages[-1]["params"])
    reloaded = dnnprune.load(path)
    assert _zeros(reloaded) == _zeros(model)


def test_double_pruned_checkpoints_reload_identically_in_a_new_process(resnet: nn.Module, tmp_path: Path) -> None:
    items = []
    for label, section in (("both", {"slimming_ratio": 0.5, "sparsity": 0.8}),
                           ("slim", {"slimming_ratio": 0.5, "sparsity": 0.0}),
                           ("sparse", {"slimming_ratio": 0.0, "sparsity": 0.8})):
        model, _ = _double(copy.deepcopy(resnet), **section)
        path = tmp_path / f"{label}.safetensors"
        save(model, path)
        items.append(record_io(model, path, SHAPE))
    lenet, _ = _double(_in_memory("lenet5", (1, 28, 28)), slimming_ratio=0.0, sparsity=0.9)
    save(lenet, tmp_path / "lenet.safetensors")
    items.append(record_io(lenet, tmp_path / "lenet.safetensors", (1, 28, 28)))
    assert all(reload_in_new_process(items).values())


def test_residual_and_depthwise_torchvision_nets(tmp_path: Path) -> None:
    """resnet18 (residual adds), mobilenet_v2 and mobilenet_v3_small (depthwise, squeeze-excitation),
    efficientnet_b0 (MBConv): slimmed and sparsified, smaller, running, reloaded identically elsewhere."""
    items, shape = [], (3, 32, 32)
    for arch in ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0"):
        model = _in_memory(f"torchvision.{arch}", shape)
        model, report = _double(model, slimming_ratio=0.5, sparsity=0.8)
        before, final = report.stages[0], report.stages[-1]
        assert final["params"] < 0.8 * before["params"], arch
        assert final["macs"] < 0.8 * before["macs"], arch
        assert final["nonzero_params"] < 0.3 * before["nonzero_params"], arch
        assert report.slimming["lambda"] == RESIDUAL_LAMBDA, arch
        with torch.inference_mode():
            assert torch.isfinite(model.eval()(torch.randn(2, *shape))).all(), arch
        path = tmp_path / f"{arch}.safetensors"
        save(model, path)
        items.append(record_io(model, path, shape))
    results = reload_in_new_process(items)
    assert all(results.values()), results


# ----------------------------------------------------------------------------- with data (Fashion-MNIST)


class _RecordingPruner(GradualPruner):
    """The library's pruner, recording the zeros of every layer after each optimizer step."""

    zeros: list[dict[str, torch.Tensor]] = []
    first: dict[str, torch.Tensor] = {}

    def __call__(self, model: nn.Module) -> None:
        super().__call__(model)
        weights = {name: module.weight.detach() for name, module in self.modules.items()}
        if not _RecordingPruner.zeros:
            _RecordingPruner.first = {name: w.clone() for name, w in weights.items()}
        _RecordingPruner.zeros.append({name: w == 0 for name, w in weights.items()})


@pytest.fixture(scope="module")
def trained_run(resnet_file: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One double-prune with every stage: sparsity training, slimming, fine-tune, gradual pruning, evaluation."""
    if not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("Fashion-MNIST is not installed")
    _RecordingPruner.zeros, _RecordingPruner.first = [], {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DNNPRUNE_CACHE", str(tmp_path_factory.getbasetemp() / "dnnprune-cache"))
        patch.setattr("dnnprune.pruning.double.GradualPruner", _RecordingPruner)
        model = dnnprune.load(resnet_file)
        data = DataSection(root=FMNIST_DIR, train_limit=512, batch_size=200)
        model, report = _double(model, data, slimming_ratio=0.4, sparsity=0.8, sparsity_steps=3, sparsity_lambda=0.5,
                                finetune_steps=6, prune_every=2, ramp=0.5, evaluate=True, samples=200,
                                finetune=FineTuneSection(batch_size=32, lr=0.05, weight_decay=5e-3))
    return {"model": model, "report": report, "zeros": _RecordingPruner.zeros,
            "first": _RecordingPruner.first}


@needs_fmnist
def test_fine_tuned_gradual_pruning_holds_its_masks(trained_run: dict[str, Any]) -> None:
    model, report = trained_run["model"], trained_run["report"]
    pruning = report.parameter_pruning
    assert pruning["ramp_steps"] == 3 and pruning["history"]["steps"] == 6
    weights = _prunable(model)
    for name, sparsity in pruning["layer_sparsity"].items():
        assert int((weights[name] == 0).sum()) == round(sparsity * weights[name].numel()), name
    total = sum(w.numel() for w in weights.values())
    assert abs(sum(_zeros(model).values()) - round(0.8 * total)) <= len(weights)
    # After every SGD step (momentum 0.9, weight decay): the ramp's zeros, never one revived.
    seen = trained_run["zeros"]
    assert len(seen) == 6
    fraction = {1: 0.0, 2: cubic_fraction(2, 3)}  # pruning events at step 2 (every 2) and 3 (end of the ramp)
    for step, zeros in enumerate(seen, start=1):
        for name, zero in zeros.items():
            final = int((weights[name] == 0).sum())
            assert int(zero.sum()) == round(fraction.get(step, 1.0) * final), (step, name)
            if step > 1:
                assert bool(zero[seen[step - 2][name]].all()), (step, name)
    for name, zero in seen[-1].items():
        assert torch.equal(zero, weights[name] == 0), name
        kept = ~zero
        assert not torch.equal(weights[name][kept], trained_run["first"][name][kept]), name  # fine-tuning moved them


@needs_fmnist
def test_double_pruning_a_sparse_checkpoint_again_ramps_while_it_trains(resnet: nn.Module,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The training loop holds the old zeros (a parametrization): the new masks must still bite during
    training, on the weight the optimizer updates, not only in one cut at the end."""
    sparse, _ = _double(resnet, slimming_ratio=0.0, sparsity=0.5)
    old_zeros = {n: w == 0 for n, w in _prunable(sparse).items()}
    monkeypatch.setattr("dnnprune.pruning.double.GradualPruner", _RecordingPruner)
    _RecordingPruner.zeros, _RecordingPruner.first = [], {}
    data = DataSection(root=FMNIST_DIR, train_limit=512, batch_size=200)
    model, report = _double(sparse, data, slimming_ratio=0.0, sparsity=0.8, finetune_steps=4, prune_every=2, ramp=0.5,
                            finetune=FineTuneSection(batch_size=32, lr=0.05))
    final = {n: w == 0 for n, w in _prunable(model).items()}
    seen = _RecordingPruner.zeros
    assert len(seen) == 4 and report.parameter_pruning["ramp_steps"] == 2
    for name, zero in final.items():
        assert bool(zero[old_zeros[name]].all()), name  # an old zero stays zero
        for step in (2, 3, 4):  # the ramp ended at step 2: the final zeros from then on, while training
            assert torch.equal(seen[step - 1][name], zero), (step, name)
    assert {k: v.model_dump(mode="json") for k, v in meta_of(model).encodings.items()} == {
        f"{n}.weight": {"sparse": {"index_bits": 5 if n == "fc" else 8}} for n in final}


@needs_fmnist
def test_after_sparsity_training_an_unreachable_sparsity_fails_before_fine_tuning(
        resnet: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    """Trained gammas decide the slimmed widths, so reachability is checked again right after the surgery."""
    import dnnprune.pruning.double as double

    phases: list[str] = []
    fit_loop = double.fit_loop

    def spy(*args: Any, **kwargs: Any) -> Any:
        phases.append(kwargs["description"])
        return fit_loop(*args, **kwargs)

    monkeypatch.setattr(double, "fit_loop", spy)
    data = DataSection(root=FMNIST_DIR, train_limit=512, batch_size=200)
    with pytest.raises(PruningError, match="would empty layers"):
        _double(resnet, data, slimming_ratio=0.9, sparsity=0.945, min_density=0.05, sparsity_steps=1,
                finetune_steps=2, finetune=FineTuneSection(batch_size=32))
    assert phases == ["sparsity training"]


@needs_fmnist
def test_sparsity_training_shrinks_the_gammas(trained_run: dict[str, Any]) -> None:
    slimming = trained_run["report"].slimming
    assert slimming["lambda"] == 0.5 and slimming["sparsity_steps"] == 3
    assert slimming["sparsity_history"]["steps"] == 3 and slimming["finetune_history"]["steps"] == 6
    assert slimming["threshold"] < 1.0  # all gammas started at 1: the L1 term pulled the removed ones down


@needs_fmnist
def test_report_measures_every_stage(trained_run: dict[str, Any]) -> None:
    report = trained_run["report"]
    assert [s["stage"] for s in report.stages] == ["before", "slimmed", "after_slimming", "after_parameter_pruning",
                                                   "final"]
    for stage in report.stages:
        for key in ("params", "nonzero_params", "macs", "bytes"):
            assert isinstance(stage[key], int) and stage[key] > 0, (stage["stage"], key)
        for split in ("val", "test"):
            assert 0.0 <= stage[split]["top1"] <= 1.0, (stage["stage"], split)
        score = stage["netscore"]
        a = 100 * stage["test"]["top1"]
        expected = 20 * math.log10(a ** 2 / ((stage["params"] / 1e6) ** 0.5 * (stage["macs"] / 1e6) ** 0.5))
        expected_nonzero = 20 * math.log10(a ** 2 / ((stage["nonzero_params"] / 1e6) ** 0.5 * (stage["macs"] / 1e6) ** 0.5))
        assert score["value"] == pytest.approx(expected) and score["value_nonzero"] == pytest.approx(expected_nonzero)
    before, slimmed, _, pruned, final = report.stages
    assert slimmed["params"] < before["params"] and slimmed["macs"] < before["macs"]
    assert pruned["params"] == slimmed["params"] and pruned["macs"] == slimmed["macs"]
    assert pruned["nonzero_params"] < 0.35 * slimmed["nonzero_params"]
    assert pruned["bytes"] < 0.5 * slimmed["bytes"]
    # dense_bytes is what the tensors take held dense (zeros too); stored_bytes what their encodings take.
    assert pruned["dense_bytes"] == slimmed["dense_bytes"] > pruned["stored_bytes"]
    assert slimmed["stored_bytes"] == slimmed["dense_bytes"]
    assert pruned["netscore"]["value_nonzero"] > pruned["netscore"]["value"]
    assert {k: v for k, v in final.items() if k != "stage"} == {k: v for k, v in pruned.items() if k != "stage"}
    totals = report.totals
    assert totals["nonzero_reduction"] == pytest.approx(before["nonzero_params"] / final["nonzero_params"])
    assert totals["effective_bits_per_weight"] == pytest.approx(8 * final["bytes"] / final["params"])
    assert totals["effective_bits_per_weight"] < 32 * 0.5
    assert report.lineage_metrics()["test_top1"] == final["test"]["top1"]
    assert report.primary_metric == "top1" and report.higher_is_better


# ----------------------------------------------------------------------------- sparse execution


def _sparse_linear(rows: int, cols: int, density: float, bias: bool = True) -> nn.Linear:
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight.mul_(torch.rand_like(layer.weight) < density)
    return layer


@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_gives_the_dense_outputs(bias: bool) -> None:
    torch.manual_seed(0)
    dense = _sparse_linear(24, 40, 0.1, bias)
    sparse = SparseLinear(dense)
    assert sparse.weight_csr.layout == torch.sparse_csr
    assert sparse.weight_csr._nnz() == int(torch.count_nonzero(dense.weight))
    for shape in ((5, 40), (3, 7, 40), (1, 40)):
        x = torch.randn(*shape)
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-5, atol=1e-6)


def test_measure_linears_and_swapping_only_the_named_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), _sparse_linear(64, 48, 0.1), nn.ReLU(), _sparse_linear(32, 64, 0.5),
                          nn.ReLU(), nn.Linear(32, 10))
    rows = measure_linears(model, ["1", "3", "2"], (1, 8), repeats=3)  # "2" is a ReLU: skipped
    assert [(r["layer"], r["batch_size"]) for r in rows] == [("1", 1), ("1", 8), ("3", 1), ("3", 8)]
    for row in rows:
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["sparse_ms"])
    assert rows[0]["density"] == pytest.approx(float(torch.count_nonzero(model[1].weight)) / model[1].weight.numel())
    swapped = with_sparse_linears(model, ["3"])
    assert isinstance(swapped[3], SparseLinear)
    assert isinstance(swapped[1], nn.Linear) and isinstance(swapped[5], nn.Linear)
    assert all(isinstance(m, nn.Linear) for m in model if not isinstance(m, (nn.Flatten, nn.ReLU)))  # original intact
    x = torch.randn(6, 48)
    with torch.inference_mode():
        torch.testing.assert_close(swapped(x), model(x), rtol=1e-5, atol=1e-6)


@needs_fmnist
def test_distillation_teaches_every_phase_from_the_unpruned_input(resnet: nn.Module,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    monkeypatch.setenv("DNNPRUNE_CACHE", str(tmp_path / "cache"))
    teachers: list[nn.Module] = []
    original = training._with_distillation

    def spy(loss: torch.Tensor, output: torch.Tensor, inputs: torch.Tensor, teacher: nn.Module, *args: Any) -> torch.Tensor:
        teachers.append(teacher)
        return original(loss, output, inputs, teacher, *args)

    monkeypatch.setattr("dnnprune.training._with_distillation", spy)
    reference = copy.deepcopy(resnet).eval()
    data = DataSection(root=FMNIST_DIR, train_limit=256, batch_size=64)
    model, _ = _double(resnet, data, slimming_ratio=0.3, sparsity=0.5, sparsity_steps=2, finetune_steps=3,
                       prune_every=1, ramp=0.5, finetune=FineTuneSection(batch_size=32, distill=0.5))
    assert len(teachers) == 2 + 3 + 3 and all(t is teachers[0] for t in teachers)
    probe = torch.randn(2, *SHAPE)
    with torch.no_grad():
        assert torch.equal(teachers[0](probe), reference(probe))  # the input as it came, untouched by training
    assert count_parameters(model) < count_parameters(reference)


def test_slimming_in_rounds_removes_the_same_share_geometrically(resnet: nn.Module) -> None:
    """Three rounds of iterative slimming end at the requested fraction of channels, each round cutting
    from the model the previous one left; the stages show every round."""
    _, single = _double(copy.deepcopy(resnet), slimming_ratio=0.5, sparsity=0.0)
    model, report = _double(resnet, slimming_ratio=0.5, slimming_rounds=3, sparsity=0.0)
    slimming = report.slimming
    assert slimming["channels"] == single.slimming["channels"]
    assert abs(slimming["removed"] - single.slimming["removed"]) <= 3  # rounding in each round
    removed = [r["removed"] for r in slimming["rounds"]]
    assert len(removed) == 3 and removed[0] > removed[1] > removed[2] > 0  # geometric: fewer each round
    assert sum(removed) == slimming["removed"] == sum(slimming["removed_per_layer"].values())
    assert [s["stage"] for s in report.stages] == [
        "before", "slimmed_round_1", "after_slimming_round_1", "slimmed_round_2", "after_slimming_round_2",
        "slimmed_round_3", "after_slimming", "final"]
    assert report.stages[-1]["params"] == count_parameters(model)
    probe = torch.randn(2, *SHAPE)
    with torch.inference_mode():
        assert model.eval()(probe).shape == (2, 10)


def test_slimming_round_steps_split_the_finetune() -> None:
    from dnnprune.pruning.double import slimming_round_steps

    assert slimming_round_steps(DoublePruneSection(finetune_steps=600, slimming_rounds=2)) == [300, 300]
    assert slimming_round_steps(DoublePruneSection(finetune_steps=7, slimming_rounds=3)) == [2, 2, 3]
    assert slimming_round_steps(DoublePruneSection(finetune_steps=5)) == [5]


@needs_fmnist
def test_each_slimming_round_gets_its_share_of_the_steps(resnet: nn.Module) -> None:
    data = DataSection(root=FMNIST_DIR, train_limit=256, batch_size=64)
    _, report = _double(resnet, data, slimming_ratio=0.4, slimming_rounds=2, sparsity=0.0, finetune_steps=5,
                            finetune=FineTuneSection(batch_size=32))
    assert [r["finetune_history"]["steps"] for r in report.slimming["rounds"]] == [2, 3]
    assert report.slimming["finetune_history"]["steps"] == 3
