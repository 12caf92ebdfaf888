"""Same input, recipe and seed: byte-identical checkpoints from fresh processes.

Each round is a fresh Python process that runs `train`, `prune`, `quantize` and `double-prune`
through the real CLI. Rounds differ in everything a command must not depend on: the global
random state each command starts from (torch, numpy, random are reseeded with the round's own
noise before every command) and PYTHONHASHSEED (set and dict iteration order). Two rounds with
SOURCE_DATE_EPOCH must give the same sha256 per checkpoint; a round without it may differ only in
the lineage timestamp.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import cli_env, make_checkpoint, needs_fmnist

pytestmark = needs_fmnist

EPOCH = 1_700_000_000
COMMANDS = ("train", "prune", "quantize", "double-prune")

RECIPE = """\
data:
  train_limit: 256
prune:
  finetune: {epochs: 1, max_steps: 3, batch_size: 32}
quantize:
  finetune: {epochs: 1, batch_size: 32, lr: 0.001}
double_prune:
  finetune: {batch_size: 32}
"""

DRIVER = """\
import random, sys
import numpy as np
import torch
from dnnprune.cli import app

folder, inputs, noise = sys.argv[1], sys.argv[2], int(sys.argv[3])
recipe = f"{inputs}/recipe.yaml"
runs = {
    "train": ["lenet5", "--dataset", "fashion-mnist", "--max-steps", "3", "--batch-size", "32", "--train-limit", "256"],
    "prune": [f"{inputs}/lenet5.safetensors", "-r", recipe, "--ratio", "0.5", "--samples", "100"],
    "quantize": [f"{inputs}/lenet5.safetensors", "-r", recipe, "--method", "kmeans", "--bits", "4",
                 "--finetune-steps", "3", "--samples", "100"],
    "double-prune": [f"{inputs}/resnet20.safetensors", "-r", recipe, "--slimming-ratio", "0.3", "--sparsity", "0.5",
                     "--sparsity-steps", "2", "--finetune-steps", "3", "--samples", "100"],
}
for command, args in runs.items():
    random.seed(noise)
    np.random.seed(noise)
    torch.manual_seed(noise)
    try:
        app([command, *args, "-o", f"{folder}/{command}.safetensors"], standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
"""


@pytest.fixture(scope="module")
def rounds(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    inputs = tmp_path_factory.mktemp("determinism-inputs")
    torch.manual_seed(0)
    make_checkpoint(inputs / "lenet5.safetensors")
    make_checkpoint(inputs / "resnet20.safetensors", "resnet20", input_shape=(1, 28, 28))
    (inputs / "recipe.yaml").write_text(RECIPE)
    settings = {"a": ("1", True), "b": ("2", True), "now": ("3", False)}
    folders, processes = {}, {}
    for name, (noise, fixed_time) in settings.items():
        folder = tmp_path_factory.mktemp(f"determinism-{name}")
        env = {**cli_env(), "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": noise}
        env.pop("SOURCE_DATE_EPOCH", None)
        if fixed_time:
            env["SOURCE_DATE_EPOCH"] = str(EPOCH)
        folders[name] = folder
        processes[name] = subprocess.Popen([sys.executable, "-c", DRIVER, str(folder), str(inputs), noise], env=env,
                                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, process in processes.items():
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, f"round {name}: {output}"
    return folders


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        meta = json.loads(handle.metadata()["dnnprune"])
    return tensors, meta


@pytest.mark.parametrize("command", COMMANDS)
def test_same_command_twice_gives_identical_bytes(command: str, rounds: dict[str, Path]) -> None:
    first, second = rounds["a"] / f"{command}.safetensors", rounds["b"] / f"{command}.safetensors"
    assert _sha256(first) == _sha256(second)
    _, meta = _contents(first)
    assert meta["lineage"][-1]["command"] == command
    assert meta["lineage"][-1]["time_utc"] == dt.datetime.fromtimestamp(EPOCH, dt.timezone.utc).isoformat()


@pytest.mark.parametrize("command", COMMANDS)
def test_without_source_date_epoch_only_the_timestamp_differs(command: str, rounds: dict[str, Path]) -> None:
    fixed, now = _contents(rounds["a"] / f"{command}.safetensors"), _contents(rounds["now"] / f"{command}.safetensors")
    (fixed_tensors, fixed_meta), (now_tensors, now_meta) = fixed, now
    assert fixed_tensors.keys() == now_tensors.keys()
    assert all(torch.equal(fixed_tensors[key], now_tensors[key]) for key in fixed_tensors)
    stamped = dt.datetime.fromisoformat(now_meta["lineage"][-1]["time_utc"])
    assert abs(dt.datetime.now(dt.timezone.utc) - stamped) < dt.timedelta(hours=1)
    for meta in (fixed_meta, now_meta):
        for entry in meta["lineage"]:
            entry.pop("time_utc")
    assert fixed_meta == now_meta
