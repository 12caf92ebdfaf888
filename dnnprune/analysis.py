"""Sensitivity analysis (Li et al. 2017): prune each channel group alone over a ratio grid, measure, rank.

Every cell is one (layer, ratio) pair: the group's lowest-scored channels are removed from the
model and the result is evaluated on the validation data. The numbers are those of a freshly
pruned copy (`strategy="naive"` computes them that way, and tests compare the two: exactly, or to
float rounding with Winograd convolutions), but the default engine gets there much faster:

* the evaluation batches are built once; channels-last layout (faster convolutions on CPU);
* one working copy is pruned in place and restored after each cell (no copy, no re-tracing);
* a cell only recomputes the part of the network its pruning changes: the model is traced with
  torch.fx, cut where one activation carries everything forward, and the activation entering a
  group's first affected layer is cached once for all ratios (models fx cannot trace, or where a
  traced run disagrees with the real one, fall back to full forwards);
* where only channel-wise layers (BN, ReLU, pooling) separate the pruned conv from the next one,
  the cell starts after them from the unpruned activation with the removed channels dropped
  (checked bit for bit against the pruned layers on the first batch of every cell);
* with `winograd` (the default), the cells run 3x3 convolutions on small feature maps as Winograd
  F(2x2, 3x3) (`dnnprune.winograd`): 2.25x fewer multiplications, results equal to float rounding;
  the cached activations, the selection checks and the baseline keep the direct convolution;
* the baseline is the cached activations finishing their forward pass at the end;
* under `torchrun`, cells are shared out across processes by estimated cost and gathered again,
  so every process ends up with the same report.
"""

from __future__ import annotations

import copy
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from dnnprune.checkpoint import atomic_write_bytes, meta_of
from dnnprune.data import make_loader
from dnnprune.errors import DnnpruneError, PruningError, RecipeError
from dnnprune.metrics import count_macs
from dnnprune.recipe import AnalyzeSection
from dnnprune.report import write_report
from dnnprune.surgery import ChannelGraph, channels_to_keep, model_fingerprint
from dnnprune.training import EvalResult
from dnnprune.winograd import WinogradConvs

Strategy = Literal["fast", "cache", "restore", "naive"]
ProgressFn = Callable[[float, float, str], None]
"""(work done, total work, note); work is in estimated cell units, so an ETA from it is fair."""

CRITERIA = ("l1", "l2", "bn_scale", "random")
CACHE_BYTES = 2 << 30  # at most this much cached activation per process; beyond it a cell starts earlier
_GUARD_SAMPLES = 8


# ----------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Cell:
    layer: str
    ratio: float
    removed: int


@dataclass
class Plan:
    """What will be measured; built (and validated) before any data is touched."""

    graph: ChannelGraph
    layers: list[str]
    cells: list[Cell]
    widths: dict[str, int]
    indices: dict[tuple[str, float], list[int]]
    """The channels each cell removes: `ChannelGraph.choose` on scores of the unpruned model, as `prune` does."""


def plan_analysis(model: nn.Module, config: AnalyzeSection, input_shape: Sequence[int]) -> Plan:
    """Check the request against the model and fix the channels each cell removes."""
    if config.granularity != "filter":
        raise RecipeError("analyze.granularity: only 'filter' is available for now (layer removal comes with layer "
                          "pruning); use granularity: filter")
    if config.criterion not in CRITERIA:
        raise RecipeError(f"analyze.criterion: {config.criterion!r} is not available for sensitivity analysis; "
                          f"choose one of {', '.join(CRITERIA)}")
    graph = ChannelGraph(model, input_shape, exclude=config.exclude, include=config.layers)
    if not graph.all_groups:
        locked = f" ({len(graph.locked)} locked: {next(iter(graph.locked.values()))})" if graph.locked else ""
        raise PruningError(f"the model ({type(model).__name__}) has no prunable layer{locked}: no conv/linear layer "
                           "has output channels that can be removed (the output layer never is); nothing to analyze")
    if not graph.groups:
        raise RecipeError("analyze.layers/exclude leave no layer to analyze; loosen the patterns")
    layers = [g.name for g in graph.groups]
    widths = {g.name: g.width for g in graph.groups}
    cells, indices = [], {}
    for name in layers:
        scores = _scores(graph, name, config)
        for ratio in config.ratios:
            idxs = graph.choose(name, scores, widths[name] - channels_to_keep(widths[name], ratio))
            indices[(name, ratio)] = idxs
            cells.append(Cell(name, ratio, len(idxs)))
    return Plan(graph, layers, cells, widths, indices)


def _scores(graph: ChannelGraph, name: str, config: AnalyzeSection) -> torch.Tensor:
    try:
        return graph.importance(name, config.criterion, seed=config.seed)
    except PruningError as exc:
        raise PruningError(f"{exc}; or leave the layer out with analyze.exclude: [{name!r}]") from None


