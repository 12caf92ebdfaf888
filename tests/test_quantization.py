"""Quantization: packing, the two methods, exact reload in a new process, true file sizes, fine-tuning."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch.utils.data import DataLoader, TensorDataset

import dnnprune
from dnnprune import codecs as c
from dnnprune import quantization as q
from dnnprune.checkpoint import CheckpointMeta, attach_meta, save
from dnnprune.codecs import bitpack
from dnnprune.errors import CheckpointError, DnnpruneError, RecipeError
from dnnprune.models import create_model
from dnnprune.patterns import select_layers
from dnnprune.recipe import FineTuneSection, QuantizeSection
from tests.reload import record_io, reload_in_new_process

_SHAPE = (1, 28, 28)


# ----------------------------------------------------------------------------- packing


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), count=st.integers(0, 300), seed=st.integers(0, 2**31 - 1))
def test_pack_unpack_round_trip(bits: int, count: int, seed: int) -> None:
    codes = torch.randint(0, 1 << bits, (count,), generator=torch.Generator().manual_seed(seed))
    packed = c.pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == (count * bits + 7) // 8
    assert torch.equal(c.unpack_bits(packed, bits, count), codes)


@pytest.mark.parametrize("bits", range(2, 9))
def test_packing_across_chunks(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bitpack, "_CHUNK", 16)
    codes = torch.randint(0, 1 << bits, (16 * 5 + 3,))
    assert torch.equal(c.unpack_bits(c.pack_bits(codes, bits), bits, codes.numel()), codes)


def test_packing_rejects_codes_out_of_range() -> None:
    with pytest.raises(ValueError):
        c.pack_bits(torch.tensor([0, 8]), 3)
    with pytest.raises(CheckpointError, match="corrupt"):
        c.unpack_bits(torch.zeros(2, dtype=torch.uint8), 5, 10)


# ----------------------------------------------------------------------------- the methods


@pytest.mark.parametrize("bits", [2, 5, 8])
def test_kmeans_keeps_a_tensor_with_few_distinct_values(bits: int) -> None:
    values = torch.tensor([-0.3, -0.01, 0.0, 0.2, 0.7])[: min(5, 1 << bits)]
    weight = values[torch.randint(0, values.numel(), (12, 7))]
    assert torch.equal(c.kmeans_grid(weight, bits, iterations=20), weight)


def test_kmeans_beats_the_linear_grid_and_keeps_zeros() -> None:
    weight = torch.randn(64, 128) * 0.05
    kmeans = c.kmeans_grid(weight, 4, iterations=50)
    assert torch.unique(kmeans).numel() <= 16
    assert (kmeans - weight).pow(2).mean() < (c.linear_grid(weight, 4) - weight).pow(2).mean()
    sparse = weight * (weight.abs() > 0.04)
    shared = c.kmeans_grid(sparse, 3, iterations=50)
    assert torch.equal(shared == 0, sparse == 0)  # pruned weights stay pruned, survivors stay non-zero
    assert torch.unique(shared).numel() <= 8


@pytest.mark.parametrize("bits", [8, 4])
def test_linear_error_is_at_most_half_a_step_per_channel(bits: int) -> None:
    weight = torch.randn(32, 3, 3, 3)
    weight[5] = 0.0  # an empty (pruned) filter must not divide by zero
    grid = c.linear_grid(weight, bits)
    qmax = 2 ** (bits - 1) - 1
    step = weight.reshape(32, -1).abs().amax(1) / qmax
    error = (grid - weight).reshape(32, -1).abs().amax(1)
    assert bool((error <= step * 0.5 * (1 + 1e-3) + 1e-12).all())
    assert torch.equal(grid[5], torch.zeros_like(grid[5]))
    codes, scales = c.linear_codes(grid, bits)
    assert codes.abs().max() <= qmax and torch.equal(codes * scales[:, None], grid.reshape(32, -1))
    if bits == 8:
        signal, noise = weight.pow(2).sum(), (grid - weight).pow(2).sum()
        assert 10 * torch.log10(signal / noise) > 35


@pytest.mark.parametrize("method", ["linear", "kmeans"])
def test_codec_is_exact_and_survives_channel_removal_but_not_training(method: str) -> None:
    spec = {"codec": method, "bits": 4}
    weight = torch.randn(20, 30)
    grid = c.on_grid(c.linear_grid(weight, 4) if method == "linear" else c.kmeans_grid(weight, 4, 30), spec)
    assert torch.equal(c.on_grid(grid, spec), grid)
    sliced = grid[3:15, 7:19].contiguous()  # pruning removed outputs and inputs after quantization
    assert torch.equal(c.on_grid(sliced, spec), sliced)
    with pytest.raises(CheckpointError, match="changed after quantization"):
        c.encode_tensor(grid + 1e-3 * torch.randn_like(grid), spec)


# ----------------------------------------------------------------------------- layer selection


class _Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_select_layers_globs_types_and_containers() -> None:
    model = _Mixed()
    assert select_layers(model, ["type:Linear"]) == ["head.1"]
    assert select_layers(model, ["head.*"]) == ["head.1"]  # Flatten has no weights: skipped
    assert select_layers(model, ["features"]) == ["features.0", "features.1"]
    assert select_layers(model, ["features"], supported=q.SUPPORTED) == ["features.0"]
    # a glob, type or container pattern passes over the layers the command cannot take ...
    assert select_layers(model, ["features.*"], supported=q.SUPPORTED) == ["features.0"]
    assert select_layers(model, ["*"], supported=q.SUPPORTED) == ["features.0", "head.1"]
    with pytest.raises(RecipeError, match="'type:LSTM' matches no layer"):
        select_layers(model, ["type:Linear", "type:LSTM"])
    # ... but a layer named exactly is never skipped silently, nor is a pattern left with nothing
    with pytest.raises(RecipeError, match=r"'features.1' is a BatchNorm2d, which cannot be handled here"):
        select_layers(model, ["features.0", "features.1"], supported=q.SUPPORTED)
    with pytest.raises(RecipeError, match=r"'features.1\*' matches only layers that cannot be handled here "
                                          r"\(features.1 \(BatchNorm2d\)\)"):
        select_layers(model, ["features.1*"], supported=q.SUPPORTED)


@pytest.mark.parametrize("pattern, fragment", [
    ("embed", "'embed' is a Embedding"),
    ("type:BatchNorm2d", r"'type:BatchNorm2d' matches only layers that cannot be handled here \(features.1 \(BatchNorm2d\)\)"),
    ("classifier.*", "matches no layer"),
])
def test_quantize_refuses_what_it_cannot_take(pattern: str, fragment: str) -> None:
    model = _Mixed()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RecipeError, match=fragment):
        q.quantize_layers(model, QuantizeSection(layers=[pattern]))
    attach_meta(model, CheckpointMeta(arch="mixed", input_shape=(1, 4, 4), dataset="nowhere"))
    with pytest.raises(RecipeError, match=fragment):  # the command checks its patterns before it reads any data
        q.quantize(model, QuantizeSection(layers=[pattern]))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not dnnprune.meta_of(model).encodings and not dnnprune.meta_of(model).lineage


def test_layer_bits_add_layers_and_the_last_pattern_wins() -> None:
    model = create_model("lenet5")
    config = QuantizeSection(bits=5, layers=["type:Linear"], layer_bits={"type:Conv2d": 8, "features.0": 6})
    assert q.plan_layers(model, config) == {"features.0": 6, "features.3": 8, "classifier.1": 5, "classifier.3": 5,
                                            "classifier.5": 5}


# ----------------------------------------------------------------------------- checkpoints


def _model(arch: str, **args: object) -> nn.Module:
    arch_args = {"num_classes": 10, "in_channels": 1, **args}
    meta = CheckpointMeta(arch=arch, arch_args=arch_args, input_shape=_SHAPE, mean=(0.3,), std=(0.35,))
    return attach_meta(create_model(arch, **arch_args).eval(), meta)


def _shrink(model: nn.Module, first: str, second: str, keep: int) -> None:
    """Channel removal the way pruning does it: first's outputs and second's matching inputs."""
    a, b = model.get_submodule(first), model.get_submodule(second)
    a.weight = nn.Parameter(a.weight.data[:keep].clone())
    a.bias = nn.Parameter(a.bias.data[:keep].clone())
    b.weight = nn.Parameter(b.weight.data[:, :keep].clone())
    if isinstance(a, nn.Conv2d):
        a.out_channels, b.in_channels = keep, keep
    else:
        a.out_features, b.in_features = keep, keep


def _save_and_record(model: nn.Module, path: Path) -> dict[str, str | int]:
    meta = dnnprune.meta_of(model)
    meta.add_lineage("quantize", None, {})
    predicted = q.predicted_file_bytes(model, meta)
    save(model, path)
    return {**record_io(model, path, _SHAPE, batch=3), "predicted": predicted}


_CASES = {
    "mlp-kmeans5": ("mlp", {"hidden": [96, 48]}, QuantizeSection(method="kmeans", bits=5)),
    "mlp-linear8": ("mlp", {"hidden": [96, 48]}, QuantizeSection(method="linear", bits=8)),
    "lenet-linear4-conv8": ("lenet5", {}, QuantizeSection(method="linear", bits=4, layer_bits={"type:Conv2d": 8})),
    "lenet-kmeans3-conv8": ("lenet5", {}, QuantizeSection(method="kmeans", bits=3, layer_bits={"type:Conv2d": 8})),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """Every case quantized, saved and reloaded in one new process (one torch import for the module)."""
    folder = tmp_path_factory.mktemp("quantized")
    cases: dict[str, dict] = {}
    for key, (arch, args, config) in _CASES.items():
        model = _model(arch, **args)
        plain = save(model, folder / f"{key}.plain.safetensors")
        result = q.quantize_layers(model, config)
        cases[key] = {**_save_and_record(model, folder / f"{key}.safetensors"), "plain": plain.stat().st_size,
                      "result": result, "plan": q.plan_layers(_model(arch, **args), config)}
    pruned = _model("lenet5")  # channels removed before quantization
    _shrink(pruned, "features.0", "features.3", keep=4)
    _shrink(pruned, "classifier.1", "classifier.3", keep=50)
    q.quantize_layers(pruned, QuantizeSection(method="kmeans", bits=4, layers=["type:Conv2d", "type:Linear"]))
    cases["pruned"] = _save_and_record(pruned, folder / "pruned.safetensors")
    then_pruned = _model("lenet5")  # channels removed after quantization: the encoding survives
    q.quantize_layers(then_pruned, QuantizeSection(method="linear", bits=4))
    _shrink(then_pruned, "classifier.3", "classifier.5", keep=30)
    cases["then_pruned"] = _save_and_record(then_pruned, folder / "then_pruned.safetensors")
    identical = reload_in_new_process(list(cases.values()))
    for case in cases.values():
        case["identical"] = identical[case["checkpoint"]]
    return cases


def test_quantized_checkpoints_reload_identically_in_a_new_process(saved: dict[str, dict]) -> None:
    assert {key: case["identical"] for key, case in saved.items()} == {key: True for key in saved}
    for key in _CASES:
        result = saved[key]["result"]
        assert {r.name for r in result.layers} | set(result.kept_as_is) == set(saved[key]["plan"])
        assert all(r.bytes_after < r.bytes_before for r in result.layers)


def test_a_layer_whose_codes_would_be_larger_is_kept_unless_asked() -> None:
    """LeNet's first conv has 150 weights: 8-bit codes plus their codebook outweigh 600 bytes of fp32."""
    model = _model("lenet5")
    before = model.get_submodule("features.0").weight.detach().clone()
    result = q.quantize_layers(model, QuantizeSection(method="kmeans", bits=8, layers=["type:Conv2d"]))
    assert "features.0" in result.kept_as_is and "features.0.weight" not in result.encodings
    assert torch.equal(model.get_submodule("features.0").weight, before)
    assert [r.name for r in result.layers] == ["features.3"]
    forced = q.quantize_layers(_model("lenet5"), QuantizeSection(method="kmeans", bits=8, layers=["type:Conv2d"],
                                                                 keep_larger=True))
    assert forced.kept_as_is == {} and [r.name for r in forced.layers] == ["features.0", "features.3"]


