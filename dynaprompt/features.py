"""Image features of the views of each sample: computed from images, or read from a cache built once.

The cache of one dataset under one view setting (`FeatureStore`):

    data/features/<dataset>/<views id>/
        meta.json      identity (encoder, weights, views, storage dtype), sample ids, shape, progress
        features.npy   [samples, views, E] in the storage dtype (float16: the encoder's half precision)

It is written by the embed stage through a torch DataLoader whose workers make the views (each sample's views
a function of (view_seed, sample_id) only, so the workers' order does not matter) and, on a CPU, also encode
them, one thread each; on a GPU the main process encodes several samples' views per forward under autocast.
The workers' batches in flight pass through /dev/shm: `plan_loader` fits workers x prefetch x batch into a share
of its free space, lowering prefetch, then workers, and says so.
Progress is committed every `chunk_size` samples, so an interrupted embed resumes where it stopped. A run opens
the cache memory-mapped and reads only its own samples' rows; each row's pages are released after the read, so
a run's resident memory does not grow with the cache.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .model import LoadedClip
from .provenance import weights_fingerprint
from .views import ViewConfig, ViewGenerator

STORAGE_DTYPES = {"float16": torch.float16, "float32": torch.float32}
RELEASE_MARGIN = 1 << 20  # bytes released on either side of a row read (covers the kernel's fault-around window)
CACHE_FORMAT = 2  # 1: chunk-*.pt files of fp32 rows loaded whole; 2: one memory-mapped features.npy


def storage_dtype(name: str) -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"embed.dtype must be one of {sorted(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def cache_identity(clip: LoadedClip, arch: str, views: ViewConfig, dtype: str = "float16") -> dict:
    """What a feature cache depends on: the image encoder, the views and the storage precision (as JSON reads
    it back: lists, not tuples)."""
    return json.loads(json.dumps({"arch": arch, "weights": weights_fingerprint(clip.weights), "views": asdict(views),
                                  "dtype": dtype, "format": CACHE_FORMAT}))


class ViewEncoder:
    """The frozen image encoder over views: unit-norm features, rounded to the storage dtype, returned in fp32.

    The rounding makes features computed on the fly equal to the cached ones, bit for bit.
    """

    def __init__(self, clip: LoadedClip, views: ViewConfig, amp: bool = True, dtype: str = "float16"):
        self.clip = clip
        self.views = views
        self.generator = ViewGenerator(views, clip.image_size, clip.image_mean, clip.image_std)
        self.amp = amp and clip.device.type == "cuda"
        self.dtype = storage_dtype(dtype)

    @torch.no_grad()
    def encode(self, views: torch.Tensor) -> torch.Tensor:
        """Features [N, E] of normalised views [N, 3, S, S] (any number of samples' views at once)."""
        views = views.to(self.clip.device, non_blocking=True)
        return encode_views(lambda v: self.clip.model.encode_image(v, normalize=True), views, self.amp, self.dtype)

    def __call__(self, image, sample_id: str) -> torch.Tensor:
        return self.encode(self.generator(image, sample_id))


def encode_views(encode_image, views: torch.Tensor, amp: bool, dtype: torch.dtype) -> torch.Tensor:
    """Unit-norm features [N, E] of views on their device by `encode_image` (a CLIP's, or an image tower standing in
    for it), under fp16 autocast on a GPU when `amp`, rounded to the storage `dtype` and returned in fp32: what the
    cache stores, and how a method given the pixels (TTL; RLCF with its own teacher) rounds the features it makes."""
    with torch.autocast(views.device.type, dtype=torch.float16, enabled=amp and views.device.type == "cuda"):
        return encode_image(views).to(dtype).float()


class ImageViewSource:
    """View features straight from images: the image encoder runs for every sample, every run."""

    def __init__(self, dataset, encoder: ViewEncoder):
        self.dataset = dataset
        self.encoder = encoder

    def __call__(self, sample_id: str) -> torch.Tensor:
        return self.encoder(self.dataset.load(sample_id), sample_id)


class ViewPixelSource:
    """The normalised views [n_views, 3, S, S] of a sample on `device`, for the methods that run an image tower
    themselves (`reads_images`): the same views, from the same generator, as the cache is built from."""

    def __init__(self, dataset, generator: ViewGenerator, device: torch.device | str = "cpu"):
        self.dataset = dataset
        self.generator = generator
        self.device = torch.device(device)

    def __call__(self, sample_id: str) -> torch.Tensor:
        return self.generator(self.dataset.load(sample_id), sample_id).to(self.device)


class ViewsDataset(torch.utils.data.Dataset):
    """Item i = (i, the views of sample i) -- or (i, their features) when `encoder` encodes in the worker."""

    def __init__(self, dataset, sample_ids: list[str], generator: ViewGenerator, encoder: ViewEncoder | None = None):
        self.dataset, self.sample_ids, self.generator, self.encoder = dataset, sample_ids, generator, encoder

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int):
        sample_id = self.sample_ids[index]
        views = self.generator(self.dataset.load(sample_id), sample_id)
        return index, (views if self.encoder is None else self.encoder.encode(views))


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # each worker encodes on its own core


