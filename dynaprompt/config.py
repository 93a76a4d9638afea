"""params.yaml as typed settings, checked once as it loads, and the one resolver of each run's effective settings.

Every block of params.yaml has a dataclass here (or in the module that owns it); datasets, mixtures, methods and
orderings become frozen specs. An unknown key, an unknown kind or an undefined name raises one `ParamsError`
naming the key, its line in the file and the closest valid names, before any stage or task starts.

Effective settings of a run (`resolve_run`), later entries win:
    views:   `views:`  <  `datasets.<d>.augmix`  <  `methods.<m>.views`  <  `methods.<m>.per_dataset.<d>.views`
    tuning:  `tuning:` <  `datasets.<d>.tuning`  <  `methods.<m>.tuning` <  `methods.<m>.per_dataset.<d>.tuning`
    options: `methods.<m>.<option>`  <  `methods.<m>.per_dataset.<d>.<option>`
A mixture takes the views of each member and the tuning its members agree on (or its own `tuning:`).
"""
from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import yaml

from .objectives import TuningConfig
from .schema import CODE, ParamsError, Source, as_mapping, check_keys, closest, dataclass_from, fail, with_overrides
from .views import ViewConfig


@dataclass
class ModelSpec:
    """Which CLIP to load; every field is a `model:` key in params.yaml."""

    arch: str = "tiny-clip"  # open_clip name, a bundled config name, or a path to a JSON model config
    pretrained: str | None = None  # open_clip tag ('openai'), a weights file, or null for random weights
    cache_dir: str | None = None  # where to look for cached hub weights (HF cache layout)
    allow_download: bool = False  # never reach for the network unless asked
    init_seed: int = 0  # seeds random weights, so a random-weight model is reproducible
    device: str = "auto"  # auto | cpu | cuda | cuda:N


@dataclass(frozen=True)
class PromptConfig:
    """The learnable context; the `prompt:` block."""

    n_ctx: int = 4
    ctx_init: str | None = "a photo of a"  # null: CoOp's random init
    truncate: bool = True  # cut token sequences after the last end-of-text token
    init_seed: int = 0  # only used when ctx_init is null


@dataclass(frozen=True)
class RunConfig:
    """The `run:` block: what every run shares."""

    block_size: int = 200  # accuracy is reported per block of this many samples along the stream
    threads: int = 1  # torch threads of one run, from every entry point; part of the run's identity


@dataclass(frozen=True)
class DatasetSpec:
    """One `datasets:` entry: the adapter's kind and options, and what the dataset sets for its runs."""

    name: str
    kind: str
    options: dict  # the adapter's keyword arguments (root, split, n_samples, ...)
    augmix: bool | None = None  # AugMix views (TPT does it on the fine-grained sets); None: `views.augmix`
    tuning: dict = field(default_factory=dict)  # overrides of `tuning:` for this dataset (lr)
    template: str | None = None  # the dataset's own CoOp template, e.g. "a photo of a {}, a type of pet."
    expected_samples: int | None = None  # the validate stage checks the count (known test splits are built in)


@dataclass(frozen=True)
class MixtureSpec:
    """Several datasets sharing a label space as one stream with a `domain` column."""

    name: str
    members: tuple
    per_member: int | None = None
    seed: int = 0
    tuning: dict = field(default_factory=dict)


@dataclass(frozen=True)
class MethodSpec:
    """One `methods:` entry: a method kind, its options, and its overrides of tuning and views."""

    name: str
    kind: str
    options: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)
    views: dict = field(default_factory=dict)
    per_dataset: dict = field(default_factory=dict)  # dataset -> {option / tuning / views overrides}
    templates: object = None  # the text classifier's templates (methods that take them; see resolve_templates)
    derived_from: str | None = None  # set on the variants that ablations and calibration generate

    @property
    def order_independent(self) -> bool:
        from .methods import METHODS

        return METHODS[self.kind].order_independent


@dataclass(frozen=True)
class OrderingSpec:
    """One ordering: a kind and its options (seed, block)."""

    name: str
    kind: str
    options: dict = field(default_factory=dict)

    @property
    def seed(self) -> int | None:
        return self.options.get("seed")

    def as_dict(self) -> dict:
        return {"kind": self.kind, **self.options}


