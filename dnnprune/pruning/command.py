"""`prune(model, section)`: the one library entry point behind `dnnprune prune`.

Everything a user can get wrong (patterns, ratios, the analysis file, data, an unreachable target) is
checked before any training or surgery, so a bad input fails fast and nothing is written.
"""

from __future__ import annotations

import copy
import functools
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
from pydantic import Field

from dnnprune.analysis.command import analyze
from dnnprune.analysis.plan import CRITERIA as ANALYSIS_CRITERIA
from dnnprune.checkpoint import CheckpointMeta, meta_of
from dnnprune.errors import PruningError
from dnnprune.latency import LayerTable, Reference, compare_models
from dnnprune.lineage import command
from dnnprune.loaders import calibration_inputs, eval_loader, splits_for, train_loader
from dnnprune.metrics import count_nonzero_parameters
from dnnprune.observe import Observer
from dnnprune.pruning.basis import rebase
from dnnprune.pruning.depth import (
    DepthPlan,
    Removal,
    check_reachable,
    check_units,
    chosen_units,
    load_layer_analysis,
    remove_in_order,
    sensitivity_order,
    unit_drops,
    unit_metrics,
    unit_order,
    without_excluded,
)
from dnnprune.pruning.increments import Curves, IncrementEnvironment, prune_in_increments
from dnnprune.pruning.latency_target import solve_latency
from dnnprune.pruning.schedule import (
    LoopResult,
    StepEnvironment,
    accuracy_aware,
    layer_order,
    load_analysis,
    order_weights,
    target_check,
)
from dnnprune.pruning.structured import (
    GlobalRanking,
    LayerCost,
    Limits,
    Plan,
    TargetSolution,
    apply_plan,
    give_back,
    latency_widths,
    layer_macs,
    measured_once,
    model_size,
    pattern_ratios,
    pruned_size,
    ratio_plan,
    score_groups,
    solve_target,
    uniform_ratios,
)
from dnnprune.recipe import AnalyzeSection, DataSection, FineTuneSection, PruneSection, without_effect
from dnnprune.reports import Report
from dnnprune.surgery import ChannelGraph, accumulate_gradients
from dnnprune.tasks import Task, make_task
from dnnprune.training import (
    check_distillation_runs,
    evaluate,
    fit_loop,
    frozen_teacher,
    total_steps,
    undone_if_worse,
    wants_training,
)


class PruneReport(Report):
    """Before/after sizes and metrics, the plan's outcome per layer, the steps of an accuracy-aware run."""

    arch: str
    criterion: str
    order: str
    layer_order: list[str]
    accuracy_aware: bool
    primary_metric: str
    higher_is_better: bool
    config: dict[str, Any]
    before: dict[str, Any]
    after: dict[str, Any]
    reduction: dict[str, float]
    accuracy_drop: dict[str, float | None]
    target: dict[str, Any] | None
    layers: list[dict[str, Any]]
    locked: dict[str, str]
    mode: str
    knob: float | None = None
    channels_given_back: int | None = None  # after the knob's plan passed a size target by far
    removed: dict[str, int] = Field(default_factory=dict)
    unit_metrics: dict[str, Any] = Field(default_factory=dict)
    latency: dict[str, Any] | None = None
    analyses: int | None = None
    baseline_val: float | None = None
    layer_ratios: dict[str, float] = Field(default_factory=dict)
    steps: list[dict[str, Any]] = Field(default_factory=list)
    target_met_during_loop: bool | None = None
    final_finetune: dict[str, Any] | None = None
    seconds: dict[str, float]

    def lineage_metrics(self) -> dict[str, Any]:
        metrics = {"params": self.after["params"], "macs": self.after["macs"], "macs_reduction": self.reduction["macs"],
                   "params_reduction": self.reduction["params"]}
        if "nonzero_params" in self.after:  # a sparse input: what its stored encoding keeps
            metrics["nonzero_params"] = self.after["nonzero_params"]
        if self.after.get("test"):
            metrics[f"test_{self.primary_metric}"] = self.after["test"].get(self.primary_metric)
        return metrics


