"""How tight the order-sensitivity estimate is, and which new orderings a scheduled sweep should draw."""
from __future__ import annotations

from collections import defaultdict

from analysis.statistics import t_interval
from dynaprompt.plan import main_runs, pairs
from dynaprompt.registry import ADDED_KINDS, OrderingRegistry, RegisteredOrdering
from dynaprompt.results import ResultsLayout
from dynaprompt.specs import Settings


def accuracies_by_pair(layout: ResultsLayout, settings: Settings) -> dict:
    """(dataset, method) -> accuracies of its finished runs over the orderings of the main plan and the registry."""
    main = main_runs(settings)
    wanted = {(k.dataset, k.method) for k in main}
    registered = {e.name for e in OrderingRegistry(layout.orderings_registry).entries()}
    orderings = {k.ordering for k in main} | registered
    out = defaultdict(list)
    for summary in layout.summaries():
        if (summary.dataset, summary.method) in wanted and summary.ordering in orderings:
            out[(summary.dataset, summary.method)].append(summary.accuracy)
    return dict(out)


def pairs_above_target(layout: ResultsLayout, settings: Settings) -> dict:
    """Order-dependent (dataset, method) pairs whose interval half-width exceeds the target -> half-width."""
    config = settings.sweep.schedule
    above = {}
    for (dataset, method), values in accuracies_by_pair(layout, settings).items():
        if settings.method(method).order_independent:
            continue
        half = t_interval(values, settings.report.confidence)["half_width"]
        if not half <= config.target_half_width:  # NaN (fewer than two orderings) counts as not yet on target
            above[(dataset, method)] = half
    return above


def draw_orderings(settings: Settings, layout: ResultsLayout, per_kind: int, sweep_id: str
                   ) -> list[RegisteredOrdering]:
    """The orderings this scheduled sweep runs: those a killed sweep left pending, then `per_kind` new ones of
    each kind for the pairs still above the target (none once every pair is on target, or at the cap)."""
    registry = OrderingRegistry(layout.orderings_registry)
    chosen = registry.pending()
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
            chosen.append(registry.draw(settings, kind, runs, sweep_id, options))
    return chosen

