"""MAC counting: conv/linear layers by hand formula, functional ops (attention, matmul) too, no double counting."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models

from dnnprune.metrics import count_macs, hooked_forward, size_summary
from dnnprune.models import create_model

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layer_formula(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """output elements x inputs per output, per conv/linear layer: what the analysis expects of count_macs."""
    macs: dict[str, int] = {}

    def hook_for(name: str) -> Any:
        def hook(module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
            if isinstance(module, nn.Linear):
                per_output = module.in_features
            else:
                per_output = module.in_channels // module.groups * math.prod(module.kernel_size)
            macs[name] = macs.get(name, 0) + output.numel() * per_output

        return hook

    hooked_forward(model, input_shape, [(m, hook_for(n)) for n, m in model.named_modules()
                                        if isinstance(m, (nn.Linear, *_CONVS))])
    return macs


def _total_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """The whole model's FLOPs, counted independently: attention through its unfused ops (matmuls)."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.eval()(torch.zeros(1, *input_shape))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


@pytest.mark.parametrize("layer, shape, expected", [
    (nn.Conv2d(3, 8, 3, padding=1), (3, 10, 10), 8 * 10 * 10 * 3 * 9),
    (nn.Conv2d(8, 8, 3, groups=4, bias=False), (8, 6, 6), 8 * 4 * 4 * 2 * 9),
    (nn.Conv1d(4, 6, 5, stride=2), (4, 21), 6 * 9 * 4 * 5),
    (nn.ConvTranspose2d(4, 6, 2, stride=2), (4, 5, 5), 4 * 5 * 5 * 6 * 4),  # every input pixel meets every weight
    (nn.Linear(20, 7), (20,), 20 * 7),
    (nn.Linear(20, 7, bias=False), (4, 20), 4 * 20 * 7),
])
def test_a_single_layer_counts_by_hand_formula(layer: nn.Module, shape: tuple[int, ...], expected: int) -> None:
    assert count_macs(layer, shape) == {"": expected}


def test_conv_net_layers_and_total() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5))
    macs = count_macs(model, (1, 8, 8))
    assert macs == {"0": 4 * 6 * 6 * 9, "4": 144 * 5}  # BN, ReLU, Flatten: no multiply-accumulates, no entry


class _Block(nn.Module):
    """A Linear submodule plus a matmul of the block's own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.mix = nn.Parameter(torch.randn(dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.matmul(self.proj(x), self.mix)


class _TinyAttention(nn.Module):
    """nn.MultiheadAttention, a functional F.linear and torch.matmul/bmm in the model's own forward."""

    def __init__(self, dim: int = 16, heads: int = 2) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.block = _Block(dim)
        self.head_weight = nn.Parameter(torch.randn(3, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention(x, x, x, need_weights=False)[0]
        x = self.block(x)
        gram = torch.bmm(x, x.transpose(1, 2))  # tokens x tokens, inner size dim
        x = torch.matmul(gram, x)
        return F.linear(x.mean(1), self.head_weight)


def test_attention_and_functional_matmuls_are_counted() -> None:
    dim, tokens = 16, 5
    model = _TinyAttention(dim)
    macs = count_macs(model, (tokens, dim))
    attention = 3 * tokens * dim * dim + tokens * tokens * dim + tokens * tokens * dim + tokens * dim * dim
    assert macs == {
        "attention": attention,  # in-projection, scores, weighted sum, out-projection: all inside one module
        "block.proj": tokens * dim * dim,
        "block": tokens * dim * dim,  # its own matmul only: the Linear inside is counted once, under block.proj
        "": 2 * tokens * tokens * dim + dim * 3,  # bmm, matmul and F.linear in the model's own forward
    }
    assert sum(macs.values()) * 2 == _total_flops(model, (tokens, dim))


def test_attention_is_counted_on_the_fused_inference_path_too() -> None:
    encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, batch_first=True), 2,
                                    enable_nested_tensor=False)
    macs = count_macs(encoder, (4, 8))
    per_layer = 4 * (3 * 8 * 8 + 4 * 8 + 4 * 8 + 8 * 8 + 8 * 12 + 12 * 8)
    assert sum(macs.values()) == 2 * per_layer
    assert torch.backends.mha.get_fastpath_enabled()


@pytest.mark.parametrize("training", [True, False])
def test_mode_is_restored(training: bool) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5))
    model.train(training)
    count_macs(model, (4,))
    assert model.training is training and all(m.training is training for m in model.modules())
    assert not model[0]._forward_hooks and not model[0]._forward_pre_hooks


@pytest.mark.parametrize("arch, shape", [("lenet5", (1, 28, 28)), ("vgg16_bn", (1, 32, 32)), ("resnet20", (1, 32, 32)),
                                         ("mobilenetv2_cifar", (1, 32, 32)), ("alexnet", (1, 32, 32)),
                                         ("mlp", (1, 28, 28))])
def test_zoo_layers_keep_the_formula_the_analysis_reads(arch: str, shape: tuple[int, ...]) -> None:
    model = create_model(arch, num_classes=10, in_channels=1)
    macs = count_macs(model, shape)
    assert macs == _layer_formula(model, shape)  # every entry is a conv/linear layer, by the same formula
    assert sum(macs.values()) * 2 == _total_flops(model, shape)
    summary = size_summary(model, shape)
    assert summary["macs"] == sum(macs.values()) and summary["macs_per_layer"] == macs


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "swin_t", "vit_b_16"])
def test_torchvision_totals_match_torchvision_published_ops(name: str) -> None:
    """torchvision lists each model's GMACs (as "GFLOPS") in its weights' metadata, 224x224, 1000 classes."""
    model = create_model(f"torchvision.{name}")
    macs = count_macs(model, (3, 224, 224))
    published = models.get_model_weights(name).DEFAULT.meta["_ops"]
    assert round(sum(macs.values()) / 1e9, 3) == pytest.approx(published, abs=1e-9)
    assert sum(macs.values()) * 2 == _total_flops(model, (3, 224, 224))
    formula = _layer_formula(model, (3, 224, 224))
    assert {k: macs[k] for k in formula} == formula  # conv/linear layers called as modules keep the formula
