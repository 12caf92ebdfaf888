"""Inference-ready runners of a model, for timing it the way a deployment would run it.

Eager PyTorch runs every BatchNorm and activation as its own pass over memory. Their cost falls in
proportion to the channels, while a convolution's arithmetic falls with the product of its input and
output channels, so in eager mode a width-pruned model's speedup lags its MACs reduction. A deployed
model folds BatchNorm into the convolution and fuses the activation, and that is what `fused` times:
the model frozen and optimized by TorchScript (`torch.jit.freeze` + `optimize_for_inference`, which
folds BatchNorm, fuses conv + ReLU and keeps oneDNN's layouts between layers). Both the original and
the pruned model are timed on the same runtime, so a speedup compares like with like.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, get_args

import torch
import torch.nn as nn

from dnnprune.errors import DnnpruneError
from dnnprune.recipe import Runtime

RUNTIMES: tuple[str, ...] = get_args(Runtime)


def runner(model: nn.Module, sample: torch.Tensor, runtime: Runtime = "eager") -> Callable[[], Any]:
    """A no-argument callable that runs one inference of `model` on `sample` on the given runtime."""
    model = model.cpu().eval()
    if runtime == "eager":
        return _eager(model, sample)
    if runtime == "fused":
        return _fused(model, sample)
    raise DnnpruneError(f"unknown latency runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")


def _eager(model: nn.Module, sample: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(sample)
    return run


def _fused(model: nn.Module, sample: torch.Tensor) -> Callable[[], Any]:
    """TorchScript-frozen copy with BatchNorm folded and conv + activation fused (the original is untouched)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy.deepcopy(model), sample, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as exc:  # tracing refuses some models; say which and how to time them
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DnnpruneError(f"the fused runtime could not trace this model ({type(exc).__name__}: {first}); "
                            f"time it on the eager runtime instead") from None

    def run() -> Any:
        with torch.no_grad():
            return frozen(sample)
    return run
