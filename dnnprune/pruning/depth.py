"""`prune --granularity layer`: out-of-order layer pruning, least sensitive unit first.

The units (`pruning.layers`) are ranked by how much the task's primary metric drops when each is
removed alone (from an `analyze --granularity layer` report, or measured here on the validation
subset), then removed in that order until the target is met or `remove` units are gone. The
`efficiency` order ranks by drop per parameter (or MAC, with that target) saved instead, re-measured
before every removal: on an accordion the wide input-facing layer is the most sensitive one alone
but saves most, and once the narrow layers around it are gone it can no longer go. In
accuracy-aware mode every removal is fine-tuned and kept only if the metric stays within the
budget of the original; a rejected unit is put back and the next one is tried.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn

from dnnprune.errors import PruningError
from dnnprune.files import read_text
from dnnprune.patterns import select_layers
from dnnprune.pruning.layers import Unit, find_units, remove_unit, strip_unit, unit_named
from dnnprune.pruning.structured import Metric, model_size
from dnnprune.tasks import Metrics, Task

Evaluate = Callable[[nn.Module], Metrics]


def units_fingerprint(arch: str, units: Sequence[Unit]) -> str:
    """Identifies a model's removable units, so a layer analysis is never applied to another model."""
    text = json.dumps([arch, [[u.name, u.kind, u.params] for u in units]])
    return hashlib.sha256(text.encode()).hexdigest()


def check_units(model: nn.Module, input_shape: Sequence[int]) -> list[Unit]:
    units = find_units(model, input_shape)
    if not units:
        raise PruningError(f"{type(model).__name__} has no removable unit (no residual block, no same-shape conv in a "
                           "chain, no hidden Linear between two Linears); use --granularity filter to remove channels")
    return units


def unit_metrics(model: nn.Module, units: Sequence[Unit], evaluate: Evaluate, calibration: torch.Tensor | None,
                 on_unit: Callable[[int, Unit], None] | None = None) -> dict[str, Metrics]:
    """The task's metrics with each unit removed alone (no fine-tuning), on copies of the model."""
    results = {}
    for index, unit in enumerate(units):
        clone = copy.deepcopy(model)
        remove_unit(clone, unit, calibration)
        results[unit.name] = evaluate(clone)
        if on_unit is not None:
            on_unit(index, unit)
    return results


def unit_drops(units: Sequence[Unit], baseline: Metrics, measured: dict[str, Metrics], task: Task) -> dict[str, float]:
    """Each unit's drop of the primary metric when removed alone (inf where undefined)."""
    drops = {u.name: task.drop(baseline.value, measured[u.name].value) for u in units}
    return {name: drop if drop == drop else float("inf") for name, drop in drops.items()}


def sensitivity_order(units: Sequence[Unit], drops: dict[str, float]) -> list[str]:
    """Least sensitive first; ties go to the unit that saves more MACs."""
    ranked = sorted(enumerate(units), key=lambda item: (drops[item[1].name], -item[1].macs, item[0]))
    return [unit.name for _, unit in ranked]


_FREE_DROP = 1e-4
"""Drops at or below this (0.01 points) count as free, so among free units the larger saving goes first."""


def efficiency_pick(candidates: Sequence[Unit], drops: dict[str, float], metric: str) -> Unit | None:
    """The unit with the least drop per unit of `metric` saved now; units that save nothing go last."""
    def key(item: tuple[int, Unit]) -> tuple[float, float, int]:
        index, unit = item
        saving = getattr(unit, metric)
        drop = max(drops.get(unit.name, float("inf")), _FREE_DROP)
        return (drop / saving if saving > 0 else float("inf"), drop, index)

    return min(enumerate(candidates), key=key)[1] if candidates else None


