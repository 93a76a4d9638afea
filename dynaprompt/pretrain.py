"""Pretraining the bundled tiny CLIP on Fashion-MNIST, so the pipeline runs where no pretrained CLIP exists.

A multi-positive contrastive loss (every caption of the image's class is a positive) over captions drawn
from many templates and class synonyms. Some captions are coupled to a mild image style ("a blurry photo
of a ...", applied to the image too), which makes the wording of the prompt matter to the model -- without
it the tiny text tower learns to ignore the context words and prompt tuning has nothing to tune.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from .text import end_of_text_positions, run_text_tower, template_features, text_tower, truncate_tokens

SYNONYMS = {
    "t-shirt": ["t-shirt", "tee", "top", "tee shirt"],
    "trouser": ["trouser", "pants", "jeans"],
    "pullover": ["pullover", "sweater", "jumper"],
    "dress": ["dress", "gown", "frock"],
    "coat": ["coat", "jacket", "overcoat"],
    "sandal": ["sandal", "flip-flop", "slipper"],
    "shirt": ["shirt", "button-up shirt", "blouse"],
    "sneaker": ["sneaker", "trainer", "running shoe"],
    "bag": ["bag", "handbag", "purse", "tote"],
    "ankle boot": ["ankle boot", "boot", "bootie"],
}

TEMPLATES = [
    "a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a photo of the {}.", "a {}.", "the {}.",
    "a product photo of a {}.", "a catalogue photo of a {}.", "a grayscale photo of a {}.",
    "a low resolution photo of a {}.", "a small photo of a {}.", "a photo of my {}.", "a good photo of a {}.",
    "a cropped photo of a {}.", "a centered photo of a {}.", "an item of clothing: a {}.", "a piece of apparel, a {}.",
    "fashion item: {}.", "a black and white photo of a {}.", "this is a {}.",
]

# Caption template -> image style: mild versions of the corruption families of the test streams (blur, noise,
# pixelation, darkness). Applied together, image and caption, so the context words carry meaning.
STYLES = {
    "blurry": "a blurry photo of a {}.",
    "noisy": "a noisy photo of a {}.",
    "pixelated": "a pixelated photo of a {}.",
    "dark": "a dark photo of a {}.",
}
# Strength range per style, drawn uniformly per image: blur sigma (px at 32 px), noise std (of [0, 1] pixels),
# pixelation factor (fraction of the side kept), brightness factor. All milder than the test corruptions
# (defocus_blur-3: disk radius 6; gaussian_noise-3: std 0.18; pixelate-5: factor 0.25).
STYLE_STRENGTHS = {"blurry": (0.6, 1.2), "noisy": (0.03, 0.08), "pixelated": (0.5, 0.6), "dark": (0.4, 0.6)}

UNSEEN_TEMPLATES = ["a bright photo of a {}.", "a sharp photo of a {}.", "a photo of a large {}."]


@dataclass(frozen=True)
class PretrainConfig:
    """The `pretrain:` block of params.yaml."""

    output: str = "data/models/tiny-clip-fmnist.pt"  # the stage trains only when model.pretrained names this file
    source: str = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist, or a folder of idx files
    steps: int = 800
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    style_probability: float = 0.25  # chance that an image gets one of the styles (and its caption)
    # class_and_style: a caption is a positive for an image when both class and style match, so "a noisy photo of
    # a dress" is told apart from "a photo of a dress"; class: every caption of the class is a positive (then the
    # text tower learns to ignore the context words: template accuracies within 0.3 points).
    positives: str = "class_and_style"
    crop_scale: tuple[float, float] = (0.6, 1.0)
    brightness: float = 0.3  # brightness jitter +-
    seed: int = 0
    eval_samples: int = 2000  # test images for the metrics
    threads: int = 2
    templates: tuple = tuple(TEMPLATES)  # unstyled captions
    synonyms: dict = field(default_factory=lambda: dict(SYNONYMS))  # class name -> the words captions use
    styles: dict = field(default_factory=lambda: dict(STYLES))
    style_strengths: dict = field(default_factory=lambda: {k: list(v) for k, v in STYLE_STRENGTHS.items()})

    def __post_init__(self):
        if self.positives not in ("class_and_style", "class"):
            raise ValueError(f"pretrain.positives must be 'class_and_style' or 'class', got {self.positives!r}")
        unknown = sorted(set(self.styles) - set(STYLE_STRENGTHS))
        if unknown:
            raise ValueError(f"pretrain.styles: no image op for {unknown} (known: {sorted(STYLE_STRENGTHS)})")


def apply_style(images: torch.Tensor, style: str, strength: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The image side of a style caption on float images [N, 3, H, W] in [0, 1]; `strength` [N] per image."""
    if style == "blurry":
        return torch.stack([TF.gaussian_blur(image, kernel_size=5, sigma=float(s))
                            for image, s in zip(images, strength)])
    if style == "noisy":
        noise = torch.randn(images.shape, generator=generator)
        return (images + strength.view(-1, 1, 1, 1) * noise).clamp(0, 1)
    if style == "pixelated":
        size = images.shape[-1]
        out = torch.empty_like(images)
        for k, (image, s) in enumerate(zip(images, strength)):
            small = max(2, int(round(size * float(s))))
            out[k] = F.interpolate(F.adaptive_avg_pool2d(image[None], small), size=size, mode="nearest")[0]
        return out
    if style == "dark":
        return images * strength.view(-1, 1, 1, 1)
    raise ValueError(f"unknown style {style!r}")