@pytest.mark.parametrize("key", list(_CASES))
def test_file_size_is_the_predicted_size_and_shrinks_by_the_reported_bytes(saved: dict[str, dict], key: str) -> None:
    case = saved[key]
    after = Path(case["checkpoint"]).stat().st_size
    assert abs(after - case["predicted"]) / after < 0.02
    reported = sum(r.bytes_before - r.bytes_after for r in case["result"].layers)
    assert case["plain"] - after == pytest.approx(reported, rel=0.1)
    if key == "mlp-kmeans5":
        assert after < case["plain"] / 5


def test_int8_and_packed_codes_are_what_the_file_holds(tmp_path: Path) -> None:
    model = _model("mlp", hidden=[40])
    q.quantize_layers(model, QuantizeSection(method="linear", bits=8, layers=["classifier.1"], layer_bits={"classifier.3": 3}))
    path = save(model, tmp_path / "m.safetensors")
    with safe_open(str(path), "pt") as handle:
        dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    assert dtypes["classifier.1.weight::codes"] == "I8"
    assert dtypes["classifier.3.weight::codes"] == "U8" and dtypes["classifier.3.weight::scales"] == "F32"
    assert "classifier.1.weight" not in dtypes


def test_pruned_model_keeps_its_shape_and_encodings(saved: dict[str, dict]) -> None:
    reloaded = dnnprune.load(saved["pruned"]["checkpoint"])
    assert reloaded.features[0].out_channels == 4 and reloaded.classifier[1].out_features == 50
    assert set(dnnprune.meta_of(reloaded).encodings) == {f"{n}.weight" for n in
                                                         ("features.0", "features.3", "classifier.1", "classifier.3", "classifier.5")}