def load_layer_analysis(path: Path, arch: str, units: Sequence[Unit]) -> tuple[list[str], dict[str, float]]:
    """The order and each unit's drop from an `analyze --granularity layer` report made for this very model."""
    try:
        report = json.loads(read_text(Path(path), "analysis report", error=PruningError,
                                      missing_hint=f"run `dnnprune analyze CKPT --granularity layer -o {path}`"))
    except (ValueError, RecursionError) as exc:
        raise PruningError(f"analysis report {path} is not readable JSON ({type(exc).__name__}); pass the file "
                           "`dnnprune analyze --granularity layer` wrote") from None
    if not isinstance(report, dict) or report.get("granularity") != "layer" or not isinstance(report.get("order"), list):
        raise PruningError(f"{path} is not a layer analysis; run `dnnprune analyze CKPT --granularity layer`")
    model = report.get("model") if isinstance(report.get("model"), dict) else {}
    if model.get("fingerprint") != units_fingerprint(arch, units):
        raise PruningError(f"layer analysis {path} was made for another model; run `dnnprune analyze --granularity "
                           "layer` on this checkpoint")
    names = {u.name for u in units}
    listed = [n for n in report["order"] if isinstance(n, str) and n in names]
    order = list(dict.fromkeys(listed)) + [u.name for u in units if u.name not in listed]
    return order, _report_drops(report, names)


def _report_drops(report: dict[str, Any], names: set[str]) -> dict[str, float]:
    """`sensitivity` per unit from the report's layers; a unit missing or without a number counts as infinite."""
    drops = dict.fromkeys(names, float("inf"))
    for layer in report.get("layers") or []:
        value = layer.get("sensitivity") if isinstance(layer, dict) else None
        if isinstance(layer, dict) and layer.get("name") in names and isinstance(value, (int, float)) and value == value:
            drops[layer["name"]] = float(value)
    return drops


def unit_order(units: Sequence[Unit], policy: str, seed: int) -> list[str]:
    names = [u.name for u in units]
    if policy == "reverse":
        return names[::-1]
    if policy == "random":
        random.Random(seed).shuffle(names)
    return names


def without_excluded(model: nn.Module, units: Sequence[Unit], patterns: Sequence[str]) -> list[Unit]:
    """The units left once `--exclude` keeps every unit that holds an excluded layer (or is one)."""
    if not patterns:
        return list(units)
    kept_layers = set(select_layers(model, patterns, what="exclude pattern"))
    left = [unit for unit in units if not _holds_any(unit, kept_layers)]
    if not left:
        raise PruningError(f"--exclude {', '.join(patterns)} keeps every removable unit, so nothing can be removed; "
                           "exclude less")
    return left


def _holds_any(unit: Unit, layers: set[str]) -> bool:
    roots = (unit.name, *unit.members)
    return any(layer == root or layer.startswith(f"{root}.") for layer in layers for root in roots)


def chosen_units(model: nn.Module, units: Sequence[Unit], names: Sequence[str],
                 input_shape: Sequence[int]) -> list[str]:
    """`--units`: the user's own pick, in the user's order, each checked against what this model can lose;
    each must shrink the model as it is once the units named before it are gone (a bottleneck Linear grows
    it while its wide neighbours are there, and shrinks it after)."""
    if len(set(names)) != len(names):
        raise PruningError(f"--units names a unit twice: {', '.join(n for n in dict.fromkeys(names) if names.count(n) > 1)}")
    for name in names:
        unit_named(units, name)
    clone = copy.deepcopy(model) if names else model
    for name in names:
        unit = unit_named(find_units(clone, input_shape), name)
        if unit.params <= 0:
            raise PruningError(f"removing {unit.name} would grow the model by {-unit.params:,} parameters: the Linear "
                               "that bridges its neighbours is larger than the layers it replaces; leave it out of "
                               "--units, or name it after its wide neighbours")
        strip_unit(clone, unit)
    return list(names)


@dataclass
class DepthPlan:
    """When the removal loop stops: after `remove` units, or once the target factor is reached."""

    remove: int | None
    target: Metric | None
    factor: float | None
    base: dict[str, int]

    def met(self, removed: int, size: dict[str, int]) -> bool:
        if self.remove is not None and removed >= self.remove:
            return True
        if self.target is not None and self.factor is not None:
            return self.base[self.target] / max(1, size[self.target]) >= self.factor
        return False


def check_reachable(model: nn.Module, units: Sequence[Unit], plan: DepthPlan, input_shape: Sequence[int]) -> None:
    """A count above the number of units, or a target beyond what removing units can give, is an input error."""
    if plan.remove is not None and plan.remove > len(units):
        raise PruningError(f"--remove {plan.remove} is more than the {len(units)} removable units of this model; "
                           f"give at most {len(units)}")
    if plan.target is None or plan.factor is None:
        return
    best = plan.base[plan.target] / max(1, stripped_size(model, input_shape, plan.target)[plan.target])
    if best < plan.factor:
        raise PruningError(f"removing layers can give at most {best:.2f}x fewer {plan.target}; lower the target "
                           f"below {best:.2f}")


