"""A sweep plan: every run the params ask for, in groups, expanded once.

    main         sweep.datasets x sweep.methods x sweep.orderings x sweep.view_seeds, each ordering on the streams
                 its `on:` selects (cyclic: mixtures; others: all): every ordering under every augmentation seed, so
                 that the order's effect can be told from the effect of a perturbation that is not an ordering
    calibration  calibration.dataset x (reference + every calibrated method at every lr) x calibration.ordering
    ablation     ablations.dataset x (references + base + its variants) x ablations.orderings
    added        orderings from the registry (scheduled sweeps) x the order-dependent methods of `main` x the
                 seeds each was registered with
    chaos        the order-dependent methods of `main` x `sweep.chaos.orderings` on the streams they run on, each
                 under `sweep.chaos.replicates` last-bit perturbations at the params' view seed (replicates 1..R of
                 the main grid's replicate-0 cell): what the method does when only the last bits change
Calibration and ablation runs see the params' `views.view_seed` only.
A run that two groups share (same dataset, method and ordering) is planned once, under the first group.

`ordering_table` describes every (stream, ordering) pair a plan uses: kind, family, options and how correlated
its labels are (the fraction of consecutive same-label pairs); plan.json carries it next to the runs.
"""
from __future__ import annotations

from .results import SHARED_ORDERING, RunKey
from .specs import OrderingSpec, Settings, families_of

GROUPS = ("main", "calibration", "ablation", "added", "chaos")


def pairs(settings: Settings, dataset: str, spec: OrderingSpec) -> bool:
    """Whether the ordering runs on `dataset`: as its `on:` selects (all | datasets | mixtures | names)."""
    return spec.runs_on(dataset, settings.mixtures)


def ordering_names(settings: Settings, names=None) -> list[str]:
    """Orderings by name, a family's name standing for all its orderings; None: every ordering."""
    if names is None:
        return list(settings.orderings)
    families = families_of(settings.orderings)
    out = []
    for name in names:
        out += [name] if name in settings.orderings else families.get(name) or [settings.ordering(name).name]
    return list(dict.fromkeys(out))


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
    orderings = ordering_names(settings, sweep.orderings or None)
    seeds = view_seeds(settings)
    return [RunKey(d, m, o, s) for d in datasets for m in methods for s in seeds for o in orderings
            if pairs(settings, d, settings.ordering(o))]


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
                if pairs(settings, d, spec)]
    return out


def chaos_runs(settings: Settings) -> list[RunKey]:
    """Replicates 1..R of the chaos cells: each order-dependent main method on each stream its ordering runs on."""
    config = settings.sweep.chaos
    if not config.replicates or not config.orderings:
        return []
    main = main_runs(settings)
    datasets = list(dict.fromkeys(k.dataset for k in main))
    methods = [m for m in dict.fromkeys(k.method for k in main) if not settings.method(m).order_independent]
    families = families_of(settings.orderings)
    orderings = [name if name in settings.orderings else (families.get(name) or [settings.ordering(name).name])[0]
                 for name in config.orderings]
    return [RunKey(d, m, o, None, r) for d in datasets for m in methods for o in dict.fromkeys(orderings)
            if pairs(settings, d, settings.ordering(o)) for r in range(1, config.replicates + 1)]


def expand_plan(settings: Settings, added: list = ()) -> list[tuple[RunKey, str]]:
    """(run, group) for every planned run, each run once."""
    groups = {"main": main_runs(settings), "calibration": calibration_runs(settings),
              "ablation": ablation_runs(settings), "added": added_runs(settings, list(added)),
              "chaos": chaos_runs(settings)}
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


def ordering_table(settings: Settings, planned: list, clip=None) -> list[dict]:
    """One row per (stream, ordering) pair of `planned` ((RunKey, group) pairs): its kind, family, options, seed,
    length and label correlation. Orderings by zero-shot difficulty read it through `dynaprompt.difficulty` (the
    model is loaded, once, only when one is planned; `clip` gives one already loaded)."""
    from .difficulty import with_difficulty
    from .model import load_model
    from .orderings import label_correlation, needs_difficulty, order_samples
    from .runner import open_stream

    by_stream: dict = {}
    for key, _group in planned:
        if key.ordering != SHARED_ORDERING:
            by_stream.setdefault(key.dataset, []).append(key.ordering)
    rows = []
    for dataset, names in by_stream.items():
        data = open_stream(settings, dataset)
        specs = [settings.ordering(name) for name in dict.fromkeys(names)]
        manifest = data.manifest
        if any(needs_difficulty(spec.kind) for spec in specs):
            clip = clip or load_model(settings)  # the params' weights, paths from the params file's folder
            manifest = with_difficulty(settings, data, clip)
        labels = dict(zip(manifest["sample_id"], manifest["label"]))
        for spec in specs:
            stream = order_samples(manifest, spec)
            rows.append({"dataset": dataset, "ordering": spec.name, "kind": spec.kind, "family": spec.family,
                         "options": spec.defining_options, "seed": spec.seed, "n": len(stream),
                         "label_correlation": label_correlation([labels[s] for s in stream])})
    return rows
