"""Inference runners: the fused runtime computes what the eager model computes, leaves the model alone,
and refuses what it cannot trace with one line that names the fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dnnprune.errors import DnnpruneError
from dnnprune.inference import runner
from dnnprune.latency import compare_models


def conv_bn_relu() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                          nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))
    for bn in (model[1], model[4]):  # non-trivial running statistics, so folding them changes the weights
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def test_fused_matches_eager_and_leaves_the_model_alone() -> None:
    model = conv_bn_relu()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sample = torch.randn(4, 3, 12, 12)
    eager, fused = runner(model, sample, "eager")(), runner(model, sample, "fused")()
    assert fused.shape == (4, 5)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)


def test_unknown_runtime_names_the_choices() -> None:
    with pytest.raises(DnnpruneError, match="eager, fused"):
        runner(conv_bn_relu(), torch.randn(1, 3, 8, 8), "tensorrt")  # type: ignore[arg-type]


class DictOutput(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": x * 2, "z": [x]}  # type: ignore[dict-item]  # a list in a dict output cannot be traced


def test_untraceable_model_says_to_use_eager() -> None:
    with pytest.raises(DnnpruneError, match="the eager runtime"):
        runner(DictOutput(), torch.randn(1, 3), "fused")


def test_compare_models_on_the_fused_runtime() -> None:
    small = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    times = compare_models([conv_bn_relu(), small.eval()], (3, 12, 12), batch=2, repeats=3, runtime="fused")
    assert len(times) == 2 and all(t > 0 for t in times)


def test_reference_builds_its_runner_once_and_survives_in_place_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    import dnnprune.latency as latency

    built: list[str] = []
    real = latency.runner
    monkeypatch.setattr(latency, "runner", lambda m, s, r="eager": built.append(r) or real(m, s, r))
    model = conv_bn_relu()
    reference = latency.Reference(model, (3, 12, 12), batch=2, repeats=2, runtime="fused")
    smaller = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5)).eval()
    for _ in range(3):
        base_ms, other_ms = reference.against(smaller)
        assert base_ms > 0 and other_ms > 0
    assert built == ["fused"] * 4  # the reference once, each candidate once
    model[0].weight.data.zero_()  # a later in-place change to the original does not reach the reference
    assert reference.run().abs().sum() > 0


def test_onnxruntime_computes_what_torch_computes_with_torchs_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    import dnnprune.inference as inference

    asked: list[int | None] = []
    real = inference.onnx_session
    monkeypatch.setattr(inference, "onnx_session", lambda payload, threads=None: asked.append(threads) or real(payload, threads))
    model = conv_bn_relu()
    sample = torch.randn(3, 3, 12, 12)
    (got,) = runner(model, sample, "onnxruntime")()
    torch.testing.assert_close(torch.from_numpy(got), runner(model, sample, "eager")(), rtol=1e-4, atol=1e-5)
    assert asked == [torch.get_num_threads()]


def test_onnxruntime_sessions_do_not_spin_between_runs() -> None:
    """A spinning pool took the cores from the next model timed in turn: PyTorch read 3x slower beside it."""
    from dnnprune.inference import onnx_bytes, onnx_session

    model = conv_bn_relu()
    session = onnx_session(onnx_bytes(model, torch.randn(1, 3, 12, 12)))
    assert session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_compare_models_on_onnxruntime() -> None:
    small = nn.Sequential(nn.Conv2d(3, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    times = compare_models([conv_bn_relu(), small.eval()], (3, 12, 12), batch=2, repeats=3, runtime="onnxruntime")
    assert len(times) == 2 and all(t > 0 for t in times)


class SingularValues(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.svdvals(x)  # no ONNX operator exists for it


def test_an_unexportable_model_names_the_other_runtimes_not_an_export_option() -> None:
    with pytest.raises(DnnpruneError, match="could not export.*eager or fused runtime instead$"):
        runner(SingularValues(), torch.randn(2, 3, 3), "onnxruntime")
