"""How tight the order-sensitivity estimate is, and which new (ordering, seed) cells a scheduled sweep should draw."""
from __future__ import annotations

import inspect
import math
from collections import defaultdict

import pandas as pd

from analysis.statistics import kind_grids, t_interval, within_kind_spread
from dynaprompt.orderings import ORDERING_KINDS
from dynaprompt.plan import main_runs, pairs, view_seeds
from dynaprompt.registry import OrderingRegistry, RegisteredOrdering
from dynaprompt.results import ResultsLayout
from dynaprompt.specs import OrderingSpec, Settings


def cells_by_pair(layout: ResultsLayout, settings: Settings) -> dict:
    """(dataset, method) -> [(family, ordering, view seed, accuracy)] of its finished runs over the orderings of the
    main plan and the registry (the grid's own runs: last-bit replicates measure chaos, not the order)."""
    main = main_runs(settings)
    wanted = {(k.dataset, k.method) for k in main}
    registered = {e.name for e in OrderingRegistry(layout.orderings_registry).entries()}
    orderings = {k.ordering for k in main} | registered
    out = defaultdict(list)
    for summary in layout.summaries():
        if (summary.dataset, summary.method) in wanted and summary.ordering in orderings and not summary.replicate:
            out[(summary.dataset, summary.method)].append((summary.ordering_family or summary.ordering_kind,
                                                           summary.ordering, summary.view_seed, summary.accuracy))
    return dict(out)


def kind_evidence(cells, confidence: float) -> tuple[float, float | None]:
    """The widest evidence over the kinds of one pair's cells [(family, ordering, seed, accuracy)]: the largest
    half-width of a kind's mean interval (Student-t over its per-ordering means) and the largest width of a kind's
    within-kind SD interval (MLS, `within_kind_spread`; None on a grid of one seed, which has no perturbation
    control: the mean's interval alone decides). Orderings missing a seed (still running) wait; NaN: too few."""
    frame = pd.DataFrame(cells, columns=["kind", "ordering", "seed", "accuracy"])
    seeds = frame["seed"].nunique()
    complete = frame[frame.groupby(["kind", "ordering"])["seed"].transform("nunique") == seeds]
    halves, widths = [], []
    for grid in (kind_grids(complete) if len(complete) else {}).values():
        halves.append(t_interval(grid.mean(axis=1), confidence)["half_width"])
        spread = within_kind_spread(grid, confidence, resamples=1)  # one permutation: only the interval is read
        widths.append(spread["ci_high"] - spread["ci_low"])
    return widest(halves), (widest(widths) if seeds > 1 else None)


def widest(values) -> float:
    """The largest value; NaN (not yet estimable) when any is, or when there is none."""
    return math.nan if not values or any(math.isnan(v) for v in values) else max(values)


def pairs_above_target(layout: ResultsLayout, settings: Settings) -> dict:
    """Order-dependent (dataset, method) pairs not yet on target -> (largest half-width of a kind's mean interval,
    largest width of a kind's within-kind SD interval: `kind_evidence`); either above its target (or not yet
    estimable) keeps a pair open."""
    config = settings.sweep.schedule
    above = {}
    for (dataset, method), cells in cells_by_pair(layout, settings).items():
        if settings.method(method).order_independent:
            continue
        half, width = kind_evidence(cells, settings.report.confidence)
        # NaN (too few orderings or cells) counts as not yet on target
        if not (half <= config.target_half_width and (width is None or width <= config.target_sd_order_width)):
            above[(dataset, method)] = (half, width)
    return above


def draw_orderings(settings: Settings, layout: ResultsLayout, per_family: int, sweep_id: str
                   ) -> list[RegisteredOrdering]:
    """The orderings this scheduled sweep runs: those a dead sweep left pending (a live sweep's stay its own), then
    `per_family` new ones of each order-dependent family of the main plan (same kind and options, the family's next
    seeds) for the pairs still above a target it runs on (none once every pair is on target, or at the cap), each
    under every seed of the main grid: new (ordering, seed) cells, the seeds recorded with the ordering. The caller
    holds its sweep lock (`layout.sweep_lock(sweep_id)`); all of this holds the registry's lock, so a second sweep
    drawing at once draws after this one, other seeds."""
    registry = OrderingRegistry(layout.orderings_registry)
    with registry.lock():
        chosen = registry.claim_pending(sweep_id, alive=lambda owner: layout.sweep_lock(owner).held())
        for entry in registry.pending():
            if entry.holder != sweep_id:
                print(f"sweep: {entry.name} is pending in sweep {entry.holder} (pid {entry.pid} on {entry.host}), "
                      "which is still running; left to it", flush=True)
        above = pairs_above_target(layout, settings)
        seeds = [settings.views.view_seed if s is None else s for s in view_seeds(settings)]
        for template in order_dependent_families(settings):
            runs = [(d, m) for d, m in above if pairs(settings, d, template)]
            existing = sum(1 for o in settings.orderings.values() if o.family == template.family)
            existing += sum(1 for e in registry.entries() if e.family_name == template.family)
            room = max(0, settings.sweep.schedule.max_orderings - existing)
            if not runs:
                continue
            for _ in range(min(per_family, room)):
                chosen.append(registry.draw(settings, template, runs, sweep_id, seeds=seeds))
    return chosen


def order_dependent_families(settings: Settings) -> list[OrderingSpec]:
    """One ordering of each family of the main plan whose kind draws its order from a seed (not `natural`)."""
    out = {}
    for name in dict.fromkeys(key.ordering for key in main_runs(settings)):
        spec = settings.ordering(name)
        if "seed" in inspect.signature(ORDERING_KINDS[spec.kind]).parameters:
            out.setdefault(spec.family, spec)
    return list(out.values())