def augment(images: torch.Tensor, config: PretrainConfig, generator: torch.Generator) -> torch.Tensor:
    """Random resized crop, flip and brightness jitter in one batched resampling.

    uint8 [N, H, W, 3] -> float [N, 3, H, W] in [0, 1].
    """
    x = images.permute(0, 3, 1, 2).float() / 255
    n = x.shape[0]
    low, high = config.crop_scale
    side = torch.sqrt(low + (high - low) * torch.rand(n, generator=generator))  # crop side, fraction of the image
    centre = (1 - side) * (2 * torch.rand(2, n, generator=generator) - 1)  # keeps the crop inside the image
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 1, 1] = side * flip, side
    theta[:, 0, 2], theta[:, 1, 2] = centre[0], centre[1]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    jitter = 1 + config.brightness * (2 * torch.rand(n, 1, 1, 1, generator=generator) - 1)
    return (out * jitter).clamp(0, 1)


def eval_templates(config: PretrainConfig) -> list[str]:
    """The templates whose zero-shot spread measures how much wording matters: training, style and unseen ones."""
    return list(config.templates) + list(config.styles.values()) + UNSEEN_TEMPLATES


def caption_bank(classnames, tokenizer, config: PretrainConfig):
    """Tokens of every caption, with its class and its pool: 0 the unstyled templates, 1..k the styles."""
    texts, labels, pools = [], [], []
    for label, classname in enumerate(classnames):
        for synonym in config.synonyms.get(classname, [classname]):
            for template in config.templates:
                texts.append(template.format(synonym)), labels.append(label), pools.append(0)
            for k, template in enumerate(config.styles.values()):
                texts.append(template.format(synonym)), labels.append(label), pools.append(k + 1)
    return tokenizer(texts), torch.tensor(labels), torch.tensor(pools)


def caption_table(labels: torch.Tensor, pool_ids: torch.Tensor, n_classes: int, n_pools: int):
    """Caption ids per (class, pool) padded into one table, with the pool sizes, for vectorised draws."""
    pools = [[torch.nonzero((labels == c) & (pool_ids == s)).flatten() for s in range(n_pools)]
             for c in range(n_classes)]
    width = max(len(p) for row in pools for p in row)
    table = torch.zeros(n_classes, n_pools, width, dtype=torch.long)
    sizes = torch.zeros(n_classes, n_pools, dtype=torch.long)
    for c, row in enumerate(pools):
        for s, pool in enumerate(row):
            table[c, s, : len(pool)], sizes[c, s] = pool, len(pool)
    return table, sizes


def multi_positive_loss(image_features, text_features, labels, logit_scale) -> torch.Tensor:
    """Symmetric contrastive loss where every caption with the image's label is a positive (uniform target).

    `labels` [N] identify what makes a caption right for an image: the class, or the class and the style.
    """
    logits = logit_scale * image_features @ text_features.t()
    positives = (labels[:, None] == labels[None, :]).float()
    targets = positives / positives.sum(1, keepdim=True)
    image_to_text = -(targets * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(targets.t() * logits.t().log_softmax(1)).sum(1).mean()
    return (image_to_text + text_to_image) / 2


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    return TF.normalize(images, list(mean), list(std))


def learning_rate(step: int, config: PretrainConfig) -> float:
    """Linear warmup, then cosine decay to zero."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * progress))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as open_clip's trainer makes them: no decay on gains, biases, embeddings and the temperature."""
    exempt = lambda name, p: p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exempt(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exempt(n, p)], "weight_decay": weight_decay}]