def test_changed_quantized_weights_refuse_to_save_with_the_tensor_named(tmp_path: Path) -> None:
    model = _model("mlp", hidden=[32])
    q.quantize_layers(model, QuantizeSection(method="kmeans", bits=2))
    with torch.no_grad():
        model.classifier[1].weight.add_(torch.randn_like(model.classifier[1].weight))
    with pytest.raises(CheckpointError, match=r"classifier\.1\.weight: .*changed after quantization"):
        save(model, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


def test_a_quantized_layer_is_not_quantized_twice() -> None:
    model = _model("mlp", hidden=[32])
    q.quantize_layers(model, QuantizeSection(method="kmeans", bits=5))
    with pytest.raises(DnnpruneError, match="already quantized"):
        q.quantize_layers(model, QuantizeSection(method="kmeans", bits=5))
    with pytest.raises(DnnpruneError, match="already quantized"):
        q.quantize(model, QuantizeSection(method="kmeans", bits=5, evaluate=False))


# ----------------------------------------------------------------------------- fine-tuning


def _random_loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, *_SHAPE, generator=generator), torch.randint(0, 10, (64,), generator=generator))
    return DataLoader(data, batch_size=16, shuffle=False)


@pytest.mark.parametrize("method", ["kmeans", "linear"])
def test_finetuning_moves_the_codebook_and_keeps_weights_on_it(method: str) -> None:
    model = _model("mlp", hidden=[32])
    with torch.no_grad():
        model.classifier[1].weight.mul_(model.classifier[1].weight.abs() > 0.02)  # some pruned weights
    finetune = FineTuneSection(max_steps=6, epochs=2, lr=0.05, weight_decay=0.0)
    config = QuantizeSection(method=method, bits=3, finetune=finetune)
    untuned = _model("mlp", hidden=[32])
    untuned.load_state_dict(model.state_dict())
    q.quantize_layers(untuned, QuantizeSection(method=method, bits=3))
    result = q.quantize_layers(model, config, train_loader=_random_loader())
    assert result.finetune is not None and result.finetune["steps"] == 6
    zeros = untuned.classifier[1].weight == 0
    for name in ("classifier.1", "classifier.3"):
        weight = model.get_submodule(name).weight.detach()
        assert not parametrize_left(model.get_submodule(name))
        assert torch.equal(c.on_grid(weight, {"codec": method, "bits": 3}), weight)
        if method == "kmeans":
            assert torch.unique(weight).numel() <= 8
        before = untuned.get_submodule(name).weight.detach()
        assert not torch.equal(weight, before)
        assert result.weights_changed[name]
    if method == "kmeans":
        assert torch.equal(model.classifier[1].weight == 0, zeros)  # the zero centroid is frozen


