"""Test-time views of one image: the original plus augmented views, a pure function of (view_seed, sample_id)."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from PIL import Image, ImageOps
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

AUGMIX_OPS = (
    "autocontrast", "equalize", "posterize", "rotate", "solarize",
    "shear_x", "shear_y", "translate_x", "translate_y",
)


@dataclass
class ViewConfig:
    """How the views of a test image are drawn; the `views:` block of params.yaml."""

    n_views: int = 64  # the original + 63 augmented views
    view_seed: int = 0
    crop_scale: tuple[float, float] = (0.08, 1.0)  # area fraction of the random resized crop (torchvision's default)
    augmix: bool = False  # AugMix on top of crop+flip (TPT does it for the fine-grained sets)
    augmix_severity: int = 1
    augmix_width: int = 3  # number of chains
    augmix_max_depth: int = 3  # each chain applies 1..max_depth ops


def view_seed_for(view_seed: int, sample_id: str) -> int:
    """A 63-bit seed that depends only on (view_seed, sample_id), stable across runs and platforms."""
    digest = hashlib.sha256(f"{view_seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _level(generator: torch.Generator, severity: int) -> float:
    """AugMix's operation strength: uniform in [0.1, severity), on a 0..10 scale."""
    return _uniform(generator, 0.1, severity)


def _sign(generator: torch.Generator) -> int:
    return 1 if float(torch.rand((), generator=generator)) > 0.5 else -1


def apply_augmix_op(name: str, image: Image.Image, severity: int, generator: torch.Generator) -> Image.Image:
    """One AugMix operation on a PIL image, as TPT's `augmix_ops` does it; strength drawn from `generator`.

    Rotate, shear and translate resample bilinear; shear and translate are PIL affine maps, whose origin is the
    top-left corner. Offsets scale with the image side (TPT's 224 px constant, generalised).
    """
    size = image.size[0]
    level = _level(generator, severity)
    if name == "autocontrast":
        return ImageOps.autocontrast(image)
    if name == "equalize":
        return ImageOps.equalize(image)
    if name == "posterize":
        return ImageOps.posterize(image, 4 - int(level * 4 / 10))
    if name == "solarize":
        return ImageOps.solarize(image, 256 - int(level * 256 / 10))
    if name == "rotate":
        return image.rotate(_sign(generator) * int(level * 30 / 10), resample=Image.BILINEAR)
    if name in ("shear_x", "shear_y"):
        shear = _sign(generator) * level * 0.3 / 10
        matrix = (1, shear, 0, 0, 1, 0) if name == "shear_x" else (1, 0, 0, shear, 1, 0)
        return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR)
    if name in ("translate_x", "translate_y"):
        pixels = _sign(generator) * int(level * size / 3 / 10)
        matrix = (1, 0, pixels, 0, 1, 0) if name == "translate_x" else (1, 0, 0, 0, 1, pixels)
        return image.transform(image.size, Image.AFFINE, matrix, resample=Image.BILINEAR)
    raise ValueError(f"unknown AugMix operation {name!r}")


def random_resized_crop_box(height: int, width: int, generator: torch.Generator, scale=(0.08, 1.0),
                            ratio=(3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (area in `scale`, log-uniform aspect `ratio`), drawn from `generator`."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * _uniform(generator, *scale)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            return top, left, h, w
    in_ratio = width / height  # fallback: the central crop with the closest allowed aspect ratio
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class ViewGenerator:
    """Original view (resize + centre crop) and augmented views (random resized crop, flip, optional AugMix)."""

    def __init__(self, config: ViewConfig, image_size: int, mean, std):
        self.config = config
        self.image_size = image_size
        self.original = v2.Compose([
            v2.Resize(image_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
        ])
        self.normalize = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])

    def __call__(self, image, sample_id: str) -> torch.Tensor:
        """All views [n_views, 3, S, S], normalised; view 0 is the original."""
        image = as_uint8_rgb(image)
        # Every random draw comes from this generator, never from torch's global RNG: runs in parallel
        # threads would otherwise interleave their draws and see different views.
        generator = torch.Generator().manual_seed(view_seed_for(self.config.view_seed, str(sample_id)))
        crops = [self.original(image)] + [self._crop(image, generator) for _ in range(self.config.n_views - 1)]
        if not self.config.augmix:  # normalised together: the same values as one by one, a fraction of the calls
            return self.normalize(torch.stack(crops))
        views = [self.normalize(crops[0])]
        for cropped in crops[1:]:
            views.append(self._augmix(cropped, self.normalize(cropped), generator))
        return torch.stack(views)

    def _crop(self, image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """A random resized crop, flipped half the time; uint8 [3, S, S]."""
        top, left, height, width = random_resized_crop_box(image.shape[-2], image.shape[-1], generator,
                                                           scale=tuple(self.config.crop_scale))
        # bilinear, as torchvision's RandomResizedCrop in TPT's `get_preaugment`
        cropped = TF.resized_crop(image, top, left, height, width, [self.image_size, self.image_size],
                                  interpolation=InterpolationMode.BILINEAR, antialias=True)
        if float(torch.rand((), generator=generator)) < 0.5:
            cropped = TF.horizontal_flip(cropped)
        return cropped

    def _augmix(self, cropped: torch.Tensor, view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Mix `augmix_width` op chains with Dirichlet weights, then blend with the plain view by Beta(1, 1)."""
        cfg = self.config
        exponentials = -torch.log1p(-torch.rand(cfg.augmix_width, generator=generator))
        chain_weights = exponentials / exponentials.sum()  # Dirichlet(1, ..., 1)
        blend = float(torch.rand((), generator=generator))  # Beta(1, 1) is uniform on [0, 1]
        mixed = torch.zeros_like(view)
        for weight in chain_weights:
            chained = TF.to_pil_image(cropped)
            depth = int(torch.randint(1, cfg.augmix_max_depth + 1, (), generator=generator))
            for _ in range(depth):
                op = AUGMIX_OPS[int(torch.randint(len(AUGMIX_OPS), (), generator=generator))]
                chained = apply_augmix_op(op, chained, cfg.augmix_severity, generator)
            mixed += weight * self.normalize(TF.pil_to_tensor(chained))
        return blend * view + (1 - blend) * mixed


def as_uint8_rgb(image) -> torch.Tensor:
    """Accept a PIL image, a uint8 [H, W(, 3)] array or a uint8 [3, H, W] tensor; return uint8 [3, H, W]."""
    if isinstance(image, Image.Image):
        return TF.pil_to_tensor(image.convert("RGB"))
    tensor = image if isinstance(image, torch.Tensor) else torch.tensor(image)  # a copy: mmap'd arrays are read-only
    if tensor.ndim == 2:
        tensor = tensor.unsqueeze(0).expand(3, -1, -1)
    elif tensor.ndim == 3 and tensor.shape[-1] in (1, 3) and tensor.shape[0] not in (1, 3):
        tensor = tensor.permute(2, 0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    if tensor.dtype != torch.uint8:
        raise TypeError(f"images must be uint8, got {tensor.dtype}")
    return tensor.contiguous()
