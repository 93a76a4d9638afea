"""params.yaml as typed settings (`dynaprompt.specs`), checked once as it loads.

Every block of params.yaml has a dataclass (in `specs`, or in the module that owns it); datasets, mixtures,
methods and orderings become frozen specs. An unknown key, an unknown kind or an undefined name raises one
`ParamsError` naming the key, its line in the file and the closest valid names, before any stage or task starts.
What one run uses is resolved from them by `dynaprompt.resolve`.
"""
from __future__ import annotations

import inspect
from dataclasses import replace
from pathlib import Path

import yaml

from .objectives import TuningConfig
from .resolve import OPENAI_IMAGENET, TIP_TEMPLATES, resolve_templates
from .schema import CODE, ParamsError, Source, as_mapping, check_keys, closest, dataclass_from, fail, with_overrides
from .specs import (
    STREAM_SELECTIONS,
    AblationConfig,
    CalibrationConfig,
    CheckConfig,
    DatasetSpec,
    EmbedConfig,
    MethodSpec,
    MixtureSpec,
    MlflowConfig,
    ModelSpec,
    OrderingSpec,
    PathsConfig,
    PromptConfig,
    ReportConfig,
    RunConfig,
    Settings,
    SweepConfig,
    TestbedConfig,
    ValidateConfig,
    families_of,
)
from .views import ViewConfig

TOP_LEVEL = ("paths", "model", "prompt", "views", "tuning", "run", "embed", "check", "validate", "methods",
             "orderings", "templates", "pretrain", "testbed", "calibration", "datasets", "mixtures", "sweep",
             "ablations", "report", "mlflow")


def frozen(mapping) -> dict:
    """A plain copy (specs are frozen dataclasses; their mappings are never changed after loading)."""
    return dict(mapping or {})


# ---------------------------------------------------------------- the blocks


def parse_datasets(raw: dict, source: Source) -> dict:
    from .datasets import ADAPTERS

    specs = {}
    for name, entry in as_mapping(raw, source, ("datasets",)).items():
        path = ("datasets", name)
        entry = dict(as_mapping(entry, source, path))
        kind = entry.pop("kind", "image_folder")
        if kind not in ADAPTERS:
            fail(source, path + ("kind",), f"unknown dataset kind {kind!r}{closest(kind, ADAPTERS)}; "
                                           f"known: {sorted(ADAPTERS)}")
        augmix, tuning, template = entry.pop("augmix", None), entry.pop("tuning", {}), entry.pop("template", None)
        expected = entry.pop("expected_samples", None)
        check_keys(entry, adapter_parameters(ADAPTERS[kind]), source, path, f"option of dataset kind {kind!r}:")
        with_overrides(TuningConfig(), as_mapping(tuning, source, path + ("tuning",)), source, path + ("tuning",))
        specs[name] = DatasetSpec(name, kind, frozen(entry), augmix, frozen(tuning), template, expected)
    return specs


def adapter_parameters(adapter) -> list[str]:
    """The keyword options of a dataset adapter (everything but the dataset's name)."""
    parameters = inspect.signature(adapter).parameters
    return [p for p in parameters if p not in ("name", "kind")] + ["augmix", "tuning", "template", "expected_samples"]


def parse_mixtures(raw: dict, datasets: dict, source: Source) -> dict:
    specs = {}
    for name, entry in as_mapping(raw, source, ("mixtures",)).items():
        path = ("mixtures", name)
        entry = as_mapping(entry, source, path)
        check_keys(entry, ("members", "per_member", "seed", "tuning"), source, path)
        members = tuple(entry.get("members") or ())
        if len(members) < 2:
            fail(source, path + ("members",), "a mixture needs at least two member datasets")
        for member in members:
            if member not in datasets:
                fail(source, path + ("members",), f"member {member!r} is not a dataset{closest(member, datasets)}")
        if name in datasets:
            fail(source, path, "a mixture cannot share its name with a dataset")
        specs[name] = MixtureSpec(name, members, entry.get("per_member"), int(entry.get("seed", 0)),
                                  frozen(entry.get("tuning")))
    return specs


