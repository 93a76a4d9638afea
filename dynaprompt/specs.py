"""The typed blocks of params.yaml: one frozen dataclass per block and per named entry, and `Settings`, the whole.

`dynaprompt.config` parses and checks a params file into these; `dynaprompt.resolve` turns them into the
effective settings of one run. Nothing here reads files.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .objectives import TuningConfig
from .schema import ParamsError, closest
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
    quick_gelu: bool | None = None  # null: as the weights say (OpenAI's checkpoints, the tag, open_clip_config.json
    #   beside the file), else the arch's config; true/false overrides


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
    max_text_tokens: int = 8192  # text-encoder tokens per pass (prompts x classes x sequence length), in chunks
    #   under activation checkpointing beyond it: bounds a step's memory whatever the prompts and classes; 0 = none
    checkpoint_every: int = 500  # samples between a run's checkpoints (records so far + the method's state);
    #   0 = never. Not part of a run's identity: resumed records equal uninterrupted ones
    last_bit: bool = True  # the view seed (and a chaos replicate) also moves every feature a run reads by one unit
    #   in the last place of the cache's precision (`dynaprompt.features.LastBitPerturbation`): a control that
    #   reaches methods reading only the original view (issue 25); false: features exactly as cached


@dataclass(frozen=True)
class EmbedConfig:
    """The `embed:` block: how the embed stage computes and stores view features."""

    dtype: str = "float16"  # storage precision: the encoder's half precision (its output under autocast on GPU)
    samples_per_batch: int = 8  # samples whose views share one encoder forward (GPU; on a CPU each worker encodes)
    loader_workers: int = 2  # DataLoader worker processes that make the views (on a CPU: and encode them)
    chunk_size: int = 256  # samples between progress commits: an interrupted embed resumes at the last one


@dataclass(frozen=True)
class CheckConfig:
    """The `check:` block: the assumptions of `dynaprompt check`'s cost estimate."""

    tflops_per_second: float | None = None  # effective throughput measured on your GPU (benchmarks/gpu.sh); null:
    #   TPT's yardstick below, converted at this model's size
    yardstick_seconds_per_sample: float = 0.25  # TPT (Shu et al. 2022): 0.25 s per ImageNet-A sample, one A5000
    assumed_selected: float = 3.0  # DynaPrompt's prompts stepped per sample where no finished run measured it

    def describe(self) -> str:
        if self.tflops_per_second:
            return "the measured throughput in check.tflops_per_second"
        return f"TPT's {self.yardstick_seconds_per_sample:g} s per ImageNet-A sample on one A5000"


@dataclass(frozen=True)
class ValidateConfig:
    """The `validate:` block."""

    known_split_sizes: bool = True  # check each paper dataset's known test-split size; false only to rehearse on
    #   synthetic trees (bin/rehearse): the report then says the check was relaxed


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


STREAM_SELECTIONS = ("all", "datasets", "mixtures")  # an ordering's `on:`, besides a list of stream names


@dataclass(frozen=True)
class OrderingSpec:
    """One ordering: a kind and its options (seed, block, delta, bins), its family and the streams it runs on.

    The family is the kind of stream the analysis compares: the ordering kind plus its defining options
    (`shuffle`, `dirichlet0.1`, `class_blocked`); its orderings differ in their seed only.
    """

    name: str
    kind: str
    options: dict = field(default_factory=dict)
    family: str = ""  # empty: `default_family` of the kind and options
    on: str | tuple = ""  # all | datasets | mixtures | a tuple of stream names; empty: the kind's default

    def __post_init__(self):
        if not self.family:
            object.__setattr__(self, "family", default_family(self.kind, self.options))
        if not self.on:
            object.__setattr__(self, "on", "mixtures" if self.kind == "cyclic" else "all")

    @property
    def seed(self) -> int | None:
        return self.options.get("seed")

    @property
    def defining_options(self) -> dict:
        """The options every ordering of its family shares: all but the seed."""
        return {k: v for k, v in self.options.items() if k != "seed"}

    def as_dict(self) -> dict:
        """The ordering as data, what `order_samples` and the run's fingerprint read (no family: a name)."""
        return {"kind": self.kind, **self.options}

    def runs_on(self, stream: str, mixtures) -> bool:
        """Whether this ordering is paired with `stream` (`mixtures`: the names of the mixtures)."""
        if isinstance(self.on, tuple):
            return stream in self.on
        return self.on == "all" or (self.on == "mixtures") == (stream in mixtures)


def default_family(kind: str, options: dict) -> str:
    """A family named as the field names the stream: the kind, with the concentration for Dirichlet streams
    (`dirichlet0.1`, NOTE's and StatA's delta); other options need an explicit `family:` to tell apart."""
    if kind == "dirichlet":
        import inspect

        from .orderings import dirichlet

        return f"dirichlet{float(options.get('delta', inspect.signature(dirichlet).parameters['delta'].default)):g}"
    return kind


