"""Filter granularity (Li et al. 2017): prune each channel group alone over a ratio grid, measure.

Every cell is one (layer, ratio) pair: the group's lowest-scored channels are removed from the
model and the result is evaluated on the validation data. The numbers are those of a freshly
pruned copy (`strategy="naive"` computes them that way, and tests compare the two: exactly, or to
float rounding with Winograd convolutions), but the default engine gets there much faster:

* the evaluation batches are built once; channels-last layout (faster convolutions on CPU);
* one working copy is pruned in place and restored after each cell (`ChannelGraph.snapshot`: no
  copy, no re-tracing);
* a cell only recomputes the part of the network its pruning changes: the model is traced with
  torch.fx (`trace.Trace`), cut where one activation carries everything forward, and the activation
  entering a group's first affected layer is cached once for all ratios (models fx cannot trace, or
  where a traced run disagrees with the real one, fall back to full forwards);
* where only channel-wise layers (BN, ReLU, pooling) separate the pruned conv from the next one,
  the cell starts after them from the unpruned activation with the removed channels dropped
  (checked bit for bit against the pruned layers on the first batch of every cell);
* with `winograd` (the default), the cells run 3x3 convolutions on small feature maps as Winograd
  F(2x2, 3x3) (`dnnprune.winograd`): 2.25x fewer multiplications, results equal to float rounding;
  the cached activations, the selection checks and the baseline keep the direct convolution;
* the baseline is the cached activations finishing their forward pass at the end;
* under `torchrun`, cells are shared out across processes by estimated cost and gathered again
  (`dnnprune.distributed`), so every process ends up with the same measurement.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from dnnprune.analysis.measurement import (
    Batches,
    MeasuredCell,
    MeasuredLayer,
    Measurement,
    evaluate_batches,
)
from dnnprune.analysis.plan import Plan, plan_analysis
from dnnprune.analysis.trace import NoTrace, Route, Trace, select_channels
from dnnprune.checkpoint import meta_of
from dnnprune.distributed import gather, share_by_cost
from dnnprune.metrics import count_macs
from dnnprune.observe import Observer
from dnnprune.recipe import AnalyzeSection
from dnnprune.surgery import ChannelGraph, model_fingerprint
from dnnprune.tasks import Metrics, Task
from dnnprune.winograd import WinogradConvs

Strategy = Literal["fast", "cache", "restore", "naive"]
"""`naive` prunes a fresh copy per cell (the reference); `restore` prunes and restores one copy with full
forwards; `cache` adds the cached activations; `fast` adds channel selection and Winograd convolutions."""

CACHE_BYTES = 2 << 30  # at most this much cached activation per process; beyond it a cell starts earlier
_GUARD_SAMPLES = 8


@dataclass(frozen=True)
class Job:
    """One distinct evaluation: ratios that remove the same number of channels share it."""

    layer: str
    removed: int
    indices: tuple[int, ...]


@dataclass
class _Outcome:
    """A job's result; `metrics` is None for a job that removes nothing (the baseline, measured at the end)."""

    metrics: Metrics | None
    params: int
    macs: int


def distinct_jobs(plan: Plan) -> list[Job]:
    seen: dict[tuple[str, int], Job] = {}
    for cell in plan.cells:
        seen.setdefault((cell.layer, cell.removed),
                        Job(cell.layer, cell.removed, tuple(plan.indices[(cell.layer, cell.ratio)])))
    return list(seen.values())


