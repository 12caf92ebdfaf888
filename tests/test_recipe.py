"""Recipes: typed, strict, overridable, and stable through a YAML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dnnprune.errors import RecipeError
from dnnprune.recipe import Recipe, dump_recipe, load_recipe, recipe_sha256, validate_recipe

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_validate_and_round_trip(path: Path) -> None:
    recipe = load_recipe(path)
    again = validate_recipe(yaml.safe_load(dump_recipe(recipe)))
    assert again == recipe
    assert recipe_sha256(again) == recipe_sha256(recipe)


def test_overrides_win_and_none_means_not_given(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  lr: 0.1\n  epochs: 3\n")
    recipe = load_recipe(path, {"train.lr": 0.01, "train.epochs": None, "data.dataset": "mnist"})
    assert recipe.train.lr == 0.01 and recipe.train.epochs == 3 and recipe.data.dataset == "mnist"


@pytest.mark.parametrize(
    "raw, fragment",
    [
        ({"train": {"optimizer": "rmsprop"}}, "train.optimizer"),
        ({"analyze": {"ratios": []}}, "analyze.ratios"),
        ({"analyze": {"ratios": [0.5, 1.0]}}, "analyze.ratios"),
        ({"prune": {"ratio": 1.0}}, "prune.ratio"),
        ({"prune": {"ratios": {"features.*": 1.5}}}, "prune.ratios"),
        ({"quantize": {"bits": 9}}, "quantize.bits"),
        ({"data": {"val_fraction": 0}}, "data.val_fraction"),
        ({"device": "tpu"}, "device"),
        ({"double_prune": {"finetune": {"distill": 1.5}}}, "double_prune.finetune.distill"),
        ({"prune": {"finetune": {"distill_temperature": 0}}}, "prune.finetune.distill_temperature"),
        # values torch or the OS cannot take: an overflow, a division by zero, memory or a hang further on
        ({"train": {"seed": 2**64}}, "train.seed"),
        ({"data": {"split_seed": 99999999999999999999}}, "data.split_seed"),
        ({"export": {"seed": -1}}, "export.seed"),
        ({"score": {"latency_config": {"batch_sizes": [0]}}}, "score.latency_config.batch_sizes.0"),
        ({"score": {"latency_config": {"batch_sizes": [1, -4]}}}, "score.latency_config.batch_sizes.1"),
        ({"score": {"latency_config": {"batch_sizes": [100000000]}}}, "score.latency_config.batch_sizes.0"),
        ({"export": {"batch_sizes": [0]}}, "export.batch_sizes.0"),
        ({"export": {"check_batch": 1000000000}}, "export.check_batch"),
        ({"data": {"workers": 100000}}, "data.workers"),
    ],
)
def test_invalid_values_name_the_key(raw: dict, fragment: str) -> None:
    with pytest.raises(RecipeError, match=fragment.replace(".", r"\.")):
        validate_recipe(raw)


@settings(max_examples=40, deadline=None)
@given(lr=st.floats(min_value=1e-6, max_value=10.0), epochs=st.floats(min_value=0.01, max_value=500.0),
       bits=st.integers(min_value=2, max_value=8), seed=st.integers(min_value=0, max_value=2**31 - 1))
def test_any_valid_recipe_round_trips(lr: float, epochs: float, bits: int, seed: int) -> None:
    recipe = validate_recipe({"train": {"lr": lr, "epochs": epochs, "seed": seed}, "quantize": {"bits": bits}})
    assert validate_recipe(yaml.safe_load(dump_recipe(recipe))) == recipe


def test_recipe_must_be_a_mapping(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("- just\n- a list\n")
    with pytest.raises(RecipeError, match="mapping"):
        load_recipe(path)


def test_defaults_are_a_valid_recipe() -> None:
    assert isinstance(validate_recipe({}), Recipe)


@pytest.mark.parametrize("raw", [{"quantize": {"bits": True}}, {"train": {"lr": False}}, {"train": {"epochs": True}},
                                 {"quantize": {"layer_bits": {"type:Conv2d": True}}},
                                 {"prune": {"max_accuracy_drop": True}}, {"prune": {"val_samples": True}},
                                 {"prune": {"target_factor": True}}])
def test_a_yes_no_value_is_not_read_as_a_number(raw: dict) -> None:
    """pydantic's lax mode reads `bits: true` as 1; a recipe typo must be refused instead."""
    section, values = next(iter(raw.items()))
    key = next(iter(values))
    with pytest.raises(RecipeError, match=rf"{section}\.{key}: got a yes/no value .* give a number$"):
        validate_recipe(raw)


def test_yes_no_fields_and_numbers_written_as_strings_still_validate() -> None:
    recipe = validate_recipe({"quantize": {"bits": 6, "evaluate": False}, "train": {"lr": "1e-4"},
                              "prune": {"samples": None}})
    assert recipe.quantize.bits == 6 and recipe.quantize.evaluate is False and recipe.train.lr == 1e-4


def test_cli_refuses_a_yes_no_bits_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dnnprune.cli import app
    from tests.cli.test_bad_input import _assert_clean_failure
    from tests.conftest import make_checkpoint

    checkpoint = make_checkpoint(tmp_path / "lenet.safetensors")
    (tmp_path / "recipe.yaml").write_text("quantize:\n  bits: true\n")
    out = tmp_path / "q.safetensors"
    result = CliRunner().invoke(app, ["quantize", str(checkpoint), "-r", str(tmp_path / "recipe.yaml"), "-o", str(out)])
    _assert_clean_failure(result, "quantize.bits", "give a number")
    assert not out.exists()


@pytest.mark.parametrize("key", ["train.lr", "prune.finetune.lr", "quantize.finetune.lr"])
def test_a_learning_rate_past_any_use_is_refused_before_it_overflows_a_step(key: str) -> None:
    with pytest.raises(RecipeError, match="less than or equal to 100"):
        load_recipe(None, {key: 1e308})


@pytest.mark.parametrize("written", ["[no]", "[yes]", "[off]", "[true]"])
def test_a_yaml_boolean_among_the_normal_labels_asks_for_quotes(tmp_path: Path, written: str) -> None:
    """YAML reads `no` as false: a CSV labelled no/fraud with `normal_classes: [no]` trained on the frauds."""
    from dnnprune.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(f"model:\n  task: {{kind: reconstruction, normal_classes: {written}}}\n")
    with pytest.raises(RecipeError, match="how YAML reads yes, no, on, off"):
        load_recipe(path, {})
    path.write_text('model:\n  task: {kind: reconstruction, normal_classes: ["no", 1.5]}\n')
    assert load_recipe(path, {}).model.task.normal_classes == ["no", "1.5"]
