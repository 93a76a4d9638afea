"""Before a GPU-hour is spent: what the params will read, what is on disk, and what the plan will cost.

`dynaprompt check --params P` prints one table of the datasets (found or missing, samples against the known
test-split size, classes, view settings, feature caches and their size on disk, existing or projected) and one
of the plan's estimated work: per dataset and method, the text encoder's TFLOPs from the actual sequence lengths,
classes, steps and selected prompts, and the image encoder's for the embed stage, converted to GPU-hours at a
throughput stated in `check:` (derived from TPT's own yardstick unless a GPU benchmark measured one). A missing
root is one line per dataset naming the path, and a non-zero exit; a missing paper dataset is still estimated,
projected at its known test-split size and class count (marked so), so the cost of a grid can be read before any
data is copied.

The arithmetic: a transformer layer costs 24 w^2 + 4 n w FLOPs per token and forward pass (w its width, n the
sequence length: the q/k/v/out projections 8 w^2, the MLP 16 w^2, the attention 4 n w); a backward pass costs
twice a forward. A tuning step over P prompts x C classes x L tokens is a forward and a backward (3 passes); a
prediction is one forward of the prompts it re-encodes.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .datasets import EXPECTED, DatasetNotFoundError, build_dataset, expected_samples
from .specs import Settings

TUNING_KINDS = ("tpt", "online_tpt", "ctpt", "rtpt")  # one prompt stepped per sample
ORDER_FREE_KINDS = ("zero_shot", "zero", "tpt", "ctpt", "rtpt", "mta")


@dataclass
class DatasetReport:
    """What `check` found for one dataset."""

    name: str
    kind: str
    root: str
    problem: str | None = None
    samples: int | None = None
    expected: int | None = None
    classes: int | None = None
    classnames: list = field(default_factory=list)
    size_checked: bool = True  # validate checks the known size (validate.known_split_sizes)
    caches: list = field(default_factory=list)  # {views, state, bytes, projected}
    projected: bool = False  # missing, but estimated at the known split size and class count

    @property
    def found(self) -> bool:
        return self.problem is None

    @property
    def estimable(self) -> bool:
        return self.found or self.projected


def layer_flops(width: int, length: int) -> float:
    """FLOPs of one transformer layer's forward pass per token."""
    return 24 * width**2 + 4 * length * width