class FilterAnalysis:
    """The channel-group engine; building it validates the request against the model (no data needed)."""

    def __init__(self, model: nn.Module, section: AnalyzeSection, device: torch.device,
                 strategy: Strategy = "fast") -> None:
        meta = meta_of(model)
        self.input_shape = tuple(meta.input_shape)
        self.section, self.strategy, self.original = section, strategy, model
        self.work = copy.deepcopy(model).to(device).eval()
        self.plan = plan_analysis(self.work, section, self.input_shape)
        self.fingerprint = model_fingerprint(meta.arch, self.plan.graph)
        self.groups = [(g.name, g.width) for g in self.plan.graph.all_groups]

    def measure(self, batches: Batches, task: Task, observer: Observer, *, rank: int = 0,
                world: int = 1) -> Measurement:
        """Measure this process's share of the cells; every process returns the complete measurement."""
        engine = self._engine(batches, task)
        jobs = distinct_jobs(self.plan)
        mine = share_by_cost(jobs, engine.cost, world, key=lambda j: (j.layer, j.removed))[rank]
        outcomes = engine.run(mine, observer, "analyze" + (f" (rank {rank} of {world})" if world > 1 else ""))
        baseline = engine.baseline()
        parts = gather((outcomes, engine.counters()), world)
        outcomes = {key: value for part, _ in parts for key, value in part.items()}
        layers = [self._layer(name, engine.macs, outcomes, baseline) for name in self.plan.layers]
        return Measurement(baseline=baseline, layers=layers, fingerprint=self.fingerprint, groups=self.groups,
                           params=sum(p.numel() for p in self.original.parameters()),
                           macs=sum(engine.macs.values()), evaluations=len(jobs),
                           engine=self._engine_info(engine, jobs, [c for _, c in parts], baseline.samples))

    def _engine(self, batches: Batches, task: Task) -> _Engine:
        macs = count_macs(self.work, self.input_shape)
        if self.section.channels_last:
            self.work.to(memory_format=torch.channels_last)  # after scoring: scores must not depend on memory layout
        return _Engine(self.work, self.plan, self.section, batches, macs, self.input_shape, self.strategy,
                       self.original, task)

    def _engine_info(self, engine: _Engine, jobs: list[Job], counters: list[dict[str, Any]],
                     samples: int) -> dict[str, Any]:
        """The report's timing fields of this engine, summed over processes."""
        routes = {key: sum(c["evaluations_by_route"][key] for c in counters) for key in engine.routes_taken}
        return {"strategy": self.strategy, "channels_last": self.section.channels_last,
                "work_gmacs": (sum(engine.cost(j) for j in jobs) + engine.total_macs) * samples / 1e9,
                "prefix_cache": engine.trace is not None,
                "fallback_layers": sorted(set().union(*(c["fallbacks"] for c in counters))),
                "winograd": engine.convs is not None, "winograd_convs": sum(c["winograd_convs"] for c in counters),
                "evaluations_by_route": routes}

    def _layer(self, name: str, macs: dict[str, int], outcomes: dict[tuple[str, int], _Outcome],
               baseline: Metrics) -> MeasuredLayer:
        group = self.plan.graph.group(name)
        cells = [_cell(c.ratio, c.removed, outcomes[(name, c.removed)], baseline) for c in self.plan.cells
                 if c.layer == name]
        return MeasuredLayer(name=name, type=group.layer_type, width=self.plan.widths[name],
                             params=sum(p.numel() for p in self.work.get_submodule(name).parameters()),
                             macs=macs.get(name, 0), members=list(group.members), cells=cells)


def _cell(ratio: float, removed: int, outcome: _Outcome, baseline: Metrics) -> MeasuredCell:
    metrics = baseline if outcome.metrics is None else outcome.metrics
    return MeasuredCell(ratio=ratio, removed=removed, metrics=metrics, params=outcome.params, macs=outcome.macs)


class _Cache:
    """The activation at one position of the trace, for every batch, moved forward only."""

    def __init__(self, batches: Batches) -> None:
        self.at = 0
        self.values = [x for x, _ in batches]