@command("prune")
def prune(model: nn.Module, section: PruneSection, *, data: DataSection, device: torch.device,
          observer: Observer) -> tuple[nn.Module, PruneReport]:
    """Structured pruning per the recipe's prune section; returns the pruned model and its report.

    The input model is consumed (one-shot pruning works on it in place). Everything is validated
    before the first evaluation, so a bad input fails fast.
    """
    started = time.perf_counter()
    section, basis = rebase(model, section)
    job = (_LayerJob if section.granularity == "layer" else _Job)(model, section, data, device, observer)
    job.validate()
    before = job.measure(model, "before")
    if section.granularity == "layer":
        model, details = job.run_layers()  # type: ignore[attr-defined]
    elif section.accuracy_aware:
        model, details = job.run_accuracy_aware()
    else:
        details = job.run_one_shot()
    history = job.final_finetune(model)
    after = job.measure(model, "after")
    latency = job.latency(model)
    report = job.report(before, after, details, history, time.perf_counter() - started, latency)
    if basis is not None and report.target is not None:
        report.target.update(basis.block(report.target["reached"]))
    model.to("cpu").eval()
    return model, report


def _nothing_prunable(arch: str, graph: ChannelGraph, exclude: list[str]) -> str:
    """Why no channel group is left, with the first lock's reason, and what else compresses the model."""
    why = "every group is excluded" if graph.all_groups else "no layer's output channels can be removed alone"
    if graph.locked:
        name, reason = next(iter(graph.locked.items()))
        why += f"; {len(graph.locked)} layer(s) are locked, e.g. {name}: {reason}"
    elif exclude and graph.all_groups:
        why += f" by --exclude {', '.join(exclude)}"
    return (f"{arch} has no prunable channel group ({why}); compress it with `quantize`, or `double-prune "
            "--slimming-ratio 0` (magnitude pruning only)")


def _check_how_much_target(config: PruneSection) -> None:
    if config.target is not None and config.target_factor is None:
        raise PruningError(f"target {config.target!r} needs target_factor (e.g. --target {config.target}:3)")
    if config.target_factor is not None and config.target is None:
        raise PruningError("target_factor needs a target metric: params, macs or bytes (e.g. --target macs:3)")


def _check_how_much(config: PruneSection) -> None:
    _check_how_much_target(config)
    if config.remove is not None:
        raise PruningError("--remove counts whole units: it needs --granularity layer")
    if config.units:
        raise PruningError("--units names whole units: it needs --granularity layer")
    if config.target is not None and config.ratio is not None:
        raise PruningError("give either a ratio or a target, not both (a target solves for the ratio)")
    if config.ratio is None and not config.ratios and config.target is None:
        raise PruningError("say how much to prune: --ratio R, --target macs:3, or prune.ratios in the recipe")
    if config.global_threshold and config.ratio is None and config.target is None:
        raise PruningError("global_threshold needs a ratio (the fraction of all channels) or a target")
    if config.order == "sensitivity" and config.analysis is None:
        raise PruningError("--order sensitivity needs an analysis report: pass --analysis A.json (from `dnnprune analyze`)")
    if config.order == "efficiency":
        raise PruningError("--order efficiency ranks whole layers: use it with --granularity layer; for channels use "
                           "--order sensitivity")
    if config.plan_cost != "none" and not (config.accuracy_aware and config.strategy == "increments"
                                           and config.target is not None):
        raise PruningError(f"plan_cost {config.plan_cost} prices the plans of accuracy-aware increments: add "
                           f"--accuracy-aware and a --target (e.g. macs:3), or drop plan_cost")


@dataclass
class _Feeds:
    """Data loaders, built lazily and only when something needs data."""

    meta: CheckpointMeta
    section: DataSection

    def check(self) -> None:
        splits_for(self.meta, self.section)

    def eval(self, split: str, samples: int | None, seed: int) -> Any:
        return eval_loader(self.meta, self.section, split=split, samples=samples, seed=seed)

    def train(self, batch_size: int, seed: int) -> Any:
        return train_loader(self.meta, self.section, batch_size, seed)


