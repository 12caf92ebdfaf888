"""Every registered architecture builds from JSON-able arguments and runs a forward pass."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn as nn

from dnnprune.errors import ModelError
from dnnprune.models import create_model, list_models, register_model, torchvision_names, zoo_names
from dnnprune.models.registry import _REGISTRY

SMALL_INPUT = {"lenet5": 28, "mlp": 28}
TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]


def _logits(model: nn.Module, channels: int, size: int) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(torch.randn(2, channels, size, size))


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_forward(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=1)
    assert _logits(model, 1, SMALL_INPUT.get(name, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenetv2_cifar", "alexnet"])
def test_zoo_forward_rgb(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=3)
    assert _logits(model, 3, 32).shape == (2, 10)


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_signature_is_json_serialisable(name: str) -> None:
    params = inspect.signature(_REGISTRY[name]).parameters
    assert params["num_classes"].default == 10
    assert params["in_channels"].default == 1
    assert all(p.default is not inspect.Parameter.empty for p in params.values())
    stored = json.loads(json.dumps({k: p.default for k, p in params.items()}))  # as a checkpoint keeps them
    assert isinstance(create_model(name, **stored), nn.Module)


def test_lenet5_at_32() -> None:
    model = create_model("lenet5", in_channels=3, input_size=32)
    assert _logits(model, 3, 32).shape == (2, 10)


def test_mlp_hidden_from_json_list() -> None:
    model = create_model("mlp", hidden=json.loads("[64, 32, 16]"), num_classes=5)
    widths = [m.out_features for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [64, 32, 16, 5]
    assert _logits(model, 1, 28).shape == (2, 5)


def test_mobilenetv2_has_depthwise_and_residuals() -> None:
    model = create_model("mobilenetv2_cifar", width_mult=0.5)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert depthwise and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert sum(getattr(m, "use_residual", False) for m in model.modules()) == 10
    assert _logits(model, 1, 32).shape == (2, 10)


def test_resnet_option_b_shortcuts() -> None:
    model = create_model("resnet20")
    shortcuts = [m.shortcut for m in model.modules() if isinstance(getattr(m, "shortcut", None), nn.Sequential)]
    assert len(shortcuts) == 2
    assert all(s[0].kernel_size == (1, 1) and isinstance(s[1], nn.BatchNorm2d) for s in shortcuts)


@pytest.mark.parametrize("name", TORCHVISION)
def test_torchvision_forward_one_channel(name: str) -> None:
    model = create_model(f"torchvision.{name}", num_classes=10, in_channels=1)
    first = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first.in_channels == 1
    assert _logits(model, 1, 64).shape == (2, 10)


def test_torchvision_first_conv_keeps_its_path() -> None:
    model = create_model("torchvision.resnet18", num_classes=10, in_channels=1)
    assert model.conv1.in_channels == 1
    assert model.state_dict()["conv1.weight"].shape == (64, 1, 7, 7)


def test_torchvision_googlenet_returns_plain_logits() -> None:
    model = create_model("torchvision.googlenet", num_classes=10)
    assert model.aux1 is None
    assert isinstance(_logits(model, 3, 64), torch.Tensor)


def test_unknown_names_raise_model_error() -> None:
    with pytest.raises(ModelError, match="unknown architecture"):
        create_model("no_such_net")
    with pytest.raises(ModelError, match="did you mean torchvision.resnet18"):
        create_model("torchvision.resnet81")


def test_bad_arguments_raise_model_error() -> None:
    with pytest.raises(ModelError, match="bad arguments"):
        create_model("vgg16", depth=3)
    with pytest.raises(ModelError, match="num_classes"):
        create_model("resnet20", num_classes=0)
    with pytest.raises(ModelError, match="dropout"):
        create_model("alexnet", dropout=1.0)
    with pytest.raises(ModelError, match="input_size"):
        create_model("lenet5", input_size=8)
    with pytest.raises(ModelError, match="bad arguments for torchvision.resnet18"):
        create_model("torchvision.resnet18", depth=3)
    with pytest.raises(ModelError, match="never downloaded"):
        create_model("torchvision.resnet18", weights="DEFAULT")


def test_duplicate_registration_raises() -> None:
    before = dict(_REGISTRY)
    with pytest.raises(ValueError, match="registered twice"):
        register_model("lenet5")(lambda: nn.Identity())
    assert _REGISTRY == before


def test_list_models_covers_both_sources() -> None:
    names = list_models()
    assert "vgg16_bn" in names and "torchvision.resnet18" in names
    assert set(torchvision_names()) <= set(names)
