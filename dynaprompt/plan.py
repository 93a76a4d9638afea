"""A sweep plan: every run the params ask for, in groups, expanded once.

    main         sweep.datasets x sweep.methods x sweep.orderings x sweep.view_seeds (cyclic orderings pair with
                 mixtures only): every ordering under every augmentation seed, so that the order's effect can be
                 told from the effect of a perturbation that is not an ordering
    calibration  calibration.dataset x (reference + every calibrated method at every lr) x calibration.ordering
    ablation     ablations.dataset x (references + base + its variants) x ablations.orderings
    added        orderings from the registry (scheduled sweeps) x the order-dependent methods of `main` x the
                 seeds each was registered with
Calibration and ablation runs see the params' `views.view_seed` only.
A run that two groups share (same dataset, method and ordering) is planned once, under the first group.
"""
from __future__ import annotations

from .results import RunKey
from .specs import Settings

GROUPS = ("main", "calibration", "ablation", "added")


def pairs(settings: Settings, dataset: str, kind: str) -> bool:
    """Cyclic orderings need a mixture of domains, and a mixture is only used in recurring domain blocks."""
    return (kind == "cyclic") == (dataset in settings.mixtures)


def seed_keys(settings: Settings, seeds) -> list:
    """View seeds as run keys name them: None for the params' own `views.view_seed`."""
    return list(dict.fromkeys(None if s is None or int(s) == settings.views.view_seed else int(s) for s in seeds))


def view_seeds(settings: Settings) -> list:
    """The seeds of the main grid (`sweep.view_seeds`, else the params' view seed), as run keys name them."""
    return seed_keys(settings, settings.sweep.view_seeds or [None])


def main_runs(settings: Settings) -> list[RunKey]:
    sweep = settings.sweep
    datasets = list(sweep.datasets or [*settings.datasets, *settings.mixtures])
    methods = list(sweep.methods or [m for m, spec in settings.methods.items() if spec.derived_from is None])
    orderings = list(sweep.orderings or settings.orderings)
    seeds = view_seeds(settings)
    return [RunKey(d, m, o, s) for d in datasets for m in methods for s in seeds for o in orderings
            if pairs(settings, d, settings.ordering(o).kind)]


def calibration_runs(settings: Settings) -> list[RunKey]:
    config = settings.calibration
    if config.dataset is None:
        return []
    methods = [config.reference] + [m for m, spec in settings.methods.items() if spec.derived_from == "calibration"]
    return [RunKey(config.dataset, m, config.ordering) for m in methods]


def ablation_runs(settings: Settings) -> list[RunKey]:
    config = settings.ablations
    if config.dataset is None:
        return []
    methods = [*config.references, config.base] + [
        m for m, spec in settings.methods.items() if spec.derived_from == "ablation"]
    return [RunKey(config.dataset, m, o) for m in methods for o in config.orderings]


def added_runs(settings: Settings, added: list) -> list[RunKey]:
    """The order-dependent main methods over registry orderings (each under the seeds it was registered with,
    else the main grid's), on the main datasets they pair with."""
    main = main_runs(settings)
    datasets = list(dict.fromkeys(k.dataset for k in main))
    methods = [m for m in dict.fromkeys(k.method for k in main) if not settings.method(m).order_independent]
    out = []
    for entry in added:
        spec = entry.spec if hasattr(entry, "spec") else entry
        seeds = seed_keys(settings, entry.seeds) if getattr(entry, "seeds", None) else view_seeds(settings)
        out += [RunKey(d, m, spec.name, s) for d in datasets for m in methods for s in seeds
                if pairs(settings, d, spec.kind)]
    return out


def expand_plan(settings: Settings, added: list = ()) -> list[tuple[RunKey, str]]:
    """(run, group) for every planned run, each run once."""
    groups = {"main": main_runs(settings), "calibration": calibration_runs(settings),
              "ablation": ablation_runs(settings), "added": added_runs(settings, list(added))}
    planned = {}
    for group in GROUPS:
        for key in groups[group]:
            planned.setdefault(key, group)
    return list(planned.items())


def needed_views(settings: Settings, dataset: str) -> list:
    """The view settings the planned runs see on `dataset` (directly or as a mixture member); none if unused."""
    from .resolve import method_views

    views = []
    for key, _ in expand_plan(settings):
        members = settings.mixtures[key.dataset].members if key.dataset in settings.mixtures else (key.dataset,)
        if dataset in members:
            views.append(method_views(settings, settings.method(key.method), dataset, key.seed))
    return list({repr(v): v for v in views}.values())
