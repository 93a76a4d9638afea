"""Resolution: the effective settings of one run, every override applied, resolved once into a `ResolvedRun`.

Later entries win:
    views:   `views:`  <  `datasets.<d>.augmix`  <  `methods.<m>.views`  <  `methods.<m>.per_dataset.<d>.views`
    tuning:  `tuning:` <  `datasets.<d>.tuning`  <  `methods.<m>.tuning` <  `methods.<m>.per_dataset.<d>.tuning`
    options: `methods.<m>.<option>`  <  `methods.<m>.per_dataset.<d>.<option>`; a method that computes view features
             itself (a `feature_dtype` option) rounds them to `embed.dtype` unless its options say otherwise
A mixture takes the views of each member and the tuning its members agree on (or its own `tuning:`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from .objectives import TuningConfig
from .results import SHARED_ORDERING, RunKey
from .schema import CODE, ParamsError, Source, closest, dataclass_from, fail, with_overrides
from .specs import MethodSpec, Settings
from .views import ViewConfig

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

    views: ViewConfig  # the views of the stream's (first) member
    tuning: TuningConfig
    options: object  # the method kind's Config
    templates: tuple | None
    block_size: int
    threads: int
    max_text_tokens: int = 0  # the text encoder's token budget per pass (0: no limit)
    member_views: tuple = ()  # (member dataset, ViewConfig) per member of a mixture; one pair for a dataset
    device: str = "cpu"  # the device type the run computes on (cpu, cuda): `model.device` with `auto` resolved
    precision: str = "fp32"  # fp32, or the autocast the tuning uses there (fp16-autocast on cuda, bf16 on cpu)
    perturbation: str = "none"  # the last-bit perturbation of the features it reads: `lastbit(seed=s,replicate=r)`

    def describe(self) -> dict:
        """The settings as flat, searchable key/values (MLflow params, the run summary)."""
        out = {f"views.{k}": v for k, v in asdict(self.views).items()}
        out.update({f"tuning.{k}": v for k, v in asdict(self.tuning).items()})
        out.update(flat_items("method.", asdict(self.options)))  # a nested option (RLCF's teacher) as method.a.b
        out["method.templates"] = "v0" if self.templates is None else f"{len(self.templates)} templates"
        out.update({"run.block_size": self.block_size, "run.threads": self.threads,
                    "run.max_text_tokens": self.max_text_tokens, "run.device": self.device,
                    "run.precision": self.precision, "run.perturbation": self.perturbation})
        return out

    def identity(self) -> dict:
        """The settings that can change a run's records (the fingerprint's share; see dynaprompt.provenance):
        `describe()` less the CPU thread count on a GPU, where torch's CPU threads compute nothing of the run."""
        out = self.describe()
        if self.device != "cpu":
            del out["run.threads"]
        return out

    @property
    def views_by_member(self) -> dict:
        return dict(self.member_views)


def flat_items(prefix: str, mapping: dict):
    """(dotted key, value) pairs of a mapping, nested mappings spelled out key by key."""
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from flat_items(f"{prefix}{key}.", value)
        else:
            yield f"{prefix}{key}", value


def dataset_views(settings: Settings, dataset: str) -> ViewConfig:
    """A dataset's own views: `views:` with its AugMix setting."""
    spec = settings.datasets[dataset]
    return settings.views if spec.augmix is None else replace(settings.views, augmix=bool(spec.augmix))


def method_views(settings: Settings, method: MethodSpec, dataset: str, seed: int | None = None) -> ViewConfig:
    """The views a method sees on a (non-mixture) dataset, under view seed `seed` (None: as resolved)."""
    overrides = {**method.views, **dict(method.per_dataset.get(dataset, {})).get("views", {})}
    views = with_overrides(dataset_views(settings, dataset), overrides)
    return views if seed is None else replace(views, view_seed=int(seed))


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


def stream_members(settings: Settings, dataset: str) -> tuple:
    """The datasets behind a stream: a mixture's members, or the dataset itself."""
    return tuple(settings.mixtures[dataset].members) if dataset in settings.mixtures else (dataset,)


