"""Benchmark: per-sample latency of every method, the library against a plain implementation of the same rules.

    python -m dynaprompt.bench [--arch tiny-clip|ViT-B-16] [--classes 200] [--samples N] [--views 64]
        [--buffer-size 10] [--threads 2] [--device cpu|cuda] [--out reports/benchmark.json]

Everything runs in one process, on a random-weight CLIP (no download) and random images, so the numbers are
ratios measured side by side on the same machine at the same time. For each method:

- library: `dynaprompt.methods` over view features from a cache (`features.CachedViewSource`) built once with
  the same image encoder; truncated text context; DynaPrompt with carried text features, metrics without grad
  and forward+backward of the selected prompts only.
- reference (`Plain*` below): the same rule written the plain way -- text at the full padded context length
  (77 tokens for ViT-B-16), the image encoder re-run over the views on every pass, and for DynaPrompt one
  parameter tensor holding every buffered prompt (+ v0 for the paper rule), metrics from one forward pass with
  grad over all of them, the loss on the selected ones and a backward pass through all of them (as the authors'
  code does), no features carried from sample to sample.

Both see the same views of the same images (the library through the cache), so their predictions must agree;
the table counts how many do. It also times DynaPrompt's parts, the DynaPrompt/TPT per-sample ratio, the peak
memory of each run, the lockstep runner against one-by-one runs of several orderings, and how many
image-encoder passes the feature cache saves over a sweep.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import resource
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .features import CachedViewSource
from .lockstep import lockstep_supported, run_lockstep
from .methods import build_method
from .methods.dynaprompt import select_official, select_paper
from .methods.zero import zero_vote
from .model import LoadedClip, ModelSpec, load_clip
from .objectives import TuningConfig, autocast, encode_for_prediction, make_grad_scaler, tune_contexts
from .runner import run_stream
from .text import PromptTextEncoder, text_tower
from .views import ViewConfig, ViewGenerator

METHOD_NAMES = ("zero_shot", "zero", "tpt", "online_tpt", "dynaprompt", "dynaprompt_official")
LOCKSTEP_METHODS = ("tpt", "online_tpt", "dynaprompt", "dynaprompt_official")


def method_specs(buffer_size: int) -> dict:
    return {
        "zero_shot": {"kind": "zero_shot"},
        "zero": {"kind": "zero"},
        "tpt": {"kind": "tpt"},
        "online_tpt": {"kind": "online_tpt"},
        "dynaprompt": {"kind": "dynaprompt", "selection": "paper", "buffer_size": buffer_size},
        "dynaprompt_official": {"kind": "dynaprompt", "selection": "official", "buffer_size": buffer_size},
    }


# ----------------------------------------------------------------------------------------------- measuring


class Clock:
    """Wall time per named part, synchronising the GPU around each part."""

    def __init__(self, device: torch.device):
        self.device = device
        self.parts: dict[str, float] = defaultdict(float)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def __call__(self, part: str):
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        self.parts[part] += time.perf_counter() - start

    def total(self) -> float:
        return sum(self.parts.values())


def _proc_status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class PeakMemory:
    """Peak memory above the starting point while the block runs, in MiB.

    CUDA: `torch.cuda.max_memory_allocated`. CPU (Linux): the process's peak resident set (VmHWM), reset at
    the start through /proc/self/clear_refs after handing freed heap back to the system; elsewhere the growth
    of `getrusage`'s max RSS (a lower bound: it only moves when the process's all-time peak does).
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mib: float | None = None
        self.how = ""

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.how = "cuda max_memory_allocated"
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except OSError:
            pass
        self.base = _proc_status_kb("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.how = "peak RSS (VmHWM reset via clear_refs)"
        except OSError:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            self.how = "ru_maxrss growth (lower bound)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mib = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        elif self.how.startswith("peak RSS"):
            self.peak_mib = max(0, (_proc_status_kb("VmHWM") or 0) - (self.base or 0)) / 1024
        else:
            self.peak_mib = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024
        return False


def available_memory_gib(device: torch.device) -> float:
    """Free memory for the reference's autograd graphs: GPU free memory, or MemAvailable on CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / 2**30
    kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                kb = int(line.split()[1])
    except OSError:
        pass
    return kb / 2**20 if kb else float("inf")


# ----------------------------------------------------------------------------------------------- the stream


def benchmark_classnames(n_classes: int) -> list[str]:
    """`n_classes` ImageNet class names spread over the 1000 (realistic token lengths), numbered past 1000."""
    from open_clip import IMAGENET_CLASSNAMES

    names = [IMAGENET_CLASSNAMES[i * len(IMAGENET_CLASSNAMES) // n_classes] for i in range(min(n_classes, 1000))]
    return names + [f"object {i}" for i in range(1000, n_classes)]


def random_images_views(clip: LoadedClip, n_samples: int, n_views: int, seed: int) -> list[torch.Tensor]:
    """The views [n_views, 3, S, S] of `n_samples` random images (smooth blobs plus noise), via ViewGenerator."""
    generator = ViewGenerator(ViewConfig(n_views=n_views, view_seed=seed), clip.image_size, clip.image_mean,
                              clip.image_std)
    rng = torch.Generator().manual_seed(seed)
    size = int(clip.image_size * 1.25)
    out = []
    for i in range(n_samples):
        coarse = torch.randint(0, 256, (3, 6, 6), generator=rng, dtype=torch.uint8)
        smooth = TF.resize(coarse, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)
        noise = torch.randint(-20, 21, smooth.shape, generator=rng)
        image = (smooth.int() + noise).clamp(0, 255).to(torch.uint8)
        out.append(generator(image, f"bench-{i}"))
    return out


# ----------------------------------------------------------------------------------------------- the reference


class PlainCLIP:
    """Prompted CLIP as commonly written (CoOp/TPT): full padded context, image encoder on every call."""

    def __init__(self, clip: LoadedClip, classnames: list[str], n_ctx: int = 4, ctx_init: str = "a photo of a",
                 amp: bool = True):
        self.model = clip.model
        self.tower = text_tower(clip.model)
        self.device = clip.device
        self.amp = amp and self.device.type == "cuda"
        names = [name.replace("_", " ") for name in classnames]
        tokens = clip.tokenizer([f"{ctx_init} {name}." for name in names]).to(self.device)  # full length
        with torch.no_grad():
            embedded = self.tower.token_embedding(tokens)
        self.prefix, self.suffix = embedded[:, :1], embedded[:, 1 + n_ctx:]
        self.eot = tokens.argmax(-1)
        self.v0 = embedded[0, 1:1 + n_ctx].clone()
        self.scale = self.model.logit_scale.exp().detach()
        self.context_length = tokens.shape[1]

    def text_features(self, contexts: torch.Tensor) -> torch.Tensor:
        """[P, n_ctx, width] -> unit-norm [P, C, E]: every prompt x class through the whole text transformer."""
        n_prompts, n_classes = contexts.shape[0], self.prefix.shape[0]
        prompts = torch.cat([
            self.prefix.unsqueeze(0).expand(n_prompts, -1, -1, -1),
            contexts.unsqueeze(1).expand(-1, n_classes, -1, -1).to(self.prefix.dtype),
            self.suffix.unsqueeze(0).expand(n_prompts, -1, -1, -1),
        ], dim=2).reshape(n_prompts * n_classes, self.context_length, -1)
        x = prompts + self.tower.positional_embedding
        x = self.tower.transformer(x, attn_mask=self.tower.attn_mask)
        x = self.tower.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), self.eot.repeat(n_prompts)]
        projection = self.tower.text_projection
        x = projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection
        return F.normalize(x, dim=-1).reshape(n_prompts, n_classes, -1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm fp32 features of a batch of views (autocast on GPU, as `features.ViewEncoder`)."""
        with torch.no_grad(), autocast(self.device, self.amp):
            return self.model.encode_image(images, normalize=True).float()

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """[V, P, C]."""
        return self.scale * torch.einsum("ve,pce->vpc", image_features.to(text_features.dtype), text_features)


def plain_entropy(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    return -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)


def plain_marginal_entropy_loss(logits: torch.Tensor, ratio: float) -> torch.Tensor:
    """TPT's loss over [V, P, C] logits: keep the lowest-entropy views (entropy averaged over prompts), then the
    mean over prompts of the entropy of the views' averaged softmax."""
    keep = torch.argsort(plain_entropy(logits.detach()).mean(-1), stable=True)
    keep = keep[: max(1, math.floor(ratio * logits.shape[0] + 1e-9))]
    log_probs = logits[keep].float().log_softmax(-1)
    log_mean = torch.logsumexp(log_probs, dim=0) - math.log(len(keep))
    return (-(log_mean.exp() * log_mean).sum(-1)).mean()


class PlainMethod:
    """A reference method: `reset()`, then `(views) -> (pred, entropy_after)`; `clock` times its parts."""

    def __init__(self, plain: PlainCLIP, tuning: TuningConfig, clock: Clock):
        self.plain, self.tuning, self.clock = plain, tuning, clock
        self.scaler = make_grad_scaler(plain.device, tuning)

    def reset(self) -> None:
        pass

    def optimizer(self, params: torch.Tensor) -> torch.optim.AdamW:
        t = self.tuning
        return torch.optim.AdamW([params], lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)

    def step(self, optimizer, loss) -> None:
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()

    def predict(self, views: torch.Tensor, contexts: torch.Tensor, mentions: list[int]):
        """Image encoder on the original view, text pass of the tuned prompts, logits averaged over mentions."""
        with self.clock("predict"), torch.no_grad():
            image = self.plain.image_features(views[:1])
            with autocast(self.plain.device, self.tuning.amp):
                text = self.plain.text_features(contexts).float()
            logits = self.plain.logits(image, text)[0, mentions].mean(0)
        return int(logits.argmax()), float(plain_entropy(logits))


class PlainZeroShot(PlainMethod):
    def reset(self):
        with torch.no_grad():
            self.text = self.plain.text_features(self.plain.v0.unsqueeze(0))  # once, not per sample

    def __call__(self, views):
        with self.clock("predict"), torch.no_grad():
            logits = self.plain.logits(self.plain.image_features(views[:1]), self.text)[0, 0]
        return int(logits.argmax()), float(plain_entropy(logits))


class PlainZero(PlainZeroShot):
    def __call__(self, views):
        with self.clock("predict"), torch.no_grad():
            logits = self.plain.logits(self.plain.image_features(views), self.text)[:, 0]
            original = logits[0]
            pred = zero_vote(logits, self.tuning.confident_ratio)
        return pred, float(plain_entropy(original))


class PlainTPT(PlainMethod):
    online = False

    def reset(self):
        self.context = self.plain.v0.clone()

    def __call__(self, views):
        start = self.context if self.online else self.plain.v0
        params = start.clone().unsqueeze(0).requires_grad_(True)
        optimizer = self.optimizer(params)
        for _ in range(self.tuning.steps):
            with self.clock("tune"):
                with autocast(self.plain.device, self.tuning.amp):
                    logits = self.plain.logits(self.plain.image_features(views), self.plain.text_features(params))
                    loss = plain_marginal_entropy_loss(logits, self.tuning.confident_ratio)
                self.step(optimizer, loss)
        self.context = params.detach()[0]
        return self.predict(views, params.detach(), [0])


class PlainOnlineTPT(PlainTPT):
    online = True


class PlainDynaPrompt(PlainMethod):
    """DynaPrompt without the library's shortcuts: every pass recomputes every prompt's text features with grad."""

    def __init__(self, plain, tuning, clock, buffer_size: int, selection: str):
        super().__init__(plain, tuning, clock)
        self.buffer_size, self.selection = buffer_size, selection

    def reset(self):
        self.contexts: dict[int, torch.Tensor] = {}
        self.uses: dict[int, int] = {}
        self.lru: list[int] = []
        self.next_id = 0
        if self.selection == "official":
            for _ in range(self.buffer_size):
                self._new()

    def _new(self) -> int:
        prompt_id, self.next_id = self.next_id, self.next_id + 1
        self.contexts[prompt_id], self.uses[prompt_id] = self.plain.v0.clone(), 0
        self.lru.append(prompt_id)
        return prompt_id

    def __call__(self, views):
        with self.clock("metrics"):
            if self.selection == "official" and all(u > 0 for u in self.uses.values()):
                slot = self.lru[0]  # all slots used: recycle the least recently used one
                self.contexts[slot], self.uses[slot] = self.plain.v0.clone(), 0
            # one parameter tensor: v0 (paper rule) and every buffered prompt, all in the graph
            rows = sorted(self.contexts) if self.selection == "official" else list(self.contexts)
            stack = ([] if self.selection == "official" else [self.plain.v0]) + [self.contexts[i] for i in rows]
            params = torch.stack(stack).clone().requires_grad_(True)
            optimizer = self.optimizer(params)
            with autocast(self.plain.device, self.tuning.amp):
                logits = self.plain.logits(self.plain.image_features(views), self.plain.text_features(params))
            detached = logits.detach().float()
            h = plain_entropy(detached).mean(0)
            top = detached.max(-1).values
            d = (top[:1] - top[1:]).mean(0)
            mentions, row_of = self._select(h, d, rows)
            for prompt_id in mentions:
                self.lru.remove(prompt_id)
                self.lru.append(prompt_id)
                self.uses[prompt_id] += 1
        loss_rows = [row_of[i] for i in mentions]
        for step in range(self.tuning.steps):
            with self.clock("tune"):
                if step:
                    with autocast(self.plain.device, self.tuning.amp):
                        logits = self.plain.logits(self.plain.image_features(views), self.plain.text_features(params))
                with autocast(self.plain.device, self.tuning.amp):
                    loss = plain_marginal_entropy_loss(logits[:, loss_rows], self.tuning.confident_ratio)
                self.step(optimizer, loss)  # backward through every row; only the selected rows are kept
        distinct = sorted(set(mentions))
        for prompt_id in distinct:
            self.contexts[prompt_id] = params.detach()[row_of[prompt_id]].clone()
        tuned = torch.stack([self.contexts[i] for i in distinct])
        return self.predict(views, tuned, [distinct.index(i) for i in mentions])

    def _select(self, h, d, rows):
        """Selected prompt ids (repeats allowed) and the parameter row of each."""
        if self.selection == "official":
            init = self.lru[0]
            mentions = [rows[i] for i in select_official(h, d, rows.index(init))]
            return mentions, {prompt_id: k for k, prompt_id in enumerate(rows)}
        row_of = {prompt_id: k + 1 for k, prompt_id in enumerate(rows)}
        mentions = [rows[k] for k in select_paper(h[1:], d[1:], h[0], d[0])]
        if not mentions:
            if len(self.contexts) >= self.buffer_size:
                victim = self.lru.pop(0)
                del self.contexts[victim], self.uses[victim]
            new = self._new()
            row_of[new] = 0  # a fresh prompt is v0: its row in the graph is v0's
            mentions = [new]
        return mentions, row_of


def build_plain(name: str, plain: PlainCLIP, tuning: TuningConfig, clock: Clock, buffer_size: int):
    if name == "zero_shot":
        return PlainZeroShot(plain, tuning, clock)
    if name == "zero":
        return PlainZero(plain, tuning, clock)
    if name == "tpt":
        return PlainTPT(plain, tuning, clock)
    if name == "online_tpt":
        return PlainOnlineTPT(plain, tuning, clock)
    selection = "official" if name == "dynaprompt_official" else "paper"
    return PlainDynaPrompt(plain, tuning, clock, buffer_size, selection)


def reference_graph_gib(clip: LoadedClip, n_prompts: int, n_classes: int, length: int) -> float:
    """Rough size of the autograd graph of one text pass with grad: ~12 floats per width per token per layer,
    plus the attention maps (measured: 5.3 GiB for ViT-B-16, one prompt x 200 classes x 77 tokens, fp32);
    less under autocast."""
    tower = text_tower(clip.model)
    width = tower.token_embedding.weight.shape[1]
    blocks = tower.transformer.resblocks
    heads = blocks[0].attn.num_heads if hasattr(blocks[0].attn, "num_heads") else max(1, width // 64)
    per_token = len(blocks) * (12 * width + 2 * heads * length)
    bytes_per = 2.5 if clip.device.type == "cuda" else 4
    return n_prompts * n_classes * length * per_token * bytes_per / 2**30


# ----------------------------------------------------------------------------------------------- runs


class LibraryRunner:
    """The library's method, one sample per call: the calls of `method(view_features)`, timed by part."""

    def __init__(self, spec, text, tuning, device):
        self.method = build_method(spec, text, tuning)
        self.text = text
        self.clock = Clock(device)

    def reset(self) -> None:
        self.method.reset()

    def __call__(self, view_features):
        method, clock = self.method, self.clock
        if not lockstep_supported(method):
            with clock("predict"):
                return method(view_features)
        # objectives.tune_and_finish, with a clock around each part
        with clock("metrics"):
            request = method.begin(view_features)
        with clock("tune"):
            tuned = tune_contexts(self.text, request.contexts, request.view_features, method.tuning, method.scaler,
                                  request.mentions)
        with clock("predict"):
            features = encode_for_prediction(self.text, tuned, method.tuning.amp)
            return method.finish(request, tuned, features)


def _timed_call(runner, argument):
    """Run one sample; its result, wall time and time per part."""
    parts = dict(runner.clock.parts)
    result = runner(argument)
    delta = {k: v - parts.get(k, 0.0) for k, v in runner.clock.parts.items()}
    return result, sum(delta.values()), delta


def compare_method(name, spec, text, plain, tuning, cache, ids, images, warmup, device, buffer_size,
                   with_reference: bool, reference_samples: int | None = None) -> tuple[dict, dict | None]:
    """Library and reference over the same stream, sample by sample, each warmed up first on `warmup`
    (sample id, views) pairs and then reset. The reference runs on the first `reference_samples` samples (all
    by default).

    Around each reference call the library runs twice, in two identical instances: one just before the
    reference call and one just after it. A sample's library time is the faster of the two, so that a stall
    left behind by the reference's multi-GiB autograd graph (seen on CPU after graphs of several GiB) is not
    charged to the library; both instances must give the same outcome.
    """
    library = LibraryRunner(spec, text, tuning, device)
    twin = LibraryRunner(spec, text, tuning, device) if with_reference else None
    reference = build_plain(name, plain, tuning, Clock(device), buffer_size) if with_reference else None
    runners = [r for r in (library, twin, reference) if r is not None]
    for runner in runners:
        runner.reset()
    for sample_id, views in warmup:
        library(cache(sample_id))
        if reference is not None:
            reference(views)
    for runner in runners:
        runner.clock.parts.clear()
        runner.reset()
    lib = {"preds": [], "entropy_after": [], "seconds": [], "n_selected": [], "peak_mib": 0.0,
           "seconds_before_reference": [], "seconds_after_reference": [], "twin_mismatches": 0}
    lib_parts: dict[str, float] = defaultdict(float)
    ref = {"preds": [], "entropy_after": [], "seconds": [], "peak_mib": 0.0} if reference is not None else None
    for index, (sample_id, views) in enumerate(zip(ids, images)):
        view_features = cache(sample_id)
        memory = PeakMemory(device)
        with memory:
            outcome, seconds, parts = _timed_call(library, view_features)
        lib["peak_mib"] = max(lib["peak_mib"], memory.peak_mib)
        lib["memory_how"] = memory.how
        lib["preds"].append(outcome.pred)
        lib["entropy_after"].append(outcome.entropy_after)
        lib["n_selected"].append(len(outcome.selected))
        lib["seconds_before_reference"].append(seconds)
        if reference is not None and (reference_samples is None or index < reference_samples):
            memory = PeakMemory(device)
            with memory:
                (pred, entropy_after), ref_seconds, _ = _timed_call(reference, views)
            ref["seconds"].append(ref_seconds)
            ref["peak_mib"] = max(ref["peak_mib"], memory.peak_mib)
            ref["preds"].append(pred)
            ref["entropy_after"].append(entropy_after)
        if twin is not None:  # keeps in step with `library` on every sample
            twin_outcome, twin_seconds, twin_parts = _timed_call(twin, view_features)
            lib["seconds_after_reference"].append(twin_seconds)
            if (twin_outcome.pred, twin_outcome.entropy_after) != (outcome.pred, outcome.entropy_after):
                lib["twin_mismatches"] += 1
            if twin_seconds < seconds:
                seconds, parts = twin_seconds, twin_parts
        lib["seconds"].append(seconds)
        for k, v in parts.items():
            lib_parts[k] += v
    lib["parts"] = dict(lib_parts)
    if ref is not None:
        ref["parts"] = dict(reference.clock.parts)
    return lib, ref


def reference_prompts(name: str, n_samples: int, buffer_size: int) -> int:
    """The most prompts one reference pass with grad holds."""
    if name == "dynaprompt_official":
        return buffer_size
    if name == "dynaprompt":
        return 1 + min(buffer_size, max(0, n_samples - 1))
    return 1 if name in ("tpt", "online_tpt") else 0


def lockstep_comparison(name, spec, text, tuning, cache, ids, labels, n_orderings, seed, device, repeats=2):
    """Several orderings one by one (`run_stream`) against `run_lockstep`; the same records, timed."""
    rng = np.random.default_rng(seed)
    orderings = [list(ids)] + [[ids[i] for i in rng.permutation(len(ids))] for _ in range(n_orderings - 1)]
    clock = Clock(device)
    plan = ["one_by_one", "lockstep"] if repeats < 2 else ["one_by_one", "lockstep", "lockstep", "one_by_one"]
    for way in plan:
        with clock(way):
            if way == "one_by_one":
                alone = [run_stream(build_method(spec, text, tuning), order, labels, cache) for order in orderings]
            else:
                together = run_lockstep(spec, text, tuning, orderings, labels, cache)
    same = sum(int((a["pred"] == b["pred"]).sum()) for a, b in zip(alone, together))
    drift = max(float(np.abs(a["entropy_after"].to_numpy() - b["entropy_after"].to_numpy()).max())
                for a, b in zip(alone, together))
    n = sum(len(order) for order in orderings) * len(plan) // 2
    return {
        "method": name, "orderings": n_orderings, "samples_total": sum(len(order) for order in orderings),
        "repeats": len(plan) // 2,
        "one_by_one_ms_per_sample": 1000 * clock.parts["one_by_one"] / n,
        "lockstep_ms_per_sample": 1000 * clock.parts["lockstep"] / n,
        "throughput_ratio": clock.parts["one_by_one"] / clock.parts["lockstep"],
        "identical_predictions": same, "max_entropy_diff": drift,
    }


# ----------------------------------------------------------------------------------------------- cache arithmetic


def image_encoder_passes(dataset_sizes: dict, method_kinds: list[str], n_orderings: int, steps: int) -> dict:
    """Image-encoder passes (one pass = the encoder over one sample's views) with and without the feature cache.

    Cached: one pass per sample per dataset. Uncached: every run (dataset x method x ordering) re-encodes every
    sample once per tuning step plus once to predict (zero-shot and ZERO: once).
    """
    per_sample = sum(1 if kind in ("zero_shot", "zero") else steps + 1 for kind in method_kinds)
    samples = sum(dataset_sizes.values())
    uncached = samples * n_orderings * per_sample
    return {
        "datasets": len(dataset_sizes), "samples": samples, "methods": len(method_kinds), "orderings": n_orderings,
        "runs": len(dataset_sizes) * len(method_kinds) * n_orderings, "cached_passes": samples,
        "uncached_passes": uncached, "saved_passes": uncached - samples,
        "factor": uncached / samples if samples else float("nan"),
    }


def sweep_plans(params_path: str | None, steps: int) -> list[dict]:
    """Cache savings for the sweep of params.yaml (when found) and for the paper's 15 datasets."""
    from .datasets import EXPECTED

    kinds = ["zero_shot", "zero_shot", "tpt", "online_tpt", "dynaprompt", "dynaprompt", "zero"]
    n_orderings = 5
    plans = []
    if params_path and Path(params_path).is_file():
        from .config import load_settings

        settings = load_settings(params_path)
        kinds = [spec.get("kind") for spec in settings.methods.values()] or kinds
        n_orderings = sum(1 for spec in settings.orderings.values() if spec.get("kind") != "cyclic") or n_orderings
        sizes = {}
        for name, spec in settings.datasets.items():
            size = spec.get("n_samples") or EXPECTED.get(spec.get("kind"), (None,))[0]
            if size:
                sizes[name] = int(size)
        if sizes:
            steps_here = settings.tuning.steps
            plans.append({"plan": f"{params_path} (datasets x methods x non-cyclic orderings)",
                          **image_encoder_passes(sizes, kinds, n_orderings, steps_here)})
    paper = {name: size for name, (size, _) in EXPECTED.items()}
    plans.append({"plan": "paper's 15 datasets, same methods and orderings",
                  **image_encoder_passes(paper, kinds, n_orderings, steps)})
    return plans


# ----------------------------------------------------------------------------------------------- main


def _ms(values) -> float:
    return 1000 * float(np.mean(values)) if len(values) else float("nan")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dynaprompt.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="tiny-clip", help="tiny-clip (bundled) or an open_clip config, e.g. ViT-B-16")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--samples", type=int, default=8, help="test samples in the stream")
    p.add_argument("--views", type=int, default=64)
    p.add_argument("--buffer-size", type=int, default=10, help="DynaPrompt's M")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--lr", type=float, default=5e-3)
    p.add_argument("--methods", default=",".join(METHOD_NAMES),
                   help="comma-separated subset of " + ",".join(METHOD_NAMES))
    p.add_argument("--lockstep-orderings", type=int, default=3,
                   help="orderings for the lockstep comparison; 0 skips it")
    p.add_argument("--max-reference-gib", type=float, default=None,
                   help="skip a reference whose autograd graph would need more (default: 80%% of free memory)")
    p.add_argument("--params", default="params.yaml", help="sweep plan for the feature-cache arithmetic (if present)")
    p.add_argument("--warmup", type=int, default=1, help="untimed samples each method runs first (then reset)")
    p.add_argument("--lockstep-repeats", type=int, default=1,
                   help="1: one-by-one then lockstep; 2: one-by-one, lockstep, lockstep, one-by-one (ABBA)")
    p.add_argument("--reference-samples", type=int, default=None,
                   help="run the reference on the first K samples only (speedup and identity over those K)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="reports/benchmark.json")
    return p


def main(argv=None) -> dict:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.methods.split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHOD_NAMES))
    if unknown:
        raise SystemExit(f"unknown --methods {unknown}; choose from {METHOD_NAMES}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None

    clip = load_clip(ModelSpec(arch=args.arch, pretrained=None, init_seed=args.seed, device=args.device))
    classnames = benchmark_classnames(args.classes)
    text = PromptTextEncoder(clip.model, clip.tokenizer, classnames)
    plain = PlainCLIP(clip, classnames)
    tuning = TuningConfig(lr=args.lr)
    specs = method_specs(args.buffer_size)

    all_images = [v.to(device) for v in random_images_views(clip, args.samples + args.warmup, args.views, args.seed)]
    all_ids = [f"bench-{i}" for i in range(args.samples + args.warmup)]
    warmup = list(zip(all_ids[args.samples:], all_images[args.samples:]))  # untimed, never in the stream
    images, ids = all_images[: args.samples], all_ids[: args.samples]
    labels = {sample_id: int(i * 7919 % args.classes) for i, sample_id in enumerate(ids)}
    cache_clock = Clock(device)
    with cache_clock("cache"):  # the embed stage: one image-encoder pass per sample, once per dataset
        features = torch.stack([plain.image_features(v) for v in all_images])
    cache = CachedViewSource(all_ids, features, device=device)
    with torch.no_grad():  # warm-up: first calls set up kernels
        text.encode(text.init_context.unsqueeze(0))
        plain.text_features(plain.v0.unsqueeze(0))

    budget = args.max_reference_gib if args.max_reference_gib is not None else 0.8 * available_memory_gib(device)
    rows, details, memory_how = [], {}, ""
    for name in names:
        n_reference = min(args.reference_samples or args.samples, args.samples)
        need = reference_graph_gib(clip, reference_prompts(name, n_reference, args.buffer_size), args.classes,
                                   plain.context_length)
        library, reference = compare_method(
            name, specs[name], text, plain, tuning, cache, ids, images, warmup, device, args.buffer_size,
            with_reference=need <= budget, reference_samples=args.reference_samples,
        )
        k = len(reference["seconds"]) if reference else 0
        k_samples = max(k, 1)
        compared = library["seconds"][:k]
        memory_how = library["memory_how"]
        row = {
            "method": name,
            "library_ms": _ms(library["seconds"]),
            "library_median_ms": 1000 * float(np.median(library["seconds"])),
            "reference_ms": _ms(reference["seconds"]) if reference else None,
            "reference_median_ms": 1000 * float(np.median(reference["seconds"])) if reference else None,
            "library_ms_on_reference_samples": _ms(compared) if reference else None,
            "speedup": (np.mean(reference["seconds"]) / np.mean(compared)) if reference else None,
            "identical": sum(a == b for a, b in zip(library["preds"], reference["preds"])) if reference else None,
            "n": k if reference else len(ids),
            "max_entropy_diff": (float(np.max(np.abs(np.subtract(library["entropy_after"][:k],
                                                                 reference["entropy_after"]))))
                                 if reference else None),
            "library_peak_mib": library["peak_mib"],
            "reference_peak_mib": reference["peak_mib"] if reference else None,
            "mean_selected": float(np.mean(library["n_selected"])) if name.startswith("dynaprompt") else None,
            "skipped": None if reference else f"reference graph needs ~{need:.0f} GiB > {budget:.0f} GiB free",
        }
        rows.append(row)
        details[name] = {
            "library_parts_ms": {k: 1000 * v / len(ids) for k, v in library["parts"].items()},
            "reference_parts_ms": (
                {k: 1000 * v / k_samples for k, v in reference["parts"].items()} if reference else None
            ),
            "library_seconds": library["seconds"], "reference_seconds": reference["seconds"] if reference else None,
            "library_preds": library["preds"], "reference_preds": reference["preds"] if reference else None,
            "n_selected": library["n_selected"],
            "library_seconds_before_reference": library["seconds_before_reference"],
            "library_seconds_after_reference": library["seconds_after_reference"],
            "library_twin_mismatches": library["twin_mismatches"],
        }
        print(f"  {name}: library {row['library_ms']:.1f} ms/sample"
              + (f", reference {row['reference_ms']:.1f} ms/sample" if reference else f", reference {row['skipped']}"),
              flush=True)

    lockstep = []
    if args.lockstep_orderings > 1:
        for name in [n for n in names if n in LOCKSTEP_METHODS]:
            lockstep.append(lockstep_comparison(name, specs[name], text, tuning, cache, ids, labels,
                                                args.lockstep_orderings, args.seed, device, args.lockstep_repeats))

    by_name = {row["method"]: row for row in rows}
    ratios = {}
    if "tpt" in by_name:
        for name in ("dynaprompt", "dynaprompt_official"):
            if name in by_name:
                ratios[f"{name}/tpt library"] = by_name[name]["library_ms"] / by_name["tpt"]["library_ms"]
                if by_name[name]["reference_ms"] and by_name["tpt"]["reference_ms"]:
                    ratios[f"{name}/tpt reference"] = by_name[name]["reference_ms"] / by_name["tpt"]["reference_ms"]

    report = {
        "command": "python -m dynaprompt.bench " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {
            "arch": args.arch, "classes": args.classes, "samples": args.samples, "views": args.views,
            "buffer_size": args.buffer_size, "threads": torch.get_num_threads(), "device": str(device),
            "reference_samples": min(args.reference_samples or args.samples, args.samples), "warmup": args.warmup,
            "tuning": asdict(tuning), "text_tokens_library": text.sequence_length,
            "text_tokens_reference": plain.context_length, "image_size": clip.image_size,
            "torch": torch.__version__, "cpu": platform.processor() or platform.machine(),
            "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "memory_measure": memory_how,
        },
        "cache_build_ms_per_sample": 1000 * cache_clock.parts["cache"] / len(all_ids),
        "methods": rows,
        "parts": details,
        "dynaprompt_tpt_ratio": ratios,
        "lockstep": lockstep,
        "feature_cache": sweep_plans(args.params, tuning.steps),
        "wall_seconds": time.perf_counter() - started,
        "load_average_start_end": [load_start, list(os.getloadavg()) if hasattr(os, "getloadavg") else None],
    }
    print(format_report(report))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
        print(f"\nwritten to {out}")
    return report


def _fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def format_report(report: dict) -> str:
    c = report["config"]
    lines = [
        f"\n{c['arch']}, {c['classes']} classes, {c['samples']} samples x {c['views']} views, M={c['buffer_size']}, "
        f"{c['device']}, {c['threads']} threads, torch {c['torch']}",
        f"text tokens per sequence: library {c['text_tokens_library']} (truncated), reference "
        f"{c['text_tokens_reference']}; feature cache build {report['cache_build_ms_per_sample']:.1f} ms/sample "
        "(once per dataset, not in the library times)",
    ]
    if c["reference_samples"] < c["samples"]:
        lines.append(f"reference on the first {c['reference_samples']} samples: speedup and identical predictions "
                     f"compare those; library ms is the mean over all {c['samples']}")
    lines += [
        "",
        "mean ms per sample; speedup = reference / library; identical = same prediction; max|dH| = largest "
        "difference of the final entropy; MiB = peak memory above the start",
        f"{'method':<20} {'library ms':>11} {'reference ms':>13} {'speedup':>8} {'identical':>10} "
        f"{'max|dH|':>8} {'lib MiB':>8} {'ref MiB':>8}",
    ]
    for r in report["methods"]:
        lines.append(
            f"{r['method']:<20} {r['library_ms']:>11.1f} {_fmt(r['reference_ms'], '13.1f', 'skipped'):>13} "
            f"{_fmt(r['speedup'], '7.1f') + ('x' if r['speedup'] else ''):>8} "
            f"{(str(r['identical']) + '/' + str(r['n'])) if r['identical'] is not None else '-':>10} "
            f"{_fmt(r['max_entropy_diff'], '8.1e'):>8} {_fmt(r['library_peak_mib'], '8.0f'):>8} "
            f"{_fmt(r['reference_peak_mib'], '8.0f'):>8}"
        )
        if r["skipped"]:
            lines.append(f"{'':<20} reference skipped: {r['skipped']}")
    for name in ("dynaprompt", "dynaprompt_official"):
        parts = report["parts"].get(name)
        if not parts:
            continue
        lib = parts["library_parts_ms"]
        text = (f"{name} parts, ms/sample: library metrics+selection (carried features) {lib.get('metrics', 0):.1f}, "
                f"fwd+bwd of selected {lib.get('tune', 0):.1f}, prediction {lib.get('predict', 0):.1f}")
        ref = parts["reference_parts_ms"]
        if ref:
            text += (f" | reference image encoder + grad forward over all prompts {ref.get('metrics', 0):.1f}, "
                     f"backward through all + step {ref.get('tune', 0):.1f}, prediction {ref.get('predict', 0):.1f}")
        mean_selected = next(r["mean_selected"] for r in report["methods"] if r["method"] == name)
        lines.append(text + f" | mean |S| {mean_selected:.2f}")
    if report["dynaprompt_tpt_ratio"]:
        lines.append("DynaPrompt/TPT per-sample time: " + ", ".join(
            f"{k} {v:.2f}x" for k, v in report["dynaprompt_tpt_ratio"].items()))
    lines.append(f"peak memory: {c['memory_measure']}, above the run's start")
    if report["lockstep"]:
        lines += ["", f"{'lockstep':<20} {'one-by-one ms':>14} {'lockstep ms':>12} {'throughput':>11} "
                  f"{'identical':>10} {'max|dH|':>8}"]
        for r in report["lockstep"]:
            lines.append(
                f"{r['method'] + ' x' + str(r['orderings']):<20} {r['one_by_one_ms_per_sample']:>14.1f} "
                f"{r['lockstep_ms_per_sample']:>12.1f} {r['throughput_ratio']:>10.2f}x "
                f"{str(r['identical_predictions']) + '/' + str(r['samples_total']):>10} {r['max_entropy_diff']:>8.1e}"
            )
    lines += ["", "image-encoder passes over a sweep (one pass = the encoder over one sample's views):"]
    for p in report["feature_cache"]:
        lines.append(
            f"  {p['plan']}: {p['datasets']} datasets x {p['methods']} methods x {p['orderings']} orderings "
            f"= {p['runs']} runs over {p['samples']} samples: cached {p['cached_passes']:,}, uncached "
            f"{p['uncached_passes']:,}, saved {p['saved_passes']:,} ({p['factor']:.0f}x fewer)"
        )
    load = report.get("load_average_start_end") or [None, None]
    lines.append(f"\nbenchmark wall time {report['wall_seconds']:.0f} s; 1-min load average at start "
                 f"{_fmt(load[0] and load[0][0], '.1f')}, at end {_fmt(load[1] and load[1][0], '.1f')} "
                 f"({os.cpu_count()} CPUs)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
