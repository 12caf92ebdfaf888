"""Size and speed: parameters, MACs, bytes, CPU latency, NetScore."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dnnprune.inference import Runtime, runner


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_nonzero_parameters(model: nn.Module) -> int:
    return sum(int(torch.count_nonzero(p).item()) for p in model.parameters())


def count_macs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """Multiply-accumulates per module for one sample (batch 1), from torch's own FLOP counter.

    torch's formulas cover functional ops too (matmul, bmm, F.linear, attention, transposed convs), which
    hooks on conv/linear layers miss. Each module gets only its own ops, those run outside its submodules
    ("" is the model's own forward), so the values add up to the total; modules without any are left out.
    A conv or linear layer's entry is its output elements x inputs per output, as before.
    """
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    flops: dict[str, int] = {}
    running: list[list[int]] = []  # per module being run: [counter total at its start, flops of its finished submodules]

    def enter(_module: nn.Module, _inputs: Any) -> None:
        running.append([counter.get_total_flops(), 0])

    def leave_hook(name: str) -> Callable[..., None]:
        def leave(_module: nn.Module, _inputs: Any, _output: Any) -> None:
            start, inner = running.pop()
            spent = counter.get_total_flops() - start
            flops[name] = flops.get(name, 0) + spent - inner
            if running:
                running[-1][1] += spent

        return leave

    modules = list(model.named_modules())
    handles = [module.register_forward_pre_hook(enter) for _, module in modules]
    try:
        with _mha_fastpath(False), counter:
            hooked_forward(model, input_shape, [(module, leave_hook(name)) for name, module in modules])
    finally:
        for handle in handles:
            handle.remove()
    return {name: count // 2 for name, count in flops.items() if count}


def hooked_forward(model: nn.Module, input_shape: Sequence[int],
                   hooks: list[tuple[nn.Module, Callable[..., Any]]]) -> None:
    """One zero sample through the model in eval mode with temporary forward hooks; the mode is restored."""
    handles = [module.register_forward_hook(hook) for module, hook in hooks]
    was_training = model.training
    model.eval()
    try:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        with torch.inference_mode():
            model(torch.zeros(1, *input_shape, device=device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _sdpa_flops(query_shape: Sequence[int], key_shape: Sequence[int], value_shape: Sequence[int], *_args: Any,
                out_shape: Any = None, **_kwargs: Any) -> int:
    """torch has formulas for the CUDA attention kernels, not the CPU one: scores plus weighted sum, dense."""
    *batch, queries, head_dim = query_shape
    return 2 * math.prod(batch) * queries * key_shape[-2] * (head_dim + value_shape[-1])


_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


@contextmanager
def _mha_fastpath(enabled: bool) -> Iterator[None]:
    """The fused inference kernels of MultiheadAttention and TransformerEncoderLayer have no FLOP formula;
    the regular path computes the same outputs with ops that have one."""
    previous = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(enabled)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(previous)


def netscore(top1_percent: float, params_m: float, macs_m: float, alpha: float = 2.0, beta: float = 0.5,
             gamma: float = 0.5) -> float:
    """Wong 2019: 20·log10(a^α / (p^β · m^γ)), a in %, p and m in millions."""
    if top1_percent <= 0 or params_m <= 0 or macs_m <= 0:
        return float("-inf")
    return 20.0 * (alpha * math.log10(top1_percent) - beta * math.log10(params_m) - gamma * math.log10(macs_m))


@dataclass
class Latency:
    batch_size: int
    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    runtime: str = "eager"

    def as_dict(self) -> dict[str, float | int | str]:
        return {"batch_size": self.batch_size, "median_ms": self.median_ms, "p10_ms": self.p10_ms,
                "p90_ms": self.p90_ms, "repeats": self.repeats,
                "per_sample_ms": self.median_ms / self.batch_size, "runtime": self.runtime}


def measure_latency(model: nn.Module, input_shape: tuple[int, ...], batch_size: int, *, warmup: int = 3,
                    repeats: int = 15, threads: int | None = None, runtime: Runtime = "eager") -> Latency:
    """Median wall time of a forward pass on the CPU, after warm-up, on the given runtime."""
    previous_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    timings = []
    try:
        run = runner(model, torch.randn(batch_size, *input_shape), runtime)
        for _ in range(warmup):
            run()
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            timings.append((time.perf_counter() - start) * 1000.0)
    finally:
        torch.set_num_threads(previous_threads)
    timings.sort()
    return Latency(batch_size, statistics.median(timings), _quantile(timings, 0.1), _quantile(timings, 0.9), repeats,
                   runtime)


def _quantile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def size_summary(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, Any]:
    per_layer = count_macs(model, input_shape)
    params = count_parameters(model)
    return {
        "params": params,
        "nonzero_params": count_nonzero_parameters(model),
        "macs": sum(per_layer.values()),
        "macs_per_layer": per_layer,
        "fp32_bytes": params * 4,
    }
