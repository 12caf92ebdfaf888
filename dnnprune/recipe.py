"""Typed recipes: one YAML file, one section per command, unknown keys rejected."""

from __future__ import annotations

import hashlib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dnnprune.errors import RecipeError
from dnnprune.files import read_text
from dnnprune.tasks import TaskKind

Device = Literal["auto", "cpu", "cuda"]
Criterion = Literal["l1", "l2", "bn_scale", "random", "taylor"]
Runtime = Literal["eager", "fused", "onnxruntime"]  # what latency is timed on (dnnprune/inference.py)
Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="random seed, 0 to 2^31 - 1")]
TimedBatch = Annotated[int, Field(ge=1, le=4096, description="a batch size to time, 1 to 4096")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """`bits: true` is a typo, not 1: pydantic's lax mode would read it as 1 without a word."""
        annotation = cls.model_fields[info.field_name].annotation if info.field_name else Any
        if _stray_bool(value, annotation):
            raise ValueError("got a yes/no value (true/false) where a number is expected; give a number")
        return value


class TaskSection(Section):
    """The task as a recipe names it: normal classes by the labels the data holds (`fraud`, or 1 for a file
    labelled 1 and 2), resolved to the class positions a checkpoint stores when the model is built."""

    kind: TaskKind = "classification"
    normal_classes: list[int | str] = Field(
        default_factory=list, max_length=10_000,
        description="reconstruction: the labels that are normal, as the data names them (a built-in dataset "
                    "with word names, like fashion-mnist, also takes its label numbers); every other class is an "
                    "anomaly")

    @field_validator("normal_classes", mode="before")
    @classmethod
    def _no_yaml_booleans(cls, value: Any) -> Any:
        """YAML reads the labels no, yes, on, off as false/true: a label `no` would become class 1."""
        if isinstance(value, list) and any(isinstance(item, bool) for item in value):
            raise ValueError("holds true/false, which is how YAML reads yes, no, on, off, true and false; quote "
                             "the label as the data writes it (e.g. \"no\")")
        if isinstance(value, list):
            return [str(item) if isinstance(item, float) else item for item in value]
        return value


class ModelSection(Section):
    """The architecture `train` builds when it starts from scratch, and the task it serves."""

    arch: str | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    task: TaskSection | None = Field(None, description="default: the architecture's own task (classification "
                                                       "for every classifier)")


class DataSection(Section):
    dataset: str | None = None
    root: Path | None = None
    path: Path | None = Field(None, description="CSV file for the csv dataset")
    label_column: str = "Class"
    download: bool = False
    input_shape: tuple[int, int, int] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: Seed = 0
    train_limit: int | None = Field(None, gt=0, description="use only this many training samples")
    batch_size: int = Field(256, gt=0, description="batch size for evaluation")
    workers: int = Field(0, ge=0, le=64)


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0.0, description="may be fractional")
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = Field(0.05, gt=0.0, le=100.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["constant", "cosine", "multistep", "onecycle"] = "cosine"
    milestones: list[float] = Field(default_factory=lambda: [0.5, 0.75])
    gamma: float = Field(0.1, gt=0.0, le=1.0)
    warmup_steps: int = Field(0, ge=0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    bn_l1: float = Field(0.0, ge=0.0, description="network-slimming L1 penalty on BatchNorm scales")
    seed: Seed = 0
    eval_every_epoch: bool = True

    @field_validator("milestones")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if any(not 0.0 < m < 1.0 for m in value):
            raise ValueError("milestones are fractions of training, each in (0, 1)")
        return value


class LatencySection(Section):
    batch_sizes: list[TimedBatch] = Field(default_factory=lambda: [1, 64], min_length=1)
    warmup: int = Field(3, ge=0)
    repeats: int = Field(15, gt=0)
    threads: int | None = Field(None, gt=0)
    runtime: Runtime = Field("eager", description="eager: PyTorch as trained; fused: TorchScript-frozen, BatchNorm "
                                               "folded into the convs, oneDNN layouts kept (a deployment); onnxruntime: the "
                                               "ONNX export on onnxruntime's CPU provider")


class NetScoreSection(Section):
    alpha: float = 2.0
    beta: float = 0.5
    gamma: float = 0.5


class ScoreSection(Section):
    split: Literal["test", "val", "all"] = Field("test", description="what is scored: the test split, the validation "
                                                                   "split, or every sample the data holds (a hold-out "
                                                                   "file of your own)")
    samples: int | None = Field(None, gt=0, description="score on a stratified subset of the split")
    latency: bool = True
    latency_config: LatencySection = Field(default_factory=LatencySection)
    netscore: NetScoreSection = Field(default_factory=NetScoreSection)


class FineTuneSection(Section):
    epochs: float = Field(0.0, ge=0.0)
    max_steps: int | None = Field(None, gt=0)
    lr: float = Field(0.01, gt=0.0, le=100.0)
    batch_size: int = Field(128, gt=0)
    optimizer: Literal["sgd", "adam", "adamw"] = "sgd"
    weight_decay: float = Field(5e-4, ge=0.0)
    schedule: Literal["constant", "cosine"] = "cosine"
    distill: float = Field(0.0, ge=0.0, le=1.0, description="weight of knowledge distillation from the command's "
                                                             "input model, or from `teacher` (Hinton et al. 2015); 0 = off, "
                                                             "1 = teacher only")
    distill_temperature: float = Field(4.0, gt=0.0, le=100.0, description="softmax temperature of the distillation "
                                                                          "loss (classification)")
    teacher: Path | None = Field(None, description="with distill > 0: a dnnprune checkpoint to distil from "
                                                   "instead of the command's input model, e.g. the unpruned original "
                                                   "when this command continues a chain")

    @model_validator(mode="after")
    def _teacher_needs_distill(self) -> "FineTuneSection":
        if self.teacher is not None and self.distill <= 0:
            raise ValueError(f"teacher is set ({self.teacher}) but distill is 0; set distill > 0 (e.g. 0.5; "
                             "--distill on the command line) or remove teacher")
        return self


class AnalyzeSection(Section):
    ratios: list[float] = Field(default_factory=lambda: [round(0.1 * i, 1) for i in range(1, 10)])
    criterion: Criterion = "l1"
    samples: int | None = Field(2000, gt=0, description="class-stratified val subset; null = the whole val split")
    granularity: Literal["filter", "layer"] = Field("filter", description="filter: prune each channel group over the "
                                                                          "ratio grid; layer: remove each unit whole")
    calibration_samples: int = Field(1024, gt=1, description="layer granularity: training samples that fit the "
                                                             "least-squares bridge of a removed hidden Linear layer")
    budget: float = Field(0.01, ge=0.0, le=1.0, description="accuracy drop allowed for suggested ratios")
    layers: list[str] = Field(default_factory=list, description="name patterns; empty = all prunable")
    exclude: list[str] = Field(default_factory=list)
    batch_size: int | None = Field(None, gt=0, description="evaluation batch size [default: data.batch_size]")
    channels_last: bool = Field(True, description="evaluate in channels-last layout (faster conv on CPU)")
    winograd: bool = Field(True, description="run 3x3 convs on small maps as Winograd F(2x2,3x3) in the cells "
                                             "(faster on CPU; equal to direct convolution to float rounding)")
    seed: Seed = 0

    @field_validator("ratios")
    @classmethod
    def _ratios(cls, value: list[float]) -> list[float]:
        if not value:
            raise ValueError("the ratio grid is empty; give at least one ratio in (0, 1)")
        if any(not 0.0 < r < 1.0 for r in value):
            raise ValueError("every ratio must be in (0, 1)")
        return sorted(set(value))


class PruneSection(Section):
    granularity: Literal["filter", "layer"] = Field("filter", description="filter: remove channels; layer: remove "
                                                                          "whole units (residual blocks, layers)")
    remove: int | None = Field(None, gt=0, description="layer granularity: remove this many units")
    units: list[str] = Field(default_factory=list, max_length=1000,
                             description="layer granularity: remove exactly these units, in this order (names as "
                                         "`analyze --granularity layer` lists them)")
    calibration_samples: int = Field(1024, gt=1, description="layer granularity: training samples used to fit the "
                                                             "least-squares bridge of a removed hidden Linear layer")
    criterion: Criterion = "l1"
    ratio: float | None = Field(None, ge=0.0, lt=1.0, description="uniform ratio of channels to remove")
    ratios: dict[str, float] = Field(default_factory=dict, description="name pattern -> ratio")
    global_threshold: bool = False
    target: Literal["params", "macs", "bytes", "latency"] | None = Field(
        None, description="what target_factor counts: params, macs, bytes, or measured CPU latency at latency_batch")
    target_factor: float | None = Field(None, gt=1.0, description="e.g. 3 for 3x fewer MACs")
    target_basis: Literal["input", "original"] = Field(
        "input", description="count a params/MACs target from this checkpoint (input) or from the model its lineage "
                             "started with (original), so chained prunes share one target")
    order: Literal["sequential", "reverse", "sensitivity", "efficiency", "random"] = Field(
        "sequential", description="sensitivity: least sensitive first (needs an analysis for channels); efficiency "
                                  "(--granularity layer): least drop per parameter or MAC saved first")
    analysis: Path | None = None
    min_channels: int = Field(1, ge=1)
    min_fraction: float = Field(0.0, ge=0.0, lt=1.0)
    max_ratio: float = Field(0.95, gt=0.0, lt=1.0)
    round_to: int = Field(1, ge=1, description="keep channel counts a multiple of this (8 suits CPU kernels)")
    latency_widths: bool = Field(False, description="move each planned width to the fastest width within "
                                                    "width_search channels, from measured layer times (cached)")
    width_search: int = Field(8, ge=1, description="channels below (and, for a latency target, above) a planned "
                                                   "width that latency_widths tries")
    latency_batch: int = Field(64, gt=0, description="batch size of latency measurements and of --target latency")
    latency_repeats: int = Field(15, gt=0, description="timed repeats per measurement (medians)")
    latency_tolerance: float = Field(
        0.05, ge=0.0, lt=0.5, description="--target latency:F counts as met from F x (1 - this) up: CPU timings move by "
                                          "a few percent between measurements, so the solver aims at F and verifies")
    latency_runtime: Runtime = Field(
        "eager", description="what latency is timed on: eager PyTorch, fused (TorchScript-frozen, BatchNorm folded, "
                             "oneDNN layouts kept), as a deployment runs it, or onnxruntime (the ONNX export)")
    report_latency: bool = Field(False, description="time the model before and after at batch 1 and latency_batch, "
                                                    "interleaved in one process, and report the speedups")
    exclude: list[str] = Field(default_factory=list)
    accuracy_aware: bool = False
    strategy: Literal["increments", "round-robin"] = Field(
        "increments", description="accuracy-aware with a target: verified increments planned from the analysis "
                                  "(default), or one layer per step in order (round-robin)")
    increments: int = Field(4, gt=0, description="increments: geometric steps from the model's size to the target")
    plan_cost: Literal["none", "macs", "latency"] = Field(
        "none", description="increments: none cuts every layer to one predicted drop; macs or latency cut where the "
                            "predicted drop per MAC, or per measured ms (latency_runtime at latency_batch, cached per "
                            "machine), saved is least")
    confidence: float = Field(0.95, ge=0.0, lt=1.0, description="accuracy-aware: undo a step only when its drop "
                                                                "exceeds the budget, and the final fine-tune only when "
                                                                "it lowers val, at this one-sided confidence (0: plain "
                                                                "comparison)")
    backoffs: int = Field(2, ge=0, description="increments: times a rejected step is retried halfway")
    reanalyze_below: float = Field(0.5, gt=0.0, le=1.0, description="increments: re-run the analysis once the model "
                                                                    "is below this fraction of the analysed size")
    reanalyze_ratios: list[float] = Field(default_factory=lambda: [0.2, 0.4, 0.6, 0.8])
    max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0)
    step: float = Field(0.1, gt=0.0, lt=1.0, description="ratio added per accuracy-aware step")
    rollback_finetune: bool = Field(False, description="accuracy-aware: undo a step's fine-tune that lowers "
                                                       "val top-1 (one more evaluation per step)")
    jump_to_suggested: bool = Field(True, description="accuracy-aware with an analysis report: a layer's first "
                                                      "step goes straight to the analysis's suggested ratio")
    val_samples: int | None = Field(None, gt=0, description="accuracy-aware steps evaluate on a stratified val subset of this size")
    taylor_batches: int = Field(4, gt=0)
    step_finetune: FineTuneSection = Field(default_factory=FineTuneSection)
    finetune: FineTuneSection = Field(default_factory=FineTuneSection)
    evaluate: bool = Field(True, description="measure val and test accuracy before and after (needs the dataset)")
    samples: int | None = Field(None, gt=0, description="before/after accuracy on stratified val/test subsets of this size")
    seed: Seed = 0

    @field_validator("ratios")
    @classmethod
    def _pattern_ratios(cls, value: dict[str, float]) -> dict[str, float]:
        for pattern, ratio in value.items():
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"ratio for {pattern!r} must be in [0, 1), got {ratio}")
        return value


