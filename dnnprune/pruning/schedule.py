"""In which order layers are pruned, and the accuracy-aware loop that walks that order.

`sensitivity` order comes from an `analyze` report: least sensitive layers first (out-of-order pruning).
The accuracy-aware loop raises one layer's ratio per step on a copy of the model, fine-tunes briefly,
evaluates, and keeps the step only if accuracy stayed within `max_accuracy_drop` of the original.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dnnprune.checkpoint import first_line
from dnnprune.errors import PruningError
from dnnprune.files import read_text
from dnnprune.pruning.structured import Limits, Metric, model_size
from dnnprune.surgery import ChannelGraph, model_fingerprint

StepRow = dict[str, Any]


# ----------------------------------------------------------------------------- the analysis report


def load_analysis(path: Path, arch: str, graph: ChannelGraph) -> dict[str, Any]:
    """Read an `analyze` report and make sure it was made for this very model (same layers and widths)."""
    try:
        report = json.loads(read_text(Path(path), "analysis report", error=PruningError,
                                      missing_hint=f"run `dnnprune analyze CKPT -o {path}` first"))
    except (ValueError, RecursionError) as exc:
        raise PruningError(f"analysis report {path} is not readable JSON ({type(exc).__name__}); pass the file `dnnprune analyze` wrote") from None
    # The CLI's file wraps the report (command, version, inputs); a library caller's report.model_dump_json() does not.
    if not isinstance(report, dict) or report.get("command", "analyze") != "analyze" or not isinstance(report.get("model"), dict):
        raise PruningError(f"{path} is not an analysis report (no command: analyze); pass the file `dnnprune analyze` wrote")
    if report.get("granularity", "filter") != "filter":
        raise PruningError(f"{path} is a {report.get('granularity')} analysis; channel pruning needs a filter analysis "
                           "(`dnnprune analyze CKPT`), or prune with --granularity layer")
    made_for = report["model"]
    if made_for.get("fingerprint") != model_fingerprint(arch, graph):
        raise PruningError(f"analysis {path} was made for another model than this {arch} checkpoint "
                           f"({_difference(made_for, arch, graph)}); run `dnnprune analyze` on this checkpoint")
    if not isinstance(report.get("order"), list):
        raise PruningError(f"analysis report {path} has no layer order; re-run `dnnprune analyze`")
    _check_contents(report, graph, path)
    return report


def _difference(made_for: dict[str, Any], arch: str, graph: ChannelGraph) -> str:
    """What tells the two models apart: the architecture, or the first layer groups whose widths differ."""
    if made_for.get("arch") != arch:
        return f"it is for {str(made_for.get('arch'))[:80]!r}"
    theirs = made_for.get("groups") if isinstance(made_for.get("groups"), list) else []
    listed = {str(g[0]): g[1] for g in theirs if isinstance(g, (list, tuple)) and len(g) == 2}
    ours = {group.name: group.width for group in graph.all_groups}
    changed = [f"{name} {listed[name]} -> {width}" for name, width in ours.items() if name in listed and listed[name] != width]
    if changed:
        return "widths differ: " + ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
    return f"{len(listed)} layer groups there, {len(ours)} here"


class _Cell(BaseModel):
    model_config = ConfigDict(extra="allow")
    ratio: float = Field(ge=0.0, lt=1.0)
    removed: int = Field(0, ge=0)


class _Layer(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    width: int | None = Field(None, ge=1)
    suggested_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    cells: list[_Cell] = []


class _Planned(BaseModel):
    """What the planner reads of an analysis report, typed and bounded."""

    model_config = ConfigDict(extra="ignore")
    layers: list[_Layer] = []
    order: list[str]
    baseline: dict[str, Any] = {}
    primary_metric: str = "top1"


def _check_contents(report: dict[str, Any], graph: ChannelGraph, path: Path) -> None:
    """Every number the planner reads, typed and in range: an edited or damaged report would otherwise crash
    the plan half-way, or steer it with a NaN, a negative ratio or a layer that is not there."""
    try:
        parsed = _Planned.model_validate(report)
    except ValidationError as exc:
        raise PruningError(f"analysis report {path} is malformed ({first_line(exc, 200)}); re-run `dnnprune analyze`") from None
    problem = _content_problem(parsed, {group.name for group in graph.all_groups})
    if problem:
        raise PruningError(f"analysis report {path}: {problem}; re-run `dnnprune analyze` on this checkpoint")


def _content_problem(report: _Planned, groups: set[str]) -> str | None:
    names = [layer.name for layer in report.layers]
    if len(set(names)) != len(names) or not set(names) <= groups:
        return "its layers are repeated or are not this model's layer groups"
    if len(set(report.order)) != len(report.order) or not set(report.order) <= groups:
        return "its order names a layer twice or one this model does not have"
    measured = any(layer.cells for layer in report.layers)
    if measured and not _finite(report.baseline.get(report.primary_metric)):
        return f"its baseline {report.primary_metric} is not a finite number"
    for layer in report.layers:
        if layer.cells and layer.width is None:
            return f"layer {layer.name!r} has cells but no width"
        for cell in layer.cells:
            value = (cell.model_extra or {}).get(report.primary_metric)
            if not (value is None or _finite(value)):
                return f"layer {layer.name!r} has a cell at ratio {cell.ratio} whose {report.primary_metric} is {value!r}"
    return None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ----------------------------------------------------------------------------- orders


def layer_order(graph: ChannelGraph, order: str, *, analysis: dict[str, Any] | None = None, seed: int = 0) -> list[str]:
    """Prunable group names in the order the chosen policy visits them."""
    names = [g.name for g in graph.groups]
    if order == "sequential":
        return names
    if order == "reverse":
        return names[::-1]
    if order == "random":
        shuffled = list(names)
        random.Random(seed).shuffle(shuffled)
        return shuffled
    if order == "sensitivity":
        if analysis is None:
            raise PruningError("--order sensitivity needs an analysis report: pass --analysis A.json (from `dnnprune analyze`)")
        ranked = [n for n in analysis["order"] if n in names]
        return ranked + [n for n in names if n not in ranked]
    raise PruningError(f"unknown order {order!r}; choose sequential, reverse, sensitivity or random")


def order_weights(order: Sequence[str], policy: str) -> dict[str, float]:
    """One-shot pruning with a sensitivity order: the least sensitive layer takes the full ratio,
    the most sensitive half of it, linearly in between. Other orders weigh every layer the same."""
    if policy != "sensitivity" or len(order) < 2:
        return dict.fromkeys(order, 1.0)
    last = len(order) - 1
    return {name: 1.0 - 0.5 * rank / last for rank, name in enumerate(order)}


# ----------------------------------------------------------------------------- accuracy-aware loop


@dataclass
class StepEnvironment:
    """What the loop needs from outside: data-bound callables and the limits of the plan."""

    input_shape: tuple[int, ...]
    limits: Limits
    step: float
    max_drop: float
    score: Callable[[nn.Module, ChannelGraph, str], torch.Tensor]
    finetune: Callable[[nn.Module, str], int | None]
    evaluate: Callable[[nn.Module], float]
    """The task's primary metric on the validation subset."""
    drop: Callable[[float, float], float]
    """How much worse the second value is than the first (the task's `drop`)."""
    target_met: Callable[[dict[str, int]], bool]
    exclude: Sequence[str] = ()
    caps: dict[str, float] = field(default_factory=dict)
    on_step: Callable[[StepRow], None] | None = None
    jumps: dict[str, float] = field(default_factory=dict)
    """First try per layer (e.g. the analysis's suggested ratio); if rejected, the layer goes on by `step`."""
    rollback: bool = False
    """Undo a step's fine-tune when it worsens the val metric (costs one more evaluation per step)."""


