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

from .text import encode_tokens

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

# Caption prefix -> image style; applied together, with small probability, milder than the test corruptions.
STYLES = {
    "blurry": "a blurry photo of a {}.",
    "dark": "a dark photo of a {}.",
    "close-up": "a close-up photo of a {}.",
}

EVAL_TEMPLATES = TEMPLATES + list(STYLES.values()) + [
    "a bright photo of a {}.", "a sharp photo of a {}.", "a photo of a large {}.",
]


@dataclass
class PretrainConfig:
    """The `pretrain:` block of params.yaml."""

    steps: int = 800
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 50
    style_probability: float = 0.25  # chance that an image gets one of the styles (and its caption)
    crop_scale: tuple[float, float] = (0.6, 1.0)
    brightness: float = 0.3  # brightness jitter +-
    seed: int = 0
    eval_samples: int = 2000  # test images for the metrics
    threads: int = 2
    styles: dict = field(default_factory=lambda: dict(STYLES))


def apply_style(images: torch.Tensor, style: str) -> torch.Tensor:
    """The image side of a style caption, on float images [N, 3, H, W] in [0, 1]."""
    if style == "blurry":
        return TF.gaussian_blur(images, kernel_size=3, sigma=0.7)
    if style == "dark":
        return images * 0.55
    if style == "close-up":
        size = images.shape[-1]
        crop = int(round(size * 0.75))
        return TF.resize(TF.center_crop(images, [crop, crop]), [size, size], antialias=True)
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


def caption_bank(classnames, tokenizer, styles: dict):
    """Tokens of every caption, with its class and its style (-1 for none)."""
    texts, labels, style_ids = [], [], []
    for label, classname in enumerate(classnames):
        for synonym in SYNONYMS.get(classname, [classname]):
            for template in TEMPLATES:
                texts.append(template.format(synonym)), labels.append(label), style_ids.append(-1)
            for k, template in enumerate(styles.values()):
                texts.append(template.format(synonym)), labels.append(label), style_ids.append(k)
    return tokenizer(texts), torch.tensor(labels), torch.tensor(style_ids)


def caption_table(labels: torch.Tensor, styles: torch.Tensor, n_classes: int, n_styles: int):
    """Caption ids per (class, style + 1) padded into one table, with the pool sizes, for vectorised draws."""
    pools = [[torch.nonzero((labels == c) & (styles == s - 1)).flatten() for s in range(n_styles + 1)]
             for c in range(n_classes)]
    width = max(len(p) for row in pools for p in row)
    table = torch.zeros(n_classes, n_styles + 1, width, dtype=torch.long)
    sizes = torch.zeros(n_classes, n_styles + 1, dtype=torch.long)
    for c, row in enumerate(pools):
        for s, pool in enumerate(row):
            table[c, s, : len(pool)], sizes[c, s] = pool, len(pool)
    return table, sizes


def multi_positive_loss(image_features, text_features, labels, logit_scale) -> torch.Tensor:
    """Symmetric contrastive loss where every caption of the image's class is a positive (uniform target)."""
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


def pretrain(clip, train_pixels: np.ndarray, train_labels: np.ndarray, classnames, config: PretrainConfig,
             log=print) -> list[dict]:
    """Train `clip.model` in place; returns the loss curve (every 50 steps)."""
    model = clip.model
    model.train().requires_grad_(True)
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    tokens, caption_labels, caption_styles = caption_bank(classnames, clip.tokenizer, config.styles)
    style_names = list(config.styles)
    caption_pools, pool_size = caption_table(caption_labels, caption_styles, len(classnames), len(style_names))
    pixels = torch.from_numpy(np.asarray(train_pixels))
    labels = torch.from_numpy(np.asarray(train_labels))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
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
        for k, style in enumerate(style_names):
            chosen = style_of == k
            if chosen.any():
                images[chosen] = apply_style(images[chosen], style)
        pools, pool_sizes = caption_pools[batch_labels, style_of + 1], pool_size[batch_labels, style_of + 1]
        draw = (torch.rand(config.batch_size, generator=generator) * pool_sizes).long()
        captions = pools[torch.arange(config.batch_size), draw]
        image_features = F.normalize(model.encode_image(normalize(images, clip.image_mean, clip.image_std)), dim=-1)
        text_features = F.normalize(encode_tokens(model, tokens[captions]), dim=-1)
        loss = multi_positive_loss(image_features, text_features, batch_labels, model.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == config.steps - 1:
            curve.append({"step": step, "loss": float(loss.detach()), "seconds": time.perf_counter() - start})
            log(f"pretrain step {step:4d}/{config.steps} loss {float(loss.detach()):.4f} "
                f"logit_scale {float(model.logit_scale.detach().exp()):.1f} ({time.perf_counter() - start:.0f}s)")
    model.eval().requires_grad_(False)
    return curve


@torch.no_grad()
def zero_shot_accuracy(clip, pixels: np.ndarray, labels: np.ndarray, classnames, template: str = "a photo of a {}.",
                       batch_size: int = 500) -> float:
    """Zero-shot accuracy of `clip` with one template, on uint8 images [N, H, W, 3] (resized to the model)."""
    model = clip.model
    tokens = clip.tokenizer([template.format(c) for c in classnames])
    text = F.normalize(encode_tokens(model, tokens), dim=-1)
    correct = 0
    for i in range(0, len(pixels), batch_size):
        images = torch.from_numpy(np.asarray(pixels[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
        images = TF.resize(images, [clip.image_size, clip.image_size], antialias=True)
        features = F.normalize(model.encode_image(normalize(images, clip.image_mean, clip.image_std)), dim=-1)
        truth = torch.as_tensor(np.array(labels[i : i + batch_size]))
        correct += int(((features @ text.t()).argmax(1) == truth).sum())
    return correct / len(pixels)
