"""Measured CPU latency: whole models compared interleaved in one process, and single layers at
candidate widths in a lookup table cached on disk (NetAdapt/HALP-style), for latency-aware widths.

On oneDNN a convolution's time is a step function of its channel counts, not a line: on the
development machine a 3x3 conv from 128 channels at 16x16 ran 2x slower with 60-64 output channels
than with 52-58. So the fastest width near a planned one is measured, not assumed to be a multiple
of 8. Tables are keyed by the machine, torch version and thread count, so another machine measures
its own.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from dnnprune.checkpoint import atomic_write_bytes
from dnnprune.inference import Runtime, runner


def interleaved_ms(runs: Sequence[Callable[[], Any]], repeats: int, warmup: int = 3) -> list[float]:
    """Median milliseconds of each callable, timed in turn so that load on the machine hits all alike."""
    for _ in range(warmup):
        for run in runs:
            run()
    timings: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for index, run in enumerate(runs):
            start = time.perf_counter()
            run()
            timings[index].append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(t) for t in timings]


def random_input(input_shape: Sequence[int], batch: int, seed: int = 0) -> torch.Tensor:
    """The same seeded batch for every model that is compared, so timings differ only by the model."""
    return torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(seed))


def compare_models(models: Sequence[nn.Module], input_shape: Sequence[int], batch: int, repeats: int = 20,
                   seed: int = 0, runtime: Runtime = "eager") -> list[float]:
    """Interleaved median latency of several models on the same input (eval mode, CPU), on one runtime."""
    sample = random_input(input_shape, batch, seed)
    return interleaved_ms([runner(m, sample, runtime) for m in models], repeats)


class Reference:
    """One model's runner built once, timed interleaved against others on the same input.

    A latency target times many candidate plans against the same original; tracing and freezing the
    original again for every candidate (about a second on VGG-16 with the fused runtime) would be waste.
    """

    def __init__(self, model: nn.Module, input_shape: Sequence[int], batch: int, repeats: int = 20, seed: int = 0,
                 runtime: Runtime = "eager") -> None:
        self.sample = random_input(input_shape, batch, seed)
        self.repeats = repeats
        self.runtime = runtime
        self.run = runner(copy.deepcopy(model), self.sample, runtime)  # immune to later in-place pruning

    def against(self, model: nn.Module, repeats: int | None = None) -> tuple[float, float]:
        """(reference ms, model ms), interleaved in one process (`repeats` overrides the default count)."""
        base_ms, other_ms = interleaved_ms([self.run, runner(model, self.sample, self.runtime)], repeats or self.repeats)
        return base_ms, other_ms


def machine_key() -> str:
    """What a latency table depends on: the CPU, torch and the thread count."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = json.dumps([cpu, os.cpu_count(), torch.__version__, torch.get_num_threads()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def table_dir() -> Path:
    env = os.environ.get("DNNPRUNE_CACHE")
    base = Path(env).expanduser() if env else Path.home() / ".cache" / "dnnprune"
    return base / "latency"


