"""A new, untrained model for a dataset: the architecture from the registry, the input spec, the
classes and the task from the dataset and the recipe, all recorded in its metadata."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from dnnprune.checkpoint import CheckpointMeta, attach_meta, check_runs, load, meta_of
from dnnprune.data import (
    DATASETS,
    InputSpec,
    Splits,
    default_spec,
    fit_channels,
    image_folder_classes,
    load_splits,
    per_channel,
    resolve_root,
)
from dnnprune.errors import DatasetError, ModelError
from dnnprune.models import accepts_argument, create_model, model_task
from dnnprune.recipe import DataSection, ModelSection
from dnnprune.tasks import TaskSpec, normal_positions
from dnnprune.training import seed_everything


def model_from_source(source: str, model: ModelSection, data: DataSection, seed: int) -> nn.Module:
    """A checkpoint path is loaded (to fine-tune it); an architecture name is built from scratch."""
    if source.endswith(".safetensors") or Path(source).is_file():
        return load_for_recipe(source, model)
    return new_model(source, model, data, seed)


def load_for_recipe(path: str | Path, section: ModelSection) -> nn.Module:
    """A checkpoint, refused where the recipe was written for another architecture: its settings were
    chosen for that one, and its `model:` section would otherwise be dropped without a word."""
    loaded = load(path)
    arch = meta_of(loaded).arch
    if section.arch and section.arch != arch:
        raise ModelError(f"{path} is a {arch!r} checkpoint but the recipe's model.arch is {section.arch!r}; use a "
                         f"recipe for {arch!r} or delete model.arch from it")
    _check_finite(loaded, path)
    return loaded


def _check_finite(model: nn.Module, path: str | Path) -> None:
    """NaN or inf in the weights (a diverged training run) would surface later as a misleading error from
    whatever step touches them first; say it of the input."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ModelError(f"{path}: {name} holds NaN or inf, so the model it was saved from had diverged; "
                             "retrain it (e.g. with a lower learning rate) before compressing it")


def new_model(arch: str, model: ModelSection, data: DataSection, seed: int) -> nn.Module:
    model_task(arch)  # an unknown zoo name is the first thing to say, before what else is missing
    dataset = data.dataset
    if not dataset:
        raise DatasetError("training from scratch needs a dataset: set data.dataset in the recipe or pass --dataset")
    if dataset not in DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(sorted(DATASETS))}")
    if model.arch and model.arch != arch:
        raise ModelError(f"the command names {arch!r} but the recipe's model.arch is {model.arch!r}; make them agree")
    base, file_classes, table = _base_spec(dataset, data)
    shape = tuple(data.input_shape or base.shape)
    mean = per_channel(data.mean, shape[0], "data.mean") if data.mean else fit_channels(base.mean, shape[0])
    std = per_channel(data.std, shape[0], "data.std") if data.std else fit_channels(base.std, shape[0])
    classes = list(DATASETS[dataset].classes or file_classes)
    scaling = table.scaling if table is not None else None
    task = _task(model, arch, classes, numbered=bool(DATASETS[dataset].classes))
    args = {"in_channels": shape[0], **model.args}
    if task.kind == "classification":
        args = {"num_classes": len(classes) or 2, **args}
    if accepts_argument(arch, "input_size") and "input_size" not in args:
        args["input_size"] = shape[-1]
    if accepts_argument(arch, "input_shape") and "input_shape" not in args:
        args["input_shape"] = list(shape)
    seed_everything(seed)
    built = create_model(arch, **args)
    check_runs(built, arch, shape, fix=f"choose an architecture that takes {dataset}'s input (set data.input_shape, "
                                       "or for a table's rows use mlp, a2e or a2e_classifier)")
    meta = CheckpointMeta(arch=arch, arch_args=args, input_shape=shape, mean=mean, std=std, dataset=dataset,
                          classes=classes or None, features=table.features if table is not None else None,
                          feature_mean=list(scaling[0]) if scaling else None,
                          feature_std=list(scaling[1]) if scaling else None, task=task)
    return attach_meta(built, meta)


def _task(model: ModelSection, arch: str, classes: list[str], *, numbered: bool) -> TaskSpec:
    """The recipe's task, its normal labels turned into the class positions the checkpoint stores."""
    if model.task is None:
        return TaskSpec(kind=model_task(arch))
    serves = model_task(arch)
    if model.task.kind != serves:
        fix = "a2e_classifier (or mlp)" if serves == "reconstruction" else "a2e (an autoencoder)"
        raise ModelError(f"{arch} is built for {serves}, but model.task.kind is {model.task.kind}; use {fix} for "
                         f"{model.task.kind}, or drop model.task.kind")
    return TaskSpec(kind=model.task.kind,
                    normal_classes=normal_positions(model.task.normal_classes, classes, numbered=numbered))


def _base_spec(dataset: str, data: DataSection) -> tuple[InputSpec, list[str], Splits | None]:
    """(input spec, classes, feature columns): a table's come from the file, an image folder's classes from
    its sub-folders, the rest from the dataset's defaults."""
    if DATASETS[dataset].kind == "tabular":
        splits = load_splits(dataset, None, data_root=data.root, path=data.path, label_column=data.label_column,
                             val_fraction=data.val_fraction, seed=data.split_seed)
        return splits.spec, list(splits.classes), splits
    if dataset == "imagefolder":
        return default_spec(dataset), image_folder_classes(resolve_root(dataset, data.path or data.root)), None
    return default_spec(dataset), [], None