class _Job:
    """One pruning run: the validated inputs, then the steps `prune` strings together."""

    def __init__(self, model: nn.Module, config: PruneSection, data: DataSection, device: torch.device,
                 observer: Observer) -> None:
        self.model = model.to(device)
        self.config = config
        self.meta = meta_of(model)
        self.task: Task = make_task(self.meta.task)
        self.shape = tuple(self.meta.input_shape)
        self.device = device
        self.observer = observer
        self.finetunes = 0
        check_distillation_runs(config.finetune, config.step_finetune)
        self.teacher = frozen_teacher(self.model, config.finetune, config.step_finetune)
        self.limits = Limits.of(config)
        self.feeds = _Feeds(self.meta, data)
        self.seconds: dict[str, float] = {}
        self.latency_search: list[tuple[float, float]] = []  # (knob, speedup) measured by a latency target

    # -- validation, before any heavy work ------------------------------------------------

    def validate(self) -> None:
        config = self.config
        _check_how_much(config)
        _refuse_unused_latency_options(config, measured=config.target == "latency" or config.report_latency
                                       or config.latency_widths or config.plan_cost == "latency",
                                       how="--target latency:F, --report-latency, --latency-widths or plan_cost: latency")
        if _quantized(self.meta):
            raise PruningError("this checkpoint has quantized layers, whose codes channel pruning would cut through; "
                               "prune the float checkpoint, then quantize it")
        self.graph = ChannelGraph(self.model, self.shape, exclude=config.exclude)
        if not self.graph.groups:
            raise PruningError(_nothing_prunable(self.meta.arch, self.graph, config.exclude))
        self.widths_before = self.graph.widths()
        self.fixed = pattern_ratios(self.model, self.graph, config.ratios) if config.ratios else {}
        self.analysis = load_analysis(config.analysis, self.meta.arch, self.graph) if config.analysis else None
        self.order = layer_order(self.graph, config.order, analysis=self.analysis, seed=config.seed)
        self.scores = self._scores(self.model, self.graph) if config.criterion != "taylor" else None
        if self._needs_data():
            self.feeds.check()
        self.base_size = model_size(self.model, self.shape)
        if config.target == "latency" or config.report_latency:
            self.original = copy.deepcopy(self.model).cpu()
        if config.target == "latency":
            if config.accuracy_aware:
                raise PruningError("--target latency is solved one-shot: drop --accuracy-aware, or use --target macs:F "
                                   "with --latency-widths")
            self.reference = Reference(self.model, self.shape, config.latency_batch, config.latency_repeats,
                                       runtime=config.latency_runtime)
        elif config.target is not None:
            self._check_reachable()

    def _needs_data(self) -> bool:
        config = self.config
        return (config.evaluate or config.accuracy_aware or config.criterion == "taylor"
                or self._has_steps(config.finetune) or self._has_steps(config.step_finetune))

    @staticmethod
    def _has_steps(section: FineTuneSection) -> bool:
        return wants_training(section)

    def _check_reachable(self) -> None:
        """A target beyond what every layer at its cap gives is an input error, found up front."""
        caps = {g.name: self.fixed.get(g.name, 1.0) for g in self.graph.groups}
        plan = ratio_plan(self.graph, caps, self.limits)
        size = pruned_size(self.model, self.shape, _unit_scores(self.graph), plan, self.config.exclude)
        reachable = self.base_size[self.config.target] / max(1, size[self.config.target])
        if reachable < self.config.target_factor:
            raise PruningError(f"cannot make the model {self.config.target_factor:g}x smaller in {self.config.target} "
                               f"without emptying layers: the most the limits allow (max_ratio {self.config.max_ratio}, "
                               f"min_channels {self.config.min_channels}, excluded layers) is {reachable:.2f}x")

    # -- one-shot --------------------------------------------------------------------------

    def run_one_shot(self) -> dict[str, Any]:
        started = time.perf_counter()
        scores = self.scores if self.scores is not None else self._scores(self.model, self.graph)
        solution = self._plan(scores)
        removed = apply_plan(self.graph, scores, solution.plan)
        self.seconds["plan_and_surgery"] = time.perf_counter() - started
        return {"mode": self._mode(), "knob": solution.knob, "channels_given_back": solution.given_back,
                "removed": {k: len(v) for k, v in removed.items()}}

    def _mode(self) -> str:
        if self.config.target is not None:
            if self.config.global_threshold:
                return "target-global"
            return "target-sensitivity" if self.config.order == "sensitivity" else "target-uniform"
        if self.config.global_threshold:
            return "global"
        return "uniform" if self.config.ratio is not None else "ratios"

    def _plan(self, scores: dict[str, torch.Tensor]) -> TargetSolution:
        config = self.config
        plan_at = self._plan_family(scores)
        if config.latency_widths:
            plan_at = self._fastest(plan_at)
        if config.target is None:
            knob = config.ratio if config.ratio is not None else 0.0
            return TargetSolution(plan_at(knob), knob, 1.0, {})
        if config.target == "latency":
            solution, self.latency_search = solve_latency(
                lambda plan, repeats: self._measured_speedup(scores, plan, repeats), plan_at, config.target_factor,
                repeats=config.latency_repeats, tolerance=config.latency_tolerance)
            return solution
        measure = measured_once(lambda plan: pruned_size(self.model, self.shape, scores, plan, config.exclude))
        solution = solve_target(measure, plan_at, config.target, config.target_factor, self.base_size)
        if config.latency_widths:  # widths already moved to the fastest nearby; giving back would undo it
            return solution
        return give_back(solution, measure, config.target, config.target_factor, self.base_size, scores,
                         config.round_to, held=self.fixed)

    @functools.cached_property
    def layer_table(self) -> LayerTable:
        """The per-machine layer times, on the runtime speed is reported on: one table per run, shared by
        latency-aware widths and ms-priced plans (two copies of one file would each save over the other)."""
        config = self.config
        return LayerTable(config.latency_batch, config.latency_repeats, runtime=config.latency_runtime)

    def _fastest(self, plan_at: Callable[[float], Plan]) -> Callable[[float], Plan]:
        """The plan family with every width moved to the fastest nearby width (measured layer times)."""
        adjust = self._fastest_widths(may_grow=self.config.target == "latency")
        return lambda knob: adjust(self.model, self.graph, plan_at(knob))

    def _layer_cost(self) -> LayerCost | None:
        """What a cost-aware plan prices: MACs, or layer times measured on the runtime speed is reported on."""
        if self.config.plan_cost == "macs":
            return layer_macs
        return self.layer_table.layer_ms if self.config.plan_cost == "latency" else None

    def _fastest_widths(self, may_grow: bool = False) -> Callable[[nn.Module, ChannelGraph, Plan], Plan]:
        """Moves a plan's widths to the fastest nearby widths; only a latency target may keep more channels."""
        config = self.config
        return lambda model, graph, plan: latency_widths(model, graph, plan, self.layer_table, self.shape,
                                                         self.limits, search=config.width_search, may_grow=may_grow)

    def _measured_speedup(self, scores: dict[str, torch.Tensor], plan: Plan, repeats: int) -> float:
        """The pruned copy's speedup, timed interleaved with the original (so the ratio survives machine load)."""
        clone = copy.deepcopy(self.model)
        apply_plan(ChannelGraph(clone, self.shape, exclude=self.config.exclude), scores, plan)
        base_ms, pruned_ms = self.reference.against(clone, repeats)
        return base_ms / pruned_ms

    def _plan_family(self, scores: dict[str, torch.Tensor]) -> Callable[[float], Plan]:
        """Plans indexed by one knob in [0, 1]: a uniform ratio, or a global fraction of all channels."""
        fixed_plan = ratio_plan(self.graph, self.fixed, self.limits)
        if self.config.global_threshold:
            ranking = GlobalRanking(self.graph, scores, self.limits)
            return lambda knob: ranking.plan(knob, fixed_plan)
        weights = order_weights(self.order, self.config.order if self.config.target is not None else "sequential")
        stretch = 1.0 / min(weights.values())
        return lambda knob: ratio_plan(self.graph, {name: min(1.0, knob * weights[name] * stretch) for name in self.order}
                                       | self.fixed, self.limits)

    def _scores(self, model: nn.Module, graph: ChannelGraph, names: list[str] | None = None) -> dict[str, torch.Tensor]:
        if self.config.criterion == "taylor":
            batches = _take(self.feeds.train(self.config.finetune.batch_size, self.config.seed), self.config.taylor_batches)
            accumulate_gradients(model, batches, self.device, task=self.task)
        try:
            if names is None:
                return score_groups(graph, self.config.criterion, seed=self.config.seed)
            return {n: graph.importance(n, self.config.criterion, seed=self.config.seed) for n in names}
        finally:
            model.zero_grad(set_to_none=True)

    # -- accuracy-aware ----------------------------------------------------------------------

    def run_accuracy_aware(self) -> tuple[nn.Module, dict[str, Any]]:
        if self.config.target is not None and self.config.strategy == "increments":
            return self.run_increments()
        config = self.config
        val = self.feeds.eval("val", config.val_samples or config.samples, config.seed)
        caps = self.fixed if config.target is not None else uniform_ratios(self.graph, config.ratio or 0.0, self.fixed)
        env = StepEnvironment(
            input_shape=self.shape, limits=self.limits, step=config.step, max_drop=config.max_accuracy_drop,
            score=lambda m, g, name: self._scores(m, g, [name])[name],
            finetune=lambda m, name: (self.finetune(m, config.step_finetune, f"fine-tune {name}") or {}).get("steps", 0),
            evaluate=lambda m: evaluate(m, val, self.device, task=self.task).value,
            drop=self.task.drop,
            target_met=target_check(config.target, config.target_factor, self.base_size),
            exclude=config.exclude, caps=caps, on_step=lambda row: self.observer.row("prune.step", row),
            jumps=self._jumps(),
            rollback=config.rollback_finetune)
        started = time.perf_counter()
        result = accuracy_aware(self.model, self.order, env)
        self.seconds["accuracy_aware"] = time.perf_counter() - started
        self.graph = ChannelGraph(result.model, self.shape, exclude=config.exclude)
        return result.model, _loop_details(result)

    def run_increments(self) -> tuple[nn.Module, dict[str, Any]]:
        """Verified increments planned from the sensitivity analysis (analysed here when none was given)."""
        config = self.config
        started = time.perf_counter()
        val = self.feeds.eval("val", config.val_samples, config.seed)
        analysis = self.analysis or self._analyze(self.model, None)
        layer_cost = self._layer_cost()
        env = IncrementEnvironment(
            input_shape=self.shape, limits=self.limits, metric=config.target, factor=config.target_factor,  # type: ignore[arg-type]
            max_drop=config.max_accuracy_drop, task=self.task, score=lambda m, g: self._scores(m, g),
            evaluate=lambda m: evaluate(m, val, self.device, task=self.task),
            finetune=lambda m, label: (self.finetune(m, config.step_finetune, f"fine-tune {label}") or {}).get("steps", 0),
            analyze=lambda m: self._analyze(m, config.reanalyze_ratios), exclude=config.exclude,
            adjust=self._fastest_widths() if config.latency_widths else None, layer_cost=layer_cost,
            pinned={name: self.limits.keep(self.widths_before[name], ratio) for name, ratio in self.fixed.items()},
            increments=config.increments, confidence=config.confidence, backoffs=config.backoffs,
            reanalyze_below=config.reanalyze_below, on_step=lambda row: self.observer.row("prune.increment", row),
            seed=config.seed)
        result = prune_in_increments(self.model, Curves.from_report(analysis, self.task), env)
        if config.plan_cost == "latency":
            self.layer_table.save()
        self.seconds["accuracy_aware"] = time.perf_counter() - started
        self.graph = ChannelGraph(result.model, self.shape, exclude=config.exclude)
        return result.model, {"mode": "accuracy-aware-increments", "baseline_val": result.baseline,
                              "steps": result.rows, "target_met_during_loop": result.target_met,
                              "analyses": result.analyses}

    def _analyze(self, model: nn.Module, ratios: list[float] | None) -> dict[str, Any]:
        """The sensitivity analysis of `model` (the filter engine) on the validation subset."""
        section = AnalyzeSection(criterion=self.config.criterion if self.config.criterion in ANALYSIS_CRITERIA else "l1",
                                 samples=self.config.val_samples or 2000, exclude=list(self.config.exclude),
                                 seed=self.config.seed, **({"ratios": ratios} if ratios else {}))
        started = time.perf_counter()
        _, report = analyze(model, section, data=self.feeds.section, device=self.device, observer=self.observer)
        self.seconds["analysis"] = self.seconds.get("analysis", 0.0) + time.perf_counter() - started
        return report.as_json()

    def _jumps(self) -> dict[str, float]:
        """The analysis's suggested ratio per layer (largest grid ratio within its accuracy budget)."""
        if self.analysis is None or not self.config.jump_to_suggested:
            return {}
        return {layer["name"]: float(layer["suggested_ratio"]) for layer in self.analysis.get("layers", [])
                if isinstance(layer, dict) and isinstance(layer.get("suggested_ratio"), (int, float))}

    # -- fine-tuning and measuring -------------------------------------------------------------

    def finetune(self, model: nn.Module, section: FineTuneSection, description: str) -> dict[str, Any] | None:
        """Each fine-tune draws fresh batches: its shuffle seed moves on with every call."""
        if not self._has_steps(section):
            return None
        seed = self.config.seed + self.finetunes
        self.finetunes += 1
        loader = self.feeds.train(section.batch_size, seed)
        if total_steps(section, len(loader)) == 0:
            return None
        started = time.perf_counter()
        history = fit_loop(model, loader, section, device=self.device, task=self.task, observer=self.observer,
                           description=description, seed=seed, teacher=self.teacher)
        final = description == "final fine-tune"
        key = "final_finetune" if final else "step_finetune"
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started
        return history.as_dict()

    def final_finetune(self, model: nn.Module) -> dict[str, Any] | None:
        """The last fine-tune; in accuracy-aware mode it is undone only if it made the val metric worse
        with `confidence` (a long fine-tune can overfit, or teach an autoencoder that lost its bottleneck
        the identity). The same paired rule as the increments: undoing it on a noise-sized dip would
        throw away the chain's longest fine-tune."""
        if not self.config.accuracy_aware or not self._has_steps(self.config.finetune):
            return self.finetune(model, self.config.finetune, "final fine-tune")
        val = self.feeds.eval("val", self.config.val_samples or self.config.samples, self.config.seed)
        history, verdict = undone_if_worse(model, lambda: self.finetune(model, self.config.finetune, "final fine-tune"),
                                           val, self.device, task=self.task, confidence=self.config.confidence)
        return {**(history or {}), **verdict}

    def measure(self, model: nn.Module, label: str) -> dict[str, Any]:
        """Sizes (bytes as stored: a sparse input counts its encoding) and, when evaluating, val and test metrics."""
        size = model_size(model, self.shape)
        if self.meta.encodings:  # a sparse input: params count every weight, zero or not; say what is non-zero
            size["nonzero_params"] = count_nonzero_parameters(model)
        if not self.config.evaluate:
            return {**size, "val": None, "test": None}
        started = time.perf_counter()
        result = {**size, "val": self._accuracy(model, "val"), "test": self._accuracy(model, "test")}
        self.seconds[f"evaluate_{label}"] = time.perf_counter() - started
        return result

    def _accuracy(self, model: nn.Module, split: str) -> dict[str, Any]:
        loader = self.feeds.eval(split, self.config.samples, self.config.seed)
        return evaluate(model, loader, self.device, task=self.task).as_dict()

    # -- the report ---------------------------------------------------------------------------

    def report(self, before: dict[str, Any], after: dict[str, Any], details: dict[str, Any],
               history: dict[str, Any] | None, seconds: float, latency: dict[str, Any] | None = None) -> PruneReport:
        config = self.config
        return PruneReport(
            arch=self.meta.arch, criterion=config.criterion, order=config.order, layer_order=self.order,
            accuracy_aware=config.accuracy_aware, primary_metric=self.task.primary,
            higher_is_better=self.task.higher_is_better, config=config.model_dump(mode="json"), before=before,
            after=after, reduction={k: before[k] / max(1, after[k]) for k in ("params", "macs", "bytes")},
            accuracy_drop=_drops(before, after, self.task), target=self._target_block(after),
            layers=self._layer_rows(), locked=self._locked(), **details, final_finetune=history,
            latency=latency, seconds={**self.seconds, "total": seconds})

    def _locked(self) -> dict[str, str]:
        return dict(self.graph.locked)

    def _target_block(self, after: dict[str, Any]) -> dict[str, Any] | None:
        if self.config.target is None:
            return None
        factor = self.config.target_factor
        if self.config.target == "latency":
            # The closing measurement (fresh and independent of the search) is what the report claims.
            reached = self.speedups[self.config.latency_batch]
            tolerance = self.config.latency_tolerance
            return {"metric": "latency", "factor": factor, "reached": reached, "tolerance": tolerance,
                    "met": reached >= factor * (1 - tolerance), "within_tolerance": abs(reached / factor - 1) <= tolerance,
                    "search": [{"knob": k, "speedup": v} for k, v in self.latency_search]}
        reached = self.base_size[self.config.target] / max(1, after[self.config.target])
        return {"metric": self.config.target, "factor": factor, "reached": reached, "met": reached >= factor}

    def latency(self, model: nn.Module) -> dict[str, Any] | None:
        """Original against pruned, interleaved in one process, medians, at batch 1 and `latency_batch`."""
        if not hasattr(self, "original"):
            return None
        rows = []
        self.speedups: dict[int, float] = {}
        for batch in sorted({1, self.config.latency_batch}):
            before, after = compare_models([self.original, model], self.shape, batch, max(20, self.config.latency_repeats),
                                           runtime=self.config.latency_runtime)
            self.speedups[batch] = before / after
            rows.append({"batch_size": batch, "before_ms": before, "after_ms": after, "speedup": before / after})
        return {"rows": rows, "threads": torch.get_num_threads(), "runtime": self.config.latency_runtime,
                "note": "interleaved in one process, medians of the repeats"}

    def _layer_rows(self) -> list[dict[str, Any]]:
        after = self.graph.widths()
        prunable = {g.name for g in self.graph.groups}
        rows = []
        for group in self.graph.all_groups:
            width = self.widths_before.get(group.name, group.width)
            now = after.get(group.name, width)
            rows.append({"name": group.name, "type": group.layer_type, "width_before": width, "width_after": now,
                         "ratio": 1.0 - now / width if width else 0.0, "excluded": group.name not in prunable})
        return rows