def model_shapes(arch: str) -> dict:
    """Text and vision tower sizes of `arch` from its open_clip config (no weights needed)."""
    import open_clip

    from .model import register_arch

    cfg = open_clip.get_model_config(register_arch(arch))
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    image, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    image = image[0] if isinstance(image, (list, tuple)) else image
    return {"embed_dim": cfg["embed_dim"], "text_width": text.get("width", 512), "text_layers": text.get("layers", 12),
            "vision_width": vision.get("width", 768), "vision_layers": vision.get("layers", 12),
            "image_tokens": (image // patch) ** 2 + 1}


def known_classnames(kind: str) -> list:
    """The class names of a paper dataset that are known without its files (the ImageNet family), else []."""
    from .datasets import imagenet

    if kind in ("imagenet", "imagenet_v2", "imagenet_sketch"):
        return list(imagenet.imagenet_classnames())
    if kind in ("imagenet_a", "imagenet_r"):
        return imagenet.subset_classnames(kind)
    return []


def sequence_length(settings: Settings, classnames: list) -> int:
    """The prompt's token length after the end-of-text cut, for these class names (tokenizer only); without names
    (a projected fine-grained set), the length ImageNet's 1000 names give, as a stand-in."""
    return prompt_length(settings.model.arch, context_words(settings), classnames or known_classnames("imagenet"))


def context_words(settings: Settings) -> str:
    """The words the prompt's context stands in for (v0), or placeholders for a random init of n_ctx tokens."""
    return settings.prompt.ctx_init or " ".join(["X"] * settings.prompt.n_ctx)


def prompt_length(arch: str, context_words: str, classnames: list) -> int:
    """Tokens up to and including the last end-of-text token of '<context words> <class name>.' over the names."""
    import open_clip

    from .model import register_arch

    tokenizer = open_clip.get_tokenizer(register_arch(arch))
    tokens = tokenizer([f"{context_words} {name.replace('_', ' ')}." for name in classnames])
    return int(tokens.argmax(-1).max()) + 1


def tpt_text_flops(arch: str, classnames: list, context_words: str = "a photo of a", steps: int = 1) -> float:
    """FLOPs of TPT's text work on one sample (a step's forward and backward, then the prediction), as `estimate`
    counts them: what a measured ms/sample turns into an effective throughput for `check.tflops_per_second`."""
    shapes, length = model_shapes(arch), prompt_length(arch, context_words, classnames)
    passes = text_passes("tpt", None, steps, 0.0)
    return passes * len(classnames) * length * shapes["text_layers"] * layer_flops(shapes["text_width"], length)


def check_datasets(settings: Settings, names: list | None = None) -> list[DatasetReport]:
    """Each dataset through its adapter, and the state of the feature caches the plan needs on it."""
    from .features import FeatureStore
    from .plan import needed_views

    shapes = model_shapes(settings.model.arch)
    bytes_per = 2 if settings.embed.dtype == "float16" else 4
    reports = []
    for name in names or list(settings.datasets):
        spec = settings.datasets[name]
        root = str(spec.options.get("root") or spec.options.get("source") or "")
        report = DatasetReport(name, spec.kind, root, expected=expected_samples(spec),
                               size_checked=expected_samples(spec, settings) is not None)
        try:
            dataset = build_dataset(name, spec.kind, spec.options, base_dir=settings.base_dir)
        except (DatasetNotFoundError, ValueError, OSError) as error:
            report.problem = str(error)
            if spec.kind not in EXPECTED:
                reports.append(report)
                continue
            report.projected = True  # estimated at the known test split, and marked so
            report.samples, report.classes = EXPECTED[spec.kind]
            report.classnames = known_classnames(spec.kind)
        else:
            report.samples, report.classes = len(dataset), len(dataset.classnames)
            report.classnames = list(dataset.classnames)
        for views in needed_views(settings, name):
            store = FeatureStore.for_views(settings.path("features") / name, views)
            meta = store.read_meta()
            state = "complete" if meta and meta.get("complete") else ("partial" if meta else "absent")
            projected = report.samples * views.n_views * shapes["embed_dim"] * bytes_per
            size = store.features_file.stat().st_size if store.features_file.is_file() else projected
            report.caches.append({"views": store.folder.name, "seed": views.view_seed, "state": state,
                                  "bytes": size, "n_views": views.n_views, "projected": not meta})
        reports.append(report)
    return reports


def text_passes(kind: str, options, steps: int, selected: float) -> float:
    """Prompt encodings per sample, in forward-pass units (a forward and backward = 3)."""
    if kind in TUNING_KINDS:
        return 3 * steps + 1
    if kind == "dynaprompt":
        stepped = 3 * steps * selected
        return stepped + (options.buffer_size if options.selection == "official" else selected)
    return 0.0


def estimate(settings: Settings, reports: list[DatasetReport], measured_selected: dict | None = None) -> dict:
    """The plan's work per (dataset, method) in TFLOPs and GPU-hours, and the embed stage's per dataset."""
    from .plan import expand_plan
    from .resolve import resolve_run, stream_members

    shapes = model_shapes(settings.model.arch)
    found = {r.name: r for r in reports if r.estimable}
    lengths = {name: sequence_length(settings, r.classnames) for name, r in found.items()}
    runs: dict = {}
    for key, _group in expand_plan(settings):
        members = stream_members(settings, key.dataset)
        if not all(m in found for m in members):
            continue
        spec = settings.method(key.method)
        if spec.order_independent:
            key = key.shared()
        runs.setdefault((key.dataset, key.method), set()).add((key.ordering, key.seed))
    rows, throughput = [], tflops_per_second(settings)
    for (dataset, method), cells in runs.items():
        members = stream_members(settings, dataset)
        spec = settings.method(method)
        run = resolve_run(settings, dataset, method)
        samples = sum(mixture_share(settings, dataset, found[m].samples) for m in members)
        classes, length = found[members[0]].classes, max(lengths[m] for m in members)
        selected = (measured_selected or {}).get((dataset, method), settings.check.assumed_selected)
        passes = text_passes(spec.kind, run.options, run.tuning.steps, selected)
        per_sample = passes * classes * length * shapes["text_layers"] * layer_flops(shapes["text_width"], length)
        tflops = len(cells) * samples * per_sample / 1e12
        rows.append({"dataset": dataset, "method": method, "runs": len(cells), "samples": samples,
                     "tokens_per_pass": classes * length, "passes_per_sample": passes, "tflops": tflops,
                     "gpu_hours": tflops / throughput / 3600})
    embed = []
    for name, report in found.items():
        tokens = shapes["image_tokens"]
        per_view = shapes["vision_layers"] * tokens * layer_flops(shapes["vision_width"], tokens)
        pending = [c for c in report.caches if c["state"] != "complete"]
        tflops = sum(report.samples * c["n_views"] * per_view for c in pending) / 1e12
        embed.append({"dataset": name, "caches": len(report.caches), "to_build": len(pending), "tflops": tflops,
                      "gpu_hours": tflops / throughput / 3600})
    rows.sort(key=lambda r: -r["tflops"])
    total = sum(r["gpu_hours"] for r in rows) + sum(e["gpu_hours"] for e in embed)
    return {"runs": rows, "embed": embed, "throughput_tflops": throughput, "gpu_hours": total,
            "yardstick": settings.check.describe(), "projected": sorted(r.name for r in reports if r.projected)}


def mixture_share(settings: Settings, dataset: str, member_samples: int) -> int:
    """Samples a stream takes from one member: all of a dataset, `per_member` of a mixture's."""
    if dataset in settings.mixtures and settings.mixtures[dataset].per_member:
        return min(member_samples, settings.mixtures[dataset].per_member)
    return member_samples


def tflops_per_second(settings: Settings) -> float:
    """The stated effective throughput: `check.tflops_per_second`, else TPT's yardstick (its authors' seconds per
    sample on ImageNet-A on one A5000) divided into TPT's work per sample at this model's size."""
    from .datasets.imagenet import subset_classnames

    config = settings.check
    if config.tflops_per_second:
        return float(config.tflops_per_second)
    names = subset_classnames("imagenet_a")  # the yardstick's dataset: 200 classes
    per_sample = tpt_text_flops(settings.model.arch, names, context_words(settings))
    return per_sample / config.yardstick_seconds_per_sample / 1e12


def measured_selection(settings: Settings) -> dict:
    """(dataset, method) -> mean selected prompts per sample in the results already on disk (DynaPrompt kinds)."""
    import pandas as pd

    from .results import ResultsLayout

    layout, out = ResultsLayout(settings.path("results")), {}
    for summary in layout.summaries():
        if summary.method_kind == "dynaprompt" and (summary.dataset, summary.method) not in out:
            records = pd.read_parquet(layout.records(summary.key), columns=["n_selected"])
            out[(summary.dataset, summary.method)] = float(records["n_selected"].mean())
    return out


def size_text(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n_bytes < 1024 or unit == "TiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024
    return ""


def datasets_table(reports: list[DatasetReport]) -> str:
    lines = ["| dataset | kind | found | samples / expected | classes | caches (views: state, size) |",
             "|---|---|---|---|---|---|"]
    for r in reports:
        if not r.estimable:
            lines.append(f"| {r.name} | {r.kind} | MISSING | – | – | – |")
            continue
        if r.projected:
            total = size_text(sum(c["bytes"] for c in r.caches))
            lines.append(f"| {r.name} | {r.kind} | MISSING | projected at {r.samples} | {r.classes} | "
                         f"{len(r.caches)} caches projected, {total} |")
            continue
        expected = "?" if r.expected is None else str(r.expected)
        mark = "" if r.expected is None or r.expected == r.samples else " (differs)"
        mark += "" if r.size_checked or r.expected is None else " (not checked)"
        caches = "; ".join(f"{c['views']}: {c['state']}, {size_text(c['bytes'])}"
                           + (" projected" if c["projected"] else "") for c in r.caches) or "none planned"
        lines.append(f"| {r.name} | {r.kind} | yes | {r.samples} / {expected}{mark} | {r.classes} | {caches} |")
    return "\n".join(lines)


def estimate_table(work: dict, top: int | None = None) -> str:
    lines = ["| dataset | method | runs | samples | tokens per pass | passes per sample | TFLOPs | GPU-hours |",
             "|---|---|---|---|---|---|---|---|"]
    for r in work["runs"][:top]:
        lines.append(f"| {r['dataset']} | {r['method']} | {r['runs']} | {r['samples']} | {r['tokens_per_pass']} | "
                     f"{r['passes_per_sample']:.1f} | {r['tflops']:.3g} | {r['gpu_hours']:.3g} |")
    for e in work["embed"]:
        lines.append(f"| {e['dataset']} | (embed: {e['to_build']} of {e['caches']} caches to build) | | | | | "
                     f"{e['tflops']:.3g} | {e['gpu_hours']:.3g} |")
    return "\n".join(lines)


def summary_line(work: dict) -> str:
    top = ", ".join(f"{r['dataset']}/{r['method']} ({r['gpu_hours']:.3g} h)" for r in work["runs"][:3])
    projected = work.get("projected") or []
    note = (f"; {len(projected)} missing dataset(s) projected at their known test-split size"
            f" ({', '.join(projected)})" if projected else "")
    return (f"estimated {work['gpu_hours']:.3g} GPU-hours at {work['throughput_tflops']:.2f} effective TFLOP/s "
            f"({work['yardstick']}); most expensive: {top or 'none'}{note}")


def missing_lines(reports: list[DatasetReport]) -> list[str]:
    return [f"{r.name}: {r.problem}" for r in reports if not r.found]

