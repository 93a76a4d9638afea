"""Image features of the views of each sample: computed from images, or read from a cache built once."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import LoadedClip
from .provenance import weights_fingerprint
from .views import ViewConfig, ViewGenerator


def cache_identity(clip: LoadedClip, arch: str, views: ViewConfig) -> dict:
    """What a feature cache depends on: the image encoder and the views (as JSON reads it back: lists, not tuples)."""
    return json.loads(json.dumps({"arch": arch, "weights": weights_fingerprint(clip.weights), "views": asdict(views)}))


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
    def build(cls, source: ImageViewSource, sample_ids: list[str]) -> "CachedViewSource":
        """Run `source` once per sample and keep the results."""
        rows = [source(sample_id).cpu() for sample_id in sample_ids]
        return cls(list(sample_ids), torch.stack(rows), device=source.encoder.clip.device)


def views_id(views: ViewConfig) -> str:
    """A folder name per view setting: 'crop-1a2b3c4d' or 'augmix-...' (a dataset may need both)."""
    digest = hashlib.sha256(json.dumps(asdict(views), sort_keys=True).encode()).hexdigest()[:8]
    return f"{'augmix' if views.augmix else 'crop'}-{digest}"


class FeatureStore:
    """A view-feature cache on disk: meta.json + chunk files; resumable, each chunk written atomically."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def for_views(cls, dataset_folder: str | Path, views: ViewConfig) -> "FeatureStore":
        """The store of one dataset's features under one view setting."""
        return cls(Path(dataset_folder) / views_id(views))

    def is_complete(self) -> bool:
        meta = self.read_meta()
        return bool(meta and meta.get("complete"))

    @property
    def meta_file(self) -> Path:
        return self.folder / "meta.json"

    def chunk_file(self, index: int) -> Path:
        return self.folder / f"chunk-{index:05d}.pt"

    def read_meta(self) -> dict | None:
        return json.loads(self.meta_file.read_text()) if self.meta_file.is_file() else None

    def build(self, source: ImageViewSource, sample_ids: list[str], identity: dict, chunk_size: int = 256,
              progress: bool = False) -> dict:
        """Encode every sample once; chunks already on disk for the same identity are kept (resume)."""
        meta = {"identity": identity, "sample_ids": list(sample_ids), "chunk_size": chunk_size, "complete": False}
        previous = self.read_meta()
        if previous and {k: previous.get(k) for k in ("identity", "sample_ids", "chunk_size")} != {
            k: meta[k] for k in ("identity", "sample_ids", "chunk_size")
        }:
            for stale in self.folder.glob("chunk-*.pt"):  # another model, views or sample list: start over
                stale.unlink()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.meta_file.write_text(json.dumps(meta))
        starts = range(0, len(sample_ids), chunk_size)
        bar = tqdm(total=len(sample_ids), disable=not progress, unit="sample", desc=f"embed {self.folder.name}")
        reused = 0
        for index, start in enumerate(starts):
            batch = sample_ids[start : start + chunk_size]
            target = self.chunk_file(index)
            if target.is_file():
                reused += len(batch)
            else:
                features = torch.stack([source(sample_id).cpu() for sample_id in batch])
                partial = target.with_suffix(".partial")
                torch.save(features, partial)
                os.replace(partial, target)
            bar.update(len(batch))
        bar.close()
        meta["complete"] = True
        self.meta_file.write_text(json.dumps(meta))
        return {"samples": len(sample_ids), "reused": reused, "encoded": len(sample_ids) - reused}

    def open(self, device: torch.device | str = "cpu", identity: dict | None = None) -> CachedViewSource:
        return self.load(device, identity)

    def load(self, device: torch.device | str = "cpu", identity: dict | None = None) -> CachedViewSource:
        """The whole cache as a view source; incomplete, or built for another encoder or views: an error."""
        meta = self.read_meta()
        if not meta or not meta.get("complete"):
            raise FileNotFoundError(f"feature cache {self.folder} is missing or incomplete (run the embed stage)")
        if identity is not None and meta["identity"] != identity:
            raise ValueError(
                f"feature cache {self.folder} was built for {meta['identity']}, not for {identity}; "
                "re-run the embed stage (dvc repro) or remove the folder"
            )
        n_chunks = -(-len(meta["sample_ids"]) // meta["chunk_size"])
        chunks = [torch.load(self.chunk_file(i), map_location="cpu", weights_only=True) for i in range(n_chunks)]
        return CachedViewSource(meta["sample_ids"], torch.cat(chunks), device=device)


class MixtureViewSource:
    """View features of a mixture's samples (`member/sample_id`) from each member's own source."""

    def __init__(self, sources: dict):
        self.sources = sources

    def __call__(self, sample_id: str) -> torch.Tensor:
        member, _, member_sample_id = sample_id.partition("/")
        return self.sources[member](member_sample_id)