def parametrize_left(module: nn.Module) -> bool:
    return hasattr(module, "parametrizations")


def test_a_sparse_layer_reports_its_sparse_bytes_as_before_and_the_file_shrinks_by_that(tmp_path: Path) -> None:
    """Quantizing after double-prune: 'before' is what the sparse layer takes on disk, not dense fp32."""
    from dnnprune.codecs.spec import Encoding, SparseSpec

    model = _model("mlp", hidden=[200])
    layer = model.get_submodule("classifier.1")
    with torch.no_grad():
        layer.weight.mul_(layer.weight.abs() > layer.weight.abs().quantile(0.8))  # 80 % zeros
    model.dnnprune_meta.encodings["classifier.1.weight"] = Encoding(sparse=SparseSpec(index_bits=5))
    sparse_file = save(model, tmp_path / "sparse.safetensors")

    result = q.quantize_layers(model, QuantizeSection(method="kmeans", bits=5, layers=["classifier.1"]))
    row = next(r for r in result.layers if r.name == "classifier.1")
    assert row.bytes_before < layer.weight.numel() * 4 / 3  # about a fifth of the weights stored, plus indices
    quantized_file = save(model, tmp_path / "quantized.safetensors")
    saved = sparse_file.stat().st_size - quantized_file.stat().st_size
    assert saved == pytest.approx(row.bytes_before - row.bytes_after, rel=0.05)


