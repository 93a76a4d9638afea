"""embed@<dataset>: the frozen image encoder over the views of every sample, once -> data/features/<dataset>/.

One cache per view setting the planned runs need on the dataset (a method may draw its own views: ZERO uses
crop + flip where the dataset uses AugMix); a dataset no planned run reads gets none (a run by hand on it encodes
its views from the images). Chunked and resumable: after an interruption only the chunks not yet on disk are
encoded.
"""
from __future__ import annotations

import sys
import time

from dynaprompt.features import ViewEncoder, cache_identity
from dynaprompt.model import load_model
from dynaprompt.plan import needed_views
from dynaprompt.runner import feature_store, open_stream

from .common import settings


def main(name: str) -> None:
    config = settings()
    needed = needed_views(config, name)
    (config.path("features") / name).mkdir(parents=True, exist_ok=True)
    if not needed:
        print(f"embed {name}: no planned run reads it; nothing to embed")
        return
    dataset = open_stream(config, name)
    clip = load_model(config)
    embed = config.embed
    for views in needed:
        encoder = ViewEncoder(clip, views, amp=config.tuning.amp, dtype=embed.dtype)
        store = feature_store(config, name, views)
        start = time.perf_counter()
        stats = store.build(dataset, encoder, dataset.manifest["sample_id"].tolist(),
                            cache_identity(clip, config.model.arch, views, embed.dtype), chunk_size=embed.chunk_size,
                            samples_per_batch=embed.samples_per_batch, workers=embed.loader_workers, progress=True)
        seconds = time.perf_counter() - start
        print(f"embedded {name} ({store.folder.name}): {stats['encoded']} samples encoded, {stats['reused']} "
              f"reused, {seconds:.1f}s ({1000 * seconds / max(1, stats['encoded']):.1f} ms/sample)")


if __name__ == "__main__":
    main(sys.argv[1])