# ----------------------------------------------------------------------------- the library entry


def analyze(model: nn.Module, config: AnalyzeSection, data: Dataset | Callable[[], Dataset], *,
            device: torch.device | str = "cpu", batch_size: int = 256, progress: ProgressFn | None = None,
            rank: int = 0, world: int = 1, strategy: Strategy = "fast", split: str = "val") -> dict[str, Any]:
    """The sensitivity report body for `model` (left untouched), measured on `data`.

    `data` may be a function returning the dataset: it is called only once the model and the
    recipe have been checked, so a bad request fails before any data is loaded. With `world > 1`
    (torch.distributed initialised) each process measures its share of the cells and all of them
    return the same, complete report. `strategy="naive"` prunes a fresh copy per cell (the
    reference the fast engine must match); "restore" prunes and restores one copy but runs full
    forwards; "cache" adds the cached activations but not the channel selection; "fast" is all of it
    (Winograd convolutions included when `config.winograd`).
    """
    start = time.perf_counter()
    meta = meta_of(model)
    input_shape = tuple(meta.input_shape)
    device = torch.device(device)
    work = copy.deepcopy(model).to(device).eval()
    plan = plan_analysis(work, config, input_shape)
    batch_size = config.batch_size or batch_size
    batches = _batches(data() if callable(data) else data, batch_size, device, config.channels_last)
    layer_macs = count_macs(work, input_shape)
    fingerprint = model_fingerprint(meta.arch, plan.graph)
    full_groups = [[g.name, g.width] for g in plan.graph.all_groups]
    layer_info = [_layer_info(work, plan, name, layer_macs) for name in plan.layers]
    if config.channels_last:
        work.to(memory_format=torch.channels_last)  # after scoring: scores must not depend on memory layout

    engine = _Engine(work, plan, config, batches, layer_macs, input_shape, strategy, model)
    jobs = _distinct_jobs(plan)
    mine = _share(jobs, engine.cost, world)[rank]
    measured = engine.run(mine, progress)
    baseline = engine.baseline()
    for key, value in measured.items():
        if value is _UNPRUNED:
            measured[key] = {**_as_cell(baseline), **engine.unpruned_size}
    work_gmacs = (sum(engine.cost(j) for j in jobs) + engine.total_macs) * baseline.samples / 1e9
    stats, fallbacks = dict(engine.stats), set(engine.fallbacks)
    stats["winograd_convs"] = engine.convs.calls if engine.convs is not None else 0  # summed over ranks below
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, (measured, stats, fallbacks))
        measured = {key: value for part, _, _ in gathered for key, value in part.items()}
        stats = {key: sum(part[key] for _, part, _ in gathered) for key in stats}
        fallbacks = set().union(*(part for _, _, part in gathered))
    seconds = time.perf_counter() - start
    body = _report(meta, model, plan, config, baseline, measured, layer_info, fingerprint, full_groups, layer_macs,
                   split)
    body["timing"] = {"seconds": seconds, "cells": len(plan.cells), "evaluations": len(jobs),
                      "seconds_per_cell": seconds / len(plan.cells), "processes": world,
                      "threads_per_process": torch.get_num_threads(), "strategy": strategy, "batch_size": batch_size,
                      "channels_last": config.channels_last, "work_gmacs": work_gmacs,
                      "prefix_cache": engine.trace is not None, "fallback_layers": sorted(fallbacks),
                      "winograd": engine.convs is not None, "winograd_convs": stats.pop("winograd_convs"),
                      "evaluations_by_route": stats}
    return body


def _layer_info(model: nn.Module, plan: Plan, name: str, macs: dict[str, int]) -> dict[str, Any]:
    group = plan.graph.group(name)
    module = model.get_submodule(name)
    return {"name": name, "type": group.layer_type, "width": plan.widths[name],
            "params": sum(p.numel() for p in module.parameters()), "macs": macs.get(name, 0),
            "members": list(group.members)}