@dataclass
class LoopResult:
    model: nn.Module
    baseline: float
    ratios: dict[str, float]
    rows: list[StepRow]
    target_met: bool


def accuracy_aware(model: nn.Module, order: Sequence[str], env: StepEnvironment) -> LoopResult:
    """Round-robin over `order`: each visit raises one layer's ratio by `step`; a step that costs more than
    `max_drop` of the original accuracy is undone and that layer is left alone from then on. A layer's
    first visit may jump straight to `env.jumps[name]` (the sensitivity analysis's suggestion), which saves
    the fine-tuning of every step below it; a rejected jump only sends the layer back to stepping."""
    widths = ChannelGraph(model, env.input_shape, exclude=env.exclude).widths()
    baseline = env.evaluate(model)
    ratios = dict.fromkeys(order, 0.0)
    jumps = {name: r for name, r in env.jumps.items() if name in ratios and r > env.step}
    active = list(order)
    rows: list[StepRow] = []
    while active:
        for name in list(active):
            jump = jumps.pop(name, None)
            outcome = _try_step(model, name, ratios[name], widths[name], baseline, env, len(rows) + 1, jump)
            if outcome is None:
                active.remove(name)
                continue
            candidate, new_ratio, row = outcome
            if row is None:
                ratios[name] = new_ratio
                continue
            rows.append(row)
            if env.on_step is not None:
                env.on_step(row)
            if not row["accepted"]:
                if jump is None:
                    active.remove(name)
                continue
            model, ratios[name] = candidate, new_ratio
            if row["target_met"]:
                return LoopResult(model, baseline, ratios, rows, True)
    return LoopResult(model, baseline, ratios, rows, False)