class CachedViewSource:
    """View features from a cache: sample ids and [N, n_views, E] rows (a tensor, or a memory-mapped file)."""

    def __init__(self, sample_ids: list[str], features, device: torch.device | str = "cpu"):
        self.row = {sample_id: i for i, sample_id in enumerate(sample_ids)}
        self.features = features
        self.device = torch.device(device)

    def __call__(self, sample_id: str) -> torch.Tensor:
        if sample_id not in self.row:
            raise KeyError(f"sample {sample_id!r} is not in the feature cache")
        return self.features[self.row[sample_id]].to(self.device).float()

    @classmethod
    def build(cls, source: ImageViewSource, sample_ids: list[str]) -> "CachedViewSource":
        """Run `source` once per sample and keep the results in memory."""
        rows = [source(sample_id).cpu() for sample_id in sample_ids]
        return cls(list(sample_ids), torch.stack(rows), device=source.encoder.clip.device)


class MappedRows:
    """Rows of a .npy array read through a read-only memory map; a row's pages are released once copied."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with self.path.open("rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(handle)
            offset = handle.tell()
        if fortran:
            raise ValueError(f"{self.path}: a Fortran-ordered array is not a feature cache")
        self.shape, self.dtype, self.offset = tuple(shape), np.dtype(dtype), offset
        self.row_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
        with self.path.open("rb") as handle:
            self._map = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if hasattr(mmap, "MADV_RANDOM"):  # no read-ahead or fault-around: a read maps its own row's pages only
            self._map.madvise(mmap.MADV_RANDOM)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, row: int) -> torch.Tensor:
        start = self.offset + row * self.row_bytes
        values = np.frombuffer(self._map, self.dtype, count=self.row_bytes // self.dtype.itemsize, offset=start)
        out = torch.from_numpy(values.reshape(self.shape[1:]).copy())
        # the kernel maps the pages around a fault too (fault-around, 64 KiB by default, whatever MADV_RANDOM
        # says): release a window well past the row, so that no neighbour's pages stay resident either
        first = max(0, (start - RELEASE_MARGIN) // mmap.PAGESIZE * mmap.PAGESIZE)
        end = min(len(self._map), start + self.row_bytes + RELEASE_MARGIN)
        self._map.madvise(mmap.MADV_DONTNEED, first, end - first)
        return out

    def __getstate__(self):
        return {"path": self.path}

    def __setstate__(self, state):
        self.__init__(state["path"])


def views_id(views: ViewConfig) -> str:
    """A folder name per view setting: 'crop-1a2b3c4d' or 'augmix-...' (a dataset may need both)."""
    digest = hashlib.sha256(json.dumps(asdict(views), sort_keys=True).encode()).hexdigest()[:8]
    return f"{'augmix' if views.augmix else 'crop'}-{digest}"


@dataclass(frozen=True)
class LoaderMemory:
    """How much shared memory the embed loader's workers may fill with batches in flight."""

    prefetch: int = 4  # batches each worker prepares ahead (its value before this bound: it kept the GPU fed)
    shm_share: float = 0.5  # of the free /dev/shm the batches in flight may take (the rest: other processes, and
    #   the batch being consumed)