def _report(meta: Any, model: nn.Module, plan: Plan, config: AnalyzeSection, baseline: EvalResult,
            measured: dict[tuple[str, int], dict[str, Any]], layer_info: list[dict[str, Any]], fingerprint: str,
            full_groups: list[list[Any]], layer_macs: dict[str, int], split: str) -> dict[str, Any]:
    layers = []
    for info in layer_info:
        cells = []
        for cell in (c for c in plan.cells if c.layer == info["name"]):
            result = measured[(cell.layer, cell.removed)]
            cells.append({"ratio": cell.ratio, "removed": cell.removed, **result})
        drops = [baseline.top1 - c["top1"] for c in cells]
        layers.append({**info, "cells": cells, "sensitivity": sum(drops) / len(drops),
                       "loss_increase": sum(c["loss"] - baseline.loss for c in cells) / len(cells),
                       "suggested_ratio": suggested_ratio(cells, baseline.top1, config.budget)})
    return {
        "model": {"arch": meta.arch, "fingerprint": fingerprint, "groups": full_groups,
                  "checkpoint_sha256": meta.file_sha256, "params": sum(p.numel() for p in model.parameters()),
                  "macs": sum(layer_macs.values())},
        "dataset": meta.dataset,
        "criterion": config.criterion,
        "granularity": config.granularity,
        "ratios": list(config.ratios),
        "samples": baseline.samples,
        "split": split,
        "seed": config.seed,
        "baseline": baseline.as_dict(),
        "budget": config.budget,
        "layers": layers,
        "order": sensitivity_order(layers),
    }


def suggested_ratio(cells: list[dict[str, Any]], baseline_top1: float, budget: float) -> float:
    """Largest grid ratio whose top-1 drop stays within the budget; 0 when none does."""
    ok = [c["ratio"] for c in cells if baseline_top1 - c["top1"] <= budget + 1e-12]
    return max(ok) if ok else 0.0


def sensitivity_order(layers: list[dict[str, Any]]) -> list[str]:
    """Least sensitive first (the paper's out-of-order pruning); ties by loss increase, then model order."""
    ranked = sorted(enumerate(layers), key=lambda item: (item[1]["sensitivity"], item[1]["loss_increase"], item[0]))
    return [layer["name"] for _, layer in ranked]


# ----------------------------------------------------------------------------- evaluation


Batches = list[tuple[torch.Tensor, torch.Tensor]]


def _batches(dataset: Dataset, batch_size: int, device: torch.device, channels_last: bool) -> Batches:
    """The evaluation data, loaded once for all cells (same batches as `training.evaluate` would see)."""
    out = []
    for inputs, targets in make_loader(dataset, batch_size):
        inputs = inputs.to(device)
        if channels_last and inputs.dim() == 4:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        out.append((inputs, targets.to(device)))
    if not out:
        raise DnnpruneError("the evaluation split is empty; check the dataset and --samples")
    return out


class _Tally:
    """Accumulates exactly as `training.evaluate` does, so both give the same numbers."""

    def __init__(self) -> None:
        self.correct1 = self.correct5 = self.total = self.num_classes = 0
        self.loss_sum = 0.0

    def add(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        self.num_classes = logits.shape[1]
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        topk = logits.topk(min(5, self.num_classes), dim=1).indices
        self.correct1 += (topk[:, 0] == targets).sum().item()
        self.correct5 += (topk == targets[:, None]).any(dim=1).sum().item()
        self.total += targets.numel()

    def result(self) -> EvalResult:
        top5 = self.correct5 / self.total if self.num_classes > 5 else None
        return EvalResult(self.correct1 / self.total, top5, self.loss_sum / self.total, self.total)


def _evaluate(forward: Callable[[torch.Tensor], torch.Tensor], batches: Batches,
              inputs: Callable[[int], torch.Tensor] | None = None) -> EvalResult:
    """Batch i is fed `inputs(i)` when given (built from a cached activation), else its images."""
    tally = _Tally()
    with torch.inference_mode():
        for i, (x, y) in enumerate(batches):
            tally.add(forward(x if inputs is None else inputs(i)), y)
    return tally.result()


# ----------------------------------------------------------------------------- prune and restore


class _Snapshot:
    """Everything in-place pruning may change (module attributes, parameter slots, the graph's maps)."""

    def __init__(self, graph: ChannelGraph) -> None:
        dg = graph.graph
        modules = {id(m): m for m in graph.model.modules()}
        modules.update({id(m): m for m in dg.module2node if isinstance(m, nn.Module)})
        self.modules = [(m, _module_state(m)) for m in modules.values()]
        self.objects = [(obj, _shallow(vars(obj))) for obj in (dg, graph)]
        self.nodes = [(node, node.module) for node in dg.module2node.values()]

    def restore(self) -> None:
        for module, state in self.modules:
            module.__dict__.clear()
            module.__dict__.update(_module_state(state, fresh=False))
        for obj, state in self.objects:
            obj.__dict__.clear()
            obj.__dict__.update(_shallow(state))
        for node, module in self.nodes:
            node.module = module


def _shallow(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.copy() if isinstance(v, (dict, list, set)) else v) for k, v in state.items()}


def _module_state(source: Any, fresh: bool = True) -> dict[str, Any]:
    """A shallow copy of a module's __dict__ whose parameter/buffer/module tables are copies too."""
    state = dict(vars(source)) if fresh else dict(source)
    for key in ("_parameters", "_buffers", "_modules"):
        if key in state:
            state[key] = type(state[key])(state[key])
    return state