def parse_method(name: str, entry: dict, source: Source, path: tuple, datasets) -> MethodSpec:
    from .methods import METHODS

    entry = dict(as_mapping(entry, source, path))
    kind = entry.pop("kind", None)
    if kind not in METHODS:
        fail(source, path + ("kind",),
             f"unknown method kind {kind!r}{closest(kind, METHODS)}; known: {sorted(METHODS)}")
    tuning, views, per_dataset = entry.pop("tuning", {}), entry.pop("views", {}), entry.pop("per_dataset", {})
    templates = entry.pop("templates", None)
    if templates is not None and not METHODS[kind].uses_templates:
        fail(source, path + ("templates",), f"method kind {kind!r} has no text classifier of templates "
                                            "(its prompt is learned from v0)")
    method_options(kind, entry, source, path)
    with_overrides(TuningConfig(), as_mapping(tuning, source, path + ("tuning",)), source, path + ("tuning",))
    with_overrides(ViewConfig(), as_mapping(views, source, path + ("views",)), source, path + ("views",))
    for dataset, overrides in as_mapping(per_dataset, source, path + ("per_dataset",)).items():
        where = path + ("per_dataset", dataset)
        if dataset not in datasets and dataset not in paper_dataset_kinds():
            # a paper dataset's name may stay: a params file trimmed to some of the paper's datasets keeps the
            # per-dataset constants of the others; any other name is a typo
            fail(source, where, f"{dataset!r} is not a dataset or mixture{closest(dataset, datasets)}")
        overrides = dict(as_mapping(overrides, source, where))
        with_overrides(TuningConfig(), as_mapping(overrides.pop("tuning", {}), source, where), source, where)
        with_overrides(ViewConfig(), as_mapping(overrides.pop("views", {}), source, where), source, where)
        method_options(kind, {**entry, **overrides}, source, where)
    return MethodSpec(name, kind, frozen(entry), frozen(tuning), frozen(views),
                      frozen({d: frozen(o) for d, o in per_dataset.items()}), templates)


def paper_dataset_kinds() -> set:
    from .datasets import EXPECTED

    return set(EXPECTED)


def method_options(kind: str, options: dict, source: Source, path: tuple):
    """The method kind's config from `options`; unknown keys and bad values are named."""
    from .methods import METHODS

    return dataclass_from(METHODS[kind].Config, options, source, path)


def parse_orderings(raw: dict, source: Source, streams: dict | None = None, mixtures=()) -> dict:
    """Every ordering by name: explicit ones as given, a family (`seeds: n`) as `<family>-0` .. `<family>-<n-1>`;
    the orderings of one family must share kind, options and streams; `on:` names defined streams."""
    specs, entry_of = {}, {}
    for name, entry in as_mapping(raw, source, ("orderings",)).items():
        path = ("orderings", name)
        entry = dict(as_mapping(entry, source, path))
        if True in entry:  # YAML 1.1 reads a bare `on` key as the boolean true
            entry["on"] = entry.pop(True)
        expanded = parse_family(name, entry, source, path) if "seeds" in entry else [
            parse_ordering(name, entry, source, path)]
        for spec in expanded:
            if spec.name in specs:
                fail(source, path, f"ordering {spec.name!r} is defined twice (by {entry_of[spec.name]!r} and here)")
            specs[spec.name], entry_of[spec.name] = spec, name
    check_families(specs, entry_of, source)
    if streams is not None:
        for spec in specs.values():
            check_streams(spec, streams, mixtures, source, ("orderings", entry_of[spec.name], "on"))
    return specs


def parse_family(family: str, entry: dict, source: Source, path: tuple) -> list:
    """`<family>: {kind, options, seeds: n}` -> its n orderings `<family>-<seed>`, seeds 0 .. n-1."""
    from .orderings import ORDERING_KINDS

    entry = dict(entry)
    seeds = entry.pop("seeds")
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        fail(source, path + ("seeds",), f"seeds (how many orderings of the family) must be an integer >= 1, "
                                        f"got {seeds!r}")
    for key, why in (("seed", "a family numbers its orderings' seeds 0 .. seeds-1"),
                     ("family", "a family's name is its key")):
        if key in entry:
            fail(source, path + (key,), f"{key!r} has no place in a family ({why})")
    kind = entry.get("kind")
    if kind in ORDERING_KINDS and "seed" not in inspect.signature(ORDERING_KINDS[kind]).parameters:
        fail(source, path + ("seeds",), f"ordering kind {kind!r} takes no seed: it has one ordering, not a family")
    return [parse_ordering(f"{family}-{seed}", {**entry, "seed": seed, "family": family}, source, path)
            for seed in range(seeds)]


def parse_ordering(name: str, entry: dict, source: Source = CODE, path: tuple = ()) -> OrderingSpec:
    """One ordering: `kind`, the kind's options (each checked), and optionally `family` and `on`."""
    from .orderings import ORDERING_KINDS, option_problem

    entry = dict(as_mapping(entry, source, path))
    kind = entry.pop("kind", None)
    if kind not in ORDERING_KINDS:
        fail(source, path + ("kind",),
             f"unknown ordering kind {kind!r}{closest(kind, ORDERING_KINDS)}; known: {sorted(ORDERING_KINDS)}")
    family, on = entry.pop("family", ""), entry.pop("on", "")
    accepted = [p for p in inspect.signature(ORDERING_KINDS[kind]).parameters if p != "manifest"]
    check_keys(entry, accepted, source, path, f"option of ordering kind {kind!r}:")
    for option, value in entry.items():
        problem = option_problem(kind, option, value)
        if problem:
            fail(source, path + (option,), problem)
    if not isinstance(family, str):
        fail(source, path + ("family",), f"a family is a name, got {family!r}")
    return OrderingSpec(name, kind, frozen(entry), family, parse_on(on, source, path + ("on",)))