def _labelled_by(model: nn.Module) -> DataLoader:
    """Samples labelled with the model's own predictions: its val top-1 is 1.0 before any fine-tune."""
    inputs = torch.randn(96, *_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    return DataLoader(TensorDataset(inputs, labels), batch_size=32, shuffle=False)


@pytest.mark.parametrize("lr, kept", [(50.0, False), (1e-7, True)])
def test_a_finetune_that_lowers_val_is_undone(lr: float, kept: bool) -> None:
    model = _model("mlp", hidden=[32])
    reference = _model("mlp", hidden=[32])
    reference.load_state_dict(model.state_dict())
    q.quantize_layers(reference, QuantizeSection(method="kmeans", bits=3))
    val = _labelled_by(reference)
    config = QuantizeSection(method="kmeans", bits=3, finetune=FineTuneSection(epochs=1, max_steps=4, lr=lr))
    result = q.quantize_layers(model, config, train_loader=_random_loader(), val_loader=val)
    tune = result.finetune
    assert tune is not None and tune["kept"] is kept and tune["val_before"] == 1.0
    state, expected = model.state_dict(), reference.state_dict()
    same = state.keys() == expected.keys() and all(torch.equal(state[key], expected[key]) for key in state)
    if kept:
        assert tune["val_after"] >= 0.95
    else:
        assert tune["val_after"] < 0.9 and same and not any(result.weights_changed.values())


def test_a_finetune_that_makes_outputs_non_finite_is_undone_even_when_top1_ties() -> None:
    """NaN logits put every argmax on class 0, which ties top-1 on data labelled 0: the loss must decide."""
    from dnnprune.tasks import make_task
    from dnnprune.training import undone_if_worse

    model = _model("mlp", hidden=[32])
    inputs = torch.randn(96, *_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    val = DataLoader(TensorDataset(inputs, torch.zeros_like(labels)), batch_size=32)
    before = {key: value.clone() for key, value in model.state_dict().items()}

    def ruin() -> str:
        with torch.no_grad():
            model.classifier[3].weight.fill_(float("nan"))
        return "ran"

    result, verdict = undone_if_worse(model, ruin, val, "cpu", task=make_task(), confidence=0.95)
    assert result == "ran" and verdict["kept"] is False
    assert all(torch.equal(model.state_dict()[key], before[key]) for key in before)


def test_weights_no_pattern_can_reach_are_listed_as_staying_float() -> None:
    """A ViT's attention keeps its projections in one `in_proj_weight` of MultiheadAttention, not in a Linear:
    `--layers '*'` cannot encode them, and the report says so instead of leaving a quarter of the model float."""
    from dnnprune.quantization import not_quantizable

    class Attending(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(4, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)
            self.position = nn.Parameter(torch.zeros(1, 3, 8))
            self.head = nn.Linear(8, 2)

    left = not_quantizable(Attending())
    assert left == {"position": 24, "attention.in_proj_weight": 192}  # out_proj is a Linear, so it is reachable
