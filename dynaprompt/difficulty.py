"""How hard each sample is for the model before any adaptation: the zero-shot entropy of its original view.

The `hardest_first` and `easiest_first` orderings sort a stream by it. It needs no labels, so such a stream can be
built on any data. The entropy is that of CLIP's softmax over the classes, for the original view (view 0: resize
and centre crop), under the prompt's initial context v0. That is the prediction zero-shot CLIP makes
(`dynaprompt.methods.zero_shot`).

It must not move with anything a run varies:
- The features are view 0 of the feature cache of the stream's own views under the params' view seed
  (`dataset_views`), whatever view seed or method a run uses. Without that cache, the image encoder encodes
  the original view alone.
- Each (model weights, arch, activation, prompt, class names, manifest) gets the value once, under
  `paths.cache`/difficulty. Every later run and plan reads it from there. The cache and the encoder can differ
  in the last bit of half precision, so the first value computed is the one kept.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace

import pandas as pd
import torch

from .datasets import ManifestDataset
from .datasets.base import MixtureDataset
from .features import FeatureStore, ImageViewSource, MixtureViewSource, ViewEncoder, cache_identity
from .methods.zero_shot import classifier
from .model import LoadedClip
from .objectives import entropy, original_view_logits
from .orderings import DIFFICULTY
from .provenance import weights_fingerprint
from .resolve import dataset_views
from .results import write_atomically
from .specs import Settings


def with_difficulty(settings: Settings, data: ManifestDataset, clip: LoadedClip) -> pd.DataFrame:
    """`data`'s manifest with a `difficulty` column: each sample's zero-shot entropy (higher: harder)."""
    values = zero_shot_entropy(settings, data, clip)
    return data.manifest.assign(**{DIFFICULTY: data.manifest["sample_id"].map(values).to_numpy()})


def zero_shot_entropy(settings: Settings, data: ManifestDataset, clip: LoadedClip) -> pd.Series:
    """sample id -> zero-shot entropy of its original view, computed once per model, prompt and manifest."""
    file = settings.path("cache") / "difficulty" / f"{difficulty_key(settings, data, clip)}.parquet"
    if file.is_file():
        stored = pd.read_parquet(file)
        return pd.Series(stored[DIFFICULTY].to_numpy(), index=stored["sample_id"])
    values = compute_entropy(settings, data, clip)
    write_atomically(pd.DataFrame({"sample_id": values.index, DIFFICULTY: values.to_numpy()}), file)
    return values


def difficulty_key(settings: Settings, data: ManifestDataset, clip: LoadedClip) -> str:
    """What the entropies depend on: the model, the prompt, the stream (its params entry and its members': the
    sample ids of two corruptions of one set are the same), its class names and its manifest's samples."""
    manifest = data.manifest[["sample_id", "label"]].astype(str)
    members = getattr(data, "members", {data.name: data})
    payload = {"weights": weights_fingerprint(clip.weights), "arch": settings.model.arch,
               "activation": clip.activation, "prompt": asdict(settings.prompt),
               "stream": asdict(settings.stream(data.name)),
               "members": {m: asdict(settings.stream(m)) for m in members}, "classnames": list(data.classnames),
               "manifest": hashlib.sha256(manifest.to_csv(index=False).encode()).hexdigest()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def compute_entropy(settings: Settings, data: ManifestDataset, clip: LoadedClip) -> pd.Series:
    """The entropy of zero-shot CLIP's prediction on each sample's original view, under v0."""
    from .runner import build_text_encoder  # the runner adds this module's column: imported when used

    text = build_text_encoder(clip, data.classnames, settings, settings.run.max_text_tokens)
    text_features, scale = classifier(text), text.logit_scale().detach()
    source = original_view_source(settings, data, clip)
    ids = data.manifest["sample_id"].tolist()
    values = [float(entropy(original_view_logits(source(s), text_features, scale))) for s in ids]
    return pd.Series(values, index=ids)


def original_view_source(settings: Settings, data: ManifestDataset, clip: LoadedClip):
    """sample id -> view features whose row 0 is the original view: the cache of the stream's own views under the
    params' view seed where it is complete, else the image encoder over the original view alone."""
    if isinstance(data, MixtureDataset):
        return MixtureViewSource({m: original_view_source(settings, d, clip) for m, d in data.members.items()})
    views = dataset_views(settings, data.name)
    store = FeatureStore.for_views(settings.path("features") / data.name, views)
    if store.is_complete():
        identity = cache_identity(clip, settings.model.arch, views, settings.embed.dtype)
        return store.open(clip.device, identity=identity)
    encoder = ViewEncoder(clip, replace(views, n_views=1), amp=settings.tuning.amp, dtype=settings.embed.dtype)
    return ImageViewSource(data, encoder)
