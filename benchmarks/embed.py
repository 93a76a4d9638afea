"""Embed throughput: the embed stage's DataLoader path against the serial path it replaced, side by side.

    python -m benchmarks.embed [--arch tiny-clip|ViT-B-16] [--samples 48] [--serial-samples K] [--views 64]
        [--augmix] [--image-size 28] [--workers 2] [--samples-per-batch 8] [--threads 2] [--device cpu|cuda]
        [--out reports/benchmark-embed.json]

Both paths encode the same random images (`--image-size` px squares, as the bundled Fashion-MNIST streams are 28
px) into a FeatureStore in one process run:

- serial (the code before): per sample, its views made in the main process, then one encoder forward over
  them, `--threads` torch threads (`ImageViewSource` sample by sample, as `FeatureStore.build` did);
- loader (the embed stage now): `FeatureStore.build` through a torch DataLoader with `--workers` worker
  processes that make the views (and, on a CPU, encode them with one thread each; on a GPU the main process
  encodes several samples' views per forward under autocast).

It prints samples/s of each, the ratio, and whether the stored features are identical bit for bit (on a GPU the
loader's larger batches may round differently: the largest difference is given too). `--serial-samples K` runs the
serial path on the first K samples only (at the paper's 8 workers x 16 samples a batch, the loader needs hundreds
of samples to keep its workers busy, which the serial path need not repeat). The report also gives the shared
memory the loader's batches in flight need (workers x prefetch x batch, `dynaprompt.features.plan_loader`) against
what /dev/shm has free, and what the loader did about it.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from dynaprompt.features import (
    FeatureStore,
    ImageViewSource,
    LoaderMemory,
    ViewEncoder,
    batch_bytes,
    cache_identity,
    free_shared_memory,
    plan_loader,
)
from dynaprompt.model import ModelSpec, load_clip
from dynaprompt.views import ViewConfig


class RandomImages:
    """`n` random uint8 RGB images of `size` px, addressed by sample id (what a prepared dataset offers)."""

    def __init__(self, n: int, size: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.pixels = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        self.ids = [f"img{i:05d}" for i in range(n)]
        self._row = {s: i for i, s in enumerate(self.ids)}

    def load(self, sample_id: str):
        return self.pixels[self._row[sample_id]]


def serial_build(store: FeatureStore, images: RandomImages, ids: list, encoder: ViewEncoder, identity: dict) -> None:
    """The embed path before the DataLoader: views and one forward per sample, in the main process."""
    source = ImageViewSource(images, encoder)
    shape = (len(ids), encoder.views.n_views, int(encoder.clip.model.visual.output_dim))
    store.folder.mkdir(parents=True, exist_ok=True)
    target = np.lib.format.open_memmap(store.features_file, mode="w+", dtype=identity["dtype"], shape=shape)
    for row, sample_id in enumerate(ids):
        target[row] = source(sample_id).cpu().to(encoder.dtype).numpy()
    target.flush()


def shared_memory(encoder: ViewEncoder, workers: int, samples_per_batch: int) -> dict:
    """The loader's batches in flight against /dev/shm's free space, and the loader's plan for them."""
    memory, on_gpu = LoaderMemory(), encoder.clip.device.type == "cuda"
    batch, free = batch_bytes(encoder, samples_per_batch, on_gpu), free_shared_memory()
    plan = plan_loader(workers, memory.prefetch, batch, free, memory.shm_share)
    wanted = workers * memory.prefetch * batch
    return {"shm_free_gib": round(free / 2**30, 2), "batch_bytes": batch, "batch_mib": round(batch / 2**20, 1),
            "in_flight_gib": round(wanted / 2**30, 2), "headroom_gib": round((free - wanted) / 2**30, 2),
            "prefetch": memory.prefetch, "planned_workers": plan.workers, "planned_prefetch": plan.prefetch,
            "note": plan.note}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="tiny-clip")
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--serial-samples", type=int, default=None, help="the serial path on the first K only")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument("--augmix", action="store_true")
    parser.add_argument("--image-size", type=int, default=28)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples-per-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="reports/benchmark-embed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = load_clip(ModelSpec(arch=args.arch, pretrained=None, device=args.device))
    views = ViewConfig(n_views=args.views, augmix=args.augmix)
    images = RandomImages(args.samples, args.image_size)
    encoder = ViewEncoder(clip, views)
    identity = cache_identity(clip, args.arch, views)
    encoder(images.load(images.ids[0]), images.ids[0])  # first calls set up kernels, for both paths
    serial_ids = images.ids[: args.serial_samples or args.samples]
    shm = shared_memory(encoder, args.workers, args.samples_per_batch)
    with tempfile.TemporaryDirectory() as tmp:
        serial, loader = FeatureStore(Path(tmp) / "serial"), FeatureStore(Path(tmp) / "loader")
        start = time.perf_counter()
        serial_build(serial, images, serial_ids, encoder, identity)
        serial_seconds = time.perf_counter() - start
        start = time.perf_counter()
        loader.build(images, encoder, images.ids, identity, samples_per_batch=args.samples_per_batch,
                     workers=args.workers)
        loader_seconds = time.perf_counter() - start
        ours, theirs = np.load(serial.features_file), np.load(loader.features_file)[: len(serial_ids)]
        identical = bool(np.array_equal(ours, theirs))
        gap = float(np.abs(ours.astype(np.float32) - theirs.astype(np.float32)).max())
    serial_rate, loader_rate = len(serial_ids) / serial_seconds, args.samples / loader_seconds
    report = {"arch": args.arch, "device": args.device, "samples": args.samples, "serial_samples": len(serial_ids),
              "views": args.views, "augmix": args.augmix, "image_size": args.image_size, "workers": args.workers,
              "samples_per_batch": args.samples_per_batch, "threads": args.threads,
              "serial_samples_per_s": round(serial_rate, 2), "loader_samples_per_s": round(loader_rate, 2),
              "speedup": round(loader_rate / serial_rate, 2), "identical_features": identical,
              "max_abs_diff": gap, "shm": shm, "cores": len(__import__("os").sched_getaffinity(0))}
    print(f"embed {args.arch}, {args.samples} samples x {args.views} views{' (AugMix)' if args.augmix else ''} "
          f"on {args.device}: serial {report['serial_samples_per_s']} samples/s, DataLoader ({args.workers} "
          f"workers x {args.samples_per_batch} samples a batch) {report['loader_samples_per_s']} samples/s: "
          f"{report['speedup']}x; identical features: {identical} (max |diff| {gap:.2g}); /dev/shm "
          f"{shm['shm_free_gib']} GiB free for {shm['in_flight_gib']} GiB in flight: {shm['note'] or 'fits'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    path = Path(args.out)
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if (r["arch"], r["augmix"], r["device"]) != (args.arch, args.augmix, args.device)]
    path.write_text(json.dumps(rows + [report], indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