def resolve_run(settings: Settings, dataset: str, method: str, seed: int | None = None,
                replicate: int = 0) -> RunSettings:
    """The effective settings of `method` on `dataset` (precedence in the module docstring); `seed` replaces the
    view seed of every member's views (None: as resolved); `replicate` picks the last-bit perturbation."""
    from .methods import METHODS

    spec = settings.method(method)
    settings.stream(dataset)
    per_dataset = dict(spec.per_dataset.get(dataset, {}))
    tuning = with_overrides(settings.tuning, {**stream_tuning(settings, dataset), **spec.tuning,
                                             **per_dataset.pop("tuning", {})})
    per_dataset.pop("views", None)
    views = tuple((m, method_views(settings, spec, m, seed)) for m in stream_members(settings, dataset))
    config = dataclass_from(METHODS[spec.kind].Config, {**feature_defaults(settings, METHODS[spec.kind].Config),
                                                        **spec.options, **per_dataset})
    return RunSettings(views=views[0][1], tuning=tuning, options=config,
                       templates=resolve_templates(settings, spec, dataset), block_size=settings.run.block_size,
                       threads=settings.run.threads, max_text_tokens=settings.run.max_text_tokens,
                       member_views=views, **compute_identity(settings.model.device, tuning),
                       perturbation=perturbation(settings, views[0][1].view_seed, replicate))


def perturbation(settings: Settings, view_seed: int, replicate: int) -> str:
    """How the run's features are perturbed: at the last bit, seeded by its view seed and replicate (`run.last_bit`);
    a replicate without it is an error (its runs would repeat the grid's own)."""
    if not settings.run.last_bit:
        if replicate:
            raise ParamsError(f"replicate {replicate} needs `run.last_bit: true` (replicates differ only in the "
                              "last-bit perturbation of their features)")
        return "none"
    return f"lastbit(seed={int(view_seed)},replicate={int(replicate)})"


def feature_defaults(settings: Settings, config_class) -> dict:
    """`feature_dtype` from `embed.dtype` for a method that encodes views itself (TTL), so that its features are
    rounded as the cached ones are."""
    return {"feature_dtype": settings.embed.dtype} if "feature_dtype" in {f.name for f in fields(config_class)} else {}


def device_type(name: str) -> str:
    """The device type `model.device` computes on (`auto`: cuda where torch sees a GPU, else cpu)."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type


def compute_identity(device_name: str, tuning: TuningConfig) -> dict:
    """The device type and precision of a run: fp32, or autocast where `tuning` asks for it (fp16 on a GPU, bf16
    on the CPU with `amp_on_cpu`), as `dynaprompt.objectives.autocast` applies it."""
    import torch

    from .objectives import uses_amp

    device = device_type(device_name)
    if not uses_amp(torch.device(device), tuning):
        return {"device": device, "precision": "fp32"}
    return {"device": device, "precision": "fp16-autocast" if device == "cuda" else "bf16-autocast"}


@dataclass(frozen=True)
class ResolvedRun:
    """One run, resolved once and handed down: what it is, what it uses, where its identity comes from.

    Every layer below the entry points (the executor, the method, the records, the summary) reads this and
    never goes back to the params.
    """

    key: RunKey
    settings: Settings  # the params it was resolved from: its stream is opened through them
    method: MethodSpec
    run: RunSettings
    ordering: dict  # the ordering as data ({"kind": "shuffle", "seed": 0}); natural for the shared run
    weights: str  # what the model loaded (a path, or "random(seed)")
    fingerprint: str
    ordering_family: str = ""  # the ordering's family (`dirichlet0.1`): a name, not in the fingerprint

    @property
    def label(self) -> str:
        return self.key.label

    @property
    def order_independent(self) -> bool:
        return self.method.order_independent

    @property
    def ordering_kind(self) -> str:
        return self.ordering["kind"]

    def shared(self) -> "ResolvedRun":
        """The manifest-order run an order-independent method computes once and every ordering reorders."""
        return resolve(self.settings, self.key.shared(), self.weights)


def resolve(settings: Settings, key: RunKey, weights: str) -> ResolvedRun:
    """Resolve `key` once: its method, effective settings, ordering and fingerprint (names checked here)."""
    from .provenance import fingerprint_run

    method = settings.method(key.method)
    run = resolve_run(settings, key.dataset, key.method, key.seed, key.replicate)
    ordering = ({"kind": "natural"} if key.ordering == SHARED_ORDERING
                else settings.ordering(key.ordering).as_dict())
    family = "natural" if key.ordering == SHARED_ORDERING else settings.ordering(key.ordering).family
    return ResolvedRun(key=key, settings=settings, method=method, run=run, ordering=ordering, weights=weights,
                       fingerprint=fingerprint_run(settings, key, method, run, ordering, weights),
                       ordering_family=family)
