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
twice a forward. A tuning step over P prompts x C classes x L tokens is a forward and a backward (3 passes), or 4
where it is chunked (more than `run.max_text_tokens`): activation checkpointing runs each chunk's forward again in
the backward; a prediction is one forward of the prompts it re-encodes.

The memory table gives each method's peak GPU memory at the run's `max_text_tokens` (`memory_estimate`): the
model's weights in fp32, the text features the method keeps, and the larger of its gradient pass and its no-grad
pass. With the weights frozen, autograd keeps per token and layer only what the input's gradient needs
(dynaprompt/blocks.py): the two residual-stream inputs of the layer norms (fp32, with their mean and rstd), the
q/k/v (3 w), the attention's output (w) and log-sum-exp (one per head), and the GELU's input (mlp_ratio x w):
(6 + mlp_ratio) w + heads + 4 elements, plus the final layer norm's input per token (tests/test_check.py counts
the bytes autograd saves against it). A gradient pass keeps them for all its rows, or, chunked, for one chunk's
rows while its forward is recomputed, plus every chunk's output features; its backward adds gradients of about
(mlp_ratio + 2) w per token of a chunk. A no-grad pass holds about (6 + 2 mlp_ratio) w per token of one chunk.
Elements are 2 bytes under fp16 autocast (the residual stream stays fp32), else 4. Peers' caches (TDA's, DMN's
memory: 50 x classes x E) are not counted. It is an estimate: `benchmarks/gpu.sh` measures the peak.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache

from .datasets import EXPECTED, DatasetNotFoundError, build_dataset, expected_samples
from .specs import Settings

