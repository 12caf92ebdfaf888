"""Every registered architecture builds from JSON-able arguments and runs a forward pass."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
import torch.nn as nn

from dnnprune.errors import ModelError
from dnnprune.models import (
    accepts_argument,
    create_model,
    list_models,
    model_task,
    register_model,
    torchvision_names,
    zoo_names,
)
from dnnprune.models.registry import _REGISTRY

SMALL_INPUT = {"lenet5": 28, "mlp": 28}
TORCHVISION = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121"]
CLASSIFIERS = [name for name in zoo_names() if model_task(name) == "classification"]
RECONSTRUCTORS = [name for name in zoo_names() if model_task(name) == "reconstruction"]


def _logits(model: nn.Module, channels: int, size: int) -> torch.Tensor:
    model.eval()
    with torch.inference_mode():
        return model(torch.randn(2, channels, size, size))


def test_the_zoo_has_both_tasks() -> None:
    assert set(CLASSIFIERS) | set(RECONSTRUCTORS) == set(zoo_names())
    assert "a2e" in RECONSTRUCTORS and {"lenet5", "resnet20", "a2e_classifier"} <= set(CLASSIFIERS)
    assert model_task("torchvision.resnet18") == "classification"
    with pytest.raises(ModelError, match="unknown architecture"):
        model_task("no_such_net")


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_zoo_forward(name: str) -> None:
    size = SMALL_INPUT.get(name, 32)
    shape = {"input_shape": [1, size, size]} if accepts_argument(name, "input_shape") else {}
    model = create_model(name, num_classes=10, in_channels=1, **shape)
    assert _logits(model, 1, size).shape == (2, 10)


@pytest.mark.parametrize("name", RECONSTRUCTORS)
def test_reconstruction_zoo_forward_returns_as_many_values_as_it_is_fed(name: str) -> None:
    for shape in ([1, 28, 28], [1, 1, 30], [3, 8, 8]):
        model = create_model(name, in_channels=shape[0], input_shape=shape)
        with torch.inference_mode():
            output = model.eval()(torch.randn(2, *shape))
        assert output.shape[0] == 2 and output[0].numel() == shape[0] * shape[1] * shape[2]


@pytest.mark.parametrize("name", ["resnet20", "vgg11_bn", "mobilenetv2_cifar", "alexnet"])
def test_zoo_forward_rgb(name: str) -> None:
    model = create_model(name, num_classes=10, in_channels=3)
    assert _logits(model, 3, 32).shape == (2, 10)


@pytest.mark.parametrize("name", zoo_names())
def test_zoo_signature_is_json_serialisable(name: str) -> None:
    params = inspect.signature(_REGISTRY[name]).parameters
    if model_task(name) == "classification":
        assert params["num_classes"].default == 10
    else:
        assert "num_classes" not in params  # an autoencoder has no classes
    assert params["in_channels"].default == 1
    assert all(p.default is not inspect.Parameter.empty for p in params.values())
    stored = json.loads(json.dumps({k: p.default for k, p in params.items()}))  # as a checkpoint keeps them
    assert isinstance(create_model(name, **stored), nn.Module)


def test_a2e_is_an_accordion_of_linear_layers() -> None:
    model = create_model("a2e", input_shape=[1, 1, 30], widths=[64, 16, 64], activation="relu")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(30, 64), (64, 16), (16, 64), (64, 30)]
    assert sum(isinstance(m, nn.ReLU) for m in model.modules()) == 3  # none after the output layer
    assert create_model("a2e", input_shape=None, in_features=12)(torch.randn(4, 12)).shape == (4, 12)


def test_a2e_classifier_gives_the_class_whose_autoencoder_reconstructs_best() -> None:
    model = create_model("a2e_classifier", num_classes=3, input_shape=[1, 4, 4], widths=[8, 4, 8]).eval()
    assert len(model.experts) == 3
    sample = torch.randn(5, 1, 4, 4)
    with torch.inference_mode():
        logits = model(sample)
        errors = torch.stack([(expert(sample) - sample.flatten(1)).pow(2).mean(1) for expert in model.experts], 1)
    assert logits.shape == (5, 3) and bool((logits <= 0).all())
    assert torch.allclose(logits, -errors * model.log_scale.exp())
    assert torch.equal(logits.argmax(1), errors.argmin(1))


def test_a2e_classifier_shared_design_is_one_accordion_encoder_and_a_head_on_its_code() -> None:
    model = create_model("a2e_classifier", num_classes=3, input_shape=[1, 4, 4], widths=[8, 4, 8, 2],
                         design="shared").eval()
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 8), (8, 4), (4, 8), (8, 2), (2, 3)]
    assert _logits(model, 1, 4).shape == (2, 3)
    with pytest.raises(ModelError, match="design must be 'experts' or 'shared'"):
        create_model("a2e_classifier", design="both")


@pytest.mark.parametrize("name", ["a2e", "a2e_classifier"])
def test_a2e_bad_arguments_raise_model_error(name: str) -> None:
    with pytest.raises(ModelError, match="widths"):
        create_model(name, widths=[])
    with pytest.raises(ModelError, match="widths"):
        create_model(name, widths=[8, 0])
    with pytest.raises(ModelError, match="activation"):
        create_model(name, activation="sigmoid")
    with pytest.raises(ModelError, match="input_shape"):
        create_model(name, input_shape=None)
    with pytest.raises(ModelError, match="smaller input"):
        create_model(name, input_shape=[3, 2048, 2048])


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