class QuantizeSection(Section):
    method: Literal["linear", "kmeans"] = "kmeans"
    bits: int = Field(5, ge=2, le=8, description="bits per weight (linear: symmetric per output channel; kmeans: 2^bits centroids)")
    layers: list[str] = Field(default_factory=lambda: ["type:Linear"],
                              description="layer patterns (glob on module names, or type:NAME)")
    layer_bits: dict[str, int] = Field(default_factory=dict,
                                       description="pattern -> bits; its layers are quantized too (the last matching pattern wins)")
    iterations: int = Field(50, gt=0, description="k-means iterations at most (stops earlier when assignments settle)")
    finetune: FineTuneSection = Field(default_factory=FineTuneSection,
                                      description="train with codes frozen: a kmeans centroid moves by its weights' mean "
                                                  "gradient, a linear layer's scale by its codes' projection of theirs")
    val_samples: int = Field(2000, gt=0, description="with a fine-tune and evaluate: the stratified validation subset "
                                                     "that decides whether the fine-tune is kept")
    confidence: float = Field(0.95, ge=0.0, lt=1.0, description="undo the fine-tune only when it lowers the validation "
                                                                "metric at this one-sided confidence (0: any lower value)")
    samples: int | None = Field(None, gt=0, description="accuracy before/after on a stratified test subset of this size")
    evaluate: bool = Field(True, description="measure accuracy before and after (needs the dataset)")
    keep_larger: bool = Field(False, description="encode a layer even where its codes and codebook take more bytes "
                                                 "than its current storage (by default such a layer is left as it is)")
    int8_execution: bool = Field(False, description="also time torch's dynamic int8 Linear execution on the CPU "
                                                    "(batch sizes and repeats from score.latency_config)")
    seed: Seed = 0

    @field_validator("layers")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        if any(not p.strip() for p in value):
            raise ValueError("layer patterns must be non-empty, e.g. type:Linear or classifier.*")
        return value

    @field_validator("layer_bits")
    @classmethod
    def _bits(cls, value: dict[str, int]) -> dict[str, int]:
        for pattern, bits in value.items():
            if not 2 <= bits <= 8:
                raise ValueError(f"bits for {pattern!r} must be in 2..8, got {bits}")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "QuantizeSection":
        if not self.layers and not self.layer_bits:
            raise ValueError("no layers to quantize: give layers (e.g. [type:Linear]) or layer_bits")
        if self.finetune.max_steps is not None and self.finetune.epochs == 0:
            raise ValueError("finetune.max_steps only caps training: also set finetune.epochs (e.g. 1; on the "
                             "command line --finetune-epochs 1)")
        return self


