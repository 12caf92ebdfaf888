"""Data for a checkpoint: its dataset, adapted to its input spec, loaded once per process."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterator, Literal

import torch
from pydantic import BaseModel
from torch.utils.data import BatchSampler, ConcatDataset, DataLoader, Dataset, RandomSampler, Sampler

from dnnprune.checkpoint import CheckpointMeta
from dnnprune.data import (
    InputSpec,
    Scaling,
    Splits,
    collate,
    dataset_targets,
    listed_names,
    load_splits,
    make_loader,
    stratified_subset,
    subset,
)
from dnnprune.distributed import distributed_env
from dnnprune.errors import DatasetError
from dnnprune.recipe import DataSection
from dnnprune.tasks import make_task

SplitName = Literal["train", "val", "test", "all"]  # all: every sample the data holds, the three splits together


def spec_for(meta: CheckpointMeta) -> InputSpec:
    return InputSpec(tuple(meta.input_shape), tuple(meta.mean), tuple(meta.std))


def dataset_name(meta: CheckpointMeta, section: DataSection) -> str:
    name = section.dataset or meta.dataset
    if not name:
        raise DatasetError("no dataset known for this checkpoint; set data.dataset in the recipe or pass --dataset")
    return name


def splits_for(meta: CheckpointMeta, section: DataSection, *, whole: bool = False) -> Splits:
    """The checkpoint's data; `whole`: a table read unsplit into `train` (what `--split all` scores)."""
    name = dataset_name(meta, section)
    scaling = (tuple(meta.feature_mean), tuple(meta.feature_std)) if meta.feature_mean and meta.feature_std else None
    known = tuple(meta.classes) if meta.classes and meta.features else None  # a table the model was trained on
    whole = whole and meta.features is not None  # other data has its splits fixed: no second copy in the cache
    splits = _cached_splits(name, spec_for(meta), section.root, section.path, section.download,
                            section.val_fraction, section.split_seed, section.label_column, section.train_limit, scaling,
                            known, whole)
    check_fits(meta, splits, name)
    return splits


def check_fits(meta: CheckpointMeta, splits: Splits, name: str) -> None:
    """The data must be what the model was built for: a table's columns in the same order, the same class
    names where it is the same dataset, no more classes than outputs, something left to call anomalous.
    Each mismatch would otherwise score a model on shuffled inputs or labels, or crash mid-run."""
    if meta.features and splits.features is not None and list(meta.features) != splits.features:
        _different_columns(list(meta.features), splits.features, name)
    classes = list(splits.classes)
    if meta.task.kind == "classification" and classes:
        if meta.classes and name == meta.dataset and list(meta.classes) != classes:
            raise DatasetError(f"this {name} data has classes {listed_names(classes)} but the model was trained on "
                               f"{listed_names(list(meta.classes))}; use data labelled the same way")
        outputs = meta.arch_args.get("num_classes")
        if isinstance(outputs, int) and outputs < len(classes):
            raise DatasetError(f"the model has {outputs} outputs but {name} has {len(classes)} classes; use data with "
                               f"at most {outputs} classes, or a model built for this data")
    normal = set(meta.task.normal_classes)
    if normal and classes and normal >= set(range(len(classes))):
        raise DatasetError(f"model.task.normal_classes {sorted(normal)} covers every class of {name} "
                           f"({listed_names(classes)}), so nothing is left to detect; leave at least one class out")


def _different_columns(trained: list[str], given: list[str], name: str) -> None:
    position = next((i for i, (a, b) in enumerate(zip(trained, given)) if a != b), min(len(trained), len(given)))
    have = repr(given[position]) if position < len(given) else "missing"
    want = repr(trained[position]) if position < len(trained) else "absent"
    raise DatasetError(f"this {name} file's feature columns differ from the model's: column {position + 1} is {have}, "
                       f"the model's is {want} ({len(given)} columns against {len(trained)}); give the columns in the "
                       "order the model was trained on")


@lru_cache(maxsize=4)
def _cached_splits(name: str, spec: InputSpec, root: Path | None, path: Path | None, download: bool,
                   val_fraction: float, seed: int, label_column: str, train_limit: int | None,
                   scaling: Scaling | None = None, known_classes: tuple[str, ...] | None = None,
                   whole: bool = False) -> Splits:
    return load_splits(name, spec, data_root=root, download=download, val_fraction=val_fraction, seed=seed,
                       label_column=label_column, path=path, train_limit=train_limit, scaling=scaling,
                       known_classes=known_classes, whole=whole)


