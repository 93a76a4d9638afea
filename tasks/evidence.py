"""How tight the order-sensitivity estimate is, and which new (ordering, seed) cells a scheduled sweep should draw."""
from __future__ import annotations

from collections import defaultdict

import numpy as np

from analysis.statistics import t_interval, variance_components
from dynaprompt.plan import main_runs, pairs, view_seeds
from dynaprompt.registry import ADDED_KINDS, OrderingRegistry, RegisteredOrdering
from dynaprompt.results import ResultsLayout
from dynaprompt.specs import Settings


def cells_by_pair(layout: ResultsLayout, settings: Settings) -> dict:
    """(dataset, method) -> [(ordering, view seed, accuracy)] of its finished runs over the orderings of the main
    plan and the registry."""
    main = main_runs(settings)
    wanted = {(k.dataset, k.method) for k in main}
    registered = {e.name for e in OrderingRegistry(layout.orderings_registry).entries()}
    orderings = {k.ordering for k in main} | registered
    out = defaultdict(list)
    for summary in layout.summaries():
        if (summary.dataset, summary.method) in wanted and summary.ordering in orderings:
            out[(summary.dataset, summary.method)].append((summary.ordering, summary.view_seed, summary.accuracy))
    return dict(out)


def pairs_above_target(layout: ResultsLayout, settings: Settings) -> dict:
    """Order-dependent (dataset, method) pairs not yet on target -> (half-width of the mean's interval over the
    orderings, width of SD(order)'s interval); either above its target (or not yet estimable) keeps a pair open."""
    config = settings.sweep.schedule
    above = {}
    for (dataset, method), cells in cells_by_pair(layout, settings).items():
        if settings.method(method).order_independent:
            continue
        orderings, seeds, accuracies = zip(*cells)
        by_ordering = defaultdict(list)
        for ordering, accuracy in zip(orderings, accuracies):
            by_ordering[ordering].append(accuracy)
        half = t_interval([np.mean(v) for v in by_ordering.values()], settings.report.confidence)["half_width"]
        width = None  # a grid of one seed has no perturbation control: the mean's interval alone decides
        if len(set(seeds)) > 1:
            components = variance_components(accuracies, orderings, seeds, settings.report.confidence,
                                             config.variance_bootstrap, resamples=999, seed=settings.report.seed)
            low, high = components["sd_order_ci"]
            width = float("nan") if low is None or high is None else high - low
        # NaN (too few orderings or cells) counts as not yet on target
        if not (half <= config.target_half_width and (width is None or width <= config.target_sd_order_width)):
            above[(dataset, method)] = (half, width)
    return above


def draw_orderings(settings: Settings, layout: ResultsLayout, per_kind: int, sweep_id: str
                   ) -> list[RegisteredOrdering]:
    """The orderings this scheduled sweep runs: those a dead sweep left pending (a live sweep's stay its own), then
    `per_kind` new ones of each kind for the pairs still above a target (none once every pair is on target, or at
    the cap), each under every seed of the main grid: new (ordering, seed) cells, the seeds recorded with the
    ordering. The caller holds its sweep lock (`layout.sweep_lock(sweep_id)`); all of this holds the registry's
    lock, so a second sweep drawing at once draws after this one, other seeds."""
    registry = OrderingRegistry(layout.orderings_registry)
    with registry.lock():
        chosen = registry.claim_pending(sweep_id, alive=lambda owner: layout.sweep_lock(owner).held())
        for entry in registry.pending():
            if entry.holder != sweep_id:
                print(f"sweep: {entry.name} is pending in sweep {entry.holder} (pid {entry.pid} on {entry.host}), "
                      "which is still running; left to it", flush=True)
        above = pairs_above_target(layout, settings)
        template = {o.kind: dict(o.options) for o in settings.orderings.values()}  # e.g. the cyclic block size
        for kind in ADDED_KINDS:
            runs = [(d, m) for d, m in above if pairs(settings, d, kind)]
            existing = sum(1 for o in settings.orderings.values() if o.kind == kind)
            existing += sum(1 for e in registry.entries() if e.kind == kind)
            room = max(0, settings.sweep.schedule.max_orderings - existing)
            if not runs:
                continue
            for _ in range(min(per_kind, room)):
                options = {k: v for k, v in template.get(kind, {}).items() if k != "seed"}
                seeds = [settings.views.view_seed if s is None else s for s in view_seeds(settings)]
                chosen.append(registry.draw(settings, kind, runs, sweep_id, options, seeds=seeds))
    return chosen
