"""Checkpoints rebuild the exact model in a new process, for every family and structural change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import dnnprune
from dnnprune import codecs as c
from dnnprune.checkpoint import (
    CheckpointMeta,
    LineageEntry,
    Shortcut,
    attach_meta,
    describe_structure,
    mark_shortcut,
    read_meta,
    save,
    tensor_index,
)
from dnnprune.errors import CheckpointError, OutputError
from dnnprune.models import accepts_argument, create_model, model_task, zoo_names
from tests.conftest import make_checkpoint
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


def test_every_model_reloads_identically_in_new_process(tmp_path: Path) -> None:
    items = []
    for arch in zoo_names() + TORCHVISION:
        shape = _shape_for(arch)
        args = _args_for(arch, shape)
        model = create_model(arch, **args)
        _randomise_bn(model)
        items.append(_save_with_io(model, arch, args, shape, tmp_path))
    results = reload_in_new_process(items)
    assert len(results) == len(items)
    assert all(results.values()), {k: v for k, v in results.items() if not v}


def _args_for(arch: str, shape: tuple[int, int, int]) -> dict:
    """Constructor arguments every registered model takes (autoencoders have no classes)."""
    args: dict = {"in_channels": shape[0]}
    if model_task(arch) == "classification":
        args["num_classes"] = 10
    if accepts_argument(arch, "input_shape"):
        args["input_shape"] = list(shape)
    return args


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
    _randomise_bn(resnet)
    resnet.layer1[1] = nn.Identity()
    resnet.layer2[0] = mark_shortcut(resnet.layer2[0].shortcut, "shortcut")  # layer pruning: the block's downsample path
    resnet.layer2[0][1].eps = 1e-3
    structure, replaced = describe_structure(resnet, "resnet20", args)
    assert replaced == {"layer1.1": "Identity", "layer2.0": Shortcut(kind="shortcut", source="shortcut")}
    assert structure == {"layer2.0.1": {"eps": 1e-3}}
    items = [_save_with_io(model, "vgg11_bn", args, (1, 32, 32), tmp_path),
             _save_with_io(resnet, "resnet20", args, (1, 32, 32), tmp_path)]
    assert all(reload_in_new_process(items).values())
    reloaded = dnnprune.load(items[1]["checkpoint"])
    assert isinstance(reloaded.layer2[0], nn.Sequential) and isinstance(reloaded.layer1[1], nn.Identity)
    assert describe_structure(reloaded, "resnet20", args) == (structure, replaced)  # it saves again the same way


def test_metadata_and_lineage_survive(tmp_path: Path) -> None:
    meta = CheckpointMeta(arch="lenet5", arch_args={"num_classes": 10, "in_channels": 1}, input_shape=(1, 28, 28),
                          mean=(0.3,), std=(0.4,), dataset="fashion-mnist", classes=[str(i) for i in range(10)])
    model = attach_meta(create_model("lenet5", num_classes=10, in_channels=1), meta)
    meta.add_lineage("train", "ab" * 32, {"test_top1": 0.9, "per_class": (0.5, 1.0)})
    save(model, tmp_path / "a.safetensors")
    loaded = dnnprune.load(tmp_path / "a.safetensors")
    got = dnnprune.meta_of(loaded)
    assert got.input_shape == (1, 28, 28) and got.mean == (0.3,) and got.dataset == "fashion-mnist"
    assert isinstance(got.lineage[0], LineageEntry) and got.lineage[0].command == "train"
    assert got.lineage[0].metrics == {"test_top1": 0.9, "per_class": [0.5, 1.0]} and got.lineage[0].parent_sha256 is None
    assert got.task.kind == "classification" and got.format_version == 2
    assert len(got.file_sha256) == 64 and "file_sha256" not in got.to_json()
    got.add_lineage("prune", None, {})
    assert got.lineage[1].parent_sha256 == got.file_sha256


def test_source_date_epoch_makes_byte_identical_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    paths, source = [], make_checkpoint(tmp_path / "source.safetensors")
    for name in ("a", "b"):
        model = dnnprune.load(source)
        dnnprune.meta_of(model).add_lineage("train", None, {"loss": 0.5})
        paths.append(save(model, tmp_path / f"{name}.safetensors"))
    assert dnnprune.meta_of(dnnprune.load(paths[0])).lineage[-1].time_utc == "2023-11-14T22:13:20+00:00"
    assert paths[0].read_bytes() == paths[1].read_bytes()


def test_read_meta_and_tensor_index_read_only_the_header(tmp_path: Path, lenet_checkpoint: Path) -> None:
    full = dnnprune.meta_of(dnnprune.load(lenet_checkpoint))
    header_only = tmp_path / "header-only.safetensors"
    payload = lenet_checkpoint.read_bytes()
    head = payload[: 8 + int.from_bytes(payload[:8], "little")]
    header_only.write_bytes(head)  # no tensor bytes at all: the metadata reads, the byte ranges do not fit
    assert read_meta(header_only).to_json() == full.to_json()
    with pytest.raises(CheckpointError, match="truncated"):
        tensor_index(header_only)
    with header_only.open("r+b") as handle:  # the data section as a hole of zeros: never read, only its size
        handle.truncate(len(payload))
    index = tensor_index(header_only)
    assert index["classifier.1.weight"] == ("F32", (120, 400), 120 * 400 * 4)
    assert set(index) == set(create_model("lenet5", num_classes=10, in_channels=1).state_dict())
    with pytest.raises(CheckpointError, match="not found"):
        read_meta(tmp_path / "missing.safetensors")


def _as_format_1(path: Path) -> None:
    """Rewrite a checkpoint's metadata the way dnnprune wrote it before format 2 (same tensor parts)."""
    from safetensors.torch import load as st_load
    from safetensors.torch import save as st_save

    from dnnprune.checkpoint import read_safetensors_metadata

    payload = path.read_bytes()
    data = json.loads(read_safetensors_metadata(path, payload)["dnnprune"])
    data.pop("task")
    data["format_version"] = 1
    data["extra"] = {}
    data["encodings"] = {name: spec["values"] for name, spec in data["encodings"].items()}
    path.write_bytes(st_save(st_load(payload), metadata={"dnnprune": json.dumps(data, sort_keys=True)}))


