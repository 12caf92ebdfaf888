"""Checkpoints rebuild the exact model in a new process, for every family and structural change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

import dnnprune
from dnnprune.checkpoint import CheckpointMeta, attach_meta, describe_structure, save
from dnnprune.errors import CheckpointError, OutputError
from dnnprune.models import create_model, zoo_names
from tests.reload import record_io, reload_in_new_process

TORCHVISION = ["torchvision.resnet18", "torchvision.mobilenet_v3_small", "torchvision.efficientnet_b0", "torchvision.densenet121"]


def _shape_for(arch: str) -> tuple[int, int, int]:
    if arch in ("lenet5", "mlp"):
        return (1, 28, 28)
    if arch.startswith("torchvision."):
        return (3, 64, 64)
    return (1, 32, 32)


def _save_with_io(model: nn.Module, arch: str, args: dict, shape: tuple, folder: Path) -> dict[str, str]:
    meta = CheckpointMeta(arch=arch, arch_args=args, input_shape=shape, mean=(0.5,) * shape[0], std=(0.25,) * shape[0])
    stem = arch.replace(".", "_")
    checkpoint = save(attach_meta(model.eval(), meta), folder / f"{stem}.safetensors")
    return record_io(model, checkpoint, shape)


def test_every_model_reloads_bit_identical_in_new_process(tmp_path: Path) -> None:
    items = []
    for arch in zoo_names() + TORCHVISION:
        shape = _shape_for(arch)
        args = {"num_classes": 10, "in_channels": shape[0]}
        model = create_model(arch, **args)
        _randomise_bn(model)
        items.append(_save_with_io(model, arch, args, shape, tmp_path))
    results = reload_in_new_process(items)
    assert len(results) == len(items)
    assert all(results.values()), {k: v for k, v in results.items() if not v}


def _randomise_bn(model: nn.Module) -> None:
    """Non-trivial running stats so a BN buffer lost in the round trip would show."""
    generator = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)


def _shrink_conv_pair(model: nn.Module, first: str, bn: str, second: str, keep: int) -> None:
    """Hand-made channel removal, the kind of change pruning makes."""
    conv1, norm, conv2 = model.get_submodule(first), model.get_submodule(bn), model.get_submodule(second)
    conv1.weight = nn.Parameter(conv1.weight.data[:keep].clone())
    if conv1.bias is not None:
        conv1.bias = nn.Parameter(conv1.bias.data[:keep].clone())
    conv1.out_channels = keep
    norm.weight = nn.Parameter(norm.weight.data[:keep].clone())
    norm.bias = nn.Parameter(norm.bias.data[:keep].clone())
    norm.running_mean = norm.running_mean[:keep].clone()
    norm.running_var = norm.running_var[:keep].clone()
    norm.num_features = keep
    conv2.weight = nn.Parameter(conv2.weight.data[:, :keep].clone())
    conv2.in_channels = keep


def test_structural_changes_and_identity_replacement_round_trip(tmp_path: Path) -> None:
    args = {"num_classes": 10, "in_channels": 1}
    model = create_model("vgg11_bn", **args)
    _shrink_conv_pair(model, "features.0", "features.1", "features.4", keep=17)
    structure, replaced = describe_structure(model, "vgg11_bn", args)
    assert structure["features.0"] == {"out_channels": 17}
    assert structure["features.4"] == {"in_channels": 17}
    assert structure["features.1"] == {"num_features": 17}
    resnet = create_model("resnet20", **args)
    resnet.layer1[1] = nn.Identity()
    _, replaced = describe_structure(resnet, "resnet20", args)
    assert replaced == {"layer1.1": "Identity"}
    items = [_save_with_io(model, "vgg11_bn", args, (1, 32, 32), tmp_path),
             _save_with_io(resnet, "resnet20", args, (1, 32, 32), tmp_path)]
    assert all(reload_in_new_process(items).values())


def test_metadata_and_lineage_survive(tmp_path: Path) -> None:
    meta = CheckpointMeta(arch="lenet5", arch_args={"num_classes": 10, "in_channels": 1}, input_shape=(1, 28, 28),
                          mean=(0.3,), std=(0.4,), dataset="fashion-mnist", classes=[str(i) for i in range(10)])
    model = attach_meta(create_model("lenet5", num_classes=10, in_channels=1), meta)
    meta.lineage_entry("train", "ab" * 32, {"test_top1": 0.9})
    save(model, tmp_path / "a.safetensors")
    loaded = dnnprune.load(tmp_path / "a.safetensors")
    got = dnnprune.meta_of(loaded)
    assert got.input_shape == (1, 28, 28) and got.mean == (0.3,) and got.dataset == "fashion-mnist"
    assert got.lineage[0]["command"] == "train" and got.lineage[0]["metrics"] == {"test_top1": 0.9}
    assert len(got.file_sha256) == 64


def test_existing_output_refused_without_force(tmp_path: Path, lenet_checkpoint: Path) -> None:
    model = dnnprune.load(lenet_checkpoint)
    before = lenet_checkpoint.read_bytes()
    with pytest.raises(OutputError, match="--force"):
        save(model, lenet_checkpoint)
    with pytest.raises(OutputError, match="input"):
        save(model, lenet_checkpoint, force=True, protect=(lenet_checkpoint,))
    assert lenet_checkpoint.read_bytes() == before
    save(model, lenet_checkpoint, force=True)
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "too short"),
        (b"\x80\x04\x95garbage-pickle-bytes", "pickle"),
        (b"PK\x03\x04zip-archive-from-torch-save", "pickle"),
        (b"not a checkpoint at all, just text", "not a safetensors"),
    ],
)
def test_bad_files_raise_checkpoint_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        dnnprune.load(path)


def test_truncated_and_foreign_safetensors(tmp_path: Path, lenet_checkpoint: Path) -> None:
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(lenet_checkpoint.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="truncated"):
        dnnprune.load(truncated)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CheckpointError, match="dnnprune import"):
        dnnprune.load(foreign)
    with pytest.raises(CheckpointError, match="not found"):
        dnnprune.load(tmp_path / "missing.safetensors")


def test_real_torch_save_pickle_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.pth"
    torch.save(create_model("lenet5").state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        dnnprune.load(path)


def test_tensors_stored_are_the_model_tensors(tmp_path: Path, lenet_checkpoint: Path) -> None:
    model = dnnprune.load(lenet_checkpoint)
    stored = load_file(str(lenet_checkpoint))
    assert set(stored) == set(model.state_dict())
    assert all(torch.equal(stored[k], v) for k, v in model.state_dict().items())


def test_written_files_get_normal_permissions(tmp_path: Path, lenet_checkpoint: Path) -> None:
    import os

    umask = os.umask(0)
    os.umask(umask)
    assert lenet_checkpoint.stat().st_mode & 0o777 == 0o666 & ~umask