def parse_on(on, source: Source, path: tuple):
    """`on:` as OrderingSpec holds it: a selection's name, or a tuple of stream names."""
    if isinstance(on, (list, tuple)) and on and all(isinstance(s, str) for s in on):
        return tuple(on)
    if on == "" or on in STREAM_SELECTIONS:
        return on
    fail(source, path, f"on must be one of {list(STREAM_SELECTIONS)} or a list of stream names, got {on!r}")


def check_families(specs: dict, entry_of: dict, source: Source) -> None:
    """An ordering's family is a kind of stream: its orderings differ in their seed only."""
    first: dict = {}
    for name, spec in specs.items():
        if spec.family in specs and specs[spec.family].family != spec.family:
            fail(source, ("orderings", entry_of[name], "family"),
                 f"family {spec.family!r} has the name of ordering {spec.family!r} of family "
                 f"{specs[spec.family].family!r}")
        other = specs[first.setdefault(spec.family, name)]
        if (spec.kind, spec.defining_options, spec.on) != (other.kind, other.defining_options, other.on):
            fail(source, ("orderings", entry_of[name]),
                 f"ordering {name!r} is in family {spec.family!r} with {other.name!r}, but their kind, options or "
                 f"streams differ ({spec.as_dict()} on {spec.on!r}, {other.as_dict()} on {other.on!r}); a family's "
                 "orderings differ in their seed only: give it its own `family:`")


def check_streams(spec: OrderingSpec, streams: dict, mixtures, source: Source, path: tuple) -> None:
    """`on:` names defined streams; a cyclic ordering runs on mixtures only (it needs their `domain` column)."""
    for stream in spec.on if isinstance(spec.on, tuple) else ():
        if stream not in streams:
            fail(source, path, f"stream {stream!r} is not a dataset or mixture{closest(stream, streams)}")
    selected = spec.on if isinstance(spec.on, tuple) else [s for s in streams if spec.runs_on(s, mixtures)]
    if spec.kind == "cyclic" and any(s not in mixtures for s in selected):
        fail(source, path, f"ordering {spec.name!r} is cyclic: it needs a mixture's domains, so it runs on "
                           "mixtures only (on: mixtures)")


def parse_templates(raw: dict, source: Source) -> dict:
    sets = {}
    for name, entry in as_mapping(raw, source, ("templates",)).items():
        if not isinstance(entry, list) or not all(isinstance(t, str) and "{}" in t for t in entry):
            fail(source, ("templates", name), "a template set is a list of strings, each with '{}'")
        sets[name] = tuple(entry)
    return sets


def check_names(names, defined, source: Source, path: tuple, what: str):
    for name in names or ():
        if name not in defined:
            fail(source, path, f"{what} {name!r} is not defined{closest(name, defined)} (defined: {sorted(defined)})")


# ---------------------------------------------------------------- derived methods


def variant(base: MethodSpec, tag: str, derived_from: str, options: dict | None = None,
            tuning: dict | None = None) -> MethodSpec:
    """A copy of `base` named `<base>~<tag>` with some options or tuning changed."""
    return replace(base, name=f"{base.name}~{tag}", options=frozen({**base.options, **(options or {})}),
                   tuning=frozen({**base.tuning, **(tuning or {})}), derived_from=derived_from)


def ablation_variants(config: AblationConfig, base: MethodSpec) -> list[MethodSpec]:
    """The paper's ablations of `base`: criteria, no appending, buffer size M, selection margins."""
    out = [variant(base, criteria, "ablation", {"criteria": criteria}) for criteria in config.criteria]
    if config.no_append:
        out.append(variant(base, "no_append", "ablation", {"append": False}))
    out += [variant(base, f"M{size}", "ablation", {"buffer_size": size}) for size in config.buffer_sizes
            if size != base.options.get("buffer_size", 10)]
    for tau_h in config.entropy_margins:
        for tau_d in config.probdiff_margins:
            if tau_h or tau_d:
                out.append(variant(base, f"tau_h{tau_h:g}-tau_d{tau_d:g}", "ablation",
                                   {"entropy_margin": tau_h, "probdiff_margin": tau_d}))
    return out


def calibration_variants(config: CalibrationConfig, methods: dict) -> list[MethodSpec]:
    """Each calibrated method at each learning rate of the grid."""
    return [variant(methods[m], f"lr{lr:g}", "calibration", tuning={"lr": float(lr)})
            for m in config.methods for lr in config.lrs]