def test_format_1_checkpoints_still_load(tmp_path: Path) -> None:
    from dnnprune.quantization import quantize_layers
    from dnnprune.recipe import QuantizeSection

    model = dnnprune.load(make_checkpoint(tmp_path / "float.safetensors"))
    quantize_layers(model, QuantizeSection(method="kmeans", bits=4, layers=["classifier.1"]))
    model.classifier[3] = model.classifier[3]
    path = save(model, tmp_path / "v1.safetensors")
    _as_format_1(path)
    old = dnnprune.load(path)
    meta = dnnprune.meta_of(old)
    assert meta.format_version == 1 and meta.encodings == {"classifier.1.weight": c.Encoding(values=c.KMeansSpec(bits=4))}
    assert all(torch.equal(old.state_dict()[k], v) for k, v in model.state_dict().items())
    again = save(old, tmp_path / "v2.safetensors")
    assert json.loads(read_meta(again).to_json())["format_version"] == 2


def test_stacked_sparse_kmeans_checkpoint_round_trips_in_a_new_process(tmp_path: Path) -> None:
    model = dnnprune.load(make_checkpoint(tmp_path / "float.safetensors"))
    layer = model.classifier[1]
    keep = torch.rand(layer.weight.shape, generator=torch.Generator().manual_seed(3)) >= 0.8
    encoding = c.Encoding(sparse=c.SparseSpec(index_bits=5), values=c.KMeansSpec(bits=4))
    with torch.no_grad():
        layer.weight.copy_(c.on_grid(c.kmeans_grid(layer.weight * keep, 4, iterations=20), encoding))
    dnnprune.meta_of(model).encodings = {"classifier.1.weight": encoding}
    path = save(model, tmp_path / "stacked.safetensors")
    stored = tensor_index(path)
    assert {k for k in stored if k.startswith("classifier.1.weight::")} == {
        f"classifier.1.weight::{p}" for p in ("shape", "count", "index", "codes", "codebook")}
    assert sum(v[2] for k, v in stored.items() if k.startswith("classifier.1.weight::")) < layer.weight.numel() * 4 / 12
    assert all(reload_in_new_process([record_io(model, path, (1, 28, 28))]).values())
    reloaded = dnnprune.load(path)
    assert torch.equal(reloaded.classifier[1].weight == 0, layer.weight == 0)
    assert dnnprune.meta_of(reloaded).encodings == {"classifier.1.weight": encoding}