def _quantized(meta: CheckpointMeta) -> bool:
    """Sparse tensors survive channel removal (any zero pattern is valid); quantization codes do not."""
    return any(encoding.values is not None for encoding in meta.encodings.values())


def _unit_scores(graph: ChannelGraph) -> dict[str, torch.Tensor]:
    """Any scores do to measure a plan's size: only the counts matter."""
    return {g.name: torch.arange(g.width, dtype=torch.float32) for g in graph.groups}


def _take(loader: Any, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = []
    for batch in loader:
        batches.append((batch[0], batch[1]))
        if len(batches) >= count:
            break
    return batches


def _loop_details(result: LoopResult) -> dict[str, Any]:
    return {"mode": "accuracy-aware", "baseline_val": result.baseline, "layer_ratios": result.ratios,
            "steps": result.rows, "target_met_during_loop": result.target_met}


def _drops(before: dict[str, Any], after: dict[str, Any], task: Task) -> dict[str, float | None]:
    """The primary metric's drop per split (positive = worse), in the task's units."""
    drops: dict[str, float | None] = {}
    for split in ("val", "test"):
        b, a = before.get(split), after.get(split)
        ok = b and a and b.get(task.primary) is not None and a.get(task.primary) is not None
        drops[split] = task.drop(b[task.primary], a[task.primary]) if ok else None
    return drops


_CHANNEL_OPTIONS = ("criterion", "min_channels", "min_fraction", "max_ratio", "round_to", "latency_widths", "width_search",
                    "latency_tolerance", "strategy", "increments", "plan_cost", "backoffs", "reanalyze_below",
                    "reanalyze_ratios", "step", "rollback_finetune", "jump_to_suggested", "taylor_batches")


def _refuse_channel_options(config: PruneSection) -> None:
    """Options that shape channel pruning do nothing when whole units go."""
    unused = without_effect(config, _CHANNEL_OPTIONS, "prune", "channel pruning")
    if unused:
        raise PruningError(f"{unused}, or prune channels in a separate step")


_LATENCY_OPTIONS = ("latency_runtime", "latency_batch", "latency_repeats")


def _refuse_unused_latency_options(config: PruneSection, *, measured: bool, how: str) -> None:
    """Latency settings set by the user in a run that times nothing: they would silently do nothing."""
    if measured:
        return
    defaults = PruneSection()
    unused = [f"prune.{name}" for name in _LATENCY_OPTIONS
              if name in config.model_fields_set and getattr(config, name) != getattr(defaults, name)]
    if unused:
        raise PruningError(f"{', '.join(unused)} set{'s' if len(unused) == 1 else ''} how latency is timed, but this "
                           f"run times nothing; add {how}, or drop {'it' if len(unused) == 1 else 'them'}")


class _LayerJob(_Job):
    """Layer granularity: remove whole units (blocks, same-shape convs, hidden Linears) in sensitivity order."""

    def validate(self) -> None:
        config = self.config
        if config.remove is not None and config.target is not None:
            raise PruningError("--remove N and --target say how much to remove twice; give one of them")
        if config.units and (config.remove is not None or config.target is not None):
            given = [option for option, value in (("--remove (prune.remove)", config.remove),
                                                  ("--target (prune.target)", config.target)) if value is not None]
            raise PruningError(f"--units names exactly what to remove: drop {' and '.join(given)}, from the command "
                               "line or the recipe")
        if config.remove is None and config.target is None and not config.units:
            raise PruningError("say how much to remove: --remove N, --units NAME,..., or --target params:F / macs:F")
        if config.ratio is not None or config.ratios or config.global_threshold:
            raise PruningError("--ratio, ratios and --global are for channels; with --granularity layer use --remove N, "
                               "--units or --target")
        _check_how_much_target(config)
        if config.target in ("bytes", "latency"):
            raise PruningError(f"--granularity layer takes --target params:F or macs:F, not {config.target}; for a "
                               "measured speedup remove units by count (--remove N) with --report-latency")
        _refuse_channel_options(config)
        _refuse_unused_latency_options(config, measured=config.report_latency, how="--report-latency")
        if self.meta.encodings:
            raise PruningError("this checkpoint has encoded (quantized or sparse) layers, which removing layers would "
                               "re-wire; remove layers from the float checkpoint, then quantize or sparsify it")
        every_unit = check_units(self.model, self.shape)
        self.units = without_excluded(self.model, every_unit, config.exclude)
        self.base_size = model_size(self.model, self.shape)
        if config.report_latency:
            self.original = copy.deepcopy(self.model).cpu()
        excluded = sorted(set(config.units) & ({u.name for u in every_unit} - {u.name for u in self.units}))
        if excluded:
            raise PruningError(f"--units names {', '.join(excluded)}, which --exclude keeps; drop one of the two")
        named = chosen_units(self.model, self.units, config.units, self.shape)
        self.plan = DepthPlan(len(named) if named else config.remove, config.target, config.target_factor, self.base_size)
        check_reachable(self.model, self.units, self.plan, self.shape)
        self.drops: dict[str, float] | None = None
        if named:
            self.order = named
        elif config.order in ("sensitivity", "efficiency") and config.analysis is not None:
            self.order, self.drops = load_layer_analysis(config.analysis, self.meta.arch, every_unit)
            kept = {unit.name for unit in self.units}
            self.order = [name for name in self.order if name in kept]
        elif config.order in ("sensitivity", "efficiency"):
            self.order = []  # measured once data is at hand
        else:
            self.order = unit_order(self.units, config.order, config.seed)
        if self._needs_data():
            self.feeds.check()
        self.graph = None  # type: ignore[assignment]
        self.widths_before = {}

    def _needs_data(self) -> bool:
        """Blocks and convs come out without data; a hidden Linear's bridge is fitted on training samples,
        and measuring the order or the budget needs the validation split."""
        config = self.config
        return (config.evaluate or config.accuracy_aware or not self.order
                or self._has_steps(config.finetune) or self._has_steps(config.step_finetune)
                or any(unit.kind == "linear" for unit in self.units))

    def run_layers(self) -> tuple[nn.Module, dict[str, Any]]:
        config = self.config
        started = time.perf_counter()
        calibration = self._calibration() if any(unit.kind == "linear" for unit in self.units) else None
        loaded: list[Any] = []

        def evaluate_val(model: nn.Module) -> Any:
            if not loaded:  # the validation split is read only when something is measured
                loaded.append(self.feeds.eval("val", config.val_samples or config.samples, config.seed))
            return evaluate(model, loaded[0], self.device, task=self.task)

        measured: dict[str, Any] = {}
        if not self.order:
            metrics = unit_metrics(self.model, self.units, evaluate_val, calibration)
            self.drops = unit_drops(self.units, evaluate_val(self.model), metrics, self.task)
            self.order = sensitivity_order(self.units, self.drops)
            measured = {name: m.as_dict() for name, m in metrics.items()}
        env = Removal(input_shape=self.shape, calibration=calibration,
                      evaluate=lambda m: evaluate_val(m).value, drop=self.task.drop,
                      finetune=lambda m, name: (self.finetune(m, config.step_finetune, f"fine-tune without {name}")
                                                or {}).get("steps", 0),
                      max_drop=config.max_accuracy_drop if config.accuracy_aware else None,
                      on_step=lambda row: self.observer.row("prune.layer", row),
                      efficiency=self.drops if config.order == "efficiency" else None)
        model, rows = remove_in_order(self.model, self.order, self.plan, env)
        self.seconds["layer_removal"] = time.perf_counter() - started
        self.removed_units = [row["unit"] for row in rows if row["accepted"]]
        return model, {"mode": "layers", "steps": rows, "unit_metrics": measured,
                       "target_met_during_loop": self.plan.met(len(self.removed_units), model_size(model, self.shape))}

    def _calibration(self) -> torch.Tensor:
        """Training inputs for the least-squares bridges (a fixed, seeded draw)."""
        return calibration_inputs(self.meta, self.feeds.section, self.config.calibration_samples,
                                  self.config.seed).to(self.device)

    def _layer_rows(self) -> list[dict[str, Any]]:
        removed = set(getattr(self, "removed_units", []))
        return [{"name": u.name, "type": u.kind, "params": u.params, "macs": u.macs, "members": list(u.members),
                 "removed": u.name in removed} for u in self.units]

    def _locked(self) -> dict[str, str]:
        return {}
