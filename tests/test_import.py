"""`import` of plain torchvision state dicts: every classifier, as torchvision itself saves it.

Every classifier goes through the import on the meta device (keys and shapes, no memory); a subset also
compares real outputs, and the large models do so under the `slow` mark.
"""

from __future__ import annotations

import contextlib
import hashlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode
from torchvision import models

from dnnprune.checkpoint import meta_of
from dnnprune.errors import DnnpruneError
from dnnprune.importer import import_state_dict, import_weights
from dnnprune.models import create_model, torchvision_names
from tests.conftest import unchecked_saves

NAMES = [name.removeprefix("torchvision.") for name in torchvision_names()]
# Saved the way torchvision trains them: with the auxiliary heads (googlenet's default warns without init_weights).
_SOURCE_ARGS: dict[str, dict[str, Any]] = {"googlenet": {"aux_logits": True, "init_weights": True},
                                           "inception_v3": {"aux_logits": True, "init_weights": True}}
_AUX = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}
# Constructor arguments that let a model take a small input (ViTs fix their image size at construction).
_ARCH_ARGS: dict[str, dict[str, Any]] = {name: {"image_size": 28 if name == "vit_h_14" else 32}
                                         for name in NAMES if name.startswith("vit_")}
_SIDE = {"alexnet": 63, "inception_v3": 75, "maxvit_t": 224, "vit_h_14": 28}  # smallest input each accepts
# Real outputs compared in the quick run: every family, the special cases (aux heads, mnasnet's version,
# attention), each small; the rest runs under `-m slow`.
_QUICK = {"convnext_tiny", "densenet121", "efficientnet_b0", "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5",
          "mobilenet_v2", "mobilenet_v3_small", "regnet_x_400mf", "regnet_y_400mf", "resnet18", "shufflenet_v2_x0_5",
          "squeezenet1_1", "swin_t"}


class _CpuRanges(TorchFunctionMode):
    """Inside torch.device("meta"): keep arange/tensor on the CPU, since regnet's builder turns them
    into Python lists of widths, which meta tensors cannot give."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
                           ) -> Any:
        kwargs = dict(kwargs or {})
        if func in (torch.arange, torch.tensor) and kwargs.get("device") is None:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _source(name: str) -> nn.Module:
    """The model as a user trains it with torchvision directly, not through dnnprune."""
    return models.get_model(name, weights=None, num_classes=10, **_SOURCE_ARGS.get(name, {}),
                            **_ARCH_ARGS.get(name, {})).eval()


def _import_args(name: str) -> dict[str, Any]:
    side = _SIDE.get(name, 32)
    return {"num_classes": 10, "input_shape": (3, side, side), "arch_args": _ARCH_ARGS.get(name)}


@pytest.fixture
def _no_init(monkeypatch: pytest.MonkeyPatch) -> None:
    """Meta tensors hold no values, so initialising them only costs time (half of building 80 models)."""
    for name in dir(nn.init):
        if name.endswith("_") and not name.startswith("_"):
            monkeypatch.setattr(nn.init, name, lambda tensor, *_args, **_kwargs: tensor)


@pytest.mark.usefixtures("_no_init")
@pytest.mark.parametrize("name", NAMES)
def test_every_classifier_imports_its_plain_state_dict(name: str) -> None:
    """A plain dict, as a safetensors file gives it: no `_metadata` with module versions."""
    ranges = _CpuRanges() if name.startswith("regnet") else contextlib.nullcontext()
    with torch.device("meta"), ranges:
        state = dict(_source(name).state_dict())
        model, report = import_state_dict(state, f"torchvision.{name}", **_import_args(name))
    aux = [key for key in state if key.startswith(_AUX.get(name, ()))]
    assert sorted(report.dropped_keys) == sorted(aux) and (name not in _AUX or aux)
    imported = model.state_dict()
    assert set(imported) == set(state) - set(aux)
    assert all(imported[key].shape == state[key].shape for key in imported)


def _trained_looking(model: nn.Module) -> nn.Module:
    """Running statistics that differ from a fresh build's, so that one not loaded shows in the outputs."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    return model


