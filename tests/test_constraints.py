"""held_encodings: sparse zeros, k-means codebooks and linear grids survive training, then save exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import dnnprune
from dnnprune import codecs as c
from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
from dnnprune.constraints import held_encodings
from dnnprune.errors import DnnpruneError
from dnnprune.models import create_model

_SHAPE = (1, 28, 28)
Optimizer = Callable[[list[nn.Parameter]], torch.optim.Optimizer]
_OPTIMIZERS: dict[str, Optimizer] = {
    "sgd-momentum-decay": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.05),
    "adam-decay": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.05),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


def _lenet() -> nn.Module:
    args = {"num_classes": 10, "in_channels": 1}
    meta = CheckpointMeta(arch="lenet5", arch_args=args, input_shape=_SHAPE, mean=(0.3,), std=(0.35,))
    return attach_meta(create_model("lenet5", **args), meta)


def _prune(module: nn.Module, density: float, seed: int = 0) -> torch.Tensor:
    """A hand-made mask; returns where the zeros are."""
    keep = torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(seed)) < density
    with torch.no_grad():
        module.weight.mul_(keep)
    return ~keep


def _put_on_grid(module: nn.Module, encoding: dict) -> None:
    values = c.as_encoding(encoding).values
    weight = module.weight.detach()
    if values is not None and values.codec == "kmeans":
        weight = c.kmeans_grid(weight, values.bits, iterations=20)
    elif values is not None:
        weight = c.linear_grid(weight, values.bits)
    with torch.no_grad():
        module.weight.copy_(c.on_grid(weight, encoding))


def _train(model: nn.Module, optimizer: Optimizer, steps: int = 6, check: Callable[[], None] | None = None) -> None:
    generator = torch.Generator().manual_seed(0)
    opt = optimizer([p for p in model.parameters() if p.requires_grad])
    model.train()
    for _ in range(steps):
        inputs, targets = torch.randn(16, *_SHAPE, generator=generator), torch.randint(0, 10, (16,), generator=generator)
        opt.zero_grad()
        F.cross_entropy(model(inputs), targets).backward()
        opt.step()
        if check is not None:
            check()
    model.eval()


@pytest.mark.parametrize("optimizer", list(_OPTIMIZERS))
def test_sparse_zeros_survive_momentum_weight_decay_and_adam(optimizer: str) -> None:
    model = _lenet()
    layers = {"classifier.1": model.classifier[1], "features.3": model.features[3]}
    zeros = {name: _prune(layer, 0.3) for name, layer in layers.items()}
    before = {name: layer.weight.detach().clone() for name, layer in layers.items()}
    encodings = {f"{name}.weight": {"sparse": {"index_bits": 8}} for name in layers}

    def still_zero() -> None:
        for name, layer in layers.items():
            assert bool((layer.weight[zeros[name]] == 0).all())
            grad = layer.parametrizations.weight.original.grad
            assert grad is None or bool((grad[zeros[name]] == 0).all())

    with held_encodings(model, encodings):
        _train(model, _OPTIMIZERS[optimizer], check=still_zero)
    for name, layer in layers.items():
        assert not parametrize.is_parametrized(layer)
        assert layer.weight.requires_grad and isinstance(layer.weight, nn.Parameter)
        assert bool((layer.weight[zeros[name]] == 0).all())
        assert not torch.equal(layer.weight.detach(), before[name])  # the survivors did train


@pytest.mark.parametrize("optimizer", ["sgd-momentum-decay", "adam-decay"])
def test_kmeans_trains_centroids_with_codes_frozen_and_zero_fixed(optimizer: str) -> None:
    model = _lenet()
    layer = model.classifier[1]
    zeros = _prune(layer, 0.4)
    encoding = {"sparse": {"index_bits": 5}, "values": {"codec": "kmeans", "bits": 3}}
    _put_on_grid(layer, encoding)
    zeros = layer.weight.detach() == 0  # the grid may round a few tiny survivors to the zero centroid too
    codebook_before, codes_before = torch.unique(layer.weight.detach(), return_inverse=True)
    with held_encodings(model, {"classifier.1.weight": encoding}):
        _train(model, _OPTIMIZERS[optimizer])
    weight = layer.weight.detach()
    codebook = torch.unique(weight)
    assert codebook.numel() <= 8 and 0.0 in codebook.tolist()
    assert torch.equal(weight == 0, zeros)
    assert not torch.equal(codebook, codebook_before)
    for code in range(codebook_before.numel()):  # codes frozen: a cluster's weights still share one value
        assert torch.unique(weight.reshape(-1)[codes_before.reshape(-1) == code]).numel() <= 1
    assert torch.equal(c.on_grid(weight, encoding), weight)


def test_linear_trains_scales_and_keeps_its_grid() -> None:
    model = _lenet()
    layer = model.classifier[3]
    encoding = {"values": {"codec": "linear", "bits": 4}}
    _put_on_grid(layer, encoding)
    codes_before, scales_before = c.linear_codes(layer.weight.detach(), 4)
    with held_encodings(model, {"classifier.3.weight": encoding}):
        assert not layer.parametrizations.weight.original.requires_grad
        _train(model, _OPTIMIZERS["sgd-momentum-decay"])
    codes, scales = c.linear_codes(layer.weight.detach(), 4)
    same_row = (codes == codes_before).all(1) | (codes == -codes_before).all(1)  # a scale may cross zero
    assert bool(same_row.all()) and not torch.equal(scales, scales_before)
    assert torch.equal(c.on_grid(layer.weight.detach(), encoding), layer.weight.detach())


def _float_step(model: nn.Module, layer: str, batch: tuple[torch.Tensor, torch.Tensor],
                lr: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight before, weight after one plain SGD step): held when `model` holds encodings, float otherwise."""
    weight = model.get_submodule(layer).weight
    before = weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    F.cross_entropy(model(batch[0]), batch[1]).backward()
    optimizer.step()
    return before, model.get_submodule(layer).weight.detach().clone()