class DoublePruneSection(Section):
    """Network slimming (Liu et al. 2017), then gradual magnitude pruning (Han et al. 2015; Zhu & Gupta 2017)."""

    slimming_ratio: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of BatchNorm channels to remove "
                                                                    "(one global |gamma| threshold); 0 skips slimming")
    slimming_rounds: int = Field(1, ge=1, le=20, description="remove the channels in this many rounds, each "
                                                             "followed by its share of finetune_steps (iterative "
                                                             "slimming; the kept fraction shrinks geometrically)")
    sparsity: float = Field(0.5, ge=0.0, lt=1.0, description="fraction of the remaining conv/linear weights to zero; "
                                                             "0 skips parameter pruning")
    sparsity_lambda: float | None = Field(None, ge=0.0, description="L1 strength on BN scales during the sparsity "
                                                                    "steps [default: 1e-4, or 1e-5 for residual nets]")
    sparsity_steps: int = Field(0, ge=0, description="training steps with the BN-scale L1 penalty before slimming "
                                                     "(0: the checkpoint was already trained with it)")
    finetune_steps: int = Field(0, ge=0, description="training steps after each stage; parameter pruning ramps its "
                                                     "sparsity during the first `ramp` of them")
    threshold: Literal["global", "layer"] = Field("layer", description="parameter pruning: one magnitude threshold "
                                                                       "over all layers, or per layer (quality x std)")
    first_last_factor: float = Field(0.5, ge=0.0, le=1.0, description="the first conv and the output layer get this "
                                                                       "fraction of the sparsity (they are the most sensitive)")
    min_density: float = Field(0.01, gt=0.0, lt=1.0, description="each layer keeps at least this fraction of its weights")
    ramp: float = Field(0.75, gt=0.0, le=1.0, description="fraction of the parameter stage's steps over which "
                                                           "sparsity grows (Zhu & Gupta's cubic schedule)")
    prune_every: int = Field(10, gt=0, description="steps between pruning events while the sparsity ramps")
    min_channels: int = Field(2, ge=1, description="slimming keeps at least this many channels per layer")
    min_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="slimming keeps at least this fraction per layer")
    round_to: int = Field(1, ge=1, description="keep slimmed channel counts a multiple of this")
    finetune: FineTuneSection = Field(default_factory=FineTuneSection, description="optimizer, lr and batch of "
                                                                                   "every training phase")
    evaluate: bool = Field(True, description="measure val and test metrics after each stage (needs the dataset)")
    samples: int | None = Field(None, gt=0, description="stage metrics on stratified val/test subsets of this size")
    sparse_execution: bool = Field(False, description="also time the sparse Linear layers with torch.sparse CSR "
                                                      "kernels against dense ones on the CPU")
    seed: Seed = 0