class _Engine:
    """Measures cells on one working copy: prune, evaluate from the cached activation, restore."""

    def __init__(self, work: nn.Module, plan: Plan, section: AnalyzeSection, batches: Batches, macs: dict[str, int],
                 input_shape: Sequence[int], strategy: Strategy, original: nn.Module, task: Task) -> None:
        self.work, self.plan, self.section, self.batches, self.macs = work, plan, section, batches, macs
        self.input_shape, self.strategy, self.original, self.task = tuple(input_shape), strategy, original, task
        self.unpruned_size = _size(work, input_shape)
        self.dims = {name: dims for name in macs if (dims := _dims(work.get_submodule(name))) is not None}
        self.cache = _Cache(batches)
        self.total_macs = max(1, sum(macs.values()))
        self.samples = sum(len(y) for _, y in batches)
        self.fallbacks: set[str] = set()
        self.guarded: set[str] = set()
        self.routes_taken = {"selected": 0, "from_cache": 0, "full": 0}
        self.trace: Trace | None = None
        self.convs = WinogradConvs() if section.winograd and strategy == "fast" else None
        if strategy in ("fast", "cache"):
            try:
                self.trace = Trace(work, input_shape, batches[0][0].device)
            except Exception:
                self.trace = None
        self.routes = {name: self._route(name) for name in plan.layers}

    def _route(self, layer: str) -> Route:
        if self.trace is None:
            return Route(0)
        group = self.plan.graph.group(layer)
        route = self.trace.route(group.members, group.name)
        return route if self.strategy == "fast" else Route(route.start)

    def counters(self) -> dict[str, Any]:
        """What this process did, for the report's timing (summed over processes)."""
        return {"evaluations_by_route": dict(self.routes_taken), "fallbacks": set(self.fallbacks),
                "winograd_convs": self.convs.calls if self.convs is not None else 0}

    def cost(self, job: Job) -> float:
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

    def run(self, jobs: list[Job], observer: Observer, label: str) -> dict[tuple[str, int], _Outcome]:
        """Measure `jobs`, layer by layer in forward order, so the cached activation only moves forward."""
        order = {name: i for i, name in enumerate(self.plan.layers)}
        jobs = sorted(jobs, key=lambda j: (self.routes[j.layer].start, order[j.layer], j.removed))
        starts = [self.routes[j.layer].start for j in jobs]
        results: dict[tuple[str, int], _Outcome] = {}
        probes: dict[int, torch.Tensor] = {}
        # progress in cells, each weighted by its estimated cost: the count reads right and the ETA is fair
        weight = len(jobs) / max(sum(self.cost(j) for j in jobs), 1e-9)
        done = 0.0
        bar = observer.begin(label, len(jobs))
        observer.update(bar, completed=0.0, info=f"0/{len(jobs)} cells")
        for index, job in enumerate(jobs):
            if job.removed == 0:
                results[(job.layer, 0)] = _Outcome(None, **self.unpruned_size)
            elif self.strategy == "naive":
                results[(job.layer, job.removed)] = self._naive(job)
            else:
                if self.trace is not None and (index == 0 or jobs[index - 1].layer != job.layer):
                    later = min((s for s, j in zip(starts[index:], jobs[index:]) if j.layer != job.layer),
                                default=len(self.trace.nodes))
                    probes = self._prepare(job.layer, self.cache, later)
                results[(job.layer, job.removed)] = self._measure(job, self.cache, probes)
            done = len(jobs) if index + 1 == len(jobs) else done + self.cost(job) * weight
            observer.update(bar, completed=done, info=f"{index + 1}/{len(jobs)} cells")
        observer.end(bar, keep=True)
        return results

    def _pruned_size(self) -> dict[str, int]:
        """Parameters and MACs of the pruned working copy without a forward pass: channel pruning
        leaves every spatial size alone, so each layer's MACs scale with outputs x inputs per output."""
        macs = 0
        for name, base in self.macs.items():
            if name not in self.dims:
                macs += base
                continue
            out, per = self.dims[name]
            new_out, new_per = _dims(self.work.get_submodule(name)) or (out, per)
            macs += base // (out * per) * new_out * new_per if out * per else base
        return {"params": sum(p.numel() for p in self.work.parameters()), "macs": macs}

    def baseline(self) -> Metrics:
        """The unpruned model's metrics: the cached activations finish their forward pass (cheap, since
        the cells already paid for the prefix) when that gives exactly what the eager model gives."""
        trace, cache = self.trace, self.cache
        if trace is not None and self.strategy != "naive":
            with torch.inference_mode():
                first = trace.run(cache.at, cache.values[0].clone() if trace.mutates else cache.values[0])
                if isinstance(first, torch.Tensor) and torch.equal(first, self.work(self.batches[0][0])):
                    rest = [trace.run(cache.at, v.clone() if trace.mutates else v) for v in cache.values[1:]]
                    tally = self.task.tally()
                    for output, (inputs, targets) in zip([first, *rest], self.batches):
                        tally.add(output, inputs, targets)
                    return tally.result()
        return evaluate_batches(self.task, self.work, self.batches)

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

    def _require_trace(self) -> Trace:
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

    def _measure(self, job: Job, cache: _Cache, probes: dict[int, torch.Tensor]) -> _Outcome:
        restore = self.plan.graph.snapshot()
        try:
            idxs = list(job.indices)
            with torch.no_grad():
                self.plan.graph.prune({job.layer: idxs})
            if self.section.channels_last:
                for name in self.plan.graph.group(job.layer).members:
                    self.work.get_submodule(name).to(memory_format=torch.channels_last)
            size = self._pruned_size()
            return _Outcome(self._evaluate_pruned(job, idxs, cache, probes), **size)
        finally:
            restore()

    def _evaluate_pruned(self, job: Job, idxs: list[int], cache: _Cache, probes: dict[int, torch.Tensor]) -> Metrics:
        trace, route = self.trace, self.routes[job.layer]
        if trace is None or job.layer in self.fallbacks:
            return self._full()
        if probes and cache.at == route.select:
            removed = set(idxs)
            keep = torch.tensor([i for i in range(self.plan.widths[job.layer]) if i not in removed],
                                device=cache.values[0].device)
            if self._selection_exact(route, keep, cache, probes) and self._guard(
                    job.layer, cache.at, select_channels(cache.values[0][:_GUARD_SAMPLES], keep)):
                self.routes_taken["selected"] += 1
                return evaluate_batches(self.task, lambda x: trace.run(cache.at, x, convs=self.convs), self.batches,
                                        lambda i: select_channels(cache.values[i], keep))
        elif cache.at <= route.start and self._guard(job.layer, cache.at, cache.values[0]):
            self.routes_taken["from_cache"] += 1
            return evaluate_batches(self.task, lambda x: trace.run(cache.at, x, convs=self.convs), self.batches,
                                    lambda i: cache.values[i].clone() if trace.mutates else cache.values[i])
        return self._full()

    def _full(self) -> Metrics:
        self.routes_taken["full"] += 1
        return evaluate_batches(self.task, self.work, self.batches)

    def _selection_exact(self, route: Route, keep: torch.Tensor, cache: _Cache,
                         probes: dict[int, torch.Tensor]) -> bool:
        """Dropping channels of the unpruned activation must equal the pruned layers' output, bit for bit."""
        trace = self._require_trace()
        if route.select is None:
            raise RuntimeError("channel selection was asked for a route without a selection point")
        with torch.inference_mode():
            for i, value in probes.items():
                real = trace.run(route.start, value, stop=route.select)
                chosen = select_channels(cache.values[i], keep, like=real)
                if real.stride() != chosen.stride() or not torch.equal(real, chosen):
                    return False
        return True

    def _guard(self, layer: str, start: int, first: torch.Tensor) -> bool:
        """Once per layer: does the traced run agree with the real pruned model?"""
        trace = self._require_trace()
        if layer in self.guarded:
            return layer not in self.fallbacks
        self.guarded.add(layer)
        if not isinstance(first, torch.Tensor):  # the route starts at a tuple (ShuffleNet's channel split)
            self.fallbacks.add(layer)
            return False
        x = self.batches[0][0][:_GUARD_SAMPLES]
        with torch.inference_mode():
            expected = self.work(x)
            try:
                got = trace.run(start, first[:_GUARD_SAMPLES].clone(), convs=self.convs)
                ok = (isinstance(got, torch.Tensor) and got.shape == expected.shape
                      and torch.allclose(got, expected, rtol=1e-3, atol=1e-4))
            except (RuntimeError, TypeError, ValueError, IndexError, NoTrace):
                ok = False
        if not ok:
            self.fallbacks.add(layer)
        return ok

    def _naive(self, job: Job) -> _Outcome:
        """The reference: a fresh copy, a fresh graph, a real prune, a full evaluation."""
        model = copy.deepcopy(self.original).to(self.batches[0][0].device).eval()
        graph = ChannelGraph(model, self.input_shape)
        scores = graph.importance(job.layer, self.section.criterion, seed=self.section.seed)
        with torch.no_grad():
            graph.prune({job.layer: graph.choose(job.layer, scores, job.removed)})
        if self.section.channels_last:
            model.to(memory_format=torch.channels_last)
        self.routes_taken["full"] += 1
        return _Outcome(evaluate_batches(self.task, model, self.batches), **_size(model, self.input_shape))


def _dims(module: nn.Module) -> tuple[int, int] | None:
    """(outputs, inputs per output) of a conv/linear, whose MACs are proportional to their product; else None."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels // module.groups
    return None


def _size(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    return {"params": sum(p.numel() for p in model.parameters()),
            "macs": sum(count_macs(model, tuple(input_shape)).values())}
