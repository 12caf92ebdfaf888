"""dnnprune as a Python library: what a caller passes in, what comes back, and what is left as it was."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune as torch_prune

import dnnprune
from dnnprune.checkpoint import CheckpointMeta, attach_meta
from dnnprune.errors import CheckpointError, DnnpruneError, ModelError, OutputError
from dnnprune.models import create_model, register_model
from dnnprune.recipe import DataSection, ExportSection, PruneSection, QuantizeSection, TrainSection
from tests.conftest import make_checkpoint, needs_fmnist


def _lenet() -> nn.Module:
    model = create_model("lenet5", num_classes=10, in_channels=1)
    return attach_meta(model, CheckpointMeta(arch="lenet5", arch_args={"num_classes": 10, "in_channels": 1},
                                             input_shape=(1, 28, 28), dataset="fashion-mnist"))


def test_export_is_the_function_on_every_access_also_after_its_module_is_imported() -> None:
    """`dnnprune.export` used to become the submodule of the same name after the first access."""
    import dnnprune.onnx_export  # what the CLI, or a user, may import first
    from dnnprune import export

    assert callable(export) and callable(dnnprune.export) and dnnprune.export is export


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode])
def test_commands_run_inside_a_callers_no_grad_block(context: type) -> None:
    model = _lenet()
    with context():
        model, report = dnnprune.prune(model, PruneSection(ratio=0.5, evaluate=False))
    assert report.after["params"] < report.before["params"]


def test_frozen_parameters_are_still_pruned_and_stay_frozen() -> None:
    model = _lenet().requires_grad_(False)
    model, report = dnnprune.prune(model, PruneSection(ratio=0.5, evaluate=False))
    assert report.after["params"] < report.before["params"]
    assert model.features[0].out_channels < 6 and not model.features[3].weight.requires_grad


@needs_fmnist
def test_training_a_fully_frozen_model_names_the_cause() -> None:
    with pytest.raises(ModelError, match="every parameter of the model is frozen"):
        dnnprune.train(_lenet().requires_grad_(False), TrainSection(epochs=1, max_steps=1),
                       data=DataSection(train_limit=200))


@needs_fmnist
def test_a_command_leaves_the_callers_random_streams_alone() -> None:
    def draws() -> tuple[float, float, float]:
        return torch.rand(1).item(), random.random(), float(np.random.rand())

    for seed in (1, 2):
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        expected = draws()
        model = _lenet()  # building it draws from the caller's stream: before seeding
        torch.manual_seed(seed), random.seed(seed), np.random.seed(seed)
        dnnprune.train(model, TrainSection(epochs=1, max_steps=1, seed=0), data=DataSection(train_limit=200))
        assert draws() == expected


def test_the_model_comes_back_in_the_mode_it_was_passed_in() -> None:
    model = _lenet().train()
    model, _ = dnnprune.prune(model, PruneSection(ratio=0.3, evaluate=False))
    assert model.training
    model.eval()
    model, _ = dnnprune.quantize(model, QuantizeSection(bits=8, evaluate=False))
    assert not model.training


@pytest.mark.parametrize("section, name", [({"ratio": 0.5}, "dict"), (None, "NoneType"),
                                           (QuantizeSection(), "QuantizeSection")])
def test_a_section_of_the_wrong_type_is_named(section: object, name: str) -> None:
    with pytest.raises(DnnpruneError, match=f"prune takes a dnnprune.recipe.PruneSection, not {name}"):
        dnnprune.prune(_lenet(), section)  # type: ignore[arg-type]


@pytest.mark.parametrize("device", [0, "mps", "gpu"])
def test_an_unknown_device_is_one_typed_error(device: object) -> None:
    with pytest.raises(DnnpruneError, match="the device must be auto, cpu, cuda or cuda:N"):
        dnnprune.prune(_lenet(), PruneSection(ratio=0.5, evaluate=False), device=device)  # type: ignore[arg-type]


@pytest.mark.parametrize("change, fragment", [
    (lambda m: m.half(), "is torch.float16; dnnprune works on float32 models: call model.float()"),
    (lambda m: torch_prune.l1_unstructured(m.features[0], "weight", amount=0.5), "torch.nn.utils.prune.remove"),
])
def test_what_a_checkpoint_cannot_hold_is_refused_by_commands_and_by_save(tmp_path: Path, change: object,
                                                                          fragment: str) -> None:
    model = _lenet()
    change(model)  # type: ignore[operator]
    with pytest.raises(CheckpointError, match=fragment):
        dnnprune.prune(model, PruneSection(ratio=0.5, evaluate=False))
    with pytest.raises(CheckpointError, match=fragment):
        dnnprune.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_refuses_a_model_that_load_would_refuse(tmp_path: Path) -> None:
    """A hand edit that breaks the forward pass on the declared input used to save, then fail to load."""
    model = _lenet()
    model.features[3].padding = (0, 0)
    model.features[3].kernel_size = (9, 9)
    model.features[3].weight = nn.Parameter(torch.zeros(16, 6, 9, 9))  # 14 -> 6 -> 3: 144 inputs, not 400
    with pytest.raises(CheckpointError, match="not saved, since load would refuse the file"):
        dnnprune.save(model, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_save_and_export_never_replace_the_checkpoint_the_model_came_from(tmp_path: Path) -> None:
    source = make_checkpoint(tmp_path / "lenet.safetensors")
    before = source.read_bytes()
    model = dnnprune.load(source)
    with pytest.raises(OutputError, match="is the checkpoint this model was loaded from"):
        dnnprune.save(model, source, force=True)
    with pytest.raises(OutputError, match="is the checkpoint this model was loaded from"):
        dnnprune.export(model, ExportSection(latency=False), output=str(source), force=True)
    assert source.read_bytes() == before
    onnx_path = tmp_path / "m.onnx"
    dnnprune.export(model, ExportSection(latency=False), output=str(onnx_path))  # a str path works
    with pytest.raises(OutputError, match="already exists"):
        dnnprune.export(model, ExportSection(latency=False), output=onnx_path)
    dnnprune.export(model, ExportSection(latency=False), output=onnx_path, force=True)


@pytest.mark.parametrize("wrap, attribute", [(nn.DataParallel, "module"), (torch.compile, "_orig_mod")])
def test_a_wrapped_model_is_told_which_attribute_to_pass(wrap: object, attribute: str) -> None:
    with pytest.raises(CheckpointError, match=f"pass model.{attribute}, the model it wraps"):
        dnnprune.meta_of(wrap(_lenet()))  # type: ignore[operator]


@pytest.fixture
def registry_kept() -> Iterator[None]:
    """Registrations made by a test are taken out again (other tests list the whole zoo)."""
    from dnnprune.models import registry

    saved = dict(registry._REGISTRY), dict(registry._TASKS)
    yield
    registry._REGISTRY.clear(), registry._REGISTRY.update(saved[0])
    registry._TASKS.clear(), registry._TASKS.update(saved[1])


@pytest.mark.usefixtures("registry_kept")
def test_re_running_a_registration_replaces_it_and_another_definition_is_refused() -> None:
    def define() -> type:
        @register_model("library_test_net")
        class LibraryTestNet(nn.Linear):
            def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
                super().__init__(4, num_classes)

        return LibraryTestNet

    define()
    second = define()  # a notebook cell run again
    assert type(create_model("library_test_net")) is second
    with pytest.raises(ValueError, match="registered twice"):
        register_model("library_test_net")(lambda num_classes=10, in_channels=1: nn.Identity())


@needs_fmnist
def test_an_analysis_saved_by_the_library_feeds_sensitivity_ordered_pruning(tmp_path: Path) -> None:
    from dnnprune.recipe import AnalyzeSection

    model = _lenet()
    _, analysis = dnnprune.analyze(model, AnalyzeSection(ratios=[0.5], samples=100),
                                   data=DataSection(train_limit=500))
    path = tmp_path / "analysis.json"
    path.write_text(analysis.model_dump_json())
    _, report = dnnprune.prune(model, PruneSection(ratio=0.3, order="sensitivity", analysis=path,
                                                        evaluate=False))
    assert report.layer_order == analysis.order


def _weights(model: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith(prefix)}


@needs_fmnist
def test_a_fine_tune_after_surgery_never_trains_a_frozen_layer() -> None:
    """Torch-Pruning makes new Parameters for the layers it cuts: they were trained by the fine-tune that
    followed, then marked frozen again (the flags said frozen; the weights had moved)."""
    from dnnprune.recipe import FineTuneSection

    def pruned(steps: int) -> nn.Module:
        torch.manual_seed(0)
        model = _lenet()
        model.features.requires_grad_(False)
        finetune = FineTuneSection(max_steps=steps, lr=0.1) if steps else None
        section = PruneSection(ratio=0.5, evaluate=False, **({"finetune": finetune} if finetune else {}))
        return dnnprune.prune(model, section, data=DataSection(train_limit=300))[0]

    still, tuned = pruned(0), pruned(5)
    for key, value in _weights(still, "features").items():
        assert torch.equal(value, tuned.state_dict()[key]), key
    assert not torch.equal(still.classifier[1].weight, tuned.classifier[1].weight)  # the head did train


@needs_fmnist
def test_a_frozen_quantized_weight_keeps_its_codebook_through_a_fine_tune() -> None:
    from dnnprune.recipe import FineTuneSection

    def quantized(steps: int) -> nn.Module:
        torch.manual_seed(0)
        model = _lenet()
        model.classifier[1].requires_grad_(False)
        finetune = {"finetune": FineTuneSection(epochs=1, max_steps=steps, lr=0.1)} if steps else {}
        section = QuantizeSection(bits=4, layers=["type:Linear"], evaluate=False, **finetune)
        return dnnprune.quantize(model, section, data=DataSection(train_limit=300))[0]

    still, tuned = quantized(0), quantized(5)
    assert torch.equal(still.classifier[1].weight, tuned.classifier[1].weight)
    assert not torch.equal(still.classifier[3].weight, tuned.classifier[3].weight)


@pytest.mark.parametrize("device", [torch.device("meta"), torch.device("cpu", 0).__class__("mps")])
def test_a_device_object_is_checked_as_a_name_is(device: torch.device) -> None:
    with pytest.raises(DnnpruneError, match="the device must be auto, cpu, cuda or cuda:N"):
        dnnprune.prune(_lenet(), PruneSection(ratio=0.5, evaluate=False), device=device)


def test_a_byte_identical_copy_of_the_source_may_be_replaced(tmp_path: Path) -> None:
    """The source is protected by path; a copy elsewhere with the same bytes is another file."""
    source = make_checkpoint(tmp_path / "lenet.safetensors")
    copy_path = tmp_path / "copy.safetensors"
    copy_path.write_bytes(source.read_bytes())
    model = dnnprune.load(source)
    dnnprune.save(model, copy_path, force=True)
    link = tmp_path / "link.safetensors"
    link.symlink_to(source)
    with pytest.raises(OutputError, match="is the checkpoint this model was loaded from"):
        dnnprune.save(model, link, force=True)


def test_choosing_a_threshold_for_a_classifier_is_a_typed_error() -> None:
    from dnnprune.thresholds import choose_on_val

    with pytest.raises(DnnpruneError, match="is no anomaly detector"):
        choose_on_val(_lenet(), DataSection(), torch.device("cpu"))