# ----------------------------------------------------------------------------- the traced model


_CHANNELWISE = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid,
                nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d,
                nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxPool1d, nn.AvgPool1d)
_FRESH = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm)


@dataclass(frozen=True)
class _Route:
    """Where a layer's cells start: the cached activation at `start`; with `select`, the activation at
    `select` with the removed channels dropped (exact when the layers in between act channel by channel)."""

    start: int
    select: int | None = None


class _Trace:
    """The model as an fx graph, and the points where a single activation carries everything forward."""

    def __init__(self, model: nn.Module, input_shape: Sequence[int], device: torch.device) -> None:
        self.model = model
        self.module = torch.fx.symbolic_trace(model)
        self.nodes = list(self.module.graph.nodes)
        if sum(n.op == "placeholder" for n in self.nodes) != 1 or self.nodes[0].op != "placeholder":
            raise _NoTrace("the model takes more than one input")
        self.pos = {n: i for i, n in enumerate(self.nodes)}
        last = {n: max((self.pos[u] for u in n.users), default=self.pos[n]) for n in self.nodes}
        self.release: list[list[torch.fx.Node]] = [[] for _ in self.nodes]  # values no longer needed after node i
        for n, i in last.items():
            if n.op != "get_attr" and i > self.pos[n]:
                self.release[i].append(n)
        self.cuts = self._cuts(last)
        self.mutates = any(_maybe_inplace(model, n) for n in self.nodes)
        self.relu_in_place = {i for i, n in enumerate(self.nodes) if self._can_relu_in_place(n)}
        self.numel = self._numel(input_shape, device)

    def _cuts(self, last: dict[torch.fx.Node, int]) -> list[int]:
        cuts: list[int] = []
        live: set[torch.fx.Node] = set()
        for i, node in enumerate(self.nodes):
            if node.op == "output":
                break
            if node.op != "get_attr" and last[node] > i:
                live.add(node)
            live -= {n for n in live if last[n] <= i}
            if live == {node}:
                cuts.append(i)
        return cuts

    def _can_relu_in_place(self, node: torch.fx.Node) -> bool:
        """A ReLU whose input is a fresh conv/BN/linear output used nowhere else: same values, no new tensor."""
        if node.op != "call_module" or type(self.model.get_submodule(str(node.target))) is not nn.ReLU:
            return False
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], torch.fx.Node):
            return False
        source = node.args[0]
        return (source.op == "call_module" and len(source.users) == 1
                and isinstance(self.model.get_submodule(str(source.target)), _FRESH))

    def _numel(self, input_shape: Sequence[int], device: torch.device) -> dict[int, int]:
        """Elements per sample of each cut's activation."""
        sizes: dict[int, int] = {}
        with torch.inference_mode():
            self.run(0, torch.zeros(1, *input_shape, device=device), record=sizes)
        return sizes

    def route(self, members: Sequence[str], root: str) -> _Route:
        """The latest cut before the first node pruning changes, and where channel selection can start."""
        def touches(target: str) -> bool:
            return any(target == m or target.startswith(m + ".") or m.startswith(target + ".") for m in members)

        found = []
        for node in self.nodes:
            if node.op == "call_module" and touches(str(node.target)):
                found.append(self.pos[node])
            elif node.op == "get_attr" and touches(str(node.target)):
                found.extend(self.pos[u] for u in node.users)
        if not found:
            return _Route(0)
        first = min(found)
        start = max((c for c in self.cuts if c < first), default=0)
        return _Route(start, self._selection_point(self.nodes[first], root, set(members)))

    def _selection_point(self, node: torch.fx.Node, root: str, members: set[str]) -> int | None:
        """The node before the first layer that mixes the pruned channels, if only channel-wise layers lead there."""
        if node.op != "call_module" or str(node.target) != root:
            return None
        while True:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module":
                return None
            user = users[0]
            module = self.model.get_submodule(str(user.target))
            if str(user.target) in members and not isinstance(module, _CHANNELWISE):
                index = self.pos[node]
                return index if index in self.cuts and list(user.args) == [node] and not user.kwargs else None
            if not isinstance(module, _CHANNELWISE):
                return None
            node = user

    def run(self, start: int, value: torch.Tensor, stop: int | None = None,
            record: dict[int, int] | None = None, convs: WinogradConvs | None = None) -> torch.Tensor:
        """Execute the nodes after `start` given its value; the value at `stop`, else the output.
        With `convs`, eligible convolutions run as Winograd (equal to float rounding, not bit for bit)."""
        env: dict[torch.fx.Node, Any] = {self.nodes[start]: value}
        start_node = self.nodes[start]
        cuts = set(self.cuts) if record is not None else set()

        def load(node: torch.fx.Node) -> Any:
            if node not in env and node.op == "get_attr":
                env[node] = _fetch(self.model, self.module, str(node.target))
            return env[node]

        for i in range(start + 1, len(self.nodes)):
            node = self.nodes[i]
            if node.op == "output":
                return torch.fx.node.map_arg(node.args[0], load)
            if node.op == "get_attr":
                continue
            args = torch.fx.node.map_arg(node.args, load)
            kwargs = torch.fx.node.map_arg(node.kwargs, load)
            if i in self.relu_in_place and node.args[0] is not start_node:
                env[node] = torch.relu_(args[0])
            elif node.op == "call_module":
                module = self.model.get_submodule(str(node.target))
                if convs is not None and isinstance(module, nn.Conv2d) and len(args) == 1 and not kwargs:
                    env[node] = convs(module, args[0])
                else:
                    env[node] = module(*args, **kwargs)
            elif node.op == "call_function":
                env[node] = node.target(*args, **kwargs)  # type: ignore[operator]
            elif node.op == "call_method":
                env[node] = getattr(args[0], str(node.target))(*args[1:], **kwargs)
            else:
                raise _NoTrace(f"unexpected fx node {node.op}")
            if i in cuts and isinstance(env[node], torch.Tensor):
                record[i] = env[node][0].numel()  # type: ignore[index]
            if i == stop:
                return env[node]
            for gone in self.release[i]:
                env.pop(gone, None)
        raise _NoTrace("the traced graph has no output")