class ExportSection(Section):
    """ONNX export and its onnxruntime check."""

    opset: int = Field(18, ge=13, le=23)
    exporter: Literal["dynamo", "torchscript"] = Field("torchscript", description="torch.onnx's exporter")
    tolerance: float = Field(1e-4, gt=0.0, description="largest |torch - onnxruntime| accepted, relative to the "
                                                           "largest |output|")
    check_batch: int = Field(8, gt=0, le=4096, description="samples in the parity check (also proves the batch axis is dynamic)")
    raw_inputs: bool = Field(False, description="put the input scaling (mean/std, a table's column scaling) inside the "
                                                "graph, so it takes pixels in [0, 1] or raw column values")
    latency: bool = True
    batch_sizes: list[TimedBatch] = Field(default_factory=lambda: [1, 64], min_length=1)
    repeats: int = Field(20, gt=0)
    seed: Seed = 0


class Recipe(Section):
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    train: TrainSection = Field(default_factory=TrainSection)
    score: ScoreSection = Field(default_factory=ScoreSection)
    analyze: AnalyzeSection = Field(default_factory=AnalyzeSection)
    prune: PruneSection = Field(default_factory=PruneSection)
    quantize: QuantizeSection = Field(default_factory=QuantizeSection)
    double_prune: DoublePruneSection = Field(default_factory=DoublePruneSection)
    export: ExportSection = Field(default_factory=ExportSection)
    device: Device = "auto"