class LayerTable:
    """Milliseconds of one conv or linear layer at given channel counts, measured once and cached.

    On the eager runtime a conv is timed alone; on another runtime it is timed as that runtime runs it
    in a network, a conv + BatchNorm + ReLU unit (folded and fused there), so a plan made from the
    table is tuned to the runtime its speed is claimed on.
    """

    def __init__(self, batch: int, repeats: int = 15, path: Path | None = None, runtime: Runtime = "eager") -> None:
        self.batch = batch
        self.repeats = repeats
        self.runtime = runtime
        self.path = path or table_dir() / f"{machine_key()}.json"
        self.entries: dict[str, float] = self._read()
        self.measured = 0

    def _read(self) -> dict[str, float]:
        if not self.path.is_file():  # absent, or not a regular file (a pipe would block): start afresh
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError, RecursionError):
            return {}
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))} if isinstance(data, dict) else {}

    def save(self) -> None:
        if self.measured:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.path, json.dumps(self.entries, sort_keys=True).encode())

    def layer_ms(self, layer: nn.Module, in_channels: int, out_channels: int, spatial: tuple[int, ...]) -> float:
        """The layer rebuilt with these channel counts (a depthwise conv keeps groups = channels)."""
        key = self._key(layer, in_channels, out_channels, spatial)
        if key not in self.entries:
            self.entries[key] = self._measure(layer, in_channels, out_channels, spatial)
            self.measured += 1
        return self.entries[key]

    def _key(self, layer: nn.Module, cin: int, cout: int, spatial: tuple[int, ...]) -> str:
        prefix = "" if self.runtime == "eager" else f"{self.runtime}|"  # eager keys predate runtimes: caches stay valid
        if isinstance(layer, nn.Linear):
            return f"{prefix}linear|{cin}|{cout}|b{self.batch}"
        conv = layer
        groups = cout if is_depthwise(conv) else conv.groups
        return (f"{prefix}conv{len(conv.kernel_size)}d|{cin}|{cout}|k{conv.kernel_size}|s{conv.stride}|p{conv.padding}|"
                f"d{conv.dilation}|g{groups}|{'x'.join(map(str, spatial))}|b{self.batch}")

    @torch.inference_mode()
    def _measure(self, layer: nn.Module, cin: int, cout: int, spatial: tuple[int, ...]) -> float:
        if self.runtime != "eager":
            return self._measure_unit(layer, cin, cout, spatial)
        if isinstance(layer, nn.Linear):
            x = torch.randn(self.batch, cin)
            weight = torch.randn(cout, cin)
            return interleaved_ms([lambda: F.linear(x, weight)], self.repeats)[0]
        groups = cout if is_depthwise(layer) else layer.groups
        x = torch.randn(self.batch, cin, *spatial).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(cout, cin // groups, *layer.kernel_size).contiguous(memory_format=torch.channels_last)
        conv = getattr(F, f"conv{len(layer.kernel_size)}d")
        return interleaved_ms([lambda: conv(x, weight, None, layer.stride, layer.padding, layer.dilation, groups)],
                              self.repeats)[0]

    def _measure_unit(self, layer: nn.Module, cin: int, cout: int, spatial: tuple[int, ...]) -> float:
        unit, shape = layer_unit(layer, cin, cout), (cin, *spatial)
        return interleaved_ms([runner(unit, random_input(shape, self.batch), self.runtime)], self.repeats)[0]


def layer_unit(layer: nn.Module, cin: int, cout: int) -> nn.Module:
    """A fresh copy of `layer`'s kind at these channel counts, as a network runs it: a conv with its
    BatchNorm and ReLU (which the fused runtime folds in and runs in place), a Linear alone."""
    if isinstance(layer, nn.Linear):
        return nn.Linear(cin, cout).eval()
    groups = cout if is_depthwise(layer) else layer.groups
    conv = type(layer)(cin, cout, layer.kernel_size, layer.stride, layer.padding, layer.dilation, groups, bias=False)
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(layer.kernel_size)](cout)
    return nn.Sequential(conv, norm, nn.ReLU()).eval()


def is_depthwise(layer: nn.Module) -> bool:
    """A conv whose every channel is its own group (its in and out widths move together)."""
    return isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and layer.groups == layer.in_channels == layer.out_channels


def input_spatial_sizes(model: nn.Module, input_shape: Sequence[int]) -> dict[str, tuple[int, ...]]:
    """The spatial size of every conv's input (channel pruning never changes it)."""
    sizes: dict[str, tuple[int, ...]] = {}

    def keep(name: str) -> Callable[..., None]:
        def hook(_module: nn.Module, args: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            sizes.setdefault(name, tuple(args[0].shape[2:]))
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in model.named_modules()
               if isinstance(module, nn.modules.conv._ConvNd)]
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sizes
