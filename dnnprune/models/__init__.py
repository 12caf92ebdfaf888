"""Architectures by name: `create_model("vgg16_bn", num_classes=10)` or `create_model("torchvision.resnet18")`."""

from dnnprune.models.factory import (
    accepts_argument,
    create_model,
    is_registered,
    list_models,
    model_task,
    torchvision_names,
    zoo_names,
)
from dnnprune.models.registry import register_model

__all__ = ["accepts_argument", "create_model", "is_registered", "list_models", "model_task", "register_model", "torchvision_names",
           "zoo_names"]
