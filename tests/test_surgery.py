"""surgery.py against Torch-Pruning: the private functions it patches, in-place prune and restore, task gradients."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping

from dnnprune import surgery
from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
from dnnprune.errors import PruningError
from dnnprune.models import create_model
from dnnprune.surgery import ChannelGraph, accumulate_gradients, channels_to_keep
from dnnprune.tasks import TaskSpec
from tests.reload import record_io, reload_in_new_process


@pytest.mark.parametrize("name", surgery._TP_PATCHED)
def test_the_patched_torch_pruning_functions_still_exist(name: str) -> None:
    """If this fails, Torch-Pruning moved a private function surgery.py replaces: re-check the patch, then the pin."""
    function = getattr(index_mapping, name, None)
    assert callable(function), (f"torch_pruning.dependency.index_mapping.{name} is gone in torch-pruning "
                                f"{tp.__version__}; surgery._patched_torch_pruning must be updated")
    arity = {"update_index_mapping": 1, "update_reshape_index_mapping": 2}[name]
    assert len(inspect.signature(function).parameters) == arity, f"index_mapping.{name} changed its signature"


def test_torch_pruning_still_routes_through_the_patched_functions() -> None:
    """The patches only work while Torch-Pruning looks these functions up by module attribute at call time."""
    assert "update_reshape_index_mapping" in index_mapping.update_index_mapping.__code__.co_names
    for method in (tp.DependencyGraph.build_dependency, tp.DependencyGraph.get_pruning_group):
        assert "index_mapping.update_index_mapping(" in inspect.getsource(method), method.__name__


def test_a_missing_patched_function_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(index_mapping, "update_reshape_index_mapping")
    with pytest.raises(PruningError, match=r"index_mapping\.update_reshape_index_mapping.*torch-pruning>=1.6,<1.7"):
        ChannelGraph(create_model("lenet5", num_classes=10, in_channels=1), (1, 28, 28))


def test_patches_are_undone_after_every_call() -> None:
    originals = {name: getattr(index_mapping, name) for name in surgery._TP_PATCHED}
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    graph = ChannelGraph(model, (1, 8, 8))
    with torch.no_grad():
        graph.prune({graph.groups[0].name: [0]})
    assert {name: getattr(index_mapping, name) for name in surgery._TP_PATCHED} == originals


def _torchvision(arch: str) -> nn.Module:
    args = {"num_classes": 10, "in_channels": 3}
    model = create_model(arch, **args).eval()
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return attach_meta(model, CheckpointMeta(arch=arch, arch_args=args, input_shape=(3, 32, 32)))


def test_shufflenet_and_densenet_prune_and_reload(tmp_path: Path) -> None:
    """ShuffleNet needs the reshape patch to trace at all; DenseNet is where the frozen mappings pay."""
    items = []
    for arch in ("torchvision.shufflenet_v2_x0_5", "torchvision.densenet121"):
        model = _torchvision(arch)
        graph = ChannelGraph(model, (3, 32, 32))
        assert graph.groups and (arch.endswith("densenet121") or graph.locked)
        plan = {g.name: graph.choose(g.name, graph.importance(g.name, "l1"),
                                     g.width - channels_to_keep(g.width, 0.5)) for g in graph.groups}
        sample = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            graph.zero_channels(plan)
            masked = model(sample)
            graph.prune(plan)
            pruned = model(sample)
        assert torch.allclose(pruned, masked, rtol=1e-4, atol=1e-5 * masked.abs().max().item()), arch
        items.append(record_io(model, save(model, tmp_path / f"{arch.replace('.', '_')}.safetensors"), (3, 32, 32)))
    assert all(reload_in_new_process(items).values())


def test_snapshot_restores_model_and_graph_for_the_next_prune() -> None:
    model = create_model("resnet20", num_classes=10, in_channels=1).eval()
    graph = ChannelGraph(model, (1, 8, 8))
    sample = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        before = model(sample)
    widths, state = graph.widths(), {k: v.clone() for k, v in model.state_dict().items()}
    for group in graph.groups[:3]:
        restore = graph.snapshot()
        with torch.no_grad():
            graph.prune({group.name: list(range(group.width // 2))})
            assert graph.width(group.name) == group.width - group.width // 2
        restore()
        assert graph.widths() == widths
        assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        with torch.no_grad():
            assert torch.equal(model(sample), before)


def test_taylor_gradients_come_from_the_models_task_loss() -> None:
    torch.manual_seed(0)
    model = create_model("a2e", input_shape=(1, 4, 4), widths=[8, 4, 8], activation="tanh")
    attach_meta(model, CheckpointMeta(arch="a2e", arch_args={}, input_shape=(1, 4, 4),
                                      task=TaskSpec(kind="reconstruction")))
    inputs, targets = torch.randn(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    assert accumulate_gradients(model, [(inputs, targets)]) == 1
    got = model.net[1].weight.grad.clone()
    model.zero_grad()
    model.train()
    (model(inputs) - inputs.flatten(1)).pow(2).mean().backward()  # the reconstruction loss, not cross-entropy
    torch.testing.assert_close(got, model.net[1].weight.grad)


def test_window_attention_is_refused_before_tracing() -> None:
    """Tracing Swin's shifted-window attention for channel coupling grew past 12 GB; it is refused in one line."""
    model = create_model("torchvision.swin_t", num_classes=10).eval()
    with pytest.raises(PruningError, match=r"cannot trace ShiftedWindowAttention .*double-prune --slimming-ratio 0"):
        ChannelGraph(model, (3, 32, 32))