@dataclass(frozen=True)
class ScheduleConfig:
    """`sweep.schedule`: the deployment that adds orderings until the intervals are tight."""

    name: str = "robustness"
    cron: str | None = None
    add_orderings: int = 2  # new orderings per order-dependent kind per scheduled run
    target_half_width: float = 0.01  # stop once every (dataset, method) 95% interval half-width is below this
    max_orderings: int = 50  # never more orderings of one kind on one dataset than this


@dataclass(frozen=True)
class SweepConfig:
    """The `sweep:` block."""

    datasets: tuple | None = None  # null: every dataset and mixture
    methods: tuple | None = None  # null: every declared method
    orderings: tuple | None = None  # null: every ordering (cyclic ones pair with mixtures only)
    runner: str = "process"  # process | thread | dask
    workers: int = 2  # parallel runs
    dask_address: str | None = None  # tcp://scheduler:8786; null: a LocalCluster
    gpu_slots: int = 1  # runs sharing one GPU at a time (a Prefect global concurrency limit)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)

    def __post_init__(self):
        if self.runner not in ("process", "thread", "dask"):
            raise ValueError(f"runner must be 'process', 'thread' or 'dask', got {self.runner!r}")


@dataclass(frozen=True)
class CalibrationConfig:
    """The `calibration:` block: TPT's learning rate, chosen on a stream the report does not sweep."""

    dataset: str | None = None  # null: no calibration runs
    ordering: str = "shuffle-0"
    methods: tuple = ("tpt",)  # TPT picks the lr; the others are drawn against it
    lrs: tuple = (1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
    reference: str = "zero_shot"  # the gain is measured against this method


@dataclass(frozen=True)
class AblationConfig:
    """The `ablations:` block: the paper's ablations of one DynaPrompt entry, on one stream."""

    dataset: str | None = None  # null: no ablation runs
    orderings: tuple = ()
    base: str = "dynaprompt"
    references: tuple = ("zero_shot", "tpt")
    criteria: tuple = ("entropy_only", "probdiff_only")
    no_append: bool = True
    buffer_sizes: tuple = (1, 5, 20)
    entropy_margins: tuple = (0.0,)
    probdiff_margins: tuple = (0.0,)


@dataclass(frozen=True)
class ReportConfig:
    """The `report:` block."""

    collapse_margin: float = 0.10  # a last block this far below zero-shot (same samples) or its first block
    confidence: float = 0.95
    bootstrap_samples: int = 2000
    seed: int = 0
    min_orderings: int = 3  # fewer orderings than this: the interval is flagged "too few orderings"
    max_panels: int = 6  # datasets per figure / DynaPrompt runs in the buffer figure, plan order
    dpi: int = 110


@dataclass(frozen=True)
class MlflowConfig:
    """The `mlflow:` block."""

    db: str = "mlflow.db"  # sqlite file, relative to the params file
    artifacts: str = "mlartifacts"
    experiment: str = "dynaprompt"


@dataclass(frozen=True)
class PathsConfig:
    """The `paths:` block, relative to the params file's folder."""

    prepared: str = "data/prepared"
    features: str = "data/features"
    models: str = "data/models"
    validation: str = "reports/validation"
    reports: str = "reports"
    results: str = "results"


@dataclass(frozen=True)
class TestbedConfig:
    """The `testbed:` block: how strongly the model responds to prompts, measured on these streams."""

    streams: tuple = ()
    templates: str = "pretrain"  # a template set whose zero-shot spread is reported (`pretrain`: the bundled
    #   model's training, style and unseen templates)


@dataclass(frozen=True)
class Settings:
    """params.yaml, checked and typed."""

    model: ModelSpec = field(default_factory=ModelSpec)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    views: ViewConfig = field(default_factory=ViewConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    run: RunConfig = field(default_factory=RunConfig)
    datasets: dict = field(default_factory=dict)
    mixtures: dict = field(default_factory=dict)
    methods: dict = field(default_factory=dict)  # declared and derived (ablation, calibration) methods
    orderings: dict = field(default_factory=dict)
    templates: dict = field(default_factory=dict)  # name -> list of templates
    sweep: SweepConfig = field(default_factory=SweepConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    ablations: AblationConfig = field(default_factory=AblationConfig)
    testbed: TestbedConfig = field(default_factory=TestbedConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    mlflow: MlflowConfig = field(default_factory=MlflowConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    pretrain: object = None  # dynaprompt.pretrain.PretrainConfig (imported lazily: it pulls in training code)
    base_dir: Path = Path(".")  # relative paths in params are relative to the params file
    raw: dict = field(default_factory=dict)  # the params mapping as read

    def path(self, name: str) -> Path:
        """A `paths:` entry resolved against the params file's folder."""
        return self.base_dir / getattr(self.paths, name)

    def stream(self, name: str) -> DatasetSpec | MixtureSpec:
        """A dataset or mixture by name; an error naming the defined ones otherwise."""
        return lookup({**self.datasets, **self.mixtures}, name, "dataset")

    def method(self, name: str) -> MethodSpec:
        return lookup(self.methods, name, "method")

    def ordering(self, name: str) -> OrderingSpec:
        return lookup(self.orderings, name, "ordering")


def lookup(table, name: str, what: str):
    """`table[name]`, or one error naming what is defined and the closest names."""
    if name not in table:
        raise ParamsError(f"{what} {name!r} is not defined in params{closest(name, table)} "
                          f"(defined: {sorted(table)})")
    return table[name]


TOP_LEVEL = ("paths", "model", "prompt", "views", "tuning", "run", "methods", "orderings", "templates", "pretrain",
             "testbed", "calibration", "datasets", "mixtures", "sweep", "ablations", "report", "mlflow")


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
        if dataset not in datasets:
            fail(source, where, f"{dataset!r} is not a dataset or mixture{closest(dataset, datasets)}")
        overrides = dict(as_mapping(overrides, source, where))
        with_overrides(TuningConfig(), as_mapping(overrides.pop("tuning", {}), source, where), source, where)
        with_overrides(ViewConfig(), as_mapping(overrides.pop("views", {}), source, where), source, where)
        method_options(kind, {**entry, **overrides}, source, where)
    return MethodSpec(name, kind, frozen(entry), frozen(tuning), frozen(views),
                      frozen({d: frozen(o) for d, o in per_dataset.items()}), templates)


def method_options(kind: str, options: dict, source: Source, path: tuple):
    """The method kind's config from `options`; unknown keys and bad values are named."""
    from .methods import METHODS

    return dataclass_from(METHODS[kind].Config, options, source, path)


def parse_orderings(raw: dict, source: Source) -> dict:
    specs = {}
    for name, entry in as_mapping(raw, source, ("orderings",)).items():
        specs[name] = parse_ordering(name, entry, source, ("orderings", name))
    return specs


def parse_ordering(name: str, entry: dict, source: Source = CODE, path: tuple = ()) -> OrderingSpec:
    from .orderings import ORDERING_KINDS

    entry = dict(as_mapping(entry, source, path))
    kind = entry.pop("kind", None)
    if kind not in ORDERING_KINDS:
        fail(source, path + ("kind",),
             f"unknown ordering kind {kind!r}{closest(kind, ORDERING_KINDS)}; known: {sorted(ORDERING_KINDS)}")
    accepted = [p for p in inspect.signature(ORDERING_KINDS[kind]).parameters if p != "manifest"]
    check_keys(entry, accepted, source, path, f"option of ordering kind {kind!r}:")
    return OrderingSpec(name, kind, frozen(entry))


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
    orderings = parse_orderings(params.get("orderings"), source)
    sweep = block("sweep", SweepConfig)
    calibration, ablations = block("calibration", CalibrationConfig), block("ablations", AblationConfig)
    testbed = block("testbed", TestbedConfig)
    check_names(sweep.datasets, streams, source, ("sweep", "datasets"), "dataset")
    check_names(sweep.methods, methods, source, ("sweep", "methods"), "method")
    check_names(sweep.orderings, orderings, source, ("sweep", "orderings"), "ordering")
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
        tuning=block("tuning", TuningConfig), run=block("run", RunConfig),
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


# ---------------------------------------------------------------- templates

TIP_TEMPLATES = (  # the 7 templates of Tip-Adapter, used by TDA, DMN and OnZeta on the ImageNet family
    "itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.", "a {} in a video game.",
    "art of the {}.", "a photo of the small {}.",
)


OPENAI_IMAGENET = "open_clip's OPENAI_IMAGENET_TEMPLATES"  # read from open_clip when a run uses them


def template_set(settings: Settings, name: str) -> tuple:
    """A template set by name; OpenAI's 80 ImageNet templates come from open_clip on first use."""
    value = settings.templates[name]
    if value == OPENAI_IMAGENET:
        from open_clip import OPENAI_IMAGENET_TEMPLATES

        return tuple(t("{}") if callable(t) else t for t in OPENAI_IMAGENET_TEMPLATES)
    return value


def resolve_templates(settings: Settings, spec: MethodSpec, dataset: str, check_only: bool = False,
                      source: Source = CODE):
    """The templates a method's text classifier averages on `dataset`; None for the prompt's own v0.

    `templates` is null (v0), a set name (`tip`, `openai_imagenet`, a `templates:` entry, or `dataset` for the
    dataset's CoOp template), a list of those and literal templates, or a mapping dataset -> any of these with a
    `default`.
    """
    value = spec.templates
    if isinstance(value, dict):
        value = value.get(dataset, value.get("default"))
    if value is None:
        return None
    out = []
    for item in [value] if isinstance(value, str) else list(value):
        if item == "dataset":
            entry = settings.datasets.get(dataset)
            out.append((entry.template if entry and entry.template else "a photo of a {}."))
        elif item in settings.templates:
            out.extend(() if check_only else template_set(settings, item))
        elif isinstance(item, str) and "{}" in item:
            out.append(item)
        else:
            fail(source, ("methods", spec.name, "templates"),
                 f"{item!r} is neither a template set{closest(item, settings.templates)} nor a template with '{{}}'")
    return None if check_only else tuple(out)


# ---------------------------------------------------------------- the resolver


@dataclass(frozen=True)
class RunSettings:
    """What one (dataset, method) run uses, every override applied."""

    views: ViewConfig
    tuning: TuningConfig
    options: object  # the method kind's Config
    templates: tuple | None
    block_size: int
    threads: int

    def describe(self) -> dict:
        """The settings as flat, searchable key/values (MLflow params, the run summary)."""
        out = {f"views.{k}": v for k, v in asdict(self.views).items()}
        out.update({f"tuning.{k}": v for k, v in asdict(self.tuning).items()})
        out.update({f"method.{k}": v for k, v in asdict(self.options).items()})
        out["method.templates"] = "v0" if self.templates is None else f"{len(self.templates)} templates"
        out.update({"run.block_size": self.block_size, "run.threads": self.threads})
        return out


def dataset_views(settings: Settings, dataset: str) -> ViewConfig:
    """A dataset's own views: `views:` with its AugMix setting."""
    spec = settings.datasets[dataset]
    return settings.views if spec.augmix is None else replace(settings.views, augmix=bool(spec.augmix))


def method_views(settings: Settings, method: MethodSpec, dataset: str) -> ViewConfig:
    """The views a method sees on a (non-mixture) dataset."""
    overrides = {**method.views, **dict(method.per_dataset.get(dataset, {})).get("views", {})}
    return with_overrides(dataset_views(settings, dataset), overrides)


def stream_tuning(settings: Settings, dataset: str) -> dict:
    """The tuning overrides a dataset (or a mixture, from its members when they agree) sets."""
    if dataset in settings.mixtures:
        mixture = settings.mixtures[dataset]
        if mixture.tuning:
            return dict(mixture.tuning)
        members = [dict(settings.datasets[m].tuning) for m in mixture.members]
        if any(m != members[0] for m in members):
            raise ParamsError(f"mixture {dataset!r}: its members set different `tuning:` "
                              f"({dict(zip(mixture.members, members))}); give the mixture its own `tuning:`")
        return members[0]
    return dict(settings.stream(dataset).tuning)


def resolve_run(settings: Settings, dataset: str, method: str) -> RunSettings:
    """The effective settings of `method` on `dataset` (precedence in the module docstring)."""
    from .methods import METHODS

    spec = settings.method(method)
    settings.stream(dataset)
    per_dataset = dict(spec.per_dataset.get(dataset, {}))
    tuning = with_overrides(settings.tuning, {**stream_tuning(settings, dataset), **spec.tuning,
                                             **per_dataset.pop("tuning", {})})
    per_dataset.pop("views", None)
    members = settings.mixtures[dataset].members if dataset in settings.mixtures else (dataset,)
    views = {m: method_views(settings, spec, m) for m in members}
    config = dataclass_from(METHODS[spec.kind].Config, {**spec.options, **per_dataset})
    return RunSettings(views=views[members[0]], tuning=tuning, options=config,
                       templates=resolve_templates(settings, spec, dataset), block_size=settings.run.block_size,
                       threads=settings.run.threads)


def member_views(settings: Settings, dataset: str, method: str) -> dict:
    """The views of each member of a stream (one entry for a plain dataset)."""
    spec = settings.method(method)
    members = settings.mixtures[dataset].members if dataset in settings.mixtures else (dataset,)
    return {m: method_views(settings, spec, m) for m in members}
