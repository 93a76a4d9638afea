"""Dataset adapters: each turns a dataset in its usual layout into a manifest of test samples."""
from __future__ import annotations

from functools import partial
from pathlib import Path

from . import coop, imagenet
from .base import (
    MANIFEST_COLUMNS,
    DatasetNotFoundError,
    ManifestDataset,
    image_folder,
    load_prepared,
    write_prepared,
)
from .fashion_mnist import fashion_mnist

ADAPTERS = {
    "image_folder": image_folder,
    "fashion_mnist": fashion_mnist,
    "imagenet": imagenet.imagenet,
    "imagenet_a": imagenet.imagenet_a,
    "imagenet_v2": imagenet.imagenet_v2,
    "imagenet_r": imagenet.imagenet_r,
    "imagenet_sketch": imagenet.imagenet_sketch,
    "fgvc_aircraft": coop.fgvc_aircraft,
    **{kind: partial(coop.coop_split, kind=kind) for kind in coop.COOP_LAYOUTS},
}

# Test-split sizes and class counts of the paper's datasets, checked by the validate stage.
EXPECTED = {
    "imagenet": (50000, 1000), "imagenet_a": (7500, 200), "imagenet_v2": (10000, 1000),
    "imagenet_r": (30000, 200), "imagenet_sketch": (50889, 1000), "caltech101": (2465, 100),
    "oxford_pets": (3669, 37), "stanford_cars": (8041, 196), "flowers102": (2463, 102), "food101": (30300, 101),
    "fgvc_aircraft": (3333, 100), "sun397": (19850, 397), "dtd": (1692, 47), "eurosat": (8100, 10),
    "ucf101": (3783, 101),
}

def expected_samples(spec, settings=None) -> int | None:
    """How many samples a dataset must have, where that is known: `n_samples` of the bundled Fashion-MNIST streams,
    the paper datasets' test splits (unless `validate.known_split_sizes` is off), or `expected_samples`."""
    if spec.kind == "fashion_mnist":
        return spec.options.get("n_samples")
    known = settings is None or settings.validate.known_split_sizes
    if known and spec.kind in EXPECTED and spec.options.get("split", "test") == "test":
        return EXPECTED[spec.kind][0]
    return spec.expected_samples


def build_dataset(name: str, kind: str, options: dict, base_dir: str | Path = ".") -> ManifestDataset:
    """A dataset from its adapter kind and options, e.g. imagenet_a with {root: /data/imagenet-a}."""
    if kind not in ADAPTERS:
        raise ValueError(f"dataset {name!r}: kind {kind!r} is not one of {sorted(ADAPTERS)}")
    options = dict(options)
    for key in ("root", "source"):
        if key in options:
            options[key] = Path(base_dir) / Path(options[key]).expanduser()
    return ADAPTERS[kind](name, **options)


def open_dataset(name: str, kind: str, options: dict, prepared_root: str | Path | None = None,
                 base_dir: str | Path = ".") -> ManifestDataset:
    """The prepared copy when the prepare stage has written one, else the adapter over the raw data."""
    if prepared_root is not None and (Path(prepared_root) / name / "manifest.parquet").is_file():
        return load_prepared(name, Path(prepared_root) / name)
    return build_dataset(name, kind, options, base_dir)


__all__ = [
    "ADAPTERS", "EXPECTED", "MANIFEST_COLUMNS", "DatasetNotFoundError", "ManifestDataset",
    "build_dataset", "expected_samples", "load_prepared", "open_dataset", "write_prepared",
]
