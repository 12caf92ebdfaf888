"""Our own architectures; importing a module runs its `@register_model` decorators."""

from dnnprune.models.zoo import alexnet, lenet, mlp, mobilenetv2_cifar, resnet_cifar, vgg

__all__ = ["alexnet", "lenet", "mlp", "mobilenetv2_cifar", "resnet_cifar", "vgg"]