def test_existing_output_refused_without_force(tmp_path: Path, lenet_checkpoint: Path) -> None:
    model = dnnprune.load(lenet_checkpoint)
    before = lenet_checkpoint.read_bytes()
    with pytest.raises(OutputError, match="--force"):
        save(model, lenet_checkpoint)
    with pytest.raises(OutputError, match="input"):
        save(model, lenet_checkpoint, force=True, protect=(lenet_checkpoint,))
    with pytest.raises(OutputError, match="is the checkpoint this model was loaded from"):
        save(model, lenet_checkpoint, force=True)  # the library's call, with no list of inputs
    assert lenet_checkpoint.read_bytes() == before
    other = make_checkpoint(tmp_path / "other.safetensors", "mlp")
    save(model, other, force=True)
    assert dnnprune.meta_of(dnnprune.load(other)).arch == "lenet5"
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


def test_quantize_stacks_its_codes_on_a_sparse_layer(tmp_path: Path) -> None:
    from dnnprune.quantization import quantize, quantize_layers
    from dnnprune.recipe import QuantizeSection

    model = dnnprune.load(make_checkpoint(tmp_path / "float.safetensors"))
    twin = dnnprune.load(make_checkpoint(tmp_path / "twin.safetensors"))
    layer = model.classifier[1]
    with torch.no_grad():
        layer.weight.mul_(torch.rand(layer.weight.shape) >= 0.9)
    zeros = layer.weight == 0
    twin.load_state_dict(model.state_dict())
    sparse = {"classifier.1.weight": c.Encoding(sparse=c.SparseSpec(index_bits=5))}
    dnnprune.meta_of(model).encodings = dict(sparse)
    dnnprune.meta_of(twin).encodings = dict(sparse)
    section = QuantizeSection(method="kmeans", bits=5, layers=["classifier.1"])
    result = quantize_layers(model, section)
    stacked = c.Encoding(sparse=c.SparseSpec(index_bits=5), values=c.KMeansSpec(bits=5))
    assert dnnprune.meta_of(model).encodings == {"classifier.1.weight": stacked}
    assert torch.equal(layer.weight == 0, zeros) and result.layers[0].bytes_after < layer.weight.numel() * 4 / 15
    reloaded = dnnprune.load(save(model, tmp_path / "stacked.safetensors"))
    assert torch.equal(reloaded.classifier[1].weight, layer.weight)
    # the command does the same and says so in its report and lineage
    returned, report = quantize(twin, section.model_copy(update={"evaluate": False}))
    assert returned is twin and dnnprune.meta_of(twin).encodings == {"classifier.1.weight": stacked}
    assert torch.equal(twin.classifier[1].weight, layer.weight)
    assert report.layers[0]["bytes_after"] == result.layers[0].bytes_after
    assert dnnprune.meta_of(twin).lineage[-1].command == "quantize"


def test_fields_a_checkpoint_does_not_use_are_not_written(tmp_path: Path, lenet_checkpoint: Path) -> None:
    """An image model's file carries no table fields, so a dnnprune from before them still reads it."""
    text = json.loads(dnnprune.meta_of(dnnprune.load(lenet_checkpoint)).to_json())
    assert not {"features", "feature_mean", "feature_std"} & set(text)
    meta = CheckpointMeta(arch="mlp", arch_args={"num_classes": 2}, input_shape=(1, 1, 2), features=["a", "b"],
                          feature_mean=[0.0, 1.0], feature_std=[1.0, 2.0])
    assert CheckpointMeta.from_json(meta.to_json()).feature_std == [1.0, 2.0]
