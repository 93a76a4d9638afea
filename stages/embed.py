"""embed@<dataset>: the frozen image encoder over the views of every sample, once -> data/features/<dataset>/.

Chunked and resumable: re-running after an interruption encodes only the chunks not yet on disk.
"""
from __future__ import annotations

import sys
import time
from dataclasses import replace

from dynaprompt.datasets import load_prepared
from dynaprompt.features import FeatureStore, ImageViewSource, ViewEncoder, cache_identity
from dynaprompt.model import load_clip

from .common import dataset_spec, path, settings


def main(name: str) -> None:
    config = settings()
    spec = dataset_spec(name)
    dataset = load_prepared(name, path("prepared") / name)
    clip = load_clip(config.model)
    views = replace(config.views, augmix=bool(spec.get("augmix", dataset.fine_grained)))
    source = ImageViewSource(dataset, ViewEncoder(clip, views, amp=config.tuning.amp))
    identity = cache_identity(clip, config.model.arch, views)
    start = time.perf_counter()
    stats = FeatureStore(path("features") / name).build(
        source, dataset.manifest["sample_id"].tolist(), identity, progress=True
    )
    seconds = time.perf_counter() - start
    print(f"embedded {name}: {stats['encoded']} samples encoded, {stats['reused']} reused from an earlier "
          f"run, {seconds:.1f}s ({1000 * seconds / max(1, stats['encoded']):.1f} ms/sample)")


if __name__ == "__main__":
    main(sys.argv[1])