def split_dataset(meta: CheckpointMeta, section: DataSection, split: SplitName, samples: int | None = None,
                  seed: int = 0) -> Dataset:
    if split == "all":
        splits = splits_for(meta, _unlimited(section), whole=True)
        dataset: Dataset = ConcatDataset([splits.train, splits.val, splits.test])
    else:
        dataset = getattr(splits_for(meta, section), split)
    return stratified_subset(dataset, samples, seed) if samples else dataset


def dataset_size(meta: CheckpointMeta, section: DataSection, *, whole: bool = False) -> int:
    """Samples in the three splits together, whatever `train_limit` says: what `--split all` scores.
    `whole` counts a table read unsplit (as `--split all` reads it), else the split read already cached."""
    splits = splits_for(meta, _unlimited(section), whole=whole)
    return len(splits.train) + len(splits.val) + len(splits.test)


def _unlimited(section: DataSection) -> DataSection:
    return section.model_copy(update={"train_limit": None}) if section.train_limit is not None else section


def subset_size(section: BaseModel, field: str, meta: CheckpointMeta, data: DataSection, split: SplitName) -> int | None:
    """The section's subset size for `split`; a default the user did not set, larger than a small dataset's
    split, takes the whole split instead of failing on a number the user never chose."""
    wanted = getattr(section, field)
    if wanted is None or field in section.model_fields_set:
        return wanted
    return min(wanted, len(split_dataset(meta, data, split)))


def eval_loader(meta: CheckpointMeta, section: DataSection, split: SplitName = "test", samples: int | None = None,
                seed: int = 0) -> DataLoader:
    return make_loader(split_dataset(meta, section, split, samples, seed), section.batch_size, workers=section.workers)


def train_loader(meta: CheckpointMeta, section: DataSection, batch_size: int, seed: int) -> DataLoader:
    """Shuffled training batches; an anomaly detector sees only its normal classes.

    Under torchrun every process draws the same shuffled global batches of `batch_size` and takes its
    own equal slice of each, so N processes step through exactly the batches one process would.
    """
    dataset = train_dataset(meta, section)
    rank, world = distributed_env()
    if world <= 1 or not torch.distributed.is_initialized():
        return make_loader(dataset, batch_size, shuffle=True, seed=seed, workers=section.workers)
    if batch_size % world:
        raise DatasetError(f"the batch size {batch_size} does not split evenly over {world} processes; use a "
                           f"multiple of {world}")
    generator = torch.Generator().manual_seed(seed)  # shared as make_loader shares it: the same draws, in order
    sampler = RankSlices(BatchSampler(RandomSampler(dataset, generator=generator), batch_size, drop_last=False), rank,
                         world)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=section.workers, collate_fn=collate,
                      generator=generator)


class RankSlices(Sampler[list[int]]):
    """Global batches cut into `world` equal, contiguous slices; this process yields slice `rank` of each
    (the few samples of a last, uneven batch that do not divide evenly are left out)."""

    def __init__(self, batches: BatchSampler, rank: int, world: int) -> None:
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            share = len(batch) // self.world
            yield batch[self.rank * share:(self.rank + 1) * share] if share else batch[:1]


def train_dataset(meta: CheckpointMeta, section: DataSection) -> Dataset:
    dataset = splits_for(meta, section).train
    keep = make_task(meta.task).trains_on(dataset_targets(dataset))
    if keep is None:
        return dataset
    if not bool(keep.any()):
        raise DatasetError(f"the training split holds no sample of the normal classes {list(meta.task.normal_classes)}; "
                           "check model.task.normal_classes against the dataset's labels")
    return subset(dataset, keep.nonzero().squeeze(1).tolist())


def calibration_inputs(meta: CheckpointMeta, section: DataSection, samples: int, seed: int) -> torch.Tensor:
    """A fixed, seeded draw of training inputs (never validation or test) for fitting least-squares bridges."""
    dataset = train_dataset(meta, section)
    picked = stratified_subset(dataset, min(samples, len(dataset)), seed)
    return torch.cat([inputs for inputs, _ in make_loader(picked, 256)])
