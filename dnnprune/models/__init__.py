"""Architectures by name: `create_model("vgg16_bn", num_classes=10)` or `create_model("torchvision.resnet18")`."""

from dnnprune.models.registry import (
    create_model,
    list_models,
    model_task,
    register_model,
    torchvision_names,
    zoo_names,
)

__all__ = ["create_model", "list_models", "model_task", "register_model", "torchvision_names", "zoo_names"]
