"""Shared fixtures: tiny checkpoints, the CLI runner, and the Fashion-MNIST skip."""

from __future__ import annotations

import importlib.util
import os
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest
import torch
from typer.testing import CliRunner

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

needs_fmnist = pytest.mark.skipif(
    not (FMNIST_DIR / "train-images-idx3-ubyte.gz").exists(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests share one dataset cache per session but never the user's home."""
    cache = tmp_path_factory.getbasetemp() / "dnnprune-cache"
    monkeypatch.setenv("DNNPRUNE_CACHE", str(cache))
    torch.manual_seed(0)


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@contextmanager
def unchecked_saves() -> Iterator[None]:
    """`save` without its load-back check, to write the broken files that load must refuse (a shape the
    model cannot run), as a hand edit or an older version could."""
    from dnnprune import checkpoint

    check = checkpoint._check_loads_back
    checkpoint._check_loads_back = lambda *args, **kwargs: None
    try:
        yield
    finally:
        checkpoint._check_loads_back = check


def make_checkpoint(path: Path, arch: str = "lenet5", **args: object) -> Path:
    """A real, untrained dnnprune checkpoint of a registered model."""
    from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
    from dnnprune.data import DATASETS, default_spec
    from dnnprune.models import create_model

    spec = default_spec("fashion-mnist")
    shape = tuple(args.pop("input_shape", spec.shape))  # type: ignore[arg-type]
    arch_args = {"num_classes": 10, "in_channels": shape[0], **args}
    model = create_model(arch, **arch_args)
    meta = CheckpointMeta(arch=arch, arch_args=arch_args, input_shape=shape, mean=spec.mean * shape[0] if len(spec.mean) != shape[0] else spec.mean,
                          std=spec.std * shape[0] if len(spec.std) != shape[0] else spec.std,
                          dataset="fashion-mnist", classes=_names(DATASETS["fashion-mnist"].classes, arch_args["num_classes"]))
    save(attach_meta(model, meta), path)
    return path


def _names(classes: list[str] | None, outputs: object) -> list[str] | None:
    """The dataset's class names where the model has one output per class; none for another head."""
    return list(classes) if classes and outputs == len(classes) else None


@pytest.fixture
def lenet_checkpoint(tmp_path: Path) -> Path:
    return make_checkpoint(tmp_path / "lenet5.safetensors")


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("PYTHONHASHSEED", "0")
    return env


# Two threads are pathologically slow on a 2-core machine when anything else runs; tests are small.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def bench_module(script: str) -> ModuleType:
    """A script under bench/ loaded as a module (bench/ is not a package), so tests can call its main."""
    path = Path(__file__).resolve().parent.parent / "bench" / script
    spec = importlib.util.spec_from_file_location(f"bench_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