def _masked_equals_pruned(model: nn.Module, graph: ChannelGraph, sample: torch.Tensor) -> None:
    """Every group, a third of its channels: zeroing them and cutting them out compute the same."""
    plan = {g.name: list(range(0, g.width, 3)) for g in graph.groups}
    with torch.no_grad():
        graph.zero_channels(plan)
        masked = model(sample)
        graph.prune(plan)
        pruned = model(sample)
    assert torch.allclose(pruned, masked, rtol=1e-5, atol=1e-6 * masked.abs().max().item())


def test_a_vision_transformers_mlp_hidden_units_are_prunable_and_the_residual_stream_is_not() -> None:
    """A Linear on (batch, tokens, features) views its input as (batch x tokens, features): that view
    keeps the features, so the MLP's hidden units are one group each (they were all locked); the
    residual stream passes attention's head transposes and stays locked."""
    from torchvision.models import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=16, patch_size=4, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                              num_classes=5).eval()
    graph = ChannelGraph(model, (3, 16, 16))
    assert [g.name for g in graph.groups] == [f"encoder.layers.encoder_layer_{i}.mlp.0" for i in range(2)]
    assert {g.width for g in graph.groups} == {32} and graph.locked
    _masked_equals_pruned(model, graph, torch.randn(3, 3, 16, 16))
    assert [model.encoder.layers[i].mlp[0].out_features for i in range(2)] == [21, 21]
    assert [model.encoder.layers[i].mlp[3].in_features for i in range(2)] == [21, 21]