@pytest.mark.parametrize("codec", ["kmeans", "linear"])
def test_a_held_step_is_the_float_step_projected_onto_what_may_move(codec: str) -> None:
    """A centroid moves by its members' mean float step, a scale by its codes' projection of theirs, so the
    float model's learning rate suits the codes (summed, a 3-bit LeNet-5 trained at lr 0.05 ended at chance)."""
    encoding = {"values": {"codec": codec, "bits": 3}}
    model = _lenet()
    _put_on_grid(model.classifier[1], encoding)
    twin = _lenet()
    twin.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(0)
    batch = torch.randn(16, *_SHAPE, generator=generator), torch.randint(0, 10, (16,), generator=generator)
    grid, floated = _float_step(twin, "classifier.1", batch, lr=0.1)
    with held_encodings(model, {"classifier.1.weight": encoding}):
        _, held = _float_step(model, "classifier.1", batch, lr=0.1)
    float_step = (floated - grid).reshape(grid.shape[0], -1)
    held_step = (held - grid).reshape(grid.shape[0], -1)
    if codec == "kmeans":
        values, codes = torch.unique(grid, return_inverse=True)
        for code, value in enumerate(values.tolist()):
            members = codes.reshape(grid.shape[0], -1) == code
            expected = 0.0 if value == 0 else float(float_step[members].mean())
            assert torch.allclose(held_step[members], torch.full_like(held_step[members], expected), atol=1e-7)
    else:
        codes, _ = c.linear_codes(grid, 3)
        q = codes.reshape(grid.shape[0], -1).float()
        projected = q * ((q * float_step).sum(1) / (q * q).sum(1).clamp(min=1))[:, None]
        assert torch.allclose(held_step, projected, atol=1e-6)
    assert float(held_step.abs().max()) > 0


def test_after_training_the_model_saves_and_reloads_bit_for_bit(tmp_path: Path) -> None:
    model = _lenet()
    _prune(model.classifier[1], 0.2)
    stacked = {"sparse": {"index_bits": 5}, "values": {"codec": "kmeans", "bits": 4}}
    _put_on_grid(model.classifier[1], stacked)
    _prune(model.features[3], 0.5)
    encodings = {"classifier.1.weight": c.as_encoding(stacked), "features.3.weight": c.Encoding(sparse=c.SparseSpec())}
    dnnprune.meta_of(model).encodings = dict(encodings)
    with held_encodings(model, dnnprune.meta_of(model).encodings):
        _train(model, _OPTIMIZERS["adam-decay"])
    path = save(model, tmp_path / "held.safetensors")
    reloaded = dnnprune.load(path)
    for key, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key].view(torch.int32) if value.is_floating_point() else reloaded.state_dict()[key],
                           (value + 0.0).view(torch.int32) if value.is_floating_point() else value), key
    assert dnnprune.meta_of(reloaded).encodings == encodings


def test_an_exception_still_releases_and_puts_weights_on_grid() -> None:
    model = _lenet()
    zeros = _prune(model.classifier[1], 0.3)
    held = held_encodings(model, {"classifier.1.weight": {"sparse": {"index_bits": 8}}})
    with pytest.raises(RuntimeError, match="boom"), held:
        _train(model, _OPTIMIZERS["sgd-momentum-decay"], steps=2)
        raise RuntimeError("boom")
    assert not parametrize.is_parametrized(model.classifier[1])
    assert bool((model.classifier[1].weight[zeros] == 0).all())


def test_nested_holds_are_one_hold() -> None:
    model = _lenet()
    _prune(model.classifier[1], 0.3)
    encodings = {"classifier.1.weight": {"sparse": {"index_bits": 8}}}
    with held_encodings(model, encodings):
        with held_encodings(model, encodings):
            assert len(model.classifier[1].parametrizations.weight) == 1
        assert parametrize.is_parametrized(model.classifier[1])
    assert not parametrize.is_parametrized(model.classifier[1])


def test_bad_keys_and_off_grid_weights_are_clear_errors() -> None:
    model = _lenet()
    cases = {"no module 'classifier.9' any more": {"classifier.9.weight": {"sparse": {"index_bits": 8}}},
             "no parameter 'gain'": {"classifier.1.gain": {"sparse": {"index_bits": 8}}},
             "classifier.1.weight: .*kmeans": {"classifier.1.weight": {"values": {"codec": "kmeans", "bits": 2}}}}
    for message, encodings in cases.items():
        with pytest.raises(DnnpruneError, match=message), held_encodings(model, encodings):
            pass
    assert not parametrize.is_parametrized(model.classifier[1])
