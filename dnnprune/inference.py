"""Inference-ready runners of a model, for timing it the way a deployment would run it.

Eager PyTorch runs every BatchNorm and activation as its own pass over memory. Their cost falls in
proportion to the channels, while a convolution's arithmetic falls with the product of its input and
output channels, so in eager mode a width-pruned model's speedup lags its MACs reduction. A deployed
model folds BatchNorm into the convolution, and that is what `fused` times: the model frozen and
optimized by TorchScript (`torch.jit.freeze` + `optimize_for_inference`, which folds BatchNorm into
the convolution and keeps oneDNN's blocked layouts between layers). It does not fuse the activation:
in torch 2.14's graph each ReLU and residual add still runs as its own in-place pass over the oneDNN
tensor. (oneDNN's conv + ReLU/add post-ops, `mkldnn._convolution_pointwise` on channels-last tensors,
ran the pruned resnet18 10 % slower on the development machine, so they are not used.) Both the original and
the pruned model are timed on the same runtime, so a speedup compares like with like. `onnxruntime`
times the model exported to ONNX (what `dnnprune export` writes) on onnxruntime's CPU provider, with
torch's thread count, since a deployment may run neither of torch's runtimes and the kernels that
suit a narrow pruned layer differ between libraries.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator, get_args

import torch
import torch.nn as nn

from dnnprune.checkpoint import first_line
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
    if runtime == "onnxruntime":
        return _onnxruntime(model, sample)
    raise DnnpruneError(f"unknown latency runtime {runtime!r}; use one of {', '.join(RUNTIMES)}")


def _eager(model: nn.Module, sample: torch.Tensor) -> Callable[[], Any]:
    def run() -> Any:
        with torch.inference_mode():
            return model(sample)
    return run


def _fused(model: nn.Module, sample: torch.Tensor) -> Callable[[], Any]:
    """TorchScript-frozen copy with BatchNorm folded into the convs and oneDNN layouts kept (the original is untouched)."""
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(copy.deepcopy(model), sample, check_trace=False)
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
    except Exception as exc:  # tracing refuses some models; say which and how to time them
        raise DnnpruneError(f"the fused runtime could not trace this model ({type(exc).__name__}: {first_line(exc, 200)}); "
                            f"time it on the eager runtime instead") from None

    def run() -> Any:
        with torch.no_grad():
            return frozen(sample)
    return run


def _onnxruntime(model: nn.Module, sample: torch.Tensor) -> Callable[[], Any]:
    """The model exported at this sample's shape, run by onnxruntime with as many threads as torch uses."""
    payload = onnx_bytes(model, sample, dynamic_batch=False, hint="time it on the eager or fused runtime instead")
    session = onnx_session(payload, threads=torch.get_num_threads())
    feed = {session.get_inputs()[0].name: sample.numpy()}

    def run() -> Any:
        return session.run(None, feed)
    return run


def onnx_bytes(model: nn.Module, sample: torch.Tensor, *, exporter: str = "torchscript", opset: int = 17,
               dynamic_batch: bool = True, hint: str | None = None) -> bytes:
    """The model as ONNX bytes; any exporter failure becomes one line ending in `hint` (by default: the
    other exporter, which is what `export` offers)."""
    with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings(), _native_stdout_silenced():
        warnings.simplefilter("ignore")
        path = os.path.join(folder, "model.onnx")
        try:
            if exporter == "dynamo":
                shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
                program = torch.onnx.export(model, (sample,), dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                            verbose=False)
                program.save(path)
            else:
                axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
                torch.onnx.export(model, (sample,), path, dynamo=False, opset_version=opset, input_names=["input"],
                                  output_names=["output"], dynamic_axes=axes)
        except Exception as exc:  # any exporter failure is reported in one line
            other = "torchscript" if exporter == "dynamo" else "dynamo"
            raise DnnpruneError(f"torch.onnx could not export this model ({type(exc).__name__}: "
                                f"{first_line(exc, 300)}); {hint or f'try --exporter {other}'}") from None
        return Path(path).read_bytes()


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """torch's TorchScript exporter prints the whole graph to the process's stdout (C++, whatever
    `verbose` says) when it fails; the failure is reported in one line instead, so that dump is dropped."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no usable stdout descriptor: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def onnx_session(payload: bytes, threads: int | None = None) -> Any:
    """An onnxruntime CPU session; `threads` sets its intra-op pool (None: onnxruntime's own default).

    Its pool threads do not spin between runs: onnxruntime's default busy-waits after each run, which on a
    2-core machine took the cores from the next model timed in turn (LeNet-5 at batch 64 in PyTorch read
    6.4-6.7 ms interleaved with a spinning session, 2.0-2.2 ms with one that does not, 2.6 ms alone)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(payload, options, providers=["CPUExecutionProvider"])