def without_effect(section: Section, names: tuple[str, ...], prefix: str, shaping: str) -> str | None:
    """The start of an error naming the fields a user set (to other than their default) that only shape
    `shaping`, so that layer granularity ignores them; None when there are none. A recipe that sets them
    expects an effect it would not get."""
    defaults = type(section)()
    changed = [name for name in names
               if name in section.model_fields_set and getattr(section, name) != getattr(defaults, name)]
    if not changed:
        return None
    one = len(changed) == 1
    return (f"{prefix}.{f', {prefix}.'.join(changed)} shape{'s' if one else ''} {shaping} and would do nothing "
            f"with --granularity layer; drop {'it' if one else 'them'}")


def _stray_bool(value: Any, annotation: Any) -> bool:
    """A bool where the annotation wants a number (also inside a list or dict of numbers)."""
    if annotation is Any or annotation is bool:
        return False
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):  # `int | None` wants a number too: the None arm says nothing
        arms = [arm for arm in args if arm is not type(None)]
        return bool(arms) and all(_stray_bool(value, arm) for arm in arms)
    if origin is list and isinstance(value, list) and args:
        return any(_stray_bool(item, args[0]) for item in value)
    if origin is dict and isinstance(value, dict) and len(args) == 2:
        return any(_stray_bool(item, args[1]) for item in value.values())
    return isinstance(value, bool) and annotation in (int, float)