def families_of(orderings: dict) -> dict:
    """family -> the names of its orderings, in params order."""
    out: dict = {}
    for name, spec in orderings.items():
        out.setdefault(spec.family, []).append(name)
    return out


@dataclass(frozen=True)
class ScheduleConfig:
    """`sweep.schedule`: the deployment that adds orderings until the intervals are tight."""

    name: str = "robustness"
    cron: str | None = None
    add_orderings: int = 2  # new orderings per order-dependent kind per scheduled run
    target_half_width: float = 0.01  # stop once every (dataset, method) 95% interval half-width is below this
    target_sd_order_width: float = 0.03  # ... and the width of SD(order)'s 95% interval is below this
    max_orderings: int = 50  # never more orderings of one kind on one dataset than this


@dataclass(frozen=True)
class ChaosConfig:
    """`sweep.chaos`: cells of the main grid replicated under the last-bit perturbation alone (same ordering, same
    view seed), so that each order-dependent method's pure-chaos SD is measured, not assumed (issue 25)."""

    orderings: tuple = ()  # orderings (or families: their first ordering) replicated on every stream they run on
    replicates: int = 0  # last-bit replicates of each such cell at the params' view seed (0: none)

    def __post_init__(self):
        if self.replicates < 0:
            raise ValueError(f"replicates must be >= 0, got {self.replicates}")


@dataclass(frozen=True)
class SweepConfig:
    """The `sweep:` block."""

    datasets: tuple | None = None  # null: every dataset and mixture
    methods: tuple | None = None  # null: every declared method
    orderings: tuple | None = None  # orderings or families (all their orderings); null: every ordering, each on the
    #   streams its `on:` selects
    view_seeds: tuple | None = None  # augmentation seeds crossed with the orderings; null: views.view_seed alone
    runner: str = "dask"  # dask (a LocalCluster, whose nanny restarts a lost worker) | process | thread
    workers: int = 2  # parallel runs on CPU (each with run.threads torch threads)
    workers_per_gpu: int = 1  # on a GPU node: worker processes (process runner) or threads (dask-cuda) per GPU
    dask_address: str | None = None  # tcp://scheduler:8786; null: a LocalCluster (LocalCUDACluster on GPUs)
    runs_per_task: int = 10  # an order-dependent method's runs of one dataset per task, one after another
    lost_worker_retries: int = 2  # times the runs of a lost worker go to a fresh runner before they count as failed
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    chaos: ChaosConfig = field(default_factory=ChaosConfig)

    def __post_init__(self):
        if self.runner not in ("process", "thread", "dask"):
            raise ValueError(f"runner must be 'process', 'thread' or 'dask', got {self.runner!r}")
        if self.workers < 1 or self.workers_per_gpu < 1 or self.runs_per_task < 1:
            raise ValueError("workers, workers_per_gpu and runs_per_task must be >= 1")
        if self.lost_worker_retries < 0:
            raise ValueError("lost_worker_retries must be >= 0")


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
    confidence: float = 0.95  # every interval's level; alpha = 1 - confidence for the tests
    bootstrap_samples: int = 2000  # resamples of the samples bootstrap (against zero-shot and TPT)
    seed: int = 0  # seeds the bootstrap, the permutation tests and the diagnostics' sample subset
    reference_kind: str = "shuffle"  # the family every kind is contrasted with: the i.i.d. stream (issue 25)
    adjustment: str = "fdr_bh"  # p-values adjusted across the report's rows: fdr_bh (Benjamini-Hochberg) | holm
    equivalence_margin: float = 0.01  # "no larger than m points": the report's declared margin (accuracy units)
    permutations: int = 9999  # of the within-kind permutation F test: p resolves to 1/(permutations + 1)
    power: float = 0.8  # the power at which an underpowered row's smallest detectable effect is stated
    tail_fraction: float = 0.1  # expected tail accuracy: the mean of exactly this worst fraction of runs
    diagnostic_samples: int = 100  # samples per stream of C-TPT's first-step diagnostic (~25 ms each)
    max_panels: int = 6  # datasets per figure / DynaPrompt runs in the buffer figure, plan order
    dpi: int = 110

    def __post_init__(self):
        if self.adjustment not in ("fdr_bh", "holm"):
            raise ValueError(f"adjustment must be 'fdr_bh' or 'holm', got {self.adjustment!r}")
        if not 0 < self.confidence < 1 or not 0 < self.power < 1:
            raise ValueError(f"confidence and power must lie in (0, 1), got {self.confidence} and {self.power}")
        if not 0 < self.tail_fraction <= 1:
            raise ValueError(f"tail_fraction must lie in (0, 1], got {self.tail_fraction}")
        if self.equivalence_margin < 0 or self.permutations < 1 or self.diagnostic_samples < 0:
            raise ValueError("equivalence_margin and diagnostic_samples must be >= 0, permutations >= 1")


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
    cache: str = ".cache"  # recomputable intermediates (text features of templates), outside DVC

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
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    check: CheckConfig = field(default_factory=CheckConfig)
    validate: ValidateConfig = field(default_factory=ValidateConfig)
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

