"""The benchmark's test stream: random images, their views, and the library's feature cache over them."""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from dynaprompt.features import CachedViewSource, ImageViewSource, ViewEncoder
from dynaprompt.model import LoadedClip
from dynaprompt.views import ViewConfig, ViewGenerator


def benchmark_classnames(n_classes: int) -> list[str]:
    """`n_classes` ImageNet class names spread over the 1000 (realistic token lengths), numbered past 1000."""
    from open_clip import IMAGENET_CLASSNAMES

    names = [IMAGENET_CLASSNAMES[i * len(IMAGENET_CLASSNAMES) // n_classes] for i in range(min(n_classes, 1000))]
    return names + [f"object {i}" for i in range(1000, n_classes)]


def random_image(size: int, generator: torch.Generator) -> torch.Tensor:
    """A uint8 [3, size, size] image: smooth colour blobs plus pixel noise."""
    coarse = torch.randint(0, 256, (3, 6, 6), generator=generator, dtype=torch.uint8)
    smooth = TF.resize(coarse, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    noise = torch.randint(-20, 21, smooth.shape, generator=generator)
    return (smooth.int() + noise).clamp(0, 255).to(torch.uint8)


class RandomImages:
    """`n` random images by sample id (`bench-0`, ...), loadable like a dataset's samples."""

    def __init__(self, n: int, size: int, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.ids = [f"bench-{i}" for i in range(n)]
        self.images = {sample_id: random_image(size, generator) for sample_id in self.ids}

    def load(self, sample_id: str) -> torch.Tensor:
        return self.images[sample_id]


class Stream:
    """The same samples two ways: view images for the reference, view features from the library's cache."""

    def __init__(self, clip: LoadedClip, n_samples: int, n_views: int, seed: int = 0, amp: bool = True):
        self.images = RandomImages(n_samples, int(clip.image_size * 1.25), seed)
        self.ids = self.images.ids
        views = ViewConfig(n_views=n_views, view_seed=seed)
        self.generator = ViewGenerator(views, clip.image_size, clip.image_mean, clip.image_std)
        # fp32 rows: the reference re-encodes the views in fp32, and this compares rules, not storage precision
        self.encoder = ViewEncoder(clip, views, amp=amp, dtype="float32")
        self.device = clip.device

    def build_cache(self) -> CachedViewSource:
        """The embed stage's work: the image encoder once over every sample's views."""
        return CachedViewSource.build(ImageViewSource(self.images, self.encoder), self.ids)

    def views(self, sample_id: str) -> torch.Tensor:
        """The views [n_views, 3, S, S] of one sample, the ones the cache encoded."""
        return self.generator(self.images.load(sample_id), sample_id).to(self.device)
