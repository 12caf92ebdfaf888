"""`double_prune(model, section)`: network slimming, then unstructured parameter pruning stored sparse.

The second source paper's method (Lee et al. 2020): channels first (Liu et al.'s network slimming,
physically removed, so MACs and latency fall), then individual weights (Han et al.'s magnitude
pruning, gradual, masks held), stored with the sparse codec so the file shrinks by the reported
factor. Either stage runs alone when the other's ratio is 0. Every stage is measured: the task's
metric, parameters, non-zero parameters, MACs, bytes and NetScore (on all parameters and on
non-zero parameters: the first is what dense execution pays, the second what sparse storage pays).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from typing import Any

import torch
import torch.nn as nn

from dnnprune.checkpoint import meta_of, predicted_file_bytes
from dnnprune.codecs import Encoding, SparseSpec
from dnnprune.errors import PruningError
from dnnprune.lineage import command
from dnnprune.loaders import eval_loader, splits_for, train_loader
from dnnprune.metrics import count_nonzero_parameters, measure_latency
from dnnprune.observe import Observer
from dnnprune.pruning.slimming import SlimmingResult, check_slimmable, default_lambda, is_residual, slim
from dnnprune.pruning.structured import Limits, dense_bytes, model_size
from dnnprune.pruning.unstructured import GradualPruner, SparsityPlan, density, plan_sparsity, prunable_layers
from dnnprune.recipe import DataSection, DoublePruneSection, FineTuneSection, NetScoreSection
from dnnprune.reports import Report
from dnnprune.scoring import netscore_block
from dnnprune.sparse_exec import faster_layers, measure_linears, with_sparse_linears
from dnnprune.surgery import ChannelGraph, execution_order
from dnnprune.tasks import Task, make_task
from dnnprune.training import check_distillation_runs, evaluate, fit_loop, frozen_teacher

NETSCORE_NOTE = ("netscore: p = all parameters (what dense execution stores and runs); "
                 "netscore_nonzero: p = non-zero parameters (what sparse storage keeps)")


class DoublePruneReport(Report):
    arch: str
    primary_metric: str
    higher_is_better: bool
    config: dict[str, Any]
    stages: list[dict[str, Any]]
    slimming: dict[str, Any] | None
    parameter_pruning: dict[str, Any] | None
    layers: list[dict[str, Any]]
    totals: dict[str, Any]
    sparse_execution: dict[str, Any] | None
    netscore_note: str = NETSCORE_NOTE
    seconds: dict[str, float]

    def lineage_metrics(self) -> dict[str, Any]:
        first, final = self.stages[0], self.stages[-1]
        metrics = {"params": final["params"], "nonzero_params": final["nonzero_params"], "macs": final["macs"]}
        for key in ("params", "macs"):  # what `prune --target-basis original` counts back from
            if final[key]:
                metrics[f"{key}_reduction"] = first[key] / final[key]
        if final.get("test"):
            metrics[f"test_{self.primary_metric}"] = final["test"].get(self.primary_metric)
        return metrics


@command("double-prune")
def double_prune(model: nn.Module, section: DoublePruneSection, *, data: DataSection, device: torch.device,
                 observer: Observer) -> tuple[nn.Module, DoublePruneReport]:
    """Slim the BN channels, then zero small weights; every input is checked before training starts."""
    job = _DoubleJob(model, section, data, device, observer)
    job.validate()
    return job.run()


def slimming_round_steps(section: DoublePruneSection) -> list[int]:
    """Fine-tune steps after each slimming round: an equal share each, the remainder to the last."""
    count = section.slimming_rounds
    share, rest = divmod(section.finetune_steps, count)
    return [share + (rest if k == count - 1 else 0) for k in range(count)]


class _DoubleJob:
    def __init__(self, model: nn.Module, section: DoublePruneSection, data: DataSection, device: torch.device,
                 observer: Observer) -> None:
        self.model = model.to(device)
        self.section = section
        self.data = data
        self.device = device
        self.observer = observer
        self.meta = meta_of(model)
        self.task: Task = make_task(self.meta.task)
        self.shape = tuple(self.meta.input_shape)
        self.phases = 0
        check_distillation_runs(section.finetune, steps=section.sparsity_steps + section.finetune_steps)
        self.teacher = frozen_teacher(self.model, section.finetune)
        self.seconds: dict[str, float] = {}

    # -- validation ----------------------------------------------------------------------

    def validate(self) -> None:
        section = self.section
        if section.slimming_ratio == 0 and section.sparsity == 0:
            raise PruningError("both --slimming-ratio and --sparsity are 0: nothing to do; give one of them")
        if any(encoding.values is not None for encoding in self.meta.encodings.values()):
            raise PruningError("this checkpoint has quantized layers, whose codes pruning would cut through; "
                               "double-prune the float checkpoint, then quantize the result")
        # A sparsity that would empty a layer fails here, before any training. Slimming changes the layer
        # sizes that decide what is reachable: with the gammas as they are (no sparsity training) the plan
        # is made on a slimmed copy, exactly; otherwise `_slimming` checks again before fine-tuning.
        probe_slimming = section.slimming_ratio > 0 and section.sparsity > 0 and section.sparsity_steps == 0
        if section.slimming_ratio > 0:
            check_slimmable(self.model, ChannelGraph(self.model, self.shape))
        if probe_slimming:
            try:
                self._sparsity_plan(self._slimmed_copy())
            except PruningError as exc:
                raise PruningError(f"{exc}, or lower --slimming-ratio (reachable sparsity is measured on the "
                                   "layers as slimming leaves them)") from None
        elif section.sparsity > 0:
            self._sparsity_plan()
        if section.evaluate or section.sparsity_steps or section.finetune_steps:
            splits_for(self.meta, self.data)

    def _slimmed_copy(self) -> nn.Module:
        """The model as slimming with the current gammas leaves it (raises when it has no BatchNorm)."""
        probe = copy.deepcopy(self.model)
        slim(probe, ChannelGraph(probe, self.shape), self.section.slimming_ratio, self._limits())
        return probe

    def _limits(self) -> Limits:
        section = self.section
        return Limits(min_channels=section.min_channels, min_fraction=section.min_fraction, max_ratio=0.99,
                      round_to=section.round_to)

    def _sparsity_plan(self, model: nn.Module | None = None) -> SparsityPlan:
        model = self.model if model is None else model
        order = prunable_layers(model, execution_order(model, self.shape))
        if not order:
            raise PruningError(f"{self.meta.arch} has no conv or linear layer to prune")
        weights = {name: model.get_submodule(name).weight for name in order}
        return plan_sparsity(weights, self.section.sparsity, threshold=self.section.threshold,
                             light={order[0], order[-1]}, factor=self.section.first_last_factor,
                             min_density=self.section.min_density)

    # -- the stages ----------------------------------------------------------------------

    def run(self) -> tuple[nn.Module, DoublePruneReport]:
        started = time.perf_counter()
        stages = [self._measure("before")]
        slimming = self._slimming(stages) if self.section.slimming_ratio > 0 else None
        pruning = self._parameter_pruning(stages) if self.section.sparsity > 0 else None
        stages.append({**stages[-1], "stage": "final"})
        self.model.to("cpu").eval()
        report = DoublePruneReport(
            arch=self.meta.arch, primary_metric=self.task.primary, higher_is_better=self.task.higher_is_better,
            config=self.section.model_dump(mode="json"), stages=stages, slimming=slimming,
            parameter_pruning=pruning, layers=self._layer_rows(), totals=self._totals(stages),
            sparse_execution=self._sparse_execution() if self.section.sparse_execution else None,
            seconds={**self.seconds, "total": time.perf_counter() - started})
        return self.model, report

    def _slimming(self, stages: list[dict[str, Any]]) -> dict[str, Any]:
        section = self.section
        strength = section.sparsity_lambda if section.sparsity_lambda is not None else default_lambda(self.model)
        sparsity_history = self._train(section.sparsity_steps, "sparsity training", bn_l1=strength)
        original = self._bn_channels(ChannelGraph(self.model, self.shape))
        rounds = [self._slimming_round(index, original, stages) for index in range(section.slimming_rounds)]
        results = [result for result, _ in rounds]
        removed: Counter[str] = sum((Counter(r.removed) for r in results), Counter())
        return {"lambda": strength, "lambda_default": section.sparsity_lambda is None,
                "residual": is_residual(self.model), "sparsity_steps": section.sparsity_steps,
                "sparsity_history": sparsity_history, "finetune_history": rounds[-1][1],
                "rounds": [{"threshold": r.threshold, "removed": r.removed_total, "finetune_history": h}
                           for r, h in rounds],
                "threshold": max((r.threshold for r in results if r.threshold is not None), default=None),
                "channels": original, "removed": sum(r.removed_total for r in results),
                "removed_per_layer": dict(removed), "widths_before": results[0].widths_before,
                "widths_after": results[-1].widths_after, "skipped_without_bn": results[0].skipped}

    def _slimming_round(self, index: int, original: int,
                        stages: list[dict[str, Any]]) -> tuple[SlimmingResult, dict[str, Any] | None]:
        """One round: cut to (1 - ratio)^(k/rounds) of the `original` BN channels, then this round's fine-tune."""
        section = self.section
        count = section.slimming_rounds
        last = index == count - 1
        graph = ChannelGraph(self.model, self.shape)
        target = original * (1.0 - section.slimming_ratio) ** ((index + 1) / count)
        # one round takes the ratio as given (no float round trip); later rounds cut from what is left
        ratio = section.slimming_ratio if count == 1 else min(max(1.0 - target / self._bn_channels(graph), 0.0), 0.99)
        started = time.perf_counter()
        result: SlimmingResult = slim(self.model, graph, ratio, self._limits())
        self.seconds["slimming_surgery"] = self.seconds.get("slimming_surgery", 0.0) + time.perf_counter() - started
        if last and section.sparsity > 0 and (section.sparsity_steps > 0 or count > 1):
            self._sparsity_plan()  # slimming may have gone otherwise than validate() foresaw: check before fine-tuning
        suffix = "" if count == 1 else f"_round_{index + 1}"
        stages.append(self._measure("slimmed" + suffix))
        history = self._train(slimming_round_steps(section)[index],
                              "fine-tune after slimming" + ("" if count == 1 else f" (round {index + 1} of {count})"))
        stages.append(self._measure("after_slimming" + ("" if last else suffix)))
        return result, history

    def _bn_channels(self, graph: ChannelGraph) -> int:
        """Channels that slimming ranks (those of the BN-bearing groups)."""
        widths = graph.widths()
        return sum(widths[name] for name in check_slimmable(self.model, graph))

    def _parameter_pruning(self, stages: list[dict[str, Any]]) -> dict[str, Any]:
        section = self.section
        plan = self._sparsity_plan()
        pruner = GradualPruner(self.model, plan, total_steps=section.finetune_steps, ramp=section.ramp,
                               every=section.prune_every)
        try:
            history = self._train(section.finetune_steps, "gradual magnitude pruning", after_step=pruner)
            pruner.finish()
        finally:
            pruner.close()
        for name in plan.keep:
            kind = "linear" if isinstance(self.model.get_submodule(name), nn.Linear) else "conv"
            self.meta.encodings[f"{name}.weight"] = Encoding(sparse=SparseSpec(index_bits=5 if kind == "linear" else 8))
        stages.append(self._measure("after_parameter_pruning"))
        return {"threshold": plan.threshold, "knob": plan.knob, "target_sparsity": section.sparsity,
                "reached_sparsity": plan.sparsity, "layer_sparsity": plan.layer_sparsity(),
                "ramp_steps": pruner.ramp_steps, "prune_every": section.prune_every, "history": history}

    def _train(self, steps: int, description: str, **kwargs: Any) -> dict[str, Any] | None:
        """One training phase of `steps` steps with the section's optimizer; fresh batches every phase."""
        if steps == 0:
            return None
        config: FineTuneSection = self.section.finetune.model_copy(update={"epochs": 0.0, "max_steps": steps})
        seed = self.section.seed + self.phases
        self.phases += 1
        loader = train_loader(self.meta, self.data, config.batch_size, seed)
        started = time.perf_counter()
        history = fit_loop(self.model, loader, config, device=self.device, task=self.task, observer=self.observer,
                           description=description, seed=seed, teacher=self.teacher, **kwargs)
        self.seconds[description] = time.perf_counter() - started
        return history.as_dict()

    # -- measuring -----------------------------------------------------------------------

    def _measure(self, stage: str) -> dict[str, Any]:
        size = model_size(self.model, self.shape)
        nonzero = count_nonzero_parameters(self.model)
        row: dict[str, Any] = {"stage": stage, "params": size["params"], "nonzero_params": nonzero,
                               "macs": size["macs"], "dense_bytes": dense_bytes(self.model), "stored_bytes": size["bytes"],
                               "bytes": predicted_file_bytes(self.model, self.meta)}
        if not self.section.evaluate:
            return {**row, "val": None, "test": None}
        started = time.perf_counter()
        for split in ("val", "test"):
            loader = eval_loader(self.meta, self.data, split=split, samples=self.section.samples,  # type: ignore[arg-type]
                                 seed=self.section.seed)
            row[split] = evaluate(self.model, loader, self.device, task=self.task).as_dict()
        self.seconds[f"evaluate_{stage}"] = time.perf_counter() - started
        primary = row["test"].get(self.task.primary)
        score_size = {"params": size["params"], "nonzero_params": nonzero, "macs": size["macs"]}
        row["netscore"] = netscore_block(self.task, float("nan") if primary is None else primary, score_size,
                                         NetScoreSection().model_dump())
        return row

    def _layer_rows(self) -> list[dict[str, Any]]:
        order = prunable_layers(self.model, execution_order(self.model, self.shape))
        densities = density(self.model, order)
        rows = []
        for name in order:
            weight = self.model.get_submodule(name).weight
            encoding = self.meta.encodings.get(f"{name}.weight")
            rows.append({"name": name, "type": type(self.model.get_submodule(name)).__name__,
                         "shape": list(weight.shape), "params": weight.numel(),
                         "nonzero": int(torch.count_nonzero(weight)), "density": densities[name],
                         "encoding": encoding.model_dump(mode="json") if encoding is not None else None})
        return rows

    def _totals(self, stages: list[dict[str, Any]]) -> dict[str, Any]:
        first, last = stages[0], stages[-1]
        return {"params_before": first["params"], "params_after": last["params"],
                "nonzero_params_after": last["nonzero_params"],
                "nonzero_reduction": first["nonzero_params"] / max(1, last["nonzero_params"]),
                "macs_reduction": first["macs"] / max(1, last["macs"]),
                "fp32_bytes_before": first["params"] * 4, "predicted_file_bytes": last["bytes"],
                "effective_bits_per_weight": 8.0 * last["bytes"] / max(1, last["params"]),
                "bits_per_nonzero_weight": 8.0 * last["bytes"] / max(1, last["nonzero_params"])}

    def _sparse_execution(self) -> dict[str, Any]:
        """Dense vs CSR latency for every sparse Linear layer, and for the whole model with the winners swapped."""
        linears = [n for n in prunable_layers(self.model, execution_order(self.model, self.shape))
                   if isinstance(self.model.get_submodule(n), nn.Linear)]
        rows = measure_linears(self.model, linears, (1, 64))
        whole = []
        for batch in (1, 64):
            winners = faster_layers(rows, batch)
            sparse_model = with_sparse_linears(self.model, winners) if winners else None
            dense = measure_latency(self.model, self.shape, batch, repeats=30).median_ms
            fast = measure_latency(sparse_model, self.shape, batch, repeats=30).median_ms if sparse_model else dense
            whole.append({"batch_size": batch, "sparse_layers": winners, "dense_ms": dense, "with_sparse_ms": fast})
        return {"layers": rows, "model": whole,
                "note": "convolutions run dense (torch has no sparse CPU convolution); only Linear layers whose CSR "
                        "kernel measured at least 1.1x faster are swapped (smaller gains are within timing noise)"}