class _NoTrace(Exception):
    pass


def _fetch(model: nn.Module, traced: nn.Module, target: str) -> Any:
    """Live attributes come from the model (pruning replaces them); fx's own constants from the trace."""
    for root in (model, traced):
        value: Any = root
        try:
            for part in target.split("."):
                value = getattr(value, part)
        except AttributeError:
            continue
        return value
    raise _NoTrace(f"fx attribute {target} not found")


def _maybe_inplace(model: nn.Module, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return bool(getattr(model.get_submodule(str(node.target)), "inplace", False))
    if node.kwargs.get("inplace"):
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return node.op in ("call_method", "call_function") and (name.endswith("_") and not name.endswith("__")
                                                             or name.startswith("__i"))


def _select(value: torch.Tensor, keep: torch.Tensor, like: torch.Tensor | None = None) -> torch.Tensor:
    out = value.index_select(1, keep)
    channels_last = like.is_contiguous(memory_format=torch.channels_last) if like is not None else (
        value.dim() == 4 and value.is_contiguous(memory_format=torch.channels_last))
    if out.dim() == 4 and channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


# ----------------------------------------------------------------------------- the engine


@dataclass(frozen=True)
class _Job:
    """One distinct evaluation: ratios that remove the same number of channels share it."""

    layer: str
    removed: int
    indices: tuple[int, ...]


def _distinct_jobs(plan: Plan) -> list[_Job]:
    seen: dict[tuple[str, int], _Job] = {}
    for cell in plan.cells:
        seen.setdefault((cell.layer, cell.removed), _Job(cell.layer, cell.removed,
                                                         tuple(plan.indices[(cell.layer, cell.ratio)])))
    return list(seen.values())


def _share(jobs: list[_Job], cost: Callable[[_Job], float], world: int) -> list[list[_Job]]:
    """Longest-processing-time-first split: deterministic, so every process agrees on it."""
    shares: list[list[_Job]] = [[] for _ in range(world)]
    load = [0.0] * world
    for job in sorted(jobs, key=lambda j: (-cost(j), j.layer, j.removed)):
        target = min(range(world), key=lambda r: (load[r], r))
        shares[target].append(job)
        load[target] += cost(job)
    return shares


_UNPRUNED = object()


class _Cache:
    """The activation at one position of the trace, for every batch, moved forward only."""

    def __init__(self, batches: Batches) -> None:
        self.at = 0
        self.values = [x for x, _ in batches]


class _Engine:
    """Measures cells on one working copy: prune, evaluate from the cached activation, restore."""

    def __init__(self, work: nn.Module, plan: Plan, config: AnalyzeSection, batches: Batches, macs: dict[str, int],
                 input_shape: Sequence[int], strategy: Strategy, original: nn.Module) -> None:
        self.work, self.plan, self.config, self.batches, self.macs = work, plan, config, batches, macs
        self.input_shape, self.strategy, self.original = tuple(input_shape), strategy, original
        self.unpruned_size = _size(work, input_shape)
        self.dims = {name: _dims(work.get_submodule(name)) for name in macs}
        self.cache = _Cache(batches)
        self.total_macs = max(1, sum(macs.values()))
        self.samples = sum(len(y) for _, y in batches)
        self.fallbacks: set[str] = set()
        self.guarded: set[str] = set()
        self.stats = {"selected": 0, "from_cache": 0, "full": 0}
        self.trace: _Trace | None = None
        self.convs = WinogradConvs() if config.winograd and strategy == "fast" else None
        if strategy in ("fast", "cache"):
            try:
                self.trace = _Trace(work, input_shape, batches[0][0].device)
            except Exception:  # noqa: BLE001 - anything fx cannot trace is evaluated with full forwards
                self.trace = None
        self.routes = {name: self._route(name) for name in plan.layers}

    def _route(self, layer: str) -> _Route:
        if self.trace is None:
            return _Route(0)
        group = self.plan.graph.group(layer)
        route = self.trace.route(group.members, group.name)
        return route if self.strategy == "fast" else _Route(route.start)

    def cost(self, job: _Job) -> float:
        """Estimated MACs of one evaluation (the part after its start, the pruned layers shrunk)."""
        group = self.plan.graph.group(job.layer)
        keep = 1.0 - job.removed / max(1, self.plan.widths[job.layer])
        if self.trace is None:
            return sum(m * (keep if n in group.members else 1.0) for n, m in self.macs.items())
        route = self.routes[job.layer]
        begin = route.select if route.select is not None else route.start
        total = 0.0
        for node in self.trace.nodes[begin + 1:]:
            if node.op == "call_module" and str(node.target) in self.macs:
                total += self.macs[str(node.target)] * (keep if str(node.target) in group.members else 1.0)
        return total

    def run(self, jobs: list[_Job], progress: ProgressFn | None) -> dict[tuple[str, int], dict[str, Any]]:
        total = sum(self.cost(j) for j in jobs) / self.total_macs
        done = 0.0
        results: dict[tuple[str, int], dict[str, Any]] = {}
        order = {name: i for i, name in enumerate(self.plan.layers)}
        jobs = sorted(jobs, key=lambda j: (self.routes[j.layer].start, order[j.layer], j.removed))
        starts = [self.routes[j.layer].start for j in jobs]
        cache = self.cache
        probes: dict[int, torch.Tensor] = {}
        if progress is not None:
            progress(0.0, total, f"0/{len(jobs)} cells")
        for index, job in enumerate(jobs):
            if job.removed == 0:
                results[(job.layer, 0)] = _UNPRUNED  # type: ignore[assignment]  # the baseline, known at the end
            elif self.strategy == "naive":
                results[(job.layer, job.removed)] = self._naive(job)
            else:
                if self.trace is not None and (index == 0 or jobs[index - 1].layer != job.layer):
                    later = min((s for s, j in zip(starts[index:], jobs[index:]) if j.layer != job.layer),
                                default=len(self.trace.nodes))
                    probes = self._prepare(job.layer, cache, later)
                results[(job.layer, job.removed)] = self._measure(job, cache, probes)
            done += self.cost(job) / self.total_macs
            if progress is not None:
                progress(done, total, f"{index + 1}/{len(jobs)} cells")
        return results

    def _pruned_size(self) -> dict[str, int]:
        """Parameters and MACs of the pruned working copy without a forward pass: channel pruning
        leaves every spatial size alone, so each layer's MACs scale with outputs x inputs per output."""
        macs = 0
        for name, base in self.macs.items():
            out, per = self.dims[name]
            new_out, new_per = _dims(self.work.get_submodule(name))
            macs += base // (out * per) * new_out * new_per if out * per else base
        return {"params": sum(p.numel() for p in self.work.parameters()), "macs": macs}

    def baseline(self) -> EvalResult:
        """The unpruned model's numbers: the cached activations finish their forward pass (cheap, since
        the cells already paid for the prefix) when that gives exactly what the eager model gives."""
        trace, cache = self.trace, self.cache
        if trace is not None and self.strategy != "naive":
            with torch.inference_mode():
                first = trace.run(cache.at, cache.values[0].clone() if trace.mutates else cache.values[0])
                if isinstance(first, torch.Tensor) and torch.equal(first, self.work(self.batches[0][0])):
                    rest = [trace.run(cache.at, v.clone() if trace.mutates else v) for v in cache.values[1:]]
                    tally = _Tally()
                    for logits, (_, targets) in zip([first, *rest], self.batches):
                        tally.add(logits, targets)
                    return tally.result()
        return _evaluate(self.work, self.batches)

    def _prepare(self, layer: str, cache: _Cache, later: int) -> dict[int, torch.Tensor]:
        """Bring the cache to the layer's start (or its selection point); keep what checking a selection needs."""
        route = self.routes[layer]
        self._advance(cache, route.start)
        if route.select is None or cache.at != route.start or route.select > later:
            return {}
        probes = {i: cache.values[i] for i in {0, len(self.batches) - 1}}
        if not self._advance(cache, route.select):
            return {}
        return probes

    def _require_trace(self) -> Any:
        if self.trace is None:
            raise RuntimeError("the fast engine was used without a traced model")
        return self.trace

    def _advance(self, cache: _Cache, target: int) -> bool:
        """Move the cached activation forward to `target` unless it would not fit in memory."""
        trace = self._require_trace()
        if target == cache.at:
            return True
        if target < cache.at:
            return False
        size = trace.numel.get(target, 0) * self.samples * self.batches[0][0].element_size()
        if size > CACHE_BYTES:
            return False
        with torch.inference_mode():
            cache.values = [trace.run(cache.at, value, stop=target) for value in cache.values]
        cache.at = target
        return True

    def _measure(self, job: _Job, cache: _Cache, probes: dict[int, torch.Tensor]) -> dict[str, Any]:
        snapshot = _Snapshot(self.plan.graph)
        try:
            idxs = list(job.indices)
            with torch.no_grad():
                self.plan.graph.prune({job.layer: idxs})
            if self.config.channels_last:
                for name in self.plan.graph.group(job.layer).members:
                    self.work.get_submodule(name).to(memory_format=torch.channels_last)
            size = self._pruned_size()
            return {**_as_cell(self._evaluate_pruned(job, idxs, cache, probes)), **size}
        finally:
            snapshot.restore()

    def _evaluate_pruned(self, job: _Job, idxs: list[int], cache: _Cache,
                         probes: dict[int, torch.Tensor]) -> EvalResult:
        trace, route = self.trace, self.routes[job.layer]
        if trace is None or job.layer in self.fallbacks:
            self.stats["full"] += 1
            return _evaluate(self.work, self.batches)
        if probes and cache.at == route.select:
            width = self.plan.widths[job.layer]
            removed = set(idxs)
            keep = torch.tensor([i for i in range(width) if i not in removed], device=cache.values[0].device)
            if self._selection_exact(route, keep, cache, probes) and self._guard(
                    job.layer, cache.at, _select(cache.values[0][:_GUARD_SAMPLES], keep)):
                self.stats["selected"] += 1
                return _evaluate(lambda x: trace.run(cache.at, x, convs=self.convs), self.batches,
                                 lambda i: _select(cache.values[i], keep))
        elif cache.at <= route.start and self._guard(job.layer, cache.at, cache.values[0]):
            self.stats["from_cache"] += 1
            return _evaluate(lambda x: trace.run(cache.at, x, convs=self.convs), self.batches,
                             lambda i: cache.values[i].clone() if trace.mutates else cache.values[i])
        self.stats["full"] += 1
        return _evaluate(self.work, self.batches)

    def _selection_exact(self, route: _Route, keep: torch.Tensor, cache: _Cache,
                         probes: dict[int, torch.Tensor]) -> bool:
        """Dropping channels of the unpruned activation must equal the pruned layers' output, bit for bit."""
        self._require_trace()
        if route.select is None:
            raise RuntimeError("channel selection was asked for a route without a selection point")
        with torch.inference_mode():
            for i, value in probes.items():
                real = self.trace.run(route.start, value, stop=route.select)
                chosen = _select(cache.values[i], keep, like=real)
                if real.stride() != chosen.stride() or not torch.equal(real, chosen):
                    return False
        return True

    def _guard(self, layer: str, start: int, first: torch.Tensor) -> bool:
        """Once per layer: does the traced run agree with the real pruned model?"""
        self._require_trace()
        if layer in self.guarded:
            return layer not in self.fallbacks
        self.guarded.add(layer)
        x = self.batches[0][0][:_GUARD_SAMPLES]
        with torch.inference_mode():
            expected = self.work(x)
            try:
                got = self.trace.run(start, first[:_GUARD_SAMPLES].clone(), convs=self.convs)
                ok = (isinstance(got, torch.Tensor) and got.shape == expected.shape
                      and torch.allclose(got, expected, rtol=1e-3, atol=1e-4))
            except (RuntimeError, TypeError, ValueError, IndexError, _NoTrace):
                ok = False
        if not ok:
            self.fallbacks.add(layer)
        return ok

    def _naive(self, job: _Job) -> dict[str, Any]:
        """The reference: a fresh copy, a fresh graph, a real prune, a full evaluation."""
        model = copy.deepcopy(self.original).to(self.batches[0][0].device).eval()
        graph = ChannelGraph(model, self.input_shape)
        scores = graph.importance(job.layer, self.config.criterion, seed=self.config.seed)
        with torch.no_grad():
            graph.prune({job.layer: graph.choose(job.layer, scores, job.removed)})
        if self.config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.stats["full"] += 1
        return {**_as_cell(_evaluate(model, self.batches)), **_size(model, self.input_shape)}


def _as_cell(result: EvalResult) -> dict[str, Any]:
    return {"top1": result.top1, "top5": result.top5, "loss": result.loss}


def _dims(module: nn.Module) -> tuple[int, int]:
    """(outputs, inputs per output) of a conv/linear: its MACs are proportional to their product."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    return module.out_channels, module.in_channels // module.groups  # type: ignore[operator]


def _size(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "macs": sum(count_macs(model, tuple(input_shape)).values())}


# ----------------------------------------------------------------------------- statistics


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation, ties given their average rank."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("spearman needs two sequences of the same length, at least 2")
    ra, rb = _ranks(a), _ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    va = sum((x - ma) ** 2 for x in ra)
    vb = sum((y - mb) ** 2 for y in rb)
    return cov / math.sqrt(va * vb) if va and vb else float("nan")


def _ranks(values: Sequence[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


# ----------------------------------------------------------------------------- outputs


def output_paths(json_path: Path) -> dict[str, Path]:
    """The JSON report plus its CSV grid and PNG plot, side by side."""
    return {"json": json_path, "csv": json_path.with_suffix(".csv"), "png": json_path.with_suffix(".png")}


def grid_csv(report: dict[str, Any]) -> str:
    lines = ["layer,ratio,removed,top1,top5,loss,params,macs"]
    for layer in report["layers"]:
        for c in layer["cells"]:
            top5 = "" if c.get("top5") is None else repr(c["top5"])
            lines.append(f"{layer['name']},{c['ratio']!r},{c['removed']},{c['top1']!r},{top5},{c['loss']!r},"
                         f"{c['params']},{c['macs']}")
    return "\n".join(lines) + "\n"


def plot_png(report: dict[str, Any]) -> bytes:
    """Accuracy vs ratio, one line per layer (no pyplot: no global state, no display needed)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = report["layers"]
    fig = Figure(figsize=(9, 5.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    base = report["baseline"]["top1"] * 100
    cmap = matplotlib.colormaps["tab20"]
    markers = "osD^v<>ph*"
    for i, layer in enumerate(layers):
        xs = [0.0] + [c["ratio"] for c in layer["cells"]]
        ys = [base] + [c["top1"] * 100 for c in layer["cells"]]
        ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=3.5, linewidth=1.3,
                color=cmap(i % 20), label=layer["name"])
    ax.axhline(base - report["budget"] * 100, color="grey", linestyle="--", linewidth=1,
               label=f"budget: {report['budget'] * 100:g} pt below baseline")
    ax.set_xlabel("fraction of channels removed from the layer (pruned alone, no fine-tuning)")
    ax.set_ylabel(f"top-1 accuracy on {report['samples']} {report['split']} samples (%)")
    ax.set_title(f"{report['model']['arch']}: sensitivity to pruning ({report['criterion']} criterion)")
    ax.set_xlim(0, 1)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=7, ncol=1 if len(layers) <= 22 else 2)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def write_outputs(report: dict[str, Any], json_path: Path) -> dict[str, Path]:
    """JSON, CSV and PNG, each written atomically; everything is rendered before anything is written."""
    paths = output_paths(Path(json_path))
    csv_bytes, png_bytes = grid_csv(report).encode(), plot_png(report)
    write_report(paths["json"], report)
    atomic_write_bytes(paths["csv"], csv_bytes)
    atomic_write_bytes(paths["png"], png_bytes)
    return paths


# ----------------------------------------------------------------------------- process setup


def tune_malloc() -> bool:
    """Let glibc keep freed activation memory instead of returning it to the OS after every layer.

    Each cell allocates the same large activations thousands of times; with glibc's defaults the
    big ones are fresh mmaps whose page faults cost ~10% of an analysis on a VM. Process-wide, so
    only the command-line entry (which owns the process) calls it. False where glibc is absent.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name or not name.startswith("libc.so"):
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    return all([mallopt(m_mmap_threshold, 32 << 20) == 1, mallopt(m_trim_threshold, 1 << 30) == 1,
                mallopt(m_top_pad, 64 << 20) == 1])


# ----------------------------------------------------------------------------- torchrun


def distributed_env() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(world: int) -> bool:
    """Join torchrun's process group (gloo: cells are gathered as Python objects); True if we started it."""
    if world <= 1 or not torch.distributed.is_available() or torch.distributed.is_initialized():
        return False
    torch.distributed.init_process_group("gloo")
    return True


def leave_distributed(completed: bool) -> None:
    """Destroy the process group; after a completed run only once every process is done with it:
    gloo torn down on one side while the other still holds its connection can abort the other."""
    if completed:
        torch.distributed.barrier()
    torch.distributed.destroy_process_group()