def _assert_same_outputs(name: str, original: nn.Module, imported: nn.Module) -> None:
    side = _SIDE.get(name, 32)
    sample = torch.randn(1, 3, side, side)
    with torch.inference_mode():
        assert torch.equal(imported(sample), original(sample))


@pytest.mark.parametrize("name", [name if name in _QUICK else pytest.param(name, marks=pytest.mark.slow)
                                  for name in NAMES])
def test_imported_torch_save_weights_reproduce_outputs(name: str, tmp_path: Path) -> None:
    original = _trained_looking(_source(name))
    weights = tmp_path / f"{name}.pth"
    torch.save(original.state_dict(), weights)
    imported, _ = import_weights(weights, f"torchvision.{name}", **_import_args(name))
    _assert_same_outputs(name, original, imported)


@pytest.mark.parametrize("name", ["mnasnet0_5", "googlenet", "shufflenet_v2_x0_5"])
def test_imported_safetensors_weights_reproduce_outputs(name: str, tmp_path: Path) -> None:
    original = _trained_looking(_source(name))
    weights = tmp_path / f"{name}.safetensors"
    save_file({key: value.contiguous() for key, value in original.state_dict().items()}, str(weights))
    imported, report = import_weights(weights, f"torchvision.{name}", **_import_args(name))
    _assert_same_outputs(name, original, imported)
    note = report.dropped_summary()
    assert ("aux1, aux2" in note) if name == "googlenet" else note is None


def test_auxiliary_heads_are_kept_when_the_model_has_them(tmp_path: Path) -> None:
    original = _source("googlenet")
    weights = tmp_path / "googlenet.pth"
    torch.save(original.state_dict(), weights)
    imported, report = import_weights(weights, "torchvision.googlenet", num_classes=10, input_shape=(3, 32, 32),
                                      arch_args={"aux_logits": True, "init_weights": True})
    assert report.dropped_keys == [] and imported.aux1 is not None


def test_mnasnet_checkpoint_round_trip_without_metadata() -> None:
    """dnnprune's own checkpoints are safetensors too: a fresh build must take a plain dict back."""
    source = create_model("torchvision.mnasnet0_5", num_classes=10)
    again = create_model("torchvision.mnasnet0_5", num_classes=10)
    again.load_state_dict(dict(source.state_dict()))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), source.state_dict().values()))