def load_recipe(path: Path | None, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read YAML, apply `section.key` overrides (None means 'not given'), validate once."""
    raw = _read_yaml(path) if path is not None else {}
    given: set[str] = set()
    for dotted, value in (overrides or {}).items():
        if value is not None:
            _set_dotted(raw, dotted, value)
            given.add(dotted)
    return validate_recipe(raw, source=str(path) if path else "options", from_options=given)


def validate_recipe(raw: dict[str, Any], source: str = "recipe", from_options: set[str] | None = None) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{source}: {format_validation_error(exc, from_options)}") from None


def format_validation_error(exc: ValidationError, from_options: set[str] | None = None) -> str:
    """Every problem on one line as `key.path: reason`; a value a command-line option set says so, since
    the recipe file named first does not hold it."""
    parts = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        reason = "unknown key (check the spelling)" if err["type"] == "extra_forbidden" else err["msg"]
        reason = reason.removeprefix("Value error, ")
        option = any(key == given or key.startswith(given + ".") for given in from_options or ())
        parts.append(f"{key}{' (set by a command-line option)' if option else ''}: {reason}")
    return "; ".join(parts)


def recipe_sha256(recipe: Recipe) -> str:
    return hashlib.sha256(dump_recipe(recipe).encode()).hexdigest()


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=True)


def _read_yaml(path: Path) -> dict[str, Any]:
    text = read_text(path, "recipe", error=RecipeError, missing_hint="pass an existing YAML file with -r")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RecipeError(f"recipe {path} is not valid YAML ({first}); fix the syntax") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise RecipeError(f"recipe {path} must be a mapping of sections (train:, prune:, ...)")
    return raw


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value
