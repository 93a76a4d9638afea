"""Image features of the views of each sample: computed from images, or read from a cache built once."""
from __future__ import annotations

from pathlib import Path

import torch

from .model import LoadedClip
from .views import ViewConfig, ViewGenerator


class ViewEncoder:
    """The frozen image encoder over the views of one image: [n_views, E], unit norm, fp32."""

    def __init__(self, clip: LoadedClip, views: ViewConfig, amp: bool = True):
        self.clip = clip
        self.generator = ViewGenerator(views, clip.image_size, clip.image_mean, clip.image_std)
        self.amp = amp and clip.device.type == "cuda"

    @torch.no_grad()
    def __call__(self, image, sample_id: str) -> torch.Tensor:
        views = self.generator(image, sample_id).to(self.clip.device)
        with torch.autocast(self.clip.device.type, dtype=torch.float16, enabled=self.amp):
            return self.clip.model.encode_image(views, normalize=True).float()


class ImageViewSource:
    """View features straight from images: the image encoder runs for every sample, every run."""

    def __init__(self, dataset, encoder: ViewEncoder):
        self.dataset = dataset
        self.encoder = encoder

    def __call__(self, sample_id: str) -> torch.Tensor:
        return self.encoder(self.dataset.load(sample_id), sample_id)


class CachedViewSource:
    """View features from a cache: sample ids and one [N, n_views, E] tensor."""

    def __init__(self, sample_ids: list[str], features: torch.Tensor, device: torch.device | str = "cpu"):
        self.row = {sample_id: i for i, sample_id in enumerate(sample_ids)}
        self.features = features
        self.device = torch.device(device)

    def __call__(self, sample_id: str) -> torch.Tensor:
        if sample_id not in self.row:
            raise KeyError(f"sample {sample_id!r} is not in the feature cache")
        return self.features[self.row[sample_id]].to(self.device)

    @classmethod
    def build(cls, source: ImageViewSource, sample_ids: list[str], progress=None) -> "CachedViewSource":
        """Run `source` once per sample and keep the results."""
        rows = []
        for sample_id in sample_ids:
            rows.append(source(sample_id).cpu())
            if progress is not None:
                progress.update(1)
        return cls(list(sample_ids), torch.stack(rows), device=source.encoder.clip.device)

    def save(self, path: str | Path) -> None:
        torch.save({"sample_ids": list(self.row), "features": self.features}, path)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> "CachedViewSource":
        payload = torch.load(path, map_location="cpu", weights_only=True)
        return cls(payload["sample_ids"], payload["features"], device=device)