@pytest.mark.parametrize("mean, std, expected_mean, expected_std", [
    ((0.286,), (0.353,), (0.286,) * 3, (0.353,) * 3),
    ((0.4, 0.5, 0.6), (0.2,), (0.4, 0.5, 0.6), (0.2,) * 3),
    (None, None, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_one_mean_or_std_value_serves_every_channel(mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                                                    expected_mean: tuple[float, ...],
                                                    expected_std: tuple[float, ...]) -> None:
    state = create_model("torchvision.squeezenet1_1", num_classes=10).state_dict()
    _, report = import_state_dict(state, "torchvision.squeezenet1_1", num_classes=10, input_shape=(3, 32, 32),
                                  mean=mean, std=std)
    assert report.mean == pytest.approx(expected_mean) and report.std == pytest.approx(expected_std)


@pytest.mark.parametrize("mean, std, fragment", [
    ((0.3, 0.4), None, r"--mean takes 1 value \(for every channel\) or 3, one per input channel; got 2"),
    (None, (0.2, 0.3), r"--std takes 1 value"),
    (None, (0.0,), r"--std values must be positive"),
])
def test_mean_and_std_of_the_wrong_length_are_refused(mean: tuple[float, ...] | None, std: tuple[float, ...] | None,
                                                      fragment: str) -> None:
    state = create_model("torchvision.squeezenet1_1", num_classes=10).state_dict()
    with pytest.raises(DnnpruneError, match=fragment) as raised:
        import_state_dict(state, "torchvision.squeezenet1_1", num_classes=10, input_shape=(3, 32, 32), mean=mean, std=std)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_the_import_reads_its_file_once_and_records_the_digest_of_those_bytes(suffix: str, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The recorded SHA-256 is of the bytes that were imported: a second read could see a file changed since."""
    original = _source("mnasnet0_5")
    weights = tmp_path / f"w{suffix}"
    if suffix == ".pth":
        torch.save(original.state_dict(), weights)
    else:
        save_file({key: value.contiguous() for key, value in original.state_dict().items()}, str(weights))
    expected = hashlib.sha256(weights.read_bytes()).hexdigest()
    reads: list[Path] = []
    real_open = Path.open  # Path.read_bytes opens through it too
    monkeypatch.setattr(Path, "open", lambda self, *a, **k: reads.append(self) or real_open(self, *a, **k))
    imported, _ = import_weights(weights, "torchvision.mnasnet0_5", **_import_args("mnasnet0_5"))
    assert reads.count(weights) == 1
    assert meta_of(imported).file_sha256 == expected


def test_an_input_shape_the_model_cannot_take_is_refused_at_import_and_at_load(tmp_path: Path) -> None:
    """SqueezeNet pools 16 px down to nothing: refused in one line at import, and a checkpoint that declares
    such a shape anyway (written by hand or by an older version) is refused when it is loaded."""
    from dnnprune.checkpoint import CheckpointMeta, attach_meta, load, save

    weights = tmp_path / "squeezenet.safetensors"
    source = _source("squeezenet1_1")
    save_file({key: value.contiguous() for key, value in source.state_dict().items()}, str(weights))
    with pytest.raises(DnnpruneError, match=r"squeezenet1_1 cannot run on its input shape 3x16x16 \(RuntimeError: "
                                            r".*too small\); import it with an --input-shape"):
        import_weights(weights, "torchvision.squeezenet1_1", num_classes=10, input_shape=(3, 16, 16))
    model, _ = import_weights(weights, "torchvision.squeezenet1_1", num_classes=10, input_shape=(3, 24, 24))
    meta = meta_of(model).model_copy(update={"input_shape": (3, 16, 16)})
    crafted = tmp_path / "declared-16.safetensors"
    with pytest.raises(DnnpruneError, match=r"not saved, since load would refuse the file: .*3x16x16"):
        save(attach_meta(model, CheckpointMeta.model_validate(meta.model_dump())), crafted)
    assert not crafted.exists()
    with unchecked_saves():  # as a hand-edited file or an older version could have written it
        save(attach_meta(model, CheckpointMeta.model_validate(meta.model_dump())), crafted)
    with pytest.raises(DnnpruneError, match=r"declared-16\.safetensors: torchvision\.squeezenet1_1 cannot run on its "
                                            r"input shape 3x16x16 .*re-import the weights"):
        load(crafted)


@pytest.mark.parametrize("kind, fragment", [("sparse", "is a sparse_coo tensor"), ("complex", "is complex"),
                                            ("quantized", "is a quantized tensor")])
def test_weights_that_are_not_dense_real_tensors_are_refused_by_name(kind: str, fragment: str, tmp_path: Path) -> None:
    """These failed inside load_state_dict with a traceback, or (complex) lost their imaginary part silently."""
    state = create_model("lenet5").state_dict()
    convert = {"sparse": lambda t: t.to_sparse(), "complex": lambda t: t.to(torch.complex64),
               "quantized": lambda t: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8)}[kind]
    weights = tmp_path / "odd.pt"
    with warnings.catch_warnings():  # torch deprecates quantized tensors
        warnings.simplefilter("ignore")
        torch.save({k: convert(v) if k == "classifier.1.weight" else v for k, v in state.items()}, weights)
    with pytest.raises(DnnpruneError, match=rf"weight 'classifier\.1\.weight' {fragment}.*import those"):
        import_weights(weights, "lenet5", num_classes=10, dataset="fashion-mnist")