def _try_step(model: nn.Module, name: str, ratio: float, width: int, baseline: float, env: StepEnvironment,
              number: int, jump: float | None = None) -> tuple[nn.Module, float, StepRow | None] | None:
    """None: the layer can take no more. A None row: the higher ratio removes no channel yet."""
    cap = min(env.caps.get(name, 1.0), env.limits.max_ratio)
    new_ratio = min(max(round(ratio + env.step, 6), jump or 0.0), cap)
    if new_ratio <= ratio:
        return None
    candidate = copy.deepcopy(model)
    graph = ChannelGraph(candidate, env.input_shape, exclude=env.exclude)
    before = graph.width(name)
    count = before - env.limits.keep(width, new_ratio)
    removed = graph.choose(name, env.score(candidate, graph, name), count) if count > 0 else []
    if not removed:
        return (candidate, new_ratio, None) if new_ratio < cap else None
    started = time.perf_counter()
    graph.prune({name: removed})
    value, pruned_value, steps, kept = _recover(candidate, name, env)
    size = model_size(candidate, env.input_shape)
    drop = env.drop(baseline, value)
    row = {"step": number, "layer": name, "kind": "step" if jump is None else "jump", "ratio": new_ratio,
           "width_before": before, "width_after": graph.width(name),
           **size, "val": value, "drop": drop, "accepted": drop <= env.max_drop,
           "target_met": env.target_met(size), "val_pruned": pruned_value, "finetune_steps": steps,
           "finetune_kept": kept, "seconds": time.perf_counter() - started}
    row["target_met"] = row["target_met"] and row["accepted"]
    return candidate, new_ratio, row


def _recover(candidate: nn.Module, name: str, env: StepEnvironment) -> tuple[float, float | None, int, bool]:
    """Fine-tune the pruned model; with `env.rollback`, keep the fine-tuning only if the val metric does
    not get worse (a few steps at a fixed learning rate can knock a converged model off its minimum).
    Returns (metric, metric before fine-tuning if measured, fine-tune steps, fine-tuning kept)."""
    if not env.rollback:
        steps = env.finetune(candidate, name) or 0
        return env.evaluate(candidate), None, steps, steps > 0
    pruned = env.evaluate(candidate)
    saved = {key: value.clone() for key, value in candidate.state_dict().items()}
    steps = env.finetune(candidate, name) or 0
    if steps == 0:
        return pruned, pruned, 0, False
    tuned = env.evaluate(candidate)
    if env.drop(pruned, tuned) <= 0:
        return tuned, pruned, steps, True
    candidate.load_state_dict(saved)
    return pruned, pruned, steps, False


def target_check(metric: Metric | None, factor: float | None, base: dict[str, int]) -> Callable[[dict[str, int]], bool]:
    """True once the model is `factor` times smaller in `metric`; never without a target."""
    if metric is None or factor is None:
        return lambda _size: False
    return lambda size: base[metric] / max(1, size[metric]) >= factor