@dataclass(frozen=True)
class LoaderPlan:
    """Loader workers and prefetch that fit the shared memory, and what was lowered (empty when nothing)."""

    workers: int
    prefetch: int
    note: str = ""


def batch_bytes(encoder: ViewEncoder, samples_per_batch: int, on_gpu: bool) -> int:
    """Bytes of one batch a worker sends: fp32 views [B, V, 3, S, S] (GPU), or their fp32 features [B, V, E]."""
    per_view = 3 * encoder.clip.image_size**2 if on_gpu else int(encoder.clip.model.visual.output_dim)
    return samples_per_batch * encoder.views.n_views * per_view * 4


def free_shared_memory(path: str = "/dev/shm") -> float:
    """Free bytes of the shared-memory filesystem DataLoader workers send batches through (inf where none)."""
    try:
        stats = os.statvfs(path)
    except OSError:
        return float("inf")
    return stats.f_bavail * stats.f_frsize


def plan_loader(workers: int, prefetch: int, batch: int, free: float, share: float) -> LoaderPlan:
    """Workers x prefetch batches in flight within `share` of the free shared memory: lower prefetch first, then
    workers; where not even one batch fits, no workers (the main process makes the views: no shared memory).

    Switching torch to the `file_system` sharing strategy would not help: its segments live in /dev/shm too.
    """
    budget, wanted = free * share, workers * prefetch * batch
    if workers == 0 or wanted <= budget:
        return LoaderPlan(workers, prefetch)
    fits = int(budget // batch)
    if fits >= workers:
        plan, action = LoaderPlan(workers, fits // workers), f"prefetch lowered to {fits // workers}"
    elif fits >= 1:
        plan, action = LoaderPlan(fits, 1), f"{fits} loader worker(s) with prefetch 1"
    else:
        plan, action = LoaderPlan(0, prefetch), ("no loader workers: the main process makes the views (give the "
                                                 "container more /dev/shm, e.g. docker run --shm-size, for workers)")
    note = (f"{workers} loader workers x prefetch {prefetch} x {batch / 2**20:.0f} MiB per batch = "
            f"{wanted / 2**30:.2f} GiB of shared memory, but /dev/shm has {free / 2**30:.2f} GiB free (at most "
            f"{share:.0%} used): {action}")
    return LoaderPlan(plan.workers, plan.prefetch, note)


class FeatureStore:
    """A view-feature cache on disk: meta.json + features.npy, resumable, opened memory-mapped."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @classmethod
    def for_views(cls, dataset_folder: str | Path, views: ViewConfig) -> "FeatureStore":
        """The store of one dataset's features under one view setting."""
        return cls(Path(dataset_folder) / views_id(views))

    @property
    def meta_file(self) -> Path:
        return self.folder / "meta.json"

    @property
    def features_file(self) -> Path:
        return self.folder / "features.npy"

    def read_meta(self) -> dict | None:
        return json.loads(self.meta_file.read_text()) if self.meta_file.is_file() else None

    def is_complete(self) -> bool:
        meta = self.read_meta()
        return bool(meta and meta.get("complete"))

    def state(self) -> str:
        """What is there, in words: 'is missing', 'is incomplete (120 of 300 samples)' or 'is complete'."""
        meta = self.read_meta()
        if not meta:
            return "is missing"
        if meta.get("complete"):
            return "is complete"
        total, size = len(meta["sample_ids"]), meta["chunk_size"]
        done = sum(min(size, total - chunk * size) for chunk in meta["chunks_done"])
        return f"is incomplete ({done} of {total} samples)"

    def write_meta(self, meta: dict) -> None:
        partial = self.meta_file.with_name("meta.json.partial")
        partial.write_text(json.dumps(meta))
        os.replace(partial, self.meta_file)

    def build(self, dataset, encoder: ViewEncoder, sample_ids: list[str], identity: dict, chunk_size: int = 256,
              samples_per_batch: int = 8, workers: int = 2, progress: bool = False,
              memory: LoaderMemory | None = None) -> dict:
        """Encode every sample once; chunks already committed for the same identity are kept (resume)."""
        sample_ids = list(sample_ids)
        shape = [len(sample_ids), encoder.views.n_views, int(encoder.clip.model.visual.output_dim)]
        key = {"identity": identity, "sample_ids": sample_ids, "shape": shape, "chunk_size": chunk_size}
        meta = self.read_meta()
        if not (meta and {k: meta.get(k) for k in key} == key and self.features_file.is_file()):
            self._start_over()  # another model, views, dtype or sample list (or a cache of the old format)
            np.lib.format.open_memmap(self.features_file, mode="w+", dtype=identity["dtype"], shape=tuple(shape))
            meta = {**key, "chunks_done": [], "complete": False}
            self.write_meta(meta)
        n_chunks = -(-len(sample_ids) // chunk_size)
        pending = [c for c in range(n_chunks) if c not in set(meta["chunks_done"])]
        rows = [i for c in pending for i in range(c * chunk_size, min((c + 1) * chunk_size, len(sample_ids)))]
        bar = tqdm(total=len(sample_ids), initial=len(sample_ids) - len(rows), disable=not progress,
                   unit="sample", desc=f"embed {self.folder.name}")
        # opened for writing only when something is left: a complete (perhaps DVC-linked, read-only) cache never is
        target = np.load(self.features_file, mmap_mode="r+") if rows else None
        memory = memory or LoaderMemory()
        for index, features in self._encoded(dataset, encoder, sample_ids, rows, samples_per_batch, workers, memory):
            target[index] = features.to(encoder.dtype).numpy()
            bar.update(1)
            chunk = index // chunk_size
            if index == min((chunk + 1) * chunk_size, len(sample_ids)) - 1:  # the chunk's last row: commit it
                target.flush()
                meta["chunks_done"] = sorted(meta["chunks_done"] + [chunk])
                self.write_meta(meta)
        bar.close()
        del target
        if not meta["complete"]:
            meta["complete"] = True
            self.write_meta(meta)
        return {"samples": len(sample_ids), "reused": len(sample_ids) - len(rows), "encoded": len(rows)}

    def _start_over(self) -> None:
        """Remove what is there by unlinking (a DVC-linked file is never written through)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in list(self.folder.glob("chunk-*.pt")) + [self.features_file, self.meta_file]:
            stale.unlink(missing_ok=True)

    def _encoded(self, dataset, encoder: ViewEncoder, sample_ids, rows, samples_per_batch: int, workers: int,
                 memory: LoaderMemory = LoaderMemory()):
        """(row, features [V, E] on the CPU) in row order: workers make the views; on a CPU they encode them too."""
        on_gpu = encoder.clip.device.type == "cuda"
        if not on_gpu:  # each worker encodes on one core: no more workers than cores
            workers = min(workers, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else workers)
        plan = plan_loader(workers, memory.prefetch, batch_bytes(encoder, samples_per_batch, on_gpu),
                           free_shared_memory(), memory.shm_share)
        if plan.note:
            print(f"embed {self.folder}: {plan.note}", flush=True)
        items = ViewsDataset(dataset, sample_ids, encoder.generator, None if on_gpu else encoder)
        loader = torch.utils.data.DataLoader(  # a batch is one message from a worker: B samples' views or features
            torch.utils.data.Subset(items, rows), batch_size=samples_per_batch,
            num_workers=plan.workers, pin_memory=on_gpu, worker_init_fn=None if on_gpu else _one_thread,
            prefetch_factor=plan.prefetch if plan.workers else None, persistent_workers=False)
        for indices, batch in loader:
            if on_gpu:  # several samples' views through one forward
                n = batch.shape[1]
                batch = encoder.encode(batch.flatten(0, 1)).reshape(len(indices), n, -1).cpu()
            for index, features in zip(indices.tolist(), batch):
                yield index, features

    def open(self, device: torch.device | str = "cpu", identity: dict | None = None) -> CachedViewSource:
        """The cache as a view source over a memory map; incomplete, or built for another encoder: an error."""
        meta = self.read_meta()
        if not meta or not meta.get("complete"):
            raise FileNotFoundError(f"feature cache {self.folder} is missing or incomplete (run the embed stage)")
        if identity is not None and meta["identity"] != identity:
            raise ValueError(
                f"feature cache {self.folder} was built for {meta['identity']}, not for {identity}; "
                "re-run the embed stage (dvc repro) or remove the folder"
            )
        return CachedViewSource(meta["sample_ids"], MappedRows(self.features_file), device=device)


class MixtureViewSource:
    """View features of a mixture's samples (`member/sample_id`) from each member's own source."""

    def __init__(self, sources: dict):
        self.sources = sources

    def __call__(self, sample_id: str) -> torch.Tensor:
        member, _, member_sample_id = sample_id.partition("/")
        return self.sources[member](member_sample_id)


class LastBitPerturbation:
    """View features with every element's last bit in the storage precision flipped or kept, at random.

    A control that reaches every method (issue 25): the view seed changes the augmented views, which a method that
    reads only the original view (OnZeta, ECALP, TCA, DMN-W) never sees; this perturbation moves each feature it
    reads by at most one unit in the last place of the cache's precision (fp16: about 5e-4 relative), the size of
    difference another CPU's or GPU's kernels leave after rounding to the cache. Each element keeps its value or
    has the lowest bit of its stored representation flipped, with probability 1/2 each, drawn from a generator
    seeded by (view seed, replicate, sample id): the same sample gets the same perturbation in every ordering, so
    orderings still differ only in their order, and replicate r > 0 of a cell differs from its replicate 0 only here.
    The features stay exactly representable in the storage dtype, so the perturbed stream could have been cached.
    """

    INTEGER_VIEWS = {torch.float16: torch.int16, torch.float32: torch.int32}

    def __init__(self, source, dtype: str, view_seed: int, replicate: int = 0):
        self.source = source
        self.dtype = storage_dtype(dtype)
        self.view_seed, self.replicate = int(view_seed), int(replicate)

    def seed_of(self, sample_id: str) -> int:
        text = f"lastbit/{self.view_seed}/{self.replicate}/{sample_id}".encode()
        return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)

    def __call__(self, sample_id: str) -> torch.Tensor:
        features = self.source(sample_id)
        stored = features.to(self.dtype)
        finite = torch.isfinite(features)  # a NaN stays non-finite: the run's own check names it
        if not torch.equal(stored.float()[finite], features.float()[finite]):
            raise ValueError(f"features of {sample_id!r} are not {self.dtype} values: the last-bit perturbation needs "
                             "features rounded to the cache's precision (embed.dtype)")
        generator = torch.Generator().manual_seed(self.seed_of(sample_id))
        flips = torch.randint(0, 2, stored.shape, generator=generator, dtype=self.INTEGER_VIEWS[self.dtype])
        perturbed = (stored.view(self.INTEGER_VIEWS[self.dtype]) ^ flips.to(stored.device)).view(self.dtype)
        return perturbed.to(features.dtype)