TUNING_KINDS = ("tpt", "online_tpt", "ctpt", "rtpt", "histpt", "rlcf")  # one prompt stepped per sample
IMAGE_TUNING_KINDS = ("ttl",)  # adapters in the image tower: every view through it forward and back per step


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
    """Text and vision tower sizes of `arch` from its open_clip config, and its parameter counts (no weights
    needed). A relative JSON arch is taken from the working directory: pass `settings_arch(settings)`."""
    import open_clip

    from .model import register_arch

    name = register_arch(arch)
    cfg = open_clip.get_model_config(name)
    vision, text = cfg["vision_cfg"], cfg["text_cfg"]
    image, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
    image = image[0] if isinstance(image, (list, tuple)) else image
    width = text.get("width", 512)
    return {"embed_dim": cfg["embed_dim"], "text_width": width, "text_layers": text.get("layers", 12),
            "text_heads": text.get("heads", width // 64), "text_mlp_ratio": text.get("mlp_ratio", 4.0),
            "vision_width": vision.get("width", 768),
            "vision_layers": vision.get("layers", 12), "image_tokens": (image // patch) ** 2 + 1,
            **parameter_counts(name)}


@lru_cache(maxsize=8)
def parameter_counts(name: str) -> dict:
    """Parameters of the whole model and of its text tower, counted on a weightless (meta) copy."""
    import open_clip
    import torch

    with torch.device("meta"):
        model = open_clip.create_model(name, pretrained=None, device="meta")
    text = model.text if hasattr(model, "text") else None
    text_params = (sum(p.numel() for p in text.parameters()) if text is not None else
                   sum(p.numel() for n, p in model.named_parameters() if not n.startswith("visual.")))
    return {"parameters": sum(p.numel() for p in model.parameters()), "text_parameters": text_params}


def settings_arch(settings: Settings) -> str:
    """`model.arch`, a relative JSON config taken from the params file's folder."""
    from .model import located

    arch = settings.model.arch
    return str(located(arch, settings.base_dir)) if arch.endswith(".json") else arch


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
    return prompt_length(settings_arch(settings), context_words(settings), classnames or known_classnames("imagenet"))


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


def tpt_text_flops(arch: str, classnames: list, context_words: str = "a photo of a", steps: int = 1,
                   chunked: bool = False) -> float:
    """FLOPs of TPT's text work on one sample (a step's forward and backward, then the prediction), as `estimate`
    counts them: what a measured ms/sample turns into an effective throughput for `check.tflops_per_second`.
    `chunked`: the step ran in chunks under checkpointing (its forward computed twice)."""
    shapes, length = model_shapes(arch), prompt_length(arch, context_words, classnames)
    passes = text_passes("tpt", None, steps, 0.0, chunked)
    return passes * len(classnames) * length * shapes["text_layers"] * layer_flops(shapes["text_width"], length)


def check_datasets(settings: Settings, names: list | None = None) -> list[DatasetReport]:
    """Each dataset through its adapter, and the state of the feature caches the plan needs on it."""
    from .features import FeatureStore
    from .plan import needed_views

    shapes = model_shapes(settings_arch(settings))
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


def text_passes(kind: str, options, steps: int, selected: float, chunked: bool = False) -> float:
    """Prompt encodings per sample, in forward-pass units: a forward and backward = 3, or 4 when the step is
    chunked (checkpointing runs each chunk's forward again in the backward)."""
    per_step = 4 if chunked else 3
    if kind in TUNING_KINDS:
        return per_step * steps + 1
    if kind == "dynaprompt":
        stepped = per_step * steps * selected
        return stepped + (options.buffer_size if options.selection == "official" else selected)
    return 0.0


def image_passes(kind: str, steps: int) -> float:
    """Image-tower passes over every view per sample, in forward units: TTL's forward and backward per step (3)
    and the prediction's forward; 0 for methods that read cached view features."""
    return 3 * steps + 1 if kind in IMAGE_TUNING_KINDS else 0.0


def view_flops(shapes: dict) -> float:
    """FLOPs of one view through the image tower."""
    tokens = shapes["image_tokens"]
    return shapes["vision_layers"] * tokens * layer_flops(shapes["vision_width"], tokens)


def sequences_per_chunk(max_tokens: int, length: int) -> float:
    """Whole sequences per text-encoder pass under `max_tokens` (`PromptTextEncoder.sequences_per_chunk`)."""
    return max(1, max_tokens // length) if max_tokens else math.inf


def step_is_chunked(prompts: float, classes: int, length: int, max_tokens: int) -> bool:
    """Whether a gradient pass over `prompts` x `classes` sequences runs in chunks."""
    return prompts > 0 and math.ceil(prompts) * classes > sequences_per_chunk(max_tokens, length)


def estimate(settings: Settings, reports: list[DatasetReport], measured_selected: dict | None = None) -> dict:
    """The plan's work per (dataset, method) in TFLOPs and GPU-hours, and the embed stage's per dataset."""
    from .plan import expand_plan
    from .resolve import resolve_run, stream_members

    shapes = model_shapes(settings_arch(settings))
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
        chunked = step_is_chunked(stepped_prompts(spec.kind, selected), classes, length, run.max_text_tokens)
        passes = text_passes(spec.kind, run.options, run.tuning.steps, selected, chunked)
        per_sample = passes * classes * length * shapes["text_layers"] * layer_flops(shapes["text_width"], length)
        per_sample += image_passes(spec.kind, run.tuning.steps) * run.views.n_views * view_flops(shapes)
        tflops = len(cells) * samples * per_sample / 1e12
        rows.append({"dataset": dataset, "method": method, "runs": len(cells), "samples": samples,
                     "tokens_per_pass": classes * length, "passes_per_sample": passes, "tflops": tflops,
                     "gpu_hours": tflops / throughput / 3600})
    embed = []
    for name, report in found.items():
        per_view = view_flops(shapes)
        pending = [c for c in report.caches if c["state"] != "complete"]
        tflops = sum(report.samples * c["n_views"] * per_view for c in pending) / 1e12
        embed.append({"dataset": name, "caches": len(report.caches), "to_build": len(pending), "tflops": tflops,
                      "gpu_hours": tflops / throughput / 3600})
    rows.sort(key=lambda r: -r["tflops"])
    total = sum(r["gpu_hours"] for r in rows) + sum(e["gpu_hours"] for e in embed)
    return {"runs": rows, "embed": embed, "throughput_tflops": throughput, "gpu_hours": total,
            "yardstick": settings.check.describe(), "projected": sorted(r.name for r in reports if r.projected)}


def stepped_prompts(kind: str, selected: float) -> float:
    """Prompts a tuning step encodes with grad: one for TPT's kinds, the selected ones for DynaPrompt, none else."""
    if kind in TUNING_KINDS:
        return 1.0
    return selected if kind == "dynaprompt" else 0.0


def memory_prompts(kind: str, options) -> dict:
    """Prompts in the worst-case step (grad), the no-grad pass (scored) and the text features kept (kept)."""
    if kind == "dynaprompt":  # every prompt of a full buffer selected; v0's features kept next to the buffer's
        return {"grad": options.buffer_size, "scored": options.buffer_size, "kept": options.buffer_size + 1}
    return {"grad": 1 if kind in TUNING_KINDS else 0, "scored": 1, "kept": 1}


def saved_bytes_per_token(shapes: dict, amp: bool) -> float:
    """Bytes autograd keeps per token of a gradient pass through the frozen text tower (module docstring)."""
    width, ratio, element = shapes["text_width"], shapes["text_mlp_ratio"], 2 if amp else 4
    per_layer = 2 * width * 4 + (4 + ratio) * width * element + shapes["text_heads"] * 4 + 4 * 4
    return shapes["text_layers"] * per_layer + (width + 2) * 4


def memory_estimate(shapes: dict, classes: int, length: int, max_tokens: int, prompts: dict, amp: bool) -> dict:
    """Peak GPU memory of one sample's text work, in bytes, by part (module docstring)."""
    width, ratio, element = shapes["text_width"], shapes["text_mlp_ratio"], 2 if amp else 4
    per_chunk = sequences_per_chunk(max_tokens, length)
    rows = prompts["grad"] * classes
    chunk_rows = min(rows, per_chunk)
    chunks = math.ceil(rows / per_chunk) if rows else 0
    grad_pass = 0.0
    if rows:
        grad_pass = chunk_rows * length * (saved_bytes_per_token(shapes, amp) + (ratio + 2) * width * element)
        grad_pass += rows * shapes["embed_dim"] * 4 if chunks > 1 else 0  # every chunk's output features
    scored_rows = min(prompts["scored"] * classes, per_chunk)
    forward = scored_rows * length * (6 + 2 * ratio) * width * element
    parts = {"weights": 4 * shapes["parameters"], "features": prompts["kept"] * classes * shapes["embed_dim"] * 4,
             "grad_pass": grad_pass, "forward": forward}
    return {**parts, "peak": parts["weights"] + parts["features"] + max(grad_pass, forward), "chunks": chunks,
            "sequences_per_chunk": min(per_chunk, max(rows, scored_rows))}


def memory_table_rows(settings: Settings, reports: list[DatasetReport]) -> list[dict]:
    """Per method, its peak GPU memory (estimate) on the found dataset where it is largest."""
    from .plan import expand_plan
    from .resolve import compute_identity, resolve_run, stream_members

    shapes = model_shapes(settings_arch(settings))
    found = {r.name: r for r in reports if r.estimable}
    lengths = {name: sequence_length(settings, r.classnames) for name, r in found.items()}
    best: dict = {}
    for key in dict.fromkeys((k.dataset, k.method) for k, _group in expand_plan(settings)):
        dataset, method = key
        members = stream_members(settings, dataset)
        if not all(m in found for m in members):
            continue
        run, spec = resolve_run(settings, dataset, method), settings.method(method)
        classes, length = found[members[0]].classes, max(lengths[m] for m in members)
        prompts = memory_prompts(spec.kind, run.options)
        precision = compute_identity("cuda", run.tuning)["precision"]  # on a GPU, whatever this machine has
        estimate = memory_estimate(shapes, classes, length, run.max_text_tokens, prompts, precision != "fp32")
        row = {"method": method, "dataset": dataset, "classes": classes, "length": length,
               "max_text_tokens": run.max_text_tokens, "precision": precision, "grad_prompts": prompts["grad"],
               **estimate}
        if method not in best or row["peak"] > best[method]["peak"]:
            best[method] = row
    return sorted(best.values(), key=lambda r: -r["peak"])


def memory_table(rows: list[dict]) -> str:
    lines = ["| method | largest on | precision | prompts with grad | sequences per pass | chunks | activations | "
             "peak GPU memory |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['dataset']} ({r['classes']} classes x {r['length']} tokens) | "
                     f"{r['precision']} | {r['grad_prompts']} | {r['sequences_per_chunk']} | {r['chunks']} | "
                     f"{size_text(max(r['grad_pass'], r['forward']))} | {size_text(r['peak'])} |")
    return "\n".join(lines)


def memory_line(rows: list[dict]) -> str:
    if not rows:
        return "peak GPU memory: nothing to estimate"
    top = rows[0]
    return (f"peak GPU memory (estimate, at run.max_text_tokens {top['max_text_tokens']}): "
            f"{size_text(top['peak'])} for {top['method']} on {top['dataset']}, {size_text(top['weights'])} of it "
            "the model's weights; benchmarks/gpu.sh measures it")


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
    per_sample = tpt_text_flops(settings_arch(settings), names, context_words(settings))
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