class CaptionEncoder:
    """The text tower over a fixed caption bank, training only the rows of the token table the bank uses.

    The full table has 49,408 rows of which the captions use about a hundred; updating it densely at every
    step cost a fifth of the step. The used rows are trained as a small table and written back at the end.
    """

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor):
        self.tower = text_tower(model)
        self.tokens = truncate_tokens(tokens)
        self.vocabulary, compact = torch.unique(self.tokens, return_inverse=True)
        self.compact_tokens = compact.view_as(self.tokens)
        self.table = torch.nn.Parameter(self.tower.token_embedding.weight[self.vocabulary].detach().clone())
        self.tower.token_embedding.weight.requires_grad_(False)

    def __call__(self, captions: torch.Tensor) -> torch.Tensor:
        """Unit-norm features of the captions with these bank indices."""
        embedded = F.embedding(self.compact_tokens[captions], self.table)
        return F.normalize(run_text_tower(self.tower, embedded, end_of_text_positions(self.tokens[captions])), dim=-1)

    @torch.no_grad()
    def write_back(self) -> None:
        self.tower.token_embedding.weight[self.vocabulary] = self.table


def pretrain(clip, train_pixels: np.ndarray, train_labels: np.ndarray, classnames, config: PretrainConfig,
             log=print) -> list[dict]:
    """Train `clip.model` in place; returns the loss curve (every 50 steps)."""
    model = clip.model
    model.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    style_names = list(config.styles)
    tokens, caption_labels, caption_pool_ids = caption_bank(classnames, clip.tokenizer, config)
    captions_encoder = CaptionEncoder(model, tokens)
    caption_pools, pool_size = caption_table(caption_labels, caption_pool_ids, len(classnames), len(style_names) + 1)
    pixels = torch.from_numpy(np.asarray(train_pixels))
    labels = torch.from_numpy(np.asarray(train_labels))
    groups = parameter_groups(model, config.weight_decay)
    groups[0]["params"].append(captions_encoder.table)
    optimizer = torch.optim.AdamW(groups, lr=config.lr)
    curve, start = [], time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = torch.randint(0, len(pixels), (config.batch_size,), generator=generator)
        images = augment(pixels[batch], config, generator)
        batch_labels = labels[batch]
        styled = torch.rand(config.batch_size, generator=generator) < config.style_probability
        drawn_style = torch.randint(0, len(style_names), (config.batch_size,), generator=generator)
        style_of = torch.where(styled, drawn_style, -1)
        strength = torch.rand(config.batch_size, generator=generator)
        for k, style in enumerate(style_names):
            chosen = style_of == k
            if chosen.any():
                low, high = config.style_strengths[style]
                images[chosen] = apply_style(images[chosen], style, low + (high - low) * strength[chosen], generator)
        pools, pool_sizes = caption_pools[batch_labels, style_of + 1], pool_size[batch_labels, style_of + 1]
        draw = (torch.rand(config.batch_size, generator=generator) * pool_sizes).long()
        captions = pools[torch.arange(config.batch_size), draw]
        image_features = F.normalize(model.encode_image(normalize(images, clip.image_mean, clip.image_std)), dim=-1)
        text_features = captions_encoder(captions)
        targets = batch_labels if config.positives == "class" else batch_labels * (len(style_names) + 1) + style_of + 1
        loss = multi_positive_loss(image_features, text_features, targets, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == config.steps - 1:
            curve.append({"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - start})
            log(f"pretrain step {step:4d}/{config.steps} loss {float(loss.detach()):.4f} "
                f"logit_scale {float(model.logit_scale.detach().exp()):.1f} ({time.perf_counter() - start:.0f}s)")
    captions_encoder.write_back()
    model.eval().requires_grad_(False)
    return curve


@torch.no_grad()
def image_features(clip, pixels: np.ndarray, batch_size: int = 500) -> torch.Tensor:
    """Unit-norm image features [N, E] of uint8 images [N, H, W, 3], resized to the model."""
    out = []
    for i in range(0, len(pixels), batch_size):
        images = torch.from_numpy(np.asarray(pixels[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
        images = TF.resize(images, [clip.image_size, clip.image_size], antialias=True)
        out.append(F.normalize(clip.model.encode_image(normalize(images, clip.image_mean, clip.image_std)), dim=-1))
    return torch.cat(out)


@torch.no_grad()
def template_accuracies(clip, features: torch.Tensor, labels: np.ndarray, classnames, templates, cache=None) -> dict:
    """Zero-shot accuracy of image `features` [N, E] under each template (its text features from `cache`, a
    `text.TemplateCache`, when given)."""
    truth = torch.as_tensor(np.asarray(labels))
    out = {}
    for template in templates:
        if cache is not None:
            text = cache.features(clip.model, clip.tokenizer, classnames, template, clip.device)
        else:
            text = template_features(clip.model, clip.tokenizer, classnames, template, clip.device)
        text = text.to(features.device)
        out[template] = float(((features @ text.t()).argmax(1) == truth).float().mean())
    return out