# ---------------------------------------------------------------- loading


def settings_from_params(params: dict, base_dir: str | Path = ".", source: Source = CODE) -> Settings:
    """Settings from a params mapping; every block checked, every name resolved."""
    from .pretrain import PretrainConfig, eval_templates

    params = as_mapping(params, source, ())
    check_keys(params, TOP_LEVEL, source, (), "top-level block")
    block = lambda name, cls: dataclass_from(cls, params.get(name), source, (name,))
    datasets = parse_datasets(params.get("datasets"), source)
    mixtures = parse_mixtures(params.get("mixtures"), datasets, source)
    streams = {**datasets, **mixtures}
    methods = {name: parse_method(name, entry, source, ("methods", name), streams)
               for name, entry in as_mapping(params.get("methods"), source, ("methods",)).items()}
    orderings = parse_orderings(params.get("orderings"), source, streams, mixtures)
    sweep = block("sweep", SweepConfig)
    calibration, ablations = block("calibration", CalibrationConfig), block("ablations", AblationConfig)
    testbed = block("testbed", TestbedConfig)
    check_names(sweep.datasets, streams, source, ("sweep", "datasets"), "dataset")
    check_names(sweep.methods, methods, source, ("sweep", "methods"), "method")
    check_names(sweep.orderings, {**families_of(orderings), **orderings}, source, ("sweep", "orderings"),
                "ordering or family")
    check_names(sweep.chaos.orderings, {**families_of(orderings), **orderings}, source,
                ("sweep", "chaos", "orderings"), "ordering or family")
    check_names(testbed.streams, streams, source, ("testbed", "streams"), "dataset")
    derived = []
    if calibration.dataset is not None:
        check_names([calibration.dataset], streams, source, ("calibration", "dataset"), "dataset")
        check_names([calibration.ordering], orderings, source, ("calibration", "ordering"), "ordering")
        check_names(calibration.methods + (calibration.reference,), methods, source, ("calibration", "methods"),
                    "method")
        derived += calibration_variants(calibration, methods)
    if ablations.dataset is not None:
        check_names([ablations.dataset], streams, source, ("ablations", "dataset"), "dataset")
        check_names(ablations.orderings, orderings, source, ("ablations", "orderings"), "ordering")
        check_names((ablations.base,) + ablations.references, methods, source, ("ablations", "base"), "method")
        if methods[ablations.base].kind != "dynaprompt":
            fail(source, ("ablations", "base"), f"{ablations.base!r} is not a dynaprompt method")
        derived += ablation_variants(ablations, methods[ablations.base])
    for spec in derived:
        method_options(spec.kind, dict(spec.options), source, (spec.derived_from, spec.name))
    pretrain = block("pretrain", PretrainConfig)
    templates = {"openai_imagenet": OPENAI_IMAGENET, "tip": TIP_TEMPLATES, "captions": tuple(pretrain.templates),
                 "pretrain": tuple(eval_templates(pretrain)), **parse_templates(params.get("templates"), source)}
    if testbed.templates not in templates:
        fail(source, ("testbed", "templates"),
             f"no template set {testbed.templates!r}{closest(testbed.templates, templates)}")
    settings = Settings(
        model=block("model", ModelSpec), prompt=block("prompt", PromptConfig), views=block("views", ViewConfig),
        tuning=block("tuning", TuningConfig), run=block("run", RunConfig), embed=block("embed", EmbedConfig),
        check=block("check", CheckConfig), validate=block("validate", ValidateConfig),
        datasets=frozen(datasets), mixtures=frozen(mixtures),
        methods=frozen({**methods, **{d.name: d for d in derived}}),
        orderings=frozen(orderings), templates=frozen(templates), sweep=sweep, calibration=calibration,
        ablations=ablations, testbed=testbed, report=block("report", ReportConfig),
        mlflow=block("mlflow", MlflowConfig),
        paths=block("paths", PathsConfig), pretrain=pretrain, base_dir=Path(base_dir),
        raw=frozen(params),
    )
    for spec in settings.methods.values():  # every template set a method names exists
        for dataset in streams:
            resolve_templates(settings, spec, dataset, check_only=True, source=source)
    return settings


def load_params(path: str | Path) -> dict:
    """Read a params file; a missing or malformed file is named in the error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    try:
        with path.open() as handle:
            params = yaml.safe_load(handle) or {}
    except yaml.YAMLError as error:
        raise ParamsError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return params


def load_settings(path: str | Path) -> Settings:
    """Settings from a params file; relative paths inside it resolve against its folder."""
    path = Path(path)
    params = load_params(path)
    return settings_from_params(params, base_dir=path.resolve().parent, source=Source.of_file(path))
