"""Our own architectures; importing a module runs its `@register_model` decorators."""

from dnnprune.models.zoo import a2e, alexnet, lenet, mlp, mobilenetv2_cifar, resnet_cifar, vgg

__all__ = ["a2e", "alexnet", "lenet", "mlp", "mobilenetv2_cifar", "resnet_cifar", "vgg"]