class _TimeLinear(nn.Module):
    """A Linear over a Conv1d's time axis: the view (batch x channels, time) puts channels in the rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 6, 3, padding=1)
        self.over_time = nn.Linear(8, 4)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x.flatten(1, 2))  # (batch, 2, 8) from a (batch, 2, 1, 8) input
        return self.head(self.over_time(y.reshape(-1, 8)).reshape(x.shape[0], -1))


def test_a_view_that_merges_channels_into_rows_is_not_taken_for_a_token_merge() -> None:
    """The same (B, N, L) -> (B x N, L) view after a Conv1d merges its channels into rows; the conv's
    channels must stay locked, or be cut so that the model computes what the masked one does."""
    torch.manual_seed(0)
    model = _TimeLinear().eval()
    graph = ChannelGraph(model, (2, 1, 8))
    assert "conv" not in {g.name for g in graph.groups}
    _masked_equals_pruned(model, graph, torch.randn(4, 2, 1, 8))


@pytest.mark.slow
def test_torchvision_vit_prunes_through_the_cli_and_reloads(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dnnprune.cli import app
    from tests.conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "vit.safetensors", "torchvision.vit_b_32", input_shape=(1, 32, 32),
                                 image_size=32)
    out = tmp_path / "vit-pruned.safetensors"
    result = CliRunner().invoke(app, ["prune", str(checkpoint), "--ratio", "0.5", "--no-evaluate", "-o", str(out)])
    assert result.exit_code == 0, result.output
    import dnnprune

    model = dnnprune.load(out)
    assert all(layer.mlp[0].out_features == 1536 for layer in model.encoder.layers)
    assert all(reload_in_new_process([record_io(model, out, (1, 32, 32))]).values())


class _Decoder(nn.Module):
    """A Linear whose features become a conv's channels over a 7x7 map (a decoder's first step)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8 * 7 * 7)
        self.conv = nn.Conv2d(8, 4, 3, padding=1)
        self.head = nn.Linear(4 * 7 * 7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.fc(x.flatten(1)).view(x.shape[0], 8, 7, 7))
        return self.head(y.flatten(1))


def test_a_linear_unflattened_into_conv_channels_is_locked_not_cut_to_nothing() -> None:
    """Torch-Pruning mapped the Linear's 392 features onto the conv's 8 channels and cut the Linear to
    zero outputs (a traceback at the next forward); its group is locked now, the conv's still prunes."""
    torch.manual_seed(0)
    model = _Decoder().eval()
    graph = ChannelGraph(model, (1, 4, 4))
    assert "fc" not in {g.name for g in graph.groups} and "fc" in graph.locked
    assert "conv" in {g.name for g in graph.groups}
    _masked_equals_pruned(model, graph, torch.randn(2, 1, 4, 4))


def test_convnext_channels_last_mlps_stay_prunable_and_exact() -> None:
    """ConvNeXt's Linears act on (B, H, W, C): the view back from (B x H x W, C) keeps the features last.
    A rule that only let (B, C, 1, 1) through locked all 18 of its MLP groups."""
    torch.manual_seed(0)
    model = _torchvision("torchvision.convnext_tiny")
    graph = ChannelGraph(model, (3, 32, 32))
    assert len(graph.groups) == 18 and all(isinstance(model.get_submodule(g.name), nn.Linear) for g in graph.groups)
    _masked_equals_pruned(model, graph, torch.randn(2, 3, 32, 32))


class _LinearIntoConv1d(nn.Module):
    """A Linear's 16 features unsqueezed into one channel of 16 steps for a Conv1d."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 16)
        self.conv = nn.Conv1d(1, 4, 3)
        self.head = nn.Linear(4 * 14, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(self.fc(x.flatten(1)).unsqueeze(1)).flatten(1))


class _GatedLinearUnit(nn.Module):
    """GLU: one Linear's two halves multiplied together, so channel i and i + 16 go as a pair."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 32)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.fc1(x.flatten(1)).chunk(2, dim=1)
        return self.fc2(value * torch.sigmoid(gate))


@pytest.mark.parametrize("model_class, locked", [(_LinearIntoConv1d, "fc"), (_GatedLinearUnit, "fc1")])
def test_channels_that_map_many_to_one_lock_their_group(model_class: type, locked: str) -> None:
    """Torch-Pruning cut the Conv1d's only input channel (a traceback at the next forward), and cut the
    GLU's partner channels too, so masking analysed another model than pruning made."""
    torch.manual_seed(0)
    model = model_class().eval()
    graph = ChannelGraph(model, (1, 1, 4))
    assert locked in graph.locked and "map onto fewer" in graph.locked[locked]
    assert locked not in {g.name for g in graph.groups}
    _masked_equals_pruned(model, graph, torch.randn(3, 1, 1, 4))