def stripped_size(model: nn.Module, input_shape: Sequence[int], metric: str | None = None) -> dict[str, int]:
    """The smallest size removing units leaves (bridges sized, not fitted).

    Without a metric every unit goes. With one, only units that shrink that metric are taken, again
    and again, as the removal loop does: on an accordion, removing a bottleneck layer widens the next
    one, so "every unit gone" can be larger than what the loop reaches. The smaller of the two counts.
    """
    clone = copy.deepcopy(model)
    skipped = False
    while True:
        units = find_units(clone, input_shape)
        shrinking = [u for u in units if _shrinks(u, metric)]
        skipped = skipped or len(shrinking) < len(units)
        if not shrinking:
            break
        strip_unit(clone, shrinking[0])
    size = model_size(clone, input_shape)
    if metric is None or not skipped:
        return size
    return min(size, stripped_size(model, input_shape), key=lambda s: s[metric])


@dataclass
class Removal:
    """What the loop needs from outside: data-bound callables."""

    input_shape: tuple[int, ...]
    calibration: torch.Tensor | None
    """Training inputs for the bridges of hidden Linear units (None: the model has none)."""
    evaluate: Callable[[nn.Module], float]
    drop: Callable[[float, float], float]
    finetune: Callable[[nn.Module, str], int]
    max_drop: float | None
    """None: one-shot (no fine-tune or check per removal)."""
    on_step: Callable[[dict[str, Any]], None] | None = None
    efficiency: dict[str, float] | None = None
    """Each unit's drop alone: pick by least drop per saving now, not by `order`."""


def remove_in_order(model: nn.Module, order: Sequence[str], plan: DepthPlan, env: Removal) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Remove units until the plan is met; returns the model and one row per try.

    Each try takes the first unit of `order` that is still in the model and not tried yet. A unit whose
    removal would not shrink the model now, in the target's metric or else in parameters (a bottleneck
    Linear, whose bridge widens the next layer), is passed over, not dropped: after other removals it can
    shrink the model, and it is tried then. A unit rejected by the accuracy budget is not tried again.
    """
    baseline = env.evaluate(model) if env.max_drop is not None else None
    rows: list[dict[str, Any]] = []
    removed = 0
    tried: set[str] = set()
    while not plan.met(removed, model_size(model, env.input_shape)):
        unit = _next_unit(model, order, plan, env, tried)
        if unit is None:
            break
        name = unit.name
        tried.add(name)
        started = time.perf_counter()
        candidate = copy.deepcopy(model) if env.max_drop is not None else model
        remove_unit(candidate, unit, env.calibration)
        row: dict[str, Any] = {"step": len(rows) + 1, "unit": name, "kind": unit.kind,
                               "unit_params": unit.params, "unit_macs": unit.macs}
        if env.max_drop is not None and baseline is not None:
            row["finetune_steps"] = env.finetune(candidate, name)
            value = env.evaluate(candidate)
            row.update(val=value, drop=env.drop(baseline, value), accepted=env.drop(baseline, value) <= env.max_drop)
        else:
            row["accepted"] = True
        if row["accepted"]:
            model = candidate
            removed += 1
        row.update(model_size(model, env.input_shape), removed=removed, seconds=time.perf_counter() - started)
        rows.append(row)
        if env.on_step is not None:
            env.on_step(row)
    return model, rows


def _next_unit(model: nn.Module, order: Sequence[str], plan: DepthPlan, env: Removal, tried: set[str]) -> Unit | None:
    """The next untried unit still in the model that shrinks it: first in `order`, or the most efficient."""
    units = {u.name: u for u in find_units(model, env.input_shape)}
    metric = plan.target if plan.target in ("params", "macs") else "params"  # a removal never grows the model
    candidates = [units[n] for n in order if n not in tried and n in units and _shrinks(units[n], metric)]
    if env.efficiency is not None:
        return efficiency_pick(candidates, env.efficiency, metric)
    return candidates[0] if candidates else None


def _shrinks(unit: Unit, target: str | None) -> bool:
    """Under a params/macs target, only a removal that makes the model smaller in it counts."""
    return target not in ("params", "macs") or getattr(unit, target) > 0
